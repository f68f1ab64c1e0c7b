"""SchedulerCore driven directly: scenario tests, then a hypothesis state machine.

The core gets a recording ``Effects`` and a fake monotonic clock advanced by hand; slow work
(loads, stops, timers) "finishes" only when a test delivers the event that says so.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from llmux.config import Config
from llmux.errors import (
    CannotSleep,
    InsufficientVram,
    LlmuxError,
    ModelLoadFailed,
    ModelUnavailable,
    QueueFull,
    QueueTimeout,
)
from llmux.scheduling.core import PASSOVER_BOUND_S, SchedulerCore
from llmux.scheduling.events import (
    Acquire,
    Cancel,
    Deadline,
    Event,
    LoadFinished,
    Measured,
    MeasuredResidual,
    Notice,
    ProcessExited,
    Reconfigure,
    Release,
    Shutdown,
    Sleep,
    SleepFinished,
    StopFinished,
    TtlExpired,
    Unload,
    WakeFinished,
)
from llmux.scheduling.state import ALIVE, ModelRecord, ModelState, StopReason, WaiterKind

# ---------------------------------------------------------------------------- test doubles


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@dataclass(frozen=True)
class Call:
    """One effect the core asked for, in order."""

    name: str
    args: tuple[Any, ...]


class Recorder:
    """Implements the ``Effects`` protocol by recording every call; ``listener`` (if any) sees
    each call the moment the core makes it, with the core's state as it is then."""

    def __init__(self, listener: Callable[[Call], None] | None = None) -> None:
        self.calls: list[Call] = []
        self.listener = listener

    def _record(self, name: str, *args: Any) -> None:
        call = Call(name, args)
        self.calls.append(call)
        if self.listener is not None:
            self.listener(call)

    def start_load(self, model_id: str, generation: int) -> None:
        self._record("start_load", model_id, generation)

    def stop(self, model_id: str, generation: int, reason: StopReason) -> None:
        self._record("stop", model_id, generation, reason)

    def suspend(self, model_id: str, generation: int, level: int) -> None:
        self._record("suspend", model_id, generation, level)

    def wake(self, model_id: str, generation: int, level: int) -> None:
        self._record("wake", model_id, generation, level)

    def grant(self, rid: int, model_id: str, generation: int) -> None:
        self._record("grant", rid, model_id, generation)

    def answer(self, rid: int) -> None:
        self._record("answer", rid)

    def reject(self, rid: int, error: LlmuxError) -> None:
        self._record("reject", rid, error)

    def call_at(self, when: float, event: Event) -> None:
        self._record("call_at", when, event)

    def notify(self, notice: Notice, model_id: str, reason: str) -> None:
        self._record("notify", notice, model_id, reason)

    # -- queries

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [c.args for c in self.calls if c.name == name]

    def loads(self) -> list[tuple[str, int]]:
        return [(a[0], a[1]) for a in self.of("start_load")]

    def stops(self) -> list[tuple[str, int, StopReason]]:
        return [(a[0], a[1], a[2]) for a in self.of("stop")]

    def granted(self) -> list[int]:
        return [a[0] for a in self.of("grant")]

    def answered(self) -> list[int]:
        return [a[0] for a in self.of("answer")]

    def rejected(self) -> dict[int, LlmuxError]:
        return {a[0]: a[1] for a in self.of("reject")}

    def timers(self) -> list[tuple[float, Event]]:
        return [(a[0], a[1]) for a in self.of("call_at")]

    def notices(self, notice: Notice) -> list[tuple[str, str]]:
        return [(a[1], a[2]) for a in self.of("notify") if a[0] is notice]


def make_config(models: Mapping[str, Mapping[str, Any]], **server: Any) -> Config:
    return Config.model_validate(
        {
            "server": server,
            "models": {
                mid: {"cmd": f"serve {mid} --port ${{PORT}}", **m} for mid, m in models.items()
            },
        }
    )


@dataclass
class Rig:
    core: SchedulerCore
    rec: Recorder
    clock: Clock
    rids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def acquire(self, model_id: str, kind: WaiterKind = WaiterKind.REQUEST) -> int:
        rid = next(self.rids)
        self.core.handle(Acquire(rid, model_id, kind))
        self.core.check_invariants()
        return rid

    def send(self, event: Event) -> None:
        self.core.handle(event)
        self.core.check_invariants()

    def unload(self, model_id: str) -> int:
        rid = next(self.rids)
        self.send(Unload(rid, model_id))
        return rid

    def gen(self, model_id: str) -> int:
        return self.core.models[model_id].generation

    def state(self, model_id: str) -> ModelState:
        return self.core.models[model_id].state

    def loaded(self, model_id: str, pid: int = 4242) -> None:
        self.send(LoadFinished(model_id, self.gen(model_id), pid=pid))

    def stopped(self, model_id: str) -> None:
        self.send(StopFinished(model_id, self.gen(model_id)))

    def ready(self, model_id: str) -> int:
        """Load ``model_id`` by a request, hold the lease, return its rid."""
        rid = self.acquire(model_id)
        self.loaded(model_id)
        assert rid in self.rec.granted()
        return rid

    def fire(self, event_type: type[Any], **match: Any) -> float:
        """Advance the clock to the recorded timer of that type (and fields) and deliver it."""
        for when, ev in self.rec.timers():
            if isinstance(ev, event_type) and all(getattr(ev, k) == v for k, v in match.items()):
                self.clock.now = max(self.clock.now, when)
                self.send(ev)
                return when
        raise AssertionError(f"no {event_type.__name__} timer matching {match}")


def rig(
    models: Mapping[str, Mapping[str, Any]],
    budget: float = 10.0,
    passover_bound: float = PASSOVER_BOUND_S,
    learned: Mapping[str, float] | None = None,
    host_budget_gb: float = float("inf"),
    **server: Any,
) -> Rig:
    clock = Clock()
    rec = Recorder()
    core = SchedulerCore(
        make_config(models, **server),
        budget,
        rec,
        clock=clock,
        wall=lambda: 1.7e9 + clock.now,
        passover_bound=passover_bound,
        learned=learned,
        host_budget_gb=host_budget_gb,
    )
    return Rig(core, rec, clock)


# ---------------------------------------------------------------------------- scenarios


def test_single_flight_one_load_serves_every_waiter() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}})
    rids = [r.acquire("a") for _ in range(3)]
    assert r.rec.loads() == [("a", 1)]
    assert r.state("a") is ModelState.LOADING
    assert r.core.queued("a") == 3
    assert r.rec.granted() == []
    r.loaded("a")
    assert r.rec.loads() == [("a", 1)]
    assert sorted(r.rec.granted()) == rids
    assert r.core.models["a"].in_flight == 3
    assert r.core.queued("a") == 0


def test_failed_load_rejects_every_waiter_and_the_next_request_tries_again() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}})
    rids = [r.acquire("a") for _ in range(2)]
    error = "exited with status 1\nCUDA out of memory: tried to allocate 2 GB"
    r.send(LoadFinished("a", 1, error=error))
    rejected = r.rec.rejected()
    assert sorted(rejected) == rids
    for rid in rids:
        assert isinstance(rejected[rid], ModelLoadFailed)
        assert "CUDA out of memory" in rejected[rid].message
    m = r.core.models["a"]
    assert m.state is ModelState.UNLOADED
    assert m.last_error == error
    assert r.core.reserved_gb == 0
    assert (Notice.LOAD_FAILED, "a") in [(n, mid) for n, mid, _ in r.rec.of("notify")]

    again = r.acquire("a")
    assert r.rec.loads() == [("a", 1), ("a", 2)]
    assert m.last_error == error  # kept until a load succeeds
    r.loaded("a")
    assert again in r.rec.granted()
    assert m.last_error is None


def test_failed_load_with_an_empty_error_text_still_rejects() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}})
    rid = r.acquire("a")
    r.send(LoadFinished("a", 1, error=""))
    assert isinstance(r.rec.rejected()[rid], ModelLoadFailed)
    assert r.state("a") is ModelState.UNLOADED


