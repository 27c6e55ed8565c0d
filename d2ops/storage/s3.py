"""Datasets and weights on S3 or MinIO: parallel, cached, atomic transfers.

Training data and pretrained weights reach the pipeline from object storage. This module
moves them between a bucket and a local directory so that:

* a re-run with unchanged data costs one listing and no bytes transferred (cache keyed by ETag
  and size, each cached file's content checked against the sha256 recorded when it was fetched),
* the local copy of a prefix mirrors its listing exactly: local files the listing does not have
  (objects deleted since, strays) are removed, and temp files of a killed run are cleaned up,
  so what is validated and trained on is exactly what the identity names,
* an interrupted run never leaves a truncated file under its final name (temp file + rename),
* transient network and 5xx errors are retried, and a wrong bucket, key or credential
  fails at once with a message that says what to check,
* every transfer reports a dataset identity (a hash of the manifest) that experiments can
  record to say exactly which data they saw.

URI forms (see :func:`parse_s3_uri`)::

    s3://127.0.0.1:9000/bucket/prefix   MinIO or any S3-compatible endpoint (path-style)
    s3://bucket/prefix                  AWS S3

Credentials are never taken from URIs, arguments or project config files: boto3's own chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...) comes first, then the
matching entry of ``sdk.aws.s3.credentials`` in clearml.conf, read by ClearML's own loader.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from hashlib import sha256
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions as bce
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from tqdm.auto import tqdm

from d2ops.storage import credentials
from d2ops.utils.files import atomic_write, temp_beside

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

CACHE_INDEX_NAME = ".d2ops-manifest.json"
"""Per-destination cache index: ``{relative key: {"etag": ..., "size": ..., "sha256": ...}}``.

``sha256`` is the hash of the bytes written, computed while they stream in (no extra read). A
cached file is reused only if its listing ETag and size match its entry *and* its content still
hashes to it (one local read of every cached byte per sync; an entry without it is fetched again).
"""

BOTO_MAX_ATTEMPTS = 5
"""botocore's per-request retries ("standard" mode: connection errors, 5xx, throttling)."""
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.5
"""Object-level retries (0.5 s, 1 s, 2 s) on top of botocore's per-request retries; they also
cover a connection that breaks while a body is streaming, which botocore does not retry."""

_CHUNK_BYTES = 1 << 20
_LARGE_UPLOAD_BYTES = 64 << 20
_MULTIPART = TransferConfig(multipart_threshold=_LARGE_UPLOAD_BYTES, max_concurrency=4)
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$")
_PART_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.part$")
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException"}
)
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

T = TypeVar("T")


class StorageError(RuntimeError):
    """A transfer failed for a reason the user can fix; the message names the URI and what to check.

    Messages never contain credentials.
    """


@dataclass(frozen=True)
class S3Location:
    """Where an object or prefix lives: bucket and key prefix, plus the endpoint for non-AWS stores."""

    bucket: str
    prefix: str
    endpoint_url: str | None
    host: str | None
    secure: bool

    def uri(self) -> str:
        """The ``s3://`` URI this location was parsed from (normalised)."""
        root = f"{self.host}/{self.bucket}" if self.host else self.bucket
        return f"s3://{root}/{self.prefix}"


@dataclass
class ObjectInfo:
    """One object of a transfer: its key relative to the URI's prefix, ETag (unquoted) and size."""

    key: str
    etag: str
    size: int


@dataclass
class TransferStats:
    """What a transfer did, plus the manifest and identity of the data it covers."""

    files_total: int
    files_transferred: int
    files_skipped: int
    bytes_transferred: int
    manifest: list[ObjectInfo] = field(default_factory=list)
    identity: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, ready for JSON or for ClearML's ``connect``/artifact APIs."""
        return asdict(self)


# --------------------------------------------------------------------------- URIs and config


def is_s3_uri(s: str) -> bool:
    """True for ``s3://...`` strings; everything else is treated as a local path."""
    return s.lower().startswith("s3://")


