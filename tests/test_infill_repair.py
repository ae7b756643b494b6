"""Infill, the parts without sockets: wire-level pass-through and edits, detection, and repair (rules and model).

Real traces come from the shipped TrainTicket excerpt (``examples/trainticket``, built by the ``corpus`` fixture).
The model cases use the shipped default model (``model/``), which was trained on the full TrainTicket and Online
Boutique sets; the excerpt's traces were part of neither split's validation, so these are not held-out figures
(``benchmarks/bench_infill.py`` measures held-out accuracy).
"""

from __future__ import annotations

import copy
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from otel_tracegen.dataset import load_corpus
from otel_tracegen.formats import otlp_proto
from otel_tracegen.infill import detect as d
from otel_tracegen.infill import wire
from otel_tracegen.infill.repair import (
    MARK_CONFIDENCE,
    MARK_DETAIL,
    MARK_METHOD,
    MARK_ORIGINAL_PARENT,
    MARK_ORIGINAL_START,
    MARK_REPAIR,
    MARK_REPLACES,
    MARK_SHIFT,
    MARK_SYNTHETIC,
    Released,
    RepairSettings,
    TraceRepairer,
    made_span_id,
)
from otel_tracegen.report import ReadReport
from otel_tracegen.sampling.catalog import Catalog
from otel_tracegen.trace import Resource, Span, SpanKind, Status, Trace
from otel_tracegen.validate import validate

from .strategies import exact_spans, traces

MODEL = Path(__file__).resolve().parents[1] / "model"
MS = 1_000_000


@pytest.fixture(scope="module")
def real(corpus) -> list[Trace]:
    _, splits = load_corpus(corpus)
    return [t for s in splits.values() for t in s if len(t) >= 8]


def _span(sid, parent, service, name, start, end, host=None, trace="ab" * 16):
    res = {"service.name": service}
    if host:
        res["host.name"] = host
    return Span(trace, sid, parent, service, name, start * MS, end * MS, SpanKind.SERVER, Status(), {},
                Resource(res))


def _tree():
    """root(a) -> b -> c, root -> d; each on its own host."""
    return [
        _span("0000000000000001", None, "a", "GET /", 0, 100, "h1"),
        _span("0000000000000002", "0000000000000001", "b", "call", 10, 60, "h2"),
        _span("0000000000000003", "0000000000000002", "c", "query", 20, 40, "h3"),
        _span("0000000000000004", "0000000000000001", "d", "work", 70, 90, "h4"),
    ]


def _by_id(result) -> dict[str, Span]:
    """The repaired spans as the downstream reads them (attributes included), by id."""
    return {s.span_id: s for s in otlp_proto.loads(wire.encode(result.spans))}


# --- wire ---------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(rich=True))
def test_received_spans_go_out_as_the_bytes_they_came_in(trace):
    body = otlp_proto.dumps(trace.spans)
    got = wire.decode(body)
    assert exact_spans(w.span for w in got) == exact_spans(trace.spans)
    # every span message, and the resource and scope around it, is forwarded byte for byte
    assert wire.encode(got) == body
    assert wire.count_spans(body) == len(trace.spans)
    # read at the wire level (as the forwarder splits a request), the same spans come out, byte for byte
    raw = wire.raw_spans(body)
    assert [(bytes(r.raw), r.resource, r.scope) for r in raw] == [(w.raw, w.resource, w.scope) for w in got]
    assert [r.trace_id.hex() for r in raw] == [w.span.trace_id for w in got]
    assert wire.encode(raw) == body


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(rich=True, min_spans=2), traces(rich=True))
def test_a_request_split_in_two_holds_every_span_once_and_whole_traces(one, other):
    from otel_tracegen.infill.forward import split_in_two

    body = otlp_proto.dumps(one.spans + other.spans)
    first, second = split_in_two(body)
    halves = [wire.decode(first), wire.decode(second)]
    assert sorted(w.raw for h in halves for w in h) == sorted(w.raw for w in wire.decode(body))
    if one.spans[0].trace_id != other.spans[0].trace_id:  # more than one trace: no trace is cut in two
        assert not {w.span.trace_id for w in halves[0]} & {w.span.trace_id for w in halves[1]}
    assert split_in_two(otlp_proto.dumps(other.spans[:1])) is None


