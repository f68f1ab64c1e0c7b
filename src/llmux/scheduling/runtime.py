"""The owner task and the real effects: the asyncio face of the scheduler core.

``Scheduler`` runs one task that reads events from a queue and hands each to
``SchedulerCore.handle``. Routes talk to it only through ``acquire``/``release``/``load``/
``unload``/``status``; slow work (spawning, stopping) runs in tasks of its own and comes back as
events, so no lock is ever held across I/O (rule 7).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmux.backends.base import Child, Launcher, LaunchFailed, LaunchSpec
from llmux.config import Config, ModelConfig
from llmux.errors import LlmuxError, ModelNotFound
from llmux.observe import ModelGauge, SchedulerEvent
from llmux.scheduling.core import SchedulerCore
from llmux.scheduling.events import (
    Acquire,
    Cancel,
    Event,
    LoadFinished,
    Notice,
    ProcessExited,
    Reconfigure,
    Release,
    Shutdown,
    StopFinished,
    StopReason,
    Unload,
)
from llmux.scheduling.state import ModelState, WaiterKind

log = logging.getLogger("llmux.scheduler")

Listener = Callable[[SchedulerEvent], None]


@dataclass(frozen=True)
class Lease:
    """Model ``model_id`` is ready and this request is counted in flight until released."""

    rid: int
    model_id: str
    generation: int
    base_url: str


@dataclass(frozen=True)
class _Running:
    generation: int
    child: Child
    stop_timeout: float


def launch_spec(model_id: str, m: ModelConfig, on_cpu: bool = False) -> LaunchSpec:
    """The child's command line, from config only. ``cmd`` is split with shlex, never a shell.
    ``on_cpu``: the model's ``cpu_fallback`` variant."""
    fallback = m.cpu_fallback if on_cpu else None
    if m.cmd is not None:
        cmd = fallback.cmd if fallback is not None and fallback.cmd is not None else m.cmd
        return LaunchSpec(
            model_id=model_id,
            argv=tuple(shlex.split(cmd)),
            health=m.health,
            ready_timeout=m.ready_timeout,
            stop_timeout=m.stop_timeout,
            env=dict(m.env),
        )
    # Engines are optional (the `engines` extra): import only when one is used.
    from llmux.engines import engine_argv, engine_env, engine_health_path

    assert m.engine is not None
    assert m.model is not None
    args = {**m.args, **fallback.args} if fallback is not None else m.args
    return LaunchSpec(
        model_id=model_id,
        argv=tuple(engine_argv(m.engine, m.model, args)),
        health=m.health if "health" in m.model_fields_set else engine_health_path(m.engine),
        ready_timeout=m.ready_timeout,
        stop_timeout=m.stop_timeout,
        env={**engine_env(m.engine, os.environ), **m.env},
        inherit_env=False,
    )


class Scheduler:
    """Effects implementation + owner task around ``SchedulerCore``."""

    def __init__(
        self,
        config: Config,
        launcher: Launcher,
        *,
        budget_gb: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.launcher = launcher
        self.clock = clock
        self.core = SchedulerCore(config, budget_gb, self, clock, wall)
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

    @property
    def config(self) -> Config:
        """The config in force (it changes on reload)."""
        return self.core.config

    def reconfigure(self, config: Config, budget_gb: float) -> None:
        self.post(Reconfigure(config, budget_gb))

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
        # Fast path: with nothing queued and no event being handled, handling it here is the
        # same order the owner task would use, minus two task switches per request.
        if self._owner is not None and not self._handling and self._queue.empty():
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

    async def acquire(self, model_id: str) -> Lease:
        """Wait until ``model_id`` is ready and count this request in flight."""
        lease = await self._wait(lambda rid: Acquire(rid, model_id))
        assert lease is not None
        return lease

    def release(self, lease: Lease) -> None:
        self.post(Release(lease.rid))

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
                    "measured_gb": None,
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
                "measured_gb": None,
            },
            "models": models,
        }

    # ------------------------------------------------------------------ effects

    def start_load(self, model_id: str, generation: int) -> None:
        self._spawn(self._load(model_id, generation))

    def stop(self, model_id: str, generation: int, reason: StopReason) -> None:
        self._spawn(self._stop(model_id, generation))

    def grant(self, rid: int, model_id: str, generation: int) -> None:
        fut = self._futures.get(rid)
        run = self._children.get(model_id)
        if fut is None or fut.done() or run is None:
            return  # the waiter is gone; its Cancel event releases the lease
        fut.set_result(Lease(rid, model_id, generation, run.child.base_url))

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
            ModelGauge(mid, m.tier, m.state, m.in_flight, len(m.waiters))
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
        assert record.spec is not None
        try:
            launch = launch_spec(model_id, record.spec, record.on_cpu)
            child = await self.launcher.launch(launch)
        except LaunchFailed as exc:
            self.post(LoadFinished(model_id, generation, error=exc.describe()))
            return
        except Exception as exc:  # e.g. an engine's missing package: a failed load, not a crash
            self.post(LoadFinished(model_id, generation, error=str(exc)))
            return
        self._children[model_id] = _Running(generation, child, launch.stop_timeout)
        self.post(LoadFinished(model_id, generation, pid=child.pid))
        returncode = await child.wait_exit()
        self.post(
            ProcessExited(model_id, generation, returncode, "\n".join(child.log_tail()[-20:]))
        )

    async def _stop(self, model_id: str, generation: int) -> None:
        run = self._children.get(model_id)
        if run is not None and run.generation == generation:
            await asyncio.shield(run.child.stop(run.stop_timeout))
        self.post(StopFinished(model_id, generation))
