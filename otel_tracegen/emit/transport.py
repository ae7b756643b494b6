"""The native OTLP sender: request bytes from :mod:`.wire`, sent over grpcio or HTTP (``requests``) directly.

Why not the SDK exporter: it turns every span into a ``ReadableSpan`` and then into upb messages, which costs
about six times what writing the bytes does; on two cores that decided the emission rate. The SDK exporter stays
the reference (``--otlp-sender sdk``): this module puts the same bytes on the wire (``tests/test_emit_wire.py``
records both in real sinks and compares them) and resolves every setting the way the SDK exporter 1.45 does:

- :func:`resolve_grpc` / :func:`resolve_http` take the arguments :mod:`.sender` gives the SDK's
  ``OTLPSpanExporter`` and apply its rules for ``OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,HEADERS,INSECURE,
  CERTIFICATE,CLIENT_KEY,CLIENT_CERTIFICATE,COMPRESSION,TIMEOUT}`` and
  ``OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES``, including their quirks (gRPC: explicit headers
  replace the environment's, timeouts are seconds; HTTP: environment headers are merged under explicit ones,
  an unknown compression is "none"). A test compares them with the SDK exporter's own resolved fields.
- Retries are the SDK's: at most 6 attempts inside the timeout, backoff ``2**n`` s with ±20 % jitter;
  gRPC retries CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE and
  DATA_LOSS, honours a ``google.rpc.retryinfo-bin`` trailer and reconnects after a first UNAVAILABLE; HTTP
  retries 429/502/503/504 and connection errors, honours ``Retry-After``, and resends at once after a
  connection error. Like the SDK's HTTP exporter, it drops a request over 64 MiB (before compression).

Beyond the SDK: a partial success (``rejected_spans`` in the response, which the SDK exporters ignore) counts
those spans as failed, with the collector's message. What this path cannot honour raises
:class:`NativeUnsupported` and the caller uses the SDK exporter: the Python-only credential-provider entry points
(``OTEL_PYTHON_EXPORTER_OTLP_{GRPC,HTTP}[_TRACES]_CREDENTIAL_PROVIDER``).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from .. import __version__
from .wire import parse_partial_success, parse_retry_delay

__all__ = ["ExportOutcome", "GrpcConfig", "GrpcExporter", "HttpConfig", "HttpExporter", "NativeUnsupported",
           "resolve_grpc", "resolve_http"]  # fmt: skip

_logger = logging.getLogger(__name__)

USER_AGENT = f"otel-tracegen/{__version__}"
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MAX_ATTEMPTS = 6  # the SDK exporters' _MAX_RETRYS
GRPC_RETRYABLE = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "OUT_OF_RANGE",
                            "UNAVAILABLE", "DATA_LOSS"})  # fmt: skip
HTTP_RETRYABLE = frozenset({429, 502, 503, 504})
HTTP_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # the SDK HTTP exporter's default max_request_size, before compression
DEFAULT_TIMEOUT_S = 10.0

E = "OTEL_EXPORTER_OTLP_"  # the spec's variables; E + "TRACES_" + X overrides E + X where the SDK says so
GRPC_PROVIDERS = ("OTEL_PYTHON_EXPORTER_OTLP_GRPC_TRACES_CREDENTIAL_PROVIDER",
                  "OTEL_PYTHON_EXPORTER_OTLP_GRPC_CREDENTIAL_PROVIDER")  # fmt: skip
HTTP_PROVIDERS = ("OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
                  "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER")  # fmt: skip


class NativeUnsupported(Exception):
    """A setting the native sender cannot honour; the message says which. Use the SDK exporter instead."""


@dataclass
class ExportOutcome:
    sent_spans: int
    failed_spans: int
    error: str | None = None
    retryable: bool = False  # the failure was transient (the retries ran out, or shutdown came): sending again may work
    status: str | None = None  # the refusal: a gRPC status code name ("RESOURCE_EXHAUSTED") or an HTTP status ("413")
    retry_advised: bool = False  # the server said when to try again (gRPC RetryInfo, HTTP Retry-After)

    @property
    def too_large(self) -> bool:
        """The downstream refused the request for its size: RESOURCE_EXHAUSTED without retry advice (the OTLP
        spec's sign that retrying cannot help; gRPC's message-size limit answers so) or HTTP 413."""
        return self.status == "413" or (self.status == "RESOURCE_EXHAUSTED" and not self.retry_advised)


def _parse_headers(text: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS`` as the SDK reads it (its own parser: URL-decoded, keys lower-cased)."""
    from opentelemetry.util.re import parse_env_headers

    return dict(parse_env_headers(text, liberal=True))


