"""An OpenAI-shaped text-to-speech server around piper-tts, run as one model's child.

    python -m llmux.engines.piper --model VOICE.onnx [--config VOICE.onnx.json] --port N
        [--host 127.0.0.1] [--speaker NAME_OR_ID] [--use-cuda] [--max-input-chars 4096]

The voice loads before the server listens, so ``GET /health`` answers 200 only once it is loaded.
``POST /v1/audio/speech`` takes OpenAI's JSON (``input``, ``voice``, ``speed``,
``response_format``; ``model`` and ``instructions`` are ignored) and streams the audio as it is
synthesized, sentence by sentence. The text is phonemized (espeak-ng) and the first sentence
synthesized before the headers go out, so input the voice cannot speak (NUL, lone surrogates,
nothing pronounceable, longer than ``--max-input-chars``) is a 400 and a failure there a 500
envelope; a failure later cuts the connection, logged once. Each sentence (a long one split at
word boundaries) runs in a thread of its own call; between them the synthesis stops when its
client disconnects or ``POST /llmux/cancel/{X-Llmux-Request-Id}`` cancels it (``_cancel``).

Formats: ``wav`` (a streaming header whose sizes say "unknown", 0xFFFFFFFF, then 16-bit mono PCM)
and ``pcm`` (raw 16-bit little-endian mono at 24 kHz like OpenAI's, resampled from the voice's
own rate with PyAV; without PyAV at the voice's own rate; ``X-Sample-Rate`` says which) always;
``mp3``, ``opus`` (Ogg), ``aac`` (ADTS) and ``flac`` when PyAV (``pip install av``;
faster-whisper brings it) has an encoder for them. Voices: OpenAI's names and the voice's own
name speak with the default speaker; a multi-speaker voice also takes its speaker names. Errors
are OpenAI's envelope.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmux.api.errors import exception_handlers, internal_error, send_error
from llmux.engines._cancel import CancelMiddleware, Work, work_of
from llmux.errors import InputTooLong, InvalidRequest

log = logging.getLogger("llmux.engines.piper")

OPENAI_VOICES = frozenset(
    [
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    ]
)
MIN_SPEED, MAX_SPEED = 0.25, 4.0

MEDIA_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}


@dataclass(frozen=True)
class Encoding:
    """How PyAV writes one compressed format."""

    container: str
    codecs: tuple[str, ...]
    """Encoder names to try, best first."""
    rate: int | None
    """Output sample rate; None keeps the voice's own."""
    bit_rate: int | None
    """Target bits per second for a lossy codec (mono speech)."""


ENCODINGS: dict[str, Encoding] = {
    "mp3": Encoding("mp3", ("libmp3lame", "mp3"), None, 64_000),
    "opus": Encoding("ogg", ("libopus", "opus"), 48000, 32_000),
    "aac": Encoding("adts", ("aac",), None, 64_000),
    "flac": Encoding("flac", ("flac",), None, None),
}


def available_encoders() -> dict[str, str]:
    """Compressed format -> the PyAV encoder that can write it (empty without PyAV)."""
    try:
        import av
    except ImportError:
        return {}
    found: dict[str, str] = {}
    for fmt, enc in ENCODINGS.items():
        for name in enc.codecs:
            try:
                av.Codec(name, "w")
            except Exception:
                continue
            found[fmt] = name
            break
    return found


def wav_header(sample_rate: int, channels: int = 1, sample_width: int = 2) -> bytes:
    """A WAV header for a stream of unknown length: RIFF and data sizes are 0xFFFFFFFF."""
    unknown = 0xFFFFFFFF
    block_align = channels * sample_width
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVE"
        + b"fmt "
        + struct.pack(
            "<IHHIIHH",
            16,
            1,  # PCM
            channels,
            sample_rate,
            sample_rate * block_align,
            block_align,
            sample_width * 8,
        )
        + b"data"
        + struct.pack("<I", unknown)
    )


