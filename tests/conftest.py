"""Shared fixtures: a real `llmux serve` process over a real config, and real upstream children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from llmux.backends.process import free_port
from tests.engine_children import (  # the engine fixtures, for every test module
    llama,  # noqa: F401
    piper,  # noqa: F401
    whisper,  # noqa: F401
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TESTS = Path(__file__).parent
UPSTREAM = TESTS / "upstream.py"


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``cond`` (every 20 ms) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    api_key: str | None = None
    admin_key: str | None = None
    config_path: Path | None = None
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))
    _clients: list[OpenAI] = field(default_factory=list)

    def client(self, key: str | None = None, **kw: Any) -> OpenAI:
        """An openai SDK client for this server (closed when the server stops)."""
        client = OpenAI(
            base_url=self.url + "/v1",
            api_key=key or self.api_key or "none",
            max_retries=0,
            **kw,
        )
        self._clients.append(client)
        return client

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key or self.admin_key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return self._http.get(self.url + path, headers=self.headers(key))

    def post(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        return self._http.post(self.url + path, headers=self.headers(key), **kw)

    def status(self) -> dict[str, Any]:
        resp = self.get("/status")
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def model(self, model_id: str) -> dict[str, Any]:
        model: dict[str, Any] = next(m for m in self.status()["models"] if m["id"] == model_id)
        return model

    def wait_state(self, model_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(
            lambda: (m := self.model(model_id))["state"] == state and m,
            timeout,
            f"{model_id} to be {state}",
        )
        return found

    def upstream(self, name: str) -> str:
        """Base URL of the upstream child named ``name`` (it announces its port when started)."""
        port_file = self.workdir / f"{name}.port"
        port = wait_until(lambda: port_file.exists() and port_file.read_text(), 20, port_file.name)
        return f"http://127.0.0.1:{port}"

    def upstream_wait(self, name: str, **counters: int) -> dict[str, Any]:
        """Block until the upstream's counters (held, cancelled, requests) reach these values."""
        query = "&".join(f"{k}={v}" for k, v in counters.items())
        resp = httpx.get(f"{self.upstream(name)}/_wait?{query}", timeout=40)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def upstream_release(self, name: str) -> None:
        httpx.post(f"{self.upstream(name)}/_release", timeout=10).raise_for_status()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._http.close()
        for client in self._clients:
            client.close()
        self._clients.clear()
        return self.proc.returncode


def upstream_cmd(workdir: Path, name: str, *extra: str) -> str:
    """A ``cmd`` for config: the test upstream as a real child, announcing its port."""
    args = " ".join(extra)
    return (
        f"{sys.executable} {UPSTREAM} --port ${{PORT}} --name {name} --announce {workdir} {args}"
    ).strip()


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start `llmux serve` on a config (YAML text); ``{cmd:NAME ...}`` placeholders are not
    used: build commands with ``upstream_cmd(tmp_path, ...)``. ``config_text=None`` starts it
    without ``--config``: the built-in default stack."""
    servers: list[Server] = []

    def start(
        config_text: str | None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        ready: bool = True,
        args: tuple[str, ...] = (),
    ) -> Server:
        config_args: list[str] = []
        if config_text is not None:
            cfg = tmp_path / f"llmux-{len(servers)}.yaml"
            cfg.write_text(config_text)
            config_args = ["--config", str(cfg)]
        port = free_port()
        log = tmp_path / f"llmux-{len(servers)}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llmux", "serve", *config_args, "--port", str(port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        server = Server(f"http://127.0.0.1:{port}", proc, tmp_path, log, api_key, admin_key)
        if config_text is not None:
            server.config_path = tmp_path / f"llmux-{len(servers)}.yaml"
        servers.append(server)
        if ready:

            def healthy() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"llmux exited: {log.read_text()}")
                try:
                    return httpx.get(server.url + "/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, 30, "llmux /health")
        return server

    yield start
    for server in servers:
        server.stop()