def _read_file(path: str) -> bytes | None:
    """As the SDK's gRPC exporter: a missing file is logged and left out (the channel then uses the defaults)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        _logger.error("Failed to read file: %s. Please check if the file exists and is accessible.", e.filename)
        return None


# --- gRPC -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcConfig:
    endpoint: str  # host:port (a URL's netloc)
    insecure: bool
    headers: tuple[tuple[str, str], ...]
    timeout_s: float
    compression: str | None  # "gzip" or None
    tls_files: tuple[str | None, str | None, str | None] = (None, None, None)  # CA, client key, client cert
    retryable: frozenset[str] = GRPC_RETRYABLE
    # The OTLP spec retries RESOURCE_EXHAUSTED only when the server sends RetryInfo; the SDK retries it always
    # (the default here, so that generate behaves as the SDK). The infill forwarder follows the spec: a request over
    # the downstream's size limit gets this code without RetryInfo, and resending it unchanged cannot succeed.
    retry_exhausted_without_advice: bool = True


def _grpc_tls_files(cert_var: str, key_var: str, client_cert_var: str, provider_var: str,
                    env: Mapping[str, str]) -> tuple[str | None, str | None, str | None]:
    """The SDK's ``_get_credentials``: a credential provider wins, else the certificate files if a CA is set."""
    if env.get(provider_var):
        raise NativeUnsupported(f"{provider_var} (a Python credential provider) is set")
    if env.get(cert_var):
        return env[cert_var], env.get(key_var), env.get(client_cert_var)
    return None, None, None


def resolve_grpc(endpoint: str | None = None, insecure: bool | None = None, headers: Mapping[str, str] | None = None,
                 timeout: float | None = None, compression: str | None = None,
                 env: Mapping[str, str] | None = None) -> GrpcConfig:
    """The settings the SDK's gRPC ``OTLPSpanExporter(endpoint, insecure, headers=, timeout=, compression=)``
    ends up with (``compression``: "gzip", "none" or None; the rest as the SDK takes them), step by step as its
    ``__init__`` and ``OTLPExporterMixin.__init__`` do."""
    env = os.environ if env is None else env
    # OTLPSpanExporter.__init__: the TRACES_ variables
    if insecure is None and env.get(E + "TRACES_INSECURE") is not None:
        insecure = env[E + "TRACES_INSECURE"].lower() == "true"
    tls_files = None
    if not insecure and env.get(E + "TRACES_CERTIFICATE") is not None:
        tls_files = _grpc_tls_files(E + "TRACES_CERTIFICATE", E + "TRACES_CLIENT_KEY", E + "TRACES_CLIENT_CERTIFICATE",
                                    GRPC_PROVIDERS[0], env)
    traces_timeout = env.get(E + "TRACES_TIMEOUT")
    timeout = timeout or (float(traces_timeout) if traces_timeout is not None else None)
    if compression is None:
        compression = _grpc_compression(E + "TRACES_COMPRESSION", env)
    endpoint = endpoint or env.get(E + "TRACES_ENDPOINT")
    given_headers: Any = headers or env.get(E + "TRACES_HEADERS")
    # OTLPExporterMixin.__init__: the generic variables and the URL
    endpoint = endpoint or env.get(E + "ENDPOINT", "http://localhost:4317")
    url = urlparse(endpoint)
    if url.scheme == "https":
        insecure = False
    if insecure is None:
        given = env.get(E + "INSECURE")
        insecure = given.lower() == "true" if given is not None else url.scheme == "http"
    if url.netloc:
        endpoint = url.netloc
    given_headers = given_headers or env.get(E + "HEADERS")
    if isinstance(given_headers, str):
        given_headers = _parse_headers(given_headers)
    timeout = timeout or float(env.get(E + "TIMEOUT", DEFAULT_TIMEOUT_S))
    if compression is None:
        compression = _grpc_compression(E + "COMPRESSION", env)
    codes = env.get("OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES")
    retryable = GRPC_RETRYABLE
    if codes:
        import grpc

        retryable = frozenset(grpc.StatusCode[c.strip().upper()].name for c in codes.split(",") if c.strip())
    if not insecure and tls_files is None:
        tls_files = _grpc_tls_files(E + "CERTIFICATE", E + "CLIENT_KEY", E + "CLIENT_CERTIFICATE", GRPC_PROVIDERS[1],
                                    env)
    return GrpcConfig(endpoint=endpoint, insecure=bool(insecure), headers=tuple((given_headers or {}).items()),
                      timeout_s=float(timeout), compression=compression if compression == "gzip" else None,
                      tls_files=tls_files or (None, None, None), retryable=retryable)  # fmt: skip


