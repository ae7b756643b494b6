"""Spans grouped by trace for a wait window, like the Collector's ``groupbytrace`` processor, with bounds.

A trace is held from its first span for ``wait_s`` seconds, then released whole to repair. Two bounds keep the
receiver's memory flat under any load: ``max_traces`` held traces and ``max_bytes`` of held span bytes. When a new
span would pass either, the oldest traces are released early (as ``groupbytrace`` evicts), so nothing is refused
for being too many; the receiver only pushes back when its outbound queue is full.

Released traces are remembered (``remember`` traces, oldest forgotten first): a late span of a trace already sent
on is not an orphan when its parent was sent, and orphans of a span the receiver already made join that span
instead of getting a second one (:class:`~otel_tracegen.infill.repair.Released`).

Each held span records the write-ahead-log record it came in (``seq``), so the receiver can acknowledge a record
once every trace that had spans in it is safely in the outbound queue.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .repair import Released
from .wire import SPAN_OVERHEAD, WireSpan


@dataclass
class HeldTrace:
    trace_id: str
    first_seen: float
    spans: list[WireSpan] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    size: int = 0


@dataclass
class ReleasedTrace:
    """A trace leaving the buffer: its spans, the log records they came in, and what was sent of it before."""

    trace_id: str
    spans: list[WireSpan]
    seqs: set[int]
    released: Released
    early: bool  # released before its wait was over (a bound was reached, or shutdown)


def _merged(traces: list[ReleasedTrace]) -> list[ReleasedTrace]:
    """One entry per trace: a trace released early by a bound and held again by a later span leaves as one."""
    by_id: dict[str, ReleasedTrace] = {}
    for t in traces:
        first = by_id.get(t.trace_id)
        if first is None:
            by_id[t.trace_id] = t
        else:
            first.spans.extend(t.spans)
            first.seqs |= t.seqs
            first.early = first.early or t.early
    return list(by_id.values())


class TraceBuffer:
    def __init__(self, *, wait_s: float = 2.0, max_traces: int = 100_000, max_bytes: int = 256 << 20,
                 remember: int = 20_000, clock=time.monotonic) -> None:
        if wait_s < 0 or max_traces < 1 or max_bytes < 1:
            raise ValueError("need wait_s >= 0, max_traces >= 1 and max_bytes >= 1")
        self.wait_s, self.max_traces, self.max_bytes, self.remember = wait_s, max_traces, max_bytes, remember
        self._clock = clock
        self._held: OrderedDict[str, HeldTrace] = OrderedDict()  # by first span's arrival
        self._released: OrderedDict[str, Released] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._overflow: list[ReleasedTrace] = []
        self.evicted = 0

    def add(self, spans: Sequence[WireSpan], seq: int) -> None:
        """Hold ``spans`` (of any traces), which came in log record ``seq``."""
        now = self._clock()
        with self._lock:
            added = 0
            for w in spans:
                tid = w.span.trace_id
                held = self._held.get(tid)
                if held is None:
                    held = self._held[tid] = HeldTrace(tid, now)
                    held.seqs.add(seq)
                elif seq not in held.seqs:
                    held.seqs.add(seq)
                held.spans.append(w)
                n = len(w.raw) + SPAN_OVERHEAD
                held.size += n
                added += n
            self._bytes += added
            while self._held and (len(self._held) > self.max_traces or self._bytes > self.max_bytes):
                self._overflow.append(self._release(next(iter(self._held)), early=True))
                self.evicted += 1

    def due(self, *, everything: bool = False) -> list[ReleasedTrace]:
        """Traces whose wait is over (all held traces when ``everything``, e.g. at shutdown), oldest first, and
        those released early by the bounds since the last call."""
        now = self._clock()
        with self._lock:
            out, self._overflow = self._overflow, []
            while self._held:
                tid, held = next(iter(self._held.items()))
                if not everything and now - held.first_seen < self.wait_s:
                    break
                out.append(self._release(tid, early=everything and now - held.first_seen < self.wait_s))
            return _merged(out)

    def _release(self, tid: str, early: bool) -> ReleasedTrace:
        held = self._held.pop(tid)
        self._bytes -= held.size
        released = self._released.pop(tid, None) or Released()
        self._released[tid] = released  # most recently released last: forgotten last
        while len(self._released) > self.remember:
            self._released.popitem(last=False)
        return ReleasedTrace(tid, held.spans, held.seqs, released, early)

    def next_due_in(self) -> float | None:
        """Seconds until the oldest held trace is due (None: nothing held)."""
        with self._lock:
            if self._overflow:
                return 0.0
            if not self._held:
                return None
            held = next(iter(self._held.values()))
            return max(0.0, held.first_seen + self.wait_s - self._clock())

    @property
    def traces(self) -> int:
        return len(self._held)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def spans(self) -> int:
        with self._lock:
            return sum(len(h.spans) for h in self._held.values())
