"""OTLP receivers: gRPC ``TraceService/Export`` and HTTP ``POST /v1/traces``, as the OTLP specification asks.

- **Partial success.** Malformed spans are refused one by one and named in ``partial_success`` (``rejected_spans``
  and ``error_message``); the good spans of the same request are taken.
- **Malformed requests.** A body that is not an ``ExportTraceServiceRequest`` gets ``INVALID_ARGUMENT`` / HTTP 400
  with a ``google.rpc.Status`` whose message says what was wrong. Too big: ``RESOURCE_EXHAUSTED`` (gRPC's own
  limit) / HTTP 413. Unsupported content type: HTTP 415.
- **Pressure.** When the queue is full: ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` (in ``grpc-status-details-bin``
  and in the ``google.rpc.retryinfo-bin`` trailer the OTel SDKs read) / HTTP 503 with ``Retry-After``.
- **Encodings.** Protobuf and JSON over HTTP (the answer in the request's encoding), gzip on both transports.
- **Security.** Loopback by default; TLS from a certificate and key; an optional bearer token
  (``authorization: Bearer ...``), refused with ``UNAUTHENTICATED`` / HTTP 401.

The HTTP receiver also serves ``GET /metrics`` (Prometheus text) and ``GET /healthz``.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..formats._otlp_common import length_delimited, varint
from ..report import UserError
from . import wire
from .service import InfillService, Pressure

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
HTTP_PATH = "/v1/traces"
CODE_INVALID_ARGUMENT, CODE_RESOURCE_EXHAUSTED, CODE_UNAVAILABLE, CODE_UNAUTHENTICATED = 3, 8, 14, 16
RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


# --- messages, by hand (a few fields each) -------------------------------------------------------------------


def export_response(rejected: int, message: str) -> bytes:
    """``ExportTraceServiceResponse``: ``partial_success`` 1 (``rejected_spans`` 1, ``error_message`` 2), left out
    on full success as the spec asks."""
    if not rejected and not message:
        return b""
    body = (b"\x08" + varint(rejected) if rejected else b"") + (
        length_delimited(b"\x12", message.encode()) if message else b"")
    return length_delimited(b"\x0a", body)


def retry_info(seconds: float) -> bytes:
    """``google.rpc.RetryInfo``: ``retry_delay`` 1, a ``Duration`` (seconds 1, nanos 2)."""
    whole = int(seconds)
    nanos = int(round((seconds - whole) * 1e9))
    duration = (b"\x08" + varint(whole) if whole else b"") + (b"\x10" + varint(nanos) if nanos else b"")
    return length_delimited(b"\x0a", duration)


def rpc_status(code: int, message: str, retry_after_s: float | None = None) -> bytes:
    """``google.rpc.Status``: code 1, message 2, details 3 (``Any``: type_url 1, value 2)."""
    out = b"\x08" + varint(code) + length_delimited(b"\x12", message.encode())
    if retry_after_s is not None:
        detail = length_delimited(b"\x0a", RETRY_INFO_TYPE.encode()) + length_delimited(b"\x12", retry_info(retry_after_s))
        out += length_delimited(b"\x1a", detail)
    return out


def _authorized(expected: str | None, header: str | None) -> bool:
    if not expected:
        return True
    return header is not None and hmac.compare_digest(header.strip().encode(), f"Bearer {expected}".encode())


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"receiver endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


# --- gRPC ---------------------------------------------------------------------------------------------------


class GrpcReceiver:
    """``TraceService/Export`` on a grpcio server (raw bytes in and out: no message classes)."""

    def __init__(self, service: InfillService, endpoint: str, *, max_message_bytes: int, token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None, workers: int = 8) -> None:
        import grpc

        self._grpc, self.service, self.token = grpc, service, token
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infill-grpc"),
                                  options=[("grpc.max_receive_message_length", max_message_bytes)])  # fmt: skip
        handler = grpc.unary_unary_rpc_method_handler(self._export, request_deserializer=None, response_serializer=None)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Export": handler})])
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port(endpoint, creds)
        else:
            self.port = self.server.add_insecure_port(endpoint)
        if not self.port:
            raise OSError(f"cannot listen for OTLP/gRPC on {endpoint}")

    def _export(self, request: bytes, context) -> bytes:
        grpc = self._grpc
        if self.token:
            auth = dict(context.invocation_metadata()).get("authorization")
            if not _authorized(self.token, auth):
                self.service.metrics.inc("refused_requests_total", reason="unauthenticated")
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            rejected, message = self.service.export(request)
        except wire.MalformedRequest as e:
            context.set_trailing_metadata((("grpc-status-details-bin", rpc_status(CODE_INVALID_ARGUMENT, str(e))),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Pressure as e:
            context.set_trailing_metadata((
                ("grpc-status-details-bin", rpc_status(CODE_RESOURCE_EXHAUSTED, str(e), e.retry_after_s)),
                ("google.rpc.retryinfo-bin", retry_info(e.retry_after_s)),
            ))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Exception as e:  # noqa: BLE001 - the log could not take it (disk full, shutting down): retry later
            log.exception("could not take a request")
            self.service.metrics.inc("refused_requests_total", reason="unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the receiver cannot take data now ({type(e).__name__}: "
                          f"{e}); retry later")  # fmt: skip
        return export_response(rejected, message)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace_s: float = 5.0) -> None:
        self.server.stop(grace_s).wait()


# --- HTTP ---------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "otel-tracegen-infill"
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stops sending mid-request does not hold a thread forever

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("http: " + format, *args)

    def _reply(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _status(self, http: int, code: int, message: str, json_body: bool, headers: dict | None = None,
                retry_after_s: float | None = None) -> None:
        if json_body:
            body = json.dumps({"code": code, "message": message}).encode()
            self._reply(http, body, wire.JSON, headers)
        else:
            self._reply(http, rpc_status(code, message, retry_after_s), wire.PROTOBUF, headers)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        receiver: HttpReceiver = self.server.receiver  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        if path == "/metrics":
            self._reply(200, receiver.service.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path in ("/healthz", "/"):
            self._reply(200, b"ok\n", "text/plain")
        elif path == "/localize":  # trace ids and timings: behind the bearer token when there is one
            if not _authorized(receiver.token, self.headers.get("Authorization")):
                self._reply(401, b"missing or wrong bearer token\n", "text/plain", {"WWW-Authenticate": "Bearer"})
            else:
                self._localize(receiver.service)
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _localize(self, service) -> None:
        """``GET /localize?window=2m&baseline=10m[&end=now|latest|TIME][&top=5]``: the localize ranking of the
        traces this receiver forwarded lately (JSON, as ``otel-tracegen localize --json``)."""
        from urllib.parse import parse_qs, urlsplit

        if service.recent is None:
            self._reply(404, b"localization is off: start with --localize-keep-s SECONDS\n", "text/plain")
            return
        from ..localize.recent import localize_recent

        try:
            answer = localize_recent(service.recent, parse_qs(urlsplit(self.path).query))
        except UserError as e:
            self._reply(400, json.dumps({"error": str(e)}).encode(), wire.JSON)
            return
        self._reply(200, json.dumps(answer).encode(), wire.JSON)

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        receiver: HttpReceiver = self.server.receiver  # type: ignore[attr-defined]
        service = receiver.service
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        as_json = ctype == wire.JSON
        length = self.headers.get("Content-Length")
        if self.path.split("?")[0] != HTTP_PATH:
            self._drain(length)
            self._reply(404, f"not found; OTLP traces go to POST {HTTP_PATH}\n".encode(), "text/plain")
            return
        if not _authorized(receiver.token, self.headers.get("Authorization")):
            self._drain(length)
            service.metrics.inc("refused_requests_total", reason="unauthenticated")
            self._status(401, CODE_UNAUTHENTICATED, "missing or wrong bearer token", as_json,
                         {"WWW-Authenticate": "Bearer"})
            return
        if ctype not in (wire.PROTOBUF, wire.JSON):
            self._drain(length)
            service.metrics.inc("refused_requests_total", reason="content_type")
            self._reply(415, f"unsupported Content-Type {ctype!r}; use {wire.PROTOBUF} or {wire.JSON}\n".encode(),
                        "text/plain")  # fmt: skip
            return
        if length is None or not length.isdigit():
            service.metrics.inc("refused_requests_total", reason="malformed")
            self._status(411, CODE_INVALID_ARGUMENT, "a Content-Length is required", as_json, {"Connection": "close"})
            self.close_connection = True
            return
        n = int(length)
        if n > receiver.max_message_bytes:
            self._drain(length)
            service.metrics.inc("refused_requests_total", reason="too_large")
            self._status(413, CODE_RESOURCE_EXHAUSTED, f"request of {n} bytes is over the limit of "
                         f"{receiver.max_message_bytes} bytes", as_json)  # fmt: skip
            return
        body = self.rfile.read(n)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        too_large = (f"decompressed request is over the limit of {receiver.max_message_bytes} bytes")
        try:
            if encoding == "gzip":
                body = _gunzip(body, receiver.max_message_bytes)
            elif encoding == "deflate":
                body = zlib.decompressobj().decompress(body, receiver.max_message_bytes + 1)
            elif encoding != "identity":
                raise wire.MalformedRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
            if len(body) > receiver.max_message_bytes:
                raise OverflowError
        except OverflowError:
            service.metrics.inc("refused_requests_total", reason="too_large")
            self._status(413, CODE_RESOURCE_EXHAUSTED, too_large, as_json)
            return
        except (wire.MalformedRequest, EOFError, zlib.error) as e:
            service.metrics.inc("refused_requests_total", reason="malformed")
            self._status(400, CODE_INVALID_ARGUMENT, str(e) if isinstance(e, wire.MalformedRequest)
                         else f"the body is not valid {encoding}: {e}", as_json)  # fmt: skip
            return
        try:
            rejected, message = service.export(body, ctype)
        except wire.MalformedRequest as e:
            self._status(400, CODE_INVALID_ARGUMENT, str(e), as_json)
            return
        except Pressure as e:
            self._status(503, CODE_RESOURCE_EXHAUSTED, str(e), as_json,
                         {"Retry-After": str(max(1, round(e.retry_after_s)))}, e.retry_after_s)
            return
        except Exception as e:  # noqa: BLE001 - the log could not take it (disk full, shutting down): retry later
            log.exception("could not take a request")
            service.metrics.inc("refused_requests_total", reason="unavailable")
            self._status(503, CODE_UNAVAILABLE, f"the receiver cannot take data now ({type(e).__name__}: {e}); "
                         "retry later", as_json, {"Retry-After": "5", "Connection": "close"}, 5.0)  # fmt: skip
            self.close_connection = True
            return
        if as_json:
            doc = {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}} if rejected or message else {}
            self._reply(200, json.dumps(doc).encode(), wire.JSON)
        else:
            self._reply(200, export_response(rejected, message), wire.PROTOBUF)

    def _drain(self, length: str | None) -> None:
        """Read (and drop) a refused request's body, so the connection can be reused."""
        if length and length.isdigit() and int(length) <= 64 << 20:
            self.rfile.read(int(length))
        else:
            self.close_connection = True


def _gunzip(body: bytes, limit: int) -> bytes:
    """Decompress every gzip member (concatenated members are one stream, as gzip reads them), at most
    ``limit + 1`` bytes (a small bomb must not take the memory)."""
    out = b""
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += d.decompress(body, limit + 1 - len(out))
        if len(out) > limit or d.unconsumed_tail:
            raise OverflowError
        if not d.eof:
            raise EOFError("the gzip stream is cut short")
        body = d.unused_data
        if not body:
            return out


class HttpReceiver:
    """``POST /v1/traces`` (and ``/metrics``) on a threading HTTP server."""

    def __init__(self, service: InfillService, endpoint: str, *, max_message_bytes: int, token: str | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.service, self.token, self.max_message_bytes = service, token, max_message_bytes
        host, port = _host_port(endpoint)
        self.server = ThreadingHTTPServer((host, port), _Handler)
        self.server.daemon_threads = True
        self.server.receiver = self  # type: ignore[attr-defined]
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls[0], tls[1])
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="infill-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
