"""Connection limits for ``d2ops serve`` that uvicorn does not enforce by itself.

Read from uvicorn 0.55.0 (``uvicorn/protocols/http/httptools_impl.py`` and ``h11_impl.py``):

- only the h11 parser has a header limit (``h11_max_incomplete_event_size``); httptools buffers a request
  line or header of any length until it ends, at a cost that grows faster than its length;
- ``timeout_keep_alive`` is armed only after a response and cancelled by any byte received, so a connection
  that never sends, or sends its head a byte at a time, stays open for ever;
- ``limit_concurrency`` answers 503 once a head has arrived, counting idle connections too, and still
  accepts every socket: idle connections past the descriptor limit lock every client out.

So both protocols are subclassed here (:class:`GuardedHttpToolsProtocol`, :class:`GuardedH11Protocol`), each
with the same three rules: a request head over ``max_header_bytes`` gets 431 and the connection closes; a
head not complete within ``header_timeout`` of the connection opening (or of its previous response) gets 408
and the connection closes; and past ``max_connections`` open connections, the one that has waited longest for
a request head is closed to make room (if every connection has a request in flight, the newcomer is closed).
A silent new connection also closes after ``--keep-alive-timeout``, as an idle one does between requests.

uvicorn builds one protocol per connection from an import string (``--workers`` pickles its config into
each worker process), so the limits travel in the environment variable :data:`LIMITS_ENV`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard], except on PyPy and Windows
    HAVE_HTTPTOOLS = False
else:
    HAVE_HTTPTOOLS = True

__all__ = [
    "LIMITS_ENV",
    "ConnectionLimits",
    "GuardedH11Protocol",
    "GuardedHttpToolsProtocol",
    "connection_cap",
    "protocol_path",
    "raise_open_files_limit",
]

log = logging.getLogger(__name__)

#: How ``serve_main`` hands the limits to the protocols of every worker process.
LIMITS_ENV = "D2OPS_SERVE_CONNECTION_LIMITS"
#: Descriptors kept free of connections: model files, logs, pipes, and sockets accepted in one burst before
#: the protocol sees them (asyncio accepts up to ``backlog`` at a time; see :data:`ACCEPT_BACKLOG`).
FD_RESERVE = 256
#: uvicorn's ``backlog``: the kernel's queue of connections not yet accepted, and asyncio's accept burst.
ACCEPT_BACKLOG = 64
#: Seconds between two "connection cap reached" warnings.
_WARN_EVERY = 60.0

Parser = Literal["auto", "httptools", "h11"]


@dataclass(frozen=True)
class ConnectionLimits:
    """What every connection of one server is held to (see the module docstring)."""

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    max_connections: int = 1000

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ConnectionLimits:
        return _limits_from(os.environ.get(LIMITS_ENV, ""))


@functools.cache
def _limits_from(text: str) -> ConnectionLimits:
    limits = ConnectionLimits(**json.loads(text)) if text else ConnectionLimits()
    cap = connection_cap(limits.max_connections)
    return limits if cap == limits.max_connections else ConnectionLimits(**{**asdict(limits), "max_connections": cap})


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft descriptor limit toward ``wanted`` (no higher than the hard limit, never
    lower than it is); children inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to stay :data:`FD_RESERVE` descriptors below this process's limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


def protocol_path(parser: Parser) -> str:
    """uvicorn's ``http`` option for ``parser``: the import string of its guarded protocol class
    (``auto``: httptools when installed, as uvicorn chooses, else h11)."""
    if parser == "auto":
        parser = "httptools" if HAVE_HTTPTOOLS else "h11"
    if parser == "httptools" and not HAVE_HTTPTOOLS:
        raise ValueError("--http httptools: httptools is not installed (pip install httptools, or use --http h11)")
    name = "GuardedHttpToolsProtocol" if parser == "httptools" else "GuardedH11Protocol"
    return f"{__name__}:{name}"


def _reply(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


if TYPE_CHECKING:
    _Base = H11Protocol
else:
    _Base = object


class _Guard(_Base):
    """The three rules, mixed into uvicorn's protocols. Both set ``self.cycle`` to a new request/response
    cycle when a request head completes, and call ``on_response_complete`` when a response has been sent:
    those two events are the only ones read here."""

    _awaiting_head: bool = False
    _head_since: float = 0.0
    _head_bytes: int = 0
    _head_timer: asyncio.TimerHandle | None = None
    _last_warning = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._limits = ConnectionLimits.from_env()
        self._await_head()
        # uvicorn arms this only after a response; a new connection that never sends is idle too.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head_bytes += len(data)
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request head is complete
            self._awaiting_head = False
            self._cancel_head_timer()
        elif self._awaiting_head and self._head_bytes > self._limits.max_header_bytes:
            limit = self._limits.max_header_bytes
            message = f"the request line and headers are over the limit of {limit} bytes; send less"
            self._close_with(_reply(431, "Request Header Fields Too Large", message))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle.response_complete and not self.transport.is_closing():  # no later head parsed yet
            self._await_head()

    # ---------------------------------------------------------------------------------------------

    def _await_head(self) -> None:
        self._awaiting_head = True
        self._head_since = time.monotonic()
        self._head_bytes = 0
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        seconds = self._limits.header_timeout
        message = f"the request head did not arrive within {seconds:g} s (--header-timeout); send it at once"
        self._close_with(_reply(408, "Request Timeout", message) if self._head_bytes else b"")

    def _close_with(self, reply: bytes) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        if self.transport.is_closing():  # h11 refused the head itself (400), or the client left
            return
        if reply:
            self.transport.write(reply)
        self.transport.close()

    def _make_room(self) -> None:
        """Past the cap, close the connection that has waited longest for a request head."""
        cap = self._limits.max_connections
        if len(self.connections) <= cap:
            return
        waiting = [c for c in self.connections
                   if isinstance(c, _Guard) and c._awaiting_head and not c.transport.is_closing()]  # fmt: skip
        victim = min(waiting, key=lambda c: c._head_since)  # this connection is waiting too
        now = time.monotonic()
        if now - _Guard._last_warning > _WARN_EVERY:
            _Guard._last_warning = now
            log.warning("%d connections open (cap %d, --max-connections): closing those that wait longest "
                        "for a request", len(self.connections), cap)  # fmt: skip
        victim._close_with(b"")


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with d2ops's connection limits (see the module docstring)."""


if HAVE_HTTPTOOLS:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):  # type: ignore[misc]
        """uvicorn's httptools protocol with d2ops's connection limits (see the module docstring)."""
