"""The HTTP server's own limits, enforced below the ASGI app (issue 10, findings 5 and 6).

``protocol_class(limits)`` gives uvicorn (``http=``) a subclass of its httptools protocol that:

- counts the bytes of each request's line and headers *before* they reach the parser, and
  answers 431 (OpenAI envelope, connection closed) once they pass ``max_header_kb``: nothing
  past the limit is ever parsed or kept, and the app is never called;
- times a connection out: idle before its first request or between two (``idle_timeout``,
  closed silently, uvicorn's own keep-alive timer), headers begun but not finished
  (``header_timeout``, 408), and a body with no new bytes (``body_timeout``, 408). A body is
  only blamed for silence while llmux is reading it (not while flow control holds it back);
- caps open connections (``max_connections``, lowered at start to fit the open-file limit):
  past the cap the connection that has waited longest for a request is closed; if every other
  connection is serving a request, the new request gets 503, except ``GET /health``.

The hot path pays a few attribute checks per read and two dict operations per request: no
task, and a timer only while a request's headers or body are really incomplete after a read.

Relies on these internals of ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol``
(unchanged from uvicorn 0.29 to 0.55): ``data_received``, the parser callbacks,
``on_response_complete``, ``timeout_keep_alive(_task|_handler)``, ``app`` (read in
``on_headers_complete``), ``cycle`` (``response_started``, ``response_complete``,
``disconnected``, ``message_event``, ``waiting_for_100_continue``), ``flow.read_paused``,
``pipeline``, ``url``, ``parser``, ``server_state.default_headers``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from llmux.api.errors import error_body, http_error_response
from llmux.config import ServerConfig
from llmux.errors import HeadersTooLarge, InvalidRequest, LlmuxError, RequestTimeout, ServerBusy

log = logging.getLogger("llmux")

FD_RESERVE = 64
"""Open files kept back from client connections: the listening socket, logs, NVML, the
config watcher, the readiness probes of loading children."""
FD_PER_MODEL = 4
"""Per configured model: its child's output pipe, the process handle, a probe socket."""
FD_PER_CONNECTION = 2
"""A relayed request holds its client's socket and one upstream socket to the child."""
FULL_WARNING_EVERY_S = 60.0
NO_LIMIT_S = 1e9
"""A timeout configured as 0 (no limit) where uvicorn needs a number: about 32 years."""


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    elif hard == resource.RLIM_INFINITY and soft == resource.RLIM_INFINITY:
        soft = 1 << 20  # no limit at all: count as the kernel's usual nr_open
    return soft


def connection_cap(max_connections: int, file_limit: int, models: int) -> int:
    """Open client connections at most: ``max_connections``, or less where the open-file limit
    would not leave room for each connection's upstream socket and the children's pipes."""
    room = file_limit - FD_RESERVE - FD_PER_MODEL * models
    return max(1, min(max_connections, room // FD_PER_CONNECTION))


@dataclass(frozen=True)
class ConnectionLimits:
    max_head: int
    """Request line plus headers, bytes."""
    header_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int
    """The effective cap (after ``connection_cap``)."""

    @classmethod
    def of(cls, server: ServerConfig, max_connections: int) -> ConnectionLimits:
        return cls(
            max_head=server.max_header_kb * 1024,
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            idle_timeout=server.idle_timeout,
            max_connections=max_connections,
        )


@dataclass
class Registry:
    """Every open connection of one server. ``waiting`` holds those not serving a request (just
    opened, between requests, or with headers still arriving), longest-waiting first."""

    cap: int
    count: int = 0
    waiting: dict[LimitedHttpToolsProtocol, None] = field(default_factory=dict)
    warned_at: float = -FULL_WARNING_EVERY_S

    def add(self, conn: LimitedHttpToolsProtocol) -> None:
        conn.registered = True
        self.count += 1
        self.waiting[conn] = None
        if self.count > self.cap:
            self.make_room(conn)

    def drop(self, conn: LimitedHttpToolsProtocol) -> None:
        if conn.registered:
            conn.registered = False
            self.count -= 1
            self.waiting.pop(conn, None)

    def make_room(self, keep: LimitedHttpToolsProtocol) -> bool:
        """Close the longest-waiting connection other than ``keep``; False if there is none."""
        for conn in self.waiting:
            if conn is not keep:
                break
        else:
            return False
        self.drop(conn)
        conn.transport.close()
        return True

    def refused(self) -> None:
        """A request got 503 at the cap: say so in the log, at most once a minute."""
        now = time.monotonic()
        if now - self.warned_at >= FULL_WARNING_EVERY_S:
            self.warned_at = now
            log.warning(
                "%d connections open, every one serving a request: new requests get 503 "
                "(GET /health still answers); raise server.max_connections or the open-file "
                "limit if this load is legitimate",
                self.count,
            )


_AT_CAP = error_body(
    ServerBusy("too many open connections; try again shortly (GET /health still answers)")
)
_AT_CAP_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_AT_CAP)).encode()),
    (b"connection", b"close"),
]


