"""Tests for the Bag-of-Visual-Words baseline: k-means against cv2.kmeans, and the index's ranking invariants."""
import cv2
import numpy as np
import pytest

import bovw
from bovw import BoVWIndex, assign, hierarchical_ids, kmeans, prefix_free, sift_descriptors, word_counts

IMAGE_SIZE = 128  # small enough to be fast, large enough for SIFT's octaves to find keypoints


def textured_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random RGB picture of filled circles, rectangles and a checkerboard patch: plenty of SIFT keypoints."""
    image = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
    for _ in range(12):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(4, size // 6)), colour, -1)
        else:
            w, h = (int(v) for v in rng.integers(4, size // 4, 2))
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1)
    cell = int(rng.integers(4, 9))
    board = ((np.indices((4 * cell, 4 * cell)) // cell).sum(axis=0) % 2 * 255).astype(np.uint8)
    x, y = (int(v) for v in rng.integers(0, size - 4 * cell, 2))
    image[y : y + 4 * cell, x : x + 4 * cell] = board[..., None]
    return image


def textured_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([textured_image(rng) for _ in range(n)])


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five tight, far-apart Gaussian blobs in 8-d: (points, true labels, true centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 8)) * 50.0
    truth = rng.integers(0, 5, 1000)
    return (centres[truth] + rng.normal(size=(1000, 8))).astype(np.float32), truth, centres


# ----------------------------------------------------------------------------- k-means

def test_kmeans_recovers_separated_blobs():
    x, truth, centres = blobs()
    found, labels, _ = kmeans(x, 5, np.random.default_rng(0))
    # Each found cluster is exactly one true blob (a bijection between found and true labels).
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 5 and len({a for a, _ in pairs}) == 5 and len({b for _, b in pairs}) == 5
    for found_label, true_label in pairs:
        assert np.linalg.norm(found[found_label] - centres[true_label]) < 0.5


def test_kmeans_inertia_matches_cv2_kmeans():
    # Overlapping clusters, so that the answer depends on a good optimisation, not on an easy separation.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(40, 16)) * 3.0)[rng.integers(0, 40, 3000)] + rng.normal(size=(3000, 16))
    x = x.astype(np.float32)
    k = 25
    _, labels, inertia = kmeans(x, k, np.random.default_rng(0))
    cv2.setRNGSeed(0)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 100, 1e-4)
    reference, _, _ = cv2.kmeans(x, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    assert inertia <= 1.05 * reference, (inertia, reference)
    # The reported inertia is the real one for the returned labels.
    centroids = np.stack([x[labels == j].mean(axis=0) for j in range(k)])
    assert inertia == pytest.approx(((x - centroids[labels]) ** 2).sum(), rel=1e-4)


def test_kmeans_is_deterministic_for_a_seed():
    x, _, _ = blobs(seed=1)
    a = kmeans(x, 12, np.random.default_rng(7))
    b = kmeans(x, 12, np.random.default_rng(7))
    c = kmeans(x, 12, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])  # the generator really drives the seeding


def test_kmeans_rejects_more_clusters_than_points():
    x = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="k=6 clusters from 5 points"):
        kmeans(x, 6, np.random.default_rng(0))


def test_kmeans_reseeds_an_empty_cluster(monkeypatch):
    x, truth, _ = blobs()
    # One starting centroid in each of blobs 0-3 and the fifth far from all data: it wins no point in the first
    # assignment and must be re-seeded (without the re-seed its mean would be 0/0).
    start = np.stack([x[truth == j][0] for j in range(4)] + [np.full(8, 1e4)])
    monkeypatch.setattr(bovw, "kmeans_plusplus", lambda *args, **kwargs: start.astype(np.float32))
    centroids, labels, _ = kmeans(x, 5, np.random.default_rng(0))
    assert np.all(np.isfinite(centroids))
    assert np.bincount(labels, minlength=5).min() > 0
    assert np.abs(centroids).max() < 1e3  # the far centroid moved onto the data


def test_kmeans_stops_at_max_iter(monkeypatch):
    x, _, _ = blobs()
    calls = []

    def counting_assign(*args):
        calls.append(len(args[1]))
        return assign(*args)

    monkeypatch.setattr(bovw, "assign", counting_assign)
    kmeans(x, 20, np.random.default_rng(0), max_iter=2, tol=0.0)
    assert calls == [20, 20, 20]  # one assignment per Lloyd iteration, plus the final one for the returned labels


# ----------------------------------------------------------------------------- SIFT and histograms

def test_sift_descriptors_shapes():
    descriptors = sift_descriptors(textured_image(np.random.default_rng(0)))
    assert descriptors.dtype == np.float32 and descriptors.shape[1] == 128 and len(descriptors) > 20
    blank = sift_descriptors(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8))
    assert blank.shape == (0, 128) and blank.dtype == np.float32


def test_word_counts_by_hand():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    images = [np.array([[1.0, 0.0], [9.0, 1.0], [8.0, 0.0]], np.float32), np.zeros((0, 2), np.float32),
              np.array([[0.0, 11.0]], np.float32)]
    assert word_counts(images, centroids).tolist() == [[1, 2, 0], [0, 0, 0], [0, 0, 1]]


def test_search_is_cosine_with_stable_ties():
    index = BoVWIndex(k=3)
    index.centroids = np.zeros((3, 128), np.float32)
    # Database rows 1 and 3 are the same direction (a tie); row 2 is an image without keypoints.
    index.database = bovw.l2_normalize(np.array([[0, 1, 0], [1, 1, 0], [0, 0, 0], [2, 2, 0]], np.float32))
    query = bovw.l2_normalize(np.array([[1, 0, 0], [0, 0, 0]], np.float32))
    positions, scores = index.search(query, top_k=10)
    assert positions.shape == (2, 4)  # k' = min(top_k, n)
    assert positions[0].tolist() == [1, 3, 0, 2]  # tie 1/3 in IDB order, then cosine 0s in IDB order
    assert scores[0] == pytest.approx([2**-0.5, 2**-0.5, 0.0, 0.0])
    assert positions[1].tolist() == [0, 1, 2, 3] and not scores[1].any()  # zero query: IDB order, all 0


# ----------------------------------------------------------------------------- the index

@pytest.fixture(scope="module")
def database() -> np.ndarray:
    return textured_images(10)


def test_database_image_ranks_itself_first(database):
    index = BoVWIndex(k=40, seed=0).fit(database)
    positions, scores = index.query(database, top_k=5)
    assert positions.shape == (10, 5) and positions.dtype == np.int64 and scores.dtype == np.float32
    assert positions[:, 0].tolist() == list(range(10))
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(scores[:, 0] > scores[:, 1])  # strictly first, not first by a tie
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_blank_image_in_database_and_as_query(database):
    blank = np.full_like(database[0], 200)
    images = np.concatenate([database[:3], blank[None], database[3:6]])  # the blank is IDB image 3
    index = BoVWIndex(k=40, seed=0).fit(images)
    positions, scores = index.query(np.stack([blank, database[0]]), top_k=100)
    assert positions[0].tolist() == list(range(7)) and not scores[0].any()  # zero query: IDB order, score 0
    # As a database image it scores 0 and so comes after every image sharing a word with the query.
    place = positions[1].tolist().index(3)
    assert scores[1][place] == 0.0 and np.all(scores[1][:place] > 0)


def test_fewer_descriptors_than_words_lowers_k():
    image = textured_images(1, seed=5)
    n_descriptors = len(sift_descriptors(image[0]))
    index = BoVWIndex(k=10 * n_descriptors, seed=0).fit(image)
    assert index.n_words == n_descriptors and index.k == 10 * n_descriptors
    positions, scores = index.query(image)
    assert positions.tolist() == [[0]] and scores[0, 0] == pytest.approx(1.0)


def test_bad_input_is_a_one_line_bovw_error():
    with pytest.raises(bovw.BoVWError, match="no SIFT keypoints") as blank:
        BoVWIndex(k=5).fit(np.zeros((3, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    with pytest.raises(bovw.BoVWError, match="k=0") as zero_k:
        BoVWIndex(k=0)
    assert "\n" not in str(blank.value) and "\n" not in str(zero_k.value)


def test_fit_is_deterministic_for_a_seed(database):
    a, b = BoVWIndex(k=30, seed=4).fit(database), BoVWIndex(k=30, seed=4).fit(database)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.database, b.database)


# ----------------------------------------------------------------------------- semantic IDs (hierarchical k-means)

def grouped_features(sizes: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Far-apart Gaussian groups of the given sizes in 8-d, shuffled: (features (n, 8), group of each item)."""
    rng = np.random.default_rng(seed)
    group = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.normal(size=(len(sizes), 8)) * 50.0
    return (centres[group] + rng.normal(size=(len(group), 8))).astype(np.float32), group


