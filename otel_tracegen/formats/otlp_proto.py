"""OTLP protobuf: ``opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest``, the OTLP/gRPC and
OTLP/HTTP (``application/x-protobuf``) body.

Files
    A file holds either **one serialized request** (what an OTLP/HTTP body is, and what :func:`write` produces by
    default) or **several length-delimited requests**, each preceded by its byte length as a varint (protobuf's
    ``writeDelimitedTo`` framing, which the OTel file-exporter spec asks for; :func:`write` produces it when given
    ``batch_spans``) or as a 4-byte big-endian unsigned integer (what the Collector's ``file`` exporter writes
    with ``format: proto``). Plain concatenation is not a framing: concatenated requests parse as one merged
    request, so nothing tells them apart.

    :func:`read` accepts all three. A single request parses as a whole, but so, by chance, may a framed file, and
    a single request may by chance look framed, so the rule is: the file is length-delimited when the varint
    framing consumes it *exactly*, every frame starts like a request (field 1, ``resource_spans``, or is empty)
    and every frame parses; otherwise it is one request when it starts with field 1 and parses; otherwise it is
    4-byte framed when that framing passes the same test. If none works but a prefix of complete frames does (a
    framed file cut short), those requests are kept (of the framing that reads further) and the tail is reported.

Mapping (shared with OTLP JSON, see :mod:`._otlp_common`)
    ids are bytes on the wire and lower-case hex in canonical spans; ``ResourceSpans.schema_url`` is the
    resource's ``schema_url`` and ``ScopeSpans.schema_url`` the scope's; a ``ScopeSpans`` without a ``scope``
    gives spans with ``scope=None`` (and writes back without one). The status is always written, as the SDK
    does. What the canonical form does not carry is not kept: ``Resource.entity_refs`` and the profiles-only
    ``*_strindex`` fields (a span using the latter is reported as malformed).

Speed
    Neither direction builds protobuf message objects from Python: every field access on one costs an object, so
    walking upb messages is about 1.5x slower and filling them about 3x slower than handling the wire format
    directly. Reading lets upb (C) parse the bytes once as the "does it parse" check, then walks them by hand
    (one ``_decode_*`` per message); writing emits them by hand (one ``_encode_*`` per message, fields in
    field-number order exactly as upb serializes them, which the tests check byte for byte). Both share one
    Resource and one Scope among the spans of a ``ResourceSpans``/``ScopeSpans``, reuse the decoding/encoding of
    repeated scalar attributes (``http.method=GET``), and pause the cyclic garbage collector (see
    :func:`._otlp_common.paused_gc`).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from ..report import ReadReport, UserError
from ..trace import (
    STATUS_UNSET,
    AttrValue,
    Event,
    Link,
    Resource,
    Scope,
    Span,
    Status,
    Trace,
    group_traces,
    iter_spans,
)
from ._io import read_bytes, write_bytes
from ._otlp_common import (
    BAD_LINK,
    BAD_PARENT_ID,
    BAD_SPAN_ID,
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
from ._otlp_common import length_delimited as _field
from ._otlp_common import read_varint as _read_varint
from ._otlp_common import signed as _signed
from ._otlp_common import varint as _varint

__all__ = ["read", "write", "loads", "dumps", "decode_request", "encode_request", "split_requests"]

# =====================================================================================================================
# Reading: wire format -> canonical spans, by hand
# =====================================================================================================================
# The bytes are first parsed by upb (C), which checks the structure and UTF-8 and is the "does it parse" test of
# the file rule; they are then walked here, field by field, without building message objects: walking upb
# messages from Python costs an object per field access and is about 1.5x slower. Protobuf's rules are kept:
# unknown fields (and known numbers with an unexpected wire type) are skipped, a singular scalar field that
# occurs twice keeps its last value, and a singular message field that occurs twice is merged, which is what
# parsing the concatenation of its occurrences does.

_unpack_u32 = struct.Struct("<I").unpack_from
_unpack_u64 = struct.Struct("<Q").unpack_from
_unpack_f64 = struct.Struct("<d").unpack_from
_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_CACHEABLE = (str, int, bool, float, bytes, type(None))  # immutable attribute values, safe to share among spans
_KV_CACHE_MAX = 1 << 16  # distinct KeyValues remembered (per read or write); cleared when full
_INSTRUMENTATION_LIBRARY_SPANS = 1000 << 3 | 2  # ResourceSpans.instrumentation_library_spans (OTLP 0.15-0.18)


def _skip(buf: bytes, pos: int, tag: int) -> int:
    """Skip the field whose tag's first byte was ``tag`` (``pos`` is just after that byte)."""
    if tag >= 0x80:  # a multi-byte tag: read the rest of it
        tag, pos = _read_varint(buf, pos - 1)
    wire_type = tag & 7
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 2:
        length, pos = _read_varint(buf, pos)
        return pos + length
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def _decode_any_value(buf: bytes) -> AttrValue:
    """``AnyValue``: string 1, bool 2, int 3, double 4, array 5, kvlist 6, bytes 7 (a oneof: the last wins)."""
    value: AttrValue = None
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x0A:
            n, pos = _read_varint(buf, pos)
            value = buf[pos : pos + n].decode()
            pos += n
        elif tag == 0x18:
            n, pos = _read_varint(buf, pos)
            value = _signed(n)
        elif tag == 0x10:
            n, pos = _read_varint(buf, pos)
            value = n != 0
        elif tag == 0x21:
            value = _unpack_f64(buf, pos)[0]
            pos += 8
        elif tag == 0x2A or tag == 0x32:
            n, pos = _read_varint(buf, pos)
            body = buf[pos : pos + n]
            pos += n
            if tag == 0x2A:
                items = [_decode_any_value(v) for v in _repeated(body)]
                value = value + items if type(value) is list else items  # a message member seen twice merges
            else:
                kvs = _decode_key_values(body)
                value = {**value, **kvs} if type(value) is dict else kvs
        elif tag == 0x3A:
            n, pos = _read_varint(buf, pos)
            value = buf[pos : pos + n]
            pos += n
        elif tag == 0x40:
            raise BadRecord(MALFORMED_SPAN, "AnyValue.string_value_strindex is for profiles, not traces")
        else:
            pos = _skip(buf, pos, tag)
    return value


