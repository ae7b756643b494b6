"""OTLP JSON and OTLP protobuf adapters: real SDK spans, property round trips, the Collector file format, bad input."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link as SdkLink
from opentelemetry.trace import SpanKind as SdkSpanKind
from opentelemetry.trace import Status as SdkStatus
from opentelemetry.trace import StatusCode as SdkStatusCode

from otel_tracegen.formats import otlp_json, otlp_proto, read_traces
from otel_tracegen.report import ReadReport, UserError
from otel_tracegen.trace import STATUS_UNSET, Link, Resource, Scope, Span, SpanKind, StatusCode, Trace, iter_spans

from tests.strategies import exact_spans, traces

TESTDATA = Path(__file__).parent / "testdata" / "otlp"
FIXTURE = TESTDATA / "collector_file_exporter.jsonl"
# A rich trace takes ~1000 draws to generate, so examples are kept few enough for a quick run; set
# HYPOTHESIS_MAX_EXAMPLES to search harder.
_EXAMPLES = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60"))
PROPERTY = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _all_spans(trace_list: list[Trace]) -> list[Span]:
    return list(iter_spans(trace_list))


# --- real OpenTelemetry SDK spans -------------------------------------------------------------------------------

EVERY_TYPE = {
    "str": "value",
    "bool": True,
    "int": -42,
    "big": 2**63 - 1,
    "float": 3.25,
    "bytes": b"\x00\xffbin",
    "strs": ["a", "b", ""],
    "bools": [True, False],
    "ints": [1, 2, 3],
    "floats": [0.5, -1.5],
}


def _sdk_spans():
    """Two services (providers, so two resources), two scopes with versions and attributes, two traces of
    nested spans with events, links, an error status and attributes of every type the SDK accepts."""
    exporter = InMemorySpanExporter()
    providers = []
    for service, extra in (
        ("frontend", {"k8s.pod.name": "frontend-1", "replicas": [1, 2]}),
        ("cartservice", {"host.name": "cart-0"}),
    ):
        provider = TracerProvider(resource=SdkResource.create({"service.name": service, **extra}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
    http = providers[0].get_tracer(
        "opentelemetry.instrumentation.flask",
        "0.46b0",
        schema_url="https://opentelemetry.io/schemas/1.21.0",
        attributes={"scope.flag": True, "scope.n": 7},
    )
    grpc = providers[0].get_tracer("opentelemetry.instrumentation.grpc", "0.46b0")
    cart = providers[1].get_tracer("cart.manual", "1.0.0", attributes={"team": "cart"})

    with http.start_as_current_span("GET /cart", kind=SdkSpanKind.SERVER, attributes=EVERY_TYPE) as root:
        root.add_event("request.received", {"size": 512, "ok": True, "tags": ["x", "y"]})
        with grpc.start_as_current_span("CartService/GetCart", kind=SdkSpanKind.CLIENT) as client:
            client.set_attribute("rpc.system", "grpc")
            with cart.start_as_current_span(
                "GetCart", kind=SdkSpanKind.SERVER, links=[SdkLink(root.get_span_context(), {"why": "fan-in"})]
            ) as server:
                with cart.start_as_current_span(
                    "HGET", kind=SdkSpanKind.CLIENT, attributes={"db.system": "redis"}
                ) as db:
                    db.add_event("exception", {"exception.type": "TimeoutError", "exception.message": "timed out"})
                    db.set_status(SdkStatus(SdkStatusCode.ERROR, "redis timed out"))
                server.set_status(SdkStatus(SdkStatusCode.OK))
    first_root = root
    with cart.start_as_current_span(
        "refresh", kind=SdkSpanKind.INTERNAL, links=[SdkLink(first_root.get_span_context())]
    ):
        with cart.start_as_current_span("publish", kind=SdkSpanKind.PRODUCER):
            pass
    spans = exporter.get_finished_spans()
    assert len(spans) == 6
    return spans


def _normalized(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """The request with resources, scopes and spans in a fixed order, so requests that group the same spans
    in a different order compare equal (our writer groups per trace; the SDK in export order)."""
    out = ExportTraceServiceRequest()
    for rs in sorted(request.resource_spans, key=lambda r: r.resource.SerializeToString(deterministic=True)):
        new_rs = out.resource_spans.add()
        new_rs.resource.CopyFrom(rs.resource)
        new_rs.schema_url = rs.schema_url
        for ss in sorted(rs.scope_spans, key=lambda s: (s.scope.SerializeToString(deterministic=True), s.schema_url)):
            new_ss = new_rs.scope_spans.add()
            new_ss.scope.CopyFrom(ss.scope)
            new_ss.schema_url = ss.schema_url
            new_ss.spans.extend(sorted(ss.spans, key=lambda sp: sp.span_id))
    return out


def test_sdk_spans_survive_proto_json_proto(tmp_path):
    """SDK spans -> SDK's OTLP encoder -> our proto reader -> our JSON writer/reader -> our proto writer gives
    back the SDK's request, field for field, and the same canonical spans at every step."""
    sdk_spans = _sdk_spans()
    request = encode_spans(sdk_spans)
    (tmp_path / "sdk.pb").write_bytes(request.SerializeToString())

    report = ReadReport()
    from_proto = otlp_proto.read([tmp_path / "sdk.pb"], report)
    otlp_json.write(from_proto, tmp_path / "sdk.jsonl")
    from_json = otlp_json.read([tmp_path / "sdk.jsonl"], report)
    otlp_proto.write(from_json, tmp_path / "again.pb")
    again = ExportTraceServiceRequest.FromString((tmp_path / "again.pb").read_bytes())

    assert report.problems == [] and not report.dropped and not report.repaired
    assert exact_spans(_all_spans(from_json)) == exact_spans(_all_spans(from_proto))
    assert _normalized(again) == _normalized(request)
    # every span is there once, with its trace: two traces (4 + 2 spans)
    assert sorted(len(t) for t in from_json) == [2, 4]


