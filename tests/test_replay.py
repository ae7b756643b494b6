"""``otel-tracegen replay`` and its parts: the pre-encoded library (byte-equal to the SDK path's encoding of the
same traces), fresh ids, re-anchored and jittered times, traffic shapes, selection, attributes, the CLI into real
sinks over loopback (a grpcio sink, an HTTP sink, the rotel collector), and faults (a collector that is down, bad
records, empty libraries, filters that match nothing).
"""

from __future__ import annotations

import gzip
import json
import threading
from collections import Counter
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_tracegen.cli import ExitStatus
from otel_tracegen.emit import pacing
from otel_tracegen.emit.attributes import (LIBRARY_ATTRIBUTE, SYNTHETIC_ATTRIBUTE, ExtraAttributes,
                                           environment_resource, parse_attribute)  # fmt: skip
from otel_tracegen.emit.library import load_library, parse_weights
from otel_tracegen.emit.replay import Picker, _Scaled, replay
from otel_tracegen.emit.template import IdStream, Templates, warp
from otel_tracegen.emit.wire import SdkWireEncoder
from otel_tracegen.formats import read_traces, write_traces
from otel_tracegen.report import ReadReport, UserError
from otel_tracegen.trace import Event, Link, SpanKind, Trace
from otel_tracegen.validate import validate

from .cli_helpers import EXAMPLES, free_port, rotel_forwarding, run
from .strategies import traces as trace_strategy

ZIPKIN = Path(__file__).parent / "testdata" / "realworld" / "zipkin"
T0 = 1_760_000_000_000_000_000


def _library(tmp_path: Path, traces: list[Trace], name: str = "lib.jsonl") -> Path:
    path = tmp_path / name
    write_traces("otlp-json", traces, path)
    return path


def _shape(trace: Trace) -> tuple:
    """The tree and everything but ids and absolute times, in any span order: what a replay must keep. (The
    SDK path sends UNSPECIFIED kinds as INTERNAL.)"""
    t0 = min(s.start_ns for s in trace.spans)
    key = {s.span_id: (s.service, s.name, s.start_ns - t0, s.end_ns - t0) for s in trace.spans}
    return tuple(sorted((key[s.span_id], repr(key.get(s.parent_id, "orphan" if s.parent_id else "root")),
                         int(max(s.kind, SpanKind.INTERNAL)), int(s.status.code), s.status.message)
                        for s in trace.spans))  # fmt: skip


# --- the pre-encoded library --------------------------------------------------------------------------------------


def _with_oddities(trace: Trace) -> Trace:
    """Make a drawn trace captured-looking: a link into itself, an orphan, an event without a time."""
    spans = trace.spans
    spans[0].links = [Link(trace.trace_id, spans[-1].span_id, attributes={"k": 1})] + spans[0].links
    if len(spans) > 2:
        spans[-1].parent_id = "00000000000000ff"  # an orphan: its parent is not in the trace
    spans[0].events = [Event(0, "no time")] + spans[0].events
    for s in spans:  # event times near their span, as recorded (a library keeps no trace spread over years)
        s.events = [Event(s.start_ns - 5 + e.time_ns % (s.end_ns - s.start_ns + 10) if e.time_ns else 0, e.name,
                          e.attributes) for e in s.events]  # fmt: skip
    return trace


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(trace_strategy(max_spans=5), min_size=1, max_size=4), st.integers(0, 2**32),
       st.sampled_from([0.0, 0.5]))  # fmt: skip
