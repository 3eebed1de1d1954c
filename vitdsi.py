"""ViT DSI: an encoder-decoder Vision Transformer that stores an image database in its weights.

Paper §3.2 (Di Stefano, "Vision Transformer Memory as a Differentiable Search Index for Image Retrieval"),
after Tay et al. 2022 ("Transformer Memory as a Differentiable Search Index"). The encoder reads the image
as a sequence of patches (Dosovitskiy et al. 2021); the decoder writes the ID of a database image digit by
digit, attending causally to the digits written so far and to every patch (Vaswani et al. 2017).
Decoding is beam search constrained by a prefix trie of the database's IDs, so every answer is a real ID.

    config = ViTDSIConfig(image_size=160, patch_size=16)
    model = ViTDSI(config)
    logits = model(images, targets[:, :-1])          # teacher forcing; loss against targets[:, 1:]
    memory = model.encoder(images)                   # (B, N, D): the encoder alone, as the dual encoder uses it
    trie = IDTrie(["000", "001", "002"])             # the indexed database's IDs
    ranked = model.generate(images, trie, k=10)      # per image: [("001", -0.02), ("000", -4.1), ...]

The file reads top to bottom: the config, the building blocks (attention, the two kinds of block, patches,
positions, the encoder), the prefix trie, the model with its beam search, exhaustive scoring, and last the
dropout used everywhere, which draws its random masks in a fast way of its own.

Shape legend:
    B  batch (images, queries)        N  patches per image = (image_size / patch_size)^2
    L  ID tokens (BOS, digits, EOS)   D  model width (dim)          H  heads      hd  head width = D / H
    V  vocabulary (14 tokens)         P  pixel values per patch = channels * patch_size^2
    G  token sequences per image in `decode` (1 when training, W in beam search)
    W  live beam hypotheses per query T  trie nodes                 n  database IDs
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from data import BOS, EOS, PAD, VOCAB_SIZE, encode_id, ids_to_tensor   # ID tokens, paper §2.2


@dataclass
class ViTDSIConfig:
    image_size: int = 160            # side of the square input image in pixels (paper §2.1: 256, 160, 64)
    patch_size: int = 16            # side of a square patch; N = (image_size / patch_size)^2 (paper: 8, 16, 32)
    channels: int = 3               # RGB input
    dim: int = 128                  # D, width of every token in encoder and decoder (paper §3.2)
    mlp_dim: int = 256              # hidden width of each block's MLP (paper §3.2)
    depth: int = 6                  # blocks in the encoder AND in the decoder: 6 + 6 at paper defaults
    heads: int = 4                  # H attention heads; dim must be divisible by it (paper §3.2)
    dropout: float = 0.1            # on embeddings, attention weights, MLP hidden units and residual branches
    pos_encoding: str = "sinusoidal"  # "sinusoidal" (fixed, Vaswani et al. §3.5) or "learned"
    vocab_size: int = VOCAB_SIZE    # digits 0-9, unused 10, BOS, EOS, PAD (data.py, paper §2.2)
    max_len: int = 16               # longest token sequence BOS + digits + EOS the decoder accepts

    def __post_init__(self) -> None:
        # ValueError rather than assert: a config comes from user flags or a checkpoint (support/cli.py checks both).
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}; "
                             f"pick --image-size a multiple of --patch-size")
        if self.dim % self.heads != 0 or self.dim % 2 != 0:
            raise ValueError(f"dim {self.dim} must be even and divisible by heads {self.heads}; "
                             f"change --dim or --heads")
        if self.pos_encoding not in ("sinusoidal", "learned"):
            raise ValueError(f"pos_encoding must be 'sinusoidal' or 'learned', not {self.pos_encoding!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")


# ----------------------------------------------------------------------------------------------------------
# Building blocks

def causal_mask(L: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool mask, True = may attend: query position i sees key positions j <= i."""
    return torch.ones(L, L, dtype=torch.bool, device=device).tril()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, dropout_p: float = 0.0, draw: str = "words") -> torch.Tensor:
    """Scaled dot-product attention softmax(q k^T / sqrt(hd)) v (Vaswani et al. §3.2.1), written out.

    q (B, H, Lq, hd), k and v (B, H, Lk, hd). `mask` is bool and broadcasts to (B, H, Lq, Lk); True = may
    attend (the same convention as torch's scaled_dot_product_attention). Every query must see >= 1 key.
    In training, `dropout_p` of the attention weights are dropped, the mask drawn as `draw` says (`dropout`).
    """
    q = q * q.shape[-1] ** -0.5                      # scale q, not the scores: Lq*hd multiplies instead of Lq*Lk
    scores = q @ k.transpose(-2, -1)                 # (B, H, Lq, hd) @ (B, H, hd, Lk) -> (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p, draw)
    return weights @ v                               # (B, H, Lq, Lk) @ (B, H, Lk, hd) -> (B, H, Lq, hd)


