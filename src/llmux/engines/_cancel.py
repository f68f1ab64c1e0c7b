"""Stopping a built-in engine's work for a request whose client left or that llmux cancelled.

The contract (docs/engines.md, "Cancellation"):

- Every request may carry ``X-Llmux-Request-Id: <opaque id>``; without it the request gets an
  internal id. While it is handled, the engine keeps it in a registry under that id.
- ``POST /llmux/cancel/{request_id}`` sets that request's stop flag, cancels its handler, and
  answers once the request's work has really stopped (at most ``STOP_WAIT_S`` later) with
  ``{"id": ..., "found": bool, "stopped": bool}``; ``found`` is false (and ``stopped`` true) when
  no such request is in progress.
- A client that disconnects stops its request's work the same way, without llmux.
- ``GET /llmux/requests`` lists the requests in progress: ``{"requests": [{"id", "seconds",
  "progress", "stopping"}]}`` (``progress`` counts the steps of work done so far).

``CancelMiddleware`` does all of this around any ASGI app. The app's own work sees the request's
``Work`` (``work_of(scope)``, or ``current_work()`` from the handler's context, which threads
started with ``anyio.to_thread`` inherit) and checks ``Work.stop`` between steps (segments,
sentences, tokens). "Stopped" means the app's call for the request has returned: handlers run
their blocking work with ``anyio.to_thread.run_sync`` (never abandoned on cancel), so by then no
thread works for the request any more.

A request cancelled before its answer started gets 499 with the envelope (code
``request_cancelled``) if its client is still there; one cancelled mid-answer ends there (an SSE
stream with an ``error`` event, any other body cut short).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmux.api.errors import error_messages, send_error, sse_error
from llmux.engines import CANCEL_PATH, REQUEST_ID_HEADER
from llmux.errors import MethodNotAllowed, NotFound, RequestCancelled

__all__ = [
    "CANCEL_PATH",
    "CANCEL_PREFIX",
    "REQUEST_ID_HEADER",
    "STOP_WAIT_S",
    "CancelMiddleware",
    "Registry",
    "Stopped",
    "Work",
    "current_work",
    "work_of",
]

CANCEL_PREFIX = CANCEL_PATH.removesuffix("{request_id}")
_HEADER = REQUEST_ID_HEADER.lower().encode()
REQUESTS_PATH = "/llmux/requests"
STOP_WAIT_S = 10.0
"""The longest a cancel waits for the work to stop before it answers ``stopped: false``."""

_SCOPE_KEY = "llmux.work"
_current: contextvars.ContextVar[Work | None] = contextvars.ContextVar("llmux_work", default=None)
_internal_ids = itertools.count(1)


class Stopped(BaseException):
    """Raised by an engine's worker thread when it sees its request's stop flag.

    A ``BaseException``, like ``asyncio.CancelledError``: the ``except Exception`` of a server's
    error handlers (llama_cpp.server prints a traceback and answers 500) lets it through to
    ``CancelMiddleware``, which ends the request quietly."""


@dataclass(eq=False)
class Work:
    """One request in progress."""

    id: str
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when the request is cancelled or its client left; the work checks it between steps."""
    done: anyio.Event = field(default_factory=anyio.Event)
    """Set once the app's call for the request has returned: nothing works for it any more."""
    reason: str | None = None
    """``cancel`` or ``disconnect`` once stopped."""
    started: float = field(default_factory=time.monotonic)
    progress: int = 0
    """Steps of work done (segments, sentences, model evaluations); the engine counts them."""
    _scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    _hooks: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self, reason: str) -> None:
        """Stop the work: set the flag (threads see it), run the ``on_stop`` hooks, and cancel
        the handler (its awaits end; a thread it waits for is waited for)."""
        with self._lock:
            first = not self.stop.is_set()
            if first:
                self.reason = reason
                self.stop.set()
            hooks = list(self._hooks) if first else []
        for hook in hooks:
            hook()
        self._scope.cancel()

    def on_stop(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook`` (from any thread) once the work is stopped, at once if it already is.
        Returns a function that removes the hook."""
        with self._lock:
            stopped = self.stop.is_set()
            if not stopped:
                self._hooks.append(hook)
        if stopped:
            hook()

        def remove() -> None:
            with self._lock:
                if hook in self._hooks:
                    self._hooks.remove(hook)

        return remove

    @property
    def stopped(self) -> bool:
        return self.stop.is_set()

    def check(self) -> None:
        """Raise ``Stopped`` if the request was cancelled (called between steps of the work)."""
        if self.stop.is_set():
            raise Stopped(f"request {self.id} stopped ({self.reason})")


def work_of(scope: Scope) -> Work:
    """The ``Work`` of the request whose ASGI scope this is (set by ``CancelMiddleware``)."""
    work = scope.get(_SCOPE_KEY)
    if not isinstance(work, Work):
        raise RuntimeError("the app is not wrapped in CancelMiddleware")
    return work


def current_work() -> Work | None:
    """The ``Work`` of the request this code runs for, in its handler or a thread it started."""
    return _current.get()


class Registry:
    """Requests in progress by id. Only the event loop's thread touches it."""

    def __init__(self) -> None:
        self._works: dict[str, list[Work]] = {}

    def add(self, work: Work) -> None:
        self._works.setdefault(work.id, []).append(work)

    def remove(self, work: Work) -> None:
        works = self._works.get(work.id, [])
        if work in works:
            works.remove(work)
        if not works:
            self._works.pop(work.id, None)

    def get(self, request_id: str) -> list[Work]:
        return list(self._works.get(request_id, []))

    def works(self) -> list[Work]:
        return [w for works in self._works.values() for w in works]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            text: str = value.decode("latin-1").strip()
            return text or None
    return None


def _is_stop(exc: BaseException) -> bool:
    """``exc`` only says that the work stopped: ``Stopped``, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_stop(e) for e in exc.exceptions)
    return isinstance(exc, Stopped)


def _json_message(status: int, body: dict[str, Any]) -> tuple[Message, Message]:
    data = json.dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))],
    }
    return start, {"type": "http.response.body", "body": data, "more_body": False}


def _cancelled(work: Work) -> RequestCancelled:
    return RequestCancelled(
        f"Request {work.id} was cancelled."
        if work.reason == "cancel"
        else f"Request {work.id} stopped: its client disconnected."
    )


class CancelMiddleware:
    """Registers each HTTP request as ``Work``, serves ``POST /llmux/cancel/{id}``, and stops a
    request's work when it is cancelled or its client disconnects (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: Registry | None = None,
        log: logging.Logger | None = None,
        stop_wait_s: float = STOP_WAIT_S,
    ) -> None:
        self.app = app
        self.registry = registry if registry is not None else Registry()
        self.log = log or logging.getLogger("llmux.engines")
        self.stop_wait_s = stop_wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path == REQUESTS_PATH:
            await self._requests_endpoint(send)
            return
        if path.startswith(CANCEL_PREFIX):
            await self._cancel_endpoint(scope, receive, send, path[len(CANCEL_PREFIX) :])
            return
        request_id = _header(scope, _HEADER) or f"internal-{next(_internal_ids)}"
        work = Work(request_id)
        self.registry.add(work)
        try:
            ending = await self._run(work, scope, receive, send)
        finally:
            self.registry.remove(work)
            work.done.set()
        if ending:
            # Cancelled while its client is still connected: end the answer without a success.
            with anyio.move_on_after(5, shield=True):
                for message in ending:
                    await send(message)

    async def _requests_endpoint(self, send: Send) -> None:
        now = time.monotonic()
        entries = [
            {
                "id": w.id,
                "seconds": round(now - w.started, 3),
                "progress": w.progress,
                "stopping": w.stopped,
            }
            for w in self.registry.works()
        ]
        start, end = _json_message(200, {"requests": entries})
        await send(start)
        await send(end)

    async def _cancel_endpoint(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        if scope["method"] != "POST" or not rid or "/" in rid:
            await send_error(
                send,
                MethodNotAllowed("Use POST /llmux/cancel/{request_id}.")
                if rid and "/" not in rid
                else NotFound("Not found."),
            )
            return
        works = self.registry.get(rid)
        asked = time.monotonic()
        for work in works:
            work.cancel("cancel")
        stopped = True
        if works:
            with anyio.move_on_after(self.stop_wait_s):
                for work in works:
                    await work.done.wait()
            stopped = all(w.done.is_set() for w in works)
            self.log.info(
                "request %s cancelled; %s after %.2fs",
                rid,
                "stopped" if stopped else "still running",
                time.monotonic() - asked,
            )
        start, end = _json_message(200, {"id": rid, "found": bool(works), "stopped": stopped})
        await send(start)
        await send(end)

    async def _run(self, work: Work, scope: Scope, receive: Receive, send: Send) -> list[Message]:
        """Run the app for ``work``; return the messages that end a cancelled answer, if any."""
        scope[_SCOPE_KEY] = work
        body_done = False
        disconnected = anyio.Event()
        started = False  # the answer's headers went out
        complete = False  # the answer's last byte went out
        is_sse = False

        async def watch_disconnect() -> None:
            # The only reader of the client's side once the body has been read.
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            disconnected.set()
            if not complete:
                work.cancel("disconnect")

        async def wrapped_receive() -> Message:
            nonlocal body_done
            if body_done:
                if not disconnected.is_set():  # returns at once if set: no checkpoint
                    await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                body_done = True
                disconnected.set()
                work.cancel("disconnect")
            elif not message.get("more_body", False):
                body_done = True
                tg.start_soon(watch_disconnect)
            return message

        async def wrapped_send(message: Message) -> None:
            nonlocal started, complete, is_sse
            if work.stopped or disconnected.is_set():
                return  # nobody wants the rest; the fallback below ends the answer
            if message["type"] == "http.response.start":
                started = True
                for key, value in message.get("headers", []):
                    if key.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        is_sse = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        token = _current.set(work)
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                with work._scope:
                    try:
                        await self.app(scope, wrapped_receive, wrapped_send)
                    except anyio.get_cancelled_exc_class():
                        raise  # this scope's own cancel ends here; another goes on up
                    except BaseException as e:  # re-raised below, outside the task group
                        if not _is_stop(e):
                            error = e
                tg.cancel_scope.cancel()
        finally:
            _current.reset(token)
        if error is not None and not work.stopped:
            raise error
        if complete or disconnected.is_set() or not work.stopped:
            return []
        if not started:
            return list(error_messages(_cancelled(work)))
        if is_sse:
            event = sse_error(_cancelled(work))
            return [{"type": "http.response.body", "body": event, "more_body": False}]
        return []  # a body cut short: returning without its end makes the server cut the connection
