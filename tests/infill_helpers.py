"""What the infill receiver's tests share: a downstream sink, a small trace, polling, calls and a served process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import requests

from otel_tracegen.infill import wire
from otel_tracegen.infill.receiver import GrpcReceiver, HttpReceiver
from otel_tracegen.infill.repair import TraceRepairer
from otel_tracegen.infill.service import InfillConfig, InfillService
from otel_tracegen.trace import Resource, Span, SpanKind, Status

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
MS = 1_000_000


def wait_for(cond, timeout: float = 20.0, what="condition") -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` (a string, or a callable saying what is missing)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what() if callable(what) else what}")


class Sink:
    """An OTLP/gRPC endpoint recording raw request bytes (the downstream: Jaeger or Tempo in production)."""

    def __init__(self, port: int = 0, max_message_bytes: int | None = None) -> None:
        self.bodies: list[bytes] = []
        self.replies: list = []
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self._export)})
        options = [("grpc.max_receive_message_length", max_message_bytes)] if max_message_bytes else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler], options=options)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def _export(self, request: bytes, context) -> bytes:
        if self.replies:
            return self.replies.pop(0)(context)
        self.bodies.append(request)
        return b""

    def spans(self) -> list[wire.WireSpan]:
        return [w for b in self.bodies for w in wire.decode(b)]

    def stop(self) -> None:
        self.server.stop(0)


def trace_spans(trace: str = "ab" * 16, prefix: str = "00000000000000") -> list[Span]:
    """root(a) -> b -> c, root -> d, each service on its own host."""

    def span(i, parent, service, name, start, end):
        return Span(trace, f"{prefix}{i:02x}", f"{prefix}{parent:02x}" if parent else None, service, name,
                    start * MS, end * MS, SpanKind.SERVER, Status(), {"k": i},
                    Resource({"service.name": service, "host.name": f"h-{service}"}))  # fmt: skip

    return [span(1, 0, "a", "GET /", 0, 100), span(2, 1, "b", "call", 10, 60), span(3, 2, "c", "query", 20, 40),
            span(4, 1, "d", "work", 70, 90)]  # fmt: skip


def grpc_call(port: int, body: bytes, metadata=None):
    """One ``Export`` call with raw bytes: ``(response bytes, call)``; raises grpc.RpcError."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        return call.with_call(body, metadata=metadata, timeout=10)


def serve(tmp_path: Path, downstream: int, grpc_port: int, http_port: int, *flags: str) -> subprocess.Popen:
    """``otel-tracegen infill serve`` as a process of its own (rules only), its log in ``tmp_path/serve.log``;
    returns once it answers ``/healthz``."""
    cmd = [sys.executable, "-m", "otel_tracegen", "infill", "serve", "--repair-no-model",
           "--receiver-grpc", f"127.0.0.1:{grpc_port}", "--receiver-http", f"127.0.0.1:{http_port}",
           "--queue-directory", str(tmp_path / "queue"), "--buffer-wait-s", "0.3",
           "--exporter-endpoint", f"127.0.0.1:{downstream}", "--exporter-insecure",
           "--exporter-retry-initial-s", "0.05", "--exporter-retry-max-s", "0.2", "--exporter-timeout-s", "2", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "ab"))
    wait_for(lambda: requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).ok if listening(http_port) else False,
             what="the receiver to listen")  # fmt: skip
    return proc


def serve_until(tmp_path: Path, downstream: int, grpc_port: int, http_port: int, delivered, what: str,
                timeout: float = 30.0, sink: Sink | None = None) -> int:
    """Start :func:`serve` again (after a kill) in front of ``sink`` (a new one on ``downstream`` if None), wait
    until ``delivered(sink)``, then stop it with SIGTERM (and the sink, if it was made here): its exit status."""
    own = sink is None
    sink = Sink(downstream) if own else sink
    proc = serve(tmp_path, downstream, grpc_port, http_port)
    try:
        wait_for(lambda: delivered(sink), timeout=timeout, what=what)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
        if own:
            sink.stop()
    return status


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0




class Running:
    """A receiver running in this process: the service and its two receivers."""

    def __init__(self, service: InfillService, grpc_r: GrpcReceiver, http_r: HttpReceiver) -> None:
        self.service, self.grpc, self.http = service, grpc_r, http_r
        self.url = f"http://127.0.0.1:{http_r.port}"

    def stop(self, drain: bool = True) -> None:
        self.grpc.stop(0)
        self.http.stop()
        self.service.stop(drain)


def start_receiver(tmp_path: Path, downstream_port: int, *, token: str | None = None, tls=None,
                   **overrides) -> Running:
    """The receiver (rules only, short waits and retries) in front of 127.0.0.1:``downstream_port``;
    ``overrides`` are :class:`InfillConfig` fields, ``tls`` (certificate, key) files for the HTTP receiver."""
    settings = dict(receiver_grpc="127.0.0.1:0", receiver_http="127.0.0.1:0", buffer_wait_s=0.2,
                    repair_no_model=True, queue_directory=str(tmp_path / "queue"),
                    exporter_endpoint=f"127.0.0.1:{downstream_port}", exporter_insecure=True,
                    exporter_retry_initial_s=0.05, exporter_retry_max_s=0.2, exporter_timeout_s=2, drain_s=5)
    config = InfillConfig(**{**settings, **overrides})
    service = InfillService(config, TraceRepairer(None, None, config.repair_settings()))
    limit = int(config.receiver_max_message_mib * (1 << 20))
    g = GrpcReceiver(service, "127.0.0.1:0", max_message_bytes=limit, token=token, workers=config.receiver_workers)
    h = HttpReceiver(service, "127.0.0.1:0", max_message_bytes=limit, token=token, tls=tls,
                     workers=config.receiver_workers, read_timeout_s=config.receiver_read_timeout_s,
                     metrics_public=config.metrics_public)  # fmt: skip
    service.start()
    g.start()
    h.start()
    return Running(service, g, h)


def rss_of(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def peak_rss_while(pid: int, threads) -> int:
    """The highest RSS of process ``pid`` seen (every 50 ms) while any of ``threads`` runs."""
    peak = rss_of(pid)
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_of(pid))
        time.sleep(0.05)
    return peak
