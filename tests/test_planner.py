"""Table tests of the pure eviction planner (DESIGN.md §3, rules 1-5 and 9).

Each case builds a ``Snapshot`` by hand: default tiers ``llm`` (rank 0) < ``tts`` (1) < ``asr``
(2, protected), a budget of 10 GB unless a case says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from llmux.scheduling.planner import (
    Decision,
    Infeasible,
    ModelView,
    Promise,
    Snapshot,
    Start,
    Wait,
    eviction_order,
    host_free_gb,
    host_room,
    may_evict,
    plan_load,
    reserved_gb,
)
from llmux.scheduling.state import ModelState

U = ModelState.UNLOADED
L = ModelState.LOADING
R = ModelState.READY
D = ModelState.DRAINING
X = ModelState.UNLOADING
S = ModelState.SLEEPING
Z = ModelState.SUSPENDING
W = ModelState.WAKING

TIERS: Mapping[str, tuple[int, bool]] = {"llm": (0, False), "tts": (1, False), "asr": (2, True)}
"""The default tiers: name -> (rank, protected)."""


def mv(
    model_id: str,
    tier: str,
    gb: float,
    state: ModelState = U,
    *,
    busy: bool = False,
    used: float = 0.0,
    pinned: bool = False,
    protected: bool | None = None,
    full: float | None = None,
    residual: float | None = None,
    host: float = 0.0,
    held: float = 0.0,
    returns: float | None = None,
    load_s: float = 0.0,
    wake_s: float = 0.0,
    waited: float = 0.0,
    drain: float = 0.0,
) -> ModelView:
    """``residual`` (set: it can sleep), ``host`` (host GB it needs asleep), ``held`` (host GB
    it holds now), ``full`` (a sleeper's whole reservation), ``returns`` (a doomed model's);
    ``load_s``/``wake_s`` (measured costs), ``waited`` (a requester's oldest wait, seconds),
    ``drain`` (a busy model's expected drain, seconds)."""
    rank, tier_protected = TIERS[tier]
    return ModelView(
        model_id=model_id,
        tier_rank=rank,
        protected=tier_protected if protected is None else protected,
        pinned=pinned,
        state=state,
        busy=busy,
        reservation_gb=gb,
        last_used=used,
        full_gb=full,
        residual_gb=residual,
        host_gb=host,
        host_held_gb=held,
        returns_gb=returns,
        load_s=load_s,
        wake_s=wake_s,
        waited_s=waited,
        drain_s=drain,
    )


@dataclass(frozen=True)
class Case:
    want: str
    """The model to plan (unloaded, not pending)."""
    models: Sequence[ModelView]
    expect: Decision
    pending: Mapping[str, float] = field(default_factory=dict)
    budget: float = 10.0
    host_budget: float = float("inf")
    patience: float = 0.0
    patience_max: float = 30.0

    def snapshot(self) -> Snapshot:
        return Snapshot(
            self.budget,
            {v.model_id: v for v in self.models},
            dict(self.pending),
            self.host_budget,
            self.patience,
            self.patience_max,
        )


def infeasible(need: float, *holders: tuple[str, float], budget: float = 10.0) -> Infeasible:
    return Infeasible(need, budget, tuple(holders))


PLAN_CASES: list[tuple[str, Case]] = [
    # ---------------------------------------------------------------- rule 1: budget
    ("budget/empty-gpu-starts", Case("a", [mv("a", "llm", 6)], Start())),
    (
        "budget/exact-fit-starts",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 4, R)], Start()),
    ),
    (
        "budget/fits-beside-busy-and-pinned",
        Case(
            "a",
            [mv("a", "tts", 2), mv("b", "llm", 4, R, busy=True), mv("c", "asr", 3, R, pinned=True)],
            Start(),
        ),
    ),
    ("budget/larger-than-gpu", Case("a", [mv("a", "llm", 12)], infeasible(12))),
    (
        "budget/fractional-sum-fits",
        Case(
            "a",
            [mv("a", "llm", 0.3), mv("b", "tts", 0.1, R), mv("c", "asr", 0.2, R)],
            Start(),
            budget=0.6,
        ),
        # 0.1 + 0.2 + 0.3 is not exactly 0.6 in floating point; the planner must not care.
    ),
    # ---------------------------------------------------------------- rule 2: tiers
    (
        "tiers/llm-evicts-llm",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, R)], Promise(("b",))),
    ),
    (
        "tiers/llm-evicts-tts",
        Case("a", [mv("a", "llm", 6), mv("b", "tts", 6, R)], Promise(("b",))),
    ),
    (
        "tiers/llm-never-evicts-asr",
        Case("a", [mv("a", "llm", 6), mv("b", "asr", 6, R)], infeasible(6, ("b", 6))),
    ),
    (
        "tiers/llm-never-evicts-busy-asr-either",
        Case("a", [mv("a", "llm", 6), mv("b", "asr", 6, R, busy=True)], infeasible(6, ("b", 6))),
    ),
    (
        "tiers/tts-evicts-llm",
        Case("a", [mv("a", "tts", 6), mv("b", "llm", 6, R)], Promise(("b",))),
    ),
    (
        "tiers/tts-evicts-tts",
        Case("a", [mv("a", "tts", 6), mv("b", "tts", 6, R)], Promise(("b",))),
    ),
    (
        "tiers/tts-never-evicts-asr",
        Case("a", [mv("a", "tts", 6), mv("b", "asr", 6, R)], infeasible(6, ("b", 6))),
    ),
    (
        "tiers/asr-evicts-llm",
        Case("a", [mv("a", "asr", 6), mv("b", "llm", 6, R)], Promise(("b",))),
    ),
    (
        "tiers/asr-evicts-tts",
        Case("a", [mv("a", "asr", 6), mv("b", "tts", 6, R)], Promise(("b",))),
    ),
    (
        "tiers/asr-evicts-asr-same-tier",
        Case("a", [mv("a", "asr", 6), mv("b", "asr", 6, R)], Promise(("b",))),
    ),
    (
        "tiers/asr-evicts-everything-it-needs",
        Case(
            "a",
            [mv("a", "asr", 10), mv("b", "llm", 3, R), mv("c", "tts", 3, R), mv("d", "asr", 4, R)],
            Promise(("b", "c", "d")),
        ),
    ),
    (
        "tiers/pinned-llm-never-evicted-by-llm",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, R, pinned=True)], infeasible(6, ("b", 6))),
    ),
    (
        "tiers/pinned-llm-never-evicted-by-asr",
        Case("a", [mv("a", "asr", 6), mv("b", "llm", 6, R, pinned=True)], infeasible(6, ("b", 6))),
    ),
    (
        "tiers/pinned-asr-never-evicted-by-asr",
        Case("a", [mv("a", "asr", 6), mv("b", "asr", 6, R, pinned=True)], infeasible(6, ("b", 6))),
    ),
    (
        "tiers/pinned-skipped-unpinned-taken",
        Case(
            "a",
            [mv("a", "llm", 6), mv("p", "llm", 4, R, pinned=True), mv("b", "tts", 6, R, used=9)],
            Promise(("b",)),
        ),
    ),
    (
        "tiers/protected-middle-tier-shields-from-below",
        Case(
            "a",
            [mv("a", "llm", 6), mv("b", "tts", 6, R, protected=True)],
            infeasible(6, ("b", 6)),
        ),
    ),
    (
        "tiers/unprotected-top-tier-evictable-from-below",
        Case("a", [mv("a", "llm", 6), mv("b", "asr", 6, R, protected=False)], Promise(("b",))),
    ),
    # ---------------------------------------------------------------- rule 3: order
    (
        "order/lowest-tier-first",
        Case(
            "a",
            [mv("a", "asr", 4), mv("t", "tts", 4, R, used=1), mv("l", "llm", 4, R, used=5)],
            Promise(("l",)),
            budget=10,
        ),
    ),
    (
        "order/lru-within-tier",
        Case(
            "a",
            [mv("a", "llm", 4), mv("new", "llm", 4, R, used=5), mv("old", "llm", 4, R, used=1)],
            Promise(("old",)),
        ),
    ),
    (
        "order/never-used-is-least-recent",
        Case(
            "a",
            [
                mv("a", "llm", 4),
                mv("used", "llm", 4, R, used=1),
                mv("never", "llm", 4, R, used=float("-inf")),
            ],
            Promise(("never",)),
        ),
    ),
    (
        "order/idle-before-busy-even-across-tiers",
        Case(
            "a",
            [
                mv("a", "asr", 4),
                mv("busy", "llm", 4, R, busy=True),
                mv("idle", "tts", 4, R, used=9),
            ],
            Promise(("idle",)),
        ),
    ),
    (
        "order/busy-victim-when-nothing-idle-suffices",
        Case("a", [mv("a", "llm", 8), mv("b", "llm", 8, R, busy=True)], Promise(("b",))),
    ),
    (
        "order/loading-model-is-never-a-victim",
        Case(
            "a",
            [mv("a", "llm", 4), mv("loading", "llm", 4, L), mv("ready", "llm", 4, R, busy=True)],
            Promise(("ready",)),
        ),
    ),
    # ---------------------------------------------------------------- rule 4: plan, then act
    (
        "plan/whole-victim-set-named-at-once",
        Case(
            "a",
            [mv("a", "llm", 8), mv("b", "llm", 4, R, used=1), mv("c", "tts", 4, R, used=2)],
            Promise(("b", "c")),
        ),
    ),
    (
        "plan/three-victims-in-rule-order",
        Case(
            "a",
            [
                mv("a", "asr", 9),
                mv("t", "tts", 3, R, used=1),
                mv("l2", "llm", 3, R, used=7),
                mv("l1", "llm", 3, R, used=3),
            ],
            Promise(("l1", "l2", "t")),
        ),
    ),
    (
        "plan/unnecessary-idle-victim-pruned",
        # Idle 1 GB tts comes first in order, but the busy 8 GB llm must go anyway and suffices.
        Case(
            "a",
            [mv("a", "llm", 8), mv("t", "tts", 1, R), mv("l", "llm", 8, R, busy=True)],
            Promise(("l",)),
            budget=10,
        ),
    ),
    (
        "plan/several-small-victims-pruned-by-one-large",
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("s1", "llm", 1, R, used=1),
                mv("s2", "llm", 1, R, used=2),
                mv("big", "llm", 8, R, busy=True),
            ],
            Promise(("big",)),
        ),
    ),
    (
        "plan/prune-keeps-a-lower-tier-model-a-larger-victim-made-unneeded",
        # Rule-3 order takes l (llm) then t (tts); t alone suffices, so l stays (no eviction is
        # wasted; docs/scheduling.md). A literal "lowest tier first" would have evicted both.
        Case(
            "a",
            [mv("a", "llm", 6), mv("l", "llm", 2, R), mv("t", "tts", 5, R)],
            Promise(("t",)),
        ),
    ),
    (
        "plan/only-the-needed-prefix",
        Case(
            "a",
            [mv("a", "llm", 4), mv("b", "llm", 4, R, used=1), mv("c", "llm", 4, R, used=2)],
            Promise(("b",)),
        ),
    ),
    (
        "plan/seed-bug-llm-cannot-fit-after-every-tts",
        # ASR (protected) holds 6 GB: even evicting both TTS (one busy) frees too little for 5 GB.
        Case(
            "a",
            [
                mv("a", "llm", 5),
                mv("asr", "asr", 6, R),
                mv("t1", "tts", 2, R),
                mv("t2", "tts", 1, R, busy=True),
            ],
            infeasible(5, ("asr", 6)),
        ),
    ),
    (
        "plan/seed-bug-names-every-holder",
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("asr", "asr", 4, R, busy=True),
                mv("pin", "llm", 2, R, pinned=True),
                mv("t1", "tts", 3, R),
                mv("l1", "llm", 1, R),
            ],
            infeasible(6, ("asr", 4), ("pin", 2)),
        ),
    ),
    (
        "plan/seed-bug-protected-loading-model-is-a-holder",
        Case(
            "a",
            [mv("a", "llm", 6), mv("asr", "asr", 6, L, busy=True), mv("t", "tts", 2, R)],
            infeasible(6, ("asr", 6)),
        ),
    ),
    (
        "plan/infeasible-names-pending-it-may-not-take",
        Case(
            "a",
            [mv("a", "llm", 6), mv("asr", "asr", 6), mv("gone", "llm", 6, X)],
            infeasible(6, ("asr", 6)),
            pending={"asr": 6},
        ),
    ),
    # ---------------------------------------------------------------- rule 9 via rule 4: wait
    (
        "wait/only-a-loading-model-could-make-room",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, L, busy=True)], Wait()),
    ),
    (
        "wait/ready-victims-too-few-without-the-loading-one",
        # The idle tts is not evicted now: the whole set would need the loading llm too.
        Case(
            "a",
            [mv("a", "llm", 6), mv("t", "tts", 2, R), mv("b", "llm", 6, L, busy=True)],
            Wait(),
        ),
    ),
    (
        "wait/a-pending-load-could-make-room-later",
        Case(
            "a",
            [mv("a", "llm", 6), mv("b", "llm", 6), mv("gone", "llm", 6, X)],
            Wait(),
            pending={"b": 6},
        ),
    ),
    (
        "wait/asr-waits-for-loading-asr",
        Case("a", [mv("a", "asr", 6), mv("b", "asr", 6, L, busy=True)], Wait()),
    ),
    (
        "wait/loading-pinned-is-a-holder-not-a-wait",
        Case("a", [mv("a", "llm", 6), mv("p", "llm", 6, L, pinned=True)], infeasible(6, ("p", 6))),
    ),
    # ---------------------------------------------------------------- doomed memory comes back
    (
        "doomed/draining-counted-as-coming-back",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, D, busy=True)], Promise(())),
    ),
    (
        "doomed/unloading-counted-as-coming-back",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, X)], Promise(())),
    ),
    (
        "doomed/protected-draining-counts-even-for-llm",
        Case("a", [mv("a", "llm", 6), mv("b", "asr", 6, D, busy=True)], Promise(())),
    ),
    (
        "doomed/pinned-unloading-counts-too",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, X, pinned=True)], Promise(())),
    ),
    (
        "doomed/not-evicted-twice-plus-one-more-victim",
        Case(
            "a",
            [mv("a", "llm", 8), mv("b", "llm", 4, D, busy=True), mv("c", "llm", 4, R, used=1)],
            Promise(("c",)),
        ),
    ),
    (
        "doomed/not-enough-and-protected-rest-is-infeasible",
        Case(
            "a",
            [mv("a", "llm", 8), mv("b", "llm", 2, X), mv("asr", "asr", 8, R)],
            infeasible(8, ("asr", 8)),
        ),
    ),
    # ---------------------------------------------------------------- pending keeps its memory
    (
        "pending/free-memory-promised-elsewhere-is-not-started",
        # 6 GB is really free (10 - 4 unloading), but 8 GB is promised to b: a cannot start.
        Case(
            "a",
            [mv("a", "llm", 5), mv("b", "tts", 8), mv("gone", "llm", 4, X)],
            Wait(),
            pending={"b": 8},
        ),
    ),
    (
        "pending/what-is-left-after-the-promise-is-promised-again",
        Case(
            "a",
            [mv("a", "llm", 2), mv("b", "tts", 8), mv("gone", "llm", 4, X)],
            Promise(()),
            pending={"b": 8},
        ),
    ),
    (
        "pending/start-counts-pending-against-free-now",
        Case(
            "a",
            [mv("a", "llm", 2), mv("b", "tts", 4), mv("gone", "llm", 4, X)],
            Start(),
            pending={"b": 4},
        ),
    ),
    (
        "pending/ready-victim-cannot-be-promised-twice",
        # c is ready and idle; b's promise already counts on the 6 GB that 'gone' frees.
        Case(
            "a",
            [mv("a", "llm", 4), mv("b", "llm", 6), mv("gone", "llm", 6, X), mv("c", "llm", 4, R)],
            Promise(("c",)),
            pending={"b": 6},
        ),
    ),
    (
        "pending/protected-pending-is-not-a-wait-for-llm",
        Case(
            "a",
            [mv("a", "llm", 6), mv("b", "asr", 6), mv("gone", "llm", 6, X)],
            infeasible(6, ("b", 6)),
            pending={"b": 6},
        ),
    ),
    (
        "pending/own-entry-is-ignored",
        Case("a", [mv("a", "llm", 6)], Start(), pending={"a": 6}),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in PLAN_CASES], ids=[i for i, _ in PLAN_CASES])