def test_batches_are_the_sdk_paths_bytes_for_the_same_traces(traces, seed, jitter):
    traces = [_with_oddities(t) for t in traces]
    templates = Templates(traces)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(traces), 7)
    arrivals = T0 + np.sort(rng.integers(0, 10**9, 7))
    body = templates.batch(picks, arrivals, IdStream(seed), jitter=jitter, rng=np.random.default_rng(1))
    made = templates.materialize(picks, arrivals, IdStream(seed), jitter=jitter, rng=np.random.default_rng(1))
    assert body == SdkWireEncoder().encode(made)
    for k, (i, trace) in enumerate(zip(picks, made)):
        assert min(s.start_ns for s in trace) == arrivals[k]  # re-anchored at its arrival
        original = traces[i]
        if not jitter:
            assert _shape(trace) == _shape(original)
        # the orphan stays an orphan (with a fresh parent id of its own); jitter keeps children inside
        assert {v.kind for v in validate(trace)} == {v.kind for v in validate(original)}
        assert trace.spans[0].links[0].span_id == trace.spans[-1].span_id  # the link into the trace follows it
        assert trace.spans[0].links[0].trace_id == trace.trace_id


def test_ids_are_fresh_unique_and_reproducible():
    traces = read_traces("spancsv", [EXAMPLES], ReadReport())
    templates = Templates(traces)
    ids = IdStream(7)
    seen_spans, seen_traces = set(), set()
    for b in range(20):
        picks = np.arange(len(traces))
        made = templates.materialize(picks, T0 + picks * 1000, ids)
        for t in made:
            assert t.trace_id not in seen_traces
            seen_traces.add(t.trace_id)
            own = {s.span_id for s in t}
            assert not own & seen_spans
            seen_spans |= own
    originals = {s.span_id for t in traces for s in t}
    assert not originals & seen_spans
    again = Templates(traces).materialize(np.arange(3), T0 + np.arange(3), IdStream(7))
    assert [t.trace_id for t in again] == [t.trace_id for t in Templates(traces).materialize(
        np.arange(3), T0 + np.arange(3), IdStream(7))]
    other = IdStream(7, process=1)  # another process of the same run: another range
    assert not set(other.slots(1000).tolist()) & set(IdStream(7).slots(1000).tolist())


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 3.0), st.integers(0, 2**32))
def test_jitter_keeps_order_and_bounds_every_stretch(jitter, seed):
    rng = np.random.default_rng(seed)
    rel = np.sort(rng.integers(0, 10**7, 200))
    rel[0] = 0
    owner = np.zeros(rel.size, dtype=np.int64)
    out = warp(rel, owner, np.array([float(rel.max())]), jitter, np.random.default_rng(seed))
    assert np.all(np.diff(out) >= 0)  # increasing: containment and order survive
    gaps, new = np.diff(rel).astype(float), np.diff(out).astype(float)
    big = gaps > 1000  # rounding aside
    assert np.all(new[big] <= gaps[big] * (1 + jitter) * 1.001 + 2)
    assert np.all(new[big] >= gaps[big] / (1 + jitter) / 1.001 - 2)


def test_jittered_replays_of_valid_traces_stay_valid_and_vary():
    traces = [t for t in read_traces("spancsv", [EXAMPLES], ReadReport()) if not validate(t)]
    assert traces
    templates = Templates(traces)
    made = templates.materialize(np.arange(len(traces)), T0 + np.arange(len(traces)), IdStream(1), jitter=0.3,
                                 rng=np.random.default_rng(0))  # fmt: skip
    for t, original in zip(made, traces):
        assert not validate(t)
        ratio = (t.end_ns - t.start_ns) / max(1, original.end_ns - original.start_ns)
        assert 1 / 1.3 - 1e-6 <= ratio <= 1.3 + 1e-6
    assert any(_shape(t) != _shape(o) for t, o in zip(made, traces))


# --- pacing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    pacing.constant(2000.0),
    pacing.ramp(500.0, 3000.0, 20.0),
    pacing.Sine(2000.0, 0.8, 10.0),
    pacing.bursts(4000.0, 1.0, 3.0, 200.0),
    pacing.Piecewise([(0, 100), (5, 3000), (5, 0), (8, 0), (12, 1000)]),
])  # fmt: skip
@pytest.mark.parametrize("poisson", [True, False])
def test_arrivals_follow_the_shape_window_by_window(shape, poisson):
    arrivals = pacing.Arrivals(shape, poisson=poisson, seed=3)
    got = np.concatenate([arrivals.take(5000) for _ in range(8)]) / 1e9
    assert np.all(np.diff(got) >= 0)
    horizon = 20.0
    got = got[got < horizon]
    assert got.size and got[-1] > horizon - 1  # enough arrivals were drawn to cover the horizon
    for lo in np.arange(0, horizon, 0.5):
        want = pacing.expected_count(shape, lo, lo + 0.5)
        n = np.count_nonzero((got >= lo) & (got < lo + 0.5))
        slack = 5 * np.sqrt(want) + 3 if poisson else 2
        assert abs(n - want) <= slack, (lo, n, want)


