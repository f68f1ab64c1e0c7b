"""Schemathesis against a live llmux: issue 10's standing fuzz check.

A real ``llmux serve`` with one stand-in child of each type (tests/upstream.py) and both kinds of
key set; the schema is llmux's own ``GET /openapi.json``. Schemathesis's phases (the documented
examples, then boundary and negative cases, then random ones) send every request over real HTTP,
and every answer must be: not a 5xx; of a documented status and content type; in its documented
shape (llmux's own JSON exactly); an error in OpenAI's envelope (also for the 405s of methods a
path does not serve, which no operation documents); and a keyed route must refuse the same
request without its key, or with a wrong one.

Left out: ``/events`` and ``?follow=true`` logs, which never end by themselves (their start is
checked in test_openapi.py), and checks of what llmux does not promise: that the model servers
reject every request the schema calls invalid (llmux reads only ``model``, ``stream`` and a
speech ``input``; the rest is the model server's to judge). A 405 must carry ``Allow``.

Deterministic by default (a fixed set of cases, so that it cannot fail at random in CI). For a
longer, random run: ``LLMUX_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from llmux.api.relay import RELAY_PATHS
from tests.conftest import Server, StartServer, upstream_cmd

API_KEY = "fuzz-user"
ADMIN_KEY = "fuzz-admin"
MODELS = {"chat": "llm", "voice": "tts", "ears": "asr", "vectors": "embedding"}
FOLLOW = {"true", "1", "yes", "on"}
LONG_RUN = os.environ.get("LLMUX_FUZZ_EXAMPLES")

STAND_IN_400 = {"error": {"message": "file is required", "type": "invalid_request_error"}}
"""The one error the stand-in child answers itself: an audio form without a file part."""


def envelope_problem(body: Any) -> str | None:
    """What makes ``body`` not OpenAI's error envelope as llmux writes it; None if it is."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return "not an object whose one key is 'error'"
    error = body["error"]
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return "'error' is not an object of exactly message, type, param and code"
    if not isinstance(error["message"], str) or not error["message"]:
        return "'message' is not a non-empty string"
    if not isinstance(error["type"], str) or not error["type"]:
        return "'type' is not a non-empty string"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return "'param' or 'code' is neither a string nor null"
    return None


def error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error llmux answers is in the envelope. On a relayed route, a model server's own
    answer is passed through as it came: the stand-in's one error is let through."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    relayed = case.method.upper() == "POST" and case.path in RELAY_PATHS
    if relayed and response.status_code == 400 and body == STAND_IN_400:
        return None
    ollama_error = isinstance(body, dict) and set(body) == {"error"}
    if case.path.startswith("/api/") and ollama_error and isinstance(body["error"], str):
        return True  # the Ollama API answers Ollama's error shape (docs/ollama.md)
    problem = envelope_problem(body)
    assert problem is None, (
        f"{case.method} {case.path} answered {response.status_code} outside the error "
        f"envelope ({problem}): {response.content[:500]!r}"
    )
    return True


@pytest.fixture
def fuzzed(start_server: StartServer, tmp_path: Path) -> Server:
    models = "".join(
        f"  {name}:\n    type: {kind}\n    vram_gb: 1\n    aliases: [{name}-alias]\n"
        f"    cmd: {upstream_cmd(tmp_path, name)}\n"
        for name, kind in MODELS.items()
    )
    config = (
        "server:\n"
        f"  api_keys: [{API_KEY}]\n"
        f"  admin_keys: [{ADMIN_KEY}]\n"
        "  max_speech_chars: 64\n"  # small: the boundary cases ask for audio this long
        "gpu:\n  vram_gb: 8\n"  # every stand-in fits: no eviction storms
        "models:\n" + models
    )
    return start_server(config, api_key=API_KEY, admin_key=ADMIN_KEY)


@pytest.fixture
def llmux_schema(fuzzed: Server) -> Any:
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("llmux_schema").exclude(path="/events")


def test_envelope_problem_tells_the_envelope_apart() -> None:
    ok = {"error": {"message": "m", "type": "t", "param": None, "code": "c"}}
    assert envelope_problem(ok) is None
    assert envelope_problem(STAND_IN_400) is not None
    assert envelope_problem({"detail": "Not Found"}) is not None
    assert envelope_problem({**ok, "extra": 1}) is not None
    assert envelope_problem({"error": {**ok["error"], "code": 404}}) is not None


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=int(LONG_RUN or 10),
    derandomize=LONG_RUN is None,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_fuzz(case: Any, fuzzed: Server) -> None:
    if case.query and str(case.query.get("follow")).lower() in FOLLOW:
        case.query["follow"] = "false"  # a followed log never ends (checked in test_openapi)
    case.call_and_validate(
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            ignored_auth,
            unsupported_method,
            error_envelope,
        ],
    )
