"""Growing a trained index (grow.py): added images become retrievable and the old ones stay, IDs fit the
scheme, removed IDs are never decoded, and bad input exits 2 with one line. One tiny index is trained
once (a quarter of its IDB held out, as benchmark.py --grow does), and everything is added to copies."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import data
import grow
import train
from test_badinput import fails    # exit 2, one line, no traceback
from vitdsi import IDTrie, ViTDSIConfig
from support import cli, engine, recipes, run, sources, store

TINY = ["--db-size", "128", "--image-size", "32", "--patch-size", "8", "--dim", "32", "--mlp-dim", "64",
        "--depth", "1", "--heads", "2", "--dropout", "0.0", "--index-epochs", "300", "--lr", "3e-3",
        "--no-finetune", "--models", "dsi", "--quiet", "--threads", "1"]
ADD = ["--add-epochs", "200", "--threads", "1", "--quiet"]   # the tiny decoder learns 8 new IDs in 60-100 epochs


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny index of 75 % of its IDB; the held-out images saved as files: most in an ImageFolder tree
    under their class names, two loose. Returns the folder, the checkpoint and the loose files."""
    root = tmp_path_factory.mktemp("grow")
    assert train.main(TINY + ["--index-hold-out", "0.25", "--out", str(root / "base")]) == 0
    ckpt = torch.load(root / "base" / "checkpoint.pt", weights_only=True)
    imageset = sources.make_synthetic(128, image_size=32, seed=0)
    loose = []
    for k, ref in enumerate(ckpt["held_out"]):
        p = int(ref.split(":")[1])
        folder = root / "new" / imageset.class_names[imageset.primary[p]] if k >= 2 else root / "loose"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(imageset.images[p]).save(folder / f"{p}.png")
        loose += [str(folder / f"{p}.png")] if k < 2 else []
    return root, ckpt, loose


def test_hold_out_is_stratified_recorded_and_redrawn(base):
    root, ckpt, _ = base
    assert len(ckpt["ids"]) == 24 and len(ckpt["held_out"]) == 8        # IDB 32 = 24 indexed + 8 held out
    assert not set(ckpt["held_out"]) & set(ckpt["idb_refs"])
    imageset, split = grow.rebuild_run(ckpt, run.Log(quiet=True))     # the run's own split, drawn again
    assert {imageset.refs[i] for i in split.idb} == set(ckpt["idb_refs"]) | set(ckpt["held_out"])
    held_classes = [int(imageset.primary[imageset.refs.index(r)]) for r in ckpt["held_out"]]
    assert len(set(held_classes)) == len(held_classes)                  # stratified: 8 of 10 classes, once each


def test_add_makes_new_images_retrievable_and_keeps_the_old(base, capsys):
    root, ckpt, loose = base
    out = root / "added"
    assert train.main(["--checkpoint", str(root / "base" / "checkpoint.pt"), "--add", str(root / "new"), *loose,
                       "--out", str(out), *ADD]) == 0
    report = json.loads((out / "addition.json").read_text())
    assert report["added"] == 8 and report["new_IA@1"] >= 0.98
    assert report["old_IA@1_before"] == 1.0 and report["old_IA@1"] >= 0.9
    grown = torch.load(out / "checkpoint.pt", weights_only=True)
    assert grown["ids"][:24] == ckpt["ids"] and len(set(grown["ids"])) == 32
    assert grown["held_out"] == ckpt["held_out"] and (root / "base" / "checkpoint.pt").exists()
    # clustered: an ImageFolder class's new ID has its class's prefix and the counter after the class's last
    for id_str, cls, ref in zip(grown["ids"][24:], grown["idb_classes"][24:], grown["idb_refs"][24:]):
        assert id_str[0] == str(cls)
        if ref not in loose:
            assert grown["class_names"][cls] in ref
            before = [int(i[1:]) for i in ckpt["ids"] if i[0] == str(cls)]
            assert int(id_str[1:]) == max(before) + 1
    # query mode answers a new image with its new ID
    capsys.readouterr()
    assert train.main(["--checkpoint", str(out / "checkpoint.pt"), "--query", loose[0], "--top-k", "1"]) == 0
    assert f"ID {grown['ids'][grown['idb_refs'].index(loose[0])]} " in capsys.readouterr().out


@pytest.mark.parametrize("frozen", [None, "0"])
def test_an_addition_trains_what_is_not_frozen(base, frozen):
    """By default the encoder stays as it was and the decoder learns the new IDs; --add-frozen 0 trains it all."""
    root, ckpt, loose = base
    out = root / f"frozen-{frozen}"
    assert train.main(["--checkpoint", str(root / "base" / "checkpoint.pt"), "--add", str(root / "new"), *loose,
                       "--out", str(out), *ADD] + (["--add-frozen", frozen] if frozen else [])) == 0
    report = json.loads((out / "addition.json").read_text())
    assert report["new_IA@1"] >= 0.98 and report["old_IA@1"] >= 0.9
    grown = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    encoder = [k for k in grown if k.startswith(("encoder.patch_embedding.", "encoder.blocks.0."))]
    assert encoder and all(torch.equal(grown[k], ckpt["model"][k]) for k in encoder) == (frozen is None)
    assert not torch.equal(grown["head.weight"], ckpt["model"]["head.weight"])           # the decoder learnt


