"""Tests for the Bag-of-Visual-Words baseline: k-means against cv2.kmeans, and the index's ranking invariants."""
import cv2
import numpy as np
import pytest

import bovw
from bovw import BoVWIndex, kmeans, sift_descriptors, word_counts

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


def test_kmeans_stops_at_max_iter():
    x, _, _ = blobs()
    *_, n_iter = kmeans(x, 20, np.random.default_rng(0), max_iter=2, tol=0.0, return_n_iter=True)
    assert n_iter == 2


# ----------------------------------------------------------------------------- SIFT and histograms

def test_sift_descriptors_shapes():
    descriptors = sift_descriptors(textured_image(np.random.default_rng(0)))
    assert descriptors.dtype == np.float32 and descriptors.shape[1] == 128 and len(descriptors) > 20
    blank = sift_descriptors(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8))
    assert blank.shape == (0, 128) and blank.dtype == np.float32
    root = sift_descriptors(textured_image(np.random.default_rng(0)), root_sift=True)
    assert np.allclose((root**2).sum(axis=1), 1.0, atol=1e-4)  # sqrt of an L1-normalised vector has unit L2 norm


def test_word_counts_by_hand():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    images = [np.array([[1.0, 0.0], [9.0, 1.0], [8.0, 0.0]], np.float32), np.zeros((0, 2), np.float32),
              np.array([[0.0, 11.0]], np.float32)]
    assert word_counts(images, centroids).tolist() == [[1, 2, 0], [0, 0, 0], [0, 0, 1]]


def test_search_is_cosine_with_stable_ties():
    index = BoVWIndex(k=3)
    index.centroids, index.idf = np.zeros((3, 128), np.float32), np.ones(3, np.float32)
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


@pytest.mark.parametrize("options", [{}, {"weighting": "tfidf"}, {"root_sift": True}])
def test_database_image_ranks_itself_first(database, options):
    index = BoVWIndex(k=40, seed=0, **options).fit(database)
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
    with pytest.raises(bovw.BoVWError, match="weighting"):
        BoVWIndex(weighting="bm25")
    assert "\n" not in str(blank.value) and "\n" not in str(zero_k.value)


def test_fit_is_deterministic_for_a_seed(database):
    a, b = BoVWIndex(k=30, seed=4).fit(database), BoVWIndex(k=30, seed=4).fit(database)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.database, b.database)


@pytest.mark.parametrize("options", [{}, {"weighting": "tfidf", "root_sift": True, "max_descriptors": None}])
def test_save_load_round_trip(tmp_path, database, options):
    index = BoVWIndex(k=30, seed=2, **options).fit(database[:6])
    path = str(tmp_path / "index.bovw")  # no .npz suffix: the exact path is used
    index.save(path)
    loaded = BoVWIndex.load(path)
    queries = textured_images(4, seed=9)
    for got, want in zip(loaded.query(queries, top_k=6), index.query(queries, top_k=6)):
        assert np.array_equal(got, want)
    for name in ("k", "seed", "max_iter", "max_descriptors", "weighting", "root_sift"):
        assert getattr(loaded, name) == getattr(index, name)
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert all(z[key].dtype != object for key in z.files)