def test_plan_load(case: Case) -> None:
    assert plan_load(case.snapshot(), case.want) == case.expect


@pytest.mark.parametrize("case", [c for _, c in PLAN_CASES], ids=[i for i, _ in PLAN_CASES])
def test_plan_load_victims_are_allowed_ready_and_enough(case: Case) -> None:
    """Whatever the decision, a Promise only names ready models the requester may evict, each
    one needed, and they free enough; nothing else ever names victims."""
    snap = case.snapshot()
    decision = plan_load(snap, case.want)
    if not isinstance(decision, Promise):
        return
    me = snap.models[case.want]
    victims = [snap.models[v] for v in decision.victims]
    assert len(set(decision.victims)) == len(victims)
    for v in victims:
        assert v.state is R
        assert may_evict(me, v)
    others = sum(gb for mid, gb in snap.pending.items() if mid != case.want)
    lasting = sum(
        v.reservation_gb for v in snap.models.values() if v.state in (L, R) and v not in victims
    )
    assert snap.budget_gb - lasting - others + 1e-9 >= me.reservation_gb
    for v in victims:  # each victim is needed: without it the load would not fit
        assert snap.budget_gb - lasting - v.reservation_gb - others < me.reservation_gb + 1e-9


def test_plan_load_is_pure() -> None:
    case = dict(PLAN_CASES)["plan/three-victims-in-rule-order"]
    snap = case.snapshot()
    assert plan_load(snap, "a") == plan_load(snap, "a") == case.expect
    assert snap == case.snapshot()


