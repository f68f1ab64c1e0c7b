"""Lifecycle enums and the records the scheduler core owns."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field

from llmux.config import Config, ModelConfig
from llmux.errors import IllegalTransition as IllegalTransition


class ModelState(enum.Enum):
    """Where one model's child process is. Transitions are checked by ``ModelRecord.move``."""

    UNLOADED = "unloaded"
    """No process; holds no reservation. Requests for it wait (``queued`` > 0) for a plan."""
    LOADING = "loading"
    """Process starting; reservation held. Its waiters count as in flight: it is never stopped."""
    READY = "ready"
    """Serving; leases are granted at once."""
    DRAINING = "draining"
    """Chosen for eviction; waits for its in-flight requests to finish. New requests wait."""
    UNLOADING = "unloading"
    """Stop sent (SIGTERM, then SIGKILL); reservation held until the process is gone."""
    SUSPENDING = "suspending"
    """Sleep sent (rule 11), not yet confirmed: the whole reservation is held until the engine
    says it sleeps; its host reservation (level 1) is held already. Shown as ``sleeping``."""
    SLEEPING = "sleeping"
    """Asleep: the process is alive (same pid), holds ``residual_gb`` of VRAM and, at level 1,
    its host reservation. Never relayed to; a request wakes it (rule 12)."""
    WAKING = "waking"
    """Wake sent: the whole reservation is held; its waiters count as in flight (never stopped)."""

    @property
    def public(self) -> str:
        """The name users see (/status, /metrics, /events): the contract's seven states;
        ``suspending`` shows as ``sleeping`` (as ``unloading`` covers a stop until it is done)."""
        return "sleeping" if self is ModelState.SUSPENDING else self.value


PUBLIC_STATES = tuple(dict.fromkeys(s.public for s in ModelState))
"""The contract's state names, in lifecycle order."""

RESIDENT = frozenset(
    {
        ModelState.LOADING,
        ModelState.READY,
        ModelState.DRAINING,
        ModelState.UNLOADING,
        ModelState.SUSPENDING,
        ModelState.SLEEPING,
        ModelState.WAKING,
    }
)
"""States that hold a reservation (rule 1): all but UNLOADED (a sleeper holds its residual)."""
DOOMED = frozenset({ModelState.DRAINING, ModelState.UNLOADING, ModelState.SUSPENDING})
"""Chosen for eviction: their reservation (less a sleeper's residual) is on its way back."""
SERVING = frozenset({ModelState.READY, ModelState.DRAINING})
"""States whose process has leases in flight."""
ALIVE = frozenset(
    {
        ModelState.READY,
        ModelState.DRAINING,
        ModelState.SUSPENDING,
        ModelState.SLEEPING,
        ModelState.WAKING,
    }
)
"""States with a running process that was ready once (its exit is a crash, noticed at once)."""

_LEGAL: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING}),
    # A failed load goes back to UNLOADED; an admin unload of a loading model waits for ready.
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.UNLOADED}),
    # READY -> UNLOADED is a crash.
    ModelState.READY: frozenset(
        {ModelState.DRAINING, ModelState.UNLOADING, ModelState.SUSPENDING, ModelState.UNLOADED}
    ),
    ModelState.DRAINING: frozenset(
        {ModelState.UNLOADING, ModelState.SUSPENDING, ModelState.UNLOADED}
    ),
    ModelState.UNLOADING: frozenset({ModelState.UNLOADED}),
    # A failed sleep stops the process.
    ModelState.SUSPENDING: frozenset(
        {ModelState.SLEEPING, ModelState.UNLOADING, ModelState.UNLOADED}
    ),
    ModelState.SLEEPING: frozenset({ModelState.WAKING, ModelState.UNLOADING, ModelState.UNLOADED}),
    # A failed (or timed-out) wake stops the process; its waiters get a cold load after.
    ModelState.WAKING: frozenset({ModelState.READY, ModelState.UNLOADING, ModelState.UNLOADED}),
}


