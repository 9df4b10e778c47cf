"""Prometheus metrics of the server (its own CollectorRegistry): traffic, batching, and the runtime's stats.

Traffic and batching are counted as they happen; the runtime's figures (rows per exit, FLOPs
saved, live agreement, learning, drift) are read from ``rt.stats()`` at scrape time.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .batching import BatchObserver

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "layer_cache"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _RuntimeCollector:
    """Exposes the runtime's ``stats()`` and the checkpoint state at scrape time."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []   # no metrics at registration time: stats() needs a loaded runtime

    def collect(self):
        svc = self.service
        model = svc.config.name
        ck = svc.checkpointer
        if ck is not None:
            age = GaugeMetricFamily(f"{PREFIX}_checkpoint_age_seconds",
                                    "Seconds since learned state was last written to the state dir "
                                    "(or found there at start)", labels=["model"])
            if ck.last_time is not None:
                age.add_metric([model], time.time() - ck.last_time)
                yield age
            n = CounterMetricFamily(f"{PREFIX}_checkpoints", "Checkpoints written",
                                    labels=["model"])
            n.add_metric([model], ck.count)
            yield n
        rt = svc.rt
        if rt is None:
            return
        s = rt.stats()
        names = s.get("exit_names") or [str(i) for i in range(len(s.get("rows_per_exit", [])))]
        rows = CounterMetricFamily(f"{PREFIX}_exit_rows", "Rows answered at each exit "
                                   "('backbone': the whole model)", labels=["model", "exit"])
        for name, n in zip(names, s.get("rows_per_exit", [])):
            rows.add_metric([model, name], n)
        yield rows
        enabled = GaugeMetricFamily(f"{PREFIX}_exit_enabled", "1 if the exit answers rows now",
                                    labels=["model", "exit"])
        for name, on in zip(names, s.get("enabled", [])):
            enabled.add_metric([model, name], 1.0 if on else 0.0)
        yield enabled
        g = GaugeMetricFamily(f"{PREFIX}_flops_saved_ratio", "Share of backbone FLOPs saved "
                              "(estimate; heads counted)", labels=["model"])
        g.add_metric([model], float(s.get("flops_saved") or 0.0) if s.get("rows") else 0.0)
        yield g
        if s.get("live_agreement") is not None:
            g = GaugeMetricFamily(f"{PREFIX}_live_agreement_ratio", "Agreement of the answers "
                                  "with the backbone, measured on shadow rows", labels=["model"])
            g.add_metric([model], float(s["live_agreement"]))
            yield g
        c = CounterMetricFamily(f"{PREFIX}_shadow_rows", "Rows run whole to check the exits",
                                labels=["model"])
        c.add_metric([model], s.get("shadow_rows", 0))
        yield c
        learning = s.get("learning") or {}
        c = CounterMetricFamily(f"{PREFIX}_learning_rounds", "Learning rounds run",
                                labels=["model"])
        c.add_metric([model], learning.get("rounds", 0))
        yield c
        c = CounterMetricFamily(f"{PREFIX}_learning_seconds", "Time spent in learning rounds",
                                labels=["model"])
        c.add_metric([model], float(learning.get("train_seconds", 0.0)))
        yield c
        if "independent_rows_needed" in learning:
            g = GaugeMetricFamily(f"{PREFIX}_held_out_independent_rows", "Held-out rows "
                                  "calibration has, divided by the traffic's design effect",
                                  labels=["model"])
            g.add_metric([model], float(learning["held_out_independent_rows"]))
            yield g
            g = GaugeMetricFamily(f"{PREFIX}_independent_rows_needed", "Fewest independent "
                                  "held-out rows with which any exit could switch on",
                                  labels=["model"])
            g.add_metric([model], float(learning["independent_rows_needed"]))
            yield g
        if "deferred_rows_dropped" in learning:
            c = CounterMetricFamily(f"{PREFIX}_untaught_rows", "Rows that would have taught "
                                    "the heads but found the deferred-teaching queue full "
                                    "(the service is saturated: learning slows)",
                                    labels=["model"])
            c.add_metric([model], learning["deferred_rows_dropped"])
            yield c
        if "warmup_share" in learning:
            g = GaugeMetricFamily(f"{PREFIX}_teaching_share_ratio", "Share of requests that "
                                  "teach the heads while no exit is on (lowered while the "
                                  "exits would not pay)", labels=["model"])
            g.add_metric([model], float(learning["warmup_share"]))
            yield g
        c = CounterMetricFamily(f"{PREFIX}_drift_events", "Drift alarms (every exit switched "
                                "off, heads relearn)", labels=["model"])
        c.add_metric([model], s.get("drift_events", 0))
        yield c
        if hasattr(rt, "learning_paused"):
            g = GaugeMetricFamily(f"{PREFIX}_learning_paused", "1 while learning is paused",
                                  labels=["model"])
            g.add_metric([model], 1.0 if rt.learning_paused else 0.0)
            yield g


class ServerMetrics(BatchObserver):
    """Every metric of one server; ``render()`` is the ``/metrics`` body."""

    def __init__(self, service, depth: Callable[[], int]):
        self.model = service.config.name
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Inference requests by HTTP status",
                                ["model", "status"], registry=r)
        self.rows = Counter(f"{PREFIX}_rows", "Rows in inference requests by HTTP status",
                            ["model", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Inference request time "
                                 "from body received to answer encoded", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited for "
                                    "its batch", ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram(f"{PREFIX}_batch_rows", "Rows per batch given to the runtime",
                                    ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram(f"{PREFIX}_batch_requests", "Requests per batch",
                                        ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(f"{PREFIX}_batch_seconds", "Runtime time per batch",
                                       ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.dropped = Counter(f"{PREFIX}_dropped_requests", "Requests dropped before running "
                               "(client gone or deadline passed)", ["model", "reason"], registry=r)
        depth_gauge = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a batch", ["model"],
                            registry=r)
        depth_gauge.labels(self.model).set_function(lambda: float(depth()))
        r.register(_RuntimeCollector(service))
        # Children looked up once: labels() takes a lock and hashes its tuple on every call.
        self._latency = self.latency.labels(self.model)
        self._queue_wait = self.queue_wait.labels(self.model)
        self._batch_rows = self.batch_rows.labels(self.model)
        self._batch_requests = self.batch_requests.labels(self.model)
        self._batch_seconds = self.batch_seconds.labels(self.model)
        self._by_status: dict = {}

    def observe_request(self, status: int, rows: int, seconds: float):
        children = self._by_status.get(status)
        if children is None:
            children = self._by_status[status] = (self.requests.labels(self.model, str(status)),
                                                  self.rows.labels(self.model, str(status)))
        children[0].inc()
        if rows:
            children[1].inc(rows)
        self._latency.observe(seconds)

    # BatchObserver
    def on_batch(self, rows: int, requests: int, seconds: float):
        self._batch_rows.observe(rows)
        self._batch_requests.observe(requests)
        self._batch_seconds.observe(seconds)

    def on_queue_wait(self, seconds: float):
        self._queue_wait.observe(seconds)

    def on_dropped(self, reason: str, rows: int):
        self.dropped.labels(self.model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
