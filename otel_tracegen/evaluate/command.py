"""``otel-tracegen eval``: score synthetic traces (files, the model, baselines) against real ones, write a report.

    otel-tracegen eval --real CORPUS_OR_FILES [--train CORPUS_OR_FILES] [--synthetic FILES] [--model [DIR]]
        [--baseline replay|probabilistic|flat ...] [--flat-model DIR] [--n N] --report OUT.html|OUT.md

``--real`` and ``--train`` take a corpus directory (``otel-tracegen data build``: ``--real`` reads its validation
split, ``--train`` its train split, and a corpus given as ``--real`` alone supplies both) or trace files and
directories in any format the adapters read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..report import ReadReport, UserError

BASELINES = ("replay", "probabilistic", "flat")


def _positive(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", nargs="+", required=True, metavar="PATH",
                   help="real traces: a corpus directory (its validation split; its train split is --train unless "
                        "given) or files/directories in any readable format")  # fmt: skip
    p.add_argument("--train", nargs="+", metavar="PATH",
                   help="training traces (a corpus directory's train split, or files): for memorization, the "
                        "replay and probabilistic baselines, the p90s and uncommon calls, and utility")  # fmt: skip
    p.add_argument("--format", help="format of --real/--train/--synthetic files (default: detected per file)")
    p.add_argument("--synthetic", nargs="+", metavar="FILE", help="synthetic traces to score (any readable format)")
    p.add_argument("--synthetic-name", default="files", help="label of --synthetic in the report (default: files)")
    p.add_argument("--model", nargs="?", const="", metavar="DIR",
                   help="generate with a trace model (no DIR: the shipped model/)")
    p.add_argument("--baseline", action="append", choices=BASELINES, default=[],
                   help="add a baseline generator; repeatable (flat needs --flat-model)")
    p.add_argument("--flat-model", type=Path, metavar="DIR",
                   help="a model trained with `otel-tracegen train --stage flat` (the GReaT-style baseline)")
    p.add_argument("--n", type=_positive, default=200, help="free requests per generator (default 200)")
    p.add_argument("--n-conditioned", type=_positive, help="requests copying real calls x depth (default: --n)")
    p.add_argument("--n-instructions", type=_positive, default=50,
                   help="requests per instruction: high latency, include call, both (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of model generators")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="model weights on CPU")
    p.add_argument("--tolerance-us", type=float, default=0.0,
                   help="how far a child may start before / end after its parent and still be valid (default 0)")
    p.add_argument("--no-utility", action="store_true", help="skip the utility classifiers")
    p.add_argument("--report", type=Path, required=True, metavar="OUT.html|OUT.md",
                   help="writes OUT.html (figures embedded) and OUT.md (figures in OUT_figures/)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the metric table as JSON")


def _is_corpus(paths) -> bool:
    from ..dataset import MANIFEST

    return len(paths) == 1 and (Path(paths[0]) / MANIFEST).is_file()


def _load(paths, fmt, split: str, env, read) -> tuple[list, str, list | None]:
    """(traces, label, the corpus's train split when ``paths`` is a corpus read for its validation split)."""
    from ..dataset import load_corpus

    if _is_corpus(paths):
        wanted = (split, "train") if split == "validation" else (split,)
        _, loaded = load_corpus(paths[0], wanted)
        if not loaded[split]:
            raise UserError(f"{paths[0]}: the {split} split is empty")
        return loaded[split], f"{paths[0]}, {split} split", loaded.get("train") if split == "validation" else None
    report = ReadReport()
    traces = read(fmt, paths, report)
    for p in report.problems[:10]:
        print(f"problem: {p}", file=env.stderr)
    if not traces:
        raise UserError(f"no traces could be read from {', '.join(map(str, paths))}")
    return traces, ", ".join(map(str, paths)), None


class _Bars:
    """Progress on stderr, one tqdm bar per phase (the CLI's one progress library), and a factory of per-phase
    advance callbacks; closes every bar on exit."""

    def __init__(self, env) -> None:
        self.env, self.bars = env, []

    def __call__(self, description: str, total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{description:28s}", file=self.env.stderr, disable=None)
        self.bars.append(bar)
        return bar.update

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars:
            bar.close()


def run(args, env, read) -> int:
    """The command. ``read(fmt, paths, report)`` reads trace files (the CLI's reader, format per file)."""
    from .baselines import ProbabilisticGenerator, ReplayGenerator
    from .harness import Settings, evaluate
    from .report import metrics_json, write_report

    if args.report.suffix not in (".html", ".md"):
        raise UserError(f"--report {args.report}: must end in .html or .md")
    if args.model is None and not args.baseline and not args.synthetic:
        raise UserError("nothing to score: give --synthetic FILES, --model [DIR] and/or --baseline NAME")
    if "flat" in args.baseline and args.flat_model is None:
        raise UserError("--baseline flat needs --flat-model DIR (train one with `otel-tracegen train --stage flat`)")
    real, real_label, corpus_train = _load(args.real, args.format, "validation", env, read)
    train, train_label = corpus_train, f"{args.real[0]}, train split" if corpus_train else ""
    if args.train:
        train, train_label, _ = _load(args.train, args.format, "train", env, read)
    needs_train = [b for b in args.baseline if b in ("replay", "probabilistic")]
    if needs_train and not train:
        raise UserError(f"--baseline {needs_train[0]} needs training traces: give --train (or a corpus as --real)")
    settings = Settings(n=args.n, n_conditioned=args.n_conditioned, n_instructions=args.n_instructions,
                        seed=args.seed, tolerance_us=args.tolerance_us, utility=not args.no_utility)  # fmt: skip

    generators = []
    if args.model is not None:
        from .generators import ModelGenerator

        generators.append(ModelGenerator.from_pretrained(args.model or None, dtype=args.dtype,
                                                         temperature=args.temperature))  # fmt: skip
    if needs_train:
        from ..lm.data import corpus_stats_for_instructions

        p90 = corpus_stats_for_instructions(train).p90_us
        for b in args.baseline:
            if b == "replay":
                generators.append(ReplayGenerator(train, p90))
            elif b == "probabilistic":
                generators.append(ProbabilisticGenerator(train))
    if "flat" in args.baseline:
        from .flat import FlatTableGenerator

        flat = FlatTableGenerator.from_pretrained(args.flat_model)
        flat.temperature = args.temperature
        generators.append(flat)
    synthetic = {}
    if args.synthetic:
        if _is_corpus(args.synthetic):
            raise UserError(f"--synthetic {args.synthetic[0]} is a corpus directory; give the trace files themselves")
        synthetic[args.synthetic_name], _, _ = _load(args.synthetic, args.format, "train", env, read)

    with _Bars(env) as factory:
        ev = evaluate(real, generators=generators, synthetic=synthetic, train=train, settings=settings, bar=factory,
                      real_label=real_label, train_label=train_label)  # fmt: skip
    if args.json:  # first: the numbers survive a failure drawing the figures
        args.json.write_text(metrics_json(ev) + "\n")
    html_path, md_path = write_report(ev, args.report)
    print_table(ev, env.stdout)
    for s in ev.scores:
        if s.error:
            print(f"otel-tracegen: {s.name} failed and was not scored: {s.error}", file=env.stderr)
    print(f"report: {html_path} and {md_path}", file=env.stdout)
    return 1 if any(s.error for s in ev.scores) else 0


def print_table(ev, file) -> None:
    """The metric table, one column per generator, on ``file``."""
    import math

    from rich.console import Console
    from rich.table import Table

    from .report import fmt_value, is_rate

    names = [s.name for s in ev.scores]
    table = Table("metric", *names)
    for key, row in ev.table().items():
        if all(isinstance(v, float) and math.isnan(v) for v in row.values()):
            continue
        table.add_row(key, *(fmt_value(row[n], is_rate(key)) for n in names))
    Console(file=file, width=160, highlight=False).print(table)
