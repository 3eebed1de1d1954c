"""Image sources: where a run's images come from, and how a file becomes an array.

Support code for the data chapter (``data.py``), which needs only the result: an ``ImageSet``, every image
preprocessed once and kept in memory with its labels. This module knows about folders, file formats, COCO
JSON and the built-in synthetic set, and nothing about document IDs; it imports no chapter.

Preprocessing, paper §2.1 (Di Stefano, "Vision Transformer Memory as a Differentiable Search Index for
Image Retrieval"): an image is kept only when its width/height lies in the aspect range (default 0.9-1.1,
nearly square), then centre-cropped to a square and resized to S x S: (S, S, 3) uint8 RGB, whatever the
file held (greyscale 8 or 16 bits, RGBA, palette, CMYK).

Three sources (``--dataset``):

- ``synthetic`` (default): 10 classes generated in memory from a seed, no files. A class is a texture
  family plus a shape family ("striped-triangle"); colour, background, scale, rotation, position, clutter
  and noise vary. ``synthetic-multilabel`` puts several object kinds in an image (the COCO relevance rule).
- ``imagenet``: an ImageFolder tree ``DIR/<class>/<image>`` (ImageNet, Imagenette, ...).
- ``coco``: an images folder plus the official ``instances_*.json``; labels = categories present.

Typical use::

    imageset = load_dataset("synthetic", db_size=512, seed=0)
    imageset.images                 # (N, S, S, 3) uint8 RGB, preprocessed
    imageset.primary                # (N,) int64 class per image; imageset.labels: its label set
    image = read_image("query.jpg", 160, aspect_range=None)   # one user image: (160, 160, 3) uint8

Bad user input raises ``DataError``: one line naming the problem and the fix. A file PIL cannot read raises
``UnreadableImage`` (a DataError); the loaders skip and count those. The code is pure (explicit seeds, no
printing); it reads files only when asked to load them.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# imagenette: fetched once by support/download.py, then read as an ImageFolder (imagenet)
DATASETS = ("synthetic", "synthetic-multilabel", "imagenet", "imagenette", "coco")
DEFAULT_ASPECT_RANGE = (0.9, 1.1)  # paper §2.1: keep nearly square images only
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad user input; str(e) is ONE line naming the problem and the fix."""


class UnreadableImage(DataError):
    """A file PIL cannot open or decode (the loaders skip and count these; never fatal there)."""


# What Pillow's decoders may raise on one bad file (beyond OSError, its documented error): each
# means "this file", never "this run", so the loaders skip it and count it.
DECODER_ERRORS = (OSError, ValueError, SyntaxError, NotImplementedError, ArithmeticError, MemoryError,
                  Image.DecompressionBombError, struct.error, EOFError, IndexError, TypeError, KeyError)


def printable(path) -> str:
    """A path as it can be printed inside one line: itself, or, when it holds a control character (a newline)
    or bytes that are no text, its ascii() escape without the quotes."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return text if text.isprintable() else ascii(text)[1:-1]


@dataclass
class ImageSet:
    """Preprocessed images kept once in memory, with their labels."""

    images: np.ndarray  # (n, S, S, 3) uint8 RGB, already filtered/cropped/resized
    labels: list[frozenset[int]]  # label set per image (single-label sources: one element)
    primary: np.ndarray  # (n,) int64 class for stratification and clustered IDs (COCO: see load_coco)
    refs: list[str]  # file path per image, or "synthetic:<p>": image p of the built-in set
    class_names: list[str]  # name per class index
    skipped: int = 0  # unreadable files skipped
    filtered: int = 0  # images dropped by the aspect-ratio filter
    unlabelled: int = 0  # COCO images without annotations, dropped (nothing could be relevant to them)

    def __len__(self) -> int:
        return len(self.refs)




# ---------------------------------------------------------------- preprocessing (paper §2.1)

def check_aspect_range(aspect_range: Sequence[float]) -> tuple[float, float]:
    """Validate a (low, high) width/height range; return it as floats."""
    fix = "pass two positive numbers LOW <= HIGH, e.g. --aspect-range 0.9 1.1"
    try:
        low, high = (float(x) for x in aspect_range)
    except (TypeError, ValueError):
        raise DataError(f"aspect range {aspect_range!r} is not two numbers; {fix}") from None
    if not 0 < low <= high < math.inf:
        raise DataError(f"aspect range ({low}, {high}) is invalid; {fix}")
    return low, high


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"image size {image_size!r} is invalid; pass a positive pixel count, e.g. --image-size 160")


def aspect_ok(width: int, height: int, aspect_range: Sequence[float]) -> bool:
    """True when width/height lies in the closed range (paper §2.1 keeps nearly square images)."""
    low, high = aspect_range
    return height > 0 and low <= width / height <= high


def center_crop_resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """Centre-crop (H, W, 3) uint8 to a square, then resize it to image_size (a new array).

    Shrinking uses area interpolation (averages pixels, no aliasing); enlarging uses bilinear.
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    if side == image_size:
        return square.copy()
    interpolation = cv2.INTER_AREA if side > image_size else cv2.INTER_LINEAR
    return cv2.resize(square, (image_size, image_size), interpolation=interpolation)


