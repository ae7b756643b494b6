"""``otel-tracegen generate`` and ``otel-tracegen replay``: their flags and what they run.

Learn once, replay many: ``generate --count N --out LIB`` writes a library with the model (about 100 spans/s on
two cores); ``replay LIB --rate R`` sends it at line rate for as long as asked. Both share the output, traffic
and attribute flags (:mod:`.options`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..report import ReadReport, UserError
from .options import (add_output_arguments, add_traffic_arguments, duration, extra_attributes, otlp_line,
                      otlp_settings, positive_int, shape_from_args)  # fmt: skip

SUCCESS, INVALID = 0, 1  # the CLI's ExitStatus values
REPLAY_WORKERS = 4  # sender threads of a replay: one connection each (docs/replay.md, "One connection per sender")


def _include_call(text: str):
    """``A -> B`` or ``A -> B:KIND`` (the callee's span kind)."""
    from ..encoding import Include
    from ..trace import SpanKind

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


# --- generate -------------------------------------------------------------------------------------------------


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--model", type=Path, help="model directory (default: the shipped model/)")
    g.add_argument("--adapter", default="auto", help="instruct (default when present), none, or another adapter")
    g.add_argument("--count", "--traces", dest="count", type=positive_int,
                   help="traces to generate (default 10, or all --duration allows); --traces is telemetrygen's name")
    w = g.add_argument_group("what to generate (each left open is the model's choice)")
    w.add_argument("--service", help="entry service (the root span's)")
    w.add_argument("--operation", help="entry operation (needs --service)")
    w.add_argument("--entries", choices=("data", "model"), default="data",
                   help="data (default): without --service, draw the entry service from the training mix, and "
                        "without --calls/--depth, the entry operation, calls, depth, latency and instructions (high "
                        "latency, an uncommon call) of a training trace entered there; model: let the model choose "
                        "the entry and size (no latency or instructions are drawn)")
    w.add_argument("--calls", type=positive_int, help="spans per trace, root included; met exactly")
    w.add_argument("--depth", type=positive_int, help="span levels per trace; met exactly")
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
    from ..sampling.engine import DEFAULT_ATTEMPTS  # light: the engine imports torch only to decode

    d.add_argument("--attempts", type=positive_int, default=DEFAULT_ATTEMPTS,
                   help="draws per step at most: a step is kept with the model's odds of having written it without "
                        f"the grammar's masks, else drawn again (default {DEFAULT_ATTEMPTS}; 1: keep every first "
                        "draw, faster, less realistic)")
    d.add_argument("--seed", type=int, default=0, help="same seed, same options: the same traces (default 0)")
    d.add_argument("--batch-size", type=positive_int, default=256, help="pending steps decoded together")
    d.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    d.add_argument("--threads", type=positive_int,
                   help="CPU threads for torch (default: the CPUs this process may use, by affinity and cgroup "
                        "quota or OTEL_TRACEGEN_CPUS, less those other processes keep busy at start)")
    d.add_argument("--decode-workers", type=positive_int, metavar="N",
                   help="processes decoding rounds of --batch-size traces side by side, --threads torch threads "
                        "each (default on a CPU: one per CPU --threads would use, when the run has more than one "
                        "round; else 1)")
    d.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and activations: auto = bfloat16 on a GPU, or on a CPU where it measured clearly "
                        "faster than float32 (timed once per machine, remembered in ~/.cache/otel-tracegen), else "
                        "float32 (default auto)")
    add_output_arguments(g, verb="generated")
    g.add_argument("--no-attributes", action="store_true",
                   help="spans without protocol attributes (http.*, rpc.*, db.*: learned, else inferred from names)")
    add_traffic_arguments(g, span_rate=False)


def _behind(env, rate: float):
    def say(achieved: float) -> None:
        print(f"otel-tracegen: decoding cannot keep --rate {rate:g} traces/s: {achieved:,.1f} traces/s so far. For "
              f"line rate, generate a library once (generate --count N --out lib.jsonl) and replay it "
              f"(otel-tracegen replay lib.jsonl --rate {rate:g})", file=env.stderr)  # fmt: skip

    return say


