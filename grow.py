"""grow.py: grow a trained index without retraining it, and hide IDs in it.

A DSI keeps its database in its weights, so adding an image means teaching the model one more ID, and
teaching it new IDs can make it forget old ones (the problem DSI++, Mehta et al. 2023, studies for text).
This chapter adds images with the indexing phase's own machinery (support/engine.py: `Pool`, `Trainer`,
`run_epoch`, the recipe's lr schedule and arithmetic) and measures what the old images lose:

  1. `new_ids`: each new image gets an ID that fits the scheme. random: the next free numbers, as long as
     they have the model's number of digits. clustered: the next counter value in its class's block (the
     counter has room for twice the largest class, data.assign_ids); the class is the ImageFolder folder
     name matched against the run's class names, and for a loose file or an unknown class it is the class
     prefix the model itself decodes for the image (its nearest cluster). semantic: the next free slot of
     the leaf cluster of the ID the model decodes for the image.
  2. `learn_additions`: train on the new images plus a replay sample of old IDB images (`--replay` per new
     image and at least `--replay-min` of the old index, `replay_count`, drawn anew each epoch), until the
     new and the old images' IA@1 by constrained beam search both reach `--index-target-acc`, or
     `--add-epochs` run out. Once the new images are learnt (after e epochs), the lr settles: it decays over
     `--settle` x e more epochs (`SettlingSchedule`), since the old IDs recover only when the steps get small.
     A beam-search check of every old image costs more than an epoch of a small addition, so it runs only
     when a cheap teacher-forced check of the new images and of 128 old ones passes.
  3. `add_to_index` reports the new images' IA@1 and the old ones' before and after, epochs and seconds.

`--remove` only takes IDs out of the trie: decoding can no longer write them; nothing is trained.
Removed IDs stay in the checkpoint (with their images) and are never given to another image.

    python train.py --checkpoint runs/X/checkpoint.pt --add new_photos/ extra.jpg   # -> runs/X-add/
    python train.py --checkpoint runs/X/checkpoint.pt --remove 0312 0407            # -> runs/X-remove/
"""

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import data
import metrics
from support import cli, engine, sources, store
from support.recipes import Recipe
from support.run import Log, UsageError, fmt_seconds, pick_device, use_bf16
from vitdsi import IDTrie, ViTDSI, set_dropout


# --------------------------------------------------------------------------------------------
# What to add, and the IDs it gets
# --------------------------------------------------------------------------------------------

@dataclass
class Additions:
    """Images to add to an index, in the order they get their IDs."""
    images: np.ndarray          # (n, S, S, 3) uint8, preprocessed like the IDB
    refs: list[str]             # file path of each (or "synthetic:<p>"), stored as its IDB reference
    classes: list[int]          # class index of each in the run's class names; -1 = unknown


def image_files(folder: str) -> list[str]:
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if not f.startswith(".") and f.lower().endswith(sources.IMAGE_EXTENSIONS)]


