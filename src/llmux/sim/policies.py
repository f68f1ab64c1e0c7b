"""Policies the simulator runs: llmux's real core, and baselines with the same interface.

``llmux`` is ``llmux.scheduling.core.SchedulerCore`` itself, unmodified, fed the same events the
runtime feeds it and acting through the simulator's ``Effects``. Nothing of its rules is copied.

The baselines are models of other tools' documented or coded behaviour, written against the same
interface (``handle(event)`` in, ``Effects`` out) so they plug into the same loop and the same
metrics. They are deliberately small; each docstring says where its behaviour comes from and
what it leaves out. Shared simplifications: every model serves any number of requests at once
(the service model holds the model for the whole request), loads and stops take the scenario's
times, and memory is the configured size of each model (no fragmentation, no partial offload).
Baselines reuse two of the core's event types as their own timers: ``TtlExpired`` (keep-alive)
and ``Deadline(rid)`` ("look at this request again").
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmux.errors import InsufficientVram, ModelLoadFailed, QueueFull
from llmux.scheduling.core import SchedulerCore
from llmux.scheduling.events import (
    Acquire,
    Cancel,
    Deadline,
    Event,
    LoadFinished,
    Release,
    StopFinished,
    TtlExpired,
)
from llmux.scheduling.planner import ModelView, may_evict
from llmux.scheduling.state import ModelState, StopReason
from llmux.sim.engine import Policy, PolicyFactory, SimContext, SimEffects
from llmux.sim.scenario import GroupSpec, Scenario

_EPS = 1e-9
_RESIDENT = (ModelState.LOADING, ModelState.READY, ModelState.DRAINING, ModelState.UNLOADING)


def core_options(sc: Scenario, sleep: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``SchedulerCore`` that only scenarios with sleepers need: the host
    budget (the runtime gives the core ``host.ram_gb`` resolved the same way). Left out
    otherwise, so a scenario without ``sleep:`` builds the core exactly as before."""
    return {"host_budget_gb": sc.host_budget_gb} if sleep and sc.llmux.sleep and sc.sleepers else {}


def llmux_policy(
    ctx: SimContext,
    effects: SimEffects,
    clock: Callable[[], float],
    fallback: bool = True,
    sleep: bool = True,
) -> Policy:
    """The real ``SchedulerCore`` (DESIGN.md §3, docs/scheduling.md), on the virtual clock."""
    sc = ctx.scenario
    return SchedulerCore(
        sc.llmux_config(fallback, sleep),
        sc.budget_gb,
        effects,
        clock,
        clock,
        passover_bound=sc.llmux.passover_bound_s,
        **core_options(sc, sleep),
    )


def llmux_no_sleep_policy(
    ctx: SimContext, effects: SimEffects, clock: Callable[[], float]
) -> Policy:
    """The real core with every ``sleep:`` left out of its config: eviction stops the model,
    as before issue 12 (and as every baseline does)."""
    return llmux_policy(ctx, effects, clock, sleep=False)


def llmux_gpu_only_policy(
    ctx: SimContext, effects: SimEffects, clock: Callable[[], float]
) -> Policy:
    """The real core with every ``cpu_fallback`` left out of its config: what llmux does when
    nothing may run on the CPU (the scenario's baselines have no such feature either)."""
    return llmux_policy(ctx, effects, clock, fallback=False)


# ---------------------------------------------------------------------- baseline machinery


@dataclass
class _Model:
    model_id: str
    gb: float
    tier_rank: int
    protected: bool
    pinned: bool
    state: ModelState = ModelState.UNLOADED
    generation: int = 0
    in_flight: int = 0
    waiters: list[int] = field(default_factory=list)
    """Requests waiting for this model's next ready generation."""
    last_used: float = -math.inf
    doomed: StopReason | None = None
    """Chosen to stop: stopped once its waiters are served and its requests drained."""
    idle_since: float = 0.0

    def view(self) -> ModelView:
        return ModelView(
            self.model_id,
            self.tier_rank,
            self.protected,
            self.pinned,
            self.state,
            self.in_flight > 0,
            self.gb,
            self.last_used,
        )


