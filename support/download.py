"""Fetch Imagenette once, so the paper's ImageNet protocol runs on a fresh machine.

``fetch_imagenette(data_root)`` returns ``DATA_ROOT/imagenette2-160/train``, an ImageFolder tree
(``<class>/<image>.JPEG``) that ``support.sources.load_imagefolder`` reads. The first call downloads

    https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz   (md5 e793b78c...)

to ``DATA_ROOT/imagenette2-160.tgz``, checks its md5 and extracts it to ``DATA_ROOT/imagenette2-160/``;
``default_data_root()`` is a per-user cache, ``$XDG_CACHE_HOME/vit-dsi`` or ``~/.cache/vit-dsi``.
A second call finds the finished extraction and returns at once: no network, no checksum.

Without network, put the archive at ``DATA_ROOT/imagenette2-160.tgz`` by hand: it is checked and used.
Nothing half-done ever looks finished: the download goes to a temporary ``.part`` file renamed only
after its length and md5 are right, and the extraction goes to a temporary folder renamed into place,
with a ``.complete`` marker written last. Archive members are checked before anything is extracted
(regular files and folders only, every name inside the target). Every problem raises ``DownloadError``,
one line naming the problem and the fix. Standard library only.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable

IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
IMAGENETTE_MD5 = "e793b78cc4c9e9a4ccc0c1155377a412"
ARCHIVE_NAME = "imagenette2-160.tgz"
FOLDER_NAME = "imagenette2-160"  # the archive's top folder
MARKER_NAME = ".complete"  # written inside FOLDER_NAME as the very last step of an extraction

CHUNK = 1 << 20  # bytes per read: md5 and download stream, memory stays flat for any archive size
TIMEOUT_S = 60.0  # per blocking read: a stalled connection fails instead of hanging forever
PROGRESS_STEP = 5.0  # percent between progress lines when the size is known ...
PROGRESS_EVERY_S = 5.0  # ... and seconds between them otherwise (or when the download is slow)

Progress = Callable[[str], None]


class DownloadError(ValueError):
    """str(e) is ONE line naming the problem and the fix (the command line prints it and exits 2)."""


def default_data_root() -> str:
    """A per-user cache folder: ``$XDG_CACHE_HOME/vit-dsi``, else ``~/.cache/vit-dsi``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vit-dsi")


def fetch_imagenette(data_root: str, *, url: str = IMAGENETTE_URL, md5: str = IMAGENETTE_MD5,
                     progress: Progress | None = print) -> str:
    """Return the ImageFolder root DATA_ROOT/imagenette2-160/train, downloading and extracting once.

    ``progress`` receives the download's progress lines (None = silent). Raises ``DownloadError``.
    """
    root = _prepare_root(data_root)
    folder = os.path.join(root, FOLDER_NAME)
    train = os.path.join(folder, "train")
    if os.path.isfile(os.path.join(folder, MARKER_NAME)) and os.path.isdir(train):
        return train  # extracted by an earlier run: the archive is not even looked at
    archive = os.path.join(root, ARCHIVE_NAME)
    if os.path.isfile(archive):
        _check_archive_by_hand(archive, md5)
    else:
        _download(url, archive, md5, progress)
    _extract(archive, root)
    return train


# ---------------------------------------------------------------- the data root

def _prepare_root(data_root: str) -> str:
    """Create DATA_ROOT if missing; refuse a file or a folder this user cannot write to."""
    root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
    if os.path.exists(root) and not os.path.isdir(root):
        raise DownloadError(f"the data root {root} is a file, not a folder; "
                            f"pass another --data-root or move the file away")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot create the data root {root} ({_one_line(error)}); "
                            f"pass a --data-root you can write to") from error
    # The temporary files and folders go next to their final names, so the root must take new entries.
    if not os.access(root, os.W_OK | os.X_OK):
        raise DownloadError(f"the data root {root} is not writable; "
                            f"pass a --data-root you can write to or fix its permissions")
    return root


# ---------------------------------------------------------------- checksums

def file_md5(path: str) -> str:
    """The md5 hex digest of a file, read in chunks (the archive need not fit in memory)."""
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check, not security: allowed under FIPS
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_archive_by_hand(archive: str, md5: str) -> None:
    """An archive already at the final name (put there by the user, or by an earlier run) must match.

    It is never deleted here: it may be the user's only copy, and the message tells them what to do.
    """
    actual = file_md5(archive)
    if actual != md5.lower():
        raise DownloadError(f"{archive} has md5 {actual}, expected {md5.lower()}: the file is damaged or "
                            f"not {ARCHIVE_NAME}; delete it and run again to download it afresh")


# ---------------------------------------------------------------- download

def _download(url: str, archive: str, md5: str, progress: Progress | None) -> None:
    """Download ``url`` to ``archive``: stream to a temporary name, check length and md5, then rename.

    On any failure the temporary file is removed and nothing exists under the final name.
    """
    part = os.path.join(os.path.dirname(archive), f".{ARCHIVE_NAME}.{os.getpid()}.part")
    try:
        actual = _stream_to(url, part, archive, progress)
        if actual != md5.lower():
            raise DownloadError(f"the download of {url} has md5 {actual}, expected {md5.lower()} (it was "
                                f"not kept); run again, or put a good archive at {archive} by hand")
        os.replace(part, archive)  # atomic: the archive name only ever holds a verified file
    finally:
        if os.path.exists(part):
            os.remove(part)


