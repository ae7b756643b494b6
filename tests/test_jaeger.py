"""Jaeger query API JSON adapter: exact round trips on Jaeger's own fixtures and a hand-written one, the mapping,
bad input, and a hypothesis property (canonical -> Jaeger -> canonical equals what Jaeger carries)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The trace strategy and comparison helper are shared with the Zipkin tests (valid traces from tests/strategies.py
# plus odd ones: orphans, negative durations, spans without resource).
from tests.test_zipkin import any_traces, traces_repr

from otel_tracegen.formats import jaeger, read_traces, write_traces, zipkin
from otel_tracegen.report import ReadReport
from otel_tracegen.trace import (
    SERVICE_NAME,
    STATUS_UNSET,
    Event,
    Link,
    Resource,
    Scope,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Trace,
)

FIXTURES = Path(__file__).resolve().parent / "testdata" / "jaeger"
EXACT_FIXTURES = ["otlp2jaeger-out.json", "checkout.json"]
US = 1000


def load(name: str, report: ReadReport | None = None) -> list[Trace]:
    return jaeger.read([FIXTURES / name], report)


def _jaeger_value(value):
    """An attribute value after Jaeger: lists and maps as their JSON string, None as ""."""
    if isinstance(value, (list, dict)) or value is None:
        return zipkin.attribute_string(value)
    return value


def jaeger_carries(s: Span) -> Span:
    """The projection of a canonical span onto what Jaeger carries (see the jaeger module docstring):
    microsecond times, typed attributes with lists/maps stringified, the resource as process (service + typed
    tags), scope name/version, status, kind, trace state, the sampled flag, events without dropped counts and
    links as references (ids and ref type only)."""
    start, end = s.start_ns // US * US, s.end_ns // US * US
    extras = s.resource.attributes if s.resource is not None else {}
    process_tags = {k: _jaeger_value(v) for k, v in extras.items() if k != SERVICE_NAME}
    resource = Resource({SERVICE_NAME: s.service, **process_tags})
    scope = Scope(s.scope.name, s.scope.version) if s.scope is not None and (s.scope.name or s.scope.version) else None
    return Span(
        s.trace_id, s.span_id, s.parent_id, s.service, s.name, start, end,
        kind=s.kind,
        status=s.status if s.status.code is not StatusCode.UNSET else STATUS_UNSET,
        attributes={k: _jaeger_value(v) for k, v in s.attributes.items()},
        resource=resource,
        scope=scope,
        events=[Event(e.time_ns // US * US, e.name, {k: _jaeger_value(v) for k, v in e.attributes.items()})
                for e in s.events],
        links=[Link(l.trace_id, l.span_id, attributes={jaeger.ATTR_REF_TYPE: "follows_from"}) for l in s.links],
        trace_state=s.trace_state,
        flags=s.flags & 1,
    )


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT_FIXTURES)
def test_fixture_round_trips_exactly(name):
    """Jaeger file -> canonical -> Jaeger reproduces the file: traces, spans (same order), tags with their types and
    order, logs, references, flags and process tags."""
    text = (FIXTURES / name).read_text()
    report = ReadReport()
    traces = jaeger.loads(text, name, report)
    assert report.problems == [] and not report.repaired
    assert json.loads(jaeger.dumps(traces)) == json.loads(text)


def normalise_ui(trace: dict) -> dict:
    """What write does to a Jaeger trace object that read takes in: the API envelope, warnings null, the parent
    reference (first CHILD_OF into the span's own trace) first."""
    trace = copy.deepcopy(trace)
    trace["warnings"] = None
    for span in trace["spans"]:
        span["warnings"] = None
        refs = span["references"]
        same = lambda r: r["traceID"].lstrip("0") == span["traceID"].lstrip("0")
        parent = next((r for r in refs if r["refType"] == "CHILD_OF" and same(r)), None)
        if parent is not None:
            refs.remove(parent)
            refs.insert(0, parent)
    return {"data": [trace], "total": 0, "limit": 0, "offset": 0, "errors": None}


def test_jaeger_ui_fixture_round_trips_up_to_the_documented_normalisation():
    """Jaeger's own domain->UI fixture: one trace object, unpadded ids ("2"), duplicate span ids, every tag type,
    a CHILD_OF reference into another trace, and warnings (which are not carried)."""
    text = (FIXTURES / "ui_01.json").read_text()
    report = ReadReport()
    traces = jaeger.loads(text, "ui_01.json", report)
    assert report.problems == []
    assert json.loads(jaeger.dumps(traces)) == normalise_ui(json.loads(text))


def test_the_three_shapes_read_alike():
    envelope = json.loads((FIXTURES / "checkout.json").read_text())
    bare_list = envelope["data"]
    single = envelope["data"][0]
    a = jaeger.loads(json.dumps(envelope))
    b = jaeger.loads(json.dumps(bare_list))
    c = jaeger.loads(json.dumps(single))
    assert traces_repr(a) == traces_repr(b)
    assert traces_repr(c) == traces_repr(a[:1])


def test_checkout_mapping():
    t1, t2 = load("checkout.json")
    spans = {s.name: s for s in t1}
    root, call, charge, audit, sql = (spans[n] for n in ("GET /checkout", "POST", "charge", "audit", "SELECT orders"))
    assert t1.trace_id == "5b8efff798038103d269b633813fc60c" and t2.trace_id == "a1b2c3d4e5f60718"
    assert t1.root is root and t1.depth == 4
    # process -> resource, typed
    assert root.service == "frontend" and root.resource.attributes == {
        SERVICE_NAME: "frontend", "host.name": "frontend-7d9c6b5f4-x2x7q", "process.pid": 1,
        "telemetry.sdk.language": "java", "telemetry.sdk.name": "opentelemetry", "telemetry.sdk.version": "1.32.0",
    }
    assert root.resource is call.resource  # one Resource per process
    # kind, scope, status and trace state come out of the tags
    assert [s.kind for s in (root, call, charge, audit, sql)] == [
        SpanKind.SERVER, SpanKind.CLIENT, SpanKind.SERVER, SpanKind.INTERNAL, SpanKind.CLIENT]
    assert root.scope == Scope("io.opentelemetry.tomcat-10.0", "1.32.0-alpha")
    assert root.attributes == {"http.method": "GET", "http.route": "/checkout", "http.status_code": 200,
                               "user_agent.original": "curl/8.4.0"}
    assert call.status == Status(StatusCode.ERROR, "Service Unavailable")
    assert charge.status == Status(StatusCode.ERROR, "card declined") and charge.trace_state == "rojo=00f067aa0ba902b7"
    assert charge.attributes == {"payment.amount": 12.5, "payment.captured": False, "request.body": b'{"amount":12.5}'}
    assert audit.status == Status(StatusCode.OK)
    # an OpenTracing-style span: error=true is its status and stays its tag
    assert sql.status == Status(StatusCode.ERROR) and sql.attributes["error"] is True
    # logs -> events, references -> parent + links
    assert call.events == [Event(1700000000165457000, "exception", {
        "exception.type": "java.io.IOException", "exception.message": "Server returned HTTP response code: 503"})]
    assert charge.events[1] == Event(1700000000162457000, "", {"message": "giving up after 3 attempts"})
    assert audit.parent_id == charge.span_id
    assert audit.links == [Link("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7",
                                attributes={"opentracing.ref_type": "follows_from"})]
    assert [s.flags for s in t1] == [1] * 5 and t2.spans[0].flags == 0


# --- mapping -------------------------------------------------------------------------------------------------------


def tag(key, value, type_=None):
    type_ = type_ or {str: "string", bool: "bool", int: "int64", float: "float64"}[type(value)]
    return {"key": key, "type": type_, "value": value}


def jspan(**kw) -> dict:
    base = {"traceID": "00000000000000aa", "spanID": "00000000000000b1", "operationName": "op", "references": [],
            "startTime": 1_000, "duration": 10, "tags": [], "logs": [], "processID": "p1", "warnings": None}
    base.update(kw)
    return base


def doc(*spans: dict, processes: dict | None = None) -> dict:
    trace = {"traceID": spans[0]["traceID"], "spans": list(spans),
             "processes": processes or {"p1": {"serviceName": "svc", "tags": []}}, "warnings": None}
    return {"data": [trace], "total": 0, "limit": 0, "offset": 0, "errors": None}


def round_trip(d: dict, report: ReadReport | None = None) -> tuple[dict, list[Trace]]:
    traces = jaeger.loads(json.dumps(d), "t.json", report)
    return json.loads(jaeger.dumps(traces)), traces


@pytest.mark.parametrize(
    "tags, status, left",
    [
        ([tag("otel.status_code", "ERROR"), tag("error", True), tag("otel.status_description", "x")],
         Status(StatusCode.ERROR, "x"), {}),  # the Collector's form
        ([tag("error", True)], Status(StatusCode.ERROR), {"error": True}),  # OpenTracing: kept as it is
        ([tag("error", "boom"), tag("otel.status_code", "ERROR")], Status(StatusCode.ERROR), {"error": "boom"}),
        ([tag("otel.status_code", "OK")], Status(StatusCode.OK), {}),
        ([tag("otel.status_code", "ok")], Status(StatusCode.OK), {"otel.status_code": "ok"}),  # odd spelling kept
        ([tag("error", False)], STATUS_UNSET, {"error": False}),
    ],
)
def test_status_tags(tags, status, left):
    d = doc(jspan(tags=tags))
    written, [t] = round_trip(d)
    assert t.spans[0].status == status
    assert t.spans[0].attributes == left
    assert sorted(map(json.dumps, written["data"][0]["spans"][0]["tags"])) == sorted(map(json.dumps, tags))


def test_lists_and_maps_become_json_strings():
    """Jaeger has no list or map type: they are written as a string tag holding compact JSON (a documented loss)."""
    attrs = {"l": [1, "a", True], "m": {"b": 2, "a": None}, "n": None, "bytes": b"\x00\xff", "i": 7, "f": 7.0}
    s = Span("00000000000000aa", "00000000000000b1", None, "svc", "op", 0, 1000, attributes=attrs)
    written = json.loads(jaeger.dumps([Trace([s])]))
    assert written["data"][0]["spans"][0]["tags"] == [
        tag("l", '[1,"a",true]'), tag("m", '{"a":null,"b":2}'), tag("n", ""), tag("bytes", "AP8=", "binary"),
        tag("i", 7), tag("f", 7.0),
    ]
    [back] = jaeger.loads(jaeger.dumps([Trace([s])]))
    assert back.spans[0].attributes == {"l": '[1,"a",true]', "m": '{"a":null,"b":2}', "n": "", "bytes": b"\x00\xff",
                                        "i": 7, "f": 7.0}
    assert type(back.spans[0].attributes["f"]) is float


def test_times_are_truncated_to_microseconds_start_and_end_each():
    """Truncating start and end (not the duration) keeps a child that ends with its parent inside it."""
    parent = Span("00000000000000aa", "00000000000000b1", None, "svc", "op", 1_999_999, 3_000_998,
                  events=[Event(2_500_999, "e")])
    child = Span("00000000000000aa", "00000000000000b2", "00000000000000b1", "svc", "op", 2_000_000, 3_000_998)
    out = json.loads(jaeger.dumps([Trace([parent, child])]))["data"][0]["spans"]
    assert (out[0]["startTime"], out[0]["duration"], out[0]["logs"][0]["timestamp"]) == (1_999, 1_001, 2_500)
    [back] = jaeger.loads(jaeger.dumps([Trace([parent, child])]))
    assert [(s.start_ns, s.end_ns) for s in back] == [(1_999_000, 3_000_000), (2_000_000, 3_000_000)]


def test_one_process_per_distinct_resource():
    r1 = lambda: Resource({SERVICE_NAME: "a", "host.name": "h1"})
    spans = [
        Span("00000000000000aa", "0000000000000001", None, "a", "x", 0, 1, resource=r1()),
        Span("00000000000000aa", "0000000000000002", None, "b", "x", 0, 1),
        Span("00000000000000aa", "0000000000000003", None, "a", "x", 0, 1, resource=r1()),  # equal, another object
        Span("00000000000000aa", "0000000000000004", None, "a", "x", 0, 1, resource=Resource({SERVICE_NAME: "a"})),
    ]
    out = json.loads(jaeger.dumps([Trace(spans)]))["data"][0]
    assert [s["processID"] for s in out["spans"]] == ["p1", "p2", "p1", "p3"]
    assert out["processes"] == {
        "p1": {"serviceName": "a", "tags": [tag("host.name", "h1")]},
        "p2": {"serviceName": "b", "tags": []},
        "p3": {"serviceName": "a", "tags": []},
    }


def test_identical_processes_are_merged_on_write():
    procs = {"p1": {"serviceName": "svc", "tags": []}, "p2": {"serviceName": "svc", "tags": []}}
    d = doc(jspan(), jspan(spanID="00000000000000b2", processID="p2"), processes=procs)
    written, _ = round_trip(d)
    assert written["data"][0]["processes"] == {"p1": procs["p1"]}
    assert [s["processID"] for s in written["data"][0]["spans"]] == ["p1", "p1"]


def test_flags():
    report = ReadReport()
    d = doc(jspan(flags=3), jspan(spanID="00000000000000b2", flags=1))
    written, [t] = round_trip(d, report)
    assert [s.flags for s in t] == [1, 1]
    assert report.repaired[jaeger.REPAIR_FLAGS] == 1  # the debug bit has no canonical place
    assert [s["flags"] for s in written["data"][0]["spans"]] == [1, 1]
    otlp = Span("00000000000000aa", "00000000000000b1", None, "svc", "op", 0, 1000, flags=0x301)
    assert json.loads(jaeger.dumps([Trace([otlp])]))["data"][0]["spans"][0]["flags"] == 1


def test_references_parent_first_and_links():
    refs = [
        {"refType": "FOLLOWS_FROM", "traceID": "00000000000000cc", "spanID": "00000000000000c1"},
        {"refType": "CHILD_OF", "traceID": "00000000000000aa", "spanID": "00000000000000a1"},
        {"refType": "CHILD_OF", "traceID": "00000000000000aa", "spanID": "00000000000000a2"},
    ]
    written, [t] = round_trip(doc(jspan(references=refs)))
    s = t.spans[0]
    assert s.parent_id == "00000000000000a1"
    assert s.links == [
        Link("00000000000000cc", "00000000000000c1", attributes={"opentracing.ref_type": "follows_from"}),
        Link("00000000000000aa", "00000000000000a2", attributes={"opentracing.ref_type": "child_of"}),
    ]
    assert written["data"][0]["spans"][0]["references"] == [refs[1], refs[0], refs[2]]


def test_event_field_and_log_order():
    logs = [{"timestamp": 1_001, "fields": [tag("level", "info"), tag("event", "started")]},
            {"timestamp": 1_002, "fields": [tag("event", 5)]}]  # a non-string "event" is just a field
    written, [t] = round_trip(doc(jspan(logs=logs)))
    assert t.spans[0].events == [Event(1_001_000, "started", {"level": "info"}), Event(1_002_000, "", {"event": 5})]
    assert written["data"][0]["spans"][0]["logs"] == [
        {"timestamp": 1_001, "fields": [tag("event", "started"), tag("level", "info")]},  # the name goes first
        logs[1],
    ]


def test_non_hex_ids_are_hashed_consistently_on_write():
    spans = [Span("T_1", "0.1", None, "a", "root", 0, 10_000), Span("T_1", "0.1.1", "0.1", "b", "child", 1_000, 2_000)]
    [out] = jaeger.loads(jaeger.dumps([Trace(spans)]))
    assert len(out.trace_id) == 32 and out.depth == 2


def test_registry_write_and_read(tmp_path):
    traces = load("checkout.json")
    write_traces("jaeger", traces, tmp_path / "out.json.gz")
    assert traces_repr(read_traces("jaeger", [tmp_path / "out.json.gz"])) == traces_repr(traces)


def test_zipkin_files_through_jaeger():
    """Zipkin -> Jaeger -> Zipkin for the bundled Zipkin files (the lens set is covered in test_zipkin)."""
    for path in sorted((FIXTURES.parent / "zipkin").glob("*.json")):
        text = path.read_text()
        assert json.loads(zipkin.dumps(jaeger.loads(jaeger.dumps(zipkin.loads(text))))) == json.loads(text)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_records_are_reported_and_the_rest_kept():
    spans = [
        jspan(),
        "not a span",
        jspan(spanID="xyz"),
        jspan(spanID="00000000000000b3", startTime="yesterday"),
        jspan(spanID="00000000000000b4", tags=[tag("ok", 1), {"key": "bad", "type": "int64", "value": "x"},
                                                 {"key": "t", "type": "weird", "value": 1}]),
        jspan(spanID="00000000000000b5", logs=[{"fields": []}], references=[{"refType": "SIBLING_OF"}]),
        jspan(spanID="00000000000000b6", processID="p9"),
    ]
    report = ReadReport()
    [t] = jaeger.loads(json.dumps(doc(*spans)), "bad.json", report)
    assert [s.span_id for s in t] == ["00000000000000b1", "00000000000000b4", "00000000000000b5", "00000000000000b6"]
    assert [(p.where, p.reason) for p in report.problems] == [
        ("bad.json: data[0].spans[1]", jaeger.MALFORMED_SPAN),
        ("bad.json: data[0].spans[2]", jaeger.BAD_SPAN_ID),
        ("bad.json: data[0].spans[3]", jaeger.BAD_TIME),
        ("bad.json: data[0].spans[4].tags[1]", jaeger.BAD_TAG),
        ("bad.json: data[0].spans[4].tags[2]", jaeger.BAD_TAG),
        ("bad.json: data[0].spans[5].references[0]", jaeger.BAD_REFERENCE),
        ("bad.json: data[0].spans[5].logs[0]", jaeger.BAD_LOG),
    ]
    assert report.total_dropped == 3  # spans; a bad tag, log or reference only loses itself
    assert t.spans[1].attributes == {"ok": 1}
    assert t.spans[3].service == "" and report.repaired[jaeger.REPAIR_UNKNOWN_PROCESS] == 1


def test_where_in_a_bare_list_and_a_single_trace():
    trace = doc(jspan(), "x")["data"][0]
    for data, where in ([trace], "l.json: [0].spans[1]"), (trace, "l.json: spans[1]"):
        report = ReadReport()
        jaeger.loads(json.dumps(data), "l.json", report)
        assert [p.where for p in report.problems] == [where]


def test_invalid_json_is_one_problem_with_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [\n  {"traceID": "1",, "spans": []}\n]}')
    report = ReadReport()
    assert jaeger.read([path], report) == []
    [problem] = report.problems
    assert problem.where == str(path) and problem.reason == jaeger.BAD_JSON
    assert problem.detail.startswith("line 2 column 19")


def test_not_jaeger_and_api_errors():
    report = ReadReport()
    assert jaeger.loads('"hello"', "s.json", report) == []
    assert jaeger.loads('{"data": null, "errors": [{"code": 404, "msg": "trace not found"}]}', "e.json", report) == []
    assert [(p.where, p.reason) for p in report.problems] == [
        ("s.json", jaeger.NOT_JAEGER),
        ("e.json", jaeger.API_ERRORS),
    ]


# --- property: canonical -> Jaeger -> canonical equals the projection ------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_traces, max_size=2, unique_by=lambda t: t.trace_id))
def test_property_canonical_jaeger_canonical_keeps_what_jaeger_carries(traces):
    expected = [Trace([jaeger_carries(s) for s in t], t.trace_id) for t in traces]
    originals = copy.deepcopy(traces_repr(traces))
    back = jaeger.loads(jaeger.dumps(traces))
    assert traces_repr(back) == traces_repr(expected)
    assert [[s.span_id for s in t] for t in back] == [[s.span_id for s in t] for t in traces]  # order kept
    assert traces_repr(traces) == originals  # writing does not touch its input
    text = jaeger.dumps(back)
    assert jaeger.dumps(jaeger.loads(text)) == text  # what was written reads and writes back identically
