"""Check sleeping models (DESIGN rules 11-13) on a real NVIDIA GPU, with NVML.

    PYTHONPATH=src python3 bench/gpu/check_sleep.py [--keep]        # OUT=dir for the results
    PYTHONPATH=src python3 bench/gpu/check_sleep.py --no-gpu        # the same steps, no GPU

Runs `llmux serve` over two sleepable stand-ins (``bench/gpu/sleepy_torch.py``: torch holds W GB
of "weights" and K GB of "cache" on the GPU and serves vLLM's sleep API for real), ``a`` with
``sleep: {level: 1}`` and ``b`` with ``sleep: {level: 2}``, whose sizes do not fit together, on
a card that another program (a "hog", ``vram_child.py``) fills but F GB for the whole run, and
checks, reading NVML itself:

1. ``a`` loads cold (its weights read from disk) and NVML shows its memory;
2. a request for ``b`` evicts ``a`` by sleep: ``a`` is ``sleeping`` with the same pid, NVML shows
   its memory freed down to its residual (the CUDA context), and ``b`` loads into the freed
   memory (it could not have fitted beside ``a`` awake);
3. a request for ``a`` wakes it (``b`` sleeps): the same process answers with the checksum of its
   weights from before the sleep, and the wake (request to answer, and llmux's
   ``llmux_model_wake_seconds``) is much faster than ``a``'s cold start;
4. llmux's learned residual (``/status`` ``residual_gb``, measured after the sleep) is NVML's;
5. an admin ``POST /models/a/sleep``, then a request for ``b``: its level-2 wake reloads the
   weights from disk (checksum equal), slower than ``a``'s level-1 wake, faster than cold;
6. llmux never relayed to a sleeping engine, each model ran in one process all along, and
   nothing of ours is left on the GPU at the end.

Sizes are for a card with >= 23 GB free (W = 10, K = 2, F = 20, budget 19); smaller cards
scale down. It writes the weights files (2 W GB) to a temporary directory and removes them. It
prints PASS/FAIL lines, writes ``$OUT/sleep-check.json``, ``$OUT/sleep-check.txt`` and the llmux
log when ``OUT`` is set, exits 0 if every check passed, 1 if one failed, 2 when it cannot check
(no NVML, no torch with CUDA, or llmux's dependencies missing). It takes about two minutes and
stops everything it started, also on an error or after DEADLINE_S (300 s).

``--no-gpu`` runs the same steps with the stand-in's bytearray backend (no torch), tiny sizes,
no hog and no NVML: the checks that need NVML or real timings are skipped (SKIP). The tests run
it to prove the script itself before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STANDIN = HERE / "sleepy_torch.py"
HOG = HERE / "vram_child.py"
DEADLINE_S = 300
"""The steps stop here (about twice what they take); the cleanup after them is bounded by its
own waits (~90 s at worst), inside the device tool's ``timeout_s`` of 420."""
CANNOT_CHECK = 2
SEED = {"a": 11, "b": 22}
LEVEL = {"a": 1, "b": 2}
CTX_GB = 0.75
"""What a stand-in's CUDA context (and allocator slack) adds to its weights + cache."""
RESIDUAL_MAX_GB = 1.5
"""A sleeping stand-in holds at most this (its CUDA context) on the GPU."""
RESIDUAL_TOLERANCE_GB = 0.15
"""llmux's learned residual vs NVML's reading of the same process."""
WAKE_SPEEDUP_MIN = 3.0
"""A level-1 wake at least this many times faster than a cold start ("much faster")."""
MIB_GB = (1 << 20) / 1e9
BASE = {"free": 20.0, "budget": 19.0, "weights": 10.0, "cache": 2.0}
"""GB on a card with at least 23 GB free, scaled down on smaller ones."""
MIN_SCALE = 0.5
"""Below it a model beside two sleepers' contexts no longer fits what the hog leaves."""


