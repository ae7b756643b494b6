"""Forwarding: repaired requests from the outbound queue to the downstream OTLP endpoint.

A request leaves the queue only when the downstream has taken it; then ``on_done`` tells the service, which
acknowledges the write-ahead log records whose traces are now all delivered. A transient failure (the endpoint is
down, ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED`` with retry advice, HTTP 429/502/503/504) is retried with exponential
backoff (from ``retry_initial_s`` doubling to ``retry_max_s``, with jitter) for as long as it takes, so an outage
costs latency, not data: what is not delivered stays in the write-ahead log, on disk, across restarts.

A request refused for its size (``RESOURCE_EXHAUSTED`` without retry advice, as gRPC's message limit answers, or
HTTP 413) is split in two, by trace (by span when it holds one trace), and each half is sent on its own, halving
again as long as the downstream refuses; a single span still too large is a dead letter. Nothing behind it waits
on it for longer than those few round trips.

A permanent refusal (``INVALID_ARGUMENT``, HTTP 400, or spans the downstream rejected in a partial success)
cannot succeed by resending; those requests are written to ``dead-letter/`` beside the queue with the reason,
counted as failed and logged, never dropped silently. The directory is bounded (``dead_letter_max_bytes`` and
``dead_letter_max_requests``): the oldest dead letters are evicted first, and counted.

The exporters are :mod:`otel_tracegen.emit.transport`'s (gRPC or HTTP, every ``OTEL_EXPORTER_OTLP_*`` setting).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import wire
from .buffer import ROOM_WAIT_S
from .metrics import Metrics
from .queue import DiskQueue

log = logging.getLogger(__name__)

EXPORTER = "otlp"  # the exporter label of the Collector-style metrics


IN_HAND_COPIES = 2
"""A request in hand costs twice its size while it is sent: the body read from the queue, and the copy the
exporter hands to gRPC (or the HTTP client)."""
SPLIT_COPIES = 1
"""Splitting a request costs its size again: the two halves (it is split at the wire level, not decoded)."""


class MemoryLedger(Protocol):
    """Where memory in use is counted (:class:`~otel_tracegen.infill.buffer.TraceBuffer`)."""

    def reserve(self, n: int, force: bool = False, wait_s: float = 0.0) -> bool: ...

    def unreserve(self, n: int) -> None: ...


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
    dead_letter_max_bytes: int = 256 << 20
    dead_letter_max_requests: int = 1000


def make_exporter(s: ForwardSettings):
    """An :mod:`otel_tracegen.emit.transport` exporter for ``s``."""
    from ..emit import transport

    if s.protocol == "grpc":
        config = transport.resolve_grpc(s.endpoint, s.insecure, s.headers, s.timeout_s, s.compression)
        return transport.GrpcExporter(dataclasses.replace(config, retry_exhausted_without_advice=False))
    if s.protocol in ("http", "http/protobuf"):
        return transport.HttpExporter(transport.resolve_http(s.endpoint, s.headers, s.timeout_s, s.compression))
    raise ValueError(f"unknown downstream protocol {s.protocol!r}; expected grpc or http/protobuf")


class Forwarder:
    """Sends the queue's requests in order on one thread (``start``/``stop``)."""

    def __init__(self, queue: DiskQueue, exporter, settings: ForwardSettings, metrics: Metrics,
                 dead_letter: str | os.PathLike, on_done: Callable[[int], None] | None = None,
                 ledger: MemoryLedger | None = None) -> None:
        self.queue, self.exporter, self.settings, self.metrics = queue, exporter, settings, metrics
        self.ledger = ledger  # where the request in hand is counted (the receiver's buffer: it pushes back)
        self.on_done = on_done  # called with a record's sequence number once it is delivered or a dead letter
        self.span_counts: dict[int, int] = {}  # record -> spans, when the writer knows (saves walking the body)
        self.dead_letter = Path(dead_letter)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self.last_error: str | None = None
        self._dead_letters = 0
        self.dead_letter_bytes = sum(p.stat().st_size for p in self.dead_letter.glob("request-*.binpb"))

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
        """Deliver one queued request, retrying transient failures until it is delivered, refused for good, or
        split and delivered in parts (True), or the forwarder stops (False)."""
        spans = self.span_counts.pop(seq, None)
        if spans is None:
            spans = wire.count_spans(body)
        return self._deliver(seq, body, spans)

    @contextmanager
    def _counted(self, nbytes: int):
        """``nbytes`` in hand, counted in the ledger while the block runs."""
        if self.ledger is None:
            yield
            return
        self.ledger.reserve(nbytes, force=True, wait_s=ROOM_WAIT_S)
        try:
            yield
        finally:
            self.ledger.unreserve(nbytes)

    def _deliver(self, seq: int, body: bytes, spans: int) -> bool:
        with self._counted(IN_HAND_COPIES * len(body)):
            return self._attempt(seq, body, spans)

    def _attempt(self, seq: int, body: bytes, spans: int) -> bool:
        delay = self.settings.retry_initial_s
        while not self._stop.is_set():
            outcome = self.exporter.export(body, spans)
            if outcome.failed_spans == 0:
                self.metrics.inc("exporter_sent_spans_total", outcome.sent_spans, exporter=EXPORTER)
                self.last_error = None
                return True
            self.last_error = outcome.error
            if getattr(outcome, "too_large", False) and outcome.sent_spans == 0:
                parts = self._split(body)
                if parts is not None:
                    log.warning("downstream refused a request of %d bytes (%s); sending it in two parts of %d and "
                                "%d bytes", len(body), outcome.error, len(parts[0]), len(parts[1]))  # fmt: skip
                    self.metrics.inc("export_splits_total")
                    return all(self._deliver(seq, part, wire.count_spans(part)) for part in parts)
                return self._refused(seq, body, outcome, f"too large for the downstream, even alone: {outcome.error}")
            if outcome.retryable and outcome.sent_spans == 0:
                self.metrics.inc("export_retries_total")
                log.warning("downstream export failed (%s); retrying in %.1fs (the request stays queued on disk)",
                            outcome.error, delay)  # fmt: skip
                if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                    return False
                delay = min(delay * 2, self.settings.retry_max_s)
                continue
            return self._refused(seq, body, outcome, outcome.error or "refused")
        return False

    def _split(self, body: bytes) -> tuple[bytes, bytes] | None:
        with self._counted(SPLIT_COPIES * len(body)):  # the two halves
            return split_in_two(body)

    def _refused(self, seq: int, body: bytes, outcome, reason: str) -> bool:
        """A refusal for good: keep the request as a dead letter, then count it."""
        path = self._dead_letter(seq, body, reason)
        self.metrics.inc("exporter_sent_spans_total", outcome.sent_spans, exporter=EXPORTER)
        self.metrics.inc("exporter_send_failed_spans_total", outcome.failed_spans, exporter=EXPORTER)
        log.error("downstream refused %d span(s) for good: %s; the request is kept in %s", outcome.failed_spans,
                  reason, path)  # fmt: skip
        return True

    def _dead_letter(self, seq: int, body: bytes, reason: str) -> Path:
        """Write a dead letter (the request, and a JSON file saying why), then evict the oldest while the
        directory holds more than ``dead_letter_max_bytes``."""
        self.dead_letter.mkdir(parents=True, exist_ok=True)
        self._dead_letters += 1  # a request split in parts may leave several: never overwrite one
        base = self.dead_letter / f"request-{seq:016d}-{time.time_ns():019d}-{self._dead_letters:06d}"
        tmp = base.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, base.with_suffix(".binpb"))
        base.with_suffix(".json").write_text(json.dumps({"seq": seq, "reason": reason, "time": time.time()}) + "\n")
        self.metrics.inc("dead_letter_requests_total")
        self._evict_dead_letters()
        return base.with_suffix(".binpb")

    def _evict_dead_letters(self) -> None:
        letters = sorted(self.dead_letter.glob("request-*.binpb"), key=lambda p: p.name)
        sizes = {p: p.stat().st_size for p in letters}
        total, count = sum(sizes.values()), len(letters)
        bound = self.settings
        for p in letters[:-1]:  # the newest one stays, even alone over the bound: it is the one just refused
            if total <= bound.dead_letter_max_bytes and count <= bound.dead_letter_max_requests:
                break
            total -= sizes[p]
            count -= 1
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
            self.metrics.inc("dead_letter_evicted_total")
            log.warning("dead-letter directory over its bound (%d bytes, %d requests): evicted the oldest, %s",
                        bound.dead_letter_max_bytes, bound.dead_letter_max_requests, p.name)  # fmt: skip
        self.dead_letter_bytes = total


def split_in_two(body: bytes) -> tuple[bytes, bytes] | None:
    """``body`` (a request) as two requests of about half its size each: whole traces where it holds more than
    one, else halves of its one trace's spans; None for a single span. Read at the wire level (the spans are not
    decoded: a split costs the two halves, not the spans' attributes)."""
    spans = wire.raw_spans(body)
    if len(spans) < 2:
        return None
    by_trace: dict[bytes, list[wire.RawSpan]] = {}
    for w in spans:
        by_trace.setdefault(w.trace_id, []).append(w)
    groups = list(by_trace.values()) if len(by_trace) > 1 else [[w] for w in spans]
    total = sum(len(w.raw) for w in spans)
    first: list[wire.RawSpan] = []
    size, k = 0, 0
    while k < len(groups) - 1 and (not first or size + sum(len(w.raw) for w in groups[k]) <= total / 2):
        first += groups[k]
        size += sum(len(w.raw) for w in groups[k])
        k += 1
    rest = [w for g in groups[k:] for w in g]
    return wire.encode(first), wire.encode(rest)
