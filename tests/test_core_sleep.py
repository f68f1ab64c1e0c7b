"""SchedulerCore with sleeping models (DESIGN.md §3, rules 11-13), driven directly.

The rig, recorder and fake clock are test_core_stateful's: slow work (a load, a sleep, a wake, a
stop) finishes only when a test delivers the event that says so.
"""

from __future__ import annotations

from typing import Any

import pytest

from llmux.errors import CannotSleep, InsufficientVram, ModelNotFound
from llmux.scheduling.events import (
    LoadFinished,
    Measured,
    MeasuredResidual,
    Notice,
    ProcessExited,
    Reconfigure,
    Release,
    Replan,
    Shutdown,
    Sleep,
    SleepFinished,
    WakeFinished,
)
from llmux.scheduling.state import ModelState, StopReason, WaiterKind
from tests.test_core_stateful import Rig, make_config, rig

LLM6: dict[str, Any] = {"type": "llm", "vram_gb": 6}


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
    # is free): b must stop. It was doomed to sleep: 12 GB held of 10 (check_invariants).
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
    wc = r.acquire("c")  # a (pending) was stopped for c, then the pump "started" it
    assert r.state("a") is ModelState.SLEEPING
    r.send(Release(hb))
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, 1)]
    assert wc not in r.rec.rejected()
    assert wa not in r.rec.rejected()


def test_a_request_that_fits_only_if_a_sleepable_victim_stops_is_served() -> None:
    r = rig({"a": sleepy(6, 1.5), "big": {"type": "llm", "vram_gb": 9}})
    r.send(Release(r.ready("a")))
    want = r.acquire("big")  # it was a 503 insufficient_vram "held by: nothing"
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


# ---------------------------------------------------------------------------- helpers


def admin_sleep(r: Rig, model_id: str) -> int:
    rid = next(r.rids)
    r.send(Sleep(rid, model_id))
    return rid


def put_to_sleep(r: Rig, model_id: str) -> None:
    """Load ``model_id`` by a request, release it, sleep it (admin) and confirm the sleep."""
    r.send(Release(r.ready(model_id)))
    rid = admin_sleep(r, model_id)
    r.send(SleepFinished(model_id, r.gen(model_id)))
    assert rid in r.rec.answered()
    assert r.state(model_id) is ModelState.SLEEPING


def a_asleep_beside_b() -> Rig:
    """a (sleepy, 6 GB, 1 GB residual, 6 GB of host memory) asleep for b (6 GB), b idle."""
    r = rig({"a": sleepy(6), "b": LLM6})
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    r.send(SleepFinished("a", 1))
    r.loaded("b")
    r.send(Release(hb))
    assert r.core.reserved_gb == 7
    assert r.core.host_reserved_gb == 6
    return r


def calls_since(r: Rig, n: int) -> list[str]:
    return [c.name for c in r.rec.calls[n:] if c.name not in ("notify", "call_at")]


# ---------------------------------------------------------------------------- rule 11


def test_eviction_by_sleep_keeps_the_process_and_its_generation() -> None:
    r = rig({"a": sleepy(6), "b": LLM6})
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    assert r.rec.of("suspend") == [("a", 1, 1)]
    assert r.rec.stops() == []
    assert r.state("a") is ModelState.SUSPENDING
    assert r.core.reserved_gb == 6  # the whole reservation until the engine says it sleeps
    assert r.core.host_reserved_gb == 6  # host memory from the sleep sent
    assert r.core.pending == {"b": 6}
    assert ("a", "priority") in r.rec.notices(Notice.SLEEPING)
    assert r.rec.loads() == [("a", 1)]
    r.send(SleepFinished("a", 1))
    assert r.state("a") is ModelState.SLEEPING
    assert r.rec.loads() == [("a", 1), ("b", 1)]
    assert r.core.reserved_gb == 7  # a's residual + b
    r.loaded("b")
    assert hb in r.rec.granted()
    r.send(Release(hb))
    wa = r.acquire("a")
    assert r.core.pending == {"a": 5}  # a wake needs its reservation less its residual
    assert r.rec.stops() == [("b", 1, StopReason.PRIORITY)]  # b cannot sleep: it stops
    assert r.rec.of("wake") == []
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, 1)]
    assert r.state("a") is ModelState.WAKING
    assert r.core.reserved_gb == 6
    r.send(WakeFinished("a", 1))
    assert r.rec.of("grant")[-1] == (wa, "a", 1)  # the same process: no start_load
    assert r.rec.loads() == [("a", 1), ("b", 1)]
    assert r.core.host_reserved_gb == 0
    assert ("a", "waking") not in r.rec.notices(Notice.AWAKE)


