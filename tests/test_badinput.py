"""Bad input, tried: each case exits with status 2 and one line on stderr, or is processed correctly.

Every file is built in tmp_path; no training runs (checkpoints are written from an untrained tiny model).
The README's table of bad input lists every case, with the test of each here or in test_data.py/test_train.py.
"""
import contextlib
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from support import cli, engine, recipes, sources, store

TINY_MODEL = ["--image-size", "32", "--patch-size", "8", "--dim", "16", "--mlp-dim", "32", "--depth", "1",
              "--heads", "2"]
IDS = ["00", "01", "02"]


def fails(argv: list[str], capsys) -> str:
    """Run train.main, check it exits 2 with exactly one line on stderr and no traceback; return that line."""
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def save_png(path, array) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def tiny_checkpoint(path, **changes) -> str:
    """An untrained tiny model saved by store.save_checkpoint; `changes` overwrite checkpoint fields."""
    a = cli.build_parser().parse_args(TINY_MODEL)
    config = cli.model_config(a, max_len=4)
    model = train.ViTDSI(config)
    optimizer = engine.make_optimizer(model, recipes.RECIPES["fast"], 1e-3)
    catalogue = {"ids": IDS, "idb_refs": ["a.png", "b.png", "c.png"], "ids_scheme": "clustered", "db_size": 12,
                 "class_names": ["a"], "idb_classes": [0, 0, 0], "prefix_width": 1, "removed": [], "held_out": []}
    store.save_checkpoint(str(path), model, optimizer, config, a, 1, catalogue)
    if changes:
        ckpt = torch.load(path, weights_only=True)
        torch.save({**ckpt, **changes}, path)
    return str(path)


# ---------------------------------------------------------------- checkpoints and query mode

