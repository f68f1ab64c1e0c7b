"""End to end: a real `llmux serve`, real upstream children, the official openai SDK as client."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import StartServer, upstream_cmd, wait_until

pytestmark = pytest.mark.slow


def two_llms(tmp: Path, budget: float = 4.0, **server: Any) -> str:
    extra = "".join(f"\n  {k}: {v}" for k, v in server.items())
    return f"""
server:
  max_queue: 256{extra}
gpu: {{vram_gb: {budget}, reserve_gb: 0}}
models:
  a:
    type: llm
    vram_gb: 3
    cmd: {upstream_cmd(tmp, "a")}
    aliases: [alpha]
    stop_timeout: 5s
  b:
    type: llm
    vram_gb: 3
    cmd: {upstream_cmd(tmp, "b")}
    upstream_model: bee
    stop_timeout: 5s
"""


def voice_stack(tmp: Path) -> str:
    return f"""
gpu: {{vram_gb: 5, reserve_gb: 0}}
models:
  ears:
    type: asr
    vram_gb: 2
    pinned: true
    cmd: {upstream_cmd(tmp, "ears")}
  voice:
    type: tts
    vram_gb: 1
    cmd: {upstream_cmd(tmp, "voice")}
  chat:
    type: llm
    vram_gb: 3
    cmd: {upstream_cmd(tmp, "chat")}
  small:
    type: llm
    vram_gb: 1
    cmd: {upstream_cmd(tmp, "small")}
"""


def chat(client: openai.OpenAI, model: str, content: str = "hi") -> str:
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}]
    )
    return resp.choices[0].message.content or ""


# ---------------------------------------------------------------- OpenAI routes through the SDK


def test_chat_stream_and_alias(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    client = server.client()
    assert chat(client, "a") == "a got a"
    assert chat(client, "alpha") == "a got alpha"  # an alias reaches the same child, as sent
    assert chat(client, "b") == "b got bee"  # upstream_model rewrites the name for the child
    stream = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "a got a"


def test_completions_embeddings_speech_transcription(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(voice_stack(tmp_path))
    client = server.client()
    done = client.completions.create(model="small", prompt="hello")
    assert done.choices[0].text == "small got small"
    emb = client.embeddings.create(model="small", input=["one", "two"])
    assert len(emb.data) == 2
    assert len(emb.data[0].embedding) == 8
    speech = client.audio.speech.create(model="voice", voice="alloy", input="hello there")
    with wave.open(io.BytesIO(speech.read())) as w:
        assert w.getnframes() > 0
    audio = io.BytesIO(b"RIFF" + b"\0" * 1000)
    audio.name = "clip.wav"
    text = client.audio.transcriptions.create(model="ears", file=audio)
    assert text.text == "ears heard 1004 bytes"
    # (the SDK marks translations deprecated, which this suite turns into an error: raw HTTP)
    resp = httpx.post(
        server.url + "/v1/audio/translations",
        files={"file": ("clip.wav", b"RIFF" + b"\0" * 10)},
        data={"model": "ears"},
    )
    assert resp.json() == {"text": "ears heard 14 bytes"}


def test_models_list(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    ids = {m.id: m for m in server.client().models.list()}
    assert set(ids) == {"a", "alpha", "b"}
    extra: Any = ids["alpha"].model_extra
    assert extra["llmux"]["type"] == "llm"
    assert extra["llmux"]["state"] == "unloaded"
    assert extra["llmux"]["alias_of"] == "a"


# ---------------------------------------------------------------- scheduling, end to end


def test_swaps_by_priority_and_keeps_asr(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(voice_stack(tmp_path))
    server.wait_state("ears", "ready")  # pinned: preloaded at start
    client = server.client()
    assert chat(client, "small") == "small got small"
    speech = client.audio.speech.create(model="voice", voice="alloy", input="hi")
    assert speech.read()
    assert server.model("small")["state"] == "ready"
    assert server.model("voice")["state"] == "ready"
    # chat (3 GB) needs small (1) and voice (1) out of 5; ears (2, protected) stays.
    assert chat(client, "chat") == "chat got chat"
    states = {m["id"]: m["state"] for m in server.status()["models"]}
    assert states == {"ears": "ready", "voice": "unloaded", "chat": "ready", "small": "unloaded"}
    assert server.status()["vram"]["reserved_gb"] == 5


def test_insufficient_vram_evicts_nothing(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
gpu: {{vram_gb: 4, reserve_gb: 0}}
models:
  ears: {{type: asr, vram_gb: 2, pinned: true, cmd: "{upstream_cmd(tmp_path, "ears")}"}}
  voice: {{type: tts, vram_gb: 1, cmd: "{upstream_cmd(tmp_path, "voice")}"}}
  big: {{type: llm, vram_gb: 3, cmd: "{upstream_cmd(tmp_path, "big")}"}}
"""
    server = start_server(cfg)
    server.wait_state("ears", "ready")
    client = server.client()
    client.audio.speech.create(model="voice", voice="alloy", input="hi").read()
    with pytest.raises(openai.APIStatusError) as info:
        chat(client, "big")
    assert info.value.status_code == 503
    body: Any = info.value.body
    assert body["code"] == "insufficient_vram"
    assert "ears" in body["message"]
    # The seed's bug: nothing was evicted on the way to failing.
    assert server.model("voice")["state"] == "ready"
    assert server.model("ears")["state"] == "ready"


