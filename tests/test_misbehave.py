"""Issue 10: children that misbehave the way real servers do, and clients that ask for what
llmux must refuse. Each test drives a real `llmux serve` over real HTTP; the misbehaving child
is tests/misbehave.py (one mode per misbehaviour, chosen by the ``X-Misbehave`` header)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server, StartServer, upstream_cmd, wait_until

pytestmark = pytest.mark.slow

MISBEHAVE = Path(__file__).parent / "misbehave.py"
CHAT = "/v1/chat/completions"


def misbehave_cmd(workdir: Path, name: str) -> str:
    return f"{sys.executable} {MISBEHAVE} --port ${{PORT}} --name {name} --announce {workdir}"


def config(tmp: Path, *, stall: str = "300s", budget: float = 4.0, extra: str = "") -> str:
    return f"""
server: {{max_speech_chars: 100}}
gpu: {{vram_gb: {budget}, reserve_gb: 0}}
models:
  m:
    type: llm
    vram_gb: 1
    stall_timeout: {stall}
    stop_timeout: 5s
    cmd: {misbehave_cmd(tmp, "m")}
{extra}"""


def ask(server: Server, mode: str, **body: Any) -> httpx.Response:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(server.url + CHAT, json=payload, headers={"x-misbehave": mode}, timeout=60)


def raw_stream(server: Server, mode: str) -> tuple[int, bytes, str | None]:
    """(status, the body bytes that arrived, the error that ended the read, if one did)."""
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    got = bytearray()
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", server.url + CHAT, json=payload, headers={"x-misbehave": mode}) as r,
    ):
        try:
            for piece in r.iter_raw():
                got += piece
        except httpx.HTTPError as exc:
            return r.status_code, bytes(got), type(exc).__name__
        return r.status_code, bytes(got), None


def assert_envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


def stats(server: Server, name: str = "m") -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(server.upstream(name) + "/_stats", timeout=10).json()
    return body


# ---------------------------------------------------------------- 1: a forged second response


def test_a_second_response_on_a_kept_alive_connection_reaches_nobody(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(config(tmp_path))
    client = server.client()
    for attempt in range(3):
        assert ask(server, "forge").json() == {}
        # The child writes its forged response 50 ms after the first; let it cross loopback.
        wait_until(lambda: stats(server)["forged"] > attempt, 10, "the forged response")  # noqa: B023
        time.sleep(0.2)
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "fine"
    assert "sent bytes while idle" in server.log.read_text()


# ---------------------------------------------------------------- 2: a child that never answers


def test_a_silent_child_is_cut_after_its_stall_timeout(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(config(tmp_path, stall="1s"))
    began = time.monotonic()
    error = assert_envelope(ask(server, "silent"), 502, "upstream_error")
    assert "stall_timeout" in error["message"]
    assert 0.9 < time.monotonic() - began < 10
    wait_until(lambda: stats(server)["hung_up"] == 1, 10, "the child to see the cut")
    assert server.model("m")["in_flight"] == 0
    status, body, cut = raw_stream(server, "silent-stream")
    assert status == 200
    assert cut is None
    assert b"hello" in body
    assert b"event: error" in body
    assert b"stall_timeout" in body
    assert b"[DONE]" not in body


def test_a_hung_request_does_not_freeze_the_gpu(start_server: StartServer, tmp_path: Path) -> None:
    """Two models share a 1 GB budget; the request on the first never gets an answer. The
    second model's request evicts the first once the stall cuts its request, and is served."""
    other = f"""  other:
    type: llm
    vram_gb: 1
    cmd: {upstream_cmd(tmp_path, "other")}
"""
    server = start_server(config(tmp_path, stall="2s", budget=1.0, extra=other))
    pool = httpx.Client(timeout=60)
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    hung: dict[str, httpx.Response] = {}
    thread = threading.Thread(
        target=lambda: hung.setdefault(
            "r", pool.post(server.url + CHAT, json=payload, headers={"x-misbehave": "silent"})
        )
    )
    thread.start()
    wait_until(lambda: server.model("m")["in_flight"] == 1, 20, "the hung request in flight")
    reply = server.client().chat.completions.create(
        model="other", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "other got other"
    thread.join(30)
    assert_envelope(hung["r"], 502, "upstream_error")
    assert server.model("m")["state"] == "unloaded"
    pool.close()


# ---------------------------------------------------------------- 8: cut answers never look whole


@pytest.mark.parametrize("mode", ["close-sse", "chunked-sse-die", "length-sse-die"])
def test_an_sse_stream_cut_by_the_childs_death_ends_with_an_error_event(
    start_server: StartServer, tmp_path: Path, mode: str
) -> None:
    server = start_server(config(tmp_path))
    status, body, _ = raw_stream(server, mode)
    assert status == 200
    assert b'"one"' in body
    assert b'"two"' in body
    assert body.rstrip().endswith(b"}"), body
    events = body.split(b"\n\n")
    errors = [e for e in events if e.startswith(b"event: error")]
    assert len(errors) == 1, body
    envelope = json.loads(errors[0].split(b"data: ", 1)[1])
    assert envelope["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in body
    # The SDK sees the same: the stream raises instead of ending quietly.
    with pytest.raises(openai.APIError):
        for _ in server.client().chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-misbehave": mode},
        ):
            pass


def test_a_close_framed_answer_from_a_live_child_is_whole(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(config(tmp_path))
    status, body, cut = raw_stream(server, "close-sse-ok")
    assert (status, cut) == (200, None)
    assert body.endswith(b"data: [DONE]\n\n")
    assert b"event: error" not in body
    # Whole, then the child died before closing: still whole, no error after [DONE].
    status, body, cut = raw_stream(server, "close-sse-done-die")
    assert (status, cut) == (200, None)
    assert body.endswith(b"data: [DONE]\n\n")
    assert b"event: error" not in body
    resp = ask(server, "close-json-ok")
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"].startswith("a complete answer")


def test_a_close_framed_json_answer_cut_by_death_is_a_cut_connection(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(config(tmp_path))
    with pytest.raises(httpx.RemoteProtocolError):
        ask(server, "close-json")
    # The SDK agrees: not a completion.
    with pytest.raises(openai.APIConnectionError):
        server.client().chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-misbehave": "close-json"},
        )


# ---------------------------------------------------------------- 9: framing errors before headers


@pytest.mark.parametrize("mode", ["short", "status-999", "garbage"])
def test_a_broken_answer_before_any_byte_is_a_502(
    start_server: StartServer, tmp_path: Path, mode: str
) -> None:
    server = start_server(config(tmp_path))
    assert_envelope(ask(server, mode), 502, "upstream_error")
    # and the next request is served normally
    assert ask(server, "ok").json()["choices"][0]["message"]["content"] == "fine"


# ---------------------------------------------------------------- 4 and 10: what llmux refuses


def voice_config(tmp: Path) -> str:
    return f"""
server: {{max_speech_chars: 100}}
gpu: {{vram_gb: 8, reserve_gb: 0}}
models:
  chat: {{type: llm, vram_gb: 1, cmd: "{upstream_cmd(tmp, "chat")}"}}
  voice: {{type: tts, vram_gb: 1, cmd: "{upstream_cmd(tmp, "voice")}"}}
  ears: {{type: asr, vram_gb: 1, cmd: "{upstream_cmd(tmp, "ears")}"}}
"""


def test_a_route_refuses_a_model_of_the_wrong_type_before_loading_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(voice_config(tmp_path))
    speech = {"model": "chat", "input": "Hello", "voice": "alloy"}
    error = assert_envelope(server.post("/v1/audio/speech", json=speech), 400, "unsupported_model")
    assert error["param"] == "model"
    chat = {"model": "voice", "messages": [{"role": "user", "content": "hi"}]}
    assert_envelope(server.post(CHAT, json=chat), 400, "unsupported_model")
    files = {"file": ("a.wav", b"RIFF0000", "audio/wav")}
    resp = server.post("/v1/audio/transcriptions", data={"model": "chat"}, files=files)
    assert_envelope(resp, 400, "unsupported_model")
    assert {m["id"]: m["state"] for m in server.status()["models"]} == {
        "chat": "unloaded",
        "voice": "unloaded",
        "ears": "unloaded",
    }
    with pytest.raises(openai.BadRequestError):
        server.client().audio.speech.create(model="chat", voice="alloy", input="Hello")


def test_speech_input_is_limited(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(voice_config(tmp_path))
    client = server.client()
    assert len(client.audio.speech.create(model="voice", voice="alloy", input="a" * 100).content)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="voice", voice="alloy", input="a" * 101)
    assert "101 characters" in str(caught.value)
    assert "limit is 100" in str(caught.value)
    assert server.model("voice")["in_flight"] == 0


def test_multipart_content_type_in_any_case(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(voice_config(tmp_path))
    boundary = "xYzZy"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nears\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\nRIFF0000\r\n--{boundary}--\r\n"
    ).encode()
    for kind in ("Multipart/Form-Data", "MULTIPART/FORM-DATA"):
        resp = httpx.post(
            server.url + "/v1/audio/transcriptions",
            content=body,
            headers={"content-type": f"{kind}; boundary={boundary}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"text": "ears heard 8 bytes"}


def test_two_authorization_headers_are_refused(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(voice_config(tmp_path).replace("server: {", "server: {api_keys: [k], "))
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    twice = [("authorization", "Bearer k"), ("authorization", "Bearer wrong")]
    for headers in (twice, list(reversed(twice))):
        with httpx.Client(timeout=10) as client:
            resp = client.post(server.url + CHAT, json=chat, headers=headers)
            assert_envelope(resp, 400)
            assert_envelope(client.get(server.url + "/status", headers=headers), 400)
    ok = httpx.get(server.url + "/status", headers={"authorization": "Bearer k"}, timeout=10)
    assert ok.status_code == 200
