"""de.py: the baseline a practitioner would pick, a dual encoder (DE) built from the DSI's own ViT encoder.

Where the DSI writes an ID, a dual encoder embeds every database image once and ranks the database by
cosine similarity to the query's embedding (Tay et al. 2022 compare the DSI with such a model of the same
size). Here the encoder is the DSI's, with the same config and patches: its patch encodings are averaged,
projected by one linear layer and L2-normalised. Training is contrastive: an anchor (a training query, or
an augmented view of a database image) should be closer to its relevant database images than to the
others (multi-positive InfoNCE, Khosla et al. 2020's supervised contrastive form of van den Oord et al.
2018). Training and evaluation live in train.py (`train_dual_encoder`), next to the DSI's.

    model = DualEncoder(ViTDSIConfig())
    database = model(idb_images)                       # (n, D) unit vectors
    positions, scores = rank_cosine(model(queries), database, k=100)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitdsi import ViTDSI, ViTDSIConfig

TEMPERATURE = 0.1    # InfoNCE logit scale 1/0.1 = 10: sharp enough for cosines in [-1, 1]; 0.05 did worse on validation


class DualEncoder(nn.Module):
    """The DSI's encoder (patch embedding, positions, encoder blocks, final norm) + mean pooling + a linear
    projection, L2-normalised: images (B, C, S, S) -> embeddings (B, D)."""

    def __init__(self, config: ViTDSIConfig):
        super().__init__()
        vit = ViTDSI(config)   # borrow its encoder parts, so both models are built by the same code
        self.config = config
        self.patch_embedding, self.encoder_pos, self.drop = vit.patch_embedding, vit.encoder_pos, vit.drop
        self.encoder, self.encoder_norm = vit.encoder, vit.encoder_norm
        self.project = nn.Linear(config.dim, config.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # ViTDSI.encode reads only the parts borrowed above, so it runs here as it runs in the DSI.
        memory = ViTDSI.encode(self, images)                            # (B, C, S, S) -> (B, N, D)
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
