"""The GPU measurer (rule 10): NVML waits and measurements, and the learned peaks on disk.

Only with a ``GpuProbe`` (NVML); without one the scheduler has no measurer at all. A load's
process starts only once the device really shows its reservation free (``wait_free``); each
model's process on the GPU is measured after it is ready and after requests, and each
measurement comes back to the core as a ``Measured`` event; rising peaks are kept in
``learned.json`` (``LearnedStore``). NVML runs in threads; nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from llmux.config import Config, ModelConfig
from llmux.errors import LaunchFailed
from llmux.gpu import GpuProbe
from llmux.scheduling.events import Event, Measured, MeasuredResidual
from llmux.scheduling.launcher import Child
from llmux.scheduling.learned import LearnedStore
from llmux.scheduling.state import Known, launch_fingerprint

log = logging.getLogger("llmux.scheduler")

MEASURE_EVERY_S = 1.0
"""At most one measurement of a model's process this often. The one after it is ready runs at
once; one asked for sooner (a request ended) runs when the second is up, so the use after the
last request of a burst is always measured."""
FREE_POLL_S = 0.05
"""How often a load waiting for free memory reads it again."""


@dataclass(frozen=True)
class _Process:
    """A model's current process, as the measurer knows it."""

    generation: int
    child: Child
    gpu_spec: ModelConfig | None
    """The config it was started with on the GPU (None on the CPU): what it teaches is for this."""


