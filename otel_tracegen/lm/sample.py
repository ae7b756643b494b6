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

    python3 -m otel_tracegen.lm.sample [MODEL_DIR] --n 200 --seed 0 [--adapter instruct] [--compare CORPUS]

``--adapter instruct`` samples with the instruction adapter (tuned on steps with full conditions and their
bookkeeping, as the paper's "recursive + instruction"); ``--compare CORPUS`` sets the valid samples beside the
corpus's validation traces (services called, depth, fan-out, durations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..encoding import (
    Conditions,
    EncodingError,
    Step,
    decode_trace,
    next_conditions,
    parse_step,
)
from ..validate import ViolationKind, validate


@dataclass
class FreeRunResult:
    traces: int = 0
    valid: int = 0  # decoded and passed the validator
    structural: int = 0  # decoded and passed the validator's structure rules (child time windows not checked)
    failures: Counter = field(default_factory=Counter)  # reason -> traces
    spans: list[int] = field(default_factory=list)  # spans of each decoded trace
    samples: list = field(default_factory=list)  # the structurally valid traces (canonical Trace objects)
    by_entry: dict = field(default_factory=dict)  # entry service -> [sampled, structural, valid]

    @property
    def valid_fraction(self) -> float:
        return self.valid / self.traces if self.traces else 0.0


def free_run(lm, n: int, *, seed: int = 0, batch_size: int = 256, max_new_tokens: int = 768,
             max_steps: int = 400, temperature: float = 1.0, adapter: str | None = None,
             tolerance_ns: int = 0) -> FreeRunResult:
    """Sample ``n`` traces from ``lm`` (a ``LoadedModel``) with plain sampling; count how many are valid.

    ``adapter`` None samples the pre-trained weights alone; a name (``instruct``) samples through that adapter.
    ``tolerance_ns`` is the validator's allowance for a child outside its parent's time window (real captures
    break strict nesting, so strict validity is compared with the real traces' own)."""
    import torch

    model, tok = lm.model, lm.tokenizer
    runtime = getattr(lm, "backend", "transformers") == "runtime"
    if adapter is not None and adapter not in lm.adapters:
        raise ValueError(f"{lm.path} has no adapter {adapter!r} (it has: {', '.join(lm.adapters) or 'none'})")
    no_adapter = nullcontext()
    if runtime or adapter is not None:
        model.set_adapter(adapter)  # the runtime takes None: the pre-trained weights alone
    elif hasattr(model, "disable_adapter"):  # a PeftModel: its LoRA layers are injected in place, switch them off
        no_adapter = model.disable_adapter()
    model.eval()
    torch.manual_seed(seed)
    generator = torch.Generator(device=model.device).manual_seed(seed) if runtime else None
    end_id = tok.mark_id("end")
    limit = int(getattr(model.config, "max_position_embeddings", 1024))

    def complete(prompts: list[list[int]], room: int) -> list[list[int]]:
        """Sampled continuations of left-padded prompts, each up to and including <end> when it came."""
        if runtime:
            return model.sample(prompts, max_new_tokens=room, eos_id=end_id, pad_id=tok.pad_id,
                                temperature=temperature, generator=generator)
        width = max(map(len, prompts))
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
        return out[:, width:].tolist()

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
                room = min(max_new_tokens, limit - max(map(len, prompts)))
                if room <= 0:
                    for i, _ in chunk:
                        failed[i] = "prompt longer than the context"
                    continue
                for (i, cond), row in zip(chunk, complete(prompts, room)):
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
        # The entry service is the root's, which the first step writes; a trace that failed there has none.
        entry = result.by_entry.setdefault(steps[i][0].calls[0].service if steps[i] else "(none)", [0, 0, 0])
        entry[0] += 1
        if i in failed:
            result.failures[failed[i]] += 1
            continue
        try:
            trace = decode_trace(steps[i], id_seed=seed * 1_000_003 + i)
        except EncodingError as e:
            result.failures[f"does not decode: {str(e).split(':')[0]}"] += 1
            continue
        result.spans.append(len(trace))
        violations = validate(trace, tolerance_ns=tolerance_ns)
        structure = [v for v in violations if v.kind is not ViolationKind.CHILD_OUTSIDE_PARENT]
        if structure:
            result.failures[f"invalid: {structure[0].kind.value}"] += 1
            continue
        result.structural += 1
        entry[1] += 1
        result.samples.append(trace)
        if violations:
            result.failures[f"invalid: {violations[0].kind.value}"] += 1
        else:
            result.valid += 1
            entry[2] += 1
    return result


