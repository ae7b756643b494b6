"""Rank the services of a window by how likely each is to be where a failure started, with the evidence.

The method compares the window with a baseline period context by context (see :mod:`.profile`):

- For every context, the **shift** of its latency: ``(window median - baseline p75) / scale``, where the scale is
  the baseline median or interquartile range, whichever is larger (and at least 100 µs), times the share of window spans slower than the baseline p75 (consistency: about
  0.25 when nothing changed), for self-times (charged to the span's own service) and for call gaps (charged to the
  callee). A context seen in k < ``support`` traces of the window counts (k / support)^2 (one slow trace is weak
  evidence); one seen fewer than ``support`` times in the baseline has no reference and is skipped.
- A service's score is the sum of its two largest shifts: an origin usually slows more than one of its
  operations or edges, a bystander one. Latency spreads upward (every ancestor of a slow span is slow too),
  but self-times and gaps do not: they stay where the time was lost. That is the "stop where the surprise no
  longer comes from below" rule of a root-down walk, applied to all traces of the window at once.

No threshold decides what is anomalous: services are only ordered. Call-count changes (missing or extra calls)
are reported as evidence but do not score, because on the measured data they follow the workload mix more than
the fault (the call-frequency baseline in ``benchmarks/localize.py`` measures this).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Iterable, NamedTuple, Sequence

from ..trace import Trace
from .profile import Context, Profile, Sample

DEFAULT_SUPPORT = 5
REF_Q = 0.75  # the window's median is compared with the slow quarter of normal
TOP_K = 2  # a service scores by its two strongest contexts
FLOOR_NS = 100_000  # shifts are relative to the baseline median, but never to less than 100 µs: below that a
# self-time is clock resolution and instrumentation overhead (a client span its server span fills measures ~0), and a
# 1 ms change would read as a thousandfold one


@dataclass
class Evidence:
    """One context whose latency moved, for a person to follow up in Jaeger."""

    kind: str  # "self-time" or "call-gap"
    service: str  # the service charged
    operation: str
    caller: str  # "service operation" of the parent span ("" for a root)
    baseline_median_us: float
    baseline_p75_us: float
    window_median_us: float
    window_spans: int
    baseline_spans: int
    shift: float  # see _shift and docs/localize.md
    traces_affected: int  # window traces where this context was slower than the baseline p75
    examples: list[dict] = field(default_factory=list)  # the slowest window spans: trace_id, span_id, value_us
    route: list[str] = field(default_factory=list)  # root-first "service operation" path to one such span
    slower_traces: set = field(default_factory=set, repr=False)  # the traces counted in traces_affected

    def line(self) -> str:
        what = (f"self-time of {self.operation!r}" if self.kind == "self-time"
                else f"latency of calls into {self.operation!r} from {self.caller!r} (client minus server)")
        change = (f"x{self.window_median_us / self.baseline_median_us:.1f}" if self.baseline_median_us > 0
                  else f"{self.window_median_us - self.baseline_median_us:+,.0f} µs")  # fmt: skip
        return (f"{what}: median {self.baseline_median_us:,.0f} µs -> {self.window_median_us:,.0f} µs "
                f"({change}) over {self.window_spans} spans; slower than normal (above its p75) in "
                f"{self.traces_affected} traces")  # fmt: skip


@dataclass
class CallChange:
    """An operation called more or less often per trace than in the baseline (missing or extra calls)."""

    service: str
    operation: str
    baseline_per_trace: float
    window_per_trace: float


@dataclass
class Suspect:
    rank: int
    service: str
    score: float
    evidence: list[Evidence]
    call_changes: list[CallChange]
    traces_affected: int  # window traces where at least one shown context of this service was slower than normal
    traces_with_service: int

    def as_dict(self) -> dict:
        d = asdict(self)
        for e in d["evidence"]:
            e.pop("slower_traces")
        if not math.isfinite(self.score):  # no context to compare: JSON has no -Infinity
            d["score"] = None
        return d


@dataclass
class Localization:
    """The ranking of one window."""

    suspects: list[Suspect]
    window_traces: int
    baseline_traces: int
    services: int

    @property
    def ranking(self) -> list[str]:
        return [s.service for s in self.suspects]

    def rank_of(self, service: str) -> int | None:
        for s in self.suspects:
            if s.service == service:
                return s.rank
        return None


def _median(samples: Sequence[Sample]) -> float:
    return statistics.median(s.value_ns for s in samples)


class Normal(NamedTuple):
    """What a context's latency was in the baseline: median and quartiles (ns), from one sort."""

    median: float
    p25: float
    p75: float

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Normal:
        xs = sorted(s.value_ns for s in samples)
        return cls(statistics.median(xs), xs[min(len(xs) - 1, int(0.25 * len(xs)))],
                   xs[min(len(xs) - 1, int(REF_Q * len(xs)))])  # fmt: skip


def _shift(window: Sequence[Sample], baseline: Sequence[Sample] | Normal, support: int) -> float:
    normal = baseline if isinstance(baseline, Normal) else Normal.of(baseline)
    traces = len({s.trace_id for s in window})  # spans of one trace are not independent evidence
    ref = normal.p75
    consistent = sum(1 for s in window if s.value_ns > ref) / len(window)  # ~0.25 when nothing changed
    # Relative to the normal median, or to the normal spread where that is wider: a context whose latency varies
    # widely (two-peaked, as a cache hit or miss) must move further before it counts.
    scale = max(abs(normal.median), FLOOR_NS, ref - normal.p25)
    # Seen in k < support traces of the window, a context counts (k / support)^2: one slow trace is weak evidence.
    return (_median(window) - ref) / scale * consistent * min(1.0, traces / support) ** 2


