"""train.py: the whole experiment of the paper, in one script.

Di Stefano, "Vision Transformer Memory as a Differentiable Search Index for Image Retrieval", §3:
  1. draw `--db-size` images, index 25% of them (the IDB) and keep the rest as queries (data.py);
  2. BoVW baseline: SIFT vocabulary from the IDB, cosine ranking of the test queries (bovw.py);
  3. indexing phase: teach the ViT DSI to write each IDB image's own ID, until the training
     IA@1 reaches `--index-target-acc` (vitdsi.py)          -> the "zero-shot" row;
  4. retrieval phase: query image -> IDs of relevant IDB images, early stopping on validation loss
     (paper) or validation MAP@10 (fast recipe)               -> the "fine-tuned" row;
  5. score every row with the same functions on the same test queries (metrics.py) and write
     results.json, results.md, curves.png, checkpoint.pt and train.log to `--out`.

Usage:
    python train.py --db-size 512 --ids clustered                 # built-in data, no download
    python train.py --dataset imagenet --data-root DIR --db-size 512
    python train.py --sweep                                       # the paper's Table 1 grid
    python train.py --checkpoint runs/.../checkpoint.pt --query a.jpg b.png --top-k 10
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
from dataclasses import asdict, dataclass, fields, replace
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import bovw
import data
import metrics
from vitdsi import IDTrie, ViTDSI, ViTDSIConfig, set_dropout

RANK_DEPTH = 100  # longest ranked list we score: Recall@100 (paper §3.1)
IA_DEPTH = 5      # IA@1 and IA@5 (paper §3.2)


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Training recipes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How the model is optimised. `paper` is the paper's §3.2 recipe; `fast` is ours (README)."""
    optimizer: str           # "adam" (paper) or "adamw" (decoupled weight decay)
    lr: float                # peak learning rate
    weight_decay: float      # AdamW only
    batch_size: int          # images per step
    warmup_epochs: float     # linear warm-up length; 0 = none
    schedule: str            # "constant" (paper) or "cosine" (decay to lr_floor over the epoch cap)
    lr_floor: float          # cosine floor as a fraction of lr
    bf16: bool               # bfloat16 autocast (CPU bf16 matmuls are ~1.8x fp32 on this class of machine)
    index_epochs: int        # indexing epoch cap (paper: 750-1000 epochs)
    retrieval_epochs: int    # retrieval epoch cap (paper: 75, early stopping on validation loss)
    retrieval_lr: float      # peak learning rate of the retrieval phase
    patience: int            # retrieval epochs without a better validation score before stopping
    early_stop: str          # validation score: "loss" (paper, teacher-forced) or "map" (MAP@10 by beam search)
    index_dropout: float | None  # dropout while memorising the index (None = the model's --dropout)
    index_views: float       # indexing: augmented views per IDB image per epoch, as pseudo-queries
    index_mix: float         # retrieval phase: IDB (image -> own ID) pairs per query pair (Tay et al. §4.4)
    augment: bool            # retrieval phase: random crops/flips/jitter of the query images
    label_smoothing: float   # retrieval phase: cross-entropy label smoothing
    retrieval_targets: int   # retrieval phase: relevant IDs drawn per query per step (one encoder pass)
    rdrop: float             # retrieval phase: weight of R-Drop consistency between two dropout passes


RECIPES = {
    "paper": Recipe(optimizer="adam", lr=5e-4, weight_decay=0.0, batch_size=32, warmup_epochs=0,
                    schedule="constant", lr_floor=1.0, bf16=False, index_epochs=1000,
                    retrieval_epochs=75, retrieval_lr=5e-4, patience=10, early_stop="loss",
                    index_dropout=None, index_views=0.0, index_mix=0.0, augment=False, label_smoothing=0.0,
                    retrieval_targets=1, rdrop=0.0),
    "fast": Recipe(optimizer="adamw", lr=2e-3, weight_decay=0.01, batch_size=32, warmup_epochs=3,
                   schedule="cosine", lr_floor=0.05, bf16=True, index_epochs=150,
                   retrieval_epochs=25, retrieval_lr=5e-4, patience=3, early_stop="map",
                   index_dropout=0.0, index_views=0.0, index_mix=1.0, augment=True, label_smoothing=0.1,
                   retrieval_targets=8, rdrop=0.0),
}

# Random IDs share no prefix within a class, so the retrieval phase has to teach the decoder which of the
# arbitrary IDs belong to a query's class: slow to learn, and validation MAP@10 only takes off after some
# 30 epochs. The fast recipe therefore gives them a longer, faster retrieval phase with more targets per
# query, run to its cap (README, "Random IDs"); flags still override each field.
FAST_RANDOM_IDS = {"retrieval_lr": 2e-3, "retrieval_epochs": 100, "patience": 100, "retrieval_targets": 16}


