"""Home Assistant's voice path through llmux (issue 13): Wyoming and the Ollama API, measured.

    python bench/voice.py [--repeats 20] [--cold-repeats 5] [--out bench/results]
    python bench/voice.py --ha-whisper-arg=--compute-type=int8 --ha-whisper-arg=--cpu-threads=2

Needs the ``engines`` extra (the built-in default stack) and, for part 1's baselines, the two
servers Home Assistant users run today, installed for the bench only (they are not llmux
dependencies; their pins agree with llmux's, so a plain install works; add ``--no-deps`` if they
ever fight):

    pip install wyoming-piper==2.5.2 wyoming-faster-whisper==3.8.1

Without them part 1 measures llmux alone and says so (``"skipped"`` in the JSON, a line in the
tables). Everything runs offline (``HF_HUB_OFFLINE=1``); the baselines get the very model files
llmux's packaged models resolve to (``llmux.engines.packaged.resolve_model``).

One ``llmux serve`` runs the built-in default stack (``--print-config``) plus a ``wyoming:``
section on free ports. Every sample alternates the sides and flips their order each time.

1. **Against today's servers.** TTS: "Please turn on the kitchen lights." over Wyoming
   (``synthesize``), from connecting to the first ``audio-chunk``: wyoming-piper with
   en_US-joe-medium vs llmux's TTS port with the voice warm; then llmux cold (the voice unloaded
   with ``POST /models/joe/unload`` before each sample, so the request loads it). ASR: that
   sentence's audio (synthesized once by llmux, resampled to 16 kHz 16-bit mono), sent as
   ``transcribe``, ``audio-start``, 100 ms ``audio-chunk`` events paced in real time (as a
   microphone does) and ``audio-stop``; the time from ``audio-stop`` to the ``transcript``:
   wyoming-faster-whisper with Whisper tiny.en vs llmux's ASR port.
2. **A voice turn.** Wyoming + Ollama API: transcribe the clip over Wyoming (the 100 ms chunks sent
   at once, since the OpenAI side uploads the whole file too), ``/api/chat`` streamed with the
   ``ollama`` client until the answer's first sentence is complete, then that sentence over
   Wyoming to its first audio chunk. OpenAI routes: the same with the ``openai`` SDK
   (``audio.transcriptions``, ``chat.completions`` streamed, ``audio.speech`` streamed as ``wav``
   to its first audio byte). Same models (``whisper``, ``smollm2``, ``joe``), ``temperature 0``,
   ``seed 0``, 32 tokens at most, so both sides get the same answer (recorded). The chat stream is
   read to its end before the TTS starts, and the time after the first sentence is not counted:
   ``total = asr + first sentence + tts first chunk``. Goal: Wyoming + Ollama adds at most 30 ms
   (p50 of the paired differences).

Writes ``voice-<date>.json`` (command, machine, versions, load averages, every sample, the texts)
and ``voice-<date>.md`` (the tables) to ``--out``, and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import wave
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import yaml

from llmux.backends.process import free_port, parent_death_preexec
from llmux.engines.packaged import resolve_model

with warnings.catch_warnings():
    # wyoming.audio imports audioop, deprecated since Python 3.11: import it once, quietly.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize, SynthesizeVoice

ROOT = Path(__file__).resolve().parent.parent
KITCHEN = "Please turn on the kitchen lights."
SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."
ASR_RATE = 16000
CHUNK_BYTES = ASR_RATE * 2 // 10  # 100 ms of 16 kHz 16-bit mono
MAX_TOKENS = 32
TIMEOUT = 120.0
"""Seconds for one answer (a cold voice load on a busy 2-core box included)."""
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
HA_PIPS = {"wyoming-piper": "2.5.2", "wyoming-faster-whisper": "3.8.1"}
HA_MODULES = {"wyoming-piper": "wyoming_piper", "wyoming-faster-whisper": "wyoming_faster_whisper"}


class BenchError(Exception):
    """A server answered something other than what the bench needs."""


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
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


@dataclass
class Procs:
    """Every process this script starts, each in its own group with a parent-death signal."""

    log_dir: Path
    live: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Proc:
        log_path = self.log_dir / f"{len(self.live):02d}-{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
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

    def stop_all(self) -> None:
        for proc in reversed(self.live):
            proc.stop()
        self.live.clear()


async def wait_tcp(proc: Proc, port: int, timeout: float = 180.0) -> None:
    """Until ``port`` accepts a connection (and answers Wyoming's ``describe``)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        with contextlib.suppress(OSError, BenchError, TimeoutError):
            await describe(port)
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name}: port {port} not up after {timeout} s")
        await asyncio.sleep(0.1)