def test_a_batch_reads_the_frozen_bottom_from_the_cache_and_encodes_random_views():
    torch.manual_seed(0)
    config = ViTDSIConfig(image_size=16, patch_size=8, dim=16, mlp_dim=32, depth=2, heads=2, max_len=5)
    model = train.ViTDSI(config).eval()
    images = torch.randn(4, 3, 16, 16)
    views = torch.tensor([False, True, False, True])
    cached = model.encoder.until(images, 1).detach()
    cached[views] = 99.0                              # a view's cached row is stale: it must be computed anew
    pool = engine.Pool(images, lambda idx: idx, views, frozen=1, cached=cached)
    idx = torch.tensor([2, 1, 0])
    torch.testing.assert_close(engine.encode_batch(model, pool, idx, images[idx]), model.encode(images[idx]))
    cached[0] = 0.0                                   # a clean row is read from the cache, not computed
    assert not torch.allclose(engine.encode_batch(model, pool, idx, images[idx])[2], model.encode(images[:1])[0])


def test_new_ids_per_scheme():
    clustered = {"ids_scheme": "clustered", "ids": ["00", "01", "10", "35"], "prefix_width": 1,
                 "class_names": list("abcd")}
    ids, classes = grow.new_ids(clustered, [0, 1, 0, -1, 2], [None, None, None, "31", None])
    assert ids == ["02", "11", "03", "36", "20"] and classes == [0, 1, 0, 3, 2]   # -1: the decoded class
    random = {"ids_scheme": "random", "ids": ["2", "0", "1"], "prefix_width": 0, "class_names": []}
    assert grow.new_ids(random, [-1, -1], [None, None])[0] == ["3", "4"]         # the next free numbers
    with pytest.raises(run.UsageError, match="random IDs .* full"):
        grow.new_ids({**random, "ids": list("0123456789")}, [-1], [None])
    with pytest.raises(run.UsageError, match="class 'b' .* is full"):
        grow.new_ids({**clustered, "ids": ["00", "19"]}, [1], [None])
    semantic = {"ids_scheme": "semantic", "ids": ["00", "01", "1"], "prefix_width": 0, "class_names": []}
    assert grow.new_ids(semantic, [-1], ["01"])[0] == ["02"]                      # the nearest leaf's next slot