def launch_fingerprint(spec: ModelConfig) -> str:
    """What a model's process is started with, hashed: ``cmd``, or ``engine`` + ``model`` +
    ``args``, and ``env``. The one answer to "is this the same launch?": a reload that changes
    it restarts the model, and a learned peak counts only for the fingerprint it was measured
    under (``learned.json``).

    Left out on purpose: how llmux waits for and stops the process (``health``,
    ``ready_timeout``, ``stop_timeout``), which changes neither the process nor the memory it
    uses, so changing them restarts nothing and keeps the peaks learned; and the settings that
    apply live (tier, ``vram_gb``, ``ttl``, ``pinned``, aliases)."""
    what = {
        "cmd": spec.cmd,
        "engine": spec.engine,
        "model": spec.model,
        "args": spec.args,
        "env": spec.env,
    }
    text = json.dumps(what, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SleepReason(enum.Enum):
    """Why a model is put to sleep."""

    PRIORITY = "priority"
    """Evicted to make room for another model (rule 11)."""
    ADMIN = "admin"
    """``POST /models/{id}/sleep``."""


@dataclass(frozen=True)
class Known:
    """What earlier runs measured for a model's current launch (``learned.json``, with NVML),
    besides its peak: used until this run measures again."""

    residual_gb: float = 0.0
    """VRAM its process kept while asleep."""
    load_s: float | None = None
    """Seconds its last cold load took."""
    wake_s: float | None = None
    """Seconds its last wake took."""


class StopReason(enum.Enum):
    """Why a model's process is stopped (logged, and sent with the ``stop`` effect)."""

    PRIORITY = "priority"
    """Evicted to make room for another model."""
    TTL = "ttl"
    ADMIN = "admin"
    RELOAD = "reload"
    """Removed or changed by a config reload."""
    SHUTDOWN = "shutdown"


class WaiterKind(enum.Enum):
    REQUEST = "request"
    """A client request; granted a lease (in flight) when the model is ready."""
    ADMIN_LOAD = "admin_load"
    """POST /models/{id}/load; answered (no lease) when the model is ready."""
    PRELOAD = "preload"
    """A pinned model loading at start; nobody waits on it."""


@dataclass
class Waiter:
    rid: int
    model_id: str
    kind: WaiterKind
    enqueued_at: float
    """Monotonic seconds."""


@dataclass
class ModelRecord:
    """Scheduling state of one configured model. Owned by the scheduler core only."""

    model_id: str
    tier: str
    tier_rank: int
    protected: bool
    pinned: bool
    configured_gb: float
    ttl: float | None
    state: ModelState = ModelState.UNLOADED
    generation: int = 0
    """Bumped at each load start; events of an older generation are stale."""
    in_flight: int = 0
    learned_gb: float = 0.0
    last_used: float | None = None
    """Wall-clock time its last request was admitted."""
    idle_since: float = 0.0
    """Monotonic time it last became idle (for ttl)."""
    last_error: str | None = None
    pid: int | None = None
    stop_when_ready: StopReason | None = None
    """Why to stop a loading model once it is ready (admin unload, shutdown, reload)."""
    removed: bool = False
    """Gone from the config (reload): forgotten once unloaded."""
    spec: ModelConfig | None = None
    """The model's config as of its last (re)configuration."""
    on_cpu: bool = False
    """Placed on the CPU (cpu_fallback) for its current process: it holds no VRAM."""
    next_known: Known | None = None
    """As ``next_learned_gb``, for the residual and the load and wake times."""
    next_learned_gb: float | None = None
    """Its launch changed (reload) while a process of the old one runs: the learned peak that
    applies once that process is gone."""
    sleep_level: int | None = None
    """1 or 2 when eviction may put it to sleep (``sleep:``); None = eviction stops it."""
    configured_residual_gb: float = 0.0
    learned_residual_gb: float = 0.0
    """VRAM its process was measured to keep while asleep (NVML), for this launch."""
    sleep_host_gb: float = 0.0
    """Host memory it holds while asleep (level 1), GB."""
    sleep_after_drain: SleepReason | None = None
    """Draining to sleep (not to stop): the host reservation is held from the decision on."""
    sleep_when_ready: bool = False
    """An admin sleep of a loading or waking model: it sleeps once ready."""
    holds_host: bool = False
    """Its process holds its host reservation (level 1): from the sleep sent until it is awake
    again or gone (a stop or a failed wake keeps it until the process is gone)."""
    asleep: bool = False
    """Its engine sleeps (from the sleep's confirmation to the wake): it holds its residual
    only, also while a stop of it is under way."""
    load_s: float | None = None
    """Seconds its last cold load took (start to ready), on the core's clock; None: never."""
    wake_s: float | None = None
    """Seconds its last wake took; None: never woken."""
    service_s: float | None = None
    """Its requests' mean lease time, seconds (a moving average over releases); None: none yet."""
    stop_s: float | None = None
    """Seconds its last stop took (stop sent to process gone)."""
    transition_at: float = 0.0
    """Monotonic time its current load, wake or stop began (for the three above)."""

    @classmethod
    def from_config(cls, model_id: str, config: Config) -> ModelRecord:
        m = cls(model_id, "", 0, False, False, 0.0, None)
        m.configure(config)
        return m

    def know(self, known: Known | None) -> None:
        """Start from what earlier runs measured for this launch (or from nothing)."""
        known = known or Known()
        self.learned_residual_gb = known.residual_gb
        self.load_s, self.wake_s = known.load_s, known.wake_s

    def configure(self, config: Config) -> None:
        """Take the settings that apply live (tier, reservation, ttl, pinned) from ``config``."""
        spec = config.models[self.model_id]
        self.spec = spec
        self.tier = config.tier_of(self.model_id)
        self.tier_rank = config.tier_rank(self.tier)
        self.protected = config.tier_protected(self.tier)
        self.pinned = spec.pinned
        self.configured_gb = spec.vram_gb
        self.ttl = spec.ttl
        if self.state is ModelState.UNLOADED:
            self._take_sleep()  # a live process keeps the sleep settings it was started with

    def _take_sleep(self) -> None:
        """The ``sleep:`` settings of the config in force: they apply from the next load."""
        sleep = self.spec.sleep if self.spec is not None else None
        self.sleep_level = sleep.level if sleep is not None else None
        self.configured_residual_gb = sleep.residual_gb if sleep is not None else 0.0
        self.sleep_host_gb = self.spec.sleep_host_gb if self.spec is not None else 0.0

    waiters: list[int] = field(default_factory=list)
    """Request ids waiting for this model, oldest first."""
    unload_waiters: list[int] = field(default_factory=list)
    sleep_waiters: list[int] = field(default_factory=list)
    """Admin sleeps answered once it sleeps (or rejected if it stops instead)."""

    @property
    def gpu_gb(self) -> float:
        """What it holds (or would hold) on the GPU: max(configured, learned)."""
        return max(self.configured_gb, self.learned_gb)

    @property
    def residual_gb(self) -> float:
        """What it holds on the GPU while asleep: max(configured, learned), at most ``gpu_gb``."""
        return min(self.gpu_gb, max(self.configured_residual_gb, self.learned_residual_gb))

    @property
    def reservation_gb(self) -> float:
        """What it holds now: nothing while placed on the CPU, its residual while asleep."""
        if self.on_cpu:
            return 0.0
        if self.asleep:
            return self.residual_gb
        return self.gpu_gb

    @property
    def host_reserved_gb(self) -> float:
        """Host memory its process holds (level-1 sleep): from the sleep sent until it is awake
        again or its process is gone."""
        return self.sleep_host_gb if self.holds_host else 0.0

    @property
    def host_promised_gb(self) -> float:
        """Host memory promised to it: draining (or waiting for host memory) to go to sleep."""
        if self.state is ModelState.DRAINING and self.sleep_after_drain is not None:
            return self.sleep_host_gb
        return 0.0

    @property
    def returns_gb(self) -> float:
        """What a doomed model gives back once its eviction is done (its residual stays if it
        goes to sleep)."""
        if self.state is ModelState.SUSPENDING or (
            self.state is ModelState.DRAINING and self.sleep_after_drain is not None
        ):
            return self.reservation_gb - self.residual_gb
        return self.reservation_gb

    @property
    def cpu_fallback(self) -> bool:
        return self.spec is not None and self.spec.cpu_fallback is not None

    def move(self, to: ModelState) -> None:
        if to not in _LEGAL[self.state]:
            raise IllegalTransition(f"{self.model_id}: {self.state.value} -> {to.value}")
        self.state = to
        if to is ModelState.UNLOADED:
            self.on_cpu = False
            self.asleep = False
            self.holds_host = False
            self.sleep_when_ready = False
            self._take_sleep()
            if self.next_known is not None:
                self.know(self.next_known)
                self.next_known = None
            if self.next_learned_gb is not None:
                self.learned_gb, self.next_learned_gb = self.next_learned_gb, None
