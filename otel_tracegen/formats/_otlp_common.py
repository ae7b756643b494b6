"""What the OTLP JSON and OTLP protobuf adapters share: enum tables, id rules, grouping, and the bad-record error.

Both encodings carry the same messages (``ResourceSpans`` > ``ScopeSpans`` > ``Span``), so the decisions that are
not about bytes live here, once:

- **Ids.** Canonical ids are strings. OTLP wants 16-byte trace ids and 8-byte span ids; a canonical id that is
  already that much hex is written as is (lower-cased), anything else goes through :func:`~otel_tracegen.trace.hex_id`.
  Trace, span, parent and link ids all take the same path, so parent links survive the mapping.
- **Validity on read.** A span whose trace or span id is missing, of the wrong length or all zeros (the spec's
  "invalid" id) is dropped with a problem. An all-zero *parent* id is read as "no parent" (some converters write
  roots that way) and counted as a repair. Link ids are not required to be valid (the spec lets a link to an
  invalid context be recorded when it has attributes), only to have the right length; a link that does not is
  dropped from its span, counted in the span's ``dropped_links_count`` and reported, and the span is kept. An
  empty or absent link id is the all-zero one: protobuf's default, and what the Collector writes for it (``""``
  in its JSON, no field in its protobuf).
- **Enums.** Unknown kind or status numbers (proto3 enums are open) are read as UNSPECIFIED / UNSET and counted
  as repairs rather than dropping the span.
- **Service.** A span's service is its resource's ``service.name``; without one it is ``unknown_service``, the
  SDK's default, counted as the repair ``missing service.name``.
- **Grouping on write.** Spans are grouped by resource, then scope, each group in first-seen order and spans in
  input order within a group, as the SDK's OTLP encoder does. A span whose service is what its resource says
  (``service_of``) is written with that resource unchanged, so a resource read without ``service.name`` is
  written back without one; otherwise ``service.name`` is set to the span's service.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from typing import Iterable

from ._io import paused_gc  # noqa: F401  (re-exported for the OTLP adapters)
from ..report import ReadReport
from ..trace import SERVICE_NAME, AttrValue, Resource, Scope, Span, SpanKind, Status, StatusCode, hex_id

UNKNOWN_SERVICE = "unknown_service"
TRACE_ID_BYTES = 16
SPAN_ID_BYTES = 8
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

# Enum value (and, for JSON, enum name) -> canonical enum. Unknown numbers are handled by the callers.
SPAN_KINDS: dict[int | str, SpanKind] = {
    **{k.value: k for k in SpanKind},
    **{f"SPAN_KIND_{k.name}": k for k in SpanKind},
}
STATUS_CODES: dict[int | str, StatusCode] = {
    **{c.value: c for c in StatusCode},
    **{f"STATUS_CODE_{c.name}": c for c in StatusCode},
}
# Shared Status objects for the message-less case, which is nearly every span.
STATUS_BY_CODE: dict[StatusCode, Status] = {c: Status(c) for c in StatusCode}

ZERO_TRACE_ID = "0" * (2 * TRACE_ID_BYTES)
ZERO_SPAN_ID = "0" * (2 * SPAN_ID_BYTES)

_is_trace_hex = re.compile(r"[0-9a-f]{32}").fullmatch
_is_span_hex = re.compile(r"[0-9a-f]{16}").fullmatch

# Problem reasons (also the keys of ReadReport.dropped / .repaired), so tests and summaries can name them.
BAD_TRACE_ID = "invalid trace id"
BAD_SPAN_ID = "invalid span id"
BAD_PARENT_ID = "invalid parent span id"
BAD_TIME = "invalid timestamp"
BAD_LINK = "invalid link"
MALFORMED_SPAN = "malformed span"
REPAIR_NO_SERVICE = "missing service.name"
REPAIR_ZERO_PARENT = "all-zero parent span id"
REPAIR_UNKNOWN_KIND = "unknown span kind"
REPAIR_UNKNOWN_STATUS = "unknown status code"
REPAIR_DEPRECATED_SCOPE = "deprecated instrumentationLibrarySpans"  # read as scopeSpans (pre-1.0 OTLP names)

# What decoding a malformed record can raise besides BadRecord: a wrong JSON type, bad UTF-8 or a field cut short
# shows up as one of these.
DATA_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, RecursionError, struct.error)


class BadRecord(ValueError):
    """A span (or link) that cannot be read: ``reason`` is the stable category, ``detail`` says what was seen."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def trace_id_hex(value: str) -> str:
    """A canonical trace id as 32 lower-case hex characters (hashed through ``hex_id`` when it is not hex)."""
    return value if _is_trace_hex(value) else hex_id(value, TRACE_ID_BYTES)


def span_id_hex(value: str) -> str:
    """A canonical span id as 16 lower-case hex characters (hashed through ``hex_id`` when it is not hex)."""
    return value if _is_span_hex(value) else hex_id(value, SPAN_ID_BYTES)


