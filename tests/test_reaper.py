"""The process watchdog (llmux.backends.reaper) with real processes: nothing a model started
outlives llmux, whether llmux is SIGKILLed, stops normally, or unloads the model.

The model is tests/escaper.py, which leaves ``sleep`` processes behind in every way an engine
might: in its process group, in a group of its own, in a session of its own, daemonized, and
with an empty environment. A model that kept llmux's end of the watchdog's socket open would
keep the watchdog from ever noticing llmux's death: the SIGKILL tests cover that too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux.backends.base import LaunchSpec
from llmux.backends.process import ProcessLauncher
from llmux.backends.reaper import WATCHDOG_ENV, Watchdog
from tests.conftest import Server, StartServer, wait_until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the watchdog reads /proc (Linux only)"
)

HERE = Path(__file__).resolve().parent
ESCAPER = HERE / "escaper.py"
SRC = HERE.parent / "src"
PY = sys.executable
SLEEP = ["sleep", "1000"]
GONE_WITHIN = 15.0
"""Generous for a loaded machine: the watchdog acts within milliseconds of llmux's death."""


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by whoever adopted it) is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def stat_field(pid: int, index: int) -> int:
    """A numeric field of /proc/PID/stat, counted after the command name (0 is the state)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[index])


def watchdog_of(llmux_pid: int) -> int:
    """The pid of the watchdog process that ``llmux_pid`` started."""

    def find() -> int | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                comm = (entry / "comm").read_text().strip()
                parent = stat_field(int(entry.name), 1)
            except (OSError, ValueError):
                continue
            if comm == "llmux-watchdog" and parent == llmux_pid:
                return int(entry.name)
        return None

    pid: int = wait_until(find, 20, f"the watchdog of llmux {llmux_pid}")
    return pid


def escaper_cmd(pids: Path, *kinds: str) -> str:
    return f"{PY} {ESCAPER} --port ${{PORT}} --pids {pids} {' '.join(kinds)}"


def read_pids(path: Path) -> dict[str, int]:
    found: dict[str, int] = json.loads(wait_until(path.exists, 20, path.name) and path.read_text())
    return found


def assert_all_gone(pids: dict[str, int] | list[int], what: str) -> None:
    values = list(pids.values()) if isinstance(pids, dict) else pids
    wait_until(
        lambda: not any(is_alive(pid) for pid in values),
        GONE_WITHIN,
        f"{what}: {[pid for pid in values if is_alive(pid)]} to die",
    )


@pytest.fixture
def bystanders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Unrelated processes (ours, the test's): the watchdog must leave every one of them alone."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def start_bystanders(procs: list[subprocess.Popen[bytes]]) -> None:
    procs.append(subprocess.Popen(SLEEP))
    procs.append(subprocess.Popen(SLEEP, start_new_session=True))
    procs.append(subprocess.Popen(SLEEP, process_group=0))
    # Another llmux's token (not ours) must not count either.
    env = {**os.environ, WATCHDOG_ENV: "0123456789abcdef.1"}
    procs.append(subprocess.Popen(SLEEP, env=env, start_new_session=True))


def serve_escaper(
    start_server: StartServer, tmp_path: Path, *kinds: str, args: tuple[str, ...] = ()
) -> tuple[Server, Path]:
    pids = tmp_path / "pids.json"
    config = f"""
models:
  esc:
    type: llm
    vram_gb: 1
    cmd: {escaper_cmd(pids, *kinds)}
    stop_timeout: 5s
