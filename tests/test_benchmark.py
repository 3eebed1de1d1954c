"""benchmark.py's pieces that need no training run: the stopping-rule replay and the latency table."""
import benchmark
import data
from support import cli, sources


def test_replay_follows_early_stopping():
    curve = [0.1, 0.3, 0.2, 0.2, 0.2, 0.5]
    assert benchmark.replay(curve, 3, 0) == (5, 2, 0.3)       # three epochs without a better score
    assert benchmark.replay(curve, 3, 6) == (6, 6, 0.5)       # not before the minimum
    assert benchmark.replay(curve, 0, 0) == (6, 6, 0.5)       # patience 0: the whole schedule


def test_latency_row_times_every_search_and_the_dsi_does_not_grow():
    queries = sources.make_synthetic(4, seed=1).images
    small, large = (benchmark.latency_row(n, queries, seed=0) for n in (16, 64))
    for row in (small, large):
        assert all(v > 0 for v in row.values()), row
    assert small["DSI MB"] == large["DSI MB"]                  # the index lives in the weights
    assert large["DE MB"] > small["DE MB"] and large["BoVW MB"] > small["BoVW MB"]


def test_grow_reuses_only_a_finished_run_of_the_same_flags(tmp_path):
    import json
    import sys

    import train
    cmd = [sys.executable, "train.py", "--db-size", "64", "--no-finetune", "--out", str(tmp_path)]
    assert not benchmark.same_run(str(tmp_path), cmd)                          # nothing there yet
    args = vars(cli.build_parser().parse_args(cmd[2:]))
    (tmp_path / "results.json").write_text(json.dumps({"args": args}))
    assert benchmark.same_run(str(tmp_path), cmd)
    assert benchmark.same_run(str(tmp_path), cmd + ["--replay", "2"])         # an addition flag only
    assert not benchmark.same_run(str(tmp_path), cmd + ["--lr", "1e-3"])      # another index run


def test_grow_summary_compares_means_and_each_seed_with_its_own_scratch_run():
    def row(seed, run, p10, seconds, new=None, old=1.0):
        return {"seed": seed, "run": run, "test P@10": p10, "all-query P@10": p10 / 2, "train s": seconds,
                "new IA@1": new, "old IA@1": old}
    scratch, five = "whole IDB from scratch", "75 % + 25 % in 5 steps"
    rows = [row(0, scratch, 0.30, 100.0), row(0, five, 0.25, 5.0, 1.0, 0.99), row(0, five, 0.27, 5.0, 0.98, 0.985),
            row(1, scratch, 0.20, 200.0), row(1, five, 0.24, 20.0, 1.0, 1.0)]
    by_run = {r["run"]: r for r in benchmark.grow_summary(rows)}
    s, f = by_run[scratch], by_run[five]
    assert s["seeds"] == 2 and abs(s["P@10 mean"] - 0.25) < 1e-9 and s["vs scratch (means)"] == "+0.0 %"
    assert abs(f["P@10 mean"] - 0.255) < 1e-9                    # the last step of each seed: 0.27, 0.24
    assert f["vs scratch (means)"] == "+2.0 %"                         # 0.255 / 0.25
    assert f["vs scratch (per seed)"] == "-10.0 to +20.0 %"            # 0.27 / 0.30, 0.24 / 0.20
    assert f["per-seed se"] == "15.0 %"                                # sd(-0.1, +0.2) / sqrt(2)
    assert f["train s vs scratch (per seed)"] == "0.10-0.10x"          # (5 + 5) / 100, 20 / 200
    assert (f["new IA@1 min"], f["old IA@1 min"], s["new IA@1 min"]) == (0.98, 0.985, None)
    assert abs(f["sd"] - 0.0212132) < 1e-6
    all_query = {r["run"]: r for r in benchmark.grow_summary(rows, "all-query P@10")}[five]   # the metric asked for
    assert abs(all_query["P@10 mean"] - 0.1275) < 1e-9 and all_query["vs scratch (per seed)"] == "-10.0 to +20.0 %"


def test_flops_per_image_counts_a_matmul_by_hand():
    """--speed's FLOPs come from torch's flop counter: (m, k) @ (k, n) is 2 m k n, here shared by 4 images."""
    import torch
    x, w = torch.randn(6, 5), torch.randn(5, 3)
    assert benchmark.flops_per_image(lambda: x @ w, 4) == 2 * 6 * 5 * 3 / 4
