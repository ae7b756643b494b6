"""Replay at line rate: ``otel-tracegen replay`` into a real collector (rotel, from PyPI, dropping what it
receives) on loopback. Every figure comes from the command as a user runs it (a subprocess, its ``--json``
summary), spans counted as the collector acknowledged them.

==========  =================================================================================================
ceiling     one process pinned to one core (its sender and grpc threads too), rotel on the other, as fast as
            possible for ``--seconds``: spans/s delivered
baseline    the same command with ``--otlp-sender sdk``: the same traces made as canonical spans and sent through
            the OpenTelemetry SDK's OTLP exporter (``ReadableSpan`` -> protobuf) in the same run: the ratio
processes   ``--processes 2``: both cores (rotel beside them), as fast as possible
accuracy    at ``--shares`` of the single-process ceiling (default 50 % and 80 %), one process pinned as above:
            achieved vs requested rate (spans/s delivered), and the lag at the end and at most
memory      ``--rss-minutes`` at the first share: the replay process's RSS sampled every 5 s; flat means the
            last minute's mean within 2 MiB of the second minute's (the first holds the library's loading)
==========  =================================================================================================

The library: files given on the command line, else one written by the shipped model once
(``generate --count 1000 --seed 1 --out``), kept in ``$XDG_CACHE_HOME/otel-tracegen/replay-library.jsonl``
for later runs.

Usage::

    python3 benchmarks/bench_replay.py [LIBRARY...] [--seconds 60] [--sdk-seconds 20] [--shares 0.5,0.8]
        [--rss-minutes 10] [--json benchmarks/results/replay.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from otel_tracegen.loopback import start_rotel  # noqa: E402 - after the path
from otel_tracegen.machine import describe, recorded_path, recorded_settings  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEFAULT_LIBRARY = CACHE / "otel-tracegen" / "replay-library.jsonl"


def _pin(cores: set[int] | None):
    return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


def replay(library: list[str], port: int, args: list[str], cores: set[int] | None = None,
           rss_every_s: float | None = None) -> tuple[dict, list[tuple[float, float]]]:  # fmt: skip
    """One ``otel-tracegen replay`` run: its JSON summary, and (when asked) its RSS over time (s, MiB)."""
    cmd = [sys.executable, "-m", "otel_tracegen", "replay", *library, "--otlp-endpoint", f"127.0.0.1:{port}",
           "--otlp-insecure", "--json", "--report-every", "1h", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_pin(cores),
                            cwd=ROOT)  # fmt: skip
    samples: list[tuple[float, float]] = []
    if rss_every_s:
        def watch() -> None:
            t0 = time.time()
            while proc.poll() is None:
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            samples.append((time.time() - t0, int(line.split()[1]) / 1024))
                except OSError:
                    return
                time.sleep(rss_every_s)

        threading.Thread(target=watch, daemon=True).start()
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"replay failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out), samples


def make_library() -> list[str]:
    if not DEFAULT_LIBRARY.is_file():
        print(f"writing a library with the shipped model: {DEFAULT_LIBRARY}", file=sys.stderr)
        DEFAULT_LIBRARY.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "otel_tracegen", "generate", "--count", "1000", "--seed", "1", "--out",
                        str(DEFAULT_LIBRARY)], check=True, cwd=ROOT)  # fmt: skip
    return [str(DEFAULT_LIBRARY)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("library", nargs="*")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--sdk-seconds", type=float, default=20.0)
    ap.add_argument("--shares", default="0.5,0.8", help="shares of the ceiling to check the rate at")
    ap.add_argument("--rss-minutes", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    library = args.library or make_library()
    cores = sorted(os.sched_getaffinity(0))
    one, other = {cores[0]}, {cores[-1]}
    recorded = ([recorded_path(p, ROOT) for p in args.library] if args.library
                else "written by the shipped model: generate --count 1000 --seed 1")  # fmt: skip
    result: dict = {"machine": describe(), "settings": recorded_settings(vars(args) | {"library": None}, ROOT),
                    "library": recorded}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_rotel(Path(tmp), cpus=other if len(cores) > 1 else None)
        try:
            seconds = ["--duration", f"{args.seconds:g}"]
            ceiling, _ = replay(library, port, seconds, one)
            sdk, _ = replay(library, port, ["--duration", f"{args.sdk_seconds:g}", "--otlp-sender", "sdk"], one)
            result["ceiling"], result["sdk"] = ceiling, sdk
            c, b = ceiling["sent_spans"] / ceiling["seconds"], sdk["sent_spans"] / sdk["seconds"]
            print(f"ceiling   {c:12,.0f} spans/s, one process on one core (rotel on another)   vs the SDK "
                  f"exporter's path {b:10,.0f} spans/s: {c / b:.1f}x")
            two, _ = replay(library, port, [*seconds, "--processes", "2"])  # unpinned: every core
            result["processes_2"] = two
            print(f"processes {two['sent_spans'] / two['seconds']:12,.0f} spans/s with --processes 2 on "
                  f"{len(cores)} cores (rotel beside them); one process: {c:,.0f}")
            result["accuracy"] = []
            for share in (float(x) for x in args.shares.split(",")):
                span_rate = share * c
                run, _ = replay(library, port, [*seconds, "--span-rate", f"{span_rate:.0f}"], one)
                got = run["sent_spans"] / run["seconds"]
                traces = 100 * run["traces_per_s"] / run["requested_traces_per_s"]
                result["accuracy"].append({"share": share, "requested_spans_per_s": span_rate, "summary": run})
                print(f"rate      {share:.0%} of the ceiling: asked {span_rate:10,.0f} spans/s, delivered "
                      f"{got:10,.0f} ({100 * got / span_rate:.2f} %); traces {traces:.2f} % of asked; "
                      f"lag {1e3 * run['lag_s']:.0f} ms at the end, {1e3 * run['max_lag_s']:.0f} ms at most")
            if args.rss_minutes > 0:
                share = float(args.shares.split(",")[0])
                run, rss = replay(library, port, ["--duration", f"{60 * args.rss_minutes:g}", "--span-rate",
                                                  f"{share * c:.0f}"], one, rss_every_s=5.0)  # fmt: skip
                start = 60 if rss[-1][0] > 180 else 5  # after the first minute: loading the library peaks there
                first = [m for t, m in rss if start <= t < start + 60]
                last = [m for t, m in rss if t >= rss[-1][0] - 60]
                a, z = sum(first) / len(first), sum(last) / len(last)
                result["rss"] = {"summary": run, "samples_mib": rss, "first_minute_mib": a, "last_minute_mib": z}
                print(f"memory    {args.rss_minutes:g} min at {share * c:,.0f} spans/s: RSS {a:.1f} MiB in the minute "
                      f"from {start} s, {z:.1f} MiB in the last ({z - a:+.1f}); max {max(m for _, m in rss):.1f}; "
                      f"{run['sent_spans']:,} spans delivered, {run['failed_spans']} failed")
        finally:
            proc.kill()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
