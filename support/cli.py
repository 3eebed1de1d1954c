"""The command line of train.py: its flags, the checks every flag passes before any work starts, and what
the flags turn into (the recipe, the model config, the images, the output folder).

    a = build_parser().parse_args(["--db-size", "512", "--ids", "clustered"])
    check_args(a)                      # a UsageError (one line, exit 2) before anything runs
    recipe = recipe_from_args(a)
"""
from __future__ import annotations

import argparse
import math
import os
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import NoReturn

import torch

from data import VOCAB_SIZE
from support import download, sources
from support.recipes import RECIPES, Recipe
from support.run import Log, UsageError
from vitdsi import ViTDSIConfig

RUNTIME_FLAGS = ("threads", "quiet", "save_every")   # flags a resume may change: they touch no number it computes


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help text already explains a default of None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A flag argparse rejects (unknown, bad type, not among its choices) ends the run like any other bad
    input: status 2 and one line naming it, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {sources.printable(message)}; see python train.py --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(usage="python train.py [--dataset D] [--db-size N] [--ids S] [--models M ...] [--seed N] [--out DIR] "
                     "[flags]\n       python train.py --checkpoint C (--query IMAGE... | --add PATH... | --remove ID...) "
                     "[flags]\n       python train.py --resume OUT_DIR",
               description="ViT as a Differentiable Search Index (DSI) vs a BoVW baseline: index, fine-tune, "
                           "evaluate. The first group is all a first run needs.", formatter_class=HelpFormatter)
    add_start_flags(p)
    add_data_flags(p)
    add_model_flags(p)
    add_recipe_flags(p)
    add_run_flags(p)
    add_checkpoint_flags(p)
    return p


