"""``otel-tracegen generate``: traces from the model, anchored in time, with resources, written to files.

The sampler (:mod:`otel_tracegen.sampling`) writes steps; this module turns each trace's steps into spans
(:func:`encoding.decode_trace`), places the traces on a timeline (Poisson arrivals at ``rate`` traces/s from an
anchor: now, or a fixed ``start_time``), gives every service one resource marked as synthetic, checks each trace
with the validator and writes them. With a fixed ``start_time`` and ``seed`` a run is reproducible byte for
byte: ids come from seeded generators, timestamps are offsets from the anchor.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .encoding import decode_trace
from .report import UserError
from .semconv import attributes_for
from .trace import Resource, Scope, Trace
from .validate import validate

SYNTHETIC_ATTRIBUTE = "otel_tracegen.synthetic"
SCOPE = Scope(name="otel-tracegen")


@dataclass
class GenerationSummary:
    traces: int = 0
    spans: int = 0
    valid: int = 0
    seconds: float = 0.0
    by_entry: dict[str, int] = field(default_factory=dict)

    @property
    def spans_per_s(self) -> float:
        return self.spans / self.seconds if self.seconds > 0 else 0.0

    def add(self, trace: Trace, request) -> None:
        self.traces += 1
        self.spans += len(trace)
        self.valid += not validate(trace, expect_calls=request.calls, expect_depth=request.depth)
        entry = trace.root.service if trace.root is not None else "(none)"
        self.by_entry[entry] = self.by_entry.get(entry, 0) + 1

    def line(self) -> str:
        return (f"{self.traces} traces, {self.spans} spans in {self.seconds:.1f} s ({self.spans_per_s:,.0f} spans/s); "
                f"{self.valid}/{self.traces} valid")


class Arrivals:
    """Start offsets (ns after the anchor) of successive traces: Poisson arrivals at ``rate``/s, or all at 0."""

    def __init__(self, rate: float | None, rng: random.Random) -> None:
        self.rate, self.rng, self.t = rate, rng, 0.0

    def take(self, n: int) -> list[int]:
        if not self.rate:
            return [0] * n
        out = []
        for _ in range(n):
            out.append(round(self.t * 1e9))
            self.t += self.rng.expovariate(self.rate)
        return out


class Assembler:
    """Spans from each trace's steps: fresh ids (from ``seed``), times from the anchor, one resource per service
    (shared by all its spans, marked with ``otel_tracegen.synthetic=true``)."""

    def __init__(self, *, anchor_ns: int, seed: int, rate: float | None = None,
                 resource_attributes: dict | None = None, catalog=None, attributes: bool = True) -> None:
        self.catalog, self.attributes = catalog, attributes
        self.anchor_ns = anchor_ns
        self.rng = random.Random(seed)
        self.arrivals = Arrivals(rate, random.Random(seed + 1))
        self.resource_attributes = resource_attributes or {}
        self.resources: dict[str, Resource] = {}

    def __call__(self, steps_per_trace: Sequence[Sequence]) -> list[Trace]:
        traces = []
        for steps, offset in zip(steps_per_trace, self.arrivals.take(len(steps_per_trace))):
            trace = decode_trace(steps, trace_id=f"{self.rng.getrandbits(128) or 1:032x}",
                                 start_ns=self.anchor_ns + offset, id_seed=self.rng.getrandbits(64))
            for span in trace:
                res = self.resources.get(span.service)
                if res is None:
                    attrs = {"service.name": span.service, SYNTHETIC_ATTRIBUTE: True, **self.resource_attributes}
                    res = self.resources[span.service] = Resource(attrs)
                span.resource, span.scope = res, SCOPE
                if self.attributes:
                    learned = self.catalog.learned_attributes(span.service, span.name) if self.catalog else None
                    span.attributes = attributes_for(span.name, span.kind, span.status.code, learned)
            traces.append(trace)
        return traces


def stream(sampler, request, *, count: int | None, duration_s: float | None = None, rate: float | None = None,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, start_time_ns: int | None = None,
           round_size: int = 256, summary: GenerationSummary | None = None, attributes: bool = True,
           on_step: Callable | None = None, pool=None) -> Iterator[Trace]:
    """Traces for ``request``, generated in rounds of ``round_size``: ``count`` of them, or as many as arrive
    within ``duration_s`` at ``rate`` (None: no limit; stop by closing the iterator). With ``rate`` each trace is
    yielded when its arrival time comes (wall clock), so a consumer that sends at once sends at that rate.
    Each trace is validated into ``summary``. Round ``r`` is decoded with seed ``seed + r``: reproducible.
    ``attributes``: give spans protocol attributes (:mod:`otel_tracegen.semconv`). ``pool``: a
    :class:`~otel_tracegen.sampling.pool.DecodePool` decoding the next rounds while this one is used (the same
    traces as without it)."""
    if count is None and duration_s is None and not rate:
        raise UserError("an endless run needs --rate (traces/s)")
    if pool is not None and on_step is not None:
        raise ValueError("on_step needs in-process decoding (pool=None)")
    summary = summary if summary is not None else GenerationSummary()
    t0 = time.perf_counter()
    anchor = start_time_ns if start_time_ns is not None else time.time_ns()
    assemble = Assembler(anchor_ns=anchor, seed=seed, rate=rate, catalog=sampler.catalog, attributes=attributes)
    limit_ns = None if duration_s is None or not rate else duration_s * 1e9
    sizes = round_sizes(count, round_size, rate)
    if pool is None:
        rounds = (sampler.generate([request] * n, temperature=temperature, top_p=top_p, seed=seed + r,
                                   on_step=on_step) for r, n in enumerate(sizes))  # fmt: skip
    else:
        rounds = _pooled(pool, request, sizes, temperature, top_p, seed)
    try:
        for steps in rounds:
            for trace in assemble(steps):
                offset = trace.start_ns - anchor
                if limit_ns is not None and offset >= limit_ns:
                    return
                if duration_s is not None and not rate and time.perf_counter() - t0 >= duration_s:
                    return
                if rate:
                    wait = t0 + offset / 1e9 - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                summary.add(trace, request)
                summary.seconds = time.perf_counter() - t0
                yield trace
    finally:
        rounds.close()


def round_sizes(count: int | None, round_size: int, rate: float | None) -> Iterator[int]:
    """Traces per round: ``round_size``, the last one smaller; at a rate, about two seconds' worth at most, so that
    decoding does not run far ahead of the clock."""
    done = 0
    while count is None or done < count:
        n = round_size if count is None else min(round_size, count - done)
        if rate:
            n = min(n, max(1, math.ceil(rate * 2)))
        yield n
        done += n


def _pooled(pool, request, sizes: Iterator[int], temperature: float, top_p: float, seed: int) -> Iterator:
    """The rounds' steps in order, with up to ``pool.workers`` rounds decoding ahead."""
    from collections import deque

    pending: deque = deque()
    r = 0
    try:
        while True:
            while len(pending) < pool.workers:
                n = next(sizes, None)
                if n is None:
                    break
                pending.append(pool.submit([request] * n, temperature=temperature, top_p=top_p, seed=seed + r))
                r += 1
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