"""
    server = start_server(config, args=args)
    resp = server.post("/models/esc/load")
    assert resp.status_code == 200, resp.text
    return server, pids


# ------------------------------------------------------------------ a real `llmux serve`


def test_sigkill_of_llmux_kills_all_its_models_started(
    start_server: StartServer, tmp_path: Path, bystanders: list[subprocess.Popen[bytes]]
) -> None:
    start_bystanders(bystanders)
    kinds = ("group", "pgroup", "session", "daemon", "nested")
    json_logs = ("--log-format", "json")
    server, pids_file = serve_escaper(start_server, tmp_path, *kinds, args=json_logs)
    pids = read_pids(pids_file)
    watchdog = watchdog_of(server.proc.pid)
    assert stat_field(pids["pgroup"], 2) != pids["pid"]  # it did leave the group
    assert stat_field(pids["session"], 3) == pids["session"]  # and that one the session
    assert all(is_alive(pid) for pid in pids.values())
    start_bystanders(bystanders)  # some started after the model, too

    server.proc.kill()
    server.proc.wait()

    assert_all_gone(pids, "the model's processes")
    assert_all_gone([watchdog], "the watchdog")
    assert all(proc.poll() is None for proc in bystanders)
    # The watchdog logs as llmux did (here JSON), once it has killed them all.
    records = [json.loads(line) for line in server.log.read_text().splitlines() if line]
    gone = [r for r in records if r["logger"] == "llmux.watchdog"]
    assert len(gone) == 1
    assert gone[0]["level"] == "warning"
    message = gone[0]["msg"]
    assert message.startswith(f"llmux (pid {server.proc.pid}) is gone; killed what its models")
    # (the model's own process may be gone already: the parent-death signal is quicker)
    assert all(f"sleep ({pids[kind]})" in message for kind in kinds)


def test_sigterm_stops_everything_and_the_watchdog_exits(
    start_server: StartServer, tmp_path: Path, bystanders: list[subprocess.Popen[bytes]]
) -> None:
    start_bystanders(bystanders)
    server, pids_file = serve_escaper(
        start_server, tmp_path, "group", "pgroup", "session", "daemon"
    )
    pids = read_pids(pids_file)
    watchdog = watchdog_of(server.proc.pid)

    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises it after a clean stop

    assert_all_gone(pids, "the model's processes")
    assert_all_gone([watchdog], "the watchdog")
    assert all(proc.poll() is None for proc in bystanders)
    log = server.log.read_text()
    # The group kill took the model's group; the watchdog took the rest when it was reaped...
    escaped = [f"sleep ({pids[kind]})" for kind in ("pgroup", "session", "daemon")]
    assert all(name in log for name in escaped), log
    assert f"sleep ({pids['group']})" not in log
    # ...and found nothing left when llmux exited.
    assert "is gone; killed" not in log


def test_unload_kills_what_left_the_group(
    start_server: StartServer, tmp_path: Path, bystanders: list[subprocess.Popen[bytes]]
) -> None:
    start_bystanders(bystanders)
    server, pids_file = serve_escaper(
        start_server, tmp_path, "group", "pgroup", "session", "daemon"
    )
    pids = read_pids(pids_file)
    watchdog = watchdog_of(server.proc.pid)

    resp = server.post("/models/esc/unload")
    assert resp.status_code == 200, resp.text

    assert_all_gone(pids, "the model's processes")
    assert server.proc.poll() is None
    assert is_alive(watchdog)
    assert all(proc.poll() is None for proc in bystanders)
    # A second load is watched by the same watchdog.
    pids_file.unlink()
    assert server.post("/models/esc/load").status_code == 200
    again = read_pids(pids_file)
    assert watchdog_of(server.proc.pid) == watchdog
    server.proc.kill()
    server.proc.wait()
    assert_all_gone(again, "the second load's processes")


# ------------------------------------------------------------------ ProcessLauncher in this process


def escaper_spec(pids: Path, *kinds: str) -> LaunchSpec:
    argv = (PY, str(ESCAPER), "--port", "${PORT}", "--pids", str(pids), *kinds)
    return LaunchSpec(model_id="esc", argv=argv, ready_timeout=30)


@pytest.mark.asyncio
async def test_stop_kills_escapees_even_with_an_empty_environment(tmp_path: Path) -> None:
    """An escapee without our token whose parent dies is caught because the watchdog had seen
    it (``sync``: it has scanned since it was started)."""
    launcher = ProcessLauncher()
    pids_file = tmp_path / "pids.json"
    child = await launcher.launch(escaper_spec(pids_file, "clean", "nested", "session"))
    try:
        pids = read_pids(pids_file)
        assert await asyncio.to_thread(launcher.watchdog.sync)
        # Its parent is gone first: init adopts it before the watchdog looks again.
        os.kill(pids["pid"], signal.SIGKILL)
        assert await child.wait_exit() == -signal.SIGKILL
        assert_all_gone(pids, "the model's processes")
    finally:
        await child.stop(1)
        launcher.close()
    assert await asyncio.to_thread(launcher.watchdog.wait, 20) == 0


FAKE_LLMUX = """
import asyncio, json, sys
sys.path.insert(0, {src!r})
from llmux.backends.base import LaunchSpec
from llmux.backends.process import ProcessLauncher

