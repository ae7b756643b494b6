"""Sending traces over OTLP (gRPC or HTTP/protobuf): natively by default, or with the OpenTelemetry SDK's exporters.

The SDK's exporters are the reference implementation of the protocol: they honour ``OTEL_EXPORTER_OTLP_*``
(endpoint, headers, certificates, compression, timeout) for every setting not given explicitly, retry what the
spec says is retryable, and report failure instead of raising. ``sender="sdk"`` turns canonical traces into the
SDK's ``ReadableSpan`` and exports them with those. ``sender="native"`` (the default) writes the very bytes that
path would send (:mod:`.wire`) and sends them with grpcio or ``requests`` (:mod:`.transport`), resolving
the same settings the same way, at a fraction of the CPU; where it cannot honour a setting it falls back to the
SDK exporter and says why (:attr:`OtlpSender.note`). Either way batches go out from worker threads and every
span that could not be delivered is counted (so that a failing collector is never silent).

Needs the ``otlp`` extra (``opentelemetry-exporter-otlp-proto-grpc``/``-http``); imported lazily.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..report import UserError
from ..trace import SpanKind, StatusCode, Trace

PROTOCOLS = ("grpc", "http/protobuf")


@dataclass
class OtlpSettings:
    """Where and how to send. ``None`` leaves a setting to ``OTEL_EXPORTER_OTLP_*`` and the SDK's default.

    ``endpoint``: ``host:port`` (telemetrygen's form) or a URL. ``insecure``: plain text instead of TLS.
    ``headers``: extra request headers. ``compression``: ``gzip`` or ``none``.
    """

    endpoint: str | None = None
    protocol: str = "grpc"
    insecure: bool | None = None
    headers: dict[str, str] = field(default_factory=dict)
    compression: str | None = None
    timeout_s: float | None = None
    ca_cert: str | None = None  # telemetrygen's --ca-cert: trust this CA (PEM)
    client_cert: str | None = None  # --client-cert and --client-key: mutual TLS
    client_key: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UserError(f"OTLP protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.compression not in (None, "gzip", "none"):
            raise UserError(f"OTLP compression must be gzip or none, got {self.compression!r}")
        if (self.client_cert is None) != (self.client_key is None):
            raise UserError("mutual TLS needs both --client-cert and --client-key")
        tls = [f for f in (self.ca_cert, self.client_cert, self.client_key) if f is not None]
        if tls and self.insecure:
            raise UserError("--ca-cert/--client-cert/--client-key need TLS: drop --otlp-insecure")
        for path in tls:
            if not os.path.isfile(path):
                raise UserError(f"TLS file not found: {path}")

    def tls_environment(self) -> dict[str, str]:
        """The certificate files as the ``OTEL_EXPORTER_OTLP_TRACES_*`` variables that name them (which win over
        the generic ones), for the native sender's resolution."""
        names = {"CERTIFICATE": self.ca_cert, "CLIENT_CERTIFICATE": self.client_cert, "CLIENT_KEY": self.client_key}
        return {f"OTEL_EXPORTER_OTLP_TRACES_{k}": v for k, v in names.items() if v is not None}

    def http_url(self) -> str | None:
        """The HTTP exporter wants the full URL of the traces path."""
        if self.endpoint is None:
            return None
        url = self.endpoint
        if "://" not in url:
            url = ("http://" if self.insecure else "https://") + url
        scheme, _, rest = url.partition("://")
        return url if "/" in rest else f"{scheme}://{rest}/v1/traces"


def parse_header(text: str) -> tuple[str, str]:
    """``key=value`` or telemetrygen's ``key="value"``."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"expected key=value, got {text!r}")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return key.strip(), value


SENDERS = ("native", "sdk")


def _sdk_arguments(settings: OtlpSettings) -> dict:
    """What the SDK exporter is built with (compression as "gzip"/"none"/None); the native sender resolves the
    same arguments with the SDK's rules (:mod:`.transport`)."""
    args: dict = {"headers": dict(settings.headers) or None, "timeout": settings.timeout_s,
                  "compression": settings.compression}  # fmt: skip
    if settings.protocol == "grpc":
        endpoint, insecure = settings.endpoint, settings.insecure
        if endpoint and "://" in endpoint and insecure is None:
            insecure = endpoint.startswith("http://")
        args.update(endpoint=endpoint, insecure=insecure)
    else:
        args["endpoint"] = settings.http_url()
    return args


def _missing_extra(e: ImportError) -> UserError:
    return UserError(f"sending OTLP needs the otlp extra: pip install 'otel-tracegen[otlp]' ({e.name} is missing)")


def make_exporter(settings: OtlpSettings):
    """The SDK's OTLP span exporter for ``settings``."""
    args = _sdk_arguments(settings)
    try:
        if settings.protocol == "grpc":
            import grpc
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            args["compression"] = {"gzip": grpc.Compression.Gzip,
                                   "none": grpc.Compression.NoCompression}.get(args["compression"] or "")  # fmt: skip
            if settings.ca_cert or settings.client_cert:
                def read(path):
                    with open(path, "rb") as f:
                        return f.read()

                args["credentials"] = grpc.ssl_channel_credentials(
                    root_certificates=read(settings.ca_cert) if settings.ca_cert else None,
                    private_key=read(settings.client_key) if settings.client_key else None,
                    certificate_chain=read(settings.client_cert) if settings.client_cert else None)
            return OTLPSpanExporter(**args)
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        args["compression"] = {"gzip": Compression.Gzip,
                               "none": Compression.NoCompression}.get(args["compression"] or "")  # fmt: skip
        return OTLPSpanExporter(**args, certificate_file=settings.ca_cert, client_key_file=settings.client_key,
                                client_certificate_file=settings.client_cert)
    except ImportError as e:
        raise _missing_extra(e) from None


class NativeExporter:
    """Encodes batches with :class:`.wire.SdkWireEncoder` and sends them with a transport from
    :mod:`.transport` (``GrpcExporter`` or ``HttpExporter``)."""

    def __init__(self, transport) -> None:
        from .wire import SdkWireEncoder

        self.transport = transport
        self.encoder = SdkWireEncoder()

    def export_traces(self, traces: Sequence[Trace]):
        """An :class:`.transport.ExportOutcome` for ``traces``; an encoding error fails the batch, as in the SDK."""
        return self.transport.export(self.encoder.encode(traces), span_count(traces))

    def shutdown(self) -> None:
        self.transport.shutdown()


def make_native_exporter(settings: OtlpSettings) -> NativeExporter:
    """The native exporter for ``settings``; raises :class:`.transport.NativeUnsupported` where it cannot honour
    them (use :func:`make_exporter` then)."""
    try:
        from . import transport

        args = _sdk_arguments(settings)
        env = {**os.environ, **settings.tls_environment()}
        if settings.protocol == "grpc":
            return NativeExporter(transport.GrpcExporter(transport.resolve_grpc(**args, env=env), per_thread=True))
        return NativeExporter(transport.HttpExporter(transport.resolve_http(**args, env=env)))
    except ImportError as e:
        raise _missing_extra(e) from None


def make_sender(settings: OtlpSettings, *, sender: str = "native", workers: int = 1) -> OtlpSender:
    """An :class:`OtlpSender` with the native exporter (falling back to the SDK's, with :attr:`OtlpSender.note`
    saying why) or, with ``sender="sdk"``, the SDK's."""
    if sender not in SENDERS:
        raise UserError(f"OTLP sender must be one of {', '.join(SENDERS)}, got {sender!r}")
    note = None
    try:
        if sender == "native":
            from .transport import NativeUnsupported

            try:
                exporter = make_native_exporter(settings)
            except NativeUnsupported as e:
                note = f"the native OTLP sender cannot honour this: {e}; using the SDK exporter"
                exporter = make_exporter(settings)
        else:
            exporter = make_exporter(settings)
    except (ValueError, KeyError) as e:  # a malformed OTEL_* value (the SDK's exporter raises these too)
        raise UserError(f"OTLP settings: {type(e).__name__}: {e}") from None
    out = OtlpSender(exporter, workers=workers)
    out.note = note
    return out


# --- canonical spans -> the SDK's ReadableSpan ------------------------------------------------------------------


def to_readable_spans(traces: Iterable[Trace]) -> list:
    """SDK ``ReadableSpan`` objects carrying what our spans carry (resources and scopes shared, not copied).

    The SDK has no UNSPECIFIED span kind: such spans go out as INTERNAL.
    """
    from opentelemetry import trace as api
    from opentelemetry.sdk.resources import Resource as SdkResource
    from opentelemetry.sdk.trace import Event as SdkEvent
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    kinds = {SpanKind.UNSPECIFIED: api.SpanKind.INTERNAL, SpanKind.INTERNAL: api.SpanKind.INTERNAL,
             SpanKind.SERVER: api.SpanKind.SERVER, SpanKind.CLIENT: api.SpanKind.CLIENT,
             SpanKind.PRODUCER: api.SpanKind.PRODUCER, SpanKind.CONSUMER: api.SpanKind.CONSUMER}  # fmt: skip
    codes = {StatusCode.UNSET: api.StatusCode.UNSET, StatusCode.OK: api.StatusCode.OK,
             StatusCode.ERROR: api.StatusCode.ERROR}  # fmt: skip
    resources: dict[int, object] = {}
    scopes: dict[int, object] = {}

    def context(trace_id: str, span_id: str, flags: int) -> api.SpanContext:
        return api.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=False,
                               trace_flags=api.TraceFlags(flags & 0xFF or api.TraceFlags.SAMPLED))

    out = []
    for trace in traces:
        for s in trace:
            key = (id(s.resource), s.service)  # resource_or_default differs per service when there is none
            res = resources.get(key)
            if res is None:
                r = s.resource_or_default()
                res = resources[key] = SdkResource(dict(r.attributes), r.schema_url or None)
            scope = scopes.get(id(s.scope))
            if scope is None and s.scope is not None:
                scope = scopes[id(s.scope)] = InstrumentationScope(s.scope.name, s.scope.version or None,
                                                                   s.scope.schema_url or None, dict(s.scope.attributes))
            parent = context(s.trace_id, s.parent_id, s.flags) if s.parent_id else None
            out.append(ReadableSpan(
                name=s.name, context=context(s.trace_id, s.span_id, s.flags), parent=parent, resource=res,
                attributes=dict(s.attributes), events=[SdkEvent(e.name, dict(e.attributes), e.time_ns) for e in s.events],
                links=[api.Link(context(ln.trace_id, ln.span_id, ln.flags), dict(ln.attributes)) for ln in s.links],
                kind=kinds[s.kind], status=api.Status(codes[s.status.code], s.status.message or None),
                start_time=s.start_ns, end_time=s.end_ns, instrumentation_scope=scope,
            ))  # fmt: skip
    return out


