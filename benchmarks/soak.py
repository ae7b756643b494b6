"""Soak: ``otel-tracegen infill serve`` under faults for minutes, checking that nothing it acknowledged is lost.

    python3 benchmarks/soak.py [--minutes 10] [--clients 4] [--rate 20] [--buffer-max-mib 64] [--buffer-wait-s 1]
        [--cycle-s 60] [--burst-clients 6] [--burst-requests 200] [--burst-traces 40] [--burst-payload 4000]
        [--oversize-every-s 12] [--exporter-max-request-mib 0.9] [--rss-interval-s 1] [--drain-timeout-s 180] [--seed 0] [--dir /tmp] [--keep]
        [--json benchmarks/results/soak.json]

The longer runs of the faults ``tests/test_infill_faults.py`` injects for seconds (its ideas, not its code). The
receiver runs as a process of its own (``python -m otel_tracegen infill serve --repair-no-model``: OTLP/gRPC and
OTLP/HTTP on loopback, a bearer token, ``--buffer-max-mib``, exporter retries from 0.2 s to 2 s,
``--exporter-max-request-mib`` 0.9), forwarding over gRPC to a sink in this process whose
``grpc.max_receive_message_length`` is 1 MiB. For ``--minutes``, at once:

- **Steady load.** ``--clients`` threads (gRPC, HTTP protobuf, HTTP JSON in turn), ``--rate`` requests/s each,
  1-10 traces of 2-8 spans a request (10 % of traces miss a span, so repair has work). 20 % of requests mix in
  1-3 bad spans: invalid UTF-8 in a name, key or value, a field running past its end, kvlist nesting 33, array
  nesting 50 (JSON: invalid UTF-8 in a name, kvlist nesting 40). 1 % are garbage (expect 400 /
  INVALID_ARGUMENT), 1 % lack the token (expect 401 / UNAUTHENTICATED). Clients behave like an OTel SDK: on
  503 / RESOURCE_EXHAUSTED they wait the retry advice (at most 2 s) and send the same body again; while the
  receiver is down, every 0.3 s.
- **Every ``--cycle-s``** (60 s): an overload burst (``--burst-clients`` threads sending ``--burst-requests``
  requests made beforehand, of ``--burst-traces`` traces whose spans carry ``--burst-payload`` bytes of
  attributes, as fast as they are answered); a downstream outage (the sink stops for 10-30 s, then restarts on
  the same port); ``kill -9`` of the receiver halfway through the outage, and again once the sink takes the
  backlog again (1.5-3 s after it is back, during delivery), each followed by a restart on the same ports and
  queue directory.
- **Every ``--oversize-every-s``** (12 s): a request holding a 2 MiB span (and a small root), which the sink can
  never take: the receiver must split the request around it and keep that span as a dead letter.

Every span the receiver acknowledged (HTTP 200 / gRPC OK, minus the spans its partial success rejected) is
tracked: which spans a body holds is computed here with ``otel_tracegen.infill.wire.decode(body, content_type,
report)``, the receiver's own decoder, and the receiver's rejected count must match it. At the end the load
stops, the sink stays up, and the run waits (``--drain-timeout-s``) until every acknowledged span arrived at the
sink (duplicates allowed: at-least-once) or is in a dead letter (``<queue dir>/dead-letter/*.binpb``, accounted
for), then stops the receiver with SIGTERM. The receiver's RSS is read from ``/proc/PID/status`` every
``--rss-interval-s``, with its buffer gauges from ``/metrics``; its claim is RSS <= idle RSS (a fresh start,
before any load) + 1.2 x ``--buffer-max-mib``.

Reports spans sent / acknowledged / arrived / dead-lettered / missing, kills, outages, bursts, pushback answers
(503 / RESOURCE_EXHAUSTED), peak RSS against the bound, and the receiver's logged errors; writes them, the event
timeline and the RSS series to ``--json``. Exits 1 if an acknowledged span was lost, the RSS bound was broken, or
an answer was not the one expected. Heavy on a 2-core machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import grpc
import requests

from otel_tracegen.formats import otlp_json
from otel_tracegen.infill import wire
from otel_tracegen.machine import describe, recorded_settings
from otel_tracegen.emit.wire import parse_partial_success
from otel_tracegen.report import ReadReport
from otel_tracegen.trace import Resource, Span, SpanKind, Status

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT = f"/{SERVICE}/Export"
MS = 1_000_000
SINK_MAX_BYTES = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key(trace_id: str, span_id: str) -> bytes:
    """A span's identity, compact (24 bytes) so that a million of them fit."""
    return bytes.fromhex(trace_id + span_id)


