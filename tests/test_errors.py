"""The error tree (``llmux.errors``) and the one boundary that answers it (``llmux.api.errors``).

The tree's docstring is parsed: it must list exactly the classes there are, each with its status,
type and code. Every form of answer the boundary gives (ASGI, SSE, raw HTTP, Starlette) carries the
same envelope, and so do the engines' own servers (their real exception handlers and middleware,
in process).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import pkgutil
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import llmux
import llmux.errors
from llmux.api.errors import (
    error_body,
    error_messages,
    error_response,
    exception_handlers,
    http_error_response,
    send_error,
    sse_error,
)
from llmux.api.openapi import openapi_document
from llmux.config import parse_config
from llmux.engines import piper, whisper
from llmux.engines._cancel import CancelMiddleware
from llmux.errors import (
    InternalError,
    InvalidRequest,
    LlmuxError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    RequestCancelled,
)
from tests.test_openapi import config_text

_TREE = re.compile(
    r"^    (?P<indent>(?:│   |    |├── |└── )*)(?P<name>\w+) +(?P<status>\d{3}) (?P<type>\w+)"
    r"(?: / (?P<code>\w+))?(?: \((?P<note>[^)]*)\))?$"
)
_INTERNAL = re.compile(r"^    (?P<name>[A-Z]\w+) {2,}\S")
T = TypeVar("T")


@dataclass(frozen=True)
class Documented:
    name: str
    parent: str | None
    status: int
    type: str
    code: str | None
    note: str


def _documented() -> tuple[list[Documented], list[str]]:
    """The docstring's tree of client errors and its list of internal errors."""
    doc = llmux.errors.__doc__
    assert doc is not None
    tree_part, internal_part = doc.split("Internal errors", 1)
    tree: list[Documented] = []
    parents: list[str] = []
    for line in tree_part.splitlines():
        if not line.startswith("    "):
            continue
        match = _TREE.match(line)
        assert match, f"a tree line that does not parse: {line!r}"
        depth = len(match["indent"]) // 4
        del parents[depth:]
        tree.append(
            Documented(
                name=match["name"],
                parent=parents[-1] if parents else None,
                status=int(match["status"]),
                type=match["type"],
                code=match["code"],
                note=match["note"] or "",
            )
        )
        parents.append(match["name"])
    internal = [m["name"] for line in internal_part.splitlines() if (m := _INTERNAL.match(line))]
    return tree, internal


