"""The Ollama API (issue 13): the ``ollama`` package's own client against a real ``llmux serve``.

On stand-in children (tests/upstream.py): every route, streamed and not, ``name:latest``, an
unknown model, tool calls both ways (streamed deltas assembled), a crash mid-stream, keys, the
metrics. On the real default stack (``engines``): SmolLM2 answers "Paris".
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, StartServer, upstream_cmd
from tests.engine_children import require_engine

KEY = "ollama-key"
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


def config(tmp_path: Path, *, keys: bool = False) -> str:
    head = f"server:\n  api_keys: [{KEY}]\n" if keys else ""
    return (
        head + "gpu:\n  vram_gb: 8\n"
        "models:\n"
        "  chat:\n    type: llm\n    vram_gb: 1\n    aliases: [gpt-x]\n"
        f"    ttl: 600\n    cmd: {upstream_cmd(tmp_path, 'chat')}\n"
        "  vectors:\n    type: embedding\n    vram_gb: 1\n"
        f"    cmd: {upstream_cmd(tmp_path, 'vectors')}\n"
        "  voice:\n    type: tts\n    vram_gb: 1\n"
        f"    cmd: {upstream_cmd(tmp_path, 'voice')}\n"
    )


@pytest.fixture
def server(start_server: StartServer, tmp_path: Path) -> Server:
    return start_server(config(tmp_path))


_OPEN: list[ollama.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()  # type: ignore[no-untyped-call]


def client(server: Server, key: str | None = None, timeout: float = 60) -> ollama.Client:
    """The ``ollama`` package's client for ``server`` (closed after the test)."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    found = ollama.Client(host=server.url, timeout=timeout, headers=headers)
    _OPEN.append(found)
    return found


def test_version_tags_show_ps(server: Server) -> None:
    c = client(server)
    resp = httpx.get(server.url + "/api/version", timeout=10)
    assert resp.status_code == 200
    assert isinstance(resp.json()["version"], str)
    listed = c.list()
    assert [m.model for m in listed.models] == ["chat:latest", "vectors:latest"]
    assert listed.models[0].details is not None
    assert listed.models[0].details.family == "llmux"
    assert listed.models[0].size == 1_000_000_000
    assert c.ps().models == []  # nothing loaded yet

    shown = c.show("chat:latest")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.details is not None
    assert shown.details.family == "llmux"
    assert c.show("vectors").capabilities == ["embedding"]

    c.chat("chat", messages=[{"role": "user", "content": "hi"}], stream=False)
    running = c.ps().models
    assert [m.model for m in running] == ["chat:latest"]
    assert running[0].size_vram == 1_000_000_000
    assert running[0].expires_at is not None  # ttl: 600

    with pytest.raises(ollama.ResponseError) as info:
        c.show("voice")
    assert info.value.status_code == 400  # a TTS model: not Ollama's business