# ---------------------------------------------------------------- may_evict (rule 2)

MAY_EVICT_CASES: list[tuple[str, ModelView, ModelView, bool]] = [
    ("llm-llm", mv("r", "llm", 1), mv("v", "llm", 1, R), True),
    ("llm-tts", mv("r", "llm", 1), mv("v", "tts", 1, R), True),
    ("llm-asr", mv("r", "llm", 1), mv("v", "asr", 1, R), False),
    ("tts-llm", mv("r", "tts", 1), mv("v", "llm", 1, R), True),
    ("tts-tts", mv("r", "tts", 1), mv("v", "tts", 1, R), True),
    ("tts-asr", mv("r", "tts", 1), mv("v", "asr", 1, R), False),
    ("asr-llm", mv("r", "asr", 1), mv("v", "llm", 1, R), True),
    ("asr-tts", mv("r", "asr", 1), mv("v", "tts", 1, R), True),
    ("asr-asr-same-protected-tier", mv("r", "asr", 1), mv("v", "asr", 1, R), True),
    ("pinned-llm-by-llm", mv("r", "llm", 1), mv("v", "llm", 1, R, pinned=True), False),
    ("pinned-llm-by-asr", mv("r", "asr", 1), mv("v", "llm", 1, R, pinned=True), False),
    ("pinned-asr-by-asr", mv("r", "asr", 1), mv("v", "asr", 1, R, pinned=True), False),
    ("protected-tts-by-llm", mv("r", "llm", 1), mv("v", "tts", 1, R, protected=True), False),
    ("protected-tts-by-tts", mv("r", "tts", 1), mv("v", "tts", 1, R, protected=True), True),
    ("protected-tts-by-asr", mv("r", "asr", 1), mv("v", "tts", 1, R, protected=True), True),
    ("protected-llm-by-llm", mv("r", "llm", 1), mv("v", "llm", 1, R, protected=True), True),
    ("unprotected-asr-by-llm", mv("r", "llm", 1), mv("v", "asr", 1, R, protected=False), True),
    ("busy-does-not-matter", mv("r", "llm", 1), mv("v", "llm", 1, R, busy=True), True),
    ("not-itself", mv("v", "llm", 1), mv("v", "llm", 1, R), False),
]


