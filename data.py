"""What a DSI needs from the data: a split, relevance, document IDs, their tokens, and tensors.

Paper: Di Stefano, "Vision Transformer Memory as a Differentiable Search Index for Image Retrieval",
§2.1 (splits, ID schemes) and §2.2 (ID tokens). A Differentiable Search Index answers a query image by
writing the ID of a database image, one digit token at a time. So the data must give it:

- tokens (§2.2): a vocabulary of the ten digits plus BOS, EOS and PAD;
- a split (§2.1): ``db_size`` images drawn from the pool, stratified by class; a share of them is the
  indexed database (IDB) the model memorises, the rest are retrieval queries for training, validation
  and test, so no image is both indexed and a query;
- relevance: which IDB images are right answers to a query (those sharing a label with it);
- document IDs (§2.1): one digit string per IDB image, random, clustered (a class prefix) or semantic
  (hierarchical k-means over the images' own features, no labels);
- the tokens of an ID: the target sequence BOS, digits, EOS, and back;
- tensors for training: images decoded once as uint8, normalised per batch, and augmented views of them.

Where the images come from (folders, COCO JSON, the synthetic set, the §2.1 preprocessing) is support
code, ``support/sources.py``; it hands over an ``ImageSet``.

Typical use (what ``train.py`` does)::

    from support.sources import load_dataset
    imageset = load_dataset("synthetic", db_size=512, seed=0)
    split = split_dataset(imageset, db_size=512, seed=0)
    idb_ids = assign_ids(imageset.primary[split.idb], "clustered")
    targets = ids_to_tensor(idb_ids)                 # (n, L): BOS, digits, EOS
    images = images_to_tensor(imageset.images)       # (N, 3, S, S) uint8, decoded once
    batch = normalize(images[split.idb[:32]])        # (32, 3, S, S) float32 in [-1, 1]

Bad user input raises ``DataError``: one line naming the problem and the fix. The code is pure
(explicit seeds, no printing, no file access).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

import bovw
from support.sources import DataError, ImageSet

# ---------------------------------------------------------------- tokens (paper §2.2)

# Digits 0-9 are tokens 0-9, then BOS, EOS, PAD (10 is unused).
BOS = 11
EOS = 12
PAD = 13
VOCAB_SIZE = 14


# ---------------------------------------------------------------- the split (paper §2.1)

QUERY_FRACTIONS = (0.8, 0.1, 0.1)  # paper §2.1: retrieval queries -> train / validation / test


@dataclass
class Split:
    """Index arrays (int64, sorted) into an ImageSet; position i of ``idb`` is "IDB image i"."""

    idb: np.ndarray  # indexed database (paper: Indexing Dataset)
    train: np.ndarray  # retrieval queries for fine-tuning
    val: np.ndarray  # retrieval queries for early stopping
    test: np.ndarray  # retrieval queries that are scored


def split_sizes(db_size: int, index_fraction: float = 0.25) -> tuple[int, int, int, int]:
    """(IDB, train, val, test) sizes: index_fraction of db_size indexed, the queries split 0.8/0.1/0.1."""
    def nearest(x: float) -> int:
        return int(math.floor(x + 0.5))  # halves round up, unlike Python's round-half-even
    n_idb = nearest(db_size * index_fraction)
    n_query = db_size - n_idb
    n_val, n_test = nearest(n_query * QUERY_FRACTIONS[1]), nearest(n_query * QUERY_FRACTIONS[2])
    return n_idb, n_query - n_val - n_test, n_val, n_test


def _interleave(sizes: Sequence[int]) -> np.ndarray:
    """A sequence with ``sizes[k]`` copies of each k, spread evenly: every stretch of it is close to
    proportional, so cutting items laid out class by class gives each class its share (±1) of each part."""
    slot = np.concatenate([(np.arange(size) + 0.5) / size for size in sizes if size > 0])
    part = np.concatenate([np.full(size, k) for k, size in enumerate(sizes) if size > 0])
    return part[np.argsort(slot, kind="stable")]


def _stratified_parts(primary: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Assign each item a part k (``sizes[k]`` items each), stratified by class, random within class."""
    classes = rng.permutation(np.unique(primary))
    layout = np.concatenate([rng.permutation(np.flatnonzero(primary == cls)) for cls in classes])  # (n,) by class
    parts = np.empty(len(primary), dtype=np.int64)
    parts[layout] = _interleave(sizes)
    return parts


