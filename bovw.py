"""Bag of Visual Words: the index-then-retrieve baseline (paper §3.1).

The ViT DSI stores the database inside its weights; this chapter is the classic system it is compared with,
in four steps (Sivic & Zisserman, "Video Google", 2003; Csurka et al., 2004):

1. describe  - every image becomes a bag of grey SIFT descriptors (OpenCV), one 128-d vector per keypoint;
2. vocabulary - k-means (written out below) clusters the indexed database's descriptors into K visual words
               (paper: K = 200);
3. index     - every database image becomes a histogram over the K words (how often each word occurs);
4. retrieve  - a query's histogram is compared with all database histograms by cosine similarity, best first.

The same k-means also gives the DSI label-free *semantic* IDs: ``hierarchical_ids`` clusters any per-image
features (e.g. the IDB's BoVW histograms, ``BoVWIndex.database``) recursively, as in Tay et al. 2022 §3.2.

Usage::

    index = BoVWIndex(k=200, seed=0).fit(idb_images)            # (n, S, S, 3) uint8 RGB
    positions, scores = index.query(query_images, top_k=100)    # (B, k') IDB positions, best first

Conventions:
- Results are 0-based positions into the array passed to ``fit`` ("IDB image i"); the caller maps them to IDs.
- Histograms are raw word counts compared by cosine similarity, the paper's variant.
- An image without keypoints has an all-zero histogram. Its cosine with everything is defined as 0, so as a
  query it ranks the database in IDB order, and as a database image it comes after every image that shares a
  word with the query. Ties are always broken by IDB position (lower first): the sort is stable.
- Fewer descriptors than words: ``kmeans`` raises ``ValueError``; ``BoVWIndex.fit`` instead lowers the number
  of words to the number of descriptors it has and records it in ``n_words`` (a tiny database still gets an
  index; ``k`` keeps the value that was asked for). A database with no keypoints at all raises ``BoVWError``.

Library code only: explicit seeds, no printing, no file access.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

SIFT_DIM = 128               # length of a SIFT descriptor (4 x 4 cells x 8 orientation bins, Lowe 2004 §6.1)
ASSIGN_CHUNK_ELEMENTS = 1 << 22  # rows x centroids per distance block: 4M float32 = 16 MiB, bounds memory


class BoVWError(ValueError):
    """Bad input to the index (no usable keypoints, invalid k); str(e) is one line naming problem and fix."""


# ----------------------------------------------------------------------------- 1. describe

def sift_descriptors(image: np.ndarray) -> np.ndarray:
    """Grey SIFT descriptors of one image (Lowe 2004).

    image: (H, W, 3) uint8 RGB (a 2-d grey image is accepted as is).
    Returns (m, 128) float32, one row per keypoint, with OpenCV's default detector settings; m may be 0
    (a blank image has no keypoints).
    """
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    # A fresh detector per call keeps the function pure (no shared state between callers or threads).
    _, descriptors = cv2.SIFT_create().detectAndCompute(grey, None)
    if descriptors is None:  # OpenCV returns None, not an empty array, when it finds no keypoint
        return np.zeros((0, SIFT_DIM), np.float32)
    return descriptors.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- 2. vocabulary (k-means)

def assign(x: np.ndarray, centroids: np.ndarray, x_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of x: (n, d), (k, d) -> (labels (n,) int64, squared distances (n,) float32).

    Vectorised over all rows, in chunks so that the (rows, k) distance block stays about 16 MiB.
    Equal distances go to the lower centroid index (argmin takes the first).
    """
    n, k = len(x), len(centroids)
    if x_sq is None:
        x_sq = np.einsum("nd,nd->n", x, x)
    c_sq = np.einsum("kd,kd->k", centroids, centroids)
    labels = np.empty(n, np.int64)
    dist = np.empty(n, np.float32)
    chunk = max(1, ASSIGN_CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # ||x||^2 is the same for every centroid, so the argmin only needs ||c||^2 - 2 x.c; add ||x||^2 after.
        partial = c_sq[None, :] - 2.0 * (x[start:stop] @ centroids.T)  # (b, d) @ (d, k) -> (b, k)
        best = partial.argmin(axis=1)
        labels[start:stop] = best
        dist[start:stop] = partial[np.arange(stop - start), best] + x_sq[start:stop]
    return labels, np.maximum(dist, 0.0)


def kmeans_plusplus(
    x: np.ndarray, k: int, rng: np.random.Generator, x_sq: np.ndarray | None = None, x_t: np.ndarray | None = None
) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007): (n, d) -> (k, d) float32 initial centroids.

    Each new centre is drawn with probability proportional to D(x)^2, the squared distance to the nearest centre
    chosen so far. "Greedy": 2 + ln k candidates are drawn per step and the one that lowers the total D^2 most is
    kept - the variant of the paper's §6 used by scikit-learn and, with 3 trials, by cv2.kmeans.
    x_sq (n,) and x_t = x.T (d, n) contiguous may be passed in when the caller already has them.
    """
    n = len(x)
    x_sq = np.einsum("nd,nd->n", x, x) if x_sq is None else x_sq
    # x.T kept contiguous so that each step is (few, d) @ (d, n), a layout BLAS handles better than (n, d) @ (d, few).
    x_t = np.ascontiguousarray(x.T) if x_t is None else x_t

    def squared_distances(points: np.ndarray) -> np.ndarray:
        """(m, d) -> (m, n) squared distances to every x, by ||p||^2 - 2 p.x + ||x||^2 (clipped: rounding)."""
        d2 = (points * points).sum(axis=1)[:, None] - 2.0 * (points @ x_t) + x_sq[None, :]  # (m, d) @ (d, n)
        return np.maximum(d2, 0.0)

    trials = 2 + int(math.log(k))
    centroids = np.empty((k, x.shape[1]), np.float32)
    first = int(rng.integers(n))
    centroids[0] = x[first]
    closest = squared_distances(x[first : first + 1])[0]  # D(x)^2, (n,)
    for j in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        total = cumulative[-1]
        if total > 0:
            candidates = np.searchsorted(cumulative, rng.random(trials) * total, side="right")
            candidates = np.minimum(candidates, n - 1)  # guards against rounding at the very top of the cdf
        else:  # every point sits on a chosen centre (duplicates): nothing to prefer, draw uniformly
            candidates = rng.integers(n, size=trials)
        # D^2 if each candidate were added: (trials, n); keep the candidate with the smallest total.
        with_candidate = np.minimum(closest[None, :], squared_distances(x[candidates]))
        best = int(with_candidate.sum(axis=1, dtype=np.float64).argmin())
        centroids[j] = x[candidates[best]]
        closest = with_candidate[best]
    return centroids


def kmeans(
    x: np.ndarray,
    k: int,
    rng: np.random.Generator,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means (Lloyd 1982) with greedy k-means++ seeding, written out in numpy.

    x: (n, d) data (cast to float32). k: number of clusters, 1 <= k <= n, else ``ValueError``.
    rng: the only source of randomness (seeding); the same generator state gives the same result.
    Stops after ``max_iter`` Lloyd iterations (assign + update), or as soon as one iteration lowers the inertia
    by less than ``tol`` times its previous value (a relative, scale-free test).
    Empty clusters: a cluster left without points is re-seeded with the point farthest from its own centroid
    (taken from a cluster that keeps at least one point), which is the largest single drop in inertia available.
    Returns (centroids (k, d) float32, labels (n,) int64, inertia float) where labels are the nearest final
    centroid and inertia = sum of squared distances to it, recomputed exactly in float64.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects a 2-d array (n, d), got shape {x.shape}")
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: cannot make k={k} clusters from {n} points; use 1 <= k <= {n}")
    x_sq = np.einsum("nd,nd->n", x, x)
    x_t = np.ascontiguousarray(x.T)  # (d, n): one contiguous row per dimension makes the bincount sums fast
    centroids = kmeans_plusplus(x, k, rng, x_sq, x_t)
    previous = np.inf
    for _ in range(max_iter):
        labels, dist = assign(x, centroids, x_sq)
        counts = np.bincount(labels, minlength=k)
        for empty in np.flatnonzero(counts == 0):
            # Points whose cluster would become empty if they left are not candidates.
            donors = np.where(counts[labels] > 1, dist, -1.0)
            far = int(donors.argmax())
            counts[labels[far]] -= 1
            labels[far], dist[far], counts[empty] = empty, 0.0, 1
        inertia = float(dist.sum(dtype=np.float64))
        # Centroid = mean of its points; per-dimension bincount is a vectorised group-by-sum.
        sums = np.stack([np.bincount(labels, weights=row, minlength=k) for row in x_t], axis=1)  # (k, d)
        centroids = (sums / counts[:, None]).astype(np.float32)
        if np.isfinite(previous) and previous - inertia <= tol * previous:
            break
        previous = inertia
    labels, _ = assign(x, centroids, x_sq)
    return centroids, labels, exact_inertia(x, centroids, labels)


def exact_inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of each row of x to centroids[labels], by direct differences in float64.

    The matmul trick in ``assign`` loses a little precision to cancellation; the reported inertia should not.
    """
    total = 0.0
    chunk = max(1, ASSIGN_CHUNK_ELEMENTS // x.shape[1])
    for start in range(0, len(x), chunk):
        diff = x[start : start + chunk].astype(np.float64) - centroids[labels[start : start + chunk]]
        total += float(np.einsum("nd,nd->", diff, diff))
    return total


# ----------------------------------------------------------------------------- 3-4. index and retrieve

def word_counts(descriptor_lists: list[np.ndarray], centroids: np.ndarray) -> np.ndarray:
    """Visual-word histogram of each image: list of (m_i, d) descriptors, (K, d) words -> (B, K) float32 counts.

    All descriptors are assigned in one go; one bincount over (image, word) pairs then builds every histogram.
    """
    n_words = len(centroids)
    owner = np.repeat(np.arange(len(descriptor_lists)), [len(d) for d in descriptor_lists])  # image of each row
    if len(owner) == 0:
        return np.zeros((len(descriptor_lists), n_words), np.float32)
    words, _ = assign(np.concatenate(descriptor_lists).astype(np.float32, copy=False), centroids)
    flat = np.bincount(owner * n_words + words, minlength=len(descriptor_lists) * n_words)
    return flat.reshape(len(descriptor_lists), n_words).astype(np.float32)


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, so that a dot product is the cosine; all-zero rows stay zero (cosine 0)."""
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


class BoVWIndex:
    """A visual vocabulary plus the database's histograms; answers queries by cosine similarity.

    Keyword arguments:
    k               - number of visual words (paper §3.1: 200).
    seed            - seeds the descriptor subsample and k-means; same seed and images -> same index.
    max_iter        - k-means iteration cap.
    max_descriptors - the vocabulary is learnt from at most this many IDB descriptors, drawn at random
                      (None: all of them), which bounds the cost of k-means whatever the database size; every
                      descriptor is still used for the histograms.
    Histograms are raw word counts, L2-normalised, so the score is the cosine similarity (paper §3.1).
    After ``fit``: ``centroids`` (n_words, 128) is the vocabulary and ``database`` (n, n_words) the IDB's own
    histograms, row i = IDB image i (all-zero for an image without keypoints) - read it, don't write it; these
    are label-free features for ``hierarchical_ids``.
    """

    def __init__(
        self,
        *,
        k: int = 200,
        seed: int = 0,
        max_iter: int = 100,
        max_descriptors: int | None = 100_000,
    ) -> None:
        if k < 1:
            raise BoVWError(f"BoVW vocabulary size k={k} is invalid; use k >= 1 (paper: 200; train.py --bovw-k)")
        self.k, self.seed, self.max_iter, self.max_descriptors = k, seed, max_iter, max_descriptors
        self.centroids: np.ndarray | None = None  # (n_words, 128) float32, the vocabulary
        self.database: np.ndarray | None = None   # (n, n_words) float32 L2-normalised word counts

    @property
    def n_words(self) -> int:
        """Words actually in the vocabulary: ``k``, or fewer if the IDB had fewer descriptors than ``k``."""
        assert self.centroids is not None, "BoVWIndex is not fitted: call fit(images) first"
        return len(self.centroids)

    def describe(self, images: np.ndarray) -> list[np.ndarray]:
        """SIFT descriptors of each image: (B, S, S, 3) uint8 -> list of B (m_i, 128) arrays."""
        return [sift_descriptors(image) for image in images]

    def fit(self, images: np.ndarray) -> BoVWIndex:
        """Learn the vocabulary from the IDB images, then index them. images: (n, S, S, 3) uint8 RGB."""
        descriptor_lists = self.describe(images)
        pool = np.concatenate(descriptor_lists) if descriptor_lists else np.zeros((0, SIFT_DIM), np.float32)
        if len(pool) == 0:
            raise BoVWError(f"BoVW: no SIFT keypoints in any of the {len(images)} database images; "
                            "use larger or more textured images (e.g. a larger image size)")
        rng = np.random.default_rng(self.seed)
        if self.max_descriptors is not None and len(pool) > self.max_descriptors:
            pool = pool[np.sort(rng.choice(len(pool), size=self.max_descriptors, replace=False))]
        # Fewer descriptors than words: a vocabulary can have at most one word per descriptor (documented above).
        self.centroids, _, _ = kmeans(pool, min(self.k, len(pool)), rng, max_iter=self.max_iter)
        self.database = l2_normalize(word_counts(descriptor_lists, self.centroids))
        return self

    def embed(self, descriptor_lists: list[np.ndarray]) -> np.ndarray:
        """L2-normalised word histograms: list of B (m_i, 128) descriptor arrays -> (B, n_words) float32."""
        assert self.centroids is not None, "BoVWIndex is not fitted: call fit(images) first"
        return l2_normalize(word_counts(descriptor_lists, self.centroids))

    def search(self, vectors: np.ndarray, top_k: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """Rank the database for each embedded query: (B, n_words) -> (positions, scores), both (B, k').

        k' = min(top_k, n). positions are 0-based IDB positions, best first; scores are cosine similarities
        (float32). Ties, e.g. every score of an all-zero query, keep IDB order (stable sort).
        """
        assert self.database is not None, "BoVWIndex is not fitted: call fit(images) first"
        scores = vectors @ self.database.T  # (B, K) @ (K, n) -> (B, n): the whole database in one product
        k_out = min(top_k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k_out]  # (B, k')
        return order.astype(np.int64), np.take_along_axis(scores, order, axis=1).astype(np.float32)

    def query(self, images: np.ndarray, top_k: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """Top-k IDB positions and cosine scores for each query image: (B, S, S, 3) uint8 -> two (B, k') arrays."""
        return self.search(self.embed(self.describe(images)), top_k)


# ----------------------------------------------------------------------------- 5. semantic IDs without labels

def hierarchical_ids(
    features: np.ndarray, rng: np.random.Generator, *, branches: int = 10, leaf_size: int = 10
) -> list[str]:
    """Semantic IDs by hierarchical k-means: (n, d) features -> the ID string of each item, in input order.

    Tay et al. 2022, "Transformer Memory as a Differentiable Search Index", §3.2 (semantically structured
    identifiers); no labels needed. For the IDB, ``BoVWIndex(...).fit(images).database`` gives L2-normalised
    histograms, on which Euclidean k-means groups images as cosine similarity would.

    Conventions:
    - A group of more than ``leaf_size`` items is split by ``kmeans`` into min(branches, size) clusters; the
      next digit of an item is the rank of its cluster among the non-empty ones (by cluster index), and each
      cluster is split again in the same way. A group of m <= ``leaf_size`` items ends the IDs: its items get
      the digits 0..m-1 in input order. So n <= leaf_size gives "0".."n-1", and similar items share long prefixes.
    - Fallback: when k-means leaves a group in a single cluster (identical features, e.g. the all-zero
      histograms of blank images), the group is cut into min(branches, size) nearly equal runs of consecutive
      items in input order (``np.array_split``: the first runs one item longer). Every group is thus smaller
      than its parent and the recursion ends.
    - IDs are distinct decimal strings, may differ in length, and none is a prefix of another (an ID ends only
      at a leaf and sibling digits differ), as the decoder's prefix trie with EOS needs; see ``prefix_free``.
    - Groups are split depth-first in digit order, so the same generator state gives the same IDs.
    branches: 2..10 and leaf_size: 1..10, so that one decimal digit names a child; else ``ValueError``.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"hierarchical_ids expects finite (n, d) features, got shape {x.shape}")
    if not (2 <= branches <= 10 and 1 <= leaf_size <= 10):
        raise ValueError(f"hierarchical_ids: branches={branches}, leaf_size={leaf_size} do not fit one decimal "
                         "digit per level; use 2 <= branches <= 10 and 1 <= leaf_size <= 10")
    ids = [""] * len(x)
    stack = [(np.arange(len(x)), "")]   # (items, their prefix); a stack, so no tree is too deep for Python
    while stack:
        members, prefix = stack.pop()
        if len(members) <= leaf_size:
            for digit, item in enumerate(members.tolist()):
                ids[item] = f"{prefix}{digit}"
            continue
        k = min(branches, len(members))
        _, labels, _ = kmeans(x[members], k, rng)
        # Duplicate centroids leave clusters empty; renumbering the non-empty ones keeps the digits 0..c-1.
        _, digits = np.unique(labels, return_inverse=True)
        if digits.max() == 0:  # one cluster holds everything (identical features): the Fallback above
            groups = np.array_split(members, k)
        else:
            groups = [members[digits == d] for d in range(digits.max() + 1)]
        # Reversed onto the stack, so that groups are popped - and the rng used - in digit order.
        stack.extend((group, f"{prefix}{d}") for d, group in reversed(list(enumerate(groups))))
    assert prefix_free(ids), "hierarchical_ids: built IDs that are not prefix-free (a bug)"
    return ids


def prefix_free(ids: list[str]) -> bool:
    """True when the IDs are distinct and none is a prefix of another (a trie with EOS then has one ID per leaf).

    Sorted, any string that is a prefix of another is a prefix of the string right after it: one pass suffices.
    """
    ordered = sorted(ids)
    return not any(b.startswith(a) for a, b in zip(ordered, ordered[1:]))
