"""The infill receiver's write-ahead log: the former hand-written segment-file queue against SQLite, one run.

    python3 benchmarks/bench_wal.py [--seconds 5] [--producers 1,4,16] [--repeats 3] [--hold-s 1]
        [--outbound 3000] [--recovery 1000,10000] [--bodies 512] [--seed 0] [--dir /tmp] [--baseline git|PATH]
        [--json benchmarks/results/wal.json]

Issue 21, item 5: keep the hand-written log (838 lines) only if it is at least 2x faster than SQLite at the same
durability. The two implementations:

- **hand-written**: ``otel_tracegen/infill/queue.py`` as it was before the change. ``--baseline git`` (the
  default) loads it from the newest commit whose file still has the segment format; ``--baseline PATH`` loads a
  copy.
- **sqlite**: the package's ``otel_tracegen.infill.queue.DiskQueue`` (stdlib ``sqlite3``: WAL,
  ``synchronous=FULL`` on appends, one transaction per ``append_many``).

The workload is the receiver's:

- **Bodies.** Real OTLP/protobuf ``ExportTraceServiceRequest`` bodies, encoded with ``otlp_proto.dumps`` from
  whole traces of the Nezha Online Boutique span CSVs in ``../shared`` (else ``tests/testdata/spancsv``). Target
  sizes are log-normal: median 32 KB, sigma 1, clipped to 1 KB..1 MB, plus 2 % between 512 KB and 1 MB. Whole
  traces are added until a body reaches its target. A pool of ``--bodies`` of them is cycled.
- **Inbound log** (``fsync=True``). 1, 4 and 16 producer threads append through the receiver's own
  ``GroupCommit``, so requests that arrive during an fsync share the next one: one ``append_many``, one fsync.
  An acker thread acks each record ``--hold-s`` (x0.5 to x1.5) after its append, in batches, out of order, as
  traces are delivered. Each run lasts ``--seconds`` and counts appends/s, MB/s, and p50/p99 of the latency of
  one ``GroupCommit.append``. That latency is what a client's request waits for the log. Two workloads: the
  **queue** alone (producers do nothing else, so the log is saturated), and the **receiver path**, where each
  producer first decodes its request with ``wire.decode`` and reads ``stats().bytes``, as
  ``InfillService.export`` does before it logs a request.
- **Outbound queue** (``fsync=False``). One thread appends batches of 1 to 4 bodies, as ``_release`` does. The
  forwarder's loop ``next(after, timeout)`` + ``ack`` reads them in order on another thread. Records/s from the
  first append until the last is acked.
- **Recovery.** A child process appends 2N records (``fsync=False``, the same files), acks N of them at random
  and exits without closing (``os._exit``, as a crash would). The open that follows is timed. So is a second open
  after a clean close. The page cache is warm both times.

Runs alternate between the implementations, each in a fresh directory under ``--dir`` (which sets the file
system measured); medians of ``--repeats`` runs are reported. Load on the machine skews everything: check
``uptime`` first (each run's load average is kept in the JSON). The last line applies the issue's rule to the
queue-alone rows: keep the hand-written log only if it is at least 2x as fast with every producer count. Writes
the figures, every run and the machine (``lscpu``, ``df -T``) to ``--json``.
"""

from __future__ import annotations

import argparse
import heapq
import importlib
import importlib.util
import json
import math
import os
import pickle
import queue
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from otel_tracegen.machine import describe, recorded_path, recorded_settings  # noqa: E402 - after the path

SHARED = ROOT.parent / "shared" / "datasets" / "nezha-onlineboutique" / "traces"
QUEUE_FILE = "otel_tracegen/infill/queue.py"
PACKAGE = "otel_tracegen.infill.queue"


# -- the two implementations ------------------------------------------------------------------------------------


