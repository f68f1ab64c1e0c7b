"""The wire models (llmux.api.wire) against a live server: /status, /v1/models and /events parse
into them, carry exactly the fields of DESIGN section 2 (in that order), and say the same when
written back; the CLI's view reads the same models; the values come from scheduling's snapshot."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from rich.console import Console

from llmux.api.openapi import openapi_document
from llmux.api.wire import ModelList, ModelStatus, PublicState, SchedulerEvent, Status
from llmux.cli import render_status
from llmux.config import parse_config
from llmux.scheduling.events import Notice
from llmux.scheduling.snapshot import EventSnapshot, ModelSnapshot, SchedulerSnapshot
from llmux.scheduling.state import PUBLIC_STATES, ModelState
from tests.conftest import Server, StartServer, upstream_cmd
from tests.test_cli import llmux

STATUS_KEYS = ["vram", "host", "models"]
VRAM_KEYS = ["budget_gb", "reserved_gb", "measured_gb"]
HOST_KEYS = ["budget_gb", "reserved_gb"]
MODEL_KEYS = [
    "id", "type", "tier", "state", "vram_gb", "placement", "measured_gb", "pinned", "in_flight",
    "queued", "last_used", "pid", "last_error", "sleep_level", "residual_gb", "host_gb",
]  # fmt: skip
ENTRY_KEYS = ["id", "object", "created", "owned_by", "llmux"]
LLMUX_KEYS = ["type", "tier", "state", "vram_gb", "in_flight", "alias_of"]
EVENT_KEYS = ["ts", "event", "model", "tier", "reason", "state", "reserved_gb", "budget_gb"]


def config_text(tmp_path: Path) -> str:
    return (
        "gpu:\n  vram_gb: 8\n"
        "models:\n"
        "  chat:\n    type: llm\n    vram_gb: 2\n    pinned: true\n    aliases: [gpt-wire]\n"
        f"    cmd: {upstream_cmd(tmp_path, 'chat')}\n"
        "  voice:\n    type: tts\n    vram_gb: 1.5\n"
        f"    cmd: {upstream_cmd(tmp_path, 'voice')}\n"
    )


@pytest.fixture
def server(start_server: StartServer, tmp_path: Path) -> Server:
    server = start_server(config_text(tmp_path))
    server.wait_state("chat", "ready")
    return server


def test_status_is_the_wire_model_with_exactly_its_fields(server: Server) -> None:
    server.client().chat.completions.create(
        model="gpt-wire", messages=[{"role": "user", "content": "hi"}]
    )
    body = server.status()
    assert list(body) == STATUS_KEYS
    assert list(body["vram"]) == VRAM_KEYS
    assert list(body["host"]) == HOST_KEYS
    assert [list(m) for m in body["models"]] == [MODEL_KEYS, MODEL_KEYS]

    status = Status.model_validate(body)
    assert status.model_dump(mode="json") == body  # nothing lost, nothing added, same order
    assert json.dumps(status.model_dump(mode="json")) == json.dumps(body)
    chat, voice = status.model("chat"), status.model("voice")
    assert (chat.state, chat.type, chat.pinned) == (PublicState.READY, "llm", True)
    assert chat.placement == "gpu"
    assert (chat.sleep_level, chat.residual_gb, chat.host_gb) == (None, 0.0, 0.0)  # no sleep:
    assert chat.pid is not None
    assert chat.last_used is not None
    assert (voice.state, voice.pid, voice.last_used) == (PublicState.UNLOADED, None, None)
    assert status.vram.reserved_gb == 2.0
    assert status.vram.measured_gb is None  # no NVML here
    assert status.host.reserved_gb == 0.0


def test_model_list_is_the_wire_model_with_exactly_its_fields(server: Server) -> None:
    resp = server.get("/v1/models")
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    assert list(body) == ["object", "data"]
    assert [list(e) for e in body["data"]] == [ENTRY_KEYS] * 3
    assert [list(e["llmux"]) for e in body["data"]] == [LLMUX_KEYS] * 3

    listed = ModelList.model_validate(body)
    assert listed.model_dump(mode="json") == body
    assert [(e.id, e.llmux.alias_of) for e in listed.data] == [
        ("chat", None),
        ("gpt-wire", "chat"),
        ("voice", None),
    ]
    # /v1/models and /status agree: both come from one snapshot of the scheduler.
    status = Status.model_validate(server.status())
    for entry in listed.data:
        m = status.model(entry.llmux.alias_of or entry.id)
        assert (entry.llmux.state, entry.llmux.tier, entry.llmux.vram_gb) == (
            m.state,
            m.tier,
            m.vram_gb,
        )


def read_events(server: Server, until: tuple[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(SSE event name, data) of /events?replay=true up to the event ``until`` (kind, model),
    which has happened already: the replay holds it."""
    found: list[tuple[str, dict[str, Any]]] = []
    with (
        httpx.Client(timeout=httpx.Timeout(30, read=60)) as client,
        client.stream("GET", server.url + "/events?replay=true") as resp,
    ):
        assert resp.status_code == 200
        name = ""
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                found.append((name, data))
                if (data["event"], data["model"]) == until:
                    return found
    raise AssertionError(f"the stream ended before {until}: {found}")


