"""support/download.py: fetch, cache, checksums, truncation, unsafe archives; no network at all.

Each test builds a tiny Imagenette look-alike in tmp_path and serves it through a file:// URL, or through
a local HTTP server on 127.0.0.1 where the server's behaviour (no length, a lying length) matters.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from support import download
from support.download import ARCHIVE_NAME, DownloadError, default_data_root, fetch_imagenette

TREE = {  # a miniature imagenette2-160/: two classes, two "images" each, plus a val split
    "imagenette2-160/train/n01440764/a.JPEG": b"tench a",
    "imagenette2-160/train/n01440764/b.JPEG": b"tench b",
    "imagenette2-160/train/n02102040/c.JPEG": b"springer c",
    "imagenette2-160/train/n02102040/d.JPEG": b"springer d",
    "imagenette2-160/val/n01440764/e.JPEG": b"tench e",
}


# ---------------------------------------------------------------- helpers

def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_archive(path: Path, files: dict[str, bytes] = TREE, extra: list[tarfile.TarInfo] = ()) -> str:
    """Write a .tgz of ``files`` followed by the raw members ``extra``; return its md5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            add_file(tar, name, data)
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def missing_url(tmp_path: Path) -> str:
    return (tmp_path / "nowhere" / ARCHIVE_NAME).as_uri()


def leftovers(root: Path) -> list[str]:
    """Everything in the data root except a kept archive: temp files, staging folders, extractions."""
    return sorted(name for name in os.listdir(root) if name != ARCHIVE_NAME)


@pytest.fixture
def source(tmp_path: Path) -> tuple[str, str, bytes]:
    """A good archive outside the data root: (file:// URL, md5, bytes)."""
    path = tmp_path / "source" / ARCHIVE_NAME
    path.parent.mkdir()
    md5 = make_archive(path)
    return path.as_uri(), md5, path.read_bytes()


@pytest.fixture
def server(source):
    """http://127.0.0.1:PORT serving the good archive at /nolength (no Content-Length) and /short
    (a Content-Length 1000 bytes longer than the body, then the connection closes)."""
    body = source[2]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            if self.path == "/short":
                self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True  # HTTP/1.0: the end of the body is the end of the connection

        def log_message(self, *args):  # keep pytest's output clean
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------- success and the cache

def test_download_extracts_and_reports_progress(tmp_path, source):
    url, md5, body = source
    root = tmp_path / "data" / "nested"  # missing: created
    lines: list[str] = []
    train = fetch_imagenette(str(root), url=url, md5=md5, progress=lines.append)
    assert train == str(root / "imagenette2-160" / "train")
    for name, data in TREE.items():
        assert (root / name).read_bytes() == data
    assert (root / ARCHIVE_NAME).read_bytes() == body  # kept: a later re-extraction needs no network
    assert (root / "imagenette2-160" / ".complete").is_file()
    assert leftovers(root) == ["imagenette2-160"]  # no .part file, no staging folder
    assert lines and all(line.startswith("download: ") for line in lines)
    assert lines[-1].endswith("(100 %)") and "/" in lines[-1]


def test_second_call_uses_the_cache_without_network_or_checksum(tmp_path, source):
    url, md5, _ = source
    root = tmp_path / "data"
    first = fetch_imagenette(str(root), url=url, md5=md5, progress=None)
    (root / ARCHIVE_NAME).write_bytes(b"garbage")  # would fail the checksum if it were looked at
    lines: list[str] = []
    again = fetch_imagenette(str(root), url=missing_url(tmp_path), md5="0" * 32, progress=lines.append)
    assert again == first and lines == []


def test_archive_put_by_hand_is_used(tmp_path, source):
    _, md5, body = source
    root = tmp_path / "data"
    root.mkdir()
    (root / ARCHIVE_NAME).write_bytes(body)
    train = fetch_imagenette(str(root), url=missing_url(tmp_path), md5=md5, progress=None)
    assert sorted(os.listdir(train)) == ["n01440764", "n02102040"]
    assert (root / ARCHIVE_NAME).read_bytes() == body


def test_unfinished_extraction_is_replaced(tmp_path, source):
    _, md5, body = source
    root = tmp_path / "data"
    stale = root / "imagenette2-160" / "train" / "stale"
    stale.mkdir(parents=True)  # a folder without the .complete marker: an interrupted earlier run
    (root / ARCHIVE_NAME).write_bytes(body)
    train = fetch_imagenette(str(root), url=missing_url(tmp_path), md5=md5, progress=None)
    assert not stale.exists() and sorted(os.listdir(train)) == ["n01440764", "n02102040"]


def test_unknown_length_reports_megabytes_and_progress_none_is_silent(tmp_path, source, server, capsys):
    _, md5, _ = source
    lines: list[str] = []
    fetch_imagenette(str(tmp_path / "a"), url=f"{server}/nolength", md5=md5, progress=lines.append)
    assert lines and lines[-1].startswith("download: ") and lines[-1].endswith(" MB")  # no total, no %
    fetch_imagenette(str(tmp_path / "b"), url=f"{server}/nolength", md5=md5, progress=None)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- bad downloads and bad archives

