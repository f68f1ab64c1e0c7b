"""Results as JSON, a markdown table, and PNG plots (matplotlib, imported only here)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmux.sim.goals import check_run, goals_table

TIERS = ("asr", "llm", "tts")


def _clean(x: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def to_json(data: Any) -> str:
    return json.dumps(_clean(data), indent=1) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _sec(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def table(result: dict[str, Any]) -> str:
    """One row per policy: SLO attainment and p99 TTFB per tier, then the load counters."""
    tiers = [t for t in TIERS if any(t in r["tiers"] for r in result["policies"].values())]
    sleeps = _slept(result["policies"].values())
    head = (
        ["policy"]
        + [f"{t.upper()} in SLO" for t in tiers]
        + [f"{t.upper()} p50 / p99 s" for t in tiers]
        + ["loads", "swaps", "GB loaded", "wasted", "loading", "failed", "run s"]
        + (["sleeps", "wakes", "GB woken", "waking s"] if sleeps else [])
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["policies"].items():
        row = [f"`{name}`"]
        row += [_pct(r["tiers"].get(t, {}).get("within_slo")) for t in tiers]
        for t in tiers:
            d = r["tiers"].get(t, {})
            row.append(f"{_sec(d.get('p50_s'))} / {_sec(d.get('p99_s'))}")
        row += [
            str(r["loads"]),
            str(r["swaps"]),
            f"{r['gb_loaded']:,.1f}",
            str(r["wasted_loads"]),
            _pct(r["loading_share"]),
            str(r["failed"]),
            f"{r['runtime_s']:.1f}",
        ]
        if sleeps:
            row += [
                str(r.get("sleeps", 0)),
                str(r.get("wakes", 0)),
                f"{r.get('gb_woken', 0.0):,.1f}",
                f"{r.get('wake_s', 0.0):,.1f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _slept(results: Iterable[dict[str, Any]]) -> bool:
    return any(r.get("sleeps", 0) or r.get("wakes", 0) for r in results)


def sweep_table(sweep: dict[str, Any]) -> str:
    """Per sweep value and policy: SLO attainment per tier, GB loaded, failed (and, where any
    model slept, the wakes and GB woken)."""
    sleeps = _slept(r for p in sweep["points"] for r in p["policies"].values())
    head = ["policy", sweep["key"], "ASR", "LLM", "TTS", "GB loaded", "failed"]
    head += ["wakes", "GB woken"] if sleeps else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = list(sweep["points"][0]["policies"]) if sweep["points"] else []
    for name in names:
        for p in sweep["points"]:
            r = p["policies"][name]
            row = (
                [f"`{name}`", str(p["value"])]
                + [_pct(r["tiers"].get(t, {}).get("within_slo")) for t in TIERS]
                + [f"{r['gb_loaded']:,.1f}", str(r["failed"])]
            )
            if sleeps:
                row += [str(r.get("wakes", 0)), f"{r.get('gb_woken', 0.0):,.1f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any], sweeps: list[dict[str, Any]]) -> str:
    sc = result["scenario"]
    w = result["workload"]
    out = [
        f"# llmux simulate: scenario `{sc['name']}`\n",
        f"GPU {sc['gpu']['vram_gb']:g} GB (reserve {sc['gpu']['reserve_gb']:g}), "
        f"{sum(w['requests_by_model'].values()):,} requests over {w['span_s'] / 60:.1f} min, "
        "by model: "
        + ", ".join(f"{k} {v:,}" for k, v in w["requests_by_model"].items())
        + f". SLOs (TTFB): ASR {sc['slo']['asr']:g} s, LLM {sc['slo']['llm']:g} s, "
        f"TTS {sc['slo']['tts']:g} s. Wall time {result['wall_s']:.1f} s.\n",
        table(result),
    ]
    for s in sweeps:
        out.append(f"\n## Sweep `{s['sweep']}` ({s['key']}), wall time {s['wall_s']:.1f} s\n\n")
        out.append(sweep_table(s))
    cells = check_run(result, sweeps)
    if cells:
        spec = sc.get("goals", {})
        out.append(
            f"\n## Goals (issue 12): `{spec.get('candidate', 'llmux')}` in every cell\n\n"
            "ASR within SLO at least the minimum; LLM and TTS at least the best counted peer "
            "(a peer counts where its own ASR meets the minimum) less the margin; no failed "
            "requests where the floor has none. Margins in points (requests for failed).\n\n"
        )
        out.append(goals_table(cells))
    return "".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """GB loaded and ASR p99 TTFB per policy (two bar charts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["policies"])
    gb = [result["policies"][n]["gb_loaded"] for n in names]
    asr = [result["policies"][n]["tiers"].get("asr", {}).get("p99_s") or math.nan for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.bar(names, gb, color="#4c72b0")
    a.set_yscale("log")
    a.set_ylabel("GB loaded (log)")
    a.set_title("GB loaded per policy")
    b.bar(names, asr, color="#dd8452")
    b.set_yscale("log")
    b.axhline(result["scenario"]["slo"]["asr"], color="k", ls="--", lw=1, label="ASR SLO")
    b.set_ylabel("ASR p99 TTFB, s (log)")
    b.set_title("ASR p99 time to first byte")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=35)
        for lbl in ax.get_xticklabels():
            lbl.set_horizontalalignment("right")
    fig.suptitle(f"llmux simulate, scenario '{result['scenario']['name']}'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    """Per policy, against the swept value: GB loaded and SLO attainment of each tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["value"] for p in sweep["points"]]
    names = list(sweep["points"][0]["policies"]) if sweep["points"] else []
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    panels: list[tuple[str, str | None]] = [("GB loaded", None)] + [
        (f"{t.upper()} within SLO (%)", t) for t in TIERS
    ]
    for ax, (title, tier) in zip(axes, panels, strict=True):
        for n in names:
            ys = []
            for p in sweep["points"]:
                r = p["policies"][n]
                if tier is None:
                    ys.append(max(r["gb_loaded"], 1e-3))
                else:
                    v = r["tiers"].get(tier, {}).get("within_slo")
                    ys.append(100 * v if v is not None else math.nan)
            ax.plot(xs, ys, marker="o", label=n)
        ax.set_title(title)
        ax.set_xlabel(sweep["key"])
        if tier is None:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-2, 102)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"llmux simulate: sweep '{sweep['sweep']}'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
