"""Sleeping models end to end (DESIGN rules 11-13): a real `llmux serve`, real children
(``tests/sleepy.py``, a stand-in that serves exactly vLLM's or SGLang's sleep API), real HTTP,
the openai SDK as the client.

Every model here is 6 GB on a 10 GB budget: two never fit together, so a request for one
evicts the other, which sleeps (when host memory allows) instead of stopping.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TESTS, Server, StartServer, wait_until

SLEEPY = TESTS / "sleepy.py"


def sleepy_cmd(workdir: Path, name: str, *extra: str) -> str:
    marks = workdir / "marks"
    marks.mkdir(exist_ok=True)
    args = " ".join(extra)
    return (
        f"{sys.executable} {SLEEPY} --port ${{PORT}} --name {name} --announce {workdir} "
        f"--marks {marks} {args}"
    ).strip()


def config(
    workdir: Path,
    models: dict[str, dict[str, Any]],
    *,
    host_gb: float = 100,
    budget: float = 10,
) -> str:
    lines = [
        f"gpu: {{vram_gb: {budget}, reserve_gb: 0}}",
        f"host: {{ram_gb: {host_gb}}}",
        "models:",
    ]
    for mid, m in models.items():
        extra = m.pop("extra", ())
        spec = {
            "type": "llm",
            "vram_gb": 6,
            "cmd": sleepy_cmd(workdir, mid, *extra),
            "stop_timeout": 5,
            "ready_timeout": 20,
            **m,
        }
        lines.append(f"  {mid}: {json.dumps(spec)}")
    return "\n".join(lines) + "\n"


def marks(server: Server, name: str) -> dict[str, Any]:
    """The stand-in's counters as it last wrote them (also after its process is gone)."""
    found: dict[str, Any] = json.loads((server.workdir / "marks" / f"{name}.json").read_text())
    return found


def stats(server: Server, name: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(server.upstream(name) + "/_stats", timeout=10).json()
    return found


LIFECYCLE = {
    "loading",
    "ready",
    "draining",
    "unloading",
    "unloaded",
    "load_failed",
    "crashed",
    "sleeping",
    "asleep",
    "sleep_failed",
    "waking",
    "awake",
    "wake_failed",
}


def lifecycle(server: Server, model: str) -> list[str]:
    """The model's lifecycle notices, in order, from llmux's JSON log lines."""
    out = []
    for line in server.log.read_text().splitlines():
        if line.startswith("{") and '"event":{' in line:
            event = json.loads(line)["event"]
            if event["model"] == model and event["event"] in LIFECYCLE:
                out.append(event["event"])
    return out


def chat(server: Server, model: str) -> str:
    reply = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}]
    )
    text = reply.choices[0].message.content
    assert text is not None
    return text


SLEEP1 = {"level": 1, "host_gb": 6, "residual_gb": 0.5}


def test_an_evicted_model_sleeps_with_the_same_pid_and_a_request_wakes_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(
        config(tmp_path, {"a": {"sleep": SLEEP1}, "b": {"sleep": SLEEP1}}),
        args=("--log-format", "json"),
    )
    first = chat(server, "a")
    pid_a = server.model("a")["pid"]
    assert f"pid {pid_a} got a" in first

    assert "got b" in chat(server, "b")
    a = server.wait_state("a", "sleeping")
    assert a["pid"] == pid_a  # the process stays
    assert stats(server, "a")["state"] == "asleep"
    status = server.status()
    assert status["vram"]["reserved_gb"] == pytest.approx(6.5)  # b + a's residual
    assert status["host"] == {"budget_gb": 100, "reserved_gb": 6}

    # A request wakes it: the same process serves (no second start), and b sleeps.
    assert f"pid {pid_a} got a" in chat(server, "a")
    assert server.model("a")["pid"] == pid_a
    server.wait_state("b", "sleeping")
    a_stats = stats(server, "a")
    assert a_stats["counts"].get("sleep") == 1
    assert a_stats["counts"].get("wake_up") == 1
    assert [c["path"] for c in a_stats["calls"]] == ["/sleep", "/wake_up"]
    assert a_stats["calls"][0]["query"] == "level=1"
    assert a_stats["served_while_asleep"] == 0
    assert stats(server, "b")["served_while_asleep"] == 0
    assert lifecycle(server, "a") == ["loading", "ready", "sleeping", "asleep", "waking", "awake"]

    metrics = server.get("/metrics").text
    assert 'llmux_model_wakes_total{model="a",result="success"} 1.0' in metrics
    assert "llmux_host_budget_bytes 1e+11" in metrics


