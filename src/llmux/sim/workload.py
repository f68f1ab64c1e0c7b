"""The workload: requests built from the traces, with the voice overlay.

Two kinds of trace (bench/traces/README.md), chosen by the file name:

* Azure LLM inference CSVs: ``TIMESTAMP`` (wall time of arrival), ``ContextTokens`` (prompt
  length), ``GeneratedTokens`` (output length).
* Mooncake ``*.jsonl``: one JSON object a line, ``timestamp`` (ms since the trace's start),
  ``input_length``, ``output_length`` (tokens); ``hash_ids`` (prefix-cache blocks) is ignored.

An LLM request holds its model for ``context / prefill_tps + generated / decode_tps`` and its
first byte comes after the prefill. All traces share one time origin: the Azure files keep their
wall-clock times (the same hour side by side), and a Mooncake trace, whose times are relative,
starts at the earliest Azure arrival (or at 0 if there is none). The earliest arrival, voice
requests included, is then t = 0.

Voice overlay: a seeded ``random.Random`` picks ``voice.share`` of the source model's requests. Each
is preceded by an ASR request ``asr_lead_s`` earlier and followed by a TTS request at the moment the
LLM request finishes *in the simulation* (so its arrival depends on the policy; the oracle gets a
nominal time: arrival + service, as if the LLM request had not waited).
"""

from __future__ import annotations

import csv
import datetime
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmux.sim.scenario import Scenario


@dataclass
class SimRequest:
    rid: int
    model_id: str
    arrival: float
    first_byte_s: float
    """Grant to first byte (TTFB = wait + load + this)."""
    service_s: float
    """Grant to release: how long the model is held."""
    follow_up: str | None = None
    """A model to request when this one finishes (the voice TTS)."""
    follow_first_byte_s: float = 0.0
    follow_service_s: float = 0.0


@dataclass(frozen=True)
class TraceRow:
    t: float
    """Seconds since midnight of the first day (absolute; the origin is taken later)."""
    context: int
    generated: int


def _seconds(stamp: str) -> float:
    """``2023-11-16 18:15:46.6805900`` -> seconds since 0001-01-01 (7 fractional digits kept)."""
    day, _, clock = stamp.strip().partition(" ")
    d = datetime.date.fromisoformat(day)
    h, m, s = clock.split(":")
    return d.toordinal() * 86400.0 + int(h) * 3600 + int(m) * 60 + float(s)