async def wait_http(proc: Proc, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited:\n{proc.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"{url} not up after {timeout} s")
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- Wyoming clients


async def _read(client: AsyncTcpClient) -> Any:
    event = await asyncio.wait_for(client.read_event(), TIMEOUT)
    if event is None:
        raise BenchError("the server closed the connection")
    if Error.is_type(event.type):
        raise BenchError(f"Wyoming error: {Error.from_event(event)}")
    return event


async def describe(port: int) -> Info:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        while True:
            event = await asyncio.wait_for(_read(client), 5)
            if Info.is_type(event.type):
                return Info.from_event(event)


@dataclass
class Spoken:
    first_s: float
    total_s: float
    rate: int
    pcm: bytes


async def wy_synthesize(port: int, text: str, voice: str) -> Spoken:
    """``synthesize`` over a new connection; times from connecting to the first audio chunk."""
    start = time.perf_counter()
    first = None
    pcm = bytearray()
    rate = 0
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
        while True:
            event = await _read(client)
            if AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                if first is None:
                    first = time.perf_counter() - start
                if chunk.width != 2 or chunk.channels != 1:
                    raise BenchError(f"unexpected audio format {chunk}")
                pcm += chunk.audio
                rate = chunk.rate
            elif AudioStop.is_type(event.type):
                break
    if first is None:
        raise BenchError(f"no audio for {text!r} from port {port}")
    return Spoken(first, time.perf_counter() - start, rate, bytes(pcm))


@dataclass
class Heard:
    latency_s: float
    """From the start (``audio-stop`` for ASR alone, connecting for a turn) to the transcript."""
    text: str


async def wy_transcribe(port: int, pcm16k: bytes, *, realtime: bool) -> Heard:
    """``transcribe`` then the audio in 100 ms chunks (paced in real time if ``realtime``).

    ``realtime``: timed from ``audio-stop``; else from connecting (the whole request)."""
    start = time.perf_counter()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=ASR_RATE, width=2, channels=1).event())
        paced = time.perf_counter()
        for i, at in enumerate(range(0, len(pcm16k), CHUNK_BYTES)):
            audio = pcm16k[at : at + CHUNK_BYTES]
            await client.write_event(
                AudioChunk(rate=ASR_RATE, width=2, channels=1, audio=audio).event()
            )
            if realtime:
                await asyncio.sleep(max(0.0, paced + (i + 1) * 0.1 - time.perf_counter()))
        if realtime:
            start = time.perf_counter()
        await client.write_event(AudioStop().event())
        while True:
            event = await _read(client)
            if Transcript.is_type(event.type):
                return Heard(time.perf_counter() - start, Transcript.from_event(event).text)


# --------------------------------------------------------------------------- the voice turn


@dataclass
class Turn:
    asr_s: float
    first_token_s: float
    first_sentence_s: float
    tts_first_s: float
    transcript: str
    answer: str
    sentence: str

    @property
    def total_s(self) -> float:
        return self.asr_s + self.first_sentence_s + self.tts_first_s


