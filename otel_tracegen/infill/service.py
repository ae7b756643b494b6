"""The infill receiver as one running service: receive -> log -> buffer -> repair -> queue -> forward.

Where accepted data lives at each moment, so that nothing acknowledged is lost (at-least-once):

1. **Accepted.** The accepted spans of a request are appended to the write-ahead log (``<queue dir>/inbound``,
   fsynced; concurrent requests share one fsync) *before* the client gets its answer. A request the receiver
   cannot take (its queue is full) is refused with ``RESOURCE_EXHAUSTED`` / 503 and retry advice, never taken and
   dropped.
2. **Held.** The spans wait in the :class:`~otel_tracegen.infill.buffer.TraceBuffer` for their trace.
3. **Repaired.** A released trace is repaired and written, as OTLP requests, to the outbound queue
   (``<queue dir>/outbound``: a spill to disk, not fsynced, because the log still holds every trace in it).
4. **Forwarded.** The :class:`~otel_tracegen.infill.forward.Forwarder` sends queued requests in order. A log
   record is acknowledged (and may be deleted) only once every trace that had spans in it was delivered
   downstream, or kept as a dead letter.

The log is thus the one durable copy of everything not yet delivered. A restart (also after ``kill -9``) drops
whatever the outbound queue held (all of it is still in the log) and replays the log's unacknowledged records
into the buffer: traces caught between delivery and their log acknowledgement are sent twice, never zero times.
A graceful stop (SIGTERM, SIGINT) stops receiving, releases every held trace, and forwards what is queued for up
to ``drain_s`` seconds; what is left stays in the log for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

from ..report import ReadReport
from ..trace import Trace
from . import wire
from .buffer import ROOM_WAIT_S, ReleasedTrace, TraceBuffer
from .config import InfillConfig
from .forward import EXPORTER, Forwarder, make_exporter
from .metrics import Metrics
from .queue import DiskQueue, write_copies
from .repair import Repaired, TraceRepairer
from .wire import held_bytes

__all__ = ["InfillConfig", "InfillService", "Pressure", "TooLarge", "load_repairer", "resident_bytes"]

log = logging.getLogger(__name__)


RECEIVER = "otlp"  # the receiver label of the Collector-style metrics


class Pressure(Exception):
    """The receiver cannot take more now (``RESOURCE_EXHAUSTED`` / HTTP 503); ``retry_after_s`` is the advice."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooLarge(Exception):
    """A request that can never fit (``RESOURCE_EXHAUSTED`` without retry advice / HTTP 413)."""


def resident_bytes() -> int:
    """The process's resident memory (RSS) now, from ``/proc/self/statm``; 0 where there is none."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class GroupCommit:
    """Appends to a :class:`DiskQueue` from many receiver threads, written together: the requests that arrive
    while one fsync runs share the next one (group commit, as databases do). An fsync costs milliseconds, and
    one per request would cap the receiver at a few hundred requests per second; each caller still returns only
    once its own record is durable."""

    def __init__(self, queue: DiskQueue) -> None:
        self.queue = queue
        self._cond = threading.Condition()
        self._waiting: list[list] = []  # [payload, seq or None, error or None]
        self._busy = False

    def append(self, payload: bytes) -> int:
        slot: list = [payload, None, None]
        with self._cond:
            self._waiting.append(slot)
            while slot[1] is None and slot[2] is None:
                if self._busy:
                    self._cond.wait()
                    continue
                batch, self._waiting = self._waiting, []  # this thread writes everyone's records
                self._busy = True
                self._cond.release()
                try:
                    try:
                        for s, seq in zip(batch, self.queue.append_many([s[0] for s in batch])):
                            s[1] = seq
                    except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
                        for s in batch:
                            s[2] = e
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if slot[2] is not None:
            raise slot[2]
        return slot[1]


def tune_gc() -> None:
    """For a long-running receiver: held spans are many small objects in no reference cycles, so the cyclic
    collector's full scans of a growing heap are pure cost (a third of the pass-through time at default
    thresholds). Collect less often, and move what was loaded at start (the model) out of its sight."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