def keys(spans: list[wire.WireSpan]) -> set[bytes]:
    return {key(w.span.trace_id, w.span.span_id) for w in spans}


# -- the downstream ------------------------------------------------------------------------------------------------


class Sink:
    """The downstream: an OTLP/gRPC endpoint with a 1 MiB message limit, recording the span ids that arrive;
    stopped and started again on the same port for outages."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.arrived: set[bytes] = set()
        self.spans = 0  # spans received, duplicates included
        self.requests = 0
        self.last_request = 0.0
        self._lock = threading.Lock()
        self.server = None

    def _export(self, request: bytes, context) -> bytes:
        got = keys(wire.decode(request))
        with self._lock:
            self.arrived |= got
            self.spans += len(got)
            self.requests += 1
            self.last_request = time.monotonic()
        return b""

    def start(self) -> None:
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self._export)})
        for _ in range(50):  # the port of a server just stopped can take a moment to be free again
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler],
                                 options=[("grpc.max_receive_message_length", SINK_MAX_BYTES)])  # fmt: skip
            try:
                bound = server.add_insecure_port(f"127.0.0.1:{self.port}")
            except RuntimeError:
                bound = 0
            if bound == self.port:
                server.start()
                self.server = server
                return
            time.sleep(0.1)
        raise RuntimeError(f"the sink cannot listen on port {self.port} again")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None

    @property
    def up(self) -> bool:
        return self.server is not None


# -- the receiver process -----------------------------------------------------------------------------------------


class Receiver:
    """``otel-tracegen infill serve`` as a process; killed with ``kill -9`` and started again on the same ports and
    queue directory."""

    def __init__(self, args, work: Path, sink_port: int, token: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        while self.http_port == self.grpc_port:
            self.http_port = free_port()
        self.queue = work / "queue"
        self.log_path = work / "serve.log"
        self.cmd = [sys.executable, "-m", "otel_tracegen", "infill", "serve", "--repair-no-model",
                    "--receiver-grpc", f"127.0.0.1:{self.grpc_port}", "--receiver-http", f"127.0.0.1:{self.http_port}",
                    "--receiver-bearer-token", token, "--queue-directory", str(self.queue),
                    "--buffer-max-mib", str(args.buffer_max_mib), "--buffer-wait-s", str(args.buffer_wait_s),
                    "--exporter-endpoint", f"127.0.0.1:{sink_port}", "--exporter-insecure",
                    "--exporter-retry-initial-s", "0.2", "--exporter-retry-max-s", "2", "--exporter-timeout-s", "5",
                    "--exporter-max-request-mib", str(args.exporter_max_request_mib),
                    "--queue-dead-letter-max-mib", "100000", "--queue-dead-letter-max-requests", "1000000",
                    "--drain-s", "30"]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0
        self._letters: dict[str, tuple[set[bytes], str]] = {}  # dead letters read so far

    def start(self) -> float:
        """Start it and wait until it answers ``/healthz``: the seconds that took."""
        t0 = time.monotonic()
        self.incarnation += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- soak: start #{self.incarnation} ---\n".encode())
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log)
        while time.monotonic() - t0 < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the receiver exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1).ok:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the receiver did not answer /healthz within 120 s; see {self.log_path}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 90) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None

    def rss(self) -> int | None:
        try:
            for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return None  # between a kill and a restart, or a zombie

    def dead_letters(self) -> tuple[set[bytes], Counter]:
        """The span ids of the dead letters, and their reasons (each file read once)."""
        directory = self.queue / "dead-letter"
        for p in sorted(directory.glob("*.binpb")) if directory.is_dir() else []:
            if p.name in self._letters:
                continue
            try:
                reason = json.loads(p.with_suffix(".json").read_text())["reason"]
                reason = "too large" if "too large" in reason else reason[:80]
            except (OSError, ValueError, KeyError):
                continue  # its reason is written just after it: read both next time
            self._letters[p.name] = (keys(wire.decode(p.read_bytes())), reason)
        ids = set().union(*(i for i, _ in self._letters.values()))
        return ids, Counter(r for _, r in self._letters.values())


# -- requests -----------------------------------------------------------------------------------------------------


def nested(depth: int, kind: str):
    value = "leaf"
    for _ in range(depth):
        value = {"k": value} if kind == "kvlist" else [value]
    return value


def make_trace(trace: str, n: int, rng: random.Random, base_ns: int, attributes: dict | None = None) -> list[Span]:
    """A trace of ``n`` spans over 3 services (span 1 the root); sometimes one non-root span is left out."""
    spans, depth = [], {1: 0}
    for i in range(1, n + 1):
        parent = rng.randrange(1, i) if i > 1 else None
        depth[i] = depth[parent] + 1 if parent else 0
        service = f"svc-{(i + (parent or 0)) % 3}"
        spans.append(Span(trace, f"{i:016x}", f"{parent:016x}" if parent else None, service, f"op-{i % 5}",
                          base_ns + depth[i] * MS, base_ns + (1000 - depth[i]) * MS, SpanKind.SERVER, Status(),
                          dict(attributes or {"k": i}), Resource({"service.name": service})))  # fmt: skip
    if n > 2 and rng.random() < 0.1:
        del spans[rng.randrange(1, n)]  # its children are orphans: repair re-parents them
    return spans


BAD_KINDS = ["utf8-name", "utf8-key", "utf8-value", "past-end", "kvlist-33", "array-50"]


def bad_wire_span(kind: str, trace: str, i: int, base_ns: int) -> wire.WireSpan:
    """A span whose bytes break protobuf in one of the ways found under fault injection."""

    def one(name: str = "op", attributes: dict | None = None) -> wire.WireSpan:
        s = Span(trace, f"{i:016x}", f"{1:016x}", "svc-bad", name, base_ns, base_ns + 10 * MS, SpanKind.SERVER,
                 Status(), attributes or {"k": "v"}, Resource({"service.name": "svc-bad"}))  # fmt: skip
        return wire.from_spans([s])[0]

    if kind == "utf8-name":
        w = one(name="NAMEXX")
        w.raw = w.raw.replace(b"NAMEXX", b"NAM\xff\xfeX")
    elif kind == "utf8-key":
        w = one(attributes={"KEYXX": "v"})
        w.raw = w.raw.replace(b"KEYXX", b"KE\xc3(X")
    elif kind == "utf8-value":
        w = one(attributes={"k": "VALXX"})
        w.raw = w.raw.replace(b"VALXX", b"\xe2\x28\xa1XX")
    elif kind == "past-end":  # a name field that claims 127 bytes inside a span that holds 2 more
        w = one()
        w.raw = w.raw + b"\x2a\x7fab"
    elif kind == "kvlist-33":
        w = one(attributes={"deep": nested(33, "kvlist")})
    elif kind == "array-50":
        w = one(attributes={"deep": nested(50, "array")})
    else:
        raise ValueError(kind)
    return w


@dataclass
class Request:
    body: bytes
    content_type: str
    spans: int  # spans in the body, bad ones included
    expected: set[bytes]  # what the receiver takes from it (its own decoder)
    rejected: int  # what its partial success must reject
    kind: str  # good | mixed | garbage | oversized | unauthenticated
    expect: str  # the answer it must get: ok | invalid | unauthenticated


def request_from(body: bytes, content_type: str, spans: int, kind: str, token: bool = True) -> Request:
    """A request, with what the receiver must answer and take: its own decoder's verdict."""
    report = ReadReport()
    try:
        expected, expect = keys(wire.decode(body, content_type, report)), "ok"
    except wire.MalformedRequest:
        expected, expect = set(), "invalid"
    if not token:  # refused before the body is read
        return Request(body, content_type, spans, set(), 0, "unauthenticated", "unauthenticated")
    return Request(body, content_type, spans, expected, report.total_dropped, kind, expect)


