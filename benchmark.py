"""benchmark.py: the seed x recipe x data tables of RESULTS.md. A benchmark, not a test.

Runs `train.py` once per (data set, recipe, seed) in a fresh process, so each run is timed as a user
would see it, then reads each run's results.json and prints one markdown table with a mean row per
(data set, recipe) (also written to `<out>/benchmark.md`). Flags it does not know are passed on to
every train.py run. Run nothing else on the machine meanwhile: the wall times are part of the table.

    python benchmark.py --seeds 0 1 2                                    # the main command, 3 seeds
    python benchmark.py --seeds 0 1 2 --no-synthetic --data-root ../shared/data/imagenette-4k
    python benchmark.py --recipes paper --threads 1                      # extra flags go to train.py
"""

import argparse
import json
import os
import subprocess
import sys

COLUMNS = ["data", "recipe", "seed", "wall s", "index epochs", "retrieval epochs run / kept",
           "zero-shot IA@1", "zero-shot P@10", "zero-shot MAP@10", "fine-tuned IA@1", "fine-tuned P@10",
           "fine-tuned MAP@10", "fine-tuned / zero-shot P@10", "BoVW P@10", "BoVW MAP@10"]
MEANS = ["wall s", "index epochs", "zero-shot IA@1", "zero-shot P@10", "zero-shot MAP@10", "fine-tuned IA@1",
         "fine-tuned P@10", "fine-tuned MAP@10", "fine-tuned / zero-shot P@10", "BoVW P@10", "BoVW MAP@10"]


