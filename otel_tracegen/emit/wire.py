"""The bytes the OpenTelemetry SDK's OTLP exporter sends for canonical traces, written without the SDK.

The reference path is ``to_readable_spans`` (:mod:`.sender`) followed by the SDK's encoder
(``opentelemetry.exporter.otlp.proto.common``'s ``encode_spans``) and upb's ``SerializeToString``: it builds
two Python objects per span and message, about 6x the work of writing the wire format directly.
:func:`encode_traces` writes the same ``ExportTraceServiceRequest`` bytes directly; ``tests/test_emit_wire.py``
sends traces both ways and checks that the bytes are equal.

This is not :func:`.formats.otlp_proto.dumps`, which keeps everything a canonical span carries. The SDK path
loses or changes some of it, and so must this one:

- ``Span.flags`` is always ``0x100`` (SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE; parents are never remote), the same for
  links; the W3C trace flags are not sent. Span and link ``trace_state`` are not sent.
- Dropped-attribute/event/link counts are not sent (the SDK only counts what its own limits dropped).
- UNSPECIFIED spans go out as INTERNAL; a status message is sent only with ERROR (``Status`` drops the rest).
- ``ScopeSpans.scope`` is always present (empty without a scope); ``Resource`` and scope lose
  ``dropped_attributes_count``; their attributes go through the SDK's ``BoundedAttributes`` cleaning (empty keys
  dropped at every level). Span, event and link attributes are sent as given.
- An attribute the SDK cannot encode (an int beyond int64, a string with a lone surrogate, a value of another
  type) is left out, with a warning; a span field it cannot encode (such a name, a negative time, an id that is
  not hex) fails the whole batch with the same error the SDK raises.
- Spans are grouped by resource, then scope, each in first-seen order, with the SDK's notion of equal:
  resources by attributes and schema URL with types told apart (``1``, ``1.0`` and ``True`` differ, as the
  SDK's JSON-based hash makes them), scopes by name, version, schema URL and ``==`` on attributes (where
  ``1 == True``). The first resource or scope seen in a group is the one written.

Pure Python on purpose (no opentelemetry import), so it is as fast as the hand-written format writer.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..formats._otlp_common import I64_MAX, I64_MIN
from ..formats._otlp_common import length_delimited as _field
from ..formats._otlp_common import read_varint as _read_varint
from ..formats._otlp_common import signed as _signed
from ..formats._otlp_common import varint as _varint
from ..trace import Resource, Scope, Span, StatusCode, Trace

__all__ = ["SdkWireEncoder", "encode_traces", "parse_partial_success", "parse_retry_delay"]

_logger = logging.getLogger(__name__)

_KV_CACHE_MAX = 1 << 16  # encoded KeyValues remembered per encoder; cleared when full

_pack_u64 = struct.Struct("<Q").pack
_pack_f64 = struct.Struct("<d").pack
_pack_times = struct.Struct("<BQBQ").pack  # start_time_unix_nano (7) and end_time_unix_nano (8), fixed64 both

# Span.kind (6): the SDK has no UNSPECIFIED, to_readable_spans sends it as INTERNAL.
_KIND_FIELDS = {0: b"\x30\x01", 1: b"\x30\x01", 2: b"\x30\x02", 3: b"\x30\x03", 4: b"\x30\x04", 5: b"\x30\x05"}
_SPAN_FLAGS = b"\x85\x01\x00\x01\x00\x00"  # Span.flags (16, fixed32) = 0x100: parent is known not to be remote
_LINK_FLAGS = b"\x35\x00\x01\x00\x00"  # Link.flags (6, fixed32) = 0x100
# Span.status (15) without a message, then the flags: the tail of almost every span.
_TAILS = {StatusCode.UNSET: b"\x7a\x00" + _SPAN_FLAGS, StatusCode.OK: b"\x7a\x02\x18\x01" + _SPAN_FLAGS,
          StatusCode.ERROR: b"\x7a\x02\x18\x02" + _SPAN_FLAGS}  # fmt: skip
_EMPTY_SCOPE = b"\x0a\x00"  # ScopeSpans.scope: the SDK writes an empty InstrumentationScope when there is none




def _id(hex_id: str, nbytes: int) -> bytes:
    """An id as the SDK encodes it: ``int(hex_id, 16).to_bytes(nbytes, "big")``, which also takes ``0x``, short
    ids (zero-padded) and fails on non-hex or too long ones. ``bytes.fromhex`` is the fast path for plain hex."""
    if len(hex_id) == 2 * nbytes:
        try:
            out = bytes.fromhex(hex_id)
            if len(out) == nbytes:
                return out
        except ValueError:
            pass
    return int(hex_id, 16).to_bytes(nbytes, "big")


def _any_value(value: Any) -> bytes:
    """``AnyValue`` body as the SDK's ``_encode_value`` builds it (same type tests in the same order); raises where
    upb would (int beyond int64, unencodable string, unknown type)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        if not I64_MIN <= value <= I64_MAX:
            raise ValueError(f"Value out of range: {value}")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_f64(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: str, value: Any) -> bytes:
    """``KeyValue`` body: key 1 (omitted when empty), value 2 (always present, empty for None)."""
    if type(key) is not str:
        raise TypeError(f"bad key type {type(key)}")
    k = key.encode()
    return (_field(b"\x0a", k) if k else b"") + _field(b"\x12", _any_value(value))


