"""DESIGN rule 10, "measure when you can": with a GPU probe (NVML), a load starts only once the
device shows its memory free; each model's process is measured after it is ready and after
requests; the learned peak is its reservation and is kept in ``learned.json``.

The probe is a ``FakeGpu`` handed to the constructors (this machine has no GPU); the children are
real processes (``tests/upstream.py``). ``FakeGpu`` tells a child's use by the ``--name`` on its
command line, read from /proc. ``bench/gpu/check_nvml.py`` checks the same on a real GPU.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from llmux.api.app import LlmuxApp
from llmux.api.wire import Status
from llmux.backends.process import ProcessLauncher
from llmux.config import Config
from llmux.gpu import NvmlProbe, in_groups, open_probe, pgid_of
from llmux.launch import launch_spec
from llmux.scheduling.learned import FILE_NAME, LearnedStore
from llmux.scheduling.runtime import Scheduler
from llmux.scheduling.state import launch_fingerprint
from tests.conftest import upstream_cmd
from tests.test_process import wait_until

pytestmark = pytest.mark.slow


def name_of(pid: int) -> str | None:
    """The ``--name`` a tests/upstream.py child was started with."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"--name":
            return value.decode()
    return None


class FakeGpu:
    """A ``GpuProbe``: free memory is whatever the test sets; a process uses ``use[its name]``."""

    def __init__(self, total: float = 16.0, use: Mapping[str, float] | None = None) -> None:
        self.total = total
        self.free = total
        self.use = dict(use or {})
        self.free_reads = 0
        self.measured: list[int] = []
        """The pid of each process_gb call."""

    def total_gb(self) -> float:
        return self.total

    def free_gb(self) -> float:
        self.free_reads += 1
        return self.free

    def used_gb(self) -> float:
        return self.total - self.free

    def process_gb(self, pids: Collection[int]) -> float:
        self.measured.extend(pids)
        return sum(self.use.get(name_of(pid) or "", 0.0) for pid in pids)


def make_config(tmp: Path, budget: float, models: Mapping[str, Mapping[str, Any]]) -> Config:
    return Config.model_validate(
        {
            "server": {"state_dir": str(tmp / "state")},
            "gpu": {"vram_gb": budget, "reserve_gb": 0},
            "models": {
                mid: {"type": "llm", "cmd": upstream_cmd(tmp, mid), "stop_timeout": 5, **m}
                for mid, m in models.items()
            },
        }
    )


@asynccontextmanager
async def scheduler(config: Config, gpu: FakeGpu | None) -> AsyncIterator[Scheduler]:
    s = Scheduler(
        config,
        ProcessLauncher(),
        launch_spec=launch_spec,
        budget_gb=config.budget_gb(None),
        gpu=gpu,
    )
    await s.start()
    try:
        yield s
    finally:
        await s.shutdown(5)


@asynccontextmanager
async def app_client(
    config: Config, gpu: FakeGpu | None
) -> AsyncIterator[tuple[LlmuxApp, httpx.AsyncClient]]:
    app = LlmuxApp(config, ProcessLauncher(), budget_gb=config.budget_gb(None), gpu=gpu)
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://llmux") as client:
            yield app, client
    finally:
        await app.shutdown()


def status_body(s: Scheduler) -> dict[str, Any]:
    """The /status body of ``s``."""
    return Status.from_snapshot(s.snapshot()).model_dump(mode="json")


def model(s: Scheduler, model_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in status_body(s)["models"] if m["id"] == model_id)
    return found


async def chat(client: httpx.AsyncClient, model_id: str) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


# ---------------------------------------------------------------- waiting for free memory


