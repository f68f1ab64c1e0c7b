"""Wyoming, Home Assistant's voice protocol: speech to text and text to speech over TCP.

``wyoming:`` in the config (``llmux.config.WyomingConfig``) gives each ASR model a port and all
TTS models one port. Each connection is one ``AsyncEventHandler`` (the ``wyoming`` package's) that
answers the protocol's events:

- ``describe`` -> ``info``: on an ASR port its model (languages from the engine: an English-only
  Whisper says ``["en"]``); on the TTS port every TTS model as a voice named by its model id, a
  multi-speaker voice's speakers both as its ``speakers`` and as voices ``model:speaker``.
- ``transcribe`` + ``audio-start`` / ``audio-chunk``... / ``audio-stop`` -> ``transcript``. The
  audio, in any rate, width (1-4 bytes) and channels (1 or 2), is converted to 16 kHz 16-bit mono
  as it arrives; at ``audio-stop`` a lease is taken on the port's model (loaded on demand, tier and
  queue rules as for HTTP) and the audio goes to the child's ``/v1/audio/transcriptions`` as a WAV.
- ``synthesize`` -> ``audio-start`` / ``audio-chunk``... / ``audio-stop``: the child's
  ``/v1/audio/speech`` answer (``wav``, streamed) goes out chunk by chunk as it arrives, 16-bit
  PCM at the voice's own rate, so the first chunk leaves after the first sentence.
- ``synthesize-start`` / ``synthesize-chunk``... / ``synthesize-stop``: the text arrives in pieces;
  each sentence is spoken as soon as it is complete (its own ``audio-start`` ... ``audio-stop``),
  then ``synthesize-stopped``. A ``synthesize`` inside such a stream (Home Assistant sends the
  whole text again, for older servers) is ignored.

Each transcription, synthesis or synthesis stream is one request for the metrics
(``llmux_requests_total{endpoint="wyoming"}``); each child request holds a lease, so it shows in
``/status`` in flight and its loads in ``/events``. A failure is an ``error`` event whose ``code``
is llmux's (or the engine's) error code, as over HTTP; the connection is then closed (Home
Assistant's client ignores ``error`` events and would otherwise wait for an answer that never
comes). A client that hangs up mid-request has its request cancelled: the engine is told to stop
(``/llmux/cancel/{id}``, as the relay does) and the lease is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ipaddress
import json
import logging
import re
import socket
import time
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

from llmux import __version__
from llmux.api.relay import UpstreamRoute, stop_work
from llmux.config import Config, ModelConfig, WyomingConfig
from llmux.errors import (
    BodyTooLarge,
    EngineError,
    InvalidAudio,
    InvalidRequest,
    LlmuxError,
    ModelNotFound,
    UnsupportedModel,
    UpstreamError,
)
from llmux.observe import Observer
from llmux.scheduling.runtime import Lease, Scheduler

with warnings.catch_warnings():
    # wyoming.audio imports the standard library's audioop, deprecated since Python 3.11 (removed
    # in 3.13, where wyoming falls back to its own copy). Imported here, once, without the warning.
    warnings.simplefilter("ignore", DeprecationWarning)
    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
    from wyoming.error import Error
    from wyoming.event import Event
    from wyoming.info import (
        AsrModel,
        AsrProgram,
        Attribution,
        Describe,
        Info,
        TtsProgram,
        TtsVoice,
        TtsVoiceSpeaker,
    )
    from wyoming.ping import Ping, Pong
    from wyoming.server import AsyncEventHandler
    from wyoming.tts import (
        Synthesize,
        SynthesizeChunk,
        SynthesizeStart,
        SynthesizeStop,
        SynthesizeStopped,
        SynthesizeVoice,
    )
    from wyoming.version import __version__ as WYOMING_VERSION

log = logging.getLogger("llmux.wyoming")

T = TypeVar("T")

ENDPOINT = "wyoming"
"""The ``endpoint`` label of Wyoming requests in ``llmux_requests_total``."""
ASR_RATE = 16_000
"""Whisper's rate: audio for transcription is converted to 16 kHz 16-bit mono."""
SAMPLES_PER_CHUNK = 1024
"""Frames per ``audio-chunk`` sent (wyoming-piper's default), at most."""
MAX_LINE = 64 * 1024
"""Longest event header line, bytes."""
MAX_DATA = 1024 * 1024
"""Largest ``data`` block of an event, bytes."""
MAX_PAYLOAD = 16 * 1024 * 1024
"""Largest payload (one audio chunk) of an event, bytes."""
MAX_WAV_HEADER = 64 * 1024
"""Longest WAV header (its chunks before ``data``) accepted from a TTS child, bytes."""
QUEUE_EVENTS = 256
"""Events read ahead of the one being handled (the reader also notices a hang-up)."""
MIN_RATE, MAX_RATE = 1000, 384_000
ZEROCONF_TYPE = "_wyoming._tcp.local."
LLMUX = "llmux"
LLMUX_ATTRIBUTION = Attribution(name="llmux", url="")
"""llmux has no public home page to point at; an empty url says so honestly."""


# --------------------------------------------------------------------------- failures


@dataclass
class _Failure(Exception):
    """What goes back as a Wyoming ``error`` event: the status (for the metrics), the code."""

    status: int
    code: str
    text: str
    counted: bool = False
    """Already counted in the request metrics (by the request it ended)."""

    @classmethod
    def of(cls, exc: LlmuxError) -> _Failure:
        return cls(exc.status, exc.code or exc.type, exc.message)


