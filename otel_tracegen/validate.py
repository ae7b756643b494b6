"""Trace validity by name: every violation, with the span ids involved, never a bare boolean.

The rules are the paper's (one root, parents present, no cycles or duplicate ids, start <= end, children inside
their parent's time window, consistent hierarchical ids) plus the generation request (calls and depth as asked).
Captured data breaks the time-window rule routinely (async work, clock skew: 65 % of TrainTicket traces have a
child ending after its parent, mostly by under 1 ms), so that rule takes an explicit tolerance.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from .trace import Span, Trace

RPC_ID_ATTRIBUTE = "alibaba.rpc_id"
"""Hierarchical call id (``0.1.3`` is a child of ``0.1``) as the Alibaba adapter records it."""


class ViolationKind(str, enum.Enum):
    NO_ROOT = "no_root"
    MULTIPLE_ROOTS = "multiple_roots"
    ORPHAN = "orphan"
    CYCLE = "cycle"
    DUPLICATE_SPAN_ID = "duplicate_span_id"
    END_BEFORE_START = "end_before_start"
    CHILD_OUTSIDE_PARENT = "child_outside_parent"
    HIERARCHICAL_ID = "hierarchical_id"
    CALLS_MISMATCH = "calls_mismatch"
    DEPTH_MISMATCH = "depth_mismatch"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Violation:
    kind: ViolationKind
    span_ids: tuple[str, ...]
    detail: str

    def __str__(self) -> str:
        ids = ",".join(self.span_ids[:8]) + (f",… ({len(self.span_ids)} spans)" if len(self.span_ids) > 8 else "")
        return f"{self.kind.value}: {self.detail}" + (f" [spans {ids}]" if ids else "")


def validate(
    trace: Trace,
    *,
    tolerance_ns: int = 0,
    expect_calls: int | None = None,
    expect_depth: int | None = None,
    check_time_window: bool = True,
) -> list[Violation]:
    """Every rule ``trace`` breaks.

    ``tolerance_ns`` is how far a child may start before or end after its parent and still count as inside.
    ``expect_calls`` / ``expect_depth`` check a generation request: calls are spans (the root is the client's
    call into the entry service), depth is spans on the longest root-to-leaf path.
    """
    out: list[Violation] = []
    spans = trace.spans

    counts = Counter(s.span_id for s in spans)
    dups = sorted(sid for sid, n in counts.items() if n > 1)
    for sid in dups:
        out.append(Violation(ViolationKind.DUPLICATE_SPAN_ID, (sid,), f"span id {sid} occurs {counts[sid]} times"))

    # Distinct ids: a root repeated under one id is one root (its repetition is reported as a duplicate).
    roots = list(dict.fromkeys(s.span_id for s in spans if s.parent_id is None))
    if not roots:
        out.append(Violation(ViolationKind.NO_ROOT, (), "no span without a parent"))
    elif len(roots) > 1:
        out.append(Violation(ViolationKind.MULTIPLE_ROOTS, tuple(roots), f"{len(roots)} spans without a parent"))

    by_id = trace.by_id
    orphans = [s for s in spans if s.parent_id is not None and s.parent_id not in by_id]
    for s in orphans:
        out.append(Violation(ViolationKind.ORPHAN, (s.span_id,), f"parent {s.parent_id} is not in the trace"))

    out.extend(_cycles(trace))

    for s in spans:
        if s.end_ns < s.start_ns:
            out.append(
                Violation(ViolationKind.END_BEFORE_START, (s.span_id,), f"ends {s.start_ns - s.end_ns} ns before it starts")
            )

    if check_time_window:
        out.extend(time_window_violations(trace, tolerance_ns))

    out.extend(_hierarchical_ids(spans, by_id))

    if expect_calls is not None and len(spans) != expect_calls:
        out.append(Violation(ViolationKind.CALLS_MISMATCH, (), f"{len(spans)} calls, {expect_calls} requested"))
    if expect_depth is not None:
        depth = trace.depth
        if depth != expect_depth:
            out.append(Violation(ViolationKind.DEPTH_MISMATCH, (), f"depth {depth}, {expect_depth} requested"))
    return out


def time_window_violations(trace: Trace, tolerance_ns: int = 0) -> list[Violation]:
    """Children starting before or ending after their parent by more than ``tolerance_ns``."""
    out = []
    by_id = trace.by_id
    for s in trace.spans:
        parent = by_id.get(s.parent_id) if s.parent_id is not None else None
        if parent is None or parent is s:
            continue
        early = parent.start_ns - s.start_ns
        late = s.end_ns - parent.end_ns
        if early > tolerance_ns or late > tolerance_ns:
            parts = []
            if early > tolerance_ns:
                parts.append(f"starts {early} ns before")
            if late > tolerance_ns:
                parts.append(f"ends {late} ns after")
            out.append(
                Violation(
                    ViolationKind.CHILD_OUTSIDE_PARENT,
                    (parent.span_id, s.span_id),
                    " and ".join(parts) + f" its parent (tolerance {tolerance_ns} ns)",
                )
            )
    return out


def _cycles(trace: Trace) -> list[Violation]:
    """Parent links that loop. Each span has one parent, so every cycle is a simple loop of parent links."""
    spans = trace.spans
    reached = sum(1 for _ in trace.walk())
    if reached == len(spans) and len(trace.by_id) == len(spans):
        return []  # every span hangs below a root: no loop is possible (the common case, kept cheap)
    import networkx as nx

    g = nx.DiGraph()
    g.add_edges_from((s.parent_id, s.span_id) for s in spans if s.parent_id is not None)
    found = []
    for comp in nx.strongly_connected_components(g):
        if len(comp) > 1:
            found.append(sorted(comp))
    for s in spans:
        if s.parent_id == s.span_id:
            found.append([s.span_id])
    return [Violation(ViolationKind.CYCLE, tuple(c), f"parent links form a loop of {len(c)} spans") for c in found]


def _hierarchical_ids(spans: list[Span], by_id: dict[str, Span]) -> list[Violation]:
    """Where spans carry a dotted call id (Alibaba rpc_id), a child's id must extend its parent's by one level."""
    out = []
    for s in spans:
        rid = s.attributes.get(RPC_ID_ATTRIBUTE)
        if not isinstance(rid, str) or s.parent_id is None:
            continue
        parent = by_id.get(s.parent_id)
        if parent is None:
            continue
        prid = parent.attributes.get(RPC_ID_ATTRIBUTE)
        if not isinstance(prid, str):
            continue
        if not (rid.startswith(prid + ".") and "." not in rid[len(prid) + 1 :]):
            out.append(
                Violation(
                    ViolationKind.HIERARCHICAL_ID,
                    (parent.span_id, s.span_id),
                    f"rpc_id {rid} is not a direct child of its parent's rpc_id {prid}",
                )
            )
    return out


def summarize(violations_per_trace: Iterable[list[Violation]]) -> Counter:
    """Traces affected, by violation kind."""
    c: Counter = Counter()
    for vs in violations_per_trace:
        c.update({v.kind for v in vs})
    return c
