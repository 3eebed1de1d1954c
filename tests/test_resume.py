"""--resume: a run stopped by Ctrl-C and resumed ends with the metrics of a run never stopped (same seed,
same machine); a resume.pt that is not one is refused with one line. Tiny runs, seconds on a CPU."""
import json

import pytest
import torch

import train
from support import engine, resume

# Dropout, augmented views, several drawn targets and MAP early stopping: every generator the run draws from.
TINY = ["--db-size", "64", "--image-size", "32", "--patch-size", "16", "--dim", "32", "--mlp-dim", "64",
        "--depth", "1", "--heads", "2", "--bovw-k", "16", "--dropout", "0.1", "--index-epochs", "6",
        "--index-target-acc", "1.0", "--index-views", "1", "--retrieval-epochs", "4", "--patience", "10",
        "--precision", "fp32", "--save-every", "2", "--quiet", "--threads", "1"]
TIMING = ("train_seconds", "query_ms", "index_seconds_per_epoch", "index_images_per_s", "retrieval_seconds")


def rows_without_timing(out) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def final_weights(out) -> dict:
    """The checkpoint's weights: a far finer check than the rows, whose few test queries hide small drifts."""
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert train.main(TINY + ["--out", str(out)]) == 0
    assert not (out / resume.RESUME_FILE).exists()          # a finished run leaves no resume state behind
    return rows_without_timing(out), final_weights(out)


@pytest.mark.parametrize("phase, epoch", [("index", 4), ("retrieval", 1), ("retrieval", 3)])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(uninterrupted, phase, epoch, tmp_path,
                                                                    monkeypatch, capsys):
    """Ctrl-C at the start of `phase` epoch `epoch`: the epoch before it is saved (not only the last
    --save-every one), and the resumed run writes the same rows as the run never stopped."""
    rows, weights = uninterrupted
    index_epochs = rows[1]["index_epochs"]
    stop_at = epoch if phase == "index" else index_epochs + epoch       # run_epoch runs once per epoch
    calls = {"n": 0}
    real_run_epoch = engine.run_epoch

    def run_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "run_epoch", run_epoch)
    capsys.readouterr()
    assert train.main(TINY + ["--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--resume {tmp_path}" in err, err
    saved_phase, saved_epoch = (phase, epoch - 1) if epoch > 1 else ("index", index_epochs)
    assert f"{saved_phase} epoch {saved_epoch} saved" in err, err
    assert not (tmp_path / "results.json").exists()

    monkeypatch.setattr(engine, "run_epoch", real_run_epoch)
    assert train.main(["--resume", str(tmp_path), "--threads", "1", "--quiet"]) == 0
    assert rows_without_timing(tmp_path) == rows
    resumed = final_weights(tmp_path)
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert not (tmp_path / resume.RESUME_FILE).exists()


@pytest.mark.parametrize("content, needle", [
    (b"\x80\x02garbage, not a resume state", "not a vit-dsi resume state"),
    ({"format_version": resume.RESUME_VERSION + 1}, f"this train.py reads version {resume.RESUME_VERSION}"),
])
def test_resume_refuses_a_file_that_is_not_a_resume_state_of_this_version(content, needle, tmp_path, capsys):
    path = tmp_path / resume.RESUME_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_resume_refuses_other_arguments_and_a_missing_state(tmp_path, capsys):
    """A resume takes the run's own arguments; a folder without resume.pt has nothing to resume."""
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path), "--db-size", "128"]) == 2
    assert "drop --db-size" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no resume.pt" in err, err


def test_resume_refuses_a_folder_whose_images_changed(tmp_path, monkeypatch, capsys):
    """The resume state holds a fingerprint of the image references and the split: an ImageFolder whose
    files changed since the run began is refused with one line, before any training."""
    import numpy as np
    from PIL import Image
    root = tmp_path / "photos"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(20):
            Image.fromarray(np.full((32, 32, 3), 100 * c + 5 * k, np.uint8)).save(root / f"c{c}" / f"{k:02d}.png")
    out = tmp_path / "out"
    argv = ["--dataset", "imagenet", "--data-root", str(root), "--db-size", "40", "--models", "dsi",
            *TINY[2:], "--out", str(out)]
    calls = {"n": 0}
    real_run_epoch = engine.run_epoch

    def run_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "run_epoch", run_epoch)
    assert train.main(argv) == 130 and (out / resume.RESUME_FILE).exists()
    monkeypatch.setattr(engine, "run_epoch", real_run_epoch)
    (root / "c0" / "00.png").rename(root / "c0" / "zz.png")          # the same image under another name
    capsys.readouterr()
    assert train.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "differ from those the interrupted run began with" in err, err
