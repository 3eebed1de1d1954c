"""Query mode draws what it retrieves (query.png / --sheet) and explains its beam search (--explain).

Every checkpoint here is an untrained tiny model written by store.save_checkpoint (no training runs), its
indexed images the built-in synthetic set or PNG files in tmp_path.
"""
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from support import cli, engine, query, recipes, sheet, sources, store
from vitdsi import IDTrie, ViTDSI, ViTDSIConfig

TINY_MODEL = ["--image-size", "32", "--patch-size", "8", "--dim", "16", "--mlp-dim", "32", "--depth", "1",
              "--heads", "2"]
RANKED = re.compile(r"^\s+(\d+)\. ID (\d+)  log-prob\s+(-?\d+\.\d+)")


def tiny_checkpoint(path, ids: list[str], refs: list[str], max_len: int = 5) -> str:
    """An untrained tiny model (seeded) indexing `refs` under `ids`, as a training run would save it."""
    a = cli.build_parser().parse_args(TINY_MODEL)
    config = cli.model_config(a, max_len=max_len)
    torch.manual_seed(0)
    model = ViTDSI(config)
    optimizer = engine.make_optimizer(model, recipes.RECIPES["fast"], 1e-3)
    catalogue = {"ids": ids, "idb_refs": refs, "ids_scheme": "random", "db_size": 4 * len(ids),
                 "class_names": ["a"], "idb_classes": [0] * len(ids), "prefix_width": 0, "removed": [],
                 "held_out": []}
    store.save_checkpoint(str(path), model, optimizer, config, a, 1, catalogue)
    return str(path)


def save_png(path, array) -> str:
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


def synthetic_queries(tmp_path, indices) -> list[str]:
    drawn = sources.make_synthetic(max(indices) + 1, image_size=32, seed=0).images
    return [save_png(tmp_path / f"q{i}.png", drawn[i]) for i in indices]


def answers_of(checkpoint: str, paths: list[str], k: int, beam=None) -> list[list[tuple[str, float]]]:
    """What query mode answers, computed as it does: the checkpoint's model, its live IDs, the queries
    cropped and resized without the aspect filter, one batch."""
    model, ckpt = store.load_checkpoint(checkpoint)
    x = data.images_to_tensor(np.stack([sources.read_image(p, 32, aspect_range=None) for p in paths]))
    return model.generate(data.normalize(x), IDTrie(store.live_ids(ckpt)), k=k, beam=beam)


