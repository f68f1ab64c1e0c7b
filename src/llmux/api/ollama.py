"""The Ollama API (DESIGN section 2), translated onto each model's OpenAI endpoint.

For the clients that speak Ollama's API rather than OpenAI's (Home Assistant's Ollama integration,
Open WebUI): ``GET /api/version``, ``/api/tags``, ``/api/ps``; ``POST /api/show``, ``/api/chat``,
``/api/generate``, ``/api/embed`` and the older ``/api/embeddings``, in Ollama's shapes. A
request is read and checked here, rewritten as an OpenAI request (chat -> ``/v1/chat/completions``;
generate -> the same, or ``/v1/completions`` for ``raw``/``suffix``; embed -> ``/v1/embeddings``)
and sent to the model's child through the scheduler (a lease, as the relay takes one) over the
app's shared aiohttp session. The child's SSE becomes Ollama's NDJSON as it arrives; streamed
tool call deltas are assembled into Ollama's ``tool_calls`` (arguments as an object).

Errors are Ollama's ``{"error": "..."}`` with the status llmux would answer (an unknown model:
404 ``model 'x' not found``, Ollama's words); once a stream has started, an error is its last
line, ``{"error": "..."}``, never a clean ``"done": true``. What is mapped, passed or ignored, and
why: docs/ollama.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmux.api.auth import Authenticator
from llmux.api.errors import from_http_exception, internal_error
from llmux.api.relay import UpstreamRoute, stop_work
from llmux.config import ModelConfig, ModelType
from llmux.errors import (
    BodyTooLarge,
    InvalidRequest,
    LlmuxError,
    ModelNotFound,
    UnsupportedModel,
    UpstreamError,
)
from llmux.observe import Observer
from llmux.scheduling.runtime import Lease, Scheduler
from llmux.scheduling.state import ModelState

log = logging.getLogger("llmux.ollama")

OLLAMA_VERSION = "0.12.0"
"""What ``/api/version`` answers: the Ollama release whose API shapes llmux follows (clients
compare it to decide which fields to send)."""

ROUTE_TYPES: dict[str, frozenset[ModelType]] = {
    "/api/chat": frozenset({"llm"}),
    "/api/generate": frozenset({"llm"}),
    "/api/embed": frozenset({"embedding", "llm"}),
    "/api/embeddings": frozenset({"embedding", "llm"}),
    "/api/show": frozenset({"embedding", "llm"}),
}
"""The model types each Ollama route accepts; another type is a 400 (``unsupported_model``)."""

LISTED_TYPES: frozenset[ModelType] = frozenset({"llm", "embedding"})
"""The model types ``/api/tags`` and ``/api/ps`` list (Ollama serves no speech models)."""

NDJSON = "application/x-ndjson"
_LATEST = ":latest"
_NUMBER = (int, float)


# ---------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def _message_of(exc: LlmuxError) -> str:
    if isinstance(exc, ModelNotFound):
        return f"model '{exc.model}' not found"  # Ollama's own words
    return exc.message


def error_response(exc: LlmuxError) -> Response:
    """An error of the tree as Ollama answers one: ``{"error": "..."}`` with llmux's status."""
    return Response(_error_body(_message_of(exc)), exc.status, media_type="application/json")


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _listed_name(model_id: str) -> str:
    """A model id as Ollama lists names: with a tag (``smollm2`` -> ``smollm2:latest``)."""
    return model_id if ":" in model_id else model_id + _LATEST