def test_a_malformed_span_is_refused_alone_and_named():
    good = wire.from_spans(_tree())
    raw = good[2].raw
    assert raw[:2] == b"\x0a\x10"  # trace_id first, 16 bytes
    bad = wire.WireSpan(good[2].span, b"\x0a\x0c" + raw[2:14] + raw[18:], good[2].resource, good[2].scope)
    report = ReadReport()
    got = wire.decode(wire.encode([good[0], good[1], bad, good[3]]), report=report)
    assert sorted(w.span.span_id for w in got) == ["0000000000000001", "0000000000000002", "0000000000000004"]
    assert report.total_dropped == 1
    assert "resourceSpans[2].scopeSpans[0].spans[0]: invalid trace id" in str(report.problems[0])


def test_garbage_and_bad_json_are_malformed_requests_with_a_reason():
    with pytest.raises(wire.MalformedRequest, match="not an OTLP ExportTraceServiceRequest"):
        wire.decode(b"\xff\xff\xff")
    with pytest.raises(wire.MalformedRequest, match="not valid JSON"):
        wire.decode(b"{nope", wire.JSON)
    with pytest.raises(wire.MalformedRequest, match="JSON list"):
        wire.decode(b"[]", wire.JSON)


def test_edit_span_changes_only_what_it_is_asked_to(real):
    span = real[0].spans[3]
    raw = otlp_proto.dumps([span])
    w = wire.decode(raw)[0]
    edited = wire.edit_span(w.raw, parent_id="00000000000000ff", start_ns=5, end_ns=9, name="renamed",
                            set_attributes={"otel_tracegen.repair": "orphan", "x": 1})  # fmt: skip
    out = wire.decode(wire.encode([wire.WireSpan(w.span, edited, w.resource, w.scope)]))[0].span
    assert out == replace(span, parent_id="00000000000000ff", start_ns=5, end_ns=9, name="renamed",
                          attributes={**span.attributes, "otel_tracegen.repair": "orphan", "x": 1})  # fmt: skip
    # setting an attribute twice keeps one copy, with the last value
    again = wire.edit_span(edited, set_attributes={"x": 2})
    assert wire.decode(wire.encode([wire.WireSpan(w.span, again, w.resource, w.scope)]))[0].span.attributes["x"] == 2


# --- detection ----------------------------------------------------------------------------------------------


def test_detect_names_each_problem():
    spans = _tree()
    assert not d.detect(spans)
    no_b = [s for s in spans if s.span_id != "0000000000000002"]
    [f] = d.detect(no_b).findings
    assert (f.reason, f.spans, f.missing_parent) == (d.ORPHAN, ("0000000000000003",), "0000000000000002")
    no_root = [s for s in spans if s.parent_id is not None]
    found = d.detect(no_root)
    assert [f.reason for f in found.findings] == [d.MISSING_ROOT]
    assert found.findings[0].spans == ("0000000000000002", "0000000000000004")
    # a late span whose parent was released earlier is no orphan
    assert not d.detect(no_root, released={"0000000000000001"}, released_root=True)
    skewed = [*spans[:2], replace(spans[2], start_ns=5 * MS, end_ns=25 * MS), spans[3]]  # starts before b
    [f] = d.detect(skewed).findings
    assert f.reason == d.CLOCK_SKEW and f.spans == ("0000000000000003",) and "before its parent" in f.detail
    # the same overrun on the parent's own host is not skew (one host, one clock), nor within the tolerance
    same_host = [*spans[:2], replace(skewed[2], resource=spans[1].resource), spans[3]]
    assert not d.detect(same_host)
    assert not d.detect(skewed, settings=d.DetectSettings(skew_tolerance_ns=6 * MS))
    nameless = [spans[0], replace(spans[1], service="unknown_service:java", name=""), *spans[2:]]
    reasons = [(f.reason, f.field) for f in d.detect(nameless).findings]
    assert reasons == [(d.MISSING_ATTRIBUTE, d.Field.SERVICE), (d.MISSING_ATTRIBUTE, d.Field.OPERATION)]


