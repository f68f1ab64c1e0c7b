"""The simulator (llmux simulate): known answers on small synthetic workloads, and a smoke run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmux.cli import main as cli_main
from llmux.errors import ConfigError
from llmux.scheduling.core import SchedulerCore
from llmux.scheduling.events import Acquire
from llmux.sim.engine import SimEffects, Simulator
from llmux.sim.experiments import parse_variant
from llmux.sim.goals import check_cell, goals_table
from llmux.sim.metrics import percentile, summarize
from llmux.sim.policies import POLICIES, Baseline, LlamaSwapGroups
from llmux.sim.run import resolve_policy, run_policy, run_scenario
from llmux.sim.scenario import (
    GoalsSpec,
    Scenario,
    build_scenario,
    load_scenario,
    parse_override,
    with_overrides,
)
from llmux.sim.workload import SimRequest, TraceRow, Workload, build_workload, read_trace

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


# ---------------------------------------------------------------------- issue 12


def test_mooncake_trace_is_read_and_put_on_the_azure_origin(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:10.0000000,100,10\n"
        "2023-11-16 18:00:12.5000000,200,20\n",
        encoding="utf-8",
    )
    (tmp_path / "m.jsonl").write_text(
        '{"timestamp": 3000, "input_length": 7000, "output_length": 70, "hash_ids": [1, 2]}\n'
        '{"timestamp": 0, "input_length": 5000, "output_length": 50, "hash_ids": [0]}\n'
        "\n",
        encoding="utf-8",
    )
    rows = read_trace(tmp_path / "m.jsonl")
    assert rows == [TraceRow(0.0, 5000, 50), TraceRow(3.0, 7000, 70)]
    sc = scenario(
        {"a": llm(4, trace="a.csv"), "m": llm(4, trace="m.jsonl")},
        trace={"dir": str(tmp_path)},
    )
    w = build_workload(sc)
    # The Mooncake trace starts with the Azure one (its times are relative): t = 0, 2.5, 0, 3.
    got = sorted((r.arrival, r.model_id, r.first_byte_s, r.service_s) for r in w.requests)
    assert [(t, m) for t, m, _, _ in got] == [(0.0, "a"), (0.0, "m"), (2.5, "a"), (3.0, "m")]
    # first byte = context / 5000 tok/s; held for that + generated / 50 tok/s
    assert [x for _, _, fb, sv in got for x in (fb, sv)] == pytest.approx(
        [0.02, 0.02 + 0.2, 1.0, 2.0, 0.04, 0.04 + 0.4, 1.4, 2.8]
    )


def test_load_times_sleep_times_and_the_llmux_config() -> None:
    sc = scenario(
        {
            "a": llm(8.4, init_s=1.0, sleep={"level": 1}),
            "b": llm(4, load_s=7.0, sleep={"level": 2, "host_gb": 3, "wake_s": 0.1}),
            "c": llm(2, init_s=1.0),
            "s": fixed("asr", 2),
        },
        load_s={"llm": 25},
        host={"ram_gb": 12},
    )
    assert sc.load_time("a") == 25.0  # the type's override
    assert sc.load_time("b") == 7.0  # the model's own wins
    assert sc.load_time("s") == 2.0  # 2 GB at 1 GB/s + 0
    # vLLM's published level-1 wake of Phi-3-vision (8.4 GB): 0.82 s; its sleep 0.42 s.
    assert sc.wake_time("a") == pytest.approx(0.825, abs=0.01)
    assert sc.sleep_time("a") == pytest.approx(0.42, abs=0.01)
    assert sc.wake_time("b") == 0.1
    assert sc.sleep_time("b") == pytest.approx(0.05 + 0.049 * 3)  # level 2, 3 GB of weights
    assert (sc.host_gb("a"), sc.host_gb("b"), sc.host_gb("c")) == (8.4, 0.0, 0.0)
    cfg = sc.llmux_config()
    assert cfg.host.ram_gb == 12
    sa, sb = cfg.models["a"].sleep, cfg.models["b"].sleep
    assert sa is not None
    assert sb is not None
    assert (sa.level, sa.residual_gb, sa.api) == (1, 0.5, "vllm")
    assert cfg.models["a"].sleep_host_gb == 8.4
    assert (sb.level, cfg.models["b"].sleep_host_gb) == (2, 0.0)
    assert cfg.models["c"].sleep is None
    assert all(m.sleep is None for m in sc.llmux_config(sleep=False).models.values())
    off = with_overrides(sc, [("llmux.sleep", False)])
    assert all(m.sleep is None for m in off.llmux_config().models.values())
    with pytest.raises(ConfigError, match="cpu_fallback"):
        scenario({"a": llm(4, sleep={}, cpu_fallback=True)})


class _Sleeper:
    """A stand-in policy that puts a model to sleep on its first request and wakes it on the
    second, recording when each event reached it: SimEffects alone, whatever the core does."""

    def __init__(self, effects: SimEffects, clock: Callable[[], float]) -> None:
        self.effects = effects
        self.clock = clock
        self.seen: list[tuple[str, float]] = []

    def handle(self, event: Any) -> None:
        self.seen.append((type(event).__name__, self.clock()))
        if isinstance(event, Acquire):
            if event.rid == 0:
                self.effects.suspend(event.model_id, 1, 1)
            else:
                self.effects.wake(event.model_id, 1, 1)


def test_sim_effects_sleep_and_wake_on_the_virtual_clock() -> None:
    sc = scenario({"a": llm(6, sleep={"level": 1, "sleep_s": 0.25, "wake_s": 0.5})})

    def factory(ctx: Any, effects: SimEffects, clock: Callable[[], float]) -> _Sleeper:
        return _Sleeper(effects, clock)

    sim = Simulator(sc, Workload.of([req("a", 1.0), req("a", 5.0)]), factory)
    sim.run()
    assert isinstance(sim.policy, _Sleeper)
    assert [e for e in sim.policy.seen if e[0] in ("SleepFinished", "WakeFinished")] == [
        ("SleepFinished", 1.25),
        ("WakeFinished", 5.5),
    ]
    r = summarize(sc, sim.rec)
    assert (r["sleeps"], r["wakes"], r["gb_slept"], r["gb_woken"]) == (1, 1, 6.0, 6.0)
    assert r["wake_s"] == pytest.approx(0.5)
    assert r["loads"] == 0  # a wake is not a load


def test_llmux_sleeps_evicted_models_and_wakes_them() -> None:
    """Needs the core's sleep (DESIGN rules 11-13, the lead's core.py): two LLMs that do not
    fit together, each able to sleep; after one cold load each, they take turns by sleep and
    wake. With too little host memory they stop instead, and every turn is a cold load."""
    sl = {"level": 1, "sleep_s": 0.25, "wake_s": 0.5}
    sc = scenario({"a": llm(10, sleep=sl), "b": llm(10, sleep=sl)})
    reqs = [req("a", 0.0), req("b", 20.0), req("a", 40.0), req("b", 60.0)]
    sim = run(sc, reqs, "llmux")
    r = summarize(sc, sim.rec)
    assert r["loads_by_model"] == {"a": 1, "b": 1}
    assert (r["sleeps"], r["wakes"], r["gb_woken"]) == (3, 2, 20.0)
    assert r["failed"] == 0
    # Cold: a 10 s load; b waits for a to fall asleep (0.25 s), then loads; then each turn is
    # the other's sleep and its own wake: 0.25 + 0.5 s.
    assert [sim.rec.granted[i] - reqs[i].arrival for i in range(4)] == pytest.approx(
        [10.0, 10.25, 0.75, 0.75]
    )
    # With 5 GB of host memory neither model's 10 GB of weights fits: every eviction stops.
    small = with_overrides(sc, [("host.ram_gb", 5)])
    r = summarize(small, run(small, reqs, "llmux").rec)
    assert (r["loads"], r["sleeps"], r["wakes"]) == (4, 0, 0)
    # Without sleep (llmux-no-sleep): the same four cold loads.
    r = summarize(sc, run(sc, reqs, "llmux-no-sleep").rec)
    assert (r["loads"], r["sleeps"]) == (4, 0)


def test_llama_swap_groups_eviction_table() -> None:
    sc = scenario(
        {"a": llm(1), "b": llm(1), "c": llm(1), "d": llm(1), "e": llm(1)},
        llama_swap={
            "groups": {
                "g1": {"members": ["a", "b"], "swap": True, "exclusive": True},
                "g2": {"members": ["c"], "swap": False, "exclusive": False, "persistent": True},
                "g3": {"members": ["e"], "swap": False, "exclusive": False},
            }
        },
    )
    sim = Simulator(sc, Workload.of([]), resolve_policy("llama-swap-groups"))
    p = sim.policy
    assert isinstance(p, LlamaSwapGroups)
    assert p.group_of["d"] == "(default)"  # no group: llama-swap's default group
    everyone = ["a", "b", "c", "d", "e"]
    # a: its sibling b (swap), and every other group but the persistent g2 (exclusive).
    assert p.eviction_for("a", everyone) == ["b", "d", "e"]
    # c: g2 does not swap and is not exclusive: nothing.
    assert p.eviction_for("c", everyone) == []
    # d: the default group is exclusive; e is not persistent, c is.
    assert p.eviction_for("d", everyone) == ["a", "b", "e"]
    assert p.eviction_for("e", everyone) == []
    with pytest.raises(ConfigError, match="already in group"):
        scenario(
            {"a": llm(1)},
            llama_swap={"groups": {"x": {"members": ["a"]}, "y": {"members": ["a"]}}},
        )


def test_llama_swap_groups_voice_stack_on_a_small_workload() -> None:
    """The voice group loads on demand and is never stopped by the LLMs; an LLM swap waits for
    the current LLM to have nothing in flight, while new requests for that LLM are still
    served at once (llama-swap's FIFO fast path)."""
    sc = scenario({"a": llm(4), "b": llm(4), "s": fixed("asr", 2, 0.3, 0.3)})
    reqs = [
        req("a", 0.0, svc=10.0),  # 0: a loads 0-4, served 4-14
        req("s", 1.0, 0.3, 0.3),  # 1: ASR loads 1-3 beside it
        req("b", 5.0, svc=1.0),  # 2: would stop a, which is busy: queued
        req("a", 6.0, svc=2.0),  # 3: a is ready and nothing to stop: served at once
        req("a", 15.0, svc=1.0),  # 4: b's swap (stopping a) is under way: queued
        req("s", 20.0, 0.3, 0.3),  # 5: ASR still there, untouched by the swaps
    ]
    sim = run(sc, reqs, "llama-swap-groups")
    granted = [sim.rec.granted[i] for i in range(len(reqs))]
    # b starts when a's last request ends (14) and loads 4 s; a comes back when b's one
    # request has ended (19) and loads 4 s.
    assert granted == pytest.approx([4.0, 3.0, 18.0, 6.0, 23.0, 20.0])
    loads = [(ld.model_id, ld.start, ld.stopped_at) for ld in sim.rec.loads]
    assert loads == [("a", 0.0, 14.0), ("s", 1.0, None), ("b", 14.0, 19.0), ("a", 19.0, None)]


def test_llama_swap_groups_concurrency_limit_and_out_of_memory() -> None:
    sc = scenario({"a": llm(4), "b": llm(4)}, llama_swap={"concurrency_limit": 2})
    r = summarize(
        sc, run(sc, [req("a", 0.0), req("a", 0.0), req("a", 0.1)], "llama-swap-groups").rec
    )
    assert r["failed_by_code"] == {"queue_full": 1}
    # A group layout whose members do not fit together: the start fails (no memory check).
    big = scenario(
        {"a": llm(10), "b": llm(10)},
        llama_swap={"groups": {"all": {"members": ["a", "b"], "swap": False}}},
    )
    sim = run(big, [req("a", 0.0, svc=50.0), req("b", 1.0)], "llama-swap-groups")
    assert sim.rec.rejected == {1: "model_load_failed"}


def _cell(asr: float, llm_: float, tts: float, failed: int = 0) -> dict[str, Any]:
    def tier(v: float) -> dict[str, Any]:
        return {"requests": 100, "within_slo": v}

    return {"tiers": {"asr": tier(asr), "llm": tier(llm_), "tts": tier(tts)}, "failed": failed}


def test_goals_check_on_hand_made_numbers() -> None:
    spec = GoalsSpec(absolute={"llm": 0.95})
    cell = {
        "llmux": _cell(0.999, 0.900, 0.700),
        "lru": _cell(0.700, 0.990, 0.990),  # buys LLM share with ASR: no bar
        "strict": _cell(0.999, 0.904, 0.600),
        "oracle-tiered": _cell(0.995, 0.850, 0.705),
        "floor": _cell(0.999, 1.0, 1.0),
    }
    res = check_cell(cell, spec, "c", absolute=True)
    assert res is not None
    by = {c.what: c for c in res.checks}
    assert res.counted == ["strict", "oracle-tiered"]
    assert by["LLM"].by == "strict"
    assert by["LLM"].bar is not None
    assert by["LLM"].bar == pytest.approx(0.899)
    assert by["LLM"].ok
    assert by["LLM"].margin == pytest.approx(0.1)
    assert (by["TTS"].by, by["TTS"].ok) == ("oracle-tiered", True)  # 0.700 >= 0.705 - 0.005
    assert by["failed"].ok
    assert not by["LLM abs"].ok
    assert by["LLM abs"].margin == pytest.approx(-5.0)
    assert not res.ok
    # Failures count where the floor has none; a candidate below the ASR minimum fails.
    cell["llmux"] = _cell(0.99, 0.95, 0.75, failed=3)
    res = check_cell(cell, spec, "c")
    assert res is not None
    assert [c.what for c in res.checks if not c.ok] == ["ASR", "failed"]
    cell["floor"]["failed"] = 1
    res = check_cell(cell, spec, "c")
    assert res is not None
    assert [c.what for c in res.checks if not c.ok] == ["ASR"]
    assert check_cell({"lru": _cell(1, 1, 1)}, spec, "c") is None  # llmux not run
    table = goals_table([res])
    assert "| c | 99.0% vs 99.5% (-0.5) **x** |" in table
    assert "**FAIL**" in table
    assert "0 of 1 cells pass" in table


def test_three_llm_scenario_runs_with_goals(tmp_path: Path) -> None:
    """`llmux simulate --overlay bench/scenarios/three-llm.yaml` on a short stretch: every
    policy serves or fails every request, and the report has the goals table."""
    out = tmp_path / "out"
    code = cli_main(
        [
            "simulate",
            "--overlay",
            str(ROOT / "bench/scenarios/three-llm.yaml"),
            "--scenario",
            str(ROOT / "bench/scenarios/default.yaml"),
            "--set",
            "trace.duration_s=200",
            "--no-plot",
            "--out",
            str(out),
            "--name",
            "three",
        ]
    )
    assert code == 0
    data = json.loads((out / "sim-three.json").read_text())
    assert "llama-swap-groups" in data["policies"]
    assert data["workload"]["requests_by_model"]["mooncake"] > 0
    for name, r in data["policies"].items():
        served = sum(t["served"] for t in r["tiers"].values())
        assert served + r["failed"] == r["requests"], name
    md = (out / "sim-three.md").read_text()
    assert "## Goals (issue 12)" in md
    assert "| scenario |" in md


@pytest.mark.parametrize(
    ("policy", "host_gb"),
    [
        ("llmux", None),
        ("llmux", 12),  # room for one sleeper's weights only
        ("llama-swap-groups", None),
    ],
)
def test_invariants_hold_with_sleepers(policy: str, host_gb: float | None) -> None:
    """The three-LLM scenario, where llmux puts models to sleep: the core's invariants (GPU and
    host budgets included) after every event."""
    sc = load_scenario(
        ROOT / "bench/scenarios/default.yaml",
        [ROOT / "bench/scenarios/three-llm.yaml"],
        ["trace.start_s=100", "trace.duration_s=300", f"host.ram_gb={host_gb or 'null'}"],
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
    if policy == "llmux":
        assert summarize(sc, sim.rec)["wakes"] > 0
