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
- ``vllm``: vLLM's own OpenAI server, ``python -m vllm.entrypoints.openai.api_server`` with
  ``--enable-sleep-mode`` and its environment's ``VLLM_SERVER_DEV_MODE=1`` (``engine_env``),
  which its sleep endpoints need (``llmux.backends.sleep``). ``model`` is a path or a Hugging
  Face repo id (``org/name``), which vLLM resolves itself. vLLM answers only to the names it
  serves, so it is started with ``--served-model-name`` and the names requests carry
  (``served_names``: llmux's id and aliases) unless ``args.served_model_name`` is set. Nothing
  here imports vllm (it is not a dependency of llmux); it stops a request's work when its client
  disconnects, so it has no cancel path.

Each engine's options are a typed model in ``llmux.engines.args`` (``ENGINE_ARGS``): the config
checks ``args`` against it when it loads, and the flags are derived from it.

Every engine's child stops the work of a request whose client disconnects; llmux's own engines
also serve ``POST /llmux/cancel/{request_id}`` for requests sent with ``X-Llmux-Request-Id``
(``engine_cancel_path``; the contract is in ``llmux.engines._cancel`` and docs/engines.md).

Everything here comes from config, never from a request.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmux.engines.args import (
    ENGINE_ARGS,
    EngineArgs,
    InvalidArgs,
    LlamaCppArgs,
    PiperArgs,
    VllmArgs,
    check_args,
)
from llmux.engines.packaged import EngineError, packaged_names, resolve_model

__all__ = [
    "ENGINES",
    "ENGINE_ARGS",
    "PORT_PLACEHOLDER",
    "REQUEST_ID_HEADER",
    "VLLM_DEV_MODE_ENV",
    "EngineArgs",
    "EngineError",
    "InvalidArgs",
    "check_args",
    "check_model",
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

ENGINES = ("llama-cpp", "faster-whisper", "piper", "vllm")
_MODULES = {
    "llama-cpp": "llmux.engines.llama",
    "faster-whisper": "llmux.engines.whisper",
    "piper": "llmux.engines.piper",
    "vllm": "vllm.entrypoints.openai.api_server",
}
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
"""``org/name`` as the Hugging Face Hub spells a repo id (what vLLM's ``--model`` also takes)."""

VLLM_DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
"""vLLM serves /sleep, /wake_up, /is_sleeping, /collective_rpc, /reset_prefix_cache only
with this set to 1."""
_VLLM_DROPPED_ENV = frozenset({"VLLM_API_KEY"})
"""vLLM would demand this key of every request, llmux's own sleep calls and probes included."""

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
    ``HOST``, ``API_KEY``, ``N_CTX``, ... in any case). For ``vllm`` it sets
    ``VLLM_SERVER_DEV_MODE=1`` (the sleep endpoints) and drops ``VLLM_API_KEY``. The others get
    ``environ`` as is.
    """
    _check_engine(engine)
    if engine == "llama-cpp":
        return {k: v for k, v in environ.items() if k.lower() not in _LLAMA_CPP_ENV}
    if engine == "vllm":
        env = {k: v for k, v in environ.items() if k not in _VLLM_DROPPED_ENV}
        return {**env, VLLM_DEV_MODE_ENV: "1"}
    return dict(environ)


def engine_cancel_path(engine: str) -> str | None:
    """The POST path template (``{request_id}`` to fill in) that cancels a request in progress
    on the engine's child, or None if the engine has none (``vllm``: vLLM stops a request's
    work when its client disconnects, and llmux's relay disconnects).

    The request must have been sent with ``X-Llmux-Request-Id: <request_id>``. The child answers
    200 ``{"id", "found", "stopped"}`` once the request's work has stopped (at most 10 s later).
    """
    _check_engine(engine)
    return None if engine == "vllm" else CANCEL_PATH


def engine_health_path(engine: str) -> str:
    """The GET path that answers 200 once the engine's child has loaded its model."""
    _check_engine(engine)
    return "/v1/models" if engine == "llama-cpp" else "/health"


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; built-in engines: {', '.join(ENGINES)}")


def engine_argv(
    engine: str,
    model: str,
    args: Mapping[str, Any] | EngineArgs,
    *,
    served_names: Sequence[str] = (),
) -> list[str]:
    """The child command line for ``model`` (a path or a packaged name; for ``vllm`` also a
    Hugging Face repo id) run by ``engine``.

    ``args`` are the model's options, as in the config or already typed (``check_args``); the
    flags come from the typed model. ``served_names``: the ``model`` names requests will carry
    (``vllm`` answers to no other, so they become its ``--served-model-name`` unless ``args``
    name it; the other engines answer to any). Contains the literal ``${PORT}``; raises
    ``EngineError`` for an unknown engine, an unknown or ill-typed option (``InvalidArgs``), or
    a model that cannot be found.
    """
    _check_engine(engine)
    options = args if isinstance(args, EngineArgs) else check_args(engine, args)
    if not isinstance(options, ENGINE_ARGS[engine]):
        raise EngineError(
            f"engine {engine!r} takes {ENGINE_ARGS[engine].__name__}, not {type(options).__name__}"
        )
    if isinstance(options, VllmArgs):
        where = _vllm_model(model)
        if options.served_model_name is None and served_names:
            options = options.model_copy(update={"served_model_name": list(served_names)})
    else:
        path = resolve_model(engine, model)
        where = str(path)
        if isinstance(options, PiperArgs) and options.config is None:
            config = Path(f"{path}.json")
            if config.is_file():
                options = options.model_copy(update={"config": str(config)})
    return [
        sys.executable,
        "-m",
        _MODULES[engine],
        "--model",
        where,
        "--host",
        HOST,
        "--port",
        PORT_PLACEHOLDER,
        *options.flags(),
    ]


def _vllm_model(model: str) -> str:
    """vLLM's ``--model``: an existing path, or a Hugging Face repo id that vLLM resolves itself
    (from its cache, or the Hub unless ``HF_HUB_OFFLINE=1``)."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    if _HF_REPO_ID.fullmatch(model) and ".." not in model:
        return model
    raise EngineError(
        f"model {model!r} for engine 'vllm' is neither an existing path nor a Hugging Face "
        "repo id (org/name)"
    )


def check_model(engine: str, model: str) -> None:
    """Raise ``EngineError`` if ``model`` cannot load here: for the engines that run a packaged
    model or a path, ``resolve_model``'s checks; for ``vllm``, a model that is neither a path
    nor a repo id, or vllm not installed (found without importing it)."""
    _check_engine(engine)
    if engine != "vllm":
        resolve_model(engine, model)
        return
    _vllm_model(model)
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise EngineError(
            "engine 'vllm' runs vLLM's own server, and the Python package 'vllm' is not "
            "installed here: pip install vllm (in the environment llmux runs in)"
        )