def test_sdk_spans_read_as_the_sdk_recorded_them():
    """Not only self-consistent: each canonical span says what the SDK span said."""
    sdk_spans = _sdk_spans()
    spans = {s.span_id: s for s in otlp_proto.loads(encode_spans(sdk_spans).SerializeToString())}
    kinds = {
        SdkSpanKind.INTERNAL: SpanKind.INTERNAL,
        SdkSpanKind.SERVER: SpanKind.SERVER,
        SdkSpanKind.CLIENT: SpanKind.CLIENT,
        SdkSpanKind.PRODUCER: SpanKind.PRODUCER,
    }
    for sdk in sdk_spans:
        ctx = sdk.get_span_context()
        span = spans[format(ctx.span_id, "016x")]
        assert span.trace_id == format(ctx.trace_id, "032x")
        assert span.parent_id == (format(sdk.parent.span_id, "016x") if sdk.parent else None)
        assert (span.name, span.start_ns, span.end_ns, span.kind) == (
            sdk.name,
            sdk.start_time,
            sdk.end_time,
            kinds[sdk.kind],
        )
        assert span.status.code == StatusCode(sdk.status.status_code.value)
        assert span.status.message == (sdk.status.description or "")
        assert span.service == sdk.resource.attributes["service.name"]
        assert span.resource.attributes == {
            k: list(v) if isinstance(v, tuple) else v for k, v in sdk.resource.attributes.items()
        }
        assert (span.scope.name, span.scope.version, span.scope.schema_url) == (
            sdk.instrumentation_scope.name,
            sdk.instrumentation_scope.version,
            sdk.instrumentation_scope.schema_url or "",
        )
        assert [(e.name, e.time_ns) for e in span.events] == [(e.name, e.timestamp) for e in sdk.events]
        assert [(ln.trace_id, ln.span_id) for ln in span.links] == [
            (format(ln.context.trace_id, "032x"), format(ln.context.span_id, "016x")) for ln in sdk.links
        ]
    root = next(s for s in spans.values() if s.name == "GET /cart")
    # SDK sequences are tuples; OTLP arrays read back as lists, every element type kept
    assert root.attributes == {**EVERY_TYPE}
    assert {k: type(v) for k, v in root.attributes.items()} == {k: type(v) for k, v in EVERY_TYPE.items()}
    assert root.events[0].attributes == {"size": 512, "ok": True, "tags": ["x", "y"]}
    assert root.scope.attributes == {"scope.flag": True, "scope.n": 7}