def test_prefix_free_by_hand():
    assert prefix_free(["10", "11", "2", "30"]) and prefix_free([])
    assert not prefix_free(["2", "10", "1"])   # "1" starts "10", though not sorted next to each other as given
    assert not prefix_free(["12", "3", "12"])  # a duplicate is a prefix of itself


def test_hierarchical_ids_follow_separated_groups():
    x, group = grouped_features((40, 40, 40))
    ids = hierarchical_ids(x, np.random.default_rng(0), branches=3)
    first = np.array([i[0] for i in ids])
    # One first digit per group, and a different one for each group.
    assert [len(set(first[group == g])) for g in range(3)] == [1, 1, 1]
    assert len(set(first)) == 3
    assert prefix_free(ids) and all(i.isdigit() for i in ids)


def test_hierarchical_ids_are_distinct_and_prefix_free():
    x = np.random.default_rng(1).normal(size=(500, 16)).astype(np.float32)
    ids = hierarchical_ids(x, np.random.default_rng(0))
    assert len(ids) == 500 and len(set(ids)) == 500
    assert prefix_free(ids) and all(i.isdigit() for i in ids)
    assert max(map(len, ids)) >= 3  # 500 items do not fit two levels of at most 10 x 10


def test_hierarchical_ids_lengths_follow_cluster_sizes():
    x, group = grouped_features((50, 5, 5))
    ids = hierarchical_ids(x, np.random.default_rng(0), branches=3)
    lengths = np.array([len(i) for i in ids])
    assert np.all(lengths[group > 0] == 2)  # a small group is a leaf under the root: cluster digit + leaf digit
    assert np.all(lengths[group == 0] >= 3)  # the big group is split again
    assert prefix_free(ids)


