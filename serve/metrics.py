"""Request metrics for `GET /metrics`, with `prometheus_client`.

Each `Metrics` owns its `CollectorRegistry` (not the process-wide default one), so several apps in one process (the
tests, the demo) count apart. Requests are counted and timed here; the rest (queue, batches, sanitiser repairs,
reasons) is already counted where it happens and is read at scrape time.
"""
from __future__ import annotations

from typing import Callable, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# No `*_created` series: the exposition stays the series dashboards already chart (requests, latency, the values
# below), without one timestamp series per label set. prometheus_client has only a process-wide switch for this;
# the server process exposes no other registry.
prometheus_client.disable_created_metrics()

Read = Callable[[], "float | Mapping[str, float]"]


class ReadAtScrape:
    """A collector for one value the server counts elsewhere: `read()` returns a number, or {label value: number}
    for the one label `label`."""

    def __init__(self, family: type, name: str, help_text: str, read: Read, label: str | None = None):
        self.family, self.name, self.help_text, self.read, self.label = family, name, help_text, read, label

    def collect(self):
        family = self.family(self.name, self.help_text, labels=[self.label] if self.label else None)
        value = self.read()
        if self.label:
            for key, v in value.items():
                family.add_metric([str(key)], float(v))
        else:
            family.add_metric([], float(value))
        yield family


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        # a counter named `llmrec_requests_total` is exposed under that name (prometheus_client adds the `_total`)
        self.requests = Counter("llmrec_requests_total", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("llmrec_request_seconds", "Request latency.", ["endpoint"], buckets=BUCKETS,
                                 registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def gauge(self, name: str, help_text: str, read: Read, label: str | None = None) -> None:
        self.registry.register(ReadAtScrape(GaugeMetricFamily, name, help_text, read, label))

    def counter(self, name: str, help_text: str, read: Read, label: str | None = None) -> None:
        """`name` ends in `_total`, as exposed."""
        self.registry.register(ReadAtScrape(CounterMetricFamily, name, help_text, read, label))

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