def list_additions(paths: list[str], class_names: list[str]) -> list[tuple[str, int]]:
    """(file, class index) of every image that `--add PATH...` names. A folder with class folders is an
    ImageFolder tree: a class folder whose name is one of the run's classes gives that class, any other
    folder name -1. A folder of images, and an image file, give -1: the model's decoding decides."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append((path, -1))
        elif os.path.isdir(path):
            sub = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d)) and d[0] != "."]
            for name in sub:
                cls = class_names.index(name) if name in class_names else -1
                found += [(f, cls) for f in image_files(os.path.join(path, name))]
            found += [(f, -1) for f in image_files(path)]
        else:
            raise UsageError(f"--add: '{path}' not found; pass image files or ImageFolder folders")
    if not found:
        raise UsageError(f"--add: no image files ({' '.join(sources.IMAGE_EXTENSIONS)}) in {' '.join(paths)}")
    return found


def read_additions(paths: list[str], ckpt: dict, image_size: int) -> Additions:
    """Decode what `--add` names. Any aspect ratio is taken (centre-cropped, like a query image); an image
    that is already indexed, or that cannot be decoded, is bad input."""
    indexed = dict(zip(ckpt["idb_refs"], ckpt["ids"]))
    images, refs, classes = [], [], []
    for file, cls in list_additions(paths, ckpt["class_names"]):
        if file in indexed or file in refs:
            raise UsageError(f"--add: '{file}' is already indexed" + (f" (ID {indexed[file]})" if file in indexed
                                                                       else " (named twice)") + "; add it once")
        try:
            images.append(sources.read_image(file, image_size, aspect_range=None))
        except sources.UnreadableImage:
            raise UsageError(f"--add: cannot decode '{file}' as an image; pass JPEG/PNG/BMP files") from None
        refs.append(file)
        classes.append(cls)
    return Additions(np.stack(images), refs, classes)


def next_free(taken: set[str], prefix: str, width: int, block: str) -> str:
    """The ID after the highest one used in the block of IDs `prefix` + `width` digits. Removed IDs count
    as used: the model still remembers their images, so they are never given to another one."""
    used = [int(i[len(prefix):]) for i in taken if len(i) == len(prefix) + width and i.startswith(prefix)]
    number = max(used, default=-1) + 1
    if number >= 10 ** width:
        raise UsageError(f"{block} is full: its {width}-digit counter has no ID after {prefix}{'9' * width}; "
                         f"add fewer images there, or retrain to number the index afresh")
    return f"{prefix}{number:0{width}d}"


def new_ids(ckpt: dict, classes: list[int], nearest: list[str | None]) -> tuple[list[str], list[int]]:
    """The ID of each new image, and its class (clustered: a decoded class where it was unknown).
    `nearest[j]` is the ID the model decodes for image j (None where the scheme does not need it)."""
    scheme, names, taken = ckpt["ids_scheme"], ckpt["class_names"], set(ckpt["ids"])
    length, width = len(ckpt["ids"][0]), ckpt["prefix_width"]
    ids, out_classes = [], []
    for cls, near in zip(classes, nearest):
        if scheme == "random":
            block = f"the random IDs (the model writes {length} digits)"
            id_str = next_free(taken, "", length, block)
        elif scheme == "semantic":   # the leaf cluster of the nearest ID: its parent prefix, one more slot
            id_str = next_free(taken, near[:-1], 1, f"the semantic leaf cluster '{near[:-1]}'")
        else:
            prefix = f"{cls:0{width}d}" if cls >= 0 else near[:width]
            if len(prefix) != width:
                raise UsageError(f"class '{names[cls]}' (index {cls}) needs a {len(prefix)}-digit prefix, the "
                                 f"model's clustered IDs have {width}; retrain with that class in the IDB")
            cls = int(prefix)
            id_str = next_free(taken, prefix, length - width, f"class '{names[cls]}' (ID prefix {prefix})")
        taken.add(id_str)
        ids.append(id_str)
        out_classes.append(cls)
    return ids, out_classes


# --------------------------------------------------------------------------------------------
# Learning the new IDs, with replay of the old ones
# --------------------------------------------------------------------------------------------

# The settling lr ends at this fraction of --add-lr: the fast recipe's own cosine floor, fixed here so that a
# recipe with a constant lr (paper) settles too.
SETTLE_FLOOR = 0.05
# Old images in the teacher-forced gate: a sample, since a pass over it costs a fraction of the beam-search check
# of every old image it stands in front of; 128 images put the sample's accuracy within a few points of the
# whole index's (a wrong pass costs one check, a wrong fail one epoch).
GATE_SAMPLE = 128


@dataclass
class GrowSettings:
    """How an addition is trained (train.py flags --replay, --replay-min, --add-lr, --add-epochs, --index-target-acc,
    --settle)."""
    replay: float               # old IDB images per new image per epoch
    replay_min: float           # ... and at least this share of the old index per epoch
    lr: float                   # peak learning rate
    epochs: int                 # epoch cap
    target: float               # stop once the new and the old images' IA@1 both reach it
    settle: float = 0.0         # once the new IDs are learnt at epoch e, decay the lr over settle x e epochs; 0 = never
    beam: int | None = None     # beam width of the IA@1 check (None: the list length)
    seed: int = 0               # batch order and the replay draw
    frozen: int | None = None   # encoder blocks (from the patches up) not trained, their output cached; None = all


def settings_from_args(a: argparse.Namespace, recipe: Recipe) -> GrowSettings:
    return GrowSettings(replay=a.replay, replay_min=a.replay_min,
                        lr=a.add_lr if a.add_lr is not None else recipe.lr / 4, epochs=a.add_epochs,
                        target=a.index_target_acc, settle=a.settle, beam=a.beam, seed=a.seed,
                        frozen=a.add_frozen)


@dataclass
class Replay:
    """What an addition rehearses besides the new images: the old index, and a fine-tuned run's queries."""
    images: torch.Tensor                        # (n_old, 3, S, S) uint8: the images of `ids`
    ids: list[str]                              # the old IDs still decodable (store.live_ids), in order
    queries: torch.Tensor | None = None         # (n_q, 3, S, S) uint8: training queries of a fine-tuned run
    relevant: list[list[int]] | None = None     # per query, positions in `ids` of its relevant old images