def test_crash_releases_the_reservation_and_the_next_request_reloads() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}})
    held = r.ready("a")
    assert r.core.reserved_gb == 4
    r.send(ProcessExited("a", 1, returncode=-11, log_tail="segfault in ggml"))
    m = r.core.models["a"]
    assert m.state is ModelState.UNLOADED
    assert m.in_flight == 0
    assert r.core.reserved_gb == 0
    assert m.last_error is not None
    assert "-11" in m.last_error
    assert "segfault in ggml" in m.last_error
    assert r.rec.stops() == []  # the process is gone already
    r.send(Release(held))  # the relay's late release of the dead lease changes nothing
    assert m.in_flight == 0

    again = r.acquire("a")
    assert r.rec.loads() == [("a", 1), ("a", 2)]
    r.loaded("a")
    assert again in r.rec.granted()
    assert m.in_flight == 1
    assert m.last_error is None


def test_busy_victim_drains_and_stops_after_its_last_release() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 6}, "b": {"type": "llm", "vram_gb": 6}})
    h1 = r.ready("a")
    h2 = r.acquire("a")  # ready: granted at once
    assert h2 in r.rec.granted()
    want = r.acquire("b")
    assert r.state("a") is ModelState.DRAINING
    assert r.rec.stops() == []
    assert r.state("b") is ModelState.UNLOADED
    assert r.core.queued("b") == 1
    assert r.core.pending == {"b": 6}
    r.send(Release(h1))
    assert r.rec.stops() == []
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(h2))
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    assert r.state("a") is ModelState.UNLOADING
    assert ("b", 1) not in r.rec.loads()  # memory not back yet
    r.stopped("a")
    assert r.rec.loads()[-1] == ("b", 1)
    r.loaded("b")
    assert want in r.rec.granted()


def test_request_for_a_draining_model_waits_and_reloads_it() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 6}, "t": {"type": "tts", "vram_gb": 6}})
    held = r.ready("a")
    t = r.acquire("t")  # tts may evict llm: 'a' (busy) drains
    assert r.state("a") is ModelState.DRAINING
    late = r.acquire("a")
    assert late not in r.rec.granted()
    assert r.core.queued("a") == 1
    r.send(Release(held))
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    r.stopped("a")
    assert r.rec.loads() == [("a", 1), ("t", 1)]
    r.loaded("t")
    assert t in r.rec.granted()
    # 'a' comes back by evicting 't' (llm may evict tts), once 't' drains.
    assert r.state("t") is ModelState.DRAINING
    r.send(Release(t))
    r.stopped("t")
    assert r.rec.loads()[-1] == ("a", 2)
    r.loaded("a")
    assert late in r.rec.granted()


def test_queue_full_is_429_for_the_request_past_max_queue() -> None:
    # max_queue bounds each model's waiting requests: b's queue is not a's.
    r = rig({"a": {"type": "llm", "vram_gb": 4}, "b": {"type": "tts", "vram_gb": 1}}, max_queue=2)
    first = r.acquire("a")
    second = r.acquire("b")
    third = r.acquire("a")
    fourth = r.acquire("a")
    rejected = r.rec.rejected()
    assert first not in rejected
    assert second not in rejected
    assert third not in rejected
    assert isinstance(rejected[fourth], QueueFull)
    assert rejected[fourth].status == 429
    assert "model 'a'" in rejected[fourth].message
    assert r.core.queued_requests == 3
    assert r.core.queued("a") == 2
    # Admin loads do not count against max_queue; requests for ready models never wait.
    admin = r.acquire("a", WaiterKind.ADMIN_LOAD)
    assert admin not in r.rec.rejected()
    r.loaded("a")
    assert first in r.rec.granted()
    assert admin in r.rec.answered()
    assert r.acquire("a") in r.rec.granted()


def test_deadline_rejects_a_request_still_waiting() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}}, queue_timeout="30s")
    rid = r.acquire("a")
    when = r.fire(Deadline, rid=rid)
    assert when == pytest.approx(1030.0)
    err = r.rec.rejected()[rid]
    assert isinstance(err, QueueTimeout)
    assert err.status == 504
    assert r.core.queued("a") == 0
    # The load goes on and ends with nobody waiting: the model is ready and idle.
    r.loaded("a")
    assert r.rec.granted() == []
    assert r.state("a") is ModelState.READY


def test_deadline_after_the_grant_is_ignored() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}}, queue_timeout="30s")
    rid = r.acquire("a")
    r.loaded("a")
    r.fire(Deadline, rid=rid)
    assert rid not in r.rec.rejected()
    assert r.core.models["a"].in_flight == 1


def test_deadline_of_a_pending_load_drops_its_promise() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 6}, "b": {"type": "llm", "vram_gb": 6}})
    held = r.ready("a")
    rid = r.acquire("b")
    assert r.core.pending == {"b": 6}
    r.fire(Deadline, rid=rid)
    assert isinstance(r.rec.rejected()[rid], QueueTimeout)
    assert r.core.pending == {}
    r.send(Release(held))  # the drain that began still ends in a stop
    assert r.rec.stops() == [("a", 1, StopReason.PRIORITY)]
    r.stopped("a")
    assert r.rec.loads() == [("a", 1)]


def test_ttl_stops_an_idle_model_at_the_recorded_time() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4, "ttl": "60s"}})
    rid = r.ready("a")
    assert not any(isinstance(ev, TtlExpired) for _, ev in r.rec.timers())  # busy: no ttl
    r.clock.advance(5)
    r.send(Release(rid))
    when = r.fire(TtlExpired, model_id="a")
    assert when == pytest.approx(1065.0)
    assert r.rec.stops() == [("a", 1, StopReason.TTL)]
    r.stopped("a")
    assert r.core.reserved_gb == 0


def test_ttl_timer_of_an_earlier_idle_spell_does_nothing() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4, "ttl": "60s"}})
    r.send(Release(r.ready("a")))
    r.clock.advance(30)
    r.send(Release(r.acquire("a")))  # used again: idle since t+30
    r.fire(TtlExpired, model_id="a")  # the first timer, at t+60
    assert r.rec.stops() == []
    timers = [when for when, ev in r.rec.timers() if isinstance(ev, TtlExpired)]
    r.clock.now = timers[-1]
    r.send(TtlExpired("a", 1))
    assert r.rec.stops() == [("a", 1, StopReason.TTL)]


def test_ttl_does_not_stop_a_busy_model() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4, "ttl": "60s"}})
    r.send(Release(r.ready("a")))
    r.acquire("a")
    r.fire(TtlExpired, model_id="a")
    assert r.rec.stops() == []


def test_pinned_preload_is_never_a_victim_but_admin_unload_unloads_it() -> None:
    r = rig(
        {
            "p": {"type": "llm", "vram_gb": 6, "pinned": True, "ttl": 1},
            "a": {"type": "llm", "vram_gb": 6},
        }
    )
    pre = r.acquire("p", WaiterKind.PRELOAD)
    assert not any(isinstance(ev, Deadline) for _, ev in r.rec.timers())  # nobody waits on it
    r.loaded("p")
    assert r.state("p") is ModelState.READY
    assert pre not in r.rec.granted()
    assert r.core.models["p"].in_flight == 0
    assert not any(isinstance(ev, TtlExpired) for _, ev in r.rec.timers())  # pinned: no ttl

    rid = r.acquire("a")
    err = r.rec.rejected()[rid]
    assert isinstance(err, InsufficientVram)
    assert "p (6 GB)" in err.message
    assert r.rec.stops() == []
    assert r.state("p") is ModelState.READY

    admin = r.unload("p")
    assert r.rec.stops() == [("p", 1, StopReason.ADMIN)]
    assert admin not in r.rec.answered()
    r.stopped("p")
    assert admin in r.rec.answered()
    assert r.state("p") is ModelState.UNLOADED
    r.acquire("a")  # now 'a' fits
    assert r.rec.loads()[-1] == ("a", 1)


def test_admin_unload_of_a_busy_model_drains_then_answers_after_the_stop() -> None:
    r = rig({"a": {"type": "asr", "vram_gb": 4}})
    held = r.ready("a")
    admin = r.unload("a")
    assert r.state("a") is ModelState.DRAINING
    assert r.rec.stops() == []
    assert admin not in r.rec.answered()
    later = r.acquire("a")  # waits for the model to come back
    assert later not in r.rec.granted()
    r.send(Release(held))
    assert r.rec.stops() == [("a", 1, StopReason.ADMIN)]
    assert admin not in r.rec.answered()
    r.stopped("a")
    assert admin in r.rec.answered()
    assert r.rec.loads() == [("a", 1), ("a", 2)]  # the waiter loads it again
    r.loaded("a")
    assert later in r.rec.granted()


