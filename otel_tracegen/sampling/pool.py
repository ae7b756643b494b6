"""Rounds of a generation run decoded in worker processes, one torch thread each.

Why: decoding is many small matrix products and a Python grammar per token. A second torch thread on the same
rounds adds little (measured on a 2-core EPYC, bf16: 90 spans/s with one thread, 107 with two), while a second
process decoding the next round doubles the rate. Rounds are independent (round ``r`` is decoded with seed
``seed + r``), so which worker decodes a round changes nothing: a run gives the same traces with any number of
workers, in the same order.

Workers are spawned (not forked: a forked OpenMP runtime can hang), each loads the model once.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace

from ..encoding import Step
from .engine import TraceRequest


@dataclass(frozen=True)
class SamplerSpec:
    """What a worker needs to build the same ``TraceSampler`` as the parent (picklable)."""

    model: str | None
    device: str
    dtype: str | None
    adapter: str | None
    batch_size: int
    entries: str
    attempts: int


_SAMPLER = None  # the worker's sampler, built once by _start


def _start(spec: SamplerSpec, threads: int) -> None:
    global _SAMPLER
    from ..lm.model import load_model
    from .engine import TraceSampler

    from ..cpu import configure_torch

    configure_torch(threads)
    lm = load_model(spec.model, device=spec.device, dtype=spec.dtype)
    _SAMPLER = TraceSampler(lm, adapter=spec.adapter, batch_size=spec.batch_size, entries=spec.entries,
                            attempts=spec.attempts)


def _decode(requests: Sequence[TraceRequest], temperature: float, top_p: float, seed: int) -> list[list[Step]]:
    return _SAMPLER.generate(requests, temperature=temperature, top_p=top_p, seed=seed)


class DecodePool:
    """``workers`` processes decoding whole rounds (``submit`` returns a future of the round's steps)."""

    def __init__(self, spec: SamplerSpec, workers: int, threads_per_worker: int = 1) -> None:
        import multiprocessing

        if workers < 1 or threads_per_worker < 1:
            raise ValueError(f"need workers >= 1 and threads >= 1, got {workers}, {threads_per_worker}")
        from ..lm.model import resolve_dtype_name

        # Resolved here, once: a worker resolving "auto" by itself could pick another dtype than in-process decoding
        # (lm/cpu_dtype.py measures), and the arithmetic decides the traces.
        self.spec = replace(spec, dtype=resolve_dtype_name(spec.dtype, spec.device))  # what every worker builds
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(self.spec, threads_per_worker))  # fmt: skip

    def submit(self, requests: Sequence[TraceRequest], *, temperature: float, top_p: float,
               seed: int) -> Future:
        return self._pool.submit(_decode, list(requests), temperature, top_p, seed)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def auto_workers(device: str, rounds: int | None, cpus: int) -> int:
    """Decode workers for a run of ``rounds`` rounds (None: endless): one per CPU of ``cpus`` (what the command may
    use: :mod:`otel_tracegen.cpu`) on a CPU when there is more than one round to share; a GPU decodes in-process."""
    if device != "cpu" or (rounds is not None and rounds < 2):
        return 1
    return max(1, min(cpus, rounds) if rounds is not None else cpus)
