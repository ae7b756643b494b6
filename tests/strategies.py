"""Hypothesis strategies for canonical traces, and a type-exact view of spans to compare them by.

Shared by the format tests (``from tests.strategies import traces, attribute_values, exact_spans``):

- :func:`traces`: one valid tree :class:`Trace` (one root, parents before children, children inside their
  parent's time span), hex ids, every OTLP field populated when ``rich`` (resources, scopes, events, links, trace
  state, flags, dropped counts); ``rich=False`` keeps to what every format carries.
- :func:`attribute_values`: any OTLP ``AnyValue`` (str, bool, int64, double, bytes, None, arrays, kvlists).
- :func:`exact_spans`: spans as hashable, order-independent, *type-exact* tuples: ``Span.__eq__`` says
  ``{"a": 1} == {"a": True}`` and ``0.0 == -0.0``; a format that turns one into the other should fail a
  round-trip test, so compare ``exact_spans(a) == exact_spans(b)``.
"""

from __future__ import annotations

from typing import Any, Iterable

from hypothesis import strategies as st

from otel_tracegen.trace import (
    SERVICE_NAME,
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

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
U32_MAX, U64_MAX = (1 << 32) - 1, (1 << 64) - 1

# Realistic keys and names mixed with arbitrary text, so both the common path and odd input are exercised.
_KEYS = ["http.method", "http.status_code", "http.url", "rpc.system", "db.statement", "net.peer.name", "error"]
_SERVICES = ["frontend", "cartservice", "checkoutservice", "redis", "ts-order-service"]
_NAMES = ["GET /cart", "oteldemo.CartService/GetCart", "HGET", "SELECT orders", "publish orders"]

_texts = st.text(max_size=12)
_counts = st.one_of(st.just(0), st.integers(0, U32_MAX))  # mostly 0, as in real data


def hex_ids(nbytes: int) -> st.SearchStrategy[str]:
    """Valid OTLP ids: ``nbytes`` random bytes, not all zero, as lower-case hex."""
    return st.binary(min_size=nbytes, max_size=nbytes).filter(any).map(bytes.hex)


def scalar_attribute_values() -> st.SearchStrategy[Any]:
    """str, bool, int64, double (no NaN: it is not equal to itself; infinities and -0.0 included), bytes, None."""
    return st.one_of(
        st.text(max_size=20),
        st.booleans(),
        st.integers(I64_MIN, I64_MAX),
        st.floats(allow_nan=False),
        st.binary(max_size=12),
        st.none(),
    )


def attribute_values(nested: bool = True) -> st.SearchStrategy[Any]:
    """Any OTLP ``AnyValue``: scalars and, when ``nested``, arrays (lists) and kvlists (str-keyed dicts) of them."""
    if not nested:
        return scalar_attribute_values()
    return st.recursive(
        scalar_attribute_values(),
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_texts, children, max_size=4)),
        max_leaves=4,
    )


def attributes(max_size: int = 4, nested: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.one_of(st.sampled_from(_KEYS), _texts), attribute_values(nested), max_size=max_size)


def resources(service: str) -> st.SearchStrategy[Resource]:
    """A resource whose ``service.name`` is ``service`` (what a span's service must agree with)."""
    return st.builds(
        Resource,
        attributes=attributes(3).map(lambda a: {**a, SERVICE_NAME: service}),
        dropped_attributes_count=_counts,
        schema_url=st.sampled_from(["", "https://opentelemetry.io/schemas/1.21.0"]),
    )


def scopes() -> st.SearchStrategy[Scope]:
    return st.builds(
        Scope,
        name=st.one_of(st.sampled_from(["io.opentelemetry.grpc", "opentelemetry.instrumentation.flask"]), _texts),
        version=st.sampled_from(["", "1.0.0", "0.46b0"]),
        attributes=attributes(2),
        dropped_attributes_count=_counts,
        schema_url=st.sampled_from(["", "https://opentelemetry.io/schemas/1.24.0"]),
    )


def events() -> st.SearchStrategy[Event]:
    return st.builds(
        Event,
        time_ns=st.integers(0, U64_MAX),
        name=st.one_of(st.just("exception"), _texts),
        attributes=attributes(2),
        dropped_attributes_count=_counts,
    )


def links() -> st.SearchStrategy[Link]:
    return st.builds(
        Link,
        trace_id=hex_ids(16),
        span_id=hex_ids(8),
        trace_state=st.sampled_from(["", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]),
        attributes=attributes(2),
        dropped_attributes_count=_counts,
        flags=st.one_of(st.sampled_from([0, 0x100, 0x301]), st.integers(0, U32_MAX)),
    )