class Workload:
    """Makes requests with trace ids never used before in this run."""

    def __init__(self, seed: int) -> None:
        self.nonce = random.Random(seed).getrandbits(32)
        self._count = 0
        self._lock = threading.Lock()

    def trace_id(self) -> str:
        with self._lock:
            self._count += 1
            return f"{self.nonce:08x}{self._count:024x}"

    def steady(self, rng: random.Random, json_body: bool, traces: int | None = None, payload: int = 0) -> Request:
        """A request of 1-10 traces (or ``traces``), its spans carrying ``payload`` bytes of attribute each."""
        base = time.time_ns()
        roll = rng.random()
        if roll < 0.01:
            return request_from(rng.randbytes(rng.randint(1, 300)), wire.JSON if json_body else wire.PROTOBUF, 0,
                                "garbage")  # fmt: skip
        token = not 0.01 <= roll < 0.02
        mixed = rng.random() < 0.2
        attributes = {"k": 1, "payload": "p" * payload} if payload else None
        spans = [s for _ in range(traces or rng.randint(1, 10))
                 for s in make_trace(self.trace_id(), rng.randint(2, 8), rng, base, attributes)]  # fmt: skip
        trace = spans[0].trace_id
        if json_body:
            bad: list[Span] = []
            if mixed:
                bad.append(Span(trace, f"{900:016x}", f"{1:016x}", "svc-bad", "BADNAME", base, base + MS, SpanKind.SERVER,
                                Status(), {}, Resource({"service.name": "svc-bad"})))  # fmt: skip
                if rng.random() < 0.5:
                    bad.append(Span(trace, f"{901:016x}", f"{1:016x}", "svc-bad", "deep", base, base + MS,
                                    SpanKind.SERVER, Status(), {"deep": nested(40, "kvlist")},
                                    Resource({"service.name": "svc-bad"})))  # fmt: skip
            body = otlp_json.dumps(spans + bad).encode().replace(b"BADNAME", b"BAD\xffNAME")
            return request_from(body, wire.JSON, len(spans) + len(bad), "mixed" if mixed else "good", token)
        ws = wire.from_spans(spans)
        if mixed:
            ws += [bad_wire_span(rng.choice(BAD_KINDS), trace, 900 + k, base) for k in range(rng.randint(1, 3))]
            rng.shuffle(ws)
        return request_from(wire.encode(ws), wire.PROTOBUF, len(ws), "mixed" if mixed else "good", token)

    def oversized(self, rng: random.Random) -> Request:
        """A small root and one span with a 2 MiB attribute: more than the sink takes even alone."""
        base = time.time_ns()
        trace = self.trace_id()
        root = make_trace(trace, 1, rng, base)
        blob = Span(trace, f"{2:016x}", f"{1:016x}", "svc-0", "blob", base + MS, base + 2 * MS, SpanKind.SERVER,
                    Status(), {"blob": "x" * (2 << 20)}, Resource({"service.name": "svc-0"}))  # fmt: skip
        return request_from(wire.encode(wire.from_spans(root + [blob])), wire.PROTOBUF, 2, "oversized")


