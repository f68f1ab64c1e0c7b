"""The client commands (status, load, unload, logs): the real `llmux` CLI as a subprocess against
a live server, and the status view rendered in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from llmux.backends.process import free_port
from llmux.cli import render_status
from tests.conftest import Server, StartServer, wait_until
from tests.test_api import two_llms

CLI_TIMEOUT_S = 60


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMUX_URL", "LLMUX_API_KEY")}
    return {**env, "NO_COLOR": "1", **extra}


def llmux(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmux", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=env or clean_env(),
        check=False,
    )


def against(server: Server, *args: str, key: str | None = None) -> list[str]:
    return [*args, "--url", server.url, *(["--key", key] if key else [])]


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of the status table (and any other line), by their first word."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# ---------------------------------------------------------------- against a live server


@pytest.mark.slow
def test_status_load_unload_logs(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))

    shown = llmux(*against(server, "status"))
    assert shown.returncode == 0, shown.stderr
    assert "VRAM 0.0 / 4.0 GB reserved" in shown.stdout
    rows = table_rows(shown.stdout)
    assert rows["a"][1:4] == ["llm", "llm", "unloaded"]
    assert rows["b"][1:4] == ["llm", "llm", "unloaded"]
    assert "\x1b[" not in shown.stdout  # no colour codes when not a terminal

    as_json = llmux(*against(server, "status", "--json"))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == server.status()

    loaded = llmux(*against(server, "load", "alpha"))  # an alias names its model
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == "a: ready\n"
    ready = llmux(*against(server, "status"))
    row = table_rows(ready.stdout)["a"]
    pid = server.model("a")["pid"]
    assert row[3] == "ready"
    assert str(pid) in row

    logs = llmux(*against(server, "logs", "a"))
    assert logs.returncode == 0, logs.stderr
    assert (
        logs.stdout.splitlines()[0]
        == f"upstream a pid {pid} port " + (server.upstream("a").rsplit(":", 1)[1])
    )

    unloaded = llmux(*against(server, "unload", "a"))
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout == "a: unloaded\n"
    assert server.model("a")["state"] == "unloaded"

    nothing = llmux(*against(server, "logs", "b"))  # never started: nothing kept, a hint
    assert nothing.returncode == 0
    assert nothing.stdout == ""
    assert nothing.stderr == "llmux: no output kept for b (is it loaded?)\n"

    for command in (["unload", "nope"], ["logs", "-f", "x"]):
        missing = llmux(*against(server, *command))
        assert missing.returncode == 1, (command, missing.stderr)
        assert missing.stderr.strip() == f"llmux: no model named {command[-1]}"
        assert missing.stdout == ""


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_logs_follow_until_ctrl_c(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(two_llms(tmp_path))
    server.post("/models/a/load").raise_for_status()
    out, err = tmp_path / "follow.out", tmp_path / "follow.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmux", *against(server, "logs", "a", "-f")],
            stdout=stdout,
            stderr=stderr,
            env=clean_env(),
            # Ctrl-C as a terminal delivers it. A test run started in the background of a
            # non-interactive shell inherits SIGINT ignored, and Python then installs no
            # KeyboardInterrupt handler: the command would (rightly) sit through the signal.
            preexec_fn=_sigint_default,
        )
    try:
        wait_until(lambda: "upstream a pid" in out.read_text(), 30, "the first followed line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.read_text().startswith("upstream a pid")
    assert err.read_text() == ""


@pytest.mark.slow
def test_keys(start_server: StartServer, tmp_path: Path) -> None:
    cfg = two_llms(tmp_path, api_keys='["k"]', admin_keys='["adm"]')
    server = start_server(cfg, api_key="k", admin_key="adm")

    no_key = llmux(*against(server, "status"))
    assert no_key.returncode == 4
    assert no_key.stderr.startswith("llmux: an API key is required")
    assert "--key" in no_key.stderr
    assert_clean(no_key)

    wrong = llmux(*against(server, "status", key="wrong"))
    assert wrong.returncode == 4
    assert "invalid API key" in wrong.stderr

    assert llmux(*against(server, "status", key="k")).returncode == 0

    for command in (["unload", "a"], ["logs", "-f", "a"]):
        user = llmux(*against(server, *command, key="k"))
        assert user.returncode == 4, (command, user.stderr)
        assert "admin key" in user.stderr
        assert len(user.stderr.splitlines()) == 1
        assert_clean(user)
    no_admin = llmux(*against(server, "load", "a"))
    assert no_admin.returncode == 4
    assert "admin API key is required" in no_admin.stderr

    loaded = llmux(*against(server, "load", "a", key="adm"))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == "a: ready\n"
    # the URL and the key from the environment
    env = clean_env(LLMUX_URL=server.url, LLMUX_API_KEY="adm")
    unloaded = llmux("unload", "a", env=env)
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout == "a: unloaded\n"


@pytest.mark.slow
def test_load_failure_is_one_line(start_server: StartServer, tmp_path: Path) -> None:
    cfg = """
gpu: {vram_gb: 4, reserve_gb: 0}
models:
  big: {type: llm, vram_gb: 8, cmd: "true"}
