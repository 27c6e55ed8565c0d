"""``d2ops serve --watch`` when nothing but the bundle's own files can show what is complete or genuine.

Each case runs a real server process (``ServerProcess``) on a real seeded-random bundle:

- a bundle from before d2ops recorded per-file sha256s, replaced file by file while a client polls: it is hashed
  at load and swapped in only once its files have stayed unchanged for ``--quiet-period`` (never labels of the new
  version with the weights of the old);
- an exported bundle whose graph bytes were changed and its recorded sha256 updated to match: the one-image
  reference its export recorded no longer comes out, so the bundle is refused at start and at a hot reload.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from d2ops.model.bundle import ModelBundle, ReferenceMismatchError, sha256_file
from d2ops.model.detector import Detector
from d2ops.model.export import check_reference, export_bundle
from d2ops.testing import build_tiny_bundle

from .test_export import _images
from .test_server import HTTP_TIMEOUT, ServerProcess, _b64, _png

Reply = tuple[tuple[str, tuple[float, ...]], ...]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hot-reload-logs")


def _unhashed(bundle: Path) -> None:
    """Make ``bundle`` look like one built before d2ops recorded the sha256 of each file."""
    meta = json.loads((bundle / ModelBundle.METADATA).read_text())
    meta.pop("files")
    (bundle / ModelBundle.METADATA).write_text(json.dumps(meta))


def _predict(url: str, image: str) -> Reply:
    """The reply's shapes as (label, box rounded to 0.01 px): equal replies, equal model."""
    reply = httpx.post(f"{url}/predict", json={"image": image}, timeout=HTTP_TIMEOUT)
    assert reply.status_code == 200, reply.text
    return tuple((s["label"], tuple(round(float(v), 2) for v in s["points"])) for s in reply.json())


def _version(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=HTTP_TIMEOUT).json()["models"][0]["version"])


@pytest.mark.slow  # about 20 s on 2 cores: `make test` runs it, `make test-fast` does not
def test_an_unhashed_bundle_replaced_file_by_file_is_swapped_only_once_its_files_hold_still(
    tiny_bundle: Path, logs: Path, tmp_path: Path
) -> None:
    """Before: labels.json replaced first, the weights 3 s later, and the server served the old weights under the
    new labels in between (a bundle without sha256s passed every check)."""
    served = ModelBundle.open(tiny_bundle).copy_to(tmp_path / "served")
    _unhashed(served.path)
    old_labels = served.labels()
    source = ModelBundle.open(build_tiny_bundle(tmp_path / "new-weights", seed=5))
    new = ModelBundle.write(tmp_path / "new", weights=source.weights, d2_config=source.config_file,
                            labels=list(reversed(old_labels)), metrics=source.metrics(),
                            metadata={"experiment": "new"})  # fmt: skip
    _unhashed(new.path)
    image = _b64(_png(4))
    proc = ServerProcess(served.path, logs, "--watch", "--poll-interval", "0.3", "--quiet-period", "6")
    replies: list[Reply] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            replies.append(_predict(proc.url, image))

    try:
        proc.wait_listening()
        proc.wait_ready()
        old = _predict(proc.url, image)
        client = threading.Thread(target=poll, daemon=True)
        client.start()
        shutil.copy2(new.path / ModelBundle.LABELS, served.path / ModelBundle.LABELS)
        time.sleep(3)  # the publisher's pace between files (not a wait for the server): ten polls of the source
        for name in (ModelBundle.WEIGHTS, ModelBundle.CONFIG, ModelBundle.METRICS, ModelBundle.METADATA):
            shutil.copy2(new.path / name, served.path / name)
        deadline = time.monotonic() + 90
        while _version(proc.url) != new.version():
            assert time.monotonic() < deadline and client.is_alive(), proc.tail()
            time.sleep(0.2)
        after = _predict(proc.url, image)
        stop.set()
        client.join(HTTP_TIMEOUT)
    finally:
        stop.set()
        proc.stop()
    renamed = dict(zip(old_labels, new.labels(), strict=True))
    mixed = tuple((renamed[label], box) for label, box in old)  # the old weights under the new labels
    assert len({old, mixed, after}) == 3, "the replies of the old, the mixed and the new model differ"
    others = [reply == mixed for reply in replies if reply not in (old, after)]
    assert replies and not others, f"{len(others)} of {len(replies)} replies mixed versions ({sum(others)} were "
    "the old weights under the new labels)"
    assert "records no sha256" in proc.log()


