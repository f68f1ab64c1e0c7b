#!/usr/bin/env python3
"""Benchmark llmux's real engines on CPU: load time, warm latency and a whole voice turn.

    python bench/engines.py [--repeats N] [--load-repeats M] [--out bench/results/engines-DATE.json]

Every llmux number is measured next to a baseline taken in the same run, interleaved sample by
sample (the order alternates), against a child of the same engine and model that this script
spawns itself from ``engine_argv``/``engine_env``. Reported: medians, the llmux/direct ratio of
the medians, and the median of the paired differences. See bench/README.md for what each number
means. All processes started here are stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import io
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmux.backends.process import free_port, parent_death_preexec
from llmux.engines import PORT_PLACEHOLDER, engine_argv, engine_env, engine_health_path

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

CLIP_TEXT = "Please turn on the kitchen lights and set a timer for ten minutes."
"""Spoken by Piper into the ~3 s clip that the ASR requests transcribe."""
CHAT_PROMPT = "What is the capital of France?"
SPEECH_TEXT = "The capital of France is Paris. It is famous for the Eiffel Tower."
COLD_SPEECH_TEXT = "Hello! How can I help you today?"
VOICE_SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."
VOICE_MAX_TOKENS = 32
CHAT_TOKENS = 32
STREAM_TOKENS = 16
"""Streaming is timed to its first chunk; a shorter answer keeps the run short."""

HEALTH_POLL_S = 0.01
"""Probe interval for the direct children's readiness: tight, to time the engine's own load."""
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class Engine:
    engine: str
    model_id: str
    """The id in llmux's built-in default config (and in this script's one-model configs)."""
    type: str
    model: str
    vram_gb: float
    alias: str
    """The OpenAI name the built-in default config gives it (used by the voice turn)."""


LLM = Engine("llama-cpp", "smollm2", "llm", "smollm2-135m", 0.5, "gpt-4o-mini")
ASR = Engine("faster-whisper", "whisper", "asr", "whisper-tiny.en", 1.0, "whisper-1")
TTS = Engine("piper", "joe", "tts", "en_US-joe-medium", 0.3, "tts-1")
ENGINES = (LLM, ASR, TTS)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; wait until it is gone."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # the leader or stragglers of its group
        self.popen.wait()


class Procs:
    """Every process this script starts; ``stop_all`` ends them (newest first)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.live: list[Proc] = []
        self._count = 0

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self._count += 1
        log_path = self.log_dir / f"{self._count:03d}-{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_preexec(),
            )
        proc = Proc(name, popen, log_path)
        self.live.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.live):
            with contextlib.suppress(Exception):
                proc.stop()
        self.live.clear()


def wait_ready(
    client: httpx.Client, url: str, proc: Proc, timeout: float = READY_TIMEOUT_S
) -> float:
    """Poll ``url`` until it answers 200; the perf_counter time it did."""
    deadline = time.perf_counter() + timeout
    while True:
        if proc.popen.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} before it was ready:\n"
                f"{proc.log_tail()}"
            )
        with contextlib.suppress(httpx.TransportError):
            if client.get(url, timeout=5.0).status_code == 200:
                return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"{proc.name} not ready after {timeout:g} s:\n{proc.log_tail()}")
        time.sleep(HEALTH_POLL_S)


@dataclass
class Direct:
    """A child of one engine spawned by this script, as llmux would spawn it."""

    proc: Proc
    base_url: str
    spawned: float
    ready: float


def spawn_direct(procs: Procs, client: httpx.Client, eng: Engine) -> Direct:
    port = free_port()
    argv = [a.replace(PORT_PLACEHOLDER, str(port)) for a in engine_argv(eng.engine, eng.model, {})]
    env = engine_env(eng.engine, os.environ)
    base_url = f"http://{HOST}:{port}"
    spawned = time.perf_counter()
    proc = procs.start(f"direct-{eng.model_id}", argv, env)
    ready = wait_ready(client, base_url + engine_health_path(eng.engine), proc)
    return Direct(proc, base_url, spawned, ready)


@dataclass
class Llmux:
    proc: Proc
    base_url: str
    ready_s: float
    """Spawn of ``llmux serve`` to its /health answering 200."""


