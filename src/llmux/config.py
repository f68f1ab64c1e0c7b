"""Typed configuration (YAML), validated with pydantic.

Every field says its unit. Durations accept a number of seconds or a string with a unit
(``500ms``, ``2s``, ``10m``, ``1h``). Errors name the dotted key and the YAML line.
The config is passed in through constructors; nothing here is global.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from llmux.engines.args import InvalidArgs, check_args
from llmux.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """``10m`` -> 600.0; numbers are seconds. Anything else is left for pydantic to reject."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f"not a duration: {value!r} (use seconds, or a number with ms, s, m, h)"
            )
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]

ModelType = Literal["llm", "tts", "asr", "embedding"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    """Bind address. Loopback by default."""
    port: int = Field(8080, ge=0, le=65535)
    api_keys: list[str] = []
    """Bearer keys for /v1/*, /status, /metrics, /events and /. Empty = open."""
    admin_keys: list[str] = []
    """Keys for load/unload/logs. Empty = the api_keys serve (or open if those are empty too)."""
    max_queue: int = Field(1024, ge=0)
    """Waiting requests per model; past it 429 queue_full. Per model because one load serves
    all of a model's waiting requests: one model's backlog never refuses another model's
    requests (docs/scheduling.md says why, and why 1024)."""
    queue_timeout: Seconds = 300.0
    """Longest wait for a model, seconds; past it 504 queue_timeout."""
    swap_patience: float = Field(8.0, ge=0)
    """Same-tier contention (rule 3): a model busy with requests is drained for another one
    only once that one's oldest request has waited this many times the swap's cost (the
    requester's load or wake, the busy model's expected drain and its own reload or wake, as
    measured), at most ``swap_patience_max`` seconds; an idle model is evicted at once. Keeps two
    busy models that cannot fit together from thrashing. 0 = drain busy models at once."""
    swap_patience_max: Seconds = 180.0
    """The longest swap patience, seconds; never more than 60% of ``queue_timeout``, leaving
    the rest for the drain and the load, so a request that waits for its swap is still served
    before its deadline."""
    shutdown_grace: Seconds = 30.0
    """On SIGTERM, seconds to let in-flight requests finish before children are stopped."""
    max_upload_mb: float = Field(25.0, gt=0)
    """Largest request body, MB (10^6 bytes); past it 413."""
    max_speech_chars: int = Field(4096, ge=1)
    """Longest ``input`` of a speech request, in characters (OpenAI's own limit is 4,096); past
    it 400, before the model is loaded or the request queued."""
    max_header_kb: int = Field(64, ge=1)
    """Largest request line plus headers, KiB (1,024 bytes); past it 431, before anything else
    runs (the key is not checked yet)."""
    header_timeout: Seconds = 10.0
    """A request's line and headers must arrive within this many seconds of their first byte;
    past it 408 and the connection is closed. A connection that sends nothing is idle
    (``idle_timeout``). 0 = no limit."""
    body_timeout: Seconds = 30.0
    """Longest silence, seconds, while a request body is being received; past it 408 and the
    connection is closed. A slow but moving upload is never cut; silence while llmux itself
    holds the body back (flow control) does not count. 0 = no limit."""
    idle_timeout: Seconds = 30.0
    """A connection with no request for this many seconds (a kept-alive one, or a new one that
    sends nothing) is closed, silently. Longer than the keep-alive expiry of common clients
    (httpx 5 s, aiohttp 15 s), so they drop it first. 0 = no limit."""
    max_connections: int = Field(4096, ge=1)
    """Open client connections at most; lowered at start to fit the open-file limit (the soft
    limit is raised to the hard one; two files per connection, some kept for children). At the
    cap the longest-idle connection is closed to make room; if none is idle, a new request gets
    503 ``server_busy``, except ``GET /health``. These five settings apply at start only."""
    state_dir: str | None = None
    """Directory for what llmux learns (``learned.json``: measured peaks, with NVML).
    None = ``$XDG_STATE_HOME/llmux``, or ``~/.local/state/llmux``. Read at start."""


class GpuConfig(_Strict):
    vram_gb: float | Literal["auto"] = "auto"
    """The budget in GB; auto = NVML total of the device, 16 without NVML."""
    reserve_gb: float = Field(0.5, ge=0)
    """Never handed out (CUDA context slack, other processes)."""
    free_wait: Seconds = 10.0
    """With NVML: longest wait, seconds, for the device to really show a load's reservation as
    free before its process starts (memory freed by an exited process appears late); past it
    the load fails (503 model_load_failed). Without NVML it does not apply."""


class TierConfig(_Strict):
    name: str = Field(min_length=1)
    protected: bool = False
    """A protected tier is never evicted for a request of a lower tier."""


class CpuFallback(_Strict):
    """How to run a model on the CPU when the GPU has no room for it without evicting anything.

    A small audio model (a Piper voice, Whisper tiny) answers on the CPU in well under a second,
    which beats evicting (and later reloading) an LLM. Placement is decided at each load."""

    args: dict[str, Any] = {}
    """Engines: options merged over ``args`` for the CPU (e.g. ``{device: cpu}``); checked
    like ``args``."""
    cmd: str | None = None
    """``cmd`` models: the whole command line for the CPU (``${PORT}`` filled in as usual)."""


class SleepConfig(_Strict):
    """Evicting the model puts it to sleep instead of stopping it (DESIGN rules 11-13): its
    process stays, its GPU memory is released but ``residual_gb``, and a request wakes it in
    about a second instead of a cold load. The child must serve a sleep API (``api``)."""

    level: Literal[1, 2] = 1
    """1: the weights are kept in host RAM (``host_gb`` is held while it sleeps), fast wake.
    2: the weights are dropped and reloaded from disk on wake; no host memory is held."""
    host_gb: float | None = Field(None, ge=0)
    """Host memory (GB) held while asleep at level 1; None = the model's ``vram_gb``. Ignored
    (0) at level 2."""
    residual_gb: float = Field(0.5, ge=0)
    """VRAM (GB) the process still holds while asleep (CUDA context, allocator). With NVML it
    is learned upward after each sleep, like peaks."""
    api: Literal["vllm", "sglang"] = "vllm"
    """The child's sleep endpoints: vLLM's (``POST /sleep?level=N``, ``POST /wake_up``, ``GET
    /is_sleeping``) or SGLang's (``POST /release_memory_occupation``, ``POST
    /resume_memory_occupation``)."""


class HostConfig(_Strict):
    ram_gb: float | Literal["auto"] = "auto"
    """Host memory (GB) sleeping models may hold at level 1 in all; auto = MemAvailable at
    start less 10% (0 where it cannot be read). Past it, older sleepers are stopped or an
    evicted model stops instead of sleeping (rule 11)."""

    def budget_gb(self, available_gb: float | None) -> float:
        """The host budget: the configured figure, or ``available_gb`` less 10% for auto."""
        if self.ram_gb == "auto":
            return max(0.0, 0.9 * available_gb) if available_gb is not None else 0.0
        return max(0.0, float(self.ram_gb))


class ModelConfig(_Strict):
    type: ModelType
    vram_gb: float = Field(ge=0)
    """Reservation in GB. With NVML it is learned upward: the peak measured use of the model's
    process (persisted in ``server.state_dir``) replaces it when higher."""
    cmd: str | None = None
    """Command line of an external OpenAI-style server; ``${PORT}`` is filled with a free port."""
    engine: Literal["llama-cpp", "faster-whisper", "piper", "vllm"] | None = None
    model: str | None = None
    """For engines: a path, or the name of a packaged model."""
    args: dict[str, Any] = {}
    """Engine options (threads, device, compute type, context size...), checked against the
    engine's typed options (``llmux.engines.args``) and kept as written."""
    env: dict[str, str] = {}
    """Extra environment variables for the child."""
    health: str = "/health"
    ready_timeout: Seconds = 300.0
    stop_timeout: Seconds = 10.0
    stall_timeout: Seconds = 300.0
    """Longest silence from the child during one request, seconds: before its answer starts, or
    between two pieces of it. Past it the request is cut (502, or an SSE ``error`` event) and its
    lease released, so a hung child cannot hold a drain for ever. 0 = no limit. The default fits
    the longest legitimate silence of the built-in stack (a non-streamed answer is silent until it
    is whole: a 25 MB upload transcribed on a laptop CPU takes minutes)."""
    ttl: Seconds | None = None
    """Unload after this many idle seconds; None = never by time. Ignored for pinned models."""
    tier: str | None = None
    """Defaults to the type (embedding -> llm)."""
    aliases: list[str] = []
    pinned: bool = False
    upstream_model: str | None = None
    """If set, the request's ``model`` field is rewritten to this name before relaying."""
    cpu_fallback: CpuFallback | None = None
    """If set, a load that would have to evict (or wait) runs on the CPU instead, without VRAM."""
    sleep: SleepConfig | None = None
    """If set, eviction puts the model to sleep (when host memory allows) instead of stopping
    it; a request wakes it. None = eviction stops it."""

    @field_validator("args")
    @classmethod
    def _engine_options(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "engine" not in info.data:
            return args  # the engine itself is wrong; that is the error
        engine = info.data["engine"]
        if engine is not None:
            _check_args(engine, args, ())
        elif args and info.data.get("cmd") is not None:
            raise ValueError(
                "'args' is for built-in engines; a 'cmd' model has its options in 'cmd'"
            )
        return args

    @field_validator("cpu_fallback")
    @classmethod
    def _fallback_options(
        cls, fallback: CpuFallback | None, info: ValidationInfo
    ) -> CpuFallback | None:
        if fallback is None or not fallback.args or "engine" not in info.data:
            return fallback
        engine = info.data["engine"]
        if engine is None:
            if info.data.get("cmd") is not None:
                raise ValueError("cpu_fallback for a 'cmd' model takes 'cmd', not 'args'")
            return fallback
        _check_args(engine, fallback.args, ("args",))
        if "args" in info.data:  # as launched: merged over the model's own args
            _check_args(engine, {**info.data["args"], **fallback.args}, ("args",))
        return fallback

    @model_validator(mode="after")
    def _one_launcher(self) -> ModelConfig:
        if (self.cmd is None) == (self.engine is None):
            raise ValueError("set exactly one of 'cmd' or 'engine'")
        if self.engine is not None and self.model is None:
            raise ValueError(f"engine '{self.engine}' needs 'model' (a path or a packaged model)")
        if self.cpu_fallback is not None and self.cmd is not None and self.cpu_fallback.cmd is None:
            raise ValueError("cpu_fallback for a 'cmd' model needs its own 'cmd' for the CPU")
        if self.cpu_fallback is not None and self.engine is not None and self.cpu_fallback.cmd:
            raise ValueError("cpu_fallback for an engine takes 'args', not 'cmd'")
        if not self.health.startswith("/"):
            raise ValueError("'health' must be a path starting with '/'")
        if self.sleep is not None:
            if self.engine is not None and self.engine != "vllm":
                raise ValueError(
                    f"engine '{self.engine}' has no sleep endpoints: 'sleep' is for engine "
                    "'vllm' and for 'cmd' models that serve vLLM's or SGLang's sleep API"
                )
            if self.engine == "vllm" and self.sleep.api != "vllm":
                raise ValueError("engine 'vllm' serves vLLM's sleep API: set sleep.api to 'vllm'")
            if self.engine == "vllm" and self.args.get("enable_sleep_mode") is False:
                raise ValueError(
                    "'sleep' needs args.enable_sleep_mode (vLLM serves no sleep endpoints "
                    "without it)"
                )
            if self.cpu_fallback is not None:
                raise ValueError("'sleep' and 'cpu_fallback' cannot be combined")
            if self.sleep.residual_gb > self.vram_gb:
                raise ValueError(
                    f"sleep.residual_gb ({self.sleep.residual_gb:g}) is more than vram_gb "
                    f"({self.vram_gb:g})"
                )
        return self

    @property
    def sleep_host_gb(self) -> float:
        """Host memory it holds while asleep (0 without ``sleep`` or at level 2)."""
        if self.sleep is None or self.sleep.level == 2:
            return 0.0
        return self.vram_gb if self.sleep.host_gb is None else self.sleep.host_gb

    @property
    def default_tier(self) -> str:
        return "llm" if self.type == "embedding" else self.type


def _check_args(engine: str, args: Mapping[str, Any], loc: tuple[str, ...]) -> None:
    """Raise a ValidationError with one entry per bad option, at ``loc`` + its key."""
    try:
        check_args(engine, args)
    except InvalidArgs as exc:
        raise ValidationError.from_exception_data(
            "args",
            [
                InitErrorDetails(
                    type=PydanticCustomError("engine_option", "{problem}", {"problem": p.message}),
                    loc=loc if p.key is None else (*loc, p.key),
                    input=args if p.key is None else args[p.key],
                )
                for p in exc.problems
            ],
        ) from None


class WyomingConfig(_Strict):
    """Home Assistant's voice protocol (Wyoming, over TCP): a server per ASR model's port and
    one for every TTS model (``llmux.api.wyoming``). Wyoming has no keys: keep it on loopback
    unless the network is trusted."""

    host: str = Field("127.0.0.1", min_length=1)
    """Bind address of every Wyoming server. Loopback by default."""
    asr: dict[str, Annotated[int, Field(ge=1, le=65535)]] = {}
    """ASR model id -> TCP port. Home Assistant uses the first ASR program a server describes,
    so each ASR model gets its own port."""
    tts: int | None = Field(None, ge=1, le=65535)
    """One TCP port for every TTS model (each model, and each speaker, is a voice); None = no
    TTS server."""
    zeroconf: bool = False
    """Announce each server as ``_wyoming._tcp`` (mDNS) so Home Assistant discovers it."""

    @model_validator(mode="after")
    def _something(self) -> WyomingConfig:
        if not self.asr and self.tts is None:
            raise ValueError("set 'asr' (model -> port) or 'tts' (a port), or remove 'wyoming'")
        return self

    def ports(self) -> list[tuple[str, int]]:
        """(what it serves, port) per server: ``asr:MODEL`` or ``tts``."""
        out = [(f"asr:{m}", p) for m, p in self.asr.items()]
        if self.tts is not None:
            out.append(("tts", self.tts))
        return out


DEFAULT_TIERS = (
    TierConfig(name="llm"),
    TierConfig(name="tts"),
    TierConfig(name="asr", protected=True),
)


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    gpu: GpuConfig = GpuConfig()
    host: HostConfig = HostConfig()
    tiers: list[TierConfig] = list(DEFAULT_TIERS)
    """Lowest priority first."""
    models: dict[str, ModelConfig] = {}
    wyoming: WyomingConfig | None = None
    """Wyoming servers for Home Assistant; None (absent) = none."""

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tiers: duplicate tier names in {names}")
        if not names:
            raise ValueError("tiers: at least one tier is needed")
        seen: dict[str, str] = {}
        for model_id, m in self.models.items():
            tier = m.tier or m.default_tier
            if tier not in names:
                raise ValueError(
                    f"models.{model_id}.tier: unknown tier '{tier}' (tiers are {names})"
                )
            for name in [model_id, *m.aliases]:
                if name in seen and seen[name] != model_id:
                    raise ValueError(
                        f"models.{model_id}.aliases: '{name}' is already used by '{seen[name]}'"
                    )
                seen[name] = model_id
        if self.wyoming is not None:
            self._check_wyoming(self.wyoming)
        return self

    def _check_wyoming(self, wyoming: WyomingConfig) -> None:
        for model_id in wyoming.asr:
            m = self.models.get(model_id)
            if m is None:
                owner = self.resolve(model_id)
                hint = f" ('{model_id}' is an alias of '{owner}': use the id)" if owner else ""
                raise ValueError(f"wyoming.asr.{model_id}: no model has the id '{model_id}'{hint}")
            if m.type != "asr":
                raise ValueError(
                    f"wyoming.asr.{model_id}: '{model_id}' is a {m.type} model, not an asr one"
                )
        if wyoming.tts is not None and not any(m.type == "tts" for m in self.models.values()):
            raise ValueError("wyoming.tts: no model of type tts is configured")
        used: dict[int, str] = {}
        for what, port in wyoming.ports():
            if port in used:
                raise ValueError(f"wyoming: port {port} is given to both {used[port]} and {what}")
            used[port] = what
            if port == self.server.port:
                raise ValueError(f"wyoming: port {port} ({what}) is server.port, llmux's HTTP")

    def tier_of(self, model_id: str) -> str:
        m = self.models[model_id]
        return m.tier or m.default_tier

    def tier_rank(self, tier: str) -> int:
        """Higher rank = higher priority."""
        return [t.name for t in self.tiers].index(tier)

    def tier_protected(self, tier: str) -> bool:
        return next(t.protected for t in self.tiers if t.name == tier)

    def resolve(self, name: str) -> str | None:
        """Model id for an id or alias, or None."""
        if name in self.models:
            return name
        for model_id, m in self.models.items():
            if name in m.aliases:
                return model_id
        return None

    def budget_gb(self, nvml_total_gb: float | None) -> float:
        """Usable VRAM: the configured (or detected) total less the reserve."""
        if self.gpu.vram_gb == "auto":
            total = nvml_total_gb if nvml_total_gb is not None else 16.0
        else:
            total = self.gpu.vram_gb
        return max(0.0, total - self.gpu.reserve_gb)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest YAML node that ``loc`` reaches."""
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part),
                None,
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            nxt = node.value[part] if part < len(node.value) else None
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_config(text: str, source: str = "config") -> Config:
    """Parse and validate YAML text. Raises ConfigError naming each bad key and its line."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source) from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            ["(top level): expected a mapping with server, gpu, tiers, models"], source
        )
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(
                p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            # Pydantic adds the union branch name ("float", "literal[...]"); drop it from the key.
            loc = tuple(
                p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"float", "str"}))
            )
            line = _line_of(node, loc)
            msg = err["msg"].removeprefix("Value error, ")
            where = f" (line {line})" if line is not None else ""
            problems.append(f"{_key(loc)}{where}: {msg}")
        raise ConfigError(problems, source) from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror}"], str(p)) from None
    return parse_config(text, str(p))


def default_config_text() -> str:
    """The built-in config (``llmux serve`` without ``--config``): the packaged models."""
    return resources.files("llmux").joinpath("default.yaml").read_text(encoding="utf-8")


def read_config(path: str | None) -> Config:
    """The config file at ``path``, or the built-in one for None. Raises ConfigError."""
    if path is None:
        return parse_config(default_config_text(), "built-in default")
    return load_config(path)


def print_config_error(exc: ConfigError) -> None:
    """Every problem of an invalid config, one per line, on stderr."""
    print(f"{exc.source}: invalid config", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