def test_download_with_wrong_checksum_is_not_kept(tmp_path, source):
    url, md5, _ = source
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as caught:
        fetch_imagenette(str(root), url=url, md5="0" * 32, progress=None)
    message = str(caught.value)
    assert md5 in message and "0" * 32 in message and "\n" not in message
    assert os.listdir(root) == []  # no archive under the final name, no .part file, nothing extracted


def test_hand_placed_archive_with_wrong_checksum_is_refused_but_kept(tmp_path, source):
    url, md5, _ = source
    root = tmp_path / "data"
    root.mkdir()
    archive = root / ARCHIVE_NAME
    archive.write_bytes(b"not an archive")
    with pytest.raises(DownloadError) as caught:
        fetch_imagenette(str(root), url=url, md5=md5, progress=None)
    message = str(caught.value)
    assert hashlib.md5(b"not an archive").hexdigest() in message and md5 in message
    assert str(archive) in message and "delete" in message
    assert archive.read_bytes() == b"not an archive"  # the user's file: never deleted
    assert leftovers(root) == []  # nothing extracted, nothing downloaded in its place


def test_truncated_download_fails_and_leaves_nothing(tmp_path, source, server):
    _, md5, _ = source  # the md5 of the full body: only the byte count can catch the cut
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="cut short") as caught:
        fetch_imagenette(str(root), url=f"{server}/short", md5=md5, progress=None)
    assert f"{server}/short" in str(caught.value)
    assert os.listdir(root) == []


def closed_port_url() -> str:
    with socket.socket() as sock:  # bind, read the port, close: nothing listens there afterwards
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{ARCHIVE_NAME}"


@pytest.mark.parametrize("kind", ["missing file", "closed port"])
def test_no_network_and_no_archive_names_url_and_path(tmp_path, kind):
    url = missing_url(tmp_path) if kind == "missing file" else closed_port_url()
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as caught:
        fetch_imagenette(str(root), url=url, progress=None)
    message = str(caught.value)
    assert url in message and str(root / ARCHIVE_NAME) in message and "by hand" in message
    assert "\n" not in message and os.listdir(root) == []


def link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize("make_member", [
    lambda tmp: regular("../evil"),
    lambda tmp: regular("imagenette2-160/train/../../../evil"),
    lambda tmp: regular(str(tmp / "evil")),  # absolute: would land straight in tmp_path
    lambda tmp: regular("imagenette2-160/../evil\nsecond line"),  # a newline must not break the message
    lambda tmp: link("imagenette2-160/train/n01440764/link", tarfile.SYMTYPE, "/etc/passwd"),
    lambda tmp: link("imagenette2-160/train/n01440764/hard", tarfile.LNKTYPE, "/etc/passwd"),
    lambda tmp: fifo("imagenette2-160/train/n01440764/pipe"),
], ids=["dotdot", "nested-dotdot", "absolute", "newline", "symlink", "hardlink", "fifo"])
def test_unsafe_member_is_refused_before_anything_is_extracted(tmp_path, make_member):
    member = make_member(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    # The bad member comes last: an extractor that checked as it went would already have written the rest.
    md5 = make_archive(root / ARCHIVE_NAME, extra=[member])
    with pytest.raises(DownloadError) as caught:
        fetch_imagenette(str(root), url=missing_url(tmp_path), md5=md5, progress=None)
    message = str(caught.value)
    assert "unsafe archive member" in message  # our own check, before tarfile's filter would see it
    assert ascii(member.name) in message and "\n" not in message
    assert leftovers(root) == []  # nothing inside: no extraction, no staging folder
    assert not (tmp_path / "evil").exists() and not (root / "evil").exists()  # nothing outside


def test_archive_without_train_folder_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    md5 = make_archive(root / ARCHIVE_NAME, files={"imagenette2-160/val/n01440764/e.JPEG": b"e"})
    with pytest.raises(DownloadError, match="no imagenette2-160/train folder"):
        fetch_imagenette(str(root), url=missing_url(tmp_path), md5=md5, progress=None)
    assert leftovers(root) == []


def test_corrupt_archive_with_matching_checksum_is_a_download_error(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / ARCHIVE_NAME).write_bytes(b"\x1f\x8b not really gzip")
    md5 = hashlib.md5(b"\x1f\x8b not really gzip").hexdigest()
    with pytest.raises(DownloadError, match="cannot extract"):
        fetch_imagenette(str(root), url=missing_url(tmp_path), md5=md5, progress=None)
    assert leftovers(root) == []


# ---------------------------------------------------------------- the data root

def test_data_root_that_is_a_file_is_refused(tmp_path, source):
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(DownloadError, match="is a file") as caught:
        fetch_imagenette(str(path), url=source[0], md5=source[1], progress=None)
    assert "\n" not in str(caught.value) and path.read_text() == "x"


def test_data_root_not_writable_is_refused(tmp_path, source, monkeypatch):
    # os.access is faked: the tests may run as root, for whom chmod does not take write access away.
    monkeypatch.setattr(download.os, "access", lambda path, mode: False)
    with pytest.raises(DownloadError, match="not writable"):
        fetch_imagenette(str(tmp_path / "data"), url=source[0], md5=source[1], progress=None)


def test_default_data_root_is_a_per_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == str(tmp_path / "xdg" / "vit-dsi")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_root() == str(tmp_path / "home" / ".cache" / "vit-dsi")
