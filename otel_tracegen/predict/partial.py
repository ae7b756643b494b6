"""What a prediction may read of a trace, and what it predicts.

A **partial trace** is the root span and the first layer of the call graph: the calls the entry service makes into
other services. OpenTelemetry traces also hold the entry service's own internal and client spans (TrainTicket's
gateway has two of them above every call it routes), so the first layer is found by walking down through spans of
the root's service to the first span of each other service; with no other service, it is the root's children. Of
each, the service, operation and kind are read, in start order (the order is all that is taken from the times).
Nothing below the first layer and no duration or time offset is read, so a full trace can be passed safely.

The two tasks are the paper's downstream tasks, labelled against statistics of the training split per entry (root
service and operation), as the instruct stage labels them (``lm.data.corpus_stats_for_instructions``):

- ``high-latency``: the trace's latency (the root's duration) is above the p90 of its entry;
- ``uncommon-call``: the trace holds a call (parent service, child service, child kind) seen in under 10 % of its
  entry's traces.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..trace import Trace

TASKS = ("high-latency", "uncommon-call")


@dataclass(frozen=True)
class PartialTrace:
    service: str
    operation: str
    kind: str
    layer: tuple[tuple[str, str, str], ...]  # (service, operation, kind) of each child, in start order

    @classmethod
    def of(cls, trace: Trace) -> PartialTrace | None:
        """The root and first layer of ``trace``; None when it has no single root."""
        roots = {s.span_id: s for s in trace.roots}  # a root written twice (a capture that overlaps) is one root
        if len(roots) != 1:
            return None
        [root] = roots.values()
        layer, todo, seen = [], list(trace.children(root)), {root.span_id}
        while todo:
            span = todo.pop()
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            if span.service != root.service:
                layer.append(span)
            else:
                todo.extend(trace.children(span))
        if not layer:
            layer = trace.children(root)
        layer = sorted(layer, key=lambda s: (s.start_ns, s.end_ns, s.service, s.name))
        return cls(root.service, root.name, root.kind.name,
                   tuple((k.service, k.name, k.kind.name) for k in layer))  # fmt: skip

    @property
    def entry(self) -> tuple[str, str]:
        return (self.service, self.operation)


def labels(trace: Trace, stats) -> dict[str, bool] | None:
    """The truth of both tasks for a full trace, against ``stats`` (an ``InstructionStats`` of the train split);
    None when its entry is not in the statistics (nothing to compare with)."""
    from .. import encoding as enc
    from ..lm.data import trace_edges

    root = trace.root
    if root is None or (root.service, root.name) not in stats.p90_us:
        return None
    entry = (root.service, root.name)
    try:
        latency = enc.trace_latency_us(trace)
    except enc.EncodingError:
        return None
    return {"high-latency": latency > stats.p90_us[entry],
            "uncommon-call": bool(trace_edges(trace) & stats.uncommon.get(entry, frozenset()))}  # fmt: skip