@pytest.mark.parametrize(
    ("requester", "victim", "allowed"),
    [c[1:] for c in MAY_EVICT_CASES],
    ids=[c[0] for c in MAY_EVICT_CASES],
)
def test_may_evict(requester: ModelView, victim: ModelView, allowed: bool) -> None:
    assert may_evict(requester, victim) is allowed


# ---------------------------------------------------------------- helpers

ORDER_CASES: list[tuple[str, list[ModelView], list[str]]] = [
    (
        "idle-then-busy-tier-then-lru",
        [
            mv("busy-llm", "llm", 1, R, busy=True, used=0),
            mv("idle-asr", "asr", 1, R, used=0),
            mv("idle-llm-new", "llm", 1, R, used=9),
            mv("idle-llm-old", "llm", 1, R, used=1),
            mv("busy-tts", "tts", 1, R, busy=True, used=0),
        ],
        ["idle-llm-old", "idle-llm-new", "idle-asr", "busy-llm", "busy-tts"],
    ),
    (
        "ties-broken-by-id",
        [mv("b", "llm", 1, R, used=1), mv("a", "llm", 1, R, used=1)],
        ["a", "b"],
    ),
]


@pytest.mark.parametrize(
    ("views", "expected"),
    [c[1:] for c in ORDER_CASES],
    ids=[c[0] for c in ORDER_CASES],
)
def test_eviction_order(views: list[ModelView], expected: list[str]) -> None:
    assert [v.model_id for v in eviction_order(views)] == expected


@pytest.mark.parametrize(
    ("state", "counted"),
    [(U, False), (L, True), (R, True), (D, True), (X, True)],
    ids=[s.value for s in (U, L, R, D, X)],
)
def test_reserved_gb_counts_resident_states(state: ModelState, counted: bool) -> None:
    snap = Snapshot(10.0, {"a": mv("a", "llm", 3, state), "b": mv("b", "tts", 2, R)}, {"c": 4})
    assert reserved_gb(snap) == (5.0 if counted else 2.0)


# ---------------------------------------------------------------- rules 11-13: sleep

SLEEP_BUGS: list[tuple[str, Case]] = [
    (
        "host/a-waking-requester-holds-its-host-memory-until-it-wakes",
        # a sleeps (6 GB of host held); waking it needs b's VRAM. b's sleep would copy 6 GB to
        # host memory before a's wake can start (a wakes once b's memory is free), so both are
        # held at once: 12 > 10. b must stop instead of sleeping.
        Case(
            "a",
            [
                mv("a", "llm", 1, S, full=6, residual=1, host=6, held=6),
                mv("b", "llm", 6, R, residual=1, host=6),
            ],
            Promise(("b",)),
            host_budget=10,
        ),
    ),
    (
        "pending/a-sleeper-promised-a-wake-is-not-a-victim",
        # a sleeps and is promised the memory draining b frees; c (tts) must not stop a (its
        # waiters count as in flight, as a loading model's do): c waits.
        Case(
            "c",
            [
                mv("a", "llm", 1, S, full=6, residual=1),
                mv("b", "llm", 6, D, busy=True),
                mv("c", "tts", 5),
            ],
            Wait(),
            pending={"a": 5},
        ),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in SLEEP_BUGS], ids=[i for i, _ in SLEEP_BUGS])
def test_plan_load_sleep_regressions(case: Case) -> None:
    assert plan_load(case.snapshot(), case.want) == case.expect


def test_a_victim_stops_when_only_its_stop_makes_room() -> None:
    # b asleep keeps 1.5 GB: 1 + 4.5 < 9. Stopped, it frees 6: 1 + 6 >= 9. It was Infeasible
    # naming nothing (a 503 that says no one holds the memory).
    case = Case("a", [mv("a", "llm", 9), mv("b", "llm", 6, R, residual=1.5)], Promise(("b",)))
    assert plan_load(case.snapshot(), "a") == case.expect
    case = Case(
        "a",
        [mv("a", "llm", 9), mv("b", "llm", 6, R, residual=1.5, used=1), mv("c", "llm", 3, R)],
        Promise(("b", "c")),
    )
    assert plan_load(case.snapshot(), "a") == case.expect


def sleeps(victims: Sequence[str], asleep: Sequence[str] = ()) -> Promise:
    """A Promise whose ``asleep`` victims go to sleep (rule 11); the others stop."""
    return Promise(tuple(victims), frozenset(asleep))


