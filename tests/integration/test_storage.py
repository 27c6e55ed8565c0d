"""d2ops.storage.s3 against a real S3 HTTP endpoint (moto's server on 127.0.0.1); boto3 is not mocked."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import botocore.exceptions as bce
import pytest

from d2ops.storage import credentials as s3_credentials
from d2ops.storage import s3 as storage
from d2ops.storage.local_s3 import DUMMY_CREDENTIALS, LocalS3, local_s3_endpoint
from d2ops.storage.s3 import CACHE_INDEX_NAME, StorageError

_names = itertools.count()
Uploaded = tuple[str, storage.TransferStats]  # (prefix URI, upload stats)


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def no_clearml_conf(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Tests see only the clearml.conf credentials entries they add to this list."""
    entries: list[dict[str, Any]] = []
    monkeypatch.setattr(s3_credentials, "clearml_credentials", lambda: tuple(entries))
    monkeypatch.delenv("D2OPS_S3_SECURE", raising=False)
    return entries


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = {
        "a.bin": os.urandom(3000),
        "nested/b.txt": b"hello",
        "nested/deeper/c.bin": os.urandom(70_000),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def uploaded(s3: LocalS3, dataset: Path) -> Uploaded:
    """``dataset`` uploaded to a fresh bucket; returns its prefix URI and the upload stats."""
    uri = s3.uri(f"bucket-{next(_names)}", "data/")
    return uri, storage.upload(dataset, uri, create_bucket=True, progress=False)


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root, without the cache index."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != CACHE_INDEX_NAME
    }


def part_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.part")]


# --------------------------------------------------------------------------- URIs


def test_parse_endpoint_uri() -> None:
    loc = storage.parse_s3_uri("s3://127.0.0.1:9000/bucket/some/prefix/")
    assert (loc.bucket, loc.prefix, loc.host) == ("bucket", "some/prefix/", "127.0.0.1:9000")
    assert loc.endpoint_url == "http://127.0.0.1:9000"
    assert loc.secure is False
    assert loc.uri() == "s3://127.0.0.1:9000/bucket/some/prefix/"


def test_parse_aws_uri() -> None:
    loc = storage.parse_s3_uri("s3://my-bucket/weights/model.pth")
    assert (loc.bucket, loc.prefix, loc.host) == ("my-bucket", "weights/model.pth", None)
    assert loc.endpoint_url is None
    assert loc.secure is True
    assert loc.uri() == "s3://my-bucket/weights/model.pth"
    assert storage.parse_s3_uri("s3://my-bucket").prefix == ""


def test_host_without_port_is_endpoint_only_when_clearml_conf_names_it(
    no_clearml_conf: list[dict[str, Any]],
) -> None:
    uri = "s3://minio.example.com/bucket/data"
    assert storage.parse_s3_uri(uri).bucket == "minio.example.com"  # an AWS bucket with dots
    no_clearml_conf.append({"host": "minio.example.com", "key": "k", "secret": "s", "secure": True})
    loc = storage.parse_s3_uri(uri)
    assert (loc.host, loc.bucket, loc.prefix) == ("minio.example.com", "bucket", "data")
    assert loc.endpoint_url == "https://minio.example.com"


@pytest.mark.parametrize(
    ("explicit", "entry_secure", "env", "expected"),
    [
        (None, None, None, False),  # endpoint default
        (None, None, "1", True),  # env
        (None, False, "1", False),  # clearml.conf entry beats env
        (None, True, None, True),
        (False, True, "1", False),  # the argument beats everything
        (True, None, "0", True),
    ],
)
def test_secure_resolution_order(
    no_clearml_conf: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    explicit: bool | None,
    entry_secure: bool | None,
    env: str | None,
    expected: bool,
) -> None:
    no_clearml_conf.append({"host": "10.0.0.5:9000", "secure": entry_secure})
    if env is not None:
        monkeypatch.setenv("D2OPS_S3_SECURE", env)
    loc = storage.parse_s3_uri("s3://10.0.0.5:9000/b/p", secure=explicit)
    assert loc.secure is expected
    assert loc.endpoint_url == f"{'https' if expected else 'http'}://10.0.0.5:9000"


