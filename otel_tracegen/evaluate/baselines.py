"""Baseline generators the trace model is compared with, all behind :class:`.generators.Generator`.

- :class:`ReplayGenerator` copies training traces: the upper bound of realism (every trace is real) and the lower
  bound of novelty (memorization 100 %). For a request it copies a training trace that meets it, relaxing the
  instructions, then the size, then the entry when none does.
- :class:`ProbabilisticGenerator` is the Alibaba-style generator the paper compares with (Luo et al., 2021): from
  the training traces it counts, per depth and parent (service, operation), how many children a span has, what
  each child is (service, operation, kind) and where it sits in its parent's time window; it then grows each
  tree top-down drawing every child independently. Its per-edge marginals match real data, its whole trees
  mostly don't: the distinction the shape metrics measure.
- The flat, non-recursive "whole trace as one table" baseline (the paper's GReaT) is a trained model:
  :mod:`.flat`.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ..trace import Span, SpanKind, Status, StatusCode, Trace
from .generators import HONOURS_ALL, Generated, Progress
from .metrics import entry_of, has_calls, is_high_latency


def _hex(rng: random.Random, nbytes: int) -> str:
    return f"{rng.getrandbits(8 * nbytes) or 1:0{2 * nbytes}x}"


def copy_with_fresh_ids(trace: Trace, rng: random.Random) -> Trace:
    """A copy of ``trace`` with new trace and span ids (parent links kept) and times moved so the first span
    starts at 0."""
    tid = _hex(rng, 16)
    ids = {s.span_id: _hex(rng, 8) for s in trace.spans}
    t0 = trace.start_ns
    spans = [replace(s, trace_id=tid, span_id=ids[s.span_id],
                     parent_id=None if s.parent_id is None else ids.get(s.parent_id, _hex(rng, 8)),
                     start_ns=s.start_ns - t0, end_ns=s.end_ns - t0, attributes=dict(s.attributes))
             for s in trace.spans]  # fmt: skip
    return Trace(spans, tid)


# --- replay ----------------------------------------------------------------------------------------------------


class ReplayGenerator:
    """Copies of training traces, chosen to meet each request as far as any training trace does.

    ``high_latency_us``: per entry (service, operation), the latency above which a trace is "high latency" (the
    harness passes the same p90s it scores with).
    """

    name = "replay"
    honours = HONOURS_ALL

    def __init__(self, train: Iterable[Trace], high_latency_us: dict[tuple[str, str], float] | None = None) -> None:
        self.train = [t for t in train if t.root is not None]
        if not self.train:
            raise ValueError("replay needs training traces with a single root")
        self.high_latency_us = high_latency_us or {}
        self._by_entry: dict[tuple[str, str], list[Trace]] = defaultdict(list)
        self._by_service: dict[str, list[Trace]] = defaultdict(list)
        self._size = {id(t): (len(t), t.depth) for t in self.train}
        for t in self.train:
            e = entry_of(t)
            self._by_entry[e].append(t)
            self._by_service[e[0]].append(t)

    def _meets_instructions(self, t: Trace, request) -> bool:
        """The harness's own tests of the instructions (:mod:`.metrics`), at the trace's entry."""
        if request.high_latency and not is_high_latency(t, entry_of(t), self.high_latency_us):
            return False
        return not request.includes or has_calls(t, request.includes)

    def candidates(self, request) -> list[Trace]:
        """Training traces meeting the request; each unmet group (instructions, size, entry) is dropped in turn."""
        if request.service is None:
            pool = self.train
        elif request.operation is None:
            pool = self._by_service.get(request.service, [])
        else:
            pool = self._by_entry.get((request.service, request.operation), [])
        pool = pool or self.train
        sized = pool
        if request.calls is not None or request.depth is not None:
            sized = [t for t in pool if (request.calls is None or self._size[id(t)][0] == request.calls)
                     and (request.depth is None or self._size[id(t)][1] == request.depth)]  # fmt: skip
        if not (request.high_latency or request.includes):
            return sized or pool
        instructed = [t for t in (sized or pool) if self._meets_instructions(t, request)]
        return instructed or sized or pool

    def generate(self, requests: Sequence, *, seed: int = 0, progress: Progress | None = None) -> list[Generated]:
        rng = random.Random(f"replay:{seed}")
        out = []
        for r in requests:
            out.append(Generated(copy_with_fresh_ids(rng.choice(self.candidates(r)), rng)))
            if progress:
                progress(1)
        return out


# --- probabilistic (Alibaba-style) -----------------------------------------------------------------------------

Op = tuple[str, str]  # (service, operation)


@dataclass(frozen=True)
class _Child:
    service: str
    operation: str
    kind: SpanKind
    start_frac: float  # child start - parent start, as a fraction of the parent's duration
    duration_frac: float  # child duration as a fraction of the parent's
    status: StatusCode


class _Empirical:
    """Samples drawn uniformly from what was seen, with fallbacks from specific to general keys."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, list] = defaultdict(list)

    def add(self, keys: Sequence[tuple], value) -> None:
        for k in keys:
            self.by_key[k].append(value)

    def draw(self, keys: Sequence[tuple], rng: random.Random):
        for k in keys:
            seen = self.by_key.get(k)
            if seen:
                return rng.choice(seen)
        return None