SLEEP_CASES: list[tuple[str, Case]] = [
    # ---------------------------------------------------------------- rule 11: sleep before stop
    (
        "sleep/idle-sleepable-victim-sleeps",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, R, residual=1)], sleeps("b", "b")),
    ),
    (
        "sleep/a-sleep-frees-the-reservation-less-the-residual",
        # b asleep keeps 3 GB: 1 free + 3 < 6, so c goes too (a stop of b alone would have done,
        # but c is the cheaper swap than b's cold load, and both are needed as planned).
        Case(
            "a",
            [mv("a", "llm", 6), mv("b", "llm", 6, R, residual=3), mv("c", "llm", 3, R)],
            sleeps(("b", "c"), "b"),
        ),
    ),
    (
        "sleep/a-victim-that-cannot-sleep-is-stopped",
        Case("a", [mv("a", "llm", 6), mv("b", "llm", 6, R)], sleeps("b")),
    ),
    (
        "sleep/sleepable-before-must-stop-within-a-tier",
        # x was used longer ago, but a wake costs less than a cold load.
        Case(
            "a",
            [mv("a", "llm", 4), mv("s", "llm", 4, R, used=5, residual=1), mv("x", "llm", 4, R)],
            sleeps("s", "s"),
        ),
    ),
    (
        "sleep/tier-before-sleepability",
        Case(
            "a",
            [mv("a", "asr", 4), mv("t", "tts", 4, R, residual=1), mv("l", "llm", 4, R, used=9)],
            sleeps("l"),
        ),
    ),
    (
        "sleep/idle-sleepable-before-busy-must-stop",
        Case(
            "a",
            [
                mv("a", "llm", 4),
                mv("busy", "llm", 4, R, busy=True),
                mv("s", "llm", 4, R, used=9, residual=0.5),
            ],
            sleeps("s", "s"),
        ),
    ),
    (
        "sleep/a-busy-sleepable-victim-sleeps-after-its-drain",
        Case(
            "a", [mv("a", "llm", 8), mv("b", "llm", 8, R, busy=True, residual=1)], sleeps("b", "b")
        ),
    ),
    (
        "sleep/a-zero-residual-sleep-frees-everything",
        Case("a", [mv("a", "llm", 10), mv("b", "llm", 10, R, residual=0)], sleeps("b", "b")),
    ),
    (
        "sleep/two-sleeps",
        Case(
            "a",
            [
                mv("a", "llm", 8),
                mv("b", "llm", 5, R, used=1, residual=1),
                mv("c", "tts", 5, R, residual=1),
            ],
            sleeps(("b", "c"), ("b", "c")),
        ),
    ),
    (
        "sleep/an-unneeded-sleep-is-dropped",
        # b sleeps first in order (llm), then c must go anyway (tts, 9 GB) and suffices alone.
        Case(
            "a",
            [
                mv("a", "llm", 8),
                mv("b", "llm", 1, R, residual=0.5),
                mv("c", "tts", 9, R, residual=1),
            ],
            sleeps("c", "c"),
        ),
    ),
    # ------------------------------------------------------------ rule 13: sleepers are residents
    (
        "sleepers/not-stopped-while-a-ready-victim-suffices",
        # z sleeps and was used longest ago, but stopping it frees only its 2 GB residual and
        # turns its next wake into a cold load: b (ready) goes first.
        Case(
            "a",
            [
                mv("a", "llm", 4),
                mv("z", "llm", 2, S, full=6, residual=2, used=-5),
                mv("b", "llm", 6, R, residual=1),
            ],
            sleeps("b", "b"),
        ),
    ),
    (
        "sleepers/stopped-when-needed-frees-its-residual",
        Case(
            "a",
            [
                mv("a", "llm", 8),
                mv("z", "llm", 2, S, full=6, residual=2),
                mv("b", "llm", 6, R, residual=1),
            ],
            sleeps(("b", "z"), "b"),
        ),
    ),
    (
        "sleepers/a-sleeper-alone-is-stopped",
        Case("a", [mv("a", "llm", 9), mv("z", "llm", 2, S, full=6, residual=2)], sleeps("z")),
    ),
    (
        "sleepers/after-the-ready-ones-of-its-tier-only",
        # Lowest tier first still: the llm sleeper z goes before the ready tts t; t alone then
        # makes z unnecessary, so only t goes.
        Case(
            "a",
            [mv("a", "tts", 5), mv("z", "llm", 2, S, full=6, residual=2), mv("t", "tts", 6, R)],
            sleeps("t"),
        ),
    ),
    (
        "sleepers/a-protected-sleeper-is-not-stopped-for-an-llm",
        Case(
            "a",
            [mv("a", "llm", 9), mv("z", "asr", 2, S, full=6, residual=2)],
            infeasible(9, ("z", 2)),
        ),
    ),
    (
        "sleepers/a-protected-sleeper-is-stopped-for-its-own-tier",
        Case("a", [mv("a", "asr", 9), mv("z", "asr", 2, S, full=6, residual=2)], sleeps("z")),
    ),
    (
        "sleepers/infeasible-names-the-sleepers-it-may-not-take",
        Case(
            "a",
            [
                mv("a", "llm", 8),
                mv("p", "llm", 2, S, full=6, residual=2, pinned=True),
                mv("z", "asr", 1, S, full=6, residual=1),
                mv("b", "llm", 3, R),
            ],
            infeasible(8, ("p", 2), ("z", 1)),
        ),
    ),
    # ---------------------------------------------------------------- host memory (rule 11)
    (
        "host/fits-the-host-budget-sleeps",
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("z", "llm", 1, S, full=4, residual=1, held=4),
                mv("b", "llm", 6, R, residual=1, host=6),
            ],
            sleeps("b", "b"),
            host_budget=10,
        ),
    ),
    (
        "host/full-the-least-recently-used-sleeper-stops-for-room",
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("z2", "llm", 1, S, full=4, residual=1, held=4, used=2),
                mv("z1", "llm", 1, S, full=4, residual=1, held=4, used=1),
                mv("b", "llm", 6, R, residual=1, host=4),
            ],
            sleeps(("b", "z1"), "b"),
            host_budget=10,
        ),
    ),
    (
        "host/two-sleepers-stop-for-one-large-sleep",
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("z2", "llm", 1, S, full=4, residual=1, held=4, used=2),
                mv("z1", "llm", 1, S, full=4, residual=1, held=4, used=1),
                mv("b", "llm", 6, R, residual=1, host=9),
            ],
            sleeps(("b", "z1", "z2"), "b"),
            host_budget=10,
        ),
    ),
    (
        "host/only-sleepers-the-requester-may-evict-stop-for-room",
        # p (asr, protected) was used longest ago, but an llm request may not stop it.
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("p", "asr", 1, S, full=4, residual=1, held=4, used=0),
                mv("z", "llm", 1, S, full=4, residual=1, held=4, used=2),
                mv("b", "llm", 6, R, residual=1, host=4),
            ],
            sleeps(("b", "z"), "b"),
            host_budget=10,
        ),
    ),
    (
        "host/a-sleeper-promised-a-wake-does-not-stop-for-room",
        # z is promised a wake (pending): b cannot sleep beside p's and z's host memory.
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("p", "asr", 1, S, full=4, residual=1, held=4),
                mv("z", "llm", 1, S, full=2, residual=1, held=4),
                mv("b", "llm", 6, R, residual=1, host=4),
            ],
            sleeps("b"),
            pending={"z": 1},
            host_budget=10,
        ),
    ),
    (
        "host/room-impossible-the-victim-stops-instead",
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("p", "asr", 1, S, full=4, residual=1, held=8),
                mv("b", "llm", 6, R, residual=1, host=4),
            ],
            sleeps("b"),
            host_budget=10,
        ),
    ),
    (
        "host/larger-than-the-host-budget-stops",
        Case(
            "a",
            [mv("a", "llm", 6), mv("b", "llm", 6, R, residual=1, host=12)],
            sleeps("b"),
            host_budget=10,
        ),
    ),
    (
        "host/level-2-needs-no-host-memory",
        Case(
            "a",
            [mv("a", "llm", 6), mv("b", "llm", 6, R, residual=1)],
            sleeps("b", "b"),
            host_budget=0,
        ),
    ),
    (
        "host/a-sleeper-being-stopped-gives-its-host-memory-back",
        # x (unloading) still holds 8 GB of host memory, but it is on its way back.
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("x", "llm", 1, X, held=8),
                mv("b", "llm", 6, R, residual=1, host=8),
            ],
            sleeps("b", "b"),
            budget=11,
            host_budget=10,
        ),
    ),
    (
        "host/a-draining-sleep-holds-its-promised-host-memory",
        # d drains to sleep: 6 GB promised (held). b's 6 would not fit beside it: b stops.
        Case(
            "a",
            [
                mv("a", "llm", 6),
                mv("d", "llm", 3, D, busy=True, residual=1, host=6, held=6, returns=2),
                mv("b", "llm", 6, R, residual=1, host=6),
            ],
            sleeps("b"),
            budget=12,
            host_budget=10,
        ),
    ),
    (
        "host/each-sleep-of-one-plan-takes-its-share",
        # b and c both must go; host room for one sleep only: b (first) sleeps, c stops.
        Case(
            "a",
            [
                mv("a", "llm", 8),
                mv("b", "llm", 5, R, used=1, residual=1, host=6),
                mv("c", "llm", 5, R, used=2, residual=1, host=6),
            ],
            sleeps(("b", "c"), "b"),
            host_budget=10,
        ),
    ),
    # ---------------------------------------------------------------- rule 12: a wake is a load
    (
        "wake/need-is-full-less-residual-start",
        # a holds 2 of its 6 GB asleep: 4 more fit beside b.
        Case("a", [mv("a", "llm", 2, S, full=6, residual=2), mv("b", "llm", 4, R)], Start()),
    ),
    (
        "wake/need-is-full-less-residual-promise",
        Case(
            "a",
            [mv("a", "llm", 2, S, full=6, residual=2), mv("b", "llm", 5, R, residual=1)],
            sleeps("b", "b"),
        ),
    ),
    (
        "wake/need-beyond-the-residual-infeasible-names-the-holders",
        Case(
            "a",
            [mv("a", "llm", 2, S, full=9, residual=2), mv("p", "asr", 2, R)],
            infeasible(7, ("p", 2)),
        ),
    ),
    (
        "wake/a-waking-model-counts-as-later",
        Case("a", [mv("a", "llm", 6), mv("w", "llm", 6, W, busy=True)], Wait()),
    ),
    (
        "wake/a-waking-protected-model-is-a-holder",
        Case("a", [mv("a", "llm", 6), mv("w", "asr", 6, W, busy=True)], infeasible(6, ("w", 6))),
    ),
    (
        "wake/a-waking-model-is-not-a-victim",
        Case(
            "a",
            [mv("a", "llm", 6), mv("w", "llm", 4, W, busy=True), mv("b", "llm", 4, R, busy=True)],
            sleeps("b"),
        ),
    ),
    # ---------------------------------------------------------------- doomed to sleep
    (
        "doomed/suspending-returns-reservation-less-residual-promise",
        Case("a", [mv("a", "llm", 8), mv("b", "llm", 6, Z, residual=1, returns=5)], Promise(())),
    ),
    (
        "doomed/suspending-holds-its-whole-reservation-until-asleep",
        Case("a", [mv("a", "llm", 4), mv("b", "llm", 6, Z, residual=1, returns=5)], Start()),
    ),
    (
        "doomed/draining-to-sleep-returns-reservation-less-residual",
        # b keeps 1 GB asleep: 10 - 1 - 2 = 7 < 8, so c (ready) goes too.
        Case(
            "a",
            [
                mv("a", "llm", 8),
                mv("b", "llm", 6, D, busy=True, residual=1, returns=5),
                mv("c", "llm", 2, R),
            ],
            sleeps("c"),
        ),
    ),
    (
        "doomed/draining-to-stop-returns-everything",
        Case(
            "a",
            [mv("a", "llm", 8), mv("b", "llm", 6, D, busy=True), mv("c", "llm", 2, R)],
            Promise(()),
        ),
    ),
    # ---------------------------------------------------------------- swap patience (rule 3)
    (
        "patience/a-busy-victim-waits-for-the-swap-cost",
        # Swap cost: a's load (10 s) + b's restore (its cold load, 4 s) = 14 s x 2 = 28 s;
        # a waited 5: plan again in 23.
        Case(
            "a",
            [mv("a", "llm", 6, load_s=10, waited=5), mv("b", "llm", 6, R, busy=True, load_s=4)],
            Wait(retry_in_s=23),
            patience=2,
        ),
    ),
    (
        "patience/a-busy-victim-is-drained-once-waited-enough",
        Case(
            "a",
            [mv("a", "llm", 6, load_s=10, waited=28), mv("b", "llm", 6, R, busy=True, load_s=4)],
            Promise(("b",)),
            patience=2,
        ),
    ),
    (
        "patience/the-victim-s-expected-drain-is-part-of-the-cost",
        # (a's load 10 + b's drain 3 + b's reload 4) x 1 = 17 s.
        Case(
            "a",
            [
                mv("a", "llm", 6, load_s=10),
                mv("b", "llm", 6, R, busy=True, load_s=4, drain=3),
            ],
            Wait(retry_in_s=17),
            patience=1,
        ),
    ),
    (
        "patience/an-idle-victim-has-no-drain",
        Case(
            "a",
            [mv("a", "llm", 6, load_s=10), mv("b", "llm", 6, R, load_s=4, drain=3)],
            Promise(("b",)),
            patience=1,
        ),
    ),
    (
        "patience/capped",
        Case(
            "a",
            [mv("a", "llm", 6, load_s=60, waited=5), mv("b", "llm", 6, R, busy=True, load_s=60)],
            Wait(retry_in_s=25),
            patience=2,
            patience_max=30,
        ),
    ),
    (
        "patience/a-sleepable-victim-costs-its-wake-a-sleeper-requester-its-wake",
        # (a's wake 1 s + b's wake 0.5 s) x 4 = 6 s.
        Case(
            "a",
            [
                mv("a", "llm", 1, S, full=7, residual=1, load_s=30, wake_s=1),
                mv("b", "llm", 6, R, busy=True, residual=1, load_s=30, wake_s=0.5),
            ],
            Wait(retry_in_s=6),
            patience=4,
        ),
    ),
    (
        "patience/an-idle-victim-is-taken-at-once",
        Case(
            "a",
            [mv("a", "llm", 6, load_s=10), mv("b", "llm", 6, R, load_s=4)],
            Promise(("b",)),
            patience=2,
        ),
    ),
    (
        "patience/an-idle-victim-before-a-busy-one-not-yet-eligible",
        Case(
            "a",
            [
                mv("a", "llm", 6, load_s=10),
                mv("busy", "llm", 4, R, busy=True, used=-1, load_s=4),
                mv("idle", "llm", 6, R, load_s=4),
            ],
            Promise(("idle",)),
            patience=2,
        ),
    ),
    (
        "patience/zero-drains-a-busy-victim-at-once",
        Case(
            "a",
            [mv("a", "llm", 6, load_s=10), mv("b", "llm", 6, R, busy=True, load_s=4)],
            Promise(("b",)),
            patience=0,
        ),
    ),
    (
        "patience/unmeasured-costs-nothing",
        Case(
            "a",
            [mv("a", "llm", 6), mv("b", "llm", 6, R, busy=True)],
            Promise(("b",)),
            patience=6,
        ),
    ),
    (
        "patience/the-earliest-eligible-busy-victim-sets-the-retry",
        Case(
            "a",
            [
                mv("a", "llm", 8, load_s=2),
                mv("b", "llm", 5, R, busy=True, load_s=8),
                mv("c", "llm", 5, R, busy=True, load_s=3),
            ],
            Wait(retry_in_s=10),
            patience=2,
        ),
    ),
    (
        "patience/not-a-wait-when-even-every-busy-victim-would-not-do",
        Case(
            "a",
            [
                mv("a", "llm", 8, load_s=2),
                mv("p", "asr", 5, R),
                mv("b", "llm", 5, R, busy=True, load_s=8),
            ],
            infeasible(8, ("p", 5)),
            patience=2,
        ),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in SLEEP_CASES], ids=[i for i, _ in SLEEP_CASES])
