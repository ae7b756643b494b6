"""``otel-tracegen infill serve`` and ``otel-tracegen infill file``.

    otel-tracegen infill serve [--config infill.yaml] [--receiver-grpc HOST:PORT] [--receiver-http HOST:PORT]
        [--exporter-endpoint HOST:PORT] [--queue-directory DIR] [--buffer-wait-s S] [--repair-model DIR] ...
    otel-tracegen infill file IN [IN ...] --out OUT [--out-format otlp-json|otlp-proto|jaeger|zipkin] ...

Every setting of :class:`~otel_tracegen.infill.service.InfillConfig` is a flag (``--<section>-<name>``) and a key
of the YAML file (``<section>: {<name>: value}``); a flag given on the command line wins over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from ..report import ReadReport, UserError
from .config import InfillConfig

_HELP = {
    "receiver_grpc": "OTLP/gRPC listen address, or 'none' (default 127.0.0.1:4327)",
    "receiver_http": "OTLP/HTTP listen address (also /metrics), or 'none' (default 127.0.0.1:4328)",
    "receiver_max_message_mib": "largest request taken, MiB (default 16)",
    "receiver_tls_cert": "TLS certificate (PEM) for both receivers",
    "receiver_tls_key": "TLS private key (PEM)",
    "receiver_bearer_token": "require 'authorization: Bearer TOKEN' (in YAML: ${env:NAME} reads it from the "
                             "environment)",
    "receiver_workers": "threads that decode and log requests, per receiver (default 4)",
    "receiver_read_timeout_s": "a TLS handshake or a request body must arrive within this, s (default 30)",
    "metrics_public": "serve /metrics without the bearer token (default: behind it)",
    "memory_limit_mib": "refuse requests with retry advice while the process's RSS is above this, MiB (default 0: "
                        "off; buffer.max_mib bounds the spans held)",
    "buffer_wait_s": "how long a trace is gathered from its first span before repair (default 2)",
    "buffer_max_traces": "traces held at most; the oldest go early beyond it (default 100000)",
    "buffer_max_mib": "memory for held spans (as decoded, ~1 KB + 3x its bytes a span) and remembered traces, MiB; "
                      "requests are refused with retry advice beyond it (default 256)",
    "buffer_remember_traces": "released traces remembered so that their late spans join them (default 20000; "
                              "about 7 KB each for 70-span traces)",
    "repair_model": "trace model directory (default: the shipped model/)",
    "repair_no_model": "rules only: re-parent orphans to the nearest ancestor, adjust clock skew",
    "repair_confidence": "below it the model's answer is not used (default 0.5)",
    "repair_skew_tolerance_ms": "overrun a child may have before it counts as clock skew (default 1)",
    "repair_batch_traces": "traces repaired per model batch (default 256)",
    "repair_threads": "torch threads for the model on the CPU (default: the CPUs the process may use, by affinity "
                      "and cgroup quota or OTEL_TRACEGEN_CPUS)",
    "queue_directory": "write-ahead log, outbound queue and dead letters (default ./otel-tracegen-infill-queue)",
    "queue_max_mib": "undelivered bytes in the log above which requests are refused with retry advice (default 1024)",
    "queue_fsync": "fsync the log before answering a request (default on)",
    "queue_dead_letter_max_mib": "bytes of dead letters kept at most; the oldest go first (default 256)",
    "queue_dead_letter_max_requests": "dead letters kept at most; the oldest go first (default 1000)",
    "exporter_endpoint": "downstream OTLP endpoint (default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT)",
    "exporter_protocol": "grpc or http/protobuf (default grpc)",
    "exporter_insecure": "plaintext gRPC downstream",
    "exporter_headers": "KEY=VALUE header for the downstream; repeatable",
    "exporter_compression": "gzip or none",
    "exporter_timeout_s": "per-attempt downstream timeout, s (default 10)",
    "exporter_retry_initial_s": "first retry delay after a transient downstream failure, s (default 0.5)",
    "exporter_retry_max_s": "longest retry delay, s (default 30)",
    "exporter_max_request_mib": "largest request sent downstream, MiB (default 4)",
    "localize_keep_s": "keep forwarded traces this long for GET /localize on the HTTP port, s (default 0: off)",
    "localize_max_spans": "spans kept for /localize at most; the oldest traces go first (default 500000)",
    "drain_s": "on shutdown, how long to keep forwarding what is queued, s (default 30)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="infill_command", required=True)
    s = sub.add_parser("serve", help="run the infill receiver: OTLP in, repaired OTLP out")
    s.add_argument("--config", type=Path, help="YAML settings (sections receiver, buffer, repair, queue, exporter, localize)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    for f in dataclasses.fields(InfillConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not None and f.default is not dataclasses.MISSING else None
        if f.name == "exporter_headers":
            s.add_argument("--exporter-header", dest=f.name, action="append", metavar="KEY=VALUE", help=_HELP[f.name])
        elif kind is bool or f.name == "exporter_insecure":
            s.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=_HELP[f.name])
        elif kind in (int, float):
            s.add_argument(flag, dest=f.name, type=kind, default=None, help=_HELP[f.name])
        elif f.name == "repair_threads":
            s.add_argument(flag, dest=f.name, type=int, default=None, help=_HELP[f.name])
        else:
            s.add_argument(flag, dest=f.name, default=None, help=_HELP[f.name])
    f = sub.add_parser("file", help="repair trace files offline")
    f.add_argument("inputs", nargs="+", help="trace files or directories (any readable format)")
    f.add_argument("--format", help="input format (default: detected per file)")
    f.add_argument("--out", required=True, type=Path, help="output file")
    f.add_argument("--out-format", default="otlp-json", help="otlp-json (default), otlp-proto, jaeger, zipkin")
    f.add_argument("--model", dest="repair_model", help="trace model directory (default: the shipped model/)")
    f.add_argument("--no-model", dest="repair_no_model", action="store_true", help="rules only")
    f.add_argument("--confidence", dest="repair_confidence", type=float, default=0.5)
    f.add_argument("--skew-tolerance-ms", dest="repair_skew_tolerance_ms", type=float, default=1.0)


def config_from_args(args) -> InfillConfig:
    config = InfillConfig.load(args.config) if getattr(args, "config", None) else InfillConfig()
    changes = {}
    for f in dataclasses.fields(InfillConfig):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if f.name == "exporter_headers":
            headers = dict(config.exporter_headers)
            for item in v:
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise UserError(f"--exporter-header {item!r}: expected KEY=VALUE")
                headers[key.strip()] = value.strip()
            v = headers
        changes[f.name] = v
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:
        raise UserError(str(e)) from None


def run(args, env, read) -> int:
    if args.infill_command == "serve":
        return serve(config_from_args(args), env, args.log_level)
    return repair_files(args, env, read)


# --- serve ----------------------------------------------------------------------------------------------------


def serve(config: InfillConfig, env, log_level: str = "info", ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully."""
    try:
        import aiohttp  # noqa: F401 - the HTTP receiver
        import grpc  # noqa: F401 - the gRPC receiver and the exporter
    except ModuleNotFoundError as e:
        raise UserError(f"infill serve needs {e.name}: pip install 'otel-tracegen[infill]'") from None
    from .receiver import GrpcReceiver, HttpReceiver
    from .service import InfillService, tune_gc, tune_malloc

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=env.stderr)  # fmt: skip
    if not config.receiver_grpc and not config.receiver_http:
        raise UserError("both receivers are off; give --receiver-grpc or --receiver-http")
    tls_files = None
    if config.receiver_tls_cert or config.receiver_tls_key:
        if not (config.receiver_tls_cert and config.receiver_tls_key):
            raise UserError("TLS needs both --receiver-tls-cert and --receiver-tls-key")
        tls_files = (config.receiver_tls_cert, config.receiver_tls_key)
    if config.receiver_bearer_token and not config.tls:
        logging.getLogger(__name__).warning(
            "a bearer token is required but TLS is off: the token crosses the network in plain text; give "
            "--receiver-tls-cert and --receiver-tls-key (or keep the receiver on loopback)")
    elif not config.receiver_bearer_token and any(_exposed(e) for e in (config.receiver_grpc, config.receiver_http)):
        logging.getLogger(__name__).warning(
            "the receiver listens beyond loopback with no bearer token: anyone who reaches it can send spans%s",
            " and read /localize" if config.localize_keep_s > 0 else "")
    tune_malloc()  # before the model and the buffers are allocated
    service = InfillService(config)
    tune_gc()
    limit = int(config.receiver_max_message_mib * (1 << 20))
    receivers = []
    try:
        if config.receiver_grpc:
            tls = tuple(Path(p).read_bytes() for p in tls_files) if tls_files else None
            receivers.append(GrpcReceiver(service, config.receiver_grpc, max_message_bytes=limit,
                                          token=config.receiver_bearer_token, tls=tls,  # type: ignore[arg-type]
                                          workers=config.receiver_workers))  # fmt: skip
        if config.receiver_http:
            receivers.append(HttpReceiver(service, config.receiver_http, max_message_bytes=limit,
                                          token=config.receiver_bearer_token, tls=tls_files,
                                          workers=config.receiver_workers,
                                          read_timeout_s=config.receiver_read_timeout_s,
                                          metrics_public=config.metrics_public))  # fmt: skip
    except (OSError, ValueError) as e:
        service.stop(drain=False)
        raise UserError(f"cannot start the receiver: {e}") from None
    service.start()
    for r in receivers:
        r.start()
    names = [f"OTLP/{'gRPC' if type(r).__name__.startswith('Grpc') else 'HTTP'} on port {r.port}" for r in receivers]
    print(f"otel-tracegen infill: listening ({', '.join(names)}); {service.recovered} request(s) replayed from "
          f"{config.queue_directory}", file=env.stderr, flush=True)  # fmt: skip
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.ports = [r.port for r in receivers]  # type: ignore[attr-defined]
        ready.service = service  # type: ignore[attr-defined]
        ready.set()
    while not stop.wait(0.5):
        pass
    print("otel-tracegen infill: shutting down (draining the queue)", file=env.stderr, flush=True)
    for r in receivers:
        r.stop()
    service.stop()
    m = service.metrics
    print(f"otel-tracegen infill: received {int(m.value('receiver_accepted_spans_total'))} spans, repaired "
          f"{int(m.value('repaired_traces_total'))} trace(s), forwarded {int(m.value('exporter_sent_spans_total'))} "
          f"spans, {len(service.outbound)} request(s) left queued", file=env.stderr)  # fmt: skip
    return 0