def _repeated(buf: bytes) -> list[bytes]:
    """The bodies of field 1 in ``buf`` (``ArrayValue.values``, ``KeyValueList.values``)."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x0A:
            n, pos = _read_varint(buf, pos)
            out.append(buf[pos : pos + n])
            pos += n
        else:
            pos = _skip(buf, pos, tag)
    return out


def _decode_key_value(buf: bytes) -> tuple[str, AttrValue]:
    """``KeyValue``: key 1, value 2."""
    key, value = "", b""
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x0A:
            n, pos = _read_varint(buf, pos)
            key = buf[pos : pos + n].decode()
            pos += n
        elif tag == 0x12:
            n, pos = _read_varint(buf, pos)
            value += buf[pos : pos + n]
            pos += n
        elif tag == 0x18:
            n, pos = _read_varint(buf, pos)
            if n:
                raise BadRecord(MALFORMED_SPAN, "KeyValue.key_strindex is for profiles, not traces")
        else:
            pos = _skip(buf, pos, tag)
    return key, _decode_any_value(value) if value else None


def _decode_key_values(buf: bytes) -> dict[str, AttrValue]:
    return dict(_decode_key_value(kv) for kv in _repeated(buf))


def _cached_key_value(raw: bytes, cache: dict) -> tuple[str, AttrValue]:
    """A KeyValue from the cache of encodings seen before (scalar ones: attribute values repeat a lot)."""
    kv = _decode_key_value(raw)
    if type(kv[1]) in _CACHEABLE:
        if len(cache) >= _KV_CACHE_MAX:
            cache.clear()
        cache[raw] = kv
    return kv


def _decode_resource(buf: bytes | None, schema_url: str, cache: dict) -> Resource:
    """``Resource``: attributes 1, dropped_attributes_count 2 (entity_refs 3 is not kept)."""
    attributes: dict[str, AttrValue] = {}
    dropped = 0
    pos, end = 0, len(buf or b"")
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x0A:
            n, pos = _read_varint(buf, pos)
            raw = buf[pos : pos + n]
            pos += n
            key, value = cache.get(raw) or _cached_key_value(raw, cache)
            attributes[key] = value
        elif tag == 0x10:
            dropped, pos = _read_varint(buf, pos)
        else:
            pos = _skip(buf, pos, tag)
    return Resource(attributes, dropped & U32_MAX, schema_url)


def _decode_scope(buf: bytes | None, schema_url: str, cache: dict) -> Scope | None:
    """``InstrumentationScope``: name 1, version 2, attributes 3, dropped_attributes_count 4. Without a scope
    there is no Scope, unless the ScopeSpans has a schema URL, which lives in the canonical Scope."""
    if buf is None:
        return Scope(schema_url=schema_url) if schema_url else None
    name = version = ""
    attributes: dict[str, AttrValue] = {}
    dropped = 0
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x0A or tag == 0x12 or tag == 0x1A:
            n, pos = _read_varint(buf, pos)
            raw = buf[pos : pos + n]
            pos += n
            if tag == 0x0A:
                name = raw.decode()
            elif tag == 0x12:
                version = raw.decode()
            else:
                key, value = cache.get(raw) or _cached_key_value(raw, cache)
                attributes[key] = value
        elif tag == 0x20:
            dropped, pos = _read_varint(buf, pos)
        else:
            pos = _skip(buf, pos, tag)
    return Scope(name, version, attributes, dropped & U32_MAX, schema_url)


def _decode_event(buf: bytes, cache: dict) -> Event:
    """``Span.Event``: time_unix_nano 1 (fixed64), name 2, attributes 3, dropped_attributes_count 4."""
    time_ns = dropped = 0
    name = ""
    attributes: dict[str, AttrValue] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x1A:
            n, pos = _read_varint(buf, pos)
            raw = buf[pos : pos + n]
            pos += n
            key, value = cache.get(raw) or _cached_key_value(raw, cache)
            attributes[key] = value
        elif tag == 0x09:
            time_ns = _unpack_u64(buf, pos)[0]
            pos += 8
        elif tag == 0x12:
            n, pos = _read_varint(buf, pos)
            name = buf[pos : pos + n].decode()
            pos += n
        elif tag == 0x20:
            dropped, pos = _read_varint(buf, pos)
        else:
            pos = _skip(buf, pos, tag)
    return Event(time_ns, name, attributes, dropped & U32_MAX)


def _decode_link(buf: bytes, cache: dict) -> Link:
    """``Span.Link``: trace_id 1, span_id 2, trace_state 3, attributes 4, dropped_attributes_count 5, flags 6."""
    trace_id = span_id = b""
    trace_state = ""
    attributes: dict[str, AttrValue] = {}
    dropped = flags = 0
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag in (0x0A, 0x12, 0x1A, 0x22):
            n, pos = _read_varint(buf, pos)
            raw = buf[pos : pos + n]
            pos += n
            if tag == 0x22:
                key, value = cache.get(raw) or _cached_key_value(raw, cache)
                attributes[key] = value
            elif tag == 0x0A:
                trace_id = raw
            elif tag == 0x12:
                span_id = raw
            else:
                trace_state = raw.decode()
        elif tag == 0x28:
            dropped, pos = _read_varint(buf, pos)
        elif tag == 0x35:
            flags = _unpack_u32(buf, pos)[0]
            pos += 4
        else:
            pos = _skip(buf, pos, tag)
    trace_id = trace_id or _ZERO_TRACE_ID  # an absent (empty) id is the all-zero one: links to it are allowed
    span_id = span_id or _ZERO_SPAN_ID
    if len(trace_id) != 16 or len(span_id) != 8:
        raise BadRecord(
            BAD_LINK, f"link traceId {show(trace_id.hex())} / spanId {show(span_id.hex())} are not 16 / 8 bytes"
        )
    return Link(trace_id.hex(), span_id.hex(), trace_state, attributes, dropped & U32_MAX, flags)


def _decode_status(buf: bytes, report: ReadReport) -> Status:
    """``Status``: message 2, code 3."""
    code, message = 0, ""
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x18:
            code, pos = _read_varint(buf, pos)
            code = _signed(code)
        elif tag == 0x12:
            n, pos = _read_varint(buf, pos)
            message = buf[pos : pos + n].decode()
            pos += n
        else:
            pos = _skip(buf, pos, tag)
    return make_status(code, message, report)


def _decode_span(
    buf: bytes,
    pos: int,
    end: int,
    service: str,
    resource: Resource,
    scope: Scope | None,
    report: ReadReport,
    cache: dict,
    bad_links: list[str],
) -> Span:
    """``Span`` in ``buf[pos:end]``: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6,
    start 7, end 8 (fixed64), attributes 9, dropped_attributes_count 10, events 11, dropped_events_count 12,
    links 13, dropped_links_count 14, status 15, flags 16 (fixed32).

    Raises :class:`BadRecord` for a span to drop; appends links it drops to ``bad_links``.
    """
    trace_id = span_id = parent = b""
    name = trace_state = ""
    kind = start = stop = flags = dropped_attributes = dropped_events = dropped_links = 0
    attributes: dict[str, AttrValue] = {}
    status: bytes | None = None
    events: list[bytes] | None = None
    links: list[bytes] | None = None
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x4A:  # attributes: most of a span's fields, so first and inlined
            n = buf[pos]
            if n < 0x80:
                pos += 1
            else:
                n, pos = _read_varint(buf, pos)
            raw = buf[pos : pos + n]
            pos += n
            kv = cache.get(raw) or _cached_key_value(raw, cache)
            attributes[kv[0]] = kv[1]
        elif tag == 0x0A or tag == 0x12 or tag == 0x22 or tag == 0x2A:
            n = buf[pos]
            if n < 0x80:
                pos += 1
            else:
                n, pos = _read_varint(buf, pos)
            raw = buf[pos : pos + n]
            pos += n
            if tag == 0x0A:
                trace_id = raw
            elif tag == 0x12:
                span_id = raw
            elif tag == 0x22:
                parent = raw
            else:
                name = raw.decode()
        elif tag == 0x39:
            start = _unpack_u64(buf, pos)[0]
            pos += 8
        elif tag == 0x41:
            stop = _unpack_u64(buf, pos)[0]
            pos += 8
        elif tag == 0x30:
            kind, pos = _read_varint(buf, pos)
        elif tag == 0x7A:
            n, pos = _read_varint(buf, pos)
            status = buf[pos : pos + n] if status is None else status + buf[pos : pos + n]
            pos += n
        elif tag == 0x5A or tag == 0x6A or tag == 0x1A:
            n, pos = _read_varint(buf, pos)
            raw = buf[pos : pos + n]
            pos += n
            if tag == 0x5A:
                if events is None:
                    events = []
                events.append(raw)
            elif tag == 0x6A:
                if links is None:
                    links = []
                links.append(raw)
            else:
                trace_state = raw.decode()
        elif tag == 0x85 and buf[pos] == 0x01:  # flags, field 16: a two-byte tag
            flags = _unpack_u32(buf, pos + 1)[0]
            pos += 5
        elif tag == 0x50:
            dropped_attributes, pos = _read_varint(buf, pos)
        elif tag == 0x60:
            dropped_events, pos = _read_varint(buf, pos)
        elif tag == 0x70:
            dropped_links, pos = _read_varint(buf, pos)
        else:
            pos = _skip(buf, pos, tag)
    if pos != end:
        raise BadRecord(MALFORMED_SPAN, "a field runs past the end of the span")

    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        raise BadRecord(BAD_TRACE_ID, f"traceId {show(trace_id.hex())} is not 16 bytes with one non-zero")
    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        raise BadRecord(BAD_SPAN_ID, f"spanId {show(span_id.hex())} is not 8 bytes with one non-zero")
    parent_id: str | None = None
    if parent:
        if len(parent) != 8:
            raise BadRecord(BAD_PARENT_ID, f"parentSpanId {show(parent.hex())} is not 8 bytes")
        if parent == _ZERO_SPAN_ID:
            report.repair(REPAIR_ZERO_PARENT)
        else:
            parent_id = parent.hex()
    span_kind_ = SPAN_KINDS.get(kind)
    if span_kind_ is None:
        span_kind_ = span_kind(_signed(kind), report)
    link_list: list[Link] = []
    if links is not None:
        for raw in links:
            try:
                link_list.append(_decode_link(raw, cache))
            except BadRecord as e:
                bad_links.append(e.detail)
                dropped_links += 1
    return Span(
        trace_id.hex(),
        span_id.hex(),
        parent_id,
        service,
        name,
        start,
        stop,
        span_kind_,
        _decode_status(status, report) if status else STATUS_UNSET,
        attributes,
        resource,
        scope,
        [_decode_event(raw, cache) for raw in events] if events is not None else [],
        link_list,
        trace_state,
        flags,
        dropped_attributes & U32_MAX,
        dropped_events & U32_MAX,
        dropped_links & U32_MAX,
    )


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(tag, start, end)`` of each length-delimited field in ``buf[pos:end]`` (other wire types are skipped).

    ``tag`` is the whole tag (field number << 3 | 2), also for fields numbered 16 and up."""
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag & 7 == 2 and tag < 0x80:
            n, pos = _read_varint(buf, pos)
            yield tag, pos, pos + n
            pos += n
        elif tag >= 0x80:
            tag, pos = _read_varint(buf, pos - 1)
            if tag & 7 == 2:
                n, pos = _read_varint(buf, pos)
                yield tag, pos, pos + n
                pos += n
            else:
                pos = _skip(buf, pos, tag & 0x7F)  # the tag is read: skip by its wire type alone
        else:
            pos = _skip(buf, pos, tag)