def chat_messages(transcript: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": transcript}]


def first_sentence(text: str) -> str | None:
    match = SENTENCE_END.search(text)
    return text[: match.end()].strip() if match else None


class SentenceClock:
    """Times the first token and the first complete sentence of a streamed answer."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.text = ""
        self.first_token: float | None = None
        self.sentence: str | None = None
        self.sentence_at: float | None = None

    def add(self, piece: str | None) -> None:
        if not piece:
            return
        now = time.perf_counter() - self.start
        if self.first_token is None:
            self.first_token = now
        self.text += piece
        if self.sentence is None:
            self.sentence = first_sentence(self.text)
            if self.sentence is not None:
                self.sentence_at = now

    def finish(self) -> tuple[float, float, str]:
        end = time.perf_counter() - self.start
        if self.first_token is None or not self.text.strip():
            raise BenchError("the chat answered no text")
        if self.sentence is None or self.sentence_at is None:  # no full stop: the whole answer
            self.sentence, self.sentence_at = self.text.strip(), end
        return self.first_token, self.sentence_at, self.sentence


@dataclass
class Stack:
    """The one ``llmux serve`` and its clients."""

    base: str
    asr_port: int
    tts_port: int
    ollama: ollama.AsyncClient
    openai: openai.AsyncOpenAI
    wav16k: bytes
    pcm16k: bytes


async def turn_wyoming_ollama(stack: Stack) -> Turn:
    heard = await wy_transcribe(stack.asr_port, stack.pcm16k, realtime=False)
    clock = SentenceClock()
    stream = await stack.ollama.chat(
        model="smollm2",
        messages=chat_messages(heard.text),
        stream=True,
        options={"temperature": 0, "seed": 0, "num_predict": MAX_TOKENS},
    )
    async for part in stream:
        clock.add(part.message.content)
    first_token, sentence_at, sentence = clock.finish()
    spoken = await wy_synthesize(stack.tts_port, sentence, "joe")
    return Turn(
        heard.latency_s, first_token, sentence_at, spoken.first_s, heard.text, clock.text, sentence
    )


async def turn_openai(stack: Stack) -> Turn:
    start = time.perf_counter()
    heard = await stack.openai.audio.transcriptions.create(
        model="whisper", file=("clip.wav", stack.wav16k, "audio/wav"), language="en"
    )
    asr = time.perf_counter() - start
    clock = SentenceClock()
    stream = await stack.openai.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": heard.text},
        ],
        stream=True,
        temperature=0,
        seed=0,
        max_tokens=MAX_TOKENS,
    )
    async for chunk in stream:
        if chunk.choices:
            clock.add(chunk.choices[0].delta.content)
    first_token, sentence_at, sentence = clock.finish()
    start = time.perf_counter()
    tts_first = None
    got = 0
    async with stack.openai.audio.speech.with_streaming_response.create(
        model="joe", voice="alloy", input=sentence, response_format="wav"
    ) as resp:
        async for piece in resp.iter_bytes():
            got += len(piece)
            if tts_first is None and got > 44:  # past the WAV header: real audio
                tts_first = time.perf_counter() - start
    if tts_first is None:
        raise BenchError("the speech answer held no audio")
    return Turn(asr, first_token, sentence_at, tts_first, heard.text, clock.text, sentence)


# --------------------------------------------------------------------------- statistics


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def paired(a: list[float], b: list[float]) -> float:
    """Median of the per-sample differences a - b, in ms."""
    return statistics.median(x - y for x, y in zip(a, b, strict=True)) * 1000


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000


async def alternate(
    repeats: int,
    warmup: int,
    sides: dict[str, Callable[[], Awaitable[Any]]],
) -> dict[str, list[Any]]:
    """``repeats`` samples of every side, alternating, the order flipped every sample; the first
    ``warmup`` rounds are dropped."""
    names = list(sides)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            result = await sides[name]()
            if i >= warmup:
                out[name].append(result)
        print(f"  {i + 1 - warmup}/{repeats}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


@contextlib.contextmanager
def section(results: dict[str, Any], name: str) -> Iterator[None]:
    print(f"[{name}]", file=sys.stderr, flush=True)
    before = os.getloadavg()
    start = time.perf_counter()
    yield
    results["sections"][name] = {
        "wall_s": round(time.perf_counter() - start, 1),
        "loadavg_before": [round(x, 2) for x in before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- setup


def audio_16k(pcm: bytes, rate: int) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        converted, _ = audioop.ratecv(pcm, 2, 1, rate, ASR_RATE, None)
    return converted


def wav_of(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return buf.getvalue()


def ha_available() -> dict[str, str | None]:
    """Each baseline server: None if usable, else why not."""
    why: dict[str, str | None] = {}
    for pip, module in HA_MODULES.items():
        try:
            version = importlib.metadata.version(pip)
        except importlib.metadata.PackageNotFoundError:
            why[pip] = f"not installed: pip install {pip}=={HA_PIPS[pip]}"
            continue
        if importlib.util.find_spec(module) is None:
            why[pip] = f"{pip} {version} is installed but {module} cannot be imported"
        elif version != HA_PIPS[pip]:
            why[pip] = None
            print(f"note: {pip} {version}, not {HA_PIPS[pip]}", file=sys.stderr)
        else:
            why[pip] = None
    return why


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for pkg in (
        "llmux",
        "wyoming",
        "ollama",
        "openai",
        "faster-whisper",
        "ctranslate2",
        "piper-tts",
        "onnxruntime",
        "llama-cpp-python",
        *HA_PIPS,
    ):
        try:
            found[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            found[pkg] = None
    return found


def machine() -> dict[str, Any]:
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
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "git_dirty_src": run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]) != "",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def llmux_config(work: Path, port: int, asr_port: int, tts_port: int) -> Path:
    printed = subprocess.run(
        [sys.executable, "-m", "llmux", "serve", "--print-config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = yaml.safe_load(printed)
    config.setdefault("server", {})["port"] = port
    config["wyoming"] = {"asr": {"whisper": asr_port}, "tts": tts_port}
    path = work / "llmux.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace, procs: Procs, results: dict[str, Any]) -> None:
    port, asr_port, tts_port = free_port(), free_port(), free_port()
    config = llmux_config(procs.log_dir, port, asr_port, tts_port)
    results["llmux_config"] = config.read_text()
    base = f"http://127.0.0.1:{port}"
    llmux = procs.start("llmux", [sys.executable, "-m", "llmux", "serve", "--config", str(config)])
    skipped = ha_available() if not args.no_baselines else dict.fromkeys(HA_PIPS, "--no-baselines")
    results["baselines_skipped"] = {k: v for k, v in skipped.items() if v}
    baseline_ports: dict[str, int] = {}
    data_dir = procs.log_dir / "data"
    data_dir.mkdir()
    if not skipped["wyoming-piper"]:
        voice = resolve_model("piper", "en_US-joe-medium")
        baseline_ports["wyoming-piper"] = free_port()
        argv = [
            sys.executable,
            "-m",
            "wyoming_piper",
            "--uri",
            f"tcp://127.0.0.1:{baseline_ports['wyoming-piper']}",
            "--voice",
            "en_US-joe-medium",
            "--data-dir",
            str(voice.parent),
            "--download-dir",
            str(data_dir),
            *args.ha_piper_arg,
        ]
        results["baseline_commands"] = {"wyoming-piper": shlex.join(argv)}
        procs.start("wyoming-piper", argv)
    if not skipped["wyoming-faster-whisper"]:
        model = resolve_model("faster-whisper", "whisper-tiny.en")
        baseline_ports["wyoming-faster-whisper"] = free_port()
        argv = [
            sys.executable,
            "-m",
            "wyoming_faster_whisper",
            "--uri",
            f"tcp://127.0.0.1:{baseline_ports['wyoming-faster-whisper']}",
            "--model",
            str(model),
            "--language",
            "en",
            "--data-dir",
            str(data_dir),
            "--local-files-only",
            *args.ha_whisper_arg,
        ]
        results.setdefault("baseline_commands", {})["wyoming-faster-whisper"] = shlex.join(argv)
        procs.start("wyoming-faster-whisper", argv)

    with section(results, "start"):
        await wait_http(llmux, base + "/health")
        await wait_tcp(llmux, asr_port)
        await wait_tcp(llmux, tts_port)
        for proc in procs.live[1:]:
            await wait_tcp(proc, baseline_ports[proc.name])
        infos = {"llmux-asr": await describe(asr_port), "llmux-tts": await describe(tts_port)}
        infos.update({name: await describe(p) for name, p in baseline_ports.items()})
        results["describe"] = {k: v.to_dict() for k, v in infos.items()}
        # The clip: the sentence in llmux's voice, 16 kHz 16-bit mono (what Home Assistant sends).
        spoken = await wy_synthesize(tts_port, KITCHEN, "joe")
        pcm16k = audio_16k(spoken.pcm, spoken.rate)
        results["clip"] = {"text": KITCHEN, "seconds": round(len(pcm16k) / 2 / ASR_RATE, 3)}

    async with (
        httpx.AsyncClient(timeout=TIMEOUT) as admin,
        openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", timeout=TIMEOUT) as oai,
    ):
        stack = Stack(
            base,
            asr_port,
            tts_port,
            ollama.AsyncClient(host=base, timeout=TIMEOUT),
            oai,
            wav_of(pcm16k, ASR_RATE),
            pcm16k,
        )
        tables: dict[str, Any] = {}
        results["tables"] = tables

        # ---- 1a. TTS first chunk
        with section(results, "tts"):
            sides: dict[str, Callable[[], Awaitable[Any]]] = {
                "llmux": lambda: wy_synthesize(tts_port, KITCHEN, "joe")
            }
            if "wyoming-piper" in baseline_ports:
                bp = baseline_ports["wyoming-piper"]
                sides["wyoming-piper"] = lambda: wy_synthesize(bp, KITCHEN, "en_US-joe-medium")
            tts = await alternate(args.repeats, 1, sides)
            cold: list[Spoken] = []
            for i in range(args.cold_repeats):
                reply = await admin.post(base + "/models/joe/unload")
                reply.raise_for_status()
                cold.append(await wy_synthesize(tts_port, KITCHEN, "joe"))
                print(f"  cold {i + 1}/{args.cold_repeats}", end="\r", file=sys.stderr)
            print(file=sys.stderr)
        results["samples"] = {
            "tts_first_s": {k: [s.first_s for s in v] for k, v in tts.items()},
            "tts_total_s": {k: [s.total_s for s in v] for k, v in tts.items()},
            "tts_cold_first_s": [s.first_s for s in cold],
            "tts_cold_total_s": [s.total_s for s in cold],
        }
        results["tts_audio_seconds"] = {
            k: round(len(v[0].pcm) / 2 / v[0].rate, 3) for k, v in tts.items()
        }

        # ---- 1b. ASR after audio-stop
        with section(results, "asr"):
            asr_sides: dict[str, Callable[[], Awaitable[Any]]] = {
                "llmux": lambda: wy_transcribe(asr_port, pcm16k, realtime=not args.fast_audio)
            }
            if "wyoming-faster-whisper" in baseline_ports:
                wp = baseline_ports["wyoming-faster-whisper"]
                asr_sides["wyoming-faster-whisper"] = lambda: wy_transcribe(
                    wp, pcm16k, realtime=not args.fast_audio
                )
            asr = await alternate(args.repeats, 1, asr_sides)
        results["samples"]["asr_after_stop_s"] = {
            k: [h.latency_s for h in v] for k, v in asr.items()
        }
        results["transcripts"] = {k: sorted({h.text for h in v}) for k, v in asr.items()}

        # ---- 2. the voice turn
        with section(results, "turn"):
            turns = await alternate(
                args.repeats,
                1,
                {
                    "wyoming+ollama": lambda: turn_wyoming_ollama(stack),
                    "openai": lambda: turn_openai(stack),
                },
            )
        results["samples"]["turn"] = {
            side: {
                part: [getattr(t, part) for t in v]
                for part in ("asr_s", "first_token_s", "first_sentence_s", "tts_first_s", "total_s")
            }
            for side, v in turns.items()
        }
        results["turn_texts"] = {
            side: sorted({json.dumps([t.transcript, t.answer, t.sentence]) for t in v})
            for side, v in turns.items()
        }
        status = (await admin.get(base + "/status")).json()
        results["llmux_models_after"] = {m["id"]: m.get("state") for m in status.get("models", [])}
        metrics = (await admin.get(base + "/metrics")).text
        results["wyoming_requests_metric"] = [
            line for line in metrics.splitlines() if 'endpoint="wyoming"' in line
        ][:10]


def summarize(results: dict[str, Any]) -> None:
    s = results["samples"]
    summary: dict[str, Any] = {}
    tts_first = s["tts_first_s"]
    summary["tts_first_chunk_ms"] = {k: round(ms(v), 1) for k, v in tts_first.items()}
    summary["tts_first_chunk_p90_ms"] = {k: round(p90(v), 1) for k, v in tts_first.items()}
    if s["tts_cold_first_s"]:
        summary["tts_cold_first_chunk_ms"] = round(ms(s["tts_cold_first_s"]), 1)
    asr = s["asr_after_stop_s"]
    summary["asr_after_stop_ms"] = {k: round(ms(v), 1) for k, v in asr.items()}
    summary["asr_after_stop_p90_ms"] = {k: round(p90(v), 1) for k, v in asr.items()}
    if "wyoming-piper" in tts_first:
        summary["tts_llmux_minus_piper_paired_ms"] = round(
            paired(tts_first["llmux"], tts_first["wyoming-piper"]), 1
        )
        summary["tts_ratio_llmux_over_piper"] = round(
            ms(tts_first["llmux"]) / ms(tts_first["wyoming-piper"]), 3
        )
    if "wyoming-faster-whisper" in asr:
        summary["asr_llmux_minus_wfw_paired_ms"] = round(
            paired(asr["llmux"], asr["wyoming-faster-whisper"]), 1
        )
        summary["asr_ratio_llmux_over_wfw"] = round(
            ms(asr["llmux"]) / ms(asr["wyoming-faster-whisper"]), 3
        )
    turn = s["turn"]
    wy, oa = turn["wyoming+ollama"], turn["openai"]
    summary["turn"] = {
        part: {
            "wyoming+ollama_ms": round(ms(wy[part]), 1),
            "openai_ms": round(ms(oa[part]), 1),
            "median_diff_ms": round(ms(wy[part]) - ms(oa[part]), 1),
            "paired_diff_ms": round(paired(wy[part], oa[part]), 1),
            "wyoming+ollama_p90_ms": round(p90(wy[part]), 1),
            "openai_p90_ms": round(p90(oa[part]), 1),
            "ratio": round(ms(wy[part]) / ms(oa[part]), 3),
        }
        for part in wy
    }
    added = summary["turn"]["total_s"]["paired_diff_ms"]
    summary["goal_turn_added_ms"] = {"value": added, "limit": 30.0, "pass": added <= 30.0}
    results["summary"] = summary


def markdown(results: dict[str, Any]) -> str:
    m, v, summ = results["machine"], results["versions"], results["summary"]
    s = results["samples"]
    loads = [x["loadavg_before"][0] for x in results["sections"].values()]
    loads += [x["loadavg_after"][0] for x in results["sections"].values()]
    out = [
        "# Voice over Wyoming + the Ollama API (issue 13)",
        "",
        f"`{results['command']}`, {results['date']}, {m['nproc']} CPUs ({m['cpu']}), "
        f"Python {m['python']}, llmux at `{m['git_commit']}`"
        + (" (src modified)" if m["git_dirty_src"] else "")
        + f"; wyoming {v['wyoming']}, ollama {v['ollama']}, openai {v['openai']}, "
        f"faster-whisper {v['faster-whisper']}, piper-tts {v['piper-tts']}, "
        f"wyoming-piper {v['wyoming-piper']}, wyoming-faster-whisper "
        f"{v['wyoming-faster-whisper']}. {results['repeats']} samples per side, alternating; "
        f"times in ms, medians. 1-min load average during the run: "
        f"{min(loads):.1f} to {max(loads):.1f}. Wall time {results['wall_s']:.0f} s.",
        "",
    ]
    for name, why in results["baselines_skipped"].items():
        out += [f"**{name} skipped**: {why}.", ""]
    out += [
        "## 1. Against the servers Home Assistant users run today",
        "",
        f'TTS: "{KITCHEN}" over Wyoming, connect to first `audio-chunk`.',
        "",
        "| server | first chunk p50 | p90 | whole audio p50 |",
        "|---|---:|---:|---:|",
    ]
    for k, vals in s["tts_first_s"].items():
        label = "llmux, voice warm" if k == "llmux" else f"{k} {v.get(k)}"
        out.append(
            f"| {label} | {ms(vals):.0f} | {p90(vals):.0f} | {ms(s['tts_total_s'][k]):.0f} |"
        )
    if s["tts_cold_first_s"]:
        cold = s["tts_cold_first_s"]
        out.append(
            f"| llmux, cold (voice unloaded first; {len(cold)} samples) | {ms(cold):.0f} | "
            f"{p90(cold):.0f} | {ms(s['tts_cold_total_s']):.0f} |"
        )
    if "tts_llmux_minus_piper_paired_ms" in summ:
        out += [
            "",
            f"llmux warm - wyoming-piper, paired: {summ['tts_llmux_minus_piper_paired_ms']:+.0f} "
            f"ms; ratio {summ['tts_ratio_llmux_over_piper']:.2f}.",
        ]
    out += [
        "",
        f"ASR: the clip ({results['clip']['seconds']} s, 16 kHz 16-bit mono) in 100 ms chunks"
        + (" sent at once" if results["fast_audio"] else " paced in real time")
        + ", `audio-stop` to `transcript`.",
        "",
        "| server | p50 | p90 | transcript |",
        "|---|---:|---:|---|",
    ]
    for k, vals in s["asr_after_stop_s"].items():
        label = "llmux" if k == "llmux" else f"{k} {v.get(k)}"
        text = " / ".join(results["transcripts"][k])
        out.append(f"| {label} | {ms(vals):.0f} | {p90(vals):.0f} | {text} |")
    if "asr_llmux_minus_wfw_paired_ms" in summ:
        out += [
            "",
            f"llmux - wyoming-faster-whisper, paired: "
            f"{summ['asr_llmux_minus_wfw_paired_ms']:+.0f} ms; ratio "
            f"{summ['asr_ratio_llmux_over_wfw']:.2f}.",
        ]
    goal = summ["goal_turn_added_ms"]
    out += [
        "",
        "## 2. A voice turn: Wyoming + Ollama API vs llmux's OpenAI routes",
        "",
        "ASR (whole request), then the chat streamed to its first full sentence, then that "
        "sentence's first audio; total = the three.",
        "",
        "| part | Wyoming + Ollama | OpenAI routes | difference of medians | paired difference "
        "| ratio | p90 Wyoming + Ollama | p90 OpenAI |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for part, row in summ["turn"].items():
        out.append(
            f"| {part.removesuffix('_s')} | {row['wyoming+ollama_ms']:.0f} | "
            f"{row['openai_ms']:.0f} | {row['median_diff_ms']:+.1f} | "
            f"{row['paired_diff_ms']:+.1f} | {row['ratio']:.2f} | "
            f"{row['wyoming+ollama_p90_ms']:.0f} | {row['openai_p90_ms']:.0f} |"
        )
    out += [
        "",
        f"**Goal: Wyoming + Ollama adds at most 30 ms (p50, the median of the paired "
        f"differences of the totals): {goal['value']:+.1f} ms, "
        f"{'met' if goal['pass'] else 'NOT met'}.**",
        "",
        "Texts (transcript, answer, first sentence): "
        + "; ".join(f"{k}: {' | '.join(t)}" for k, t in results["turn_texts"].items()),
        "",
    ]
    return "\n".join(out)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20, help="samples per side (default 20)")
    ap.add_argument("--cold-repeats", type=int, default=5, help="cold TTS samples (default 5)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument(
        "--fast-audio", action="store_true", help="send the ASR audio at once, not in real time"
    )
    ap.add_argument(
        "--no-baselines", action="store_true", help="skip wyoming-piper / wyoming-faster-whisper"
    )
    ap.add_argument(
        "--ha-piper-arg", action="append", default=[], help="an extra wyoming-piper argument"
    )
    ap.add_argument(
        "--ha-whisper-arg",
        action="append",
        default=[],
        help="an extra wyoming-faster-whisper argument (e.g. --ha-whisper-arg=--cpu-threads=2)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, config)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.cold_repeats < 0:
        ap.error("--repeats must be >= 1 and --cold-repeats >= 0")
    os.environ["HF_HUB_OFFLINE"] = "1"
    signal.signal(signal.SIGTERM, _terminate)

    work = Path(tempfile.mkdtemp(prefix="llmux-voice-"))
    procs = Procs(work)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "bench/voice.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "versions": versions(),
        "repeats": args.repeats,
        "cold_repeats": args.cold_repeats,
        "fast_audio": args.fast_audio,
        "sections": {},
    }
    start = time.perf_counter()
    try:
        asyncio.run(run(args, procs, results))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        for proc in procs.live:
            print(f"--- {proc.name} log tail:\n{proc.log_tail()}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if args.keep:
            print(f"scratch folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summarize(results)
    text = markdown(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    (out / f"voice-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"voice-{stamp}.md").write_text(text)
    print(text)
    print(f"results: {out / f'voice-{stamp}.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
