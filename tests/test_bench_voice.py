"""A smoke run of the voice bench (issue 13, ``bench/voice.py``): it runs end to end on the built-in
default stack with tiny repeats and writes well-formed results, so the script cannot rot. The
numbers are not checked: a test is not a benchmark (bench/results/ holds the measurements).

The baselines (wyoming-piper, wyoming-faster-whisper) are not llmux dependencies: when they are
installed the run includes them, else it must say that it skipped them and why."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine_children import require_engine

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.engines]


def test_voice_bench_quick_run_writes_well_formed_results(tmp_path: Path) -> None:
    require_engine("faster-whisper", "whisper-tiny.en", "faster_whisper")
    require_engine("piper", "en_US-joe-medium", "piper")
    require_engine("llama-cpp", "smollm2-135m", "llama_cpp")
    proc = subprocess.run(
        [
            sys.executable,
            "bench/voice.py",
            "--repeats",
            "1",
            "--cold-repeats",
            "1",
            "--fast-audio",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [json_path] = tmp_path.glob("voice-*.json")
    [md_path] = tmp_path.glob("voice-*.md")
    result = json.loads(json_path.read_text())
    assert "bench/voice.py --repeats 1" in result["command"]

    baselines = {
        "wyoming-piper": "wyoming_piper",
        "wyoming-faster-whisper": "wyoming_faster_whisper",
    }
    installed = {name for name, module in baselines.items() if importlib.util.find_spec(module)}
    assert set(result["baselines_skipped"]) == set(baselines) - installed
    for why in result["baselines_skipped"].values():
        assert "pip install" in why

    samples = result["samples"]
    assert set(samples["tts_first_s"]) == {"llmux"} | ({"wyoming-piper"} & installed)
    assert set(samples["asr_after_stop_s"]) == {"llmux"} | ({"wyoming-faster-whisper"} & installed)
    assert len(samples["tts_cold_first_s"]) == 1
    for side in samples["turn"].values():
        assert len(side["total_s"]) == 1
        assert all(v > 0 for v in side["total_s"])
    # The sentence was heard right by every ASR, and both turns got the same (deterministic) answer.
    for texts in result["transcripts"].values():
        assert [t.strip().lower() for t in texts] == ["please turn on the kitchen lights."]
    [wy_texts] = result["turn_texts"]["wyoming+ollama"]
    assert result["turn_texts"]["openai"] == [wy_texts]
    assert result["summary"]["goal_turn_added_ms"]["limit"] == 30.0
    assert any(
        line.startswith("llmux_requests_total") for line in result["wyoming_requests_metric"]
    )
    text = md_path.read_text()
    assert "## 2. A voice turn" in text
    assert "| total |" in text
