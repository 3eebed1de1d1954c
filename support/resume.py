"""Resuming an interrupted run: the state of the last completed epoch, in OUT/resume.pt.

A phase asks for its starting point once (`resume_phase`) and hands over each finished epoch
(`save_resume_state`); a run stopped by Ctrl-C or a crash then goes on with `python train.py --resume OUT`
to the metrics an uninterrupted run gives. The steps only skip what the saved state has finished
(`Cell.finished`: BoVW, the zero-shot row).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from support.cli import RUNTIME_FLAGS, build_parser
from support.engine import EarlyStopping, Trainer, clone_state
from support.run import Cell, Log, UsageError
from support.store import atomic_write, load_versioned, state_dict_mismatch

# Bump when the resume state's layout changes: a state of another version is refused with both numbers.
RESUME_VERSION = 2
RESUME_FILE = "resume.pt"


@dataclass
class ResumeSaver:
    """Holds the state of the last completed epoch and writes it to `path` every `every` epochs of a phase
    and when Ctrl-C stops the run. An epoch cut short has already moved the weights and the generators,
    so only a copy taken when the epoch before it ended lets a resume continue exactly.
    `path` None: this run is not resumable (a sweep, or not set up yet; `why_not` says which), no copy is taken."""
    path: str | None = None
    every: int = 0
    state: dict | None = None
    why_not: str = "it stopped before the run began"

    def epoch_done(self, state: dict) -> None:
        self.state = state
        if self.every and state["progress"]["epoch"] % self.every == 0:
            self.write()

    def write(self) -> None:
        atomic_write(self.path, lambda f: torch.save(self.state, f))

    def interrupted(self) -> str:
        """Save the last completed epoch, if any; the one line that tells the user how to go on."""
        if self.path is None:
            return f"interrupted; nothing saved ({self.why_not}): run the same command again"
        if self.state is None:
            return "interrupted before the first epoch ended; nothing to resume: run the same command again"
        self.write()
        return (f"interrupted; {self.state['phase']} epoch {self.state['progress']['epoch']} saved to {self.path}; "
                f"continue with: python train.py --resume {os.path.dirname(self.path)}")


def rng_states(cell: Cell, trainer: Trainer, rng: np.random.Generator | None) -> dict:
    """Every random generator the run draws from, as tensors and plain data: Python's, numpy's and torch's
    global ones (dropout), the batch order, the augmentations, and `rng`, the retrieval targets' draws."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()   # an ndarray is not plain data
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cell.device.type == "cuda" else [],
            "batch_order": cell.gen.get_state(), "augment": trainer.augment_gen.get_state(),
            "targets": rng.bit_generator.state if rng is not None else None}


def set_rng_states(states: dict, cell: Cell, trainer: Trainer, rng: np.random.Generator | None) -> None:
    random.setstate(states["python"])
    numpy_state = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    cell.gen.set_state(states["batch_order"])
    trainer.augment_gen.set_state(states["augment"])
    if rng is not None:
        rng.bit_generator.state = states["targets"]


def save_resume_state(cell: Cell, phase: str, trainer: Trainer, progress: dict,
                      rng: np.random.Generator | None = None, stopper: EarlyStopping | None = None) -> None:
    """Hand the state at the end of an epoch to the run's ResumeSaver: what a resume needs to go on as if
    never stopped. Weights, optimiser and lr schedule, every generator, the phase's progress (epoch,
    seconds so far, ...), the early-stopping record, the curves, the rows of the steps already finished
    (BoVW, zero-shot) and the run's arguments. Tensors and plain data only, for torch.load(weights_only=True)."""
    if cell.saver is None or cell.saver.path is None:
        return
    record = None
    if stopper is not None:   # best_state is never changed in place, only replaced: no copy needed
        record = {k: getattr(stopper, k) for k in ("best_score", "best_epoch", "bad", "best_state")}
    cell.saver.epoch_done({
        "format_version": RESUME_VERSION, "args": dict(vars(cell.a)), "phase": phase, "progress": progress,
        "model": clone_state(trainer.model.state_dict(), "cpu"),
        "optimizer": clone_state(trainer.optimizer.state_dict(), "cpu"),
        "scheduler": clone_state(trainer.scheduler.state_dict()), "rng": rng_states(cell, trainer, rng),
        "early_stopping": record, "curves": {k: list(v) for k, v in cell.curves.items()},
        "finished": dict(cell.finished), "fingerprint": fingerprint(cell)})