class _Gone(Exception):
    """The client hung up; its request was cancelled."""


# --------------------------------------------------------------------------- reading events


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """One event, or None at the end of the stream. Limits what one event may make llmux
    buffer (the ``wyoming`` package's reader trusts the lengths it is sent); a malformed or
    oversized event raises ``_Failure``."""
    try:
        line = await reader.readline()
    except ValueError:  # longer than the reader's limit
        raise _Failure.of(
            InvalidRequest(f"an event header is longer than {MAX_LINE} bytes")
        ) from None
    if not line:
        return None
    if not line.endswith(b"\n"):
        return None  # cut by the hang-up
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise _Failure.of(InvalidRequest("an event header is not a JSON object")) from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise _Failure.of(InvalidRequest("an event header needs a string 'type'"))
    data = header.get("data") or {}
    data_length = _length(header, "data_length", MAX_DATA)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD)
    try:
        if data_length:
            extra = orjson.loads(await reader.readexactly(data_length))
            if not isinstance(extra, dict) or not isinstance(data, dict):
                raise _Failure.of(InvalidRequest("an event's data must be a JSON object"))
            data = {**data, **extra}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    except orjson.JSONDecodeError:
        raise _Failure.of(InvalidRequest("an event's data is not JSON")) from None
    if not isinstance(data, dict):
        raise _Failure.of(InvalidRequest("an event's data must be a JSON object"))
    return Event(type=header["type"], data=data, payload=payload)


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Failure.of(InvalidRequest(f"'{key}' must be a non-negative integer"))
    if value > limit:
        raise _Failure.of(BodyTooLarge(f"'{key}' is {value} bytes; the limit is {limit}"))
    return value


def encode_event(event: Event) -> bytes:
    """An event as the protocol frames it: a JSON header line, the data block, the payload."""
    header: dict[str, Any] = {"type": event.type, "version": WYOMING_VERSION}
    data = orjson.dumps(event.data) if event.data else b""
    if data:
        header["data_length"] = len(data)
    payload = event.payload or b""
    if payload:
        header["payload_length"] = len(payload)
    return orjson.dumps(header) + b"\n" + data + payload


# --------------------------------------------------------------------------- describe


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _model_path(spec: ModelConfig) -> Path | None:
    """The model's file or folder on disk (a path, or a packaged model), if it can be found."""
    if spec.engine is None or spec.model is None:
        return None
    from llmux.engines.packaged import resolve_model

    try:
        return resolve_model(spec.engine, spec.model)
    except EngineError:
        return None


def _description(model_id: str, spec: ModelConfig) -> str:
    from llmux.engines.packaged import PACKAGED_MODELS

    packaged = PACKAGED_MODELS.get(spec.model or "")
    if packaged is not None:
        return packaged.description
    if spec.engine is not None:
        return f"{spec.model} ({spec.engine})"
    return f"{model_id} (an external server)"


def whisper_languages(spec: ModelConfig) -> list[str]:
    """What a faster-whisper model understands: ``["en"]`` for an English-only Whisper (its
    vocabulary has 51,864 tokens; a multilingual one 51,865 or more, as OpenAI's whisper decides),
    else every language the engine takes. Unknown (no engine, model not found): none."""
    if spec.engine != "faster-whisper":
        return []
    path = _model_path(spec)
    if path is None:
        return []
    from llmux.engines.whisper import LANGUAGES

    multilingual: bool | None = None
    vocabulary = path / "vocabulary.txt"
    vocabulary_json = path / "vocabulary.json"
    with contextlib.suppress(OSError, ValueError):
        if vocabulary.is_file():
            with vocabulary.open("rb") as f:
                multilingual = sum(1 for _ in f) >= 51865
        elif vocabulary_json.is_file():
            multilingual = len(json.loads(vocabulary_json.read_text("utf-8"))) >= 51865
    if multilingual is None:
        multilingual = not re.search(r"\.en\b", str(spec.model))
    return sorted(LANGUAGES) if multilingual else ["en"]


@dataclass(frozen=True)
class VoiceFacts:
    languages: list[str]
    speakers: list[str]


def piper_voice(spec: ModelConfig) -> VoiceFacts:
    """A Piper voice's language (its ``.onnx.json``: ``language.code``) and speaker names."""
    path = _model_path(spec)
    if spec.engine != "piper" or path is None:
        return VoiceFacts([], [])
    config = spec.args.get("config") or f"{path}.json"
    try:
        voice = json.loads(Path(config).read_text("utf-8"))
    except (OSError, ValueError):
        return VoiceFacts([], [])
    language = voice.get("language") if isinstance(voice, dict) else None
    code = language.get("code") if isinstance(language, dict) else None
    speakers = voice.get("speaker_id_map") if isinstance(voice, dict) else None
    names = [str(s) for s in speakers] if isinstance(speakers, dict) else []
    return VoiceFacts([code] if isinstance(code, str) else [], names)


