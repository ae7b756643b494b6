"""Sending traces over OTLP (gRPC or HTTP/protobuf) with the OpenTelemetry SDK's own exporters.

The exporters are the reference implementation of the protocol: they honour ``OTEL_EXPORTER_OTLP_*`` (endpoint,
headers, certificates, compression, timeout) for every setting not given explicitly, retry what the spec says
is retryable, and report failure instead of raising. This module builds one from telemetrygen-style flags,
turns canonical traces into the SDK's ``ReadableSpan`` and exports them in batches from worker threads,
counting every span that could not be delivered (so that a failing collector is never silent).

Needs the ``otlp`` extra (``opentelemetry-exporter-otlp-proto-grpc``/``-http``); imported lazily.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .report import UserError
from .trace import SpanKind, StatusCode, Trace

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

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UserError(f"OTLP protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.compression not in (None, "gzip", "none"):
            raise UserError(f"OTLP compression must be gzip or none, got {self.compression!r}")

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


def make_exporter(settings: OtlpSettings):
    """The SDK's OTLP span exporter for ``settings``."""
    headers = dict(settings.headers) or None
    try:
        if settings.protocol == "grpc":
            import grpc
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            compression = {"gzip": grpc.Compression.Gzip, "none": grpc.Compression.NoCompression}.get(settings.compression or "")
            endpoint = settings.endpoint
            if endpoint and "://" in endpoint and settings.insecure is None:
                settings.insecure = endpoint.startswith("http://")
            return OTLPSpanExporter(endpoint=endpoint, insecure=settings.insecure, headers=headers,
                                    timeout=settings.timeout_s, compression=compression)
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        compression = {"gzip": Compression.Gzip, "none": Compression.NoCompression}.get(settings.compression or "")
        return OTLPSpanExporter(endpoint=settings.http_url(), headers=headers, timeout=settings.timeout_s,
                                compression=compression)
    except ImportError as e:
        raise UserError(f"sending OTLP needs the otlp extra: pip install 'otel-tracegen[otlp]' ({e.name} is missing)") from None


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
    first_error: str | None = None  # an exception raised while exporting (the exporter itself logs its own)


class OtlpSender:
    """Exports traces in batches of at most ``max_batch_spans`` spans from ``workers`` threads.

    ``send`` returns at once (batches queue on the pool); ``close`` waits for every batch and shuts the
    exporter down. ``counts`` tells what arrived and what did not.
    """

    def __init__(self, exporter, *, workers: int = 1, max_batch_spans: int = 512) -> None:
        self.exporter = exporter
        self.max_batch_spans = max_batch_spans
        self.counts = SendCounts()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-send")
        self._pending: list[Future] = []
        self._batch: list[Trace] = []
        self._batch_spans = 0

    def send(self, traces: Sequence[Trace]) -> None:
        for t in traces:
            if self._batch and self._batch_spans + len(t) > self.max_batch_spans:
                self.flush()
            self._batch.append(t)
            self._batch_spans += len(t)
        if self._batch_spans >= self.max_batch_spans:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_spans = self._batch, [], 0
            self._pending.append(self._pool.submit(self._export, batch))
            self._pending = [f for f in self._pending if not f.done()]

    def _export(self, batch: list[Trace]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        n, error = span_count(batch), None
        try:
            ok = self.exporter.export(to_readable_spans(batch)) == SpanExportResult.SUCCESS
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the batch was not delivered: count it
            ok, error = False, f"{type(e).__name__}: {e}"
        with self._lock:
            if ok:
                self.counts.sent_spans += n
            else:
                self.counts.failed_spans += n
                self.counts.failed_batches += 1
                self.counts.first_error = self.counts.first_error or error

    def close(self) -> SendCounts:
        self.flush()
        self._pool.shutdown(wait=True)
        self.exporter.shutdown()
        return self.counts


def span_count(traces: Iterable[Trace]) -> int:
    return sum(len(t) for t in traces)


__all__ = ["OtlpSender", "OtlpSettings", "SendCounts", "make_exporter", "parse_header", "to_readable_spans"]
