"""The pure eviction planner: given a snapshot, decide how model M can be loaded (or woken).

No I/O, no logging, no clock: a function of its input only, so every rule is a table test.

Memory accounting (GB):

* ``reserved``: reservations of resident models (rule 1): loading, ready, draining, unloading,
  suspending, waking models hold their whole reservation, a sleeping one its residual.
* *doomed* models (draining, unloading, suspending) will give back ``returns_gb``: their
  reservation, less the residual of one that goes to sleep.
* *pending* loads were promised memory that doomed models free; nobody else may take it.
* ``free_now = budget - reserved - promised_now`` where ``promised_now`` is what pending loads
  need beyond what doomed models will free -- conservatively, all pending needs.
* ``projected_free = budget - (reserved - returns) - pending``: free once every doomed model is
  gone (or asleep) and every pending load has started.

M's need ``n`` is its whole reservation less what it holds now (a sleeper's residual).

1. ``n <= free_now`` (and so ``<= projected_free``): **Start** (load, or wake) now.
2. ``n <= projected_free``: **Promise**, no new victims (waits for doomed models to go).
3. Victims among the ready and sleeping models M may evict (rule 2), in rule-3 order (see
   ``eviction_order``), until ``projected_free + freed >= n``; victims that turn out unnecessary
   are dropped again (never waste an eviction). A ready victim with ``sleep:`` is put to sleep
   (it keeps its residual) if its host reservation fits the host budget, with sleepers M may
   evict stopped, least recently used first, to make host room (rule 11); otherwise it is
   stopped. A sleeping victim is stopped (rule 13). **Promise(victims, sleep)**.
4. Not enough victims now, but loading or waking models or pending loads that M may evict would
   make it fit once done: **Wait**, evicting nothing (rule 4: plan, then act).
5. Otherwise **Infeasible**: nothing is evicted; the holders are named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmux.scheduling.state import DOOMED, RESIDENT, ModelState

_EPS = 1e-9
_INF = float("inf")


@dataclass(frozen=True)
class ModelView:
    """What the planner knows of one model."""

    model_id: str
    tier_rank: int
    protected: bool
    pinned: bool
    state: ModelState
    busy: bool
    """Requests in flight (or, for a loading model, waiters)."""
    reservation_gb: float
    """What it holds now if resident (a sleeper: its residual); an unloaded model's need."""
    last_used: float
    """Ordering key for LRU; smaller = used longer ago."""
    full_gb: float | None = None
    """What it holds once loaded or awake; None = ``reservation_gb``."""
    residual_gb: float | None = None
    """What it would keep if put to sleep; None = it cannot sleep (eviction stops it)."""
    host_gb: float = 0.0
    """Host memory it needs while asleep (level 1)."""
    host_held_gb: float = 0.0
    """Host memory it holds now, or was promised (a model draining to sleep)."""
    returns_gb: float | None = None
    """A doomed model: what it gives back once evicted (None = ``reservation_gb``)."""
    load_s: float = 0.0
    """What a cold load of it costs, seconds (measured; 0 = not known yet)."""
    wake_s: float = 0.0
    """What a wake of it costs, seconds (measured; 0 = not known yet)."""
    waited_s: float = 0.0
    """The requester: how long its oldest waiting request has waited."""
    drain_s: float = 0.0
    """A busy model: the expected seconds until its requests in flight are done."""
    in_flight: int = 0
    """Requests holding a lease on it."""
    queued: int = 0
    """Requests waiting for it."""

    @property
    def start_s(self) -> float:
        """What bringing it in costs now: a wake if it sleeps, else a cold load."""
        return self.wake_s if self.state is ModelState.SLEEPING else self.load_s

    @property
    def restore_s(self) -> float:
        """What bringing it back costs once evicted: a wake if it can sleep, else a cold load."""
        return self.wake_s if self.residual_gb is not None else self.load_s

    @property
    def need_gb(self) -> float:
        """What loading (or waking) it takes beyond what it holds."""
        full = self.reservation_gb if self.full_gb is None else self.full_gb
        held = self.reservation_gb if self.state is ModelState.SLEEPING else 0.0
        return max(0.0, full - held)

    @property
    def returning_gb(self) -> float:
        return self.reservation_gb if self.returns_gb is None else self.returns_gb


