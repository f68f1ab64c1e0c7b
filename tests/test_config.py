"""Config: validation names the key and line; durations; aliases; check-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmux.config import Config, default_config_text, parse_config, parse_duration
from llmux.errors import ConfigError
from llmux.scheduling.learned import state_dir


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("2s", 2.0), ("1h", 3600.0), ("500ms", 0.5), (7, 7.0), ("1.5m", 90.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_minimal_and_defaults() -> None:
    cfg = parse_config("models:\n  m: {type: llm, vram_gb: 1, cmd: 'x --port ${PORT}'}\n")
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.max_queue == 1024  # per model
    assert cfg.server.queue_timeout == 300
    assert (cfg.server.swap_patience, cfg.server.swap_patience_max) == (8, 180)
    assert cfg.host.ram_gb == "auto"
    assert cfg.host.budget_gb(20.0) == pytest.approx(18.0)  # MemAvailable less 10%
    assert cfg.host.budget_gb(None) == 0.0  # unknown: nothing may sleep at level 1
    m = cfg.models["m"]
    assert m.sleep is None
    assert m.sleep_host_gb == 0
    assert (m.ready_timeout, m.stop_timeout, m.ttl, m.health) == (300, 10, None, "/health")
    assert [t.name for t in cfg.tiers] == ["llm", "tts", "asr"]
    assert cfg.tier_protected("asr")
    assert cfg.budget_gb(None) == 15.5  # 16 without NVML, less the reserve
    assert cfg.budget_gb(24.0) == 23.5


def test_full_example_and_aliases() -> None:
    cfg = parse_config(
        """
server: {queue_timeout: 2m, shutdown_grace: 5s, max_queue: 3}
gpu: {vram_gb: 12, reserve_gb: 1}
models:
  qwen:
    type: llm
    vram_gb: 6
    cmd: llama-server -m /m.gguf --port ${PORT}
    ttl: 10m
    aliases: [gpt-4o-mini]
  emb: {type: embedding, vram_gb: 1, cmd: e}
"""
    )
    assert cfg.server.queue_timeout == 120
    assert cfg.models["qwen"].ttl == 600
    assert cfg.resolve("gpt-4o-mini") == "qwen"
    assert cfg.resolve("nope") is None
    assert cfg.tier_of("emb") == "llm"
    assert cfg.budget_gb(None) == 11


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  m:\n    type: llm\n    vram_gb: lots\n    cmd: x\n",
            "models.m.vram_gb (line 4)",
        ),
        ("models:\n  m:\n    type: robot\n    vram_gb: 1\n    cmd: x\n", "models.m.type (line 3)"),
        ("server:\n  queue_timeout: soon\n", "server.queue_timeout (line 2)"),
        ("server:\n  prot: 1\n", "server.prot (line 2)"),
        ("models:\n  m:\n    type: llm\n    vram_gb: 1\n", "exactly one of 'cmd' or 'engine'"),
        ("models:\n  m: {type: llm, vram_gb: 1, cmd: x, tier: gold}\n", "unknown tier 'gold'"),
        (
            "models:\n  a: {type: llm, vram_gb: 1, cmd: x, aliases: [b]}\n"
            "  b: {type: llm, vram_gb: 1, cmd: y}\n",
            "'b' is already used",
        ),
        ("models: [1, 2\n", "not valid YAML"),
        ("- 1\n", "expected a mapping"),
        ("models:\n  m: {type: llm, vram_gb: 1, engine: piper}\n", "needs 'model'"),
        (
            "models:\n  m:\n    type: llm\n    engine: llama-cpp\n    model: m.gguf\n"
            "    vram_gb: 1\n    args:\n      n_ctx: 2.5\n",
            "models.m.args.n_ctx (line 8): must be an integer, not 2.5",
        ),
        (
            "models:\n  m:\n    type: asr\n    engine: faster-whisper\n    model: w\n"
            "    vram_gb: 1\n    args: {device: cuda}\n    cpu_fallback:\n"
            "      args: {device: gpu, beam: 1}\n",
            "models.m.cpu_fallback.args.device (line 9): must be cpu, cuda or auto, not 'gpu'",
        ),
        (
            "models:\n  m:\n    type: asr\n    engine: faster-whisper\n    model: w\n"
            "    vram_gb: 1\n    args: {device: cuda}\n    cpu_fallback:\n"
            "      args: {device: gpu, beam: 1}\n",
            "models.m.cpu_fallback.args.beam (line 9): unknown option; allowed: beam_size, "
            "compute_type, device, device_index, threads",
        ),
        (
            "models:\n  m:\n    type: llm\n    engine: llama-cpp\n    model: m.gguf\n"
            "    vram_gb: 1\n    args: {threads: 4}\n    cpu_fallback: {args: {n_threads: 2}}\n",
            "models.m.cpu_fallback.args (line 8): threads and n_threads name the same option",
        ),
        (
            "models:\n  m:\n    type: llm\n    vram_gb: 1\n    cmd: x\n    args: {n_ctx: 4}\n",
            "models.m.args (line 6): 'args' is for built-in engines",
        ),
        (
            "models:\n  m:\n    type: llm\n    vram_gb: 1\n    cmd: x\n"
            "    cpu_fallback: {args: {n_ctx: 4}}\n",
            "models.m.cpu_fallback (line 6): cpu_fallback for a 'cmd' model takes 'cmd'",
        ),
    ],
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_sleep_defaults_and_host_memory() -> None:
    cfg = parse_config(
        """
