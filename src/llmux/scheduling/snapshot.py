"""What scheduling hands out: typed, frozen copies of its state and of its notices.

``Scheduler.snapshot()`` reads the core's records once and returns a ``SchedulerSnapshot``;
``Scheduler.notify`` hands each listener an ``EventSnapshot``. Nothing outside the owner ever
sees a live ``ModelRecord``. These are plain dataclasses, so that scheduling stays free of the
layers above it: the wire models of ``/status``, ``/v1/models`` and ``/events``
(``llmux.api.wire``) are built from them at the boundary, and ``/metrics`` reads them at scrape
time (``llmux.observe``).

Values are what the scheduler holds, unrounded: rounding is the wire's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llmux.config import ModelType
from llmux.scheduling.events import Notice
from llmux.scheduling.state import ModelState

Placement = Literal["gpu", "cpu"]
"""Where a model's current (or next) process runs: ``cpu`` is its ``cpu_fallback``, holding no
VRAM."""


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """One model as the scheduler sees it."""

    id: str
    type: ModelType | None
    """None only for a model whose config the scheduler has not received (never in practice)."""
    tier: str
    state: ModelState
    vram_gb: float
    """What it holds, or would hold, on the GPU: max(configured, learned), GB."""
    placement: Placement
    measured_gb: float | None
    """The last NVML measurement of its current process, GB, rounded to 3 places; None without
    NVML, before the first measurement, on the CPU, or when not resident."""
    pinned: bool
    in_flight: int
    """Requests holding a lease on it."""
    queued: int
    """Requests (and loads) waiting for it."""
    last_used: float | None
    """Unix time its last request was admitted; None if never."""
    pid: int | None
    """Its process id; None with no process."""
    last_error: str | None
    """The reason of its last failed load or crash; None if none."""
    sleep_level: int | None = None
    """1 or 2 if eviction puts it to sleep (``sleep:``); None = eviction stops it."""
    residual_gb: float = 0.0
    """VRAM it holds while asleep (max(configured, learned)), GB; 0 without ``sleep:``."""
    host_gb: float = 0.0
    """Host memory it holds now (level-1 sleep), GB."""


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """The VRAM totals and every model the scheduler knows (config order; a model removed by a
    reload stays until it is unloaded)."""

    budget_gb: float
    """The VRAM budget: total less reserve, GB."""
    reserved_gb: float
    """The sum of the reservations of resident models, GB (unrounded)."""
    measured_gb: float | None
    """Used on the device (NVML), GB; None without NVML."""
    models: tuple[ModelSnapshot, ...]
    host_budget_gb: float = 0.0
    """Host memory sleeping models may hold (``host.ram_gb``), GB."""
    host_reserved_gb: float = 0.0
    """Host memory sleeping models hold now, GB."""

    def model(self, model_id: str) -> ModelSnapshot:
        """The model ``model_id`` (KeyError if the scheduler does not know it)."""
        for m in self.models:
            if m.id == model_id:
                return m
        raise KeyError(model_id)


@dataclass(frozen=True, slots=True)
class EventSnapshot:
    """One scheduler notice: what happened, to which model, why, and the VRAM after it.

    A dataclass, not the wire model: scheduling does not import the API layer, and the owner
    builds one for every notice (``queued`` once per waiting request), while most never reach a
    /events reader. ``llmux.api.wire.SchedulerEvent`` is built from it when one does; the JSON
    log line takes ``as_dict()``, the same fields."""

    ts: float
    """Unix time."""
    event: Notice
    model: str
    tier: str
    reason: str
    state: ModelState
    """The model's state after it."""
    reserved_gb: float
    """Reserved after it, GB (rounded to 6 places)."""
    budget_gb: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON values (the ``event`` object of a JSON log line)."""
        return {
            "ts": self.ts,
            "event": self.event.value,
            "model": self.model,
            "tier": self.tier,
            "reason": self.reason,
            "state": self.state.public,
            "reserved_gb": self.reserved_gb,
            "budget_gb": self.budget_gb,
        }
