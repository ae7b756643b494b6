"""Adapter throughput on the whole Nezha TrainTicket set (517,503 spans in 137 gzipped minute files).

Measures, in spans per second and against a baseline taken in the same run on the same data:

=================================  =========================================================================
span CSV read (gzip)               ``spancsv.read`` -> canonical traces, vs. a bare ``csv.reader`` over the
                                   same gzipped files doing nothing per row (the ceiling for a Python reader)
OTLP protobuf write                ``otlp_proto.write`` of those traces, vs. ``SerializeToString`` of the same
                                   ``ExportTraceServiceRequest`` messages (parsed from what was written)
OTLP protobuf read                 ``otlp_proto.read`` of that file -> canonical traces, vs.
                                   ``ParseFromString`` of the same request bytes
=================================  =========================================================================

The OTLP file is uncompressed and holds length-delimited requests of ``--batch-spans`` spans (whole traces
each, as an exporter's batches), so protobuf, not gzip, is what is measured. Every measurement runs
single-threaded in this process (one core); each is repeated ``--repeat`` times after a ``gc.collect()`` and
the fastest run is reported (timeit's convention: slower runs measure the machine's noise, not the code).

Usage::

    python3 benchmarks/bench_adapters.py [--data DIR] [--repeat 3] [--batch-spans 1000]

``--data`` defaults to ``../shared/datasets/nezha-trainticket/traces`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import csv
import gc
import gzip
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "nezha-trainticket" / "traces"
GOAL_SPANCSV = 200_000  # spans/s: the stated goal for span CSV -> canonical traces, gzip included

sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from otel_tracegen.formats import expand_paths, spancsv  # after the sys.path insert
from otel_tracegen.report import ReadReport


@dataclass
class Row:
    operation: str
    spans: int
    seconds: float
    baseline: str
    baseline_seconds: float

    @property
    def rate(self) -> float:
        return self.spans / self.seconds

    @property
    def baseline_rate(self) -> float:
        return self.spans / self.baseline_seconds


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """The fastest of ``repeat`` runs of ``fn`` (each after a full collection) and the last result."""
    best = float("inf")
    result = None
    for _ in range(repeat):
        result = None  # drop the previous result before collecting, so it is not scanned or kept twice
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def csv_ceiling(files: list[Path]) -> int:
    """Rows seen by a bare csv.reader over the gzipped files, opened as spancsv opens them; no work per row."""
    rows = 0
    for path in files:
        with open(path, "rb") as raw:
            binary = gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw
            with io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline="") as fh:
                for _ in csv.reader(fh):
                    rows += 1
        rows -= 1  # the header
    return rows


def machine() -> str:
    cpu = platform.processor()
    if not cpu or cpu in ("x86_64", "aarch64", "arm", "i386"):
        try:  # platform.processor() is often just the architecture on Linux
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
                    break
        except OSError:
            pass
    return (
        f"{cpu or platform.machine()}, {os.cpu_count()} CPUs (benchmark uses 1 thread), "
        f"Python {platform.python_version()} ({platform.python_implementation()}), {platform.system()} {platform.release()}"
    )


def bench_spancsv(files: list[Path], repeat: int) -> tuple[Row, list]:
    base_s, base_rows = best_time(lambda: csv_ceiling(files), repeat)
    report = ReadReport()

    def read():
        report.__init__()  # fresh counters per run
        return spancsv.read(files, report)

    secs, traces = best_time(read, repeat)
    spans = sum(len(t) for t in traces)
    if report.problems:
        print(f"note: {len(report.problems)} problems while reading, e.g. {report.problems[0]}", file=sys.stderr)
    if base_rows != spans:
        print(f"note: csv.reader saw {base_rows} rows, spancsv kept {spans} spans", file=sys.stderr)
    return Row("span CSV read (gzip) -> traces", spans, secs, "csv.reader, nothing per row", base_s), traces


def bench_otlp(traces: list, repeat: int, batch_spans: int, workdir: Path) -> list[Row]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from otel_tracegen.formats import otlp_proto

    spans = sum(len(t) for t in traces)
    path = workdir / "trainticket.pb"
    write_s, _ = best_time(lambda: otlp_proto.write(traces, path, batch_spans=batch_spans), repeat)
    data = path.read_bytes()
    requests = otlp_proto.split_requests(data)

    def parse():
        out = []
        for body in requests:
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(body)
            out.append(msg)
        return out

    parse_s, messages = best_time(parse, repeat)
    serialize_s, _ = best_time(lambda: [m.SerializeToString() for m in messages], repeat)
    messages = None  # free the parsed messages before the timed reads

    report = ReadReport()

    def read():
        report.__init__()
        return otlp_proto.read([path], report)

    read_s, back = best_time(read, repeat)
    read_spans = sum(len(t) for t in back)
    if read_spans != spans or report.problems:
        print(f"note: OTLP read gave {read_spans} spans of {spans}; problems: {report.problems[:3]}", file=sys.stderr)
    size = f"{len(data) / 2**20:.0f} MiB, {len(requests)} requests"
    return [
        Row(f"OTLP protobuf write ({size})", spans, write_s, "SerializeToString, same requests", serialize_s),
        Row("OTLP protobuf read -> traces", spans, read_s, "ParseFromString, same requests", parse_s),
    ]


def print_table(rows: list[Row]) -> None:
    headers = ("operation", "spans", "seconds", "spans/s", "baseline", "baseline spans/s", "ratio")
    body = [
        (
            r.operation,
            f"{r.spans:,}",
            f"{r.seconds:.2f}",
            f"{r.rate:,.0f}",
            r.baseline,
            f"{r.baseline_rate:,.0f}",
            f"{r.rate / r.baseline_rate:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    right = {1, 2, 3, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(line(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"span CSV directory (default {DEFAULT_DATA})")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest counts (default 3)")
    parser.add_argument("--batch-spans", type=int, default=1000, help="spans per OTLP request (default 1000)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        sys.exit(
            f"no span CSV data at {args.data}: pass --data DIR (the Nezha TrainTicket traces, "
            "shared/datasets/nezha-trainticket/traces next to the repository)"
        )
    files = expand_paths([args.data])
    print(f"data: {args.data} ({len(files)} files)")
    print(f"machine: {machine()}")
    print(f"runs: best of {args.repeat}, single-threaded\n")

    row, traces = bench_spancsv(files, args.repeat)
    rows = [row]
    try:
        import otel_tracegen.formats.otlp_proto  # noqa: F401
    except ImportError as exc:
        print(f"OTLP protobuf skipped: {exc}", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_otlp(traces, args.repeat, args.batch_spans, Path(tmp))
    print_table(rows)
    verdict = "meets" if rows[0].rate >= GOAL_SPANCSV else "MISSES"
    print(f"\nspan CSV read {verdict} the goal of {GOAL_SPANCSV:,} spans/s on one core ({rows[0].rate:,.0f}).")
    print(f"{len(traces):,} traces.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
