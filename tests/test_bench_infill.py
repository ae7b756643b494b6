"""The infill benchmark's measuring functions (``benchmarks/bench_infill.py``) on tiny hand-made traces: the
baselines and the scoring, without the shipped model or ../shared."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from otel_tracegen.infill.repair import TraceRepairer
from otel_tracegen.trace import Resource, Span, SpanKind, Status, Trace

MS = 1_000_000
PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_infill.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_infill", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_infill"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _span(trace, n, parent, service, name, start, end):
    sid = f"{n:016x}"
    pid = f"{parent:016x}" if parent is not None else None
    return Span(trace, sid, pid, service, name, start * MS, end * MS, SpanKind.SERVER, Status(), {},
                Resource({"service.name": service, "host.name": f"h-{service}"}))


def _tree(i: int, overlap: bool = False) -> Trace:
    """a -> b -> c -> e, a -> d. With ``overlap``, d runs beside b and holds c's window (a concurrent sibling:
    the nearest ancestor by time is then d, the wrong one)."""
    t = f"{i + 1:032x}"
    d = (15, 50) if overlap else (70, 90)
    return Trace([
        _span(t, 1, None, "a", "GET /", 0, 100),
        _span(t, 2, 1, "b", "call", 10, 60),
        _span(t, 3, 2, "c", "query", 20, 40),
        _span(t, 5, 3, "e", "read", 25, 35),
        _span(t, 4, 1, "d", "work", *d),
    ])  # fmt: skip


def _cases(bench, traces, stats=None):
    return bench.missing_call_cases(traces, len(traces), random.Random(0), stats)


def test_lookup_baseline_is_exact_on_the_data_it_was_built_from(bench):
    traces = [_tree(i) for i in range(6)]
    stats = bench.TrainStats.build(traces)
    cases = _cases(bench, traces, stats)
    assert len(cases) == 6 and {c.lost.name for c in cases} <= {"call", "query"}  # connecting spans only
    assert all(c.seen == 6 and bench.bucket(c.seen) == "seen 1-9" for c in cases)
    rule_recs, rule_outs, _ = bench.measure_missing_calls(cases, TraceRepairer(None, None))
    recs = bench.measure_lookup(cases, bench.lookup_baseline(traces), rule_outs)
    summary = bench.summarize_missing(recs)
    assert summary["accuracy"] == summary["identity"] == summary["right_parent"] == summary["made"] == 1.0
    assert summary["duration_err_log10"] == 0.0  # every copy has the same duration: the median is exact
    # the rule makes no span: accuracy 0 by construction; here the nearest ancestor is always the right one
    rule = bench.summarize_missing(rule_recs)
    assert rule["accuracy"] == rule["made"] == 0.0 and rule["right_parent"] == 1.0
    assert rule["duration_err_log10"] is None


def test_rule_right_parent_rate_counts_wrongly_reparented_orphans(bench):
    traces = [_tree(0), _tree(1, overlap=True)]
    t0, t1 = traces
    # remove b in both: its orphan c belongs under a; with the concurrent sibling the rule hangs it under d
    cases = [bench.MissingCase(t, t.spans[1], [s for s in t.spans if s.name != "call"], [t.spans[2].span_id])
             for t in traces]  # fmt: skip
    recs, outs, _ = bench.measure_missing_calls(cases, TraceRepairer(None, None))
    assert [r["right_parent"] for r in recs] == [True, False]
    assert {s.span_id: s.parent_id for s in outs[1]}[t1.spans[2].span_id] == t1.spans[4].span_id  # d
    s = bench.summarize_missing(recs)
    assert (s["accuracy"], s["right_parent"], s["made"]) == (0.0, 0.5, 0.0)
    # the lookup names the span right but puts it under the rule's (wrong) parent: not correct there
    lk = bench.summarize_missing(bench.measure_lookup(cases, bench.lookup_baseline([t0]), outs))
    assert (lk["identity"], lk["right_parent"], lk["accuracy"]) == (1.0, 0.5, 0.5)
    # the path split: b's path a -> b -> c was seen once in [t0], never in an empty train set
    stats = bench.TrainStats.build([t0])
    assert stats.path_seen(t0.spans[0], t0.spans[1], [t0.spans[2]]) == 1
    assert bench.TrainStats.build([]).path_seen(t0.spans[0], t0.spans[1], [t0.spans[2]]) == 0


def test_lookup_falls_back_to_single_children_then_nothing(bench):
    lk = bench.lookup_baseline([_tree(0)])
    t = _tree(1)
    c, e = t.spans[2], t.spans[3]
    assert lk.predict([c]) == ("b", "call") and lk.predict([e]) == ("c", "query")
    assert lk.predict([c, e]) in {("b", "call"), ("c", "query")}  # an unseen set: votes of each child
    stranger = _span(t.trace_id, 9, 2, "z", "nope", 20, 30)
    assert lk.predict([stranger]) is None


def test_attribute_baselines(bench):
    t = f"{1:032x}"
    # a calls b twice and c once; b calls x (op "p" twice under "call", op "q" once under "other")
    train = [Trace([
        _span(t, 1, None, "a", "GET /", 0, 100),
        _span(t, 2, 1, "b", "call", 10, 20),
        _span(t, 3, 1, "b", "other", 20, 30),
        _span(t, 4, 1, "c", "run", 30, 40),
        _span(t, 5, 2, "x", "p", 11, 12),
        _span(t, 6, 2, "x", "p", 12, 13),
        _span(t, 7, 3, "x", "q", 21, 22),
        _span(t, 8, 3, "x", "q", 22, 23),
        _span(t, 9, 3, "x", "q", 23, 24),
    ])]  # fmt: skip
    stats = bench.TrainStats.build(train)
    tr = train[0]
    x_under_call = tr.spans[4]
    cases = [bench.AttributeCase(tr, x_under_call, "service", []), bench.AttributeCase(tr, x_under_call, "name", []),
             bench.AttributeCase(tr, tr.spans[3], "service", [])]  # c under a
    plain = bench.FrequencyBaseline(stats)
    given = bench.FrequencyBaseline(stats, given_parent=True)
    # overall: x is the most frequent service (5 spans), q the most frequent op of x
    assert [plain.predict(c) for c in cases] == ["x", "q", "x"]
    # given the parent: b (service) calls x; b/call calls x/p; a calls b most
    assert [given.predict(c) for c in cases] == ["x", "p", "b"]
    got = bench.summarize_attributes(bench.measure_attribute_baseline(cases, given))
    assert (got["accuracy"], got["service"], got["name"]) == (pytest.approx(2 / 3), 0.5, 1.0)
    got = bench.summarize_attributes(bench.measure_attribute_baseline(cases, plain))
    assert (got["accuracy"], got["service"], got["name"]) == (pytest.approx(1 / 3), 0.5, 0.0)


def test_attribute_cases_mask_half_services_half_names_and_rules_write_nothing(bench):
    traces = [_tree(i) for i in range(6)]
    cases = bench.attribute_cases(traces, 6, random.Random(1))
    assert [c.field for c in cases] == ["service", "name"] * 3
    for c in cases:
        m = next(s for s in c.masked if s.span_id == c.target.span_id)
        assert (m.service, m.resource.attributes) == ("unknown_service", {"service.name": "unknown_service"}) \
            if c.field == "service" else m.name == ""
        assert c.target.parent_id is not None
    recs, _ = bench.measure_attributes(cases, TraceRepairer(None, None))
    s = bench.summarize_attributes(recs)
    assert (s["accuracy"], s["written"], s["n"]) == (0.0, 0.0, 6)


def test_path_lookup_climbs_past_a_concurrent_sibling(bench):
    traces = [_tree(0), _tree(1, overlap=True)]
    cases = [bench.MissingCase(t, t.spans[1], [s for s in t.spans if s.name != "call"], [t.spans[2].span_id])
             for t in traces]  # fmt: skip
    _, outs, _ = bench.measure_missing_calls(cases, TraceRepairer(None, None))
    # the rule hung c under d in the second trace; d never called anything that calls c, so the parent is a
    got = bench.summarize_missing(bench.measure_lookup(cases, bench.PathLookupBaseline([traces[0]]), outs))
    assert (got["accuracy"], got["identity"], got["right_parent"]) == (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def holdout():
    path = Path(__file__).resolve().parents[1] / "scripts" / "holdout_calls.py"
    spec = importlib.util.spec_from_file_location("holdout_calls", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree_via(i: int, caller: str) -> Trace:
    """a -> b(call) -> c -> e as ``_tree``, but c is called by ``caller`` (a span of b's service)."""
    t = _tree(i)
    t.spans[1].name = caller
    return t


def test_holdout_removes_the_cheapest_call_whose_ends_stay_known(holdout):
    # b.call -> c.query is in 2 train traces, b.other -> c.query in 5, and one trace has b.call -> e.read:
    # without the first two, b.call is still known (it calls e.read) and c.query still has a caller (b.other)
    train = [_tree_via(i, "call") for i in range(2)] + [_tree_via(i, "other") for i in range(2, 7)]
    extra = _tree(7)
    extra.spans[2].name, extra.spans[2].service = "read", "e"
    train.append(extra)
    validation = [_tree_via(i, "call") for i in range(10, 13)]
    held, removed = holdout.choose_held_out(train, validation, calls=1, min_validation=3, max_removed=0.5)
    assert [(tuple(h["parent"]), tuple(h["child"])) for h in held] == [(("b", "call"), ("c", "query"))]
    assert held[0]["train_traces"] == 2 and held[0]["validation_cases"] == 3
    assert removed == {0, 1}
    left = [t for i, t in enumerate(train) if i not in removed]
    assert all((("b", "call"), ("c", "query")) not in holdout.calls_of(t) for t in left)


def test_holdout_refuses_calls_that_would_leave_an_end_unknown_or_cost_too_much(holdout):
    train = [_tree_via(i, "call") for i in range(4)] + [_tree_via(i, "other") for i in range(4, 6)]
    validation = [_tree_via(i, "call") for i in range(10, 13)]
    # b.call occurs only in traces with b.call -> c.query: holding it out would make "b call" unknown
    held, _ = holdout.choose_held_out(train, validation, calls=4, min_validation=3, max_removed=1.0)
    assert (["b", "call"], ["c", "query"]) not in [(h["parent"], h["child"]) for h in held]
    # a budget below the call's 4 train traces refuses every call that costs more
    held, removed = holdout.choose_held_out(train, validation, calls=4, min_validation=3, max_removed=0.3)
    assert all(h["train_traces"] <= 1 for h in held) and len(removed) <= 1


def test_unseen_call_cases_draw_only_lost_spans_making_a_call_train_never_saw(bench):
    train = [_tree_via(i, "other") for i in range(4)]  # b.other -> c.query; c.query -> e.read
    stats = bench.TrainStats.build(train)
    held = [_tree_via(i, "call") for i in range(10, 16)]  # b.call -> c.query: never in train
    cases = bench.missing_call_cases(held, 6, random.Random(0), stats, unseen_calls=True)
    assert len(cases) == 6 and {c.lost.name for c in cases} == {"call"}
    assert all(c.seen == 0 and bench.bucket(c.seen) == "unseen" for c in cases)
    # without the filter, c.query (a seen call to e.read) is lost as well
    every = bench.missing_call_cases(held, 6, random.Random(0), stats)
    assert {c.lost.name for c in every} == {"call", "query"}
    # the lookup answers what train saw calling c.query: b.other, the wrong operation
    rule_recs, rule_outs, _ = bench.measure_missing_calls(cases, TraceRepairer(None, None))
    recs = bench.measure_lookup(cases, bench.lookup_baseline(stats), rule_outs)
    assert bench.summarize_missing(recs)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="stats"):
        bench.missing_call_cases(held, 6, random.Random(0), None, unseen_calls=True)