def test_events_are_the_wire_model_with_exactly_its_fields(server: Server) -> None:
    events = read_events(server, ("ready", "chat"))
    kinds = [name for name, _ in events]
    assert kinds[:3] == ["queued", "loading", "ready"]  # the pinned model's load at start
    for name, data in events:
        assert list(data) == EVENT_KEYS
        event = SchedulerEvent.model_validate(data)
        assert event.model_dump(mode="json") == data
        assert event.event is Notice(name)  # the SSE event is named by its kind
    ready = SchedulerEvent.model_validate(events[-1][1])
    assert (ready.model, ready.state, ready.reserved_gb, ready.budget_gb) == (
        "chat",
        PublicState.READY,
        2.0,
        7.5,  # 8 less the default reserve
    )


def test_the_cli_reads_the_same_model(server: Server) -> None:
    body = server.status()
    shown = []
    for given in (body, Status.model_validate(body)):
        console = Console(width=200, record=True, color_system=None)
        render_status(given, console, now=1_800_000_000.0)
        shown.append(console.export_text())
    assert shown[0] == shown[1]
    assert "VRAM 2.0 / 7.5 GB reserved" in shown[0]
    rows = {line.split()[0]: line.split() for line in shown[0].splitlines() if line.strip()}
    assert rows["chat*"][1:5] == ["llm", "llm", "ready", "2.0"]
    assert rows["voice"][1:5] == ["tts", "tts", "unloaded", "1.5"]


def test_the_cli_refuses_a_body_that_is_not_status(server: Server) -> None:
    body = server.status()
    del body["models"][0]["pid"]
    with pytest.raises(ValidationError, match="pid"):
        Status.model_validate(body)
    body = server.status()
    body["models"][1]["state"] = "asleep"
    with pytest.raises(ValidationError, match="state"):
        render_status(body, Console(record=True))
    # A field it does not know (a newer server) is ignored: the CLI still reads it.
    body = server.status()
    body["models"][0]["devices"] = [0]
    assert Status.model_validate(body).model("chat").state is PublicState.READY
    # A server older than sleep (no host, no sleep fields) is read as one without sleepers.
    body = server.status()
    del body["host"]
    for m in body["models"]:
        for key in ("sleep_level", "residual_gb", "host_gb"):
            del m[key]
    old = Status.model_validate(body)
    assert (old.host.budget_gb, old.host.reserved_gb) == (0.0, 0.0)
    assert old.model("chat").sleep_level is None