class Payload:
    """Unpickling this runs open(marker, "w"): the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_checkpoint_is_refused_and_its_payload_never_runs(writer, tmp_path, capsys):
    marker, crafted = tmp_path / "marker", tmp_path / "crafted.pt"
    with open(crafted, "wb") as f:
        (pickle.dump if writer == "pickle" else torch.save)({"model": Payload(marker)}, f)
    with contextlib.suppress(RuntimeError):                     # (a bare pickle is no torch file: it runs, then fails)
        torch.load(crafted, weights_only=False)                 # an unsafe load would run the payload ...
    assert marker.exists()
    marker.unlink()
    query = save_png(tmp_path / "q.png", np.zeros((32, 32, 3), np.uint8))
    err = fails(["--checkpoint", str(crafted), "--query", query], capsys)
    assert not marker.exists()                                  # ... the program's load never does
    assert "safe loader refused it" in err


def test_checkpoint_is_plain_data_and_answers_queries(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)                  # tensors and plain data only
    assert ckpt["format_version"] == store.CHECKPOINT_VERSION and ckpt["ids"] == IDS
    query = save_png(tmp_path / "q.png", np.full((50, 70, 3), 90, np.uint8))   # any aspect ratio is fine
    capsys.readouterr()
    assert train.main(["--checkpoint", path, "--query", query, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("q.png:") and len(lines) == 3      # the query, then 2 distinct IDB IDs
    assert "--top-k must be at least 1" in fails(["--checkpoint", path, "--query", query, "--top-k", "0"], capsys)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    assert "cannot decode" in fails(["--checkpoint", path, "--query", str(not_an_image)], capsys)


def test_checkpoint_of_another_version_or_config_names_the_difference(tmp_path, capsys):
    query = save_png(tmp_path / "q.png", np.zeros((32, 32, 3), np.uint8))
    ask = lambda path: fails(["--checkpoint", str(path), "--query", query], capsys)  # noqa: E731
    old = tiny_checkpoint(tmp_path / "old.pt", format_version=1)    # before growing an index was possible
    assert "format version 1, this train.py reads version 3" in ask(old)
    ckpt = torch.load(tiny_checkpoint(tmp_path / "c.pt"), weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "mlp_dim": 64}}, tmp_path / "shape.pt")
    assert re.search(r"parameter '[\w.]*mlp[\w.]*' has shape \(32, 16\), the config gives \(64, 16\)",
                     ask(tmp_path / "shape.pt"))
    torch.save({**ckpt, "config": {**ckpt["config"], "colour_space": "lab"}}, tmp_path / "field.pt")
    assert "field 'colour_space'" in ask(tmp_path / "field.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "ids"}, tmp_path / "noids.pt")
    assert "field 'ids'" in ask(tmp_path / "noids.pt")
    torch.save({**ckpt, "removed": ["77"]}, tmp_path / "removed.pt")
    assert "removed IDs" in ask(tmp_path / "removed.pt")
    torch.save({**ckpt, "idb_classes": [0]}, tmp_path / "classes.pt")
    assert "idb_classes" in ask(tmp_path / "classes.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "no format_version" in ask(tmp_path / "list.pt")


def test_a_format_2_checkpoint_loads_with_its_encoder_under_todays_names(tmp_path, capsys):
    """Format 2 kept the encoder's parts at the top of the model; the loader renames them, so the same
    queries give the same answers."""
    path = tiny_checkpoint(tmp_path / "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    def old_name(key):
        key = re.sub(r"^encoder\.blocks\.(\d+)\.", r"encoder.\1.", key)
        for new, old in (("encoder.patch_embedding.", "patch_embedding."), ("encoder.pos.", "encoder_pos."),
                         ("encoder.norm.", "encoder_norm.")):
            key = old + key[len(new):] if key.startswith(new) else key
        return key
    old_weights = {old_name(k): v for k, v in ckpt["model"].items()}
    assert "encoder.0.attn.to_qkv.weight" in old_weights and "encoder_norm.weight" in old_weights
    torch.save({**ckpt, "format_version": 2, "model": old_weights}, tmp_path / "v2.pt")
    model, loaded = store.load_checkpoint(str(tmp_path / "v2.pt"))
    assert loaded["format_version"] == store.CHECKPOINT_VERSION
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    query = save_png(tmp_path / "q.png", np.full((40, 40, 3), 90, np.uint8))
    answers = []
    for p in (path, str(tmp_path / "v2.pt")):
        capsys.readouterr()
        assert train.main(["--checkpoint", p, "--query", query, "--top-k", "3"]) == 0
        answers.append(capsys.readouterr().out.splitlines()[1:])
    assert answers[0] == answers[1] and len(answers[0]) == 3


# ---------------------------------------------------------------- outputs are written whole or not at all

def partial_then_fail(*args, **kwargs):
    """Stands in for json.dump / torch.save: writes some bytes to its file, then fails."""
    f = args[1]
    f.write(b"half a file" if "b" in f.mode else "half a file")
    raise OSError("disk full")


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text('{"rows": ["old"]}')
    monkeypatch.setattr(store.json, "dump", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_results(str(tmp_path), [], "header", {})
    assert (tmp_path / "results.json").read_text() == '{"rows": ["old"]}'
    monkeypatch.undo()

    checkpoint = tiny_checkpoint(tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(store.torch, "save", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tiny_checkpoint(checkpoint)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()

    store.write_results(str(tmp_path), [], "header", {"new": 1})     # and a write that succeeds replaces it
    assert json.loads((tmp_path / "results.json").read_text()) == {"rows": [], "new": 1}
    assert leftovers(tmp_path) == []


def test_failed_run_destroys_nothing_in_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "results.md", "train.log"):
        (out / name).write_text(f"earlier {name}")
    fails(["--dataset", "imagenet", "--data-root", str(tmp_path / "missing"), "--out", str(out)], capsys)
    for name in ("results.json", "results.md"):
        assert (out / name).read_text() == f"earlier {name}"
    assert (out / "train.log").read_text().startswith("earlier train.log")   # appended to, never emptied


def test_out_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    err = fails(TINY_MODEL + ["--out", str(tmp_path / "file" / "run")], capsys)
    assert "is a file" in err
    assert (tmp_path / "file").read_text() == "keep me"


# ---------------------------------------------------------------- data folders (ImageFolder, COCO)

def imagefolder(tmp_path, per_class=3, shape=(40, 40, 3)) -> str:
    root = tmp_path / "tree"
    for c, cls in enumerate(("a", "b")):
        for i in range(per_class):
            save_png(root / cls / f"{i}.png", np.full(shape, 40 * c + 10 * i, np.uint8))
    return str(root)


def run_on(root, *extra) -> list[str]:
    return TINY_MODEL + ["--dataset", "imagenet", "--data-root", str(root), "--db-size", "6", *extra]


def test_class_folder_with_no_readable_image(tmp_path, capsys):
    root = imagefolder(tmp_path)
    os.mkdir(os.path.join(root, "c"))
    for name in ("x.jpg", "y.png"):
        with open(os.path.join(root, "c", name), "wb") as f:
            f.write(b"\x00 not an image")
    err = fails(run_on(root, "--out", str(tmp_path / "o")), capsys)
    assert "c' has no usable image (2 unreadable" in err


def test_every_image_outside_the_aspect_range(tmp_path, capsys):
    root = imagefolder(tmp_path, shape=(30, 60, 3))                 # 2:1
    err = fails(run_on(root, "--out", str(tmp_path / "o")), capsys)
    assert "3 outside aspect range" in err and "--aspect-range" in err


def write_coco(tmp_path, content) -> list[str]:
    images = tmp_path / "images"
    save_png(images / "a.png", np.zeros((40, 40, 3), np.uint8))
    annotations = tmp_path / "instances.json"
    annotations.write_text(content if isinstance(content, str) else json.dumps(content))
    return TINY_MODEL + ["--dataset", "coco", "--data-root", str(images), "--coco-annotations", str(annotations),
                         "--db-size", "8", "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("content, needle", [   # invalid JSON and missing top-level fields: test_data.py
    ("[1, 2]", "holds a JSON list, not an object"),
    ({"images": 5, "annotations": [], "categories": []}, "malformed entries"),
    ({"images": [{"id": 1}], "annotations": [], "categories": []}, "lacks the field 'file_name'"),
])
def test_malformed_coco_json(content, needle, tmp_path, capsys):
    assert needle in fails(write_coco(tmp_path, content), capsys)


def test_coco_images_missing_on_disk(tmp_path, capsys):
    content = {"images": [{"id": i, "file_name": f"missing{i}.jpg"} for i in range(3)],
               "annotations": [{"image_id": i, "category_id": 1} for i in range(3)],
               "categories": [{"id": 1, "name": "cat"}]}
    err = fails(write_coco(tmp_path, content), capsys)
    assert "none of the 3 images listed in the annotations" in err and "--data-root" in err


# ---------------------------------------------------------------- odd image files (corrupt ones: test_data.py)

def test_odd_image_files(tmp_path):
    one = save_png(tmp_path / "one.png", np.array([[[10, 200, 30]]], np.uint8))         # 1 x 1 pixel
    assert (sources.read_image(one, 16) == [10, 200, 30]).all()
    grey16 = np.full((20, 20), 0x8080, np.uint16)                                       # 32896 / 257 = 128
    grey16[:, 10:] = 0xFFFF
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode in sources.SIXTEEN_BIT_GREY_MODES
    image = sources.read_image(str(tmp_path / "grey16.png"), 20)
    assert (image[:, :10] == 128).all() and (image[:, 10:] == 255).all()              # scaled, not clipped
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")           # magenta + yellow = red
    red = sources.read_image(str(tmp_path / "cmyk.jpg"), 20).astype(int)
    assert (red[..., 0] > 230).all() and (red[..., 1:] < 25).all()


def test_a_flag_argparse_rejects_exits_2_with_one_line(capsys):
    for argv in (["--dropout-draw", "foo"], ["--db-size", "abc"], ["--no-such-flag"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            train.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert argv[0] in err and "--help" in err