def test_real_complete_traces_have_nothing_to_repair(real):
    assert all(not d.detect(t.spans) for t in real)


# --- repair with rules only -----------------------------------------------------------------------------------


def test_complete_traces_pass_through_byte_for_byte(real):
    rep = TraceRepairer(None, None)
    for t in real[:10]:
        body = otlp_proto.dumps(t.spans)
        [r] = rep.repair([(wire.decode(body), Released())])
        assert not r.repairs and wire.encode(r.spans) == body


def test_rules_reparent_orphans_to_the_nearest_ancestor_and_say_so():
    spans = [s for s in _tree() if s.span_id != "0000000000000002"]
    [r] = TraceRepairer(None, None).repair([(wire.from_spans(spans), Released())])
    out = _by_id(r)
    c = out["0000000000000003"]
    assert c.parent_id == "0000000000000001"  # the root holds c's window; d does not
    assert c.attributes[MARK_REPAIR] == d.ORPHAN and c.attributes[MARK_METHOD] == "rule"
    assert c.attributes[MARK_ORIGINAL_PARENT] == "0000000000000002"
    assert "nearest ancestor" in c.attributes[MARK_DETAIL]
    assert not validate(Trace(list(out.values())))
    # the other spans are untouched
    for s in spans:
        if s.span_id != "0000000000000003":
            assert out[s.span_id] == s


def test_orphans_with_another_systems_ids_are_re_parented_on_the_wire():
    # Alibaba call graphs name spans by rpc id ("0.1.2"), not hex; the wire edit must hash the new parent's id
    # as the span encoder hashed the parent's own, or the re-parented span points nowhere.
    spans = [_span("0.1", None, "a", "GET /", 0, 100), _span("0.1.1", "0.1", "b", "call", 10, 80),
             _span("0.1.1.1.1", "0.1.1.1", "c", "query", 20, 40)]  # "0.1.1.1" is lost  # fmt: skip
    [r] = TraceRepairer().repair([(wire.from_spans(spans), Released())])
    out = otlp_proto.loads(wire.encode(r.spans))
    tree = Trace(out)
    assert len(out) == 3 and len(tree.roots) == 1 and not tree.orphans()
    kid = next(s for s in out if s.name == "query")
    assert kid.parent_id == next(s.span_id for s in out if s.name == "call")
    assert kid.attributes[MARK_METHOD] == "rule" and kid.attributes[MARK_ORIGINAL_PARENT] == "0.1.1.1"


def test_clock_skew_is_shifted_by_jaegers_rule_with_its_subtree():
    spans = _tree()
    # c's host clock runs 30 ms early: c starts before b
    skewed = [spans[0], spans[1], replace(spans[2], start_ns=-10 * MS, end_ns=10 * MS), spans[3]]
    [r] = TraceRepairer(None, None).repair([(wire.from_spans(skewed), Released())])
    c = _by_id(r)["0000000000000003"]
    # Jaeger: latency = (50 - 20) / 2 = 15 ms after b's start
    assert (c.start_ns, c.end_ns) == (25 * MS, 45 * MS)
    assert c.attributes[MARK_REPAIR] == d.CLOCK_SKEW and c.attributes[MARK_SHIFT] == 35 * MS
    assert c.attributes[MARK_ORIGINAL_START] == -10 * MS


def test_a_lost_root_without_a_model_is_left_lost_but_marked():
    spans = [s for s in _tree() if s.parent_id is not None]
    [r] = TraceRepairer(None, None).repair([(wire.from_spans(spans), Released())])
    out = _by_id(r)
    assert len(out) == 3 and not any(s.attributes.get(MARK_SYNTHETIC) for s in out.values())
    assert out["0000000000000002"].attributes[MARK_REPAIR] == d.MISSING_ROOT
    assert out["0000000000000002"].attributes[MARK_METHOD] == "none"


# --- repair with the shipped model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filler():
    pytest.importorskip("torch")
    from otel_tracegen.infill.filler import ModelFiller
    from otel_tracegen.lm.model import load_model

    return ModelFiller(load_model(MODEL, "cpu"))