def read_azure_trace(path: Path) -> list[TraceRow]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [
            TraceRow(_seconds(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for r in csv.DictReader(f)
        ]
    rows.sort(key=lambda r: r.t)
    return rows


def read_mooncake_trace(path: Path) -> list[TraceRow]:
    """A Mooncake trace: times are relative to its start (``timestamp`` in ms)."""
    rows: list[TraceRow] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            rows.append(
                TraceRow(
                    float(r["timestamp"]) / 1000.0, int(r["input_length"]), int(r["output_length"])
                )
            )
    rows.sort(key=lambda r: r.t)
    return rows


def is_relative(name: str) -> bool:
    """Whether a trace file's times are relative to its start (Mooncake) rather than wall time."""
    return name.endswith(".jsonl")


def read_trace(path: Path) -> list[TraceRow]:
    """Either kind, by the file name: ``*.jsonl`` is Mooncake, anything else an Azure CSV."""
    return read_mooncake_trace(path) if is_relative(path.name) else read_azure_trace(path)


def load_traces(sc: Scenario) -> dict[str, list[TraceRow]]:
    """Each model's trace rows, on one time origin: relative (Mooncake) traces are shifted to
    start at the earliest arrival of the absolute (Azure) ones."""
    traces = {
        mid: read_trace(sc.trace_dir() / m.trace)
        for mid, m in sc.models.items()
        if m.trace is not None
    }
    relative = {mid for mid, m in sc.models.items() if m.trace is not None and is_relative(m.trace)}
    starts = [rows[0].t for mid, rows in traces.items() if rows and mid not in relative]
    origin = min(starts, default=0.0)
    for mid in relative:
        traces[mid] = [TraceRow(origin + r.t, r.context, r.generated) for r in traces[mid]]
    return traces


@dataclass
class Workload:
    requests: list[SimRequest]
    """Known in advance (trace and voice ASR), by arrival time. Follow-ups come at run time."""
    span_s: float
    nominal: dict[str, list[float]] = field(default_factory=dict)
    """Per model, sorted arrival times including nominal follow-up times (for the oracles)."""

    @classmethod
    def of(cls, requests: Sequence[SimRequest]) -> Workload:
        """A workload from explicit requests (rids are renumbered in arrival order)."""
        reqs = sorted(requests, key=lambda r: r.arrival)
        nominal: dict[str, list[float]] = {}
        for rid, r in enumerate(reqs):
            r.rid = rid
            nominal.setdefault(r.model_id, []).append(r.arrival)
            if r.follow_up is not None:
                nominal.setdefault(r.follow_up, []).append(r.arrival + r.service_s)
        for times in nominal.values():
            times.sort()
        return cls(list(reqs), max((r.arrival for r in reqs), default=0.0), nominal)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.requests:
            out[r.model_id] = out.get(r.model_id, 0) + 1
            if r.follow_up is not None:
                out[r.follow_up] = out.get(r.follow_up, 0) + 1
        return out


def build_workload(
    sc: Scenario, traces: Mapping[str, Sequence[TraceRow]] | None = None
) -> Workload:
    """Requests for ``sc``. ``traces`` (model id -> rows) replaces reading files (for tests)."""
    if traces is None:
        traces = load_traces(sc)
    origin = min((rows[0].t for rows in traces.values() if rows), default=0.0)
    lo = origin + sc.trace.start_s
    hi = None if sc.trace.duration_s is None else lo + sc.trace.duration_s
    scale = sc.trace.rate_scale
    rng = random.Random(sc.seed)
    voice = sc.voice
    out: list[tuple[float, int, SimRequest]] = []
    prefill, decode = sc.service.prefill_tps, sc.service.decode_tps

    def fixed(mid: str) -> tuple[float, float]:
        spec = sc.models[mid]
        k = sc.slowdown(mid)
        assert spec.first_byte_s is not None
        assert spec.service_s is not None
        return spec.first_byte_s * k, spec.service_s * k

    order = 0
    for mid in sorted(traces):
        k = sc.slowdown(mid)
        for row in traces[mid]:
            if row.t < lo or (hi is not None and row.t >= hi):
                continue
            t = (row.t - lo) / scale
            fb = row.context / prefill * k
            req = SimRequest(-1, mid, t, fb, fb + row.generated / decode * k)
            if voice is not None and mid == voice.source and rng.random() < voice.share:
                afb, asv = fixed(voice.asr_model)
                out.append(
                    (t - voice.asr_lead_s, order, SimRequest(-1, voice.asr_model, 0, afb, asv))
                )
                order += 1
                req.follow_up = voice.tts_model
                req.follow_first_byte_s, req.follow_service_s = fixed(voice.tts_model)
            out.append((t, order, req))
            order += 1
    shift = -min((t for t, _, _ in out), default=0.0)
    shift = max(shift, 0.0)
    out.sort(key=lambda x: (x[0], x[1]))
    requests = []
    nominal: dict[str, list[float]] = {mid: [] for mid in sc.models}
    for rid, (t, _, req) in enumerate(out):
        req.rid = rid
        req.arrival = t + shift
        requests.append(req)
        nominal[req.model_id].append(req.arrival)
        if req.follow_up is not None:
            nominal[req.follow_up].append(req.arrival + req.service_s)
    for times in nominal.values():
        times.sort()
    span = max((r.arrival for r in requests), default=0.0)
    return Workload(requests, span, nominal)
