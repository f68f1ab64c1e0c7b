"""A fast, minimal OpenAI-shaped upstream for the gateway-overhead bench.

Raw ASGI on uvicorn (uvloop + httptools), one process, no framework:

- ``GET /health`` -> ``{"status":"ok"}``
- ``POST /v1/chat/completions`` -> a fixed small ``chat.completion``; with ``"stream": true``
  an SSE stream of ``--events`` ``chat.completion.chunk`` events (one ASGI send each), then
  ``data: [DONE]``.
- ``--delay-ms`` sleeps that long per request before answering (the 20 ms-upstream case).
- ``--announce FILE`` writes ``{"port": P, "pid": N}`` once the socket is listening, so a
  parent that did not choose the port (llmux fills ``${PORT}``) can find this process.

Run: ``python bench/overhead/upstream.py --port 9001 [--events 34] [--delay-ms 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
HEALTH_BODY = b'{"status":"ok"}'
NOT_FOUND_BODY = b'{"error":{"message":"not found","type":"invalid_request_error"}}'
CREATED = 1_700_000_000


def completion_body(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help?"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
        }
    )


def stream_events(model: str, events: int) -> list[bytes]:
    """``events`` SSE events (role first, then one word each, the last with finish_reason),
    then ``[DONE]``: the answer is ``events + 1`` body messages."""

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        data = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return b"data: " + orjson.dumps(data) + b"\n\n"

    if events >= 2:
        out = [chunk({"role": "assistant", "content": ""}, None)]
        out += [chunk({"content": f" w{i}"}, None) for i in range(1, events - 1)]
        out.append(chunk({}, "stop"))
    else:
        out = [chunk({}, "stop")] if events == 1 else []
    out.append(b"data: [DONE]\n\n")
    return out


class Upstream:
    def __init__(self, events: int, delay_ms: float) -> None:
        self.events = events
        self.delay = delay_ms / 1000.0
        self._bodies: dict[str, tuple[bytes, list[bytes]]] = {}

    def _answers(self, model: str) -> tuple[bytes, list[bytes]]:
        cached = self._bodies.get(model)
        if cached is None:
            if len(self._bodies) > 64:  # arbitrary model names must not grow this forever
                self._bodies.clear()
            cached = self._bodies[model] = (
                completion_body(model),
                stream_events(model, self.events),
            )
        return cached

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            await _send_json(send, 200, HEALTH_BODY)
            return
        if path != "/v1/chat/completions" or scope["method"] != "POST":
            await _send_json(send, 404, NOT_FOUND_BODY)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _send_json(send, 400, b'{"error":{"message":"bad json"}}')
            return
        model = str(request.get("model", "bench")) if isinstance(request, dict) else "bench"
        stream = isinstance(request, dict) and request.get("stream") is True
        if self.delay:
            await asyncio.sleep(self.delay)
        whole, events = self._answers(model)
        if not stream:
            await _send_json(send, 200, whole)
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=34, help="SSE events per stream")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="sleep per request")
    parser.add_argument("--announce", help="write {port, pid} JSON here once listening")
    args = parser.parse_args(argv)

    import uvicorn

    app = Upstream(args.events, args.delay_ms)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        log_config=None,
        backlog=4096,
    )
    announce = Path(args.announce) if args.announce else None

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if announce is not None and not self.should_exit:
                tmp = announce.with_suffix(announce.suffix + ".tmp")
                tmp.write_bytes(orjson.dumps({"port": args.port, "pid": os.getpid()}))
                tmp.replace(announce)

    server = AnnouncingServer(config)

    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(server.serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