def start_llmux(procs: Procs, client: httpx.Client, name: str, config: Path | None) -> Llmux:
    port = free_port()
    argv = [sys.executable, "-m", "llmux", "serve", "--port", str(port), "--log-level", "warning"]
    if config is not None:
        argv += ["--config", str(config)]
    base_url = f"http://{HOST}:{port}"
    spawned = time.perf_counter()
    proc = procs.start(name, argv, dict(os.environ))
    ready = wait_ready(client, base_url + "/health", proc)
    return Llmux(proc, base_url, ready - spawned)


def one_model_config(path: Path, eng: Engine) -> Path:
    """A config with only ``eng``'s model, not pinned, no ttl (JSON is YAML)."""
    config = {
        "server": {"host": HOST, "shutdown_grace": 5},
        "gpu": {"vram_gb": 16},
        "models": {
            eng.model_id: {
                "type": eng.type,
                "engine": eng.engine,
                "model": eng.model,
                "vram_gb": eng.vram_gb,
            }
        },
    }
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def model_state(client: httpx.Client, llmux: Llmux, model_id: str) -> str:
    resp = client.get(llmux.base_url + "/status")
    resp.raise_for_status()
    for m in resp.json()["models"]:
        if m["id"] == model_id:
            state: str = m["state"]
            return state
    raise BenchError(f"llmux has no model {model_id!r}")


def unload(client: httpx.Client, llmux: Llmux, model_id: str) -> None:
    resp = client.post(f"{llmux.base_url}/models/{model_id}/unload")
    if resp.status_code != 200 or resp.json().get("state") != "unloaded":
        raise BenchError(f"unload {model_id}: {resp.status_code} {resp.text}")


# --------------------------------------------------------------------------- requests


@dataclass
class Timing:
    response_start: float
    """Seconds from just before sending to the response's status line and headers."""
    first_byte: float
    """Seconds from just before sending to the first non-empty body chunk."""
    total: float
    """Seconds from just before sending to the last body byte."""
    body: bytes
    headers: httpx.Headers = field(repr=False)


def timed_post(
    client: httpx.Client,
    url: str,
    *,
    json_body: dict[str, Any] | None = None,
    files: dict[str, tuple[str, bytes, str]] | None = None,
    data: dict[str, str] | None = None,
) -> Timing:
    start = time.perf_counter()
    first: float | None = None
    chunks: list[bytes] = []
    with client.stream("POST", url, json=json_body, files=files, data=data) as resp:
        response_start = time.perf_counter()
        for chunk in resp.iter_raw():
            if chunk:
                if first is None:
                    first = time.perf_counter()
                chunks.append(chunk)
        end = time.perf_counter()
        body = b"".join(chunks)
        if resp.status_code != 200:
            raise BenchError(f"POST {url}: {resp.status_code} {body[:500]!r}")
        if first is None:
            raise BenchError(f"POST {url}: empty body")
        return Timing(response_start - start, first - start, end - start, body, resp.headers)


def chat_body(
    model: str, content: str, max_tokens: int, stream: bool, system: str | None = None
) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream": stream,
    }


def tagged(tag: str, text: str) -> str:
    """``text`` with a per-sample prefix, so that llama.cpp cannot reuse the previous request's
    KV cache for the whole prompt: every warm chat pays for evaluating the user's message, as a
    new turn of a real conversation would."""
    return f"[{tag}] {text}" if tag else text


def chat(client: httpx.Client, base: str, model: str, max_tokens: int, tag: str) -> Timing:
    return timed_post(
        client,
        base + "/v1/chat/completions",
        json_body=chat_body(model, tagged(tag, CHAT_PROMPT), max_tokens, stream=False),
    )


def chat_stream(client: httpx.Client, base: str, model: str, max_tokens: int, tag: str) -> Timing:
    return timed_post(
        client,
        base + "/v1/chat/completions",
        json_body=chat_body(model, tagged(tag, CHAT_PROMPT), max_tokens, stream=True),
    )


