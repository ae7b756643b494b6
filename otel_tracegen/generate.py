"""``otel-tracegen generate``: traces from the model, anchored in time, with resources, written to files.

The sampler (:mod:`otel_tracegen.sampling`) writes steps; this module turns each trace's steps into spans
(:func:`encoding.decode_trace`), places the traces on a timeline (Poisson arrivals at ``rate`` traces/s from an
anchor: now, or a fixed ``start_time``), gives every service one resource marked as synthetic, checks each trace
with the validator and writes them. With a fixed ``start_time`` and ``seed`` a run is reproducible byte for
byte: ids come from seeded generators, timestamps are offsets from the anchor.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .encoding import decode_trace
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

    def line(self) -> str:
        return (f"{self.traces} traces, {self.spans} spans in {self.seconds:.1f} s ({self.spans_per_s:,.0f} spans/s); "
                f"{self.valid}/{self.traces} valid")


def arrival_offsets_ns(n: int, rate: float | None, rng: random.Random) -> list[int]:
    """Start offsets of ``n`` traces from the anchor: Poisson arrivals at ``rate``/s, all at 0 without one."""
    if not rate:
        return [0] * n
    out, t = [], 0.0
    for _ in range(n):
        out.append(round(t * 1e9))
        t += rng.expovariate(rate)
    return out


def assemble(steps_per_trace: Sequence[Sequence], *, anchor_ns: int, seed: int, rate: float | None = None,
             resource_attributes: dict | None = None) -> list[Trace]:
    """Spans from each trace's steps: fresh ids (from ``seed``), times from the anchor, one resource per service."""
    rng = random.Random(seed)
    offsets = arrival_offsets_ns(len(steps_per_trace), rate, rng)
    resources: dict[str, Resource] = {}
    traces = []
    for steps, offset in zip(steps_per_trace, offsets):
        trace = decode_trace(steps, trace_id=f"{rng.getrandbits(128) or 1:032x}", start_ns=anchor_ns + offset,
                             id_seed=rng.getrandbits(64))
        for span in trace:
            res = resources.get(span.service)
            if res is None:
                attrs = {"service.name": span.service, SYNTHETIC_ATTRIBUTE: True, **(resource_attributes or {})}
                res = resources[span.service] = Resource(attrs)
            span.resource, span.scope = res, SCOPE
        traces.append(trace)
    return traces


def run(sampler, requests: Sequence, *, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
        start_time_ns: int | None = None, rate: float | None = None,
        on_step: Callable | None = None) -> tuple[list[Trace], GenerationSummary]:
    """Generate one trace per request and check each one; the summary counts what came out."""
    t0 = time.perf_counter()
    steps = sampler.generate(requests, temperature=temperature, top_p=top_p, seed=seed, on_step=on_step)
    anchor = start_time_ns if start_time_ns is not None else time.time_ns()
    traces = assemble(steps, anchor_ns=anchor, seed=seed, rate=rate)
    summary = GenerationSummary(seconds=time.perf_counter() - t0)
    for req, trace in zip(requests, traces):
        summary.traces += 1
        summary.spans += len(trace)
        ok = not validate(trace, expect_calls=req.calls, expect_depth=req.depth)
        summary.valid += ok
        entry = trace.root.service if trace.root is not None else "(none)"
        summary.by_entry[entry] = summary.by_entry.get(entry, 0) + 1
    return traces, summary
