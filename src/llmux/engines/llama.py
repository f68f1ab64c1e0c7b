"""llama-cpp-python's own OpenAI server, run as one model's child, with what llmux needs added.

    python -m llmux.engines.llama --model MODEL.gguf --port N [any llama_cpp.server flag]

Takes exactly ``python -m llama_cpp.server``'s flags and serves its app unchanged, with three
additions around it:

- **Work stops when its request does.** llama_cpp.server stops a *streamed* completion at the next
  token once its client leaves, but a non-streamed one runs to ``max_tokens`` for nobody, holding
  the model's lock: the next request waits for it. Here each request is registered under its
  ``X-Llmux-Request-Id`` (``_cancel``); a client that disconnects, or
  ``POST /llmux/cancel/{request_id}``, stops it within a token: ``Llama.eval`` (called for the
  prompt and for every generated token) checks the request's stop flag first, and llama.cpp's
  abort callback stops a long prompt evaluation between graph nodes. The thread then raises
  ``Stopped``, which ends the request quietly.
- **Invalid requests are 400s.** llama_cpp.server answers a body that fails its own schema with a
  500 whose message names its source files (FastAPI's validation error text), and a body that is
  not JSON with a bare 500. Here the body of ``/v1/chat/completions``, ``/v1/completions`` and
  ``/v1/embeddings`` is checked against the same pydantic models first: a 400 in OpenAI's
  envelope naming the field. A ``grammar`` that llama.cpp cannot parse (which would crash the
  process with SIGSEGV) is a 400 too.
- Nothing else: routes, answers, settings and environment are llama_cpp.server's.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmux.api.errors import send_error
from llmux.engines._cancel import CancelMiddleware, Stopped, current_work
from llmux.errors import InvalidRequest

log = logging.getLogger("llmux.engines.llama")

_GUARDED = "_llmux_guarded"


class _AbortFlag:
    """One byte that llama.cpp's abort callback reads, in C, without taking the GIL.

    ggml calls the abort callback after every node of the graph it computes (hundreds per
    token). A Python callback would take the GIL each time, slowing every token and stalling
    behind any other Python thread; instead the callback is libc's ``strlen`` over a two-byte
    buffer: ``""`` (0, false) while the request runs, ``"\\x01"`` (1, true) once it is cancelled.
    A C ``bool`` is returned in the low byte of the return register, where ``strlen``'s 0 or 1 is.
    """

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(2)

    def set(self) -> None:
        self._buf[0] = b"\x01"

    def clear(self) -> None:
        self._buf[0] = b"\x00"

    @property
    def address(self) -> int:
        return ctypes.addressof(self._buf)


def _strlen_callback(prototype: Any) -> Any | None:
    """libc's ``strlen`` as a ``ggml_abort_callback``, or None where there is no libc to find."""
    name = ctypes.util.find_library("c") or ("msvcrt" if sys.platform == "win32" else None)
    try:
        libc = ctypes.CDLL(name)
        address = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    return prototype(address) if address else None


def guard(llama: Any) -> None:
    """Make ``llama`` (a ``llama_cpp.Llama``) stop for a cancelled request: its ``eval`` raises
    ``Stopped`` for a request whose stop flag is set, and a running ``llama_decode`` aborts."""
    if getattr(llama, _GUARDED, False):
        return
    import llama_cpp

    flag = _AbortFlag()
    callback = _strlen_callback(llama_cpp.ggml_abort_callback)
    if callback is not None:
        llama_cpp.llama_set_abort_callback(llama._ctx.ctx, callback, flag.address)
    evaluate: Callable[[Sequence[int]], None] = llama.eval

    def guarded_eval(tokens: Sequence[int]) -> None:
        work = current_work()
        if work is None:
            evaluate(tokens)
            return
        work.check()
        flag.clear()
        remove = work.on_stop(flag.set)
        try:
            evaluate(tokens)
        except RuntimeError:  # llama_decode returned 2: aborted by the callback
            if not work.stopped:
                raise
            # The aborted batch left part of its tokens in the KV cache; start clean.
            llama.reset()
            raise Stopped(f"request {work.id} stopped during evaluation") from None
        finally:
            remove()
            flag.clear()
        work.progress += 1
        work.check()

    llama.eval = guarded_eval
    llama._llmux_abort_callback = (callback, flag)  # kept alive as long as the model
    setattr(llama, _GUARDED, True)


