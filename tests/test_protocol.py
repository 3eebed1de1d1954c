"""The experiment's protocol, tested by what must not matter: the test queries never reach training or the
choice of epoch, early stopping keeps (and restores) the best validation epoch, the retrieval pool pairs
each image with IDs that are really relevant to it, and PAD positions cost nothing.

Each test builds a tiny Cell (32 px synthetic images, one block each side, no indexing phase) and runs
the step of train.py it is about, for a few epochs, so that a whole retrieval phase is cheap to repeat.
"""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

import data
import train
from vitdsi import IDTrie, ViTDSI
from support import cli, engine, recipes, run, sources

TINY_MODEL = ["--image-size", "32", "--patch-size", "8", "--dim", "16", "--mlp-dim", "32", "--depth", "1",
              "--heads", "2", "--dropout", "0.0"]
DB_SIZE = 64   # split 0.25 / 0.75 x (0.8, 0.1, 0.1): IDB 16, queries train 38 / val 5 / test 5
# A short retrieval phase that exercises every recipe feature that could touch the queries: augmented
# views, index rehearsal, several targets per query; patience high enough that all epochs run.
# These models were never indexed, so no epoch would keep an index (keep_index; tested in test_train.py).
RECIPE = replace(recipes.RECIPES["fast"], batch_size=16, precision="fp32", retrieval_epochs=3, patience=10,
                 min_epochs=0, retrieval_targets=2, warmup_epochs=1, keep_index=False)


def tiny_cell(imageset: sources.ImageSet | None = None, **recipe_fields) -> run.Cell:
    """A fresh Cell over the first DB_SIZE synthetic images (fresh batch-order generator, empty curves)."""
    a = cli.build_parser().parse_args(TINY_MODEL + ["--db-size", str(DB_SIZE)])
    imageset = sources.make_synthetic(DB_SIZE, image_size=32, seed=0) if imageset is None else imageset
    split = data.split_dataset(imageset, DB_SIZE, a.index_fraction, seed=a.seed)
    idb_ids = data.assign_ids(imageset.primary[split.idb], "clustered")
    return run.Cell(a=a, recipe=replace(RECIPE, **recipe_fields), db_size=DB_SIZE, ids="clustered",
                      imageset=imageset, split=split, idb_ids=idb_ids, trie=IDTrie(idb_ids),
                      images=data.images_to_tensor(imageset.images), device=torch.device("cpu"), bf16=False,
                      gen=torch.Generator().manual_seed(a.seed), log=run.Log(quiet=True))


def tiny_model(cell: run.Cell, seed: int = 0) -> ViTDSI:
    torch.manual_seed(seed)
    return ViTDSI(cli.model_config(cell.a, max_len=max(map(len, cell.idb_ids)) + 2))


def changed(imageset: sources.ImageSet, part: str, what: str) -> sources.ImageSet:
    """A copy of the image set in which the queries of one split part (train, val or test) have other
    pixels ("images": each replaced by noise) or another class ("labels": class c -> the next class)."""
    split = data.split_dataset(imageset, DB_SIZE, 0.25, seed=0)
    positions = getattr(split, part)
    images, labels = imageset.images.copy(), list(imageset.labels)
    if what == "images":
        images[positions] = np.random.default_rng(1).integers(0, 256, images[positions].shape, dtype=np.uint8)
    else:   # relevance follows `labels`; `primary` stays, as it stratifies the split, which must not move
        for p in positions:
            labels[p] = frozenset((c + 1) % len(imageset.class_names) for c in labels[p])
    return replace(imageset, images=images, labels=labels)


def finetuned(imageset: sources.ImageSet, early_stop: str) -> dict:
    """Fine-tune a fresh tiny model; the weights, the validation curves and the epochs run and kept."""
    cell = tiny_cell(imageset, early_stop=early_stop)
    model = tiny_model(cell)
    result = train.finetune(cell, model)
    return {"weights": model.state_dict(), "curves": cell.curves, "epochs": result["epochs"],
            "best_epoch": result["best_epoch"]}


@pytest.fixture(scope="module")
def synthetic():
    return sources.make_synthetic(DB_SIZE, image_size=32, seed=0)


@pytest.fixture(scope="module")
def reference(synthetic):
    return {early_stop: finetuned(synthetic, early_stop) for early_stop in ("loss", "map")}


def same_weights(first: dict, second: dict) -> bool:
    return all(torch.equal(first[name], second[name]) for name in first)


# ---------------------------------------------------------------- the test queries stay unseen

@pytest.mark.parametrize("early_stop", ["loss", "map"])
@pytest.mark.parametrize("what", ["images", "labels"])
def test_test_queries_change_nothing_in_finetuning(synthetic, reference, early_stop, what):
    """Other test images or test labels leave the fine-tuned weights, every validation score and the epoch
    kept exactly as they were: the test queries are neither trained on nor used to choose the epoch."""
    run = finetuned(changed(synthetic, "test", what), early_stop)
    ref = reference[early_stop]
    assert run["curves"] == ref["curves"]                  # validation (and training) scores of every epoch
    assert (run["epochs"], run["best_epoch"]) == (ref["epochs"], ref["best_epoch"])
    assert same_weights(run["weights"], ref["weights"])