def _image_url(data: Any, where: str) -> dict[str, Any]:
    """An Ollama image (base64, no data: prefix) as an OpenAI ``image_url`` content part."""
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{where}: each image must be a base64 string", param="images")
    try:
        head = base64.b64decode(data[:24], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: an image is not valid base64", param="images") from None
    mime = "image/png"
    if head.startswith(b"\xff\xd8"):
        mime = "image/jpeg"
    elif head.startswith(b"GIF8"):
        mime = "image/gif"
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _content(text: str, images: Any, where: str) -> Any:
    """A message's OpenAI content: the text alone, or text and image parts."""
    if images is None or images == []:
        return text
    if not isinstance(images, list):
        raise InvalidRequest(f"{where}: 'images' must be a list", param="images")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts.extend(_image_url(image, where) for image in images)
    return parts


def _openai_messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama's ``messages`` as OpenAI's: images as content parts, ``tool_calls`` with their
    arguments as a JSON string (and an id where the client gave none), a ``tool`` message tied
    to its call by ``tool_call_id``, else by ``tool_name``, else to the last call."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("'messages' must be a list", param="messages")
    out: list[dict[str, Any]] = []
    calls: list[tuple[str, str]] = []  # (id, name) of the assistant's tool calls so far
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where} must be an object", param="messages")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"{where}: 'role' must be a string", param="messages")
        text = msg.get("content")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}: 'content' must be a string", param="messages")
        item: dict[str, Any] = {"role": role, "content": _content(text, msg.get("images"), where)}
        tool_calls = msg.get("tool_calls")
        if tool_calls:
            if not isinstance(tool_calls, list):
                raise InvalidRequest(f"{where}: 'tool_calls' must be a list", param="messages")
            item["tool_calls"] = [
                _openai_tool_call(call, f"{where}.tool_calls[{j}]", f"call_{i}_{j}", calls)
                for j, call in enumerate(tool_calls)
            ]
        if role == "tool":
            item["tool_call_id"] = _tool_call_id(msg, calls, where)
        out.append(item)
    return out


def _openai_tool_call(
    call: Any, where: str, default_id: str, calls: list[tuple[str, str]]
) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{where}: needs 'function' with a 'name'", param="messages")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # already JSON text (some clients send it so)
        text = arguments
    elif isinstance(arguments, dict):
        text = orjson.dumps(arguments).decode()
    else:
        raise InvalidRequest(f"{where}: 'arguments' must be an object", param="messages")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = default_id
    calls.append((call_id, function["name"]))
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": function["name"], "arguments": text},
    }


def _tool_call_id(msg: dict[str, Any], calls: list[tuple[str, str]], where: str) -> str:
    given = msg.get("tool_call_id")
    if isinstance(given, str) and given:
        return given
    name = msg.get("tool_name") or msg.get("name")
    for call_id, call_name in reversed(calls):
        if call_name == name:
            return call_id
    if calls:
        return calls[-1][0]
    raise InvalidRequest(
        f"{where}: a 'tool' message needs an earlier assistant message with 'tool_calls'",
        param="messages",
    )


_FLOAT_OPTIONS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
)
_INT_OPTIONS = ("top_k", "seed")


def _options(raw: Any, payload: dict[str, Any]) -> None:
    """Ollama's ``options`` onto the OpenAI request (docs/ollama.md says what is ignored)."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise InvalidRequest("'options' must be an object", param="options")
    for name in _FLOAT_OPTIONS:
        value = raw.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise InvalidRequest(f"options.{name} must be a number", param="options")
        payload[name] = value
    for name in _INT_OPTIONS:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest(f"options.{name} must be an integer", param="options")
        payload[name] = value
    predict = raw.get("num_predict")
    if predict is not None:
        if not isinstance(predict, int) or isinstance(predict, bool):
            raise InvalidRequest("options.num_predict must be an integer", param="options")
        if predict > 0:  # -1 (infinite) and -2 (fill the context) leave it to the model
            payload["max_tokens"] = predict
    stop = raw.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("options.stop must be a list of strings", param="options")
        if stop:
            payload["stop"] = stop


def _format(raw: Any, spec: ModelConfig, payload: dict[str, Any]) -> None:
    """``format``: ``"json"`` -> JSON mode; a schema -> structured output, in the form the
    model's server takes (llama-cpp-python: ``json_object`` with a ``schema``)."""
    if raw is None or raw == "":
        return
    if raw == "json":
        payload["response_format"] = {"type": "json_object"}
    elif isinstance(raw, dict):
        if spec.engine == "llama-cpp":
            payload["response_format"] = {"type": "json_object", "schema": raw}
        else:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "format", "schema": raw},
            }
    else:
        raise InvalidRequest("'format' must be \"json\" or a JSON schema object", param="format")


