"""SchedulerCore with sleeping models (DESIGN.md §3, rules 11-13), driven directly.

The rig, recorder and fake clock are test_core_stateful's: slow work (a load, a sleep, a wake, a
stop) finishes only when a test delivers the event that says so.
"""

from __future__ import annotations

from typing import Any

from llmux.scheduling.events import Reconfigure, Release, SleepFinished, WakeFinished
from llmux.scheduling.state import ModelState, StopReason
from tests.test_core_stateful import make_config, rig


def sleepy(
    gb: float,
    residual: float = 1.0,
    *,
    host: float | None = None,
    level: int = 1,
    type: str = "llm",
    **extra: Any,
) -> dict[str, Any]:
    """A model spec with ``sleep:``."""
    sleep: dict[str, Any] = {"level": level, "residual_gb": residual}
    if host is not None:
        sleep["host_gb"] = host
    return {"type": type, "vram_gb": gb, "sleep": sleep, **extra}


def test_a_wake_never_puts_the_host_budget_over() -> None:
    r = rig({"a": sleepy(6, host=6), "b": sleepy(6, host=6)}, host_budget_gb=10)
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")  # a sleeps for b: 6 of 10 GB of host memory
    r.send(SleepFinished("a", r.gen("a")))
    r.loaded("b")
    r.send(Release(hb))
    assert r.core.host_reserved_gb == 6
    # Waking a needs b's VRAM; b cannot sleep beside a's 6 GB (a wakes only once b's memory
    # is free): b must stop. Today b is doomed to sleep: 12 GB held of 10 (check_invariants).
    wa = r.acquire("a")
    assert r.rec.stops()[-1][0] == "b"
    assert r.core.host_reserved_gb == 6
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, 1)]
    r.send(WakeFinished("a", r.gen("a")))
    assert wa in r.rec.granted()


def test_a_sleeper_promised_a_wake_is_not_stopped_for_another_model() -> None:
    r = rig(
        {"a": sleepy(6), "b": {"type": "llm", "vram_gb": 6}, "c": {"type": "tts", "vram_gb": 5}}
    )
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    r.send(SleepFinished("a", r.gen("a")))
    r.loaded("b")  # b is busy
    wa = r.acquire("a")  # a's wake is promised what b frees once drained
    assert r.core.pending == {"a": 5}
    assert r.state("b") is ModelState.DRAINING
    wc = r.acquire("c")  # today: a (pending) is stopped for c, then the pump "starts" it
    assert r.state("a") is ModelState.SLEEPING
    r.send(Release(hb))
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, 1)]
    assert wc not in r.rec.rejected()
    assert wa not in r.rec.rejected()


def test_a_request_that_fits_only_if_a_sleepable_victim_stops_is_served() -> None:
    r = rig({"a": sleepy(6, 1.5), "big": {"type": "llm", "vram_gb": 9}})
    r.send(Release(r.ready("a")))
    want = r.acquire("big")  # today: 503 insufficient_vram "held by: nothing"
    assert want not in r.rec.rejected()
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    r.stopped("a")
    r.loaded("big")
    assert want in r.rec.granted()


def test_a_reload_that_removes_sleep_from_a_sleeping_model() -> None:
    models: dict[str, dict[str, Any]] = {"a": sleepy(6), "b": {"type": "llm", "vram_gb": 6}}
    r = rig(models)
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    r.send(SleepFinished("a", r.gen("a")))
    r.loaded("b")
    r.send(Release(hb))
    assert r.core.reserved_gb == 7
    models["a"] = {"type": "llm", "vram_gb": 6}
    r.send(Reconfigure(make_config(models), 10.0))
    assert r.core.reserved_gb == 7  # the sleeping process still holds its residual (rule 1)
    wa = r.acquire("a")
    for _ in range(4):  # stopped and loaded cold, or woken: either way it is served
        if wa in r.rec.granted():
            break
        if r.state("b") is ModelState.UNLOADING:
            r.stopped("b")
        elif r.state("a") is ModelState.UNLOADING:
            r.stopped("a")
        elif r.state("a") is ModelState.WAKING:
            r.send(WakeFinished("a", r.gen("a")))
        elif r.state("a") is ModelState.LOADING:
            r.loaded("a")
    assert wa in r.rec.granted()
