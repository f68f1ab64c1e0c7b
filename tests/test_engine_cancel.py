"""The built-in engines stop a request's work when it is cancelled or its client leaves.

Real engine processes (started from ``engine_argv`` as llmux starts them) with the packaged
models. Each test starts a long request, waits until the engine reports work done for it
(``GET /llmux/requests``: ``progress``), stops it (``POST /llmux/cancel/{id}`` or by closing the
connection), and checks that the work ended within seconds and that the next short request is
answered promptly. Timing bounds are loose (a loaded 2-core machine); a request that kept running
would take tens of seconds more.
"""

from __future__ import annotations

import io
import socket
import time
import wave
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from llmux.engines import REQUEST_ID_HEADER, engine_cancel_path
from tests.audio import SENTENCE
from tests.conftest import StartServer, wait_until
from tests.engine_children import Server, require_engine

pytestmark = pytest.mark.engines

STOP_BOUND_S = 5.0
"""The longest a cancel may take to answer ``stopped`` here (about 1 s unloaded)."""


@pytest.fixture(scope="module")
def spoken_pcm(piper: Server) -> bytes:
    """SENTENCE as 16-bit mono PCM at the voice's 22,050 Hz (from a wav answer)."""
    with piper.client() as client:
        wav = client.audio.speech.create(
            model="tts", voice="alloy", input=SENTENCE, response_format="wav"
        ).content
    return wav[44:]


def _wav(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(pcm)
    return out.getvalue()


@pytest.fixture(scope="module")
def short_wav(spoken_pcm: bytes) -> bytes:
    return _wav(spoken_pcm)


@pytest.fixture(scope="module")
def long_wav(spoken_pcm: bytes) -> bytes:
    """About five minutes of speech: SENTENCE over and over, with a short pause between."""
    pause = b"\x00\x00" * 8000
    seconds = len(spoken_pcm + pause) / (2 * 22050)
    return _wav((spoken_pcm + pause) * int(300 / seconds))


# --- helpers -----------------------------------------------------------------------------------


def _in_progress(server: Server) -> dict[str, dict[str, Any]]:
    body = httpx.get(server.base_url + "/llmux/requests", timeout=10).json()
    return {r["id"]: r for r in body["requests"]}


def _wait_progress(server: Server, rid: str, steps: int) -> None:
    wait_until(
        lambda: _in_progress(server).get(rid, {}).get("progress", 0) >= steps,
        timeout=120,
        what=f"{steps} steps of work for {rid}",
    )


def _cancel(server: Server, engine: str, rid: str) -> tuple[dict[str, Any], float]:
    path = engine_cancel_path(engine)
    assert path is not None
    started = time.monotonic()
    response = httpx.post(server.base_url + path.format(request_id=rid), timeout=30)
    took = time.monotonic() - started
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer, took


def _wait_gone(server: Server, rid: str) -> float:
    started = time.monotonic()
    wait_until(lambda: rid not in _in_progress(server), timeout=60, what=f"{rid} to end")
    return time.monotonic() - started


def _timed(call: Callable[[], Any]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def _raw_post(server: Server, request: httpx.Request) -> socket.socket:
    """Send ``request`` over a plain socket, read nothing; closing the socket hangs up."""
    url = urlsplit(server.base_url)
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=30)
    body = request.read()
    head = [f"POST {request.url.raw_path.decode()} HTTP/1.1", f"Host: {url.netloc}"]
    head += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() != "host"]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return sock


def _drain(items: Iterator[Any], sizes: list[int]) -> None:
    for item in items:
        sizes.append(len(item) if isinstance(item, bytes) else 1)


def _assert_cancelled(future: Future[Any]) -> None:
    with pytest.raises(openai.APIStatusError) as cancelled:
        future.result(timeout=60)
    assert cancelled.value.status_code == 499
    assert cancelled.value.code == "request_cancelled"


# --- the contract ------------------------------------------------------------------------------


def test_cancel_path_for_every_engine() -> None:
    for engine in ("llama-cpp", "faster-whisper", "piper"):
        assert engine_cancel_path(engine) == "/llmux/cancel/{request_id}"


def test_cancel_of_unknown_request(piper: Server) -> None:
    answer, _ = _cancel(piper, "piper", "nobody")
    assert answer == {"id": "nobody", "found": False, "stopped": True}
    wrong_method = httpx.get(piper.base_url + "/llmux/cancel/nobody", timeout=10)
    assert wrong_method.status_code == 405
    assert set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}


# --- faster-whisper ----------------------------------------------------------------------------