# ------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """GB. ``free`` is what the hog leaves on the card; llmux's budget is ``budget``."""

    free: float
    budget: float
    weights: float
    cache: float
    ctx: float
    """The CUDA context (and allocator slack) each stand-in adds: part of its configured size."""
    residual_conf: float
    """Configured ``sleep.residual_gb``: below the real one, so that llmux must learn it."""
    residual_max: float
    host_budget: float
    scale: float = 1.0

    @property
    def model_conf(self) -> float:
        """Each model's configured ``vram_gb``: weights + cache + context."""
        return self.weights + self.cache + self.ctx

    @classmethod
    def for_card(cls, free_gb: float, host_available_gb: float | None) -> Sizes | None:
        """Sizes for a card with ``free_gb`` free (the hog takes all but ``free``) and a host
        with ``host_available_gb`` available (the level-1 copy is pinned there, and the page
        cache holds the weights files); None if too small."""
        scale = min(1.0, (free_gb - 3.0) / BASE["free"])
        if host_available_gb is not None:
            scale = min(scale, (host_available_gb - 6.0) / (1.5 * BASE["weights"]))
        if scale < MIN_SCALE:
            return None
        weights = round(BASE["weights"] * scale, 3)
        return cls(
            free=round(BASE["free"] * scale, 3),
            budget=round(BASE["budget"] * scale, 3),
            weights=weights,
            cache=round(BASE["cache"] * scale, 3),
            ctx=CTX_GB,
            residual_conf=0.25,
            residual_max=RESIDUAL_MAX_GB,
            host_budget=round(weights + 1.0, 3),
            scale=round(scale, 4),
        )

    @classmethod
    def no_gpu(cls) -> Sizes:
        """Tiny sizes for the bytearray stand-ins (``--no-gpu``): the same relations."""
        return cls(
            free=0.025,
            budget=0.025,
            weights=8 * MIB_GB,  # whole MiB: what the stand-in holds is exactly this
            cache=2 * MIB_GB,
            ctx=0.003,
            residual_conf=0.001,
            residual_max=0.0,
            host_budget=0.01,
        )

    def problems(self) -> list[str]:
        """What keeps these sizes from checking what they must (empty: good)."""
        out = []
        held = self.weights + self.cache
        if 2 * self.model_conf <= self.budget:
            out.append("both models fit llmux's budget together: nothing would be evicted")
        if self.model_conf + max(self.residual_conf, self.residual_max) > self.budget:
            out.append("a model and a sleeper's residual do not fit the budget")
        if self.budget > self.free:
            out.append("llmux's budget is more than the card leaves free")
        if self.residual_max and 2 * held + 2 * 0.3 <= self.free:
            out.append("both models fit the card together: the sleep would not be needed")
        if self.residual_max and held + self.ctx + 2 * self.residual_max > self.free:
            out.append("a model beside two sleepers does not fit the card")
        if self.host_budget < self.weights:
            out.append("the host budget cannot hold a level-1 copy of the weights")
        return out


# ------------------------------------------------------------------------------ report


@dataclass
class Check:
    name: str
    ok: bool | None
    """None: skipped (needs NVML or real timings, under --no-gpu)."""
    detail: str


@dataclass
class Report:
    mode: str = "gpu"
    device: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    statuses: dict[str, Any] = field(default_factory=dict)
    standins: dict[str, Any] = field(default_factory=dict)
    llmux_events: list[dict[str, Any]] = field(default_factory=list)
    learned_json: Any = None
    checks: list[Check] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def check(self, name: str, ok: bool, detail: str, *, needs: str = "") -> bool:
        """Record a check; ``needs`` ("nvml" or "timing") marks one skipped under --no-gpu."""
        if needs and self.mode == "no-gpu":
            self.checks.append(Check(name, None, f"skipped without a GPU ({needs}): {detail}"))
            self.say(f"SKIP {name}: {detail}")
            return True
        self.checks.append(Check(name, ok, detail))
        self.say(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        return ok

    def info(self, text: str) -> None:
        self.say(f"     {text}")

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]


class CannotCheck(Exception):
    """This machine cannot run the check (no NVML, no CUDA, missing packages): exit 2."""


# ------------------------------------------------------------------------------- probes


class Probe(Protocol):
    """What the script reads about GPU memory: NVML, or the stand-ins' own accounts."""

    def free_gb(self) -> float | None: ...

    def process_gb(self, pids: Collection[int]) -> float: ...

    def processes(self) -> set[int]: ...


