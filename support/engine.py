"""The training engine: optimiser and schedule, the epoch loop, the no-grad loops, early stopping.

It knows the model by `encode`, `decode` and `generate` (and, for an encoder with a frozen bottom, its
`encoder.until` / `encoder.after`), and is shared by every phase that trains one: train.py's indexing and
retrieval phases, de.py's dual encoder and grow.py's additions.

    trainer = make_trainer(model, recipe, recipe.lr, steps_per_epoch, recipe.index_epochs, device)
    loss, acc, clean_acc = run_epoch(trainer, pool, epoch_order(n, 0, n, gen), recipe.batch_size)
"""
from __future__ import annotations

import math
from collections.abc import Callable
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import data
from support.recipes import Recipe
from support.run import TrainingDiverged, fmt_seconds


# --------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule: the one place that builds them
# --------------------------------------------------------------------------------------------

def half_cosine(t: float, top: float, floor: float) -> float:
    """A half cosine from `top` at t = 0 down to `floor` at t = 1 (Loshchilov & Hutter 2017's annealing)."""
    return floor + (top - floor) * 0.5 * (1 + math.cos(math.pi * t))


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


def make_optimizer(model: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)


def optimizer_and_schedule(model: torch.nn.Module, recipe: Recipe, lr: float, steps_per_epoch: int, epochs: int,
                           schedule: Callable[[int], float] | None = None,
                           ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The recipe's optimiser at peak `lr`, and its schedule over `epochs` epochs of `steps_per_epoch` steps
    (or `schedule`, a multiplier of the peak lr per step, where a phase needs its own)."""
    optimizer = make_optimizer(model, recipe, lr)
    schedule = schedule or lr_lambda(recipe, steps_per_epoch, epochs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# --------------------------------------------------------------------------------------------
# What a phase trains on, and in which order
# --------------------------------------------------------------------------------------------

def spread(count: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """`count` indices into range(n), each used at most once more than any other, in random order."""
    rounds = [torch.randperm(n, generator=gen) for _ in range(-(-count // n))]
    return torch.cat(rounds)[:count] if rounds else torch.empty(0, dtype=torch.long)


def epoch_order(n_each: int, n_spread: int, n_pool: int, gen: torch.Generator) -> torch.Tensor:
    """One epoch's order over a pool: entries 0..n_each-1 once each, plus `n_spread` entries of the next
    `n_pool` (`spread` evenly over them), all shuffled."""
    order = torch.cat([torch.arange(n_each), n_each + spread(n_spread, n_pool, gen)])
    return order[torch.randperm(len(order), generator=gen)]


@dataclass
class Pool:
    """What a training phase draws its samples from: images, their targets, and which are shown augmented."""
    images: torch.Tensor                                   # (n, 3, S, S) uint8
    targets: Callable[[torch.Tensor], torch.Tensor]        # pool indices (B,) -> target tokens (B, G, L)
    augmented: torch.Tensor                                # (n,) bool: shown as a random view, not as is
    frozen: int = 0                                        # encoder blocks at the bottom not trained (grow.py) ...
    cached: torch.Tensor | None = None                     # ... and their output (n, N, D), encoder.until(image, frozen)


# --------------------------------------------------------------------------------------------
# The training step and epoch
# --------------------------------------------------------------------------------------------

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


def encode_batch(model, pool: Pool, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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
            h[views] = model.encoder.until(x[views], pool.frozen).to(h.dtype)   # the cache's dtype (bf16 or not)
    return model.encoder.after(h, pool.frozen)


@dataclass
class Trainer:
    """The optimisation state one phase steps: model, optimiser, lr schedule, and how a step is run."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    bf16: bool = False
    smoothing: float = 0.0
    augment_gen: torch.Generator = field(default_factory=torch.Generator)


def make_trainer(model: torch.nn.Module, recipe: Recipe, lr: float, steps_per_epoch: int, epochs: int,
                 device: torch.device, bf16: bool = False, smoothing: float = 0.0, augment_seed: int = 0,
                 schedule: Callable[[int], float] | None = None) -> Trainer:
    """A phase's trainer: the recipe's optimiser and schedule, and its own generator of augmentations."""
    optimizer, scheduler = optimizer_and_schedule(model, recipe, lr, steps_per_epoch, epochs, schedule)
    return Trainer(model, optimizer, scheduler, device, bf16, smoothing,
                   augment_gen=torch.Generator().manual_seed(augment_seed))


def step(trainer: Trainer, loss: torch.Tensor) -> None:
    """One optimiser step on `loss`, and one step of the lr schedule."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    trainer.scheduler.step()


LR_FLAGS = {"indexing": "--lr", "retrieval": "--retrieval-lr", "addition": "--add-lr"}   # what a diverged phase lowers


def run_epoch(trainer: Trainer, pool: Pool, order: torch.Tensor, batch_size: int, *, phase: str = "training",
              epoch: int | None = None) -> tuple[float, float, float]:
    """One pass over `order` (indices into the pool), one optimiser step per batch.

    Each image gets G target IDs that share one encoder pass (the decoder reads the same patches G
    times). Returns the mean loss, the exact-match accuracy over all samples (any of the G targets),
    and over the un-augmented ones. A step whose loss is not finite raises TrainingDiverged, its line
    naming `phase` and `epoch` (the caller's words for where it is), at once: nothing after it means anything.
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
        value = loss.item()
        if not math.isfinite(value):   # before the step: weights that a NaN has reached are never kept
            where = f"the {phase} phase" + ("" if epoch is None else f" at epoch {epoch}")
            flag = LR_FLAGS.get(phase, "--lr / --retrieval-lr")
            raise TrainingDiverged(f"training diverged in {where}: the loss is {value}; lower the learning rate "
                                   f"({flag})")
        step(trainer, loss)
        hit = hit.view(B, G).any(dim=1).cpu()                               # (B,)
        total_loss += value * B
        total_hit += int(hit.sum())
        seen += B
        clean_hit += int(hit[~views].sum())
        clean_seen += int((~views).sum())
    return total_loss / seen, total_hit / seen, clean_hit / max(1, clean_seen)


# --------------------------------------------------------------------------------------------
# The no-grad loops: validation loss, ranking by beam search, embedding
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def in_batches(images: torch.Tensor, batch_size: int, device: torch.device, fn: Callable[[torch.Tensor, slice], object],
               bf16: bool = False, progress: Callable[[int], None] | None = None) -> list:
    """fn(x, rows) for each batch x = normalize(images[rows]) on `device`, autograd off (the caller puts the model
    in eval mode, dropout off), under bf16 autocast when asked; the list of what it returns. `progress(done)`
    after each batch."""
    out = []
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        x = data.normalize(images[rows].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(fn(x, rows))
        if progress:
            progress(min(start + batch_size, len(images)))
    return out


def eval_loss(model, images: torch.Tensor, targets: torch.Tensor, batch_size: int,
              device: torch.device, bf16: bool) -> tuple[float, float]:
    """Teacher-forced loss and exact-match accuracy (any of the G targets), dropout off.
    images (n, 3, S, S) uint8; targets (n, G, L): G target IDs per image."""
    model.eval()

    def batch(x: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        y = targets[rows].to(device)                                        # (B, G, L)
        return model.decode(model.encode(x), y.flatten(0, 1)[:, :-1]), y

    total_loss, total_hit = 0.0, 0
    for logits, y in in_batches(images, batch_size, device, batch, bf16):
        loss, hit = seq_loss(logits, y.flatten(0, 1))
        total_loss += loss.item() * len(y)
        total_hit += int(hit.view(len(y), -1).any(dim=1).sum())
    return total_loss / len(images), total_hit / len(images)


def rank_dsi(model, images: torch.Tensor, trie, k: int, beam: int | None, device: torch.device,
             batch_size: int = 64, log: Callable[[str], None] | None = None, what: str = "") -> tuple[list, float]:
    """Ranked ID lists (best first) for every image, by constrained beam search; and ms per query."""
    model.eval()
    t0 = time.perf_counter()

    def progress(done: int) -> None:
        if log and len(images) > batch_size:
            eta = (time.perf_counter() - t0) / done * (len(images) - done)
            log(f"  ranking {what}: {done}/{len(images)} images, ETA {fmt_seconds(eta)}")

    batches = in_batches(images, batch_size, device,
                         lambda x, rows: [[i for i, _ in hyps] for hyps in model.generate(x, trie, k=k, beam=beam)],
                         progress=progress)
    return [r for b in batches for r in b], 1000 * (time.perf_counter() - t0) / max(1, len(images))


# --------------------------------------------------------------------------------------------
# Keeping the best epoch
# --------------------------------------------------------------------------------------------

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

    def keep(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take a copy of the weights and optimiser state as they are now, as the ones to restore."""
        self.best_state = {"model": clone_state(model.state_dict()), "optimizer": clone_state(optimizer.state_dict())}

    def step(self, epoch: int, score: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Record epoch's validation score (higher is better); True = stop now."""
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad = score, epoch, 0
            self.keep(model, optimizer)
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