# -- clients ------------------------------------------------------------------------------------------------------


class Tally:
    """What the clients saw, and every span acknowledged."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: set[bytes] = set()
        self.answers: Counter = Counter()  # (transport, answer)
        self.requests: Counter = Counter()  # by kind: first sends
        self.acked_requests: Counter = Counter()  # by kind
        self.spans_sent = 0
        self.spans_rejected = 0
        self.mismatches: list[str] = []  # partial success that disagrees with the local decode
        self.unexpected: list[str] = []  # answers that should not happen
        self.abandoned = 0  # requests given up on (pushback at the end of the run)


def send(req: Request, transport: str, port: int, token: str, session: requests.Session | None, channel):
    """One attempt: ``(answer, rejected spans or None, retry advice s or None)``; answer is one of ok, pushback,
    down, invalid, unauthenticated, too-large, or an unexpected status."""
    auth = None if req.kind == "unauthenticated" else f"Bearer {token}"
    if transport == "grpc":
        call = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        try:
            response, _ = call.with_call(req.body, metadata=(("authorization", auth),) if auth else None, timeout=20)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                advice = dict(e.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")
                return ("pushback", None, 1.0) if advice else ("too-large", None, None)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                return "down", None, None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return "invalid", None, None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return "unauthenticated", None, None
            return f"grpc {code.name}: {e.details()}", None, None
        return "ok", parse_partial_success(response)[0], None
    headers = {"Content-Type": req.content_type, **({"Authorization": auth} if auth else {})}
    try:
        r = session.post(f"http://127.0.0.1:{port}/v1/traces", data=req.body, headers=headers, timeout=20)
    except requests.RequestException:
        return "down", None, None
    if r.status_code == 200:
        if req.content_type == wire.JSON:
            rejected = int((r.json().get("partialSuccess") or {}).get("rejectedSpans") or 0)
        else:
            rejected = parse_partial_success(r.content)[0]
        return "ok", rejected, None
    if r.status_code == 503:
        return "pushback", None, float(r.headers.get("Retry-After") or 1)
    return {400: "invalid", 401: "unauthenticated", 413: "too-large"}.get(r.status_code, f"http {r.status_code}"), None, None


def deliver(req: Request, transport: str, port: int, token: str, tally: Tally, stop: threading.Event,
            session: requests.Session | None, channel, patience_s: float = 2.0) -> None:
    """Send ``req`` until it gets a final answer (like an SDK's exporter: retry advice honoured, at most
    ``patience_s``); an acknowledged request's spans go to the tally."""
    kind = req.kind
    with tally.lock:
        tally.requests[kind] += 1
        tally.spans_sent += req.spans
    while True:
        answer, rejected, advice = send(req, transport, port, token, session, channel)
        with tally.lock:
            tally.answers[(transport, answer)] += 1
        if answer in ("pushback", "down"):
            if stop.is_set() and answer == "pushback":
                with tally.lock:
                    tally.abandoned += 1
                return
            time.sleep(min(advice or 0.3, patience_s))
            continue
        with tally.lock:
            if answer != req.expect:
                tally.unexpected.append(f"{kind} request over {transport}: {answer}")
            if answer == "ok":
                tally.acked |= req.expected
                tally.acked_requests[kind] += 1
                tally.spans_rejected += rejected or 0
                if rejected != req.rejected:
                    tally.mismatches.append(f"{transport} {req.content_type}: the receiver rejected {rejected} "
                                            f"span(s), its decoder here {req.rejected}")  # fmt: skip
        return


