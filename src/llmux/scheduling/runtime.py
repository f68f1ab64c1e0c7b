"""The owner task and the real effects: the asyncio face of the scheduler core.

``Scheduler`` runs one task that reads events from a queue and hands each to
``SchedulerCore.handle``. Routes talk to it only through ``acquire``/``release``/``load``/
``unload``/``status``; slow work (spawning, stopping) runs in tasks of its own and comes back as
events, so no lock is ever held across I/O (rule 7).

With a ``GpuProbe`` (NVML), rule 10 lives here too: a load's process starts only once the device
really shows its reservation free, each model's process is measured after it is ready and after
requests (``Measured`` events), and rising peaks are kept in ``learned.json``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmux.config import Config, ModelConfig
from llmux.errors import LaunchFailed, LlmuxError, ModelNotFound
from llmux.gpu import GpuProbe
from llmux.observe import ModelGauge, SchedulerEvent
from llmux.scheduling.core import SchedulerCore
from llmux.scheduling.events import (
    Acquire,
    Cancel,
    Event,
    LoadFinished,
    Measured,
    Notice,
    ProcessExited,
    Reconfigure,
    Release,
    Shutdown,
    StopFinished,
    Unload,
)
from llmux.scheduling.launcher import Child, Launcher, SpecBuilder
from llmux.scheduling.learned import LearnedStore, state_dir
from llmux.scheduling.state import (
    RESIDENT,
    ModelRecord,
    ModelState,
    StopReason,
    WaiterKind,
    launch_fingerprint,
)

log = logging.getLogger("llmux.scheduler")

Listener = Callable[[SchedulerEvent], None]

MEASURE_EVERY_S = 1.0
"""At most one measurement of a model's process this often. The one after it is ready runs at
once; one asked for sooner (a request ended) runs when the second is up, so the use after the
last request of a burst is always measured."""
FREE_POLL_S = 0.05
"""How often a load waiting for free memory reads it again."""


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


@dataclass(frozen=True)
class _Running:
    generation: int
    child: Child
    stop_timeout: float
    gpu_spec: ModelConfig | None = None
    """The config it was started with on the GPU (None on the CPU): what it teaches is for this."""


class Scheduler:
    """Effects implementation + owner task around ``SchedulerCore``."""

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
    ) -> None:
        """``launch_spec``: builds each child's ``LaunchSpec`` from config (``llmux.launch``).
        ``gpu``: the device probe (NVML); None = nothing is measured, nothing is waited for,
        and learned peaks are neither read nor written."""
        self.launcher = launcher
        self.launch_spec = launch_spec
        self.clock = clock
        self.gpu = gpu
        self.store = LearnedStore(state_dir(config.server.state_dir)) if gpu is not None else None
        learned = self.store.peaks_for(config.models) if self.store is not None else {}
        if self.store is not None and learned:
            log.info(
                "learned peaks from %s: %s",
                self.store.path,
                ", ".join(f"{mid} {gb:.2f} GB" for mid, gb in sorted(learned.items())),
            )
        self.core = SchedulerCore(config, budget_gb, self, clock, wall, learned=learned)
        self.listeners: list[Listener] = []
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Lease | None]] = {}
        self._children: dict[str, _Running] = {}
        """Each model's current child (or its last one, kept for its log lines)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._owner: asyncio.Task[None] | None = None
        self._all_unloaded = asyncio.Event()
        self._handling = False
        self._trying = 0
        """The rid of the try being handled now (``try_acquire``); 0 when none is."""
        self._tried: Lease | None = None
        """Its lease, if the core granted it."""
        self._measured: dict[str, tuple[int, float]] = {}
        """Each model's last measured use: (generation of the process, GB)."""
        self._measured_at: dict[str, float] = {}
        self._measuring: set[str] = set()
        """Models with a measurement asked for and not done yet."""
        self._probe_warned = False

    @property
    def config(self) -> Config:
        """The config in force (it changes on reload)."""
        return self.core.config

    def reconfigure(self, config: Config, budget_gb: float) -> None:
        learned = self.store.peaks_for(config.models) if self.store is not None else {}
        self.post(Reconfigure(config, budget_gb, learned))

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

    async def shutdown(self, grace: float) -> None:
        """Reject waiters, let in-flight requests finish for ``grace`` s, then stop every child."""
        if self._owner is None:
            return
        self.post(Shutdown())
        try:
            await asyncio.wait_for(self._all_unloaded.wait(), grace)
        except TimeoutError:
            log.warning("shutdown grace of %gs over; stopping children now", grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        children = list(self._children.values())
        self._children.clear()
        await asyncio.gather(
            *(run.child.stop(run.stop_timeout) for run in children if run.child.returncode is None),
            return_exceptions=True,
        )
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
        if self.gpu is not None:
            self._measure_soon(lease.model_id)

    async def load(self, model_id: str) -> None:
        await self._wait(lambda rid: Acquire(rid, model_id, WaiterKind.ADMIN_LOAD))

    async def unload(self, model_id: str) -> None:
        await self._wait(lambda rid: Unload(rid, model_id))

    def child(self, model_id: str) -> Child | None:
        """The model's current child, or its last one (exited: kept for its log lines)."""
        run = self._children.get(model_id)
        return run.child if run else None

    def status(self) -> dict[str, Any]:
        core = self.core
        models = []
        for mid, m in core.models.items():
            models.append(
                {
                    "id": mid,
                    "type": m.spec.type if m.spec else None,
                    "tier": m.tier,
                    "state": m.state.value,
                    "vram_gb": m.gpu_gb,
                    "placement": "cpu" if m.on_cpu else "gpu",
                    "measured_gb": self._measured_gb(m),
                    "pinned": m.pinned,
                    "in_flight": m.in_flight,
                    "queued": len(m.waiters),
                    "last_used": m.last_used,
                    "pid": m.pid,
                    "last_error": m.last_error,
                }
            )
        return {
            "vram": {
                "budget_gb": core.budget_gb,
                "reserved_gb": round(core.reserved_gb, 6),
                "measured_gb": self._device_used_gb(),
            },
            "models": models,
        }

    def _measured_gb(self, m: ModelRecord) -> float | None:
        """The last measured use of ``m``'s current process on the GPU; None if there is none."""
        found = self._measured.get(m.model_id)
        if found is None or found[0] != m.generation or m.on_cpu or m.state not in RESIDENT:
            return None
        return round(found[1], 3)

    def _device_used_gb(self) -> float | None:
        if self.gpu is None:
            return None
        try:
            return round(self.gpu.used_gb(), 3)
        except Exception as exc:
            self._probe_trouble("read used memory", exc)
            return None

    # ------------------------------------------------------------------ effects

    def start_load(self, model_id: str, generation: int) -> None:
        self._spawn(self._load(model_id, generation))

    def stop(self, model_id: str, generation: int, reason: StopReason) -> None:
        self._spawn(self._stop(model_id, generation))

    def grant(self, rid: int, model_id: str, generation: int) -> None:
        run = self._children.get(model_id)
        if rid == self._trying and run is not None:
            self._tried = Lease(rid, model_id, generation, run.child.base_url, run.child)
            return
        fut = self._futures.get(rid)
        if fut is None or fut.done() or run is None:
            return  # the waiter is gone; its Cancel event releases the lease
        fut.set_result(Lease(rid, model_id, generation, run.child.base_url, run.child))

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
        event = SchedulerEvent(
            ts=time.time(),
            event=notice.value,
            model=model_id,
            tier=m.tier,
            reason=reason,
            state=m.state.value,
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

    def gauges(self) -> tuple[float, float, list[ModelGauge]]:
        """(budget, reserved, per-model gauges) for /metrics, read at scrape time."""
        core = self.core
        models = [
            ModelGauge(mid, m.tier, m.state, m.in_flight, len(m.waiters), self._measured_gb(m))
            for mid, m in core.models.items()
        ]
        return core.budget_gb, core.reserved_gb, models

    # ------------------------------------------------------------------ slow work

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, model_id: str, generation: int) -> None:
        record = self.core.models[model_id]
        spec = record.spec
        assert spec is not None
        need = record.reservation_gb  # 0 on the CPU
        try:
            launch = self.launch_spec(model_id, spec, record.on_cpu)
            if self.gpu is not None and need > 0:
                await self._wait_free(model_id, need)
            child = await self.launcher.launch(launch)
        except LaunchFailed as exc:
            self.post(LoadFinished(model_id, generation, error=exc.describe()))
            return
        except Exception as exc:  # e.g. an engine's missing package: a failed load, not a crash
            self.post(LoadFinished(model_id, generation, error=str(exc)))
            return
        gpu_spec = None if record.on_cpu else spec
        self._children[model_id] = _Running(generation, child, launch.stop_timeout, gpu_spec)
        self.post(LoadFinished(model_id, generation, pid=child.pid))
        if self.gpu is not None and gpu_spec is not None:
            self._measure_soon(model_id, at_once=True)
        returncode = await child.wait_exit()
        self.post(
            ProcessExited(model_id, generation, returncode, "\n".join(child.log_tail()[-20:]))
        )

    async def _stop(self, model_id: str, generation: int) -> None:
        run = self._children.get(model_id)
        if run is not None and run.generation == generation:
            await asyncio.shield(run.child.stop(run.stop_timeout))
        self.post(StopFinished(model_id, generation))

    # ------------------------------------------------------------------ rule 10: measuring

    async def _wait_free(self, model_id: str, need: float) -> None:
        """Return once the device shows ``need`` GB free; LaunchFailed after ``gpu.free_wait``.

        Our accounting already says the memory is free (the plan let the load start); this waits
        for the device to agree: a stopped process's memory comes back a little after it exits.
        """
        assert self.gpu is not None
        limit = self.config.gpu.free_wait
        started = self.clock()
        polls = 0
        while True:
            try:
                free = await asyncio.to_thread(self.gpu.free_gb)
            except Exception as exc:  # NVML trouble: load as if there were no NVML
                self._probe_trouble("read free memory", exc)
                return
            polls += 1
            if free + 1e-9 >= need:
                break
            waited = self.clock() - started
            if waited >= limit:
                raise LaunchFailed(
                    f"{model_id}: the GPU shows {free:.2f} GB free after waiting {limit:g} s "
                    f"(gpu.free_wait), but the model needs {need:g} GB",
                    [],
                )
            await asyncio.sleep(min(FREE_POLL_S, limit - waited))
        if polls > 1:
            log.info(
                "gpu_wait model=%s waited_s=%.3f need_gb=%.2f free_gb=%.2f",
                model_id,
                self.clock() - started,
                need,
                free,
            )

    def _measure_soon(self, model_id: str, at_once: bool = False) -> None:
        """Measure the model's process now, or when its last measurement is a second old."""
        if model_id in self._measuring:
            return
        run = self._children.get(model_id)
        if run is None or run.gpu_spec is None:
            return  # gone, or on the CPU: nothing to measure
        last = self._measured_at.get(model_id)
        delay = 0.0 if at_once or last is None else last + MEASURE_EVERY_S - self.clock()
        self._measuring.add(model_id)
        self._spawn(self._measure(model_id, max(0.0, delay)))

    async def _measure(self, model_id: str, delay: float) -> None:
        assert self.gpu is not None
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            run = self._children.get(model_id)
            if run is None or run.gpu_spec is None or run.child.returncode is not None:
                return
            self._measured_at[model_id] = self.clock()
            try:
                gb = await asyncio.to_thread(self.gpu.process_gb, (run.child.pid,))
            except Exception as exc:
                self._probe_trouble("measure a process", exc)
                return
            if self._children.get(model_id) is not run:
                return  # a newer process took its place meanwhile
            self._measured[model_id] = (run.generation, gb)
            if gb > 0:
                self.post(Measured(model_id, gb, run.generation))
                self._remember(model_id, run.gpu_spec, gb)
        finally:
            self._measuring.discard(model_id)

    def _remember(self, model_id: str, spec: ModelConfig, gb: float) -> None:
        """Persist a rising peak, if the process was started as the config says now."""
        current = self.config.models.get(model_id)
        if self.store is None or current is None:
            return
        if launch_fingerprint(current) != launch_fingerprint(spec):
            return
        configured = current.vram_gb
        if self.store.record(model_id, spec, gb):
            log.info(
                "learned model=%s peak_gb=%.2f configured_gb=%.2f file=%s",
                model_id,
                gb,
                configured,
                self.store.path,
            )

    def _probe_trouble(self, what: str, exc: Exception) -> None:
        if not self._probe_warned:
            log.warning("NVML could not %s: %s (warned once)", what, exc)
            self._probe_warned = True
        else:
            log.debug("NVML could not %s: %s", what, exc)
