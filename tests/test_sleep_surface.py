"""Sleep on the public surface (DESIGN section 2): the metrics of sleeps and wakes, read from an
``Observer`` fed scheduler notices in-process; the admin route ``POST /models/{id}/sleep`` and
``llmux sleep`` against a live server (its refusals: 409, 404, 403, and the CLI's one line);
and one admin sleep and wake of a real sleepable child (tests/sleepy.py, vLLM's sleep API) as
/status, /v1/models, /events, /metrics and ``llmux status`` show it.

The scheduling of sleeps (rules 11-13) is tested where it is decided; here only what the
surface adds to it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmux.observe import Observer
from llmux.scheduling.events import Notice
from llmux.scheduling.snapshot import EventSnapshot, SchedulerSnapshot
from llmux.scheduling.state import PUBLIC_STATES, ModelState
from tests.conftest import StartServer
from tests.test_api import chat, two_llms
from tests.test_cli import against, assert_clean, llmux, table_rows
from tests.test_observe import EventReader, metrics
from tests.test_wire import sleepers

SLEEPY = Path(__file__).parent / "sleepy.py"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(observer: Observer) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(observer.registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def observed(snapshot: SchedulerSnapshot) -> Observer:
    observer = Observer()
    observer.bind(lambda: snapshot)
    return observer


def notice(kind: Notice, model: str, state: ModelState, reason: str = "") -> EventSnapshot:
    return EventSnapshot(1.0, kind, model, "llm", reason, state, 0.0, 16.0)


# ---------------------------------------------------------------- metrics, in-process


def test_state_gauge_and_host_memory() -> None:
    samples = scrape(observed(sleepers()))
    assert value(samples, "llmux_host_budget_bytes") == 40e9
    assert value(samples, "llmux_host_reserved_bytes") == 24e9
    assert value(samples, "llmux_vram_reserved_bytes") == 13e9
    # Exactly the seven public states per model: a sleep sent (suspending) is "sleeping".
    for model, now in [("going", "sleeping"), ("asleep", "sleeping"), ("waking", "waking")]:
        states = {
            dict(labels)["state"]: v
            for (name, labels), v in samples.items()
            if name == "llmux_model_state" and ("model", model) in labels
        }
        assert list(states) == list(PUBLIC_STATES), model
        assert states == {s: 1.0 if s == now else 0.0 for s in PUBLIC_STATES}, model


def test_sleeps_and_wakes_are_counted_apart_from_evictions() -> None:
    observer = observed(sleepers())
    for kind, state, reason in [
        (Notice.SLEEPING, ModelState.SUSPENDING, "priority"),
        (Notice.ASLEEP, ModelState.SLEEPING, ""),
        (Notice.WAKING, ModelState.WAKING, ""),
        (Notice.AWAKE, ModelState.READY, "0.4"),
        (Notice.SLEEPING, ModelState.SUSPENDING, "admin"),
        (Notice.SLEEP_FAILED, ModelState.UNLOADING, "the engine said 500"),
        (Notice.UNLOADING, ModelState.UNLOADING, "priority"),  # a failed sleep stops it
        (Notice.UNLOADED, ModelState.UNLOADED, ""),
    ]:
        observer.record(notice(kind, "m", state, reason))
    for kind, state in [
        (Notice.SLEEPING, ModelState.SUSPENDING),
        (Notice.ASLEEP, ModelState.SLEEPING),
        (Notice.WAKING, ModelState.WAKING),
        (Notice.WAKE_FAILED, ModelState.UNLOADING),
    ]:
        observer.record(notice(kind, "n", state, "priority"))
    samples = scrape(observer)
    sleeps = "llmux_model_sleeps_total"
    assert value(samples, sleeps, model="m", reason="priority", result="success") == 1
    assert value(samples, sleeps, model="m", reason="admin", result="failure") == 1
    assert value(samples, sleeps, model="n", reason="priority", result="success") == 1
    assert value(samples, "llmux_model_wakes_total", model="m", result="success") == 1
    assert value(samples, "llmux_model_wakes_total", model="n", result="failure") == 1
    assert value(samples, "llmux_model_wakes_total", model="n", result="success") is None
    # The wake's seconds: WAKING to AWAKE, a success only; in-process it is well under 50 ms.
    assert value(samples, "llmux_model_wake_seconds_count", model="m") == 1
    assert value(samples, "llmux_model_wake_seconds_bucket", model="m", le="0.05") == 1
    assert value(samples, "llmux_model_wake_seconds_bucket", model="m", le="120.0") == 1
    assert value(samples, "llmux_model_wake_seconds_count", model="n") is None
    # A sleep is not an eviction: evictions count stops only (here the stop after the failure).
    evictions = {k: v for k, v in samples.items() if k[0] == "llmux_evictions_total"}
    assert evictions == {("llmux_evictions_total", (("model", "m"), ("reason", "priority"))): 1}
    # Nor are a wake or a sleep loads.
    assert not [k for k in samples if k[0] == "llmux_model_loads_total"]


def test_a_sleep_reason_is_never_free_text() -> None:
    observer = observed(sleepers())
    observer.record(notice(Notice.SLEEPING, "m", ModelState.SUSPENDING, "something new"))
    observer.record(notice(Notice.SLEEP_FAILED, "m", ModelState.UNLOADING, "a long error"))
    observer.record(notice(Notice.SLEEP_FAILED, "x", ModelState.UNLOADING, "no SLEEPING seen"))
    reasons = {
        dict(labels)["reason"]
        for (name, labels) in scrape(observer)
        if name == "llmux_model_sleeps_total"
    }
    assert reasons == {"priority"}


# ---------------------------------------------------------------- the route and the CLI, live


@pytest.mark.slow
def test_sleep_route_refuses_what_cannot_sleep(start_server: StartServer, tmp_path: Path) -> None:
    cfg = two_llms(tmp_path, api_keys='["user-key"]', admin_keys='["admin-key"]')
    server = start_server(cfg, api_key="user-key", admin_key="admin-key")
    assert server.post("/models/a/load").status_code == 200

    refused = server.post("/models/alpha/sleep")  # an alias names its model; a has no sleep:
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "cannot_sleep")
    assert list(error) == ["message", "type", "param", "code"]
    assert server.model("a")["state"] == "ready"  # refused: nothing happened to it
    assert server.model("a")["sleep_level"] is None

    missing = server.post("/models/nope/sleep")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    denied = server.post("/models/a/sleep", key="user-key")
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "permission_error"
    assert server.post("/models/a/sleep", key="nope").status_code == 401
    assert server.get("/models/a/sleep").status_code == 405

    # The CLI: one line, exit 1, no traceback; the same flags as `llmux unload`.
    cannot = llmux(*against(server, "sleep", "a", key="admin-key"))
    assert_clean(cannot)
    assert cannot.returncode == 1
    assert cannot.stdout == ""
    assert len(cannot.stderr.splitlines()) == 1
    assert cannot.stderr.strip() == "llmux: " + " ".join(error["message"].split())
    nope = llmux(*against(server, "sleep", "nope", key="admin-key"))
    assert (nope.returncode, nope.stderr.strip()) == (1, "llmux: no model named nope")
    not_admin = llmux(*against(server, "sleep", "a", key="user-key"))
    assert not_admin.returncode == 4
    assert "needs an admin key" in not_admin.stderr
    assert server.model("a")["state"] == "ready"


def sleepy_config(tmp: Path) -> str:
    return f"""
