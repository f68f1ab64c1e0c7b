"""The scheduler core: the one owner of all model state.

``SchedulerCore.handle(event)`` is the one way in: it is synchronous and is only ever called on
the owner's behalf (by the owner task, or by a caller while the owner is idle: the hot path; or
by a test or the simulator, driving it directly). It mutates state, asks the pure planner what
to do, and acts through ``Effects``. It never awaits, never does I/O, and never reads the clock
except through the injected ``clock`` (monotonic) and ``wall`` callables.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llmux.config import Config
from llmux.errors import (
    CannotSleep,
    InsufficientVram,
    ModelLoadFailed,
    ModelNotFound,
    ModelUnavailable,
    QueueFull,
    QueueTimeout,
)
from llmux.scheduling.events import (
    Acquire,
    Cancel,
    Deadline,
    Effects,
    Event,
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
    StopFinished,
    TtlExpired,
    Unload,
    WakeFinished,
)
from llmux.scheduling.planner import (
    Decision,
    Infeasible,
    ModelView,
    Promise,
    Snapshot,
    Start,
    Wait,
    host_room,
    plan_load,
)
from llmux.scheduling.state import (
    ALIVE,
    DOOMED,
    RESIDENT,
    Known,
    ModelRecord,
    ModelState,
    SleepReason,
    StopReason,
    Waiter,
    WaiterKind,
    launch_fingerprint,
)

PASSOVER_BOUND_S = 10.0
"""A request waiting longer than this is planned before any other (oldest first), whatever its
tier: the bound on how long a lower tier can be passed over. See docs/scheduling.md."""


@dataclass(slots=True)
class Held:
    """The core's record of a granted lease (the runtime's ``Lease`` adds the child's URL)."""

    rid: int
    model_id: str
    generation: int
    granted_at: float
    """Monotonic time it was granted (the model's service time is learned from leases)."""