def run_generate(args, env) -> int:
    if args.operation and not args.service:
        raise UserError("--operation needs --service (the entry service it belongs to)")
    otlp = otlp_settings(args)
    if args.out is None and otlp is None:
        raise UserError("say where the traces go: --out FILE, --otlp-endpoint HOST:PORT (or OTEL_EXPORTER_OTLP_ENDPOINT)")
    shape = shape_from_args(args, args.rate)
    extra = extra_attributes(args)
    count = args.count if args.count is not None else (None if args.duration is not None else 10)
    incident = None
    if args.inject_latency:
        from ..incident import LatencyIncident

        incident = LatencyIncident.parse(args.inject_latency, share=args.inject_share, seed=args.seed)
    elif args.incident_label or args.inject_share != 1.0:
        raise UserError("--inject-share and --incident-label go with --inject-latency SERVICE=MS")
    if count is None and args.duration == float("inf") and args.out is not None:
        raise UserError("--duration inf never ends, so the file would never be written: give --count or a duration")
    from ..cpu import configure_torch
    from ..lm.model import load_model, resolve_dtype_name
    from ..sampling import TraceRequest, TraceSampler
    from . import generate

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
        from .sender import make_sender

        sender = make_sender(otlp, sender=args.otlp_sender, workers=args.workers)
        if sender.note:
            print(f"otel-tracegen: {sender.note}", file=env.stderr)
    from tqdm import tqdm

    from ..sampling.pool import DecodePool, SamplerSpec, auto_workers

    dtype = resolve_dtype_name(args.dtype, str(lm.device))  # what "auto" chose, for the summary
    rate = shape.mean_rate if shape is not None else None
    rounds = None if count is None else sum(1 for _ in generate.round_sizes(count, args.batch_size, rate))
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
    limit = None if args.duration in (None, float("inf")) else args.duration
    try:
        for trace in generate.stream(sampler, request, count=count, duration_s=limit, shape=shape,
                                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                     start_time_ns=args.start_time, round_size=args.batch_size, summary=summary,
                                     attributes=not args.no_attributes, pool=pool, extra=extra,
                                     on_behind=_behind(env, rate) if rate else None):  # fmt: skip
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
        from ..formats import write_traces

        write_traces(args.format, kept, args.out)
        print(f"wrote {len(kept)} traces to {args.out} ({args.format})", file=env.stderr)
    from .summary import top_counts

    print(summary.line() + f"; entry services: {top_counts(summary.by_entry)}; decoded on {lm.device} in {dtype}"
          + (f" by {workers} workers of {args.threads or 1} torch thread(s)" if pool is not None
             else f" with {threads.describe()}" if str(lm.device) == "cpu" else ""),
          file=env.stderr)  # fmt: skip
    if sampler.bpe is not None:  # a --base-model run: how often the model's own values had to be resampled
        print(f"base-model values: {sampler.bpe.stats.line()}", file=env.stderr)
    ok = summary.valid == summary.traces
    if counts is not None:
        print(otlp_line(otlp, sender, counts), file=env.stderr)
        ok = ok and counts.failed_spans == 0
    return SUCCESS if ok else INVALID


# --- replay ---------------------------------------------------------------------------------------------------


