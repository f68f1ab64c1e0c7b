"""The boundary where an error becomes OpenAI's envelope.

The one place that builds ``{"error": {"message", "type", "param", "code"}}`` from the error tree
(``llmux.errors``), for every server llmux runs: the relay (raw ASGI), the control plane
(Starlette), the HTTP server's own answers below the app (raw HTTP/1.1) and the built-in engines'
servers. Every form is built from ``error_body``:

- ``error_body(error)``: the envelope as JSON bytes;
- ``error_messages(error)`` / ``send_error(send, error)``: the ASGI answer (status and body);
- ``sse_error(error)``: the ``event: error`` that ends an SSE stream whose 200 already went out;
- ``http_error_response(error, default_headers)``: a whole HTTP/1.1 answer that closes the
  connection (the server's 400/408/431, where no app runs);
- ``exception_handlers(...)`` (with ``error_response``): Starlette's exception handlers, so that
  an app never answers outside the envelope: an ``LlmuxError`` as itself, Starlette's own
  ``HTTPException`` as the app maps it (``from_http_exception`` by default), and, where asked,
  any other exception as ``internal_error``: a 500 that names only the exception's class.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from llmux.errors import (
    BodyTooLarge,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    LlmuxError,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
)

__all__ = [
    "error_body",
    "error_messages",
    "error_response",
    "exception_handlers",
    "from_http_exception",
    "http_error_response",
    "internal_error",
    "send_error",
    "sse_error",
]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Headers = tuple[tuple[bytes, bytes], ...]


def error_body(error: LlmuxError) -> bytes:
    """OpenAI's envelope for ``error``, as JSON."""
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }
    )


def error_messages(error: LlmuxError, extra: Headers = ()) -> tuple[Message, Message]:
    """The two ASGI messages that answer ``error`` (``extra``: more headers, e.g. ``Allow``)."""
    body = error_body(error)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        *extra,
    ]
    start = {"type": "http.response.start", "status": error.status, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


async def send_error(send: Send, error: LlmuxError, extra: Headers = ()) -> None:
    start, body = error_messages(error, extra)
    await send(start)
    await send(body)


def sse_error(error: LlmuxError) -> bytes:
    return b"event: error\ndata: " + error_body(error) + b"\n\n"


def http_error_response(error: LlmuxError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 answer for ``error``, after the server's ``default_headers``; it says
    ``connection: close`` (the caller closes the connection once it is written)."""
    body = error_body(error)
    try:
        phrase = http.HTTPStatus(error.status).phrase.encode()
    except ValueError:  # 499 has none
        phrase = b""
    out = [b"HTTP/1.1 %d %s\r\n" % (error.status, phrase)]
    out.extend(name + b": " + value + b"\r\n" for name, value in default_headers)
    out.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    out.append(b"connection: close\r\n\r\n")
    out.append(body)
    return b"".join(out)


def error_response(error: LlmuxError, headers: Mapping[str, str] | None = None) -> Response:
    """A Starlette response for ``error``."""
    return Response(
        error_body(error), status_code=error.status, headers=headers, media_type="application/json"
    )


def internal_error(exc: BaseException, where: str) -> InternalError:
    """An unexpected exception as a client may see it: its class, never its text or traceback.
    ``where``: e.g. "the piper engine"."""
    return InternalError(f"Internal error in {where}: {type(exc).__name__}")


_BY_STATUS: dict[int, type[LlmuxError]] = {
    400: InvalidRequest,  # e.g. a multipart body Starlette cannot parse
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: BodyTooLarge,
    431: HeadersTooLarge,
}


def from_http_exception(exc: HTTPException) -> LlmuxError:
    """Starlette's own ``HTTPException`` (no route: 404, wrong method: 405, a form it cannot
    parse: 400) as the error of the tree for its status, with Starlette's message. A status the
    tree has no class for becomes ``InvalidRequest`` (4xx) or ``InternalError``."""
    cls = _BY_STATUS.get(exc.status_code)
    if cls is None:
        cls = InvalidRequest if exc.status_code < 500 else InternalError
    return cls(str(exc.detail))


Handler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers(
    http_error: Callable[[HTTPException], LlmuxError] = from_http_exception,
    *,
    log: logging.Logger | None = None,
    where: str = "llmux",
) -> dict[Any, Handler]:
    """Starlette's ``exception_handlers`` for an app whose every error is an envelope.

    ``http_error`` maps Starlette's ``HTTPException`` into the tree (its headers, such as a 405's
    ``Allow``, are kept). With ``log``, any other exception is answered too: logged there with
    its traceback, and answered as ``internal_error(exc, where)``; without, it is left to the
    server."""

    async def on_llmux_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LlmuxError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(http_error(exc), exc.headers)

    handlers: dict[Any, Handler] = {LlmuxError: on_llmux_error, HTTPException: on_http_error}
    if log is not None:
        logger = log

        async def on_unexpected(request: Request, exc: Exception) -> Response:
            logger.exception("unexpected error in %s %s", request.method, request.url.path)
            return error_response(internal_error(exc, where))

        handlers[Exception] = on_unexpected
    return handlers
