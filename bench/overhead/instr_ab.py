"""Gateway instructions per request, for llmux source trees side by side: an A/B that noise
cannot move.

    python bench/overhead/instr_ab.py SRC_A SRC_B [...] [--seconds 8] [--conc 1 16]

Each SRC is a ``src/`` folder (``git archive <rev> src | tar -x -C /tmp/x`` makes one). Each
tree's ``llmux serve`` runs under valgrind's callgrind on the overhead bench's config
(``run.py``'s: the bench upstream as a child, an API key, metrics), with instrumentation off
while it starts. After a warm-up, instrumentation is switched on for one wrk run at each
concurrency and off again; the user-space instructions counted in that window, divided by the
requests wrk completed, are the figure. Under callgrind the gateway runs some 50 times slower,
so a run serves a few thousand requests.

Why: ``cpu_ab.py`` measures CPU time, which on these shared VMs drifts by 5-10% between
rounds, so a change worth 2-5% needs many rounds and still misleads. An instruction count is
the same to about 0.5% from run to run whatever else the host does. It does not see the
kernel (system calls) or cache misses, so a change that removes syscalls needs ``cpu_ab.py``.

Output: a table on stdout and ``bench/results/instr-<date>-<tag>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # the overhead bench's helpers

from llmux.backends.process import free_port

SETTINGS = bench.Settings(
    repeats=1,
    seconds=3,
    warmup=1.0,
    events=34,
    stream_conc=8,
    gateway_core=None,
    client_core=None,
    litellm=False,
    llmux_src=None,
    alt_src=None,
    bare=False,
    slow_ms=20.0,
)


def callgrind(pid: int, switch: str) -> None:
    subprocess.run(["callgrind_control", "-i", switch, str(pid)], check=True, capture_output=True)


def measure(src: str, concs: list[int], seconds: float) -> dict[str, float]:
    """Instructions per request of one tree at each concurrency (one llmux process)."""
    with tempfile.TemporaryDirectory(prefix="llmux-instr-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        cfg = bench.llmux_config(tmp, SETTINGS, "llmux")
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = tmp / "callgrind.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            *bench.llmux_serve_argv(cfg, port),
        ]
        log = open(tmp / "llmux.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        counts: dict[str, float] = {}
        try:
            bench.wait_answer(port, "/v1/models", time.monotonic() + 300, proc)
            bench.chat(port, "bench")  # spawns the child
            url = f"http://127.0.0.1:{port}"
            bench.run_wrk(url, "bench", max(concs), 2, None, timeout_s=30)  # warm-up
            for conc in concs:
                # One dump per window: the totals line of each dump holds only that window.
                callgrind(proc.pid, "on")
                res = bench.run_wrk(url, "bench", conc, seconds, None, timeout_s=30)
                callgrind(proc.pid, "off")
                subprocess.run(
                    ["callgrind_control", "-d", f"c{conc}", str(proc.pid)],
                    check=True,
                    capture_output=True,
                )
                if res["errors"]:
                    raise RuntimeError(f"{res['errors']} failed requests under callgrind")
                counts[f"c{conc}_requests"] = res["raw"]["requests"]
        finally:
            proc.terminate()
            proc.wait(120)
            log.close()
        for conc in concs:
            [dump] = [p for p in tmp.glob("callgrind.out*") if _dump_reason(p) == f"c{conc}"]
            counts[f"c{conc}"] = _totals(dump) / counts[f"c{conc}_requests"]
        return counts


def _dump_reason(path: Path) -> str:
    """The reason given to ``callgrind_control -d`` (``desc: Trigger: dump REASON``)."""
    m = re.search(r"^desc: Trigger: dump (\S+)", path.read_text(errors="replace")[:4000], re.M)
    return m.group(1) if m else ""


def _totals(path: Path) -> int:
    m = re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no totals line in {path}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("srcs", nargs="+", help="llmux src/ folders to compare")
    parser.add_argument("--seconds", type=float, default=8.0, help="per wrk window")
    parser.add_argument("--conc", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", type=Path, default=bench.RESULTS)
    parser.add_argument("--tag", default="ab")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on PATH (Debian: apt-get install valgrind)")
    bench.ensure_wrk()
    results: dict[str, dict[str, float]] = {}
    for src in args.srcs:
        results[src] = measure(src, args.conc, args.seconds)
        bench.log(f"{src}: {json.dumps(results[src])}")
    first = results[args.srcs[0]]
    header = "| src | " + " | ".join(f"instructions/request, c={c}" for c in args.conc) + " |"
    lines = [header, "|---" * (len(args.conc) + 1) + "|"]
    for src, got in results.items():
        cells = [
            f"{got[f'c{c}'] / 1000:,.1f} k ({got[f'c{c}'] / first[f'c{c}'] - 1:+.1%})"
            for c in args.conc
        ]
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    result: dict[str, Any] = {
        "date": stamp,
        "command": " ".join(["python", *sys.argv]),
        "seconds": args.seconds,
        "python": sys.version.split()[0],
        "results": results,
        "table": lines,
    }
    path = bench.write_result(args.out, f"instr-{stamp}-{args.tag}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
