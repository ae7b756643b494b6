"""The infill receiver's OTLP/HTTP server: the former stdlib ThreadingHTTPServer against aiohttp, one run.

    python3 benchmarks/bench_receiver.py [--quick] [--seconds 4] [--repeats 2] [--clients 8,32] [--client-procs 2]
        [--workers 4] [--more-workers 16] [--idle 500] [--burst 64] [--silent-timeout-s 5]
        [--baseline git:bece43b|git|PATH] [--json benchmarks/results/receiver.json]

The issue asked for "a bounded pool of handler threads (or an async server, e.g. uvicorn/starlette or aiohttp, if
it measures better)". The two HTTP receivers:

- **old**: ``HttpReceiver`` of ``otel_tracegen/infill/receiver.py`` as it was before the change: the stdlib
  ``ThreadingHTTPServer`` (a thread per connection; TLS wraps the listening socket, so the handshake runs inside
  ``accept()``; headers and body go out in two writes without ``TCP_NODELAY``; socketserver's listen backlog of
  5). ``--baseline git:bece43b`` (the default) loads it with ``git show bece43b:otel_tracegen/infill/receiver.py``;
  ``--baseline git`` from the newest commit whose file still uses ``ThreadingHTTPServer``; ``--baseline PATH`` from
  a copy. Its source is executed as the module ``otel_tracegen.infill._receiver_<commit>``, so that its relative
  imports (``.service``, ``..report``) resolve against the package; it calls ``service.export(body, ctype)``,
  which the new service still takes.
- **new**: the package's ``otel_tracegen.infill.receiver.HttpReceiver`` (aiohttp event loop; ``--workers`` 4
  threads decode and log, at most 2 x workers bodies read at once). The throughput rows are also run with
  ``--more-workers`` (16) to show what the worker count costs; 0 leaves that series out.

Each runs in a server process of its own, in front of the same pipeline: ``InfillService`` with
``InfillConfig(repair_no_model=True, buffer_wait_s=0.2, queue_directory=<fresh tmp dir>)`` (the write-ahead log
fsynced, as by default), a rules-only ``TraceRepairer``, forwarding over gRPC to a sink in this (the parent)
process; ``tune_gc()`` as ``infill serve`` calls it. Load comes from client processes (``multiprocessing``,
spawn), so that clients do not share the server's GIL; each client is a thread with its own ``requests.Session``
(what the OTel Python SDK's OTLP/HTTP exporter uses) posting 4-span OTLP bodies built with ``otlp_proto.dumps``
(``otlp_json.dumps`` for the JSON row), a fresh trace id per request.

Rows, for each server:

- (a) keep-alive requests/s over ONE connection, protobuf (a full success answers an empty body) and OTLP/JSON
  (the answer has a body, ``{}``: the old server's second write waits for the client's delayed ACK);
- (b) requests/s with 8 and 32 concurrent keep-alive clients (over ``--client-procs`` processes);
- (c) latency p50/p99 of every row, and the server process's CPU time per answered request (``/proc/PID/stat``);
- (d) TLS on: the time to answer an HTTPS request on a fresh connection (median of 5), without and with one
  silent TCP client (connected, never says a word); a request still unanswered after ``--silent-timeout-s`` counts
  as that long (a lower bound);
- (e) RSS and threads of the server process with ``--idle`` keep-alive connections open and idle (each sent one
  request and got its answer; opened 4 at a time), against the same process before they opened;
- ``--burst`` connections opened one after another without waiting (each sends a request, then every answer is
  read): the time until all are answered, and the connects that waited for the kernel to resend a dropped SYN.

Throughput runs alternate the servers' order (``--repeats``; medians reported). Everything shares 2 cores:
run nothing else meanwhile; the load average before and after is kept. Prints a table with the ratio new/old of
each row and writes it, every run, and the machine (``lscpu``, Python, aiohttp, grpcio, requests) to ``--json``.
A full run takes about 2.5 minutes, ``--quick`` (0.8 s runs, one repeat, 100 idle connections, a burst of 16, no
``--more-workers`` series) about 20 s.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import ipaddress
import json
import multiprocessing
import os
import select
import shutil
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
RECEIVER_FILE = "otel_tracegen/infill/receiver.py"
EXPORT_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
PROTOBUF = {"Content-Type": "application/x-protobuf"}
MS = 1_000_000


# -- the two receivers ------------------------------------------------------------------------------------------


def baseline_source(spec: str) -> tuple[str, str, str]:
    """The old receiver's source, a short name for its module, and where it came from."""
    if spec.startswith("git:"):
        commits = [spec[4:]]
    elif spec == "git":
        commits = subprocess.run(["git", "-C", str(ROOT), "log", "--format=%H", "--", RECEIVER_FILE],
                                 capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    else:
        return Path(spec).read_text(), "copy", spec
    for commit in commits:
        full = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{full}:{RECEIVER_FILE}"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        if "ThreadingHTTPServer" in src:
            return src, full[:7], f"git {full[:12]}:{RECEIVER_FILE}"
    sys.exit(f"{spec}: no ThreadingHTTPServer in {RECEIVER_FILE} there; give git:COMMIT or a copy's path")


def load_old_receiver(source: str, tag: str):
    """Execute the old receiver's source as a module inside ``otel_tracegen.infill`` (its relative imports)."""
    import otel_tracegen.infill  # noqa: F401 - the parent package must be imported first

    name = f"otel_tracegen.infill._receiver_{tag}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "otel_tracegen.infill"
    sys.modules[name] = module
    exec(compile(source, f"<{tag}:{RECEIVER_FILE}>", "exec"), module.__dict__)  # noqa: S102 - our own git history
    return module


# -- the server process -----------------------------------------------------------------------------------------


def serve(kind: str, baseline_file: str, tag: str, sink_port: int, queue_dir: str, tls: list[str] | None,
          workers: int) -> None:
    """(Server process) a receiver in front of a fresh InfillService (and a second one with TLS when ``tls``
    names a certificate and key); prints their ports, runs until killed."""
    from otel_tracegen.infill.repair import TraceRepairer
    from otel_tracegen.infill.service import InfillConfig, InfillService, tune_gc

    config = InfillConfig(repair_no_model=True, queue_directory=queue_dir, buffer_wait_s=0.2,
                          exporter_endpoint=f"127.0.0.1:{sink_port}", exporter_insecure=True)  # fmt: skip
    service = InfillService(config, TraceRepairer(None, None, config.repair_settings()))
    tune_gc()
    limit = int(config.receiver_max_message_mib * (1 << 20))
    if kind == "old":
        module = load_old_receiver(Path(baseline_file).read_text(), tag)

        def receiver(tls_pair):
            return module.HttpReceiver(service, "127.0.0.1:0", max_message_bytes=limit, token=None, tls=tls_pair)
    else:
        from otel_tracegen.infill.receiver import HttpReceiver

        def receiver(tls_pair):
            return HttpReceiver(service, "127.0.0.1:0", max_message_bytes=limit, tls=tls_pair, workers=workers)

    receivers = {"port": receiver(None)}
    if tls:  # a second receiver, with TLS, on the same pipeline
        receivers["tls_port"] = receiver((tls[0], tls[1]))
    service.start()
    for r in receivers.values():
        r.start()
    print(json.dumps({name: r.port for name, r in receivers.items()}), flush=True)
    threading.Event().wait()  # until the parent kills it (SIGKILL): a stuck old server could not stop anyway


class Server:
    """A server process (``--serve``) and what it needs: its queue directory and the port it listens on."""

    def __init__(self, kind: str, workers: int, args, work: Path, sink_port: int,
                 tls: tuple[str, str] | None = None) -> None:
        self.kind = kind
        self.queue_dir = Path(tempfile.mkdtemp(prefix=f"queue-{kind}-", dir=work))
        cmd = [sys.executable, __file__, "--serve", kind, str(args.baseline_file), args.baseline_tag, str(sink_port),
               str(self.queue_dir), str(workers)] + (["--tls", *tls] if tls else [])  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            sys.exit(f"the {kind} server did not start")
        ports = json.loads(line)
        self.port, self.tls_port = ports["port"], ports.get("tls_port")

    def status(self) -> dict:
        """VmRSS (bytes) and Threads of the server process, from /proc."""
        out = {}
        for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                out["rss"] = int(ln.split()[1]) * 1024
            elif ln.startswith("Threads:"):
                out["threads"] = int(ln.split()[1])
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Sink:
    """The downstream: an OTLP/gRPC endpoint counting the requests it takes (raw bytes, nothing decoded)."""

    def __init__(self) -> None:
        import grpc

        self.requests = 0
        handler = grpc.unary_unary_rpc_method_handler(self._export)
        generic = grpc.method_handlers_generic_handler(EXPORT_SERVICE, {"Export": handler})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[generic])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: bytes, context) -> bytes:
        self.requests += 1
        return b""

    def stop(self) -> None:
        self.server.stop(0)


