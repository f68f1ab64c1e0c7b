"""``GET /openapi.json`` (DESIGN section 2): open, a valid OpenAPI 3.1 document, one entry for
every route the app serves and none for a route it does not, the bearer scheme exactly on the
routes that need a key, and built from the config in force. The fuzz run against it is
tests/test_fuzz.py; the tests here also show that its checks catch a document that lies."""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import (
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from starlette.routing import BaseRoute, Mount, Route

from llmux.api.app import LlmuxApp
from llmux.api.openapi import openapi_document
from llmux.api.relay import RELAY_PATHS
from llmux.backends.process import ProcessLauncher
from llmux.config import parse_config
from tests.conftest import Server, StartServer, upstream_cmd, wait_until

API_KEY = "doc-user"
ADMIN_KEY = "doc-admin"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def config_text(tmp_path: Path, *, speech_chars: int = 100, extra_alias: str = "") -> str:
    return (
        "server:\n"
        f"  api_keys: [{API_KEY}]\n"
        f"  admin_keys: [{ADMIN_KEY}]\n"
        f"  max_speech_chars: {speech_chars}\n"
        "gpu:\n  vram_gb: 8\n"
        "models:\n"
        "  chat:\n    type: llm\n    vram_gb: 1\n"
        f"    aliases: [gpt-doc{extra_alias}]\n"
        f"    cmd: {upstream_cmd(tmp_path, 'chat')}\n"
        "  voice:\n    type: tts\n    vram_gb: 1\n"
        f"    cmd: {upstream_cmd(tmp_path, 'voice')}\n"
    )


def served_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, from its own route table."""
    app = LlmuxApp(parse_config(config_text(tmp_path)), ProcessLauncher(), budget_gb=8)
    found = {("post", path) for path in RELAY_PATHS}

    def walk(routes: list[BaseRoute], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            else:
                assert isinstance(route, Route), f"a route of an unknown kind: {route!r}"
                # HEAD comes with every GET route (Starlette); it is not an operation of its own.
                methods = {m.lower() for m in route.methods or ()} - {"head"}
                found.update((m, prefix + route.path) for m in methods)

    walk(app.control.routes, "")
    return found


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def test_every_route_served_is_documented_and_no_other(tmp_path: Path) -> None:
    doc = openapi_document(parse_config(config_text(tmp_path)))
    served = served_routes(tmp_path)
    assert ("get", "/openapi.json") in served
    documented = documented_routes(doc)
    assert served - documented == set(), "routes served without a doc entry (add to openapi.py)"
    assert documented - served == set(), "doc entries for routes that are not served"


def test_the_document_is_valid_openapi_3_1(tmp_path: Path) -> None:
    doc = openapi_document(parse_config(config_text(tmp_path)))
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()  # raises on a malformed document
    broken = copy.deepcopy(doc)
    broken["paths"]["/health"]["get"]["responses"]["200"] = {"content": {}}  # no description
    with pytest.raises(Exception, match="description"):
        schemathesis.openapi.from_dict(broken).validate()


def test_statuses_and_envelope_are_declared(tmp_path: Path) -> None:
    doc = openapi_document(parse_config(config_text(tmp_path)))
    components = doc["components"]
    envelope = components["schemas"]["Error"]["properties"]["error"]
    assert envelope["required"] == ["message", "type", "param", "code"]
    for path in RELAY_PATHS:
        statuses = set(doc["paths"][path]["post"]["responses"])
        assert {"200", "400", "401", "404", "408", "413", "429", "431", "502", "503", "504"} <= (
            statuses
        ), path
    # Every error response of llmux's own making is the envelope.
    for name, response in components["responses"].items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, name


@pytest.fixture
def server(start_server: StartServer, tmp_path: Path) -> Server:
    return start_server(config_text(tmp_path), api_key=API_KEY, admin_key=ADMIN_KEY)


def fetch_doc(server: Server) -> dict[str, Any]:
    resp = httpx.get(server.url + "/openapi.json", timeout=30)  # no key: it is open
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    doc: dict[str, Any] = resp.json()
    return doc


def test_served_document_is_open_and_matches_the_route_table(
    server: Server, tmp_path: Path
) -> None:
    doc = fetch_doc(server)
    assert documented_routes(doc) == served_routes(tmp_path)
    schemathesis.openapi.from_dict(doc).validate()


def test_security_is_declared_exactly_where_a_key_is_needed(server: Server) -> None:
    """Each operation without a key: 401 where the document declares the bearer scheme,
    never 401 where it declares none. Nothing is loaded (the key is checked first)."""
    doc = fetch_doc(server)
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    open_ops = set()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in sorted(documented_routes(doc)):
            operation = doc["paths"][path][method]
            secured = operation["security"] == [{"bearer": []}]
            assert secured or operation["security"] == [], (method, path)
            url = path.replace("{name}", "chat")
            if path == "/events":
                with client.stream(method, url) as resp:  # an open one would never end
                    status = resp.status_code
            else:
                status = client.request(method, url).status_code
            assert (status == 401) == secured, (method, path, status)
            assert "401" in operation["responses"] or not secured, (method, path)
            if secured:  # two keys: refused before anything else (never one read, one not)
                two = [("authorization", f"Bearer {ADMIN_KEY}")] * 2
                status = client.request(method, url, headers=two).status_code
                assert status == 400, (method, path, status)
                assert "400" in operation["responses"], (method, path)
            if not secured:
                open_ops.add(path)
    assert open_ops == {"/health", "/", "/openapi.json"}


def test_endless_streams_answer_as_documented(server: Server) -> None:
    """/events and a followed log never end, so the fuzz run leaves them out: their start."""
    doc = fetch_doc(server)
    streams = [
        ("/events", {"replay": "true"}, doc["paths"]["/events"]["get"]),
        ("/models/chat/logs", {"follow": "true"}, doc["paths"]["/models/{name}/logs"]["get"]),
    ]
    with httpx.Client(base_url=server.url, headers=server.headers(ADMIN_KEY), timeout=30) as c:
        for url, params, operation in streams:
            with c.stream("GET", url, params=params) as resp:
                assert resp.status_code == 200
                media = resp.headers["content-type"].split(";")[0]
                assert media in operation["responses"]["200"]["content"], (url, media)
            bad = c.get(url, params=dict.fromkeys(params, "maybe"))
            assert bad.status_code == 400
            assert "400" in operation["responses"]
            assert bad.json()["error"]["param"] in params


def test_document_follows_the_config_and_its_reload(server: Server, tmp_path: Path) -> None:
    doc = fetch_doc(server)
    speech = doc["paths"]["/v1/audio/speech"]["post"]["requestBody"]["content"]
    fields = speech["application/json"]["schema"]["properties"]
    assert fields["input"]["maxLength"] == 100
    assert fields["model"]["examples"] == ["voice"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert chat["application/json"]["schema"]["properties"]["model"]["examples"] == [
        "chat",
        "gpt-doc",
    ]
    assert server.config_path is not None
    server.config_path.write_text(config_text(tmp_path, speech_chars=7, extra_alias=", gpt-new"))
    server.proc.send_signal(signal.SIGHUP)

    def reloaded() -> dict[str, Any] | None:
        new = fetch_doc(server)
        body = new["paths"]["/v1/audio/speech"]["post"]["requestBody"]["content"]
        return (
            new
            if body["application/json"]["schema"]["properties"]["input"]["maxLength"] == 7
            else None
        )

    new = wait_until(reloaded, 30, "the document of the reloaded config")
    chat = new["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert chat["application/json"]["schema"]["properties"]["model"]["examples"] == [
        "chat",
        "gpt-doc",
        "gpt-new",
    ]


def _fails(case: Any, **kw: Any) -> str:
    try:
        case.call_and_validate(**kw)
    except FailureGroup as exc:
        return str(exc)
    return ""


def test_the_fuzz_checks_catch_a_lying_document(server: Server) -> None:
    """The checks test_fuzz relies on fail against a document that lies about this server."""
    doc = fetch_doc(server)
    truthful = schemathesis.openapi.from_dict(doc)
    status = truthful["/status"]["GET"].Case()
    assert _fails(status, base_url=server.url, checks=[status_code_conformance]) == ""

    lying = copy.deepcopy(doc)
    del lying["paths"]["/status"]["get"]["responses"]["401"]  # "/status never answers 401"
    lying["paths"]["/health"]["get"]["security"] = [{"bearer": []}]  # "/health needs a key"
    model_status = lying["components"]["schemas"]["ModelStatus"]  # "there is no placement"
    del model_status["properties"]["placement"]
    model_status["required"].remove("placement")
    schema = schemathesis.openapi.from_dict(lying)
    status = schema["/status"]["GET"].Case()
    assert "401" in _fails(status, base_url=server.url, checks=[status_code_conformance])
    health = schema["/health"]["GET"].Case()
    found = _fails(
        health,
        base_url=server.url,
        headers={"Authorization": f"Bearer {API_KEY}"},
        checks=[ignored_auth],
    )
    assert "auth" in found.lower(), found
    status = schema["/status"]["GET"].Case(headers={"Authorization": f"Bearer {API_KEY}"})
    found = _fails(status, base_url=server.url, checks=[response_schema_conformance])
    assert "placement" in found, found


def test_admin_actions_answer_as_documented(server: Server) -> None:
    """Load, sleep (refused here: no `sleep:`, a 409 in the envelope) and unload, each checked
    against its operation: the status is declared and the body is its schema."""
    doc = fetch_doc(server)
    sleep = doc["paths"]["/models/{name}/sleep"]["post"]
    assert sleep["security"] == [{"bearer": []}]
    assert sleep["responses"]["409"] == {"$ref": "#/components/responses/CannotSleep"}
    assert sleep["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelAction"
    }
    schema = schemathesis.openapi.from_dict(doc)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    checks = [status_code_conformance, response_schema_conformance]
    for action, status, body in [
        ("load", 200, {"id": "chat", "state": "ready"}),
        ("sleep", 409, None),
        ("unload", 200, {"id": "chat", "state": "unloaded"}),
    ]:
        case = schema[f"/models/{{name}}/{action}"]["POST"].Case(path_parameters={"name": "chat"})
        resp = case.call(base_url=server.url, headers=admin)
        assert resp.status_code == status, (action, resp.text)
        case.validate_response(resp, checks=checks)
        if body is not None:
            assert resp.json() == body
        else:
            assert resp.json()["error"]["code"] == "cannot_sleep"
