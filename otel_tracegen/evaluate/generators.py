"""What the fidelity harness generates with: one interface for the trace model, the baselines and files.

A :class:`Generator` takes the same :class:`~otel_tracegen.sampling.TraceRequest` list every other generator
gets (entry, calls, depth, instructions) and returns one :class:`Generated` per request, in order. A generator
states which request fields it honours (:attr:`Generator.honours`); the others it ignores, and the report says
so instead of scoring it as failing an instruction it never heard. A request a generator cannot serve (an entry
it never saw, output it could not parse) gives ``Generated(None, problem)``: counted as invalid, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..trace import Trace

HONOURS_ALL = frozenset({"entry", "calls", "depth", "high_latency", "includes"})
"""Every request field: ``entry`` (service and operation), ``calls``, ``depth``, ``high_latency``, ``includes``."""

Progress = Callable[[int], None]
"""Called with the number of requests just finished (drives a progress bar)."""


@dataclass
class Generated:
    """One request's answer: a trace, or ``None`` and why (``problem``), e.g. "unparseable: row 3 has no parent"."""

    trace: Trace | None
    problem: str = ""


@runtime_checkable
class Generator(Protocol):
    """Produces traces for requests. ``name`` labels it in the report (``model``, ``replay``, ...)."""

    name: str
    honours: frozenset[str]

    def generate(self, requests: Sequence, *, seed: int = 0, progress: Progress | None = None) -> list[Generated]:
        """One :class:`Generated` per request, in order; the same requests and seed give the same traces."""
        ...


class ModelGenerator:
    """The trace model (``otel_tracegen generate``'s engine): grammar-constrained recursive layer generation.

    Requests the model cannot serve (an entry or call it never saw, a depth beyond its data) give
    ``Generated(None, reason)``; the rest are decoded together in rounds of ``round_size``.
    """

    name = "model"
    honours = HONOURS_ALL

    def __init__(self, lm, *, temperature: float = 1.0, top_p: float = 1.0, round_size: int = 256,
                 name: str = "model") -> None:
        from ..sampling import TraceSampler

        self.sampler = TraceSampler(lm, entries="data")
        self.temperature, self.top_p, self.round_size, self.name = temperature, top_p, round_size, name

    @classmethod
    def from_pretrained(cls, path, *, dtype: str | None = "auto", **kwargs) -> ModelGenerator:
        """Load a recursive model (``None``: the shipped one); a flat baseline directory is refused by name."""
        from ..lm.model import load_model, read_training_json
        from ..report import UserError
        from .flat import is_flat_model

        if path is not None and is_flat_model(read_training_json(path)):
            raise UserError(f"{path} is the flat baseline (train --stage flat): pass it as --flat-model")
        return cls(load_model(path, backend="auto", dtype=dtype), **kwargs)

    def generate(self, requests: Sequence, *, seed: int = 0, progress: Progress | None = None) -> list[Generated]:
        from ..emit.generate import Assembler
        from ..report import UserError

        out: list[Generated | None] = [None] * len(requests)
        todo = []
        for i, r in enumerate(requests):
            try:
                r.check(self.sampler.catalog, self.sampler.limits)
            except UserError as e:
                out[i] = Generated(None, f"refused: {e}")
                if progress:
                    progress(1)
            else:
                todo.append(i)
        assemble = Assembler(anchor_ns=0, seed=seed, attributes=False)
        for k in range(0, len(todo), self.round_size):
            chunk = todo[k : k + self.round_size]
            steps = self.sampler.generate([requests[i] for i in chunk], temperature=self.temperature,
                                          top_p=self.top_p, seed=seed + k // self.round_size)  # fmt: skip
            for i, trace in zip(chunk, assemble(steps)):
                out[i] = Generated(trace)
            if progress:
                progress(len(chunk))
        return out  # type: ignore[return-value]