def addition_pool(new_images: torch.Tensor, ids_new: list[str], replay: Replay, augment: bool,
                  gen: torch.Generator) -> engine.Pool:
    """The pool an addition trains on: new images, old images (each with its own ID), then training
    queries, each with one of its relevant IDs drawn at every step and shown augmented when the recipe's
    retrieval phase did so, as in that phase."""
    n_fixed = len(ids_new) + len(replay.ids)
    tokens = data.ids_to_tensor(ids_new + replay.ids)                               # (n_fixed, L)
    queries = replay.queries if replay.queries is not None else new_images[:0]
    relevant = replay.relevant or []

    def targets(idx: torch.Tensor) -> torch.Tensor:                                # (B,) -> (B, 1, L)
        rows = [i if i < n_fixed else len(ids_new) + relevant[i - n_fixed][
                int(torch.randint(len(relevant[i - n_fixed]), (1,), generator=gen))] for i in idx.tolist()]
        return tokens[torch.tensor(rows)].unsqueeze(1)

    augmented = (torch.arange(n_fixed + len(queries)) >= n_fixed) & augment
    return engine.Pool(torch.cat([new_images, replay.images, queries]), targets, augmented)


def replay_order(n_new: int, n_old: int, n_q: int, n_replay: int, gen: torch.Generator) -> torch.Tensor:
    """One epoch's pool indices: every new image, and `n_replay` old pairs spread evenly over the old
    images (and, for a fine-tuned run, half of them over its training queries), shuffled."""
    n_from_queries = n_replay // 2 if n_q else 0
    parts = [torch.arange(n_new), n_new + engine.spread(n_replay - n_from_queries, n_old, gen)]
    if n_q:   # a checkpoint always keeps an old ID (n_old >= 1); a zero-shot run has no queries to replay
        parts.append(n_new + n_old + engine.spread(n_from_queries, n_q, gen))
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=gen)]


def replay_count(n_new: int, n_old: int, s: GrowSettings, batch_size: int) -> int:
    """Old pairs replayed per epoch: `replay` per new image, and at least `replay_min` of the old index, because
    a small addition knocks the old IDs down about as far as a large one and they recover at the rate they are
    rehearsed; and enough to fill a batch, since a handful of new images alone
    would be a few steps free to overwrite anything."""
    if not n_old or not s.replay:
        return 0
    return max(round(s.replay * n_new), round(s.replay_min * n_old), batch_size - n_new)


class SettlingSchedule:
    """lr multiplier per optimiser step: the recipe's schedule (`base`) until `settle` is called; from then a
    cosine from the multiplier reached down to SETTLE_FLOOR over the given number of steps, then the floor."""

    def __init__(self, base: Callable[[int], float]):
        self.base, self.start, self.top, self.length = base, None, 1.0, 1

    def __call__(self, step: int) -> float:
        if self.start is None:
            return self.base(step)
        return engine.half_cosine(min(1.0, (step - self.start) / self.length), self.top, SETTLE_FLOOR)

    def settle(self, step: int, length: int) -> None:
        """Start the decay at `step`, over `length` steps (only the first call counts)."""
        if self.start is None:
            self.start, self.top, self.length = step, self.base(step), max(1, length)