class Baseline:
    """Model lifecycle shared by the baselines: load, serve, drain, stop, memory accounting.

    Subclasses decide *when* to load and *whom* to evict in ``acquire`` and ``pump``.
    """

    def __init__(self, ctx: SimContext, effects: SimEffects, clock: Callable[[], float]) -> None:
        sc = ctx.scenario
        cfg = sc.llmux_config()
        self.ctx = ctx
        self.effects = effects
        self.clock = clock
        self.budget = sc.budget_gb
        self.models = {
            mid: _Model(
                mid,
                sc.gpu_gb(mid),
                cfg.tier_rank(cfg.tier_of(mid)),
                cfg.tier_protected(cfg.tier_of(mid)),
                cfg.models[mid].pinned,
            )
            for mid in sc.models
        }
        self.leases: dict[int, tuple[str, int]] = {}
        self.pending: dict[str, float] = {}
        """Loads promised the memory their victims free."""
        self.since: dict[int, float] = {}
        """When each request arrived."""
        self.gone: set[int] = set()
        """Requests whose client left while waiting (queues drop them lazily)."""

    # -- events

    def handle(self, event: Event) -> None:
        match event:
            case Acquire():
                self.since[event.rid] = self.clock()
                self.acquire(event.rid, self.models[event.model_id])
            case Release():
                self._release(event.rid)
            case LoadFinished():
                self._loaded(event)
            case StopFinished():
                m = self.models[event.model_id]
                if m.generation == event.generation and m.state is ModelState.UNLOADING:
                    m.state = ModelState.UNLOADED
                    m.doomed = None
                    self.stopped(m)
            case TtlExpired():
                self.ttl_expired(event)
            case Deadline():
                if event.rid not in self.gone:
                    self.timer(event.rid)
            case Cancel():
                self._cancel(event.rid)
            case _:
                pass
        self.pump()

    def acquire(self, rid: int, m: _Model) -> None:
        raise NotImplementedError

    def _cancel(self, rid: int) -> None:
        if rid in self.leases:
            self._release(rid)
            return
        self.gone.add(rid)
        for m in self.models.values():
            if rid in m.waiters:
                m.waiters.remove(rid)
                if not m.waiters and m.model_id in self.pending:
                    del self.pending[m.model_id]

    def head(self, queue: deque[int]) -> int | None:
        """The first request of ``queue`` whose client is still there."""
        while queue and queue[0] in self.gone:
            queue.popleft()
        return queue[0] if queue else None

    def pump(self) -> None:
        raise NotImplementedError

    def stopped(self, m: _Model) -> None:
        """Hook: ``m`` is gone."""

    def idle(self, m: _Model) -> None:
        """Hook: ``m`` is ready and has nothing in flight."""

    def ttl_expired(self, ev: TtlExpired) -> None:
        pass

    def timer(self, rid: int) -> None:
        pass

    # -- lifecycle

    def grant(self, rid: int, m: _Model) -> None:
        m.in_flight += 1
        m.last_used = self.clock()
        self.leases[rid] = (m.model_id, m.generation)
        self.effects.grant(rid, m.model_id, m.generation)

    def serving(self, m: _Model) -> bool:
        return m.state is ModelState.READY and m.doomed is None

    def start(self, m: _Model) -> None:
        self.pending.pop(m.model_id, None)
        m.state = ModelState.LOADING
        m.generation += 1
        self.effects.start_load(m.model_id, m.generation)

    def doom(self, m: _Model, reason: StopReason = StopReason.PRIORITY) -> None:
        """Stop ``m`` once it is ready and idle; a loading model first serves its waiters."""
        if m.state in (ModelState.UNLOADED, ModelState.UNLOADING) or m.doomed is not None:
            return
        m.doomed = reason
        if m.state is ModelState.READY:
            if m.in_flight == 0:
                self._stop(m)
            else:
                m.state = ModelState.DRAINING

    def _stop(self, m: _Model) -> None:
        m.state = ModelState.UNLOADING
        self.effects.stop(m.model_id, m.generation, m.doomed or StopReason.PRIORITY)

    def _loaded(self, ev: LoadFinished) -> None:
        m = self.models[ev.model_id]
        if m.generation != ev.generation or m.state is not ModelState.LOADING:
            return
        m.state = ModelState.READY
        waiting, m.waiters = m.waiters, []
        for rid in waiting:
            self.grant(rid, m)
        if m.doomed is not None:
            if m.in_flight == 0:
                self._stop(m)
            else:
                m.state = ModelState.DRAINING
        elif m.in_flight == 0:
            m.idle_since = self.clock()
            self.idle(m)

    def _release(self, rid: int) -> None:
        lease = self.leases.pop(rid, None)
        if lease is None:
            return
        m = self.models[lease[0]]
        if m.generation != lease[1]:
            return
        m.in_flight -= 1
        if m.in_flight > 0:
            return
        if m.state is ModelState.DRAINING:
            self._stop(m)
        elif m.state is ModelState.READY:
            m.idle_since = self.clock()
            self.idle(m)

    # -- memory

    def reserved(self) -> float:
        return sum(m.gb for m in self.models.values() if m.state in _RESIDENT)

    def free_now(self, for_model: str | None = None) -> float:
        promised = sum(gb for mid, gb in self.pending.items() if mid != for_model)
        return self.budget - self.reserved() - promised

    def projected_free(self, for_model: str | None = None) -> float:
        """Free once every doomed model is gone (promised memory excluded)."""
        doomed = sum(
            m.gb for m in self.models.values() if m.state in _RESIDENT and m.doomed is not None
        )
        return self.free_now(for_model) + doomed

    def start_pending(self) -> None:
        for mid in list(self.pending):
            m = self.models[mid]
            if m.gb <= self.free_now(mid) + _EPS:
                self.start(m)

    def reject_insufficient(self, rid: int, m: _Model) -> None:
        self.effects.reject(
            rid,
            InsufficientVram(f"model '{m.model_id}' needs {m.gb:g} GB; budget {self.budget:g} GB"),
        )


