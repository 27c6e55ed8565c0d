"""Hostile inputs get one clear report line, never a traceback (issue 10 §3).

Each case is built here from a small valid COCO or VIA split; the report must name the file,
the entry and the fix, and only DataValidationError / StorageError may escape.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from d2ops import storage
from d2ops.s3server import LocalS3, local_s3_endpoint
from d2ops.storage import CACHE_INDEX_NAME, StorageError

# --------------------------------------------------------------------------- full disk: the cache index

_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3_endpoint() as endpoint:
        yield endpoint


@pytest.fixture
def remote(s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Two small files uploaded to a fresh bucket; returns their prefix URI."""
    monkeypatch.setattr(storage, "_clearml_credentials", lambda: ())
    monkeypatch.delenv("D2OPS_S3_SECURE", raising=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2000))
    (src / "b.bin").write_bytes(os.urandom(3000))
    uri = s3.uri(f"hostile-{next(_buckets)}", "data/")
    storage.upload(src, uri, create_bucket=True, progress=False)
    return uri


def _disk_full_for_index(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make writing the cache index fail half-way with ENOSPC; every other write goes through."""
    real_write_text = Path.write_text
    attempts: list[Path] = []

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name.startswith(f".{CACHE_INDEX_NAME}."):
            attempts.append(self)
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # half of it got on disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    return attempts


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.part"))


def test_full_disk_while_writing_the_cache_index_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "cache"
    dest.mkdir()
    old = {"a.bin": {"etag": "x", "size": 1, "sha256": "y"}}
    (dest / CACHE_INDEX_NAME).write_text(json.dumps(old))
    attempts = _disk_full_for_index(monkeypatch)
    with pytest.raises(StorageError) as info:
        storage._write_index(dest, {"b.bin": {"etag": "z", "size": 2, "sha256": "w"}})
    message = str(info.value)
    assert attempts, "the index write was not reached"
    assert f"disk is full at {dest / CACHE_INDEX_NAME}" in message
    assert "bytes free" in message and "Free space on that disk" in message and "data.cache_dir" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    # The old index is intact and no half-written temporary file is left.
    assert json.loads((dest / CACHE_INDEX_NAME).read_text()) == old
    assert _leftovers(dest) == [] and not attempts[0].exists()


def test_other_index_write_errors_say_what_to_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage.os, "replace", refuse)
    with pytest.raises(StorageError, match=r"cannot write the download cache index .*writable") as info:
        storage._write_index(tmp_path, {})
    assert "disk is full" not in str(info.value)
    assert _leftovers(tmp_path) == []


def test_download_onto_a_full_disk_fails_cleanly(remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _disk_full_for_index(monkeypatch)
    with pytest.raises(StorageError, match=r"disk is full at .*\.d2ops-manifest\.json"):
        storage.download(remote, out, workers=1, progress=False)
    assert _leftovers(out) == []
    assert not (out / CACHE_INDEX_NAME).exists()


def test_full_disk_index_write_does_not_mask_the_transfer_error(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills while a file arrives; the index write then fails too. The file's error is reported."""
    out = tmp_path / "out"

    def disk_full(body: Any, fh: Any, on_bytes: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_copy_stream", disk_full)
    _disk_full_for_index(monkeypatch)
    with pytest.raises(StorageError) as info:
        storage.download(remote, out, workers=1, progress=False)
    assert "No space left on device" in str(info.value) and "/data/" in str(info.value)
    assert "cache index" not in str(info.value)
    assert "disk is full at" in caplog.text  # the second failure is still said, at WARNING
    assert _leftovers(out) == []


def test_full_disk_index_write_does_not_mask_an_interrupt(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_run_parallel", interrupted)
    _disk_full_for_index(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        storage.download(remote, tmp_path / "out", workers=1, progress=False)
    assert _leftovers(tmp_path / "out") == []
