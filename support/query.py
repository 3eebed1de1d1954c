"""Query mode: look images up in a trained index.

    python train.py --checkpoint runs/X/checkpoint.pt --query photo.jpg --top-k 10 [--sheet query.png] [--explain]

prints, per image, the ranked IDs with their log-probabilities and the indexed image each ID stands for, then
draws them: query.png (or --sheet PATH), one block per query image, its top-k answers (10 at most) as
thumbnails of the indexed images, captioned "ID  log-prob" (support/sheet.py; relevance is unknown, so every
frame is neutral grey). An indexed image that cannot be read back (a file moved or deleted since training)
becomes a grey tile and one note, never an error. --explain prints the beam search that ranked the first
query image, step by step (`explain_lines`, from the trace `ViTDSI.generate` records).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import data
from support import sheet, sources, store
from support.run import UsageError, pick_device
from vitdsi import IDTrie

SHOWN_PREFIXES = 5   # --explain: live hypotheses shown per step (the rest counted)
SHOWN_OPTIONS = 4    # --explain: next tokens shown per hypothesis, best first (the rest counted)


def query_mode(a: argparse.Namespace) -> None:
    sheet_path = a.sheet or "query.png"
    check_sheet_path(sheet_path)                      # before any work: a bad --sheet costs no model load
    model, ckpt = store.load_checkpoint(a.checkpoint)
    device = pick_device(a.device)
    model.to(device)
    size = model.config.image_size
    images = read_queries(a.query, size)           # (Q, S, S, 3) uint8
    x = data.images_to_tensor(images)
    trie = IDTrie(store.live_ids(ckpt))
    ref_of = dict(zip(ckpt["ids"], ckpt["idb_refs"]))
    trace = [] if a.explain else None
    with torch.no_grad():
        results = model.generate(data.normalize(x.to(device)), trie, k=a.top_k, beam=a.beam, trace=trace)
    for path, hyps in zip(a.query, results):
        print(f"{path}:")
        for rank, (id_str, score) in enumerate(hyps, 1):
            print(f"  {rank:3d}. ID {id_str}  log-prob {score:8.3f}  -> {ref_of[id_str]}")
    write_sheet(sheet_path, a.query, images, results, ref_of, ckpt, size)
    print(f"sheet: {sheet_path}")
    if trace is not None:
        beam = a.top_k if a.beam is None else max(a.beam, a.top_k)     # as generate widens it
        for line in explain_lines(trace, a.top_k, beam, name=a.query[0], others=len(a.query) - 1):
            print(line)


def check_sheet_path(path: str) -> None:
    """--sheet must name a file (new, or an existing regular file, which is replaced) in a writable folder."""
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UsageError(f"--sheet '{path}' is not a file name; pass a path such as "
                         f"{os.path.join(path or '.', 'query.png')}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f"--sheet '{path}' exists and is not a regular file; pass another path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--sheet '{path}': folder '{folder}' does not exist; create it or pass another --sheet")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--sheet '{path}': folder '{folder}' is not writable; pass another --sheet")


def read_queries(paths: list[str], size: int) -> np.ndarray:
    """The query images (Q, S, S, 3) uint8: any photo is cropped and resized, never rejected for its aspect."""
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"query image '{path}' not found: pass existing image files")
        try:
            images.append(sources.read_image(path, size, aspect_range=None))
        except sources.UnreadableImage:
            raise UsageError(f"cannot decode '{path}' as an image: pass a JPEG/PNG/BMP file") from None
    return np.stack(images)


# ----------------------------------------------------------------------------------------------------------
# The sheet

def indexed_images(refs: list[str], ckpt: dict, size: int) -> dict[str, np.ndarray | None]:
    """The indexed images that `refs` name, read back as the run read them: ref -> (S, S, 3) uint8, or None
    where that is impossible (a file gone or unreadable). Only these refs are read, each once: the synthetic
    ones in one call ("synthetic:<p>" draws the built-in set of the run's dataset, seed and aspect range
    again), the files one by one, so that one missing file costs one grey tile, not the sheet."""
    args = ckpt["args"]
    how = dict(dataset=args.get("dataset", "synthetic"), seed=ckpt.get("seed", args.get("seed", 0)),
               aspect_range=ckpt.get("aspect_range", args.get("aspect_range", sources.DEFAULT_ASPECT_RANGE)))
    unique = list(dict.fromkeys(refs))
    synthetic = [ref for ref in unique if ref.startswith("synthetic:")]
    found: dict[str, np.ndarray | None] = {}
    if synthetic:
        try:
            found.update(zip(synthetic, sources.read_refs(synthetic, size, **how)))
        except sources.DataError:
            found.update(dict.fromkeys(synthetic))
    for ref in unique:
        if ref not in found:
            try:
                found[ref] = sources.read_refs([ref], size, **how)[0]
            except sources.DataError:      # gone (DataError) or undecodable (UnreadableImage, a DataError)
                found[ref] = None
    return found


def sheet_blocks(paths: list[str], images: np.ndarray, results: list[list[tuple[str, float]]],
                 ref_of: dict[str, str], ckpt: dict, size: int) -> tuple[list[sheet.Block], list[str]]:
    """One Block per query (caption: its file name) with one "DSI" line of its top answers (at most
    sheet.MAX_TILES), each the indexed image its ID stands for; and the refs that could not be read."""
    answers = [hyps[:sheet.MAX_TILES] for hyps in results]
    pictures = indexed_images([ref_of[id_str] for hyps in answers for id_str, _ in hyps], ckpt, size)
    blocks = [sheet.Block(image, os.path.basename(path),
                          [sheet.Line("DSI", [sheet.Tile(pictures[ref_of[id_str]], f"{id_str}  {score:.2f}")
                                              for id_str, score in hyps])])
              for path, image, hyps in zip(paths, images, answers)]
    return blocks, [ref for ref, picture in pictures.items() if picture is None]


def write_sheet(path: str, paths: list[str], images: np.ndarray, results: list[list[tuple[str, float]]],
                ref_of: dict[str, str], ckpt: dict, size: int) -> None:
    """Draw the answers' sheet to `path` (whole or not at all), with one note if some images were missing."""
    blocks, unread = sheet_blocks(paths, images, results, ref_of, ckpt, size)
    if unread:
        what = "1 indexed image" if len(unread) == 1 else f"{len(unread)} indexed images"
        example = unread[0] if unread[0].isprintable() else ascii(unread[0])[1:-1]   # the note stays one line
        print(f"note: {what} could not be read (e.g. '{example}'); drawn grey")
    picture = sheet.draw_sheet(blocks)
    store.atomic_write(path, lambda f: picture.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------------
# --explain

def _more(shown: list[str], total: int) -> str:
    """Items joined by ", ", then how many were left out."""
    return ", ".join(shown) + (f" … and {total - len(shown)} more" if total > len(shown) else "")


def _ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th"."""
    return f"{n}" + ("th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th"))


