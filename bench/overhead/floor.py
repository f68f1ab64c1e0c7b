"""What the HTTP stack costs per request on its own, against the CPU budget of a throughput goal.

    python bench/overhead/floor.py [--rounds 3] [--seconds 3] [--goal 0.28]

Any relay built on uvicorn and an aiohttp client pays at least two things per request, however
little else it does: uvicorn serving the client's request (parse, ASGI messages, write) and the
aiohttp client sending it on and reading the answer. This measures both alone, on this machine,
in the same window as the direct throughput that the goal is a fraction of:

- ``direct``: wrk (core 0) at concurrency 16 against the bench upstream (core 1), requests/s.
  The goal "llmux >= GOAL x direct" leaves a gateway saturating one core ``1e6 / (GOAL x
  direct)`` µs of CPU per request: the **budget**.
- ``server``: a second upstream process on core 0, loaded by wrk on core 1 at concurrency 16.
  Its CPU time per request is what uvicorn (uvloop, httptools) and a raw ASGI app that answers
  at once cost: the server half of any such gateway.
- ``client``: a process on core 0 runs 16 concurrent aiohttp requests (one shared session with
  llmux's settings, keep-alive) against the upstream on core 1, each reading the whole answer.
  Its CPU time per request is the client half.

``server + client`` is a floor: a gateway also has to connect the two halves (its own task,
headers, the body), which this does not count. The gateway's CPU comes from /proc (utime +
stime), which a busy host moves far less than requests/s. Medians over rounds; JSON and
markdown go to ``bench/results/floor-<date>.*``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # the overhead bench's helpers
from cpu_ab import cpu_seconds

from llmux.backends.process import free_port

CONC = 16


def start_upstream(core: int, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [*bench.pin(core), sys.executable, str(bench.HERE / "upstream.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"upstream-{port}.log", "wb"),  # noqa: SIM115 - lives with the process
    )
    bench.wait_answer(port, "/health", time.monotonic() + 30, proc)
    return proc, port


async def _client_round(port: int, requests: int) -> tuple[float, float]:
    """(CPU µs per request, requests/s) of ``requests`` aiohttp requests, CONC at a time."""
    import aiohttp
    import uvloop  # noqa: F401 - the caller runs this on uvloop

    session = aiohttp.ClientSession(  # as llmux's app.py makes it
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    url = f"http://127.0.0.1:{port}{bench.CHAT}"
    body = (bench.BODY % "bench").encode()
    headers = [("content-type", "application/json"), ("accept-encoding", "identity")]

    async def worker(n: int) -> None:
        for _ in range(n):
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"upstream answered {resp.status}")

    try:
        await asyncio.gather(*(worker(max(1, requests // 10 // CONC)) for _ in range(CONC)))
        per = max(1, requests // CONC)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(per) for _ in range(CONC)))
        elapsed = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await session.close()
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return 1e6 * cpu / (per * CONC), per * CONC / elapsed


def client_main(port: int, requests: int) -> int:
    """``--client-only``: one client round, its result as a JSON line on stdout."""
    import uvloop

    cpu_us, rps = uvloop.run(_client_round(port, requests))
    print(json.dumps({"cpu_us": cpu_us, "rps": rps}))
    return 0


def one_round(tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    upstream, port = start_upstream(1, tmp)
    server, server_port = start_upstream(0, tmp)
    try:
        url = f"http://127.0.0.1:{port}"
        bench.run_wrk(url, "bench", CONC, 1, 0)  # warm-up
        direct = bench.run_wrk(url, "bench", CONC, args.seconds, 0)["rps"]

        surl = f"http://127.0.0.1:{server_port}"
        bench.run_wrk(surl, "bench", CONC, 1, 1)
        before = cpu_seconds(server.pid)
        res = bench.run_wrk(surl, "bench", CONC, args.seconds, 1)
        server_us = 1e6 * (cpu_seconds(server.pid) - before) / res["raw"]["requests"]

        # About as many requests as a gateway serves in --seconds at the measured speed.
        requests = max(CONC * 20, int(args.seconds * 9000))
        cmd = [
            *bench.pin(0),
            sys.executable,
            __file__,
            "--client-only",
            str(port),
            "--requests",
            str(requests),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
        client = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for proc in (upstream, server):
            proc.terminate()
            proc.wait(10)
    budget = 1e6 / (args.goal * direct)
    return {
        "direct_rps": direct,
        "budget_us": budget,
        "server_us": server_us,
        "server_rps": res["rps"],
        "client_us": client["cpu_us"],
        "client_rps": client["rps"],
        "floor_us": server_us + client["cpu_us"],
        "floor_over_budget": (server_us + client["cpu_us"]) / budget,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["medians"]
    goal = result["goal"]
    lines = [
        f"# HTTP stack floor, {result['date']}",
        "",
        f"`{result['command']}`: {result['rounds']} rounds, medians; concurrency {CONC}; "
        f"{result['seconds']} s per wrk measurement. Method: `bench/overhead/floor.py`'s "
        "docstring.",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs; load average at "
        f"start {result['loadavg']['start']}, at end {result['loadavg']['end']}.",
        "",
        "| what | median | per round |",
        "|---|---|---|",
    ]
    rows = [
        ("direct req/s, c=16", "direct_rps", 0),
        (f"budget at {goal}x direct, CPU µs/request", "budget_us", 1),
        ("uvicorn + raw ASGI server alone, CPU µs/request", "server_us", 1),
        ("aiohttp client alone, CPU µs/request", "client_us", 1),
        ("floor = server + client, CPU µs/request", "floor_us", 1),
        ("floor / budget", "floor_over_budget", 2),
    ]
    for label, key, digits in rows:
        per = ", ".join(f"{r[key]:,.{digits}f}" for r in result["per_round"])
        lines.append(f"| {label} | {m[key]:,.{digits}f} | {per} |")
    verdict = (
        "over the budget: no gateway built on these two can meet the goal on this machine"
        if m["floor_over_budget"] > 1
        else "within the budget"
    )
    lines += ["", f"The floor is {m['floor_over_budget']:.2f}x the budget: {verdict}.", ""]
    lines.append(f"Versions: {result['versions']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--goal", type=float, default=0.28, help="the goal, x direct at c=16")
    parser.add_argument("--out", type=Path, default=bench.RESULTS)
    parser.add_argument("--client-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=20000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_only:
        return client_main(args.client_only, args.requests)
    bench.ensure_wrk()
    start = bench.loadavg()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="llmux-floor-") as tmp:
        for r in range(args.rounds):
            rounds.append(one_round(Path(tmp), args))
            bench.log(f"round {r + 1}/{args.rounds}: {json.dumps(rounds[-1])}")
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    result: dict[str, Any] = {
        "date": stamp,
        "command": " ".join(["python", *sys.argv]),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "goal": args.goal,
        "machine": bench.machine_info(),
        "loadavg": {"start": start, "end": bench.loadavg()},
        "versions": bench.package_versions(),
        "per_round": rounds,
        "medians": medians,
    }
    bench.write_result(args.out, f"floor-{stamp}.json", result)
    text = markdown(result)
    (args.out / f"floor-{stamp}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / f'floor-{stamp}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