def validator_pass_rate(traces, tolerance_ns: int = 0) -> float:
    """The fraction of ``traces`` the validator passes at ``tolerance_ns`` (for real traces: the ceiling a
    realistic sampler is measured against)."""
    traces = list(traces)
    return sum(not validate(t, tolerance_ns=tolerance_ns) for t in traces) / len(traces) if traces else 0.0


def shape_summary(traces) -> dict:
    """What a reviewer compares between sampled and real traces: services called, depth, fan-out, durations."""
    services: Counter = Counter()
    depths, fanouts, durations, overruns = [], [], [], []
    children = 0
    for t in traces:
        services.update(s.service for s in t.spans)
        depths.append(t.depth)
        for s in t.spans:
            kids = t.children(s)
            if kids:
                fanouts.append(len(kids))
            durations.append((s.end_ns - s.start_ns) / 1000)
            for k in kids:  # how far a child pokes out of its parent's time window, if it does
                children += 1
                out = max(s.start_ns - k.start_ns, k.end_ns - s.end_ns)
                if out > 0:
                    overruns.append(out / 1000)
    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
    total = sum(services.values()) or 1
    return {
        "traces": len(traces),
        "spans_median": q([len(t) for t in traces], 0.5),
        "services": {k: round(v / total, 4) for k, v in services.most_common()},
        "depth": {"mean": round(statistics.fmean(depths), 2) if depths else None, "median": q(depths, 0.5),
                  "max": max(depths, default=None)},
        "fanout": {"mean": round(statistics.fmean(fanouts), 2) if fanouts else None, "median": q(fanouts, 0.5),
                   "p90": q(fanouts, 0.9), "max": max(fanouts, default=None)},
        "duration_us": {"p50": q(durations, 0.5), "p90": q(durations, 0.9), "p99": q(durations, 0.99)},
        "outside_parent": {"fraction_of_children": round(len(overruns) / children, 4) if children else None,
                           "overrun_us_p50": q(overruns, 0.5), "overrun_us_p90": q(overruns, 0.9)},
    }


def _entry(trace) -> str:
    root = trace.root
    return root.service if root is not None else "?"


def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b))