# --------------------------------------------------------------------------------------------
# Small utilities: seeding, logging, timing
# --------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """One seed for Python's random, numpy and torch (STYLE rule 9)."""
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help text already explains a default of None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="ViT as a Differentiable Search Index (DSI) vs a BoVW baseline: index, fine-tune, evaluate.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data (paper §2.1)")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", "synthetic-multilabel", "imagenet", "coco"],
                   help="image source; synthetic is built in (no files)")
    g.add_argument("--data-root", help="imagenet: ImageFolder root DIR/<class>/<image>; coco: the images folder")
    g.add_argument("--coco-annotations", nargs="+", metavar="JSON",
                   help="coco: official instances_*.json file(s); several are merged (e.g. train + val)")
    g.add_argument("--db-size", type=int, default=512, help="images drawn for the run (IDB + queries), paper Table 1")
    g.add_argument("--index-fraction", type=float, default=0.25, help="share of the drawn images that is indexed (IDB)")
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
    g = p.add_argument_group("training (paper §3.2)")
    g.add_argument("--recipe", default="fast", choices=sorted(RECIPES),
                   help="fast: AdamW, warm-up + cosine, bf16; paper: Adam 5e-4 constant, fp32 (README)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's; fast 2e-3, paper 5e-4)")
    g.add_argument("--batch-size", type=int, help="images per step (default: the recipe's, 32)")
    g.add_argument("--index-epochs", type=int, help="indexing epoch cap (default: the recipe's; fast 150, paper 1000)")
    g.add_argument("--index-dropout", type=float,
                   help="dropout while indexing (default: the recipe's; fast 0, paper = --dropout)")
    g.add_argument("--index-views", type=float,
                   help="indexing: augmented views per IDB image per epoch, labelled with its ID (default: the recipe's, 0)")
    g.add_argument("--index-target-acc", type=float, default=0.98, help="stop indexing at this training IA@1")
    g.add_argument("--retrieval-epochs", type=int,
                   help="retrieval epoch cap (default: the recipe's; fast 25, 100 for random IDs; paper 75)")
    g.add_argument("--retrieval-lr", type=float,
                   help="retrieval phase peak learning rate (default: the recipe's, 5e-4; fast 2e-3 for random IDs)")
    g.add_argument("--patience", type=int,
                   help="retrieval phase: epochs without a better validation score before stopping "
                        "(default: the recipe's; fast 3, 100 for random IDs; paper 10)")
    g.add_argument("--no-finetune", action="store_true", help="skip the retrieval phase (zero-shot row only)")
    g.add_argument("--index-mix", type=float,
                   help="retrieval phase: IDB pairs mixed in per query pair, against forgetting (default: the recipe's)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="retrieval phase: augmented views of the query images (default: the recipe's)")
    g.add_argument("--label-smoothing", type=float, help="retrieval phase label smoothing (default: the recipe's)")
    g.add_argument("--retrieval-targets", type=int,
                   help="retrieval phase: relevant IDs trained per query per step, sharing one encoder pass "
                        "(default: the recipe's; fast 8, 16 for random IDs; paper 1)")
    g.add_argument("--early-stop", choices=["loss", "map"],
                   help="retrieval phase: keep the epoch with the best validation loss (paper) or validation MAP@10 "
                        "by beam search (default: the recipe's; fast map, paper loss)")
    g.add_argument("--rdrop", type=float,
                   help="retrieval phase: R-Drop weight, KL between two dropout passes (default: the recipe's, 0 = off)")
    g.add_argument("--models", nargs="+", default=["dsi", "bovw"], choices=["dsi", "bovw"], help="models to train and score")
    g.add_argument("--bovw-k", type=int, default=200, help="BoVW vocabulary size K (paper: 200)")
    g.add_argument("--beam", type=int, help="beam width of the decoder (default: the list length asked for)")
    g.add_argument("--seed", type=int, default=0, help="seed of data draw, IDs, initialisation and batches")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when present")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = one per core")
    g.add_argument("--out", help="output folder (default: runs/<dataset>-<db_size>-<ids>-s<seed>)")
    g.add_argument("--sweep", action="store_true", help="run the paper's Table 1 grid: --sweep-sizes x --sweep-ids")
    g.add_argument("--sweep-sizes", type=int, nargs="+", default=[512, 1024, 2048], help="db sizes of --sweep")
    g.add_argument("--sweep-ids", nargs="+", default=["clustered", "random"], choices=["clustered", "random", "semantic"],
                   help="ID schemes of --sweep")
    g.add_argument("--quiet", action="store_true", help="print only the final table (the log file gets everything)")
    g = p.add_argument_group("query mode")
    g.add_argument("--checkpoint", help="checkpoint.pt of a finished run: answer --query images with it")
    g.add_argument("--query", nargs="+", metavar="IMAGE", help="image files to look up in the checkpoint's index")
    g.add_argument("--top-k", type=int, default=10, help="IDs printed per query image")
    return p


def check_args(a: argparse.Namespace) -> None:
    """Reject bad input before any work starts (SPEC "Behaviour")."""
    if a.query and not a.checkpoint:
        raise UsageError("--query needs --checkpoint: pass the checkpoint.pt of a finished run")
    if a.checkpoint and not a.query:
        raise UsageError("--checkpoint needs --query IMAGE [IMAGE ...]: the images to look up")
    if a.checkpoint:
        if a.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {a.top_k}")
        return
    check_out_folder(a.out or default_out(a))
    if a.dataset in ("imagenet", "coco") and not a.data_root:
        raise UsageError(f"--dataset {a.dataset} needs --data-root DIR (see README, 'Your own data')")
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
    if a.index_dropout is not None and not 0.0 <= a.index_dropout < 1.0:
        raise UsageError(f"--index-dropout must lie in [0, 1), got {a.index_dropout}")
    if a.index_views is not None and a.index_views < 0:
        raise UsageError(f"--index-views must be 0 or more, got {a.index_views}")
    if a.index_mix is not None and a.index_mix < 0:
        raise UsageError(f"--index-mix must be 0 or more, got {a.index_mix}")
    if a.label_smoothing is not None and not 0.0 <= a.label_smoothing < 1.0:
        raise UsageError(f"--label-smoothing must lie in [0, 1), got {a.label_smoothing}")
    if a.rdrop is not None and a.rdrop < 0:
        raise UsageError(f"--rdrop must be 0 or more, got {a.rdrop}")
    for name in ("lr", "batch_size", "index_epochs", "retrieval_epochs", "retrieval_lr", "patience",
                 "retrieval_targets", "beam"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if not 0.0 <= a.dropout < 1.0:
        raise UsageError(f"--dropout must lie in [0, 1), got {a.dropout}")
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


def recipe_from_args(a: argparse.Namespace, ids_scheme: str) -> Recipe:
    """The recipe a run of `ids_scheme` trains with: --recipe, then FAST_RANDOM_IDS, then the flags."""
    r = RECIPES[a.recipe]
    if a.recipe == "fast" and ids_scheme == "random":
        r = replace(r, **FAST_RANDOM_IDS)
    over = {"lr": a.lr, "batch_size": a.batch_size, "index_epochs": a.index_epochs,
            "retrieval_epochs": a.retrieval_epochs, "retrieval_lr": a.retrieval_lr, "patience": a.patience,
            "index_dropout": a.index_dropout,
            "index_views": a.index_views, "index_mix": a.index_mix, "augment": a.augment,
            "label_smoothing": a.label_smoothing, "retrieval_targets": a.retrieval_targets, "rdrop": a.rdrop,
            "early_stop": a.early_stop}
    return replace(r, **{k: v for k, v in over.items() if v is not None})


def model_config(a: argparse.Namespace, max_len: int) -> ViTDSIConfig:
    return ViTDSIConfig(image_size=a.image_size, patch_size=a.patch_size, dim=a.dim, mlp_dim=a.mlp_dim,
                        depth=a.depth, heads=a.heads, dropout=a.dropout, pos_encoding=a.pos_encoding,
                        max_len=max_len)


# --------------------------------------------------------------------------------------------
# Training loop pieces (the trainer knows nothing about the model beyond forward and generate)
# --------------------------------------------------------------------------------------------

def lr_lambda(recipe: Recipe, steps_per_epoch: int, epochs: int):
    """Multiplier of the peak lr at optimiser step s: linear warm-up, then constant or cosine decay."""
    warm = int(recipe.warmup_epochs * steps_per_epoch)
    total = max(1, epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if recipe.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        return recipe.lr_floor + (1 - recipe.lr_floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def make_optimizer(model: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)


def seq_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy and per-sample exact match.

    logits (B, L-1, V) predict targets[:, 1:]; a sample counts as correct when every non-PAD token is
    the argmax, which is exactly when greedy decoding writes the target ID.
    """
    gold = targets[:, 1:]                                                   # (B, L-1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),    # (B*(L-1), V)
                           gold.reshape(-1), ignore_index=data.PAD, label_smoothing=smoothing)
    hit = (logits.argmax(-1) == gold) | (gold == data.PAD)                  # (B, L-1)
    return loss, hit.all(dim=1)


def rdrop_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """R-Drop (Liang et al. 2021, used by NCI): symmetric KL between the token distributions of two
    forward passes that differ only in their dropout masks, averaged over the non-PAD target positions.
    logits_a, logits_b (B, L-1, V); targets (B, L)."""
    keep = targets[:, 1:] != data.PAD                                       # (B, L-1)
    log_a, log_b = logits_a.float().log_softmax(-1), logits_b.float().log_softmax(-1)   # (B, L-1, V)
    kl_ab = (log_a.exp() * (log_a - log_b)).sum(-1)                         # KL(a || b) per position
    kl_ba = (log_b.exp() * (log_b - log_a)).sum(-1)                         # KL(b || a)
    return (0.5 * (kl_ab + kl_ba))[keep].mean()


def spread(count: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """`count` indices into range(n), each used at most once more than any other, in random order."""
    rounds = [torch.randperm(n, generator=gen) for _ in range(-(-count // n))]
    return torch.cat(rounds)[:count] if rounds else torch.empty(0, dtype=torch.long)


def run_epoch(model, optimizer, scheduler, images, targets, order, batch_size, device, bf16,
              choose_targets=None, augment_gen=None, augmented=None, smoothing=0.0,
              rdrop=0.0) -> tuple[float, float, float]:
    """One pass over `order` (indices into images).

    images: (n, 3, S, S) uint8 tensor; targets: (n, L) long, or choose_targets(batch_idx) -> (B, G, L),
    G target IDs per image that share one encoder pass (the decoder reads the same patches G times).
    augment_gen: a torch.Generator to draw augmented views with; augmented: (n,) bool, which pool
    entries are shown as a random view rather than as they are (None = none).
    rdrop: weight of the R-Drop consistency term; > 0 runs every image twice, under two dropout masks.
    Returns mean loss, exact-match accuracy over all samples (any of its G targets), and over the
    un-augmented ones.
    """
    model.train()
    passes = 2 if rdrop > 0 else 1
    total_loss, total_hit, seen, clean_hit, clean_seen = 0.0, 0, 0, 0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = data.normalize(images[idx].to(device))                        # (B, 3, S, S)
        views = augmented[idx] if augmented is not None else torch.zeros(len(idx), dtype=torch.bool)  # (B,)
        if views.any():
            on = views.to(x.device)
            x[on] = data.augment(x[on], augment_gen)
        y = targets[idx].unsqueeze(1) if choose_targets is None else choose_targets(idx)  # (B, G, L)
        B, G = y.shape[:2]
        if passes == 2:   # R-Drop: the same views twice in one batch; dropout masks each copy differently
            x, y = torch.cat([x, x]), torch.cat([y, y])                    # (2B, 3, S, S), (2B, G, L)
        y = y.flatten(0, 1).to(device)                                     # (P*B*G, L), P = passes
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model.decode(model.encode(x), y[:, :-1])              # (P*B*G, L-1, V)
        loss, hit = seq_loss(logits, y, smoothing)
        if passes == 2:
            loss = loss + rdrop * rdrop_loss(*logits.chunk(2), y[:B * G])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        hit = hit[:B * G].view(B, G).any(dim=1)                             # (B,) first pass
        total_loss += loss.item() * B
        total_hit += int(hit.sum())
        seen += B
        clean_hit += int(hit[~views.to(hit.device)].sum())
        clean_seen += int((~views).sum())
    return total_loss / seen, total_hit / seen, clean_hit / max(1, clean_seen)


@torch.no_grad()
def eval_loss(model, images, targets, batch_size, device, bf16) -> tuple[float, float]:
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
def rank_dsi(model, images, trie, k, beam, device, batch_size=64, log=None, what="") -> tuple[list, float]:
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


def score_row(model_name, variant, rankings_db, idb_ids, rankings_q, relevants, common) -> dict:
    """One row of Table 1, every metric from metrics.py, for BoVW and the DSI alike (STYLE rule 11)."""
    row = {"model": model_name, "variant": variant, **common}
    row["IA@1"] = metrics.indexing_accuracy(rankings_db, idb_ids, 1)
    row["IA@5"] = metrics.indexing_accuracy(rankings_db, idb_ids, 5)
    row.update(metrics.retrieval_metrics(rankings_q, relevants))
    return row


# --------------------------------------------------------------------------------------------
# One experiment: data -> BoVW -> indexing -> zero-shot -> retrieval -> fine-tuned
# --------------------------------------------------------------------------------------------

def load_images(a: argparse.Namespace, db_size: int, log: Log) -> data.ImageSet:
    t0 = time.perf_counter()
    imageset = data.load_dataset(a.dataset, data_root=a.data_root, coco_annotations=a.coco_annotations,
                                 image_size=a.image_size, aspect_range=tuple(a.aspect_range),
                                 db_size=db_size, seed=a.seed)
    log(f"data: {len(imageset.refs)} images of {len(imageset.class_names)} classes from '{a.dataset}' "
        f"({imageset.filtered} dropped by the aspect filter, {imageset.skipped} unreadable) "
        f"in {time.perf_counter() - t0:.1f} s")
    return imageset


def run_experiment(a: argparse.Namespace, imageset: data.ImageSet, db_size: int, ids_scheme: str,
                   out: str, log: Log, with_bovw: bool = True) -> list[dict]:
    """Train and score the requested models on one (db_size, ids) cell. Returns the rows."""
    set_seed(a.seed)
    recipe = recipe_from_args(a, ids_scheme)
    device = pick_device(a.device)
    split = data.split_dataset(imageset, db_size, a.index_fraction, seed=a.seed)
    index, fit_s = None, 0.0
    if ids_scheme == "semantic":
        # Tay et al. §3.2: IDs from hierarchical k-means over features made without labels, here the
        # IDB's own BoVW histograms, so that similar-looking images share ID prefixes.
        t0 = time.perf_counter()
        index = bovw.BoVWIndex(k=a.bovw_k, seed=a.seed).fit(imageset.images[split.idb])
        fit_s = time.perf_counter() - t0
        idb_ids = bovw.hierarchical_ids(index.database, np.random.default_rng(a.seed))
        log(f"semantic IDs: hierarchical k-means over BoVW histograms in {time.perf_counter() - t0:.1f} s, "
            f"lengths {min(map(len, idb_ids))}-{max(map(len, idb_ids))} digits")
    else:
        idb_ids = data.assign_ids(imageset.primary[split.idb], ids_scheme, seed=a.seed)
    idb_labels = [imageset.labels[i] for i in split.idb]
    test_rel = data.relevant_sets([imageset.labels[i] for i in split.test], idb_labels, idb_ids)
    log(f"split: IDB {len(split.idb)}, queries train {len(split.train)} / val {len(split.val)} / "
        f"test {len(split.test)}; ids {ids_scheme} (up to {max(map(len, idb_ids))} digits)")
    common = {"db_size": db_size, "ids": ids_scheme, "dataset": a.dataset, "seed": a.seed}
    rows, curves = [], {}

    if "bovw" in a.models and with_bovw:
        if index is None:
            t0 = time.perf_counter()
            index = bovw.BoVWIndex(k=a.bovw_k, seed=a.seed).fit(imageset.images[split.idb])
            fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pos, _ = index.query(imageset.images[split.test], top_k=RANK_DEPTH)
        q_ms = 1000 * (time.perf_counter() - t0) / max(1, len(split.test))
        db_pos, _ = index.query(imageset.images[split.idb], top_k=IA_DEPTH)
        as_ids = lambda p: [[idb_ids[j] for j in r] for r in p]  # noqa: E731 (IDB position -> ID)
        row = score_row("BoVW", "-", as_ids(db_pos), idb_ids, as_ids(pos), test_rel, common)
        row.update(train_seconds=round(fit_s, 2), query_ms=round(q_ms, 2))
        rows.append(row)
        log(f"BoVW: vocabulary of {index.n_words} words + index in {fit_s:.1f} s, {q_ms:.1f} ms/query; "
            f"P@10 {row['P@10']:.3f}  MAP@10 {row['MAP@10']:.3f}  Recall@100 {row['Recall@100']:.3f}")

    if "dsi" not in a.models:
        return rows

    images = data.images_to_tensor(imageset.images)                           # (n, 3, S, S) uint8, once
    targets_idb = data.ids_to_tensor(idb_ids)                                  # (n_idb, L)
    trie = IDTrie(idb_ids)
    config = model_config(a, max_len=targets_idb.shape[1])
    model = ViTDSI(config).to(device)
    log(f"ViT DSI: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{(a.image_size // a.patch_size) ** 2} patches, recipe '{a.recipe}' ({'bf16' if recipe.bf16 else 'fp32'}), "
        f"device {device.type}")
    gen = torch.Generator().manual_seed(a.seed)
    idb_images = images[torch.as_tensor(split.idb)]
    beam = a.beam

    # ---- indexing phase (paper §3.2): every IDB image -> its own ID, deliberately overfit ----
    optimizer = make_optimizer(model, recipe, recipe.lr)
    if recipe.index_dropout is not None:
        set_dropout(model, recipe.index_dropout)
    # Pseudo-queries (the image analogue of DSI-QG): with --index-views V, each epoch also shows
    # V augmented views per IDB image, labelled with that image's own ID. Pool = clean IDB, then views.
    n_idb = len(split.idb)
    n_views = round(recipe.index_views * n_idb)
    pool_images = torch.cat([idb_images, idb_images]) if n_views else idb_images
    pool_targets = torch.cat([targets_idb, targets_idb]) if n_views else targets_idb
    pool_views = torch.arange(len(pool_images)) >= n_idb                      # (pool,) bool
    view_gen = torch.Generator().manual_seed(a.seed + 2)
    steps = math.ceil((n_idb + n_views) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps, recipe.index_epochs))
    curves["index_loss"], curves["index_acc"] = [], []
    t_index = time.perf_counter()
    train_ia = 0.0
    for epoch in range(1, recipe.index_epochs + 1):
        t0 = time.perf_counter()
        order = torch.cat([torch.arange(n_idb), n_idb + spread(n_views, n_idb, gen)])
        order = order[torch.randperm(len(order), generator=gen)]
        loss, _, acc = run_epoch(model, optimizer, scheduler, pool_images, pool_targets, order,
                                 recipe.batch_size, device, recipe.bf16, augment_gen=view_gen, augmented=pool_views)
        # Exact match under teacher forcing is free; only when it passes the target do we pay for
        # the real check: IA@1 by beam search with dropout off.
        if acc >= a.index_target_acc or epoch == recipe.index_epochs:
            ranked, _ = rank_dsi(model, idb_images, trie, 1, beam, device)
            train_ia = metrics.indexing_accuracy(ranked, idb_ids, 1)
        curves["index_loss"].append(loss)
        curves["index_acc"].append(acc)
        dt = time.perf_counter() - t0
        elapsed = time.perf_counter() - t_index
        eta = elapsed / epoch * (recipe.index_epochs - epoch)
        log(f"index  epoch {epoch:4d}/{recipe.index_epochs}  loss {loss:.4f}  acc {acc:.3f}  "
            f"lr {scheduler.get_last_lr()[0]:.2e}  {dt:.2f} s/epoch  ETA <= {fmt_seconds(eta)}"
            + (f"  IA@1 {train_ia:.3f}" if acc >= a.index_target_acc else ""))
        if train_ia >= a.index_target_acc:
            break
    index_s = time.perf_counter() - t_index
    set_dropout(model, config.dropout)
    log(f"indexing: {epoch} epochs in {fmt_seconds(index_s)} ({len(split.idb) * epoch / index_s:.1f} images/s), "
        f"training IA@1 {train_ia:.3f}")

    def evaluate(variant: str, train_s: float) -> dict:
        db_rank, _ = rank_dsi(model, idb_images, trie, IA_DEPTH, beam, device, log=log, what="IDB")
        q_rank, q_ms = rank_dsi(model, images[torch.as_tensor(split.test)], trie, RANK_DEPTH, beam, device,
                                log=log, what="test queries")
        row = score_row("ViT DSI", variant, db_rank, idb_ids, q_rank, test_rel, common)
        row.update(train_seconds=round(train_s, 2), query_ms=round(q_ms, 2), index_epochs=epoch,
                   index_seconds_per_epoch=round(index_s / epoch, 3),
                   index_images_per_s=round(len(split.idb) * epoch / index_s, 1), retrieval_epochs=ret_epochs)
        log(f"ViT DSI {variant}: IA@1 {row['IA@1']:.3f}  IA@5 {row['IA@5']:.3f}  P@10 {row['P@10']:.3f}  "
            f"MAP@10 {row['MAP@10']:.3f}  Recall@100 {row['Recall@100']:.3f}  ({q_ms:.1f} ms/query)")
        return row

    ret_epochs = 0
    rows.append(evaluate("zero-shot", index_s))

    # ---- retrieval phase (paper §3.2): query image -> the ID of a relevant IDB image ----
    if not a.no_finetune:
        retrieval_s, ret_epochs, optimizer = finetune(a, recipe, model, images, split, imageset, idb_ids, trie,
                                                      device, gen, curves, log, optimizer)
        rows.append(evaluate("fine-tuned", index_s + retrieval_s))

    save_checkpoint(os.path.join(out, "checkpoint.pt"), model, optimizer, config, a, epoch, idb_ids,
                    [imageset.refs[i] for i in split.idb], ids_scheme, db_size)
    draw_curves(curves, os.path.join(out, "curves.png"), title=f"{a.dataset} db {db_size} ids {ids_scheme}")
    return rows


def finetune(a, recipe, model, images, split, imageset, idb_ids, trie, device, gen, curves, log, optimizer):
    """Retrieval phase: each training query is paired with relevant IDB images' IDs, drawn anew every
    epoch (so the model sees the whole relevant set); early stopping on the validation loss, or on the
    validation MAP@10 of the beam search's ranked lists (`--early-stop map`).
    Returns (seconds, epochs run, the optimizer that produced the final weights)."""
    idb_labels = [imageset.labels[i] for i in split.idb]
    rel_train = data.relevant_sets([imageset.labels[i] for i in split.train], idb_labels, idb_ids)
    rel_val = data.relevant_sets([imageset.labels[i] for i in split.val], idb_labels, idb_ids)
    keep_tr = [i for i, r in enumerate(rel_train) if r]                     # queries with a relevant IDB image
    keep_va = [i for i, r in enumerate(rel_val) if r]
    if not keep_tr or not keep_va:
        log("retrieval: no training or validation query has a relevant IDB image; skipping fine-tuning")
        return 0.0, 0, optimizer
    # Training pool: the queries, then the IDB images; an epoch takes every query and, with
    # --index-mix R, R IDB pairs (image -> own ID) per query, so the index is rehearsed, not forgotten.
    # Rehearsal pairs stay clean: the index must be recalled from the very images that were indexed.
    n_q, n_idb = len(keep_tr), len(split.idb)
    tr_images = images[torch.as_tensor(np.concatenate([split.train[keep_tr], split.idb]))]
    va_images = images[torch.as_tensor(split.val[keep_va])]
    # Relevant IDB positions of every pool entry, flattened: entry e may take any of
    # choices[offsets[e] : offsets[e] + counts[e]] (an IDB entry only its own position).
    position = {id_str: j for j, id_str in enumerate(idb_ids)}
    lists = [[position[r] for r in sorted(rel_train[i])] for i in keep_tr] + [[j] for j in range(len(idb_ids))]
    counts = torch.tensor([len(c) for c in lists])
    offsets = torch.cumsum(counts, 0) - counts
    choices = torch.tensor([j for c in lists for j in c])
    id_tokens = data.ids_to_tensor(idb_ids)                                    # (n_idb, L)
    n_mix = round(recipe.index_mix * n_q)
    rng = np.random.default_rng(a.seed)
    G = recipe.retrieval_targets
    # A fixed draw for validation (G relevant IDs per query), so its loss is comparable from epoch to epoch.
    va_ids = [sorted(rel_val[i])[j] for i in keep_va for j in rng.integers(len(rel_val[i]), size=G)]
    va_targets = data.ids_to_tensor(va_ids).view(len(keep_va), G, -1)           # (n_val, G, L)

    def draw_targets(batch_idx: torch.Tensor) -> torch.Tensor:
        """G uniformly drawn relevant IDs per pool entry (with replacement), as tokens (B, G, L);
        an IDB entry gets its own ID G times. Vectorised over the batch."""
        pick = torch.from_numpy(rng.integers(0, counts[batch_idx].numpy()[:, None], size=(len(batch_idx), G)))
        return id_tokens[choices[offsets[batch_idx].unsqueeze(1) + pick]]     # (B, G) positions -> (B, G, L)

    optimizer = make_optimizer(model, recipe, recipe.retrieval_lr)
    steps = math.ceil((n_q + n_mix) / recipe.batch_size)
    aug_gen = torch.Generator().manual_seed(a.seed + 1)
    query_views = (torch.arange(n_q + n_idb) < n_q) & recipe.augment            # (n_q + n_idb,) bool
    log(f"retrieval: {n_q} queries x {G} relevant IDs + {n_mix} IDB pairs per epoch, lr {recipe.retrieval_lr:g}, "
        f"up to {recipe.retrieval_epochs} epochs (patience {recipe.patience}), "
        f"augment {'on' if recipe.augment else 'off'}, label smoothing {recipe.label_smoothing}, R-Drop {recipe.rdrop}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps, recipe.retrieval_epochs))
    va_relevant = [rel_val[i] for i in keep_va]
    stop_on_map = recipe.early_stop == "map"
    best, best_state, bad = -float("inf"), None, 0                          # best = highest score so far
    for key in ("ret_train_loss", "ret_val_loss", "ret_train_acc", "ret_val_acc", "ret_val_map"):
        curves[key] = []
    t_start = time.perf_counter()
    for epoch in range(1, recipe.retrieval_epochs + 1):
        t0 = time.perf_counter()
        order = torch.cat([torch.arange(n_q), n_q + spread(n_mix, n_idb, gen)])
        order = order[torch.randperm(len(order), generator=gen)]
        loss, acc, _ = run_epoch(model, optimizer, scheduler, tr_images, None, order, recipe.batch_size,
                                 device, recipe.bf16, choose_targets=draw_targets, augment_gen=aug_gen,
                                 augmented=query_views, smoothing=recipe.label_smoothing, rdrop=recipe.rdrop)
        v_loss, v_acc = eval_loss(model, va_images, va_targets, 2 * recipe.batch_size, device, recipe.bf16)
        for key, v in zip(("ret_train_loss", "ret_val_loss", "ret_train_acc", "ret_val_acc"), (loss, v_loss, acc, v_acc)):
            curves[key].append(v)
        if stop_on_map:   # MAP@10 needs only the top 10 of each ranked list
            ranked, _ = rank_dsi(model, va_images, trie, 10, a.beam, device)
            v_map = metrics.mean_average_precision_at_k(ranked, va_relevant, 10)
            curves["ret_val_map"].append(v_map)
        score = v_map if stop_on_map else -v_loss                             # higher is better
        if score > best:
            best, bad = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        dt = time.perf_counter() - t0
        eta = (time.perf_counter() - t_start) / epoch * (recipe.retrieval_epochs - epoch)
        log(f"retrieval epoch {epoch:3d}/{recipe.retrieval_epochs}  loss {loss:.4f}  acc {acc:.3f}  "
            f"val loss {v_loss:.4f}  val acc {v_acc:.3f}  "
            + (f"val MAP@10 {v_map:.3f}  " if stop_on_map else "")
            + f"lr {scheduler.get_last_lr()[0]:.2e}  "
            f"{dt:.2f} s/epoch  ETA <= {fmt_seconds(eta)}")
        if bad >= recipe.patience:
            log(f"retrieval: validation {'MAP@10' if stop_on_map else 'loss'} has not improved for "
                f"{recipe.patience} epochs; stopping")
            break
    model.load_state_dict(best_state)
    return time.perf_counter() - t_start, epoch, optimizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("model", "config", "ids", "idb_refs")   # what query mode needs


def save_checkpoint(path, model, optimizer, config, a, epoch, idb_ids, idb_refs, ids_scheme, db_size) -> None:
    """One dict with everything needed to rebuild the model and answer queries.

    Only tensors and plain data (dict, list, tuple, str, int, float, bool, None), so that
    `torch.load(..., weights_only=True)` reads it back without running any code from the file."""
    ckpt = {"format_version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": asdict(config), "args": vars(a), "epoch": epoch, "seed": a.seed, "ids": idb_ids,
            "idb_refs": idb_refs, "ids_scheme": ids_scheme, "db_size": db_size, "aspect_range": list(a.aspect_range)}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def torch_load_error(e: Exception) -> str:
    """The line of a torch.load error that says what is wrong; the weights-only unpickler puts it
    after "WeightsUnpickler error:", below advice to load the file unsafely, which we never do."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". Please use")[0] if lines else type(e).__name__


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
    try:
        with warnings.catch_warnings():    # torch warns about foreign pickles; the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file torch cannot read safely, whatever it is: one line, exit 2
        raise UsageError(f"'{path}' is not a vit-dsi checkpoint (the safe loader refused it: {torch_load_error(e)}); "
                         f"{retrain}") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UsageError(f"'{path}' has no format_version: not a vit-dsi checkpoint, or one older than "
                         f"versioned checkpoints; {retrain}")
    if ckpt["format_version"] != CHECKPOINT_VERSION:
        raise UsageError(f"'{path}' is a checkpoint of format version {ckpt['format_version']}, this train.py "
                         f"reads version {CHECKPOINT_VERSION}; {retrain}")
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
    ids, refs = ckpt["ids"], ckpt["idb_refs"]
    if not (isinstance(ids, list) and isinstance(refs, list) and 0 < len(ids) == len(refs) == len(set(ids))
            and all(isinstance(i, str) and i.isdigit() for i in ids)):
        raise UsageError(f"'{path}' has a broken ID map (ids and idb_refs must be equally long lists of "
                         f"distinct digit strings); {retrain}")
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
    trie = IDTrie(ckpt["ids"])
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


def run(a: argparse.Namespace) -> int:
    check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.checkpoint:
        query_mode(a)
        return 0
    out = a.out or default_out(a)
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "train.log"), quiet=a.quiet)
    log(f"vit-dsi: {' '.join(sys.argv[1:]) or '(defaults)'} -> {out}")
    t_run = time.perf_counter()
    cells = [(n, s) for n in a.sweep_sizes for s in a.sweep_ids] if a.sweep else [(a.db_size, a.ids)]
    imageset = load_images(a, max(n for n, _ in cells), log)
    rows = []
    for n, scheme in cells:
        cell_out = os.path.join(out, f"{n}-{scheme}") if a.sweep else out
        os.makedirs(cell_out, exist_ok=True)
        log(f"== db-size {n}, ids {scheme} ==")
        # BoVW does not depend on the ID scheme: one row per db-size.
        rows += run_experiment(a, imageset, n, scheme, cell_out, log, with_bovw=(scheme == a.sweep_ids[0] or not a.sweep))
    header = (f"{a.dataset}, {'Table 1 sweep' if a.sweep else f'db-size {a.db_size}, ids {a.ids}'}, "
              f"seed {a.seed}, recipe {a.recipe}")
    # the recipe each ID scheme actually trained with (the fast recipe differs for random IDs)
    recipes = {scheme: asdict(recipe_from_args(a, scheme)) for scheme in (a.sweep_ids if a.sweep else [a.ids])}
    table = write_results(out, rows, header, {"args": vars(a), "recipes": recipes,
                                              "wall_seconds": round(time.perf_counter() - t_run, 1)})
    log(f"done in {fmt_seconds(time.perf_counter() - t_run)}; outputs in {out}")
    if a.quiet:
        print(table)
    else:
        log(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except (UsageError, data.DataError, bovw.BoVWError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