def run_query(argv: list[str], capsys) -> list[str]:
    capsys.readouterr()
    assert train.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_query_mode_draws_its_answers_into_query_png(tmp_path, monkeypatch, capsys):
    ids = [f"{i:02d}" for i in range(6)]
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint.pt", ids, [f"synthetic:{i}" for i in range(6)])
    queries = synthetic_queries(tmp_path, [0, 3])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "query.png").write_text("an older file, replaced")
    out = run_query(["--checkpoint", checkpoint, "--query", *queries, "--top-k", "3"], capsys)
    answers = answers_of(checkpoint, queries, 3)
    expected = []                                  # the lines printed before sheets existed, unchanged
    for path, hyps in zip(queries, answers):
        expected.append(f"{path}:")
        expected += [f"  {r:3d}. ID {i}  log-prob {s:8.3f}  -> synthetic:{int(i)}" for r, (i, s) in enumerate(hyps, 1)]
    assert out == expected + ["sheet: query.png"]
    indexed = sources.make_synthetic(6, image_size=32, seed=0).images
    blocks = [sheet.Block(sources.read_image(path, 32, aspect_range=None), path.split("/")[-1],
                          [sheet.Line("DSI", [sheet.Tile(indexed[int(i)], f"{i}  {s:.2f}") for i, s in hyps])])
              for path, hyps in zip(queries, answers)]
    drawn = Image.open(tmp_path / "query.png")
    layout = sheet.layout_sheet(blocks)
    assert drawn.format == "PNG" and drawn.size == (layout.width, layout.height)
    assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(sheet.draw_sheet(blocks)))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_deleted_or_unreadable_indexed_file_becomes_a_grey_tile_and_one_note(tmp_path, capsys):
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "junk": None}
    refs = []
    for name, colour in colours.items():
        refs.append(str(tmp_path / f"{name}.png"))
        if colour:
            save_png(refs[-1], np.full((40, 40, 3), colour))
    (tmp_path / "junk.png").write_text("not a picture")
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint.pt", ["00", "01", "02", "03"], refs, max_len=4)
    (tmp_path / "green.png").unlink()                # gone since training
    queries = [save_png(tmp_path / "q1.png", np.full((30, 50, 3), 90)), save_png(tmp_path / "q2.png", np.eye(32) * 200)]
    (tmp_path / "sheets").mkdir()
    target = tmp_path / "sheets" / "answers.png"
    out = run_query(["--checkpoint", checkpoint, "--query", *queries, "--top-k", "4", "--sheet", str(target)], capsys)
    notes = [line for line in out if line.startswith("note:")]
    assert notes == [f"note: 2 indexed images could not be read (e.g. '{refs[1]}'); drawn grey"]
    assert out[-1] == f"sheet: {target}"
    answers = answers_of(checkpoint, queries, 4)
    assert [len(hyps) for hyps in answers] == [4, 4]            # both queries answer every ID, the missing too
    drawn = Image.open(target).convert("RGB")
    layout = sheet.layout_sheet([sheet.Block(np.zeros((8, 8, 3), np.uint8), "", [sheet.Line("", [])])] * 2)
    assert drawn.size == (layout.width, layout.height)
    ref_of = dict(zip(["00", "01", "02", "03"], refs))
    for b, hyps in enumerate(answers):
        for rank, (id_str, _) in enumerate(hyps):
            left, top, right, bottom = layout.tile_box(b, 0, rank)
            inside = drawn.getpixel((left + sheet.FRAME + 2, top + sheet.FRAME + 2))
            name = ref_of[id_str].rsplit("/", 1)[1][:-4]
            assert inside == (sheet.MISSING if name in ("green", "junk") else colours[name]), (b, rank, id_str)
            assert drawn.getpixel((left, top)) == sheet.NEUTRAL       # relevance unknown: a neutral frame


