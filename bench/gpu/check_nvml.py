"""Check DESIGN rule 10 ("measure when you can") on a real NVIDIA GPU.

    PYTHONPATH=src python3 bench/gpu/check_nvml.py [--keep]

Runs `llmux serve` twice over stand-in models (``bench/gpu/vram_child.py``: torch holds a known
number of GB on the GPU) and checks, with NVML read from this script as well:

1. each model's process is measured once it is ready (measured ~= allocated + its CUDA context),
   and the measurement becomes its reservation when it is above the configured ``vram_gb``
   (``big`` is configured at 6 GB but holds 10);
2. a model whose use grows with a request (``voice``: +1 GB at its first chat) is measured again
   after the request;
3. the peaks are written to ``learned.json``;
4. the learned reservation changes a plan: ``mid`` (14 GB) fits beside ``big`` and ``voice`` by
   their configured sizes (6 + 2 + 14 <= 24) but not by their measured ones, so it evicts ``big``;
5. ``mid``'s process starts only once NVML shows its 14 GB free: another program (a "hog" this
   script starts, not llmux's) holds nearly all the card for a few seconds, and llmux must wait
   for it (one ``gpu_wait`` log line) instead of starting a child that would run out of memory;
6. a second `llmux serve` on the same state directory starts with the learned reservations;
7. with ``gpu.free_wait: 3s`` and the hog holding the card, a load fails with 503
   ``model_load_failed`` naming GB free vs needed, and the next request (memory back) loads it;
8. no process of ours is left on the GPU at the end.

Sizes are for a card with >= 48 GB free (an H200 has ~140); on a smaller one they are scaled
down. It prints PASS/FAIL lines and a summary, writes ``$OUT/nvml-check.json`` (and the llmux
logs) when ``OUT`` is set, exits 0 if every check passed, 1 if one failed, 2 without NVML. It
takes about a minute and stops everything it started, also on an error or after 170 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from llmux.gpu import NvmlProbe, open_probe

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHILD = HERE / "vram_child.py"
DEADLINE_S = 170
BASE_FREE_GB = 48.0
"""Free memory the unscaled sizes below are made for."""
HOG_HOLD_S = 6.0
HOG_BOUND_HOLD_S = 9.0
FREE_WAIT_BOUND_S = 3.0


@dataclass(frozen=True)
class Sizes:
    """GB. Configured values are deliberately not what the children really use."""

    budget: float
    big_alloc: float
    big_conf: float
    voice_alloc: float
    voice_grow: float
    voice_conf: float
    mid_alloc: float
    mid_conf: float
    hog_leave: float
    """What a hog leaves free on the card."""

    @classmethod
    def scaled(cls, s: float) -> Sizes:
        return cls(
            budget=24 * s,
            big_alloc=10 * s,
            big_conf=6 * s,
            voice_alloc=1 * s,
            voice_grow=1 * s,
            voice_conf=2 * s,
            mid_alloc=8 * s,
            mid_conf=14 * s,
            hog_leave=1 * s,
        )


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    device: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, float] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    swap: dict[str, Any] = field(default_factory=dict)
    bound: dict[str, Any] = field(default_factory=dict)
    learned_json: Any = None
    restart_status: Any = None
    nvml_pids: list[int] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok

    def info(self, text: str) -> None:
        print(f"     {text}", flush=True)


class Sampler(threading.Thread):
    """NVML free memory every 10 ms, with timestamps (time.time()), while the check runs."""

    def __init__(self, probe: NvmlProbe) -> None:
        super().__init__(daemon=True)
        self.probe = probe
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.time(), self.probe.free_gb()))
            self._stop_event.wait(0.01)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)

    def free_at(self, when: float) -> float | None:
        """The last sample taken at or before ``when``."""
        found = None
        for t, free in list(self.samples):
            if t > when:
                break
            found = free
        return found

    def first_at_least(self, gb: float, after: float) -> float | None:
        for t, free in list(self.samples):
            if t >= after and free >= gb:
                return t
        return None


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


def read_mark(marks: Path, name: str, what: str) -> float | None:
    try:
        return float((marks / f"{name}.{what}").read_text())
    except (OSError, ValueError):
        return None


class Llmux:
    """One `llmux serve` subprocess (own process group) and an HTTP client for it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
        )
        with log.open("wb") as out:
            argv = [sys.executable, "-m", "llmux", "serve", "--config", str(config)]
            self.proc = subprocess.Popen(
                [*argv, "--port", str(self.port), "--log-format", "json"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.http = httpx.Client(base_url=self.url, timeout=150)
        ok = wait_for(self._healthy, 60, 0.1)
        if not ok:
            raise RuntimeError(f"llmux did not start; its log:\n{self.tail(40)}")

    def _healthy(self) -> bool:
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
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/status").raise_for_status().json()
        return body

    def model(self, model_id: str) -> dict[str, Any]:
        found: dict[str, Any] = next(m for m in self.status()["models"] if m["id"] == model_id)
        return found

    def chat(self, model_id: str) -> httpx.Response:
        return self.http.post(
            "/v1/chat/completions",
            json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]},
        )

    def stop(self) -> int | None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def child_cmd(name: str, gb: float, marks: Path, *extra: str) -> str:
    argv = [sys.executable, str(CHILD), "--port", "${PORT}", "--name", name]
    argv += ["--gb", f"{gb:.3f}", "--marks", str(marks), *extra]
    return " ".join(shlex.quote(a) if a != "${PORT}" else a for a in argv)


