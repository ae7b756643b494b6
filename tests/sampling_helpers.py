"""Checks shared by the tests of both decoders (our trace tokenizer's and a base model's BPE one)."""

from __future__ import annotations

from otel_tracegen.encoding import Include, decode_trace
from otel_tracegen.sampling import TraceRequest
from otel_tracegen.validate import validate


def assert_include_call_is_generated(sampler, *, calls: int, traces: int) -> None:
    """Ask for the call A -> B that lies deepest from an entry service: every trace is valid, has the calls and
    depth asked for, and holds that call."""
    cat = sampler.catalog
    entry = next(iter(cat.entries))
    hops = {a: cat.hops_to(a) for a in cat.edges}
    a, b = max(((a, b) for a in cat.edges for b in cat.edges[a] if entry in hops[a]), key=lambda e: hops[e[0]][entry])
    req = TraceRequest(service=entry, calls=calls, depth=hops[a][entry] + 3, includes=(Include(a, b),))
    for steps in sampler.generate([req] * traces, seed=3):
        trace = decode_trace(steps)
        assert validate(trace, expect_calls=req.calls, expect_depth=req.depth) == []
        by = trace.by_id
        assert any(s.service == b and s.parent_id and by[s.parent_id].service == a for s in trace)
