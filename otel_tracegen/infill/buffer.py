"""Spans grouped by trace for a wait window, like the Collector's ``groupbytrace`` processor, within a memory bound.

A trace is held from its first span for ``wait_s`` seconds, then released whole to repair. The buffer is also the
receiver's memory ledger: everything in hand counts against one bound, ``max_bytes`` (of which ``ACCOUNTED_SHARE``,
the budget, for what is counted), measured in what it really costs (:func:`held_bytes`: a decoded span's objects,
not only its bytes on the wire): the held traces, the traces released early that wait for repair, what is
remembered of traces already sent on, and, as reservations, every copy of a request on its way (read, decoded,
logged; repaired, encoded, forwarded).

- When held traces pass ``max_traces``, or half of the budget, the oldest are released early (as
  ``groupbytrace`` evicts) so that repair gets to them sooner; they stay counted until repair takes them.
- A request is admitted only if it fits (:meth:`TraceBuffer.reserve`, before its body is read and again once it is
  decoded, before it is logged): when repair is slower than ingest, the receiver pushes back
  (``RESOURCE_EXHAUSTED`` / 503 with retry advice) instead of growing. Reservations that wait for room are served
  in order; the work that frees memory (repair, forwarding) goes first.

Released traces are remembered (``remember`` traces at most, and forgotten first when memory is short): a late span
of a trace already sent on is not an orphan when its parent was sent, and orphans of a span the receiver already
made join that span instead of getting a second one (:class:`~otel_tracegen.infill.repair.Released`).

Each held span records the write-ahead-log record it came in (``seq``), so the receiver can acknowledge a record
once every trace that had spans in it was delivered.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .repair import Released
from .wire import WireSpan, held_bytes

ACCOUNTED_SHARE = 0.75
"""The share of ``max_bytes`` what is counted may fill. The rest is for what cannot be counted one by one: freed
memory that Python's and the C allocator's arenas keep after churn (20-25 % over the live objects when the buffer
turns over under overload: tests/test_infill_faults.py, the overload test), grpc's and aiohttp's own buffers,
SQLite's page caches, and forced reservations over the budget."""
ROOM_WAIT_S = 0.5
"""How long a reservation waits for room before it is refused (or, forced, counted over the budget): the memory in
the way is often a copy about to go (a trace being repaired, a request being logged)."""
REMEMBERED_SPAN_BYTES = 100
"""What remembering one sent span id costs (a 16-character string in a set), measured with tracemalloc."""
REMEMBERED_TRACE_BYTES = 640


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
    size: int = 0  # its held bytes


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
            first.size += t.size
    return list(by_id.values())


