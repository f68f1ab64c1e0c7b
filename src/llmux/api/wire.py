"""Wire models: the JSON of ``GET /status``, ``GET /v1/models`` and ``GET /events`` (DESIGN
section 2), one pydantic model each.

The server builds them from what scheduling hands out (``llmux.scheduling.snapshot``), the
control plane serializes them, ``llmux status`` parses ``/status`` into ``Status``, and
``/openapi.json`` describes them from their JSON schema (``llmux.api.openapi``), so the three
cannot drift apart. The status page (``static/index.html``) reads the same JSON.

llmux sends exactly these fields, in this order (the schema says ``additionalProperties:
false``); a reader ignores fields it does not know, so that ``llmux status`` still reads a newer
server. Every number says its unit; every ``None`` (JSON null) says when it is one.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from llmux.config import Config, ModelType
from llmux.scheduling.events import Notice
from llmux.scheduling.snapshot import EventSnapshot, ModelSnapshot, SchedulerSnapshot
from llmux.scheduling.state import ModelState

Count = Annotated[int, Field(ge=0)]
Gb = Annotated[float, Field(ge=0)]
SleepLevel = Annotated[int, Field(ge=1, le=2)]


class PublicState(enum.Enum):
    """A model's state as users see it: the contract's seven names (DESIGN section 2).

    The scheduler has more states than users see (``ModelState``: ``suspending``, a sleep sent
    and not yet confirmed, shows as ``sleeping``); every state that reaches the wire goes
    through ``ModelState.public`` (``of``), never ``.value``. Its values are
    ``state.PUBLIC_STATES``, in that order (``tests/test_wire.py``)."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"
    SLEEPING = "sleeping"
    WAKING = "waking"

    @classmethod
    def of(cls, state: ModelState) -> PublicState:
        return cls(state.public)


class Wire(BaseModel):
    """The base of every wire model."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        use_attribute_docstrings=True,
        json_schema_extra={"additionalProperties": False},
        # What llmux sends always has every field, defaults included.
        json_schema_serialization_defaults_required=True,
    )


# ---------------------------------------------------------------------------------- /status


class VramStatus(Wire):
    """The GPU memory: the budget, what resident models reserve, and what the device uses."""

    budget_gb: float
    """The VRAM budget, GB: the device's total (or `gpu.vram_gb`) less `gpu.reserve_gb`."""
    reserved_gb: float
    """Reserved by resident models, GB: the whole reservation of a loading, ready, draining,
    unloading or waking model, the residual of a sleeping one."""
    measured_gb: float | None
    """Used on the device, GB, as NVML last measured it; null without NVML."""


class HostStatus(Wire):
    """Host memory for sleeping models (`host.ram_gb`): the budget and what sleepers hold."""

    budget_gb: Gb
    """The host budget, GB (`host.ram_gb`; auto = MemAvailable at start less 10%)."""
    reserved_gb: Gb
    """Held by level-1 sleeping models (their `sleep.host_gb`, from the decision to sleep until
    they wake or stop), GB."""


