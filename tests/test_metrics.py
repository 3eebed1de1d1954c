"""Metrics against hand-worked examples (the arithmetic is in the comments); ranks are 1-based."""
import numpy as np
import pytest

from metrics import (RETRIEVAL_KEYS, average_precision_at_k, indexing_accuracy, mean_average_precision_at_k,
                     precision_at_k, recall_at_k, retrieval_metrics)

RANKED = ["a", "b", "c", "d", "e"]
RELEVANT = {"a", "c", "x"}  # R = 3; "x" was never retrieved; hits at ranks 1 and 3


def test_precision_hand_worked():
    assert precision_at_k(RANKED, RELEVANT, 1) == 1.0  # {a} / 1
    assert precision_at_k(RANKED, RELEVANT, 3) == pytest.approx(2 / 3)  # {a, c} / 3
    assert precision_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 5)  # {a, c} / 5


def test_recall_hand_worked():
    assert recall_at_k(RANKED, RELEVANT, 1) == pytest.approx(1 / 3)  # {a} / R=3
    assert recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)  # {a, c} / R=3


def test_average_precision_hand_worked():
    # k=3: rel at i=1 (P@1 = 1/1) and i=3 (P@3 = 2/3) -> (1 + 2/3) / min(3, 3) = 5/9
    assert average_precision_at_k(RANKED, RELEVANT, 3) == pytest.approx(5 / 9)
    # k=2: rel at i=1 only -> 1 / min(2, 3) = 1/2
    assert average_precision_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 2)
    # irrelevant places still count in P@i: rel only at i=2 -> (1/2) / min(5, 1) = 1/2
    assert average_precision_at_k(RANKED, {"b"}, 5) == pytest.approx(1 / 2)


def test_average_precision_divides_by_min_k_r():
    ranked = [str(i) for i in range(10)]
    relevant = {str(i) for i in range(20)}  # R = 20 > k = 10
    # every place relevant: sum of P@i = 10 ones -> 10 / min(10, 20) = 1 (a perfect top-10 scores 1)
    assert average_precision_at_k(ranked, relevant, 10) == pytest.approx(1.0)


def test_list_shorter_than_k_counts_missing_places_as_not_relevant():
    ranked, relevant = ["b", "a"], {"a"}  # R = 1, list of 2, k = 10
    assert precision_at_k(ranked, relevant, 10) == pytest.approx(1 / 10)  # 1 hit / k=10, not / 2
    assert recall_at_k(ranked, relevant, 10) == 1.0  # 1 / R=1
    assert average_precision_at_k(ranked, relevant, 10) == pytest.approx(1 / 2)  # (P@2 = 1/2) / min(10, 1)
    assert precision_at_k([], relevant, 3) == 0.0
    assert average_precision_at_k([], relevant, 3) == 0.0


def test_zero_relevant():
    assert precision_at_k(["a", "b"], set(), 2) == 0.0  # 0 / 2: defined
    with pytest.raises(ValueError, match="R = 0"):
        recall_at_k(["a", "b"], set(), 2)
    with pytest.raises(ValueError, match="R = 0"):
        average_precision_at_k(["a", "b"], set(), 2)


@pytest.mark.parametrize("metric", [precision_at_k, recall_at_k, average_precision_at_k])
def test_duplicates_and_bad_k_raise(metric):
    with pytest.raises(ValueError, match="repeats the ID 'a'"):
        metric(["a", "b", "a"], {"a"}, 2)  # the duplicate lies beyond k: still an invalid ranking
    for bad_k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            metric(["a"], {"a"}, bad_k)


def test_mean_average_precision_skips_queries_without_relevant_items():
    rankings = [RANKED, ["a"], ["z", "y", "x"]]
    relevants = [RELEVANT, set(), {"x"}]
    # AP@3: 5/9 (above), skipped (R = 0), (P@3 = 1/3) / min(3, 1) = 1/3 -> mean (5/9 + 3/9) / 2 = 4/9
    assert mean_average_precision_at_k(rankings, relevants, 3) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="no query"):
        mean_average_precision_at_k([["a"]], [set()], 3)
    with pytest.raises(ValueError, match="2 rankings but 1"):
        mean_average_precision_at_k([["a"], ["b"]], [{"a"}], 3)


