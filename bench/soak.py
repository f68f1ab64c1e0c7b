"""Soak: many clients over every route for minutes, with child SIGKILLs and clients that hang up.

    python bench/soak.py [--clients 500] [--duration 600] [--kill-every 5] [--out bench/results]

Starts a real ``llmux serve`` on a generated config of stand-in children under a tight budget
(``gpu: {vram_gb: 4, reserve_gb: 0}``: two LLMs, a TTS, an embedding model with a short ttl and
a pinned ASR whose child leaves a grandchild, 5.5 GB of reservations in all), so models are
swapped all the time. The children are ``tests/upstream.py`` and, for ``llm-b``, this script's
own ``child`` mode: a small raw-socket OpenAI stand-in that answers slowly (a piece every
``--chunk-delay``) and frames each answer as the request's ``user`` field says
(``framing:length``, ``framing:chunked`` or ``framing:close``: no length, the connection's end is
the body's end), so a SIGKILL cuts answers in every framing.

Load: ``--clients`` asyncio clients (aiohttp, one keep-alive connection each), each looping over
a random mix of every route: chat and completions (streamed and not, both LLMs, an alias),
embeddings, speech (wav, pcm), transcriptions and translations (multipart), ``GET /v1/models``,
``/status``, ``/metrics``, ``/health``, and bad requests that must get their documented 4xx
(bad JSON, no model, unknown model, wrong or no key, wrong method, unknown path, speech for an
LLM, speech input over 4,096 characters). ``--hangup`` of the model requests hang up: half
while waiting (after a random delay), half mid-answer (after the first body bytes).
Chaos: every ``--kill-every`` s a random child (its pid from ``GET /status``) gets SIGKILL;
every ``--crash-every`` s a request asks ``llm-a`` to crash mid-answer (upstream.py's "crash").

Checks (each one pass/fail in the results; the exit status is 1 if any fails):

- answers: every answer is a 200 with a well-formed, correct body (complete JSON with the
  expected content, an SSE stream ending with ``[DONE]`` or with an ``error`` event and the
  envelope, audio of the right length) or an error status with OpenAI's envelope whose status
  and code belong to that request (good requests: 429, 502, 503 ``model_load_failed``, 504; bad
  ones: exactly their 4xx). A 502, a ``model_load_failed`` or an SSE ``error`` event must be
  explained by a death of that model's child (a SIGKILL or crash between ``--explain-slack`` s
  before the request and its end). A cut connection counts apart, and only where DESIGN
  section 2 allows it: a non-SSE 200 body cut after its headers by such a death.
- no hang: no request runs past ``--request-timeout`` (well above the config's limits);
  nothing is refused before its headers.
- coverage: every good route got at least one 200.
- budget: ``reserved_gb <= budget_gb`` (and the sum of the resident models' ``vram_gb``) at
  every ``/status`` sample, polled every 0.5 s.
- quiet: once the clients stop, every model has nothing in flight and nothing queued.
- flat: gateway RSS (VmRSS) and open fds, sampled every ``--sample-every`` s: the least-squares
  slope over the second half of the run (the first half is warm-up) is below
  ``--rss-slope-max`` MiB/min and ``--fd-slope-max`` fds/min.
- fds released: with every model unloaded (admin) and every client gone, the gateway holds at
  most IDLE_FD_MARGIN fds more than before the load.
- pinned loaded: the pinned ASR is ready before the load starts (it loads at start).
- nothing left: no process that llmux started (found by a token in its environment, which
  every descendant inherits) outlives its parent chain while llmux runs (orphans), and none is
  left ``--leftover-wait`` s after llmux exits on SIGTERM (with 0, or -15: uvicorn re-raises
  the SIGTERM after a clean shutdown).

Writes ``soak-<date>.json`` (command, machine, config, every count, the failures with examples,
the samples), ``soak-<date>.md`` (the summary) and ``soak-<date>.png`` (RSS, fds and the
reservation over time) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib
import json
import math
import os
import platform
import random
import re
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
UPSTREAM = REPO / "tests" / "upstream.py"
TOKEN_VAR = "LLMUX_SOAK_TOKEN"
"""Set in llmux's environment only: every process it starts inherits it (the leftover check)."""

# upstream.py's speech: 50 ms of 16-bit mono audio at 16 kHz per input character.
SPEECH_BYTES_PER_CHAR = 800 * 2
WAV_HEADER = 44

MODELS: dict[str, dict[str, Any]] = {
    # id: type, vram_gb, extra config keys, child flags
    "llm-a": {"type": "llm", "vram_gb": 1.5, "aliases": ["gpt-soak"]},
    "llm-b": {"type": "llm", "vram_gb": 1.5},
    "tts": {"type": "tts", "vram_gb": 1.0},
    "embed": {"type": "embedding", "vram_gb": 0.5, "ttl": "5s"},
    "asr": {"type": "asr", "vram_gb": 1.0, "pinned": True},
}
BUDGET_GB = 4.0
QUEUE_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 2.0
SHUTDOWN_GRACE_S = 5.0

ALLOWED_ERRORS: dict[int, set[str]] = {
    429: {"queue_full"},
    502: {"upstream_error"},
    503: {"model_load_failed"},
    504: {"queue_timeout"},
}
"""Error (status, code) a good model request may get under load and chaos."""
NEEDS_DEATH = {"upstream_error", "model_load_failed"}
"""Codes that only a death of the model's child explains."""

FRAMINGS = ("length", "chunked", "close")
IDLE_FD_MARGIN = 4
"""With every model unloaded and every client gone, the gateway may hold this many fds more
than before the load (and no more): the sockets and pipes of the run must all be closed."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ============================================================================ the framing child


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    """One HTTP/1.1 request: (method, path, body), or None at the connection's end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts += await reader.readexactly(size)
            await reader.readexactly(2)
        body = bytes(parts)
    return method, path, body


class _Reply:
    """Writes one answer in a framing, piece by piece, ``delay`` s apart."""

    def __init__(self, writer: asyncio.StreamWriter, framing: str, delay: float) -> None:
        self.writer = writer
        self.framing = framing
        self.delay = delay

    async def send(self, status: int, ctype: str, pieces: list[bytes]) -> bool:
        """Send the answer; True if the connection may carry another request."""
        head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
        head += f"Content-Type: {ctype}\r\n"
        if self.framing == "length":
            head += f"Content-Length: {sum(len(p) for p in pieces)}\r\n"
        elif self.framing == "chunked":
            head += "Transfer-Encoding: chunked\r\n"
        else:
            head += "Connection: close\r\n"
        self.writer.write(head.encode() + b"\r\n")
        for i, piece in enumerate(pieces):
            if i and self.delay:
                await asyncio.sleep(self.delay)
            if self.framing == "chunked":
                piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            self.writer.write(piece)
            await self.writer.drain()
        if self.framing == "chunked":
            self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        return self.framing != "close"


def _child_answer(name: str, path: str, body: bytes) -> tuple[str, int, str, list[bytes]]:
    """(framing, status, content type, pieces) for one request to the framing child."""
    if path == "/health":
        return "length", 200, "application/json", [b'{"status": "ok"}']
    kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(path)
    if kind is None:
        err = {"error": {"message": "no such route", "type": "invalid_request_error"}}
        return "length", 404, "application/json", [json.dumps(err).encode()]
    req = json.loads(body)
    framing = str(req.get("user", "")).removeprefix("framing:")
    if framing not in FRAMINGS:
        framing = "length"
    model = str(req.get("model", ""))
    text = str(req["messages"][-1]["content"] if kind == "chat" else req.get("prompt", ""))
    reply = f"{name} got {model} re {text}"
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(6)
    created = int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    if not req.get("stream"):
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": reply, "finish_reason": "stop"}
        whole = json.dumps(
            {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        ).encode()
        third = len(whole) // 3
        return (
            framing,
            200,
            "application/json",
            [whole[:third], whole[third:-third], whole[-third:]],
        )
    words = reply.split(" ")
    pieces = []
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        finish = "stop" if i == len(words) - 1 else None
        if kind == "chat":
            delta: dict[str, Any] = {"content": piece}
            if i == 0:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            chunk_obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece, "finish_reason": finish}
            chunk_obj = "text_completion"
        event = {"id": rid, "object": chunk_obj, "created": created, "model": model}
        event["choices"] = [choice]
        pieces.append(b"data: " + json.dumps(event).encode() + b"\n\n")
    pieces.append(b"data: [DONE]\n\n")
    return framing, 200, "text/event-stream", pieces


