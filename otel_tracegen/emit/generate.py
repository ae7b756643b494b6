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

from ..encoding import decode_trace
from ..report import UserError
from ..semconv import attributes_for
from ..trace import Resource, Scope, Trace
from ..validate import validate
from .attributes import ExtraAttributes
from .pacing import Arrivals, Shape

SCOPE = Scope(name="otel-tracegen")
BEHIND_S = 2.0  # generate says once that decoding cannot keep the rate, when it is this far behind


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


class Assembler:
    """Spans from each trace's steps: fresh ids (from ``seed``), times from the anchor, one resource per service
    (shared by all its spans, marked with ``otel_tracegen.synthetic=true``)."""

    def __init__(self, *, anchor_ns: int, seed: int, shape: Shape | None = None, extra: ExtraAttributes | None = None,
                 catalog=None, attributes: bool = True) -> None:  # fmt: skip
        self.catalog, self.attributes = catalog, attributes
        self.anchor_ns = anchor_ns
        self.rng = random.Random(seed)
        self.arrivals = Arrivals(shape, poisson=True, seed=seed + 1) if shape is not None else None
        self.extra = extra if extra is not None else ExtraAttributes()
        self.resources: dict[str, Resource] = {}

    def __call__(self, steps_per_trace: Sequence[Sequence]) -> list[Trace]:
        """The traces of these steps; fewer when the traffic shape has ended."""
        n = len(steps_per_trace)
        offsets = self.arrivals.take(n).tolist() if self.arrivals is not None else [0] * n
        traces = []
        extra = self.extra
        for steps, offset in zip(steps_per_trace, offsets):
            trace = decode_trace(steps, trace_id=f"{self.rng.getrandbits(128) or 1:032x}",
                                 start_ns=self.anchor_ns + offset, id_seed=self.rng.getrandbits(64))
            for span in trace:
                span.service = extra.service_for(span.service)
                res = self.resources.get(span.service)
                if res is None:
                    res = self.resources[span.service] = Resource(extra.resource_attributes({}, span.service))
                span.resource, span.scope = res, SCOPE
                if self.attributes:
                    learned = self.catalog.learned_attributes(span.service, span.name) if self.catalog else None
                    span.attributes = attributes_for(span.name, span.kind, span.status.code, learned)
                if extra.span:
                    span.attributes = extra.span_attributes(span.attributes, mark=False)
            traces.append(trace)
        return traces


def stream(sampler, request, *, count: int | None, duration_s: float | None = None, shape: Shape | None = None,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, start_time_ns: int | None = None,
           round_size: int = 256, summary: GenerationSummary | None = None, attributes: bool = True,
           on_step: Callable | None = None, pool=None, extra: ExtraAttributes | None = None,
           on_behind: Callable[[float], None] | None = None) -> Iterator[Trace]:
    """Traces for ``request``, generated in rounds of ``round_size``: ``count`` of them, or as many as arrive
    within ``duration_s`` under the traffic ``shape`` (:mod:`.pacing`; None: no limit; stop by closing the
    iterator). With a shape each trace is yielded when its arrival time comes (wall clock), so a consumer that
    sends at once sends at that rate; when decoding falls more than ``BEHIND_S`` behind, ``on_behind`` is called
    once with the rate achieved so far (traces/s).
    Each trace is validated into ``summary``. Round ``r`` is decoded with seed ``seed + r``: reproducible.
    ``attributes``: give spans protocol attributes (:mod:`otel_tracegen.semconv`). ``pool``: a
    :class:`~otel_tracegen.sampling.pool.DecodePool` decoding the next rounds while this one is used (the same
    traces as without it)."""
    rate = shape.mean_rate if shape is not None else None
    if count is None and duration_s is None and not rate:
        raise UserError("an endless run needs --rate (traces/s)")
    if pool is not None and on_step is not None:
        raise ValueError("on_step needs in-process decoding (pool=None)")
    summary = summary if summary is not None else GenerationSummary()
    t0 = time.perf_counter()
    anchor = start_time_ns if start_time_ns is not None else time.time_ns()
    assemble = Assembler(anchor_ns=anchor, seed=seed, shape=shape, catalog=sampler.catalog, attributes=attributes,
                         extra=extra)  # fmt: skip
    warned = on_behind is None
    limit_ns = None if duration_s is None or not rate else duration_s * 1e9
    sizes = round_sizes(count, round_size, rate)
    if pool is None:
        rounds = (sampler.generate([request] * n, temperature=temperature, top_p=top_p, seed=seed + r,
                                   on_step=on_step) for r, n in enumerate(sizes))  # fmt: skip
    else:
        rounds = _pooled(pool, request, sizes, temperature, top_p, seed)
    try:
        for steps in rounds:
            traces = assemble(steps)
            if not traces:
                return  # the traffic shape has ended
            for trace in traces:
                offset = trace.start_ns - anchor
                if limit_ns is not None and offset >= limit_ns:
                    return
                if duration_s is not None and not rate and time.perf_counter() - t0 >= duration_s:
                    return
                if rate:
                    now = time.perf_counter()
                    wait = t0 + offset / 1e9 - now
                    if wait > 0:
                        time.sleep(wait)
                    elif not warned and -wait > BEHIND_S and now - t0 > BEHIND_S:
                        warned = True
                        on_behind(summary.traces / (now - t0))
                summary.add(trace, request)
                summary.seconds = time.perf_counter() - t0
                yield trace
            if len(traces) < len(steps):
                return  # the traffic shape ended within this round
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
