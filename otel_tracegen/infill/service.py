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

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..report import ReadReport, UserError
from ..trace import Trace
from . import wire
from .buffer import ReleasedTrace, TraceBuffer
from .detect import DetectSettings
from .forward import Forwarder, ForwardSettings, make_exporter
from .metrics import Metrics
from .queue import DiskQueue
from .repair import Repaired, RepairSettings, TraceRepairer

log = logging.getLogger(__name__)


class Pressure(Exception):
    """The receiver cannot take more now (``RESOURCE_EXHAUSTED`` / HTTP 503); ``retry_after_s`` is the advice."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class InfillConfig:
    """Every setting of ``otel-tracegen infill serve``. In YAML the fields are grouped by their prefix
    (``receiver:``, ``buffer:``, ``repair:``, ``queue:``, ``exporter:``), e.g. ``buffer: {wait_s: 2}``; on the
    command line they are flags (``--buffer-wait-s 2``)."""

    receiver_grpc: str | None = "127.0.0.1:4327"  # host:port, or none
    receiver_http: str | None = "127.0.0.1:4328"  # host:port, or none; also serves /metrics
    receiver_max_message_mib: float = 16.0
    receiver_tls_cert: str | None = None
    receiver_tls_key: str | None = None
    receiver_bearer_token: str | None = None
    buffer_wait_s: float = 2.0
    buffer_max_traces: int = 100_000
    buffer_max_mib: float = 256.0
    buffer_remember_traces: int = 20_000  # released traces whose span ids are kept, so late spans join them
    repair_model: str | None = None  # a model directory; None: the shipped model
    repair_no_model: bool = False  # rules only (re-parent to the nearest ancestor, clock skew)
    repair_confidence: float = 0.5
    repair_skew_tolerance_ms: float = 1.0
    repair_batch_traces: int = 256
    repair_threads: int | None = None
    queue_directory: str = "otel-tracegen-infill-queue"
    queue_max_mib: float = 1024.0
    queue_fsync: bool = True
    exporter_endpoint: str | None = None
    exporter_protocol: str = "grpc"
    exporter_insecure: bool | None = None
    exporter_headers: dict = field(default_factory=dict)
    exporter_compression: str | None = None
    exporter_timeout_s: float = 10.0
    exporter_retry_initial_s: float = 0.5
    exporter_retry_max_s: float = 30.0
    exporter_max_request_mib: float = 4.0
    localize_keep_s: float = 0.0  # keep released traces this long for GET /localize; 0: off
    localize_max_spans: int = 500_000
    drain_s: float = 30.0

    SECTIONS = ("receiver", "buffer", "repair", "queue", "exporter", "localize")

    def __post_init__(self) -> None:
        for name in ("receiver_grpc", "receiver_http"):  # "none" (a flag or YAML) turns a receiver off
            v = getattr(self, name)
            if v is not None and str(v).strip().lower() in ("", "none", "off", "false"):
                setattr(self, name, None)
        if self.buffer_wait_s < 0 or self.repair_batch_traces < 1 or self.queue_max_mib <= 0:
            raise ValueError("need buffer.wait_s >= 0, repair.batch_traces >= 1 and queue.max_mib > 0")

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "config") -> InfillConfig:
        """From a YAML document's mapping (sections of fields); an unknown key is an error naming it."""
        names = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in (data or {}).items():
            if key in cls.SECTIONS:
                if not isinstance(value, dict):
                    raise UserError(f"{where}: {key}: expected a mapping of settings, got {type(value).__name__}")
                for sub, v in value.items():
                    name = f"{key}_{sub}"
                    if name not in names:
                        known = ", ".join(n[len(key) + 1 :] for n in names if n.startswith(key + "_"))
                        raise UserError(f"{where}: unknown setting {key}.{sub} (known: {known})")
                    kwargs[name] = v
            elif key in names:
                kwargs[key] = value
            else:
                raise UserError(f"{where}: unknown setting {key!r} (sections: {', '.join(cls.SECTIONS)}, drain_s)")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> InfillConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise UserError(f"no config file at {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({e})") from None
        if data is not None and not isinstance(data, dict):
            raise UserError(f"{p}: expected a mapping at the top")
        return cls.from_mapping(data or {}, str(p))

    def repair_settings(self) -> RepairSettings:
        return RepairSettings(confidence=self.repair_confidence,
                              detect=DetectSettings(skew_tolerance_ns=int(self.repair_skew_tolerance_ms * 1e6)))

    def forward_settings(self) -> ForwardSettings:
        return ForwardSettings(self.exporter_endpoint, self.exporter_protocol, self.exporter_insecure,
                               self.exporter_headers or None, self.exporter_compression, self.exporter_timeout_s,
                               self.exporter_retry_initial_s, self.exporter_retry_max_s)  # fmt: skip


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

    if config.repair_threads:
        import torch

        torch.set_num_threads(config.repair_threads)
    lm = load_model(config.repair_model, "cpu" if config.repair_threads else None, dtype="auto")
    return TraceRepairer(ModelFiller(lm), None, settings)


