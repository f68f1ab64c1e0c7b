"""Scenarios: what the simulated GPU, models, service times and traces are.

A scenario is a YAML file (``bench/scenarios/default.yaml``), validated here. Every field can be
overridden from the command line with ``--set dotted.key=value`` (the value is parsed as YAML), or
by a second YAML file merged on top. Paths inside a scenario (``trace.dir``) are relative to the
scenario file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmux.config import Config, parse_config
from llmux.errors import ConfigError

ModelKind = Literal["llm", "asr", "tts"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuSpec(_Strict):
    vram_gb: float = Field(16.0, gt=0)
    reserve_gb: float = Field(0.5, ge=0)


class TierSpec(_Strict):
    name: str
    protected: bool = False


# vLLM's published sleep-mode timings (blog.vllm.ai/2025/10/26/sleep-mode.html, A100, vLLM
# 0.11.0: Qwen3-0.6B, about 1.2 GB of bf16 weights, and Phi-3-vision-128k, about 8.4 GB), fitted
# as a + b x GB of weights through the two models' means. docs/simulator.md gives the data.
SLEEP_TIMES: dict[int, dict[str, tuple[float, float]]] = {
    1: {"wake": (0.17, 0.078), "sleep": (0.035, 0.046)},
    2: {"wake": (0.56, 0.24), "sleep": (0.05, 0.049)},
}
"""Level -> ``wake``/``sleep`` -> (seconds, seconds per GB of weights)."""

UNLIMITED_HOST_GB = 1e9
"""``host.ram_gb: null``: what the core is given (no host limit in practice)."""


class SleepSpec(_Strict):
    """The model's ``sleep:`` in llmux's config (DESIGN rules 11-13), plus its timings here."""

    level: Literal[1, 2] = 1
    """1: weights kept in host RAM (``host_gb`` held while asleep); 2: dropped, reread on wake."""
    residual_gb: float = Field(0.5, ge=0)
    """GPU memory still held while asleep."""
    host_gb: float | None = Field(None, ge=0)
    """GB of weights (moved to the host at level 1, reread at level 2); None = ``vram_gb``."""
    wake_s: float | None = Field(None, ge=0)
    """Seconds to wake; None = vLLM's published times scaled by the weights (SLEEP_TIMES)."""
    sleep_s: float | None = Field(None, ge=0)
    """Seconds to fall asleep; None = as for ``wake_s``."""


class ModelSpec(_Strict):
    type: ModelKind
    vram_gb: float = Field(ge=0)
    """GPU memory; ignored (0) when ``device`` is cpu."""
    init_s: float = Field(0.0, ge=0)
    """Engine start-up after the weights are read (load = vram_gb / load_gbps + init_s)."""
    load_s: float | None = Field(None, ge=0)
    """The whole cold load, seconds, instead of ``vram_gb / load_gbps + init_s``."""
    tier: str | None = None
    """Defaults to the type."""
    trace: str | None = None
    """LLMs: the trace file (in ``trace.dir``) that feeds this model: an Azure LLM inference
    CSV, or a Mooncake ``*.jsonl`` trace (docs/simulator.md, bench/traces/README.md)."""
    first_byte_s: float | None = Field(None, ge=0)
    """Non-LLM: seconds from grant to the first byte (TTFB adds queue wait and load)."""
    service_s: float | None = Field(None, ge=0)
    """Non-LLM: seconds the model is held per request (to the last byte)."""
    device: Literal["gpu", "cpu"] = "gpu"
    """cpu: no GPU memory; first byte and service times are multiplied by ``cpu.slowdown``."""
    cpu_fallback: bool = False
    """llmux only (its ``cpu_fallback`` config): a load that would have to evict or wait runs
    on the CPU instead (no GPU memory, times x ``cpu.slowdown`` while placed there)."""
    pinned: bool = False
    sleep: SleepSpec | None = None
    """llmux only (its ``sleep:`` config): eviction puts the model to sleep when host memory
    allows, and a request wakes it. The baselines stop it as before (no peer plans sleep)."""

    @model_validator(mode="after")
    def _times(self) -> ModelSpec:
        if self.type != "llm" and (self.first_byte_s is None or self.service_s is None):
            raise ValueError("non-LLM models need first_byte_s and service_s")
        if self.type == "llm" and self.trace is None:
            raise ValueError("LLM models need a trace")
        if self.sleep is not None:
            if self.cpu_fallback:
                raise ValueError("'sleep' and 'cpu_fallback' cannot be combined")
            if self.device == "cpu":
                raise ValueError("'sleep' is for a model on the GPU")
            if self.sleep.residual_gb > self.vram_gb:
                raise ValueError("sleep.residual_gb is more than vram_gb")
        return self

    @property
    def weights_gb(self) -> float:
        """GB of weights a sleep moves out and a wake brings back."""
        if self.sleep is not None and self.sleep.host_gb is not None:
            return self.sleep.host_gb
        return self.vram_gb


