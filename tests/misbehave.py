"""A child that misbehaves the way real servers do, over raw HTTP/1.1 (no framework to tidy it).

    python tests/misbehave.py --port N [--name NAME] [--announce DIR]

Every request is answered by the mode named in its ``X-Misbehave`` header (the gateway passes the
client's headers on); without one, a well-formed answer. One mode per misbehaviour of issue 10:

- ``ok`` (default): a JSON chat completion with a Content-Length; with ``"stream": true`` a
  chunked SSE stream ending with ``data: [DONE]``.
- ``forge``: ``Content-Length: 2`` and ``{}``, then 50 ms later a second, complete response
  (``{"forged": true}``) on the same kept-alive connection.
- ``silent``: reads the request and never answers (until the client hangs up).
- ``silent-stream``: SSE headers and one event, then silence.
- ``close-sse``: an SSE stream framed by closing the connection (``Connection: close``, no length,
  not chunked); two events, then the process dies (SIGKILL of itself).
- ``close-sse-ok``: the same framing, the whole stream with ``[DONE]``, then a clean close.
- ``close-json``: a JSON body framed by closing the connection; half of it, then the process dies.
- ``close-json-ok``: the same framing, the whole body, then a clean close.
- ``chunked-sse-die``: a chunked SSE stream; two events, then the process dies.
- ``length-sse-die``: an SSE stream with a Content-Length; two events (less than announced),
  then the process dies.
- ``close-sse-done-die``: framed by the close; the whole stream with ``[DONE]``, then the
  process dies before it closes the connection (the answer was whole).
- ``short``: ``Content-Length: 1000``, 10 bytes, then the connection is closed.
- ``status-999``: a status line with status 999.
- ``garbage``: bytes that are not HTTP, then a close.

``GET /health`` answers 200. ``GET /_stats``: ``{"pid", "requests", "held", "hung_up", "forged"}``
(``held``: silent requests waiting now; ``hung_up``: silent requests whose client went away;
``forged``: second responses written).
At start it prints ``misbehave NAME pid PID port PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORGE_DELAY_S = 0.05
CRASH_FLUSH_S = 0.05
"""Lets the kernel push the last bytes to the peer before the process kills itself."""


@dataclass
class Stats:
    requests: int = 0
    held: int = 0
    hung_up: int = 0
    forged: int = 0


STATS = Stats()


def response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    *,
    reason: str = "OK",
    extra: tuple[str, ...] = (),
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def completion(text: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-misbehave",
            "object": "chat.completion",
            "created": 0,
            "model": "misbehave",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


def event(text: str) -> bytes:
    chunk = {
        "id": "chatcmpl-misbehave",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "misbehave",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
SSE_CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
JSON_CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
SSE_CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def die(writer: asyncio.StreamWriter) -> None:
    await writer.drain()
    await asyncio.sleep(CRASH_FLUSH_S)
    os.kill(os.getpid(), signal.SIGKILL)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    return method, path, headers, body


async def answer(
    mode: str,
    body: dict[str, Any],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Answer one request; return whether the connection stays open for another."""
    stream = body.get("stream") is True
    if mode == "ok":
        if not stream:
            writer.write(response(200, completion("fine")))
            return True
        writer.write(SSE_CHUNKED_HEAD)
        for piece in (event("fi"), event("ne"), DONE):
            writer.write(chunk(piece))
        writer.write(b"0\r\n\r\n")
        return True
    if mode == "forge":
        writer.write(response(200, b"{}"))
        await writer.drain()
        await asyncio.sleep(FORGE_DELAY_S)
        writer.write(response(200, b'{"forged": true}'))
        await writer.drain()
        STATS.forged += 1
        return True
    if mode in ("silent", "silent-stream"):
        if mode == "silent-stream":
            writer.write(SSE_CHUNKED_HEAD + chunk(event("hello")))
            await writer.drain()
        STATS.held += 1
        try:
            await reader.read()  # returns at EOF: the client hung up
        finally:
            STATS.held -= 1
        STATS.hung_up += 1
        return False
    if mode in ("close-sse", "close-sse-ok"):
        writer.write(SSE_CLOSE_HEAD + event("one") + event("two"))
        if mode == "close-sse":
            await die(writer)
        writer.write(event("three") + DONE)
        return False
    if mode in ("close-json", "close-json-ok"):
        whole = completion("a complete answer, framed by the close of the connection")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        )
        if mode == "close-json":
            writer.write(whole[: len(whole) // 2])
            await die(writer)
        writer.write(whole)
        return False
    if mode == "length-sse-die":
        events = event("one") + event("two")
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        writer.write(f"{head}Content-Length: {len(events) + 500}\r\n\r\n".encode() + events)
        await die(writer)
    if mode == "close-sse-done-die":
        writer.write(SSE_CLOSE_HEAD + event("one") + event("two") + DONE)
        await die(writer)
    if mode == "chunked-sse-die":
        writer.write(SSE_CHUNKED_HEAD + chunk(event("one")) + chunk(event("two")))
        await die(writer)
    if mode == "short":
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"a": 1234'
        )
        return False
    if mode == "status-999":
        writer.write(response(999, b"{}", reason="Weird"))
        return True
    if mode == "garbage":
        writer.write(b"\x00\x01 this is not HTTP at all\r\n\r\n")
        return False
    writer.write(response(400, json.dumps({"error": f"unknown mode {mode!r}"}).encode()))
    return True


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                method, path, headers, raw = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                return
            if method == "GET" and path == "/health":
                writer.write(response(200, b'{"status": "ok"}'))
            elif method == "GET" and path == "/_stats":
                stats = {"pid": os.getpid(), **STATS.__dict__}
                writer.write(response(200, json.dumps(stats).encode()))
            else:
                STATS.requests += 1
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                mode = headers.get("x-misbehave", "ok")
                if not await answer(mode, body if isinstance(body, dict) else {}, reader, writer):
                    await writer.drain()
                    return
            await writer.drain()
    except ConnectionError:
        return
    finally:
        writer.close()


async def main_async(host: str, port: int, name: str, announce: str | None) -> None:
    server = await asyncio.start_server(serve_connection, host, port)
    print(f"misbehave {name} pid {os.getpid()} port {port}", flush=True)
    if announce:
        target = os.path.join(announce, f"{name}.port")
        await asyncio.to_thread(Path(target + ".tmp").write_text, str(port))
        os.replace(target + ".tmp", target)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="misbehave")
    parser.add_argument("--announce", metavar="DIR")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main_async(args.host, args.port, args.name, args.announce))


if __name__ == "__main__":
    main()