def service_of(resource: Resource) -> tuple[str, str | None]:
    """``(service, repair reason or None)`` for spans under ``resource``."""
    value = resource.attributes.get(SERVICE_NAME)
    if isinstance(value, str):
        return value, None
    if value is None:
        return UNKNOWN_SERVICE, REPAIR_NO_SERVICE
    return str(value), "non-string service.name"


def show(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: problem details should name the bad value, not copy a huge one."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def span_kind(value: int, report: ReadReport) -> SpanKind:
    kind = SPAN_KINDS.get(value)
    if kind is None:
        if type(value) is not int:
            raise BadRecord(MALFORMED_SPAN, f"kind {show(value)} is not a span kind")
        report.repair(REPAIR_UNKNOWN_KIND)
        return SpanKind.UNSPECIFIED
    return kind


def make_status(code: int | str, message: str, report: ReadReport) -> Status:
    status_code = STATUS_CODES.get(code)
    if status_code is None:
        if type(code) is not int:
            raise BadRecord(MALFORMED_SPAN, f"status code {show(code)} is not a status code")
        report.repair(REPAIR_UNKNOWN_STATUS)
        status_code = StatusCode.UNSET
    if not message:
        return STATUS_BY_CODE[status_code]
    if type(message) is not str:
        raise BadRecord(MALFORMED_SPAN, f"status message {show(message)} is not a string")
    return Status(status_code, message)


def coerce_value(value: object) -> AttrValue:
    """An attribute value of a type the encoders do not know exactly (a subclass, numpy scalar, tuple, mapping,
    anything else), turned into the nearest plain type; ``str(value)`` as the last resort, as the SDK does."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, Sequence):
        return list(value)
    item = getattr(value, "item", None)  # numpy scalars are not int/float subclasses but have item()
    if callable(item):
        try:
            plain = item()
        except (TypeError, ValueError):
            plain = None
        if isinstance(plain, (bool, int, float, str, bytes)):
            return plain
    return str(value)


ScopeGroup = tuple[tuple | None, Scope | None, list[Span]]  # (scope key, scope or None, spans)
ResourceGroup = tuple[tuple, Resource, list[ScopeGroup]]  # (resource key, resource, scope groups)


def group_spans(spans: Iterable[Span]) -> list[ResourceGroup]:
    """Spans grouped as OTLP nests them: ``[(resource key, resource, [(scope key, scope, spans)])]``.

    Groups come in first-seen order and spans keep their input order inside a group. A span without a resource
    gets ``Resource({"service.name": span.service})`` (``Span.resource_or_default``), and so does one whose
    resource names another service; a resource that already gives the span's service (``service_of``: a
    resource without ``service.name`` gives ``unknown_service``) is kept as it is. ``Resource.key()`` and
    ``Scope.key()`` freeze attribute dicts, so they are computed once per distinct resource/scope *object*
    (spans read from one ``ResourceSpans`` share one), not once per span; the caches hold the objects, so an id
    cannot be reused while they are in use.
    """
    by_resource: dict[tuple, tuple[Resource, dict[tuple | None, tuple[Scope | None, list[Span]]]]] = {}
    resource_cache: dict[tuple[int, str], tuple[tuple, Resource, Resource | None]] = {}
    scope_cache: dict[int, tuple[tuple | None, Scope | None]] = {}
    for span in spans:
        res_hit = resource_cache.get((id(span.resource), span.service))
        if res_hit is None:
            res = span.resource
            if res is None or service_of(res)[0] != span.service:
                res = span.resource_or_default()
            res_hit = resource_cache[(id(span.resource), span.service)] = (res.key(), res, span.resource)
        group = by_resource.get(res_hit[0])
        if group is None:
            group = by_resource[res_hit[0]] = (res_hit[1], {})
        scope = span.scope
        scope_hit = scope_cache.get(id(scope))
        if scope_hit is None:
            scope_hit = scope_cache[id(scope)] = (None if scope is None else scope.key(), scope)
        by_scope = group[1]
        scope_group = by_scope.get(scope_hit[0])
        if scope_group is None:
            by_scope[scope_hit[0]] = (scope_hit[1], [span])
        else:
            scope_group[1].append(span)
    return [
        (key, res, [(skey, scope, group) for skey, (scope, group) in by_scope.items()])
        for key, (res, by_scope) in by_resource.items()
    ]


# --- protobuf wire format (shared by the file writer and the native OTLP sender) ---

_ONE_BYTE_VARINTS = [bytes((i,)) for i in range(0x80)]


def varint(n: int) -> bytes:
    """A non-negative integer as a base-128 varint."""
    if n < 0x80:
        return _ONE_BYTE_VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return tag + varint(len(body)) + body


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """``(value, position after it)`` of the varint at ``pos``; IndexError if it runs off the end."""
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & U64_MAX, pos + 1
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def signed(n: int) -> int:
    """A 64-bit varint read as int64/int32 (negative values are sent as their 64-bit two's complement)."""
    return n - (1 << 64) if n >> 63 else n
