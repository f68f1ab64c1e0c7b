"""OpenAI error envelopes for the engines' own small servers (whisper, piper)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmux.errors import LlmuxError


def _envelope(status: int, message: str, type_: str, code: str | None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def exception_handlers(engine: str, log: logging.Logger) -> dict[Any, Any]:
    """Starlette exception handlers: every error is an envelope, never a traceback."""

    async def on_llmux_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LlmuxError)
        return JSONResponse(exc.envelope(), status_code=exc.status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return _envelope(exc.status_code, str(exc.detail), type_, code)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        message = f"Internal error in the {engine} engine: {type(exc).__name__}"
        return _envelope(500, message, "server_error", None)

    return {LlmuxError: on_llmux_error, HTTPException: on_http_error, Exception: on_unexpected}