def learn_additions(model: ViTDSI, recipe: Recipe, device: torch.device, new: tuple[torch.Tensor, list[str]],
                    replay: Replay, trie: IDTrie, s: GrowSettings, log: Log) -> dict:
    """Teach the model the new (image, ID) pairs, mixed with old pairs so that it keeps them (rehearsal, as in
    the retrieval phase, Tay et al. §4.4). `new` = uint8 images (n, 3, S, S) and their IDs. Training ends when
    the new images' IA@1 AND the old images' IA@1 reach the target: a few new IDs are learnt in a few epochs,
    while the old ones they disturbed may still need the replay to settle. Like train.py's `index`, the cheap
    teacher-forced exact match gates the beam-search checks: of the new images, and of a sample of the old ones
    (`GATE_SAMPLE`, by a generator of its own: the gate changes no step of training). Returns epochs, seconds,
    the new and the old images' IA@1 and the optimizer."""
    (new_images, ids_new), n_old = new, len(replay.ids)
    n_q = len(replay.queries) if replay.queries is not None else 0
    n_replay = replay_count(len(ids_new), n_old, s, recipe.batch_size)
    gen = torch.Generator().manual_seed(s.seed)
    pool = addition_pool(new_images, ids_new, replay, recipe.augment, gen)
    new_targets = data.ids_to_tensor(ids_new).unsqueeze(1)                      # (n_new, 1, L)
    old_targets = data.ids_to_tensor(replay.ids).unsqueeze(1) if n_old else None  # (n_old, 1, L)
    gate_gen = torch.Generator().manual_seed(s.seed + 2)
    steps = math.ceil((len(ids_new) + n_replay) / recipe.batch_size)
    schedule = SettlingSchedule(engine.lr_lambda(recipe, steps, s.epochs))
    bf16 = use_bf16(recipe.precision, device)
    trainer = engine.make_trainer(model, recipe, s.lr, steps, s.epochs, device, bf16, augment_seed=s.seed + 1,
                                  schedule=schedule)
    frozen = freeze_bottom(model, pool, s.frozen, device, bf16)
    set_dropout(model, model.config.dropout if recipe.index_dropout is None else recipe.index_dropout,
                recipe.dropout_draw)
    epoch, new_ia, old_ia, t_start = 0, 0.0, 0.0, time.perf_counter()
    while epoch < s.epochs and min(new_ia, old_ia) < s.target:   # both are measured on the same epoch
        epoch += 1
        t0 = time.perf_counter()
        loss, acc, _ = engine.run_epoch(trainer, pool, replay_order(len(ids_new), n_old, n_q, n_replay, gen),
                                        recipe.batch_size, phase="addition", epoch=epoch)
        _, new_acc = engine.eval_loss(model, new_images, new_targets, 2 * recipe.batch_size, device, bf16)
        learnt = new_acc >= s.target   # until the new IDs are learnt, no check of the old ones is due
        old_acc = gate_sample_acc(model, replay.images, old_targets, gate_gen, 2 * recipe.batch_size, device,
                                  bf16) if learnt and n_old else 1.0
        if learnt and s.settle:   # let the lr settle, so that the old IDs the new ones disturbed recover
            schedule.settle(epoch * steps, round(s.settle * epoch * steps))
        check = min(new_acc, old_acc) >= s.target or epoch == s.epochs
        if check:
            new_ia = ia_at_1(model, new_images, ids_new, trie, s, device)
            old_ia = ia_at_1(model, replay.images, replay.ids, trie, s, device) if n_old else 1.0
        log(f"add    epoch {epoch:4d}/{s.epochs}  loss {loss:.4f}  acc {acc:.3f}  new acc {new_acc:.3f}  "
            + (f"old acc {old_acc:.3f}  " if learnt and n_old else "")
            + f"lr {trainer.scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.2f} s/epoch"
            + (f"  new IA@1 {new_ia:.3f}  old IA@1 {old_ia:.3f}" if check else ""))
    set_dropout(model, model.config.dropout)
    for part in frozen:
        part.requires_grad_(True)
    return {"epochs": epoch, "seconds": time.perf_counter() - t_start, "new_ia": new_ia, "old_ia": old_ia,
            "optimizer": trainer.optimizer}


