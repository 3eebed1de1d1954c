"""de.py: the baseline a practitioner would pick, a dual encoder (DE) built from the DSI's own ViT encoder.

Where the DSI writes an ID, a dual encoder embeds every database image once and ranks the database by
cosine similarity to the query's embedding (Tay et al. 2022 compare the DSI with such a model of the same
size). Here the encoder is the DSI's, with the same config and patches: its patch encodings are averaged,
projected by one linear layer and L2-normalised. Training is contrastive: an anchor (a training query, or
an augmented view of a database image) should be closer to its relevant database images than to the
others (multi-positive InfoNCE, Khosla et al. 2020's supervised contrastive form of van den Oord et al.
2018). Training, and the embedding and ranking of a database for evaluation, live in this file too (its
last section).

    model = DualEncoder(ViTDSIConfig())
    database = model(idb_images)                       # (n, D) unit vectors
    positions, scores = rank_cosine(model(queries), database, k=100)
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import data
import metrics
from support import cli, engine
from support.run import IA_DEPTH, RANK_DEPTH, Cell, TrainingDiverged, row_line, score_row, training_pairs
from vitdsi import ViTDSI, ViTDSIConfig, set_dropout

# InfoNCE divides cosines (in [-1, 1]) by the temperature: at 0.1 the logits span [-10, 10], so the softmax
# can put nearly all its mass on the positives; at 1 even perfect embeddings would leave most of it on the
# many negatives.
TEMPERATURE = 0.1


class DualEncoder(nn.Module):
    """The DSI's encoder (patch embedding, positions, encoder blocks, final norm) + mean pooling + a linear
    projection, L2-normalised: images (B, C, S, S) -> embeddings (B, D)."""

    def __init__(self, config: ViTDSIConfig):
        super().__init__()
        self.config = config
        # The encoder of a whole ViTDSI: built by the same code, it draws its initial weights as the DSI does.
        self.encoder = ViTDSI(config).encoder
        self.project = nn.Linear(config.dim, config.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(images)                                   # (B, C, S, S) -> (B, N, D)
        return F.normalize(self.project(memory.mean(dim=1)), dim=-1)    # (B, N, D) -> (B, D) unit vectors


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
             temperature: float = TEMPERATURE) -> torch.Tensor:
    """Multi-positive InfoNCE: anchors (B, D) and candidates (M, D) unit vectors; positive (B, M) bool says
    which candidates are relevant to each anchor (at least one per anchor). Per anchor,
    -log( sum over positives of exp(s/t) / sum over all candidates of exp(s/t) ), s = cosine; mean over B."""
    logits = anchors @ candidates.T / temperature                        # (B, D) @ (D, M) -> (B, M)
    all_ = torch.logsumexp(logits, dim=1)                                # (B,)
    pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (all_ - pos).mean()


def rank_cosine(queries: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by cosine: queries (B, D), database (n, D) unit vectors -> (positions, scores), both
    (B, min(k, n)), best first; one batched matrix product, no index structure."""
    scores = queries @ database.T                                        # (B, D) @ (D, n) -> (B, n)
    top = torch.topk(scores, min(k, database.shape[0]), dim=1)
    return top.indices, top.values


# ----------------------------------------------------------------------------------------------------------
# Training and scoring

def anchors_and_positives(cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
    """The retrieval phase's training pairs as DE anchors (an IDB image is shown as an augmented view, its
    own image the positive, as the DSI's rehearsal pairs): images (m, 3, S, S) uint8, positive (m, n_idb) bool."""
    images, lists, _ = training_pairs(cell)
    rows = torch.tensor([e for e, c in enumerate(lists) for _ in c])       # entry of each relevant position
    positive = torch.zeros(len(lists), len(cell.split.idb), dtype=torch.bool)
    positive[rows, torch.tensor([j for c in lists for j in c])] = True
    return images, positive


def embed(model: DualEncoder, images: torch.Tensor, cell: Cell, batch_size: int = 64) -> torch.Tensor:
    """Unit embeddings (n, D) of uint8 images (n, 3, S, S), dropout off."""
    model.eval()
    return torch.cat(engine.in_batches(images, batch_size, cell.device, lambda x, _: model(x).float(), cell.bf16))


def train_epoch(cell: Cell, model: DualEncoder, trainer: engine.Trainer, anchors: torch.Tensor,
                positive: torch.Tensor, idb: torch.Tensor, gen: torch.Generator) -> float:
    """One epoch: per step, a batch of anchors (always shown as augmented views) against the clean IDB images
    picked as one positive of each anchor; the other anchors' picks are its negatives (in-batch negatives, as
    in DPR, Karpukhin et al. 2020). Returns the mean loss."""
    model.train()
    order, total, batch_size = torch.randperm(len(anchors), generator=gen), 0.0, cell.recipe.batch_size
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        picked = torch.multinomial(positive[idx].float(), 1, generator=gen).flatten()          # (B,)
        cand = torch.unique(picked)     # in-batch candidates: each anchor's pick is a negative of the others
        x = data.augment(data.normalize(anchors[idx].to(cell.device)), gen)
        with torch.autocast(cell.device.type, dtype=torch.bfloat16, enabled=cell.bf16):
            q, e = model(x), model(data.normalize(idb[cand].to(cell.device)))
        loss = info_nce(q.float(), e.float(), positive[idx][:, cand].to(cell.device))
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged in the dual encoder's training: the loss is {value}; "
                                   f"lower the learning rate (--retrieval-lr)")
        engine.step(trainer, loss)
        total += value * len(idx)
    return total / len(anchors)