@pytest.mark.parametrize("part, curve", [("train", "ret_train_loss"), ("val", "ret_val_loss")])
def test_training_and_validation_queries_do_change_finetuning(synthetic, reference, part, curve):
    """The check above is not blind: changing the training queries changes the weights, changing the
    validation queries changes the validation scores."""
    run = finetuned(changed(synthetic, part, "labels"), "loss")
    assert run["curves"][curve] != reference["loss"]["curves"][curve]
    if part == "train":
        assert not same_weights(run["weights"], reference["loss"]["weights"])


# ---------------------------------------------------------------- what the retrieval phase trains on

def test_retrieval_pool_pairs_each_image_with_its_own_relevant_ids():
    """Queries first (the training queries that have a relevant IDB image, no validation or test query),
    then every IDB image; an IDB image's targets are its own ID G times, a query's are drawn from its
    relevant IDs, all of which come up over enough draws."""
    cell = tiny_cell(retrieval_targets=3)
    G = cell.recipe.retrieval_targets
    pool, n_q, n_idb = train.retrieval_pool(cell, np.random.default_rng(0))
    relevant = cell.relevant(cell.split.train)
    queries = [p for p, r in zip(cell.split.train, relevant) if r]
    assert (n_q, n_idb) == (len(queries), len(cell.split.idb))
    assert torch.equal(pool.images, cell.images[torch.as_tensor(np.concatenate([queries, cell.split.idb]))])
    assert pool.augmented.tolist() == [cell.recipe.augment] * n_q + [False] * n_idb   # rehearsal stays clean
    own = data.ids_to_tensor(cell.idb_ids)                                  # (n_idb, L)
    relevant_of_query = [r for r in relevant if r]
    drawn = [set() for _ in range(n_q)]
    everything = torch.arange(n_q + n_idb)
    for _ in range(30):
        targets = pool.targets(everything)                                  # (n_q + n_idb, G, L)
        assert targets.shape == (n_q + n_idb, G, own.shape[1])
        assert torch.equal(targets[n_q:], own.unsqueeze(1).expand(n_idb, G, -1))
        for e in range(n_q):
            ids = {data.decode_tokens(t) for t in targets[e]}
            assert ids <= relevant_of_query[e], (e, ids, relevant_of_query[e])
            drawn[e] |= ids
    assert drawn == relevant_of_query                                       # every relevant ID gets its turn


def test_validation_targets_are_relevant_to_their_query(monkeypatch):
    """The validation loss is scored against IDs relevant to each validation query (not to another one)."""
    cell = tiny_cell(retrieval_epochs=1)
    seen = {}

    def spy(cell, model, val):
        seen.update(val)
        return {"loss": 0.0, "acc": 0.0, "map": 0.0}
    monkeypatch.setattr(train, "validate", spy)
    train.finetune(cell, tiny_model(cell))
    relevant = [r for r in cell.relevant(cell.split.val) if r]
    assert seen["relevant"] == relevant
    assert torch.equal(seen["images"], cell.images[torch.as_tensor(
        [p for p, r in zip(cell.split.val, cell.relevant(cell.split.val)) if r])])
    for targets, rel in zip(seen["targets"], relevant):
        assert {data.decode_tokens(t) for t in targets} <= rel


# ---------------------------------------------------------------- early stopping keeps the best epoch

