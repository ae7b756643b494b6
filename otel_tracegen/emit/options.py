"""The flags ``generate`` and ``replay`` share, and what they turn into: where traces go (files, OTLP with
telemetrygen's flags and the SDK's ``OTEL_EXPORTER_OTLP_*``), what is added to them (attributes), and when they
go (the traffic shape). Argument types give one-line errors naming the bad value."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..formats import writable_formats
from ..report import UserError


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return v


def start_time(text: str) -> int:
    """Unix nanoseconds from an integer (ns) or an ISO 8601 / RFC 3339 time."""
    from datetime import datetime, timezone

    if text.lstrip("-").isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not Unix nanoseconds or an ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def duration(text: str) -> float:
    """Seconds: a number, with an optional s/m/h suffix, or inf."""
    from ..localize.window import parse_duration_s

    try:
        return parse_duration_s(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def _header(text: str) -> tuple[str, str]:
    from .sender import parse_header

    try:
        return parse_header(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _attribute(text: str):
    from .attributes import parse_attribute

    try:
        return parse_attribute(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_output_arguments(p: argparse.ArgumentParser, *, verb: str, workers: int = 1) -> None:
    """Files, OTLP and attributes: the same flags for generate and replay."""
    o = p.add_argument_group("output: a file, OTLP, or both")
    o.add_argument("--out", type=Path, help=f"write the {verb} traces to this file (.gz compresses)")
    o.add_argument("--format", default="otlp-json", choices=writable_formats(), help="file format (default otlp-json)")
    o.add_argument("--start-time", type=start_time, help="anchor of the timestamps: Unix ns or ISO 8601 (default: now)")
    o.add_argument("--otlp-endpoint", help="send OTLP to HOST:PORT or a URL (default: OTEL_EXPORTER_OTLP_ENDPOINT)")
    o.add_argument("--otlp-http", action="store_true", help="OTLP/HTTP protobuf instead of gRPC")
    o.add_argument("--otlp-insecure", action="store_true", help="plain text instead of TLS")
    o.add_argument("--otlp-header", type=_header, action="append", default=[], metavar="KEY=VALUE",
                   help="request header; repeatable")
    o.add_argument("--otlp-compression", choices=("gzip", "none"), help="default: OTEL_EXPORTER_OTLP_COMPRESSION")
    o.add_argument("--otlp-sender", choices=("native", "sdk"), default="native",
                   help="native: write the OTLP bytes directly and send them with grpcio/requests (default, several "
                        "times faster); sdk: the OpenTelemetry SDK's exporter, the reference (same bytes, same "
                        "OTEL_EXPORTER_OTLP_* settings)")
    o.add_argument("--workers", type=positive_int, default=workers,
                   help=f"threads sending OTLP batches, each over a connection of its own (default {workers})")
    t = p.add_argument_group("TLS (telemetrygen's flags; default: OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE and "
                             "CLIENT_KEY/CLIENT_CERTIFICATE)")
    t.add_argument("--ca-cert", metavar="FILE", help="trust the collector's certificate from this CA (PEM)")
    t.add_argument("--mtls", action="store_true", help="mutual TLS: present --client-cert and --client-key")
    t.add_argument("--client-cert", metavar="FILE", help="client certificate (PEM), with --mtls")
    t.add_argument("--client-key", metavar="FILE", help="client private key (PEM), with --mtls")
    a = p.add_argument_group("attributes (OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME are added to every "
                             "resource where it has no such key)")
    a.add_argument("--otlp-attributes", type=_attribute, action="append", default=[], metavar='KEY="VALUE"',
                   help="resource attribute on every service's resource, winning over its own (service.name too: "
                        'then every span is that service); KEY="text", KEY=true|false or KEY=NUMBER; repeatable')
    a.add_argument("--telemetry-attributes", type=_attribute, action="append", default=[], metavar='KEY="VALUE"',
                   help="span attribute on every span; repeatable")


def add_traffic_arguments(p: argparse.ArgumentParser, *, span_rate: bool) -> None:
    """When traces go: the rate, its shape over time, and how long."""
    r = p.add_argument_group("traffic: rate and shape")
    r.add_argument("--rate", type=positive_float, help="traces/s (the mean, for sine): Poisson arrivals, sent at that "
                                                       "pace (default: as fast as possible)")
    if span_rate:
        r.add_argument("--span-rate", type=positive_float,
                       help="spans/s instead of --rate: traces/s = this / the library's mean spans per trace")
    r.add_argument("--duration", type=duration, help="seconds to run (or 10s, 5m, 1h, inf) instead of --count")
    r.add_argument("--shape", choices=("constant", "ramp", "sine", "bursts"), default="constant",
                   help="constant (default); ramp from --rate to --ramp-to; sine around --rate; bursts of --rate")
    r.add_argument("--ramp-to", type=float, metavar="R", help="ramp: traces/s at the end of the ramp")
    r.add_argument("--ramp-duration", type=duration, help="ramp: its length (default: --duration), then held")
    r.add_argument("--period", type=duration, default=60.0, help="sine: the period (default 60s; 24h for diurnal)")
    r.add_argument("--amplitude", type=float, default=0.5, help="sine: the swing, a share of --rate (default 0.5)")
    r.add_argument("--burst-on", type=duration, default=1.0, help="bursts: how long each lasts (default 1s)")
    r.add_argument("--burst-off", type=duration, default=4.0, help="bursts: the pause between them (default 4s)")
    r.add_argument("--off-rate", type=float, default=0.0, help="bursts: traces/s between them (default 0)")
    r.add_argument("--schedule", type=Path, metavar="FILE",
                   help="a rate schedule instead: 'time rate' per line (seconds or 10s/5m/1h, traces/s), joined "
                        "linearly, held after the last point (a last rate of 0 ends the run)")


def shape_from_args(args, rate: float | None):
    """The traffic shape the flags describe; None when there is no rate (as fast as possible)."""
    from .pacing import shape_from_options

    shaped = args.shape != "constant" or args.ramp_to is not None
    if args.schedule is not None:
        if rate is not None or shaped:
            raise UserError("--schedule gives the rate itself: drop --rate/--span-rate and --shape")
        return shape_from_options(0.0, schedule=args.schedule)
    if rate is None:
        if shaped:
            raise UserError(f"--shape {args.shape} needs --rate (traces/s)")
        return None
    ramp_s = args.ramp_duration if args.ramp_duration is not None else args.duration
    return shape_from_options(rate, shape=args.shape, ramp_to=args.ramp_to,
                              ramp_s=ramp_s if ramp_s not in (None, math.inf) else None, period_s=args.period,
                              amplitude=args.amplitude, burst_on_s=args.burst_on, burst_off_s=args.burst_off,
                              off_rate=args.off_rate)  # fmt: skip


def otlp_settings(args):
    """OTLP settings from the flags, or None when nothing says where to send (no flag, no OTEL_* endpoint)."""
    from .sender import OtlpSettings

    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not args.otlp_endpoint and not env_endpoint and not args.otlp_http:
        if args.ca_cert or args.mtls or args.client_cert or args.client_key:
            raise UserError("TLS flags need somewhere to send: --otlp-endpoint HOST:PORT")
        return None
    protocol = "http/protobuf" if args.otlp_http else os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol not in ("grpc", "http/protobuf"):
        raise UserError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only grpc and http/protobuf are supported")
    if args.mtls and not (args.client_cert and args.client_key):
        raise UserError("--mtls needs --client-cert and --client-key")
    if (args.client_cert or args.client_key) and not args.mtls:
        raise UserError("--client-cert and --client-key go with --mtls (as in telemetrygen)")
    return OtlpSettings(endpoint=args.otlp_endpoint, protocol=protocol, insecure=True if args.otlp_insecure else None,
                        headers=dict(args.otlp_header), compression=args.otlp_compression, ca_cert=args.ca_cert,
                        client_cert=args.client_cert, client_key=args.client_key)  # fmt: skip


def extra_attributes(args):
    from .attributes import ExtraAttributes

    return ExtraAttributes.from_flags(args.otlp_attributes, args.telemetry_attributes)


def otlp_line(otlp, sender, counts) -> str:
    """The closing line about OTLP delivery."""
    where = otlp.endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"
    return (f"OTLP ({otlp.protocol}, {sender.kind} sender) to {where}: {counts.sent_spans:,} spans delivered, "
            f"{counts.failed_spans:,} failed"
            + (f" in {counts.failed_batches} batches" if counts.failed_batches else "")
            + (f" ({counts.first_error})" if counts.first_error else ""))  # fmt: skip
