"""train.py: the whole experiment of the paper, in one script.

Di Stefano, "Vision Transformer Memory as a Differentiable Search Index for Image Retrieval", §3:
  1. draw `--db-size` images, index 25% of them (the IDB) and keep the rest as queries (data.py);
  2. BoVW baseline: SIFT vocabulary from the IDB, cosine ranking of the test queries (bovw.py);
  3. `index`: teach the ViT DSI to write each IDB image's own ID, until the training IA@1
     reaches `--index-target-acc` (vitdsi.py)                      -> `evaluate`: the "zero-shot" row;
  4. `finetune`: query image -> IDs of relevant IDB images, keeping the epoch with the best
     validation score                                             -> `evaluate`: the "fine-tuned" row;
  5. score every row with the same functions on the same test queries (metrics.py) and write
     results.json, results.md, curves.png, checkpoint.pt and train.log to `--out`.

Read it top to bottom: recipes, command line, the training loop pieces, then the paper's steps
`index`, `finetune`, `evaluate`, tied together by `run_experiment`.

Usage:
    python train.py --db-size 512 --ids clustered                 # built-in data, no download
    python train.py --dataset imagenet --data-root DIR --db-size 512
    python train.py --sweep                                       # the paper's Table 1 grid
    python train.py --checkpoint runs/.../checkpoint.pt --query a.jpg b.png --top-k 10
    python train.py --checkpoint runs/.../checkpoint.pt --add new/ c.jpg      # grow the index (grow.py)
    python train.py --checkpoint runs/.../checkpoint.pt --remove 0312         # hide an ID from decoding
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import IO, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import bovw
import data
import metrics
from vitdsi import DROPOUT_DRAWS, IDTrie, ViTDSI, ViTDSIConfig, set_dropout
from de import DualEncoder, info_nce, rank_cosine

RANK_DEPTH = 100  # longest ranked list we score: Recall@100 (paper §3.1)
IA_DEPTH = 5      # IA@1 and IA@5 (paper §3.2)


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Training recipes: the one place that says how a model is optimised
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How the model is optimised. `paper` is the paper's §3.2 recipe; the others are ours (README).
    Every field is also a flag of the same name, which overrides the recipe's value."""
    optimizer: str           # "adam" (paper) or "adamw" (decoupled weight decay)
    lr: float                # peak learning rate of the indexing phase
    weight_decay: float      # AdamW only
    batch_size: int          # images per step
    warmup_epochs: float     # linear warm-up length of each phase; 0 = none
    schedule: str            # "constant" (paper) or "cosine" (decay to lr_floor over the epoch cap)
    lr_floor: float          # cosine floor as a fraction of the peak
    precision: str           # "fp32", "bf16" autocast, or "auto": bf16 where the hardware has bf16 units
    index_epochs: int        # indexing epoch cap (paper: 750-1000 epochs)
    index_dropout: float | None  # dropout while memorising the index (None = the model's --dropout)
    index_views: float       # indexing: augmented views per IDB image per epoch, labelled with its ID
    retrieval_epochs: int    # retrieval epoch cap (paper: 75)
    retrieval_lr: float      # peak learning rate of the retrieval phase
    early_stop: str          # validation score: "loss" (paper, teacher-forced) or "map" (MAP@10 by beam search)
    patience: int            # retrieval epochs without a better validation score before stopping; 0 = never stop early
    min_epochs: int          # retrieval epochs always run before patience may stop the phase
    index_mix: float         # retrieval phase: IDB (image -> own ID) pairs per query pair (Tay et al. §4.4)
    augment: bool            # retrieval phase: random crops/flips/jitter of the query images
    label_smoothing: float   # retrieval phase: cross-entropy label smoothing
    retrieval_targets: int   # retrieval phase: relevant IDs drawn per query per step (one encoder pass)
    dropout_draw: str        # how dropout masks are drawn (vitdsi.dropout): "torch" per element, "words" 15 bits each
    keep_index: bool         # retrieval phase: keep only an epoch whose index is whole (IDB IA@1, `index_whole`)


RECIPES = {
    "paper": Recipe(optimizer="adam", lr=5e-4, weight_decay=0.0, batch_size=32, warmup_epochs=0,
                    schedule="constant", lr_floor=1.0, precision="fp32", index_epochs=1000, index_dropout=None,
                    index_views=0.0, retrieval_epochs=75, retrieval_lr=5e-4, early_stop="loss", patience=10,
                    min_epochs=0, index_mix=0.0, augment=False, label_smoothing=0.0, retrieval_targets=1,
                    dropout_draw="torch", keep_index=False),
    "fast": Recipe(optimizer="adamw", lr=2e-3, weight_decay=0.01, batch_size=32, warmup_epochs=3,
                   schedule="cosine", lr_floor=0.05, precision="auto", index_epochs=150, index_dropout=0.0,
                   index_views=0.0, retrieval_epochs=30, retrieval_lr=2e-3, early_stop="map", patience=0,
                   min_epochs=0, index_mix=1.0, augment=True, label_smoothing=0.1, retrieval_targets=8,
                   dropout_draw="words", keep_index=True),
}

RECIPE_HELP = {  # flag help texts; each flag's default is the chosen recipe's value
    "lr": "peak learning rate of the indexing phase",
    "batch_size": "images per step",
    "index_epochs": "indexing epoch cap",
    "index_dropout": "dropout while indexing",
    "index_views": "indexing: augmented views per IDB image per epoch, labelled with its own ID",
    "retrieval_epochs": "retrieval epoch cap",
    "retrieval_lr": "peak learning rate of the retrieval phase",
    "early_stop": "retrieval phase: keep the epoch with the best validation loss or MAP@10 (beam search)",
    "patience": "retrieval phase: epochs without a better validation score before stopping; 0 = run the whole schedule",
    "min_epochs": "retrieval phase: epochs always run before patience may stop it",
    "index_mix": "retrieval phase: IDB pairs (image -> own ID) mixed in per query pair, against forgetting",
    "augment": "retrieval phase: augmented views of the query images",
    "label_smoothing": "retrieval phase label smoothing",
    "retrieval_targets": "retrieval phase: relevant IDs trained per query per step, sharing one encoder pass",
    "dropout_draw": "how dropout masks are drawn: torch = F.dropout, one random number per element; words = 15 "
                    "random bits per element cut from 64-bit words, a quarter of the generator calls (faster on CPUs)",
    "keep_index": "retrieval phase: keep only an epoch whose IDB IA@1 (beam search) is at least --index-target-acc "
                  "(or the zero-shot IA@1, if lower); with none, the zero-shot model stays",
    "precision": "arithmetic of training and decoding: auto = bf16 autocast on hardware with bf16 units "
                 "(CUDA with bf16, CPUs with AMX or AVX512-BF16), else fp32; numbers then differ between such machines",
}


# --------------------------------------------------------------------------------------------
# Small utilities: seeding, logging, timing
# --------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """One seed for Python's random, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Log:
    """Prints a line and appends it to the run's log file. The file is never emptied: a run into a
    folder that already holds one, or a run that stops on bad input, keeps what earlier runs wrote."""

    def __init__(self, path: str | None = None, quiet: bool = False):
        self.path, self.quiet = path, quiet

    def __call__(self, line: str = "") -> None:
        if not self.quiet:
            print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve a recipe's precision: "auto" takes bf16 autocast only where the hardware computes in bf16
    (on a CPU without bf16 units, autocast emulates it and runs several times slower than fp32)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help text already explains a default of None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A flag argparse rejects (unknown, bad type, not among its choices) ends the run like any other bad
    input: status 2 and one line naming it, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see python train.py --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="ViT as a Differentiable Search Index (DSI) vs a BoVW baseline: index, fine-tune, evaluate.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data (paper §2.1)")
    g.add_argument("--dataset", default="synthetic", choices=list(data.DATASETS),
                   help="image source; synthetic is built in (no files)")
    g.add_argument("--data-root", help="imagenet: ImageFolder root DIR/<class>/<image>; coco: the images folder")
    g.add_argument("--coco-annotations", nargs="+", metavar="JSON",
                   help="coco: official instances_*.json file(s); several are merged (e.g. train + val)")
    g.add_argument("--db-size", type=int, default=512, help="images drawn for the run (IDB + queries), paper Table 1")
    g.add_argument("--index-fraction", type=float, default=0.25, help="share of the drawn images that is indexed (IDB)")
    g.add_argument("--index-hold-out", type=float, default=0.0, metavar="FRACTION",
                   help="leave this stratified share of the IDB out of the first index (recorded in the checkpoint "
                        "as held_out), to add it later with --add and measure what growing costs (benchmark.py "
                        "--grow); 0 = index the whole IDB")
    g.add_argument("--ids", default="clustered", choices=["clustered", "random", "semantic"],
                   help="ID scheme of the IDB; semantic = hierarchical k-means over BoVW histograms, no labels")
    g.add_argument("--image-size", type=int, default=160, help="square side after crop and resize, pixels")
    g.add_argument("--aspect-range", type=float, nargs=2, default=[0.9, 1.1], metavar=("MIN", "MAX"),
                   help="keep images whose width/height lies in this range")
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
    g = p.add_argument_group("training recipe (paper §3.2; README 'Recipes')")
    g.add_argument("--recipe", default="fast", choices=sorted(RECIPES),
                   help="named set of every field below; the flags below override single fields")
    for f in fields(Recipe):
        if f.name not in RECIPE_HELP:
            continue
        flag, help_text = "--" + f.name.replace("_", "-"), RECIPE_HELP[f.name] + " (default: from the recipe)"
        if f.type in (bool, "bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "early_stop":
            g.add_argument(flag, choices=["loss", "map"], help=help_text)
        elif f.name == "precision":
            g.add_argument(flag, choices=["auto", "fp32", "bf16"], help=help_text)
        elif f.name == "dropout_draw":
            g.add_argument(flag, choices=list(DROPOUT_DRAWS), help=help_text)
        else:
            kind = int if f.type in (int, "int") else float
            g.add_argument(flag, type=kind, help=help_text)
    g.add_argument("--index-target-acc", type=float, default=0.98, help="stop indexing at this training IA@1")
    g.add_argument("--no-finetune", action="store_true", help="skip the retrieval phase (zero-shot row only)")
    g = p.add_argument_group("run")
    g.add_argument("--models", nargs="+", default=["dsi", "de", "bovw"], choices=["dsi", "de", "bovw"],
                   help="models to train and score; de = the dual-encoder baseline built from the DSI's encoder")
    g.add_argument("--bovw-k", type=int, default=200, help="BoVW vocabulary size K (paper: 200)")
    g.add_argument("--beam", type=int, help="beam width of the decoder (default: the list length asked for)")
    g.add_argument("--seed", type=int, default=0, help="seed of data draw, IDs, initialisation and batches")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when present")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = one per core")
    g.add_argument("--out", help="output folder (default: runs/<dataset>-<db_size>-<ids>-s<seed>; with --add or "
                                 "--remove, a new folder beside the checkpoint's: <its folder>-add, -add2, ...)")
    g.add_argument("--sweep", action="store_true", help="run the paper's Table 1 grid: --sweep-sizes x --sweep-ids")
    g.add_argument("--sweep-sizes", type=int, nargs="+", default=[512, 1024, 2048], help="db sizes of --sweep")
    g.add_argument("--sweep-ids", nargs="+", default=["clustered", "random"], choices=["clustered", "random", "semantic"],
                   help="ID schemes of --sweep")
    g.add_argument("--quiet", action="store_true", help="print only the final table (the log file gets everything)")
    g.add_argument("--save-every", type=int, default=5, metavar="N",
                   help="write the resume state (resume.pt: weights, optimiser state, generators; a few times the "
                        "model's size) every N epochs of a phase, and on Ctrl-C; 0 = on Ctrl-C only. Each save "
                        "writes that file in full; between saves only an in-memory copy per epoch is made")
    g.add_argument("--resume", metavar="OUT_DIR",
                   help="continue the interrupted run whose --out is OUT_DIR, with its own arguments (only "
                        "--threads, --quiet and --save-every may be given too) to the metrics of an uninterrupted run")
    add_checkpoint_flags(p)
    return p


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """The flags that work on a finished run's checkpoint instead of training one."""
    g = p.add_argument_group("a trained index: query it, grow it, hide IDs in it (README 'Growing the index')")
    g.add_argument("--checkpoint", help="checkpoint.pt of a finished run, used with --query, --add or --remove")
    g.add_argument("--query", nargs="+", metavar="IMAGE", help="image files to look up in the checkpoint's index")
    g.add_argument("--top-k", type=int, default=10, help="IDs printed per query image")
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
                   help="--add: peak learning rate (default: a quarter of the recipe's indexing lr: the model "
                        "already writes IDs; at half of it, new random IDs kept swinging for tens of epochs)")
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
                   help="--add/--remove: allow --out to be the folder of an existing checkpoint.pt (also the "
                        "one being grown), which is then replaced")


