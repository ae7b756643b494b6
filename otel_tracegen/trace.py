"""The canonical trace form every adapter reads into and writes from.

A :class:`Span` carries what OTLP carries (ids, service, name, kind, ns timestamps, status, typed attributes,
resource, scope, events, links, trace state, flags and dropped counts), so OTLP -> canonical -> OTLP loses
nothing. Formats that carry less (span CSV, Zipkin, Jaeger, Alibaba rows) fill what they have and leave the
rest at the defaults.

A :class:`Trace` is built from spans in any order and answers the structural questions: roots, children of a
span in start order (a *layer*), depth, and a networkx graph for anything more.

Ids are strings. OTLP, Jaeger and Zipkin ids are lower-case hex as read (a 64-bit Zipkin trace id stays 16
characters), so every round trip keeps them; formats with other ids (Alibaba's rpc_id ``0.1.3``) keep theirs
and writers that need hex map them through :func:`hex_id`.
"""

from __future__ import annotations

import enum
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Union

if TYPE_CHECKING:  # networkx is only imported when a graph is asked for
    import networkx as nx

AttrValue = Union[str, bool, int, float, bytes, list, dict, None]
"""An OTLP ``AnyValue``: scalars, a list of values (array) or a str-keyed dict (kvlist). ``None`` is an empty value."""

SERVICE_NAME = "service.name"


class SpanKind(enum.IntEnum):
    """OTLP span kinds, numbered as in ``opentelemetry.proto.trace.v1.Span.SpanKind``."""

    UNSPECIFIED = 0
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class StatusCode(enum.IntEnum):
    """OTLP status codes, numbered as in ``opentelemetry.proto.trace.v1.Status.StatusCode``."""

    UNSET = 0
    OK = 1
    ERROR = 2


