"""The dual-encoder baseline: its loss on hand-worked cases, exact ranking, and learning a tiny set."""
import dataclasses
import math

import numpy as np
import torch

import train
from de import DualEncoder, info_nce, rank_cosine
from vitdsi import ViTDSI, ViTDSIConfig

TINY = ViTDSIConfig(image_size=32, patch_size=8, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.0, max_len=2)


def test_info_nce_by_hand():
    anchors = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # cosines 1 and 0 at temperature 1: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    one = info_nce(anchors, candidates, torch.tensor([[True, False]]), temperature=1.0)
    assert math.isclose(one.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    both = info_nce(anchors, candidates, torch.tensor([[True, True]]), temperature=1.0)
    assert abs(both.item()) < 1e-6                          # every candidate relevant: nothing to push apart
    wrong = info_nce(anchors, candidates, torch.tensor([[False, True]]), temperature=1.0)
    assert math.isclose(wrong.item(), math.log(1 + math.exp(1)), rel_tol=1e-6)


def test_rank_cosine_is_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    db = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    positions, scores = rank_cosine(q, db, 7)
    expected = np.argsort(-(q @ db.T).numpy(), axis=1, kind="stable")[:, :7]
    assert (positions.numpy() == expected).all()
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert rank_cosine(q, db, 100)[0].shape == (5, 20)    # k above n gives the whole database


def test_embeddings_are_unit_vectors_from_the_dsi_encoder():
    model = DualEncoder(TINY)
    e = model(torch.randn(3, 3, 32, 32))
    assert e.shape == (3, 32) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # the same encoder as the DSI's: every encoder weight of a ViTDSI, same name and shape, plus the projection
    dsi = {k: v.shape for k, v in ViTDSI(TINY).state_dict().items() if k.startswith("encoder.")}
    de = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("project.")}
    assert de == dsi
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():   # pooling the DSI's own encode() of these weights gives the embedding
        dsi_model = ViTDSI(TINY).eval()
        dsi_model.load_state_dict(model.state_dict(), strict=False)
        pooled = dsi_model.encode(images).mean(dim=1)
        assert torch.allclose(model(images), torch.nn.functional.normalize(model.project(pooled), dim=1), atol=1e-6)


def test_a_dual_encoder_starts_from_the_encoder_of_a_dsi_of_the_same_seed():
    config = dataclasses.replace(TINY, depth=2, pos_encoding="learned")
    torch.manual_seed(3)
    dual = DualEncoder(config).eval()
    torch.manual_seed(3)
    vit = ViTDSI(config).eval()
    dual_weights, vit_weights = dual.encoder.state_dict(), vit.encoder.state_dict()
    assert list(dual_weights) == list(vit_weights)
    assert all(torch.equal(dual_weights[k], vit_weights[k]) for k in vit_weights)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dual.encoder(images), vit.encode(images))


def test_a_tiny_database_is_learned():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32)
    model = DualEncoder(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):   # each image its own class: the embeddings must come apart
        e = model(images)
        loss = info_nce(e, e, torch.eye(8, dtype=torch.bool))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        e = model(images)
    assert (rank_cosine(e, e, 1)[0].flatten() == torch.arange(8)).all()
    assert loss.item() < 0.5


def test_the_de_row_has_the_same_columns_and_leaves_the_dsi_alone(tmp_path):
    tiny = ["--db-size", "64", "--image-size", "32", "--patch-size", "8", "--dim", "32", "--mlp-dim", "64",
            "--depth", "1", "--heads", "2", "--index-epochs", "3", "--retrieval-epochs", "2", "--bovw-k", "16",
            "--quiet", "--threads", "1"]
    assert train.main(tiny + ["--models", "dsi", "--out", str(tmp_path / "a")]) == 0
    assert train.main(tiny + ["--models", "dsi", "de", "--out", str(tmp_path / "b")]) == 0
    import json
    a = json.loads((tmp_path / "a" / "results.json").read_text())["rows"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    timing = ("train_seconds", "query_ms", "index_seconds_per_epoch", "index_images_per_s", "retrieval_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(b[:len(a)]) == strip(a)                    # the DSI rows do not depend on the DE
    de = b[-1]
    assert de["model"] == "ViT dual encoder" and de["IA@1"] == 1.0
    assert {"P@10", "MAP@10", "Recall@10", "Recall@100", "train_seconds", "query_ms"} <= set(de)
