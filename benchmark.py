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
import time

COLUMNS = ["data", "recipe", "seed", "wall s", "index epochs", "retrieval epochs run / kept",
           "zero-shot IA@1", "zero-shot P@10", "zero-shot MAP@10", "fine-tuned IA@1", "fine-tuned P@10",
           "fine-tuned MAP@10", "fine-tuned / zero-shot P@10", "BoVW P@10", "BoVW MAP@10"]
MEANS = ["wall s", "index epochs", "zero-shot IA@1", "zero-shot P@10", "zero-shot MAP@10", "fine-tuned IA@1",
         "fine-tuned P@10", "fine-tuned MAP@10", "fine-tuned / zero-shot P@10", "BoVW P@10", "BoVW MAP@10"]


def run_one(recipe: str, data_root: str | None, seed: int, a: argparse.Namespace, extra: list[str]) -> dict:
    """One train.py run in its own process; its results.json as one table row."""
    name = "imagenet" if data_root else "synthetic"
    out = os.path.join(a.out, f"{recipe}-{name}-{a.db_size}-{a.ids}-s{seed}")
    cmd = [sys.executable, "train.py", "--recipe", recipe, "--db-size", str(a.db_size), "--ids", a.ids,
           "--seed", str(seed), "--out", out, "--quiet", *extra]
    if data_root:
        cmd += ["--dataset", "imagenet", "--data-root", data_root]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py exited with {proc.returncode}; see {out}/train.log")
    with open(os.path.join(out, "results.json")) as f:
        rows = json.load(f)["rows"]
    pick = lambda model, variant: next((r for r in rows if (r["model"], r["variant"]) == (model, variant)), {})  # noqa: E731
    zs, ft, bw = pick("ViT DSI", "zero-shot"), pick("ViT DSI", "fine-tuned"), pick("BoVW", "-")
    ratio = ft["P@10"] / zs["P@10"] if ft.get("P@10") is not None and zs.get("P@10") else None
    return {"data": name, "recipe": recipe, "seed": seed, "wall s": round(wall, 1),
            "index epochs": zs.get("index_epochs"),
            "retrieval epochs run / kept": f"{ft.get('retrieval_epochs', '–')} / {ft.get('retrieval_epoch_kept', '–')}",
            "zero-shot IA@1": zs.get("IA@1"), "zero-shot P@10": zs.get("P@10"), "zero-shot MAP@10": zs.get("MAP@10"),
            "fine-tuned IA@1": ft.get("IA@1"), "fine-tuned P@10": ft.get("P@10"),
            "fine-tuned MAP@10": ft.get("MAP@10"), "fine-tuned / zero-shot P@10": ratio,
            "BoVW P@10": bw.get("P@10"), "BoVW MAP@10": bw.get("MAP@10")}


def mean_row(rows: list[dict]) -> dict:
    """Mean of each numeric column over the seeds of one (data, recipe)."""
    row = {c: "" for c in COLUMNS} | {"data": rows[0]["data"], "recipe": rows[0]["recipe"], "seed": "**mean**"}
    for c in MEANS:
        values = [r[c] for r in rows if isinstance(r[c], (int, float))]
        row[c] = sum(values) / len(values) if values else None
    return row


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if value <= 2 else f"{value:.1f}"
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
    a, extra = p.parse_known_args()
    roots = ([] if a.no_synthetic else [None]) + ([a.data_root] if a.data_root else [])
    if not roots:
        p.error("--no-synthetic needs --data-root: nothing to run")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for root in roots:
        for recipe in a.recipes:
            rows = [run_one(recipe, root, seed, a, extra) for seed in a.seeds]
            if len(rows) > 1:
                rows.append(mean_row(rows))
            lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
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
