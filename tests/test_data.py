"""data.py and support/sources.py: preprocessing, loaders on trees built in tmp_path, synthetic set,
splits, hold-out, IDs (random, clustered, semantic), tokens, tensors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import bovw
import data
from data import (BOS, EOS, PAD, assign_ids, decode_tokens, encode_id, hold_out, ids_to_tensor, images_to_tensor,
                  normalize, relevant_sets, split_dataset)
from support import sources
from support.sources import (DataError, ImageSet, UnreadableImage, load_coco, load_dataset, load_imagefolder,
                             make_synthetic, preprocess, read_image, render_synthetic)


# ---------------------------------------------------------------- preprocessing

def column_image(height: int, width: int) -> np.ndarray:
    """Red channel = column index, green = row index: shows which pixels a crop keeps."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.arange(width)[None, :]
    image[..., 1] = np.arange(height)[:, None]
    return image


def test_aspect_filter_and_centre_crop():
    assert preprocess(column_image(10, 12), 10) is None  # 12/10 = 1.2 > 1.1: rejected
    assert preprocess(column_image(12, 10), 10) is None  # 10/12 = 0.83 < 0.9: rejected
    wide = preprocess(column_image(10, 12), 10, (0.5, 2.0))  # kept when the range allows it
    assert wide.shape == (10, 10, 3)
    assert wide[0, :, 0].tolist() == list(range(1, 11))  # columns 1..10 survive: one cut on each side
    assert wide[:, 0, 1].tolist() == list(range(10))  # all rows survive
    tall = preprocess(column_image(12, 10), 10, (0.5, 2.0))
    assert tall[:, 0, 1].tolist() == list(range(1, 11))  # rows 1..10 survive
    edge = preprocess(column_image(10, 11), 10)  # 11/10 = 1.1: inside the closed default range
    assert edge[0, :, 0].tolist() == list(range(10))  # one spare column: floor((11-10)/2) = 0 cut on the left


def test_resize_shrinks_by_averaging_and_converts_grey():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, 1::2] = 200  # one-pixel stripes 0, 200, 0, 200, ...
    small = preprocess(image, 10)
    assert small.shape == (10, 10, 3) and small.dtype == np.uint8
    assert (small == 100).all()  # area interpolation averages each 2x2 block: (0 + 200) / 2, no aliasing
    grey = preprocess(np.full((8, 8), 77, np.uint8), 16)  # (H, W) greyscale, enlarged
    assert grey.shape == (16, 16, 3) and (grey == 77).all()


@pytest.mark.parametrize("bad", [(1.1, 0.9), (0, 1), (-1, 1), ("a", 1), (1,)])
def test_invalid_aspect_range(bad):
    with pytest.raises(DataError, match="aspect"):
        preprocess(column_image(10, 10), 10, bad)


# ---------------------------------------------------------------- ImageFolder tree