def write_config(path: Path, sizes: Sizes, marks: Path, state: Path, free_wait: float) -> None:
    def model(kind: str, conf: float, cmd: str) -> dict[str, Any]:
        return {
            "type": kind,
            "vram_gb": round(conf, 3),
            "cmd": cmd,
            "ready_timeout": "120s",
            "stop_timeout": "15s",
        }

    config = {
        "server": {"state_dir": str(state), "queue_timeout": "150s"},
        "gpu": {"vram_gb": round(sizes.budget, 3), "reserve_gb": 0, "free_wait": f"{free_wait}s"},
        "models": {
            "big": model("llm", sizes.big_conf, child_cmd("big", sizes.big_alloc, marks)),
            "mid": model("llm", sizes.mid_conf, child_cmd("mid", sizes.mid_alloc, marks)),
            "voice": model(
                "tts",
                sizes.voice_conf,
                child_cmd(
                    "voice", sizes.voice_alloc, marks, "--grow-gb", f"{sizes.voice_grow:.3f}"
                ),
            ),
        },
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML


class Hog:
    """Another program's memory: a vram_child with --hold, outside llmux."""

    def __init__(self, name: str, leave_gb: float, hold: float, marks: Path) -> None:
        self.name = name
        self.marks = marks
        argv = [sys.executable, str(CHILD), "--name", name, "--leave-gb", f"{leave_gb:.3f}"]
        argv += ["--hold", str(hold), "--marks", str(marks)]
        self.proc = subprocess.Popen(argv, start_new_session=True)

    def wait_allocated(self, timeout: float = 90) -> float:
        t = wait_for(lambda: read_mark(self.marks, self.name, "allocated"), timeout)
        if t is None:
            raise RuntimeError(f"{self.name} did not allocate in {timeout} s")
        return float(t)

    def wait_gone(self, timeout: float = 30) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def near(a: float | None, b: float, tol: float) -> bool:
    return a is not None and abs(a - b) <= tol


def wait_measured(llmux: Llmux, model_id: str, timeout: float = 15) -> float | None:
    m = wait_for(lambda: (x := llmux.model(model_id))["measured_gb"] and x, timeout, 0.1)
    return float(m["measured_gb"]) if m else None


def diagnose_pids(report: Report, probe: NvmlProbe, llmux: Llmux, model_id: str) -> None:
    pids = sorted(probe.processes())
    report.nvml_pids = pids
    report.info(
        f"NVML lists pids {pids}; llmux says {model_id}'s child is pid "
        f"{llmux.model(model_id)['pid']}. No match usually means a container without the "
        "host's pid namespace (NVML reports host pids): run it with --pid=host."
    )


def phase_one(
    report: Report, probe: NvmlProbe, sampler: Sampler, sizes: Sizes, work: Path
) -> list[int]:
    """Measure, learn, persist, evict by the learned size, wait for a hog's memory."""
    marks, state = work / "marks", work / "state"
    config = work / "llmux-1.yaml"
    write_config(config, sizes, marks, state, free_wait=20)
    llmux = Llmux(config, work / "llmux-1.log")
    pids: list[int] = []
    try:
        # 1. big: measured once ready; the measurement becomes its reservation.
        resp = llmux.http.post("/models/big/load")
        report.check("big loads", resp.status_code == 200, f"{resp.status_code} {resp.text[:200]}")
        big = llmux.model("big")
        pids.append(int(big["pid"]))
        measured = wait_measured(llmux, "big")
        report.models["big"] = {
            "allocated_gb": sizes.big_alloc,
            "configured_gb": sizes.big_conf,
            "measured_gb": measured,
            "pid": big["pid"],
        }
        ok = measured is not None and sizes.big_alloc <= measured <= sizes.big_alloc + 3
        report.check(
            "big is measured by process once ready",
            ok,
            f"measured {measured} GB for {sizes.big_alloc:.2f} GB allocated (+ CUDA context)",
        )
        if measured is None:
            diagnose_pids(report, probe, llmux, "big")
            return pids
        big = llmux.model("big")
        report.check(
            "big's reservation is its measured use",
            near(big["vram_gb"], measured, 0.01) and measured > sizes.big_conf,
            f"vram_gb {big['vram_gb']} (configured {sizes.big_conf:.2f}, measured {measured})",
        )
        status = llmux.status()
        used = probe.used_gb()
        report.check(
            "/status vram.measured_gb is NVML's used memory",
            near(status["vram"]["measured_gb"], used, 1.0),
            f"{status['vram']['measured_gb']} GB vs NVML used {used:.2f} GB",
        )
        metrics = llmux.http.get("/metrics").text
        report.check(
            "/metrics has llmux_model_vram_measured_bytes",
            'llmux_model_vram_measured_bytes{model="big"}' in metrics,
            next((ln for ln in metrics.splitlines() if "vram_measured_bytes{" in ln), "absent"),
        )
        resp = llmux.chat("big")
        report.check("big serves", resp.status_code == 200, resp.text[:120])

        # 2. voice: measured at ready, and again after a request that makes it grow.
        resp = llmux.http.post("/models/voice/load")
        report.check("voice loads", resp.status_code == 200, f"{resp.status_code}")
        pids.append(int(llmux.model("voice")["pid"]))
        at_ready = wait_measured(llmux, "voice")
        resp = llmux.chat("voice")
        after = wait_for(
            lambda: (
                (x := llmux.model("voice")["measured_gb"])
                and at_ready is not None
                and x >= at_ready + 0.9 * sizes.voice_grow
                and x
            ),
            10,
            0.1,
        )
        report.models["voice"] = {
            "allocated_gb": sizes.voice_alloc,
            "grown_gb": sizes.voice_grow,
            "configured_gb": sizes.voice_conf,
            "measured_at_ready_gb": at_ready,
            "measured_after_request_gb": after or llmux.model("voice")["measured_gb"],
        }
        report.check(
            "voice is measured again after a request",
            bool(after),
            f"{at_ready} GB when ready, {report.models['voice']['measured_after_request_gb']} GB "
            f"after a request that allocated {sizes.voice_grow:.2f} GB more",
        )
        voice_peak = report.models["voice"]["measured_after_request_gb"]

        # 3. learned.json.
        path = state / "learned.json"
        learned = json.loads(path.read_text()) if path.exists() else None
        report.learned_json = learned
        entries = (learned or {}).get("models", {})
        report.check(
            "learned.json keeps the peaks",
            near(entries.get("big", {}).get("gb"), measured, 0.01)
            and near(entries.get("voice", {}).get("gb"), float(voice_peak or 0), 0.01),
            json.dumps(entries)[:400],
        )

        # 4 + 5. mid evicts big (by big's learned size) and starts only once NVML shows 14 GB.
        hog = Hog("hog", sizes.hog_leave, HOG_HOLD_S, marks)
        try:
            hog_at = hog.wait_allocated()
            hog_gb = probe.process_gb([hog.proc.pid])
            report.info(
                f"hog holds {hog_gb:.1f} GB for {HOG_HOLD_S:g} s; {probe.free_gb():.2f} GB free now"
            )
            asked = time.time()
            resp = llmux.chat("mid")
            answered = time.time()
        finally:
            hog.wait_gone()
        pids.append(hog.proc.pid)
        report.check("mid serves", resp.status_code == 200, f"{resp.status_code} {resp.text[:200]}")
        mid = llmux.model("mid")
        if mid["pid"] is not None:
            pids.append(int(mid["pid"]))
        states = {m["id"]: m["state"] for m in llmux.status()["models"]}
        report.check(
            "mid's load evicted big because of big's learned reservation",
            states == {"big": "unloaded", "mid": "ready", "voice": "ready"},
            f"states {states}; by configured sizes {sizes.big_conf + sizes.voice_conf:.1f} + "
            f"{sizes.mid_conf:.1f} <= {sizes.budget:.1f} GB would fit",
        )
        started = read_mark(marks, "mid", "started")
        hog_exit = read_mark(marks, "hog", "exiting")
        free_at_start = sampler.free_at(started) if started else None
        waits = [
            r["msg"]
            for r in llmux.log_records()
            if str(r.get("msg", "")).startswith("gpu_wait model=mid")
        ]
        unloaded_big = next(
            (
                r["ts"]
                for r in llmux.log_records()
                if (r.get("event") or {}).get("event") == "unloaded"
                and (r.get("event") or {}).get("model") == "big"
            ),
            None,
        )
        report.swap = {
            "hog_gb": hog_gb,
            "hog_allocated_at": hog_at,
            "hog_exiting_at": hog_exit,
            "mid_asked_at": asked,
            "big_unloaded_at": unloaded_big,
            "mid_child_started_at": started,
            "mid_answered_at": answered,
            "free_gb_when_mid_started": free_at_start,
            "mid_needs_gb": sizes.mid_conf,
            "gpu_wait_log": waits,
        }
        report.check(
            "mid's process started only once NVML showed its memory free",
            free_at_start is not None and free_at_start + 0.05 >= sizes.mid_conf,
            f"{free_at_start} GB free when it started, needs {sizes.mid_conf:.2f}",
        )
        report.check(
            "llmux waited for the hog's memory and logged it once",
            len(waits) == 1
            and started is not None
            and hog_exit is not None
            and started >= hog_exit,
            f"{waits}; hog exiting at +{(hog_exit or 0) - asked:.2f} s, mid's child started at "
            f"+{(started or 0) - asked:.2f} s (after the request)",
        )
        if unloaded_big is not None and started is not None:
            report.info(
                f"big gone at +{unloaded_big - asked:.2f} s; mid started at "
                f"+{started - asked:.2f} s; answered at +{answered - asked:.2f} s"
            )

        # How late NVML shows a stopped process's memory (information, no expectation).
        before = probe.free_gb()
        voice_gb = float(llmux.model("voice")["measured_gb"] or 0)
        t0 = time.time()
        llmux.http.post("/models/voice/unload")
        t1 = time.time()
        seen = wait_for(lambda: sampler.first_at_least(before + 0.9 * voice_gb, t0), 10, 0.01)
        report.swap["voice_unload_returned_s"] = t1 - t0
        report.swap["voice_memory_seen_free_after_unload_s"] = seen - t1 if seen else None
        report.info(
            f"unloading voice: /models/voice/unload answered after {t1 - t0:.3f} s; NVML showed "
            f"its {voice_gb:.2f} GB free {((seen or t1) - t1) * 1000:.0f} ms after that"
            + ("" if seen else " (not within 10 s)")
        )
    finally:
        code = llmux.stop()
        report.info(f"llmux 1 stopped with status {code}")
    return pids


def phase_two(
    report: Report, probe: NvmlProbe, sizes: Sizes, work: Path, learned_big: float | None
) -> list[int]:
    """A fresh llmux starts from learned.json; the free-memory wait is bounded."""
    marks, state = work / "marks", work / "state"
    config = work / "llmux-2.yaml"
    write_config(config, sizes, marks, state, free_wait=FREE_WAIT_BOUND_S)
    llmux = Llmux(config, work / "llmux-2.log")
    pids: list[int] = []
    try:
        status = llmux.status()
        report.restart_status = status
        by_id = {m["id"]: m for m in status["models"]}
        report.check(
            "a restarted llmux starts from the learned peaks",
            learned_big is not None and near(by_id["big"]["vram_gb"], learned_big, 0.01),
            f"big vram_gb {by_id['big']['vram_gb']} (learned {learned_big}, configured "
            f"{sizes.big_conf:.2f}), state {by_id['big']['state']}",
        )
        hog = Hog("hog2", sizes.hog_leave, HOG_BOUND_HOLD_S, marks)
        try:
            hog.wait_allocated()
            t0 = time.time()
            resp = llmux.chat("big")
            took = time.time() - t0
            error = resp.json().get("error", {}) if resp.status_code != 200 else {}
            report.bound = {"status": resp.status_code, "error": error, "took_s": took}
            report.check(
                "free memory that never shows fails the load after gpu.free_wait",
                resp.status_code == 503
                and error.get("code") == "model_load_failed"
                and "gpu.free_wait" in error.get("message", "")
                and took < FREE_WAIT_BOUND_S + 5,
                f"{resp.status_code} after {took:.1f} s: {error.get('message', resp.text)[:300]}",
            )
            big = llmux.model("big")
            report.check(
                "the failed load left no trace",
                big["state"] == "unloaded" and llmux.status()["vram"]["reserved_gb"] == 0,
                f"big {big['state']}, last_error {str(big['last_error'])[:120]!r}",
            )
        finally:
            hog.wait_gone()
        pids.append(hog.proc.pid)
        resp = llmux.chat("big")
        report.check(
            "the next request loads it once the memory is back",
            resp.status_code == 200,
            f"{resp.status_code} {resp.text[:120]}",
        )
        pid = llmux.model("big")["pid"]
        if pid is not None:
            pids.append(int(pid))
    finally:
        code = llmux.stop()
        report.info(f"llmux 2 stopped with status {code}")
    return pids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def run(probe: NvmlProbe, keep: bool) -> Report:
    report = Report()
    total, free0 = probe.total_gb(), probe.free_gb()
    report.device = {"name": probe.name(), "total_gb": total, "free_gb_at_start": free0}
    print(f"device 0: {probe.name()}, {total:.1f} GB, {free0:.1f} GB free", flush=True)
    scale = min(1.0, (free0 - 2) / BASE_FREE_GB)
    if scale < 0.25:
        report.check("enough free memory", False, f"{free0:.1f} GB free; needs ~{BASE_FREE_GB}")
        return report
    sizes = Sizes.scaled(scale)
    report.sizes = asdict(sizes)
    work = Path(tempfile.mkdtemp(prefix="llmux-nvml-"))
    (work / "marks").mkdir()
    sampler = Sampler(probe)
    sampler.start()
    pids: list[int] = []
    try:
        pids += phase_one(report, probe, sampler, sizes, work)
        learned = report.learned_json or {}
        big_entry = learned.get("models", {}).get("big", {})
        learned_big = big_entry.get("gb") if isinstance(big_entry, dict) else None
        pids += phase_two(report, probe, sizes, work, learned_big)
    finally:
        sampler.stop()
        left = wait_for(lambda: not (set(probe.processes()) & set(pids)), 15, 0.2)
        leftover = sorted(set(probe.processes()) & set(pids))
        report.check(
            "no process of ours is left on the GPU",
            bool(left),
            f"still on the GPU: {leftover}" if leftover else f"checked pids {sorted(pids)}",
        )
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            for log in sorted(work.glob("llmux-*.log")):
                shutil.copy(log, Path(out) / log.name)
        if keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report


def write_out(payload: dict[str, Any]) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "nvml-check.json").write_text(json.dumps(payload, indent=1, default=str))


def on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError(f"the check ran past {DEADLINE_S} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check llmux's NVML rule 10 on a real GPU.")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    probe = open_probe()
    if probe is None:
        print("no NVML: no NVIDIA driver or GPU here (or no nvidia-ml-py); nothing to check")
        write_out({"nvml": False, "result": "SKIP", "checks": []})
        return 2
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(DEADLINE_S)
    started = time.monotonic()
    error = None
    report = Report()
    try:
        report = run(probe, args.keep)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        report.check("the check ran to the end", False, error)
    finally:
        signal.alarm(0)
        probe.close()
    failed = [c for c in report.checks if not c.ok]
    took = time.monotonic() - started
    print(
        f"\n{len(report.checks) - len(failed)}/{len(report.checks)} checks passed in {took:.0f} s"
        + (f"; FAILED: {', '.join(c.name for c in failed)}" if failed else ""),
        flush=True,
    )
    payload = asdict(report)
    payload.update(nvml=True, result="FAIL" if failed else "PASS", took_s=took, error=error)
    write_out(payload)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