def recipe_from_args(a: argparse.Namespace) -> Recipe:
    """The recipe a run trains with: the named `--recipe`, then any single-field flag on top."""
    over = {f.name: getattr(a, f.name, None) for f in fields(Recipe)}
    return replace(RECIPES[a.recipe], **{k: v for k, v in over.items() if v is not None})


def check_args(a: argparse.Namespace) -> None:
    """Reject bad input before any work starts: one line naming the problem and the fix."""
    modes = [flag for flag in ("query", "add", "remove") if getattr(a, flag)]
    if modes and not a.checkpoint:
        raise UsageError(f"--{modes[0]} needs --checkpoint: pass the checkpoint.pt of a finished run")
    if a.checkpoint and len(modes) != 1:
        raise UsageError("--checkpoint needs one of --query IMAGE..., --add PATH... or --remove ID..."
                         + (f", not both --{modes[0]} and --{modes[1]}" if modes else ""))
    if a.checkpoint:
        if a.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {a.top_k}")
        if (a.replay < 0 or not 0 <= a.replay_min <= 1 or a.add_epochs < 1 or a.settle < 0
                or (a.add_frozen is not None and a.add_frozen < 0)
                or (a.add_lr is not None and a.add_lr <= 0)):
            raise UsageError(f"--replay, --settle and --add-frozen must be 0 or more, --replay-min in [0, 1], "
                             f"--add-epochs and --add-lr positive; got {a.replay}, {a.settle}, {a.add_frozen}, "
                             f"{a.replay_min}, {a.add_epochs}, {a.add_lr}")
        if not 0.0 < a.index_target_acc <= 1.0:
            raise UsageError(f"--index-target-acc must lie in (0, 1], got {a.index_target_acc}")
        return
    check_out_folder(a.out or default_out(a))
    if a.save_every < 0:
        raise UsageError(f"--save-every must be 0 (save on Ctrl-C only) or more, got {a.save_every}")
    if a.dataset in ("imagenet", "coco") and not a.data_root:
        raise UsageError(f"--dataset {a.dataset} needs --data-root DIR (see README, 'Data')")
    if a.dataset == "coco" and not a.coco_annotations:
        raise UsageError("--dataset coco needs --coco-annotations instances_*.json")
    if a.image_size % a.patch_size:
        raise UsageError(f"--image-size {a.image_size} is not divisible by --patch-size {a.patch_size}: "
                         f"pick sizes like 160/16 or 64/8")
    if a.dim % a.heads:
        raise UsageError(f"--dim {a.dim} is not divisible by --heads {a.heads}: pick e.g. --dim 128 --heads 4")
    for name in ("db_size", "depth", "dim", "mlp_dim", "heads", "bovw_k"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for name in ("index_dropout", "label_smoothing"):
        v = getattr(a, name)
        if v is not None and not 0.0 <= v < 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1), got {v}")
    for name in ("index_views", "index_mix", "min_epochs", "patience"):
        v = getattr(a, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")
    for name in ("lr", "batch_size", "index_epochs", "retrieval_epochs", "retrieval_lr",
                 "retrieval_targets", "beam"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if not 0.0 <= a.dropout < 1.0:
        raise UsageError(f"--dropout must lie in [0, 1), got {a.dropout}")
    if not 0.0 <= a.index_hold_out < 1.0:
        raise UsageError(f"--index-hold-out must lie in [0, 1), got {a.index_hold_out}")
    if not 0.0 < a.index_target_acc <= 1.0:
        raise UsageError(f"--index-target-acc must lie in (0, 1], got {a.index_target_acc}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for but no CUDA device is visible: use --device cpu or auto")


def check_out_folder(out: str) -> None:
    """The output folder must be creatable and writable; checked before any work, creating nothing."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):        # the deepest part of the path that already exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--out '{out}' cannot be a folder: '{existing}' is a file; pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out '{out}' is not writable (no write permission in '{existing}'); pass another --out")


def model_config(a: argparse.Namespace, max_len: int) -> ViTDSIConfig:
    return ViTDSIConfig(image_size=a.image_size, patch_size=a.patch_size, dim=a.dim, mlp_dim=a.mlp_dim,
                        depth=a.depth, heads=a.heads, dropout=a.dropout, pos_encoding=a.pos_encoding,
                        max_len=max_len)


# --------------------------------------------------------------------------------------------
# Training loop pieces (the trainer knows nothing about the model beyond encode, decode, generate)
# --------------------------------------------------------------------------------------------

def lr_lambda(recipe: Recipe, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimiser step s: linear warm-up, then constant or cosine decay."""
    warm = int(recipe.warmup_epochs * steps_per_epoch)
    total = max(1, epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if recipe.schedule == "constant":
            return 1.0
        return half_cosine(min(1.0, (step - warm) / max(1, total - warm)), 1.0, recipe.lr_floor)
    return f


def half_cosine(t: float, top: float, floor: float) -> float:
    """A half cosine from `top` at t = 0 down to `floor` at t = 1 (Loshchilov & Hutter 2017's annealing)."""
    return floor + (top - floor) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)


def seq_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy and per-sample exact match.

    logits (B, L-1, V) predict targets[:, 1:]; PAD positions count neither in the loss nor in the match.
    A sample counts as correct when every non-PAD token is the argmax, which is exactly when greedy
    decoding writes the target ID.
    """
    gold = targets[:, 1:]                                                   # (B, L-1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),    # (B*(L-1), V)
                           gold.reshape(-1), ignore_index=data.PAD, label_smoothing=smoothing)
    hit = (logits.argmax(-1) == gold) | (gold == data.PAD)                  # (B, L-1)
    return loss, hit.all(dim=1)


def spread(count: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """`count` indices into range(n), each used at most once more than any other, in random order."""
    rounds = [torch.randperm(n, generator=gen) for _ in range(-(-count // n))]
    return torch.cat(rounds)[:count] if rounds else torch.empty(0, dtype=torch.long)


@dataclass
class Pool:
    """What a training phase draws its samples from: images, their targets, and which are shown augmented."""
    images: torch.Tensor                                   # (n, 3, S, S) uint8
    targets: Callable[[torch.Tensor], torch.Tensor]        # pool indices (B,) -> target tokens (B, G, L)
    augmented: torch.Tensor                                # (n,) bool: shown as a random view, not as is
    frozen: int = 0                                        # encoder blocks at the bottom not trained (grow.py) ...
    cached: torch.Tensor | None = None                     # ... and their output (n, N, D), encode_until(image, frozen)


def encode_batch(model: ViTDSI, pool: Pool, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The memory (B, N, D) of the batch x = the pool's images idx (normalised, views applied). When the bottom of
    the encoder is frozen, its output is read from the pool's cache and only the blocks above it run; a random
    view is new at every step, so its bottom is computed anew, without gradients, since it is not trained (and
    in training mode: with the recipe's dropout, where the cache was computed without)."""
    if pool.cached is None:
        return model.encode(x)
    h = pool.cached[idx].to(x.device)                 # (B, N, D): indexing copies, the views below leave the cache
    views = pool.augmented[idx].to(x.device)                                # (B,) bool
    if views.any():
        with torch.no_grad():
            h[views] = model.encode_until(x[views], pool.frozen).to(h.dtype)    # the cache's dtype (bf16 or not)
    return model.encode_after(h, pool.frozen)


@dataclass
class Trainer:
    """The optimisation state one phase steps: model, optimiser, lr schedule, and how a step is run."""
    model: ViTDSI
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    bf16: bool = False
    smoothing: float = 0.0
    augment_gen: torch.Generator = field(default_factory=torch.Generator)


def run_epoch(trainer: Trainer, pool: Pool, order: torch.Tensor, batch_size: int) -> tuple[float, float, float]:
    """One pass over `order` (indices into the pool), one optimiser step per batch.

    Each image gets G target IDs that share one encoder pass (the decoder reads the same patches G
    times). Returns the mean loss, the exact-match accuracy over all samples (any of the G targets),
    and over the un-augmented ones.
    """
    model, device = trainer.model, trainer.device
    model.train()
    total_loss, total_hit, seen, clean_hit, clean_seen = 0.0, 0, 0, 0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = data.normalize(pool.images[idx].to(device))                     # (B, 3, S, S)
        views = pool.augmented[idx]                                         # (B,) bool
        if views.any():
            on = views.to(x.device)
            x[on] = data.augment(x[on], trainer.augment_gen)
        y = pool.targets(idx)                                               # (B, G, L)
        B, G = y.shape[:2]
        y = y.flatten(0, 1).to(device)                                      # (B*G, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
            logits = model.decode(encode_batch(model, pool, idx, x), y[:, :-1])  # (B*G, L-1, V)
        loss, hit = seq_loss(logits, y, trainer.smoothing)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
        hit = hit.view(B, G).any(dim=1).cpu()                               # (B,)
        total_loss += loss.item() * B
        total_hit += int(hit.sum())
        seen += B
        clean_hit += int(hit[~views].sum())
        clean_seen += int((~views).sum())
    return total_loss / seen, total_hit / seen, clean_hit / max(1, clean_seen)


@torch.no_grad()
def eval_loss(model: ViTDSI, images: torch.Tensor, targets: torch.Tensor, batch_size: int,
              device: torch.device, bf16: bool) -> tuple[float, float]:
    """Teacher-forced loss and exact-match accuracy (any of the G targets), dropout off.
    images (n, 3, S, S) uint8; targets (n, G, L): G target IDs per image."""
    model.eval()
    total_loss, total_hit = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = data.normalize(images[start:start + batch_size].to(device))
        y = targets[start:start + batch_size].to(device)                   # (B, G, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model.decode(model.encode(x), y.flatten(0, 1)[:, :-1])
        loss, hit = seq_loss(logits, y.flatten(0, 1))
        total_loss += loss.item() * len(x)
        total_hit += int(hit.view(len(x), -1).any(dim=1).sum())
    return total_loss / len(images), total_hit / len(images)


@torch.no_grad()
def rank_dsi(model: ViTDSI, images: torch.Tensor, trie: IDTrie, k: int, beam: int | None, device: torch.device,
             batch_size: int = 64, log: Callable[[str], None] | None = None, what: str = "") -> tuple[list, float]:
    """Ranked ID lists (best first) for every image, by constrained beam search; and ms per query."""
    model.eval()
    ranked, t0 = [], time.perf_counter()
    for start in range(0, len(images), batch_size):
        x = data.normalize(images[start:start + batch_size].to(device))
        ranked += [[i for i, _ in hyps] for hyps in model.generate(x, trie, k=k, beam=beam)]
        if log and len(images) > batch_size:
            done = min(start + batch_size, len(images))
            eta = (time.perf_counter() - t0) / done * (len(images) - done)
            log(f"  ranking {what}: {done}/{len(images)} images, ETA {fmt_seconds(eta)}")
    return ranked, 1000 * (time.perf_counter() - t0) / max(1, len(images))


class EarlyStopping:
    """Keeps the weights (and optimiser state) of the epoch with the best validation score, and says
    when to stop: after `patience` epochs without a better score, but never before `min_epochs` have
    run, so that a phase whose learning rate is still warming up is not cut short. With patience 0 it
    never stops early: the whole lr schedule runs and only the epoch kept is chosen by validation, a
    rule that stays sound when the validation set is small and its score noisy."""

    def __init__(self, patience: int, min_epochs: int = 0):
        self.patience, self.min_epochs = patience, min_epochs
        self.best_score, self.best_epoch, self.bad = -float("inf"), 0, 0
        self.best_state: dict | None = None

    def step(self, epoch: int, score: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Record epoch's validation score (higher is better); True = stop now."""
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad = score, epoch, 0
            self.best_state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                               "optimizer": clone_state(optimizer.state_dict())}
        else:
            self.bad += 1
        return self.stopped(epoch)

    def stopped(self, epoch: int) -> bool:
        """Whether the phase ends after `epoch`; also asked by a resumed run before it trains on."""
        return self.patience > 0 and epoch >= self.min_epochs and self.bad >= self.patience

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the best epoch's weights and optimiser state back."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state["model"])
            optimizer.load_state_dict(self.best_state["optimizer"])


def clone_state(state, device: torch.device | str | None = None):
    """A deep copy of a (nested) state dict whose tensors are cloned, so later steps do not change it;
    onto `device` when given (the resume state is kept on the CPU, off the accelerator's memory)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone() if device is None else state.detach().to(device, copy=True)
    if isinstance(state, dict):
        return {k: clone_state(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(v, device) for v in state)
    return state


# --------------------------------------------------------------------------------------------
# Resuming an interrupted run: the state of the last completed epoch, in resume.pt
# --------------------------------------------------------------------------------------------

# Bump when the resume state's layout changes: a state of another version is refused with both numbers.
RESUME_VERSION = 1
RESUME_FILE = "resume.pt"
RUNTIME_FLAGS = ("threads", "quiet", "save_every")   # flags a resume may change: they touch no number it computes


@dataclass
class ResumeSaver:
    """Holds the state of the last completed epoch and writes it to `path` every `every` epochs of a phase
    and when Ctrl-C stops the run. An epoch cut short has already moved the weights and the generators,
    so only a copy taken when the epoch before it ended lets a resume continue exactly.
    `path` None: this run is not resumable (a sweep, or not set up yet; `why_not` says which), no copy is taken."""
    path: str | None = None
    every: int = 0
    state: dict | None = None
    why_not: str = "it stopped before the run began"

    def epoch_done(self, state: dict) -> None:
        self.state = state
        if self.every and state["progress"]["epoch"] % self.every == 0:
            self.write()

    def write(self) -> None:
        atomic_write(self.path, lambda f: torch.save(self.state, f))

    def interrupted(self) -> str:
        """Save the last completed epoch, if any; the one line that tells the user how to go on."""
        if self.path is None:
            return f"interrupted; nothing saved ({self.why_not}): run the same command again"
        if self.state is None:
            return "interrupted before the first epoch ended; nothing to resume: run the same command again"
        self.write()
        return (f"interrupted; {self.state['phase']} epoch {self.state['progress']['epoch']} saved to {self.path}; "
                f"continue with: python train.py --resume {os.path.dirname(self.path)}")


def rng_states(cell: "Cell", trainer: Trainer, rng: np.random.Generator | None) -> dict:
    """Every random generator the run draws from, as tensors and plain data: Python's, numpy's and torch's
    global ones (dropout), the batch order, the augmentations, and `rng`, the retrieval targets' draws."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()   # an ndarray is not plain data
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cell.device.type == "cuda" else [],
            "batch_order": cell.gen.get_state(), "augment": trainer.augment_gen.get_state(),
            "targets": rng.bit_generator.state if rng is not None else None}


def set_rng_states(states: dict, cell: "Cell", trainer: Trainer, rng: np.random.Generator | None) -> None:
    random.setstate(states["python"])
    numpy_state = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    cell.gen.set_state(states["batch_order"])
    trainer.augment_gen.set_state(states["augment"])
    if rng is not None:
        rng.bit_generator.state = states["targets"]


def save_resume_state(cell: "Cell", phase: str, trainer: Trainer, progress: dict,
                      rng: np.random.Generator | None = None, stopper: EarlyStopping | None = None) -> None:
    """Hand the state at the end of an epoch to the run's ResumeSaver: what a resume needs to go on as if
    never stopped. Weights, optimiser and lr schedule, every generator, the phase's progress (epoch,
    seconds so far, ...), the early-stopping record, the curves, the rows of the steps already finished
    (BoVW, zero-shot) and the run's arguments. Tensors and plain data only, for torch.load(weights_only=True)."""
    if cell.saver.path is None:
        return
    record = None
    if stopper is not None:   # best_state is never changed in place, only replaced: no copy needed
        record = {k: getattr(stopper, k) for k in ("best_score", "best_epoch", "bad", "best_state")}
    cell.saver.epoch_done({
        "format_version": RESUME_VERSION, "args": dict(vars(cell.a)), "phase": phase, "progress": progress,
        "model": clone_state(trainer.model.state_dict(), "cpu"),
        "optimizer": clone_state(trainer.optimizer.state_dict(), "cpu"),
        "scheduler": clone_state(trainer.scheduler.state_dict()), "rng": rng_states(cell, trainer, rng),
        "early_stopping": record, "curves": {k: list(v) for k, v in cell.curves.items()},
        "finished": dict(cell.finished)})


def resume_phase(cell: "Cell", phase: str, trainer: Trainer, progress: dict,
                 rng: np.random.Generator | None = None, stopper: EarlyStopping | None = None) -> dict:
    """Where a phase starts: `progress` as given, or, when this run resumes inside `phase`, the saved
    progress, after putting back everything save_resume_state kept. Called once the phase has built its
    optimiser, schedule and generators, so that the saved states overwrite the fresh ones."""
    state = cell.resumed
    if state is None or state["phase"] != phase:
        return progress
    again = "start the run again without --resume"
    mismatch = state_dict_mismatch(trainer.model.state_dict(), state["model"])
    if mismatch:
        raise UsageError(f"the resume state does not fit its own arguments: {mismatch}; {again}")
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"], cell, trainer, rng)
        if stopper is not None:
            for key, value in state["early_stopping"].items():
                setattr(stopper, key, value)
        cell.curves.update(state["curves"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # a state broken inside
        first_line = (str(e).splitlines() or [""])[0]
        raise UsageError(f"the resume state is broken ({type(e).__name__}: {first_line}); {again}") from None
    cell.resumed = None   # used up: a later phase starts fresh
    return state["progress"]


def load_resume_state(out: str) -> dict:
    """The resume state in folder `out`; anything that is not one of this version is a UsageError."""
    path = os.path.join(out, RESUME_FILE)
    if not os.path.isfile(path):
        finished = os.path.isfile(os.path.join(out, "results.json"))
        raise UsageError(f"no {RESUME_FILE} in '{out}': " + (
            "the run there finished (a finished run deletes its resume state); its results are in results.json"
            if finished else "pass the --out folder of an interrupted run"))
    again = "start the run again without --resume"
    state = load_versioned(path, "resume state", RESUME_VERSION, again,
                           version_fix=f"finish the run with the train.py that began it, or {again}")
    expected = {"args", "phase", "progress", "model", "optimizer", "scheduler", "rng", "early_stopping",
                "curves", "finished"}
    missing = sorted(expected - set(state))
    if missing or state["phase"] not in ("index", "retrieval"):
        raise UsageError(f"'{path}' is a broken resume state (" + (f"no '{missing[0]}'" if missing else
                         f"unknown phase '{state['phase']}'") + f"); {again}")
    return state


def resume_args(a: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The arguments and resume state of the run recorded in `--resume OUT_DIR`. The run keeps its own
    arguments; of this command line only the RUNTIME_FLAGS count, and the output folder is OUT_DIR
    (it may have been moved)."""
    parser = build_parser()
    given = [k for k, v in vars(a).items() if k != "resume" and v != parser.get_default(k)]
    other = [k for k in given if k not in RUNTIME_FLAGS]
    if other:
        raise UsageError(f"--resume continues a run with its own arguments: drop --{other[0].replace('_', '-')} "
                         f"(only --threads, --quiet and --save-every may be given with --resume)")
    state = load_resume_state(a.resume)
    if not isinstance(state["args"], dict) or set(state["args"]) != set(vars(a)):
        raise UsageError(f"'{os.path.join(a.resume, RESUME_FILE)}' records the arguments of another version of "
                         f"train.py; start the run again without --resume")
    ours = {k: getattr(a, k) for k in given}
    return argparse.Namespace(**{**state["args"], **ours, "resume": a.resume, "out": a.resume}), state


# --------------------------------------------------------------------------------------------
# The paper's steps: index -> evaluate (zero-shot) -> finetune -> evaluate (fine-tuned)
# --------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """What the steps of one (db_size, ids) experiment share."""
    a: argparse.Namespace
    recipe: Recipe
    db_size: int
    ids: str                           # ID scheme: clustered, random or semantic
    imageset: data.ImageSet
    split: data.Split
    idb_ids: list[str]                 # ID of each IDB image, in IDB order
    trie: IDTrie                       # the valid IDs, for constrained decoding
    images: torch.Tensor               # (n, 3, S, S) uint8: every image of the run, decoded once
    device: torch.device
    bf16: bool                         # bfloat16 autocast, from the recipe's precision and the hardware
    gen: torch.Generator               # batch order of both phases
    log: Log
    curves: dict[str, list[float]] = field(default_factory=dict)
    saver: ResumeSaver = field(default_factory=ResumeSaver)   # takes each completed epoch's state
    resumed: dict | None = None        # the saved state this run continues from, until its phase has used it
    finished: dict = field(default_factory=dict)   # results of finished steps: "bovw", "indexed", "zero_shot"
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # left out by --index-hold-out

    def relevant(self, positions: np.ndarray) -> list[set[str]]:
        """Relevant IDB IDs of the images at `positions` (same class; COCO: a shared category)."""
        idb_labels = [self.imageset.labels[i] for i in self.split.idb]
        return data.relevant_sets([self.imageset.labels[i] for i in positions], idb_labels, self.idb_ids)


def index(cell: Cell, model: ViTDSI) -> dict:
    """Indexing phase (paper §3.2): every IDB image -> its own ID, deliberately overfit, until the
    training IA@1 reaches --index-target-acc or the epoch cap. Returns epochs, seconds, training IA@1."""
    recipe, a, log = cell.recipe, cell.a, cell.log
    optimizer = make_optimizer(model, recipe, recipe.lr)
    if recipe.index_dropout is not None:
        set_dropout(model, recipe.index_dropout)
    # Pseudo-queries (the image analogue of DSI-QG): with --index-views V, each epoch also shows V
    # augmented views per IDB image, labelled with that image's own ID. Pool = clean IDB, then views.
    idb_images = cell.images[torch.as_tensor(cell.split.idb)]
    targets = data.ids_to_tensor(cell.idb_ids)                                # (n_idb, L)
    n_idb = len(cell.idb_ids)
    n_views = round(recipe.index_views * n_idb)
    pool_targets = torch.cat([targets, targets]) if n_views else targets
    pool = Pool(images=torch.cat([idb_images, idb_images]) if n_views else idb_images,
                targets=lambda idx: pool_targets[idx].unsqueeze(1),          # (B, 1, L)
                augmented=torch.arange(len(pool_targets)) >= n_idb)
    steps = math.ceil((n_idb + n_views) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps, recipe.index_epochs))
    trainer = Trainer(model, optimizer, scheduler, cell.device, cell.bf16,
                      augment_gen=torch.Generator().manual_seed(a.seed + 2))
    cell.curves["index_loss"], cell.curves["index_acc"] = [], []
    progress = resume_phase(cell, "index", trainer, {"epoch": 0, "train_ia": 0.0, "seconds": 0.0})
    epoch, train_ia = progress["epoch"], progress["train_ia"]
    t_start = time.perf_counter() - progress["seconds"]     # a resumed run counts its earlier sessions too
    while epoch < recipe.index_epochs and train_ia < a.index_target_acc:
        epoch += 1
        t0 = time.perf_counter()
        order = torch.cat([torch.arange(n_idb), n_idb + spread(n_views, n_idb, cell.gen)])
        order = order[torch.randperm(len(order), generator=cell.gen)]
        loss, _, acc = run_epoch(trainer, pool, order, recipe.batch_size)
        # Exact match under teacher forcing is free; only when it passes the target do we pay for
        # the real check: IA@1 by beam search with dropout off.
        if acc >= a.index_target_acc or epoch == recipe.index_epochs:
            ranked, _ = rank_dsi(model, idb_images, cell.trie, 1, a.beam, cell.device)
            train_ia = metrics.indexing_accuracy(ranked, cell.idb_ids, 1)
        cell.curves["index_loss"].append(loss)
        cell.curves["index_acc"].append(acc)
        elapsed = time.perf_counter() - t_start
        log(f"index  epoch {epoch:4d}/{recipe.index_epochs}  loss {loss:.4f}  acc {acc:.3f}  "
            f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.2f} s/epoch  "
            f"ETA <= {fmt_seconds(elapsed / epoch * (recipe.index_epochs - epoch))}"
            + (f"  IA@1 {train_ia:.3f}" if acc >= a.index_target_acc else ""))
        save_resume_state(cell, "index", trainer, {"epoch": epoch, "train_ia": train_ia,
                                                   "seconds": time.perf_counter() - t_start})
    seconds = time.perf_counter() - t_start
    set_dropout(model, model.config.dropout)
    log(f"indexing: {epoch} epochs in {fmt_seconds(seconds)} ({n_idb * epoch / seconds:.1f} images/s), "
        f"training IA@1 {train_ia:.3f}")
    return {"epochs": epoch, "seconds": seconds, "train_ia": train_ia, "optimizer": optimizer}


def training_pairs(cell: Cell) -> tuple[torch.Tensor, list[list[int]], int]:
    """What the retrieval phase trains on (the DSI's, and the dual encoder's): the training queries that
    have a relevant IDB image, then every IDB image. Returns their images (m, 3, S, S) uint8, each
    entry's relevant IDB positions (sorted; an IDB image's is its own) and the number of queries."""
    split = cell.split
    rel_train = cell.relevant(split.train)
    keep = [i for i, r in enumerate(rel_train) if r]
    images = cell.images[torch.as_tensor(np.concatenate([split.train[keep], split.idb]).astype(np.int64))]
    position = {id_str: j for j, id_str in enumerate(cell.idb_ids)}
    lists = [[position[r] for r in sorted(rel_train[i])] for i in keep] + [[j] for j in range(len(split.idb))]
    return images, lists, len(keep)


def idb_id_lists(cell: Cell, positions) -> list[list[str]]:
    """Ranked IDB positions (rows of a (B, k) array or tensor) -> ranked ID lists, for metrics.py."""
    return [[cell.idb_ids[j] for j in row] for row in positions.tolist()]


def retrieval_pool(cell: Cell, rng: np.random.Generator) -> tuple[Pool, int, int]:
    """The retrieval phase's training pool: the training queries that have a relevant IDB image, then
    every IDB image. A query's targets are G relevant IDs drawn uniformly (with replacement) anew at
    every step; an IDB image's target is its own ID, G times (index rehearsal, Tay et al. §4.4).
    Rehearsal images stay clean: the index must be recalled from the very images that were indexed.
    `rng` draws the targets. Returns the pool, the number of queries in it and the number of IDB images."""
    recipe = cell.recipe
    images, lists, n_q = training_pairs(cell)
    n_idb = len(cell.split.idb)
    # Relevant IDB positions of every pool entry, flattened: entry e may take any of
    # choices[offsets[e] : offsets[e] + counts[e]] (an IDB entry only its own position).
    counts = torch.tensor([len(c) for c in lists])
    offsets = torch.cumsum(counts, 0) - counts
    choices = torch.tensor([j for c in lists for j in c])
    id_tokens = data.ids_to_tensor(cell.idb_ids)                             # (n_idb, L)
    G = recipe.retrieval_targets

    def targets(idx: torch.Tensor) -> torch.Tensor:                         # (B,) -> (B, G, L)
        pick = torch.from_numpy(rng.integers(0, counts[idx].numpy()[:, None], size=(len(idx), G)))
        return id_tokens[choices[offsets[idx].unsqueeze(1) + pick]]         # (B, G) positions -> (B, G, L)

    augmented = (torch.arange(n_q + n_idb) < n_q) & recipe.augment          # (n_q + n_idb,) bool
    return Pool(images, targets, augmented), n_q, n_idb


def validate(cell: Cell, model: ViTDSI, val: dict) -> dict[str, float]:
    """Validation loss and exact match (teacher-forced) and, when stopping on it, MAP@10 by beam search."""
    recipe = cell.recipe
    loss, acc = eval_loss(model, val["images"], val["targets"], 2 * recipe.batch_size, cell.device, cell.bf16)
    scores = {"loss": loss, "acc": acc}
    if recipe.early_stop == "map":   # MAP@10 needs only the top 10 of each ranked list
        ranked, _ = rank_dsi(model, val["images"], cell.trie, 10, cell.a.beam, cell.device)
        scores["map"] = metrics.mean_average_precision_at_k(ranked, val["relevant"], 10)
    return scores


def index_whole(cell: Cell, model: ViTDSI, floor: float) -> tuple[bool, float]:
    """Whether the model still writes its index: IA@1 of the IDB images, by the beam search `evaluate` scores
    it with, at least `floor`. Asked of a retrieval epoch only when it would be the one kept."""
    ranked, _ = rank_dsi(model, cell.images[torch.as_tensor(cell.split.idb)], cell.trie, IA_DEPTH, cell.a.beam,
                         cell.device)
    ia = metrics.indexing_accuracy(ranked, cell.idb_ids, 1)
    return ia >= floor, ia


def finetune(cell: Cell, model: ViTDSI) -> dict | None:
    """Retrieval phase (paper §3.2): each training query is paired with relevant IDB images' IDs, drawn
    anew every step (so the model sees the whole relevant set), mixed with index rehearsal. Keeps the
    epoch with the best validation score: the VALIDATION queries choose the epoch, never the test ones.
    With `keep_index`, only among the epochs whose index is whole (`index_whole`); epoch 0, the zero-shot
    model, when none is. Returns seconds, epochs run, the epoch kept and its optimizer; None when there is
    nothing to train on."""
    recipe, a, log, split = cell.recipe, cell.a, cell.log, cell.split
    rel_val = cell.relevant(split.val)
    keep_va = [i for i, r in enumerate(rel_val) if r]
    if not keep_va or not any(cell.relevant(split.train)):
        log("retrieval: no training or validation query has a relevant IDB image; skipping fine-tuning")
        return None
    # A fixed draw of G relevant IDs per validation query, so its loss is comparable from epoch to epoch.
    rng, G = np.random.default_rng(a.seed), recipe.retrieval_targets
    va_ids = [sorted(rel_val[i])[j] for i in keep_va for j in rng.integers(len(rel_val[i]), size=G)]
    val = {"images": cell.images[torch.as_tensor(split.val[keep_va])],
           "targets": data.ids_to_tensor(va_ids).view(len(keep_va), G, -1),   # (n_val, G, L)
           "relevant": [rel_val[i] for i in keep_va]}
    pool, n_q, n_idb = retrieval_pool(cell, rng)
    n_mix = round(recipe.index_mix * n_q)
    optimizer = make_optimizer(model, recipe, recipe.retrieval_lr)
    steps = math.ceil((n_q + n_mix) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps, recipe.retrieval_epochs))
    trainer = Trainer(model, optimizer, scheduler, cell.device, cell.bf16, recipe.label_smoothing,
                      augment_gen=torch.Generator().manual_seed(a.seed + 1))
    # The index may not be traded for retrieval: below this IA@1 an epoch is not kept, however well it
    # retrieves (the zero-shot IA@1 when indexing ended under the target at its epoch cap).
    zero_shot = cell.finished.get("zero_shot")
    floor = min(a.index_target_acc, zero_shot["IA@1"]) if zero_shot else a.index_target_acc
    log(f"retrieval: {n_q} queries x {G} relevant IDs + {n_mix} IDB pairs per epoch, lr {recipe.retrieval_lr:g}, "
        + (f"up to {recipe.retrieval_epochs} epochs (at least {recipe.min_epochs}, then patience {recipe.patience}"
           if recipe.patience else f"{recipe.retrieval_epochs} epochs (the whole schedule")
        + f", keeping the best validation {recipe.early_stop}"
        + (f" among epochs with IDB IA@1 >= {floor:.3f}" if recipe.keep_index else "")
        + f"), augment {'on' if recipe.augment else 'off'}, "
        f"label smoothing {recipe.label_smoothing}")
    for key in ("ret_train_loss", "ret_val_loss", "ret_train_acc", "ret_val_acc", "ret_val_map"):
        cell.curves[key] = []
    stopper = EarlyStopping(recipe.patience, recipe.min_epochs)
    if recipe.keep_index:   # until an epoch qualifies, the epoch kept is 0: the zero-shot model
        stopper.best_state = {"model": clone_state(model.state_dict()), "optimizer": clone_state(optimizer.state_dict())}
    progress = resume_phase(cell, "retrieval", trainer, {"epoch": 0, "seconds": 0.0}, rng, stopper)
    epoch, t_start = progress["epoch"], time.perf_counter() - progress["seconds"]
    while epoch < recipe.retrieval_epochs and not stopper.stopped(epoch):
        epoch += 1
        t0 = time.perf_counter()
        order = torch.cat([torch.arange(n_q), n_q + spread(n_mix, n_idb, cell.gen)])
        order = order[torch.randperm(len(order), generator=cell.gen)]
        loss, acc, _ = run_epoch(trainer, pool, order, recipe.batch_size)
        v = validate(cell, model, val)
        for key, value in (("ret_train_loss", loss), ("ret_train_acc", acc), ("ret_val_loss", v["loss"]),
                           ("ret_val_acc", v["acc"]), ("ret_val_map", v.get("map"))):
            if value is not None:
                cell.curves[key].append(value)
        score = v["map"] if recipe.early_stop == "map" else -v["loss"]
        if recipe.keep_index and score > stopper.best_score:
            whole, ia = index_whole(cell, model, floor)
            if not whole:
                log(f"retrieval epoch {epoch:3d}: IDB IA@1 {ia:.3f} < {floor:.3f}: not kept, whatever its "
                    f"validation {recipe.early_stop}")
                score = -float("inf")
        stopper.step(epoch, score, model, optimizer)
        eta = (time.perf_counter() - t_start) / epoch * (recipe.retrieval_epochs - epoch)
        log(f"retrieval epoch {epoch:3d}/{recipe.retrieval_epochs}  loss {loss:.4f}  acc {acc:.3f}  "
            f"val loss {v['loss']:.4f}  val acc {v['acc']:.3f}  "
            + (f"val MAP@10 {v['map']:.3f}  " if "map" in v else "")
            + f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.2f} s/epoch  ETA <= {fmt_seconds(eta)}")
        save_resume_state(cell, "retrieval", trainer, {"epoch": epoch, "seconds": time.perf_counter() - t_start},
                          rng, stopper)
    if stopper.stopped(epoch):
        log(f"retrieval: validation {recipe.early_stop} has not improved for {recipe.patience} epochs; stopping")
    stopper.restore(model, optimizer)
    log(f"retrieval: ran {epoch} epochs, kept epoch {stopper.best_epoch} (best validation {recipe.early_stop})")
    if recipe.keep_index and stopper.best_epoch == 0:
        log(f"retrieval: no epoch kept IDB IA@1 >= {floor:.3f}; the zero-shot model stays")
    return {"seconds": time.perf_counter() - t_start, "epochs": epoch, "best_epoch": stopper.best_epoch,
            "optimizer": optimizer}


def evaluate(cell: Cell, model: ViTDSI, variant: str, train_seconds: float, info: dict) -> dict:
    """Score the model like every other (paper §3.1): IA@1/IA@5 over the IDB, retrieval metrics over
    the TEST queries. Called once per reported row."""
    idb_images = cell.images[torch.as_tensor(cell.split.idb)]
    db_rank, _ = rank_dsi(model, idb_images, cell.trie, IA_DEPTH, cell.a.beam, cell.device, log=cell.log, what="IDB")
    q_rank, q_ms = rank_dsi(model, cell.images[torch.as_tensor(cell.split.test)], cell.trie, RANK_DEPTH,
                            cell.a.beam, cell.device, log=cell.log, what="test queries")
    row = score_row(cell, "ViT DSI", variant, db_rank, q_rank)
    row.update(train_seconds=round(train_seconds, 2), query_ms=round(q_ms, 2), **info)
    cell.log(f"ViT DSI {variant}: IA@1 {row['IA@1']:.3f}  IA@5 {row['IA@5']:.3f}  P@10 {row['P@10']:.3f}  "
             f"MAP@10 {row['MAP@10']:.3f}  Recall@100 {row['Recall@100']:.3f}  ({q_ms:.1f} ms/query)")
    return row


def score_row(cell: Cell, model_name: str, variant: str, rankings_db: list, rankings_q: list) -> dict:
    """One row of Table 1, every metric from metrics.py, for BoVW and the DSI alike, on the same queries.
    Test queries with no relevant IDB image are left out of the retrieval metrics; the row says how many."""
    relevants = cell.relevant(cell.split.test)
    row = {"model": model_name, "variant": variant, "db_size": cell.db_size, "ids": cell.ids,
           "dataset": cell.a.dataset, "seed": cell.a.seed}
    row["IA@1"] = metrics.indexing_accuracy(rankings_db, cell.idb_ids, 1)
    row["IA@5"] = metrics.indexing_accuracy(rankings_db, cell.idb_ids, 5)
    row.update(metrics.retrieval_metrics(rankings_q, relevants))
    row["test_queries"], row["test_queries_scored"] = len(relevants), sum(1 for r in relevants if r)
    return row


def run_bovw(cell: Cell) -> dict:
    """The BoVW baseline (paper §3.1): vocabulary and index from the IDB, cosine ranking of the test queries."""
    a, split, imageset = cell.a, cell.split, cell.imageset
    t0 = time.perf_counter()
    index = bovw.BoVWIndex(k=a.bovw_k, seed=a.seed).fit(imageset.images[split.idb])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pos, _ = index.query(imageset.images[split.test], top_k=RANK_DEPTH)
    q_ms = 1000 * (time.perf_counter() - t0) / max(1, len(split.test))
    db_pos, _ = index.query(imageset.images[split.idb], top_k=IA_DEPTH)
    row = score_row(cell, "BoVW", "-", idb_id_lists(cell, db_pos), idb_id_lists(cell, pos))
    row.update(train_seconds=round(fit_s, 2), query_ms=round(q_ms, 2))
    cell.log(f"BoVW: vocabulary of {index.n_words} words + index in {fit_s:.1f} s, {q_ms:.1f} ms/query; "
             f"P@10 {row['P@10']:.3f}  MAP@10 {row['MAP@10']:.3f}  Recall@100 {row['Recall@100']:.3f}")
    return row


def dual_encoder_anchors(cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
    """The retrieval phase's training pairs as DE anchors (an IDB image is shown as an augmented view, its
    own image the positive, as the DSI's rehearsal pairs): images (m, 3, S, S) uint8, positive (m, n_idb) bool."""
    images, lists, _ = training_pairs(cell)
    rows = torch.tensor([e for e, c in enumerate(lists) for _ in c])       # entry of each relevant position
    positive = torch.zeros(len(lists), len(cell.split.idb), dtype=torch.bool)
    positive[rows, torch.tensor([j for c in lists for j in c])] = True
    return images, positive


@torch.no_grad()
def embed(model: DualEncoder, images: torch.Tensor, cell: Cell, batch_size: int = 64) -> torch.Tensor:
    """Unit embeddings (n, D) of uint8 images (n, 3, S, S), dropout off."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        with torch.autocast(cell.device.type, dtype=torch.bfloat16, enabled=cell.bf16):
            out.append(model(data.normalize(images[start:start + batch_size].to(cell.device))).float())
    return torch.cat(out)


def train_dual_encoder(cell: Cell, model: DualEncoder) -> dict:
    """The DE baseline (the model a practitioner would pick), trained with the DSI's retrieval recipe
    on the same images: per step, a batch of augmented anchors against the clean IDB images picked as one
    positive of each anchor, in-batch negatives as in DPR (Karpukhin et al. 2020; multi-positive InfoNCE:
    an anchor's positives are all picks relevant to it). Adding as many random IDB images as candidates
    cost a third more per step and did not score higher on validation queries (RESULTS.md). The epoch with
    the best validation MAP@10 is kept, by the DSI's own rule. Returns seconds, epochs run, epoch kept."""
    recipe, a, split, log = cell.recipe, cell.a, cell.split, cell.log
    anchors, positive = dual_encoder_anchors(cell)
    idb = cell.images[torch.as_tensor(split.idb)]
    rel_val = cell.relevant(split.val)
    keep_va = [i for i, r in enumerate(rel_val) if r]
    val_images = cell.images[torch.as_tensor(split.val[keep_va])]
    optimizer = make_optimizer(model, recipe, recipe.retrieval_lr)
    steps = math.ceil(len(anchors) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps, recipe.retrieval_epochs))
    gen = torch.Generator().manual_seed(a.seed + 4)     # the DE's own batch order, positives and augmentations
    stopper = EarlyStopping(recipe.patience, recipe.min_epochs)
    t_start = time.perf_counter()
    log(f"dual encoder: {len(anchors)} anchors per epoch, lr {recipe.retrieval_lr:g}, {recipe.retrieval_epochs} epochs")
    for epoch in range(1, recipe.retrieval_epochs + 1):
        model.train()
        order, total = torch.randperm(len(anchors), generator=gen), 0.0
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            picked = torch.multinomial(positive[idx].float(), 1, generator=gen).flatten()          # (B,)
            cand = torch.unique(picked)     # in-batch candidates: each anchor's pick is a negative of the others
            x = data.augment(data.normalize(anchors[idx].to(cell.device)), gen)
            with torch.autocast(cell.device.type, dtype=torch.bfloat16, enabled=cell.bf16):
                q, e = model(x), model(data.normalize(idb[cand].to(cell.device)))
            loss = info_nce(q.float(), e.float(), positive[idx][:, cand].to(cell.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        top, _ = rank_cosine(embed(model, val_images, cell), embed(model, idb, cell), 10)
        val_map = metrics.mean_average_precision_at_k(idb_id_lists(cell, top), [rel_val[i] for i in keep_va], 10)
        stop = stopper.step(epoch, val_map, model, optimizer)
        log(f"dual encoder epoch {epoch:3d}/{recipe.retrieval_epochs}  loss {total / len(anchors):.4f}  "
            f"val MAP@10 {val_map:.3f}  lr {scheduler.get_last_lr()[0]:.2e}")
        if stop:
            break
    stopper.restore(model, optimizer)
    log(f"dual encoder: ran {epoch} epochs, kept epoch {stopper.best_epoch} (best validation MAP@10)")
    return {"seconds": time.perf_counter() - t_start, "epochs": epoch, "best_epoch": stopper.best_epoch}


def run_dual_encoder(cell: Cell) -> dict:
    """Train the DE and score it like every other model: IA@k (an IDB image finds itself), retrieval
    metrics of the test queries by exact cosine ranking of the IDB embeddings."""
    torch.manual_seed(cell.a.seed + 3)   # its own initialisation
    model = DualEncoder(model_config(cell.a, max_len=2)).to(cell.device)
    set_dropout(model, model.config.dropout, cell.recipe.dropout_draw)
    trained = train_dual_encoder(cell, model)
    t0 = time.perf_counter()
    database = embed(model, cell.images[torch.as_tensor(cell.split.idb)], cell)
    test = cell.images[torch.as_tensor(cell.split.test)]
    q_top, _ = rank_cosine(embed(model, test, cell), database, RANK_DEPTH)
    q_ms = 1000 * (time.perf_counter() - t0) / max(1, len(test))
    db_top, _ = rank_cosine(database, database, IA_DEPTH)
    row = score_row(cell, "ViT dual encoder", "-", idb_id_lists(cell, db_top), idb_id_lists(cell, q_top))
    row.update(train_seconds=round(trained["seconds"], 2), query_ms=round(q_ms, 2),
               retrieval_epochs=trained["epochs"], retrieval_epoch_kept=trained["best_epoch"])
    cell.log(f"ViT dual encoder: IA@1 {row['IA@1']:.3f}  P@10 {row['P@10']:.3f}  MAP@10 {row['MAP@10']:.3f}  "
             f"Recall@100 {row['Recall@100']:.3f}  ({trained['seconds']:.0f} s training)")
    return row


def run_experiment(a: argparse.Namespace, imageset: data.ImageSet, db_size: int, ids_scheme: str,
                   out: str, log: Log, with_baselines: bool = True, saver: ResumeSaver | None = None,
                   resumed: dict | None = None) -> list[dict]:
    """One (db_size, ids) cell of Table 1, as the paper's steps. Returns its rows. The baselines (BoVW, the
    dual encoder) do not read IDs, so a sweep trains them once per db size (`with_baselines`). `resumed` is the
    saved state of an interrupted run of this cell: the steps it had finished are taken from it, not run again."""
    set_seed(a.seed)
    recipe = recipe_from_args(a)
    split, held_out = hold_out(data.split_dataset(imageset, db_size, a.index_fraction, seed=a.seed),
                               imageset, a.index_hold_out, a.seed)
    if len(held_out):
        log(f"index hold-out: {len(held_out)} of {len(split.idb) + len(held_out)} IDB images left out of the "
            f"first index (stratified), recorded in the checkpoint for --add")
    idb_ids = make_ids(a, imageset, split, ids_scheme, log)
    log(f"split: IDB {len(split.idb)}, queries train {len(split.train)} / val {len(split.val)} / "
        f"test {len(split.test)}; ids {ids_scheme} (up to {max(map(len, idb_ids))} digits)")
    device = pick_device(a.device)
    cell = Cell(a, recipe, db_size, ids_scheme, imageset, split, idb_ids, IDTrie(idb_ids),
                data.images_to_tensor(imageset.images), device, use_bf16(recipe.precision, device),
                torch.Generator().manual_seed(a.seed), log, saver=saver or ResumeSaver(), resumed=resumed,
                finished=dict(resumed["finished"]) if resumed else {}, held_out=held_out)
    if "bovw" in a.models and with_baselines and "bovw" not in cell.finished:
        cell.finished["bovw"] = run_bovw(cell)
    rows = [cell.finished["bovw"]] if "bovw" in cell.finished else []
    if "dsi" in a.models:
        rows += run_dsi(cell, out)
    if "de" in a.models and with_baselines:   # after the DSI, so that the DSI's numbers do not depend on whether the DE runs
        rows.append(run_dual_encoder(cell))
    return rows


def run_dsi(cell: Cell, out: str) -> list[dict]:
    """The DSI's steps: index, evaluate (zero-shot), finetune, evaluate (fine-tuned); then its checkpoint
    and curves. Returns its rows."""
    a, log, idb_ids, split, imageset = cell.a, cell.log, cell.idb_ids, cell.split, cell.imageset
    db_size, ids_scheme, rows = cell.db_size, cell.ids, []
    config = model_config(a, max_len=max(map(len, idb_ids)) + 2)             # BOS, digits, EOS
    model = ViTDSI(config).to(cell.device)
    set_dropout(model, config.dropout, cell.recipe.dropout_draw)
    log(f"ViT DSI: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{(a.image_size // a.patch_size) ** 2} patches, recipe '{a.recipe}' ({'bf16' if cell.bf16 else 'fp32'}), "
        f"device {cell.device.type}")
    optimizer = None   # a run resumed inside the retrieval phase gets it from finetune
    if "zero_shot" not in cell.finished:   # else the run resumes inside the retrieval phase: both are saved
        indexed = index(cell, model)
        optimizer = indexed.pop("optimizer")
        cell.finished["indexed"] = indexed
        cell.finished["zero_shot"] = evaluate(cell, model, "zero-shot", indexed["seconds"],
                                              index_info(indexed, len(idb_ids)))
    indexed = cell.finished["indexed"]
    rows.append(cell.finished["zero_shot"])
    epoch = indexed["epochs"]
    if not a.no_finetune:
        tuned = finetune(cell, model)
        if tuned:
            info = dict(index_info(indexed, len(idb_ids)), retrieval_epochs=tuned["epochs"],
                        retrieval_epoch_kept=tuned["best_epoch"], retrieval_seconds=round(tuned["seconds"], 2))
            rows.append(evaluate(cell, model, "fine-tuned", indexed["seconds"] + tuned["seconds"], info))
            optimizer, epoch = tuned["optimizer"], tuned["best_epoch"] or epoch   # 0: the zero-shot model

    save_checkpoint(os.path.join(out, "checkpoint.pt"), model, optimizer, config, a, epoch, catalogue(cell))
    draw_curves(cell.curves, os.path.join(out, "curves.png"), title=f"{a.dataset} db {db_size} ids {ids_scheme}")
    return rows


def hold_out(split: data.Split, imageset: data.ImageSet, fraction: float, seed: int) -> tuple[data.Split, np.ndarray]:
    """The split whose IDB lacks a stratified `fraction` of its images, and those images' positions.
    The queries stay as drawn, so a model indexed on the rest and grown later is scored on the same
    test queries as one that indexed the whole IDB from the start."""
    n_out = math.floor(len(split.idb) * fraction + 0.5)
    if n_out == 0:
        return split, np.zeros(0, np.int64)
    if n_out >= len(split.idb):
        raise UsageError(f"--index-hold-out {fraction} leaves no IDB image to index; pass a smaller fraction")
    keep, out = data.stratified_subsets(imageset.primary[split.idb], [len(split.idb) - n_out, n_out], seed)
    return replace(split, idb=split.idb[keep]), split.idb[out]


def catalogue(cell: Cell) -> dict:
    """What a checkpoint says about its index, beside the weights: each indexed image's ID, reference and
    class; the class names (an added ImageFolder class is matched by name); the clustered prefix width
    (the class part of an ID); IDs hidden by --remove; and the images that --index-hold-out left out."""
    imageset, idb = cell.imageset, cell.split.idb
    return {"ids": cell.idb_ids, "idb_refs": [imageset.refs[i] for i in idb], "ids_scheme": cell.ids,
            "db_size": cell.db_size, "class_names": list(imageset.class_names),
            "idb_classes": [int(c) for c in imageset.primary[idb]],
            "prefix_width": data.clustered_prefix_width(imageset.primary[idb]) if cell.ids == "clustered" else 0,
            "removed": [], "held_out": [imageset.refs[i] for i in cell.held_out]}


def index_info(indexed: dict, n_idb: int) -> dict:
    """The indexing phase's numbers that every DSI row carries (the zero-shot row: no retrieval epochs)."""
    return {"index_epochs": indexed["epochs"],
            "index_seconds_per_epoch": round(indexed["seconds"] / indexed["epochs"], 3),
            "index_images_per_s": round(n_idb * indexed["epochs"] / indexed["seconds"], 1),
            "retrieval_epochs": 0, "retrieval_epoch_kept": 0}


def make_ids(a: argparse.Namespace, imageset: data.ImageSet, split: data.Split, scheme: str, log: Log) -> list[str]:
    """IDs of the IDB images (paper §2.1): clustered or random from data.py, or semantic IDs."""
    if scheme != "semantic":
        return data.assign_ids(imageset.primary[split.idb], scheme, seed=a.seed)
    # Tay et al. §3.2: IDs from hierarchical k-means over features made without labels, here the IDB's
    # own BoVW histograms, so that similar-looking images share ID prefixes.
    t0 = time.perf_counter()
    histograms = bovw.BoVWIndex(k=a.bovw_k, seed=a.seed).fit(imageset.images[split.idb]).database
    ids = bovw.hierarchical_ids(histograms, np.random.default_rng(a.seed))
    log(f"semantic IDs: hierarchical k-means over BoVW histograms in {time.perf_counter() - t0:.1f} s, "
        f"lengths {min(map(len, ids))}-{max(map(len, ids))} digits")
    return ids


def load_images(a: argparse.Namespace, db_size: int, log: Log) -> data.ImageSet:
    t0 = time.perf_counter()
    imageset = data.load_dataset(a.dataset, data_root=a.data_root, coco_annotations=a.coco_annotations,
                                 image_size=a.image_size, aspect_range=tuple(a.aspect_range),
                                 db_size=db_size, seed=a.seed)
    log(f"data: {len(imageset.refs)} images of {len(imageset.class_names)} classes from '{a.dataset}' "
        f"({imageset.filtered} dropped by the aspect filter, {imageset.skipped} unreadable) "
        f"in {time.perf_counter() - t0:.1f} s")
    return imageset


# --------------------------------------------------------------------------------------------
# Outputs: checkpoint, curves, tables
# --------------------------------------------------------------------------------------------

def atomic_write(path: str, write: Callable[[IO], None], text: bool = False) -> None:
    """Write a file whole or not at all: `write(f)` fills a temporary file in the same folder, which then
    takes the place of `path` in one rename (os.replace is atomic within a file system). A reader never
    sees half a file, and a write that fails leaves the previous file as it was and no temporary behind."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb", encoding="utf-8" if text else None) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())   # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# Bump when the checkpoint's layout changes: a file of another version is refused with both numbers.
# Version 2 added what growing an index needs: class_names, idb_classes, prefix_width, removed, held_out.
CHECKPOINT_VERSION = 2
CHECKPOINT_KEYS = ("model", "config", "args", "ids", "idb_refs", "ids_scheme", "class_names", "idb_classes",
                   "prefix_width", "removed", "held_out")   # what query mode, --add and --remove need


def save_checkpoint(path: str, model: ViTDSI, optimizer: torch.optim.Optimizer, config: ViTDSIConfig,
                    a: argparse.Namespace, epoch: int, index_catalogue: dict) -> None:
    """One dict with everything needed to rebuild the model, answer queries and grow the index
    (`index_catalogue`: see `catalogue`).

    Only tensors and plain data (dict, list, tuple, str, int, float, bool, None), so that
    `torch.load(..., weights_only=True)` reads it back without running any code from the file."""
    ckpt = {"format_version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": asdict(config), "args": vars(a), "epoch": epoch, "seed": a.seed,
            "aspect_range": list(a.aspect_range), **index_catalogue}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def live_ids(ckpt: dict) -> list[str]:
    """The IDs decoding may write: every indexed ID but those hidden by --remove. Everything that builds
    the trie from a checkpoint builds it from these, so a removed ID is never returned."""
    removed = set(ckpt["removed"])
    return [i for i in ckpt["ids"] if i not in removed]


def torch_load_error(e: Exception) -> str:
    """The line of a torch.load error that says what is wrong; the weights-only unpickler puts it
    after "WeightsUnpickler error:", below advice to load the file unsafely, which we never do."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". Please use")[0] if lines else type(e).__name__


def load_versioned(path: str, what: str, version: int, fix: str, unversioned: str = "",
                   version_fix: str | None = None) -> dict:
    """A dict that this project saved as `what` (checkpoint or resume state) of format `version`, read with
    weights_only=True: the unpickler builds tensors and plain containers only, so a crafted file that
    would run code is refused before any of it runs. Anything else is a UsageError ending in `fix`."""
    try:
        with warnings.catch_warnings():    # torch warns about foreign pickles; the error below says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file torch cannot read safely, whatever it is: one line, exit 2
        raise UsageError(f"'{path}' is not a vit-dsi {what} (the safe loader refused it: {torch_load_error(e)}); "
                         f"{fix}") from None
    if not isinstance(loaded, dict) or "format_version" not in loaded:
        raise UsageError(f"'{path}' has no format_version: not a vit-dsi {what}{unversioned}; {fix}")
    if loaded["format_version"] != version:
        kind = "checkpoint of format version" if what == "checkpoint" else f"{what} of version"
        raise UsageError(f"'{path}' is a {kind} {loaded['format_version']}, this train.py reads version "
                         f"{version}; {version_fix or fix}")
    return loaded


def state_dict_mismatch(expected: dict, found: dict) -> str | None:
    """The first difference between a model's state_dict and a checkpoint's, in words; None if they fit."""
    if not isinstance(found, dict):
        return f"its weights are a {type(found).__name__}, not a state_dict"
    for name, tensor in expected.items():
        if name not in found:
            return f"it lacks the parameter '{name}'"
        if not isinstance(found[name], torch.Tensor) or found[name].shape != tensor.shape:
            shape = tuple(found[name].shape) if isinstance(found[name], torch.Tensor) else type(found[name]).__name__
            return f"its parameter '{name}' has shape {shape}, the config gives {tuple(tensor.shape)}"
    unknown = sorted(set(found) - set(expected))
    return f"it has a parameter '{unknown[0]}' that this model lacks" if unknown else None


def load_checkpoint(path: str) -> tuple[ViTDSI, dict]:
    """Rebuild the model from a checkpoint.pt; any file that is not one of this version is a UsageError.

    weights_only=True: the unpickler builds tensors and plain containers only, so a crafted file that
    would run code when unpickled is refused before any of it runs."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' not found: pass the checkpoint.pt written by a training run")
    retrain = "pass a checkpoint.pt written by this version of train.py, or retrain"
    ckpt = load_versioned(path, "checkpoint", CHECKPOINT_VERSION, retrain,
                          unversioned=", or one older than versioned checkpoints")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise UsageError(f"'{path}' lacks the checkpoint field '{missing[0]}'; {retrain}")
    config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    differ = sorted(map(str, set(config) ^ {f.name for f in fields(ViTDSIConfig)}))   # fields on one side only
    if differ:
        raise UsageError(f"'{path}' has a model config that differs from this version's in the field "
                         f"'{differ[0]}'; {retrain}")
    try:
        model = ViTDSI(ViTDSIConfig(**config))
    except (ValueError, TypeError, AssertionError) as e:
        raise UsageError(f"'{path}' holds an invalid model config ({e}); {retrain}") from None
    mismatch = state_dict_mismatch(model.state_dict(), ckpt["model"])
    if mismatch:
        raise UsageError(f"'{path}' does not fit its own model config: {mismatch}; {retrain}")
    ids, refs, classes = ckpt["ids"], ckpt["idb_refs"], ckpt["idb_classes"]
    if not (isinstance(ids, list) and isinstance(refs, list) and isinstance(classes, list)
            and 0 < len(ids) == len(refs) == len(classes) == len(set(ids))
            and all(isinstance(i, str) and i.isdigit() for i in ids)):
        raise UsageError(f"'{path}' has a broken ID map (ids, idb_refs and idb_classes must be equally long "
                         f"lists, the ids distinct digit strings); {retrain}")
    removed = ckpt["removed"]
    if not (isinstance(removed, list) and all(isinstance(i, str) for i in removed) and set(removed) < set(ids)
            and isinstance(ckpt["args"], dict)):
        raise UsageError(f"'{path}' has a broken list of removed IDs (it must name some, not all, of its IDs) "
                         f"or run arguments; {retrain}")
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def draw_curves(curves: dict, path: str, title: str) -> None:
    """Paper Figures 1-3 with Pillow: indexing loss/accuracy, retrieval train/val loss and accuracy."""
    blue, red, green = (31, 119, 180), (214, 39, 40), (44, 160, 44)
    panels = [("indexing loss", [("train", curves.get("index_loss", []), blue)]),
              ("indexing exact-match accuracy", [("train", curves.get("index_acc", []), blue)]),
              ("retrieval loss", [("train", curves.get("ret_train_loss", []), blue),
                                  ("val", curves.get("ret_val_loss", []), red)]),
              ("retrieval exact match (the drawn relevant ID)", [("train", curves.get("ret_train_acc", []), blue),
                                                                 ("val", curves.get("ret_val_acc", []), red),
                                                                 ("val MAP@10", curves.get("ret_val_map", []), green)])]
    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (2 * w, 2 * h + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for n, (name, series) in enumerate(panels):
        x0, y0 = (n % 2) * w, 30 + (n // 2) * h
        box = (x0 + pad, y0 + 20, x0 + w - 15, y0 + h - pad)
        draw.rectangle(box, outline="black")
        draw.text((x0 + pad, y0 + 4), name, fill="black")
        values = [v for _, ys, _ in series for v in ys]
        if not values:
            draw.text((box[0] + 10, box[1] + 10), "(phase not run)", fill="gray")
            continue
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0
        n_max = max(len(ys) for _, ys, _ in series)
        draw.text((x0 + 2, box[1]), f"{hi:.2f}", fill="black")
        draw.text((x0 + 2, box[3] - 10), f"{lo:.2f}", fill="black")
        draw.text((box[0], box[3] + 4), "epoch 1", fill="black")
        draw.text((box[2] - 50, box[3] + 4), f"epoch {n_max}", fill="black")
        for k, (label, ys, colour) in enumerate(series):
            pts = [(box[0] + (box[2] - box[0]) * (i / max(1, n_max - 1)),
                    box[3] - (box[3] - box[1]) * (v - lo) / (hi - lo)) for i, v in enumerate(ys)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            elif pts:
                draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
            draw.text((box[2] - 60, box[1] + 5 + 12 * k), label, fill=colour)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


# Numbers quoted from the paper for the one cell our protocol reproduces (ImageNet, 512, clustered).
PAPER = {("ViT DSI", "zero-shot", 512, "clustered"): {"IA@1": 0.83},
         ("ViT DSI", "fine-tuned", 512, "clustered"): {"IA@1": 0.41}}
COLUMNS = ["IA@1", "IA@5", "MAP@10", "P@10", "Recall@10", "Recall@100", "train_seconds", "query_ms"]


def results_markdown(rows: list[dict], header: str) -> str:
    """Table-1-style markdown; the paper's numbers beside ours where the protocol matches."""
    fmt = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) and v <= 1 else f"{v:g}")  # noqa: E731
    lines = [f"# Results: {header}", "",
             "| model | variant | db size | ids | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['db_size']} | {r['ids']} | "
                     + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    paper = [(k, v) for k, v in PAPER.items() if any((r["model"], r["variant"], r["db_size"], r["ids"]) == k
                                                     for r in rows)]
    if paper and rows and rows[0].get("dataset") == "imagenet":
        lines += ["", "Paper (Di Stefano, Table 1), same cell:", ""]
        lines += [f"- {m} {v}, db {d}, {i}: " + ", ".join(f"{c} {x:.2f}" for c, x in vals.items())
                  for (m, v, d, i), vals in paper]
    lines += ["", "IA = indexing accuracy over all IDB images; MAP@10, P@10, Recall@k over all test queries "
              "with at least one relevant IDB image (metrics.py). train_seconds: BoVW = vocabulary + index; "
              "zero-shot = indexing; fine-tuned = indexing + retrieval. query_ms: mean per test query, "
              "ranking of 100."]
    return "\n".join(lines) + "\n"


def write_results(out: str, rows: list[dict], header: str, extra: dict) -> str:
    """results.json and results.md, each written whole or not at all."""
    atomic_write(os.path.join(out, "results.json"), lambda f: json.dump({"rows": rows, **extra}, f, indent=2),
                 text=True)
    table = results_markdown(rows, header)
    atomic_write(os.path.join(out, "results.md"), lambda f: f.write(table), text=True)
    return table


# --------------------------------------------------------------------------------------------
# Query mode
# --------------------------------------------------------------------------------------------

def query_mode(a: argparse.Namespace) -> None:
    model, ckpt = load_checkpoint(a.checkpoint)
    device = pick_device(a.device)
    model.to(device)
    size = model.config.image_size
    images = []
    for path in a.query:
        if not os.path.isfile(path):
            raise UsageError(f"query image '{path}' not found: pass existing image files")
        try:
            # A query is any photo: crop and resize it, never reject it for its aspect ratio.
            images.append(data.read_image(path, size, aspect_range=None))
        except data.UnreadableImage:
            raise UsageError(f"cannot decode '{path}' as an image: pass a JPEG/PNG/BMP file") from None
    x = data.images_to_tensor(np.stack(images))
    trie = IDTrie(live_ids(ckpt))
    ref_of = dict(zip(ckpt["ids"], ckpt["idb_refs"]))
    with torch.no_grad():
        results = model.generate(data.normalize(x.to(device)), trie, k=a.top_k, beam=a.beam)
    for path, hyps in zip(a.query, results):
        print(f"{path}:")
        for rank, (id_str, score) in enumerate(hyps, 1):
            print(f"  {rank:3d}. ID {id_str}  log-prob {score:8.3f}  -> {ref_of[id_str]}")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def default_out(a: argparse.Namespace) -> str:
    if a.sweep:
        return os.path.join("runs", f"sweep-{a.dataset}-s{a.seed}")
    return os.path.join("runs", f"{a.dataset}-{a.db_size}-{a.ids}-s{a.seed}")


def arm_saver(saver: ResumeSaver, path: str, every: int, state: dict | None, log: Log) -> None:
    """Point `saver` at `path`. A resumed run starts from the saved state (Ctrl-C before its next epoch
    ends writes it back as it was); a fresh run says that it will replace a state left in its folder."""
    saver.path, saver.every, saver.state = path, every, state
    if state is not None:
        log(f"resuming from {path}: {state['phase']} epoch {state['progress']['epoch']} had ended")
    elif os.path.exists(path):
        log(f"note: {path} holds the state of an interrupted run; this run starts afresh and replaces it "
            f"(python train.py --resume {os.path.dirname(path)} continues that run instead)")


def run(a: argparse.Namespace, saver: ResumeSaver | None = None) -> int:
    state = None
    if a.resume:
        a, state = resume_args(a)
    check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.query:
        query_mode(a)
        return 0
    if a.add or a.remove:   # grow.py builds on this file's loop pieces, so it is imported only when needed;
        # run as a script this module is __main__: grow's `import train` must find it, not load a second copy
        sys.modules.setdefault("train", sys.modules[__name__])
        import grow
        return grow.main(a)
    out = a.out or default_out(a)
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "train.log"), quiet=a.quiet)
    recipe = recipe_from_args(a)
    log(f"vit-dsi: {' '.join(sys.argv[1:]) or '(defaults)'} -> {out}")
    log(f"recipe '{a.recipe}': " + ", ".join(f"{k} {v}" for k, v in asdict(recipe).items()))
    saver = saver or ResumeSaver()
    if a.sweep:   # its finished cells are not kept apart from the unfinished one: no resume state
        saver.why_not = "a --sweep cannot be resumed"
    else:
        arm_saver(saver, os.path.join(out, RESUME_FILE), a.save_every, state, log)
    t_run = time.perf_counter()
    cells = [(n, s) for n in a.sweep_sizes for s in a.sweep_ids] if a.sweep else [(a.db_size, a.ids)]
    imageset = load_images(a, max(n for n, _ in cells), log)
    rows = []
    for n, scheme in cells:
        cell_out = os.path.join(out, f"{n}-{scheme}") if a.sweep else out
        os.makedirs(cell_out, exist_ok=True)
        log(f"== db-size {n}, ids {scheme} ==")
        # BoVW does not depend on the ID scheme: one row per db-size.
        rows += run_experiment(a, imageset, n, scheme, cell_out, log,
                               with_baselines=(scheme == a.sweep_ids[0] or not a.sweep), saver=saver, resumed=state)
    header = (f"{a.dataset}, {'Table 1 sweep' if a.sweep else f'db-size {a.db_size}, ids {a.ids}'}, "
              f"seed {a.seed}, recipe {a.recipe}")
    table = write_results(out, rows, header, {"args": vars(a), "recipe": {"name": a.recipe, **asdict(recipe)},
                                              "wall_seconds": round(time.perf_counter() - t_run, 1)})
    if saver.path:   # the run is whole: checkpoint.pt is its model, and a resume has nothing left to do
        with contextlib.suppress(FileNotFoundError):
            os.remove(saver.path)
    log(f"done in {fmt_seconds(time.perf_counter() - t_run)}; outputs in {out}")
    if a.quiet:
        print(table)
    else:
        log(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    saver = ResumeSaver()   # run() points it at OUT/resume.pt; on Ctrl-C it saves the last completed epoch
    try:
        return run(a, saver)
    except (UsageError, data.DataError, bovw.BoVWError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(saver.interrupted(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