def split_dataset(imageset: ImageSet, db_size: int, index_fraction: float = 0.25, seed: int = 0) -> Split:
    """Draw db_size images (stratified by primary class, seeded), then split them, stratified too:
    index_fraction -> IDB, the rest -> train/val/test queries 0.8/0.1/0.1. Arrays come sorted."""
    if not 0 < index_fraction < 1:
        raise DataError(f"index fraction {index_fraction} is outside (0, 1); pass e.g. --index-fraction 0.25")
    available = len(imageset)
    if db_size > available:
        raise DataError(f"db-size {db_size} is more than the {available} images available; "
                        f"use --db-size {available} or less")
    sizes = split_sizes(db_size, index_fraction)
    if min(sizes) < 1:
        smallest = next(n for n in range(db_size + 1, 10 ** 7) if min(split_sizes(n, index_fraction)) >= 1)
        raise DataError(f"db-size {db_size} is too small to give every split an image (IDB/train/val/test = "
                        f"{'/'.join(map(str, sizes))}); use --db-size {smallest} or more")
    rng = np.random.default_rng(seed)
    drawn = np.flatnonzero(_stratified_parts(imageset.primary, [db_size, available - db_size], rng) == 0)
    parts = _stratified_parts(imageset.primary[drawn], sizes, rng)
    idb, train, val, test = (drawn[parts == k] for k in range(4))
    return Split(idb=idb, train=train, val=val, test=test)


