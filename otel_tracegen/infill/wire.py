"""OTLP trace requests as the infill receiver holds them: each span with the exact bytes it arrived in.

"Valid spans pass through unchanged, byte for byte": a span the receiver does not repair is forwarded as the very
``Span`` message it received, inside the very ``Resource`` and ``InstrumentationScope`` messages it came with. The
canonical :class:`~otel_tracegen.trace.Span` (decoded by the OTLP protobuf adapter, with the same rules for bad
records) is what detection and repair read; the bytes are what is sent on.

A span that *is* repaired is edited at the wire level (:func:`edit_span`): the fields that change (the parent id,
the times, the name) are dropped and written anew, and the repair attributes are appended as ``KeyValue``\\ s, so
everything the receiver does not understand (unknown fields, events, links, flags) stays as it came. Spans the
receiver makes (a lost parent, a missing root) are encoded from canonical spans.

OTLP/JSON bodies have no protobuf bytes: their spans are encoded once on arrival with the protobuf adapter's
encoder, which writes what the SDK would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..formats import otlp_json, otlp_proto
from ..formats._otlp_common import (DATA_ERRORS, MALFORMED_SPAN, length_delimited, paused_gc, read_varint,
                                    span_id_hex, varint)
from ..report import ReadReport
from ..trace import SERVICE_NAME, AttrValue, Span

ResourceKey = tuple[bytes | None, str]
"""A ``Resource`` message's bytes (None: the ``ResourceSpans`` had none) and the ``ResourceSpans.schema_url``."""
ScopeKey = tuple[bytes | None, str]
"""An ``InstrumentationScope`` message's bytes (None: none) and the ``ScopeSpans.schema_url``."""

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
SPAN_OBJECT_BYTES = 900
"""What a decoded span costs in memory beyond ~3x its message: its :class:`WireSpan`, canonical :class:`Span`,
attribute dict and strings (measured with tracemalloc on real traces: 1.1-1.9 KB a span of 90-340 bytes)."""


def held_bytes(w: WireSpan) -> int:
    """What holding ``w`` costs in memory, as the buffer counts it against its bound."""
    return SPAN_OBJECT_BYTES + 3 * len(w.raw)


@dataclass(slots=True)
class WireSpan:
    """One received span: ``span`` to reason about, ``raw`` (its ``Span`` message) and the messages around it to
    forward."""

    span: Span
    raw: bytes
    resource: ResourceKey
    scope: ScopeKey


class MalformedRequest(ValueError):
    """A body that is not an ``ExportTraceServiceRequest`` at all (OTLP: ``INVALID_ARGUMENT`` / HTTP 400)."""


def decode(body: bytes, content_type: str = PROTOBUF, report: ReadReport | None = None) -> list[WireSpan]:
    """The valid spans of one OTLP/gRPC or OTLP/HTTP body (protobuf or JSON). Malformed spans go to ``report``
    (named by their place in the request) and the rest are kept, also where the body breaks a rule of protobuf
    (invalid UTF-8, a field running past its end, nesting deeper than parsers take) inside one span; a body that
    is not a request at all raises :class:`MalformedRequest` saying why."""
    report = report if report is not None else ReadReport()
    if is_json(content_type):
        return _decode_json(body, report)
    body = bytes(body)
    keep: list = []
    error = otlp_proto._parses(body)
    with paused_gc():
        if error is None:  # the common case: upb parsed it whole, so the hand walk needs no checks
            otlp_proto._decode_request_bytes(body, report, "request: ", keep=keep)
        else:
            before = report.total_dropped, report.dropped[otlp_proto.MALFORMED_MESSAGE]
            try:
                otlp_proto.decode_request_checked(body, report, "request: ", keep)
            except DATA_ERRORS as e:
                raise MalformedRequest(f"the body is not an OTLP ExportTraceServiceRequest: {error} ({e})") from None
            # Nothing usable and the framing itself broke (or nothing at all was found): not a request. Well-framed
            # spans that are each bad are a partial success with every span rejected, each named.
            if not keep and (report.total_dropped == before[0]
                             or report.dropped[otlp_proto.MALFORMED_MESSAGE] > before[1]):
                raise MalformedRequest(f"the body is not an OTLP ExportTraceServiceRequest: {error}")
    return [WireSpan(span, raw, resource, scope) for span, raw, resource, scope in keep]


