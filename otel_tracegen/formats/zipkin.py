"""Zipkin v2 JSON: a list of spans (or the ``/api/v2/traces`` list of such lists), read and written.

One Zipkin span::

    {"traceId": "a03ee8fff1dcd9b9", "parentId": "f5f268651b2a2b34", "id": "7a778764a0d0b594", "kind": "SERVER",
     "name": "get", "timestamp": 1571896375310740, "duration": 1490,
     "localEndpoint": {"serviceName": "spectre", "ipv4": "10.1.2.3", "port": 8080},
     "remoteEndpoint": {"serviceName": "mobile_api"}, "annotations": [{"timestamp": 1571896375311000, "value": "ws"}],
     "tags": {"http.uri.client": "/token"}, "shared": true}

The mapping follows the OpenTelemetry Collector's translator (``pkg/translator/zipkin/zipkinv2`` in
opentelemetry-collector-contrib) and the OTel spec's Zipkin exporter rules:

- **Ids** are kept exactly as written (lower-case hex; a 64-bit trace id stays 16 characters). Upper-case or
  short hex is lower-cased / zero-padded and counted as a repair; anything else drops the span with a problem.
  On write, canonical ids that are not hex go through :func:`~otel_tracegen.trace.hex_id`.
- **Kind**: ``CLIENT/SERVER/PRODUCER/CONSUMER`` <-> the span kinds of the same name. No kind plus the tag
  ``span.kind=internal`` is INTERNAL; no kind otherwise is UNSPECIFIED.
- **Times**: Zipkin carries microseconds, so nanoseconds are truncated on write, start and end each
  (``timestamp = start_ns // 1000``, ``duration = end_ns // 1000 - timestamp``). That keeps every ordering
  between times, so a child inside its parent stays inside (truncating the duration, as the Collector does,
  can push a child's end 1 µs past its parent's). A span without ``duration`` gets ``end = start`` (repair
  ``span without duration``); a zero duration is not written, as Zipkin's own encoder omits it. A span without
  ``timestamp`` is kept with ``start = 0`` and the Collector's marker attribute
  ``otel.zipkin.absentField.startTime = true`` (repair ``span without timestamp``); ``write`` then omits the
  timestamp again. Cleaning, not reading, decides what to do with such spans.
- **Endpoints**: ``localEndpoint.serviceName`` is the span's service (resource ``service.name``). The other
  endpoint fields become the Collector's attributes (:data:`LOCAL_ENDPOINT` / :data:`REMOTE_ENDPOINT`):
  ``net.host.ip``/``net.host.port`` and ``peer.service``/``net.peer.ip``/``net.peer.port``; an endpoint with both
  an IPv4 and an IPv6 address keeps the IPv6 one in ``zipkin.local_ipv6``/``zipkin.remote_ipv6``. ``write`` moves
  those attributes back into the endpoints when they are valid (an address string, a port 1..65535).
- **Tags** are strings only. On read they stay string attributes (no guessing of numbers). On write, typed
  attributes become strings as the Collector's ``AsString`` does (:func:`attribute_string`: ``true``, ``42``,
  ``0.5``, base64 for bytes, compact JSON for lists and maps): the type is lost. Resource attributes other than
  ``service.name`` are written as tags too (span attributes win a clash) and read back as span attributes.
- **Status**: ``otel.status_code`` (``OK``/``ERROR``, any case; the Collector's old ``STATUS_CODE_*`` too) with
  ``otel.status_description``, and Zipkin's own ``error`` tag, whose presence means failure and whose value is
  the message (``"true"`` is a bare flag, no message). ``write`` emits the OTel spec's form
  (``otel.status_code=ERROR`` plus ``error=<message>``), except that a span whose attributes already hold an
  ``error`` tag is trusted as it is: a plain Zipkin ``{"error": "401"}`` span reads as ERROR "401", keeps the
  tag as an attribute (as the Collector does) and is written back unchanged. So is a span whose
  ``otel.status_code``/``otel.status_description`` tags alone say ERROR (no ``error`` tag, as in the Collector's
  own Zipkin test data): those tags stay attributes and are written back as they were.
- **Scope**: ``otel.scope.name``/``otel.scope.version`` (the legacy ``otel.library.*`` are read, and written back
  as ``otel.scope.*``). **Trace state**: ``w3c.tracestate``.
- **Events** are annotations: the value is the event name, or ``name|{json attributes}|dropped count`` when the
  event has attributes, as the Collector writes it. **Links** are the Collector's ``otlp.link.<i>`` tags
  (``traceid|spanid|tracestate|{json attributes}|dropped count``).
- **Not carried**: resource schema URL and dropped counts, scope attributes, span flags and dropped counts, link
  flags. ``debug: true`` is kept as the attribute ``zipkin.debug``.

**Exact round trips.** Reading removes a tag it turned into a field (status, kind, scope, trace state, link,
event form) only when writing that field puts the very same tag back (:func:`strip_regenerable`); otherwise
the tag also stays an attribute. So Zipkin -> canonical -> Zipkin reproduces every span's fields and tags,
and values survive even unusual spellings (``otel.status_code=Error``) at the price of a duplicate attribute.
What ``write`` normalises: empty fields are left out (``tags: {}``, ``annotations: []``, ``shared: false``,
``duration: 0``, ``port: 0``, empty endpoints, ``name: ""``), tags are sorted by key (Zipkin's own order), the
few tag sets no field writes back (legacy ``otel.library.*``) come back in the canonical form, an unknown
``kind`` is read as UNSPECIFIED, an all-zero ``parentId`` as no parent, short or upper-case hex ids are padded /
lower-cased, tag values that are not strings become strings, and invalid endpoint addresses and ports are
dropped (each counted in the report).

**Shared span ids.** Zipkin lets the CLIENT and SERVER halves of one RPC share a span id (the server half has
``shared: true``); some traces even repeat an id once per consumer, or hold a late, kind-less fragment with it.
Canonical span ids must be unique in a trace, so on read, in every group of spans with one id:

- the *primary* keeps the id: the non-shared CLIENT half, else the first non-shared span, else the first span;
- every other span gets a deterministic derived id (a hash of trace id, id and position in the group) and the
  attributes ``zipkin.id`` (the original id) and ``zipkin.parent_id`` (the original parentId, ``""`` for none);
- a shared half whose primary is a non-shared span (the client) gets that span as its parent; other spans keep
  the parent they named;
- a child naming the shared id hangs under the group member in its own service (on its own address and port
  when several are), else under a shared (server) half, else under the primary: work done under a shared id
  is the server side's, as in Zipkin's own tree builder.

All spans with ``shared: true`` carry ``zipkin.shared = true``. ``write`` restores id, parentId and the shared
flag from these attributes and maps every canonical parent id back to the Zipkin id of that span, so the round
trip is exact. (The Jaeger query service solves the same problem the same way: ``ZipkinSpanIDUniquifier``.)

Bad records: a span that is not an object, has a bad id or a non-numeric time becomes a
:class:`~otel_tracegen.report.Problem` at ``file: [i]`` (``file: [i][j]`` in a list of traces) and is dropped;
a bad annotation is dropped from its span with a problem; invalid JSON is one problem naming the line and column.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..report import ReadReport
from ..trace import (
    SERVICE_NAME,
    STATUS_UNSET,
    AttrValue,
    Event,
    Link,
    Resource,
    Scope,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Trace,
    freeze,
    hex_id,
)
from ._io import BAD_JSON, COUNT_FILES, NOT_JSON, UNREADABLE, load_json, open_write_text, read_text_files  # noqa: F401

# --- vocabulary --------------------------------------------------------------------------------------------------

KIND_FROM_ZIPKIN: dict[str, SpanKind] = {
    "CLIENT": SpanKind.CLIENT,
    "SERVER": SpanKind.SERVER,
    "PRODUCER": SpanKind.PRODUCER,
    "CONSUMER": SpanKind.CONSUMER,
}
KIND_TO_ZIPKIN: dict[SpanKind, str] = {v: k for k, v in KIND_FROM_ZIPKIN.items()}

TAG_SPAN_KIND = "span.kind"
INTERNAL_KIND = "internal"  # Zipkin has no INTERNAL kind; the Collector writes this tag instead
TAG_ERROR = "error"
TAG_STATUS_CODE = "otel.status_code"
TAG_STATUS_DESCRIPTION = "otel.status_description"
# otel.status_code spellings read (upper-cased first); the Collector's older STATUS_CODE_* form included.
STATUS_FROM_TAG: dict[str, StatusCode] = {
    "OK": StatusCode.OK,
    "ERROR": StatusCode.ERROR,
    "STATUS_CODE_OK": StatusCode.OK,
    "STATUS_CODE_ERROR": StatusCode.ERROR,
}
STATUS_TO_TAG: dict[StatusCode, str] = {StatusCode.OK: "OK", StatusCode.ERROR: "ERROR"}
TAG_SCOPE_NAME = "otel.scope.name"
TAG_SCOPE_VERSION = "otel.scope.version"
LEGACY_SCOPE_NAME = "otel.library.name"
LEGACY_SCOPE_VERSION = "otel.library.version"
TAG_TRACE_STATE = "w3c.tracestate"
LINK_TAG_PREFIX = "otlp.link."
MAX_LINK_TAGS = 128  # the Collector reads otlp.link.0 .. otlp.link.127

# Attributes that only carry Zipkin facts the canonical form has no field for (see the module docstring).
ATTR_ZIPKIN_ID = "zipkin.id"
ATTR_ZIPKIN_PARENT_ID = "zipkin.parent_id"
ATTR_SHARED = "zipkin.shared"
ATTR_DEBUG = "zipkin.debug"
ATTR_START_ABSENT = "otel.zipkin.absentField.startTime"  # the Collector's own marker


@dataclass(frozen=True)
class EndpointKeys:
    """Which attribute holds each field of one Zipkin endpoint (``service`` None: it is the span's service)."""

    service: str | None
    ip: str
    ipv6_also: str  # the IPv6 address of an endpoint that has an IPv4 one too
    port: str


LOCAL_ENDPOINT = EndpointKeys(None, "net.host.ip", "zipkin.local_ipv6", "net.host.port")
REMOTE_ENDPOINT = EndpointKeys("peer.service", "net.peer.ip", "zipkin.remote_ipv6", "net.peer.port")

# Attribute keys with a meaning in this adapter: a canonical span using them for something else will not
# round-trip through Zipkin unchanged (tests leave them out of generated spans).
RESERVED_ATTRIBUTES: frozenset[str] = frozenset(
    {
        TAG_SPAN_KIND,
        TAG_ERROR,
        TAG_STATUS_CODE,
        TAG_STATUS_DESCRIPTION,
        TAG_SCOPE_NAME,
        TAG_SCOPE_VERSION,
        LEGACY_SCOPE_NAME,
        LEGACY_SCOPE_VERSION,
        TAG_TRACE_STATE,
        ATTR_ZIPKIN_ID,
        ATTR_ZIPKIN_PARENT_ID,
        ATTR_SHARED,
        ATTR_DEBUG,
        ATTR_START_ABSENT,
        *(k for e in (LOCAL_ENDPOINT, REMOTE_ENDPOINT) for k in (e.service, e.ip, e.ipv6_also, e.port) if k),
    }
)
RESERVED_PREFIXES: tuple[str, ...] = (LINK_TAG_PREFIX,)

US = 1000  # nanoseconds per microsecond

# Problem reasons (keys of ReadReport.dropped) and repair reasons (keys of ReadReport.repaired).
NOT_A_SPAN_LIST = "not a Zipkin v2 span list"
MALFORMED_SPAN = "malformed span"
BAD_TRACE_ID = "invalid trace id"
BAD_SPAN_ID = "invalid span id"
BAD_PARENT_ID = "invalid parent span id"
BAD_TIME = "invalid timestamp"
BAD_ANNOTATION = "malformed annotation"
REPAIR_NO_TIMESTAMP = "zipkin: span without timestamp"
REPAIR_NO_DURATION = "zipkin: span without duration"
REPAIR_ID_NORMALISED = "zipkin: id lower-cased or zero-padded"
REPAIR_ZERO_PARENT = "zipkin: all-zero parentId read as root"
REPAIR_UNKNOWN_KIND = "zipkin: unknown kind read as unspecified"
REPAIR_BAD_ENDPOINT = "zipkin: invalid endpoint field dropped"
REPAIR_NON_STRING_TAG = "zipkin: non-string tag value"
REPAIR_SHARED_ID = "zipkin: shared span id given a derived id"
COUNT_SPANS = "spans read"

_HEX = re.compile(r"[0-9a-fA-F]+")
_DIGITS = re.compile(r"[0-9]+")


class BadRecord(ValueError):
    """A span that cannot be read: ``reason`` is the stable category, ``detail`` what was seen."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --- helpers shared with the Jaeger adapter ------------------------------------------------------------------------


def json_value(value: AttrValue) -> Any:
    """An attribute value as plain JSON data: bytes as base64 (Go's ``json.Marshal`` of ``[]byte``)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    return value


# Go's json.Marshal escapes these even inside strings; so do we, to write what the Collector writes.
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPED = re.compile("[<>&\u2028\u2029]")


def json_text(value: Any) -> str:
    """Compact JSON with sorted keys, as Go's ``json.Marshal`` writes a map."""
    text = json.dumps(json_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _GO_ESCAPED.sub(lambda m: _GO_ESCAPES[m.group()], text)


def _float_string(value: float) -> str:
    # Go's strconv.FormatFloat(v, 'f', -1, 64): shortest round-trip digits, never an exponent.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return format(Decimal(repr(value)).normalize(), "f")


def attribute_string(value: AttrValue) -> str:
    """An attribute value as a string tag, as the Collector's ``pcommon.Value.AsString`` writes it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_string(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if value is None:
        return ""
    return json_text(value)


def same_attributes(a: Mapping[str, AttrValue], b: Mapping[str, AttrValue]) -> bool:
    """Equal keys and type-exact equal values (``1``, ``1.0`` and ``True`` differ); order is ignored."""
    return a.keys() == b.keys() and all(freeze(a[k]) == freeze(b[k]) for k in a)


def strip_regenerable(
    tags: Mapping[str, AttrValue], keys: Iterable[str], emit: Callable[[dict[str, AttrValue]], Mapping[str, AttrValue]]
) -> dict[str, AttrValue] | None:
    """The tags left as attributes after removing those of ``keys`` that writing will put back.

    ``emit(rest)`` is what the writer adds (never overwriting) to attributes ``rest`` for the field read from
    these tags. The largest subset of the present ``keys`` whose removal the writer undoes exactly is removed.
    None when no subset works (the field cannot be written back as it was read): the caller normalises.
    """
    present = [k for k in keys if k in tags]
    for size in range(len(present), -1, -1):
        for removed in combinations(present, size):
            rest = {k: v for k, v in tags.items() if k not in removed}
            merged = dict(rest)
            for k, v in emit(rest).items():
                merged.setdefault(k, v)
            if same_attributes(merged, tags):
                return rest
    return None


def take_field(
    tags: dict[str, AttrValue],
    keys: Iterable[str],
    value: Any,
    default: Any,
    emit: Callable[[Any, dict[str, AttrValue]], Mapping[str, AttrValue]],
) -> dict[str, AttrValue]:
    """The attributes left once the field ``value`` (read from ``keys``) is taken out of ``tags``.

    A default value takes nothing (its tags, if any, stay attributes). Otherwise the tags the writer will
    regenerate are removed; if it cannot regenerate them exactly, all of ``keys`` are removed (the writer then
    emits the field's canonical form: a documented normalisation).
    """
    if value == default:
        return tags
    rest = strip_regenerable(tags, keys, lambda r: emit(value, r))
    if rest is None:
        keys = set(keys)
        rest = {k: v for k, v in tags.items() if k not in keys}
    return rest


def derived_span_id(trace_id: str, span_id: str, index: int, taken: set[str]) -> str:
    """A deterministic 16-hex span id for the ``index``-th extra span with ``span_id``, not in ``taken``."""
    salt = 0
    while True:
        seed = f"{trace_id}/{span_id}/{index}/{salt}".encode()
        new = hashlib.blake2b(seed, digest_size=8).hexdigest()
        if new not in taken:
            return new
        salt += 1


def is_reserved(key: str) -> bool:
    return key in RESERVED_ATTRIBUTES or key.startswith(RESERVED_PREFIXES)


# --- ids and numbers -----------------------------------------------------------------------------------------------


def _decode_id(value: Any, max_len: int, reason: str, report: ReadReport) -> str:
    """A hex id as canonical: lower-case, zero-padded to 16 (or, for trace ids over 16, 32) characters."""
    if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) > max_len:
        raise BadRecord(reason, repr(value))
    want = 16 if len(value) <= 16 else 32
    out = value.lower().rjust(want, "0")
    if out != value:
        report.repair(REPAIR_ID_NORMALISED)
    return out


def zipkin_trace_id(value: str) -> str:
    """A canonical trace id as Zipkin wants it: 16 or 32 lower-case hex (hashed when not hex)."""
    if _HEX.fullmatch(value) and len(value) <= 32:
        v = value.lower()
        return v.rjust(16 if len(v) <= 16 else 32, "0")
    return hex_id(value, 16)


def zipkin_span_id(value: str) -> str:
    """A canonical span id as Zipkin wants it: 16 lower-case hex (hashed when not hex)."""
    return hex_id(value, 8)


def decode_micros(value: Any, what: str) -> int | None:
    """A microsecond count (int, or a float with no fraction); None when absent."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise BadRecord(BAD_TIME, f"{what} {value!r}")


# --- fields carried in tags ---------------------------------------------------------------------------------------
# Each field has a reader (tags -> value) and a writer (value, the span's other tags -> tags to add where absent);
# take_field uses the writer to decide which tags reading may remove.


def _derive_status(tags: Mapping[str, AttrValue]) -> Status:
    code_tag, err, desc = tags.get(TAG_STATUS_CODE), tags.get(TAG_ERROR), tags.get(TAG_STATUS_DESCRIPTION)
    code = STATUS_FROM_TAG.get(code_tag.upper()) if isinstance(code_tag, str) else None
    if err is not None:  # Zipkin: any error tag means the span failed
        code = StatusCode.ERROR
    if code is None:
        return STATUS_UNSET
    if isinstance(desc, str):
        message = desc
    elif code is StatusCode.ERROR and isinstance(err, str) and err != "true":
        message = err  # Zipkin's error tag holds the message; "true" is only a flag
    else:
        message = ""
    return Status(code, message)


def tags_say_error(attrs: Mapping[str, AttrValue], message: str) -> bool:
    """Whether ``otel.status_code`` (any spelling) and ``otel.status_description`` in ``attrs`` already give status
    ERROR with ``message``, as the Collector's own Zipkin test data spells it (no ``error`` tag)."""
    code, desc = attrs.get(TAG_STATUS_CODE), attrs.get(TAG_STATUS_DESCRIPTION)
    if not isinstance(code, str) or STATUS_FROM_TAG.get(code.upper()) is not StatusCode.ERROR:
        return False
    return desc == message if isinstance(desc, str) else desc is None and not message


def _status_tags(status: Status, attrs: Mapping[str, AttrValue]) -> dict[str, str]:
    if status.code is StatusCode.OK:
        out = {TAG_STATUS_CODE: STATUS_TO_TAG[StatusCode.OK]}
        if status.message:
            out[TAG_STATUS_DESCRIPTION] = status.message
        return out
    if status.code is StatusCode.ERROR:
        if TAG_ERROR in attrs or tags_say_error(attrs, status.message):
            return {}  # the span's own tags already say it failed (and why): trust them as they are
        out = {TAG_STATUS_CODE: STATUS_TO_TAG[StatusCode.ERROR], TAG_ERROR: status.message}
        if status.message == "true":  # would read back as the bare flag "true"; say it is the message
            out[TAG_STATUS_DESCRIPTION] = status.message
        return out
    return {}


def scope_from_tags(tags: Mapping[str, AttrValue]) -> Scope | None:
    name, version = tags.get(TAG_SCOPE_NAME), tags.get(TAG_SCOPE_VERSION)
    if name is None and version is None:
        name, version = tags.get(LEGACY_SCOPE_NAME), tags.get(LEGACY_SCOPE_VERSION)
    name = name if isinstance(name, str) else ""
    version = version if isinstance(version, str) else ""
    return Scope(name, version) if name or version else None


def scope_tags(scope: Scope | None, attrs: Mapping[str, AttrValue] | None = None) -> dict[str, str]:
    out = {}
    if scope is not None and scope.name:
        out[TAG_SCOPE_NAME] = scope.name
    if scope is not None and scope.version:
        out[TAG_SCOPE_VERSION] = scope.version
    return out


SCOPE_KEYS = (TAG_SCOPE_NAME, TAG_SCOPE_VERSION, LEGACY_SCOPE_NAME, LEGACY_SCOPE_VERSION)
STATUS_KEYS = (TAG_STATUS_CODE, TAG_ERROR, TAG_STATUS_DESCRIPTION)


def _kind_tags(kind: SpanKind, attrs: Mapping[str, AttrValue] | None = None) -> dict[str, str]:
    return {TAG_SPAN_KIND: INTERNAL_KIND} if kind is SpanKind.INTERNAL else {}


def _trace_state_tags(trace_state: str, attrs: Mapping[str, AttrValue] | None = None) -> dict[str, str]:
    return {TAG_TRACE_STATE: trace_state} if trace_state else {}


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _split_encoded(value: str) -> Iterable[tuple[str, dict, int]]:
    """Every way to read ``value`` as ``head|{json object}|count`` (the head may itself contain ``|``)."""
    head_end = value.rfind("|")
    if head_end < 0 or not _DIGITS.fullmatch(value[head_end + 1 :]):
        return
    count = int(value[head_end + 1 :])
    start = value.find("|{")
    while 0 <= start < head_end:
        obj = _json_object(value[start + 1 : head_end])
        if obj is not None:
            yield value[:start], obj, count
        start = value.find("|{", start + 1)


def _encode_annotation_value(event: Event) -> str:
    if not event.attributes and not event.dropped_attributes_count:
        return event.name
    return f"{event.name}|{json_text(event.attributes)}|{event.dropped_attributes_count}"


def _decode_annotation(value: Any, where: str, report: ReadReport) -> Event | None:
    if not isinstance(value, dict):
        report.problem(where, BAD_ANNOTATION, f"expected an object, got {type(value).__name__}", dropped=0)
        return None
    try:
        ts = decode_micros(value.get("timestamp"), "annotation timestamp")
    except BadRecord as exc:
        report.problem(where, BAD_ANNOTATION, exc.detail, dropped=0)
        return None
    text = value.get("value")
    if ts is None or not isinstance(text, str):
        report.problem(where, BAD_ANNOTATION, f"timestamp {value.get('timestamp')!r}, value {text!r}", dropped=0)
        return None
    for name, attrs, dropped in _split_encoded(text):
        event = Event(ts * US, name, attrs, dropped)
        if _encode_annotation_value(event) == text:  # only what write puts back exactly is decoded
            return event
    return Event(ts * US, text)


def _encode_link(link: Link) -> str:
    return (
        f"{link.trace_id}|{link.span_id}|{link.trace_state}|{json_text(link.attributes)}"
        f"|{link.dropped_attributes_count}"
    )


def _decode_link(value: AttrValue) -> Link | None:
    if not isinstance(value, str):
        return None
    for head, attrs, dropped in _split_encoded(value):
        parts = head.split("|", 2)
        if len(parts) != 3 or not (_HEX.fullmatch(parts[0]) and _HEX.fullmatch(parts[1])):
            continue
        link = Link(parts[0], parts[1], parts[2], attrs, dropped)
        if _encode_link(link) == value:  # only what write puts back exactly is decoded
            return link
    return None


def _take_links(tags: dict[str, AttrValue]) -> tuple[list[Link], dict[str, AttrValue]]:
    """Links from ``otlp.link.0``, ``otlp.link.1``, ... (stopping at the first that does not re-encode exactly)."""
    links: list[Link] = []
    for i in range(MAX_LINK_TAGS):
        link = _decode_link(tags.get(f"{LINK_TAG_PREFIX}{i}"))
        if link is None:
            break
        links.append(link)
    if links:
        used = {f"{LINK_TAG_PREFIX}{i}" for i in range(len(links))}
        tags = {k: v for k, v in tags.items() if k not in used}
    return links, tags


# --- decoding one span --------------------------------------------------------------------------------------------


def _decode_tags(value: Any, report: ReadReport) -> dict[str, AttrValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRecord(MALFORMED_SPAN, f"tags is {type(value).__name__}, expected an object")
    tags: dict[str, AttrValue] = {}
    for k, v in value.items():
        if not isinstance(v, str):
            # Zipkin rejects these; keep the value as the string a Zipkin server would have refused.
            report.repair(REPAIR_NON_STRING_TAG)
            v = attribute_string(v) if isinstance(v, (bool, int, float)) or v is None else json_text(v)
        tags[k] = v
    return tags


def _ip(value: Any, version: int) -> str | None:
    """``value`` if it is an IPv4 (``version`` 4) or IPv6 address string, else None.

    IPv4 is checked by hand: real (anonymised) Zipkin data has octets like ``04``, which Zipkin accepts and
    Python's :mod:`ipaddress` refuses.
    """
    if not isinstance(value, str):
        return None
    if version == 4:
        octets = value.split(".")
        ok = len(octets) == 4 and all(0 < len(o) <= 3 and o.isascii() and o.isdigit() and int(o) <= 255 for o in octets)
        return value if ok else None
    try:
        return value if ipaddress.ip_address(value).version == 6 else None
    except ValueError:
        return None


def _decode_endpoint(value: Any, keys: EndpointKeys, attrs: dict[str, AttrValue], report: ReadReport) -> str:
    """Put an endpoint's fields into ``attrs``; returns its serviceName ("" when none)."""
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise BadRecord(MALFORMED_SPAN, f"endpoint is {type(value).__name__}, expected an object")
    service = value.get("serviceName")
    if not isinstance(service, str):
        if service is not None:
            report.repair(REPAIR_BAD_ENDPOINT)
        service = ""
    ipv4, ipv6, port = value.get("ipv4"), value.get("ipv6"), value.get("port")
    if ipv4 is not None and _ip(ipv4, 4) is None:
        report.repair(REPAIR_BAD_ENDPOINT)
        ipv4 = None
    if ipv6 is not None and _ip(ipv6, 6) is None:
        report.repair(REPAIR_BAD_ENDPOINT)
        ipv6 = None
    if port is not None and not (type(port) is int and 0 < port < 65536):
        if port != 0:  # 0 is Zipkin's "no port"
            report.repair(REPAIR_BAD_ENDPOINT)
        port = None
    if keys.service is not None and service:
        attrs[keys.service] = service
    if ipv4 is not None:
        attrs[keys.ip] = ipv4
    if ipv6 is not None:
        attrs[keys.ipv6_also if ipv4 is not None else keys.ip] = ipv6
    if port is not None:
        attrs[keys.port] = port
    return service


def _decode_span(obj: Any, where: str, report: ReadReport) -> Span:
    """One Zipkin span as a canonical span, its id as written (shared ids are resolved per trace later)."""
    if not isinstance(obj, dict):
        raise BadRecord(MALFORMED_SPAN, f"expected an object, got {type(obj).__name__}")
    trace_id = _decode_id(obj.get("traceId"), 32, BAD_TRACE_ID, report)
    span_id = _decode_id(obj.get("id"), 16, BAD_SPAN_ID, report)
    parent_id = obj.get("parentId")
    if parent_id is not None:
        parent_id = _decode_id(parent_id, 16, BAD_PARENT_ID, report)
        if parent_id == "0" * 16:
            report.repair(REPAIR_ZERO_PARENT)
            parent_id = None
    name = obj.get("name")
    if name is None:
        name = ""
    elif not isinstance(name, str):
        raise BadRecord(MALFORMED_SPAN, f"name {name!r}")
    timestamp = decode_micros(obj.get("timestamp"), "timestamp")
    duration = decode_micros(obj.get("duration"), "duration")

    tags = _decode_tags(obj.get("tags"), report)
    kind_name = obj.get("kind")
    kind = KIND_FROM_ZIPKIN.get(kind_name, SpanKind.UNSPECIFIED) if isinstance(kind_name, str) else SpanKind.UNSPECIFIED
    if kind_name is not None and kind is SpanKind.UNSPECIFIED:
        report.repair(REPAIR_UNKNOWN_KIND)
    if kind_name is None and tags.get(TAG_SPAN_KIND) == INTERNAL_KIND:
        kind = SpanKind.INTERNAL
        tags = take_field(tags, (TAG_SPAN_KIND,), kind, SpanKind.UNSPECIFIED, _kind_tags)
    status = _derive_status(tags)
    tags = take_field(tags, STATUS_KEYS, status, STATUS_UNSET, _status_tags)
    scope = scope_from_tags(tags)
    tags = take_field(tags, SCOPE_KEYS, scope, None, scope_tags)
    trace_state = tags.get(TAG_TRACE_STATE)
    trace_state = trace_state if isinstance(trace_state, str) else ""
    tags = take_field(tags, (TAG_TRACE_STATE,), trace_state, "", _trace_state_tags)
    links, tags = _take_links(tags)

    attrs = tags
    service = _decode_endpoint(obj.get("localEndpoint"), LOCAL_ENDPOINT, attrs, report)
    _decode_endpoint(obj.get("remoteEndpoint"), REMOTE_ENDPOINT, attrs, report)
    if obj.get("shared") is True:
        attrs[ATTR_SHARED] = True
    if obj.get("debug") is True:
        attrs[ATTR_DEBUG] = True
    if timestamp is None:
        report.repair(REPAIR_NO_TIMESTAMP)
        attrs[ATTR_START_ABSENT] = True
        timestamp = 0
    if duration is None:
        report.repair(REPAIR_NO_DURATION)
        duration = 0

    events = []
    annotations = obj.get("annotations")
    if annotations is not None and not isinstance(annotations, list):
        raise BadRecord(MALFORMED_SPAN, f"annotations is {type(annotations).__name__}, expected a list")
    for i, a in enumerate(annotations or ()):
        event = _decode_annotation(a, f"{where}.annotations[{i}]", report)
        if event is not None:
            events.append(event)

    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent_id,
        service=service,
        name=name,
        start_ns=timestamp * US,
        end_ns=(timestamp + duration) * US,
        kind=kind,
        status=status,
        attributes=attrs,
        resource=Resource({SERVICE_NAME: service}) if service else None,
        scope=scope,
        events=events,
        links=links,
        trace_state=trace_state,
    )


# --- shared span ids -----------------------------------------------------------------------------------------------


def _is_shared(span: Span) -> bool:
    return span.attributes.get(ATTR_SHARED) is True


def _primary(members: list[Span]) -> Span:
    """The span of a same-id group that keeps the id: the client half, else the first non-shared, else the first."""
    for m in members:
        if m.kind is SpanKind.CLIENT and not _is_shared(m):
            return m
    for m in members:
        if not _is_shared(m):
            return m
    return members[0]


def _pick_parent(members: list[Span], primary: Span, child: Span) -> Span:
    """Which span of a same-id group a child naming that id hangs under.

    Work under a shared id is the server side's, so, as Zipkin's own tree builder does, prefer a member in the
    child's service (on the child's own address and port when several are), then a shared (server) half; the
    first of equals wins, and the primary when the group has no other member.
    """
    ip, port = LOCAL_ENDPOINT.ip, LOCAL_ENDPOINT.port
    best, best_score = primary, None
    for m in members:
        if m is child:
            continue
        same_service = m.service == child.service
        same_instance = same_service and m.attributes.get(ip) == child.attributes.get(ip) and m.attributes.get(
            port
        ) == child.attributes.get(port)
        score = (same_service, same_instance, _is_shared(m))
        if best_score is None or score > best_score:  # strict: the first of equals wins
            best, best_score = m, score
    return best


def _resolve_shared_ids(spans: list[Span], report: ReadReport) -> None:
    """Give every span of one trace a unique id, keeping what write needs to restore Zipkin's ids."""
    groups: dict[str, list[Span]] = {}
    for s in spans:
        groups.setdefault(s.span_id, []).append(s)
    multi = {sid: members for sid, members in groups.items() if len(members) > 1}
    if not multi:
        return
    original_parent = {id(s): s.parent_id for s in spans}
    taken = set(groups)
    primary_of: dict[str, Span] = {}
    derived: set[int] = set()
    for sid, members in multi.items():
        primary = primary_of[sid] = _primary(members)
        for index, m in enumerate(members):
            if m is primary:
                continue
            new_id = derived_span_id(m.trace_id, sid, index, taken)
            taken.add(new_id)
            m.attributes[ATTR_ZIPKIN_ID] = sid
            m.attributes[ATTR_ZIPKIN_PARENT_ID] = original_parent[id(m)] or ""
            m.span_id = new_id
            derived.add(id(m))
            report.repair(REPAIR_SHARED_ID)
    for s in spans:
        if id(s) in derived and _is_shared(s):
            primary = primary_of[s.attributes[ATTR_ZIPKIN_ID]]
            if not _is_shared(primary):  # the server half of an RPC is the child of its client half
                s.parent_id = primary.span_id
                continue
        parent = original_parent[id(s)]
        if parent in multi:
            s.parent_id = _pick_parent(multi[parent], primary_of[parent], s).span_id


# --- read ----------------------------------------------------------------------------------------------------------


def _records(data: list, source: str) -> Iterable[tuple[str, Any]]:
    """``(where, span object)`` from a span list, or from a list of span lists (``/api/v2/traces``)."""
    for i, item in enumerate(data):
        if isinstance(item, list):
            for j, obj in enumerate(item):
                yield f"{source}: [{i}][{j}]", obj
        else:
            yield f"{source}: [{i}]", item


def _read_text(text: str, source: str, report: ReadReport) -> list[Span]:
    data = load_json(text, source, report)
    if data is NOT_JSON:
        return []
    if not isinstance(data, list):
        report.problem(source, NOT_A_SPAN_LIST, f"top level is a JSON {type(data).__name__}", dropped=0)
        return []
    spans: list[Span] = []
    for where, obj in _records(data, source):
        try:
            spans.append(_decode_span(obj, where, report))
        except BadRecord as exc:
            report.problem(where, exc.reason, exc.detail)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # a wrong JSON type somewhere
            report.problem(where, MALFORMED_SPAN, f"{type(exc).__name__}: {exc}")
    report.counts[COUNT_SPANS] += len(spans)
    return spans


def _assemble(spans: list[Span], report: ReadReport) -> list[Trace]:
    groups: dict[str, list[Span]] = {}
    for s in spans:
        groups.setdefault(s.trace_id, []).append(s)
    traces = []
    for trace_id, members in groups.items():
        _resolve_shared_ids(members, report)
        traces.append(Trace(members, trace_id))
    return traces


def loads(text: str, source: str = "<string>", report: ReadReport | None = None) -> list[Trace]:
    """Zipkin v2 JSON text as traces (first-seen order; spans in file order). Problems go to ``report``."""
    report = report if report is not None else ReadReport()
    return _assemble(_read_text(text, source, report), report)


def read(paths: Iterable[str | Path], report: ReadReport | None = None) -> list[Trace]:
    """Zipkin v2 JSON files (plain or gzip) as traces, grouped by trace id across all files.

    Shared span ids are resolved after grouping, so the two halves of an RPC may sit in different files.
    """
    report = report if report is not None else ReadReport()
    spans: list[Span] = []
    for source, text in read_text_files(paths, report):
        spans.extend(_read_text(text, source, report))
    return _assemble(spans, report)


# --- write ---------------------------------------------------------------------------------------------------------


def _encode_endpoint(service: str, attrs: dict[str, AttrValue], keys: EndpointKeys) -> dict[str, Any]:
    """A Zipkin endpoint from the span's service and the endpoint attributes, which are taken out of ``attrs``."""
    if keys.service is not None:
        peer = attrs.get(keys.service)
        service = attrs.pop(keys.service) if isinstance(peer, str) and peer else ""
    ip = attrs.get(keys.ip)
    ipv4, ipv6 = _ip(ip, 4), _ip(ip, 6)
    if ipv4 is not None or ipv6 is not None:
        del attrs[keys.ip]
    if ipv4 is not None and _ip(attrs.get(keys.ipv6_also), 6) is not None:
        ipv6 = attrs.pop(keys.ipv6_also)
    port = attrs.get(keys.port)
    if type(port) is int and 0 < port < 65536:
        del attrs[keys.port]
    else:
        port = None
    endpoint: dict[str, Any] = {}
    if service:
        endpoint["serviceName"] = service
    if ipv4 is not None:
        endpoint["ipv4"] = ipv4
    if ipv6 is not None:
        endpoint["ipv6"] = ipv6
    if port is not None:
        endpoint["port"] = port
    return endpoint


def _pop_flag(attrs: dict[str, AttrValue], key: str) -> bool:
    if attrs.get(key) is True:
        del attrs[key]
        return True
    return False


def _is_zipkin_span_id(value: AttrValue) -> bool:
    return isinstance(value, str) and len(value) == 16 and _HEX.fullmatch(value) is not None and value == value.lower()


def _zipkin_id_of(span: Span) -> str:
    marker = span.attributes.get(ATTR_ZIPKIN_ID)
    return marker if _is_zipkin_span_id(marker) else zipkin_span_id(span.span_id)  # type: ignore[return-value]


def _link_id(value: str, nbytes: int) -> str:
    # Hex ids are kept as they are (so the tag reads back identically); others are mapped like span ids.
    return value if _HEX.fullmatch(value) and len(value) <= 2 * nbytes else hex_id(value, nbytes)


def _link_tags(links: list[Link]) -> dict[str, str]:
    out = {}
    for i, link in enumerate(links[:MAX_LINK_TAGS]):
        if not (_HEX.fullmatch(link.trace_id) and _HEX.fullmatch(link.span_id)):
            link = Link(_link_id(link.trace_id, 16), _link_id(link.span_id, 8), link.trace_state, link.attributes,
                        link.dropped_attributes_count)
        out[f"{LINK_TAG_PREFIX}{i}"] = _encode_link(link)
    return out


def _encode_span(span: Span, zipkin_ids: Mapping[str, str]) -> dict[str, Any]:
    """One canonical span as a Zipkin v2 span; ``zipkin_ids`` maps the trace's canonical span ids to Zipkin's."""
    attrs = dict(span.attributes)
    zid = _zipkin_id_of(span)
    if attrs.get(ATTR_ZIPKIN_ID) == zid:  # the marker became the id
        del attrs[ATTR_ZIPKIN_ID]
    parent_marker = attrs.get(ATTR_ZIPKIN_PARENT_ID)
    if isinstance(parent_marker, str) and (parent_marker == "" or _is_zipkin_span_id(parent_marker)):
        del attrs[ATTR_ZIPKIN_PARENT_ID]
        parent = parent_marker or None
    elif span.parent_id is None:
        parent = None
    else:
        parent = zipkin_ids.get(span.parent_id) or zipkin_span_id(span.parent_id)
    shared = _pop_flag(attrs, ATTR_SHARED)
    debug = _pop_flag(attrs, ATTR_DEBUG)
    start_absent = _pop_flag(attrs, ATTR_START_ABSENT)
    local = _encode_endpoint(span.service, attrs, LOCAL_ENDPOINT)
    remote = _encode_endpoint("", attrs, REMOTE_ENDPOINT)

    tags: dict[str, str] = {}
    if span.resource is not None:  # resource attributes ride along as tags, as the Collector writes them
        tags.update((k, attribute_string(v)) for k, v in span.resource.attributes.items() if k != SERVICE_NAME)
    tags.update((k, attribute_string(v)) for k, v in attrs.items())
    for derived in (
        _kind_tags(span.kind),
        _status_tags(span.status, tags),
        scope_tags(span.scope),
        _trace_state_tags(span.trace_state),
        _link_tags(span.links),
    ):
        for k, v in derived.items():
            tags.setdefault(k, v)  # a span's own attribute always wins

    out: dict[str, Any] = {"traceId": zipkin_trace_id(span.trace_id)}
    if parent is not None:
        out["parentId"] = parent
    out["id"] = zid
    if span.kind in KIND_TO_ZIPKIN:
        out["kind"] = KIND_TO_ZIPKIN[span.kind]
    if span.name:
        out["name"] = span.name
    if not start_absent:
        out["timestamp"] = span.start_ns // US
    duration = span.end_ns // US - span.start_ns // US  # see "Times" in the module docstring
    if duration:
        out["duration"] = duration
    if local:
        out["localEndpoint"] = local
    if remote:
        out["remoteEndpoint"] = remote
    if span.events:
        out["annotations"] = [{"timestamp": e.time_ns // US, "value": _encode_annotation_value(e)} for e in span.events]
    if tags:
        out["tags"] = dict(sorted(tags.items()))
    if debug:
        out["debug"] = True
    if shared:
        out["shared"] = True
    return out


def encode(traces: Iterable[Trace]) -> list[dict[str, Any]]:
    """Traces as one Zipkin v2 span list (JSON-ready objects), spans in trace order."""
    out = []
    for trace in traces:
        zipkin_ids: dict[str, str] = {}
        for s in trace.spans:
            zipkin_ids.setdefault(s.span_id, _zipkin_id_of(s))
        out.extend(_encode_span(s, zipkin_ids) for s in trace.spans)
    return out


def dumps(traces: Iterable[Trace], indent: int | None = None) -> str:
    """Traces as Zipkin v2 JSON text (ASCII-escaped, so any string survives any file encoding)."""
    return json.dumps(encode(traces), indent=indent)


def write(traces: list[Trace], path: Path) -> None:
    """Write traces as one Zipkin v2 JSON span list (gzipped when the name ends in ``.gz``)."""
    with open_write_text(Path(path)) as fh:
        fh.write(dumps(traces))
        fh.write("\n")