# ------------------------------------------------------------------------------ exported graph, changed


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """An ONNX export of the tiny bundle (one export for the module; copies are changed, never this one)."""
    out = tmp_path_factory.mktemp("hot-reload-export") / "onnx"
    return ModelBundle.open(export_bundle(tiny_bundle, "onnx", out, images=_images(2)).path)


def _flip_graph(bundle: ModelBundle) -> None:
    """Negate the graph's largest weight tensor and record the new file's sha256, as a careless edit would."""
    import onnx
    from onnx import numpy_helper

    entry = bundle.runtimes()["onnx"]
    path = bundle.path / entry["file"]
    model = onnx.load(str(path))
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    largest.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(largest), largest.name))
    onnx.save(model, str(path))
    meta = bundle.metadata()
    meta["runtimes"]["onnx"]["files"][entry["file"]] = sha256_file(path)
    (bundle.path / ModelBundle.METADATA).write_text(json.dumps(meta))
    bundle.verify()  # the recorded sha256 matches: only the reference outputs can tell


@pytest.fixture
def flipped(exported: ModelBundle, tmp_path: Path) -> Iterator[ModelBundle]:
    bundle = exported.copy_to(tmp_path / "flipped")
    _flip_graph(bundle)
    yield bundle


def test_an_export_records_a_reference_that_a_changed_graph_fails(exported: ModelBundle, flipped: ModelBundle) -> None:
    """Before: no reference was recorded, and a graph whose bytes and recorded sha256 both changed loaded."""
    entry = exported.runtimes()["onnx"]
    reference = entry["reference"]
    assert reference["detections"] and reference["image"] in entry["files"]
    exported.verify()
    check_reference(Detector.from_bundle(exported, device="cpu", runtime="onnx"), exported)
    with pytest.raises(ReferenceMismatchError, match=r"does not give the detections recorded .* Re-export"):
        check_reference(Detector.from_bundle(flipped, device="cpu", runtime="onnx"), flipped)
    check_reference(Detector.from_bundle(flipped, device="cpu", runtime="pytorch"), flipped)  # the graph is unused


@pytest.mark.slow  # a server start and two model loads: 5 s or more on 2 cores
def test_a_changed_graph_is_refused_at_start_and_at_a_hot_reload(
    exported: ModelBundle, flipped: ModelBundle, logs: Path, tmp_path: Path
) -> None:
    refused = ServerProcess(flipped.path, logs, "--runtime", "onnx")
    try:
        assert refused.proc.wait(120) == 1, refused.tail()
    finally:
        refused.stop()
    assert "does not give the detections recorded" in refused.log() and "Traceback" not in refused.log()

    served = exported.copy_to(tmp_path / "served")
    image = _b64(_png(2))
    proc = ServerProcess(served.path, logs, "--runtime", "onnx", "--watch", "--poll-interval", "0.3")
    try:
        proc.wait_listening()
        proc.wait_ready()
        before = _predict(proc.url, image)
        for path in flipped.files():  # the graph, then metadata.json with its new sha256
            if path.name in (flipped.runtimes()["onnx"]["file"], ModelBundle.METADATA):
                shutil.copy2(path, served.path / path.name)
        deadline = time.monotonic() + 90
        while "is refused; the old one keeps serving" not in proc.log():
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.tail()
            time.sleep(0.2)
        assert _predict(proc.url, image) == before, "the old graph keeps serving"
        assert "does not give the detections recorded" in proc.log()
    finally:
        proc.stop()