def compare(samples, real, *, min_traces: int = 5) -> dict:
    """Sampled vs real: each side's shape summary, the total-variation distance of the service mixes, and the same
    per entry service (the root's), since an unconditioned sampler follows the training mix of entries and a
    time-based validation split may hold another mix."""
    a, b = shape_summary(samples), shape_summary(real)
    tv = _tv(a["services"], b["services"]) if samples else None
    unseen = sorted(set(a["services"]) - set(b["services"]))
    by_entry: dict[str, tuple[list, list]] = {}
    for t in samples:
        by_entry.setdefault(_entry(t), ([], []))[0].append(t)
    for t in real:
        by_entry.setdefault(_entry(t), ([], []))[1].append(t)
    entries = {}
    for name, (mine, theirs) in sorted(by_entry.items(), key=lambda kv: -len(kv[1][0])):
        if len(mine) < min_traces or len(theirs) < min_traces:
            continue
        sa, sb = shape_summary(mine), shape_summary(theirs)
        entries[name] = {"sampled": sa, "real": sb, "service_mix_tv_distance": round(_tv(sa["services"], sb["services"]), 4)}
    weight = sum(e["sampled"]["traces"] for e in entries.values())
    per_entry_tv = (sum(e["service_mix_tv_distance"] * e["sampled"]["traces"] for e in entries.values()) / weight
                    if weight else None)
    return {"sampled": a, "real": b, "service_mix_tv_distance": None if tv is None else round(tv, 4),
            "services_not_in_real": unseen, "by_entry": entries,
            "per_entry_service_mix_tv_distance": None if per_entry_tv is None else round(per_entry_tv, 4),
            "entry_share": {"sampled": {k: round(len(v[0]) / max(1, len(samples)), 4) for k, v in by_entry.items()},
                            "real": {k: round(len(v[1]) / max(1, len(real)), 4) for k, v in by_entry.items()}}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Free-running validity of a trace model (plain sampling).")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped model/)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto", choices=("auto", "runtime", "transformers"),
                   help="run the model on our runtime (default for our models) or on transformers")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--adapter", default=None, help="sample through this LoRA adapter (e.g. instruct)")
    p.add_argument("--compare", metavar="CORPUS", help="compare the valid samples with this corpus's validation split")
    p.add_argument("--json", metavar="FILE", help="write the figures (and the comparison) as JSON")
    p.add_argument("--tolerance-us", type=float, default=0.0,
                   help="validator allowance for a child outside its parent's time window (µs, default 0)")
    args = p.parse_args(argv)

    from .model import load_model

    lm = load_model(args.model, device=args.device, backend=args.backend)
    tolerance_ns = round(args.tolerance_us * 1000)
    r = free_run(lm, args.n, seed=args.seed, batch_size=args.batch_size, temperature=args.temperature,
                 adapter=args.adapter, tolerance_ns=tolerance_ns)
    print(f"{r.valid}/{r.traces} free-running samples pass the validator ({100 * r.valid_fraction:.1f} %, "
          f"tolerance {args.tolerance_us:g} µs); {r.structural}/{r.traces} are structurally valid (all steps parse "
          f"and add up, one root, no orphans; child time windows aside); adapter {args.adapter or 'none'}, "
          f"temperature {args.temperature}, device {lm.device}, seed {args.seed}")
    if r.spans:
        s = sorted(r.spans)
        print(f"decoded traces: {len(s)}, spans min {s[0]} / median {s[len(s) // 2]} / max {s[-1]}")
    print("by entry service (sampled / structurally valid / valid): " + ", ".join(
        f"{name} {a}/{b}/{c}" for name, (a, b, c) in sorted(r.by_entry.items(), key=lambda kv: -kv[1][0])))
    for reason, k in r.failures.most_common():
        print(f"  {reason}: {k}")
    record = {"n": r.traces, "valid": r.valid, "valid_fraction": r.valid_fraction, "structural": r.structural,
              "tolerance_us": args.tolerance_us, "adapter": args.adapter, "by_entry": r.by_entry,
              "temperature": args.temperature, "seed": args.seed, "device": lm.device,
              "failures": dict(r.failures.most_common())}
    if args.compare:
        from ..dataset import load_corpus

        _, real = load_corpus(args.compare, ("validation",))
        record["comparison"] = c = compare(r.samples, real["validation"])
        c["real_validator_pass_rate"] = rate = validator_pass_rate(real["validation"], tolerance_ns)
        s, v = c["sampled"], c["real"]
        print(f"vs {len(real['validation'])} validation traces of {args.compare} "
              f"({100 * rate:.1f} % of which pass the same validator):")
        print(f"  service mix TV distance {c['service_mix_tv_distance']}; services never in the real ones: "
              f"{', '.join(c['services_not_in_real']) or 'none'}")
        for key in ("depth", "fanout", "duration_us", "outside_parent"):
            print(f"  {key}: sampled {s[key]} / real {v[key]}")
        print(f"  spans per trace (median): sampled {s['spans_median']} / real {v['spans_median']}")
        print(f"  per entry service (>= 5 traces on both sides; service-mix TV distance weighted by samples: "
              f"{c['per_entry_service_mix_tv_distance']}):")
        for name, e in c["by_entry"].items():
            es, ev = e["sampled"], e["real"]
            print(f"    {name}: {es['traces']} sampled / {ev['traces']} real traces; spans {es['spans_median']} / "
                  f"{ev['spans_median']}; depth {es['depth']['median']} / {ev['depth']['median']}; fan-out mean "
                  f"{es['fanout']['mean']} / {ev['fanout']['mean']}; duration p50 {es['duration_us']['p50']} / "
                  f"{ev['duration_us']['p50']} µs, p90 {es['duration_us']['p90']} / {ev['duration_us']['p90']} µs; "
                  f"service-mix TV {e['service_mix_tv_distance']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