def preprocess(image: np.ndarray, image_size: int,
               aspect_range: Sequence[float] = DEFAULT_ASPECT_RANGE) -> np.ndarray | None:
    """Paper §2.1: aspect filter, centre crop to a square, resize.

    ``image`` is (H, W, 3) uint8 RGB ((H, W) greyscale becomes RGB). Returns a new
    (image_size, image_size, 3) uint8 array, or None when width/height is outside the closed range.
    """
    aspect_range = check_aspect_range(aspect_range)
    _check_image_size(image_size)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} dtype {image.dtype}")
    if not aspect_ok(image.shape[1], image.shape[0], aspect_range):
        return None
    return center_crop_resize(image, image_size)


# 16-bit greyscale (PNG, TIFF, PGM) as PIL opens it. Its convert("RGB") clips every value above 255 to
# white instead of scaling, so these are scaled to 8 bits by hand.
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def sixteen_bit_grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) values in 0..65535 -> (H, W, 3) uint8 RGB, 0..255 (65535 / 257 = 255)."""
    scaled = np.clip(np.round(grey.astype(np.float32) / 257), 0, 255).astype(np.uint8)
    return cv2.cvtColor(scaled, cv2.COLOR_GRAY2RGB)


def read_image(path: str, image_size: int,
               aspect_range: Sequence[float] | None = DEFAULT_ASPECT_RANGE) -> np.ndarray | None:
    """Decode one file and preprocess it (paper §2.1); None when the aspect filter rejects it.

    ``aspect_range=None`` skips the filter (still centre-cropped), e.g. for a user's query image.
    The ratio is read from the header before any decoding, and JPEGs are decoded at the smallest
    DCT scale that still covers ``image_size`` (Image.draft), so rejected or large files cost little.
    Greyscale (8 or 16 bits), RGBA, palette and CMYK images become RGB (alpha is dropped). Raises
    UnreadableImage (a DataError) for anything PIL cannot open or decode, and for anything but a regular
    file (a FIFO or a device named *.jpg is never opened: reading one could wait forever); the loaders count
    those as skipped instead.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError("not a regular file")
        with Image.open(path) as im:
            width, height = im.size
            if min(width, height) < 1:
                raise ValueError(f"its size is {width} x {height}")
            if aspect_range is not None and not aspect_ok(width, height, aspect_range):
                return None
            scale = image_size / min(width, height)
            im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
            if im.mode in SIXTEEN_BIT_GREY_MODES:
                rgb = sixteen_bit_grey_to_rgb(np.asarray(im))
            else:
                rgb = np.asarray(im.convert("RGB"))  # also CMYK, greyscale, RGBA, 16-bit RGB (PIL reads it as 8-bit)
    except DECODER_ERRORS as error:
        raise UnreadableImage(f"cannot read image '{printable(path)}' ({printable(error)}); "
                              f"pass a readable image file") from None
    return center_crop_resize(rgb, image_size)  # the header ratio decided; draft() may round a pixel