def test_a_sheet_path_whose_folder_is_missing_is_refused_before_any_work(tmp_path, capsys):
    query_png = save_png(tmp_path / "q.png", np.zeros((32, 32, 3)))
    for bad, needle in ((tmp_path / "no" / "s.png", "does not exist"), (tmp_path, "is not a file name")):
        # the checkpoint does not exist either: the --sheet error comes first, before anything is loaded
        capsys.readouterr()
        assert train.main(["--checkpoint", str(tmp_path / "none.pt"), "--query", query_png,
                           "--sheet", str(bad)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("error: --sheet") and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.png"]


@pytest.mark.parametrize("k, beam", [(1, None), (5, None), (5, 8)])
def test_explain_shows_the_search_that_generate_ranks_by(k, beam, tmp_path, capsys):
    ids = [f"{i:02d}" for i in range(8)] + ["10", "11", "12", "120", "121", "2"]   # an ID may prefix another
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint.pt", ids, [f"synthetic:{i}" for i in range(len(ids))])
    queries = synthetic_queries(tmp_path, [2, 5])
    argv = ["--checkpoint", checkpoint, "--query", *queries, "--top-k", str(k), "--sheet", str(tmp_path / "s.png")]
    out = run_query(argv + ["--explain"] + (["--beam", str(beam)] if beam else []), capsys)
    start = out.index(f"sheet: {tmp_path / 's.png'}") + 1
    assert out[:start] == run_query(argv + (["--beam", str(beam)] if beam else []), capsys)   # printed as before
    explained = out[start:]
    assert explained[0] == (f"explain '{queries[0]}': beam search, k {k}, beam {max(beam or k, k)}; "
                            f"the first query image only, 1 more not explained")
    steps = [line for line in explained if line.startswith("step ")]
    assert steps[0].startswith("step 1: 1 live prefix of 0 digits") and 2 <= len(steps) <= 4
    assert len(explained) < 12 * len(steps) + 10                              # a few lines per step
    ranked_at = next(i for i, line in enumerate(explained) if line.startswith("ranked ("))
    printed = [RANKED.match(line).groups() for line in explained[ranked_at + 1:]]
    expected = answers_of(checkpoint, queries[:1], k, beam)[0]               # that image alone
    assert [i for _, i, _ in printed] == [i for i, _ in expected] and len(expected) == k
    assert [int(r) for r, _, _ in printed] == list(range(1, k + 1))
    assert all(abs(float(s) - score) < 1e-3 for (_, _, s), (_, score) in zip(printed, expected))
    if beam == 8:                                                             # more than 5 live prefixes
        assert any(line.startswith("  … and ") for line in explained)


def small_model(seed: int) -> ViTDSI:
    torch.manual_seed(seed)
    return ViTDSI(ViTDSIConfig(image_size=32, patch_size=8, dim=32, mlp_dim=64, depth=2, heads=4, max_len=6))


def test_a_trace_changes_nothing_and_records_the_search_of_image_0():
    model = small_model(1)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(0)
    tries = [IDTrie([f"{i:02d}" for i in range(20)]),
             IDTrie(["1", "12", "123", "2", "21", "3011", "302", "4"]),
             IDTrie(sorted({f"{n:03d}" for n in rng.integers(0, 1000, 60)}))]
    for trie in tries:
        for k, beam in [(1, None), (3, None), (3, 1), (4, 12), (10, None), (len(trie) + 2, None)]:
            trace = []
            traced = model.generate(images, trie, k=k, beam=beam, trace=trace)
            assert traced == model.generate(images, trie, k=k, beam=beam)        # same IDs, same floats
            assert trace and trace[0]["step"] == 0 and trace[0]["prefixes"] == [("", 0.0)]
            for step, after in zip(trace, trace[1:]):
                assert after["step"] == step["step"] + 1 and step["survivors"] == after["prefixes"]
            assert trace[-1]["survivors"] == []
            for step in trace:
                for (prefix, score), options in zip(step["prefixes"], step["options"]):
                    node = 0
                    for digit in prefix:
                        node = int(trie.children[node, int(digit)])
                    allowed = {"EOS" if v == data.EOS else str(v) for v in range(data.VOCAB_SIZE)
                               if trie.children[node, v] >= 0}
                    assert {token for token, _, _ in options} == allowed           # the trie's choices, all
                    assert abs(sum(np.exp(logp) for _, logp, _ in options) - 1) < 1e-4
                    assert all(abs(score + logp - total) < 1e-4 for _, logp, total in options)
            lines = query.explain_lines(trace, k, beam or k)
            ranked = [RANKED.match(line).group(2) for line in lines[lines.index(next(
                line for line in lines if line.startswith("ranked ("))) + 1:]]
            assert ranked == [i for i, _ in traced[0]], (trie.ids[:3], k, beam)


def test_the_trace_follows_image_0_alone_while_other_images_search_on():
    """Image 0's search may end steps before another image's: its trace ends there, as when searched alone."""
    model, trie = small_model(2), IDTrie(["0", "1", "2", "3", "4", "5000"])
    short, long = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * (1 + seed)
                   for seed in (0, 4))
    def trace_of(images):
        trace = []
        ranked = model.generate(images, trie, k=1, trace=trace)
        return trace, ranked[0]
    shape = lambda trace: [([p for p, _ in s["prefixes"]], [i for i, _ in s["finished"]]) for s in trace]  # noqa: E731
    for first, second in ((short, long), (long, short)):
        alone, ranked_alone = trace_of(first)
        batched, ranked = trace_of(torch.cat([first, second]))
        assert shape(batched) == shape(alone) and [i for i, _ in ranked] == [i for i, _ in ranked_alone]
    assert len(trace_of(short)[0]) == 2 and len(trace_of(long)[0]) == 5    # "0".."4" end at step 2, "5000" at 5
