"""The GPU sleep check (``bench/gpu/check_sleep.py``) and its stand-in (``sleepy_torch.py``),
as far as they run without CUDA: no GPU is lent to most sessions, and the check must run the
first time one is.

The stand-in's memory operations sit behind a small seam (``Memory``): ``TorchMemory`` on a GPU,
``BytesMemory`` (a bytearray "device") here. Everything above it, the vLLM sleep API over real
HTTP, the checksums, the stats, runs here as a real child process. The check's sizes, its
config (parsed by llmux's own ``parse_config`` and ``llmux check-config``) and its Prometheus
reading are checked directly, and ``check_sleep.py --no-gpu`` runs every step of the GPU check
against a real ``llmux serve`` with bytearray stand-ins (NVML and timing checks skipped).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from openai import OpenAI

from llmux.backends.process import free_port
from llmux.config import parse_config
from llmux.gpu import open_probe
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "bench" / "gpu"


def _load(name: str) -> ModuleType:
    # By path: bench/ is no package (as tests/test_soak.py loads bench/soak.py).
    spec = importlib.util.spec_from_file_location(f"llmux_bench_gpu_{name}", GPU / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check = _load("check_sleep")
sleepy = _load("sleepy_torch")

MIB = 1 << 20


# --------------------------------------------------------------------- without torch


@pytest.mark.parametrize("script", ["check_sleep.py", "sleepy_torch.py", "check_nvml.py"])
def test_scripts_answer_help_without_torch(script: str) -> None:
    # torch is made unimportable, so this holds on a machine that has it too.
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = [{str(GPU / script)!r}, '--help']; "
        f"runpy.run_path({str(GPU / script)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_the_standin_without_torch_says_so_with_its_own_status(tmp_path: Path) -> None:
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['sleepy_torch.py', '--prepare', '--weights-file', {str(tmp_path / 'w')!r}, "
        "'--gb', '0.001']; "
        f"runpy.run_path({str(GPU / 'sleepy_torch.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == sleepy.NO_CUDA_EXIT, proc.stderr
    assert "no torch with CUDA" in proc.stderr
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("free_gb", [13.5, 16.0, 23.0, 24.0, 40.0, 47.5, 79.2, 140.1])
def test_sizes_for_every_card_check_what_they_must(free_gb: float) -> None:
    sizes = check.Sizes.for_card(free_gb, host_available_gb=120.0)
    assert sizes is not None
    assert sizes.problems() == []
    assert sizes.free <= free_gb - 3.0 + 1e-3  # room for the hog's context and slack
    assert sizes.host_budget >= sizes.weights


def test_sizes_are_full_on_a_big_card_and_scale_down_on_a_small_one() -> None:
    big = check.Sizes.for_card(79.2, 120.0)
    assert big is not None
    assert (big.weights, big.cache, big.free, big.budget, big.scale) == (10.0, 2.0, 20.0, 19.0, 1.0)
    small = check.Sizes.for_card(16.0, 120.0)
    assert small is not None
    assert small.scale == pytest.approx(0.65)
    assert small.weights == pytest.approx(6.5)


def test_too_small_a_card_or_host_gets_no_sizes() -> None:
    assert check.Sizes.for_card(12.0, 120.0) is None
    assert check.Sizes.for_card(80.0, 10.0) is None  # no room to pin the level-1 copy
    limited = check.Sizes.for_card(80.0, 18.0)
    assert limited is not None
    assert limited.scale == pytest.approx(0.8)


def test_sizes_problems_name_what_would_make_the_check_moot() -> None:
    good = check.Sizes.for_card(80.0, 120.0)
    assert good is not None
    crowded = dataclasses.replace(good, budget=30.0)
    assert any("nothing would be evicted" in p for p in crowded.problems())
    roomy = dataclasses.replace(good, free=40.0)
    assert any("fit the card together" in p for p in roomy.problems())
    assert any("host budget" in p for p in dataclasses.replace(good, host_budget=1).problems())


def test_no_gpu_sizes_are_whole_mib_and_consistent() -> None:
    sizes = check.Sizes.no_gpu()
    assert sizes.problems() == []
    assert sleepy.nbytes_of(sizes.weights) == 8 * MIB
    assert sleepy.nbytes_of(sizes.cache) == 2 * MIB


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("gpu", [True, False])
def test_the_generated_config_parses_and_passes_check_config(tmp_path: Path, gpu: bool) -> None:
    sizes = check.Sizes.for_card(79.2, 120.0) if gpu else check.Sizes.no_gpu()
    assert sizes is not None
    path = tmp_path / "llmux.yaml"
    check.write_config(path, sizes, tmp_path, "torch" if gpu else "bytes", cold_extra=0.0)
    config = parse_config(path.read_text(), str(path))
    assert config.host.ram_gb == sizes.host_budget
    assert config.gpu.vram_gb == sizes.budget
    a, b = config.models["a"], config.models["b"]
    assert a.sleep is not None
    assert b.sleep is not None
    assert (a.sleep.level, a.sleep.api, a.sleep_host_gb) == (1, "vllm", sizes.weights)
    assert (b.sleep.level, b.sleep_host_gb) == (2, 0.0)
    assert a.sleep.residual_gb == sizes.residual_conf
    # Together they do not fit; one beside a sleeper does.
    assert a.vram_gb + b.vram_gb > sizes.budget
    assert a.vram_gb + b.sleep.residual_gb <= sizes.budget
    assert a.cmd is not None
    assert "--weights-file" in a.cmd
    assert a.cmd.endswith("--port ${PORT}")
    proc = subprocess.run(
        [sys.executable, "-m", "llmux", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- metrics

METRICS = """\
# HELP llmux_model_wake_seconds Time from wake sent to ready
# TYPE llmux_model_wake_seconds histogram
llmux_model_wake_seconds_bucket{le="0.5",model="a"} 1.0
llmux_model_wake_seconds_count{model="a"} 2.0
llmux_model_wake_seconds_sum{model="a"} 0.75
llmux_model_wake_seconds_count{model="b"} 1.0
llmux_model_wake_seconds_sum{model="b"} 2.5
llmux_model_wakes_total{model="a",result="success"} 2.0
llmux_model_wakes_total{model="a",result="failure"} 1.0
llmux_model_wakes_total{model="say \\"hi\\"",result="success"} 7.0
llmux_host_budget_bytes 1.1e+10
"""


def test_metric_reads_samples_by_name_and_labels() -> None:
    assert check.metric(METRICS, "llmux_model_wakes_total", model="a", result="success") == 2.0
    assert check.metric(METRICS, "llmux_model_wakes_total", model="a") == 3.0
    assert check.metric(METRICS, "llmux_model_wakes_total", model='say \\"hi\\"') == 7.0
    assert check.metric(METRICS, "llmux_host_budget_bytes") == 1.1e10
    assert check.metric(METRICS, "llmux_model_wakes_total", model="c") is None
    assert check.metric(METRICS, "llmux_model_wake_seconds", model="a") is None


def test_histogram_delta_is_the_mean_of_the_new_observations() -> None:
    after = METRICS.replace('_count{model="a"} 2.0', '_count{model="a"} 3.0').replace(
        '_sum{model="a"} 0.75', '_sum{model="a"} 1.0'
    )
    assert check.histogram_delta(METRICS, after, "llmux_model_wake_seconds", "a") == (0.25, 1)
    assert check.histogram_delta(METRICS, after, "llmux_model_wake_seconds", "b") == (None, 0)
    assert check.histogram_delta("", METRICS, "llmux_model_wake_seconds", "b") == (2.5, 1)


def test_checksum_of_reads_the_standins_answer() -> None:
    answer = sleepy.chat_answer("a", "a pid=12 checksum=00ff12ab")
    assert check.checksum_of(answer) == "00ff12ab"
    assert check.checksum_of({"error": {"message": "x"}}) is None


# ---------------------------------------------------- the stand-in, bytes in-process


def _engine(tmp_path: Path, weights_file: Path | None) -> Any:
    return sleepy.Engine(
        sleepy.BytesMemory(),
        name="e",
        weights_bytes=3 * MIB,
        cache_bytes=MIB,
        seed=5,
        weights_file=weights_file,
        stats_path=tmp_path / "e.json",
    )


def test_engine_level_one_keeps_the_weights_on_the_host(tmp_path: Path) -> None:
    engine = _engine(tmp_path, None)
    engine.cold_start(import_s=0.0, init_s=0.0, extra_s=0.0)
    before = engine.chat()
    assert engine.device_bytes() == 4 * MIB
    engine.sleep(1)
    assert engine.device_bytes() == 0
    assert engine.host is not None
    with pytest.raises(sleepy.Asleep):
        engine.chat()
    engine.wake([])
    assert engine.device_bytes() == 4 * MIB
    assert engine.host is None
    assert engine.chat() == before
    stats = json.loads((tmp_path / "e.json").read_text())
    assert stats["counts"]["refused_asleep"] == 1
    assert [c["op"] for c in stats["calls"]] == ["sleep", "wake_up"]
    assert stats["calls"][1]["copied_back"] is True


def test_engine_level_two_needs_reload_weights_and_regenerates_without_a_file(
    tmp_path: Path,
) -> None:
    engine = _engine(tmp_path, None)
    engine.cold_start(import_s=0.0, init_s=0.0, extra_s=0.0)
    before = engine.chat()
    engine.sleep(2)
    assert engine.host is None
    with pytest.raises(sleepy.Asleep):
        engine.reload_weights()  # the weights are not even allocated yet
    engine.wake([])
    with pytest.raises(sleepy.NoWeights):
        engine.chat()
    assert engine.weights == bytearray(3 * MIB)  # woken empty: not the old bytes
    engine.reload_weights()
    assert engine.chat() == before
    assert engine.stats["counts"]["refused_no_weights"] == 1


def test_prepare_writes_the_file_a_cold_start_then_reads(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    written = sleepy.BytesMemory().write_pattern(path, 3 * MIB, 5)
    assert path.stat().st_size == 3 * MIB
    engine = _engine(tmp_path, path)
    engine.cold_start(import_s=0.0, init_s=0.0, extra_s=0.0)
    assert engine.stats["cold"]["weights_from"] == "file"
    assert engine.stats["checksum_at_start"] == written
    generated = _engine(tmp_path, None)
    generated.cold_start(import_s=0.0, init_s=0.0, extra_s=0.0)
    assert generated.stats["checksum_at_start"] == written  # one pattern, file or not
    other = sleepy.BytesMemory().write_pattern(tmp_path / "x.bin", 3 * MIB, 6)
    assert other != written


def test_a_truncated_weights_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * MIB)
    engine = _engine(tmp_path, path)
    with pytest.raises(ValueError, match="not"):
        engine.cold_start(import_s=0.0, init_s=0.0, extra_s=0.0)


# ------------------------------------------------- the stand-in, a real child process


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """A bytes stand-in serving on a free port: (base URL, its stats file, the file's checksum)."""
    weights = tmp_path / "w.bin"
    base = [sys.executable, str(GPU / "sleepy_torch.py"), "--backend", "bytes"]
    args = ["--gb", str(4 * MIB / 1e9), "--seed", "9", "--weights-file", str(weights)]
    prep = subprocess.run([*base, *args, "--prepare"], capture_output=True, text=True, timeout=60)
    assert prep.returncode == 0, prep.stderr
    checksum = json.loads(prep.stdout)["checksum"]
    port = free_port()
    stats = tmp_path / "s.json"
    serve = ["--port", str(port), "--name", "s", "--cache-gb", "0.001", "--stats", str(stats)]
    proc = subprocess.Popen(
        [*base, *args, *serve],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "the stand-in exited"
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 30, "the stand-in to serve")
        yield url, stats, checksum
    finally:
        proc.terminate()
        proc.wait(10)


def _content(client: OpenAI) -> str:
    answer = client.chat.completions.create(model="s", messages=[{"role": "user", "content": "x"}])
    return str(answer.choices[0].message.content)


def test_standin_serves_vllms_sleep_api_over_http(standin: tuple[str, Path, str]) -> None:
    url, stats_path, checksum = standin
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    http = httpx.Client(base_url=url, timeout=30)
    try:
        first = _content(client)
        assert f"checksum={checksum}" in first  # the cold start read the prepared file
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}

        # Level 1: the weights survive on the host.
        assert http.post("/sleep", params={"level": "1"}).status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        refused = http.post("/v1/chat/completions", json={"model": "s"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_asleep"
        assert http.post("/wake_up").status_code == 200
        assert _content(client) == first

        # A level in the body is not read (vLLM reads the query string): this is level 1.
        assert http.post("/sleep", json={"level": 2}).status_code == 200
        assert http.post("/wake_up").status_code == 200
        assert _content(client) == first

        # Level 2: the weights are dropped; wake_up alone does not bring them back.
        assert http.post("/sleep", params={"level": "2"}).status_code == 200
        assert http.post("/wake_up", params={"tags": "weights"}).status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}  # the cache sleeps on
        assert http.post("/wake_up", params={"tags": "kv_cache"}).status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
        no_weights = http.post("/v1/chat/completions", json={"model": "s"})
        assert no_weights.status_code == 500
        assert no_weights.json()["error"]["code"] == "weights_not_loaded"
        reload = http.post("/collective_rpc", json={"method": "reload_weights"})
        assert reload.status_code == 200
        assert reload.json() == {"results": [None]}
        assert http.post("/reset_prefix_cache").status_code == 200
        assert _content(client) == first

        assert http.post("/sleep", params={"level": "3"}).status_code == 400
        assert http.post("/collective_rpc", json={"method": "rm -rf"}).status_code == 400
        assert http.post("/nope").status_code == 404

        stats = http.get("/_stats").json()
        assert stats == json.loads(stats_path.read_text())
        assert stats["counts"] == {
            "sleep": 3,
            "wake_up": 4,
            "reload_weights": 1,
            "reset_prefix_cache": 1,
            "is_sleeping": 4,
            "chat": 6,
            "refused_asleep": 1,
            "refused_no_weights": 1,
        }
        assert [c.get("level") for c in stats["calls"] if c["op"] == "sleep"] == [1, 1, 2]
        assert stats["cold"]["weights_from"] == "file"
        assert stats["device_bytes"] == 4 * MIB + MIB
    finally:
        http.close()
        client.close()


# --------------------------------------------------------------- the whole check, no GPU


def test_check_sleep_without_nvml_exits_2_and_says_why(tmp_path: Path) -> None:
    if open_probe() is not None:
        pytest.skip("NVML works here: the real check is a bench run, not a test")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(GPU / "check_sleep.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot check here: no NVML" in proc.stdout
    result = json.loads((out / "sleep-check.json").read_text())
    assert (result["result"], result["checks"]) == ("SKIP", [])
    assert result["cannot_check"].startswith("no NVML")


@pytest.mark.slow
def test_check_sleep_no_gpu_runs_every_step_against_a_real_llmux(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(GPU / "check_sleep.py"), "--no-gpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT / "src")},
    )
    result = json.loads((out / "sleep-check.json").read_text())
    failed = [c for c in result["checks"] if c["ok"] is False]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert result["result"] == "PASS"
    assert failed == []
    skipped = {c["name"] for c in result["checks"] if c["ok"] is None}
    assert skipped == {
        "llmux learned a's residual from NVML",
        "a's level-1 wake is much faster than its cold start",
        "b's level-2 wake is slower than a's level 1 and faster than b's cold start",
    }
    assert len(result["checks"]) - len(skipped) >= 14
    assert (out / "sleep-check.txt").read_text().startswith("     sizes")
    assert (out / "llmux-sleep.log").exists()