class _Sink:
    """A write-only, unseekable file for PyAV: it collects what the muxer writes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class _Frames:
    """16-bit mono PCM chunks as consecutive PyAV audio frames (running timestamps)."""

    def __init__(self, sample_rate: int) -> None:
        import av

        self._av = av
        self._rate = sample_rate
        self._pts = 0

    def __call__(self, pcm: bytes) -> Any:
        import numpy as np

        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = self._av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._pts
        self._pts += samples.shape[1]
        return frame


PCM_RATE = 24_000
"""OpenAI's ``pcm``: 16-bit mono at 24 kHz. Clients play it at that rate without asking."""


class _Resampler:
    """16-bit mono PCM from one rate to another, chunk by chunk as it comes (PyAV/libswresample)."""

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        import av

        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=dst_rate)
        self._frames = _Frames(src_rate)

    def _out(self, frames: Any) -> bytes:
        return b"".join(f.to_ndarray().tobytes() for f in frames)

    def convert(self, pcm: bytes) -> bytes:
        return self._out(self._resampler.resample(self._frames(pcm)))

    def finish(self) -> bytes:
        """What the resampler still holds (its filter's delay) once the input has ended."""
        return self._out(self._resampler.resample(None))

    def close(self) -> None:
        """Nothing to release (here so that it stands in for an ``_Encoder``)."""


class _Encoder:
    """Encodes 16-bit mono PCM chunks to a compressed format as they come (PyAV)."""

    def __init__(self, fmt: str, codec: str, sample_rate: int) -> None:
        import av

        enc = ENCODINGS[fmt]
        self._frames = _Frames(sample_rate)
        self._sink = _Sink()
        # Small buffer, flushed per packet: bytes leave as soon as a frame is encoded.
        self._container = av.open(
            self._sink,
            mode="w",
            format=enc.container,
            buffer_size=4096,
            container_options={"flush_packets": "1"},
        )
        stream = self._container.add_stream(codec, rate=enc.rate or sample_rate)
        assert isinstance(stream, av.audio.stream.AudioStream)
        stream.layout = "mono"
        if enc.bit_rate:
            stream.bit_rate = enc.bit_rate
        self._stream = stream

    def convert(self, pcm: bytes) -> bytes:
        for packet in self._stream.encode(self._frames(pcm)):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()


MAX_INPUT_CHARS = 4096
"""OpenAI's own limit on ``input``; ``--max-input-chars`` changes it."""
MAX_PIECE_PHONEMES = 256
"""The longest run of phonemes synthesized in one go. A longer sentence is split at the last word
boundary before it, so that a cancel waits for at most one piece (about a second on a laptop
core) and a pathological one-sentence input cannot hold the voice for minutes."""


@dataclass(frozen=True)
class SpeechJob:
    text: str
    speaker_id: int | None
    length_scale: float
    response_format: str


def _split(phonemes: list[str], limit: int) -> list[list[str]]:
    """``phonemes`` of one sentence in pieces of at most ``limit``, cut after a space if any."""
    pieces: list[list[str]] = []
    rest = phonemes
    while len(rest) > limit:
        cut = max((i + 1 for i, p in enumerate(rest[:limit]) if p == " "), default=limit)
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        pieces.append(rest)
    return pieces


