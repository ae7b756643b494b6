"""Repair a trace: write lost spans with the model, shift skewed clocks by Jaeger's rule, fill missing names.

For each trace (``TraceRepairer.repair``, many traces per call so the model answers them in one batch):

1. **Lost spans** (``orphan``, ``missing_root`` findings). The orphans of one missing id had one lost parent.
   Candidate grandparents are the spans whose window holds the orphans' earliest start (nearest first, at most
   ``max_candidates``), else the root. For each, the model writes the lost span into that candidate's layer
   (:class:`~otel_tracegen.infill.filler.SpanQuery`); the answer with the highest confidence wins. Where the
   data has seen the path through no candidate, only the nearest is asked. The made span takes a new id
   (derived from the trace id and the lost id, so a redelivered batch makes the same span), the orphans are
   re-pointed to it, and it sits inside the grandparent's window and around its children. Nothing is asked
   where the orphans' or the grandparent's services are not in the model's catalog (another system's).
   Below the confidence threshold nothing is made: the orphans are re-parented to the nearest ancestor by time
   (the first candidate), the plain rule, and say so. A lost root below the threshold is left lost (there is no
   ancestor to re-parent to) and its orphans say that too.
2. **Clock skew**: Jaeger's adjuster (``dataset.clock_skew_delta``), from the root down, on children of another
   host that sit outside their parent by more than the tolerance; a shifted span's same-host descendants move
   with it.
3. **Missing names**: a placeholder ``service.name`` or an empty span name is written by the model from the
   span's place in its parent's step (the masked-field form). Below the threshold the value stays and the
   model's suggestion is recorded. Protocol attributes that every span of an operation carried in training
   (the catalog's) are filled with that value.

Every span added or changed says what was done and why in ``otel_tracegen.*`` attributes (``MARK_*`` below);
every other span is passed on as the bytes it came in.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .. import __version__
from .. import encoding as enc
from ..dataset import clock_skew_delta, host_key
from ..lm.data import field_infill_example
from ..encoding import NS_PER_US
from ..trace import Resource, Scope, Span, Status, Trace
from . import detect as d
from . import wire
from .filler import FieldQuery, SpanQuery

MARK_REPAIR = "otel_tracegen.repair"  # the reason: orphan, missing_root, clock_skew, missing_attribute
MARK_METHOD = "otel_tracegen.repair.method"  # model, rule, catalog, none
MARK_CONFIDENCE = "otel_tracegen.repair.confidence"
MARK_DETAIL = "otel_tracegen.repair.detail"
MARK_SYNTHETIC = "otel_tracegen.synthetic"  # true on spans the receiver made
MARK_REPLACES = "otel_tracegen.repair.replaces_span_id"  # a made span: the lost span's id
MARK_ORIGINAL_PARENT = "otel_tracegen.repair.original_parent_span_id"
MARK_ORIGINAL_START = "otel_tracegen.repair.original_start_time_unix_nano"
MARK_ORIGINAL_END = "otel_tracegen.repair.original_end_time_unix_nano"
MARK_SHIFT = "otel_tracegen.repair.clock_shift_ns"
MARK_ORIGINAL_SERVICE = "otel_tracegen.repair.original_service_name"
MARK_ORIGINAL_NAME = "otel_tracegen.repair.original_name"
MARK_SUGGESTED = "otel_tracegen.repair.suggested_value"
SCOPE = Scope("otel-tracegen-infill", __version__)

MODEL, RULE, CATALOG, NONE = "model", "rule", "catalog", "none"


@dataclass
class RepairSettings:
    """``confidence``: below it, the model's answer is not used (the rule, or nothing). ``max_candidates``:
    grandparents tried for each lost span."""

    confidence: float = 0.5
    max_candidates: int = 3
    # Where the data never saw the path through any grandparent: let the lost span be what other callers of the
    # orphans were (as a span of the grandparent's service, or of the orphans' own): see _analogues.
    analogy: bool = True
    detect: d.DetectSettings = field(default_factory=d.DetectSettings)


@dataclass
class Released:
    """What the receiver remembers of a trace it has sent on, so that late spans join it: the span ids sent,
    whether one was a root, and the lost ids it made spans for (lost id -> made span id)."""

    ids: set[str] = field(default_factory=set)
    root: bool = False
    made: dict[str, str] = field(default_factory=dict)


@dataclass
class Repaired:
    """One trace after repair: its spans to forward (untouched ones as they came), and what was done."""

    spans: list[wire.WireSpan]
    repairs: Counter = field(default_factory=Counter)  # reason -> spans added or changed
    methods: Counter = field(default_factory=Counter)  # method -> repairs
    findings: int = 0


def made_span_id(trace_id: str, lost_id: str) -> str:
    """The id of the span made for ``lost_id``: the same for a redelivered batch, never the lost id itself."""
    h = hashlib.blake2b(f"{trace_id}/{lost_id}/otel-tracegen-infill".encode(), digest_size=8).hexdigest()
    return h if h != lost_id and h != "0" * 16 else h[::-1]


class _Work:
    """One trace in flight: its canonical spans (edited as repair goes) and the wire spans they came from."""

    def __init__(self, spans: Sequence[wire.WireSpan], released: Released) -> None:
        self.wire: dict[str, wire.WireSpan] = {}
        self.spans: dict[str, Span] = {}
        self.order: list[str] = []
        for w in spans:
            if w.span.span_id in self.spans:  # a duplicate span id inside one trace: the later copy goes on as is
                self.order.append(f"dup:{len(self.order)}")
                self.wire[self.order[-1]] = w
                continue
            self.wire[w.span.span_id] = w
            self.spans[w.span.span_id] = w.span
            self.order.append(w.span.span_id)
        self.released = released
        self.edits: dict[str, dict] = defaultdict(dict)  # span id -> edit_span keyword arguments
        self.attrs: dict[str, dict] = defaultdict(dict)  # span id -> attributes to set
        self.new_service: dict[str, str] = {}
        self.made: list[wire.WireSpan] = []
        self.out = Repaired([])
        self.index = 0  # its place in the repair call

    def set_parent(self, sid: str, parent: str) -> None:
        s = self.spans[sid]
        self.attrs[sid].setdefault(MARK_ORIGINAL_PARENT, s.parent_id or "")
        self.edits[sid]["parent_id"] = parent
        self.spans[sid] = replace(s, parent_id=parent)

    def set_times(self, sid: str, start: int, end: int) -> None:
        s = self.spans[sid]
        self.attrs[sid].setdefault(MARK_ORIGINAL_START, s.start_ns)
        self.attrs[sid].setdefault(MARK_ORIGINAL_END, s.end_ns)
        self.edits[sid]["start_ns"], self.edits[sid]["end_ns"] = start, end
        self.spans[sid] = replace(s, start_ns=start, end_ns=end)

    def mark(self, sid: str, reason: str, method: str, **extra) -> None:
        a = self.attrs[sid]
        if MARK_REPAIR in a and a[MARK_REPAIR] != reason:  # several repairs on one span: all reasons, in order
            reason = f"{a[MARK_REPAIR]},{reason}"
        a[MARK_REPAIR] = reason
        a[MARK_METHOD] = method if MARK_METHOD not in a or a[MARK_METHOD] == method else f"{a[MARK_METHOD]},{method}"
        a.update(extra)
        self.out.repairs[reason.split(",")[-1]] += 1
        self.out.methods[method] += 1

    def trace(self) -> Trace:
        return Trace(list(self.spans.values()))

    def result(self) -> Repaired:
        out = []
        for key in self.order:
            w = self.wire[key]
            if key in self.attrs or key in self.edits:
                raw = wire.edit_span(w.raw, set_attributes=self.attrs.get(key), **self.edits.get(key, {}))
                resource = w.resource
                if key in self.new_service:
                    resource = wire.with_service(resource, self.new_service[key])
                w = wire.WireSpan(self.spans[key], raw, resource, w.scope)
            out.append(w)
        self.out.spans = out + self.made
        return self.out


def _depths(spans: dict[str, Span], children: dict[str, list[str]]) -> dict[str, int]:
    """Levels below the top of its fragment, per span (a span whose parent is absent is a top)."""
    depth = {}
    stack = [(sid, 0) for sid, s in spans.items() if s.parent_id is None or s.parent_id not in spans]
    while stack:
        sid, level = stack.pop()
        if sid not in depth:
            depth[sid] = level
            stack.extend((c, level + 1) for c in children.get(sid, ()))
    return depth


class TraceRepairer:
    """Repairs traces with a :class:`~otel_tracegen.infill.filler.ModelFiller` (``filler``; None: rules only) and
    its catalog."""

    def __init__(self, filler=None, catalog=None, settings: RepairSettings | None = None) -> None:
        self.filler = filler
        self.catalog = catalog if catalog is not None else (filler.catalog if filler is not None else None)
        self.settings = settings or RepairSettings()

    # --- the whole pass ---

    def repair(self, traces: Sequence[tuple[Sequence[wire.WireSpan], Released]]) -> list[Repaired]:
        """Repair each ``(spans of one trace, what was released of it before)``; ``Released`` is updated with
        what this pass sends on."""
        out: list[Repaired | None] = [None] * len(traces)
        works, found = [], []
        for i, (spans, released) in enumerate(traces):
            f = d.detect([w.span for w in spans], catalog=self.catalog, settings=self.settings.detect,
                         released=released.ids, released_root=released.root)  # fmt: skip
            if not f and len({w.span.span_id for w in spans}) == len(spans):
                out[i] = Repaired(list(spans))  # nothing to do: the common case, passed on as it came
                released.ids.update(w.span.span_id for w in spans)
                released.root = released.root or any(w.span.parent_id is None for w in spans)
                continue
            w = _Work(spans, released)
            if len(w.spans) != len(spans):  # duplicate ids: detect on the first copy of each
                f = d.detect(list(w.spans.values()), catalog=self.catalog, settings=self.settings.detect,
                             released=released.ids, released_root=released.root)  # fmt: skip
            w.out.findings = len(f.findings)
            w.index = i
            works.append(w)
            found.append(f)
        self._lost_spans(works, found)
        for w, f in zip(works, found):
            if f.of(d.CLOCK_SKEW):
                self._clock_skew(w)
        self._names(works, found)
        for w in works:
            r = w.result()
            w.released.ids.update(s.span.span_id for s in r.spans)
            w.released.root = w.released.root or any(s.span.parent_id is None for s in r.spans)
            out[w.index] = r
        return out  # type: ignore[return-value]

    # --- lost spans ---

    def _lost_spans(self, works: list[_Work], found: list[d.TraceFindings]) -> None:
        jobs = []  # (work, finding, candidates (parent span, None for a root), the nearest, orphans, queries)
        for w, f in zip(works, found):
            for finding in f.of(d.ORPHAN) + f.of(d.MISSING_ROOT):
                lost = finding.missing_parent
                made = w.released.made.get(lost)
                if made is not None:  # late orphans of a span already made: join it, make no second one
                    for sid in finding.spans:
                        w.set_parent(sid, made)
                        w.mark(sid, finding.reason, RULE, **{MARK_DETAIL: f"late span; parent {lost} was made "
                                                             f"as {made}"})
                    continue
                kids = [w.spans[s] for s in finding.spans]
                if finding.reason == d.MISSING_ROOT:
                    cands: list[Span | None] = [None]
                else:
                    cands = self._candidates(w, kids)
                nearest = cands[0] if cands else None
                # The model writes a lost span only between services its catalog knows: what it would write
                # between services of another system comes from the system it was trained on.
                foreign = self._foreign(kids)
                cands = [] if foreign else [c for c in cands if c is None or self._knows(c.service)]
                if not cands and not foreign and nearest is not None:
                    foreign = self._foreign([nearest])
                queries = [self._span_query(w, c, kids) for c in cands] if self.filler is not None else []
                if any(q.pairs for q in queries):
                    # Only grandparents through which the data has seen this path can win (see below): the model
                    # need not answer for the others.
                    keep = [i for i, q in enumerate(queries) if q.pairs]
                    cands, queries = [cands[i] for i in keep], [queries[i] for i in keep]
                else:
                    # Through none of them: the model's confidences would all be its own guesses, too close to
                    # rank grandparents by. The nearest (the rule's parent) is asked what the lost span was,
                    # among the analogues where there are some.
                    cands, queries = cands[:1], queries[:1]
                    like = self._analogues(cands[0], kids) if queries and self.settings.analogy else ()
                    if like:
                        queries = [replace(queries[0], pairs=like, analogy=True)]
                jobs.append((w, finding, cands, nearest, kids, queries, foreign))
        flat = [q for *_, qs, _ in jobs for q in qs]
        answers = self.filler.fill_spans(flat) if flat else []
        k = 0
        for w, finding, cands, nearest, kids, queries, foreign in jobs:
            mine = answers[k : k + len(queries)]
            k += len(queries)
            # A grandparent through which the data has seen this path beats one it has not; then the model decides.
            best = max(range(len(mine)), key=lambda i: (bool(queries[i].pairs), mine[i].confidence), default=None)
            lost = finding.missing_parent
            conf = mine[best].confidence if best is not None else None
            why = (f"the model was unsure ({conf:.2f})" if conf is not None
                   else self._foreign_detail(foreign) if foreign and self.filler is not None else "no model")
            if best is not None and mine[best].confidence >= self.settings.confidence:
                self._make(w, finding, cands[best], kids, queries[best], mine[best])
            elif finding.reason == d.ORPHAN and nearest is not None:
                near = nearest
                for s in kids:
                    w.set_parent(s.span_id, near.span_id)
                    w.mark(s.span_id, d.ORPHAN, RULE, **{
                        MARK_DETAIL: f"parent {lost} lost; re-parented to the nearest ancestor by time "
                        f"{near.span_id} ({near.service} {near.name})" + (f"; {why}" if why != "no model" else ""),
                        **({MARK_CONFIDENCE: round(conf, 4)} if conf is not None else {})})  # fmt: skip
            else:
                for s in kids:
                    w.mark(s.span_id, finding.reason, NONE, **{
                        MARK_DETAIL: f"parent {lost} lost and not made: {why}",
                        **({MARK_CONFIDENCE: round(conf, 4)} if conf is not None else {})})  # fmt: skip

    def _candidates(self, w: _Work, kids: list[Span]) -> list[Span | None]:
        """Spans that may have been the lost span's parent: holding the orphans' earliest start in their window,
        not below an orphan; nearest (deepest) first."""
        below: set[str] = set()
        children: dict[str, list[str]] = defaultdict(list)
        for s in w.spans.values():
            if s.parent_id is not None:
                children[s.parent_id].append(s.span_id)
        stack = [k.span_id for k in kids]
        while stack:
            sid = stack.pop()
            if sid not in below:
                below.add(sid)
                stack.extend(children.get(sid, ()))
        first = min(k.start_ns for k in kids)
        tol = self.settings.detect.skew_tolerance_ns
        depth = _depths(w.spans, children)
        last = max(k.end_ns for k in kids)
        holders = [s for s in w.spans.values() if s.span_id not in below
                   and s.start_ns - tol <= first <= s.end_ns + tol]  # fmt: skip
        # Those that hold the orphans' whole window come first (the lost span held its children and its parent
        # held it; a sibling running beside it holds only a part), then the deepest.
        holders.sort(key=lambda s: (not (s.start_ns - tol <= first and last <= s.end_ns + tol),
                                    -depth.get(s.span_id, 0), s.start_ns, s.span_id))
        out: list[Span | None] = list(holders[: self.settings.max_candidates])
        if not out:
            root = next((s for s in w.spans.values() if s.parent_id is None), None)
            if root is not None and root.span_id not in below:
                out = [root]
        return out

    def _foreign(self, spans: Sequence[Span | None]) -> tuple[str, ...]:
        """The services of ``spans`` that the model's catalog has never seen. The model knows nothing of them:
        a name it wrote for them would be one from the system it was trained on."""
        return tuple(sorted({s.service for s in spans if s is not None and not self._knows(s.service)}))

    def _knows(self, service: str) -> bool:
        """Whether the catalog has seen ``service`` (any service, without a catalog: nothing to hold it to)."""
        return self.catalog is None or service in self.catalog.operations

    @staticmethod
    def _foreign_detail(services: Sequence[str], noun: str = "service") -> str:
        more = f" and {len(services) - 3} more" if len(services) > 3 else ""
        shown = ", ".join(repr(s) for s in services[:3]) + more
        plural = "s" if len(services) > 1 else ""
        return f"{noun}{plural} {shown} not in the model's catalog (not in its training data)"

    def _allowed_services(self, parent: Span | None, kids: list[Span]) -> tuple[str, ...]:
        """Services the lost span may have: seen called by the parent's service (an entry service for a lost root)
        and seen calling each orphan's service; each condition is dropped if nothing meets it."""
        cat = self.catalog
        if cat is None:
            return ()
        pool = set(cat.entries) if parent is None else set(cat.edges.get(parent.service, {}))
        callers = set(cat.services)
        for k in kids:
            callers &= {s for s, callees in cat.edges.items() if k.service in callees}
        both = pool & callers
        return tuple(sorted(both or pool or callers))

    def _allowed_pairs(self, parent: Span | None, kids: list[Span], root: bool = True) -> tuple[tuple[str, str], ...]:
        """(service, operation) pairs seen both called by the parent's operation (an entry for a lost root) and
        calling each orphan's operation: the lost span's possible identities when the data has seen this path.
        Empty when it has not (a rare path, an unseen combination): then services alone constrain it."""
        cat = self.catalog
        if cat is None or not cat.op_edges:
            return ()
        if parent is None:
            if not root:
                return ()
            pool = {(s, o) for s, ops in cat.entries.items() for o in ops}
        else:
            pool = cat.op_callees(parent.service, parent.name)
        for k in kids:
            pool &= cat.op_callers(k.service, k.name)
            if not pool:
                break
        return tuple(sorted(pool))

    def _analogues(self, parent: Span | None, kids: list[Span]) -> tuple[tuple[str, str], ...]:
        """What the lost span may be on a path the data never saw: the (service, operation) pairs that were seen
        calling every orphan's operation (else any of them), taken as a span of the grandparent's service (a
        client span making the call as other callers make it: a new caller) or as one of the orphans' own service
        (their server span, reached from a new caller). A held-out call in TrainTicket is of the first kind: a
        lost ``preserve-other HTTP GET`` to ``user-service``, which training saw called only by
        ``preserve HTTP GET``."""
        cat = self.catalog
        if cat is None or parent is None or not kids:
            return ()
        seen = [set(cat.op_callers(k.service, k.name)) for k in kids]
        # Callers of every orphan, else of any (the orphans' set was never seen together: one of them may be an
        # error handler or a retry that the usual caller did not make).
        callers = set.intersection(*seen) or set.union(*seen)
        own = cat.operations.get(parent.service, {})
        out = {(parent.service, o) for _, o in callers if o in own}
        out |= {(s, o) for s, o in callers if all(k.service == s for k in kids)}
        return tuple(sorted(out))

    def _span_query(self, w: _Work, parent: Span | None, kids: list[Span]) -> SpanQuery:
        if parent is None:
            ex = enc.span_infill_prompt(None, [], 0, kids)
            anchor = ex.origin_ns
        else:
            root = next((s for s in w.spans.values() if s.parent_id is None), None)
            siblings = [s for s in w.spans.values() if s.parent_id == parent.span_id]
            first = min(k.start_ns for k in kids)
            index = sum(1 for s in siblings if s.start_ns < first)
            anchor = root.start_ns if root is not None else parent.start_ns
            ex = enc.span_infill_prompt(parent, siblings, index, kids, ancestors=self._ancestors(w, parent),
                                        anchor_ns=anchor)  # fmt: skip
        w_origin = (ex.origin_ns - anchor) // NS_PER_US

        def off(t: int) -> int:
            return (t - anchor) // NS_PER_US - w_origin

        kid_start, kid_end = min(off(k.start_ns) for k in kids), max(off(k.end_ns) for k in kids)
        if parent is None:
            longest = self.catalog.max_root_duration_us if self.catalog is not None else 10**9
            return SpanQuery(ex.prompt, self._allowed_services(None, kids), (min(0, kid_start) - longest, min(0, kid_start)),
                             (kid_end, kid_end + longest), root=True, pairs=self._allowed_pairs(None, kids))  # fmt: skip
        budget = off(parent.end_ns)
        return SpanQuery(ex.prompt, self._allowed_services(parent, kids), (0, max(0, kid_start)),
                         (kid_end, max(kid_end, budget)), pairs=self._allowed_pairs(parent, kids))  # fmt: skip

    @staticmethod
    def _ancestors(w: _Work, span: Span) -> list[Span]:
        out: list[Span] = []
        p = span.parent_id
        while p is not None and p in w.spans and len(out) < 64:
            out.append(w.spans[p])
            p = w.spans[p].parent_id
        return out[::-1]

    def _make(self, w: _Work, finding: d.Finding, parent: Span | None, kids: list[Span], query: SpanQuery,
              answer) -> None:
        call = answer.call
        lost = finding.missing_parent
        trace_id = kids[0].trace_id
        sid = made_span_id(trace_id, lost)
        if parent is None:
            origin = min(k.start_ns for k in kids)
            anchor = origin
        else:
            origin = parent.start_ns
            root = next((s for s in w.spans.values() if s.parent_id is None), None)
            anchor = root.start_ns if root is not None else parent.start_ns
        base = anchor + ((origin - anchor) // NS_PER_US) * NS_PER_US  # the µs the prompt's offsets count from
        start = base + call.start * NS_PER_US
        end = start + call.duration * NS_PER_US
        # The made span holds its children (the grammar kept it to their window up to µs flooring).
        start = max(0, min(start, min(k.start_ns for k in kids)))
        end = min(max(end, max(k.end_ns for k in kids), start), (1 << 64) - 1)
        attrs = {MARK_SYNTHETIC: True, MARK_REPAIR: finding.reason, MARK_METHOD: MODEL,
                 MARK_CONFIDENCE: round(answer.confidence, 4), MARK_REPLACES: lost,
                 MARK_DETAIL: f"lost span {lost} written by the model for {len(kids)} orphaned span(s)"
                 + ("; a call path the data never saw, named by analogy with the calls that other callers of "
                    "the orphans made" if query.analogy else "")}  # fmt: skip
        span = Span(trace_id, sid, parent.span_id if parent is not None else None, call.service, call.operation,
                    start, end, call.kind, Status(call.status), attrs,
                    Resource({"service.name": call.service, MARK_SYNTHETIC: True}), SCOPE)  # fmt: skip
        w.made.extend(wire.from_spans([span]))
        w.spans[sid] = span
        w.out.repairs[finding.reason] += 1
        w.out.methods[MODEL] += 1
        w.released.made[lost] = sid
        for k in kids:
            w.set_parent(k.span_id, sid)
            w.mark(k.span_id, finding.reason, MODEL, **{MARK_DETAIL: f"parent {lost} lost; re-attached to the "
                                                        f"span written for it, {sid}"})

    # --- clock skew ---

    def _clock_skew(self, w: _Work) -> None:
        tol = self.settings.detect.skew_tolerance_ns
        children: dict[str, list[str]] = defaultdict(list)
        for s in w.spans.values():
            if s.parent_id is not None:
                children[s.parent_id].append(s.span_id)
        roots = [s.span_id for s in w.spans.values() if s.parent_id is None or s.parent_id not in w.spans]
        stack: list[tuple[str, int]] = [(r, 0) for r in roots]
        seen: set[str] = set()
        while stack:
            sid, delta = stack.pop()
            if sid in seen:
                continue
            seen.add(sid)
            s = w.spans[sid]
            p = w.spans.get(s.parent_id) if s.parent_id is not None else None
            if p is not None and host_key(p) != host_key(s):
                moved = replace(s, start_ns=s.start_ns + delta, end_ns=s.end_ns + delta) if delta else s
                early, late = p.start_ns - moved.start_ns, moved.end_ns - p.end_ns
                own = clock_skew_delta(moved, p) if (early > tol or late > tol) else 0
                delta += own
            if delta and not 0 <= s.start_ns + delta <= s.end_ns + delta < 1 << 64:
                delta = 0  # a span with no sane times (an unset start) cannot be shifted; it and its subtree stay
            if delta:
                if not s.attributes.get(MARK_SYNTHETIC):
                    w.set_times(sid, s.start_ns + delta, s.end_ns + delta)
                    w.mark(sid, d.CLOCK_SKEW, RULE, **{MARK_SHIFT: delta, MARK_DETAIL: "shifted into its parent's "
                                                       "window by Jaeger's clock-skew rule"})
            stack.extend((c, delta) for c in children.get(sid, ()))

    # --- names ---

    def _names(self, works: list[_Work], found: list[d.TraceFindings]) -> None:
        for key, field_ in (("svc", d.Field.SERVICE), ("op", d.Field.OPERATION)):
            jobs = []
            for w, f in zip(works, found):
                wanted = [x for x in f.of(d.MISSING_ATTRIBUTE) if x.field == field_ and x.spans[0] in w.spans]
                if not wanted:
                    continue
                where = None
                if self.filler is not None:
                    try:
                        trace = w.trace()
                        steps = enc.encode_trace(trace)
                        where = enc.step_positions(trace)
                    except enc.EncodingError:
                        where = None
                for x in wanted:
                    sid = x.spans[0]
                    if where is None or sid not in where:
                        w.mark(sid, d.MISSING_ATTRIBUTE, NONE, **{MARK_DETAIL: f"{x.detail}; left as is (no model, "
                                                                  "or the trace is not whole)"})
                        continue
                    s = w.spans[sid]
                    parent = w.spans.get(s.parent_id) if s.parent_id else None
                    kids = [c for c in w.spans.values() if c.parent_id == sid]
                    # Only in a place the catalog knows: an operation of a service it has seen; a service for an
                    # operation it has seen, beside a neighbour of a service it has seen. Elsewhere the model's
                    # answer would be a name from the system it was trained on.
                    neighbours = [n for n in (parent, *kids) if n is not None]
                    unknown = None
                    if key == "op" and not self._knows(s.service):
                        unknown = self._foreign_detail([s.service])
                    elif key == "svc" and self.catalog and s.name not in self.catalog.operation_names():
                        unknown = self._foreign_detail([s.name], "operation")
                    elif key == "svc" and neighbours and not any(self._knows(n.service) for n in neighbours):
                        unknown = self._foreign_detail(self._foreign(neighbours))
                    if unknown:
                        w.mark(sid, d.MISSING_ATTRIBUTE, NONE, **{MARK_DETAIL: f"{x.detail}; left as is: {unknown}"})
                        continue
                    i, j = where[sid]
                    prompt, _ = field_infill_example(steps[i], j, key)
                    pairs = self._allowed_pairs(parent, kids, root=parent is None)
                    if key == "svc":  # the span's name is known: services seen doing it in this place
                        seen = tuple(sorted({a for a, o in pairs if o == s.name}))
                    else:
                        seen = tuple(sorted({o for a, o in pairs if a == s.service}))
                    q = FieldQuery(prompt, key, services=self._allowed_services(parent, kids), service=s.service,
                                   values=seen)  # fmt: skip
                    jobs.append((w, x, q))
            if not jobs:
                continue
            answers = self.filler.fill_fields([q for *_, q in jobs])
            for (w, x, _), a in zip(jobs, answers):
                sid = x.spans[0]
                s = w.spans[sid]
                if a.confidence < self.settings.confidence:
                    w.mark(sid, d.MISSING_ATTRIBUTE, NONE, **{MARK_SUGGESTED: a.value, MARK_CONFIDENCE:
                                                              round(a.confidence, 4), MARK_DETAIL:
                                                              f"{x.detail}; the model was unsure"})  # fmt: skip
                elif key == "svc":
                    w.attrs[sid].setdefault(MARK_ORIGINAL_SERVICE, s.service)
                    w.new_service[sid] = a.value
                    w.spans[sid] = replace(s, service=a.value)
                    w.mark(sid, d.MISSING_ATTRIBUTE, MODEL, **{MARK_CONFIDENCE: round(a.confidence, 4),
                                                               MARK_DETAIL: f"{x.detail}; service written by the model"})
                else:
                    w.attrs[sid].setdefault(MARK_ORIGINAL_NAME, s.name)
                    w.edits[sid]["name"] = a.value
                    w.spans[sid] = replace(s, name=a.value)
                    w.mark(sid, d.MISSING_ATTRIBUTE, MODEL, **{MARK_CONFIDENCE: round(a.confidence, 4),
                                                               MARK_DETAIL: f"{x.detail}; name written by the model"})
        # Protocol attributes from the catalog: the value every training span of that operation had.
        for w, f in zip(works, found):
            for x in f.of(d.MISSING_ATTRIBUTE):
                if x.field != d.Field.ATTRIBUTE or x.spans[0] not in w.spans:
                    continue
                s = w.spans[x.spans[0]]
                st = self.catalog.operations.get(s.service, {}).get(s.name) if self.catalog else None
                if st is None or x.key not in st.attributes:
                    continue
                w.attrs[s.span_id][x.key] = st.attributes[x.key]
                w.mark(s.span_id, d.MISSING_ATTRIBUTE, CATALOG, **{MARK_DETAIL: f"{x.detail}; filled with the "
                                                                   "value all its training spans had"})
