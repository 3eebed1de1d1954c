"""Pictures of a run, drawn with Pillow alone: the training curves (paper Figures 1-3), and the sheet of what
each model retrieved for a few test queries (retrievals.png)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

import metrics
from support.run import Cell
from support.sheet import Block, Line, Tile, draw_sheet
from support.store import atomic_write


def draw_curves(curves: dict, path: str, title: str) -> None:
    """Paper Figures 1-3 with Pillow: indexing loss/accuracy, retrieval train/val loss and accuracy."""
    blue, red, green = (31, 119, 180), (214, 39, 40), (44, 160, 44)
    panels = [("indexing loss", [("train", curves.get("index_loss", []), blue)]),
              ("indexing exact-match accuracy", [("train", curves.get("index_acc", []), blue)]),
              ("retrieval loss", [("train", curves.get("ret_train_loss", []), blue),
                                  ("val", curves.get("ret_val_loss", []), red)]),
              ("retrieval exact match (the drawn relevant ID)", [("train", curves.get("ret_train_acc", []), blue),
                                                                 ("val", curves.get("ret_val_acc", []), red),
                                                                 ("val MAP@10", curves.get("ret_val_map", []), green)])]
    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (2 * w, 2 * h + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for n, (name, series) in enumerate(panels):
        x0, y0 = (n % 2) * w, 30 + (n // 2) * h
        box = (x0 + pad, y0 + 20, x0 + w - 15, y0 + h - pad)
        draw.rectangle(box, outline="black")
        draw.text((x0 + pad, y0 + 4), name, fill="black")
        values = [v for _, ys, _ in series for v in ys]
        if not values:
            draw.text((box[0] + 10, box[1] + 10), "(phase not run)", fill="gray")
            continue
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0
        n_max = max(len(ys) for _, ys, _ in series)
        draw.text((x0 + 2, box[1]), f"{hi:.2f}", fill="black")
        draw.text((x0 + 2, box[3] - 10), f"{lo:.2f}", fill="black")
        draw.text((box[0], box[3] + 4), "epoch 1", fill="black")
        draw.text((box[2] - 50, box[3] + 4), f"epoch {n_max}", fill="black")
        for k, (label, ys, colour) in enumerate(series):
            pts = [(box[0] + (box[2] - box[0]) * (i / max(1, n_max - 1)),
                    box[3] - (box[3] - box[1]) * (v - lo) / (hi - lo)) for i, v in enumerate(ys)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            elif pts:
                draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
            draw.text((box[2] - 60, box[1] + 5 + 12 * k), label, fill=colour)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def sheet_queries(n_test: int, n: int, seed: int) -> np.ndarray:
    """Positions (sorted) of the `n` test queries a sheet shows, drawn with the run's seed."""
    return np.sort(np.random.default_rng(seed).choice(n_test, size=min(n, n_test), replace=False))


def draw_retrievals(cell: Cell, path: str, n: int) -> None:
    """retrievals.png: `n` test queries, each with every model's top 10 (as `score_row` recorded them in
    `cell.finished["rankings"]`), a thumbnail framed green when relevant and red when not, its ID beneath,
    and the model's P@10 for that query at the line's left."""
    rankings, split, imageset = cell.finished.get("rankings", {}), cell.split, cell.imageset
    if not n or not rankings or not len(split.test):
        return
    relevants = cell.relevant(split.test)
    idb_image = {id_str: imageset.images[i] for id_str, i in zip(cell.idb_ids, split.idb)}
    blocks = []
    for q in sheet_queries(len(split.test), n, cell.a.seed).tolist():
        lines = []
        for label, ranked in rankings.items():
            top, relevant = ranked[q][:10], relevants[q]
            tiles = [Tile(idb_image[i], f"ID {i}", i in relevant) for i in top]
            lines.append(Line(f"{label}\nP@10 {metrics.precision_at_k(top, relevant, 10):.2f}", tiles))
        name = imageset.class_names[imageset.primary[split.test[q]]]
        blocks.append(Block(imageset.images[split.test[q]], f"test query {q} ({name})", lines))
    sheet = draw_sheet(blocks, title=f"{cell.a.dataset} db {cell.db_size} ids {cell.ids} seed {cell.a.seed}: "
                                     f"top 10 of each model, green = relevant")
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))