def gate_sample_acc(model: ViTDSI, images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator,
                    batch_size: int, device: torch.device, bf16: bool) -> float:
    """Teacher-forced exact match of a random sample of `GATE_SAMPLE` old images (the gate before a full check)."""
    sample = torch.randperm(len(images), generator=gen)[:GATE_SAMPLE]                      # (<= GATE_SAMPLE,)
    return engine.eval_loss(model, images[sample], targets[sample], batch_size, device, bf16)[1]


def freeze_bottom(model: ViTDSI, pool: engine.Pool, frozen: int | None, device: torch.device,
                  bf16: bool) -> list[torch.nn.Module]:
    """Freeze the patch embedding and the bottom `frozen` encoder blocks (None: all of them), so that the layers
    above learn the new IDs from what the frozen bottom already sees; its output is computed once per pool image
    and cached in the pool. Returns the frozen parts, to thaw after training."""
    k = len(model.encoder.blocks) if frozen is None else frozen
    parts = [model.encoder.patch_embedding, *model.encoder.blocks[:k]] if k else []
    for part in parts:
        part.requires_grad_(False)
    if parts:
        pool.cached, pool.frozen = encoded_until(model, pool.images, k, device, bf16), k
    return parts


def encoded_until(model: ViTDSI, images: torch.Tensor, k: int, device: torch.device, bf16: bool,
                  batch_size: int = 64) -> torch.Tensor:
    """model.encoder.until(images, k) (n, N, D) of uint8 images (n, 3, S, S), dropout off, batch by batch."""
    model.eval()
    return torch.cat(engine.in_batches(images, batch_size, device, lambda x, _: model.encoder.until(x, k), bf16))


def ia_at_1(model: ViTDSI, images: torch.Tensor, ids: list[str], trie: IDTrie, s: GrowSettings,
            device: torch.device) -> float | None:
    """IA@1 of `images` against their own `ids`, by constrained beam search; None when there are none."""
    if not ids:
        return None
    ranked, _ = engine.rank_dsi(model, images, trie, 1, s.beam, device)
    return metrics.indexing_accuracy(ranked, ids, 1)


def decoded_ids(model: ViTDSI, ckpt: dict, additions: Additions, new_images: torch.Tensor, s: GrowSettings,
                device: torch.device) -> tuple[list[str], list[int]]:
    """The new images' IDs and classes (`new_ids`), after decoding, for those whose block the scheme takes
    from the model (semantic; clustered of unknown class), the nearest existing ID, as the model sees it."""
    nearest: list[str | None] = [None] * len(additions.refs)
    decode = [j for j, c in enumerate(additions.classes)
              if ckpt["ids_scheme"] == "semantic" or (ckpt["ids_scheme"] == "clustered" and c < 0)]
    if decode:
        ranked, _ = engine.rank_dsi(model, new_images[torch.as_tensor(decode)], IDTrie(store.live_ids(ckpt)), 1,
                                   s.beam, device)
        for j, hyps in zip(decode, ranked):
            if not hyps:   # every score -inf or NaN: a model that writes no ID at all
                raise UsageError(f"the checkpoint's model decodes no ID for '{sources.printable(additions.refs[j])}'"
                                 f" (broken weights?); pass a checkpoint of a run that trained well, or retrain")
            nearest[j] = hyps[0]
    return new_ids(ckpt, additions.classes, nearest)