def _prefix_line(prefix: str, score: float, options: list[tuple[str, float, float]], alive: set[str]) -> str:
    """One live hypothesis: its digits and score, then the tokens the trie allows next with their log-probs,
    best first; "*" marks an extension that survives into the next step."""
    cells = [f"{token} {logp:.2f}{'*' if token != 'EOS' and prefix + token in alive else ''}"
             for token, logp, _ in options[:SHOWN_OPTIONS]]
    rest = f"  (+{len(options) - SHOWN_OPTIONS} more)" if len(options) > SHOWN_OPTIONS else ""
    return f"  {prefix or '(start)':>8} {score:7.2f} | " + "  ".join(cells) + rest


def _step_lines(step: dict, pool: list[tuple[str, float]], k: int, beam: int) -> list[str]:
    """What one traced step did; `pool` (the k best finished IDs so far) is updated in place."""
    t, prefixes = step["step"], step["prefixes"]
    alive = {prefix for prefix, _ in step["survivors"]}
    lines = [f"step {t + 1}: {len(prefixes)} live prefix{'es' if len(prefixes) != 1 else ''} of {t} "
             f"digit{'s' if t != 1 else ''}, best first; next token (digit or EOS) and its log-prob:"]
    for (prefix, score), options in list(zip(prefixes, step["options"]))[:SHOWN_PREFIXES]:
        lines.append(_prefix_line(prefix, score, options, alive))
    if len(prefixes) > SHOWN_PREFIXES:
        lines.append(f"  … and {len(prefixes) - SHOWN_PREFIXES} more")
    pool[:] = sorted(pool + step["finished"], key=lambda f: -f[1])[:k]
    kept = {id_str for id_str, _ in pool}
    if step["finished"]:
        shown = [f"{i} {s:.2f}{'' if i in kept else ' (out)'}" for i, s in step["finished"][:SHOWN_PREFIXES]]
        lines.append("  finished (EOS): " + _more(shown, len(step["finished"])))
    digits = [total for options in step["options"] for token, _, total in options if token != "EOS"]
    bounded = len(pool) == k and bool(digits)
    below = sum(total < pool[-1][1] for total in digits) if bounded else 0
    if below:
        lines.append(f"  {below} continuation{'s' if below != 1 else ''} below {pool[-1][1]:.2f}, the "
                     f"{_ordinal(k)} finished ID's score, dropped: log-probs only fall, so never in the top {k}")
    if step["survivors"]:
        shown = [f"{p} {s:.2f}" for p, s in step["survivors"][:SHOWN_PREFIXES]]
        lines.append(f"  survive ({len(step['survivors'])} of {len(digits) - below}, beam {beam}): "
                     + _more(shown, len(step["survivors"])))
    else:
        lines.append("  no hypothesis survives: the search ends here")
    return lines


def explain_lines(trace: list[dict], k: int, beam: int, name: str = "", others: int = 0) -> list[str]:
    """The beam search of one image, step by step, from the `trace` that `ViTDSI.generate(..., trace=[])`
    fills (see vitdsi._trace_step): per step the live prefixes, the tokens each may take next, the IDs that
    EOS finished, the hypotheses that survive; then the ranked IDs, the k best finished ones, which are
    what `generate` returns for that image. `others` = query images not explained."""
    also = f"; the first query image only, {others} more not explained" if others else ""
    lines = [f"explain '{name}': beam search, k {k}, beam {beam}{also}",
             "  log-probs are natural logs, a prefix's score their sum; * = this extension survives, "
             f"(out) = finished below the {k} best so far"]
    pool: list[tuple[str, float]] = []
    for step in trace:
        lines += _step_lines(step, pool, k, beam)
    lines.append(f"ranked ({len(pool)} ID{'s' if len(pool) != 1 else ''}, best first):")
    lines += [f"  {rank:3d}. ID {id_str}  log-prob {score:8.3f}" for rank, (id_str, score) in enumerate(pool, 1)]
    return lines