class NvmlReader:
    """NVML through llmux's own probe (``llmux.gpu.NvmlProbe``)."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe

    def free_gb(self) -> float | None:
        return float(self.probe.free_gb())

    def process_gb(self, pids: Collection[int]) -> float:
        return float(self.probe.process_gb(pids))

    def processes(self) -> set[int]:
        return set(self.probe.processes())


class StatsReader:
    """Without a GPU: each stand-in's own account of its "device" bytes (its --stats file)."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks

    def _stats(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.marks.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out

    def free_gb(self) -> float | None:
        return None

    def process_gb(self, pids: Collection[int]) -> float:
        return float(sum(s["device_bytes"] for s in self._stats() if s["pid"] in pids)) / 1e9

    def processes(self) -> set[int]:
        return {int(s["pid"]) for s in self._stats() if alive(int(s["pid"]))}


class Sampler(threading.Thread):
    """NVML free memory every 20 ms while the check runs: (time.time(), GB)."""

    def __init__(self, probe: Probe) -> None:
        super().__init__(daemon=True)
        self.probe = probe
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            free = self.probe.free_gb()
            if free is None:
                return
            self.samples.append((time.time(), free))
            self._stop_event.wait(0.02)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)

    def free_at(self, when: float) -> float | None:
        found = None
        for t, free in list(self.samples):
            if t > when:
                break
            found = free
        return found


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(cond: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def near(a: float | None, b: float, tol: float) -> bool:
    return a is not None and abs(a - b) <= tol


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` in Prometheus text whose labels include ``labels``;
    None if there is none."""
    total = None
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if not found or found.group(1) != name:
            continue
        have = dict(_LABEL.findall(found.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            with contextlib.suppress(ValueError):
                total = (total or 0.0) + float(found.group(3))
    return total


def histogram_delta(before: str, after: str, name: str, model: str) -> tuple[float | None, int]:
    """The mean of the observations of histogram ``name`` for ``model`` between two scrapes,
    and how many there were."""
    counts = [metric(t, f"{name}_count", model=model) or 0.0 for t in (before, after)]
    sums = [metric(t, f"{name}_sum", model=model) or 0.0 for t in (before, after)]
    n = round(counts[1] - counts[0])
    return ((sums[1] - sums[0]) / n if n > 0 else None), n


def checksum_of(answer: dict[str, Any]) -> str | None:
    try:
        text = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    found = re.search(r"checksum=([0-9a-f]+)", str(text))
    return found.group(1) if found else None


def host_available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- processes


class Llmux:
    """One `llmux serve` subprocess (own process group) and an HTTP client for it."""

    def __init__(self, config: Path, log: Path) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("HF_HUB_OFFLINE", "1")
        argv = [sys.executable, "-m", "llmux", "serve", "--config", str(config)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*argv, "--port", str(self.port), "--log-format", "json"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.http = httpx.Client(base_url=self.url, timeout=240)
        try:
            if not wait_for(self._healthy, 60, 0.1):
                raise RuntimeError(f"llmux did not start; its log:\n{self.tail(40)}")
        except BaseException:
            self.http.close()
            self.kill()
            raise

    def _healthy(self) -> bool:
        import httpx

        if self.proc.poll() is not None:
            raise RuntimeError(f"llmux exited at start; its log:\n{self.tail(40)}")
        try:
            return self.http.get("/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self, n: int) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/status").raise_for_status().json()
        return body

    def model(self, model_id: str) -> dict[str, Any]:
        found: dict[str, Any] = next(m for m in self.status()["models"] if m["id"] == model_id)
        return found

    def metrics(self) -> str:
        text: str = self.http.get("/metrics").text
        return text

    def chat(self, model_id: str) -> tuple[int, dict[str, Any], float]:
        """Status, body and seconds from request to answer."""
        t0 = time.perf_counter()
        resp = self.http.post(
            "/v1/chat/completions",
            json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]},
        )
        took = time.perf_counter() - t0
        try:
            body = resp.json()
        except ValueError:
            body = {"text": resp.text[:500]}
        return resp.status_code, body if isinstance(body, dict) else {"body": body}, took

    def post(self, path: str) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        resp = self.http.post(path)
        return resp.status_code, resp.text[:300], time.perf_counter() - t0

    def stop(self) -> int | None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Hog:
    """Another program's memory for the whole run: all the card but ``leave_gb``."""

    def __init__(self, leave_gb: float, hold_s: float, marks: Path) -> None:
        self.marks = marks
        argv = [sys.executable, str(HOG), "--name", "hog", "--leave-gb", f"{leave_gb:.3f}"]
        argv += ["--hold", str(hold_s), "--marks", str(marks)]
        self.proc = subprocess.Popen(argv, start_new_session=True)

    def wait_allocated(self, timeout: float = 120) -> None:
        def allocated() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hog exited with status {self.proc.returncode}")
            return (self.marks / "hog.allocated").exists()

        if not wait_for(allocated, timeout, 0.1):
            raise RuntimeError(f"the hog did not allocate in {timeout} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def standin_argv(name: str, sizes: Sizes, work: Path, backend: str) -> list[str]:
    argv = [sys.executable, str(STANDIN), "--name", name, "--gb", str(sizes.weights)]
    argv += ["--seed", str(SEED[name]), "--weights-file", str(work / f"{name}.weights")]
    return [*argv, "--backend", backend]


def prepare(report: Report, sizes: Sizes, work: Path, backend: str) -> dict[str, str]:
    """Write each model's weights file (a cold start reads it, a level-2 wake too); return
    their checksums."""
    sums = {}
    for name in ("a", "b"):
        argv = [*standin_argv(name, sizes, work, backend), "--prepare"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
        if proc.returncode == 3:
            raise CannotCheck(f"no torch with CUDA for the stand-ins: {proc.stderr.strip()}")
        if proc.returncode != 0:
            raise RuntimeError(f"preparing {name}'s weights failed: {proc.stderr[-2000:]}")
        done = json.loads(proc.stdout.strip().splitlines()[-1])
        report.prepared[name] = done
        report.info(
            f"{name}'s weights: {done['bytes'] / 1e9:.2f} GB written in {done['write_s']} s, "
            f"checksum {done['checksum']}"
        )
        sums[name] = str(done["checksum"])
    return sums


def write_config(path: Path, sizes: Sizes, work: Path, backend: str, cold_extra: float) -> None:
    def model(name: str) -> dict[str, Any]:
        argv = standin_argv(name, sizes, work, backend)
        argv += ["--cache-gb", str(sizes.cache), "--stats", str(work / "marks" / f"{name}.json")]
        if cold_extra:
            argv += ["--cold-start-s", str(cold_extra)]
        sleep: dict[str, Any] = {
            "level": LEVEL[name],
            "residual_gb": sizes.residual_conf,
            "api": "vllm",
        }
        if LEVEL[name] == 1:
            sleep["host_gb"] = sizes.weights
        return {
            "type": "llm",
            "vram_gb": round(sizes.model_conf, 4),
            "cmd": shlex.join(argv) + " --port ${PORT}",
            "ready_timeout": "180s",
            "stop_timeout": "20s",
            "sleep": sleep,
        }

    config = {
        "server": {"state_dir": str(work / "state"), "queue_timeout": "240s"},
        "gpu": {"vram_gb": sizes.budget, "reserve_gb": 0, "free_wait": "60s"},
        "host": {"ram_gb": sizes.host_budget},
        "models": {"a": model("a"), "b": model("b")},
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML


def read_stats(work: Path, name: str) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = json.loads((work / "marks" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return stats


def calls(stats: dict[str, Any], op: str) -> list[dict[str, Any]]:
    return [c for c in stats.get("calls", []) if c.get("op") == op]


# -------------------------------------------------------------------------------- steps


@dataclass
class Run:
    """What the steps share."""

    report: Report
    sizes: Sizes
    probe: Probe
    sampler: Sampler | None
    llmux: Llmux
    work: Path
    prepared: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)
    """Each model's process as llmux first showed it."""
    seen: set[int] = field(default_factory=set)
    """Every pid llmux showed, and the stand-ins' own: all must be gone at the end."""
    checksums: dict[str, str | None] = field(default_factory=dict)

    def gb(self, name: str) -> float:
        return self.probe.process_gb([self.pids[name]])

    def settled_gb(self, name: str, at_most: float, timeout: float = 10) -> float:
        """The process's GB once it is at most ``at_most`` (NVML may show a free late), or
        the last reading after ``timeout``."""
        value = wait_for(lambda: (g := self.gb(name)) <= at_most and (g, True), timeout, 0.05)
        return float(value[0]) if value else self.gb(name)

    def state(self, name: str) -> dict[str, Any]:
        model = self.llmux.model(name)
        if model.get("pid") is not None:
            self.seen.add(int(model["pid"]))
        return model


def step_cold(run: Run) -> None:
    """1. ``a`` loads cold; NVML shows its memory; its answer has the weights it loaded."""
    r, s, llmux = run.report, run.sizes, run.llmux
    before = llmux.metrics()
    code, text, took = llmux.post("/models/a/load")
    r.check("a loads", code == 200, f"{code} {text} in {took:.2f} s")
    load_s, _ = histogram_delta(before, llmux.metrics(), "llmux_model_load_seconds", "a")
    a = run.state("a")
    run.pids["a"] = int(a["pid"])
    held = run.gb("a")
    r.memory["a_awake_gb"] = held
    r.check(
        "NVML shows a's weights and cache",
        s.weights + s.cache - 1e-6 <= held <= s.weights + s.cache + s.residual_max + 1e-6,
        f"{held:.3f} GB for {s.weights:.2f} + {s.cache:.2f} GB (+ its CUDA context)",
    )
    code, body, _ = llmux.chat("a")
    run.checksums["a"] = checksum_of(body)
    r.check(
        "a's answer has the weights it read from disk",
        code == 200 and run.checksums["a"] == run.prepared["a"],
        f"{code}: checksum {run.checksums['a']}, the file's {run.prepared['a']}",
    )
    cold = read_stats(run.work, "a").get("cold", {})
    r.timings["a_cold"] = {"request_s": took, "llmux_load_s": load_s, "standin": cold}
    r.info(
        f"a's cold start: {took:.2f} s request to answer, llmux_model_load_seconds {load_s}, "
        f"the stand-in's own {cold.get('total_s')} s (import {cold.get('import_s')}, CUDA "
        f"init {cold.get('init_s')}, weights {cold.get('weights_s')} s)"
    )


def step_sleep_for_b(run: Run) -> None:
    """2. ``b`` evicts ``a`` by sleep; ``a``'s memory is freed to its residual; ``b`` loads."""
    r, s, llmux = run.report, run.sizes, run.llmux
    free_before = run.probe.free_gb()
    before = llmux.metrics()
    asked = time.time()
    code, body, took = llmux.chat("b")
    after = llmux.metrics()
    run.checksums["b"] = checksum_of(body)
    a, b = run.state("a"), run.state("b")
    r.statuses["after_b"] = {"a": a, "b": b, "host": llmux.status().get("host")}
    r.check(
        "a request for b evicts a by sleep: a sleeping, same process",
        code == 200 and a["state"] == "sleeping" and a["pid"] == run.pids["a"],
        f"b answered {code} in {took:.2f} s; a {a['state']} pid {a['pid']} (was {run.pids['a']})",
    )
    a_asleep = run.settled_gb("a", s.residual_max)
    r.memory["a_asleep_gb"] = a_asleep
    freed = r.memory["a_awake_gb"] - a_asleep
    r.check(
        "a's memory is freed down to its residual",
        a_asleep <= s.residual_max + 1e-6 and freed >= 0.99 * (s.weights + s.cache),
        f"a holds {a_asleep:.3f} GB asleep (freed {freed:.3f} of {s.weights + s.cache:.2f} GB)",
    )
    if b.get("pid") is not None:
        run.pids["b"] = int(b["pid"])
    b_gb = run.gb("b") if "b" in run.pids else 0.0
    r.memory.update(b_awake_gb=b_gb, free_before_b_gb=free_before)
    started = read_stats(run.work, "b").get("started_at")
    free_at_start = run.sampler.free_at(started) if run.sampler and started else None
    r.memory["free_when_b_started_gb"] = free_at_start
    fits_only_freed = free_before is not None and free_before < b_gb
    r.check(
        "b loads into the memory a freed",
        code == 200
        and b["state"] == "ready"
        and run.checksums["b"] == run.prepared["b"]
        and (free_before is None or fits_only_freed),
        f"b ready with checksum {run.checksums['b']} (file {run.prepared['b']}), NVML {b_gb:.3f}"
        f" GB; before the request {free_before} GB were free"
        + (f", {free_at_start:.3f} GB when b's process started" if free_at_start else ""),
    )
    host = (r.statuses["after_b"].get("host") or {}).get("reserved_gb")
    r.check(
        "/status host.reserved_gb holds a's level-1 copy",
        near(host, s.weights, 1e-4 + 1e-3 * s.weights),
        f"host reserved {host} GB, a's sleep.host_gb {s.weights:.3f}",
    )
    sleeps = calls(read_stats(run.work, "a"), "sleep")
    r.timings["a_sleep"] = {"request_s": took, "asked_at": asked, "standin": sleeps}
    r.timings["b_cold"] = {
        "llmux_load_s": histogram_delta(before, after, "llmux_model_load_seconds", "b")[0],
        "standin": read_stats(run.work, "b").get("cold", {}),
    }
    if sleeps:
        last = sleeps[-1]
        r.info(
            f"a's level-1 sleep took {last['s']:.3f} s in the stand-in (copy to "
            f"{'pinned' if last.get('pinned') else 'PAGEABLE'} host memory {last.get('offload_s')}"
            f" s, free {last.get('free_s')} s); b answered {took:.2f} s after the request"
        )

    # 4. The residual llmux learned (NVML after the sleep) is NVML's.
    def learned() -> float | None:
        value = run.state("a").get("residual_gb")
        return float(value) if isinstance(value, int | float) and value > s.residual_conf else None

    residual = wait_for(learned, 15 if r.mode == "gpu" else 0, 0.2)
    r.memory["a_residual_llmux_gb"] = residual or run.state("a").get("residual_gb")
    r.check(
        "llmux learned a's residual from NVML",
        near(residual, a_asleep, RESIDUAL_TOLERANCE_GB),
        f"/status residual_gb {r.memory['a_residual_llmux_gb']} (configured "
        f"{s.residual_conf}), NVML shows {a_asleep:.3f} GB",
        needs="nvml",
    )


def step_wake_a(run: Run) -> None:
    """3. A request for ``a`` wakes it (``b`` sleeps at level 2): same process, same weights,
    much faster than its cold start."""
    r, s, llmux = run.report, run.sizes, run.llmux
    before = llmux.metrics()
    code, body, took = llmux.chat("a")
    after = llmux.metrics()
    a, b = run.state("a"), run.state("b")
    r.statuses["after_wake_a"] = {"a": a, "b": b}
    checksum = checksum_of(body)
    r.check(
        "a request for a wakes it: same process, same weights",
        code == 200
        and a["state"] == "ready"
        and a["pid"] == run.pids["a"]
        and checksum == run.checksums["a"],
        f"{code} in {took:.3f} s; a {a['state']} pid {a['pid']}, checksum {checksum} (before "
        f"the sleep {run.checksums['a']})",
    )
    b_asleep = run.settled_gb("b", s.residual_max) if "b" in run.pids else None
    r.memory["b_asleep_gb"] = b_asleep
    r.check(
        "b sleeps at level 2, same process, its memory freed",
        b["state"] == "sleeping"
        and b["pid"] == run.pids.get("b")
        and b_asleep is not None
        and b_asleep <= s.residual_max,
        f"b {b['state']} pid {b['pid']}, holds {b_asleep} GB",
    )
    wake_s, n = histogram_delta(before, after, "llmux_model_wake_seconds", "a")
    wakes = [
        metric(t, "llmux_model_wakes_total", model="a", result="success") for t in (before, after)
    ]
    r.check(
        "llmux counts a's wake (llmux_model_wakes_total, llmux_model_wake_seconds)",
        n == 1 and (wakes[1] or 0) - (wakes[0] or 0) == 1,
        f"wake_seconds observations +{n} (mean {wake_s}), wakes_total success {wakes[0]} -> "
        f"{wakes[1]}",
    )
    cold = r.timings["a_cold"]
    cold_s = cold["llmux_load_s"] or cold["request_s"]
    standin = calls(read_stats(run.work, "a"), "wake_up")
    r.timings["a_wake"] = {"request_s": took, "llmux_wake_s": wake_s, "standin": standin}
    ratio = cold_s / wake_s if wake_s else math.inf
    r.check(
        "a's level-1 wake is much faster than its cold start",
        wake_s is not None and ratio >= WAKE_SPEEDUP_MIN and took < cold_s,
        f"wake {wake_s} s (llmux_model_wake_seconds), {took:.3f} s request to answer (b's "
        f"sleep included), vs cold {cold_s:.3f} s: {ratio:.1f}x (at least "
        f"{WAKE_SPEEDUP_MIN:g}x)",
        needs="timing",
    )
    if standin:
        r.info(
            f"the stand-in's own wake: {standin[-1]['s']:.3f} s (weights "
            f"{standin[-1].get('weights_s')} s, copied back: {standin[-1].get('copied_back')})"
        )


def step_level_two(run: Run) -> None:
    """5. Admin sleep of ``a``, then ``b``'s level-2 wake reloads its weights."""
    r, s, llmux = run.report, run.sizes, run.llmux
    code, text, took = llmux.post("/models/a/sleep")
    a = run.state("a")
    r.check(
        "POST /models/a/sleep answers once a sleeps",
        code == 200 and a["state"] == "sleeping" and a["pid"] == run.pids["a"],
        f"{code} {text} in {took:.2f} s; a {a['state']} pid {a['pid']}",
    )
    r.memory["a_asleep_again_gb"] = run.settled_gb("a", s.residual_max)
    before = llmux.metrics()
    code, body, took = llmux.chat("b")
    after = llmux.metrics()
    b = run.state("b")
    checksum = checksum_of(body)
    stats = read_stats(run.work, "b")
    counts = stats.get("counts", {})
    r.check(
        "b's level-2 wake reloads its weights: same process, same weights",
        code == 200
        and b["state"] == "ready"
        and b["pid"] == run.pids.get("b")
        and checksum == run.checksums["b"]
        and counts.get("reload_weights") == 1
        and counts.get("reset_prefix_cache", 0) >= 1,
        f"{code} in {took:.3f} s; b {b['state']} pid {b['pid']}, checksum {checksum} (before "
        f"{run.checksums['b']}); the stand-in got reload_weights x{counts.get('reload_weights')}"
        f", reset_prefix_cache x{counts.get('reset_prefix_cache')}",
    )
    wake_s, n = histogram_delta(before, after, "llmux_model_wake_seconds", "b")
    a_wake = r.timings["a_wake"]["llmux_wake_s"]
    b_cold = r.timings["b_cold"]["llmux_load_s"]
    r.timings["b_wake"] = {
        "request_s": took,
        "llmux_wake_s": wake_s,
        "standin": calls(stats, "wake_up") + calls(stats, "reload_weights"),
    }
    r.check(
        "b's level-2 wake is slower than a's level 1 and faster than b's cold start",
        wake_s is not None
        and a_wake is not None
        and b_cold is not None
        and a_wake < wake_s < b_cold,
        f"level 2 {wake_s} s vs level 1 {a_wake} s vs cold {b_cold} s (llmux's wake and load "
        f"seconds; {n} wake observed)",
        needs="timing",
    )


def step_end(run: Run) -> None:
    """6. Never relayed to a sleeper; one process per model; then stop and check the GPU."""
    r = run.report
    stats = {name: read_stats(run.work, name) for name in ("a", "b")}
    r.standins = stats
    run.seen |= {int(st["pid"]) for st in stats.values() if st.get("pid")}
    refused = {
        name: tuple(st.get("counts", {}).get(k) for k in ("refused_asleep", "refused_no_weights"))
        for name, st in stats.items()
    }
    r.check(
        "llmux never relayed a request to a sleeping engine",
        all(v == (0, 0) for v in refused.values()),
        f"(refused asleep, refused without weights): {refused}",
    )
    r.check(
        "each model ran in one process all along",
        all(stats[n].get("pid") == run.pids.get(n) for n in ("a", "b")),
        f"pids llmux showed {run.pids}; the stand-ins' own "
        f"{ {n: stats[n].get('pid') for n in ('a', 'b')} }",
    )


def run_check(report: Report, gpu: bool, keep: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmux-sleep-"))
    (work / "marks").mkdir()
    backend = "torch" if gpu else "bytes"
    nvml: Any = None
    hog: Hog | None = None
    llmux: Llmux | None = None
    sampler: Sampler | None = None
    probe: Probe
    ours: set[int] = set()
    try:
        if gpu:
            from llmux.gpu import open_probe

            nvml = open_probe()
            if nvml is None:
                raise CannotCheck("no NVML: no NVIDIA driver or GPU here (or no nvidia-ml-py)")
            probe = NvmlReader(nvml)
            total, free0 = float(nvml.total_gb()), float(nvml.free_gb())
            report.device = {"name": nvml.name(), "total_gb": total, "free_gb_at_start": free0}
            report.say(f"device 0: {nvml.name()}, {total:.1f} GB, {free0:.1f} GB free")
            sized = Sizes.for_card(free0, host_available_gb())
            if sized is None:
                report.check("enough memory", False, f"{free0:.1f} GB free on the card")
                return
            sizes = sized
        else:
            probe = StatsReader(work / "marks")
            sizes = Sizes.no_gpu()
        report.sizes = {**asdict(sizes), "model_conf": sizes.model_conf}
        problems = sizes.problems()
        if problems:
            report.check("the sizes can check what they must", False, "; ".join(problems))
            return
        report.info(
            f"sizes (GB): weights {sizes.weights}, cache {sizes.cache}, each model configured "
            f"{sizes.model_conf:.3f}; card left free {sizes.free}, llmux budget {sizes.budget}"
        )
        prepared = prepare(report, sizes, work, backend)
        if gpu:
            hog = Hog(sizes.free, DEADLINE_S + 120, work / "marks")
            ours.add(hog.proc.pid)
            hog.wait_allocated()
            report.info(f"a hog holds the card but {probe.free_gb():.2f} GB free")
            sampler = Sampler(probe)
            sampler.start()
        config = work / "llmux-sleep.yaml"
        write_config(config, sizes, work, backend, cold_extra=0.0 if gpu else 1.0)
        llmux = Llmux(config, work / "llmux-sleep.log")
        run = Run(report, sizes, probe, sampler, llmux, work, prepared)
        try:
            for step in (step_cold, step_sleep_for_b, step_wake_a, step_level_two, step_end):
                step(run)
        finally:
            ours |= run.seen | set(run.pids.values())
            with contextlib.suppress(Exception):
                report.learned_json = json.loads((work / "state" / "learned.json").read_text())
            with contextlib.suppress(Exception):  # llmux's scheduling events, for the timeline
                report.llmux_events = [
                    {"ts": rec.get("ts"), **rec["event"]}
                    for rec in llmux.log_records()
                    if isinstance(rec.get("event"), dict)
                ][-200:]
    finally:
        signal.alarm(0)  # the cleanup below is bounded by its own waits
        if sampler is not None:
            sampler.stop()
        if llmux is not None:
            code = llmux.stop()
            report.info(f"llmux stopped with status {code}")
        if hog is not None:
            hog.kill()
        if ours:
            left = wait_for(lambda: not (probe.processes() & ours), 20, 0.2)
            leftover = sorted(probe.processes() & ours) if not left else []
            report.check(
                "nothing of ours is left on the GPU",
                bool(left),
                f"still there: {leftover}" if leftover else f"checked pids {sorted(ours)}",
            )
        for pid in ours:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            log = work / "llmux-sleep.log"
            if log.exists():
                shutil.copy(log, Path(out) / log.name)
        if nvml is not None:
            nvml.close()
        if keep:
            report.info(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def write_out(report: Report, payload: dict[str, Any]) -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "sleep-check.json").write_text(json.dumps(payload, indent=1, default=str))
    (Path(out) / "sleep-check.txt").write_text("\n".join(report.lines) + "\n")


class DeadlinePassed(Exception):
    """Raised by SIGALRM (not a TimeoutError: httpx would take that for its own)."""


def on_alarm(signum: int, frame: FrameType | None) -> None:
    raise DeadlinePassed(f"the check ran past {DEADLINE_S} s")


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: list[str] | None = None) -> int:
    first = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(description=first)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--no-gpu",
        action="store_true",
        help="the same steps with bytearray stand-ins, no hog, no NVML (for the tests)",
    )
    args = parser.parse_args(argv)
    report = Report(mode="no-gpu" if args.no_gpu else "gpu")
    started = time.monotonic()
    error = None
    cannot = None
    try:
        with deadline(DEADLINE_S):
            try:
                import httpx  # noqa: F401

                import llmux.serve  # noqa: F401  (llmux and its dependencies import here)
            except ImportError as exc:
                raise CannotCheck(
                    f"llmux or one of its dependencies is missing ({exc}): carry them as "
                    "wheels, see bench/gpu/README.md"
                ) from exc
            run_check(report, gpu=not args.no_gpu, keep=args.keep)
    except CannotCheck as exc:
        cannot = str(exc)
        report.say(f"cannot check here: {cannot}")
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        report.check("the check ran to the end", False, error)
    took = time.monotonic() - started
    failed = report.failed
    skipped = [c for c in report.checks if c.ok is None]
    result = "SKIP" if cannot else "FAIL" if failed else "PASS"
    report.say(
        f"\n{result}: {len(report.checks) - len(failed) - len(skipped)}/{len(report.checks)} "
        f"checks passed ({len(skipped)} skipped) in {took:.0f} s"
        + (f"; FAILED: {', '.join(c.name for c in failed)}" if failed else "")
    )
    payload = asdict(report)
    payload.update(result=result, took_s=took, error=error, cannot_check=cannot)
    write_out(report, payload)
    if cannot:
        return CANNOT_CHECK
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
