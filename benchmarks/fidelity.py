"""Fidelity of the shipped model against its baselines, on the validation split of the corpus it was trained on.

    python3 benchmarks/fidelity.py [--corpus DIR] [--model DIR] [--flat-model DIR] [--n 200]
        [--n-instructions 50] [--seed 0] [--report OUT.html] [--json F] [--save-traces DIR]

The shipped model was trained on TrainTicket + Online Boutique (``model/training.json``). Without ``--corpus`` the
corpus is built from ``../shared/datasets`` as ``scripts/train_default_model.sh`` documents (the two span-CSV sets,
joined with ``--model-view``) into ``.gpu-data/ttob`` and reused. Prints the metric table (each generator side by
side: the model, replay, the probabilistic generator and, with ``--flat-model``, the flat GReaT-style model), the
paper comparison, the seconds each generator took, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "datasets"
DEFAULT_CORPUS = ROOT / ".gpu-data" / "ttob"


def build_default_corpus(out: Path) -> Path:
    """The shipped model's corpus, from ../shared (TrainTicket and Online Boutique span CSVs)."""
    import tempfile

    from otel_tracegen.dataset import build_corpus, join_corpora

    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("nezha-trainticket", "nezha-onlineboutique"):
            src = SHARED / name / "traces"
            if not src.is_dir():
                sys.exit(f"{src} is missing: give --corpus DIR (a corpus from `otel-tracegen data build`)")
            print(f"building the {name} corpus from {src} ...", flush=True)
            build_corpus("spancsv", [src], Path(tmp) / name)
            parts.append(Path(tmp) / name)
        join_corpora(parts, out, model_view_only=True)
    return out


def machine() -> str:
    from bench_generate import machine as cpu_or_gpu  # this directory is on sys.path when run as a script

    return f"{cpu_or_gpu('cpu')}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model/)")
    ap.add_argument("--flat-model", type=Path, help="a `train --stage flat` model to add as a baseline")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-instructions", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--report", type=Path, default=Path("fidelity-report.html"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--save-traces", type=Path, metavar="DIR",
                    help="write each generator's free traces to DIR/NAME.otlp.jsonl (score them again with "
                         "`otel-tracegen eval --synthetic`)")
    args = ap.parse_args()

    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.evaluate.baselines import ProbabilisticGenerator, ReplayGenerator
    from otel_tracegen.evaluate.generators import ModelGenerator
    from otel_tracegen.evaluate.harness import Settings, evaluate
    from otel_tracegen.evaluate.command import print_table
    from otel_tracegen.evaluate.report import fmt_value, metrics_json, paper_values, write_report
    from otel_tracegen.lm.data import corpus_stats_for_instructions

    corpus = args.corpus
    if corpus is None:
        corpus = DEFAULT_CORPUS if (DEFAULT_CORPUS / "manifest.json").is_file() else build_default_corpus(DEFAULT_CORPUS)
    t0 = time.perf_counter()
    _, splits = load_corpus(corpus)
    train, real = splits["train"], splits["validation"]
    print(f"corpus {corpus}: {len(train)} train, {len(real)} validation traces ({time.perf_counter() - t0:.0f} s)")
    p90 = corpus_stats_for_instructions(train).p90_us
    generators = [ModelGenerator.from_pretrained(args.model, dtype=args.dtype), ReplayGenerator(train, p90),
                  ProbabilisticGenerator(train)]  # fmt: skip
    if args.flat_model:
        from otel_tracegen.evaluate.flat import FlatTableGenerator

        generators.append(FlatTableGenerator.from_pretrained(args.flat_model))

    def bar(description: str, total: int):
        start = time.perf_counter()
        print(f"  {description} ({total} requests) ...", flush=True)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if done[0] >= total:
                print(f"  {description}: {time.perf_counter() - start:.1f} s", flush=True)

        return advance

    settings = Settings(n=args.n, n_instructions=args.n_instructions, seed=args.seed)
    ev = evaluate(real, generators=generators, train=train, settings=settings, bar=bar,
                  real_label=f"{corpus}, validation split", train_label=f"{corpus}, train split")  # fmt: skip
    html_path, md_path = write_report(ev, args.report)
    if args.save_traces:
        from otel_tracegen.formats import write_traces

        args.save_traces.mkdir(parents=True, exist_ok=True)
        for s in ev.scores:
            write_traces("otlp-json", s.traces, args.save_traces / f"{s.name}.otlp.jsonl")

    print()
    print_table(ev, sys.stdout)
    print()
    print("paper comparison (paper: KL 0.16; heavy hitters > 90 % at K <= 50, 65 % at K = 500; memorization 3-5 %)")
    for s in ev.scores:
        pv = paper_values(ev, s)
        print(f"  {s.name:14s} KL {fmt_value(pv['kl_popular_calls'])}  HH min K<=50 "
              f"{fmt_value(pv['heavy_hitters_min_k50'], True)}  HH K=500|all {fmt_value(pv['heavy_hitters_k500'], True)}"
              f"  memorization {fmt_value(pv['memorization'], True)}")  # fmt: skip
    print()
    print("seconds per generator: " + ", ".join(f"{s.name} {s.seconds:.0f}" for s in ev.scores))
    print(f"machine: {machine()}")
    print(f"report: {html_path} and {md_path} ({time.perf_counter() - t0:.0f} s in all)")
    if args.json:
        data = json.loads(metrics_json(ev))
        data["seconds"] = {s.name: round(s.seconds, 1) for s in ev.scores}
        data["machine"] = machine()
        args.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