"""
    server = start_server(cfg)
    result = llmux(*against(server, "load", "big"))
    assert result.returncode == 1
    assert result.stderr.startswith("llmux: ")
    assert len(result.stderr.splitlines()) == 1
    assert_clean(result)


@pytest.mark.slow
def test_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["status"], ["load", "a"], ["logs", "-f", "a"]):
        result = llmux(*command, "--url", url)
        assert result.returncode == 3, (command, result.stderr)
        assert result.stderr == f"llmux: cannot reach {url} (is `llmux serve` running?)\n"
        assert result.stdout == ""
    port = url.rsplit(":", 1)[1]  # no scheme: http is meant
    bare = llmux("status", "--url", f"127.0.0.1:{port}")
    assert bare.returncode == 3
    assert f"cannot reach http://127.0.0.1:{port} " in bare.stderr
    from_env = llmux("status", env=clean_env(LLMUX_URL=url))
    assert from_env.returncode == 3
    assert url in from_env.stderr


# ---------------------------------------------------------------- the status view, in-process


def test_status_view() -> None:
    now = 1_800_000_000.0
    body = {
        "vram": {"budget_gb": 16.0, "reserved_gb": 12.0, "measured_gb": 11.5},
        "models": [
            {"id": "qwen-7b", "type": "llm", "tier": "llm", "state": "ready", "vram_gb": 6.0,
             "measured_gb": 5.5, "pinned": False, "in_flight": 2, "queued": 3,
             "last_used": now - 190, "pid": 41234, "last_error": None},
            {"id": "ears", "type": "asr", "tier": "asr", "state": "unloaded", "vram_gb": 1.0,
             "measured_gb": None, "pinned": True, "in_flight": 0, "queued": 0,
             "last_used": None, "pid": None, "last_error": "boom " * 40},
        ],
    }  # fmt: skip
    wide = Console(width=200, record=True, color_system=None)
    render_status(body, wide, now=now)
    text = wide.export_text()
    assert "VRAM 12.0 / 16.0 GB reserved  [" in text
    assert "] 75%  measured 11.5 GB" in text
    rows = table_rows(text)
    assert rows["qwen-7b"] == ["qwen-7b", "llm", "llm", "ready", "6.0", "5.5", "2", "3", "41234",
                               "3m", "ago"]  # fmt: skip
    assert rows["ears*"][:10] == ["ears*", "asr", "asr", "unloaded", "1.0", "-", "0", "0", "-", "-"]
    assert rows["ears*"][-1].endswith("…")  # the last error is cut short
    assert "* pinned" in text
    assert "HOST" not in text  # no model can sleep: no host line, no SLEEP column
    assert "SLEEP" not in text

    narrow = Console(width=80, record=True, color_system=None)
    render_status(body, narrow, now=now)
    lines = narrow.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert any(line.startswith("ears: boom boom") for line in lines)  # errors under the table


def test_status_view_with_sleepers() -> None:
    now = 1_800_000_000.0
    body = {
        "vram": {"budget_gb": 16.0, "reserved_gb": 6.5, "measured_gb": None},
        "host": {"budget_gb": 60.0, "reserved_gb": 15.0},
        "models": [
            {"id": "qwen", "type": "llm", "tier": "llm", "state": "sleeping", "vram_gb": 14.0,
             "measured_gb": None, "pinned": False, "in_flight": 0, "queued": 0,
             "last_used": now - 30, "pid": 4321, "last_error": None, "sleep_level": 1,
             "residual_gb": 0.5, "host_gb": 15.0},
            {"id": "llama", "type": "llm", "tier": "llm", "state": "waking", "vram_gb": 6.0,
             "measured_gb": None, "pinned": False, "in_flight": 0, "queued": 2,
             "last_used": now - 60, "pid": 4322, "last_error": None, "sleep_level": 2,
             "residual_gb": 0.4, "host_gb": 0.0},
            {"id": "ears", "type": "asr", "tier": "asr", "state": "ready", "vram_gb": 1.0,
             "measured_gb": None, "pinned": True, "in_flight": 0, "queued": 0,
             "last_used": None, "pid": 77, "last_error": None},
        ],
    }  # fmt: skip
    console = Console(width=160, record=True, color_system=None)
    render_status(body, console, now=now)
    text = console.export_text()
    lines = text.splitlines()
    assert lines[0].startswith("VRAM 6.5 / 16.0 GB reserved  [")
    assert lines[1].startswith("HOST 15.0 / 60.0 GB held by sleeping models  [")
    assert lines[1].endswith("] 25%")
    rows = table_rows(text)
    assert rows["MODEL"][:8] == ["MODEL", "TYPE", "TIER", "STATE", "VRAM", "GB", "SLEEP", "IN"]
    assert rows["qwen"][:9] == ["qwen", "llm", "llm", "sleeping", "14.0", "L1", "0", "0", "4321"]
    assert rows["llama"][:9] == ["llama", "llm", "llm", "waking", "6.0", "L2", "0", "2", "4322"]
    assert rows["ears*"][:6] == ["ears*", "asr", "asr", "ready", "1.0", "-"]

    # Colour: the two new states are styled like the others.
    coloured = Console(width=160, record=True, force_terminal=True, color_system="standard")
    render_status(body, coloured, now=now)
    ansi = coloured.export_text(styles=True)
    assert "\x1b[34msleeping" in ansi  # blue
    assert "\x1b[36mwaking" in ansi  # cyan
