"""Gateway-overhead bench: direct vs llmux vs the LiteLLM proxy, one command.

    python bench/overhead/run.py [--repeats 3] [--quick] [--no-litellm] [--no-bare] [--profile]

Per repeat, from scratch:

1. Start ``llmux serve`` on a config with two unpinned models whose ``cmd`` is
   ``bench/overhead/upstream.py`` (``bench``: fast; ``bench-slow``: ``--delay-ms 20``). Time
   from spawning llmux to its first answered ``GET /v1/models`` and to its first answered chat
   completion (which includes spawning the child). The children write ``{port, pid}`` to an
   ``--announce`` file, which gives the direct path and LiteLLM the very same upstream.
2. Start the reference ``bare_relay.py`` (DESIGN §6's floor; ``--no-bare`` skips it) and the
   LiteLLM proxy (its own venv, made on first use under ``.venv-litellm``) with one model
   ``openai/bench`` whose ``api_base`` is that upstream; time them the same way.
3. Idle RSS of each gateway (after a short warm-up, then 1 s idle).
4. Blocks, each run on every path back to back in an order rotated per repeat, so that noise
   from other work on the machine hits all paths alike:
   wrk non-streaming at concurrency 1 and 16; the SSE client at concurrency 8;
   wrk at concurrency 16 against the 20 ms upstream (direct and llmux only);
   wrk at concurrency 1 with everything on one core.
   RSS under load is the largest VmRSS sampled (every 0.2 s) during the c=16 and SSE blocks.

Pinning (``taskset``/``sched_setaffinity``, unless ``--no-pin``): each gateway on core 0; the
upstreams (re-pinned after llmux spawns them, since children inherit its affinity), wrk, the
SSE client and this script on core 1. Path ``direct`` runs its load generator on core 0, so
that every client-server hop crosses cores as on the proxied paths (DESIGN §6's method);
``direct-1core`` runs it on core 1, beside the upstream.

``--llmux-src A --alt-src B`` runs llmux from two source trees side by side (paths ``llmux``
and ``llmux-alt``) for A/B measurements of a change.

Writes ``bench/results/overhead-<date>.json`` (command line, machine, load averages, raw
samples, medians, ratios, goals) and ``overhead-<date>.md`` (the tables).
``--profile`` adds a py-spy phase on llmux afterwards (collapsed stacks, not interleaved with
the measurements because sampling perturbs them).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmux.backends.process import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "bench" / "results"
VENV = HERE / ".venv-litellm"
LITELLM_SPEC = "litellm[proxy]"
CHAT = "/v1/chat/completions"
BODY = '{"model":"%s","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
MIB = 1024.0
SSE_CLIENT = ["raw"]
"""sse_client.py's HTTP client (set from --sse-client)."""
API_KEY = "sk-bench-" + secrets.token_hex(32)
"""One key for the run: llmux's api_keys and LiteLLM's master key; every path gets it."""
AUTH = f"Bearer {API_KEY}"

