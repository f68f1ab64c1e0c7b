"""An OpenAI-shaped speech-to-text server around faster-whisper, run as one model's child.

    python -m llmux.engines.whisper --model PATH --port N [--host 127.0.0.1]
        [--device cpu] [--compute-type int8] [--threads 2] [--beam-size 5]

The model loads before the server listens, so ``GET /health`` answers 200 only once it is loaded.
``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` take OpenAI's multipart form
(``file``, ``model`` (ignored), ``language``, ``prompt``, ``temperature``, ``response_format`` in
json/text/verbose_json/srt/vtt, ``timestamp_granularities[]`` in segment/word). Audio in any format
PyAV decodes (wav, mp3, ogg, flac, webm, ...). One transcription runs at a time, in a thread.
Every error is OpenAI's envelope; an unexpected one is a 500 envelope without a traceback.

A transcription stops between segments, before each decoding pass of the model, and before
decoding and transcribing start, when its client disconnects or
``POST /llmux/cancel/{X-Llmux-Request-Id}`` cancels it (``_cancel``).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from llmux.api.errors import exception_handlers
from llmux.engines._cancel import CancelMiddleware, Work, current_work, work_of
from llmux.errors import InvalidAudio, InvalidRequest

log = logging.getLogger("llmux.engines.whisper")

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")

# Whisper's language codes and the names OpenAI's verbose_json reports.
LANGUAGES: dict[str, str] = dict(
    pair.split(":")
    for pair in [
        "en:english",
        "zh:chinese",
        "de:german",
        "es:spanish",
        "ru:russian",
        "ko:korean",
        "fr:french",
        "ja:japanese",
        "pt:portuguese",
        "tr:turkish",
        "pl:polish",
        "ca:catalan",
        "nl:dutch",
        "ar:arabic",
        "sv:swedish",
        "it:italian",
        "id:indonesian",
        "hi:hindi",
        "fi:finnish",
        "vi:vietnamese",
        "he:hebrew",
        "uk:ukrainian",
        "el:greek",
        "ms:malay",
        "cs:czech",
        "ro:romanian",
        "da:danish",
        "hu:hungarian",
        "ta:tamil",
        "no:norwegian",
        "th:thai",
        "ur:urdu",
        "hr:croatian",
        "bg:bulgarian",
        "lt:lithuanian",
        "la:latin",
        "mi:maori",
        "ml:malayalam",
        "cy:welsh",
        "sk:slovak",
        "te:telugu",
        "fa:persian",
        "lv:latvian",
        "bn:bengali",
        "sr:serbian",
        "az:azerbaijani",
        "sl:slovenian",
        "kn:kannada",
        "et:estonian",
        "mk:macedonian",
        "br:breton",
        "eu:basque",
        "is:icelandic",
        "hy:armenian",
        "ne:nepali",
        "mn:mongolian",
        "bs:bosnian",
        "kk:kazakh",
        "sq:albanian",
        "sw:swahili",
        "gl:galician",
        "mr:marathi",
        "pa:punjabi",
        "si:sinhala",
        "km:khmer",
        "sn:shona",
        "yo:yoruba",
        "so:somali",
        "af:afrikaans",
        "oc:occitan",
        "ka:georgian",
        "be:belarusian",
        "tg:tajik",
        "sd:sindhi",
        "gu:gujarati",
        "am:amharic",
        "yi:yiddish",
        "lo:lao",
        "uz:uzbek",
        "fo:faroese",
        "ht:haitian_creole",
        "ps:pashto",
        "tk:turkmen",
        "nn:nynorsk",
        "mt:maltese",
        "sa:sanskrit",
        "lb:luxembourgish",
        "my:myanmar",
        "bo:tibetan",
        "tl:tagalog",
        "mg:malagasy",
        "as:assamese",
        "tt:tatar",
        "haw:hawaiian",
        "ln:lingala",
        "ha:hausa",
        "ba:bashkir",
        "jw:javanese",
        "su:sundanese",
        "yue:cantonese",
    ]
)
LANGUAGES = {code: name.replace("_", " ") for code, name in LANGUAGES.items()}
_CODES_BY_NAME = {name: code for code, name in LANGUAGES.items()}


@dataclass(frozen=True)
class Job:
    """One transcription request, validated."""

    audio: bytes
    task: str
    """``transcribe`` or ``translate``"""
    language: str | None
    prompt: str | None
    temperature: float | None
    response_format: str
    words: bool


@dataclass(frozen=True)
class Result:
    task: str
    language: str
    duration: float
    text: str
    segments: list[dict[str, Any]]
    words: list[dict[str, Any]] | None


class _Checked:
    """The CTranslate2 model inside a faster-whisper ``WhisperModel``, checking the stop flag of
    the request it works for before each of its blocking calls.

    Segments come out of faster-whisper window by window (30 s of audio), and one window may be
    decoded up to six times (its temperature fallbacks); CTranslate2's calls themselves cannot
    be interrupted. Checking before each call bounds a cancel by one ``generate``, not one
    window with all its fallbacks."""

    _CHECKED = frozenset({"encode", "generate", "detect_language", "align"})

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        if name not in self._CHECKED:
            return attr

        def checked(*args: Any, **kwargs: Any) -> Any:
            work = current_work()
            if work is not None:
                work.check()
            return attr(*args, **kwargs)

        return checked


class Transcriber:
    """Owns the loaded model; ``run`` is blocking and must be called from a thread."""

    def __init__(self, model: Any, *, beam_size: int = 5) -> None:
        if not isinstance(model.model, _Checked):
            model.model = _Checked(model.model)
        self.model = model
        self.beam_size = beam_size
        self.multilingual = bool(getattr(model.model, "is_multilingual", True))
        self.sampling_rate = int(model.feature_extractor.sampling_rate)

    def decode(self, data: bytes) -> Any:
        from faster_whisper import decode_audio

        try:
            audio = decode_audio(io.BytesIO(data), sampling_rate=self.sampling_rate)
        except Exception as e:  # PyAV raises many kinds; all mean "not audio we can read"
            raise InvalidAudio(
                "Could not decode the uploaded file as audio "
                f"({type(e).__name__}: {e}). Supported: wav, mp3, ogg, flac, webm, m4a, mp4.",
                param="file",
            ) from None
        if len(audio) == 0:
            raise InvalidAudio("The uploaded file contains no audio samples.", param="file")
        return audio

    def run(self, job: Job, work: Work | None = None) -> Result:
        """Transcribe ``job``; raise ``Stopped`` as soon as ``work`` is seen stopped (checked
        before each step and between segments: faster-whisper decodes segments lazily)."""

        def check() -> None:
            if work is not None:
                work.check()
                work.progress += 1

        check()
        audio = self.decode(job.audio)
        check()
        options: dict[str, Any] = {
            "task": job.task,
            "language": job.language,
            "initial_prompt": job.prompt,
            "beam_size": self.beam_size,
            "word_timestamps": job.words,
        }
        if job.temperature is not None:
            options["temperature"] = job.temperature
        segments_iter, info = self.model.transcribe(audio, **options)
        segments: list[dict[str, Any]] = []
        words: list[dict[str, Any]] = []
        check()
        for s in segments_iter:
            check()
            segments.append(
                {
                    "id": s.id,
                    "seek": s.seek,
                    "start": round(s.start, 3),
                    "end": round(s.end, 3),
                    "text": s.text,
                    "tokens": list(s.tokens),
                    "temperature": s.temperature,
                    "avg_logprob": s.avg_logprob,
                    "compression_ratio": s.compression_ratio,
                    "no_speech_prob": s.no_speech_prob,
                }
            )
            for w in s.words or ():
                words.append(
                    {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
                )
        return Result(
            task=job.task,
            language=LANGUAGES.get(info.language, info.language),
            duration=round(float(info.duration), 3),
            text="".join(s["text"] for s in segments).strip(),
            segments=segments,
            words=words if job.words else None,
        )


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(segments: Sequence[dict[str, Any]]) -> str:
    blocks = [
        f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: Sequence[dict[str, Any]]) -> str:
    blocks = [
        f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{s['text'].strip()}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(result: Result, response_format: str) -> Response:
    if response_format == "json":
        return JSONResponse({"text": result.text})
    if response_format == "text":
        return PlainTextResponse(result.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(to_srt(result.segments))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(result.segments), media_type="text/vtt")
    body: dict[str, Any] = {
        "task": result.task,
        "language": result.language,
        "duration": result.duration,
        "text": result.text,
        "segments": result.segments,
    }
    if result.words is not None:
        body["words"] = result.words
    return JSONResponse(body)


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a form field, not a file.", param=name)
    return value.strip() or None


def _language(value: str | None, multilingual: bool) -> str | None:
    if value is None:
        return None
    code = value.lower()
    code = _CODES_BY_NAME.get(code, code)
    if code not in LANGUAGES:
        raise InvalidRequest(
            f"Unknown language {value!r}; use an ISO-639-1 code such as 'en'.", param="language"
        )
    if not multilingual and code != "en":
        raise InvalidRequest(
            f"This model is English-only; language {value!r} is not supported.",
            param="language",
        )
    return code


async def parse_job(request: Request, task: str, multilingual: bool) -> Job:
    async with request.form(max_files=1, max_fields=100) as form:
        upload = form.get("file")
        if upload is None:
            raise InvalidRequest("Missing the 'file' upload (multipart/form-data).", param="file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("'file' must be an uploaded file.", param="file")
        data = await upload.read()
        if not data:
            raise InvalidRequest("The uploaded 'file' is empty.", param="file")

        response_format = _field(form, "response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise InvalidRequest(
                f"Unsupported response_format {response_format!r}; "
                f"use one of: {', '.join(RESPONSE_FORMATS)}.",
                param="response_format",
            )

        temperature: float | None = None
        raw_temperature = _field(form, "temperature")
        if raw_temperature is not None:
            try:
                temperature = float(raw_temperature)
            except ValueError:
                temperature = -1.0
            if not 0.0 <= temperature <= 1.0:
                raise InvalidRequest(
                    f"temperature must be a number from 0 to 1, not {raw_temperature!r}.",
                    param="temperature",
                )

        granularities: list[str] = []
        for key in ("timestamp_granularities[]", "timestamp_granularities"):
            for value in form.getlist(key):
                if not isinstance(value, str) or value not in GRANULARITIES:
                    raise InvalidRequest(
                        f"timestamp_granularities must be among {', '.join(GRANULARITIES)}; "
                        f"got {value!r}.",
                        param="timestamp_granularities",
                    )
                granularities.append(value)

        return Job(
            audio=data,
            task=task,
            language=_language(_field(form, "language"), multilingual),
            prompt=_field(form, "prompt"),
            temperature=temperature,
            response_format=response_format,
            words="word" in granularities and response_format == "verbose_json",
        )


EXCEPTION_HANDLERS = exception_handlers(log=log, where="the whisper engine")


def create_app(transcriber: Transcriber, model_id: str = "whisper") -> Starlette:
    """The ASGI app around an already loaded model."""
    limiter = anyio.CapacityLimiter(1)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id})

    async def models(request: Request) -> Response:
        entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "llmux"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def handle(request: Request, task: str) -> Response:
        work = work_of(request.scope)
        job = await parse_job(request, task, transcriber.multilingual)
        # Never abandoned: a cancel waits for the thread, which stops at its next check.
        result = await anyio.to_thread.run_sync(transcriber.run, job, work, limiter=limiter)
        return render(result, job.response_format)

    async def transcriptions(request: Request) -> Response:
        return await handle(request, "transcribe")

    async def translations(request: Request) -> Response:
        return await handle(request, "translate")

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", translations, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(CancelMiddleware, log=log)],
    )


def load_model(path: str, device: str, device_index: int, compute_type: str, threads: int) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from faster_whisper import WhisperModel

    return WhisperModel(
        path,
        device=device,
        device_index=device_index,
        compute_type=compute_type,
        cpu_threads=threads,
        local_files_only=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmux.engines.whisper", description=__doc__)
    parser.add_argument("--model", required=True, help="CTranslate2 Whisper model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--device-index", type=int, default=0)
    parser.add_argument("--compute-type", default="int8", help="int8, float16, int8_float16, ...")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--model-id", default=None, help="id reported by /v1/models")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        model = load_model(
            args.model, args.device, args.device_index, args.compute_type, args.threads
        )
    except Exception as e:
        print(f"llmux.engines.whisper: cannot load {args.model}: {e}", file=sys.stderr)
        return 1
    print(
        f"llmux.engines.whisper: loaded {args.model} ({args.device}, {args.compute_type}) in "
        f"{time.monotonic() - started:.2f}s; serving on {args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
    app = create_app(Transcriber(model, beam_size=args.beam_size), model_id)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
