"""What the serving benchmarks share: the images, the HTTP client, and the server processes they start.

- :func:`make_images`: the 128x128 JPEGs (seeded) every serving benchmark posts.
- :func:`served`: ``concurrency`` closed-loop httpx clients posting every body once (bench_serve.py).
- :func:`served_for`: the same clients posting for a fixed time instead (bench_peers.py), so that servers of
  different speeds are each measured over the same wall-clock window.
- :func:`burst`: every body posted at the same moment, one connection each, with each reply's status and latency
  (bench_admission.py).
- :class:`Server`: a ``d2ops serve`` process; :class:`ServerProcess`: any server command, ready once a URL
  answers 200. Both are stopped by their process id (never by name), the whole process group if asked.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

__all__ = ["REPO", "Server", "ServerProcess", "burst", "free_port", "make_images", "p99", "served", "served_for"]

REPO = Path(__file__).resolve().parent.parent


def make_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 255, size=(128, 128, 3), dtype=np.uint8)
        x, y = rng.integers(0, 80, size=2)
        pixels[y : y + 40, x : x + 40] = rng.integers(0, 255, size=3)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``command`` as a child process (its own session, so its whole process group can be stopped), ready once
    ``ready_url`` answers 200. ``stop`` sends SIGTERM (to the group with ``group_kill``), then SIGKILL."""

    def __init__(
        self,
        command: Sequence[str],
        log: Path,
        ready_url: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        timeout: float = 180,
        group_kill: bool = False,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.log = log
        self.group_kill = group_kill
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(list(command), cwd=cwd, env=dict(env) if env is not None else None,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()  # with group_kill: whatever the launcher left behind
                raise RuntimeError(f"server exited ({self.proc.returncode}): {log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200 and (ready is None or ready()):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s: {log.read_text()[-3000:]}")

    def _signal(self, sig: int) -> None:
        try:
            if self.group_kill:
                os.killpg(self.proc.pid, sig)  # the group this child leads (start_new_session): its own children
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """SIGSTOP the server (its whole group with ``group_kill``): it takes no CPU while another is measured."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the server's processes (its group with ``group_kill``)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            pid, pgid = int(stat.parent.name), int(fields[2])
            if pid == self.proc.pid or (self.group_kill and pgid == self.proc.pid):
                total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return total

    def stop(self, timeout: float = 60) -> None:
        self.resume()  # a paused server cannot act on SIGTERM
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        if self.group_kill:  # the launcher may exit before its children (TorchServe's JVM and its workers)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                time.sleep(0.2)
            self._signal(signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Server(ServerProcess):
    """``d2ops serve --model bundle`` on a free port of 127.0.0.1, CPU, threshold 0, no access log, ``*args``;
    run from the d2ops tree ``code`` (another checkout, to measure an earlier version side by side)."""

    def __init__(self, bundle: Path, log: Path, *args: str, code: Path = REPO) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "d2ops", "serve", "--model", str(bundle), "--port", str(self.port),
                   "--device", "cpu", "--threshold", "0", "--no-access-log", *args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "D2OPS_SERVE_TOKEN"}
        super().__init__(command, log, f"{self.url}/ready", env=env, cwd=code, timeout=120, group_kill=True)

    def batch_totals(self) -> tuple[float, float]:
        """Images and forward passes so far (the batch-size histogram's sum and count)."""
        text = httpx.get(f"{self.url}/metrics").text
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("d2ops_batch_size_"))
        return float(values.get("d2ops_batch_size_sum", 0)), float(values.get("d2ops_batch_size_count", 0))


def _check(reply: httpx.Response) -> None:
    if reply.status_code != 200:
        raise RuntimeError(f"{reply.status_code}: {reply.text[:200]}")


def served(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    path: str = "/predict",
    content_type: str = "application/json",
) -> tuple[float, list[float]]:
    """Images/s and per-request latencies (s) of ``concurrency`` clients posting every body once."""
    shards = [bodies[i::concurrency] for i in range(concurrency)]

    def client(shard: list[bytes]) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=300, headers={"content-type": content_type}) as c:
            for body in shard:
                tic = time.perf_counter()
                reply = c.post(path, content=body)
                latencies.append(time.perf_counter() - tic)
                _check(reply)
        return latencies

    tic = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [lat for shard in pool.map(client, shards) for lat in shard]
    return len(bodies) / (time.perf_counter() - tic), latencies


def served_for(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    duration_s: float,
    path: str,
    content_type: str,
    check: Callable[[httpx.Response], None] = _check,
) -> tuple[float, list[float]]:
    """Images/s and per-request latencies (s) of ``concurrency`` closed-loop clients posting for ``duration_s``.

    Client ``i`` posts ``bodies[i], bodies[i + concurrency], ...`` cyclically, one request at a time on its own
    keep-alive connection, and starts no request after the deadline; requests in flight then finish and count.
    Images/s = completed requests / (last completion - start).
    """
    start = time.perf_counter()
    deadline = start + duration_s
    ends: list[float] = []
    lock = threading.Lock()

    def client(i: int) -> list[float]:
        latencies = []
        last = start
        with httpx.Client(base_url=url, timeout=300, headers={"content-type": content_type}) as c:
            k = i
            while time.perf_counter() < deadline:
                tic = time.perf_counter()
                reply = c.post(path, content=bodies[k % len(bodies)])
                last = time.perf_counter()
                check(reply)
                latencies.append(last - tic)
                k += concurrency
        with lock:
            ends.append(last)
        return latencies

    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [lat for shard in pool.map(client, range(concurrency)) for lat in shard]
    return len(latencies) / (max(ends) - start), latencies


def burst(
    url: str, bodies: Sequence[bytes], path: str = "/predict", content_type: str = "application/json"
) -> list[tuple[int, float]]:
    """Status and latency (s) of each body, all posted at the same moment on connections of their own."""
    start = threading.Barrier(len(bodies))

    def one(body: bytes) -> tuple[int, float]:
        with httpx.Client(base_url=url, timeout=300, headers={"content-type": content_type}) as c:
            start.wait()
            tic = time.perf_counter()
            reply = c.post(path, content=body)
            return reply.status_code, time.perf_counter() - tic

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))