def test_shutdown_rejects_waiters_and_stops_a_busy_model_after_its_drain() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 6}, "b": {"type": "llm", "vram_gb": 6}})
    held = r.ready("a")
    waiting = r.acquire("b")
    r.send(Shutdown())
    assert isinstance(r.rec.rejected()[waiting], ModelUnavailable)
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(held))
    assert r.rec.stops()[-1] == ("a", 1, StopReason.PRIORITY)  # doomed for 'b' before shutdown
    r.stopped("a")
    assert r.rec.loads() == [("a", 1)]
    late = r.acquire("a")
    assert isinstance(r.rec.rejected()[late], ModelUnavailable)


def test_shutdown_stop_of_a_drained_model_says_shutdown() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 6}})
    held = r.ready("a")
    r.send(Shutdown())
    assert r.rec.stops() == []
    r.send(Release(held))
    assert r.rec.stops() == [("a", 1, StopReason.SHUTDOWN)]


def test_admin_unload_of_an_unloaded_model_answers_at_once() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}})
    assert r.unload("a") in r.rec.answered()


def test_admin_unload_of_a_loading_model_waits_for_ready_then_stops() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}})
    r.acquire("a", WaiterKind.ADMIN_LOAD)
    admin = r.unload("a")
    assert r.rec.stops() == []
    r.loaded("a")
    assert r.rec.stops() == [("a", 1, StopReason.ADMIN)]
    r.stopped("a")
    assert admin in r.rec.answered()


def test_infeasible_request_evicts_nothing_and_names_the_holders() -> None:
    """The seed's bug, through the core: the LLM request fails at once and no TTS is stopped."""
    r = rig(
        {
            "asr": {"type": "asr", "vram_gb": 6},
            "t1": {"type": "tts", "vram_gb": 2},
            "t2": {"type": "tts", "vram_gb": 1},
            "big": {"type": "llm", "vram_gb": 5},
        }
    )
    r.send(Release(r.ready("asr")))
    r.send(Release(r.ready("t1")))
    r.ready("t2")
    rid = r.acquire("big")
    err = r.rec.rejected()[rid]
    assert isinstance(err, InsufficientVram)
    assert err.status == 503
    assert "asr (6 GB)" in err.message
    assert r.rec.stops() == []
    assert r.rec.notices(Notice.DRAINING) == []
    assert {mid: r.state(mid) for mid in ("asr", "t1", "t2")} == dict.fromkeys(
        ("asr", "t1", "t2"), ModelState.READY
    )
    assert r.core.queued_requests == 0


def _passover_rig() -> tuple[Rig, int, int]:
    """big (llm 8) loading; 'low' (llm 6) waits; 'high' (tts 6) arrives later; only one fits."""
    r = rig(
        {
            "big": {"type": "llm", "vram_gb": 8},
            "low": {"type": "llm", "vram_gb": 6},
            "high": {"type": "tts", "vram_gb": 6},
        }
    )
    held = r.acquire("big")
    low = r.acquire("low")
    return r, held, low


def _run_passover(r: Rig, held: int) -> list[str]:
    r.loaded("big")
    r.send(Release(held))
    r.stopped("big")
    first = r.rec.loads()[-1][0]
    r.loaded(first)
    return [mid for mid, _ in r.rec.loads()]


def test_higher_tier_waiting_request_is_planned_before_a_lower_one() -> None:
    r, held, low = _passover_rig()
    r.clock.advance(1)
    high = r.acquire("high")
    assert r.core.queued("low") == 1
    assert r.core.queued("high") == 1
    assert _run_passover(r, held) == ["big", "high"]
    assert high in r.rec.granted()
    assert low not in r.rec.granted()
    assert r.core.queued("low") == 1  # high is busy now; low waits for it


def test_passover_bound_plans_a_long_waiting_lower_tier_first() -> None:
    r, held, low = _passover_rig()
    r.clock.advance(PASSOVER_BOUND_S + 1)
    high = r.acquire("high")
    assert _run_passover(r, held) == ["big", "low"]
    assert low in r.rec.granted()
    assert high not in r.rec.granted()


def test_ready_models_are_served_while_another_model_loads() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}, "b": {"type": "tts", "vram_gb": 4}})
    r.send(Release(r.ready("a")))
    slow = r.acquire("b")
    assert r.state("b") is ModelState.LOADING
    quick = [r.acquire("a") for _ in range(3)]
    assert r.rec.granted()[-3:] == quick
    assert slow not in r.rec.granted()
    r.loaded("b")
    assert slow in r.rec.granted()
    # And while another model drains and unloads.
    admin = r.unload("a")
    assert r.state("a") is ModelState.DRAINING  # three leases in flight
    assert r.acquire("b") == r.rec.granted()[-1]
    for rid in quick:
        r.send(Release(rid))
    assert r.state("a") is ModelState.UNLOADING
    assert r.acquire("b") == r.rec.granted()[-1]
    r.stopped("a")
    assert admin in r.rec.answered()


def test_stale_events_of_an_older_generation_are_ignored() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4, "ttl": 10}})
    first = r.ready("a")
    r.send(ProcessExited("a", 1, returncode=1))  # crash: generation 1 is over
    second = r.acquire("a")
    assert r.gen("a") == 2
    n = len(r.rec.calls)
    for stale in (
        LoadFinished("a", 1, error="late failure of the first load"),
        LoadFinished("a", 1, pid=1),
        ProcessExited("a", 1, returncode=9),
        StopFinished("a", 1),
        TtlExpired("a", 1),
        Release(first),
    ):
        r.send(stale)
        assert r.state("a") is ModelState.LOADING, stale
    assert r.rec.calls[n:] == []
    r.loaded("a")
    assert second in r.rec.granted()
    n = len(r.rec.calls)
    for stale in (
        ProcessExited("a", 1, returncode=9),
        StopFinished("a", 1),
        LoadFinished("a", 2, error="duplicate"),
        TtlExpired("a", 1),
        Release(first),
    ):
        r.send(stale)
        assert r.state("a") is ModelState.READY, stale
    assert r.rec.calls[n:] == []
    assert r.core.models["a"].in_flight == 1
    assert r.core.models["a"].last_error is None


# ---------------------------------------------------------------------------- rule 10: measured


def test_measured_use_raises_the_reservation_of_a_resident_model() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}, "b": {"type": "llm", "vram_gb": 6}})
    held = r.ready("a")
    r.send(Measured("a", 5.0, r.gen("a")))
    assert r.core.models["a"].reservation_gb == 5.0
    assert r.core.reserved_gb == 5.0
    r.send(Measured("a", 4.5, r.gen("a")))  # a peak: a lower figure changes nothing
    assert r.core.models["a"].learned_gb == 5.0
    want = r.acquire("b")  # 4 + 6 would fit in 10; 5 + 6 does not
    assert r.state("a") is ModelState.DRAINING
    r.send(Release(held))
    r.stopped("a")
    r.loaded("b")
    assert want in r.rec.granted()
    assert r.core.models["a"].reservation_gb == 5.0  # learned stays for the next load


def test_measurement_of_an_older_process_is_ignored() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}})
    r.send(Release(r.ready("a")))
    r.send(Measured("a", 9.0, r.gen("a") - 1))
    assert r.core.models["a"].learned_gb == 0.0
    r.send(Measured("a", 3.0))  # a peak known from before (no generation) counts
    assert r.core.models["a"].learned_gb == 3.0
    assert r.core.models["a"].reservation_gb == 4.0  # max(configured, learned)


def test_overcommit_starts_nothing_until_the_budget_holds_again() -> None:
    r = rig(
        {
            "a": {"type": "llm", "vram_gb": 4},
            "b": {"type": "llm", "vram_gb": 4},
            "c": {"type": "llm", "vram_gb": 1},
        }
    )
    ha = r.ready("a")
    hb = r.ready("b")
    r.send(Measured("a", 7.0, r.gen("a")))  # reality: 11 GB in use of a 10 GB budget
    assert r.core.reserved_gb == 11.0
    assert r.core.overcommit_gb == 1.0
    want = r.acquire("c")  # 1 GB: free only once something goes
    assert ("c", 1) not in r.rec.loads()
    assert r.state("a") is ModelState.DRAINING  # least recently used (both are busy)
    r.send(Release(hb))
    r.send(Release(ha))
    r.stopped("a")
    assert r.core.overcommit_gb == 0.0
    assert r.rec.loads()[-1] == ("c", 1)
    r.loaded("c")
    assert want in r.rec.granted()