@dataclass(frozen=True)
class Snapshot:
    budget_gb: float
    models: Mapping[str, ModelView]
    pending: Mapping[str, float]
    """Loads promised memory but not started yet: model id -> need (GB)."""
    host_budget_gb: float = _INF
    """Host memory sleeping models may hold in all (``host.ram_gb``)."""
    patience: float = 0.0
    """Swap patience (rule 3, same-tier contention): a busy victim is drained for a requester
    only once the requester's oldest request has waited ``patience`` x the swap's cost (the
    requester's start, the victim's expected drain and its restore, all measured), at most
    ``patience_max_s``; idle victims are taken at once. 0 = busy victims at once."""
    patience_max_s: float = 180.0


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class Promise:
    victims: tuple[str, ...]
    """To evict now: idle ones at once, busy ones drain first."""
    sleep: frozenset[str] = frozenset()
    """The victims that go to sleep instead of stopping (rule 11)."""


@dataclass(frozen=True)
class Wait:
    retry_in_s: float | None = None
    """A busy victim becomes eligible (swap patience) in this many seconds: plan again then."""


@dataclass(frozen=True)
class Infeasible:
    need_gb: float
    budget_gb: float
    holders: tuple[tuple[str, float], ...]
    """Models whose memory this request may not take: (id, GB)."""


Decision = Start | Promise | Wait | Infeasible


def may_evict(requester: ModelView, victim: ModelView) -> bool:
    """Rule 2: not pinned, and either the victim's tier is not above the requester's or it is
    not protected. Same-tier replacement is allowed."""
    if victim.pinned or victim.model_id == requester.model_id:
        return False
    return victim.tier_rank <= requester.tier_rank or not victim.protected


def eviction_order(views: Sequence[ModelView]) -> list[ModelView]:
    """Rule 3 within rule 4: idle before busy; lowest tier first; within a tier, models that can
    sleep before those that must stop (a wake costs about a second, a cold load many), and
    sleepers last (stopping one frees little and turns its next wake into a cold load); then
    least recently used first."""
    return sorted(
        views, key=lambda v: (v.busy, v.tier_rank, _cost_class(v), v.last_used, v.model_id)
    )


def _cost_class(v: ModelView) -> int:
    if v.state is ModelState.SLEEPING:
        return 2
    return 0 if v.residual_gb is not None else 1


def reserved_gb(snapshot: Snapshot) -> float:
    return sum(v.reservation_gb for v in snapshot.models.values() if v.state in RESIDENT)


def host_reserved_gb(snapshot: Snapshot) -> float:
    return sum(v.host_held_gb for v in snapshot.models.values())


def host_free_gb(snapshot: Snapshot) -> float:
    """Host memory free for new sleeps once the stops under way are done: the budget less what
    models hold or were promised, plus what sleepers being stopped give back."""
    returning = sum(
        v.host_held_gb for v in snapshot.models.values() if v.state is ModelState.UNLOADING
    )
    return snapshot.host_budget_gb - host_reserved_gb(snapshot) + returning


def _stoppable_sleeper(snapshot: Snapshot, who: ModelView, v: ModelView) -> bool:
    """A sleeper ``who`` may stop for room: not one promised a wake (its waiters count as in
    flight, rule 5), and one rule 2 lets it evict."""
    return (
        v.state is ModelState.SLEEPING
        and v.model_id != who.model_id
        and v.model_id not in snapshot.pending
        and may_evict(who, v)
    )