def _decode_scope_spans(
    buf: bytes, pos: int, end: int, service: str, resource: Resource, report: ReadReport, cache: dict, where: str,
    keep: list | None = None, resource_raw: tuple[bytes | None, str] = (None, ""), checked: bool = False,
) -> list[Span]:
    """``ScopeSpans``: scope 1, spans 2, schema_url 3. ``where`` names it in problems.

    ``keep``: a list that gets, per span kept, ``(span, its bytes, resource_raw, (scope bytes or None, scope
    schema_url))``, for a receiver that forwards spans byte for byte (:mod:`otel_tracegen.infill.wire`).
    ``checked``: the bytes were not parsed by upb as a whole (see :func:`decode_request_checked`): walk them with
    bounds checks and let upb check each span (and the scope) on its own."""
    scope_raw: bytes | None = None
    spans: list[tuple[int, int]] = []
    schema_url = ""
    for tag, start, stop in (_checked_fields if checked else _fields)(buf, pos, end):
        if tag == 0x12:
            spans.append((start, stop))
        elif tag == 0x0A:
            scope_raw = buf[start:stop] if scope_raw is None else scope_raw + buf[start:stop]
        elif tag == 0x1A:
            schema_url = buf[start:stop].decode()
        elif tag == _CUT:
            report.problem(f"{where}.spans[{len(spans)}]", MALFORMED_MESSAGE, f"the ScopeSpans message is cut short or "
                           f"corrupt at byte {start} of the body; the span there and any after it are lost")
    try:
        if checked and (error := _nested_error(scope_raw, _AT_SCOPE)):
            raise BadRecord(MALFORMED_SPAN, error)
        scope = _decode_scope(scope_raw, schema_url, cache)
    except (BadRecord, *DATA_ERRORS) as e:
        report.problem(f"{where}.scope", "invalid scope", str(e), dropped=len(spans))
        return []
    out: list[Span] = []
    bad_links: list[str] = []
    for k, (start, stop) in enumerate(spans):
        try:
            if checked and (error := _nested_error(buf[start:stop], _AT_SPAN)):
                raise BadRecord(MALFORMED_SPAN, error)
            span = _decode_span(buf, start, stop, service, resource, scope, report, cache, bad_links)
            out.append(span)
            if keep is not None:
                keep.append((span, buf[start:stop], resource_raw, (scope_raw, schema_url)))
        except BadRecord as e:
            report.problem(f"{where}.spans[{k}]", e.reason, e.detail)
            bad_links.clear()  # the span is dropped, and its links with it
            continue
        except DATA_ERRORS as e:
            report.problem(f"{where}.spans[{k}]", MALFORMED_SPAN, f"{type(e).__name__}: {e}")
            bad_links.clear()
            continue
        if bad_links:
            for detail in bad_links:
                report.problem(f"{where}.spans[{k}]", BAD_LINK, detail + " (link dropped, span kept)", dropped=0)
            bad_links.clear()
    return out


