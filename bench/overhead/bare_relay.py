"""The practical floor for a Python relay: raw ASGI + one shared aiohttp session, nothing else.

This is the "raw ASGI + one shared aiohttp ClientSession, bytes passed through" row of DESIGN
§6, kept as a reference path (``run.py --bare``): no auth, no scheduler, no leases, no metrics,
no disconnect watcher. What llmux costs above it is llmux's own work.

Run: ``python bench/overhead/bare_relay.py --port 9100 --upstream http://127.0.0.1:9001``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_DROP = frozenset({b"host", b"connection", b"content-length", b"transfer-encoding"})
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "server", "date"})


class BareRelay:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0),
                        auto_decompress=False,
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                        skip_auto_headers=("User-Agent", "Accept-Encoding"),
                    )
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/v1/models":
            body = b'{"object":"list","data":[]}'
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        chunks = bytearray()
        while True:
            message = await receive()
            chunks += message.get("body", b"")
            if not message.get("more_body", False):
                break
        body = bytes(chunks)
        if body:
            orjson.loads(body).get("model")  # what any router must read
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in _DROP
        ]
        assert self.session is not None
        url = self.upstream + scope["path"]
        async with self.session.request(scope["method"], url, data=body, headers=headers) as r:
            out = [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in r.headers.items()
                if k.lower() not in _DROP_RESPONSE
            ]
            await send({"type": "http.response.start", "status": r.status, "headers": out})
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare raw-ASGI + aiohttp relay (reference)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9001")
    args = parser.parse_args(argv)

    import uvicorn

    uvicorn.run(
        BareRelay(args.upstream.rstrip("/")),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        log_config=None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