def host_room(
    snapshot: Snapshot, model_id: str, requester: str | None = None
) -> tuple[str, ...] | None:
    """Rule 11 for one model going to sleep: the sleepers to stop (least recently used first,
    only those ``requester`` -- by default the model itself -- may evict) so that its host
    reservation fits the host budget; ``()`` if it fits already; None if it cannot fit."""
    me = snapshot.models[model_id]
    who = snapshot.models[requester or model_id]
    free = host_free_gb(snapshot)
    if me.host_gb <= free + _EPS:
        return ()
    out: list[str] = []
    sleepers = [
        v
        for v in snapshot.models.values()
        if v.host_held_gb > 0 and v.model_id != model_id and _stoppable_sleeper(snapshot, who, v)
    ]
    for v in sorted(sleepers, key=lambda v: (v.tier_rank, v.last_used, v.model_id)):
        out.append(v.model_id)
        free += v.host_held_gb
        if me.host_gb <= free + _EPS:
            return tuple(out)
    return None


def patience_s(snapshot: Snapshot, me: ModelView, victim: ModelView) -> float:
    """How long ``me``'s oldest request must have waited before busy ``victim`` may be drained
    for it: the swap's cost (``me``'s start, the victim's expected drain and its restore) x
    ``patience``, capped."""
    if not victim.busy or snapshot.patience <= 0:
        return 0.0
    cost = me.start_s + victim.drain_s + victim.restore_s
    return min(snapshot.patience_max_s, snapshot.patience * cost)


