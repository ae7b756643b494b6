"""The receiver's self-metrics, served as Prometheus text on ``/metrics`` (exposition format 0.0.4).

Counters only ever grow, gauges are read when scraped. Names follow Prometheus conventions (``_total`` on
counters, base units) under ``otel_tracegen_infill_``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

PREFIX = "otel_tracegen_infill_"

HELP = {
    "received_spans_total": "Spans accepted from OTLP requests.",
    "rejected_spans_total": "Malformed spans refused inside otherwise accepted requests (partial success).",
    "refused_requests_total": "Whole requests refused, by reason.",
    "released_traces_total": "Traces released from the buffer to repair.",
    "repaired_traces_total": "Released traces that needed a repair, by reason.",
    "repaired_spans_total": "Spans added or changed by repair, by reason.",
    "repairs_total": "Repairs by method (model, rule, catalog, none).",
    "repair_failures_total": "Traces forwarded unrepaired because their repair raised (a bug: see the log).",
    "forwarded_spans_total": "Spans delivered downstream.",
    "export_retries_total": "Downstream export attempts that failed transiently and will be retried.",
    "failed_spans_total": "Spans the downstream refused for good (kept in the dead-letter directory).",
    "buffered_traces": "Traces held in the wait window.",
    "buffered_spans": "Spans held in the wait window.",
    "queued_requests": "Repaired requests on disk waiting to be forwarded.",
    "queued_bytes": "Bytes of repaired requests on disk waiting to be forwarded.",
    "log_records": "Accepted requests in the write-ahead log whose traces are not all queued yet.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + n

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (all label sets summed when ``labels`` is empty), or a gauge's."""
        if name in self._gauges:
            return float(self._gauges[name]())
        with self._lock:
            series = self._counters.get(name, {})
            if labels:
                return series.get(tuple(sorted(labels.items())), 0)
            return sum(series.values())

    def render(self) -> str:
        lines = []
        with self._lock:
            counters = {k: dict(v) for k, v in self._counters.items()}
        for name in HELP:
            full = PREFIX + name
            if name in self._gauges:
                lines += [f"# HELP {full} {HELP[name]}", f"# TYPE {full} gauge", f"{full} {float(self._gauges[name]())}"]
            elif name.endswith("_total"):
                lines += [f"# HELP {full} {HELP[name]}", f"# TYPE {full} counter"]
                series = counters.get(name) or {(): 0}
                for key, v in sorted(series.items()):
                    label = ",".join(f'{k}="{_escape(str(x))}"' for k, x in key)
                    lines.append(f"{full}{{{label}}} {float(v)}" if label else f"{full} {float(v)}")
        return "\n".join(lines) + "\n"
