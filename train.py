"""train.py: the whole experiment of the paper, as its steps.

Di Stefano, "Vision Transformer Memory as a Differentiable Search Index for Image Retrieval", §3:
  1. draw `--db-size` images, index 25% of them (the IDB) and keep the rest as queries (data.py);
  2. BoVW baseline: SIFT vocabulary from the IDB, cosine ranking of the test queries (bovw.py);
  3. `index`: teach the ViT DSI to write each IDB image's own ID, until the training IA@1
     reaches `--index-target-acc` (vitdsi.py)                      -> `evaluate`: the "zero-shot" row;
  4. `finetune`: query image -> IDs of relevant IDB images, keeping the epoch with the best
     validation score                                             -> `evaluate`: the "fine-tuned" row;
  5. score every row with the same functions on the same test queries (metrics.py) and write
     results.json, results.md, curves.png, retrievals.png, checkpoint.pt and train.log to `--out`.

Read it top to bottom: `index`, `finetune`, `evaluate`, then `run_experiment` that ties them together, and
`main`. The machinery they call (optimiser, epoch loop, resume, checkpoints, flags) is in support/.

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
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

import bovw
import data
import de
import grow
import metrics
from support import cli, download, engine, outputs, plots, query, resume, sources, store
from support.run import IA_DEPTH, RANK_DEPTH, Cell, Clock, Log, UsageError, fmt_seconds, index_line, os_error_line
from support.run import record_curves, retrieval_end, retrieval_line, retrieval_plan, score_row, set_seed
from support.run import pick_device, row_line, training_pairs, use_bf16
from vitdsi import IDTrie, ViTDSI, set_dropout


# --------------------------------------------------------------------------------------------
# Steps 1 and 2: the data, and the baseline
# --------------------------------------------------------------------------------------------

def make_cell(a: argparse.Namespace, imageset: sources.ImageSet, db_size: int, ids_scheme: str, log: Log,
              saver: resume.ResumeSaver | None = None, resumed: dict | None = None) -> Cell:
    """Step 1: draw the run's images and split them (paper §2.1), give the IDB its IDs; what every step shares."""
    set_seed(a.seed)
    split, held_out = data.hold_out(data.split_dataset(imageset, db_size, a.index_fraction, seed=a.seed),
                                    imageset.primary, a.index_hold_out, a.seed)
    if len(held_out):
        log(f"index hold-out: {len(held_out)} of {len(split.idb) + len(held_out)} IDB images left out of the "
            f"first index (stratified), recorded in the checkpoint for --add")
    semantic = imageset.images[split.idb] if ids_scheme == "semantic" else None   # IDs from what the images show
    idb_ids = data.assign_ids(imageset.primary[split.idb], ids_scheme, seed=a.seed, images=semantic, bovw_k=a.bovw_k)
    log(f"split: IDB {len(split.idb)}, queries train {len(split.train)} / val {len(split.val)} / "
        f"test {len(split.test)}; ids {ids_scheme} ({min(map(len, idb_ids))}-{max(map(len, idb_ids))} digits)")
    recipe, device = cli.recipe_from_args(a), pick_device(a.device)
    return Cell(a, recipe, db_size, ids_scheme, imageset, split, idb_ids, IDTrie(idb_ids),
                data.images_to_tensor(imageset.images), device, use_bf16(recipe.precision, device),
                torch.Generator().manual_seed(a.seed), log, saver=saver or resume.ResumeSaver(), resumed=resumed,
                finished=dict(resumed["finished"]) if resumed else {}, held_out=held_out)


def run_bovw(cell: Cell) -> dict:
    """The BoVW baseline (paper §3.1): vocabulary and index from the IDB, cosine ranking of the test queries."""
    a, split, imageset = cell.a, cell.split, cell.imageset
    t0 = time.perf_counter()
    bovw_index = bovw.BoVWIndex(k=a.bovw_k, seed=a.seed).fit(imageset.images[split.idb])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pos, _ = bovw_index.query(imageset.images[split.test], top_k=RANK_DEPTH)
    q_ms = 1000 * (time.perf_counter() - t0) / max(1, len(split.test))
    db_pos, _ = bovw_index.query(imageset.images[split.idb], top_k=IA_DEPTH)
    row = score_row(cell, "BoVW", "-", cell.id_lists(db_pos), cell.id_lists(pos))
    row.update(train_seconds=round(fit_s, 2), query_ms=round(q_ms, 2))
    cell.log(f"BoVW: vocabulary of {bovw_index.n_words} words + index in {fit_s:.1f} s, {q_ms:.1f} ms/query; "
             f"{row_line(row, ('P@10', 'MAP@10', 'Recall@100'))}")
    return row