def test_in_flight_is_never_cut(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    client = server.client()
    stream = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hold"}], stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].delta.content == "a"
    server.upstream_wait("a", held=1)
    result: dict[str, str] = {}

    def ask_b() -> None:
        result["b"] = chat(client, "b")

    t = threading.Thread(target=ask_b)
    t.start()
    server.wait_state("a", "draining")
    assert server.model("b")["queued"] == 1
    server.upstream_release("a")
    rest = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert rest == " got a"  # the held stream finished whole
    t.join(30)
    assert result["b"] == "b got bee"
    assert server.model("a")["state"] == "unloaded"


def test_ready_model_not_blocked_by_a_load(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
gpu: {{vram_gb: 8, reserve_gb: 0}}
models:
  fast: {{type: llm, vram_gb: 1, cmd: "{upstream_cmd(tmp_path, "fast")}"}}
  slow: {{type: llm, vram_gb: 1, cmd: "{upstream_cmd(tmp_path, "slow", "--ready-delay 4")}"}}
"""
    server = start_server(cfg)
    client = server.client()
    assert chat(client, "fast") == "fast got fast"
    t = threading.Thread(target=chat, args=(client, "slow"))
    t.start()
    server.wait_state("slow", "loading")
    assert chat(client, "fast") == "fast got fast"
    assert server.model("slow")["state"] == "loading"  # answered while the other still loads
    t.join(30)


def test_single_flight_load(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
models:
  m: {{type: llm, vram_gb: 1, cmd: "{upstream_cmd(tmp_path, "m", "--ready-delay 1")}"}}
"""
    server = start_server(cfg)
    client = server.client()
    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(chat(client, "m"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == ["m got m"] * 4
    stats = httpx.get(server.upstream("m") + "/_stats").json()
    pid = server.model("m")["pid"]
    assert stats["pid"] == pid  # one child served all four
    assert server.log.read_text().count("loading model=m") == 1


def test_headers_relayed_to_the_child(start_server: StartServer, tmp_path: Path) -> None:
    """The child gets the client's own headers, never llmux's key or hop-by-hop headers, and
    ``accept-encoding: identity`` when the client named no encoding (the bytes pass through
    as they are, so the child must not compress what the client cannot read)."""
    server = start_server(two_llms(tmp_path, api_keys="[k1]"))
    url = server.url + "/v1/chat/completions"
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": "Bearer k1"}

    def seen(headers: dict[str, str]) -> dict[str, str]:
        resp = httpx.post(url, json=body, headers={**auth, **headers})
        assert resp.status_code == 200, resp.text
        last: dict[str, str] = httpx.get(server.upstream("a") + "/_stats").json()["last_headers"]
        return last

    got = seen({"User-Agent": "probe/1", "X-Trace": "t-1", "Accept-Encoding": "gzip"})
    assert got["user-agent"] == "probe/1"
    assert got["x-trace"] == "t-1"
    assert got["accept-encoding"] == "gzip"  # the client's own choice passes through
    assert "authorization" not in got
    assert got["host"] != server.url.split("//")[1]  # the child's own address

    bare = httpx.Request("POST", url, json=body, headers=auth)  # no client defaults added
    assert "accept-encoding" not in bare.headers
    with httpx.Client() as http:
        assert http.send(bare).status_code == 200
    got = httpx.get(server.upstream("a") + "/_stats").json()["last_headers"]
    assert got["accept-encoding"] == "identity"


def test_failed_load_then_retry(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
models:
  bad: {{type: llm, vram_gb: 1, cmd: "{upstream_cmd(tmp_path, "bad", "--exit-at-start 3")}"}}
  gone: {{type: llm, vram_gb: 1, cmd: "/nonexistent/engine --port ${{PORT}}"}}
"""
    server = start_server(cfg)
    client = server.client()
    for _ in range(2):  # the next request tries again
        with pytest.raises(openai.APIStatusError) as info:
            chat(client, "bad")
        assert info.value.status_code == 503
        body: Any = info.value.body
        assert body["code"] == "model_load_failed"
        assert "boom" in body["message"]
    m = server.model("bad")
    assert m["state"] == "unloaded"
    assert "boom" in m["last_error"]
    assert server.status()["vram"]["reserved_gb"] == 0
    with pytest.raises(openai.APIStatusError) as info:
        chat(client, "gone")
    assert info.value.status_code == 503


def test_crash_mid_stream_and_recovery(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    client = server.client()
    stream = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "crash"}], stream=True
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == "a"  # the stream had started
    with pytest.raises(openai.APIError) as info:
        list(chunks)
    assert "failed mid-request" in info.value.message
    m = server.wait_state("a", "unloaded")
    assert "status 1" in m["last_error"]
    assert chat(client, "a") == "a got a"  # reloaded on the next request
    # Non-streaming: a 502 with the envelope.
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, "a", "crash")
    assert err.value.status_code == 502
    body: Any = err.value.body
    assert body["code"] == "upstream_error"


def test_client_disconnect_cancels_upstream(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hold"}]}
    with (
        httpx.Client(timeout=30) as h,
        h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        chunks = resp.iter_raw()  # keep a reference: a dropped generator closes the stream
        next(chunks)
        server.upstream_wait("a", held=1)
        assert server.model("a")["in_flight"] == 1
    # The client closed its connection: the upstream request is cancelled, the lease released.
    stats = server.upstream_wait("a", cancelled=1)
    assert stats["cancelled"] == 1
    wait_until(lambda: server.model("a")["in_flight"] == 0, 10, "lease released")


def test_disconnects_cancel_only_their_own_requests(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Three non-streaming requests wait in the child; two clients hang up. Their upstream
    requests are cancelled and their leases released; the third is answered once released."""
    server = start_server(two_llms(tmp_path))
    assert chat(server.client(), "a") == "a got a"  # loaded: the holds below reach the child
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hold"}]})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    clients = [socket.create_connection((host, int(port)), timeout=30) for _ in range(3)]
    try:
        for sock in clients:
            sock.sendall(request)
        server.upstream_wait("a", held=3)
        assert server.model("a")["in_flight"] == 3
        for sock in clients[:2]:
            sock.close()
        stats = server.upstream_wait("a", cancelled=2)
        assert stats["cancelled"] == 2
        wait_until(lambda: server.model("a")["in_flight"] == 1, 10, "two leases released")
        server.upstream_release("a")
        answer = b""
        while b"a got a" not in answer:
            data = clients[2].recv(65536)
            assert data, f"connection closed early: {answer!r}"
            answer += data
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in clients:
            sock.close()
    wait_until(lambda: server.model("a")["in_flight"] == 0, 10, "last lease released")
    assert httpx.get(server.upstream("a") + "/_stats").json()["cancelled"] == 2


def test_ttl_unloads_idle_model(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
models:
  m: {{type: llm, vram_gb: 1, ttl: 300ms, cmd: "{upstream_cmd(tmp_path, "m")}"}}
"""
    server = start_server(cfg)
    assert chat(server.client(), "m") == "m got m"
    server.wait_state("m", "unloaded", timeout=10)


def test_queue_full_and_timeout(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
server: {{max_queue: 1, queue_timeout: 1s}}
models:
  never:
    type: llm
    vram_gb: 1
    ready_timeout: 60s
    cmd: {upstream_cmd(tmp_path, "never", "--never-ready")}
"""
    server = start_server(cfg)
    client = server.client()
    errors: list[int] = []

    def ask() -> None:
        try:
            chat(client, "never")
        except openai.APIStatusError as exc:
            errors.append(exc.status_code)

    t = threading.Thread(target=ask)
    t.start()
    wait_until(lambda: server.model("never")["queued"] == 1, 10, "one waiter")
    with pytest.raises(openai.APIStatusError) as info:
        chat(client, "never")
    assert info.value.status_code == 429
    body: Any = info.value.body
    assert body["code"] == "queue_full"
    t.join(20)
    assert errors == [504]


def test_pinned_failure_does_not_stop_llmux(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
models:
  ears:
    type: asr
    vram_gb: 1
    pinned: true
    cmd: {upstream_cmd(tmp_path, "ears", "--exit-at-start 2")}
  m: {{type: llm, vram_gb: 1, cmd: "{upstream_cmd(tmp_path, "m")}"}}
"""
    server = start_server(cfg)
    m = wait_until(lambda: (x := server.model("ears"))["last_error"] and x, 20, "preload failure")
    assert m["state"] == "unloaded"
    assert chat(server.client(), "m") == "m got m"


def test_admin_load_unload_and_pinned(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(voice_stack(tmp_path))
    server.wait_state("ears", "ready")
    resp = server.post("/models/small/load")
    assert resp.status_code == 200
    assert resp.json() == {"id": "small", "state": "ready"}
    assert server.post("/models/ears/unload").json()["state"] == "unloaded"  # pinned too
    assert server.post("/models/nope/load").status_code == 404


def test_sigterm_stops_children(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    chat(server.client(), "a")
    pid = server.model("a")["pid"]
    assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
    assert _gone(pid)  # stopped before llmux exited, not left to the parent-death signal


def test_sigterm_does_not_wait_for_a_load(start_server: StartServer, tmp_path: Path) -> None:
    """A load under way at SIGTERM can serve nobody: it is abandoned (its child killed), and
    llmux stops at once instead of waiting shutdown_grace for a child that is not ready."""
    cfg = f"""
server: {{shutdown_grace: 60s}}
models:
  slow:
    type: llm
    vram_gb: 1
    ready_timeout: 120s
    cmd: {upstream_cmd(tmp_path, "slow", "--never-ready")}
"""
    server = start_server(cfg)
    answers: list[int] = []

    def ask() -> None:
        try:
            chat(server.client(), "slow")
        except openai.APIStatusError as exc:
            answers.append(exc.status_code)
        except openai.APIConnectionError:
            answers.append(0)

    waiting = threading.Thread(target=ask)
    waiting.start()
    wait_until(lambda: server.model("slow")["state"] == "loading", 20, "the load")
    url = server.upstream("slow") + "/_stats"  # announced just before the child listens

    def child_pid() -> int | None:
        try:
            found: int = httpx.get(url, timeout=10).json()["pid"]
        except httpx.ConnectError:
            return None
        return found

    pid: int = wait_until(child_pid, 20, "the loading child to listen")
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(50) in (0, -signal.SIGTERM)
    assert time.monotonic() - began < 15
    waiting.join(20)
    assert answers == [503]
    assert _gone(pid)


# ---------------------------------------------------------------- errors and auth


def test_bad_input_errors(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path, max_upload_mb=0.01))
    url = server.url
    cases = [
        (httpx.post(url + "/v1/chat/completions", content=b"{bad"), 400, "invalid_request"),
        (httpx.post(url + "/v1/chat/completions", json={"messages": []}), 400, "invalid_request"),
        (httpx.post(url + "/v1/chat/completions", json=[1, 2]), 400, "invalid_request"),
        (httpx.post(url + "/v1/chat/completions", json={"model": "zz"}), 404, "model_not_found"),
        (httpx.post(url + "/v1/chat/completions", content=b"x" * 20_000), 413, "body_too_large"),
        (httpx.get(url + "/v1/chat/completions"), 405, "method_not_allowed"),
        (httpx.get(url + "/nope"), 404, "not_found"),
        (
            httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", b"123")}),
            400,
            "invalid_request",
        ),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["code"] == code
        assert set(err) == {"message", "type", "param", "code"}
    # Chunked upload over the limit (no content-length): still 413.
    chunks = iter([b"x" * 8000, b"x" * 8000])
    resp = httpx.post(url + "/v1/audio/transcriptions", content=chunks)
    assert resp.status_code == 413


def test_api_and_admin_keys(start_server: StartServer, tmp_path: Path) -> None:
    cfg = two_llms(tmp_path, api_keys='["user-key"]', admin_keys='["admin-key"]')
    server = start_server(cfg, api_key="user-key")
    url = server.url
    assert httpx.get(url + "/health").status_code == 200  # always open
    assert httpx.get(url + "/status").status_code == 401
    assert httpx.get(url + "/status", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert server.get("/status", key="user-key").status_code == 200
    assert server.get("/status", key="admin-key").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(key="wrong"), "a")
    assert chat(server.client(key="user-key"), "a") == "a got a"
    denied = server.post("/models/a/unload", key="user-key")
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "permission_error"
    assert server.post("/models/a/unload", key="nope").status_code == 401
    assert httpx.post(url + "/models/a/unload").status_code == 401
    assert server.post("/models/a/unload", key="admin-key").status_code == 200


def test_default_bind_is_loopback() -> None:
    from llmux.config import Config

    assert Config().server.host == "127.0.0.1"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"  # a zombie is dead; PID 1 here may not reap it
    except FileNotFoundError:
        return True


def test_stop_that_hangs_is_killed(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
gpu: {{vram_gb: 4, reserve_gb: 0}}
models:
  stubborn:
    type: llm
    vram_gb: 3
    stop_timeout: 500ms
    cmd: {upstream_cmd(tmp_path, "stubborn", "--ignore-sigterm")}
  b: {{type: llm, vram_gb: 3, cmd: "{upstream_cmd(tmp_path, "b")}"}}
"""
    server = start_server(cfg)
    client = server.client()
    assert chat(client, "stubborn") == "stubborn got stubborn"
    pid = server.model("stubborn")["pid"]
    assert chat(client, "b") == "b got b"  # waited for SIGKILL of the stubborn one
    assert _gone(pid)
    assert server.model("stubborn")["state"] == "unloaded"
    assert server.status()["vram"]["reserved_gb"] == 3


def test_children_die_with_llmux(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    chat(server.client(), "a")
    pid = server.model("a")["pid"]
    server.proc.kill()  # SIGKILL: no chance to clean up; the parent-death signal does it
    server.proc.wait()
    wait_until(lambda: _gone(pid), 10, "the child to die with llmux")
