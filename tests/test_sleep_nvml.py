"""Sleep with NVML (rules 10-12): the residual of a sleeping process is measured and learned
(and kept in ``learned.json`` with the model's load and wake times, for the next run), and a
wake waits for the device to show the memory free, as a load does.

The probe is ``tests.test_nvml.FakeGpu`` (this machine has no GPU); the children are real
processes (``tests/sleepy.py``, vLLM's sleep API); ``FakeGpu`` tells a child's use by its
``--name``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from llmux.config import Config
from llmux.scheduling.learned import FILE_NAME
from tests.conftest import TESTS
from tests.test_nvml import FakeGpu, app_client, chat, model, scheduler
from tests.test_process import wait_until

pytestmark = pytest.mark.slow


def sleepy_config(tmp: Path, budget: float, models: dict[str, dict[str, Any]]) -> Config:
    cmd = f"{sys.executable} {TESTS / 'sleepy.py'} --port ${{PORT}} --name"
    return Config.model_validate(
        {
            "server": {"state_dir": str(tmp / "state")},
            "gpu": {"vram_gb": budget, "reserve_gb": 0, "free_wait": 20},
            "host": {"ram_gb": 100},
            "models": {
                mid: {"type": "llm", "cmd": f"{cmd} {mid}", "stop_timeout": 5, **m}
                for mid, m in models.items()
            },
        }
    )


SLEEP = {"level": 1, "host_gb": 4, "residual_gb": 0.25}


@pytest.mark.asyncio
async def test_the_residual_is_learned_and_kept_with_load_and_wake_times(tmp_path: Path) -> None:
    config = sleepy_config(
        tmp_path, 6, {"a": {"vram_gb": 4, "sleep": SLEEP}, "b": {"vram_gb": 4, "sleep": SLEEP}}
    )
    gpu = FakeGpu(total=8, use={"a": 4.0, "b": 4.0})
    async with app_client(config, gpu) as (app, client):
        s = app.scheduler
        assert (await chat(client, "a")).status_code == 200
        # a's process now keeps 0.6 GB asleep (more than the 0.25 configured).
        gpu.use["a"] = 0.6
        assert (await chat(client, "b")).status_code == 200
        assert model(s, "a")["state"] == "sleeping"
        assert await wait_until(lambda: model(s, "a")["residual_gb"] == 0.6, 10)
        assert await wait_until(lambda: s.core.reserved_gb == pytest.approx(4.6), 10)
        gpu.use["a"] = 4.0
        assert (await chat(client, "a")).status_code == 200  # a wakes (b sleeps)
        assert model(s, "a")["state"] == "ready"
        rec = s.core.models["a"]
        assert rec.load_s is not None
        assert rec.wake_s is not None

    learned = json.loads((tmp_path / "state" / FILE_NAME).read_text())["models"]["a"]
    assert learned["residual_gb"] == 0.6
    assert learned["load_s"] == pytest.approx(rec.load_s, abs=1e-3)
    assert learned["wake_s"] == pytest.approx(rec.wake_s, abs=1e-3)
    # A fresh llmux on the same state directory starts from them.
    async with scheduler(config, FakeGpu(total=8)) as fresh:
        a = fresh.core.models["a"]
        assert a.residual_gb == 0.6
        assert a.load_s == pytest.approx(rec.load_s, abs=1e-3)
        assert a.wake_s == pytest.approx(rec.wake_s, abs=1e-3)


@pytest.mark.asyncio
async def test_a_wake_waits_for_the_device_to_show_the_memory_free(tmp_path: Path) -> None:
    config = sleepy_config(tmp_path, 10, {"a": {"vram_gb": 4, "sleep": SLEEP}})
    gpu = FakeGpu(total=10, use={"a": 4.0})
    async with app_client(config, gpu) as (app, client):
        s = app.scheduler
        assert (await chat(client, "a")).status_code == 200
        await s.sleep("a")
        # Another program holds the card: the wake (3.75 GB needed) must wait for it.
        gpu.free = 1.0
        reads = gpu.free_reads
        request = asyncio.create_task(chat(client, "a"))
        assert await wait_until(lambda: gpu.free_reads > reads + 2, 10)
        assert model(s, "a")["state"] == "waking"
        assert not request.done()
        gpu.free = 9.0
        assert (await request).status_code == 200
        assert model(s, "a")["state"] == "ready"