def speech(client: httpx.Client, base: str, model: str, text: str) -> Timing:
    """Raw PCM, so the first body byte is the first audio (a WAV header would come at once)."""
    return timed_post(
        client,
        base + "/v1/audio/speech",
        json_body={"model": model, "input": text, "voice": "alloy", "response_format": "pcm"},
    )


def transcribe(client: httpx.Client, base: str, model: str, clip: bytes) -> Timing:
    return timed_post(
        client,
        base + "/v1/audio/transcriptions",
        files={"file": ("clip.wav", clip, "audio/wav")},
        data={"model": model, "response_format": "json"},
    )


def chat_text(t: Timing) -> str:
    content: str = json.loads(t.body)["choices"][0]["message"]["content"] or ""
    return content.strip()


def stream_text(t: Timing) -> str:
    out = []
    for line in t.body.decode("utf-8", "replace").splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0].get("delta", {})
            out.append(delta.get("content") or "")
    return "".join(out).strip()


def transcript(t: Timing) -> str:
    text: str = json.loads(t.body)["text"]
    return text.strip()


def make_clip(procs: Procs, client: httpx.Client) -> tuple[bytes, dict[str, Any]]:
    """A WAV clip of CLIP_TEXT spoken by a Piper child spawned for the purpose."""
    child = spawn_direct(procs, client, TTS)
    try:
        t = speech(client, child.base_url, TTS.model_id, CLIP_TEXT)
    finally:
        procs.stop(child.proc)
    rate = int(t.headers.get("x-sample-rate", "22050"))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(t.body)
    info = {
        "text": CLIP_TEXT,
        "seconds": round(len(t.body) / 2 / rate, 3),
        "sample_rate": rate,
        "bytes": len(buf.getvalue()),
    }
    return buf.getvalue(), info


# --------------------------------------------------------------------------- statistics


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_delta(llmux: list[float], direct: list[float]) -> float:
    return median([a - b for a, b in zip(llmux, direct, strict=True)])


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def compare(direct: list[float], llmux: list[float]) -> dict[str, Any]:
    md, ml = median(direct), median(llmux)
    return {
        "direct": summary(direct),
        "llmux": summary(llmux),
        "ratio": ml / md if md else float("nan"),
        "median_paired_delta": paired_delta(llmux, direct),
    }


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def alternating(n: int) -> Iterator[tuple[int, bool]]:
    """(i, direct_first): the order of the pair flips every sample."""
    for i in range(n):
        yield i, i % 2 == 0


# --------------------------------------------------------------------------- 1. load


def first_request(
    client: httpx.Client, base: str, eng: Engine, clip: bytes, tag: str = ""
) -> Timing:
    """The request that makes llmux load ``eng`` on demand (and, tagged, its warm reference)."""
    if eng is LLM:
        return chat_stream(client, base, eng.model_id, 8, tag)
    if eng is TTS:
        return speech(client, base, eng.model_id, COLD_SPEECH_TEXT)
    return transcribe(client, base, eng.model_id, clip)