def add_start_flags(p: argparse.ArgumentParser) -> None:
    """The flags a newcomer needs, first in --help."""
    g = p.add_argument_group("start here")
    g.add_argument("--dataset", default="synthetic", choices=list(sources.DATASETS),
                   help="image source; synthetic is built in (no files)")
    g.add_argument("--data-root", help="imagenet: ImageFolder root DIR/<class>/<image>; coco: the images folder; "
                                       "imagenette: the cache folder it is downloaded to once (default: "
                                       f"{download.default_data_root()})")
    g.add_argument("--db-size", type=int, default=512, help="images drawn for the run (IDB + queries), paper Table 1")
    g.add_argument("--ids", default="clustered", choices=["clustered", "random", "semantic"],
                   help="ID scheme of the IDB; semantic = hierarchical k-means over BoVW histograms, no labels")
    g.add_argument("--models", nargs="+", default=["dsi", "bovw"], choices=["dsi", "bovw", "de", "all"],
                   help="models to train and score: the paper's experiment is the DSI and BoVW; de = a dual encoder "
                        "built from the DSI's encoder (a practitioner's baseline); all = dsi bovw de")
    g.add_argument("--recipe", default="fast", choices=sorted(RECIPES),
                   help="named training recipe (README 'Recipes'); the recipe flags below override single fields")
    g.add_argument("--seed", type=int, default=0, help="seed of data draw, IDs, initialisation and batches")
    g.add_argument("--out", help="output folder (default: runs/<dataset>-<db_size>-<ids>-s<seed>; with --add or "
                                 "--remove, a new folder beside the checkpoint's: <its folder>-add, -add2, ...)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = one per core")
    g.add_argument("--quiet", action="store_true", help="print only the final table (the log file gets everything)")
    g.add_argument("--resume", metavar="OUT_DIR",
                   help="continue the interrupted run whose --out is OUT_DIR, with its own arguments (only "
                        "--threads, --quiet and --save-every may be given too) to the metrics of an uninterrupted run")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (paper §2.1)")
    g.add_argument("--coco-annotations", nargs="+", metavar="JSON",
                   help="coco: official instances_*.json file(s); several are merged (e.g. train + val)")
    g.add_argument("--index-fraction", type=float, default=0.25, help="share of the drawn images that is indexed (IDB)")
    g.add_argument("--index-hold-out", type=float, default=0.0, metavar="FRACTION",
                   help="leave this stratified share of the IDB out of the first index (recorded in the checkpoint "
                        "as held_out), to add it later with --add and measure what growing costs (benchmark.py "
                        "--grow); 0 = index the whole IDB")
    g.add_argument("--image-size", type=int, default=160, help="square side after crop and resize, pixels")
    g.add_argument("--aspect-range", type=float, nargs=2, default=[0.9, 1.1], metavar=("MIN", "MAX"),
                   help="keep images whose width/height lies in this range")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (paper §3.2)")
    d = ViTDSIConfig()
    g.add_argument("--patch-size", type=int, default=d.patch_size, choices=[8, 16, 32], help="patch side, pixels")
    g.add_argument("--dim", type=int, default=d.dim, help="token width D")
    g.add_argument("--mlp-dim", type=int, default=d.mlp_dim, help="hidden width of each MLP")
    g.add_argument("--depth", type=int, default=d.depth, help="encoder blocks = decoder blocks")
    g.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout rate")
    g.add_argument("--pos-encoding", default=d.pos_encoding, choices=["sinusoidal", "learned"],
                   help="positional encoding of patches and ID tokens")


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Recipe field, its help text the field's own; unset = the named recipe's value."""
    g = p.add_argument_group("training recipe (paper §3.2; README 'Recipes'); default: the --recipe's value")
    for f in fields(Recipe):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type in (bool, "bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=meta["help"])
        elif meta["choices"]:
            g.add_argument(flag, choices=list(meta["choices"]), help=meta["help"])
        else:
            g.add_argument(flag, type=int if f.type in (int, "int") else float, help=meta["help"])
    g.add_argument("--index-target-acc", type=float, default=0.98, help="stop indexing at this training IA@1")
    g.add_argument("--no-finetune", action="store_true", help="skip the retrieval phase (zero-shot row only)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--bovw-k", type=int, default=200, help="BoVW vocabulary size K (paper: 200)")
    g.add_argument("--beam", type=int, help="beam width of the decoder (default: the list length asked for)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when present")
    g.add_argument("--sweep", action="store_true", help="run the paper's Table 1 grid: --sweep-sizes x --sweep-ids")
    g.add_argument("--sweep-sizes", type=int, nargs="+", default=[512, 1024, 2048], help="db sizes of --sweep")
    g.add_argument("--sweep-ids", nargs="+", default=["clustered", "random"], choices=["clustered", "random", "semantic"],
                   help="ID schemes of --sweep")
    g.add_argument("--sheet-queries", type=int, default=6, metavar="N",
                   help="test queries drawn (with --seed) for retrievals.png, each with every model's top 10; 0 = none")
    g.add_argument("--save-every", type=int, default=5, metavar="N",
                   help="write the resume state (resume.pt: weights, optimiser state, generators; a few times the "
                        "model's size) every N epochs of a phase, and on Ctrl-C; 0 = on Ctrl-C only. Each save "
                        "writes that file in full; between saves only an in-memory copy per epoch is made")


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """The flags that work on a finished run's checkpoint instead of training one."""
    g = p.add_argument_group("a trained index: query it, grow it, hide IDs in it (README 'Growing the index')")
    g.add_argument("--checkpoint", help="checkpoint.pt of a finished run, used with --query, --add or --remove")
    g.add_argument("--query", nargs="+", metavar="IMAGE", help="image files to look up in the checkpoint's index")
    g.add_argument("--top-k", type=int, default=10, help="IDs printed per query image")
    g.add_argument("--sheet", metavar="PATH",
                   help="--query: PNG drawn of the answers, one row per query image with the indexed images of "
                        "its top-k IDs (10 at most), an unreadable one grey; its folder must exist, an existing "
                        "file is replaced (default: query.png)")
    g.add_argument("--explain", action="store_true",
                   help="--query: also print the beam search of the first query image step by step: the live "
                        "prefixes, the digits the trie allows next with their log-probs, the IDs finished, the "
                        "survivors, then the ranked IDs")
    g.add_argument("--add", nargs="+", metavar="PATH",
                   help="image files or ImageFolder trees (DIR/<class>/<image>) to index into the checkpoint's "
                        "model, without retraining it; writes a new checkpoint under --out")
    g.add_argument("--remove", nargs="+", metavar="ID",
                   help="IDs to hide from decoding (no training); writes a new checkpoint under --out")
    g.add_argument("--replay", type=float, default=2.0,
                   help="--add: old IDB images replayed per new image per epoch (and at least --replay-min of the "
                        "old index and enough to fill one batch), drawn anew each epoch, so that learning the new "
                        "IDs does not overwrite the old ones; 0 = none")
    g.add_argument("--replay-min", type=float, default=0.25,
                   help="--add: share of the old index replayed per epoch at the least: a small addition disturbs "
                        "the old IDs as much as a large one, and they recover only as fast as they are rehearsed")
    g.add_argument("--add-lr", type=float,
                   help="--add: peak learning rate (default: a quarter of the recipe's indexing lr, since the "
                        "model already writes IDs and only has to learn a few more)")
    g.add_argument("--add-epochs", type=int, default=100,
                   help="--add: epoch cap; training stops earlier once the new and the old images' IA@1 "
                        "both reach --index-target-acc")
    g.add_argument("--settle", type=float, default=1.0,
                   help="--add: once the new images are learnt at epoch e, decay the lr to a twentieth over "
                        "settle x e more epochs, so the old IDs they disturbed recover; 0 = keep the recipe's schedule")
    g.add_argument("--add-frozen", type=int,
                   help="--add: encoder blocks, from the patches up, left as they are (with the patch embedding); "
                        "their output is computed once per image, so a step runs only the layers above (default: "
                        "all of them, the decoder learns the new IDs; 0 = train the whole model)")
    g.add_argument("--overwrite", action="store_true",
                   help="allow --out to be the folder of a finished run (a training run: its outputs are replaced "
                        "together once the new run has them all) or of an existing checkpoint.pt (--add/--remove: "
                        "also the one being grown)")