@pytest.mark.parametrize("level", [1, 2])
def test_the_sleep_level_is_passed_to_suspend_and_wake(level: int) -> None:
    r = rig({"a": sleepy(6, level=level, host=4), "b": LLM6})
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    assert r.rec.of("suspend") == [("a", 1, level)]
    assert r.core.host_reserved_gb == (4 if level == 1 else 0)  # level 2 keeps nothing
    r.send(SleepFinished("a", 1))
    r.loaded("b")
    r.send(Release(hb))
    r.acquire("a")
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, level)]


def test_requests_while_a_model_goes_to_sleep_wait_and_wake_it() -> None:
    r = rig({"a": sleepy(6), "b": LLM6})
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    assert r.state("a") is ModelState.SUSPENDING
    wa = r.acquire("a")
    assert wa not in r.rec.granted()
    assert wa not in r.rec.rejected()
    assert r.core.queued("a") == 1
    assert r.rec.of("wake") == []
    assert r.rec.loads() == [("a", 1)]
    r.send(SleepFinished("a", 1))
    assert r.rec.loads()[-1] == ("b", 1)  # b was promised the memory first
    assert r.rec.of("wake") == []  # a waits for b's load (rule 4: a loading model is a "later")
    r.loaded("b")
    assert hb in r.rec.granted()
    assert r.state("b") is ModelState.DRAINING  # a's wake drains b (no patience: unmeasured)
    r.send(Release(hb))
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, 1)]
    r.send(WakeFinished("a", 1))
    assert wa in r.rec.granted()
    assert r.rec.loads() == [("a", 1), ("b", 1)]


def test_a_failed_sleep_stops_the_process_and_the_requester_gets_its_memory() -> None:
    r = rig({"a": sleepy(6), "b": LLM6})
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    r.send(SleepFinished("a", 1, error="POST /sleep: 500\nno sleep mode"))
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    assert r.state("a") is ModelState.UNLOADING
    assert r.core.reserved_gb == 6  # it never slept: all of it until the process is gone
    assert ("a", "POST /sleep: 500") in r.rec.notices(Notice.SLEEP_FAILED)
    assert r.core.models["a"].last_error is not None
    assert r.rec.loads() == [("a", 1)]
    r.stopped("a")
    assert r.rec.loads() == [("a", 1), ("b", 1)]
    assert r.core.host_reserved_gb == 0
    r.loaded("b")
    assert hb in r.rec.granted()


# ---------------------------------------------------------------------------- rule 12


def test_a_failed_wake_stops_the_process_and_its_waiters_get_a_cold_load() -> None:
    r = a_asleep_beside_b()
    waiters = [r.acquire("a") for _ in range(2)]
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, 1)]
    r.send(WakeFinished("a", 1, error="no answer within ready_timeout (30s)"))
    assert r.rec.stops()[-1] == ("a", 1, StopReason.PRIORITY)
    assert r.state("a") is ModelState.UNLOADING
    assert r.core.reserved_gb == 6  # a waking model holds its whole reservation
    assert r.core.host_reserved_gb == 6  # until the process is gone
    assert ("a", "no answer within ready_timeout (30s)") in r.rec.notices(Notice.WAKE_FAILED)
    assert r.rec.rejected() == {}
    assert r.core.queued("a") == 2
    r.stopped("a")
    assert r.rec.loads()[-1] == ("a", 2)  # a new process
    assert r.core.host_reserved_gb == 0
    r.loaded("a")
    assert sorted(r.rec.granted()[-2:]) == waiters
    assert r.rec.rejected() == {}


def test_a_wake_is_planned_like_a_load_and_one_wake_serves_every_waiter() -> None:
    r = a_asleep_beside_b()
    waiters = [r.acquire("a") for _ in range(3)]
    r.stopped("b")
    assert r.rec.of("wake") == [("a", 1, 1)]
    more = r.acquire("a")  # while waking: waits for the same wake
    assert r.rec.of("wake") == [("a", 1, 1)]
    r.send(WakeFinished("a", 1))
    assert sorted(r.rec.granted()[-4:]) == [*waiters, more]


def test_a_wake_that_fits_starts_at_once() -> None:
    r = rig({"a": sleepy(6), "b": {"type": "llm", "vram_gb": 3}})
    put_to_sleep(r, "a")
    r.send(Release(r.ready("b")))
    assert r.core.reserved_gb == 4
    wa = r.acquire("a")  # needs 5 of the 6 free
    assert r.rec.of("wake") == [("a", 1, 1)]
    assert r.rec.stops() == []
    r.send(WakeFinished("a", 1))
    assert wa in r.rec.granted()
    assert r.core.reserved_gb == 9


