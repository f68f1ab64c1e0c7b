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


class ModelSpec(_Strict):
    type: ModelKind
    vram_gb: float = Field(ge=0)
    """GPU memory; ignored (0) when ``device`` is cpu."""
    init_s: float = Field(0.0, ge=0)
    """Engine start-up after the weights are read (load = vram_gb / load_gbps + init_s)."""
    tier: str | None = None
    """Defaults to the type."""
    trace: str | None = None
    """LLMs: the Azure LLM trace file (in ``trace.dir``) that feeds this model."""
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

    @model_validator(mode="after")
    def _times(self) -> ModelSpec:
        if self.type != "llm" and (self.first_byte_s is None or self.service_s is None):
            raise ValueError("non-LLM models need first_byte_s and service_s")
        if self.type == "llm" and self.trace is None:
            raise ValueError("LLM models need a trace")
        return self


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


class SloSpec(_Strict):
    llm: float = 10.0
    asr: float = 1.0
    tts: float = 1.0

    def of(self, tier: str) -> float:
        value: float = getattr(self, tier)
        return value


class LlmuxSpec(_Strict):
    max_queue: int = Field(256, ge=0)
    queue_timeout_s: float = Field(300.0, ge=0)
    passover_bound_s: float = Field(10.0, ge=0)


class OllamaSpec(_Strict):
    keep_alive_s: float = 300.0
    max_loaded: int = 3
    resched_delay_s: float = 0.25


class LruSpec(_Strict):
    retry_interval_s: float = 1.0
    max_retries: int = 30


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
        return m.vram_gb / self.load_gbps + m.init_s

    def slowdown(self, model_id: str) -> float:
        return self.cpu.slowdown if self.models[model_id].device == "cpu" else 1.0

    def trace_dir(self) -> Path:
        p = Path(self.trace.dir)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def llmux_config(self, fallback: bool = True) -> Config:
        """The llmux config the real core runs with: same tiers, models and reservations.
        ``fallback=False`` leaves out every model's ``cpu_fallback`` (GPU-only llmux)."""
        data: dict[str, Any] = {
            "server": {
                "max_queue": self.llmux.max_queue,
                "queue_timeout": self.llmux.queue_timeout_s,
            },
            "gpu": {"vram_gb": self.gpu.vram_gb, "reserve_gb": self.gpu.reserve_gb},
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
