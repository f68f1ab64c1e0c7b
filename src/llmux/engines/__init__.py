"""Built-in engines: the command line of each model's child process.

``engine_argv(engine, model, args)`` builds the argv of a child that serves one model over an
OpenAI-style HTTP API on ``127.0.0.1`` and the port placeholder ``${PORT}`` (filled by the
launcher). It runs ``sys.executable`` (the interpreter llmux runs in), never a shell.

- ``llama-cpp``: llama-cpp-python's own server, run as ``python -m llmux.engines.llama`` (its
  app as is, plus request cancellation and 400s for invalid bodies). ``args`` keys are
  its own flags (``n_ctx``, ``n_threads``, ``n_gpu_layers``, ``chat_format``, ...; ``threads`` is
  accepted for ``n_threads``). It has no ``/health``: probe ``engine_health_path("llama-cpp")``
  (``/v1/models``), which answers once the model is loaded (it loads before the server listens).
- ``faster-whisper``: ``python -m llmux.engines.whisper`` (``device``, ``compute_type``,
  ``threads``, ``beam_size``).
- ``piper``: ``python -m llmux.engines.piper`` (``speaker``, ``use_cuda``, ``config``,
  ``max_input_chars``).

Every engine's child stops the work of a request whose client disconnects, and serves
``POST /llmux/cancel/{request_id}`` for requests sent with ``X-Llmux-Request-Id``
(``engine_cancel_path``; the contract is in ``llmux.engines._cancel`` and docs/engines.md).

Everything here comes from config, never from a request.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llmux.engines.packaged import EngineError, packaged_names, resolve_model

__all__ = [
    "ENGINES",
    "PORT_PLACEHOLDER",
    "REQUEST_ID_HEADER",
    "EngineError",
    "engine_argv",
    "engine_cancel_path",
    "engine_env",
    "engine_health_path",
    "packaged_names",
    "resolve_model",
]

PORT_PLACEHOLDER = "${PORT}"
HOST = "127.0.0.1"
REQUEST_ID_HEADER = "X-Llmux-Request-Id"
"""The header that names a request for ``engine_cancel_path`` (any opaque text)."""
CANCEL_PATH = "/llmux/cancel/{request_id}"

ENGINES = ("llama-cpp", "faster-whisper", "piper")

_Render = Callable[[str, str, Any], list[str]]


def _kind_error(engine: str, key: str, value: Any, expected: str) -> EngineError:
    return EngineError(f"engine {engine!r}: args.{key} must be {expected}, not {value!r}")


def _int(engine: str, key: str, value: Any) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _kind_error(engine, key, value, "an integer")
    return [str(value)]


def _float(engine: str, key: str, value: Any) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _kind_error(engine, key, value, "a number")
    return [repr(float(value))]


def _str(engine: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, str) or not value:
        raise _kind_error(engine, key, value, "a non-empty string")
    return [value]


def _bool(engine: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, bool):
        raise _kind_error(engine, key, value, "true or false")
    return ["true" if value else "false"]


def _float_list(engine: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _kind_error(engine, key, value, "a list of numbers")
    return [s for v in value for s in _float(engine, key, v)]


def _str_list(engine: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _kind_error(engine, key, value, "a list of strings")
    return [s for v in value for s in _str(engine, key, v)]


def _json_object(engine: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, dict):
        raise _kind_error(engine, key, value, "a mapping")
    return [json.dumps(value)]


def _int_or_str(engine: str, key: str, value: Any) -> list[str]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    return _str(engine, key, value)


# llama_cpp.server flags (llama_cpp/server/settings.py): the CLI is generated from its pydantic
# settings, one ``--name value`` per field; bools take true/false, lists take several values.
_LLAMA_CPP_ARGS: dict[str, _Render] = {
    "model_alias": _str,
    "n_gpu_layers": _int,
    "split_mode": _int,
    "main_gpu": _int,
    "tensor_split": _float_list,
    "use_mmap": _bool,
    "use_mlock": _bool,
    "kv_overrides": _str_list,
    "seed": _int,
    "n_ctx": _int,
    "n_batch": _int,
    "n_ubatch": _int,
    "n_threads": _int,
    "n_threads_batch": _int,
    "rope_scaling_type": _int,
    "rope_freq_base": _float,
    "rope_freq_scale": _float,
    "flash_attn": _bool,
    "offload_kqv": _bool,
    "embedding": _bool,
    "logits_all": _bool,
    "last_n_tokens_size": _int,
    "lora_base": _str,
    "lora_path": _str,
    "chat_format": _str,
    "chat_template_kwargs": _json_object,
    "clip_model_path": _str,
    "cache": _bool,
    "cache_type": _str,
    "cache_size": _int,
    "type_k": _int,
    "type_v": _int,
    "draft_model": _str,
    "draft_model_num_pred_tokens": _int,
    "verbose": _bool,
    "interrupt_requests": _bool,
    "disable_ping_events": _bool,
}
_LLAMA_CPP_ALIASES = {"threads": "n_threads"}
_LLAMA_CPP_DEFAULTS: dict[str, Any] = {
    "n_ctx": 2048,
    # llama_cpp.server's default (true) aborts a running completion whenever another request
    # arrives; behind a gateway that serves several clients, requests must queue instead.
    "interrupt_requests": False,
}

_WHISPER_ARGS: dict[str, _Render] = {
    "device": _str,
    "device_index": _int,
    "compute_type": _str,
    "threads": _int,
    "beam_size": _int,
}
_WHISPER_DEFAULTS: dict[str, Any] = {"device": "cpu", "compute_type": "int8", "threads": 2}

_PIPER_ARGS: dict[str, _Render] = {
    "config": _str,
    "speaker": _int_or_str,
    "use_cuda": _bool,
    "max_input_chars": _int,
}

_ALLOWED: dict[str, dict[str, _Render]] = {
    "llama-cpp": _LLAMA_CPP_ARGS,
    "faster-whisper": _WHISPER_ARGS,
    "piper": _PIPER_ARGS,
}
_ALIASES: dict[str, dict[str, str]] = {"llama-cpp": _LLAMA_CPP_ALIASES}


# llama_cpp.server reads its settings from the environment too (pydantic-settings, any case), and
# PORT, HOST and CONFIG_FILE even override its command line: a PORT=8080 set for llmux itself (as
# many platforms do) would make every child try port 8080. These never reach its children.
_LLAMA_CPP_ENV = frozenset(
    {
        *_LLAMA_CPP_ARGS,
        "model",
        "host",
        "port",
        "config_file",
        "api_key",
        "ssl_keyfile",
        "ssl_certfile",
        "root_path",
        "numa",
        "hf_tokenizer_config_path",
        "hf_pretrained_model_name_or_path",
        "hf_model_repo_id",
        "yarn_ext_factor",
        "yarn_attn_factor",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_orig_ctx",
        "mul_mat_q",
        "vocab_only",
        "rpc_servers",
    }
)


def engine_env(engine: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for an engine's child, from llmux's own ``environ``.

    For ``llama-cpp`` it drops the variables llama_cpp.server would take as its settings (``PORT``,
    ``HOST``, ``API_KEY``, ``N_CTX``, ... in any case); the others get ``environ`` as is.
    """
    _check_engine(engine)
    if engine != "llama-cpp":
        return dict(environ)
    return {k: v for k, v in environ.items() if k.lower() not in _LLAMA_CPP_ENV}