def test_whisper_cancel_stops_a_long_transcription(
    whisper: Server, short_wav: bytes, long_wav: bytes
) -> None:
    with whisper.client() as client, ThreadPoolExecutor(1) as pool:

        def short() -> None:
            client.audio.transcriptions.create(model="whisper", file=("s.wav", short_wav))

        alone = _timed(short)
        future = pool.submit(
            client.audio.transcriptions.create,
            model="whisper",
            file=("long.wav", long_wav),
            extra_headers={REQUEST_ID_HEADER: "asr-long"},
        )
        _wait_progress(whisper, "asr-long", 5)  # two segments out of about sixty
        answer, took = _cancel(whisper, "faster-whisper", "asr-long")
        assert answer == {"id": "asr-long", "found": True, "stopped": True}
        assert took < STOP_BOUND_S
        assert "asr-long" not in _in_progress(whisper)
        _assert_cancelled(future)
        after = _timed(short)
    print(f"whisper: cancel answered in {took:.2f}s; short alone {alone:.2f}s, after {after:.2f}s")
    assert after < 3 * alone + 3


def test_whisper_disconnect_stops_a_long_transcription(whisper: Server, long_wav: bytes) -> None:
    request = httpx.Request(
        "POST",
        whisper.base_url + "/v1/audio/transcriptions",
        files={"file": ("long.wav", long_wav, "audio/wav")},
        data={"model": "whisper"},
        headers={REQUEST_ID_HEADER: "asr-gone"},
    )
    sock = _raw_post(whisper, request)
    try:
        _wait_progress(whisper, "asr-gone", 5)
    finally:
        sock.close()
    took = _wait_gone(whisper, "asr-gone")
    print(f"whisper: work ended {took:.2f}s after the client hung up")
    assert took < STOP_BOUND_S


# --- piper -------------------------------------------------------------------------------------

LONG_TEXT = " ".join([SENTENCE] * 60)  # about 4,000 characters: four minutes of speech


def test_piper_cancel_stops_a_long_synthesis(piper: Server) -> None:
    sizes: list[int] = []
    with piper.client() as client:

        def short() -> None:
            client.audio.speech.create(
                model="tts", voice="alloy", input="Hello there.", response_format="pcm"
            )

        alone = _timed(short)
        with client.audio.speech.with_streaming_response.create(
            model="tts",
            voice="alloy",
            input=LONG_TEXT,
            response_format="pcm",
            extra_headers={REQUEST_ID_HEADER: "tts-long"},
        ) as response:
            chunks = response.iter_bytes()
            sizes.append(len(next(chunks)))
            answer, took = _cancel(piper, "piper", "tts-long")
            assert answer == {"id": "tts-long", "found": True, "stopped": True}
            # Cut (the SDK's own httpx raises RemoteProtocolError): never a complete answer.
            with pytest.raises(Exception, match="incomplete chunked read") as cut:
                _drain(chunks, sizes)
        after = _timed(short)
    print(f"piper: cancel answered in {took:.2f}s; short alone {alone:.2f}s, after {after:.2f}s")
    assert type(cut.value).__name__ == "RemoteProtocolError"
    assert took < STOP_BOUND_S
    assert sum(sizes) / (24000 * 2) < 60  # of about 240 s
    assert after < 3 * alone + 3


def test_piper_disconnect_stops_a_long_synthesis(piper: Server) -> None:
    with piper.client() as client:
        with client.audio.speech.with_streaming_response.create(
            model="tts",
            voice="alloy",
            input=LONG_TEXT,
            response_format="pcm",
            extra_headers={REQUEST_ID_HEADER: "tts-gone"},
        ) as response:
            # Keep the iterator: a dropped one is closed, and closes the connection with it.
            chunks = response.iter_bytes()
            next(chunks)
            assert "tts-gone" in _in_progress(piper)
        # Leaving the block unread closes the connection.
        took = _wait_gone(piper, "tts-gone")
    print(f"piper: work ended {took:.2f}s after the client hung up")
    assert took < STOP_BOUND_S


# --- llama-cpp ---------------------------------------------------------------------------------

LONG_CHAT: dict[str, Any] = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
    "max_tokens": 1900,
    "extra_body": {"min_tokens": 1900},  # llama_cpp.server's own field: no early end
}


def _short_chat(client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
    )