def _remove_connecting(trace: Trace, rng: random.Random) -> tuple[list[Span], Span]:
    lost = rng.choice([s for s in trace.spans if s.parent_id is not None and trace.children(s)])
    return [s for s in trace.spans if s.span_id != lost.span_id], lost


def test_the_model_writes_lost_spans_back(real, filler):
    rng = random.Random(1)
    picked = rng.sample(real, 16)
    cases = [_remove_connecting(t, rng) for t in picked]
    results = TraceRepairer(filler).repair([(wire.from_spans(spans), Released()) for spans, _ in cases])
    right = 0
    for (spans, lost), r in zip(cases, results):
        out = _by_id(r)
        made = [s for s in out.values() if s.attributes.get(MARK_SYNTHETIC)]
        assert len(made) <= 1
        if not made:
            continue
        m = made[0]
        assert m.span_id == made_span_id(lost.trace_id, lost.span_id) and m.attributes[MARK_REPLACES] == lost.span_id
        assert 0.5 <= m.attributes[MARK_CONFIDENCE] <= 1
        kids = [s for s in out.values() if s.parent_id == m.span_id]
        assert {k.span_id for k in kids} == {s.span_id for s in spans if s.parent_id == lost.span_id}
        assert m.start_ns <= min(k.start_ns for k in kids) and m.end_ns >= max(k.end_ns for k in kids)
        tree = Trace(list(out.values()))
        assert len(tree.roots) == 1 and not tree.orphans()
        right += (m.service, m.name, m.parent_id) == (lost.service, lost.name, lost.parent_id)
    assert right >= 13, f"{right}/16 lost spans written back exactly"


def test_where_no_grandparent_has_seen_the_path_the_nearest_one_gets_the_span(real, filler):
    # A catalog that knows no calls by operation: every lost span sits on a path the data "never saw", so the
    # model's confidences are its own guesses and do not choose the grandparent; the rule's parent does.
    blind = replace(filler.catalog, op_edges={})
    rng = random.Random(7)
    cases = [_remove_connecting(t, rng) for t in rng.sample(real, 16)]
    inputs = [(wire.from_spans(spans), Released()) for spans, _ in cases]
    made = TraceRepairer(filler, blind, RepairSettings(confidence=0.0)).repair(inputs)
    ruled = TraceRepairer(None, blind).repair([(wire.from_spans(spans), Released()) for spans, _ in cases])
    for (spans, lost), m, r in zip(cases, made, ruled):
        [span] = [s for s in _by_id(m).values() if s.attributes.get(MARK_SYNTHETIC)]
        kid = next(s for s in spans if s.parent_id == lost.span_id)
        assert span.parent_id == _by_id(r)[kid.span_id].parent_id


def _without_call(cat: Catalog, caller: Span, callee: Span) -> Catalog:
    """``cat`` as if training had never seen ``caller``'s operation call ``callee``'s."""
    edges = copy.deepcopy(cat.op_edges)
    del edges[caller.service][caller.name][callee.service][callee.name]
    return replace(cat, op_edges=edges)


def test_a_call_training_never_saw_is_written_by_analogy_with_other_callers(real, filler):
    # A lost client span whose call (its operation -> the orphan's) the catalog is made to forget, while another
    # service's same-named operation was seen making that call: a new caller, as in a held-out TrainTicket call.
    cat = filler.catalog
    for t in real:
        for lost in (s for s in t.spans if s.parent_id is not None and len(t.children(s)) == 1):
            gp, [kid] = t.by_id.get(lost.parent_id), t.children(lost)
            if gp is None or gp.service != lost.service or kid.service == lost.service:
                continue
            others = {c for c in cat.op_callers(kid.service, kid.name) if c[1] == lost.name and c[0] != lost.service}
            if others:
                break
        else:
            continue
        break
    else:
        pytest.fail("no lost client span with another caller of its call in the excerpt")
    forgot = _without_call(cat, lost, kid)
    spans = [s for s in t.spans if s.span_id != lost.span_id]
    [r] = TraceRepairer(filler, forgot).repair([(wire.from_spans(spans), Released())])
    [made] = [s for s in _by_id(r).values() if s.attributes.get(MARK_SYNTHETIC)]
    assert (made.service, made.name, made.parent_id) == (lost.service, lost.name, lost.parent_id)
    assert "by analogy" in made.attributes[MARK_DETAIL]
    # without the analogy the model is on its own there (this model was trained on the call; only the catalog
    # forgot it), and what it makes does not claim an analogy
    off = TraceRepairer(filler, forgot, RepairSettings(analogy=False, confidence=0.0))
    [r] = off.repair([(wire.from_spans(spans), Released())])
    [made] = [s for s in _by_id(r).values() if s.attributes.get(MARK_SYNTHETIC)]
    assert "analogy" not in made.attributes[MARK_DETAIL]