def add_replay_arguments(r: argparse.ArgumentParser) -> None:
    from ..formats import FORMATS

    r.add_argument("library", nargs="+", metavar="LIBRARY",
                   help="trace files or directories: a library written by generate --out, or captured traces in any "
                        "format 'otel-tracegen formats' lists")
    r.add_argument("--from", dest="library_format", choices=list(FORMATS),
                   help="the library's format (default: guessed per file)")
    r.add_argument("--count", "--traces", dest="count", type=positive_int,
                   help="traces to send, then stop (default: until --duration, or until interrupted)")
    s = r.add_argument_group("which traces")
    s.add_argument("--service", help="only traces entered at this service")
    s.add_argument("--operation", help="only traces entered at this operation")
    s.add_argument("--weights", action="append", default=[], metavar="ENTRY=W,...",
                   help="reweight entry services: each trace's share times W (0 leaves an entry out; unnamed: 1)")
    s.add_argument("--only-valid", action="store_true",
                   help="leave out the traces the validator flags (captured traces replay as captured by default)")
    m = r.add_argument_group("how they are replayed")
    m.add_argument("--jitter", type=float, default=0.0, metavar="F",
                   help="vary durations and gaps by up to a factor 1+F, every child staying where it was relative to "
                        "its parent (default 0: times as in the library)")
    m.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson",
                   help="Poisson arrivals at the rate (default), or evenly spaced")
    m.add_argument("--seed", type=int,
                   help="same seed, same library, same options: same ids and draws (default: a fresh one, printed, so "
                        "that two replays into one backend never share ids)")
    m.add_argument("--processes", type=positive_int, default=1, metavar="N",
                   help="processes replaying a share of the rate each (one per core to scale; default 1)")
    m.add_argument("--batch-spans", type=positive_int, default=512, help="spans per OTLP request at most (default 512)")
    m.add_argument("--report-every", type=duration, default=10.0, help="seconds between progress lines (default 10s)")
    m.add_argument("--json", action="store_true", help="print the closing summary as JSON on stdout as well")
    add_output_arguments(r, verb="replayed", workers=REPLAY_WORKERS)
    add_traffic_arguments(r, span_rate=True)


def run_replay(args, env) -> int:
    from .library import load_library, parse_weights
    from .replay import replay

    if args.rate is not None and args.span_rate is not None:
        raise UserError("give --rate (traces/s) or --span-rate (spans/s), not both")
    otlp = otlp_settings(args)
    if args.out is None and otlp is None:  # before reading a library that may be large
        raise UserError("say where the traces go: --out FILE, --otlp-endpoint HOST:PORT (or OTEL_EXPORTER_OTLP_ENDPOINT)")
    extra = extra_attributes(args)
    report = ReadReport()
    library = load_library(args.library, fmt=args.library_format, extra=extra, service=args.service,
                           operation=args.operation, only_valid=args.only_valid,
                           weights=parse_weights(args.weights) if args.weights else None, report=report)  # fmt: skip
    for line in report.problem_lines():
        print(line, file=env.stderr)
    rate = args.rate if args.span_rate is None else args.span_rate / library.mean_spans
    shape = shape_from_args(args, rate)
    from .summary import top_counts

    print(f"otel-tracegen: library {library.digest}: {len(library):,} traces ({library.mean_spans:.1f} spans each on "
          f"average) from {len(library.files)} files; {library.flagged:,} flagged by the validator; entries: "
          f"{top_counts(library.entry_mix())}; traffic: {shape.describe() if shape else 'as fast as possible'}",
          file=env.stderr)  # fmt: skip
    summary = replay(library, shape=shape, duration_s=None if args.duration == math.inf else args.duration,
                     count=args.count, progress=lambda s: print(s.progress_line(), file=env.stderr, flush=True),
                     seed=args.seed, start_time_ns=args.start_time, jitter=args.jitter,
                     poisson=args.arrivals == "poisson", otlp=otlp, sender=args.otlp_sender, workers=args.workers,
                     out=args.out, out_format=args.format, processes=args.processes, max_batch_spans=args.batch_spans,
                     report_every_s=args.report_every, extra=extra)  # fmt: skip
    if summary.note:
        print(f"otel-tracegen: {summary.note}", file=env.stderr)
    for line in summary.lines():
        print(line, file=env.stderr)
    if args.out is not None:
        print(f"wrote {summary.traces:,} traces to {args.out} ({args.format})", file=env.stderr)
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True), file=env.stdout)
    return SUCCESS if summary.delivered else INVALID

