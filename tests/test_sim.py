"""The simulator (llmux simulate): known answers on small synthetic workloads, and a smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from llmux.cli import main as cli_main
from llmux.scheduling.core import SchedulerCore
from llmux.sim.engine import Simulator
from llmux.sim.experiments import parse_variant
from llmux.sim.metrics import percentile, summarize
from llmux.sim.policies import POLICIES, Baseline
from llmux.sim.run import resolve_policy, run_policy, run_scenario
from llmux.sim.scenario import Scenario, build_scenario, load_scenario, parse_override
from llmux.sim.workload import SimRequest, TraceRow, Workload, build_workload

ROOT = Path(__file__).resolve().parent.parent
ALL = list(POLICIES)


def scenario(models: dict[str, dict[str, Any]], **extra: Any) -> Scenario:
    data: dict[str, Any] = {
        "name": "test",
        "gpu": {"vram_gb": 16, "reserve_gb": 0.5},
        "load_gbps": 1.0,
        "stop_s": 0.0,
        "models": models,
        "voice": None,
    }
    data.update(extra)
    return build_scenario(data)


def llm(gb: float, **kw: Any) -> dict[str, Any]:
    return {"type": "llm", "vram_gb": gb, "init_s": 0.0, "trace": "unused.csv", **kw}


def fixed(kind: str, gb: float, fb: float = 0.1, svc: float = 0.1) -> dict[str, Any]:
    return {"type": kind, "vram_gb": gb, "init_s": 0.0, "first_byte_s": fb, "service_s": svc}


def req(model: str, t: float, svc: float = 1.0, fb: float = 0.0) -> SimRequest:
    return SimRequest(-1, model, t, fb, svc)


def run(sc: Scenario, reqs: list[SimRequest], policy: str) -> Simulator:
    sim = Simulator(sc, Workload.of(reqs), resolve_policy(policy))
    sim.run()
    return sim


@pytest.mark.parametrize("policy", [p for p in ALL if p != "llama-swap"])
def test_two_models_that_fit_are_loaded_once_each(policy: str) -> None:
    sc = scenario({"a": llm(4), "b": llm(4)})
    reqs = [req(m, t) for t in range(10) for m in ("a", "b")]
    r = summarize(sc, run(sc, reqs, policy).rec)
    assert r["loads"] == 2
    assert r["swaps"] == 0
    assert r["failed"] == 0
    assert r["tiers"]["llm"]["served"] == 20


@pytest.mark.parametrize("policy", ["llmux", "strict", "lru", "oracle", "llama-swap", "ollama"])
def test_alternating_models_that_do_not_fit_swap_every_time(policy: str) -> None:
    sc = scenario({"a": llm(10), "b": llm(10)})
    n = 8
    reqs = [req("ab"[i % 2], 20.0 * i) for i in range(n)]
    r = summarize(sc, run(sc, reqs, policy).rec)
    assert r["loads"] == n
    assert r["swaps"] == n - 2
    assert r["gb_loaded"] == pytest.approx(10.0 * n)
    assert r["failed"] == 0
    # Each request waits for exactly its model's load (10 GB at 1 GB/s), nothing else.
    assert r["tiers"]["llm"]["p50_s"] == pytest.approx(10.0)


def test_floor_loads_each_model_once() -> None:
    sc = scenario({"a": llm(10), "b": llm(10), "s": fixed("asr", 2)})
    reqs = [req("ab"[i % 2], 5.0 * i) for i in range(10)] + [req("s", 3.0 * i) for i in range(5)]
    r = summarize(sc, run(sc, reqs, "floor").rec)
    assert r["loads_by_model"] == {"a": 1, "b": 1, "s": 1}
    assert r["gb_loaded"] == pytest.approx(22.0)


def test_asr_is_never_evicted_by_an_llm_request_under_llmux() -> None:
    sc = scenario({"a": llm(8), "b": llm(6), "s": fixed("asr", 2)})
    reqs = [req("s", 0.0)] + [req("ab"[i % 2], 1.0 + 7.0 * i, svc=2.0) for i in range(12)]
    sim = run(sc, reqs, "llmux")
    asr_loads = [ld for ld in sim.rec.loads if ld.model_id == "s"]
    assert len(asr_loads) == 1
    assert asr_loads[0].stopped_at is None
    # The tier-blind oracle does evict it (its next use is never).
    sim = run(sc, reqs, "oracle")
    assert any(ld.model_id == "s" and ld.stopped_at is not None for ld in sim.rec.loads)


def test_cpu_fallback_runs_on_the_cpu_instead_of_evicting_and_gpu_only_evicts() -> None:
    tts = {**fixed("tts", 2, fb=0.2, svc=0.5), "cpu_fallback": True}
    sc = scenario({"a": llm(8), "b": llm(6), "t": tts}, cpu={"slowdown": 3.0})
    # a and b fill the 15.5 GB budget with 1.5 GB to spare; the 2 GB TTS model would have to
    # evict one of them.
    reqs = [req("a", 0.0, svc=100.0), req("b", 0.0, svc=100.0), req("t", 20.0, 0.5, 0.2)]
    sim = run(sc, reqs, "llmux")
    r = summarize(sc, sim.rec)
    assert r["loads_by_model"] == {"a": 1, "b": 1, "t": 1}
    assert all(ld.stopped_at is None for ld in sim.rec.loads)  # nothing was evicted
    # On the CPU: load (2 GB at 1 GB/s), then the first byte 3x slower.
    assert r["tiers"]["tts"]["p50_s"] == pytest.approx(2.0 + 0.6)
    sim = run(sc, reqs, "llmux-gpu-only")
    assert any(ld.model_id in ("a", "b") and ld.stopped_at is not None for ld in sim.rec.loads)


def test_cold_request_ttfb_is_load_plus_first_byte() -> None:
    sc = scenario({"a": llm(3), "s": fixed("asr", 2, fb=0.3, svc=0.3)})
    reqs = [
        req("a", 0.0, svc=2.0, fb=0.25),
        req("a", 10.0, svc=2.0, fb=0.25),
        req("s", 1.0, svc=0.3, fb=0.3),
    ]
    r = summarize(sc, run(sc, reqs, "llmux").rec)
    llm_t = r["tiers"]["llm"]
    # Cold: 3 GB / 1 GB/s + 0.25 s prefill; warm: 0.25 s.
    assert llm_t["max_s"] == pytest.approx(3.25)
    assert llm_t["p50_s"] == pytest.approx((3.25 + 0.25) / 2)
    assert r["tiers"]["asr"]["max_s"] == pytest.approx(2.3)
    assert r["tiers"]["asr"]["within_slo"] == 0.0


def test_seed_blocks_requests_for_a_ready_model_behind_a_load() -> None:
    sc = scenario({"a": llm(4), "b": llm(4)})
    reqs = [req("a", 0.0, svc=100.0), req("b", 10.0), req("a", 11.0)]
    seed = run(sc, reqs, "seed")
    llmux = run(sc, reqs, "llmux")
    # The second request for the ready model 'a' waits for b's load under the seed's lock.
    assert seed.rec.granted[2] == pytest.approx(14.0)
    assert llmux.rec.granted[2] == pytest.approx(11.0)


def test_ollama_keeps_at_most_max_loaded() -> None:
    sc = scenario({m: llm(1) for m in "abcd"}, ollama={"max_loaded": 3, "keep_alive_s": 300})
    reqs = [req(m, 10.0 * i) for i, m in enumerate("abcda")]
    sim = run(sc, reqs, "ollama")
    r = summarize(sc, sim.rec)
    assert r["loads"] == 5
    # 'a' was the idle runner first by name when 'd' came: evicted, then loaded again.
    assert r["loads_by_model"]["a"] == 2


def test_ollama_keep_alive_unloads_idle_runner() -> None:
    sc = scenario({"a": llm(1)}, ollama={"keep_alive_s": 30})
    sim = run(sc, [req("a", 0.0), req("a", 100.0)], "ollama")
    r = summarize(sc, sim.rec)
    assert r["loads"] == 2
    assert r["expiries"] == 2  # both loads end by keep-alive (the last one after the run)
    assert r["evictions"] == 0


def test_oracle_evicts_the_model_used_furthest_in_the_future() -> None:
    sc = scenario({"a": llm(5), "b": llm(5), "c": llm(5), "d": llm(5)})
    # a, b, c fill 15 GB; d needs one out; b is needed next, a much later, c never again.
    reqs = [req("a", 0), req("b", 1), req("c", 2), req("d", 20), req("b", 40), req("a", 60)]
    sim = run(sc, reqs, "oracle")
    stopped = [ld.model_id for ld in sim.rec.loads if ld.stopped_at is not None]
    assert stopped[0] == "c"


def test_client_timeout_fails_requests_that_wait_too_long() -> None:
    sc = scenario({"a": llm(10), "b": llm(10)}, client_timeout_s=15.0)
    reqs = [req("a", 0.0, svc=100.0), req("b", 1.0)]
    r = summarize(sc, run(sc, reqs, "llmux").rec)
    assert r["failed"] == 1
    assert r["failed_by_code"] == {"client_timeout": 1}


def test_workload_from_trace_rows_with_voice_overlay_is_deterministic() -> None:
    sc = build_scenario(
        {
            "name": "t",
            "seed": 7,
            "models": {
                "chat": llm(8),
                "asr": fixed("asr", 2, 0.3, 0.3),
                "tts": fixed("tts", 1, 0.2, 0.5),
            },
            "voice": {"share": 0.5},
        }
    )
    rows = {"chat": [TraceRow(1000.0 + i, 5000, 50 * (i % 3)) for i in range(40)]}
    w1 = build_workload(sc, rows)
    w2 = build_workload(sc, rows)
    assert [(r.model_id, r.arrival) for r in w1.requests] == [
        (r.model_id, r.arrival) for r in w2.requests
    ]
    asr = [r for r in w1.requests if r.model_id == "asr"]
    voiced = [r for r in w1.requests if r.follow_up == "tts"]
    assert 5 < len(asr) == len(voiced) < 35
    first = w1.requests[0]
    assert first.arrival == 0.0  # the earliest (an ASR 0.8 s ahead, or the first chat) is t=0
    chat = [r for r in w1.requests if r.model_id == "chat"]
    assert chat[0].first_byte_s == pytest.approx(1.0)  # 5000 tokens at 5000 tok/s
    assert chat[1].service_s == pytest.approx(1.0 + 50 / 50)
    other = build_workload(build_scenario({**sc.model_dump(), "seed": 8}), rows)
    assert [r.arrival for r in other.requests if r.model_id == "asr"] != [r.arrival for r in asr]


def test_same_seed_same_results() -> None:
    sc = load_scenario(
        ROOT / "bench/scenarios/default.yaml", overrides=["trace.duration_s=240", "seed=3"]
    )
    w = build_workload(sc)
    a = run_policy(sc, w, "llmux")
    b = run_policy(sc, build_workload(sc), "llmux")
    a.pop("runtime_s")
    b.pop("runtime_s")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_overrides_and_variants() -> None:
    assert parse_override("gpu.vram_gb=24") == ("gpu.vram_gb", 24)
    assert parse_override("voice=null") == ("voice", None)
    sc = load_scenario(
        ROOT / "bench/scenarios/default.yaml",
        overrides=["gpu.vram_gb=24", "models.tts.device=cpu"],
    )
    assert sc.budget_gb == pytest.approx(23.5)
    assert sc.gpu_gb("tts") == 0.0
    assert sc.llmux_config().models["tts"].vram_gb == 0.0
    t = parse_variant("llmux+cost+minres_tts=3+passover=20")
    assert t is not None
    assert t.cost
    assert t.minres == {"tts": 3.0}
    assert t.passover == 20.0
    assert parse_variant("llmux+nonsense") is None
    with pytest.raises(ValueError, match="unknown policy"):
        resolve_policy("nope")


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_short_default_scenario_every_policy_serves() -> None:
    sc = load_scenario(ROOT / "bench/scenarios/default.yaml", overrides=["trace.duration_s=300"])
    result = run_scenario(sc, [*ALL, "llmux+cost"])
    for name, r in result["policies"].items():
        served = sum(t["served"] for t in r["tiers"].values())
        assert served + r["failed"] == r["requests"], name
        assert r["unserved"] == 0, name


def test_cli_smoke(tmp_path: Path) -> None:
    """`llmux simulate` runs and writes well-formed JSON, markdown and PNGs (not the numbers)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    code = cli_main(
        [
            "simulate",
            "--scenario",
            str(ROOT / "bench/scenarios/default.yaml"),
            "--set",
            "trace.duration_s=120",
            "--set",
            "sweeps.gpu.values=[12, 24]",
            "--policies",
            "llmux",
            "lru",
            "--sweep",
            "gpu",
            "--out",
            str(out),
            "--name",
            "smoke",
        ]
    )
    assert code == 0
    data = json.loads((out / "sim-smoke.json").read_text())
    assert set(data["policies"]) == {"llmux", "lru"}
    for r in data["policies"].values():
        assert {"asr", "llm", "tts"} <= set(r["tiers"])
        assert 0.0 <= r["tiers"]["llm"]["within_slo"] <= 1.0
        assert r["gb_loaded"] >= 0
    sweep = json.loads((out / "sim-smoke-gpu.json").read_text())
    assert [p["value"] for p in sweep["points"]] == [12, 24]
    md = (out / "sim-smoke.md").read_text()
    assert "| `llmux` |" in md
    assert "Sweep `gpu`" in md
    for png in ("sim-smoke.png", "sim-smoke-gpu.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scen = str(ROOT / "bench/scenarios/default.yaml")
    assert cli_main(["simulate", "--scenario", str(tmp_path / "none.yaml")]) == 2
    assert cli_main(["simulate", "--scenario", scen, "--set", "gpu.vram_gb=-1"]) == 2
    assert cli_main(["simulate", "--scenario", scen, "--policies", "nope", "--out", str(tmp_path)])
    assert "unknown policy" in capsys.readouterr().err


@pytest.mark.parametrize("policy", [p for p in ALL if p != "floor"])
def test_invariants_hold_after_every_event(policy: str) -> None:
    """The core's own invariants (llmux), and the budget for every baseline, on a busy stretch."""
    sc = load_scenario(
        ROOT / "bench/scenarios/default.yaml",
        overrides=["trace.start_s=250", "trace.duration_s=150"],
    )
    sim = Simulator(sc, build_workload(sc), resolve_policy(policy))
    inner = sim.policy
    checks = 0

    class Checked:
        def handle(self, event: Any) -> None:
            nonlocal checks
            inner.handle(event)
            checks += 1
            if isinstance(inner, SchedulerCore):
                inner.check_invariants()
            else:
                assert isinstance(inner, Baseline)
                assert inner.reserved() <= sc.budget_gb + 1e-6

    sim.policy = Checked()
    sim.run()
    assert checks > 1000