# --------------------------------------------------------------------------------------------
# What the flags turn into
# --------------------------------------------------------------------------------------------

def recipe_from_args(a: argparse.Namespace) -> Recipe:
    """The recipe a run trains with: the named `--recipe`, then any single-field flag on top."""
    over = {f.name: getattr(a, f.name, None) for f in fields(Recipe)}
    return replace(RECIPES[a.recipe], **{k: v for k, v in over.items() if v is not None})


def model_config(a: argparse.Namespace, max_len: int) -> ViTDSIConfig:
    return ViTDSIConfig(image_size=a.image_size, patch_size=a.patch_size, dim=a.dim, mlp_dim=a.mlp_dim,
                        depth=a.depth, heads=a.heads, dropout=a.dropout, pos_encoding=a.pos_encoding,
                        max_len=max_len)


def default_out(a: argparse.Namespace) -> str:
    if a.sweep:
        return os.path.join("runs", f"sweep-{a.dataset}-s{a.seed}")
    return os.path.join("runs", f"{a.dataset}-{a.db_size}-{a.ids}-s{a.seed}")


def load_images(a: argparse.Namespace, db_size: int, log: Log) -> sources.ImageSet:
    """The images a run draws from, as its flags say, with one log line about what was read."""
    t0, name, root = time.perf_counter(), a.dataset, a.data_root
    if name == "imagenette":   # the paper's ImageNet protocol: fast.ai's 10-class subset, its train/ folder
        name, root = "imagenet", download.fetch_imagenette(root or download.default_data_root(), progress=log)
    imageset = sources.load_dataset(name, data_root=root, coco_annotations=a.coco_annotations,
                                    image_size=a.image_size, aspect_range=tuple(a.aspect_range),
                                    db_size=db_size, seed=a.seed)
    log(f"data: {len(imageset.refs)} images of {len(imageset.class_names)} classes from '{a.dataset}' "
        f"({imageset.filtered} dropped by the aspect filter, {imageset.skipped} unreadable) "
        f"in {time.perf_counter() - t0:.1f} s")
    return imageset


# --------------------------------------------------------------------------------------------
# Checks: every flag, before any work
# --------------------------------------------------------------------------------------------

TRAINING, CHECKPOINT, BOTH, MODEL, CONFIG = "training", "checkpoint", "both", "model", "config"
READ_BY = {TRAINING: (TRAINING, BOTH, MODEL), CHECKPOINT: (CHECKPOINT, BOTH), CONFIG: (MODEL, CONFIG)}
SEED_MAX = 2 ** 32 - 1      # numpy seeds are 32-bit
MAX_PATCHES_A_SIDE = 64     # 4096 patches: attention over N patches costs N^2
LR_MAX = "1e30"             # torch's optimisers step in float32: an lr near 1e37 overflows it (a RuntimeError);
                            # one below that which diverges stops the run (engine.run_epoch: TrainingDiverged)


