"""Run policies over a scenario, and sweeps over one scenario key."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from llmux.sim.engine import PolicyFactory, Simulator
from llmux.sim.metrics import summarize
from llmux.sim.policies import POLICIES
from llmux.sim.scenario import Scenario, with_overrides
from llmux.sim.workload import Workload, build_workload


class UnknownPolicy(ValueError):
    pass


def resolve_policy(name: str) -> PolicyFactory:
    if name in POLICIES:
        return POLICIES[name]
    from llmux.sim.experiments import variant

    factory = variant(name)
    if factory is None:
        raise UnknownPolicy(
            f"unknown policy '{name}' (known: {', '.join(POLICIES)}, and llmux+... variants, "
            "see docs/simulator.md)"
        )
    return factory


def run_policy(sc: Scenario, workload: Workload, name: str) -> dict[str, Any]:
    sim = Simulator(sc, workload, resolve_policy(name))
    seconds = sim.run()
    out = summarize(sc, sim.rec)
    out["runtime_s"] = round(seconds, 3)
    return out


_WORKLOADS: dict[str, Workload] = {}


def _workload(sc: Scenario) -> Workload:
    key = sc.model_dump_json(include={"seed", "models", "service", "cpu", "voice", "trace"})
    key += sc.base_dir
    if key not in _WORKLOADS:
        _WORKLOADS.clear()
        _WORKLOADS[key] = build_workload(sc)
    return _WORKLOADS[key]


def _job(args: tuple[str, str]) -> dict[str, Any]:
    scenario_json, name = args
    sc = Scenario.model_validate_json(scenario_json)
    return run_policy(sc, _workload(sc), name)


def _map(jobs: list[tuple[Scenario, str]], workers: int) -> list[dict[str, Any]]:
    payload = [(sc.model_dump_json(), name) for sc, name in jobs]
    for _, name in jobs:
        resolve_policy(name)  # fail fast on a bad name, before any work
    if workers <= 1 or len(payload) <= 1:
        return [_job(p) for p in payload]
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(payload)), mp_context=ctx) as pool:
        return list(pool.map(_job, payload))


def workload_info(sc: Scenario, w: Workload) -> dict[str, Any]:
    return {
        "requests_known_in_advance": len(w.requests),
        "requests_by_model": dict(sorted(w.counts().items())),
        "span_s": round(w.span_s, 3),
    }


def run_scenario(
    sc: Scenario, policies: Sequence[str] | None = None, workers: int = 1
) -> dict[str, Any]:
    names = list(policies or sc.policies)
    t0 = time.perf_counter()
    w = _workload(sc)
    results = _map([(sc, n) for n in names], workers)
    return {
        "scenario": sc.model_dump(exclude={"base_dir", "sweeps"}),
        "workload": workload_info(sc, w),
        "policies": dict(zip(names, results, strict=True)),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def run_sweep(
    sc: Scenario,
    sweep: str,
    policies: Sequence[str] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    if sweep not in sc.sweeps:
        raise UnknownPolicy(f"no sweep '{sweep}' in scenario (have: {', '.join(sc.sweeps)})")
    spec = sc.sweeps[sweep]
    names = list(policies or sc.policies)
    t0 = time.perf_counter()
    points = [with_overrides(sc, [(spec.key, v)]) for v in spec.values]
    jobs = [(p, n) for p in points for n in names]
    results = _map(jobs, workers)
    out: list[dict[str, Any]] = []
    for i, v in enumerate(spec.values):
        chunk = results[i * len(names) : (i + 1) * len(names)]
        out.append({"value": v, "policies": dict(zip(names, chunk, strict=True))})
    return {
        "sweep": sweep,
        "key": spec.key,
        "scenario": sc.model_dump(exclude={"base_dir", "sweeps"}),
        "points": out,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def dumps(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=False, allow_nan=True) + "\n"