def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def rgb(height, width, value):
    return np.full((height, width, 3), value, np.uint8)


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "tree"
    for i in range(3):
        save(root / "cat" / f"rgb{i}.jpg", rgb(40, 40, 50 + i))
        save(root / "dog" / f"rgb{i}.jpg", rgb(40, 40, 150 + i))
    save(root / "cat" / "grey.png", np.full((40, 40), 90, np.uint8))
    save(root / "cat" / "rgba.png", np.dstack([rgb(40, 40, 120), np.zeros((40, 40), np.uint8)]))
    save(root / "cat" / "wide.jpg", rgb(40, 60, 10))  # 1.5: removed by the filter
    (root / "cat" / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    jpeg = (root / "cat" / "rgb0.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "notes.txt").write_text("not an image and not counted")
    palette = Image.new("P", (40, 40), 1)  # every pixel is palette entry 1 = (30, 30, 30)
    palette.putpalette([0, 0, 0, 30, 30, 30])
    palette.save(root / "dog" / "palette.png", transparency=0)  # entry 0 transparent
    save(root / "dog" / "nearly.png", rgb(40, 44, 200))  # 1.1: kept, cropped
    return root


def test_load_imagefolder(image_tree):
    imageset = load_imagefolder(str(image_tree), image_size=32)
    assert imageset.class_names == ["cat", "dog"]
    assert imageset.images.shape == (10, 32, 32, 3) and imageset.images.dtype == np.uint8
    assert imageset.skipped == 2 and imageset.filtered == 1  # corrupt + truncated; wide
    assert imageset.primary.tolist() == [0] * 5 + [1] * 5
    assert imageset.labels == [frozenset([0])] * 5 + [frozenset([1])] * 5
    by_name = {"/".join(ref.split("/")[-2:]): image for ref, image in zip(imageset.refs, imageset.images)}
    assert set(by_name) == {f"{cls}/rgb{i}.jpg" for cls in ("cat", "dog") for i in range(3)} | {
        "cat/grey.png", "cat/rgba.png", "dog/palette.png", "dog/nearly.png"}
    assert (by_name["cat/grey.png"] == 90).all()  # greyscale -> RGB, same value in all channels
    assert (by_name["cat/rgba.png"] == 120).all()  # alpha dropped, colour kept
    assert (by_name["dog/palette.png"] == 30).all()  # palette with transparency -> RGB
    assert (by_name["dog/nearly.png"] == 200).all()
    limited = load_imagefolder(str(image_tree), image_size=32, limit_per_class=2)
    assert limited.primary.tolist() == [0, 0, 1, 1]


def test_read_image_alone(image_tree):
    assert read_image(str(image_tree / "cat" / "wide.jpg"), 16) is None  # filtered
    assert read_image(str(image_tree / "cat" / "wide.jpg"), 16, aspect_range=None).shape == (16, 16, 3)  # no filter
    with pytest.raises(UnreadableImage, match="corrupt.jpg"):  # a DataError: one line for the user
        read_image(str(image_tree / "cat" / "corrupt.jpg"), 16)


def test_imagefolder_bad_inputs(tmp_path, image_tree):
    with pytest.raises(DataError, match="does not exist"):
        load_imagefolder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_imagefolder(str(tmp_path / "empty"))
    (image_tree / "bird").mkdir()
    with pytest.raises(DataError, match="bird' has no image files"):
        load_imagefolder(str(image_tree))


def test_db_size_above_available_names_the_count(image_tree):
    with pytest.raises(DataError, match="db-size 50 is more than the 10 images available") as error:
        load_dataset("imagenet", data_root=str(image_tree), image_size=32, db_size=50)
    assert "\n" not in str(error.value)  # one line
    assert len(load_dataset("imagenet", data_root=str(image_tree), image_size=32, db_size=8)) >= 8


# ---------------------------------------------------------------- COCO

@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    save(images / "a.jpg", rgb(48, 48, 60))
    save(images / "b.png", np.full((48, 48), 30, np.uint8))  # greyscale
    save(images / "c.jpg", rgb(48, 64, 60))  # 4:3, filtered using the JSON size
    save(images / "e.jpg", rgb(48, 48, 60))  # no annotation
    save(images / "f.png", np.dstack([rgb(48, 50, 90), np.full((48, 50), 255, np.uint8)]))  # RGBA, 1.04
    (images / "g.jpg").write_bytes(b"\x00corrupt")
    entries = [("a.jpg", 48, 48), ("b.png", 48, 48), ("c.jpg", 64, 48), ("d.jpg", 48, 48), ("e.jpg", 48, 48),
               ("f.png", 50, 48), ("g.jpg", 48, 48)]
    content = {
        "images": [{"id": i + 1, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(entries)],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "area": 100.0},  # a: dog 100 + 150 = 250
            {"id": 2, "image_id": 1, "category_id": 18, "area": 150.0},
            {"id": 3, "image_id": 1, "category_id": 1, "area": 200.0},  # a: person 200 < 250 -> primary dog
            {"id": 4, "image_id": 2, "category_id": 3, "area": 50.0},
            {"id": 5, "image_id": 3, "category_id": 3, "area": 50.0},
            {"id": 6, "image_id": 4, "category_id": 3, "area": 50.0},  # d.jpg is not on disk
            {"id": 7, "image_id": 6, "category_id": 18, "area": 80.0},  # f: tie 80 / 80 -> lower id (car, 3)
            {"id": 8, "image_id": 6, "category_id": 3, "area": 80.0},
            {"id": 9, "image_id": 7, "category_id": 1, "area": 10.0},
        ],
    }
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(content))
    return images, annotations, content


