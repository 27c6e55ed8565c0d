"""One ModelBundle: its files, checks, version, zip and atomic write; and a serving stack that loads it alone.

The isolation tests run real processes: a fresh interpreter that imports every serving module and
answers a request, and ``python -m d2ops serve`` itself with Python's import-time log
(``PYTHONPROFILEIMPORTTIME``), which lists every module the server process imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from d2ops.model.bundle import InconsistentBundleError, ModelBundle, ModelNotFoundError
from d2ops.testing import wait_until_ready

REPO = Path(__file__).resolve().parents[2]
#: Modules a server loading a local bundle must never import: training, checkpoints, S3 transfers, ClearML.
FORBIDDEN = ("d2ops.engine", "d2ops.storage", "d2ops.pipeline", "d2ops.registry", "d2ops.data", "d2ops.evaluation",
             "d2ops.clearml", "boto3", "botocore", "clearml")  # fmt: skip


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> ModelBundle:
    return ModelBundle.open(tiny_bundle).copy_to(tmp_path / "bundle")


# ------------------------------------------------------------------------------------------ the bundle


def test_write_records_every_file_and_its_sha256_and_is_readable_by_others(tiny_bundle: Path) -> None:
    bundle = ModelBundle.open(tiny_bundle)
    assert [p.name for p in bundle.files()] == list(ModelBundle.FILES)
    recorded = bundle.metadata()["files"]
    assert sorted(recorded) == sorted(ModelBundle.HASHED)
    for name, digest in recorded.items():
        assert hashlib.sha256((tiny_bundle / name).read_bytes()).hexdigest() == digest
    # mkdtemp's 0700 would make the bundle unreadable to a serving image running as another user
    assert tiny_bundle.stat().st_mode & 0o755 == 0o755
    from d2ops.data.synthetic import SHAPE_CLASSES

    assert bundle.labels() == list(SHAPE_CLASSES)
    bundle.verify()


def test_version_is_a_content_hash(bundle: ModelBundle, tmp_path: Path) -> None:
    copy = bundle.copy_to(tmp_path / "copy")
    assert copy.version() == bundle.version()
    (copy.path / ModelBundle.LABELS).write_text(json.dumps(["a", "b", "c"]))
    assert copy.version() != bundle.version()


def test_a_half_replaced_bundle_fails_verification_naming_the_files(bundle: ModelBundle) -> None:
    (bundle.path / ModelBundle.LABELS).write_text(json.dumps(["new", "labels", "first"]))
    with pytest.raises(InconsistentBundleError, match=r"labels\.json differ from what metadata\.json records"):
        bundle.verify()


def test_a_bundle_without_recorded_hashes_still_verifies(bundle: ModelBundle) -> None:
    meta = bundle.metadata()
    del meta["files"]
    (bundle.path / ModelBundle.METADATA).write_text(json.dumps(meta))
    bundle.verify()


def test_open_names_the_missing_files_and_the_accepted_forms(bundle: ModelBundle) -> None:
    (bundle.path / ModelBundle.LABELS).unlink()
    with pytest.raises(ModelNotFoundError, match=r"missing labels\.json.*s3:// URI"):
        ModelBundle.open(bundle.path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ModelBundle.open(bundle.path / "nowhere")


def test_labels_that_are_not_a_list_of_names_are_a_clear_error(bundle: ModelBundle) -> None:
    (bundle.path / ModelBundle.LABELS).write_text(json.dumps({"0": "circle"}))
    with pytest.raises(ModelNotFoundError, match="must be a JSON list of class names"):
        bundle.labels()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_bundle_says_how_to_fix_it(bundle: ModelBundle) -> None:
    (bundle.path / ModelBundle.WEIGHTS).chmod(0o000)
    with pytest.raises(ModelNotFoundError, match="chmod -R a\\+rX"):
        ModelBundle.open(bundle.path)


def test_zip_and_extract_round_trip_to_the_same_version(bundle: ModelBundle, tmp_path: Path) -> None:
    archive = bundle.zip(tmp_path / "out" / "model.zip")
    assert archive.stat().st_mode & 0o777 == 0o644, "readable by a server running as another user"
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(ModelBundle.FILES)
    cache = tmp_path / "cache"
    folder = ModelBundle.extract(archive, cache)
    assert ModelBundle.open(folder).version() == bundle.version()
    assert folder.stat().st_mode & 0o755 == 0o755
    assert ModelBundle.extract(archive, cache) == folder  # reused, not extracted twice
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_bad_zip_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "model.zip"
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match="not a readable bundle zip"):
        ModelBundle.extract(archive, cache)
    assert list(cache.iterdir()) == []


def test_find_looks_one_folder_down(bundle: ModelBundle, tmp_path: Path) -> None:
    outer = tmp_path / "download"
    shutil.copytree(bundle.path, outer / "bundle")
    assert ModelBundle.find(outer) == outer / "bundle"
    assert ModelBundle.find(bundle.path) == bundle.path


def test_detector_from_bundle_and_from_files_agree(bundle: ModelBundle) -> None:
    from d2ops.model.detector import Detector, Frame

    image = np.random.default_rng(0).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    a = Detector.from_bundle(bundle, device="cpu").predict([image])[0]
    b = Detector.from_files(bundle.config_file, bundle.weights, bundle.labels(), device="cpu").predict([image])[0]
    assert a and [d.to_dict() for d in a] == [d.to_dict() for d in b]
    # A Frame decoded at half size for a frame twice as large: boxes come back in the large frame's coordinates.
    half = Detector.from_bundle(bundle, device="cpu").predict([Frame(image, 192, 256)])[0]
    assert max(d.box[2] for d in half) > 128 or max(d.box[3] for d in half) > 96


# ------------------------------------------------------------------------------------ serving isolation


def test_the_serving_package_imports_no_training_transfer_or_clearml_code(tiny_bundle: Path) -> None:
    """Every serving module, a bundle loaded and one prediction, in a fresh interpreter."""
    code = f"""
import sys
import numpy as np
import d2ops.serving.http, d2ops.serving.nuclio, d2ops.serving.clearml_engine, d2ops.serving.payloads
from d2ops.serving.core import DetectorAPI
api = DetectorAPI(device="cpu")
detector = api.setup(__import__("pathlib").Path({str(tiny_bundle)!r}))
assert detector.predict([np.zeros((64, 64, 3), np.uint8)])
print("\\n".join(sorted(sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = result.stdout.split()
    assert "d2ops.model.detector" in modules and "detectron2.modeling" in modules
    leaked = [m for m in modules if m.startswith(FORBIDDEN)]
    assert not leaked, f"the serving stack imported {leaked}"


def test_d2ops_serve_of_a_local_bundle_imports_no_training_transfer_or_clearml_code(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """``python -m d2ops serve`` as users start it; PYTHONPROFILEIMPORTTIME logs every import it makes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "d2ops", "serve", "--model", str(tiny_bundle), "--port", str(port),
               "--device", "cpu"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(port, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    imported = [line.rsplit("|", 1)[-1].strip() for line in log.read_text().splitlines() if "import time:" in line]
    assert "d2ops.serving.http" in imported and "detectron2.modeling" in imported
    leaked = [m for m in imported if m.startswith(FORBIDDEN)]
    assert not leaked, f"d2ops serve imported {leaked}"


def test_the_cli_step_names_are_the_pipelines() -> None:
    from d2ops.cli import STEP_NAMES
    from d2ops.pipeline.steps import STEPS

    assert STEP_NAMES == STEPS
