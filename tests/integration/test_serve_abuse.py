"""``d2ops serve`` against hostile and unusual clients: each case runs against a real server process.

One client must never hurt another: memory per request is bounded before decoding, an image the model
cannot take fails only its own request, slow clients are cut off, a hot swap never mixes two versions,
and camera and scientific images come back in the frame the client sees.
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from d2ops.model.bundle import ModelBundle
from d2ops.model.detector import Detector
from d2ops.serving.core import MicroBatcher
from d2ops.serving.formats import decode_frame, decode_image

from .test_server import HTTP_TIMEOUT, ServerProcess, _b64, _png


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("abuse-logs")


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, logs: Path) -> Iterator[ServerProcess]:
    with ServerProcess.ready(tiny_bundle, logs, "--body-timeout", "2", "--max-batch-size", "8") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def detector(tiny_bundle: Path) -> Detector:
    return Detector.from_bundle(tiny_bundle, device="cpu")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _boxes(reply: list[dict[str, object]]) -> list[list[float]]:
    return [list(map(float, s["points"])) for s in reply]  # type: ignore[arg-type]


def _expected(detector: Detector, frame: object) -> list[list[float]]:
    return [d.box for d in detector.predict([frame], 0.0)[0]]  # type: ignore[list-item]


# ------------------------------------------------------------------------------------------ memory


def test_a_request_that_can_never_fit_is_a_413_before_any_decoding(server: ServerProcess, client: httpx.Client) -> None:
    """65 large grayscale PNGs in one request took the old server to 8.9 GB before a 503."""
    big_gray = _encode(Image.new("L", (6000, 6000), 128), "PNG")  # 36 Mpx each, a few KB compressed
    before = _rss_kib(server.proc.pid)
    reply = client.post("/predict", json={"images": [_b64(big_gray)] * 65})
    assert reply.status_code == 413 and "Retry-After" not in reply.headers
    assert "split the request" in reply.json()["error"]
    few = client.post("/predict", json={"images": [_b64(big_gray)] * 4})  # 144 Mpx: over the pixel budget
    assert few.status_code == 413 and "--max-request-pixels" in few.json()["error"]
    assert _rss_kib(server.proc.pid) - before < 300 * 1024, "nothing was decoded"
    assert client.post("/predict", json={"image": _b64(_png(1))}).status_code == 200


# ------------------------------------------------------------------------------ one bad image, alone


def test_extreme_aspect_ratios_fail_only_their_own_requests(server: ServerProcess, tiny_bundle: Path) -> None:
    """Before: a 1x600 image left a 0-pixel side after the resize, and its whole micro-batch got 500."""
    thin = [_b64(_encode(Image.new("RGB", size, 100), "PNG")) for size in ((1, 600), (100000, 1), (2000, 2))]
    good = _b64(_png(3))

    def send(body: str) -> int:
        return httpx.post(f"{server.url}/predict", json={"image": body}, timeout=HTTP_TIMEOUT).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        bodies = [thin[i % 3] if i % 3 == 0 else good for i in range(36)]
        codes = list(pool.map(send, bodies))
    assert [c for b, c in zip(bodies, codes, strict=True) if b == good] == [200] * 24
    assert {c for b, c in zip(bodies, codes, strict=True) if b != good} == {400}


def test_a_batch_that_fails_is_rerun_image_by_image_so_only_the_culprit_fails() -> None:
    """The batcher's own guard, for failures no decode check foresees."""

    def run_batch(images: list[int], thresholds: list[float]) -> list[int]:
        if 13 in images:
            raise ValueError("the model cannot take image 13")
        return [i * 2 for i in images]

    async def main() -> list[object]:
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0.05, expected_arrivals=lambda: 8)
        await batcher.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            calls = [batcher.submit([i], [0.5], deadline) for i in (1, 2, 13, 4)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results[0] == [2] and results[1] == [4] and results[3] == [8]
    assert isinstance(results[2], ValueError)


# --------------------------------------------------------------------------- camera and science images


def test_exif_orientation_is_applied_like_training_does(client: httpx.Client, detector: Detector) -> None:
    upright = Image.fromarray(decode_image(_png(7, 96, 160))[:, :, ::-1])  # 96 wide, 160 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; "rotate 90 CW to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    reply = client.post("/predict", json={"image": _b64(data)})
    assert reply.status_code == 200
    frame = decode_frame(data)
    assert (frame.width, frame.height) == (96, 160), "the displayed frame, not the stored one"
    np.testing.assert_allclose(_boxes(reply.json()), _expected(detector, frame), atol=0.05)
    assert max(b[3] for b in _boxes(reply.json())) > 96, "boxes in the upright 96x160 frame"


@pytest.mark.parametrize("fmt", ["MPO", "PPM", "TGA", "ICO", "PCX", "SGI"])
def test_every_still_format_pillow_reads_is_served(client: httpx.Client, fmt: str) -> None:
    image = Image.fromarray(decode_image(_png(4, 64, 48))[:, :, ::-1])
    data = _encode(image, fmt)
    reply = client.post("/predict", json={"image": _b64(data)})
    assert reply.status_code == 200, reply.text
    assert reply.json(), "the random tiny model always proposes boxes"


def test_16_bit_and_float_images_are_scaled_not_clipped(client: httpx.Client, detector: Detector) -> None:
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 255, size=(64, 96), dtype=np.uint8)
    sixteen = _encode(Image.fromarray(eight.astype(np.uint16) * 257), "PNG")  # 16-bit grayscale
    floats = _encode(Image.fromarray(eight.astype(np.float32) / 255.0, mode="F"), "TIFF")
    reference = _expected(detector, np.repeat(eight[:, :, None], 3, axis=2))
    for data in (sixteen, floats):
        assert decode_image(data)[:, :, 0].tolist() == eight.tolist(), "the same pixels as the 8-bit image"
        reply = client.post("/predict", json={"image": _b64(data)})
        assert reply.status_code == 200
        np.testing.assert_allclose(_boxes(reply.json()), reference, atol=0.05)


