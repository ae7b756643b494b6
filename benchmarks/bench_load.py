"""Cold load of the shipped model on the CPU, and how fast it samples, against the transformers backend.

=====================  ======================================================================================
runtime (default)      ``load_model()``: our torch-only Llama (``otel_tracegen.lm.runtime``) and its LoRA adapters
baseline               ``load_model(backend="transformers")``: ``LlamaForCausalLM`` + ``PeftModel``
=====================  ======================================================================================

Each load runs in a fresh interpreter (``--repeat`` times, the median reported), timed from before the first import
to a model ready on the CPU, so it includes importing torch and everything else: what a user waits for. The issue's
budget is 3 s. Then, in this process, both backends sample the same batch of first steps (plain sampling,
temperature 1, the pre-trained weights) and the benchmark prints tokens/s of each and the ratios.

Usage::

    python3 benchmarks/bench_load.py [MODEL_DIR] [--repeat 5] [--threads 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

_LOAD = """
import time
t = time.perf_counter()
from otel_tracegen.lm.model import load_model
lm = load_model({path!r}, device="cpu", backend={backend!r})
print(time.perf_counter() - t)
"""


def cold_load_seconds(path: str, backend: str, repeat: int, threads: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    out = []
    for _ in range(repeat):
        run = subprocess.run([sys.executable, "-c", _LOAD.format(path=path, backend=backend)], capture_output=True,
                             text=True, check=True, cwd=REPO_ROOT, env=env)
        out.append(float(run.stdout.split()[-1]))
    return out


def sampled_tokens_per_s(lm, batch: int, new_tokens: int, seed: int) -> float:
    """Tokens/s of plain sampling of ``batch`` first steps (``<cond> <client> <layer>``) for ``new_tokens`` each."""
    import torch

    from otel_tracegen.encoding import Conditions

    tok = lm.tokenizer
    prompt = [tok.bos_id, *tok.encode(Conditions(client=True).text() + " <layer>").ids]
    prompts = [prompt] * batch
    torch.manual_seed(seed)
    t = time.perf_counter()
    if lm.backend == "runtime":
        lm.model.set_adapter(None)
        gen = torch.Generator().manual_seed(seed)
        rows = lm.model.sample(prompts, max_new_tokens=new_tokens, eos_id=None, pad_id=tok.pad_id, generator=gen)
        n = sum(map(len, rows))
    else:
        ids = torch.tensor(prompts)
        with torch.no_grad(), lm.model.disable_adapter():
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                    top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    pad_token_id=tok.pad_id)
        n = int(out[:, ids.shape[1]:].numel())
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(REPO_ROOT / "model"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the loads and sampling")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=200)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, torch {torch.__version__}, {args.threads} threads")
    loads = {b: cold_load_seconds(args.model, b, args.repeat, args.threads) for b in ("runtime", "transformers")}
    for b, xs in loads.items():
        print(f"cold load, {b:12s}: median {statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, "
              f"{len(xs)} fresh interpreters)")
    ratio = statistics.median(loads["transformers"]) / statistics.median(loads["runtime"])
    print(f"load speed-up, runtime vs transformers: {ratio:.2f}x (budget 3 s: "
          f"{'met' if statistics.median(loads['runtime']) <= 3 else 'NOT met'})")

    from otel_tracegen.lm.model import load_model

    speeds = {}
    for b in ("runtime", "transformers"):
        lm = load_model(args.model, device="cpu", backend=b)
        sampled_tokens_per_s(lm, 2, 8, 0)  # warm-up
        speeds[b] = sampled_tokens_per_s(lm, args.batch, args.new_tokens, 0)
        print(f"sampling, {b:12s}: {speeds[b]:,.0f} tokens/s ({args.batch} rows x {args.new_tokens} new tokens)")
    print(f"sampling speed-up, runtime vs transformers: {speeds['runtime'] / speeds['transformers']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
