"""The fidelity harness: ask every generator the same questions, score the answers against real traces.

Three request sets are drawn from the real traces (seeded, so every generator gets the same ones):

- **free**: ``n`` requests naming only an entry service, drawn from the real traces' mix of entry services;
  everything else (operation, size, calls, timing) is the generator's. The distribution metrics
  (:mod:`.metrics`) and utility score these traces. The entry is given because a held-out split may mix
  applications differently from training (the joined TrainTicket + Online Boutique corpus: 21 % TrainTicket
  traces in training, 85 % in validation), and a generator should not be scored on that shift.
- **conditioned**: ``n_conditioned`` requests copying the entry (service, operation), calls (spans) and depth
  (span levels) of real traces drawn at random. Validity and conditioned accuracy score these, binned by the
  requested calls x depth (the heatmap).
- **instructions**: ``n_instructions`` each of "high latency" (latency above the p90 of the requested entry),
  "include call A -> B" (a call seen in under 10 % of the entry's training traces, as instruction tuning defines
  "uncommon") and both together, for entries drawn at random from the real traces.

Traces read from files are scored as a free set (their requests are unknown). Validity is the validator's
(:func:`otel_tracegen.validate.validate`) with a tolerance; a request answered with no trace counts as invalid,
with its reason.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..trace import Trace
from ..validate import ViolationKind, validate
from . import metrics as m
from .generators import Generated, Generator

CALL_BINS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127),
                                                 (128, None))  # fmt: skip
DEPTH_BINS: tuple[tuple[int, int | None], ...] = tuple((d, d) for d in range(1, 8)) + ((8, None),)
SIZE_VIOLATIONS = {ViolationKind.CALLS_MISMATCH, ViolationKind.DEPTH_MISMATCH}
INSTRUCTIONS = ("high_latency", "include", "both")


def bin_label(b: tuple[int, int | None]) -> str:
    lo, hi = b
    return f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")


def bin_of(value: int, bins: Sequence[tuple[int, int | None]]) -> int:
    for i, (lo, hi) in enumerate(bins):
        if value >= lo and (hi is None or value <= hi):
            return i
    return 0


@dataclass
class Settings:
    n: int = 200
    n_conditioned: int | None = None  # None: n
    n_instructions: int = 50  # per instruction kind; 0: none
    seed: int = 0
    tolerance_us: float = 0.0
    smoothing: float = m.KL_SMOOTHING
    utility: bool = True
    min_service_samples: int = 5  # per-service EMDs over services with at least this many real values

    @property
    def conditioned(self) -> int:
        return self.n if self.n_conditioned is None else self.n_conditioned


@dataclass
class Reference:
    """What the real and training traces say, computed once: the entry p90s and the request sets."""

    p90_us: dict[tuple[str, str], float]
    free: list
    conditioned: list
    instructions: dict[str, list]


@dataclass
class Cell:
    """Conditioned requests of one (calls bin, depth bin): how many, how many valid, how many valid with exactly
    the requested calls and depth, and the violations by name (requests with each)."""

    requests: int = 0
    valid: int = 0
    accurate: int = 0
    violations: Counter = field(default_factory=Counter)


@dataclass
class GeneratorScore:
    """Everything the report shows about one generator (or one set of files)."""

    name: str
    honours: frozenset[str]
    source: str  # "generator" or "files"
    traces: list[Trace] = field(default_factory=list)  # the free set's traces
    problems: Counter = field(default_factory=Counter)  # why requests got no trace
    values: dict[str, float] = field(default_factory=dict)  # metric name -> value (see METRICS)
    violations: Counter = field(default_factory=Counter)  # violation kind -> free traces with it
    heatmap: dict[tuple[int, int], Cell] = field(default_factory=dict)  # (call bin, depth bin) -> conditioned results
    heavy: dict[str, dict[int, float]] = field(default_factory=dict)  # "service"/"operation" -> K -> overlap
    emd_services: dict[str, dict[str, float]] = field(default_factory=dict)  # quantity -> service -> EMD
    instructions: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (requests, met)
    utility: object | None = None  # utility.UtilityResult
    seconds: float = 0.0
    error: str = ""  # why the generator stopped, when it failed (the others are still scored)


METRICS: dict[str, str] = {
    "validity": "free traces with no violation of the validator (unanswered requests count as invalid)",
    "conditioned_valid": "conditioned requests answered with a valid trace (structure and time windows)",
    "calls_exact": "conditioned requests whose trace has exactly the requested spans",
    "depth_exact": "conditioned requests whose trace has exactly the requested depth",
    "size_exact": "conditioned requests whose trace has exactly the requested calls and depth",
    "conditioned_accuracy": "conditioned requests answered with a valid trace of exactly the requested calls and depth "
                            "(the paper's structured reasoning accuracy)",
    "kl_popular_calls": "KL(real || synthetic) of (source service, destination service, kind) calls, nats",
    "heavy_hitters_service_k5": "top-5 overlap of the most-called services",
    "heavy_hitters_service_k10": "top-10 overlap of the most-called services",
    "heavy_hitters_service_all": "top-K overlap of services at K = the number of real services",
    "heavy_hitters_operation_k10": "top-10 overlap of the most-called (service, operation) pairs",
    "heavy_hitters_operation_k50": "top-50 overlap of the most-called (service, operation) pairs",
    "emd_in_degree": "normalized EMD of the calls each (trace, service) node receives",
    "emd_out_degree": "normalized EMD of the calls each (trace, service) node makes",
    "emd_response_time": "normalized EMD of span durations (µs)",
    "emd_log_response_time": "normalized EMD of log10(1 + span duration in µs)",
    "emd_in_degree_per_service": "per-service normalized EMD of in-degree, weighted mean",
    "emd_out_degree_per_service": "per-service normalized EMD of out-degree, weighted mean",
    "emd_response_time_per_service": "per-service normalized EMD of span durations, weighted mean",
    "emd_log_response_time_per_service": "per-service normalized EMD of log10(1 + µs), weighted mean",
    "shape_precision": "synthetic traces whose (service, operation) tree occurs in the real set",
    "shape_coverage": "real traces whose tree occurs in the synthetic set",
    "shape_jsd": "Jensen-Shannon divergence of the tree distributions, base 2",
    "memorization": "synthetic traces whose tree equals a training trace's",
    "exact_copies": "synthetic traces equal to a training trace in every modelled field",
    "high_latency_following": "high-latency requests answered at the requested entry, above its p90",
    "include_following": "include-call requests answered at the requested entry with that call",
    "both_following": "requests with both answered with both",
}


def build_reference(real: Sequence[Trace], train: Sequence[Trace] | None, settings: Settings) -> Reference:
    """The p90s and uncommon calls (from ``train``, else from ``real``) and the three request sets."""
    from ..encoding import Include
    from ..lm.data import corpus_stats_for_instructions
    from ..sampling import TraceRequest

    stats = corpus_stats_for_instructions(train if train else real)
    rng = random.Random(f"requests:{settings.seed}")
    # Requests copy sound real traces only: one root, every span below it (calls = spans, depth = levels).
    rooted = [t for t in real if t.root is not None and len(m.tops(t)) == 1 and len(t.by_id) == len(t.spans)]
    if not rooted:
        raise ValueError("the real traces have no trace with a single root and every span below it to draw "
                         "requests from")
    free = [TraceRequest(service=rng.choice(rooted).root.service) for _ in range(settings.n)]
    conditioned = []
    for _ in range(settings.conditioned):
        t = rng.choice(rooted)
        conditioned.append(TraceRequest(service=t.root.service, operation=t.root.name, calls=len(t), depth=t.depth))
    instructions: dict[str, list] = {k: [] for k in INSTRUCTIONS}
    entries = [m.entry_of(t) for t in rooted if m.entry_of(t) in stats.p90_us]
    entry_set = set(entries)
    pairs = sorted((e, edge) for e, edges in stats.uncommon.items() if e in entry_set for edge in edges)
    for _ in range(settings.n_instructions if entries else 0):
        svc, op = rng.choice(entries)
        instructions["high_latency"].append(TraceRequest(service=svc, operation=op, high_latency=True))
    for _ in range(settings.n_instructions if pairs else 0):
        (svc, op), (a, b, kind) = rng.choice(pairs)
        inc = (Include(a, b, kind),)
        instructions["include"].append(TraceRequest(service=svc, operation=op, includes=inc))
        instructions["both"].append(TraceRequest(service=svc, operation=op, includes=inc, high_latency=True))
    return Reference(dict(stats.p90_us), free, conditioned, instructions)


def score_instructions(requests: Sequence, answers: Sequence[Generated], kind: str, p90_us: dict) -> tuple[int, int]:
    """(requests, requests met): ``kind`` is high_latency, include or both."""
    met = 0
    for r, g in zip(requests, answers):
        t = g.trace
        if t is None:
            continue
        ok = m.entry_of(t) == (r.service, r.operation)
        if kind in ("high_latency", "both"):
            ok = ok and m.is_high_latency(t, (r.service, r.operation), p90_us)
        if kind in ("include", "both"):
            ok = ok and m.has_calls(t, r.includes)
        met += ok
    return len(requests), met


def score_conditioned(requests: Sequence, answers: Sequence[Generated], tolerance_ns: int) -> tuple[dict, dict]:
    """Rates over the conditioned requests, and the heatmap :class:`Cell` of each (call bin, depth bin)."""
    cells: dict[tuple[int, int], Cell] = {}
    valid = calls = depth = size = accurate = 0
    for r, g in zip(requests, answers):
        cell = cells.setdefault((bin_of(r.calls, CALL_BINS), bin_of(r.depth, DEPTH_BINS)), Cell())
        cell.requests += 1
        t = g.trace
        if t is None:
            cell.violations["no trace"] += 1
            continue
        kinds = {v.kind for v in validate(t, tolerance_ns=tolerance_ns, expect_calls=r.calls, expect_depth=r.depth)}
        cell.violations.update(k.value for k in kinds)
        ok_valid = not (kinds - SIZE_VIOLATIONS)
        ok_calls = ViolationKind.CALLS_MISMATCH not in kinds
        ok_depth = ViolationKind.DEPTH_MISMATCH not in kinds
        valid += ok_valid
        calls += ok_calls
        depth += ok_depth
        size += ok_calls and ok_depth
        cell.valid += ok_valid
        if ok_valid and ok_calls and ok_depth:
            accurate += 1
            cell.accurate += 1
    n = len(requests)
    rates = {"conditioned_valid": valid / n, "calls_exact": calls / n, "depth_exact": depth / n,
             "size_exact": size / n, "conditioned_accuracy": accurate / n} if n else {}  # fmt: skip
    return rates, cells


def score_distributions(score: GeneratorScore, real: Sequence[Trace], train: Sequence[Trace] | None,
                        settings: Settings, real_cache: dict) -> None:
    """The distribution metrics of ``score.traces`` against ``real`` (and ``train`` for memorization)."""
    syn = score.traces
    v = score.values
    if not syn:
        return
    if "calls" not in real_cache:  # the real side is the same for every generator
        real_cache["calls"] = m.popular_calls(real)
        real_cache["service"] = m.call_counts(real, "service")
        real_cache["operation"] = m.call_counts(real, "operation")
        real_cache["degrees"] = m.node_degrees(real)
        real_cache["rt"] = m.response_times(real)
        real_cache["shapes"] = m.shape_counts(real)
    v["kl_popular_calls"] = m.kl_divergence(real_cache["calls"], m.popular_calls(syn), settings.smoothing)
    for by in ("service", "operation"):
        curve = m.heavy_hitter_curve(real_cache[by], m.call_counts(syn, by))
        score.heavy[by] = curve
    for name, key in (("heavy_hitters_service_k5", ("service", 5)), ("heavy_hitters_service_k10", ("service", 10)),
                      ("heavy_hitters_operation_k10", ("operation", 10)),
                      ("heavy_hitters_operation_k50", ("operation", 50))):  # fmt: skip
        by, k = key
        if k <= len(real_cache[by]):
            v[name] = m.top_k_overlap(real_cache[by], m.call_counts(syn, by), k)
    n_services = len(real_cache["service"])
    if n_services:
        v["heavy_hitters_service_all"] = m.top_k_overlap(real_cache["service"], m.call_counts(syn, "service"),
                                                         n_services)  # fmt: skip
    ins, outs = m.node_degrees(syn)
    rts = m.response_times(syn)
    for quantity, r, s, transform in (("in_degree", real_cache["degrees"][0], ins, None),
                                      ("out_degree", real_cache["degrees"][1], outs, None),
                                      ("response_time", real_cache["rt"], rts, None),
                                      ("log_response_time", real_cache["rt"], rts, m.log_us)):  # fmt: skip
        res = m.emd_by_service(r, s, min_samples=settings.min_service_samples, transform=transform)
        v[f"emd_{quantity}"] = res.overall
        v[f"emd_{quantity}_per_service"] = res.per_service
        score.emd_services[quantity] = res.services
    sh = m.shape_metrics(real_cache["shapes"], m.shape_counts(syn))
    v["shape_precision"], v["shape_coverage"], v["shape_jsd"] = sh.precision, sh.coverage, sh.jsd
    if train:
        if "train_index" not in real_cache:
            real_cache["train_index"] = m.TrainingIndex.of(train)
        mem = m.memorization(real_cache["train_index"], syn)
        v["memorization"], v["exact_copies"] = mem.shape, mem.exact_copies


def score_validity(score: GeneratorScore, answers: Sequence[Generated], tolerance_ns: int) -> None:
    """The validity of the free set: no request size is known there, so every rule but calls/depth."""
    valid = 0
    for g in answers:
        if g.trace is None:
            score.problems[g.problem.split(":")[0] or "no trace"] += 1
            continue
        kinds = {v.kind for v in validate(g.trace, tolerance_ns=tolerance_ns)}
        score.violations.update(k.value for k in kinds)
        valid += not kinds
    if answers:
        score.values["validity"] = valid / len(answers)


ProgressFactory = Callable[[str, int], Callable[[int], None]]
"""``(description, total) -> advance(n)``: one progress bar per phase."""


def evaluate_generator(gen: Generator, reference: Reference, real: Sequence[Trace], train: Sequence[Trace] | None,
                       settings: Settings, real_cache: dict, bar: ProgressFactory | None = None) -> GeneratorScore:
    """Run ``gen`` on every request set and score it."""
    t0 = time.perf_counter()
    score = GeneratorScore(gen.name, frozenset(gen.honours), "generator")
    tol = int(settings.tolerance_us * 1000)
    advance = bar(f"{gen.name}: free", len(reference.free)) if bar else None
    free = gen.generate(reference.free, seed=settings.seed, progress=advance)
    score.traces = [g.trace for g in free if g.trace is not None]
    score_validity(score, free, tol)
    if reference.conditioned:
        advance = bar(f"{gen.name}: conditioned", len(reference.conditioned)) if bar else None
        answers = gen.generate(reference.conditioned, seed=settings.seed + 1, progress=advance)
        rates, score.heatmap = score_conditioned(reference.conditioned, answers, tol)
        score.values.update(rates)
    for k, kind in enumerate(INSTRUCTIONS):
        reqs = reference.instructions.get(kind) or []
        if not reqs:
            continue
        advance = bar(f"{gen.name}: {kind}", len(reqs)) if bar else None
        answers = gen.generate(reqs, seed=settings.seed + 2 + k, progress=advance)
        score.instructions[kind] = score_instructions(reqs, answers, kind, reference.p90_us)
        n, met = score.instructions[kind]
        score.values[f"{kind}_following"] = met / n
    _finish(score, reference, real, train, settings, real_cache)
    score.seconds = time.perf_counter() - t0
    return score


def score_files(name: str, traces: Sequence[Trace], reference: Reference, real: Sequence[Trace],
                train: Sequence[Trace] | None, settings: Settings, real_cache: dict) -> GeneratorScore:
    """Synthetic traces read from files: a free set (no requests are known)."""
    score = GeneratorScore(name, frozenset(), "files")
    score.traces = list(traces)
    score_validity(score, [Generated(t) for t in traces], int(settings.tolerance_us * 1000))
    _finish(score, reference, real, train, settings, real_cache)
    return score


def _finish(score: GeneratorScore, reference: Reference, real, train, settings: Settings, real_cache: dict) -> None:
    score_distributions(score, real, train, settings, real_cache)
    if settings.utility and score.traces:
        from .utility import utility

        if train:
            real_train = utility_training_sample(train, reference.free, settings.seed)
            score.utility = utility(real_train, score.traces, list(real), reference.p90_us)
            for k, val in score.utility.gaps().items():
                score.values[f"utility_gap_{k}"] = val


def utility_training_sample(train: Sequence[Trace], free_requests: Sequence, seed: int) -> list[Trace]:
    """Real training traces for utility, as many per entry service as the free requests asked of the generators
    (as far as training has them), so real and synthetic training sets share their entry mix: the held-out split
    may mix applications differently from training, and the classifier must not be scored on that shift."""
    rng = random.Random(f"utility:{seed}")
    by_service: dict[str, list[Trace]] = {}
    for t in train:
        if t.root is not None:
            by_service.setdefault(t.root.service, []).append(t)
    wanted = Counter(r.service for r in free_requests if r.service is not None)
    out: list[Trace] = []
    for service, n in sorted(wanted.items()):
        pool = by_service.get(service, [])
        out.extend(rng.sample(pool, min(n, len(pool))))
    rng.shuffle(out)
    return out


@dataclass
class Evaluation:
    """A whole run: the reference, one score per generator or file set, and what was compared."""

    settings: Settings
    reference: Reference
    real_traces: int
    train_traces: int
    real_label: str
    train_label: str
    scores: list[GeneratorScore]
    real: list[Trace] = field(default_factory=list, repr=False)

    def table(self) -> dict[str, dict[str, float]]:
        """metric -> generator -> value (nan where not measured)."""
        names = [s.name for s in self.scores]
        keys = list(METRICS) + sorted({k for s in self.scores for k in s.values if k not in METRICS})
        return {k: {n: s.values.get(k, math.nan) for n, s in zip(names, self.scores)} for k in keys}


def evaluate(real: Sequence[Trace], *, generators: Sequence[Generator] = (),
             synthetic: dict[str, Sequence[Trace]] | None = None, train: Sequence[Trace] | None = None,
             settings: Settings | None = None, bar: ProgressFactory | None = None, real_label: str = "real",
             train_label: str = "") -> Evaluation:
    """Score each generator and each named set of synthetic traces against ``real``."""
    settings = settings or Settings()
    real = list(real)
    if not real:
        raise ValueError("no real traces to compare with")
    reference = build_reference(real, train, settings)
    cache: dict = {}
    scores = []
    for g in generators:
        try:
            scores.append(evaluate_generator(g, reference, real, train, settings, cache, bar))
        except Exception as e:  # one generator's crash must not lose the others' (possibly long) runs
            scores.append(GeneratorScore(g.name, frozenset(g.honours), "generator", error=f"{type(e).__name__}: {e}"))
    for name, traces in (synthetic or {}).items():
        scores.append(score_files(name, traces, reference, real, train, settings, cache))
    return Evaluation(settings, reference, len(real), len(train or []), real_label, train_label, scores, real)
