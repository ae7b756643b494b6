"""OTLP receivers: gRPC ``TraceService/Export`` and HTTP ``POST /v1/traces``, as the OTLP specification asks.

- **Partial success.** Malformed spans are refused one by one and named in ``partial_success`` (``rejected_spans``
  and ``error_message``); every other span of the same request is taken, also when the bad one breaks protobuf
  (invalid UTF-8, a field running past its end, nesting deeper than parsers take).
- **Malformed requests.** A body that is not an ``ExportTraceServiceRequest`` at all gets ``INVALID_ARGUMENT`` /
  HTTP 400 with a ``google.rpc.Status`` whose message says what was wrong; so does a bad ``Content-Length`` or
  ``Content-Encoding``. A body that stops arriving gets HTTP 408 after ``read_timeout_s``. Too big:
  ``RESOURCE_EXHAUSTED`` without retry advice (gRPC's own limit) / HTTP 413. Unsupported content type: HTTP 415.
- **Pressure.** When the buffer, the log or the memory limit is full: ``RESOURCE_EXHAUSTED`` with a ``RetryInfo``
  (in ``grpc-status-details-bin`` and in the ``google.rpc.retryinfo-bin`` trailer the OTel SDKs read) / HTTP 503
  with ``Retry-After``.
- **Encodings.** Protobuf and JSON over HTTP (the answer in the request's encoding), gzip on both transports.
- **Security.** Loopback by default; TLS from a certificate and key; an optional bearer token
  (``authorization: Bearer ...``, the scheme in any case), refused with ``UNAUTHENTICATED`` / HTTP 401 before the
  body is read. ``/metrics`` is behind the token too unless ``metrics_public``; ``/healthz`` is not.
- **No client stalls another.** HTTP runs on aiohttp's event loop: TLS handshakes, idle keep-alive connections and
  slow bodies cost a socket each, not a thread; decoding and logging run on a bounded pool of ``workers``
  threads, shared with nothing else. gRPC runs on grpcio, whose core does the same below its handler threads.

The HTTP receiver also serves ``GET /metrics`` (Prometheus text), ``GET /healthz`` and ``GET /localize``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..formats._otlp_common import length_delimited, varint
from ..report import UserError
from . import wire
from .service import InfillService, Pressure, TooLarge

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
    """Whether ``header`` (an ``authorization`` value) carries the bearer token; the scheme is case-insensitive
    (RFC 7235), the token compared in constant time."""
    if not expected:
        return True
    scheme, _, credentials = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), expected.encode())


def _message_limit(service: InfillService, configured: int, transport: str) -> int:
    """The largest request a receiver reads: ``configured``, or less where the buffer could never hold it."""
    if configured <= service.largest_request:
        return configured
    log.info("OTLP/%s requests over %d bytes are refused (the configured limit is %d): the buffer "
             "(buffer.max_mib %g) could not hold them with their copies on the way in", transport,
             service.largest_request, configured, service.buffer.max_bytes / (1 << 20))  # fmt: skip
    return service.largest_request


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"receiver endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass
class Answer:
    """One HTTP answer, written in one piece (headers and body in a single send)."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict = field(default_factory=dict)
    close: bool = False  # close the connection after it (a body was left unread, or the stream is unusable)


def _status_answer(http: int, code: int, message: str, as_json: bool, retry_after_s: float | None = None,
                   **kw) -> Answer:
    """An error answer as the OTLP spec writes it: a ``google.rpc.Status`` in the request's encoding."""
    if as_json:
        return Answer(http, json.dumps({"code": code, "message": message}).encode(), wire.JSON, **kw)
    return Answer(http, rpc_status(code, message, retry_after_s), wire.PROTOBUF, **kw)


