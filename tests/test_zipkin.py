"""Zipkin v2 JSON adapter: exact round trips on real files, the shared-span-id rule, the mapping, bad input, and a
hypothesis property (canonical -> Zipkin -> canonical equals what Zipkin carries)."""

from __future__ import annotations

import base64
import copy
import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.strategies import exact_spans
from tests.strategies import traces as rich_traces

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

HERE = Path(__file__).resolve().parent
BUNDLED = HERE / "testdata" / "zipkin"
LENS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "zipkin-lens-testdata"
LENS_FILES = sorted(LENS.glob("*.json")) if LENS.is_dir() else []
US = 1000


def needs_lens():
    if not LENS_FILES:
        pytest.skip("../shared/datasets/zipkin-lens-testdata not present")


# --- comparison helpers --------------------------------------------------------------------------------------------


def traces_repr(traces: list[Trace]) -> list:
    """Traces, in order, each as its type-exact spans (tests/strategies.exact_spans) for readable diffs."""
    return [(t.trace_id, exact_spans(t.spans)) for t in traces]


def _plain_json(value):
    """What an attribute value is after a JSON round trip (events and links carry attributes as JSON, written
    with sorted keys as Go's json.Marshal does): bytes become base64 strings, maps come back key-sorted."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_json(value[k]) for k in sorted(value)}
    return value


def zipkin_carries(s: Span) -> Span:
    """The projection of a canonical span onto what Zipkin v2 carries (see the zipkin module docstring):
    microsecond times, every attribute (resource ones too) as a string tag (tags come back in key order),
    status/kind/scope/trace state, events and links with JSON attributes; no flags, dropped counts, resource
    details or scope attributes. An all-zero parent id is Zipkin's "no parent"."""
    start, end = s.start_ns // US * US, s.end_ns // US * US
    tags = {}
    if s.resource is not None:
        tags.update((k, zipkin.attribute_string(v)) for k, v in s.resource.attributes.items() if k != SERVICE_NAME)
    tags.update((k, zipkin.attribute_string(v)) for k, v in s.attributes.items())
    scope = Scope(s.scope.name, s.scope.version) if s.scope is not None and (s.scope.name or s.scope.version) else None
    return Span(
        s.trace_id, s.span_id, None if s.parent_id == "0" * 16 else s.parent_id, s.service, s.name, start, end,
        kind=s.kind,
        status=s.status if s.status.code is not StatusCode.UNSET else STATUS_UNSET,
        attributes=dict(sorted(tags.items())),
        resource=Resource({SERVICE_NAME: s.service}) if s.service else None,
        scope=scope,
        events=[
            Event(e.time_ns // US * US, e.name, _plain_json(e.attributes), e.dropped_attributes_count) for e in s.events
        ],
        links=[
            Link(l.trace_id, l.span_id, l.trace_state, _plain_json(l.attributes), l.dropped_attributes_count)
            for l in s.links
        ],
        trace_state=s.trace_state,
    )


def normalise(spans: list[dict]) -> list[dict]:
    """A Zipkin span list with the empty fields Zipkin's encoder (and ours) leaves out removed."""
    empty = ({}, [], "", False, 0, None)
    out = []
    for span in spans:
        clean = {}
        for k, v in span.items():
            if k in ("localEndpoint", "remoteEndpoint") and isinstance(v, dict):
                v = {a: b for a, b in v.items() if b not in empty}
            if not (isinstance(v, (dict, list, str, bool, int, type(None))) and v in empty):
                clean[k] = v
        out.append(clean)
    return out


def round_trip(text: str, source: str = "<string>") -> tuple[list, list[Trace], ReadReport]:
    report = ReadReport()
    traces = zipkin.loads(text, source, report)
    return json.loads(zipkin.dumps(traces)), traces, report


# --- real files ----------------------------------------------------------------------------------------------------


def _check_exact_round_trip(path: Path):
    original = json.loads(path.read_text())
    written, traces, report = round_trip(path.read_text(), str(path))
    assert report.problems == []
    assert sum(len(t) for t in traces) == len(original)
    for t in traces:  # canonical ids are unique in a trace even where Zipkin shares them
        assert len({s.span_id for s in t}) == len(t)
    assert written == normalise(original)  # same spans in the same order, every field and tag identical


@pytest.mark.parametrize("path", sorted(BUNDLED.glob("*.json")), ids=lambda p: p.name)
def test_bundled_files_round_trip_exactly(path):
    _check_exact_round_trip(path)


@pytest.mark.parametrize("name", [p.name for p in LENS_FILES] or ["(absent)"])
def test_lens_files_round_trip_exactly(name):
    """Every zipkin-lens file reads without problems and Zipkin -> canonical -> Zipkin gives back the same JSON."""
    needs_lens()
    _check_exact_round_trip(LENS / name)


def test_lens_files_need_no_normalisation():
    """The lens files carry no empty fields, so even the raw JSON is reproduced as it was."""
    needs_lens()
    for path in LENS_FILES:
        written, _, _ = round_trip(path.read_text())
        assert written == json.loads(path.read_text()), path.name


@pytest.mark.parametrize("name", [p.name for p in LENS_FILES] or ["(absent)"])
def test_lens_files_survive_zipkin_jaeger_zipkin(name):
    """Zipkin -> canonical -> Jaeger -> canonical -> Zipkin keeps everything both formats carry: here, all of it
    (Jaeger carries the typed marker attributes, ports as int64, status tags and annotations as logs)."""
    needs_lens()
    text = (LENS / name).read_text()
    direct = zipkin.loads(text)
    via_jaeger = jaeger.loads(jaeger.dumps(direct))
    assert json.loads(zipkin.dumps(via_jaeger)) == json.loads(text)
    # and the canonical traces agree, up to Jaeger always having a process (a resource) for a span
    for t in direct:
        for s in t:
            s.resource = s.resource_or_default()
    assert traces_repr(via_jaeger) == traces_repr(direct)


def test_messaging2_has_the_six_orphans_named_in_source_md():
    [trace] = zipkin.read([BUNDLED / "messaging2.json"])
    orphans = trace.orphans()
    assert len(orphans) == 6
    assert sorted(s.parent_id for s in orphans) == ["0153a596db406111"] * 2 + ["0153a596db406c83"] * 4
    assert trace.root is not None and trace.root.span_id == "0d1a94ebc9256244"


def test_lens_traces_have_one_root_and_unique_ids():
    needs_lens()
    for path in LENS_FILES:
        [trace] = zipkin.read([path])
        assert len(trace.roots) == 1, path.name
        assert len(trace.by_id) == len(trace), path.name


# --- shared span ids -----------------------------------------------------------------------------------------------


def test_shared_server_half_gets_derived_id_under_its_client_half():
    [trace] = zipkin.read([BUNDLED / "yelp.json"])
    client = next(s for s in trace if s.span_id == "7a778764a0d0b594")
    server = next(s for s in trace if s.attributes.get(zipkin.ATTR_ZIPKIN_ID) == "7a778764a0d0b594")
    assert client.kind is SpanKind.CLIENT and client.service == "mobile_api"
    assert server.kind is SpanKind.SERVER and server.service == "spectre"
    assert server.span_id != client.span_id and len(server.span_id) == 16
    assert server.parent_id == client.span_id  # the RPC: server half under client half
    assert server.attributes[zipkin.ATTR_SHARED] is True
    assert server.attributes[zipkin.ATTR_ZIPKIN_PARENT_ID] == "f5f268651b2a2b34"  # Zipkin's parentId, restored on write
    # derived ids are deterministic
    [again] = zipkin.read([BUNDLED / "yelp.json"])
    assert [s.span_id for s in again] == [s.span_id for s in trace]


def test_children_of_a_shared_id_hang_under_the_server_half():
    [trace] = zipkin.read([BUNDLED / "yelp.json"])
    server = next(s for s in trace if s.attributes.get(zipkin.ATTR_ZIPKIN_ID) == "f5f268651b2a2b34")
    assert server.service == "mobile_api"
    kids = trace.children(server)
    assert {k.service for k in kids} == {"mobile_api"} and len(kids) == 4
    assert trace.depth == 5  # routing -> yelp-main client -> mobile_api server -> client -> spectre server


def test_client_and_server_halves_in_different_files(tmp_path):
    """Ids are made unique after grouping by trace, so the halves of one RPC may come from different files."""
    spans = json.loads((BUNDLED / "yelp.json").read_text())
    servers = [s for s in spans if s.get("shared")]
    others = [s for s in spans if not s.get("shared")]
    (tmp_path / "a.json").write_text(json.dumps(others))
    with gzip.open(tmp_path / "b.json.gz", "wt") as fh:
        json.dump(servers, fh)
    report = ReadReport()
    [trace] = zipkin.read([tmp_path / "a.json", tmp_path / "b.json.gz"], report)
    [whole] = zipkin.read([BUNDLED / "yelp.json"])
    assert report.problems == [] and report.counts["files read"] == 2
    assert len(trace.by_id) == len(trace) == 16
    assert trace.depth == whole.depth
    assert normalise(json.loads(zipkin.dumps([trace]))) == others + servers


def test_repeated_shared_ids_and_fragments_round_trip():
    """One client, two consumer-side server halves (different instances), a kind-less fragment with the same id,
    and children that must find the right instance."""
    tid = "14b60fd9ae504820"
    ep = lambda svc, ip: {"serviceName": svc, "ipv4": ip, "port": 8197}
    spans = [
        {"traceId": tid, "id": "64c75434bbe02f59", "kind": "SERVER", "name": "root", "timestamp": 10, "duration": 100,
         "localEndpoint": ep("bouncer", "10.0.0.1")},
        {"traceId": tid, "parentId": "64c75434bbe02f59", "id": "cbab506b53f336fc", "name": "fragment",
         "localEndpoint": ep("pusher", "10.0.0.3")},
        {"traceId": tid, "parentId": "64c75434bbe02f59", "id": "cbab506b53f336fc", "kind": "SERVER", "name": "recv",
         "timestamp": 30, "duration": 5, "localEndpoint": ep("pusher", "10.0.0.2"), "shared": True},
        {"traceId": tid, "parentId": "64c75434bbe02f59", "id": "cbab506b53f336fc", "kind": "SERVER", "name": "recv",
         "timestamp": 31, "duration": 5, "localEndpoint": ep("pusher", "10.0.0.3"), "shared": True},
        {"traceId": tid, "parentId": "64c75434bbe02f59", "id": "cbab506b53f336fc", "kind": "CLIENT", "name": "send",
         "timestamp": 20, "duration": 50, "localEndpoint": ep("bouncer", "10.0.0.1")},
        {"traceId": tid, "parentId": "cbab506b53f336fc", "id": "00000000000000c1", "name": "work", "timestamp": 32,
         "duration": 1, "localEndpoint": ep("pusher", "10.0.0.3")},
    ]
    written, [trace], report = round_trip(json.dumps(spans))
    assert written == spans
    assert report.repaired[zipkin.REPAIR_SHARED_ID] == 3
    client = next(s for s in trace if s.kind is SpanKind.CLIENT)
    assert client.span_id == "cbab506b53f336fc"  # the client half keeps the id, though it comes last
    halves = [s for s in trace if s.attributes.get(zipkin.ATTR_SHARED)]
    assert [h.parent_id for h in halves] == [client.span_id] * 2
    fragment = next(s for s in trace if s.name == "fragment")
    assert fragment.parent_id == "64c75434bbe02f59"  # not shared: keeps the parent it named
    work = next(s for s in trace if s.name == "work")
    assert work.parent_id == halves[1].span_id  # same service and instance (10.0.0.3)
    assert len(trace.by_id) == len(trace)


# --- mapping -------------------------------------------------------------------------------------------------------


def span(**kw) -> dict:
    base = {"traceId": "0123456789abcdef0123456789abcdef", "id": "0000000000000001", "name": "op", "timestamp": 1_000,
            "duration": 10, "localEndpoint": {"serviceName": "svc"}}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def one(spans: list[dict]) -> tuple[Span, list, ReadReport]:
    written, traces, report = round_trip(json.dumps(spans))
    return traces[0].spans[0], written, report


@pytest.mark.parametrize(
    "tags, status, left",
    [
        ({"error": "401"}, Status(StatusCode.ERROR, "401"), {"error": "401"}),  # Zipkin's own form, kept as is
        ({"error": ""}, Status(StatusCode.ERROR, ""), {"error": ""}),
        ({"error": "true"}, Status(StatusCode.ERROR, ""), {"error": "true"}),  # a bare flag, not a message
        ({"otel.status_code": "ERROR", "error": "boom"}, Status(StatusCode.ERROR, "boom"), {}),  # the OTel spec's form
        ({"otel.status_code": "OK"}, Status(StatusCode.OK), {}),
        ({"otel.status_code": "OK", "otel.status_description": "fine"}, Status(StatusCode.OK, "fine"), {}),
        ({"otel.status_code": "Error", "error": "true"}, Status(StatusCode.ERROR, ""),  # odd spelling: kept too
         {"otel.status_code": "Error", "error": "true"}),
        ({"otel.status_code": "UNSET"}, STATUS_UNSET, {"otel.status_code": "UNSET"}),
    ],
)
def test_status_tags(tags, status, left):
    s, written, _ = one([span(tags=tags)])
    assert s.status == status
    assert s.attributes == left
    assert written[0]["tags"] == tags  # exact round trip whatever the form


def test_status_written_in_the_spec_form():
    for st_, tags in [
        (Status(StatusCode.ERROR, "card declined"), {"otel.status_code": "ERROR", "error": "card declined"}),
        (Status(StatusCode.ERROR, ""), {"otel.status_code": "ERROR", "error": ""}),
        (Status(StatusCode.OK), {"otel.status_code": "OK"}),
        (STATUS_UNSET, None),
    ]:
        s = Span("0123456789abcdef", "0000000000000001", None, "svc", "op", 0, 1000, status=st_)
        [out] = json.loads(zipkin.dumps([Trace([s])]))
        assert out.get("tags") == tags
        assert zipkin.loads(zipkin.dumps([Trace([s])]))[0].spans[0].status == st_


@pytest.mark.parametrize(
    "fields, kind",
    [
        ({"kind": "CLIENT"}, SpanKind.CLIENT),
        ({"kind": "SERVER"}, SpanKind.SERVER),
        ({"kind": "PRODUCER"}, SpanKind.PRODUCER),
        ({"kind": "CONSUMER"}, SpanKind.CONSUMER),
        ({"tags": {"span.kind": "internal"}}, SpanKind.INTERNAL),
        ({}, SpanKind.UNSPECIFIED),
    ],
)
def test_kinds(fields, kind):
    s, written, _ = one([span(**fields)])
    assert s.kind is kind
    assert s.attributes == {}
    assert written == [span(**fields)]


def test_endpoints_become_collector_attributes():
    local = {"serviceName": "frontend", "ipv4": "10.0.0.04", "ipv6": "2001:db8::1", "port": 8080}  # "04": real data
    remote = {"serviceName": "db", "ipv6": "::1", "port": 5432}
    s, written, report = one([span(localEndpoint=local, remoteEndpoint=remote)])
    assert s.service == "frontend" and s.resource == Resource({SERVICE_NAME: "frontend"})
    assert s.attributes == {
        "net.host.ip": "10.0.0.04", "zipkin.local_ipv6": "2001:db8::1", "net.host.port": 8080,
        "peer.service": "db", "net.peer.ip": "::1", "net.peer.port": 5432,
    }
    assert written[0]["localEndpoint"] == local and written[0]["remoteEndpoint"] == remote
    assert not report.repaired


def test_invalid_endpoint_fields_are_dropped_and_counted():
    s, written, report = one([span(localEndpoint={"serviceName": "a", "ipv4": "not-an-ip", "port": 70000})])
    assert s.attributes == {}
    assert written[0]["localEndpoint"] == {"serviceName": "a"}
    assert report.repaired[zipkin.REPAIR_BAD_ENDPOINT] == 2


def test_scope_trace_state_and_debug():
    tags = {"otel.scope.name": "io.opentelemetry.grpc", "otel.scope.version": "1.2", "w3c.tracestate": "k=v"}
    s, written, _ = one([span(tags=tags, debug=True)])
    assert s.scope == Scope("io.opentelemetry.grpc", "1.2") and s.trace_state == "k=v"
    assert s.attributes == {zipkin.ATTR_DEBUG: True}
    assert written == [span(tags=tags, debug=True)]


def test_legacy_library_tags_are_read_as_scope_and_written_as_scope_tags():
    s, written, _ = one([span(tags={"otel.library.name": "lib", "otel.library.version": "0.9"})])
    assert s.scope == Scope("lib", "0.9") and s.attributes == {}
    assert written[0]["tags"] == {"otel.scope.name": "lib", "otel.scope.version": "0.9"}


def test_annotations_are_events():
    annotations = [
        {"timestamp": 1_001, "value": "ws"},
        {"timestamp": 1_002, "value": 'exception|{"exception.message":"x|y","retry":2}|1'},  # the Collector's form
        {"timestamp": 1_003, "value": "a|b|c"},  # looks encoded, is not: the whole value is the name
        {"timestamp": 1_004, "value": 'odd|{"b":1, "a":2}|0'},  # JSON we would not write: kept as the name
    ]
    s, written, _ = one([span(annotations=annotations)])
    assert s.events == [
        Event(1_001_000, "ws"),
        Event(1_002_000, "exception", {"exception.message": "x|y", "retry": 2}, 1),
        Event(1_003_000, "a|b|c"),
        Event(1_004_000, 'odd|{"b":1, "a":2}|0'),
    ]
    assert written[0]["annotations"] == annotations


def test_link_tags_are_links():
    link = '4bf92f3577b34da6a3ce929d0e0e4736|00f067aa0ba902b7|k=v|{"a":true}|0'
    tags = {"otlp.link.0": link, "otlp.link.1": "not a link", "otlp.link.2": link}
    s, written, _ = one([span(tags=tags)])
    assert s.links == [Link("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "k=v", {"a": True})]
    assert s.attributes == {"otlp.link.1": "not a link", "otlp.link.2": link}  # links stop at the first gap
    assert written[0]["tags"] == tags


def test_typed_attributes_become_strings():
    """Zipkin tags are strings: typed canonical attributes are written as the Collector's AsString writes them."""
    attrs = {"s": "x", "t": True, "f": False, "i": -42, "d": 0.5, "e": 1e21, "w": 2.0, "b": b"\x00\x01",
             "n": None, "l": [1, "a", b"\xff"], "m": {"z": 1, "a": [True]}}
    s = Span("0123456789abcdef", "0000000000000001", None, "svc", "op", 0, 1000, attributes=attrs)
    [out] = json.loads(zipkin.dumps([Trace([s])]))
    assert out["tags"] == {"s": "x", "t": "true", "f": "false", "i": "-42", "d": "0.5", "e": "1000000000000000000000",
                           "w": "2", "b": "AAE=", "n": "", "l": '[1,"a","/w=="]', "m": '{"a":[true],"z":1}'}


def test_times_are_truncated_to_microseconds_start_and_end_each():
    """Truncating start and end (not the duration) keeps a child that ends with its parent inside it."""
    parent = Span("0123456789abcdef", "0000000000000001", None, "svc", "op", 999, 2_000)
    child = Span("0123456789abcdef", "0000000000000002", "0000000000000001", "svc", "op", 1_000, 2_000)
    out = json.loads(zipkin.dumps([Trace([parent, child])]))
    assert [(o["timestamp"], o.get("duration", 0)) for o in out] == [(0, 2), (1, 1)]
    [back] = zipkin.loads(zipkin.dumps([Trace([parent, child])]))
    assert [(s.start_ns, s.end_ns) for s in back] == [(0, 2_000), (1_000, 2_000)]


def test_missing_timestamp_and_duration_keep_the_span():
    spans = [span(timestamp=None, duration=None, id="00000000000000a1"), span(duration=None, id="00000000000000a2")]
    written, [trace], report = round_trip(json.dumps(spans))
    no_ts, no_dur = trace.spans
    assert (no_ts.start_ns, no_ts.end_ns) == (0, 0) and no_ts.attributes == {zipkin.ATTR_START_ABSENT: True}
    assert (no_dur.start_ns, no_dur.end_ns) == (1_000_000, 1_000_000) and no_dur.attributes == {}
    assert report.repaired[zipkin.REPAIR_NO_TIMESTAMP] == 1 and report.repaired[zipkin.REPAIR_NO_DURATION] == 2
    assert report.problems == []
    assert written == spans  # the timestamp stays absent on write


def test_non_hex_ids_are_hashed_consistently_on_write():
    """Ids from formats without hex ids (Alibaba's rpc ids) map through hex_id, so parent links survive."""
    spans = [Span("T_1", "0.1", None, "a", "root", 0, 10_000), Span("T_1", "0.1.1", "0.1", "b", "child", 1_000, 2_000)]
    [out] = zipkin.loads(zipkin.dumps([Trace(spans)]))
    assert len(out.trace_id) == 32 and out.depth == 2
    assert all(len(s.span_id) == 16 for s in out)


def test_short_and_upper_case_ids_are_normalised_and_counted():
    s, written, report = one([span(traceId="ABCDEF", id="1")])
    assert (s.trace_id, s.span_id) == ("0000000000abcdef", "0000000000000001")
    assert report.repaired[zipkin.REPAIR_ID_NORMALISED] == 2


def test_registry_write_and_read(tmp_path):
    traces = zipkin.read([BUNDLED / "yelp.json"])
    write_traces("zipkin", traces, tmp_path / "out.json.gz")
    again = read_traces("zipkin", [tmp_path / "out.json.gz"])
    assert traces_repr(again) == traces_repr(traces)


def test_api_v2_traces_shape_list_of_lists():
    spans = json.loads((BUNDLED / "messaging2.json").read_text())
    text = json.dumps([spans[:5], spans[5:]])
    report = ReadReport()
    [trace] = zipkin.loads(text, "api.json", report)
    assert len(trace) == 11 and report.problems == []


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_spans_are_reported_and_the_rest_kept():
    good = span()
    spans = [good, "not a span", span(id="xyz"), span(timestamp="soon", id="0000000000000003"),
             span(traceId=None, id="0000000000000004"), span(tags=["a"], id="0000000000000005"),
             span(id="0000000000000002",
                  annotations=[{"timestamp": "x", "value": "v"}, {"timestamp": 5, "value": "ok"}])]
    report = ReadReport()
    [trace] = zipkin.loads(json.dumps(spans), "bad.json", report)
    assert [s.span_id for s in trace] == ["0000000000000001", "0000000000000002"]
    assert [(p.where, p.reason) for p in report.problems] == [
        ("bad.json: [1]", zipkin.MALFORMED_SPAN),
        ("bad.json: [2]", zipkin.BAD_SPAN_ID),
        ("bad.json: [3]", zipkin.BAD_TIME),
        ("bad.json: [4]", zipkin.BAD_TRACE_ID),
        ("bad.json: [5]", zipkin.MALFORMED_SPAN),
        ("bad.json: [6].annotations[0]", zipkin.BAD_ANNOTATION),
    ]
    assert report.total_dropped == 5  # spans; the bad annotation only loses itself
    assert trace.spans[1].events == [Event(5_000, "ok")]


def test_invalid_json_is_one_problem_with_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"traceId": "0123456789abcdef",\n   oops}\n]')
    report = ReadReport()
    assert zipkin.read([path], report) == []
    [problem] = report.problems
    assert problem.where == str(path) and problem.reason == zipkin.BAD_JSON
    assert problem.detail.startswith("line 3 column 4")


def test_not_a_list_is_one_problem():
    report = ReadReport()
    assert zipkin.loads('{"traceId": "x"}', "obj.json", report) == []
    assert [(p.where, p.reason) for p in report.problems] == [("obj.json", zipkin.NOT_A_SPAN_LIST)]


# --- property: canonical -> Zipkin -> canonical equals the projection ------------------------------------------------

HEX = "0123456789abcdef"


def hex_ids(n: int):
    return st.text(alphabet=HEX, min_size=n, max_size=n)


def _reserved(key: str) -> bool:
    return zipkin.is_reserved(key) or key in jaeger.RESERVED_ATTRIBUTES


keys = st.text(max_size=10).filter(lambda k: not _reserved(k))
scalars = st.one_of(
    st.none(), st.text(max_size=8), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False), st.binary(max_size=6),
)
values = st.recursive(
    scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c, max_size=3)),
    max_leaves=3,
)
attributes = st.dictionaries(keys, values, max_size=4)
# "event" (the Jaeger log field holding the name) and opentracing.ref_type (the Jaeger ref type) are the
# adapters' vocabulary inside events and links; generated ones leave them out.
event_attributes = st.dictionaries(keys.filter(lambda k: k != jaeger.EVENT_FIELD), values, max_size=3)
link_attributes = st.dictionaries(keys.filter(lambda k: k != jaeger.ATTR_REF_TYPE), values, max_size=3)


