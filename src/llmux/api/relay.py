"""The hot path: OpenAI routes relayed to the model's child, as raw ASGI.

Per request: authenticate, read the body (bounded), read only ``model`` from it, take a lease
from the scheduler, pass the bytes to the child over one shared keep-alive aiohttp session, and
pass the answer back chunk by chunk. A client that goes away cancels the upstream request and
releases the lease; a child that dies mid-stream ends an SSE stream with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from python_multipart.multipart import MultipartParser, parse_options_header

from llmux.api.auth import Authenticator
from llmux.api.errors import send_error, sse_error
from llmux.backends.base import Child
from llmux.config import ModelConfig, ModelType
from llmux.errors import (
    BodyTooLarge,
    InvalidRequest,
    LlmuxError,
    UnsupportedModel,
    UpstreamError,
)
from llmux.observe import Observer
from llmux.scheduling.runtime import Lease, Scheduler

log = logging.getLogger("llmux.relay")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROUTE_TYPES: dict[str, frozenset[ModelType]] = {
    "/v1/chat/completions": frozenset({"llm"}),
    "/v1/completions": frozenset({"llm"}),
    "/v1/embeddings": frozenset({"embedding", "llm"}),
    "/v1/audio/speech": frozenset({"tts"}),
    "/v1/audio/transcriptions": frozenset({"asr"}),
    "/v1/audio/translations": frozenset({"asr"}),
}
"""The model types each relayed route serves; another type is a 400 before anything loads."""

RELAY_PATHS = frozenset(ROUTE_TYPES)

# Headers not passed between client and child (hop-by-hop, or llmux's own credentials).
_DROP_REQUEST = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"authorization",
        b"content-length",
        b"upgrade",
        b"te",
        b"proxy-authorization",
        b"expect",
        b"x-llmux-request-id",  # llmux's own, set for the child: never the client's
    }
)
_DROP_RESPONSE = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "server", "date"}
)
_DROP_RESPONSE_SSE = _DROP_RESPONSE | {"content-length"}


def _multipart_model(body: bytes, content_type: str) -> str | None:
    """The ``model`` form field of a multipart body, without touching the file parts' bytes."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart body without a boundary")
    state: dict[str, Any] = {"name": None, "value": bytearray(), "found": None, "header": b""}
    headers: dict[bytes, bytes] = {}
    field: list[bytes] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_end() -> None:
        headers[b"".join(field).lower()] = state["header"]
        field.clear()
        state["header"] = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        state["name"] = disp.get(b"name")
        state["value"] = bytearray()
        headers.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] == b"model":
            state["value"] += data[start:end]

    def on_part_end() -> None:
        if state["name"] == b"model" and state["found"] is None:
            state["found"] = bytes(state["value"]).decode("utf-8", "replace").strip()

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    found: str | None = state["found"]
    return found


_IDENTITY = ("accept-encoding", "identity")

WHOLE_BODY_MAX = 256 * 1024
"""A non-SSE answer with a Content-Length up to this is read whole before anything is sent (so a
child that sends less than it announced gets a clean 502) and sent in one message; longer ones
(and SSE, and answers without a length) are passed on chunk by chunk."""

WATCH_AFTER_S = 0.05
"""A request still running this long starts watching for its client's disconnect."""

LOADING_COMMENT_EVERY_S = 2.0
"""A streaming request that waits for a load gets ``: llmux loading <model>`` this often."""

DEATH_CHECK_S = 0.05
"""An answer framed by the close of the connection ended: how long to wait for the child's exit
before taking the close as the answer's end (a killed child closes its sockets a moment before
the kernel reports its exit). Only such answers pay it, and only when the child lives on."""

CANCEL_WAIT_S = 12.0
"""After a client went away: longest wait for a child that can be told to stop (the built-in
engines answer within 10 s) before its lease is released anyway."""

