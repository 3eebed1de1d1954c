"""benchmark.py: the recipe x data table of the README ("Fast training"). A benchmark, not a test.

Runs `train.py` once per (recipe, data set) in a fresh process, so each run is timed as a user would
see it, then reads each run's results.json and prints one markdown table (also written to
`<out>/benchmark.md`). Flags it does not know are passed on to every train.py run.

    python benchmark.py                                                  # built-in data, both recipes
    python benchmark.py --data-root ../shared/data/imagenette-4k --recipes fast
    python benchmark.py --recipes fast --ids random --index-mix 0.5      # extra flags go to train.py
"""

import argparse
import json
import os
import subprocess
import sys
import time

COLUMNS = ["recipe", "data", "db", "ids", "index epochs", "s/epoch", "images/s", "run wall s",
           "zero-shot IA@1", "fine-tuned IA@1", "fine-tuned MAP@10", "fine-tuned P@10", "BoVW P@10"]


def run_one(recipe: str, data_root: str | None, a: argparse.Namespace, extra: list[str]) -> dict:
    name = "imagenet" if data_root else "synthetic"
    out = os.path.join(a.out, f"{recipe}-{name}-{a.db_size}-{a.ids}")
    cmd = [sys.executable, "train.py", "--recipe", recipe, "--db-size", str(a.db_size), "--ids", a.ids,
           "--seed", str(a.seed), "--out", out, "--quiet", *extra]
    if data_root:
        cmd += ["--dataset", "imagenet", "--data-root", data_root]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py exited with {proc.returncode}; see {out}/train.log")
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    pick = lambda model, variant: next((r for r in rows if (r["model"], r["variant"]) == (model, variant)), {})  # noqa: E731
    zs, ft, bw = pick("ViT DSI", "zero-shot"), pick("ViT DSI", "fine-tuned"), pick("BoVW", "-")
    return {"recipe": recipe, "data": name, "db": a.db_size, "ids": a.ids,
            "index epochs": zs.get("index_epochs"), "s/epoch": zs.get("index_seconds_per_epoch"),
            "images/s": zs.get("index_images_per_s"), "run wall s": round(wall, 1),
            "zero-shot IA@1": zs.get("IA@1"), "fine-tuned IA@1": ft.get("IA@1"),
            "fine-tuned MAP@10": ft.get("MAP@10"), "fine-tuned P@10": ft.get("P@10"), "BoVW P@10": bw.get("P@10")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["fast", "paper"], choices=["fast", "paper"], help="recipes to time")
    p.add_argument("--data-root", help="also run on this ImageFolder tree (e.g. ../shared/data/imagenette-4k)")
    p.add_argument("--no-synthetic", action="store_true", help="skip the built-in data set")
    p.add_argument("--db-size", type=int, default=512, help="images drawn per run")
    p.add_argument("--ids", default="clustered", choices=["clustered", "random", "semantic"], help="ID scheme")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--out", default=os.path.join("runs", "benchmark"), help="folder for the runs and the table")
    a, extra = p.parse_known_args()
    roots = ([] if a.no_synthetic else [None]) + ([a.data_root] if a.data_root else [])
    table = [run_one(recipe, root, a, extra) for root in roots for recipe in a.recipes]
    fmt = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) and v <= 1 else str(v))  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in table]
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