class MultiHeadAttention(nn.Module):
    """H heads of `attention` side by side. Self-attention projects q, k, v with one fused matrix (`to_qkv`).
    Cross-attention takes q from the decoder and k, v from the encoder's patches (`to_q`, `to_kv`); those k, v
    come from `keys_values(memory)`, so that beam search computes them once per image, not once per step."""

    def __init__(self, *, dim: int, heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        self.heads, self.dropout, self.draw = heads, dropout, "words"
        if cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(dim, 2 * dim)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, H, hd) -> (B, H, L, hd): each head attends on its own slice of the width."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of context (B, Lk, D): 2 x (B, H, Lk, hd), made contiguous once
        here rather than by every matmul of every beam-search step that reuses them."""
        k, v = self.to_kv(context).chunk(2, dim=-1)                 # (B, Lk, 2D) -> 2 x (B, Lk, D)
        return self.split_heads(k).contiguous(), self.split_heads(v).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, Lq, D) -> (B, Lq, D). Self-attention, or cross-attention when given context_kv from
        `keys_values`. mask: bool (Lq, Lk), True = may attend."""
        B, Lq, D = x.shape
        if context_kv is None:
            q, k, v = (self.split_heads(t) for t in self.to_qkv(x).chunk(3, dim=-1))   # 3 x (B, H, L, hd)
        else:
            q, (k, v) = self.split_heads(self.to_q(x)), context_kv     # (B, H, Lq, hd), 2 x (B, H, Lk, hd)
        out = attention(q, k, v, mask, self.dropout if self.training else 0.0, self.draw)       # (B, H, Lq, hd)
        out = out.transpose(1, 2).reshape(B, Lq, D)      # (B, H, Lq, hd) -> (B, Lq, H, hd) -> (B, Lq, D)
        return self.to_out(out)


def mlp(dim: int, mlp_dim: int, dropout: float) -> nn.Sequential:
    """Position-wise feed-forward network with GELU, as in ViT (Dosovitskiy et al. §3.1)."""
    return nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), Dropout(dropout), nn.Linear(mlp_dim, dim))