class ServiceSpec(_Strict):
    prefill_tps: float = Field(5000.0, gt=0)
    """LLM prefill, tokens/s: first byte = ContextTokens / prefill_tps."""
    decode_tps: float = Field(50.0, gt=0)
    """LLM decode, tokens/s: held for ContextTokens / prefill_tps + GeneratedTokens / decode_tps."""


class CpuSpec(_Strict):
    slowdown: float = Field(2.0, gt=0)
    """A model placed on the CPU is this much slower to first byte and to the end."""


class VoiceSpec(_Strict):
    share: float = Field(0.05, ge=0, le=1)
    """Share of the source model's requests that are voice turns."""
    source: str = "chat"
    asr_model: str = "asr"
    tts_model: str = "tts"
    asr_lead_s: float = Field(0.8, ge=0)
    """The ASR request arrives this long before the LLM request."""


class TraceSpec(_Strict):
    dir: str = "../traces"
    rate_scale: float = Field(1.0, gt=0)
    """Arrival-rate scale: timestamps are divided by it (2 = twice the rate, half the span)."""
    start_s: float = Field(0.0, ge=0)
    """Skip requests before this offset (seconds, before scaling) into the trace."""
    duration_s: float | None = Field(None, gt=0)
    """Keep only this many seconds (before scaling); None = the whole trace."""


class HostSpec(_Strict):
    ram_gb: float | None = Field(None, ge=0)
    """Host memory sleeping models may hold at level 1 in all (llmux's ``host.ram_gb``);
    None = unlimited. (The real default, auto, is MemAvailable at start less 10%: a property
    of the machine, not of a scenario.)"""


class LoadTimes(_Strict):
    """Cold-load time of every model of a type, seconds (a model's own ``load_s`` wins);
    None = ``vram_gb / load_gbps + init_s``. ``--set load_s.llm=30``: vLLM-class LLM loads."""

    llm: float | None = Field(None, ge=0)
    asr: float | None = Field(None, ge=0)
    tts: float | None = Field(None, ge=0)


class SloSpec(_Strict):
    llm: float = 10.0
    asr: float = 1.0
    tts: float = 1.0

    def of(self, tier: str) -> float:
        value: float = getattr(self, tier)
        return value


class LlmuxSpec(_Strict):
    max_queue: int = Field(1024, ge=0)
    """Per model (llmux's ``server.max_queue``)."""
    queue_timeout_s: float = Field(300.0, ge=0)
    passover_bound_s: float = Field(10.0, ge=0)
    swap_patience: float = Field(8.0, ge=0)
    swap_patience_max_s: float = Field(180.0, ge=0)
    sleep: bool = True
    """False: the models' ``sleep:`` is left out of llmux's config (eviction stops them)."""


class OllamaSpec(_Strict):
    keep_alive_s: float = 300.0
    max_loaded: int = 3
    resched_delay_s: float = 0.25


class LruSpec(_Strict):
    retry_interval_s: float = 1.0
    max_retries: int = 30


class GroupSpec(_Strict):
    """One of llama-swap's ``groups`` (routing.router.settings.groups, config.example.yaml)."""

    members: list[str]
    swap: bool = True
    """True: one member runs at a time (a member's start stops the others)."""
    exclusive: bool = True
    """True: a member's start stops every other group's running members (not persistent)."""
    persistent: bool = False
    """Other groups never stop this group's members."""


class LlamaSwapSpec(_Strict):
    groups: dict[str, GroupSpec] | None = None
    """Policy ``llama-swap-groups``: None = the voice stack (ASR and TTS models in a group
    ``voice`` with swap, exclusive false and persistent; LLMs in a group ``llms`` with swap
    true and exclusive false). Models in no group go to ``(default)`` (swap, exclusive)."""
    concurrency_limit: int | None = Field(None, ge=1)
    """``llama-swap-groups``: requests admitted per model at once (queued or in flight), past
    it 429; llama-swap's own default is 10. None = no limit (as for every other policy here)."""


