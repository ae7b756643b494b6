"""Forwarding: repaired requests from the outbound queue to the downstream OTLP endpoint.

A request leaves the queue only when the downstream has taken it; then ``on_done`` tells the service, which
acknowledges the write-ahead log records whose traces are now all delivered. A transient failure (the endpoint is
down, ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``, HTTP 429/502/503/504) is retried with exponential backoff (from
``retry_initial_s`` doubling to ``retry_max_s``, with jitter) for as long as it takes, so an outage costs latency,
not data: what is not delivered stays in the write-ahead log, on disk, across restarts. A permanent refusal
(``INVALID_ARGUMENT``, HTTP 400, or spans the downstream rejected in a partial success) cannot succeed by
resending; those requests are written to ``dead-letter/`` beside the queue with the reason, counted as failed and
logged, never dropped silently.

The exporters are :mod:`otel_tracegen.otlp_native`'s (gRPC or HTTP, every ``OTEL_EXPORTER_OTLP_*`` setting).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import wire
from .metrics import Metrics
from .queue import DiskQueue

log = logging.getLogger(__name__)


@dataclass
class ForwardSettings:
    endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else the OTLP default
    protocol: str = "grpc"  # grpc | http/protobuf
    insecure: bool | None = None
    headers: dict | None = None
    compression: str | None = None
    timeout_s: float = 10.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0


def make_exporter(s: ForwardSettings):
    """An :mod:`otel_tracegen.otlp_native` exporter for ``s``."""
    from .. import otlp_native

    if s.protocol == "grpc":
        return otlp_native.GrpcExporter(otlp_native.resolve_grpc(s.endpoint, s.insecure, s.headers, s.timeout_s,
                                                                 s.compression))  # fmt: skip
    if s.protocol in ("http", "http/protobuf"):
        return otlp_native.HttpExporter(otlp_native.resolve_http(s.endpoint, s.headers, s.timeout_s, s.compression))
    raise ValueError(f"unknown downstream protocol {s.protocol!r}; expected grpc or http/protobuf")


class Forwarder:
    """Sends the queue's requests in order on one thread (``start``/``stop``)."""

    def __init__(self, queue: DiskQueue, exporter, settings: ForwardSettings, metrics: Metrics,
                 dead_letter: str | os.PathLike, on_done: Callable[[int], None] | None = None) -> None:
        self.queue, self.exporter, self.settings, self.metrics = queue, exporter, settings, metrics
        self.on_done = on_done  # called with a record's sequence number once it is delivered or a dead letter
        self.span_counts: dict[int, int] = {}  # record -> spans, when the writer knows (saves walking the body)
        self.dead_letter = Path(dead_letter)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="infill-forward", daemon=True)
        self._thread.start()

    def drain(self, timeout_s: float) -> bool:
        """Wait until the queue is empty (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.queue) == 0:
                return True
            time.sleep(0.05)
        return len(self.queue) == 0

    def stop(self) -> None:
        self._stop.set()
        if self.exporter is not None:
            self.exporter.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        after = -1
        delay = self.settings.retry_initial_s
        while not self._stop.is_set():
            try:
                item = self.queue.next(after, timeout=0.2)
                if item is None:
                    if self.queue.closed:
                        return
                    continue
                seq, body = item
                if self._send(seq, body):
                    self.queue.ack(seq)
                    after = seq
                    if self.on_done is not None:
                        self.on_done(seq)
                # else: stopping; the traces stay in the write-ahead log for the next start
                delay = self.settings.retry_initial_s
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure (a full disk, a bug)
                log.exception("forwarding failed; trying again in %.1fs (nothing is dropped)", delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.settings.retry_max_s)

    def _send(self, seq: int, body: bytes) -> bool:
        """Deliver one request, retrying transient failures until it is delivered or refused for good (True), or
        the forwarder stops (False)."""
        spans = self.span_counts.pop(seq, None)
        if spans is None:
            spans = wire.count_spans(body)
        delay = self.settings.retry_initial_s
        while not self._stop.is_set():
            outcome = self.exporter.export(body, spans)
            if outcome.failed_spans == 0:
                self.metrics.inc("forwarded_spans_total", outcome.sent_spans)
                self.last_error = None
                return True
            self.last_error = outcome.error
            if outcome.retryable and outcome.sent_spans == 0:
                self.metrics.inc("export_retries_total")
                log.warning("downstream export failed (%s); retrying in %.1fs (the request stays queued on disk)",
                            outcome.error, delay)  # fmt: skip
                if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                    return False
                delay = min(delay * 2, self.settings.retry_max_s)
                continue
            self.metrics.inc("forwarded_spans_total", outcome.sent_spans)
            self.metrics.inc("failed_spans_total", outcome.failed_spans)
            path = self._dead_letter(seq, body, outcome.error or "refused")
            log.error("downstream refused %d span(s) for good: %s; the request is kept in %s", outcome.failed_spans,
                      outcome.error, path)  # fmt: skip
            return True
        return False

    def _dead_letter(self, seq: int, body: bytes, reason: str) -> Path:
        self.dead_letter.mkdir(parents=True, exist_ok=True)
        base = self.dead_letter / f"request-{seq:016d}"
        tmp = base.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, base.with_suffix(".binpb"))
        base.with_suffix(".json").write_text(json.dumps({"seq": seq, "reason": reason, "time": time.time()}) + "\n")
        return base.with_suffix(".binpb")
