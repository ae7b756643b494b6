"""Labelled synthetic incidents, for chaos testing a detector: latency injected at one service.

``LatencyIncident("ts-basic-service", delay_ms=50).apply(trace)`` returns a copy of ``trace`` in which every call
into that service takes ``delay_ms`` longer: each of its **entry spans** (a span of the service whose parent is in
another service, or a root) does that much more work of its own, after its children, as a slow handler would. The
service's inner spans are not delayed again, so a request costs the delay once per call, not once per span. The
rest of the trace moves as a synchronous call graph would:

- each ancestor of a delayed span that was still open when it ended ends later by the same amount (it waited for
  the call; an asynchronous parent that had already ended does not, nor do its ancestors);
- every span that starts at or after the moment the delayed span originally ended, under an ancestor that waited
  or under a span that moved, starts and ends later by the same amount (it came after the slow call);
- spans that were already running then, and the children of such concurrent spans, are left alone.

Events move with their spans. Delayed spans carry ``otel_tracegen.incident.delay_ms``, so a consumer can tell injected latency from recorded
latency; :meth:`LatencyIncident.label` is the ground truth a localizer is scored against.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .report import UserError
from .trace import Span, Trace

DELAY_ATTRIBUTE = "otel_tracegen.incident.delay_ms"


@dataclass(frozen=True)
class LatencyIncident:
    """``delay_ms`` of extra self-time at each call into ``service``, in a ``share`` of the traces that reach it."""

    service: str
    delay_ms: float
    share: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.service:
            raise UserError("an incident needs a service")
        if not (0 < self.delay_ms < float("inf")):
            raise UserError(f"an injected delay must be a finite number of ms > 0, got {self.delay_ms}")
        if not (0 < self.share <= 1):
            raise UserError(f"the share of traces hit must be in (0, 1], got {self.share}")

    @classmethod
    def parse(cls, text: str, share: float = 1.0, seed: int = 0) -> LatencyIncident:
        """``SERVICE=MS``, e.g. ``ts-basic-service=50``."""
        service, sep, ms = text.rpartition("=")
        try:
            delay = float(ms)
        except ValueError:
            delay = float("nan")
        if not sep or not service or delay != delay:
            raise UserError(f"not an incident: {text!r} (expected SERVICE=MS, e.g. ts-basic-service=50)")
        return cls(service, delay, share, seed)

    def label(self) -> dict:
        return {"incident": "latency", "service": self.service, "delay_ms": self.delay_ms, "share": self.share}

    def hits(self, trace: Trace) -> bool:
        """Whether this trace is one of the ``share`` that get the delay (decided by trace id and seed, so the
        same trace is hit in every run)."""
        if not any(s.service == self.service for s in trace):
            return False
        return self.share >= 1 or random.Random(f"{self.seed}:{trace.trace_id}").random() < self.share

    def apply(self, trace: Trace) -> Trace:
        """A delayed copy of ``trace`` (the trace itself when it is not hit)."""
        if not self.hits(trace):
            return trace
        delay = int(round(self.delay_ms * 1e6))
        copies = [replace(s, attributes=dict(s.attributes), events=list(s.events)) for s in trace]
        spans: dict[str, Span] = {}
        for c in copies:  # a span id written twice (overlapping captures): the first copy decides, all copies move
            spans.setdefault(c.span_id, c)
        before = {sid: (c.start_ns, c.end_ns) for sid, c in spans.items()}
        parent = {sid: c.parent_id for sid, c in spans.items()}
        entries = [sid for sid, c in spans.items() if c.service == self.service
                   and (c.parent_id not in spans or spans[c.parent_id].service != self.service)]  # fmt: skip
        # Latest first: a delay only moves what comes after it, so earlier targets keep their original instants.
        targets = sorted(entries, key=lambda i: -spans[i].end_ns)
        order = _parents_first(trace)
        for target in targets:
            at = spans[target].end_ns
            chain = {target}  # the delayed span and the ancestors still open when it ended: they waited for it
            node = parent.get(target)
            while node is not None and node in spans and node not in chain and spans[node].end_ns >= at:
                chain.add(node)
                node = parent.get(node)
            moved: set[str] = set()
            for sid in order:
                c, up = spans[sid], parent.get(sid)
                if sid in chain:
                    c.end_ns += delay
                    c.events = [replace(e, time_ns=e.time_ns + delay) if e.time_ns >= at else e for e in c.events]
                elif c.start_ns >= at and (up not in spans or up in chain or up in moved):
                    # after the slow call, in a branch that waited for it (a concurrent branch keeps its time)
                    c.start_ns += delay
                    c.end_ns += delay
                    c.events = [replace(e, time_ns=e.time_ns + delay) for e in c.events]
                    moved.add(sid)
            mark = spans[target].attributes
            mark[DELAY_ATTRIBUTE] = float(mark.get(DELAY_ATTRIBUTE, 0.0)) + self.delay_ms
        for c in copies:
            first = spans[c.span_id]
            if c is not first:
                c.start_ns += first.start_ns - before[c.span_id][0]
                c.end_ns += first.end_ns - before[c.span_id][1]
                c.events, c.attributes = list(first.events), dict(first.attributes)
        return Trace(copies, trace.trace_id)


def _parents_first(trace: Trace) -> list[str]:
    """Span ids, every parent before its children (spans whose parent is missing count as roots)."""
    ids = {s.span_id for s in trace}
    kids: dict[str | None, list[str]] = {}
    for s in trace:
        kids.setdefault(s.parent_id if s.parent_id in ids else None, []).append(s.span_id)
    out, todo, seen = [], list(kids.get(None, [])), set()
    while todo:
        sid = todo.pop()
        if sid in seen:
            continue
        seen.add(sid)
        out.append(sid)
        todo.extend(kids.get(sid, []))
    return out + [s.span_id for s in trace if s.span_id not in seen]  # cycles: last, in input order


def delayed_spans(trace: Trace) -> list[Span]:
    """The spans an incident delayed."""
    return [s for s in trace if DELAY_ATTRIBUTE in s.attributes]