def _decode_resource_spans(buf: bytes, pos: int, end: int, report: ReadReport, cache: dict, where: str,
                           keep: list | None = None, checked: bool = False) -> list[Span]:
    """``ResourceSpans``: resource 1, scope_spans 2, schema_url 3. ``where`` names it in problems.

    OTLP 0.15 to 0.18 senders may put the spans in the deprecated ``instrumentation_library_spans`` (1000) instead,
    whose messages have the layout of ``ScopeSpans`` (``InstrumentationLibrary`` has ``name`` 1 and ``version`` 2,
    as ``InstrumentationScope``): they are read when there are no ``scope_spans``, as the Collector does."""
    resource_raw: bytes | None = None
    scope_spans: list[tuple[int, int]] = []
    deprecated: list[tuple[int, int]] = []
    schema_url = ""
    fields = _checked_fields if checked else _fields
    for tag, start, stop in fields(buf, pos, end):
        if tag == 0x12:
            scope_spans.append((start, stop))
        elif tag == 0x0A:
            resource_raw = buf[start:stop] if resource_raw is None else resource_raw + buf[start:stop]
        elif tag == 0x1A:
            schema_url = buf[start:stop].decode()
        elif tag == _INSTRUMENTATION_LIBRARY_SPANS:
            deprecated.append((start, stop))
        elif tag == _CUT:
            report.problem(f"{where}.scopeSpans[{len(scope_spans)}]", MALFORMED_MESSAGE, f"the ResourceSpans message is "
                           f"cut short or corrupt at byte {start} of the body; the spans there and after it are lost")
    if deprecated and not scope_spans:
        scope_spans = deprecated
        n = sum(sum(1 for t, _, _ in fields(buf, s, e_) if t == 0x12) for s, e_ in scope_spans)
        if n:
            report.repair(REPAIR_DEPRECATED_SCOPE, n)
    try:
        if checked and (error := _nested_error(resource_raw, _AT_RESOURCE)):
            raise BadRecord(MALFORMED_SPAN, error)
        resource = _decode_resource(resource_raw, schema_url, cache)
    except (BadRecord, *DATA_ERRORS) as e:
        dropped = sum(sum(1 for t, _, _ in fields(buf, s, e_) if t == 0x12) for s, e_ in scope_spans)
        report.problem(f"{where}.resource", "invalid resource", str(e), dropped=dropped)
        return []
    service, repair = service_of(resource)
    out: list[Span] = []
    for j, (start, stop) in enumerate(scope_spans):
        out.extend(_decode_scope_spans(buf, start, stop, service, resource, report, cache, f"{where}.scopeSpans[{j}]",
                                       keep, (resource_raw, schema_url), checked))
    if repair and out:
        report.repair(repair, len(out))
    return out


