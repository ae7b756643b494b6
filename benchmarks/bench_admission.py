"""The infill receiver before and after counting every copy of a request against the buffer: speed and memory.

    python3 benchmarks/bench_admission.py [--baseline git:700408a] [--seconds 5] [--repeats 2] [--clients 4]
        [--overload-s 10] [--json benchmarks/results/admission.json]

Issue 21 asks that RSS stay within ``--buffer-max-mib`` plus 20 % under overload. Before this change a request's
copies on its way in (the body read, the message grpc buffered, SQLite's copies) and on its way out (the request
the forwarder has in hand, a split) were not counted, and requests of a few MiB broke the bound. Now a body's
memory is set aside before it is read (gRPC messages read by the handler, not by grpc, once room for the largest
is set aside), large log records go through SQLite's blob I/O, and repair and forwarding count what they copy.
What that costs in speed, and what it buys in memory, measured against the commit before it:

- **baseline**: ``--baseline git:COMMIT`` (default ``700408a``, the last commit before the change), checked out
  with ``git worktree`` into a temporary directory and run from there.
- **new**: this checkout.

Each runs as ``python -m otel_tracegen infill serve --repair-no-model`` (its own process, OTLP/gRPC and OTLP/HTTP on
loopback, the write-ahead log fsynced), forwarding over gRPC to a counting sink in this process. Load comes from a
client process of ``--clients`` threads (grpc channels and ``requests`` sessions kept open), for ``--seconds``
per row, runs alternated, ``--repeats`` each, medians reported:

- **small**: requests of 4 spans (~600 bytes), over gRPC and over HTTP, default settings (``--buffer-max-mib``
  256): requests/s.
- **1 MiB**: requests of one span with 1 MiB of attributes and a small root: requests/s and MB/s.
- **overload**: ``--overload-s`` seconds of requests with a 2 MiB span from 2 gRPC and 2 HTTP clients as fast as
  they are answered, into ``--buffer-max-mib 16`` with the sink down: the peak RSS over the idle RSS (sampled every
  20 ms from ``/proc``), against the claim of 1.2 x 16 MiB, and the requests accepted.

Heavy on 2 cores: run nothing else meanwhile (the load average before and after is recorded). Prints a table with
the ratio new/baseline and writes it, the runs and the machine to ``--json``. About 3 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from otel_tracegen.machine import describe, recorded_settings  # noqa: E402 - after the path

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT = f"/{SERVICE}/Export"
MS = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_of(pid: int) -> int:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) * 1024
    return 0


class Sink:
    """The downstream: an OTLP/gRPC endpoint counting the requests and bytes it takes."""

    def __init__(self) -> None:
        import grpc

        self.requests = self.bytes = 0
        handler = grpc.unary_unary_rpc_method_handler(self._export)
        generic = grpc.method_handlers_generic_handler(SERVICE, {"Export": handler})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[generic],
                                  options=[("grpc.max_receive_message_length", 64 << 20)])  # fmt: skip
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: bytes, context) -> bytes:
        self.requests += 1
        self.bytes += len(request)
        return b""

    def stop(self) -> None:
        self.server.stop(0)


class Receiver:
    """``infill serve`` from the source tree ``tree``, in front of ``downstream``."""

    def __init__(self, tree: Path, downstream: int, work: Path, *flags: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.queue = Path(tempfile.mkdtemp(prefix="queue-", dir=work))
        cmd = [sys.executable, "-m", "otel_tracegen", "infill", "serve", "--repair-no-model",
               "--receiver-grpc", f"127.0.0.1:{self.grpc_port}", "--receiver-http", f"127.0.0.1:{self.http_port}",
               "--queue-directory", str(self.queue), "--buffer-wait-s", "0.3", "--exporter-endpoint",
               f"127.0.0.1:{downstream}", "--exporter-insecure", "--exporter-retry-initial-s", "0.05",
               "--exporter-retry-max-s", "0.2", *flags]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not _listening(self.http_port) or not _listening(self.grpc_port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                sys.exit(f"the receiver from {tree} did not start")
            time.sleep(0.1)
        time.sleep(0.5)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- the client process -----------------------------------------------------------------------------------------


def client_main(grpc_port: int, http_port: int, transports: str, threads: int, payload: int, seconds: float) -> None:
    """(Client process) ``threads`` clients (transports in turn from ``transports``: ``grpc``, ``http``) sending
    requests of 4 spans, with ``payload`` bytes of attributes in one of them, for ``seconds``; prints the answers
    counted by status."""
    import dataclasses

    import grpc
    import requests

    from otel_tracegen.formats import otlp_proto
    from otel_tracegen.trace import Resource, Span, SpanKind, Status

    def body(c: int, k: int) -> bytes:
        trace = f"{c + 1:08x}{os.getpid():08x}{k:016x}"

        def span(i, parent, service, name, start, end):
            return Span(trace, f"{i:016x}", f"{parent:016x}" if parent else None, service, name, start * MS,
                        end * MS, SpanKind.SERVER, Status(), {"k": i}, Resource({"service.name": service}))  # fmt: skip

        spans = [span(1, 0, "a", "GET /", 0, 100), span(2, 1, "b", "call", 10, 60), span(3, 2, "c", "query", 20, 40),
                 span(4, 1, "d", "work", 70, 90)]  # fmt: skip
        if payload:
            spans[1] = dataclasses.replace(spans[1], attributes={"blob": "x" * payload})
        return otlp_proto.dumps(spans)

    kinds = transports.split(",")
    counts: dict = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(c: int) -> None:
        kind = kinds[c % len(kinds)]
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)])
        call = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        session = requests.Session()
        k = 0
        while time.monotonic() < stop:
            data = body(c, k)
            k += 1
            if kind == "http":
                code = str(session.post(f"http://127.0.0.1:{http_port}/v1/traces", data=data, timeout=30,
                                        headers={"Content-Type": "application/x-protobuf"}).status_code)  # fmt: skip
            else:
                try:
                    call(data, timeout=30)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
            with lock:
                counts[f"{kind} {code}"] = counts.get(f"{kind} {code}", 0) + 1
        channel.close()

    workers = [threading.Thread(target=run, args=(c,)) for c in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps(counts), flush=True)


def load(receiver: Receiver, transports: str, threads: int, payload: int, seconds: float, sample_rss: bool = False):
    """Run the client process against ``receiver``: (answers by status, peak RSS of the receiver while it ran)."""
    cmd = [sys.executable, __file__, "--client", str(receiver.grpc_port), str(receiver.http_port), transports,
           str(threads), str(payload), str(seconds)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = rss_of(receiver.proc.pid)
    while proc.poll() is None:
        if sample_rss:
            peak = max(peak, rss_of(receiver.proc.pid))
        time.sleep(0.02)
    return json.loads(proc.stdout.read() or "{}"), peak


def accepted(answers: dict) -> int:
    return sum(n for key, n in answers.items() if key.endswith((" OK", " 200")))


# -- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="git:700408a", help="git:COMMIT to compare with (default git:700408a)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side and row (medians reported)")
    ap.add_argument("--clients", type=int, default=4, help="client threads in the throughput rows")
    ap.add_argument("--overload-s", type=float, default=10.0, help="length of the overload run")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "admission.json")
    ap.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        g, h, transports, threads, payload, seconds = args.client
        client_main(int(g), int(h), transports, int(threads), int(payload), float(seconds))
        return
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f} before the run: the figures will be skewed", file=sys.stderr)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.baseline.removeprefix("git:")],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    base_tree = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), commit],
                   capture_output=True, check=True)  # fmt: skip
    trees = {"baseline": base_tree, "new": ROOT}
    rows = {"grpc small": ("grpc", 0), "http small": ("http", 0), "grpc 1 MiB": ("grpc", 1 << 20),
            "http 1 MiB": ("http", 1 << 20)}  # fmt: skip
    runs: dict = {side: {row: [] for row in rows} for side in trees}
    overload: dict = {}
    sink = Sink()
    try:
        for r in range(args.repeats):
            for side in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                receiver = Receiver(trees[side], sink.port, work)
                try:
                    for row, (transport, payload) in rows.items():
                        answers, _ = load(receiver, transport, args.clients, payload, args.seconds)
                        n = accepted(answers)
                        res = {"requests_per_s": n / args.seconds, "mb_per_s": n * (payload + 600) / args.seconds / 1e6,
                               "answers": answers, "load": os.getloadavg()[0]}  # fmt: skip
                        runs[side][row].append(res)
                        print(f"  {side:8s} {row:11s}: {res['requests_per_s']:7.1f} requests/s  "
                              f"{res['mb_per_s']:6.1f} MB/s  {answers}", flush=True)  # fmt: skip
                finally:
                    receiver.kill()
        down = free_port()  # nothing listens there: the downstream is down
        for side in trees:
            receiver = Receiver(trees[side], down, work, "--buffer-max-mib", "16")
            try:
                idle = rss_of(receiver.proc.pid)
                answers, peak = load(receiver, "grpc,http", 4, 2 << 20, args.overload_s, sample_rss=True)
            finally:
                receiver.kill()
            overload[side] = {"idle_rss": idle, "peak_rss": peak, "grown_mib": (peak - idle) / 2**20,
                              "bound_mib": 1.2 * 16, "accepted": accepted(answers), "answers": answers}  # fmt: skip
            print(f"  {side:8s} overload: RSS idle {idle / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, grown "
                  f"{(peak - idle) / 2**20:.1f} MiB against {1.2 * 16:.1f}; accepted {accepted(answers)}; {answers}",
                  flush=True)  # fmt: skip
    finally:
        sink.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    table = []
    for row in rows:
        for metric, unit in (("requests_per_s", "requests/s"), ("mb_per_s", "MB/s")):
            if metric == "mb_per_s" and "small" in row:
                continue
            old = statistics.median(x[metric] for x in runs["baseline"][row])
            new = statistics.median(x[metric] for x in runs["new"][row])
            table.append({"row": row, "unit": unit, "baseline": old, "new": new, "ratio": new / old if old else None})
    for metric, unit in (("grown_mib", "MiB over idle (bound 19.2)"), ("accepted", "requests")):
        old, new = overload["baseline"][metric], overload["new"][metric]
        table.append({"row": f"overload, 2 MiB spans, 16 MiB buffer: {metric}", "unit": unit, "baseline": old,
                      "new": new, "ratio": new / old if old else None})  # fmt: skip
    print(f"\nbaseline: git {commit[:12]}; new: this checkout; medians of {args.repeats} run(s) of {args.seconds:g} s")
    print(f"{'row':58s} {'unit':>26s} {'baseline':>9s} {'new':>9s} {'new/base':>8s}")
    for t in table:
        ratio = f"{t['ratio']:.2f}" if t["ratio"] is not None else "-"
        print(f"{t['row']:58s} {t['unit']:>26s} {t['baseline']:9.1f} {t['new']:9.1f} {ratio:>8s}")
    result = {
        "command": "python3 benchmarks/bench_admission.py " + " ".join(sys.argv[1:]),
        "baseline": f"git {commit}",
        "machine": describe(("grpcio", "aiohttp", "requests")),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "settings": recorded_settings({k: v for k, v in vars(args).items() if k != "client"}, ROOT),
        "table": table,
        "runs": runs,
        "overload": overload,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