@st.composite
def canonical_traces(draw) -> Trace:
    """A canonical trace with every field drawn, unique span ids, and the odd cases valid trees lack: orphan and
    self parents, end before start, spans without resource or service, messages on UNSET statuses."""
    trace_id = draw(hex_ids(32))
    ids = draw(st.lists(hex_ids(16), min_size=1, max_size=5, unique=True))
    spans = []
    for i, span_id in enumerate(ids):
        service = draw(st.text(max_size=8))
        start = draw(st.integers(0, 2**62))
        spans.append(Span(
            trace_id, span_id,
            parent_id=draw(st.one_of(st.none(), st.sampled_from(ids[: i + 1]), hex_ids(16))),
            service=service,
            name=draw(st.text(max_size=8)),
            start_ns=start,
            end_ns=start + draw(st.integers(-10**6, 10**13)),
            kind=draw(st.sampled_from(SpanKind)),
            status=Status(draw(st.sampled_from(StatusCode)), draw(st.text(max_size=6))),
            attributes=draw(attributes),
            resource=draw(st.one_of(st.none(), st.builds(
                lambda extra, dropped, url: Resource({SERVICE_NAME: service, **extra}, dropped, url),
                st.dictionaries(keys.filter(lambda k: k != SERVICE_NAME), values, max_size=3),
                st.integers(0, 3), st.text(max_size=4)))),
            scope=draw(st.one_of(st.none(), st.builds(Scope, st.text(max_size=6), st.text(max_size=6), attributes,
                                                      st.integers(0, 3), st.text(max_size=4)))),
            events=draw(st.lists(st.builds(Event, st.integers(0, 2**62), st.text(max_size=8), event_attributes,
                                           st.integers(0, 3)), max_size=3)),
            links=draw(st.lists(st.builds(Link, hex_ids(32), hex_ids(16), st.text(max_size=6), link_attributes,
                                          st.integers(0, 3), st.integers(0, 255)), max_size=2)),
            trace_state=draw(st.text(max_size=10)),
            flags=draw(st.integers(0, 0x3FF)),
            dropped_attributes_count=draw(st.integers(0, 3)),
            dropped_events_count=draw(st.integers(0, 3)),
            dropped_links_count=draw(st.integers(0, 3)),
        ))
    return Trace(spans, trace_id)


