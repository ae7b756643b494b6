"""Which dtype this CPU runs the trace model faster in: measured once per machine, then remembered.

Why measure. A CPU flag says that bfloat16 instructions exist, not that torch's kernels run faster with them. The
runtime's matrix products ran ~2.3x faster in bf16 than in fp32 on a 2-core AMD EPYC with AVX512-BF16. On a 2-core
Intel Xeon with the same flag and no AMX they ran 1.4-1.9x slower. Generation there gave 61 valid spans/s in bf16
and 95 in fp32. So ``--dtype auto`` times both dtypes on the products decoding runs, and picks bf16 only where it
is clearly faster.

Why remember. The arithmetic decides which tokens are drawn. ``--seed`` must give the same bytes on the same
machine run after run, so the choice must not change with a noisy timing. The first measurement is kept under
``$XDG_CACHE_HOME/otel-tracegen/cpu-dtype.json`` (default ``~/.cache``), keyed by the CPU model, its flags and the
torch version. A new torch or another CPU measures again. Without a writable cache it measures once per process.
Delete the file to measure again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# bf16 must be this much faster to be chosen: a near tie keeps float32, which is exact and the same everywhere.
MARGIN = 0.85


@dataclass(frozen=True)
class CpuDtypeChoice:
    """The measured choice for one machine (what the cache file holds per key)."""

    bfloat16: bool
    fp32_ms: float  # one round of the decode-shaped products below, best of several
    bf16_ms: float
    cpu: str
    torch: str
    measured_at: str


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "otel-tracegen" / "cpu-dtype.json"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def cpu_has_bf16_instructions() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX). Without them bf16 is emulated, always slower
    than float32, and nothing is measured."""
    return bool(_cpuinfo()[1] & BF16_FLAGS)


def _machine_key() -> str:
    import torch

    model, flags = _cpuinfo()
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]
    return f"{model or 'unknown cpu'} | flags {digest} | torch {torch.__version__}"


def time_decode_products(dtype, rounds: int = 3, reps: int = 10) -> float:
    """Best seconds per round of the products one decoding pass of the ``small`` model runs per layer: 128 rows
    through the fused q|k|v, o, gate|up and down projections, and one query against a 256-token cache."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, h = rand(128, 256), rand(128, 768)
    weights = [rand(512, 256), rand(256, 256), rand(1536, 256)]
    down = rand(256, 768)
    q, k = rand(64, 4, 2, 32), rand(64, 4, 256, 32)

    def one() -> None:
        for w in weights:
            F.linear(x, w)
        F.linear(h, down)
        torch.matmul(q, k.transpose(-1, -2))

    with torch.inference_mode():
        for _ in range(3):  # warm up: the first calls pick kernels and allocate
            one()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                one()
            best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure() -> CpuDtypeChoice:
    """Time both dtypes now (0.3-0.4 s on 2 cores), interleaved so that a burst of load hits both."""
    import torch

    fp32, bf16 = float("inf"), float("inf")
    for _ in range(2):
        fp32 = min(fp32, time_decode_products(torch.float32))
        bf16 = min(bf16, time_decode_products(torch.bfloat16))
    return CpuDtypeChoice(bfloat16=bf16 < MARGIN * fp32, fp32_ms=round(fp32 * 1e3, 4), bf16_ms=round(bf16 * 1e3, 4),
                          cpu=_cpuinfo()[0], torch=torch.__version__,
                          measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip


_CHOICE: CpuDtypeChoice | None = None  # this process's answer: measured or read once


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again, and rewrite it
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a process reading at the same time sees the old file or the new one
    except OSError:
        pass  # a read-only home: the choice holds for this process only


def cpu_dtype_choice() -> CpuDtypeChoice | None:
    """The remembered (else measured and remembered) choice for this machine; None when the CPU has no bf16
    instructions (float32, nothing to measure)."""
    global _CHOICE
    if _CHOICE is not None:
        return _CHOICE
    if not cpu_has_bf16_instructions():
        return None
    path, key = cache_file(), _machine_key()
    data = _read_cache(path)
    entry = data.get(key)
    if isinstance(entry, dict):
        try:
            _CHOICE = CpuDtypeChoice(**entry)
            return _CHOICE
        except TypeError:
            pass  # written by another version: measure again
    _CHOICE = measure()
    data[key] = asdict(_CHOICE)
    _write_cache(path, data)
    return _CHOICE


def cpu_prefers_bf16() -> bool:
    """Whether ``--dtype auto`` runs bfloat16 on this CPU (see the module docstring)."""
    choice = cpu_dtype_choice()
    return choice is not None and choice.bfloat16