def _decode_request_bytes(buf: bytes, report: ReadReport, where: str, cache: dict | None = None,
                          keep: list | None = None, checked: bool = False) -> list[Span]:
    """Spans of a serialized request that upb has already parsed (so its structure is sound), or with
    ``checked``, of one it has not (see :func:`decode_request_checked`). ``keep``: see
    :func:`_decode_scope_spans`."""
    cache = cache if cache is not None else {}
    out: list[Span] = []
    i = 0
    for tag, start, stop in (_checked_fields if checked else _fields)(buf, 0, len(buf)):
        if tag == 0x0A:
            out.extend(_decode_resource_spans(buf, start, stop, report, cache, f"{where}resourceSpans[{i}]", keep,
                                              checked))
            i += 1
        elif tag == _CUT:
            report.problem(f"{where}resourceSpans[{i}]", MALFORMED_MESSAGE, f"the request is cut short or corrupt at "
                           f"byte {start}; the spans there and after it are lost")
    return out


# --- requests upb refuses: one bad span must not cost the others ------------------------------------------------
# upb refuses a whole request for one span with invalid UTF-8, a field running past its end or nesting deeper than
# its recursion limit (100 messages, about 32 kvlist levels). A receiver must keep the other spans (and say which
# one was bad), so such a body is walked again with every length checked, and each span (and each resource and
# scope) is handed to upb on its own, wrapped at the depth it has in a request: what passes would also pass a
# downstream's parser once forwarded.

_CUT = -1
MALFORMED_MESSAGE = "malformed message"
"""The reason of a problem where the request's own framing breaks (not one span's content)."""
"""The tag :func:`_checked_fields` yields where a message stops making sense (``start``: the byte offset)."""


def _checked_fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """:func:`_fields` with every length and wire type checked: where a field runs past ``end`` or cannot be
    read, yields ``(_CUT, offset, end)`` once and stops."""
    try:
        while pos < end:
            at = pos
            tag, pos = _read_varint(buf, pos)
            wire_type = tag & 7
            if wire_type == 2:
                n, pos = _read_varint(buf, pos)
                if pos + n > end:
                    yield _CUT, at, end
                    return
                yield tag, pos, pos + n
                pos += n
                continue
            if wire_type not in (0, 1, 5) or tag >> 3 == 0:
                yield _CUT, at, end
                return
            pos = _read_varint(buf, pos)[1] if wire_type == 0 else pos + (8 if wire_type == 1 else 4)
            if pos > end:
                yield _CUT, at, end
                return
    except IndexError:  # a varint running off the end
        yield _CUT, at, end


# Where each message sits in a request, innermost tag first: a Resource is field 1 of ResourceSpans (field 1 of
# the request), a scope field 1 of ScopeSpans (field 2 of ResourceSpans), a Span field 2 of ScopeSpans.
_AT_RESOURCE = (b"\x0a", b"\x0a")
_AT_SCOPE = (b"\x0a", b"\x12", b"\x0a")
_AT_SPAN = (b"\x12", b"\x12", b"\x0a")


def _nested_error(raw: bytes | None, path: tuple[bytes, ...]) -> str | None:
    """Why upb refuses ``raw`` at its place in a request (``path``: one of the ``_AT_*``), or None."""
    if raw is None:
        return None
    for tag in path:
        raw = _field(tag, raw)
    error = _parses(raw)
    if error is None:
        return None
    error = error.rsplit("': ", 1)[-1]  # upb names the outermost type, the request: the cause is what follows
    if "depth" in error.lower() or "recursion" in error.lower():
        return f"nested deeper than protobuf parsers accept ({error})"
    return f"not a valid protobuf message ({error})"


def decode_request_checked(buf: bytes, report: ReadReport, where: str, keep: list | None = None) -> list[Span]:
    """The spans of a body that upb refused as a whole: every span that parses on its own is kept, every other
    one goes to ``report`` with the reason."""
    return _decode_request_bytes(buf, report, where, None, keep, checked=True)


def decode_request(
    request: ExportTraceServiceRequest, report: ReadReport | None = None, where: str = "request"
) -> list[Span]:
    """Canonical spans of a request message (a gRPC receiver's), in message order. Bad spans go to ``report``,
    named ``"<where>: resourceSpans[i].scopeSpans[j].spans[k]"``; the others are kept."""
    return _decode_request_bytes(
        request.SerializeToString(), report if report is not None else ReadReport(), f"{where}: "
    )


