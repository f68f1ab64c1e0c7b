"""Config reload on SIGHUP and with `serve --watch`, against a live server."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, StartServer, upstream_cmd, wait_until
from tests.test_api import chat

pytestmark = pytest.mark.slow


def config(tmp: Path, budget: float = 8, **models: str) -> str:
    body = "".join(
        f"\n  {name}:\n    type: llm\n    vram_gb: 1\n    stop_timeout: 5s\n    cmd: {cmd}"
        for name, cmd in models.items()
    )
    return f"gpu: {{vram_gb: {budget}, reserve_gb: 0}}\nmodels:{body}\n"


def reload(server: Server, text: str) -> None:
    assert server.config_path is not None
    server.config_path.write_text(text)
    server.proc.send_signal(signal.SIGHUP)


def model_ids(server: Server) -> set[str]:
    return {m["id"] for m in server.status()["models"]}


def test_add_model_and_budget(start_server: StartServer, tmp_path: Path) -> None:
    a = upstream_cmd(tmp_path, "a")
    server = start_server(config(tmp_path, a=a))
    assert chat(server.client(), "a") == "a got a"
    reload(server, config(tmp_path, budget=6, a=a, c=upstream_cmd(tmp_path, "c")))
    wait_until(lambda: "c" in model_ids(server), 10, "model c to appear")
    assert server.status()["vram"]["budget_gb"] == 6
    assert chat(server.client(), "c") == "c got c"
    assert server.model("a")["state"] == "ready"  # unchanged models keep running
    assert {m.id for m in server.client().models.list()} == {"a", "c"}


def test_remove_busy_model_drains_first(start_server: StartServer, tmp_path: Path) -> None:
    a, b = upstream_cmd(tmp_path, "a"), upstream_cmd(tmp_path, "b")
    server = start_server(config(tmp_path, a=a, b=b))
    client = server.client()
    stream = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hold"}], stream=True
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == "a"
    server.upstream_wait("a", held=1)
    reload(server, config(tmp_path, b=b))
    server.wait_state("a", "draining")
    with pytest.raises(openai.NotFoundError):  # new requests no longer find it
        chat(client, "a")
    server.upstream_release("a")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " got a"  # not cut
    wait_until(lambda: "a" not in model_ids(server), 10, "a to be gone")
    assert chat(client, "b") == "b got b"


def test_changed_model_restarts_after_drain(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(config(tmp_path, a=upstream_cmd(tmp_path, "a")))
    client = server.client()
    assert chat(client, "a") == "a got a"
    old_pid = server.model("a")["pid"]
    result: dict[str, str] = {}
    t = threading.Thread(target=lambda: result.update(held=chat(client, "a", "hold")))
    t.start()
    server.upstream_wait("a", held=1)
    reload(server, config(tmp_path, a=upstream_cmd(tmp_path, "a2")))
    server.wait_state("a", "draining")
    server.upstream_release("a")
    t.join(20)
    assert result["held"] == "a got a"  # the in-flight request finished on the old process
    assert chat(client, "a") == "a2 got a"  # the next one started the new command
    assert server.model("a")["pid"] != old_pid


def test_invalid_config_keeps_the_old_one(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(config(tmp_path, a=upstream_cmd(tmp_path, "a")))
    reload(server, "models:\n  a: {type: llm, vram_gb: lots}\n")
    wait_until(lambda: "config reload rejected" in server.log.read_text(), 10, "rejection log")
    assert "models.a.vram_gb" in server.log.read_text()
    assert chat(server.client(), "a") == "a got a"


def test_watch_reloads_on_change(start_server: StartServer, tmp_path: Path) -> None:
    a = upstream_cmd(tmp_path, "a")
    server = start_server(config(tmp_path, a=a), args=("--watch",))
    assert server.config_path is not None
    server.config_path.write_text(config(tmp_path, a=a, w=upstream_cmd(tmp_path, "w")))
    wait_until(lambda: "w" in model_ids(server), 15, "the watched change")
    assert chat(server.client(), "w") == "w got w"
    assert httpx.get(server.url + "/health").status_code == 200