_JSON_RECORD = b"\x00otlp-json\x00"
"""Marks a write-ahead-log record holding an OTLP/JSON body. A protobuf request never starts with a zero byte
(field number 0 does not exist), so records without it are protobuf bodies, as the log held before."""


def log_record(body: bytes, content_type: str = PROTOBUF) -> bytes:
    """The write-ahead-log record of a request body as it came (decompressed): replay decodes it again exactly as
    the receiver did when it answered, so what was acknowledged is what comes back."""
    return _JSON_RECORD + bytes(body) if is_json(content_type) else bytes(body)


def read_log_record(record: bytes) -> tuple[bytes, str]:
    """``(body, content type)`` of a :func:`log_record`."""
    if record.startswith(_JSON_RECORD):
        return record[len(_JSON_RECORD) :], JSON
    return record, PROTOBUF


def is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == JSON


def _decode_json(body: bytes, report: ReadReport) -> list[WireSpan]:
    raw = bytes(body)
    valid_utf8 = True
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        valid_utf8 = False
        # Invalid UTF-8 inside one string must cost that span only: keep the bad bytes as lone surrogates,
        # which no span can be encoded with (checked span by span in from_spans).
        text = raw.decode("utf-8", "surrogateescape")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise MalformedRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise MalformedRequest(f"the body is JSON {type(doc).__name__}, not an ExportTraceServiceRequest object")
    rss = doc.get("resourceSpans", doc.get("resource_spans"))
    if rss is not None and not isinstance(rss, list):
        raise MalformedRequest(f"resourceSpans is a JSON {type(rss).__name__}, not a list of ResourceSpans")
    if rss is None and doc:
        raise MalformedRequest(f"no resourceSpans in the object (keys: {', '.join(map(str, list(doc)[:5]))})")
    with paused_gc():
        spans = from_spans(otlp_json.decode_document(doc, report, "request"), report)
        if valid_utf8 and otlp_proto._parses(encode(spans)) is None:
            return spans  # the common case: valid UTF-8, and the encoding parses whole
        kept = []
        for w in spans:  # name the spans that cannot be carried on; keep the rest
            if error := _unencodable(w):
                report.problem(f"request: span {w.span.span_id}", MALFORMED_SPAN, error)
            else:
                kept.append(w)
        return kept


def from_spans(spans: Iterable[Span], report: ReadReport | None = None) -> list[WireSpan]:
    """Canonical spans as received spans (encoded as the SDK would), e.g. spans read from a file or an OTLP/JSON
    request. With ``report``, a span that cannot be encoded goes there instead of raising."""
    cache: dict = {}
    resources: dict[int, ResourceKey] = {}
    scopes: dict[int, ScopeKey] = {}
    out = []
    with paused_gc():
        for s in spans:
            try:
                r = s.resource_or_default()
                rk = resources.get(id(r))
                if rk is None:
                    rk = resources[id(r)] = (otlp_proto._encode_resource(r, cache), r.schema_url)
                if s.scope is None:
                    sk: ScopeKey = (None, "")
                else:
                    sk = scopes.get(id(s.scope))  # type: ignore[assignment]
                    if sk is None:
                        sk = scopes[id(s.scope)] = (otlp_proto._encode_scope(s.scope, cache), s.scope.schema_url)
                w = WireSpan(s, otlp_proto._encode_span(s, cache), rk, sk)
            except DATA_ERRORS as e:
                if report is None:
                    raise
                report.problem(f"request: span {s.span_id}", MALFORMED_SPAN, f"{type(e).__name__}: {e}")
                continue
            out.append(w)
    return out


def _unencodable(w: WireSpan) -> str | None:
    """Why ``w``'s encoding would not parse at its place in a request, or None. The encoder writes a lone
    surrogate (a JSON string that was not UTF-8) as "?", so those are looked for in the canonical span."""
    error = otlp_proto._nested_error(w.raw, otlp_proto._AT_SPAN) or otlp_proto._nested_error(
        w.resource[0], otlp_proto._AT_RESOURCE)
    if error:
        return error
    if _has_surrogate(w.span):
        return "a string that is not valid UTF-8"
    return None