async def child_serve(port: int, name: str, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await _read_request(reader)) is not None:
                _, path, body = request
                framing, status, ctype, pieces = _child_answer(name, path, body)
                if not await _Reply(writer, framing, delay).send(status, ctype, pieces):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"soak child {name} pid {os.getpid()} port {port}", flush=True)
    async with server:
        await server.serve_forever()


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soak.py child", description="the framing stand-in")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="child")
    parser.add_argument("--chunk-delay", type=float, default=0.03, metavar="S")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(child_serve(args.port, args.name, args.chunk_delay))
    return 0


# ============================================================================ the config


def soak_config(tmp: Path, api_key: str, chunk_delay: float) -> str:
    py = shlex.quote(sys.executable)
    lines = [
        "server:",
        f"  api_keys: [{api_key}]",
        "  max_queue: 4000",
        f"  queue_timeout: {QUEUE_TIMEOUT_S:g}s",
        f"  shutdown_grace: {SHUTDOWN_GRACE_S:g}s",
        f"  state_dir: {json.dumps(str(tmp / 'state'))}",
        f"gpu: {{vram_gb: {BUDGET_GB:g}, reserve_gb: 0}}",
        "models:",
    ]
    for model_id, m in MODELS.items():
        if model_id == "llm-b":
            cmd = (
                f"{py} {shlex.quote(str(Path(__file__).resolve()))} child --port ${{PORT}}"
                f" --name {model_id} --chunk-delay {chunk_delay:g}"
            )
        else:
            cmd = f"{py} {shlex.quote(str(UPSTREAM))} --port ${{PORT}} --name {model_id}"
            if model_id == "asr":
                cmd += " --spawn-grandchild"
        lines += [
            f"  {model_id}:",
            f"    type: {m['type']}",
            f"    vram_gb: {m['vram_gb']}",
            f"    cmd: {json.dumps(cmd)}",
            f"    ready_timeout: {READY_TIMEOUT_S:g}s",
            f"    stop_timeout: {STOP_TIMEOUT_S:g}s",
        ]
        if m.get("aliases"):
            lines.append(f"    aliases: {json.dumps(m['aliases'])}")
        if m.get("ttl"):
            lines.append(f"    ttl: {m['ttl']}")
        if m.get("pinned"):
            lines.append("    pinned: true")
    return "\n".join(lines) + "\n"


# ============================================================================ requests and checks


@dataclass
class Req:
    """One request a client sends, with what it takes to judge the answer."""

    route: str
    """The key it is counted under (one per route and variant)."""
    method: str
    path: str
    model: str | None = None
    """The configured model id it goes to (None: no model, or a bad request)."""
    body: bytes | None = None
    ctype: str | None = None
    key: str | None = "good"
    """"good": the api key; "wrong": a wrong one; None: no Authorization header."""
    kind: str = "get"
    """How to judge a 200: chat, text, embed, speech, transcribe, models, status, metrics,
    health, crash; "bad" for requests that must get ``expect_status``."""
    stream: bool = False
    expect: Any = None
    """What the 200 must hold (kind-specific)."""
    expect_status: tuple[int, ...] = ()
    expect_code: str | None = None
    hangup: str | None = None
    """None, "wait" (hang up after ``hangup_after`` s) or "mid" (after the first body bytes)."""
    hangup_after: float = 0.0


@dataclass
class Verdict:
    outcome: str
    """ok | error | cut | hangup | fail"""
    problem: str = ""
    """For fail: the category; for error: the code."""
    detail: str = ""
    needs_death: bool = False
    """Only a death of the model's child explains this answer (checked at the end)."""