def parse_s3_uri(uri: str, *, secure: bool | None = None) -> S3Location:
    """Split an ``s3://`` URI into bucket, prefix and endpoint.

    * ``s3://host:port/bucket/prefix``: an S3-compatible endpoint (MinIO, moto), path-style.
    * ``s3://bucket/prefix``: AWS S3.
    * ``s3://minio.example.com/bucket/prefix`` (a host *without* a port) is ambiguous, since
      bucket names may contain dots. It is read as an endpoint only if ``minio.example.com``
      is the ``host`` of an ``sdk.aws.s3.credentials`` entry in clearml.conf; otherwise it is
      an AWS bucket. ClearML itself needs the port there, so prefer writing it.

    ``secure`` (https) is resolved as: the argument, else the matching clearml.conf entry's
    ``secure``, else env ``D2OPS_S3_SECURE``, else False for endpoints and True for AWS.
    """
    if not is_s3_uri(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    first, _, rest = uri[len("s3://") :].partition("/")
    if "@" in first:
        raise StorageError("S3 URIs must not carry credentials (user@host); put them in the environment")
    if not first:
        raise StorageError(f"no bucket in {uri!r}: expected s3://bucket/prefix or s3://host:port/bucket/prefix")

    is_endpoint = bool(_HOST_PORT.match(first)) or (
        "." in first and bool(rest) and credentials.conf_entry(host=first) is not None
    )
    if not is_endpoint:
        return S3Location(
            bucket=first,
            prefix=rest.lstrip("/"),
            endpoint_url=None,
            host=None,
            secure=_resolve_secure(secure, credentials.conf_entry(bucket=first), default=True),
        )

    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}: expected s3://{first}/bucket/prefix")
    use_tls = _resolve_secure(secure, credentials.conf_entry(host=first), default=False)
    return S3Location(
        bucket=bucket,
        prefix=prefix.lstrip("/"),
        endpoint_url=f"{'https' if use_tls else 'http'}://{first}",
        host=first,
        secure=use_tls,
    )


