"""The built-in default stack (`llmux serve` with no --config), end to end through llmux.

Each test starts a real `llmux serve` without ``--config``: Whisper tiny.en (pinned), the Piper
voice joe and SmolLM2-135M run as real engine children behind llmux, and the official openai SDK
talks only to llmux. What the engines do on their own is covered by test_engines.py; these tests
check that the same answers come back through the relay, the scheduler and the default config.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.audio import SENTENCE, assert_heard, normalise, wav_params
from tests.conftest import Server, StartServer
from tests.engine_children import require_engine

pytestmark = [pytest.mark.engines, pytest.mark.slow]

PARIS: list[Any] = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}
]
LOAD_TIMEOUT = 120.0
"""Seconds to wait for the pinned whisper at start (engines import slowly on a busy 2-core box)."""

_ENGINES = [
    ("faster-whisper", "whisper-tiny.en", "faster_whisper"),
    ("piper", "en_US-joe-medium", "piper"),
    ("llama-cpp", "smollm2-135m", "llama_cpp"),
]


@pytest.fixture(autouse=True, scope="module")
def _engines_installed() -> None:
    for engine, model, module in _ENGINES:
        require_engine(engine, model, module)


def speak(server: Server, text: str = SENTENCE, model: str = "joe") -> bytes:
    """``text`` spoken by the default voice through llmux, as a WAV file."""
    with server.client(timeout=120) as client:
        return client.audio.speech.create(
            model=model, voice="alloy", input=text, response_format="wav"
        ).content


def _envelope(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- the voice assistant through llmux ------------------------------------------------------


def test_voice_round_trip(start_server: StartServer) -> None:
    server = start_server(None)
    spoken = speak(server, model="tts-1")  # the alias of joe in the default config
    assert wav_params(spoken) == (1, 22050, 16)
    with server.client(timeout=120) as client:
        result = client.audio.transcriptions.create(
            model="whisper", file=("speech.wav", spoken, "audio/wav"), language="en"
        )
    assert_heard(result.text)


def test_chat_paris(start_server: StartServer) -> None:
    server = start_server(None)
    with server.client(timeout=120) as client:
        reply = client.chat.completions.create(
            model="smollm2", messages=PARIS, temperature=0, max_tokens=32
        )
        content = reply.choices[0].message.content
        assert content is not None
        assert "Paris" in content

        parts: list[str] = []
        stream = client.chat.completions.create(
            model="smollm2", messages=PARIS, temperature=0, max_tokens=32, stream=True
        )
        with stream:
            for event in stream:
                if event.choices and event.choices[0].delta.content:
                    parts.append(event.choices[0].delta.content)
    assert len(parts) > 1  # really streamed, chunk by chunk, through the relay
    assert "Paris" in "".join(parts)
    assert "".join(parts) == content  # temperature 0: the same answer both ways


# --- formats and errors, relayed --------------------------------------------------------------


def test_transcription_formats(start_server: StartServer) -> None:
    server = start_server(None)
    spoken = speak(server)
    with server.client(timeout=120) as client:
        srt = client.audio.transcriptions.create(
            model="whisper", file=("s.wav", spoken), response_format="srt"
        )
        vtt = client.audio.transcriptions.create(
            model="whisper-1", file=("s.wav", spoken), response_format="vtt"
        )
        verbose = client.audio.transcriptions.create(
            model="whisper",
            file=("s.wav", spoken),
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n\S", srt)
    assert_heard(re.sub(r"^\d+$|^.* --> .*$", "", srt, flags=re.M))
    assert vtt.startswith("WEBVTT\n\n00:00:00.")
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}$", vtt, flags=re.M)

    assert verbose.language == "english"
    assert 2.0 < verbose.duration < 10.0
    assert_heard(verbose.text)
    assert verbose.segments
    assert verbose.segments[0].start == 0.0
    assert verbose.segments[-1].end <= verbose.duration + 0.5
    assert verbose.words is not None
    assert_heard(" ".join(w.word for w in verbose.words))
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts)
    assert all(w.end >= w.start for w in verbose.words)


def test_speech_wav_and_pcm(start_server: StartServer) -> None:
    server = start_server(None)
    wav = speak(server)
    assert wav_params(wav) == (1, 22050, 16)
    assert 2.0 < (len(wav) - 44) / (22050 * 2) < 10.0

    with (
        server.client(timeout=120) as client,
        client.audio.speech.with_streaming_response.create(
            model="joe", voice="alloy", input="Hello there.", response_format="pcm"
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["x-sample-rate"] == "24000"  # the child's headers pass through
        pcm = b"".join(response.iter_bytes())
    assert pcm[:4] != b"RIFF"
    assert len(pcm) % 2 == 0
    assert 0.3 < len(pcm) / (24000 * 2) < 5.0


def test_bad_audio_and_empty_speech_are_400(start_server: StartServer) -> None:
    server = start_server(None)
    garbage = bytes(range(256)) * 16
    with server.client(timeout=120) as client:
        with pytest.raises(openai.BadRequestError) as bad_audio:
            client.audio.transcriptions.create(
                model="whisper", file=("noise.mp3", garbage, "audio/mpeg")
            )
        with pytest.raises(openai.BadRequestError) as empty:
            client.audio.speech.create(model="joe", voice="alloy", input="")
    assert bad_audio.value.status_code == 400
    assert bad_audio.value.type == "invalid_request_error"
    assert bad_audio.value.param == "file"
    assert empty.value.status_code == 400
    assert empty.value.param == "input"

    # The envelope, exactly as a client without the SDK sees it.
    raw = server.post(
        "/v1/audio/transcriptions",
        files={"file": ("noise.mp3", garbage, "audio/mpeg")},
        data={"model": "whisper"},
    )
    assert raw.status_code == 400
    assert raw.headers["content-type"].startswith("application/json")
    assert _envelope(raw)["param"] == "file"
    raw = server.post("/v1/audio/speech", json={"model": "joe", "voice": "alloy", "input": ""})
    assert raw.status_code == 400
    assert _envelope(raw)["param"] == "input"
    # A failed request is not a failed model: both stay ready, with no error recorded.
    for model_id in ("whisper", "joe"):
        model = server.model(model_id)
        assert (model["state"], model["last_error"], model["in_flight"]) == ("ready", None, 0)


def _default_config_with(**server_keys: Any) -> str:
    printed = subprocess.run(
        [sys.executable, "-m", "llmux", "serve", "--print-config"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    config: dict[str, Any] = yaml.safe_load(printed)
    config["server"].update(server_keys)
    return yaml.safe_dump(config, sort_keys=False)


def spoken_and_heard(server: Server, text: str) -> tuple[bytes, str]:
    """``text`` spoken by the default voice and heard by Whisper: (the WAV, what it heard).

    Piper draws random noise for each synthesis, and whisper-tiny now and then mishears a short
    phrase ("below there" for "Hello there.": 1 in 20, measured with the old and the new Piper
    engine alike). Up to three syntheses: the first one heard as written is returned, else the
    last, whose transcript the caller's assertion then shows."""
    want = normalise(text)
    with server.client(timeout=120) as client:
        for _ in range(3):
            audio = speak(server, text)
            heard = client.audio.transcriptions.create(model="whisper", file=("s.wav", audio))
            if normalise(heard.text) == want:
                break
    return audio, heard.text