def _parses(data: bytes) -> str | None:
    """None if ``data`` is one ExportTraceServiceRequest, else why not."""
    try:
        ExportTraceServiceRequest.FromString(data)
    except DecodeError as e:
        return str(e) or "parse error"
    return None


def loads(data: bytes, report: ReadReport | None = None, where: str = "request") -> list[Span]:
    """Canonical spans of one serialized request (an OTLP/HTTP protobuf body). Bytes that do not parse are one
    problem for ``where`` and give no spans."""
    report = report if report is not None else ReadReport()
    data = bytes(data)
    error = _parses(data)
    if error is not None:
        report.problem(where, "malformed protobuf", f"not an ExportTraceServiceRequest ({error})")
        return []
    with paused_gc():
        return _decode_request_bytes(data, report, f"{where}: ")


# --- files: one request, or varint-length-delimited requests ------------------------------------------------------


def _frames(data: bytes) -> tuple[list[bytes], int]:
    """The varint-length-delimited frames at the start of ``data`` and where they end.

    Stops at the first frame that does not fit or does not start like a request (tag 0x0a, ``resource_spans``,
    or empty), which also ends the walk quickly on data that is one request.
    """
    frames: list[bytes] = []
    pos, n = 0, len(data)
    while pos < n:
        try:
            length, start = _read_varint(data, pos)
        except (IndexError, ValueError):
            break
        if start + length > n or (length and data[start] != 0x0A):
            break
        frames.append(data[start : start + length])
        pos = start + length
    return frames, pos


def _fixed_frames(data: bytes) -> tuple[list[bytes], int]:
    """Like :func:`_frames`, for frames preceded by their length as a 4-byte big-endian unsigned integer (the
    Collector's ``file`` exporter with ``format: proto``)."""
    frames: list[bytes] = []
    pos, n = 0, len(data)
    while pos + 4 <= n:
        start = pos + 4
        length = int.from_bytes(data[pos:start], "big")
        if start + length > n or (length and data[start] != 0x0A):
            break
        frames.append(data[start : start + length])
        pos = start + length
    return frames, pos


def _complete(frames: list[bytes], prefix: int | None) -> tuple[list[bytes], int]:
    """The leading frames that parse, and the bytes they take with their length prefixes (``prefix`` bytes each,
    or a varint when None)."""
    good: list[bytes] = []
    consumed = 0
    for f in frames:
        if _parses(f) is not None:
            break
        good.append(f)
        consumed += len(f) + (prefix if prefix is not None else len(_varint(len(f))))
    return good, consumed


def split_requests(data: bytes, report: ReadReport | None = None, where: str = "data") -> list[bytes]:
    """The serialized requests in a file's bytes: several if they are length-delimited, else one (the rule is in
    the module doc). Each returned request parses.

    Data that is neither is one problem for ``where``; a length-delimited stream cut short keeps its complete
    requests and reports the rest.
    """
    report = report if report is not None else ReadReport()
    frames, end = _frames(data)
    if frames and end == len(data) and all(_parses(f) is None for f in frames):
        return frames
    # A request starts with field 1 (byte 0x0a) or is empty. Checking it keeps a framed stream whose tail is cut
    # off (its first byte is a length) from "parsing" as one request made of unknown fields.
    error = _parses(data) if not data or data[0] == 0x0A else "does not start with resource_spans"
    if error is None:
        return [data]
    fixed, fixed_end = _fixed_frames(data)
    if fixed and fixed_end == len(data) and all(_parses(f) is None for f in fixed):
        return fixed
    # a framed stream whose last request was cut short: keep the complete ones of the framing that reads further
    good, consumed = max(_complete(frames, None), _complete(fixed, 4), key=lambda gc: gc[1])
    if good:
        report.problem(
            where,
            "truncated protobuf",
            f"kept {len(good)} length-delimited requests; "
            f"{len(data) - consumed} bytes from offset {consumed} unreadable",
        )
        return good
    report.problem(
        where,
        "malformed protobuf",
        f"{len(data)} bytes are neither an ExportTraceServiceRequest nor length-delimited ones ({error})",
    )
    return []


def _read_file(path: Path, report: ReadReport, cache: dict) -> list[Span]:
    where = str(path)
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except (EOFError, zlib.error, OSError) as e:  # a corrupt or truncated .gz (BadGzipFile is an OSError)
        if isinstance(e, (IsADirectoryError, PermissionError)):
            raise UserError(f"cannot read {path}: {e}") from None
        report.problem(where, "unreadable file", f"{type(e).__name__}: {e}")
        return []
    requests = split_requests(data, report, where)
    if len(requests) == 1:
        return _decode_request_bytes(requests[0], report, f"{where}: ", cache)
    spans: list[Span] = []
    for n, request in enumerate(requests):
        spans.extend(_decode_request_bytes(request, report, f"{where}: requests[{n}].", cache))
    return spans


def read(paths: list[Path], report: ReadReport | None = None) -> list[Trace]:
    """Every span of every file (``.gz`` transparently), grouped into traces by trace id."""
    report = report if report is not None else ReadReport()
    spans: list[Span] = []
    cache: dict = {}
    with paused_gc():
        for path in paths:
            spans.extend(_read_file(Path(path), report, cache))
            report.counts["files read"] += 1
        report.counts["spans read"] += len(spans)
        return group_traces(spans)