# --- sending --------------------------------------------------------------------------------------------------


@dataclass
class SendCounts:
    sent_spans: int = 0
    failed_spans: int = 0
    failed_batches: int = 0
    first_error: str | None = None  # the first failure's reason, where known (the exporters also log their own)


class OtlpSender:
    """Exports traces in batches of at most ``max_batch_spans`` spans from ``workers`` threads.

    ``send`` returns at once while fewer than ``max_pending`` batches wait or are in flight; past that it waits
    for one to finish, so that a slow or absent collector slows the caller down instead of filling memory.
    ``close`` waits for every batch and shuts the exporter down. ``counts`` tells what arrived and what did not.
    """

    note: str | None = None  # why the native sender was not used, when it was asked for (make_sender sets it)

    def __init__(self, exporter, *, workers: int = 1, max_batch_spans: int = 512, max_pending: int | None = None
                 ) -> None:  # fmt: skip
        self.exporter = exporter  # the SDK's SpanExporter, or one with export_traces (NativeExporter)
        self.max_batch_spans = max_batch_spans
        self.counts = SendCounts()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-send")
        self._room = threading.Semaphore(max_pending or 4 * workers)
        self._pending: list[Future] = []
        self._batch: list[Trace] = []
        self._batch_spans = 0

    @property
    def kind(self) -> str:
        """"native" or "sdk": which exporter sends."""
        return "native" if hasattr(self.exporter, "export_traces") else "sdk"

    def send(self, traces: Sequence[Trace]) -> None:
        for t in traces:
            if self._batch and self._batch_spans + len(t) > self.max_batch_spans:
                self.flush()
            self._batch.append(t)
            self._batch_spans += len(t)
        if self._batch_spans >= self.max_batch_spans:
            self.flush()

    def send_request(self, body: bytes, spans: int) -> None:
        """Send an encoded ``ExportTraceServiceRequest`` of ``spans`` spans as it is (the native sender only)."""
        self._submit(self._export_request, body, spans)

    def flush(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_spans = self._batch, [], 0
            self._submit(self._export, batch)

    def _submit(self, fn, *args) -> None:
        self._room.acquire()
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(lambda _: self._room.release())
        self._pending.append(future)
        if len(self._pending) > 64:
            self._pending = [f for f in self._pending if not f.done()]

    def _export(self, batch: list[Trace]) -> None:
        n, error = span_count(batch), None
        try:
            export_traces = getattr(self.exporter, "export_traces", None)
            if export_traces is not None:
                outcome = export_traces(batch)
                sent, failed, error = outcome.sent_spans, outcome.failed_spans, outcome.error
            else:
                from opentelemetry.sdk.trace.export import SpanExportResult

                ok = self.exporter.export(to_readable_spans(batch)) == SpanExportResult.SUCCESS
                sent, failed = (n, 0) if ok else (0, n)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the batch was not delivered: count it
            sent, failed, error = 0, n, f"{type(e).__name__}: {e}"
        self._count(sent, failed, error)

    def _export_request(self, body: bytes, spans: int) -> None:
        try:
            outcome = self.exporter.transport.export(body, spans)
            sent, failed, error = outcome.sent_spans, outcome.failed_spans, outcome.error
        except Exception as e:  # noqa: BLE001 - as in _export
            sent, failed, error = 0, spans, f"{type(e).__name__}: {e}"
        self._count(sent, failed, error)

    def _count(self, sent: int, failed: int, error: str | None) -> None:
        with self._lock:
            self.counts.sent_spans += sent
            if failed:
                self.counts.failed_spans += failed
                self.counts.failed_batches += 1
                self.counts.first_error = self.counts.first_error or error

    def close(self) -> SendCounts:
        self.flush()
        self._pool.shutdown(wait=True)
        self.exporter.shutdown()
        return self.counts


def span_count(traces: Iterable[Trace]) -> int:
    return sum(len(t) for t in traces)


__all__ = ["SENDERS", "NativeExporter", "OtlpSender", "OtlpSettings", "SendCounts", "make_exporter",
           "make_native_exporter", "make_sender", "parse_header", "to_readable_spans"]
