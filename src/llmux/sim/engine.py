"""The discrete-event loop, the simulated effects, and what is recorded.

One heap of ``(time, seq, item)``. An item is a request arrival, the end of a granted request, or
an event for the policy (the llmux core's own event types: ``LoadFinished``, ``StopFinished``,
``Release``, timers it asked for with ``call_at``...). The policy (the real ``SchedulerCore`` for
``llmux``) is driven only through ``handle(event)`` and acts only through ``Effects``:

* ``start_load`` -> ``LoadFinished`` at now + load time (size / load_gbps + init, or the
  scenario's ``load_s``);
* ``stop`` -> ``StopFinished`` at now + stop_s;
* ``suspend`` -> ``SleepFinished`` at now + the model's sleep time; ``wake`` -> ``WakeFinished``
  at now + its wake time (vLLM's published times by default, ``Scenario.wake_time``);
* ``grant`` -> the request is served: first byte after ``first_byte_s``, ``Release`` after
  ``service_s`` (and its voice follow-up arrives then);
* ``reject`` -> a failed request; ``call_at`` -> pushed on the heap; ``notify`` -> counted.

Time is virtual: the policy's ``clock`` and ``wall`` read ``Simulator.now``.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmux.errors import LlmuxError
from llmux.scheduling.core import SchedulerCore
from llmux.scheduling.events import (
    Acquire,
    Cancel,
    Event,
    LoadFinished,
    Notice,
    Release,
    SleepFinished,
    StopFinished,
    WakeFinished,
)
from llmux.scheduling.state import StopReason
from llmux.sim.scenario import Scenario
from llmux.sim.workload import SimRequest, Workload


class Policy(Protocol):
    """What the loop drives: the real core, or a baseline with the same interface."""

    def handle(self, event: Event) -> None: ...


@dataclass(frozen=True)
class SimContext:
    """What a policy may know: the scenario, and (oracles only) the future."""

    scenario: Scenario
    future: dict[str, list[float]]
    """Per model, sorted arrival times (follow-ups at their nominal time)."""


PolicyFactory = Callable[[SimContext, "SimEffects", Callable[[], float]], Policy]


@dataclass(frozen=True)
class _Arrive:
    rid: int


@dataclass(frozen=True)
class _Done:
    rid: int


@dataclass(frozen=True)
class _GiveUp:
    rid: int


@dataclass
class LoadRecord:
    model_id: str
    generation: int
    start: float
    ready: float
    gb: float
    reused: bool = False
    """A request that arrived after the load finished was served by it (a warm hit)."""
    stopped_at: float | None = None
    reason: str | None = None


@dataclass
class SleepRecord:
    """One sleep (``kind`` "sleep": weights out) or wake ("wake": weights back) of a model."""

    model_id: str
    generation: int
    kind: str
    level: int
    start: float
    end: float
    gb: float
    """GB of weights moved: to host RAM (level 1 sleep), back to the GPU (a wake, from host RAM
    at level 1 or from disk at level 2); 0 for a level-2 sleep (the weights are dropped)."""


@dataclass
class Recorder:
    requests: dict[int, SimRequest] = field(default_factory=dict)
    granted: dict[int, float] = field(default_factory=dict)
    finished: dict[int, float] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    loads: list[LoadRecord] = field(default_factory=list)
    current: dict[str, LoadRecord] = field(default_factory=dict)
    notices: dict[str, int] = field(default_factory=dict)
    sleeps: list[SleepRecord] = field(default_factory=list)
    """Sleeps and wakes, in the order they were sent."""


class SimEffects:
    """``llmux.scheduling.events.Effects`` on the virtual clock."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def _on_cpu(self, model_id: str) -> bool:
        """Whether the real core placed this model on the CPU (its cpu_fallback) for now."""
        core = self.sim.policy
        return isinstance(core, SchedulerCore) and core.models[model_id].on_cpu

    def start_load(self, model_id: str, generation: int) -> None:
        sim = self.sim
        now = sim.now
        ready = now + sim.scenario.load_time(model_id)
        gb = 0.0 if self._on_cpu(model_id) else sim.scenario.gpu_gb(model_id)
        rec = LoadRecord(model_id, generation, now, ready, gb)
        sim.rec.loads.append(rec)
        sim.rec.current[model_id] = rec
        sim.push(ready, LoadFinished(model_id, generation, pid=1))

    def stop(self, model_id: str, generation: int, reason: StopReason) -> None:
        sim = self.sim
        rec = sim.rec.current.get(model_id)
        if rec is not None and rec.generation == generation:
            rec.stopped_at = sim.now
            rec.reason = reason.value
        sim.push(sim.now + sim.scenario.stop_s, StopFinished(model_id, generation))

    def suspend(self, model_id: str, generation: int, level: int) -> None:
        sim = self.sim
        sc = sim.scenario
        end = sim.now + sc.sleep_time(model_id)
        gb = sc.models[model_id].weights_gb if level == 1 else 0.0
        sim.rec.sleeps.append(SleepRecord(model_id, generation, "sleep", level, sim.now, end, gb))
        sim.push(end, SleepFinished(model_id, generation))

    def wake(self, model_id: str, generation: int, level: int) -> None:
        sim = self.sim
        sc = sim.scenario
        end = sim.now + sc.wake_time(model_id)
        gb = sc.models[model_id].weights_gb
        sim.rec.sleeps.append(SleepRecord(model_id, generation, "wake", level, sim.now, end, gb))
        sim.push(end, WakeFinished(model_id, generation))

    def grant(self, rid: int, model_id: str, generation: int) -> None:
        sim = self.sim
        if rid < 0 or rid not in sim.rec.requests or rid in sim.rec.rejected:
            return
        req = sim.rec.requests[rid]
        if self._on_cpu(model_id):  # a per-run copy: slow it down for this placement only
            req.first_byte_s *= sim.scenario.cpu.slowdown
            req.service_s *= sim.scenario.cpu.slowdown
        sim.rec.granted[rid] = sim.now
        rec = sim.rec.current.get(model_id)
        if rec is not None and req.arrival >= rec.ready - 1e-9:
            rec.reused = True
        sim.push(sim.now + req.service_s, _Done(rid))

    def answer(self, rid: int) -> None:
        pass

    def reject(self, rid: int, error: LlmuxError) -> None:
        if rid in self.sim.rec.requests:
            self.sim.rec.rejected[rid] = error.code or type(error).__name__

    def call_at(self, when: float, event: Event) -> None:
        self.sim.push(max(when, self.sim.now), event)

    def notify(self, notice: Notice, model_id: str, reason: str) -> None:
        n = self.sim.rec.notices
        n[notice.value] = n.get(notice.value, 0) + 1


