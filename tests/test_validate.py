"""Each named violation is found, with the span ids involved; valid traces yield none."""

from otel_tracegen.trace import Span, Trace
from otel_tracegen.validate import RPC_ID_ATTRIBUTE, ViolationKind as V, summarize, validate


def span(sid, parent, start=0, end=100, svc="svc", **kw):
    return Span("t1", sid, parent, svc, f"op-{sid}", start, end, **kw)


def kinds(vs):
    return sorted(v.kind for v in vs)


def test_valid_tree_has_no_violations():
    t = Trace([span("a", None, 0, 100), span("b", "a", 10, 50), span("c", "a", 50, 90), span("d", "b", 20, 30)])
    assert validate(t) == []
    assert validate(t, expect_calls=4, expect_depth=3) == []


def test_no_root_and_multiple_roots():
    vs = validate(Trace([span("a", "b"), span("b", "a")]))
    assert V.NO_ROOT in kinds(vs) and V.CYCLE in kinds(vs)
    cyc = next(v for v in vs if v.kind is V.CYCLE)
    assert set(cyc.span_ids) == {"a", "b"}
    vs = validate(Trace([span("a", None), span("b", None)]))
    roots = [v for v in vs if v.kind is V.MULTIPLE_ROOTS]
    assert len(roots) == 1 and set(roots[0].span_ids) == {"a", "b"}


def test_orphan_names_the_span_and_missing_parent():
    vs = validate(Trace([span("a", None), span("b", "zzz")]))
    (o,) = [v for v in vs if v.kind is V.ORPHAN]
    assert o.span_ids == ("b",) and "zzz" in o.detail


def test_self_loop_is_a_cycle():
    vs = validate(Trace([span("a", None), span("b", "b")]))
    assert any(v.kind is V.CYCLE and v.span_ids == ("b",) for v in vs)


def test_duplicate_id_and_end_before_start():
    vs = validate(Trace([span("a", None), span("b", "a", 10, 20), span("b", "a", 30, 40), span("c", "a", 50, 45)]))
    assert (V.DUPLICATE_SPAN_ID, ("b",)) in [(v.kind, v.span_ids) for v in vs]
    assert (V.END_BEFORE_START, ("c",)) in [(v.kind, v.span_ids) for v in vs]


def test_child_outside_parent_respects_tolerance():
    t = Trace([span("a", None, 1000, 2000), span("b", "a", 990, 2005)])
    (v,) = validate(t)
    assert v.kind is V.CHILD_OUTSIDE_PARENT and v.span_ids == ("a", "b")
    assert "starts 10 ns before" in v.detail and "ends 5 ns after" in v.detail
    assert validate(t, tolerance_ns=10) == []
    assert validate(t, tolerance_ns=9) != []
    assert validate(t, check_time_window=False) == []


def test_hierarchical_rpc_ids():
    ok = Trace(
        [
            span("0.1", None, attributes={RPC_ID_ATTRIBUTE: "0.1"}),
            span("0.1.1", "0.1", attributes={RPC_ID_ATTRIBUTE: "0.1.1"}),
        ]
    )
    assert validate(ok) == []
    bad = Trace(
        [
            span("x", None, attributes={RPC_ID_ATTRIBUTE: "0.1"}),
            span("y", "x", attributes={RPC_ID_ATTRIBUTE: "0.2.1"}),
            span("z", "x", attributes={RPC_ID_ATTRIBUTE: "0.1.1.1"}),
        ]
    )
    hv = [v for v in validate(bad) if v.kind is V.HIERARCHICAL_ID]
    assert sorted(v.span_ids for v in hv) == [("x", "y"), ("x", "z")]


def test_requested_calls_and_depth():
    t = Trace([span("a", None), span("b", "a"), span("c", "b")])
    vs = validate(t, expect_calls=4, expect_depth=2)
    assert kinds(vs) == [V.CALLS_MISMATCH, V.DEPTH_MISMATCH]
    assert "3 calls, 4 requested" in str(vs[0]) and "depth 3, 2 requested" in str(vs[1])


def test_summarize_counts_traces_per_kind():
    bad = validate(Trace([span("a", None), span("b", "q"), span("c", "q")]))
    assert summarize([bad, [], bad]) == {V.ORPHAN: 2}
