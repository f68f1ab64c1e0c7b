"""Metrics, the /events stream, model logs and loading feedback, against a live server."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, StartServer, upstream_cmd, wait_until
from tests.test_api import chat, two_llms

pytestmark = pytest.mark.slow


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(server: Server) -> Samples:
    resp = server.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


class EventReader:
    """Reads /events in a thread; ``wait_for`` blocks until an event matches."""

    def __init__(self, server: Server) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._client = httpx.Client(timeout=None)
        self._ready = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, args=(server.url,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self, url: str) -> None:
        try:
            self._read(url)
        except Exception:
            if not self._closing:
                raise

    def _read(self, url: str) -> None:
        with self._client.stream("GET", url + "/events") as resp:
            kind = None
            for line in resp.iter_lines():
                if line.startswith(": llmux events"):
                    self._ready.set()
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    assert data["event"] == kind
                    with self._cond:
                        self.events.append(data)
                        self._cond.notify_all()

    def wait_for(self, event: str, model: str) -> list[dict[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(e["event"] == event and e["model"] == model for e in self.events), 30
            )
            assert ok, f"no {event} for {model} in {self.events}"
            return list(self.events)

    def close(self) -> None:
        self._closing = True
        self._client.close()


def test_metrics_move_with_load_evict_crash(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    client = server.client()
    m = metrics(server)
    assert value(m, "llmux_vram_budget_bytes") == 4e9
    assert value(m, "llmux_vram_reserved_bytes") == 0
    assert value(m, "llmux_model_state", model="a", tier="llm", state="unloaded") == 1

    chat(client, "a")
    chat(client, "a")
    chat(client, "b")  # evicts a (priority)
    with pytest.raises(Exception):  # noqa: B017,PT011 - b's child dies mid-request (502)
        chat(client, "b", "crash")
    server.wait_state("b", "unloaded")
    server.post("/models/a/load")
    server.post("/models/a/unload")  # admin eviction
    assert httpx.post(server.url + "/v1/chat/completions", json={"model": "zz"}).status_code == 404

    m = metrics(server)
    assert value(m, "llmux_model_loads_total", model="a", result="success") == 2
    assert value(m, "llmux_model_loads_total", model="b", result="success") == 1
    assert value(m, "llmux_model_load_seconds_count", model="a") == 2
    assert value(m, "llmux_evictions_total", model="a", reason="priority") == 1
    assert value(m, "llmux_evictions_total", model="a", reason="admin") == 1
    assert value(m, "llmux_evictions_total", model="b", reason="crash") == 1
    chat_path = "/v1/chat/completions"
    assert value(m, "llmux_requests_total", model="a", endpoint=chat_path, code="200") == 2
    assert value(m, "llmux_requests_total", model="b", endpoint=chat_path, code="502") == 1
    assert value(m, "llmux_requests_total", model="", endpoint=chat_path, code="404") == 1
    assert value(m, "llmux_request_queue_seconds_count", model="a") == 2
    assert value(m, "llmux_in_flight", model="a") == 0
    assert value(m, "llmux_queue_depth", model="b") == 0
    assert value(m, "llmux_model_state", model="b", tier="llm", state="unloaded") == 1
    assert value(m, "llmux_vram_reserved_bytes") == 0


def test_events_follow_a_swap(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    reader = EventReader(server)
    try:
        chat(server.client(), "a")
        chat(server.client(), "b")
        reader.wait_for("ready", "b")
        events = reader.wait_for("admitted", "b")[:-1]
    finally:
        reader.close()
    seen = [(e["event"], e["model"]) for e in events]
    assert seen == [
        ("queued", "a"),
        ("loading", "a"),
        ("ready", "a"),
        ("admitted", "a"),
        ("queued", "b"),
        ("unloading", "a"),
        ("unloaded", "a"),
        ("loading", "b"),
        ("ready", "b"),
    ]
    unloading = events[5]
    assert unloading["reason"] == "priority"
    assert unloading["tier"] == "llm"
    assert events[-1]["reserved_gb"] == 3
    assert events[6]["reserved_gb"] == 0
    assert all(e["budget_gb"] == 4 for e in events)


def test_model_logs(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    chat(server.client(), "a")
    lines = server.get("/models/a/logs").json()["lines"]
    assert any(line.startswith("upstream a pid") for line in lines)
    with (
        httpx.Client(timeout=30) as h,
        h.stream("GET", server.url + "/models/a/logs?follow=true") as r,
    ):
        first = next(r.iter_lines())
        assert first.startswith("upstream a pid")
    assert server.get("/models/nope/logs").status_code == 404


def test_loading_feedback_keeps_stream_alive(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
models:
  slow: {{type: llm, vram_gb: 1, cmd: "{upstream_cmd(tmp_path, "slow", "--ready-delay 4.5")}"}}
"""
    server = start_server(cfg)
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with (
        httpx.Client(timeout=30) as h,
        h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments[:2] == [": llmux loading slow", ": llmux loading slow"]
    assert lines[-1] == "data: [DONE]"
    # The openai SDK reads the same kind of stream unharmed.
    server.post("/models/slow/unload")
    stream = server.client().chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "slow got slow"


def test_loading_feedback_then_load_failure(start_server: StartServer, tmp_path: Path) -> None:
    cfg = f"""
models:
  never:
    type: llm
    vram_gb: 1
    ready_timeout: 2500ms
    cmd: {upstream_cmd(tmp_path, "never", "--never-ready")}
"""
    server = start_server(cfg)
    body = {"model": "never", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with (
        httpx.Client(timeout=30) as h,
        h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200  # the 200 went out with the first loading comment
        lines = [line for line in resp.iter_lines() if line]
    assert lines[0] == ": llmux loading never"
    assert lines[-2] == "event: error"
    error = json.loads(lines[-1][6:])["error"]
    assert error["code"] == "model_load_failed"
    assert "data: [DONE]" not in lines
    wait_until(lambda: server.model("never")["last_error"], 10, "last_error")


def test_json_logs_carry_each_decision(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path), args=("--log-format", "json"))
    chat(server.client(), "a")
    chat(server.client(), "b")
    server.stop()
    records = [json.loads(line) for line in server.log.read_text().splitlines() if line]
    events = [r["event"] for r in records if "event" in r]
    evicted = next(e for e in events if e["event"] == "unloading" and e["model"] == "a")
    assert evicted["reason"] == "priority"
    assert evicted["tier"] == "llm"
    assert evicted["budget_gb"] == 4
    assert [e["event"] for e in events if e["model"] == "b"][:3] == ["queued", "loading", "ready"]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_open_streams_do_not_hold_up_a_shutdown(start_server: StartServer, tmp_path: Path) -> None:
    """An open /events stream (a status page left open) and a followed log end at SIGTERM:
    llmux stops at once instead of waiting shutdown_grace (30 s) for streams that never end."""
    server = start_server(two_llms(tmp_path))
    chat(server.client(), "a")
    with (
        httpx.Client(timeout=60) as client,
        client.stream("GET", server.url + "/events") as events,
        client.stream("GET", server.url + "/models/a/logs?follow=true") as logs,
    ):
        assert next(events.iter_lines()).startswith(": llmux events")
        assert logs.status_code == 200
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(25) in (0, -signal.SIGTERM)
        assert time.monotonic() - began < 10