def test_removed_ids_are_never_decoded_nor_reused(base, capsys):
    root, ckpt, _ = base
    source, out = root / "base" / "checkpoint.pt", root / "removed"
    gone = ckpt["ids"][:3]
    assert train.main(["--checkpoint", str(source), "--remove", *gone, "--out", str(out), "--quiet"]) == 0
    shrunk = torch.load(out / "checkpoint.pt", weights_only=True)
    assert shrunk["removed"] == sorted(gone) and shrunk["ids"] == ckpt["ids"]
    model, loaded = store.load_checkpoint(str(out / "checkpoint.pt"))
    images = data.images_to_tensor(sources.read_refs(ckpt["idb_refs"][:3], 32))
    with torch.no_grad():
        hyps = model.generate(data.normalize(images), IDTrie(store.live_ids(loaded)), k=len(ckpt["ids"]))
    assert all(len(h) == 21 and not {i for i, _ in h} & set(gone) for h in hyps)  # the whole live index, no more
    path = root / "removed-query.png"
    Image.fromarray(sources.read_refs(ckpt["idb_refs"][:1], 32)[0]).save(path)
    capsys.readouterr()
    assert train.main(["--checkpoint", str(out / "checkpoint.pt"), "--query", str(path), "--top-k", "30"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" ID ") == 21 and f"ID {gone[0]} " not in printed
    assert grow.new_ids(shrunk, [int(str(gone[0])[0])], [None])[0][0] not in gone   # never given again


def test_bad_growth_input_exits_2_with_one_line(base, capsys, tmp_path):
    root, ckpt, loose = base
    source = str(root / "base" / "checkpoint.pt")
    assert "not found" in fails(["--checkpoint", source, "--add", str(tmp_path / "none.png")], capsys)
    for flag, value, says in (("--settle", "-1", "must be 0 or more"), ("--replay", "-2", "must be 0 or more"),
                              ("--replay-min", "1.5", "must be at most 1"), ("--add-epochs", "0", "must be at least 1"),
                              ("--add-frozen", "-1", "must be 0 or more")):
        err = fails(["--checkpoint", source, "--add", loose[0], flag, value], capsys)
        assert err.startswith(f"error: {flag} ") and says in err
    assert "pass 0 to 1, the model's number of encoder blocks" in fails(["--checkpoint", source, "--add", loose[0],
                                                                         "--add-frozen", "2"], capsys)
    assert "not in the index" in fails(["--checkpoint", source, "--remove", "999", "--out", str(tmp_path)], capsys)
    assert "being changed" in fails(["--checkpoint", source, "--remove", ckpt["ids"][0],
                                     "--out", str(root / "base")], capsys)
    assert "already indexed" in fails(["--checkpoint", source, "--add", loose[0], loose[0],
                                       "--out", str(tmp_path / "twice")], capsys)
    full = dict(ckpt)                         # class c's block ends in c9: its 1-digit counter is full
    cls = ckpt["idb_classes"][0]
    full["ids"] = [f"{cls}9" if i == 0 else id_str for i, id_str in enumerate(ckpt["ids"])]
    torch.save(full, tmp_path / "full.pt")
    folder = tmp_path / "add" / ckpt["class_names"][cls]
    folder.mkdir(parents=True)
    Image.open(loose[0]).save(folder / "x.png")
    assert "is full" in fails(["--checkpoint", str(tmp_path / "full.pt"), "--add", str(tmp_path / "add"),
                               "--out", str(tmp_path / "o")], capsys)
    # --overwrite replaces the checkpoint in place, as asked
    copy = tmp_path / "copy"
    copy.mkdir()
    torch.save(ckpt, copy / "checkpoint.pt")
    assert train.main(["--checkpoint", str(copy / "checkpoint.pt"), "--remove", ckpt["ids"][0],
                       "--out", str(copy), "--overwrite", "--quiet"]) == 0
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["removed"] == [ckpt["ids"][0]]


def test_grow_experiment_runs_its_steps(base):
    root, _, _ = base
    rows = benchmark.grow_in_steps(str(root / "base"), 2, ADD)
    assert [r["step"] for r in rows] == [1, 2] and [r["added"] for r in rows] == [4, 4]
    assert rows[-1]["indexed"] == 32 and all(r["new IA@1"] >= 0.98 for r in rows)
    assert all(0.0 <= r["test P@10"] <= 1.0 and 0.0 <= r["test MAP@10"] <= 1.0 for r in rows)
    assert all(0.0 <= r["all-query P@10"] <= 1.0 for r in rows)


def test_all_query_p10_scores_every_query_of_the_run(base):
    root, _, _ = base
    model, ckpt = store.load_checkpoint(str(root / "base" / "checkpoint.pt"))
    imageset, split = grow.rebuild_run(ckpt, run.Log(quiet=True))
    images, cpu = data.images_to_tensor(imageset.images), torch.device("cpu")
    full = benchmark.query_scores(model, ckpt, imageset, split, images, cpu)
    assert full == benchmark.run_scores(str(root / "base"))          # read from the run's folder alike
    # with the test queries alone, all-query P@10 is test P@10; with every query, it is their query-weighted mean
    empty = np.array([], dtype=np.int64)
    alone = benchmark.query_scores(model, ckpt, imageset, dataclasses.replace(split, train=empty, val=empty),
                                   images, cpu)
    assert alone["all-query P@10"] == alone["test P@10"] == full["test P@10"]
    parts = [benchmark.query_scores(model, ckpt, imageset, dataclasses.replace(split, train=empty, val=empty, test=q),
                                    images, cpu)["test P@10"] for q in (split.train, split.val)]
    held = set().union(*(imageset.labels[imageset.refs.index(r)] for r in ckpt["idb_refs"]))
    sizes = [sum(bool(imageset.labels[i] & held) for i in q) for q in (split.train, split.val, split.test)]  # R > 0
    expected = np.dot(parts + [full["test P@10"]], sizes) / sum(sizes)
    assert abs(full["all-query P@10"] - expected) < 1e-9


def test_a_fine_tuned_run_also_replays_its_training_queries(base, tmp_path):
    root, ckpt, loose = base
    tuned = {**ckpt, "args": {**ckpt["args"], "no_finetune": False}}   # as a fine-tuned run records itself
    replay = grow.old_replay(tuned, 32, run.Log(quiet=True))
    imageset, split = grow.rebuild_run(tuned, run.Log(quiet=True))
    assert len(replay.queries) == len(split.train)                    # every training query has a relevant image
    classes = dict(zip(ckpt["ids"], ckpt["idb_classes"]))
    for q, relevant in zip(split.train, replay.relevant):           # each query's relevant old IDs: its class
        assert {classes[replay.ids[j]] for j in relevant} == {int(imageset.primary[q])}
    torch.save(tuned, tmp_path / "tuned.pt")
    assert train.main(["--checkpoint", str(tmp_path / "tuned.pt"), "--add", loose[0], "--out", str(tmp_path / "o"),
                       *ADD]) == 0
    assert json.loads((tmp_path / "o" / "addition.json").read_text())["replayed_queries"] == len(split.train)


def test_replay_count_takes_the_largest_of_its_three_floors():
    s = grow.GrowSettings(replay=2.0, replay_min=0.25, lr=1e-3, epochs=10, target=0.98)
    assert grow.replay_count(128, 384, s, 32) == 256       # a large step: 2 per new image
    assert grow.replay_count(26, 410, s, 32) == 102        # a small step: a quarter of the old index (102.5 -> 102)
    assert grow.replay_count(4, 40, s, 32) == 28           # a handful: enough to fill one batch
    assert grow.replay_count(26, 0, s, 32) == 0            # nothing old to replay
    assert grow.replay_count(26, 410, grow.GrowSettings(0.0, 0.25, 1e-3, 10, 0.98), 32) == 0   # --replay 0: none


def test_an_addition_runs_at_a_quarter_of_the_indexing_lr_unless_told():
    recipe = recipes.RECIPES["fast"]
    assert grow.settings_from_args(cli.build_parser().parse_args([]), recipe).lr == recipe.lr / 4
    assert grow.settings_from_args(cli.build_parser().parse_args(["--add-lr", "1e-3"]), recipe).lr == 1e-3


def test_settling_schedule_decays_from_where_it_is_to_the_floor():
    schedule = grow.SettlingSchedule(lambda step: 0.8)      # the recipe's multiplier, whatever its shape
    assert schedule(5) == 0.8
    schedule.settle(10, 4)                                  # from step 10 over 4 steps: a half cosine
    assert schedule(10) == pytest.approx(0.8)
    assert schedule(12) == pytest.approx(grow.SETTLE_FLOOR + (0.8 - grow.SETTLE_FLOOR) / 2)
    assert schedule(14) == schedule(99) == pytest.approx(grow.SETTLE_FLOOR)
    schedule.settle(20, 100)                                # a second call changes nothing
    assert schedule(12) == pytest.approx(grow.SETTLE_FLOOR + (0.8 - grow.SETTLE_FLOOR) / 2)


def test_the_beam_search_check_runs_only_once_the_teacher_forced_gate_passes(monkeypatch):
    """The scripted teacher-forced accuracies: new images 0.5 (epoch 1), then 1.0; the old sample 0.9
    (epoch 2), then 1.0. So the full check (`ia_at_1`) runs from epoch 3 on, and training stops there."""
    torch.manual_seed(0)
    config = ViTDSIConfig(image_size=16, patch_size=8, dim=16, mlp_dim=32, depth=1, heads=2, max_len=5)
    model, recipe = train.ViTDSI(config), recipes.RECIPES["fast"]
    images = torch.randint(0, 255, (12, 3, 16, 16), dtype=torch.uint8)
    ids = [f"{i:03d}" for i in range(12)]
    gate = iter([0.5, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0])        # new, (old sample once new passes), ...
    monkeypatch.setattr(engine, "eval_loss", lambda *args: (0.0, next(gate)))
    checks = []
    monkeypatch.setattr(grow, "ia_at_1", lambda model, images, ids, *rest: checks.append(len(ids)) or 1.0)
    s = grow.GrowSettings(replay=2.0, replay_min=0.25, lr=1e-3, epochs=10, target=0.98, settle=1.0)
    out = grow.learn_additions(model, recipe, torch.device("cpu"), (images[:4], ids[:4]),
                               grow.Replay(images[4:], ids[4:]), IDTrie(ids), s, run.Log(quiet=True))
    assert out["epochs"] == 3 and checks == [4, 8]          # one check of the new and one of the old images
    # One step an epoch (4 new + 28 replayed = 32), warm-up 3 steps: the multiplier is 1.0 after epoch 2, when the
    # new IDs are learnt; settling over 2 x 1 steps, epoch 3 ends half way down: 0.05 + 0.95 / 2 of the lr.
    halfway = grow.SETTLE_FLOOR + (1 - grow.SETTLE_FLOOR) / 2
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3 * halfway)


def test_adding_to_a_model_that_writes_no_id_is_one_line(base, tmp_path, capsys):
    """A checkpoint whose weights are broken (NaN) decodes no ID at all: --add says so, exit 2, no traceback."""
    root, ckpt, loose = base
    broken = {**ckpt, "model": {k: torch.full_like(v, float("nan")) if k == "head.bias" else v
                                for k, v in ckpt["model"].items()}}
    torch.save(broken, tmp_path / "broken.pt")
    err = fails(["--checkpoint", str(tmp_path / "broken.pt"), "--add", loose[0], "--out", str(tmp_path / "o")], capsys)
    assert "decodes no ID" in err