@pytest.mark.asyncio
async def test_a_load_starts_only_once_the_gpu_shows_the_memory_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "llmux.scheduler")
    config = make_config(tmp_path, 4, {"a": {"vram_gb": 3}, "b": {"vram_gb": 3}})
    gpu = FakeGpu(total=4)
    async with scheduler(config, gpu) as s:
        s.release(await s.acquire("a"))
        gpu.free = 1.0  # a's memory is still shown in use after its process is gone
        want_b = asyncio.ensure_future(s.acquire("b"))
        assert await wait_until(lambda: model(s, "a")["state"] == "unloaded", 10)
        assert model(s, "b")["state"] == "loading"
        reads = gpu.free_reads
        assert await wait_until(lambda: gpu.free_reads >= reads + 3, 10)  # still asking
        assert not (tmp_path / "b.port").exists(), "b's process started before the memory"
        assert not want_b.done()
        gpu.free = 4.0
        lease = await asyncio.wait_for(want_b, 20)
        assert (tmp_path / "b.port").exists()
        s.release(lease)
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gpu_wait")]
    assert len(waits) == 1, waits  # logged once, for b only (a found its memory free)
    assert "model=b" in waits[0]


@pytest.mark.asyncio
async def test_free_memory_that_never_shows_fails_the_load_and_the_next_request_retries(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, 4, {"a": {"vram_gb": 3}})
    config = config.model_copy(update={"gpu": config.gpu.model_copy(update={"free_wait": 0.3})})
    gpu = FakeGpu(total=4)
    gpu.free = 1.0  # another process holds the card
    async with app_client(config, gpu) as (_app, client):
        resp = await chat(client, "a")
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "1.00 GB free" in error["message"]
        assert "needs 3 GB" in error["message"]
        assert not (tmp_path / "a.port").exists()
        status = (await client.get("/status")).json()
        (a,) = status["models"]
        assert (a["state"], a["pid"]) == ("unloaded", None)
        assert "gpu.free_wait" in a["last_error"]
        assert status["vram"]["reserved_gb"] == 0
        gpu.free = 4.0
        resp = await chat(client, "a")
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "a got a"


@pytest.mark.asyncio
async def test_a_model_on_the_cpu_or_of_0_gb_does_not_wait(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        4,
        {
            "big": {"vram_gb": 4},
            "zero": {"vram_gb": 0},
            "voice": {
                "type": "tts",
                "vram_gb": 1,
                "cpu_fallback": {"cmd": upstream_cmd(tmp_path, "voice-cpu")},
            },
        },
    )
    gpu = FakeGpu(total=4)
    async with scheduler(config, gpu) as s:
        held = await s.acquire("big")
        gpu.free = 0.0
        reads = gpu.free_reads
        s.release(await asyncio.wait_for(s.acquire("zero"), 20))
        s.release(await asyncio.wait_for(s.acquire("voice"), 20))  # the GPU is full: on the CPU
        assert model(s, "voice")["placement"] == "cpu"
        assert gpu.free_reads == reads
        s.release(held)


# ---------------------------------------------------------------- measuring and learning


@pytest.mark.asyncio
async def test_measured_use_becomes_the_reservation_and_is_kept(tmp_path: Path) -> None:
    config = make_config(tmp_path, 5, {"a": {"vram_gb": 2}, "b": {"vram_gb": 2}})
    gpu = FakeGpu(total=8, use={"a": 3.5, "b": 1.0})
    gpu.free = 6.0
    async with app_client(config, gpu) as (app, client):
        s = app.scheduler
        assert (await chat(client, "a")).status_code == 200
        # Measured once it is ready: the reservation is the measured use.
        assert await wait_until(lambda: model(s, "a")["measured_gb"] == 3.5, 10)
        status = (await client.get("/status")).json()
        assert status["vram"]["measured_gb"] == 2.0  # NVML's used memory of the whole device
        assert status["vram"]["reserved_gb"] == 3.5
        (a,) = [m for m in status["models"] if m["id"] == "a"]
        assert a["vram_gb"] == 3.5
        metrics = (await client.get("/metrics")).text
        assert 'llmux_model_vram_measured_bytes{model="a"} 3.5e+09' in metrics
        assert 'llmux_model_vram_measured_bytes{model="b"}' not in metrics  # not loaded
        # It uses more after a request: measured again after it (within a second).
        gpu.use["a"] = 4.0
        assert (await chat(client, "a")).status_code == 200
        assert await wait_until(lambda: model(s, "a")["vram_gb"] == 4.0, 10)
        # 2 + 2 would fit the 5 GB budget; 4 + 2 does not: a request for b evicts a.
        assert (await chat(client, "b")).status_code == 200
        assert model(s, "a")["state"] == "unloaded"
        assert model(s, "a")["measured_gb"] is None  # no process, nothing measured
        assert model(s, "a")["vram_gb"] == 4.0  # the learned peak stays
        assert await wait_until(lambda: model(s, "b")["measured_gb"] == 1.0, 10)
        assert model(s, "b")["vram_gb"] == 2.0  # less than configured: configured holds

    learned = json.loads((tmp_path / "state" / FILE_NAME).read_text())
    assert learned["models"]["a"]["gb"] == 4.0
    assert learned["models"]["a"]["fingerprint"] == launch_fingerprint(config.models["a"])
    assert learned["models"]["a"]["launch"] == config.models["a"].cmd
    assert learned["models"]["b"]["gb"] == 1.0
    # A fresh llmux on the same state directory starts from the learned peak.
    async with scheduler(config, FakeGpu(total=8)) as s:
        assert model(s, "a")["vram_gb"] == 4.0
        assert model(s, "a")["measured_gb"] is None
        assert status_body(s)["vram"]["reserved_gb"] == 0