def test_plan_load_with_sleep(case: Case) -> None:
    assert plan_load(case.snapshot(), case.want) == case.expect


ALL_CASES = PLAN_CASES + SLEEP_BUGS + SLEEP_CASES


@pytest.mark.parametrize("case", [c for _, c in ALL_CASES], ids=[i for i, _ in ALL_CASES])
def test_a_promise_fits_vram_and_host_memory(case: Case) -> None:
    """Whatever the decision, a Promise names ready or sleeping models the requester may evict
    (never a sleeper promised a wake), puts to sleep only ready ones that can sleep, each victim
    is needed, what they free (a sleep: reservation less residual) makes room, and the sleeps fit
    the host budget with the sleepers it stops (DESIGN rules 1, 2, 4, 11-13)."""
    snap = case.snapshot()
    decision = plan_load(snap, case.want)
    if not isinstance(decision, Promise):
        return
    me = snap.models[case.want]
    assert decision.sleep <= set(decision.victims)
    assert len(set(decision.victims)) == len(decision.victims)
    frees: dict[str, float] = {}
    for vid in decision.victims:
        v = snap.models[vid]
        assert may_evict(me, v), vid
        assert v.state in (R, S), vid
        assert vid not in snap.pending, vid
        if vid in decision.sleep:
            assert v.state is R, vid
            assert v.residual_gb is not None, vid
            frees[vid] = v.reservation_gb - v.residual_gb
        else:
            frees[vid] = v.reservation_gb
    resident = [v for v in snap.models.values() if v.state is not U]
    lasting = sum(v.reservation_gb for v in resident if v.state not in (D, X, Z))
    coming_back = sum(v.reservation_gb - v.returning_gb for v in resident if v.state in (D, X, Z))
    others = sum(gb for mid, gb in snap.pending.items() if mid != case.want)
    room = snap.budget_gb - lasting - coming_back - others
    freed = sum(frees.values())
    assert room + freed + 1e-9 >= me.need_gb
    vram_victims = [v for v in decision.victims if frees[v] > 0]
    for vid in vram_victims:
        # Needed for VRAM, or a sleeper stopped for host room.
        needed = room + freed - frees[vid] < me.need_gb - 1e-9
        assert needed or (snap.models[vid].state is S and snap.models[vid].host_held_gb > 0), vid
    host_taken = sum(snap.models[v].host_gb for v in decision.sleep)
    host_back = sum(
        snap.models[v].host_held_gb for v in decision.victims if v not in decision.sleep
    )
    assert host_taken <= host_free_gb(snap) + host_back + 1e-9