def validation_map(cell: Cell, model: DualEncoder, val_images: torch.Tensor, idb: torch.Tensor,
                   relevant: list[set[str]]) -> float | None:
    """MAP@10 of the validation queries (those with a relevant IDB image) by cosine ranking; None without any."""
    if not relevant:
        return None
    top, _ = rank_cosine(embed(model, val_images, cell), embed(model, idb, cell), 10)
    return metrics.mean_average_precision_at_k(cell.id_lists(top), relevant, 10)


def train_dual_encoder(cell: Cell, model: DualEncoder) -> dict:
    """The DE baseline (the model a practitioner would pick), trained with the DSI's retrieval recipe on the
    same images (multi-positive InfoNCE: an anchor's positives are all picks relevant to it). The epoch with
    the best validation MAP@10 is kept, by the DSI's own rule. Returns seconds, epochs run, epoch kept."""
    recipe, split, log = cell.recipe, cell.split, cell.log
    anchors, positive = anchors_and_positives(cell)
    idb = cell.subset(split.idb)
    rel_val = cell.relevant(split.val)
    keep_va = [i for i, r in enumerate(rel_val) if r]
    val_images = cell.subset(split.val[keep_va])
    trainer = engine.make_trainer(model, recipe, recipe.retrieval_lr, -(-len(anchors) // recipe.batch_size),
                                  recipe.retrieval_epochs, cell.device, cell.bf16)
    gen = torch.Generator().manual_seed(cell.a.seed + 4)   # the DE's own batch order, positives and augmentations
    stopper = engine.EarlyStopping(recipe.patience, recipe.min_epochs)
    t_start = time.perf_counter()
    log(f"dual encoder: {len(anchors)} anchors per epoch, lr {recipe.retrieval_lr:g}, {recipe.retrieval_epochs} epochs")
    for epoch in range(1, recipe.retrieval_epochs + 1):
        loss = train_epoch(cell, model, trainer, anchors, positive, idb, gen)
        val_map = validation_map(cell, model, val_images, idb, [rel_val[i] for i in keep_va])
        # With no validation query to choose by, the last epoch is kept.
        stop = stopper.step(epoch, epoch if val_map is None else val_map, model, trainer.optimizer)
        log(f"dual encoder epoch {epoch:3d}/{recipe.retrieval_epochs}  loss {loss:.4f}  val MAP@10 "
            f"{'-' if val_map is None else format(val_map, '.3f')}  lr {trainer.scheduler.get_last_lr()[0]:.2e}")
        if stop:
            break
    stopper.restore(model, trainer.optimizer)
    log(f"dual encoder: ran {epoch} epochs, kept epoch {stopper.best_epoch} (best validation MAP@10)")
    return {"seconds": time.perf_counter() - t_start, "epochs": epoch, "best_epoch": stopper.best_epoch}


def run_dual_encoder(cell: Cell) -> dict:
    """Train the DE and score it like every other model: IA@k (an IDB image finds itself), retrieval
    metrics of the test queries by exact cosine ranking of the IDB embeddings."""
    torch.manual_seed(cell.a.seed + 3)   # its own initialisation
    model = DualEncoder(cli.model_config(cell.a, max_len=2)).to(cell.device)
    set_dropout(model, model.config.dropout, cell.recipe.dropout_draw)
    trained = train_dual_encoder(cell, model)
    t0 = time.perf_counter()
    database = embed(model, cell.subset(cell.split.idb), cell)
    test = cell.subset(cell.split.test)
    q_top, _ = rank_cosine(embed(model, test, cell), database, RANK_DEPTH)
    q_ms = 1000 * (time.perf_counter() - t0) / max(1, len(test))
    db_top, _ = rank_cosine(database, database, IA_DEPTH)
    row = score_row(cell, "ViT dual encoder", "-", cell.id_lists(db_top), cell.id_lists(q_top))
    row.update(train_seconds=round(trained["seconds"], 2), query_ms=round(q_ms, 2),
               retrieval_epochs=trained["epochs"], retrieval_epoch_kept=trained["best_epoch"])
    cell.log(f"ViT dual encoder: {row_line(row, ('IA@1', 'P@10', 'MAP@10', 'Recall@100'))}  "
             f"({trained['seconds']:.0f} s training)")
    return row