def fingerprint(cell: Cell) -> str:
    """What a resumed run must find again: the references of the IDB and of every query split, and the IDs."""
    parts = [[cell.imageset.refs[i] for i in part] for part in (cell.split.idb, cell.split.train, cell.split.val,
                                                                  cell.split.test)]
    return hashlib.sha256(json.dumps([parts, list(cell.idb_ids)]).encode("utf-8", "surrogateescape")).hexdigest()


def resume_phase(cell: Cell, phase: str, trainer: Trainer, progress: dict,
                 rng: np.random.Generator | None = None, stopper: EarlyStopping | None = None) -> dict:
    """Where a phase starts: `progress` as given, or, when this run resumes inside `phase`, the saved
    progress, after putting back everything save_resume_state kept. Called once the phase has built its
    optimiser, schedule and generators, so that the saved states overwrite the fresh ones."""
    state = cell.resumed
    if state is None or state["phase"] != phase:
        return progress
    again = "start the run again without --resume"
    if state["fingerprint"] != fingerprint(cell):
        raise UsageError(f"the images or the split of this run differ from those the interrupted run began with "
                         f"(files moved, added or changed under --data-root?); restore them, or {again}")
    mismatch = state_dict_mismatch(trainer.model.state_dict(), state["model"])
    if mismatch:
        raise UsageError(f"the resume state does not fit its own arguments: {mismatch}; {again}")
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"], cell, trainer, rng)
        if stopper is not None:
            for key, value in state["early_stopping"].items():
                setattr(stopper, key, value)
        cell.curves.update(state["curves"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # a state broken inside
        first_line = (str(e).splitlines() or [""])[0]
        raise UsageError(f"the resume state is broken ({type(e).__name__}: {first_line}); {again}") from None
    cell.resumed = None   # used up: a later phase starts fresh
    return state["progress"]


def load_resume_state(out: str) -> dict:
    """The resume state in folder `out`; anything that is not one of this version is a UsageError."""
    path = os.path.join(out, RESUME_FILE)
    if not os.path.isfile(path):
        finished = os.path.isfile(os.path.join(out, "results.json"))
        raise UsageError(f"no {RESUME_FILE} in '{out}': " + (
            "the run there finished (a finished run deletes its resume state); its results are in results.json"
            if finished else "pass the --out folder of an interrupted run"))
    again = "start the run again without --resume"
    state = load_versioned(path, "resume state", RESUME_VERSION, again,
                           version_fix=f"finish the run with the train.py that began it, or {again}")
    expected = {"args", "phase", "progress", "model", "optimizer", "scheduler", "rng", "early_stopping",
                "curves", "finished", "fingerprint"}
    missing = sorted(expected - set(state))
    if missing or state["phase"] not in ("index", "retrieval"):
        raise UsageError(f"'{path}' is a broken resume state (" + (f"no '{missing[0]}'" if missing else
                         f"unknown phase '{state['phase']}'") + f"); {again}")
    return state


def resume_args(a: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The arguments and resume state of the run recorded in `--resume OUT_DIR`. The run keeps its own
    arguments; of this command line only the RUNTIME_FLAGS count, and the output folder is OUT_DIR
    (it may have been moved)."""
    parser = build_parser()
    given = [k for k, v in vars(a).items() if k != "resume" and v != parser.get_default(k)]
    other = [k for k in given if k not in RUNTIME_FLAGS]
    if other:
        raise UsageError(f"--resume continues a run with its own arguments: drop --{other[0].replace('_', '-')} "
                         f"(only --threads, --quiet and --save-every may be given with --resume)")
    state = load_resume_state(a.resume)
    if not isinstance(state["args"], dict) or set(state["args"]) != set(vars(a)):
        raise UsageError(f"'{os.path.join(a.resume, RESUME_FILE)}' records the arguments of another version of "
                         f"train.py; start the run again without --resume")
    ours = {k: getattr(a, k) for k in given}
    return argparse.Namespace(**{**state["args"], **ours, "resume": a.resume, "out": a.resume}), state


def arm_saver(saver: ResumeSaver, path: str, every: int, state: dict | None, log: Log) -> None:
    """Point `saver` at `path`. A resumed run starts from the saved state (Ctrl-C before its next epoch
    ends writes it back as it was); a fresh run says that it will replace a state left in its folder."""
    saver.path, saver.every, saver.state = path, every, state
    if state is not None:
        log(f"resuming from {path}: {state['phase']} epoch {state['progress']['epoch']} had ended")
    elif os.path.exists(path):
        log(f"note: {path} holds the state of an interrupted run; this run starts afresh and replaces it "
            f"(python train.py --resume {os.path.dirname(path)} continues that run instead)")