def test_analogues_are_callers_of_every_orphan_else_of_any():
    def call(sid, parent, service, name, start, end):
        return _span(sid, parent, service, name, start, end)

    seen = [  # gw -> a.handle -> a "HTTP GET" -> b /items ; gw -> c.handle -> c "HTTP GET" -> b /users -> b.err
        [call("1", None, "gw", "GET /", 0, 100), call("2", "1", "a", "handle", 1, 90),
         call("3", "2", "a", "HTTP GET", 2, 50), call("4", "3", "b", "/items", 3, 40)],
        [call("1", None, "gw", "GET /", 0, 100), call("2", "1", "c", "handle", 1, 90),
         call("3", "2", "c", "HTTP GET", 2, 50), call("4", "3", "b", "/users", 3, 40),
         call("5", "4", "b", "error", 4, 30)],
    ]  # fmt: skip
    rep = TraceRepairer(None, Catalog.from_traces([Trace(t) for t in seen]))
    handle, users, err = call("2", "1", "a", "handle", 1, 90), call("9", "x", "b", "/users", 3, 40), \
        call("8", "x", "b", "error", 4, 30)
    # a new caller of b /users: a client span of a's own, named as c's
    assert rep._allowed_pairs(handle, [users]) == ()
    assert rep._analogues(handle, [users]) == (("a", "HTTP GET"),)
    # a lost server span of b whose orphans were never seen together: callers of either
    assert rep._analogues(handle, [call("7", "x", "b", "/items", 3, 40), err]) == (("a", "HTTP GET"), ("b", "/users"))
    assert rep._analogues(None, [users]) == ()


def test_a_lost_root_is_written_by_the_model(real, filler):
    t = real[0]
    spans = [s for s in t.spans if s.parent_id is not None]
    [r] = TraceRepairer(filler).repair([(wire.from_spans(spans), Released())])
    out = _by_id(r)
    [m] = [s for s in out.values() if s.attributes.get(MARK_SYNTHETIC)]
    assert m.parent_id is None and m.attributes[MARK_REPAIR] == d.MISSING_ROOT
    assert (m.service, m.name) == (t.root.service, t.root.name)
    assert len(Trace(list(out.values())).roots) == 1


def test_late_orphans_join_the_span_made_for_their_parent(real, filler):
    # a lost span with two or more children, one of them a leaf that arrives late
    t, lost = next((t, s) for t in real for s in t.spans if s.parent_id is not None and len(t.children(s)) >= 2
                   and any(not t.children(k) for k in t.children(s)))  # fmt: skip
    late = next(k for k in t.children(lost) if not t.children(k))
    first = [s for s in t.spans if s.span_id not in (lost.span_id, late.span_id)]
    released = Released()
    rep = TraceRepairer(filler, settings=RepairSettings(confidence=0.0))
    [r1] = rep.repair([(wire.from_spans(first), released)])
    [made] = [w.span for w in r1.spans if w.span.attributes.get(MARK_SYNTHETIC)]
    [r2] = rep.repair([(wire.from_spans([late]), released)])
    [w] = r2.spans  # no second made span
    assert w.span.parent_id == made.span_id
    assert "late span" in _by_id(r2)[late.span_id].attributes[MARK_DETAIL]
    # a late span whose parent went out earlier is passed through untouched
    [r3] = rep.repair([(wire.from_spans([late]), Released(ids={lost.span_id}, root=True))])
    assert not r3.repairs and r3.spans[0].span == late