def test_indexing_accuracy_hand_worked():
    rankings = [["1", "2"], ["0", "2"], ["2"]]
    true_ids = ["1", "2", "0"]
    assert indexing_accuracy(rankings, true_ids, 1) == pytest.approx(1 / 3)  # hit, miss, miss
    assert indexing_accuracy(rankings, true_ids, 2) == pytest.approx(2 / 3)  # hit, hit ("2" at rank 2), miss
    with pytest.raises(ValueError, match="repeats"):
        indexing_accuracy([["1", "1"]], ["1"], 1)


def test_retrieval_metrics_over_queries_with_relevant_items():
    ranked = [f"{i:02d}" for i in range(12)]
    relevant = {"00", "11", "50"}  # R = 3: ranks 1 and 12, "50" never retrieved
    result = retrieval_metrics([ranked, ["00"]], [relevant, set()])  # second query (R = 0) is left out
    assert set(result) == set(RETRIEVAL_KEYS)
    assert result["P@10"] == pytest.approx(1 / 10)  # {00} / 10 (not averaged with the R = 0 query)
    assert result["Recall@10"] == pytest.approx(1 / 3)  # {00} / 3
    assert result["Recall@100"] == pytest.approx(2 / 3)  # {00, 11} / 3
    assert result["MAP@10"] == pytest.approx(1 / 3)  # (P@1 = 1) / min(10, 3)
    assert retrieval_metrics([["a"]], [set()]) == dict.fromkeys(RETRIEVAL_KEYS)  # nothing defined -> None


def test_numpy_rankings_work():
    # BoVW returns database positions as int64 arrays; they hash and compare like ints.
    assert precision_at_k(np.array([3, 1, 2]), {1, 7}, 2) == pytest.approx(1 / 2)
    assert recall_at_k(np.array([3, 1, 2]), {1, 7}, 3) == pytest.approx(1 / 2)
    assert precision_at_k([1], {1}, np.int64(1)) == 1.0  # a numpy integer is a valid k


@pytest.mark.parametrize("k", [1, 3, 10])
def test_a_relevant_item_just_past_k_does_not_count(k):
    """The cut-off is exact: the only relevant item at rank k + 1 scores 0; at rank k it counts once."""
    ranked = [f"x{i}" for i in range(1, k + 2)]               # ranks 1 .. k+1
    past, at = {ranked[k]}, {ranked[k - 1]}                    # rank k+1, rank k (R = 1)
    assert precision_at_k(ranked, past, k) == 0.0
    assert recall_at_k(ranked, past, k) == 0.0
    assert average_precision_at_k(ranked, past, k) == 0.0
    assert mean_average_precision_at_k([ranked], [past], k) == 0.0
    assert indexing_accuracy([ranked], [ranked[k]], k) == 0.0
    assert precision_at_k(ranked, at, k) == pytest.approx(1 / k)          # 1 hit / k
    assert recall_at_k(ranked, at, k) == 1.0                               # 1 hit / R=1
    assert average_precision_at_k(ranked, at, k) == pytest.approx(1 / k)  # (P@k = 1/k) / min(k, 1)
    assert indexing_accuracy([ranked], [ranked[k - 1]], k) == 1.0


def test_retrieval_metrics_cut_at_10_and_100():
    ranked = [f"{i:03d}" for i in range(101)]
    at_11, at_101 = {"010"}, {"100"}                           # ranks 11 and 101
    assert retrieval_metrics([ranked], [at_11]) == {"MAP@10": 0.0, "P@10": 0.0, "Recall@10": 0.0, "Recall@100": 1.0}
    assert retrieval_metrics([ranked], [at_101])["Recall@100"] == 0.0