def stratified_subsets(primary: np.ndarray, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Cut items into parts of ``sizes[k]`` items each, stratified by class, random within class (seeded):
    sorted positions per part. Used to leave part of the IDB out of a first index, and to cut what is
    added later into steps, so that every part holds each class in proportion (±1)."""
    if sum(sizes) != len(primary):
        raise ValueError(f"sizes {list(sizes)} do not add up to the {len(primary)} items")
    parts = _stratified_parts(np.asarray(primary, dtype=np.int64), sizes, np.random.default_rng(seed))
    return [np.flatnonzero(parts == k) for k in range(len(sizes))]


def hold_out(split: Split, primary: np.ndarray, fraction: float, seed: int) -> tuple[Split, np.ndarray]:
    """The split whose IDB lacks a stratified `fraction` of its images, and those images' positions.

    ``primary`` is the primary class of every image of the ImageSet (``imageset.primary``). The queries
    stay as drawn, so a model indexed on the rest and grown later is scored on the same test queries as
    one that indexed the whole IDB from the start."""
    n_out = math.floor(len(split.idb) * fraction + 0.5)
    if n_out == 0:
        return split, np.zeros(0, np.int64)
    if n_out >= len(split.idb):
        raise DataError(f"--index-hold-out {fraction} leaves no IDB image to index; pass a smaller fraction")
    keep, out = stratified_subsets(primary[split.idb], [len(split.idb) - n_out, n_out], seed)
    return replace(split, idb=split.idb[keep]), split.idb[out]


# ---------------------------------------------------------------- relevance

def relevant_sets(query_labels: list[frozenset], idb_labels: list[frozenset],
                  idb_ids: list[str]) -> list[set[str]]:
    """Relevant IDB IDs per query: those sharing at least one label (paper: same class; COCO: a common
    category). A query can have none (R = 0); the metrics leave such queries out."""
    holders: dict[int, set[str]] = {}
    for labels, id_str in zip(idb_labels, idb_ids, strict=True):
        for label in labels:
            holders.setdefault(label, set()).add(id_str)
    return [set().union(*(holders.get(label, ()) for label in labels)) for labels in query_labels]


# ---------------------------------------------------------------- document IDs (paper §2.1)

def assign_ids(primary: np.ndarray, scheme: str, seed: int = 0, images: np.ndarray | None = None,
               bovw_k: int = 200) -> list[str]:
    """The ID string of each IDB image, in IDB order (paper §2.1). ``primary``: (n,) class per IDB image.

    "random": a seeded shuffle of 0..n-1, fixed width (digits of n-1), zero-padded.
    "clustered": a class prefix, then a per-class counter: image j of class c (in IDB order) gets
    f"{c:0{cw}d}{j:0{kw}d}". The prefix width cw holds every class index (digits of max class); the
    counter width kw holds twice the largest class (digits of 2 * largest - 1), so a class can grow
    without renumbering. A class's IDs are consecutive and share their first cw digits: the decoder's
    first cw steps choose the class, the rest the image. The seed is not used.
    "semantic" (Tay et al. 2022, §3.2): hierarchical k-means over the IDB's own BoVW histograms
    (``bovw_k`` visual words), features made without labels, so that similar-looking images share ID
    prefixes. Needs ``images``, the IDB images (n, S, S, 3) uint8 in IDB order; the labels are not used.
    The IDs may differ in length; none is a prefix of another.
    """
    primary = np.asarray(primary, dtype=np.int64)
    n = len(primary)
    if scheme == "random":
        width = len(str(max(n - 1, 0)))
        return [f"{number:0{width}d}" for number in np.random.default_rng(seed).permutation(n)]
    if scheme == "semantic":
        if images is None:
            raise DataError("semantic IDs are built from the IDB images; pass images=imageset.images[split.idb]")
        if len(images) != n:
            raise ValueError(f"semantic IDs: {len(images)} images for {n} IDB entries; pass the IDB's images")
        histograms = bovw.BoVWIndex(k=bovw_k, seed=seed).fit(images).database  # (n, words) L2-normalised
        return bovw.hierarchical_ids(histograms, np.random.default_rng(seed))
    if scheme != "clustered":
        raise DataError(f"unknown ID scheme '{scheme}'; use 'random', 'clustered' or 'semantic'")
    if n == 0:
        return []
    class_width = clustered_prefix_width(primary)
    counter_width = len(str(2 * int(np.bincount(primary).max()) - 1))
    counter = np.zeros(int(primary.max()) + 1, dtype=np.int64)
    ids = []
    for c in primary.tolist():
        ids.append(f"{c:0{class_width}d}{counter[c]:0{counter_width}d}")
        counter[c] += 1
    return ids


def clustered_prefix_width(primary: np.ndarray) -> int:
    """Digits of a clustered ID's class prefix: enough for the largest class index among the IDB's."""
    return len(str(int(np.max(primary))))


# ---------------------------------------------------------------- tokens of an ID (paper §2.2)

def encode_id(id_str: str) -> list[int]:
    """ "042" -> [BOS, 0, 4, 2, EOS] (paper §2.2)."""
    if not id_str or not id_str.isdigit() or not id_str.isascii():
        raise ValueError(f"an ID is a non-empty string of digits 0-9, got {id_str!r}")
    return [BOS, *(int(digit) for digit in id_str), EOS]


def decode_tokens(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> str | None:
    """Inverse of encode_id, ignoring trailing PAD; None unless it is BOS, one or more digits, EOS."""
    values = [int(t) for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
    while values and values[-1] == PAD:
        values.pop()
    if len(values) < 3 or values[0] != BOS or values[-1] != EOS:
        return None
    digits = values[1:-1]
    if not all(0 <= t <= 9 for t in digits):
        return None
    return "".join(map(str, digits))


def ids_to_tensor(ids: list[str]) -> torch.Tensor:
    """(n, L) int64 target sequences BOS, digits, EOS; shorter ones right-padded with PAD."""
    sequences = [encode_id(id_str) for id_str in ids]
    length = max((len(seq) for seq in sequences), default=2)
    out = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, :len(seq)] = torch.tensor(seq)
    return out


# ---------------------------------------------------------------- tensors for training

def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) uint8, contiguous: decoded once, normalised per batch.

    This is a copy; drop the numpy array afterwards to keep a single copy in memory."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (n, S, S, 3) -> (n, 3, S, S)


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32 in [-1, 1], i.e. (x / 255 - 0.5) / 0.5."""
    if batch_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {batch_uint8.dtype}")
    return (batch_uint8.to(torch.float32) / 255 - 0.5) / 0.5


# ---------------------------------------------------------------- augmented views (beyond the paper)

AUGMENT_SCALE = (0.6, 1.0)       # share of the image area a random crop keeps (cf. Inception-style crops)
AUGMENT_JITTER = 0.2             # brightness shift and contrast factor range, in normalised units


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random views of a batch: resized crop, horizontal flip, brightness/contrast jitter.

    x is a normalised (B, 3, S, S) float batch (see `normalize`); returns a new batch of the same shape.
    One affine warp per image, all in a single batched `grid_sample`, so it costs little next to a
    training step. Used as pseudo-queries for the indexed images (the image analogue of DSI-QG query
    generation) and to regularise retrieval training.
    """
    B = x.shape[0]
    u = lambda lo, hi: torch.empty(B).uniform_(lo, hi, generator=generator)  # noqa: E731
    side = u(*AUGMENT_SCALE).sqrt()                                      # crop side / image side
    flip = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    shift_x, shift_y = (1 - side) * u(-1, 1), (1 - side) * u(-1, 1)     # crop centre stays inside the image
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = side * flip, shift_x                # (B, 2, 3) output -> input coordinates
    theta[:, 1, 1], theta[:, 1, 2] = side, shift_y
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)  # (B, S, S, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)                          # (B, 1, 1, 1)
    contrast = 1 + u(-AUGMENT_JITTER, AUGMENT_JITTER).view(B, 1, 1, 1).to(x.device)
    brightness = u(-AUGMENT_JITTER, AUGMENT_JITTER).view(B, 1, 1, 1).to(x.device)
    return ((out - mean) * contrast + mean + brightness).clamp(-1, 1)
