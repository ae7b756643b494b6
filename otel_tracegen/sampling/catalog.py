"""What a model has seen: its services, their operations and span kinds, who calls whom, and the entry points.

The constrained sampler masks value positions with it (a known service, an operation that service has, a kind
seen for that operation), and requests are checked against it before any decoding, so that an unknown service,
a depth above anything seen or a call between services that never talk gets an error naming the nearest known
values. It is built from the training split when a model is pre-trained and saved beside the weights as
``catalog.json``; ``otel-tracegen model catalog MODEL --corpus DIR`` (re)builds it for an existing model.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..report import UserError
from ..trace import SpanKind, Trace

CATALOG_FILE = "catalog.json"


@dataclass
class OperationStats:
    """One (service, operation) as seen in the data."""

    count: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # SpanKind name -> spans
    statuses: dict[str, int] = field(default_factory=dict)  # StatusCode name -> spans
    max_below: int = 0  # deepest subtree under a span of this operation (levels below it)
    max_calls: int = 0  # largest subtree under a span of this operation (spans below it; 0 in older catalogs)
    max_fanout: int = 0  # most children of one span of this operation (0 in older catalogs)
    attributes: dict = field(default_factory=dict)  # scalar attributes that >= 90 % of its spans carry, same value


@dataclass(frozen=True)
class MixEntry:
    """Training traces entered at one operation that share a size and the instructions they satisfy.

    ``high_latency``: above the entry's latency p90; ``uncommon``: the (caller service, callee service, callee
    kind) calls among the entry's uncommon ones that the trace makes (the instruct stage tags one of them, drawn
    at random, as an include). Both by the instruct stage's definitions (``lm.data.corpus_stats_for_instructions``).
    ``latencies_us``: each trace's latency (its root's duration), sorted; empty in older catalogs.
    """

    operation: str
    calls: int
    depth: int
    high_latency: bool
    uncommon: tuple[tuple[str, str, str], ...]
    traces: int
    latencies_us: tuple[int, ...] = ()


@dataclass
class Catalog:
    """Services, operations, edges and entries of a corpus (see the module docstring)."""

    operations: dict[str, dict[str, OperationStats]] = field(default_factory=dict)
    edges: dict[str, dict[str, int]] = field(default_factory=dict)  # parent service -> child service -> calls
    entries: dict[str, dict[str, int]] = field(default_factory=dict)  # root service -> root operation -> traces
    traces: int = 0
    max_depth: int = 0  # span levels of the deepest trace
    max_spans: int = 0
    max_root_duration_us: int = 0
    # root service -> root operation -> "spans/levels" -> traces: the sizes requests without --calls/--depth draw
    sizes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    # root service -> root operation -> the p90 of its traces' latency in µs: "high latency" means above it (the
    # instruct adapter's definition, computed the same way), and the grammar holds such a request's root above it
    high_latency_us: dict[str, dict[str, float]] = field(default_factory=dict)
    # parent service -> parent operation -> child service -> child operation -> calls: who calls whom by operation,
    # which tells repair which lost span can sit between a grandparent and its orphans (empty in older catalogs)
    op_edges: dict[str, dict[str, dict[str, dict[str, int]]]] = field(default_factory=dict)
    # root service -> root operation -> [spans, levels, high latency (0/1), [[caller, callee, kind], ...] (the
    # uncommon calls made), traces, [latency in µs of each]]: the sizes, instruction tags and latencies of the
    # training traces, drawn together by requests that give none of them (see `trace_mix`; empty in older catalogs)
    mix: dict[str, dict[str, list[list]]] = field(default_factory=dict)

    # --- building ---

    @classmethod
    def from_traces(cls, traces: Iterable[Trace]) -> Catalog:
        """Count everything over ``traces`` (single-rooted ones; others are skipped)."""
        from ..lm.data import corpus_stats_for_instructions

        traces = list(traces)
        instructions = corpus_stats_for_instructions(traces)  # what the instruct stage tagged, computed alike
        mix: dict[tuple[str, str], dict[tuple, list[int]]] = defaultdict(lambda: defaultdict(list))
        ops: dict[str, dict[str, OperationStats]] = defaultdict(dict)
        edges: dict[str, Counter] = defaultdict(Counter)
        op_edges: Counter = Counter()
        entries: dict[str, Counter] = defaultdict(Counter)
        sizes: dict[tuple[str, str], Counter] = defaultdict(Counter)
        latencies: dict[tuple[str, str], list[int]] = defaultdict(list)
        cat = cls()
        attr_counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for trace in traces:
            root = trace.root
            if root is None:
                continue
            cat.traces += 1
            cat.max_depth = max(cat.max_depth, trace.depth)
            cat.max_spans = max(cat.max_spans, len(trace))
            cat.max_root_duration_us = max(cat.max_root_duration_us, root.duration_ns // 1000)
            entries[root.service][root.name] += 1
            sizes[root.service, root.name][f"{len(trace)}/{trace.depth}"] += 1
            latencies[root.service, root.name].append(root.duration_ns // 1000)  # = encoding.trace_latency_us
            tags = _instruction_tags(trace, instructions)
            if tags is not None:
                high, made, latency = tags
                mix[root.service, root.name][len(trace), trace.depth, high, made].append(latency)
            below: dict[str, int] = {}
            size: dict[str, int] = {}
            for span, _ in reversed(list(trace.walk())):  # children before parents
                kids = trace.children(span)
                below[span.span_id] = 1 + max((below[k.span_id] for k in kids), default=-1)
                size[span.span_id] = sum(1 + size[k.span_id] for k in kids)
                st = ops[span.service].setdefault(span.name, OperationStats())
                st.count += 1
                st.kinds[span.kind.name] = st.kinds.get(span.kind.name, 0) + 1
                st.statuses[span.status.code.name] = st.statuses.get(span.status.code.name, 0) + 1
                st.max_below = max(st.max_below, below[span.span_id])
                st.max_calls = max(st.max_calls, size[span.span_id])
                st.max_fanout = max(st.max_fanout, len(kids))
                if span.attributes:
                    attr_counts[span.service, span.name].update(
                        (k, v) for k, v in span.attributes.items() if isinstance(v, (str, bool, int, float)))
                for k in kids:
                    edges[span.service][k.service] += 1
                    op_edges[span.service, span.name, k.service, k.name] += 1
        for (svc, op), counts in attr_counts.items():
            st = ops[svc][op]
            st.attributes = {k: v for (k, v), n in sorted(counts.items(), key=lambda kv: kv[0][0]) if n >= 0.9 * st.count}
        cat.operations = {s: dict(sorted(o.items())) for s, o in sorted(ops.items())}
        cat.edges = {s: dict(sorted(c.items())) for s, c in sorted(edges.items())}
        cat.entries = {s: dict(sorted(c.items())) for s, c in sorted(entries.items())}
        for (ps, po, cs, co), n in sorted(op_edges.items()):
            cat.op_edges.setdefault(ps, {}).setdefault(po, {}).setdefault(cs, {})[co] = n
        for (svc, op), c in sorted(sizes.items()):
            cat.sizes.setdefault(svc, {})[op] = dict(sorted(c.items()))
        for (svc, op), c in sorted(mix.items()):
            cat.mix.setdefault(svc, {})[op] = [[n, d, int(high), [list(e) for e in calls], len(lat), sorted(lat)]
                                               for (n, d, high, calls), lat in sorted(c.items())]
        from ..lm.data import HIGH_LATENCY_QUANTILE, interpolated_quantile

        for (svc, op), lats in sorted(latencies.items()):
            cat.high_latency_us.setdefault(svc, {})[op] = interpolated_quantile(sorted(lats), HIGH_LATENCY_QUANTILE)
        return cat

    def high_latency_floor_us(self, service: str, operation: str) -> int | None:
        """The smallest root duration (µs) that is "high latency" for this entry, or None when unknown (a catalog
        written before the p90s were recorded)."""
        p90 = self.high_latency_us.get(service, {}).get(operation)
        return None if p90 is None else int(p90) + 1

    def size_mix(self, service: str, operation: str | None = None) -> list[tuple[str, int, int, int]]:
        """(root operation, spans, levels, traces) of the training traces entered at ``service`` (and
        ``operation``): the joint mix that requests without a size are drawn from. Empty for catalogs written
        before sizes were recorded."""
        ops = self.sizes.get(service, {})
        out = []
        for op, mix in ops.items():
            if operation is None or op == operation:
                for key, n in mix.items():
                    calls, _, depth = key.partition("/")
                    out.append((op, int(calls), int(depth), n))
        return out

    def trace_mix(self, service: str, operation: str | None = None) -> list[MixEntry]:
        """The training traces entered at ``service`` (and ``operation``) by size and instruction tags: the joint
        mix that requests without a size or instructions are drawn from. From ``sizes`` without tags for catalogs
        written before the mix was recorded."""
        if service not in self.mix:
            return [MixEntry(op, n, d, False, (), k) for op, n, d, k in self.size_mix(service, operation)]
        return [MixEntry(op, n, d, bool(high), tuple(tuple(e) for e in calls), k, tuple(lat))
                for op, rows in self.mix[service].items() if operation is None or op == operation
                for n, d, high, calls, k, lat in rows]

    def restricted_to(self, known: set[str]) -> Catalog:
        """Only services and operations whose names are in ``known`` (a tokenizer's strings): the sampler can
        only write names it has tokens for."""
        ops = {s: {o: st for o, st in os.items() if o in known} for s, os in self.operations.items() if s in known}
        ops = {s: os for s, os in ops.items() if os}
        edges = {s: {c: n for c, n in cs.items() if c in ops} for s, cs in self.edges.items() if s in ops}
        entries = {s: {o: n for o, n in os.items() if o in ops[s]} for s, os in self.entries.items() if s in ops}
        sizes = {s: {o: m for o, m in os.items() if o in entries.get(s, {})} for s, os in self.sizes.items()}
        high = {s: {o: p for o, p in os.items() if o in entries.get(s, {})} for s, os in self.high_latency_us.items()}
        op_edges = {}
        for ps, pos in self.op_edges.items():
            for po, css in pos.items():
                if po not in ops.get(ps, {}):
                    continue
                for cs, cos in css.items():
                    kept = {co: n for co, n in cos.items() if co in ops.get(cs, {})}
                    if kept:
                        op_edges.setdefault(ps, {}).setdefault(po, {})[cs] = kept
        # An uncommon call between services without tokens cannot be asked for; the trace's size still counts.
        mix = {s: {o: [[n, d, slow, [e for e in calls if e[0] in ops and e[1] in ops], k, lat] for n, d, slow, calls, k, lat in rows]
                   for o, rows in os.items() if o in entries.get(s, {})} for s, os in self.mix.items()}  # fmt: skip
        return Catalog(ops, {s: c for s, c in edges.items() if c}, {s: o for s, o in entries.items() if o},
                       self.traces, self.max_depth, self.max_spans, self.max_root_duration_us,
                       {s: o for s, o in sizes.items() if o}, {s: o for s, o in high.items() if o}, op_edges,
                       {s: o for s, o in mix.items() if o})  # fmt: skip

    # --- saving ---

    def to_dict(self) -> dict:
        return {
            "traces": self.traces, "max_depth": self.max_depth, "max_spans": self.max_spans,
            "max_root_duration_us": self.max_root_duration_us, "entries": self.entries, "sizes": self.sizes,
            "high_latency_us": self.high_latency_us, "edges": self.edges, "op_edges": self.op_edges, "mix": self.mix,
            "operations": {s: {o: {"count": st.count, "kinds": st.kinds, "statuses": st.statuses,
                                   "max_below": st.max_below, "max_calls": st.max_calls, "max_fanout": st.max_fanout,
                                   "attributes": st.attributes} for o, st in os.items()}
                           for s, os in self.operations.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Catalog:
        try:
            ops = {s: {o: OperationStats(int(st["count"]), dict(st["kinds"]), dict(st["statuses"]), int(st["max_below"]),
                                         int(st.get("max_calls") or 0), int(st.get("max_fanout") or 0),
                                         dict(st.get("attributes") or {}))
                       for o, st in os.items()} for s, os in d["operations"].items()}  # fmt: skip
            return cls(ops, {s: dict(c) for s, c in d["edges"].items()}, {s: dict(o) for s, o in d["entries"].items()},
                       int(d["traces"]), int(d["max_depth"]), int(d["max_spans"]), int(d["max_root_duration_us"]),
                       {s: {o: {k: int(n) for k, n in m.items()} for o, m in os.items()}
                        for s, os in (d.get("sizes") or {}).items()},
                       {s: {o: float(p) for o, p in os.items()} for s, os in (d.get("high_latency_us") or {}).items()},
                       {ps: {po: {cs: {co: int(n) for co, n in cos.items()} for cs, cos in css.items()}
                             for po, css in pos.items()} for ps, pos in (d.get("op_edges") or {}).items()},
                       {s: {o: [[int(n), int(dp), int(high), [[str(a), str(b), SpanKind[k].name] for a, b, k in calls],
                                 int(c), [int(x) for x in lat]] for n, dp, high, calls, c, lat in rows] for o, rows in os.items()}
                        for s, os in (d.get("mix") or {}).items()})  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"catalog: malformed ({type(e).__name__}: {e})") from None

    def save(self, model_dir: str | Path) -> Path:
        p = Path(model_dir) / CATALOG_FILE
        p.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return p

    @classmethod
    def load(cls, model_dir: str | Path) -> Catalog:
        p = Path(model_dir) / CATALOG_FILE
        if not p.is_file():
            raise UserError(f"{model_dir}: no {CATALOG_FILE}; build one with "
                            f"`otel-tracegen model catalog {model_dir} --corpus CORPUS_DIR`")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e})") from None

    # --- questions the sampler asks ---

    @property
    def services(self) -> list[str]:
        return list(self.operations)

    def kinds(self, service: str, operation: str) -> list[str]:
        st = self.operations.get(service, {}).get(operation)
        return sorted(st.kinds) if st else []

    def learned_attributes(self, service: str, operation: str) -> dict:
        st = self.operations.get(service, {}).get(operation)
        return st.attributes if st else {}

    @property
    def has_learned_attributes(self) -> bool:
        """Whether any operation has attributes all its training spans carried (protocol attributes to check)."""
        return any(st.attributes for ops in self.operations.values() for st in ops.values())

    def op_callees(self, service: str, operation: str) -> set[tuple[str, str]]:
        """(service, operation) pairs that spans of ``service``/``operation`` were seen calling."""
        return {(cs, co) for cs, cos in self.op_edges.get(service, {}).get(operation, {}).items() for co in cos}

    def op_callers(self, service: str, operation: str) -> set[tuple[str, str]]:
        """(service, operation) pairs seen calling ``service``/``operation``."""
        if not hasattr(self, "_op_callers"):
            inverse: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
            for ps, pos in self.op_edges.items():
                for po, css in pos.items():
                    for cs, cos in css.items():
                        for co in cos:
                            inverse[cs, co].add((ps, po))
            self._op_callers = inverse
        return self._op_callers.get((service, operation), set())

    def operation_names(self) -> set[str]:
        """Every operation name of every service (built once, on the first call)."""
        if not hasattr(self, "_operation_names"):
            self._operation_names = {o for ops in self.operations.values() for o in ops}
        return self._operation_names

    def calls(self, src: str, dst: str) -> bool:
        return dst in self.edges.get(src, {})

    def hops_to(self, target: str) -> dict[str, int]:
        """For every service that can reach ``target`` along seen edges, the fewest edges to it (0 for itself)."""
        callers: dict[str, list[str]] = defaultdict(list)
        for s, cs in self.edges.items():
            for c in cs:
                callers[c].append(s)
        hops, queue = {target: 0}, deque([target])
        while queue:
            s = queue.popleft()
            for p in callers[s]:
                if p not in hops:
                    hops[p] = hops[s] + 1
                    queue.append(p)
        return hops

    # --- errors that help ---

    def check_service(self, service: str, what: str = "service") -> None:
        if service not in self.operations:
            raise UserError(f"unknown {what} {service!r}; {nearest(service, self.services)}")

    def check_operation(self, service: str, operation: str) -> None:
        self.check_service(service)
        if operation not in self.operations[service]:
            raise UserError(f"service {service!r} has no operation {operation!r}; "
                            f"{nearest(operation, list(self.operations[service]))}")


def _instruction_tags(trace: Trace, stats) -> tuple[bool, tuple[tuple[str, str, str], ...], int] | None:
    """(high latency, the uncommon calls made, the latency in µs) of a training trace, as the instruct stage
    derives them; None for a trace the encoding cannot represent (the instruct stage skips those too)."""
    from .. import encoding as enc

    root = trace.root
    entry = (root.service, root.name)
    try:
        p90 = stats.p90_us.get(entry)
        latency = enc.trace_latency_us(trace)
        calls = enc.calls_among(trace, stats.uncommon.get(entry, ()))
    except enc.EncodingError:
        return None
    return p90 is not None and latency > p90, tuple(sorted((a, b, k.name) for a, b, k in calls)), latency


def nearest(name: str, known: list[str], n: int = 5) -> str:
    """'did you mean ...' text: the closest known names, else a few of them."""
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.4)
    if close:
        return "nearest known: " + ", ".join(close)
    return f"known ({len(known)}): " + ", ".join(sorted(known)[:n]) + (", ..." if len(known) > n else "")