class Grouping(Baseline):
    """Event-driven, no lock: requests for a ready model are served at once; requests for one
    model that is not ready wait as one group and cause one load. Models with waiters are planned
    oldest waiter first; the first that cannot be planned yet blocks the ones behind it (so a
    large model is not starved by small ones). Subclasses choose the victims."""

    def acquire(self, rid: int, m: _Model) -> None:
        if self.serving(m):
            self.grant(rid, m)
            return
        m.waiters.append(rid)

    def may_evict(self, requester: _Model, victim: _Model) -> bool:
        return not victim.pinned

    def victim_order(self, requester: _Model, candidates: list[_Model]) -> list[_Model]:
        raise NotImplementedError

    def candidates(self, requester: _Model) -> list[_Model]:
        return [
            v
            for v in self.models.values()
            if v.state is ModelState.READY
            and v.doomed is None
            and v is not requester
            and self.may_evict(requester, v)
        ]

    def choose(self, m: _Model) -> list[_Model] | None:
        """Victims that make ``m`` fit once gone (pruned of unneeded ones), or None."""
        total = self.projected_free(m.model_id)
        chosen: list[_Model] = []
        for v in self.victim_order(m, self.candidates(m)):
            if total + _EPS >= m.gb:
                break
            chosen.append(v)
            total += v.gb
        if total + _EPS < m.gb:
            return None
        for v in list(chosen):
            if total - v.gb + _EPS >= m.gb:
                chosen.remove(v)
                total -= v.gb
        return chosen

    def could_fit_later(self, m: _Model) -> bool:
        later = sum(
            v.gb
            for v in self.models.values()
            if v is not m and v.state in _RESIDENT and self.may_evict(m, v)
        )
        later += sum(gb for mid, gb in self.pending.items() if mid != m.model_id)
        return self.free_now(m.model_id) + later + _EPS >= m.gb

    def pump(self) -> None:
        progress = True
        while progress:
            progress = False
            self.start_pending()
            waiting = [
                m
                for m in self.models.values()
                if m.state is ModelState.UNLOADED and m.waiters and m.model_id not in self.pending
            ]
            waiting.sort(key=lambda m: (self.since[m.waiters[0]], m.waiters[0]))
            for m in waiting:
                if m.gb <= self.free_now(m.model_id) + _EPS:
                    self.start(m)
                    progress = True
                    break
                victims = self.choose(m)
                if victims is not None:
                    self.pending[m.model_id] = m.gb
                    for v in victims:
                        self.doom(v)
                    progress = True
                    break
                if not self.could_fit_later(m):
                    rids, m.waiters = m.waiters, []
                    for rid in rids:
                        self.reject_insufficient(rid, m)
                    progress = True
                    break
                if self.blocks(m):
                    break

    def blocks(self, m: _Model) -> bool:
        """Whether a model that must wait keeps the ones behind it from being planned."""
        return True


# ---------------------------------------------------------------------- baselines


class Floor(Grouping):
    """The compulsory-load floor: unlimited memory, so each model is loaded once, on its first
    request, and never evicted. No real system; the lower bound on loads and GB loaded for any
    policy that loads on demand."""

    def __init__(self, ctx: SimContext, effects: SimEffects, clock: Callable[[], float]) -> None:
        super().__init__(ctx, effects, clock)
        self.budget = math.inf

    def victim_order(self, requester: _Model, candidates: list[_Model]) -> list[_Model]:
        return []