def envelope_problem(body: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(problem, error object) of an error body that must be OpenAI's envelope."""
    try:
        data = json.loads(body)
    except ValueError:
        return "not JSON", None
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return "no 'error' object", None
    err: dict[str, Any] = data["error"]
    missing = [k for k in ("message", "type", "param", "code") if k not in err]
    if missing:
        return f"envelope lacks {missing}", err
    if not isinstance(err["message"], str) or not err["message"]:
        return "empty message", err
    if not isinstance(err["type"], str) or not err["type"]:
        return "empty type", err
    return None, err


@dataclass
class SseStream:
    events: list[tuple[str, str]]
    """(event name, data) in order; comments dropped."""
    tail: str
    """Bytes after the last complete event (must be empty)."""


def parse_sse(text: str) -> SseStream:
    events: list[tuple[str, str]] = []
    blocks = text.replace("\r\n", "\n").split("\n\n")
    tail = blocks.pop()  # after the last blank line: an unfinished event, if anything
    for block in blocks:
        name, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field_, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field_ == "event":
                name = value
            elif field_ == "data":
                data.append(value)
        if data:
            events.append((name, "\n".join(data)))
    return SseStream(events, tail)


def expected_embedding(item: Any) -> list[float]:
    """upstream.py's embedding of one input."""
    digest = hashlib.sha256(repr(item).encode()).digest()
    return [(b - 127.5) / 127.5 for b in digest[:8]]


def judge_sse(req: Req, body: bytes) -> Verdict:
    """A 200 SSE answer: complete ([DONE], whole text) or cut with an error event."""
    stream = parse_sse(body.decode("utf-8", "replace"))
    text = ""
    end: str | None = None
    error_code = ""
    for i, (name, data) in enumerate(stream.events):
        if end is not None:
            return Verdict("fail", "sse_after_end", f"event after {end}: {data[:200]!r}")
        if name == "error":
            problem, err = envelope_problem(data.encode())
            if problem is not None:
                return Verdict("fail", "sse_bad_error_event", f"{problem}: {data[:300]!r}")
            assert err is not None
            end = "error"
            code = str(err.get("code"))
            if code not in {c for codes in ALLOWED_ERRORS.values() for c in codes}:
                return Verdict("fail", "sse_error_code", f"event {i}: {data[:300]}")
            error_code = code
            continue
        if data == "[DONE]":
            end = "[DONE]"
            continue
        try:
            chunk = json.loads(data)
            choice = chunk["choices"][0]
            piece = choice["delta"].get("content") if req.kind != "text" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Verdict("fail", "sse_bad_chunk", f"event {i}: {data[:300]!r}")
        text += piece or ""
    expected = str(req.expect)
    if stream.tail.strip():
        return Verdict("fail", "sse_unfinished_event", f"tail {stream.tail[-200:]!r}")
    if end is None:
        return Verdict(
            "fail",
            "sse_no_end",
            f"a 200 stream ended cleanly with neither [DONE] nor an error event after "
            f"{len(stream.events)} events; text so far {text!r}",
        )
    if end == "[DONE]":
        if req.kind == "crash":
            return Verdict("fail", "crash_done", f"a crashed stream ended with [DONE]: {text!r}")
        if text != expected:
            return Verdict("fail", "wrong_content", f"got {text!r}, expected {expected!r}")
        return Verdict("ok")
    if not expected.startswith(text):
        return Verdict("fail", "wrong_content", f"cut text {text!r} is no prefix of {expected!r}")
    return Verdict("error", error_code, needs_death=error_code in NEEDS_DEATH)


def judge_ok(req: Req, ctype: str, body: bytes) -> Verdict:
    """A 200: is the body complete and right?"""
    kind = req.kind
    if req.stream and kind in ("chat", "text", "crash"):
        if not ctype.startswith("text/event-stream"):
            return Verdict("fail", "wrong_content_type", f"stream answered {ctype!r}")
        return judge_sse(req, body)
    if kind == "crash":
        return Verdict("fail", "crash_ok", f"a crashing request got a 200: {body[:200]!r}")
    if kind == "speech":
        fmt, chars = req.expect
        want = chars * SPEECH_BYTES_PER_CHAR + (WAV_HEADER if fmt == "wav" else 0)
        if len(body) != want:
            return Verdict(
                "fail", "wrong_audio_length", f"{fmt}: {len(body)} bytes, expected {want}"
            )
        if fmt == "wav" and body[:4] != b"RIFF":
            return Verdict("fail", "bad_audio", f"wav starts {body[:12]!r}")
        return Verdict("ok")
    if kind == "metrics":
        if b"llmux_" not in body:
            return Verdict("fail", "bad_body", f"metrics without llmux_: {body[:200]!r}")
        return Verdict("ok")
    if kind == "transcribe" and req.expect[0] == "text":
        got = body.decode("utf-8", "replace").strip()
        if got != req.expect[1]:
            return Verdict("fail", "wrong_content", f"got {got!r}, expected {req.expect[1]!r}")
        return Verdict("ok")
    try:
        data = json.loads(body)
    except ValueError:
        return Verdict("fail", "incomplete_json", f"{len(body)} bytes: {body[-200:]!r}")
    problem = _json_problem(req, data)
    if problem:
        return Verdict("fail", "wrong_content", problem)
    return Verdict("ok")


def _json_problem(req: Req, data: Any) -> str:
    kind = req.kind
    try:
        if kind == "chat":
            got = data["choices"][0]["message"]["content"]
            return "" if got == req.expect else f"got {got!r}, expected {req.expect!r}"
        if kind == "text":
            got = data["choices"][0]["text"]
            return "" if got == req.expect else f"got {got!r}, expected {req.expect!r}"
        if kind == "embed":
            vectors = [d["embedding"] for d in data["data"]]
            if len(vectors) != len(req.expect):
                return f"{len(vectors)} embeddings for {len(req.expect)} inputs"
            for got, item in zip(vectors, req.expect, strict=True):
                want = expected_embedding(item)
                if len(got) != len(want) or not all(
                    math.isclose(a, b, abs_tol=1e-9) for a, b in zip(got, want, strict=True)
                ):
                    return f"embedding of {item!r} is {got}, expected {want}"
            return ""
        if kind == "transcribe":
            got = data["text"]
            return "" if got == req.expect[1] else f"got {got!r}, expected {req.expect[1]!r}"
        if kind == "models":
            ids = {d["id"] for d in data["data"]}
            missing = set(req.expect) - ids
            return f"models missing {sorted(missing)}" if missing else ""
        if kind == "status":
            ids = {m["id"] for m in data["models"]}
            ok = ids == set(req.expect) and "budget_gb" in data["vram"]
            return "" if ok else f"status of {sorted(ids)}"
        if kind == "health":
            return "" if data == {"status": "ok"} else f"health {data}"
    except (KeyError, IndexError, TypeError) as exc:
        return f"{type(exc).__name__} {exc} in {json.dumps(data)[:300]}"
    return f"no check for {kind}"


def judge(req: Req, status: int, ctype: str, body: bytes) -> Verdict:
    if req.kind == "bad":
        if status not in req.expect_status:
            return Verdict(
                "fail",
                "wrong_status",
                f"{status} (expected {req.expect_status}): {body[:300]!r}",
            )
        problem, err = envelope_problem(body)
        if problem is not None:
            return Verdict("fail", "bad_envelope", f"{status} {problem}: {body[:300]!r}")
        assert err is not None
        if req.expect_code is not None and err["code"] != req.expect_code:
            return Verdict(
                "fail", "wrong_code", f"{status} code {err['code']!r}, want {req.expect_code!r}"
            )
        return Verdict("error", str(err["code"]))
    if status == 200:
        return judge_ok(req, ctype, body)
    problem, err = envelope_problem(body)
    if problem is not None:
        return Verdict("fail", "bad_envelope", f"{status} {problem}: {body[:300]!r}")
    assert err is not None
    code = str(err["code"])
    if req.model is None or code not in ALLOWED_ERRORS.get(status, set()):
        return Verdict("fail", "wrong_status", f"{status} {code}: {err['message'][:300]}")
    return Verdict("error", code, needs_death=code in NEEDS_DEATH)


# ============================================================================ the request mix


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega")) for _ in range(n))


def _multipart(
    fields: list[tuple[str, str]], file: bytes, ctype_case: str = "multipart/form-data"
) -> tuple[bytes, str]:
    boundary = "soak" + secrets.token_hex(8)
    out = bytearray()
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    out += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    out += file + f"\r\n--{boundary}--\r\n".encode()
    return bytes(out), f"{ctype_case}; boundary={boundary}"


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def post(route: str, path: str, model: str | None, body: Any, kind: str, **kw: Any) -> Req:
    """A POST with a JSON body (``body`` bytes are sent as they are)."""
    data = body if isinstance(body, bytes) else _json(body)
    return Req(
        route, "POST", path, model, data, kw.pop("ctype", "application/json"), kind=kind, **kw
    )


def bad(route: str, method: str, path: str, status: tuple[int, ...], **kw: Any) -> Req:
    """A request that must get exactly one of ``status`` (and ``code`` if given)."""
    body = kw.pop("body", None)
    data = None if body is None else body if isinstance(body, bytes) else _json(body)
    ctype = "application/json" if data is not None else None
    code = kw.pop("code", None)
    return Req(
        route,
        method,
        path,
        None,
        data,
        ctype,
        kind="bad",
        expect_status=status,
        expect_code=code,
        **kw,
    )


def make_chat(rng: random.Random, kind: str, stream: bool) -> Req:
    model = rng.choice(("llm-a", "llm-a", "gpt-soak", "llm-b", "llm-b"))
    model_id = "llm-a" if model == "gpt-soak" else model
    nonce = f"n{rng.getrandbits(32):08x} {_words(rng, rng.randint(2, 8))}"
    body: dict[str, Any] = {"model": model, "max_tokens": 16}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": nonce}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = nonce
        path = "/v1/completions"
    if stream:
        body["stream"] = True
    route = ("chat" if kind == "chat" else "completions") + (" stream" if stream else "")
    if model_id == "llm-b":
        framing = rng.choice(FRAMINGS)
        body["user"] = "framing:" + framing
        route += f" [llm-b {framing}]"
        expect = f"llm-b got {model} re {nonce}"
    else:
        route += " [llm-a]"
        expect = f"llm-a got {model}"
    return post(route, path, model_id, body, kind, stream=stream, expect=expect)


def make_request(rng: random.Random, all_ids: list[str]) -> Req:
    """A random request of the mix (weights in ``MIX``)."""
    what = rng.choices([m[0] for m in MIX], weights=[m[1] for m in MIX])[0]
    if what in ("chat", "text"):
        return make_chat(rng, what, rng.random() < 0.5)
    if what == "embed":
        items: Any = [f"e{rng.getrandbits(32):08x}" for _ in range(rng.randint(1, 4))]
        body = {"model": "embed", "input": items[0] if len(items) == 1 else items}
        return post("embeddings", "/v1/embeddings", "embed", body, "embed", expect=items)
    if what == "speech":
        fmt = rng.choice(("wav", "pcm"))
        chars = rng.randint(5, 400)
        body = {"model": "tts", "input": "x" * chars, "voice": "alloy", "response_format": fmt}
        return post(f"speech {fmt}", "/v1/audio/speech", "tts", body, "speech", expect=(fmt, chars))
    if what in ("transcribe", "transcribe_upper"):
        fmt = rng.choice(("json", "text", "verbose_json"))
        size = rng.randint(1000, 64_000)
        path = rng.choice(["/v1/audio/transcriptions"] * 4 + ["/v1/audio/translations"])
        route = path.rsplit("/", 1)[1] + f" {fmt}"
        media = "multipart/form-data"
        if what == "transcribe_upper":  # issue 10, finding 10: media types are case-insensitive
            route, media = "transcriptions (Multipart/Form-Data)", "Multipart/Form-Data"
        fields = [("model", "asr"), ("response_format", fmt)]
        data, ctype = _multipart(fields, rng.randbytes(size), media)
        return post(
            route,
            path,
            "asr",
            data,
            "transcribe",
            ctype=ctype,
            expect=(fmt, f"asr heard {size} bytes"),
        )
    if what == "models":
        return Req("GET /v1/models", "GET", "/v1/models", kind="models", expect=all_ids)
    if what == "status":
        return Req("GET /status", "GET", "/status", kind="status", expect=list(MODELS))
    if what == "metrics":
        return Req("GET /metrics", "GET", "/metrics", kind="metrics")
    if what == "health":
        return Req("GET /health", "GET", "/health", key=None, kind="health")
    return make_bad(rng)


def make_bad(rng: random.Random) -> Req:
    chat = "/v1/chat/completions"
    hello = {"model": "llm-a", "messages": [{"role": "user", "content": "hi"}]}
    which = rng.choice(BAD_KINDS)
    if which == "bad_json":
        return bad("bad: invalid JSON", "POST", chat, (400,), body=b'{"model": "llm-a", "mes')
    if which == "no_model":
        return bad("bad: no model", "POST", chat, (400,), body={"messages": hello["messages"]})
    if which == "unknown_model":
        body = {**hello, "model": f"nope-{rng.getrandbits(16)}"}
        return bad("bad: unknown model", "POST", chat, (404,), body=body, code="model_not_found")
    if which == "wrong_key":
        return bad(
            "bad: wrong key", "POST", chat, (401,), body=hello, key="wrong", code="invalid_api_key"
        )
    if which == "no_key_status":
        return bad(
            "bad: no key on /status", "GET", "/status", (401,), key=None, code="invalid_api_key"
        )
    if which == "wrong_key_models":
        return bad(
            "bad: wrong key on /v1/models",
            "GET",
            "/v1/models",
            (401,),
            key="wrong",
            code="invalid_api_key",
        )
    if which == "wrong_method":
        return bad("bad: GET on a POST route", "GET", chat, (405,))
    if which == "unknown_path":
        return bad("bad: unknown path", "GET", "/v1/nope", (404,))
    if which == "speech_for_llm":  # issue 10, finding 10: an envelope, and no load
        body = {"model": "llm-a", "input": "hello", "voice": "alloy"}
        return bad("bad: speech for an LLM", "POST", "/v1/audio/speech", (400, 404), body=body)
    # speech_too_long: issue 10, finding 4 (OpenAI's limit: 4,096 characters)
    body = {"model": "tts", "input": "x" * 4097, "voice": "alloy"}
    return bad(
        "bad: speech input over 4,096 characters", "POST", "/v1/audio/speech", (400,), body=body
    )


MIX: list[tuple[str, float]] = [
    ("chat", 22),
    ("text", 10),
    ("embed", 10),
    ("speech", 10),
    ("transcribe", 9),
    ("transcribe_upper", 1),
    ("models", 4),
    ("status", 3),
    ("metrics", 2),
    ("health", 3),
    ("bad", 8),
]
BAD_KINDS = (
    "bad_json",
    "no_model",
    "unknown_model",
    "wrong_key",
    "no_key_status",
    "wrong_key_models",
    "wrong_method",
    "unknown_path",
    "speech_for_llm",
    "speech_too_long",
)


def crash_request(stream: bool) -> Req:
    body: dict[str, Any] = {"model": "llm-a", "messages": [{"role": "user", "content": "crash"}]}
    if stream:
        body["stream"] = True
    route = "crash" + (" stream" if stream else "") + " [llm-a]"
    return Req(
        route,
        "POST",
        "/v1/chat/completions",
        "llm-a",
        _json(body),
        "application/json",
        kind="crash",
        stream=stream,
        expect="llm-a got llm-a",
    )


# ============================================================================ the run


@dataclass
class Death:
    model: str
    start: float
    end: float
    how: str


@dataclass
class Tally:
    """Everything counted during the run (loop time, seconds since the load started)."""

    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """route -> Counter of "<status>" / "<status> <code>" / "cut" / "hangup" / ..."""
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    failure_counts: Counter[str] = field(default_factory=Counter)
    pending: list[tuple[Req, Verdict, float, float, str]] = field(default_factory=list)
    """Answers that only a child's death explains: (req, verdict, start, end, what)."""
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    deaths: list[Death] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    budget_samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    """(t, reserved_gb, resident sum, budget_gb) per /status poll."""
    budget_violations: list[dict[str, Any]] = field(default_factory=list)
    status_poll_failures: list[str] = field(default_factory=list)
    pids_seen: dict[int, str] = field(default_factory=dict)
    explained: int = 0
    """Answers that needed a death of their model's child, and had one."""
    resources: list[dict[str, Any]] = field(default_factory=list)
    states_seen: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def fail(self, category: str, example: dict[str, Any], keep: int = 5) -> None:
        self.failure_counts[category] += 1
        self.outcomes["fail"] += 1
        if len(self.failures[category]) < keep:
            self.failures[category].append(example)


@dataclass
class Settings:
    clients: int
    duration: float
    kill_every: float
    crash_every: float
    hangup: float
    sample_every: float
    request_timeout: float
    explain_slack: float
    rss_slope_max: float
    fd_slope_max: float
    leftover_wait: float
    chunk_delay: float
    seed: int


class Soak:
    def __init__(self, s: Settings, url: str, api_key: str, pid: int, token: str) -> None:
        self.s = s
        self.url = url
        self.api_key = api_key
        self.pid = pid
        self.token = token
        self.tally = Tally()
        self.t0 = 0.0
        self.stop_at = 0.0
        self.loop_done = asyncio.Event()
        self.all_ids = [*MODELS, *(a for m in MODELS.values() for a in m.get("aliases", []))]
        self.done_requests = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def auth(self, key: str | None) -> dict[str, str]:
        if key == "good":
            return {"Authorization": f"Bearer {self.api_key}"}
        if key == "wrong":
            return {"Authorization": "Bearer sk-wrong-" + secrets.token_hex(8)}
        return {}

    async def send(self, session: Any, req: Req) -> None:
        """Send one request, judge and count its answer."""
        import aiohttp

        headers = self.auth(req.key)
        if req.ctype:
            headers["Content-Type"] = req.ctype
        start = self.now()
        status = 0
        ctype = ""
        body = bytearray()
        got_headers = False
        hang_cm = asyncio.timeout(self.s.request_timeout)
        hup_cm = asyncio.timeout(req.hangup_after if req.hangup == "wait" else None)
        verdict: Verdict
        try:
            async with (
                hang_cm,
                hup_cm,
                session.request(
                    req.method, self.url + req.path, data=req.body, headers=headers
                ) as resp,
            ):
                got_headers = True
                status = resp.status
                ctype = resp.headers.get("Content-Type", "")
                if req.hangup == "mid":
                    await resp.content.readany()
                    resp.close()
                    verdict = Verdict("hangup", "mid")
                elif req.kind == "bad" and status == 200:
                    # A bad request that was served: the verdict is known, and the body
                    # may be large (speech over the limit): read no more than a piece.
                    body += await resp.content.readany()
                    resp.close()
                    verdict = judge(req, status, ctype, bytes(body))
                else:
                    async for chunk in resp.content.iter_any():
                        body += chunk
                    verdict = judge(req, status, ctype, bytes(body))
        except TimeoutError:
            if hup_cm.expired():
                verdict = Verdict("hangup", "wait")
            else:
                verdict = Verdict(
                    "fail",
                    "hang",
                    f"no complete answer after {self.s.request_timeout:g} s "
                    f"(status {status or 'none'}, {len(body)} body bytes)",
                )
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
        ) as exc:
            what = f"{type(exc).__name__}: {exc}"
            if not got_headers:
                verdict = Verdict("fail", "no_answer", "connection lost before headers: " + what)
            elif status == 200 and not ctype.startswith("text/event-stream") and req.model:
                verdict = Verdict("cut", "cut", what, needs_death=True)
            else:
                verdict = Verdict(
                    "fail",
                    "cut_forbidden",
                    f"{status} {ctype!r} cut after {len(body)} bytes: {what}; "
                    f"tail {bytes(body[-200:])!r}",
                )
        except aiohttp.ClientError as exc:
            verdict = Verdict("fail", "client_error", f"{type(exc).__name__}: {exc}")
        end = self.now()
        self.record(req, verdict, status, start, end)

    def record(self, req: Req, v: Verdict, status: int, start: float, end: float) -> None:
        t = self.tally
        self.done_requests += 1
        if v.outcome == "hangup":
            key = f"hangup ({v.problem})"
        elif v.outcome == "cut":
            key = f"{status} cut"
        elif v.outcome == "error":
            key = f"{status} {v.problem}" if status != 200 else f"200 SSE error {v.problem}"
        elif v.outcome == "ok":
            key = "200"
        else:
            key = f"{status or '-'} FAIL {v.problem}"
        t.counts[req.route][key] += 1
        if v.outcome == "fail":
            t.fail(v.problem, self.example(req, v, status, start, end))
        else:
            t.outcomes[v.outcome] += 1
        if v.outcome == "ok":
            t.latencies[req.route].append(end - start)
        if v.needs_death:
            t.pending.append((req, v, start, end, key))

    def example(
        self, req: Req, v: Verdict, status: int, start: float, end: float
    ) -> dict[str, Any]:
        body = req.body or b""
        return {
            "route": req.route,
            "model": req.model,
            "status": status,
            "t": round(start, 2),
            "took_s": round(end - start, 3),
            "detail": v.detail[:600],
            "request": body[:200].decode("utf-8", "replace") if body else None,
        }

    # ------------------------------------------------------------------- tasks

    async def client(self, i: int) -> None:
        import aiohttp

        rng = random.Random(self.s.seed * 100_003 + i)
        await asyncio.sleep(rng.uniform(0, min(2.0, self.s.duration / 10)))
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=1)
        ) as session:
            while self.now() < self.s.duration:
                req = make_request(rng, self.all_ids)
                if req.model is not None and rng.random() < self.s.hangup:
                    streaming = req.stream or req.kind == "speech"
                    req.hangup = "mid" if streaming and rng.random() < 0.5 else "wait"
                    req.hangup_after = rng.uniform(0.0, 1.0)
                    # Hang-ups get a connection of their own, closed with its session.
                    async with aiohttp.ClientSession(
                        timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)
                    ) as once:
                        await self.send(once, req)
                else:
                    await self.send(session, req)

    async def crasher(self) -> None:
        import aiohttp

        n = 0
        # Idle between crashes for longer than a keep-alive lasts: a fresh connection each time.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while self.now() + self.s.crash_every < self.s.duration:
                await asyncio.sleep(self.s.crash_every)
                req = crash_request(stream=n % 2 == 1)
                n += 1
                start = self.now()
                await self.send(session, req)
                self.tally.deaths.append(Death("llm-a", start, self.now(), "crash request"))

    async def chaos(self, session: Any) -> None:
        rng = random.Random(self.s.seed)
        while self.now() + self.s.kill_every < self.s.duration:
            await asyncio.sleep(self.s.kill_every)
            status = await self.get_status(session)
            if status is None:
                continue
            alive = [m for m in status["models"] if m.get("pid")]
            if not alive:
                continue
            victim = rng.choice(alive)
            pid = int(victim["pid"])
            if not self.started_by_llmux(pid):
                continue  # gone already (or a reused pid): never kill what is not ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                t = self.now()
                self.tally.deaths.append(Death(victim["id"], t, t, "SIGKILL"))
                self.tally.kills.append(
                    {
                        "t": round(t, 2),
                        "model": victim["id"],
                        "pid": pid,
                        "state": victim["state"],
                        "in_flight": victim.get("in_flight"),
                    }
                )

    def started_by_llmux(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f"{TOKEN_VAR}={self.token}".encode() in f.read().split(b"\0")
        except OSError:
            return False

    async def get_status(self, session: Any) -> dict[str, Any] | None:
        import aiohttp

        try:
            async with asyncio.timeout(30):
                async with session.get(self.url + "/status", headers=self.auth("good")) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise ValueError(f"{resp.status}: {body[:200]!r}")
                    data: dict[str, Any] = json.loads(body)
                    return data
        except (TimeoutError, ValueError, aiohttp.ClientError) as exc:
            self.tally.status_poll_failures.append(
                f"t={self.now():.1f}: {type(exc).__name__} {exc}"
            )
            return None

    async def poll_status(self, session: Any) -> None:
        """``/status`` every 0.5 s until the load stops: the budget, pids, states."""
        while not self.loop_done.is_set():
            status = await self.get_status(session)
            if status is not None:
                self.check_budget(status)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.loop_done.wait(), 0.5)

    def check_budget(self, status: dict[str, Any]) -> None:
        t = self.tally
        now = self.now()
        vram = status["vram"]
        budget, reserved = float(vram["budget_gb"]), float(vram["reserved_gb"])
        resident = sum(
            float(m["vram_gb"] or 0)
            for m in status["models"]
            if m["state"] in ("loading", "ready", "draining", "unloading")
        )
        t.budget_samples.append((round(now, 2), reserved, round(resident, 6), budget))
        if reserved > budget + 1e-6 or resident > budget + 1e-6:
            t.budget_violations.append(
                {
                    "t": round(now, 2),
                    "budget_gb": budget,
                    "reserved_gb": reserved,
                    "resident_sum_gb": resident,
                    "models": [(m["id"], m["state"], m["vram_gb"]) for m in status["models"]],
                }
            )
        for m in status["models"]:
            t.states_seen[m["id"]][m["state"]] += 1
            if m.get("pid"):
                t.pids_seen[int(m["pid"])] = m["id"]

    async def sample_resources(self) -> None:
        while True:
            self.tally.resources.append(self.resource_sample())
            try:
                await asyncio.wait_for(self.loop_done.wait(), self.s.sample_every)
                return
            except TimeoutError:
                continue

    def resource_sample(self) -> dict[str, Any]:
        try:
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            fds = -1
        return {
            "t": round(self.now(), 2),
            "rss_kib": rss_kib(self.pid),
            "fds": fds,
            "requests": self.done_requests,
            "load1": round(os.getloadavg()[0], 2),
        }

    async def quiet(self, session: Any, timeout: float) -> dict[str, Any]:
        """Wait until no model has anything in flight or queued; the last /status seen."""
        deadline = self.now() + timeout
        last: dict[str, Any] | None = None
        while self.now() < deadline:
            last = await self.get_status(session)
            if last is not None and all(
                m["in_flight"] == 0 and m["queued"] == 0 for m in last["models"]
            ):
                return {
                    "quiet": True,
                    "after_s": round(timeout - (deadline - self.now()), 2),
                    "status": last,
                }
            await asyncio.sleep(0.5)
        return {"quiet": False, "after_s": timeout, "status": last}

    async def run(self) -> dict[str, Any]:
        import aiohttp

        self.t0 = time.monotonic()
        async with aiohttp.ClientSession() as control:
            ready = await self.pinned_ready(control, READY_TIMEOUT_S + 10)
            self.t0 = time.monotonic()
            baseline = self.resource_sample()
            background = [
                asyncio.create_task(self.poll_status(control)),
                asyncio.create_task(self.sample_resources()),
            ]
            chaos = [asyncio.create_task(self.chaos(control))]
            if self.s.crash_every > 0:
                chaos.append(asyncio.create_task(self.crasher()))
            clients = [asyncio.create_task(self.client(i)) for i in range(self.s.clients)]
            progress = asyncio.create_task(self.progress())
            await asyncio.gather(*clients, *chaos)
            load_s = self.now()
            self.loop_done.set()
            await asyncio.gather(*background)
            progress.cancel()
            quiet = await self.quiet(control, 30.0)
            after = self.resource_sample()
            metrics = await self.metrics(control)
            idle = await self.unload_all(control, baseline)
        return {
            "pinned_ready": ready,
            "load_s": round(load_s, 1),
            "quiet": quiet,
            "baseline": baseline,
            "after_load": after,
            "idle": idle,
            "metrics": metrics,
        }

    async def pinned_ready(self, session: Any, timeout: float) -> bool:
        """Wait for the pinned model to be loaded (llmux loads it at start)."""
        deadline = time.monotonic() + timeout
        pinned = [m for m, spec in MODELS.items() if spec.get("pinned")]
        while time.monotonic() < deadline:
            status = await self.get_status(session)
            states = {m["id"]: m["state"] for m in (status or {}).get("models", [])}
            if all(states.get(m) == "ready" for m in pinned):
                return True
            await asyncio.sleep(0.2)
        return False

    async def unload_all(self, session: Any, baseline: dict[str, Any]) -> dict[str, Any]:
        """Unload every model (admin), then wait until the gateway holds no more fds than
        before the load: with the clients and children gone, anything more is a leak."""
        unloaded: dict[str, Any] = {}
        for model_id in MODELS:
            try:
                async with asyncio.timeout(60):
                    url = f"{self.url}/models/{model_id}/unload"
                    async with session.post(url, headers=self.auth("good")) as resp:
                        await resp.read()
                        unloaded[model_id] = resp.status
            except Exception as exc:  # a detail of the report; the fd check says the rest
                unloaded[model_id] = f"{type(exc).__name__}: {exc}"
        await session.close()  # this session's own connection to llmux goes too
        limit = baseline["fds"] + IDLE_FD_MARGIN
        deadline = time.monotonic() + 10
        sample = self.resource_sample()
        while sample["fds"] > limit and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            sample = self.resource_sample()
        return {**sample, "unloaded": unloaded, "fd_limit": limit}

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(10)
            t = self.tally
            log(
                f"t={self.now():.0f}s requests={self.done_requests} ok={t.outcomes['ok']} "
                f"errors={t.outcomes['error']} cut={t.outcomes['cut']} fail={t.outcomes['fail']} "
                f"kills={len(t.kills)} load={os.getloadavg()[0]:.1f}"
            )

    async def metrics(self, session: Any) -> dict[str, Any]:
        """Loads and evictions from ``/metrics`` (the scheduler's own count of the swaps)."""
        out: dict[str, Any] = {"loads": {}, "evictions": {}}
        try:
            async with session.get(self.url + "/metrics", headers=self.auth("good")) as resp:
                text = (await resp.read()).decode()
        except Exception as exc:  # a report detail, not a check
            return {"error": str(exc)}
        for line in text.splitlines():
            m = re.match(r"llmux_(model_loads|evictions)_total\{(.*)\} ([0-9.e+]+)$", line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                key = "loads" if m.group(1) == "model_loads" else "evictions"
                label = labels.get("result") or labels.get("reason") or ""
                out[key][f"{labels.get('model')} {label}"] = float(m.group(3))
        return out


# ============================================================================ processes


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            children[int(stat[stat.rindex(")") + 2 :].split()[1])].append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def marked_processes(token: str) -> dict[int, str]:
    """Every live process with the run's token in its environment: pid -> command line."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie holds nothing; its parent reaps it
        except OSError:
            continue
        found[int(entry)] = cmd
    return found


def wait_for(cond: Any, timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def raise_file_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine() -> dict[str, Any]:
    import importlib.metadata

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    versions = {}
    for name in ("llmux", "aiohttp", "uvicorn", "uvloop", "httptools"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "packages": versions,
        "git_commit": git,
        "src_dirty": bool(dirty),
    }


# ============================================================================ analysis


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t s, value) in value per minute; None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(p[0] for p in points) / n
    mv = sum(p[1] for p in points) / n
    var = sum((p[0] - mt) ** 2 for p in points)
    if var == 0:
        return None
    return 60.0 * sum((p[0] - mt) * (p[1] - mv) for p in points) / var


def explain(tally: Tally, slack: float) -> None:
    """Answers that only a death explains: find the death, or count them as failures."""
    by_model: dict[str, list[Death]] = defaultdict(list)
    for d in tally.deaths:
        by_model[d.model].append(d)
    for req, v, start, end, key in tally.pending:
        model = req.model or ""
        if any(d.start <= end and d.end >= start - slack for d in by_model[model]):
            tally.explained += 1
            continue
        category = "unexplained_cut" if v.outcome == "cut" else f"unexplained_{v.problem}"
        tally.counts[req.route][key] -= 1
        tally.counts[req.route][f"{key} (UNEXPLAINED)"] += 1
        if v.outcome != "fail":
            tally.outcomes[v.outcome] -= 1
        ex = {
            "route": req.route,
            "model": model,
            "t": round(start, 2),
            "took_s": round(end - start, 3),
            "detail": v.detail[:600] or key,
            "deaths_of_model": [round(d.start, 2) for d in by_model[model]][:20],
        }
        tally.fail(category, ex)


def analyse(
    s: Settings, tally: Tally, extra: dict[str, Any], proc_end: dict[str, Any]
) -> dict[str, Any]:
    explain(tally, s.explain_slack)
    checks: dict[str, dict[str, Any]] = {}

    checks["answers"] = {
        "ok": not tally.failure_counts,
        "detail": dict(tally.failure_counts) or "every answer well-formed and explained",
    }
    good_routes = [r for r in tally.counts if not r.startswith(("bad:", "crash"))]
    no_ok = sorted(r for r in good_routes if tally.counts[r]["200"] == 0)
    checks["coverage"] = {
        "ok": not no_ok and bool(good_routes),
        "detail": f"routes without a 200: {no_ok}"
        if no_ok
        else f"{len(good_routes)} routes each answered 200 at least once",
    }
    checks["budget"] = {
        "ok": not tally.budget_violations and len(tally.budget_samples) > 0,
        "detail": f"{len(tally.budget_violations)} violations in {len(tally.budget_samples)} "
        f"samples; max reserved "
        f"{max((b[1] for b in tally.budget_samples), default=0):g} of "
        f"{tally.budget_samples[0][3] if tally.budget_samples else '?'} GB",
    }
    checks["status_polls"] = {
        "ok": not tally.status_poll_failures,
        "detail": tally.status_poll_failures[:5] or "all answered",
    }
    quiet = extra["quiet"]
    busy = [
        (m["id"], m["in_flight"], m["queued"])
        for m in (quiet["status"] or {}).get("models", [])
        if m["in_flight"] or m["queued"]
    ]
    checks["quiet_after_load"] = {
        "ok": bool(quiet["quiet"]),
        "detail": f"idle {quiet['after_s']} s after the clients stopped"
        if quiet["quiet"]
        else f"still busy 30 s after the clients stopped: {busy}",
    }
    half = s.duration / 2
    second = [r for r in tally.resources if r["t"] >= half]
    rss = slope_per_min([(r["t"], r["rss_kib"] / 1024) for r in second])
    fds = slope_per_min([(r["t"], r["fds"]) for r in second])
    reqs = slope_per_min([(r["t"], r["requests"]) for r in second])
    per_req = None
    if rss is not None and reqs:
        per_req = round(rss * 1024 * 1024 / reqs, 1)
    checks["rss_flat"] = {
        "ok": rss is not None and rss <= s.rss_slope_max,
        "detail": f"slope over the second half {rss if rss is None else round(rss, 2)} MiB/min "
        f"({len(second)} samples; bound {s.rss_slope_max:g}; "
        f"{per_req} bytes per request)",
        "slope_mib_per_min": rss,
        "bytes_per_request": per_req,
    }
    checks["fds_flat"] = {
        "ok": fds is not None and fds <= s.fd_slope_max,
        "detail": f"slope over the second half {fds if fds is None else round(fds, 2)} fds/min "
        f"({len(second)} samples; bound {s.fd_slope_max:g})",
        "slope_per_min": fds,
    }
    idle, base = extra["idle"], extra["baseline"]
    checks["fds_released"] = {
        "ok": 0 <= idle["fds"] <= idle["fd_limit"],
        "detail": f"{idle['fds']} fds with every model unloaded and every client gone, "
        f"{base['fds']} before the load (bound {idle['fd_limit']}); unload answers "
        f"{idle['unloaded']}",
    }
    checks["pinned_loaded"] = {
        "ok": bool(extra["pinned_ready"]),
        "detail": "the pinned model was ready before the load"
        if extra["pinned_ready"]
        else f"the pinned model was not ready {READY_TIMEOUT_S + 10:g} s after start",
    }
    checks["llmux_alive"] = {
        "ok": proc_end["alive_until_sigterm"],
        "detail": "llmux ran until the SIGTERM"
        if proc_end["alive_until_sigterm"]
        else f"llmux exited during the run with {proc_end['exit_during_run']}",
    }
    # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught: -15 is a clean exit too.
    checks["clean_exit"] = {
        "ok": proc_end["exit_code"] in (0, -signal.SIGTERM),
        "detail": f"exit code {proc_end['exit_code']} after SIGTERM, {proc_end['exit_s']} s",
    }
    checks["no_orphans"] = {
        "ok": not proc_end["orphans"],
        "detail": proc_end["orphans"] or "none while llmux ran",
    }
    checks["nothing_left"] = {
        "ok": not proc_end["leftovers"] and not proc_end["pids_alive"],
        "detail": (proc_end["leftovers"] or proc_end["pids_alive"])
        or f"none of the {len(tally.pids_seen)} child pids seen (nor any descendant) is left",
    }
    return checks


def latency_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))], 3)

    return {"n": len(v), "p50_s": q(0.5), "p99_s": q(0.99), "max_s": round(v[-1], 3)}


# ============================================================================ output


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["samples"]["resources"]
    budget = result["samples"]["budget"]
    half = result["settings"]["duration"] / 2
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    t = [r["t"] for r in res]
    axes[0].plot(t, [r["rss_kib"] / 1024 for r in res], marker="o", ms=3)
    axes[0].set_ylabel("gateway RSS (MiB)")
    axes[1].plot(t, [r["fds"] for r in res], marker="o", ms=3, color="tab:orange")
    axes[1].set_ylabel("gateway open fds")
    axes[2].plot([b[0] for b in budget], [b[1] for b in budget], lw=0.8, label="reserved_gb")
    if budget:
        axes[2].axhline(budget[0][3], color="red", ls="--", lw=1, label="budget_gb")
    for k in result["kills"]:
        axes[2].axvline(k["t"], color="grey", alpha=0.3, lw=0.6)
    axes[2].set_ylabel("GB (grey: SIGKILLs)")
    axes[2].set_xlabel("seconds since the load started")
    axes[2].legend(loc="lower right")
    for ax in axes:
        ax.axvline(half, color="green", ls=":", lw=1)
        ax.grid(alpha=0.3)
    s = result["settings"]
    fig.suptitle(
        f"llmux soak: {s['clients']} clients, {s['duration']:g} s "
        f"(dotted: end of warm-up; flatness is judged after it)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    out = [
        f"# llmux soak, {result['date']}",
        "",
        f"`{result['command']}`",
        "",
        f"**{'PASS' if result['passed'] else 'FAIL'}**: {s['clients']} clients for "
        f"{s['duration']:g} s, {result['totals']['requests']} answers "
        f"({result['totals']['requests_per_s']} per s), {len(result['kills'])} SIGKILLs, "
        f"{result['totals']['crash_requests']} crash requests; machine: "
        f"{result['machine']['cpus']} CPUs, load average {result['load_after']}; "
        f"commit {result['machine']['git_commit'][:10]}"
        f"{' (src modified)' if result['machine']['src_dirty'] else ''}.",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for name, c in result["checks"].items():
        detail = c["detail"] if isinstance(c["detail"], str) else json.dumps(c["detail"])
        out.append(f"| {name} | {'ok' if c['ok'] else '**FAIL**'} | {detail[:400]} |")
    out += [
        "",
        "## Answers per route",
        "",
        "| route | answers | p50 / p99 / max of 200s (s) |",
        "|---|---|---|",
    ]
    for route, counts in sorted(result["counts"].items()):
        lat = result["latency"].get(route, {})
        cell = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()) if n)
        lat_cell = f"{lat['p50_s']} / {lat['p99_s']} / {lat['max_s']}" if lat else "-"
        out.append(f"| {route} | {cell} | {lat_cell} |")
    if result["failures"]:
        out += ["", "## Failures (up to 5 examples each)", ""]
        for category, examples in result["failures"].items():
            out.append(f"### {category}: {result['failure_counts'][category]}")
            out.append("")
            for ex in examples:
                out.append(f"- `{json.dumps(ex)[:700]}`")
            out.append("")
    out += [
        "",
        "## Gateway resources",
        "",
        f"![RSS, fds and reservation over time]({result['plot']})",
        "",
        "| t (s) | RSS (MiB) | fds | answers so far | load |",
        "|---|---|---|---|---|",
    ]
    for r in [{**result["before_load"], "t": "before the load"}, *result["samples"]["resources"]]:
        out.append(
            f"| {r['t']} | {r['rss_kib'] / 1024:.1f} | {r['fds']} | {r['requests']} | "
            f"{r['load1']} |"
        )
    for label, key in (("after the load", "after_load"), ("all unloaded", "idle")):
        a = result[key]
        out.append(
            f"| {label} | {a['rss_kib'] / 1024:.1f} | {a['fds']} | {a['requests']} | {a['load1']} |"
        )
    out += [
        "",
        "## Swaps (from /metrics)",
        "",
        "```",
        json.dumps(result["metrics"], indent=1),
        "```",
        "",
    ]
    if result["llmux_log"]["tracebacks"]:
        out += [
            "## llmux log",
            "",
            f"{result['llmux_log']['tracebacks']} tracebacks; the first:",
            "",
            "```",
            result["llmux_log"]["first_traceback"],
            "```",
            "",
        ]
    return "\n".join(out)


def log_findings(path: Path) -> dict[str, Any]:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback")]
    first = "\n".join(lines[max(0, starts[0] - 2) : starts[0] + 40]) if starts else ""
    warnings = Counter(
        re.sub(r"\d+", "N", ln.split(":", 3)[-1].strip())[:120]
        for ln in lines
        if " WARNING " in ln or " ERROR " in ln
    )
    return {
        "tracebacks": len(starts),
        "first_traceback": first,
        "lines": len(lines),
        "top_messages": dict(warnings.most_common(10)),
    }


# ============================================================================ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--duration", type=float, default=600.0, metavar="S")
    p.add_argument(
        "--kill-every",
        type=float,
        default=5.0,
        metavar="S",
        help="SIGKILL a random child this often",
    )
    p.add_argument(
        "--crash-every",
        type=float,
        default=10.0,
        metavar="S",
        help="ask llm-a to crash mid-answer this often (0: never)",
    )
    p.add_argument(
        "--hangup",
        type=float,
        default=0.05,
        help="fraction of model requests whose client hangs up",
    )
    p.add_argument(
        "--sample-every",
        type=float,
        default=10.0,
        metavar="S",
        help="gateway RSS and fds sampled this often",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        metavar="S",
        help="a request still unanswered after this hangs (default: queue_timeout + "
        "ready_timeout + 60 s)",
    )
    p.add_argument(
        "--explain-slack",
        type=float,
        default=5.0,
        metavar="S",
        help="a death this long before a request still explains its 502 or cut",
    )
    p.add_argument(
        "--rss-slope-max",
        type=float,
        default=4.0,
        metavar="MIB_PER_MIN",
        help="bound on the gateway's RSS slope after warm-up (default 4 MiB/min)",
    )
    p.add_argument(
        "--fd-slope-max",
        type=float,
        metavar="FDS_PER_MIN",
        help="bound on the gateway's fd-count slope after warm-up (default: clients / 5, at "
        "least 30; the count swings by about the number of clients with the connections in "
        "flight, so a tighter bound fails on noise; leaks of any size fail fds_released)",
    )
    p.add_argument("--leftover-wait", type=float, default=10.0, metavar="S")
    p.add_argument(
        "--chunk-delay",
        type=float,
        default=0.03,
        metavar="S",
        help="llm-b's pause between the pieces of an answer",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (config, log)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    sys.path.insert(0, str(HERE / "overhead"))
    bench = importlib.import_module("run")  # the overhead bench's helpers (write_result, argv)
    from llmux.backends.process import free_port, parent_death_preexec

    s = Settings(
        clients=args.clients,
        duration=args.duration,
        kill_every=args.kill_every,
        crash_every=args.crash_every,
        hangup=args.hangup,
        sample_every=args.sample_every,
        request_timeout=args.request_timeout or QUEUE_TIMEOUT_S + READY_TIMEOUT_S + 60,
        explain_slack=args.explain_slack,
        rss_slope_max=args.rss_slope_max,
        fd_slope_max=args.fd_slope_max or max(30.0, args.clients / 5),
        leftover_wait=args.leftover_wait,
        chunk_delay=args.chunk_delay,
        seed=args.seed,
    )
    nofile = raise_file_limit()
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="llmux-soak-"))
    token = secrets.token_hex(12)
    api_key = "sk-soak-" + secrets.token_hex(16)
    config_text = soak_config(tmp, api_key, s.chunk_delay)
    cfg = tmp / "soak.yaml"
    cfg.write_text(config_text)
    port = free_port()
    argv_llmux = bench.llmux_serve_argv(cfg, port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", TOKEN_VAR: token}
    logf = tmp / "llmux.log"
    load_before = [round(x, 2) for x in os.getloadavg()]
    log(f"llmux on port {port}, scratch {tmp}; {s.clients} clients for {s.duration:g} s")
    with logf.open("wb") as out:
        proc = subprocess.Popen(
            argv_llmux,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=parent_death_preexec(),
        )
    url = f"http://127.0.0.1:{port}"
    proc_end: dict[str, Any] = {"orphans": {}, "leftovers": {}, "pids_alive": []}
    extra: dict[str, Any] = {}
    soak = Soak(s, url, api_key, proc.pid, token)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if not wait_for(lambda: proc.poll() is not None or _healthy(url), 60, 0.2) or (
            proc.poll() is not None
        ):
            raise RuntimeError(f"llmux did not start:\n{logf.read_text()[-3000:]}")
        extra = asyncio.run(soak.run())
        exit_during = proc.poll()
        proc_end["alive_until_sigterm"] = exit_during is None
        proc_end["exit_during_run"] = exit_during

        # Orphans: marked processes outside llmux's tree while it runs (a grandchild whose
        # parent died is reaped by llmux's group kill within moments, so allow a little time).
        def orphans() -> dict[int, str]:
            tree = process_tree(proc.pid)
            return {p: c for p, c in marked_processes(token).items() if p not in tree}

        wait_for(lambda: not orphans(), 5.0)
        proc_end["orphans"] = orphans()
        t_term = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SHUTDOWN_GRACE_S + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc_end["exit_code"] = proc.returncode
        proc_end["exit_s"] = round(time.monotonic() - t_term, 2)
        wait_for(lambda: not marked_processes(token), s.leftover_wait)
        left = proc_end["leftovers"] = marked_processes(token)
        proc_end["pids_alive"] = sorted(p for p in soak.tally.pids_seen if p in left)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in marked_processes(token):  # never leave anything of ours behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    tally = soak.tally
    checks = analyse(s, tally, extra, proc_end)
    passed = all(c["ok"] for c in checks.values())
    total = sum(sum(c.values()) for c in tally.counts.values())
    result: dict[str, Any] = {
        "date": stamp,
        "command": shlex.join(["python", str(Path(__file__).relative_to(REPO)), *argv]),
        "python": sys.executable,
        "passed": passed,
        "machine": {**machine(), "nofile_limit": nofile},
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "settings": vars(s),
        "config": config_text.replace(api_key, "sk-soak-..."),
        "llmux_argv": argv_llmux,
        "checks": checks,
        "totals": {
            "requests": total,
            "requests_per_s": round(total / max(extra.get("load_s", 1), 1), 1),
            "outcomes": dict(tally.outcomes),
            "explained_by_a_death": tally.explained,
            "crash_requests": sum(1 for d in tally.deaths if d.how == "crash request"),
        },
        "failure_counts": dict(tally.failure_counts),
        "failures": dict(tally.failures),
        "counts": {r: dict(c) for r, c in tally.counts.items()},
        "latency": {r: latency_summary(v) for r, v in tally.latencies.items()},
        "kills": tally.kills,
        "states_seen": {m: dict(c) for m, c in tally.states_seen.items()},
        "before_load": extra.get("baseline"),
        "after_load": extra.get("after_load"),
        "idle": extra.get("idle"),
        "quiet": {k: v for k, v in extra.get("quiet", {}).items() if k != "status"},
        "metrics": extra.get("metrics"),
        "process_end": {k: v for k, v in proc_end.items()},
        "llmux_log": log_findings(logf),
        "samples": {"resources": tally.resources, "budget": tally.budget_samples},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"soak-{stamp}.png"
    result["plot"] = png.name
    plot(png, result)
    bench.write_result(args.out, f"soak-{stamp}.json", result)
    md = args.out / f"soak-{stamp}.md"
    md.write_text(markdown(result))
    if args.keep:
        log(f"scratch kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, c in checks.items():
        log(
            f"{'ok  ' if c['ok'] else 'FAIL'} {name}: "
            f"{c['detail'] if isinstance(c['detail'], str) else json.dumps(c['detail'])[:300]}"
        )
    log(f"{'PASS' if passed else 'FAIL'}: {md}")
    return 0 if passed else 1


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop the run and clean up as for Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
