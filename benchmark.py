"""benchmark.py: the seed x recipe x data tables of RESULTS.md. A benchmark, not a test.

Runs `train.py` once per (data set, recipe, seed) in a fresh process, so each run is timed as a user
would see it, then reads each run's results.json and prints one markdown table with a mean row per
(data set, recipe) (also written to `<out>/benchmark.md`). Flags it does not know are passed on to
every train.py run. Run nothing else on the machine meanwhile: the wall times are part of the table.

    python benchmark.py --seeds 0 1 2                                    # the main command, 3 seeds
    python benchmark.py --seeds 0 1 2 --no-synthetic --data-root ../shared/data/imagenette-4k
    python benchmark.py --recipes paper --threads 1                      # extra flags go to train.py
    python benchmark.py --latency                                        # query cost vs database size
    python benchmark.py --grow --data-root ../shared/data/imagenette-4k --db-size 2048 --ids clustered

`--latency` measures the paper's claim that a DSI's retrieval cost does not grow with the database: ms per
query and memory of the DSI's beam search (top 10 and top 100), exact cosine kNN over embeddings from the
same ViT encoder (a dual encoder's search), and BoVW's cosine ranking, for IDB sizes 128 to 8192. Timing
needs no training: the models are untrained and the database vectors random (same shapes, same cost).

`--grow` measures what growing an index costs (grow.py): index 75 % of the IDB (`train.py --index-hold-out
0.25`), then add the other 25 % in one step and, from the same start, in 5 steps; per step the new images'
IA@1, the old ones', P@10 / MAP@10 of the run's test queries (same class = relevant) and P@10 of all its
queries (none of which a zero-shot model has seen); against indexing the whole IDB from scratch. Zero-shot
models (`--no-finetune`): growth concerns the index, not retrieval.
The two indexing runs are train.py processes; the steps run in this process on the checkpoint they wrote.
`--reuse` takes those two runs from `--out` when they hold a finished run of the same flags (a changed
addition flag, such as `--replay`, then costs only the additions).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

import bovw
import data
import de
import grow
import metrics
import train
from support import cli, engine, sources, store
from support.run import Log, UsageError, pick_device
from vitdsi import IDTrie, ViTDSI, ViTDSIConfig

COLUMNS = ["data", "recipe", "seed", "wall s", "index epochs", "retrieval epochs run / kept",
           "zero-shot IA@1", "zero-shot P@10", "zero-shot MAP@10", "fine-tuned IA@1", "fine-tuned P@10",
           "fine-tuned MAP@10", "fine-tuned / zero-shot P@10", "BoVW P@10", "BoVW MAP@10", "DE IA@1", "DE P@10", "DE MAP@10",
           "retrieval phase s", "DE training s"]
MEANS = ["wall s", "index epochs", "zero-shot IA@1", "zero-shot P@10", "zero-shot MAP@10", "fine-tuned IA@1",
         "fine-tuned P@10", "fine-tuned MAP@10", "fine-tuned / zero-shot P@10", "BoVW P@10", "BoVW MAP@10", "DE IA@1",
         "DE P@10", "DE MAP@10", "retrieval phase s", "DE training s"]


def run_one(recipe: str, data_root: str | None, seed: int, a: argparse.Namespace, extra: list[str]) -> dict:
    """One train.py run in its own process (or, with --report-only, the one already in `out`); its
    results.json as one table row."""
    name = "imagenet" if data_root else "synthetic"
    out = os.path.join(a.out, f"{recipe}-{name}-{a.db_size}-{a.ids}-s{seed}")
    cmd = [sys.executable, "train.py", "--recipe", recipe, "--db-size", str(a.db_size), "--ids", a.ids,
           "--seed", str(seed), "--out", out, "--quiet", "--models", "all", *extra]
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
    de_row = pick("ViT dual encoder", "-")
    ratio = ft["P@10"] / zs["P@10"] if ft.get("P@10") is not None and zs.get("P@10") else None
    return {"data": name, "recipe": recipe, "seed": seed, "out": out, "wall s": round(wall, 1),
            "index epochs": zs.get("index_epochs"),
            "retrieval epochs run / kept": f"{ft.get('retrieval_epochs', '–')} / {ft.get('retrieval_epoch_kept', '–')}",
            "zero-shot IA@1": zs.get("IA@1"), "zero-shot P@10": zs.get("P@10"), "zero-shot MAP@10": zs.get("MAP@10"),
            "fine-tuned IA@1": ft.get("IA@1"), "fine-tuned P@10": ft.get("P@10"),
            "fine-tuned MAP@10": ft.get("MAP@10"), "fine-tuned / zero-shot P@10": ratio,
            "BoVW P@10": bw.get("P@10"), "BoVW MAP@10": bw.get("MAP@10"),
            "DE IA@1": de_row.get("IA@1"), "DE P@10": de_row.get("P@10"), "DE MAP@10": de_row.get("MAP@10"),
            "retrieval phase s": ft.get("retrieval_seconds"), "DE training s": de_row.get("train_seconds")}


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
    """(epoch stopped at, epoch kept, its validation MAP@10) under engine.EarlyStopping's rule."""
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
        return f"{value:.1f}" if column.endswith(" s") or column in ("index epochs", "train s") else f"{value:.3f}"
    return str(value)