class ModelStatus(Wire):
    """One configured model (or one removed by a reload and not yet unloaded)."""

    id: str
    """The model id."""
    type: ModelType | None
    """llm, tts, asr or embedding."""
    tier: str
    """Its priority tier (`tiers:`)."""
    state: PublicState
    """Where its process is: unloaded, loading, ready, draining (chosen for eviction, waiting
    for its requests to finish), unloading, sleeping (process alive, GPU memory released but
    the residual) or waking."""
    vram_gb: float
    """Its reservation on the GPU, GB: max(configured `vram_gb`, learned peak). A sleeping
    model holds only its `residual_gb` of it."""
    placement: Literal["gpu", "cpu"] = "gpu"
    """cpu: loaded without the GPU (its `cpu_fallback`), holding no VRAM. (A server older than
    placement is read as gpu.)"""
    measured_gb: float | None
    """Last measured use of its process on the GPU, GB; null without NVML, before the first
    measurement, on the CPU, or when not resident."""
    pinned: bool
    """Loaded at start and never evicted (an admin unload still unloads it)."""
    in_flight: Count
    """Requests being served by it."""
    queued: Count
    """Requests waiting for it."""
    last_used: float | None
    """Unix time (seconds) its last request was admitted; null if none was."""
    pid: int | None
    """Its process id; null with no process."""
    last_error: str | None
    """The reason of its last failed load or crash; null if none."""
    sleep_level: SleepLevel | None = None
    """1 or 2: eviction puts it to sleep at this level (`sleep:`; 1 keeps the weights in host
    memory, 2 drops them); null: eviction stops it. (A server older than sleep is read as
    null.)"""
    residual_gb: Gb = 0.0
    """The GPU memory it holds while asleep, GB: max(configured `sleep.residual_gb`, learned);
    0 without `sleep:`."""
    host_gb: Gb = 0.0
    """The host memory it holds now, GB: its `sleep.host_gb` while a level-1 sleep is decided
    or done; 0 otherwise."""

    @classmethod
    def from_snapshot(cls, m: ModelSnapshot) -> ModelStatus:
        return cls(
            id=m.id,
            type=m.type,
            tier=m.tier,
            state=PublicState.of(m.state),
            vram_gb=m.vram_gb,
            placement=m.placement,
            measured_gb=m.measured_gb,
            pinned=m.pinned,
            in_flight=m.in_flight,
            queued=m.queued,
            last_used=m.last_used,
            pid=m.pid,
            last_error=m.last_error,
            sleep_level=m.sleep_level,
            residual_gb=m.residual_gb,
            host_gb=m.host_gb,
        )


class Status(Wire):
    """`GET /status`: the scheduler's state."""

    vram: VramStatus
    host: HostStatus = HostStatus(budget_gb=0.0, reserved_gb=0.0)
    """Host memory for sleeping models. (A server older than sleep is read as a budget of 0.)"""
    models: list[ModelStatus]
    """Every model the scheduler knows, in config order."""

    @classmethod
    def from_snapshot(cls, snapshot: SchedulerSnapshot) -> Status:
        return cls(
            vram=VramStatus(
                budget_gb=snapshot.budget_gb,
                reserved_gb=round(snapshot.reserved_gb, 6),
                measured_gb=snapshot.measured_gb,
            ),
            host=HostStatus(
                budget_gb=snapshot.host_budget_gb,
                reserved_gb=round(snapshot.host_reserved_gb, 6),
            ),
            models=[ModelStatus.from_snapshot(m) for m in snapshot.models],
        )

    def model(self, model_id: str) -> ModelStatus:
        """The model ``model_id`` (KeyError if it is not listed)."""
        for m in self.models:
            if m.id == model_id:
                return m
        raise KeyError(model_id)


# ----------------------------------------------------------- /models/{id}/load, unload, sleep


class ModelAction(Wire):
    """The answer of an admin `POST /models/{id}/load`, `/unload` or `/sleep`, once done."""

    id: str
    """The model id (an alias is answered with the id it names)."""
    state: PublicState
    """Its state now: ready after a load, unloaded after an unload, sleeping after a sleep (or
    whatever a request made of it since)."""


# ------------------------------------------------------------------------------- /v1/models


class LlmuxInfo(Wire):
    """llmux's own object on each entry of `GET /v1/models`."""

    type: ModelType
    """llm, tts, asr or embedding."""
    tier: str
    """Its priority tier."""
    state: PublicState
    """Where its process is (as in `/status`)."""
    vram_gb: float
    """Its reservation on the GPU, GB."""
    in_flight: Count
    """Requests being served by it."""
    alias_of: str | None
    """The model id this alias names; null for the model id itself."""


class Model(Wire):
    """One entry of `GET /v1/models` (OpenAI's model object): a model id or one of its aliases."""

    id: str
    """A model id or one of its aliases."""
    object: Literal["model"] = "model"
    created: int = 0
    """Always 0 (OpenAI's creation time, which llmux does not know)."""
    owned_by: str = "llmux"
    llmux: LlmuxInfo