def test_llama_cancel_stops_a_long_chat(llama: Server) -> None:
    with llama.client() as client, ThreadPoolExecutor(1) as pool:
        alone = _timed(lambda: _short_chat(client))
        future = pool.submit(
            lambda: client.chat.completions.create(
                **LONG_CHAT, extra_headers={REQUEST_ID_HEADER: "chat-long"}
            )
        )
        _wait_progress(llama, "chat-long", 20)  # 20 tokens of 1900
        answer, took = _cancel(llama, "llama-cpp", "chat-long")
        assert answer == {"id": "chat-long", "found": True, "stopped": True}
        _assert_cancelled(future)
        after = _timed(lambda: _short_chat(client))
    print(f"llama: cancel answered in {took:.2f}s; short alone {alone:.2f}s, after {after:.2f}s")
    assert took < STOP_BOUND_S
    assert after < 3 * alone + 3


def test_llama_cancel_stops_a_long_stream(llama: Server) -> None:
    tokens: list[int] = []
    with llama.client() as client:
        stream = client.chat.completions.create(
            **LONG_CHAT, stream=True, extra_headers={REQUEST_ID_HEADER: "chat-stream"}
        )
        with stream:
            events = iter(stream)
            next(events)
            answer, took = _cancel(llama, "llama-cpp", "chat-stream")
            assert answer == {"id": "chat-stream", "found": True, "stopped": True}
            with pytest.raises(openai.APIError) as error:  # the SDK raises the error event
                _drain(events, tokens)
        after = _timed(lambda: _short_chat(client))
    print(f"llama stream: cancel answered in {took:.2f}s; short after {after:.2f}s")
    assert "cancelled" in error.value.message
    assert took < STOP_BOUND_S
    assert len(tokens) < 1000


def test_llama_disconnect_stops_a_long_chat(llama: Server) -> None:
    request = httpx.Request(
        "POST",
        llama.base_url + "/v1/chat/completions",
        json={k: v for k, v in LONG_CHAT.items() if k != "extra_body"} | LONG_CHAT["extra_body"],
        headers={REQUEST_ID_HEADER: "chat-gone"},
    )
    sock = _raw_post(llama, request)
    try:
        _wait_progress(llama, "chat-gone", 20)
    finally:
        sock.close()
    took = _wait_gone(llama, "chat-gone")
    print(f"llama: work ended {took:.2f}s after the client hung up")
    assert took < STOP_BOUND_S
    with llama.client() as client:
        assert _timed(lambda: _short_chat(client)) < 10


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": "x"}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
        # Each of these grammars made llama_cpp.server die of SIGSEGV.
        ({"messages": [{"role": "user", "content": "Hi"}], "grammar": "x ::="}, "grammar"),
        ({"prompt": "Hi", "grammar": 'root ::= ("a"'}, "grammar"),
    ],
)
def test_llama_invalid_requests_are_400s(llama: Server, body: dict[str, Any], param: str) -> None:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = httpx.post(llama.base_url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert ".py" not in error["message"]
    assert "/" not in error["message"].replace("v1/", "")


def test_llama_body_that_is_not_json_is_a_400(llama: Server) -> None:
    for content in (b"{", b"\xff\xfe", b"[1, 2]"):
        response = httpx.post(
            llama.base_url + "/v1/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


# --- through llmux: the relay holds the lease until the engine has stopped -----------------------


@pytest.mark.slow
def test_llmux_keeps_the_model_busy_until_its_work_for_a_gone_client_stopped(
    start_server: StartServer,
) -> None:
    require_engine("piper", "en_US-joe-medium", "piper")
    server = start_server(
        "models:\n  voice: {type: tts, engine: piper, model: en_US-joe-medium, vram_gb: 0.3}\n"
    )
    client = server.client()
    client.audio.speech.create(model="voice", voice="alloy", input="Warm up.")
    with client.audio.speech.with_streaming_response.create(
        model="voice", voice="alloy", input=LONG_TEXT, response_format="pcm"
    ) as response:
        chunks = response.iter_bytes()  # kept: a dropped iterator closes the connection
        next(chunks)
        assert server.model("voice")["in_flight"] == 1
    # The client is gone. The model is not idle until the engine says its work stopped, and the
    # relay logs that before it releases the lease.
    hung_up = time.monotonic()
    while server.model("voice")["in_flight"]:
        assert time.monotonic() - hung_up < 30, "still in flight"
    took = time.monotonic() - hung_up
    log = server.log.read_text()
    assert "client left model=voice" in log
    assert "stopped its work" in log
    assert took < STOP_BOUND_S
    # and the next request is not stuck behind four minutes of speech nobody hears
    assert (
        _timed(lambda: client.audio.speech.create(model="voice", voice="alloy", input="Hi.")) < 10
    )
