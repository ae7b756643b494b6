"""A real OpenTelemetry collector on loopback: rotel (``pip install rotel``, a Rust collector with OTLP receivers
and exporters) for the benchmarks and tests that send into one. Docker does not run here, so this is the peer
that stands in for an OpenTelemetry Collector.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rotel_binary() -> str | None:
    """The ``rotel-agent`` binary the ``rotel`` package ships, or None when it is not installed."""
    try:
        import rotel
    except ImportError:
        return None
    p = Path(rotel.__file__).parent / "rotel-agent"
    return str(p) if p.is_file() else shutil.which("rotel-agent")


def start_rotel(tmp: Path, forward_to: int | None = None, cpus: Iterable[int] | None = None,
                batch_max_spans: int | None = None, timeout_s: float = 20.0) -> tuple[subprocess.Popen, int]:  # fmt: skip
    """rotel on a free OTLP/gRPC port: ``(process, port)``. It drops what it receives (its blackhole exporter), or
    forwards it over OTLP/gRPC to 127.0.0.1:``forward_to``; ``cpus``: the cores it may run on.

    ``batch_max_spans``: rotel's batch size. The rotel on PyPI (0.0.1a15, agent alpha10) loses the resource of the
    spans it takes from a request to fill a batch (fixed upstream later: rotel-dev/rotel#187); a batch larger than
    what arrives within its timeout is never filled that way."""
    binary = rotel_binary()
    if binary is None:
        raise RuntimeError("rotel is not installed: pip install rotel")
    port = free_port()
    exporter = ["--exporter", "blackhole"] if forward_to is None else [
        "--exporter", "otlp", "--otlp-exporter-endpoint", f"http://127.0.0.1:{forward_to}",
        "--otlp-exporter-protocol", "grpc", "--traces-batch-timeout", "100ms"]  # fmt: skip
    if batch_max_spans is not None:
        exporter += ["--traces-batch-max-size", str(batch_max_spans)]
    pin = None if cpus is None else (lambda cores=set(cpus): os.sched_setaffinity(0, cores))
    proc = subprocess.Popen([binary, "start", "--otlp-grpc-endpoint", f"127.0.0.1:{port}", "--otlp-http-endpoint",
                             f"127.0.0.1:{free_port()}", *exporter, "--pid-file", str(tmp / "rotel.pid"),
                             "--log-file", str(tmp / "rotel.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)  # fmt: skip
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"rotel did not open its port (see {tmp / 'rotel.log'})")
