"""The per-request metrics are kept by hand on the hot path (observe._RequestCollector); their
exposition must be what prometheus_client's own Counter and Histogram write for the same
requests, so that dashboards cannot tell the difference."""

from __future__ import annotations

import random
import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from llmux.observe import QUEUE_BUCKETS, Observer
from llmux.scheduling.snapshot import SchedulerSnapshot

# Waits on and around the bucket bounds (a bound itself counts in its bucket), past the last
# one, and None (a request answered before it waited: no queue time).
WAITS = [None, 0.0, 0.0005, *QUEUE_BUCKETS, 0.0100001, 0.75, 299.999, 300.5, 1e4]


def exposition(registry: CollectorRegistry) -> str:
    text = generate_latest(registry).decode()
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text)  # creation times differ


def test_request_metrics_expose_as_prometheus_client_would() -> None:
    observer = Observer()
    observer.bind(lambda: SchedulerSnapshot(1.0, 0.0, None, ()))
    reference = CollectorRegistry(auto_describe=False)
    requests = Counter(
        "llmux_requests",
        "Relayed requests by model, endpoint and status code",
        ["model", "endpoint", "code"],
        registry=reference,
    )
    queue = Histogram(
        "llmux_request_queue_seconds",
        "Time a request waited for its model",
        ["model"],
        buckets=QUEUE_BUCKETS,
        registry=reference,
    )
    rng = random.Random(5)
    for _ in range(600):
        model = rng.choice(["chat", "asr", ""])
        endpoint = rng.choice(["/v1/chat/completions", "/v1/audio/speech"])
        code = rng.choice([200, 200, 404, 499, 502])
        waited = rng.choice(WAITS)
        observer.request_done(model, endpoint, code, waited)
        requests.labels(model, endpoint, str(code)).inc()
        if waited is not None:
            queue.labels(model).observe(waited)

    ours = exposition(observer.registry)
    theirs = exposition(reference)
    ours_lines = [line for line in ours.splitlines() if "llmux_request" in line]
    assert ours_lines == theirs.splitlines()
    assert 'llmux_request_queue_seconds_bucket{le="300.0",model="chat"}' in ours
    assert 'llmux_requests_total{code="499",endpoint="/v1/audio/speech",model="asr"}' in ours