def test_a_grown_reservation_plans_a_promised_load_again() -> None:
    r = rig(
        {
            "a": {"type": "llm", "vram_gb": 5},
            "b": {"type": "llm", "vram_gb": 3},
            "c": {"type": "llm", "vram_gb": 5},
        }
    )
    ha = r.ready("a")
    hb = r.ready("b")
    want = r.acquire("c")  # 2 GB free: a (least recently used) drains for it
    assert r.core.pending == {"c": 5}
    assert r.state("a") is ModelState.DRAINING
    r.send(Measured("b", 6.0, r.gen("b")))  # now a's 5 GB alone no longer makes room
    assert r.state("b") is ModelState.DRAINING  # planned again: b goes too
    r.send(Release(ha))
    r.stopped("a")
    assert ("c", 1) not in r.rec.loads()
    r.send(Release(hb))
    r.stopped("b")
    assert r.rec.loads()[-1] == ("c", 1)
    r.loaded("c")
    assert want in r.rec.granted()


def test_a_learned_peak_over_the_budget_is_insufficient_vram() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4}}, learned={"a": 12.0})
    assert r.core.models["a"].reservation_gb == 12.0
    rid = r.acquire("a")
    error = r.rec.rejected()[rid]
    assert isinstance(error, InsufficientVram)
    assert "needs 12 GB (measured; 4 GB configured)" in error.message
    assert r.rec.loads() == []


def test_reload_keeps_a_peak_for_the_same_launch_and_forgets_it_for_a_new_one() -> None:
    a = {"type": "llm", "vram_gb": 4}
    r = rig({"a": a, "b": a}, learned={"a": 6.0, "b": 6.0})
    held = r.ready("a")
    changed = {**a, "cmd": "serve a --bigger --port ${PORT}"}
    r.send(
        Reconfigure(
            make_config({"a": changed, "b": a, "c": a}),
            10.0,
            learned={"a": 4.5, "c": 5.0},  # what learned.json knows of the new launches
        )
    )
    # The old process of 'a' still holds what it was measured at until it is gone.
    assert r.core.models["a"].reservation_gb == 6.0
    assert r.core.models["b"].reservation_gb == 6.0  # same launch: kept
    assert r.core.models["c"].reservation_gb == 5.0  # added: seeded
    r.send(Release(held))
    r.stopped("a")
    assert r.core.models["a"].learned_gb == 4.5
    assert r.core.models["a"].reservation_gb == 4.5


# ---------------------------------------------------------------------------- state machine

TYPES = ("llm", "llm", "llm", "tts", "tts", "asr")
"""Drawn uniformly: mostly evictable models, so that evictions (not 503s) are the common case."""
BUDGET = 10.0


@st.composite
def model_specs(draw: st.DrawFn, sleepy: bool = False) -> dict[str, dict[str, Any]]:
    """2-5 models; ``sleepy``: every LLM and TTS model can sleep (else about half of them)."""
    n = draw(st.integers(2, 5))
    specs: dict[str, dict[str, Any]] = {}
    for i in range(n):
        spec: dict[str, Any] = {
            "type": draw(st.sampled_from(TYPES)),
            # Mostly sizes of which two or three fit the 10 GB budget together; now and then
            # one that fits only alone (7.5, 10: or not at all beside a pinned model), or never.
            "vram_gb": draw(st.sampled_from([0.5, 1, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7.5, 10])),
        }
        if draw(st.integers(0, 19)) == 0:
            spec["vram_gb"] = 12.0
        if draw(st.integers(0, 5)) == 0:
            spec["pinned"] = True
        if draw(st.booleans()):
            spec["ttl"] = draw(st.sampled_from([5.0, 30.0, 120.0]))
        if spec["type"] != "llm" and not sleepy and draw(st.integers(0, 3)) == 0:
            spec["cpu_fallback"] = {"cmd": "serve-on-cpu --port ${PORT}"}
        elif spec["type"] != "asr" and (sleepy or draw(st.booleans())):
            # Rules 11-13: eviction puts it to sleep (never with cpu_fallback: config refuses it).
            level = draw(st.sampled_from([1, 2]))
            sleep: dict[str, Any] = {
                "level": level,
                "residual_gb": min(spec["vram_gb"], draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))),
            }
            host = draw(st.sampled_from([None, 1.0, 2.0, 4.0]))
            if host is not None:
                sleep["host_gb"] = host
            spec["sleep"] = sleep
        specs[f"m{i}-{spec['type']}"] = spec
    return specs


HOST_BUDGETS = st.sampled_from([float("inf"), 4.0, 8.0, 16.0])
"""Host memory sleeping models may hold (``host.ram_gb``): often too little for every sleeper,
so that rule 11's host room (stopping older sleepers, or stopping instead) is common."""


@dataclass
class Asked:
    rid: int
    model_id: str
    kind: WaiterKind
    at: float
    outcome: str | None = None
    """None while waiting; then granted, answered, rejected, cancelled or preloaded."""
    error: LlmuxError | None = None


RARELY = st.integers(0, 2)
"""Drawn by disruptive rules (crash, admin unload, stale events), which act only on 0: without
it they free memory so often that priority evictions become rare."""