def _stream_to(url: str, part: str, archive: str, progress: Progress | None) -> str:
    """Copy the response body to ``part``, hashing as it goes; return the md5 hex digest."""
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            report = _Reporter(total, progress)
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                report(done)
            report(done, final=True)
    except http.client.IncompleteRead as error:  # some Python versions raise instead of returning b""
        raise _truncated(url, archive, done + len(error.partial), total) from error
    # Timeouts are OSErrors; ValueError is a malformed URL ("unknown url type").
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise DownloadError(f"cannot download {url} ({_one_line(_reason(error))}); put the archive at "
                            f"{archive} by hand, or check the network") from error
    # http.client quietly returns b"" when the server closes early: only the count tells a cut transfer.
    if total is not None and done != total:
        raise _truncated(url, archive, done, total)
    return digest.hexdigest()


def _truncated(url: str, archive: str, done: int, total: int | None) -> DownloadError:
    """The error for a transfer that ended before its announced Content-Length."""
    return DownloadError(f"the download of {url} was cut short ({done} of {total} bytes); run again, "
                         f"or put the archive at {archive} by hand")


class _Reporter:
    """Progress lines ``download: 12.3/94.4 MB (13 %)``, every PROGRESS_STEP % or PROGRESS_EVERY_S s."""

    def __init__(self, total: int | None, progress: Progress | None) -> None:
        self.total, self.progress = total, progress
        self.next_percent = PROGRESS_STEP
        self.last_time = time.monotonic()

    def __call__(self, done: int, final: bool = False) -> None:
        if self.progress is None:
            return
        percent = 100.0 * done / self.total if self.total else None
        due_by_step = percent is not None and percent >= self.next_percent
        if not (final or due_by_step or time.monotonic() - self.last_time >= PROGRESS_EVERY_S):
            return
        if percent is None:
            self.progress(f"download: {done / 1e6:.1f} MB")
        else:
            self.progress(f"download: {done / 1e6:.1f}/{self.total / 1e6:.1f} MB ({percent:.0f} %)")
        self.last_time = time.monotonic()
        if percent is not None:  # skip the steps a big chunk jumped over: one line, not several
            self.next_percent = (percent // PROGRESS_STEP + 1) * PROGRESS_STEP


# ---------------------------------------------------------------- extraction

def _extract(archive: str, root: str) -> None:
    """Extract ``archive`` into a temporary folder in ``root``, then rename its top folder into place."""
    staging = tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", suffix=".extract", dir=root)
    try:
        _safe_extract(archive, staging)
        extracted = os.path.join(staging, FOLDER_NAME)
        if not os.path.isdir(os.path.join(extracted, "train")):
            raise DownloadError(f"the archive has no {FOLDER_NAME}/train folder; {archive} is not "
                                f"{ARCHIVE_NAME}: delete it and run again")
        folder = os.path.join(root, FOLDER_NAME)
        if os.path.lexists(folder):
            # No marker (the caller checked): an interrupted earlier extraction, replaced whole.
            if os.path.isdir(folder) and not os.path.islink(folder):
                shutil.rmtree(folder)
            else:
                os.remove(folder)
        os.rename(extracted, folder)
        with open(os.path.join(folder, MARKER_NAME), "w", encoding="utf-8") as marker:
            marker.write(f"extracted from {ARCHIVE_NAME}\n")  # last step: its presence means "finished"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe_extract(archive: str, destination: str) -> None:
    """Check every member first, then extract them all; a bad member stops before anything is written."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, destination, archive)
            if hasattr(tarfile, "data_filter"):  # Python 3.12+ and 3.11.4+: a second, stdlib line of defence
                tar.extractall(destination, members=members, filter="data")
            else:
                tar.extractall(destination, members=members)
    except (tarfile.TarError, EOFError, OSError) as error:  # gzip errors are OSErrors; EOFError = cut short
        raise DownloadError(f"cannot extract {archive} ({_one_line(error)}); delete it and run again "
                            f"to download it afresh") from error


def _check_member(member: tarfile.TarInfo, destination: str, archive: str) -> None:
    """Only regular files and folders, each landing inside ``destination``: no links, devices, escapes."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        problem = "is a link" if member.issym() or member.islnk() else "is not a regular file or folder"
    elif os.path.isabs(name) or name.startswith(("/", "\\")):
        problem = "has an absolute name"
    elif ".." in name.replace("\\", "/").split("/"):
        problem = "has a '..' component"
    elif not _inside(os.path.join(destination, name), destination):
        problem = "lands outside the extraction folder"
    else:
        return
    # ascii() keeps the message on one line whatever the name holds (newlines, control characters).
    raise DownloadError(f"unsafe archive member {ascii(name)}: it {problem}; {archive} is not a genuine "
                        f"{ARCHIVE_NAME}: delete it and download it again")


def _inside(path: str, folder: str) -> bool:
    """Whether ``path``, with links and ``..`` resolved, is ``folder`` or below it."""
    resolved, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([resolved, base]) == base


# ---------------------------------------------------------------- messages

def _reason(error: BaseException) -> object:
    """URLError wraps the real cause (refused, not found, timed out) in ``reason``: show that."""
    if isinstance(error, urllib.error.HTTPError):
        return error  # "HTTP Error 404: Not Found": the status code is the useful part
    return getattr(error, "reason", None) or error


def _one_line(text: object) -> str:
    """Collapse any whitespace run (newlines included) so an error message stays one line."""
    return " ".join(str(text).split())