def test_an_idle_sleepable_victim_is_never_planned_twice() -> None:
    """The plan is pure: the same snapshot gives the same sleeps."""
    case = dict(SLEEP_CASES)["host/full-the-least-recently-used-sleeper-stops-for-room"]
    snap = case.snapshot()
    assert plan_load(snap, "a") == plan_load(snap, "a") == case.expect
    assert snap == case.snapshot()


# ---------------------------------------------------------------- host_room (rule 11)


def _host_snap(
    *views: ModelView, host_budget: float = 10, pending: Mapping[str, float] = {}
) -> Snapshot:
    return Snapshot(20.0, {v.model_id: v for v in views}, dict(pending), host_budget)


HOST_ROOM_CASES: list[tuple[str, Snapshot, str, str | None, tuple[str, ...] | None]] = [
    (
        "fits-already",
        _host_snap(mv("m", "llm", 6, R, residual=1, host=4), mv("z", "llm", 1, S, held=6)),
        "m",
        None,
        (),
    ),
    (
        "no-host-memory-needed",
        _host_snap(mv("m", "llm", 6, R, residual=1), mv("z", "llm", 1, S, held=10)),
        "m",
        None,
        (),
    ),
    (
        "the-least-recently-used-sleeper-first",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=4),
            mv("z2", "llm", 1, S, held=4, used=2),
            mv("z1", "llm", 1, S, held=4, used=1),
        ),
        "m",
        None,
        ("z1",),
    ),
    (
        "lowest-tier-first",
        _host_snap(
            mv("m", "tts", 6, R, residual=1, host=4),
            mv("t", "tts", 1, S, held=4, used=1),
            mv("l", "llm", 1, S, held=4, used=2),
        ),
        "m",
        None,
        ("l",),
    ),
    (
        "as-many-as-needed",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=9),
            mv("z2", "llm", 1, S, held=4, used=2),
            mv("z1", "llm", 1, S, held=4, used=1),
        ),
        "m",
        None,
        ("z1", "z2"),
    ),
    (
        "only-sleepers-it-may-evict",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=4),
            mv("p", "asr", 1, S, held=4, used=0),
            mv("z", "llm", 1, S, held=4, used=5),
        ),
        "m",
        None,
        ("z",),
    ),
    (
        "a-protected-sleeper-is-not-stopped-for-an-llm",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=8),
            mv("p", "asr", 1, S, held=4, used=0),
            mv("z", "llm", 1, S, held=4, used=5),
            mv("r", "asr", 4),
        ),
        "m",
        None,
        None,
    ),
    (
        "a-requester-of-a-higher-tier-may-stop-more",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=8),
            mv("p", "asr", 1, S, held=4, used=0),
            mv("z", "llm", 1, S, held=4, used=5),
            mv("r", "asr", 4),
        ),
        "m",
        "r",
        ("z", "p"),
    ),
    (
        "never-a-pinned-sleeper",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=4),
            mv("p", "llm", 1, S, held=8, pinned=True),
        ),
        "m",
        None,
        None,
    ),
    (
        "never-a-sleeper-promised-a-wake",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=4),
            mv("z", "llm", 1, S, full=3, held=8),
            pending={"z": 2},
        ),
        "m",
        None,
        None,
    ),
    (
        "not-itself",
        _host_snap(mv("m", "llm", 6, S, full=8, residual=1, host=12, held=6)),
        "m",
        None,
        None,
    ),
    (
        "larger-than-the-budget",
        _host_snap(mv("m", "llm", 6, R, residual=1, host=11), mv("z", "llm", 1, S, held=4)),
        "m",
        None,
        None,
    ),
    (
        "a-sleeper-being-stopped-is-coming-back",
        _host_snap(mv("m", "llm", 6, R, residual=1, host=6), mv("x", "llm", 1, X, held=8)),
        "m",
        None,
        (),
    ),
    (
        "a-promised-sleep-is-taken",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=6),
            mv("d", "llm", 6, D, busy=True, residual=1, host=6, held=6),
        ),
        "m",
        None,
        None,
    ),
    (
        "awake-models-hold-nothing-to-stop",
        _host_snap(
            mv("m", "llm", 6, R, residual=1, host=6),
            mv("w", "llm", 6, W, busy=True, residual=1, host=6, held=6),
        ),
        "m",
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("snap", "model_id", "requester", "expected"),
    [c[1:] for c in HOST_ROOM_CASES],
    ids=[c[0] for c in HOST_ROOM_CASES],
)
def test_host_room(
    snap: Snapshot, model_id: str, requester: str | None, expected: tuple[str, ...] | None
) -> None:
    assert host_room(snap, model_id, requester) == expected


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        ([mv("b", "llm", 1, S, held=3), mv("c", "llm", 6, D, held=2)], 5.0),
        ([mv("b", "llm", 1, S, held=3), mv("x", "llm", 1, X, held=4)], 7.0),
        ([mv("b", "llm", 6, R)], 10.0),
    ],
    ids=["held-and-promised", "unloading-comes-back", "nothing-held"],
)
def test_host_free_gb(views: list[ModelView], expected: float) -> None:
    assert host_free_gb(_host_snap(*views)) == expected