# --------------------------------------------------------------------------------------------
# Step 3: indexing (paper §3.2)
# --------------------------------------------------------------------------------------------

def indexing_pool(cell: Cell, idb_images: torch.Tensor) -> tuple[engine.Pool, int, int]:
    """Every IDB image labelled with its own ID. With the recipe's `index_views` V, each epoch also shows V
    augmented views per IDB image, labelled with that image's own ID (pseudo-queries, the image analogue of
    DSI-QG). Pool = clean IDB, then views. Returns the pool, the IDB size and the views per epoch."""
    targets = data.ids_to_tensor(cell.idb_ids)                                # (n_idb, L)
    n_idb = len(cell.idb_ids)
    n_views = round(cell.recipe.index_views * n_idb)
    pool_targets = torch.cat([targets, targets]) if n_views else targets
    pool = engine.Pool(images=torch.cat([idb_images, idb_images]) if n_views else idb_images,
                       targets=lambda idx: pool_targets[idx].unsqueeze(1),   # (B, 1, L)
                       augmented=torch.arange(len(pool_targets)) >= n_idb)
    return pool, n_idb, n_views


def index(cell: Cell, model: ViTDSI) -> dict:
    """Indexing phase (paper §3.2): every IDB image -> its own ID, deliberately overfit, until the
    training IA@1 reaches --index-target-acc or the epoch cap. Returns epochs, seconds, training IA@1."""
    recipe, a, log = cell.recipe, cell.a, cell.log
    idb_images = cell.subset(cell.split.idb)
    pool, n_idb, n_views = indexing_pool(cell, idb_images)
    trainer = engine.make_trainer(model, recipe, recipe.lr, math.ceil((n_idb + n_views) / recipe.batch_size),
                                  recipe.index_epochs, cell.device, cell.bf16, augment_seed=a.seed + 2)
    if recipe.index_dropout is not None:
        set_dropout(model, recipe.index_dropout)
    progress = resume.resume_phase(cell, "index", trainer, {"epoch": 0, "train_ia": 0.0, "seconds": 0.0})
    epoch, train_ia, clock = progress["epoch"], progress["train_ia"], Clock(progress["seconds"])
    while epoch < recipe.index_epochs and train_ia < a.index_target_acc:
        epoch += 1
        clock.lap()
        loss, _, acc = engine.run_epoch(trainer, pool, engine.epoch_order(n_idb, n_views, n_idb, cell.gen),
                                        recipe.batch_size, phase="indexing", epoch=epoch)
        # Exact match under teacher forcing is free; only when it passes the target do we pay for
        # the real check: IA@1 by beam search with dropout off.
        if acc >= a.index_target_acc or epoch == recipe.index_epochs:
            ranked, _ = engine.rank_dsi(model, idb_images, cell.trie, 1, a.beam, cell.device)
            train_ia = metrics.indexing_accuracy(ranked, cell.idb_ids, 1)
        record_curves(cell.curves, index_loss=loss, index_acc=acc)
        log(index_line(epoch, recipe.index_epochs, loss, acc, trainer.scheduler.get_last_lr()[0], clock,
                       train_ia if acc >= a.index_target_acc else None))
        resume.save_resume_state(cell, "index", trainer,
                                 {"epoch": epoch, "train_ia": train_ia, "seconds": clock.seconds()})
    seconds = clock.seconds()
    set_dropout(model, model.config.dropout)
    log(f"indexing: {epoch} epochs in {fmt_seconds(seconds)} ({n_idb * epoch / seconds:.1f} images/s), "
        f"training IA@1 {train_ia:.3f}")
    return {"epochs": epoch, "seconds": seconds, "train_ia": train_ia, "optimizer": trainer.optimizer}


# --------------------------------------------------------------------------------------------
# Step 4: retrieval, the fine-tuning phase (paper §3.2)
# --------------------------------------------------------------------------------------------

def retrieval_pool(cell: Cell, rng: np.random.Generator) -> tuple[engine.Pool, int, int]:
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
    return engine.Pool(images, targets, augmented), n_q, n_idb