class Oracle(Grouping):
    """Belady's MIN for a cache of models: evict the resident model whose next request is
    furthest in the future (L. A. Belady, "A study of replacement algorithms for a virtual-storage
    computer", IBM Systems Journal 5(2), 1966), ignoring tiers.

    A *heuristic bound*, not an optimum: MIN is optimal only for equal-size items and unit miss
    cost; here sizes, load times and SLOs differ, a busy victim must drain first, and the future
    of the voice TTS requests is their nominal time (LLM arrival + service), not the simulated
    one. It knows the whole trace in advance, which no real scheduler does."""

    def next_use(self, m: _Model) -> float:
        times = self.ctx.future.get(m.model_id, [])
        i = bisect.bisect_right(times, self.clock())
        return times[i] if i < len(times) else math.inf

    def victim_order(self, requester: _Model, candidates: list[_Model]) -> list[_Model]:
        return sorted(candidates, key=lambda v: (-self.next_use(v), v.model_id))


class OracleTiered(Oracle):
    """``oracle`` restricted to the victims DESIGN.md §3 rule 2 allows (the real planner's
    ``may_evict``: a protected tier is never evicted for a lower tier; pinned never)."""

    def may_evict(self, requester: _Model, victim: _Model) -> bool:
        return may_evict(requester.view(), victim.view())


class Strict(Grouping):
    """The seed's victim rules without its lock: DESIGN.md §3 rule 2 (the real planner's
    ``may_evict``) and the seed's strict order, lowest tier first, then least recently used,
    whether idle or busy (busy victims drain), on the same lock-free, grouped queue as llmux.
    This is the "strict tier priority" of issue 5's anchors; ``seed`` adds the lock."""

    def may_evict(self, requester: _Model, victim: _Model) -> bool:
        return may_evict(requester.view(), victim.view())

    def victim_order(self, requester: _Model, candidates: list[_Model]) -> list[_Model]:
        return sorted(candidates, key=lambda v: (v.tier_rank, v.last_used, v.model_id))


class Lru(Grouping):
    """LocalAI-style LRU by memory (mudler/LocalAI docs/content/advanced/vram-management.md, "Max
    Active Backends (LRU Eviction)"): when a model must load and does not fit, the least recently
    used loaded models are unloaded until it does, whatever their kind (no tiers). Models with
    active API calls are skipped; the load retries every ``lru.retry_interval_s`` (default 1 s),
    up to ``lru.max_retries`` (30) times, while busy models keep serving. After that LocalAI
    proceeds anyway (over-committing VRAM); the simulator, which keeps the budget, then drains
    the least recently used busy models instead.

    Left out: LocalAI's per-backend load locks and its memory estimate (here: configured size)."""

    def __init__(self, ctx: SimContext, effects: SimEffects, clock: Callable[[], float]) -> None:
        super().__init__(ctx, effects, clock)
        self.retries: dict[str, int] = {}
        self.armed: dict[int, str] = {}
        """Retry timers: the request that carries it -> the model that waits."""

    def victim_order(self, requester: _Model, candidates: list[_Model]) -> list[_Model]:
        lru = sorted(candidates, key=lambda v: (v.last_used, v.model_id))
        if self.retries.get(requester.model_id, 0) >= self.ctx.scenario.lru.max_retries:
            return lru
        return [v for v in lru if v.in_flight == 0]

    def choose(self, m: _Model) -> list[_Model] | None:
        victims = super().choose(m)
        if victims is None and m.model_id not in self.armed.values() and m.waiters:
            # Busy models were skipped: look again after the retry interval.
            self.armed[m.waiters[0]] = m.model_id
            when = self.clock() + self.ctx.scenario.lru.retry_interval_s
            self.effects.call_at(when, Deadline(m.waiters[0]))
        return victims

    def timer(self, rid: int) -> None:
        mid = self.armed.pop(rid, None)
        if mid is not None:
            self.retries[mid] = self.retries.get(mid, 0) + 1

    def start(self, m: _Model) -> None:
        super().start(m)
        self.retries.pop(m.model_id, None)

    def could_fit_later(self, m: _Model) -> bool:
        return True if m.gb <= self.budget + _EPS else super().could_fit_later(m)

    def blocks(self, m: _Model) -> bool:
        return False