class GoalsSpec(_Strict):
    """The goals check (issue 12), per cell: see ``llmux.sim.goals``."""

    candidate: str = "llmux"
    peers: list[str] = [
        "llama-swap",
        "llama-swap-groups",
        "ollama",
        "lru",
        "strict",
        "oracle-tiered",
    ]
    floor: str = "floor"
    asr_min: float = 0.995
    """The candidate's ASR within SLO, and a peer's to count as a bar."""
    margin: float = 0.005
    """The candidate's LLM and TTS may be this much (a share: 0.005 = 0.5 points) below the
    best counted peer."""
    absolute: dict[str, float] = {}
    """Tier -> within-SLO floor for the candidate in the scenario's own cell (not sweeps)."""


class SweepSpec(_Strict):
    key: str
    values: list[Any]


class Scenario(_Strict):
    name: str = "default"
    seed: int = 1
    gpu: GpuSpec = GpuSpec()
    load_gbps: float = Field(3.0, gt=0)
    stop_s: float = Field(0.2, ge=0)
    client_timeout_s: float | None = Field(600.0, gt=0)
    """A client gives up (Cancel) after waiting this long without being served; None = never."""
    tiers: list[TierSpec] = [
        TierSpec(name="llm"),
        TierSpec(name="tts"),
        TierSpec(name="asr", protected=True),
    ]
    models: dict[str, ModelSpec]
    service: ServiceSpec = ServiceSpec()
    cpu: CpuSpec = CpuSpec()
    voice: VoiceSpec | None = VoiceSpec()
    trace: TraceSpec = TraceSpec()
    slo: SloSpec = SloSpec()
    llmux: LlmuxSpec = LlmuxSpec()
    ollama: OllamaSpec = OllamaSpec()
    lru: LruSpec = LruSpec()
    llama_swap: LlamaSwapSpec = LlamaSwapSpec()
    host: HostSpec = HostSpec()
    load_s: LoadTimes = LoadTimes()
    goals: GoalsSpec = GoalsSpec()
    policies: list[str] = [
        "llmux",
        "llmux-gpu-only",
        "strict",
        "seed",
        "llama-swap",
        "ollama",
        "lru",
        "oracle",
        "oracle-tiered",
        "floor",
    ]
    sweeps: dict[str, SweepSpec] = {}
    base_dir: str = "."
    """Directory the scenario file is in (set by the loader; relative paths start here)."""

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        names = [t.name for t in self.tiers]
        for mid, m in self.models.items():
            if (m.tier or m.type) not in names:
                raise ValueError(f"models.{mid}.tier: unknown tier '{m.tier or m.type}'")
        if self.voice is not None:
            for key in ("source", "asr_model", "tts_model"):
                if getattr(self.voice, key) not in self.models:
                    raise ValueError(f"voice.{key}: no model '{getattr(self.voice, key)}'")
        seen: dict[str, str] = {}
        for gid, group in (self.llama_swap.groups or {}).items():
            for mid in group.members:
                if mid not in self.models:
                    raise ValueError(f"llama_swap.groups.{gid}: no model '{mid}'")
                if mid in seen:
                    raise ValueError(
                        f"llama_swap.groups.{gid}: '{mid}' is already in group '{seen[mid]}'"
                    )
                seen[mid] = gid
        return self

    # ------------------------------------------------------------------ derived

    @property
    def budget_gb(self) -> float:
        return max(0.0, self.gpu.vram_gb - self.gpu.reserve_gb)

    def tier_of(self, model_id: str) -> str:
        m = self.models[model_id]
        return m.tier or m.type

    def gpu_gb(self, model_id: str) -> float:
        m = self.models[model_id]
        return 0.0 if m.device == "cpu" else m.vram_gb

    def load_time(self, model_id: str) -> float:
        m = self.models[model_id]
        if m.load_s is not None:
            return m.load_s
        by_type: float | None = getattr(self.load_s, m.type)
        if by_type is not None:
            return by_type
        return m.vram_gb / self.load_gbps + m.init_s

    @property
    def sleepers(self) -> list[str]:
        return [mid for mid, m in self.models.items() if m.sleep is not None]

    @property
    def host_budget_gb(self) -> float:
        return UNLIMITED_HOST_GB if self.host.ram_gb is None else self.host.ram_gb

    def host_gb(self, model_id: str) -> float:
        """Host memory the model holds while asleep (level 1: its weights; level 2: none)."""
        m = self.models[model_id]
        if m.sleep is None or m.sleep.level == 2:
            return 0.0
        return m.weights_gb

    def _sleep_time(self, model_id: str, what: Literal["wake", "sleep"]) -> float:
        m = self.models[model_id]
        assert m.sleep is not None, f"{model_id} has no sleep:"
        given = m.sleep.wake_s if what == "wake" else m.sleep.sleep_s
        if given is not None:
            return given
        a, b = SLEEP_TIMES[m.sleep.level][what]
        return a + b * m.weights_gb

    def wake_time(self, model_id: str) -> float:
        return self._sleep_time(model_id, "wake")

    def sleep_time(self, model_id: str) -> float:
        return self._sleep_time(model_id, "sleep")

    def slowdown(self, model_id: str) -> float:
        return self.cpu.slowdown if self.models[model_id].device == "cpu" else 1.0

    def trace_dir(self) -> Path:
        p = Path(self.trace.dir)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def llmux_config(self, fallback: bool = True, sleep: bool = True) -> Config:
        """The llmux config the real core runs with: same tiers, models and reservations.
        ``fallback=False`` leaves out every model's ``cpu_fallback`` (GPU-only llmux),
        ``sleep=False`` every model's ``sleep:`` (eviction stops, as before issue 12)."""
        sleepers = self.sleepers if sleep and self.llmux.sleep else []
        data: dict[str, Any] = {
            "server": {
                "max_queue": self.llmux.max_queue,
                "queue_timeout": self.llmux.queue_timeout_s,
                "swap_patience": self.llmux.swap_patience,
                "swap_patience_max": self.llmux.swap_patience_max_s,
            },
            "gpu": {"vram_gb": self.gpu.vram_gb, "reserve_gb": self.gpu.reserve_gb},
            **({"host": {"ram_gb": self.host_budget_gb}} if sleepers else {}),
            "tiers": [t.model_dump() for t in self.tiers],
            "models": {
                mid: {
                    "type": m.type,
                    "vram_gb": self.gpu_gb(mid),
                    "cmd": f"simulated {mid}",
                    "tier": self.tier_of(mid),
                    "pinned": m.pinned,
                    **(
                        {"cpu_fallback": {"cmd": f"simulated {mid} on cpu"}}
                        if m.cpu_fallback and fallback
                        else {}
                    ),
                    **(
                        {
                            "sleep": {
                                "level": m.sleep.level,
                                "host_gb": m.weights_gb,
                                "residual_gb": m.sleep.residual_gb,
                                "api": "vllm",
                            }
                        }
                        if m.sleep is not None and mid in sleepers
                        else {}
                    ),
                }
                for mid, m in self.models.items()
            },
        }
        return parse_config(yaml.safe_dump(data), f"scenario {self.name}")