def test_load_coco(coco):
    images, annotations, _ = coco
    imageset = load_coco(str(images), str(annotations), image_size=32)
    assert imageset.class_names == ["person", "car", "dog"]  # category id order 1, 3, 18
    assert [ref.split("/")[-1] for ref in imageset.refs] == ["a.jpg", "b.png", "f.png"]
    assert imageset.labels == [frozenset({0, 2}), frozenset({1}), frozenset({1, 2})]
    assert imageset.primary.tolist() == [2, 1, 1]  # largest total area (dog); tie -> lower category id
    assert (imageset.filtered, imageset.skipped, imageset.unlabelled) == (1, 2, 1)  # c; d, g; e
    assert imageset.images.shape == (3, 32, 32, 3)
    assert (imageset.images[1] == 30).all() and (imageset.images[2] == 90).all()  # grey and RGBA -> RGB
    relaxed = load_coco(str(images), str(annotations), image_size=32, aspect_range=(0.5, 2.0))
    assert len(relaxed) == 4 and relaxed.filtered == 0


def test_load_dataset_coco(coco):
    images, annotations, _ = coco
    assert len(load_dataset("coco", data_root=str(images), coco_annotations=str(annotations), image_size=32,
                            db_size=3)) == 3
    with pytest.raises(DataError, match="db-size 10 is more than the 3 images available"):
        load_dataset("coco", data_root=str(images), coco_annotations=str(annotations), image_size=32, db_size=10)


def test_coco_bad_inputs(coco, tmp_path):
    images, annotations, content = coco
    with pytest.raises(DataError, match="not found"):
        load_coco(str(images), str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(content)[:-20])
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco(str(images), str(broken))
    no_annotations = tmp_path / "partial.json"
    no_annotations.write_text(json.dumps({"images": content["images"], "categories": content["categories"]}))
    with pytest.raises(DataError, match="lacks the field 'annotations'"):
        load_coco(str(images), str(no_annotations))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**content, "categories": content["categories"][1:]}))
    with pytest.raises(DataError, match="category ids \\[18\\]"):
        load_coco(str(images), str(unknown))
    with pytest.raises(DataError, match="does not exist"):
        load_coco(str(tmp_path / "no-images"), str(annotations))


# ---------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_seeded():
    first, again = make_synthetic(24, 32, seed=0), make_synthetic(24, 32, seed=0)
    assert np.array_equal(first.images, again.images) and first.refs == again.refs
    other = make_synthetic(24, 32, seed=1)
    assert not np.array_equal(first.images, other.images)
    # the same raw index under another seed is another picture, not the same one with new grain
    # (grain alone moves pixels by less than 15 on average)
    pairs = [(render_synthetic(i, 32, seed=0)[0], render_synthetic(i, 32, seed=1)[0]) for i in range(20)]
    same_shape = [(a.astype(int), b) for a, b in pairs if a.shape == b.shape]
    assert same_shape and all(np.abs(a - b).mean() > 30 for a, b in same_shape)
    prefix = make_synthetic(12, 32, seed=0)  # image i depends only on (seed, i)
    assert np.array_equal(prefix.images, first.images[:12]) and prefix.refs == first.refs[:12]
    assert first.images.std() > 20  # real pictures, not a flat field


def test_synthetic_texture_colours_vary_in_hue_not_in_contrast():
    """A texture's two colours: one hue, dark and light. The grey-level gap (what SIFT sees) stays wide in every
    draw while the hue (the ratio of the channels) spreads, so colour never carries the pattern alone."""
    rng = np.random.default_rng(0)
    pairs = np.array([sources._colour_pair(rng) for _ in range(500)])        # (500, 2, 3)
    grey = pairs @ np.array([0.299, 0.587, 0.114])                         # (500, 2) luminance
    assert (np.abs(grey[:, 0] - grey[:, 1]) > 100).all()
    dark = np.where((grey[:, :1] < grey[:, 1:]), pairs[:, 0], pairs[:, 1])  # (500, 3) the dark colour of each pair
    hue = dark / dark.max(axis=1, keepdims=True)
    assert hue.min(axis=0).max() < 0.3 and (hue.std(axis=0) > 0.15).all()  # every channel ranges widely
    assert 0.3 < (grey[:, 0] < grey[:, 1]).mean() < 0.7                    # either colour may be the dark one


