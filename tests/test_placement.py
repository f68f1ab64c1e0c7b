"""cpu_fallback: a model that would have to evict (or wait) runs on the CPU instead."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llmux.config import parse_config
from llmux.errors import ConfigError
from llmux.launch import launch_spec
from llmux.scheduling.events import Release
from llmux.scheduling.state import ModelState, StopReason
from tests.conftest import StartServer, upstream_cmd
from tests.test_api import chat
from tests.test_core_stateful import rig

FALLBACK = {"cpu_fallback": {"cmd": "serve-on-cpu --port ${PORT}"}}


def test_fallback_runs_on_cpu_instead_of_evicting() -> None:
    r = rig(
        {
            "chat": {"type": "llm", "vram_gb": 6},
            "asr": {"type": "asr", "vram_gb": 2},
            "tts": {"type": "tts", "vram_gb": 1, **FALLBACK},
        },
        budget=8,
    )
    r.ready("chat")
    r.ready("asr")
    rid = r.acquire("tts")  # 1 GB does not fit without evicting chat: the CPU takes it
    tts = r.core.models["tts"]
    assert tts.on_cpu
    assert tts.state is ModelState.LOADING
    assert tts.reservation_gb == 0
    assert r.rec.stops() == []  # nothing was evicted
    r.loaded("tts")
    assert rid in r.rec.granted()
    assert r.core.reserved_gb == 8


def test_fallback_takes_the_gpu_when_it_fits() -> None:
    r = rig({"tts": {"type": "tts", "vram_gb": 1, **FALLBACK}}, budget=8)
    r.ready("tts")
    assert not r.core.models["tts"].on_cpu
    assert r.core.reserved_gb == 1


def test_a_model_on_the_cpu_is_never_a_victim() -> None:
    r = rig(
        {
            "chat": {"type": "llm", "vram_gb": 6},
            "asr": {"type": "asr", "vram_gb": 2},
            "tts": {"type": "tts", "vram_gb": 1, **FALLBACK},
            "code": {"type": "llm", "vram_gb": 2},
        },
        budget=8,
    )
    chat = r.ready("chat")
    r.ready("asr")
    r.ready("tts")  # on the CPU: the GPU is full
    assert r.core.models["tts"].on_cpu
    r.send(Release(chat))
    r.acquire("code")  # needs 2 GB: only chat's memory helps; tts holds none
    assert [(mid, reason) for mid, _, reason in r.rec.stops()] == [("chat", StopReason.PRIORITY)]
    assert r.state("tts") is ModelState.READY


def test_fallback_never_fails_for_insufficient_vram() -> None:
    r = rig(
        {
            "ears": {"type": "asr", "vram_gb": 3, "pinned": True},
            "voice": {"type": "tts", "vram_gb": 1, **FALLBACK},
        },
        budget=3,
    )
    r.ready("ears")
    rid = r.acquire("voice")
    assert rid not in r.rec.rejected()
    assert r.core.models["voice"].on_cpu
    r.loaded("voice")
    assert rid in r.rec.granted()
    r.send(Release(rid))
    r.unload("voice")
    r.stopped("voice")
    assert not r.core.models["voice"].on_cpu  # placement is decided again at the next load


def test_fallback_config_and_launch_spec() -> None:
    cfg = parse_config(
        """
models:
  a:
    type: tts
    vram_gb: 1
    cmd: gpu-server --port ${PORT}
    cpu_fallback: {cmd: "cpu-server --port ${PORT}"}
  b:
    type: tts
    vram_gb: 1
    engine: piper
    model: en_US-joe-medium
    args: {use_cuda: true}
    cpu_fallback: {args: {use_cuda: false}}
"""
    )
    assert launch_spec("a", cfg.models["a"]).argv[0] == "gpu-server"
    assert launch_spec("a", cfg.models["a"], on_cpu=True).argv[0] == "cpu-server"
    assert "true" in launch_spec("b", cfg.models["b"]).argv
    assert "false" in launch_spec("b", cfg.models["b"], on_cpu=True).argv
    with pytest.raises(ConfigError, match="needs its own 'cmd'"):
        parse_config("models:\n  a: {type: tts, vram_gb: 1, cmd: x, cpu_fallback: {}}\n")


@pytest.mark.slow
def test_fallback_end_to_end(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
gpu: {{vram_gb: 3, reserve_gb: 0}}
models:
  chat: {{type: llm, vram_gb: 2, cmd: "{upstream_cmd(tmp_path, "chat")}"}}
  voice:
    type: tts
    vram_gb: 2
    cmd: {upstream_cmd(tmp_path, "voice-gpu")}
    cpu_fallback: {{cmd: "{upstream_cmd(tmp_path, "voice-cpu")}"}}
"""
    server = start_server(cfg)
    client = server.client()

    def speak() -> None:
        client.audio.speech.create(model="voice", voice="alloy", input="hi", response_format="pcm")

    def served(name: str) -> int:
        count: int = httpx.get(server.upstream(name) + "/_stats", timeout=10).json()["requests"]
        return count

    assert chat(client, "chat") == "chat got chat"
    speak()
    assert served("voice-cpu") == 1  # no room without evicting chat
    voice = server.model("voice")
    assert voice["placement"] == "cpu"
    assert server.model("chat")["state"] == "ready"  # not evicted
    assert server.status()["vram"]["reserved_gb"] == 2
    server.post("/models/voice/unload")
    server.post("/models/chat/unload")
    speak()
    assert served("voice-gpu") == 1  # room now: the GPU
    assert server.model("voice")["placement"] == "gpu"