def toy_training(scores: list[float], patience: int, min_epochs: int = 0):
    """Train a toy model one step per epoch and hand `scores` to EarlyStopping as that epoch's validation
    score. Returns the stopper, the epoch it stopped at, and each epoch's weights and optimiser state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    stopper = engine.EarlyStopping(patience, min_epochs)
    saved = {}
    for epoch, score in enumerate(scores, start=1):
        loss = model(torch.randn(8, 3)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        saved[epoch] = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        if stopper.step(epoch, score, model, optimizer):
            break
    stopper.restore(model, optimizer)
    return stopper, epoch, saved, model, optimizer


@pytest.mark.parametrize("scores, best", [
    ([0.1, 0.4, 0.9, 0.3, 0.5, 0.2, 0.95], 3),    # peak in the middle; the later 0.95 comes after the stop
    ([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1),     # peak at the first epoch; the worst is the second
    ([-3.0, -2.0, -1.5, -1.0], 4),                # still improving when the epochs run out (-loss scores)
])
def test_early_stopping_restores_the_best_epoch(scores, best):
    patience = 3
    stopper, stopped, saved, model, optimizer = toy_training(scores, patience)
    assert stopper.best_epoch == best and stopper.best_score == scores[best - 1]
    assert stopped == min(best + patience, len(scores))
    weights, optimizer_state = saved[best]
    assert same_weights(model.state_dict(), weights)
    moments = optimizer.state_dict()["state"]
    for key, state in optimizer_state["state"].items():
        assert state["step"] == moments[key]["step"]
        assert torch.equal(state["exp_avg"], moments[key]["exp_avg"])
    if stopped != best:
        assert not same_weights(model.state_dict(), saved[stopped][0])   # restoring really moved the weights


def test_early_stopping_waits_min_epochs():
    scores = [0.9] + [0.1] * 9                     # best at once, then nothing better
    assert toy_training(scores, patience=2)[1] == 3
    stopper, stopped, _, _, _ = toy_training(scores, patience=2, min_epochs=6)
    assert stopped == 6 and stopper.best_epoch == 1


def test_patience_0_runs_every_epoch_and_keeps_the_best():
    scores = [0.2, 0.9, 0.1, 0.1, 0.1, 0.1, 0.3]   # the fast recipe's rule: the whole schedule, best kept
    stopper, stopped, saved, model, _ = toy_training(scores, patience=0)
    assert stopped == len(scores) and stopper.best_epoch == 2
    assert same_weights(model.state_dict(), saved[2][0])


@pytest.mark.parametrize("early_stop, scripted, best", [
    ("loss", [{"loss": 3.0, "map": 0.9}, {"loss": 1.0, "map": 0.1}, {"loss": 2.0, "map": 0.2},
              {"loss": 4.0, "map": 0.3}, {"loss": 0.5, "map": 0.4}], 2),
    ("map", [{"loss": 3.0, "map": 0.1}, {"loss": 1.0, "map": 0.2}, {"loss": 0.5, "map": 0.7},
             {"loss": 0.4, "map": 0.3}, {"loss": 0.3, "map": 0.2}], 3),
])
def test_finetune_keeps_the_epoch_with_the_best_validation_score(monkeypatch, early_stop, scripted, best):
    """finetune() with a scripted validation: it stops after `patience` epochs without improvement and
    gives back the weights the model had at the best epoch (lowest loss, or highest MAP@10), which are
    neither the first nor the last epoch's. The other score is scripted to point at another epoch."""
    cell = tiny_cell(early_stop=early_stop, retrieval_epochs=len(scripted), patience=2)
    model = tiny_model(cell)
    saved = []

    def scripted_validate(cell, model, val):
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"acc": 0.0, **scripted[len(saved) - 1]}
    monkeypatch.setattr(train, "validate", scripted_validate)
    result = train.finetune(cell, model)
    assert result["best_epoch"] == best and result["epochs"] == best + 2
    assert same_weights(model.state_dict(), saved[best - 1])
    assert not same_weights(model.state_dict(), saved[-1])


# ---------------------------------------------------------------- PAD positions cost nothing

def test_seq_loss_ignores_pad_positions():
    """Targets of different lengths padded with PAD: what the logits say at PAD positions, and how many PAD
    columns follow, change neither the loss nor the exact match."""
    torch.manual_seed(0)
    targets = data.ids_to_tensor(["12", "3", "456"])                     # (3, 5): "3" has one PAD
    logits = torch.randn(3, targets.shape[1] - 1, data.VOCAB_SIZE)       # (B, L-1, V)
    gold = targets[:, 1:]
    logits.scatter_(2, gold.unsqueeze(-1), 10.0)                         # every target token is the argmax
    logits[gold == data.PAD] = torch.randn(int((gold == data.PAD).sum()), data.VOCAB_SIZE)
    loss, hit = engine.seq_loss(logits, targets)
    assert hit.tolist() == [True, True, True]
    other = logits.clone()
    other[gold == data.PAD] = torch.randn(int((gold == data.PAD).sum()), data.VOCAB_SIZE) * 100
    torch.testing.assert_close(engine.seq_loss(other, targets)[0], loss)
    assert engine.seq_loss(other, targets)[1].tolist() == [True, True, True]
    # three more PAD columns with arbitrary logits: the same tokens are scored
    longer = torch.cat([targets, torch.full((3, 3), data.PAD)], dim=1)
    more = torch.cat([logits, torch.randn(3, 3, data.VOCAB_SIZE) * 100], dim=1)
    torch.testing.assert_close(engine.seq_loss(more, longer)[0], loss)
    assert engine.seq_loss(more, longer)[1].tolist() == [True, True, True]
    # a wrong non-PAD token is still a miss, and costs loss
    wrong = logits.clone()
    wrong[1, 0, gold[1, 0]] = -10.0
    assert engine.seq_loss(wrong, targets)[1].tolist() == [True, False, True]
    assert engine.seq_loss(wrong, targets)[0] > loss


def test_eval_loss_is_the_same_however_far_targets_are_padded():
    """End to end through the model: the PAD tail of a target sequence is neither scored nor, since the
    decoder is causal, seen by the positions that are scored."""
    cell = tiny_cell()
    torch.manual_seed(0)
    model = ViTDSI(cli.model_config(cell.a, max_len=8)).eval()
    images = cell.images[:4]
    targets = data.ids_to_tensor(["12", "3", "45", "6"]).unsqueeze(1)   # (4, 1, 4)
    padded = torch.cat([targets, torch.full((4, 1, 3), data.PAD)], dim=2)   # (4, 1, 7)
    short = engine.eval_loss(model, images, targets, 4, cell.device, False)
    long = engine.eval_loss(model, images, padded, 4, cell.device, False)
    assert long[0] == pytest.approx(short[0], rel=1e-6) and long[1] == short[1]