# -- load -------------------------------------------------------------------------------------------------------


def body_maker(client: int, encoding: str = "protobuf"):
    """A function of a counter giving a 4-span OTLP body (``protobuf`` or ``json``) whose trace id is new for each
    count."""
    from otel_tracegen.formats import otlp_json, otlp_proto
    from otel_tracegen.trace import Resource, Span, SpanKind, Status

    template = "ab" * 16

    def span(i: int, parent: int, service: str, name: str, start: int, end: int) -> Span:
        return Span(template, f"{i:016x}", f"{parent:016x}" if parent else None, service, name, start * MS, end * MS,
                    SpanKind.SERVER, Status(), {"k": i}, Resource({"service.name": service, "host.name": f"h-{service}"}))  # fmt: skip

    spans = [span(1, 0, "a", "GET /", 0, 100), span(2, 1, "b", "call", 10, 60), span(3, 2, "c", "query", 20, 40),
             span(4, 1, "d", "work", 70, 90)]  # fmt: skip
    if encoding == "json":
        text = otlp_json.dumps(spans)
        assert text.count(template) == 4
        return lambda k: text.replace(template, f"{client:08x}{os.getpid():08x}{k:016x}").encode()
    body, old = otlp_proto.dumps(spans), bytes.fromhex(template)
    assert body.count(old) == 4
    return lambda k: body.replace(old, client.to_bytes(4, "big") + os.getpid().to_bytes(4, "big") + k.to_bytes(8, "big"))