def _evidence(kind: str, ctx: Context, window: list[Sample], baseline: list[Sample], normal: Normal, support: int,
              routes: dict) -> Evidence:  # fmt: skip
    slower = {s.trace_id for s in window if s.value_ns > normal.p75}
    top = sorted(window, key=lambda s: -s.value_ns)[:3]
    return Evidence(
        kind=kind,
        service=ctx[2],
        operation=ctx[3],
        caller=f"{ctx[0]} {ctx[1]}".strip(),
        baseline_median_us=normal.median / 1e3,
        baseline_p75_us=normal.p75 / 1e3,
        window_median_us=_median(window) / 1e3,
        window_spans=len(window),
        baseline_spans=len(baseline),
        shift=_shift(window, normal, support),
        traces_affected=len(slower),
        examples=[{"trace_id": s.trace_id, "span_id": s.span_id, "value_us": s.value_ns / 1e3} for s in top],
        route=[f"{svc} {op}" for svc, op in routes.get(ctx, ())],
        slower_traces=slower,
    )


def localize(window: Iterable[Trace] | Profile, baseline: Iterable[Trace] | Profile, *, top: int | None = None,
             support: int = DEFAULT_SUPPORT, evidence_per_suspect: int = 3) -> Localization:  # fmt: skip
    """Rank the services seen in ``window`` by the latency shift of their contexts against ``baseline``."""
    w = window if isinstance(window, Profile) else Profile.of(window)
    b = baseline if isinstance(baseline, Profile) else Profile.of(baseline)
    found: dict[str, list[Evidence]] = {svc: [] for svc in w.services}
    for kind, wmap, bmap, routes in (("self-time", w.self_times, b.self_times, w.routes),
                                     ("call-gap", w.gaps, b.gaps, w.gap_routes)):
        for ctx, samples in wmap.items():
            ref = bmap.get(ctx)
            if not ref or len(ref) < support or ctx[2] not in found:
                continue
            key = (kind, ctx)
            normal = b.normals.get(key)
            if normal is None:  # a baseline profile is often reused for many windows: sort each context once
                normal = b.normals[key] = Normal.of(ref)
            found[ctx[2]].append(_evidence(kind, ctx, samples, ref, normal, support, routes))
    suspects = []
    for svc, ev in found.items():
        ev.sort(key=lambda e: -e.shift)
        score = (sum(e.shift for e in ev[:TOP_K]) if ev else -math.inf)
        shown = [e for e in ev[:evidence_per_suspect] if e.shift > 0] or ev[:1]
        slower = set().union(*(e.slower_traces for e in shown if e.shift > 0))
        suspects.append(Suspect(0, svc, score, shown, _call_changes(svc, w, b), len(slower), w.service_traces[svc]))
    suspects.sort(key=lambda s: (-s.score, s.service))
    for i, s in enumerate(suspects):
        s.rank = i + 1
    return Localization(suspects[:top] if top else suspects, w.traces, b.traces, len(suspects))


def _call_changes(service: str, w: Profile, b: Profile, limit: int = 3) -> list[CallChange]:
    if not w.traces or not b.traces:
        return []
    ops = {op for svc, op in w.calls if svc == service} | {op for svc, op in b.calls if svc == service}
    rows = []
    for op in ops:
        wr, br = w.calls[(service, op)] / w.traces, b.calls[(service, op)] / b.traces
        if wr != br:
            rows.append((abs(math.log((wr + 1e-3) / (br + 1e-3))), CallChange(service, op, br, wr)))
    rows.sort(key=lambda r: -r[0])
    return [c for _, c in rows[:limit]]


# --- baselines (benchmarks/localize.py compares against these) ------------------------------------------------


def rank_by_median_self_time(window: Profile, baseline: Profile) -> list[str]:
    """Services by the relative change of the median self-time of all their spans (the issue's baseline)."""

    def per_service(p: Profile) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for ctx, samples in p.self_times.items():
            out.setdefault(ctx[2], []).extend(s.value_ns for s in samples)
        return out

    ws, bs = per_service(window), per_service(baseline)

    def score(svc: str) -> float:
        if svc not in bs:
            return -math.inf
        base = statistics.median(bs[svc])
        return (statistics.median(ws[svc]) - base) / max(base, 1_000)

    return sorted(ws, key=lambda s: (-score(s), s))


def rank_by_call_frequency(window: Profile, baseline: Profile) -> list[str]:
    """Services by the relative change of their spans per trace, either way."""

    def rate(p: Profile, svc: str) -> float:
        return sum(n for (s, _), n in p.calls.items() if s == svc) / max(p.traces, 1)

    def score(svc: str) -> float:
        base = rate(baseline, svc)
        return abs(rate(window, svc) - base) / max(base, 1e-9)

    return sorted(window.services, key=lambda s: (-score(s), s))


def rank_randomly(window: Profile, seed: int = 0) -> list[str]:
    services = sorted(window.services)
    random.Random(seed).shuffle(services)
    return services
