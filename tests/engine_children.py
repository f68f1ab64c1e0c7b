"""The built-in engines as real child processes, for the engine tests: one per test module.

``piper``, ``whisper`` and ``llama`` are module-scoped fixtures (registered in conftest.py):
each starts the engine from ``engine_argv`` (``${PORT}`` filled with a free port), exactly as
llmux starts it, waits for its health path, and kills it at the end. Without the ``engines``
extra, ``require_engine`` skips the test with the pip command that installs what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from llmux.backends.process import free_port
from llmux.engines import PORT_PLACEHOLDER, engine_argv, engine_env, engine_health_path

READY_TIMEOUT = 120.0


def require_engine(engine: str, model: str, *modules: str) -> None:
    """Skip the test, saying what to install, unless the engine's modules and model are there."""
    from llmux.engines import EngineError, resolve_model

    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"engine {engine!r} needs {module}: pip install 'llmux[engines]'")
    try:
        resolve_model(engine, model)
    except EngineError as e:
        pytest.skip(str(e))


@dataclass
class Server:
    engine: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ready_s: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


def _start(engine: str, model: str, args: dict[str, Any], log_dir: Path) -> Iterator[Server]:
    port = free_port()
    argv = [a.replace(PORT_PLACEHOLDER, str(port)) for a in engine_argv(engine, model, args)]
    env = engine_env(engine, os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    log_path = log_dir / f"{engine}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(engine, proc, port, log_path, 0.0)
    try:
        health = server.base_url + engine_health_path(engine)
        deadline = started + READY_TIMEOUT
        with httpx.Client(timeout=2.0) as http:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{engine} exited with {proc.returncode}:\n{server.log_tail()}")
                try:
                    if http.get(health).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{engine} not ready in {READY_TIMEOUT}s:\n{server.log_tail()}")
                time.sleep(0.05)  # bounded poll of a child's readiness
        server.ready_s = time.monotonic() - started
        print(f"{engine} ready in {server.ready_s:.2f}s", file=sys.stderr)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def piper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_engine("piper", "en_US-joe-medium", "piper")
    yield from _start("piper", "en_US-joe-medium", {}, tmp_path_factory.mktemp("piper"))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_engine("faster-whisper", "whisper-tiny.en", "faster_whisper")
    args = {"device": "cpu", "compute_type": "int8", "threads": 2}
    yield from _start("faster-whisper", "whisper-tiny.en", args, tmp_path_factory.mktemp("asr"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_engine("llama-cpp", "smollm2-135m", "llama_cpp", "sse_starlette", "starlette_context")
    # n_threads_batch as docs/engines.md advises for a busy 2-core box; the real server taking
    # the flag is part of what this fixture checks.
    args = {"n_ctx": 2048, "threads": 2, "n_threads_batch": 1, "model_alias": "smollm2"}
    yield from _start("llama-cpp", "smollm2-135m", args, tmp_path_factory.mktemp("llm"))
