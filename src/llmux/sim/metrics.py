"""What one run measured, per policy.

* TTFB (time to first byte) = queue wait + load + the model's own first-byte time (LLM: prefill;
  ASR: the whole 0.3 s; TTS: 0.2 s). Per tier: mean, p50, p99 over the requests that were served.
* SLO attainment: the share of *all* requests of a tier (failed and never-served ones count as
  misses) whose TTFB is within the tier's SLO.
* loads, GB loaded, evictions (stops to make room, ``priority``; keep-alive/ttl stops are counted
  apart), swaps (= loads beyond the first of each model), wasted loads (a load evicted before any
  request that arrived after it was ready used it: it bought nothing beyond the cold requests
  that forced it), loading share (the share of the run during which a load was in progress).
* sleeps and wakes (llmux's ``sleep:``): how many, GB of weights moved out (to host RAM, level 1)
  and back in (``gb_woken``, from host RAM or, at level 2, from disk), and the seconds spent
  waking (``wake_s``, summed over wakes). A wake is not a load: "GB loaded" and "loads" count
  cold loads only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from llmux.sim.engine import Recorder
from llmux.sim.scenario import Scenario


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted input."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total = 0.0
    end = -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _dist(values: list[float], slo: float, total: int) -> dict[str, Any]:
    values.sort()
    ok = sum(1 for v in values if v <= slo + 1e-9)
    return {
        "requests": total,
        "served": len(values),
        "mean_s": sum(values) / len(values) if values else math.nan,
        "p50_s": percentile(values, 50),
        "p99_s": percentile(values, 99),
        "max_s": values[-1] if values else math.nan,
        "slo_s": slo,
        "within_slo": ok / total if total else math.nan,
    }


def summarize(sc: Scenario, rec: Recorder) -> dict[str, Any]:
    by_tier: dict[str, list[float]] = {}
    by_model: dict[str, list[float]] = {}
    n_tier: dict[str, int] = {}
    n_model: dict[str, int] = {}
    failed: dict[str, int] = {}
    unserved = 0
    end = 0.0
    for rid, req in rec.requests.items():
        tier = sc.tier_of(req.model_id)
        n_tier[tier] = n_tier.get(tier, 0) + 1
        n_model[req.model_id] = n_model.get(req.model_id, 0) + 1
        granted = rec.granted.get(rid)
        if granted is None:
            if rid in rec.rejected:
                code = rec.rejected[rid]
                failed[code] = failed.get(code, 0) + 1
            else:
                unserved += 1
            continue
        ttfb = granted - req.arrival + req.first_byte_s
        by_tier.setdefault(tier, []).append(ttfb)
        by_model.setdefault(req.model_id, []).append(ttfb)
        end = max(end, rec.finished.get(rid, granted))
    tiers = {t: _dist(by_tier.get(t, []), sc.slo.of(t), n) for t, n in sorted(n_tier.items())}
    models = {
        m: _dist(by_model.get(m, []), sc.slo.of(sc.tier_of(m)), n)
        for m, n in sorted(n_model.items())
    }
    end = max(end, max((r.arrival for r in rec.requests.values()), default=0.0))
    loaded_models = {ld.model_id for ld in rec.loads}
    evictions = sum(1 for ld in rec.loads if ld.reason == "priority")
    expiries = sum(1 for ld in rec.loads if ld.reason is not None and ld.reason != "priority")
    wasted = sum(1 for ld in rec.loads if ld.stopped_at is not None and not ld.reused)
    loading = _union_length([(ld.start, min(ld.ready, end)) for ld in rec.loads if ld.start < end])
    loads_by_model: dict[str, int] = {}
    for ld in rec.loads:
        loads_by_model[ld.model_id] = loads_by_model.get(ld.model_id, 0) + 1
    return {
        "tiers": tiers,
        "models": models,
        "requests": len(rec.requests),
        "failed": sum(failed.values()) + unserved,
        "failed_by_code": dict(sorted(failed.items())),
        "unserved": unserved,
        "loads": len(rec.loads),
        "loads_by_model": dict(sorted(loads_by_model.items())),
        "swaps": len(rec.loads) - len(loaded_models),
        "evictions": evictions,
        "expiries": expiries,
        "gb_loaded": round(sum(ld.gb for ld in rec.loads), 6),
        "wasted_loads": wasted,
        "loading_share": loading / end if end > 0 else 0.0,
        "span_s": end,
        "sleeps": sum(1 for r in rec.sleeps if r.kind == "sleep"),
        "wakes": sum(1 for r in rec.sleeps if r.kind == "wake"),
        "gb_slept": round(sum(r.gb for r in rec.sleeps if r.kind == "sleep"), 6),
        "gb_woken": round(sum(r.gb for r in rec.sleeps if r.kind == "wake"), 6),
        "wake_s": round(sum(r.end - r.start for r in rec.sleeps if r.kind == "wake"), 6),
    }