GOALS: list[tuple[str, str, str, float]] = [
    # (key in summary["goal_values"], description, comparison, threshold)
    ("added_p50_ms_c1", "added p50 latency at c=1 (ms)", "<=", 0.25),
    ("rps_ratio_c1", "llmux/direct req/s at c=1", ">=", 0.28),
    ("rps_ratio_c16", "llmux/direct req/s at c=16", ">=", 0.28),
    ("streams_ratio_c8", "llmux/direct streams/s at c=8", ">=", 0.5),
    ("idle_rss_mib", "llmux idle RSS (MiB)", "<=", 60.0),
    ("first_answer_s", "llmux start to first answered request (s)", "<", 1.0),
    ("slow_rps_ratio_c16", "llmux/direct req/s at c=16, 20 ms upstream", ">=", 0.97),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- processes


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass
class Gateway:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    tree: bool
    """RSS counts the whole process tree (LiteLLM) or the gateway process alone (llmux, whose
    children are the upstreams)."""
    exclude: set[int] = field(default_factory=set)

    def own_pids(self) -> list[int]:
        """The gateway's processes: llmux's children are upstreams, not part of it."""
        if not self.tree:
            return [self.proc.pid]
        return [p for p in process_tree(self.proc.pid) if p not in self.exclude]

    def rss(self) -> int:
        return sum(rss_kib(p) for p in self.own_pids())

    def stop(self, grace: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # leftovers of its group
            os.killpg(self.proc.pid, signal.SIGKILL)


class RssSampler:
    """Largest RSS of some gateways, sampled in a thread while a block runs."""

    def __init__(self, gateways: list[Gateway], every: float = 0.2) -> None:
        self.gateways = gateways
        self.every = every
        self.peak: dict[str, int] = {g.name: 0 for g in gateways}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for g in self.gateways:
                self.peak[g.name] = max(self.peak[g.name], g.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def http_request(
    port: int, method: str, path: str, body: str | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"authorization": AUTH}
        if body is not None:
            headers["content-type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_answer(port: int, path: str, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    """Poll ``GET path`` every 5 ms until it answers 200."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {path}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_request(port, "GET", path, timeout=5.0)[0] == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer on {path} in time")
        time.sleep(0.005)


def chat(port: int, model: str) -> None:
    status, body = http_request(port, "POST", CHAT, BODY % model, timeout=120.0)
    if status != 200:
        raise RuntimeError(f"chat completion on :{port} answered {status}: {body[:300]!r}")


def log_tail(path: Path, lines: int = 30) -> None:
    with contextlib.suppress(OSError):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        log(f"last lines of {path.name}:\n" + "\n".join(tail))


def set_affinity(pids: list[int], core: int) -> None:
    """Move every thread of these processes to ``core``."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {core})


def pin(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


def read_announce(path: Path, timeout: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not written: the upstream did not announce itself")
        time.sleep(0.01)
    data: dict[str, int] = json.loads(path.read_text())
    return data


# ---------------------------------------------------------------------------- load generators


def run_wrk(
    url: str, model: str, conns: int, seconds: float, core: int | None, timeout_s: int = 10
) -> dict[str, Any]:
    cmd = [
        *pin(core),
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        str(HERE / "post.lua"),
        url + CHAT,
    ]
    env = {**os.environ, "WRK_BODY": BODY % model, "WRK_AUTH": AUTH}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no WRKJSON line:\n{out}")
    raw: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
    lat = raw["latency_us"]
    errors = sum(raw["errors"].values())
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": lat["p50"] / 1000.0,
        "p99_ms": lat["p99"] / 1000.0,
        "errors": errors,
        "raw": raw,
    }


def run_sse(
    url: str, model: str, conc: int, seconds: float, warmup: float, core: int | None
) -> dict[str, Any]:
    cmd = [
        *pin(core),
        sys.executable,
        str(HERE / "sse_client.py"),
        "--url",
        url + CHAT,
        "--model",
        model,
        "--concurrency",
        str(conc),
        "--duration",
        str(seconds),
        "--warmup",
        str(warmup),
        "--keep",
        "200",
        "--client",
        SSE_CLIENT[0],
    ]
    env = {**os.environ, "BENCH_AUTH": AUTH}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    result: dict[str, Any] = json.loads(out)
    return result


# ---------------------------------------------------------------------------- environment


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    log("wrk is missing: apt-get install -y wrk")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)


def ensure_litellm() -> Path:
    exe = VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"creating {VENV} and installing {LITELLM_SPEC} (once; a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC],
        check=True,
    )
    return exe


def package_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("llmux", "uvicorn", "uvloop", "httptools", "aiohttp", "orjson", "fastapi"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def litellm_version() -> str | None:
    py = VENV / "bin" / "python"
    if not py.exists():
        return None
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("MemTotal")), "")
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "affinity_of_this_script": sorted(os.sched_getaffinity(0)),
        "memory": mem,
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "litellm": litellm_version(),
        "wrk": ((wrk.stdout + wrk.stderr).strip().splitlines() or [""])[0],
        "git_commit": git,
        "src_dirty": bool(dirty),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_quiet(threshold: float, max_wait: float) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) for the 1-minute load average to drop below ``threshold``."""
    start = time.monotonic()
    first = loadavg()
    while os.getloadavg()[0] > threshold and time.monotonic() - start < max_wait:
        time.sleep(2.0)
    waited = time.monotonic() - start
    if waited > 1:
        log(f"waited {waited:.0f} s for load to settle: {first} -> {loadavg()}")
    return {"before": first, "after": loadavg(), "waited_s": round(waited, 1)}


# ---------------------------------------------------------------------------- the bench


@dataclass
class Settings:
    repeats: int
    seconds: float
    warmup: float
    events: int
    stream_conc: int
    gateway_core: int | None
    client_core: int | None
    litellm: bool
    llmux_src: str | None
    alt_src: str | None
    bare: bool
    slow_ms: float


def llmux_config(tmp: Path, s: Settings, name: str) -> Path:
    upstream = f"{shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'upstream.py'))}"
    announce = tmp / f"{name}-fast.json"
    fast = f"{upstream} --port ${{PORT}} --events {s.events} --announce {announce}"
    slow = (
        f"{upstream} --port ${{PORT}} --events {s.events} --delay-ms {s.slow_ms:g}"
        f" --announce {tmp / f'{name}-slow.json'}"
    )
    text = f"""\
server:
  host: 127.0.0.1
  shutdown_grace: 2
  api_keys: [{API_KEY}]
gpu:
  vram_gb: 1
  reserve_gb: 0
models:
  bench:
    type: llm
    vram_gb: 0.1
    cmd: {json.dumps(fast)}
    health: /health
    ready_timeout: 60
    stop_timeout: 5
  bench-slow:
    type: llm
    vram_gb: 0.1
    cmd: {json.dumps(slow)}
    health: /health
    ready_timeout: 60
    stop_timeout: 5
"""
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def litellm_config(tmp: Path, upstream_port: int) -> Path:
    text = f"""\
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: sk-bench
general_settings:
  master_key: {API_KEY}
"""
    path = tmp / "litellm.yaml"
    path.write_text(text)
    return path


def launch_gateway(
    tmp: Path,
    name: str,
    cmd: list[str],
    port: int,
    *,
    tree: bool,
    answer_within: float,
    env: dict[str, str] | None = None,
    then: Callable[[], None] | None = None,
) -> tuple[Gateway, dict[str, Any]]:
    """Spawn a gateway (log in ``tmp/<name>.log``), time it to its first answered
    ``GET /v1/models`` and its first chat completion, then run ``then``. On any failure the
    gateway is stopped and its log's tail printed."""
    logf = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    gw = Gateway(name, proc, port, tree=tree)
    try:
        wait_answer(port, "/v1/models", t0 + answer_within, proc)
        ready = time.monotonic() - t0
        rss_ready = gw.rss()
        chat(port, "bench")
        first_chat = time.monotonic() - t0
        if then is not None:
            then()
    except BaseException:
        gw.stop()
        log_tail(tmp / f"{name}.log")
        raise
    startup = {
        "first_answer_s": ready,
        "first_completion_s": first_chat,
        "rss_ready_kib": rss_ready,
    }
    return gw, startup


def llmux_serve_argv(cfg: Path, port: int) -> list[str]:
    """``llmux serve`` on the bench config, quiet (warnings only)."""
    return [
        sys.executable,
        "-m",
        "llmux",
        "serve",
        "--config",
        str(cfg),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


def write_result(out_dir: Path, name: str, result: dict[str, Any]) -> Path:
    """``result`` as indented JSON in ``out_dir/name`` (the folder made if need be)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def start_llmux(
    tmp: Path, s: Settings, name: str = "llmux", src: str | None = None
) -> tuple[Gateway, dict[str, Any], dict[str, int]]:
    """Start ``llmux serve`` (from ``src`` if given), time it, and spawn both children."""
    for kind in ("fast", "slow"):
        (tmp / f"{name}-{kind}.json").unlink(missing_ok=True)
    port = free_port()
    cfg = llmux_config(tmp, s, name)
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [*pin(s.gateway_core), *llmux_serve_argv(cfg, port)]
    children: dict[str, dict[str, int]] = {}

    def spawn_children() -> None:  # the first chat spawned the fast one
        chat(port, "bench-slow")
        children["fast"] = read_announce(tmp / f"{name}-fast.json")
        children["slow"] = read_announce(tmp / f"{name}-slow.json")

    gw, startup = launch_gateway(
        tmp, name, cmd, port, env=env, tree=False, answer_within=60, then=spawn_children
    )
    fast, slow = children["fast"], children["slow"]
    if s.client_core is not None:  # children inherit llmux's core: move them to the client's
        for child in (fast, slow):
            set_affinity(process_tree(child["pid"]), s.client_core)
    return gw, startup, {"fast": fast["port"], "slow": slow["port"]}


def start_litellm(tmp: Path, s: Settings, upstream_port: int) -> tuple[Gateway, dict[str, Any]]:
    port = free_port()
    cfg = litellm_config(tmp, upstream_port)
    env = {
        **os.environ,
        # Offline machine: use the cost map shipped in the package instead of fetching it
        # (a failed fetch retries for seconds and would inflate LiteLLM's start time).
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
    }
    env.pop("PYTHONPATH", None)
    cmd = [
        *pin(s.gateway_core),
        str(VENV / "bin" / "litellm"),
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    return launch_gateway(tmp, "litellm", cmd, port, env=env, tree=True, answer_within=180)


def start_bare(
    tmp: Path, s: Settings, upstream_port: int, name: str = "bare"
) -> tuple[Gateway, dict[str, Any]]:
    """The reference relay of DESIGN §6 (bare_relay.py), pinned like a gateway."""
    port = free_port()
    cmd = [
        *pin(s.gateway_core),
        sys.executable,
        str(HERE / "bare_relay.py"),
        "--port",
        str(port),
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
    ]
    return launch_gateway(tmp, name, cmd, port, tree=False, answer_within=60)


def rotated(paths: list[str], r: int) -> list[str]:
    k = r % len(paths)
    return paths[k:] + paths[:k]


def one_repeat(r: int, tmp: Path, s: Settings) -> dict[str, Any]:
    rep: dict[str, Any] = {"repeat": r, "loadavg": {"start": loadavg()}, "startup": {}}
    gateways: list[Gateway] = []
    helpers: list[Gateway] = []  # stopped at the end, but not sampled for RSS
    try:
        llmux, rep["startup"]["llmux"], upstream = start_llmux(tmp, s, "llmux", s.llmux_src)
        gateways.append(llmux)
        base = {"direct": upstream["fast"], "llmux": llmux.port}
        slow = {"direct": upstream["slow"], "llmux": llmux.port}
        if s.alt_src:
            alt, rep["startup"]["llmux-alt"], _ = start_llmux(tmp, s, "llmux-alt", s.alt_src)
            gateways.append(alt)
            base["llmux-alt"] = slow["llmux-alt"] = alt.port
        if s.bare:
            bare, rep["startup"]["bare"] = start_bare(tmp, s, upstream["fast"])
            gateways.append(bare)
            base["bare"] = bare.port
            # The bare relay has one upstream: a second one relays to the 20 ms upstream.
            bare_slow, _ = start_bare(tmp, s, upstream["slow"], name="bare-slow")
            helpers.append(bare_slow)
            slow["bare"] = bare_slow.port
        if s.litellm:
            litellm, rep["startup"]["litellm"] = start_litellm(tmp, s, upstream["fast"])
            gateways.append(litellm)
            base["litellm"] = litellm.port
        if s.client_core is not None:
            base["direct-1core"] = upstream["fast"]
        order = rotated(list(base), r)
        rep["order"] = order

        def url(name: str) -> str:
            return f"http://127.0.0.1:{base[name]}"

        def core(name: str) -> int | None:
            """The load generator's core: ``direct`` runs it on the gateway core, so that as
            on every proxied path each client-server hop crosses cores (DESIGN §6's method)."""
            return s.gateway_core if name == "direct" else s.client_core

        # Warm every path (connections, lazy imports), then let it sit for the idle RSS.
        for name in order:
            for _ in range(50):
                chat(base[name], "bench")
        if s.seconds >= 2:
            for name in order:
                run_sse(url(name), "bench", 2, 0.5, 0, core(name))
        time.sleep(1.0)
        rep["rss_idle_kib"] = {g.name: g.rss() for g in gateways}

        for block in ("c1", "c16", "sse", "slow_c16", "c1_onecore"):
            rep[block] = {}
        for name in order:
            run_wrk(url(name), "bench", 1, s.warmup, core(name))
            rep["c1"][name] = run_wrk(url(name), "bench", 1, s.seconds, core(name))
        rep["loadavg"]["after_c1"] = loadavg()
        with RssSampler(gateways) as sampler:
            for name in order:
                run_wrk(url(name), "bench", 16, s.warmup, core(name))
                rep["c16"][name] = run_wrk(url(name), "bench", 16, s.seconds, core(name))
            rep["loadavg"]["after_c16"] = loadavg()
            for name in order:
                rep["sse"][name] = run_sse(
                    url(name), "bench", s.stream_conc, s.seconds, s.warmup, core(name)
                )
        rep["rss_load_kib"] = dict(sampler.peak)
        rep["loadavg"]["after_sse"] = loadavg()
        for name in rotated(list(slow), r):
            slow_url = f"http://127.0.0.1:{slow[name]}"
            run_wrk(slow_url, "bench-slow", 16, s.warmup, core(name))
            rep["slow_c16"][name] = run_wrk(slow_url, "bench-slow", 16, s.seconds, core(name))
        rep["loadavg"]["after_slow"] = loadavg()
        if s.client_core is not None and s.gateway_core is not None:
            # c=1 with everything on one core: no cross-core wake-ups (costly and erratic on
            # these VMs), so this shows the gateway's own CPU time per request, steadily.
            by_name = {g.name: g for g in gateways}
            for name in order:
                if name == "direct":
                    continue
                gw = by_name.get(name)
                if gw is not None:
                    set_affinity(gw.own_pids(), s.client_core)
                try:
                    run_wrk(url(name), "bench", 1, s.warmup, s.client_core)
                    rep["c1_onecore"][name] = run_wrk(
                        url(name), "bench", 1, s.seconds, s.client_core
                    )
                finally:
                    if gw is not None:
                        set_affinity(gw.own_pids(), s.gateway_core)
        rep["loadavg"]["end"] = loadavg()
        rep["rss_after_kib"] = {g.name: g.rss() for g in gateways}
    finally:
        for g in reversed(gateways + helpers):
            g.stop()
    return rep


# ---------------------------------------------------------------------------- summary


def med(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


RATIO_PAIRS = [
    ("llmux", "direct"),
    ("llmux", "direct-1core"),
    ("llmux", "litellm"),
    ("llmux-alt", "direct"),
    ("llmux-alt", "llmux"),
    ("llmux", "bare"),
    ("bare", "direct"),  # the floor of a uvicorn + aiohttp relay, in the same window
]
ONECORE_ONLY = {"direct-1core"}
"""Ratios against these are given only for the one-core c=1 block (the layouts differ)."""
RATIO_METRICS = {
    "rps_c1": ("c1", "rps"),
    "p50_ms_c1": ("c1", "p50_ms"),
    "rps_c16": ("c16", "rps"),
    "streams_per_s_c8": ("sse", "streams_per_s"),
    "slow_rps_c16": ("slow_c16", "rps"),
    "rps_c1_onecore": ("c1_onecore", "rps"),
}
LABELS = {
    "direct": "direct",
    "direct-1core": "direct, 1 core",
    "llmux": "llmux",
    "llmux-alt": "llmux-alt",
    "bare": "bare relay",
    "litellm": "LiteLLM",
}


def summarize(reps: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[str, float | None]] = {}

    def row(metric: str, getter: Callable[[dict[str, Any], str], Any]) -> None:
        rows[metric] = {}
        for path in paths:
            vals = []
            for rep in reps:
                with contextlib.suppress(KeyError, TypeError):
                    vals.append(float(getter(rep, path)))
            rows[metric][path] = med(vals)

    row("rps_c1", lambda rep, p: rep["c1"][p]["rps"])
    row("p50_ms_c1", lambda rep, p: rep["c1"][p]["p50_ms"])
    row("p99_ms_c1", lambda rep, p: rep["c1"][p]["p99_ms"])
    row("rps_c1_onecore", lambda rep, p: rep["c1_onecore"][p]["rps"])
    row("p50_ms_c1_onecore", lambda rep, p: rep["c1_onecore"][p]["p50_ms"])
    row("p99_ms_c1_onecore", lambda rep, p: rep["c1_onecore"][p]["p99_ms"])
    row(
        "added_p50_ms_c1_onecore",
        lambda rep, p: rep["c1_onecore"][p]["p50_ms"] - rep["c1_onecore"]["direct-1core"]["p50_ms"],
    )
    row("rps_c16", lambda rep, p: rep["c16"][p]["rps"])
    row("p50_ms_c16", lambda rep, p: rep["c16"][p]["p50_ms"])
    row("p99_ms_c16", lambda rep, p: rep["c16"][p]["p99_ms"])
    row("streams_per_s_c8", lambda rep, p: rep["sse"][p]["streams_per_s"])
    row("ttfc_p50_ms_c8", lambda rep, p: rep["sse"][p]["ttfc_ms"]["p50"])
    row("ttfc_p99_ms_c8", lambda rep, p: rep["sse"][p]["ttfc_ms"]["p99"])
    row("ttlc_p50_ms_c8", lambda rep, p: rep["sse"][p]["ttlc_ms"]["p50"])
    row("ttlc_p99_ms_c8", lambda rep, p: rep["sse"][p]["ttlc_ms"]["p99"])
    row("slow_rps_c16", lambda rep, p: rep["slow_c16"][p]["rps"])
    row("slow_p50_ms_c16", lambda rep, p: rep["slow_c16"][p]["p50_ms"])
    row("rss_ready_mib", lambda rep, p: rep["startup"][p]["rss_ready_kib"] / MIB)
    row("rss_idle_mib", lambda rep, p: rep["rss_idle_kib"][p] / MIB)
    row("rss_load_mib", lambda rep, p: rep["rss_load_kib"][p] / MIB)
    row("rss_after_mib", lambda rep, p: rep["rss_after_kib"][p] / MIB)
    row("first_answer_s", lambda rep, p: rep["startup"][p]["first_answer_s"])
    row("first_completion_s", lambda rep, p: rep["startup"][p]["first_completion_s"])
    row(
        "added_p50_ms_c1",
        lambda rep, p: rep["c1"][p]["p50_ms"] - rep["c1"]["direct"]["p50_ms"],
    )

    ratios: dict[str, float | None] = {}
    for num, den in RATIO_PAIRS:
        if num not in paths or den not in paths:
            continue
        for metric, (section, key) in RATIO_METRICS.items():
            if (den in ONECORE_ONLY) != (section == "c1_onecore"):
                continue
            vals = []
            for rep in reps:
                with contextlib.suppress(KeyError, ZeroDivisionError, TypeError):
                    vals.append(rep[section][num][key] / rep[section][den][key])
            if vals:
                ratios[f"{metric}:{num}/{den}"] = med(vals)

    goal_values = {
        "added_p50_ms_c1": rows["added_p50_ms_c1"]["llmux"],
        "rps_ratio_c1": ratios.get("rps_c1:llmux/direct"),
        "rps_ratio_c16": ratios.get("rps_c16:llmux/direct"),
        "streams_ratio_c8": ratios.get("streams_per_s_c8:llmux/direct"),
        "idle_rss_mib": rows["rss_idle_mib"]["llmux"],
        "first_answer_s": rows["first_answer_s"]["llmux"],
        "slow_rps_ratio_c16": ratios.get("slow_rps_c16:llmux/direct"),
    }
    goals = []
    for key, text, op, limit in GOALS:
        value = goal_values[key]
        if value is None:
            ok = None
        elif op == "<=":
            ok = value <= limit
        elif op == "<":
            ok = value < limit
        else:
            ok = value >= limit
        goals.append({"key": key, "goal": f"{text} {op} {limit:g}", "value": value, "pass": ok})
    errors = {
        p: sum(
            int(rep[sec][p].get("errors", 0))
            for rep in reps
            for sec in ("c1", "c16", "sse", "slow_c16", "c1_onecore")
            if p in rep.get(sec, {})
        )
        for p in paths
    }
    return {"medians": rows, "ratios": ratios, "goals": goals, "errors": errors}


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    summ = result["summary"]
    rows, ratios = summ["medians"], summ["ratios"]
    paths = result["paths"]
    lines = [
        f"# Gateway overhead, {result['date']}",
        "",
        f"`{result['command']}` — {result['settings']['repeats']} repeats, medians; "
        f"{result['settings']['seconds']:g} s per measurement after "
        f"{result['settings']['warmup']:g} s warm-up; ratios are medians of per-repeat"
        " ratios (same window).",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs; "
        f"load average (1, 5, 15 min) at start {result['loadavg_start']}, at end "
        f"{result['loadavg_end']}. Pinning: {result['pinning']}.",
        "",
    ]
    pairs = [(n, d) for n, d in RATIO_PAIRS if n in paths and d in paths]
    head = ["metric", *(LABELS[p] for p in paths), *(f"{LABELS[n]}/{LABELS[d]}" for n, d in pairs)]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    conc, events = result["settings"]["stream_conc"], result["settings"]["events"]
    slow_ms = result["settings"]["slow_ms"]
    for metric, label in [
        ("rps_c1", "req/s, c=1"),
        ("p50_ms_c1", "p50 ms, c=1"),
        ("p99_ms_c1", "p99 ms, c=1"),
        ("added_p50_ms_c1", "added p50 ms, c=1"),
        ("rps_c1_onecore", "req/s, c=1, all on one core"),
        ("p50_ms_c1_onecore", "p50 ms, c=1, all on one core"),
        ("p99_ms_c1_onecore", "p99 ms, c=1, all on one core"),
        ("added_p50_ms_c1_onecore", "added p50 ms, c=1, all on one core"),
        ("rps_c16", "req/s, c=16"),
        ("p50_ms_c16", "p50 ms, c=16"),
        ("p99_ms_c16", "p99 ms, c=16"),
        ("streams_per_s_c8", f"streams/s, c={conc} ({events} events)"),
        ("ttfc_p50_ms_c8", "time to first chunk p50 ms"),
        ("ttfc_p99_ms_c8", "time to first chunk p99 ms"),
        ("ttlc_p50_ms_c8", "time to last chunk p50 ms"),
        ("ttlc_p99_ms_c8", "time to last chunk p99 ms"),
        ("slow_rps_c16", f"req/s, c=16, {slow_ms:g} ms upstream"),
        ("slow_p50_ms_c16", f"p50 ms, c=16, {slow_ms:g} ms upstream"),
        ("rss_ready_mib", "RSS at first answer, MiB"),
        ("rss_idle_mib", "idle RSS after warm-up, MiB"),
        ("rss_load_mib", "peak RSS under load, MiB"),
        ("first_answer_s", "start to first answered GET /v1/models, s"),
        ("first_completion_s", "start to first chat completion, s"),
    ]:
        cells = [label, *(fmt(rows[metric].get(p)) for p in paths)]
        for n, d in pairs:
            value = ratios.get(f"{metric}:{n}/{d}")
            cells.append("" if value is None else fmt(value) + "x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Direct has no RSS or start-up figures (the upstream is not a gateway). Goals are checked"
        " against `direct` (cross-core, as DESIGN §6 measured it); same-core direct is"
        " 2-3x faster at c=1, see the 'all on one core' rows. llmux's RSS is the"
        " gateway process alone (its children are the upstreams); LiteLLM's is its whole process"
        " tree. llmux's first chat completion includes spawning the upstream child (no pinned"
        " models); LiteLLM's upstream is already running.",
        "",
        "## Goals (issue 5)",
        "",
        "| goal | measured | result |",
        "|---|---|---|",
    ]
    for g in summ["goals"]:
        verdict = "-" if g["pass"] is None else ("pass" if g["pass"] else "**FAIL**")
        lines.append(f"| {g['goal']} | {fmt(g['value'], 3)} | {verdict} |")
    lines += ["", "## Per repeat", ""]
    names = " / ".join(LABELS[p] for p in paths)
    slow_paths = [p for p in paths if any(p in rep["slow_c16"] for rep in result["repeats"])]
    lines += [
        f"| repeat | order | load avg start/end | req/s c=1 ({names}) | req/s c=16 ({names})"
        f" | streams/s ({names}) | slow req/s ({' / '.join(LABELS[p] for p in slow_paths)}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rep in result["repeats"]:

        def trio(sec: str, key: str, rep: dict[str, Any] = rep) -> str:
            return " / ".join(fmt(rep[sec][p][key]) for p in paths if p in rep[sec])

        lines.append(
            f"| {rep['repeat']} | {', '.join(rep['order'])} | {rep['loadavg']['start'][0]} / "
            f"{rep['loadavg']['end'][0]} | {trio('c1', 'rps')} | {trio('c16', 'rps')} | "
            f"{trio('sse', 'streams_per_s')} | {trio('slow_c16', 'rps')} |"
        )
    errs = summ["errors"]
    lines += ["", f"Failed requests/streams over the whole run: {errs}."]
    versions = result["machine"]["packages"]
    lines += [
        "",
        f"Versions: llmux {versions.get('llmux')} (commit {result['machine']['git_commit'][:10]}"
        f"{', src modified' if result['machine']['src_dirty'] else ''}), uvicorn"
        f" {versions.get('uvicorn')}, aiohttp {versions.get('aiohttp')}, LiteLLM"
        f" {result['machine']['litellm']}, {result['machine']['wrk']}.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- profile


def profile(tmp: Path, s: Settings, stamp: str, out_dir: Path) -> dict[str, Any]:
    """py-spy on llmux under wrk c=16 and SSE c=8: collapsed stacks plus the top frames."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        log("py-spy not found (pip install py-spy): skipping the profile")
        return {}
    gw, _, _ = start_llmux(tmp, s, "llmux", s.llmux_src)
    out: dict[str, Any] = {}
    try:
        url = f"http://127.0.0.1:{gw.port}"
        run_wrk(url, "bench", 16, 1, s.client_core)
        for kind in ("nonstream", "stream"):
            path = out_dir / f"overhead-{stamp}-profile-{kind}.txt"
            seconds = max(4, round(s.seconds * 2))
            spy = subprocess.Popen(
                [
                    *pin(s.client_core),
                    pyspy,
                    "record",
                    "--pid",
                    str(gw.proc.pid),
                    "--duration",
                    str(seconds + 1),
                    "--rate",
                    "100",  # blocking samples (consistent stacks); 100 Hz keeps the cost low
                    "--format",
                    "raw",
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            if kind == "nonstream":
                res = run_wrk(url, "bench", 16, seconds, s.client_core)
            else:
                res = run_sse(url, "bench", s.stream_conc, seconds, 0, s.client_core)
            spy.wait()
            out[kind] = {"file": str(path), "load": res, **top_frames(path)}
    finally:
        gw.stop()
    return out


def top_frames(path: Path, n: int = 30) -> dict[str, Any]:
    """Self and inclusive sample shares per frame, and self share per source file, from
    py-spy's collapsed output."""
    if not path.exists():
        return {}
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    by_file: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            continue  # another thread (an idle anyio worker of the control plane): not the loop
        count = int(count_s)
        total += count
        leaf = frames[-1]
        self_c[leaf] = self_c.get(leaf, 0) + count
        where = leaf[leaf.rfind("(") + 1 :].rsplit(":", 1)[0] if "(" in leaf else leaf
        by_file[where] = by_file.get(where, 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])
        return [(k, round(100.0 * v / max(total, 1), 2)) for k, v in ranked][:n]

    return {
        "samples": total,
        "self_pct_by_file": top(by_file),
        "self_pct": top(self_c),
        "inclusive_pct": top(incl),
    }


# ---------------------------------------------------------------------------- main


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="llmux-overhead-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gateway-overhead bench (issue 5, part B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--seconds", type=float, help="per measurement (default 5, quick 1)")
    parser.add_argument("--events", type=int, default=34, help="SSE events per stream")
    parser.add_argument("--stream-concurrency", type=int, default=8)
    parser.add_argument(
        "--sse-client", choices=("raw", "aiohttp"), default="raw", help="see sse_client.py"
    )
    parser.add_argument("--slow-ms", type=float, default=20.0)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument(
        "--no-bare", action="store_true", help="skip bare_relay.py (the DESIGN §6 floor)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--gateway-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also py-spy llmux under load")
    parser.add_argument(
        "--llmux-src", help="a src/ folder put first on llmux's PYTHONPATH (A/B experiments)"
    )
    parser.add_argument(
        "--alt-src",
        help="a src/ folder for a second llmux measured alongside as path 'llmux-alt' (A/B)",
    )
    parser.add_argument("--quiet-load", type=float, default=1.5, help="wait for loadavg below")
    parser.add_argument("--max-wait", type=float, default=60.0, help="longest wait for quiet")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    args = parser.parse_args(argv)

    SSE_CLIENT[0] = args.sse_client
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 5.0)
    s = Settings(
        repeats=args.repeats,
        seconds=seconds,
        warmup=0.5 if args.quick else 1.0,
        events=args.events,
        stream_conc=args.stream_concurrency,
        gateway_core=args.gateway_core if pinned else None,
        client_core=args.client_core if pinned else None,
        litellm=not args.no_litellm,
        llmux_src=str(Path(args.llmux_src).resolve()) if args.llmux_src else None,
        alt_src=str(Path(args.alt_src).resolve()) if args.alt_src else None,
        bare=not args.no_bare,
        slow_ms=args.slow_ms,
    )
    if s.client_core is not None:
        os.sched_setaffinity(0, {s.client_core})
    ensure_wrk()
    if s.litellm:
        ensure_litellm()
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now()
    stamp = now.strftime("%Y-%m-%d-%H%M%S") + (f"-{args.tag}" if args.tag else "")
    quiet = wait_quiet(args.quiet_load, args.max_wait)
    started = time.monotonic()
    paths = ["direct", *(["direct-1core"] if s.client_core is not None else []), "llmux"]
    paths += ["llmux-alt"] if s.alt_src else []
    paths += ["bare"] if s.bare else []
    paths += ["litellm"] if s.litellm else []
    reps = []
    with scratch_dir() as tmp:
        for r in range(s.repeats):
            log(f"repeat {r + 1}/{s.repeats} (load {loadavg()})")
            rep = one_repeat(r, tmp, s)
            reps.append(rep)
            log(
                "  req/s c=1 "
                + ", ".join(f"{p} {rep['c1'][p]['rps']:.0f}" for p in rep["order"])
                + " | c=16 "
                + ", ".join(f"{p} {rep['c16'][p]['rps']:.0f}" for p in rep["order"])
                + " | streams/s "
                + ", ".join(f"{p} {rep['sse'][p]['streams_per_s']:.0f}" for p in rep["order"])
            )
        prof = profile(tmp, s, stamp, out_dir) if args.profile else None
    pinning = (
        f"each gateway on core {s.gateway_core} (`taskset -c {s.gateway_core}`); the upstreams"
        f" (re-pinned with sched_setaffinity after llmux spawns them, every thread), wrk, the SSE"
        f" client and this driver on core {s.client_core}. `direct` runs wrk/the SSE client on"
        f" core {s.gateway_core} against the upstream on core {s.client_core}, so that, as on"
        " the proxied paths, every client-server hop crosses cores (the method of DESIGN §6);"
        f" `direct, 1 core` runs both on core {s.client_core}. The 'all on one core' rows move"
        f" the gateway to core {s.client_core} too (no cross-core wake-ups)"
        if s.client_core is not None
        else "none"
    )
    result: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "settings": s.__dict__,
        "pinning": pinning,
        "machine": machine_info(),
        "quiet_wait": quiet,
        "loadavg_start": quiet["after"],
        "loadavg_end": loadavg(),
        "wall_s": round(time.monotonic() - started, 1),
        "paths": paths,
        "repeats": reps,
        "summary": summarize(reps, paths),
    }
    if prof is not None:
        result["profile"] = prof
    json_path = out_dir / f"overhead-{stamp}.json"
    md_path = out_dir / f"overhead-{stamp}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    log(f"wrote {json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path}")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
