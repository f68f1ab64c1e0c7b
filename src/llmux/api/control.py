"""The control plane (FastAPI): health, status, models, admin load/unload. Thin routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmux.api.auth import Access, Authenticator
from llmux.errors import InvalidRequest, LlmuxError, MethodNotAllowed, NotFound
from llmux.observe import Observer, SchedulerEvent
from llmux.scheduling.runtime import Scheduler
from llmux.static import status_page

LOG_FOLLOW_POLL_S = 0.25
_NO_CACHE = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _sse(event: SchedulerEvent) -> bytes:
    return b"event: " + event.event.encode() + b"\ndata: " + orjson.dumps(event.as_dict()) + b"\n\n"


def _error_response(error: LlmuxError) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.status)


def build_control(scheduler: Scheduler, auth: Authenticator, observer: Observer) -> FastAPI:
    app = FastAPI(title="llmux", docs_url=None, redoc_url=None, openapi_url=None)

    async def reader(authorization: Annotated[str | None, Header()] = None) -> None:
        auth.check(Access.READ, authorization)

    async def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        auth.check(Access.ADMIN, authorization)

    @app.exception_handler(LlmuxError)
    async def _llmux_error(_: Request, exc: LlmuxError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        return _error_response(InvalidRequest(str(first.get("msg"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return _error_response(MethodNotAllowed("method not allowed on this path"))
        return _error_response(NotFound("no such route"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status", dependencies=[Depends(reader)])
    async def status() -> dict[str, Any]:
        return scheduler.status()

    @app.get("/v1/models", dependencies=[Depends(reader)])
    async def models() -> dict[str, Any]:
        by_id = {m["id"]: m for m in scheduler.status()["models"]}
        data = []
        for model_id, m in scheduler.config.models.items():
            s = by_id[model_id]
            extra = {
                "type": m.type,
                "tier": s["tier"],
                "state": s["state"],
                "vram_gb": s["vram_gb"],
                "in_flight": s["in_flight"],
            }
            for name in [model_id, *m.aliases]:
                data.append(
                    {
                        "id": name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "llmux",
                        "llmux": {**extra, "alias_of": None if name == model_id else model_id},
                    }
                )
        return {"object": "list", "data": data}

    @app.post("/models/{name}/load", dependencies=[Depends(admin)])
    async def load(name: str) -> dict[str, Any]:
        model_id = scheduler.resolve(name)
        await scheduler.load(model_id)
        return {"id": model_id, "state": scheduler.core.models[model_id].state.value}

    @app.post("/models/{name}/unload", dependencies=[Depends(admin)])
    async def unload(name: str) -> dict[str, Any]:
        model_id = scheduler.resolve(name)
        await scheduler.unload(model_id)
        return {"id": model_id, "state": scheduler.core.models[model_id].state.value}

    @app.get("/metrics", dependencies=[Depends(reader)])
    async def metrics() -> Response:
        return Response(generate_latest(observer.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/events", dependencies=[Depends(reader)])
    async def events(replay: bool = False) -> StreamingResponse:
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

    @app.get("/models/{name}/logs", dependencies=[Depends(admin)])
    async def logs(name: str, follow: bool = False) -> Response:
        model_id = scheduler.resolve(name)
        child = scheduler.child(model_id)
        if not follow:
            return JSONResponse({"id": model_id, "lines": child.log_tail() if child else []})

        async def tail() -> AsyncIterator[bytes]:
            seen = 0
            current = None
            while True:
                latest = scheduler.child(model_id)
                if latest is not current:  # a new process: start from its first kept line
                    current, seen = latest, 0
                if current is not None:
                    lines, seen = current.log_since(seen)
                    if lines:
                        yield ("\n".join(lines) + "\n").encode()
                await asyncio.sleep(LOG_FOLLOW_POLL_S)

        return StreamingResponse(tail(), media_type="text/plain; charset=utf-8", headers=_NO_CACHE)

    page_body, page_headers = status_page()

    # A static shell with no data in it: open, so that a browser can load it and then ask for
    # the key that /status and /events need (docs/status-page.md).
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_body, headers=page_headers)

    return app