def _clean(value: Any) -> Any:
    """The SDK's ``_clean_attribute_value`` (``BoundedAttributes``, no limits): what a Resource or scope keeps."""
    if value is None or isinstance(value, (bool, int, float, bytes, str)):
        return value
    if isinstance(value, Sequence):
        return tuple(_clean(v) for v in value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not k:
                continue
            if not isinstance(k, str):
                if type(k).__str__ is object.__str__ and type(k).__repr__ is object.__repr__:
                    continue
                k = str(k)
            out[k] = _clean(v)
        return out
    if type(value).__str__ is not object.__str__ or type(value).__repr__ is not object.__repr__:
        return str(value)
    return None


def _exact(value: Any) -> Any:
    """Hashable, type-exact, order-insensitive stand-in: equal exactly when the SDK merges two Resources (equal
    sorted JSON, which tells ``1``/``1.0``/``True`` and ``0.0``/``-0.0`` apart, and ``==``)."""
    if isinstance(value, Mapping):
        return ("kv", frozenset((k, _exact(v)) for k, v in value.items()))
    if isinstance(value, tuple):
        return ("arr", tuple(_exact(v) for v in value))
    if type(value) is float:
        return ("float", _pack_f64(value))
    return (type(value).__name__, value)


def _loose(value: Any) -> Any:
    """Hashable stand-in equal exactly when Python's ``==`` says so (the SDK compares scope attributes that way)."""
    if isinstance(value, Mapping):
        return frozenset((k, _loose(v)) for k, v in value.items())
    if isinstance(value, tuple):
        return tuple(_loose(v) for v in value)
    return value


class SdkWireEncoder:
    """Writes ``ExportTraceServiceRequest`` bytes equal to ``encode_spans(to_readable_spans(traces))``.

    One encoder per sender: it remembers encoded KeyValues (attribute values repeat across spans); safe to share
    among threads (the cache is only read and filled, a lost entry is just encoded again).
    """

    def __init__(self) -> None:
        self._kv: dict[tuple, bytes] = {}
        self._heads: dict[tuple, bytes] = {}  # (name, kind) -> Span.name + Span.kind fields

    # --- attributes ------------------------------------------------------------------------------------------

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any]) -> bytes:
        """Repeated ``KeyValue`` field ``tag``, leaving out what the SDK cannot encode (it logs and skips those).
        str/int/bool values are cached by ``(tag, key, type, value)``; floats by their bits (``0.0 == -0.0``)."""
        parts = []
        cache = self._kv
        for k, v in attributes.items():
            t = type(v)
            if type(k) is not str:
                ck = None
            elif t is str or t is int or t is bool:
                ck = (tag, k, t, v)
            else:
                ck = (tag, k, t, _pack_f64(v)) if t is float else None
            enc = cache.get(ck) if ck is not None else None
            if enc is None:
                try:
                    body = _key_value(k, v)
                except Exception as e:  # noqa: BLE001 - the SDK's _encode_attributes skips any failure the same way
                    _logger.warning("attribute %r left out, as the SDK exporter does: %s", k, e)
                    continue
                enc = tag + _varint(len(body)) + body
                if ck is not None:
                    if len(cache) >= _KV_CACHE_MAX:
                        cache.clear()
                    cache[ck] = enc
            parts.append(enc)
        return b"".join(parts)

    # --- resource and scope ----------------------------------------------------------------------------------

    def _resource(self, span: Span) -> tuple[tuple, bytes, bytes]:
        """(grouping key, ResourceSpans.resource field, ResourceSpans.schema_url field) of ``span``'s resource as
        ``to_readable_spans`` gives it (``service.name`` always the span's service)."""
        res: Resource = span.resource_or_default()
        attrs = _clean(dict(res.attributes))
        key = (res.schema_url, _exact(attrs))
        schema = _field(b"\x1a", res.schema_url.encode()) if res.schema_url else b""
        return key, _field(b"\x0a", self._attributes(b"\x0a", attrs)), schema

    def _scope(self, scope: Scope | None) -> tuple[Any, bytes, bytes]:
        """(grouping key, ScopeSpans.scope field, ScopeSpans.schema_url field)."""
        if scope is None:
            return None, _EMPTY_SCOPE, b""
        attrs = _clean(dict(scope.attributes))
        version = scope.version or None
        key = (scope.name, version, scope.schema_url, _loose(attrs))
        body = [_field(b"\x0a", scope.name.encode()) if scope.name else b"",
                _field(b"\x12", version.encode()) if version else b"", self._attributes(b"\x1a", attrs)]  # fmt: skip
        schema = _field(b"\x1a", scope.schema_url.encode()) if scope.schema_url else b""
        return key, _field(b"\x0a", b"".join(body)), schema

    # --- spans -----------------------------------------------------------------------------------------------

    def _span(self, s: Span, trace_id: bytes) -> bytes:
        """``Span`` body: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6, times 7-8, attributes 9,
        events 11, links 13, status 15, flags 16 (field-number order, as upb writes them)."""
        parts = [b"\x0a\x10", trace_id, b"\x12\x08", _id(s.span_id, 8)]
        if s.parent_id:
            parts.append(b"\x22\x08")
            parts.append(_id(s.parent_id, 8))
        hk = (s.name, s.kind)
        head = self._heads.get(hk)
        if head is None:
            if type(s.name) is not str:
                raise TypeError(f"span name must be str, got {type(s.name).__name__}")
            name = s.name.encode()
            head = (_field(b"\x2a", name) if name else b"") + _KIND_FIELDS[s.kind]
            if len(self._heads) >= _KV_CACHE_MAX:
                self._heads.clear()
            self._heads[hk] = head
        parts.append(head)
        start, end = s.start_ns, s.end_ns
        if start > 0 and end > 0:
            parts.append(_pack_times(0x39, start, 0x41, end))  # struct.error past uint64, as upb's ValueError
        else:
            for tag, t in ((b"\x39", start), (b"\x41", end)):
                if t < 0:
                    raise ValueError(f"Value out of range: {t}")
                if t:
                    parts.append(tag + _pack_u64(t))
        if s.attributes:
            parts.append(self._attributes(b"\x4a", s.attributes))
        for e in s.events:
            body = []
            if e.time_ns:
                if e.time_ns < 0:
                    raise ValueError(f"Value out of range: {e.time_ns}")
                body.append(b"\x09" + _pack_u64(e.time_ns))
            if e.name:
                body.append(_field(b"\x12", e.name.encode()))
            if e.attributes:
                body.append(self._attributes(b"\x1a", e.attributes))
            parts.append(_field(b"\x5a", b"".join(body)))
        for ln in s.links:
            body = [b"\x0a\x10", _id(ln.trace_id, 16), b"\x12\x08", _id(ln.span_id, 8)]
            if ln.attributes:
                body.append(self._attributes(b"\x22", ln.attributes))
            body.append(_LINK_FLAGS)
            parts.append(_field(b"\x6a", b"".join(body)))
        status = s.status
        if status.message and status.code == StatusCode.ERROR:  # api.Status keeps a description only with ERROR
            parts.append(_field(b"\x7a", _field(b"\x12", status.message.encode()) + b"\x18\x02"))
            parts.append(_SPAN_FLAGS)
        else:
            parts.append(_TAILS[status.code])
        return b"".join(parts)

    # --- request ---------------------------------------------------------------------------------------------

    def encode(self, traces: Iterable[Trace]) -> bytes:
        """One serialized ``ExportTraceServiceRequest`` holding every span of ``traces``, in order."""
        # resource key -> [resource field, schema field, {scope key -> [scope field, schema field, span fields]}]
        groups: dict[tuple, list] = {}
        # The spans keep their resources and scopes alive during the call, so their ids are not reused.
        by_resource: dict[tuple[int, str], list] = {}
        by_scope: dict[int, tuple] = {}
        span = self._span
        for trace in traces:
            last_tid, tid = None, b""
            for s in trace.spans:
                rk = (id(s.resource), s.service)
                group = by_resource.get(rk)
                if group is None:
                    key, field, schema = self._resource(s)
                    group = groups.get(key)
                    if group is None:
                        group = groups[key] = [field, schema, {}]
                    by_resource[rk] = group
                scope = by_scope.get(id(s.scope))
                if scope is None:
                    scope = by_scope[id(s.scope)] = self._scope(s.scope)
                spans = group[2].get(scope[0])
                if spans is None:
                    spans = group[2][scope[0]] = [scope[1], scope[2], []]
                if s.trace_id is not last_tid:
                    last_tid, tid = s.trace_id, _id(s.trace_id, 16)
                body = span(s, tid)
                spans[2].append(b"\x12" + _varint(len(body)) + body)
        out = []
        for resource_field, resource_schema, scopes in groups.values():
            rs = [resource_field]
            for scope_field, scope_schema, spans in scopes.values():
                ss = scope_field + b"".join(spans) + scope_schema
                rs.append(b"\x12" + _varint(len(ss)) + ss)
            rs.append(resource_schema)
            body = b"".join(rs)
            out.append(b"\x0a" + _varint(len(body)) + body)
        return b"".join(out)


