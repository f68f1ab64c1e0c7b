"""A stand-in for a vLLM or SGLang server with sleep mode, run by tests as a real child process.

    python tests/sleepy.py --port N [--api vllm|sglang] [--name NAME] [--ready-delay S]
        [--sleep-delay S] [--wake-delay S] [--sleep-fail] [--wake-fail]
        [--announce DIR] [--marks DIR]

It serves exactly the sleep endpoints of one API (the other API's are 404), as the real engines
do (docs/engines.md, "Sleep API"):

- ``--api vllm`` (default): ``POST /sleep?level=N`` (level from the query string only, default 1;
  a body is ignored, as vLLM ignores it), ``POST /wake_up`` (optional ``tags`` query, recorded),
  ``GET /is_sleeping`` -> ``{"is_sleeping": bool}``, ``POST /collective_rpc``
  ``{"method": "reload_weights"}``, ``POST /reset_prefix_cache``. Sleeping or waking twice is a
  no-op (200), as in vLLM.
- ``--api sglang``: ``POST /release_memory_occupation`` and ``POST /resume_memory_occupation``
  (JSON body, optional ``tags``); releasing twice, or resuming what is not released, is a 400.

The OpenAI routes: ``GET /health`` (200 once ``--ready-delay`` has passed, asleep or not),
``GET /v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions`` (non-stream and SSE).
Answers read ``"{name} pid {pid} got {model}"``. A chat or completion request is served only
while the engine is awake: while it sleeps, or while a sleep or wake is under way, it is a 503
(counted as ``served_while_asleep``: a test proves llmux never relays to a sleeping engine).
After a level-2 sleep the weights are gone: ``/wake_up`` alone leaves them unloaded, and a
request is a 500 "weights not loaded" (counted as ``served_without_weights``) until
``/collective_rpc`` ``reload_weights``. The last message (or prompt) ``"hold"`` holds the
request (a stream after one chunk) until ``POST /_release``; a non-stream one whose client
leaves meanwhile is counted as ``cancelled`` (a stream's is simply cut).

Behaviour switches: ``--sleep-delay``/``--wake-delay`` S: each sleep (release) or wake (resume)
call takes S seconds before it answers; ``--sleep-fail``/``--wake-fail``: that call answers 500
after its delay and the state stays as it was.

Test hooks: ``GET /_stats``: ``pid``, ``name``, ``api``, ``state`` (awake, suspending, asleep,
waking), ``level`` (of the current or last sleep; null before any), ``weights_loaded``, ``counts``
(each sleep-API call by path, without its slash), ``calls`` (the sleep-API calls in order, each
``{"method", "path", "query", "body"}``: query as sent, body as JSON or null), ``served``,
``served_while_asleep``, ``served_without_weights``, ``held``, ``cancelled``.
``GET /_wait?state=asleep&served=2&sleep=1`` long-polls until every condition holds (``state``
equal; any other key: that count, top-level or in ``counts``, at least the value); 408 with the
stats after 30 s. ``POST /_release`` releases held requests.
``--announce DIR`` writes ``DIR/NAME.port``; ``--marks DIR`` writes ``DIR/NAME.json`` (the
stats) after every sleep-API call and state change, so a test can read them after the process
is gone.

At start it prints ``sleepy NAME api API pid PID port PORT`` to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

WAIT_TIMEOUT = 30.0
AWAKE, SUSPENDING, ASLEEP, WAKING = "awake", "suspending", "asleep", "waking"


@dataclass
class State:
    name: str
    api: str
    ready_at: float
    sleep_delay: float = 0.0
    wake_delay: float = 0.0
    sleep_fail: bool = False
    wake_fail: bool = False
    marks: str | None = None
    state: str = AWAKE
    level: int | None = None
    weights_loaded: bool = True
    counts: dict[str, int] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    served: int = 0
    served_while_asleep: int = 0
    served_without_weights: int = 0
    held: int = 0
    cancelled: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "name": self.name,
            "api": self.api,
            "state": self.state,
            "level": self.level,
            "weights_loaded": self.weights_loaded,
            "counts": dict(self.counts),
            "calls": list(self.calls),
            "served": self.served,
            "served_while_asleep": self.served_while_asleep,
            "served_without_weights": self.served_without_weights,
            "held": self.held,
            "cancelled": self.cancelled,
        }

    async def update(self, **changes: Any) -> None:
        """Set attributes (``+1`` on counters via ``bump``), wake the waiters, write the marks."""
        async with self.changed:
            for key, value in changes.items():
                setattr(self, key, value)
            self.changed.notify_all()
        self.write_marks()

    async def bump(self, counter: str) -> None:
        await self.update(**{counter: getattr(self, counter) + 1})

    def write_marks(self) -> None:
        if self.marks is None:
            return
        target = os.path.join(self.marks, f"{self.name}.json")
        with open(target + ".tmp", "w") as f:
            json.dump(self.stats(), f)
        os.replace(target + ".tmp", target)


def error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


async def record(state: State, request: Request) -> Any:
    """Count and log one sleep-API call; return its JSON body (None if empty or not JSON)."""
    raw = await request.body()
    try:
        body: Any = json.loads(raw) if raw.strip() else None
    except ValueError:
        body = raw.decode(errors="replace")
    name = request.url.path.lstrip("/")
    call = {
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query,
        "body": body,
    }
    async with state.changed:
        state.counts[name] = state.counts.get(name, 0) + 1
        state.calls.append(call)
        state.changed.notify_all()
    state.write_marks()
    return body


# ---------------------------------------------------------------- the sleep APIs


async def go_to_sleep(state: State, level: int) -> Response:
    """A sleep (release) call that is not a no-op: the delay, then asleep or (fail) awake."""
    await state.update(state=SUSPENDING)
    await asyncio.sleep(state.sleep_delay)
    if state.sleep_fail:
        await state.update(state=AWAKE)
        return error(500, "sleep failed (--sleep-fail)")
    # Level 2 drops the weights; level 1 keeps them in host memory (level 0 only pauses).
    weights = state.weights_loaded and level != 2
    await state.update(state=ASLEEP, level=level, weights_loaded=weights)
    return Response(status_code=200)


async def wake_up(state: State) -> Response:
    """A wake (resume) call that is not a no-op: the delay, then awake or (fail) asleep."""
    await state.update(state=WAKING)
    await asyncio.sleep(state.wake_delay)
    if state.wake_fail:
        await state.update(state=ASLEEP)
        return error(500, "wake failed (--wake-fail)")
    await state.update(state=AWAKE)
    return Response(status_code=200)


def vllm_routes(state: State) -> list[Route]:
    async def sleep(request: Request) -> Response:
        await record(state, request)
        raw = request.query_params.get("level", "1")  # vLLM: the query string, never the body
        if raw not in ("0", "1", "2"):
            return error(400, f"level must be 0, 1 or 2, not {raw!r}")
        if state.state != AWAKE:
            return Response(status_code=200)  # vLLM: sleeping again is a no-op
        return await go_to_sleep(state, int(raw))

    async def wake(request: Request) -> Response:
        await record(state, request)
        if state.state != ASLEEP:
            return Response(status_code=200)  # vLLM: waking an awake engine is a no-op
        return await wake_up(state)

    async def is_sleeping(request: Request) -> Response:
        await record(state, request)
        return JSONResponse({"is_sleeping": state.state != AWAKE})

    async def collective_rpc(request: Request) -> Response:
        body = await record(state, request)
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            return error(400, "Missing 'method' in request body")
        if method != "reload_weights":
            return error(400, f"this stand-in knows only reload_weights, not {method!r}")
        if state.state != AWAKE:
            return error(500, "cannot reload weights: the weights' memory is asleep")
        await state.update(weights_loaded=True)
        return JSONResponse({"results": [None]})

    async def reset_prefix_cache(request: Request) -> Response:
        await record(state, request)
        return Response(status_code=200)

    return [
        Route("/sleep", sleep, methods=["POST"]),
        Route("/wake_up", wake, methods=["POST"]),
        Route("/is_sleeping", is_sleeping, methods=["GET"]),
        Route("/collective_rpc", collective_rpc, methods=["POST"]),
        Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
    ]


def sglang_routes(state: State) -> list[Route]:
    async def release(request: Request) -> Response:
        body = await record(state, request)
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object (ReleaseMemoryOccupationReqInput)")
        if state.state != AWAKE:
            return error(400, "memory is already released")
        # With --enable-weights-cpu-backup the weights come back on resume: a level-1 sleep.
        return await go_to_sleep(state, 1)

    async def resume(request: Request) -> Response:
        body = await record(state, request)
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object (ResumeMemoryOccupationReqInput)")
        if state.state != ASLEEP:
            return error(400, "memory is not released")
        return await wake_up(state)

    return [
        Route("/release_memory_occupation", release, methods=["GET", "POST"]),
        Route("/resume_memory_occupation", resume, methods=["GET", "POST"]),
    ]


# ---------------------------------------------------------------- OpenAI routes


def last_text(body: dict[str, Any], kind: str) -> str:
    if kind == "chat":
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content", "")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[-1] if prompt else ""
    return str(prompt)


async def wait_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def hold(state: State, request: Request | None) -> bool:
    """Count a held request; wait for ``/_release`` (True) or, given the request, its client
    leaving (False)."""
    release = state.release
    await state.bump("held")
    waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(release.wait())}
    if request is not None:
        waits.add(asyncio.ensure_future(wait_disconnect(request.receive)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    if release.is_set():
        return True
    await state.bump("cancelled")
    return False


def make_app(state: State) -> Starlette:
    async def health(request: Request) -> Response:
        if time.monotonic() >= state.ready_at:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading"}, status_code=503)

    async def models(request: Request) -> Response:
        card = {"id": state.name, "object": "model", "created": 0, "owned_by": "sleepy"}
        return JSONResponse({"object": "list", "data": [card]})

    async def generate(request: Request, kind: str) -> Response:
        body = await request.json()
        if state.state != AWAKE:
            await state.bump("served_while_asleep")
            return error(503, f"{state.name} is {state.state}: not serving", "model_sleeping")
        if not state.weights_loaded:
            await state.bump("served_without_weights")
            return error(500, "weights not loaded (level-2 wake without reload_weights)")
        model = str(body.get("model", ""))
        reply = f"{state.name} pid {os.getpid()} got {model}"
        special = last_text(body, kind)
        created = int(time.time())
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:12]

        if not body.get("stream"):
            if special == "hold" and not await hold(state, request):
                return Response(status_code=499)
            await state.bump("served")
            usage = {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
            if kind == "chat":
                message = {"role": "assistant", "content": reply}
                choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
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
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            event = {"id": rid, "object": obj, "created": created, "model": model}
            return b"data: " + json.dumps({**event, "choices": [choice]}).encode() + b"\n\n"

        async def produce() -> AsyncIterator[bytes]:
            start = 0
            if special == "hold":
                yield chunk(0)
                start = 1
                await hold(state, None)  # a client that leaves cancels this producer
            for i in range(start, len(words)):
                yield chunk(i)
            yield b"data: [DONE]\n\n"
            await state.bump("served")

        return StreamingResponse(
            produce(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "text")

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    def reached(wanted: dict[str, str]) -> bool:
        current = state.stats()
        for key, value in wanted.items():
            if key == "state":
                if current["state"] != value:
                    return False
                continue
            count = current[key] if key in current else current["counts"].get(key, 0)
            if not isinstance(count, int) or count < int(value):
                return False
        return True

    async def wait(request: Request) -> Response:
        wanted = dict(request.query_params)
        if not all(k == "state" or v.isdigit() for k, v in wanted.items()):
            return error(400, "every condition but state takes a count")
        try:
            async with state.changed:
                await asyncio.wait_for(
                    state.changed.wait_for(lambda: reached(wanted)), WAIT_TIMEOUT
                )
        except TimeoutError:
            return JSONResponse(state.stats(), status_code=408)
        return JSONResponse(state.stats())

    async def release(request: Request) -> Response:
        event, state.release = state.release, asyncio.Event()
        event.set()
        return JSONResponse(state.stats())

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/_stats", stats, methods=["GET"]),
        Route("/_wait", wait, methods=["GET"]),
        Route("/_release", release, methods=["POST"]),
        *(vllm_routes(state) if state.api == "vllm" else sglang_routes(state)),
    ]
    return Starlette(routes=routes)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api", choices=["vllm", "sglang"], default="vllm")
    parser.add_argument("--name", default="sleepy")
    parser.add_argument("--ready-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--sleep-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--wake-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--sleep-fail", action="store_true")
    parser.add_argument("--wake-fail", action="store_true")
    parser.add_argument(
        "--announce", metavar="DIR", help="write DIR/NAME.port so a test can reach /_wait"
    )
    parser.add_argument(
        "--marks", metavar="DIR", help="write DIR/NAME.json (the stats) on every change"
    )
    args = parser.parse_args(argv)

    state = State(
        name=args.name,
        api=args.api,
        ready_at=time.monotonic() + args.ready_delay,
        sleep_delay=args.sleep_delay,
        wake_delay=args.wake_delay,
        sleep_fail=args.sleep_fail,
        wake_fail=args.wake_fail,
        marks=args.marks,
    )
    state.write_marks()
    print(f"sleepy {args.name} api {args.api} pid {os.getpid()} port {args.port}", flush=True)
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
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