@pytest.mark.parametrize("n", [1, 7, 10])
def test_hierarchical_ids_small_database_is_one_level(n):
    x = np.random.default_rng(2).normal(size=(n, 4))
    assert hierarchical_ids(x, np.random.default_rng(0)) == [str(i) for i in range(n)]


def test_hierarchical_ids_fewer_items_than_branches_at_a_node():
    # 6 distinct items > leaf_size 2 but < 10 branches: 6 singleton clusters, each a leaf with digit 0.
    x = np.random.default_rng(3).normal(size=(6, 4))
    ids = hierarchical_ids(x, np.random.default_rng(0), leaf_size=2)
    assert sorted(ids) == [f"{d}0" for d in range(6)]


def test_hierarchical_ids_identical_features_split_in_input_order():
    # 250 all-zero rows (blank images' histograms): k-means cannot split them, so runs in input order:
    # 10 runs of 25, each in runs of 3,3,3,3,3,2,2,2,2,2.
    ids = hierarchical_ids(np.zeros((250, 5)), np.random.default_rng(0))
    assert ids[:4] == ["000", "001", "002", "010"] and ids[23:26] == ["090", "091", "100"] and ids[-1] == "991"
    assert len(set(ids)) == 250 and prefix_free(ids)


def test_hierarchical_ids_fewer_distinct_points_than_branches():
    # 3 distinct points, 15 copies each: 3 clusters, then each group of copies falls back to runs.
    x = np.repeat(np.eye(3, 4), 15, axis=0)
    ids = hierarchical_ids(x, np.random.default_rng(0))
    first = np.array([i[0] for i in ids]).reshape(3, 15)
    assert all(len(set(row)) == 1 for row in first)
    assert sorted(first[:, 0]) == ["0", "1", "2"]  # 7 empty clusters leave no gaps in the digits
    assert len(set(ids)) == 45 and prefix_free(ids)


def test_hierarchical_ids_number_non_empty_clusters_without_gaps(monkeypatch):
    # k-means can leave clusters empty (duplicate centroids): here only clusters 7 and 3 hold items. The digits
    # are the ranks of the non-empty clusters by index (3 -> "0", 7 -> "1"), leaf digits in input order.
    monkeypatch.setattr(bovw, "kmeans", lambda x, k, rng: (None, np.where(np.arange(len(x)) < 10, 7, 3), 0.0))
    ids = hierarchical_ids(np.zeros((18, 2)), np.random.default_rng(0))
    assert ids == [f"1{d}" for d in range(10)] + [f"0{d}" for d in range(8)]


def test_hierarchical_ids_are_deterministic_for_a_seed():
    x = np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)
    a = hierarchical_ids(x, np.random.default_rng(7))
    assert a == hierarchical_ids(x, np.random.default_rng(7))
    assert a != hierarchical_ids(x, np.random.default_rng(8))  # the generator really drives the clustering


def test_hierarchical_ids_from_bovw_histograms(database):
    blank = np.full_like(database[0], 200)
    images = np.concatenate([database[:4], np.stack([blank] * 3), database[4:]])  # blanks: IDB images 4, 5, 6
    index = BoVWIndex(k=40, seed=0).fit(images)
    assert np.array_equal(index.database, index.embed(index.describe(images)))  # the IDB's own histograms
    ids = hierarchical_ids(index.database, np.random.default_rng(0), branches=3, leaf_size=2)
    assert len(set(ids)) == 13 and prefix_free(ids)
    assert len({i[0] for i in ids[4:7]}) == 1  # identical (all-zero) histograms are never separated by k-means


@pytest.mark.parametrize("kwargs", [{"branches": 1}, {"branches": 11}, {"leaf_size": 0}, {"leaf_size": 11}])
def test_hierarchical_ids_rejects_more_than_one_digit_per_level(kwargs):
    with pytest.raises(ValueError, match="one decimal digit"):
        hierarchical_ids(np.zeros((20, 3)), np.random.default_rng(0), **kwargs)
