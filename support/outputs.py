"""A training run's output folder: one run at a time, its log, and its files committed together.

A run writes checkpoint.pt, curves.png, retrievals.png and results.json/.md into a staging folder inside
`--out` (OUT/.staging-<pid>), and moves them into OUT only once all of them are written, results.json
last; a run that fails or is stopped leaves OUT's earlier files as they were. A lock file (OUT/.lock)
turns a second run into the same folder into one line of error, and a folder that holds a finished run
is replaced only with `--overwrite`. train.log is appended to, so it keeps every attempt.

    with run_folder(a, saver, state) as folder:      # OUT locked, its log opened, the resume state armed
        ... write into folder.staging ...
        folder.commit()
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from support import cli, resume
from support.run import Log, UsageError, printable

LOCK_FILE = ".lock"
FINISHED = "results.json"   # a folder holding it holds a finished run
OUTPUTS = ("checkpoint.pt", "curves.png", "retrievals.png", "results.md", "results.json")   # results.json last


@dataclass
class RunFolder:
    out: str          # --out, where the finished run's files land
    staging: str      # where this run writes them until it has them all
    log: Log

    def commit(self) -> None:
        """Move every staged file into OUT (sub-folders of a sweep too), results.json of each folder last;
        an output of an earlier run that this run did not write is removed first, so OUT never mixes them."""
        staged = sorted(os.path.relpath(os.path.join(root, f), self.staging)
                        for root, _, files in os.walk(self.staging) for f in files)
        for rel in sorted(set(old_outputs(self.out)) - set(staged)):
            os.remove(os.path.join(self.out, rel))
        for rel in sorted(staged, key=lambda r: (os.path.basename(r) == FINISHED, r)):
            os.makedirs(os.path.dirname(os.path.join(self.out, rel)), exist_ok=True)
            os.replace(os.path.join(self.staging, rel), os.path.join(self.out, rel))


def old_outputs(out: str) -> list[str]:
    """The output files of an earlier run in OUT and in its sweep sub-folders, relative to OUT."""
    found = []
    for root, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(root, f), out) for f in files if f in OUTPUTS]
    return found


def take_lock(out: str) -> str:
    """OUT/.lock with this process's id; a lock whose process is gone is taken over."""
    path = os.path.join(out, LOCK_FILE)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_owner(path)
            if pid is not None and pid != os.getpid() and process_alive(pid):
                raise UsageError(f"another run (process {pid}) is writing to --out '{printable(out)}'; wait for it "
                                 f"to end, or pass another --out") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    raise UsageError(f"cannot lock --out '{printable(out)}' (a run starting there at the same time?); try again")


def lock_owner(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, and is someone else's
        return True
    return True


@contextlib.contextmanager
def run_folder(a: argparse.Namespace, saver: resume.ResumeSaver, state: dict | None) -> Iterator[RunFolder]:
    """OUT, locked for this run, with its log and staging folder; the resume state armed (not for a sweep).
    On the way out, success or not, the staging folder and the lock go."""
    out = a.out or cli.default_out(a)
    if os.path.isfile(os.path.join(out, FINISHED)) and not (a.overwrite or a.resume):
        raise UsageError(f"--out '{printable(out)}' holds a finished run (results.json); pass --overwrite to "
                         f"replace it, or another --out")
    os.makedirs(out, exist_ok=True)
    lock = take_lock(out)
    staging = os.path.join(out, f".staging-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        log = Log(os.path.join(out, "train.log"), quiet=a.quiet)
        log(f"vit-dsi: {' '.join(map(printable, sys.argv[1:])) or '(defaults)'} -> {out}")
        log(f"recipe '{a.recipe}': " + ", ".join(f"{k} {v}" for k, v in asdict(cli.recipe_from_args(a)).items()))
        if a.sweep:   # its finished cells are not kept apart from the unfinished one: no resume state
            saver.why_not = "a --sweep cannot be resumed"
        else:
            resume.arm_saver(saver, os.path.join(out, resume.RESUME_FILE), a.save_every, state, log)
        yield RunFolder(out, staging, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
