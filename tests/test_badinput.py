"""Bad input, tried: each case exits with status 2 and one line on stderr, or is processed correctly.

Every file is built in tmp_path; no training runs (checkpoints are written from an untrained tiny model).
The README's table of bad input lists every case, with the test of each here or in test_data.py/test_train.py.
"""
import contextlib
import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from support import cli, engine, recipes, run, sources, store
from vitdsi import ViTDSIConfig

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
    assert train.main(["--checkpoint", path, "--query", query, "--top-k", "2", "--sheet", str(tmp_path / "s.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("q.png:") and lines[1].startswith("    1. ID ") and lines[2].startswith("    2. ID ")
    assert lines[3].startswith("note:") and lines[4].startswith("sheet:")   # the tiny index's images are not on disk
    assert "--top-k 0 must be at least 1" in fails(["--checkpoint", path, "--query", query, "--top-k", "0"], capsys)
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
        assert train.main(["--checkpoint", p, "--query", query, "--top-k", "3", "--sheet", str(tmp_path / "s.png")]) == 0
        answers.append(capsys.readouterr().out.splitlines()[1:4])
    assert answers[0] == answers[1] and all(" ID " in line for line in answers[0])


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



# ---------------------------------------------------------------- every number, and faults: one table of cases

TINY_RUN = ["--db-size", "64", "--image-size", "32", "--patch-size", "16", "--dim", "32", "--mlp-dim", "64",
            "--depth", "1", "--heads", "2", "--bovw-k", "16", "--index-epochs", "3", "--retrieval-epochs", "1",
            "--threads", "1"]


def flags(*extra: str) -> Callable:
    """A training run on TINY_RUN with `extra` flags on top (a flag given twice: the last counts)."""
    return lambda tmp_path: TINY_RUN + list(extra)


def checkpoint_with(*extra: str, **config) -> Callable:
    """--checkpoint C --query an image, then `extra` (which may ask for --add instead); C is an untrained tiny
    checkpoint whose model config `config` changes."""
    def argv(tmp_path):
        path = tiny_checkpoint(tmp_path / "c.pt")
        if config:
            ckpt = torch.load(path, weights_only=True)
            torch.save({**ckpt, "config": {**ckpt["config"], **config}}, path)
        query = save_png(tmp_path / "q.png", np.zeros((32, 32, 3), np.uint8))
        return ["--checkpoint", path, *([] if "--add" in extra else ["--query", query]), *extra]
    return argv


def coco_with(content: str) -> Callable:
    return lambda tmp_path: write_coco(tmp_path, content)


COCO = ('{{"images": [{{"id": 1, "file_name": "a.png", "width": {width}, "height": 40}}], '
        '"annotations": [{{"image_id": 1, "category_id": 1, "area": {area}, "bbox": [0, 0, {box}, 10]}}], '
        '"categories": [{{"id": 1, "name": "cat"}}]}}')


def class_folder_of(name: str, make: Callable) -> Callable:
    """An ImageFolder run whose class folder `name` holds one file, made by make(path)."""
    def argv(tmp_path):
        root = imagefolder(tmp_path)
        os.mkdir(os.path.join(root, name))
        make(os.path.join(root, name, "x.jpg"))
        return run_on(root)
    return argv


def corrupt(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"\x00 not an image")


@dataclass
class Case:
    name: str
    argv: Callable          # tmp_path -> the command line, without --out
    says: str | re.Pattern  # what the one line must say
    late: bool = False      # found once the run has begun: its train.log is written, nothing else
    overwrite: bool = True  # pass --overwrite, so that the run gets past the finished run in --out


def locked(tmp_path):
    """A training run into an --out that a live process (this test's parent) holds locked."""
    (tmp_path / "out" / ".lock").write_text(str(os.getppid()))
    return TINY_RUN


def imagefolder_run(*extra: str) -> Callable:
    return lambda tmp_path: run_on(imagefolder(tmp_path), *extra)


BAD_INPUT = [
    # every flag, before any work (support/cli.py RULES and RELATIONS)
    Case("heads-0", flags("--heads", "0"), "--heads 0 must be at least 1 (e.g. --heads 4)"),
    Case("dim-odd", flags("--dim", "33", "--heads", "3"), "--dim 33 must be even"),
    Case("dim-not-divisible", flags("--dim", "30", "--heads", "4"), "--dim 30 must be divisible by --heads 4"),
    Case("threads-negative", flags("--threads", "-1"), "--threads -1 must be 0 or more"),
    Case("seed-beyond-32-bits", flags("--seed", "4294967296"), "--seed 4294967296 must be at most 4294967295"),
    Case("seed-negative", flags("--seed", "-1"), "--seed -1 must be 0 or more"),
    Case("lr-inf", flags("--lr", "inf", "--retrieval-lr", "inf"), "--lr inf must be a finite number"),
    Case("lr-nan", flags("--lr", "nan"), "--lr nan must be a finite number"),
    Case("retrieval-lr-overflows", flags("--retrieval-lr", "1e38"), "--retrieval-lr 1e+38 must be at most 1e30"),
    Case("index-mix-nan", flags("--index-mix", "nan"), "--index-mix nan must be a finite number"),
    Case("aspect-reversed", flags("--aspect-range", "2", "1"), "--aspect-range 2.0 1.0 must be two numbers, MIN <="),
    Case("aspect-zero", flags("--aspect-range", "0", "1"), "--aspect-range 0.0 1.0 each must be more than 0"),
    Case("dropout-nan", flags("--dropout", "nan"), "--dropout nan must be a finite number"),
    Case("index-target-acc-0", flags("--index-target-acc", "0"), "--index-target-acc 0.0 must be more than 0"),
    Case("bovw-k-0", flags("--bovw-k", "0"), "--bovw-k 0 must be at least 1"),
    Case("db-size-0", flags("--db-size", "0"), "--db-size 0 must be at least 1"),
    Case("beam-0", flags("--beam", "0"), "--beam 0 must be at least 1"),
    Case("label-smoothing-1", flags("--label-smoothing", "1"), "--label-smoothing 1.0 must be less than 1"),
    Case("lr-floor-2", flags("--lr-floor", "2"), "--lr-floor 2.0 must be at most 1"),
    Case("batch-size-0", flags("--batch-size", "0"), "--batch-size 0 must be at least 1"),
    Case("warmup-negative", flags("--warmup-epochs", "-1"), "--warmup-epochs -1.0 must be 0 or more"),
    Case("index-fraction-1", flags("--index-fraction", "1"), "--index-fraction 1.0 must be less than 1"),
    Case("save-every-negative", flags("--save-every", "-1"), "--save-every -1 must be 0 or more"),
    Case("sweep-size-0", flags("--sweep", "--sweep-sizes", "64", "0"), "--sweep-sizes 64 0 each must be at least 1"),
    Case("depth-65", flags("--depth", "65"), "--depth 65 must be at most 64"),
    Case("image-not-divisible", flags("--image-size", "40"), "--image-size 40 must be divisible by --patch-size 16"),
    Case("too-many-patches", flags("--image-size", "4096", "--patch-size", "8"), "must give at most 64 patches a side"),
    # the --checkpoint modes' flags
    Case("top-k-0", checkpoint_with("--top-k", "0"), "--top-k 0 must be at least 1"),
    Case("beam-0-query", checkpoint_with("--beam", "0"), "--beam 0 must be at least 1"),
    Case("replay-min-2", checkpoint_with("--add", "a.png", "--replay-min", "2"), "--replay-min 2.0 must be at most 1"),
    Case("add-lr-0", checkpoint_with("--add", "a.png", "--add-lr", "0"), "--add-lr 0.0 must be more than 0"),
    # a checkpoint's model config, before any of the model is allocated
    Case("config-max-len-huge", checkpoint_with(max_len=10 ** 6), "its max_len 1000000 must be at most 64"),
    Case("config-heads-0", checkpoint_with(heads=0), "its heads 0 must be at least 1"),
    Case("config-dim-string", checkpoint_with(dim="x"), "its dim 'x' must be a whole number"),
    Case("config-depth-bool", checkpoint_with(depth=True), "its depth True must be a whole number"),
    Case("config-dim-odd", checkpoint_with(dim=16, heads=3), "its dim 16 must be divisible by heads 3"),
    Case("config-dropout-nan", checkpoint_with(dropout=float("nan")), "its dropout nan must be a finite number"),
    Case("config-pos-encoding", checkpoint_with(pos_encoding="rope"), "its pos_encoding 'rope' must be one of"),
    Case("config-huge-weights-small", checkpoint_with(depth=64, dim=4096, mlp_dim=65536),
         "does not fit its own model config"),
    Case("config-ids-too-long", checkpoint_with(max_len=3), "2-digit IDs, longer than its model config's max_len 3"),
    # data: COCO numbers, odd files, odd names
    Case("coco-width-1e400", coco_with(COCO.format(width="1e400", area=10, box=10)),
         "instances.json' has an entry whose width is inf, not a number from 0 to 100000", late=True),
    Case("coco-area-nan", coco_with(COCO.format(width=40, area="NaN", box=10)), "whose area is nan", late=True),
    Case("coco-bbox-inf", coco_with(COCO.format(width=40, area=10, box="Infinity")), "whose bbox value is inf",
         late=True),
    Case("fifo-named-jpg", class_folder_of("c", os.mkfifo), "c' has no usable image (1 unreadable", late=True),
    Case("newline-in-a-folder-name", class_folder_of("new\nline", corrupt), "new\\nline' has no usable image",
         late=True),
    # divergence: a loss that is not finite stops the run (engine.run_epoch -> run.TrainingDiverged)
    # the output folder: a finished run is replaced only with --overwrite; one run at a time
    Case("finished-run-without-overwrite", flags(), "holds a finished run (results.json); pass --overwrite",
         overwrite=False),
    Case("out-locked", locked, "another run (process"),
    # flags that belong to another mode; seeds of an ImageFolder run
    Case("sheet-without-query", flags("--sheet", "x.png"), "--sheet works with --query"),
    Case("explain-without-query", flags("--explain"), "--explain works with --query"),
    Case("db-size-beyond-memory", flags("--db-size", "100000000"), "more than half of this machine's"),
    Case("imagefolder-seed-negative", imagefolder_run("--seed", "-1"), "--seed -1 must be 0 or more"),
    Case("lr-diverges", flags("--models", "dsi", "--lr", "1e30", "--retrieval-lr", "1e30"),
         re.compile(r"^error: training diverged in the \w+ phase( at epoch \d+)?: the loss is nan; "
                    r"lower the learning rate \(--lr\)$"), late=True),
]


def files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda case: case.name)
def test_bad_input_is_one_line_and_leaves_out_as_it_was(case, tmp_path, capsys):
    """Exit 2, one line `error: ...` saying what is wrong and how to fix it, no traceback; an --out that holds
    an earlier run's files keeps them byte for byte (a run stopped once begun adds its train.log, no more)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(b'{"rows": ["an earlier run"]}')
    argv = case.argv(tmp_path) + ["--out", str(out)] + (["--overwrite"] if case.overwrite else [])
    before = files(out)
    err = fails(argv, capsys).rstrip("\n")
    assert case.says.search(err) if isinstance(case.says, re.Pattern) else case.says in err, err
    after = files(out)
    assert {name: after.get(name) for name in before} == before
    assert set(after) - set(before) == ({"train.log"} if case.late else set())


def test_every_number_flag_has_its_rule():
    """The table is the documentation: each flag that takes a number (and each model config field) has a rule."""
    numeric = {action.dest for action in cli.build_parser()._actions if action.type in (int, float)}
    ruled = {rule.name for rule in cli.RULES}
    assert numeric <= ruled, numeric - ruled
    assert {f.name for f in fields(ViTDSIConfig)} <= ruled
    assert cli.config_problem(asdict(ViTDSIConfig())) is None                  # the defaults pass
    for recipe in recipes.RECIPES.values():                                    # and so does every named recipe
        assert cli.first_problem(asdict(recipe), cli.TRAINING, cli.flag_and_value) is None


def test_divergence_names_the_phase_and_the_epoch():
    torch.manual_seed(0)
    model = train.ViTDSI(ViTDSIConfig(image_size=32, patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2, max_len=4))
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))                                   # every logit NaN: so is the loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = engine.Trainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                             torch.device("cpu"))
    ids = data.ids_to_tensor(["01", "20", "11"])
    pool = engine.Pool(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), lambda idx: ids[idx].unsqueeze(1),
                       torch.zeros(3, dtype=torch.bool))
    with pytest.raises(run.TrainingDiverged, match=r"^training diverged in the indexing phase at epoch 7: the loss "
                                                   r"is nan; lower the learning rate \(--lr\)$"):
        engine.run_epoch(trainer, pool, torch.arange(3), 3, phase="indexing", epoch=7)
    assert issubclass(run.TrainingDiverged, run.UsageError)                   # train.main's exit 2, one line


@pytest.mark.parametrize("error", [struct.error("unpack"), IndexError("tile"), TypeError("mode"), EOFError(),
                                   NotImplementedError("codec"), OverflowError("size"), MemoryError(),
                                   Image.DecompressionBombError("pixels"), SyntaxError("header")])
def test_any_decoder_error_skips_the_file(error, tmp_path, monkeypatch):
    path = save_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    def broken(*args, **kwargs):
        raise error
    monkeypatch.setattr(sources.Image, "open", broken)
    with pytest.raises(sources.UnreadableImage, match="cannot read image"):
        sources.read_image(path, 8)


def test_only_regular_files_are_read_and_names_print_on_one_line(tmp_path):
    root = imagefolder(tmp_path)
    os.mkfifo(os.path.join(root, "a", "fifo.jpg"))          # opening it would wait for a writer, for ever
    imageset = sources.load_imagefolder(root, 32)
    assert imageset.skipped == 1 and len(imageset) == 6
    assert sources.printable("plain/café.jpg") == "plain/café.jpg"
    assert sources.printable("a\nb.jpg") == "a\\nb.jpg"
    assert sources.printable(os.fsdecode(b"bad\xff.jpg")) == "bad\\udcff.jpg"
    assert "\n" not in str(sources.UnreadableImage(sources.printable("x\ny")))


def test_a_write_that_fails_is_one_line_and_leaves_the_earlier_run_whole(tmp_path):
    """A file size limit (as a full disk would) stops the checkpoint's write: exit 2, one line, no traceback,
    and --out's earlier files byte for byte; nothing half-written, no staging folder or lock left behind."""
    import resource
    import subprocess
    import sys
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(b'{"rows": ["an earlier run"]}')
    (out / "checkpoint.pt").write_bytes(b"an earlier checkpoint")
    before = files(out)
    limit = 64 * 1024            # the tiny checkpoint is larger; the log and the tables are not
    proc = subprocess.run([sys.executable, "train.py", *TINY_RUN, "--models", "dsi", "--out", str(out), "--overwrite"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read or write") and "Traceback" not in proc.stderr
    after = files(out)
    assert {name: after.get(name) for name in before} == before and set(after) - set(before) == {"train.log"}