def tune_malloc() -> bool:
    """Keep the C allocator from holding on to freed memory (glibc only; True when applied).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which request bodies and
    encoded requests of a few MiB come from the heap and its per-thread arenas, which keep them after they are
    freed: RSS then climbs past what the receiver holds. A fixed threshold and two arenas keep RSS near the live
    memory, which the buffer's bound is about. The threshold is 32 KiB, not glibc's initial 128 KiB: a large body
    arrives in chunks of 16-64 KiB (aiohttp's reads, grpc's slices), and from the heap those chunks left 5-8 MiB of
    freed but unreturned memory after 10 s of 2 MiB requests over gRPC into a 16 MiB buffer, whose peak RSS went
    from +21-24 MiB over idle to +17-18 with the lower threshold."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return bool(mallopt(m_mmap_threshold, 32 << 10) and mallopt(m_trim_threshold, 128 << 10)
                and mallopt(m_arena_max, 2))


def load_repairer(config: InfillConfig) -> TraceRepairer:
    """The repairer the config asks for: the model's infill adapter, or rules only."""
    settings = config.repair_settings()
    if config.repair_no_model:
        catalog = None
        if config.repair_model:
            from ..sampling.catalog import Catalog

            catalog = Catalog.load(config.repair_model)
        return TraceRepairer(None, catalog, settings)
    from ..lm.model import load_model
    from .filler import ModelFiller

    from ..cpu import configure_torch, configured

    if config.repair_threads:
        configure_torch(config.repair_threads)
    lm = load_model(config.repair_model, "cpu" if config.repair_threads else None, dtype="auto")
    if (choice := configured()) is not None and str(lm.device) == "cpu":
        log.info("repair runs the model with %s", choice.describe())
    return TraceRepairer(ModelFiller(lm), None, settings)


REQUEST_COPIES = 5
"""What a request body costs on its way in, in multiples of its size, until its spans are held: the body, its
spans decoded (:func:`~otel_tracegen.infill.wire.held_bytes`: their bytes and the strings read from them, ~3x), and
the copies the log's database makes of a small record. Set aside before a body is read or decoded, then trued up
to what was decoded."""

READ_COPIES = 2
"""A message being read costs up to twice its size: gRPC's buffers, then the bytes handed to the receiver."""

BOOKED_RECORD_BYTES = 120
"""What the delivery bookkeeping costs per log record (a dict entry) and per log record an outbound request names
(an int in a tuple, and its share of the tuple), counted against the buffer's bound: while the downstream is down
it grows with the backlog, which must not grow memory without bound."""


