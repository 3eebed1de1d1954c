"""The command line of train.py: its flags, the checks every flag passes before any work starts, and what
the flags turn into (the recipe, the model config, the images, the output folder).

    a = build_parser().parse_args(["--db-size", "512", "--ids", "clustered"])
    check_args(a)                      # a UsageError (one line, exit 2) before anything runs
    recipe = recipe_from_args(a)
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import fields, replace
from typing import NoReturn

import torch

from support import sources
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
        self.exit(2, f"error: {message}; see python train.py --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="ViT as a Differentiable Search Index (DSI) vs a BoVW baseline: index, fine-tune, "
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
    g.add_argument("--data-root", help="imagenet: ImageFolder root DIR/<class>/<image>; coco: the images folder")
    g.add_argument("--db-size", type=int, default=512, help="images drawn for the run (IDB + queries), paper Table 1")
    g.add_argument("--ids", default="clustered", choices=["clustered", "random", "semantic"],
                   help="ID scheme of the IDB; semantic = hierarchical k-means over BoVW histograms, no labels")
    g.add_argument("--models", nargs="+", default=["dsi", "de", "bovw"], choices=["dsi", "de", "bovw"],
                   help="models to train and score; de = the dual-encoder baseline built from the DSI's encoder")
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
                   help="--add/--remove: allow --out to be the folder of an existing checkpoint.pt (also the "
                        "one being grown), which is then replaced")


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
    t0 = time.perf_counter()
    imageset = sources.load_dataset(a.dataset, data_root=a.data_root, coco_annotations=a.coco_annotations,
                                    image_size=a.image_size, aspect_range=tuple(a.aspect_range),
                                    db_size=db_size, seed=a.seed)
    log(f"data: {len(imageset.refs)} images of {len(imageset.class_names)} classes from '{a.dataset}' "
        f"({imageset.filtered} dropped by the aspect filter, {imageset.skipped} unreadable) "
        f"in {time.perf_counter() - t0:.1f} s")
    return imageset


# --------------------------------------------------------------------------------------------
# Checks: every flag, before any work
# --------------------------------------------------------------------------------------------

def check_args(a: argparse.Namespace) -> None:
    """Reject bad input before any work starts: one line naming the problem and the fix."""
    modes = [flag for flag in ("query", "add", "remove") if getattr(a, flag)]
    if modes and not a.checkpoint:
        raise UsageError(f"--{modes[0]} needs --checkpoint: pass the checkpoint.pt of a finished run")
    if a.checkpoint and len(modes) != 1:
        raise UsageError("--checkpoint needs one of --query IMAGE..., --add PATH... or --remove ID..."
                         + (f", not both --{modes[0]} and --{modes[1]}" if modes else ""))
    if a.checkpoint:
        check_checkpoint_args(a)
    else:
        check_training_args(a)


def check_checkpoint_args(a: argparse.Namespace) -> None:
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


def check_training_args(a: argparse.Namespace) -> None:
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
    check_ranges(a)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for but no CUDA device is visible: use --device cpu or auto")


def check_ranges(a: argparse.Namespace) -> None:
    """The numeric flags of a training run, each against its range."""
    for name in ("db_size", "depth", "dim", "mlp_dim", "heads", "bovw_k"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for name in ("index_dropout", "label_smoothing"):
        v = getattr(a, name)
        if v is not None and not 0.0 <= v < 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1), got {v}")
    for name in ("index_views", "index_mix", "min_epochs", "patience", "weight_decay", "warmup_epochs"):
        v = getattr(a, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")
    for name in ("lr", "batch_size", "index_epochs", "retrieval_epochs", "retrieval_lr",
                 "retrieval_targets", "beam"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if a.lr_floor is not None and not 0.0 <= a.lr_floor <= 1.0:
        raise UsageError(f"--lr-floor must lie in [0, 1], got {a.lr_floor}")
    if not 0.0 <= a.dropout < 1.0:
        raise UsageError(f"--dropout must lie in [0, 1), got {a.dropout}")
    if not 0.0 <= a.index_hold_out < 1.0:
        raise UsageError(f"--index-hold-out must lie in [0, 1), got {a.index_hold_out}")
    if not 0.0 < a.index_target_acc <= 1.0:
        raise UsageError(f"--index-target-acc must lie in (0, 1], got {a.index_target_acc}")


def check_out_folder(out: str) -> None:
    """The output folder must be creatable and writable; checked before any work, creating nothing."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):        # the deepest part of the path that already exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--out '{out}' cannot be a folder: '{existing}' is a file; pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out '{out}' is not writable (no write permission in '{existing}'); pass another --out")