class Seed(Baseline):
    """The seed's rules (DESIGN.md §3 preamble and rule 4; issue 5): a priority-tiered VRAM
    manager behind one asyncio lock. Every request takes the lock, in arrival order, to check its
    model; a request whose model is not loaded keeps the lock while it evicts and loads, so every
    request behind it waits, even for a model that is ready (head-of-line blocking). Victims are
    the models rule 2 allows, lowest tier first, least recently used first (strict order, no
    idle-first); busy victims are drained. It evicts first and fails after: if even every allowed
    victim does not free enough, they are evicted anyway and the request then fails."""

    def __init__(self, ctx: SimContext, effects: SimEffects, clock: Callable[[], float]) -> None:
        super().__init__(ctx, effects, clock)
        self.queue: deque[int] = deque()
        self.model_of: dict[int, str] = {}
        self.evicted_for: int | None = None

    def acquire(self, rid: int, m: _Model) -> None:
        self.model_of[rid] = m.model_id
        self.queue.append(rid)

    def pump(self) -> None:
        while (rid := self.head(self.queue)) is not None:
            if any(v.state is ModelState.LOADING for v in self.models.values()):
                return  # a load holds the lock to its end, even if its client left
            m = self.models[self.model_of[rid]]
            if self.evicted_for is not None and self.evicted_for != rid:
                self.evicted_for = None  # its request left
            if self.serving(m):
                self.queue.popleft()
                self.grant(rid, m)
                continue
            if m.state is not ModelState.UNLOADED:
                return  # loading (for this request), or on its way out: hold the lock and wait
            if self.evicted_for != rid:
                self.evicted_for = rid
                order = sorted(
                    (
                        v
                        for v in self.models.values()
                        if v is not m
                        and v.state is ModelState.READY
                        and v.doomed is None
                        and may_evict(m.view(), v.view())
                    ),
                    key=lambda v: (v.tier_rank, v.last_used, v.model_id),
                )
                free = self.projected_free()
                for v in order:
                    if free + _EPS >= m.gb:
                        break
                    self.doom(v)
                    free += v.gb
            if m.gb <= self.free_now() + _EPS:
                self.start(m)
                return
            if any(v.doomed is not None for v in self.models.values() if v.state in _RESIDENT):
                return  # victims still draining or stopping
            self.queue.popleft()
            self.evicted_for = None
            self.reject_insufficient(rid, m)

    def start(self, m: _Model) -> None:
        super().start(m)
        self.evicted_for = None


class LlamaSwap(Baseline):
    """llama-swap's default (mostlygeek/llama-swap, proxy/processgroup.go ``ProxyRequest`` and
    proxy/proxymanager.go ``swapProcessGroup``): all models in one group with ``swap: true``, so
    one model runs at a time. A request takes the group lock; if another model is the current one
    it is stopped with ``Process.Stop`` (which waits for its in-flight requests, those waiting for
    its start included) while the lock is held; then the lock is released and the requested model
    starts on demand, its concurrent requests waiting for that start. Requests queue on the lock
    in arrival order (Go's mutex is close to FIFO under contention). No memory check: a model
    larger than the budget fails."""

    def __init__(self, ctx: SimContext, effects: SimEffects, clock: Callable[[], float]) -> None:
        super().__init__(ctx, effects, clock)
        self.queue: deque[int] = deque()
        self.model_of: dict[int, str] = {}
        self.current: str | None = None

    def acquire(self, rid: int, m: _Model) -> None:
        self.model_of[rid] = m.model_id
        self.queue.append(rid)

    def pump(self) -> None:
        if self.current is not None:
            cur = self.models[self.current]
            if cur.state is ModelState.UNLOADED and cur.waiters:
                self.start(cur)
        while (rid := self.head(self.queue)) is not None:
            m = self.models[self.model_of[rid]]
            if m.gb > self.budget + _EPS:
                self.queue.popleft()
                self.reject_insufficient(rid, m)
                continue
            if self.current == m.model_id:
                self.queue.popleft()
                if self.serving(m):
                    self.grant(rid, m)
                else:
                    m.waiters.append(rid)
                    if m.state is ModelState.UNLOADED:
                        self.start(m)
                continue
            if self.current is not None:
                cur = self.models[self.current]
                if cur.state is not ModelState.UNLOADED:
                    self.doom(cur)
                    return  # the lock is held until the current model is gone
            self.current = m.model_id


def voice_stack_groups(sc: Scenario) -> dict[str, GroupSpec]:
    """llama-swap's groups as a user sets them up for a voice stack: the ASR and TTS models
    together in a group that never swaps and that no other group unloads, the LLMs in a group
    that swaps among itself and leaves the voice group alone."""
    voice = [mid for mid, m in sc.models.items() if m.type != "llm"]
    llms = [mid for mid, m in sc.models.items() if m.type == "llm"]
    groups: dict[str, GroupSpec] = {}
    if voice:
        groups["voice"] = GroupSpec(members=voice, swap=False, exclusive=False, persistent=True)
    if llms:
        groups["llms"] = GroupSpec(members=llms, swap=True, exclusive=False)
    return groups