def _pushback(e: Pressure | TooLarge, as_json: bool, **kw) -> Answer:
    """HTTP 413 for a request that can never fit, 503 with ``Retry-After`` for one that may later."""
    if isinstance(e, TooLarge):
        return _status_answer(413, CODE_RESOURCE_EXHAUSTED, str(e), as_json, **kw)
    return _status_answer(503, CODE_RESOURCE_EXHAUSTED, str(e), as_json, e.retry_after_s,
                          headers={"Retry-After": str(max(1, round(e.retry_after_s)))}, **kw)


def take_request(service: InfillService, body: bytes, content_type: str, encoding: str, limit: int,
                 transport: str, reserved: int = 0) -> Answer:
    """Decompress, decode, log and hold one OTLP/HTTP body (on a worker thread): the answer to send.
    ``reserved``: the memory :meth:`InfillService.set_aside_polled` for the body, handed over (released here)."""
    as_json = wire.is_json(content_type)
    try:
        if encoding == "gzip":
            body = _gunzip(body, limit)
        elif encoding == "deflate":
            d = zlib.decompressobj()
            body = d.decompress(body, limit + 1)
            if d.unconsumed_tail:
                raise OverflowError
        elif encoding != "identity":
            raise wire.MalformedRequest(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
        if len(body) > limit:
            raise OverflowError
    except OverflowError:
        service.buffer.unreserve(reserved)
        service.metrics.inc("refused_requests_total", reason="too_large")
        return _status_answer(413, CODE_RESOURCE_EXHAUSTED, f"decompressed request is over the limit of {limit} bytes",
                              as_json)  # fmt: skip
    except (wire.MalformedRequest, EOFError, zlib.error) as e:
        service.buffer.unreserve(reserved)
        service.metrics.inc("refused_requests_total", reason="malformed")
        return _status_answer(400, CODE_INVALID_ARGUMENT, str(e) if isinstance(e, wire.MalformedRequest)
                              else f"the body is not valid {encoding}: {e}", as_json)  # fmt: skip
    try:
        rejected, message = service.export(body, content_type, transport, reserved)
    except wire.MalformedRequest as e:
        return _status_answer(400, CODE_INVALID_ARGUMENT, str(e), as_json)
    except (TooLarge, Pressure) as e:
        return _pushback(e, as_json)
    except Exception as e:  # noqa: BLE001 - the log could not take it (disk full, shutting down): retry later
        log.exception("could not take a request")
        service.metrics.inc("refused_requests_total", reason="unavailable")
        return _status_answer(503, CODE_UNAVAILABLE, f"the receiver cannot take data now ({type(e).__name__}: {e}); "
                              "retry later", as_json, 5.0, headers={"Retry-After": "5"})  # fmt: skip
    if as_json:
        doc = {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}} if rejected or message else {}
        return Answer(200, json.dumps(doc).encode(), wire.JSON)
    return Answer(200, export_response(rejected, message), wire.PROTOBUF)


# --- gRPC ---------------------------------------------------------------------------------------------------