host: {ram_gb: 32}
models:
  a: {type: llm, vram_gb: 14, cmd: 'serve --port ${PORT}', sleep: {}}
  b: {type: llm, vram_gb: 8, cmd: 'serve --port ${PORT}', sleep: {level: 2, api: sglang}}
  c: {type: llm, vram_gb: 8, cmd: 'serve --port ${PORT}', sleep: {host_gb: 9.5}}
  v: {type: llm, vram_gb: 8, engine: vllm, model: org/name, sleep: {residual_gb: 0.75}}
"""
    )
    assert cfg.host.budget_gb(None) == 32
    a = cfg.models["a"]
    assert a.sleep is not None
    assert (a.sleep.level, a.sleep.residual_gb, a.sleep.api) == (1, 0.5, "vllm")
    assert a.sleep_host_gb == 14  # level 1 holds the weights: vram_gb unless host_gb says
    assert cfg.models["b"].sleep_host_gb == 0  # level 2 keeps nothing in host memory
    assert cfg.models["c"].sleep_host_gb == 9.5


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            "{type: tts, vram_gb: 1, engine: piper, model: en_US-joe-medium, sleep: {}}",
            "engine 'piper' has no sleep endpoints",
        ),
        (
            "{type: llm, vram_gb: 1, cmd: 'x --port ${PORT}', sleep: {residual_gb: 2}}",
            "sleep.residual_gb (2) is more than vram_gb (1)",
        ),
        (
            "{type: tts, vram_gb: 1, cmd: 'x --port ${PORT}', sleep: {},"
            " cpu_fallback: {cmd: 'y --port ${PORT}'}}",
            "'sleep' and 'cpu_fallback' cannot be combined",
        ),
        (
            "{type: llm, vram_gb: 8, engine: vllm, model: org/name, sleep: {api: sglang}}",
            "engine 'vllm' serves vLLM's sleep API",
        ),
        (
            "{type: llm, vram_gb: 8, engine: vllm, model: org/name, sleep: {},"
            " args: {enable_sleep_mode: false}}",
            "'sleep' needs args.enable_sleep_mode",
        ),
        (
            "{type: llm, vram_gb: 1, cmd: 'x --port ${PORT}', sleep: {level: 3}}",
            "models.m.sleep.level",
        ),
    ],
)
def test_sleep_config_errors(model: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"models:\n  m: {model}\n")
    assert expected in "\n".join(info.value.problems)


def test_nvml_keys_default_and_resolve() -> None:
    cfg = parse_config("gpu: {free_wait: 500ms}\n")
    assert cfg.gpu.free_wait == 0.5
    assert Config().gpu.free_wait == 10.0
    assert Config().server.state_dir is None
    assert state_dir(None, {"XDG_STATE_HOME": "/var/state"}) == Path("/var/state/llmux")
    assert state_dir(None, {}) == Path.home() / ".local" / "state" / "llmux"
    assert state_dir("~/llmux-state", {}) == Path.home() / "llmux-state"
    with pytest.raises(ConfigError) as info:
        parse_config("gpu:\n  free_wait: later\n")
    assert any("gpu.free_wait (line 2)" in p for p in info.value.problems)


def test_default_config_is_valid() -> None:
    cfg = parse_config(default_config_text())
    assert set(cfg.models) == {"whisper", "joe", "smollm2"}
    assert cfg.models["whisper"].pinned
    assert sum(m.vram_gb for m in cfg.models.values()) <= cfg.budget_gb(None)
    assert Config().server.host == "127.0.0.1"


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  m: {type: tts, vram_gb: 0.5, cmd: 'srv --port ${PORT}', ttl: 1m}\n")
    out = subprocess.run(
        [sys.executable, "-m", "llmux", "check-config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    resolved = parse_config(out.stdout)  # the printed config is itself valid
    assert resolved.models["m"].ttl == 60
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server:\n  port: 8080\nmodels:\n  m:\n    type: llm\n    vram_gb: -1\n    cmd: x\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "llmux", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "models.m.vram_gb (line 6)" in out.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "llmux", "check-config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


# The example: a Piper voice with a misspelt option and a string for a boolean.
BAD_VOICE = """\
models:
  voice:
    type: tts
    engine: piper
    model: en_US-joe-medium
    vram_gb: 0.3
    args: {speeker: 3, use_cuda: "yes"}