CONTENT_TYPES = {"protobuf": "application/x-protobuf", "json": "application/json"}


def client_process(port: int, threads: int, first_client: int, start_at: float, end_at: float,
                   encoding: str = "protobuf") -> dict:
    """(Client process) ``threads`` keep-alive clients posting bodies from ``start_at`` to ``end_at`` (wall
    clock); what was answered in that window: the count, the latencies, the statuses other than 200."""
    import requests

    url = f"http://127.0.0.1:{port}/v1/traces"
    headers = {"Content-Type": CONTENT_TYPES[encoding]}
    results: list[dict] = [{} for _ in range(threads)]

    def run(t: int) -> None:
        make = body_maker(first_client + t, encoding)
        session = requests.Session()
        k = 0
        session.post(url, data=make(k), headers=headers, timeout=60)  # connect before the window opens
        lat, other = [], {}
        time.sleep(max(0.0, start_at - time.time()))
        while (now := time.time()) < end_at:
            k += 1
            t0 = time.perf_counter()
            r = session.post(url, data=make(k), headers=headers, timeout=60)
            took = time.perf_counter() - t0
            if now + took > end_at:
                break
            if r.status_code == 200:
                lat.append(took)
            else:
                other[r.status_code] = other.get(r.status_code, 0) + 1
        results[t] = {"latencies": lat, "other": other}

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    other: dict = {}
    for r in results:
        for code, n in r.get("other", {}).items():
            other[code] = other.get(code, 0) + n
    return {"latencies": [x for r in results for x in r.get("latencies", [])], "other": other}