UPSTREAM_CONNECT_S = 10.0

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class UpstreamConnector(aiohttp.TCPConnector):
    """aiohttp's pool, minus one hazard: a pooled connection on which the child sent bytes while
    no request was on it (a second response after the one asked for, say) is closed, never
    handed to the next request, whose client would get that stale answer.

    aiohttp checks this when a connection goes back to the pool, but not when it is taken out;
    ``_get`` (aiohttp's, not public) is where it is taken out. tests/test_misbehave.py proves the
    check works with the installed aiohttp, so a rename there fails a test, not a client.
    """

    async def _get(self, key: Any, traces: Any) -> Any:
        while True:
            conn = await super()._get(key, traces)
            if conn is None or conn.protocol is None or not conn.protocol.should_close:
                return conn
            log.warning("upstream %s sent bytes while idle: connection closed", key.host)
            conn.close()


@dataclass(frozen=True)
class UpstreamRoute:
    """What a front end (the relay, the Ollama API, Wyoming) needs of one model's config to talk
    to its child; the relay builds one per config object."""

    spec: ModelConfig
    timeout: aiohttp.ClientTimeout
    """``sock_read`` is the model's stall_timeout: the longest silence of the child."""
    cancel_path: str | None
    """The child's endpoint that stops one request's work (built-in engines), if any."""

    @classmethod
    def of(cls, spec: ModelConfig) -> UpstreamRoute:
        stall = spec.stall_timeout or None
        cancel = None
        if spec.engine is not None:
            from llmux.engines import engine_cancel_path

            cancel = engine_cancel_path(spec.engine)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=UPSTREAM_CONNECT_S, sock_read=stall
        )
        return cls(spec, timeout, cancel)

    def headers(self, lease: Lease) -> dict[str, str]:
        """Headers of a request a front end builds itself: no compressed answer, and the
        request's id where the child can cancel it."""
        headers = {"accept-encoding": "identity"}
        if self.cancel_path is not None:
            headers["x-llmux-request-id"] = str(lease.rid)
        return headers


async def stop_work(session: aiohttp.ClientSession, lease: Lease, cancel_path: str) -> str:
    """The client went away: tell the child to stop this request's work, and return once it has
    (or after CANCEL_WAIT_S), saying how it ended. Until then the request stays in flight."""
    url = lease.base_url + cancel_path.format(request_id=lease.rid)
    try:
        async with asyncio.timeout(CANCEL_WAIT_S):
            async with session.post(url) as resp:
                await resp.read()
                return f"status {resp.status}"
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        return f"{type(exc).__name__} {exc}"