def encode_traces(traces: Iterable[Trace]) -> bytes:
    """:meth:`SdkWireEncoder.encode` with a fresh encoder."""
    return SdkWireEncoder().encode(traces)


# --- responses ------------------------------------------------------------------------------------------------


def _fields(buf: bytes) -> Iterable[tuple[int, int | bytes]]:
    """``(field number, value)`` of a message's varint and length-delimited fields (others skipped)."""
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            yield tag >> 3, value
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            yield tag >> 3, buf[pos : pos + n]
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _inner_fields(buf: bytes) -> Iterable[tuple[int, int | bytes]]:
    """The fields of ``buf``'s message field 1 (both responses below wrap what they say in field 1)."""
    for number, value in _fields(buf):
        if number == 1 and isinstance(value, bytes):
            yield from _fields(value)


def parse_partial_success(response: bytes) -> tuple[int, str]:
    """``(rejected_spans, error_message)`` of an ``ExportTraceServiceResponse`` (``partial_success`` 1:
    ``rejected_spans`` 1, ``error_message`` 2); ``(0, "")`` for a full success or a body that does not parse."""
    rejected, message = 0, ""
    try:
        for n, v in _inner_fields(response):
            if n == 1 and isinstance(v, int):
                rejected = _signed(v)
            elif n == 2 and isinstance(v, bytes):
                message = v.decode("utf-8", "replace")
    except (IndexError, ValueError):
        return 0, ""
    return rejected, message


def parse_retry_delay(retry_info: bytes) -> float | None:
    """Seconds of a ``google.rpc.RetryInfo`` (``retry_delay`` 1: a Duration, seconds 1, nanos 2), as the SDK's gRPC
    exporter reads the ``google.rpc.retryinfo-bin`` trailer; None when it does not parse."""
    seconds = nanos = 0
    try:
        for n, v in _inner_fields(retry_info):
            if n == 1 and isinstance(v, int):
                seconds = _signed(v)
            elif n == 2 and isinstance(v, int):
                nanos = _signed(v)
    except (IndexError, ValueError):
        return None
    return seconds + nanos / 1e9