def freeze(value: Any) -> Any:
    """A hashable, type-exact stand-in for an attribute value (``1``, ``1.0`` and ``True`` stay distinct)."""
    if isinstance(value, dict):
        return ("kv", tuple((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("arr", tuple(freeze(v) for v in value))
    return (type(value).__name__, value)


@dataclass(frozen=True)
class Status:
    code: StatusCode = StatusCode.UNSET
    message: str = ""


STATUS_UNSET = Status()


@dataclass(eq=True)
class Resource:
    """The entity that produced spans: its attributes (``service.name`` among them) and schema URL."""

    attributes: dict[str, AttrValue] = field(default_factory=dict)
    dropped_attributes_count: int = 0
    schema_url: str = ""

    def key(self) -> tuple:
        """Hashable identity, so writers can group spans by resource."""
        return (freeze(self.attributes), self.dropped_attributes_count, self.schema_url)

    @property
    def service(self) -> str | None:
        value = self.attributes.get(SERVICE_NAME)
        return value if isinstance(value, str) else None


@dataclass(eq=True)
class Scope:
    """The instrumentation scope (library) that recorded spans."""

    name: str = ""
    version: str = ""
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    dropped_attributes_count: int = 0
    schema_url: str = ""

    def key(self) -> tuple:
        return (self.name, self.version, freeze(self.attributes), self.dropped_attributes_count, self.schema_url)


@dataclass(eq=True)
class Event:
    time_ns: int
    name: str
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    dropped_attributes_count: int = 0


@dataclass(eq=True)
class Link:
    trace_id: str
    span_id: str
    trace_state: str = ""
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    dropped_attributes_count: int = 0
    flags: int = 0


@dataclass(eq=True, slots=True)
class Span:
    """One span. ``parent_id`` is ``None`` for a root. Times are Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    name: str
    start_ns: int
    end_ns: int
    kind: SpanKind = SpanKind.UNSPECIFIED
    status: Status = STATUS_UNSET
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    resource: Resource | None = None
    scope: Scope | None = None
    events: list[Event] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    trace_state: str = ""
    flags: int = 0
    dropped_attributes_count: int = 0
    dropped_events_count: int = 0
    dropped_links_count: int = 0

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def operation(self) -> str:
        """The paper's word for the span name."""
        return self.name

    def resource_or_default(self) -> Resource:
        """The span's resource, with ``service.name`` guaranteed to be the span's service."""
        res = self.resource
        if res is None:
            return Resource({SERVICE_NAME: self.service})
        if res.attributes.get(SERVICE_NAME) != self.service:
            attrs = dict(res.attributes)
            attrs[SERVICE_NAME] = self.service
            return Resource(attrs, res.dropped_attributes_count, res.schema_url)
        return res


def _start_order(span: Span) -> tuple:
    return (span.start_ns, span.end_ns, span.span_id)


class Trace:
    """The spans of one trace id, in any order, with the tree they form.

    Malformed traces (several roots, orphans, duplicate ids, cycles) are representable so the validator can
    name what is wrong; the structural helpers then describe what is there rather than fail.
    """

    __slots__ = ("trace_id", "spans", "_by_id", "_children", "_roots")

    def __init__(self, spans: Iterable[Span], trace_id: str | None = None):
        self.spans: list[Span] = list(spans)
        if trace_id is None:
            if not self.spans:
                raise ValueError("a trace needs a trace_id or at least one span")
            trace_id = self.spans[0].trace_id
        self.trace_id = trace_id
        self._by_id: dict[str, Span] | None = None
        self._children: dict[str | None, list[Span]] | None = None
        self._roots: list[Span] | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def __iter__(self) -> Iterator[Span]:
        return iter(self.spans)

    def __repr__(self) -> str:
        return f"Trace({self.trace_id!r}, {len(self.spans)} spans)"

    def invalidate(self) -> None:
        """Forget cached structure after spans were added, removed or re-parented."""
        self._by_id = self._children = self._roots = None

    # --- structure ------------------------------------------------------------------------------------------
    @property
    def by_id(self) -> dict[str, Span]:
        """Span id -> span (the first one, where an id is duplicated)."""
        if self._by_id is None:
            by_id: dict[str, Span] = {}
            for s in self.spans:
                by_id.setdefault(s.span_id, s)
            self._by_id = by_id
        return self._by_id

    def _index(self) -> None:
        by_id = self.by_id
        children: dict[str | None, list[Span]] = defaultdict(list)
        roots = []
        for s in self.spans:
            if s.parent_id is None:
                roots.append(s)
            elif s.parent_id in by_id:
                children[s.parent_id].append(s)
        for kids in children.values():
            kids.sort(key=_start_order)
        roots.sort(key=_start_order)
        self._children = dict(children)
        self._roots = roots

    @property
    def roots(self) -> list[Span]:
        """Spans without a parent id, in start order."""
        if self._roots is None:
            self._index()
        return self._roots  # type: ignore[return-value]

    @property
    def root(self) -> Span | None:
        """The single root, or None when there are none or several."""
        roots = self.roots
        return roots[0] if len(roots) == 1 else None

    def children(self, span_or_id: Span | str) -> list[Span]:
        """The layer under a span: its children in start order."""
        if self._children is None:
            self._index()
        sid = span_or_id.span_id if isinstance(span_or_id, Span) else span_or_id
        return self._children.get(sid, [])  # type: ignore[union-attr]

    def orphans(self) -> list[Span]:
        """Spans whose parent id names no span in this trace."""
        by_id = self.by_id
        return [s for s in self.spans if s.parent_id is not None and s.parent_id not in by_id]

    def walk(self, start: Span | None = None) -> Iterator[tuple[Span, int]]:
        """Depth-first (pre-order) ``(span, depth)`` from ``start`` (default: every root), depth 1 at ``start``.

        Children come in start order. Each span is visited once even if ids repeat or loop.
        """
        starts = [start] if start is not None else self.roots
        seen: set[int] = set()
        stack = [(s, 1) for s in reversed(starts)]
        while stack:
            span, d = stack.pop()
            if id(span) in seen:
                continue
            seen.add(id(span))
            yield span, d
            stack.extend((c, d + 1) for c in reversed(self.children(span)))

    def layers(self) -> Iterator[tuple[Span, list[Span]]]:
        """``(parent, children)`` for every span with children, breadth-first from the roots."""
        queue = list(self.roots)
        seen: set[int] = set()
        i = 0
        while i < len(queue):
            span = queue[i]
            i += 1
            if id(span) in seen:
                continue
            seen.add(id(span))
            kids = self.children(span)
            if kids:
                yield span, kids
                queue.extend(kids)

    @property
    def depth(self) -> int:
        """Spans on the longest root-to-leaf path (a lone root has depth 1; 0 for no reachable span)."""
        return max((d for _, d in self.walk()), default=0)

    @property
    def start_ns(self) -> int:
        return min(s.start_ns for s in self.spans)

    @property
    def end_ns(self) -> int:
        return max(s.end_ns for s in self.spans)

    @property
    def services(self) -> set[str]:
        return {s.service for s in self.spans}

    def graph(self) -> "nx.DiGraph":
        """A networkx DiGraph over span ids, with edges parent -> child and each node's ``span`` attribute."""
        import networkx as nx

        g = nx.DiGraph()
        for s in self.spans:
            g.add_node(s.span_id, span=s)
        for s in self.spans:
            if s.parent_id is not None and s.parent_id in g:
                g.add_edge(s.parent_id, s.span_id)
        return g


def self_time_ns(span: Span, children: list[Span]) -> int:
    """``span``'s duration minus the union of its children's intervals clipped to it (never below zero)."""
    if not children:
        return max(0, span.end_ns - span.start_ns)
    lo, hi = span.start_ns, span.end_ns
    covered, cur_a, cur_b = 0, None, None
    for a, b in sorted((max(c.start_ns, lo), min(c.end_ns, hi)) for c in children):
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                covered += cur_b - cur_a
            cur_a, cur_b = a, b
        elif b > cur_b:
            cur_b = b
    if cur_b is not None:
        covered += cur_b - cur_a
    return max(0, hi - lo - covered)


def group_traces(spans: Iterable[Span]) -> list[Trace]:
    """Group spans by trace id, keeping first-seen order of traces."""
    groups: dict[str, list[Span]] = {}
    for s in spans:
        lst = groups.get(s.trace_id)
        if lst is None:
            groups[s.trace_id] = [s]
        else:
            lst.append(s)
    return [Trace(v, k) for k, v in groups.items()]


def iter_spans(traces: Iterable[Trace]) -> Iterator[Span]:
    for t in traces:
        yield from t.spans


_HEX = frozenset("0123456789abcdef")


def hex_id(value: str, nbytes: int) -> str:
    """``value`` as ``nbytes`` of lower-case hex for formats that require it.

    Hex ids shorter than required are left-padded with zeros (a 64-bit Zipkin trace id in a 128-bit OTLP
    field, as Zipkin itself does); anything else (``0.1.3``, ``T_123``, and ids that would be all zeros, such as
    ``0``) is hashed, deterministically, so the same source id always maps to the same hex id and parent links
    survive.
    """
    v = value.lower()
    if len(v) <= 2 * nbytes and v and set(v) <= _HEX and (len(v) == 2 * nbytes or v.strip("0")):
        return v.rjust(2 * nbytes, "0")
    # Padding a short zero id ("0", Alibaba's root rpc_id) would make the all-zero id OTLP treats as invalid,
    # so such ids are hashed like non-hex ones. A full-length id is the format's own and stays as it is.
    return hashlib.blake2b(value.encode(), digest_size=nbytes).hexdigest()
