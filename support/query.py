"""Query mode: look images up in a trained index.

    python train.py --checkpoint runs/X/checkpoint.pt --query photo.jpg --top-k 10

prints, per image, the ranked IDs with their log-probabilities and the indexed image each ID stands for.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import data
from support import sources, store
from support.run import UsageError, pick_device
from vitdsi import IDTrie


def query_mode(a: argparse.Namespace) -> None:
    model, ckpt = store.load_checkpoint(a.checkpoint)
    device = pick_device(a.device)
    model.to(device)
    size = model.config.image_size
    images = []
    for path in a.query:
        if not os.path.isfile(path):
            raise UsageError(f"query image '{path}' not found: pass existing image files")
        try:
            # A query is any photo: crop and resize it, never reject it for its aspect ratio.
            images.append(sources.read_image(path, size, aspect_range=None))
        except sources.UnreadableImage:
            raise UsageError(f"cannot decode '{path}' as an image: pass a JPEG/PNG/BMP file") from None
    x = data.images_to_tensor(np.stack(images))
    trie = IDTrie(store.live_ids(ckpt))
    ref_of = dict(zip(ckpt["ids"], ckpt["idb_refs"]))
    with torch.no_grad():
        results = model.generate(data.normalize(x.to(device)), trie, k=a.top_k, beam=a.beam)
    for path, hyps in zip(a.query, results):
        print(f"{path}:")
        for rank, (id_str, score) in enumerate(hyps, 1):
            print(f"  {rank:3d}. ID {id_str}  log-prob {score:8.3f}  -> {ref_of[id_str]}")