def test_missing_service_and_name_are_written_by_the_model(real, filler):
    rng = random.Random(5)
    right = total = 0
    cases = []
    for t in rng.sample(real, 12):
        target = rng.choice([s for s in t.spans if s.parent_id is not None])
        if rng.random() < 0.5:
            masked = replace(target, service="unknown_service", resource=Resource({"service.name": "unknown_service"}))
        else:
            masked = replace(target, name="")
        cases.append(([masked if s.span_id == target.span_id else s for s in t.spans], target))
    results = TraceRepairer(filler).repair([(wire.from_spans(spans), Released()) for spans, _ in cases])
    for (_, target), r in zip(cases, results):
        got = _by_id(r)[target.span_id]
        total += 1
        right += (got.service, got.name) == (target.service, target.name)
        assert got.attributes[MARK_REPAIR] == d.MISSING_ATTRIBUTE
        if got.attributes[MARK_METHOD] == "model":
            assert got.resource.attributes["service.name"] == got.service
    assert right >= 10, f"{right}/{total}"


def _foreign(trace: Trace) -> list[Span]:
    """The trace as another system would send it: the same shape and timing, services the model never saw
    (operation names kept: many, like ``HTTP GET``, are common to every system)."""
    return [replace(s, service=f"acme-{s.service}", resource=Resource({"service.name": f"acme-{s.service}"}))
            for s in trace.spans]  # fmt: skip


def test_the_model_writes_nothing_into_a_system_it_never_saw(real, filler):
    # Even at confidence 0: what it would write comes from TrainTicket, so it is not asked.
    rng = random.Random(3)
    rep = TraceRepairer(filler, settings=RepairSettings(confidence=0.0))
    lost_cases = [_remove_connecting(Trace(_foreign(t)), rng) for t in rng.sample(real, 4)]
    named = []
    for t in rng.sample(real, 4):
        spans = _foreign(t)
        target = rng.choice([s for s in spans if s.parent_id is not None])
        masked = (replace(target, name="") if len(named) % 2 else
                  replace(target, service="unknown_service", resource=Resource({"service.name": "unknown_service"})))
        named.append(([masked if s.span_id == target.span_id else s for s in spans], target))
    results = rep.repair([(wire.from_spans(spans), Released()) for spans, _ in lost_cases + named])
    for (spans, lost), r in zip(lost_cases, results[:4]):
        out = _by_id(r)
        assert not any(s.attributes.get(MARK_SYNTHETIC) for s in out.values())
        for k in (s for s in spans if s.parent_id == lost.span_id):
            got = out[k.span_id]
            assert got.attributes[MARK_METHOD] == "rule" and got.parent_id != lost.span_id
            assert "not in the model's catalog" in got.attributes[MARK_DETAIL]
    for (spans, target), r in zip(named, results[4:]):
        got = _by_id(r)[target.span_id]
        assert got.attributes[MARK_METHOD] == "none", got.attributes
        detail = got.attributes[MARK_DETAIL]
        assert "left as is" in detail and "not in the model's catalog" in detail
        assert (got.service, got.name) == next((s.service, s.name) for s in spans if s.span_id == target.span_id)
    # the same traces in the system it knows are repaired by the model
    [r] = rep.repair([(wire.from_spans(_remove_connecting(rng.choice(real), rng)[0]), Released())])
    assert any(s.attributes.get(MARK_SYNTHETIC) for s in _by_id(r).values())


def test_catalog_knows_calls_by_operation():
    cat = Catalog.from_traces([Trace(_tree())])
    assert cat.op_callees("a", "GET /") == {("b", "call"), ("d", "work")}
    assert cat.op_callers("c", "query") == {("b", "call")}
    again = Catalog.from_dict(cat.to_dict())
    assert again.op_edges == cat.op_edges


def test_a_span_with_an_unset_start_is_not_shifted_into_negative_time():
    spans = _tree()
    child = replace(spans[1], start_ns=20 * MS, end_ns=110 * MS)  # b ends after a, on another host: skew
    grandchild = replace(spans[2], start_ns=0, resource=child.resource)  # an unset start, on b's host
    [r] = TraceRepairer(None, None).repair([(wire.from_spans([spans[0], child, grandchild, spans[3]]), Released())])
    out = _by_id(r)
    assert out["0000000000000002"].start_ns == 5 * MS  # b is centred in a, as Jaeger does
    assert out["0000000000000003"].start_ns == 0  # its grandchild cannot move 15 ms before 0: left as it came
    assert len(out) == 4