@pytest.mark.asyncio
async def test_measurements_after_requests_are_throttled_but_the_last_one_comes(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, 4, {"a": {"vram_gb": 1}})
    gpu = FakeGpu(total=4, use={"a": 1.5})
    async with scheduler(config, gpu) as s:
        s.release(await s.acquire("a"))
        assert await wait_until(lambda: model(s, "a")["measured_gb"] == 1.5, 10)
        gpu.use["a"] = 2.5
        for _ in range(50):
            s.release(await s.acquire("a"))
        assert len(gpu.measured) <= 2
        # The burst's last release is measured when the second is up.
        assert await wait_until(lambda: model(s, "a")["vram_gb"] == 2.5, 10)
        assert len(gpu.measured) == 2


def _write_learned(tmp: Path, config: Config, model_id: str, gb: float) -> None:
    store = LearnedStore(tmp / "state")
    assert store.record(model_id, config.models[model_id], gb)


@pytest.mark.asyncio
async def test_a_learned_peak_counts_only_for_the_launch_it_was_measured_for(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, 8, {"a": {"vram_gb": 2}})
    _write_learned(tmp_path, config, "a", 3.0)
    async with scheduler(config, FakeGpu()) as s:
        assert model(s, "a")["vram_gb"] == 3.0
    changed = make_config(tmp_path, 8, {"a": {"vram_gb": 2, "env": {"CUDA_VISIBLE_DEVICES": "1"}}})
    async with scheduler(changed, FakeGpu()) as s:
        assert model(s, "a")["vram_gb"] == 2.0  # started differently: not what was measured
    async with scheduler(config, None) as s:
        assert model(s, "a")["vram_gb"] == 2.0  # without NVML nothing learned is used


@pytest.mark.asyncio
async def test_reload_seeds_added_models_and_forgets_changed_ones(tmp_path: Path) -> None:
    both = make_config(tmp_path, 8, {"a": {"vram_gb": 2}, "b": {"vram_gb": 2}})
    _write_learned(tmp_path, both, "b", 3.0)
    only_a = make_config(tmp_path, 8, {"a": {"vram_gb": 2}})
    async with scheduler(only_a, FakeGpu()) as s:
        s.reconfigure(both, 8)  # b is added: it starts from its learned peak
        assert model(s, "b")["vram_gb"] == 3.0
        new_b = {"vram_gb": 2, "cmd": upstream_cmd(tmp_path, "b", "--ready-delay 0.1")}
        s.reconfigure(make_config(tmp_path, 8, {"a": {"vram_gb": 2}, "b": new_b}), 8)
        assert model(s, "b")["vram_gb"] == 2.0