def test_proto_writer_matches_the_sdk_encoder_byte_for_byte():
    """Our hand-written wire encoder emits exactly what the SDK's encoder (via upb) does for the same spans."""
    request = encode_spans(_sdk_spans())
    data = request.SerializeToString()
    assert otlp_proto.dumps(otlp_proto.loads(data)) == data
    assert otlp_proto.encode_request(otlp_proto.decode_request(request)) == request


# --- property tests over generated canonical traces ------------------------------------------------------------


@PROPERTY
@given(trace=traces())
def test_json_round_trip_is_exact(trace):
    report = ReadReport()
    text = otlp_json.dumps(trace.spans)
    back = otlp_json.loads(text, report)
    assert report.problems == [] and not report.repaired
    assert exact_spans(back) == exact_spans(trace.spans)
    assert otlp_json.dumps(back) == text  # a second trip changes nothing, order included


@PROPERTY
@given(trace=traces())
def test_proto_round_trip_is_exact(trace):
    report = ReadReport()
    data = otlp_proto.dumps(trace.spans)
    back = otlp_proto.loads(data, report)
    assert report.problems == [] and not report.repaired
    assert exact_spans(back) == exact_spans(trace.spans)
    assert otlp_proto.dumps(back) == data


@PROPERTY
@given(trace=traces())
def test_proto_bytes_are_what_upb_serializes(trace):
    """Field order, omitted defaults, varints, two's complement ints: upb re-serializes our bytes unchanged."""
    data = otlp_proto.dumps(trace.spans)
    assert ExportTraceServiceRequest.FromString(data).SerializeToString() == data


@PROPERTY
@given(trace=traces(), snake_case=st.booleans())
def test_protobuf_json_format_output_reads_the_same(trace, snake_case):
    """protobuf's own JSON mapping (base64 ids, enum names, proto field names if asked) is read like OTLP JSON,
    and both readers agree with upb about what the bytes hold."""
    request = ExportTraceServiceRequest.FromString(otlp_proto.dumps(trace.spans))
    doc = json_format.MessageToDict(request, preserving_proto_field_name=snake_case)
    report = ReadReport()
    assert exact_spans(otlp_json.decode_document(json.loads(json.dumps(doc)), report)) == exact_spans(trace.spans)
    assert report.problems == [] and set(report.repaired) <= {"base64 id"}


def _ld(tag: bytes, body: bytes) -> bytes:
    """A length-delimited protobuf field."""
    n, length = len(body), bytearray()
    while n > 0x7F:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    return tag + bytes(length) + bytes((n,)) + body


# Fields upb keeps as unknown: field 100 (varint), and field 5 (name, a string) sent as a varint.
_UNKNOWN = b"\xa0\x06\x2a" + b"\x28\x01"


@PROPERTY
@given(trace=traces(max_spans=3))
def test_proto_reader_follows_protobuf_merge_rules(trace):
    """Bytes no encoder of ours writes but protobuf allows: each span sent as two partial messages (which
    parsers merge: repeated fields concatenate, later scalars win, a message field seen twice merges) with
    unknown fields between them, and the status split across the two. Read as upb reads them."""
    request = ExportTraceServiceRequest.FromString(otlp_proto.dumps(trace.spans))
    out = b""
    for rs in request.resource_spans:
        body = _ld(b"\x0a", rs.resource.SerializeToString())
        for ss in rs.scope_spans:
            ss_body = _ld(b"\x0a", ss.scope.SerializeToString()) if ss.HasField("scope") else b""
            for sp in ss.spans:
                first, second = type(sp)(), type(sp)()
                first.CopyFrom(sp)
                second.CopyFrom(sp)
                half = len(sp.attributes) // 2
                del first.attributes[half:], first.events[:], second.attributes[:half], second.links[:]
                first.status.message, second.status.code = "", 0
                if sp.name:  # an empty name is not sent, so it would not overwrite
                    first.name = "overwritten by the second part"
                second.ClearField("trace_id")
                ss_body += _ld(b"\x12", first.SerializeToString() + _UNKNOWN + second.SerializeToString())
            ss_body += _ld(b"\x1a", ss.schema_url.encode()) if ss.schema_url else b""
            body += _ld(b"\x12", ss_body)
        out += _ld(b"\x0a", body + (_ld(b"\x1a", rs.schema_url.encode()) if rs.schema_url else b""))
    upb_view = ExportTraceServiceRequest.FromString(out)
    assert [len(ss.spans) for rs in upb_view.resource_spans for ss in rs.scope_spans] == [
        len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
    ]
    report = ReadReport()
    assert exact_spans(otlp_proto.loads(out, report)) == exact_spans(otlp_proto.loads(upb_view.SerializeToString()))
    assert exact_spans(otlp_proto.loads(out)) == exact_spans(trace.spans)
    assert report.problems == []