def test_a_crash_while_waking_serves_the_waiters_by_a_cold_load() -> None:
    r = a_asleep_beside_b()
    wa = r.acquire("a")
    r.stopped("b")
    r.send(ProcessExited("a", 1, returncode=-9, log_tail="killed"))
    assert r.rec.loads()[-1] == ("a", 2)
    assert r.core.host_reserved_gb == 0
    r.loaded("a")
    assert wa in r.rec.granted()
    assert r.rec.rejected() == {}


def test_a_crash_while_sleeping_frees_its_residual_and_host_memory() -> None:
    r = a_asleep_beside_b()
    r.send(ProcessExited("a", 1, returncode=1, log_tail="segfault"))
    assert r.state("a") is ModelState.UNLOADED
    assert r.core.reserved_gb == 6
    assert r.core.host_reserved_gb == 0
    assert r.core.models["a"].last_error is not None
    assert r.rec.stops() == []
    wa = r.acquire("a")  # a cold load now (b stops for it)
    r.stopped("b")
    assert r.rec.loads()[-1] == ("a", 2)
    assert r.rec.of("wake") == []
    r.loaded("a")
    assert wa in r.rec.granted()


def test_a_crash_while_going_to_sleep_lets_the_requester_in() -> None:
    r = rig({"a": sleepy(6), "b": LLM6})
    r.send(Release(r.ready("a")))
    hb = r.acquire("b")
    assert r.state("a") is ModelState.SUSPENDING
    r.send(ProcessExited("a", 1, returncode=-9))
    assert r.state("a") is ModelState.UNLOADED
    assert r.core.host_reserved_gb == 0
    assert r.rec.loads()[-1] == ("b", 1)
    r.loaded("b")
    assert hb in r.rec.granted()
    r.send(SleepFinished("a", 1))  # late: changes nothing
    assert r.state("a") is ModelState.UNLOADED


def test_stale_sleep_and_wake_events_change_nothing() -> None:
    r = a_asleep_beside_b()
    n = len(r.rec.calls)
    for ev in (
        SleepFinished("a", 0),
        WakeFinished("a", 0),
        WakeFinished("a", 1),  # not waking
        SleepFinished("a", 1),  # asleep already
        SleepFinished("b", 1),  # b never went to sleep
        MeasuredResidual("a", 3.0, generation=0),
    ):
        r.send(ev)
    assert r.rec.calls[n:] == []
    assert r.core.reserved_gb == 7


# ---------------------------------------------------------------------------- rule 13


@pytest.mark.parametrize("level", [1, 2])
def test_admin_sleep_of_an_idle_model_is_answered_once_it_sleeps(level: int) -> None:
    r = rig({"a": sleepy(6, level=level)})
    r.send(Release(r.ready("a")))
    rid = admin_sleep(r, "a")
    assert r.rec.of("suspend") == [("a", 1, level)]
    assert ("a", "admin") in r.rec.notices(Notice.SLEEPING)
    assert rid not in r.rec.answered()
    r.send(SleepFinished("a", 1))
    assert rid in r.rec.answered()
    assert r.core.reserved_gb == 1
    again = admin_sleep(r, "a")  # asleep already: answered at once
    assert again in r.rec.answered()
    assert len(r.rec.of("suspend")) == 1


def test_admin_sleep_without_sleep_config_or_unloaded_or_unknown_is_refused() -> None:
    r = rig({"a": sleepy(6), "b": {"type": "llm", "vram_gb": 2}})
    r.send(Release(r.ready("b")))
    no_config = admin_sleep(r, "b")
    unloaded = admin_sleep(r, "a")
    unknown = admin_sleep(r, "nope")
    rejected = r.rec.rejected()
    assert isinstance(rejected[no_config], CannotSleep)
    assert "no 'sleep:'" in rejected[no_config].message
    assert isinstance(rejected[unloaded], CannotSleep)
    assert "not loaded" in rejected[unloaded].message
    assert CannotSleep.status == 409
    assert CannotSleep.code == "cannot_sleep"
    assert isinstance(rejected[unknown], ModelNotFound)
    assert r.state("b") is ModelState.READY
    assert r.rec.of("suspend") == []


def test_admin_sleep_drains_a_busy_model_first() -> None:
    r = rig({"a": sleepy(6)})
    held = [r.ready("a"), r.acquire("a")]
    rid = admin_sleep(r, "a")
    assert r.state("a") is ModelState.DRAINING
    assert ("a", "admin") in r.rec.notices(Notice.DRAINING)
    assert r.rec.of("suspend") == []
    wa = r.acquire("a")  # a request for a model draining to sleep waits
    r.send(Release(held[0]))
    assert r.rec.of("suspend") == []
    r.send(Release(held[1]))
    assert r.rec.of("suspend") == [("a", 1, 1)]
    r.send(SleepFinished("a", 1))
    assert rid in r.rec.answered()
    assert r.rec.of("wake") == [("a", 1, 1)]  # the waiting request wakes it at once
    r.send(WakeFinished("a", 1))
    assert wa in r.rec.granted()