@pytest.mark.asyncio
async def test_a_corrupt_learned_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, 8, {"a": {"vram_gb": 2}})
    path = tmp_path / "state" / FILE_NAME
    path.parent.mkdir()
    path.write_text('{"models": {"a": {"gb": "lots"')
    with caplog.at_level(logging.WARNING, "llmux.scheduler"):
        async with scheduler(config, FakeGpu(use={"a": 2.5})) as s:
            assert model(s, "a")["vram_gb"] == 2.0
            s.release(await s.acquire("a"))
            assert await wait_until(lambda: model(s, "a")["vram_gb"] == 2.5, 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"ignoring learned peaks in {path}" in w for w in warnings), warnings
    # The next rise replaced it with a valid file.
    assert json.loads(path.read_text())["models"]["a"]["gb"] == 2.5


@pytest.mark.asyncio
async def test_without_a_probe_nothing_is_measured_or_written(tmp_path: Path) -> None:
    config = make_config(tmp_path, 4, {"a": {"vram_gb": 1}})
    async with app_client(config, None) as (_app, client):
        assert (await chat(client, "a")).status_code == 200
        status = (await client.get("/status")).json()
        assert status["vram"]["measured_gb"] is None
        assert status["models"][0]["measured_gb"] is None
        assert status["models"][0]["state"] == "ready"
        assert "llmux_model_vram_measured_bytes{" not in (await client.get("/metrics")).text
    assert not (tmp_path / "state").exists()


# ---------------------------------------------------------------- the NVML side, without a GPU


def test_process_groups_from_this_machines_proc() -> None:
    me = os.getpid()
    assert pgid_of(me) == os.getpgrp()
    script = (
        "import subprocess, time\n"
        "helper = subprocess.Popen(['sleep', '60'])\n"
        "print(helper.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert leader.stdout is not None
        helper = int(leader.stdout.readline())
        assert pgid_of(leader.pid) == leader.pid  # its own group, as llmux starts children
        assert pgid_of(helper) == leader.pid
        gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
        assert pgid_of(gone) is None
        assert in_groups([me, leader.pid, helper, gone], [leader.pid]) == {leader.pid, helper}
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        if leader.stdout is not None:
            leader.stdout.close()


def test_pgid_of_reads_a_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "stat").write_text("123 (my (odd) name) S 1 77 77 0 -1 4194560 0\n")
    assert pgid_of(123, proc=tmp_path) == 77
    (tmp_path / "124").mkdir()
    (tmp_path / "124" / "stat").write_text("124 (cut")
    assert pgid_of(124, proc=tmp_path) is None


class FakeNvml:
    """The few pynvml calls NvmlProbe makes, answering like NVML would."""

    class NVMLError(Exception):
        pass

    def __init__(self, compute: list[tuple[int, int | None]], graphics: Any) -> None:
        self.compute = compute
        self.graphics = graphics
        self.shutdowns = 0

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> SimpleNamespace:
        return SimpleNamespace(total=16e9, free=10e9, used=6e9)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: object) -> list[SimpleNamespace]:
        if isinstance(self.graphics, Exception):
            raise self.graphics
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.graphics]

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1


def test_nvml_probe_counts_a_childs_process_group_once() -> None:
    me, parent = os.getpid(), os.getppid()
    group = os.getpgrp()
    nvml = FakeNvml(
        compute=[(me, 2_000_000_000), (parent, 5_000_000_000), (12_345_678, None)],
        graphics=[(me, 2_000_000_000), (4_000_000, 2**64 - 1)],
    )
    probe = NvmlProbe(nvml, handle=object())
    assert (probe.total_gb(), probe.free_gb(), probe.used_gb()) == (16.0, 10.0, 6.0)
    assert probe.processes() == {
        me: 2_000_000_000,
        parent: 5_000_000_000,
        12_345_678: 0,
        4_000_000: 0,
    }
    # This process is found by its group (listed twice: counted once).
    assert probe.process_gb([group]) == (5.0 + 2.0 if pgid_of(parent) == group else 2.0)
    assert probe.process_gb([me]) == 2.0
    assert probe.process_gb([]) == 0.0
    nvml.graphics = FakeNvml.NVMLError("not supported")
    assert probe.process_gb([me]) == 2.0
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1


def test_open_probe_is_none_without_nvml() -> None:
    probe = open_probe()
    if probe is not None:
        probe.close()
        pytest.skip("this machine has a GPU that NVML can read")
    assert probe is None
