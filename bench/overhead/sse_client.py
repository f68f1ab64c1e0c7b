"""Closed-loop SSE load generator (asyncio on uvloop) for the overhead bench.

Two HTTP clients: ``raw`` (default), a keep-alive asyncio.Protocol read with httptools, which
costs far less CPU per stream than ``aiohttp`` (ClientSession), so that on a 2-core machine the
core shared by the client and the upstream is not what limits the proxied paths.

``--concurrency`` workers each POST a streaming chat completion, read it to the end, and start
the next one, for ``--duration`` seconds after ``--warmup`` seconds that are not counted.
Throughput counts the streams that ended inside the window; the time to the first body chunk
and to the end of the stream are taken from the streams that also started inside it. Each
stream must end with ``data: [DONE]``.

Prints one JSON object on stdout::

    {"streams": N, "seconds": S, "streams_per_s": R, "errors": E, "error_kinds": {...},
     "ttfc_ms": {"p50": .., "p90": .., "p99": ..}, "ttlc_ms": {...}, "events_p50": K,
     "samples": {"ttfc_ms": [...], "ttlc_ms": [...]}}  # samples: at most --keep of each

Run: ``python bench/overhead/sse_client.py --url http://127.0.0.1:9001/v1/chat/completions``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import httptools
import orjson


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds

Fetch = Callable[[], Awaitable[tuple[int, float | None, bytes, int]]]
"""One streaming request: (status, time of the first body bytes, the whole body, the number of
pieces it arrived in: socket reads for ``raw``, ``iter_any`` chunks for ``aiohttp``)."""


@contextlib.asynccontextmanager
async def _aiohttp_fetcher(url: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[Fetch]:
    connector = aiohttp.TCPConnector(force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def one() -> tuple[int, float | None, bytes, int]:
            first: float | None = None
            data = bytearray()
            chunks = 0
            async with session.post(url, data=body, headers=headers) as resp:
                async for chunk in resp.content.iter_any():
                    if first is None:
                        first = clock()
                    data += chunk
                    chunks += 1
                return resp.status, first, bytes(data), chunks

        yield one


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection read with httptools (llhttp): far cheaper per stream
    than aiohttp, so that the client's core is not what limits the proxied paths."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._done: asyncio.Future[None] | None = None
        self.first: float | None = None
        self.data = bytearray()
        self.chunks = 0
        self.keep_alive = True

    def start(self, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._done = asyncio.get_running_loop().create_future()
        self.first = None
        self.data = bytearray()
        self.chunks = 0
        self.transport.write(request)
        return self._done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's only quacks like one

    def data_received(self, data: bytes) -> None:
        self.chunks += 1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad answer: {exc}"))

    def on_body(self, body: bytes) -> None:
        if self.first is None:
            self.first = clock()
        self.data += body

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def status(self) -> int:
        return int(self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


@contextlib.asynccontextmanager
async def _raw_fetcher(url: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[Fetch]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = f"POST {target} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = head.encode("latin-1") + body
    loop = asyncio.get_running_loop()
    conns: list[_RawConnection] = []
    free: list[_RawConnection] = []

    async def one() -> tuple[int, float | None, bytes, int]:
        conn = free.pop() if free else None
        if conn is None or conn.closed:
            _, conn = await loop.create_connection(_RawConnection, host, port)
            conns.append(conn)
        async with asyncio.timeout(60):
            await conn.start(request)
        if conn.keep_alive and not conn.closed:
            free.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return conn.status(), conn.first, bytes(conn.data), conn.chunks

    try:
        yield one
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else float("nan"),
    }


async def run(
    url: str,
    model: str,
    concurrency: int,
    duration: float,
    warmup: float,
    keep: int,
    auth: str | None = None,
    raw: bool = True,
) -> dict[str, Any]:
    body = orjson.dumps(
        {
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 64,
        }
    )
    headers = {"content-type": "application/json"}
    if auth:
        headers["authorization"] = auth
    ttfc: list[float] = []
    ttlc: list[float] = []
    events: list[int] = []
    pieces: list[int] = []
    errors: collections.Counter[str] = collections.Counter()
    done = 0
    start = clock()
    measure_from = start + warmup
    stop_at = measure_from + duration
    fetch = _raw_fetcher(url, body, headers) if raw else _aiohttp_fetcher(url, body, headers)
    async with fetch as one:

        async def worker() -> None:
            nonlocal done
            while True:
                t0 = clock()
                if t0 >= stop_at:
                    return
                try:
                    status, first, data, chunks = await one()
                except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                end = clock()
                if status != 200:
                    errors[f"status {status}"] += 1
                    continue
                if end < measure_from or end > stop_at:
                    continue  # ended in the warm-up, or after the window
                if not data.rstrip().endswith(b"data: [DONE]"):
                    errors["no [DONE]"] += 1
                    continue
                done += 1  # throughput: streams that ended inside the window
                if t0 >= measure_from:  # latencies: streams wholly inside the window
                    assert first is not None
                    ttfc.append((first - t0) * 1000.0)
                    ttlc.append((end - t0) * 1000.0)
                    events.append(data.count(b"data:"))
                    pieces.append(chunks)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "streams": done,
        "seconds": duration,
        "streams_per_s": done / duration,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "ttfc_ms": summary(ttfc),
        "ttlc_ms": summary(ttlc),
        "events_p50": percentile([float(e) for e in events], 50),
        "chunks_p50": percentile([float(c) for c in pieces], 50),
        "samples": {"ttfc_ms": ttfc[:keep], "ttlc_ms": ttlc[:keep]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="closed-loop SSE load generator")
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--keep", type=int, default=0, help="raw samples to print, per kind")
    parser.add_argument("--auth", help="Authorization header value (default: $BENCH_AUTH)")
    parser.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="raw: asyncio protocol + httptools (default, cheap); aiohttp: ClientSession",
    )
    args = parser.parse_args(argv)

    import uvloop

    result = uvloop.run(
        run(
            args.url,
            args.model,
            args.concurrency,
            args.duration,
            args.warmup,
            args.keep,
            args.auth or os.environ.get("BENCH_AUTH"),
            args.client == "raw",
        )
    )
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