def test_host_budget_pushes_out_the_older_sleeper(
    start_server: StartServer, tmp_path: Path
) -> None:
    # Host room for one sleeper: when b goes to sleep, the older sleeper (a) is stopped.
    server = start_server(
        config(
            tmp_path,
            {"a": {"sleep": SLEEP1}, "b": {"sleep": SLEEP1}, "c": {"sleep": SLEEP1}},
            host_gb=7,
        )
    )
    chat(server, "a")
    chat(server, "b")
    server.wait_state("a", "sleeping")
    chat(server, "c")
    server.wait_state("b", "sleeping")
    server.wait_state("a", "unloaded")
    assert server.model("a")["pid"] is None
    assert server.status()["host"]["reserved_gb"] == 6
    assert marks(server, "a")["counts"].get("wake_up") is None  # stopped asleep, never woken


def test_a_level_2_wake_reloads_the_weights(start_server: StartServer, tmp_path: Path) -> None:
    sleep2 = {"level": 2, "residual_gb": 0.5}
    server = start_server(config(tmp_path, {"a": {"sleep": sleep2}, "b": {"sleep": sleep2}}))
    chat(server, "a")
    chat(server, "b")
    server.wait_state("a", "sleeping")
    assert server.status()["host"]["reserved_gb"] == 0  # level 2 keeps nothing in host RAM
    assert "got a" in chat(server, "a")  # a 500 "weights not loaded" if the reload was skipped
    a = stats(server, "a")
    assert [(c["path"], c["query"]) for c in a["calls"]] == [
        ("/sleep", "level=2"),
        ("/wake_up", ""),
        ("/collective_rpc", ""),
        ("/reset_prefix_cache", ""),
    ]
    assert a["calls"][2]["body"] == {"method": "reload_weights"}
    assert a["served_without_weights"] == 0


def test_a_failed_wake_falls_back_to_a_cold_load(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(
        config(tmp_path, {"a": {"sleep": SLEEP1, "extra": ("--wake-fail",)}, "b": {}}),
        args=("--log-format", "json"),
    )
    chat(server, "a")
    pid_a = server.model("a")["pid"]
    chat(server, "b")  # b cannot sleep: a sleeps, b loads
    server.wait_state("a", "sleeping")
    # The wake fails: the process is stopped and the request is served by a cold load.
    reply = chat(server, "a")
    a = server.model("a")
    assert a["state"] == "ready"
    assert a["pid"] != pid_a
    assert f"pid {a['pid']} got a" in reply
    assert a["last_error"] is None  # the cold load after the failed wake succeeded
    assert lifecycle(server, "a")[2:] == [
        "sleeping",
        "asleep",
        "waking",
        "wake_failed",
        "unloading",
        "unloaded",
        "loading",
        "ready",
    ]
    metrics = server.get("/metrics").text
    assert 'llmux_model_wakes_total{model="a",result="failure"} 1.0' in metrics


def test_a_protected_tier_is_not_put_to_sleep_by_a_lower_one(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(
        config(tmp_path, {"ears": {"type": "asr", "sleep": SLEEP1}, "chat": {"sleep": SLEEP1}})
    )
    server.post("/models/ears/load").raise_for_status()
    with pytest.raises(openai.APIStatusError) as err:
        chat(server, "chat")
    assert err.value.status_code == 503
    assert "insufficient_vram" in err.value.response.text
    ears = server.model("ears")
    assert ears["state"] == "ready"
    assert stats(server, "ears")["counts"].get("sleep") is None


def test_admin_sleep_and_its_conflicts(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(config(tmp_path, {"a": {"sleep": SLEEP1}, "plain": {}}))
    assert server.post("/models/a/sleep").status_code == 409  # not loaded
    chat(server, "a")
    resp = server.post("/models/a/sleep")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "sleeping"
    assert stats(server, "a")["state"] == "asleep"
    resp = server.post("/models/plain/sleep")
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "cannot_sleep"
    # An admin unload stops a sleeping model.
    assert server.post("/models/a/unload").status_code == 200
    assert server.model("a")["state"] == "unloaded"
    wait_until(lambda: marks(server, "a")["state"] == "asleep", 5, "last marks")
