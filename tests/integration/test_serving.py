"""Unit and in-process tests of the serving core: settings, the micro-batcher, hot swap, the API class.

The end-to-end tests (a real server in a subprocess, real HTTP) are in test_server.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from d2ops.cli.serve import serve_main
from d2ops.model.detector import Detection, Detector
from d2ops.serving.core import (
    MIB,
    TOKEN_ENV,
    DetectorAPI,
    MicroBatcher,
    ModelHolder,
    Overloaded,
    ServeSettingsError,
    SourceWatcher,
    bundle_version,
    default_model_name,
    load_model,
    load_settings,
)
from d2ops.serving.formats import DEFAULT_MAX_PIXELS, decode_image
from d2ops.serving.http import create_app
from d2ops.utils.device import CPU_THREADS_PER_REPLICA, machine_cpus, machine_replicas

# ------------------------------------------------------------------------------------------- settings


def test_defaults() -> None:
    s = load_settings({"model": "bundle"}, environ={})
    assert s.max_body_size == 32 * MIB
    assert s.max_pixels == DEFAULT_MAX_PIXELS
    assert (s.max_batch_size, s.workers, s.token, s.watch) == (8, None, None, False)
    # replicas from the machine: no GPU here, so one per CPU_THREADS_PER_REPLICA CPUs, at least one
    assert s.replicas == machine_replicas("cpu") == max(1, machine_cpus() // CPU_THREADS_PER_REPLICA)
    assert load_settings({"model": "bundle", "workers": 3}, environ={}).replicas == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_batch_size": 0}, "--max-batch-size: Input should be greater than or equal to 1 (got 0)"),
        ({"threshold": 1.5}, "--threshold: Input should be less than or equal to 1"),
        ({"device": "gpu"}, "--device: String should match pattern"),
        ({"request_timeout": 0}, "--request-timeout: Input should be greater than 0"),
        ({"max_queue_depth": -1}, "--max-queue-depth"),
        ({"port": 70000}, "--port"),
        ({"bogus": 1}, "--bogus: Extra inputs are not permitted"),
    ],
)
def test_bad_settings_name_the_option(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ServeSettingsError) as err:
        load_settings({"model": "bundle", **values}, environ={})
    assert message in str(err.value)


def test_token_comes_from_the_environment_and_is_never_shown() -> None:
    s = load_settings({"model": "bundle", "token": "from-cli"}, environ={TOKEN_ENV: "s3cret-value"})
    assert s.token is not None and s.token.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(s) and "s3cret-value" not in s.model_dump_json()
    assert load_settings({"model": "bundle"}, environ={TOKEN_ENV: ""}).token is None


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("outputs/demo/run/bundle/d2ops-shapes/", "d2ops-shapes"),
        ("models/shapes.zip", "shapes"),
        ("s3://minio:9000/models/shapes-v2", "shapes-v2"),
        ("clearml://d2ops/smoke/d2ops-shapes-smoke@prod", "d2ops-shapes-smoke"),
    ],
)
def test_default_model_name(ref: str, name: str) -> None:
    assert default_model_name(ref) == name


def test_serve_main_rejects_bad_options_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serve_main(["--model", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- batching


class Recorder:
    """A stand-in model for the batcher: doubles each input, sleeps per batch, records batch sizes."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.batches: list[list[Any]] = []

    def __call__(self, images: list[Any], thresholds: list[float]) -> list[Any]:
        self.batches.append(list(images))
        time.sleep(self.seconds)
        return [2 * x for x in images]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_batcher(model: Recorder, body: Any, **kwargs: Any) -> Any:
    batcher = MicroBatcher(model, **kwargs)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def _deadline(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


def test_concurrent_requests_share_forward_passes_and_get_their_own_results() -> None:
    model = Recorder()

    async def body(b: MicroBatcher) -> list[Any]:
        return await asyncio.gather(*(b.submit([i], [0.0], _deadline()) for i in range(20)))

    results = _run(_with_batcher(model, body, max_batch_size=8, max_wait_s=0.01, expected_arrivals=lambda: 20))
    assert results == [[2 * i] for i in range(20)]
    assert max(len(b) for b in model.batches) == 8 and len(model.batches) < 20
    assert sorted(x for b in model.batches for x in b) == list(range(20))


def test_batch_size_one_disables_batching() -> None:
    model = Recorder(0.01)

    async def body(b: MicroBatcher) -> list[Any]:
        return await asyncio.gather(*(b.submit([i], [0.0], _deadline()) for i in range(6)))

    assert _run(_with_batcher(model, body, max_batch_size=1)) == [[2 * i] for i in range(6)]
    assert [len(b) for b in model.batches] == [1] * 6


def test_a_lone_request_does_not_wait_for_company() -> None:
    model = Recorder(0.0)

    async def body(b: MicroBatcher) -> float:
        started = time.perf_counter()
        await b.submit([1], [0.0], _deadline())
        return time.perf_counter() - started

    assert _run(_with_batcher(model, body, max_batch_size=8, max_wait_s=2.0)) < 0.5


def test_several_images_of_one_request_go_in_together_or_not_at_all() -> None:
    model = Recorder(0.2)

    async def body(b: MicroBatcher) -> tuple[list[Any], int]:
        first = asyncio.create_task(b.submit([1], [0.0], _deadline()))
        await asyncio.sleep(0.05)  # the first image is running; the queue (depth 3) is empty
        second = asyncio.create_task(b.submit([2, 3], [0.0, 0.0], _deadline()))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as err:
            await b.submit([4, 5], [0.0, 0.0], _deadline())  # 2 waiting + 2 > 3
        return [await first, await second], err.value.retry_after

    results, retry_after = _run(_with_batcher(model, body, max_batch_size=4, max_queue_depth=3))
    assert results == [[2], [4, 6]] and retry_after >= 1


def test_timed_out_requests_are_dropped_from_the_queue() -> None:
    model = Recorder(0.3)

    async def body(b: MicroBatcher) -> None:
        running = asyncio.create_task(b.submit([1], [0.0], _deadline()))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):
            await b.submit([2], [0.0], _deadline(0.1))
        assert await running == [2]

    _run(_with_batcher(model, body, max_batch_size=1))
    assert model.batches == [[1]]  # the timed-out image never reached the model