def test_admin_sleep_of_a_loading_model_waits_for_it_to_be_ready() -> None:
    r = rig({"a": sleepy(6)})
    wa = r.acquire("a")
    rid = admin_sleep(r, "a")
    assert r.rec.of("suspend") == []
    r.loaded("a")
    assert wa in r.rec.granted()  # its waiters are served first
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(wa))
    assert r.rec.of("suspend") == [("a", 1, 1)]
    r.send(SleepFinished("a", 1))
    assert rid in r.rec.answered()


def test_admin_sleep_of_a_waking_model_sleeps_it_once_awake() -> None:
    r = a_asleep_beside_b()
    wa = r.acquire("a")
    r.stopped("b")
    rid = admin_sleep(r, "a")
    r.send(WakeFinished("a", 1))
    assert wa in r.rec.granted()
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(wa))
    assert r.rec.of("suspend")[-1] == ("a", 1, 1)
    r.send(SleepFinished("a", 1))
    assert rid in r.rec.answered()


def test_admin_sleep_stops_an_older_sleeper_for_host_room() -> None:
    r = rig({"a": sleepy(2), "b": sleepy(2), "c": sleepy(2)}, host_budget_gb=5)
    put_to_sleep(r, "a")
    put_to_sleep(r, "b")  # 4 of 5 GB of host memory
    r.send(Release(r.ready("c")))
    rid = admin_sleep(r, "c")
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]  # the least recently used
    # c waits, idle and draining, for a's host memory: a still holds it until it is gone.
    assert r.state("c") is ModelState.DRAINING
    assert r.rec.of("suspend") == [("a", 1, 1), ("b", 1, 1)]
    assert r.core.host_reserved_gb == 4
    r.stopped("a")
    assert r.rec.of("suspend")[-1] == ("c", 1, 1)
    r.send(SleepFinished("c", 1))
    assert rid in r.rec.answered()
    assert r.core.host_reserved_gb == 4


def test_admin_sleep_without_host_room_is_refused_and_the_model_stays_ready() -> None:
    r = rig({"p": sleepy(2, host=4, type="asr"), "a": sleepy(2, host=4)}, host_budget_gb=6)
    put_to_sleep(r, "p")
    r.send(Release(r.ready("a")))
    rid = admin_sleep(r, "a")  # an llm may not stop an asr sleeper
    error = r.rec.rejected()[rid]
    assert isinstance(error, CannotSleep)
    assert "host" in error.message
    assert r.state("a") is ModelState.READY
    assert r.state("p") is ModelState.SLEEPING
    assert r.rec.stops() == []
    wa = r.acquire("a")  # still served
    assert wa in r.rec.granted()


def test_admin_unload_of_a_sleeping_model_stops_it() -> None:
    r = a_asleep_beside_b()
    rid = r.unload("a")
    assert r.rec.stops()[-1] == ("a", 1, StopReason.ADMIN)
    assert r.state("a") is ModelState.UNLOADING
    assert rid not in r.rec.answered()
    assert r.core.reserved_gb == 7  # it holds its residual until the process is gone
    assert r.core.host_reserved_gb == 6
    r.stopped("a")
    assert rid in r.rec.answered()
    assert r.core.reserved_gb == 6
    assert r.core.host_reserved_gb == 0


def test_admin_unload_of_a_model_draining_to_sleep_stops_it_and_refuses_the_sleep() -> None:
    r = rig({"a": sleepy(6)})
    held = r.ready("a")
    sleep_rid = admin_sleep(r, "a")
    unload_rid = r.unload("a")
    error = r.rec.rejected()[sleep_rid]
    assert isinstance(error, CannotSleep)
    assert r.core.host_reserved_gb == 0  # the promised host memory is given up
    r.send(Release(held))
    assert r.rec.of("suspend") == []
    assert r.rec.stops() == [("a", 1, StopReason.ADMIN)]
    r.stopped("a")
    assert unload_rid in r.rec.answered()


def test_admin_unload_of_a_model_going_to_sleep_stops_it_once_asleep() -> None:
    r = rig({"a": sleepy(6)})
    r.send(Release(r.ready("a")))
    sleep_rid = admin_sleep(r, "a")
    unload_rid = r.unload("a")
    assert r.rec.stops() == []
    r.send(SleepFinished("a", 1))
    assert sleep_rid in r.rec.answered()
    assert r.rec.stops() == [("a", 1, StopReason.ADMIN)]
    assert r.core.reserved_gb == 1
    r.stopped("a")
    assert unload_rid in r.rec.answered()
    assert r.core.reserved_gb == 0


# ---------------------------------------------------------------------------- host budget


