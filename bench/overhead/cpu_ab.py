"""Gateway CPU per request, for two (or more) llmux source trees side by side.

    python bench/overhead/cpu_ab.py --rounds 4 SRC_A SRC_B [...]

Each SRC is a ``src/`` folder (``git archive <rev> src | tar -x -C /tmp/x`` makes one). Per
round, and in an order that alternates from round to round, each tree's ``llmux serve`` is
started on the overhead bench's config (``run.py``'s, gateway pinned to core 0, upstream and wrk
to core 1), then wrk runs at concurrency 1 and 16 (3 s each after a 1 s warm-up). The gateway's
CPU time (utime + stime from ``/proc``) over each wrk run, divided by the requests served, is the
figure this reports: on a shared, noisy VM it moves far less than requests/s, because it does not
count the time the gateway waits for a CPU. Medians over the rounds; JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # the overhead bench's helpers


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("srcs", nargs="+", help="llmux src/ folders to compare")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=bench.RESULTS)
    parser.add_argument("--tag", default="cpu-ab")
    args = parser.parse_args(argv)
    bench.ensure_wrk()
    settings = bench.Settings(
        repeats=1,
        seconds=args.seconds,
        warmup=1.0,
        events=34,
        stream_conc=8,
        gateway_core=0,
        client_core=1,
        litellm=False,
        llmux_src=None,
        alt_src=None,
        bare=False,
        slow_ms=20.0,
    )
    keys = ("rps_c1", "rps_c16", "p50_ms_c1", "p99_ms_c16", "cpu_us_c1", "cpu_us_c16")
    samples: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in args.srcs}
    for r in range(args.rounds):
        order = args.srcs if r % 2 == 0 else args.srcs[::-1]
        for src in order:
            with tempfile.TemporaryDirectory(prefix="llmux-cpu-ab-") as tmp:
                gw, _, _ = bench.start_llmux(Path(tmp), settings, src=src)
                try:
                    url = f"http://127.0.0.1:{gw.port}"
                    bench.run_wrk(url, "bench", 16, 1, 1)
                    got = samples[src]
                    for conns in (1, 16):
                        before = cpu_seconds(gw.proc.pid)
                        res = bench.run_wrk(url, "bench", conns, args.seconds, 1)
                        used = cpu_seconds(gw.proc.pid) - before
                        got[f"rps_c{conns}"].append(res["rps"])
                        got[f"cpu_us_c{conns}"].append(1e6 * used / res["raw"]["requests"])
                        if conns == 1:
                            got["p50_ms_c1"].append(res["p50_ms"])
                        else:
                            got["p99_ms_c16"].append(res["p99_ms"])
                finally:
                    gw.stop()
        bench.log(f"round {r + 1}/{args.rounds} done")
    medians = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in samples.items()}
    for src, m in medians.items():
        print(src, {k: round(v, 2) for k, v in m.items()})
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    result: dict[str, Any] = {
        "date": stamp,
        "command": " ".join([sys.executable, *sys.argv]),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "loadavg_end": bench.loadavg(),
        "samples": samples,
        "medians": medians,
    }
    path = bench.write_result(args.out, f"overhead-{stamp}-{args.tag}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