def test_synthetic_single_label_balanced_and_named():
    imageset = make_synthetic(100, 32, seed=0)
    assert np.bincount(imageset.primary).tolist() == [10] * 10
    assert imageset.labels == [frozenset([int(c)]) for c in imageset.primary]
    assert len(set(imageset.class_names)) == 10 and "striped-triangle" in imageset.class_names


def test_synthetic_non_square_raw_images_meet_the_filter():
    shapes = [render_synthetic(i, 32, seed=0)[0].shape[:2] for i in range(200)]
    ratios = [w / h for h, w in shapes]
    assert (32, 32) in shapes and all(min(shape) == 32 for shape in shapes)  # short side = image size
    assert any(0.9 <= r <= 1.1 and r != 1 for r in ratios)  # slightly off square: kept and cropped
    assert any(r < 0.9 or r > 1.1 for r in ratios)  # rejected
    imageset = make_synthetic(100, 32, seed=0)
    assert imageset.filtered > 0 and len(imageset) == 100  # rejected raw images are replaced by later ones
    assert imageset.refs == [f"synthetic:{p}" for p in range(100)]  # ref = position in the built-in set
    assert make_synthetic(100, 32, seed=0, aspect_range=(0.5, 2.0)).filtered == 0


def test_synthetic_multilabel():
    imageset = make_synthetic(60, 32, seed=0, multilabel=True)
    assert all(2 <= len(labels) <= 3 for labels in imageset.labels)
    assert all(int(p) in labels for p, labels in zip(imageset.primary, imageset.labels))
    assert np.bincount(imageset.primary).tolist() == [6] * 10
    assert load_dataset("synthetic-multilabel", image_size=32, db_size=20).labels[0] == imageset.labels[0]


# ---------------------------------------------------------------- splits

def fake_set(primary) -> ImageSet:
    primary = np.asarray(primary, dtype=np.int64)
    return ImageSet(np.zeros((len(primary), 1, 1, 3), np.uint8), [frozenset([int(c)]) for c in primary], primary,
                    [f"synthetic:{i}" for i in range(len(primary))], [str(c) for c in range(primary.max() + 1)])


def test_split_sizes_disjoint_and_stratified():
    imageset = fake_set(np.repeat(np.arange(10), 40))  # 400 images, 10 classes
    split = split_dataset(imageset, 200, seed=0)
    parts = [split.idb, split.train, split.val, split.test]
    # 200 * 0.25 = 50 indexed; 150 queries -> 15 val, 15 test, 120 train
    assert [len(p) for p in parts] == [50, 120, 15, 15]
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == 200  # disjoint: no image both indexed and a query
    assert np.bincount(imageset.primary[everything]).tolist() == [20] * 10  # balanced draw
    assert np.bincount(imageset.primary[split.idb]).tolist() == [5] * 10  # 20 * 0.25 per class
    for part, size in zip(parts[1:], [120, 15, 15]):
        counts = np.bincount(imageset.primary[part], minlength=10)
        assert np.abs(counts - size / 10).max() <= 1  # each class within one of its share
    again = split_dataset(imageset, 200, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, [again.idb, again.train, again.val, again.test]))
    assert not np.array_equal(split.idb, split_dataset(imageset, 200, seed=1).idb)


def test_split_draw_follows_class_proportions():
    imageset = fake_set([0] * 300 + [1] * 100)
    split = split_dataset(imageset, 100, seed=3)
    drawn = np.concatenate([split.idb, split.train, split.val, split.test])
    assert np.bincount(imageset.primary[drawn]).tolist() == [75, 25]
    assert np.bincount(imageset.primary[split.idb]).tolist() in ([19, 6], [18, 7])  # 25 indexed, 3:1


