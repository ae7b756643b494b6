"""Real trace files from public repositories (``tests/testdata/realworld/*/SOURCE.md`` names each source).

For every file, in the format it claims:

- the adapter reads it with no problem, or, for the few files that are malformed in a way the adapters refuse
  (listed in :data:`MALFORMED`), with exactly the problems the file holds, keeping its good spans;
- the number of spans read is the number the file holds, counted independently from the raw JSON (or protobuf);
- file -> canonical -> same format -> canonical gives the same spans, and the written JSON equals the original
  JSON for what the format carries, after normalising only what the adapters document (each step below says
  where the adapter's module docstring writes it down).

Then: OTLP JSON spelled the ways real producers spell it (pretty or compact, 64-bit integers as numbers, enum
names, upper-case or base64 ids, snake_case names, JSON Lines, arrays of documents, envelopes, a byte order mark)
reads to the same spans; the spec's file-exporter example, given valid ids, keeps every dropped count, flag and
trace state through both OTLP encodings; and one span that went through Jaeger and Tempo reads alike from all of
their outputs.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_tracegen.formats import jaeger, otlp_json, otlp_proto, zipkin
from otel_tracegen.report import ReadReport
from otel_tracegen.trace import SERVICE_NAME, Scope, Span, SpanKind, StatusCode, Trace
from tests.test_zipkin import normalise as zipkin_normalise

REALWORLD = Path(__file__).resolve().parent / "testdata" / "realworld"
ADAPTERS = {"otlp-json": otlp_json, "otlp-proto": otlp_proto, "jaeger": jaeger, "zipkin": zipkin}
DATA_SUFFIXES = {".json", ".jsonl", ".protobuf-bin"}

# Files the adapters refuse in part, by design: {file: ({reason: spans dropped}, spans kept)}.
MALFORMED = {
    # The OTel specification's file-exporter example is the Collector's test-data generator output, whose spans
    # have empty ("") trace and span ids: invalid per the spec, so each span is dropped and named.
    "otlp-json/otel-spec-file-exporter-example.jsonl": ({"invalid trace id": 8}, 0),
    # A Jaeger UI unit-test trace with made-up ids ("trace-123", "span-X"): Jaeger's ids are hex, so each span is
    # dropped and named (the UI itself does not check them).
    "jaeger/jaegerui-happyTrace.json": ({"invalid trace id": 5}, 0),
    # A Jaeger UI contract case whose root span has no startTime: that span is dropped, its child kept.
    "jaeger/jaegerui-missing-root-start.legacy.json": ({"invalid timestamp": 1}, 1),
}

# Repairs a file needs (everything else reads with no repair at all).
EXPECTED_REPAIRS = {
    "otlp-json/jaeger-apiv3-GetTrace.json": {"missing service.name": 1},
    "otlp-json/jaeger-apiv3-FindTraces.json": {"missing service.name": 1, "traces document in an envelope": 1},
    "otlp-json/observatorium-jaeger-apiv3-trace.json": {"traces document in an envelope": 1},
    "otlp-json/observatorium-tempo-batches.json": {"traces document in an envelope": 1, "base64 id": 3},
    "otlp-json/otelcol-azureblob-dotnet-instrumentationLibrarySpans.json": {
        "deprecated instrumentationLibrarySpans": 2
    },
    "zipkin/ascend.json": {"zipkin: shared span id given a derived id": 2},
    "zipkin/skew.json": {"zipkin: shared span id given a derived id": 1},
    "zipkin/smartthings-oauth-authorization.json": {
        "zipkin: span without duration": 19,
        "zipkin: shared span id given a derived id": 45,
    },
}


def _files(fmt: str) -> list[Path]:
    return sorted(p for p in (REALWORLD / fmt).iterdir() if p.suffix in DATA_SUFFIXES)


def _key(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


ALL_FILES = [p for fmt in ADAPTERS for p in _files(fmt)]
GOOD_FILES = [p for p in ALL_FILES if _key(p) not in MALFORMED]


def _spans(traces: list[Trace]) -> list[Span]:
    return [s for t in traces for s in t.spans]


def _read(path: Path) -> tuple[list[Trace], ReadReport]:
    report = ReadReport()
    return ADAPTERS[path.parent.name].read([path], report), report


# --- independent span counts --------------------------------------------------------------------------------------


def _json_documents(path: Path) -> list:
    """The JSON values in a file: one document, or one per line (JSON Lines)."""
    text = path.read_text(encoding="utf-8")
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _count_spans_lists(value) -> int:
    """Elements of every ``"spans"`` list (OTLP ScopeSpans and Jaeger trace objects both hold their spans so)."""
    if isinstance(value, dict):
        own = len(value["spans"]) if isinstance(value.get("spans"), list) else 0
        return own + sum(_count_spans_lists(v) for k, v in value.items() if k != "spans")
    if isinstance(value, list):
        return sum(_count_spans_lists(v) for v in value)
    return 0


def count_spans(path: Path) -> int:
    fmt = path.parent.name
    if fmt == "otlp-proto":
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    docs = _json_documents(path)
    if fmt == "zipkin":  # a span list, or /api/v2/traces' list of span lists
        return sum(len(x) if isinstance(x, list) else 1 for doc in docs for x in doc)
    return sum(_count_spans_lists(doc) for doc in docs)


# --- reading ------------------------------------------------------------------------------------------------------


def test_every_source_is_named_in_source_md():
    for fmt in ADAPTERS:
        source_md = (REALWORLD / fmt / "SOURCE.md").read_text(encoding="utf-8")
        for path in _files(fmt):
            assert f"`{path.name}`" in source_md, f"{_key(path)} is not described in {fmt}/SOURCE.md"


@pytest.mark.parametrize("path", ALL_FILES, ids=_key)
def test_reads_every_span_the_file_holds(path):
    traces, report = _read(path)
    spans = _spans(traces)
    held = count_spans(path)
    if _key(path) in MALFORMED:
        dropped, kept = MALFORMED[_key(path)]
        assert dict(report.dropped) == dropped
        assert len(report.problems) == sum(dropped.values())  # one problem per bad span, each named
        assert len(spans) == kept == held - sum(dropped.values())
    else:
        assert report.problems == []
        assert dict(report.repaired) == EXPECTED_REPAIRS.get(_key(path), {})
        assert len(spans) == held > 0
    for t in traces:
        assert all(s.trace_id == t.trace_id for s in t.spans)


@pytest.mark.parametrize("path", ALL_FILES, ids=_key)
def test_file_canonical_file_canonical_is_exact(path, tmp_path):
    """Written in the same format and read back, the spans are the same, field for field."""
    module = ADAPTERS[path.parent.name]
    traces, _ = _read(path)
    out = tmp_path / ("out.pb" if path.parent.name == "otlp-proto" else "out.json")
    module.write(traces, out)
    report = ReadReport()
    again = module.read([out], report)
    assert report.problems == []
    assert _spans(again) == _spans(traces)


# --- written JSON against the original ---------------------------------------------------------------------------
# Each normaliser is applied to both the original and the written document, so it forgives only a spelling
# difference, never a lost field.

_OTLP_INT64 = {"startTimeUnixNano", "endTimeUnixNano", "timeUnixNano", "intValue"}
_OTLP_IDS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}
_ANY_VALUE_MEMBERS = {"stringValue", "boolValue", "intValue", "doubleValue", "bytesValue", "arrayValue", "kvlistValue"}
_KINDS = {f"SPAN_KIND_{k.name}": int(k) for k in SpanKind}
_CODES = {f"STATUS_CODE_{c.name}": int(c) for c in StatusCode}


def _hex_id(value: str, nbytes: int) -> str:
    if re.fullmatch(r"[0-9a-fA-F]*", value) and len(value) == 2 * nbytes:
        # hex in any case is read lower-cased (otlp_json: ids); all zeros is the empty id, which the Collector
        # writes as "" (_otlp_common: an all-zero parent is no parent, an empty link id is all zeros)
        return "" if value.strip("0") == "" else value.lower()
    raw = base64.b64decode(value)  # protobuf's own JSON mapping: base64 (otlp_json: "base64 ids")
    assert len(raw) == nbytes
    return raw.hex()


def _otlp_plain(value, key: str = ""):
    """An OTLP JSON value with the spellings otlp_json documents as equivalent made one: ids lower-case hex,
    64-bit integers as strings, enums as numbers, fields at their default left out ("Fields at their default are
    left out"), ``status`` and ``resource`` always present (the writer always writes them), and the pre-1.0
    names ``instrumentationLibrarySpans``/``instrumentationLibrary`` as ``scopeSpans``/``scope``."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = {"instrumentationLibrarySpans": "scopeSpans", "instrumentationLibrary": "scope"}.get(k, k)
            v = _otlp_plain(v, k)
            if k in _OTLP_IDS and v != "":
                v = _hex_id(v, _OTLP_IDS[k])
            if k not in _ANY_VALUE_MEMBERS and (v is None or v == "" or v == [] or (type(v) is int and v == 0)):
                continue  # a default: left out (a oneof member such as {"boolValue": false} is a set value)
            out[k] = v
        if "spanId" in out:
            out.setdefault("status", {})
        if "scopeSpans" in out:
            out.setdefault("resource", {})
        return out
    if isinstance(value, list):
        return [_otlp_plain(v, key) for v in value]
    if key in _OTLP_INT64 and isinstance(value, (int, str)):
        return str(int(value))
    if key == "kind" and isinstance(value, str):
        return _KINDS[value]
    if key == "code" and isinstance(value, str):
        return _CODES[value]
    return value


def _otlp_document(doc: dict) -> dict:
    """The traces document inside the envelopes otlp_json reads ({"result": ...}, {"trace": ...}, "batches"; see
    the otlp_json module doc): those are written back as a plain {"resourceSpans": [...]} document."""
    for key in ("result", "trace"):
        if isinstance(doc.get(key), dict):
            doc = doc[key]
    if "batches" in doc:
        doc = {"resourceSpans": doc["batches"]}
    return doc


OTLP_JSON_GOOD = [p for p in GOOD_FILES if p.parent.name == "otlp-json"]


@pytest.mark.parametrize("path", OTLP_JSON_GOOD, ids=_key)
def test_otlp_json_written_equals_original(path):
    for doc in _json_documents(path):
        original = _otlp_document(doc)
        spans = otlp_json.loads(json.dumps(doc))
        written = json.loads(otlp_json.dumps(spans))
        assert _otlp_plain(written) == _otlp_plain(original)


def _jaeger_trace_objects(data) -> list[dict]:
    """The API envelope, a bare list of traces or one trace: write always writes the envelope (jaeger: "Read:
    the API envelope ..., a bare list of trace objects, or one trace object. Written: always the envelope")."""
    if isinstance(data, dict) and "data" in data:
        return data["data"]
    return data if isinstance(data, list) else [data]


def _jaeger_plain(data) -> list[dict]:
    """Jaeger trace objects with what the jaeger module documents as normalised made one: warnings (not
    carried), process ids (renumbered, identical processes merged: each span gets its process itself), tag order
    (the Collector's order; compared as a set of typed tags, values and types exact), the ``event`` field first
    in a log, the parent reference first, ``flags`` 0 left out."""

    def tags(ts):
        return sorted(json.dumps(t, sort_keys=True) for t in ts or [])

    out = []
    for trace in _jaeger_trace_objects(data):
        processes = trace.get("processes") or {}
        spans = []
        for span in trace["spans"]:
            span = copy.deepcopy(span)
            span.pop("warnings", None)
            process = span.pop("process", None) or processes[span["processID"]]
            span.pop("processID", None)
            span["process"] = (process["serviceName"], tags(process.get("tags")))
            span["tags"] = tags(span.get("tags"))
            span["logs"] = [{"timestamp": lg["timestamp"], "fields": tags(lg["fields"])} for lg in span["logs"]]
            refs = span.get("references") or []
            parent = next((r for r in refs if r["refType"] == "CHILD_OF" and r["traceID"] == span["traceID"]), None)
            span["references"] = ([parent] if parent else []) + [r for r in refs if r is not parent]
            if not span.get("flags"):
                span.pop("flags", None)
            spans.append(span)
        out.append({"traceID": trace["traceID"], "spans": spans})
    return out


@pytest.mark.parametrize("path", [p for p in GOOD_FILES if p.parent.name == "jaeger"], ids=_key)
def test_jaeger_written_equals_original(path):
    original = json.loads(path.read_text(encoding="utf-8"))
    written = json.loads(jaeger.dumps(jaeger.read([path])))
    assert set(written) == {"data", "total", "limit", "offset", "errors"} and written["errors"] is None
    assert _jaeger_plain(written) == _jaeger_plain(original)


def test_jaeger_files_need_no_more_normalisation_than_documented():
    """The Jaeger UI files keep their process ids and reference order as they are: only the envelope, the
    warnings and the place of ``span.kind`` among the tags (written after the span's other tags, the Collector's
    order) differ."""
    for name in ("jaegerui-traceWithThreeShortChildren.json", "jaegerui-testTraceNormal.json",
                 "jaegerui-multi-reference.legacy.json", "jaegerui-follows-from-orphan.legacy.json"):
        original = json.loads((REALWORLD / "jaeger" / name).read_text(encoding="utf-8"))
        [written] = json.loads(jaeger.dumps(jaeger.read([REALWORLD / "jaeger" / name])))["data"]
        original["warnings"] = None  # trace-level warnings: not carried, written null
        for span in original["spans"]:
            span["warnings"] = None
            kind = [t for t in span["tags"] if t["key"] == "span.kind"]
            span["tags"] = [t for t in span["tags"] if t["key"] != "span.kind"] + kind
        assert written == original, name


@pytest.mark.parametrize("path", [p for p in GOOD_FILES if p.parent.name == "zipkin"], ids=_key)
def test_zipkin_written_equals_original(path):
    """Every field and tag comes back; only the empty fields Zipkin's encoder leaves out are normalised (zipkin:
    "What write normalises: empty fields are left out ...")."""
    original = json.loads(path.read_text(encoding="utf-8"))
    written = json.loads(zipkin.dumps(zipkin.read([path])))
    assert written == zipkin_normalise(original)


def test_collector_zipkin_status_without_error_tag_round_trips():
    """The Collector's receiver test data says ERROR with otel.status_code/otel.status_description and no error
    tag: read as ERROR "Something failed", and written back with exactly those tags (not the error tag)."""
    path = REALWORLD / "zipkin" / "otelcol-zipkinreceiver-sample3.json"
    [trace] = zipkin.read([path])
    [span] = trace.spans
    assert (span.status.code, span.status.message) == (StatusCode.ERROR, "Something failed")
    assert span.service == "" and span.attributes["net.host.ip"] == "7::0.128.128.127"
    [written] = json.loads(zipkin.dumps([trace]))
    assert written["tags"] == json.loads(path.read_text())[0]["tags"]
    [sample4] = zipkin.read([REALWORLD / "zipkin" / "otelcol-zipkinreceiver-sample4.json"])
    assert sample4.spans[0].status.message == "Non-basic error message"


# --- OTLP protobuf --------------------------------------------------------------------------------------------------

PROTO_EXAMPLE = REALWORLD / "otlp-proto" / "otel-proto-examples-trace.protobuf-bin"


def test_proto_example_is_the_compiled_text_example():
    """The binary is the upstream text example compiled as its header says (protoc --encode does the same)."""
    text = (REALWORLD / "otlp-proto" / "otel-proto-examples-trace.protobuf-text").read_text(encoding="utf-8")
    request = text_format.Parse(text, ExportTraceServiceRequest())
    assert request.SerializeToString() == PROTO_EXAMPLE.read_bytes()


def test_proto_example_reads_as_the_json_example_and_writes_back_the_same_message(tmp_path):
    [trace] = otlp_proto.read([PROTO_EXAMPLE])
    [span] = trace.spans
    assert _spans(otlp_json.read([REALWORLD / "otlp-json" / "otel-proto-examples-trace.json"])) == [span]
    assert (span.trace_id, span.span_id, span.parent_id) == (
        "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "eee19b7ec3c1b173")
    assert span.scope == Scope("my.library", "1.0.0", {"my.scope.attribute": "some scope attribute"})
    out = tmp_path / "out.pb"
    otlp_proto.write([trace], out)
    original = ExportTraceServiceRequest.FromString(PROTO_EXAMPLE.read_bytes())
    for rs in original.resource_spans:
        for ss in rs.scope_spans:
            for sp in ss.spans:
                sp.status.SetInParent()  # the status is always written, as the SDK does (otlp_proto: Mapping)
    assert ExportTraceServiceRequest.FromString(out.read_bytes()) == original


@pytest.mark.parametrize("path", OTLP_JSON_GOOD, ids=_key)
def test_otlp_json_files_survive_the_protobuf_encoding(path, tmp_path):
    """OTLP JSON and protobuf carry the same messages: JSON -> canonical -> protobuf -> canonical is exact."""
    traces = otlp_json.read([path])
    otlp_proto.write(traces, tmp_path / "x.pb")
    assert _spans(otlp_proto.read([tmp_path / "x.pb"])) == _spans(traces)


def test_deprecated_instrumentation_library_spans_in_protobuf():
    """OTLP 0.15-0.18 senders put spans in ResourceSpans field 1000 (instrumentation_library_spans, the layout of
    ScopeSpans): read as scope spans, counted, instead of being skipped as an unknown field."""
    request = text_format.Parse(
        (REALWORLD / "otlp-proto" / "otel-proto-examples-trace.protobuf-text").read_text(encoding="utf-8"),
        ExportTraceServiceRequest(),
    )
    rs = request.resource_spans[0]
    scope_spans = rs.scope_spans[0].SerializeToString()
    resource = rs.resource.SerializeToString()
    body = b"\x0a" + bytes([len(resource)]) + resource + b"\xc2\x3e" + _varint(len(scope_spans)) + scope_spans
    data = b"\x0a" + _varint(len(body)) + body
    report = ReadReport()
    assert otlp_proto.loads(data, report) == otlp_proto.loads(request.SerializeToString())
    assert report.problems == [] and dict(report.repaired) == {"deprecated instrumentationLibrarySpans": 1}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# --- OTLP JSON as real producers spell it -------------------------------------------------------------------------


def _map_keys(value, fn):
    if isinstance(value, dict):
        return {fn(k): _map_keys(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_keys(v, fn) for v in value]
    return value


def _map_fields(value, fn, key=""):
    """``value`` with ``fn(key, v)`` applied to every scalar field."""
    if isinstance(value, dict):
        return {k: _map_fields(v, fn, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_fields(v, fn, key) for v in value]
    return fn(key, value)


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), key)


def _variants(doc: dict) -> dict[str, str]:
    """The same document as different producers write it."""
    plain = _map_fields(_otlp_document(doc), lambda k, v: _hex_id(v, _OTLP_IDS[k]) if k in _OTLP_IDS and v else v)
    int64_numbers = _map_fields(plain, lambda k, v: int(v) if k in _OTLP_INT64 and isinstance(v, str) else v)
    int64_strings = _map_fields(plain, lambda k, v: str(v) if k in _OTLP_INT64 and isinstance(v, int) else v)
    kinds = {int(k): f"SPAN_KIND_{k.name}" for k in SpanKind}
    codes = {int(c): f"STATUS_CODE_{c.name}" for c in StatusCode}
    enum_names = _map_fields(
        plain, lambda k, v: kinds[v] if k == "kind" and isinstance(v, int) else codes[v] if k == "code" else v
    )
    upper_ids = _map_fields(plain, lambda k, v: v.upper() if k in _OTLP_IDS else v)
    base64_ids = _map_fields(
        plain,
        lambda k, v: base64.b64encode(bytes.fromhex(_hex_id(v, _OTLP_IDS[k]))).decode() if k in _OTLP_IDS and v else v,
    )
    lines = "\n".join(json.dumps({"resourceSpans": [rs]}) for rs in plain["resourceSpans"]) + "\n"
    bare_lines = "\n".join(json.dumps(rs) for rs in plain["resourceSpans"]) + "\n"
    return {
        "compact": json.dumps(plain, separators=(",", ":")),
        "pretty": json.dumps(plain, indent=2),
        "int64 as numbers": json.dumps(int64_numbers),
        "int64 as strings": json.dumps(int64_strings),
        "enum names": json.dumps(enum_names),
        "upper-case hex ids": json.dumps(upper_ids),
        "base64 ids": json.dumps(base64_ids),
        "snake_case names": json.dumps(_map_keys(plain, _snake)),
        "JSON Lines, one resourceSpans per line": lines,
        "array of documents": json.dumps([{"resourceSpans": [rs]} for rs in plain["resourceSpans"]]),
        "Jaeger API v3 envelope, pretty": json.dumps({"result": plain}, indent=2),
        "Tempo API v2 envelope": json.dumps({"trace": plain}),
        "Tempo batches": json.dumps({"batches": plain["resourceSpans"]}),
        "bare ResourceSpans per line": bare_lines,
        "byte order mark": "\ufeff" + json.dumps(plain, indent=1),
    }


@pytest.mark.parametrize("path", OTLP_JSON_GOOD, ids=_key)
def test_otlp_json_spellings_read_alike(path, tmp_path):
    [doc] = _json_documents(path)
    expected = otlp_json.loads(json.dumps(doc))
    for name, text in _variants(doc).items():
        report = ReadReport()
        assert otlp_json.loads(text, report) == expected, name
        assert report.problems == [], name
        f = tmp_path / "v.json"
        f.write_text(text, encoding="utf-8")
        report = ReadReport()
        assert _spans(otlp_json.read([f], report)) == _spans(otlp_json.read([path])), name
        assert report.problems == [], name


def _spec_example_with_ids() -> list[dict]:
    """The spec's file-exporter example with valid ids, trace state and flags filled in: the other fields
    (dropped counts on spans, events and links, status message, links with attributes) are its own."""
    docs = _json_documents(REALWORLD / "otlp-json" / "otel-spec-file-exporter-example.jsonl")
    for line, doc in enumerate(docs, 1):
        for rs in doc["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for n, span in enumerate(ss["spans"], 1):
                    span["traceId"] = f"{line:032x}"
                    span["spanId"] = f"{line:08x}{n:08x}"
                    span["parentSpanId"] = f"{line:08x}{1:08x}" if n > 1 else ""
                    span["traceState"] = f"vendor=line{line}"
                    span["flags"] = 0x301  # sampled, has is-remote, is-remote: as current SDKs set them
                    for k, link in enumerate(span.get("links", ())):
                        if k == 0:  # the second link keeps its empty ids: a link to the invalid context
                            link["traceId"] = f"{line + 100:032x}"
                            link["spanId"] = f"{k + 1:016x}"
                            link["traceState"] = "other=1"
                            link["flags"] = 0x101
    return docs


def test_spec_example_fields_survive_both_encodings(tmp_path):
    docs = _spec_example_with_ids()
    path = tmp_path / "example.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    report = ReadReport()
    traces = otlp_json.read([path], report)
    assert report.problems == [] and len(_spans(traces)) == 8
    a, b = traces[0].spans
    assert (a.dropped_attributes_count, a.dropped_events_count, a.status.message) == (1, 1, "status-cancelled")
    assert [e.dropped_attributes_count for e in a.events] == [2, 2]
    assert b.dropped_links_count == 3 and [ln.dropped_attributes_count for ln in b.links] == [4, 1]
    assert (b.flags, b.trace_state, b.links[0].flags, b.links[0].trace_state) == (0x301, "vendor=line1", 0x101,
                                                                                  "other=1")
    assert b.links[0].attributes == {"span-link-attr": "span-link-attr-val"}
    assert (b.links[1].trace_id, b.links[1].span_id) == ("0" * 32, "0" * 16)  # "" is the all-zero (invalid) id
    # JSON written per trace: each line comes back as it was, and so does the protobuf encoding
    for doc, trace in zip(docs, traces):
        assert _otlp_plain(json.loads(otlp_json.dumps(trace.spans))) == _otlp_plain(doc)
    otlp_proto.write(traces, tmp_path / "x.pb")
    assert _spans(otlp_proto.read([tmp_path / "x.pb"])) == _spans(traces)
    request = ExportTraceServiceRequest.FromString((tmp_path / "x.pb").read_bytes())
    proto_span = request.resource_spans[0].scope_spans[0].spans[1]
    assert (proto_span.flags, proto_span.links[0].flags, proto_span.dropped_links_count) == (0x301, 0x101, 3)
    # protobuf's own JSON of that request (base64 ids, enum names) reads the same too
    assert otlp_json.loads(json_format.MessageToJson(request)) == _spans(traces)


# --- one span through Jaeger and Tempo ----------------------------------------------------------------------------


def test_one_span_reads_alike_from_every_backend_that_stored_it():
    """Observatorium's end-to-end test sends the opentelemetry-proto example span to a Collector and reads it back
    from Jaeger (API v2 and v3) and Tempo: every output reads as the span that was sent, up to what each backend
    added or moved (Jaeger adds ``internal.span.format``; the Jaeger v1 backend of that test put the scope into
    the process tags, which read as resource attributes; Jaeger v3 drops scope attributes)."""
    [sent] = _spans(otlp_json.read([REALWORLD / "otlp-json" / "otel-proto-examples-trace.json"]))
    [tempo] = _spans(otlp_json.read([REALWORLD / "otlp-json" / "observatorium-tempo-batches.json"]))
    [v3] = _spans(otlp_json.read([REALWORLD / "otlp-json" / "observatorium-jaeger-apiv3-trace.json"]))
    [v2] = _spans(jaeger.read([REALWORLD / "jaeger" / "observatorium-jaeger-api-traces.json"]))
    assert tempo == sent
    for got in (v3, v2):
        same = (got.trace_id, got.span_id, got.parent_id, got.service, got.name, got.start_ns, got.end_ns, got.kind)
        assert same == (sent.trace_id, sent.span_id, sent.parent_id, sent.service, sent.name, sent.start_ns,
                        sent.end_ns, sent.kind)
        assert got.attributes == {**sent.attributes, "internal.span.format": "otlp"}
    assert v3.scope == Scope("my.library", "1.0.0")
    assert v2.scope is None and v2.resource.attributes == {
        SERVICE_NAME: "my.service", "otel.library.name": "my.library", "otel.library.version": "1.0.0"}


def test_jaeger_typed_values_given_as_strings_are_read_as_their_type():
    """Jaeger UI files (and Jaeger's Elasticsearch documents) may hold {"type": "bool", "value": "true"}: read as
    the type says and counted, not dropped (here from the UI's happyTrace, given hex ids)."""
    doc = json.loads((REALWORLD / "jaeger" / "jaegerui-happyTrace.json").read_text(encoding="utf-8"))
    ids: dict[str, str] = {}
    hexed = _map_fields(doc, lambda k, v: ids.setdefault(v, f"{len(ids) + 1:016x}") if k in ("traceID", "spanID")
                        else v)
    report = ReadReport()
    [trace] = jaeger.loads(json.dumps(hexed), report=report)
    assert report.problems == [] and dict(report.repaired) == {"jaeger: typed tag value given as a string": 1}
    erroring = [s for s in trace.spans if s.status.code is StatusCode.ERROR]
    assert [s.name for s in erroring] == ["op2"] and erroring[0].attributes == {"error": True}
    assert len(trace.spans) == 5 and len(trace.roots) == 1


def test_collector_file_exporter_protobuf_framing(tmp_path):
    """The Collector's ``file`` exporter with ``format: proto`` writes each request after its length as a 4-byte
    big-endian integer (exporter/fileexporter/file_writer.go, exportMessageAsBuffer): read as several requests;
    cut short, the complete ones are kept and the tail reported."""
    example = PROTO_EXAMPLE.read_bytes()
    json_file = REALWORLD / "otlp-json" / "jaeger-otlp2jaeger-in.json"
    json_request = otlp_proto.dumps(otlp_json.loads(json_file.read_text(encoding="utf-8")))
    framed = b"".join(len(r).to_bytes(4, "big") + r for r in (example, json_request, example))
    path = tmp_path / "traces.pb"
    path.write_bytes(framed)
    report = ReadReport()
    spans = _spans(otlp_proto.read([path], report))
    assert report.problems == []
    expected = otlp_proto.loads(example) + otlp_proto.loads(json_request) + otlp_proto.loads(example)
    assert sorted(spans, key=repr) == sorted(expected, key=repr) and len(spans) == 4
    path.write_bytes(framed[:-10])
    report = ReadReport()
    assert len(_spans(otlp_proto.read([path], report))) == 3
    assert [p.reason for p in report.problems] == ["truncated protobuf"]


@pytest.mark.parametrize("path", [p for p in GOOD_FILES if p.suffix == ".json"], ids=_key)
def test_a_byte_order_mark_is_ignored(path, tmp_path):
    """Windows tools (PowerShell's Out-File, Notepad) start UTF-8 files with a byte order mark."""
    copy_ = tmp_path / path.name
    copy_.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    report = ReadReport()
    assert _spans(ADAPTERS[path.parent.name].read([copy_], report)) == _spans(_read(path)[0])
    assert report.problems == []


@pytest.mark.parametrize(
    "status_tags",
    [
        {"otel.status_code": "ERROR", "otel.status_description": "Something failed"},  # the Collector's sample3
        {"otel.status_code": "ERROR"},
    ],
)
def test_status_given_only_by_otel_status_tags_round_trips_in_zipkin_and_jaeger(status_tags):
    """With no error tag, ERROR said by otel.status_code (and otel.status_description) is written back as it was,
    in both formats that carry status in tags (zipkin/jaeger: a span whose tags already say ERROR is trusted)."""
    [z] = json.loads((REALWORLD / "zipkin" / "otelcol-zipkinreceiver-sample4.json").read_text(encoding="utf-8"))
    z["tags"] = {**{k: v for k, v in z["tags"].items() if k != "error"}, **status_tags}
    [trace] = zipkin.loads(json.dumps([z]))
    assert trace.spans[0].status.code is StatusCode.ERROR
    assert trace.spans[0].status.message == status_tags.get("otel.status_description", "")
    assert json.loads(zipkin.dumps([trace])) == [z]

    doc = json.loads((REALWORLD / "jaeger" / "observatorium-jaeger-api-traces.json").read_text(encoding="utf-8"))
    span = doc["data"][0]["spans"][0]
    span["tags"] += [{"key": k, "type": "string", "value": v} for k, v in status_tags.items()]
    traces = jaeger.loads(json.dumps(doc))
    assert _spans(traces)[0].status.code is StatusCode.ERROR
    assert _jaeger_plain(json.loads(jaeger.dumps(traces))) == _jaeger_plain(doc)