def plan_load(snapshot: Snapshot, model_id: str) -> Decision:
    """Decide how ``model_id`` (unloaded or sleeping, not pending) can be loaded or woken."""
    me = snapshot.models[model_id]
    need = me.need_gb
    resident = [v for v in snapshot.models.values() if v.state in RESIDENT]
    reserved = sum(v.reservation_gb for v in resident)
    returns = sum(v.returning_gb for v in resident if v.state in DOOMED)
    pending = sum(gb for mid, gb in snapshot.pending.items() if mid != model_id)
    free_now = snapshot.budget_gb - reserved - pending
    projected_free = snapshot.budget_gb - (reserved - returns) - pending

    if need <= free_now + _EPS:
        return Start()
    if need <= projected_free + _EPS:
        return Promise(())

    # A model that holds no VRAM (placed on the CPU) frees nothing: never a victim.
    allowed = [
        v
        for v in resident
        if v.state not in DOOMED
        and may_evict(me, v)
        and v.reservation_gb > 0
        and v.model_id != model_id
    ]
    # A sleeper promised a wake is not a victim: its waiters count as in flight (rule 5).
    evictable = [
        v
        for v in allowed
        if v.state is ModelState.READY
        or (v.state is ModelState.SLEEPING and v.model_id not in snapshot.pending)
    ]
    # Swap patience: a busy victim only once the requester has waited long enough for the swap
    # to be worth its cost; until then, plan again when the first of them becomes eligible.
    not_yet = {
        v.model_id: patience_s(snapshot, me, v) - me.waited_s
        for v in evictable
        if patience_s(snapshot, me, v) > me.waited_s + _EPS
    }
    candidates = eviction_order([v for v in evictable if v.model_id not in not_yet])
    # Host memory a sleep may use: the budget less what sleepers M may not evict hold (those it
    # may evict can be stopped to make room), less what earlier sleeps of this plan take.
    # Host memory a sleep of this plan may use: what is free once the stops under way are done,
    # plus what the sleepers M may stop hold; less what earlier sleeps of this plan take.
    host_cap = host_free_gb(snapshot) + sum(
        v.host_held_gb for v in evictable if v.state is ModelState.SLEEPING
    )
    chosen: list[ModelView] = []
    sleeps: set[str] = set()
    frees: dict[str, float] = {}
    total = projected_free
    for v in candidates:
        if total + _EPS >= need:
            break
        chosen.append(v)
        if (
            v.state is ModelState.READY
            and v.residual_gb is not None
            and v.host_gb <= host_cap + _EPS
        ):
            sleeps.add(v.model_id)
            host_cap -= v.host_gb
            frees[v.model_id] = v.reservation_gb - v.residual_gb
        else:
            frees[v.model_id] = v.reservation_gb
        total += frees[v.model_id]
    # A sleep keeps the victim's residual: where every allowed victim is taken and the plan
    # still does not fit, victims stop instead of sleeping, the last chosen first, until it
    # does (rule 4: a stop frees what a sleep keeps).
    for v in reversed(chosen):
        if total + _EPS >= need:
            break
        if v.model_id in sleeps and v.residual_gb is not None:
            sleeps.discard(v.model_id)
            frees[v.model_id] = v.reservation_gb
            total += v.residual_gb
    if total + _EPS >= need:
        # Drop victims that the later, larger ones made unnecessary.
        for v in list(chosen):
            if total - frees[v.model_id] + _EPS >= need:
                chosen.remove(v)
                sleeps.discard(v.model_id)
                total -= frees[v.model_id]
        victims = [v.model_id for v in chosen]
        victims += _host_room_for(snapshot, me, chosen, sleeps, allowed)
        return Promise(tuple(victims), frozenset(sleeps))

    later = sum(
        v.reservation_gb for v in allowed if v.state in (ModelState.LOADING, ModelState.WAKING)
    )
    later += sum(
        gb
        for mid, gb in snapshot.pending.items()
        if mid != model_id and may_evict(me, snapshot.models[mid])
    )
    # A sleeper promised a wake holds its residual now; once awake M may evict it.
    later += sum(
        v.reservation_gb
        for v in resident
        if v.state is ModelState.SLEEPING
        and v.model_id in snapshot.pending
        and v.model_id != model_id
        and may_evict(me, v)
    )
    # A model on its way to sleep keeps its residual; once asleep M may stop it (rule 13).
    later += sum(
        v.reservation_gb - v.returning_gb
        for v in resident
        if v.state in DOOMED
        and v.state is not ModelState.UNLOADING
        and v.model_id != model_id
        and may_evict(me, v)
    )
    soon = sum(snapshot.models[mid].reservation_gb for mid in not_yet)
    if total + later + soon + _EPS >= need:
        return Wait(retry_in_s=min(not_yet.values()) if not_yet else None)

    allowed_ids = {v.model_id for v in allowed}
    holders = [
        (v.model_id, v.reservation_gb)
        for v in resident
        if v.state not in DOOMED
        and v.model_id not in allowed_ids
        and v.reservation_gb > 0
        and v.model_id != model_id
    ]
    holders += [
        (mid, gb)
        for mid, gb in snapshot.pending.items()
        if mid != model_id and not may_evict(me, snapshot.models[mid])
    ]
    return Infeasible(need, snapshot.budget_gb, tuple(sorted(holders)))


def _host_room_for(
    snapshot: Snapshot,
    me: ModelView,
    chosen: Sequence[ModelView],
    sleeps: set[str],
    allowed: Sequence[ModelView],
) -> list[str]:
    """Sleepers to stop, least recently used first, so the plan's sleeps fit the host budget."""
    want = sum(v.host_gb for v in chosen if v.model_id in sleeps)
    if want <= 0:
        return []
    stopped = {v.model_id for v in chosen}
    free = host_free_gb(snapshot)
    free += sum(v.host_held_gb for v in chosen if v.state is ModelState.SLEEPING)
    extra: list[str] = []
    sleepers = [
        v
        for v in allowed
        if v.host_held_gb > 0 and v.model_id not in stopped and _stoppable_sleeper(snapshot, me, v)
    ]
    for v in sorted(sleepers, key=lambda v: (v.tier_rank, v.last_used, v.model_id)):
        if want <= free + _EPS:
            break
        extra.append(v.model_id)
        free += v.host_held_gb
    return extra