def test_stop_drains_queued_work_and_refuses_new_work() -> None:
    model = Recorder(0.05)

    async def body() -> list[Any]:
        b = MicroBatcher(model, max_batch_size=1)
        await b.start()
        pending = [asyncio.create_task(b.submit([i], [0.0], _deadline())) for i in range(4)]
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="shutting down"):
            await b.submit([9], [0.0], _deadline())
        await stopping
        return [p.result() for p in pending]

    assert _run(body()) == [[0], [2], [4], [6]]


def test_a_failing_model_fails_its_batch_only() -> None:
    calls = []

    def flaky(images: list[Any], thresholds: list[float]) -> list[Any]:
        calls.append(images)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return images

    async def body(b: MicroBatcher) -> Any:
        with pytest.raises(RuntimeError, match="out of memory"):
            await b.submit([1], [0.0], _deadline())
        return await b.submit([2], [0.0], _deadline())

    assert _run(_with_batcher(flaky, body)) == [2]  # type: ignore[arg-type]


def test_bad_batcher_arguments_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="1 disables batching"):
        MicroBatcher(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_depth must be >= 1"):
        MicroBatcher(Recorder(), max_queue_depth=0)


# ---------------------------------------------------------------------------------------- models


def _png(seed: int, width: int = 128, height: int = 128) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_api_predict_applies_each_images_threshold(tiny_bundle: Path) -> None:
    api = DetectorAPI(device="cpu")
    detector = api.setup(tiny_bundle)
    images = [decode_image(_png(1)), decode_image(_png(2))]
    low, high = api.predict(detector, images, [0.0, 0.25])
    assert low and all(d.score >= 0.25 for d in high)
    reference = detector.predict(images[1:], score_threshold=0.25)[0]
    assert [d.label for d in high] == [d.label for d in reference]
    assert api.encode_response(high, "torchserve") == [{d.label: d.box, "score": d.score} for d in high]


def test_api_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="device must be"):
        DetectorAPI(device="tpu")
    with pytest.raises(ValueError, match="max_pixels"):
        DetectorAPI(max_pixels=0)


