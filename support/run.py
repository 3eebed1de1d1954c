"""What one run shares: its state (`Cell`), its log, its seeds and device, and how a row of Table 1 is scored.

Every step of the experiment (train.py's `index`, `finetune`, `evaluate`, the BoVW baseline, the dual
encoder in de.py) reads the same `Cell`; `score_row` scores each of them with the same metric functions
on the same test queries (paper §3.1).
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import data
import metrics
from support.recipes import Recipe
from support.sources import ImageSet, printable
from vitdsi import IDTrie

RANK_DEPTH = 100  # longest ranked list we score: Recall@100 (paper §3.1)
IA_DEPTH = 5      # IA@1 and IA@5 (paper §3.2)


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


class TrainingDiverged(UsageError):
    """A training loss that is not finite (NaN or infinity): the run stops at once, one line, exit status 2,
    instead of going on to write weights and metrics that mean nothing."""


def set_seed(seed: int) -> None:
    """One seed for Python's random, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def os_error_line(e: OSError) -> str:
    """One line for a failed read or write (disk full, no permission, a read-only folder) and its fix."""
    where = f" '{printable(str(e.filename))}'" if e.filename else ""
    return f"cannot read or write{where}: {e.strerror or e}; free space, fix permissions or pass another --out"


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


class Clock:
    """Seconds of one training phase, counting those of earlier sessions of a resumed run, and its ETA."""

    def __init__(self, seconds_before: float = 0.0):
        self.start = time.perf_counter() - seconds_before
        self.lap_start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def lap(self) -> float:
        """Seconds since the last lap (one epoch); starts the next."""
        now = time.perf_counter()
        lap, self.lap_start = now - self.lap_start, now
        return lap

    def eta(self, epoch: int, epochs: int) -> str:
        """At most this long to go, if every remaining epoch takes the mean so far."""
        return fmt_seconds(self.seconds() / epoch * (epochs - epoch))


@dataclass
class Cell:
    """What the steps of one (db_size, ids) experiment share."""
    a: argparse.Namespace
    recipe: Recipe
    db_size: int
    ids: str                           # ID scheme: clustered, random or semantic
    imageset: ImageSet
    split: data.Split
    idb_ids: list[str]                 # ID of each IDB image, in IDB order
    trie: IDTrie                       # the valid IDs, for constrained decoding
    images: torch.Tensor               # (n, 3, S, S) uint8: every image of the run, decoded once
    device: torch.device
    bf16: bool                         # bfloat16 autocast, from the recipe's precision and the hardware
    gen: torch.Generator               # batch order of both phases
    log: Log
    curves: dict[str, list[float]] = field(default_factory=dict)
    saver: object = None               # support.resume.ResumeSaver: takes each completed epoch's state
    resumed: dict | None = None        # the saved state this run continues from, until its phase has used it
    finished: dict = field(default_factory=dict)   # results of finished steps: "bovw", "indexed", "zero_shot"
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # left out by --index-hold-out

    def relevant(self, positions: np.ndarray) -> list[set[str]]:
        """Relevant IDB IDs of the images at `positions` (same class; COCO: a shared category)."""
        idb_labels = [self.imageset.labels[i] for i in self.split.idb]
        return data.relevant_sets([self.imageset.labels[i] for i in positions], idb_labels, self.idb_ids)

    def subset(self, positions: np.ndarray) -> torch.Tensor:
        """The run's images at `positions`: (m, 3, S, S) uint8."""
        return self.images[torch.as_tensor(positions)]

    def id_lists(self, positions) -> list[list[str]]:
        """Ranked IDB positions (rows of a (B, k) array or tensor) -> ranked ID lists, for metrics.py."""
        return [[self.idb_ids[j] for j in row] for row in positions.tolist()]


def training_pairs(cell: Cell) -> tuple[torch.Tensor, list[list[int]], int]:
    """What the retrieval phase trains on (the DSI's, and the dual encoder's): the training queries that
    have a relevant IDB image, then every IDB image. Returns their images (m, 3, S, S) uint8, each
    entry's relevant IDB positions (sorted; an IDB image's is its own) and the number of queries."""
    split = cell.split
    rel_train = cell.relevant(split.train)
    keep = [i for i, r in enumerate(rel_train) if r]
    images = cell.subset(np.concatenate([split.train[keep], split.idb]).astype(np.int64))
    position = {id_str: j for j, id_str in enumerate(cell.idb_ids)}
    lists = [[position[r] for r in sorted(rel_train[i])] for i in keep] + [[j] for j in range(len(split.idb))]
    return images, lists, len(keep)