def test_the_buffer_releases_a_trace_once_even_when_a_bound_split_it():
    from otel_tracegen.infill.buffer import TraceBuffer

    a, b = trace_spans_of("aa"), trace_spans_of("bb")
    buf = TraceBuffer(wait_s=60, max_traces=1)
    buf.add(wire.from_spans(a[:2]), 0)
    buf.add(wire.from_spans(b), 1)  # over the bound: a leaves early
    buf.add(wire.from_spans(a[2:]), 2)  # a late part of a is held again
    out = {t.trace_id: t for t in buf.due(everything=True)}
    assert len(out) == 2 and len(out["aa" * 16].spans) == 4 and out["aa" * 16].seqs == {0, 2}


def trace_spans_of(prefix: str) -> list[Span]:
    return [replace(s, trace_id=prefix * 16) for s in _tree()]


def test_a_protocol_attribute_every_training_span_had_is_filled_from_the_catalog():
    training = [replace(s, attributes={"http.request.method": "GET"} if s.name == "GET /" else {}) for s in _tree()]
    cat = Catalog.from_traces([Trace(training)])
    assert cat.learned_attributes("a", "GET /") == {"http.request.method": "GET"}
    spans = _tree()  # the root lacks it
    found = d.detect(spans, catalog=cat)
    assert [(f.reason, f.key) for f in found.findings] == [(d.MISSING_ATTRIBUTE, "http.request.method")]
    [r] = TraceRepairer(None, cat).repair([(wire.from_spans(spans), Released())])
    root = _by_id(r)["0000000000000001"]
    assert root.attributes["http.request.method"] == "GET" and root.attributes[MARK_METHOD] == "catalog"


# --- the buffer's admission ---------------------------------------------------------------------------------


def _buffer_with(reserved: int, budget: int = 1000):
    from otel_tracegen.infill.buffer import ACCOUNTED_SHARE, TraceBuffer

    buf = TraceBuffer(max_bytes=int(budget / ACCOUNTED_SHARE) + 1)
    assert buf.budget == budget and buf.reserve(reserved)
    return buf


def _in_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def test_a_waiting_reservation_is_not_passed_by_newcomers():
    buf = _buffer_with(900)  # a request on its way through
    t, out = _in_thread(lambda: buf.reserve(600, wait_s=5))  # waits in line for it
    time.sleep(0.1)
    assert not buf.reserve(50)  # would fit, but someone waits first
    buf.unreserve(900)
    t.join()
    assert out == [True] and buf.bytes == 600
    assert buf.reserve(50)  # the line is empty again


def test_more_for_a_request_in_hand_goes_before_the_line():
    buf = _buffer_with(900)
    t, out = _in_thread(lambda: buf.reserve(600, wait_s=5))
    time.sleep(0.1)
    assert buf.reserve(50, more=True)  # a top-up of a request already admitted
    buf.unreserve(950)
    t.join()
    assert out == [True]


def test_no_wait_when_held_spans_are_in_the_way_and_force_counts_over_the_budget():
    from otel_tracegen.infill.buffer import TraceBuffer

    buf = TraceBuffer(max_bytes=40_000, wait_s=60)
    spans = wire.from_spans(trace_spans_of("aa"))
    buf.add(spans, 0)
    held = buf.bytes
    started = time.monotonic()
    assert not buf.reserve(buf.budget - held + 1, wait_s=5)  # held spans wait for their turn, not for a moment
    assert buf.reserve(buf.budget, force=True, wait_s=5)  # repair and forwarding go on regardless
    assert time.monotonic() - started < 1
    assert buf.bytes == held + buf.budget


def test_a_forced_reservation_waits_a_moment_for_copies_on_their_way():
    buf = _buffer_with(900)
    threading.Timer(0.2, buf.unreserve, (900,)).start()
    assert buf.reserve(500, force=True, wait_s=5)
    assert buf.bytes == 500  # it waited for room instead of going over the budget
