"""The native OTLP sender against the SDK exporter, its reference, over real sockets on loopback.

Both senders send the same traces into sinks that record the raw request bytes (a grpcio generic handler without
deserializer, an HTTP server); the bytes must be equal (after gunzip). Then what a sender must do beyond the
bytes: headers arrive, gzip is on the wire, retryable errors are retried and delivered, other errors and
partial successes are counted as failed spans, a down endpoint is counted, TLS settings from
``OTEL_EXPORTER_OTLP_*`` are honoured, and the settings resolve exactly as the SDK exporter resolves them.
A property checks the encoder alone on random canonical traces (every field the format has).
"""

from __future__ import annotations

import gzip
import logging
import socket
import ssl
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from otel_tracegen.emit import transport
from otel_tracegen.formats import read_traces
from otel_tracegen.emit.sender import OtlpSettings, make_sender, to_readable_spans
from otel_tracegen.emit.wire import encode_traces, parse_partial_success, parse_retry_delay
from otel_tracegen.report import ReadReport, UserError
from otel_tracegen.semconv import attributes_for
from otel_tracegen.trace import Event, Link, Resource, Scope, Span, SpanKind, Status, StatusCode, Trace

from .strategies import traces as trace_strategy

TESTDATA = Path(__file__).parent / "testdata"
SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No OTEL_* from the outside: each test sets what it means."""
    import os

    for name in list(os.environ):
        if name.startswith(("OTEL_EXPORTER_OTLP", "OTEL_PYTHON_EXPORTER_OTLP")):
            monkeypatch.delenv(name)


def sdk_bytes(traces) -> bytes:
    """The reference encoding: what the SDK exporter serializes for these traces."""
    return encode_spans(to_readable_spans(traces)).SerializeToString()


# --- traces ---------------------------------------------------------------------------------------------------


def sample_traces(n: int = 40) -> list[Trace]:
    """Generated-like traces with everything the SDK mapping touches: one resource per service with
    str/int/float/bool attributes, a schema URL, semconv attributes, every kind (UNSPECIFIED too), ERROR with a
    message, OK with one (dropped by the SDK), events, links, trace state, flags, dropped counts, a span without
    resource and one without scope."""
    scope = Scope("otel-tracegen")
    lib = Scope("io.opentelemetry.grpc", "1.2.0", {"lib.threads": 4, "lib.on": True}, 3, "https://opentelemetry.io/s/1")
    resources = {
        "frontend": Resource({"service.name": "frontend", "otel_tracegen.synthetic": True, "host.cpus": 2,
                              "load": 0.25}, 2, "https://opentelemetry.io/schemas/1.21.0"),
        "cart": Resource({"service.name": "cart", "otel_tracegen.synthetic": True}),
        "redis": Resource({"service.name": "redis", "otel_tracegen.synthetic": True, "": "dropped by the SDK"}),
    }  # fmt: skip
    calls = [("frontend", "GET /cart", SpanKind.SERVER), ("cart", "oteldemo.CartService/GetCart", SpanKind.CLIENT),
             ("redis", "HGET", SpanKind.UNSPECIFIED), ("cart", "publish orders", SpanKind.PRODUCER),
             ("cart", "consume orders", SpanKind.CONSUMER), ("frontend", "render", SpanKind.INTERNAL)]  # fmt: skip
    statuses = (Status(), Status(StatusCode.ERROR, "connection reset"), Status(StatusCode.OK, "fine"))
    out = []
    for t in range(n):
        tid = f"{0x5B8EFFF798038103D269B633813FC60C + t:032x}"
        start = 1_700_000_000_000_000_000 + t * 10_000_000
        spans = []
        for i, (service, name, kind) in enumerate(calls):
            status = statuses[(t + i) % 3]
            span = Span(tid, f"{(t << 8) + i + 1:016x}", None if i == 0 else f"{(t << 8) + 1:016x}", service, name,
                        start + i * 1000, start + 5_000_000 - i * 1000, kind, status,
                        attributes_for(name, kind, status.code), resources[service], scope)  # fmt: skip
            if i == 2:
                span.events = [Event(start + 2000, "exception", {"exception.type": "TimeoutError", "retry": 1.5,
                                                                  "exception.escaped": False})]  # fmt: skip
                span.links = [Link(f"{t + 1:032x}", f"{t + 7:016x}", "rojo=00f067aa0ba902b7", {"link.kind": "x"}, 1,
                                   0x301)]  # fmt: skip
                span.trace_state, span.flags, span.dropped_attributes_count = "congo=t61rcWkgMzE", 0x101, 3
            if i == 4:
                span.scope = lib if t % 2 else None
            if i == 5 and t % 4 == 0:
                span.resource = None  # the default resource, service.name only
            spans.append(span)
        out.append(Trace(spans, tid))
    return out


def real_world_traces() -> list[tuple[str, list[Trace]]]:
    """Captured files of every readable kind in tests/testdata (resources and scopes as real SDKs write them)."""
    out = [("collector file exporter", read_traces("otlp-json", [TESTDATA / "otlp" / "collector_file_exporter.jsonl"],
                                                   ReadReport()))]  # fmt: skip
    for fmt, folder in (("otlp-json", "otlp-json"), ("zipkin", "zipkin"), ("jaeger", "jaeger")):
        for path in sorted((TESTDATA / "realworld" / folder).glob("*.json*")):
            out.append((path.name, read_traces(fmt, [path], ReadReport())))
    return out


# --- sinks ----------------------------------------------------------------------------------------------------


class GrpcSink:
    """An OTLP/gRPC trace endpoint that records raw request bytes and metadata and answers from ``replies``
    (each a function of the servicer context returning response bytes; an empty list: plain success)."""

    def __init__(self, server_credentials=None) -> None:
        self.requests: list[tuple[bytes, dict]] = []
        self.replies: list = []
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self._export)}  # no (de)serializers: bytes
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
        if server_credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("localhost:0", server_credentials)
        self.server.start()

    def _export(self, request: bytes, context) -> bytes:
        self.requests.append((request, dict(context.invocation_metadata())))
        if self.replies:
            return self.replies.pop(0)(context)
        return b""

    def bodies(self) -> list[bytes]:
        return [r for r, _ in self.requests]


def abort(code, retry_after_s: float | None = None):
    def reply(context):
        if retry_after_s is not None:
            from google.rpc.error_details_pb2 import RetryInfo

            info = RetryInfo()
            info.retry_delay.FromNanoseconds(int(retry_after_s * 1e9))
            context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
        context.abort(code, f"sink says {code.name}")

    return reply


def partial(rejected: int, message: str):
    response = ExportTraceServiceResponse()
    response.partial_success.rejected_spans = rejected
    response.partial_success.error_message = message
    return lambda context: response.SerializeToString()


@pytest.fixture
def grpc_sink():
    sink = GrpcSink()
    yield sink
    sink.server.stop(0)


class HttpSink:
    """An OTLP/HTTP endpoint recording (path, headers, raw body); ``replies`` are (status, headers, body)."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.requests: list[tuple[str, dict, bytes]] = []
        self.replies: list[tuple[int, dict, bytes]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers, reply = sink.replies.pop(0) if sink.replies else (200, {}, b"")
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown

    def bodies(self) -> list[bytes]:
        return [gzip.decompress(b) if h.get("content-encoding") == "gzip" else b for _, h, b in self.requests]


@pytest.fixture
def http_sink():
    sink = HttpSink()
    yield sink
    sink.server.shutdown()


def send(settings: OtlpSettings, traces, sender: str = "native", workers: int = 1):
    out = make_sender(settings, sender=sender, workers=workers)
    assert out.kind == sender, out.note
    out.send(traces)
    return out.close()


def grpc_settings(port: int, **kw) -> OtlpSettings:
    return OtlpSettings(endpoint=f"127.0.0.1:{port}", insecure=True, **kw)


def http_settings(port: int, **kw) -> OtlpSettings:
    return OtlpSettings(endpoint=f"127.0.0.1:{port}", protocol="http/protobuf", insecure=True, **kw)


# --- the same bytes -------------------------------------------------------------------------------------------


def test_the_encoder_writes_the_sdk_bytes_for_generated_like_and_captured_traces():
    assert encode_traces(sample_traces()) == sdk_bytes(sample_traces())
    for name, traces in real_world_traces():
        assert encode_traces(traces) == sdk_bytes(traces), name


def _span(i: int, **kw) -> Span:
    fields = {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": f"{i + 1:016x}", "parent_id": None,
              "service": "svc", "name": "op", "start_ns": 1_000 + i, "end_ns": 2_000 + i}
    fields.update(kw)
    return Span(**fields)


EDGE_CASES = {
    "attributes the SDK cannot encode are left out": [
        _span(0, attributes={"big": 1 << 63, "ok": 1, "nested": [1, {"x": -(1 << 64)}], "obj": object(),
                             "empty": None, "arr": [b"\x00", 2.5, True, None], "": "empty key kept"})],
    "resources merge by content, telling types apart": [
        _span(0, resource=Resource({"service.name": "svc", "n": 1})),
        _span(1, resource=Resource({"service.name": "svc", "n": 1})),
        _span(2, resource=Resource({"service.name": "svc", "n": True})),
        _span(3, resource=Resource({"n": 1.0, "service.name": "svc"})),
        _span(4, resource=Resource({"service.name": "svc", "n": 1}, schema_url="s")),
        _span(5, resource=Resource({"service.name": "svc", "z": 0.0})),
        _span(6, resource=Resource({"service.name": "svc", "z": -0.0})),
        _span(7, resource=Resource({"service.name": "svc", "n": 1, "": "cleaned away", "m": {"": 1, "k": [1]}})),
        _span(8, resource=Resource({"service.name": "other"}))],  # the span's service wins
    "scopes merge by ==": [
        _span(0, scope=Scope("lib", "1", {"a": 1})), _span(1, scope=Scope("lib", "1", {"a": True})),
        _span(2, scope=Scope("lib", "", {"a": 1.0})), _span(3, scope=Scope("lib", "1", {"a": 1}, 5, "url")),
        _span(4, scope=Scope(schema_url="only-a-url")), _span(5), _span(6, scope=Scope())],
    "statuses, kinds, times": [
        _span(0, status=Status(StatusCode.OK, "dropped"), kind=SpanKind.UNSPECIFIED),
        _span(1, status=Status(StatusCode.ERROR, ""), start_ns=0, end_ns=0),
        _span(2, status=Status(StatusCode.ERROR, "ünïcode"), parent_id="0000000000000001", name="")],
    "short and prefixed ids (int(x, 16) takes them)": [_span(0, span_id="1f", parent_id="0x2", trace_id="ab")],
}  # fmt: skip
FAILING = {
    "a non-hex id": [_span(0, span_id="not-hex")],
    "a negative time": [_span(0, start_ns=-1)],
    "a lone surrogate in a name": [_span(0, name="\ud800")],
}


@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_cases_encode_as_the_sdk_encodes_them(name):
    traces = [Trace(EDGE_CASES[name])]
    logging.disable(logging.CRITICAL)
    try:
        assert encode_traces(traces) == sdk_bytes(traces)
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("name", FAILING)
def test_what_fails_the_sdk_batch_fails_the_native_batch(name, grpc_sink):
    traces = [Trace(FAILING[name])]
    with pytest.raises(Exception):  # noqa: B017
        sdk_bytes(traces)
    counts = send(grpc_settings(grpc_sink.port), traces)
    assert (counts.sent_spans, counts.failed_spans) == (0, 1) and counts.first_error and not grpc_sink.requests


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_grpc_same_bytes_on_the_wire_and_headers_arrive(grpc_sink, compression):
    traces = sample_traces(150)  # 900 spans: two requests
    for sender in ("sdk", "native"):
        counts = send(grpc_settings(grpc_sink.port, headers={"x-tenant": "team-a"}, compression=compression), traces,
                      sender)  # fmt: skip
        assert (counts.sent_spans, counts.failed_spans) == (900, 0)
    sdk, native = grpc_sink.requests[:2], grpc_sink.requests[2:]
    assert [b for b, _ in native] == [b for b, _ in sdk] and len(native) == 2
    assert all(m["x-tenant"] == "team-a" for _, m in grpc_sink.requests)
    assert all(m["user-agent"].startswith("otel-tracegen/") for _, m in native)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_http_same_bytes_on_the_wire_and_headers_arrive(http_sink, compression):
    traces = sample_traces(150)
    for sender in ("sdk", "native"):
        counts = send(http_settings(http_sink.port, headers={"X-Tenant": "team-b"}, compression=compression), traces,
                      sender)  # fmt: skip
        assert (counts.sent_spans, counts.failed_spans) == (900, 0)
    bodies = http_sink.bodies()
    assert bodies[2:] == bodies[:2] and len(bodies) == 4
    for path, headers, _ in http_sink.requests:
        assert path == "/v1/traces"
        assert headers["content-type"] == "application/x-protobuf" and headers["x-tenant"] == "team-b"
        assert headers.get("content-encoding") == compression


def test_generate_sends_the_same_bytes_with_either_sender(pretrained, grpc_sink, tmp_path):
    """The real thing: generated traces (same seed, same start), through the command, both senders."""
    torch = pytest.importorskip("torch")
    from otel_tracegen.cli import ExitStatus

    from .cli_helpers import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only oversubscribe the cores (see cli_helpers.one_thread)

    args = ["generate", "--model", str(pretrained), "--count", "12", "--calls", "7", "--depth", "3", "--seed", "3",
            "--start-time", "2026-01-02T00:00:00Z", "--otlp-endpoint", f"127.0.0.1:{grpc_sink.port}",
            "--otlp-insecure"]  # fmt: skip
    try:
        for sender in ("sdk", "native"):
            rc, _, err = run(*args, "--otlp-sender", sender)
            assert rc == ExitStatus.SUCCESS, err
            assert f"{sender} sender" in err and "84 spans delivered, 0 failed" in err
    finally:
        torch.set_num_threads(threads)
    bodies = grpc_sink.bodies()
    assert len(bodies) == 2 and bodies[0] == bodies[1]


class _Counter:
    """A TCP forwarder counting the bytes the client sends: tells whether gzip happened on the gRPC wire."""

    def __init__(self, target_port: int) -> None:
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_grpc_gzip_is_on_the_wire(grpc_sink):
    traces = sample_traces(60)
    size = len(encode_traces(traces))
    for compression, check in (("gzip", lambda n: n < size / 3), ("none", lambda n: n > size)):
        proxy = _Counter(grpc_sink.port)
        counts = send(grpc_settings(proxy.port, compression=compression), traces)
        proxy.listener.close()
        assert counts.failed_spans == 0 and check(proxy.sent), (compression, proxy.sent, size)
    assert grpc_sink.bodies()[0] == grpc_sink.bodies()[1] == sdk_bytes(traces)


# --- retries, failures, partial success ---------------------------------------------------------------------


def test_grpc_retryable_errors_are_retried_then_delivered(grpc_sink):
    # RetryInfo sets the delay (the SDK's rule), so the test does not wait the 1 s backoff.
    grpc_sink.replies = [abort(grpc.StatusCode.UNAVAILABLE, 0.05), abort(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.05)]
    traces = sample_traces(10)
    t = time.perf_counter()
    counts = send(grpc_settings(grpc_sink.port), traces)
    assert (counts.sent_spans, counts.failed_spans) == (60, 0) and time.perf_counter() - t < 2  # backoff: >= 2.4 s
    assert grpc_sink.bodies() == [sdk_bytes(traces)] * 3


def test_grpc_other_errors_count_the_spans_as_failed(grpc_sink):
    grpc_sink.replies = [abort(grpc.StatusCode.INVALID_ARGUMENT)]
    counts = send(grpc_settings(grpc_sink.port), sample_traces(10))
    assert (counts.sent_spans, counts.failed_spans, counts.failed_batches) == (0, 60, 1)
    assert "INVALID_ARGUMENT" in counts.first_error and len(grpc_sink.requests) == 1


def test_grpc_partial_success_counts_the_rejected_spans(grpc_sink):
    grpc_sink.replies = [partial(7, "spans older than 7 days")]
    counts = send(grpc_settings(grpc_sink.port), sample_traces(10))
    assert (counts.sent_spans, counts.failed_spans) == (53, 7)
    assert "spans older than 7 days" in counts.first_error


def test_http_retryable_status_is_retried_then_delivered(http_sink):
    http_sink.replies = [(503, {"Retry-After": "0"}, b""), (429, {"Retry-After": "0"}, b"")]
    traces = sample_traces(10)
    counts = send(http_settings(http_sink.port, compression="gzip"), traces)
    assert (counts.sent_spans, counts.failed_spans) == (60, 0)
    assert http_sink.bodies() == [sdk_bytes(traces)] * 3


def test_http_errors_and_partial_success(http_sink):
    http_sink.replies = [(400, {}, b"bad"), (200, {}, partial(2, "quota")(None))]
    counts = send(http_settings(http_sink.port), sample_traces(2))
    assert (counts.sent_spans, counts.failed_spans, counts.failed_batches) == (0, 12, 1) and "400" in counts.first_error
    counts = send(http_settings(http_sink.port), sample_traces(2))
    assert (counts.sent_spans, counts.failed_spans) == (10, 2) and "quota" in counts.first_error


def test_a_redirect_is_not_a_delivery(http_sink):
    # requests does not follow redirects for POSTs here; a 3xx from a proxy must not count as delivered
    http_sink.replies = [(307, {"Location": "/elsewhere"}, b"")]
    counts = send(http_settings(http_sink.port), sample_traces(2))
    assert (counts.sent_spans, counts.failed_spans) == (0, 12) and "307" in counts.first_error


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_down_endpoint_counts_every_span_as_failed(protocol):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    counts = send(OtlpSettings(endpoint=f"127.0.0.1:{port}", protocol=protocol, insecure=True, timeout_s=0.5),
                  sample_traces(100), workers=2)  # fmt: skip
    assert (counts.sent_spans, counts.failed_spans, counts.failed_batches) == (0, 600, 2)


def test_response_parsers():
    assert parse_partial_success(partial(3, "x")(None)) == (3, "x")
    assert parse_partial_success(b"") == (0, "") == parse_partial_success(b"\x0a\x05\x08")  # truncated: ignored
    from google.rpc.error_details_pb2 import RetryInfo

    info = RetryInfo()
    info.retry_delay.FromNanoseconds(2_500_000_000)
    assert parse_retry_delay(info.SerializeToString()) == 2.5


# --- TLS and the settings -------------------------------------------------------------------------------------


def test_grpc_mutual_tls_from_the_environment(pki, monkeypatch):
    def read(name: str) -> bytes:
        return Path(pki[name]).read_bytes()

    creds = grpc.ssl_server_credentials([(read("server.key"), read("server.pem"))], root_certificates=read("ca.pem"),
                                        require_client_auth=True)  # fmt: skip
    sink = GrpcSink(creds)
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", pki["ca.pem"])
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", pki["client.key"])
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", pki["client.pem"])
        traces = sample_traces(5)
        for sender in ("sdk", "native"):
            counts = send(OtlpSettings(endpoint=f"localhost:{sink.port}"), traces, sender)
            assert (counts.sent_spans, counts.failed_spans) == (30, 0), counts
        assert sink.bodies() == [sdk_bytes(traces)] * 2
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_CLIENT_KEY")  # no client certificate: the server refuses
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
        counts = send(OtlpSettings(endpoint=f"localhost:{sink.port}", timeout_s=0.5), traces)
        assert counts.failed_spans == 30
    finally:
        sink.server.stop(0)


def test_https_with_the_traces_certificate_variable(pki, monkeypatch):
    # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's CA file, for the SDK exporter and the
    # native sender alike (both use requests); unset here so that the OTEL_* variable decides.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    sink = HttpSink(tls=(pki["server.pem"], pki["server.key"]))
    try:
        url = f"https://localhost:{sink.port}"
        counts = send(OtlpSettings(endpoint=url, protocol="http/protobuf", timeout_s=0.5), sample_traces(5))
        assert counts.failed_spans == 30  # the CA is unknown: TLS fails
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", pki["ca.pem"])
        for sender in ("sdk", "native"):
            counts = send(OtlpSettings(endpoint=url, protocol="http/protobuf"), sample_traces(5), sender)
            assert (counts.sent_spans, counts.failed_spans) == (30, 0)
        assert sink.bodies() == [sdk_bytes(sample_traces(5))] * 2
    finally:
        sink.server.shutdown()


def test_telemetrygen_tls_flags_mutual_tls_over_grpc_and_a_ca_over_https(pki, monkeypatch):
    """--ca-cert, --mtls, --client-cert, --client-key: the same certificates as the environment's, from flags."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    creds = grpc.ssl_server_credentials([(Path(pki["server.key"]).read_bytes(), Path(pki["server.pem"]).read_bytes())],
                                        root_certificates=Path(pki["ca.pem"]).read_bytes(),
                                        require_client_auth=True)  # fmt: skip
    sink = GrpcSink(creds)
    https = HttpSink(tls=(pki["server.pem"], pki["server.key"]))
    try:
        traces = sample_traces(5)
        mtls = OtlpSettings(endpoint=f"localhost:{sink.port}", ca_cert=pki["ca.pem"], client_cert=pki["client.pem"],
                            client_key=pki["client.key"])  # fmt: skip
        for sender in ("sdk", "native"):
            counts = send(mtls, traces, sender)
            assert (counts.sent_spans, counts.failed_spans) == (30, 0), counts
            counts = send(OtlpSettings(endpoint=f"localhost:{sink.port}", ca_cert=pki["ca.pem"], timeout_s=0.5),
                          traces, sender)  # fmt: skip
            assert counts.failed_spans == 30  # no client certificate: refused
            counts = send(OtlpSettings(endpoint=f"https://localhost:{https.port}", protocol="http/protobuf",
                                       ca_cert=pki["ca.pem"]), traces, sender)  # fmt: skip
            assert (counts.sent_spans, counts.failed_spans) == (30, 0), counts
        assert sink.bodies() == [sdk_bytes(traces)] * 2
        with pytest.raises(UserError, match="both --client-cert and --client-key"):
            OtlpSettings(endpoint="localhost:1", client_cert=pki["client.pem"])
        with pytest.raises(UserError, match="TLS file not found"):
            OtlpSettings(endpoint="localhost:1", ca_cert="/nonexistent/ca.pem")
        with pytest.raises(UserError, match="drop --otlp-insecure"):
            OtlpSettings(endpoint="localhost:1", insecure=True, ca_cert=pki["ca.pem"])
    finally:
        sink.server.stop(0)
        https.server.shutdown()


GRPC_CASES = [
    ({}, {"endpoint": "127.0.0.1:4317"}),
    ({}, {"endpoint": "http://collector:4317"}),
    ({}, {}),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_HEADERS": "a=1,B=x%20y",
      "OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, {}),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t:4317", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://g:4317",
      "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "t=1", "OTEL_EXPORTER_OTLP_HEADERS": "g=1",
      "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5", "OTEL_EXPORTER_OTLP_TIMEOUT": "7",
      "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_INSECURE": "true"}, {}),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "g=1", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"},
     {"endpoint": "collector:4317", "headers": {"x-tenant": "a"}, "compression": "none", "timeout_s": 1.5}),
    ({"OTEL_EXPORTER_OTLP_INSECURE": "TRUE"}, {"endpoint": "collector:4317"}),
    ({"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "false", "OTEL_EXPORTER_OTLP_INSECURE": "true"},
     {"endpoint": "http://collector:4317"}),
    ({"OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES": "unavailable, Internal"}, {"insecure": True}),
]  # fmt: skip


@pytest.mark.parametrize("env,kw", GRPC_CASES)
def test_grpc_settings_resolve_as_the_sdk_exporter_resolves_them(env, kw, monkeypatch):
    from otel_tracegen.emit.sender import _sdk_arguments, make_exporter

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = OtlpSettings(**kw)
    ref = make_exporter(settings)
    try:
        fields = ("_endpoint", "_insecure", "_headers", "_timeout", "_compression", "_retryable_error_codes")
        if not all(hasattr(ref, f) for f in fields):
            pytest.skip("this SDK version keeps its settings elsewhere")
        got = transport.resolve_grpc(**_sdk_arguments(settings))
        assert (got.endpoint, got.insecure, got.headers, got.timeout_s) == (ref._endpoint, ref._insecure,
                                                                           ref._headers, ref._timeout)  # fmt: skip
        assert (got.compression == "gzip") == (ref._compression == grpc.Compression.Gzip)
        assert got.retryable == frozenset(c.name for c in ref._retryable_error_codes)
    finally:
        ref.shutdown()


HTTP_CASES = [
    ({}, {}),
    ({}, {"endpoint": "collector:4318", "insecure": True}),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318/", "OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=2",
      "OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_COMPRESSION": "deflate",
      "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca.pem", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/c.pem"}, {}),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "t=1",
      "OTEL_EXPORTER_OTLP_HEADERS": "g=1", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "nonsense",
      "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "brotli", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/t.pem",
      "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/k.pem", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": "/c.pem"}, {}),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=env,g=1", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"},
     {"endpoint": "http://c:4318/v1/traces", "headers": {"X-Tenant": "flag"}, "compression": "none", "timeout_s": 2}),
]  # fmt: skip


@pytest.mark.parametrize("env,kw", HTTP_CASES)
def test_http_settings_resolve_as_the_sdk_exporter_resolves_them(env, kw, monkeypatch):
    from otel_tracegen.emit.sender import _sdk_arguments, make_exporter

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = OtlpSettings(protocol="http/protobuf", **kw)
    ref = make_exporter(settings)
    client = getattr(ref, "_client", None)
    session = getattr(getattr(client, "_transport", None), "_session", None)
    if session is None or not hasattr(client, "_headers"):
        pytest.skip("this SDK version keeps its settings elsewhere")
    got = transport.resolve_http(**_sdk_arguments(settings))
    ref_headers = {k: v for k, v in client._headers.items() if k != "user-agent"}
    assert {k: v for k, v in got.headers.items() if k != "user-agent"} == ref_headers
    assert (got.url, got.timeout_s, got.compression) == (ref._endpoint, client._timeout, client._compression.value)
    assert (got.verify, got.cert) == (session.verify, getattr(session, "cert", None))


def test_what_the_native_sender_cannot_honour_falls_back_to_the_sdk_exporter(http_sink, monkeypatch, tmp_path):
    """A Python credential provider (an entry point returning a requests.Session) is the SDK's own business."""
    dist = tmp_path / "otlp_test_provider-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: otlp-test-provider\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[opentelemetry_otlp_credential_provider]\n"
                                           "test_session = requests:Session\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    from opentelemetry.util import _importlib_metadata

    cached = getattr(_importlib_metadata, "_original_entry_points_cached", None)
    if cached is not None:
        cached.cache_clear()  # the SDK caches the entry points it has seen
    monkeypatch.setenv("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER", "test_session")
    with pytest.raises(transport.NativeUnsupported, match="CREDENTIAL_PROVIDER"):
        transport.resolve_http()
    traces = sample_traces(3)
    out = make_sender(http_settings(http_sink.port), sender="native")
    assert out.kind == "sdk" and "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER" in out.note
    out.send(traces)
    assert out.close().sent_spans == 18
    assert http_sink.bodies() == [sdk_bytes(traces)]
    if cached is not None:
        cached.cache_clear()


# --- the property ---------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))  # drawing rich traces is slow
@given(st.lists(trace_strategy(rich=True), min_size=1, max_size=2))
def test_random_traces_encode_as_the_sdk_encodes_them(traces):
    """Every OTLP field drawn (nested and odd attribute values, scopes or none, resources that are equal or
    differ only in types). Where the SDK fails the batch, so must the native path."""
    logging.disable(logging.CRITICAL)  # the SDK logs each attribute it leaves out
    try:
        try:
            want = sdk_bytes(traces)
        except Exception:  # noqa: BLE001 - the batch fails either way (the exception types differ)
            with pytest.raises(Exception):  # noqa: B017
                encode_traces(traces)
            return
        assert encode_traces(traces) == want
    finally:
        logging.disable(logging.NOTSET)


def test_the_native_modules_import_without_opentelemetry_or_grpc():
    """grpc, requests and opentelemetry are imported when a sender is made, not when the modules are."""
    from .test_imports import _import_with_blocked

    p = _import_with_blocked(["otel_tracegen.emit.wire", "otel_tracegen.emit.transport", "otel_tracegen.emit.sender"],
                             {"opentelemetry", "grpc", "requests", "torch"})  # fmt: skip
    assert p.returncode == 0, p.stderr