class EncoderBlock(nn.Module):
    """Pre-norm block over the patches: bidirectional self-attention, then MLP. Pre-norm (LayerNorm inside the
    residual branch, as in ViT) trains stably without the learning-rate warm-up post-norm needs."""

    def __init__(self, *, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), MultiHeadAttention(dim=dim, heads=heads, dropout=dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), mlp(dim, mlp_dim, dropout)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (B, N, D)
        x = x + self.drop(self.attn(self.norm1(x)))        # no mask: every patch sees every patch
        return x + self.drop(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Pre-norm block over the ID tokens: causal self-attention, cross-attention to the patches, MLP."""

    def __init__(self, *, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), MultiHeadAttention(dim=dim, heads=heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim=dim, heads=heads, dropout=dropout, cross=True)
        self.norm3, self.mlp = nn.LayerNorm(dim), mlp(dim, mlp_dim, dropout)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """x (B*G, L, D): G token sequences per image; memory_kv = cross_attn.keys_values(memory),
        2 x (B, H, N, hd); mask (L, L) causal."""
        BG, L, D = x.shape
        x = x + self.drop(self.self_attn(self.norm1(x), mask=mask))
        # Cross-attention has no mask, so the G*L queries of one image can share one attention over its N
        # patches: beam search then never copies the memory W times.
        y = self.norm2(x).reshape(memory_kv[0].shape[0], -1, D)                    # (B*G, L, D) -> (B, G*L, D)
        y = self.cross_attn(y, context_kv=memory_kv).reshape(BG, L, D)             # (B, G*L, D) -> (B*G, L, D)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm3(x)))


class PatchEmbedding(nn.Module):
    """Cut the image into non-overlapping patch x patch squares, flatten each, project it to D
    (Dosovitskiy et al. §3.1). Patches are numbered row by row."""

    def __init__(self, *, image_size: int, patch_size: int, channels: int, dim: int) -> None:
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} is not divisible by patch size {patch_size}"
        self.image_size, self.patch_size = image_size, patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Linear(channels * patch_size ** 2, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S) -> (B, N, D)."""
        B, C, S, S2 = images.shape
        assert S == S2 == self.image_size, f"expected {self.image_size}x{self.image_size} images, got {S}x{S2}"
        p, g = self.patch_size, S // self.patch_size
        x = images.reshape(B, C, g, p, g, p)                          # (B, C, S, S) -> (B, C, g, p, g, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)  # -> (B, g, g, C, p, p) -> (B, N, P)
        return self.to_patch_embedding(x)                             # (B, N, P) @ (P, D) -> (B, N, D)


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D))
    (Vaswani et al. §3.5)."""

    def __init__(self, *, dim: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)           # (max_len, 1)
        inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)   # (D/2,)
        pe = torch.zeros(max_len, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * inv_freq)                                   # (max_len, D/2)
        pe[:, 1::2] = torch.cos(position * inv_freq)
        self.register_buffer("pe", pe.float(), persistent=False)   # rebuilt from the config, not checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (B, L, D)
        return x + self.pe[: x.shape[1]]


class LearnedPositionalEncoding(nn.Module):
    """One trained vector per position (as in ViT and GPT)."""

    def __init__(self, *, dim: int, max_len: int) -> None:
        super().__init__()
        self.pe = nn.Parameter(torch.randn(max_len, dim) * 0.02)   # small start, as GPT-2: positions are learned

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (B, L, D)
        return x + self.pe[: x.shape[1]]


class Encoder(nn.Module):
    """The ViT encoder (Dosovitskiy et al. §3.1): embed the patches, add their positions, dropout, then
    `depth` EncoderBlocks and a final LayerNorm. images (B, C, S, S) -> memory (B, N, D), one encoding per
    patch, which the DSI's decoder reads and the dual encoder (de.py) pools.

    The patch embedding and the positional encoding come ready-built from the caller (`ViTDSI` builds the
    inputs of both its stacks before the stacks themselves). `until` and `after` split the encoder at block
    k: an index grown with the bottom k blocks frozen computes `until(images, k)` once per image and keeps it.
    """

    def __init__(self, patch_embedding: PatchEmbedding, pos: nn.Module, *, depth: int, dim: int, heads: int,
                 mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.patch_embedding, self.pos = patch_embedding, pos
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(dim=dim, heads=heads, mlp_dim=mlp_dim, dropout=dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)   # pre-norm leaves the last residual sum un-normalised

    def until(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """images (B, C, S, S), normalised float -> the patch encodings (B, N, D) after the first k blocks
        (k = 0: patches + positions only)."""
        x = self.drop(self.pos(self.patch_embedding(images)))      # (B, C, S, S) -> (B, N, D)
        for block in self.blocks[:k]:
            x = block(x)
        return x

    def after(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Blocks k, k+1, ... and the final norm over x = until(images, k) (B, N, D) -> memory (B, N, D)."""
        for block in self.blocks[k:]:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S), normalised float -> memory (B, N, D): the whole encoder."""
        return self.after(self.until(images, 0), 0)


# ----------------------------------------------------------------------------------------------------------
# The prefix trie of database IDs

class IDTrie:
    """Prefix trie over the token sequences [BOS, digits..., EOS] of the database IDs, kept as tensors so that
    the constraint for all hypotheses of a beam search is one gather (constrained decoding, Tay et al. §3.2).

    Node 0 is the root (the prefix [BOS]). `children[node, token]` is the node reached by appending `token`,
    or -1 when no ID continues that way; `allowed = children >= 0`. IDs may have different lengths: a node
    can allow EOS (an ID ends there) and further digits. `id_of_node[node]` is the index in `ids` of the ID
    whose EOS leads to `node`, else -1.
    """

    def __init__(self, ids: list[str], vocab_size: int = VOCAB_SIZE) -> None:
        if not ids:
            raise ValueError("IDTrie needs at least one ID")
        if len(set(ids)) != len(ids):
            raise ValueError("IDTrie: IDs must be distinct")
        sequences = [encode_id(id_str) for id_str in ids]    # [BOS, digits..., EOS]; ValueError for a bad ID
        children, id_of_node, paths = [[-1] * vocab_size], [-1], []
        for index, sequence in enumerate(sequences):
            node, path = 0, [0]
            for token in sequence[1:]:
                if children[node][token] < 0:
                    children[node][token] = len(children)
                    children.append([-1] * vocab_size)
                    id_of_node.append(-1)
                node = children[node][token]
                path.append(node)
            id_of_node[node] = index
            paths.append(path)
        self.ids = list(ids)
        self.children = torch.tensor(children)                      # (T, V)
        self.allowed = self.children >= 0                           # (T, V)
        self.id_of_node = torch.tensor(id_of_node)                  # (T,)
        # Teacher-forcing view for exhaustive scoring: sequences (n, L) padded with PAD, and the node each
        # prefix sequence[:t+1] ends in (n, L-1); positions past EOS point at the root so they stay finite.
        self.sequences = ids_to_tensor(self.ids)                    # (n, L)
        self.max_len = self.sequences.shape[1]                      # BOS + longest ID + EOS
        self.prefix_nodes = torch.zeros(len(ids), self.max_len - 1, dtype=torch.long)
        for j, path in enumerate(paths):
            self.prefix_nodes[j, : len(path) - 1] = torch.tensor(path[:-1])

    def __len__(self) -> int:
        return len(self.ids)


def constrained_log_probs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The one score definition shared by `generate` and `score_all_ids`: tokens the trie does not allow
    after the current prefix get logit -inf, then log_softmax. logits (..., V), allowed bool (..., V)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()   # scores in >= fp32 under autocast
    return logits.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# The model

@contextlib.contextmanager
def _decoding(model: nn.Module) -> Iterator[None]:
    """Decode without dropout or autograd, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class ViTDSI(nn.Module):
    """Encoder-decoder Vision Transformer used as a Differentiable Search Index (paper §3.2)."""

    def __init__(self, config: ViTDSIConfig) -> None:
        super().__init__()
        self.config = c = config
        positional = SinusoidalPositionalEncoding if c.pos_encoding == "sinusoidal" else LearnedPositionalEncoding
        # Weights are drawn from torch's random generator in the order the parts are built, so this order is
        # part of what a seed means: first the inputs of both stacks (the patches and their positions, the ID
        # tokens and theirs), then the encoder's blocks, then the decoder's.
        patch_embedding = PatchEmbedding(image_size=c.image_size, patch_size=c.patch_size,
                                         channels=c.channels, dim=c.dim)
        patch_pos = positional(dim=c.dim, max_len=patch_embedding.num_patches)
        token_embedding = nn.Embedding(c.vocab_size, c.dim)
        token_pos = positional(dim=c.dim, max_len=c.max_len)
        block_args = dict(dim=c.dim, heads=c.heads, mlp_dim=c.mlp_dim, dropout=c.dropout)
        self.encoder = Encoder(patch_embedding, patch_pos, depth=c.depth, **block_args)
        self.token_embedding, self.decoder_pos, self.drop = token_embedding, token_pos, Dropout(c.dropout)
        self.decoder = nn.ModuleList(DecoderBlock(**block_args) for _ in range(c.depth))
        self.decoder_norm = nn.LayerNorm(c.dim)   # pre-norm leaves the last residual sum un-normalised
        self.head = nn.Linear(c.dim, c.vocab_size)
        self.register_buffer("causal", causal_mask(c.max_len), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S), normalised float -> memory (B, N, D)."""
        return self.encoder(images)

    def memory_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder block's cross-attention keys and values of memory (B, N, D): 2 x (B, H, N, hd)."""
        return [block.cross_attn.keys_values(memory) for block in self.decoder]

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor,
               memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Teacher forcing: memory (B, N, D), tokens (B*G, L) -> logits (B*G, L, V); position t predicts
        token t+1. Rows b*G .. b*G+G-1 of `tokens` belong to image b (G = 1 in training). `memory_kv` =
        memory_keys_values(memory) when the caller decodes the same memory many times (beam search)."""
        L = tokens.shape[1]
        assert L <= self.config.max_len, f"token sequence of length {L} exceeds max_len {self.config.max_len}"
        assert tokens.shape[0] % memory.shape[0] == 0, "tokens must hold the same number of rows per image"
        memory_kv = self.memory_keys_values(memory) if memory_kv is None else memory_kv
        x = self.drop(self.decoder_pos(self.token_embedding(tokens)))   # (B*G, L, D)
        mask = self.causal[:L, :L]
        for block, block_kv in zip(self.decoder, memory_kv):
            x = block(x, block_kv, mask)
        return self.head(self.decoder_norm(x))                          # (B*G, L, D) @ (D, V) -> (B*G, L, V)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S), tokens (B, L) -> logits (B, L, V)."""
        return self.decode(self.encode(images), tokens)

    def generate(self, images: torch.Tensor, trie: IDTrie, k: int = 10,
                 beam: int | None = None, trace: list | None = None) -> list[list[tuple[str, float]]]:
        """Batched beam search constrained by `trie`: per image, up to k DISTINCT valid IDs with their
        sequence log-probabilities (see `constrained_log_probs`; summed over digits and EOS), best first.

        All images x all live hypotheses go through one decoder call per step; the encoder runs once. A
        hypothesis that chooses EOS is a finished ID and joins a per-image pool of the k best; the `beam`
        best digit continuations stay alive. With beam >= len(trie) nothing is ever pruned, so the result
        equals ranking `score_all_ids`. `beam` defaults to k, and a narrower one is widened to k, since it
        could finish fewer than k IDs: fewer than k come back only when the trie holds fewer than k.
        An empty list as `trace` receives one dict per step about image 0 (`_trace_step`); None costs nothing.
        """
        if k < 1 or (beam is not None and beam < 1):
            raise ValueError(f"k and beam must be >= 1, got k={k}, beam={beam}")
        beam = k if beam is None else max(beam, k)
        if trie.max_len > self.config.max_len:
            raise ValueError(f"IDs of {trie.max_len - 2} digits exceed the model's max_len {self.config.max_len}")
        with _decoding(self):
            device = images.device
            children = trie.children.to(device)                       # (T, V)
            allowed = children >= 0                                   # (T, V)
            many_choices = allowed.sum(dim=1) > 1                     # (T,) nodes where the model must choose
            memory = self.encode(images)                              # (B, N, D), once for all steps
            memory_kv = self.memory_keys_values(memory)               # once, not at every step
            B = memory.shape[0]
            # Live hypotheses: token prefixes (B, W, t), their trie nodes (B, W) and log-probs (B, W);
            # a dead slot has score -inf and is parked at the root so that every lookup stays in range.
            tokens = torch.full((B, 1, 1), BOS, device=device)
            nodes = torch.zeros(B, 1, dtype=torch.long, device=device)
            score_dtype = torch.float64 if memory.dtype == torch.float64 else torch.float32
            scores = torch.zeros(B, 1, device=device, dtype=score_dtype)
            done_scores = scores.new_empty(B, 0)                      # (B, <=k) best finished IDs so far
            done_nodes = nodes.new_empty(B, 0)                        # (B, <=k) their terminal trie nodes
            for _ in range(trie.max_len - 1):
                candidates = self._continuations(memory, memory_kv, tokens, nodes, scores, allowed, many_choices)
                _trace_step(trace, trie, tokens, nodes, scores, candidates)   # before EOS and pruning mask them
                done_scores, done_nodes = _keep_best_finished(done_scores, done_nodes, candidates[..., EOS],
                                                              children[nodes, EOS], k)
                candidates[..., EOS] = float("-inf")                  # (B, W, V): digits only from here
                if done_scores.shape[1] == k:
                    # Log-probs only fall as a prefix grows: one below the k-th finished ID can never enter
                    # the top k, so drop it (this is exact, unlike a narrow beam).
                    candidates.masked_fill_(candidates < done_scores[:, -1:, None], float("-inf"))
                survivors = _best_continuations(candidates, tokens, nodes, children, beam)
                if survivors is None:
                    break
                tokens, nodes, scores = survivors
            id_index = trie.id_of_node.to(device)[done_nodes.clamp(min=0)]                   # (B, <=k)
        return [[(trie.ids[j], s) for j, s in zip(ids_row.tolist(), scores_row.tolist()) if s > float("-inf")]
                for ids_row, scores_row in zip(id_index, done_scores)]

    def _continuations(self, memory: torch.Tensor, memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
                       tokens: torch.Tensor, nodes: torch.Tensor, scores: torch.Tensor,
                       allowed: torch.Tensor, many_choices: torch.Tensor) -> torch.Tensor:
        """One beam-search step's candidates: the log-prob (B, W, V) of every hypothesis extended by every
        token, -inf where the trie forbids the token or the hypothesis is dead. tokens (B, W, t), nodes and
        scores (B, W); allowed (T, V) and many_choices (T,) as in `generate`."""
        (B, W, t), V = tokens.shape, self.config.vocab_size
        alive = scores > float("-inf")                                 # (B, W)
        if (many_choices[nodes] & alive).any():
            logits = self.decode(memory, tokens.reshape(B * W, t), memory_kv)   # (B*W, t, V)
            logits = logits[:, -1].reshape(B, W, V)                      # last position (B*W, V) -> (B, W, V)
        else:   # every live hypothesis has one allowed token, whose log-prob is log 1 = 0
            logits = scores.new_zeros(B, W, V)
        return scores.unsqueeze(-1) + constrained_log_probs(logits, allowed[nodes])   # (B, W, V)