def _grpc_compression(var: str, env: Mapping[str, str]) -> str | None:
    """The SDK's ``environ_to_compression``: unset is None, "gzip" is gzip, anything else is an error."""
    value = env[var].lower().strip() if var in env else None
    if value not in (None, "gzip"):
        raise ValueError(f'Invalid value "{value}" for compression envvar {var}')
    return value


class GrpcExporter:
    """Sends serialized ``ExportTraceServiceRequest``s over one grpcio channel, or (``per_thread``) over a channel
    of each sending thread's own.

    Why per thread: the HTTP/2 flow-control window of one connection capped a grpcio client at about 35,000 spans/s
    into rotel on loopback, and connections add up (``docs/replay.md``, "One connection per sender thread"). The
    emitters ask for it; the infill forwarder keeps one connection, whose buffers its memory bound counts.
    """

    def __init__(self, config: GrpcConfig, *, per_thread: bool = False) -> None:
        import grpc

        self._grpc = grpc
        self.config = config
        self.per_thread = per_thread
        self._retryable = frozenset(grpc.StatusCode[name] for name in config.retryable)
        self._credentials = None
        if not config.insecure:
            ca, key, chain = (_read_file(p) if p else None for p in config.tls_files)
            self._credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                             certificate_chain=chain)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._local = threading.local()  # per_thread: each sending thread's (channel, call)
        self._shared: tuple | None = None  # else the one (channel, call)
        self._channels: list = []

    def _current(self) -> tuple:
        conn = getattr(self._local, "conn", None) if self.per_thread else self._shared
        return conn if conn is not None else self._connect()

    def _connect(self, stale=None) -> tuple:
        """A new (channel, call): the calling thread's, or the shared one unless another thread has replaced
        ``stale`` already."""
        grpc, cfg = self._grpc, self.config
        with self._lock:
            if not self.per_thread and self._shared is not None and self._shared[0] is not stale:
                return self._shared
            # A subchannel pool of its own, so that the channels of several threads do not share one connection.
            options = [("grpc.primary_user_agent", USER_AGENT), ("grpc.use_local_subchannel_pool", 1)]
            compression = grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression
            if cfg.insecure:
                channel = grpc.insecure_channel(cfg.endpoint, options=options, compression=compression)
            else:
                channel = grpc.secure_channel(cfg.endpoint, self._credentials, options=options,
                                              compression=compression)  # fmt: skip
            # No serializers: the request is already bytes, the response is parsed by hand (partial success only).
            conn = (channel, channel.unary_unary(EXPORT_METHOD, request_serializer=None, response_deserializer=None))
            self._channels.append(channel)
            if self._stopping.is_set():
                channel.close()
            if self.per_thread:
                self._local.conn = conn
            else:
                self._shared = conn
        return conn

    def _reconnect(self, stale) -> None:
        """After UNAVAILABLE the SDK closes the channel and opens a new one, so the next try dials again instead
        of waiting out grpc's reconnect backoff. Threads sharing a channel may see it at once: one reconnects."""
        conn = getattr(self._local, "conn", None) if self.per_thread else self._shared
        if conn is None or conn[0] is not stale or self._stopping.is_set():
            return
        with self._lock:
            if stale in self._channels:
                self._channels.remove(stale)
        stale.close()
        self._connect(stale)

    def _invoke(self, body: bytes, deadline: float) -> bytes:
        """The response bytes of one call; an RpcError carries the channel it was made on. A shared channel that
        another thread replaced just before the call refuses it (ValueError): then the call goes out on the new
        one."""
        while True:
            channel, call = self._current()
            try:
                return call(body, metadata=self.config.headers, timeout=deadline - time.time())
            except self._grpc.RpcError as error:
                error.channel = channel
                raise
            except ValueError:
                if self._stopping.is_set() or self._current()[0] is channel:
                    raise

    def export(self, body: bytes, spans: int) -> ExportOutcome:
        """Send one request of ``spans`` spans, retrying as the SDK exporter does."""
        grpc, cfg = self._grpc, self.config
        deadline = time.time() + cfg.timeout_s
        for attempt in range(MAX_ATTEMPTS):
            try:
                response = self._invoke(body, deadline)
            except grpc.RpcError as error:
                code = error.code()
                delay = 2**attempt * random.uniform(0.8, 1.2)
                retry_info = dict(error.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")
                if retry_info is not None:
                    parsed = parse_retry_delay(retry_info)
                    delay = parsed if parsed is not None else delay
                if code == grpc.StatusCode.UNAVAILABLE and attempt == 0:
                    self._reconnect(error.channel)
                retryable = code in self._retryable and not (
                    code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_info is None
                    and not cfg.retry_exhausted_without_advice)
                if (not retryable or attempt + 1 == MAX_ATTEMPTS or delay > deadline - time.time()
                        or self._stopping.is_set()):
                    _logger.error("Failed to export traces to %s, error code: %s, error details: %s",
                                  cfg.endpoint, code, error.details())  # fmt: skip
                    return ExportOutcome(0, spans, f"{code.name}: {error.details()}", retryable, code.name,
                                         retry_info is not None)  # fmt: skip
                _logger.warning("Transient error %s encountered while exporting traces to %s, retrying in %.2fs.",
                                code, cfg.endpoint, delay)  # fmt: skip
                if self._stopping.wait(delay):
                    break
                continue
            return _outcome(spans, parse_partial_success(response or b""))
        return ExportOutcome(0, spans, "shut down while retrying", True)

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            for channel in self._channels:
                channel.close()


def _outcome(spans: int, partial: tuple[int, str]) -> ExportOutcome:
    rejected, message = partial
    if rejected <= 0:
        if message:  # the spec's way of passing on a warning
            _logger.warning("the collector accepted every span and said: %s", message)
        return ExportOutcome(spans, 0)
    rejected = min(rejected, spans)
    return ExportOutcome(spans - rejected, rejected, f"collector rejected {rejected} spans: {message or 'no message'}")


# --- HTTP -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpConfig:
    url: str
    headers: dict[str, str] = field(hash=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    compression: str = "none"  # none, gzip or deflate
    verify: bool | str = True  # requests' verify: True or a CA bundle
    cert: str | tuple[str, str] | None = None  # requests' cert: a client certificate, or (certificate, key)


def resolve_http(endpoint: str | None = None, headers: Mapping[str, str] | None = None, timeout: float | None = None,
                 compression: str | None = None, env: Mapping[str, str] | None = None) -> HttpConfig:
    """The settings the SDK's HTTP ``OTLPSpanExporter(endpoint=, headers=, timeout=, compression=)`` ends up
    with (``endpoint``: the full URL or None; ``compression``: "gzip", "none" or None)."""
    env = os.environ if env is None else env
    for var in HTTP_PROVIDERS:
        if env.get(var):
            raise NativeUnsupported(f"{var} (a Python credential provider) is set")
    url = endpoint or env.get(E + "TRACES_ENDPOINT") or (
        f"{(env.get(E + 'ENDPOINT') or 'http://localhost:4318').removesuffix('/')}/v1/traces")
    if compression is None:
        compression = (env.get(E + "TRACES_COMPRESSION") or env.get(E + "COMPRESSION") or "none").lower().strip()
        if compression not in ("none", "gzip", "deflate"):
            _logger.warning("Unsupported compression type: %s", compression)
            compression = "none"
    verify = env.get(E + "TRACES_CERTIFICATE") or env.get(E + "CERTIFICATE") or True
    key = env.get(E + "TRACES_CLIENT_KEY") or env.get(E + "CLIENT_KEY")
    cert = env.get(E + "TRACES_CLIENT_CERTIFICATE") or env.get(E + "CLIENT_CERTIFICATE")
    if timeout is None:
        raw = env.get(E + "TRACES_TIMEOUT") or env.get(E + "TIMEOUT") or DEFAULT_TIMEOUT_S
        try:
            timeout = float(raw)
        except ValueError:
            _logger.warning("Invalid timeout value %r, using default of %s seconds", raw, DEFAULT_TIMEOUT_S)
            timeout = DEFAULT_TIMEOUT_S
    merged = {"content-type": "application/x-protobuf", "user-agent": USER_AGENT}
    merged.update(_parse_headers(env.get(E + "TRACES_HEADERS") or env.get(E + "HEADERS", "")))
    merged.update({k.lower(): v for k, v in (headers or {}).items()})
    if compression != "none" and not any(k.lower() == "content-encoding" for k in merged):
        merged["Content-Encoding"] = compression
    return HttpConfig(url=url, headers=merged, timeout_s=timeout, compression=compression, verify=verify,
                      cert=(cert, key) if cert and key else cert)  # fmt: skip


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` seconds (a number or an HTTP date), as the SDK reads it."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    from datetime import timezone
    from email.utils import parsedate_to_datetime

    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return max(at.timestamp() - time.time(), 0.0)


class HttpExporter:
    """POSTs serialized requests with ``requests`` (as the SDK does, so proxies and CA bundles behave the same);
    one session per worker thread."""

    def __init__(self, config: HttpConfig) -> None:
        import requests

        self._requests = requests
        self.config = config
        self._connection_errors = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
        self._local = threading.local()
        self._sessions: list = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._requests.Session()
            session.verify = self.config.verify
            if self.config.cert is not None:
                session.cert = self.config.cert
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _post(self, data: bytes, timeout: float):
        """(response or None, error or None); a connection error is retried at once, as a stale pooled
        connection usually causes it."""
        deadline = time.time() + timeout
        session, cfg = self._session(), self.config
        for again in (False, True):
            try:
                return session.request("POST", cfg.url, headers=cfg.headers, data=data,
                                       timeout=timeout if not again else deadline - time.time(),
                                       allow_redirects=False), None  # fmt: skip
            except Exception as error:  # noqa: BLE001 - the SDK's transport turns every failure into a result
                if again or not isinstance(error, self._connection_errors) or deadline - time.time() <= 0:
                    return None, error
        return None, None  # not reached

    def export(self, body: bytes, spans: int) -> ExportOutcome:
        cfg = self.config
        if len(body) > HTTP_MAX_REQUEST_BYTES:  # the SDK's HTTP exporter drops such a batch before sending
            return ExportOutcome(0, spans, f"request of {len(body)} bytes exceeds {HTTP_MAX_REQUEST_BYTES} bytes")
        if cfg.compression == "gzip":
            data = gzip.compress(body)
        elif cfg.compression == "deflate":
            data = zlib.compress(body)
        else:
            data = body
        deadline = time.time() + cfg.timeout_s
        for attempt in range(MAX_ATTEMPTS):
            delay = 2**attempt * random.uniform(0.8, 1.2)
            response, error = self._post(data, max(deadline - time.time(), 0.0))
            status = response.status_code if response is not None else None
            if status is not None and 200 <= status < 300:
                return _outcome(spans, _http_partial_success(response))
            after = None
            if status is not None:
                retryable = status in HTTP_RETRYABLE
                if retryable and (after := _retry_after(response.headers.get("retry-after"))) is not None:
                    delay = after
                reason = f"HTTP {status} {response.reason or ''}".strip()
            else:
                retryable = isinstance(error, self._connection_errors)
                reason = f"{type(error).__name__}: {error}"
            if (not retryable or attempt + 1 == MAX_ATTEMPTS or delay > deadline - time.time()
                    or self._stopping.is_set()):
                _logger.error("Failed to export spans batch: %s", reason)
                return ExportOutcome(0, spans, reason, retryable, str(status) if status is not None else None,
                                     after is not None)  # fmt: skip
            _logger.warning("Transient error %s encountered while exporting span batch, retrying in %.2fs.",
                            reason, delay)  # fmt: skip
            if self._stopping.wait(delay):
                break
        return ExportOutcome(0, spans, "shut down while retrying", True)

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            for session in self._sessions:
                session.close()


def _http_partial_success(response) -> tuple[int, str]:
    """The partial success in an OTLP/HTTP response body: protobuf, or JSON when the collector answered so."""
    content = response.content or b""
    if not content:
        return 0, ""
    if "json" in (response.headers.get("content-type") or ""):
        try:
            partial = json.loads(content).get("partialSuccess") or {}
            return int(partial.get("rejectedSpans") or 0), str(partial.get("errorMessage") or "")
        except (ValueError, AttributeError, TypeError):
            return 0, ""
    return parse_partial_success(content)