def _exposed(endpoint: str | None) -> bool:
    """Whether a listen address reaches beyond loopback."""
    if not endpoint:
        return False
    host = endpoint.rpartition(":")[0].strip("[]")
    return host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127.")


# --- file -----------------------------------------------------------------------------------------------------


def repair_files(args, env, read) -> int:
    from ..formats import otlp_proto, write_traces
    from ..trace import group_traces
    from . import wire
    from .repair import Released
    from .service import load_repairer

    report = ReadReport()
    traces = read(args.format, args.inputs, report)
    for p in report.problems[:20]:
        print(f"warning: {p}", file=env.stderr)
    if not traces:
        raise UserError("no traces read")
    config = dataclasses.replace(InfillConfig(), repair_model=args.repair_model, repair_no_model=args.repair_no_model,
                                 repair_confidence=args.repair_confidence,
                                 repair_skew_tolerance_ms=args.repair_skew_tolerance_ms)  # fmt: skip
    repairer = load_repairer(config)
    t0 = time.perf_counter()
    reasons: Counter = Counter()
    methods: Counter = Counter()
    out_spans = []
    fixed = 0
    batch = 256
    for b in range(0, len(traces), batch):
        chunk = traces[b : b + batch]
        results = repairer.repair([(wire.from_spans(t.spans), Released()) for t in chunk])
        for r in results:
            reasons.update(r.repairs)
            methods.update(r.methods)
            fixed += bool(r.repairs)
            out_spans.extend(otlp_proto.loads(wire.encode(r.spans)))
    repaired = group_traces(out_spans)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_traces(args.out_format, repaired, args.out)
    took = time.perf_counter() - t0
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items())) or "nothing to repair"
    how = ", ".join(f"{k}: {n}" for k, n in sorted(methods.items()))
    print(f"{len(traces)} traces, {sum(len(t) for t in traces)} spans read; {fixed} trace(s) repaired "
          f"({detail}{'; methods ' + how if how else ''}) in {took:.1f}s; wrote {args.out}", file=env.stdout)
    return 0