def _keep_best_finished(done_scores: torch.Tensor, done_nodes: torch.Tensor, eos_scores: torch.Tensor,
                        eos_nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the IDs that EOS closes at this step (log-probs and terminal trie nodes, (B, W) each) into the
    pool of finished IDs (B, <=k), and keep the pool's k best, best first."""
    done_scores = torch.cat([done_scores, eos_scores], dim=1)          # (B, <=k) + (B, W) -> (B, <=k+W)
    done_nodes = torch.cat([done_nodes, eos_nodes], dim=1)
    done_scores, best = done_scores.topk(min(k, done_scores.shape[1]), dim=1)   # (B, <=k)
    return done_scores, done_nodes.gather(1, best)


def _best_continuations(candidates: torch.Tensor, tokens: torch.Tensor, nodes: torch.Tensor,
                        children: torch.Tensor, beam: int) -> tuple[torch.Tensor, ...] | None:
    """The next live hypotheses: per image, the `beam` best of all candidates (B, W, V), each a parent
    hypothesis among tokens (B, W, t) at trie nodes (B, W), extended by one token. Returns their tokens
    (B, W', t+1), nodes (B, W') and log-probs (B, W'), or None when no candidate is left in any image."""
    B, W, V = candidates.shape
    t = tokens.shape[2]
    flat = candidates.reshape(B, W * V)                                # (B, W, V) -> (B, W*V)
    width = min(beam, int(torch.isfinite(flat).sum(dim=1).max()))
    if width == 0:
        return None
    scores, index = flat.topk(width, dim=1)                            # (B, W')
    parent, token = index // V, index % V
    nodes = children[nodes.gather(1, parent), token]                   # (B, W'), -1 for dead slots
    nodes = nodes.masked_fill(scores == float("-inf"), 0)
    tokens = torch.cat([tokens.gather(1, parent[..., None].expand(-1, -1, t)),  # (B, W', t)
                        token[..., None]], dim=2)                                # -> (B, W', t+1)
    return tokens, nodes, scores


# ----------------------------------------------------------------------------------------------------------
# Exhaustive scoring

def score_all_ids(model: ViTDSI, images: torch.Tensor, trie: IDTrie, *,
                  ids_per_call: int = 256) -> torch.Tensor:
    """Exhaustive scoring: (B, n) sequence log-probability of every ID in the trie (column j = trie.ids[j])
    for every image, teacher-forced and batched, with the same definition as `generate`; the reference
    that beam search is tested against. It decodes every ID in full, so it costs about len(trie) / beam
    times a beam search. `ids_per_call` bounds the memory of one decoder call (B * ids_per_call rows)."""
    with _decoding(model):
        memory = model.encode(images)                                 # (B, N, D)
        memory_kv = model.memory_keys_values(memory)
        B, L = memory.shape[0], trie.max_len
        allowed = trie.allowed.to(images.device)
        out = []
        for start in range(0, len(trie), ids_per_call):
            seqs = trie.sequences[start: start + ids_per_call].to(images.device)             # (c, L)
            nodes = trie.prefix_nodes[start: start + ids_per_call].to(images.device)         # (c, L-1)
            c = seqs.shape[0]
            logits = model.decode(memory, seqs[:, :-1].repeat(B, 1), memory_kv)             # (B*c, L-1, V)
            logp = constrained_log_probs(logits.reshape(B, c, L - 1, -1), allowed[nodes])    # (B, c, L-1, V)
            target = seqs[:, 1:].expand(B, c, L - 1)                                         # (B, c, L-1)
            token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)                   # (B, c, L-1)
            out.append(token_logp.masked_fill(target == PAD, 0.0).sum(dim=-1))               # (B, c)
        return torch.cat(out, dim=1)                                                         # (B, n)


