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

Each engine's options are a typed model in ``llmux.engines.args`` (``ENGINE_ARGS``): the config
checks ``args`` against it when it loads, and the flags are derived from it.

Every engine's child stops the work of a request whose client disconnects, and serves
``POST /llmux/cancel/{request_id}`` for requests sent with ``X-Llmux-Request-Id``
(``engine_cancel_path``; the contract is in ``llmux.engines._cancel`` and docs/engines.md).

Everything here comes from config, never from a request.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmux.engines.args import (
    ENGINE_ARGS,
    EngineArgs,
    InvalidArgs,
    LlamaCppArgs,
    PiperArgs,
    check_args,
)
from llmux.engines.packaged import EngineError, packaged_names, resolve_model

__all__ = [
    "ENGINES",
    "ENGINE_ARGS",
    "PORT_PLACEHOLDER",
    "REQUEST_ID_HEADER",
    "EngineArgs",
    "EngineError",
    "InvalidArgs",
    "check_args",
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
_MODULES = {
    "llama-cpp": "llmux.engines.llama",
    "faster-whisper": "llmux.engines.whisper",
    "piper": "llmux.engines.piper",
}

# llama_cpp.server reads its settings from the environment too (pydantic-settings, any case), and
# PORT, HOST and CONFIG_FILE even override its command line: a PORT=8080 set for llmux itself (as
# many platforms do) would make every child try port 8080. These never reach its children.
_LLAMA_CPP_ENV = frozenset(
    {
        *LlamaCppArgs.model_fields,
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


def engine_argv(engine: str, model: str, args: Mapping[str, Any] | EngineArgs) -> list[str]:
    """The child command line for ``model`` (a path or a packaged name) run by ``engine``.

    ``args`` are the model's options, as in the config or already typed (``check_args``); the
    flags come from the typed model. Contains the literal ``${PORT}``; raises ``EngineError``
    for an unknown engine, an unknown or ill-typed option (``InvalidArgs``), or a model that
    cannot be found.
    """
    _check_engine(engine)
    options = args if isinstance(args, EngineArgs) else check_args(engine, args)
    if not isinstance(options, ENGINE_ARGS[engine]):
        raise EngineError(
            f"engine {engine!r} takes {ENGINE_ARGS[engine].__name__}, not {type(options).__name__}"
        )
    path = resolve_model(engine, model)
    if isinstance(options, PiperArgs) and options.config is None:
        config = Path(f"{path}.json")
        if config.is_file():
            options = options.model_copy(update={"config": str(config)})
    return [
        sys.executable,
        "-m",
        _MODULES[engine],
        "--model",
        str(path),
        "--host",
        HOST,
        "--port",
        PORT_PLACEHOLDER,
        *options.flags(),
    ]
