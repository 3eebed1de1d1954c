"""Checkpoints and outputs: every file a run writes, each written whole or not at all.

A checkpoint is one dict (weights, optimiser state, config, arguments, epoch, ID map, IDB references),
tensors and plain data only, read back with `torch.load(..., weights_only=True)`; `load_checkpoint`
rebuilds the model from it alone. `write_results` writes a run's results.json and results.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import IO

import torch

import data
from support import cli
from support.run import Cell, UsageError
from support.sources import printable
from vitdsi import ViTDSI, ViTDSIConfig

def atomic_write(path: str, write: Callable[[IO], None], text: bool = False) -> None:
    """Write a file whole or not at all: `write(f)` fills a temporary file in the same folder, which then
    takes the place of `path` in one rename (os.replace is atomic within a file system). A reader never
    sees half a file, and a write that fails leaves the previous file as it was and no temporary behind."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb", encoding="utf-8" if text else None) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())   # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        failed = e.__context__ if isinstance(e, RuntimeError) else None
        if isinstance(failed, OSError):   # torch.save reports a failed write (a full disk) as a RuntimeError
            raise OSError(failed.errno, failed.strerror, path) from None
        raise


# Bump when the checkpoint's layout changes: a file of another version is refused with both numbers, except
# those that `upgrade_weights` reads (older names of the same weights).
CHECKPOINT_VERSION = 3
READABLE_VERSIONS = (2, 3)
CHECKPOINT_KEYS = ("model", "config", "args", "ids", "idb_refs", "ids_scheme", "class_names", "idb_classes",
                   "prefix_width", "removed", "held_out")   # what query mode, --add and --remove need


def save_checkpoint(path: str, model: ViTDSI, optimizer: torch.optim.Optimizer, config: ViTDSIConfig,
                    a: argparse.Namespace, epoch: int, index_catalogue: dict) -> None:
    """One dict with everything needed to rebuild the model, answer queries and grow the index
    (`index_catalogue`: see `catalogue`).

    Only tensors and plain data (dict, list, tuple, str, int, float, bool, None), so that
    `torch.load(..., weights_only=True)` reads it back without running any code from the file."""
    ckpt = {"format_version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": asdict(config), "args": vars(a), "epoch": epoch, "seed": a.seed,
            "aspect_range": list(a.aspect_range), **index_catalogue}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def live_ids(ckpt: dict) -> list[str]:
    """The IDs decoding may write: every indexed ID but those hidden by --remove. Everything that builds
    the trie from a checkpoint builds it from these, so a removed ID is never returned."""
    removed = set(ckpt["removed"])
    return [i for i in ckpt["ids"] if i not in removed]