@settings(PROPERTY, max_examples=max(10, _EXAMPLES // 3))
@given(batch=st.lists(traces(max_spans=4), min_size=1, max_size=3, unique_by=lambda t: t.trace_id), gz=st.booleans())
def test_files_round_trip_for_both_formats_and_framings(batch, gz):
    suffix = ".gz" if gz else ""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        otlp_json.write(batch, d / f"t.jsonl{suffix}")
        otlp_json.write(batch, d / f"t.json{suffix}", lines=False)
        otlp_proto.write(batch, d / f"t.pb{suffix}")
        otlp_proto.write(batch, d / f"t.pbs{suffix}", batch_spans=3)
        expected = exact_spans(_all_spans(batch))
        for module, name in (
            (otlp_json, "t.jsonl"),
            (otlp_json, "t.json"),
            (otlp_proto, "t.pb"),
            (otlp_proto, "t.pbs"),
        ):
            report = ReadReport()
            got = module.read([d / f"{name}{suffix}"], report)
            assert report.problems == [], name
            assert exact_spans(_all_spans(got)) == expected, name
            assert sorted(t.trace_id for t in got) == sorted(t.trace_id for t in batch)
        lines = (gzip.open if gz else open)(d / f"t.jsonl{suffix}", "rt").read().splitlines()
        assert len(lines) == len(batch)  # one JSON line per trace


def test_round_trip_keeps_resource_scope_and_span_order():
    """Input grouped normally (as an SDK or Collector sends it) comes back in the same order."""
    resources = [Resource({"service.name": s}, schema_url=u) for s, u in (("a", ""), ("b", "https://x/1"))]
    scopes = [Scope("s1", "1"), None, Scope("s2", attributes={"k": [1, "x"]})]
    spans = []
    n = 0
    for res in resources:
        for scope in scopes:
            for _ in range(3):
                n += 1
                parent = None if n == 1 else f"{1:016x}"
                spans.append(
                    Span(
                        "ab" * 16,
                        f"{n:016x}",
                        parent,
                        res.attributes["service.name"],
                        f"op{n}",
                        n,
                        n + 10,
                        resource=res,
                        scope=scope,
                    )
                )
    for module in (otlp_json, otlp_proto):
        back = module.loads(module.dumps(spans))
        assert [s.span_id for s in back] == [s.span_id for s in spans]
        assert [(s.resource, s.scope) for s in back] == [(s.resource, s.scope) for s in spans]


def test_spans_without_resource_get_their_service_as_resource():
    spans = [Span("1" * 32, "2" * 16, None, "checkout", "root", 1, 2)]
    for module in (otlp_json, otlp_proto):
        (back,) = module.loads(module.dumps(spans))
        assert back.service == "checkout"
        assert back.resource == Resource({"service.name": "checkout"})
        assert back.scope is None


def test_non_hex_ids_are_mapped_consistently():
    """Ids from formats without hex ids (Alibaba rpc ids, short Zipkin ids) become valid OTLP ids, and the
    parent and link mapping follows the span's."""
    spans = [
        Span("T_123", "0.1", None, "a", "root", 1, 10),
        Span("T_123", "0.1.1", "0.1", "b", "child", 2, 9),
        Span("463ac35c9f6413ad", "48485a3953bb6124", "0.1.1", "c", "zipkin", 3, 4),
    ]
    spans[2].links = [Link("T_123", "0.1.1")]
    for module in (otlp_json, otlp_proto):
        root, child, zipkin = sorted(module.loads(module.dumps(spans)), key=lambda s: s.start_ns)
        assert len(root.trace_id) == 32 and root.trace_id == child.trace_id
        assert child.parent_id == root.span_id and zipkin.parent_id == child.span_id
        assert zipkin.trace_id == "0000000000000000463ac35c9f6413ad"  # short hex is padded, as Zipkin does
        assert (zipkin.links[0].trace_id, zipkin.links[0].span_id) == (root.trace_id, child.span_id)


# --- the Collector file exporter fixture ------------------------------------------------------------------------


def test_collector_file_exporter_fixture():
    report = ReadReport()
    got = {t.trace_id: t for t in read_traces("otlp-json", [FIXTURE], report)}
    assert report.problems == [] and not report.dropped
    assert report.counts["spans read"] == 7
    cart = got["5b8efff798038103d269b633813fc60c"]
    checkout = got["0af7651916cd43dd8448eb211c80319c"]

    assert [(s.name, d) for s, d in cart.walk()] == [
        ("GET /api/cart", 1),
        ("oteldemo.CartService/GetCart", 2),
        ("oteldemo.CartService/GetCart", 3),
        ("HGET", 4),
    ]
    assert cart.root.parent_id is None and cart.root.kind == SpanKind.SERVER and cart.root.flags == 256
    assert cart.root.resource.schema_url == "https://opentelemetry.io/schemas/1.24.0"
    assert cart.root.scope.version == "0.49.0"
    assert cart.services == {"frontend", "cartservice"}
    hget = cart.by_id["8b1c7d0e9f3a2b41"]
    assert hget.status.code == StatusCode.ERROR and hget.status.message.startswith("READONLY")
    assert hget.attributes["server.port"] == 6379 and type(hget.attributes["server.port"]) is int
    assert [e.name for e in hget.events] == ["exception"]
    server = cart.by_id["53995c3f42cd8ad8"]
    assert server.attributes["app.cart.total"] == 42.5 and server.attributes["app.cart.cached"] is True
    assert server.events[0].attributes == {"cache.hit": False}

    place = checkout.root
    assert place.status.code == StatusCode.OK
    assert place.attributes["app.order.items"] == ["OLJCESPC7Z", "66VCHSJNUP"]
    assert place.attributes["app.user"] == {"id": "u123", "tier": 2}
    assert place.links[0].span_id == "eee19b7ec3c1b174" and place.links[0].attributes == {"link.reason": "same session"}
    assert [s.kind for s, _ in checkout.walk()] == [SpanKind.SERVER, SpanKind.PRODUCER, SpanKind.CONSUMER]
    assert checkout.by_id["00f067aa0ba902b7"].attributes["messaging.kafka.message.key"] == b"order-123"


def test_collector_fixture_round_trips_through_both_formats(tmp_path):
    original = otlp_json.read([FIXTURE])
    otlp_proto.write(original, tmp_path / "f.pb")
    otlp_json.write(otlp_proto.read([tmp_path / "f.pb"]), tmp_path / "f.jsonl")
    assert exact_spans(_all_spans(otlp_json.read([tmp_path / "f.jsonl"]))) == exact_spans(_all_spans(original))
    # what we write is what the Collector writes, apart from the roots' empty parentSpanId that we leave out
    ours = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    theirs = [json.loads(line.replace('"parentSpanId":"",', "")) for line in FIXTURE.read_text().splitlines()]
    assert ours == theirs


# --- lenient reading ---------------------------------------------------------------------------------------------


def test_json_accepts_numbers_enum_names_snake_case_and_pretty_documents(tmp_path):
    doc = {
        "resource_spans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"string_value": "svc"}}]},
                "scope_spans": [
                    {
                        "spans": [
                            {
                                "trace_id": "5B8EFFF798038103D269B633813FC60C",
                                "span_id": "eee19b7ec3c1b174",
                                "name": "n",
                                "kind": "SPAN_KIND_CLIENT",
                                "start_time_unix_nano": 1700000000000000000,
                                "end_time_unix_nano": "1700000000000000001",
                                "attributes": [
                                    {"key": "i", "value": {"int_value": 7}},
                                    {"key": "d", "value": {"double_value": "Infinity"}},
                                    {"key": "e", "value": {}},
                                    {"key": "n", "value": {"double_value": 2}},
                                ],
                                "status": {"code": "STATUS_CODE_ERROR"},
                            }
                        ]
                    }
                ],
            }
        ]
    }
    (tmp_path / "pretty.json").write_text(json.dumps(doc, indent=2))
    report = ReadReport()
    (span,) = _all_spans(otlp_json.read([tmp_path / "pretty.json"], report))
    assert report.problems == []
    assert span.trace_id == "5b8efff798038103d269b633813fc60c"
    assert (span.kind, span.status.code, span.start_ns, span.end_ns) == (
        SpanKind.CLIENT,
        StatusCode.ERROR,
        1700000000000000000,
        1700000000000000001,
    )
    assert span.attributes == {"i": 7, "d": float("inf"), "e": None, "n": 2.0} and type(span.attributes["n"]) is float