def test_split_bad_inputs():
    imageset = fake_set(np.repeat(np.arange(2), 10))
    with pytest.raises(DataError, match="more than the 20 images available"):
        split_dataset(imageset, 21)
    with pytest.raises(DataError, match="too small.*--db-size 7 or more"):
        split_dataset(imageset, 6)  # 6 -> IDB 2, queries 4 -> val round(0.4) = 0
    assert min(len(p) for p in vars(split_dataset(imageset, 7)).values()) == 1
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(DataError, match="index fraction"):
            split_dataset(imageset, 10, index_fraction=fraction)


def test_hold_out_leaves_a_stratified_share_of_the_idb_out():
    imageset = fake_set(np.repeat(np.arange(10), 40))  # 400 images, 10 classes
    split = split_dataset(imageset, 200, seed=0)  # IDB 50: 5 per class
    kept, held = hold_out(split, imageset.primary, 0.3, seed=0)  # floor(50 * 0.3 + 0.5) = 15 held out
    assert len(kept.idb) == 35 and len(held) == 15 and held.dtype == np.int64
    assert not set(kept.idb.tolist()) & set(held.tolist())  # disjoint
    assert sorted([*kept.idb.tolist(), *held.tolist()]) == split.idb.tolist()  # together: the whole IDB
    assert (np.diff(kept.idb) > 0).all() and (np.diff(held) > 0).all()  # still sorted
    for part, size in ((kept.idb, 35), (held, 15)):
        counts = np.bincount(imageset.primary[part], minlength=10)
        assert np.abs(counts - size / 10).max() <= 1  # each class within one of its share
    assert all(np.array_equal(getattr(kept, name), getattr(split, name)) for name in ("train", "val", "test"))
    again_kept, again_held = hold_out(split, imageset.primary, 0.3, seed=0)
    assert np.array_equal(again_kept.idb, kept.idb) and np.array_equal(again_held, held)


def test_hold_out_of_nothing_and_of_everything():
    imageset = fake_set(np.repeat(np.arange(10), 40))
    split = split_dataset(imageset, 200, seed=0)  # IDB 50
    for fraction in (0.0, 0.009):  # floor(50 * 0.009 + 0.5) = 0: nothing to hold out
        unchanged, held = hold_out(split, imageset.primary, fraction, seed=0)
        assert unchanged is split and held.dtype == np.int64 and len(held) == 0
    with pytest.raises(DataError, match="--index-hold-out 0.99 leaves no IDB image to index") as error:
        hold_out(split, imageset.primary, 0.99, seed=0)  # floor(49.5 + 0.5) = 50: all of it
    assert "\n" not in str(error.value)  # one line


def test_relevant_sets_share_a_label():
    idb_labels = [frozenset({0}), frozenset({1, 2}), frozenset({2})]
    ids = ["0", "1", "2"]
    queries = [frozenset({2}), frozenset({0, 1}), frozenset({3})]
    assert relevant_sets(queries, idb_labels, ids) == [{"1", "2"}, {"0", "1"}, set()]


# ---------------------------------------------------------------- IDs and tokens

def test_random_ids_are_a_padded_permutation():
    ids = assign_ids(np.zeros(128, np.int64), "random", seed=0)
    assert sorted(ids) == [f"{i:03d}" for i in range(128)]  # width = digits of 127
    assert ids != sorted(ids) and ids == assign_ids(np.zeros(128, np.int64), "random", seed=0)
    assert ids != assign_ids(np.zeros(128, np.int64), "random", seed=1)
    assert assign_ids([0] * 10, "random") != [] and len(assign_ids([0] * 10, "random")[0]) == 1  # 0..9
    assert len(assign_ids([0] * 11, "random")[0]) == 2 and assign_ids([5], "random") == ["0"]


def test_clustered_ids_are_a_class_prefix_and_a_counter():
    # 3 classes -> 1 prefix digit; largest class has 3 images -> counter holds up to 2*3-1 = 5: 1 digit
    assert assign_ids(np.array([2, 0, 1, 0, 2, 1, 0]), "clustered") == ["20", "00", "10", "01", "21", "11", "02"]
    primary = np.tile(np.arange(12), 10)  # 12 classes interleaved in IDB order, 10 each
    ids = assign_ids(primary, "clustered")
    assert len(set(ids)) == len(ids) and {len(i) for i in ids} == {4}  # 2 prefix + 2 counter digits (19)
    for cls in range(12):
        mine = sorted(i for i, p in zip(ids, primary) if p == cls)
        assert mine == [f"{cls:02d}{j:02d}" for j in range(10)]  # consecutive, one shared prefix
    assert assign_ids(np.array([], np.int64), "clustered") == []
    with pytest.raises(DataError, match="unknown ID scheme 'bogus'; use 'random', 'clustered' or 'semantic'"):
        assign_ids(primary, "bogus")