def validation_set(cell: Cell, rng: np.random.Generator) -> dict | None:
    """The validation queries that have a relevant IDB image, with a fixed draw of G relevant IDs each,
    so that their loss is comparable from epoch to epoch; None when there is none."""
    rel_val = cell.relevant(cell.split.val)
    keep = [i for i, r in enumerate(rel_val) if r]
    if not keep or not any(cell.relevant(cell.split.train)):
        return None
    G = cell.recipe.retrieval_targets
    ids = [sorted(rel_val[i])[j] for i in keep for j in rng.integers(len(rel_val[i]), size=G)]
    return {"images": cell.subset(cell.split.val[keep]),
            "targets": data.ids_to_tensor(ids).view(len(keep), G, -1),      # (n_val, G, L)
            "relevant": [rel_val[i] for i in keep]}


def validate(cell: Cell, model: ViTDSI, val: dict) -> dict[str, float]:
    """Validation loss and exact match (teacher-forced) and, when stopping on it, MAP@10 by beam search."""
    recipe = cell.recipe
    loss, acc = engine.eval_loss(model, val["images"], val["targets"], 2 * recipe.batch_size, cell.device, cell.bf16)
    scores = {"loss": loss, "acc": acc}
    if recipe.early_stop == "map":   # MAP@10 needs only the top 10 of each ranked list
        ranked, _ = engine.rank_dsi(model, val["images"], cell.trie, 10, cell.a.beam, cell.device)
        scores["map"] = metrics.mean_average_precision_at_k(ranked, val["relevant"], 10)
    return scores


def index_whole(cell: Cell, model: ViTDSI, floor: float) -> tuple[bool, float]:
    """Whether the model still writes its index: IA@1 of the IDB images, by the beam search `evaluate` scores
    it with, at least `floor`. Asked of a retrieval epoch only when it would be the one kept."""
    ranked, _ = engine.rank_dsi(model, cell.subset(cell.split.idb), cell.trie, IA_DEPTH, cell.a.beam, cell.device)
    ia = metrics.indexing_accuracy(ranked, cell.idb_ids, 1)
    return ia >= floor, ia


def epoch_score(cell: Cell, model: ViTDSI, v: dict, epoch: int, floor: float, best: float) -> float:
    """The validation score that chooses the epoch kept (higher is better). With `keep_index`, an epoch that
    would be kept but no longer writes its index (`index_whole`) scores -inf: the index is not traded for
    retrieval, however well it retrieves."""
    recipe = cell.recipe
    score = v["map"] if recipe.early_stop == "map" else -v["loss"]
    if recipe.keep_index and score > best:
        whole, ia = index_whole(cell, model, floor)
        if not whole:
            cell.log(f"retrieval epoch {epoch:3d}: IDB IA@1 {ia:.3f} < {floor:.3f}: not kept, whatever its "
                     f"validation {recipe.early_stop}")
            return -float("inf")
    return score


def finetune(cell: Cell, model: ViTDSI) -> dict | None:
    """Retrieval phase (paper §3.2): each training query is paired with relevant IDB images' IDs, drawn
    anew every step (so the model sees the whole relevant set), mixed with index rehearsal. Keeps the
    epoch with the best validation score: the VALIDATION queries choose the epoch, never the test ones.
    With `keep_index`, only among the epochs whose index is whole; epoch 0, the zero-shot model, when none
    is. Returns seconds, epochs run, the epoch kept and its optimizer; None when there is nothing to train on."""
    recipe, a, log = cell.recipe, cell.a, cell.log
    rng = np.random.default_rng(a.seed)
    val = validation_set(cell, rng)
    if val is None:
        log("retrieval: no training or validation query has a relevant IDB image; skipping fine-tuning")
        return None
    pool, n_q, n_idb = retrieval_pool(cell, rng)
    n_mix = round(recipe.index_mix * n_q)
    trainer = engine.make_trainer(model, recipe, recipe.retrieval_lr, math.ceil((n_q + n_mix) / recipe.batch_size),
                                  recipe.retrieval_epochs, cell.device, cell.bf16, recipe.label_smoothing, a.seed + 1)
    # Below this IA@1 an epoch is not kept (the zero-shot IA@1 when indexing ended under the target).
    floor = min(a.index_target_acc, cell.finished["zero_shot"]["IA@1"]) if "zero_shot" in cell.finished \
        else a.index_target_acc
    log(retrieval_plan(recipe, n_q, n_mix, floor))
    stopper = engine.EarlyStopping(recipe.patience, recipe.min_epochs)
    if recipe.keep_index:   # until an epoch qualifies, the epoch kept is 0: the zero-shot model
        stopper.keep(model, trainer.optimizer)
    progress = resume.resume_phase(cell, "retrieval", trainer, {"epoch": 0, "seconds": 0.0}, rng, stopper)
    epoch, clock = progress["epoch"], Clock(progress["seconds"])
    while epoch < recipe.retrieval_epochs and not stopper.stopped(epoch):
        epoch += 1
        clock.lap()
        loss, acc, _ = engine.run_epoch(trainer, pool, engine.epoch_order(n_q, n_mix, n_idb, cell.gen),
                                        recipe.batch_size, phase="retrieval", epoch=epoch)
        v = validate(cell, model, val)
        record_curves(cell.curves, ret_train_loss=loss, ret_train_acc=acc, ret_val_loss=v["loss"],
                      ret_val_acc=v["acc"], ret_val_map=v.get("map"))
        stopper.step(epoch, epoch_score(cell, model, v, epoch, floor, stopper.best_score), model, trainer.optimizer)
        log(retrieval_line(epoch, recipe.retrieval_epochs, loss, acc, v, trainer.scheduler.get_last_lr()[0],
                                    clock))
        resume.save_resume_state(cell, "retrieval", trainer, {"epoch": epoch, "seconds": clock.seconds()},
                                 rng, stopper)
    stopper.restore(model, trainer.optimizer)
    log(retrieval_end(recipe, epoch, stopper.stopped(epoch), stopper.best_epoch, floor))
    return {"seconds": clock.seconds(), "epochs": epoch, "best_epoch": stopper.best_epoch,
            "optimizer": trainer.optimizer}