def test_unknown_enum_values_and_zero_parent_are_repaired_not_dropped():
    doc = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "1" * 32,
                                "spanId": "2" * 16,
                                "parentSpanId": "0" * 16,
                                "kind": 9,
                                "status": {"code": 7},
                                "name": "x",
                            }
                        ]
                    }
                ]
            }
        ]
    }
    for spans_of in (
        lambda d: otlp_json.loads(json.dumps(d), report),
        lambda d: otlp_proto.loads(_as_proto(d), report),
    ):
        report = ReadReport()
        (span,) = spans_of(doc)
        assert (span.parent_id, span.kind, span.status, span.service) == (
            None,
            SpanKind.UNSPECIFIED,
            STATUS_UNSET,
            "unknown_service",
        )
        assert report.repaired == {
            "all-zero parent span id": 1,
            "unknown span kind": 1,
            "unknown status code": 1,
            "missing service.name": 1,
        }
        assert report.problems == []


def _as_proto(doc: dict) -> bytes:
    """An OTLP JSON document as protobuf bytes, built with protobuf's own parser (hex ids turned to bytes)."""
    request = ExportTraceServiceRequest()
    for rs in doc["resourceSpans"]:
        new_rs = request.resource_spans.add()
        if "resource" in rs:
            json_format.ParseDict(rs["resource"], new_rs.resource)
        for ss in rs["scopeSpans"]:
            new_ss = new_rs.scope_spans.add()
            for sp in ss["spans"]:
                span = new_ss.spans.add()
                fields = {k: v for k, v in sp.items() if k not in ("traceId", "spanId", "parentSpanId", "links")}
                json_format.ParseDict(fields, span)
                span.trace_id = bytes.fromhex(sp["traceId"]) if len(sp["traceId"]) % 2 == 0 else sp["traceId"].encode()
                span.span_id = bytes.fromhex(sp["spanId"]) if len(sp["spanId"]) % 2 == 0 else sp["spanId"].encode()
                if sp.get("parentSpanId"):
                    span.parent_span_id = bytes.fromhex(sp["parentSpanId"])
                for ln in sp.get("links", []):
                    span.links.add(trace_id=bytes.fromhex(ln["traceId"]), span_id=bytes.fromhex(ln["spanId"]))
    return request.SerializeToString()