def test_chat_stream_and_not(server: Server) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "hello"}]
    whole = c.chat("chat", messages=messages, stream=False)
    assert whole.message.content == "chat got chat"
    assert whole.done is True
    assert whole.done_reason == "stop"
    assert whole.eval_count == 3
    parts = list(c.chat("chat:latest", messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "chat got chat"
    assert len(parts) == 4  # one object per SSE chunk, then done
    assert [p.done for p in parts] == [False, False, False, True]
    assert parts[-1].done_reason == "stop"
    # An alias, with its :latest, and options and a format, mapped onto the OpenAI fields.
    options = {"temperature": 0.1, "num_predict": 5, "stop": ["x"], "seed": 3, "num_ctx": 99}
    out = c.chat("gpt-x:latest", messages=messages, options=options, format="json", stream=False)
    assert out.message.content == "chat got gpt-x"
    # No messages: Ollama's way to load a model.
    loaded = c.chat("chat", messages=[], stream=False)
    assert loaded.done_reason == "load"


def test_generate_stream_and_not(server: Server) -> None:
    c = client(server)
    whole = c.generate("chat", prompt="hello", system="be brief", stream=False)
    assert whole.response == "chat got chat"
    assert whole.done
    parts = list(c.generate("chat", prompt="hello", stream=True))
    assert "".join(p.response or "" for p in parts) == "chat got chat"
    assert parts[-1].done
    assert not any(p.done for p in parts[:-1])
    raw = c.generate("chat", prompt="hello", raw=True, stream=False)  # /v1/completions
    assert raw.response == "chat got chat"
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
    seen = c.generate("chat", prompt="what is this", images=[image], stream=False)
    assert seen.response == "chat got chat"
    assert c.generate("chat", prompt="", stream=False).done_reason == "load"


def test_embed_and_embeddings(server: Server) -> None:
    c = client(server)
    one = c.embed("vectors", input="hello")
    assert len(one.embeddings) == 1
    assert len(one.embeddings[0]) == 8
    two = c.embed("vectors:latest", input=["a", "b"])
    assert len(two.embeddings) == 2
    assert two.embeddings[0] != two.embeddings[1]
    assert two.embeddings[0] == c.embed("vectors", input="a").embeddings[0]
    old = c.embeddings("vectors", prompt="hello")
    assert list(old.embedding) == list(one.embeddings[0])


def test_unknown_model_and_wrong_type(server: Server) -> None:
    c = client(server)
    with pytest.raises(ollama.ResponseError) as info:
        c.chat("nope", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert info.value.status_code == 404
    assert info.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as info:
        list(c.chat("nope:latest", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        c.generate("voice", prompt="hi", stream=False)
    assert info.value.status_code == 400
    for path, body in [
        ("/api/chat", b"not json"),
        ("/api/chat", b"[1]"),
        ("/api/chat", b'{"messages": []}'),
        ("/api/chat", b'{"model": "chat", "messages": [{"role": "user", "content": 5}]}'),
        ("/api/chat", b'{"model": "chat", "messages": "hi"}'),
        ("/api/chat", b'{"model": "chat", "stream": "yes"}'),
        ("/api/generate", b'{"model": "chat", "prompt": "x", "options": {"top_k": "a"}}'),
        ("/api/generate", b'{"model": "chat", "prompt": "x", "format": 5}'),
        ("/api/generate", b'{"model": "chat", "prompt": "x", "images": ["%%%"]}'),
        ("/api/embed", b'{"model": "vectors", "input": 5}'),
    ]:
        resp = httpx.post(server.url + path, content=body, timeout=10)
        assert resp.status_code == 400, (path, body, resp.text)
        assert set(resp.json()) == {"error"}
        assert isinstance(resp.json()["error"], str)
    resp = httpx.get(server.url + "/api/pull", timeout=10)
    assert resp.status_code == 404
    assert set(resp.json()) == {"error"}


def test_tool_call_round_trip(server: Server) -> None:
    c = client(server)
    ask = [{"role": "user", "content": "call tool"}]
    expected = [
        ("get_weather", {"city": "Tokyo", "n": 1}),
        ("get_weather", {"city": "Paris", "n": 2}),
    ]
    whole = c.chat("chat", messages=ask, tools=TOOLS, stream=False)
    calls = whole.message.tool_calls or []
    assert [(t.function.name, dict(t.function.arguments)) for t in calls] == expected
    assert whole.done_reason == "stop"

    parts = list(c.chat("chat", messages=ask, tools=TOOLS, stream=True))
    streamed = [t for p in parts for t in (p.message.tool_calls or [])]
    assert [(t.function.name, dict(t.function.arguments)) for t in streamed] == expected
    assert parts[-1].done

    # The round trip: the assistant's calls (arguments as objects, no ids) and a tool result,
    # tied to its call by tool_name.
    history: list[dict[str, Any]] = [
        *ask,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
                {"function": {"name": "lookup", "arguments": {"q": 1}}},
            ],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    answer = c.chat("chat", messages=history, tools=TOOLS, stream=False)
    assert answer.message.content == "chat got tool call_1_0: sunny"


def test_crash_mid_stream_is_an_error_not_done(server: Server) -> None:
    c = client(server)
    got: list[Any] = []
    stream = c.chat("chat", messages=[{"role": "user", "content": "crash"}], stream=True)
    with pytest.raises(ollama.ResponseError) as info:
        got.extend(stream)
    assert "chat" in info.value.error
    assert got  # the words before the crash...
    assert not any(p.done for p in got)  # ...never done
    # Raw NDJSON: the last line is the error object (the next request loads the model again).
    with httpx.stream(
        "POST",
        server.url + "/api/generate",
        json={"model": "chat", "prompt": "crash"},
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        lines = [orjson.loads(line) for line in resp.iter_lines() if line]
    assert set(lines[-1]) == {"error"}
    assert not any(line.get("done") for line in lines)
    # Not streamed: the child dies before answering, a 502.
    with pytest.raises(ollama.ResponseError) as info:
        c.chat("chat", messages=[{"role": "user", "content": "crash"}], stream=False)
    assert info.value.status_code == 502


def test_client_that_leaves_releases_the_lease(server: Server) -> None:
    """A client that hangs up mid-stream: the child's request is cancelled (its connection
    closed) and the lease released; the model serves the next request."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hold"}]}
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        first = orjson.loads(next(resp.iter_lines()))
        assert first["done"] is False
        server.upstream_wait("chat", held=1)
    server.upstream_wait("chat", cancelled=1)
    # A leaked lease would hold the drain of an unload for ever.
    assert server.post("/models/chat/unload").status_code == 200
    answer = client(server).chat("chat", messages=[{"role": "user", "content": "hi"}])
    assert answer.message.content == "chat got chat"


def test_keys(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(config(tmp_path, keys=True), api_key=KEY)
    for key in (None, "wrong"):
        with pytest.raises(ollama.ResponseError) as info:
            client(server, key).list()
        assert info.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as info:
            client(server, key).chat("chat", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 401
    good = client(server, KEY)
    assert [m.model for m in good.list().models] == ["chat:latest", "vectors:latest"]
    assert good.generate("chat", prompt="hi", stream=False).response == "chat got chat"
    two = [("authorization", f"Bearer {KEY}")] * 2
    resp = httpx.get(server.url + "/api/tags", headers=two, timeout=10)
    assert resp.status_code == 400


def test_metrics_count_the_ollama_endpoints(server: Server) -> None:
    c = client(server)
    c.chat("chat", messages=[{"role": "user", "content": "hi"}], stream=False)
    list(c.generate("chat", prompt="hi", stream=True))
    c.embed("vectors", input="x")
    with pytest.raises(ollama.ResponseError):
        c.chat("nope", messages=[{"role": "user", "content": "hi"}])
    counted = {
        (s.labels["model"], s.labels["endpoint"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(server.get("/metrics").text)
        if family.name == "llmux_requests"
        for s in family.samples
        if s.name == "llmux_requests_total"
    }
    assert counted[("chat", "/api/chat", "200")] == 1
    assert counted[("chat", "/api/generate", "200")] == 1
    assert counted[("vectors", "/api/embed", "200")] == 1
    assert counted[("", "/api/chat", "404")] == 1


# ---------------------------------------------------------------- the real default stack

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.mark.engines
@pytest.mark.slow
def test_default_stack_smollm2_over_ollama(start_server: StartServer) -> None:
    require_engine("llama-cpp", "smollm2-135m", "llama_cpp")
    server = start_server(None)
    c = client(server, timeout=300)
    names = [m.model for m in c.list().models]
    assert names == ["smollm2:latest"]
    assert c.show("smollm2").capabilities == ["completion"]
    options = {"temperature": 0, "num_predict": 32}
    whole = c.chat("smollm2", messages=PARIS, options=options, stream=False)
    assert "Paris" in (whole.message.content or "")
    parts = list(c.chat("smollm2:latest", messages=PARIS, options=options, stream=True))
    assert "Paris" in "".join(p.message.content or "" for p in parts)
    assert parts[-1].done
    generated = c.generate("smollm2", prompt=PARIS[0]["content"], options=options, stream=False)
    assert "Paris" in (generated.response or "")
    running = [m.model for m in c.ps().models]
    assert running == ["smollm2:latest"]