class SchedulerCore:
    def __init__(
        self,
        config: Config,
        budget_gb: float,
        effects: Effects,
        clock: Callable[[], float],
        wall: Callable[[], float],
        passover_bound: float = PASSOVER_BOUND_S,
        learned: Mapping[str, float] | None = None,
        plan: Callable[[Snapshot, str], Decision] = plan_load,
        host_budget_gb: float = float("inf"),
        known: Mapping[str, Known] | None = None,
    ) -> None:
        """``learned``: peaks known from before (learned.json) for the config's launches.
        ``plan``: the planner, asked with the snapshot and the model to load (``plan_load``; the
        simulator's experiments pass one that shows it another view of the same snapshot)."""
        self.config = config
        self.budget_gb = budget_gb
        self.host_budget_gb = host_budget_gb
        self._replans: set[str] = set()
        """Models with a ``Replan`` timer set."""
        """Host memory sleeping models may hold (``host.ram_gb``; rule 11)."""
        self.effects = effects
        self.clock = clock
        self.wall = wall
        self.passover_bound = passover_bound
        self.plan = plan
        self.models: dict[str, ModelRecord] = {
            mid: ModelRecord.from_config(mid, config) for mid in config.models
        }
        for mid, gb in (learned or {}).items():
            if mid in self.models:
                self.models[mid].learned_gb = gb
        for mid, k in (known or {}).items():
            if mid in self.models:
                self.models[mid].know(k)
        self.waiters: dict[int, Waiter] = {}
        self.leases: dict[int, Held] = {}
        self.pending: dict[str, float] = {}
        """Loads promised the memory their victims free, in promise order."""
        self.drain_reasons: dict[str, StopReason] = {}
        """Why each draining model was doomed: its stop, on the last release, says the same."""
        self.closing = False
        self.overcommit_gb = 0.0
        """How far ``reserved_gb`` is over the budget because reservations grew while resident
        (a measurement showed more than was reserved, a reload raised ``vram_gb`` or lowered the
        budget). Reality, not a decision: no load starts until it is back under the budget, and
        this only shrinks until the next such event."""
        self.host_overcommit_gb = 0.0
        """As ``overcommit_gb``, for host memory (a reload lowered ``host.ram_gb`` or raised a
        sleeper's ``host_gb``)."""
        self._internal_rids = itertools.count(-1, -1)
        """Request ids for waiters nobody awaits (preloads the core starts itself)."""

    # ------------------------------------------------------------------ queries

    @property
    def reserved_gb(self) -> float:
        return float(sum(m.reservation_gb for m in self.models.values() if m.state in RESIDENT))

    @property
    def host_reserved_gb(self) -> float:
        return float(sum(m.host_reserved_gb for m in self.models.values()))

    @property
    def queued_requests(self) -> int:
        return sum(1 for w in self.waiters.values() if w.kind is WaiterKind.REQUEST)

    def _queued_for(self, m: ModelRecord) -> int:
        """Requests waiting for ``m`` (``max_queue`` bounds each model's queue: one model's
        backlog never refuses another model's requests)."""
        waiters = self.waiters
        return sum(1 for rid in m.waiters if waiters[rid].kind is WaiterKind.REQUEST)

    def queued(self, model_id: str) -> int:
        return len(self.models[model_id].waiters)

    def snapshot(self) -> Snapshot:
        now = self.clock()
        views = {
            mid: ModelView(
                model_id=mid,
                tier_rank=m.tier_rank,
                protected=m.protected,
                pinned=m.pinned,
                state=m.state,
                busy=m.in_flight > 0 or (m.state is ModelState.LOADING and bool(m.waiters)),
                reservation_gb=m.reservation_gb,
                last_used=m.last_used if m.last_used is not None else float("-inf"),
                full_gb=m.gpu_gb if m.state is ModelState.SLEEPING else None,
                residual_gb=m.residual_gb if m.sleep_level is not None else None,
                host_gb=m.sleep_host_gb,
                host_held_gb=m.host_reserved_gb + m.host_promised_gb,
                returns_gb=m.returns_gb if m.state in DOOMED else None,
                load_s=m.load_s or 0.0,
                wake_s=m.wake_s or 0.0,
                waited_s=now - self.waiters[m.waiters[0]].enqueued_at if m.waiters else 0.0,
                drain_s=_drain_estimate(m),
                in_flight=m.in_flight,
                queued=len(m.waiters),
            )
            for mid, m in self.models.items()
        }
        server = self.config.server
        return Snapshot(
            self.budget_gb,
            views,
            dict(self.pending),
            self.host_budget_gb,
            server.swap_patience,
            min(server.swap_patience_max, 0.6 * server.queue_timeout),
        )

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> None:
        """The one way in: every event, whoever sends it (the owner task reading its queue, or
        the caller itself on the hot path), is handled here, one at a time.

        The common case costs little: a request for a ready model (``Acquire``) or the end of
        one (``Release``) is matched first, and the pump runs only while something waits or a
        load is promised."""
        match event:
            case Acquire():
                self._acquire(event)
            case Release():
                self._release(event.rid)
            case Cancel():
                self._cancel(event.rid)
            case (
                LoadFinished()
                | ProcessExited()
                | StopFinished()
                | TtlExpired()
                | Measured()
                | SleepFinished()
                | WakeFinished()
                | MeasuredResidual()
            ) if event.model_id not in self.models:
                return  # about a model a reload removed and that is gone already
            case LoadFinished():
                self._load_finished(event)
            case SleepFinished():
                self._sleep_finished(event)
            case WakeFinished():
                self._wake_finished(event)
            case Sleep():
                self._sleep(event)
            case MeasuredResidual():
                self._measured_residual(event)
                self.overcommit_gb = max(0.0, self.reserved_gb - self.budget_gb)
            case ProcessExited():
                self._process_exited(event)
            case StopFinished():
                self._stop_finished(event)
            case Unload():
                self._unload(event)
            case TtlExpired():
                self._ttl_expired(event)
            case Deadline():
                self._deadline(event.rid)
            case Replan():
                self._replans.discard(event.model_id)  # the pump below plans again
            case Measured():
                self._measured(event)
                self.overcommit_gb = max(0.0, self.reserved_gb - self.budget_gb)
            case Reconfigure():
                self._reconfigure(event)
                self.overcommit_gb = max(0.0, self.reserved_gb - self.budget_gb)
                self.host_overcommit_gb = max(0.0, self.host_reserved_gb - self.host_budget_gb)
            case Shutdown():
                self._shutdown()
        if self.drain_reasons:
            for m in list(self.models.values()):
                if m.state is ModelState.DRAINING and m.in_flight == 0:
                    self._drained(m)  # waited for host memory, or no longer goes to sleep
        if (self.waiters or self.pending) and not self.closing:
            self._pump()  # else nothing waits for memory or for a load: nothing to act on
        if self.overcommit_gb > 0:
            over = max(0.0, self.reserved_gb - self.budget_gb)
            self.overcommit_gb = min(self.overcommit_gb, over)
        if self.host_overcommit_gb > 0:
            over = max(0.0, self.host_reserved_gb - self.host_budget_gb)
            self.host_overcommit_gb = min(self.host_overcommit_gb, over)

    def _acquire(self, ev: Acquire) -> None:
        m = self.models.get(ev.model_id)
        if (
            m is not None
            and m.state is ModelState.READY
            and m.stop_when_ready is None
            and not m.removed
            and not self.closing
        ):
            self._admit(ev.rid, m, ev.kind)
            return
        if not ev.wait:
            return  # a try (the hot path): not ready now, so nothing happens
        if m is None or m.removed:
            self.effects.reject(ev.rid, ModelNotFound(ev.model_id))
            return
        if self.closing:
            self.effects.reject(ev.rid, ModelUnavailable("llmux is shutting down"))
            return
        # Never fits: say so at once (rule 4), before any queue bound.
        if (
            m.state in (ModelState.UNLOADED, ModelState.SLEEPING)
            and ev.model_id not in self.pending
            and not m.cpu_fallback
        ):
            decision = self.plan(self.snapshot(), ev.model_id)
            if isinstance(decision, Infeasible):
                self.effects.reject(ev.rid, _insufficient(m, decision))
                return
        if ev.kind is WaiterKind.REQUEST and self._queued_for(m) >= self.config.server.max_queue:
            self.effects.reject(
                ev.rid,
                QueueFull(
                    f"{self.config.server.max_queue} requests are already waiting for model "
                    f"'{m.model_id}'; retry later"
                ),
            )
            return
        now = self.clock()
        self.waiters[ev.rid] = Waiter(ev.rid, ev.model_id, ev.kind, now)
        m.waiters.append(ev.rid)
        if ev.kind is not WaiterKind.PRELOAD:
            self.effects.call_at(now + self.config.server.queue_timeout, Deadline(ev.rid))
        self.effects.notify(Notice.QUEUED, ev.model_id, ev.kind.value)

    def _admit(self, rid: int, m: ModelRecord, kind: WaiterKind) -> None:
        if kind is WaiterKind.REQUEST:
            self._hold(rid, m)
            self.effects.grant(rid, m.model_id, m.generation)
        elif kind is WaiterKind.ADMIN_LOAD:
            self.effects.answer(rid)

    def _hold(self, rid: int, m: ModelRecord) -> None:
        """Count request ``rid`` in flight on ``m`` (its lease)."""
        m.in_flight += 1
        m.last_used = self.wall()
        self.leases[rid] = Held(rid, m.model_id, m.generation, self.clock())

    def _release(self, rid: int) -> None:
        lease = self.leases.pop(rid, None)
        if lease is None:
            return
        m = self.models[lease.model_id]
        if lease.generation != m.generation or m.state not in (
            ModelState.READY,
            ModelState.DRAINING,
        ):
            return
        m.in_flight -= 1
        held = self.clock() - lease.granted_at
        m.service_s = held if m.service_s is None else 0.9 * m.service_s + 0.1 * held
        if m.in_flight > 0:
            return
        if m.state is ModelState.DRAINING:
            self._drained(m)
        else:
            self._became_idle(m)

    def _became_idle(self, m: ModelRecord) -> None:
        m.idle_since = self.clock()
        if m.ttl is not None and not m.pinned:
            due = m.idle_since + m.ttl
            self.effects.call_at(due, TtlExpired(m.model_id, m.generation, due))

    def _cancel(self, rid: int) -> None:
        if rid in self.leases:
            self._release(rid)
            return
        w = self.waiters.pop(rid, None)
        if w is None:
            return
        m = self.models[w.model_id]
        m.waiters.remove(rid)
        self._drop_pending_if_unwanted(m)

    def _deadline(self, rid: int) -> None:
        w = self.waiters.get(rid)
        if w is None:
            return
        self._cancel(rid)
        self.effects.reject(
            rid,
            QueueTimeout(
                f"waited {self.config.server.queue_timeout:g}s for model '{w.model_id}' "
                f"(state {self.models[w.model_id].state.value}) without getting it"
            ),
        )

    def _drop_pending_if_unwanted(self, m: ModelRecord) -> None:
        if not m.waiters and m.model_id in self.pending:
            del self.pending[m.model_id]

    def _load_finished(self, ev: LoadFinished) -> None:
        m = self.models[ev.model_id]
        if ev.generation != m.generation or m.state is not ModelState.LOADING:
            return
        if ev.error is not None:
            m.move(ModelState.UNLOADED)
            m.pid = None
            m.last_error = ev.error
            m.stop_when_ready = None
            first_line = ev.error.splitlines()[0] if ev.error else "load failed"
            self.effects.notify(Notice.LOAD_FAILED, m.model_id, first_line)
            for w in self._take_waiters(m):
                self.effects.reject(
                    w.rid, ModelLoadFailed(f"model '{m.model_id}' failed to load: {ev.error}")
                )
            self._reject_sleep_waiters(m, f"its load failed ({first_line})")
            self._answer_unload_waiters(m)
            self._forget_if_removed(m)
            return
        m.move(ModelState.READY)
        m.pid = ev.pid
        m.last_error = None
        m.load_s = self.clock() - m.transition_at
        self.effects.notify(Notice.READY, m.model_id, "load finished")
        self._serve_waiters(m)

    def _serve_waiters(self, m: ModelRecord) -> None:
        """``m`` is ready (loaded or woken): admit its waiters, then carry out what was asked
        of it meanwhile (an admin unload or sleep, a reload, the shutdown)."""
        waiting = self._take_waiters(m)
        for w in waiting:
            self._admit(w.rid, m, w.kind)
        if any(w.kind is not WaiterKind.PRELOAD for w in waiting):
            self.effects.notify(Notice.ADMITTED, m.model_id, f"{len(waiting)} waiting")
        if m.stop_when_ready is not None:
            self._doom(m, m.stop_when_ready)
        elif m.sleep_when_ready:
            m.sleep_when_ready = False
            self._admin_sleep_ready(m)
        elif m.in_flight == 0:
            self._became_idle(m)

    def _wake_finished(self, ev: WakeFinished) -> None:
        m = self.models[ev.model_id]
        if ev.generation != m.generation or m.state is not ModelState.WAKING:
            return
        if ev.error is not None:
            # Rule 12: stop it; its waiters stay and get a cold load once it is gone.
            m.last_error = f"wake failed: {ev.error}"
            self.effects.notify(Notice.WAKE_FAILED, m.model_id, ev.error.splitlines()[0])
            self._stop(m, m.stop_when_ready or StopReason.PRIORITY)
            return
        m.move(ModelState.READY)
        m.holds_host = False
        m.wake_s = self.clock() - m.transition_at
        self.effects.notify(Notice.AWAKE, m.model_id, f"{m.wake_s:.3f}s")
        self._serve_waiters(m)

    def _sleep_finished(self, ev: SleepFinished) -> None:
        m = self.models[ev.model_id]
        if ev.generation != m.generation or m.state is not ModelState.SUSPENDING:
            return
        if ev.error is not None:
            m.last_error = f"sleep failed: {ev.error}"
            self.effects.notify(Notice.SLEEP_FAILED, m.model_id, ev.error.splitlines()[0])
            self._reject_sleep_waiters(m, f"its sleep failed ({ev.error.splitlines()[0]})")
            self._stop(m, m.stop_when_ready or StopReason.PRIORITY)
            return
        m.move(ModelState.SLEEPING)
        m.asleep = True
        self.effects.notify(Notice.ASLEEP, m.model_id, f"{m.residual_gb:g} GB kept")
        rids, m.sleep_waiters = m.sleep_waiters, []
        for rid in rids:
            self.effects.answer(rid)
        if m.stop_when_ready is not None:
            self._stop(m, m.stop_when_ready)

    def _reject_sleep_waiters(self, m: ModelRecord, why: str) -> None:
        rids, m.sleep_waiters = m.sleep_waiters, []
        for rid in rids:
            self.effects.reject(rid, CannotSleep(f"model '{m.model_id}' did not sleep: {why}"))

    def _take_waiters(self, m: ModelRecord) -> list[Waiter]:
        rids, m.waiters = m.waiters, []
        return [self.waiters.pop(rid) for rid in rids]

    def _process_exited(self, ev: ProcessExited) -> None:
        m = self.models[ev.model_id]
        if ev.generation != m.generation or m.state not in ALIVE:
            return
        m.move(ModelState.UNLOADED)
        m.sleep_after_drain = None
        self.drain_reasons.pop(m.model_id, None)
        m.pid = None
        m.in_flight = 0
        m.stop_when_ready = None
        for rid in [r for r, lease in self.leases.items() if lease.model_id == m.model_id]:
            del self.leases[rid]
        reason = f"process exited with status {ev.returncode}"
        m.last_error = f"{reason}\n{ev.log_tail}" if ev.log_tail else reason
        self.effects.notify(Notice.CRASHED, m.model_id, reason)
        self._reject_sleep_waiters(m, reason)
        self._answer_unload_waiters(m)
        self._forget_if_removed(m)

    def _stop_finished(self, ev: StopFinished) -> None:
        m = self.models[ev.model_id]
        if ev.generation != m.generation or m.state is not ModelState.UNLOADING:
            return
        m.move(ModelState.UNLOADED)
        m.pid = None
        m.stop_when_ready = None
        m.stop_s = self.clock() - m.transition_at
        self.effects.notify(Notice.UNLOADED, m.model_id, "process gone")
        self._reject_sleep_waiters(m, "it was stopped")
        self._answer_unload_waiters(m)
        self._forget_if_removed(m)

    def _answer_unload_waiters(self, m: ModelRecord) -> None:
        rids, m.unload_waiters = m.unload_waiters, []
        for rid in rids:
            self.effects.answer(rid)

    def _unload(self, ev: Unload) -> None:
        m = self.models.get(ev.model_id)
        if m is None or m.state is ModelState.UNLOADED:
            self.effects.answer(ev.rid)
            return
        m.unload_waiters.append(ev.rid)
        if m.state in (ModelState.LOADING, ModelState.WAKING, ModelState.SUSPENDING):
            m.stop_when_ready = StopReason.ADMIN
        elif m.state is ModelState.READY:
            self._doom(m, StopReason.ADMIN)
        elif m.state is ModelState.SLEEPING:
            self._stop(m, StopReason.ADMIN)
        elif m.state is ModelState.DRAINING and m.sleep_after_drain is not None:
            m.sleep_after_drain = None  # it stops after the drain instead
            self.drain_reasons[m.model_id] = StopReason.ADMIN
            self._reject_sleep_waiters(m, "an admin unload stops it")

    def _sleep(self, ev: Sleep) -> None:
        """Admin sleep (rule 13): drain a ready model and put it to sleep."""
        m = self.models.get(ev.model_id)
        if m is None or m.removed:
            self.effects.reject(ev.rid, ModelNotFound(ev.model_id))
            return
        if m.sleep_level is None:
            self.effects.reject(
                ev.rid, CannotSleep(f"model '{m.model_id}' has no 'sleep:' in its config")
            )
            return
        if m.state is ModelState.SLEEPING:
            self.effects.answer(ev.rid)
            return
        if m.state is ModelState.UNLOADED or (
            m.state in (ModelState.DRAINING, ModelState.UNLOADING) and m.sleep_after_drain is None
        ):
            what = "not loaded" if m.state is ModelState.UNLOADED else "being stopped"
            self.effects.reject(
                ev.rid, CannotSleep(f"model '{m.model_id}' is {what}: nothing to put to sleep")
            )
            return
        if self.closing:
            self.effects.reject(ev.rid, ModelUnavailable("llmux is shutting down"))
            return
        m.sleep_waiters.append(ev.rid)
        if m.state in (ModelState.LOADING, ModelState.WAKING):
            m.sleep_when_ready = True
        elif m.state is ModelState.READY:
            self._admin_sleep_ready(m)
        # SUSPENDING, or DRAINING to sleep: answered once asleep.

    def _admin_sleep_ready(self, m: ModelRecord) -> None:
        stops = host_room(self.snapshot(), m.model_id)
        if stops is None:
            self._reject_sleep_waiters(
                m,
                f"its {m.sleep_host_gb:g} GB of host memory does not fit the host budget "
                f"({self.host_reserved_gb:g} of {self.host_budget_gb:g} GB held by sleepers "
                "it may not stop)",
            )
            if m.in_flight == 0:
                self._became_idle(m)
            return
        for vid in stops:
            self._stop(self.models[vid], StopReason.PRIORITY)
        self._doom(m, StopReason.ADMIN, SleepReason.ADMIN)

    def _ttl_expired(self, ev: TtlExpired) -> None:
        m = self.models[ev.model_id]
        if (
            ev.generation != m.generation
            or m.state is not ModelState.READY
            or m.in_flight > 0
            or m.ttl is None
            or m.pinned
        ):
            return
        if self.clock() - m.idle_since + 1e-6 >= m.ttl:
            self._doom(m, StopReason.TTL)
        elif abs(ev.due - (m.idle_since + m.ttl)) < 1e-9:
            # This idle spell's own timer fired early (event-loop timers have ~1 ms
            # granularity): set it again rather than lose it.
            self.effects.call_at(ev.due, ev)

    def _reconfigure(self, ev: Reconfigure) -> None:
        new = ev.config
        self.config = new
        self.budget_gb = ev.budget_gb
        if ev.host_budget_gb is not None:
            self.host_budget_gb = ev.host_budget_gb
        for mid, m in list(self.models.items()):
            if mid not in new.models:
                m.removed = True
                self.pending.pop(mid, None)
                for w in self._take_waiters(m):
                    self.effects.reject(w.rid, ModelNotFound(mid))
                self._retire(m)
                continue
            old_spec = m.spec
            m.removed = False
            m.configure(new)
            spec = new.models[mid]
            known = ev.learned.get(mid, 0.0)
            if old_spec is not None and launch_fingerprint(old_spec) != launch_fingerprint(spec):
                # What the old process taught does not apply to the new one.
                if m.state is ModelState.UNLOADED:
                    m.learned_gb, m.next_learned_gb = known, None
                else:
                    m.next_learned_gb = known
                # Its times and residual were the old launch's: the new ones apply once the old
                # process is gone (it may be asleep, holding the old residual, until then).
                if m.state is ModelState.UNLOADED:
                    m.know(ev.known.get(mid))
                else:
                    m.next_known = ev.known.get(mid) or Known()
                self._retire(m)  # its waiters stay and get the new process
            else:
                m.learned_gb = max(m.learned_gb, known)
                if m.next_learned_gb is not None:
                    m.next_learned_gb = max(m.next_learned_gb, known)
        for mid in new.models:
            if mid not in self.models:
                self.models[mid] = ModelRecord.from_config(mid, new)
                self.models[mid].learned_gb = ev.learned.get(mid, 0.0)
                self.models[mid].know(ev.known.get(mid))
        # Reservations and the budget may have changed: promises are planned again.
        self.pending.clear()
        for mid, m in self.models.items():
            if m.pinned and m.state is ModelState.UNLOADED and not m.waiters:
                self._acquire(Acquire(next(self._internal_rids), mid, WaiterKind.PRELOAD))

    def _measured(self, ev: Measured) -> None:
        m = self.models[ev.model_id]
        if ev.generation is not None and (ev.generation != m.generation or m.on_cpu):
            return  # an older process, or one placed on the CPU: not this reservation
        if ev.gb <= m.learned_gb:
            return
        before = m.gpu_gb
        m.learned_gb = ev.gb
        if m.gpu_gb > before:
            # A larger reservation: promises made with the old figures are planned again (a
            # pending load may need more victims now, or no longer fit at all).
            self.pending.clear()

    def _measured_residual(self, ev: MeasuredResidual) -> None:
        m = self.models[ev.model_id]
        if ev.generation is not None and ev.generation != m.generation:
            return
        if ev.gb <= m.learned_residual_gb:
            return
        m.learned_residual_gb = ev.gb
        self.pending.clear()  # plans made with the smaller residual are made again

    def _retire(self, m: ModelRecord) -> None:
        """Stop ``m`` for a reload (after draining); forget it once unloaded if it was removed."""
        if m.state is ModelState.READY:
            self._doom(m, StopReason.RELOAD)
        elif m.state is ModelState.SLEEPING:
            self._stop(m, StopReason.RELOAD)
        elif m.state in (ModelState.LOADING, ModelState.WAKING, ModelState.SUSPENDING):
            m.stop_when_ready = StopReason.RELOAD
        elif m.state is ModelState.DRAINING and m.sleep_after_drain is not None:
            m.sleep_after_drain = None
            self.drain_reasons[m.model_id] = StopReason.RELOAD
        self._forget_if_removed(m)

    def _forget_if_removed(self, m: ModelRecord) -> None:
        if m.removed and m.state is ModelState.UNLOADED:
            self.models.pop(m.model_id, None)

    def _shutdown(self) -> None:
        self.closing = True
        for rid in list(self.waiters):
            w = self.waiters.pop(rid)
            self.models[w.model_id].waiters.remove(rid)
            self.effects.reject(rid, ModelUnavailable("llmux is shutting down"))
        self.pending.clear()
        for m in self.models.values():
            self._reject_sleep_waiters(m, "llmux is shutting down")
            if m.state is ModelState.READY:
                self._doom(m, StopReason.SHUTDOWN)
            elif m.state is ModelState.SLEEPING:
                self._stop(m, StopReason.SHUTDOWN)
            elif m.state in (ModelState.LOADING, ModelState.WAKING, ModelState.SUSPENDING):
                m.stop_when_ready = StopReason.SHUTDOWN
            elif m.state is ModelState.DRAINING and m.sleep_after_drain is not None:
                m.sleep_after_drain = None  # no sleeping through a shutdown: it stops
                self.drain_reasons[m.model_id] = StopReason.SHUTDOWN

    # ------------------------------------------------------------------ acting

    def _doom(self, m: ModelRecord, reason: StopReason, sleep: SleepReason | None = None) -> None:
        """Evict ``m`` (stop it, or with ``sleep`` put it to sleep): at once if idle, else
        drain first. A sleep's host reservation is promised from now on."""
        if m.in_flight == 0 and (sleep is None or self._host_fits(m)):
            if sleep is not None:
                self._suspend(m, sleep)
            else:
                self._stop(m, reason)
            return
        m.move(ModelState.DRAINING)
        m.sleep_after_drain = sleep
        self.drain_reasons[m.model_id] = reason
        self.effects.notify(Notice.DRAINING, m.model_id, reason.value)
        if m.in_flight == 0:
            self._drained(m)  # idle, waiting for host memory that stops under way return

    def _host_fits(self, m: ModelRecord) -> bool:
        """``m``'s host reservation fits in what processes really hold now."""
        return self.host_reserved_gb + m.sleep_host_gb <= self.host_budget_gb + 1e-9

    def _drained(self, m: ModelRecord) -> None:
        """A draining model has nothing in flight: it goes to sleep (once its host reservation
        really fits: sleepers being stopped still hold theirs), or stops."""
        if m.sleep_after_drain is not None:
            if self._host_fits(m):
                del self.drain_reasons[m.model_id]
                self._suspend(m, m.sleep_after_drain)
                return
            if any(o.state is ModelState.UNLOADING and o.holds_host for o in self.models.values()):
                return  # host memory is on its way back: sleep then
            m.sleep_after_drain = None  # it never will be: stop instead (rule 11)
            self._reject_sleep_waiters(m, "its host reservation does not fit the host budget")
        self._stop(m, self.drain_reasons.pop(m.model_id))

    def _stop(self, m: ModelRecord, reason: StopReason) -> None:
        m.move(ModelState.UNLOADING)
        m.sleep_after_drain = None
        m.transition_at = self.clock()
        self.effects.notify(Notice.UNLOADING, m.model_id, reason.value)
        self.effects.stop(m.model_id, m.generation, reason)

    def _suspend(self, m: ModelRecord, why: SleepReason) -> None:
        """Rule 11: the sleep is sent; the reservation comes back (less the residual) once the
        engine says it sleeps."""
        assert m.sleep_level is not None
        m.move(ModelState.SUSPENDING)
        m.sleep_after_drain = None
        m.holds_host = m.sleep_host_gb > 0
        self.effects.notify(Notice.SLEEPING, m.model_id, why.value)
        self.effects.suspend(m.model_id, m.generation, m.sleep_level)

    def _wake(self, m: ModelRecord) -> None:
        """Rule 12: a wake is a load of the same process (same generation)."""
        assert m.sleep_level is not None
        self.pending.pop(m.model_id, None)
        m.move(ModelState.WAKING)
        m.asleep = False
        m.transition_at = self.clock()
        self.effects.notify(Notice.WAKING, m.model_id, f"{len(m.waiters)} waiting")
        self.effects.wake(m.model_id, m.generation, m.sleep_level)

    def _start(self, m: ModelRecord) -> None:
        if m.state is ModelState.SLEEPING:
            self._wake(m)
            return
        self.pending.pop(m.model_id, None)
        m.move(ModelState.LOADING)
        m.transition_at = self.clock()
        m.generation += 1
        where = " on the CPU" if m.on_cpu else ""
        self.effects.notify(Notice.LOADING, m.model_id, f"{len(m.waiters)} waiting{where}")
        self.effects.start_load(m.model_id, m.generation)

    def _free_now(self) -> float:
        return self.budget_gb - self.reserved_gb

    @staticmethod
    def _need_gb(m: ModelRecord) -> float:
        """What loading (or waking) ``m`` takes beyond what it holds (a sleeper's residual)."""
        if m.state is ModelState.SLEEPING:
            return m.gpu_gb - m.residual_gb
        return m.reservation_gb

    def _waiting_models(self) -> list[ModelRecord]:
        """Unloaded models with waiters, not yet promised: the order in which they are planned.

        Starving (waited past the pass-over bound) first, oldest first; then higher tier first;
        then oldest waiter first. Requests for one model are planned (and granted) as a group.
        """
        now = self.clock()
        out = []
        for m in self.models.values():
            if (
                m.state in (ModelState.UNLOADED, ModelState.SLEEPING)
                and m.waiters
                and m.model_id not in self.pending
            ):
                out.append(m)

        def key(m: ModelRecord) -> tuple[int, int, float]:
            oldest = self.waiters[m.waiters[0]].enqueued_at
            if now - oldest >= self.passover_bound:
                return (0, 0, oldest)
            return (1, -m.tier_rank, oldest)

        return sorted(out, key=key)

    def _pump(self) -> None:
        """Act on everything the current state allows, until nothing changes. Called only while
        something waits or a load is promised, and not while closing."""
        progress = True
        while progress:
            progress = False
            # Promised loads start, in promise order, once their memory is really free.
            for mid in list(self.pending):
                m = self.models[mid]
                if m.state not in (ModelState.UNLOADED, ModelState.SLEEPING):
                    del self.pending[mid]  # no longer startable (a crash meanwhile): plan again
                    continue
                if self._need_gb(m) <= self._free_now() + 1e-9:
                    self._start(m)
                    progress = True
            for m in self._waiting_models():
                decision = self.plan(self.snapshot(), m.model_id)
                if isinstance(decision, Start):
                    self._start(m)
                elif m.cpu_fallback:
                    # It would have to evict, wait, or cannot fit: run it on the CPU instead.
                    m.on_cpu = True
                    self._start(m)
                elif isinstance(decision, Promise):
                    self.pending[m.model_id] = self._need_gb(m)
                    # Sleepers first: a victim that goes to sleep may wait for their host memory.
                    victims = sorted(
                        decision.victims,
                        key=lambda v: self.models[v].state is not ModelState.SLEEPING,
                    )
                    for vid in victims:
                        victim = self.models[vid]
                        if victim.state is ModelState.SLEEPING:
                            self._stop(victim, StopReason.PRIORITY)
                        elif vid in decision.sleep:
                            self._doom(victim, StopReason.PRIORITY, SleepReason.PRIORITY)
                        else:
                            self._doom(victim, StopReason.PRIORITY)
                elif isinstance(decision, Infeasible):
                    for w in self._take_waiters(m):
                        self.effects.reject(w.rid, _insufficient(m, decision))
                elif isinstance(decision, Wait):
                    if decision.retry_in_s is not None and m.model_id not in self._replans:
                        self._replans.add(m.model_id)
                        when = self.clock() + decision.retry_in_s
                        self.effects.call_at(when, Replan(m.model_id))
                    # Strict priority: nothing below a waiting model is planned before it.
                    break
                progress = True
                break  # re-plan from the top with the new state

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Raise AssertionError if a rule is broken. Cheap; used by tests after every step."""
        assert self.reserved_gb <= self.budget_gb + self.overcommit_gb + 1e-6, (
            f"budget: reserved {self.reserved_gb} > {self.budget_gb} + {self.overcommit_gb}"
        )
        assert self.host_reserved_gb <= self.host_budget_gb + self.host_overcommit_gb + 1e-6, (
            f"host budget: reserved {self.host_reserved_gb} > {self.host_budget_gb}"
        )
        for m in self.models.values():
            if m.state not in (ModelState.READY, ModelState.DRAINING):
                assert m.in_flight == 0, f"{m.model_id} {m.state} has in_flight {m.in_flight}"
            assert m.in_flight >= 0
        assert sum(len(m.waiters) for m in self.models.values()) == len(self.waiters)


def _insufficient(m: ModelRecord, d: Infeasible) -> InsufficientVram:
    held = ", ".join(f"{mid} ({gb:g} GB)" for mid, gb in d.holders) or "nothing"
    measured = (
        f" (measured; {m.configured_gb:g} GB configured)" if m.learned_gb > m.configured_gb else ""
    )
    return InsufficientVram(
        f"model '{m.model_id}' needs {d.need_gb:g} GB{measured} but only {d.budget_gb:g} GB is "
        f"budgeted and memory it may not take is held by: {held}"
    )


def _drain_estimate(m: ModelRecord) -> float:
    """Expected seconds until ``m``'s requests in flight are done: its mean lease time x
    H(in flight), the expected longest of that many exponential remainders; 0 when idle or
    never measured."""
    if m.in_flight == 0 or m.service_s is None:
        return 0.0
    return m.service_s * sum(1.0 / k for k in range(1, min(m.in_flight, 256) + 1))