def test_semantic_ids_are_hierarchical_kmeans_over_the_idb_bovw_histograms():
    images = make_synthetic(40, 32, seed=0).images
    primary = np.zeros(40, np.int64)  # labels play no part in semantic IDs
    ids = assign_ids(primary, "semantic", seed=3, images=images, bovw_k=8)
    expected = bovw.hierarchical_ids(bovw.BoVWIndex(k=8, seed=3).fit(images).database, np.random.default_rng(3))
    assert ids == expected
    assert len(set(ids)) == 40 and bovw.prefix_free(ids)
    assert ids == assign_ids(primary, "semantic", seed=3, images=images, bovw_k=8)  # seeded: the same again


def test_semantic_ids_need_the_images():
    with pytest.raises(DataError, match="semantic IDs .* pass images=") as error:
        assign_ids(np.zeros(10, np.int64), "semantic")
    assert "\n" not in str(error.value)  # one line


def test_token_round_trip():
    assert encode_id("042") == [BOS, 0, 4, 2, EOS] == [11, 0, 4, 2, 12]
    ids = ["7", "042", "1234"]
    tokens = ids_to_tensor(ids)
    assert tokens.dtype == torch.long and tokens.shape == (3, 6)
    assert tokens[0].tolist() == [BOS, 7, EOS, PAD, PAD, PAD]
    assert [decode_tokens(row) for row in tokens] == ids
    for malformed in ([0, 1, EOS], [BOS, EOS], [BOS, 10, EOS], [BOS, 1, 2], [BOS, 1, PAD, EOS]):
        assert decode_tokens(malformed) is None
    with pytest.raises(ValueError):
        encode_id("4a")


def test_tensors_and_normalize():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1, 0, 3, 2] = 255  # image 1, row 0, column 3, blue
    tensor = images_to_tensor(images)
    assert tensor.shape == (2, 3, 4, 4) and tensor.dtype == torch.uint8 and tensor.is_contiguous()
    assert tensor[1, 2, 0, 3] == 255 and int(tensor.sum()) == 255
    values = normalize(torch.tensor([0, 255, 51], dtype=torch.uint8))
    assert values.dtype == torch.float32
    assert values.tolist() == pytest.approx([-1.0, 1.0, -0.6])  # (51/255 - 0.5) / 0.5 = -0.6
    with pytest.raises(ValueError):
        normalize(torch.zeros(2))


def test_load_dataset_names():
    assert len(load_dataset("synthetic", image_size=32, db_size=13)) == 13
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", db_size=10)
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("imagenet", db_size=10)
    with pytest.raises(DataError, match="--coco-annotations"):
        load_dataset("coco", data_root=".", db_size=10)


def test_augment_views_are_seeded_and_keep_shape():
    images = data.images_to_tensor(sources.make_synthetic(4, image_size=32, seed=0).images)
    x = data.normalize(images)
    a = data.augment(x, torch.Generator().manual_seed(0))
    b = data.augment(x, torch.Generator().manual_seed(0))
    c = data.augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, x, atol=1e-3)          # a view, not the image itself


def test_augment_with_full_crop_and_no_jitter_is_identity_or_mirror(monkeypatch):
    # With the crop forced to the whole image and no jitter, a view is the image or its mirror image.
    monkeypatch.setattr(data, "AUGMENT_SCALE", (1.0, 1.0))
    monkeypatch.setattr(data, "AUGMENT_JITTER", 0.0)
    x = data.normalize(data.images_to_tensor(sources.make_synthetic(8, image_size=32, seed=0).images))
    out = data.augment(x, torch.Generator().manual_seed(0))
    for view, image in zip(out, x):
        assert torch.allclose(view, image, atol=1e-4) or torch.allclose(view, image.flip(-1), atol=1e-4)