# --- bad input ---------------------------------------------------------------------------------------------------

GOOD = "5b8efff798038103d269b633813fc60c"


def _doc(*spans: dict) -> dict:
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                "scopeSpans": [{"scope": {"name": "s"}, "spans": list(spans)}],
            }
        ]
    }


def _span(span_id: str, **extra) -> dict:
    return {"traceId": GOOD, "spanId": span_id, "name": "op", "startTimeUnixNano": "1", "endTimeUnixNano": "2", **extra}


def test_json_lines_with_a_garbage_line_and_a_bad_span_keep_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(_doc(_span("0000000000000001"), _span("0000000000000002", parentSpanId="0000000000000001"))),
                '{"resourceSpans": [{"scopeSpans": [',  # cut off mid-line
                json.dumps(_doc(_span("0000000000000003"), _span("xyz"), _span("0000000000000004"))),
            ]
        )
        + "\n"
    )
    report = ReadReport()
    spans = _all_spans(otlp_json.read([path], report))
    assert sorted(s.span_id for s in spans) == [f"{i:016x}" for i in (1, 2, 3, 4)]
    assert [(p.where, p.reason) for p in report.problems] == [
        (f"{path}:2", "malformed JSON"),
        (f"{path}:3", "invalid span id"),
    ]
    assert report.problems[1].detail.startswith("resourceSpans[0].scopeSpans[0].spans[1]: spanId 'xyz'")
    assert report.dropped == {"malformed JSON": 1, "invalid span id": 1}