def bench_load(
    procs: Procs, client: httpx.Client, eng: Engine, n: int, clip: bytes, tmp: Path
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {
        "direct_load_s": [],
        "direct_first_byte_s": [],
        "direct_response_start_s": [],
        "llmux_cold_first_byte_s": [],
        "llmux_cold_response_start_s": [],
        "llmux_warm_first_byte_s": [],
        "llmux_unload_s": [],
    }
    order: list[str] = []
    first_chunks: dict[str, list[str]] = {"direct": [], "llmux": []}
    llmux = start_llmux(
        procs, client, f"llmux-{eng.model_id}", one_model_config(tmp / f"{eng.model_id}.yaml", eng)
    )

    def direct_sample() -> None:
        child = spawn_direct(procs, client, eng)
        t = first_request(client, child.base_url, eng, clip)
        samples["direct_load_s"].append(child.ready - child.spawned)
        # From spawn, so it is comparable with llmux's cold first byte (tight readiness probe).
        samples["direct_first_byte_s"].append(child.ready - child.spawned + t.first_byte)
        samples["direct_response_start_s"].append(child.ready - child.spawned + t.response_start)
        first_chunks["direct"].append(repr(t.body[:60]))
        procs.stop(child.proc)

    def llmux_sample() -> None:
        state = model_state(client, llmux, eng.model_id)
        if state != "unloaded":
            raise BenchError(f"{eng.model_id} is {state} before a cold request")
        cold = first_request(client, llmux.base_url, eng, clip)
        warm = first_request(client, llmux.base_url, eng, clip, tag="warm")
        samples["llmux_cold_first_byte_s"].append(cold.first_byte)
        samples["llmux_cold_response_start_s"].append(cold.response_start)
        first_chunks["llmux"].append(repr(cold.body[:60]))
        samples["llmux_warm_first_byte_s"].append(warm.first_byte)
        start = time.perf_counter()
        unload(client, llmux, eng.model_id)
        samples["llmux_unload_s"].append(time.perf_counter() - start)

    try:
        for i, direct_first in alternating(n):
            progress(f"load {eng.engine}: {i + 1}/{n}")
            order.append("direct,llmux" if direct_first else "llmux,direct")
            for step in (
                (direct_sample, llmux_sample) if direct_first else (llmux_sample, direct_sample)
            ):
                step()
    finally:
        procs.stop(llmux.proc)

    a = median(samples["direct_load_s"])
    a_fb = median(samples["direct_first_byte_s"])
    b = median(samples["llmux_cold_first_byte_s"])
    return {
        "engine": eng.engine,
        "model": eng.model,
        "first_request": {
            LLM: "chat stream, max_tokens 8",
            TTS: "speech pcm",
            ASR: "transcription",
        }[eng],
        "samples": samples,
        "order": order,
        "body_starts": first_chunks,
        "median": {k: median(v) for k, v in samples.items()},
        "overhead_s": b - a,
        "ratio": b / a,
        "overhead_vs_direct_first_byte_s": b - a_fb,
        "median_paired_overhead_vs_direct_first_byte_s": paired_delta(
            samples["llmux_cold_first_byte_s"], samples["direct_first_byte_s"]
        ),
        "median_paired_response_start_overhead_s": paired_delta(
            samples["llmux_cold_response_start_s"], samples["direct_response_start_s"]
        ),
        "llmux_server_ready_s": llmux.ready_s,
    }


# --------------------------------------------------------------------------- 2. endpoints

ENDPOINTS: dict[str, tuple[str, str]] = {
    # name: (metric, what)
    "chat": ("total", f"chat, non-streaming, max_tokens {CHAT_TOKENS}: {CHAT_PROMPT!r}"),
    "chat_stream": (
        "first_byte",
        f"chat, streaming, max_tokens {STREAM_TOKENS}: time to first chunk",
    ),
    "speech_first_byte": ("first_byte", f"speech (pcm) first byte: {SPEECH_TEXT!r}"),
    "speech_total": ("total", "speech (pcm) whole body"),
    "transcription": ("total", "transcription of the clip (json)"),
}


def endpoint_call(name: str, client: httpx.Client, base: str, clip: bytes, tag: str) -> Timing:
    if name == "chat":
        return chat(client, base, LLM.model_id, CHAT_TOKENS, tag)
    if name == "chat_stream":
        return chat_stream(client, base, LLM.model_id, STREAM_TOKENS, tag)
    if name == "speech":
        return speech(client, base, TTS.model_id, SPEECH_TEXT)
    return transcribe(client, base, ASR.model_id, clip)


def bench_endpoints(
    client: httpx.Client,
    llmux: Llmux,
    direct: dict[str, Direct],
    n: int,
    clip: bytes,
    fresh: bool,
) -> dict[str, Any]:
    calls = {
        "chat": LLM.model_id,
        "chat_stream": LLM.model_id,
        "speech": TTS.model_id,
        "transcription": ASR.model_id,
    }
    raw: dict[str, dict[str, list[dict[str, float]]]] = {
        c: {"direct": [], "llmux": []} for c in calls
    }
    outputs: dict[str, dict[str, str]] = {}
    # One warm-up per call and path, not counted.
    for c, model_id in calls.items():
        for path, base in (("direct", direct[model_id].base_url), ("llmux", llmux.base_url)):
            t = endpoint_call(c, client, base, clip, "warm-up" if fresh else "")
            if c == "chat":
                outputs.setdefault(c, {})[path] = chat_text(t)
            elif c == "chat_stream":
                outputs.setdefault(c, {})[path] = stream_text(t)
            elif c == "transcription":
                outputs.setdefault(c, {})[path] = transcript(t)
            else:
                outputs.setdefault(c, {})[path] = f"{len(t.body)} bytes of pcm"
    for i, direct_first in alternating(n):
        progress(f"endpoints: {i + 1}/{n}")
        for c, model_id in calls.items():
            paths = [("direct", direct[model_id].base_url), ("llmux", llmux.base_url)]
            for path, base in paths if direct_first else reversed(paths):
                tag = f"{i + 1}{c[-1]}" if fresh else ""
                t = endpoint_call(c, client, base, clip, tag)
                raw[c][path].append({"first_byte": t.first_byte, "total": t.total})

    results: dict[str, Any] = {}
    for name, (metric, what) in ENDPOINTS.items():
        c = name.removesuffix("_first_byte").removesuffix("_total")
        results[name] = {
            "what": what,
            "metric": metric,
            **compare([s[metric] for s in raw[c]["direct"]], [s[metric] for s in raw[c]["llmux"]]),
        }
    return {"rows": results, "samples": raw, "outputs": outputs}


# --------------------------------------------------------------------------- 3. voice turn

STAGES = ("asr", "llm", "tts_first_byte", "total")


def voice_turn(
    client: httpx.Client,
    bases: dict[str, str],
    clip: bytes,
    model_names: dict[str, str],
    tag: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """ASR -> chat -> TTS first byte, one after the other; seconds per stage and the texts."""
    start = time.perf_counter()
    asr = transcribe(client, bases[ASR.model_id], model_names[ASR.model_id], clip)
    heard = transcript(asr)
    llm = timed_post(
        client,
        bases[LLM.model_id] + "/v1/chat/completions",
        json_body=chat_body(
            model_names[LLM.model_id],
            tagged(tag, heard),
            VOICE_MAX_TOKENS,
            stream=False,
            system=VOICE_SYSTEM,
        ),
    )
    answer = chat_text(llm) or "Okay."
    tts_start = time.perf_counter()
    tts = speech(client, bases[TTS.model_id], model_names[TTS.model_id], answer)
    times = {
        "asr": asr.total,
        "llm": llm.total,
        "tts_first_byte": tts.first_byte,
        # from sending the ASR request to TTS's first byte (the rest of the audio excluded)
        "total": tts_start - start + tts.first_byte,
        "tts_total": tts.total,
    }
    return times, {"transcript": heard, "answer": answer}


def bench_voice_warm(
    client: httpx.Client,
    llmux: Llmux,
    direct: dict[str, Direct],
    n: int,
    clip: bytes,
    fresh: bool,
) -> dict[str, Any]:
    direct_bases = {mid: d.base_url for mid, d in direct.items()}
    llmux_bases = {e.model_id: llmux.base_url for e in ENGINES}
    aliases = {e.model_id: e.alias for e in ENGINES}
    ids = {e.model_id: e.model_id for e in ENGINES}
    paths = [("direct", direct_bases, ids), ("llmux", llmux_bases, aliases)]
    texts: dict[str, dict[str, str]] = {}
    for path, bases, names in paths:  # the warm-up turn, not counted
        _, texts[path] = voice_turn(client, bases, clip, names, "warm-up" if fresh else "")
    raw: dict[str, list[dict[str, float]]] = {"direct": [], "llmux": []}
    answers: dict[str, list[str]] = {"direct": [], "llmux": []}
    for i, direct_first in alternating(n):
        progress(f"voice turn: {i + 1}/{n}")
        for path, bases, names in paths if direct_first else reversed(paths):
            tag = f"turn {i + 1}" if fresh else ""
            times, said = voice_turn(client, bases, clip, names, tag)
            raw[path].append(times)
            answers[path].append(said["answer"])
    rows = {
        s: compare([t[s] for t in raw["direct"]], [t[s] for t in raw["llmux"]])
        for s in (*STAGES, "tts_total")
    }
    return {"rows": rows, "samples": raw, "texts": texts, "answers": answers}


def bench_voice_cold(procs: Procs, client: httpx.Client, clip: bytes) -> dict[str, Any]:
    llmux = start_llmux(procs, client, "llmux-default-cold", None)
    try:
        bases = {e.model_id: llmux.base_url for e in ENGINES}
        names = {e.model_id: e.alias for e in ENGINES}
        times, texts = voice_turn(client, bases, clip, names, "")
    finally:
        procs.stop(llmux.proc)
    return {"server_ready_s": llmux.ready_s, "times": times, "texts": texts}


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    def run(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for pkg in (
        "llmux",
        "llama-cpp-python",
        "faster-whisper",
        "ctranslate2",
        "piper-tts",
        "onnxruntime",
        "httpx",
        "uvicorn",
        "aiohttp",
    ):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "nproc": run(["nproc"]),
        "uname_m": run(["uname", "-m"]),
        "uname": platform.platform(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "git_dirty": run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"]) != "",
        "versions": versions,
    }


def markdown(results: dict[str, Any]) -> str:
    out: list[str] = []
    m = results["machine"]
    averages = [v["loadavg_1m_before"] for v in results.get("sections", {}).values()]
    loads = f"{min(averages):.1f}-{max(averages):.1f}" if averages else "?"
    out.append(
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['uname_m']}, Python {m['python']}; "
        f"repeats {results['settings']['repeats']}, "
        f"load repeats {results['settings']['load_repeats']}. Times in ms, medians. "
        f"1-min load average during the run: {loads}. Warm chats: "
        + (
            "a new prompt each (prompt evaluated)."
            if results["settings"]["fresh_prompts"]
            else "the same prompt each (llama.cpp reuses its KV cache; no prompt evaluation)."
        )
    )
    out.append("")
    out.append("**1. Load (cold start to first byte)**")
    out.append("")
    out.append(
        "| engine / model | first request | (a) direct load | (c) direct to 1st byte "
        "| (b) llmux cold 1st byte | b - a | b / a | b - c, paired "
        "| response start: llmux - direct, paired | warm 1st byte via llmux |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["load"].values():
        md = r["median"]
        out.append(
            f"| {r['engine']} / {r['model']} | {r['first_request']} "
            f"| {ms(md['direct_load_s'])} | {ms(md['direct_first_byte_s'])} "
            f"| {ms(md['llmux_cold_first_byte_s'])} | {ms(r['overhead_s'])} | {r['ratio']:.2f} "
            f"| {ms(r['median_paired_overhead_vs_direct_first_byte_s'])} "
            f"| {ms(r['median_paired_response_start_overhead_s'])} "
            f"| {ms(md['llmux_warm_first_byte_s'])} |"
        )
    out.append("")
    out.append("**2. Warm latency per endpoint (llmux vs direct child)**")
    out.append("")
    out.append("| endpoint | metric | direct | llmux | llmux - direct (paired) | llmux / direct |")
    out.append("|---|---|---:|---:|---:|---:|")
    for name, r in results["endpoints"]["rows"].items():
        out.append(
            f"| {name} | {r['metric']} | {ms(r['direct']['median'])} | {ms(r['llmux']['median'])} "
            f"| {ms(r['median_paired_delta'])} | {r['ratio']:.2f} |"
        )
    out.append("")
    vw = results["voice_turn"]["warm"]["rows"]
    cold = results["voice_turn"]["cold"]
    out.append("**3. Voice turn on the default stack (ASR → chat → TTS first byte)**")
    out.append("")
    out.append(
        "| stage | direct (warm) | llmux (warm) | llmux - direct (paired) | llmux / direct "
        "| llmux cold (1 turn) |"
    )
    out.append("|---|---:|---:|---:|---:|---:|")
    for s in (*STAGES, "tts_total"):
        r = vw[s]
        out.append(
            f"| {s} | {ms(r['direct']['median'])} | {ms(r['llmux']['median'])} "
            f"| {ms(r['median_paired_delta'])} | {r['ratio']:.2f} | {ms(cold['times'][s])} |"
        )
    out.append("")
    out.append(
        f"Cold turn: fresh `llmux serve` ready (/health) in {ms(cold['server_ready_s'])} ms, then "
        "the turn was sent at once (whisper is pinned and was still preloading; chat and TTS "
        "loaded on demand)."
    )
    return "\n".join(out)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def section(results: dict[str, Any], name: str) -> Iterator[None]:
    """Record a part's wall time and the load average around it (other work on the machine)."""
    progress(name)
    before = os.getloadavg()[0]
    start = time.perf_counter()
    yield
    results.setdefault("sections", {})[name] = {
        "wall_s": time.perf_counter() - start,
        "loadavg_1m_before": before,
        "loadavg_1m_after": os.getloadavg()[0],
    }


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="samples per measurement")
    parser.add_argument(
        "--load-repeats",
        type=int,
        default=None,
        help="cold-load samples per engine (default: --repeats, at most 5, to keep a run short)",
    )
    parser.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="give every warm chat a new prompt (llama.cpp then evaluates it; default: the same "
        "prompt each time, which llama.cpp answers from its KV cache without re-evaluating it)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    n = args.repeats
    fresh: bool = args.fresh_prompts
    n_load = args.load_repeats if args.load_repeats is not None else min(n, 5)
    if n_load < 1:
        parser.error("--load-repeats must be at least 1")
    now = dt.datetime.now(dt.UTC)
    out_path: Path = args.out or BENCH_DIR / "results" / f"engines-{now:%Y-%m-%d-%H%M%S}.json"

    os.environ["HF_HUB_OFFLINE"] = "1"
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "repeats": n,
            "load_repeats": n_load,
            "health_poll_s": HEALTH_POLL_S,
            "chat_prompt": CHAT_PROMPT,
            "speech_text": SPEECH_TEXT,
            "cold_speech_text": COLD_SPEECH_TEXT,
            "voice_system": VOICE_SYSTEM,
            "voice_max_tokens": VOICE_MAX_TOKENS,
            "chat_max_tokens": CHAT_TOKENS,
            "stream_max_tokens": STREAM_TOKENS,
            "fresh_prompts": fresh,
            "env": {"HF_HUB_OFFLINE": "1"},
        },
    }
    with (
        tempfile.TemporaryDirectory(prefix="llmux-bench-") as tmp_name,
        httpx.Client(timeout=REQUEST_TIMEOUT_S) as client,
    ):
        tmp = Path(tmp_name)
        procs = Procs(tmp)
        try:
            with section(results, "clip"):
                clip, results["clip"] = make_clip(procs, client)
            results["load"] = {}
            for eng in ENGINES:
                with section(results, f"load-{eng.model_id}"):
                    results["load"][eng.model_id] = bench_load(
                        procs, client, eng, n_load, clip, tmp
                    )
            with section(results, "default-stack-start"):
                llmux = start_llmux(procs, client, "llmux-default", None)
                direct = {e.model_id: spawn_direct(procs, client, e) for e in ENGINES}
                results["default_server_ready_s"] = llmux.ready_s
            with section(results, "endpoints"):
                results["endpoints"] = bench_endpoints(client, llmux, direct, n, clip, fresh)
            with section(results, "voice-warm"):
                results["voice_turn"] = {
                    "warm": bench_voice_warm(client, llmux, direct, n, clip, fresh)
                }
            procs.stop_all()
            with section(results, "voice-cold"):
                results["voice_turn"]["cold"] = bench_voice_cold(procs, client, clip)
        except BaseException:
            for proc in procs.live:
                print(f"--- {proc.name} log tail ---\n{proc.log_tail()}", file=sys.stderr)
            raise
        finally:
            procs.stop_all()

    results["wall_s"] = time.perf_counter() - started
    table = markdown(results)
    results["markdown"] = table
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(f"\nwall {results['wall_s']:.0f} s; results: {out_path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(
            f"interrupted ({exc or 'Ctrl-C'}); every process started here was stopped",
            file=sys.stderr,
        )
        sys.exit(130)
