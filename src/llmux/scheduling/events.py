"""Events the scheduler core reads, and the effects interface it acts through.

An event is never changed once made. The classes are plain slotted dataclasses rather than frozen
ones because building a frozen dataclass costs about three times as much, and every request
builds two events (an ``Acquire`` and a ``Release``) on the hot path.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from llmux.config import Config
from llmux.errors import LlmuxError
from llmux.scheduling.state import Known, StopReason, WaiterKind


@dataclass(slots=True)
class Acquire:
    """A request (or admin load, or preload) wants ``model_id`` ready."""

    rid: int
    model_id: str
    kind: WaiterKind = WaiterKind.REQUEST
    wait: bool = True
    """False: a try (the hot path for a ready model). It is admitted at once if the model is
    ready, exactly as a waiting one would be; otherwise nothing happens (no waiter, no error),
    and the caller sends a waiting ``Acquire`` instead."""


@dataclass(slots=True)
class Release:
    """A lease granted to ``rid`` is finished."""

    rid: int


@dataclass(slots=True)
class Cancel:
    """The client behind ``rid`` went away (waiting or holding a lease)."""

    rid: int


@dataclass(slots=True)
class LoadFinished:
    model_id: str
    generation: int
    pid: int | None = None
    error: str | None = None
    """None on success; else the reason with the child's last output lines."""


@dataclass(slots=True)
class ProcessExited:
    """The child of a ready (or draining) model exited on its own."""

    model_id: str
    generation: int
    returncode: int
    log_tail: str = ""


@dataclass(slots=True)
class StopFinished:
    """A stop effect is done: the process is gone."""

    model_id: str
    generation: int


@dataclass(slots=True)
class SleepFinished:
    """A sleep effect is done: the engine sleeps (``error`` None), or it failed (the reason)."""

    model_id: str
    generation: int
    error: str | None = None


@dataclass(slots=True)
class WakeFinished:
    """A wake effect is done: the engine serves again (``error`` None), or it failed or timed
    out (the reason): then the process is stopped and its waiters get a cold load."""

    model_id: str
    generation: int
    error: str | None = None


@dataclass(slots=True)
class MeasuredResidual:
    """With NVML: what a sleeping process of ``generation`` still holds (GB), measured after
    its sleep. Raises the model's learned residual (a peak, like ``Measured``)."""

    model_id: str
    gb: float
    generation: int | None = None


@dataclass(slots=True)
class Sleep:
    """Admin sleep: drain, put to sleep, then answer ``rid`` (409 if it cannot sleep)."""

    rid: int
    model_id: str


@dataclass(slots=True)
class Unload:
    """Admin unload: drain, stop, then answer ``rid``. Also for pinned models."""

    rid: int
    model_id: str


@dataclass(slots=True)
class TtlExpired:
    model_id: str
    generation: int
    due: float = 0.0
    """Monotonic time it was set for (idle_since + ttl of the idle spell that set it)."""


@dataclass(slots=True)
class Replan:
    """A timer the core set for itself: a busy victim becomes eligible for ``model_id``'s
    waiters (swap patience), so plan again."""

    model_id: str


@dataclass(slots=True)
class Deadline:
    """``rid``'s queue wait is over (504 if still waiting)."""

    rid: int


@dataclass(slots=True)
class Measured:
    """Rule 10: the model's measured use (GB) raises its learned reservation (a peak).

    From a measurement of a running process, ``generation`` is that process's: a late
    measurement of an older process is ignored. None: a peak known from before (learned.json)."""

    model_id: str
    gb: float
    generation: int | None = None


@dataclass(slots=True)
class Reconfigure:
    """A new, valid config: added models appear, removed ones drain and go, changed ones restart
    after draining, and the budget applies to the next decision."""

    config: Config
    budget_gb: float
    learned: Mapping[str, float] = field(default_factory=dict)
    """Peaks known (learned.json) for the new config's launches. A model whose launch changed
    starts from these (or from nothing) instead of what its old process taught."""
    host_budget_gb: float | None = None
    """The new host budget (``host.ram_gb``); None = unchanged."""
    known: Mapping[str, Known] = field(default_factory=dict)
    """Residuals and load and wake times known (learned.json) for the new config's launches."""


@dataclass(slots=True)
class Shutdown:
    """Stop admitting; answer waiters 503; drain everything and stop every child."""


Event = (
    Acquire
    | Release
    | Cancel
    | LoadFinished
    | ProcessExited
    | StopFinished
    | SleepFinished
    | WakeFinished
    | MeasuredResidual
    | Sleep
    | Unload
    | TtlExpired
    | Deadline
    | Replan
    | Measured
    | Reconfigure
    | Shutdown
)


class Notice(enum.Enum):
    """What the core tells the outside world happened (logs, /events, metrics)."""

    QUEUED = "queued"
    ADMITTED = "admitted"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    LOAD_FAILED = "load_failed"
    CRASHED = "crashed"
    SLEEPING = "sleeping"
    """Sleep sent (reason: priority or admin)."""
    ASLEEP = "asleep"
    """The engine sleeps: its memory but the residual is free."""
    SLEEP_FAILED = "sleep_failed"
    WAKING = "waking"
    AWAKE = "awake"
    """Woken: ready again (reason: the wake's seconds)."""
    WAKE_FAILED = "wake_failed"


class Effects(Protocol):
    """How the core's decisions are carried out. The core calls these synchronously and never
    waits on them; results come back as events. Tests replace this with a recorder."""

    def start_load(self, model_id: str, generation: int) -> None:
        """Spawn the child; post LoadFinished when ready or failed, ProcessExited if it dies."""

    def stop(self, model_id: str, generation: int, reason: StopReason) -> None:
        """Stop the child (SIGTERM, SIGKILL after stop_timeout); post StopFinished when gone."""

    def suspend(self, model_id: str, generation: int, level: int) -> None:
        """Put the child to sleep (its engine's sleep API at ``level``); post SleepFinished."""

    def wake(self, model_id: str, generation: int, level: int) -> None:
        """Wake the child (at level 2 also reload its weights and reset its prefix cache);
        post WakeFinished (with an error past ``ready_timeout``)."""

    def grant(self, rid: int, model_id: str, generation: int) -> None:
        """Hand ``rid`` its lease (model ready, counted in flight)."""

    def answer(self, rid: int) -> None:
        """Answer an admin load/unload waiter with success."""

    def reject(self, rid: int, error: LlmuxError) -> None:
        """Answer ``rid`` with an error."""

    def call_at(self, when: float, event: Event) -> None:
        """Post ``event`` at monotonic time ``when``."""

    def notify(self, notice: Notice, model_id: str, reason: str) -> None:
        """Something observable happened (the effect logs it once)."""