def torch_load_error(e: Exception) -> str:
    """The line of a torch.load error that says what is wrong; the weights-only unpickler puts it
    after "WeightsUnpickler error:", below advice to load the file unsafely, which we never do."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". Please use")[0] if lines else type(e).__name__


def load_versioned(path: str, what: str, version: int, fix: str, unversioned: str = "",
                   version_fix: str | None = None, readable: tuple[int, ...] = ()) -> dict:
    """A dict that this project saved as `what` (checkpoint or resume state) of format `version`, read with
    weights_only=True: the unpickler builds tensors and plain containers only, so a crafted file that
    would run code is refused before any of it runs. Anything else is a UsageError ending in `fix`."""
    try:
        with warnings.catch_warnings():    # torch warns about foreign pickles; the error below says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file torch cannot read safely, whatever it is: one line, exit 2
        raise UsageError(f"'{path}' is not a vit-dsi {what} (the safe loader refused it: {torch_load_error(e)}); "
                         f"{fix}") from None
    if not isinstance(loaded, dict) or "format_version" not in loaded:
        raise UsageError(f"'{path}' has no format_version: not a vit-dsi {what}{unversioned}; {fix}")
    if loaded["format_version"] != version and loaded["format_version"] not in readable:
        kind = "checkpoint of format version" if what == "checkpoint" else f"{what} of version"
        raise UsageError(f"'{path}' is a {kind} {loaded['format_version']}, this train.py reads version "
                         f"{version}; {version_fix or fix}")
    return loaded


def state_dict_mismatch(expected: dict, found: dict) -> str | None:
    """The first difference between a model's state_dict and a checkpoint's, in words; None if they fit."""
    if not isinstance(found, dict):
        return f"its weights are a {type(found).__name__}, not a state_dict"
    for name, tensor in expected.items():
        if name not in found:
            return f"it lacks the parameter '{name}'"
        if not isinstance(found[name], torch.Tensor) or found[name].shape != tensor.shape:
            shape = tuple(found[name].shape) if isinstance(found[name], torch.Tensor) else type(found[name]).__name__
            return f"its parameter '{name}' has shape {shape}, the config gives {tuple(tensor.shape)}"
    unknown = sorted(set(found) - set(expected))
    return f"it has a parameter '{unknown[0]}' that this model lacks" if unknown else None


def upgrade_weights(weights: dict, version: int) -> dict:
    """A checkpoint's weights under today's names. Format 2 kept the encoder's parts at the top of the model
    (patch_embedding, encoder_pos, encoder.<i>, encoder_norm); format 3 holds them in one `Encoder`."""
    if version >= 3:
        return weights
    def renamed(key: str) -> str:
        for old, new in (("patch_embedding.", "encoder.patch_embedding."), ("encoder_pos.", "encoder.pos."),
                         ("encoder_norm.", "encoder.norm.")):
            if key.startswith(old):
                return new + key[len(old):]
        return re.sub(r"^encoder\.(\d+)\.", r"encoder.blocks.\1.", key)
    return {renamed(k): v for k, v in weights.items()}


def checked_config(shown: str, config, retrain: str) -> ViTDSIConfig:
    """The model config of the checkpoint `shown`, once it has this version's fields and passes the rules of the
    flags that made it (support/cli.py: types, ranges, relations, bounds that keep a crafted file from allocating
    without limit); anything else is a UsageError naming the field and ending in `retrain`."""
    config = config if isinstance(config, dict) else {}
    differ = sorted(map(str, set(config) ^ {f.name for f in fields(ViTDSIConfig)}))   # fields on one side only
    if differ:
        raise UsageError(f"'{shown}' has a model config that differs from this version's in the field "
                         f"'{printable(differ[0])}'; {retrain}")
    problem = cli.config_problem(config)
    if problem is None:
        try:
            return ViTDSIConfig(**config)
        except (ValueError, TypeError) as e:      # a check of ViTDSIConfig's that the rules lack
            problem = str(e)
    raise UsageError(f"'{shown}' has an invalid model config: its {printable(problem)}; {retrain}")


def load_checkpoint(path: str) -> tuple[ViTDSI, dict]:
    """Rebuild the model from a checkpoint.pt; any file that is not one of this version is a UsageError.

    weights_only=True: the unpickler builds tensors and plain containers only, so a crafted file that
    would run code when unpickled is refused before any of it runs."""
    retrain, shown = "pass a checkpoint.pt written by this version of train.py, or retrain", printable(path)
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{shown}' not found: pass the checkpoint.pt written by a training run")
    ckpt = load_versioned(path, "checkpoint", CHECKPOINT_VERSION, retrain,
                          unversioned=", or one older than versioned checkpoints", readable=READABLE_VERSIONS)
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise UsageError(f"'{shown}' lacks the checkpoint field '{missing[0]}'; {retrain}")
    config = checked_config(shown, ckpt["config"], retrain)
    if isinstance(ckpt["model"], dict):
        ckpt["model"] = upgrade_weights(ckpt["model"], ckpt["format_version"])
        ckpt["format_version"] = CHECKPOINT_VERSION
    with torch.device("meta"):          # shapes only, no memory: the weights must fit before any is allocated
        mismatch = state_dict_mismatch(ViTDSI(config).state_dict(), ckpt["model"])
    if mismatch:
        raise UsageError(f"'{shown}' does not fit its own model config: {mismatch}; {retrain}")
    model = ViTDSI(config)
    ids, refs, classes = ckpt["ids"], ckpt["idb_refs"], ckpt["idb_classes"]
    if not (isinstance(ids, list) and isinstance(refs, list) and isinstance(classes, list)
            and 0 < len(ids) == len(refs) == len(classes) == len(set(ids))
            and all(isinstance(i, str) and i.isdigit() for i in ids)):
        raise UsageError(f"'{shown}' has a broken ID map (ids, idb_refs and idb_classes must be equally long "
                         f"lists, the ids distinct digit strings); {retrain}")
    if max(map(len, ids)) + 2 > config.max_len:     # BOS, digits, EOS
        raise UsageError(f"'{shown}' has {max(map(len, ids))}-digit IDs, longer than its model config's "
                         f"max_len {config.max_len} lets the decoder write; {retrain}")
    removed = ckpt["removed"]
    if not (isinstance(removed, list) and all(isinstance(i, str) for i in removed) and set(removed) < set(ids)
            and isinstance(ckpt["args"], dict)):
        raise UsageError(f"'{shown}' has a broken list of removed IDs (it must name some, not all, of its IDs) "
                         f"or run arguments; {retrain}")
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def catalogue(cell: Cell) -> dict:
    """What a checkpoint says about its index, beside the weights: each indexed image's ID, reference and
    class; the class names (an added ImageFolder class is matched by name); the clustered prefix width
    (the class part of an ID); IDs hidden by --remove; and the images that --index-hold-out left out."""
    imageset, idb = cell.imageset, cell.split.idb
    return {"ids": cell.idb_ids, "idb_refs": [imageset.refs[i] for i in idb], "ids_scheme": cell.ids,
            "db_size": cell.db_size, "class_names": list(imageset.class_names),
            "idb_classes": [int(c) for c in imageset.primary[idb]],
            "prefix_width": data.clustered_prefix_width(imageset.primary[idb]) if cell.ids == "clustered" else 0,
            "removed": [], "held_out": [imageset.refs[i] for i in cell.held_out]}


# Numbers quoted from the paper for the one cell our protocol reproduces (ImageNet, 512, clustered).
PAPER = {("ViT DSI", "zero-shot", 512, "clustered"): {"IA@1": 0.83},
         ("ViT DSI", "fine-tuned", 512, "clustered"): {"IA@1": 0.41}}
COLUMNS = ["IA@1", "IA@5", "MAP@10", "P@10", "Recall@10", "Recall@100", "train_seconds", "query_ms"]


def results_markdown(rows: list[dict], header: str) -> str:
    """Table-1-style markdown; the paper's numbers beside ours where the protocol matches."""
    fmt = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) and v <= 1 else f"{v:g}")  # noqa: E731
    lines = [f"# Results: {header}", "",
             "| model | variant | db size | ids | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['db_size']} | {r['ids']} | "
                     + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    paper = [(k, v) for k, v in PAPER.items() if any((r["model"], r["variant"], r["db_size"], r["ids"]) == k
                                                     for r in rows)]
    if paper and rows and rows[0].get("dataset") == "imagenet":
        lines += ["", "Paper (Di Stefano, Table 1), same cell:", ""]
        lines += [f"- {m} {v}, db {d}, {i}: " + ", ".join(f"{c} {x:.2f}" for c, x in vals.items())
                  for (m, v, d, i), vals in paper]
    lines += ["", "IA = indexing accuracy over all IDB images; MAP@10, P@10, Recall@k over all test queries "
              "with at least one relevant IDB image (metrics.py). train_seconds: BoVW = vocabulary + index; "
              "zero-shot = indexing; fine-tuned = indexing + retrieval. query_ms: mean per test query, "
              "ranking of 100."]
    return "\n".join(lines) + "\n"


def write_report(out: str, stem: str, payload: dict, markdown: str) -> None:
    """OUT/<stem>.json and OUT/<stem>.md, each written whole or not at all."""
    atomic_write(os.path.join(out, f"{stem}.json"), lambda f: json.dump(payload, f, indent=2), text=True)
    atomic_write(os.path.join(out, f"{stem}.md"), lambda f: f.write(markdown), text=True)


def write_results(out: str, rows: list[dict], header: str, extra: dict) -> str:
    """A training run's results.json (its rows, then `extra`) and results.md (the table); returns the table."""
    table = results_markdown(rows, header)
    write_report(out, "results", {"rows": rows, **extra}, table)
    return table


def index_info(indexed: dict, n_idb: int) -> dict:
    """The indexing phase's numbers that every DSI row carries (the zero-shot row: no retrieval epochs)."""
    return {"index_epochs": indexed["epochs"],
            "index_seconds_per_epoch": round(indexed["seconds"] / indexed["epochs"], 3),
            "index_images_per_s": round(n_idb * indexed["epochs"] / indexed["seconds"], 1),
            "retrieval_epochs": 0, "retrieval_epoch_kept": 0}
