"""Training recipes: how a model is optimised, each field written once with its value per recipe and its help.

`paper` is the paper's §3.2 recipe; `fast` is ours (README "Recipes"). Every field is also a flag of the
same name (support/cli.py), which overrides the named recipe's value:

    recipe = replace(RECIPES["fast"], retrieval_lr=1e-3)
"""
from dataclasses import dataclass, field, fields

from vitdsi import DROPOUT_DRAWS


RECIPE_NAMES = ("paper", "fast")


def knob(paper, fast, help: str, choices: tuple | None = None):
    """One recipe field: its value in the `paper` recipe (§3.2) and in `fast` (ours), and its flag's help."""
    return field(metadata={"paper": paper, "fast": fast, "help": help, "choices": choices})


@dataclass(frozen=True)
class Recipe:
    """How the model is optimised. `paper` is the paper's §3.2 recipe; `fast` is ours (README "Recipes").
    Every field is also a flag of the same name (`--retrieval-lr`), which overrides the recipe's value."""
    optimizer: str = knob("adam", "adamw", "optimiser: adam (paper) or adamw (decoupled weight decay)",
                          ("adam", "adamw"))
    lr: float = knob(5e-4, 2e-3, "peak learning rate of the indexing phase")
    weight_decay: float = knob(0.0, 0.01, "AdamW weight decay")
    batch_size: int = knob(32, 32, "images per step")
    warmup_epochs: float = knob(0, 3, "linear warm-up of each phase, epochs; 0 = none")
    schedule: str = knob("constant", "cosine", "lr schedule: constant, or a cosine decay to --lr-floor over "
                         "the phase's epoch cap", ("constant", "cosine"))
    lr_floor: float = knob(1.0, 0.05, "end of the cosine decay, as a share of the peak lr")
    precision: str = knob("fp32", "auto", "arithmetic of training and decoding: auto = bf16 autocast on "
                          "hardware with bf16 units (CUDA with bf16, CPUs with AMX or AVX512-BF16), else fp32; "
                          "numbers then differ between such machines", ("auto", "fp32", "bf16"))
    index_epochs: int = knob(1000, 150, "indexing epoch cap")
    index_dropout: float | None = knob(None, 0.0, "dropout while indexing (unset: the model's --dropout)")
    index_views: float = knob(0.0, 0.0, "indexing: augmented views per IDB image per epoch, labelled with "
                              "its own ID")
    retrieval_epochs: int = knob(75, 30, "retrieval epoch cap")
    retrieval_lr: float = knob(5e-4, 2e-3, "peak learning rate of the retrieval phase")
    early_stop: str = knob("loss", "map", "retrieval phase: keep the epoch with the best validation loss "
                           "(teacher-forced) or MAP@10 (beam search)", ("loss", "map"))
    patience: int = knob(10, 0, "retrieval phase: epochs without a better validation score before stopping; "
                         "0 = run the whole schedule")
    min_epochs: int = knob(0, 0, "retrieval phase: epochs always run before patience may stop it")
    index_mix: float = knob(0.0, 1.0, "retrieval phase: IDB pairs (image -> own ID) mixed in per query pair, "
                            "against forgetting (Tay et al. §4.4)")
    augment: bool = knob(False, True, "retrieval phase: augmented views of the query images")
    label_smoothing: float = knob(0.0, 0.1, "retrieval phase: cross-entropy label smoothing")
    retrieval_targets: int = knob(1, 8, "retrieval phase: relevant IDs trained per query per step, sharing "
                                  "one encoder pass")
    dropout_draw: str = knob("torch", "words", "how dropout masks are drawn: torch = F.dropout, one random "
                             "number per element; words = 15 random bits per element cut from 64-bit words, "
                             "a quarter of the generator calls", DROPOUT_DRAWS)
    keep_index: bool = knob(False, True, "retrieval phase: keep only an epoch whose IDB IA@1 (beam search) "
                            "is at least --index-target-acc (or the zero-shot IA@1, if lower); with none, the "
                            "zero-shot model stays")


RECIPES = {name: Recipe(**{f.name: f.metadata[name] for f in fields(Recipe)}) for name in RECIPE_NAMES}
