"""``GET /openapi.json``: an OpenAPI 3.1 document of llmux's whole HTTP surface (DESIGN section 2).

It documents every route llmux serves: the OpenAI routes it relays (with the request fields llmux
itself reads or checks; every other field goes to the model's server as it came), llmux's own
routes, every status each can answer and the error envelope. ``tests/test_openapi.py`` compares
its paths with the app's route table, and ``tests/test_fuzz.py`` runs schemathesis against a live
llmux with it (undocumented statuses, fields or content types fail), so:

**Every new route (and every new status, response field or checked request field) must be added
here in the same change.** The bodies of ``/status``, ``/v1/models`` and ``/events`` are
described by their wire models (``llmux.api.wire``): change the model and the document follows.
The Ollama routes (``llmux.api.ollama``) answer errors in Ollama's shape, ``OllamaError``.

The document is built from the running config, for two things a client (or a fuzzer) cannot
know otherwise: the ``maxLength`` of a speech ``input`` (``server.max_speech_chars``) and the ids
(and aliases) that each route serves, given as ``examples`` of its ``model`` field. They are
``examples``, not an ``enum``: a config reload changes them, and an unknown id is not a malformed
request but a documented 404 ``model_not_found``. The security part does not depend on the
config: keyed routes always declare the bearer scheme (it is needed only when keys are set), so
the open document says nothing about whether this server has keys.
"""

from __future__ import annotations

from typing import Any

import llmux
from llmux.api.ollama import ROUTE_TYPES as OLLAMA_TYPES
from llmux.api.relay import ROUTE_TYPES
from llmux.api.wire import wire_schemas
from llmux.config import Config, ModelType
from llmux.errors import LlmuxError

OPENAPI_VERSION = "3.1.0"

_ERROR = "#/components/schemas/Error"
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]
_OPEN: list[dict[str, list[str]]] = []


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _ERROR}}},
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _strict(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An object of llmux's own making: exactly these fields, all present."""
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
        **extra,
    }