class Client(threading.Thread):
    """One client: steady (``rate`` requests/s made as it goes) or burst (``pile``: requests made beforehand,
    sent as fast as they are answered until the pile is empty)."""

    def __init__(self, n: int, transport: str, json_body: bool, receiver: Receiver, token: str, tally: Tally,
                 stop: threading.Event, *, workload: Workload | None = None, rate: float = 0.0, seed: int = 0,
                 pile: queue.SimpleQueue | None = None) -> None:
        super().__init__(name=f"client-{n}", daemon=True)
        self.transport, self.json_body, self.rate, self.pile = transport, json_body, rate, pile
        self.workload, self.receiver, self.token, self.tally, self.stop = workload, receiver, token, tally, stop
        self.rng = random.Random(seed)

    def next_request(self) -> Request | None:
        if self.pile is None:
            return self.workload.steady(self.rng, self.json_body)
        try:
            return self.pile.get_nowait()
        except queue.Empty:
            return None

    def run(self) -> None:
        session = requests.Session() if self.transport == "http" else None
        channel = grpc.insecure_channel(f"127.0.0.1:{self.receiver.grpc_port}") if self.transport == "grpc" else None
        port = self.receiver.http_port
        due = time.monotonic()
        try:
            while not self.stop.is_set() and (req := self.next_request()) is not None:
                deliver(req, self.transport, port, self.token, self.tally, self.stop, session, channel)
                if self.rate:
                    due = max(due + 1 / self.rate, time.monotonic() - 1.0)
                    self.stop.wait(max(0.0, due - time.monotonic()))
        finally:
            if channel is not None:
                channel.close()


def prepare_pile(workload: Workload, n: int, traces: int, payload: int, seed: int) -> queue.SimpleQueue:
    """``n`` protobuf requests of ``traces`` traces each (spans with ``payload`` bytes of attribute), made before a
    burst so that making them does not pace it (20 % mixed with bad spans, as the steady ones)."""
    rng = random.Random(seed)
    pile: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(n):
        req = workload.steady(rng, False, traces, payload)
        while req.kind not in ("good", "mixed"):  # no garbage or unauthenticated ones in a burst
            req = workload.steady(rng, False, traces, payload)
        pile.put(req)
    return pile


class Burst(threading.Thread):
    """Burst clients emptying a pile made beforehand; records how long it took and the pushback it met."""

    def __init__(self, record: dict, clients: list[Client], tally: Tally) -> None:
        super().__init__(name="burst", daemon=True)
        self.record, self.clients, self.tally = record, clients, tally

    def pushback(self) -> int:
        with self.tally.lock:
            return sum(n for (_, a), n in self.tally.answers.items() if a == "pushback")

    def run(self) -> None:
        before, t0 = self.pushback(), time.monotonic()
        for c in self.clients:
            c.start()
        for c in self.clients:
            c.join()
        self.record.update(seconds=round(time.monotonic() - t0, 1), pushback=self.pushback() - before)


# -- the run ------------------------------------------------------------------------------------------------------


def send_oversized(req: Request, transport: str, receiver: Receiver, token: str, tally: Tally,
                   stop: threading.Event) -> None:
    session = requests.Session()
    with grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
        deliver(req, transport, receiver.http_port, token, tally, stop, session, channel)


def plan(seconds: float, cycle_s: float, oversize_every_s: float, rng: random.Random) -> list[tuple[float, str, dict]]:
    """The fault timeline: ``(time, what, details)``, sorted."""
    events: list[tuple[float, str, dict]] = []
    c = 0.0
    while c < seconds:
        outage = rng.uniform(10, 30)
        start = c + 0.3 * cycle_s
        events += [(c + 0.03 * cycle_s, "prepare burst", {}),
                   (c + 0.13 * cycle_s, "burst", {}),
                   (start, "outage", {"seconds": outage}),
                   (start + outage / 2, "kill", {"during": "outage"}),
                   (start + outage, "sink back", {}),
                   (start + outage + rng.uniform(1.5, 3.0), "kill", {"during": "delivery"})]  # fmt: skip
        c += cycle_s
    t = 5.0
    while oversize_every_s > 0 and t < seconds:
        events.append((t, "oversized", {}))
        t += oversize_every_s
    return sorted(e for e in events if e[0] < seconds - 2)


