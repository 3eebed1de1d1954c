"""Retrieval metrics for the ViT-DSI and the BoVW baseline, in plain Python.

Paper: Di Stefano, "Vision Transformer Memory as a Differentiable Search Index for Image Retrieval",
§3.3 (evaluation): indexing accuracy IA@k, MAP@10, P@10, Recall@10 and Recall@100. Both models are
scored by these same functions on the same queries (the seed code's "MAP@10" was in fact P@10).

Conventions, for one query:
- ``ranked`` is the model's ranked list of database IDs, best first. Ranks are 1-based in the formulas:
  position i = 1 is the top. IDs must be distinct (a duplicate raises ValueError). The list may be
  shorter than k, or empty: the missing places count as not relevant (never padded).
- ``relevant`` is the set of relevant database IDs; R = |relevant|.
- ``k`` is a cut-off, an integer >= 1 (else ValueError). k larger than the list is fine (see above).
- R = 0 (no relevant image in the database, possible with COCO): precision is 0, recall and average
  precision are undefined and raise ValueError; the means over queries leave such queries out.

Usage::

    precision_at_k(["07", "03", "11"], {"03", "05"}, k=2)     # 0.5
    retrieval_metrics(rankings, relevants)                   # {"MAP@10": ..., "P@10": ..., ...}

IDs can be any hashable values (ID strings in practice). The functions are pure: no printing, no files.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from numbers import Integral

RETRIEVAL_KEYS = ("MAP@10", "P@10", "Recall@10", "Recall@100")


def _top_k(ranked: Iterable[Hashable], k: int) -> list[Hashable]:
    """The first k entries of ``ranked`` after checking k and that the whole list has no duplicate."""
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    ranked = list(ranked)
    if len(set(ranked)) != len(ranked):
        seen: set = set()
        duplicate = next(x for x in ranked if x in seen or seen.add(x))
        raise ValueError(f"ranked list repeats the ID {duplicate!r}; a ranking holds distinct IDs")
    return ranked[:k]


def _hits(ranked: Iterable[Hashable], relevant: set, k: int) -> int:
    return sum(1 for x in _top_k(ranked, k) if x in relevant)


def precision_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    """P@k = |top-k ∩ relevant| / k. Divides by k even when the list is shorter; R = 0 gives 0."""
    return _hits(ranked, relevant, k) / k


def recall_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    """Recall@k = |top-k ∩ relevant| / R. R = 0 raises ValueError (undefined)."""
    hits = _hits(ranked, relevant, k)
    if not relevant:
        raise ValueError("recall is undefined for a query with no relevant item (R = 0)")
    return hits / len(relevant)


def average_precision_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    """AP@k = (1 / min(k, R)) · Σ_{i ≤ k} P@i · rel_i, ranks i 1-based, rel_i = 1 if place i is relevant.

    Dividing by min(k, R) makes a perfect top-k score 1 even when R > k. R = 0 raises ValueError.
    """
    top = _top_k(ranked, k)
    if not relevant:
        raise ValueError("average precision is undefined for a query with no relevant item (R = 0)")
    hits, total = 0, 0.0
    for i, x in enumerate(top, start=1):
        if x in relevant:
            hits += 1
            total += hits / i  # P@i at a relevant place i
    return total / min(k, len(relevant))


def _paired(rankings: Sequence, others: Sequence, what: str) -> None:
    if len(rankings) != len(others):
        raise ValueError(f"got {len(rankings)} rankings but {len(others)} {what}")


def mean_average_precision_at_k(rankings: Sequence[Sequence[Hashable]], relevants: Sequence[set], k: int) -> float:
    """MAP@k: mean of AP@k over the queries with R > 0 (ValueError if there is none)."""
    _paired(rankings, relevants, "relevant sets")
    scores = [average_precision_at_k(ranked, relevant, k) for ranked, relevant in zip(rankings, relevants) if relevant]
    if not scores:
        raise ValueError("MAP is undefined: no query has a relevant item")
    return sum(scores) / len(scores)


def indexing_accuracy(rankings: Sequence[Sequence[Hashable]], true_ids: Sequence[Hashable], k: int) -> float:
    """IA@k: share of indexed images whose own ID is in the top k of the ranking made for them."""
    _paired(rankings, true_ids, "true IDs")
    if not rankings:
        raise ValueError("indexing accuracy of no images is undefined")
    return sum(true_id in _top_k(ranked, k) for ranked, true_id in zip(rankings, true_ids)) / len(rankings)


def retrieval_metrics(rankings: Sequence[Sequence[Hashable]], relevants: Sequence[set]) -> dict[str, float | None]:
    """MAP@10, P@10, Recall@10 and Recall@100, each a mean over the same queries: those with R > 0.

    Rankings need up to 100 entries for Recall@100 (shorter lists just miss the later places).
    Every value is None when no query has a relevant item (reported as null).
    """
    _paired(rankings, relevants, "relevant sets")
    pairs = [(ranked, relevant) for ranked, relevant in zip(rankings, relevants) if relevant]
    if not pairs:
        return dict.fromkeys(RETRIEVAL_KEYS)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)
    return {
        "MAP@10": mean([average_precision_at_k(r, rel, 10) for r, rel in pairs]),
        "P@10": mean([precision_at_k(r, rel, 10) for r, rel in pairs]),
        "Recall@10": mean([recall_at_k(r, rel, 10) for r, rel in pairs]),
        "Recall@100": mean([recall_at_k(r, rel, 100) for r, rel in pairs]),
    }