def _error_kinds() -> tuple[list[str], list[str]]:
    """Every error ``type`` and ``code`` that llmux itself answers (llmux.errors; the engines'
    own errors reach a client only inside a model's answer)."""
    found: list[type[LlmuxError]] = []
    todo = list(LlmuxError.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    found = [c for c in found if not c.engine_only]
    return sorted({c.type for c in found}), sorted({c.code for c in found if c.code})


def _schemas() -> dict[str, Any]:
    error_types, error_codes = _error_kinds()
    return {
        # Status, ModelList, SchedulerEvent, ModelAction and the rest of llmux.api.wire: from
        # the wire models themselves, so the document cannot drift from what is sent.
        **wire_schemas("#/components/schemas/{model}"),
        "Error": _strict(
            ["error"],
            {
                "error": _strict(
                    ["message", "type", "param", "code"],
                    {
                        "message": {"type": "string"},
                        "type": {"enum": error_types, "description": "OpenAI's error type."},
                        "param": {
                            "type": ["string", "null"],
                            "description": "The request field at fault, if one is.",
                        },
                        "code": {
                            "enum": [*error_codes, None],
                            "description": "What went wrong, for programs.",
                        },
                    },
                )
            },
            description="OpenAI's error envelope: every error llmux itself answers has this shape "
            "(after an SSE stream has started, it is the data of an `event: error`).",
        ),
        "UpstreamBody": {
            "description": "The model server's own answer, passed through as it came (its shape "
            "is the model server's, not llmux's)."
        },
        "SseEvent": {
            "type": "object",
            "properties": {
                "event": {"type": "string"},
                "data": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
            "description": "One server-sent event (this schema describes each event of the "
            "stream). An error after a relayed stream started is `event: error` whose data is "
            "the error envelope (`Error`), and the stream then ends without `[DONE]`.",
        },
        "SchedulerEventSse": {
            "type": "object",
            "properties": {
                "event": _ref("Notice"),
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": _ref("SchedulerEvent"),
                },
            },
            "description": "One event of `GET /events`: named by what happened, its data a "
            "`SchedulerEvent` as JSON.",
        },
        "OllamaError": _strict(
            ["error"],
            {"error": {"type": "string"}},
            description="Ollama's error shape, answered by the `/api/*` routes.",
        ),
        "Health": _strict(["status"], {"status": {"const": "ok"}}),
        "ModelLogs": _strict(
            ["id", "lines"],
            {"id": {"type": "string"}, "lines": {"type": "array", "items": {"type": "string"}}},
        ),
    }


def _responses() -> dict[str, Any]:
    return {
        "BadRequest": _error(
            "Invalid request (`invalid_request`): a malformed query parameter (`param` names "
            "it), two `Authorization` headers, or a request that is not well-formed HTTP."
        ),
        "Unauthorized": _error(
            "No key, or an unknown key (`invalid_api_key`). Keys are needed only when "
            "`server.api_keys` (or, for admin routes, `server.admin_keys`) is set."
        ),
        "Forbidden": _error(
            "A valid key that is not an admin key, where `server.admin_keys` is set "
            "(`permission_error`)."
        ),
        "ModelNotFound": _error("No configured model has this id or alias (`model_not_found`)."),
        "RequestTimeout": _error(
            "The request line and headers, or the body, arrived too slowly "
            "(`server.header_timeout`, `server.body_timeout`; `request_timeout`); the "
            "connection is closed."
        ),
        "BodyTooLarge": _error("The body is over `server.max_upload_mb` (`body_too_large`)."),
        "QueueFull": _error("`server.max_queue` requests are already waiting (`queue_full`)."),
        "HeadersTooLarge": _error(
            "The request line and headers are over `server.max_header_kb` "
            "(`headers_too_large`); checked before anything else, the key included; the "
            "connection is closed."
        ),
        "UpstreamError": _error(
            "The model's process failed before its answer started: it died, broke its answer's "
            "framing, or stayed silent for the model's `stall_timeout` (`upstream_error`)."
        ),
        "Unavailable": _error(
            "`insufficient_vram` (cannot fit even after every allowed eviction), "
            "`model_load_failed`, `model_unavailable` (llmux is shutting down, or the model was "
            "removed), or `server_busy` (llmux is at `server.max_connections`)."
        ),
        "AtConnectionCap": _error(
            "llmux is at `server.max_connections` and no other connection is idle "
            "(`server_busy`; `/health` still answers)."
        ),
        "QueueTimeout": _error(
            "The model was not ready within `server.queue_timeout` (`queue_timeout`)."
        ),
        "CannotSleep": _error(
            "The model cannot be put to sleep (`cannot_sleep`): it has no `sleep:` in the "
            "config, it is not loaded, or it had to be stopped instead (its sleep failed, or the "
            "host budget `host.ram_gb` has no room for it)."
        ),
    }


def _model_field(ids: list[str]) -> dict[str, Any]:
    field: dict[str, Any] = {
        "type": "string",
        "minLength": 1,
        "description": "A configured model id or alias (see `GET /v1/models`) of a type this "
        "route serves. llmux reads it to choose the model; its `upstream_model` (if set) "
        "replaces it on the way.",
    }
    if ids:
        field["examples"] = ids
    return field


def _served_ids(config: Config, types: frozenset[ModelType]) -> list[str]:
    return [
        name
        for model_id, m in config.models.items()
        if m.type in types
        for name in (model_id, *m.aliases)
    ]


_STREAM = {
    "type": "boolean",
    "description": "true: the answer is an SSE stream. While the model loads, llmux sends the "
    "200 and SSE comments (`: llmux loading <model>`) every 2 s; an error after the stream "
    "started is an `event: error` carrying the error envelope, with no `[DONE]`.",
}

_PASSED_THROUGH = (
    "Any other field of OpenAI's request is passed to the model's server as it came, unread."
)


def _relay(
    path: str, summary: str, body: dict[str, Any], ok: dict[str, Any], *, multipart: bool
) -> dict[str, Any]:
    media = "multipart/form-data" if multipart else "application/json"
    responses: dict[str, Any] = {
        "200": {
            "description": "The model's answer, passed through as it came (any other status "
            "its server answers with is passed through too, with its own body).",
            "content": ok,
        },
        "400": {
            "description": "Invalid request (`invalid_request`): the body is not a JSON object "
            "or not a well-formed form, `model` is missing or not a string, a checked field is "
            "out of bounds, or two `Authorization` headers; `unsupported_model`: the model is "
            "of a type this route does not serve (nothing is loaded). Or the model server's "
            "own 400, passed through.",
            "content": {
                "application/json": {"schema": {"anyOf": [{"$ref": _ERROR}, _ref("UpstreamBody")]}}
            },
        },
        "401": _response_ref("Unauthorized"),
        "404": _response_ref("ModelNotFound"),
        "408": _response_ref("RequestTimeout"),
        "413": _response_ref("BodyTooLarge"),
        "422": {
            "description": "The model server's own validation error, passed through.",
            "content": {"application/json": {"schema": _ref("UpstreamBody")}},
        },
        "429": _response_ref("QueueFull"),
        "431": _response_ref("HeadersTooLarge"),
        "502": _response_ref("UpstreamError"),
        "503": _response_ref("Unavailable"),
        "504": _response_ref("QueueTimeout"),
    }
    return {
        "post": {
            "operationId": path.removeprefix("/v1/").replace("/", "_"),
            "tags": ["openai"],
            "summary": summary,
            "description": "Relayed to the model's own server (loaded first if need be, "
            "evicting others by tier). Other methods: 405.",
            "security": _SECURED,
            "requestBody": {"required": True, "content": {media: body}},
            "responses": responses,
        }
    }


def _json_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "schema": {
            "type": "object",
            "required": required,
            "properties": properties,
            "additionalProperties": True,
            "description": _PASSED_THROUGH,
        }
    }