@dataclass(frozen=True)
class Rule:
    """The values one number may take: flag (or checkpoint config field) `name` is a `kind`, int or float (never
    a bool, NaN or infinity, which argparse's float accepts as "nan" and "inf"), inside `span`, an interval:
    a bracket includes its end, a parenthesis leaves it out, inf = no bound; for a str, the set of its values.
    `where` says who reads it: a training run, the --checkpoint modes, both; `model`: a training run's model
    flag and the config a checkpoint carries; `config`: that config only. `e_g` is a good value, for the fix."""
    name: str
    kind: type
    span: str
    where: str
    e_g: str


RULES = (
    #     flag or config field  kind   values                    read by     e.g.
    Rule("db_size",            int,   "[1, inf)",               TRAINING,   "512"),
    Rule("seed",               int,   f"[0, {SEED_MAX}]",       BOTH,       "0"),
    Rule("threads",            int,   "[0, 1024]",              BOTH,       "0"),
    Rule("save_every",         int,   "[0, inf)",               TRAINING,   "5"),
    Rule("index_fraction",     float, "(0, 1)",                 TRAINING,   "0.25"),
    Rule("index_hold_out",     float, "[0, 1)",                 TRAINING,   "0.25"),
    Rule("aspect_range",       float, "(0, inf)",               TRAINING,   "0.9 1.1"),   # MIN and MAX each
    # the model: a training run's flags, and the config a checkpoint carries (bounds: no absurd allocation)
    Rule("image_size",         int,   "[1, 4096]",              MODEL,      "160"),
    Rule("patch_size",         int,   "[1, 4096]",              MODEL,      "16"),        # flag: 8, 16 or 32
    Rule("dim",                int,   "[2, 4096]",              MODEL,      "128"),
    Rule("mlp_dim",            int,   "[1, 65536]",             MODEL,      "256"),
    Rule("depth",              int,   "[1, 64]",                MODEL,      "6"),
    Rule("heads",              int,   "[1, 4096]",              MODEL,      "4"),
    Rule("dropout",            float, "[0, 1)",                 MODEL,      "0.1"),
    Rule("pos_encoding",       str,   "{sinusoidal, learned}",  CONFIG,     "sinusoidal"),
    Rule("channels",           int,   "[3, 3]",                 CONFIG,     "3"),
    Rule("vocab_size",         int,   f"[{VOCAB_SIZE}, {VOCAB_SIZE}]", CONFIG, str(VOCAB_SIZE)),
    Rule("max_len",            int,   "[3, 64]",                CONFIG,     "16"),
    # the recipe: unset = the named recipe's value, checked when given
    Rule("lr",                 float, f"(0, {LR_MAX}]",         TRAINING,   "2e-3"),
    Rule("weight_decay",       float, "[0, 100]",               TRAINING,   "0.01"),
    Rule("batch_size",         int,   "[1, inf)",               TRAINING,   "32"),
    Rule("warmup_epochs",      float, "[0, inf)",               TRAINING,   "3"),
    Rule("lr_floor",           float, "[0, 1]",                 TRAINING,   "0.05"),
    Rule("index_epochs",       int,   "[1, inf)",               TRAINING,   "150"),
    Rule("index_dropout",      float, "[0, 1)",                 TRAINING,   "0"),
    Rule("index_views",        float, "[0, 100]",               TRAINING,   "1"),
    Rule("retrieval_epochs",   int,   "[1, inf)",               TRAINING,   "30"),
    Rule("retrieval_lr",       float, f"(0, {LR_MAX}]",         TRAINING,   "2e-3"),
    Rule("patience",           int,   "[0, inf)",               TRAINING,   "10"),
    Rule("min_epochs",         int,   "[0, inf)",               TRAINING,   "0"),
    Rule("index_mix",          float, "[0, 100]",               TRAINING,   "1"),
    Rule("label_smoothing",    float, "[0, 1)",                 TRAINING,   "0.1"),
    Rule("retrieval_targets",  int,   "[1, 1024]",              TRAINING,   "8"),
    Rule("index_target_acc",   float, "(0, 1]",                 BOTH,       "0.98"),
    # the run
    Rule("bovw_k",             int,   "[1, inf)",               TRAINING,   "200"),
    Rule("beam",               int,   "[1, inf)",               BOTH,       "10"),
    Rule("sweep_sizes",        int,   "[1, inf)",               TRAINING,   "512 1024 2048"),   # each
    Rule("sheet_queries",      int,   "[0, inf)",               TRAINING,   "6"),
    # a trained index: --query, --add, --remove
    Rule("top_k",              int,   "[1, inf)",               CHECKPOINT, "10"),
    Rule("replay",             float, "[0, 100]",               CHECKPOINT, "2"),
    Rule("replay_min",         float, "[0, 1]",                 CHECKPOINT, "0.25"),
    Rule("add_lr",             float, f"(0, {LR_MAX}]",         CHECKPOINT, "5e-4"),
    Rule("add_epochs",         int,   "[1, inf)",               CHECKPOINT, "100"),
    Rule("settle",             float, "[0, inf)",               CHECKPOINT, "1"),
    Rule("add_frozen",         int,   "[0, inf)",               CHECKPOINT, "0"),
)
MANY_VALUES = ("aspect_range", "sweep_sizes")   # flags that take several values: each is checked


