"""Request metrics in the Prometheus text exposition format (version 0.0.4) for `GET /metrics`.

Hand-written because `prometheus_client` is not part of this environment (nor of the `serve` extra); what the app
needs — labelled counters, a latency histogram and a few gauges read at scrape time — is small enough to render
directly, and the output parses with any Prometheus scraper.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict
from typing import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.latency: dict[str, list[int]] = {}  # endpoint -> bucket counts (last = +Inf)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, tuple[str, Callable[[], dict[tuple, float] | float]]] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            counts = self.latency.setdefault(endpoint, [0] * (len(BUCKETS) + 1))
            counts[bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum[endpoint] += seconds

    def gauge(self, name: str, help_text: str, read: Callable[[], dict[tuple, float] | float]) -> None:
        """A value read at scrape time: a number, or {((label, value), ...): number}."""
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines = ["# HELP llmrec_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE llmrec_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f"llmrec_requests_total{_labels(endpoint=endpoint, status=str(status))} {n}")
            lines += ["# HELP llmrec_request_seconds Request latency.", "# TYPE llmrec_request_seconds histogram"]
            for endpoint, counts in sorted(self.latency.items()):
                total = 0
                for bound, n in zip((*BUCKETS, "+Inf"), counts):
                    total += n
                    lines.append(f"llmrec_request_seconds_bucket{_labels(endpoint=endpoint, le=str(bound))} {total}")
                lines.append(f"llmrec_request_seconds_sum{_labels(endpoint=endpoint)} {self.latency_sum[endpoint]:.6f}")
                lines.append(f"llmrec_request_seconds_count{_labels(endpoint=endpoint)} {total}")
        for name, (help_text, read) in sorted(self.gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            value = read()
            items = value.items() if isinstance(value, dict) else [((), value)]
            for labels, v in items:
                lines.append(f"{name}{_labels(**dict(labels))} {float(v):g}")
        return "\n".join(lines) + "\n"