# --------------------------------------------------------------------------------------------
# Step 5: scoring every model alike (paper §3.1)
# --------------------------------------------------------------------------------------------

def evaluate(cell: Cell, model: ViTDSI, variant: str, train_seconds: float, info: dict) -> dict:
    """Score the model like every other (paper §3.1): IA@1/IA@5 over the IDB, retrieval metrics over
    the TEST queries. Called once per reported row."""
    db_rank, _ = engine.rank_dsi(model, cell.subset(cell.split.idb), cell.trie, IA_DEPTH, cell.a.beam, cell.device,
                                 log=cell.log, what="IDB")
    q_rank, q_ms = engine.rank_dsi(model, cell.subset(cell.split.test), cell.trie, RANK_DEPTH, cell.a.beam,
                                   cell.device, log=cell.log, what="test queries")
    row = score_row(cell, "ViT DSI", variant, db_rank, q_rank)
    row.update(train_seconds=round(train_seconds, 2), query_ms=round(q_ms, 2), **info)
    cell.log(f"ViT DSI {variant}: {row_line(row)}  ({q_ms:.1f} ms/query)")
    return row


# --------------------------------------------------------------------------------------------
# One experiment: the steps in order
# --------------------------------------------------------------------------------------------

def run_dsi(cell: Cell, out: str) -> list[dict]:
    """The DSI's steps: index, evaluate (zero-shot), finetune, evaluate (fine-tuned); then its checkpoint
    and curves. Returns its rows."""
    a, n_idb = cell.a, len(cell.idb_ids)
    config = cli.model_config(a, max_len=max(map(len, cell.idb_ids)) + 2)      # BOS, digits, EOS
    model = ViTDSI(config).to(cell.device)
    set_dropout(model, config.dropout, cell.recipe.dropout_draw)
    cell.log(f"ViT DSI: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
             f"{(a.image_size // a.patch_size) ** 2} patches, recipe '{a.recipe}' "
             f"({'bf16' if cell.bf16 else 'fp32'}), device {cell.device.type}")
    optimizer = None   # a run resumed inside the retrieval phase gets it from finetune
    if "zero_shot" not in cell.finished:   # else the run resumes inside the retrieval phase: both are saved
        indexed = index(cell, model)
        optimizer = indexed.pop("optimizer")
        cell.finished["indexed"] = indexed
        cell.finished["zero_shot"] = evaluate(cell, model, "zero-shot", indexed["seconds"],
                                              store.index_info(indexed, n_idb))
    indexed, rows = cell.finished["indexed"], [cell.finished["zero_shot"]]
    epoch = indexed["epochs"]
    tuned = None if a.no_finetune else finetune(cell, model)
    if tuned:
        info = dict(store.index_info(indexed, n_idb), retrieval_epochs=tuned["epochs"],
                    retrieval_epoch_kept=tuned["best_epoch"], retrieval_seconds=round(tuned["seconds"], 2))
        rows.append(evaluate(cell, model, "fine-tuned", indexed["seconds"] + tuned["seconds"], info))
        optimizer, epoch = tuned["optimizer"], tuned["best_epoch"] or epoch   # 0: the zero-shot model
    store.save_checkpoint(os.path.join(out, "checkpoint.pt"), model, optimizer, config, a, epoch, store.catalogue(cell))
    plots.draw_curves(cell.curves, os.path.join(out, "curves.png"),
                      title=f"{a.dataset} db {cell.db_size} ids {cell.ids}")
    return rows