def _audio_form(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": {
            "type": "object",
            "required": ["file", "model"],
            "properties": {
                "file": {
                    "type": "string",
                    "contentMediaType": "application/octet-stream",
                    "description": "The audio; the model's server decodes it.",
                },
                "model": model,
            },
            "additionalProperties": True,
            "description": _PASSED_THROUGH,
        },
        "encoding": {"file": {"contentType": "application/octet-stream"}},
    }


def _relay_paths(config: Config) -> dict[str, Any]:
    def model(path: str) -> dict[str, Any]:
        return _model_field(_served_ids(config, ROUTE_TYPES[path]))

    json_or_sse = {
        "application/json": {"schema": _ref("UpstreamBody")},
        "text/event-stream": {"schema": _ref("SseEvent")},
    }
    transcript = {
        "application/json": {"schema": _ref("UpstreamBody")},
        "text/plain": {"schema": {"type": "string"}},
        "text/vtt": {"schema": {"type": "string"}},
    }
    paths: dict[str, Any] = {}
    for path, summary in [
        ("/v1/chat/completions", "Chat completion (OpenAI)"),
        ("/v1/completions", "Text completion (OpenAI)"),
    ]:
        body = _json_body({"model": model(path), "stream": _STREAM}, ["model"])
        paths[path] = _relay(path, summary, body, json_or_sse, multipart=False)
    path = "/v1/embeddings"
    body = _json_body({"model": model(path)}, ["model"])
    paths[path] = _relay(
        path,
        "Embeddings (OpenAI)",
        body,
        {"application/json": {"schema": _ref("UpstreamBody")}},
        multipart=False,
    )
    path = "/v1/audio/speech"
    speech_input = {
        "type": "string",
        "maxLength": config.server.max_speech_chars,
        "description": "The text to speak; longer than `server.max_speech_chars` characters is "
        "a 400 before the model is loaded or the request queued.",
    }
    body = _json_body({"model": model(path), "input": speech_input}, ["model", "input"])
    paths[path] = _relay(
        path,
        "Text to speech (OpenAI)",
        body,
        {"audio/*": {"schema": {"type": "string", "contentMediaType": "audio/*"}}},
        multipart=False,
    )
    for path, summary in [
        ("/v1/audio/transcriptions", "Speech to text (OpenAI)"),
        ("/v1/audio/translations", "Speech to English text (OpenAI)"),
    ]:
        paths[path] = _relay(path, summary, _audio_form(model(path)), transcript, multipart=True)
    return paths


def _common(*, keyed: bool, at_cap: bool = True) -> dict[str, Any]:
    """The statuses any route can answer before its handler runs."""
    out: dict[str, Any] = {
        "400": _response_ref("BadRequest"),
        "408": _response_ref("RequestTimeout"),
        "431": _response_ref("HeadersTooLarge"),
    }
    if keyed:
        out["401"] = _response_ref("Unauthorized")
    if at_cap:
        out["503"] = _response_ref("AtConnectionCap")
    return out


def _flag(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description + " Absent = false; anything but true/false, 1/0, yes/no, "
        "on/off is a 400.",
        "schema": {"type": "boolean"},
    }


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A model id or alias.",
    "schema": {"type": "string"},
}


def _admin(
    summary: str,
    description: str,
    parameters: list[dict[str, Any]],
    ok: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "tags": ["llmux"],
        "summary": summary,
        "description": description + " Admin: with `server.admin_keys` set it needs an admin "
        "key; otherwise as the other keyed routes.",
        "security": _SECURED,
        "parameters": parameters,
        "responses": {
            "200": ok,
            **_common(keyed=True),
            "403": _response_ref("Forbidden"),
            "404": _response_ref("ModelNotFound"),
            **extra,
        },
    }


