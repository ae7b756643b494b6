"""The trace model as the baseline: normal traffic generated for the window's entry points.

An SRE often has the incident's traces and nothing clean to compare them with. The trace model was trained on
normal traffic, so it can stand in: for every entry (root service and operation) of the window, in the window's
proportions, it generates traces, and the localizer compares the window with those. Measured on the TrainTicket
faults of 2023-01-30, which the shipped model never saw, 120 generated traces as the only baseline rank the
injected service in the top 3 in 17 of 17 faults (``benchmarks/localize.py``, row "model baseline").

Generation takes minutes on a CPU (seconds on a GPU), so the traces are cached per (model, entries, count, seed)
under ``$XDG_CACHE_HOME/otel-tracegen/baselines`` (default ``~/.cache``): later windows with the same entry mix
are ranked in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from ..report import UserError
from ..trace import Trace


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "otel-tracegen" / "baselines"


def entry_mix(window: Sequence[Trace], n: int) -> list[tuple[tuple[str, str], int]]:
    """How many of ``n`` traces to generate per entry (root service, operation), in the window's proportions;
    entries too rare to get one trace are left out (all but the most common one, when ``n`` is that small)."""
    roots: Counter = Counter()
    for t in window:
        root = t.root or min(t, key=lambda s: s.start_ns)
        roots[(root.service, root.name)] += 1
    total = sum(roots.values())
    mix = [(e, round(n * c / total)) for e, c in roots.most_common() if round(n * c / total) >= 1]
    if not mix and roots:  # n smaller than the entries can share: the most common one gets them all
        mix = [(roots.most_common(1)[0][0], n)]
    return mix


def model_key(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "training.json", "catalog.json"):
        p = model_dir / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def model_baseline(window: Sequence[Trace], n: int = 200, *, model: str | Path | None = None, seed: int = 0,
                   device: str | None = None, use_cache: bool = True,
                   warn: Callable[[str], None] = lambda _: None) -> list[Trace]:  # fmt: skip
    """``n`` normal traces from the trace model for ``window``'s entry mix (cached)."""
    from ..formats import read_traces, write_traces
    from ..lm.model import DEFAULT_MODEL_DIR

    model_dir = Path(model) if model is not None else DEFAULT_MODEL_DIR
    mix = entry_mix(window, n)
    if not mix:
        raise UserError("the window has no traces to take entry points from")
    key = hashlib.sha256(json.dumps([model_key(model_dir), str(model_dir.resolve()), mix, seed]).encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.otlp.jsonl"
    if use_cache and path.is_file():
        return read_traces("otlp-json", [path])
    traces = generate_for_entries(mix, model_dir, seed, device, warn)
    if not traces:
        raise UserError(f"the model at {model_dir} knows none of the window's entry points "
                        f"({', '.join(f'{s} {o}' for (s, o), _ in mix[:5])})")  # fmt: skip
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_traces("otlp-json", traces, tmp)
        tmp.replace(path)
    return traces


def generate_for_entries(mix: Sequence[tuple[tuple[str, str | None], int]], model_dir: Path, seed: int = 0,
                         device: str | None = None, warn: Callable[[str], None] = lambda _: None) -> list[Trace]:
    """``k`` traces from the model for each ((service, operation or None), k) of ``mix``, entry i seeded
    ``seed + 1000 * i``; entries the model does not know are skipped through ``warn``."""
    from tqdm import tqdm

    from ..emit import generate
    from ..lm.model import load_model
    from ..sampling import TraceRequest, TraceSampler

    lm = load_model(model_dir, device=device, dtype="auto")
    sampler = TraceSampler(lm, batch_size=64)
    out: list[Trace] = []
    bar = tqdm(total=sum(k for _, k in mix), unit="trace", desc="model baseline", disable=None)
    try:
        for i, ((service, operation), k) in enumerate(mix):
            request = TraceRequest(service=service, operation=operation)
            try:
                request.check(sampler.catalog, sampler.limits)
            except UserError as e:
                warn(f"model baseline: skipping entry {service} {operation}: {e}")
                continue
            for t in generate.stream(sampler, request, count=k, seed=seed + 1000 * i, round_size=64):
                out.append(t)
                bar.update(1)
    finally:
        bar.close()
    return out