def run_experiment(a: argparse.Namespace, imageset: sources.ImageSet, db_size: int, ids_scheme: str,
                   out: str, log: Log, with_baselines: bool = True, saver: resume.ResumeSaver | None = None,
                   resumed: dict | None = None) -> list[dict]:
    """One (db_size, ids) cell of Table 1, as the paper's steps. Returns its rows. The baselines (BoVW, the
    dual encoder) do not read IDs, so a sweep trains them once per db size (`with_baselines`). `resumed` is the
    saved state of an interrupted run of this cell: the steps it had finished are taken from it, not run again."""
    cell = make_cell(a, imageset, db_size, ids_scheme, log, saver, resumed)
    if "bovw" in a.models and with_baselines and "bovw" not in cell.finished:
        cell.finished["bovw"] = run_bovw(cell)
    rows = [cell.finished["bovw"]] if "bovw" in cell.finished else []
    if "dsi" in a.models:
        rows += run_dsi(cell, out)
    if "de" in a.models and with_baselines:   # after the DSI: the DSI's numbers do not depend on the DE's
        rows.append(de.run_dual_encoder(cell))
    plots.draw_retrievals(cell, os.path.join(out, "retrievals.png"), a.sheet_queries)
    return rows


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def train_run(a: argparse.Namespace, saver: resume.ResumeSaver, state: dict | None) -> int:
    """A training run (or a --sweep of them): every experiment's rows in one results.json/results.md."""
    with outputs.run_folder(a, saver, state) as folder:   # OUT locked, its log, a staging folder for the outputs
        t_run, log = time.perf_counter(), folder.log
        cells = [(n, s) for n in a.sweep_sizes for s in a.sweep_ids] if a.sweep else [(a.db_size, a.ids)]
        imageset, rows = cli.load_images(a, max(n for n, _ in cells), log), []
        for n, scheme in cells:
            cell_out = os.path.join(folder.staging, f"{n}-{scheme}") if a.sweep else folder.staging
            os.makedirs(cell_out, exist_ok=True)
            log(f"== db-size {n}, ids {scheme} ==")
            rows += run_experiment(a, imageset, n, scheme, cell_out, log,   # BoVW and the DE: once per db size
                                   with_baselines=(scheme == a.sweep_ids[0] or not a.sweep), saver=saver, resumed=state)
        header = (f"{a.dataset}, {'Table 1 sweep' if a.sweep else f'db-size {a.db_size}, ids {a.ids}'}, "
                  f"seed {a.seed}, recipe {a.recipe}")
        table = store.write_results(folder.staging, rows, header, {
            "args": vars(a), "recipe": {"name": a.recipe, **asdict(cli.recipe_from_args(a))},
            "wall_seconds": round(time.perf_counter() - t_run, 1)})
        folder.commit()
    if saver.path:   # the run is whole: checkpoint.pt is its model, and a resume has nothing left to do
        with contextlib.suppress(FileNotFoundError):
            os.remove(saver.path)
    log(f"done in {fmt_seconds(time.perf_counter() - t_run)}; outputs in {folder.out}")
    if a.quiet:
        print(table)
    else:
        log(table)
    return 0


def run(a: argparse.Namespace, saver: resume.ResumeSaver) -> int:
    """What the command line asks for: a training run, a query, or growing an index (grow.py)."""
    state = None
    if a.resume:
        a, state = resume.resume_args(a)
    cli.check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.query:
        query.query_mode(a)
        return 0
    if a.add or a.remove:
        return grow.main(a)
    return train_run(a, saver, state)


def main(argv: list[str] | None = None) -> int:
    a = cli.build_parser().parse_args(argv)
    saver = resume.ResumeSaver()   # run() points it at OUT/resume.pt; on Ctrl-C it saves the last completed epoch
    try:
        return run(a, saver)
    except (UsageError, sources.DataError, bovw.BoVWError, download.DownloadError) as e:
        print(f"error: {sources.printable(str(e))}", file=sys.stderr)   # one line, whatever a path holds
        return 2
    except OSError as e:   # disk full, no permission, a read-only folder: what was there stays whole
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(saver.interrupted(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
