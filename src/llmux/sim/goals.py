"""The goals check of issue 12, per cell (one scenario, or one point of a sweep).

In each cell, for the candidate policy (``goals.candidate``, llmux by default):

* ASR within SLO >= ``goals.asr_min`` (99.5%);
* LLM and TTS within SLO >= the best *counted* peer's in that cell less ``goals.margin`` (0.5
  points); a peer counts only if its own ASR within SLO is >= ``asr_min`` there (a policy that
  buys LLM share by evicting the protected ASR breaks the user's rule, so it is no bar);
* 0 failed requests wherever the floor policy has 0;
* in the scenario's own cell (not in sweeps), each ``goals.absolute`` tier floor.

A tier with no requests in the cell is not checked. Shares are fractions (0.995), margins are
reported in points (percentage points).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmux.sim.scenario import GoalsSpec

_EPS = 1e-9


@dataclass(frozen=True)
class Check:
    """One goal in one cell."""

    what: str
    """``ASR``, ``LLM``, ``TTS``, ``failed``, or an absolute goal such as ``LLM abs``."""
    value: float | None
    """The candidate's figure (a share, or failed requests); None = the tier has no requests."""
    bar: float | None
    """What it must reach (at least; for ``failed``: at most); None = nothing to meet."""
    by: str
    """Where the bar comes from: ``min``, a peer's name, ``floor``, ``absolute`` or ``-``."""

    @property
    def ok(self) -> bool:
        if self.value is None or self.bar is None:
            return True
        if self.what == "failed":
            return self.value <= self.bar
        return self.value + _EPS >= self.bar

    @property
    def margin(self) -> float | None:
        """How far above the bar (points for shares, requests for ``failed``, below = negative)."""
        if self.value is None or self.bar is None:
            return None
        if self.what == "failed":
            return self.bar - self.value
        return 100.0 * (self.value - self.bar)


@dataclass(frozen=True)
class CellResult:
    cell: str
    checks: list[Check]
    counted: list[str] = field(default_factory=list)
    """Peers whose ASR met ``asr_min`` in this cell (their LLM and TTS set the bars)."""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _share(r: Mapping[str, Any] | None, tier: str) -> float | None:
    if r is None:
        return None
    t = r.get("tiers", {}).get(tier)
    if not t or not t.get("requests"):
        return None
    v = t.get("within_slo")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def check_cell(
    policies: Mapping[str, Mapping[str, Any]],
    spec: GoalsSpec,
    cell: str,
    absolute: bool = False,
) -> CellResult | None:
    """The goals in one cell, from its per-policy results (``run_scenario``'s ``policies``, or
    a sweep point's). None if the candidate was not run there."""
    me = policies.get(spec.candidate)
    if me is None:
        return None
    checks: list[Check] = []
    asr = _share(me, "asr")
    checks.append(Check("ASR", asr, spec.asr_min if asr is not None else None, "min"))
    counted = []
    for name in spec.peers:
        r = policies.get(name)
        if r is None:
            continue
        peer_asr = _share(r, "asr")
        if peer_asr is None or peer_asr + _EPS >= spec.asr_min:
            counted.append(name)
    for tier in ("llm", "tts"):
        value = _share(me, tier)
        best: tuple[float, str] | None = None
        for name in counted:
            v = _share(policies[name], tier)
            if v is not None and (best is None or v > best[0]):
                best = (v, name)
        if value is None or best is None:
            checks.append(Check(tier.upper(), value, None, "-"))
        else:
            checks.append(Check(tier.upper(), value, best[0] - spec.margin, best[1]))
    floor = policies.get(spec.floor)
    if floor is not None and floor.get("failed") == 0:
        checks.append(Check("failed", float(me.get("failed", 0)), 0.0, "floor"))
    else:
        checks.append(Check("failed", float(me.get("failed", 0)), None, "-"))
    if absolute:
        for tier, low in spec.absolute.items():
            checks.append(Check(f"{tier.upper()} abs", _share(me, tier), low, "absolute"))
    return CellResult(cell, checks, counted)


def check_run(
    result: Mapping[str, Any], sweeps: Sequence[Mapping[str, Any]] = ()
) -> list[CellResult]:
    """Every cell of a run: the scenario's own (with the absolute goals), then each sweep
    point (``key=value``)."""
    spec = GoalsSpec.model_validate(result["scenario"].get("goals", {}))
    out: list[CellResult] = []
    base = check_cell(result["policies"], spec, "scenario", absolute=True)
    if base is not None:
        out.append(base)
    for s in sweeps:
        for p in s["points"]:
            c = check_cell(p["policies"], spec, f"{s['key']}={p['value']}")
            if c is not None:
                out.append(c)
    return out


def _fmt(c: Check) -> str:
    if c.value is None:
        return "-"
    if c.what == "failed":
        text = f"{c.value:,.0f}"
        return text if c.bar is None else f"{text} (floor 0)"
    text = f"{100 * c.value:.1f}%"
    if c.bar is None:
        return text
    margin = c.margin or 0.0
    src = "" if c.by in ("min", "absolute") else f" `{c.by}`"
    return f"{text} vs {100 * c.bar:.1f}%{src} ({margin:+.1f})"


def goals_table(cells: Sequence[CellResult]) -> str:
    """Markdown: one row per cell, each goal with the candidate's figure, the bar, where the bar
    comes from and the margin in points; PASS or FAIL."""
    extra = sorted({c.what for cell in cells for c in cell.checks if c.by == "absolute"})
    head = ["cell", "ASR", "LLM", "TTS", "failed", *extra, "counted peers", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        by = {c.what: c for c in cell.checks}
        row = [cell.cell]
        for what in ("ASR", "LLM", "TTS", "failed", *extra):
            c = by.get(what)
            row.append("" if c is None else _fmt(c) + ("" if c.ok else " **x**"))
        row.append(", ".join(cell.counted) or "none")
        row.append("PASS" if cell.ok else "**FAIL**")
        lines.append("| " + " | ".join(row) + " |")
    passed = sum(1 for c in cells if c.ok)
    return "\n".join(lines) + f"\n\n{passed} of {len(cells)} cells pass.\n"