class ModelList(Wire):
    """`GET /v1/models`: every configured model and alias, in config order (a model's aliases
    right after it)."""

    object: Literal["list"] = "list"
    data: list[Model]

    @classmethod
    def from_snapshot(cls, snapshot: SchedulerSnapshot, config: Config) -> ModelList:
        """The models of ``config`` (taken with ``snapshot`` from the same scheduler: a model
        removed by a reload is in the snapshot until it is unloaded, but no longer listed)."""
        by_id = {m.id: m for m in snapshot.models}
        data = []
        for model_id, spec in config.models.items():
            m = by_id[model_id]
            for name in [model_id, *spec.aliases]:
                info = LlmuxInfo(
                    type=spec.type,
                    tier=m.tier,
                    state=PublicState.of(m.state),
                    vram_gb=m.vram_gb,
                    in_flight=m.in_flight,
                    alias_of=None if name == model_id else model_id,
                )
                data.append(Model(id=name, llmux=info))
        return cls(data=data)


# ---------------------------------------------------------------------------------- /events


class SchedulerEvent(Wire):
    """One scheduler event (`GET /events`: the data of an SSE event named by `event`; the
    `event` object of a JSON log line has the same fields)."""

    ts: float
    """Unix time (seconds) it happened."""
    event: Notice
    """What happened: queued, admitted, loading, ready, draining, unloading, unloaded,
    load_failed, crashed, sleeping, asleep, sleep_failed, waking, awake or wake_failed."""
    model: str
    """The model id."""
    tier: str
    """The model's tier."""
    reason: str
    """Why, in a word or a few (priority, ttl, admin, crash, reload, the load's error...)."""
    state: PublicState
    """The model's state after it."""
    reserved_gb: float
    """Reserved by resident models after it, GB."""
    budget_gb: float
    """The VRAM budget, GB."""

    @classmethod
    def from_snapshot(cls, e: EventSnapshot) -> SchedulerEvent:
        return cls(
            ts=e.ts,
            event=e.event,
            model=e.model,
            tier=e.tier,
            reason=e.reason,
            state=PublicState.of(e.state),
            reserved_gb=e.reserved_gb,
            budget_gb=e.budget_gb,
        )


# ---------------------------------------------------------------------------------- schema

_ENUMS: dict[type[Any], str] = {
    PublicState: "Where a model's process is: unloaded (no process), loading, ready (serving), "
    "draining (chosen for eviction, waiting for its requests to finish), unloading (stop sent), "
    "sleeping (sleep sent or done: the process is alive, its GPU memory released but the "
    "residual; never relayed to), waking (wake sent; requests wait for it).",
    Notice: "What happened to a model: queued (a request waits for it), admitted (its waiting "
    "requests go in), loading, ready, draining, unloading, unloaded, load_failed, crashed, "
    "sleeping (sleep sent; reason priority or admin), asleep (its memory but the residual is "
    "free), sleep_failed (then it is stopped), waking (a request or a load wakes it), awake "
    "(ready again), wake_failed (then it is stopped and loaded cold).",
}


class _WireSchema(GenerateJsonSchema):
    """Pydantic's JSON schema, less the per-field titles (the names say it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


WIRE_MODELS: tuple[type[Wire], ...] = (Status, ModelList, SchedulerEvent, ModelAction)
"""The top-level wire models; the others are reached from them."""


def wire_schemas(ref_template: str) -> dict[str, dict[str, Any]]:
    """The JSON schema of every wire model (and enum) by name, each as it is sent
    (serialization), referring to the others by ``ref_template`` (``{model}`` is the name)."""
    _, top = models_json_schema(
        [(m, "serialization") for m in WIRE_MODELS],
        ref_template=ref_template,
        schema_generator=_WireSchema,
    )
    defs: dict[str, dict[str, Any]] = top["$defs"]
    for kind, description in _ENUMS.items():  # for a reader of the wire, not of the code
        defs[kind.__name__]["description"] = description
    return defs
