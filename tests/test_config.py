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
    assert cfg.server.max_queue == 256
    assert cfg.server.queue_timeout == 300
    m = cfg.models["m"]
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
    ],
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(expected in p for p in info.value.problems), info.value.problems


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