def test_a_schedule_that_ends_at_zero_ends_the_traffic(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("time,rate\n0 100\n2s 100  # two seconds\n2s 0\n")
    arrivals = pacing.Arrivals(pacing.read_schedule(path), seed=0)
    got = arrivals.take(10_000)
    assert 150 < got.size < 260 and got[-1] < 2e9
    assert arrivals.take(10).size == 0
    path.write_text("0 100\n3 oops\n")
    with pytest.raises(UserError, match=r"s.csv:2"):
        pacing.read_schedule(path)


# --- the library: selection, filters, attributes, bad input -------------------------------------------------------


def test_passes_keep_the_library_mix_exactly_and_weights_reweigh():
    picker = Picker(7, None, np.random.default_rng(0))
    got = picker.take(70)
    assert Counter(got.tolist()) == {i: 10 for i in range(7)}
    w = np.array([0.5, 0.5, 0, 0, 0, 0, 0])
    assert set(Picker(7, w, np.random.default_rng(0)).take(200).tolist()) == {0, 1}


def test_filters_weights_and_their_errors(tmp_path):
    traces = read_traces("zipkin", [ZIPKIN], ReadReport())
    lib = load_library([ZIPKIN])
    entries = Counter(lib.entries)
    top, n = entries.most_common(1)[0]
    assert len(load_library([ZIPKIN], service=top)) == n
    with pytest.raises(UserError, match=r"no trace of the library is entered at 'nope'; it has .*" + top):
        load_library([ZIPKIN], service="nope")
    with pytest.raises(UserError, match="names entries the library does not have: nope"):
        load_library([ZIPKIN], weights={"nope": 1.0})
    weighted = load_library([ZIPKIN], weights={top: 0.0})
    assert weighted.entry_mix().get(top, 0.0) == 0.0
    with pytest.raises(UserError, match="ENTRY=W"):
        parse_weights(["a=-1"])
    assert parse_weights(["a=2,b=0.5", "c=1"]) == {"a": 2.0, "b": 0.5, "c": 1.0}
    assert lib.read == len(traces)


def test_a_bad_record_is_named_by_file_and_line_and_the_rest_replays(tmp_path):
    good = (Path(__file__).parent / "testdata" / "otlp" / "collector_file_exporter.jsonl").read_text()
    lines = good.splitlines()
    path = tmp_path / "lib.jsonl"
    path.write_text(lines[0] + "\n{not json\n" + "\n".join(lines[1:]) + "\n")
    out = tmp_path / "out.json"
    rc, _, err = run("replay", str(path), "--count", "5", "--out", str(out))
    assert rc == ExitStatus.SUCCESS, err
    assert f"problem: {path}:2" in err
    assert len(read_traces("otlp-json", [out], ReadReport())) == 5


@pytest.mark.parametrize("argv, message", [
    (["--rate", "0"], "must be a finite number > 0"),
    (["--rate", "-3"], "must be a finite number > 0"),
    (["--service", "nope", "--count", "1"], "no trace of the library is entered at 'nope'"),
    (["--shape", "sine", "--count", "1"], "--shape sine needs --rate"),
    (["--count", "1", "--mtls"], "TLS flags need somewhere to send"),
])  # fmt: skip
def test_one_line_errors(tmp_path, argv, message, capsys):
    rc, _, err = run("replay", str(EXAMPLES), "--out", str(tmp_path / "o.json"), *argv)
    err += capsys.readouterr().err  # argparse's own errors go to the process's stderr
    assert rc in (ExitStatus.ERROR, ExitStatus.USAGE)
    assert message in err and "Traceback" not in err


def test_a_span_without_times_replays_without_them(tmp_path):
    trace = read_traces("spancsv", [EXAMPLES], ReadReport())[0]
    trace.spans[2].start_ns = trace.spans[2].end_ns = 0  # as a Zipkin span without a timestamp reads
    lib = load_library([_library(tmp_path, [trace])])
    templates = Templates(lib.traces)
    body = templates.batch([0], np.array([T0]), IdStream(0))
    [made] = templates.materialize([0], np.array([T0]), IdStream(0))
    assert body == SdkWireEncoder().encode([made])
    assert (made.spans[2].start_ns, made.spans[2].end_ns) == (0, 0)
    assert min(s.start_ns for s in made if s.start_ns) == T0


def test_a_trace_that_cannot_be_re_anchored_is_named_and_left_out(tmp_path):
    good, bad = read_traces("spancsv", [EXAMPLES], ReadReport())[:2]
    bad.spans[1].events = [Event(bad.spans[1].start_ns - 2 * 365 * 24 * 3600 * 10**9, "long ago")]
    report = ReadReport()
    lib = load_library([_library(tmp_path, [good, bad])], report=report)
    assert len(lib) == 1 and lib.read == 2
    assert f"trace {bad.trace_id}: cannot be replayed" in str(report.problems[0])


def test_an_empty_library_is_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    rc, _, err = run("replay", str(tmp_path / "empty.jsonl"), "--count", "1", "--out", str(tmp_path / "o.json"))
    assert rc == ExitStatus.ERROR
    assert "error:" in err and err.count("\n") <= 3


def test_attribute_parsing_and_who_wins():
    assert parse_attribute('team="a=b"') == ("team", "a=b")
    assert parse_attribute("on=true") == ("on", True)
    assert parse_attribute("n=42") == ("n", 42)
    assert parse_attribute("x=1.5") == ("x", 1.5)
    with pytest.raises(ValueError, match="expected key"):
        parse_attribute("novalue")
    env = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=load%20test,bad, service.name=ignored ",
           "OTEL_SERVICE_NAME": "svc-from-env"}  # fmt: skip
    assert environment_resource(env) == {"deployment.environment": "load test", "service.name": "svc-from-env"}
    extra = ExtraAttributes.from_flags([("team", "a")], [("test.run", 7)], env)
    attrs = extra.resource_attributes({"service.name": "cart", "team": "own"}, "cart")
    assert attrs["service.name"] == "cart"  # never replaced by the environment
    assert attrs["deployment.environment"] == "load test" and attrs["team"] == "a"
    assert attrs[SYNTHETIC_ATTRIBUTE] is True
    assert extra.service_for("") == "svc-from-env" and extra.service_for("cart") == "cart"
    asked = ExtraAttributes.from_flags([("service.name", "one")], [], env)
    assert asked.service_for("cart") == "one" and asked.resource_attributes({}, "cart")["service.name"] == "one"
    assert extra.span_attributes({"a": 1}, mark=True) == {"a": 1, "test.run": 7, SYNTHETIC_ATTRIBUTE: True}