def without_reserved(trace: Trace) -> Trace:
    """The trace with the adapters' own attribute keys taken out (their behaviour has explicit tests above)."""
    def clean(attrs: dict, also: str = "") -> dict:
        return {k: v for k, v in attrs.items() if not _reserved(k) and k != also}

    for s in trace:
        s.attributes = clean(s.attributes)
        if s.resource is not None:
            r = s.resource
            s.resource = Resource(clean(r.attributes), r.dropped_attributes_count, r.schema_url)
        s.events = [Event(e.time_ns, e.name, clean(e.attributes, jaeger.EVENT_FIELD), e.dropped_attributes_count)
                    for e in s.events]
        s.links = [Link(l.trace_id, l.span_id, l.trace_state, clean(l.attributes, jaeger.ATTR_REF_TYPE),
                        l.dropped_attributes_count, l.flags) for l in s.links]
    return trace


# Valid, realistic traces from tests/strategies.py, and odd ones from here (orphans, negative or zero durations,
# spans without resource or service, status messages on UNSET).
any_traces = st.one_of(rich_traces().map(without_reserved), canonical_traces())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_traces, max_size=2, unique_by=lambda t: t.trace_id))
def test_property_canonical_zipkin_canonical_keeps_what_zipkin_carries(traces):
    expected = [Trace([zipkin_carries(s) for s in t], t.trace_id) for t in traces]
    originals = copy.deepcopy(traces_repr(traces))
    back = zipkin.loads(zipkin.dumps(traces))
    assert traces_repr(back) == traces_repr(expected)
    assert [[s.span_id for s in t] for t in back] == [[s.span_id for s in t] for t in traces]  # order kept
    assert traces_repr(traces) == originals  # writing does not touch its input
    # and the file form is a fixed point: reading and writing what was written gives the same text
    text = zipkin.dumps(back)
    assert zipkin.dumps(zipkin.loads(text)) == text
