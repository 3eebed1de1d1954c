"""benchmark.py's pieces that need no training run: the stopping-rule replay and the latency table."""
import benchmark
import data


def test_replay_follows_early_stopping():
    curve = [0.1, 0.3, 0.2, 0.2, 0.2, 0.5]
    assert benchmark.replay(curve, 3, 0) == (5, 2, 0.3)       # three epochs without a better score
    assert benchmark.replay(curve, 3, 6) == (6, 6, 0.5)       # not before the minimum
    assert benchmark.replay(curve, 0, 0) == (6, 6, 0.5)       # patience 0: the whole schedule


def test_latency_row_times_every_search_and_the_dsi_does_not_grow():
    queries = data.make_synthetic(4, seed=1).images
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
    args = vars(train.build_parser().parse_args(cmd[2:]))
    (tmp_path / "results.json").write_text(json.dumps({"args": args}))
    assert benchmark.same_run(str(tmp_path), cmd)
    assert benchmark.same_run(str(tmp_path), cmd + ["--replay", "2"])         # an addition flag only
    assert not benchmark.same_run(str(tmp_path), cmd + ["--lr", "1e-3"])      # another index run
