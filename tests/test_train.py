"""End-to-end checks of train.py on a tiny built-in data set (seconds on a CPU)."""
import json
import re
import os
import subprocess
import sys
import types
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
import vitdsi
from vitdsi import ViTDSI, ViTDSIConfig
from support import cli, engine, recipes, run, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--db-size", "64", "--image-size", "64", "--patch-size", "16", "--dim", "32", "--mlp-dim", "64",
        "--depth", "1", "--heads", "2", "--dropout", "0.0", "--index-epochs", "150", "--index-target-acc", "1.0",
        "--retrieval-epochs", "2", "--bovw-k", "16", "--lr", "3e-3", "--quiet", "--threads", "1", "--models", "all"]
ROW_KEYS = {"model", "variant", "db_size", "ids", "IA@1", "IA@5", "MAP@10", "P@10", "Recall@10", "Recall@100",
            "train_seconds", "query_ms"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


def test_run_writes_every_output(tiny_run):
    for name in ("results.json", "results.md", "curves.png", "checkpoint.pt", "train.log"):
        assert (tiny_run / name).stat().st_size > 0, name
    assert not [p.name for p in tiny_run.iterdir() if p.name.endswith(".tmp")]   # every rename happened
    rows = json.loads((tiny_run / "results.json").read_text())["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [("BoVW", "-"), ("ViT DSI", "zero-shot"),
                                                         ("ViT DSI", "fine-tuned"), ("ViT dual encoder", "-")]
    n_test = data.split_sizes(64)[3]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        for key in ("MAP@10", "P@10", "Recall@10"):
            assert 0.0 <= r[key] <= 1.0
        # Every model is scored on the same test queries; each has a relevant image in the 16-image IDB,
        # and every ranked list of 100 holds the whole IDB, so it holds every relevant image.
        assert r["test_queries"] == r["test_queries_scored"] == n_test
        assert r["Recall@100"] == 1.0 and r["Recall@10"] <= r["Recall@100"]
        assert r["IA@1"] <= r["IA@5"]
    # A database image queried against the BoVW index ranks itself first (its own histogram, cosine 1).
    assert rows[0]["IA@1"] == 1.0
    # The index was trained to the 1.0 target: the zero-shot model must write every IDB image's own ID.
    assert rows[1]["IA@1"] == 1.0
    # Fine-tuned = the same indexing, then a retrieval phase that keeps one of the epochs it ran.
    assert rows[1]["index_epochs"] == rows[2]["index_epochs"] and rows[1]["train_seconds"] <= rows[2]["train_seconds"]
    assert 1 <= rows[2]["retrieval_epoch_kept"] <= rows[2]["retrieval_epochs"] <= 2
    assert torch.load(tiny_run / "checkpoint.pt", weights_only=True)["epoch"] == rows[2]["retrieval_epoch_kept"]
    # The recipe the run trained with: the named one, then TINY's single-field flags on top.
    recipe = json.loads((tiny_run / "results.json").read_text())["recipe"]
    assert recipe == {"name": "fast", **asdict(cli.recipe_from_args(cli.build_parser().parse_args(TINY)))}
    assert recipe["retrieval_epochs"] == 2 and recipe["lr"] == 3e-3
    assert "| ViT DSI | zero-shot | 64 | clustered |" in (tiny_run / "results.md").read_text()
    assert Image.open(tiny_run / "curves.png").size[0] > 400


def test_same_seed_same_metrics(tiny_run, tmp_path):
    assert train.main(TINY + ["--out", str(tmp_path)]) == 0
    timing = ("train_seconds", "query_ms", "index_seconds_per_epoch", "index_images_per_s", "retrieval_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    first = json.loads((tiny_run / "results.json").read_text())["rows"]
    second = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert strip(first) == strip(second)


def test_query_mode_finds_a_database_image(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=False)
    ref = ckpt["idb_refs"][3]                                    # "synthetic:<index>"
    index = int(ref.split(":")[1])
    imageset = sources.make_synthetic(index + 1, image_size=64, seed=0)
    path = tmp_path / "query.png"
    Image.fromarray(imageset.images[index]).save(path)
    capsys.readouterr()
    sheet = tmp_path / "answers.png"
    assert train.main(["--checkpoint", str(tiny_run / "checkpoint.pt"), "--query", str(path), "--top-k", "3",
                       "--sheet", str(sheet)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("query.png:")
    assert f"ID {ckpt['ids'][3]} " in lines[1] and lines[1].endswith(ref)
    assert len(lines) == 5 and lines[4] == f"sheet: {sheet}" and sheet.is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "imagenet", "--data-root", "/no/such/folder"], "/no/such/folder"),
    (["--image-size", "100", "--patch-size", "16"], "divisible"),
    (["--checkpoint", "/no/such.pt", "--query", "x.png"], "not found"),
    (["--dataset", "coco", "--data-root", "."], "--coco-annotations"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    assert train.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_db_size_above_available_and_bad_checkpoint(tmp_path, capsys):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    assert train.main(["--dataset", "imagenet", "--data-root", str(root), "--db-size", "50",
                       "--out", str(tmp_path / "o")]) == 2
    assert "6" in capsys.readouterr().err                          # says how many images exist
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert train.main(["--checkpoint", str(bad), "--query", str(root / "a" / "0.png")]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_cli_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "train.py", "--image-size", "100"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


def test_semantic_ids_with_mixing_and_augmentation(tmp_path):
    argv = TINY + ["--ids", "semantic", "--index-mix", "1.0", "--augment", "--label-smoothing", "0.1", "--index-views", "0.5",
                   "--retrieval-targets", "3", "--early-stop", "map", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["ids"] for r in rows} == {"semantic"} and len(rows) == 4
    assert rows[1]["IA@1"] == 1.0                                # the label-free IDs are memorised too
    log = (tmp_path / "train.log").read_text()
    assert re.search(r"ids semantic \(\d+-\d+ digits\)", log)
    assert "x 3 relevant IDs" in log and "augment on, label smoothing 0.1" in log
    assert "val MAP@10" in log
    ids = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["ids"]
    assert len(set(ids)) == len(ids) == 16


def test_sweep_writes_one_combined_table(tmp_path):
    argv = TINY + ["--sweep", "--sweep-sizes", "64", "--sweep-ids", "clustered", "random", "--no-finetune",
                   "--out", str(tmp_path)]
    assert train.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    # The baselines do not read IDs: one BoVW and one DE row per db size; one zero-shot DSI row per cell.
    assert [(r["model"], r["ids"]) for r in rows] == [("BoVW", "clustered"), ("ViT DSI", "clustered"),
                                                     ("ViT dual encoder", "clustered"), ("ViT DSI", "random")]
    assert (tmp_path / "64-random" / "checkpoint.pt").exists()
    assert "| ViT DSI | zero-shot | 64 | random |" in (tmp_path / "results.md").read_text()
    # the recipe the run trained with is written down, one for every scheme; TINY's --retrieval-epochs 2 wins
    recipe = json.loads((tmp_path / "results.json").read_text())["recipe"]
    assert recipe["name"] == "fast" and recipe["retrieval_epochs"] == 2
    assert recipe["retrieval_targets"] == recipes.RECIPES["fast"].retrieval_targets


def test_several_targets_per_image_average_their_losses():
    """G targets per image share one encoder pass; the loss is the mean of the G single-target losses."""
    torch.manual_seed(0)
    model = ViTDSI(ViTDSIConfig(image_size=32, patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2, dropout=0.0, max_len=4))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    first, second = data.ids_to_tensor(["01", "20", "11"]), data.ids_to_tensor(["12", "20", "02"])

    def epoch(choose):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        trainer = engine.Trainer(model, optimizer, scheduler, torch.device("cpu"))
        pool = engine.Pool(images, choose, torch.zeros(3, dtype=torch.bool))
        return engine.run_epoch(trainer, pool, torch.arange(3), 3)

    loss_1, _, _ = epoch(lambda idx: first[idx].unsqueeze(1))
    loss_2, _, _ = epoch(lambda idx: second[idx].unsqueeze(1))
    loss_both, _, _ = epoch(lambda idx: torch.stack([first[idx], second[idx]], dim=1))   # (B, 2, L)
    assert loss_both == pytest.approx((loss_1 + loss_2) / 2, rel=1e-5)
    assert engine.eval_loss(model, images, first.unsqueeze(1), 3, torch.device("cpu"), False)[0] == pytest.approx(loss_1, rel=1e-5)


def test_recipe_is_the_named_one_plus_single_field_flags():
    """One place defines a recipe; a flag overrides one field; nothing depends on the ID scheme."""
    parse = lambda *extra: cli.build_parser().parse_args(list(extra))  # noqa: E731
    assert cli.recipe_from_args(parse()) == recipes.RECIPES["fast"]
    assert cli.recipe_from_args(parse("--ids", "random")) == recipes.RECIPES["fast"]
    assert cli.recipe_from_args(parse("--recipe", "paper")) == recipes.RECIPES["paper"]
    assert cli.recipe_from_args(parse("--retrieval-epochs", "7")).retrieval_epochs == 7
    assert cli.recipe_from_args(parse("--no-augment")).augment is False
    assert cli.recipe_from_args(parse("--recipe", "paper", "--precision", "bf16")).precision == "bf16"


@pytest.mark.parametrize("model", ["dsi", "de"])
def test_the_recipe_dropout_draw_reaches_the_trained_model(model, tmp_path, monkeypatch):
    """--dropout-draw torch (not the fast recipe's words) is what the DSI's and the DE's dropout layers draw with."""
    draws = []
    real = vitdsi.dropout
    monkeypatch.setattr(vitdsi, "dropout", lambda x, p, draw="words": draws.append(draw) or real(x, p, draw))
    argv = TINY + ["--dropout", "0.1", "--dropout-draw", "torch", "--index-epochs", "2", "--retrieval-epochs", "1",
                   "--models", model, "--out", str(tmp_path)]
    assert train.main(argv) == 0
    assert draws and set(draws) == {"torch"}


def test_an_epoch_that_lost_its_index_is_never_kept(tmp_path, monkeypatch):
    """keep_index (fast): the retrieval phase keeps only epochs whose IDB IA@1 stays at the floor; when none
    does, the zero-shot model stays (epoch 0: same weights, same scores). --no-keep-index never asks."""
    asked = []
    monkeypatch.setattr(train, "index_whole", lambda cell, model, floor: asked.append(floor) or (False, 0.5))
    argv = TINY + ["--retrieval-epochs", "3", "--models", "dsi"]
    assert train.main(argv + ["--out", str(tmp_path / "lost")]) == 0
    zero_shot, tuned = json.loads((tmp_path / "lost" / "results.json").read_text())["rows"]
    assert tuned["retrieval_epoch_kept"] == 0 and len(asked) == 3       # every epoch asked, none kept
    assert asked[0] == min(1.0, zero_shot["IA@1"])                     # TINY's --index-target-acc 1.0
    assert {k: tuned[k] for k in ("IA@1", "P@10", "MAP@10")} == {k: zero_shot[k] for k in ("IA@1", "P@10", "MAP@10")}
    log = (tmp_path / "lost" / "train.log").read_text()
    assert "not kept" in log and "the zero-shot model stays" in log

    monkeypatch.setattr(train, "index_whole", lambda cell, model, floor: asked.append(floor) or (True, 1.0))
    asked.clear()
    assert train.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    assert json.loads((tmp_path / "whole" / "results.json").read_text())["rows"][1]["retrieval_epoch_kept"] >= 1
    assert 1 <= len(asked) <= 3                                        # asked only of a new best epoch

    asked.clear()
    assert train.main(argv + ["--no-keep-index", "--out", str(tmp_path / "off")]) == 0
    assert not asked


def test_index_whole_is_ia_at_1_of_the_idb_against_the_floor(monkeypatch):
    ids = ["00", "01", "10", "11"]
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    cell = types.SimpleNamespace(subset=lambda positions: images[torch.as_tensor(positions)], split=types.SimpleNamespace(
        idb=np.array([1, 2, 4, 5])), trie=None, idb_ids=ids, a=types.SimpleNamespace(beam=None), device="cpu")
    seen = []
    ranked = [["00"], ["01"], ["11"], ["11"]]                           # the third IDB image writes a wrong ID
    monkeypatch.setattr(engine, "rank_dsi", lambda model, images, trie, k, *rest: seen.append((len(images), k))
                        or (ranked, 0.0))
    assert train.index_whole(cell, None, 0.75) == (True, 0.75)          # at the floor counts as whole
    assert train.index_whole(cell, None, 0.76) == (False, 0.75)
    assert seen == [(4, run.IA_DEPTH)] * 2                            # the IDB's images, searched as evaluate does


# ---------------------------------------------------------------- the retrieval sheet, and the output folder

def test_the_run_draws_its_retrieval_sheet(tiny_run):
    """retrievals.png: one block per drawn test query, a line per model (BoVW, DSI zero-shot and fine-tuned, DE)."""
    from support import sheet
    args = json.loads((tiny_run / "results.json").read_text())["args"]
    n_test = json.loads((tiny_run / "results.json").read_text())["rows"][0]["test_queries"]
    n_blocks = min(args["sheet_queries"], n_test)
    fake = [sheet.Block(np.zeros((8, 8, 3), np.uint8), "", [sheet.Line("", [])] * 4)] * n_blocks
    expected = sheet.layout_sheet(fake, title="x")
    assert Image.open(tiny_run / "retrievals.png").size == (expected.width, expected.height)


def test_sheet_frames_say_what_the_rankings_say(tmp_path):
    """A tile is framed green exactly where its ID is relevant to the query, red where not."""
    from support import plots, sheet
    imageset = sources.make_synthetic(40, image_size=32, seed=1)
    split = data.split_dataset(imageset, 40, seed=1)
    ids = data.assign_ids(imageset.primary[split.idb], "clustered")
    relevant = data.relevant_sets([imageset.labels[i] for i in split.test], [imageset.labels[i] for i in split.idb], ids)
    rankings = {"BoVW": [ids[:10] for _ in split.test], "DSI fine-tuned": [ids[::-1][:10] for _ in split.test]}
    cell = types.SimpleNamespace(
        finished={"rankings": rankings}, split=split, imageset=imageset, idb_ids=ids, db_size=40, ids="clustered",
        a=types.SimpleNamespace(seed=1, dataset="synthetic"),
        relevant=lambda positions: data.relevant_sets([imageset.labels[i] for i in positions],
                                                      [imageset.labels[i] for i in split.idb], ids))
    path = str(tmp_path / "retrievals.png")
    plots.draw_retrievals(cell, path, 2)
    image = Image.open(path).convert("RGB")
    queries = plots.sheet_queries(len(split.test), 2, 1)
    layout = sheet.layout_sheet([sheet.Block(np.zeros((8, 8, 3), np.uint8), "", [sheet.Line("", [])] * 2)] * 2,
                                title="t")
    colours = set()
    for b, q in enumerate(queries):
        for line, ranked in enumerate(rankings.values()):
            for rank, id_str in enumerate(ranked[q]):
                left, top, _, _ = layout.tile_box(b, line, rank)
                want = sheet.GREEN if id_str in relevant[q] else sheet.RED
                assert image.getpixel((left + 1, top + 1)) == want
                colours.add(want)
    assert colours == {sheet.GREEN, sheet.RED}       # both kinds were checked


def test_a_finished_run_is_replaced_only_with_overwrite_and_never_mixed(tiny_run, tmp_path, capsys):
    out = tmp_path / "again"
    args = TINY + ["--index-epochs", "3", "--models", "dsi", "--out", str(out)]
    assert train.main(args) == 0 and (out / "retrievals.png").exists()
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert train.main(args) == 2
    assert "holds a finished run" in capsys.readouterr().err and (out / "results.json").read_bytes() == before
    assert train.main(args + ["--overwrite", "--sheet-queries", "0"]) == 0
    assert not (out / "retrievals.png").exists()          # the old run's sheet is not left beside the new run
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]    # no staging folder, no lock left


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))          # a live process holds it
    assert train.main(TINY + ["--out", str(out)]) == 2
    assert "another run" in capsys.readouterr().err and set(os.listdir(out)) == {".lock"}
    (out / ".lock").write_text("999999999")                # a process that is gone: its lock is taken over
    assert train.main(TINY + ["--index-epochs", "2", "--models", "bovw", "--out", str(out)]) == 0
    assert not (out / ".lock").exists()


def test_imagenette_runs_from_its_cache_without_network(tmp_path):
    """--dataset imagenette reads DATA_ROOT/imagenette2-160/train once it is there (the download is tested in
    test_download.py); no network is touched: the URL is never opened when the cache is complete."""
    train_dir = tmp_path / "cache" / "imagenette2-160" / "train"
    for c in range(2):
        (train_dir / f"n0{c}").mkdir(parents=True)
        for k in range(16):
            Image.fromarray(np.full((40, 40, 3), 60 * c + 3 * k, np.uint8)).save(train_dir / f"n0{c}" / f"{k}.JPEG")
    (tmp_path / "cache" / "imagenette2-160" / ".complete").write_text("")
    out = tmp_path / "out"
    assert train.main(["--dataset", "imagenette", "--data-root", str(tmp_path / "cache"), "--db-size", "32",
                       "--image-size", "32", "--patch-size", "16", "--dim", "16", "--mlp-dim", "32", "--depth", "1",
                       "--heads", "2", "--bovw-k", "8", "--index-epochs", "2", "--retrieval-epochs", "1",
                       "--models", "dsi", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(str(train_dir) in ref for ref in ckpt["idb_refs"])


def test_the_main_command_runs_the_papers_experiment_and_all_adds_the_dual_encoder():
    a = cli.build_parser().parse_args([])
    assert a.models == ["dsi", "bovw"]
    a = cli.build_parser().parse_args(["--models", "all", "--out", "/tmp/unused-vit-dsi-out"])
    cli.check_args(a)
    assert a.models == ["dsi", "bovw", "de"]


def test_a_run_whose_test_queries_have_no_relevant_image_ends_with_undefined_metrics(tmp_path):
    """db 8: 2 indexed images, 1 test query, often of a class the IDB lacks: its retrieval metrics are not
    defined (null, "–" in the table), the run still ends, every model alike, the dual encoder with no
    validation query keeping its last epoch."""
    argv = ["--db-size", "8", "--image-size", "32", "--patch-size", "16", "--dim", "16", "--mlp-dim", "32", "--depth",
            "1", "--heads", "2", "--bovw-k", "8", "--index-epochs", "2", "--retrieval-epochs", "1", "--quiet",
            "--threads", "1", "--models", "all", "--seed", "1"]
    assert train.main(argv + ["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"BoVW", "ViT DSI", "ViT dual encoder"}
    assert all(r["P@10"] is None and r["MAP@10"] is None and r["test_queries_scored"] == 0 for r in rows)
    assert "| – | – |" in (tmp_path / "results.md").read_text()
