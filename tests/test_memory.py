"""Memory across load/unload cycles of the real engines, through a running llmux.

For each engine of the built-in default stack (whisper, joe, smollm2), a real `llmux serve` (no
--config) loads the model with the admin API, serves one real request through the relay, and
unloads it again, ``CYCLES`` times. After every unload the child process (and its whole process
group) must be gone; across the cycles the gateway's own RSS must not creep up (the models' memory
lives and dies with the children, so llmux itself should hold nothing per cycle).

The figures (cycle times, child RSS, gateway RSS after the warm-up and at the end) are printed;
run with ``-s`` to see them. docs/engines.md records one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import Server, StartServer
from tests.engine_children import require_engine

pytestmark = [pytest.mark.engines, pytest.mark.slow]

CYCLES = 20
WARMUP = 2
"""Cycles before the first gateway RSS reading (first-use imports, pools, caches)."""
MAX_GROWTH_MB = 15.0
"""Most the gateway's RSS may grow over the ``CYCLES - WARMUP`` measured cycles of one engine."""
LOAD_TIMEOUT = 120.0

_ENGINES = {
    "whisper": ("faster-whisper", "whisper-tiny.en", "faster_whisper"),
    "joe": ("piper", "en_US-joe-medium", "piper"),
    "smollm2": ("llama-cpp", "smollm2-135m", "llama_cpp"),
}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid``, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[2])


def _gone(pid: int) -> bool:
    """True if ``pid`` is gone; a zombie counts as gone (PID 1 here may not reap)."""
    stat = _stat(pid)
    return stat is None or stat[0] == "Z"


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes still in process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                alive.append(int(entry.name))
    return alive


def _ask_whisper(client: OpenAI, audio: bytes) -> None:
    text = client.audio.transcriptions.create(model="whisper", file=("s.wav", audio)).text
    assert "lights" in text.lower()


def _ask_joe(client: OpenAI, _: bytes) -> None:
    pcm = client.audio.speech.create(
        model="joe", voice="alloy", input="Hello there.", response_format="pcm"
    ).content
    assert len(pcm) > 22050  # at least half a second of 16-bit audio


def _ask_smollm2(client: OpenAI, _: bytes) -> None:
    # A one-word prompt: a longer one (a chat template) is evaluated as a batch on
    # llama_cpp.server's n_threads_batch (= all cores), which on a busy 2-core box costs 2-6 s
    # per fresh load; one or two tokens run on n_threads and take ~0.1 s. Chat is covered in
    # test_default_stack.py; here the request only proves that the fresh child serves.
    done = client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, temperature=0)
    assert done.usage is not None
    assert done.usage.completion_tokens >= 1


_REQUESTS: dict[str, Callable[[OpenAI, bytes], None]] = {
    "whisper": _ask_whisper,
    "joe": _ask_joe,
    "smollm2": _ask_smollm2,
}


@dataclass
class Figures:
    model_id: str
    load_s: list[float] = field(default_factory=list)
    request_s: list[float] = field(default_factory=list)
    unload_s: list[float] = field(default_factory=list)
    child_rss_mb: list[float] = field(default_factory=list)
    gateway_start_mb: float = 0.0
    gateway_end_mb: float = 0.0

    def summary(self) -> str:
        def med(xs: list[float]) -> str:
            return f"{statistics.median(xs):.2f}/{max(xs):.2f}"

        cycle = [
            a + b + c for a, b, c in zip(self.load_s, self.request_s, self.unload_s, strict=True)
        ]
        return (
            f"{self.model_id}: {len(self.load_s)} cycles in {sum(cycle):.1f} s; "
            f"median/max s: load {med(self.load_s)}, request {med(self.request_s)}, "
            f"unload (child gone) {med(self.unload_s)}; child RSS when ready "
            f"{statistics.median(self.child_rss_mb):.0f} MB; gateway RSS after {WARMUP} cycles "
            f"{self.gateway_start_mb:.1f} MB, after {CYCLES} {self.gateway_end_mb:.1f} MB "
            f"({self.gateway_end_mb - self.gateway_start_mb:+.1f} MB)"
        )


def _admin(server: Server, action: str, model_id: str) -> None:
    resp = server.post(f"/models/{model_id}/{action}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == ("ready" if action == "load" else "unloaded")


@pytest.mark.parametrize("model_id", list(_ENGINES))
def test_load_unload_cycles_free_everything(start_server: StartServer, model_id: str) -> None:
    engine, model, module = _ENGINES[model_id]
    require_engine(engine, model, module)

    server = start_server(None)  # the built-in default stack: the three engines
    server.wait_state("whisper", "ready", LOAD_TIMEOUT)  # pinned: settle the start first
    client = server.client(timeout=120)
    audio = b""
    if model_id == "whisper":
        audio = client.audio.speech.create(
            model="joe", voice="alloy", input="Turn on the lights.", response_format="wav"
        ).content
        _admin(server, "unload", "joe")  # only the model under test comes and goes
    ask = _REQUESTS[model_id]
    gateway = server.proc.pid
    figures = Figures(model_id)

    for cycle in range(1, CYCLES + 1):
        started = time.monotonic()
        _admin(server, "load", model_id)
        loaded = time.monotonic()
        pid = server.model(model_id)["pid"]
        assert isinstance(pid, int)
        ask(client, audio)
        asked = time.monotonic()
        figures.child_rss_mb.append(_rss_mb(pid))
        _admin(server, "unload", model_id)
        unloaded = time.monotonic()
        assert _gone(pid), f"cycle {cycle}: {model_id} pid {pid} still runs after unload"
        assert _group_alive(pid) == [], f"cycle {cycle}: {model_id}'s process group survives"
        after = server.model(model_id)
        assert (after["state"], after["pid"], after["in_flight"]) == ("unloaded", None, 0)
        assert after["last_error"] is None
        figures.load_s.append(loaded - started)
        figures.request_s.append(asked - loaded)
        figures.unload_s.append(unloaded - asked)
        if cycle == WARMUP:
            figures.gateway_start_mb = _rss_mb(gateway)
    figures.gateway_end_mb = _rss_mb(gateway)
    client.close()

    print("\n" + figures.summary())
    assert len(figures.load_s) == CYCLES
    growth = figures.gateway_end_mb - figures.gateway_start_mb
    assert growth < MAX_GROWTH_MB, figures.summary()
    resident = {m["id"] for m in server.status()["models"] if m["state"] != "unloaded"}
    assert model_id not in resident