def test_aws_defaults_to_https_but_env_can_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.parse_s3_uri("s3://b/p").secure is True
    monkeypatch.setenv("D2OPS_S3_SECURE", "false")
    assert storage.parse_s3_uri("s3://b/p").secure is False


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://", "no bucket"),
        ("s3://127.0.0.1:9000/", "no bucket"),
        ("/local/path", "not an s3:// URI"),
        ("s3://AKIDSECRET:hunter2@127.0.0.1:9000/b/p", "must not carry credentials"),
    ],
)
def test_bad_uris_are_rejected(uri: str, message: str) -> None:
    with pytest.raises(StorageError, match=message) as info:
        storage.parse_s3_uri(uri)
    assert "hunter2" not in str(info.value)


def test_bad_secure_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("D2OPS_S3_SECURE", "maybe")
    with pytest.raises(StorageError, match="D2OPS_S3_SECURE"):
        storage.parse_s3_uri("s3://127.0.0.1:9000/b/p")


def test_is_s3_uri() -> None:
    assert storage.is_s3_uri("s3://b/p") and storage.is_s3_uri("S3://b")
    assert not storage.is_s3_uri("/data/s3://x") and not storage.is_s3_uri("data")


# --------------------------------------------------------------------------- transfers


def test_upload_then_download_roundtrip(uploaded: Uploaded, dataset: Path, tmp_path: Path) -> None:
    uri, up = uploaded
    assert (up.files_total, up.files_transferred, up.files_skipped) == (4, 4, 0)
    assert up.bytes_transferred == sum(len(data) for data in tree(dataset).values())

    down = storage.download(uri, tmp_path / "out", progress=False)
    assert tree(tmp_path / "out") == tree(dataset)
    assert (down.files_total, down.files_transferred, down.bytes_transferred) == (4, 4, up.bytes_transferred)
    assert [info.key for info in down.manifest] == sorted(tree(dataset))
    assert down.identity == up.identity == storage.dataset_identity(list(reversed(down.manifest)))
    assert json.loads(json.dumps(down.to_dict()))["identity"] == down.identity

    index = json.loads((tmp_path / "out" / CACHE_INDEX_NAME).read_text())
    assert index == {
        info.key: {
            "etag": info.etag,
            "size": info.size,
            "sha256": sha256((tmp_path / "out" / info.key).read_bytes()).hexdigest(),
        }
        for info in down.manifest
    }
    assert part_files(tmp_path / "out") == []


def test_large_files_go_through_managed_multipart_upload(
    s3: LocalS3, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "_LARGE_UPLOAD_BYTES", 2000)  # a.bin and c.bin take that path
    uri = s3.uri(f"bucket-{next(_names)}", "big/")
    up = storage.upload(dataset, uri, create_bucket=True, progress=False)
    down = storage.download(uri, tmp_path / "out", progress=False)
    assert tree(tmp_path / "out") == tree(dataset) and down.identity == up.identity


def test_unchanged_data_is_not_fetched_again(uploaded: Uploaded, tmp_path: Path) -> None:
    uri, _ = uploaded
    first = storage.download(uri, tmp_path / "out", progress=False)
    again = storage.download(uri, tmp_path / "out", workers=4, progress=False)
    assert (again.files_transferred, again.bytes_transferred, again.files_skipped) == (0, 0, 4)
    assert again.identity == first.identity


def test_only_changed_or_missing_objects_are_fetched(s3: LocalS3, uploaded: Uploaded, tmp_path: Path) -> None:
    uri, _ = uploaded
    out = tmp_path / "out"
    first = storage.download(uri, out, progress=False)

    changed = tmp_path / "b.txt"
    changed.write_bytes(b"hello, changed")
    storage.upload(changed, uri + "nested/b.txt", progress=False)
    (out / "a.bin").unlink()  # a local copy that went missing is fetched again too

    second = storage.download(uri, out, progress=False)
    assert second.files_transferred == 2
    assert second.bytes_transferred == len(b"hello, changed") + 3000
    assert (out / "nested/b.txt").read_bytes() == b"hello, changed"
    assert second.identity != first.identity
    assert storage.download(uri, out, progress=False).files_transferred == 0


def test_same_size_change_is_detected_by_etag(uploaded: Uploaded, tmp_path: Path) -> None:
    uri, _ = uploaded
    out = tmp_path / "out"
    storage.download(uri, out, progress=False)
    same_size = tmp_path / "b.txt"
    same_size.write_bytes(b"HELLO")
    storage.upload(same_size, uri + "nested/b.txt", progress=False)
    assert storage.download(uri, out, progress=False).files_transferred == 1
    assert (out / "nested/b.txt").read_bytes() == b"HELLO"