def _engine_attribution(spec: ModelConfig) -> tuple[Attribution, str | None]:
    if spec.engine == "faster-whisper":
        return Attribution(
            name="OpenAI Whisper, run by faster-whisper (SYSTRAN)",
            url="https://github.com/SYSTRAN/faster-whisper",
        ), _package_version("faster-whisper")
    if spec.engine == "piper":
        return Attribution(
            name="Piper (Open Home Foundation)", url="https://github.com/OHF-Voice/piper1-gpl"
        ), _package_version("piper-tts")
    return LLMUX_ATTRIBUTION, None


def asr_info(config: Config, model_id: str) -> Info:
    spec = config.models[model_id]
    attribution, version = _engine_attribution(spec)
    model = AsrModel(
        name=model_id,
        attribution=attribution,
        installed=True,
        description=_description(model_id, spec),
        version=version,
        languages=whisper_languages(spec),
    )
    program = AsrProgram(
        name=LLMUX,
        attribution=LLMUX_ATTRIBUTION,
        installed=True,
        description=f"llmux: speech to text by {model_id}",
        version=__version__,
        models=[model],
        supports_transcript_streaming=False,
    )
    return Info(asr=[program])


def tts_info(config: Config) -> Info:
    voices: list[TtsVoice] = []
    for model_id, spec in config.models.items():
        if spec.type != "tts":
            continue
        attribution, version = _engine_attribution(spec)
        facts = piper_voice(spec)
        description = _description(model_id, spec)
        voices.append(
            TtsVoice(
                name=model_id,
                attribution=attribution,
                installed=True,
                description=description,
                version=version,
                languages=facts.languages,
                speakers=[TtsVoiceSpeaker(name=s) for s in facts.speakers] or None,
            )
        )
        voices.extend(
            TtsVoice(
                name=f"{model_id}:{speaker}",
                attribution=attribution,
                installed=True,
                description=f"{description}, speaker {speaker}",
                version=version,
                languages=facts.languages,
            )
            for speaker in facts.speakers
        )
    program = TtsProgram(
        name=LLMUX,
        attribution=LLMUX_ATTRIBUTION,
        installed=True,
        description="llmux: text to speech",
        version=__version__,
        voices=voices,
        supports_synthesize_streaming=True,
    )
    return Info(tts=[program])


# --------------------------------------------------------------------------- text


_ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "e.g", "i.e", "no", "inc"]
)
_BOUNDARY = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*\s+|\n\s*")