# ---------------------------------------------------------------- synthetic source

# A class = texture family + shape family. Each shape and each texture serves two or three classes, so
# neither trait alone identifies a class: retrieval has to see both (learnable, not trivial).
SYNTHETIC_CLASSES = (
    ("striped", "triangle"), ("dotted", "triangle"), ("checkered", "square"), ("striped", "square"),
    ("dotted", "circle"), ("checkered", "circle"), ("solid", "star"), ("striped", "star"),
    ("solid", "cross"), ("checkered", "cross"),
)
SYNTHETIC_CLASS_NAMES = [f"{texture}-{shape}" for texture, shape in SYNTHETIC_CLASSES]
_STRONG_ASPECTS = (2 / 3, 3 / 4, 4 / 3, 3 / 2)  # photo formats, outside the default aspect range
_STRONG_BLOCK_SHARE = 0.15  # share of 10-image blocks in such a format (whole blocks: classes stay balanced)
_MILD_SHARE = 0.2  # share of images slightly off square (kept, but cropped)


def _unit_shapes() -> dict[str, np.ndarray]:
    """Outline of each shape family: (P, 2) polygon vertices (x, y) around the origin, radius about 1."""
    def ring(count: int, radius: np.ndarray | float, start: float) -> np.ndarray:
        angle = start + np.arange(count) * 2 * np.pi / count
        return np.stack([np.cos(angle), np.sin(angle)], 1) * np.reshape(radius, (-1, 1))
    arm = 0.33  # half-width of a cross arm, relative to its length
    cross = [(arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1),
             (-arm, 1), (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm), (-arm, -1)]
    return {
        "triangle": ring(3, 1.0, -np.pi / 2),
        "square": ring(4, 0.9, np.pi / 4),
        "circle": ring(48, 0.85, 0.0),  # 48 sides look round at these sizes
        "star": ring(10, np.tile([1.0, 0.45], 5), -np.pi / 2),  # five points, inner radius 0.45
        "cross": np.array(cross, dtype=float),
    }


_SHAPES = _unit_shapes()


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The two colours of a texture: one random hue, once dark and once light, in random order. The hue varies
    from object to object; the luminance contrast that draws the texture (what grey SIFT sees) does not, so the
    pattern is always plain to see and colour never tells one texture from another."""
    hue = rng.uniform(0.2, 1.0, 3)                                     # no channel below a fifth: no pure primaries
    hue /= hue.max()                                                   # (3,) RGB direction, brightest channel 1
    dark = hue * rng.uniform(25, 75)                                   # (3,) brightest channel 25-75 of 255
    light = 255 - (1 - hue) * rng.uniform(0, 60) - rng.uniform(0, 40)  # (3,) every channel at least 167: the gap
                                                                       # in grey level is at least 140
    pair = (dark.astype(np.float32), light.astype(np.float32))
    return pair if rng.random() < 0.5 else pair[::-1]


def _draw_object(canvas: np.ndarray, cls: int, centre: np.ndarray, radius: float, rng: np.random.Generator) -> None:
    """Paint one textured shape of class ``cls`` onto the float32 (H, W, 3) canvas, in place."""
    texture, shape = SYNTHETIC_CLASSES[cls]
    angle = rng.uniform(0, 2 * np.pi)
    stretch = rng.uniform(0.8, 1.25)  # mild anisotropy: not every triangle is equilateral
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    points = (_SHAPES[shape] * [stretch * radius, radius / stretch]) @ np.array([[cos, sin], [-sin, cos]])
    points += centre  # (P, 2) rotated, scaled, placed
    height, width = canvas.shape[:2]
    x0, y0 = np.maximum(np.floor(points.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(points.max(0)).astype(int) + 1, [width, height])
    if x1 <= x0 or y1 <= y0:
        return
    bits = 4  # cv2 fixed-point fraction bits: sub-pixel, anti-aliased edges on small shapes
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)  # (h, w) of the bounding box only: cheap
    cv2.fillPoly(mask, [np.round((points - [x0, y0]) * 2 ** bits).astype(np.int32)], 255, cv2.LINE_AA, bits)
    # Texture coordinates (u, v) in the object's own frame, so the pattern turns with the object.
    xs = np.arange(x0, x1, dtype=np.float32) - float(centre[0])  # (w,)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] - float(centre[1])  # (h, 1)
    u, v = xs * cos + ys * sin, ys * cos - xs * sin  # (h, w) each, by broadcasting
    if texture == "striped":
        pattern = np.floor(u / (radius * rng.uniform(0.22, 0.35))) % 2
    elif texture == "checkered":
        cell = radius * rng.uniform(0.3, 0.45)
        pattern = (np.floor(u / cell) + np.floor(v / cell)) % 2
    elif texture == "dotted":
        step = radius * rng.uniform(0.35, 0.5)
        pattern = ((u % step - step / 2) ** 2 + (v % step - step / 2) ** 2 < (0.3 * step) ** 2).astype(np.float32)
    else:  # solid
        pattern = np.zeros_like(u)
    first, second = _colour_pair(rng)
    paint = first + pattern[..., None] * (second - first)  # (h, w, 3)
    alpha = mask[..., None].astype(np.float32) / 255  # (h, w, 1)
    region = canvas[y0:y1, x0:x1]
    region += alpha * (paint - region)


def _noise_tile(image_size: int, seed: int) -> np.ndarray:
    """Grey noise shared by a seed's images; each image reads it at its own offset (cheaper than fresh noise)."""
    return np.random.default_rng([seed, image_size, 1]).standard_normal((2 * image_size,) * 2, dtype=np.float32)