def _has_surrogate(span: Span) -> bool:
    def bad(v) -> bool:
        if type(v) is str:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
            return False
        if type(v) is dict:
            return any(bad(k) or bad(x) for k, x in v.items())
        if type(v) in (list, tuple):
            return any(bad(x) for x in v)
        return False

    parts = [span.name, span.service, span.trace_state, span.status.message, span.attributes,
             span.resource_or_default().attributes]
    parts += [(e.name, e.attributes) for e in span.events] + [(ln.trace_state, ln.attributes) for ln in span.links]
    if span.scope is not None:
        parts += [span.scope.name, span.scope.version, span.scope.attributes]
    return bad(parts)


_SPAN_PREFIXES: dict[int, bytes] = {}  # span message length -> its field's tag and length (sizes repeat)


def encode(spans: Iterable[WireSpan | RawSpan]) -> bytes:
    """One ``ExportTraceServiceRequest`` of ``spans``, grouped by resource then scope in first-seen order (spans
    in their given order within a group), every message written with the bytes it holds."""
    groups: dict[ResourceKey, dict[ScopeKey, list[bytes]]] = {}
    for w in spans:
        groups.setdefault(w.resource, {}).setdefault(w.scope, []).append(w.raw)
    out = []
    prefixes = _SPAN_PREFIXES
    for (resource, resource_schema), scopes in groups.items():
        rs = [] if resource is None else [length_delimited(b"\x0a", resource)]
        for (scope, scope_schema), raws in scopes.items():
            ss = [] if scope is None else [length_delimited(b"\x0a", scope)]
            for raw in raws:  # tag and length, then the span as it came: no copy of the span per field
                n = len(raw)
                prefix = prefixes.get(n)
                if prefix is None:
                    prefix = b"\x12" + varint(n)
                    if n < 65536:  # bounded: one entry per length
                        prefixes[n] = prefix
                ss.append(prefix)
                ss.append(raw)
            if scope_schema:
                ss.append(length_delimited(b"\x1a", scope_schema.encode()))
            rs.append(length_delimited(b"\x12", b"".join(ss)))
        if resource_schema:
            rs.append(length_delimited(b"\x1a", resource_schema.encode()))
        out.append(length_delimited(b"\x0a", b"".join(rs)))
    return b"".join(out)


@dataclass(slots=True)
class RawSpan:
    """A span of a serialized request as its bytes (a view into the request), with its trace id and the messages
    around it: what :func:`encode` needs, without decoding the span (its attributes may be megabytes)."""

    trace_id: bytes
    raw: memoryview
    resource: ResourceKey
    scope: ScopeKey


def raw_spans(body: bytes) -> list[RawSpan]:
    """The spans of a serialized request (one this receiver encoded: well-formed), by their bytes."""
    view = memoryview(body)
    out: list[RawSpan] = []
    for tag, a, b in otlp_proto._fields(body, 0, len(body)):
        if tag != 0x0A:  # ResourceSpans
            continue
        resource, scopes, schema = _parts(body, view, a, b)
        for c, d in scopes:  # ScopeSpans
            scope, spans, scope_schema = _parts(body, view, c, d)
            for e, f in spans:
                trace_id = next((bytes(view[g:h]) for t, g, h in otlp_proto._fields(body, e, f) if t == 0x0A), b"")
                out.append(RawSpan(trace_id, view[e:f], (resource, schema), (scope, scope_schema)))
    return out


def _parts(body: bytes, view: memoryview, start: int, end: int) -> tuple[bytes | None, list[tuple[int, int]], str]:
    """A ``ResourceSpans`` or ``ScopeSpans`` message: its field 1 (the resource or scope), where its field 2
    messages are (scope spans or spans), and its schema URL (field 3)."""
    first, children, schema = None, [], ""
    for tag, a, b in otlp_proto._fields(body, start, end):
        if tag == 0x0A:
            first = bytes(view[a:b])
        elif tag == 0x12:
            children.append((a, b))
        elif tag == 0x1A:
            schema = bytes(view[a:b]).decode()
    return first, children, schema