class InfillService:
    """The pipeline (see the module docstring). ``exporter``: an object with ``export(body, spans)`` and
    ``shutdown()`` (default: from the config's exporter settings)."""

    def __init__(self, config: InfillConfig, repairer: TraceRepairer | None = None, exporter=None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.repairer = repairer if repairer is not None else load_repairer(config)
        qdir = Path(config.queue_directory)
        qdir.mkdir(parents=True, exist_ok=True)
        self.wal = DiskQueue(qdir / "inbound", fsync=config.queue_fsync, name="inbound")
        self.outbound = DiskQueue(qdir / "outbound", fsync=False, name="outbound")
        self._log = GroupCommit(self.wal)
        self.buffer = TraceBuffer(wait_s=config.buffer_wait_s, max_traces=config.buffer_max_traces,
                                  max_bytes=int(config.buffer_max_mib * (1 << 20)),
                                  remember=config.buffer_remember_traces)  # fmt: skip
        self.forwarder = Forwarder(self.outbound, exporter if exporter is not None else make_exporter(
            config.forward_settings()), config.forward_settings(), self.metrics, qdir / "dead-letter",
            on_done=self._delivered, ledger=self.buffer)  # fmt: skip
        self._max_queue_bytes = int(config.queue_max_mib * (1 << 20))
        # Outbound requests of at most exporter.max_request_mib, and a sixteenth of the buffer's budget: the one
        # the forwarder has in hand stays counted in the buffer while it is sent (for as long as an outage lasts).
        self._request_limit = min(int(config.exporter_max_request_mib * (1 << 20)), self.buffer.budget // 16)
        self._memory_limit = int(config.memory_limit_mib * (1 << 20))
        self.recent = None
        if config.localize_keep_s > 0:
            from ..localize.recent import RecentTraces

            self.recent = RecentTraces(config.localize_keep_s, config.localize_max_spans)
        # Delivery bookkeeping: a log record is acknowledged once nothing holds its spans any more: neither a trace
        # in the buffer nor an outbound request not yet delivered. Per log record, how many such holders are left;
        # per outbound request, the log records it holds spans of.
        self._open: dict[int, int] = {}
        self._requests: dict[int, tuple[int, ...]] = {}
        self._booked = 0  # bytes of that bookkeeping, counted against the buffer's bound
        self.buffer.extra = lambda: self._booked
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._replay: list[int] = []  # log records left by an earlier run, not yet back in the buffer
        self.recovered = 0
        m = self.metrics
        m.gauge("exporter_queue_size", lambda: self.wal.stats().bytes, exporter=EXPORTER)
        m.gauge("exporter_queue_capacity", lambda: self._max_queue_bytes, exporter=EXPORTER)
        m.gauge("buffered_traces", lambda: self.buffer.traces + self.buffer.waiting)
        m.gauge("buffered_spans", lambda: self.buffer.spans)
        m.gauge("buffer_memory_bytes", lambda: self.buffer.bytes)
        m.gauge("buffer_memory_capacity_bytes", lambda: self.buffer.max_bytes)
        m.gauge("outbound_requests", lambda: len(self.outbound))
        m.gauge("log_records", lambda: len(self.wal))
        m.gauge("dead_letter_bytes", lambda: self.forwarder.dead_letter_bytes)
        m.gauge("process_memory_rss_bytes", resident_bytes)

    # --- life cycle ---

    def start(self) -> None:
        """Start repairing and forwarding; what an earlier run left in the log is fed back into the buffer as
        memory allows (a log may hold far more than the buffer's bound)."""
        # Everything the outbound queue still holds is also in the log (a log record is acknowledged only once
        # its traces were delivered), and is sent again from there.
        self.outbound.ack_many(self.outbound.pending_seqs())
        self._replay = sorted(self.wal.pending_seqs(), reverse=True)
        self.recovered = len(self._replay)
        if self.recovered:
            log.info("replaying %d accepted request(s) from the write-ahead log", self.recovered)
        self._feed_replay()
        self.forwarder.start()
        self._thread = threading.Thread(target=self._run, name="infill-repair", daemon=True)
        self._thread.start()

    def _feed_replay(self) -> bool:
        """Put log records of an earlier run back into the buffer while they fit; True when some are left."""
        while self._replay:
            seq = self._replay[-1]
            record = self.wal.get(seq)
            if record is None:  # acked meanwhile, or unreadable (the queue logged why)
                self._replay.pop()
                continue
            body, content_type = wire.read_log_record(record)
            try:
                spans = wire.decode(body, content_type)
            except wire.MalformedRequest as e:  # the receiver decoded it once the same way: a damaged record
                log.error("write-ahead log record %d does not parse (%s); skipped", seq, e)
                self._replay.pop()
                self.wal.ack(seq)
                continue
            cost, passing = sum(map(held_bytes, spans)), len(record)  # the record is in hand until spans are held
            if not self.buffer.reserve(cost + passing):
                if self.buffer.bytes > 0:
                    return True  # wait for repair to free memory
                # an empty buffer takes any one record, or the log could never drain
                self.buffer.reserve(cost + passing, force=True)
            self._replay.pop()
            self._hold(spans, seq, cost)
            del record, body
            self.buffer.unreserve(passing)
        return False

    def stop(self, drain: bool = True) -> None:
        """Release every held trace, queue it, drain the outbound queue (``drain_s``), and close."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            while batch := self._due(everything=True):
                self._release(batch)
            if drain and not self.forwarder.drain(self.config.drain_s):
                log.warning("%d request(s) not forwarded within %.0fs; they stay in the log in %s for the next "
                            "start", len(self.outbound), self.config.drain_s, self.config.queue_directory)  # fmt: skip
        finally:
            self.forwarder.stop()
            self.wal.close()
            self.outbound.close()

    # --- receiving ---

    @property
    def largest_request(self) -> int:
        """The largest request body (decompressed) the buffer could ever take, with its copies on the way in: the
        receivers refuse larger ones before reading them."""
        return self.buffer.budget // REQUEST_COPIES

    async def set_aside_polled(self, nbytes: int, more: bool = False, wait_s: float = ROOM_WAIT_S) -> int:
        """Set memory aside for a request body of ``nbytes`` about to be read (HTTP, on the event loop): the bytes
        reserved, for :meth:`export`'s ``reserved``. Waits in line up to ``wait_s`` (polling every 10 ms, never
        blocking the loop); ``more``: for a body that holds some already (a chunked one, as it is read). Raises
        :class:`Pressure` when they do not fit, :class:`TooLarge` when they never would."""
        self._check_size(nbytes)
        n = nbytes * REQUEST_COPIES
        if self.buffer.reserve(n, more=more):
            return n
        ticket = None if more else self.buffer.line_up()
        deadline = time.monotonic() + wait_s
        try:
            while (taken := self.buffer.take_in_line(ticket, n)) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            if ticket is not None:
                self.buffer.leave_line(ticket)
        if not taken:
            self._full()
        return n

    def set_aside_unread(self, limit: int, wait_s: float = ROOM_WAIT_S) -> int:
        """Set memory aside for a message of unknown size, at most ``limit`` bytes, about to be read (gRPC reads a
        message whole before its size is known): room for ``READ_COPIES`` of the largest, waiting up to ``wait_s``
        for it. Raises :class:`Pressure`; :meth:`export` trues it up once the body is read."""
        n = READ_COPIES * limit
        if not self.buffer.reserve(n, wait_s=wait_s):
            self._full()
        return n

    def _check_size(self, nbytes: int) -> None:
        if nbytes > self.largest_request:
            self.metrics.inc("refused_requests_total", reason="too_large")
            raise TooLarge(f"a request of {nbytes} bytes is over the {self.largest_request} bytes this receiver "
                           f"can hold with its copies on the way in (buffer.max_mib {self.buffer.max_bytes >> 20} "
                           "MiB): send smaller requests")  # fmt: skip

    def export(self, body: bytes, content_type: str = wire.PROTOBUF, transport: str = "grpc",
               reserved: int = 0) -> tuple[int, str]:
        """Take one OTLP request body: ``(rejected spans, message)`` for the partial-success answer. Raises
        :class:`wire.MalformedRequest` (nothing taken) or :class:`Pressure` (nothing taken; retry later).
        ``reserved``: memory :meth:`set_aside_polled` (or :meth:`set_aside_unread`) for this body before it was read, which this call now owns.

        The order keeps the promise "acknowledged means replayable": the spans are decoded and their memory set
        aside first, then the body is logged as it came (replay decodes it again the same way), then held. Every
        copy made on the way (the body, the decoded spans, the log record and the copy the log's database binds)
        is counted against the buffer's bound until it is gone."""
        labels = {"receiver": RECEIVER, "transport": transport}
        try:
            if self._memory_limit and (rss := resident_bytes()) > self._memory_limit:
                self.metrics.inc("refused_requests_total", reason="memory_limit")
                raise Pressure(f"the receiver uses {rss >> 20} MiB, over its memory limit of "
                               f"{self._memory_limit >> 20} MiB; retry later", 2.0)  # fmt: skip
            queued = self.wal.stats().bytes  # the log holds everything not yet delivered
            if queued > self._max_queue_bytes:
                self.metrics.inc("refused_requests_total", reason="queue_full")
                raise Pressure(f"the infill queue holds {queued} bytes, over its limit of {self._max_queue_bytes} "
                               f"(downstream: {self.forwarder.last_error or 'slow'}); retry later", 5.0)  # fmt: skip
            # Memory is set aside before decoding (an estimate from the body's size), so that concurrent requests
            # cannot together decode past the bound; it is trued up to the real cost once the spans are decoded.
            self._check_size(len(body))
            if reserved < len(body) * REQUEST_COPIES:  # a gRPC message, or a body larger once decompressed
                if not self.buffer.reserve(len(body) * REQUEST_COPIES - reserved, wait_s=ROOM_WAIT_S,
                                           more=reserved > 0):  # fmt: skip
                    self._full()
                reserved = len(body) * REQUEST_COPIES
            report = ReadReport(max_problems=20)
            try:
                spans = wire.decode(body, content_type, report)
            except wire.MalformedRequest:
                self.metrics.inc("refused_requests_total", reason="malformed")
                raise
            rejected = report.total_dropped
            if rejected:
                self.metrics.inc("receiver_refused_spans_total", rejected, **labels)
                self.metrics.inc("malformed_spans_total", rejected)
            if spans:
                cost = sum(map(held_bytes, spans))
                record = wire.log_record(body, content_type)
                # On the way to the log: the body, the record (the body itself for protobuf) and SQLite's copies.
                passing = len(body) + (0 if record is body else len(record)) + write_copies(len(record))
                if cost + passing > self.buffer.budget:
                    self.metrics.inc("refused_requests_total", reason="too_large")
                    self.metrics.inc("receiver_refused_spans_total", len(spans), **labels)
                    raise TooLarge(f"the request's {len(spans)} spans take {(cost + passing) >> 20} MiB on their "
                                   f"way in, more than the whole buffer ({self.buffer.max_bytes >> 20} MiB, "
                                   "buffer.max_mib): send them in smaller requests")  # fmt: skip
                if cost + passing > reserved:
                    if not self.buffer.reserve(cost + passing - reserved, wait_s=ROOM_WAIT_S, more=True):
                        self.metrics.inc("receiver_refused_spans_total", len(spans), **labels)
                        self._full()
                else:
                    self.buffer.unreserve(reserved - cost - passing)
                reserved = cost + passing
                seq = self._log.append(record)
                del record
                self._hold(spans, seq, cost)
                reserved = passing  # the spans' share now counts as held
                self.metrics.inc("receiver_accepted_spans_total", len(spans), **labels)
        finally:
            if reserved:
                self.buffer.unreserve(reserved)
        message = ""
        if rejected:
            shown = "; ".join(str(p) for p in report.problems[:5])
            more = f" (and {len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
            message = f"{rejected} span(s) rejected: {shown}{more}"
        return rejected, message

    def _full(self) -> None:
        self.metrics.inc("refused_requests_total", reason="buffer_full")
        raise Pressure(f"the receiver holds {self.buffer.bytes >> 20} MiB of spans, at its bound of "
                       f"{self.buffer.max_bytes >> 20} MiB (buffer.max_mib): repair is behind; retry later", 1.0)

    def _hold(self, spans: list[wire.WireSpan], seq: int, reserved: int = 0) -> None:
        with self._lock:
            self._open[seq] = len({w.span.trace_id for w in spans})
            self._booked += BOOKED_RECORD_BYTES
        self.buffer.add(spans, seq, reserved)
        self._wake.set()

    # --- delivery: a log record goes once all its traces are delivered ---

    def _delivered(self, seq: int) -> None:
        """The forwarder is done with outbound record ``seq`` (delivered, or kept as a dead letter)."""
        with self._lock:
            self.forwarder.span_counts.pop(seq, None)  # when the forwarder read the request before it was counted
            held = self._requests.pop(seq, ())
            self._booked -= BOOKED_RECORD_BYTES * len(held)
        self._let_go(held)

    def _let_go(self, seqs) -> None:
        """One holder of each log record in ``seqs`` is done; acknowledge the records nothing holds any more."""
        acked = []
        with self._lock:
            for seq in seqs:
                self._open[seq] -= 1
                if self._open[seq] == 0:
                    del self._open[seq]
                    self._booked -= BOOKED_RECORD_BYTES
                    acked.append(seq)
        if acked:
            self.wal.ack_many(acked)

    # --- repairing ---

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.buffer.next_due_in()
            self._wake.wait(0.5 if wait is None else min(wait, 0.5))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                while batch := self._due():
                    self._release(batch)  # a batch at a time: what waits for repair stays counted in the buffer
                    if self._stop.is_set():
                        return
                if self._replay and self._feed_replay():
                    self._wake.set()
            except Exception:  # noqa: BLE001 - a bug here must not stop the receiver; the log keeps the data
                log.exception("repair failed; the traces stay in the write-ahead log and are replayed on restart")
                time.sleep(1.0)

    def _due(self, everything: bool = False) -> list[ReleasedTrace]:
        """The next batch for repair: ``repair.batch_traces`` at most, and a sixteenth of the buffer's budget, so that
        the copies repair and encoding make of a batch stay small beside the bound."""
        return self.buffer.due(everything=everything, limit=self.config.repair_batch_traces,
                               max_bytes=self.buffer.budget // 16)

    def _repair(self, batch: list[ReleasedTrace]) -> list:
        """Repair a batch; if that fails, trace by trace, and a trace whose repair fails goes on as it came (a bug
        in repair must not hold other traces back, nor this one: it would fail again on every replay)."""
        try:
            return self.repairer.repair([(t.spans, t.released) for t in batch])
        except Exception:  # noqa: BLE001
            log.exception("repairing a batch of %d traces failed; repairing them one by one", len(batch))
        out = []
        for t in batch:
            try:
                [r] = self.repairer.repair([(t.spans, t.released)])
            except Exception:  # noqa: BLE001
                log.exception("repairing trace %s failed; it is forwarded unrepaired", t.trace_id)
                self.metrics.inc("repair_failures_total")
                r = Repaired(list(t.spans))
                t.released.ids.update(w.span.span_id for w in t.spans)
            out.append(r)
        return out

    def _release(self, traces: list[ReleasedTrace]) -> None:
        try:
            self._queue(traces)
        finally:
            self.buffer.repaired(traces)

    def _queue(self, traces: list[ReleasedTrace]) -> None:
        n = max(1, self.config.repair_batch_traces)
        for b in range(0, len(traces), n):
            batch = traces[b : b + n]
            results = self._repair(batch)
            parts = wire.split([w for r in results for w in r.spans], self._request_limit)
            bodies = [wire.encode(part) for part in parts]
            encoded = sum(len(b) + write_copies(len(b)) for b in bodies)  # and the queue's database's copies
            self.buffer.reserve(encoded, force=True, wait_s=ROOM_WAIT_S)
            try:
                self._enqueue(batch, results, parts, bodies)
            finally:
                del bodies  # before they stop counting
                self.buffer.unreserve(encoded)

    def _enqueue(self, batch: list[ReleasedTrace], results: list, parts: list, bodies: list[bytes]) -> None:
        """Queue a repaired batch's requests for the forwarder, and account for it."""
        # The log records each request holds spans of: parts are consecutive slices of the traces' spans.
        owners = [seq_set for t, r in zip(batch, results) for seq_set in [t.seqs] * len(r.spans)]
        holds, start = [], 0
        for part in parts:
            holds.append(tuple(set().union(*owners[start : start + len(part)])))
            start += len(part)
        with self._lock:  # registered before the forwarder can report the records done
            seqs = self.outbound.append_many(bodies) if bodies else []
            for seq, part, held in zip(seqs, parts, holds):
                self.forwarder.span_counts[seq] = len(part)
                self._requests[seq] = held
                self._booked += BOOKED_RECORD_BYTES * len(held)
                for s in held:
                    self._open[s] += 1
        self._let_go([s for t in batch for s in t.seqs])  # the traces have left the buffer
        if self.recent is not None:  # what was forwarded, repaired, for GET /localize
            self.recent.add(Trace([w.span for w in r.spans]) for r in results)
        reasons: Counter = Counter()
        m = self.metrics
        m.inc("released_traces_total", len(batch))
        for r in results:
            for reason, k in r.repairs.items():
                m.inc("repaired_spans_total", k, reason=reason)
                reasons[reason] += 1
            for method, k in r.methods.items():
                m.inc("repairs_total", k, method=method)
        for reason, k in reasons.items():
            m.inc("repaired_traces_total", k, reason=reason)
