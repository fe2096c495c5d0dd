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
        self._scraped: dict[str, ReadAtScrape] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def gauge(self, name: str, help_text: str, read: Read, label: str | None = None) -> None:
        self._read_at_scrape(ReadAtScrape(GaugeMetricFamily, name, help_text, read, label))

    def counter(self, name: str, help_text: str, read: Read, label: str | None = None) -> None:
        """`name` ends in `_total`, as exposed."""
        self._read_at_scrape(ReadAtScrape(CounterMetricFamily, name, help_text, read, label))

    def _read_at_scrape(self, collector: ReadAtScrape) -> None:
        # a name registered again (a new app over the same state) reads from the new source
        if collector.name in self._scraped:
            self.registry.unregister(self._scraped[collector.name])
        self._scraped[collector.name] = collector
        self.registry.register(collector)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def read_server_counts(m: Metrics, state) -> None:
    """What /metrics shows besides the requests: read from the server state (serve/state.py) at scrape time."""
    m.gauge("llmrec_queue_items", "Items waiting for the engine.", state.batched.queued)
    m.gauge("llmrec_index_songs", "Songs in the ANN index.", lambda: len(state.index))
    m.counter("llmrec_engine_batches_total", "Engine calls by operation.",
              lambda: {op: s["batches"] for op, s in state.batched.stats().items()}, label="op")
    m.counter("llmrec_engine_items_total", "Items computed by operation.",
              lambda: {op: s["items"] for op, s in state.batched.stats().items()}, label="op")
    m.counter("llmrec_overloaded_total", "Requests refused with 503 (queue full).", state.batched.overloaded)
    m.counter("llmrec_timeouts_total", "Requests answered with 504.",
              lambda: sum(s["timeouts"] for s in state.batched.stats().values()))
    m.counter("llmrec_sanitizer_repairs_total", "Repairs made by the text sanitiser on request text, by kind.",
              lambda: dict(state.inputs.stats), label="kind")
    m.counter("llmrec_reasons_total", "Reasons returned by source (model: a verified answer; evidence: the plain "
              "evidence sentence; generic: no evidence), and answers not generated because the prompt overflowed.",
              lambda: dict(sorted(state.reasons.counts.items())), label="source")
