"""A tiny OpenAI-shaped server that tests run as a real child process.

    python tests/upstream.py --port N [--name NAME] [--ready-delay S] [--never-ready]
        [--ignore-sigterm] [--exit-at-start CODE] [--spawn-grandchild]

Replies are predictable: chat and completions answer ``"{name} got {model}"``. The last chat
message (or the prompt) can ask for special behaviour:

- ``"crash"``: non-stream: the process exits (status 1) before answering; stream: two chunks
  are sent, then the process exits.
- ``"hold"``: the request is counted as held (a stream first sends one chunk) and waits until
  ``POST /_release`` or until the client disconnects (counted as ``cancelled``); once released
  it finishes normally.
- ``"call tool"`` (chat, with ``tools``): the answer is OpenAI ``tool_calls``: two calls of
  the first tool, arguments ``{"city": "Tokyo", "n": 1}`` and ``{"city": "Paris", "n": 2}``
  (streamed: the id and name first, then the arguments' JSON text in pieces), finish reason
  ``tool_calls``. A chat whose last message is a ``tool`` result answers
  ``"{name} got tool {tool_call_id}: {content}"``.

Test hooks: ``GET /_stats`` (counters, pid, name, grandchild_pid, last_headers),
``GET /_wait?held=N&cancelled=N`` (long-poll until the counters reach at least these; 408 after
30 s), ``POST /_release``.

At start it prints ``upstream NAME pid PID port PORT`` to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

WAIT_TIMEOUT = 30.0
SAMPLE_RATE = 16_000
SAMPLES_PER_CHAR = 800  # 50 ms of audio per input character
AUDIO_CHUNK = 4096
CRASH_FLUSH_DELAY = 0.05
"""Lets the kernel push the last chunks to the client before a crash (there is no flush in ASGI)."""


@dataclass
class State:
    name: str
    ready_at: float
    """``time.monotonic()`` after which /health answers 200; ``inf`` = never."""
    requests: int = 0
    held: int = 0
    cancelled: int = 0
    grandchild_pid: int | None = None
    last_headers: dict[str, str] = field(default_factory=dict)
    """The headers of the last chat or completion request, as this server got them."""
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def bump(self, counter: str) -> None:
        async with self.changed:
            setattr(self, counter, getattr(self, counter) + 1)
            self.changed.notify_all()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "held": self.held,
            "cancelled": self.cancelled,
            "pid": os.getpid(),
            "name": self.name,
            "last_headers": self.last_headers,
        }
        if self.grandchild_pid is not None:
            out["grandchild_pid"] = self.grandchild_pid
        return out


# ---------------------------------------------------------------- streaming


class ChunkStream(Response):
    """A streamed body whose producer also gets ``receive`` (to notice a client disconnect).

    Starlette's own StreamingResponse may listen for the disconnect itself; two readers of
    ``receive`` would race, so this class gives the producer sole ownership of it.
    """

    def __init__(
        self,
        produce: Callable[[Receive], AsyncIterator[bytes]],
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # No Response.__init__: it would announce a Content-Length for an empty body.
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self._produce(receive):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were sending
            return


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client disconnects. Call only after the request body has been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def hold(state: State, receive: Receive) -> bool:
    """Count a held request and wait for ``/_release`` (True) or a client disconnect (False)."""
    release = state.release
    await state.bump("held")
    released = asyncio.ensure_future(release.wait())
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({released, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        released.cancel()
        gone.cancel()
    if released.done() and not released.cancelled():
        return True
    await state.bump("cancelled")
    return False


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def crash_soon() -> None:
    await asyncio.sleep(CRASH_FLUSH_DELAY)
    os._exit(1)


# ---------------------------------------------------------------- OpenAI routes


def last_text(body: dict[str, Any], kind: str) -> str:
    if kind == "chat":
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content", "")
        if isinstance(content, list):  # content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[-1] if prompt else ""
    return str(prompt)


def tool_calls(body: dict[str, Any], model: str, rid: str, created: int) -> Response:
    """The ``"call tool"`` answer: two calls of the first tool (see the module docstring)."""
    name = body["tools"][0]["function"]["name"]
    calls = [
        (f"call_{rid}_{i}", json.dumps({"city": city, "n": i + 1}))
        for i, city in enumerate(["Tokyo", "Paris"])
    ]
    head = {"id": rid, "created": created, "model": model}
    if not body.get("stream"):
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                for cid, args in calls
            ],
        }
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice]})

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    async def produce(receive: Receive) -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": None})
        for i, (cid, args) in enumerate(calls):
            start = {"id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
            yield chunk({"tool_calls": [{"index": i, **start}]})
            for piece in (args[:5], args[5:12], args[12:]):
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield chunk({}, "tool_calls")
        yield b"data: [DONE]\n\n"

    return ChunkStream(produce, "text/event-stream", {"Cache-Control": "no-cache"})


def make_app(state: State) -> Starlette:
    async def health(request: Request) -> Response:
        if time.monotonic() >= state.ready_at:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading"}, status_code=503)

    async def generate(request: Request, kind: str) -> Response:
        state.last_headers = dict(request.headers)
        await state.bump("requests")
        body = await request.json()
        model = str(body.get("model", ""))
        reply = f"{state.name} got {model}"
        special = last_text(body, kind)
        created = int(time.time())
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:12]
        if kind == "chat" and body.get("tools") and special == "call tool":
            return tool_calls(body, model, rid, created)
        last = (body.get("messages") or [{}])[-1] if kind == "chat" else {}
        if isinstance(last, dict) and last.get("role") == "tool":
            reply = f"{state.name} got tool {last.get('tool_call_id')}: {special}"

        if not body.get("stream"):
            if special == "crash":
                os._exit(1)
            if special == "hold" and not await hold(state, request.receive):
                return Response(status_code=499)
            usage = {"prompt_tokens": 1, "completion_tokens": len(reply.split()), "total_tokens": 0}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if kind == "chat":
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}
                obj = "text_completion"
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        words = reply.split(" ")

        def chunk(i: int) -> bytes:
            piece = words[i] if i == 0 else " " + words[i]
            finish = "stop" if i == len(words) - 1 else None
            if kind == "chat":
                delta: dict[str, Any] = {"content": piece}
                if i == 0:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return sse(
                {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            )

        async def produce(receive: Receive) -> AsyncIterator[bytes]:
            start = 0
            if special == "crash":
                yield chunk(0)
                yield chunk(1)
                await crash_soon()
            if special == "hold":
                yield chunk(0)
                start = 1
                if not await hold(state, receive):
                    return
            for i in range(start, len(words)):
                yield chunk(i)
            yield b"data: [DONE]\n\n"

        return ChunkStream(produce, "text/event-stream", {"Cache-Control": "no-cache"})

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "text")

    async def embeddings(request: Request) -> Response:
        await state.bump("requests")
        body = await request.json()
        inputs = body.get("input", "")
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        data = []
        for i, item in enumerate(inputs):
            digest = hashlib.sha256(repr(item).encode()).digest()
            vector = [(b - 127.5) / 127.5 for b in digest[:8]]
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack("<8f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(str(item).split()) for item in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": str(body.get("model", "")),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def speech(request: Request) -> Response:
        await state.bump("requests")
        body = await request.json()
        samples = max(1, len(str(body.get("input", "")))) * SAMPLES_PER_CHAR
        pcm_bytes = samples * 2
        raw = body.get("response_format") == "pcm"

        async def produce(receive: Receive) -> AsyncIterator[bytes]:
            if not raw:
                yield wav_header(pcm_bytes)
            left = pcm_bytes
            while left > 0:
                size = min(AUDIO_CHUNK, left)
                left -= size
                yield bytes(size)
                await asyncio.sleep(0)

        media = "audio/pcm" if raw else "audio/wav"
        return ChunkStream(produce, media)

    async def transcribe(request: Request) -> Response:
        await state.bump("requests")
        async with request.form() as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return JSONResponse(
                    {"error": {"message": "file is required", "type": "invalid_request_error"}},
                    status_code=400,
                )
            size = len(await upload.read())
            fmt = str(form.get("response_format") or "json")
        text = f"{state.name} heard {size} bytes"
        if fmt == "text":
            return PlainTextResponse(text)
        if fmt == "verbose_json":
            return JSONResponse(
                {"task": "transcribe", "language": "english", "duration": 0.0, "text": text}
            )
        return JSONResponse({"text": text})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    async def wait(request: Request) -> Response:
        held = int(request.query_params.get("held", 0))
        cancelled = int(request.query_params.get("cancelled", 0))
        requests = int(request.query_params.get("requests", 0))

        def reached() -> bool:
            return (
                state.held >= held and state.cancelled >= cancelled and state.requests >= requests
            )

        try:
            async with state.changed:
                await asyncio.wait_for(state.changed.wait_for(reached), WAIT_TIMEOUT)
        except TimeoutError:
            return JSONResponse(state.stats(), status_code=408)
        return JSONResponse(state.stats())

    async def release(request: Request) -> Response:
        event, state.release = state.release, asyncio.Event()
        event.set()
        return JSONResponse(state.stats())

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/audio/transcriptions", transcribe, methods=["POST"]),
        Route("/v1/audio/translations", transcribe, methods=["POST"]),
        Route("/_stats", stats, methods=["GET"]),
        Route("/_wait", wait, methods=["GET"]),
        Route("/_release", release, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def wav_header(data_bytes: int) -> bytes:
    """RIFF header for 16-bit mono PCM at SAMPLE_RATE."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        1,  # mono
        SAMPLE_RATE,
        SAMPLE_RATE * 2,
        2,
        16,
        b"data",
        data_bytes,
    )