class ProbabilisticGenerator:
    """Trees grown top-down from per-depth statistics of the training traces (see the module docstring).

    At depth ``d`` a span of (service, operation) draws its number of children from the counts seen for spans of
    that (d, service, operation) in training (falling back to (d, service), then to d), then draws each child
    independently (service, operation, kind, place in the window, status) from the children seen under such
    spans. Roots (entry, kind, duration, status) come from the training roots. Trees stop at the deepest level
    and the largest size seen in training. It honours the requested entry; sizes come from its statistics.
    """

    name = "probabilistic"
    honours = frozenset({"entry"})

    def __init__(self, train: Iterable[Trace]) -> None:
        self.roots: list[Span] = []
        self.fanout = _Empirical()
        self.children = _Empirical()
        self.max_depth = self.max_spans = 1
        for t in train:
            root = t.root
            if root is None:
                continue
            self.roots.append(root)
            self.max_spans = max(self.max_spans, len(t))
            for span, d in t.walk():
                self.max_depth = max(self.max_depth, d)
                keys = self._keys(d, span.service, span.name)
                kids = t.children(span)
                self.fanout.add(keys, len(kids))
                dur = span.duration_ns
                for c in kids:
                    sf = (c.start_ns - span.start_ns) / dur if dur > 0 else 0.0
                    df = c.duration_ns / dur if dur > 0 else 0.0
                    self.children.add(keys, _Child(c.service, c.name, c.kind, min(max(sf, 0.0), 1.0),
                                                   min(max(df, 0.0), 1.0), c.status.code))  # fmt: skip
        if not self.roots:
            raise ValueError("the probabilistic baseline needs training traces with a single root")
        self.roots.sort(key=lambda s: (s.service, s.name))
        self._root_keys = [(s.service, s.name) for s in self.roots]

    @staticmethod
    def _keys(depth: int, service: str, operation: str) -> tuple[tuple, ...]:
        return ((depth, service, operation), (depth, service), (depth,))

    def _pick_root(self, request, rng: random.Random) -> Span:
        if request.service is not None:
            if request.operation is not None:
                lo = bisect.bisect_left(self._root_keys, (request.service, request.operation))
                hi = bisect.bisect_right(self._root_keys, (request.service, request.operation))
            else:
                lo = bisect.bisect_left(self._root_keys, (request.service, ""))
                hi = bisect.bisect_left(self._root_keys, (request.service + "\0", ""))
            if lo < hi:
                return self.roots[rng.randrange(lo, hi)]
        return rng.choice(self.roots)

    def _grow(self, root: Span, rng: random.Random) -> Trace:
        tid = _hex(rng, 16)
        top = Span(tid, _hex(rng, 8), None, root.service, root.name, 0, root.duration_ns, root.kind,
                   Status(root.status.code))
        spans = [top]
        level = [top]
        depth = 1
        while level and depth < self.max_depth and len(spans) < self.max_spans:
            nxt = []
            for parent in level:
                keys = self._keys(depth, parent.service, parent.name)
                n = self.fanout.draw(keys, rng) or 0
                for _ in range(min(n, self.max_spans - len(spans))):
                    c: _Child = self.children.draw(keys, rng)
                    if c is None:
                        break
                    pd = parent.duration_ns
                    start = parent.start_ns + round(c.start_frac * pd)
                    end = min(start + round(c.duration_frac * pd), parent.end_ns)
                    span = Span(tid, _hex(rng, 8), parent.span_id, c.service, c.operation, start, end, c.kind,
                                Status(c.status))
                    spans.append(span)
                    nxt.append(span)
            level = nxt
            depth += 1
        return Trace(spans, tid)

    def generate(self, requests: Sequence, *, seed: int = 0, progress: Progress | None = None) -> list[Generated]:
        rng = random.Random(f"probabilistic:{seed}")
        out = []
        for r in requests:
            out.append(Generated(self._grow(self._pick_root(r, rng), rng)))
            if progress:
                progress(1)
        return out