def test_an_idle_victim_waits_for_the_host_memory_of_a_sleeper_being_stopped() -> None:
    r = rig({"a": sleepy(4), "b": sleepy(6), "c": {"type": "llm", "vram_gb": 8}}, host_budget_gb=9)
    put_to_sleep(r, "a")  # 1 GB of VRAM, 4 of host memory
    r.send(Release(r.ready("b")))
    assert r.core.reserved_gb == 7
    hc = r.acquire("c")
    # b sleeps (frees 5: 10 - 2 >= 8) but needs 6 GB of host memory beside a's 4 of 9: a stops.
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    assert r.state("b") is ModelState.DRAINING  # idle, waiting for a's host memory
    assert ("b", "priority") in r.rec.notices(Notice.DRAINING)
    assert r.rec.of("suspend") == [("a", 1, 1)]
    assert r.core.host_reserved_gb == 4
    r.stopped("a")
    assert r.rec.of("suspend")[-1] == ("b", 1, 1)
    assert r.core.host_reserved_gb == 6
    assert r.rec.loads()[-1] == ("b", 1)
    r.send(SleepFinished("b", 1))
    assert r.rec.loads()[-1] == ("c", 1)
    r.loaded("c")
    assert hc in r.rec.granted()
    assert r.core.reserved_gb == 9


def test_an_idle_victim_waiting_for_host_memory_stops_if_none_comes_back() -> None:
    models: dict[str, dict[str, Any]] = {
        "a": sleepy(4),
        "b": sleepy(6),
        "c": {"type": "llm", "vram_gb": 8},
    }
    r = rig(models, host_budget_gb=9)
    put_to_sleep(r, "a")
    r.send(Release(r.ready("b")))
    hc = r.acquire("c")
    assert r.state("b") is ModelState.DRAINING
    r.send(Reconfigure(make_config(models), 10.0, host_budget_gb=5))  # b's 6 never fit now
    assert r.state("b") is ModelState.DRAINING  # a still holds its 4 GB
    r.stopped("a")
    assert r.rec.stops()[-1] == ("b", 1, StopReason.PRIORITY)
    assert r.rec.of("suspend") == [("a", 1, 1)]
    r.stopped("b")
    r.loaded("c")
    assert hc in r.rec.granted()
    assert r.core.host_reserved_gb == 0


def test_sleepers_rotate_under_the_host_budget() -> None:
    """Three sleepy models, host room for one: whoever is evicted sleeps, the older sleeper
    stops; the host budget holds after every event (the rig checks it)."""
    models = {m: sleepy(6, host=6) for m in "abc"}
    r = rig(models, host_budget_gb=8)
    for mid in "ababcacb":
        rid = r.acquire(mid)
        for _ in range(6):
            if rid in r.rec.granted():
                break
            for other in "abc":
                if r.state(other) is ModelState.UNLOADING:
                    r.stopped(other)
                elif r.state(other) is ModelState.SUSPENDING:
                    r.send(SleepFinished(other, r.gen(other)))
                elif r.state(other) is ModelState.WAKING:
                    r.send(WakeFinished(other, r.gen(other)))
                elif r.state(other) is ModelState.LOADING:
                    r.loaded(other)
        assert rid in r.rec.granted()
        r.send(Release(rid))
        assert r.core.host_reserved_gb <= 8
    assert r.rec.of("wake"), "none came back by a wake"
    assert len(r.rec.of("suspend")) >= 4, r.rec.of("suspend")


# ---------------------------------------------------------------------------- tiers


def test_a_protected_model_is_never_put_to_sleep_or_stopped_for_an_llm() -> None:
    r = rig({"s": sleepy(6, type="asr"), "l": LLM6, "big": {"type": "llm", "vram_gb": 9.5}})
    r.send(Release(r.ready("s")))
    hl = r.acquire("l")
    assert isinstance(r.rec.rejected()[hl], InsufficientVram)
    assert r.rec.of("suspend") == []
    rid = admin_sleep(r, "s")
    r.send(SleepFinished("s", 1))
    assert rid in r.rec.answered()
    hbig = r.acquire("big")  # needs 9.5; the asr sleeper holds 1 it may not take
    error = r.rec.rejected()[hbig]
    assert isinstance(error, InsufficientVram)
    assert "s (1 GB)" in error.message
    assert r.rec.stops() == []
    hl = r.acquire("l")  # fits beside the sleeper
    r.loaded("l")
    assert hl in r.rec.granted()


def test_a_protected_request_may_stop_a_sleeper() -> None:
    r = rig({"a": sleepy(6), "s": {"type": "asr", "vram_gb": 9.5}})
    put_to_sleep(r, "a")
    hs = r.acquire("s")
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    r.stopped("a")
    r.loaded("s")
    assert hs in r.rec.granted()


# ---------------------------------------------------------------------------- swap patience


