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
) -> ModelView:
    """``residual`` (set: it can sleep), ``host`` (host GB it needs asleep), ``held`` (host GB
    it holds now), ``full`` (a sleeper's whole reservation), ``returns`` (a doomed model's)."""
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

    def snapshot(self) -> Snapshot:
        return Snapshot(
            self.budget,
            {v.model_id: v for v in self.models},
            dict(self.pending),
            self.host_budget,
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
    # b asleep keeps 1.5 GB: 1 + 4.5 < 9. Stopped, it frees 6: 1 + 6 >= 9. Today: Infeasible
    # naming nothing (a 503 that says no one holds the memory).
    case = Case("a", [mv("a", "llm", 9), mv("b", "llm", 6, R, residual=1.5)], Promise(("b",)))
    assert plan_load(case.snapshot(), "a") == case.expect
    case = Case(
        "a",
        [mv("a", "llm", 9), mv("b", "llm", 6, R, residual=1.5, used=1), mv("c", "llm", 3, R)],
        Promise(("b", "c")),
    )
    assert plan_load(case.snapshot(), "a") == case.expect
