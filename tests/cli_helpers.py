"""Shared by the tests that train tiny models and run the command in-process."""

from __future__ import annotations

import io
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from otel_tracegen.cli import Environment, main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trainticket"
FAST = ["--batch-size", "8", "--eval-batches", "2", "--seed", "7"]  # tiny training runs, seeded


def run(*argv: str) -> tuple[int, str, str]:
    """``otel-tracegen ARGV`` in this process: (exit status, stdout, stderr)."""
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO())
    rc = main(list(argv), env)
    return rc, env.stdout.getvalue(), env.stderr.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy CI box (another pytest beside this one) torch's
    intra-op threads oversubscribe the cores: 20 steps went from 0.5 s to 20 s. One thread keeps it in seconds.
    Import it into a test module to use it there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on (closed again at once), never one this process was given before: the
    OS may hand a just-closed port out again, and a test asking for three ports then gets two alike."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh loopback port in 100 tries")


def rotel_binary() -> str | None:
    """The ``rotel-agent`` collector binary the ``rotel`` package ships, or None when it is not installed."""
    from otel_tracegen.loopback import rotel_binary as binary

    return binary()


@contextmanager
def rotel_forwarding(tmp_path: Path, to_port: int):
    """A real collector (rotel, from PyPI) on a free OTLP/gRPC port, forwarding over OTLP/gRPC to
    127.0.0.1:``to_port``; yields its port. Skips the test when rotel is not installed."""
    binary = rotel_binary()
    if binary is None:
        pytest.skip("rotel (pip install rotel) is not installed: no real collector to send through")
    from otel_tracegen.loopback import start_rotel

    proc, grpc_port = start_rotel(tmp_path, forward_to=to_port)
    try:
        yield grpc_port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