def add_to_index(model: ViTDSI, ckpt: dict, additions: Additions, replay: Replay, s: GrowSettings,
                 device: torch.device, log: Log) -> tuple[dict, dict]:
    """Index `additions` into the model of checkpoint `ckpt` (in place), rehearsing `replay` (whose `ids`
    are `store.live_ids(ckpt)`), and return the grown checkpoint and the report."""
    recipe = cli.recipe_from_args(argparse.Namespace(**ckpt["args"]))
    model.to(device)
    new_images = data.images_to_tensor(additions.images)
    ids, classes = decoded_ids(model, ckpt, additions, new_images, s, device)
    grown = {**ckpt, "ids": ckpt["ids"] + ids, "idb_refs": ckpt["idb_refs"] + additions.refs,
             "idb_classes": ckpt["idb_classes"] + classes}
    trie_before, trie = IDTrie(replay.ids), IDTrie(store.live_ids(grown))
    shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
    n_q = len(replay.queries) if replay.queries is not None else 0
    log(f"add: {len(ids)} images -> IDs {shown} ({ckpt['ids_scheme']}), replaying {s.replay:g} old pairs per new "
        f"image from {len(replay.ids)} indexed images" + (f" and {n_q} training queries" if n_q else "")
        + f", lr {s.lr:g}, up to {s.epochs} epochs")
    old_before = ia_at_1(model, replay.images, replay.ids, trie_before, s, device)
    learned = learn_additions(model, recipe, device, (new_images, ids), replay, trie, s, log)
    old_after = learned["old_ia"] if replay.ids else None
    report = {"added": len(ids), "new_ids": ids, "new_IA@1": learned["new_ia"], "old_IA@1_before": old_before,
              "old_IA@1": old_after, "epochs": learned["epochs"], "seconds": round(learned["seconds"], 2),
              "replay": s.replay, "lr": s.lr, "old_images": len(replay.ids), "replayed_queries": n_q}
    log(f"add: {learned['epochs']} epochs in {fmt_seconds(learned['seconds'])}; new images IA@1 "
        f"{learned['new_ia']:.3f}; old images IA@1 {old_before:.3f} -> {old_after:.3f}")
    grown.update(model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                 optimizer=learned["optimizer"].state_dict(), epoch=learned["epochs"])
    return grown, report


def rebuild_run(ckpt: dict, log: Log) -> tuple[sources.ImageSet, data.Split]:
    """The run's images and its split (queries and whole IDB, held-out part included), drawn again from
    the checkpoint's stored arguments, as train.py's `make_cell` drew them. Growing is scored on the run's
    own test queries, so the draw must give the IDB the checkpoint names; data that moved is bad input."""
    run = argparse.Namespace(**ckpt["args"])
    imageset = cli.load_images(run, run.db_size, log)
    split = data.split_dataset(imageset, run.db_size, run.index_fraction, seed=run.seed)
    if not {imageset.refs[i] for i in split.idb} <= set(ckpt["idb_refs"]) | set(ckpt["held_out"]):
        raise UsageError("the run's data, drawn again from the checkpoint's arguments, gives another IDB than "
                         "the checkpoint's; run from the folder the run was started in, with the same data")
    return imageset, split


# --------------------------------------------------------------------------------------------
# Removing IDs
# --------------------------------------------------------------------------------------------

def remove_ids(ckpt: dict, ids: list[str]) -> dict:
    """The checkpoint with `ids` hidden from decoding. An ID the index never held, or one already
    removed, is bad input; so is removing every ID (decoding would have nothing to write)."""
    known, removed = set(ckpt["ids"]), list(ckpt["removed"])
    for id_str in ids:
        if id_str not in known:
            raise UsageError(f"--remove: ID '{id_str}' is not in the index; pass IDs as query mode prints "
                             f"them (e.g. {ckpt['ids'][0]})")
        if id_str in removed:
            raise UsageError(f"--remove: ID '{id_str}' was removed already; pass IDs still in the index")
        removed.append(id_str)
    if len(set(removed)) == len(known):
        raise UsageError("--remove would hide every ID of the index; keep at least one")
    return {**ckpt, "removed": sorted(set(removed))}


# --------------------------------------------------------------------------------------------
# Command line: python train.py --checkpoint C --add PATH... | --remove ID...
# --------------------------------------------------------------------------------------------

def output_folder(a: argparse.Namespace, verb: str) -> str:
    """Where the new checkpoint goes: --out, or by default a new folder beside the old one (runs/X-add,
    then runs/X-add2, ...). A folder that holds a checkpoint.pt, above all the one being grown, is
    refused unless --overwrite says to replace it."""
    source = os.path.abspath(a.checkpoint)
    out = a.out
    if out is None:
        base, n = os.path.dirname(source) + f"-{verb}", 1
        out = base
        while os.path.exists(os.path.join(out, "checkpoint.pt")):
            n += 1
            out = f"{base}{n}"
    cli.check_out_folder(out)
    target = os.path.abspath(os.path.join(out, "checkpoint.pt"))
    if os.path.exists(target) and not a.overwrite:
        what = "the checkpoint being changed" if target == source else "a checkpoint.pt"
        raise UsageError(f"--out '{out}' holds {what}; pass another --out, or --overwrite to replace it")
    return out


