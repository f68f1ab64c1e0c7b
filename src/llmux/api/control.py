"""The control plane (Starlette): health, status, models, admin load/unload/sleep, logs, events,
metrics, the status page and the OpenAPI document. Thin routes: check the key, call one thing,
answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmux.api.auth import Access, Authenticator
from llmux.api.errors import exception_handlers
from llmux.api.openapi import openapi_document
from llmux.api.wire import ModelAction, ModelList, PublicState, SchedulerEvent, Status
from llmux.errors import InvalidRequest, LlmuxError, MethodNotAllowed, NotFound
from llmux.observe import Observer
from llmux.scheduling.runtime import Scheduler
from llmux.scheduling.snapshot import EventSnapshot
from llmux.static import status_page

LOG_FOLLOW_POLL_S = 0.25
_NO_CACHE = {"cache-control": "no-cache", "x-accel-buffering": "no"}

Handler = Callable[[Request], Awaitable[Response]]


def _sse(event: EventSnapshot) -> bytes:
    data = orjson.dumps(SchedulerEvent.from_snapshot(event).model_dump(mode="json"))
    return b"event: " + event.event.value.encode() + b"\ndata: " + data + b"\n\n"


def _route_error(exc: HTTPException) -> LlmuxError:
    """Starlette's 404 (no route) and 405 (a route, another method; its ``Allow`` is kept)."""
    if exc.status_code == 405:
        return MethodNotAllowed("method not allowed on this path")
    return NotFound("no such route")


def _flag(request: Request, name: str) -> bool:
    """A boolean query parameter (true/false, 1/0, yes/no, on/off); absent = False."""
    raw = request.query_params.get(name)
    if raw is None:
        return False
    value = raw.lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise InvalidRequest(f"query parameter '{name}' must be true or false", param=name)


def build_control(scheduler: Scheduler, auth: Authenticator, observer: Observer) -> Starlette:
    def keyed(access: Access, handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            keys = request.headers.getlist("authorization")
            if len(keys) > 1:  # the relay refuses the same: no route reads a different one
                raise InvalidRequest("more than one Authorization header")
            auth.check(access, keys[0] if keys else None)
            return await handler(request)

        return checked

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # model_dump, then Starlette's JSON: the bytes are those of the dicts these routes sent before
    # the wire models (pydantic's own JSON writes some floats differently).
    async def status(_: Request) -> Response:
        return JSONResponse(Status.from_snapshot(scheduler.snapshot()).model_dump(mode="json"))

    async def models(_: Request) -> Response:
        listed = ModelList.from_snapshot(scheduler.snapshot(), scheduler.config)
        return JSONResponse(listed.model_dump(mode="json"))

    def admin_action(act: Callable[[str], Awaitable[None]]) -> Handler:
        """An admin action on one model (an id or alias): done, then the model's state now."""

        async def handler(request: Request) -> Response:
            model_id = scheduler.resolve(request.path_params["name"])
            await act(model_id)
            try:
                state = PublicState.of(scheduler.snapshot().model(model_id).state)
            except KeyError:  # removed by a reload meanwhile, and gone already
                state = PublicState.UNLOADED
            return JSONResponse(ModelAction(id=model_id, state=state).model_dump(mode="json"))

        return handler

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(observer.registry), media_type=CONTENT_TYPE_LATEST)

    async def events(request: Request) -> Response:
        replay = _flag(request, "replay")
        queue = observer.subscribe()
        backlog = list(observer.recent) if replay else []

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b": llmux events\n\n"
                for past in backlog:
                    yield _sse(past)
                while (event := await queue.get()) is not None:
                    yield _sse(event)
            finally:
                observer.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=_NO_CACHE)

    async def logs(request: Request) -> Response:
        model_id = scheduler.resolve(request.path_params["name"])
        child = scheduler.child(model_id)
        if not _flag(request, "follow"):
            return JSONResponse({"id": model_id, "lines": child.log_tail() if child else []})

        async def tail() -> AsyncIterator[bytes]:
            seen = 0
            current = None
            while not observer.closed:  # ends at shutdown (Observer.close)
                latest = scheduler.child(model_id)
                if latest is not current:  # a new process: start from its first kept line
                    current, seen = latest, 0
                if current is not None:
                    lines, seen = current.log_since(seen)
                    if lines:
                        yield ("\n".join(lines) + "\n").encode()
                await asyncio.sleep(LOG_FOLLOW_POLL_S)

        return StreamingResponse(tail(), media_type="text/plain; charset=utf-8", headers=_NO_CACHE)

    described: list[Any] = [None, b""]  # [the config it was built from, the document]

    async def openapi(_: Request) -> Response:
        # Built from the config (a reload changes the model ids and bounds it shows), once per
        # config object.
        config = scheduler.config
        if described[0] is not config:
            described[:] = [config, orjson.dumps(openapi_document(config))]
        return Response(described[1], media_type="application/json")

    page_body, page_headers = status_page()

    # A static shell with no data in it: open, so that a browser can load it and then ask for
    # the key that /status and /events need (docs/status-page.md).
    async def page(_: Request) -> Response:
        return HTMLResponse(page_body, headers=page_headers)

    read, adm = Access.READ, Access.ADMIN
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/status", keyed(read, status), methods=["GET"]),
        Route("/v1/models", keyed(read, models), methods=["GET"]),
        Route("/models/{name}/load", keyed(adm, admin_action(scheduler.load)), methods=["POST"]),
        Route(
            "/models/{name}/unload", keyed(adm, admin_action(scheduler.unload)), methods=["POST"]
        ),
        Route("/models/{name}/sleep", keyed(adm, admin_action(scheduler.sleep)), methods=["POST"]),
        Route("/models/{name}/logs", keyed(adm, logs), methods=["GET"]),
        Route("/metrics", keyed(read, metrics), methods=["GET"]),
        Route("/events", keyed(read, events), methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    # A bug in a route is logged with its traceback and answered 500 in the envelope (no trace).
    handlers = exception_handlers(_route_error, log=logging.getLogger("llmux.control"))
    return Starlette(routes=routes, exception_handlers=handlers)