class GrpcReceiver:
    """``TraceService/Export`` on a grpcio server (raw bytes in and out: no message classes).

    The bearer token is checked by an interceptor from the call's metadata, before the message is read: a refused
    call is answered by a streaming handler that never reads its request, so grpc's flow control stops the client
    after one window instead of taking up to the message limit into memory. Concurrent calls are not capped
    (``maximum_concurrent_rpcs``): grpc refuses those beyond a cap with ``RESOURCE_EXHAUSTED`` and no retry
    advice, which an OTLP exporter (the Collector's included) takes as "do not retry" and drops. A call waiting for
    one of the ``workers`` threads has not read its message yet."""

    def __init__(self, service: InfillService, endpoint: str, *, max_message_bytes: int, token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None, workers: int = 4) -> None:
        import grpc

        self._grpc, self.service, self.token = grpc, service, token
        max_message_bytes = _message_limit(service, max_message_bytes, "gRPC")
        interceptors = [_BearerInterceptor(grpc, token, service)] if token else []
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infill-grpc"),
                                  interceptors=interceptors,
                                  options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.http2.bdp_probe", 0)])  # fmt: skip
        self.max_message_bytes = max_message_bytes
        # Client streaming on the server's side (the same on the wire as a unary call): the handler, not grpc,
        # decides when the message is read, once memory for it is set aside.
        handler = grpc.stream_unary_rpc_method_handler(self._export, request_deserializer=None,
                                                       response_serializer=None)  # fmt: skip
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Export": handler})])
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port(endpoint, creds)
        else:
            self.port = self.server.add_insecure_port(endpoint)
        if not self.port:
            raise OSError(f"cannot listen for OTLP/gRPC on {endpoint}")

    def _export(self, messages, context) -> bytes:
        grpc = self._grpc
        try:
            reserved = self.service.set_aside_unread(self.max_message_bytes)
            try:
                request = next(messages, None)  # read now: grpc holds back the rest of the stream until then
            except grpc.RpcError:  # grpc ended the call: over its message limit, or the client went away
                self.service.buffer.unreserve(reserved)
                self.service.metrics.inc("refused_requests_total", reason="unreadable")
                return b""  # not sent: the call is over
            except BaseException:
                self.service.buffer.unreserve(reserved)
                raise
            if request is None:
                self.service.buffer.unreserve(reserved)
                raise wire.MalformedRequest("the call carried no ExportTraceServiceRequest")
            rejected, message = self.service.export(request, wire.PROTOBUF, "grpc", reserved)
        except wire.MalformedRequest as e:
            context.set_trailing_metadata((("grpc-status-details-bin", rpc_status(CODE_INVALID_ARGUMENT, str(e))),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TooLarge as e:  # no retry advice: the OTLP spec's "do not retry" for RESOURCE_EXHAUSTED
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
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


class _BearerInterceptor:
    """Refuses calls without the bearer token with ``UNAUTHENTICATED``, before their message is read."""

    def __init__(self, grpc, token: str, service: InfillService) -> None:
        self._token, self._service = token, service

        def refuse(request_iterator, context):  # never iterates: the message is not read
            service.metrics.inc("refused_requests_total", reason="unauthenticated")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._refusal = grpc.stream_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        auth = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if _authorized(self._token, auth if isinstance(auth, str) else None):
            return continuation(handler_call_details)
        return self._refusal


# --- HTTP ---------------------------------------------------------------------------------------------------


class _OneLine(logging.Filter):
    """aiohttp answers a request it cannot parse (a bad Content-Length, a broken header) with a 400 itself, then
    logs the parser's traceback as an error: a client's mistake, not ours. Make it one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg, record.args = "refused a malformed HTTP request: %s", (" ".join(str(error).split()),)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_PROTOCOL_LOG = logging.getLogger(__name__ + ".http")
_PROTOCOL_LOG.addFilter(_OneLine())


class HttpReceiver:
    """``POST /v1/traces`` (and ``GET /metrics``, ``/healthz``, ``/localize``) on aiohttp, in an event loop of
    its own thread. ``workers`` threads decode and log the bodies; at most twice as many bodies are read at once
    (a request beyond that waits for its turn before its body is read). A body's memory is set aside in the
    buffer's bound before it is read (:meth:`InfillService.set_aside_polled`): one that does not fit now is answered 503
    with ``Retry-After`` unread."""

    def __init__(self, service: InfillService, endpoint: str, *, max_message_bytes: int, token: str | None = None,
                 tls: tuple[str, str] | None = None, workers: int = 4, read_timeout_s: float = 30.0,
                 metrics_public: bool = False) -> None:
        self.service, self.token = service, token
        self.max_message_bytes = _message_limit(service, max_message_bytes, "HTTP")
        self.metrics_public, self.read_timeout_s = metrics_public, read_timeout_s
        self._host, port = _host_port(endpoint)
        self._ssl = None
        if tls is not None:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(tls[0], tls[1])
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infill-http")
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._server = None
        self._listener = None
        # Listen now, so that a port in use fails at construction as the gRPC receiver does.
        self._listener = self._loop.run_until_complete(self._listen(port))
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _listen(self, port: int):
        from aiohttp import web

        self._admit = asyncio.Semaphore(2 * self._workers)
        # auto_decompress off: bodies are decompressed on a worker, within the message limit (no gzip bomb);
        # lingering off: a refused body is not read on, the connection is closed instead.
        self._server = web.Server(self._handle, auto_decompress=False, lingering_time=0, keepalive_timeout=75,
                                  access_log=None, logger=_PROTOCOL_LOG)  # fmt: skip
        return await self._loop.create_server(self._server, self._host, port, ssl=self._ssl,
                                              ssl_handshake_timeout=self.read_timeout_s if self._ssl else None,
                                              reuse_address=True)  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, name="infill-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._loop.is_closed():
            return

        async def close():
            self._listener.close()
            await self._listener.wait_closed()
            await self._server.shutdown(2.0)

        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        else:
            self._loop.run_until_complete(close())
        self._loop.close()
        self._pool.shutdown(wait=True)

    # --- requests ---

    async def _handle(self, request):
        from aiohttp import web

        try:
            answer = await self._answer(request)
        except Exception:  # noqa: BLE001 - a bug in one answer must not take the connection's others down
            log.exception("answering %s %s failed", request.method, request.path)
            answer = Answer(500, b"internal error\n", close=True)
        response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        response.content_type, _, charset = answer.content_type.partition("; charset=")
        if charset:
            response.charset = charset
        if answer.close or not request.content.is_eof() and request.method == "POST" and answer.status != 200:
            response.force_close()
        return response

    async def _answer(self, request) -> Answer:
        path = request.path
        if request.method == "GET":
            return await self._get(request, path)
        if request.method != "POST":
            return Answer(405, b"method not allowed\n", headers={"Allow": "GET, POST"}, close=True)
        ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        as_json = ctype == wire.JSON
        if path != HTTP_PATH:
            return Answer(404, f"not found; OTLP traces go to POST {HTTP_PATH}\n".encode(), close=True)
        if not _authorized(self.token, request.headers.get("Authorization")):
            self.service.metrics.inc("refused_requests_total", reason="unauthenticated")
            return _status_answer(401, CODE_UNAUTHENTICATED, "missing or wrong bearer token", as_json,
                                  headers={"WWW-Authenticate": "Bearer"}, close=True)
        if ctype not in (wire.PROTOBUF, wire.JSON):
            self.service.metrics.inc("refused_requests_total", reason="content_type")
            return Answer(415, f"unsupported Content-Type {ctype!r}; use {wire.PROTOBUF} or {wire.JSON}\n".encode(),
                          close=True)  # fmt: skip
        limit = self.max_message_bytes
        length = request.content_length
        if length is not None and length > limit:
            self.service.metrics.inc("refused_requests_total", reason="too_large")
            return _status_answer(413, CODE_RESOURCE_EXHAUSTED, f"request of {length} bytes is over the limit of "
                                  f"{limit} bytes", as_json, close=True)  # fmt: skip
        encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
        async with self._admit:
            # The body's memory is set aside before it is read (as it is read, when chunked): a request that does
            # not fit now is refused with retry advice without being read.
            held = _SetAside(self.service)
            try:
                body = await _within(self._read(request, limit, held), self.read_timeout_s)
            except (Pressure, TooLarge) as e:
                held.release()
                return _pushback(e, as_json, close=True)
            except asyncio.TimeoutError:
                held.release()
                self.service.metrics.inc("refused_requests_total", reason="timeout")
                return _status_answer(408, CODE_INVALID_ARGUMENT, f"the body did not arrive within "
                                      f"{self.read_timeout_s:g}s", as_json, close=True)  # fmt: skip
            except OverflowError:
                held.release()
                self.service.metrics.inc("refused_requests_total", reason="too_large")
                return _status_answer(413, CODE_RESOURCE_EXHAUSTED, f"request is over the limit of {limit} bytes",
                                      as_json, close=True)  # fmt: skip
            except ValueError as e:  # the body's framing broke (a cut chunked body, a short one at EOF)
                held.release()
                self.service.metrics.inc("refused_requests_total", reason="malformed")
                return _status_answer(400, CODE_INVALID_ARGUMENT, f"the body could not be read: {e}", as_json,
                                      close=True)  # fmt: skip
            except BaseException:
                held.release()
                raise
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, take_request, self.service, body, ctype, encoding, limit,
                                              "http", held.bytes)  # fmt: skip

    async def _read(self, request, limit: int, held: _SetAside) -> bytes:
        """The body, at most ``limit`` bytes (OverflowError beyond); ValueError when it ends early. Its memory is
        set aside in ``held`` first (:class:`Pressure` when it does not fit)."""
        from aiohttp.http_exceptions import HttpProcessingError

        length = request.content_length
        if length is not None:
            await held.add(length)
        chunks, size = [], 0
        try:
            while chunk := await request.content.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise OverflowError
                if length is None or size > length:
                    await held.add(len(chunk))
                chunks.append(chunk)
        except HttpProcessingError as e:
            raise ValueError(e.message or str(e)) from None
        if length is not None and size < length:
            raise ValueError(f"got {size} of the {length} bytes Content-Length announced")
        return b"".join(chunks)

    async def _get(self, request, path: str) -> Answer:
        if path in ("/healthz", "/"):
            return Answer(200, b"ok\n")
        if path == "/metrics":
            if not self.metrics_public and not _authorized(self.token, request.headers.get("Authorization")):
                return Answer(401, b"missing or wrong bearer token (or start with --metrics-public)\n",
                              headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            return Answer(200, self.service.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/localize":  # trace ids and timings: behind the bearer token when there is one
            if not _authorized(self.token, request.headers.get("Authorization")):
                return Answer(401, b"missing or wrong bearer token\n", headers={"WWW-Authenticate": "Bearer"})
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, _localize, self.service, request.query_string)
        return Answer(404, b"not found\n")


class _SetAside:
    """The memory set aside for one HTTP body as it is read (:meth:`InfillService.set_aside_polled`)."""

    def __init__(self, service: InfillService) -> None:
        self.service, self.bytes = service, 0

    async def add(self, nbytes: int) -> None:
        """Set ``nbytes`` more aside, waiting a moment for room in line with the worker threads' requests (polled:
        the event loop never blocks); :class:`Pressure` when there is none."""
        self.bytes += await self.service.set_aside_polled(nbytes, more=self.bytes > 0)

    def release(self) -> None:
        self.service.buffer.unreserve(self.bytes)
        self.bytes = 0


async def _within(awaitable, seconds: float):
    """``awaitable`` within ``seconds`` (TimeoutError): ``asyncio.timeout`` where there is one (3.11; no task per
    request, as ``wait_for`` makes), else ``wait_for``."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def _localize(service: InfillService, query: str) -> Answer:
    """``GET /localize?window=2m&baseline=10m[&end=now|latest|TIME][&top=5]``: the localize ranking of the traces
    this receiver forwarded lately (JSON, as ``otel-tracegen localize --json``)."""
    from urllib.parse import parse_qs

    if service.recent is None:
        return Answer(404, b"localization is off: start with --localize-keep-s SECONDS\n")
    from ..localize.recent import localize_recent

    try:
        answer = localize_recent(service.recent, parse_qs(query))
    except UserError as e:
        return Answer(400, json.dumps({"error": str(e)}).encode(), wire.JSON)
    return Answer(200, json.dumps(answer).encode(), wire.JSON)


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