# =====================================================================================================================
# Writing: canonical spans -> wire format, by hand
# =====================================================================================================================
# Tags are (field number << 3 | wire type) of opentelemetry/proto/{trace,common,resource}/v1/*.proto; wire types:
# 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Every field below has a number < 16, so one byte, except
# Span.flags (16), which takes two. Fields at their default are omitted, as upb does (proto3 implicit presence);
# message fields that must be present (Span.status, ResourceSpans.resource, KeyValue.value) are always written.

_pack_u32 = struct.Struct("<I").pack
_pack_u64 = struct.Struct("<Q").pack
_pack_f64 = struct.Struct("<d").pack
_pack_times = struct.Struct("<BQBQ").pack  # Span.start_time_unix_nano (7) and end_time_unix_nano (8) in one call

def _utf8(text: str) -> bytes:
    # A lone surrogate (possible after reading "\ud800" from JSON) is not UTF-8; protobuf would reject the whole
    # message, so it becomes "?".
    return text.encode("utf-8", "replace")


def _encode_any_value(value: Any) -> bytes:
    """``AnyValue`` body: string 1, bool 2, int 3, double 4, array 5, kvlist 6, bytes 7; ``None`` is empty."""
    t = type(value)
    if t is str:
        return _field(b"\x0a", _utf8(value))
    if t is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if t is int:
        if I64_MIN <= value <= I64_MAX:
            return b"\x18" + _varint(value & U64_MAX)  # two's complement, as int64 is
        return _field(b"\x0a", str(value).encode())  # beyond int64: keep the digits, as a string
    if t is float:
        return b"\x21" + _pack_f64(value)
    if value is None:
        return b""
    if t is bytes:
        return _field(b"\x3a", value)
    if t is list or t is tuple:
        return _field(b"\x2a", b"".join([_field(b"\x0a", _encode_any_value(v)) for v in value]))
    if t is dict:
        return _field(b"\x32", b"".join([_field(b"\x0a", _encode_key_value(k, v)) for k, v in value.items()]))
    return _encode_any_value(coerce_value(value))


def _encode_key_value(key: str, value: Any) -> bytes:
    """``KeyValue`` body: key 1, value 2 (always present, empty for ``None``, as the SDK writes it)."""
    k = _utf8(key if type(key) is str else str(key))
    return (_field(b"\x0a", k) if k else b"") + _field(b"\x12", _encode_any_value(value))


def _encode_attributes(tag: bytes, attributes: dict[str, AttrValue], cache: dict) -> bytes:
    """Repeated ``KeyValue`` field ``tag``. Scalar attributes repeat across spans, so their length-prefixed
    encoding is cached by ``(key, type, value)``; floats are not (``0.0 == -0.0`` would share one encoding)."""
    parts = []
    for k, v in attributes.items():
        t = type(v)
        if t is str or t is int or t is bool or t is bytes:
            ck = (k, t, v)
            enc = cache.get(ck)
            if enc is None:
                if len(cache) >= _KV_CACHE_MAX:
                    cache.clear()
                body = _encode_key_value(k, v)
                enc = cache[ck] = _varint(len(body)) + body
        else:
            body = _encode_key_value(k, v)
            enc = _varint(len(body)) + body
        parts.append(tag)
        parts.append(enc)
    return b"".join(parts)


def _encode_resource(resource: Resource, cache: dict) -> bytes:
    """``Resource`` body: attributes 1, dropped_attributes_count 2."""
    body = _encode_attributes(b"\x0a", resource.attributes, cache)
    if resource.dropped_attributes_count > 0:
        body += b"\x10" + _varint(resource.dropped_attributes_count)
    return body


def _encode_scope(scope: Scope, cache: dict) -> bytes:
    """``InstrumentationScope`` body: name 1, version 2, attributes 3, dropped_attributes_count 4."""
    parts = []
    if scope.name:
        parts.append(_field(b"\x0a", _utf8(scope.name)))
    if scope.version:
        parts.append(_field(b"\x12", _utf8(scope.version)))
    if scope.attributes:
        parts.append(_encode_attributes(b"\x1a", scope.attributes, cache))
    if scope.dropped_attributes_count > 0:
        parts.append(b"\x20" + _varint(scope.dropped_attributes_count))
    return b"".join(parts)


def _encode_event(event: Event, cache: dict) -> bytes:
    """``Span.Event`` body: time_unix_nano 1 (fixed64), name 2, attributes 3, dropped_attributes_count 4."""
    parts = []
    if event.time_ns:
        parts.append(b"\x09" + _pack_u64(min(max(event.time_ns, 0), U64_MAX)))
    if event.name:
        parts.append(_field(b"\x12", _utf8(event.name)))
    if event.attributes:
        parts.append(_encode_attributes(b"\x1a", event.attributes, cache))
    if event.dropped_attributes_count > 0:
        parts.append(b"\x20" + _varint(event.dropped_attributes_count))
    return b"".join(parts)


def _encode_link(link: Link, cache: dict) -> bytes:
    """``Span.Link`` body: trace_id 1, span_id 2, trace_state 3, attributes 4, dropped_attributes_count 5,
    flags 6 (fixed32)."""
    parts = [
        b"\x0a\x10",
        bytes.fromhex(trace_id_hex(link.trace_id)),
        b"\x12\x08",
        bytes.fromhex(span_id_hex(link.span_id)),
    ]
    if link.trace_state:
        parts.append(_field(b"\x1a", _utf8(link.trace_state)))
    if link.attributes:
        parts.append(_encode_attributes(b"\x22", link.attributes, cache))
    if link.dropped_attributes_count > 0:
        parts.append(b"\x28" + _varint(link.dropped_attributes_count))
    if link.flags:
        parts.append(b"\x35" + _pack_u32(link.flags & U32_MAX))
    return b"".join(parts)