def test_upload_over_max_upload_mb_is_413(start_server: StartServer) -> None:
    server = start_server(_default_config_with(max_upload_mb=0.2))  # 200,000 bytes
    small, heard = spoken_and_heard(server, "Hello.")
    assert normalise(heard) == ["hello"]
    assert len(small) < 200_000
    big = small + b"\0" * 300_000
    with (
        server.client(timeout=120) as client,
        pytest.raises(openai.APIStatusError) as too_large,
    ):
        client.audio.transcriptions.create(model="whisper", file=("big.wav", big))
    assert too_large.value.status_code == 413
    body: Any = too_large.value.body
    assert set(body) == {"message", "type", "param", "code"}  # the SDK unwraps "error"

    raw = server.post(
        "/v1/audio/transcriptions",
        files={"file": ("big.wav", big, "audio/wav")},
        data={"model": "whisper"},
    )
    assert raw.status_code == 413
    assert "200000" in _envelope(raw)["message"]
    # The model behind it is unaffected.
    assert server.model("whisper")["in_flight"] == 0


# --- the scheduler's view of the default stack -----------------------------------------------


def test_status_pinned_whisper_then_all_ready(start_server: StartServer) -> None:
    server = start_server(None)
    at_start = {m["id"]: m for m in server.status()["models"]}
    assert list(at_start) == ["whisper", "joe", "smollm2"]
    assert at_start["whisper"]["pinned"] is True
    assert at_start["whisper"]["state"] in ("loading", "ready")  # preloaded, nobody asked
    for model_id in ("joe", "smollm2"):
        assert at_start[model_id]["pinned"] is False
        assert at_start[model_id]["state"] == "unloaded"
        assert at_start[model_id]["pid"] is None
    whisper = server.wait_state("whisper", "ready", LOAD_TIMEOUT)
    assert isinstance(whisper["pid"], int)
    assert whisper["last_error"] is None
    assert whisper["last_used"] is None  # loaded for nobody's request
    assert server.status()["vram"]["reserved_gb"] == pytest.approx(1.0)

    _, heard = spoken_and_heard(server, "Hello there.")
    with server.client(timeout=120) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=PARIS, temperature=0, max_tokens=8
        )
    assert normalise(heard) == ["hello", "there"]
    assert reply.choices[0].message.content

    status = server.status()
    after = {m["id"]: m for m in status["models"]}
    for model_id, gb, tier in (
        ("whisper", 1.0, "asr"),
        ("joe", 0.3, "tts"),
        ("smollm2", 0.5, "llm"),
    ):
        m = after[model_id]
        assert (m["state"], m["tier"], m["in_flight"], m["queued"]) == ("ready", tier, 0, 0)
        assert m["vram_gb"] == pytest.approx(gb)
        assert m["last_error"] is None
        assert m["last_used"] is not None
    assert after["whisper"]["pid"] == whisper["pid"]  # the pinned one was never reloaded
    assert status["vram"]["reserved_gb"] == pytest.approx(1.8)
    assert status["vram"]["reserved_gb"] <= status["vram"]["budget_gb"]  # all fit: no eviction
    listed = {m.id for m in server.client().models.list()}
    assert listed == {"whisper", "whisper-1", "joe", "tts-1", "smollm2", "gpt-4o-mini"}
