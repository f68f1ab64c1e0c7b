"""``llmux simulate``: run the scenario, write JSON, markdown and plots."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmux.errors import ConfigError
from llmux.sim.report import markdown, plot, plot_sweep, to_json
from llmux.sim.run import UnknownPolicy, run_scenario, run_sweep
from llmux.sim.scenario import load_scenario

DEFAULT_SCENARIO = Path("bench/scenarios/default.yaml")


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = Path(args.scenario) if args.scenario else DEFAULT_SCENARIO
    if not path.exists():
        print(
            f"llmux simulate: no scenario at {path} (run from the repository root, or pass "
            "--scenario FILE)",
            file=sys.stderr,
        )
        return 2
    try:
        sc = load_scenario(path, args.overlay or [], args.set or [])
    except ConfigError as exc:
        print(f"llmux simulate: {exc}", file=sys.stderr)
        return 2
    policies = args.policies or None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sim-{args.name or sc.name}"
    try:
        result = run_scenario(sc, policies, args.jobs)
        sweeps = [run_sweep(sc, s, policies, args.jobs) for s in args.sweep or []]
    except (UnknownPolicy, ConfigError) as exc:
        print(f"llmux simulate: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"llmux simulate: trace not found: {exc.filename}", file=sys.stderr)
        return 2
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    (out / f"{stem}.json").write_text(to_json(result), encoding="utf-8")
    md = markdown(result, sweeps)
    (out / f"{stem}.md").write_text(md, encoding="utf-8")
    for s in sweeps:
        p = out / f"{stem}-{s['sweep']}.json"
        p.write_text(to_json(s), encoding="utf-8")
        written.append(p)
    if not args.no_plot:
        try:
            plot(result, out / f"{stem}.png")
            written.append(out / f"{stem}.png")
            for s in sweeps:
                plot_sweep(s, out / f"{stem}-{s['sweep']}.png")
                written.append(out / f"{stem}-{s['sweep']}.png")
        except ImportError:
            print(
                "llmux simulate: matplotlib is not installed; no plots (pip install matplotlib)",
                file=sys.stderr,
            )
    print(md)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - t0:.1f} s")
    return 0