def run_one(recipe: str, data_root: str | None, seed: int, a: argparse.Namespace, extra: list[str]) -> dict:
    """One train.py run in its own process (or, with --report-only, the one already in `out`); its
    results.json as one table row."""
    name = "imagenet" if data_root else "synthetic"
    out = os.path.join(a.out, f"{recipe}-{name}-{a.db_size}-{a.ids}-s{seed}")
    cmd = [sys.executable, "train.py", "--recipe", recipe, "--db-size", str(a.db_size), "--ids", a.ids,
           "--seed", str(seed), "--out", out, "--quiet", *extra]
    if data_root:
        cmd += ["--dataset", "imagenet", "--data-root", data_root]
    if not a.report_only:
        print(f"$ {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise SystemExit(f"error: train.py exited with {proc.returncode}; see {out}/train.log")
    try:
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        raise SystemExit(f"error: no results.json in {out}; run without --report-only first") from None
    rows, wall = results["rows"], results["wall_seconds"]
    pick = lambda model, variant: next((r for r in rows if (r["model"], r["variant"]) == (model, variant)), {})  # noqa: E731
    zs, ft, bw = pick("ViT DSI", "zero-shot"), pick("ViT DSI", "fine-tuned"), pick("BoVW", "-")
    ratio = ft["P@10"] / zs["P@10"] if ft.get("P@10") is not None and zs.get("P@10") else None
    return {"data": name, "recipe": recipe, "seed": seed, "out": out, "wall s": round(wall, 1),
            "index epochs": zs.get("index_epochs"),
            "retrieval epochs run / kept": f"{ft.get('retrieval_epochs', '–')} / {ft.get('retrieval_epoch_kept', '–')}",
            "zero-shot IA@1": zs.get("IA@1"), "zero-shot P@10": zs.get("P@10"), "zero-shot MAP@10": zs.get("MAP@10"),
            "fine-tuned IA@1": ft.get("IA@1"), "fine-tuned P@10": ft.get("P@10"),
            "fine-tuned MAP@10": ft.get("MAP@10"), "fine-tuned / zero-shot P@10": ratio,
            "BoVW P@10": bw.get("P@10"), "BoVW MAP@10": bw.get("MAP@10")}


# Stopping rules replayed on a run's validation MAP@10 curve: stopping never changes the epochs before
# it, so each rule's stop and kept epoch on the same lr schedule follow from the curve exactly.
RULES = {"patience 3": (3, 0), "patience 3 after 10 epochs": (3, 10), "patience 5 after 10 epochs": (5, 10),
         "whole schedule (fast)": (0, 0)}


def validation_curve(out: str) -> list[float]:
    """Validation MAP@10 per retrieval epoch, read from the run's train.log lines."""
    with open(os.path.join(out, "train.log")) as f:
        return [float(line.split("val MAP@10 ")[1].split()[0]) for line in f
                if line.startswith("retrieval epoch") and "val MAP@10 " in line]


def replay(curve: list[float], patience: int, min_epochs: int) -> tuple[int, int, float]:
    """(epoch stopped at, epoch kept, its validation MAP@10) under train.EarlyStopping's rule."""
    best, kept, bad = -1.0, 0, 0
    for epoch, score in enumerate(curve, start=1):
        if score > best:
            best, kept, bad = score, epoch, 0
        else:
            bad += 1
        if patience and epoch >= min_epochs and bad >= patience:
            return epoch, kept, best
    return len(curve), kept, best


def stopping_table(outs: list[tuple[str, int, str]]) -> list[str]:
    lines = ["| data | seed | " + " | ".join(f"{r}: stop / kept / val MAP@10" for r in RULES) + " |",
             "|---|---|" + "---|" * len(RULES)]
    for data_name, seed, out in outs:
        curve = validation_curve(out)
        cells = [replay(curve, *rule) for rule in RULES.values()]
        lines.append(f"| {data_name} | {seed} | " + " | ".join(f"{s} / {k} / {v:.3f}" for s, k, v in cells) + " |")
    return lines


def mean_row(rows: list[dict]) -> dict:
    """Mean of each numeric column over the seeds of one (data, recipe)."""
    row = {c: "" for c in COLUMNS} | {"data": rows[0]["data"], "recipe": rows[0]["recipe"], "seed": "**mean**"}
    for c in MEANS:
        values = [r[c] for r in rows if isinstance(r[c], (int, float))]
        row[c] = sum(values) / len(values) if values else None
    return row


def fmt(value, column: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if column in ("wall s", "index epochs") else f"{value:.3f}"
    return str(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["fast"], choices=["fast", "paper"], help="recipes to run")
    p.add_argument("--data-root", help="also run on this ImageFolder tree (e.g. ../shared/data/imagenette-4k)")
    p.add_argument("--no-synthetic", action="store_true", help="skip the built-in data set")
    p.add_argument("--db-size", type=int, default=512, help="images drawn per run")
    p.add_argument("--ids", default="clustered", choices=["clustered", "random", "semantic"], help="ID scheme")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    p.add_argument("--out", default=os.path.join("runs", "benchmark"), help="folder for the runs and the table")
    p.add_argument("--report-only", action="store_true", help="train nothing: rebuild the tables from the runs in --out")
    a, extra = p.parse_known_args()
    roots = ([] if a.no_synthetic else [None]) + ([a.data_root] if a.data_root else [])
    if not roots:
        p.error("--no-synthetic needs --data-root: nothing to run")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    runs = []
    for root in roots:
        for recipe in a.recipes:
            rows = [run_one(recipe, root, seed, a, extra) for seed in a.seeds]
            runs += [(r["data"], r["seed"], r["out"]) for r in rows if r["recipe"] == "fast"]
            if len(rows) > 1:
                rows.append(mean_row(rows))
            lines += ["| " + " | ".join(fmt(r[c], c) for c in COLUMNS) + " |" for r in rows]
    if runs:
        lines += ["", "Stopping rules replayed on each fast run's validation MAP@10 curve (same lr schedule):", ""]
        lines += stopping_table(runs)
    text = "\n".join(lines) + "\n"
    if extra:
        text += f"\nExtra train.py flags: {' '.join(extra)}\n"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "benchmark.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