def test_json_lines_whose_first_line_is_garbage(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("garbage\n" + json.dumps(_doc(_span("0000000000000001"))) + "\n")
    report = ReadReport()
    assert len(_all_spans(otlp_json.read([path], report))) == 1
    assert [(p.where, p.reason) for p in report.problems] == [(f"{path}:1", "malformed JSON")]


def test_broken_single_document_is_one_problem(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(_doc(_span("0000000000000001")), indent=2)[:-5])
    report = ReadReport()
    assert otlp_json.read([path], report) == []
    assert len(report.problems) == 1 and report.problems[0].reason == "malformed JSON"
    assert report.problems[0].where.startswith(f"{path}:")


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"startTimeUnixNano": "soon"}, "invalid timestamp"),
        ({"endTimeUnixNano": -5}, "invalid timestamp"),
        ({"traceId": "00" * 16}, "invalid trace id"),
        ({"traceId": 12345}, "invalid trace id"),
        ({"parentSpanId": "abc"}, "invalid parent span id"),
        ({"kind": "SPAN_KIND_BOGUS"}, "malformed span"),
        ({"attributes": [{"key": "k", "value": {"intValue": "1.5"}}]}, "malformed span"),
        ({"attributes": [{"key": "k", "value": {"stringValue": "a", "intValue": "1"}}]}, "malformed span"),
        ({"attributes": [{"key": "k", "value": {"boolValue": "yes"}}]}, "malformed span"),
        ({"attributes": "not a list"}, "malformed span"),
        ({"status": {"code": 1, "message": 5}}, "malformed span"),
        ({"name": ["not", "a", "string"]}, "malformed span"),
    ],
)
def test_one_malformed_span_in_a_document_is_dropped_and_named(tmp_path, bad, reason):
    path = tmp_path / "doc.json"
    path.write_text(
        json.dumps(
            _doc(_span("0000000000000001"), _span("0000000000000002", **bad), _span("0000000000000003")), indent=1
        )
    )
    report = ReadReport()
    spans = _all_spans(otlp_json.read([path], report))
    assert sorted(s.span_id for s in spans) == ["0000000000000001", "0000000000000003"]
    assert [(p.where, p.reason) for p in report.problems] == [
        (f"{path}: resourceSpans[0].scopeSpans[0].spans[1]", reason)
    ]


def test_bad_link_drops_the_link_not_the_span():
    doc = _doc(
        _span(
            "0000000000000001",
            links=[{"traceId": GOOD, "spanId": "short"}, {"traceId": GOOD, "spanId": "0000000000000009"}],
        )
    )
    for spans_of in (
        lambda: otlp_json.loads(json.dumps(doc), report),
        lambda: otlp_proto.loads(_with_short_link_id(), report),
    ):
        report = ReadReport()
        (span,) = spans_of()
        assert [ln.span_id for ln in span.links] == ["0000000000000009"]
        assert span.dropped_links_count == 1
        assert [p.reason for p in report.problems] == ["invalid link"] and not report.dropped


def _with_short_link_id() -> bytes:
    request = ExportTraceServiceRequest()
    span = (
        request.resource_spans.add()
        .scope_spans.add()
        .spans.add(trace_id=bytes.fromhex(GOOD), span_id=bytes(7) + b"\x01", name="op")
    )
    span.links.add(trace_id=bytes.fromhex(GOOD), span_id=b"\x01\x02")
    span.links.add(trace_id=bytes.fromhex(GOOD), span_id=bytes.fromhex("0000000000000009"))
    return request.SerializeToString()


