"""ProcessLauncher against real child processes (tests/upstream.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from llmux.backends.base import Child, Launcher, LaunchFailed, LaunchSpec
from llmux.backends.process import ProcessChild, ProcessLauncher

HERE = Path(__file__).resolve().parent
UPSTREAM = str(HERE / "upstream.py")
SRC = str(HERE.parent / "src")
PY = sys.executable


def upstream_spec(*args: str, model_id: str = "m1", **kwargs: Any) -> LaunchSpec:
    argv = (PY, UPSTREAM, "--port", "${PORT}", *args)
    return LaunchSpec(model_id=model_id, argv=argv, **kwargs)


def python_spec(code: str, **kwargs: Any) -> LaunchSpec:
    return LaunchSpec(model_id="py", argv=(PY, "-c", code), **kwargs)


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by whoever adopted it) is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` (for state outside this process that sends no event) for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def pid_from_log(lines: list[str]) -> int:
    for line in lines:
        if line.startswith("upstream ") and " pid " in line:
            return int(line.split(" pid ")[1].split()[0])
    raise AssertionError(f"no pid line in {lines!r}")


class Children:
    """Launches through a ProcessLauncher and stops everything at teardown."""

    def __init__(self, launcher: ProcessLauncher) -> None:
        self.launcher = launcher
        self.started: list[ProcessChild] = []
        self.stray_pids: list[int] = []

    async def launch(self, spec: LaunchSpec) -> ProcessChild:
        child = await self.launcher.launch(spec)
        self.started.append(child)
        return child

    async def close(self) -> None:
        for child in self.started:
            await child.stop(0.5)
        for pid in self.stray_pids:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.launcher.close()
        assert await asyncio.to_thread(self.launcher.watchdog.wait, 20) in (0, None)


@pytest_asyncio.fixture
async def children() -> AsyncIterator[Children]:
    kids = Children(ProcessLauncher())
    try:
        yield kids
    finally:
        await kids.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def chat(
    http: aiohttp.ClientSession, child: Child, content: str, **extra: Any
) -> dict[str, Any]:
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": content}], **extra}
    async with http.post(f"{child.base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


async def stats(http: aiohttp.ClientSession, child: Child, path: str = "/_stats") -> dict[str, Any]:
    async with http.get(child.base_url + path) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


# ---------------------------------------------------------------- launch and stop


def test_process_launcher_is_a_launcher() -> None:
    launcher: Launcher = ProcessLauncher()
    assert launcher is not None


@pytest.mark.asyncio
async def test_start_ready_and_serving(children: Children, http: aiohttp.ClientSession) -> None:
    child = await children.launch(upstream_spec("--name=up1", "--ready-delay", "0.3"))
    assert child.model_id == "m1"
    assert child.base_url == f"http://127.0.0.1:{child.port}"
    assert child.returncode is None
    assert is_alive(child.pid)
    async with http.get(child.base_url + "/health") as resp:
        assert resp.status == 200
    reply = await chat(http, child, "hi")
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == "up1 got gpt-x"
    assert (await stats(http, child))["pid"] == child.pid
    assert any(line.startswith("upstream up1 pid") for line in child.log_tail())


@pytest.mark.asyncio
async def test_port_is_filled_inside_an_argument(children: Children) -> None:
    spec = LaunchSpec(model_id="m1", argv=(PY, UPSTREAM, "--port=${PORT}"))
    child = await children.launch(spec)
    assert f"port {child.port}" in "\n".join(child.log_tail())


@pytest.mark.asyncio
async def test_graceful_stop(children: Children) -> None:
    child = await children.launch(upstream_spec())
    code = await child.stop(5.0)
    # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught
    assert code in (0, -signal.SIGTERM)
    assert child.returncode == code
    assert not is_alive(child.pid)
    assert await child.stop(5.0) == code  # idempotent
    assert await child.wait_exit() == code


@pytest.mark.asyncio
async def test_stop_kills_a_child_that_ignores_sigterm(children: Children) -> None:
    child = await children.launch(upstream_spec("--ignore-sigterm"))
    started = time.monotonic()
    code = await child.stop(0.5)
    assert time.monotonic() - started >= 0.5
    assert code == -signal.SIGKILL
    assert not is_alive(child.pid)


@pytest.mark.asyncio
async def test_stop_kills_the_whole_group(children: Children, http: aiohttp.ClientSession) -> None:
    child = await children.launch(upstream_spec("--spawn-grandchild"))
    grandchild = (await stats(http, child))["grandchild_pid"]
    children.stray_pids.append(grandchild)
    assert is_alive(grandchild)
    await child.stop(5.0)
    # The grandchild was SIGKILLed before stop returned; only its reaping by init is async.
    assert await wait_until(lambda: not is_alive(grandchild))


@pytest.mark.asyncio
async def test_concurrent_waiters_and_stops_agree(children: Children) -> None:
    child = await children.launch(upstream_spec("--ignore-sigterm"))
    results = await asyncio.gather(
        child.wait_exit(), child.wait_exit(), child.stop(0.2), child.stop(0.2)
    )
    assert list(results) == [-signal.SIGKILL] * 4


# ---------------------------------------------------------------- crashes


@pytest.mark.asyncio
async def test_crash_resolves_wait_exit(children: Children, http: aiohttp.ClientSession) -> None:
    child = await children.launch(upstream_spec())
    waiter = asyncio.ensure_future(child.wait_exit())
    body = {"model": "m", "messages": [{"role": "user", "content": "crash"}]}
    with pytest.raises(aiohttp.ClientError):
        async with http.post(f"{child.base_url}/v1/chat/completions", json=body) as resp:
            await resp.read()
    assert await asyncio.wait_for(waiter, 10) == 1
    assert child.returncode == 1
    assert await child.stop(1.0) == 1  # stop after a crash just reports it


@pytest.mark.asyncio
async def test_crash_mid_stream(children: Children, http: aiohttp.ClientSession) -> None:
    child = await children.launch(upstream_spec())
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "crash"}]}
    events: list[bytes] = []

    async def read_stream() -> None:
        async with http.post(f"{child.base_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line)

    with pytest.raises(aiohttp.ClientError):
        await read_stream()
    assert len(events) == 2
    assert await asyncio.wait_for(child.wait_exit(), 10) == 1


@pytest.mark.asyncio
async def test_crash_takes_grandchild_and_is_not_hidden_by_it(
    children: Children, http: aiohttp.ClientSession
) -> None:
    """The grandchild holds the output pipe open; the exit must still be seen at once."""
    child = await children.launch(upstream_spec("--spawn-grandchild"))
    grandchild = (await stats(http, child))["grandchild_pid"]
    children.stray_pids.append(grandchild)
    body = {"model": "m", "messages": [{"role": "user", "content": "crash"}]}
    with pytest.raises(aiohttp.ClientError):
        async with http.post(f"{child.base_url}/v1/chat/completions", json=body) as resp:
            await resp.read()
    assert await asyncio.wait_for(child.wait_exit(), 5) == 1
    assert await wait_until(lambda: not is_alive(grandchild))


# ---------------------------------------------------------------- failed starts


@pytest.mark.asyncio
async def test_exit_during_start_reports_output() -> None:
    with pytest.raises(LaunchFailed) as info:
        await ProcessLauncher().launch(upstream_spec("--exit-at-start", "3"))
    assert "exited with status 3 during start" in info.value.message
    assert any("boom" in line for line in info.value.log_tail)
    assert "boom: failing on purpose" in info.value.describe()


@pytest.mark.asyncio
async def test_missing_executable() -> None:
    spec = LaunchSpec(
        model_id="ghost", argv=("/nonexistent/llmux-no-such-engine", "--port=${PORT}")
    )
    with pytest.raises(LaunchFailed) as info:
        await ProcessLauncher().launch(spec)
    assert "No such file" in info.value.message
    assert "/nonexistent/llmux-no-such-engine" in info.value.message


@pytest.mark.asyncio
async def test_never_ready_times_out_and_kills() -> None:
    started = time.monotonic()
    with pytest.raises(LaunchFailed) as info:
        await ProcessLauncher().launch(upstream_spec("--never-ready", ready_timeout=1.0))
    assert time.monotonic() - started >= 1.0
    assert "not ready after 1 s" in info.value.message
    assert not is_alive(pid_from_log(info.value.log_tail))


@pytest.mark.asyncio
async def test_cancel_during_launch_kills_the_child() -> None:
    spawned = asyncio.Event()
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if record.getMessage().startswith("[m1] upstream upstream pid"):
                spawned.set()

    logger = logging.getLogger("test_process.cancel")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = Capture()
    logger.addHandler(handler)
    try:
        launcher = ProcessLauncher(logger=logger)
        task = asyncio.ensure_future(launcher.launch(upstream_spec("--never-ready")))
        await asyncio.wait_for(spawned.wait(), 15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        logger.removeHandler(handler)
    pid = pid_from_log([line.split("] ", 1)[1] for line in lines if "] " in line])
    assert not is_alive(pid)


@pytest.mark.asyncio
async def test_output_tail_env_and_line_handling() -> None:
    code = (
        "import os, sys\n"
        "for i in range(100): print(i)\n"
        "print('progress 10%\\rprogress 100%')\n"
        "print(os.environ['LLMUX_TEST_VALUE'])\n"
        "sys.stdout.buffer.write(b'bad \\xff byte\\n')\n"
        "sys.stdout.write('no newline at the end')\n"
        "sys.exit(2)\n"
    )
    spec = python_spec(code, env={"LLMUX_TEST_VALUE": "from-spec"})
    with pytest.raises(LaunchFailed) as info:
        await ProcessLauncher(log_lines=5).launch(spec)
    assert "exited with status 2" in info.value.message
    assert info.value.log_tail == [
        "99",
        "progress 100%",
        "from-spec",
        "bad \ufffd byte",
        "no newline at the end",
    ]


# ---------------------------------------------------------------- parent death

PARENT_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {src!r})
from llmux.backends.base import LaunchSpec
from llmux.backends.process import ProcessLauncher

async def main():
    spec = LaunchSpec(model_id="orphan", argv=({py!r}, {upstream!r}, "--port", "${{PORT}}"))
    child = await ProcessLauncher().launch(spec)
    print(child.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(src=SRC, py=PY, upstream=UPSTREAM))
    parent = await asyncio.create_subprocess_exec(
        PY, str(script), stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    child_pid = 0
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 20)
        child_pid = int(line)
        assert is_alive(child_pid)
        parent.kill()
        await parent.wait()
        assert await wait_until(lambda: not is_alive(child_pid))
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if child_pid and is_alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


# ---------------------------------------------------------------- the upstream test server


@pytest.mark.asyncio
async def test_upstream_hold_cancel_and_release(
    children: Children, http: aiohttp.ClientSession
) -> None:
    child = await children.launch(upstream_spec("--name=h"))
    url = f"{child.base_url}/v1/chat/completions"
    hold = {"model": "m", "messages": [{"role": "user", "content": "hold"}]}

    # non-stream hold, then the client goes away
    request = asyncio.ensure_future(http.post(url, json=hold))
    assert (await stats(http, child, "/_wait?held=1"))["held"] == 1
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert (await stats(http, child, "/_wait?cancelled=1"))["cancelled"] == 1

    # stream hold: one chunk first, then the client goes away
    resp = await http.post(url, json={**hold, "stream": True})
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    assert (await stats(http, child, "/_wait?held=2"))["held"] == 2
    resp.close()
    assert (await stats(http, child, "/_wait?cancelled=2"))["cancelled"] == 2

    # held requests finish normally once released
    plain = asyncio.ensure_future(chat(http, child, "hold"))
    streamed = await http.post(url, json={**hold, "stream": True})
    await stats(http, child, "/_wait?held=4")
    async with http.post(f"{child.base_url}/_release") as released:
        assert released.status == 200
    assert (await plain)["choices"][0]["message"]["content"] == "h got gpt-x"
    body = (await streamed.read()).decode()
    streamed.close()
    assert body.rstrip().endswith("data: [DONE]")
    assert body.count("chat.completion.chunk") == 3
    final = await stats(http, child)
    assert final["cancelled"] == 2
    assert final["requests"] == 4


@pytest.mark.asyncio
async def test_upstream_other_endpoints(children: Children, http: aiohttp.ClientSession) -> None:
    child = await children.launch(upstream_spec("--name=e"))
    base = child.base_url

    async with http.post(f"{base}/v1/completions", json={"model": "c", "prompt": "x"}) as resp:
        assert (await resp.json())["choices"][0]["text"] == "e got c"
    async with http.post(
        f"{base}/v1/completions", json={"model": "c", "prompt": "x", "stream": True}
    ) as resp:
        text = await resp.text()
        assert text.count("text_completion") == 3
        assert text.rstrip().endswith("data: [DONE]")

    async with http.post(f"{base}/v1/embeddings", json={"model": "v", "input": ["a", "b"]}) as resp:
        data = (await resp.json())["data"]
        assert [len(item["embedding"]) for item in data] == [8, 8]

    async with http.post(f"{base}/v1/audio/speech", json={"model": "t", "input": "hello"}) as resp:
        assert resp.headers["content-type"].startswith("audio/wav")
        chunks = [chunk async for chunk in resp.content.iter_any()]
        wav = b"".join(chunks)
    assert wav[:4] == b"RIFF"
    assert wav[8:12] == b"WAVE"
    assert len(wav) == 44 + 5 * 800 * 2
    speech = {"model": "t", "input": "hello", "response_format": "pcm"}
    async with http.post(f"{base}/v1/audio/speech", json=speech) as resp:
        assert len(await resp.read()) == 5 * 800 * 2

    form = aiohttp.FormData()
    form.add_field("file", b"\0" * 123, filename="a.wav", content_type="audio/wav")
    form.add_field("model", "w")
    async with http.post(f"{base}/v1/audio/transcriptions", data=form) as resp:
        assert await resp.json() == {"text": "e heard 123 bytes"}
    form = aiohttp.FormData()
    form.add_field("file", b"\0" * 7, filename="a.wav", content_type="audio/wav")
    form.add_field("model", "w")
    form.add_field("response_format", "text")
    async with http.post(f"{base}/v1/audio/translations", data=form) as resp:
        assert resp.headers["content-type"].startswith("text/plain")
        assert await resp.text() == "e heard 7 bytes"