def _tools(raw: Any, payload: dict[str, Any]) -> None:
    if raw is None or raw == []:
        return
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise InvalidRequest("'tools' must be a list of objects", param="tools")
    payload["tools"] = [{"type": "function", **t} if "type" not in t else t for t in raw]


def _done_reason(finish: str | None) -> str:
    if finish in (None, "tool_calls", "function_call"):
        return "stop"
    return finish


def _ollama_tool_calls(calls: list[dict[str, Any]], model_id: str) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as JSON text) as Ollama's (arguments as an object)."""
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        text = function.get("arguments") or "{}"
        try:
            arguments = orjson.loads(text) if isinstance(text, str) else text
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise UpstreamError(
                f"model '{model_id}' made a tool call whose arguments are not a JSON object: "
                f"{str(text)[:200]}"
            )
        item: dict[str, Any] = {
            "function": {"index": index, "name": function.get("name", ""), "arguments": arguments}
        }
        if call.get("id"):
            item["id"] = call["id"]
        out.append(item)
    return out


# ---------------------------------------------------------------- translation of answers


@dataclass
class _Timing:
    started: float
    queued: float = 0.0
    """Seconds waiting for the lease (a load included): Ollama's ``load_duration``."""

    def fields(self) -> dict[str, Any]:
        return {
            "total_duration": _ns(time.monotonic() - self.started),
            "load_duration": _ns(self.queued),
        }


def _usage_fields(usage: Any) -> dict[str, Any]:
    if not isinstance(usage, dict):
        return {}
    out = {}
    if isinstance(usage.get("prompt_tokens"), int):
        out["prompt_eval_count"] = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        out["eval_count"] = usage["completion_tokens"]
    return out


