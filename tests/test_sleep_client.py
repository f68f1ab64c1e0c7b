"""``HttpSleepClient`` against the vLLM/SGLang stand-in (tests/sleepy.py) as a real child process.

The stand-in records every sleep-API call (method, path, query, body) in order, so each test
checks the exact calls of a sleep and a wake; its OpenAI routes refuse to serve while it sleeps,
and after a level-2 sleep until the weights are reloaded, so a missing call shows as a failed
chat, driven with the official openai SDK.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from aiohttp import web

from llmux.backends.process import free_port
from llmux.backends.sleep import BODY_EXCERPT, HttpSleepClient, SleepCallFailed
from tests.conftest import wait_until

SLEEPY = Path(__file__).parent / "sleepy.py"


@dataclass
class Sleepy:
    url: str
    proc: subprocess.Popen[bytes]

    def stats(self) -> dict[str, Any]:
        resp = httpx.get(self.url + "/_stats", timeout=10)
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def calls_since(self, seen: int) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = self.stats()["calls"][seen:]
        return calls

    def seen(self) -> int:
        return len(self.stats()["calls"])

    def chat(self, text: str = "hi", stream: bool = False) -> str:
        with openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0) as client:
            if stream:
                pieces = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": text}], stream=True
                )
                return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
            answer = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": text}]
            )
            return answer.choices[0].message.content or ""


def _call(method: str, path: str, query: str = "", body: Any = None) -> dict[str, Any]:
    return {"method": method, "path": path, "query": query, "body": body}


StartSleepy = Callable[..., Sleepy]


@pytest.fixture
def start_sleepy() -> Iterator[StartSleepy]:
    children: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> Sleepy:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(SLEEPY), "--port", str(port), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        children.append(proc)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, f"sleepy {flags} exited with {proc.returncode}"
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 30, "the stand-in to answer /health")
        return Sleepy(url, proc)

    yield start
    for proc in children:
        proc.kill()
        proc.wait()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[HttpSleepClient]:
    sleep_client = HttpSleepClient()
    yield sleep_client
    await sleep_client.close()


# --- vLLM: exact call sequences ---------------------------------------------------------


@pytest.mark.asyncio
async def test_vllm_level_1_sleep_and_wake_calls(
    start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    child = start_sleepy("--api", "vllm", "--name", "v1")
    assert "v1 pid" in child.chat()
    assert await client.is_sleeping(child.url) is False
    seen = child.seen()

    await client.sleep(child.url, "vllm", 1)
    assert child.calls_since(seen) == [_call("POST", "/sleep", "level=1")]
    stats = child.stats()
    assert (stats["state"], stats["level"]) == ("asleep", 1)
    assert await client.is_sleeping(child.url) is True
    with pytest.raises(openai.InternalServerError) as refused:  # 503: not served while asleep
        child.chat()
    assert refused.value.status_code == 503
    assert child.stats()["served_while_asleep"] == 1

    seen = child.seen()
    await client.wake(child.url, "vllm", 1)
    assert child.calls_since(seen) == [_call("POST", "/wake_up")]
    assert await client.is_sleeping(child.url) is False
    assert "v1 pid" in child.chat()
    assert "v1 pid" in child.chat(stream=True)
    assert child.stats()["counts"].get("collective_rpc") is None


@pytest.mark.asyncio
async def test_vllm_level_2_wake_reloads_the_weights(
    start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    child = start_sleepy("--api", "vllm", "--name", "v2")
    seen = child.seen()
    await client.sleep(child.url, "vllm", 2)
    await client.wake(child.url, "vllm", 2)
    assert child.calls_since(seen) == [
        _call("POST", "/sleep", "level=2"),  # in the query string: vLLM ignores a body's level
        _call("POST", "/wake_up"),
        _call("POST", "/collective_rpc", body={"method": "reload_weights"}),
        _call("POST", "/reset_prefix_cache"),
    ]
    assert "v2 pid" in child.chat()
    stats = child.stats()
    assert (stats["state"], stats["level"], stats["weights_loaded"]) == ("awake", 2, True)
    assert stats["served_without_weights"] == 0


@pytest.mark.asyncio
async def test_the_stand_in_catches_a_level_2_wake_without_reload(
    start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    """What the level-2 test relies on: /wake_up alone leaves the weights unloaded, and a
    level-1 wake sequence after a level-2 sleep is caught by the first request."""
    child = start_sleepy("--api", "vllm", "--name", "v2b")
    await client.sleep(child.url, "vllm", 2)
    await client.wake(child.url, "vllm", 1)  # the wrong sequence for this sleep
    with pytest.raises(openai.InternalServerError, match="weights not loaded"):
        child.chat()
    assert child.stats()["served_without_weights"] == 1


@pytest.mark.asyncio
async def test_a_sleep_call_returns_once_the_engine_sleeps(
    start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    child = start_sleepy("--name", "slow", "--sleep-delay", "0.3", "--wake-delay", "0.3")
    await client.sleep(child.url, "vllm", 1)
    assert child.stats()["state"] == "asleep"
    await client.wake(child.url, "vllm", 1)
    assert child.stats()["state"] == "awake"
    assert "slow pid" in child.chat()


@pytest.mark.asyncio
async def test_the_callers_deadline_cancels_a_call(
    start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    """The client has no deadline of its own: the caller's cancels the call at once, and the
    client goes on serving."""
    child = start_sleepy("--name", "late", "--wake-delay", "60")
    await client.sleep(child.url, "vllm", 1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.wake(child.url, "vllm", 1), 0.3)
    assert time.monotonic() - started < 10
    assert child.stats()["state"] == "waking"
    assert await client.is_sleeping(child.url) is True


# --- SGLang -------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("level", [1, 2])
async def test_sglang_release_and_resume(
    level: int, start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    child = start_sleepy("--api", "sglang", "--name", "sg")
    seen = child.seen()
    await client.sleep(child.url, "sglang", level)
    assert child.stats()["state"] == "asleep"
    with pytest.raises(openai.InternalServerError):
        child.chat()
    await client.wake(child.url, "sglang", level)
    assert child.calls_since(seen) == [
        _call("POST", "/release_memory_occupation", body={}),
        _call("POST", "/resume_memory_occupation", body={}),
    ]
    assert "sg pid" in child.chat()


# --- failures ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_refused_sleep_or_wake_raises_naming_the_call(
    start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    child = start_sleepy("--name", "bad", "--sleep-fail")
    with pytest.raises(SleepCallFailed) as failed:
        await client.sleep(child.url, "vllm", 2)
    assert failed.value.status == 500
    assert failed.value.call == "POST /sleep?level=2"
    assert str(failed.value).startswith("POST /sleep?level=2 answered 500: ")
    assert "sleep failed (--sleep-fail)" in str(failed.value)
    assert child.stats()["state"] == "awake"

    child = start_sleepy("--name", "groggy", "--wake-fail")
    await client.sleep(child.url, "vllm", 2)
    with pytest.raises(SleepCallFailed, match=r"^POST /wake_up answered 500: .*wake failed"):
        await client.wake(child.url, "vllm", 2)
    stats = child.stats()
    assert stats["state"] == "asleep"
    assert "collective_rpc" not in stats["counts"]  # no reload after a failed wake

    sglang = start_sleepy("--api", "sglang", "--name", "sgbad", "--wake-fail")
    await client.sleep(sglang.url, "sglang", 1)
    with pytest.raises(SleepCallFailed, match=r"^POST /resume_memory_occupation answered 500"):
        await client.wake(sglang.url, "sglang", 1)


@pytest.mark.asyncio
async def test_the_wrong_api_and_no_engine_raise(
    start_sleepy: StartSleepy, client: HttpSleepClient
) -> None:
    sglang = start_sleepy("--api", "sglang", "--name", "sg2")
    with pytest.raises(SleepCallFailed, match=r"^POST /sleep\?level=1 answered 404: Not Found"):
        await client.sleep(sglang.url, "vllm", 1)
    with pytest.raises(SleepCallFailed, match=r"^GET /is_sleeping answered 404"):
        await client.is_sleeping(sglang.url)
    with pytest.raises(SleepCallFailed, match=r"answered 400: .*not released"):
        await client.wake(sglang.url, "sglang", 1)  # SGLang refuses to resume what is awake

    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SleepCallFailed) as failed:
        await client.wake(nobody, "vllm", 1)
    assert failed.value.status is None
    assert str(failed.value).startswith("POST /wake_up failed: ClientConnectorError")

    with pytest.raises(ValueError, match="level must be 1 or 2"):
        await client.sleep(sglang.url, "vllm", 3)


@pytest_asyncio.fixture
async def odd_server() -> AsyncIterator[str]:
    """An engine that answers oddly: a long error body, a non-boolean is_sleeping."""

    async def long_error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="x" * 50 + "\n  " + "y" * 1000)

    async def not_bool(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": "yes"})

    app = web.Application()
    app.router.add_post("/sleep", long_error)
    app.router.add_get("/is_sleeping", not_bool)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.asyncio
async def test_odd_answers(odd_server: str, client: HttpSleepClient) -> None:
    with pytest.raises(SleepCallFailed) as failed:
        await client.sleep(odd_server, "vllm", 1)
    excerpt = str(failed.value).removeprefix("POST /sleep?level=1 answered 500: ")
    assert excerpt == ("x" * 50 + " " + "y" * 1000)[:BODY_EXCERPT]  # whitespace folded, cut
    with pytest.raises(
        SleepCallFailed, match=r"without a boolean is_sleeping: \{'is_sleeping': 'yes'\}"
    ):
        await client.is_sleeping(odd_server)


@pytest.mark.asyncio
async def test_one_client_serves_several_children_and_reopens_after_close(
    start_sleepy: StartSleepy,
) -> None:
    first = start_sleepy("--name", "a")
    second = start_sleepy("--api", "sglang", "--name", "b")
    client = HttpSleepClient()
    await client.sleep(first.url, "vllm", 1)
    await client.sleep(second.url, "sglang", 1)
    await client.close()
    await client.wake(first.url, "vllm", 1)  # a new session, made on use
    await client.wake(second.url, "sglang", 1)
    await client.close()
    await client.close()  # twice is fine
    assert [first.stats()["state"], second.stats()["state"]] == ["awake", "awake"]


# --- the stand-in's own hooks (the end-to-end tests lean on them) ---------------------------


def test_stand_in_wait_hold_and_marks(start_sleepy: StartSleepy, tmp_path: Path) -> None:
    child = start_sleepy("--name", "hooks", "--marks", str(tmp_path), "--announce", str(tmp_path))
    assert (tmp_path / "hooks.port").read_text() == child.url.rsplit(":", 1)[1]
    marks = json.loads((tmp_path / "hooks.json").read_text())
    assert (marks["state"], marks["pid"]) == ("awake", child.proc.pid)

    with httpx.Client(timeout=40) as http, ThreadPoolExecutor(1) as pool:
        held = pool.submit(child.chat, "hold")
        assert http.get(child.url + "/_wait", params={"held": 1}).status_code == 200
        assert not held.done()
        http.post(child.url + "/_release").raise_for_status()
        assert "hooks pid" in held.result(40)

        http.post(child.url + "/sleep", params={"level": 2}).raise_for_status()
        done = http.get(child.url + "/_wait", params={"state": "asleep", "sleep": 1})
        assert done.status_code == 200
        marks = json.loads((tmp_path / "hooks.json").read_text())
        assert (marks["state"], marks["level"], marks["counts"]) == ("asleep", 2, {"sleep": 1})
        assert http.get(child.url + "/_wait", params={"served": "x"}).status_code == 400