# ---------------------------------------------------------------- main


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ignore_sigterm: bool) -> None:
        super().__init__(config)
        self._ignore_sigterm = ignore_sigterm

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._ignore_sigterm and sig == signal.SIGTERM:
            return
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--ready-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--exit-at-start", type=int, metavar="CODE")
    parser.add_argument("--spawn-grandchild", action="store_true")
    parser.add_argument(
        "--announce", metavar="DIR", help="write DIR/NAME.port so a test can reach /_wait"
    )
    args = parser.parse_args(argv)

    if args.exit_at_start is not None:
        print("boom: failing on purpose", file=sys.stderr, flush=True)
        sys.exit(args.exit_at_start)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # until uvicorn installs its handler

    ready_at = float("inf") if args.never_ready else time.monotonic() + args.ready_delay
    state = State(name=args.name, ready_at=ready_at)
    if args.spawn_grandchild:
        # Same process group, inherits stdout: exactly what a careless engine would leave behind.
        state.grandchild_pid = subprocess.Popen(["sleep", "1000"]).pid

    print(f"upstream {args.name} pid {os.getpid()} port {args.port}", flush=True)
    if args.announce:
        target = os.path.join(args.announce, f"{args.name}.port")
        with open(target + ".tmp", "w") as f:
            f.write(str(args.port))
        os.replace(target + ".tmp", target)
    config = uvicorn.Config(
        make_app(state),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    Server(config, ignore_sigterm=args.ignore_sigterm).run()


if __name__ == "__main__":
    main()