def row_line(row: dict, keys: tuple[str, ...] = ("IA@1", "IA@5", "P@10", "MAP@10", "Recall@100")) -> str:
    """A row's metrics for the log; "-" for one that is not defined (no test query has a relevant IDB image)."""
    return "  ".join(f"{k} {'-' if row[k] is None else format(row[k], '.3f')}" for k in keys)


def score_row(cell: Cell, model_name: str, variant: str, rankings_db: list, rankings_q: list) -> dict:
    """One row of Table 1, every metric from metrics.py, for every model alike, on the same queries.
    Test queries with no relevant IDB image are left out of the retrieval metrics; the row says how many.
    The test rankings are kept for the run's sheet of retrieved images (retrievals.png)."""
    relevants = cell.relevant(cell.split.test)
    label = model_name.replace("ViT ", "") + ("" if variant == "-" else f" {variant}")   # "DSI zero-shot"
    cell.finished.setdefault("rankings", {})[label] = [list(r[:10]) for r in rankings_q]
    row = {"model": model_name, "variant": variant, "db_size": cell.db_size, "ids": cell.ids,
           "dataset": cell.a.dataset, "seed": cell.a.seed}
    row["IA@1"] = metrics.indexing_accuracy(rankings_db, cell.idb_ids, 1)
    row["IA@5"] = metrics.indexing_accuracy(rankings_db, cell.idb_ids, 5)
    row.update(metrics.retrieval_metrics(rankings_q, relevants))
    row["test_queries"], row["test_queries_scored"] = len(relevants), sum(1 for r in relevants if r)
    return row


# --------------------------------------------------------------------------------------------
# The retrieval phase's log lines and curves
# --------------------------------------------------------------------------------------------

def retrieval_plan(recipe: Recipe, n_q: int, n_mix: int, floor: float) -> str:
    """The log line that opens the retrieval phase: what it trains on, how long, and which epoch it keeps."""
    return (f"retrieval: {n_q} queries x {recipe.retrieval_targets} relevant IDs + {n_mix} IDB pairs per epoch, "
            f"lr {recipe.retrieval_lr:g}, "
            + (f"up to {recipe.retrieval_epochs} epochs (at least {recipe.min_epochs}, then patience {recipe.patience}"
               if recipe.patience else f"{recipe.retrieval_epochs} epochs (the whole schedule")
            + f", keeping the best validation {recipe.early_stop}"
            + (f" among epochs with IDB IA@1 >= {floor:.3f}" if recipe.keep_index else "")
            + f"), augment {'on' if recipe.augment else 'off'}, label smoothing {recipe.label_smoothing}")


def retrieval_line(epoch: int, epochs: int, loss: float, acc: float, v: dict, lr: float, clock: Clock) -> str:
    """One retrieval epoch's progress line (benchmark.py reads its "val MAP@10")."""
    return (f"retrieval epoch {epoch:3d}/{epochs}  loss {loss:.4f}  acc {acc:.3f}  "
            f"val loss {v['loss']:.4f}  val acc {v['acc']:.3f}  "
            + (f"val MAP@10 {v['map']:.3f}  " if "map" in v else "")
            + f"lr {lr:.2e}  {clock.lap():.2f} s/epoch  ETA <= {clock.eta(epoch, epochs)}")


def retrieval_end(recipe: Recipe, epoch: int, stopped: bool, kept: int, floor: float) -> str:
    """The log lines that close the retrieval phase: why it stopped, and which epoch it kept."""
    lines = [f"retrieval: validation {recipe.early_stop} has not improved for {recipe.patience} epochs; stopping"
             ] if stopped else []
    lines.append(f"retrieval: ran {epoch} epochs, kept epoch {kept} (best validation {recipe.early_stop})")
    if recipe.keep_index and kept == 0:
        lines.append(f"retrieval: no epoch kept IDB IA@1 >= {floor:.3f}; the zero-shot model stays")
    return "\n".join(lines)


def record_curves(curves: dict[str, list[float]], **values: float | None) -> None:
    """Append one epoch's values to the run's curves (paper Figures 1-3); a value None is not recorded."""
    for key, value in values.items():
        if value is not None:
            curves.setdefault(key, []).append(value)


def index_line(epoch: int, epochs: int, loss: float, acc: float, lr: float, clock: Clock, ia: float | None) -> str:
    """One indexing epoch's progress line; `ia`, the IA@1 by beam search, when it was checked."""
    return (f"index  epoch {epoch:4d}/{epochs}  loss {loss:.4f}  acc {acc:.3f}  lr {lr:.2e}  "
            f"{clock.lap():.2f} s/epoch  ETA <= {clock.eta(epoch, epochs)}"
            + (f"  IA@1 {ia:.3f}" if ia is not None else ""))