class Relay:
    """Raw-ASGI handler for RELAY_PATHS."""

    def __init__(
        self,
        scheduler: Scheduler,
        auth: Authenticator,
        observer: Observer,
        max_body: int,
        session: Callable[[], aiohttp.ClientSession],
        max_speech_chars: int = 4096,
    ) -> None:
        self.scheduler = scheduler
        self.auth = auth
        self.observer = observer
        self.max_body = max_body
        self.max_speech_chars = max_speech_chars
        self._session = session
        self._routes: dict[str, UpstreamRoute] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._young: deque[_Watch] = deque()
        """Requests whose watcher is not armed yet, oldest first. A request that finishes first
        is only marked done; the sweep drops it (no search, no removal from the middle)."""
        self._sweep_at: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop the app runs on (with its aiohttp session, at start-up)."""
        self._loop = loop

    def stop(self) -> None:
        """At shutdown: no sweep left scheduled on the loop."""
        if self._sweep_at is not None:
            self._sweep_at.cancel()
            self._sweep_at = None

    def _route(self, model_id: str) -> UpstreamRoute:
        spec = self.scheduler.config.models[model_id]
        route = self._routes.get(model_id)
        if route is None or route.spec is not spec:  # new, or the config was reloaded
            route = self._routes[model_id] = UpstreamRoute.of(spec)
        return route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One pass over the request headers: what llmux reads, and what goes on to the child.
        authorization = length = content_type = None
        forward: list[tuple[str, str]] = []
        encoding = False
        twice = False
        for k, v in scope["headers"]:
            if k == b"authorization":
                twice = authorization is not None
                authorization = bytes(v).decode("latin-1")
            elif k == b"content-length":
                length = bytes(v).decode("latin-1")
            elif k == b"content-type":
                content_type = bytes(v).decode("latin-1")
            elif k == b"accept-encoding":
                encoding = True
            if k not in _DROP_REQUEST:
                forward.append((k.decode("latin-1"), v.decode("latin-1")))
        if not encoding:
            # The child must not compress what the client did not ask compressed (the bytes
            # pass through as they are). Sending this, rather than telling aiohttp to skip its
            # default, keeps aiohttp on its cheaper per-request path.
            forward.append(_IDENTITY)
        path = scope["path"]
        try:
            if twice:
                raise InvalidRequest("more than one Authorization header")
            self.auth.check_read(authorization)
            body = await self._read_body(length, receive)
            if body is None:
                return  # the client went away before sending its whole body
            model_id, body, stream = self._model_of(path, content_type or "", body)
        except LlmuxError as exc:
            self.observer.request_done("", path, exc.status, None)
            await send_error(send, exc)
            return
        route = self._route(model_id)
        # From here the client may go away at any time. The work runs in this task. A request
        # still running after WATCH_AFTER_S gets a watcher task that cancels it when the client
        # disconnects (see _sweep); most requests to a ready model finish before that, so they
        # never pay for a second task, nor for a timer of their own.
        # The loop is bound at start-up (start()), not looked up here: on Python 3.11 every
        # asyncio.get_running_loop() (and a current_task() without a loop) makes a getpid()
        # system call.
        loop = self._loop
        assert loop is not None, "the app has not started"  # start-up binds it, with the session
        handler = asyncio.current_task(loop)
        assert handler is not None
        watch = _Watch(handler, receive, loop.time())
        self._young.append(watch)
        if self._sweep_at is None:
            self._sweep_at = loop.call_later(WATCH_AFTER_S, self._sweep)
        out = _Status()
        started = time.monotonic()
        queued: float | None = None
        try:
            # A ready model: the lease at once, no event, no wait (the common case).
            lease = self.scheduler.try_acquire(model_id)
            early = False
            if lease is None:
                lease, early = await self._acquire(send, model_id, stream, out)
            queued = time.monotonic() - started
            try:
                await self._forward(scope, send, lease, route, body, forward, early, out)
            except asyncio.CancelledError:
                if not watch.gone:
                    raise  # server shutdown: not ours to swallow
                handler.uncancel()
                if route.cancel_path is not None:
                    # The model stays busy (in flight) until its child says the work stopped.
                    await self._stop_work(lease, route.cancel_path)
            finally:
                self.scheduler.release(lease)
        except _Answered:
            pass
        except asyncio.CancelledError:
            if not watch.gone:
                raise  # server shutdown: not ours to swallow
            handler.uncancel()
        finally:
            watch.done = True
            watch.disarm()
            self.observer.request_done(model_id, path, out.status or 499, queued)

    def _sweep(self) -> None:
        """Arm the watchers of the requests that have run for WATCH_AFTER_S, then come back
        when the next one will have. One timer for all requests; none while nothing runs."""
        self._sweep_at = None
        loop = self._loop
        assert loop is not None
        young = self._young
        armed_before = loop.time() - WATCH_AFTER_S
        while young:
            oldest = young[0]
            if not oldest.done and oldest.since > armed_before:
                self._sweep_at = loop.call_at(oldest.since + WATCH_AFTER_S, self._sweep)
                return
            young.popleft()
            if not oldest.done:
                oldest.arm()

    async def _read_body(self, length: str | None, receive: Receive) -> bytes | None:
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise BodyTooLarge(f"request body is {length} bytes; the limit is {self.max_body}")
        chunks = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks += message.get("body", b"")
            if len(chunks) > self.max_body:
                raise BodyTooLarge(f"request body is over the limit of {self.max_body} bytes")
            if not message.get("more_body", False):
                return bytes(chunks)

    def _model_of(self, path: str, content_type: str, body: bytes) -> tuple[str, bytes, bool]:
        """The model id asked for (ModelNotFound if none has that id or alias; UnsupportedModel
        if it is of a type ``path`` does not serve), the body to relay (model rewritten if
        configured), and whether the client asked for SSE. Checks what llmux itself limits
        (speech ``input`` length) before anything is loaded or queued."""
        config = self.scheduler.config
        if content_type[:19].lower() == "multipart/form-data":
            model = _multipart_model(body, content_type)
            if not model:
                raise InvalidRequest("the form field 'model' is required", param="model")
            model_id = self.scheduler.resolve(model)
            self._check_type(path, model, config.models[model_id])
            return model_id, body, False
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the body must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required and must be a string", param="model")
        model_id = self.scheduler.resolve(model)
        spec = config.models[model_id]
        self._check_type(path, model, spec)
        if path == "/v1/audio/speech":
            text = data.get("input")
            if isinstance(text, str) and len(text) > self.max_speech_chars:
                raise InvalidRequest(
                    f"'input' is {len(text)} characters; the limit is {self.max_speech_chars}",
                    param="input",
                )
        upstream = spec.upstream_model
        if upstream is not None and upstream != model:
            data["model"] = upstream
            body = orjson.dumps(data)
        return model_id, body, data.get("stream") is True

    @staticmethod
    def _check_type(path: str, asked: str, spec: ModelConfig) -> None:
        served = ROUTE_TYPES[path]
        if spec.type not in served:
            kinds = " or ".join(sorted(served))
            raise UnsupportedModel(
                f"'{asked}' is a {spec.type} model; {path} serves {kinds} models", param="model"
            )

    async def _acquire(
        self, send: Send, model_id: str, stream: bool, out: _Status
    ) -> tuple[Lease, bool]:
        """The lease when the model is not ready yet, and whether SSE headers already went
        out (loading feedback).

        A streaming request that waits longer than LOADING_COMMENT_EVERY_S gets its 200 and SSE
        headers early, then a comment line every LOADING_COMMENT_EVERY_S, so clients and proxies
        do not time out during a load. Errors then arrive as an SSE ``error`` event.
        """
        if not stream:
            try:
                return await self.scheduler.acquire(model_id), False
            except LlmuxError as exc:
                out.status = exc.status
                await send_error(send, exc)
                raise _Answered from None
        task = asyncio.ensure_future(self.scheduler.acquire(model_id))
        early = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=LOADING_COMMENT_EVERY_S)
                if done:
                    return task.result(), early
                if not early:
                    out.status = 200
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                    )
                    early = True
                comment = f": llmux loading {model_id}\n\n".encode()
                await send({"type": "http.response.body", "body": comment, "more_body": True})
        except LlmuxError as exc:
            if early:
                await send({"type": "http.response.body", "body": sse_error(exc)})
            else:
                out.status = exc.status
                await send_error(send, exc)
            raise _Answered from None
        except BaseException:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                self.scheduler.release(task.result())
            raise

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        lease: Lease,
        route: UpstreamRoute,
        body: bytes,
        headers: list[tuple[str, str]],
        headers_sent: bool,
        out: _Status,
    ) -> None:
        """Relay one request to the child and its answer to the client.

        However the child frames its answer, one cut short never reaches the client as a
        complete one (DESIGN section 2): before the headers it is a 502; in an SSE stream an
        ``error`` event; otherwise the connection is cut (the client sees fewer bytes than
        announced, or an unfinished chunked body). A child silent for its ``stall_timeout`` is
        cut the same way.
        """
        url = lease.base_url + scope["path"]
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        if route.cancel_path is not None:
            headers.append(("x-llmux-request-id", str(lease.rid)))
        started = headers_sent
        sse = headers_sent
        last = b""
        """The last piece of the body sent on (an SSE stream that ended with [DONE] is whole)."""
        model_id = lease.model_id
        try:
            async with self._session().post(
                url, data=body, headers=headers, timeout=route.timeout
            ) as resp:
                status = resp.status
                if not 200 <= status <= 599:
                    raise _BadAnswer(f"model '{model_id}' answered with status {status}")
                if headers_sent and status != 200:
                    # The 200 went out with the loading comments: the child's error becomes an
                    # SSE error event.
                    detail = (await resp.read()).decode("utf-8", "replace")[:2000]
                    error = UpstreamError(f"model '{model_id}' answered {status}: {detail}")
                    await send({"type": "http.response.body", "body": sse_error(error)})
                    return
                length = resp.content_length
                if not headers_sent:
                    sse = resp.headers.get("content-type", "").startswith("text/event-stream")
                whole = None
                if not sse and length is not None and length <= WHOLE_BODY_MAX:
                    # A small answer of known length: read whole before anything is sent, so
                    # that a child that sends less than it announced is a clean 502.
                    whole = await resp.read()
                if not headers_sent:
                    # An SSE stream goes on chunked whatever its length: an error event may
                    # have to follow a stream the child's death cut short.
                    drop = _DROP_RESPONSE_SSE if sse else _DROP_RESPONSE
                    out_headers = [
                        (name.encode("latin-1"), v.encode("latin-1"))
                        for k, v in resp.headers.items()
                        if (name := k.lower()) not in drop
                    ]
                    out.status = status
                    await send(
                        {"type": "http.response.start", "status": status, "headers": out_headers}
                    )
                    started = True
                if whole is not None:
                    await send({"type": "http.response.body", "body": whole})
                    return
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    last = chunk
                # Framed by the close of the connection: the end is only an end if the child
                # lives on (a killed child's close looks just like it).
                framing = resp.headers.get("transfer-encoding")
                close_framed = length is None and not _chunked(framing)
                if close_framed and await _died(lease.child):
                    raise _BadAnswer(f"model '{model_id}' died while answering")
            await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, ConnectionError, _BadAnswer) as exc:
            if sse and last.rstrip().endswith(b"data: [DONE]"):
                # The stream was whole; only its end was lost (the child died or misframed
                # after its last event). An error after [DONE] would be a protocol error.
                await send({"type": "http.response.body", "body": b""})
                return
            error = _upstream_error(model_id, route, exc)
            log.warning("upstream error model=%s: %s", model_id, error.message)
            if not started:
                out.status = error.status
                await send_error(send, error)
            elif sse:
                await send({"type": "http.response.body", "body": sse_error(error)})
            # else: headers are out and the body is not SSE: the answer stays unfinished and
            # the server cuts the connection, so the client cannot take it as complete.

    async def _stop_work(self, lease: Lease, cancel_path: str) -> None:
        """The client went away: tell the child to stop this request's work, and return once it
        has (or after CANCEL_WAIT_S). Until then the request stays in flight."""
        began = time.monotonic()
        outcome = await stop_work(self._session(), lease, cancel_path)
        log.info(
            "client left model=%s request=%d: the child stopped its work after %.3f s (%s)",
            lease.model_id,
            lease.rid,
            time.monotonic() - began,
            outcome,
        )


def _chunked(transfer_encoding: str | None) -> bool:
    return transfer_encoding is not None and "chunked" in transfer_encoding.lower()


def _upstream_error(model_id: str, route: UpstreamRoute, exc: Exception) -> UpstreamError:
    if isinstance(exc, _BadAnswer):
        return UpstreamError(str(exc))
    if isinstance(exc, TimeoutError):  # aiohttp's sock_read: the child went silent
        stall = route.spec.stall_timeout
        return UpstreamError(
            f"model '{model_id}' sent nothing for {stall:g} s (its stall_timeout); "
            "the request was cut"
        )
    return UpstreamError(f"model '{model_id}' failed mid-request: {type(exc).__name__}: {exc}")


async def _died(child: Child) -> bool:
    """Whether ``child`` has exited, or exits within DEATH_CHECK_S."""
    if child.returncode is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.wait_exit(), DEATH_CHECK_S)
    return child.returncode is not None


class _Watch:
    """One request in flight, for the disconnect watch: its task, its ``receive``, when it
    started (loop time), and once armed the watcher task."""

    __slots__ = ("done", "gone", "handler", "receive", "since", "task")

    def __init__(self, handler: asyncio.Task[Any], receive: Receive, since: float) -> None:
        self.handler = handler
        self.receive = receive
        self.since = since
        self.task: asyncio.Task[None] | None = None
        self.gone = False
        """The client went away: the handler was cancelled for that (not for a shutdown)."""
        self.done = False
        """The request is over: nothing to arm."""

    def arm(self) -> None:
        self.task = asyncio.ensure_future(_wait_disconnect(self.receive))
        self.task.add_done_callback(self.on_disconnect)

    def on_disconnect(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.gone = True
            self.handler.cancel()

    def disarm(self) -> None:
        if self.task is not None:
            self.task.remove_done_callback(self.on_disconnect)
            self.task.cancel()


class _Status:
    """The status a request was answered with, for the request counter (0: none yet)."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = 0


class _Answered(Exception):
    """The client already got its (error) answer; nothing more to send."""


class _BadAnswer(Exception):
    """The child's answer is not one the client may get as it is (an impossible status, or cut
    by the child's death)."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