class Simulator:
    def __init__(self, scenario: Scenario, workload: Workload, factory: PolicyFactory) -> None:
        self.scenario = scenario
        self.workload = workload
        self.now = 0.0
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self.rec = Recorder()
        self._next_rid = len(workload.requests)
        self.effects = SimEffects(self)
        ctx = SimContext(scenario, workload.nominal)
        self.policy = factory(ctx, self.effects, self.clock)
        for req in workload.requests:
            # Copies: a run never changes the shared workload.
            self.rec.requests[req.rid] = SimRequest(**req.__dict__)
            self._arrive(req)

    def _arrive(self, req: SimRequest) -> None:
        self.push(req.arrival, _Arrive(req.rid))
        if self.scenario.client_timeout_s is not None:
            self.push(req.arrival + self.scenario.client_timeout_s, _GiveUp(req.rid))

    def clock(self) -> float:
        return self.now

    def push(self, when: float, item: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), item))

    def run(self) -> float:
        """Run to the end; returns the wall-clock seconds it took."""
        t0 = time.perf_counter()
        heap = self._heap
        policy = self.policy
        while heap:
            when, _, item = heapq.heappop(heap)
            self.now = when
            if isinstance(item, _Arrive):
                policy.handle(Acquire(item.rid, self.rec.requests[item.rid].model_id))
            elif isinstance(item, _Done):
                self._done(item.rid)
            elif isinstance(item, _GiveUp):
                rid = item.rid
                if rid not in self.rec.granted and rid not in self.rec.rejected:
                    self.rec.rejected[rid] = "client_timeout"
                    policy.handle(Cancel(rid))
            else:
                policy.handle(item)
        return time.perf_counter() - t0

    def _done(self, rid: int) -> None:
        self.rec.finished[rid] = self.now
        req = self.rec.requests[rid]
        self.policy.handle(Release(rid))
        if req.follow_up is not None:
            follow = SimRequest(
                self._next_rid,
                req.follow_up,
                self.now,
                req.follow_first_byte_s,
                req.follow_service_s,
            )
            self._next_rid += 1
            self.rec.requests[follow.rid] = follow
            self._arrive(follow)