class _GuardedProxy:
    """llama_cpp.server's model proxy, guarding every model it hands out (it may load others)."""

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    def __call__(self, model: str | None = None) -> Any:
        llama = self._proxy(model)
        guard(llama)
        return llama

    def __iter__(self) -> Any:
        return iter(self._proxy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proxy, name)


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """A message without inputs or paths from pydantic's errors; the first field as ``param``."""
    parts: list[str] = []
    param: str | None = None
    for error in errors[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()))
        if param is None and error.get("loc"):
            param = str(error["loc"][0])
        parts.append(f"{loc or 'body'}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "Invalid request: " + "; ".join(parts) + more, param


class RequestValidation:
    """Checks the JSON body of the OpenAI routes against llama_cpp.server's own request models
    before its app sees it: anything they reject is a 400 in OpenAI's envelope."""

    def __init__(self, app: ASGIApp, grammar_ok: Callable[[str], bool] | None = None) -> None:
        self.app = app
        self.grammar_ok = grammar_ok
        from llama_cpp.server.types import (
            CreateChatCompletionRequest,
            CreateCompletionRequest,
            CreateEmbeddingRequest,
        )

        self.models: dict[str, Any] = {
            "/v1/chat/completions": CreateChatCompletionRequest,
            "/v1/completions": CreateCompletionRequest,
            "/v1/engines/copilot-codex/completions": CreateCompletionRequest,
            "/v1/embeddings": CreateEmbeddingRequest,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self.models.get(scope.get("path", "")) if scope["type"] == "http" else None
        if model is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = self._problem(model, body)
        if problem is not None:
            reason, param = problem
            await send_error(send, InvalidRequest(reason, param=param))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _problem(self, model: Any, body: bytes) -> tuple[str, str | None] | None:
        from pydantic import ValidationError

        try:
            data = json.loads(body)
        except ValueError as e:  # UnicodeDecodeError is one
            return f"The request body must be JSON ({type(e).__name__}).", None
        if not isinstance(data, dict):
            return "The request body must be a JSON object.", None
        try:
            model.model_validate(data)
        except ValidationError as e:
            return _validation_message(e.errors(include_url=False, include_input=False))
        grammar = data.get("grammar")
        if isinstance(grammar, str) and self.grammar_ok and not self.grammar_ok(grammar):
            return "'grammar' is not a GBNF grammar that llama.cpp can parse (with a root rule).", (
                "grammar"
            )
        return None


def create_app(server_settings: Any, model_settings: list[Any]) -> ASGIApp:
    """llama_cpp.server's app for these settings (it loads the model), wrapped as described."""
    import llama_cpp.server.app as server_app

    app = server_app.create_app(server_settings=server_settings, model_settings=model_settings)
    proxy = _GuardedProxy(server_app._llama_proxy)
    # The route handlers take the proxy from this module global for every request.
    server_app._llama_proxy = proxy  # type: ignore[assignment]
    return CancelMiddleware(RequestValidation(app, partial(_grammar_ok, proxy)), log=log)


def _grammar_ok(proxy: _GuardedProxy, text: str) -> bool:
    """Whether llama.cpp parses ``text`` as a grammar. llama-cpp-python hands the sampler chain
    whatever llama.cpp returns, and for a grammar it cannot parse that is NULL: the process
    dies (SIGSEGV). Building the grammar sampler once here, on the loaded model's vocabulary
    (read only, so safe beside a running generation), tells without crashing."""
    import llama_cpp

    llama = proxy._current_model
    if llama is None:
        return True
    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, text.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llama_cpp.server``'s ``main``, serving the wrapped app."""
    import uvicorn
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import (
        ConfigFileSettings,
        ModelSettings,
        ServerSettings,
        Settings,
    )

    parser = argparse.ArgumentParser(prog="python -m llmux.engines.llama", description=__doc__)
    add_args_from_model(parser, Settings)
    parser.add_argument("--config_file", type=str, help="Path to a config file to load.")
    args = parser.parse_args(argv)
    server_settings: Any
    model_settings: list[Any]
    try:
        config_file = os.environ.get("CONFIG_FILE", args.config_file)
        if config_file:
            with open(config_file, "rb") as f:
                if config_file.endswith((".yaml", ".yml")):
                    import yaml

                    text = json.dumps(yaml.safe_load(f))
                else:
                    text = f.read().decode()
            config = ConfigFileSettings.model_validate_json(text)
            server_settings = ServerSettings.model_validate(config)
            model_settings = config.models
        else:
            server_settings = parse_model_from_args(ServerSettings, args)
            model_settings = [parse_model_from_args(ModelSettings, args)]
    except Exception as e:
        print(e, file=sys.stderr)
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(server_settings, model_settings)
    uvicorn.run(
        app,
        host=os.getenv("HOST", server_settings.host),
        port=int(os.getenv("PORT", server_settings.port)),
        ssl_keyfile=server_settings.ssl_keyfile,
        ssl_certfile=server_settings.ssl_certfile,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
