"""Candidate improvements to llmux's scheduling, tried on the real core without changing it.

``TunedCore`` subclasses ``SchedulerCore`` and changes only what the planner *sees*: it hands the
core a ``plan`` (the core's constructor seam for its planner) that rewrites the snapshot before
``plan_load`` reads it, and observes events in ``handle()``. The
core's rules stay the core's code: rule 2 (who may be evicted) is never widened, since only the
order keys of *unprotected* resident models are rewritten (``may_evict`` ignores their rank), and
models are only ever hidden from eviction (shown as still loading, so the planner answers Wait,
never Infeasible). What each knob would be in the core is said in docs/simulator.md.

Variants are named ``llmux+knob[=value]+...``:

* ``cost``: the victim set (among those rule 2 allows, loading models included) that adds the
  least expected delay: the requester's waiters wait for the slowest victim to be gone (idle: now;
  busy: its estimated drain, mean observed service time x H(in flight); loading: rest of the load
  and of its waiters' service), and each victim's own future requests wait for its drain and
  reload (observed arrival rate x (drain + load time)), x10 for a model whose cold start misses
  its SLO when ``slo`` is also set. When the best set includes a loading model, the core is shown
  no ready victim, so it waits.
* ``drain``: busy victims ordered by requests in flight (fewest first: the shortest drain),
  instead of lowest tier first. Idle victims keep the core's order.
* ``slo``: idle victims whose cold start still meets their tier's SLO (load + first byte <= SLO)
  go before those whose cold start would miss it; then the core's order. Needs per-tier SLOs and
  load-time estimates (the core could learn load times; the SLO would be configuration).
* ``minres=S``: a model ready for less than S seconds is not a victim (``minres_TIER=S`` for one
  tier only).
* ``prewarm``: a request for the voice ASR model also asks (as an admin load) for the voice TTS
  model if it is not loaded: a pipeline hint ("after X, Y is likely").
* ``passover=S``: the core's existing ``passover_bound`` (an existing constructor hook).
* ``maxq=N``: ``server.max_queue`` (a config setting; llmux's default is 1024 per model).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmux.errors import LlmuxError
from llmux.scheduling.core import SchedulerCore
from llmux.scheduling.events import Acquire, Event, Notice, Release
from llmux.scheduling.planner import Decision, ModelView, Snapshot, may_evict, plan_load
from llmux.scheduling.state import (
    DOOMED,
    RESIDENT,
    ModelState,
    StopReason,
    WaiterKind,
)
from llmux.sim.engine import Policy, PolicyFactory, SimContext, SimEffects
from llmux.sim.policies import core_options


@dataclass(frozen=True)
class Tuning:
    cost: bool = False
    drain: bool = False
    slo: bool = False
    minres: dict[str, float] = field(default_factory=dict)
    """Tier ('*' = every tier) -> minimum residency, seconds."""
    prewarm: bool = False
    passover: float | None = None
    maxq: int | None = None


_RATE_WINDOW_S = 300.0


class _Tap:
    """Forwards every effect; remembers when each lease was granted (for service estimates)."""

    def __init__(self, inner: SimEffects, granted: dict[int, float], clock: Callable[[], float]):
        self.inner = inner
        self.granted = granted
        self.clock = clock

    def start_load(self, model_id: str, generation: int) -> None:
        self.inner.start_load(model_id, generation)

    def stop(self, model_id: str, generation: int, reason: StopReason) -> None:
        self.inner.stop(model_id, generation, reason)

    def suspend(self, model_id: str, generation: int, level: int) -> None:
        self.inner.suspend(model_id, generation, level)

    def wake(self, model_id: str, generation: int, level: int) -> None:
        self.inner.wake(model_id, generation, level)

    def grant(self, rid: int, model_id: str, generation: int) -> None:
        self.granted[rid] = self.clock()
        self.inner.grant(rid, model_id, generation)

    def answer(self, rid: int) -> None:
        self.inner.answer(rid)

    def reject(self, rid: int, error: LlmuxError) -> None:
        self.inner.reject(rid, error)

    def call_at(self, when: float, event: Event) -> None:
        self.inner.call_at(when, event)

    def notify(self, notice: Notice, model_id: str, reason: str) -> None:
        self.inner.notify(notice, model_id, reason)


class TunedCore(SchedulerCore):
    """The real core with a different view for the planner (see the module docstring)."""

    def __init__(
        self, ctx: SimContext, effects: SimEffects, clock: Callable[[], float], tuning: Tuning
    ) -> None:
        sc = ctx.scenario
        self._granted: dict[int, float] = {}
        config = sc.llmux_config()
        if tuning.maxq is not None:
            server = config.server.model_copy(update={"max_queue": tuning.maxq})
            config = config.model_copy(update={"server": server})
        super().__init__(
            config,
            sc.budget_gb,
            _Tap(effects, self._granted, clock),
            clock,
            clock,
            passover_bound=tuning.passover
            if tuning.passover is not None
            else sc.llmux.passover_bound_s,
            plan=self._plan,
            **core_options(sc),
        )
        self.ctx = ctx
        self.tuning = tuning
        self.ready_at: dict[str, float] = {}
        self._seen: dict[str, int] = {}
        self._admin_rids = itertools.count(-(10**9), -1)
        self._arrivals: dict[str, deque[float]] = {mid: deque() for mid in sc.models}
        self._service: dict[str, float] = {}
        """Mean observed service time per model (moving average)."""
        self._lease_model: dict[int, str] = {}
        self._load_started: dict[str, float] = {}
        # Cold start within SLO: load time + first byte (typical: the model's fixed first byte,
        # or for LLMs the mean prefill of the trace is small; use 0.5 s).
        self.cold_ok: dict[str, bool] = {}
        for mid, spec in sc.models.items():
            fb = spec.first_byte_s if spec.first_byte_s is not None else 0.5
            self.cold_ok[mid] = sc.load_time(mid) + fb * sc.slowdown(mid) <= sc.slo.of(
                sc.tier_of(mid)
            )

    def handle(self, event: Event) -> None:
        now = self.clock()
        if isinstance(event, Acquire):
            if event.kind is WaiterKind.REQUEST and event.model_id in self._arrivals:
                q = self._arrivals[event.model_id]
                q.append(now)
                while q and q[0] < now - _RATE_WINDOW_S:
                    q.popleft()
                self._lease_model[event.rid] = event.model_id
        elif isinstance(event, Release):
            t0 = self._granted.pop(event.rid, None)
            mid = self._lease_model.pop(event.rid, None)
            if t0 is not None and mid is not None:
                old = self._service.get(mid)
                d = now - t0
                self._service[mid] = d if old is None else 0.9 * old + 0.1 * d
        super().handle(event)
        for mid, m in self.models.items():
            if m.state is ModelState.LOADING and self._load_started.get(mid) is None:
                self._load_started[mid] = now
            elif m.state is not ModelState.LOADING:
                self._load_started.pop(mid, None)
        for mid, m in self.models.items():
            if m.state is ModelState.READY and self._seen.get(mid) != m.generation:
                self._seen[mid] = m.generation
                self.ready_at[mid] = now
        voice = self.ctx.scenario.voice
        if (
            self.tuning.prewarm
            and voice is not None
            and isinstance(event, Acquire)
            and event.kind is WaiterKind.REQUEST
            and event.model_id == voice.asr_model
        ):
            tts = self.models[voice.tts_model]
            if tts.state is ModelState.UNLOADED and not tts.waiters:
                super().handle(
                    Acquire(next(self._admin_rids), voice.tts_model, WaiterKind.ADMIN_LOAD)
                )

    # -- estimates (all observable by a real scheduler, except the configured load times and
    #    SLOs, which it would learn or be told)

    def _rate(self, mid: str) -> float:
        now = self.clock()
        q = self._arrivals[mid]
        while q and q[0] < now - _RATE_WINDOW_S:
            q.popleft()
        return len(q) / max(1.0, min(_RATE_WINDOW_S, now))

    def _drain_s(self, mid: str, n: int) -> float:
        """Expected time for ``n`` requests in flight to finish: mean x H(n) (exponential)."""
        mu = self._service.get(mid, 1.0)
        return mu * sum(1.0 / k for k in range(1, n + 1))

    def _free_after_s(self, v: ModelView) -> float:
        m = self.models[v.model_id]
        sc = self.ctx.scenario
        if v.state is ModelState.LOADING:
            started = self._load_started.get(v.model_id, self.clock())
            rest = max(0.0, sc.load_time(v.model_id) - (self.clock() - started))
            return rest + self._drain_s(v.model_id, len(m.waiters)) + sc.stop_s
        return self._drain_s(v.model_id, m.in_flight) + sc.stop_s

    def _penalty(self, v: ModelView, free_after: float) -> float:
        sc = self.ctx.scenario
        w = 10.0 if (self.tuning.slo and not self.cold_ok[v.model_id]) else 1.0
        return self._rate(v.model_id) * (free_after + sc.load_time(v.model_id)) * w

    def _cost_view(self, snap: Snapshot, requester: str) -> Snapshot:
        """Show the planner only the cheapest victim set for loading ``requester`` (see
        ``cost`` in the module doc)."""
        if requester not in snap.models:
            return snap
        me = snap.models[requester]
        if me.state is not ModelState.UNLOADED:
            return snap
        resident = [v for v in snap.models.values() if v.state in RESIDENT]
        reserved = sum(v.reservation_gb for v in resident)
        doomed = sum(v.reservation_gb for v in resident if v.state in DOOMED)
        pending = sum(gb for mid, gb in snap.pending.items() if mid != requester)
        projected = snap.budget_gb - (reserved - doomed) - pending
        need = me.reservation_gb
        if need <= projected + 1e-9:
            return snap
        cands = [
            v
            for v in resident
            if v.state in (ModelState.READY, ModelState.LOADING) and may_evict(me, v)
        ]
        waiting = max(1, len(self.models[requester].waiters))
        best: tuple[float, tuple[ModelView, ...]] | None = None
        for k in range(1, len(cands) + 1):
            for combo in itertools.combinations(cands, k):
                total = projected + sum(v.reservation_gb for v in combo)
                if total + 1e-9 < need:
                    continue
                if any(total - v.reservation_gb + 1e-9 >= need for v in combo):
                    continue  # not minimal
                after = {v.model_id: self._free_after_s(v) for v in combo}
                cost = waiting * max(after.values()) + sum(
                    self._penalty(v, after[v.model_id]) for v in combo
                )
                if best is None or cost < best[0]:
                    best = (cost, combo)
        if best is None:
            return snap
        chosen = {v.model_id for v in best[1]}
        wait = any(v.state is ModelState.LOADING for v in best[1])
        views = dict(snap.models)
        for v in cands:
            if v.state is ModelState.READY and (wait or v.model_id not in chosen):
                views[v.model_id] = dataclasses.replace(v, state=ModelState.LOADING)
        return dataclasses.replace(snap, models=views)

    def _minres(self, v: ModelView) -> float:
        m = self.tuning.minres
        return m.get(self.models[v.model_id].tier, m.get("*", 0.0))

    def _plan(self, snap: Snapshot, model_id: str) -> Decision:
        return plan_load(self._view(snap, model_id), model_id)

    def _view(self, snap: Snapshot, requester: str) -> Snapshot:
        """What the planner is shown when it plans to load ``requester``."""
        t = self.tuning
        if not (t.drain or t.slo or t.minres or t.cost):
            return snap
        now = self.clock()
        views: dict[str, ModelView] = {}
        for mid, v in snap.models.items():
            if v.state not in RESIDENT:
                views[mid] = v  # the requester (and other unloaded models) stay as they are
                continue
            if (
                t.minres
                and v.state is ModelState.READY
                and now - self.ready_at.get(mid, -1e18) < self._minres(v)
            ):
                # Not a victim yet: shown as loading, so the planner waits for it, never fails.
                views[mid] = dataclasses.replace(v, state=ModelState.LOADING)
                continue
            if v.protected:
                views[mid] = v
                continue
            if v.busy and t.drain:
                # Shortest drain first: fewest requests in flight.
                views[mid] = dataclasses.replace(
                    v, tier_rank=-1, last_used=float(self.models[mid].in_flight)
                )
            elif not v.busy and t.slo:
                # Cold start within SLO first; then the core's order (tier, LRU).
                views[mid] = dataclasses.replace(
                    v,
                    tier_rank=-2 if self.cold_ok[mid] else -1,
                    last_used=v.tier_rank * 1e12 + v.last_used,
                )
            else:
                views[mid] = v
        out = dataclasses.replace(snap, models=views)
        return self._cost_view(out, requester) if t.cost else out


def parse_variant(name: str) -> Tuning | None:
    """``llmux+cost+minres_tts=4`` -> Tuning; None if ``name`` is not such a variant."""
    parts = name.split("+")
    if parts[0] != "llmux" or len(parts) < 2:
        return None
    flags: set[str] = set()
    minres: dict[str, float] = {}
    passover: float | None = None
    maxq: int | None = None
    try:
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key in ("cost", "drain", "slo", "prewarm") and not value:
                flags.add(key)
            elif key == "passover" and value:
                passover = float(value)
            elif key == "maxq" and value:
                maxq = int(value)
            elif key == "minres" and value:
                minres["*"] = float(value)
            elif key.startswith("minres_") and value:
                minres[key.removeprefix("minres_")] = float(value)
            else:
                return None
    except ValueError:
        return None
    return Tuning(
        cost="cost" in flags,
        drain="drain" in flags,
        slo="slo" in flags,
        prewarm="prewarm" in flags,
        minres=minres,
        passover=passover,
        maxq=maxq,
    )


def variant(name: str) -> PolicyFactory | None:
    tuning = parse_variant(name)
    if tuning is None:
        return None

    def factory(ctx: SimContext, effects: SimEffects, clock: Callable[[], float]) -> Policy:
        return TunedCore(ctx, effects, clock, tuning)

    return factory