@dataclass(eq=False)
class _Delivery:
    """One released trace on its way out: the log records it came in and its outbound requests not yet done."""

    seqs: set[int]
    requests: int = 0


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
            on_done=self._delivered)  # fmt: skip
        self._max_queue_bytes = int(config.queue_max_mib * (1 << 20))
        self.recent = None
        if config.localize_keep_s > 0:
            from ..localize.recent import RecentTraces

            self.recent = RecentTraces(config.localize_keep_s, config.localize_max_spans)
        self._open: dict[int, int] = {}  # log record -> traces with spans in it not yet delivered
        self._requests: dict[int, list[_Delivery]] = {}  # outbound record -> the traces with spans in it
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recovered = 0
        m = self.metrics
        m.gauge("buffered_traces", lambda: self.buffer.traces)
        m.gauge("buffered_spans", lambda: self.buffer.spans)
        m.gauge("queued_requests", lambda: len(self.outbound))
        m.gauge("queued_bytes", lambda: self.outbound.stats().bytes)
        m.gauge("log_records", lambda: len(self.wal))

    # --- life cycle ---

    def start(self) -> None:
        """Replay what an earlier run left, then start repairing and forwarding."""
        # Everything the outbound queue still holds is also in the log (a log record is acknowledged only once
        # its traces were delivered), and is sent again from there.
        self.outbound.ack_many(self.outbound.pending_seqs())
        for seq, body in self.wal.pending():
            try:
                spans = wire.decode(body)
            except wire.MalformedRequest as e:  # cannot happen for what we wrote; never block the log on it
                log.error("write-ahead log record %d does not parse (%s); skipped", seq, e)
                self.wal.ack(seq)
                continue
            self._hold(spans, seq)
            self.recovered += 1
        if self.recovered:
            log.info("replayed %d accepted request(s) from the write-ahead log", self.recovered)
        self.forwarder.start()
        self._thread = threading.Thread(target=self._run, name="infill-repair", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Release every held trace, queue it, drain the outbound queue (``drain_s``), and close."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._release(self.buffer.due(everything=True))
            if drain and not self.forwarder.drain(self.config.drain_s):
                log.warning("%d request(s) not forwarded within %.0fs; they stay in the log in %s for the next "
                            "start", len(self.outbound), self.config.drain_s, self.config.queue_directory)  # fmt: skip
        finally:
            self.forwarder.stop()
            self.wal.close()
            self.outbound.close()

    # --- receiving ---

    def export(self, body: bytes, content_type: str = wire.PROTOBUF) -> tuple[int, str]:
        """Take one OTLP request body: ``(rejected spans, message)`` for the partial-success answer. Raises
        :class:`wire.MalformedRequest` (nothing taken) or :class:`Pressure` (nothing taken; retry later)."""
        report = ReadReport(max_problems=20)
        try:
            spans = wire.decode(body, content_type, report)
        except wire.MalformedRequest:
            self.metrics.inc("refused_requests_total", reason="malformed")
            raise
        if spans:
            queued = self.wal.stats().bytes  # the log holds everything not yet delivered
            if queued > self._max_queue_bytes:
                self.metrics.inc("refused_requests_total", reason="queue_full")
                raise Pressure(f"the infill queue holds {queued} bytes, over its limit of {self._max_queue_bytes} "
                               f"(downstream: {self.forwarder.last_error or 'slow'}); retry later", 5.0)  # fmt: skip
            # The log holds the body as it came when every span was taken (the common case: no re-encoding).
            whole = not report.total_dropped and content_type.split(";")[0].strip().lower() != wire.JSON
            seq = self._log.append(bytes(body) if whole else wire.encode(spans))
            self._hold(spans, seq)
            self.metrics.inc("received_spans_total", len(spans))
        rejected = report.total_dropped
        message = ""
        if rejected:
            self.metrics.inc("rejected_spans_total", rejected)
            shown = "; ".join(str(p) for p in report.problems[:5])
            more = f" (and {len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
            message = f"{rejected} span(s) rejected: {shown}{more}"
        return rejected, message

    def _hold(self, spans: list[wire.WireSpan], seq: int) -> None:
        with self._lock:
            self._open[seq] = len({w.span.trace_id for w in spans})
        self.buffer.add(spans, seq)
        self._wake.set()

    # --- delivery: a log record goes once all its traces are delivered ---

    def _delivered(self, seq: int) -> None:
        """The forwarder is done with outbound record ``seq`` (delivered, or kept as a dead letter)."""
        with self._lock:
            self.forwarder.span_counts.pop(seq, None)  # when the forwarder read the request before it was counted
            finished = []
            for d in self._requests.pop(seq, ()):
                d.requests -= 1
                if d.requests == 0:
                    finished.append(d)
        self._done(finished)

    def _done(self, deliveries: list[_Delivery]) -> None:
        acked = []
        with self._lock:
            for d in deliveries:
                for seq in d.seqs:
                    self._open[seq] -= 1
                    if self._open[seq] == 0:
                        del self._open[seq]
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
                self._release(self.buffer.due())
            except Exception:  # noqa: BLE001 - a bug here must not stop the receiver; the log keeps the data
                log.exception("repair failed; the traces stay in the write-ahead log and are replayed on restart")
                time.sleep(1.0)

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
        n = max(1, self.config.repair_batch_traces)
        for b in range(0, len(traces), n):
            batch = traces[b : b + n]
            results = self._repair(batch)
            limit = int(self.config.exporter_max_request_mib * (1 << 20))
            deliveries = [_Delivery(t.seqs) for t in batch]
            parts = wire.split([w for r in results for w in r.spans], limit)
            bodies = [wire.encode(part) for part in parts]
            # Which traces each request holds: parts are consecutive slices of the traces' spans in order.
            ends, total = [], 0
            for r in results:
                total += len(r.spans)
                ends.append(total)
            holders, start, first = [], 0, 0
            for part in parts:
                stop = start + len(part)
                while ends[first] <= start:
                    first += 1
                last = first
                while last + 1 < len(ends) and ends[last] < stop:
                    last += 1
                holders.append(deliveries[first : last + 1])
                start = stop
            with self._lock:  # registered before the forwarder can report the records done
                seqs = self.outbound.append_many(bodies) if bodies else []
                for seq, part, ds in zip(seqs, parts, holders):
                    self.forwarder.span_counts[seq] = len(part)
                    for d in ds:
                        d.requests += 1
                    self._requests[seq] = ds
            for d in deliveries:
                if not d.requests:  # nothing to send (cannot happen: a released trace has spans)
                    self._done([d])
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