def _all_subclasses(cls: type[T]) -> set[type[T]]:
    found: set[type[T]] = set()
    todo = [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found


def _tree_classes() -> list[type[LlmuxError]]:
    return [getattr(llmux.errors, d.name) for d in _documented()[0]]


def _instance(cls: type[LlmuxError]) -> LlmuxError:
    if cls is ModelNotFound:
        return ModelNotFound("ghost")
    return cls(f'a {cls.__name__} — with "quotes" and ünïcode', param="field")


def _expected(error: LlmuxError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


# --- the tree's docstring is true and complete ---------------------------------------------------


def _import_all() -> None:
    """Every module of llmux: an error class defined anywhere shows up as a subclass."""
    for module in pkgutil.walk_packages(llmux.__path__, "llmux."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)


def test_the_docstring_tree_lists_exactly_the_client_errors_there_are() -> None:
    _import_all()
    tree, _ = _documented()
    names = [d.name for d in tree]
    assert len(names) == len(set(names)), names
    assert tree[0].name == "LlmuxError"
    assert tree[0].parent is None
    existing = {LlmuxError} | _all_subclasses(LlmuxError)
    assert {c.__name__ for c in existing} == set(names)
    for cls in existing:
        assert cls.__module__ == "llmux.errors", cls
        assert getattr(llmux.errors, cls.__name__) is cls


@pytest.mark.parametrize("documented", _documented()[0], ids=lambda d: d.name)
def test_each_class_is_what_the_tree_says(documented: Documented) -> None:
    cls = getattr(llmux.errors, documented.name)
    assert cls.status == documented.status
    assert cls.type == documented.type
    assert cls.code == documented.code
    if documented.parent is None:
        assert cls is LlmuxError
    else:
        assert cls.__bases__ == (getattr(llmux.errors, documented.parent),)
    assert cls.engine_only == documented.note.startswith("engine")


def test_the_internal_errors_are_documented_and_stay_importable_where_they_were() -> None:
    tree, internal = _documented()
    assert internal == ["ConfigError", "EngineError", "LaunchFailed", "IllegalTransition"]
    client = {d.name for d in tree}
    defined = {
        name
        for name, value in vars(llmux.errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == "llmux.errors"
    }
    assert defined == client | set(internal)
    _import_all()
    doc = llmux.errors.__doc__ or ""
    for name in internal:
        root = getattr(llmux.errors, name)
        assert not issubclass(root, LlmuxError), name
        for sub in _all_subclasses(root):
            assert f"``{sub.__name__}``" in doc, f"{sub.__qualname__} ({sub.__module__})"
    from llmux.backends.base import LaunchFailed
    from llmux.engines import EngineError
    from llmux.engines.packaged import EngineError as PackagedEngineError
    from llmux.scheduling.state import IllegalTransition

    assert LaunchFailed is llmux.errors.LaunchFailed
    assert EngineError is PackagedEngineError is llmux.errors.EngineError
    assert IllegalTransition is llmux.errors.IllegalTransition
    assert issubclass(IllegalTransition, RuntimeError)


def test_openapi_declares_the_types_and_codes_llmux_itself_answers(tmp_path: Path) -> None:
    """/openapi.json's ``Error``: the tree without the engines' own errors (those reach a client
    only inside a model's answer, which the document does not describe)."""
    doc = openapi_document(parse_config(config_text(tmp_path)))
    fields = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    ours = [c for c in _tree_classes() if c is not LlmuxError and not c.engine_only]
    assert sorted(fields["type"]["enum"]) == sorted({c.type for c in ours})
    assert fields["code"]["enum"] == [*sorted({c.code for c in ours if c.code}), None]
    assert "request_cancelled" not in fields["code"]["enum"]


# --- the boundary: every form carries the same envelope ------------------------------------------


@pytest.mark.parametrize("cls", _tree_classes(), ids=lambda c: c.__name__)
def test_every_form_of_the_answer_carries_the_same_envelope(cls: type[LlmuxError]) -> None:
    error = _instance(cls)
    expected = _expected(error)
    body = error_body(error)
    assert json.loads(body) == expected

    start, end = error_messages(error, ((b"allow", b"POST"),))
    assert start["status"] == cls.status
    assert start["headers"] == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"allow", b"POST"),
    ]
    assert end == {"type": "http.response.body", "body": body}

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(send_error(send, error))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == cls.status
    assert sent[1]["body"] == body

    assert sse_error(error) == b"event: error\ndata: " + body + b"\n\n"

    raw = http_error_response(error, [(b"server", b"llmux")])
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 %d " % cls.status)
    assert lines[1:] == [
        b"server: llmux",
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    assert rest == body

    response = error_response(error, {"allow": "GET"})
    assert response.status_code == cls.status
    assert response.body == body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["allow"] == "GET"


# --- Starlette apps: llmux's control plane and the engines' servers -----------------------------

Handler = Callable[[Request], Awaitable[Response]]


def _raiser(exc: Exception) -> Handler:
    async def handler(request: Request) -> Response:
        raise exc

    return handler


class _Secret(Exception):
    pass


@contextlib.asynccontextmanager
async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    # Starlette re-raises an unexpected exception after its handler answered (for the server's
    # log): the answer is what the client gets.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        yield client


async def _get(app: Any, method: str, path: str) -> httpx.Response:
    async with _client(app) as client:
        return await client.request(method, path)


@pytest.mark.parametrize(
    ("module", "where"), [(piper, "the piper engine"), (whisper, "the whisper engine")]
)
def test_an_engines_handlers_answer_every_error_in_the_envelope(
    module: Any, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    too_long = llmux.errors.InputTooLong("too long", param="input")
    routes = [
        Route("/tree", _raiser(too_long), methods=["POST"]),
        Route("/bug", _raiser(_Secret("/home/secret/path.py line 3")), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers=module.EXCEPTION_HANDLERS)

    async def run() -> list[httpx.Response]:
        return [
            await _get(app, "POST", "/tree"),
            await _get(app, "POST", "/nowhere"),
            await _get(app, "GET", "/tree"),
            await _get(app, "POST", "/bug"),
        ]

    with caplog.at_level(logging.ERROR):
        tree, missing, wrong_method, bug = asyncio.run(run())
    assert (tree.status_code, tree.json()) == (400, _expected(too_long))
    assert (missing.status_code, missing.json()) == (404, _expected(NotFound("Not Found")))
    assert wrong_method.status_code == 405
    assert wrong_method.json() == _expected(MethodNotAllowed("Method Not Allowed"))
    assert wrong_method.headers["allow"] == "POST"
    assert bug.status_code == 500
    assert bug.json() == _expected(InternalError(f"Internal error in {where}: _Secret"))
    assert "/home/" not in bug.text
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [_Secret]


def test_without_a_logger_an_unexpected_exception_is_left_to_the_server() -> None:
    """llmux's control plane: the tree and Starlette's own errors are answered in the envelope;
    anything else stays the server's 500, as before the boundary."""
    handlers = exception_handlers(lambda exc: NotFound("no such route"))
    assert set(handlers) == {LlmuxError, HTTPException}
    logged = exception_handlers(log=logging.getLogger("test"))
    assert set(logged) == {LlmuxError, HTTPException, Exception}


# --- the engines' cancellation middleware -------------------------------------------------------


def _cancellable_app() -> Starlette:
    started = anyio.Event()

    async def slow(request: Request) -> Response:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("not reached")

    async def wait_started(request: Request) -> Response:
        await started.wait()
        return Response(b"")

    routes = [Route("/slow", slow, methods=["POST"]), Route("/started", wait_started)]
    return Starlette(routes=routes, middleware=[Middleware(CancelMiddleware)])


def test_the_cancel_endpoint_and_a_cancelled_request_answer_in_the_envelope() -> None:
    async def run() -> list[httpx.Response]:
        answers: list[httpx.Response] = []
        async with _client(_cancellable_app()) as client:
            wrong_method = await client.get("/llmux/cancel/r1")
            no_id = await client.post("/llmux/cancel/")

            async def slow() -> None:
                answers.append(await client.post("/slow", headers={"x-llmux-request-id": "r1"}))

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(slow)
                    await client.get("/started")
                    cancel = await client.post("/llmux/cancel/r1")
        return [wrong_method, no_id, cancel, *answers]

    wrong_method, no_id, cancel, cancelled = asyncio.run(run())
    assert wrong_method.status_code == 405
    assert wrong_method.json() == _expected(
        MethodNotAllowed("Use POST /llmux/cancel/{request_id}.")
    )
    assert (no_id.status_code, no_id.json()) == (404, _expected(NotFound("Not found.")))
    assert cancel.json() == {"id": "r1", "found": True, "stopped": True}
    assert cancelled.status_code == 499
    assert cancelled.json() == _expected(RequestCancelled("Request r1 was cancelled."))


# --- llama-cpp's request validation -------------------------------------------------------------


def test_llama_request_validation_answers_in_the_envelope() -> None:
    pytest.importorskip("llama_cpp.server.types")
    from llmux.engines.llama import RequestValidation

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("an invalid body reached the app")

    app = RequestValidation(never)

    async def run() -> httpx.Response:
        async with _client(app) as client:
            return await client.post("/v1/chat/completions", content=b"{not json")

    response = asyncio.run(run())
    assert response.status_code == 400
    expected = InvalidRequest("The request body must be JSON (JSONDecodeError).")
    assert response.json() == _expected(expected)