def render_synthetic(index: int, image_size: int = 160, seed: int = 0, multilabel: bool = False,
                     noise: np.ndarray | None = None) -> tuple[np.ndarray, frozenset[int], int]:
    """Raw synthetic image ``index``: (H, W, 3) uint8, its label set and its primary class.

    Depends only on (seed, index, image_size, multilabel). The short side is ``image_size``; most
    images are square, some slightly off square (kept, cropped) and some whole 10-image blocks have a
    photo format like 4:3 (removed by the default aspect filter). Single-label: class ``index % 10``
    plus smaller distractor shapes of other classes. Multi-label: two or three object kinds; the
    primary class is ``index % 10``, drawn biggest (largest radius) and last (on top).
    """
    if noise is None:
        noise = _noise_tile(image_size, seed)
    rng = np.random.default_rng([seed, index])
    block_rng = np.random.default_rng([seed, index // len(SYNTHETIC_CLASSES), 2])
    if block_rng.random() < _STRONG_BLOCK_SHARE:
        aspect = _STRONG_ASPECTS[block_rng.integers(len(_STRONG_ASPECTS))]
    else:
        aspect = rng.uniform(0.92, 1.08) if rng.random() < _MILD_SHARE else 1.0
    side = image_size
    height, width = (side, round(side * aspect)) if aspect >= 1 else (round(side / aspect), side)
    offset = np.array([(width - side) / 2, (height - side) / 2])  # objects live in the central square

    # Background: a smooth field through 3 x 3 random colours, and up to five lines of clutter.
    canvas = cv2.resize(rng.uniform(0, 255, (3, 3, 3)).astype(np.float32), (width, height))  # (H, W, 3)
    for _ in range(rng.integers(0, 6)):
        (xa, ya), (xb, yb) = rng.uniform(0, [width, height], (2, 2)).astype(int).tolist()
        cv2.line(canvas, (xa, ya), (xb, yb), rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 4)))

    cls = index % len(SYNTHETIC_CLASSES)
    others = [int(c) for c in rng.permutation([c for c in range(len(SYNTHETIC_CLASSES)) if c != cls])]
    if multilabel:
        kinds = others[:rng.integers(1, 3)]  # one or two more object kinds
        corners = rng.permutation(4)  # one quadrant each, so objects rarely hide one another
        centres = [offset + (np.array([c % 2, c // 2]) / 2 + 0.25 + rng.uniform(-0.1, 0.1, 2)) * side for c in corners]
        for centre, other in zip(centres[1:], kinds):
            _draw_object(canvas, other, centre, side * rng.uniform(0.12, 0.18), rng)
        _draw_object(canvas, cls, centres[0], side * rng.uniform(0.2, 0.27), rng)
        labels = frozenset([cls, *kinds])
    else:
        for other in others[:rng.integers(0, 4)]:  # clutter: up to three small shapes of other classes
            _draw_object(canvas, other, offset + rng.uniform(0.1, 0.9, 2) * side, side * rng.uniform(0.08, 0.15), rng)
        radius = side * rng.uniform(0.2, 0.36)
        _draw_object(canvas, cls, offset + rng.uniform(0.75 * radius, side - 0.75 * radius, 2), radius, rng)
        labels = frozenset([cls])

    top, left = rng.integers(0, noise.shape[0] - height + 1), rng.integers(0, noise.shape[1] - width + 1)
    canvas += rng.uniform(2, 14) * noise[top:top + height, left:left + width, None]  # sensor-like grain
    return np.clip(canvas, 0, 255).astype(np.uint8), labels, cls


def make_synthetic(n: int, image_size: int = 160, seed: int = 0, multilabel: bool = False,
                   aspect_range: Sequence[float] = DEFAULT_ASPECT_RANGE) -> ImageSet:
    """The first ``n`` synthetic images that pass the aspect filter, preprocessed like photos.

    Raw image i depends only on (seed, i), so a set of n is a prefix of a set of n + 1: image p is
    always the same, and its ref "synthetic:<p>" names it. Raw images the filter rejects are counted in
    ``filtered``. Classes are balanced (class = raw index % 10; whole 10-image blocks are rejected).
    """
    _check_image_size(image_size)
    aspect_range = check_aspect_range(aspect_range)
    if n < 0 or seed < 0:
        raise DataError(f"synthetic data needs n >= 0 and seed >= 0, got {n} and {seed}; pass non-negative values")
    noise = _noise_tile(image_size, seed)
    images, labels, primary, refs = [], [], [], []
    index = 0
    while len(images) < n:
        if index >= 10 * n + 100:  # about 85 % pass the default range; ten times fewer means a bad range
            raise DataError(f"aspect range {aspect_range} keeps only {len(images)} of {index} synthetic images; "
                            f"widen --aspect-range, e.g. 0.9 1.1")
        raw, label_set, cls = render_synthetic(index, image_size, seed, multilabel, noise)
        image = preprocess(raw, image_size, aspect_range)
        if image is not None:
            images.append(image)
            labels.append(label_set)
            primary.append(cls)
            refs.append(f"synthetic:{len(refs)}")
        index += 1
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return ImageSet(stacked, labels, np.array(primary, dtype=np.int64), refs, list(SYNTHETIC_CLASS_NAMES),
                    filtered=index - len(images))


# ---------------------------------------------------------------- files on disk: ImageFolder and COCO

def _decode_all(paths: list[str], image_size: int, aspect_range: Sequence[float],
                wanted: int | None = None) -> tuple[list[np.ndarray], list[int], int, int]:
    """Read files in order, stopping once ``wanted`` are kept -> (images, kept positions, skipped, filtered)."""
    images, kept, skipped, filtered = [], [], 0, 0
    for position, path in enumerate(paths):
        if wanted is not None and len(images) >= wanted:
            break
        try:
            image = read_image(path, image_size, aspect_range)
        except UnreadableImage:  # counted, never fatal
            skipped += 1
            continue
        if image is None:
            filtered += 1
        else:
            images.append(image)
            kept.append(position)
    return images, kept, skipped, filtered


def _require_folder(path: str | None, what: str, flag: str) -> str:
    if not path:
        raise DataError(f"no {what} given; pass {flag} DIR")
    if not os.path.isdir(path):
        raise DataError(f"{what} '{path}' does not exist or is not a folder; pass an existing folder with {flag}")
    return path


def _visible(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def _nothing_kept(where: str, skipped: int, filtered: int, aspect_range: Sequence[float]) -> DataError:
    return DataError(f"no usable image in '{printable(where)}' ({filtered} outside aspect range {tuple(aspect_range)}, "
                     f"{skipped} unreadable); widen --aspect-range (e.g. 0.5 2.0) or check the files")


def load_imagefolder(root: str, image_size: int = 160, aspect_range: Sequence[float] = DEFAULT_ASPECT_RANGE,
                     limit_per_class: int | None = None) -> ImageSet:
    """ImageFolder tree ``root/<class>/<image>``: one label per image, its folder (classes sorted by name).

    Files are read in name order; ``limit_per_class`` keeps at most that many images per class (the
    first that pass the filter), so a huge tree such as ImageNet need not be decoded whole. Files with
    other extensions are ignored; unreadable image files are skipped and counted. A class folder left
    with no usable image is an error, like an empty one.
    """
    _check_image_size(image_size)
    aspect_range = check_aspect_range(aspect_range)
    _require_folder(root, "data root", "--data-root")
    class_names = [name for name in _visible(root) if os.path.isdir(os.path.join(root, name))]
    if not class_names:
        raise DataError(f"data root '{root}' has no class folders; lay images out as DIR/<class>/<image> (ImageFolder)")
    images, labels, refs, skipped, filtered = [], [], [], 0, 0
    for cls, name in enumerate(class_names):
        folder = os.path.join(root, name)
        paths = [os.path.join(folder, file) for file in _visible(folder) if file.lower().endswith(IMAGE_EXTENSIONS)]
        if not paths:
            raise DataError(f"class folder '{printable(folder)}' has no image files; add images "
                            f"({' '.join(IMAGE_EXTENSIONS)}) or remove the folder")
        decoded, kept, class_skipped, class_filtered = _decode_all(paths, image_size, aspect_range, limit_per_class)
        if not decoded:  # an empty class, as far as the run can tell
            raise DataError(f"class folder '{printable(folder)}' has no usable image ({class_skipped} unreadable, "
                            f"{class_filtered} outside aspect range {tuple(aspect_range)}); replace the files, "
                            f"remove the folder, or widen --aspect-range (e.g. 0.5 2.0)")
        images += decoded
        labels += [cls] * len(decoded)
        refs += [paths[position] for position in kept]
        skipped, filtered = skipped + class_skipped, filtered + class_filtered
    if not images:
        raise _nothing_kept(root, skipped, filtered, aspect_range)
    return ImageSet(np.stack(images), [frozenset([cls]) for cls in labels], np.array(labels, dtype=np.int64),
                    refs, class_names, skipped=skipped, filtered=filtered)


COCO_MAX_SIDE = 100_000  # pixels: a width, height or box beyond it, or one not finite, is a broken file, not a photo


def _coco_number(value, field: str, problem: str, low: float = 0, high: float = COCO_MAX_SIDE) -> float:
    """A number of the COCO file that `problem` names, finite and in [low, high]; else a DataError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise DataError(f"{problem} has an entry whose {field} is {ascii(value)[:40]}, not a number from {low:g} "
                        f"to {high:g}; pass the official COCO instances_<split>.json")
    return value


def _coco_image(im: dict, problem: str) -> tuple[int, str, int, int]:
    """(id, file name, width, height) of an 'images' entry; width and height 0 when absent (unknown)."""
    image_id, file_name = int(im["id"]), str(im["file_name"])
    width, height = (int(_coco_number(im.get(field, 0), field, problem)) for field in ("width", "height"))
    return image_id, file_name, width, height


def _coco_annotation(a: dict, problem: str) -> tuple[int, int, float]:
    """(image id, category id, area) of an 'annotations' entry; area 0 when absent. Its bbox, unused, is
    checked all the same: a box that is not four finite numbers says the file is broken."""
    image_id, category = int(a["image_id"]), int(a["category_id"])
    box = a.get("bbox", [])
    if not isinstance(box, list) or len(box) not in (0, 4):
        raise DataError(f"{problem} has an entry whose bbox is {ascii(box)[:40]}, not [x, y, width, height]; "
                        f"pass the official COCO instances_<split>.json")
    for value in box:
        _coco_number(value, "bbox value", problem, low=-COCO_MAX_SIDE)
    return image_id, category, float(_coco_number(a.get("area", 0.0), "area", problem, high=COCO_MAX_SIDE ** 2))


def _read_coco_json(path: str) -> dict:
    """Parse an official COCO instances file, turning every way it can be wrong into a DataError."""
    if not path or not os.path.isfile(path):
        raise DataError(f"COCO annotations file '{printable(path)}' not found; "
                        f"pass --coco-annotations instances_<split>.json")
    problem, fix = f"COCO annotations file '{printable(path)}'", "pass the official COCO instances_<split>.json"
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{problem} is not valid JSON ({error}); {fix}") from None
    if not isinstance(content, dict):
        raise DataError(f"{problem} holds a JSON {type(content).__name__}, not an object with 'images', "
                        f"'annotations' and 'categories'; {fix}")
    try:
        images = [_coco_image(im, problem) for im in content["images"]]
        annotations = [_coco_annotation(a, problem) for a in content["annotations"]]
        categories = {int(c["id"]): str(c["name"]) for c in content["categories"]}
    except DataError:
        raise
    except KeyError as error:
        raise DataError(f"{problem} lacks the field {error}; {fix}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as error:
        raise DataError(f"{problem} has malformed entries ({error}); {fix}") from None
    unknown = {category for _, category, _ in annotations} - categories.keys()
    if unknown:
        raise DataError(f"{problem} uses category ids {sorted(unknown)[:5]} missing from 'categories'; {fix}")
    return {"images": images, "annotations": annotations, "categories": categories}


def load_coco(images_dir: str, annotations: str | Sequence[str], image_size: int = 160,
              aspect_range: Sequence[float] = DEFAULT_ASPECT_RANGE) -> ImageSet:
    """COCO images plus official instances JSON (one path, or several merged, e.g. train + val).

    Labels: the set of categories annotated in the image (class index = rank of the category id;
    class_names are the COCO names). Primary category, for clustered IDs and stratification: the one
    with the largest total annotated area in the image, ties to the lower category id. Images with no
    annotation are dropped and counted in ``unlabelled`` (nothing could be relevant to them); images
    missing or unreadable on disk count as ``skipped`` (all of them missing is an error: a wrong folder).
    The aspect filter uses the JSON's width and height when present, so rejected images are never opened.
    """
    _check_image_size(image_size)
    aspect_range = check_aspect_range(aspect_range)
    _require_folder(images_dir, "COCO images folder", "--data-root")
    parsed = [_read_coco_json(path) for path in ([annotations] if isinstance(annotations, str) else annotations)]
    categories = {category: name for part in parsed for category, name in part["categories"].items()}
    category_ids = sorted(categories)
    class_of = {category: cls for cls, category in enumerate(category_ids)}
    area: dict[int, dict[int, float]] = {}  # image id -> class -> total annotated area
    for part in parsed:
        for image_id, category, ann_area in part["annotations"]:
            per_class = area.setdefault(image_id, {})
            per_class[class_of[category]] = per_class.get(class_of[category], 0.0) + ann_area

    files, labels, primary, filtered, unlabelled, seen = [], [], [], 0, 0, set()
    for part in parsed:
        for image_id, file_name, width, height in part["images"]:
            if image_id in seen:  # listed twice, e.g. the same file passed twice
                continue
            seen.add(image_id)
            if image_id not in area:
                unlabelled += 1
            elif width and height and not aspect_ok(width, height, aspect_range):
                filtered += 1
            else:
                files.append(os.path.join(images_dir, file_name))
                labels.append(frozenset(area[image_id]))
                # largest area first, then the lower category id
                primary.append(max(area[image_id], key=lambda cls, a=area[image_id]: (a[cls], -cls)))
    if files and not any(os.path.isfile(path) for path in files):  # the usual slip: a parent or sibling folder
        raise DataError(f"none of the {len(files)} images listed in the annotations is in '{images_dir}' "
                        f"(e.g. '{files[0]}'); pass the folder that holds them with --data-root")
    images, kept, skipped, unseen_filtered = _decode_all(files, image_size, aspect_range)
    filtered += unseen_filtered  # images whose JSON entry had no size
    if not images:
        raise _nothing_kept(images_dir, skipped, filtered, aspect_range)
    return ImageSet(np.stack(images), [labels[k] for k in kept], np.array([primary[k] for k in kept], dtype=np.int64),
                    [files[k] for k in kept], [categories[c] for c in category_ids],
                    skipped=skipped, filtered=filtered, unlabelled=unlabelled)


def load_dataset(name: str, *, data_root: str | None = None, coco_annotations: str | Sequence[str] | None = None,
                 image_size: int = 160, aspect_range: Sequence[float] = DEFAULT_ASPECT_RANGE,
                 db_size: int, seed: int = 0) -> ImageSet:
    """The pool a run draws its ``db_size`` images from (``split_dataset`` does the drawing).

    synthetic: exactly db_size images. imagenet: ceil(db_size / classes) per class at most, the whole
    tree only if that falls short. coco: every usable image in the annotations.
    Raises DataError when fewer than db_size images are available, saying how many there are.
    """
    _check_image_size(image_size)
    aspect_range = check_aspect_range(aspect_range)
    if not isinstance(db_size, (int, np.integer)) or db_size < 1:
        raise DataError(f"db-size {db_size!r} is invalid; pass a positive number of images, e.g. --db-size 512")
    if name in ("synthetic", "synthetic-multilabel"):
        return make_synthetic(db_size, image_size, seed, name == "synthetic-multilabel", aspect_range)
    if name == "imagenet":
        root = _require_folder(data_root, "data root", "--data-root")
        per_class = math.ceil(db_size / max(1, sum(os.path.isdir(os.path.join(root, d)) for d in _visible(root))))
        imageset = load_imagefolder(root, image_size, aspect_range, limit_per_class=per_class)
        if len(imageset) < db_size:  # some classes ran short: take everything there is
            imageset = load_imagefolder(root, image_size, aspect_range)
    elif name == "coco":
        if not coco_annotations:
            raise DataError("no COCO annotations given; pass --coco-annotations path/instances_<split>.json")
        imageset = load_coco(data_root, coco_annotations, image_size, aspect_range)
    else:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if len(imageset) < db_size:
        raise DataError(f"db-size {db_size} is more than the {len(imageset)} images available in '{data_root}' "
                        f"({imageset.filtered} outside aspect range {aspect_range}, {imageset.skipped} unreadable); "
                        f"use --db-size {len(imageset)} or less, or widen --aspect-range")
    return imageset


def read_refs(refs: Sequence[str], image_size: int, *, dataset: str = "synthetic", seed: int = 0,
              aspect_range: Sequence[float] = DEFAULT_ASPECT_RANGE) -> np.ndarray:
    """The images that a run's refs name, preprocessed as that run did: (n, S, S, 3) uint8.

    "synthetic:<p>" is image p of the built-in set of `dataset` and `seed` (drawn again: a set of n is a
    prefix of a set of n + 1); anything else is a file path. Growing an index replays old images, so they
    are read back from where the run found them; a file that is gone is a DataError naming it.
    """
    synthetic = [int(ref.split(":", 1)[1]) for ref in refs if ref.startswith("synthetic:")]
    drawn = (make_synthetic(max(synthetic) + 1, image_size, seed, dataset == "synthetic-multilabel",
                            aspect_range).images if synthetic else None)
    images = []
    for ref in refs:
        if ref.startswith("synthetic:"):
            images.append(drawn[int(ref.split(":", 1)[1])])
        elif not os.path.isfile(ref):
            raise DataError(f"indexed image '{ref}' is gone; growing an index replays its old images: "
                            f"put the file back or run from the folder the run was started in")
        else:   # it passed the aspect filter once: crop it the same way, whatever the range is now
            images.append(read_image(ref, image_size, aspect_range=None))
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
