"""Free-running samples: plain sampling of whole traces, step by step, with no grammar constraints.

This is the model card's "free-running validity": how often the bare model, sampling every token, writes steps
that parse, whose counts add up, and whose decoded trace passes the validator. The grammar-constrained sampler
(issue 4) forces the fixed text and masks illegal values, so its traces are valid by construction; this measures
what the model learned on its own.

Steps run breadth-first and in batches: every pending step of every trace at one level is one ``generate`` call
(left-padded prompts). A step's prompt is exactly what the encoding puts before ``<layer>``: the client's
``<cond> <client> <layer>`` for the first step, then ``next_conditions`` of the parent's step for each child with
calls > 0.

Usage::

    python3 -m otel_tracegen.lm.sample [MODEL_DIR] --n 200 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..encoding import Conditions, EncodingError, Step, decode_trace, next_conditions, parse_step
from ..validate import validate


@dataclass
class FreeRunResult:
    traces: int = 0
    valid: int = 0  # decoded and passed the validator
    failures: Counter = field(default_factory=Counter)  # reason -> traces
    spans: list[int] = field(default_factory=list)  # spans of each decoded trace

    @property
    def valid_fraction(self) -> float:
        return self.valid / self.traces if self.traces else 0.0


def free_run(lm, n: int, *, seed: int = 0, batch_size: int = 256, max_new_tokens: int = 768,
             max_steps: int = 400, temperature: float = 1.0) -> FreeRunResult:
    """Sample ``n`` traces from ``lm`` (a ``LoadedModel``) with plain sampling; count how many are valid."""
    import torch

    model, tok = lm.model, lm.tokenizer
    # The pre-trained weights write traces; the LoRA adapters (injected in place) are for other tasks.
    no_adapter = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    model.eval()
    torch.manual_seed(seed)
    end_id = tok.mark_id("end")
    limit = int(getattr(model.config, "max_position_embeddings", 1024))

    steps: list[list[Step]] = [[] for _ in range(n)]
    failed: dict[int, str] = {}
    # Pending prompts: (trace index, conditions); BFS order per trace is kept by processing level by level.
    level: list[tuple[int, Conditions]] = [(i, Conditions(client=True)) for i in range(n)]
    with no_adapter:
        while level:
            nxt: list[tuple[int, Conditions]] = []
            for b in range(0, len(level), batch_size):
                chunk = [(i, c) for i, c in level[b : b + batch_size] if i not in failed]
                if not chunk:
                    continue
                prompts = [[tok.bos_id, *tok.encode(c.text() + " <layer>").ids] for _, c in chunk]
                width = max(map(len, prompts))
                room = min(max_new_tokens, limit - width)
                if room <= 0:
                    for i, _ in chunk:
                        failed[i] = "prompt longer than the context"
                    continue
                ids = torch.full((len(prompts), width), tok.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
                    ids[r, width - len(p) :] = torch.tensor(p)
                    mask[r, width - len(p) :] = 1
                with torch.no_grad():
                    out = model.generate(
                        input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                        temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=room, eos_token_id=end_id,
                        pad_token_id=tok.pad_id,
                    )
                for (i, cond), row in zip(chunk, out[:, width:].tolist()):
                    if end_id not in row:
                        failed[i] = "step did not end within the token limit"
                        continue
                    completion = tok.decode(row[: row.index(end_id) + 1])
                    try:
                        step = parse_step(cond.text() + " <layer> " + completion)
                    except EncodingError as e:
                        failed[i] = f"unparseable step: {str(e).split(':')[0]}"
                        continue
                    steps[i].append(step)
                    if len(steps[i]) > max_steps:
                        failed[i] = "more steps than the limit"
                        continue
                    nxt.extend((i, next_conditions(step, k)) for k, sub in enumerate(step.subs) if sub.calls > 0)
            level = nxt

    result = FreeRunResult(traces=n)
    for i in range(n):
        if i in failed:
            result.failures[failed[i]] += 1
            continue
        try:
            trace = decode_trace(steps[i], id_seed=seed * 1_000_003 + i)
        except EncodingError as e:
            result.failures[f"does not decode: {str(e).split(':')[0]}"] += 1
            continue
        result.spans.append(len(trace))
        violations = validate(trace)
        if violations:
            result.failures[f"invalid: {violations[0].kind.value}"] += 1
        else:
            result.valid += 1
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Free-running validity of a trace model (plain sampling).")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped model/)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    from .model import load_model

    lm = load_model(args.model, device=args.device)
    r = free_run(lm, args.n, seed=args.seed, batch_size=args.batch_size)
    print(f"{r.valid}/{r.traces} free-running samples pass the validator ({100 * r.valid_fraction:.1f} %), "
          f"device {lm.device}, seed {args.seed}")
    if r.spans:
        s = sorted(r.spans)
        print(f"decoded traces: {len(s)}, spans min {s[0]} / median {s[len(s) // 2]} / max {s[-1]}")
    for reason, k in r.failures.most_common():
        print(f"  {reason}: {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