"""
BAD_VOICE_PROBLEMS = [
    "models.voice.args.speeker (line 7): unknown option; "
    "allowed: config, max_input_chars, speaker, use_cuda",
    "models.voice.args.use_cuda (line 7): must be true or false, not 'yes'",
]


def test_engine_args_are_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BAD_VOICE)
    assert info.value.problems == BAD_VOICE_PROBLEMS


def test_engine_args_are_kept_as_written() -> None:
    """Valid options stay as the config has them (``threads``, not ``n_threads``): what was
    launched is fingerprinted from them, and check-config prints them back."""
    cfg = parse_config(
        """
models:
  llm:
    type: llm
    engine: llama-cpp
    model: m.gguf
    vram_gb: 1
    args: {threads: 2, n_ctx: 4096, tensor_split: [1, 1], chat_template_kwargs: {a: [1]}}
    cpu_fallback: {args: {threads: 1, n_gpu_layers: 0}}
  asr:
    type: asr
    engine: faster-whisper
    model: w
    vram_gb: 1
    args: {device: cuda, compute_type: float16, beam_size: 1}
    cpu_fallback: {args: {device: cpu, compute_type: int8}}
  tts: {type: tts, engine: piper, model: v.onnx, vram_gb: 0.3, args: {speaker: 0, use_cuda: true}}
"""
    )
    llm = cfg.models["llm"]
    assert llm.args == {
        "threads": 2,
        "n_ctx": 4096,
        "tensor_split": [1, 1],
        "chat_template_kwargs": {"a": [1]},
    }
    assert llm.cpu_fallback is not None
    assert llm.cpu_fallback.args == {"threads": 1, "n_gpu_layers": 0}
    assert cfg.models["tts"].args == {"speaker": 0, "use_cuda": True}


def _llmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmux", *args],
        capture_output=True,
        text=True,
        timeout=120,  # a `serve` that did not refuse would run until this kills it
        check=False,
    )


def test_check_config_and_serve_refuse_bad_engine_args(tmp_path: Path) -> None:
    bad = tmp_path / "voice.yaml"
    bad.write_text(BAD_VOICE)
    expected = [f"{bad}: invalid config", *(f"  - {p}" for p in BAD_VOICE_PROBLEMS)]
    check = _llmux("check-config", str(bad))
    assert check.returncode == 2
    assert check.stderr.splitlines() == expected
    assert check.stdout == ""
    serve = _llmux("serve", "--config", str(bad), "--port", "0")
    assert serve.returncode == 2
    assert serve.stderr.splitlines() == expected


def test_check_config_names_models_that_cannot_load_here(tmp_path: Path) -> None:
    """A model that is not on this machine is no config error (llmux serves the rest, and its
    loads fail with the same message), but check-config says so."""
    cfg = tmp_path / "llmux.yaml"
    missing = tmp_path / "no-such-voice.onnx"
    cfg.write_text(
        f"models:\n  voice: {{type: tts, engine: piper, model: '{missing}', vram_gb: 0.3}}\n"
    )
    out = _llmux("check-config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert parse_config(out.stdout).models["voice"].model == str(missing)
    assert f"{cfg}: valid, but these models cannot load here:" in out.stderr
    assert f"  - models.voice.model: model '{missing}' for engine 'piper' is neither" in out.stderr