class GpuMeasurer:
    """Rule 10 for one device: free-memory waits, measurements of models' processes, peaks."""

    def __init__(
        self,
        probe: GpuProbe,
        store: LearnedStore,
        post: Callable[[Event], None],
        config: Callable[[], Config],
        clock: Callable[[], float],
    ) -> None:
        """``post`` hands events to the owner; ``config`` is the config in force."""
        self.probe = probe
        self.store = store
        self._post = post
        self._config = config
        self._clock = clock
        self._processes: dict[str, _Process] = {}
        """Each model's current process (from ``started``)."""
        self._measured: dict[str, tuple[int, float]] = {}
        """Each model's last measured use: (generation of the process, GB)."""
        self._measured_at: dict[str, float] = {}
        self._measuring: set[str] = set()
        """Models with a measurement asked for and not done yet."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned = False

    def known(self, models: Mapping[str, ModelConfig]) -> dict[str, Known]:
        """Residuals and load and wake times measured before for ``models``' launches."""
        return self.store.known_for(models)

    def remember_known(
        self,
        model_id: str,
        spec: ModelConfig,
        *,
        residual_gb: float | None = None,
        load_s: float | None = None,
        wake_s: float | None = None,
    ) -> None:
        """Persist what was just measured, if the process was started as the config says now."""
        current = self._config().models.get(model_id)
        if current is None or launch_fingerprint(current) != launch_fingerprint(spec):
            return
        self.store.record_known(
            model_id, spec, residual_gb=residual_gb, load_s=load_s, wake_s=wake_s
        )

    def learned(self, models: Mapping[str, ModelConfig]) -> dict[str, float]:
        """The learned peaks (GB) of ``models`` whose entry was measured for their launch."""
        return self.store.peaks_for(models)

    # ------------------------------------------------------------------ a load

    async def wait_free(self, model_id: str, need: float) -> None:
        """Return once the device shows ``need`` GB free; LaunchFailed after ``gpu.free_wait``.

        Our accounting already says the memory is free (the plan let the load start); this waits
        for the device to agree: a stopped process's memory comes back a little after it exits.
        """
        limit = self._config().gpu.free_wait
        started = self._clock()
        polls = 0
        while True:
            try:
                free = await asyncio.to_thread(self.probe.free_gb)
            except Exception as exc:  # NVML trouble: load as if there were no NVML
                self._trouble("read free memory", exc)
                return
            polls += 1
            if free + 1e-9 >= need:
                break
            waited = self._clock() - started
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
                self._clock() - started,
                need,
                free,
            )

    def started(
        self, model_id: str, generation: int, child: Child, gpu_spec: ModelConfig | None
    ) -> None:
        """``model_id``'s new process is ready: on the GPU (``gpu_spec``) it is measured now."""
        self._processes[model_id] = _Process(generation, child, gpu_spec)
        if gpu_spec is not None:
            self.measure_soon(model_id, at_once=True)

    # ------------------------------------------------------------------ measuring

    def measure_soon(self, model_id: str, at_once: bool = False) -> None:
        """Measure the model's process now, or when its last measurement is a second old."""
        if model_id in self._measuring:
            return
        process = self._processes.get(model_id)
        if process is None or process.gpu_spec is None:
            return  # gone, or on the CPU: nothing to measure
        last = self._measured_at.get(model_id)
        delay = 0.0 if at_once or last is None else last + MEASURE_EVERY_S - self._clock()
        self._measuring.add(model_id)
        self._spawn(self._measure(model_id, max(0.0, delay)))

    def measure_residual(self, model_id: str, generation: int, child: Child) -> None:
        """The process of ``generation`` sleeps: measure what it still holds and post
        ``MeasuredResidual`` (rule 11: the residual is learned, like peaks)."""
        self._spawn(self._measure_residual(model_id, generation, child))

    async def _measure_residual(self, model_id: str, generation: int, child: Child) -> None:
        try:
            gb = await asyncio.to_thread(self.probe.process_gb, (child.pid,))
        except Exception as exc:
            self._trouble("measure a sleeping process", exc)
            return
        if child.returncode is None:
            self._measured[model_id] = (generation, gb)
            self._post(MeasuredResidual(model_id, gb, generation))
            process = self._processes.get(model_id)
            if process is not None and process.gpu_spec is not None and gb > 0:
                self.remember_known(model_id, process.gpu_spec, residual_gb=gb)

    def last(self, model_id: str) -> tuple[int, float] | None:
        """The last measurement of ``model_id``'s process: (its generation, GB), or None."""
        return self._measured.get(model_id)

    def device_used_gb(self) -> float | None:
        """What the whole device uses now (every process, ours and others); None if NVML fails."""
        try:
            return round(self.probe.used_gb(), 3)
        except Exception as exc:
            self._trouble("read used memory", exc)
            return None

    async def _measure(self, model_id: str, delay: float) -> None:
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            process = self._processes.get(model_id)
            if process is None or process.gpu_spec is None or process.child.returncode is not None:
                return
            self._measured_at[model_id] = self._clock()
            try:
                gb = await asyncio.to_thread(self.probe.process_gb, (process.child.pid,))
            except Exception as exc:
                self._trouble("measure a process", exc)
                return
            if self._processes.get(model_id) is not process:
                return  # a newer process took its place meanwhile
            self._measured[model_id] = (process.generation, gb)
            if gb > 0:
                self._post(Measured(model_id, gb, process.generation))
                self._remember(model_id, process.gpu_spec, gb)
        finally:
            self._measuring.discard(model_id)

    def _remember(self, model_id: str, spec: ModelConfig, gb: float) -> None:
        """Persist a rising peak, if the process was started as the config says now."""
        current = self._config().models.get(model_id)
        if current is None or launch_fingerprint(current) != launch_fingerprint(spec):
            return
        if self.store.record(model_id, spec, gb):
            log.info(
                "learned model=%s peak_gb=%.2f configured_gb=%.2f file=%s",
                model_id,
                gb,
                current.vram_gb,
                self.store.path,
            )

    def _trouble(self, what: str, exc: Exception) -> None:
        if not self._warned:
            log.warning("NVML could not %s: %s (warned once)", what, exc)
            self._warned = True
        else:
            log.debug("NVML could not %s: %s", what, exc)

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the measurements under way; forget the processes (they are being stopped)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._processes.clear()