GAUGES = ("buffer_memory_bytes", "buffered_spans", "outbound_requests", "log_records")
"""The receiver's gauges (``GET /metrics``) kept beside each RSS sample, to tell what the memory held."""


class RssSampler(threading.Thread):
    """The receiver's RSS (``/proc/PID/status``) every ``interval_s``, with a few of its gauges."""

    def __init__(self, receiver: Receiver, interval_s: float, token: str, t0: float) -> None:
        super().__init__(name="rss", daemon=True)
        self.receiver, self.interval_s, self.token, self.t0 = receiver, interval_s, token, t0
        self.stop = threading.Event()
        self.peak = 0
        self.peak_at = 0.0
        self.by_incarnation: dict[int, int] = {}
        self.series: list[dict] = []  # {"t", "start", "rss_mib", gauges in MiB or counts}

    def gauges(self) -> dict:
        try:
            text = requests.get(f"http://127.0.0.1:{self.receiver.http_port}/metrics", timeout=1,
                                headers={"Authorization": f"Bearer {self.token}"}).text  # fmt: skip
        except requests.RequestException:
            return {}
        out = {}
        for ln in text.splitlines():
            name, _, value = ln.partition(" ")
            name = name.removeprefix("otel_tracegen_infill_")
            if name in GAUGES:
                out[name] = round(float(value) / 2**20, 1) if name.endswith("bytes") else int(float(value))
        return out

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            rss = self.receiver.rss()
            if rss is None:
                continue
            n = self.receiver.incarnation
            self.series.append({"t": round(time.monotonic() - self.t0, 1), "start": n,
                                "rss_mib": round(rss / 2**20, 1), **self.gauges()})  # fmt: skip
            self.by_incarnation[n] = max(self.by_incarnation.get(n, 0), rss)
            if rss > self.peak:
                self.peak, self.peak_at = rss, time.monotonic() - self.t0


def machine() -> dict:
    return describe(("aiohttp", "grpcio"))