def test_swap_patience_drains_a_busy_victim_only_after_its_timer() -> None:
    r = rig({"a": LLM6, "b": LLM6}, swap_patience=2)
    ha = r.acquire("a")
    r.clock.advance(5)
    r.loaded("a")
    assert r.core.models["a"].load_s == 5
    hb = r.acquire("b")  # a is busy: swap cost (b's load 0 + a's reload 5) x 2 = 10 s
    assert r.state("a") is ModelState.READY
    assert r.rec.notices(Notice.DRAINING) == []
    replans = [(w, e) for w, e in r.rec.timers() if isinstance(e, Replan)]
    assert replans == [(r.clock.now + 10, Replan("b"))]
    r.acquire("b")
    r.clock.advance(4)
    h2 = r.acquire("a")  # a is still served meanwhile
    assert h2 in r.rec.granted()
    assert len([e for _, e in r.rec.timers() if isinstance(e, Replan)]) == 1  # one timer
    assert r.state("a") is ModelState.READY
    r.fire(Replan, model_id="b")
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(ha))
    r.send(Release(h2))
    r.stopped("a")
    r.loaded("b")
    assert hb in r.rec.granted()


def test_swap_patience_takes_an_idle_victim_at_once() -> None:
    r = rig({"a": LLM6, "b": LLM6}, swap_patience=2)
    ha = r.acquire("a")
    r.clock.advance(5)
    r.loaded("a")
    r.send(Release(ha))
    r.acquire("b")
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    assert [e for _, e in r.rec.timers() if isinstance(e, Replan)] == []


def test_swap_patience_counts_a_sleepable_victim_by_its_wake() -> None:
    r = rig({"a": sleepy(6), "b": LLM6}, swap_patience=2)
    # a: loaded in 20 s, once asleep woken in 1 s.
    ha = r.acquire("a")
    r.clock.advance(20)
    r.loaded("a")
    r.send(Release(ha))
    hb = r.acquire("b")
    r.send(SleepFinished("a", 1))
    r.loaded("b")
    r.send(Release(hb))
    wa = r.acquire("a")
    r.stopped("b")
    r.clock.advance(1)
    r.send(WakeFinished("a", 1))
    assert r.core.models["a"].wake_s == 1
    hb = r.acquire("b")  # a busy: (b's load 0 + a's wake 1) x 2 = 2 s, not (0 + 20) x 2
    assert [w - r.clock.now for w, e in r.rec.timers() if isinstance(e, Replan)] == [2]
    r.fire(Replan, model_id="b")
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(wa))
    assert r.rec.of("suspend")[-1] == ("a", 1, 1)
    r.send(SleepFinished("a", 1))
    r.loaded("b")
    assert hb in r.rec.granted()


def test_swap_patience_counts_the_busy_victim_s_expected_drain() -> None:
    r = rig({"a": LLM6, "b": LLM6}, swap_patience=2)
    first = r.acquire("a")
    r.clock.advance(5)
    r.loaded("a")
    r.clock.advance(2)
    r.send(Release(first))  # a's requests take 2 s (its mean lease time)
    held = [r.acquire("a"), r.acquire("a")]
    assert all(h in r.rec.granted() for h in held)
    r.acquire("b")
    # (b's load 0 + a's drain 2 x H(2) = 3 + a's reload 5) x 2 = 16 s.
    assert [w - r.clock.now for w, e in r.rec.timers() if isinstance(e, Replan)] == [16]
    assert r.state("a") is ModelState.READY


def test_swap_patience_is_at_most_60_percent_of_the_queue_timeout() -> None:
    r = rig({"a": LLM6, "b": LLM6}, swap_patience=2, queue_timeout=20)
    ha = r.acquire("a")
    r.clock.advance(60)
    r.loaded("a")
    hb = r.acquire("b")  # (0 + 60) x 2 = 120 s, but the request would time out first
    assert [w - r.clock.now for w, e in r.rec.timers() if isinstance(e, Replan)] == [12]
    r.fire(Replan, model_id="b")
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(ha))
    r.stopped("a")
    r.loaded("b")
    assert hb in r.rec.granted()  # before its deadline
    assert hb not in r.rec.rejected()


# ---------------------------------------------------------------------------- reload, shutdown


def test_a_reload_that_changes_the_launch_of_a_sleeping_model_stops_it() -> None:
    models: dict[str, dict[str, Any]] = {"a": sleepy(6), "b": LLM6}
    r = a_asleep_beside_b()
    models["a"] = {**sleepy(6), "cmd": "serve a --port ${PORT} --new"}
    r.send(Reconfigure(make_config(models), 10.0))
    assert r.rec.stops()[-1] == ("a", 1, StopReason.RELOAD)
    assert r.core.reserved_gb == 7  # its residual until the process is gone
    r.stopped("a")
    assert r.core.reserved_gb == 6
    assert r.core.host_reserved_gb == 0
    wa = r.acquire("a")
    r.stopped("b")
    assert r.rec.loads()[-1] == ("a", 2)  # the new launch: a cold load, never a wake
    r.loaded("a")
    assert wa in r.rec.granted()


