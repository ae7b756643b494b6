"""Jaeger query API JSON (``/api/traces``), the form the Jaeger UI also opens from a file.

Read: the API envelope ``{"data": [trace, ...], "total": 0, "limit": 0, "offset": 0, "errors": null}``, a bare
list of trace objects, or one trace object. Written: always the envelope. One trace object::

    {"traceID": "83a9efd15c1c98a977e0711cc93ee28b",
     "spans": [{"traceID": "83a9...", "spanID": "e127af99e3b3e074", "flags": 1, "operationName": "GET /",
                "references": [{"refType": "CHILD_OF", "traceID": "83a9...", "spanID": "909541b92cf05311"}],
                "startTime": 1706678909209712, "duration": 123,
                "tags": [{"key": "span.kind", "type": "string", "value": "server"}],
                "logs": [{"timestamp": 1706678909209800, "fields": [{"key": "event", "type": "string", "value": "x"}]}],
                "processID": "p1", "warnings": null}],
     "processes": {"p1": {"serviceName": "frontend", "tags": [{"key": "host.name", "type": "string", "value": "h"}]}},
     "warnings": null}

The mapping is the OpenTelemetry Collector's (``pkg/translator/jaeger`` in opentelemetry-collector-contrib):

- **Process** = resource: ``serviceName`` is ``service.name`` (the span's service), process tags are the other
  resource attributes. On write there is one process per distinct (service, resource attributes) within a
  trace, numbered ``p1``, ``p2``, ... in order of first use; the resource's schema URL and dropped count are lost.
- **Tags** are typed (:data:`TAG_TYPE_OF`): str <-> ``string``, bool <-> ``bool``, int <-> ``int64``, float <->
  ``float64``, bytes <-> ``binary`` (base64 in JSON). A ``bool``/``int64``/``float64`` value given as a string
  (``"true"``, ``"200"``, as Jaeger's Elasticsearch documents and some hand-made UI files hold them) is read as
  its type (counted) and written back as a JSON bool or number. Lists and maps have no Jaeger type: they are
  written as a ``string`` tag holding compact JSON (the Collector's ``AsString``) and read back as that string,
  so their structure is lost. An empty value (None) becomes ``""``.
- **Kind**: the ``span.kind`` tag (``client/server/producer/consumer/internal``).
- **Status**: ``otel.status_code`` (``OK``/``ERROR``) and ``otel.status_description``; a bool ``error=true`` tag
  also means ERROR (it wins over ``otel.status_code``, as in the Collector). Written as the Collector does
  (``otel.status_code``, ``error=true`` for ERROR, ``otel.status_description`` when there is a message), except
  that a span whose attributes already say ERROR (``error=true``, or ``otel.status_code``/
  ``otel.status_description`` without ``error``) is trusted as it is, so OpenTracing-style spans round-trip
  unchanged. The Collector's fallback of deriving status from ``http.status_code`` is not applied.
- **Scope**: ``otel.scope.name``/``otel.scope.version`` (legacy ``otel.library.*`` read, written as
  ``otel.scope.*``); scope attributes are lost. **Trace state**: ``w3c.tracestate``.
- **References**: the first ``CHILD_OF`` reference into the span's own trace is the parent; every other
  reference is a link with the attribute ``opentracing.ref_type`` (``child_of``/``follows_from``), which ``write``
  turns back into the ref type (``FOLLOWS_FROM`` when absent). The parent reference is written first (what the
  Collector and Jaeger's ParentReference adjuster do). Link trace state, attributes and flags are lost.
- **Logs** are events: the ``event`` field (a string) is the event name, the other fields its attributes; the
  name is written as the first field. Event dropped counts are lost.
- **Flags**: bit 0 (sampled) maps to the canonical W3C sampled flag; Jaeger's debug/firehose bits are dropped
  (counted as a repair) and the canonical is-remote bits are not written. ``flags`` 0 is omitted, as Jaeger does.
- **Times**: Jaeger carries microseconds, so nanoseconds are truncated on write: start and end each
  (``startTime = start_ns // 1000``, ``duration = end_ns // 1000 - startTime``; event timestamps likewise).
  Truncating both ends, not the duration, keeps every ordering between times, so a child inside its parent stays
  inside after the round trip (the Collector truncates ``end - start`` instead, which can differ by 1 µs).
- **Ids** are kept exactly as written (Jaeger writes 16 or 32 hex characters; older versions dropped leading
  zeros, e.g. ``"2"``, which is kept too); upper case is lower-cased and counted. On write, non-hex canonical ids
  go through :func:`~otel_tracegen.trace.hex_id`.
- **Not carried**: span and trace ``warnings`` (added by Jaeger's adjusters; read and ignored, written ``null``),
  dropped counts, link trace state/flags.

**Exact round trips.** As in :mod:`.zipkin`, a tag turned into a field is removed only when ``write`` puts the
same tag back (:func:`~otel_tracegen.formats.zipkin.strip_regenerable`), so Jaeger -> canonical -> Jaeger keeps
every span's tags with their types, logs, references and process tags. What ``write`` normalises: tags are
written in the Collector's order (scope tags, the span's other tags in file order, then ``span.kind``,
``otel.status_code``, ``error``, ``otel.status_description``, ``w3c.tracestate``), the ``event`` field first in a
log, the parent reference first, processes renumbered and identical ones merged, warnings ``null``. A tag key
repeated in one span keeps its last value (counted). Spans keep their order (file order); traces come in
first-seen order, and a trace id seen in several trace objects or files becomes one trace.

Bad records: a span that is not an object, has a bad id or a non-numeric time is a
:class:`~otel_tracegen.report.Problem` at ``file: data[0].spans[3]`` (``file: [0].spans[3]`` in a bare list,
``file: spans[3]`` for a single trace) and is dropped; a bad tag, log or reference is dropped from its span with
a problem; invalid JSON is one problem naming the line and column.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..report import ReadReport
from ..trace import (
    SERVICE_NAME,
    STATUS_UNSET,
    AttrValue,
    Event,
    Link,
    Resource,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Trace,
    freeze,
    group_traces,
    hex_id,
)
from ._io import BAD_JSON, COUNT_FILES, NOT_JSON, UNREADABLE, load_json, open_write_text, read_text_files  # noqa: F401
from .zipkin import (
    SCOPE_KEYS,
    STATUS_FROM_TAG,
    STATUS_TO_TAG,
    TAG_ERROR,
    TAG_SPAN_KIND,
    TAG_STATUS_CODE,
    TAG_STATUS_DESCRIPTION,
    TAG_TRACE_STATE,
    BadRecord,
    attribute_string,
    decode_micros,
    scope_from_tags,
    scope_tags,
    tags_say_error,
    take_field,
)

# --- vocabulary --------------------------------------------------------------------------------------------------

KIND_FROM_TAG: dict[str, SpanKind] = {
    "client": SpanKind.CLIENT,
    "server": SpanKind.SERVER,
    "producer": SpanKind.PRODUCER,
    "consumer": SpanKind.CONSUMER,
    "internal": SpanKind.INTERNAL,
}
KIND_TO_TAG: dict[SpanKind, str] = {v: k for k, v in KIND_FROM_TAG.items()}

CHILD_OF = "CHILD_OF"
FOLLOWS_FROM = "FOLLOWS_FROM"
ATTR_REF_TYPE = "opentracing.ref_type"  # semantic convention the Collector puts on links made from references
REF_TYPE_TO_ATTR: dict[str, str] = {CHILD_OF: "child_of", FOLLOWS_FROM: "follows_from"}
EVENT_FIELD = "event"  # the log field holding the event name (OTel spec, Jaeger exporter)
SAMPLED_FLAG = 0x1  # Jaeger and W3C agree on bit 0; Jaeger's debug (0x2) and firehose (0x4) have no W3C bit

STATUS_KEYS = (TAG_STATUS_CODE, TAG_ERROR, TAG_STATUS_DESCRIPTION)

# Attribute keys with a meaning in this adapter (see zipkin.RESERVED_ATTRIBUTES).
RESERVED_ATTRIBUTES: frozenset[str] = frozenset({TAG_SPAN_KIND, *STATUS_KEYS, *SCOPE_KEYS, TAG_TRACE_STATE})

US = 1000  # nanoseconds per microsecond
_HEX = re.compile(r"[0-9a-fA-F]+")
_LOWER_HEX = re.compile(r"[0-9a-f]+")
_INT = re.compile(r"[-+]?[0-9]+")

# Problem reasons (keys of ReadReport.dropped) and repair reasons (keys of ReadReport.repaired).
NOT_JAEGER = "not Jaeger query API JSON"
API_ERRORS = "Jaeger API returned errors"
MALFORMED_TRACE = "malformed trace object"
MALFORMED_SPAN = "malformed span"
BAD_TRACE_ID = "invalid trace id"
BAD_SPAN_ID = "invalid span id"
BAD_TIME = "invalid timestamp"
BAD_TAG = "malformed tag"
BAD_LOG = "malformed log"
BAD_REFERENCE = "malformed reference"
REPAIR_ID_LOWERCASED = "jaeger: id lower-cased"
REPAIR_FLAGS = "jaeger: debug/firehose flag bits dropped"
REPAIR_DUPLICATE_TAG = "jaeger: repeated tag key (last value kept)"
REPAIR_UNKNOWN_PROCESS = "jaeger: span without a known process"
REPAIR_NO_DURATION = "jaeger: span without duration"
REPAIR_STRING_VALUE = "jaeger: typed tag value given as a string"
COUNT_SPANS = "spans read"


class _BadTag(ValueError):
    pass


# --- typed values --------------------------------------------------------------------------------------------------


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise _BadTag(f"string value {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _BadTag(f"bool value {v!r}")
    return v


def _int64(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise _BadTag(f"int64 value {v!r}")


def _float64(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise _BadTag(f"float64 value {v!r}")


def _binary(v: Any) -> bytes:
    try:
        return base64.b64decode(_string(v), validate=True)
    except binascii.Error:
        raise _BadTag(f"binary value {v!r} is not base64") from None


# Jaeger tag type -> decoder of its JSON value.
TAG_DECODERS = {"string": _string, "bool": _bool, "int64": _int64, "float64": _float64, "binary": _binary}
# Canonical value type -> Jaeger tag type (bool before int: bool is an int subclass, looked up by exact type).
TAG_TYPE_OF: dict[type, str] = {str: "string", bool: "bool", int: "int64", float: "float64", bytes: "binary"}


def _encode_tag(key: str, value: AttrValue) -> dict[str, Any]:
    tag_type = TAG_TYPE_OF.get(type(value))
    if tag_type is None:  # list, dict, None: no Jaeger type, written as the Collector's AsString
        return {"key": key, "type": "string", "value": attribute_string(value)}
    if tag_type == "binary":
        value = base64.b64encode(value).decode("ascii")  # type: ignore[arg-type]
    return {"key": key, "type": tag_type, "value": value}


def _bool_from_string(v: str) -> bool:
    low = v.lower()
    if low not in ("true", "false"):
        raise _BadTag(f"bool value {v!r}")
    return low == "true"


def _int64_from_string(v: str) -> int:
    if not _INT.fullmatch(v):
        raise _BadTag(f"int64 value {v!r}")
    return int(v)


def _float64_from_string(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        f = math.nan
    if not math.isfinite(f):  # JSON numbers are finite; so is what is written back
        raise _BadTag(f"float64 value {v!r}")
    return f


# Typed tags whose value is a string ({"type": "bool", "value": "true"}), as Jaeger's Elasticsearch documents and
# some hand-made UI files hold them: read as the type says (counted), written back as a JSON bool or number.
TAG_DECODERS_FROM_STRING = {"bool": _bool_from_string, "int64": _int64_from_string, "float64": _float64_from_string}


def _decode_tag(kv: Any) -> tuple[str, AttrValue, bool]:
    """``(key, value, whether a typed value was read from a string)``."""
    if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
        raise _BadTag(f"expected an object with a string key, got {kv!r}"[:200])
    tag_type = kv.get("type")
    decoder = TAG_DECODERS.get(tag_type)  # type: ignore[arg-type]
    if decoder is None:
        raise _BadTag(f"unknown tag type {tag_type!r}")
    value = kv.get("value")
    if isinstance(value, str) and tag_type in TAG_DECODERS_FROM_STRING:
        return kv["key"], TAG_DECODERS_FROM_STRING[tag_type](value), True
    return kv["key"], decoder(value), False


def _decode_tags(value: Any, where: str, report: ReadReport) -> dict[str, AttrValue]:
    if value is None:
        return {}
    if not isinstance(value, list):
        raise BadRecord(MALFORMED_SPAN, f"{where} is {type(value).__name__}, expected a list")
    out: dict[str, AttrValue] = {}
    for i, kv in enumerate(value):
        try:
            key, v, from_string = _decode_tag(kv)
        except _BadTag as exc:
            report.problem(f"{where}[{i}]", BAD_TAG, str(exc), dropped=0)
            continue
        if from_string:
            report.repair(REPAIR_STRING_VALUE)
        if key in out:
            report.repair(REPAIR_DUPLICATE_TAG)
        out[key] = v
    return out


# --- derived fields ------------------------------------------------------------------------------------------------


def _kind_tags(kind: SpanKind, attrs: Mapping[str, AttrValue] | None = None) -> dict[str, str]:
    return {TAG_SPAN_KIND: KIND_TO_TAG[kind]} if kind in KIND_TO_TAG else {}


def _status_from_tags(tags: Mapping[str, AttrValue]) -> Status:
    code_tag, desc = tags.get(TAG_STATUS_CODE), tags.get(TAG_STATUS_DESCRIPTION)
    if tags.get(TAG_ERROR) is True:  # the Collector: the error tag is the ultimate truth
        code = StatusCode.ERROR
    elif isinstance(code_tag, str) and code_tag.upper() in STATUS_FROM_TAG:
        code = STATUS_FROM_TAG[code_tag.upper()]
    else:
        return STATUS_UNSET
    return Status(code, desc if isinstance(desc, str) else "")


def _status_tags(status: Status, attrs: Mapping[str, AttrValue]) -> dict[str, AttrValue]:
    if status.code is StatusCode.UNSET:
        return {}
    if status.code is StatusCode.ERROR and (attrs.get(TAG_ERROR) is True or tags_say_error(attrs, status.message)):
        return {}  # its own tags already say it (OpenTracing's error=true, or otel.status_*): keep them as they are
    out: dict[str, AttrValue] = {TAG_STATUS_CODE: STATUS_TO_TAG[status.code]}
    if status.code is StatusCode.ERROR:
        out[TAG_ERROR] = True
    if status.message:
        out[TAG_STATUS_DESCRIPTION] = status.message
    return out


def _trace_state_tags(trace_state: str, attrs: Mapping[str, AttrValue] | None = None) -> dict[str, str]:
    return {TAG_TRACE_STATE: trace_state} if trace_state else {}


def _event_fields(name: str, attrs: Mapping[str, AttrValue]) -> dict[str, str]:
    # As the Collector: an attribute called "event" wins over the name.
    return {EVENT_FIELD: name} if name and EVENT_FIELD not in attrs else {}


# --- reading -------------------------------------------------------------------------------------------------------


def _decode_id(value: Any, max_len: int, reason: str, report: ReadReport) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) > max_len:
        raise BadRecord(reason, repr(value))
    lower = value.lower()
    if lower != value:
        report.repair(REPAIR_ID_LOWERCASED)
    return lower


def _same_id(a: str, b: str) -> bool:
    # Jaeger compares ids as numbers: "1" and "0000000000000001" are the same trace.
    return a.lstrip("0") == b.lstrip("0")


def _decode_process(value: Any, where: str, report: ReadReport) -> Resource:
    if not isinstance(value, dict):
        raise BadRecord(MALFORMED_TRACE, f"{where} is {type(value).__name__}, expected an object")
    service = value.get("serviceName")
    if not isinstance(service, str):
        raise BadRecord(MALFORMED_TRACE, f"{where}.serviceName {service!r}")
    attrs: dict[str, AttrValue] = {SERVICE_NAME: service}
    for k, v in _decode_tags(value.get("tags"), f"{where}.tags", report).items():
        attrs.setdefault(k, v)  # serviceName wins over a service.name tag
    return Resource(attrs)


def _decode_references(
    refs: Any, trace_id: str, where: str, report: ReadReport
) -> tuple[str | None, list[Link]]:
    if refs is None:
        return None, []
    if not isinstance(refs, list):
        raise BadRecord(MALFORMED_SPAN, f"references is {type(refs).__name__}, expected a list")
    parent: str | None = None
    links: list[Link] = []
    for i, ref in enumerate(refs):
        try:
            if not isinstance(ref, dict) or ref.get("refType") not in REF_TYPE_TO_ATTR:
                raise BadRecord(BAD_REFERENCE, repr(ref)[:200])
            ref_trace = _decode_id(ref.get("traceID"), 32, BAD_REFERENCE, report)
            ref_span = _decode_id(ref.get("spanID"), 16, BAD_REFERENCE, report)
        except BadRecord as exc:
            report.problem(f"{where}.references[{i}]", BAD_REFERENCE, exc.detail, dropped=0)
            continue
        if parent is None and ref["refType"] == CHILD_OF and _same_id(ref_trace, trace_id):
            parent = ref_span
        else:
            links.append(Link(ref_trace, ref_span, attributes={ATTR_REF_TYPE: REF_TYPE_TO_ATTR[ref["refType"]]}))
    return parent, links


def _decode_log(log: Any, where: str, report: ReadReport) -> Event | None:
    try:
        if not isinstance(log, dict):
            raise BadRecord(BAD_LOG, f"expected an object, got {type(log).__name__}")
        ts = decode_micros(log.get("timestamp"), "timestamp")
        if ts is None:
            raise BadRecord(BAD_LOG, "no timestamp")
        fields = _decode_tags(log.get("fields"), f"{where}.fields", report)
    except BadRecord as exc:
        report.problem(where, BAD_LOG, exc.detail, dropped=0)
        return None
    name = fields.get(EVENT_FIELD)
    name = name if isinstance(name, str) else ""
    fields = take_field(fields, (EVENT_FIELD,), name, "", _event_fields)
    return Event(ts * US, name, fields)


def _decode_span(obj: Any, where: str, processes: Mapping[str, Resource], report: ReadReport) -> Span:
    if not isinstance(obj, dict):
        raise BadRecord(MALFORMED_SPAN, f"expected an object, got {type(obj).__name__}")
    trace_id = _decode_id(obj.get("traceID"), 32, BAD_TRACE_ID, report)
    span_id = _decode_id(obj.get("spanID"), 16, BAD_SPAN_ID, report)
    name = obj.get("operationName")
    if name is None:
        name = ""
    elif not isinstance(name, str):
        raise BadRecord(MALFORMED_SPAN, f"operationName {name!r}")
    try:
        start = decode_micros(obj.get("startTime"), "startTime")
        duration = decode_micros(obj.get("duration"), "duration")
    except BadRecord as exc:
        raise BadRecord(BAD_TIME, exc.detail) from None
    if start is None:
        raise BadRecord(BAD_TIME, "no startTime")
    if duration is None:
        report.repair(REPAIR_NO_DURATION)
        duration = 0
    flags = obj.get("flags") or 0
    if type(flags) is not int:
        raise BadRecord(MALFORMED_SPAN, f"flags {flags!r}")
    if flags & ~SAMPLED_FLAG:
        report.repair(REPAIR_FLAGS)

    tags = _decode_tags(obj.get("tags"), f"{where}.tags", report)
    kind = KIND_FROM_TAG.get(tags.get(TAG_SPAN_KIND), SpanKind.UNSPECIFIED)  # type: ignore[arg-type]
    tags = take_field(tags, (TAG_SPAN_KIND,), kind, SpanKind.UNSPECIFIED, _kind_tags)
    status = _status_from_tags(tags)
    tags = take_field(tags, STATUS_KEYS, status, STATUS_UNSET, _status_tags)
    scope = scope_from_tags(tags)
    tags = take_field(tags, SCOPE_KEYS, scope, None, scope_tags)
    trace_state = tags.get(TAG_TRACE_STATE)
    trace_state = trace_state if isinstance(trace_state, str) else ""
    tags = take_field(tags, (TAG_TRACE_STATE,), trace_state, "", _trace_state_tags)

    parent_id, links = _decode_references(obj.get("references"), trace_id, where, report)
    if parent_id is None and isinstance(obj.get("parentSpanID"), str):  # deprecated field of old Jaeger JSON
        parent_id = _decode_id(obj["parentSpanID"], 16, BAD_SPAN_ID, report)

    logs = obj.get("logs")
    if logs is not None and not isinstance(logs, list):
        raise BadRecord(MALFORMED_SPAN, f"logs is {type(logs).__name__}, expected a list")
    events = []
    for i, log in enumerate(logs or ()):
        event = _decode_log(log, f"{where}.logs[{i}]", report)
        if event is not None:  # a bad log is reported and only loses itself
            events.append(event)

    if isinstance(obj.get("process"), dict):  # a span may embed its process instead of naming it
        resource: Resource | None = _decode_process(obj["process"], f"{where}.process", report)
    else:
        resource = processes.get(obj.get("processID"))  # type: ignore[arg-type]
        if resource is None:
            report.repair(REPAIR_UNKNOWN_PROCESS)
    service = resource.attributes[SERVICE_NAME] if resource is not None else ""

    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent_id,
        service=service,  # type: ignore[arg-type]
        name=name,
        start_ns=start * US,
        end_ns=(start + duration) * US,
        kind=kind,
        status=status,
        attributes=tags,
        resource=resource,
        scope=scope,
        events=events,
        links=links,
        trace_state=trace_state,
        flags=flags & SAMPLED_FLAG,
    )


def _trace_objects(data: Any, source: str, report: ReadReport) -> Iterable[tuple[str, Any]]:
    """``(where prefix, trace object)`` for the three shapes the Jaeger UI opens."""
    if isinstance(data, dict) and "data" in data:
        if data.get("errors"):
            report.problem(source, API_ERRORS, json.dumps(data["errors"])[:500], dropped=0)
        items = data["data"] or []
        if not isinstance(items, list):
            report.problem(source, NOT_JAEGER, f"data is a JSON {type(items).__name__}", dropped=0)
            return
        for i, obj in enumerate(items):
            yield f"{source}: data[{i}].", obj
    elif isinstance(data, dict) and "spans" in data:
        yield f"{source}: ", data
    elif isinstance(data, list):
        for i, obj in enumerate(data):
            yield f"{source}: [{i}].", obj
    else:
        report.problem(source, NOT_JAEGER, "expected {\"data\": [...]}, a list of traces or one trace", dropped=0)


def _read_text(text: str, source: str, report: ReadReport) -> list[Span]:
    data = load_json(text, source, report)
    if data is NOT_JSON:
        return []
    out: list[Span] = []
    for prefix, obj in _trace_objects(data, source, report):
        spans = obj.get("spans") if isinstance(obj, dict) else None
        if not isinstance(spans, list):
            where = prefix[:-1] if prefix.endswith(".") else source  # "file: data[0]" or "file"
            report.problem(where, MALFORMED_TRACE, "expected an object with a spans list", dropped=0)
            continue
        processes: dict[str, Resource] = {}
        raw_processes = obj.get("processes") or {}
        if not isinstance(raw_processes, dict):
            report.problem(f"{prefix}processes", MALFORMED_TRACE, "expected an object", dropped=0)
            raw_processes = {}
        for pid, p in raw_processes.items():
            try:
                processes[pid] = _decode_process(p, f"{prefix}processes.{pid}", report)
            except BadRecord as exc:
                report.problem(f"{prefix}processes.{pid}", exc.reason, exc.detail, dropped=0)
        for j, span in enumerate(spans):
            where = f"{prefix}spans[{j}]"
            try:
                out.append(_decode_span(span, where, processes, report))
            except BadRecord as exc:
                report.problem(where, exc.reason, exc.detail)
            except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # a wrong JSON type somewhere
                report.problem(where, MALFORMED_SPAN, f"{type(exc).__name__}: {exc}")
    report.counts[COUNT_SPANS] += len(out)
    return out


def loads(text: str, source: str = "<string>", report: ReadReport | None = None) -> list[Trace]:
    """Jaeger query API JSON text as traces (first-seen order, spans in file order)."""
    report = report if report is not None else ReadReport()
    return group_traces(_read_text(text, source, report))


def read(paths: Iterable[str | Path], report: ReadReport | None = None) -> list[Trace]:
    """Jaeger JSON files (plain or gzip) as traces, grouped by trace id across all files."""
    report = report if report is not None else ReadReport()
    spans: list[Span] = []
    for source, text in read_text_files(paths, report):
        spans.extend(_read_text(text, source, report))
    return group_traces(spans)


# --- write ---------------------------------------------------------------------------------------------------------


def jaeger_trace_id(value: str) -> str:
    """A canonical trace id as Jaeger writes it: hex kept as it is, anything else hashed to 32 hex."""
    return value if _LOWER_HEX.fullmatch(value) and len(value) <= 32 else hex_id(value, 16)


def jaeger_span_id(value: str) -> str:
    """A canonical span id as Jaeger writes it: hex kept as it is, anything else hashed to 16 hex."""
    return value if _LOWER_HEX.fullmatch(value) and len(value) <= 16 else hex_id(value, 8)


def _span_tags(span: Span) -> list[dict[str, Any]]:
    """The span's tags in the Collector's order; the span's own attributes win over derived tags."""
    attrs = span.attributes
    head = {k: v for k, v in scope_tags(span.scope).items() if k not in attrs}
    tail: dict[str, AttrValue] = {}
    for derived in (
        _kind_tags(span.kind),
        _status_tags(span.status, attrs),
        _trace_state_tags(span.trace_state),
    ):
        tail.update((k, v) for k, v in derived.items() if k not in attrs)
    return [_encode_tag(k, v) for part in (head, attrs, tail) for k, v in part.items()]


def _references(span: Span, trace_id: str) -> list[dict[str, str]]:
    refs = []
    if span.parent_id is not None:
        refs.append({"refType": CHILD_OF, "traceID": trace_id, "spanID": jaeger_span_id(span.parent_id)})
    for link in span.links:
        ref_type = CHILD_OF if link.attributes.get(ATTR_REF_TYPE) == REF_TYPE_TO_ATTR[CHILD_OF] else FOLLOWS_FROM
        refs.append(
            {"refType": ref_type, "traceID": jaeger_trace_id(link.trace_id), "spanID": jaeger_span_id(link.span_id)}
        )
    return refs


def _log(event: Event) -> dict[str, Any]:
    fields = [_encode_tag(k, v) for k, v in _event_fields(event.name, event.attributes).items()]
    fields.extend(_encode_tag(k, v) for k, v in event.attributes.items())
    return {"timestamp": event.time_ns // US, "fields": fields}


def _process_key(span: Span) -> tuple:
    attrs = span.resource.attributes if span.resource is not None else {}
    return (span.service, tuple((k, freeze(v)) for k, v in attrs.items() if k != SERVICE_NAME))


def _encode_trace(trace: Trace) -> dict[str, Any]:
    processes: dict[tuple, str] = {}
    process_objects: dict[str, dict[str, Any]] = {}
    spans = []
    for span in trace.spans:
        key = _process_key(span)
        pid = processes.get(key)
        if pid is None:
            pid = processes[key] = f"p{len(processes) + 1}"
            extras = span.resource.attributes if span.resource is not None else {}
            process_objects[pid] = {
                "serviceName": span.service,
                "tags": [_encode_tag(k, v) for k, v in extras.items() if k != SERVICE_NAME],
            }
        trace_id = jaeger_trace_id(span.trace_id)
        out: dict[str, Any] = {"traceID": trace_id, "spanID": jaeger_span_id(span.span_id)}
        if span.flags & SAMPLED_FLAG:
            out["flags"] = SAMPLED_FLAG
        out["operationName"] = span.name
        out["references"] = _references(span, trace_id)
        out["startTime"] = span.start_ns // US
        out["duration"] = span.end_ns // US - span.start_ns // US  # see "Times" in the module docstring
        out["tags"] = _span_tags(span)
        out["logs"] = [_log(e) for e in span.events]
        out["processID"] = pid
        out["warnings"] = None
        spans.append(out)
    return {"traceID": jaeger_trace_id(trace.trace_id), "spans": spans, "processes": process_objects, "warnings": None}


def encode(traces: Iterable[Trace]) -> dict[str, Any]:
    """Traces as a Jaeger query API response (JSON-ready objects)."""
    return {"data": [_encode_trace(t) for t in traces], "total": 0, "limit": 0, "offset": 0, "errors": None}


def dumps(traces: Iterable[Trace], indent: int | None = None) -> str:
    """Traces as Jaeger query API JSON text (ASCII-escaped, so any string survives any file encoding)."""
    return json.dumps(encode(traces), indent=indent)


def write(traces: list[Trace], path: Path) -> None:
    """Write traces as one Jaeger query API response, which the Jaeger UI opens (gzipped for ``.gz``)."""
    with open_write_text(Path(path)) as fh:
        fh.write(dumps(traces))
        fh.write("\n")