class Speaker:
    """Owns the loaded voice. ``phonemize`` and ``audio`` are blocking: run them in a thread."""

    def __init__(
        self,
        voice: Any,
        *,
        names: Sequence[str],
        default_speaker: int | str | None = None,
        max_piece_phonemes: int = MAX_PIECE_PHONEMES,
    ) -> None:
        self.voice = voice
        config = voice.config
        self.sample_rate = int(config.sample_rate)
        self.speakers: dict[str, int] = dict(getattr(config, "speaker_id_map", None) or {})
        self.num_speakers = int(getattr(config, "num_speakers", 1) or 1)
        self.base_length_scale = float(getattr(config, "length_scale", 1.0) or 1.0)
        self.own_names = {n for n in names if n}
        self.default_speaker = self._speaker(default_speaker) if default_speaker else None
        self.encoders = available_encoders()
        self.pcm_rate = PCM_RATE if importlib.util.find_spec("av") is not None else self.sample_rate
        """The rate of ``pcm`` answers: OpenAI's 24 kHz when PyAV can resample."""
        self.max_piece_phonemes = max_piece_phonemes

    def _speaker(self, value: int | str) -> int:
        if isinstance(value, str) and value in self.speakers:
            return self.speakers[value]
        try:
            sid = int(value)
        except ValueError:
            raise ValueError(
                f"unknown speaker {value!r}; speakers: {', '.join(self.speakers) or 'none'}"
            ) from None
        if not 0 <= sid < self.num_speakers:
            raise ValueError(f"speaker id {sid} out of range 0..{self.num_speakers - 1}")
        return sid

    def voice_names(self) -> list[str]:
        return sorted(OPENAI_VOICES | self.own_names | set(self.speakers))

    def speaker_for(self, voice: str | None) -> int | None:
        if voice is None or voice in OPENAI_VOICES or voice in self.own_names:
            return self.default_speaker
        if voice in self.speakers:
            return self.speakers[voice]
        raise InvalidRequest(
            f"Unknown voice {voice!r}; this voice answers to: {', '.join(self.voice_names())}.",
            param="voice",
        )

    def phonemize(self, text: str) -> list[list[str]]:
        """The phonemes to synthesize, in pieces (sentences, long ones split); a 400 if none.

        espeak-ng runs here, before any byte of the answer: input it cannot take is a clean 400.
        """
        try:
            sentences = self.voice.phonemize(text)
        except (ValueError, UnicodeError) as e:  # espeak-ng refused the text itself
            raise InvalidRequest(
                f"'input' cannot be spoken by this voice ({type(e).__name__}: {e}).",
                param="input",
            ) from None
        pieces = [p for s in sentences if s for p in _split(s, self.max_piece_phonemes)]
        if not any(p.strip() for piece in pieces for p in piece):
            raise InvalidRequest(
                "'input' has nothing this voice can speak (no words it can pronounce).",
                param="input",
            )
        return pieces

    def audio(
        self,
        job: SpeechJob,
        pieces: Sequence[list[str]],
        stop: threading.Event,
        progress: Callable[[], None] | None = None,
    ) -> Generator[bytes, None, None]:
        """The audio of ``pieces`` in ``job``'s format, one chunk per piece, then the encoder's
        tail; stops (returns) between pieces once ``stop`` is set. A ``wav`` header is not part
        of it. Drive it with ``next`` in a thread, one piece per call."""
        from piper import SynthesisConfig

        syn_config = SynthesisConfig(speaker_id=job.speaker_id, length_scale=job.length_scale)
        # What the PCM goes through on its way out: an encoder, a resampler (pcm), or nothing.
        transform: _Encoder | _Resampler | None = None
        if job.response_format in ENCODINGS:
            codec = self.encoders[job.response_format]
            transform = _Encoder(job.response_format, codec, self.sample_rate)
        elif job.response_format == "pcm" and self.pcm_rate != self.sample_rate:
            transform = _Resampler(self.sample_rate, self.pcm_rate)
        try:
            for phonemes in pieces:
                if stop.is_set():
                    return
                pcm = self._synthesize(phonemes, syn_config)
                if progress is not None:
                    progress()
                yield transform.convert(pcm) if transform else pcm
            if transform and not stop.is_set():
                yield transform.finish()
        finally:
            if transform:
                transform.close()

    def _synthesize(self, phonemes: list[str], syn_config: Any) -> bytes:
        """16-bit PCM of one piece, as ``PiperVoice.synthesize`` makes it for one sentence."""
        import numpy as np

        ids = self.voice.phonemes_to_ids(phonemes)
        audio = self.voice.phoneme_ids_to_audio(ids, syn_config)
        if isinstance(audio, tuple):  # (audio, alignments) from voices that give them
            audio = audio[0]
        if syn_config.normalize_audio:
            peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
            audio = np.zeros_like(audio) if peak < 1e-8 else audio / peak
        if syn_config.volume != 1.0:
            audio = audio * syn_config.volume
        clipped = np.clip(audio, -1.0, 1.0)
        return bytes((clipped * 32767).astype("<i2").tobytes())