@dataclass
class _Answer:
    """Turns the child's OpenAI answer (whole, or SSE chunk by chunk) into Ollama's objects.

    ``kind``: ``chat`` (an ``/api/chat`` answer from chat completions), ``generate`` (an
    ``/api/generate`` answer from chat completions) or ``text`` (``/api/generate`` from
    completions); ``embed`` and ``embeddings`` for the two embedding routes."""

    kind: str
    name: str
    model_id: str
    finish: str | None = None
    usage: Any = None
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def _head(self) -> dict[str, Any]:
        return {"model": self.name, "created_at": _now()}

    def _piece(self, content: str, thinking: str | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            return {**self._head(), "message": message, "done": False}
        out = {**self._head(), "response": content, "done": False}
        if thinking:
            out["thinking"] = thinking
        return out

    def loaded(self) -> dict[str, Any]:
        """Ollama's answer to an empty prompt (or no messages, or no input): the model is
        loaded."""
        if self.kind == "embed":
            return {"model": self.name, "embeddings": []}
        out = self._piece("")
        out.update(done=True, done_reason="load")
        return out

    def whole(self, body: Any, timing: _Timing) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise UpstreamError(f"model '{self.model_id}' answered with something not an object")
        if self.kind in ("embed", "embeddings"):
            return self._embeddings(body, timing)
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise UpstreamError(f"model '{self.model_id}' answered without choices")
        choice = choices[0]
        if self.kind == "text":
            out = self._piece(str(choice.get("text") or ""))
        else:
            message = choice.get("message") or {}
            out = self._piece(
                str(message.get("content") or ""), message.get("reasoning_content") or None
            )
            calls = message.get("tool_calls")
            if calls and self.kind == "chat":
                out["message"]["tool_calls"] = _ollama_tool_calls(calls, self.model_id)
        out.update(done=True, done_reason=_done_reason(choice.get("finish_reason")))
        out.update(timing.fields())
        out.update(_usage_fields(body.get("usage")))
        return out

    def _embeddings(self, body: dict[str, Any], timing: _Timing) -> dict[str, Any]:
        data = body.get("data")
        if not isinstance(data, list):
            raise UpstreamError(f"model '{self.model_id}' answered without data")
        ordered = sorted((d for d in data if isinstance(d, dict)), key=lambda d: d.get("index", 0))
        vectors = [d.get("embedding") for d in ordered]
        if not all(isinstance(v, list) for v in vectors):
            raise UpstreamError(f"model '{self.model_id}' answered embeddings not as floats")
        if self.kind == "embeddings":
            return {"embedding": vectors[0] if vectors else []}
        out: dict[str, Any] = {"model": self.name, "embeddings": vectors, **timing.fields()}
        usage = body.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            out["prompt_eval_count"] = usage["prompt_tokens"]
        return out

    def chunk(self, body: Any) -> list[dict[str, Any]]:
        """One SSE chunk of the child's stream: the objects it makes (tool calls are kept until
        the end: their arguments arrive in pieces)."""
        if not isinstance(body, dict):
            return []
        if body.get("usage"):
            self.usage = body["usage"]
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        if self.kind == "text":
            text = choice.get("text")
            return [self._piece(text)] if text else []
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return []
        for call in delta.get("tool_calls") or ():
            self._add_call(call)
        content = delta.get("content") or ""
        thinking = delta.get("reasoning_content") or None
        if not content and not thinking:
            return []
        return [self._piece(str(content), thinking)]

    def _add_call(self, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        index = delta.get("index", len(self.calls))
        call = self.calls.setdefault(
            index if isinstance(index, int) else len(self.calls),
            {"id": None, "function": {"name": "", "arguments": ""}},
        )
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]

    def end(self, timing: _Timing) -> list[dict[str, Any]]:
        """The last objects of a stream: the assembled tool calls, then ``"done": true``."""
        out = []
        if self.calls and self.kind == "chat":
            calls = [self.calls[i] for i in sorted(self.calls)]
            piece = self._piece("")
            piece["message"]["tool_calls"] = _ollama_tool_calls(calls, self.model_id)
            out.append(piece)
        last = self._piece("")
        last.update(done=True, done_reason=_done_reason(self.finish))
        last.update(timing.fields())
        last.update(_usage_fields(self.usage))
        out.append(last)
        return out


# ---------------------------------------------------------------- one call to a model


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


class _Gone(Exception):
    """The client went away while its answer was being sent."""


class _ModelCall(Response):
    """The ASGI answer of one request to a model: take the lease (loading it if need be), send
    the OpenAI request to the child, translate its answer. A client that goes away cancels it
    (the built-in engine is told to stop, as the relay does); the lease is always released."""

    def __init__(
        self,
        api: OllamaApi,
        endpoint: str,
        model_id: str,
        upstream: str | None,
        payload: dict[str, Any],
        stream: bool,
        answer: _Answer,
    ) -> None:
        # No Response.__init__: the headers are sent by __call__, once the outcome is known.
        self.background = None
        self.api = api
        self.endpoint = endpoint
        self.model_id = model_id
        self.upstream = upstream
        """The child's path; None: only load the model (an empty prompt)."""
        self.payload = payload
        self.stream = stream
        self.answer = answer
        self.status = 0
        self.gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None

        def on_disconnect(watch: asyncio.Task[None]) -> None:
            if not watch.cancelled() and watch.exception() is None:
                self.gone = True
                task.cancel()

        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        timing = _Timing(time.monotonic())
        queued: float | None = None
        try:
            scheduler = self.api.scheduler
            lease = scheduler.try_acquire(self.model_id)
            if lease is None:
                lease = await scheduler.acquire(self.model_id)
            queued = timing.queued = time.monotonic() - timing.started
            try:
                await self._serve(send, lease, timing)
            except asyncio.CancelledError:
                if not self.gone:
                    raise
                task.uncancel()
                route = _route(lease, scheduler)
                if route is not None and route.cancel_path is not None:
                    await self.api.stop_work(lease, route.cancel_path)
            finally:
                scheduler.release(lease)
        except LlmuxError as exc:
            if self.status == 0:
                await self._send_error(send, exc.status, _message_of(exc))
        except _ChildAnswer as exc:
            if self.status == 0:
                await self._send_error(send, exc.status, exc.message)
        except asyncio.CancelledError:
            if not self.gone:
                raise
            task.uncancel()
        except _Gone:
            self.gone = True
        finally:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()
            code = self.status or 499
            if self.gone:
                code = 499
            self.api.observer.request_done(self.model_id, self.endpoint, code, queued)

    async def _send_error(self, send: Send, status: int, message: str) -> None:
        body = _error_body(message)
        await self._start(send, status, "application/json", len(body))
        await self._body(send, body, more=False)

    async def _start(self, send: Send, status: int, media: str, length: int | None) -> None:
        self.status = status
        headers = [(b"content-type", media.encode())]
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
        except OSError:
            raise _Gone from None

    async def _body(self, send: Send, body: bytes, *, more: bool) -> None:
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        except OSError:
            raise _Gone from None

    async def _whole(self, send: Send, obj: dict[str, Any]) -> None:
        body = orjson.dumps(obj)
        await self._start(send, 200, "application/json", len(body))
        await self._body(send, body, more=False)

    async def _serve(self, send: Send, lease: Lease, timing: _Timing) -> None:
        if self.upstream is None:
            await self._whole(send, self.answer.loaded())
            return
        route = _route(lease, self.api.scheduler)
        timeout = route.timeout if route is not None else None
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if route is not None:
            headers.update(route.headers(lease))
        url = lease.base_url + self.upstream
        streaming = False
        try:
            async with self.api.session().post(
                url, data=orjson.dumps(self.payload), headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raise await _child_error(resp, self.model_id)
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    try:
                        body = orjson.loads(await resp.read())
                    except orjson.JSONDecodeError:
                        raise UpstreamError(
                            f"model '{self.model_id}' answered with a body that is not JSON"
                        ) from None
                    obj = self.answer.whole(body, timing)
                    if self.stream:
                        await self._start(send, 200, NDJSON, None)
                        await self._body(send, _line(obj), more=False)
                    else:
                        await self._whole(send, obj)
                    return
                await self._start(send, 200, NDJSON, None)
                streaming = True
                await self._relay_stream(send, resp, timing)
        except (aiohttp.ClientError, ConnectionError, TimeoutError, UpstreamError) as exc:
            error = _upstream_error(self.model_id, route.spec.stall_timeout if route else 0, exc)
            log.warning("upstream error model=%s: %s", self.model_id, error.message)
            if not streaming:
                raise error from None
            await self._body(send, _line({"error": error.message}), more=False)

    async def _relay_stream(
        self, send: Send, resp: aiohttp.ClientResponse, timing: _Timing
    ) -> None:
        event = b""
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"event:"):
                event = line[6:].strip()
                continue
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                out = b"".join(_line(obj) for obj in self.answer.end(timing))
                await self._body(send, out, more=False)
                return
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamError(
                    f"model '{self.model_id}' sent an event that is not JSON"
                ) from None
            if event == b"error" or (isinstance(body, dict) and "error" in body):
                raise UpstreamError(_child_message(body, f"model '{self.model_id}' failed"))
            event = b""
            pieces = self.answer.chunk(body)
            if pieces:
                await self._body(send, b"".join(_line(p) for p in pieces), more=True)
        raise UpstreamError(f"model '{self.model_id}' ended its stream before it was done")


def _route(lease: Lease, scheduler: Scheduler) -> UpstreamRoute | None:
    """The leased model's route (None if a reload removed it meanwhile)."""
    spec = scheduler.config.models.get(lease.model_id)
    return UpstreamRoute.of(spec) if spec is not None else None


def _child_message(body: Any, default: str) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
    return default


class _ChildAnswer(Exception):
    """The child's own error answer (its status, 400-599, and message), passed on as Ollama's
    ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _child_error(resp: aiohttp.ClientResponse, model_id: str) -> UpstreamError | _ChildAnswer:
    raw = await resp.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    detail = raw.decode("utf-8", "replace")[:2000]
    message = _child_message(body, f"model '{model_id}' answered {resp.status}: {detail}")
    if not 400 <= resp.status <= 599:
        return UpstreamError(f"model '{model_id}' answered with status {resp.status}")
    return _ChildAnswer(resp.status, message)


def _upstream_error(model_id: str, stall: float, exc: Exception) -> LlmuxError:
    if isinstance(exc, LlmuxError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamError(
            f"model '{model_id}' sent nothing for {stall:g} s (its stall_timeout); "
            "the request was cut"
        )
    return UpstreamError(f"model '{model_id}' failed mid-request: {type(exc).__name__}: {exc}")


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------- the routes


Handler = Callable[[Request], Awaitable[Response]]


class OllamaApi:
    """The ``/api/*`` routes, as a Starlette app mounted at ``/api`` (``app``)."""

    def __init__(
        self,
        scheduler: Scheduler,
        auth: Authenticator,
        observer: Observer,
        session: Callable[[], aiohttp.ClientSession],
        max_body: Callable[[], int],
    ) -> None:
        self.scheduler = scheduler
        self.auth = auth
        self.observer = observer
        self.session = session
        self.max_body = max_body
        self.started_at = _now()
        routes = [
            Route("/version", self._keyed(self.version), methods=["GET"]),
            Route("/tags", self._keyed(self.tags), methods=["GET"]),
            Route("/ps", self._keyed(self.ps), methods=["GET"]),
            Route("/show", self._keyed(self.show), methods=["POST"]),
            Route("/chat", self._keyed(self.chat, "/api/chat"), methods=["POST"]),
            Route("/generate", self._keyed(self.generate, "/api/generate"), methods=["POST"]),
            Route("/embed", self._keyed(self.embed, "/api/embed"), methods=["POST"]),
            Route("/embeddings", self._keyed(self.embeddings, "/api/embeddings"), methods=["POST"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers=self._handlers())

    # ------------------------------------------------------------ plumbing

    def _handlers(self) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
        async def on_llmux_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, LlmuxError)
            return error_response(exc)

        async def on_http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            response = error_response(from_http_exception(exc))
            if exc.headers:
                response.headers.update(exc.headers)
            return response

        async def on_unexpected(request: Request, exc: Exception) -> Response:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return error_response(internal_error(exc, "llmux"))

        return {
            LlmuxError: on_llmux_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        }

    def _keyed(self, handler: Handler, endpoint: str | None = None) -> Handler:
        """``handler`` behind the key check (as /v1/*). ``endpoint``: a route to a model, whose
        refusals before a model is called count in the request metrics (as the relay's)."""

        async def checked(request: Request) -> Response:
            try:
                keys = request.headers.getlist("authorization")
                if len(keys) > 1:
                    raise InvalidRequest("more than one Authorization header")
                self.auth.check_read(keys[0] if keys else None)
                return await handler(request)
            except LlmuxError as exc:
                if endpoint is not None:
                    self.observer.request_done("", endpoint, exc.status, None)
                raise

        return checked

    async def _json(self, request: Request) -> dict[str, Any]:
        limit = self.max_body()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge(f"request body is {length} bytes; the limit is {limit}")
        chunks = bytearray()
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        try:
            data = orjson.loads(chunks) if chunks else {}
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the body must be a JSON object")
        return data

    def _resolve(self, name: str) -> str:
        """A model id for a name as Ollama clients send it: an id or alias, with or without
        ``:latest``."""
        try:
            return self.scheduler.resolve(name)
        except ModelNotFound:
            if name.endswith(_LATEST):
                try:
                    return self.scheduler.resolve(name.removesuffix(_LATEST))
                except ModelNotFound:
                    pass
            raise ModelNotFound(name) from None

    def _model(self, data: dict[str, Any], path: str) -> tuple[str, str, ModelConfig]:
        """(the name as asked, less ``:latest``; the model id; its config), checked for
        ``path``."""
        name = data.get("model")
        if name is None:
            name = data.get("name")  # the older field of /api/show
        if not isinstance(name, str) or not name:
            raise InvalidRequest("model is required", param="model")
        model_id = self._resolve(name)
        spec = self.scheduler.config.models[model_id]
        served = ROUTE_TYPES[path]
        if spec.type not in served:
            kinds = " or ".join(sorted(served))
            raise UnsupportedModel(
                f"'{name}' is a {spec.type} model; {path} serves {kinds} models", param="model"
            )
        return name.removesuffix(_LATEST), model_id, spec

    def _call(
        self,
        endpoint: str,
        model_id: str,
        upstream: str | None,
        payload: dict[str, Any],
        stream: bool,
        answer: _Answer,
    ) -> Response:
        return _ModelCall(self, endpoint, model_id, upstream, payload, stream, answer)

    async def stop_work(self, lease: Lease, cancel_path: str) -> None:
        """The client went away: tell the built-in engine to stop this request's work, and
        return once it has (or after CANCEL_WAIT_S)."""
        outcome = await stop_work(self.session(), lease, cancel_path)
        log.info("cancel of request %d on %s: %s", lease.rid, lease.model_id, outcome)

    @staticmethod
    def _stream(data: dict[str, Any]) -> bool:
        stream = data.get("stream", True)
        if stream is None:
            return True
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be true or false", param="stream")
        return stream

    @staticmethod
    def _upstream_name(name: str, spec: ModelConfig) -> str:
        return spec.upstream_model or name

    def _details(self, spec: ModelConfig) -> dict[str, Any]:
        fmt = "gguf" if spec.engine == "llama-cpp" else ""
        return {
            "parent_model": "",
            "format": fmt,
            "family": "llmux",
            "families": ["llmux"],
            "parameter_size": "",
            "quantization_level": "",
        }

    @staticmethod
    def _digest(model_id: str, spec: ModelConfig) -> str:
        text = orjson.dumps([model_id, spec.model_dump(mode="json")], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(text).hexdigest()

    @staticmethod
    def _capabilities(spec: ModelConfig) -> list[str]:
        if spec.type == "embedding":
            return ["embedding"]
        # llama-cpp-python's server does not parse tool calls out of a model's output with
        # the GGUF's own chat template; other servers (a `cmd`, vLLM) may: tools pass through.
        if spec.engine == "llama-cpp":
            return ["completion"]
        return ["completion", "tools"]

    # ------------------------------------------------------------ routes

    async def version(self, request: Request) -> Response:
        return Response(orjson.dumps({"version": OLLAMA_VERSION}), media_type="application/json")

    async def tags(self, request: Request) -> Response:
        config = self.scheduler.config
        snapshot = self.scheduler.snapshot()
        models = []
        for m in snapshot.models:
            spec = config.models.get(m.id)
            if spec is None or spec.type not in LISTED_TYPES:
                continue
            name = _listed_name(m.id)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": self.started_at,
                    "size": int(m.vram_gb * 1e9),
                    "digest": self._digest(m.id, spec),
                    "details": self._details(spec),
                }
            )
        return Response(orjson.dumps({"models": models}), media_type="application/json")

    async def ps(self, request: Request) -> Response:
        config = self.scheduler.config
        models = []
        for m in self.scheduler.snapshot().models:
            spec = config.models.get(m.id)
            if spec is None or spec.type not in LISTED_TYPES:
                continue
            if m.state not in (ModelState.READY, ModelState.DRAINING):
                continue
            name = _listed_name(m.id)
            size = int(m.vram_gb * 1e9)
            item: dict[str, Any] = {
                "name": name,
                "model": name,
                "size": size,
                "digest": self._digest(m.id, spec),
                "details": self._details(spec),
                "size_vram": size if m.placement == "gpu" else 0,
            }
            if spec.ttl is not None and not m.pinned and m.last_used is not None:
                expires = datetime.fromtimestamp(m.last_used + spec.ttl, UTC)
                item["expires_at"] = expires.isoformat().replace("+00:00", "Z")
            models.append(item)
        return Response(orjson.dumps({"models": models}), media_type="application/json")

    async def show(self, request: Request) -> Response:
        data = await self._json(request)
        _, model_id, spec = self._model(data, "/api/show")
        info: dict[str, Any] = {
            "general.architecture": "llmux",
            "llmux.id": model_id,
            "llmux.type": spec.type,
            "llmux.engine": spec.engine or "cmd",
        }
        body = {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": self._details(spec),
            "model_info": info,
            "capabilities": self._capabilities(spec),
            "modified_at": self.started_at,
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def chat(self, request: Request) -> Response:
        path = "/api/chat"
        data = await self._json(request)
        name, model_id, spec = self._model(data, path)
        stream = self._stream(data)
        messages = _openai_messages(data.get("messages"))
        answer = _Answer("chat", name, model_id)
        if not messages:
            return self._call(path, model_id, None, {}, stream, answer)
        payload: dict[str, Any] = {
            "model": self._upstream_name(name, spec),
            "messages": messages,
            "stream": stream,
        }
        _options(data.get("options"), payload)
        _format(data.get("format"), spec, payload)
        _tools(data.get("tools"), payload)
        return self._call(path, model_id, "/v1/chat/completions", payload, stream, answer)

    async def generate(self, request: Request) -> Response:
        path = "/api/generate"
        data = await self._json(request)
        name, model_id, spec = self._model(data, path)
        stream = self._stream(data)
        prompt = data.get("prompt") or ""
        suffix = data.get("suffix") or ""
        system = data.get("system") or ""
        for key, value in (("prompt", prompt), ("suffix", suffix), ("system", system)):
            if not isinstance(value, str):
                raise InvalidRequest(f"'{key}' must be a string", param=key)
        raw = data.get("raw") is True
        images = data.get("images")
        if not prompt and not images:
            answer = _Answer("generate", name, model_id)
            return self._call(path, model_id, None, {}, stream, answer)
        payload: dict[str, Any] = {"model": self._upstream_name(name, spec), "stream": stream}
        if raw or suffix:
            # No chat template (raw), or fill-in-the-middle: a plain completion.
            if images:
                raise InvalidRequest(
                    "'images' need the chat template: not with 'raw' or 'suffix'", param="images"
                )
            payload["prompt"] = prompt if raw or not system else system + "\n\n" + prompt
            if suffix:
                payload["suffix"] = suffix
            upstream, kind = "/v1/completions", "text"
        else:
            messages: list[dict[str, Any]] = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": _content(prompt, images, "generate")})
            payload["messages"] = messages
            upstream, kind = "/v1/chat/completions", "generate"
        _options(data.get("options"), payload)
        _format(data.get("format"), spec, payload)
        answer = _Answer(kind, name, model_id)
        return self._call(path, model_id, upstream, payload, stream, answer)

    async def embed(self, request: Request) -> Response:
        path = "/api/embed"
        data = await self._json(request)
        name, model_id, spec = self._model(data, path)
        inputs = data.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise InvalidRequest("'input' must be a string or a list of strings", param="input")
        answer = _Answer("embed", name, model_id)
        if not inputs:
            return self._call(path, model_id, None, {}, False, answer)
        payload: dict[str, Any] = {"model": self._upstream_name(name, spec), "input": inputs}
        dimensions = data.get("dimensions")
        if dimensions is not None:
            if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
                raise InvalidRequest("'dimensions' must be a positive integer", param="dimensions")
            payload["dimensions"] = dimensions
        return self._call(path, model_id, "/v1/embeddings", payload, False, answer)

    async def embeddings(self, request: Request) -> Response:
        path = "/api/embeddings"
        data = await self._json(request)
        name, model_id, spec = self._model(data, path)
        prompt = data.get("prompt") or ""
        if not isinstance(prompt, str):
            raise InvalidRequest("'prompt' must be a string", param="prompt")
        answer = _Answer("embeddings", name, model_id)
        if not prompt:
            return Response(orjson.dumps({"embedding": []}), media_type="application/json")
        payload = {"model": self._upstream_name(name, spec), "input": [prompt]}
        return self._call(path, model_id, "/v1/embeddings", payload, False, answer)