def count_spans(body: bytes) -> int:
    """Spans in a serialized request (for counting what a queued request holds, without decoding it)."""
    n = 0
    for tag, a, b in otlp_proto._fields(body, 0, len(body)):
        if tag == 0x0A:
            for t2, c, d in otlp_proto._fields(body, a, b):
                if t2 == 0x12:
                    n += sum(1 for t3, _, _ in otlp_proto._fields(body, c, d) if t3 == 0x12)
    return n


# --- editing messages at the wire level -----------------------------------------------------------------------


def _fields(buf: bytes) -> list[tuple[int, int, int]]:
    """``(field number, start, end)`` of every field of a message, ``buf[start:end]`` being the whole field
    (tag included)."""
    out = []
    pos, n = 0, len(buf)
    while pos < n:
        start = pos
        tag, pos = read_varint(buf, pos)
        wire_type = tag & 7
        if wire_type == 0:
            pos = read_varint(buf, pos)[1]
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > n:
            raise ValueError("a field runs past the end of the message")
        out.append((tag >> 3, start, pos))
    return out


def _key_of(key_value_field: bytes) -> str:
    """The key of a length-delimited ``KeyValue`` field (tag included)."""
    pos = read_varint(key_value_field, 0)[1]
    _, pos = read_varint(key_value_field, pos)  # the length
    body = key_value_field[pos:]
    for number, a, b in _fields(body):
        if number == 1:
            p = read_varint(body, a)[1]
            n, p = read_varint(body, p)
            return body[p : p + n].decode("utf-8", "replace")
    return ""


def _attributes(tag: bytes, attributes: Mapping[str, AttrValue]) -> list[bytes]:
    return [length_delimited(tag, otlp_proto._encode_key_value(k, v)) for k, v in attributes.items()]


def edit_span(
    raw: bytes,
    *,
    parent_id: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    name: str | None = None,
    set_attributes: Mapping[str, AttrValue] | None = None,
) -> bytes:
    """``raw`` (a ``Span`` message) with the given fields replaced and ``set_attributes`` set (an attribute of the
    same key is replaced); every other field is kept as it came. ``parent_id`` is a span id as the spans carry it:
    hex, or another system's id (an Alibaba rpc id), hashed as the span encoder hashes it."""
    drop = set()
    new: list[bytes] = []
    if parent_id is not None:
        drop.add(4)
        new.append(length_delimited(b"\x22", bytes.fromhex(span_id_hex(parent_id))))
    if name is not None:
        drop.add(5)
        new.append(length_delimited(b"\x2a", name.encode("utf-8", "replace")))
    if start_ns is not None:
        drop.add(7)
        new.append(b"\x39" + start_ns.to_bytes(8, "little"))
    if end_ns is not None:
        drop.add(8)
        new.append(b"\x41" + end_ns.to_bytes(8, "little"))
    keys = set(set_attributes or ())
    kept = []
    for number, a, b in _fields(raw):
        if number in drop or (number == 9 and keys and _key_of(raw[a:b]) in keys):
            continue
        kept.append(raw[a:b])
    return b"".join(kept + new + _attributes(b"\x4a", set_attributes or {}))


def edit_resource(raw: bytes | None, set_attributes: Mapping[str, AttrValue]) -> bytes:
    """A ``Resource`` message with ``set_attributes`` set (replacing attributes of the same keys), e.g. a filled
    ``service.name``."""
    raw = raw or b""
    keys = set(set_attributes)
    kept = [raw[a:b] for number, a, b in _fields(raw) if not (number == 1 and _key_of(raw[a:b]) in keys)]
    return b"".join(kept + _attributes(b"\x0a", set_attributes))


def with_service(resource: ResourceKey, service: str) -> ResourceKey:
    """``resource`` with its ``service.name`` set to ``service``."""
    return edit_resource(resource[0], {SERVICE_NAME: service}), resource[1]


def split(spans: Sequence[WireSpan], max_bytes: int) -> list[list[WireSpan]]:
    """``spans`` in consecutive batches whose span bytes stay under ``max_bytes`` (a span bigger than that goes
    alone), so a forwarded request stays under the downstream's message size limit."""
    out: list[list[WireSpan]] = []
    batch: list[WireSpan] = []
    size = 0
    for w in spans:
        n = len(w.raw) + 16
        if batch and size + n > max_bytes:
            out.append(batch)
            batch, size = [], 0
        batch.append(w)
        size += n
    if batch:
        out.append(batch)
    return out