def _check_input(text: str, max_chars: int) -> None:
    """What espeak-ng cannot take at all, and what is too long, is a 400 up front."""
    if len(text) > max_chars:
        raise InputTooLong(
            f"'input' is {len(text)} characters long; the most this voice accepts is {max_chars}.",
            param="input",
        )
    for i, ch in enumerate(text):
        # NUL ends espeak-ng's C string; a lone surrogate (JSON "\ud800") has no UTF-8 form.
        if ch == "\x00" or "\ud800" <= ch <= "\udfff":
            raise InvalidRequest(
                f"'input' contains a character that cannot be spoken: U+{ord(ch):04X} at "
                f"position {i}.",
                param="input",
            )


def parse_speech(body: Any, speaker: Speaker, max_chars: int = MAX_INPUT_CHARS) -> SpeechJob:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    text = body.get("input")
    if not isinstance(text, str):
        raise InvalidRequest("'input' must be a string.", param="input")
    if not text.strip():
        raise InvalidRequest("'input' must not be empty.", param="input")
    _check_input(text, max_chars)

    voice = body.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise InvalidRequest("'voice' must be a string.", param="voice")
    speaker_id = speaker.speaker_for(voice)

    speed = body.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if (
        isinstance(speed, bool)
        or not isinstance(speed, int | float)
        or not math.isfinite(speed)
        or not MIN_SPEED <= speed <= MAX_SPEED
    ):
        raise InvalidRequest(
            f"'speed' must be a number from {MIN_SPEED} to {MAX_SPEED}, not {speed!r}.",
            param="speed",
        )

    # OpenAI's default is mp3; without an mp3 encoder here, wav.
    fmt = body.get("response_format") or ("mp3" if "mp3" in speaker.encoders else "wav")
    if not isinstance(fmt, str) or fmt not in MEDIA_TYPES:
        raise InvalidRequest(
            f"Unsupported response_format {fmt!r}; use one of: {', '.join(MEDIA_TYPES)}.",
            param="response_format",
        )
    if fmt in ENCODINGS and fmt not in speaker.encoders:
        have = ", ".join(["wav", "pcm", *speaker.encoders])
        raise InvalidRequest(
            f"response_format {fmt!r} needs an audio encoder that is not installed here "
            f"(PyAV with a {fmt} encoder: pip install av); available: {have}.",
            param="response_format",
        )

    stream_format = body.get("stream_format")
    if stream_format not in (None, "audio"):
        raise InvalidRequest(
            f"stream_format {stream_format!r} is not supported; only 'audio'.",
            param="stream_format",
        )
    return SpeechJob(
        text=text,
        speaker_id=speaker_id,
        length_scale=speaker.base_length_scale / float(speed),
        response_format=fmt,
    )


def _next_piece(pieces: Iterator[bytes]) -> bytes | None:
    return next(pieces, None)