@dataclass(frozen=True)
class Relation:
    """A rule between numbers that each passed their own: `holds(v)` over their values v (a dict by name).
    `says` is what must hold, its {names} standing for those flags (or config fields) with their values."""
    says: str
    holds: Callable[[dict], bool]
    e_g: str


RELATIONS = (
    Relation("{dim} must be even: sinusoidal encodings pair its channels",
             lambda v: v["dim"] % 2 == 0, "--dim 128"),
    Relation("{dim} must be divisible by {heads}",
             lambda v: v["dim"] % v["heads"] == 0, "--dim 128 --heads 4"),
    Relation("{image_size} must be divisible by {patch_size}",
             lambda v: v["image_size"] % v["patch_size"] == 0, "--image-size 160 --patch-size 16, or 64 and 8"),
    Relation(f"{{image_size}} over {{patch_size}} must give at most {MAX_PATCHES_A_SIDE} patches a side",
             lambda v: v["image_size"] // v["patch_size"] <= MAX_PATCHES_A_SIDE, "--image-size 160 --patch-size 16"),
    Relation("{aspect_range} must be two numbers, MIN <= MAX",
             lambda v: len(v["aspect_range"]) == 2 and v["aspect_range"][0] <= v["aspect_range"][1],
             "--aspect-range 0.9 1.1"),
)


def span_ends(span: str) -> tuple[str, str, str, str]:
    """"[0, 1)" -> ("[", "0", "1", ")"): each end's bracket and number, as written."""
    low, high = span[1:-1].split(", ")
    return span[0], low, high, span[-1]


def out_of_span(rule: Rule, value) -> str | None:
    """What is wrong with one value under `rule`, as the end of a sentence ("must be at least 1"); None if nothing."""
    if rule.kind is str:
        choices = rule.span[1:-1].split(", ")
        return None if value in choices else f"must be one of {', '.join(choices)}"
    if isinstance(value, bool) or not isinstance(value, (int, float) if rule.kind is float else int):
        return "must be a whole number" if rule.kind is int else "must be a number"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    low_end, low, high, high_end = span_ends(rule.span)
    if low == high:
        return None if value == float(low) else f"must be {low}"
    if value < float(low) or (value == float(low) and low_end == "("):
        return ("must be more than " + low if low_end == "(" else
                "must be 0 or more" if low == "0" else "must be at least " + low)
    if value > float(high) or (value == float(high) and high_end == ")"):
        return ("must be less than " if high_end == ")" else "must be at most ") + high
    return None


def first_problem(values: dict, read_by: str, show: Callable[[str, object], str],
                  unset_ok: bool = True) -> tuple[str, str] | None:
    """The first number of `values` (by name) that breaks its rule, then the first relation broken, among those
    `read_by` reads: (the problem in words, each number named by `show(name, value)`; flags that fix it).
    With `unset_ok`, a value None is unset (a recipe flag not given) and passes."""
    rules = [r for r in RULES if r.where in READ_BY[read_by] and not (unset_ok and values.get(r.name) is None)]
    for rule in rules:
        value, many, fix = values.get(rule.name), rule.name in MANY_VALUES, flag_and_value(rule.name, rule.e_g)
        if many and not isinstance(value, (list, tuple)):
            return f"{show(rule.name, value)} must be a list of numbers", fix
        for item in value if many else [value]:
            wrong = out_of_span(rule, item)
            if wrong:
                return f"{show(rule.name, value)} {'each ' if many else ''}{wrong}", fix
    known = {r.name: values[r.name] for r in rules}
    for relation in RELATIONS:
        names = [field for _, field, _, _ in string.Formatter().parse(relation.says) if field]
        if set(names) <= set(known) and not relation.holds(known):
            return relation.says.format(**{n: show(n, known[n]) for n in names}), relation.e_g
    return None


def flag_and_value(name: str, value) -> str:
    """--aspect-range 0.9 1.1, as a user types it."""
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"--{name.replace('_', '-')} {shown}"


def check_numbers(a: argparse.Namespace, read_by: str) -> None:
    """Every number a run of this kind reads, against RULES and RELATIONS: the first one wrong is a UsageError."""
    found = first_problem(vars(a), read_by, flag_and_value)
    if found:
        problem, e_g = found
        raise UsageError(f"{problem} (e.g. {e_g})")


def config_problem(config: dict) -> str | None:
    """What is wrong with a checkpoint's model config, by the rules of the flags that made it, in words
    ("max_len 1000000 must be at most 64"); None if nothing. Checked before any of the model is built."""
    found = first_problem(config, CONFIG, lambda name, value: f"{name} {value!r}", unset_ok=False)
    return found[0] if found else None


def check_args(a: argparse.Namespace) -> None:
    """Reject bad input before any work starts: one line naming the problem and the fix."""
    modes = [flag for flag in ("query", "add", "remove") if getattr(a, flag)]
    if modes and not a.checkpoint:
        raise UsageError(f"--{modes[0]} needs --checkpoint: pass the checkpoint.pt of a finished run")
    if a.checkpoint and len(modes) != 1:
        raise UsageError("--checkpoint needs one of --query IMAGE..., --add PATH... or --remove ID..."
                         + (f", not both --{modes[0]} and --{modes[1]}" if modes else ""))
    if "all" in a.models:
        a.models = ["dsi", "bovw", "de"]
    for flag in ("sheet", "explain"):
        if getattr(a, flag) and not a.query:
            raise UsageError(f"--{flag} works with --query IMAGE...: pass the images to look up")
    if a.checkpoint:
        check_numbers(a, CHECKPOINT)
    else:
        check_training_args(a)


def check_training_args(a: argparse.Namespace) -> None:
    check_numbers(a, TRAINING)
    check_out_folder(a.out or default_out(a))
    if a.dataset in ("imagenet", "coco") and not a.data_root:
        raise UsageError(f"--dataset {a.dataset} needs --data-root DIR (see README, 'Data')")
    if a.dataset == "coco" and not a.coco_annotations:
        raise UsageError("--dataset coco needs --coco-annotations instances_*.json")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for but no CUDA device is visible: use --device cpu or auto")
    check_memory(max(a.sweep_sizes) if a.sweep else a.db_size, a.image_size)


def check_memory(db_size: int, image_size: int) -> None:
    """A run keeps its images in memory twice (the decoded array and the training tensor): refuse, before any
    work, a run whose images alone would take more than half of this machine's memory."""
    need = 2 * db_size * image_size ** 2 * 3
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # not every system tells
        return
    if need > have / 2:
        raise UsageError(f"--db-size {db_size} at --image-size {image_size} needs about {need / 2**30:.1f} GiB for its "
                         f"images, more than half of this machine's {have / 2**30:.1f} GiB; pass a smaller "
                         f"--db-size or --image-size")


def check_out_folder(out: str) -> None:
    """The output folder must be creatable and writable; checked before any work, creating nothing."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):        # the deepest part of the path that already exists
        existing = os.path.dirname(existing)
    shown = sources.printable(out)
    if not os.path.isdir(existing):
        raise UsageError(f"--out '{shown}' cannot be a folder: '{sources.printable(existing)}' is a file; "
                         f"pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out '{shown}' is not writable (no write permission in '{sources.printable(existing)}'); "
                         f"pass another --out")