class NotLlmux(BaseHTTPRequestHandler):
    """A server whose /status is JSON, but not llmux's."""

    def do_GET(self) -> None:
        body = b'{"vram": {"budget_gb": 8}, "models": []}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_cli_says_so_when_status_is_not_llmuxs() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), NotLlmux) as http:
        threading.Thread(target=http.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{http.server_address[1]}"
        try:
            result = llmux("status", "--url", url)
        finally:
            http.shutdown()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"unexpected answer from {url}/status (is it llmux?): vram.reserved_gb:" in (
        result.stderr
    )


# ---------------------------------------------------------------- from the snapshot, in-process


def model_snapshot(model_id: str, **changes: Any) -> ModelSnapshot:
    fields: dict[str, Any] = {
        "id": model_id, "type": "llm", "tier": "llm", "state": ModelState.READY, "vram_gb": 0.1,
        "placement": "gpu", "measured_gb": None, "pinned": False, "in_flight": 0, "queued": 0,
        "last_used": None, "pid": 7, "last_error": None,
    }  # fmt: skip
    return ModelSnapshot(**{**fields, **changes})


def test_status_from_a_snapshot() -> None:
    snapshot = SchedulerSnapshot(
        budget_gb=1.0,
        reserved_gb=0.1 + 0.2,  # 0.30000000000000004: the wire rounds it (6 places)
        measured_gb=0.25,
        models=(
            model_snapshot("a", measured_gb=0.123),
            model_snapshot("b", placement="cpu", state=ModelState.LOADING, queued=2),
        ),
        host_budget_gb=32.0,
        host_reserved_gb=0.1 + 0.2,
    )
    status = Status.from_snapshot(snapshot)
    assert status.vram.model_dump() == {"budget_gb": 1.0, "reserved_gb": 0.3, "measured_gb": 0.25}
    assert status.host.model_dump() == {"budget_gb": 32.0, "reserved_gb": 0.3}
    assert [list(m) for m in status.model_dump(mode="json")["models"]] == [MODEL_KEYS] * 2
    b = status.model("b")
    assert (b.placement, b.state, b.queued) == ("cpu", PublicState.LOADING, 2)
    assert status.model_dump(mode="json")["models"][1]["state"] == "loading"
    assert status.model("a").measured_gb == 0.123
    with pytest.raises(ValidationError):  # counts are never negative
        ModelStatus.from_snapshot(model_snapshot("c", in_flight=-1))


def sleepers() -> SchedulerSnapshot:
    """One model of each sleep state: a sleep sent (suspending), asleep, waking."""
    sleep = {"sleep_level": 1, "residual_gb": 0.5, "vram_gb": 6.0}
    return SchedulerSnapshot(
        budget_gb=16.0,
        reserved_gb=6.5 + 0.5 + 6.0,
        measured_gb=None,
        models=(
            model_snapshot("going", state=ModelState.SUSPENDING, host_gb=12.0, **sleep),
            model_snapshot("asleep", state=ModelState.SLEEPING, host_gb=12.0, **sleep),
            model_snapshot("waking", state=ModelState.WAKING, **{**sleep, "sleep_level": 2}),
        ),
        host_budget_gb=40.0,
        host_reserved_gb=24.0,
    )


def test_users_see_the_public_states_only() -> None:
    assert [s.value for s in PublicState] == list(PUBLIC_STATES)
    assert {PublicState.of(s).value for s in ModelState} == set(PUBLIC_STATES)
    snapshot = sleepers()
    body = Status.from_snapshot(snapshot).model_dump(mode="json")
    # A sleep that is sent but not confirmed shows as sleeping: suspending never reaches users.
    assert [m["state"] for m in body["models"]] == ["sleeping", "sleeping", "waking"]
    asleep = body["models"][1]
    assert (asleep["sleep_level"], asleep["residual_gb"], asleep["host_gb"]) == (1, 0.5, 12.0)
    assert body["models"][2]["sleep_level"] == 2
    assert body["host"] == {"budget_gb": 40.0, "reserved_gb": 24.0}
    config = parse_config("models:\n  going:\n    type: llm\n    vram_gb: 6\n    cmd: x\n")
    listed = ModelList.from_snapshot(snapshot, config).model_dump(mode="json")
    assert listed["data"][0]["llmux"]["state"] == "sleeping"
    event = EventSnapshot(2, Notice.SLEEPING, "going", "llm", "admin", ModelState.SUSPENDING, 7, 16)
    sent = SchedulerEvent.from_snapshot(event).model_dump(mode="json")
    assert sent == event.as_dict()
    assert (sent["event"], sent["state"], sent["reason"]) == ("sleeping", "sleeping", "admin")
    with pytest.raises(ValidationError, match="state"):
        Status.model_validate({**body, "models": [{**asleep, "state": "suspending"}]})
    with pytest.raises(ValidationError, match="sleep_level"):
        Status.model_validate({**body, "models": [{**asleep, "sleep_level": 3}]})


def test_an_event_says_the_same_on_events_and_in_the_log() -> None:
    event = EventSnapshot(1.5, Notice.UNLOADING, "a", "llm", "priority", ModelState.UNLOADING, 1, 4)
    sent = SchedulerEvent.from_snapshot(event).model_dump(mode="json")
    assert sent == event.as_dict()  # the data of /events, the `event` of a JSON log line
    assert list(sent) == EVENT_KEYS
    assert (sent["event"], sent["state"]) == ("unloading", "unloading")


def test_the_document_describes_the_wire_models(tmp_path: Path) -> None:
    schemas = openapi_document(parse_config(config_text(tmp_path)))["components"]["schemas"]
    model_status = schemas["ModelStatus"]
    assert list(model_status["properties"]) == MODEL_KEYS
    assert model_status["required"] == MODEL_KEYS
    assert model_status["additionalProperties"] is False
    assert "null without NVML" in model_status["properties"]["measured_gb"]["description"]
    assert schemas["VramStatus"]["required"] == VRAM_KEYS
    assert schemas["Model"]["required"] == ENTRY_KEYS
    assert schemas["LlmuxInfo"]["required"] == LLMUX_KEYS
    assert schemas["SchedulerEvent"]["required"] == EVENT_KEYS
    assert schemas["HostStatus"]["required"] == HOST_KEYS
    assert schemas["Status"]["required"] == STATUS_KEYS
    assert schemas["PublicState"]["enum"] == list(PUBLIC_STATES)
    assert "suspending" not in json.dumps(schemas)  # an internal state, never on the wire
    assert schemas["Notice"]["enum"] == [n.value for n in Notice]
    assert schemas["ModelAction"]["required"] == ["id", "state"]