def write_report(out: str, report: dict, source: str) -> None:
    """addition.json and addition.md: an addition's report, named apart from a training run's results."""
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    table = (f"# Added to {source}\n\n| added | new IA@1 | old IA@1 before | old IA@1 after | epochs | seconds | "
             f"replay | lr |\n|---|---|---|---|---|---|---|---|\n| {report['added']} | {fmt(report['new_IA@1'])} | "
             f"{fmt(report['old_IA@1_before'])} | {fmt(report['old_IA@1'])} | {report['epochs']} | "
             f"{report['seconds']} | {report['replay']:g} | {report['lr']:g} |\n\nIA@1 by constrained beam search "
             f"over every ID the grown index can write; old = the {report['old_images']} images indexed before.\n")
    store.write_report(out, "addition", report, table)


def old_replay(ckpt: dict, image_size: int, log: Log) -> Replay:
    """The old index, read back from its references, and, when the run was fine-tuned, its training
    queries with their relevant old IDs (same class), rebuilt from the run's stored arguments."""
    run = argparse.Namespace(**ckpt["args"])
    live = store.live_ids(ckpt)
    ref_of, class_of = dict(zip(ckpt["ids"], ckpt["idb_refs"])), dict(zip(ckpt["ids"], ckpt["idb_classes"]))
    images = data.images_to_tensor(sources.read_refs([ref_of[i] for i in live], image_size, dataset=run.dataset,
                                                  seed=run.seed, aspect_range=ckpt["aspect_range"]))
    if run.no_finetune:
        return Replay(images, live)
    imageset, split = rebuild_run(ckpt, log)
    position = {ref: i for i, ref in enumerate(imageset.refs)}
    labels = [imageset.labels[position[ref_of[i]]] if ref_of[i] in position else frozenset([class_of[i]])
              for i in live]
    relevant = data.relevant_sets([imageset.labels[i] for i in split.train], labels, live)
    keep = [k for k, r in enumerate(relevant) if r]
    index_of = {id_str: j for j, id_str in enumerate(live)}
    return Replay(images, live, data.images_to_tensor(imageset.images[split.train[keep]]),
                  [sorted(index_of[i] for i in relevant[k]) for k in keep])


def main(a: argparse.Namespace) -> int:
    """`train.py --checkpoint C --add PATH...` or `--remove ID...`: a new checkpoint under the output folder."""
    model, ckpt = store.load_checkpoint(a.checkpoint)
    out = output_folder(a, "add" if a.add else "remove")
    if a.remove:
        grown = remove_ids(ckpt, a.remove)
    else:
        if a.add_frozen is not None and a.add_frozen > model.config.depth:
            raise UsageError(f"--add-frozen {a.add_frozen}: pass 0 to {model.config.depth}, the model's number "
                             f"of encoder blocks")
        additions = read_additions(a.add, ckpt, model.config.image_size)
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "train.log"), quiet=a.quiet)
    log(f"vit-dsi: --checkpoint {a.checkpoint} --{'add' if a.add else 'remove'} -> {out}")
    if a.add:
        replay = old_replay(ckpt, model.config.image_size, log)
        settings = settings_from_args(a, cli.recipe_from_args(argparse.Namespace(**ckpt["args"])))
        grown, report = add_to_index(model, ckpt, additions, replay, settings, pick_device(a.device), log)
        write_report(out, report, a.checkpoint)
    else:
        log(f"remove: {len(a.remove)} IDs hidden from decoding; {len(store.live_ids(grown))} IDs remain")
    store.atomic_write(os.path.join(out, "checkpoint.pt"), lambda f: torch.save(grown, f))
    log(f"new checkpoint: {os.path.join(out, 'checkpoint.pt')}")
    return 0