class SpeechResponse(Response):
    """Streams one synthesis: waits for the voice, synthesizes the first piece before the headers
    (so a failure there is still a clean 500 envelope), then one piece at a time, each in a thread
    that is never abandoned. A failure after the headers is logged once and cuts the connection
    (returning without the body's end: the server closes it); the client never sees a complete
    answer that is not one."""

    def __init__(
        self,
        speaker: Speaker,
        job: SpeechJob,
        pieces: list[list[str]],
        work: Work,
        lock: anyio.Lock,
    ) -> None:
        super().__init__(media_type=MEDIA_TYPES[job.response_format])
        self.speaker, self.job, self.pieces, self.work, self.lock = speaker, job, pieces, work, lock
        rate = speaker.pcm_rate if job.response_format == "pcm" else speaker.sample_rate
        self.headers["X-Sample-Rate"] = str(rate)
        del self.headers["content-length"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.lock:  # one synthesis at a time; waiting here is cancellable
            chunks = self.speaker.audio(self.job, self.pieces, self.work.stop, self._progress)
            try:
                await self._stream(chunks, scope, receive, send)
            finally:
                chunks.close()  # not running: every next() above has returned

    def _progress(self) -> None:
        self.work.progress += 1

    async def _stream(
        self, chunks: Iterator[bytes], scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            first = await anyio.to_thread.run_sync(_next_piece, chunks)
        except Exception as e:
            log.error("speech synthesis failed before any audio: %s: %s", type(e).__name__, e)
            await send_error(send, internal_error(e, "the piper engine"))
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if self.job.response_format == "wav":
            first = wav_header(self.speaker.sample_rate) + (first or b"")
        data = first
        while data is not None:
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            try:
                data = await anyio.to_thread.run_sync(_next_piece, chunks)
            except Exception as e:
                log.error(
                    "speech synthesis failed after the answer started; cutting the connection: "
                    "%s: %s",
                    type(e).__name__,
                    e,
                )
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


EXCEPTION_HANDLERS = exception_handlers(log=log, where="the piper engine")


def create_app(
    speaker: Speaker, model_id: str = "piper", *, max_input_chars: int = MAX_INPUT_CHARS
) -> Starlette:
    """The ASGI app around an already loaded voice."""
    # One synthesis at a time: a second would only halve the speed of both.
    lock = anyio.Lock()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id})

    async def models(request: Request) -> Response:
        entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "llmux"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def voices(request: Request) -> Response:
        return JSONResponse({"voices": speaker.voice_names(), "speakers": speaker.speakers})

    async def speech(request: Request) -> Response:
        work = work_of(request.scope)
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest("The request body must be JSON.") from None
        job = parse_speech(body, speaker, max_input_chars)
        # espeak-ng (its own lock) before anything is sent: unspeakable input is a 400.
        pieces = await anyio.to_thread.run_sync(speaker.phonemize, job.text)
        return SpeechResponse(speaker, job, pieces, work, lock)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/audio/voices", voices, methods=["GET"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(CancelMiddleware, log=log)],
    )


def load_voice(model: str, config: str | None, use_cuda: bool) -> Any:
    from piper import PiperVoice

    return PiperVoice.load(model, config_path=config, use_cuda=use_cuda)


def _dataset_name(config: str) -> list[str]:
    """The voice's own short name (``dataset`` in its config, e.g. "joe"), if it has one."""
    try:
        with open(config, encoding="utf-8") as f:
            dataset = json.load(f).get("dataset")
    except (OSError, ValueError, AttributeError):
        return []
    return [dataset] if isinstance(dataset, str) else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmux.engines.piper", description=__doc__)
    parser.add_argument("--model", required=True, help="the voice's .onnx file")
    parser.add_argument("--config", default=None, help="its .onnx.json (default: MODEL.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--speaker", default=None, help="default speaker (name or id)")
    parser.add_argument(
        "--use-cuda",
        type=lambda v: v.lower() in ("1", "true", "yes", "on"),
        nargs="?",
        const=True,
        default=False,
    )
    parser.add_argument("--model-id", default=None, help="id reported by /v1/models")
    parser.add_argument(
        "--max-input-chars",
        type=int,
        default=MAX_INPUT_CHARS,
        help=f"longest 'input' accepted, in characters (default {MAX_INPUT_CHARS}, OpenAI's)",
    )
    args = parser.parse_args(argv)
    if args.max_input_chars < 1:
        parser.error("--max-input-chars must be at least 1")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = os.path.basename(args.model).removesuffix(".onnx")
    started = time.monotonic()
    config = args.config or f"{args.model}.json"
    try:
        voice = load_voice(args.model, config, args.use_cuda)
        speaker = Speaker(voice, names=[name, *_dataset_name(config)], default_speaker=args.speaker)
    except Exception as e:
        print(f"llmux.engines.piper: cannot load {args.model}: {e}", file=sys.stderr)
        return 1
    formats = ", ".join(["wav", "pcm", *speaker.encoders])
    print(
        f"llmux.engines.piper: loaded {name} ({speaker.sample_rate} Hz, formats: {formats}) in "
        f"{time.monotonic() - started:.2f}s; serving on {args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(speaker, args.model_id or name, max_input_chars=args.max_input_chars)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