# ---------------------------------------------------------------------- loading


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: dict[str, Any] = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError([f"{key}: '{part}' is not a mapping"], "--set")
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=1.5`` -> ("a.b", 1.5); the value is YAML (so ``null``, lists and strings work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected key=value"], "--set")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def scenario_data(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror}"], str(p)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping"], str(p))
    data.setdefault("base_dir", str(p.resolve().parent))
    return data


def build_scenario(
    data: Mapping[str, Any],
    overlays: Iterable[Mapping[str, Any]] = (),
    overrides: Iterable[tuple[str, Any]] = (),
    source: str = "scenario",
) -> Scenario:
    merged = dict(data)
    for overlay in overlays:
        merged = _merge(merged, {k: v for k, v in overlay.items() if k != "base_dir"})
    merged = copy.deepcopy(merged)
    for key, value in overrides:
        _set_dotted(merged, key, value)
    try:
        return Scenario.model_validate(merged)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        raise ConfigError(problems, source) from None


def load_scenario(
    path: str | Path,
    overlays: Iterable[str | Path] = (),
    overrides: Iterable[str] = (),
) -> Scenario:
    """Load a scenario file, merge overlay files on top, then apply ``key=value`` overrides."""
    return build_scenario(
        scenario_data(path),
        [scenario_data(o) for o in overlays],
        [parse_override(o) for o in overrides],
        str(path),
    )


def with_overrides(scenario: Scenario, overrides: Iterable[tuple[str, Any]]) -> Scenario:
    return build_scenario(scenario.model_dump(), (), overrides, scenario.name)