class TraceBuffer:
    def __init__(self, *, wait_s: float = 2.0, max_traces: int = 100_000, max_bytes: int = 256 << 20,
                 remember: int = 20_000, clock=time.monotonic) -> None:
        if wait_s < 0 or max_traces < 1 or max_bytes < 1:
            raise ValueError("need wait_s >= 0, max_traces >= 1 and max_bytes >= 1")
        self.wait_s, self.max_traces, self.max_bytes, self.remember = wait_s, max_traces, max_bytes, remember
        self.budget = int(max_bytes * ACCOUNTED_SHARE)
        self._clock = clock
        self._held: OrderedDict[str, HeldTrace] = OrderedDict()  # by first span's arrival
        self._ready: deque[ReleasedTrace] = deque()  # released early, waiting for repair
        self._released: OrderedDict[str, tuple[Released, int]] = OrderedDict()  # -> (what was sent, its cost)
        self._held_bytes = 0
        self._ready_bytes = 0
        self._remembered_bytes = 0
        self._reserved = 0
        self._repairing = 0  # traces handed to repair, not yet queued on disk
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # notified when memory is given back
        self._waiters: deque[object] = deque()  # reservations waiting for room, in order of arrival
        self._urgent = 0  # reservations waiting that go before them (``more``, ``force``)
        self.evicted = 0
        self.extra: Callable[[], int] = lambda: 0  # other memory counted against the bound (the owner's bookkeeping)

    # --- admission ---

    def reserve(self, n: int, force: bool = False, wait_s: float = 0.0, more: bool = False) -> bool:
        """Set ``n`` bytes aside for spans about to be added (:meth:`add` with ``reserved=n``), or for a copy on its
        way through (a request being read or decoded, one being encoded or sent), if they fit: remembered traces
        are forgotten to make room; False when the held and waiting traces leave none.

        - ``wait_s``: wait up to that long for room, where copies on their way through (reservations, traces being
          repaired) are what takes it. Waiters are served in order, and a newcomer does not pass them: a large
          request is not starved by a stream of small ones.
        - ``more``: for a request that holds a reservation already (read, now decoded): it goes before the
          waiters, which may be waiting for what it holds.
        - ``force``: for the work that frees memory (repair, forwarding): it goes first, and once ``wait_s`` is
          over (or at once, when waiting cannot help) it is counted even over the budget; the receivers then push
          back until it is done."""
        urgent = more or force
        with self._lock:
            self._make_room(n)
            if self._used() + n <= self.budget and (urgent or not (self._waiters or self._urgent)):
                self._reserved += n
                return True
            if wait_s > 0 and self._room_soon(n):
                deadline = time.monotonic() + wait_s
                ticket = None if urgent else self._line_up()
                self._urgent += urgent
                try:
                    while (left := deadline - time.monotonic()) > 0:
                        self._freed.wait(left)
                        taken = self._take(ticket, n)
                        if taken is not None:
                            if taken:
                                return True
                            break
                finally:
                    self._urgent -= urgent
                    if ticket is not None and ticket in self._waiters:
                        self._leave(ticket)
                    elif urgent:
                        self._freed.notify_all()
            if force:
                self._reserved += n
                return True
            return False

    def line_up(self) -> object:
        """A place in line for a reservation that cannot wait on a thread (an event loop's): poll it with
        :meth:`take_in_line`, and :meth:`leave_line` when giving up."""
        with self._lock:
            return self._line_up()

    def take_in_line(self, ticket: object, n: int) -> bool | None:
        """Reserve ``n`` bytes for ``ticket`` if it is first in line and they fit (True, out of line); False when
        no room is coming (out of line); None: not yet."""
        with self._lock:
            taken = self._take(ticket, n)
            if taken is not None and ticket in self._waiters:
                self._leave(ticket)
            return taken

    def leave_line(self, ticket: object) -> None:
        with self._lock:
            if ticket in self._waiters:
                self._leave(ticket)

    def _line_up(self) -> object:
        ticket = object()
        self._waiters.append(ticket)
        return ticket

    def _leave(self, ticket: object) -> None:
        self._waiters.remove(ticket)
        self._freed.notify_all()  # the next in line may fit now

    def _take(self, ticket: object | None, n: int) -> bool | None:
        """For a waiter (``ticket``, or None for an urgent one): True once reserved, None to wait on, False when
        no room is coming."""
        self._make_room(n)
        first = ticket is None or (not self._urgent and self._waiters and self._waiters[0] is ticket)
        if first and self._used() + n <= self.budget:
            self._reserved += n
            return True
        return None if self._room_soon(n) else False

    def _make_room(self, n: int) -> None:
        while self._remembered_bytes and self._used() + n > self.budget:
            self._forget_oldest()

    def _room_soon(self, n: int) -> bool:
        """Whether ``n`` bytes would fit once the copies on their way through (reservations, and the traces being
        repaired) are gone; not when what is in the way is held spans, which wait for their turn."""
        return self._used() + n - self.budget <= self._reserved + self._repairing

    def unreserve(self, n: int) -> None:
        with self._lock:
            self._reserved -= n
            self._freed.notify_all()

    def _used(self) -> int:
        return (self._held_bytes + self._ready_bytes + self._remembered_bytes + self._reserved + self._repairing
                + self.extra())

    # --- holding and releasing ---

    def add(self, spans: Sequence[WireSpan], seq: int, reserved: int = 0) -> None:
        """Hold ``spans`` (of any traces), which came in log record ``seq``; ``reserved``: what :meth:`reserve`
        set aside for them."""
        now = self._clock()
        with self._lock:
            self._reserved -= reserved
            for w in spans:
                tid = w.span.trace_id
                held = self._held.get(tid)
                if held is None:
                    held = self._held[tid] = HeldTrace(tid, now)
                held.seqs.add(seq)
                held.spans.append(w)
                n = held_bytes(w)
                held.size += n
                self._held_bytes += n
            while self._held and (len(self._held) > self.max_traces or 2 * self._held_bytes > self.budget):
                t = self._release(next(iter(self._held)), early=True)
                self._ready.append(t)
                self._ready_bytes += t.size
                self.evicted += 1

    def due(self, *, everything: bool = False, limit: int | None = None,
            max_bytes: int | None = None) -> list[ReleasedTrace]:
        """Up to ``limit`` traces (and about ``max_bytes`` of them, at least one) for repair: those released early
        by the bounds first, then those whose wait is over (all held traces when ``everything``, e.g. at
        shutdown), oldest first. They stay counted until :meth:`repaired` says they are queued on disk: their
        copies in repair and encoding are made while they are still in memory."""
        now = self._clock()
        limit = limit if limit is not None else 1 << 62
        max_bytes = max_bytes if max_bytes is not None else 1 << 62
        with self._lock:
            out: list[ReleasedTrace] = []
            size = 0
            while self._ready and len(out) < limit and (not out or size < max_bytes):
                t = self._ready.popleft()
                self._ready_bytes -= t.size
                size += t.size
                out.append(t)
            while self._held and len(out) < limit and (not out or size < max_bytes):
                tid, held = next(iter(self._held.items()))
                if not everything and now - held.first_seen < self.wait_s:
                    break
                t = self._release(tid, early=everything and now - held.first_seen < self.wait_s)
                size += t.size
                out.append(t)
            self._repairing += size
            return _merged(out)

    def repaired(self, traces: Sequence[ReleasedTrace]) -> None:
        """``traces`` (from :meth:`due`) left memory: repaired and queued on disk, or dropped."""
        with self._lock:
            self._repairing -= sum(t.size for t in traces)
            self._freed.notify_all()

    def _release(self, tid: str, early: bool) -> ReleasedTrace:
        held = self._held.pop(tid)
        self._held_bytes -= held.size
        released, cost = self._released.pop(tid, (None, 0))
        self._remembered_bytes -= cost
        released = released or Released()
        cost = (cost or REMEMBERED_TRACE_BYTES) + REMEMBERED_SPAN_BYTES * len(held.spans)
        self._remembered_bytes += cost
        self._released[tid] = (released, cost)  # most recently released last: forgotten last
        while len(self._released) > self.remember:
            self._forget_oldest()
        return ReleasedTrace(tid, held.spans, held.seqs, released, early, held.size)

    def _forget_oldest(self) -> None:
        _, (_, cost) = self._released.popitem(last=False)
        self._remembered_bytes -= cost

    # --- state ---

    def next_due_in(self) -> float | None:
        """Seconds until the oldest held trace is due (None: nothing held)."""
        with self._lock:
            if self._ready:
                return 0.0
            if not self._held:
                return None
            held = next(iter(self._held.values()))
            return max(0.0, held.first_seen + self.wait_s - self._clock())

    @property
    def traces(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        """Traces released early, waiting for repair."""
        return len(self._ready)

    @property
    def bytes(self) -> int:
        """Memory the buffer accounts for now: held and waiting traces, remembered ones, reservations."""
        with self._lock:
            return self._used()

    @property
    def spans(self) -> int:
        with self._lock:
            return sum(len(h.spans) for h in self._held.values()) + sum(len(t.spans) for t in self._ready)
