"""The owner: the asyncio face of the scheduler core.

``Scheduler`` owns ``SchedulerCore`` and is the one way to it. Every event (a request's
``Acquire`` and ``Release``, an admin load or unload, a load finished, a process exited, a timer)
goes through ``post`` to ``_handle`` and so to ``SchedulerCore.handle``: at once when the owner is
idle, else through the owner task's queue, in order. Routes talk to it only through
``try_acquire``/``acquire``/``release``/``load``/``unload``/``snapshot``.

It carries out the core's ``Effects``: grants, answers and rejections resolve the waiting
requests here; timers are loop timers that post their event; ``notify`` logs and tells the
listeners; starting and stopping processes is the process effects' job (``processes.py``), and
with a ``GpuProbe`` (NVML) waiting for free memory, measuring and learning peaks is the GPU
measurer's (``measurer.py``). Slow work runs in tasks of theirs and comes back as events, so no
lock is ever held across I/O (rule 7).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmux.config import Config
from llmux.errors import LlmuxError, ModelNotFound
from llmux.gpu import GpuProbe
from llmux.scheduling.core import SchedulerCore
from llmux.scheduling.events import (
    Acquire,
    Cancel,
    Event,
    Notice,
    Reconfigure,
    Release,
    Shutdown,
    Sleep,
    Unload,
)
from llmux.scheduling.launcher import Child, Launcher, SleepClient, SpecBuilder
from llmux.scheduling.learned import LearnedStore, state_dir
from llmux.scheduling.measurer import GpuMeasurer
from llmux.scheduling.processes import Processes
from llmux.scheduling.snapshot import EventSnapshot, ModelSnapshot, SchedulerSnapshot
from llmux.scheduling.state import (
    RESIDENT,
    Known,
    ModelRecord,
    ModelState,
    StopReason,
    WaiterKind,
)

log = logging.getLogger("llmux.scheduler")

Listener = Callable[[EventSnapshot], None]


@dataclass(slots=True)
class Lease:
    """Model ``model_id`` is ready and this request is counted in flight until released.
    Never changed once granted (not frozen: one is built per request, and a frozen one costs
    three times as much to build)."""

    rid: int
    model_id: str
    generation: int
    base_url: str
    child: Child
    """The process serving it (the relay asks it whether it died when an answer ends)."""


class Scheduler:
    """The owner task around ``SchedulerCore``, and its ``Effects``."""

    def __init__(
        self,
        config: Config,
        launcher: Launcher,
        *,
        launch_spec: SpecBuilder,
        budget_gb: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        gpu: GpuProbe | None = None,
        sleeper: SleepClient | None = None,
        host_available_gb: float | None = None,
    ) -> None:
        """``launch_spec``: builds each child's ``LaunchSpec`` from config (``llmux.launch``).
        ``gpu``: the device probe (NVML); None = nothing is measured, nothing is waited for,
        and learned peaks are neither read nor written. ``sleeper``: puts children's engines to
        sleep and wakes them (``sleep:`` models; None = their sleeps fail and they stop).
        ``host_available_gb``: host memory available at start (``host.ram_gb: auto``)."""
        self.host_available_gb = host_available_gb
        self.clock = clock
        self.measurer: GpuMeasurer | None = None
        learned: dict[str, float] = {}
        known: dict[str, Known] = {}
        if gpu is not None:
            store = LearnedStore(state_dir(config.server.state_dir))
            self.measurer = GpuMeasurer(gpu, store, self.post, lambda: self.core.config, clock)
            learned = self.measurer.learned(config.models)
            known = self.measurer.known(config.models)
            if learned:
                log.info(
                    "learned peaks from %s: %s",
                    store.path,
                    ", ".join(f"{mid} {gb:.2f} GB" for mid, gb in sorted(learned.items())),
                )
        self.processes = Processes(launcher, launch_spec, self.post, self.measurer, sleeper)
        self.core = SchedulerCore(
            config,
            budget_gb,
            self,
            clock,
            wall,
            learned=learned,
            host_budget_gb=config.host.budget_gb(host_available_gb),
            known=known,
        )
        self.listeners: list[Listener] = []
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Lease | None]] = {}
        self._owner: asyncio.Task[None] | None = None
        self._closing = False
        """``begin_shutdown`` ran: Shutdown is posted once."""
        self._all_unloaded = asyncio.Event()
        self._handling = False
        self._trying = 0
        """The rid of the try being handled now (``try_acquire``); 0 when none is."""
        self._tried: Lease | None = None
        """Its lease, if the core granted it."""

    @property
    def config(self) -> Config:
        """The config in force (it changes on reload)."""
        return self.core.config

    @property
    def store(self) -> LearnedStore | None:
        """The learned peaks on disk (None without NVML: nothing is learned)."""
        return self.measurer.store if self.measurer is not None else None

    def reconfigure(self, config: Config, budget_gb: float) -> None:
        learned = self.measurer.learned(config.models) if self.measurer is not None else {}
        known = self.measurer.known(config.models) if self.measurer is not None else {}
        host = config.host.budget_gb(self.host_available_gb)
        self.post(Reconfigure(config, budget_gb, learned, host_budget_gb=host, known=known))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._owner = asyncio.create_task(self._run(), name="llmux-scheduler")
        for mid, m in self.config.models.items():
            if m.pinned:
                self.post(Acquire(next(self._ids), mid, WaiterKind.PRELOAD))

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            self._handle(event)

    def _handle(self, event: Event) -> None:
        self._handling = True
        try:
            self.core.handle(event)
        except Exception:  # a bug; keep the owner alive and say so once
            log.exception("scheduler failed to handle %r", event)
        finally:
            self._handling = False
        if self.core.closing and all(
            m.state is ModelState.UNLOADED for m in self.core.models.values()
        ):
            self._all_unloaded.set()

    def post(self, event: Event) -> None:
        """Hand ``event`` to the core: here and now when the owner is idle (nothing queued, no
        event being handled: the same order the owner task would use, minus two task switches
        per request), else through the owner's queue. Either way ``_handle`` is the way in."""
        if self._idle():
            self._handle(event)
        else:
            self._queue.put_nowait(event)

    def begin_shutdown(self) -> None:
        """llmux is stopping (SIGTERM): answer every waiting request (503, shutting down),
        abandon the loads under way, doom the ready models; requests in flight go on. Once."""
        if self._owner is None or self._closing:
            return
        self._closing = True
        self.post(Shutdown())
        self.processes.abandon_loads()

    async def shutdown(self, grace: float) -> None:
        """Reject waiters, let in-flight requests finish for ``grace`` s, then stop every child."""
        if self._owner is None:
            return
        self.begin_shutdown()
        try:
            await asyncio.wait_for(self._all_unloaded.wait(), grace)
        except TimeoutError:
            log.warning("shutdown grace of %gs over; stopping children now", grace)
        if self.measurer is not None:
            await self.measurer.close()
        await self.processes.close()
        self._owner.cancel()
        await asyncio.gather(self._owner, return_exceptions=True)
        self._owner = None

    # ------------------------------------------------------------------ requests

    def resolve(self, name: str) -> str:
        model_id = self.config.resolve(name)
        if model_id is None:
            raise ModelNotFound(name)
        return model_id

    async def _wait(self, event_for: Callable[[int], Event]) -> Lease | None:
        rid = next(self._ids)
        fut: asyncio.Future[Lease | None] = asyncio.get_running_loop().create_future()
        self._futures[rid] = fut
        self.post(event_for(rid))
        try:
            return await fut
        except asyncio.CancelledError:
            self.post(Cancel(rid))
            raise
        finally:
            self._futures.pop(rid, None)

    def _idle(self) -> bool:
        """The owner is between events: state may be read and changed here, synchronously."""
        return self._owner is not None and not self._handling and self._queue.empty()

    def try_acquire(self, model_id: str) -> Lease | None:
        """A lease at once if ``model_id`` is ready (no future, no wait); else None, and
        ``acquire`` is the way. The hot path for requests to a loaded model: a try
        (``Acquire(wait=False)``) handled synchronously, its grant caught on the way out."""
        if not self._idle():
            return None
        rid = self._trying = next(self._ids)
        self._handle(Acquire(rid, model_id, WaiterKind.REQUEST, False))
        lease, self._tried, self._trying = self._tried, None, 0
        return lease

    async def acquire(self, model_id: str) -> Lease:
        """Wait until ``model_id`` is ready and count this request in flight."""
        lease = self.try_acquire(model_id)
        if lease is not None:
            return lease
        lease = await self._wait(lambda rid: Acquire(rid, model_id))
        assert lease is not None
        return lease

    def release(self, lease: Lease) -> None:
        self.post(Release(lease.rid))
        if self.measurer is not None:
            self.measurer.measure_soon(lease.model_id)

    async def load(self, model_id: str) -> None:
        await self._wait(lambda rid: Acquire(rid, model_id, WaiterKind.ADMIN_LOAD))

    async def unload(self, model_id: str) -> None:
        await self._wait(lambda rid: Unload(rid, model_id))

    async def sleep(self, model_id: str) -> None:
        """Admin sleep: returns once ``model_id`` sleeps (it drains first). Raises
        ``CannotSleep`` (409) if it has no ``sleep:``, is not loaded, or had to stop instead."""
        await self._wait(lambda rid: Sleep(rid, model_id))

    def child(self, model_id: str) -> Child | None:
        """The model's current child, or its last one (exited: kept for its log lines)."""
        return self.processes.child(model_id)

    def snapshot(self) -> SchedulerSnapshot:
        """A typed copy of the state, for /status, /v1/models and the /metrics gauges."""
        core = self.core
        models = tuple(
            ModelSnapshot(
                id=mid,
                type=m.spec.type if m.spec else None,
                tier=m.tier,
                state=m.state,
                vram_gb=m.gpu_gb,
                placement="cpu" if m.on_cpu else "gpu",
                measured_gb=self._measured_gb(m),
                pinned=m.pinned,
                in_flight=m.in_flight,
                queued=len(m.waiters),
                last_used=m.last_used,
                pid=m.pid,
                last_error=m.last_error,
                sleep_level=m.sleep_level,
                residual_gb=m.residual_gb if m.sleep_level is not None else 0.0,
                host_gb=m.host_reserved_gb,
            )
            for mid, m in core.models.items()
        )
        return SchedulerSnapshot(
            core.budget_gb,
            core.reserved_gb,
            self._device_used_gb(),
            models,
            host_budget_gb=core.host_budget_gb,
            host_reserved_gb=core.host_reserved_gb,
        )

    def _measured_gb(self, m: ModelRecord) -> float | None:
        """The last measured use of ``m``'s current process on the GPU; None if there is none."""
        found = self.measurer.last(m.model_id) if self.measurer is not None else None
        if found is None or found[0] != m.generation or m.on_cpu or m.state not in RESIDENT:
            return None
        return round(found[1], 3)

    def _device_used_gb(self) -> float | None:
        return self.measurer.device_used_gb() if self.measurer is not None else None

    # ------------------------------------------------------------------ effects

    def start_load(self, model_id: str, generation: int) -> None:
        m = self.core.models[model_id]
        assert m.spec is not None
        self.processes.start(model_id, generation, m.spec, m.on_cpu, m.reservation_gb)

    def stop(self, model_id: str, generation: int, reason: StopReason) -> None:
        self.processes.stop(model_id, generation)

    def suspend(self, model_id: str, generation: int, level: int) -> None:
        m = self.core.models[model_id]
        assert m.spec is not None
        self.processes.suspend(model_id, generation, m.spec, level)

    def wake(self, model_id: str, generation: int, level: int) -> None:
        m = self.core.models[model_id]
        assert m.spec is not None
        self.processes.wake(model_id, generation, m.spec, level, m.gpu_gb - m.residual_gb)

    def grant(self, rid: int, model_id: str, generation: int) -> None:
        child = self.processes.child(model_id)
        if rid == self._trying and child is not None:
            self._tried = Lease(rid, model_id, generation, child.base_url, child)
            return
        fut = self._futures.get(rid)
        if fut is None or fut.done() or child is None:
            return  # the waiter is gone; its Cancel event releases the lease
        fut.set_result(Lease(rid, model_id, generation, child.base_url, child))

    def answer(self, rid: int) -> None:
        fut = self._futures.get(rid)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def reject(self, rid: int, error: LlmuxError) -> None:
        fut = self._futures.get(rid)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def call_at(self, when: float, event: Event) -> None:
        asyncio.get_running_loop().call_later(max(0.0, when - self.clock()), self.post, event)

    def notify(self, notice: Notice, model_id: str, reason: str) -> None:
        m = self.core.models[model_id]
        if self.measurer is not None and m.spec is not None and not m.on_cpu:
            # The swap costs the planner uses, kept for the next run (learned.json).
            if notice is Notice.READY and m.load_s is not None:
                self.measurer.remember_known(model_id, m.spec, load_s=m.load_s)
            elif notice is Notice.AWAKE and m.wake_s is not None:
                self.measurer.remember_known(model_id, m.spec, wake_s=m.wake_s)
        event = EventSnapshot(
            ts=time.time(),
            event=notice,
            model=model_id,
            tier=m.tier,
            reason=reason,
            state=m.state,
            reserved_gb=round(self.core.reserved_gb, 6),
            budget_gb=self.core.budget_gb,
        )
        log.info(
            "%s model=%s tier=%s reason=%s reserved_gb=%.2f/%.2f",
            notice.value,
            model_id,
            m.tier,
            reason,
            event.reserved_gb,
            event.budget_gb,
            extra={"llmux_event": event.as_dict()},
        )
        for listener in self.listeners:
            listener(event)