def baseline_source(spec: str, workdir: Path) -> tuple[Path, str]:
    """The hand-written queue as a file in ``workdir``, and where it came from."""
    if spec != "git":
        return Path(spec), spec
    log = subprocess.run(["git", "-C", str(ROOT), "log", "--format=%H", "--", QUEUE_FILE], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    for commit in log:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{QUEUE_FILE}"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        if 'MAGIC = b"OTQ1"' in src:  # the segment-file format
            path = workdir / "segment_queue.py"
            path.write_text(src)
            return path, f"git {commit[:12]}:{QUEUE_FILE}"
    sys.exit(f"no commit has the segment-file {QUEUE_FILE}: give --baseline PATH (a copy of it)")


def load_impl(spec: str):
    """``file:PATH`` (a standalone copy, loaded under its own name) or ``module:NAME``."""
    kind, _, where = spec.partition(":")
    if kind == "module":
        return importlib.import_module(where)
    name = "bench_wal_" + Path(where).stem
    if name in sys.modules:
        return sys.modules[name]
    mod_spec = importlib.util.spec_from_file_location(name, where)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses look the module up
    mod_spec.loader.exec_module(module)
    return module


# -- the workload -------------------------------------------------------------------------------------------------


def target_sizes(n: int, rng: random.Random) -> list[int]:
    out = []
    for _ in range(n):
        if rng.random() < 0.02:
            out.append(rng.randint(512 << 10, 1 << 20))
        else:
            out.append(int(min(max(rng.lognormvariate(math.log(32 << 10), 1.0), 1 << 10), 1 << 20)))
    return out


def request_bodies(n: int, seed: int, sources: list[Path]) -> list[bytes]:
    """``n`` OTLP/protobuf request bodies of whole traces, of the target sizes above."""
    from otel_tracegen.formats import otlp_proto, read_traces

    traces = [t for t in read_traces("spancsv", sources) if t.spans]
    sizes = [len(otlp_proto.dumps(t.spans)) for t in traces]
    rng = random.Random(seed)
    bodies, i = [], rng.randrange(len(traces))
    for target in target_sizes(n, rng):
        spans, size = [], 0
        while size < target:
            spans.extend(traces[i].spans)
            size += sizes[i]
            i = (i + 1) % len(traces)
        bodies.append(otlp_proto.dumps(spans))
    return bodies


def default_sources() -> list[Path]:
    files = sorted(SHARED.glob("*_trace.csv.gz"))[:2] if SHARED.is_dir() else []
    return files or [ROOT / "tests" / "testdata" / "spancsv"]


# -- measurements ---------------------------------------------------------------------------------------------------


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def run_inbound(impl, directory: Path, bodies: list[bytes], producers: int, seconds: float, hold_s: float,
                seed: int, receiver_path: bool = False) -> dict:
    """``producers`` threads appending through the receiver's GroupCommit for ``seconds``; acks out of order.
    ``receiver_path``: each request is first decoded and the log's size checked, as ``InfillService.export``
    does before it logs a request."""
    from otel_tracegen.infill import wire
    from otel_tracegen.infill.service import GroupCommit

    q = impl.DiskQueue(directory, name="inbound")
    log = GroupCommit(q)
    done: queue.SimpleQueue = queue.SimpleQueue()  # (seq, when appended) for the acker
    latencies: list[list[float]] = [[] for _ in range(producers)]
    nbytes = [0] * producers
    commits = []
    original = q.append_many

    def counting(payloads):
        commits.append(len(payloads))
        return original(payloads)

    q.append_many = counting  # counts group commits (GroupCommit calls it once per batch)
    stop = threading.Event()

    def produce(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while not stop.is_set():
            body = bodies[rng.randrange(len(bodies))]
            t = time.perf_counter()
            if receiver_path:
                wire.decode(body)
                q.stats().bytes  # noqa: B018 - the service's queue-full check
            seq = log.append(body)
            latencies[k].append(time.perf_counter() - t)
            nbytes[k] += len(body)
            done.put((seq, time.monotonic()))

    def acker() -> None:  # delivered traces: acked after the buffer's wait, in whatever order they finish
        rng = random.Random(seed)
        due: list[tuple[float, int]] = []
        finished = False
        while not finished or due:
            timeout = max(0.0, due[0][0] - time.monotonic()) if due else 0.05
            try:
                item = done.get(timeout=min(timeout, 0.05))
                if item is None:
                    finished = True
                else:
                    heapq.heappush(due, (item[1] + hold_s * rng.uniform(0.5, 1.5), item[0]))
            except queue.Empty:
                pass
            now = time.monotonic()
            batch = []
            while due and (due[0][0] <= now or finished):
                batch.append(heapq.heappop(due)[1])
            if batch:
                q.ack_many(batch)

    ack_thread = threading.Thread(target=acker)
    ack_thread.start()
    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    done.put(None)
    ack_thread.join()
    left = len(q)
    q.close()
    lat = [x for xs in latencies for x in xs]
    return {"appends": len(lat), "bytes": sum(nbytes), "seconds": elapsed, "appends_per_s": len(lat) / elapsed,
            "mb_per_s": sum(nbytes) / elapsed / 1e6, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "commits": len(commits), "records_per_commit": len(lat) / max(1, len(commits)), "left": left}  # fmt: skip


def run_outbound(impl, directory: Path, bodies: list[bytes], count: int, seed: int) -> dict:
    """One producer appending batches of 1-4 bodies (fsync off); one forwarder loop reading in order and acking."""
    q = impl.DiskQueue(directory, fsync=False, name="outbound")
    rng = random.Random(seed)
    batches, n = [], 0
    while n < count:
        k = min(rng.randint(1, 4), count - n)
        batches.append([bodies[rng.randrange(len(bodies))] for _ in range(k)])
        n += k
    lat: list[float] = []
    got = []

    def forward() -> None:
        after = -1
        while len(got) < count:
            item = q.next(after, timeout=0.2)
            if item is None:
                continue
            q.ack(item[0])
            after = item[0]
            got.append(len(item[1]))

    consumer = threading.Thread(target=forward)
    t0 = time.perf_counter()
    consumer.start()
    for batch in batches:
        t = time.perf_counter()
        q.append_many(batch)
        lat.append(time.perf_counter() - t)
    consumer.join()
    elapsed = time.perf_counter() - t0
    q.close()
    return {"records": count, "bytes": sum(got), "seconds": elapsed, "records_per_s": count / elapsed,
            "mb_per_s": sum(got) / elapsed / 1e6, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3}


def fill_and_crash(spec: str, directory: str, n: int, seed: int, bodies_file: str) -> None:
    """(Child process) 2n appends, n random acks, then exit without closing: what a crash leaves."""
    impl = load_impl(spec)
    bodies = pickle.loads(Path(bodies_file).read_bytes())
    rng = random.Random(seed)
    q = impl.DiskQueue(directory, fsync=False, name="inbound")
    seqs = []
    while len(seqs) < 2 * n:
        seqs += q.append_many([bodies[rng.randrange(len(bodies))] for _ in range(min(8, 2 * n - len(seqs)))])
    q.ack_many(rng.sample(seqs, n))
    sys.stdout.flush()
    os._exit(0)


def run_recovery(spec: str, impl, directory: Path, n: int, seed: int, bodies_file: Path) -> dict:
    subprocess.run([sys.executable, __file__, "--fill", spec, str(directory), str(n), str(seed), str(bodies_file)],
                   check=True)  # fmt: skip
    disk = sum(p.stat().st_size for p in directory.iterdir())
    t = time.perf_counter()
    q = impl.DiskQueue(directory, name="inbound")
    crash = time.perf_counter() - t
    assert len(q) == n and q.stats().recovered == n, (len(q), n)
    q.close()
    t = time.perf_counter()
    q = impl.DiskQueue(directory, name="inbound")
    clean = time.perf_counter() - t
    assert len(q) == n
    q.close()
    return {"pending": n, "disk_bytes": disk, "open_after_crash_s": crash, "open_after_close_s": clean}


# -- reporting ------------------------------------------------------------------------------------------------------


def machine(directory: Path) -> dict:
    try:
        df = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True, timeout=10,
                            check=False).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        df = []
    fs = df[1].split() if len(df) > 1 else ["?", "?"]
    return {**describe(), "filesystem": f"{fs[1]} on {fs[0]}", "directory": str(directory),
            "sqlite": sqlite3.sqlite_version}


def median_runs(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each inbound run")
    ap.add_argument("--producers", default="1,4,16", help="producer threads, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hold-s", type=float, default=1.0, help="how long a record waits for its ack (x0.5-x1.5)")
    ap.add_argument("--outbound", type=int, default=3000, help="records through the outbound queue per run")
    ap.add_argument("--recovery", default="1000,10000", help="pending records left for the timed open")
    ap.add_argument("--bodies", type=int, default=512, help="distinct request bodies in the pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the queues are written")
    ap.add_argument("--baseline", default="git", help="the hand-written queue: git (default) or a copy's path")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "wal.json")
    ap.add_argument("--fill", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fill:
        spec, directory, n, seed, bodies_file = args.fill
        fill_and_crash(spec, directory, int(n), int(seed), bodies_file)
        return

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: the figures will be skewed", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-wal-", dir=args.dir))
    try:
        base_path, base_from = baseline_source(args.baseline, work)
        specs = {"hand-written": f"file:{base_path}", "sqlite": f"module:{PACKAGE}"}
        impls = {name: load_impl(spec) for name, spec in specs.items()}
        if hasattr(impls["sqlite"], "MAGIC"):
            sys.exit(f"{PACKAGE} is still the segment-file queue: nothing to compare it with")
        sources = default_sources()
        t0 = time.perf_counter()
        bodies = request_bodies(args.bodies, args.seed, sources)
        sizes = sorted(map(len, bodies))
        bodies_file = work / "bodies.pickle"
        bodies_file.write_bytes(pickle.dumps(bodies))
        print(f"{len(bodies)} OTLP request bodies from {', '.join(p.name for p in sources)} "
              f"({time.perf_counter() - t0:.1f} s): min {sizes[0] / 1e3:.1f} KB, median "
              f"{statistics.median(sizes) / 1e3:.1f} KB, mean {statistics.mean(sizes) / 1e3:.1f} KB, max "
              f"{sizes[-1] / 1e3:.0f} KB", flush=True)  # fmt: skip
        producers = [int(x) for x in args.producers.split(",") if x]
        modes = ("queue", "receiver path")
        order = list(specs)
        inbound: dict = {name: {m: {p: [] for p in producers} for m in modes} for name in specs}
        outbound: dict = {name: [] for name in specs}
        run_id = 0
        for r in range(args.repeats):
            for mode in modes:
                for p in producers:
                    for name in order if r % 2 == 0 else order[::-1]:
                        run_id += 1
                        res = run_inbound(impls[name], work / f"in-{run_id}", bodies, p, args.seconds, args.hold_s,
                                          args.seed + r, receiver_path=mode != "queue")  # fmt: skip
                        shutil.rmtree(work / f"in-{run_id}")
                        res["load"] = os.getloadavg()[0]
                        inbound[name][mode][p].append(res)
                        print(f"  {mode:13s} {name:12s} {p:2d} producers: {res['appends_per_s']:6.0f} appends/s "
                              f"{res['mb_per_s']:6.1f} MB/s  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms"
                              f"  {res['records_per_commit']:4.1f} records/commit  (load {res['load']:.2f})",
                              flush=True)  # fmt: skip
            for name in order if r % 2 == 0 else order[::-1]:
                run_id += 1
                res = run_outbound(impls[name], work / f"out-{run_id}", bodies, args.outbound, args.seed + r)
                shutil.rmtree(work / f"out-{run_id}")
                res["load"] = os.getloadavg()[0]
                outbound[name].append(res)
                print(f"  outbound      {name:12s}: {res['records_per_s']:6.0f} records/s {res['mb_per_s']:6.1f} MB/s"
                      f"  append p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms  (load {res['load']:.2f})",
                      flush=True)  # fmt: skip
        recovery: dict = {name: [] for name in specs}
        for n in [int(x) for x in args.recovery.split(",") if x]:
            for name in order:
                run_id += 1
                res = run_recovery(specs[name], impls[name], work / f"rec-{run_id}", n, args.seed, bodies_file)
                shutil.rmtree(work / f"rec-{run_id}")
                recovery[name].append(res)
                print(f"  recovery {name:12s} {n:6d} pending ({res['disk_bytes'] / 1e6:.0f} MB on disk): open after "
                      f"a crash {res['open_after_crash_s']:.3f} s, after a close {res['open_after_close_s']:.3f} s",
                      flush=True)  # fmt: skip
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    keys = ("appends_per_s", "mb_per_s", "p50_ms", "p99_ms", "records_per_commit")
    summary: dict = {"inbound": {}, "outbound": {}, "recovery": recovery}
    for name in specs:
        summary["inbound"][name] = {m: {p: {k: median_runs(runs, k) for k in keys} for p, runs in by_p.items()}
                                    for m, by_p in inbound[name].items()}  # fmt: skip
        summary["outbound"][name] = {k: median_runs(outbound[name], k) for k in ("records_per_s", "mb_per_s",
                                                                                  "p50_ms", "p99_ms")}  # fmt: skip
    hw, sq = summary["inbound"]["hand-written"], summary["inbound"]["sqlite"]
    ratios = {m: {p: hw[m][p]["appends_per_s"] / sq[m][p]["appends_per_s"] for p in producers} for m in modes}
    out_ratio = summary["outbound"]["hand-written"]["records_per_s"] / summary["outbound"]["sqlite"]["records_per_s"]
    at_least_2x = [p for p in producers if ratios["queue"][p] >= 2]
    verdict = ("keep the hand-written log" if len(at_least_2x) == len(producers) else "replace it with SQLite")

    print()
    print(f"inbound log: fsync on every group commit; medians of {args.repeats} runs of {args.seconds:.0f} s")
    print(f"{'workload':13s} {'implementation':14s} {'producers':>9s} {'appends/s':>9s} {'MB/s':>7s} {'p50 ms':>7s} "
          f"{'p99 ms':>7s} {'rec/commit':>10s}")  # fmt: skip
    for mode in modes:
        for name in specs:
            for p in producers:
                s = summary["inbound"][name][mode][p]
                print(f"{mode:13s} {name:14s} {p:9d} {s['appends_per_s']:9.0f} {s['mb_per_s']:7.1f} "
                      f"{s['p50_ms']:7.2f} {s['p99_ms']:7.2f} {s['records_per_commit']:10.1f}")  # fmt: skip
        print(f"{mode:13s} hand-written / sqlite appends/s: "
              + ", ".join(f"{p} producers {ratios[mode][p]:.2f}x" for p in producers))
    for name in specs:
        s = summary["outbound"][name]
        print(f"outbound {name:12s}: {s['records_per_s']:.0f} records/s, {s['mb_per_s']:.1f} MB/s, append p50 "
              f"{s['p50_ms']:.2f} ms p99 {s['p99_ms']:.2f} ms")  # fmt: skip
    print(f"outbound hand-written / sqlite: {out_ratio:.2f}x")
    print(f"decision rule (keep the hand-written log only if >= 2x faster at the same durability): it is >= 2x with "
          f"{at_least_2x or 'no'} producers of {producers} (queue alone): {verdict}")  # fmt: skip
    info = machine(args.dir)
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['filesystem']}, Linux {info['kernel']}, Python "
          f"{info['python']}, SQLite {info['sqlite']}; load average {load:.2f} before, {load_after:.2f} after")
    result = {"command": "python3 " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
              "baseline": base_from, "machine": info, "load_before": load, "load_after": load_after,
              "settings": recorded_settings({k: v for k, v in vars(args).items() if k != "fill"}, ROOT),
              "bodies": {"n": len(bodies), "sources": [recorded_path(p, ROOT) for p in sources], "min": sizes[0],
                         "median": statistics.median(sizes), "mean": statistics.mean(sizes), "max": sizes[-1]},
              "summary": summary, "ratio_appends_per_s": ratios, "ratio_outbound": out_ratio, "decision": verdict,
              "runs": {"inbound": inbound, "outbound": outbound}}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