def log_summary(path: Path) -> dict:
    """The receiver's log: error lines by message (numbers blanked), tracebacks, replays after restarts."""
    errors: Counter = Counter()
    tracebacks, replayed = 0, []
    for ln in path.read_text(errors="replace").splitlines():
        if ln.startswith("Traceback"):
            tracebacks += 1
        m = re.search(r" (ERROR|CRITICAL) ([\w.]+): (.*)", ln)
        if m:
            errors[f"{m.group(2)}: {re.sub(r'[0-9]+', 'N', m.group(3))[:140]}"] += 1
        m = re.search(r"; (\d+) request\(s\) replayed", ln)
        if m:
            replayed.append(int(m.group(1)))
    return {"errors": dict(errors.most_common(20)), "tracebacks": tracebacks, "replayed_per_start": replayed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4, help="steady clients (gRPC, HTTP protobuf, HTTP JSON in turn)")
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s of each steady client")
    ap.add_argument("--burst-clients", type=int, default=6)
    ap.add_argument("--burst-requests", type=int, default=200, help="requests made beforehand for each burst")
    ap.add_argument("--burst-traces", type=int, default=40, help="traces per burst request")
    ap.add_argument("--burst-payload", type=int, default=4000, help="attribute bytes of each burst span")
    ap.add_argument("--cycle-s", type=float, default=60.0, help="one burst, one outage and two kills per cycle")
    ap.add_argument("--oversize-every-s", type=float, default=12.0, help="a 2 MiB span this often (0: never)")
    ap.add_argument("--buffer-max-mib", type=float, default=64.0)
    ap.add_argument("--buffer-wait-s", type=float, default=1.0)
    ap.add_argument("--exporter-max-request-mib", type=float, default=0.9,
                    help="the receiver's request size downstream (its default, 4, is over the sink's 1 MiB: every "
                         "large request is then refused and split)")  # fmt: skip
    ap.add_argument("--rss-interval-s", type=float, default=1.0)
    ap.add_argument("--drain-timeout-s", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the queue directory goes")
    ap.add_argument("--keep", action="store_true", help="keep the queue directory and the receiver's log")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: another job is running", file=sys.stderr)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=args.dir))
    token = f"soak-{rng.getrandbits(64):016x}"
    sink = Sink(free_port())
    sink.start()
    receiver = Receiver(args, work, sink.port, token)
    workload = Workload(args.seed)
    tally = Tally()
    stop = threading.Event()
    timeline: list[dict] = []
    t0 = time.monotonic()

    def note(what: str, **details) -> None:
        timeline.append({"t": round(time.monotonic() - t0, 2), "event": what, **details})
        print(f"  {time.monotonic() - t0:7.1f} s  {what} {' '.join(f'{k}={v}' for k, v in details.items())}",
              flush=True)

    startup = receiver.start()
    time.sleep(1.0)
    idle = receiver.rss() or 0
    bound = idle + 1.2 * args.buffer_max_mib * (1 << 20)
    note("receiver up", start_s=round(startup, 2), idle_rss_mib=round(idle / 2**20, 1))
    sampler = RssSampler(receiver, args.rss_interval_s, token, t0)
    sampler.start()
    transports = [("grpc", False), ("http", False), ("http", True)]
    clients = [Client(n, *transports[n % 3], receiver, token, tally, stop, workload=workload, rate=args.rate,
                      seed=args.seed + n) for n in range(args.clients)]  # fmt: skip
    for c in clients:
        c.start()
    seconds = args.minutes * 60
    kills: list[dict] = []
    outages: list[float] = []
    bursts: list[Burst] = []
    piles: list[futures.Future] = []
    preparer = futures.ThreadPoolExecutor(1, thread_name_prefix="pile")
    oversized = 0
    outage_started = sink_back = 0.0
    try:
        for at, what, details in plan(seconds, args.cycle_s, args.oversize_every_s, rng):
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            if what == "prepare burst":
                piles.append(preparer.submit(prepare_pile, workload, args.burst_requests, args.burst_traces,
                                             args.burst_payload, args.seed * 1000 + len(piles)))  # fmt: skip
            elif what == "burst":
                pile = piles[len(bursts)].result()
                extra = [Client(100 + k, *transports[k % 2], receiver, token, tally, stop, pile=pile)
                         for k in range(args.burst_clients)]  # fmt: skip
                record = {"t": round(time.monotonic() - t0, 1), "clients": len(extra), "requests": args.burst_requests,
                          "traces_per_request": args.burst_traces, "payload_bytes_per_span": args.burst_payload}  # fmt: skip
                burst = Burst(record, extra, tally)
                burst.start()
                bursts.append(burst)
                note("burst", clients=len(extra), requests=args.burst_requests)
            elif what == "outage":
                sink.stop()
                outage_started = time.monotonic()
                note("sink down", planned_s=round(details["seconds"], 1))
            elif what == "sink back":
                sink.start()
                sink_back = time.monotonic()
                outages.append(round(sink_back - outage_started, 1))
                note("sink up", outage_s=outages[-1])
            elif what == "kill":
                if details["during"] == "delivery":  # wait (5 s at most) for the backlog to start arriving
                    deadline = time.monotonic() + 5
                    while sink.last_request < sink_back and time.monotonic() < deadline:
                        time.sleep(0.05)
                delivering = sink.up and time.monotonic() - sink.last_request < 1.0
                rss = receiver.rss()
                receiver.kill9()
                took = receiver.start()
                kills.append({"t": round(time.monotonic() - t0, 1), "during": details["during"], "sink_up": sink.up,
                              "sink_took_a_request_in_the_last_s": delivering, "restart_s": round(took, 2),
                              "rss_before_mib": round((rss or 0) / 2**20, 1)})  # fmt: skip
                note("kill -9 and restart", during=details["during"], delivering=delivering, restart_s=round(took, 2))
            elif what == "oversized":
                req = workload.oversized(rng)
                transport = "grpc" if oversized % 2 == 0 else "http"
                threading.Thread(target=send_oversized, args=(req, transport, receiver, token, tally, stop),
                                 daemon=True).start()  # fmt: skip
                oversized += 1
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        note("load stops")
        stop.set()
        for c in clients + bursts:
            c.join(60)
        if not sink.up:
            sink.start()
        drain_start = time.monotonic()
        dead, reasons = receiver.dead_letters()
        while time.monotonic() - drain_start < args.drain_timeout_s:
            with tally.lock:
                acked = set(tally.acked)
            dead, reasons = receiver.dead_letters()
            with sink._lock:
                missing = acked - sink.arrived - dead
            if not missing:
                break
            time.sleep(1.0)
        note("drained" if not missing else "drain timed out", seconds=round(time.monotonic() - drain_start, 1),
             missing=len(missing))  # fmt: skip
        rc = receiver.terminate()
        note("receiver stopped (SIGTERM)", exit_code=rc)
        time.sleep(0.5)
    finally:
        stop.set()
        preparer.shutdown(wait=False, cancel_futures=True)
        sampler.stop.set()
        if receiver.proc is not None and receiver.proc.poll() is None:
            receiver.kill9()
        sink.stop()

    dead, reasons = receiver.dead_letters()
    with sink._lock:
        arrived = sink.arrived & tally.acked
        missing = tally.acked - sink.arrived - dead
        duplicates = sink.spans - len(sink.arrived)
    pushback = {f"{t} {'503' if t == 'http' else 'RESOURCE_EXHAUSTED'}": n for (t, a), n in tally.answers.items()
                if a == "pushback"}  # fmt: skip
    logs = log_summary(receiver.log_path)
    ok_rss = sampler.peak <= bound
    failures = []
    if missing:
        failures.append(f"{len(missing)} acknowledged span(s) never arrived")
    if not ok_rss:
        failures.append(f"peak RSS {sampler.peak / 2**20:.1f} MiB over the bound {bound / 2**20:.1f} MiB")
    if tally.mismatches:
        failures.append(f"{len(tally.mismatches)} partial success answer(s) disagree with the receiver's decoder")
    if tally.unexpected:
        failures.append(f"{len(tally.unexpected)} unexpected answer(s)")
    result = {
        "command": "python3 " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "machine": machine(), "load_before": load, "load_after": os.getloadavg()[0],
        "settings": recorded_settings({k: v for k, v in vars(args).items()}, ROOT),
        "seconds": round(time.monotonic() - t0, 1),
        "spans": {"sent": tally.spans_sent, "rejected_by_partial_success": tally.spans_rejected,
                  "acknowledged": len(tally.acked), "arrived": len(arrived), "dead_lettered": len(dead & tally.acked),
                  "missing": len(missing), "duplicates_at_sink": duplicates,
                  "extra_at_sink": len(sink.arrived - tally.acked)},  # answers lost to a kill, spans repair made
        "requests": {"sent": dict(tally.requests), "acknowledged": dict(tally.acked_requests),
                     "abandoned_under_pushback_at_the_end": tally.abandoned,
                     "answers": {f"{t} {a}": n for (t, a), n in sorted(tally.answers.items())}},
        "pushback": pushback, "kills": kills, "outages_s": outages, "bursts": [b.record for b in bursts], "oversized_requests": oversized,
        "dead_letters": dict(reasons),
        "rss": {"idle_mib": idle / 2**20, "buffer_max_mib": args.buffer_max_mib, "bound_mib": bound / 2**20,
                "peak_mib": sampler.peak / 2**20, "peak_at_s": round(sampler.peak_at, 1),
                "peak_by_start_mib": {k: round(v / 2**20, 1) for k, v in sampler.by_incarnation.items()},
                "within_bound": ok_rss, "samples": sampler.series},
        "partial_success_mismatches": tally.mismatches[:20], "unexpected_answers": tally.unexpected[:20],
        "missing_examples": [m.hex() for m in sorted(missing)[:20]], "receiver_log": logs,
        "timeline": timeline, "failures": failures,
    }  # fmt: skip
    print()
    s = result["spans"]
    print(f"spans: sent {s['sent']}, rejected by partial success {s['rejected_by_partial_success']}, acknowledged "
          f"{s['acknowledged']}, arrived {s['arrived']}, dead-lettered (too large) {s['dead_lettered']}, missing "
          f"{s['missing']}; duplicates at the sink {s['duplicates_at_sink']}; arrived without an acknowledgement "
          f"(its answer lost to a kill, or made by repair) {s['extra_at_sink']}")  # fmt: skip
    print(f"requests sent: {dict(tally.requests)}; answers: {result['requests']['answers']}")
    print(f"faults: {len(kills)} kill -9 ({sum(k['during'] == 'outage' for k in kills)} during an outage, "
          f"{sum(k['during'] == 'delivery' for k in kills)} during delivery), {len(outages)} outages {outages} s, "
          f"{len(bursts)} bursts (pushback met: {[b.record.get('pushback') for b in bursts]}), {oversized} oversized "
          f"requests; dead letters {dict(reasons)}")  # fmt: skip
    print(f"pushback answers: {pushback or 'none'}")
    print(f"RSS: idle {idle / 2**20:.1f} MiB, peak {sampler.peak / 2**20:.1f} MiB at {sampler.peak_at:.0f} s, bound "
          f"{bound / 2**20:.1f} MiB (idle + 1.2 x {args.buffer_max_mib:g} MiB): "
          f"{'within' if ok_rss else 'OVER'}")  # fmt: skip
    print(f"receiver log: {logs['tracebacks']} traceback(s); errors {logs['errors'] or 'none'}")
    if tally.mismatches or tally.unexpected:
        print(f"anomalies: {tally.mismatches[:5]} {tally.unexpected[:5]}")
    info = result["machine"]
    print(f"machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}; load "
          f"average {load:.2f} before, {result['load_after']:.2f} after; {result['seconds']:.0f} s")
    print("verdict: " + ("; ".join(failures) if failures else "nothing acknowledged was lost, RSS within its bound"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
