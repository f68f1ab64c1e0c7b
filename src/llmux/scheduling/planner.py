"""The pure eviction planner: given a snapshot, decide how model M can be loaded.

No I/O, no logging, no clock: a function of its input only, so every rule is a table test.

Memory accounting (GB):

* ``reserved``: reservations of models that are loading, ready, draining or unloading (rule 1).
* *doomed* models (draining, unloading) will give their reservation back.
* *pending* loads were promised memory that doomed models free; nobody else may take it.
* ``free_now = budget - reserved - promised_now`` where ``promised_now`` is what pending loads
  need beyond what doomed models will free -- conservatively, all pending needs.
* ``projected_free = budget - (reserved - doomed) - pending``: free once every doomed model is gone
  and every pending load has started.

Decision for M with need ``n``:

1. ``n <= free_now`` (and so ``<= projected_free``): **Start** now.
2. ``n <= projected_free``: **Promise**, no new victims (waits for doomed models to go).
3. Victims from the ready models M may evict (rule 2): idle before busy, each group lowest tier
   first then least recently used (rule 3), until ``projected_free + victims >= n``; victims that
   turn out unnecessary are dropped again (never waste an eviction). **Promise(victims)**.
4. Not enough ready victims, but loading models or pending loads that M may evict would make it
   fit once done: **Wait**, evicting nothing (rule 4: plan, then act).
5. Otherwise **Infeasible**: nothing is evicted; the holders are named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmux.scheduling.state import DOOMED, RESIDENT, ModelState

_EPS = 1e-9


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
    last_used: float
    """Ordering key for LRU; smaller = used longer ago."""


@dataclass(frozen=True)
class Snapshot:
    budget_gb: float
    models: Mapping[str, ModelView]
    pending: Mapping[str, float]
    """Loads promised memory but not started yet: model id -> need (GB)."""


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class Promise:
    victims: tuple[str, ...]
    """To evict now: idle ones are stopped at once, busy ones drain first."""


@dataclass(frozen=True)
class Wait:
    pass


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
    """Rule 3 within rule 4: idle before busy; lowest tier first; least recently used first."""
    return sorted(views, key=lambda v: (v.busy, v.tier_rank, v.last_used, v.model_id))


def reserved_gb(snapshot: Snapshot) -> float:
    return sum(v.reservation_gb for v in snapshot.models.values() if v.state in RESIDENT)


def plan_load(snapshot: Snapshot, model_id: str) -> Decision:
    """Decide how ``model_id`` (currently unloaded, not pending) can be loaded."""
    me = snapshot.models[model_id]
    need = me.reservation_gb
    resident = [v for v in snapshot.models.values() if v.state in RESIDENT]
    reserved = sum(v.reservation_gb for v in resident)
    doomed = sum(v.reservation_gb for v in resident if v.state in DOOMED)
    pending = sum(gb for mid, gb in snapshot.pending.items() if mid != model_id)
    free_now = snapshot.budget_gb - reserved - pending
    projected_free = snapshot.budget_gb - (reserved - doomed) - pending

    if need <= free_now + _EPS:
        return Start()
    if need <= projected_free + _EPS:
        return Promise(())

    # A model that holds no VRAM (placed on the CPU) frees nothing: never a victim.
    allowed = [
        v for v in resident if v.state not in DOOMED and may_evict(me, v) and v.reservation_gb > 0
    ]
    candidates = eviction_order([v for v in allowed if v.state is ModelState.READY])
    chosen: list[ModelView] = []
    total = projected_free
    for v in candidates:
        if total + _EPS >= need:
            break
        chosen.append(v)
        total += v.reservation_gb
    if total + _EPS >= need:
        # Drop victims that the later, larger ones made unnecessary.
        for v in list(chosen):
            if total - v.reservation_gb + _EPS >= need:
                chosen.remove(v)
                total -= v.reservation_gb
        return Promise(tuple(v.model_id for v in chosen))

    later = sum(v.reservation_gb for v in allowed if v.state is ModelState.LOADING)
    later += sum(
        gb
        for mid, gb in snapshot.pending.items()
        if mid != model_id and may_evict(me, snapshot.models[mid])
    )
    if total + later + _EPS >= need:
        return Wait()

    allowed_ids = {v.model_id for v in allowed}
    holders = [
        (v.model_id, v.reservation_gb)
        for v in resident
        if v.state not in DOOMED and v.model_id not in allowed_ids and v.reservation_gb > 0
    ]
    holders += [
        (mid, gb)
        for mid, gb in snapshot.pending.items()
        if mid != model_id and not may_evict(me, snapshot.models[mid])
    ]
    return Infeasible(need, snapshot.budget_gb, tuple(sorted(holders)))