SLEEP_ORDER: list[ModelView] = [
    mv("sleeper-old", "llm", 1, S, used=0),
    mv("must-stop-old", "llm", 1, R, used=1),
    mv("sleepable-new", "llm", 1, R, used=9, residual=0.5),
    mv("tts-sleepable", "tts", 1, R, used=0, residual=0.5),
    mv("busy-sleepable", "llm", 1, R, busy=True, residual=0.5),
]


def test_eviction_order_with_sleep() -> None:
    """Within a tier: sleepable, then must-stop, then sleepers (each LRU); tiers and busy first."""
    assert [v.model_id for v in eviction_order(SLEEP_ORDER)] == [
        "sleepable-new",
        "must-stop-old",
        "sleeper-old",
        "tts-sleepable",
        "busy-sleepable",
    ]


@pytest.mark.parametrize("state", [D, Z], ids=["draining-to-sleep", "suspending"])
def test_a_model_going_to_sleep_is_stoppable_later(state: ModelState) -> None:
    # b goes to sleep keeping 3 GB; c (2) is ready. Now: 10 - 3 - 2 = 5, c's stop makes 7 < 8.
    # Once b sleeps, stopping b and c frees 10 >= 8: a must wait, not fail (rule 4: infeasible
    # only if every eviction rule 2 allows would not make room). It was Infeasible(8, ()).
    case = Case(
        "a",
        [
            mv("a", "llm", 8),
            mv("b", "llm", 6, state, busy=state is D, residual=3, returns=3),
            mv("c", "llm", 2, R),
        ],
        Wait(),
    )
    assert plan_load(case.snapshot(), "a") == case.expect


def test_a_protected_model_going_to_sleep_is_a_holder_not_a_later() -> None:
    case = Case(
        "a",
        [
            mv("a", "llm", 8),
            mv("b", "asr", 6, Z, residual=3, returns=3),
            mv("c", "llm", 2, R),
        ],
        infeasible(8),
    )
    # b keeps 3 GB asleep that an llm may never take: 10 - 3 < 8 whatever is evicted.
    assert plan_load(case.snapshot(), "a") == case.expect


def test_a_sleeper_promised_a_wake_is_evictable_later() -> None:
    # z (tts) sleeps holding 1 GB and is promised 2 more for its wake; p (pinned) holds 5.
    # For a (llm, 5 GB): once z is awake, z may be evicted: 10 - 5 = 5 fits. a must wait.
    case = Case(
        "a",
        [
            mv("a", "llm", 5),
            mv("p", "llm", 5, R, pinned=True),
            mv("z", "tts", 1, S, full=3, residual=1),
            mv("b", "llm", 3, D, busy=True),
        ],
        Wait(),
        pending={"z": 2},
    )
    assert plan_load(case.snapshot(), "a") == case.expect
