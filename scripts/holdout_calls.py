"""A corpus with some calls held out of its train split: the test bed for repairs where lookups fail.

On benchmark apps every lost span sits on a call path the train split has seen many times, so a lookup table of
"who calls these orphans" repairs it as well as a model (``benchmarks/bench_infill.py``: 299 of 300 held-out
lost spans are on paths seen >= 10 times). To measure what a model does where such lookups cannot help, this
script writes a copy of a corpus whose train split never shows some calls (parent operation -> child operation)
that its validation split does: every train trace holding one of them is removed; validation is unchanged.

A call is held out only if both of its ends stay known, so the repair has a chance: after all removals the
parent operation still occurs in train (under other calls), and the child operation is still called by some other
operation. The lookups then point at that other caller, and only something that generalizes (the model, from
the lost span's place in the trace) can name the real one. Calls are taken greedily, those costing the fewest
train traces first, while the removed traces stay within ``--max-removed`` of the train split.

    python3 scripts/holdout_calls.py CORPUS OUT [--calls 8] [--min-validation 20] [--max-removed 0.03]
    otel-tracegen train --stage pretrain --corpus OUT --out M ...; otel-tracegen train --stage infill --corpus OUT --out M ...
    python3 benchmarks/bench_infill.py --corpus OUT --model M --unseen-calls --throughput-spans 0

OUT's manifest records the held-out calls, with their train-trace and validation counts, under ``held_out``.
``docs/infill.md`` ("Where lookups fail") gives the training commands and the figures of a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))  # the benchmark this corpus is for names operations the same way

from bench_infill import Op, op_of  # noqa: E402

from otel_tracegen.trace import Trace  # noqa: E402

Call = tuple[Op, Op]  # (parent op, child op)


def calls_of(t: Trace) -> set[Call]:
    """The distinct parent -> child calls of a trace, as operations."""
    by_id = t.by_id
    return {(op_of(by_id[s.parent_id]), op_of(s)) for s in t.spans if s.parent_id in by_id}


def repairable_calls(traces: Sequence[Trace]) -> Counter:
    """Calls whose parent is a connecting span (it has a parent itself): the lost span of a missing-call case."""
    out: Counter = Counter()
    for t in traces:
        by_id = t.by_id
        for s in t.spans:
            p = by_id.get(s.parent_id) if s.parent_id is not None else None
            if p is not None and p.parent_id in by_id:
                out[op_of(p), op_of(s)] += 1
    return out


def choose_held_out(train: Sequence[Trace], validation: Sequence[Trace], *, calls: int = 8,
                    min_validation: int = 20, max_removed: float = 0.03) -> tuple[list[dict], set[int]]:
    """The calls to hold out (each a record: parent, child, train traces, validation cases) and the indices of
    the train traces to remove. See the module docstring for the rules."""
    holders: dict[Call, set[int]] = defaultdict(set)  # call -> the train traces making it
    in_calls: dict[Op, set[int]] = defaultdict(set)  # op -> the train traces where it calls or is called
    callers: dict[Op, set[Op]] = defaultdict(set)  # op -> the ops seen calling it
    for i, t in enumerate(train):
        for c in calls_of(t):
            holders[c].add(i)
            in_calls[c[0]].add(i)
            in_calls[c[1]].add(i)
            callers[c[1]].add(c[0])
    wanted = repairable_calls(validation)
    # cheapest first; ties by name so that the choice is the same on every machine
    order = sorted((c for c, n in wanted.items() if n >= min_validation and c in holders),
                   key=lambda c: (len(holders[c]), c))
    budget = int(max_removed * len(train))
    chosen: list[Call] = []
    removed: set[int] = set()
    for c in order:
        if len(chosen) >= calls:
            break
        after = removed | holders[c]
        if len(after) > budget:
            continue
        parent, child = c
        parent_known = bool(in_calls[parent] - after)
        other_caller = any(holders[a, child] - after for a in callers[child] if a != parent)
        if parent_known and other_caller:
            chosen.append(c)
            removed = after
    records = [{"parent": list(p), "child": list(k), "train_traces": len(holders[p, k]),
                "validation_cases": wanted[p, k]} for p, k in chosen]
    return records, removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--calls", type=int, default=8, help="calls to hold out at most (default 8)")
    ap.add_argument("--min-validation", type=int, default=20,
                    help="a call must be repairable this often in validation (default 20)")
    ap.add_argument("--max-removed", type=float, default=0.03,
                    help="train traces that may be removed, as a share of the train split (default 0.03)")
    args = ap.parse_args(argv)

    from otel_tracegen.dataset import load_corpus, split_counts, write_corpus

    manifest, splits = load_corpus(args.corpus)
    train, validation = splits["train"], splits["validation"]
    held, removed = choose_held_out(train, validation, calls=args.calls, min_validation=args.min_validation,
                                    max_removed=args.max_removed)
    if not held:
        print(f"{args.corpus}: no call can be held out under these limits", file=sys.stderr)
        return 1
    splits["train"] = [t for i, t in enumerate(train) if i not in removed]
    manifest = {**manifest, "held_out": {"source": str(args.corpus), "calls": held,
                                         "removed_train_traces": len(removed)}}
    manifest["splits"] = split_counts(splits)
    write_corpus(args.out, splits, manifest)
    for h in held:
        print(f"held out {' '.join(h['parent'])} -> {' '.join(h['child'])}: {h['train_traces']} train traces, "
              f"{h['validation_cases']} validation cases")
    print(f"{len(removed)} of {len(train)} train traces removed; {args.out} written")
    print(json.dumps(manifest["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