@dataclass
class _Swap:
    """One swap in flight (llama-swap's ``activeSwap`` and its ``doSwap`` goroutine)."""

    target: str
    evict: list[str]
    waiters: list[int]
    stopping: set[str] = field(default_factory=set)
    """Evicted models whose stop has not finished: the target starts once this is empty."""
    ok: bool | None = None
    """Its outcome (``SwapDone``), handled after the event that settled it."""


class LlamaSwapGroups(Baseline):
    """llama-swap's current router with ``groups`` (mostlygeek/llama-swap,
    internal/router/group.go ``groupSwapper.EvictionFor``, internal/router/scheduler/fifo.go
    ``FIFO``, internal/router/base.go ``doSwap``; internal/config/config.go for the
    ``(default)`` group). By default (``llama_swap.groups: null``) the groups a user sets up for
    a voice stack (``voice_stack_groups``); any other ``groups`` can be given in the scenario.

    Eviction: starting model X stops the running members of X's group when it has ``swap``,
    and, when X's group is ``exclusive``, the running members of every other group that is not
    ``persistent``. Models in no group are in ``(default)`` (swap and exclusive).

    Scheduling (FIFO), one event at a time: a request joins the swap in flight for its model;
    else it is served at once if its model is ready, nothing needs evicting and no swap in
    flight is stopping it; else it queues if its swap would collide with one in flight (it
    would stop that swap's target, that swap stops this model, or both stop the same model) or
    would stop a model with requests in flight; else a swap starts (in parallel with others
    that do not collide): stop the evicted models (all at once), then start the target, then
    serve its waiters. The queue is re-examined in order when a swap is done and when a
    model's last request finishes, not otherwise. No memory check: a start that does not fit
    the GPU fails (as the engine would, out of memory), and its waiters get an error.

    Left out: the ``matrix`` router, ``hooks.on_startup.preload``, ``ttl``, per-model FIFO
    ``priority`` (all 0, the default), and the per-model ``concurrencyLimit`` (default 10; off
    here like every policy's, see ``llama_swap.concurrency_limit``). A failed start answers
    its waiters at once, not after the engine's own start-up time."""

    def __init__(
        self,
        ctx: SimContext,
        effects: SimEffects,
        clock: Callable[[], float],
        groups: dict[str, GroupSpec] | None = None,
    ) -> None:
        super().__init__(ctx, effects, clock)
        sc = ctx.scenario
        if groups is None:
            groups = sc.llama_swap.groups
        if groups is None:
            groups = voice_stack_groups(sc)
        self.groups = dict(groups)
        self.group_of = {mid: gid for gid, g in self.groups.items() for mid in g.members}
        orphans = [mid for mid in sc.models if mid not in self.group_of]
        if orphans:
            self.groups["(default)"] = GroupSpec(members=orphans)
            self.group_of.update({mid: "(default)" for mid in orphans})
        self.limit = sc.llama_swap.concurrency_limit
        self.active: dict[str, _Swap] = {}
        self.queue: list[int] = []
        self.model_of: dict[int, str] = {}
        self.admitted: dict[str, int] = {}
        """Per model: requests queued, waiting on a swap or in flight (concurrencyLimit)."""

    # -- the swapper (pure)

    def eviction_for(self, target: str, running: list[str]) -> list[str]:
        tg = self.groups[self.group_of[target]]
        out: list[str] = []
        for mid in running:
            if mid == target or mid in out:
                continue
            og = self.group_of[mid]
            if og == self.group_of[target]:
                if tg.swap:
                    out.append(mid)
            elif tg.exclusive and not self.groups[og].persistent:
                out.append(mid)
        return out

    # -- the FIFO scheduler

    def running_set(self, exclude: str) -> list[str]:
        live = {mid for mid, m in self.models.items() if m.state is not ModelState.UNLOADED}
        live |= {t for t in self.active if t != exclude}
        return sorted(live)

    def collides(self, target: str, evict: list[str]) -> bool:
        for tid, sw in self.active.items():
            if tid == target:
                continue
            if tid in evict or target in sw.evict or set(evict) & set(sw.evict):
                return True
        return False

    def busy(self, evict: list[str]) -> bool:
        return any(self.models[mid].in_flight > 0 for mid in evict)

    def acquire(self, rid: int, m: _Model) -> None:
        if self.limit is not None and self.admitted.get(m.model_id, 0) >= self.limit:
            self.effects.reject(rid, QueueFull(f"model '{m.model_id}': concurrency limit"))
            return
        self.admitted[m.model_id] = self.admitted.get(m.model_id, 0) + 1
        self.model_of[rid] = m.model_id
        if not self.decide(rid):
            self.queue.append(rid)

    def decide(self, rid: int) -> bool:
        """The FIFO decision tree for one request; False = it stays (or goes) in the queue."""
        mid = self.model_of[rid]
        if mid in self.active:
            self.active[mid].waiters.append(rid)
            return True
        evict = self.eviction_for(mid, self.running_set(mid))
        m = self.models[mid]
        if m.state is ModelState.READY and not evict and not self.collides(mid, evict):
            self.grant(rid, m)
            return True
        if self.collides(mid, evict) or self.busy(evict):
            return False
        sw = _Swap(mid, evict, [rid])
        self.active[mid] = sw
        for vid in evict:
            v = self.models[vid]
            if v.state is ModelState.READY:  # idle: busy ones were ruled out above
                v.doomed = StopReason.PRIORITY
                self._stop(v)
            if v.state is ModelState.UNLOADING:
                sw.stopping.add(vid)
        self.ensure_ready(sw)
        return True

    def ensure_ready(self, sw: _Swap) -> None:
        """``doSwap`` once its stops are done: start the target unless it is running."""
        if sw.stopping:
            return
        m = self.models[sw.target]
        if m.state is ModelState.READY:
            sw.ok = True
        elif m.state is ModelState.UNLOADED:
            if m.gb > self.free_now(m.model_id) + _EPS:
                sw.ok = False
            else:
                self.start(m)
        # LOADING: its LoadFinished settles it; UNLOADING: its StopFinished starts it again.

    def swap_done(self, sw: _Swap) -> None:
        del self.active[sw.target]
        m = self.models[sw.target]
        for rid in sw.waiters:
            if sw.ok:
                self.grant(rid, m)
            else:
                self._forget(rid)
                self.effects.reject(
                    rid,
                    ModelLoadFailed(
                        f"model '{m.model_id}' ({m.gb:g} GB) does not fit: "
                        f"{self.free_now(m.model_id):g} GB free"
                    ),
                )
        self.drain()

    def drain(self) -> None:
        """``drainQueue``: every queued request, in order, through the decision tree again.
        Within one pass a model found blocked stays blocked (swaps only start and leases only
        grow during it), so its later requests are kept without asking again."""
        pending, self.queue = self.queue, []
        blocked: set[str] = set()
        for rid in pending:
            if rid in self.gone:
                continue
            if self.model_of[rid] in blocked or not self.decide(rid):
                blocked.add(self.model_of[rid])
                self.queue.append(rid)

    def _forget(self, rid: int) -> None:
        mid = self.model_of.pop(rid, None)
        if mid is not None:
            self.admitted[mid] -= 1

    # -- lifecycle hooks

    def pump(self) -> None:
        """Deliver the swaps settled by the event just handled (``OnSwapDone``), one by one:
        each re-examines the queue, which may start (and settle) more."""
        while True:
            for sw in self.active.values():
                if (
                    sw.ok is None
                    and not sw.stopping
                    and self.models[sw.target].state is ModelState.READY
                ):
                    sw.ok = True
            done = next((sw for sw in self.active.values() if sw.ok is not None), None)
            if done is None:
                return
            self.swap_done(done)

    def stopped(self, m: _Model) -> None:
        for sw in list(self.active.values()):
            if m.model_id in sw.stopping:
                sw.stopping.discard(m.model_id)
                self.ensure_ready(sw)
            elif sw.target == m.model_id:
                self.ensure_ready(sw)

    def _release(self, rid: int) -> None:
        mid = self.model_of.get(rid)
        busy_before = mid is not None and self.models[mid].in_flight > 0
        super()._release(rid)
        self._forget(rid)
        if busy_before and mid is not None and self.models[mid].in_flight == 0:
            self.drain()

    def _cancel(self, rid: int) -> None:
        if rid in self.leases:
            self._release(rid)
            return
        self.gone.add(rid)  # dropped from the queue at its next pass
        for sw in self.active.values():
            if rid in sw.waiters:
                sw.waiters.remove(rid)
        self._forget(rid)


