"""``d2ops serve`` admits only work it has the memory for and can finish in time (a real server process).

- Memory across requests: many small bodies declaring many pixels are held to ``--max-pixels-in-flight``
  before any of them is decoded (before: 16 such requests were all decoded at once).
- Time: a request that would wait in the queue past ``--request-timeout`` is refused at once with 503 and a
  Retry-After from the measured time per image, instead of a 504 after the whole timeout.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .test_serve_abuse import _rss_kib
from .test_server import HTTP_TIMEOUT, ServerProcess, _b64, _png

#: One large frame: 12 Mpx of flat grey, a PNG of a few KB (36 MB once decoded to RGB).
LARGE = (4000, 3000)
#: The server's pixel budget: two large frames at once.
BUDGET = 2 * LARGE[0] * LARGE[1]
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess.ready(
        tiny_bundle, tmp_path_factory.mktemp("limits-logs"),
        "--max-pixels-in-flight", str(BUDGET), "--max-request-pixels", str(2 * BUDGET),
        "--request-timeout", str(TIMEOUT_S), "--max-batch-size", "1",
    ) as proc:  # fmt: skip
        yield proc


def _burst(url: str, bodies: Sequence[Mapping[str, object]]) -> list[httpx.Response]:
    """Every body posted to ``/predict`` at the same moment, each on its own connection."""
    start = threading.Barrier(len(bodies))

    def one(body: Mapping[str, object]) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as c:
            start.wait()
            return c.post("/predict", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: the peak RSS (VmHWM) restarts from the current RSS


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_peak_memory_under_16_large_pixel_requests_stays_within_the_budget(server: ServerProcess) -> None:
    """Before: each 12 Mpx request was decoded on arrival; 16 at once peaked about 600 MiB above the idle
    server (here, 2026-12-08), and all 16 got 504 after the 2 s timeout."""
    buf = io.BytesIO()
    Image.new("L", LARGE, 128).save(buf, format="PNG")
    body = {"image": _b64(buf.getvalue())}
    assert len(body["image"]) < 64 * 1024, "a small body"
    pid = server.proc.pid
    assert httpx.post(f"{server.url}/predict", json={"image": _b64(_png(1))}, timeout=HTTP_TIMEOUT).is_success
    before = _rss_kib(pid)
    _reset_peak_rss(pid)
    replies = _burst(server.url, [body] * 16)
    growth_mib = (_peak_rss_kib(pid) - before) / 1024
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2, statuses
    for r in replies:
        if r.status_code == 503:
            assert "--max-pixels-in-flight" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
    # Two 12 Mpx frames in flight: each decode peaks at about 11 bytes a pixel (grey, RGB, flipped copy).
    assert growth_mib < 400, f"peak RSS grew {growth_mib:.0f} MiB:\n{server.tail()}"
    assert httpx.post(f"{server.url}/predict", json=body, timeout=HTTP_TIMEOUT).status_code == 200


def test_a_request_over_the_pixel_budget_alone_is_a_413(server: ServerProcess) -> None:
    """Within --max-request-pixels but over the whole budget: no wait makes it fit, so not a 503."""
    buf = io.BytesIO()
    Image.new("L", LARGE, 128).save(buf, format="PNG")
    reply = httpx.post(f"{server.url}/predict", json={"images": [_b64(buf.getvalue())] * 3}, timeout=HTTP_TIMEOUT)
    assert reply.status_code == 413 and "Retry-After" not in reply.headers, reply.text
    assert "--max-pixels-in-flight" in reply.json()["error"] and "fewer or smaller" in reply.json()["error"]


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_work_that_would_miss_its_deadline_is_refused_at_once_not_timed_out(server: ServerProcess) -> None:
    """Before: all 64 queued images were admitted, and those past the timeout waited it out for a 504."""
    body = {"image": _b64(_png(2))}
    for _ in range(2):  # the server measures its time per image, under concurrent load too
        assert all(r.status_code == 200 for r in _burst(server.url, [body] * 4))
    replies = _burst(server.url, [body] * 64)
    statuses = [r.status_code for r in replies]
    assert 504 not in statuses and set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
    refused = [r for r in replies if r.status_code == 503]
    assert refused, f"64 images at --max-batch-size 1 take longer than {TIMEOUT_S} s: some must be refused"
    for r in refused:
        assert "--request-timeout" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
        assert r.elapsed.total_seconds() < TIMEOUT_S, "refused before the deadline, not at it"
