"""What each call context did over a set of traces: self-times, the latency of calls across services, call counts.

A **context** is a span's (parent service, parent operation, service, operation): the same operation called from
two places is two contexts, because a fault usually slows one code path, and mixing paths hides it.

Two latencies per span:
- **self-time**: the span's duration minus the time covered by its children (their union, clipped to the span).
  A CPU-starved service shows here: its own work takes longer while its callees do not.
- **call gap**: for a client span whose one child runs in another service, the client's duration minus the
  server's. That is time on the wire and in the callee's queue, so a network fault at the callee shows here,
  charged to the callee, while the callee's own spans look normal.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from ..trace import Span, Trace, self_time_ns

Context = tuple[str, str, str, str]
"""(parent service, parent operation, service, operation); the parent is ("", "") for a root."""


@dataclass
class Sample:
    """One observation of a context, kept with where it came from (for evidence)."""

    value_ns: int
    trace_id: str
    span_id: str


@dataclass
class Profile:
    """Per-context observations over a set of traces."""

    traces: int = 0
    self_times: dict[Context, list[Sample]] = field(default_factory=lambda: defaultdict(list))
    gaps: dict[Context, list[Sample]] = field(default_factory=lambda: defaultdict(list))  # charged to the callee
    calls: Counter = field(default_factory=Counter)  # (service, operation) -> spans
    service_traces: Counter = field(default_factory=Counter)  # service -> traces that hold it
    routes: dict[Context, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # one root-first path each
    gap_routes: dict[Context, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # ... to the server span
    normals: dict = field(default_factory=dict)  # ranking's cache of each context's baseline quartiles

    @classmethod
    def of(cls, traces: Iterable[Trace]) -> Profile:
        p = cls()
        for t in traces:
            p.add(t)
        return p

    def add(self, trace: Trace) -> None:
        self.normals.clear()  # new samples: cached quartiles are stale
        by_id = trace.by_id
        self.traces += 1
        services = set()
        seen: set[str] = set()
        for span in trace:
            if span.span_id in seen:  # captures that overlap write some spans twice: count each once
                continue
            seen.add(span.span_id)
            parent = by_id.get(span.parent_id) if span.parent_id else None
            ctx = (parent.service, parent.name, span.service, span.name) if parent else ("", "", span.service, span.name)
            kids = list({k.span_id: k for k in trace.children(span)}.values())
            self.self_times[ctx].append(Sample(self_time_ns(span, kids), trace.trace_id, span.span_id))
            if len(kids) == 1 and kids[0].service != span.service:
                k = kids[0]
                gap_ctx = (span.service, span.name, k.service, k.name)
                self.gaps[gap_ctx].append(Sample(span.duration_ns - k.duration_ns, trace.trace_id, span.span_id))
                if gap_ctx not in self.gap_routes:
                    self.gap_routes[gap_ctx] = _route(trace, k)
            self.calls[(span.service, span.name)] += 1
            services.add(span.service)
            if ctx not in self.routes:
                self.routes[ctx] = _route(trace, span)
        self.service_traces.update(services)

    @property
    def services(self) -> set[str]:
        return set(self.service_traces)


def _route(trace: Trace, span: Span) -> tuple[tuple[str, str], ...]:
    path = []
    node: Span | None = span
    seen = set()
    while node is not None and node.span_id not in seen:
        seen.add(node.span_id)
        path.append((node.service, node.name))
        node = trace.by_id.get(node.parent_id) if node.parent_id else None
    return tuple(reversed(path))