def test_load_model_describes_the_bundle(tiny_bundle: Path) -> None:
    settings = load_settings({"model": str(tiny_bundle), "device": "cpu"}, environ={})
    loaded = load_model(DetectorAPI("cpu"), settings)
    info = loaded.info
    assert info.name == tiny_bundle.name and info.version == bundle_version(tiny_bundle)
    assert info.labels == loaded.detector.labels and info.metrics == {"bbox": {"AP50": 0.0}}
    assert info.metadata["experiment"] == "tiny" and info.source == str(tiny_bundle) and info.device == "cpu"

    holder = ModelHolder()
    assert holder.current is None and holder.swap(loaded) is None and holder.current is loaded


def test_source_fingerprints(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, folder)
    watcher = SourceWatcher(str(folder))
    before = watcher.fingerprint()
    assert watcher.watchable and watcher.fingerprint() == before
    (folder / "metadata.json").write_text('{"experiment": "retrained"}')
    assert watcher.fingerprint() != before

    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("labels.json", "[]")
    zipped = SourceWatcher(str(archive))
    first = zipped.fingerprint()
    time.sleep(0.01)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("metrics.json", "{}")
    assert zipped.fingerprint() != first

    assert not SourceWatcher("0123456789abcdef0123456789abcdef").watchable


def test_a_bundle_on_s3_loads_and_is_watched_by_its_etags(tiny_bundle: Path, tmp_path: Path) -> None:
    from d2ops.storage import s3 as storage
    from d2ops.storage.local_s3 import local_s3_endpoint

    with local_s3_endpoint() as s3:
        uri = s3.uri("models", "shapes/")
        storage.upload(tiny_bundle, uri, create_bucket=True, progress=False)
        settings = load_settings({"model": uri, "device": "cpu", "cache_dir": str(tmp_path / "cache")}, environ={})
        loaded = load_model(DetectorAPI("cpu"), settings)
        assert (loaded.info.name, loaded.info.version) == ("shapes", bundle_version(tiny_bundle))
        watcher = SourceWatcher(uri)
        before = watcher.fingerprint()
        assert before == watcher.fingerprint()
        changed = tmp_path / "metadata.json"
        changed.write_text('{"experiment": "retrained"}')
        storage.upload(changed, uri, progress=False)
        assert watcher.fingerprint() != before


# ------------------------------------------------------------------------------- unexpected errors


class BrokenAPI(DetectorAPI):
    def predict(self, detector: Detector, images: Sequence[Any], thresholds: Sequence[float]) -> list[list[Detection]]:
        raise RuntimeError("something deep in the model broke")


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_unexpected_errors_are_logged_and_answered_with_a_plain_500(
    tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    settings = load_settings({"model": str(tiny_bundle), "device": "cpu"}, environ={})
    with TestClient(create_app(settings, api=BrokenAPI("cpu"))) as client:
        for _ in range(100):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        with caplog.at_level(logging.ERROR):
            reply = client.post(f"/predictions/{tiny_bundle.name}", content=_png(3))
        assert reply.status_code == 500 and reply.json() == {"error": "internal error"}
        assert "something deep" not in reply.text
        assert any("something deep in the model broke" in (r.exc_text or "") for r in caplog.records)
        assert client.get("/health").status_code == 200