def statuses() -> st.SearchStrategy[Status]:
    return st.builds(Status, st.sampled_from(list(StatusCode)), st.one_of(st.just(""), _texts))


@st.composite
def traces(draw: st.DrawFn, min_spans: int = 1, max_spans: int = 6, rich: bool = True) -> Trace:
    """One valid tree trace.

    ``rich=True``: every OTLP field is drawn (a resource per service with its ``service.name`` set, scopes or
    none, events, links, trace state, flags, dropped counts, nested attribute values). ``rich=False``: ids,
    service, name, kind, times, status and scalar attributes only (resource and scope left ``None``).
    """
    n = draw(st.integers(min_spans, max_spans))
    trace_id = draw(hex_ids(16))
    span_ids = draw(st.lists(hex_ids(8), min_size=n, max_size=n, unique=True))
    services = draw(
        st.lists(
            st.one_of(st.sampled_from(_SERVICES), st.text(min_size=1, max_size=8)), min_size=1, max_size=3, unique=True
        )
    )
    resource_of = {s: draw(resources(s)) for s in services} if rich else {}
    scope_pool = draw(st.lists(st.one_of(st.none(), scopes()), min_size=1, max_size=2)) if rich else [None]
    root_start = draw(st.integers(1, 1 << 62))
    root_end = root_start + draw(st.integers(0, 10**12))

    spans: list[Span] = []
    for i, span_id in enumerate(span_ids):
        if i == 0:
            parent_id, start, end = None, root_start, root_end
        else:
            parent = spans[draw(st.integers(0, i - 1))]
            parent_id = parent.span_id
            start = draw(st.integers(parent.start_ns, parent.end_ns))
            end = draw(st.integers(start, parent.end_ns))
        service = draw(st.sampled_from(services))
        span = Span(
            trace_id=trace_id,
            span_id=span_id,
            parent_id=parent_id,
            service=service,
            name=draw(st.one_of(st.sampled_from(_NAMES), _texts)),
            start_ns=start,
            end_ns=end,
            kind=draw(st.sampled_from(list(SpanKind))),
            status=draw(statuses()),
            attributes=draw(attributes(5, nested=rich)),
        )
        if rich:
            span.resource = resource_of[service]
            span.scope = draw(st.sampled_from(scope_pool))
            span.events = draw(st.lists(events(), max_size=2))
            span.links = draw(st.lists(links(), max_size=1))
            span.trace_state = draw(st.sampled_from(["", "rojo=00f067aa0ba902b7"]))
            span.flags = draw(st.one_of(st.sampled_from([0, 0x100, 0x301]), st.integers(0, U32_MAX)))
            span.dropped_attributes_count = draw(_counts)
            span.dropped_events_count = draw(_counts)
            span.dropped_links_count = draw(_counts)
        spans.append(span)
    return Trace(spans, trace_id)


# --- type-exact comparison --------------------------------------------------------------------------------------


def exact(value: Any) -> Any:
    """A hashable stand-in for an attribute value that tells apart what ``==`` does not: types (``1``/``True``/
    ``1.0``), ``0.0``/``-0.0``, and the order of kvlist keys."""
    if isinstance(value, dict):
        return ("kvlist", tuple((type(k).__name__, k, exact(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("array", tuple(exact(v) for v in value))
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


def exact_span(span: Span) -> tuple:
    res, scope = span.resource, span.scope
    return (
        span.trace_id,
        span.span_id,
        span.parent_id,
        span.service,
        span.name,
        span.start_ns,
        span.end_ns,
        int(span.kind),
        int(span.status.code),
        span.status.message,
        exact(span.attributes),
        None if res is None else (exact(res.attributes), res.dropped_attributes_count, res.schema_url),
        None
        if scope is None
        else (scope.name, scope.version, exact(scope.attributes), scope.dropped_attributes_count, scope.schema_url),
        tuple((e.time_ns, e.name, exact(e.attributes), e.dropped_attributes_count) for e in span.events),
        tuple(
            (ln.trace_id, ln.span_id, ln.trace_state, exact(ln.attributes), ln.dropped_attributes_count, ln.flags)
            for ln in span.links
        ),
        span.trace_state,
        span.flags,
        span.dropped_attributes_count,
        span.dropped_events_count,
        span.dropped_links_count,
    )


def exact_spans(spans: Iterable[Span]) -> list[tuple]:
    """Every span, type-exact, sorted by (trace id, span id): equal for two span sets that differ only in order."""
    return sorted((exact_span(s) for s in spans), key=lambda t: (t[0], t[1]))