def test_a_reload_that_changes_only_sizes_keeps_a_sleeper_asleep() -> None:
    models: dict[str, dict[str, Any]] = {"a": sleepy(6), "b": LLM6}
    r = a_asleep_beside_b()
    n = len(r.rec.calls)
    models["a"] = sleepy(4)
    r.send(Reconfigure(make_config(models), 10.0))
    assert calls_since(r, n) == []
    assert r.state("a") is ModelState.SLEEPING
    assert r.core.reserved_gb == 7
    wa = r.acquire("a")  # needs 4 - 1 = 3 of the 3 free
    assert r.rec.of("wake") == [("a", 1, 1)]
    r.send(WakeFinished("a", 1))
    assert wa in r.rec.granted()
    assert r.core.reserved_gb == 10


def test_a_reload_that_removes_a_sleeping_model_stops_and_forgets_it() -> None:
    r = a_asleep_beside_b()
    r.send(Reconfigure(make_config({"b": LLM6}), 10.0))
    assert r.rec.stops()[-1] == ("a", 1, StopReason.RELOAD)
    assert "a" in r.core.models
    r.stopped("a")
    assert "a" not in r.core.models
    assert r.core.host_reserved_gb == 0


def test_a_reload_with_a_smaller_host_budget_overcommits_and_plans_no_sleep() -> None:
    models: dict[str, dict[str, Any]] = {"a": sleepy(6), "b": sleepy(6), "c": LLM6}
    r = rig(models, host_budget_gb=20)
    put_to_sleep(r, "a")
    r.send(Release(r.ready("b")))
    r.send(Reconfigure(make_config(models), 10.0, host_budget_gb=4))
    assert r.core.host_overcommit_gb == 2  # a's 6 GB is reality, not a decision
    hc = r.acquire("c")  # b must go, and its sleep cannot fit (even with a stopped): it stops
    assert r.rec.stops() == [("b", 1, StopReason.PRIORITY)]
    assert r.rec.of("suspend") == [("a", 1, 1)]
    r.stopped("b")
    r.loaded("c")
    assert hc in r.rec.granted()
    r.send(Release(hc))
    assert r.core.host_reserved_gb == 6
    assert r.core.host_overcommit_gb == 2
    r.unload("a")
    r.stopped("a")
    assert r.core.host_overcommit_gb == 0


def test_shutdown_stops_sleepers_and_models_going_to_sleep() -> None:
    r = rig({"a": sleepy(3), "b": sleepy(3), "c": sleepy(3)})
    put_to_sleep(r, "a")
    held = r.ready("b")
    b_sleep = admin_sleep(r, "b")  # draining to sleep
    r.send(Release(r.ready("c")))
    c_sleep = admin_sleep(r, "c")  # suspending
    r.send(Shutdown())
    assert ("a", 1, StopReason.SHUTDOWN) in r.rec.stops()
    assert isinstance(r.rec.rejected()[b_sleep], CannotSleep)
    assert isinstance(r.rec.rejected()[c_sleep], CannotSleep)
    r.send(Release(held))
    assert ("b", 1, StopReason.SHUTDOWN) in r.rec.stops()
    assert ("b", 1, 1) not in r.rec.of("suspend")
    r.send(SleepFinished("c", 1))
    assert ("c", 1, StopReason.SHUTDOWN) in r.rec.stops()
    for mid in "abc":
        r.stopped(mid)
    assert r.core.reserved_gb == 0
    assert r.core.host_reserved_gb == 0


def test_shutdown_stops_a_waking_model_once_awake() -> None:
    r = a_asleep_beside_b()
    wa = r.acquire("a")
    r.stopped("b")
    r.send(Shutdown())
    assert isinstance(r.rec.rejected()[wa], Exception)
    r.send(WakeFinished("a", 1))
    assert r.rec.stops()[-1] == ("a", 1, StopReason.SHUTDOWN)
    r.stopped("a")
    assert r.core.reserved_gb == 0


# ---------------------------------------------------------------------------- measuring


def test_load_wake_and_stop_times_are_measured_on_the_core_clock() -> None:
    r = rig({"a": sleepy(6), "b": LLM6})
    ha = r.acquire("a")
    r.clock.advance(7)
    r.loaded("a")
    r.send(Release(ha))
    hb = r.acquire("b")
    r.send(SleepFinished("a", 1))
    r.loaded("b")
    r.send(Release(hb))
    wa = r.acquire("a")
    r.clock.advance(3)
    r.stopped("b")
    r.clock.advance(1.5)
    r.send(WakeFinished("a", 1))
    assert wa in r.rec.granted()
    a, b = r.core.models["a"], r.core.models["b"]
    assert a.load_s == 7
    assert a.wake_s == 1.5
    assert b.stop_s == 3
    assert b.load_s == 0
    assert ("a", "1.500s") in r.rec.notices(Notice.AWAKE)


