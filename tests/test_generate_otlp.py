"""``otel-tracegen generate`` over real OTLP on loopback: into a grpcio sink, into an HTTP sink, and through a
real collector (``rotel``, from PyPI) that forwards to the grpcio sink. What arrives must be what was
generated: the same spans, trees and attributes (compared with the file the same run writes).

A collector that is down must not be silent: the command says how many spans were not delivered and fails.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
grpc = pytest.importorskip("grpc")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from otel_tracegen.cli import ExitStatus
from otel_tracegen.formats import read_traces
from otel_tracegen.formats.otlp_proto import loads
from otel_tracegen.report import ReadReport
from otel_tracegen.trace import SpanKind, group_traces

from .cli_helpers import free_port, one_thread, rotel_forwarding, run  # noqa: F401 - one_thread: autouse fixture

ARGS = ["--count", "12", "--calls", "7", "--depth", "3", "--seed", "3", "--start-time", "2026-01-02T00:00:00Z"]



@pytest.fixture(scope="module")
def model_dir(pretrained) -> Path:
    return pretrained  # the session's tiny model: only read here


class GrpcSink(trace_service_pb2_grpc.TraceServiceServicer):
    """A gRPC OTLP trace receiver that keeps every request."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        self.requests.append(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self):
        return [s for r in self.requests for s in loads(r)]


@pytest.fixture
def grpc_sink():
    sink = GrpcSink()
    yield sink
    sink.server.stop(0)


def _wire(s):
    # The SDK's span kinds have no UNSPECIFIED: the exporter sends such spans as INTERNAL.
    kind = SpanKind.INTERNAL if s.kind == SpanKind.UNSPECIFIED else s.kind
    return (s.span_id, s.parent_id, s.service, s.name, kind, s.start_ns, s.end_ns, s.status.code, s.attributes)


def _same_traces(received_spans, file_traces):
    got = {t.trace_id: t for t in group_traces(received_spans)}
    assert len(got) == len(file_traces)
    for want in file_traces:
        have = got[want.trace_id]
        assert sorted(map(_wire, have), key=repr) == sorted(map(_wire, want), key=repr)
        for s in have:
            assert s.resource.attributes["service.name"] == s.service
            assert s.resource.attributes["otel_tracegen.synthetic"] is True
            assert s.scope.name == "otel-tracegen"


def test_generate_over_grpc_delivers_exactly_what_the_file_holds(model_dir, grpc_sink, tmp_path):
    out = tmp_path / "t.otlp.jsonl"
    rc, _, err = run("generate", "--model", str(model_dir), *ARGS, "--out", str(out),
                     "--otlp-endpoint", f"127.0.0.1:{grpc_sink.port}", "--otlp-insecure", "--workers", "2",
                     "--otlp-header", 'x-tenant="team-a"')
    assert rc == ExitStatus.SUCCESS, err
    assert "84 spans delivered, 0 failed" in err
    _same_traces(grpc_sink.spans(), read_traces("otlp-json", [out], ReadReport()))


def test_generate_over_http(model_dir, tmp_path):
    bodies, headers = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            bodies.append(body)
            headers.append((self.path, self.headers.get("Content-Type"), self.headers.get("x-tenant")))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "t.json"
        rc, _, err = run("generate", "--model", str(model_dir), *ARGS, "--out", str(out), "--otlp-http",
                         "--otlp-endpoint", f"127.0.0.1:{server.server_port}", "--otlp-insecure",
                         "--otlp-header", "x-tenant=team-b")
    finally:
        server.shutdown()
    assert rc == ExitStatus.SUCCESS, err
    assert headers and all(h == ("/v1/traces", "application/x-protobuf", "team-b") for h in headers)
    _same_traces([s for b in bodies for s in loads(b)], read_traces("otlp-json", [out], ReadReport()))


def test_a_collector_that_is_down_is_reported_not_silent(model_dir, tmp_path):
    out = tmp_path / "t.json"
    rc, _, err = run("generate", "--model", str(model_dir), *ARGS, "--out", str(out),
                     "--otlp-endpoint", f"127.0.0.1:{free_port()}", "--otlp-insecure")
    assert rc == ExitStatus.INVALID
    assert "0 spans delivered, 84 failed" in err
    assert len(read_traces("otlp-json", [out], ReadReport())) == 12  # the file still has everything


def test_generated_traces_arrive_intact_through_the_rotel_collector(model_dir, grpc_sink, tmp_path):
    with rotel_forwarding(tmp_path, grpc_sink.port) as grpc_port:
        out = tmp_path / "t.json"
        rc, _, err = run("generate", "--model", str(model_dir), *ARGS, "--out", str(out),
                         "--otlp-endpoint", f"127.0.0.1:{grpc_port}", "--otlp-insecure")
        assert rc == ExitStatus.SUCCESS, err
        deadline = time.time() + 20
        while len(grpc_sink.spans()) < 84 and time.time() < deadline:
            time.sleep(0.1)
    _same_traces(grpc_sink.spans(), read_traces("otlp-json", [out], ReadReport()))


def test_conventions_traces_alias_attributes_and_the_environment(model_dir, grpc_sink, monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,service.name=ignored")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "also-ignored")
    rc, _, err = run("generate", "--model", str(model_dir), "--traces", "4", "--seed", "1", "--otlp-endpoint",
                     f"127.0.0.1:{grpc_sink.port}", "--otlp-insecure", "--otlp-attributes", 'team="load"',
                     "--otlp-attributes", "shard=3", "--telemetry-attributes", "test.run=true")  # fmt: skip
    assert rc == ExitStatus.SUCCESS, err
    spans = grpc_sink.spans()
    assert len(group_traces(spans)) == 4
    for s in spans:
        res = s.resource.attributes
        assert res["service.name"] == s.service not in ("ignored", "also-ignored")
        assert res["deployment.environment"] == "staging" and res["team"] == "load" and res["shard"] == 3
        assert res["otel_tracegen.synthetic"] is True
        assert s.attributes["test.run"] is True


def test_generate_says_once_when_decoding_falls_behind_the_rate(model_dir, tmp_path, monkeypatch):
    from otel_tracegen.emit import generate

    monkeypatch.setattr(generate, "BEHIND_S", 0.0)  # any delay counts, so that a tiny model falls behind too
    rc, _, err = run("generate", "--model", str(model_dir), "--count", "6", "--rate", "1000000", "--out",
                     str(tmp_path / "t.json"))  # fmt: skip
    assert rc == ExitStatus.SUCCESS, err
    assert err.count("decoding cannot keep --rate 1e+06 traces/s") == 1
    assert "otel-tracegen replay" in err