# ------------------------------------------------------------------------------- query cost vs database size

def timed(fn, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls, seconds (the best is the least disturbed by the machine)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def latency_row(n: int, queries: np.ndarray, seed: int) -> dict:
    """ms per query and memory (MB) of each search over an IDB of n images; `queries` (B, S, S, 3) uint8."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = data.assign_ids(np.zeros(n, dtype=np.int64), "random", seed=seed)    # n distinct fixed-width IDs
    trie = IDTrie(ids)
    model = ViTDSI(ViTDSIConfig(max_len=len(ids[0]) + 2)).eval()               # BOS, digits, EOS
    dual = de.DualEncoder(model.config).eval()
    x = data.normalize(data.images_to_tensor(queries))
    B = len(queries)
    row = {"IDB images": n}
    with torch.no_grad():
        for k in (10, 100):
            row[f"DSI top-{k} ms"] = 1000 * timed(lambda: model.generate(x, trie, k=k)) / B
        database = torch.nn.functional.normalize(torch.randn(n, model.config.dim), dim=1)   # (n, D)
        row["DE kNN top-100 ms"] = 1000 * timed(lambda: de.rank_cosine(dual(x), database, 100)) / B
    index = bovw.BoVWIndex(k=200, seed=seed).fit(queries)                      # a vocabulary to embed with
    index.database = bovw.l2_normalize(rng.random((n, index.n_words)).astype(np.float32))
    row["BoVW top-100 ms"] = 1000 * timed(lambda: index.query(queries, top_k=100), repeats=1) / B
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    row["DSI MB"] = params / 2**20                                              # the index is the weights
    dual_params = sum(p.numel() * p.element_size() for p in dual.parameters())
    row["DE MB"] = (dual_params + database.numel() * database.element_size()) / 2**20
    row["BoVW MB"] = (index.database.nbytes + index.centroids.nbytes) / 2**20
    return row


def draw_latency(rows: list[dict], path: str) -> None:
    """ms per query against IDB size (log scale), one line per search, with Pillow."""
    series = [c for c in rows[0] if c.endswith(" ms")]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    w, h, pad = 640, 400, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    hi = max(r[c] for r in rows for c in series) * 1.1
    sizes = [r["IDB images"] for r in rows]
    lo_x, hi_x = np.log2(sizes[0]), np.log2(sizes[-1])
    to_xy = lambda n, v: (pad + (w - 2 * pad) * (np.log2(n) - lo_x) / max(1e-9, hi_x - lo_x),  # noqa: E731
                          h - pad - (h - 2 * pad) * v / hi)
    draw.rectangle((pad, pad, w - pad, h - pad), outline="black")
    draw.text((pad, 20), "ms per query vs IDB images (untrained models, one CPU run)", fill="black")
    draw.text((8, pad), f"{hi:.0f}", fill="black")
    draw.text((8, h - pad - 10), "0", fill="black")
    for n in sizes:
        draw.text((to_xy(n, 0)[0] - 12, h - pad + 6), str(n), fill="black")
    for k, (name, colour) in enumerate(zip(series, colours)):
        draw.line([to_xy(r["IDB images"], r[name]) for r in rows], fill=colour, width=2)
        draw.text((w - pad - 170, pad + 8 + 14 * k), name, fill=colour)
    img.save(path)


def latency_main(a: argparse.Namespace) -> int:
    queries = sources.make_synthetic(a.queries, seed=a.seeds[0] + 1).images                # (B, 160, 160, 3)
    rows = []
    for n in a.sizes:
        rows.append(latency_row(n, queries, a.seeds[0]))
        print(f"IDB {n}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1].items() if k != "IDB images"), flush=True)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) if c == "IDB images" else f"{r[c]:.1f}" for c in columns) + " |" for r in rows]
    text = "\n".join(lines) + f"\n\nms per query: the best of 3 batches of {a.queries} queries (BoVW: one), threads " \
                               f"{torch.get_num_threads()}; MB: what the search holds in memory.\n"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "latency.md"), "w") as f:
        f.write(text)
    draw_latency(rows, os.path.join(a.out, "latency.png"))
    print(text)
    return 0


# ------------------------------------------------------------------------------- growing an index

GROW_COLUMNS = ["run", "step", "indexed", "added", "epochs", "train s", "wall s", "new IA@1", "old IA@1",
                "test P@10", "test MAP@10", "all-query P@10"]


SCRATCH, START = "whole IDB from scratch", "75 % index (the start)"    # the two index runs' row names

# read by the additions, not by an index run
ADDITION_FLAGS = ("replay", "replay_min", "settle", "add_lr", "add_epochs", "add_frozen", "overwrite")


def same_run(out: str, cmd: list[str]) -> bool:
    """Whether `out` holds a finished train.py run with the arguments `cmd` gives (addition flags aside)."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            stored = json.load(f)["args"]
    except (OSError, ValueError, KeyError):
        return False
    wanted = json.loads(json.dumps(vars(cli.build_parser().parse_args(cmd[2:]))))
    strip = lambda args: {k: v for k, v in args.items() if k not in ADDITION_FLAGS}  # noqa: E731
    return strip(stored) == strip(wanted)


def index_run(a: argparse.Namespace, seed: int, name: str, flags: list[str], extra: list[str]) -> tuple[str, dict]:
    """One zero-shot indexing run of train.py in its own process; its folder and its DSI row."""
    out = os.path.join(a.out, f"grow-{'imagenet' if a.data_root else 'synthetic'}-{a.db_size}-{a.ids}-s{seed}", name)
    cmd = [sys.executable, "train.py", "--db-size", str(a.db_size), "--ids", a.ids, "--seed", str(seed),
           "--no-finetune", "--models", "dsi", "--out", out, "--quiet", *flags, *extra]
    if a.data_root:
        cmd += ["--dataset", "imagenet", "--data-root", a.data_root]
    if a.reuse and same_run(out, cmd):
        print(f"reusing {out}: it holds a finished run of this command", flush=True)
    else:
        print(f"$ {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"error: train.py failed; see {out}/train.log")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    row = next(r for r in results["rows"] if r["model"] == "ViT DSI")
    return out, {"epochs": row["index_epochs"], "train s": row["train_seconds"], "wall s": results["wall_seconds"],
                 "old IA@1": row["IA@1"], "test P@10": row["P@10"], "test MAP@10": row["MAP@10"]}


def query_scores(model, ckpt: dict, imageset: sources.ImageSet, split: data.Split, images: torch.Tensor,
                 device: torch.device) -> dict:
    """P@10 and MAP@10 of the run's test queries against the IDs the grown index can write (same class), and
    P@10 over all its queries (train, validation and test: 1536 at db 2048). A zero-shot model has seen none of
    them, and ten times the queries shrink the part of a P@10 difference that is only the luck of the draw."""
    live = store.live_ids(ckpt)
    position = {ref: i for i, ref in enumerate(imageset.refs)}
    ref_of = dict(zip(ckpt["ids"], ckpt["idb_refs"]))
    idb_labels, trie = [imageset.labels[position[ref_of[i]]] for i in live], IDTrie(live)

    def scored(queries: np.ndarray) -> dict:
        relevant = data.relevant_sets([imageset.labels[i] for i in queries], idb_labels, live)
        ranked, _ = engine.rank_dsi(model, images[torch.as_tensor(queries)], trie, 10, None, device)
        return metrics.retrieval_metrics(ranked, relevant)
    # The test queries are ranked on their own, in the batches train.py ranks them in, so that the scratch and
    # start rows' test scores (read from results.json) and the steps' come from the same search.
    test, every = scored(split.test), scored(np.concatenate([split.train, split.val, split.test]))
    return {"test P@10": test["P@10"], "test MAP@10": test["MAP@10"], "all-query P@10": every["P@10"]}


def run_scores(out: str) -> dict:
    """query_scores of a finished train.py run, read from its checkpoint."""
    model, ckpt = store.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    imageset, split = grow.rebuild_run(ckpt, Log(quiet=True))
    device = pick_device(ckpt["args"]["device"])
    return query_scores(model, ckpt, imageset, split, data.images_to_tensor(imageset.images), device)


def grow_in_steps(base: str, steps: int, settings_args: list[str]) -> list[dict]:
    """Add the images the base run held out, in `steps` stratified steps, to a fresh copy of its model."""
    model, ckpt = store.load_checkpoint(os.path.join(base, "checkpoint.pt"))
    log = Log(os.path.join(base, f"grow-{steps}-steps.log"), quiet=True)
    imageset, split = grow.rebuild_run(ckpt, log)
    position = {ref: i for i, ref in enumerate(imageset.refs)}
    held = np.array([position[ref] for ref in ckpt["held_out"]])
    sizes = [len(held) // steps + (k < len(held) % steps) for k in range(steps)]
    device = pick_device(ckpt["args"]["device"])
    settings = grow.settings_from_args(cli.build_parser().parse_args(settings_args),
                                       cli.recipe_from_args(argparse.Namespace(**ckpt["args"])))
    images, rows = data.images_to_tensor(imageset.images), []
    for k, part in enumerate(data.stratified_subsets(imageset.primary[held], sizes, ckpt["seed"]), start=1):
        chosen = held[part]
        live = set(store.live_ids(ckpt))
        old = images[torch.as_tensor([position[r] for i, r in zip(ckpt["ids"], ckpt["idb_refs"]) if i in live])]
        additions = grow.Additions(imageset.images[chosen], [imageset.refs[i] for i in chosen],
                                   [int(imageset.primary[i]) for i in chosen])
        t0 = time.perf_counter()
        ckpt, report = grow.add_to_index(model, ckpt, additions, grow.Replay(old, store.live_ids(ckpt)), settings,
                                         device, log)
        rows.append({"run": f"75 % + 25 % in {steps} step{'s' if steps > 1 else ''}", "step": k,
                     "indexed": len(store.live_ids(ckpt)), "added": report["added"], "epochs": report["epochs"],
                     "train s": report["seconds"], "wall s": round(time.perf_counter() - t0, 1),
                     "new IA@1": report["new_IA@1"], "old IA@1": report["old_IA@1"],
                     **query_scores(model, ckpt, imageset, split, images, device)})
        print(" | ".join(f"{c} {fmt(rows[-1][c], c)}" for c in GROW_COLUMNS), flush=True)
    return rows


SUMMARY_COLUMNS = ["run", "seeds", "P@10 mean", "sd", "vs scratch (means)", "vs scratch (per seed)",
                   "per-seed se", "train s vs scratch (per seed)", "new IA@1 min", "old IA@1 min"]


def grow_summary(rows: list[dict], metric: str = "test P@10") -> list[dict]:
    """One line per run over the seeds: the `metric` each ends with (mean, sd), against the from-scratch
    runs' mean and, per seed, against its own scratch run (range, and the standard error of their mean);
    the training time against scratch (all steps of a run together); the least new and old IA@1 seen in any
    step."""
    seeds = sorted({r["seed"] for r in rows})
    scratch = {r["seed"]: r for r in rows if r["run"] == SCRATCH}
    base_p10 = float(np.mean([scratch[s][metric] for s in seeds]))
    summary = []
    for run in dict.fromkeys(r["run"] for r in rows):
        last, seconds, new_ia, old_ia = {}, {}, [], []
        for r in (r for r in rows if r["run"] == run):
            last[r["seed"]] = r
            seconds[r["seed"]] = seconds.get(r["seed"], 0.0) + r["train s"]
            if r.get("new IA@1") is not None:
                new_ia.append(r["new IA@1"])
            old_ia.append(r["old IA@1"])
        p10 = np.array([last[s][metric] for s in seeds])
        paired = [last[s][metric] / scratch[s][metric] - 1 for s in seeds]
        time_ratio = [seconds[s] / scratch[s]["train s"] for s in seeds]
        grown = run not in (SCRATCH, START)
        summary.append({
            "run": run, "seeds": len(seeds), "P@10 mean": float(p10.mean()),
            "sd": float(p10.std(ddof=1)) if len(seeds) > 1 else None,
            "vs scratch (means)": f"{100 * (p10.mean() / base_p10 - 1):+.1f} %",
            "vs scratch (per seed)": f"{100 * min(paired):+.1f} to {100 * max(paired):+.1f} %",
            "per-seed se": (f"{100 * np.std(paired, ddof=1) / np.sqrt(len(seeds)):.1f} %"
                            if len(seeds) > 1 else None),
            "train s vs scratch (per seed)": f"{min(time_ratio):.2f}-{max(time_ratio):.2f}x",
            "new IA@1 min": min(new_ia) if grown else None, "old IA@1 min": min(old_ia)})
    return summary


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(fmt(r.get(c), c) for c in columns) + " |" for r in rows])


def grow_main(a: argparse.Namespace, extra: list[str]) -> int:
    """The growth experiment for each seed: whole IDB from scratch; 75 % start; + 25 % in 1 and in 5 steps."""
    threads = [extra[i + 1] for i, flag in enumerate(extra[:-1]) if flag == "--threads"]
    if threads and int(threads[-1]):
        torch.set_num_threads(int(threads[-1]))
    rows = []
    for seed in a.seeds:
        scratch_out, scratch = index_run(a, seed, "scratch", [], extra)
        base, start = index_run(a, seed, "base-75", ["--index-hold-out", "0.25"], extra)
        n_idb = data.split_sizes(a.db_size)[0]
        rows.append({"seed": seed, "run": SCRATCH, "step": "-", "indexed": n_idb, "added": "-", **scratch,
                     "all-query P@10": run_scores(scratch_out)["all-query P@10"]})
        rows.append({"seed": seed, "run": START, "step": 0, "indexed": n_idb - int(n_idb * 0.25 + 0.5),
                     "added": "-", **start, "all-query P@10": run_scores(base)["all-query P@10"]})
        for steps in (1, 5):
            rows += [{"seed": seed, **r} for r in grow_in_steps(base, steps, extra + ["--seed", str(seed)])]
    lines = markdown_table(rows, ["seed"] + GROW_COLUMNS)
    for metric, what in (("test P@10", "the test queries"), ("all-query P@10", "all the queries")):
        lines += ["", f"Over the seeds, P@10 of {what}:", ""]
        lines += markdown_table(grow_summary(rows, metric), SUMMARY_COLUMNS)
    text = "\n".join(lines) + (
        f"\n\n{'imagenette' if a.data_root else 'synthetic'} db {a.db_size}, ids {a.ids}, seeds "
        f"{' '.join(map(str, a.seeds))}; zero-shot models. old IA@1: images indexed before the step (scratch and "
        f"start rows: all indexed); test P@10 / MAP@10: the run's test queries against every indexed image of "
        f"the same class; all-query P@10: every query of the run (train, validation and test; a zero-shot model "
        f"has seen none). train s: training epochs only; wall s: the whole step (scratch and start rows: the "
        f"whole train.py run). Over the seeds: each run's last step; sd across seeds; vs scratch (means): its "
        f"mean P@10 against the scratch runs' mean; per seed: against the same seed's scratch run (range; se: "
        f"standard error of the mean of those ratios); train s: all its steps against the same seed's scratch "
        f"run.\n" + (f"Extra flags: {' '.join(extra)}\n" if extra else ""))
    os.makedirs(a.out, exist_ok=True)
    store.atomic_write(os.path.join(a.out, f"grow-{a.db_size}-{a.ids}.md"), lambda f: f.write(text), text=True)
    print(text)
    return 0


# ------------------------------------------------------------------------------- speed: how far from the hardware

def flops_per_image(fn, n_images: int) -> float:
    """FLOPs of fn() per image, as torch's flop counter counts them (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / n_images


def matmul_gflops(shapes: list[tuple[int, int, int]], dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of bare (m, k) @ (k, n) products of the model's shapes in `dtype`, run for about `seconds`."""
    pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flop_each = sum(2 * m * k * n for m, k, n in shapes)
    for x, w in pairs:                                                     # warm-up
        x @ w
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x, w in pairs:
            x @ w
        done += 1
    return done * flop_each / (time.perf_counter() - t0) / 1e9


def timed_epochs(fn, epochs: int) -> float:
    """Seconds per call of fn(), the mean of `epochs` calls after one not counted."""
    fn()
    t0 = time.perf_counter()
    for _ in range(epochs):
        fn()
    return (time.perf_counter() - t0) / epochs


def speed_rows(cell, epochs: int) -> tuple[list[dict], dict]:
    """images/s, FLOPs per image and GFLOP/s of: an indexing epoch, a retrieval epoch, a dual-encoder epoch and a
    top-10 query; and the split of a retrieval epoch's seconds into training and its two per-epoch checks."""
    recipe, rows = cell.recipe, []
    model = ViTDSI(cli.model_config(cell.a, max(map(len, cell.idb_ids)) + 2)).to(cell.device)
    idb = cell.subset(cell.split.idb)
    pool, n_idb, _ = train.indexing_pool(cell, idb)
    trainer = engine.make_trainer(model, recipe, recipe.lr, 1, 1, cell.device, cell.bf16,
                                  schedule=lambda step: 0.0)              # lr 0: the weights stay, every epoch alike
    order = torch.arange(n_idb)
    index_epoch = lambda: engine.run_epoch(trainer, pool, order, recipe.batch_size)   # noqa: E731
    rows.append(("indexing epoch", n_idb, timed_epochs(index_epoch, epochs),
                 flops_per_image(index_epoch, n_idb)))
    rng = np.random.default_rng(0)
    val = train.validation_set(cell, rng)
    rpool, n_q, _ = train.retrieval_pool(cell, rng)
    rorder = engine.epoch_order(n_q, round(recipe.index_mix * n_q), n_idb, cell.gen)
    ret_epoch = lambda: engine.run_epoch(trainer, rpool, rorder, recipe.batch_size)   # noqa: E731
    train_s = timed_epochs(ret_epoch, epochs)
    rows.append(("retrieval epoch (training)", len(rorder), train_s, flops_per_image(ret_epoch, len(rorder))))
    validate_s = timed_epochs(lambda: train.validate(cell, model, val), epochs)
    whole_s = timed_epochs(lambda: train.index_whole(cell, model, 0.0), epochs)
    dual = de.DualEncoder(model.config).to(cell.device)
    anchors, positive = de.anchors_and_positives(cell)
    de_trainer = engine.make_trainer(dual, recipe, 0.0, 1, 1, cell.device, cell.bf16)
    de_epoch = lambda: de.train_epoch(cell, dual, de_trainer, anchors, positive, idb, torch.Generator())   # noqa: E731
    rows.append(("dual-encoder epoch", len(anchors), timed_epochs(de_epoch, epochs),
                 flops_per_image(de_epoch, len(anchors))))
    test = cell.subset(cell.split.test)
    query = lambda: engine.rank_dsi(model, test, cell.trie, 10, None, cell.device)   # noqa: E731
    rows.append(("top-10 query (beam search)", len(test), timed_epochs(query, epochs), flops_per_image(query, len(test))))
    split = {"training": train_s, "validation loss + MAP@10 (every epoch)": validate_s,
             "IDB IA@1 check (an epoch that would be kept)": whole_s}
    return [{"work": w, "images": n, "s": t, "images/s": n / t, "GFLOP/image": f / 1e9, "GFLOP/s": f * n / t / 1e9}
            for w, n, t, f in rows], split


def speed_main(a: argparse.Namespace) -> int:
    """`--speed`: the main command's model and data (built-in set, db 512, clustered), timed piece by piece."""
    args = cli.build_parser().parse_args(["--db-size", str(a.db_size), "--ids", a.ids, "--seed", str(a.seeds[0])])
    log = Log(quiet=True)
    cell = train.make_cell(args, cli.load_images(args, args.db_size, log), args.db_size, args.ids, log)
    rows, split = speed_rows(cell, a.speed_epochs)
    c = cell.a
    n = (c.image_size // c.patch_size) ** 2 * cell.recipe.batch_size         # B*N rows of one batch
    shapes = [(n, c.dim, 3 * c.dim), (n, c.dim, c.mlp_dim), (n, c.mlp_dim, c.dim), (n, c.dim, c.dim)]
    peak = {"bf16": matmul_gflops(shapes, torch.bfloat16), "fp32": matmul_gflops(shapes, torch.float32)}
    arithmetic = "bf16 autocast" if cell.bf16 else "fp32"
    lines = [f"Speed of the main command's pieces ({arithmetic}, {torch.get_num_threads()} threads, batch {cell.recipe.batch_size}):", "",
             "| work | images | s | images/s | GFLOP per image | GFLOP/s | share of bare bf16 / fp32 matmul |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['work']} | {r['images']} | {r['s']:.2f} | {r['images/s']:.1f} | {r['GFLOP/image']:.3f} | "
                     f"{r['GFLOP/s']:.0f} | {100 * r['GFLOP/s'] / peak['bf16']:.1f} % / "
                     f"{100 * r['GFLOP/s'] / peak['fp32']:.1f} % |")
    lines += ["", f"Bare matmuls of the model's shapes ((B*N, D) x (D, 3D), (D, MLP), (MLP, D), (D, D); B*N = {n}): "
              f"bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s.", "",
              "A retrieval epoch's seconds: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    return 0


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
    p.add_argument("--latency", action="store_true", help="time each search against IDB size instead (no training)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048, 8192], help="IDB sizes of --latency")
    p.add_argument("--queries", type=int, default=64, help="query images per timed batch of --latency")
    p.add_argument("--grow", action="store_true",
                   help="measure growing an index instead: 75 %% indexed, + 25 %% in 1 and in 5 steps, vs the whole "
                        "IDB from scratch (zero-shot; extra flags such as --replay go to train.py and to the steps)")
    p.add_argument("--reuse", action="store_true",
                   help="--grow: take the from-scratch and 75 %% index runs from --out when they hold a finished run "
                        "of the same train.py flags, and train only the additions")
    p.add_argument("--speed", action="store_true",
                   help="time the main command's pieces instead: images/s, FLOPs per image (torch's flop counter) "
                        "and GFLOP/s of indexing, a retrieval epoch, the dual encoder and a top-10 query, beside bare "
                        "bf16 and fp32 matmuls of the model's shapes (no full training)")
    p.add_argument("--speed-epochs", type=int, default=2, help="--speed: timed repeats of each piece, after one")
    a, extra = p.parse_known_args()
    if a.speed:
        return speed_main(a)
    if a.latency:
        return latency_main(a)
    if a.grow:
        try:
            return grow_main(a, extra)
        except (UsageError, sources.DataError) as e:   # e.g. random IDs with no digit left for the additions
            raise SystemExit(f"error: {e}") from None
    roots = ([] if a.no_synthetic else [None]) + ([a.data_root] if a.data_root else [])
    if not roots:
        p.error("--no-synthetic needs --data-root: nothing to run")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    runs = []
    for root in roots:
        for recipe in a.recipes:
            rows = [run_one(recipe, root, seed, a, extra) for seed in a.seeds]
            runs += [(r["data"], r["seed"], r["out"]) for r in rows if r["recipe"] == "fast" and r["fine-tuned P@10"] is not None]
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