def test_a_measured_residual_raises_what_a_sleeper_holds() -> None:
    r = a_asleep_beside_b()
    r.send(MeasuredResidual("a", 2.5, generation=1))
    assert r.core.reserved_gb == 8.5
    r.send(MeasuredResidual("a", 2.0, generation=1))  # a peak: never lowered
    assert r.core.reserved_gb == 8.5
    r.send(MeasuredResidual("a", 9.0, generation=1))  # never more than its reservation
    assert r.core.models["a"].residual_gb == 6
    assert r.core.reserved_gb == 12
    assert r.core.overcommit_gb == 2


def test_a_measured_peak_of_a_sleeper_raises_its_wake_need() -> None:
    r = a_asleep_beside_b()
    r.send(Measured("a", 8.0, generation=1))
    r.send(Release(r.acquire("b")))
    wa = r.acquire("a")  # needs 8 - 1 = 7 beside b's 6: b stops
    assert r.core.pending == {"a": 7}
    r.stopped("b")
    r.send(WakeFinished("a", 1))
    assert wa in r.rec.granted()
    assert r.core.reserved_gb == 8


def test_an_admin_load_of_a_sleeping_model_wakes_it() -> None:
    r = a_asleep_beside_b()
    rid = r.acquire("a", WaiterKind.ADMIN_LOAD)
    r.stopped("b")
    r.send(WakeFinished("a", 1))
    assert rid in r.rec.answered()
    assert r.state("a") is ModelState.READY


def test_a_request_that_fits_once_a_model_is_asleep_waits_for_it() -> None:
    r = rig(
        {
            "b": sleepy(6, 3),
            "c": {"type": "llm", "vram_gb": 2},
            "d": {"type": "llm", "vram_gb": 4},
            "a": {"type": "llm", "vram_gb": 8},
        }
    )
    r.send(Release(r.ready("b")))
    r.send(Release(r.ready("c")))
    hd = r.acquire("d")  # b goes to sleep (keeping 3 GB) for d
    assert r.state("b") is ModelState.SUSPENDING
    ha = r.acquire("a")  # once b sleeps: b, c and d may all be stopped for a's 8 GB
    assert ha not in r.rec.rejected()  # it was a 503 "memory it may not take is held by: nothing"
    r.send(SleepFinished("b", 1))
    r.loaded("d")
    r.send(Release(hd))
    for mid in ("b", "c", "d"):
        if r.state(mid) is ModelState.UNLOADING:
            r.stopped(mid)
    r.loaded("a")
    assert ha in r.rec.granted()


def test_an_admin_sleep_of_a_model_whose_load_fails_is_refused() -> None:
    r = rig({"a": sleepy(6)})
    wa = r.acquire("a")
    rid = admin_sleep(r, "a")
    r.send(LoadFinished("a", 1, error="exited with status 1"))
    assert wa in r.rec.rejected()
    assert r.state("a") is ModelState.UNLOADED
    assert isinstance(r.rec.rejected().get(rid), CannotSleep)  # it was never answered


def test_a_request_that_fits_once_a_promised_wake_is_done_waits() -> None:
    r = rig(
        {
            "p": {"type": "llm", "vram_gb": 5, "pinned": True},
            "z": sleepy(3, 1, type="tts"),
            "b": {"type": "llm", "vram_gb": 3},
            "a": {"type": "llm", "vram_gb": 5},
        }
    )
    r.send(Release(r.ready("p")))
    put_to_sleep(r, "z")
    hb = r.ready("b")  # 5 + 1 + 3 = 9 of 10
    hz = r.acquire("z")  # its wake (2 GB more) drains b
    assert r.state("b") is ModelState.DRAINING
    assert r.core.pending == {"z": 2}
    ha = r.acquire("a")  # once z is awake, z (a tts) may go: 10 - 5 >= 5
    assert ha not in r.rec.rejected()  # today: 503 naming p (5 GB) only
    r.send(Release(hb))
    r.stopped("b")
    r.send(WakeFinished("z", 1))
    assert hz in r.rec.granted()
    r.send(Release(hz))
    for _ in range(3):
        if r.state("z") is ModelState.SUSPENDING:
            r.send(SleepFinished("z", 1))
        elif r.state("z") is ModelState.UNLOADING:
            r.stopped("z")
    r.loaded("a")
    assert ha in r.rec.granted()