async def _reject_at_cap(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    await send({"type": "http.response.start", "status": 503, "headers": _AT_CAP_HEADERS})
    await send({"type": "http.response.body", "body": _AT_CAP, "more_body": False})


# uvicorn's methods, called directly (not through super()) on the per-request path: a super
# object per call costs more than everything else these overrides add.
_data_received = HttpToolsProtocol.data_received
_on_headers_complete = HttpToolsProtocol.on_headers_complete
_on_message_complete = HttpToolsProtocol.on_message_complete
_on_response_complete = HttpToolsProtocol.on_response_complete


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with llmux's header limit, timeouts and connection cap.
    Built per server by ``protocol_class``, which binds ``limits`` and ``registry``."""

    limits: ClassVar[ConnectionLimits]
    registry: ClassVar[Registry]

    # Per connection, in slots: uvicorn's protocol already has 28 attributes in its __dict__,
    # and past 30 CPython gives up its fast attribute access for every one of them (measured:
    # about 5,000 instructions per request more).
    # (The class attributes below are read through these slots on the per-request path, too:
    # Python 3.11 has no fast path for a class attribute read through an instance.)
    __slots__ = (
        "_body_seen",
        "_head_left",
        "_in_body",
        "_max_head",
        "_registry",
        "_timer",
        "_waiting",
        "registered",
    )
    registered: bool
    _registry: Registry
    _waiting: dict[LimitedHttpToolsProtocol, None]
    _max_head: int
    _head_left: int
    """Bytes the current request's line and headers may still take; -1 once they are
    complete (the body, or the app, runs). Reset when a request's message is complete."""
    _in_body: bool
    _body_seen: float
    _timer: asyncio.TimerHandle | None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.limits
        # uvicorn's keep-alive timer is the idle timer (a float works; 0 = no limit).
        self.timeout_keep_alive = limits.idle_timeout or NO_LIMIT_S  # type: ignore[assignment]
        self.registered = False
        self._registry = self.registry
        self._waiting = self.registry.waiting
        self._max_head = limits.max_head
        self._head_left = limits.max_head
        self._in_body = False
        self._body_seen = 0.0
        self._timer = None

    # Connection lifecycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is idle too (uvicorn arms this only after a
        # response); the first read cancels it, as it does between requests.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self.registry.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.registry.drop(self)
        super().connection_lost(exc)

    # Reads: the header limit, before the parser sees a byte past it

    def data_received(self, data: bytes) -> None:
        left = self._head_left
        if left < 0:
            if self._in_body:
                self._body_seen = self.loop.time()
            _data_received(self, data)
        elif len(data) <= left:
            self._head_left = left - len(data)
            _data_received(self, data)
        else:
            # Only what the limit allows is parsed; if the headers do not end within it, 431.
            # (A first read that holds the headers and part of the body comes here too.)
            self._head_left = 0
            if left:
                _data_received(self, data[:left])
            if self.transport.is_closing():
                return
            if self._head_left == 0:
                limit = self._max_head
                self._answer_and_close(
                    HeadersTooLarge(
                        f"the request line and headers are over the limit of {limit} bytes"
                    ),
                    current=False,
                )
                return
            self.data_received(data[left:])
            return
        # After a read: a timer only if the headers or the body are still incomplete.
        if self._timer is None:
            left = self._head_left
            if left < 0:
                if self._in_body:
                    self._arm_body_timer()
            elif left != self._max_head:
                self._arm_header_timer()

    # Parser callbacks (uvicorn's, extended)

    def on_headers_complete(self) -> None:
        self._head_left = -1
        self._in_body = True
        if self._timer is not None:
            self._cancel_timer()
        self._waiting.pop(self, None)
        registry = self._registry
        if registry.count > registry.cap and not registry.make_room(self) and not self._health():
            registry.refused()
            app = self.app
            self.app = _reject_at_cap
            try:
                _on_headers_complete(self)
            finally:
                self.app = app
            return
        _on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._head_left = self._max_head
        if self._timer is not None:
            self._cancel_timer()
        _on_message_complete(self)

    def on_response_complete(self) -> None:
        if self.pipeline:  # the next request starts now: not waiting
            _on_response_complete(self)
            return
        _on_response_complete(self)
        if not self.transport.is_closing():
            self._waiting[self] = None

    # Timers

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_header_timer(self) -> None:
        timeout = self.limits.header_timeout
        if timeout and not self.transport.is_closing():
            self._timer = self.loop.call_later(timeout, self._header_timed_out)

    def _arm_body_timer(self) -> None:
        timeout = self.limits.body_timeout
        if timeout and not self.transport.is_closing():
            self._body_seen = now = self.loop.time()
            self._timer = self.loop.call_at(now + timeout, self._body_timed_out)

    def _header_timed_out(self) -> None:
        self._timer = None
        if self._head_left < 0 or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The next request's headers began while this one is still answered (pipelining):
            # their time counts once the answer is done.
            self._timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)
            return
        timeout = self.limits.header_timeout
        self._answer_and_close(
            RequestTimeout(f"the request headers did not arrive within {timeout:g} s"),
            current=False,
        )

    def _body_timed_out(self) -> None:
        self._timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or cycle.waiting_for_100_continue:
            # The app has not taken what came (or not asked for the body yet): not the
            # client's silence.
            self._body_seen = now
        due = self._body_seen + self.limits.body_timeout
        if now < due:
            self._timer = self.loop.call_at(due, self._body_timed_out)
            return
        timeout = self.limits.body_timeout
        self._answer_and_close(
            RequestTimeout(f"no request body bytes arrived for {timeout:g} s"), current=True
        )

    # Answers of the protocol itself

    def _health(self) -> bool:
        url = self.url
        return self.parser.get_method() == b"GET" and (
            url == b"/health" or url.startswith(b"/health?")
        )

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers what is not well-formed HTTP in plain text; llmux in its envelope.
        error = InvalidRequest(f"the request is not well-formed HTTP ({msg.rstrip('.')})")
        self.transport.write(http_error_response(error, self.server_state.default_headers))
        self.transport.close()

    def _answer_and_close(self, error: LlmuxError, *, current: bool) -> None:
        """Send ``error`` and close. ``current``: it answers the request being received (a body
        timeout); otherwise it is about headers that no request of the app owns yet."""
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if busy:
            # The app stops: its receive() gets http.disconnect, its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if (current and not cycle.response_started) or (not current and not busy):
            self.transport.write(http_error_response(error, self.server_state.default_headers))
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for one server (pass it to uvicorn as ``http=``)."""

    class LlmuxHttpProtocol(LimitedHttpToolsProtocol):
        pass

    LlmuxHttpProtocol.limits = limits
    LlmuxHttpProtocol.registry = Registry(cap=limits.max_connections)
    return LlmuxHttpProtocol
