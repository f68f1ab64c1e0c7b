"""The process effects: start a model's child, notice it ready or gone, stop it.

Everything goes through the ``Launcher`` (``scheduling/launcher.py``) with a ``LaunchSpec`` from
the ``SpecBuilder`` it was given; each piece of slow work runs in a task of its own and its outcome
comes back to the owner as an event (``LoadFinished``, ``ProcessExited``, ``StopFinished``), so no
lock is ever held across I/O (rule 7).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from llmux.config import ModelConfig
from llmux.errors import LaunchFailed
from llmux.scheduling.events import (
    Event,
    LoadFinished,
    ProcessExited,
    SleepFinished,
    StopFinished,
    WakeFinished,
)
from llmux.scheduling.launcher import Child, Launcher, SleepClient, SpecBuilder
from llmux.scheduling.measurer import GpuMeasurer


@dataclass(frozen=True)
class _Running:
    """A model's child, started for load ``generation``."""

    generation: int
    child: Child
    stop_timeout: float


class Processes:
    """The children of all models: at most one current child per model."""

    def __init__(
        self,
        launcher: Launcher,
        launch_spec: SpecBuilder,
        post: Callable[[Event], None],
        measurer: GpuMeasurer | None = None,
        sleeper: SleepClient | None = None,
    ) -> None:
        """``post`` hands events to the owner. ``measurer`` (NVML): a load on the GPU waits
        until the device shows its memory free, and each process on the GPU is measured once
        ready. ``sleeper``: how a child's engine is put to sleep and woken (rules 11-12); None
        = a sleep fails (the model is stopped instead)."""
        self.sleeper = sleeper
        self.launcher = launcher
        self.launch_spec = launch_spec
        self._post = post
        self.measurer = measurer
        self._running: dict[str, _Running] = {}
        """Each model's current child (or its last one, kept for its log lines)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._loading: dict[str, asyncio.Task[None]] = {}
        """Each model's load under way (until its child is ready or the load failed)."""

    def child(self, model_id: str) -> Child | None:
        """The model's current child, or its last one (exited: kept for its log lines)."""
        run = self._running.get(model_id)
        return run.child if run is not None else None

    def start(
        self, model_id: str, generation: int, spec: ModelConfig, on_cpu: bool, need_gb: float
    ) -> None:
        """Launch ``spec`` (its ``cpu_fallback`` variant if ``on_cpu``), once ``need_gb`` shows
        free on the device; post ``LoadFinished``, then ``ProcessExited`` when it exits."""
        task = self._spawn(self._load(model_id, generation, spec, on_cpu, need_gb))
        self._loading[model_id] = task
        task.add_done_callback(lambda done: self._forget_load(model_id, done))

    def _forget_load(self, model_id: str, task: asyncio.Task[None]) -> None:
        if self._loading.get(model_id) is task:
            del self._loading[model_id]

    def abandon_loads(self) -> None:
        """At shutdown: a load under way can serve nobody any more (its waiters were answered).
        Cancel it: the launcher kills what it started, and ``LoadFinished`` reports the load
        failed, so the shutdown does not wait for a child to get ready only to stop it."""
        for task in list(self._loading.values()):
            task.cancel()

    def stop(self, model_id: str, generation: int) -> None:
        """Stop the child of load ``generation`` (SIGTERM, SIGKILL after its ``stop_timeout``);
        post ``StopFinished`` once it is gone."""
        self._spawn(self._stop(model_id, generation))

    def suspend(self, model_id: str, generation: int, spec: ModelConfig, level: int) -> None:
        """Put the child of load ``generation`` to sleep; post ``SleepFinished`` (with an error if
        the engine refused, failed, or took longer than ``ready_timeout``)."""
        self._spawn(self._suspend(model_id, generation, spec, level))

    def wake(
        self, model_id: str, generation: int, spec: ModelConfig, level: int, need_gb: float
    ) -> None:
        """Wake the child once ``need_gb`` shows free on the device (NVML); post
        ``WakeFinished`` (with an error if it failed or took longer than ``ready_timeout``)."""
        self._spawn(self._wake(model_id, generation, spec, level, need_gb))

    async def close(self) -> None:
        """Abandon the loads and stops under way, then stop every child still running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        runs = list(self._running.values())
        self._running.clear()
        await asyncio.gather(
            *(run.child.stop(run.stop_timeout) for run in runs if run.child.returncode is None),
            return_exceptions=True,
        )

    # ------------------------------------------------------------------ slow work

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load(
        self, model_id: str, generation: int, spec: ModelConfig, on_cpu: bool, need_gb: float
    ) -> None:
        try:
            launch = self.launch_spec(model_id, spec, on_cpu)
            if self.measurer is not None and need_gb > 0:
                await self.measurer.wait_free(model_id, need_gb)
            child = await self.launcher.launch(launch)
        except asyncio.CancelledError:
            # abandon_loads (shutdown) or close: the launcher has killed what it started.
            self._post(LoadFinished(model_id, generation, error="load abandoned: llmux stops"))
            raise
        except LaunchFailed as exc:
            self._post(LoadFinished(model_id, generation, error=exc.describe()))
            return
        except Exception as exc:  # e.g. an engine's missing package: a failed load, not a crash
            self._post(LoadFinished(model_id, generation, error=str(exc)))
            return
        self._running[model_id] = _Running(generation, child, launch.stop_timeout)
        self._post(LoadFinished(model_id, generation, pid=child.pid))
        if self.measurer is not None:
            self.measurer.started(model_id, generation, child, None if on_cpu else spec)
        returncode = await child.wait_exit()
        self._post(
            ProcessExited(model_id, generation, returncode, "\n".join(child.log_tail()[-20:]))
        )

    def _current(self, model_id: str, generation: int) -> Child | None:
        run = self._running.get(model_id)
        if run is None or run.generation != generation or run.child.returncode is not None:
            return None
        return run.child

    async def _suspend(self, model_id: str, generation: int, spec: ModelConfig, level: int) -> None:
        child = self._current(model_id, generation)
        error = await self._call_sleep_api(child, spec, level, wake=False)
        self._post(SleepFinished(model_id, generation, error))
        if error is None and child is not None and self.measurer is not None:
            self.measurer.measure_residual(model_id, generation, child)

    async def _wake(
        self, model_id: str, generation: int, spec: ModelConfig, level: int, need_gb: float
    ) -> None:
        child = self._current(model_id, generation)
        error: str | None = None
        if self.measurer is not None and need_gb > 0:
            try:
                await self.measurer.wait_free(model_id, need_gb)
            except LaunchFailed as exc:
                error = exc.describe()
        if error is None:
            error = await self._call_sleep_api(child, spec, level, wake=True)
        self._post(WakeFinished(model_id, generation, error))
        if error is None and self.measurer is not None:
            self.measurer.measure_soon(model_id, at_once=True)

    async def _call_sleep_api(
        self, child: Child | None, spec: ModelConfig, level: int, *, wake: bool
    ) -> str | None:
        """Ask the engine to sleep or wake; None when done, else why not."""
        what = "wake" if wake else "sleep"
        if child is None:
            return f"no running process to {what}"
        if self.sleeper is None or spec.sleep is None:
            return f"no sleep client to {what} it with"
        try:
            async with asyncio.timeout(spec.ready_timeout):
                if wake:
                    await self.sleeper.wake(child.base_url, spec.sleep.api, level)
                else:
                    await self.sleeper.sleep(child.base_url, spec.sleep.api, level)
        except TimeoutError:
            return f"the {what} took longer than ready_timeout ({spec.ready_timeout:g} s)"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return str(exc) or type(exc).__name__
        return None

    async def _stop(self, model_id: str, generation: int) -> None:
        run = self._running.get(model_id)
        if run is not None and run.generation == generation:
            await asyncio.shield(run.child.stop(run.stop_timeout))
        self._post(StopFinished(model_id, generation))
