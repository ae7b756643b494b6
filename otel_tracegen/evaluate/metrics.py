"""Fidelity metrics: how close synthetic traces are to real ones, each defined here exactly as the report states it.

Every function takes canonical :class:`~otel_tracegen.trace.Trace` objects (any adapter reads them) and returns
plain numbers, so a user can recompute any figure of the report by hand. The definitions:

- **Popular calls** (:func:`popular_calls`, :func:`kl_divergence`). A call is a parent span -> child span edge,
  counted as ``(parent service, child service, child span kind)``: the paper's (source, destination,
  communication type). KL(real || synthetic) in nats over the union of calls seen in either set, both
  distributions smoothed additively with ``smoothing`` pseudo-counts per call (default 0.5, Jeffreys), so a call
  the synthetic set never makes costs a finite amount and identical sets score exactly 0.
- **Heavy hitters** (:func:`call_counts`, :func:`top_k_overlap`). A service's calls are its spans; a
  (service, operation) pair's calls are the spans with that name. Top-K is the K most-called, ties broken by
  name; the overlap is ``|TopK(synthetic) ∩ TopK(real)| / K``, for K from 5 to the number present in the real set.
- **Branching and latency** (:func:`node_degrees`, :func:`response_times`, :func:`normalized_emd`). Each
  (trace, service) pair is a node of the paper's call graph: its in-degree is the calls it receives (its spans in
  that trace, the root's being the client's call), its out-degree the calls it makes (the children of those
  spans; every parent -> child span edge counts, same-service ones too). Response time is each span's duration in
  µs, and (``log_response_time``) log10(1 + µs). The distance is the 1-D Wasserstein distance (EMD) between the
  two samples after min-max normalizing both by the REAL sample's range: ``W1 / (max(real) - min(real))`` (a
  range of 0 counts as 1), so identical samples score 0, a copy of the real sample shifted by ``d`` scores
  ``d / range``, and synthetic values far outside the real range score above 1. Per service, the same over that
  service's values, for services with at least 5 real values; a service absent from the synthetic set scores 1,
  and the per-service figure is the mean weighted by the service's real sample count.
- **Whole-tree shape** (:func:`shape`, :func:`shape_metrics`). A trace's shape is its call tree of
  (service, operation) with children order-free (times, kinds and statuses ignored); a trace with several
  tops (roots, or orphans whose parent is missing) is the sorted set of their trees. Precision: the fraction of
  synthetic traces whose shape occurs in the real set. Coverage: the fraction of real traces whose shape occurs
  in the synthetic set. JSD: the Jensen-Shannon divergence (base 2, so in [0, 1]) of the two shape
  distributions.
- **Memorization** (:func:`memorization`): the fraction of synthetic traces whose shape equals a training
  trace's shape, and (``exact_copies``) the fraction equal to a training trace in every modelled field
  (:func:`otel_tracegen.dataset.model_view`: shape, kinds, statuses and µs times).
- **Validity** lives in :mod:`.harness` (the validator's named violations, by requested calls x depth).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..trace import Trace

KL_SMOOTHING = 0.5
"""Pseudo-count added to every call of the union before KL (Jeffreys' prior; 1.0 would be Laplace's)."""

HEAVY_HITTER_MIN_K = 5

Call = tuple[str, str, str]
"""(parent service, child service, child span kind name)."""


# --- popular calls ---------------------------------------------------------------------------------------------


def popular_calls(traces: Iterable[Trace]) -> Counter[Call]:
    """Parent -> child span edges counted as (parent service, child service, child kind name)."""
    out: Counter[Call] = Counter()
    for t in traces:
        by_id = t.by_id
        for s in t.spans:
            p = by_id.get(s.parent_id) if s.parent_id is not None else None
            if p is not None and p is not s:
                out[(p.service, s.service, s.kind.name)] += 1
    return out


def kl_divergence(real: Counter, synthetic: Counter, smoothing: float = KL_SMOOTHING) -> float:
    """KL(P_real || Q_synthetic) in nats, both smoothed with ``smoothing`` pseudo-counts over the union of keys.

    ``nan`` when either side has no calls. With ``smoothing=0`` a key the synthetic set lacks gives ``inf``.
    """
    keys = set(real) | set(synthetic)
    if not sum(real.values()) or not sum(synthetic.values()):
        return math.nan  # no calls on one side: nothing to compare (smoothing alone would make it look uniform)
    n_p = sum(real.values()) + smoothing * len(keys)
    n_q = sum(synthetic.values()) + smoothing * len(keys)
    if n_p <= 0 or n_q <= 0:
        return math.nan
    terms = []
    for k in keys:
        p = (real.get(k, 0) + smoothing) / n_p
        if p == 0:
            continue
        q = (synthetic.get(k, 0) + smoothing) / n_q
        if q == 0:
            return math.inf
        terms.append(p * math.log(p / q))
    # fsum: exactly rounded, so the result does not depend on the order sets iterate in (it varies by process)
    return max(math.fsum(terms), 0.0)  # and round-off must not print -0.0000 for identical sets


# --- heavy hitters ---------------------------------------------------------------------------------------------


def call_counts(traces: Iterable[Trace], by: str = "service") -> Counter:
    """Calls (spans) per service (``by="service"``) or per ``(service, operation)`` (``by="operation"``)."""
    if by not in ("service", "operation"):
        raise ValueError(f"by must be 'service' or 'operation', got {by!r}")
    out: Counter = Counter()
    for t in traces:
        for s in t.spans:
            out[s.service if by == "service" else (s.service, s.name)] += 1
    return out


def top_k(counts: Counter, k: int) -> list:
    """The ``k`` most-called keys, ties broken by the key's order (names sort alphabetically)."""
    return [key for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def top_k_overlap(real: Counter, synthetic: Counter, k: int) -> float:
    """``|TopK(synthetic) ∩ TopK(real)| / k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(set(top_k(real, k)) & set(top_k(synthetic, k))) / k


def heavy_hitter_curve(real: Counter, synthetic: Counter, ks: Sequence[int] | None = None) -> dict[int, float]:
    """Top-K overlap for each K, by default from 5 (or fewer when fewer are present) to the number present in
    ``real``."""
    if ks is None:
        n = len(real)
        ks = range(min(HEAVY_HITTER_MIN_K, n), n + 1) if n else []
    wanted = sorted({k for k in ks if k >= 1})
    if not wanted:
        return {}
    # One sort per side, then the overlap grows one rank at a time (re-sorting per K is quadratic on big sets).
    r_rank, s_rank = top_k(real, wanted[-1]), top_k(synthetic, wanted[-1])
    seen_r: set = set()
    seen_s: set = set()
    both = 0
    out = {}
    for k in range(1, wanted[-1] + 1):
        # A key is counted once, when it enters the second of the two top-k sets.
        if k <= len(r_rank):
            seen_r.add(r_rank[k - 1])
            both += r_rank[k - 1] in seen_s
        if k <= len(s_rank):
            seen_s.add(s_rank[k - 1])
            both += s_rank[k - 1] in seen_r
        out[k] = both / k
    return {k: out[k] for k in wanted}


# --- branching and latency -------------------------------------------------------------------------------------


def node_degrees(traces: Iterable[Trace]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per service, the in-degrees and the out-degrees of its (trace, service) nodes, one value per trace it
    appears in: calls received (its spans) and calls made (the children of its spans)."""
    ins: dict[str, list[int]] = defaultdict(list)
    outs: dict[str, list[int]] = defaultdict(list)
    for t in traces:
        got: Counter[str] = Counter()
        made: Counter[str] = Counter()
        for s in t.spans:
            got[s.service] += 1
            made[s.service] += len(t.children(s))
        for svc, n in got.items():
            ins[svc].append(n)
            outs[svc].append(made[svc])
    return dict(ins), dict(outs)


def response_times(traces: Iterable[Trace]) -> dict[str, list[float]]:
    """Per service, the duration of each of its spans in µs."""
    out: dict[str, list[float]] = defaultdict(list)
    for t in traces:
        for s in t.spans:
            out[s.service].append(s.duration_ns / 1000)
    return dict(out)


def wasserstein_1d(a: Sequence[float], b: Sequence[float]) -> float:
    """The exact 1-Wasserstein distance between two empirical samples: the area between their CDFs."""
    x = np.sort(np.asarray(a, dtype=float))
    y = np.sort(np.asarray(b, dtype=float))
    if x.size == 0 or y.size == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    grid = np.concatenate([x, y])
    grid.sort(kind="mergesort")
    widths = np.diff(grid)
    cdf_x = np.searchsorted(x, grid[:-1], side="right") / x.size
    cdf_y = np.searchsorted(y, grid[:-1], side="right") / y.size
    return float(np.sum(np.abs(cdf_x - cdf_y) * widths))


def normalized_emd(real: Sequence[float], synthetic: Sequence[float]) -> float:
    """EMD after min-max normalizing both samples by the real sample's range: ``W1(real, synthetic) / (max(real) -
    min(real))``. 0 for identical samples; a copy of the real sample shifted by ``d`` scores ``d / range``; a
    synthetic sample far outside the real range scores above 1 (an outlier makes it worse, never better). When
    every real value is the same, the range is taken as 1 (degrees) so the distance stays defined."""
    x = np.asarray(real, dtype=float)
    y = np.asarray(synthetic, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("normalized_emd needs two non-empty samples")
    span = x.max() - x.min()
    return wasserstein_1d(x, y) / (span if span > 0 else 1.0)


def log_us(values: Sequence[float]) -> list[float]:
    """log10(1 + µs): response times on the scale their CDFs are read on."""
    return [math.log10(1 + max(v, 0.0)) for v in values]


@dataclass
class EmdResult:
    overall: float  # pooled over every service
    per_service: float  # weighted mean over the real set's services (weight: real sample count)
    services: dict[str, float]  # service -> EMD (1.0 where the synthetic set lacks the service)


def emd_by_service(real: dict[str, list[float]], synthetic: dict[str, list[float]], *,
                   min_samples: int = 1, transform=None) -> EmdResult:
    """:func:`normalized_emd` overall and per service of ``real`` with at least ``min_samples`` values, on
    ``transform(values)`` when given (e.g. ``log_us``)."""
    if transform is not None:
        real = {k: transform(v) for k, v in real.items()}
        synthetic = {k: transform(v) for k, v in synthetic.items()}
    pooled_r = [v for vs in real.values() for v in vs]
    pooled_s = [v for vs in synthetic.values() for v in vs]
    overall = normalized_emd(pooled_r, pooled_s) if pooled_r and pooled_s else math.nan
    services: dict[str, float] = {}
    weight = total = 0.0
    for svc, vs in sorted(real.items()):
        if len(vs) < min_samples:
            continue
        other = synthetic.get(svc)
        d = normalized_emd(vs, other) if other else 1.0
        services[svc] = d
        weight += len(vs)
        total += len(vs) * d
    return EmdResult(overall, total / weight if weight else math.nan, services)


# --- whole-tree shape ------------------------------------------------------------------------------------------


def tops(trace: Trace) -> list:
    """Where a trace's subtrees start: its roots and its orphans (spans whose parent is not in the trace)."""
    by_id = trace.by_id
    return [s for s in trace.spans if s.parent_id is None or s.parent_id not in by_id]


def shape(trace: Trace) -> tuple:
    """The call tree of (service, operation) with children order-free: ``(service, operation, (child shapes,
    sorted))``. A trace with several tops (roots, or orphans whose parent is missing) is the sorted tuple of their
    shapes under ``("", "")``, so a broken trace matches only a trace broken the same way."""
    keys: dict[int, tuple] = {}
    starts = tops(trace)
    for start in starts:
        order = [s for s, _ in trace.walk(start)]
        for s in reversed(order):  # children before parents
            if id(s) not in keys:
                keys[id(s)] = (s.service, s.name,
                               tuple(sorted(keys[id(c)] for c in trace.children(s) if id(c) in keys)))  # fmt: skip
    if len(starts) == 1:
        return keys[id(starts[0])]
    return ("", "", tuple(sorted(keys[id(r)] for r in starts if id(r) in keys)))


def shape_counts(traces: Iterable[Trace]) -> Counter[tuple]:
    return Counter(shape(t) for t in traces)


def jensen_shannon(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence of two count distributions, base 2 (0: identical, 1: disjoint supports)."""
    np_, nq = sum(p.values()), sum(q.values())
    if np_ == 0 or nq == 0:
        return math.nan
    terms = []
    for k in set(p) | set(q):
        a, b = p.get(k, 0) / np_, q.get(k, 0) / nq
        m = (a + b) / 2
        if a:
            terms.append(0.5 * a * math.log2(a / m))
        if b:
            terms.append(0.5 * b * math.log2(b / m))
    return min(max(math.fsum(terms), 0.0), 1.0)


@dataclass
class ShapeResult:
    precision: float  # synthetic traces whose shape occurs in the real set
    coverage: float  # real traces whose shape occurs in the synthetic set
    jsd: float  # Jensen-Shannon divergence of the shape distributions, base 2
    real_shapes: int
    synthetic_shapes: int


def shape_metrics(real: Counter, synthetic: Counter) -> ShapeResult:
    """Precision, coverage and JSD from two :func:`shape_counts`."""
    n_r, n_s = sum(real.values()), sum(synthetic.values())
    precision = sum(n for k, n in synthetic.items() if k in real) / n_s if n_s else math.nan
    coverage = sum(n for k, n in real.items() if k in synthetic) / n_r if n_r else math.nan
    return ShapeResult(precision, coverage, jensen_shannon(real, synthetic), len(real), len(synthetic))


# --- memorization ----------------------------------------------------------------------------------------------


def _view(trace: Trace) -> tuple | None:
    """The modelled fields (:func:`otel_tracegen.dataset.model_view`), or None for a trace that has no such view
    (no single root, duplicate ids, spans not below the root): it can be no exact copy."""
    from ..dataset import model_view

    if trace.root is None or len(trace.by_id) != len(trace.spans) or len(tops(trace)) != 1:
        return None
    return model_view(trace)


@dataclass
class MemorizationResult:
    shape: float  # synthetic traces whose shape matches a training trace's
    exact_copies: float  # synthetic traces equal to a training trace in every modelled field


@dataclass
class TrainingIndex:
    """The shapes and modelled views of the training traces, computed once for every memorization question."""

    shapes: set
    views: set

    @classmethod
    def of(cls, train: Iterable[Trace]) -> TrainingIndex:
        train = list(train)
        return cls({shape(t) for t in train}, {_view(t) for t in train} - {None})


def memorization(train: Iterable[Trace] | TrainingIndex, synthetic: Sequence[Trace]) -> MemorizationResult:
    """Shape memorization and exact copies of ``synthetic`` against the training traces (or their index)."""
    if not synthetic:
        return MemorizationResult(math.nan, math.nan)
    index = train if isinstance(train, TrainingIndex) else TrainingIndex.of(train)
    shapes, views = index.shapes, index.views
    same_shape = sum(shape(t) in shapes for t in synthetic)
    copies = sum(v is not None and v in views for v in map(_view, synthetic))
    return MemorizationResult(same_shape / len(synthetic), copies / len(synthetic))


# --- helpers shared by the harness and the utility tasks --------------------------------------------------------


def entry_of(trace: Trace) -> tuple[str, str] | None:
    """(root service, root operation), or None without a single root."""
    r = trace.root
    return (r.service, r.name) if r is not None else None


def is_high_latency(trace: Trace, entry: tuple[str, str], p90_us: dict) -> bool:
    """Entered at ``entry`` with a latency above its p90; latency in whole µs (``encoding.trace_latency_us``), as
    the p90s were computed."""
    root = trace.root
    limit = p90_us.get(entry)
    return (root is not None and limit is not None and (root.service, root.name) == entry
            and root.duration_ns // 1000 > limit)  # fmt: skip


def has_calls(trace: Trace, includes) -> bool:
    """Whether every include (src service, dst service, kind) is a call of ``trace``."""
    from ..lm.data import trace_edges

    edges = trace_edges(trace)
    return all((i.src, i.dst, i.kind) in edges for i in includes)
