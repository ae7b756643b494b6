"""The receiver's self-metrics, served as Prometheus text on ``/metrics`` (exposition format 0.0.4).

Where the OpenTelemetry Collector has a metric for the same thing, ours has its name and labels with the prefix
``otel_tracegen_infill_`` in place of ``otelcol_`` (``otelcol_receiver_accepted_spans_total{receiver,transport}``
becomes ``otel_tracegen_infill_receiver_accepted_spans_total{receiver="otlp",transport="grpc"}``), so that a
Collector dashboard's queries carry over with the prefix changed. The project's own metrics stand beside them
where the Collector has none (repairs, the trace buffer, the write-ahead log, dead letters). Counters only ever
grow, gauges are read when scraped; names follow Prometheus conventions (``_total`` on counters, base units).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

PREFIX = "otel_tracegen_infill_"

HELP = {
    # --- as the Collector names them ---
    "receiver_accepted_spans_total": "Spans successfully pushed into the pipeline (as otelcol_receiver_accepted_spans).",
    "receiver_refused_spans_total": "Spans that could not be pushed into the pipeline: malformed, or refused under "
                                    "pressure (as otelcol_receiver_refused_spans).",
    "exporter_sent_spans_total": "Spans successfully sent downstream (as otelcol_exporter_sent_spans).",
    "exporter_send_failed_spans_total": "Spans the downstream refused for good; kept as dead letters (as "
                                        "otelcol_exporter_send_failed_spans).",
    "exporter_queue_size": "Bytes accepted and not yet delivered: the write-ahead log (as otelcol_exporter_queue_size, "
                           "with the bytes sizer).",
    "exporter_queue_capacity": "Bytes the write-ahead log may hold before requests are refused (queue.max_mib; as "
                               "otelcol_exporter_queue_capacity).",
    "process_memory_rss_bytes": "Resident memory of the process (as otelcol_process_memory_rss).",
    # --- the project's own ---
    "refused_requests_total": "Whole requests refused, by reason (malformed, unauthenticated, buffer_full, queue_full, "
                              "memory_limit, too_large, content_type, unavailable, timeout).",
    "malformed_spans_total": "Malformed spans refused inside otherwise accepted requests (partial success).",
    "released_traces_total": "Traces released from the buffer to repair.",
    "repaired_traces_total": "Released traces that needed a repair, by reason.",
    "repaired_spans_total": "Spans added or changed by repair, by reason.",
    "repairs_total": "Repairs by method (model, rule, catalog, none).",
    "repair_failures_total": "Traces forwarded unrepaired because their repair raised (a bug: see the log).",
    "export_retries_total": "Downstream export attempts that failed transiently and will be retried.",
    "export_splits_total": "Requests the downstream refused as too large, split in two and sent again.",
    "dead_letter_requests_total": "Requests written to the dead-letter directory.",
    "dead_letter_evicted_total": "Dead letters deleted, oldest first, to keep the directory within its bound.",
    "dead_letter_bytes": "Bytes in the dead-letter directory.",
    "buffered_traces": "Traces held in the wait window or waiting for repair.",
    "buffered_spans": "Spans held in the wait window or waiting for repair.",
    "buffer_memory_bytes": "Memory the trace buffer accounts for (held spans, remembered traces).",
    "buffer_memory_capacity_bytes": "The buffer's bound (buffer.max_mib); requests are refused beyond it.",
    "outbound_requests": "Repaired requests on disk waiting to be forwarded.",
    "log_records": "Accepted requests in the write-ahead log whose traces are not all delivered yet.",
}

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(key: Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(x))}"' for k, x in key) + "}" if key else ""


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, tuple[Labels, Callable[[], float]]] = {}

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        if name not in HELP:
            raise KeyError(f"unknown metric {name!r}")
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + n

    def gauge(self, name: str, read: Callable[[], float], **labels: str) -> None:
        if name not in HELP:
            raise KeyError(f"unknown metric {name!r}")
        self._gauges[name] = (tuple(sorted(labels.items())), read)

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (all label sets summed when ``labels`` is empty), or a gauge's."""
        if name not in HELP:
            raise KeyError(f"unknown metric {name!r}")
        if name in self._gauges:
            return float(self._gauges[name][1]())
        with self._lock:
            series = self._counters.get(name, {})
            if labels:
                return series.get(tuple(sorted(labels.items())), 0)
            return sum(series.values())

    def render(self) -> str:
        lines = []
        with self._lock:
            counters = {k: dict(v) for k, v in self._counters.items()}
        for name, text in HELP.items():
            full = PREFIX + name
            if name in self._gauges:
                key, read = self._gauges[name]
                lines += [f"# HELP {full} {text}", f"# TYPE {full} gauge", f"{full}{_label_text(key)} {float(read())}"]
            elif name.endswith("_total"):
                lines += [f"# HELP {full} {text}", f"# TYPE {full} counter"]
                for key, v in sorted((counters.get(name) or {(): 0}).items()):
                    lines.append(f"{full}{_label_text(key)} {float(v)}")
        return "\n".join(lines) + "\n"