def engine_cancel_path(engine: str) -> str | None:
    """The POST path template (``{request_id}`` to fill in) that cancels a request in progress
    on the engine's child, or None if the engine has none.

    The request must have been sent with ``X-Llmux-Request-Id: <request_id>``. The child answers
    200 ``{"id", "found", "stopped"}`` once the request's work has stopped (at most 10 s later).
    """
    _check_engine(engine)
    return CANCEL_PATH


def engine_health_path(engine: str) -> str:
    """The GET path that answers 200 once the engine's child has loaded its model."""
    _check_engine(engine)
    return "/v1/models" if engine == "llama-cpp" else "/health"


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; built-in engines: {', '.join(ENGINES)}")


def _normalised_args(engine: str, args: dict[str, Any]) -> dict[str, Any]:
    allowed = _ALLOWED[engine]
    aliases = _ALIASES.get(engine, {})
    out: dict[str, Any] = {}
    for key, value in args.items():
        name = aliases.get(key, key)
        if name not in allowed:
            names = sorted([*allowed, *aliases])
            raise EngineError(
                f"engine {engine!r} has no option args.{key}; allowed: {', '.join(names)}"
            )
        if name in out:
            raise EngineError(f"engine {engine!r}: args.{key} repeats args.{name}")
        out[name] = value
    return out


def _flags(engine: str, args: dict[str, Any], style: str) -> list[str]:
    """``--key value`` pairs; ``style`` "snake" keeps the key, "kebab" turns _ into -."""
    allowed = _ALLOWED[engine]
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + (key.replace("_", "-") if style == "kebab" else key)
        argv += [flag, *allowed[key](engine, key, value)]
    return argv


def engine_argv(engine: str, model: str, args: dict[str, Any]) -> list[str]:
    """The child command line for ``model`` (a path or a packaged name) run by ``engine``.

    Contains the literal ``${PORT}``; raises ``EngineError`` for an unknown engine, an unknown
    or ill-typed ``args`` key, or a model that cannot be found.
    """
    _check_engine(engine)
    options = _normalised_args(engine, args)
    path = resolve_model(engine, model)
    python = sys.executable

    if engine == "llama-cpp":
        options = {**_LLAMA_CPP_DEFAULTS, **options}
        return [
            python,
            "-m",
            "llmux.engines.llama",
            "--model",
            str(path),
            "--host",
            HOST,
            "--port",
            PORT_PLACEHOLDER,
            *_flags(engine, options, "snake"),
        ]

    if engine == "faster-whisper":
        options = {**_WHISPER_DEFAULTS, **options}
        return [
            python,
            "-m",
            "llmux.engines.whisper",
            "--model",
            str(path),
            "--host",
            HOST,
            "--port",
            PORT_PLACEHOLDER,
            *_flags(engine, options, "kebab"),
        ]

    # piper
    if "config" not in options:
        config = Path(f"{path}.json")
        if config.is_file():
            options = {"config": str(config), **options}
    return [
        python,
        "-m",
        "llmux.engines.piper",
        "--model",
        str(path),
        "--host",
        HOST,
        "--port",
        PORT_PLACEHOLDER,
        *_flags(engine, options, "kebab"),
    ]