def test_proto_span_with_bad_id_length_is_dropped_and_named(tmp_path):
    request = ExportTraceServiceRequest()
    ss = request.resource_spans.add().scope_spans.add()
    for i, (tid, sid) in enumerate(
        [
            (bytes.fromhex(GOOD), b"\x00" * 7 + b"\x01"),
            (b"\x01\x02\x03", b"\x00" * 7 + b"\x02"),
            (bytes.fromhex(GOOD), b"\x00" * 8),
            (bytes.fromhex(GOOD), b"\x00" * 7 + b"\x04"),
        ]
    ):
        ss.spans.add(trace_id=tid, span_id=sid, name=f"s{i}")
    path = tmp_path / "bad-ids.pb"
    path.write_bytes(request.SerializeToString())
    report = ReadReport()
    spans = _all_spans(otlp_proto.read([path], report))
    assert [s.name for s in spans] == ["s0", "s3"]
    assert [(p.where, p.reason) for p in report.problems] == [
        (f"{path}: resourceSpans[0].scopeSpans[0].spans[1]", "invalid trace id"),
        (f"{path}: resourceSpans[0].scopeSpans[0].spans[2]", "invalid span id"),
    ]


def test_truncated_proto_is_a_problem_not_a_traceback(tmp_path):
    data = otlp_proto.dumps(_all_spans(otlp_json.read([FIXTURE])))
    for cut in (len(data) // 2, len(data) - 1, 3):
        path = tmp_path / f"cut{cut}.pb"
        path.write_bytes(data[:cut])
        report = ReadReport()
        assert otlp_proto.read([path], report) == []
        assert [(p.where, p.reason) for p in report.problems] == [(str(path), "malformed protobuf")]
    report = ReadReport()
    assert otlp_proto.loads(b"\xff\xff\xff garbage", report) == [] and report.problems[0].where == "request"


def test_truncated_length_delimited_stream_keeps_whole_requests(tmp_path):
    original = otlp_json.read([FIXTURE])
    otlp_proto.write(original, tmp_path / "stream.pb", batch_spans=1)  # one trace per request
    data = (tmp_path / "stream.pb").read_bytes()
    assert len(otlp_proto.split_requests(data)) == 2
    (tmp_path / "cut.pb").write_bytes(data[:-10])
    report = ReadReport()
    (kept,) = otlp_proto.read([tmp_path / "cut.pb"], report)
    assert kept.trace_id == original[0].trace_id and len(kept) == len(original[0])
    assert [p.reason for p in report.problems] == ["truncated protobuf"]


def test_single_request_is_not_mistaken_for_a_stream():
    """A request whose bytes happen to start with a plausible frame is still read as one request."""
    spans = _all_spans(otlp_json.read([FIXTURE]))
    for n in range(1, len(spans) + 1):
        data = otlp_proto.dumps(spans[:n])
        assert otlp_proto.split_requests(data) == [data]


def test_corrupt_gzip_is_a_problem(tmp_path):
    data = gzip.compress(FIXTURE.read_bytes())
    for name, module in (("x.jsonl.gz", otlp_json), ("x.pb.gz", otlp_proto)):
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        report = ReadReport()
        module.read([tmp_path / name], report)  # JSON keeps the lines before the cut; neither raises
        assert report.problems and report.problems[-1].where == str(tmp_path / name)


def test_missing_file_is_a_user_error(tmp_path):
    for module in (otlp_json, otlp_proto):
        with pytest.raises(UserError):
            module.read([tmp_path / "nope"], ReadReport())


def test_not_an_otlp_document():
    report = ReadReport()
    assert otlp_json.loads('{"resourceMetrics": []}', report) == []
    assert [p.reason for p in report.problems] == ["not an OTLP traces document"]
    assert otlp_json.loads("{}", ReadReport()) == []  # an empty request is fine


def test_empty_proto_request_and_file(tmp_path):
    (tmp_path / "empty.pb").write_bytes(b"")
    report = ReadReport()
    assert otlp_proto.read([tmp_path / "empty.pb"], report) == [] and report.problems == []
    assert otlp_proto.dumps([]) == b"" and otlp_json.dumps([]) == '{"resourceSpans":[]}'