def make_s3_client(loc: S3Location, *, max_pool_connections: int = 32) -> S3Client:
    """A boto3 S3 client for ``loc``, safe to share between threads.

    Credentials: boto3's chain when the environment provides them, else the clearml.conf
    entry matching the host (endpoints) or bucket (AWS). Checksums are only sent or validated
    when an operation requires them: boto3 >= 1.36 defaults otherwise, which some
    S3-compatible stores reject.
    """
    entry = credentials.conf_entry(host=loc.host) if loc.host else credentials.conf_entry(bucket=loc.bucket)
    kwargs: dict[str, Any] = {}
    if entry is not None and not credentials.env_has_credentials() and entry.get("key") and entry.get("secret"):
        kwargs["aws_access_key_id"] = str(entry["key"])
        kwargs["aws_secret_access_key"] = str(entry["secret"])
        if entry.get("token"):
            kwargs["aws_session_token"] = str(entry["token"])
    region = (entry or {}).get("region") or os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION"))
    if loc.host and not region:
        region = "us-east-1"  # S3-compatible stores ignore it, but SigV4 needs one
    config = Config(
        s3={"addressing_style": "path"} if loc.host else {},
        retries={"max_attempts": BOTO_MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=60,
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=loc.endpoint_url,
        region_name=region or None,
        use_ssl=loc.secure,
        config=config,
        **kwargs,
    )


def dataset_identity(manifest: list[ObjectInfo]) -> str:
    """sha256 hex over the sorted (key, etag, size) triples: equal data, equal identity."""
    rows = sorted((info.key, info.etag, info.size) for info in manifest)
    return sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- errors and retries


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error.get("Code", "") in _RETRYABLE_CODES
    if isinstance(exc, bce.SSLError):
        return False  # an http/https mismatch does not heal by retrying
    return isinstance(exc, bce.ConnectionError | bce.HTTPClientError | bce.IncompleteReadError | _TruncatedTransfer)


def _with_retries(fn: Callable[[], T], what: str) -> T:
    """Call ``fn`` up to RETRY_ATTEMPTS times, backing off on transient errors only."""
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == RETRY_ATTEMPTS or not _is_retryable(exc):
                raise
            delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
            logger.warning(
                "%s: %s (attempt %d/%d), retrying in %.1fs", what, type(exc).__name__, attempt, RETRY_ATTEMPTS, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def as_storage_error(exc: BaseException, uri: str, loc: S3Location) -> StorageError:
    """Translate a boto/network error into a StorageError that says what to check."""
    if isinstance(exc, StorageError):
        return exc
    where = f"host '{loc.host}'" if loc.host else f"bucket '{loc.bucket}'"
    creds_hint = (
        "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment, "
        f"or the sdk.aws.s3.credentials entry for {where} in clearml.conf)"
    )
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return StorageError(f"no S3 credentials for {uri}: {creds_hint}")
    if isinstance(exc, bce.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _DENIED_CODES or status == 403:
            return StorageError(
                f"access denied to {uri} ({code or status}): {creds_hint}, "
                f"and that they may access bucket '{loc.bucket}'"
            )
        if code == "NoSuchBucket":
            endpoint = loc.endpoint_url or "AWS"
            return StorageError(
                f"bucket '{loc.bucket}' does not exist at {endpoint}: check the bucket name and host:port in {uri}"
            )
        if code in {"NoSuchKey", "404"} or status == 404:
            return StorageError(f"no object at {uri}: check the bucket and prefix")
        return StorageError(f"S3 request for {uri} failed ({code or status}): {exc}")
    if isinstance(exc, bce.SSLError) and loc.host:
        return StorageError(
            f"TLS handshake with {loc.endpoint_url} failed for {uri}: the server speaks plain http. "
            f"Set secure: false in the sdk.aws.s3.credentials entry for host '{loc.host}' in clearml.conf "
            "(or D2OPS_S3_SECURE=0); MinIO serves http unless it was given certificates"
        )
    if isinstance(exc, bce.ConnectionError | bce.HTTPClientError):
        endpoint = loc.endpoint_url or "AWS S3"
        return StorageError(
            f"cannot reach {endpoint} for {uri} after {RETRY_ATTEMPTS} attempts "
            f"({type(exc).__name__}): check host:port, http vs https "
            "(secure / D2OPS_S3_SECURE) and that the server is running"
        )
    return StorageError(f"transfer of {uri} failed: {type(exc).__name__}: {exc}")


class _TruncatedTransfer(OSError):
    """The body ended before Content-Length bytes arrived; retried like a network error."""


# --------------------------------------------------------------------------- progress and files


class _Progress:
    """A thread-safe byte counter behind one tqdm bar (hidden when ``enabled`` is False or no TTY)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._lock = threading.Lock()
        self._bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=None if enabled else True,
            leave=False,
        )

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    @contextmanager
    def attempt(self) -> Iterator[Callable[[int], None]]:
        """A byte callback for one transfer attempt; a failed attempt takes its bytes back off the bar."""
        counted = 0

        def on_bytes(n: int) -> None:
            nonlocal counted
            counted += n
            self.update(n)

        try:
            yield on_bytes
        except BaseException:
            self.update(-counted)
            raise

    def close(self) -> None:
        self._bar.close()


class _HashingWriter:
    """A write-only file wrapper that hashes what goes through it (``name`` as the file's)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.name = fh.name
        self._hash = sha256()

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        return self._fh.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_stream(body: Any, fh: Any, on_bytes: Callable[[int], None]) -> int:
    """Copy a response body into ``fh`` in chunks; returns the bytes written."""
    written = 0
    for chunk in body.iter_chunks(_CHUNK_BYTES):
        fh.write(chunk)
        written += len(chunk)
        on_bytes(len(chunk))
    return written


def _temp_path(target: Path) -> Path:
    """``.<name>.<12 hex>.part``: the name :data:`_PART_FILE` finds, to sweep what a killed transfer left."""
    return temp_beside(target, ".part")


def _safe_relative(key: str) -> PurePosixPath:
    """A key as a relative path that cannot escape the destination directory."""
    rel = PurePosixPath(key)
    if not key or rel.is_absolute() or ".." in rel.parts or "\\" in key:
        raise StorageError(f"refusing to write object key {key!r} outside the destination directory")
    return rel


def _read_index(dest: Path) -> dict[str, dict[str, Any]]:
    path = dest / CACHE_INDEX_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        logger.warning("ignoring unreadable cache index %s; everything will be fetched again", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_index(dest: Path, index: dict[str, dict[str, Any]]) -> None:
    """Replace the cache index atomically, so a crash leaves the old or the new one, never half.

    A failed write (a full disk, above all) raises :class:`StorageError` and leaves the old
    index as it was and no temporary file behind.
    """
    path = dest / CACHE_INDEX_NAME
    try:
        with atomic_write(path, "w", temp=_temp_path(path)) as handle:
            handle.write(json.dumps(index, indent=1, sort_keys=True))
    except OSError as exc:
        raise _index_write_error(path, exc) from exc


def _index_write_error(path: Path, exc: OSError) -> StorageError:
    cache = "or set data.cache_dir to a folder on a disk with room"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        return StorageError(
            f"disk is full at {path} ({free}; {exc.strerror or exc}): the download cache index cannot be "
            f"written. Free space on that disk, {cache}"
        )
    return StorageError(
        f"cannot write the download cache index {path} ({type(exc).__name__}: {exc}): "
        f"check that the folder is writable, {cache}"
    )


# --------------------------------------------------------------------------- download


@dataclass(frozen=True)
class RemoteObject:
    """One object :func:`list_remote` found: its full key, and its info relative to the listed prefix."""

    key: str  # full object key
    info: ObjectInfo  # key relative to the URI's prefix


def list_remote(client: S3Client, loc: S3Location) -> tuple[list[RemoteObject], bool]:
    """All objects under ``loc`` and whether the URI names a single object rather than a prefix."""
    prefix = loc.prefix
    list_prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    remotes: list[RemoteObject] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=list_prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            rel = key[len(list_prefix) :]
            if key.endswith("/") or rel == CACHE_INDEX_NAME:
                continue  # folder markers; a stray cache index uploaded with a dataset
            remotes.append(RemoteObject(key, ObjectInfo(rel, obj["ETag"].strip('"'), obj["Size"])))
    if remotes or not prefix or prefix.endswith("/"):
        return remotes, False
    try:
        head = client.head_object(Bucket=loc.bucket, Key=prefix)
    except bce.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return [], False
        raise
    name = PurePosixPath(prefix).name
    return [RemoteObject(prefix, ObjectInfo(name, head["ETag"].strip('"'), head["ContentLength"]))], True


def _index_matches(info: ObjectInfo, target: Path, entry: dict[str, Any] | None) -> bool:
    """The index says ``target`` holds this listing's object (ETag, size, a content hash to check)."""
    if not entry or entry.get("etag") != info.etag or entry.get("size") != info.size or not entry.get("sha256"):
        return False
    try:
        return target.is_file() and target.stat().st_size == info.size
    except OSError:
        return False


def _changed_since_fetched(candidates: list[tuple[str, Path, str]], workers: int) -> list[str]:
    """The keys of ``(key, file, sha256)`` whose file no longer hashes to what was downloaded.

    Reads every byte once, ``workers`` files at a time (hashlib releases the GIL).
    """

    def changed(item: tuple[str, Path, str]) -> bool:
        _, path, digest = item
        try:
            return _file_sha256(path) != digest
        except OSError:
            return True

    if not candidates:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="d2ops-verify") as pool:
        flags = list(pool.map(changed, candidates))
    return [key for (key, _, _), flag in zip(candidates, flags, strict=True) if flag]


def _fetch_once(
    client: S3Client, bucket: str, remote: RemoteObject, target: Path, progress: _Progress, hashes: dict[str, str]
) -> ObjectInfo:
    """Download one object to a temp file next to ``target``, then rename it into place.

    The sha256 of the bytes written goes to ``hashes[key]`` (for the cache index).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # not fsynced (durable=False): the cache is re-fetched and checked by hash; a kill leaves no torn file
    with progress.attempt() as on_bytes, atomic_write(target, "wb", temp=_temp_path(target), durable=False) as raw:
        fh = _HashingWriter(raw)
        response = client.get_object(Bucket=bucket, Key=remote.key)
        expected = response["ContentLength"]
        written = _copy_stream(response["Body"], fh, on_bytes)
        if written != expected:
            raise _TruncatedTransfer(f"got {written} of {expected} bytes")
    hashes[remote.info.key] = fh.hexdigest()
    return ObjectInfo(remote.info.key, response.get("ETag", remote.info.etag).strip('"'), written)


@contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder ``dest`` while a sync changes it.

    Two processes syncing into one folder (two agents sharing a cache) take turns, so neither
    removes the other's in-flight temp files. Where locks are not supported, it goes on unlocked.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(dest, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another download into %s to finish", dest)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on some network filesystems
            logger.debug("no lock on %s (%s); syncing unlocked", dest, exc)
        yield
    finally:
        os.close(fd)


def _local_files(dest: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file (or link) under ``dest``."""
    out = []
    for root, _, names in os.walk(dest):
        for name in names:
            path = Path(root) / name
            out.append((path.relative_to(dest).as_posix(), path))
    return out


def _clean_destination(dest: Path, wanted: set[str], *, mirror: bool, source: str) -> None:
    """Remove temp files of a killed sync from ``dest``, and with ``mirror`` every file not in ``wanted``.

    ``wanted`` holds the listing's relative keys. A mirror that has files of its own but no cache
    index was not made by this module (a user's folder given as the destination): it is refused,
    and nothing is deleted. Folders left empty are removed.
    """
    files = [(rel, path) for rel, path in _local_files(dest) if rel != CACHE_INDEX_NAME and rel not in wanted]
    parts = [path for rel, path in files if _PART_FILE.match(path.name)]
    extras = [(rel, path) for rel, path in files if mirror and not _PART_FILE.match(path.name)]
    if extras and not (dest / CACHE_INDEX_NAME).exists():
        shown = ", ".join(rel for rel, _ in extras[:5]) + (", ..." if len(extras) > 5 else "")
        raise StorageError(
            f"refusing to download {source} into {dest}: it holds {len(extras)} file(s) that are not under "
            f"that prefix ({shown}) and it is not a d2ops download folder (no {CACHE_INDEX_NAME}), so they "
            "would be deleted to mirror the listing. Use an empty or dedicated folder"
        )
    for path in parts:
        path.unlink(missing_ok=True)
    if parts:
        logger.info("removed %d temp file(s) left by an interrupted download in %s", len(parts), dest)
    for _, path in extras:
        path.unlink(missing_ok=True)
    if extras:
        shown = ", ".join(rel for rel, _ in extras[:10]) + (", ..." if len(extras) > 10 else "")
        logger.info("removed %d local file(s) not in the listing of %s from %s: %s", len(extras), source, dest, shown)
    if mirror:
        for root, _, _ in os.walk(dest, topdown=False):  # deepest first; rmdir fails on a non-empty one
            if Path(root) != dest:
                with suppress(OSError):
                    os.rmdir(root)


def _listing(uri: str, workers: int = 10) -> tuple[S3Location, S3Client, list[RemoteObject], bool]:
    """Parse ``uri``, open a client and list what is under it; nothing there is an error."""
    loc = parse_s3_uri(uri)
    client = make_s3_client(loc, max_pool_connections=max(workers, 10))
    try:
        remotes, single = _with_retries(lambda: list_remote(client, loc), f"list {loc.uri()}")
    except Exception as exc:
        raise as_storage_error(exc, loc.uri(), loc) from exc
    if not remotes:
        raise StorageError(f"no objects under {loc.uri()} — check the bucket and prefix")
    return loc, client, remotes, single


def _download_s3(uri: str, dest: Path, workers: int, progress: bool) -> tuple[TransferStats, Path]:
    started = time.perf_counter()
    loc, client, remotes, single = _listing(uri, workers)

    dest.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest):
        return _download_into(loc, client, remotes, single, dest, workers, progress, started)


def _download_into(
    loc: S3Location,
    client: S3Client,
    remotes: list[RemoteObject],
    single: bool,
    dest: Path,
    workers: int,
    progress: bool,
    started: float,
) -> tuple[TransferStats, Path]:
    wanted = {remote.info.key for remote in remotes}
    # A prefix is mirrored: what is not in its listing goes. A single object shares its folder.
    _clean_destination(dest, wanted, mirror=not single, source=loc.uri())
    old_index = _read_index(dest)
    index = {key: entry for key, entry in old_index.items() if (dest / key).is_file()}
    manifest: list[ObjectInfo] = []
    todo: list[tuple[RemoteObject, Path]] = []
    candidates: list[tuple[RemoteObject, Path]] = []
    for remote in remotes:
        target = dest / _safe_relative(remote.info.key)
        if _index_matches(remote.info, target, index.get(remote.info.key)):
            candidates.append((remote, target))
        else:
            todo.append((remote, target))
    changed = set(
        _changed_since_fetched([(r.info.key, t, index[r.info.key]["sha256"]) for r, t in candidates], workers)
    )
    for remote, target in candidates:
        if remote.info.key in changed:
            index.pop(remote.info.key, None)
            todo.append((remote, target))
        else:
            manifest.append(remote.info)
    if changed:
        shown = ", ".join(sorted(changed)[:10]) + (", ..." if len(changed) > 10 else "")
        logger.warning(
            "%d cached file(s) in %s changed since download (content hash differs), fetching again: %s",
            len(changed),
            dest,
            shown,
        )

    fetched: list[ObjectInfo] = []
    hashes: dict[str, str] = {}
    bar = _Progress(sum(remote.info.size for remote, _ in todo), f"download {loc.bucket}", progress)
    jobs = [(r.key, partial(_fetch_once, client, loc.bucket, r, target, bar, hashes)) for r, target in todo]
    failure: tuple[str, BaseException] | None = None
    interrupted = True
    try:
        failure = _run_parallel(jobs, workers, fetched)
        interrupted = False
    finally:  # also on Ctrl-C: record what did arrive, and only that
        bar.close()
        for info in fetched:
            index[info.key] = {"etag": info.etag, "size": info.size, "sha256": hashes.get(info.key)}
        try:
            _write_index(dest, index)
        except StorageError as exc:
            if not interrupted and failure is None:
                raise
            # The error already in flight (Ctrl-C, a failed transfer) is the one to report.
            logger.warning("%s (the download failed as well; that error follows)", exc)
    if failure is not None:
        key, error = failure
        raise as_storage_error(error, _key_uri(loc, key), loc) from error

    manifest.extend(fetched)
    manifest.sort(key=lambda info: info.key)
    stats = TransferStats(
        files_total=len(remotes),
        files_transferred=len(fetched),
        files_skipped=len(remotes) - len(fetched),
        bytes_transferred=sum(info.size for info in fetched),
        manifest=manifest,
        identity=dataset_identity(manifest),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "download %s -> %s: %d fetched, %d cached, %d bytes in %.2fs",
        loc.uri(),
        dest,
        stats.files_transferred,
        stats.files_skipped,
        stats.bytes_transferred,
        stats.seconds,
    )
    return stats, (dest / remotes[0].info.key) if single else dest


def remote_identity(uri_or_path: str) -> str:
    """The dataset identity of ``uri_or_path`` without downloading it: one S3 listing (keys,
    ETags, sizes), or a stat of local files. Equal data, equal identity; new data, a new one."""
    if not is_s3_uri(uri_or_path):
        return _local_stats(Path(uri_or_path)).identity
    _, _, remotes, _ = _listing(uri_or_path)
    return dataset_identity([remote.info for remote in remotes])


def _key_uri(loc: S3Location, key: str) -> str:
    """The URI of one object (full key) at ``loc``'s endpoint, for messages."""
    return S3Location(loc.bucket, key, loc.endpoint_url, loc.host, loc.secure).uri()


def _run_parallel(
    jobs: Sequence[tuple[str, Callable[[], ObjectInfo]]], workers: int, done: list[ObjectInfo]
) -> tuple[str, BaseException] | None:
    """Run (key, job) pairs ``workers`` at a time, each with retries, appending results to ``done``.

    On the first hard failure the jobs not yet started are cancelled (those running finish,
    atomically); the failure is returned with its key. Ctrl-C cancels the same way.
    """
    if not jobs:
        return None
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="d2ops-s3")
    failure: tuple[str, BaseException] | None = None
    try:
        futures = {pool.submit(_with_retries, job, f"transfer {name}"): name for name, job in jobs}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is None:
                done.append(future.result())
            elif failure is None:
                failure = (futures[future], exc)
                for other in futures:
                    other.cancel()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failure


def _local_stats(path: Path) -> TransferStats:
    """Stats for data that is already local: nothing is copied.

    The identity uses ``f"{size}-{mtime_ns}"`` as a cheap stand-in for an ETag, so touching a
    file changes it; hashing every byte of a large dataset on each run would cost more than
    the run.
    """
    started = time.perf_counter()
    if not path.exists():
        raise StorageError(f"local path {path} does not exist: check the path, or use an s3:// URI")
    files = [path] if path.is_file() else sorted(_iter_files(path))
    manifest = []
    for file in files:
        stat = file.stat()
        key = file.name if file == path else file.relative_to(path).as_posix()
        manifest.append(ObjectInfo(key, f"{stat.st_size}-{stat.st_mtime_ns}", stat.st_size))
    return TransferStats(
        files_total=len(manifest),
        files_transferred=0,
        files_skipped=len(manifest),
        bytes_transferred=0,
        manifest=manifest,
        identity=dataset_identity(manifest),
        seconds=time.perf_counter() - started,
    )


def _iter_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root``, without our cache index and stray temp files."""
    for path in root.rglob("*"):
        if path.is_file() and path.name != CACHE_INDEX_NAME and not _PART_FILE.match(path.name):
            yield path


def download(uri_or_path: str, dest: Path, *, workers: int = 16, progress: bool = True) -> TransferStats:
    """Make the data at ``uri_or_path`` available locally and say what it is.

    * ``s3://`` prefix: ``dest`` becomes an exact mirror of the listing. Every object below it
      is fetched into ``dest`` (keys become relative paths), ``workers`` at a time; objects
      whose local copy matches the ETag and size in ``dest/.d2ops-manifest.json`` and still
      hashes to the sha256 recorded there are skipped, so unchanged data costs a listing and
      one local read (no transfer). Local files the listing does not have (objects deleted
      since, strays) are removed and logged. ``dest`` must be dedicated to the prefix: a
      folder holding other files and no cache index is refused, not cleaned.
    * ``s3://`` single object (the exact key exists and is not a prefix): fetched into
      ``dest/<basename>``; other files in ``dest`` are left alone.
    * a local path: nothing is copied (``files_transferred == 0``) and ``dest`` is ignored;
      the stats describe the local files. Use :func:`resolve_local` to get the directory to
      read from in either case.

    Each object is written to a temp file beside its target and renamed into place, so an
    interrupted run never leaves a truncated file under the final name (the rename is atomic
    against interruption, not fsynced against power loss); the temp files a killed run leaves
    are removed by the next sync into ``dest``. Syncs into one ``dest`` take turns (``flock``).
    A local path is the user's own folder: nothing in it is ever deleted.

    Raises:
        StorageError: nothing under the URI, bucket missing, access denied, endpoint
            unreachable after retries, a local path that does not exist, or a ``dest`` that
            holds files of its own and is not a d2ops download folder.
    """
    return sync(uri_or_path, dest, workers=workers, progress=progress)[0]


def resolve_local(uri_or_path: str, dest: Path, *, workers: int = 16, progress: bool = True) -> Path:
    """The local path to read ``uri_or_path`` from: the path itself, or its copy under ``dest``.

    For an S3 prefix that is ``dest``; for a single S3 object, ``dest/<basename>``.
    """
    return sync(uri_or_path, dest, workers=workers, progress=progress)[1]


def sync(uri_or_path: str, dest: Path, *, workers: int = 16, progress: bool = True) -> tuple[TransferStats, Path]:
    """:func:`download` and :func:`resolve_local` in one pass: the stats and the local path to read."""
    if is_s3_uri(uri_or_path):
        return _download_s3(uri_or_path, Path(dest), workers, progress)
    local = Path(uri_or_path.removeprefix("file://")).expanduser()
    return _local_stats(local), local


# --------------------------------------------------------------------------- upload


def _ensure_bucket(client: S3Client, loc: S3Location, create: bool) -> None:
    try:
        client.head_bucket(Bucket=loc.bucket)
        return
    except bce.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
    if not create:
        raise StorageError(
            f"bucket '{loc.bucket}' does not exist at {loc.endpoint_url or 'AWS'}: "
            f"create it, check the name in {loc.uri()}, or pass create_bucket=True"
        )
    region = client.meta.region_name
    if region and region != "us-east-1":
        client.create_bucket(Bucket=loc.bucket, CreateBucketConfiguration={"LocationConstraint": region})  # type: ignore[typeddict-item]
    else:
        client.create_bucket(Bucket=loc.bucket)
    logger.info("created bucket %s at %s", loc.bucket, loc.endpoint_url or "AWS")


def _put_once(client: S3Client, bucket: str, key: str, rel: str, path: Path, progress: _Progress) -> ObjectInfo:
    """Upload one file: a single PUT for ordinary files, multipart (s3transfer) for large ones."""
    size = path.stat().st_size
    if size < _LARGE_UPLOAD_BYTES:
        with open(path, "rb") as fh:
            response = client.put_object(Bucket=bucket, Key=key, Body=fh)
        progress.update(size)
        return ObjectInfo(rel, response["ETag"].strip('"'), size)
    with progress.attempt() as on_bytes:
        client.upload_file(str(path), bucket, key, Callback=on_bytes, Config=_MULTIPART)
    head = client.head_object(Bucket=bucket, Key=key)
    return ObjectInfo(rel, head["ETag"].strip('"'), size)


def upload(
    local: Path,
    uri: str,
    *,
    workers: int = 16,
    progress: bool = True,
    create_bucket: bool = False,
) -> TransferStats:
    """Upload a file, or a directory recursively, under the URI's prefix.

    A directory's files keep their relative paths below the prefix. A single file goes to
    ``prefix/<name>`` when the prefix is empty or ends in ``/``, else to the prefix itself.
    Every file is sent (no skipping). ``create_bucket`` creates a missing bucket, which is
    handy for a local demo endpoint; otherwise a missing bucket is an error.

    Raises:
        StorageError: nothing to upload, bucket missing, access denied, endpoint unreachable.
    """
    started = time.perf_counter()
    local = Path(local)
    loc = parse_s3_uri(uri)
    if not local.exists():
        raise StorageError(f"nothing to upload: {local} does not exist")
    into_folder = not loc.prefix or loc.prefix.endswith("/")
    base = loc.prefix if into_folder else loc.prefix + "/"
    if local.is_file():
        key = base + local.name if into_folder else loc.prefix
        jobs = [(key, PurePosixPath(key).name, local)]
    else:
        jobs = [
            (base + p.relative_to(local).as_posix(), p.relative_to(local).as_posix(), p)
            for p in sorted(_iter_files(local))
        ]
    if not jobs:
        raise StorageError(f"nothing to upload: {local} holds no files")

    client = make_s3_client(loc, max_pool_connections=max(workers, 10))
    try:
        _with_retries(lambda: _ensure_bucket(client, loc, create_bucket), f"bucket {loc.bucket}")
    except StorageError:
        raise
    except Exception as exc:
        raise as_storage_error(exc, loc.uri(), loc) from exc

    bar = _Progress(sum(path.stat().st_size for _, _, path in jobs), f"upload {loc.bucket}", progress)
    manifest: list[ObjectInfo] = []
    try:
        failure = _run_parallel(
            [(key, partial(_put_once, client, loc.bucket, key, rel, path, bar)) for key, rel, path in jobs],
            workers,
            manifest,
        )
    finally:
        bar.close()
    if failure is not None:
        key, error = failure
        raise as_storage_error(error, _key_uri(loc, key), loc) from error

    manifest.sort(key=lambda info: info.key)
    stats = TransferStats(
        files_total=len(jobs),
        files_transferred=len(manifest),
        files_skipped=0,
        bytes_transferred=sum(info.size for info in manifest),
        manifest=manifest,
        identity=dataset_identity(manifest),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "upload %s -> %s: %d files, %d bytes in %.2fs",
        local,
        loc.uri(),
        stats.files_transferred,
        stats.bytes_transferred,
        stats.seconds,
    )
    return stats


def s3_problem(uri: str, want: str) -> str | None:
    """Why ``uri`` is not there (one S3 request, boto's own retries only), or None."""
    try:
        loc = parse_s3_uri(uri)
        client = make_s3_client(loc, max_pool_connections=2)
        if want == "bucket":
            try:
                client.head_bucket(Bucket=loc.bucket)
            except Exception as exc:
                status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status != 404:
                    raise
                return f"bucket '{loc.bucket}' does not exist at {loc.endpoint_url or 'AWS'}: create it or fix {uri}"
        elif want == "object":
            client.head_object(Bucket=loc.bucket, Key=loc.prefix)
        else:
            prefix = loc.prefix if not loc.prefix or loc.prefix.endswith("/") else f"{loc.prefix}/"
            listed = client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=1)
            if not listed.get("KeyCount") and not listed.get("Contents"):
                if loc.prefix and not loc.prefix.endswith("/"):
                    client.head_object(Bucket=loc.bucket, Key=loc.prefix)  # a single object is a prefix too
                else:
                    return f"no objects under {uri}: check the bucket and prefix"
    except Exception as exc:  # boto, network and parse errors: said as the storage layer says them
        if isinstance(exc, StorageError):
            return str(exc)
        try:
            loc = parse_s3_uri(uri)
        except Exception:  # parse failed above already
            return f"{type(exc).__name__}: {exc}"
        return str(as_storage_error(exc, uri, loc))
    return None


def _resolve_secure(explicit: bool | None, entry: dict[str, Any] | None, *, default: bool) -> bool:
    if explicit is not None:
        return explicit
    if entry is not None and entry.get("secure") is not None:
        return bool(entry["secure"])
    env = os.environ.get("D2OPS_S3_SECURE", "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    if env:
        raise StorageError(f"D2OPS_S3_SECURE={env!r} is not a boolean: use 1/true or 0/false")
    return default