async def main():
    launcher = ProcessLauncher()
    spec = LaunchSpec(model_id="esc", argv={argv!r}, ready_timeout=30)
    child = await launcher.launch(spec)
    assert await asyncio.to_thread(launcher.watchdog.sync)
    print(json.dumps({{"child": child.pid, "watchdog": launcher.watchdog.pid}}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_sigkill_of_the_parent_kills_tracked_escapees(
    tmp_path: Path, bystanders: list[subprocess.Popen[bytes]]
) -> None:
    """A stand-in for llmux (ProcessLauncher in a script of its own, default asyncio loop)."""
    start_bystanders(bystanders)
    pids_file = tmp_path / "pids.json"
    kinds = ("group", "pgroup", "session", "daemon", "nested", "clean")
    argv = escaper_spec(pids_file, *kinds).argv
    script = tmp_path / "fake_llmux.py"
    script.write_text(FAKE_LLMUX.format(src=str(SRC), argv=argv))
    parent = await asyncio.create_subprocess_exec(
        PY, str(script), stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    pids: dict[str, int] = {}
    try:
        assert parent.stdout is not None
        started = json.loads(await asyncio.wait_for(parent.stdout.readline(), 60))
        pids = read_pids(pids_file)
        assert started["child"] == pids["pid"]
        assert all(is_alive(pid) for pid in pids.values())
        parent.kill()
        await parent.wait()
        assert_all_gone(pids, "the model's processes")
        assert_all_gone([started["watchdog"]], "the watchdog")
        assert all(proc.poll() is None for proc in bystanders)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        for pid in pids.values():
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_a_killed_watchdog_is_replaced_and_told_every_child(tmp_path: Path) -> None:
    launcher = ProcessLauncher()
    first_file, second_file = tmp_path / "first.json", tmp_path / "second.json"
    first = await launcher.launch(escaper_spec(first_file, "session"))
    second = None
    try:
        old = launcher.watchdog.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not is_alive(old), 10, "the watchdog to die")
        second = await launcher.launch(escaper_spec(second_file, "session"))
        new = launcher.watchdog.pid
        assert new is not None
        assert new != old
        assert is_alive(new)
        # The new one was told about the first child too: once it exits, what it left goes.
        first_pids = read_pids(first_file)
        os.kill(first_pids["pid"], signal.SIGKILL)
        await first.wait_exit()
        assert_all_gone(first_pids, "the first model's processes")
        # Closing llmux's end is what llmux's death does: the second child and its own go.
        launcher.close()
        assert_all_gone(read_pids(second_file), "the second model's processes")
        assert await asyncio.to_thread(launcher.watchdog.wait, 20) == 0
    finally:
        await first.stop(1)
        if second is not None:
            await second.stop(1)
        launcher.close()


@pytest.mark.asyncio
async def test_a_dead_watchdog_is_replaced_at_once(tmp_path: Path) -> None:
    launcher = ProcessLauncher(watchdog=Watchdog(restart_after=0))
    pids_file = tmp_path / "pids.json"
    child = await launcher.launch(escaper_spec(pids_file, "session"))
    try:
        old = launcher.watchdog.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        deadline = asyncio.get_running_loop().time() + 20
        while launcher.watchdog.pid in (old, None):  # replaced by the event loop
            assert asyncio.get_running_loop().time() < deadline, "no new watchdog"
            await asyncio.sleep(0.02)
        # The new one was told about the child: once it exits, what it left goes too.
        pids = read_pids(pids_file)
        os.kill(pids["pid"], signal.SIGKILL)
        await child.wait_exit()
        assert_all_gone(pids, "the model's processes")
    finally:
        await child.stop(1)
        launcher.close()


def test_a_watchdog_with_nothing_registered_kills_nothing_and_exits(
    bystanders: list[subprocess.Popen[bytes]],
) -> None:
    start_bystanders(bystanders)
    watchdog = Watchdog()
    assert watchdog.token() is not None
    assert watchdog.sync()
    pid = watchdog.pid
    assert pid is not None
    assert stat_field(pid, 3) == pid  # its own session: a Ctrl-C of llmux's group spares it
    watchdog.close()
    assert watchdog.wait(20) == 0
    assert not watchdog.sync()
    assert all(proc.poll() is None for proc in bystanders)
