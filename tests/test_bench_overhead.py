"""Smoke runs of the gateway-overhead bench (issue 5B): the tools run end to end and write
well-formed results. The numbers are not checked: these machines are noisy, and a test is not a
benchmark (bench/results/ and docs/performance.md hold the measurements)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("wrk") is None, reason="wrk is not on PATH (make test installs it)"
    ),
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_overhead_bench_quick_run_writes_well_formed_results(tmp_path: Path) -> None:
    _run(
        "bench/overhead/run.py",
        "--quick",
        "--repeats",
        "1",
        "--no-litellm",
        "--max-wait",
        "0",
        "--out",
        str(tmp_path),
    )
    [json_path] = tmp_path.glob("overhead-*.json")
    [md_path] = tmp_path.glob("overhead-*.md")
    result = json.loads(json_path.read_text())
    assert "bench/overhead/run.py" in result["command"]
    assert result["paths"] == ["direct", "direct-1core", "llmux", "bare"]
    [rep] = result["repeats"]
    for block in ("c1", "c16", "sse"):
        for path in result["paths"]:
            assert block in rep
            assert path in rep[block]
    for path in ("direct", "llmux", "bare"):
        assert rep["c1"][path]["rps"] > 0
        assert rep["c1"][path]["errors"] == 0
    summary = result["summary"]
    assert summary["errors"] == dict.fromkeys(result["paths"], 0)
    goals = summary["goals"]
    assert len(goals) == 7
    for goal in goals:
        assert isinstance(goal["value"], float)
        assert isinstance(goal["pass"], bool)
    text = md_path.read_text()
    assert "## Goals (issue 5)" in text
    assert "| req/s, c=1 |" in text


def test_cpu_ab_compares_two_builds(tmp_path: Path) -> None:
    src = str(ROOT / "src")
    proc = _run(
        "bench/overhead/cpu_ab.py",
        "--rounds",
        "1",
        "--seconds",
        "1",
        "--out",
        str(tmp_path),
        src,
        src,
    )
    [json_path] = tmp_path.glob("overhead-*-cpu-ab.json")
    result = json.loads(json_path.read_text())
    assert set(result["medians"]) == {src}  # the same tree twice is one entry, measured twice
    medians = result["medians"][src]
    for key in ("rps_c1", "rps_c16", "cpu_us_c1", "cpu_us_c16"):
        assert medians[key] > 0, key
    assert len(result["samples"][src]["rps_c1"]) == 2
    assert "wrote" in proc.stdout


def test_floor_measures_the_http_stack_alone(tmp_path: Path) -> None:
    proc = _run(
        "bench/overhead/floor.py", "--rounds", "1", "--seconds", "1", "--out", str(tmp_path)
    )
    [json_path] = tmp_path.glob("floor-*.json")
    [md_path] = tmp_path.glob("floor-*.md")
    result = json.loads(json_path.read_text())
    [one] = result["per_round"]
    for key in ("direct_rps", "budget_us", "server_us", "client_us", "floor_us"):
        assert one[key] > 0, key
        assert result["medians"][key] == one[key]
    assert one["floor_us"] == one["server_us"] + one["client_us"]
    assert one["budget_us"] == 1e6 / (0.28 * one["direct_rps"])
    text = md_path.read_text()
    assert "| aiohttp client alone, CPU µs/request |" in text
    assert "The floor is" in text
    assert "wrote" in proc.stdout


@pytest.mark.skipif(
    shutil.which("callgrind_control") is None,
    reason="valgrind is not on PATH (make test installs it)",
)
def test_instr_ab_counts_instructions_per_request(tmp_path: Path) -> None:
    src = str(ROOT / "src")
    proc = _run(
        "bench/overhead/instr_ab.py",
        "--seconds",
        "1",
        "--conc",
        "16",
        "--out",
        str(tmp_path),
        "--tag",
        "smoke",
        src,
    )
    [json_path] = tmp_path.glob("instr-*-smoke.json")
    result = json.loads(json_path.read_text())
    got = result["results"][src]
    assert got["c16_requests"] > 0
    assert 10_000 < got["c16"] < 100_000_000  # instructions per request: some, not absurd
    assert "| instructions/request, c=16 |" in proc.stdout.replace(" src |", "")