def test_line_wrapped_base64_is_accepted(client: httpx.Client) -> None:
    wrapped = base64.encodebytes(_png(2)).decode()  # 76-character lines, as openssl base64 writes
    assert "\n" in wrapped
    assert client.post("/predict", json={"image": wrapped}).status_code == 200


def test_a_large_frame_is_served_reduced_with_shapes_in_its_own_pixels(
    client: httpx.Client, detector: Detector
) -> None:
    """Before: an 8000x5100 frame got 400 "image too large" and failed CVAT's whole job."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, size=(51, 80, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((8000, 5100), Image.Resampling.NEAREST)
    data = _encode(big, "JPEG", quality=80)
    reply = client.post("/predict", json={"image": _b64(data)})
    assert reply.status_code == 200, reply.text
    frame = decode_frame(data)
    assert (frame.width, frame.height) == (8000, 5100) and frame.pixels.size < 8000 * 5100 * 3 / 2
    boxes = _boxes(reply.json())
    np.testing.assert_allclose(boxes, _expected(detector, frame), rtol=1e-3, atol=1.0)
    assert max(b[2] for b in boxes) > 1000, "coordinates of the 8000-pixel-wide frame"


# --------------------------------------------------------------------------------------- slow clients


def test_a_body_trickled_byte_by_byte_is_cut_off_with_408(server: ServerProcess, client: httpx.Client) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")  # fmt: skip
        reply = b""
        sock.settimeout(0.5)
        while time.monotonic() - started < 20 and b"\r\n\r\n" not in reply:
            try:
                sock.sendall(b"{")
            except OSError:
                break
            try:
                reply += sock.recv(4096)
            except TimeoutError:
                continue
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < 10
    assert client.post("/predict", json={"image": _b64(_png(1))}).status_code == 200


def test_huge_headers_are_refused(server: ServerProcess, client: httpx.Client) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 200_000 + b"\r\n\r\n")
        try:
            reply = sock.recv(4096)
        except ConnectionResetError:
            reply = b""
    assert reply.startswith(b"HTTP/1.1 431") or not reply, reply[:200]
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------------------- hot swap, whole


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_a_bundle_replaced_file_by_file_is_never_served_half_new(tiny_bundle: Path, logs: Path, tmp_path: Path) -> None:
    """Before: labels.json replaced first, weights seconds later, served old weights with new labels."""
    from d2ops.testing import build_tiny_bundle

    served = ModelBundle.open(tiny_bundle).copy_to(tmp_path / "served")
    old_labels = served.labels()
    new = ModelBundle.open(build_tiny_bundle(tmp_path / "new", seed=5))
    new_labels = list(reversed(old_labels))
    new = ModelBundle.write(tmp_path / "new2", weights=new.weights, d2_config=new.config_file, labels=new_labels,
                            metrics=new.metrics(), metadata={"experiment": "new"})  # fmt: skip
    proc = ServerProcess(served.path, logs, "--watch", "--poll-interval", "0.3")
    try:
        proc.wait_listening()
        proc.wait_ready()
        first = httpx.get(f"{proc.url}/v1/models", timeout=HTTP_TIMEOUT).json()["models"][0]
        shutil.copy2(new.path / ModelBundle.LABELS, served.path / ModelBundle.LABELS)
        time.sleep(3)  # ten polls: the old server loaded the half-new bundle by now
        during = httpx.get(f"{proc.url}/v1/models", timeout=HTTP_TIMEOUT).json()["models"][0]
        assert (during["version"], during["labels"]) == (first["version"], old_labels), "a mixed model was loaded"
        for name in (ModelBundle.WEIGHTS, ModelBundle.CONFIG, ModelBundle.METRICS, ModelBundle.METADATA):
            shutil.copy2(new.path / name, served.path / name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = httpx.get(f"{proc.url}/v1/models", timeout=HTTP_TIMEOUT).json()["models"][0]
            if now["version"] == new.version():
                break
            time.sleep(0.3)
        assert now["version"] == new.version() and now["labels"] == new_labels, proc.tail()
        assert "metadata.json records" in proc.log()
    finally:
        proc.stop()


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_watching_a_zip_keeps_two_versions_in_the_cache(tiny_bundle: Path, logs: Path, tmp_path: Path) -> None:
    """Before: every new zip version was unzipped into the cache and never removed."""
    from d2ops.testing import build_tiny_bundle

    archive = tmp_path / "model.zip"
    cache = tmp_path / "cache"
    ModelBundle.open(tiny_bundle).zip(archive)
    proc = ServerProcess(archive, logs, "--watch", "--poll-interval", "0.3", "--cache-dir", str(cache))
    try:
        proc.wait_listening()
        proc.wait_ready()
        for seed in (11, 12, 13):
            version = ModelBundle.open(build_tiny_bundle(tmp_path / f"v{seed}", seed=seed))
            version.zip(archive)  # atomic replace, as a publisher would
            deadline = time.monotonic() + 60
            while httpx.get(f"{proc.url}/ready", timeout=HTTP_TIMEOUT).json().get("version") != version.version():
                assert time.monotonic() < deadline, proc.tail()
                time.sleep(0.2)
        assert len([p for p in cache.iterdir() if p.name.startswith("bundle-")]) == 2
        assert httpx.post(f"{proc.url}/predict", json={"image": _b64(_png(1))}, timeout=HTTP_TIMEOUT).is_success
    finally:
        proc.stop()
