"""What llmux shows of itself: scheduler events (/events, logs) and Prometheus metrics (/metrics).

The scheduler's effects call ``Observer.record`` once per decision (an ``EventSnapshot``; /events
sends it as the wire model ``llmux.api.wire.SchedulerEvent``); the relay calls ``request_done``
once per request; the gauges are read from ``Scheduler.snapshot()`` at scrape time. Metric names
are part of the public contract (README).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from llmux.scheduling.events import Notice
from llmux.scheduling.snapshot import EventSnapshot, SchedulerSnapshot
from llmux.scheduling.state import PUBLIC_STATES, SleepReason

EVICTION_REASONS = frozenset({"priority", "ttl", "admin", "crash", "reload"})
"""The reasons ``llmux_evictions_total`` counts: a model stopped. A sleep is counted apart,
in ``llmux_model_sleeps_total`` (its process stays; see the README's metrics)."""
SLEEP_REASONS = frozenset(r.value for r in SleepReason)
WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
"""Seconds, from a wake sent to ready: vLLM's published wake times are 0.26-0.82 s at level 1
and 0.85-2.6 s at level 2; a wake slower than a cold load is worth seeing too."""


class _StateCollector(Collector):
    """Gauges read from the scheduler at scrape time (no double bookkeeping)."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.observer.snapshot()
        yield GaugeMetricFamily(
            "llmux_vram_budget_bytes",
            "VRAM budget (total less reserve)",
            value=snap.budget_gb * 1e9,
        )
        yield GaugeMetricFamily(
            "llmux_vram_reserved_bytes",
            "Sum of reservations of resident models (a sleeping one counts its residual)",
            value=snap.reserved_gb * 1e9,
        )
        yield GaugeMetricFamily(
            "llmux_host_budget_bytes",
            "Host memory sleeping models may hold (host.ram_gb)",
            value=snap.host_budget_gb * 1e9,
        )
        yield GaugeMetricFamily(
            "llmux_host_reserved_bytes",
            "Host memory held by sleeping models (level 1)",
            value=snap.host_reserved_gb * 1e9,
        )
        state = GaugeMetricFamily(
            "llmux_model_state",
            "1 for the model's current state (unloaded, loading, ready, draining, unloading, "
            "sleeping, waking)",
            labels=["model", "tier", "state"],
        )
        in_flight = GaugeMetricFamily("llmux_in_flight", "Requests in flight", labels=["model"])
        depth = GaugeMetricFamily("llmux_queue_depth", "Requests waiting", labels=["model"])
        measured = GaugeMetricFamily(
            "llmux_model_vram_measured_bytes",
            "GPU memory its current process uses, last NVML measurement (only with NVML)",
            labels=["model"],
        )
        for m in snap.models:
            now = m.state.public
            for s in PUBLIC_STATES:
                state.add_metric([m.id, m.tier, s], 1.0 if s == now else 0.0)
            in_flight.add_metric([m.id], m.in_flight)
            depth.add_metric([m.id], m.queued)
            if m.measured_gb is not None:
                measured.add_metric([m.id], m.measured_gb * 1e9)
        yield state
        yield in_flight
        yield depth
        yield measured

    def describe(self) -> Iterable[Any]:
        return []


QUEUE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_QUEUE_LE = (*(repr(float(b)) for b in QUEUE_BUCKETS), "+Inf")
"""The ``le`` labels, as prometheus_client writes them."""


class _RequestCollector(Collector):
    """``llmux_requests_total`` and ``llmux_request_queue_seconds``, kept as plain numbers on
    the hot path and turned into metric families at scrape time.

    A labelled prometheus_client Counter and Histogram cost about 2.5 us per request (a lock
    per increment, a linear bucket search); this costs a dict lookup and a bisect. Everything
    runs on the event loop thread, so no lock is needed. The exposition is the same as theirs,
    ``_created`` samples included.
    """

    def __init__(self) -> None:
        self.codes: dict[tuple[str, str, int], list[float]] = {}
        """(model, endpoint, code) -> [count, created]"""
        self.queued: dict[str, list[float]] = {}
        """model -> [count per bucket (not cumulative)..., count over the last bound, sum,
        created]"""

    def request_done(self, model: str, endpoint: str, code: int, queued_s: float | None) -> None:
        key = (model, endpoint, code)
        counter = self.codes.get(key)
        if counter is None:
            counter = self.codes[key] = [0.0, time.time()]
        counter[0] += 1
        if queued_s is not None:
            hist = self.queued.get(model)
            if hist is None:
                hist = self.queued[model] = [0.0] * (len(QUEUE_BUCKETS) + 2) + [time.time()]
            hist[bisect.bisect_left(QUEUE_BUCKETS, queued_s)] += 1
            hist[-2] += queued_s

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "llmux_requests",
            "Relayed requests by model, endpoint and status code",
            labels=["model", "endpoint", "code"],
        )
        for (model, endpoint, code), (count, created) in self.codes.items():
            requests.add_metric([model, endpoint, str(code)], count, created=created)
        yield requests
        queue = HistogramMetricFamily(
            "llmux_request_queue_seconds",
            "Time a request waited for its model",
            labels=["model"],
        )
        for model, hist in self.queued.items():
            running = 0.0
            buckets: list[tuple[str, float]] = []
            for le, n in zip(_QUEUE_LE, hist, strict=False):
                running += n
                buckets.append((le, running))
            queue.add_metric([model], buckets, hist[-2])
            queue.samples.append(
                Sample("llmux_request_queue_seconds_created", {"model": model}, hist[-1])
            )
        yield queue

    def describe(self) -> Iterable[Any]:
        return []


class Observer:
    """Metrics registry, a ring of recent events, and live subscribers for /events."""

    def __init__(self, recent: int = 200, subscriber_buffer: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.loads = Counter(
            "llmux_model_loads",
            "Model loads by result",
            ["model", "result"],
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "llmux_model_load_seconds",
            "Time from load start to ready",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.evictions = Counter(
            "llmux_evictions",
            "Models stopped, by reason (priority, ttl, admin, crash, reload)",
            ["model", "reason"],
            registry=self.registry,
        )
        self.sleeps = Counter(
            "llmux_model_sleeps",
            "Models put to sleep instead of stopped, by reason (priority, admin) and result",
            ["model", "reason", "result"],
            registry=self.registry,
        )
        self.wakes = Counter(
            "llmux_model_wakes",
            "Model wakes by result (a failed wake is followed by a cold load)",
            ["model", "result"],
            registry=self.registry,
        )
        self.wake_seconds = Histogram(
            "llmux_model_wake_seconds",
            "Time from wake sent to ready",
            ["model"],
            buckets=WAKE_BUCKETS,
            registry=self.registry,
        )
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self.request_done = self._requests.request_done
        """``request_done(model, endpoint, code, queued_s)``: once per relayed request."""
        self.recent: deque[EventSnapshot] = deque(maxlen=recent)
        self._subscribers: set[asyncio.Queue[EventSnapshot | None]] = set()
        self.closed = False
        """Set by ``close()`` at shutdown: no stream is served any more."""
        self._subscriber_buffer = subscriber_buffer
        self._load_started: dict[str, float] = {}
        self._wake_started: dict[str, float] = {}
        self._sleep_reason: dict[str, str] = {}
        self._snapshot: Callable[[], SchedulerSnapshot] | None = None

    def bind(self, snapshot: Callable[[], SchedulerSnapshot]) -> None:
        """Read the gauges (VRAM, states, in flight, queued) from ``snapshot()`` at scrape time
        (``Scheduler.snapshot``)."""
        self._snapshot = snapshot
        self.registry.register(_StateCollector(self))

    def snapshot(self) -> SchedulerSnapshot:
        assert self._snapshot is not None, "bind() first"
        return self._snapshot()

    def record(self, event: EventSnapshot) -> None:
        kind = event.event
        if kind is Notice.LOADING:
            self._load_started[event.model] = time.monotonic()
        elif kind in (Notice.READY, Notice.LOAD_FAILED):
            started = self._load_started.pop(event.model, None)
            self.loads.labels(event.model, "success" if kind is Notice.READY else "failure").inc()
            if started is not None and kind is Notice.READY:
                self.load_seconds.labels(event.model).observe(time.monotonic() - started)
        elif kind is Notice.UNLOADING and event.reason in EVICTION_REASONS:
            self.evictions.labels(event.model, event.reason).inc()
        elif kind is Notice.CRASHED:
            self.evictions.labels(event.model, "crash").inc()
        elif kind is Notice.SLEEPING:
            reason = event.reason if event.reason in SLEEP_REASONS else SleepReason.PRIORITY.value
            self._sleep_reason[event.model] = reason
        elif kind in (Notice.ASLEEP, Notice.SLEEP_FAILED):
            reason = self._sleep_reason.pop(event.model, SleepReason.PRIORITY.value)
            result = "success" if kind is Notice.ASLEEP else "failure"
            self.sleeps.labels(event.model, reason, result).inc()
        elif kind is Notice.WAKING:
            self._wake_started[event.model] = time.monotonic()
        elif kind in (Notice.AWAKE, Notice.WAKE_FAILED):
            started = self._wake_started.pop(event.model, None)
            self.wakes.labels(event.model, "success" if kind is Notice.AWAKE else "failure").inc()
            if started is not None and kind is Notice.AWAKE:
                self.wake_seconds.labels(event.model).observe(time.monotonic() - started)
        self.recent.append(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a stuck reader loses its stream, not our memory
                self._subscribers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    def subscribe(self) -> asyncio.Queue[EventSnapshot | None]:
        queue: asyncio.Queue[EventSnapshot | None] = asyncio.Queue(self._subscriber_buffer)
        if self.closed:
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        return queue

    def close(self) -> None:
        """llmux is stopping: every stream that never ends by itself (/events, followed logs)
        ends now, so that the server's graceful shutdown waits only for real requests."""
        self.closed = True
        for queue in list(self._subscribers):
            self._subscribers.discard(queue)
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)

    def unsubscribe(self, queue: asyncio.Queue[EventSnapshot | None]) -> None:
        self._subscribers.discard(queue)