def _client_call(i: int, caller: str, callee: tuple[str, str]) -> Trace:
    """gw GET / -> ``caller`` handle -> ``caller`` "HTTP GET" (its client span) -> ``callee``."""
    t = f"{i + 1:032x}"
    return Trace([
        _span(t, 1, None, "gw", "GET /", 0, 100),
        _span(t, 2, 1, caller, "handle", 5, 95),
        _span(t, 3, 2, caller, "HTTP GET", 10, 60),
        _span(t, 4, 3, *callee, 20, 40),
    ])  # fmt: skip


def test_analogy_lookup_names_a_new_caller_as_a_client_span_of_its_own_service(bench):
    # train: b's client calls c /q, a's client calls d /r; held out: a's client calling c /q (a new caller)
    train = [_client_call(i, "b", ("c", "/q")) for i in range(3)] + [_client_call(i, "a", ("d", "/r"))
                                                                     for i in range(3, 6)]  # fmt: skip
    stats = bench.TrainStats.build(train)
    held = [_client_call(i, "a", ("c", "/q")) for i in range(10, 14)]
    cases = bench.missing_call_cases(held, 4, random.Random(0), stats, unseen_calls=True)
    assert len(cases) == 4 and all(c.lost.name == "HTTP GET" and c.lost.service == "a" for c in cases)
    _, rule_outs, _ = bench.measure_missing_calls(cases, TraceRepairer(None, None))
    summary = {name: bench.summarize_missing(bench.measure_lookup(cases, lk, rule_outs))["accuracy"]
               for name, lk in (("lookup", bench.lookup_baseline(stats)), ("path", bench.PathLookupBaseline(stats)),
                                ("analogy", bench.AnalogyLookupBaseline(stats)))}  # fmt: skip
    assert summary == {"lookup": 0.0, "path": 0.0, "analogy": 1.0}  # the others answer b's client span
    # on a path train saw, the analogy lookup is the path lookup
    seen = bench.missing_call_cases(train[:3], 3, random.Random(0), stats)
    _, outs, _ = bench.measure_missing_calls(seen, TraceRepairer(None, None))
    assert [r["correct"] for r in bench.measure_lookup(seen, bench.AnalogyLookupBaseline(stats), outs)] == \
        [r["correct"] for r in bench.measure_lookup(seen, bench.PathLookupBaseline(stats), outs)]