def test_single_object_uri(uploaded: Uploaded, tmp_path: Path) -> None:
    uri, _ = uploaded
    stats = storage.download(uri + "nested/deeper/c.bin", tmp_path / "w", progress=False)
    assert (stats.files_total, stats.files_transferred, stats.bytes_transferred) == (1, 1, 70_000)
    assert [info.key for info in stats.manifest] == ["c.bin"]
    assert sorted(tree(tmp_path / "w")) == ["c.bin"]
    path = storage.resolve_local(uri + "nested/deeper/c.bin", tmp_path / "w", progress=False)
    assert path == tmp_path / "w" / "c.bin"
    # A prefix without its trailing slash is still a prefix, not the object "data/nested".
    assert storage.resolve_local(uri + "nested", tmp_path / "n", progress=False) == tmp_path / "n"
    assert sorted(tree(tmp_path / "n")) == ["b.txt", "deeper/c.bin"]


def test_interrupted_download_leaves_no_file_under_its_final_name(
    uploaded: Uploaded, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _ = uploaded
    out = tmp_path / "out"
    real_copy = storage._copy_stream

    def disk_full_halfway(body: Any, fh: Any, on_bytes: Any) -> int:
        if Path(fh.name).name.startswith(".c.bin."):
            fh.write(body.read(1000))
            raise OSError(28, "No space left on device")
        return real_copy(body, fh, on_bytes)

    monkeypatch.setattr(storage, "_copy_stream", disk_full_halfway)
    with pytest.raises(StorageError, match=r"nested/deeper/c\.bin") as info:
        storage.download(uri, out, workers=1, progress=False)
    assert "No space left" in str(info.value)
    assert not (out / "nested/deeper/c.bin").exists()
    assert part_files(out) == []
    index = json.loads((out / CACHE_INDEX_NAME).read_text())
    assert "nested/deeper/c.bin" not in index
    assert all((out / key).stat().st_size == entry["size"] for key, entry in index.items())

    monkeypatch.setattr(storage, "_copy_stream", real_copy)
    resumed = storage.download(uri, out, progress=False)
    assert resumed.files_transferred == 4 - len(index)
    assert tree(out) == tree(dataset)


def test_transient_stream_errors_are_retried(
    uploaded: Uploaded, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _ = uploaded
    real_copy = storage._copy_stream
    calls: list[str] = []

    def flaky(body: Any, fh: Any, on_bytes: Any) -> int:
        calls.append(Path(fh.name).name)
        if len(calls) == 1:
            fh.write(body.read(10))
            raise bce.ResponseStreamingError(error="connection reset by peer")
        return real_copy(body, fh, on_bytes)

    monkeypatch.setattr(storage, "_copy_stream", flaky)
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.01)
    stats = storage.download(uri, tmp_path / "out", workers=1, progress=False)
    assert stats.files_transferred == 4 and len(calls) == 5
    assert tree(tmp_path / "out") == tree(dataset)


# --------------------------------------------------------------------------- the local copy mirrors the listing


def _s3_client(s3: LocalS3, uri: str) -> tuple[Any, str, str]:
    """A boto3 client for the endpoint, and the bucket and key prefix of ``uri``."""
    import boto3

    loc = storage.parse_s3_uri(uri)
    return boto3.client("s3", endpoint_url=s3.endpoint_url), loc.bucket, loc.prefix


def test_an_object_deleted_from_s3_is_removed_from_the_local_copy(
    s3: LocalS3, uploaded: Uploaded, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The rerun after a deletion: the local folder holds exactly the listed objects, and the identity is
    the new listing's (the files trained on are the files recorded)."""
    uri, _ = uploaded
    out = tmp_path / "out"
    first = storage.download(uri, out, progress=False)
    client, bucket, prefix = _s3_client(s3, uri)
    client.delete_object(Bucket=bucket, Key=prefix + "nested/b.txt")
    (out / "nested" / "deeper" / "stray.json").write_text("{}")  # a file no listing ever had
    (out / "old_split").mkdir()
    (out / "old_split" / "img.jpg").write_bytes(b"from an earlier version of the data")

    with caplog.at_level("INFO", logger="d2ops.storage.s3"):
        stats, root = storage.sync(uri, out, progress=False)
    assert root == out
    assert (
        sorted(tree(out))
        == sorted(info.key for info in stats.manifest)
        == ["a.bin", "empty.txt", "nested/deeper/c.bin"]
    )
    assert not (out / "nested" / "b.txt").exists() and not (out / "old_split").exists()
    assert stats.identity == storage.remote_identity(uri) != first.identity
    assert stats.files_total == 3 and stats.files_transferred == 0  # the rest was cached, nothing fetched
    assert "nested/b.txt" not in json.loads((out / CACHE_INDEX_NAME).read_text())
    assert "removed 3 local file(s) not in the listing" in caplog.text


def test_a_cached_file_changed_in_place_at_the_same_size_and_mtime_is_fetched_again(
    uploaded: Uploaded, dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri, _ = uploaded
    out = tmp_path / "out"
    storage.download(uri, out, progress=False)
    target = out / "nested" / "deeper" / "c.bin"
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[1234] ^= 0xFF  # one flipped byte: same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns

    with caplog.at_level("WARNING", logger="d2ops.storage.s3"):
        stats = storage.download(uri, out, progress=False)
    assert (stats.files_transferred, stats.bytes_transferred) == (1, 70_000)
    assert tree(out) == tree(dataset)
    assert "nested/deeper/c.bin" in caplog.text and "changed since download" in caplog.text
    assert storage.download(uri, out, progress=False).files_transferred == 0


def test_temp_files_left_by_a_killed_download_are_removed_at_the_next_sync(
    uploaded: Uploaded, dataset: Path, tmp_path: Path
) -> None:
    uri, _ = uploaded
    out = tmp_path / "out"
    storage.download(uri, out, progress=False)
    leftovers = [out / ".a.bin.0123456789ab.part", out / "nested" / "deeper" / ".c.bin.a1b2c3d4e5f6.part"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    stats = storage.download(uri, out, progress=False)
    assert stats.files_transferred == 0
    assert part_files(out) == []
    assert tree(out) == tree(dataset)


def test_a_folder_of_other_files_is_not_taken_over_as_a_download_folder(uploaded: Uploaded, tmp_path: Path) -> None:
    """A destination with files of its own and no cache index is not a d2ops copy: nothing is deleted there."""
    uri, _ = uploaded
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match=r"notes\.txt.*not a d2ops download folder"):
        storage.download(uri, mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_local_source_folder_is_used_in_place_and_never_cleaned(dataset: Path, tmp_path: Path) -> None:
    """A local data.source is the user's folder: extra files, temp-looking files and a stray index stay."""
    (dataset / ".a.bin.0123456789ab.part").write_bytes(b"user file")
    (dataset / "extra.txt").write_text("user file")
    before = tree(dataset)
    stats, root = storage.sync(str(dataset), tmp_path / "unused", progress=False)
    assert root == dataset and tree(dataset) == before
    assert "extra.txt" in [info.key for info in stats.manifest]
    assert ".a.bin.0123456789ab.part" not in [info.key for info in stats.manifest]


# --------------------------------------------------------------------------- errors


def test_missing_bucket_names_it_and_hides_credentials(s3: LocalS3, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        storage.download(s3.uri("no-such-bucket", "data/"), tmp_path, progress=False)
    message = str(info.value)
    assert "no-such-bucket" in message and "does not exist" in message and s3.host in message
    for secret in DUMMY_CREDENTIALS.values():
        if secret != "us-east-1":
            assert secret not in message


def test_empty_prefix_says_what_to_check(uploaded: Uploaded, tmp_path: Path) -> None:
    uri, _ = uploaded
    with pytest.raises(StorageError, match=r"no objects under .*check the bucket and prefix"):
        storage.download(uri + "nothing-here/", tmp_path, progress=False)
    with pytest.raises(StorageError, match="no objects under"):
        storage.download(uri + "nested/deeper/c", tmp_path, progress=False)  # not a key, not a prefix


def test_missing_credentials_point_to_env_and_clearml_conf(
    s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match=r"no S3 credentials.*AWS_ACCESS_KEY_ID.*clearml\.conf"):
        storage.download(s3.uri("any-bucket", "x/"), tmp_path, progress=False)


def test_clearml_conf_credentials_are_used_and_never_shown(
    s3: LocalS3, no_clearml_conf: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    no_clearml_conf.append({"host": s3.host, "key": "CONFKEY123", "secret": "CONFSECRET456", "secure": False})
    with pytest.raises(StorageError) as info:  # reaches the server, so credentials were found
        storage.download(s3.uri("missing-bucket", "p/"), tmp_path, progress=False)
    assert "does not exist" in str(info.value)
    assert "CONFKEY123" not in str(info.value) and "CONFSECRET456" not in str(info.value)


def test_access_denied_message_says_what_to_check() -> None:
    loc = storage.parse_s3_uri("s3://127.0.0.1:9000/b/p")
    denied = bce.ClientError(
        {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject"
    )
    message = str(storage.as_storage_error(denied, loc.uri(), loc))
    assert "access denied to s3://127.0.0.1:9000/b/p" in message
    assert "AWS_ACCESS_KEY_ID" in message and "clearml.conf" in message and "127.0.0.1:9000" in message
    assert not storage._is_retryable(denied)
    slow_down = bce.ClientError(
        {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"
    )
    assert storage._is_retryable(slow_down)


def test_unreachable_endpoint_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 1)
    monkeypatch.setattr(storage, "BOTO_MAX_ATTEMPTS", 1)
    with pytest.raises(StorageError, match=r"cannot reach http://127\.0\.0\.1:9 .*host:port"):
        storage.download("s3://127.0.0.1:9/b/p/", tmp_path, progress=False)


def test_upload_needs_create_bucket_for_a_new_bucket(s3: LocalS3, dataset: Path) -> None:
    with pytest.raises(StorageError, match="create_bucket=True"):
        storage.upload(dataset, s3.uri("not-created-yet", "x/"), progress=False)


def test_object_keys_cannot_escape_the_destination() -> None:
    for key in ("../etc/passwd", "/abs", "a/../../b"):
        with pytest.raises(StorageError, match="outside the destination"):
            storage._safe_relative(key)


# --------------------------------------------------------------------------- local paths


def test_local_path_is_used_in_place(dataset: Path, tmp_path: Path) -> None:
    stats = storage.download(str(dataset), tmp_path / "unused", progress=False)
    assert (stats.files_total, stats.files_transferred, stats.files_skipped) == (4, 0, 4)
    assert not (tmp_path / "unused").exists()
    assert storage.download(str(dataset), tmp_path / "unused").identity == stats.identity
    assert storage.resolve_local(str(dataset), tmp_path / "unused") == dataset
    (dataset / "a.bin").write_bytes(b"changed")
    assert storage.download(str(dataset), tmp_path / "unused").identity != stats.identity
    with pytest.raises(StorageError, match="does not exist"):
        storage.download(str(tmp_path / "missing"), tmp_path)


# --------------------------------------------------------------------------- real ClearML config, own server


def test_real_clearml_conf_and_subprocess_server(tmp_path: Path, dataset: Path) -> None:
    """ClearML's own loader supplies host, secure and credentials; the server runs in its own process."""
    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        import d2ops.clearml  # plugs clearml.conf's S3 credentials into storage (ClearML stays out of it)
        from d2ops.storage import s3 as storage
        from d2ops.storage.local_s3 import local_s3_endpoint

        with local_s3_endpoint(in_process=False) as s3:
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                del os.environ[name]
            conf = Path(sys.argv[1]) / "clearml.conf"
            conf.write_text('sdk.aws.s3.credentials: [{host: "%s", key: "ck", secret: "cs", secure: false},'
                            ' {host: "minio.example.com", secure: true}]' % s3.host)
            os.environ["CLEARML_CONFIG_FILE"] = str(conf)
            loc = storage.parse_s3_uri("s3://minio.example.com/bucket/data")
            assert (loc.host, loc.secure) == ("minio.example.com", True), loc
            up = storage.upload(Path(sys.argv[2]), s3.uri("bkt", "d/"), create_bucket=True, progress=False)
            down = storage.download(s3.uri("bkt", "d/"), Path(sys.argv[1]) / "out", progress=False)
            assert down.identity == up.identity and down.files_transferred == 4, down
        print("ok")
        """
    )
    env = dict(os.environ, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no"), AWS_EC2_METADATA_DISABLED="true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "CLEARML_CONFIG_FILE"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(dataset)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_local_endpoint_restores_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "before")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with local_s3_endpoint() as endpoint:
        assert os.environ["AWS_ACCESS_KEY_ID"] == DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"]
        assert endpoint.uri("b", "/p") == f"s3://{endpoint.host}/b/p"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "before"
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ
