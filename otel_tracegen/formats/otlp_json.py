"""OTLP JSON: the OTLP/HTTP ``application/json`` body and the OpenTelemetry Collector ``file`` exporter's lines.

Encoding (the OTLP specification, "JSON Protobuf Encoding")
    Protobuf JSON with OTLP's deviations: lowerCamelCase field names; trace and span ids as **hex** strings (not
    protobuf's base64); enums (``kind``, ``status.code``) as integers; 64-bit integers (``*TimeUnixNano``,
    ``intValue``) as decimal strings; ``bytesValue`` as base64; non-finite doubles as ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``. Fields at their default are left out, except ``status``, which is always
    written (``{}`` when unset), as the Collector and SDK do. Output is ASCII (``\\uXXXX`` escapes), so any
    string, even a lone surrogate, survives a round trip.

    One level of a document, as :func:`dumps` writes it::

        {"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"cart"}}]},
          "scopeSpans":[{"scope":{"name":"io.opentelemetry.grpc","version":"1.2"},
            "spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",
              "parentSpanId":"eee19b7ec3c1b173","name":"GetCart","kind":2,
              "startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000",
              "attributes":[{"key":"rpc.system","value":{"stringValue":"grpc"}}],"status":{}}]}]}]}

Reading is as lenient as protobuf JSON parsers: 64-bit integers as numbers or strings, enum values as numbers
or names (``"SPAN_KIND_SERVER"``), snake_case field names (``trace_id``), and, since some exporters used
protobuf's own JSON mapping, base64 ids (told apart from hex by their length). It also takes what real producers
wrap or name differently (each counted as a repair, and written back in the plain form):

- OTLP before 0.15 (the Collector's file exporter until 2022, older SDKs): ``instrumentationLibrarySpans`` with
  ``instrumentationLibrary`` in place of ``scopeSpans`` with ``scope`` (same fields);
- envelopes around a document: ``{"result": {...}}`` (each item of the Jaeger query API v3) and
  ``{"trace": {...}}`` (Tempo's API v2); Tempo's ``{"batches": [...]}`` for ``resourceSpans``; and a bare
  ``ResourceSpans`` object (``{"resource": ..., "scopeSpans": [...]}``) per line, as some SDK logging exporters
  write.

Files
    A file is one document (``{"resourceSpans": [...]}``, possibly pretty-printed, or a JSON array of them) or
    **JSON Lines**, one document per line, as the Collector file exporter writes. If the first non-blank line is
    a whole JSON object the file is JSON Lines and is read line by line (streaming, and a bad line costs only
    itself); otherwise it is parsed as one document, falling back to lines if that fails and some lines parse.
    :func:`write` writes JSON Lines, one trace per line, gzipped for ``*.gz``.

Problems are named ``file:line`` for JSON Lines (the position in the document goes in the detail) and
``file: resourceSpans[i].scopeSpans[j].spans[k]`` for a single document. The mapping to canonical spans is
shared with OTLP protobuf (:mod:`._otlp_common`) and done by hand on plain dicts from :func:`json.loads`:
protobuf's ``json_format`` would base64 the ids and is several times slower.
"""

from __future__ import annotations

import base64
import functools
import binascii
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..report import ReadReport, UserError
from ..trace import (
    STATUS_UNSET,
    AttrValue,
    Event,
    Link,
    Resource,
    Scope,
    Span,
    SpanKind,
    Trace,
    group_traces,
    iter_spans,
)
from ._io import open_text, open_write_text
from ._otlp_common import (
    BAD_LINK,
    BAD_PARENT_ID,
    BAD_SPAN_ID,
    BAD_TIME,
    BAD_TRACE_ID,
    DATA_ERRORS,
    I64_MAX,
    I64_MIN,
    MALFORMED_SPAN,
    REPAIR_DEPRECATED_SCOPE,
    REPAIR_ZERO_PARENT,
    SPAN_KINDS,
    U32_MAX,
    U64_MAX,
    ZERO_SPAN_ID,
    ZERO_TRACE_ID,
    BadRecord,
    coerce_value,
    group_spans,
    make_status,
    paused_gc,
    service_of,
    show,
    span_id_hex,
    span_kind,
    trace_id_hex,
)

__all__ = ["read", "write", "loads", "dumps", "decode_document", "encode_document"]

_DUMPS = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode  # compact; NaN never reaches it bare
MALFORMED_JSON = "malformed JSON"
NOT_OTLP = "not an OTLP traces document"
REPAIR_BASE64_ID = "base64 id"
REPAIR_ENVELOPE = "traces document in an envelope"
# {"result": doc} is one item of the Jaeger query API v3 (grpc-gateway) stream; {"trace": doc} Tempo's API v2.
_ENVELOPES = ("result", "trace")
_DOCUMENT_KEYS = ("resourceSpans", "resource_spans", "batches")
_RESOURCE_SPANS_KEYS = ("scopeSpans", "scope_spans", "instrumentationLibrarySpans", "instrumentation_library_spans")

# =====================================================================================================================
# Reading: JSON values -> canonical spans
# =====================================================================================================================

_is_hex = re.compile(r"[0-9a-fA-F]*").fullmatch
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _uint(value: Any, limit: int, what: str, reason: str = MALFORMED_SPAN) -> int:
    """An unsigned protobuf integer: a JSON number, or a decimal string (how 64-bit ones are sent)."""
    t = type(value)
    if t is str:
        try:
            n = int(value)
        except ValueError:
            raise BadRecord(reason, f"{what} {show(value)} is not an integer") from None
    elif t is int:
        n = value
    elif t is float and value.is_integer():
        n = int(value)
    else:
        raise BadRecord(reason, f"{what} {show(value)} is not an integer")
    if not 0 <= n <= limit:
        raise BadRecord(reason, f"{what} {show(value)} is out of range")
    return n


def _time(value: Any, what: str) -> int:
    return _uint(value, U64_MAX, what, BAD_TIME)


def _id(value: Any, nbytes: int, zero: str, field: str, reason: str, report: ReadReport) -> str:
    """A trace/span id: ``2*nbytes`` hex characters (any case), not all zero; or, leniently, base64 of ``nbytes``."""
    if type(value) is str and len(value) == 2 * nbytes and _is_hex(value):
        low = value.lower()
        if low != zero:
            return low
        raise BadRecord(reason, f"{field} is all zeros")
    raw = _base64_id(value, nbytes)
    if raw is None:
        raise BadRecord(reason, f"{field} {show(value)} is not {nbytes} bytes of hex")
    if not any(raw):
        raise BadRecord(reason, f"{field} is all zeros")
    report.repair(REPAIR_BASE64_ID)
    return raw.hex()


def _base64_id(value: Any, nbytes: int) -> bytes | None:
    """``value`` decoded as base64 (standard or URL-safe) if it is exactly ``nbytes`` long that way."""
    if type(value) is not str or len(value) != 4 * ((nbytes + 2) // 3):  # 24 characters for 16 bytes, 12 for 8
        return None
    try:
        raw = base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == nbytes else None


def _link_id(value: Any, nbytes: int, field: str, report: ReadReport) -> str:
    """A link id only needs the right length: links to invalid (all-zero) contexts are allowed, and an empty or
    absent id is the all-zero one (the Collector writes ``""`` for it)."""
    if type(value) is str and len(value) == 2 * nbytes and _is_hex(value):
        return value.lower()
    if value is None or value == "":
        return "0" * (2 * nbytes)
    raw = _base64_id(value, nbytes)
    if raw is None:
        raise BadRecord(BAD_LINK, f"link {field} {show(value)} is not {nbytes} bytes of hex")
    report.repair(REPAIR_BASE64_ID)
    return raw.hex()


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise BadRecord(MALFORMED_SPAN, f"{what} {show(value)} is not a string")
    return value


def _int64(value: Any) -> int:
    t = type(value)
    n = int(value) if t is str or (t is float and value.is_integer()) else value if t is int else None
    if n is None or not I64_MIN <= n <= I64_MAX:
        raise BadRecord(MALFORMED_SPAN, f"intValue {show(value)} is not a 64-bit integer")
    return n


def _double(value: Any) -> float:
    t = type(value)
    if t is float or t is int:
        return float(value)
    if t is str:
        special = _NON_FINITE.get(value)
        return special if special is not None else float(value)
    raise BadRecord(MALFORMED_SPAN, f"doubleValue {show(value)} is not a number")


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise BadRecord(MALFORMED_SPAN, f"boolValue {show(value)} is not true or false")
    return value


def _bytes(value: Any) -> bytes:
    # protobuf JSON accepts standard or URL-safe base64, padded or not
    s = _str(value, "bytesValue").replace("-", "+").replace("_", "/")
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)


def _array(value: Any) -> list:
    values = value.get("values") if value else None
    return [_decode_value(v) for v in values] if values else []


def _kvlist(value: Any) -> dict:
    values = value.get("values") if value else None
    return _decode_attributes(values) if values else {}


# AnyValue member -> decoder of its JSON value (snake_case members are renamed before they get here).
_VALUE_DECODERS = {
    "stringValue": lambda v: _str(v, "stringValue"),
    "boolValue": _bool,
    "intValue": _int64,
    "doubleValue": _double,
    "arrayValue": _array,
    "kvlistValue": _kvlist,
    "bytesValue": _bytes,
}


@functools.lru_cache(maxsize=256)
def _camel_key(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _camel_case(value: Any) -> Any:
    """``value`` with every object key in lowerCamelCase (``trace_id`` -> ``traceId``).

    Protobuf JSON parsers accept a field's proto name as well as its JSON name. Rather than look up both names
    of every field of every span, the decoder reads camelCase only and converts what is spelled the other way:
    a whole document whose top level says ``resource_spans``, or a single span that says ``trace_id``. Attribute
    keys are values (``{"key": "http.status_code"}``), so they are untouched.
    """
    if type(value) is dict:
        return {_camel_key(k) if type(k) is str and "_" in k else k: _camel_case(v) for k, v in value.items()}
    if type(value) is list:
        return [_camel_case(v) for v in value]
    return value


def _decode_value(value: Any) -> AttrValue:
    """An ``AnyValue`` object: exactly one member, or none (``{}``) for the empty value."""
    if not value:
        return None
    ((member, v),) = value.items()  # ValueError when several members are set, as in protobuf
    if member == "stringValue" and type(v) is str:
        return v
    decoder = _VALUE_DECODERS.get(member)
    if decoder is None:
        raise BadRecord(MALFORMED_SPAN, f"AnyValue member {member!r} is not supported in traces")
    return decoder(v)


def _decode_attributes(key_values: Any) -> dict[str, AttrValue]:
    out: dict[str, AttrValue] = {}
    for kv in key_values:
        key = kv.get("key", "")  # absent when empty, as protobuf JSON writers leave out default values
        if type(key) is not str:
            raise BadRecord(MALFORMED_SPAN, f"attribute key {show(key)} is not a string")
        value = kv.get("value")
        # most attribute values are strings: take them without the general call
        text = value.get("stringValue") if type(value) is dict and len(value) == 1 else None
        out[key] = text if type(text) is str else _decode_value(value)
    return out


def _count(d: dict, field: str) -> int:
    v = d.get(field)
    return _uint(v, U32_MAX, field) if v else 0


def _decode_resource(rs: dict) -> Resource:
    schema_url = _str(rs.get("schemaUrl") or "", "schemaUrl")
    res = rs.get("resource")
    if not res:
        return Resource({}, 0, schema_url)
    attrs = res.get("attributes")
    return Resource(
        _decode_attributes(attrs) if attrs else {},
        _count(res, "droppedAttributesCount"),
        schema_url,
    )


def _decode_scope(ss: dict) -> Scope | None:
    schema_url = _str(ss.get("schemaUrl") or "", "schemaUrl")
    sc = ss.get("scope")
    if sc is None:
        sc = ss.get("instrumentationLibrary")  # OTLP < 0.15: same name and version fields
    if sc is None:
        return Scope(schema_url=schema_url) if schema_url else None
    attrs = sc.get("attributes")
    return Scope(
        _str(sc.get("name") or "", "scope name"),
        _str(sc.get("version") or "", "scope version"),
        _decode_attributes(attrs) if attrs else {},
        _count(sc, "droppedAttributesCount"),
        schema_url,
    )


def _decode_event(ev: dict) -> Event:
    attrs = ev.get("attributes")
    return Event(
        _time(ev.get("timeUnixNano") or 0, "event timeUnixNano"),
        _str(ev.get("name") or "", "event name"),
        _decode_attributes(attrs) if attrs else {},
        _count(ev, "droppedAttributesCount"),
    )


def _decode_link(ln: dict, report: ReadReport) -> Link:
    attrs = ln.get("attributes")
    try:
        return Link(
            _link_id(ln.get("traceId"), 16, "traceId", report),
            _link_id(ln.get("spanId"), 8, "spanId", report),
            _str(ln.get("traceState") or "", "link traceState"),
            _decode_attributes(attrs) if attrs else {},
            _count(ln, "droppedAttributesCount"),
            _uint(ln.get("flags") or 0, U32_MAX, "link flags"),
        )
    except BadRecord as e:
        raise BadRecord(BAD_LINK, e.detail) from None
    except DATA_ERRORS as e:
        raise BadRecord(BAD_LINK, f"{type(e).__name__}: {e}") from None


def _decode_span(
    sp: dict, service: str, resource: Resource, scope: Scope | None, report: ReadReport, bad_links: list[str]
) -> Span:
    """One span object. Raises :class:`BadRecord` (or a ``DATA_ERRORS`` member on a wrong JSON type) to drop it;
    appends links it drops to ``bad_links``."""
    if "traceId" not in sp and "trace_id" in sp:
        sp = _camel_case(sp)
    get = sp.get
    trace_id = _id(get("traceId"), 16, ZERO_TRACE_ID, "traceId", BAD_TRACE_ID, report)
    span_id = _id(get("spanId"), 8, ZERO_SPAN_ID, "spanId", BAD_SPAN_ID, report)
    parent: str | None = None
    pid = get("parentSpanId")
    if pid:
        if pid == ZERO_SPAN_ID:
            report.repair(REPAIR_ZERO_PARENT)
        else:
            parent = _id(pid, 8, ZERO_SPAN_ID, "parentSpanId", BAD_PARENT_ID, report)
    kind = get("kind")
    if kind:
        kind = SPAN_KINDS.get(kind) or span_kind(kind, report)
    else:
        kind = SpanKind.UNSPECIFIED
    status = get("status")
    if status:
        status = make_status(status.get("code") or 0, status.get("message") or "", report)
    else:
        status = STATUS_UNSET
    attrs = get("attributes")
    events = get("events")
    links = get("links")
    dropped_links = _count(sp, "droppedLinksCount")
    link_list: list[Link] = []
    if links:
        for ln in links:
            try:
                link_list.append(_decode_link(ln, report))
            except BadRecord as e:
                bad_links.append(e.detail)
                dropped_links += 1
    flags = get("flags")
    return Span(
        trace_id,
        span_id,
        parent,
        service,
        _str(get("name") or "", "name"),
        _time(get("startTimeUnixNano") or 0, "startTimeUnixNano"),
        _time(get("endTimeUnixNano") or 0, "endTimeUnixNano"),
        kind,
        status,
        _decode_attributes(attrs) if attrs else {},
        resource,
        scope,
        [_decode_event(e) for e in events] if events else [],
        link_list,
        _str(get("traceState") or "", "traceState"),
        _uint(flags, U32_MAX, "flags") if flags else 0,
        _count(sp, "droppedAttributesCount"),
        _count(sp, "droppedEventsCount"),
        dropped_links,
    )


def _span_count(container: Any, *path: str) -> int:
    """Best-effort number of spans under a malformed container, for the dropped counter (at least 1)."""
    try:
        if not path:
            return max(1, len(container.get("spans") or ()))
        return max(1, sum(_span_count(c, *path[1:]) for c in container.get(path[0]) or ()))
    except DATA_ERRORS:
        return 1


def decode_document(
    doc: Any, report: ReadReport | None = None, where: str = "document", line: int | None = None
) -> list[Span]:
    """Canonical spans of one parsed document (``{"resourceSpans": [...]}``, or a list of them).

    Bad spans go to ``report``: as ``"<where>:<line>"`` with the position in the detail when ``line`` is given
    (JSON Lines), else as ``"<where>: resourceSpans[i].scopeSpans[j].spans[k]"``. The others are kept.
    """
    report = report if report is not None else ReadReport()
    if type(doc) is list:
        out: list[Span] = []
        for n, d in enumerate(doc):
            out.extend(_decode_document(d, report, where, line, f"[{n}]."))
        return out
    return _decode_document(doc, report, where, line, "")


def _unwrap(doc: dict, report: ReadReport) -> dict:
    """A document that real producers wrap or name differently, as a plain ``{"resourceSpans": ...}`` one (see
    the module doc); ``doc`` itself when it is none of those."""
    for key in _ENVELOPES:
        inner = doc.get(key)
        if type(inner) is dict and any(k in inner for k in _DOCUMENT_KEYS):
            report.repair(REPAIR_ENVELOPE)
            doc = inner
            break
    if "resourceSpans" in doc or "resource_spans" in doc:
        return doc
    if "batches" in doc:  # Tempo's name for resourceSpans
        report.repair(REPAIR_ENVELOPE)
        return {"resourceSpans" if k == "batches" else k: v for k, v in doc.items()}
    if any(k in doc for k in _RESOURCE_SPANS_KEYS):  # one bare ResourceSpans
        report.repair(REPAIR_ENVELOPE)
        return {"resourceSpans": [doc]}
    return doc


def _decode_document(doc: Any, report: ReadReport, where: str, line: int | None, prefix: str) -> list[Span]:
    def problem(path: str, reason: str, detail: str, dropped: int = 1) -> None:
        path = prefix + path if path else prefix.rstrip(".")
        if line is None:
            report.problem(f"{where}: {path}" if path else where, reason, detail, dropped=dropped)
        else:
            report.problem(f"{where}:{line}", reason, f"{path}: {detail}" if path else detail, dropped=dropped)

    if type(doc) is not dict:
        problem("", NOT_OTLP, f"a JSON {type(doc).__name__}, not an object")
        return []
    if "resourceSpans" not in doc:
        doc = _unwrap(doc, report)
    if "resource_spans" in doc:  # protobuf JSON parsers accept the proto field names too
        doc = _camel_case(doc)
    rss = doc.get("resourceSpans")
    if not rss:
        if rss is None and doc:  # {} is an empty request; anything else without resourceSpans is not traces
            problem("", NOT_OTLP, f"no resourceSpans; keys: {', '.join(map(str, list(doc)[:5]))}")
        return []
    if type(rss) is not list:
        problem("resourceSpans", NOT_OTLP, "resourceSpans is not a list")
        return []

    out: list[Span] = []
    append = out.append
    bad_links: list[str] = []
    for i, rs in enumerate(rss):
        deprecated = False
        try:
            if "scope_spans" in rs or "instrumentation_library_spans" in rs:
                rs = _camel_case(rs)
            resource = _decode_resource(rs)
            sss = rs.get("scopeSpans")
            if sss is None and "instrumentationLibrarySpans" in rs:  # OTLP < 0.15
                sss, deprecated = rs["instrumentationLibrarySpans"], True
            sss = sss or []
            if type(sss) is not list:
                raise BadRecord("invalid resourceSpans", "scopeSpans is not a list")
        except (BadRecord, *DATA_ERRORS) as e:
            detail = e.detail if isinstance(e, BadRecord) else f"{type(e).__name__}: {e}"
            n = _span_count(rs, "scopeSpans") if isinstance(rs, dict) else 1
            problem(f"resourceSpans[{i}]", "invalid resource", detail, dropped=n)
            continue
        service, repair = service_of(resource)
        for j, ss in enumerate(sss):
            try:
                scope = _decode_scope(ss)
                spans = ss.get("spans") or []
                if type(spans) is not list:
                    raise BadRecord("invalid scopeSpans", "spans is not a list")
            except (BadRecord, *DATA_ERRORS) as e:
                detail = e.detail if isinstance(e, BadRecord) else f"{type(e).__name__}: {e}"
                problem(
                    f"resourceSpans[{i}].scopeSpans[{j}]",
                    "invalid scope",
                    detail,
                    dropped=_span_count(ss) if isinstance(ss, dict) else 1,
                )
                continue
            kept_before = len(out)
            for k, sp in enumerate(spans):
                try:
                    append(_decode_span(sp, service, resource, scope, report, bad_links))
                except BadRecord as e:
                    problem(f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]", e.reason, e.detail)
                    bad_links.clear()  # the span is dropped, and its links with it
                    continue
                except DATA_ERRORS as e:  # a wrong JSON type somewhere in the span
                    problem(
                        f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]", MALFORMED_SPAN, f"{type(e).__name__}: {e}"
                    )
                    bad_links.clear()
                    continue
                if bad_links:
                    for detail in bad_links:
                        problem(
                            f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]",
                            BAD_LINK,
                            detail + " (link dropped, span kept)",
                            0,
                        )
                    bad_links.clear()
            if repair and len(out) > kept_before:
                report.repair(repair, len(out) - kept_before)
            if deprecated and len(out) > kept_before:
                report.repair(REPAIR_DEPRECATED_SCOPE, len(out) - kept_before)
    return out


def _decode_lines(lines: Iterable[tuple[int, str]], report: ReadReport, where: str) -> tuple[list[Span], int]:
    """``(spans, lines that parsed)`` of numbered JSON Lines; a line that is not JSON is one problem."""
    spans: list[Span] = []
    parsed = 0
    for lineno, text in lines:
        if not text or text.isspace():
            continue
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:
            report.problem(f"{where}:{lineno}", MALFORMED_JSON, str(e))
            continue
        parsed += 1
        spans.extend(decode_document(doc, report, where, lineno))
    return spans, parsed


def _loads_text(text: str, report: ReadReport, where: str, first_line: int = 1) -> list[Span]:
    """A whole text that is one document or JSON Lines (line numbers counted from ``first_line``)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        # JSON Lines (the error is "Extra data" after the first line) or a broken document: try the lines, and
        # if none of them parses it was one document, so report its one error rather than one per line
        trial = ReadReport(max_problems=report.max_problems)
        spans, parsed = _decode_lines(enumerate(text.splitlines(), first_line), trial, where)
        if parsed:
            report.merge(trial)
            return spans
        lineno = getattr(e, "lineno", None)
        report.problem(
            f"{where}:{lineno + first_line - 1}" if lineno else where, MALFORMED_JSON, getattr(e, "msg", str(e))
        )
        return []
    return decode_document(doc, report, where)


def loads(text: str | bytes, report: ReadReport | None = None, where: str = "document") -> list[Span]:
    """Canonical spans of an OTLP/HTTP JSON body or a file's text: one document, or JSON Lines."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "replace")
    if text.startswith("\ufeff"):  # a byte order mark
        text = text[1:]
    with paused_gc():
        return _loads_text(text, report if report is not None else ReadReport(), where)


def _read_file(path: Path, report: ReadReport) -> list[Span]:
    where = str(path)
    try:
        f = open_text(path)
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    spans: list[Span] = []
    try:
        with f:
            lines: Iterator[tuple[int, str]] = enumerate(f, 1)
            for lineno, first in lines:
                if lineno == 1 and first.startswith("\ufeff"):  # a byte order mark, as Windows tools write
                    first = first[1:]
                if first and not first.isspace():
                    break
            else:
                return spans
            try:
                doc = json.loads(first)
            except (ValueError, RecursionError):
                doc = None
            if type(doc) is dict:  # a whole object on the first line: JSON Lines, read as a stream
                spans.extend(decode_document(doc, report, where, lineno))
                more, _ = _decode_lines(lines, report, where)
                spans.extend(more)
            else:
                spans.extend(_loads_text(first + f.read(), report, where, lineno))
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz: keep what was read before it
        report.problem(where, "unreadable file", f"{type(e).__name__}: {e}", dropped=0)
    return spans


def read(paths: list[Path], report: ReadReport | None = None) -> list[Trace]:
    """Every span of every file (``.gz`` transparently), grouped into traces by trace id."""
    report = report if report is not None else ReadReport()
    spans: list[Span] = []
    with paused_gc():
        for path in paths:
            spans.extend(_read_file(Path(path), report))
            report.counts["files read"] += 1
        report.counts["spans read"] += len(spans)
        return group_traces(spans)


# =====================================================================================================================
# Writing: canonical spans -> JSON values
# =====================================================================================================================


def _encode_value(value: Any) -> dict:
    """An ``AnyValue`` object (``{}`` for ``None``)."""
    t = type(value)
    if t is str:
        return {"stringValue": value}
    if t is bool:
        return {"boolValue": value}
    if t is int:
        if I64_MIN <= value <= I64_MAX:
            return {"intValue": str(value)}
        return {"stringValue": str(value)}  # beyond int64: keep the digits, as a string (as the proto writer does)
    if t is float:
        if math.isfinite(value):
            return {"doubleValue": value}
        return {"doubleValue": "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")}
    if value is None:
        return {}
    if t is bytes:
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if t is list or t is tuple:
        return {"arrayValue": {"values": [_encode_value(v) for v in value]} if value else {}}
    if t is dict:
        return {"kvlistValue": {"values": _encode_attributes(value)} if value else {}}
    return _encode_value(coerce_value(value))


def _encode_attributes(attributes: dict[str, AttrValue]) -> list[dict]:
    return [{"key": k if type(k) is str else str(k), "value": _encode_value(v)} for k, v in attributes.items()]


def _encode_resource(resource: Resource) -> dict:
    out: dict[str, Any] = {}
    if resource.attributes:
        out["attributes"] = _encode_attributes(resource.attributes)
    if resource.dropped_attributes_count:
        out["droppedAttributesCount"] = resource.dropped_attributes_count
    return out


def _encode_scope(scope: Scope) -> dict:
    out: dict[str, Any] = {}
    if scope.name:
        out["name"] = scope.name
    if scope.version:
        out["version"] = scope.version
    if scope.attributes:
        out["attributes"] = _encode_attributes(scope.attributes)
    if scope.dropped_attributes_count:
        out["droppedAttributesCount"] = scope.dropped_attributes_count
    return out


def _encode_event(event: Event) -> dict:
    out: dict[str, Any] = {"timeUnixNano": str(event.time_ns), "name": event.name}
    if event.attributes:
        out["attributes"] = _encode_attributes(event.attributes)
    if event.dropped_attributes_count:
        out["droppedAttributesCount"] = event.dropped_attributes_count
    return out


def _encode_link(link: Link) -> dict:
    out: dict[str, Any] = {"traceId": trace_id_hex(link.trace_id), "spanId": span_id_hex(link.span_id)}
    if link.trace_state:
        out["traceState"] = link.trace_state
    if link.attributes:
        out["attributes"] = _encode_attributes(link.attributes)
    if link.dropped_attributes_count:
        out["droppedAttributesCount"] = link.dropped_attributes_count
    if link.flags:
        out["flags"] = link.flags & U32_MAX
    return out


def _encode_status(status) -> dict:
    out: dict[str, Any] = {}
    if status.message:
        out["message"] = status.message
    if status.code:
        out["code"] = int(status.code)
    return out


_STATUS_OBJECTS = {0: {}, 1: {"code": 1}, 2: {"code": 2}}  # shared: json.dumps does not mind


def _encode_span(span: Span) -> dict:
    """A span object, keys in field-number order as the Collector writes them."""
    out: dict[str, Any] = {"traceId": trace_id_hex(span.trace_id), "spanId": span_id_hex(span.span_id)}
    if span.trace_state:
        out["traceState"] = span.trace_state
    if span.parent_id is not None:
        out["parentSpanId"] = span_id_hex(span.parent_id)
    if span.flags:
        out["flags"] = span.flags & U32_MAX
    out["name"] = span.name
    if span.kind:
        out["kind"] = int(span.kind)
    out["startTimeUnixNano"] = str(span.start_ns)
    out["endTimeUnixNano"] = str(span.end_ns)
    if span.attributes:
        out["attributes"] = _encode_attributes(span.attributes)
    if span.dropped_attributes_count:
        out["droppedAttributesCount"] = span.dropped_attributes_count
    if span.events:
        out["events"] = [_encode_event(e) for e in span.events]
    if span.dropped_events_count:
        out["droppedEventsCount"] = span.dropped_events_count
    if span.links:
        out["links"] = [_encode_link(ln) for ln in span.links]
    if span.dropped_links_count:
        out["droppedLinksCount"] = span.dropped_links_count
    status = span.status
    out["status"] = (
        _encode_status(status) if status.message else _STATUS_OBJECTS.get(status.code) or _encode_status(status)
    )
    return out


def encode_document(spans: Iterable[Span], _cache: dict | None = None) -> dict:
    """``{"resourceSpans": [...]}`` for ``spans``, grouped by resource then scope in first-seen order.

    ``_cache`` (resource/scope key -> encoded object) lets a writer encode each distinct resource and scope once
    across many documents.
    """
    cache = _cache if _cache is not None else {}
    resource_spans = []
    for rkey, resource, scope_groups in group_spans(spans):
        enc = cache.get(("r", rkey))
        if enc is None:
            enc = cache[("r", rkey)] = _encode_resource(resource)
        scope_spans = []
        for skey, scope, group in scope_groups:
            ss: dict[str, Any] = {}
            if scope is not None:
                enc_scope = cache.get(("s", skey))
                if enc_scope is None:
                    enc_scope = cache[("s", skey)] = _encode_scope(scope)
                ss["scope"] = enc_scope
            ss["spans"] = [_encode_span(s) for s in group]
            if scope is not None and scope.schema_url:
                ss["schemaUrl"] = scope.schema_url
            scope_spans.append(ss)
        rs: dict[str, Any] = {"resource": enc, "scopeSpans": scope_spans}
        if resource.schema_url:
            rs["schemaUrl"] = resource.schema_url
        resource_spans.append(rs)
    return {"resourceSpans": resource_spans}


def dumps(spans: Iterable[Span]) -> str:
    """One compact OTLP JSON document (no newline) holding ``spans``: an OTLP/HTTP JSON body."""
    with paused_gc():
        return _DUMPS(encode_document(spans))


def write(traces: list[Trace], path: Path, *, lines: bool = True) -> None:
    """Write ``traces`` to ``path`` (gzipped when it ends in ``.gz``).

    ``lines=True`` (default): JSON Lines, one document per trace, as the Collector file exporter writes (one per
    batch) and readers can stream. ``lines=False``: one document holding every span.
    """
    with open_write_text(Path(path)) as f, paused_gc():
        if not lines:
            f.write(dumps(iter_spans(traces)))
            f.write("\n")
            return
        cache: dict = {}
        for trace in traces:
            if trace.spans:
                f.write(_DUMPS(encode_document(trace.spans, cache)))
                f.write("\n")