# Span.status (15) for a status without message: code 3 only when not UNSET. The SDK always sends a status.
_STATUS_FIELDS = {0: b"\x7a\x00", 1: b"\x7a\x02\x18\x01", 2: b"\x7a\x02\x18\x02"}


def _encode_times(start: int, end: int) -> bytes:
    if start > 0 and end > 0:
        try:
            return _pack_times(0x39, start, 0x41, end)
        except struct.error:  # past uint64: clamp below
            pass
    start, end = min(max(start, 0), U64_MAX), min(max(end, 0), U64_MAX)
    return (b"\x39" + _pack_u64(start) if start else b"") + (b"\x41" + _pack_u64(end) if end else b"")


def _encode_span(span: Span, cache: dict) -> bytes:
    """``Span`` body: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6, start 7, end 8
    (fixed64), attributes 9, dropped_attributes_count 10, events 11, dropped_events_count 12, links 13,
    dropped_links_count 14, status 15, flags 16 (fixed32)."""
    parts = [
        b"\x0a\x10",
        bytes.fromhex(trace_id_hex(span.trace_id)),
        b"\x12\x08",
        bytes.fromhex(span_id_hex(span.span_id)),
    ]
    if span.trace_state:
        parts.append(_field(b"\x1a", _utf8(span.trace_state)))
    if span.parent_id is not None:
        parts.append(b"\x22\x08")
        parts.append(bytes.fromhex(span_id_hex(span.parent_id)))
    if span.name:
        parts.append(_field(b"\x2a", _utf8(span.name)))
    if span.kind:
        parts.append(b"\x30" + _varint(int(span.kind)))
    parts.append(_encode_times(span.start_ns, span.end_ns))
    if span.attributes:
        parts.append(_encode_attributes(b"\x4a", span.attributes, cache))
    if span.dropped_attributes_count > 0:
        parts.append(b"\x50" + _varint(span.dropped_attributes_count))
    for event in span.events:
        parts.append(_field(b"\x5a", _encode_event(event, cache)))
    if span.dropped_events_count > 0:
        parts.append(b"\x60" + _varint(span.dropped_events_count))
    for link in span.links:
        parts.append(_field(b"\x6a", _encode_link(link, cache)))
    if span.dropped_links_count > 0:
        parts.append(b"\x70" + _varint(span.dropped_links_count))
    status = span.status
    if status.message:
        body = _field(b"\x12", _utf8(status.message)) + (b"\x18" + _varint(int(status.code)) if status.code else b"")
        parts.append(_field(b"\x7a", body))
    else:
        parts.append(_STATUS_FIELDS.get(status.code) or _field(b"\x7a", b"\x18" + _varint(int(status.code))))
    if span.flags:
        parts.append(b"\x85\x01" + _pack_u32(span.flags & U32_MAX))
    return b"".join(parts)


def _encode_request(spans: Iterable[Span], cache: dict) -> bytes:
    """``ExportTraceServiceRequest`` body: resource_spans 1, each ``ResourceSpans`` (resource 1, scope_spans 2,
    schema_url 3) holding ``ScopeSpans`` (scope 1, spans 2, schema_url 3)."""
    out = []
    for _, resource, scope_groups in group_spans(spans):
        rs = [_field(b"\x0a", _encode_resource(resource, cache))]
        for _, scope, group in scope_groups:
            ss = [] if scope is None else [_field(b"\x0a", _encode_scope(scope, cache))]
            for span in group:
                body = _encode_span(span, cache)
                ss.append(b"\x12")
                ss.append(_varint(len(body)))
                ss.append(body)
            if scope is not None and scope.schema_url:
                ss.append(_field(b"\x1a", _utf8(scope.schema_url)))
            rs.append(_field(b"\x12", b"".join(ss)))
        if resource.schema_url:
            rs.append(_field(b"\x1a", _utf8(resource.schema_url)))
        out.append(_field(b"\x0a", b"".join(rs)))
    return b"".join(out)


def dumps(spans: Iterable[Span]) -> bytes:
    """One serialized ``ExportTraceServiceRequest`` holding ``spans``, grouped by resource then scope."""
    with paused_gc():
        return _encode_request(spans, {})


def encode_request(spans: Iterable[Span]) -> ExportTraceServiceRequest:
    """``spans`` as a request message (for gRPC clients and servers)."""
    return ExportTraceServiceRequest.FromString(dumps(spans))


def _batches(traces: Iterable[Trace], batch_spans: int) -> Iterator[list[Span]]:
    """Whole traces, in order, packed into lists of about ``batch_spans`` spans (a bigger trace goes alone)."""
    batch: list[Span] = []
    for trace in traces:
        if batch and len(batch) + len(trace.spans) > batch_spans:
            yield batch
            batch = []
        batch.extend(trace.spans)
    if batch:
        yield batch


def write(traces: list[Trace], path: Path, *, batch_spans: int | None = None) -> None:
    """Write ``traces`` to ``path`` (gzipped when it ends in ``.gz``).

    By default the file is one request holding every span. With ``batch_spans`` it is a stream of
    varint-length-delimited requests of about that many spans each, never splitting a trace, which readers can
    take one request at a time.
    """
    if batch_spans is not None and batch_spans < 1:
        raise ValueError(f"batch_spans must be at least 1, got {batch_spans}")
    cache: dict = {}
    with paused_gc():
        if batch_spans is None:
            data = _encode_request(iter_spans(traces), cache)
        else:
            parts = []
            for batch in _batches(traces, batch_spans):
                body = _encode_request(batch, cache)
                parts.append(_varint(len(body)))
                parts.append(body)
            data = b"".join(parts)
    write_bytes(Path(path), data)