def _own_paths(config: Config) -> dict[str, Any]:
    ids = list(config.models)
    name = {**_NAME, "schema": {"type": "string", **({"examples": ids} if ids else {})}}
    load = _admin(
        "Load a model",
        "Answers once the model is ready (other models may be evicted for it).",
        [name],
        _json("The model is ready.", _ref("ModelAction")),
        {
            "429": _response_ref("QueueFull"),
            "503": _response_ref("Unavailable"),
            "504": _response_ref("QueueTimeout"),
        },
    )
    unload = _admin(
        "Unload a model",
        "Drains the model's requests, then answers once its process is gone; pinned models too.",
        [name],
        _json("The model's process is gone.", _ref("ModelAction")),
        {"503": _response_ref("Unavailable")},
    )
    sleep = _admin(
        "Put a model to sleep",
        "Drains the model's requests, then puts it to sleep with its engine's sleep API (its "
        "`sleep:`); answers once it sleeps: its process stays (same pid), its GPU memory is "
        "released but the residual, and the next request for it wakes it.",
        [name],
        _json("The model sleeps.", _ref("ModelAction")),
        {"409": _response_ref("CannotSleep"), "503": _response_ref("Unavailable")},
    )
    logs = _admin(
        "A model's recent log lines",
        "The kept tail of the model process's output (the current process, or the last one).",
        [name, _flag("follow", "true: keep streaming new lines.")],
        {
            "description": "`follow=false`: the kept lines. `follow=true`: a plain-text stream "
            "of the lines, as they come, that does not end by itself.",
            "content": {
                "application/json": {"schema": _ref("ModelLogs")},
                "text/plain": {"schema": {"type": "string"}},
            },
        },
        {},
    )
    read = "Needs a key when `server.api_keys` is set (an admin key also serves)."
    return {
        "/health": {
            "get": {
                "tags": ["llmux"],
                "summary": "Liveness",
                "description": "Always open; answers even at `server.max_connections`.",
                "security": _OPEN,
                "responses": {
                    "200": _json("llmux is up.", _ref("Health")),
                    **_common(keyed=False, at_cap=False),
                },
            }
        },
        "/status": {
            "get": {
                "tags": ["llmux"],
                "summary": "Models, states and memory",
                "description": read,
                "security": _SECURED,
                "responses": {
                    "200": _json("The scheduler's state.", _ref("Status")),
                    **_common(keyed=True),
                },
            }
        },
        "/v1/models": {
            "get": {
                "tags": ["openai"],
                "summary": "List models (OpenAI), with an `llmux` object on each",
                "description": "Every configured model and alias. " + read,
                "security": _SECURED,
                "responses": {
                    "200": _json("The models.", _ref("ModelList")),
                    **_common(keyed=True),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["llmux"],
                "summary": "Prometheus metrics",
                "description": read,
                "security": _SECURED,
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_common(keyed=True),
                },
            }
        },
        "/events": {
            "get": {
                "tags": ["llmux"],
                "summary": "Scheduler events (SSE)",
                "description": "A stream of scheduler events (loads, evictions, sleeps, wakes, "
                "crashes) that does not end by itself. " + read,
                "security": _SECURED,
                "parameters": [_flag("replay", "true: first send the recent events again.")],
                "responses": {
                    "200": {
                        "description": "Server-sent events: `event: <kind>` and `data: {...}` "
                        "(a `SchedulerEvent`).",
                        "content": {"text/event-stream": {"schema": _ref("SchedulerEventSse")}},
                    },
                    **_common(keyed=True),
                },
            }
        },
        "/models/{name}/load": {"post": load},
        "/models/{name}/unload": {"post": unload},
        "/models/{name}/sleep": {"post": sleep},
        "/models/{name}/logs": {"get": logs},
        "/": {
            "get": {
                "tags": ["llmux"],
                "summary": "Status page",
                "description": "A static page with no data in it; always open (it asks for the "
                "key that `/status` and `/events` need).",
                "security": _OPEN,
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_common(keyed=False),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["llmux"],
                "summary": "This document",
                "description": "Always open.",
                "security": _OPEN,
                "responses": {
                    "200": _json("OpenAPI 3.1.", {"type": "object"}),
                    **_common(keyed=False),
                },
            }
        },
    }


def _ollama_error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("OllamaError")}},
    }


