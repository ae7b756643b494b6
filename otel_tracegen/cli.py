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
from .formats import FORMATS, detect_format, expand_paths, get_format, read_traces, writable_formats
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

    g = sub.add_parser("generate", help="generate traces with the trace model (grammar-constrained, always valid)")
    _add_generate_arguments(g)

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


def _include_call(text: str):
    """``A -> B`` or ``A -> B:KIND`` (the callee's span kind)."""
    from .encoding import Include
    from .trace import SpanKind

    src, arrow, dst = text.partition("->")
    src, dst = src.strip(), dst.strip()
    kind = None
    if ":" in dst:
        dst, _, kind_name = dst.rpartition(":")
        dst = dst.strip()
        try:
            kind = SpanKind[kind_name.strip().upper()]
        except KeyError:
            raise argparse.ArgumentTypeError(
                f"unknown span kind {kind_name.strip()!r} in {text!r}; use one of {', '.join(k.name for k in SpanKind)}"
            ) from None
    if not arrow or not src or not dst:
        raise argparse.ArgumentTypeError(f"expected 'A -> B' or 'A -> B:KIND', got {text!r}")
    return Include(src, dst, kind)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return v


def _start_time(text: str) -> int:
    """Unix nanoseconds from an integer (ns) or an ISO 8601 / RFC 3339 time."""
    from datetime import datetime, timezone

    if text.lstrip("-").isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not Unix nanoseconds or an ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def _duration(text: str) -> float:
    """Seconds: a number, with an optional s/m/h suffix, or inf."""
    from .localize.window import parse_duration_s

    try:
        return parse_duration_s(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _header(text: str) -> tuple[str, str]:
    from .otlp_export import parse_header

    try:
        return parse_header(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_generate_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--model", type=Path, help="model directory (default: the shipped model/)")
    g.add_argument("--adapter", default="auto", help="instruct (default when present), none, or another adapter")
    g.add_argument("--count", type=_positive_int, help="traces to generate (default 10, or all --duration allows)")
    w = g.add_argument_group("what to generate (each left open is the model's choice)")
    w.add_argument("--service", help="entry service (the root span's)")
    w.add_argument("--operation", help="entry operation (needs --service)")
    w.add_argument("--entries", choices=("data", "model"), default="data",
                   help="data (default): without --service, draw the entry service from the training mix, and "
                        "without --calls/--depth, the entry operation, calls, depth, latency and instructions (high "
                        "latency, an uncommon call) of a training trace entered there; model: let the model choose "
                        "the entry and size (no latency or instructions are drawn)")
    w.add_argument("--calls", type=_positive_int, help="spans per trace, root included; met exactly")
    w.add_argument("--depth", type=_positive_int, help="span levels per trace; met exactly")
    w.add_argument("--latency-ms", type=float, help="the root span's duration in ms")
    w.add_argument("--high-latency", action="store_true", help="latency above the p90 of the entry (instruction)")
    w.add_argument("--include-call", type=_include_call, action="append", default=[], metavar="'A -> B[:KIND]'",
                   help="a call from service A to service B (span kind of B) somewhere in each trace (one per trace)")
    inc = g.add_argument_group("a labelled incident, for chaos testing (docs/localize.md)")
    inc.add_argument("--inject-latency", metavar="SERVICE=MS",
                     help="every call into SERVICE takes MS longer (its own work); callers wait, later calls move")
    inc.add_argument("--inject-share", type=float, default=1.0,
                     help="share of the traces reaching SERVICE that are delayed (default 1)")
    inc.add_argument("--incident-label", type=Path, metavar="FILE",
                     help="write the incident's ground truth (JSON: service, delay, share, time range) here")
    d = g.add_argument_group("decoding")
    d.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    from .sampling.engine import DEFAULT_ATTEMPTS  # light: the engine imports torch only to decode

    d.add_argument("--attempts", type=_positive_int, default=DEFAULT_ATTEMPTS,
                   help="draws per step at most: a step is kept with the model's odds of having written it without "
                        f"the grammar's masks, else drawn again (default {DEFAULT_ATTEMPTS}; 1: keep every first "
                        "draw, faster, less realistic)")
    d.add_argument("--seed", type=int, default=0, help="same seed, same options: the same traces (default 0)")
    d.add_argument("--batch-size", type=_positive_int, default=256, help="pending steps decoded together")
    d.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    d.add_argument("--threads", type=_positive_int,
                   help="CPU threads for torch (default: the CPUs this process may use, by affinity and cgroup "
                        "quota or OTEL_TRACEGEN_CPUS, less those other processes keep busy at start)")
    d.add_argument("--decode-workers", type=_positive_int, metavar="N",
                   help="processes decoding rounds of --batch-size traces side by side, --threads torch threads "
                        "each (default on a CPU: one per CPU --threads would use, when the run has more than one "
                        "round; else 1)")
    d.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and activations: auto = bfloat16 on a GPU, or on a CPU where it measured clearly "
                        "faster than float32 (timed once per machine, remembered in ~/.cache/otel-tracegen), else "
                        "float32 (default auto)")
    o = g.add_argument_group("output: a file, OTLP, or both")
    o.add_argument("--out", type=Path, help="write the traces to this file (.gz compresses)")
    o.add_argument("--format", default="otlp-json", choices=writable_formats(), help="file format (default otlp-json)")
    o.add_argument("--start-time", type=_start_time, help="anchor: Unix ns or ISO 8601 (default: now)")
    o.add_argument("--no-attributes", action="store_true",
                   help="spans without protocol attributes (http.*, rpc.*, db.*: learned, else inferred from names)")
    o.add_argument("--rate", type=float, help="traces/s: Poisson arrivals, and sent at that pace (default: at once)")
    o.add_argument("--duration", type=_duration, help="seconds to run (or 10s, 5m, 1h, inf) instead of --count")
    o.add_argument("--otlp-endpoint", help="send OTLP to HOST:PORT or a URL (default: OTEL_EXPORTER_OTLP_ENDPOINT)")
    o.add_argument("--otlp-http", action="store_true", help="OTLP/HTTP protobuf instead of gRPC")
    o.add_argument("--otlp-insecure", action="store_true", help="plain text instead of TLS")
    o.add_argument("--otlp-header", type=_header, action="append", default=[], metavar="KEY=VALUE",
                   help="request header; repeatable")
    o.add_argument("--otlp-compression", choices=("gzip", "none"), help="default: OTEL_EXPORTER_OTLP_COMPRESSION")
    o.add_argument("--otlp-sender", choices=("native", "sdk"), default="native",
                   help="native: write the OTLP bytes directly and send them with grpcio/requests (default, several "
                        "times faster); sdk: the OpenTelemetry SDK's exporter, the reference (same bytes, same "
                        "OTEL_EXPORTER_OTLP_* settings)")
    o.add_argument("--workers", type=_positive_int, default=1, help="threads sending OTLP batches (default 1)")


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
    for p in report.problems[:shown]:
        print(f"problem: {p}", file=env.stderr)
    if len(report.problems) > shown:
        print(f"… and {len(report.problems) - shown} more problems", file=env.stderr)
    for line in report.summary_lines():
        print(line, file=env.stderr)


def _read(fmt: str | None, inputs: Sequence[str | Path], report: ReadReport):
    """Read inputs, guessing the format per file when none is given."""
    if fmt is not None:
        return read_traces(fmt, inputs, report)
    files = expand_paths(inputs)
    by_format: dict[str, list[Path]] = {}
    for f in files:
        by_format.setdefault(detect_format(f), []).append(f)
    if len(by_format) == 1:
        [(name, fs)] = by_format.items()
        return get_format(name).read(fs, report)
    # Several formats: a trace may still span files, so regroup every span by trace id.
    from .trace import group_traces, iter_spans

    spans = [s for name, fs in by_format.items() for s in iter_spans(get_format(name).read(fs, report))]
    return group_traces(spans)


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


def _otlp_settings(args):
    """OTLP settings from the flags, or None when nothing says where to send (no flag, no OTEL_* endpoint)."""
    import os

    from .otlp_export import OtlpSettings

    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not args.otlp_endpoint and not env_endpoint and not args.otlp_http:
        return None
    protocol = "http/protobuf" if args.otlp_http else os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol not in ("grpc", "http/protobuf"):
        raise UserError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only grpc and http/protobuf are supported")
    return OtlpSettings(endpoint=args.otlp_endpoint, protocol=protocol, insecure=True if args.otlp_insecure else None,
                        headers=dict(args.otlp_header), compression=args.otlp_compression)


def cmd_generate(args, env: Environment) -> ExitStatus:
    if args.operation and not args.service:
        raise UserError("--operation needs --service (the entry service it belongs to)")
    if args.rate is not None and not (args.rate > 0):
        raise UserError(f"--rate must be > 0, got {args.rate}")
    otlp = _otlp_settings(args)
    if args.out is None and otlp is None:
        raise UserError("say where the traces go: --out FILE, --otlp-endpoint HOST:PORT (or OTEL_EXPORTER_OTLP_ENDPOINT)")
    count = args.count if args.count is not None else (None if args.duration is not None else 10)
    incident = None
    if args.inject_latency:
        from .incident import LatencyIncident

        incident = LatencyIncident.parse(args.inject_latency, share=args.inject_share, seed=args.seed)
    elif args.incident_label or args.inject_share != 1.0:
        raise UserError("--inject-share and --incident-label go with --inject-latency SERVICE=MS")
    if count is None and args.duration == float("inf") and args.out is not None:
        raise UserError("--duration inf never ends, so the file would never be written: give --count or a duration")
    from . import generate
    from .lm.model import load_model, resolve_dtype_name
    from .sampling import TraceRequest, TraceSampler

    from .cpu import configure_torch

    threads = configure_torch(args.threads)  # before the model loads: its dtype check runs torch already
    lm = load_model(args.model, device=args.device, backend="auto", dtype=args.dtype)  # auto: --base-model runs too
    sampler = TraceSampler(lm, adapter=None if args.adapter == "none" else args.adapter, batch_size=args.batch_size,
                           entries=args.entries, attempts=args.attempts)
    request = TraceRequest(service=args.service, operation=args.operation, calls=args.calls, depth=args.depth,
                           latency_ms=args.latency_ms, high_latency=args.high_latency,
                           includes=tuple(args.include_call))  # fmt: skip
    request.check(sampler.catalog, sampler.limits)  # before any decoding: errors name the nearest known values
    if incident is not None:
        sampler.catalog.check_service(incident.service, "service for --inject-latency")
        incident_range: list[int] = []
    sender = None
    if otlp is not None:
        from .otlp_export import make_sender

        sender = make_sender(otlp, sender=args.otlp_sender, workers=args.workers)
        if sender.note:
            print(f"otel-tracegen: {sender.note}", file=env.stderr)
    from tqdm import tqdm

    from .sampling.pool import DecodePool, SamplerSpec, auto_workers

    dtype = resolve_dtype_name(args.dtype, str(lm.device))  # what "auto" chose, for the summary
    rounds = None if count is None else sum(1 for _ in generate.round_sizes(count, args.batch_size, args.rate))
    # Workers by the CPUs the process may use, not by what a neighbour leaves: one-thread processes do not spin
    # against it as a second OpenMP thread does (benchmarks/bench_threads.py).
    workers = args.decode_workers or auto_workers(str(lm.device), rounds, threads.budget.cpus)
    pool = None
    if workers > 1:  # the same traces as in-process decoding (rounds are seeded by their index), sooner
        pool = DecodePool(SamplerSpec(model=None if args.model is None else str(args.model), device=str(lm.device),
                                      dtype=args.dtype, adapter=sampler.adapter, batch_size=args.batch_size,
                                      entries=args.entries, attempts=args.attempts),
                          workers, threads_per_worker=args.threads or 1)  # fmt: skip
    summary = generate.GenerationSummary()
    bar = tqdm(total=count, unit="trace", desc="generate", file=env.stderr, disable=None)
    kept = []
    duration = None if args.duration in (None, float("inf")) else args.duration
    try:
        for trace in generate.stream(sampler, request, count=count, duration_s=duration, rate=args.rate,
                                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                     start_time_ns=args.start_time, round_size=args.batch_size, summary=summary,
                                     attributes=not args.no_attributes, pool=pool):
            if incident is not None:
                delayed = incident.apply(trace)  # the trace itself when this one is not hit
                if delayed is not trace:
                    trace = delayed
                    incident_range += [trace.start_ns, trace.end_ns]
            if sender is not None:
                sender.send([trace])
            if args.out is not None:
                kept.append(trace)
            bar.update(1)
    except KeyboardInterrupt:  # an endless run ends here: what was generated is still sent and written
        print("otel-tracegen: interrupted; flushing what was generated", file=env.stderr)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        counts = sender.close() if sender is not None else None
    if incident is not None:
        hit = len(incident_range) // 2
        label = incident.label() | {"traces_hit": hit, "traces": summary.traces,
                                    "start": min(incident_range, default=None), "end": max(incident_range, default=None)}
        print(f"incident: {incident.delay_ms:g} ms injected at {incident.service} in {hit} of {summary.traces} traces",
              file=env.stderr)
        if args.incident_label is not None:
            args.incident_label.write_text(json.dumps(label, indent=1) + "\n")
    if args.out is not None:
        from .formats import write_traces

        write_traces(args.format, kept, args.out)
        print(f"wrote {len(kept)} traces to {args.out} ({args.format})", file=env.stderr)
    print(summary.line() + "; entry services: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_entry.items()))
          + f"; decoded on {lm.device} in {dtype}"
          + (f" by {workers} workers of {args.threads or 1} torch thread(s)" if pool is not None
             else f" with {threads.describe()}" if str(lm.device) == "cpu" else ""),
          file=env.stderr)  # fmt: skip
    if sampler.bpe is not None:  # a --base-model run: how often the model's own values had to be resampled
        print(f"base-model values: {sampler.bpe.stats.line()}", file=env.stderr)
    ok = summary.valid == summary.traces
    if counts is not None:
        where = otlp.endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"
        print(f"OTLP ({otlp.protocol}, {sender.kind} sender) to {where}: {counts.sent_spans} spans delivered, "
              f"{counts.failed_spans} failed"
              + (f" in {counts.failed_batches} batches" if counts.failed_batches else "")
              + (f" ({counts.first_error})" if counts.first_error else ""), file=env.stderr)
        ok = ok and counts.failed_spans == 0
    return ExitStatus.SUCCESS if ok else ExitStatus.INVALID


_MODEL = {"info": cmd_model_info, "catalog": cmd_model_catalog}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