gpu: {{vram_gb: 8, reserve_gb: 0}}
host: {{ram_gb: 20}}
models:
  s:
    type: llm
    vram_gb: 4
    aliases: [ess]
    cmd: {sys.executable} {SLEEPY} --port ${{PORT}} --name s --announce {tmp}
    sleep: {{level: 1, host_gb: 6, residual_gb: 0.5, api: vllm}}
"""


@pytest.mark.slow
def test_an_admin_sleep_and_a_wake_as_users_see_them(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(sleepy_config(tmp_path))
    client = server.client()
    reader = EventReader(server)
    try:
        assert chat(client, "s").startswith("s pid ")
        pid = server.model("s")["pid"]

        slept = llmux(*against(server, "sleep", "ess"))  # an alias names its model
        assert_clean(slept)
        assert (slept.returncode, slept.stdout) == (0, "s: sleeping\n")
        body = server.status()
        assert body["host"] == {"budget_gb": 20.0, "reserved_gb": 6.0}
        assert body["vram"]["reserved_gb"] == 0.5  # the residual only
        s = body["models"][0]
        assert (s["state"], s["pid"]) == ("sleeping", pid)  # the same process, asleep
        assert (s["sleep_level"], s["residual_gb"], s["host_gb"]) == (1, 0.5, 6.0)
        listed = server.get("/v1/models").json()["data"]
        assert [e["llmux"]["state"] for e in listed] == ["sleeping", "sleeping"]

        m = metrics(server)
        assert value(m, "llmux_model_state", model="s", tier="llm", state="sleeping") == 1
        assert value(m, "llmux_model_state", model="s", tier="llm", state="suspending") is None
        assert value(m, "llmux_host_budget_bytes") == 20e9
        assert value(m, "llmux_host_reserved_bytes") == 6e9
        assert value(m, "llmux_vram_reserved_bytes") == 0.5e9
        sleeps = "llmux_model_sleeps_total"
        assert value(m, sleeps, model="s", reason="admin", result="success") == 1
        assert value(m, "llmux_evictions_total", model="s", reason="admin") is None

        shown = llmux(*against(server, "status"))
        assert shown.returncode == 0, shown.stderr
        assert "HOST 6.0 / 20.0 GB held by sleeping models" in shown.stdout
        assert table_rows(shown.stdout)["s"][1:6] == ["llm", "llm", "sleeping", "4.0", "L1"]

        # A request wakes it: the same process answers.
        assert chat(client, "s") == f"s pid {pid} got s"
        events = reader.wait_for("awake", "s")
    finally:
        reader.close()
    assert {e["state"] for e in events} <= set(PUBLIC_STATES)
    sleep_and_wake = [
        (e["event"], e["state"])
        for e in events
        if e["event"] in ("sleeping", "asleep", "waking", "awake")
    ]
    assert sleep_and_wake == [
        ("sleeping", "sleeping"),  # a sleep sent (suspending) shows as sleeping
        ("asleep", "sleeping"),
        ("waking", "waking"),
        ("awake", "ready"),
    ]
    assert next(e for e in events if e["event"] == "sleeping")["reason"] == "admin"
    m = metrics(server)
    assert value(m, "llmux_model_wakes_total", model="s", result="success") == 1
    assert value(m, "llmux_model_wake_seconds_count", model="s") == 1
    assert value(m, "llmux_model_loads_total", model="s", result="success") == 1  # one start
    assert value(m, "llmux_host_reserved_bytes") == 0
    assert server.model("s")["state"] == "ready"

    again = server.post("/models/s/sleep")
    assert again.status_code == 200, again.text
    assert again.json() == {"id": "s", "state": "sleeping"}
