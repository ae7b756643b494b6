"""The ``otel-tracegen`` command.

``main()`` returns an :class:`ExitStatus` instead of exiting deep inside; user mistakes (missing file, unknown
format, bad option value) become one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

from . import __version__
from .formats import FORMATS, read_any, writable_formats
from .report import ReadReport, UserError


class ExitStatus(enum.IntEnum):
    SUCCESS = 0
    INVALID = 1  # validate found invalid traces, or input had problems
    USAGE = 2  # bad command line (argparse's own code)
    ERROR = 3  # a user-fixable error (missing file, unreadable corpus)
    INTERRUPTED = 130


@dataclass
class Environment:
    """Streams the command writes to; tests swap in StringIO."""

    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)


def _tolerance_us(text: str) -> float:
    """A finite, non-negative number of microseconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line plus usage hint, exit 2, as argparse does; kept for clarity
        self.print_usage(sys.stderr)
        self.exit(ExitStatus.USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="otel-tracegen", description="Learn, generate, repair and explain microservice traces.")
    p.add_argument("--version", action="version", version=f"otel-tracegen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    readable = list(FORMATS)

    data = sub.add_parser("data", help="build and describe training corpora")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    b = dsub.add_parser("build", help="read captured traces, clean, dedupe, split by time, write a corpus")
    b.add_argument("--format", required=True, choices=readable)
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    b.add_argument("--out", required=True, type=Path, help="corpus directory to write")
    b.add_argument("--validation-fraction", type=float, default=0.1, help="last share of the time range (default 0.1)")
    b.add_argument("--no-clock-skew", action="store_true", help="do not apply Jaeger's clock-skew adjustment")
    b.add_argument("--tolerance-us", type=_tolerance_us, default=0.0, help="overrun still counted inside the parent (µs)")
    b.add_argument("--keep-duplicates", action="store_true", help="keep traces identical in every modeled field")

    s = dsub.add_parser("stats", help="distributions of a corpus (or of raw files with --format)")
    s.add_argument("corpus", nargs="+", metavar="DIR", help="a corpus directory, or raw files with --format")
    s.add_argument("--format", choices=readable, help="describe raw files of this format instead of a corpus")
    s.add_argument("--split", choices=("train", "validation", "all"), default="all")
    s.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the distributions with matplotlib")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")

    j = dsub.add_parser("join", help="concatenate corpora split by split into one corpus")
    j.add_argument("corpus", nargs="+", metavar="DIR", help="corpus directories (otel-tracegen data build)")
    j.add_argument("--out", required=True, type=Path, help="corpus directory to write")
    j.add_argument("--model-view", action="store_true",
                   help="keep only what the trace model reads (several times smaller; no attributes)")

    c = sub.add_parser("convert", help="convert trace files between formats")
    c.add_argument("--from", dest="src", required=True, choices=readable)
    c.add_argument("--to", dest="dst", required=True, choices=writable_formats())
    c.add_argument("inputs", nargs="+", metavar="IN")
    c.add_argument("--out", required=True, type=Path, help="output file (.gz compresses)")

    v = sub.add_parser("validate", help="check traces and name every violation")
    v.add_argument("--format", choices=readable, help="input format (guessed from each file when omitted)")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--tolerance-us", type=_tolerance_us, default=0.0, help="child overrun allowed for clock skew (µs)")
    v.add_argument("--expect-calls", type=int, help="every trace must have this many calls (spans)")
    v.add_argument("--expect-depth", type=int, help="every trace must have this depth")
    v.add_argument("--max-shown", type=int, default=50, help="invalid traces printed in full (default 50)")

    sub.add_parser("formats", help="list the trace formats")

    t = sub.add_parser("train", help="train the trace language model (pretrain, then instruct and infill LoRA)")
    _add_train_arguments(t)

    from .emit import command as emit_command

    g = sub.add_parser("generate", help="generate traces with the trace model (grammar-constrained, always valid)")
    emit_command.add_generate_arguments(g)
    r = sub.add_parser("replay", help="replay a library of traces (generated or captured) at any rate and shape, "
                                      "with fresh ids and times: learn once, replay many")
    emit_command.add_replay_arguments(r)

    e = sub.add_parser("eval", help="score synthetic traces (files, the model, baselines) against real ones; "
                                    "write an HTML and a Markdown report")
    from .evaluate.command import add_arguments as _add_eval_arguments

    _add_eval_arguments(e)

    inf = sub.add_parser("infill", help="repair incomplete traces: an OTLP receiver (serve) or offline (file)")
    from .infill.command import add_arguments as _add_infill_arguments

    _add_infill_arguments(inf)

    loc = sub.add_parser("localize", help="rank the services where a failure most likely started, with evidence")
    from .localize.command import add_arguments as _add_localize_arguments

    _add_localize_arguments(loc)

    prd = sub.add_parser("predict", help="predict from partial traces (root + first layer): high latency, uncommon calls")
    from .predict.command import add_arguments as _add_predict_arguments

    _add_predict_arguments(prd)

    mdl = sub.add_parser("model", help="describe trained models")
    msub = mdl.add_subparsers(dest="model_command", required=True, parser_class=_Parser)
    mi = msub.add_parser("info", help="parameters, size, vocabulary, adapters and training data of a model")
    mi.add_argument("path", nargs="?", type=Path, help="model directory (default: the shipped model/)")
    mi.add_argument("--json", action="store_true", help="print the description as JSON")
    mc = msub.add_parser("catalog", help="(re)build a model's catalog.json (services, operations, edges) from corpora")
    mc.add_argument("path", type=Path, help="model directory")
    mc.add_argument("--corpus", nargs="+", required=True, metavar="DIR", help="corpus directories it was trained on")
    return p


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Declared by the training module itself (one option per TrainConfig field); torch is not imported here."""
    from .lm.train import add_arguments

    add_arguments(p)


def _threads_used() -> str | None:
    """What this command ran torch with on the CPU (``otel_tracegen.cpu``), None when it did not."""
    from .cpu import configured

    choice = configured()
    return choice.describe() if choice is not None else None


def main(argv: Sequence[str] | None = None, env: Environment | None = None) -> int:
    from .cpu import watch_from_start

    watch_from_start()  # what other processes keep busy, measured while the command loads (otel_tracegen.cpu)
    env = env or Environment()
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on usage errors and --help/--version
        return int(e.code or 0)
    try:
        handler = {
            "data": lambda: _DATA[args.data_command](args, env),
            "convert": lambda: cmd_convert(args, env),
            "validate": lambda: cmd_validate(args, env),
            "formats": lambda: cmd_formats(args, env),
            "train": lambda: cmd_train(args, env),
            "generate": lambda: cmd_generate(args, env),
            "replay": lambda: cmd_replay(args, env),
            "eval": lambda: cmd_eval(args, env),
            "infill": lambda: cmd_infill(args, env),
            "localize": lambda: cmd_localize(args, env),
            "predict": lambda: cmd_predict(args, env),
            "model": lambda: _MODEL[args.model_command](args, env),
        }[args.command]
        status = int(handler())
        if args.command in ("eval", "localize", "predict") and (threads := _threads_used()) is not None:
            print(f"otel-tracegen: ran the model on the CPU with {threads}", file=env.stderr)
        return status
    except UserError as e:
        print(f"otel-tracegen: error: {e}", file=env.stderr)
        return ExitStatus.ERROR
    except ValueError as e:  # bad option values from config __post_init__
        print(f"otel-tracegen: error: {e}", file=env.stderr)
        return ExitStatus.ERROR
    except BrokenPipeError:  # `otel-tracegen ... | head`: the reader left; say nothing more
        _silence_stdout()
        return ExitStatus.SUCCESS
    except OSError as e:  # unwritable output, full disk, unreadable input: the OS's words, no traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"otel-tracegen: error: {where}{e.strerror or e}", file=env.stderr)
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        print("otel-tracegen: interrupted", file=env.stderr)
        return ExitStatus.INTERRUPTED


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at devnull so the interpreter's final flush cannot fail again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by a non-file (tests): nothing to silence
        pass


def _print_report(report: ReadReport, env: Environment, shown: int = 20) -> None:
    for line in report.problem_lines(shown) + report.summary_lines():
        print(line, file=env.stderr)


def _read(fmt: str | None, inputs: Sequence[str | Path], report: ReadReport):
    """Read inputs, guessing the format per file when none is given."""
    return read_any(inputs, report, fmt)


# --- data -------------------------------------------------------------------------------------------------


def cmd_data_build(args, env: Environment) -> ExitStatus:
    from .dataset import BuildConfig, build_corpus

    config = BuildConfig(
        validation_fraction=args.validation_fraction,
        adjust_clock_skew=not args.no_clock_skew,
        tolerance_ns=int(args.tolerance_us * 1000),
        dedupe=not args.keep_duplicates,
    )
    result = build_corpus(args.format, args.inputs, args.out, config)
    _print_report(result.report, env)
    for key, n in sorted(result.report.counts.items()):
        print(f"count: {key}: {n}", file=env.stderr)
    m = result.manifest
    sp = m["splits"]
    print(
        f"corpus {args.out}: train {sp['train']['traces']} traces / {sp['train']['spans']} spans, "
        f"validation {sp['validation']['traces']} traces / {sp['validation']['spans']} spans "
        f"(read {m['report']['counts'].get('traces read', 0)} traces from {m['files_read']} files "
        f"in {m['build_seconds']} s)",
        file=env.stdout,
    )
    return ExitStatus.SUCCESS


def cmd_data_stats(args, env: Environment) -> ExitStatus:
    from .dataset import describe, load_corpus, plot_stats

    if args.format:
        report = ReadReport()
        traces = _read(args.format, args.corpus, report)
        _print_report(report, env)
        if not traces:
            raise UserError(f"no traces could be read as {args.format} from {', '.join(map(str, args.corpus))}")
        title = f"{', '.join(map(str, args.corpus))} ({args.format})"
    else:
        if len(args.corpus) != 1:
            raise UserError("give one corpus directory, or raw files with --format")
        splits = ("train", "validation") if args.split == "all" else (args.split,)
        _, loaded = load_corpus(args.corpus[0], splits)
        traces = [t for name in splits for t in loaded[name]]
        title = f"{args.corpus[0]} ({args.split})"
    stats = describe(traces)
    summary = stats.summary()
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True), file=env.stdout)
    else:
        _print_stats(stats, summary, title, env)
    if args.plot:
        plot_stats(stats, args.plot, title)
        print(f"plot written to {args.plot}", file=env.stdout)
    return ExitStatus.SUCCESS


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:,.2f}"


def _print_stats(stats, summary: dict, title: str, env: Environment) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=env.stdout, width=110, highlight=False)
    console.print(f"[bold]{title}[/bold]")
    console.print(
        f"traces {summary['traces']:,}  spans {summary['spans']:,}  services {summary['services']}  "
        f"operations {summary['operations']}"
    )
    table = Table("distribution", "min", "p50", "mean", "p90", "p99", "max")
    for key, label in (
        ("calls_per_trace", "calls per trace"),
        ("depth", "depth"),
        ("trace_latency_us", "trace latency (µs)"),
        ("span_duration_us", "span duration (µs)"),
    ):
        d = summary[key]
        if d:
            table.add_row(label, *(_fmt(d[k]) for k in ("min", "p50", "mean", "p90", "p99", "max")))
    console.print(table)
    svc = Table("service", "spans", "share")
    for name, n in stats.services.most_common(40):
        svc.add_row(name, f"{n:,}", f"{100 * n / max(1, stats.spans):.1f} %")
    console.print(svc)


def cmd_data_join(args, env: Environment) -> ExitStatus:
    from .dataset import join_corpora

    manifest = join_corpora(args.corpus, args.out, model_view_only=args.model_view)
    sizes = ", ".join(f"{name} {s['traces']:,} traces / {s['spans']:,} spans" for name, s in manifest["splits"].items())
    print(f"joined {len(args.corpus)} corpora into {args.out}: {sizes}", file=env.stdout)
    return ExitStatus.SUCCESS


_DATA = {"build": cmd_data_build, "stats": cmd_data_stats, "join": cmd_data_join}


# --- convert / validate / formats -------------------------------------------------------------------------


def cmd_convert(args, env: Environment) -> ExitStatus:
    from .formats import write_traces

    report = ReadReport()
    traces = _read(args.src, args.inputs, report)
    write_traces(args.dst, traces, args.out)
    _print_report(report, env)
    print(
        f"wrote {len(traces)} traces, {sum(len(t) for t in traces)} spans to {args.out} ({args.dst})",
        file=env.stdout,
    )
    return ExitStatus.INVALID if report.problems else ExitStatus.SUCCESS


def cmd_validate(args, env: Environment) -> ExitStatus:
    from .validate import validate

    report = ReadReport()
    traces = _read(args.format, args.files, report)
    _print_report(report, env)
    if not traces:
        print("no traces found: nothing to validate", file=env.stderr)
        return ExitStatus.INVALID
    by_kind: Counter = Counter()
    invalid = 0
    for t in traces:
        vs = validate(
            t,
            tolerance_ns=int(args.tolerance_us * 1000),
            expect_calls=args.expect_calls,
            expect_depth=args.expect_depth,
        )
        if not vs:
            continue
        invalid += 1
        kinds = Counter(v.kind.value for v in vs)
        by_kind.update(kinds)
        if invalid <= args.max_shown:
            print(f"trace {t.trace_id}: {len(t)} spans, {len(vs)} violations", file=env.stdout)
            for v in vs[:20]:
                print(f"  {v}", file=env.stdout)
            if len(vs) > 20:
                print(f"  … and {len(vs) - 20} more", file=env.stdout)
    print(f"{len(traces)} traces, {invalid} invalid, {len(traces) - invalid} valid", file=env.stdout)
    for kind, n in by_kind.most_common():
        print(f"  {kind}: {n}", file=env.stdout)
    ok = invalid == 0 and not report.problems
    return ExitStatus.SUCCESS if ok else ExitStatus.INVALID


def cmd_generate(args, env: Environment) -> ExitStatus:
    from .emit.command import run_generate

    return ExitStatus(run_generate(args, env))


def cmd_replay(args, env: Environment) -> ExitStatus:
    from .emit.command import run_replay

    return ExitStatus(run_replay(args, env))


def cmd_eval(args, env: Environment) -> ExitStatus:
    from .evaluate.command import run

    return ExitStatus(run(args, env, _read))


def cmd_infill(args, env: Environment) -> ExitStatus:
    from .infill.command import run

    return ExitStatus(run(args, env, _read))


def cmd_localize(args, env: Environment) -> ExitStatus:
    from .localize.command import run

    return ExitStatus(run(args, env, _read))


def cmd_predict(args, env: Environment) -> ExitStatus:
    from .predict.command import run

    return ExitStatus(run(args, env, _read))


def cmd_formats(args, env: Environment) -> ExitStatus:
    for info in FORMATS.values():
        rw = "read/write" if info.writable else "read     "
        print(f"{info.name:11s} {rw}  {info.description}", file=env.stdout)
    return ExitStatus.SUCCESS


# --- train / model ----------------------------------------------------------------------------------------


def cmd_train(args, env: Environment) -> ExitStatus:
    from .lm.train import config_from_args, train

    train(config_from_args(args), log=lambda line: print(line, file=env.stderr))
    return ExitStatus.SUCCESS


def cmd_model_info(args, env: Environment) -> ExitStatus:
    from .lm.model import describe_model

    info = describe_model(args.path)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True), file=env.stdout)
        return ExitStatus.SUCCESS
    out = env.stdout
    print(f"model       {info['path']}", file=out)
    if info["base_model"]:
        print(f"base model  {info['base_model']}", file=out)
    print(f"parameters  {info['parameters']:,}", file=out)
    if info["adapter_parameters"]:
        print(f"adapters    {', '.join(info['adapters'])} ({info['adapter_parameters']:,} LoRA parameters)", file=out)
    else:
        print("adapters    none", file=out)
    print(f"size        {info['size_bytes'] / 1e6:.2f} MB on disk", file=out)
    print(f"vocabulary  {info['vocab_size']:,} tokens", file=out)
    data = info["data"] or {}
    if data:
        splits = data.get("splits") or {}
        sizes = ", ".join(f"{name} {s.get('traces')} traces" for name, s in splits.items())
        print(f"data        {', '.join(map(str, data.get('inputs') or [data.get('corpus')]))} ({sizes})", file=out)
    else:
        print("data        not recorded (no training.json)", file=out)
    cat = info.get("catalog")
    if cat:
        print(f"catalog     {cat['services']} services, {cat['operations']} operations, entry services "
              f"{', '.join(cat['entry_services'])}; deepest trace {cat['max_depth']} levels", file=out)
    else:
        print("catalog     none (generate needs one: otel-tracegen model catalog MODEL --corpus DIR)", file=out)
    for name, s in info["stages"].items():
        val = f"{s['val_loss']:.4f}" if isinstance(s.get("val_loss"), float) else "n/a"
        print(f"stage       {name}: {s.get('steps')} steps, val loss {val}, {s.get('wall_s')} s on {s.get('device')}",
              file=out)
    return ExitStatus.SUCCESS


def cmd_model_catalog(args, env: Environment) -> ExitStatus:
    from .dataset import load_corpora
    from .sampling import Catalog

    from .lm.model import read_training_json

    if not (args.path / "config.json").is_file() and not read_training_json(args.path).get("base_model"):
        raise UserError(f"{args.path}: not a model directory (no config.json, and no --base-model run)")
    _, splits = load_corpora(args.corpus)
    cat = Catalog.from_traces(splits.get("train", []))
    where = cat.save(args.path)
    print(f"{where}: {len(cat.operations)} services, {sum(map(len, cat.operations.values()))} operations, "
          f"{len(cat.entries)} entry services, deepest trace {cat.max_depth} levels, from {cat.traces} traces",
          file=env.stdout)
    return ExitStatus.SUCCESS


_MODEL = {"info": cmd_model_info, "catalog": cmd_model_catalog}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