# ----------------------------------------------------------------------------------------------------------
# Dropout, drawn fast
#
# Every dropout above (on the embeddings, attention weights, MLP hidden units and residual branches) is
# `dropout` below: inverted dropout as torch's, with its random mask cut from fewer generator calls.
# `set_dropout` sets the rate, and the way masks are drawn, for a whole model.

DROPOUT_DRAWS = ("words", "torch")


def dropout(x: torch.Tensor, p: float, draw: str = "words") -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014), training only: zero each element with probability p and
    scale the rest by 1 / (1 - p), so the expected output is the input.

    draw="torch" is torch's `F.dropout`, one random number per element. draw="words" cuts 15 random bits per
    element out of 64-bit random words, a quarter of the generator calls: on a CPU the per-element draw takes
    a large share of a training step, since the generator runs on one thread. p is rounded to a multiple of 2^-15.
    """
    if p == 0.0:
        return x
    if draw == "torch":
        return F.dropout(x, p)
    n = x.numel()
    # Four 16-bit lanes per 64-bit word; random_() fills a word uniformly on [0, 2^63), so the top lane's sign
    # bit is always 0 and every lane keeps only its low 15 bits.
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_()   # (ceil(n/4),)
    bits = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF      # (ceil(n/4),) -> (4 ceil(n/4),)[:n] -> x.shape
    keep = bits >= round(p * 2 ** 15)                               # P(keep) = 1 - p
    return x * keep * (1.0 / (1.0 - p))                             # stays in x's dtype (bf16 under autocast)


class Dropout(nn.Dropout):
    """`nn.Dropout` whose mask comes from `dropout` (`draw` as there; `set_dropout` sets p and draw)."""

    def __init__(self, p: float, draw: str = "words") -> None:
        super().__init__(p)
        self.draw = draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.draw) if self.training else x


def set_dropout(model: nn.Module, p: float, draw: str | None = None) -> None:
    """Set every dropout rate of the model to p (e.g. 0 while memorising the index, where dropout only
    slows the overfit the indexing phase wants; paper §3.2 trains with 0.1 throughout), and, when given,
    how every mask is drawn (`dropout`)."""
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p, m.draw = p, draw or m.draw
        elif isinstance(m, MultiHeadAttention):
            m.dropout, m.draw = p, draw or m.draw


# ----------------------------------------------------------------------------------------------------------
# Watching the search (python train.py --query IMAGE --explain)

def _trace_step(trace: list | None, trie: IDTrie, tokens: torch.Tensor, nodes: torch.Tensor,
                scores: torch.Tensor, candidates: torch.Tensor) -> None:
    """`generate`'s trace of one step, image 0 only (the first image of the batch). With trace None it returns
    at once: an untraced search runs no extra op and no sync. Otherwise it appends a dict of plain data (str,
    float, lists of tuples; scores are summed log-probs, a prefix is the digits written so far, "" at first)
    and gives the previous dict its survivors, this step's prefixes; a step where image 0 has no live
    hypothesis left (other images still searching) adds nothing:

        {"step": t,                          0-based: this step writes token t + 1 after BOS, a digit or EOS
         "prefixes": [(prefix, score)],      the live hypotheses entering the step, best first
         "options": [[(token, logp, total)]],  per prefix, each token the trie allows ("0".."9" or "EOS"),
                                             best first: its log-prob and the extended score (score + logp)
         "finished": [(id, total)],          the IDs that EOS closes here, best first (the k best of all the
                                             steps' finished IDs are what `generate` returns)
         "survivors": [(prefix, score)]}     the hypotheses alive after the step (the beam's best digit
                                             continuations not below the k-th finished ID); [] at the end
    tokens (B, W, t), nodes and scores (B, W), candidates (B, W, V) as `_continuations` returns them.
    """
    if trace is None:
        return
    row_scores = scores[0].tolist()                                    # (W,)
    live = [w for w, s in enumerate(row_scores) if s > float("-inf")]
    if not live:
        return
    prefixes = [("".join(str(d) for d in tokens[0, w, 1:].tolist()), row_scores[w]) for w in live]
    step = tokens.shape[2] - 1
    if step > 0 and trace:
        trace[-1]["survivors"] = prefixes
    rows, row_nodes = candidates[0].tolist(), nodes[0].tolist()       # (W, V), (W,)
    options, finished = [], []
    for w in live:
        options.append(sorted(((("EOS" if v == EOS else str(v)), total - row_scores[w], total)
                               for v, total in enumerate(rows[w]) if total > float("-inf")), key=lambda o: -o[2]))
        if rows[w][EOS] > float("-inf"):
            end = int(trie.children[row_nodes[w], EOS])
            finished.append((trie.ids[int(trie.id_of_node[end])], rows[w][EOS]))
    trace.append({"step": step, "prefixes": prefixes, "options": options,
                  "finished": sorted(finished, key=lambda f: -f[1]), "survivors": []})
