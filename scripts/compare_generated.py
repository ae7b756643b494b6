"""Constrained generation against held-out traces: generate N traces with `otel-tracegen generate`'s engine and
compare them with a corpus's validation split, or its train split (services called, depth, fan-out, durations,
and the share of generated trees whose shape occurs in that split; overall and per entry service), as `python3 -m
otel_tracegen.lm.sample --compare` does for free-running samples.

    python3 scripts/compare_generated.py [MODEL] --corpus ttob --n 100 --seed 0 [--entries data|model] [--dtype float32|bfloat16|auto]
        [--attempts N] [--service ENTRY] [--against validation|train] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--entries", choices=("data", "model"), default="data")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="float32")
    ap.add_argument("--attempts", type=int, help="draws per step at most (default: generate's)")
    ap.add_argument("--service", help="enter every trace here (default: drawn from the training mix)")
    ap.add_argument("--against", choices=("validation", "train"), default="validation",
                    help="the split to compare with (default: validation, the held-out traces)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.evaluate.metrics import shape
    from otel_tracegen.emit.generate import Assembler
    from otel_tracegen.lm.model import load_model
    from otel_tracegen.lm.sample import compare
    from otel_tracegen.sampling import TraceRequest, TraceSampler
    from otel_tracegen.validate import validate

    kw = {} if args.attempts is None else {"attempts": args.attempts}
    sampler = TraceSampler(load_model(args.model, backend="runtime", dtype=args.dtype), entries=args.entries, **kw)
    t = time.perf_counter()
    steps = sampler.generate([TraceRequest(service=args.service)] * args.n, seed=args.seed, temperature=args.temperature,
                              top_p=args.top_p)
    seconds = time.perf_counter() - t
    # Calls squeezed out of their parent's window: placed at its end with 0 µs, the room spent by earlier siblings.
    zero = sum(1 for trace in steps for step in trace if step.conditions.budget is not None and not step.conditions.client
               for call in step.calls if call.start >= step.conditions.budget and call.duration == 0)
    traces = Assembler(anchor_ns=0, seed=args.seed, attributes=False)(steps)
    valid = sum(not validate(tr) for tr in traces)
    _, splits = load_corpus(args.corpus, (args.against,))
    real = [t for t in splits[args.against] if args.service is None or (t.root and t.root.service == args.service)]
    result = compare(traces, real)
    seen = {shape(t) for t in real}
    result["generated"] = {"traces": len(traces), "valid": valid, "spans": sum(map(len, traces)),
                           "seconds": round(seconds, 1), "draws_per_step": round(sampler.draws / max(1, sum(map(len, steps))), 3),
                           "squeezed_calls": zero, "trees_seen_in_split": round(sum(shape(t) in seen for t in traces) / max(1, len(traces)), 4),
                           "against": args.against, "entries": args.entries, "dtype": args.dtype, "temperature": args.temperature, "top_p": args.top_p}
    print(json.dumps({k: result[k] for k in ("generated", "service_mix_tv_distance", "per_entry_service_mix_tv_distance",
                                             "entry_share")}, indent=1))
    for name, e in result["by_entry"].items():
        print(name, json.dumps(e, default=str)[:1500])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