class CoreMachine(RuleBasedStateMachine):
    """Random events against the core; an independent model of who waits, who holds a lease,
    what is loading and stopping, checked against every effect the core asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.rec = Recorder(self.on_effect)
        self.rids = itertools.count(1)
        self.asked: dict[int, Asked] = {}
        self.leases: dict[int, tuple[str, int]] = {}
        """Granted and not released, nor dropped by a crash: rid -> (model, generation)."""
        self.loads: dict[str, int] = {}
        """start_load asked for and not finished: model -> generation."""
        self.stops: dict[str, int] = {}
        self.draining: dict[str, StopReason] = {}
        self.last_ttl: dict[str, tuple[float, Event]] = {}
        """The latest ttl timer asked for, per model: the one that must stop it if still idle."""
        self.unloads: dict[int, str] = {}
        """Admin unloads not answered yet: rid -> model."""
        self.timers: list[tuple[float, int, Event]] = []
        self.timer_seq = itertools.count()
        self.max_queue = 0
        self.queue_timeout = 0.0
        self.pumped_at = self.clock.now
        self.suspends: dict[str, int] = {}
        """suspend asked for and not finished: model -> generation."""
        self.wakes: dict[str, int] = {}
        """wake asked for and not finished: model -> generation."""
        self.asleep: set[str] = set()
        """Engines asleep (from a confirmed sleep to the wake sent, or to the process gone): they
        hold their residual only, also while a stop of them is under way (rule 1)."""
        self.host_holders: set[str] = set()
        """Processes holding their host reservation: from the suspend sent until awake or gone."""
        self.sleeps: dict[int, str] = {}
        """Admin sleeps not answered yet: rid -> model."""
        self.failed: set[str] = set()
        """Models whose sleep or wake failed: their stop follows, whatever waits."""
        self.host_budget = float("inf")

    # -- setup

    @initialize(
        specs=model_specs(),
        max_queue=st.sampled_from([1, 3, 8, 20]),
        queue_timeout=st.sampled_from([20.0, 60.0, 300.0]),
        host_budget=HOST_BUDGETS,
    )
    def setup(
        self,
        specs: dict[str, dict[str, Any]],
        max_queue: int,
        queue_timeout: float,
        host_budget: float,
    ) -> None:
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.host_budget = host_budget
        config = make_config(specs, max_queue=max_queue, queue_timeout=queue_timeout)
        self.config = config
        self.specs = specs
        self.core = SchedulerCore(
            config,
            BUDGET,
            self.rec,
            clock=self.clock,
            wall=lambda: 1.7e9 + self.clock.now,
            host_budget_gb=host_budget,
        )
        self.ids = sorted(config.models)
        for mid in self.ids:
            if config.models[mid].pinned:
                self._acquire(mid, WaiterKind.PRELOAD)

    # -- helpers

    def rank(self, mid: str) -> int:
        return self.core.models[mid].tier_rank

    def allowed(self, requester: str, victim: str) -> bool:
        """Rule 2, written again from DESIGN.md (not from the planner)."""
        v = self.core.models[victim]
        if v.pinned or victim == requester:
            return False
        return v.tier_rank <= self.rank(requester) or not v.protected

    def waiting(self) -> list[Asked]:
        return [a for a in self.asked.values() if a.outcome is None]

    def held(self, mid: str) -> int:
        return sum(1 for m, _ in self.leases.values() if m == mid)

    def gpu_starts_since(self, n: int) -> list[Call]:
        """Loads (but those placed on the CPU: they hold no VRAM) and wakes since call ``n``."""
        return [
            c
            for c in self.rec.calls[n:]
            if c.name == "wake"
            or (c.name == "start_load" and not self.core.models[c.args[0]].on_cpu)
        ]

    def send(self, event: Event) -> None:
        self.core.handle(event)
        self.pumped_at = self.clock.now

    def _acquire(self, mid: str, kind: WaiterKind) -> int:
        rid = next(self.rids)
        self.asked[rid] = Asked(rid, mid, kind, self.clock.now)
        self.send(Acquire(rid, mid, kind))
        return rid

    def on_effect(self, call: Call) -> None:
        """Check each effect, when the core makes it, against the model of the world; then
        update the model."""
        getattr(self, f"_on_{call.name}")(*call.args)

    def _on_start_load(self, mid: str, gen: int) -> None:
        assert mid not in self.loads, f"second load of {mid} while one is running (rule 6)"
        assert mid not in self.stops, f"{mid} loads while its stop is running"
        assert mid not in self.asleep, f"{mid} loaded again while its process sleeps (rule 12)"
        assert mid not in self.suspends
        assert mid not in self.wakes
        self.loads[mid] = gen

    def _on_stop(self, mid: str, gen: int, reason: StopReason) -> None:
        assert self.held(mid) == 0, f"{mid} stopped with {self.held(mid)} in flight (rule 5)"
        assert mid not in self.loads, f"{mid} stopped while loading (rule 5)"
        assert mid not in self.wakes, f"{mid} stopped while waking (its waiters are in flight)"
        assert mid not in self.suspends, f"{mid} stopped before its sleep is answered"
        assert mid not in self.stops
        assert gen == self.core.models[mid].generation
        if mid in self.draining:
            drained_for = self.draining.pop(mid)
            assert reason is drained_for, f"{mid} drained for {drained_for}, stopped for {reason}"
        elif mid in self.failed:
            self.failed.discard(mid)  # a failed sleep or wake stops it, whoever waits
        else:
            self._check_doom(mid, reason)
        self.stops[mid] = gen

    def _on_suspend(self, mid: str, gen: int, level: int) -> None:
        """Rule 11: only a model with nothing in flight, once; at its configured level."""
        m = self.core.models[mid]
        assert self.held(mid) == 0, f"{mid} put to sleep with {self.held(mid)} in flight"
        assert mid not in self.loads
        assert mid not in self.stops
        assert mid not in self.suspends, f"second sleep of {mid}"
        assert mid not in self.wakes
        assert mid not in self.asleep
        assert gen == m.generation
        assert m.spec is not None
        assert m.spec.sleep is not None, f"{mid} put to sleep without 'sleep:'"
        assert level == m.sleep_level
        self.suspends[mid] = gen
        self.host_holders.add(mid)

    def _on_wake(self, mid: str, gen: int, level: int) -> None:
        """Rule 12: only a sleeping model that a request (or admin load) waits for, once."""
        m = self.core.models[mid]
        assert mid in self.asleep, f"wake of {mid}, which does not sleep"
        assert mid not in self.stops, f"wake of {mid} while it is being stopped"
        assert mid not in self.wakes, f"second wake of {mid}"
        assert any(a.model_id == mid for a in self.waiting()), f"wake of {mid} nobody waits for"
        assert gen == m.generation, "a wake is the same process"
        assert level == m.sleep_level
        self.asleep.discard(mid)
        self.wakes[mid] = gen

    def _on_notify(self, notice: Notice, mid: str, reason: str) -> None:
        if notice is Notice.DRAINING:
            assert mid not in self.draining
            doom = StopReason(reason)
            self._check_doom(mid, doom)
            self.draining[mid] = doom
        elif notice is Notice.SLEEPING:  # sleep sent
            if mid in self.draining:
                drained_for = self.draining.pop(mid)
                assert reason == drained_for.value, f"{mid} drained for {drained_for}, slept"
            else:
                self._check_doom(mid, StopReason(reason))

    def _check_doom(self, mid: str, reason: StopReason) -> None:
        m = self.core.models[mid]
        if reason is StopReason.PRIORITY:
            assert not m.pinned, f"pinned {mid} evicted by a request (rule 2)"
            requesters = [a.model_id for a in self.waiting() if self.allowed(a.model_id, mid)]
            if mid in self.asleep:
                # A sleeper is also stopped for the host room of an admin sleep (rule 11).
                requesters += [s for s in self.sleeps.values() if self.allowed(s, mid)]
            assert requesters, (
                f"{mid} (tier {m.tier}) evicted with no waiter allowed to evict it: "
                f"{[(a.model_id, a.kind.value) for a in self.waiting()]}"
            )
        elif reason is StopReason.TTL:
            assert not m.pinned
            assert m.ttl is not None
        elif reason is StopReason.ADMIN:
            assert mid in self.unloads.values() or mid in self.sleeps.values(), (
                f"{mid} evicted for admin with no admin unload or sleep"
            )
        else:
            raise AssertionError(f"unexpected stop reason {reason} for {mid}")

    def _on_grant(self, rid: int, mid: str, gen: int) -> None:
        a = self.asked[rid]
        assert a.outcome is None, f"rid {rid} answered twice"
        assert a.kind is WaiterKind.REQUEST
        assert a.model_id == mid
        m = self.core.models[mid]
        assert m.state is ModelState.READY, f"grant on {mid} in {m.state}"
        assert gen == m.generation
        a.outcome = "granted"
        self.leases[rid] = (mid, gen)

    def _on_answer(self, rid: int) -> None:
        if rid in self.sleeps:
            mid = self.sleeps.pop(rid)
            assert self.core.models[mid].state is ModelState.SLEEPING, (
                f"sleep of {mid} answered in {self.core.models[mid].state}"
            )
            return
        if rid in self.unloads:
            mid = self.unloads.pop(rid)
            assert self.core.models[mid].state is ModelState.UNLOADED, (
                f"unload of {mid} answered early"
            )
            return
        a = self.asked[rid]
        assert a.outcome is None, f"rid {rid} answered twice"
        assert a.kind is WaiterKind.ADMIN_LOAD
        assert self.core.models[a.model_id].state is ModelState.READY
        a.outcome = "answered"

    def _on_reject(self, rid: int, error: LlmuxError) -> None:
        if rid in self.sleeps:
            mid = self.sleeps.pop(rid)
            assert isinstance(error, CannotSleep), error
            assert self.core.models[mid].state is not ModelState.SLEEPING
            return
        a = self.asked[rid]
        assert a.outcome is None, f"rid {rid} answered twice"
        a.outcome = "rejected"
        a.error = error
        if isinstance(error, QueueTimeout):
            assert self.clock.now + 1e-9 >= a.at + self.queue_timeout
        elif isinstance(error, QueueFull):
            assert a.kind is WaiterKind.REQUEST
            m = self.core.models[a.model_id]
            waiting = [r for r in m.waiters if self.core.waiters[r].kind is WaiterKind.REQUEST]
            assert len(waiting) >= self.max_queue  # max_queue bounds each model's queue
        elif isinstance(error, ModelLoadFailed):
            assert self.core.models[a.model_id].state is ModelState.UNLOADED
        else:
            assert isinstance(error, InsufficientVram), error
            # Rule 4: only when even every eviction rule 2 allows would not make room.
            mid = a.model_id
            held = sum(self._kept(mid, m) for m in self.core.models.values() if m.model_id != mid)
            held += sum(
                gb for p, gb in self.core.pending.items() if p != mid and not self.allowed(mid, p)
            )
            need = self.core.models[mid].gpu_gb  # a sleeper's residual is part of it
            assert need > BUDGET - held + 1e-9, f"{mid} ({need} GB) rejected, {held} GB held"

    def _kept(self, requester: str, m: ModelRecord) -> float:
        """What ``m`` holds that ``requester`` could never make it free (rule 4): what it holds
        if rule 2 forbids taking it, and if it is being stopped nothing; a model going to sleep
        keeps its residual, which becomes a sleeper's that rule 2 may let it stop (rule 13)."""
        if m.state is ModelState.UNLOADED or m.state is ModelState.UNLOADING:
            return 0.0
        to_sleep = m.state is ModelState.SUSPENDING or (
            m.state is ModelState.DRAINING and m.sleep_after_drain is not None
        )
        if m.state is ModelState.DRAINING and not to_sleep:
            return 0.0
        if self.allowed(requester, m.model_id):
            return 0.0
        return m.residual_gb if to_sleep else m.reservation_gb

    def _on_call_at(self, when: float, event: Event) -> None:
        assert when >= self.clock.now
        if isinstance(event, TtlExpired):
            m = self.core.models[event.model_id]
            assert not m.pinned
            assert m.ttl is not None
            assert when == pytest.approx(self.clock.now + m.ttl)
            self.last_ttl[event.model_id] = (when, event)
        heapq.heappush(self.timers, (when, next(self.timer_seq), event))

    # -- rules

    @rule(i=st.integers(0, 4), admin=st.integers(0, 7))
    def acquire(self, i: int, admin: int) -> None:
        """A request (now and then an admin load) for one model."""
        kind = WaiterKind.ADMIN_LOAD if admin == 0 else WaiterKind.REQUEST
        self._acquire(self.ids[i % len(self.ids)], kind)

    @rule(i=st.integers(0, 4), n=st.integers(1, 3))
    def acquire_burst(self, i: int, n: int) -> None:
        """Several requests for one model at once (rule 6: they share one load)."""
        mid = self.ids[i % len(self.ids)]
        loads = len([m for m, _ in self.rec.loads() if m == mid])
        for _ in range(n):
            self._acquire(mid, WaiterKind.REQUEST)
        assert len([m for m, _ in self.rec.loads() if m == mid]) - loads <= 1

    @rule(i=st.integers(0, 4))
    def acquire_fast(self, i: int) -> None:
        """The runtime's hot path: a try (``Acquire(wait=False)``) is granted at once when the
        model is simply ready, else leaves no trace of itself and the request goes the waiting
        way."""
        mid = self.ids[i % len(self.ids)]
        m = self.core.models[mid]
        simply_ready = m.state is ModelState.READY and m.stop_when_ready is None
        rid = next(self.rids)
        self.asked[rid] = Asked(rid, mid, WaiterKind.REQUEST, self.clock.now)
        calls = len(self.rec.calls)
        self.send(Acquire(rid, mid, wait=False))
        if self.asked[rid].outcome is None:
            assert not simply_ready, f"{mid} is ready but the try was refused"
            assert rid not in self.core.waiters
            assert rid not in self.core.leases
            for c in self.rec.calls[calls:]:  # the pump may act for others, never for the try
                assert c.name not in ("grant", "answer", "reject") or c.args[0] != rid, c
                assert c.name != "call_at" or c.args[1] != Deadline(rid), c
                assert c.name != "notify" or c.args[0] is not Notice.QUEUED, c
            self.send(Acquire(rid, mid))
            return
        assert simply_ready, f"fast grant on {mid} in {m.state}"
        assert self.rec.calls[calls] == Call("grant", (rid, mid, m.generation))

    @precondition(
        lambda self: any(
            m.state in (ModelState.SUSPENDING, ModelState.SLEEPING)
            for m in self.core.models.values()
        )
    )
    @rule(data=st.data(), n=st.integers(1, 2))
    def acquire_sleeper(self, data: st.DataObject, n: int) -> None:
        """Requests for a model asleep or going to sleep (rule 12: they wake it, once)."""
        mid = data.draw(
            st.sampled_from(
                sorted(
                    mid
                    for mid, m in self.core.models.items()
                    if m.state in (ModelState.SUSPENDING, ModelState.SLEEPING)
                )
            )
        )
        wakes = len(self.rec.of("wake"))
        for _ in range(n):
            self._acquire(mid, WaiterKind.REQUEST)
        assert len(self.rec.of("wake")) - wakes <= 1, "one wake serves every waiter (rule 6)"
        assert self.rec.loads()[-1:] != [(mid, self.core.models[mid].generation + 1)]

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), how=st.sampled_from(["release", "cancel"]))
    def release(self, data: st.DataObject, how: str) -> None:
        rid = data.draw(st.sampled_from(sorted(self.leases)))
        self.leases.pop(rid)
        self.send(Cancel(rid) if how == "cancel" else Release(rid))

    @precondition(lambda self: any(a.kind is not WaiterKind.PRELOAD for a in self.waiting()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rids = sorted(a.rid for a in self.waiting() if a.kind is not WaiterKind.PRELOAD)
        rid = data.draw(st.sampled_from(rids))
        self.asked[rid].outcome = "cancelled"
        self.send(Cancel(rid))

    @precondition(lambda self: bool(self.loads))
    @rule(data=st.data(), ok=st.integers(0, 4))
    def finish_load(self, data: st.DataObject, ok: int) -> None:
        mid = data.draw(st.sampled_from(sorted(self.loads)))
        self._finish_load(mid, ok > 0)

    def _finish_load(self, mid: str, ok: bool) -> None:
        gen = self.loads.pop(mid)
        waiting_here = [a for a in self.waiting() if a.model_id == mid]
        if ok:
            self.send(LoadFinished(mid, gen, pid=1000 + gen))
            for a in waiting_here:
                if a.kind is WaiterKind.PRELOAD:
                    a.outcome = "preloaded"
                assert a.outcome is not None, f"rid {a.rid} not served by the load of {mid}"
        else:
            self.send(LoadFinished(mid, gen, error=f"{mid} exploded\nlast line of its log"))
            assert self.core.models[mid].last_error is not None
            assert mid not in self.sleeps.values(), (
                f"admin sleep of {mid} left after its load failed"
            )
            for a in waiting_here:
                assert a.outcome == "rejected", f"rid {a.rid} not answered by the failed load"
                assert isinstance(a.error, ModelLoadFailed)
                assert f"{mid} exploded" in a.error.message

    @precondition(lambda self: any(m.state in ALIVE for m in self.core.models.values()))
    @rule(data=st.data(), go=RARELY)
    def crash(self, data: st.DataObject, go: int) -> None:
        """A process that was ready once dies: serving, going to sleep, asleep or waking."""
        if go:
            return
        alive = sorted(mid for mid, m in self.core.models.items() if m.state in ALIVE)
        mid = data.draw(st.sampled_from(alive))
        m = self.core.models[mid]
        for rid in [r for r, (lm, _) in self.leases.items() if lm == mid]:
            del self.leases[rid]
        self.draining.pop(mid, None)
        self.suspends.pop(mid, None)
        self.wakes.pop(mid, None)
        self.asleep.discard(mid)
        self.host_holders.discard(mid)
        waiting_here = [a for a in self.waiting() if a.model_id == mid]
        self.send(ProcessExited(mid, m.generation, returncode=-9, log_tail="killed"))
        assert m.last_error is not None
        assert m.in_flight == 0
        assert mid not in self.sleeps.values(), "an admin sleep of a dead process unanswered"
        for a in waiting_here:  # a crash while waking: its waiters get a cold load, not an error
            assert a.outcome is None or (
                a.outcome == "rejected" and not isinstance(a.error, ModelLoadFailed)
            ), (a.rid, a.outcome)

    @precondition(lambda self: bool(self.suspends))
    @rule(data=st.data(), ok=st.integers(0, 4))
    def finish_sleep(self, data: st.DataObject, ok: int) -> None:
        """The engine answers a sleep: asleep (its memory but the residual comes back), or
        failed (the process is stopped)."""
        self._finish_sleep(data.draw(st.sampled_from(sorted(self.suspends))), ok > 0)

    def _finish_sleep(self, mid: str, ok: bool) -> None:
        gen = self.suspends.pop(mid)
        m = self.core.models[mid]
        if ok:
            self.asleep.add(mid)  # before the event: a wake (or stop) may follow at once
            self.send(SleepFinished(mid, gen))
            assert m.state in (ModelState.SLEEPING, ModelState.UNLOADING, ModelState.WAKING)
            assert mid not in self.sleeps.values(), "an admin sleep unanswered once asleep"
        else:
            self.failed.add(mid)
            self.send(SleepFinished(mid, gen, error="POST /sleep: 500\nout of host memory"))
            assert m.state is ModelState.UNLOADING
            assert mid not in self.failed, f"{mid}'s sleep failed and it was not stopped"
            assert mid not in self.sleeps.values(), "an admin sleep of a failed sleep unanswered"

    @precondition(lambda self: bool(self.wakes))
    @rule(data=st.data(), ok=st.integers(0, 4))
    def finish_wake(self, data: st.DataObject, ok: int) -> None:
        """The engine answers a wake: ready again (same process), or failed (rule 12: the
        process is stopped and its waiters get a cold load)."""
        self._finish_wake(data.draw(st.sampled_from(sorted(self.wakes))), ok > 0)

    def _finish_wake(self, mid: str, ok: bool) -> None:
        gen = self.wakes.pop(mid)
        m = self.core.models[mid]
        waiting_here = [a for a in self.waiting() if a.model_id == mid]
        if ok:
            self.host_holders.discard(mid)  # before the event: it may go to sleep again at once
            self.send(WakeFinished(mid, gen))
            assert m.generation == gen
            for a in waiting_here:
                if a.kind is WaiterKind.PRELOAD:
                    a.outcome = "preloaded"
                assert a.outcome is not None, f"rid {a.rid} not served by the wake of {mid}"
        else:
            self.failed.add(mid)
            self.send(WakeFinished(mid, gen, error="no answer within ready_timeout"))
            assert m.state is ModelState.UNLOADING
            assert mid not in self.failed, f"{mid}'s wake failed and it was not stopped"
            for a in waiting_here:
                assert a.outcome is None, f"rid {a.rid} answered {a.outcome} by a failed wake"

    @precondition(lambda self: any(m.sleep_level is not None for m in self.core.models.values()))
    @rule(data=st.data(), go=st.integers(0, 2))
    def admin_sleep(self, data: st.DataObject, go: int) -> None:
        """POST /models/{id}/sleep (rule 13): answered once asleep, 409 if it cannot sleep."""
        if go == 2:
            return
        # Mostly a model that can sleep and is loaded; now and then any (409 at once).
        likely = [
            mid
            for mid, m in self.core.models.items()
            if m.sleep_level is not None and m.state is not ModelState.UNLOADED
        ]
        mid = data.draw(
            st.sampled_from(likely or self.ids) if go == 0 else st.sampled_from(self.ids)
        )
        m = self.core.models[mid]
        state, sleepable = m.state, m.sleep_level is not None
        rid = next(self.rids)
        self.sleeps[rid] = mid
        calls = len(self.rec.calls)
        self.send(Sleep(rid, mid))
        answered = [c for c in self.rec.calls[calls:] if c.name in ("answer", "reject")]
        answered = [c for c in answered if c.args[0] == rid]
        if not sleepable or state in (ModelState.UNLOADED, ModelState.UNLOADING):
            assert answered, f"admin sleep of {mid} ({state}) not refused at once"
            assert answered[0].name == "reject"
        elif state is ModelState.SLEEPING:
            assert answered == [Call("answer", (rid,))]

    @precondition(
        lambda self: any(m.state is ModelState.SLEEPING for m in self.core.models.values())
    )
    @rule(data=st.data(), extra=st.sampled_from([0.5, 3.0]), go=RARELY)
    def measure_residual(self, data: st.DataObject, extra: float, go: int) -> None:
        """NVML after a sleep: the process keeps more than its residual."""
        if go:
            return
        asleep = sorted(
            mid for mid, m in self.core.models.items() if m.state is ModelState.SLEEPING
        )
        m = self.core.models[data.draw(st.sampled_from(asleep))]
        before = len(self.rec.calls)
        self.send(MeasuredResidual(m.model_id, m.residual_gb + extra, m.generation))
        if self.core.overcommit_gb > 0:
            assert not self.gpu_starts_since(before), "a load or wake started over the budget"

    @precondition(lambda self: bool(self.stops))
    @rule(data=st.data())
    def finish_stop(self, data: st.DataObject) -> None:
        self._finish_stop(data.draw(st.sampled_from(sorted(self.stops))))

    def _finish_stop(self, mid: str) -> None:
        """The process is gone: with it its residual and its host memory."""
        self.asleep.discard(mid)
        self.host_holders.discard(mid)
        self.send(StopFinished(mid, self.stops.pop(mid)))

    @precondition(lambda self: bool(self.timers))
    @rule()
    def fire_timer(self) -> None:
        self._fire_next_timer()

    def _fire_next_timer(self) -> None:
        """Advance the clock to the earliest timer and deliver it; check that it did its job."""
        when, _, event = heapq.heappop(self.timers)
        self.clock.now = max(self.clock.now, when)
        expect_timeout = isinstance(event, Deadline) and self.asked[event.rid].outcome is None
        m = self.core.models[event.model_id] if isinstance(event, TtlExpired) else None
        expect_ttl_stop = (
            m is not None
            and isinstance(event, TtlExpired)
            and self.last_ttl[event.model_id] == (when, event)
            and m.generation == event.generation
            and m.state is ModelState.READY
            and self.held(event.model_id) == 0
        )
        stops = len(self.rec.stops())
        self.send(event)
        if isinstance(event, Deadline) and expect_timeout:
            a = self.asked[event.rid]
            assert a.outcome == "rejected", f"rid {a.rid} still {a.outcome} after its deadline"
            assert isinstance(a.error, QueueTimeout)
        if m is not None and expect_ttl_stop:
            assert self.rec.stops()[stops:] == [(m.model_id, m.generation, StopReason.TTL)]

    @rule(seconds=st.sampled_from([0.5, 3.0, 11.0]))
    def tick(self, seconds: float) -> None:
        """Time passes with no event (the pass-over bound is judged on the next one)."""
        self.clock.advance(seconds)

    @precondition(
        lambda self: any(m.state is not ModelState.UNLOADED for m in self.core.models.values())
    )
    @rule(data=st.data(), go=RARELY)
    def admin_unload(self, data: st.DataObject, go: int) -> None:
        if go:
            return
        resident = sorted(
            mid for mid, m in self.core.models.items() if m.state is not ModelState.UNLOADED
        )
        mid = data.draw(st.sampled_from(resident))
        m = self.core.models[mid]
        if m.state is ModelState.DRAINING and m.sleep_after_drain is not None:
            self.draining[mid] = StopReason.ADMIN  # it stops after the drain instead
        rid = next(self.rids)
        self.unloads[rid] = mid
        self.send(Unload(rid, mid))

    @precondition(
        lambda self: any(
            m.state in (ModelState.READY, ModelState.DRAINING) for m in self.core.models.values()
        )
    )
    @rule(data=st.data(), extra=st.sampled_from([0.5, 2.0, 6.0]))
    def measure(self, data: st.DataObject, extra: float) -> None:
        """Rule 10: a serving process turns out to use more than its reservation."""
        serving = sorted(
            mid
            for mid, m in self.core.models.items()
            if m.state in (ModelState.READY, ModelState.DRAINING)
        )
        m = self.core.models[data.draw(st.sampled_from(serving))]
        before = len(self.rec.calls)
        self.send(Measured(m.model_id, m.gpu_gb + extra, m.generation))
        if self.core.overcommit_gb > 0:
            assert not self.gpu_starts_since(before), "a load or wake started over the budget"

    @rule(data=st.data(), go=RARELY)
    def reload_sizes(self, data: st.DataObject, go: int) -> None:
        """A reload that changes only reservations (``vram_gb``): applied live, no restart.
        Larger ones may overcommit (then no load starts), smaller ones may let a promised
        load start; promises are planned again either way."""
        if go or any(
            m.pinned and m.state is ModelState.UNLOADED and not m.waiters
            for m in self.core.models.values()
        ):
            # A reload preloads such a pinned model again under a request id of the core's own,
            # which this model of the world cannot follow (test_reconfigure.py covers that case).
            return
        specs = {}
        for mid, spec in self.specs.items():
            factor = data.draw(st.sampled_from([0.5, 1, 1.5]))
            specs[mid] = {**spec, "vram_gb": spec["vram_gb"] * factor}
            if "sleep" in spec:  # residual_gb <= vram_gb; sleep settings apply at the next load
                sleep = {**spec["sleep"], "residual_gb": spec["sleep"]["residual_gb"] * factor}
                specs[mid]["sleep"] = sleep
        self.specs = specs
        self.config = make_config(specs, max_queue=self.max_queue, queue_timeout=self.queue_timeout)
        before = len(self.rec.calls)
        stops = len(self.rec.stops())
        self.send(Reconfigure(self.config, BUDGET))
        for mid, m in self.core.models.items():
            assert m.configured_gb == specs[mid]["vram_gb"], mid
        assert all(reason is not StopReason.RELOAD for _, _, reason in self.rec.stops()[stops:])
        if self.core.overcommit_gb > 0:
            assert not self.gpu_starts_since(before), "a load or wake started over the budget"

    @rule(i=st.integers(0, 4), go=RARELY)
    def stale_event(self, i: int, go: int) -> None:
        """Events of an older generation change nothing and cause nothing."""
        if go:
            return
        mid = self.ids[i % len(self.ids)]
        old = self.core.models[mid].generation - 1
        if self.clock.now != self.pumped_at:
            # Time moved since the last event: the next one may plan anew (pass-over bound).
            self.send(Release(-1))
        before = len(self.rec.calls)
        state = self.core.models[mid].state
        for ev in (
            LoadFinished(mid, old, pid=1),
            ProcessExited(mid, old, returncode=1),
            StopFinished(mid, old),
            TtlExpired(mid, old),
            SleepFinished(mid, old),
            WakeFinished(mid, old, error="stale"),
            MeasuredResidual(mid, 99.0, generation=old),
        ):
            self.send(ev)
        assert self.core.models[mid].state is state
        assert len(self.rec.calls) == before

    # -- invariants

    @invariant()
    def core_invariants(self) -> None:
        if not hasattr(self, "core"):
            return
        self.core.check_invariants()
        assert self.core.reserved_gb <= BUDGET + self.core.overcommit_gb + 1e-9
        for m in self.core.models.values():
            waiting = [r for r in m.waiters if self.core.waiters[r].kind is WaiterKind.REQUEST]
            assert len(waiting) <= self.max_queue, m.model_id

    @invariant()
    def model_agrees_with_core(self) -> None:
        if not hasattr(self, "core"):
            return
        for mid, m in self.core.models.items():
            assert m.in_flight == self.held(mid), (mid, m.in_flight, self.held(mid))
            assert (mid in self.loads) == (m.state is ModelState.LOADING), (mid, m.state)
            assert (mid in self.stops) == (m.state is ModelState.UNLOADING), (mid, m.state)
            assert (mid in self.draining) == (m.state is ModelState.DRAINING), (mid, m.state)
            assert (mid in self.suspends) == (m.state is ModelState.SUSPENDING), (mid, m.state)
            assert (mid in self.wakes) == (m.state is ModelState.WAKING), (mid, m.state)
            if m.state is ModelState.SLEEPING:
                assert mid in self.asleep, mid
            if mid in self.asleep:
                assert m.state in (ModelState.SLEEPING, ModelState.UNLOADING), (mid, m.state)
            if mid in self.loads:
                assert self.loads[mid] == m.generation
        assert set(self.core.waiters) == {a.rid for a in self.waiting()}
        assert set(self.sleeps.values()) <= {
            mid
            for mid, m in self.core.models.items()
            if m.state
            in (
                ModelState.LOADING,
                ModelState.WAKING,
                ModelState.READY,
                ModelState.DRAINING,
                ModelState.SUSPENDING,
                ModelState.UNLOADING,  # refused once the process is gone
            )
        }, "an admin sleep left waiting"

    @invariant()
    def budgets_hold_per_rule_1(self) -> None:
        """Rule 1 from the states: loading, ready, draining, going to sleep, waking: the whole
        reservation; asleep: the residual (also while being stopped); a stop of an awake
        process: the whole reservation. Host memory: held from the sleep sent until awake or
        gone, within the host budget (but for a reload's overcommit)."""
        if not hasattr(self, "core"):
            return
        expected = 0.0
        for mid, m in self.core.models.items():
            if m.state is ModelState.UNLOADED or m.on_cpu:
                continue
            if m.state is ModelState.SLEEPING or mid in self.asleep:
                expected += m.residual_gb
            else:
                expected += m.gpu_gb
        assert self.core.reserved_gb == pytest.approx(expected), (self.core.reserved_gb, expected)
        host = sum(self.core.models[mid].sleep_host_gb for mid in self.host_holders)
        assert self.core.host_reserved_gb == pytest.approx(host), (
            self.core.host_reserved_gb,
            host,
            self.host_holders,
        )
        assert self.core.host_reserved_gb <= self.host_budget + self.core.host_overcommit_gb + 1e-9

    # -- the end: everything settles and everyone has an answer

    def teardown(self) -> None:
        if not hasattr(self, "core"):
            return
        # Finish all work without firing any deadline: nobody may be left waiting (liveness).
        while self.loads or self.stops or self.leases or self.suspends or self.wakes:
            if self.loads:
                self._finish_load(min(self.loads), True)
            elif self.suspends:
                mid = min(self.suspends)
                self.asleep.add(mid)
                self.send(SleepFinished(mid, self.suspends.pop(mid)))
            elif self.wakes:
                mid = min(self.wakes)
                self.host_holders.discard(mid)
                self.send(WakeFinished(mid, self.wakes.pop(mid)))
            elif self.stops:
                self._finish_stop(min(self.stops))
            else:
                rid = min(self.leases)
                del self.leases[rid]
                self.send(Release(rid))
            self.core_invariants()
            self.model_agrees_with_core()
        stuck = [(a.rid, a.model_id, a.kind.value) for a in self.waiting()]
        assert not stuck, f"waiters never answered with nothing left running: {stuck}"
        assert not self.core.waiters
        assert not self.core.pending
        assert not self.unloads, f"admin unloads never answered: {self.unloads}"
        assert not self.sleeps, f"admin sleeps never answered: {self.sleeps}"
        # Then every timer (deadlines, ttl) fires: none may answer anyone a second time.
        while self.timers or self.stops:
            if self.stops:
                self._finish_stop(min(self.stops))
                continue
            self._fire_next_timer()
        self.core_invariants()
        self.model_agrees_with_core()
        assert all(a.outcome is not None for a in self.asked.values())


CoreMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCoreMachine = CoreMachine.TestCase


class SleepMachine(CoreMachine):
    """The same world and checks, every LLM and TTS model able to sleep: rules 11-13 under
    pressure (in CoreMachine, about half of them can)."""

    @initialize(
        specs=model_specs(sleepy=True),
        max_queue=st.sampled_from([1, 3, 8, 20]),
        queue_timeout=st.sampled_from([20.0, 60.0, 300.0]),
        host_budget=HOST_BUDGETS,
    )
    def setup(
        self,
        specs: dict[str, dict[str, Any]],
        max_queue: int,
        queue_timeout: float,
        host_budget: float,
    ) -> None:
        super().setup(specs, max_queue, queue_timeout, host_budget)

    # Swarm testing turns random rules off for a whole example: a second way to finish each
    # sleep and wake keeps models asleep (and woken) during the run, not only at its end.

    @precondition(lambda self: bool(self.suspends))
    @rule(data=st.data())
    def asleep_now(self, data: st.DataObject) -> None:
        self._finish_sleep(data.draw(st.sampled_from(sorted(self.suspends))), True)

    @precondition(lambda self: bool(self.wakes))
    @rule(data=st.data())
    def awake_now(self, data: st.DataObject) -> None:
        self._finish_wake(data.draw(st.sampled_from(sorted(self.wakes))), True)


SleepMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSleepMachine = SleepMachine.TestCase


def test_ttl_timer_that_fires_early_is_set_again() -> None:
    r = rig({"a": {"type": "llm", "vram_gb": 4, "ttl": "60s"}})
    r.send(Release(r.ready("a")))
    due, timer = next((w, e) for w, e in r.rec.timers() if isinstance(e, TtlExpired))
    r.clock.now = due - 0.0005  # an event-loop timer a little early
    r.send(timer)
    assert r.rec.stops() == []
    assert r.rec.timers()[-1] == (due, timer)  # armed again for the same moment
    r.clock.now = due
    r.send(timer)
    assert r.rec.stops() == [("a", 1, StopReason.TTL)]