def _ollama_paths(config: Config) -> dict[str, Any]:
    """The Ollama API (``llmux.api.ollama``; docs/ollama.md): Ollama's shapes, its errors
    ``{"error": "..."}`` (the statuses below the app, 408, 431 and 503 at the connection cap,
    stay OpenAI's envelope)."""
    keyed = "Needs a key when `server.api_keys` is set (an admin key also serves)."
    refused = {
        "400": _ollama_error(
            "Invalid request: the body is not a JSON object, a field has the wrong type, the "
            "model is of a type this route does not serve, two `Authorization` headers, or the "
            "model server's own 400."
        ),
        "401": _ollama_error("No key, or an unknown key."),
        "408": _response_ref("RequestTimeout"),
        "431": _response_ref("HeadersTooLarge"),
    }
    at_model = {
        **refused,
        "404": _ollama_error("No configured model has this name (`model 'x' not found`)."),
        "413": _ollama_error("The body is over `server.max_upload_mb`."),
        "429": _ollama_error("`server.max_queue` requests are already waiting."),
        "502": _ollama_error("The model's process failed before its answer started."),
        "503": _ollama_error(
            "Insufficient VRAM, a failed load, llmux shutting down, or at `server.max_connections`."
        ),
        "504": _ollama_error("The model was not ready within `server.queue_timeout`."),
    }
    any_json = {"type": "object", "additionalProperties": True}

    def get(summary: str, description: str) -> dict[str, Any]:
        return {
            "get": {
                "tags": ["ollama"],
                "summary": summary,
                "description": description + " " + keyed,
                "security": _SECURED,
                "responses": {
                    "200": _json("Ollama's answer.", any_json),
                    **refused,
                    "503": _response_ref("AtConnectionCap"),
                },
            }
        }

    def post(path: str, summary: str, fields: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        ids = [
            name
            for model_id, m in config.models.items()
            if m.type in OLLAMA_TYPES[path]
            for name in (model_id, *m.aliases)
        ]
        model: dict[str, Any] = {
            "type": "string",
            "minLength": 1,
            "description": "A configured model id or alias, with or without `:latest`.",
        }
        if ids:
            model["examples"] = ids
        content: dict[str, Any] = {"application/json": {"schema": any_json}}
        if stream:
            content["application/x-ndjson"] = {"schema": any_json}
        return {
            "post": {
                "tags": ["ollama"],
                "summary": summary,
                "description": "Ollama's request, translated onto the model's OpenAI route "
                "(docs/ollama.md). " + keyed,
                "security": _SECURED,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["model"],
                                "properties": {"model": model, **fields},
                                "additionalProperties": True,
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Ollama's answer: NDJSON when streamed (the default; "
                        "an error after the stream started is its last line, "
                        '`{"error": "..."}`), one object with `"stream": false`.',
                        "content": content,
                    },
                    **at_model,
                },
            }
        }

    stream = {"type": "boolean", "description": "false: one JSON object; else NDJSON."}
    return {
        "/api/version": get("Version (Ollama)", "The Ollama API version llmux follows."),
        "/api/tags": get("List models (Ollama)", "The LLM and embedding models."),
        "/api/ps": get("Loaded models (Ollama)", "The LLM and embedding models loaded now."),
        "/api/show": post("/api/show", "Show a model (Ollama)", {}, stream=False),
        "/api/chat": post(
            "/api/chat",
            "Chat (Ollama)",
            {"stream": stream, "messages": {"type": "array"}},
            stream=True,
        ),
        "/api/generate": post(
            "/api/generate",
            "Generate (Ollama)",
            {"stream": stream, "prompt": {"type": "string"}},
            stream=True,
        ),
        "/api/embed": post("/api/embed", "Embeddings (Ollama)", {}, stream=False),
        "/api/embeddings": post(
            "/api/embeddings", "Embedding, the older route (Ollama)", {}, stream=False
        ),
    }


def openapi_document(config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 document of llmux's HTTP surface, for ``config``."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "llmux",
            "version": llmux.__version__,
            "summary": "Many models, one GPU, one OpenAI-compatible endpoint.",
            "description": "Errors are OpenAI's envelope (`Error`). A path llmux does not serve "
            "is a 404 (`not_found`), a method a path does not serve a 405 "
            "(`method_not_allowed`), both in the envelope.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "openai", "description": "OpenAI's API, relayed to each model's server."},
            {"name": "llmux", "description": "llmux's own routes."},
            {
                "name": "ollama",
                "description": "Ollama's API, translated onto the models' OpenAI routes.",
            },
        ],
        "paths": {**_relay_paths(config), **_own_paths(config), **_ollama_paths(config)},
        "components": {
            "schemas": _schemas(),
            "responses": _responses(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A key of `server.api_keys` (or `server.admin_keys`). With no "
                    "`api_keys` set, the keyed routes are open; with `admin_keys` set, load, "
                    "unload, sleep and logs need one of them.",
                }
            },
        },
    }