# --- the command, into real sinks -----------------------------------------------------------------------------------


grpc = pytest.importorskip("grpc")


class _Sink:
    """An OTLP/gRPC receiver keeping the raw request bytes (no protobuf objects: it must keep up)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))

        def export(body, context):
            with self.lock:
                self.bodies.append(body)
            return b""

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None,
                                                            response_serializer=None)})  # fmt: skip
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def traces(self) -> list[Trace]:
        from otel_tracegen.formats.otlp_proto import loads
        from otel_tracegen.trace import group_traces

        return group_traces(s for b in self.bodies for s in loads(b))


@pytest.fixture
def sink():
    s = _Sink()
    yield s
    s.server.stop(0)


def test_replay_through_the_rotel_collector_at_a_rate(tmp_path, sink, monkeypatch):
    library = [t for t in read_traces("spancsv", [EXAMPLES], ReadReport()) if not validate(t)]
    path = _library(tmp_path, library)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=replay-test,service.name=not-this")
    with rotel_forwarding(tmp_path, sink.port) as port:
        rc, out, err = run("replay", str(path), "--rate", "150", "--duration", "3", "--otlp-endpoint",
                           f"127.0.0.1:{port}", "--otlp-insecure", "--telemetry-attributes", 'load.test="yes"',
                           "--json", "--seed", "4")  # fmt: skip
        assert rc == ExitStatus.SUCCESS, err
        summary = json.loads(out)
        deadline = 50
        while len(sink.traces()) < summary["traces"] and deadline:
            threading.Event().wait(0.1)
            deadline -= 1
    got = sink.traces()
    assert len(got) == summary["traces"] and summary["failed_spans"] == 0
    assert abs(summary["traces"] - 450) < 5 * 450**0.5  # Poisson at 150/s for 3 s
    assert len({t.trace_id for t in got}) == len(got)
    span_ids = [s.span_id for t in got for s in t]
    assert len(set(span_ids)) == len(span_ids)
    want = Counter(_shape(t) for t in library)
    digest = load_library([path]).digest
    for t in got:
        assert not validate(t)
        assert _shape(t) in want
        for s in t:
            assert s.attributes[SYNTHETIC_ATTRIBUTE] is True and s.attributes["load.test"] == "yes"
            res = s.resource.attributes
            assert res["deployment.environment"] == "replay-test" and res["service.name"] == s.service != "not-this"
            assert res[LIBRARY_ATTRIBUTE] == digest
    starts = sorted(t.start_ns for t in got)
    assert (starts[-1] - starts[0]) / 1e9 < 3.0


def test_zipkin_captured_traces_replay_as_captured_into_a_file_and_over_http(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from otel_tracegen.formats.otlp_proto import loads
    from otel_tracegen.trace import group_traces

    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            data = self.rfile.read(int(self.headers["Content-Length"]))
            bodies.append(gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "replayed.json"
    try:
        rc, _, err = run("replay", str(ZIPKIN), "--count", "40", "--out", str(out), "--otlp-http", "--otlp-endpoint",
                         f"127.0.0.1:{server.server_port}", "--otlp-insecure", "--otlp-compression", "gzip",
                         "--otlp-sender", "sdk", "--seed", "2")  # fmt: skip
    finally:
        server.shutdown()
    assert rc == ExitStatus.SUCCESS, err
    library = read_traces("zipkin", [ZIPKIN], ReadReport())
    flagged = sum(1 for t in library if validate(t))
    assert f"{flagged} flagged by the validator" in err
    written = read_traces("otlp-json", [out], ReadReport())
    sent = group_traces(s for b in bodies for s in loads(b))
    assert sorted(t.trace_id for t in written) == sorted(t.trace_id for t in sent)
    # each replayed trace is a library trace, orphans and skew included
    want = Counter(_shape(t) for t in library)
    assert all(_shape(t) in want for t in written)
    assert sum(1 for t in written if validate(t)) == int(err.split(" of the replayed")[0].rsplit(";", 1)[1].split()[0])
    rc, _, err = run("replay", str(ZIPKIN), "--count", "10", "--only-valid", "--out", str(out))
    assert rc == ExitStatus.SUCCESS
    assert all(not validate(t) for t in read_traces("otlp-json", [out], ReadReport()))


def test_a_collector_that_is_down_fails_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # retries end within a second
    rc, _, err = run("replay", str(EXAMPLES), "--count", "20", "--otlp-endpoint", f"127.0.0.1:{free_port()}",
                     "--otlp-insecure")  # fmt: skip
    assert rc == ExitStatus.INVALID
    assert "0 spans delivered" in err and "failed" in err and "UNAVAILABLE" in err


def test_two_processes_share_the_rate_with_unique_ids(sink):
    summary = replay([EXAMPLES], rate=400.0, duration_s=1.5, processes=2, seed=1, only_valid=True,
                     otlp=_settings(sink.port))  # fmt: skip
    assert summary.processes == 2 and summary.delivered
    got = sink.traces()
    assert len(got) == summary.traces
    assert abs(summary.traces - 600) < 5 * 600**0.5
    ids = [s.span_id for t in got for s in t]
    assert len(set(ids)) == len(ids)
    assert summary.requested_traces_per_s == pytest.approx(400.0, rel=0.01)
    assert sum(summary.by_entry.values()) == summary.traces  # the parts' entry counts add up once each


def test_the_api_returns_what_the_cli_prints(tmp_path, sink):
    import otel_tracegen

    summary = otel_tracegen.replay(EXAMPLES, count=30, rate=1000.0, otlp=_settings(sink.port), seed=3, start_time_ns=T0)
    rc, out, _ = run("replay", str(EXAMPLES), "--count", "30", "--rate", "1000", "--otlp-endpoint",
                     f"127.0.0.1:{sink.port}", "--otlp-insecure", "--seed", "3", "--start-time", str(T0), "--json")
    assert rc == ExitStatus.SUCCESS
    cli = json.loads(out)
    api = summary.as_dict()
    for key in ("traces", "spans", "by_entry", "library", "library_traces", "flagged", "sent_spans"):
        assert cli[key] == api[key], key
    first, second = sink.bodies[: len(sink.bodies) // 2], sink.bodies[len(sink.bodies) // 2 :]
    assert b"".join(first) == b"".join(second)  # seeded, anchored: the same bytes


def _settings(port: int):
    from otel_tracegen.emit.sender import OtlpSettings

    return OtlpSettings(endpoint=f"127.0.0.1:{port}", insecure=True)


def test_span_rate_and_the_traces_alias(tmp_path):
    out = tmp_path / "o.json"
    rc, _, err = run("replay", str(EXAMPLES), "--traces", "12", "--out", str(out), "--span-rate", "20000")
    assert rc == ExitStatus.SUCCESS, err
    assert len(read_traces("otlp-json", [out], ReadReport())) == 12
    assert "traces/s" in err


def test_summaries_stay_readable_with_hundreds_of_entry_services(tmp_path):
    from otel_tracegen.trace import Span

    traces = [Trace([Span(f"{i + 1:032x}", f"{i + 1:016x}", None, f"svc-{i:03d}", "GET /", T0, T0 + 1000)])
              for i in range(300)]  # fmt: skip
    rc, _, err = run("replay", str(_library(tmp_path, traces)), "--count", "600", "--out", str(tmp_path / "o.json"))
    assert rc == ExitStatus.SUCCESS, err
    entries = next(line for line in err.splitlines() if line.startswith("entries:"))
    assert "and 295 more" in entries and len(entries) < 200


def test_runs_end_as_asked_slow_rates_counts_and_any_seed(tmp_path):
    import time

    out = tmp_path / "o.json"
    t = time.perf_counter()
    slow = replay(EXAMPLES, rate=0.01, duration_s=1.5, out=out, seed=-5)  # a slow rate does not stall the start
    assert time.perf_counter() - t < 6 and slow.seconds == pytest.approx(1.5, abs=0.5)
    counted = replay(EXAMPLES, rate=200.0, count=20, duration_s=60, out=out)  # --count comes first
    assert counted.traces == 20 and counted.seconds < 5 and counted.seed is not None
    assert counted.traces_per_s > 50


def test_evenly_spaced_arrivals_of_several_processes_interleave():
    shape = pacing.constant(1000.0)
    parts = [pacing.Arrivals(_Scaled(shape, 1 / 4), poisson=False, phase=k / 4).take(50) for k in range(4)]
    merged = np.sort(np.concatenate(parts))
    assert np.allclose(np.diff(merged), 1e6, atol=2)  # one every millisecond, not four at once every 4 ms