class SentenceSplitter:
    """Text that arrives in pieces, given back sentence by sentence as each completes.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (closing quotes and brackets included)
    followed by white space, or at a line break; a period after a common abbreviation or a
    single letter (an initial) does not end one. A sentence longer than ``max_chars`` is cut
    at its last space before the limit."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self._text = ""

    def add(self, text: str) -> list[str]:
        self._text += text
        out: list[str] = []
        start = 0
        for match in _BOUNDARY.finditer(self._text):
            end = match.end()
            piece = self._text[start:end]
            if match.group().startswith(".") and not match.group().startswith("\n"):
                words = piece[: match.start() - start].split()
                last = words[-1].lower() if words else ""
                if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                    continue
            if piece.strip():
                out.extend(self._cut(piece.strip()))
            start = end
        self._text = self._text[start:]
        while len(self._text) > self.max_chars:
            head, self._text = self._split_at_space(self._text)
            out.append(head)
        return out

    def finish(self) -> list[str]:
        rest, self._text = self._text.strip(), ""
        return self._cut(rest) if rest else []

    def _cut(self, sentence: str) -> list[str]:
        out: list[str] = []
        while len(sentence) > self.max_chars:
            head, sentence = self._split_at_space(sentence)
            out.append(head)
        if sentence:
            out.append(sentence)
        return out

    def _split_at_space(self, text: str) -> tuple[str, str]:
        cut = text.rfind(" ", 1, self.max_chars)
        if cut <= 0:
            cut = self.max_chars
        return text[:cut].strip(), text[cut:].lstrip()


def _speakable(text: str) -> str:
    """Lines joined into one (wyoming-piper does the same)."""
    return " ".join(text.strip().splitlines())


# --------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class AudioFormat:
    rate: int
    width: int
    channels: int

    @classmethod
    def of(cls, data: dict[str, Any]) -> AudioFormat:
        """The format of an ``audio-start`` or ``audio-chunk``; ``invalid_audio`` if it is not
        one llmux converts (rate 1-384 kHz, width 1-4 bytes, mono or stereo)."""
        return cls(
            _integer(data, "rate", MIN_RATE, MAX_RATE),
            _integer(data, "width", 1, 4),
            _integer(data, "channels", 1, 2),
        )


def _integer(data: dict[str, Any], name: str, low: int, high: int) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Failure.of(
            InvalidAudio(f"audio {name} must be an integer from {low} to {high}, not {value!r}")
        )
    return value


class _Recording:
    """The audio of one transcription, converted to 16 kHz 16-bit mono as it arrives."""

    def __init__(self, fmt: AudioFormat, limit: int) -> None:
        self.format = fmt
        self.limit = limit
        self.pcm = bytearray()
        self._converter = AudioChunkConverter(rate=ASR_RATE, width=2, channels=1)

    def add(self, chunk: Event) -> None:
        fmt = AudioFormat.of(chunk.data)
        if fmt != self.format:
            raise _Failure.of(
                InvalidAudio(
                    f"an audio-chunk is {fmt.rate} Hz, {fmt.width} bytes, {fmt.channels} "
                    f"channels; its audio-start said {self.format.rate} Hz, "
                    f"{self.format.width} bytes, {self.format.channels} channels"
                )
            )
        audio = chunk.payload or b""
        frame = fmt.width * fmt.channels
        if len(audio) % frame:
            raise _Failure.of(
                InvalidAudio(
                    f"an audio-chunk of {len(audio)} bytes is not a whole number of "
                    f"{frame}-byte frames"
                )
            )
        if not audio:
            return
        try:
            converted = self._converter.convert(
                AudioChunk(rate=fmt.rate, width=fmt.width, channels=fmt.channels, audio=audio)
            )
        except Exception as exc:  # audioop's error: audio it cannot convert
            raise _Failure.of(
                InvalidAudio(f"the audio cannot be converted: {type(exc).__name__}: {exc}")
            ) from None
        self.pcm += converted.audio
        if len(self.pcm) > self.limit:
            raise _Failure.of(
                BodyTooLarge(
                    f"the audio is over {self.limit / (ASR_RATE * 2):.0f} s long (server."
                    "max_upload_mb as 16 kHz 16-bit mono WAV)"
                )
            )

    def wav(self) -> bytes:
        return wav_bytes(bytes(self.pcm), ASR_RATE)


def wav_bytes(pcm: bytes, rate: int, channels: int = 1, width: int = 2) -> bytes:
    """A whole PCM WAV file."""
    block = channels * width
    header = (
        b"RIFF"
        + (36 + len(pcm)).to_bytes(4, "little")
        + b"WAVEfmt "
        + (16).to_bytes(4, "little")
        + (1).to_bytes(2, "little")
        + channels.to_bytes(2, "little")
        + rate.to_bytes(4, "little")
        + (rate * block).to_bytes(4, "little")
        + block.to_bytes(2, "little")
        + (width * 8).to_bytes(2, "little")
        + b"data"
        + len(pcm).to_bytes(4, "little")
    )
    return header + pcm


class WavStream:
    """A streamed WAV answer, fed as it arrives: the header (any chunks before ``data``), then
    16-bit PCM of whole frames (8-, 24- and 32-bit integer PCM converted)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.format: AudioFormat | None = None
        self._buf = bytearray()
        self._header_done = False
        self._left: int | None = None
        """Bytes of the data chunk still to come, when its size was given."""
        self._converter = AudioChunkConverter(width=2)

    def _bad(self, why: str) -> _Failure:
        return _Failure.of(UpstreamError(f"model '{self.model_id}' answered {why}"))

    def feed(self, data: bytes) -> bytes:
        if not self._header_done:
            self._buf += data
            self._header()
            if not self._header_done:
                return b""
            data, self._buf = bytes(self._buf), bytearray()  # what followed the header
        if self._left is not None:  # chunks after the data chunk are not audio
            data = data[: self._left]
            self._left -= len(data)
        fmt = self.format
        assert fmt is not None
        self._buf += data
        frame = fmt.width * fmt.channels
        whole = len(self._buf) - len(self._buf) % frame
        pcm = bytes(self._buf[:whole])
        del self._buf[:whole]
        if fmt.width != 2 and pcm:
            pcm = self._converter.convert(
                AudioChunk(rate=fmt.rate, width=fmt.width, channels=fmt.channels, audio=pcm)
            ).audio
        return pcm

    def _header(self) -> None:
        buf = self._buf
        if len(buf) < 12:
            return
        if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
            raise self._bad("audio that is not a WAV file")
        pos = 12
        while True:
            if len(buf) < pos + 8:
                return
            kind, size = bytes(buf[pos : pos + 4]), int.from_bytes(buf[pos + 4 : pos + 8], "little")
            if kind == b"data":
                if self.format is None:
                    raise self._bad("a WAV file without a 'fmt ' chunk before its data")
                del buf[: pos + 8]
                self._header_done = True
                self._left = None if size in (0, 0xFFFFFFFF) else size
                return
            end = pos + 8 + size + (size & 1)
            if end > MAX_WAV_HEADER:
                raise self._bad(f"a WAV header over {MAX_WAV_HEADER} bytes")
            if len(buf) < end:
                return
            if kind == b"fmt ":
                if size < 16:
                    raise self._bad("a WAV file with a short 'fmt ' chunk")
                at = pos + 8
                tag, channels, rate, _, _, bits = (
                    int.from_bytes(buf[at + a : at + b], "little")
                    for a, b in ((0, 2), (2, 4), (4, 8), (8, 12), (12, 14), (14, 16))
                )
                if tag == 0xFFFE and size >= 26:  # WAVE_FORMAT_EXTENSIBLE: its sub-format
                    tag = int.from_bytes(buf[at + 24 : at + 26], "little")
                if tag != 1 or bits not in (8, 16, 24, 32) or not 1 <= channels <= 8 or not rate:
                    raise self._bad(
                        f"WAV audio that is not integer PCM (format {tag}, {bits} bits)"
                    )
                self.format = AudioFormat(rate, bits // 8, channels)
            pos = end


# --------------------------------------------------------------------------- the service


@dataclass
class _Listener:
    key: tuple[str, int, str]
    """(host, port, what it serves: ``asr:MODEL`` or ``tts``)."""
    server: asyncio.Server
    announced: Any = None
    """The zeroconf ``AsyncServiceInfo``, when announced."""


class WyomingService:
    """The Wyoming servers of one llmux: started with the app, changed on reload, stopped at
    shutdown. Requests go through the app's scheduler and its aiohttp session."""

    def __init__(
        self,
        scheduler: Scheduler,
        observer: Observer,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.scheduler = scheduler
        self.observer = observer
        self.session = session
        self.config: WyomingConfig | None = None
        self._listeners: dict[tuple[str, int, str], _Listener] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._zeroconf: Any = None
        self._info: tuple[Config, dict[str, bytes]] | None = None
        self.closing = False

    # -- lifecycle

    async def start(self, config: WyomingConfig | None) -> None:
        """Listen on every configured port (raises OSError if one cannot be bound)."""
        await self.reconfigure(config, strict=True)

    async def reconfigure(self, config: WyomingConfig | None, *, strict: bool = False) -> None:
        """Apply a (new) ``wyoming:`` section: servers no longer configured stop listening
        (their open connections finish), new ones start; unchanged ones go on. A port that
        cannot be bound raises with ``strict`` (start-up), else is logged."""
        self.config = config
        wanted: dict[tuple[str, int, str], bool] = {}
        if config is not None:
            for what, port in config.ports():
                wanted[(config.host, port, what)] = config.zeroconf
        for key in [k for k in self._listeners if k not in wanted]:
            await self._close_listener(self._listeners.pop(key))
        for key, zeroconf in wanted.items():
            listener = self._listeners.get(key)
            if listener is None:
                try:
                    listener = await self._listen(key)
                except OSError as exc:
                    if strict:
                        await self.stop()
                        raise OSError(
                            exc.errno,
                            f"wyoming: cannot listen on {key[0]}:{key[1]} for "
                            f"{key[2]}: {exc.strerror}",
                        ) from None
                    log.error("wyoming: cannot listen on %s:%d for %s: %s", *key, exc)
                    continue
                self._listeners[key] = listener
            if not zeroconf and listener.announced is not None:
                await self._unannounce(listener)
            if zeroconf and listener.announced is None:
                await self._announce(listener)
        if not any(x.announced for x in self._listeners.values()):
            await self._close_zeroconf()

    async def _listen(self, key: tuple[str, int, str]) -> _Listener:
        host, port, what = key
        asr_model = what.removeprefix("asr:") if what.startswith("asr:") else None

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.closing:
                writer.close()
                return
            handler = WyomingHandler(self, asr_model, reader, writer)
            task = asyncio.ensure_future(handler.run())
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

        server = await asyncio.start_server(connected, host, port, limit=MAX_LINE)
        log.info("wyoming: %s on %s:%d", what, host, port)
        return _Listener(key, server)

    async def _close_listener(self, listener: _Listener) -> None:
        listener.server.close()
        if listener.announced is not None:
            await self._unannounce(listener)
        log.info("wyoming: %s on %s:%d closed", listener.key[2], *listener.key[:2])

    def begin_shutdown(self) -> None:
        """llmux is stopping: no new connections. Requests under way go on."""
        self.closing = True
        for listener in self._listeners.values():
            listener.server.close()

    async def stop(self) -> None:
        """Close every server and connection (a request under way is cancelled and its lease
        released), and withdraw the zeroconf announcements."""
        self.closing = True
        listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            await self._close_listener(listener)
        await self._close_zeroconf()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # -- zeroconf

    async def _announce(self, listener: _Listener) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        host, port, what = listener.key
        try:
            if self._zeroconf is None:
                self._zeroconf = AsyncZeroconf(ip_version=IPVersion.All)
            name = f"llmux {what.replace(':', ' ')} {socket.gethostname()}"[:63]
            info = AsyncServiceInfo(
                ZEROCONF_TYPE,
                f"{name}.{ZEROCONF_TYPE}",
                addresses=[_announced_address(host)],
                port=port,
                properties={"program": "llmux", "serves": what},
            )
            await self._zeroconf.async_register_service(info)
        except Exception as exc:  # no multicast here, a name clash...: announce nothing
            log.error("wyoming: zeroconf announcement of %s failed: %s", what, exc)
            return
        listener.announced = info
        log.info("wyoming: announced %s as %r (zeroconf)", what, info.name)

    async def _unannounce(self, listener: _Listener) -> None:
        info, listener.announced = listener.announced, None
        if info is not None and self._zeroconf is not None:
            try:
                await self._zeroconf.async_unregister_service(info)
            except Exception as exc:
                log.warning("wyoming: zeroconf withdrawal of %s failed: %s", info.name, exc)

    async def _close_zeroconf(self) -> None:
        zc, self._zeroconf = self._zeroconf, None
        if zc is not None:
            await zc.async_close()

    # -- what handlers share

    def info(self, asr_model: str | None) -> bytes:
        """The encoded ``info`` event of an ASR port (its model) or the TTS port, built once
        per config."""
        config = self.scheduler.config
        if self._info is None or self._info[0] is not config:
            self._info = (config, {})
        cache = self._info[1]
        key = asr_model or ""
        if key not in cache:
            info = asr_info(config, asr_model) if asr_model else tts_info(config)
            cache[key] = encode_event(info.event())
        return cache[key]

    def port_of(self, what: str) -> int | None:
        config = self.config
        if config is None:
            return None
        return dict(config.ports()).get(what)


def _announced_address(host: str) -> bytes:
    """The address to announce for a server bound to ``host``: itself, or for a wildcard the
    address this machine reaches the mDNS group from."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    if address.is_unspecified:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("224.0.0.251", 5353))
            address = ipaddress.ip_address(probe.getsockname()[0])
    return address.packed


# --------------------------------------------------------------------------- one connection


@dataclass
class _Stream:
    """A streaming synthesis (``synthesize-start`` ... ``synthesize-stop``)."""

    model_id: str
    speaker: str | None
    splitter: SentenceSplitter
    queued: float | None = None
    spoken: int = 0


class WyomingHandler(AsyncEventHandler):
    """One Wyoming connection: an ASR port's (``asr_model``) or the TTS port's (None).

    A reader task reads events ahead into a queue (and so notices a hang-up at once, even
    while a request runs); this task handles them one at a time."""

    def __init__(
        self,
        service: WyomingService,
        asr_model: str | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(reader, writer)
        self.service = service
        self.asr_model = asr_model
        self._events: asyncio.Queue[Event | _Failure | None] = asyncio.Queue(QUEUE_EVENTS)
        self._gone = asyncio.Event()
        self._language: str | None = None
        self._recording: _Recording | None = None
        self._stream: _Stream | None = None

    # -- the loop

    async def run(self) -> None:
        reading = asyncio.ensure_future(self._read())
        try:
            while True:
                item = await self._events.get()
                if item is None:
                    break
                if isinstance(item, _Failure):
                    self._done(self.asr_model or "", item.status, None)
                    await self._send_error(item)
                    break
                if not await self.handle_event(item):
                    break
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            if self._stream is not None:  # left (or was stopped) in the middle of a stream
                self._done(self._stream.model_id, 499, self._stream.queued)
                self._stream = None
            self.writer.close()

    async def _read(self) -> None:
        try:
            while True:
                try:
                    event = await read_event(self.reader)
                except _Failure as failure:
                    await self._events.put(failure)
                    return
                except (ConnectionError, OSError):
                    event = None
                if event is None:
                    self._gone.set()
                    await self._events.put(None)
                    return
                await self._events.put(event)
        finally:
            self._gone.set()

    async def handle_event(self, event: Event) -> bool:
        """Answer one event; False ends the connection (after an error, or a hang-up)."""
        try:
            await self._handle(event)
        except _Failure as failure:
            if not failure.counted:  # bad input before any request: counted like the relay's
                self._done(self.asr_model or "", failure.status, None)
            await self._send_error(failure)
            return False
        except (_Gone, ConnectionError):
            return False
        except Exception as exc:
            log.exception("wyoming: unexpected error on a %s event", event.type)
            await self._send_error(
                _Failure(500, "server_error", f"internal error in llmux: {type(exc).__name__}")
            )
            return False
        return True

    async def _handle(self, event: Event) -> None:
        kind = event.type
        if Describe.is_type(kind):
            await self._write_raw(self.service.info(self.asr_model))
        elif Ping.is_type(kind):
            await self._write(Pong(text=event.data.get("text")).event())
        elif self.asr_model is not None:
            await self._asr_event(self.asr_model, event)
        else:
            await self._tts_event(event)

    async def _write(self, event: Event) -> None:
        await self._write_raw(encode_event(event))

    async def _write_raw(self, data: bytes) -> None:
        if self._gone.is_set() and self.writer.is_closing():
            raise _Gone
        self.writer.write(data)
        await self.writer.drain()

    async def _send_error(self, failure: _Failure) -> None:
        log.info("wyoming: error %s: %s", failure.code, failure.text)
        with contextlib.suppress(ConnectionError, OSError, _Gone):
            await self._write(Error(text=failure.text, code=failure.code).event())

    def _done(self, model_id: str, code: int, queued: float | None) -> None:
        self.service.observer.request_done(model_id, ENDPOINT, code, queued)

    async def _guarded(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` until it ends or the client hangs up (then it is cancelled: it tells
        its engine to stop and releases its lease, and ``_Gone`` is raised)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _Gone
        return task.result()

    # -- leases

    async def _lease(self, model_id: str) -> tuple[Lease, float]:
        """A lease on ``model_id`` (loading it if need be) and the seconds waited for it."""
        scheduler = self.service.scheduler
        started = time.monotonic()
        lease = scheduler.try_acquire(model_id)
        if lease is None:
            try:
                lease = await scheduler.acquire(model_id)
            except LlmuxError as exc:
                raise _Failure.of(exc) from None
        return lease, time.monotonic() - started

    async def _with_lease(
        self, model_id: str, work: Callable[[Lease, UpstreamRoute], Coroutine[Any, Any, T]]
    ) -> tuple[T, float]:
        """``work`` with a lease on ``model_id``, released however it ends. A cancel (the client
        hung up) first tells a built-in engine to stop, as the relay does."""
        lease, queued = await self._lease(model_id)
        route = UpstreamRoute.of(self.service.scheduler.config.models[model_id])
        try:
            try:
                return await work(lease, route), queued
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if route.cancel_path is not None and not self.service.closing and task:
                    task.uncancel()
                    await self._stop_work(lease, route.cancel_path)
                raise
        finally:
            self.service.scheduler.release(lease)

    async def _stop_work(self, lease: Lease, cancel_path: str) -> None:
        outcome = await stop_work(self.service.session(), lease, cancel_path)
        log.info("wyoming: cancel of request %d on %s: %s", lease.rid, lease.model_id, outcome)

    # -- speech to text

    async def _asr_event(self, model_id: str, event: Event) -> None:
        kind = event.type
        if Transcribe.is_type(kind):
            language = event.data.get("language")
            self._language = _whisper_language(language) if isinstance(language, str) else None
            self._recording = None
        elif AudioStart.is_type(kind):
            limit = int(self.service.scheduler.config.server.max_upload_mb * 1_000_000) - 44
            self._recording = _Recording(AudioFormat.of(event.data), limit)
        elif AudioChunk.is_type(kind):
            if self._recording is None:
                raise _Failure.of(InvalidAudio("an audio-chunk came before audio-start"))
            self._recording.add(event)
        elif AudioStop.is_type(kind):
            recording, self._recording = self._recording, None
            if recording is None:
                raise _Failure.of(InvalidAudio("audio-stop came before audio-start"))
            if not recording.pcm:
                raise _Failure.of(InvalidAudio("the audio stream has no samples"))
            language, self._language = self._language, None
            text = await self._transcribe(model_id, recording.wav(), language)
            await self._write(Transcript(text=text, language=language).event())
        elif kind.startswith("synthesize"):
            tts = self.service.port_of("tts")
            where = f" (port {tts})" if tts else ""
            raise _Failure.of(
                InvalidRequest(
                    f"this port serves speech to text ({model_id}); text to speech is on the "
                    f"Wyoming TTS port{where}"
                )
            )
        # Anything else is not for an ASR program: dropped, as the protocol asks.

    async def _transcribe(self, model_id: str, wav: bytes, language: str | None) -> str:
        code, queued = 499, None
        try:
            text, queued = await self._guarded(
                self._with_lease(
                    model_id,
                    lambda lease, route: self._post_transcription(lease, route, wav, language),
                )
            )
            code = 200
            return text
        except _Failure as failure:
            code, failure.counted = failure.status, True
            raise
        finally:
            self._done(model_id, code, queued)

    async def _post_transcription(
        self, lease: Lease, route: UpstreamRoute, wav: bytes, language: str | None
    ) -> str:
        form = aiohttp.FormData()
        form.add_field("model", route.spec.upstream_model or lease.model_id)
        form.add_field("response_format", "json")
        if language:
            form.add_field("language", language)
        form.add_field("file", wav, filename="audio.wav", content_type="audio/wav")
        try:
            async with self.service.session().post(
                lease.base_url + "/v1/audio/transcriptions",
                data=form,
                headers=route.headers(lease),
                timeout=route.timeout,
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise _child_failure(lease.model_id, resp.status, body)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            raise _upstream_failure(lease.model_id, exc) from None
        try:
            text = orjson.loads(body)["text"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise _Failure.of(
                UpstreamError(f"model '{lease.model_id}' answered without a transcript text")
            )
        return text.strip()

    # -- text to speech

    async def _tts_event(self, event: Event) -> None:
        kind = event.type
        if SynthesizeStart.is_type(kind):
            voice = SynthesizeVoice.from_dict(_dict(event.data.get("voice")))
            model_id, speaker = self._voice(voice)
            max_chars = self.service.scheduler.config.server.max_speech_chars
            self._stream = _Stream(model_id, speaker, SentenceSplitter(max_chars))
        elif SynthesizeChunk.is_type(kind):
            stream = self._stream
            if stream is None:
                raise _Failure.of(InvalidRequest("synthesize-chunk came before synthesize-start"))
            text = event.data.get("text")
            if not isinstance(text, str):
                raise _Failure.of(InvalidRequest("synthesize-chunk needs a string 'text'"))
            await self._speak_sentences(stream, stream.splitter.add(text))
        elif SynthesizeStop.is_type(kind):
            stream = self._stream
            if stream is None:
                raise _Failure.of(InvalidRequest("synthesize-stop came before synthesize-start"))
            await self._speak_sentences(stream, stream.splitter.finish())
            self._stream = None
            self._done(stream.model_id, 200, stream.queued)
            await self._write(SynthesizeStopped().event())
        elif Synthesize.is_type(kind):
            if self._stream is not None:
                return  # the whole text again, for servers without streaming: already spoken
            await self._synthesize(event)
        elif kind in ("transcribe", "audio-start", "audio-chunk", "audio-stop"):
            ports = ", ".join(
                f"{w.removeprefix('asr:')} on port {p}"
                for w, p in (self.service.config.ports() if self.service.config else [])
                if w.startswith("asr:")
            )
            raise _Failure.of(
                InvalidRequest(
                    "this port serves text to speech; speech to text is on the Wyoming ASR "
                    f"ports ({ports or 'none configured'})"
                )
            )

    def _voice(self, voice: SynthesizeVoice | None) -> tuple[str, str | None]:
        """The TTS model and speaker a ``voice`` names: ``model``, ``model:speaker``, or
        ``model`` with a ``speaker``; none = the first TTS model (or the first whose language
        matches ``voice.language``)."""
        config = self.service.scheduler.config
        tts = [m for m, spec in config.models.items() if spec.type == "tts"]
        name = voice.name if voice is not None else None
        speaker = voice.speaker if voice is not None else None
        try:
            if not name:
                if not tts:
                    raise ModelNotFound("(a tts model)")
                language = voice.language if voice is not None else None
                if language:
                    want = language.replace("-", "_").lower()
                    for candidate in tts:
                        facts = piper_voice(config.models[candidate])
                        codes = [c.lower() for c in facts.languages]
                        if any(c == want or c.split("_")[0] == want for c in codes):
                            return candidate, speaker
                return tts[0], speaker
            model_id = config.resolve(name)
            if model_id is None and ":" in name:
                base, _, named = name.rpartition(":")
                model_id = config.resolve(base)
                if model_id is not None:
                    speaker = named
            if model_id is None:
                raise ModelNotFound(name)
            if config.models[model_id].type != "tts":
                raise UnsupportedModel(
                    f"'{name}' is a {config.models[model_id].type} model, not a voice",
                    param="voice",
                )
        except LlmuxError as exc:
            raise _Failure.of(exc) from None
        return model_id, speaker

    async def _synthesize(self, event: Event) -> None:
        text = event.data.get("text")
        voice = SynthesizeVoice.from_dict(_dict(event.data.get("voice")))
        model_id, speaker = self._voice(voice)
        code, queued = 499, None
        try:
            if not isinstance(text, str) or not _speakable(text):
                raise _Failure.of(InvalidRequest("synthesize needs a non-empty 'text'"))
            text = _speakable(text)
            limit = self.service.scheduler.config.server.max_speech_chars
            if len(text) > limit:
                raise _Failure.of(
                    InvalidRequest(f"'text' is {len(text)} characters; the limit is {limit}")
                )
            queued = await self._speak(model_id, speaker, text)
            code = 200
        except _Failure as failure:
            code, failure.counted = failure.status, True
            raise
        finally:
            self._done(model_id, code, queued)

    async def _speak_sentences(self, stream: _Stream, sentences: list[str]) -> None:
        for sentence in sentences:
            try:
                queued = await self._speak(stream.model_id, stream.speaker, sentence)
            except _Failure as failure:
                self._stream = None
                self._done(stream.model_id, failure.status, stream.queued)
                failure.counted = True
                raise
            stream.queued = (stream.queued or 0.0) + queued
            stream.spoken += 1

    async def _speak(self, model_id: str, speaker: str | None, text: str) -> float:
        """Speak ``text`` with a lease on ``model_id``: ``audio-start``, the chunks as the
        child's answer arrives, ``audio-stop``. Returns the seconds waited for the lease."""

        async def post(lease: Lease, route: UpstreamRoute) -> None:
            await self._post_speech(lease, route, speaker, text)

        _, queued = await self._guarded(self._with_lease(model_id, post))
        return queued

    async def _post_speech(
        self, lease: Lease, route: UpstreamRoute, speaker: str | None, text: str
    ) -> None:
        payload: dict[str, Any] = {
            "model": route.spec.upstream_model or lease.model_id,
            "input": text,
            "response_format": "wav",
        }
        if speaker:
            payload["voice"] = speaker
        wav = WavStream(lease.model_id)
        started = False
        try:
            async with self.service.session().post(
                lease.base_url + "/v1/audio/speech",
                data=orjson.dumps(payload),
                headers={**route.headers(lease), "content-type": "application/json"},
                timeout=route.timeout,
            ) as resp:
                if resp.status != 200:
                    raise _child_failure(lease.model_id, resp.status, await resp.read())
                async for piece in resp.content.iter_any():
                    pcm = wav.feed(piece)
                    fmt = wav.format
                    if fmt is None:
                        continue
                    if not started:
                        await self._write(AudioStart(fmt.rate, 2, fmt.channels).event())
                        started = True
                    await self._send_audio(fmt, pcm)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _upstream_failure(lease.model_id, exc) from None
        if lease.child.returncode is not None:
            raise _Failure.of(UpstreamError(f"model '{lease.model_id}' died while answering"))
        if wav.format is None:
            raise _Failure.of(UpstreamError(f"model '{lease.model_id}' answered no audio"))
        await self._write(AudioStop().event())

    async def _send_audio(self, fmt: AudioFormat, pcm: bytes) -> None:
        step = SAMPLES_PER_CHUNK * 2 * fmt.channels
        for at in range(0, len(pcm), step):
            chunk = AudioChunk(
                rate=fmt.rate, width=2, channels=fmt.channels, audio=pcm[at : at + step]
            )
            await self._write(chunk.event())


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _whisper_language(language: str) -> str | None:
    """Home Assistant's language (``en``, ``en-US``, ``en_US``) as Whisper's code (``en``)."""
    code = re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0]
    return code or None


def _child_failure(model_id: str, status: int, body: bytes) -> _Failure:
    """The child's error answer as a Wyoming error: its envelope's code and message."""
    try:
        error = orjson.loads(body)["error"]
        message, code = error.get("message"), error.get("code") or error.get("type")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        message, code = None, None
    if not isinstance(message, str) or not isinstance(code, str):
        detail = body.decode("utf-8", "replace")[:500]
        return _Failure(502, UpstreamError.code, f"model '{model_id}' answered {status}: {detail}")
    return _Failure(status, code, message)


def _upstream_failure(model_id: str, exc: Exception) -> _Failure:
    if isinstance(exc, TimeoutError):
        return _Failure.of(UpstreamError(f"model '{model_id}' went silent (its stall_timeout)"))
    return _Failure.of(
        UpstreamError(f"model '{model_id}' failed mid-request: {type(exc).__name__}: {exc}")
    )