class Ollama(Baseline):
    """Ollama's scheduler (ollama/ollama server/sched.go ``processPending``,
    ``findRunnerToUnload``, ``processCompleted``), defaults: keep_alive 5 min, at most 3 loaded
    models per GPU (``defaultModelsPerGPU``).

    One loop takes pending requests in order. A request for a loaded runner is served. Otherwise,
    with 3 runners loaded, or when the model does not fit, it picks a runner to unload: runners
    sorted by keep-alive duration (all equal here: 5 min), then by name (``ByDurationAndName``);
    the first idle one, else the first one (expired when its requests finish). The loop then
    blocks until that unload is done ("we're queueing up all incoming requests, even if they were
    for a different model that's loaded", sched.go): head-of-line blocking. While another model is
    loading, a request that needs a load goes to the back of the queue after 250 ms
    (``reschedDelay``). A runner idle for keep_alive is unloaded.

    Left out: partial CPU offload (here a model must fit), ``OLLAMA_NUM_PARALLEL`` (here no limit
    on concurrent requests per runner), VRAM-recovery polling (here ``stop_s``)."""

    def __init__(self, ctx: SimContext, effects: SimEffects, clock: Callable[[], float]) -> None:
        super().__init__(ctx, effects, clock)
        self.queue: deque[int] = deque()
        self.model_of: dict[int, str] = {}
        self.waiting_unload: str | None = None
        self.spec = ctx.scenario.ollama

    def acquire(self, rid: int, m: _Model) -> None:
        self.model_of[rid] = m.model_id
        self.queue.append(rid)

    def loaded(self) -> list[_Model]:
        return [
            m
            for m in self.models.values()
            if m.state in (ModelState.LOADING, ModelState.READY, ModelState.DRAINING)
        ]

    def find_runner_to_unload(self) -> _Model | None:
        runners = sorted(self.loaded(), key=lambda m: (self.spec.keep_alive_s, m.model_id))
        for r in runners:
            if r.state is ModelState.READY and r.in_flight == 0:
                return r
        return runners[0] if runners else None

    def pump(self) -> None:
        while self.waiting_unload is None and (rid := self.head(self.queue)) is not None:
            m = self.models[self.model_of[rid]]
            if m.state in (ModelState.READY, ModelState.DRAINING):
                self.queue.popleft()
                self.grant(rid, m)
                continue
            if m.state is ModelState.LOADING:
                self.queue.popleft()
                m.waiters.append(rid)
                continue
            if m.state is ModelState.UNLOADING:
                self.waiting_unload = m.model_id  # its old runner is still going away
                return
            loaded = self.loaded()
            victim: _Model | None = None
            if len(loaded) >= self.spec.max_loaded:
                victim = self.find_runner_to_unload()
            elif any(x.state is ModelState.LOADING for x in loaded):
                self.queue.popleft()
                self.effects.call_at(self.clock() + self.spec.resched_delay_s, Deadline(rid))
                continue
            elif not loaded or m.gb <= self.free_now() + _EPS:
                if m.gb > self.budget + _EPS:
                    self.queue.popleft()
                    self.reject_insufficient(rid, m)
                    continue
                self.queue.popleft()
                m.waiters.append(rid)
                self.start(m)
                continue
            elif any(x.state is ModelState.UNLOADING for x in self.models.values()):
                # Memory is on its way back: wait for that unload.
                self.waiting_unload = next(
                    x.model_id for x in self.models.values() if x.state is ModelState.UNLOADING
                )
                return
            else:
                victim = self.find_runner_to_unload()
            if victim is None:
                self.queue.popleft()
                self.reject_insufficient(rid, m)
                continue
            self.doom(victim)
            self.waiting_unload = victim.model_id

    def stopped(self, m: _Model) -> None:
        if self.waiting_unload == m.model_id:
            self.waiting_unload = None

    def timer(self, rid: int) -> None:
        self.queue.append(rid)  # back of the queue after reschedDelay

    def idle(self, m: _Model) -> None:
        self.effects.call_at(
            self.clock() + self.spec.keep_alive_s, TtlExpired(m.model_id, m.generation)
        )

    def ttl_expired(self, ev: TtlExpired) -> None:
        m = self.models[ev.model_id]
        if (
            m.generation == ev.generation
            and self.serving(m)
            and m.in_flight == 0
            and self.clock() - m.idle_since + 1e-6 >= self.spec.keep_alive_s
        ):
            self.doom(m, StopReason.TTL)


POLICIES: dict[str, PolicyFactory] = {
    "llmux": llmux_policy,
    "llmux-gpu-only": llmux_gpu_only_policy,
    "llmux-no-sleep": llmux_no_sleep_policy,
    "seed": Seed,
    "strict": Strict,
    "llama-swap": LlamaSwap,
    "llama-swap-groups": LlamaSwapGroups,
    "ollama": Ollama,
    "lru": Lru,
    "oracle": Oracle,
    "oracle-tiered": OracleTiered,
    "floor": Floor,
}
"""Every policy by name. Experimental variants of llmux live in ``llmux.sim.experiments``."""