def warm_client() -> None:
    """(Client process) import what a client needs before the first timed run."""
    import requests  # noqa: F401

    body_maker(0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(pool, port: int, server_pid: int, clients: int, procs: int, seconds: float,
               encoding: str = "protobuf") -> dict:
    """``clients`` keep-alive clients over ``procs`` client processes for ``seconds``; the server's CPU time in
    that window per answered request."""
    procs = min(procs, clients)
    shares = [clients // procs + (1 if p < clients % procs else 0) for p in range(procs)]
    start_at = time.time() + min(1.0, 0.3 + 0.02 * clients)  # time for the clients to connect
    jobs = [pool.apply_async(client_process, (port, n, 1000 * (p + 1), start_at, start_at + seconds, encoding))
            for p, n in enumerate(shares)]  # fmt: skip
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = cpu_seconds(server_pid)
    time.sleep(max(0.0, start_at + seconds - time.time()))
    cpu = cpu_seconds(server_pid) - cpu0
    parts = [j.get(timeout=seconds + 120) for j in jobs]
    lat = [x for p in parts for x in p["latencies"]]
    other: dict = {}
    for p in parts:
        for code, n in p["other"].items():
            other[code] = other.get(code, 0) + n
    return {"requests": len(lat), "requests_per_s": len(lat) / seconds, "p50_ms": pct(lat, 0.5) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "server_cpu_ms_per_request": cpu / max(1, len(lat)) * 1e3,
            "server_cpu_share": cpu / seconds, "not_200": other, "load": os.getloadavg()[0]}  # fmt: skip


# -- TLS: a silent client -----------------------------------------------------------------------------------------


def make_pki(directory: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost, as PEM files (as tests/conftest.py's pki fixture)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer=None, issuer_key=None, ca: bool = False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                                  serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption()))  # fmt: skip
        return subject, key

    ca_name, ca_key = issue("ca", ca=True)
    issue("server", ca_name, ca_key,
          san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    return {k: str(directory / k) for k in ("ca.pem", "server.pem", "server.key")}


def https_answers(port: int, ca: str, n: int, timeout: float, first: int) -> dict:
    """``n`` HTTPS requests, each on a fresh connection (handshake included): their times; stops at a timeout."""
    import requests

    make = body_maker(first)
    times, timed_out = [], False
    for k in range(n):
        t0 = time.perf_counter()
        try:
            r = requests.post(f"https://127.0.0.1:{port}/v1/traces", data=make(k), headers=PROTOBUF, verify=ca,
                              timeout=timeout)  # fmt: skip
            r.raise_for_status()
        except requests.exceptions.RequestException:
            if time.perf_counter() - t0 < timeout * 0.9:
                raise
            timed_out = True  # a read timeout, or urllib3's handshake timeout wrapped as a connection error
            times.append(timeout)
            break
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "max_ms": max(times) * 1e3, "n": len(times),
            "timed_out": timed_out}  # fmt: skip


def silent_client(port: int, ca: str, timeout: float, n: int) -> dict:
    quiet = https_answers(port, ca, n, timeout, 7000)
    silent = socket.create_connection(("127.0.0.1", port))  # connects, never says a word
    try:
        time.sleep(0.2)
        stalled = https_answers(port, ca, n, timeout, 8000)
    finally:
        silent.close()
    return {"without": quiet, "with": stalled}


# -- idle keep-alive connections ------------------------------------------------------------------------------------


def idle_connections(server: Server, n: int) -> dict:
    """RSS and threads of the server before and with ``n`` idle keep-alive connections (each answered once)."""
    make = body_maker(9000)
    for k in range(20):  # warm up: the pool threads, the first repairs and forwards
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(http_request(make(k)))
            read_answer(s)
    time.sleep(0.5)
    before = server.status()
    conns: list[socket.socket] = []
    statuses: list[int] = []
    try:
        while len(conns) < n:  # a few at a time: the old server's listen backlog is 5 (see connection_burst)
            batch = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(min(4, n - len(conns)))]
            for s in batch:
                s.sendall(http_request(make(100 + len(conns))))
                conns.append(s)
            statuses += [read_answer(s) for s in batch]
        time.sleep(1.0)  # settle
        samples = []
        for _ in range(5):
            samples.append(server.status())
            time.sleep(0.1)
        still_open = sum(1 for s in conns if not closed_by_peer(s))
    finally:
        for s in conns:
            s.close()
    peak = max(x["rss"] for x in samples)
    return {"connections": n, "answered_200": statuses.count(200), "still_open": still_open,
            "rss_before": before["rss"], "threads_before": before["threads"], "rss_idle": peak,
            "threads_idle": max(x["threads"] for x in samples), "rss_per_connection": (peak - before["rss"]) / n}  # fmt: skip


def connection_burst(port: int, n: int) -> dict:
    """``n`` connections opened one after another without waiting for answers (connect and send a request on
    each, then read every answer): the time until all are answered, the slowest connect, and how many connects
    waited for a SYN retransmit. The old server listens with socketserver's backlog of 5, so a
    burst overflows its accept queue while its accept thread waits for the GIL; dropped SYNs are retried by the
    kernel after 1 s, then 3 s."""
    make = body_maker(9500)
    conns, connects = [], []
    t0 = time.perf_counter()
    try:
        for k in range(n):
            t = time.perf_counter()
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            connects.append(time.perf_counter() - t)
            s.sendall(http_request(make(k)))
            conns.append(s)
        statuses = [read_answer(s) for s in conns]
        took = time.perf_counter() - t0
    finally:
        for s in conns:
            s.close()
    return {"connections": n, "answered_200": statuses.count(200), "seconds": took, "slowest_connect_s": max(connects),
            "connects_over_half_a_second": sum(c > 0.5 for c in connects)}  # fmt: skip


def http_request(body: bytes) -> bytes:
    return (b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body  # fmt: skip


def read_answer(s: socket.socket) -> int:
    """Read one HTTP answer (headers and Content-Length body) from ``s``: its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split(b" ")[1])


def closed_by_peer(s: socket.socket) -> bool:
    ready, _, _ = select.select([s], [], [], 0)
    return bool(ready) and not s.recv(1, socket.MSG_PEEK)


# -- reporting ------------------------------------------------------------------------------------------------------


def machine() -> dict:
    return describe(("aiohttp", "grpcio", "requests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~20 s run: 0.8 s runs, one repeat, 100 idle "
                    "connections, a burst of 16, no --more-workers series")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each throughput run")
    ap.add_argument("--repeats", type=int, default=2, help="throughput runs per server and row (medians reported)")
    ap.add_argument("--clients", default="8,32", help="concurrent keep-alive clients, comma-separated")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes the clients are spread over")
    ap.add_argument("--idle", type=int, default=500, help="idle keep-alive connections for the RSS row")
    ap.add_argument("--burst", type=int, default=64, help="connections opened at once for the burst row")
    ap.add_argument("--silent-timeout-s", type=float, default=5.0, help="how long an HTTPS request may wait")
    ap.add_argument("--workers", type=int, default=4, help="the new receiver's worker threads (its default: 4)")
    ap.add_argument("--more-workers", type=int, default=16,
                    help="also run the throughput rows with the new receiver at this many workers (0: don't)")
    ap.add_argument("--baseline", default="git:bece43b",
                    help="the old receiver: git:COMMIT (default git:bece43b), git (the newest commit whose file "
                         "uses ThreadingHTTPServer) or a copy's path")  # fmt: skip
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "receiver.json")
    ap.add_argument("--serve", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--tls", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        kind, baseline_file, tag, sink_port, queue_dir, workers = args.serve
        serve(kind, baseline_file, tag, int(sink_port), queue_dir, args.tls, int(workers))
        return
    if args.quick:
        args.seconds, args.repeats, args.idle, args.burst, args.silent_timeout_s = 0.8, 1, 100, 16, 1.0
        args.more_workers = 0

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: the figures will be skewed", file=sys.stderr)
    from otel_tracegen.infill import receiver as new_receiver

    if "aiohttp" not in Path(new_receiver.__file__).read_text():
        sys.exit(f"{RECEIVER_FILE} is not the aiohttp receiver: nothing to compare the old one with")
    source, args.baseline_tag, base_from = baseline_source(args.baseline)
    load_old_receiver(source, args.baseline_tag)  # fails here, not in a server process, if it cannot load
    # the series: name -> (server kind, workers); rows: name -> (clients, encoding)
    series = {"old": ("old", 0), "new": ("new", args.workers)}
    if args.more_workers:
        series[f"new, {args.more_workers} workers"] = ("new", args.more_workers)
    rows = {"1 connection": (1, "protobuf"), "1 connection, OTLP/JSON": (1, "json")}
    rows |= {f"{c} clients": (c, "protobuf") for c in (int(x) for x in args.clients.split(",") if x)}
    work = Path(tempfile.mkdtemp(prefix="bench-receiver-"))
    args.baseline_file = work / "old_receiver.py"
    args.baseline_file.write_text(source)
    sink = Sink()
    t_start = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(args.client_procs)
    for job in [pool.apply_async(warm_client) for _ in range(args.client_procs)]:
        job.get()
    runs: dict = {name: {row: [] for row in rows} for name in series}
    silent: dict = {}
    idle: dict = {}
    burst: dict = {}
    try:
        order = list(series)
        for r in range(args.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                server = Server(*series[name], args, work, sink.port)
                try:
                    for row, (n, encoding) in rows.items():
                        res = throughput(pool, server.port, server.proc.pid, n, 1 if n == 1 else args.client_procs,
                                         args.seconds, encoding)  # fmt: skip
                        runs[name][row].append(res)
                        print(f"  {name:19s} {row:23s}: {res['requests_per_s']:6.0f} requests/s  p50 "
                              f"{res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms  server CPU "
                              f"{res['server_cpu_ms_per_request']:.2f} ms/request ({res['server_cpu_share']:.2f} "
                              f"cores)  not 200: {res['not_200'] or 0}  (load {res['load']:.2f})", flush=True)  # fmt: skip
                finally:
                    server.kill()
        pki = make_pki(work)
        for name in ("old", "new"):  # a fresh server with a plain and a TLS receiver: idle connections, then TLS
            server = Server(*series[name], args, work, sink.port, tls=(pki["server.pem"], pki["server.key"]))
            try:
                idle[name] = res = idle_connections(server, args.idle)
                print(f"  {name:3s} {args.idle} idle keep-alive connections: RSS {res['rss_before'] / 2**20:.1f} -> "
                      f"{res['rss_idle'] / 2**20:.1f} MiB ({res['rss_per_connection'] / 1024:.1f} KiB each), "
                      f"threads {res['threads_before']} -> {res['threads_idle']}, {res['still_open']} still open",
                      flush=True)  # fmt: skip
                silent[name] = s = silent_client(server.tls_port, pki["ca.pem"], args.silent_timeout_s, 5)
                print(f"  {name:3s} HTTPS answer: {s['without']['median_ms']:.1f} ms alone, "
                      f"{'timed out after ' if s['with']['timed_out'] else ''}{s['with']['median_ms']:.1f} ms with "
                      f"one silent TCP client", flush=True)  # fmt: skip
                burst[name] = b = connection_burst(server.port, args.burst)
                print(f"  {name:3s} {args.burst} connections opened at once: all answered in {b['seconds']:.2f} s; "
                      f"{b['connects_over_half_a_second']} connects took over 0.5 s (slowest "
                      f"{b['slowest_connect_s']:.2f} s)", flush=True)  # fmt: skip
            finally:
                server.kill()
    finally:
        pool.terminate()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()[0]

    metrics = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
    summary = {name: {row: {m: statistics.median(x[m] for x in rs) for m in metrics} for row, rs in by_row.items()}
               for name, by_row in runs.items()}  # fmt: skip
    table: list[dict] = []
    more = next((name for name in series if name not in ("old", "new")), None)

    def add(row: str, unit: str, old: float, new: float, better: str, note: str = "", extra: float | None = None):
        entry = {"row": row, "unit": unit, "old": old, "new": new, "ratio_new_old": new / old if old else None,
                 "better": better}  # fmt: skip
        if extra is not None:
            entry[more] = extra
            entry[f"ratio_{more}_old"] = extra / old if old else None
        if note:
            entry["note"] = note
        table.append(entry)

    for row in rows:
        for m, label, unit, better in [("requests_per_s", "", "requests/s", "higher"), ("p50_ms", " p50", "ms", "lower"),
                                       ("p99_ms", " p99", "ms", "lower"),
                                       ("server_cpu_ms_per_request", " server CPU", "ms/request", "lower")]:
            add(f"keep-alive {row}{label}", unit, summary["old"][row][m], summary["new"][row][m], better,
                extra=summary[more][row][m] if more else None)  # fmt: skip
    add("HTTPS answer, alone (median of 5)", "ms", silent["old"]["without"]["median_ms"],
        silent["new"]["without"]["median_ms"], "lower")
    stalled = silent["old"]["with"]
    add("HTTPS answer, one silent TCP client", "ms", stalled["median_ms"], silent["new"]["with"]["median_ms"], "lower",
        f"old timed out at {args.silent_timeout_s:g} s: a lower bound" if stalled["timed_out"] else "")
    add(f"RSS with {args.idle} idle keep-alive connections", "MiB", idle["old"]["rss_idle"] / 2**20,
        idle["new"]["rss_idle"] / 2**20, "lower")
    add(f"RSS growth for {args.idle} idle connections", "MiB", (idle["old"]["rss_idle"] - idle["old"]["rss_before"])
        / 2**20, (idle["new"]["rss_idle"] - idle["new"]["rss_before"]) / 2**20, "lower")  # fmt: skip
    add(f"threads with {args.idle} idle connections", "threads", idle["old"]["threads_idle"],
        idle["new"]["threads_idle"], "lower")
    add(f"{args.burst} connections opened at once, all answered", "s", burst["old"]["seconds"],
        burst["new"]["seconds"], "lower")
    add(f"{args.burst} at once: connects waiting > 0.5 s (SYN resent)", "connects", burst["old"]["connects_over_half_a_second"],
        burst["new"]["connects_over_half_a_second"], "lower")

    print()
    print(f"old: {base_from} (ThreadingHTTPServer); new: {RECEIVER_FILE} (aiohttp, {args.workers} workers); medians "
          f"of {args.repeats} run(s) of {args.seconds:g} s")  # fmt: skip
    head = f"{'row':52s} {'unit':>10s} {'old':>9s} {'new':>9s} {'new/old':>7s}"
    print(head + (f" {more:>19s} {'/old':>5s}" if more else ""))
    for t in table:
        ratio = f"{t['ratio_new_old']:.2f}" if t["ratio_new_old"] is not None else "-"
        line = f"{t['row']:52s} {t['unit']:>10s} {t['old']:9.2f} {t['new']:9.2f} {ratio:>7s}"
        if more:
            line += f" {t[more]:19.2f} {t[f'ratio_{more}_old']:5.2f}" if more in t else " " * 26
        print(line + (f"  ({t['note']})" if t.get("note") else ""))
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}, aiohttp "
          f"{info['aiohttp']}, grpcio {info['grpcio']}, requests {info['requests']}; load average {load:.2f} before, "
          f"{load_after:.2f} after; {elapsed:.0f} s")  # fmt: skip
    for by_row in runs.values():  # the latency lists are not kept, only their percentiles
        for rs in by_row.values():
            for x in rs:
                x.pop("latencies", None)
    result = {"command": "python3 " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
              "baseline": base_from, "new": f"{RECEIVER_FILE} (working tree)", "machine": info, "load_before": load,
              "load_after": load_after, "seconds_total": elapsed,
              "settings": recorded_settings({k: v for k, v in vars(args).items()
                                             if k not in ("serve", "tls", "baseline_file")}, ROOT),
              "rows": table, "summary": summary, "silent_tls_client": silent, "idle_connections": idle,
              "connection_burst": burst,
              "sink_requests": sink.requests, "runs": runs}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
