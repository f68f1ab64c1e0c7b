"""What a wake through llmux adds to the engine's own wake (issue 12: at most 20 ms).

    python bench/wake.py [--repeats 40] [--wake-delay 0.2] [--out bench/results]

Two runs of the same stand-in engine (``tests/sleepy.py``, vLLM's sleep API, each wake taking
``--wake-delay`` s inside the engine, as a real one takes its time to copy weights back), side by
side, alternating, ``--repeats`` times each:

* **direct**: the engine alone. Put it to sleep (``POST /sleep?level=1``), then time
  ``POST /wake_up`` followed by one chat completion: what a client that managed sleep itself
  would wait.
* **llmux**: the same engine as a ``sleep:`` model of a real ``llmux serve``. Put it to sleep
  (``POST /models/m/sleep``), then time one chat completion through llmux: the request finds the
  model asleep, llmux plans the wake (rule 12), calls ``/wake_up``, gets the answer, grants the
  request and relays it.

The overhead is the median of llmux minus the median of direct (and the same for p90), so the
engine's own wake time cancels out. Both use one keep-alive httpx client. Writes
``wake-<date>.json`` and ``.md`` to ``--out``, with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SLEEPY = ROOT / "tests" / "sleepy.py"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ok(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} not up after {timeout} s")
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--wake-delay", type=float, default=0.2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llmux-wake-"))
    delay = ["--wake-delay", str(args.wake_delay)]
    direct_port = free_port()
    direct = subprocess.Popen(
        [sys.executable, str(SLEEPY), "--port", str(direct_port), "--name", "m", *delay],
        stdout=subprocess.DEVNULL,
    )
    cmd = shlex.join([sys.executable, str(SLEEPY), "--port", "${PORT}", "--name", "m", *delay])
    config = work / "llmux.yaml"
    config.write_text(
        "gpu: {vram_gb: 10, reserve_gb: 0}\n"
        "host: {ram_gb: 100}\n"
        "models:\n"
        f"  m: {{type: llm, vram_gb: 6, cmd: {json.dumps(cmd)}, "
        "sleep: {level: 1, host_gb: 6, residual_gb: 0.5}}\n"
    )
    port = free_port()
    llmux = subprocess.Popen(
        [sys.executable, "-m", "llmux", "serve", "--config", str(config), "--port", str(port)],
        stdout=(work / "llmux.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    engine = f"http://127.0.0.1:{direct_port}"
    samples: dict[str, list[float]] = {"direct": [], "llmux": []}
    try:
        wait_ok(engine + "/health")
        wait_ok(base + "/health")
        with httpx.Client(timeout=60) as http:
            http.post(base + "/v1/chat/completions", json=CHAT).raise_for_status()  # load
            for i in range(args.repeats + 2):  # the first two of each are warm-up
                # direct
                http.post(engine + "/sleep", params={"level": 1}).raise_for_status()
                t0 = time.perf_counter()
                http.post(engine + "/wake_up").raise_for_status()
                http.post(engine + "/v1/chat/completions", json=CHAT).raise_for_status()
                d = time.perf_counter() - t0
                # through llmux
                r = http.post(base + "/models/m/sleep")
                r.raise_for_status()
                assert r.json()["state"] == "sleeping", r.text
                t0 = time.perf_counter()
                reply = http.post(base + "/v1/chat/completions", json=CHAT)
                x = time.perf_counter() - t0
                reply.raise_for_status()
                if i >= 2:
                    samples["direct"].append(d)
                    samples["llmux"].append(x)
            stats = http.get(base + "/status").json()
            metrics = http.get(base + "/metrics").text
    finally:
        llmux.terminate()
        direct.terminate()
        llmux.wait(30)
        direct.wait(30)

    wakes = [ln for ln in metrics.splitlines() if ln.startswith("llmux_model_wakes_total")]
    med = {k: statistics.median(v) for k, v in samples.items()}
    p90 = {k: pct(v, 0.9) for k, v in samples.items()}
    result: dict[str, Any] = {
        "command": "python bench/wake.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "repeats": args.repeats,
        "engine_wake_delay_s": args.wake_delay,
        "median_s": med,
        "p90_s": p90,
        "overhead_median_ms": round((med["llmux"] - med["direct"]) * 1000, 2),
        "overhead_p90_ms": round((p90["llmux"] - p90["direct"]) * 1000, 2),
        "samples_s": samples,
        "llmux_wakes_metric": wakes,
        "model_after": next(m for m in stats["models"] if m["id"] == "m"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    (out / f"wake-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Wake through llmux vs the engine's own wake",
        "",
        f"`{result['command']}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPUs); stand-in engine `tests/sleepy.py`, wake "
        f"{args.wake_delay:g} s inside the engine; {args.repeats} repeats each, alternating.",
        "",
        "| | median | p90 |",
        "|---|---|---|",
        f"| direct: `/wake_up` + chat | {med['direct'] * 1000:.1f} ms | "
        f"{p90['direct'] * 1000:.1f} ms |",
        f"| llmux: chat to a sleeping model | {med['llmux'] * 1000:.1f} ms | "
        f"{p90['llmux'] * 1000:.1f} ms |",
        f"| **added by llmux** | **{result['overhead_median_ms']:.1f} ms** | "
        f"{result['overhead_p90_ms']:.1f} ms |",
        "",
    ]
    (out / f"wake-{stamp}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
