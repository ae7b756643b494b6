"""The infill receiver over real sockets: OTLP gRPC and HTTP in, a grpcio sink behind it, rotel in front of it,
an outage of the downstream and a ``kill -9`` of the receiver.

Everything here is real: loopback sockets, the receiver's own gRPC and HTTP servers, the on-disk queue, the
``otel-tracegen`` process for the crash test and the ``rotel`` collector binary from PyPI. The repairer runs on
rules (``--repair-no-model``) except where a test says otherwise, to keep the suite fast; the model's repairs
are tested in ``test_infill_repair.py``.
"""

from __future__ import annotations

import gzip
import json
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import requests

from otel_tracegen.formats import otlp_json, otlp_proto
from otel_tracegen.infill import wire
from otel_tracegen.infill.receiver import GrpcReceiver, HttpReceiver
from otel_tracegen.infill.repair import MARK_METHOD, MARK_ORIGINAL_PARENT, MARK_REPAIR, TraceRepairer
from otel_tracegen.infill.service import InfillConfig, InfillService
from otel_tracegen.emit.transport import GrpcExporter, resolve_grpc
from otel_tracegen.emit.wire import parse_partial_success, parse_retry_delay
from otel_tracegen.report import UserError

from .cli_helpers import free_port, rotel_forwarding, run
from .infill_helpers import (EXPORT, Running, Sink, grpc_call, serve, serve_until, start_receiver, trace_spans,
                             wait_for)


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


@pytest.fixture
def start(tmp_path):
    running: list[Running] = []

    def _start(downstream_port: int, **kwargs) -> Running:
        running.append(start_receiver(tmp_path, downstream_port, **kwargs))
        return running[-1]

    yield _start
    for r in running:
        try:
            r.stop()
        except Exception:  # noqa: BLE001 - already stopped by the test
            pass


# --- pass-through and partial success -------------------------------------------------------------------------


def test_complete_traces_pass_through_byte_for_byte(sink, start):
    r = start(sink.port)
    spans = trace_spans()
    body = otlp_proto.dumps(spans)
    sent = {w.raw for w in wire.decode(body)}
    exporter = GrpcExporter(resolve_grpc(f"127.0.0.1:{r.grpc.port}", True, env={}))
    assert exporter.export(body, 4).failed_spans == 0
    exporter.shutdown()
    wait_for(lambda: len(sink.spans()) == 4, what="4 spans at the sink")
    assert {w.raw for w in sink.spans()} == sent  # every span message as it came
    assert b"".join(sink.bodies) == body  # one trace, one request: even the framing is the same
    assert r.service.metrics.value("exporter_sent_spans_total") == 4


def test_a_bad_span_is_refused_alone_with_a_partial_success(sink, start):
    r = start(sink.port)
    good = wire.from_spans(trace_spans())
    raw = good[1].raw
    bad = wire.WireSpan(good[1].span, b"\x0a\x0c" + raw[2:14] + raw[18:], good[1].resource, good[1].scope)
    response, _ = grpc_call(r.grpc.port, wire.encode([good[0], bad, good[2], good[3]]))
    rejected, message = parse_partial_success(response)
    assert rejected == 1 and "invalid trace id" in message and "spans[0]" in message
    wait_for(lambda: len(sink.spans()) == 3, what="the 3 good spans")
    assert r.service.metrics.value("malformed_spans_total") == 1


def test_malformed_bodies_are_refused_with_what_was_wrong(sink, start):
    r = start(sink.port)
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(r.grpc.port, b"\xff\xff\xff\xff")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an OTLP ExportTraceServiceRequest" in e.value.details()
    resp = requests.post(r.url + "/v1/traces", data=b"\xff\xff", headers={"Content-Type": "application/x-protobuf"})
    assert resp.status_code == 400
    assert b"not an OTLP ExportTraceServiceRequest" in resp.content  # a google.rpc.Status
    resp = requests.post(r.url + "/v1/traces", data=b"{oops", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["message"]
    resp = requests.post(r.url + "/v1/traces", data=b"x", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415
    resp = requests.post(r.url + "/v1/traces", data=b"notgzip",
                         headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})
    assert resp.status_code == 400 and b"not valid gzip" in resp.content
    assert r.service.metrics.value("refused_requests_total", reason="malformed") == 4
    assert not sink.bodies


def test_http_json_and_gzip(sink, start):
    r = start(sink.port)
    spans = trace_spans()
    doc = json.loads(otlp_json.dumps(spans))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"].append({"traceId": "zz", "spanId": "01"})  # malformed
    resp = requests.post(r.url + "/v1/traces", data=gzip.compress(json.dumps(doc).encode()),
                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    partial = resp.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1" and "traceId" in partial["errorMessage"]
    wait_for(lambda: len(sink.spans()) == 4, what="4 spans")
    assert sorted(w.span.span_id for w in sink.spans()) == sorted(s.span_id for s in spans)
    # protobuf answers protobuf; a full success has no partial_success
    resp = requests.post(r.url + "/v1/traces", data=otlp_proto.dumps(trace_spans("cd" * 16)),
                         headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
    assert resp.status_code == 200 and resp.content == b""
    assert resp.headers["Content-Type"] == "application/x-protobuf"


def test_bearer_token(sink, start):
    r = start(sink.port, token="s3cret")
    body = otlp_proto.dumps(trace_spans())
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(r.grpc.port, body)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    grpc_call(r.grpc.port, body, metadata=(("authorization", "Bearer s3cret"),))
    resp = requests.post(r.url + "/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"})
    assert resp.status_code == 401
    resp = requests.post(r.url + "/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf",
                                                                   "Authorization": "Bearer s3cret"})  # fmt: skip
    assert resp.status_code == 200


def test_orphans_are_repaired_and_marked_on_the_way_through(sink, start):
    r = start(sink.port)
    spans = [s for s in trace_spans() if s.span_id != "0000000000000002"]
    requests.post(r.url + "/v1/traces", data=otlp_proto.dumps(spans), headers={"Content-Type": "application/x-protobuf"})
    wait_for(lambda: len(sink.spans()) == 3, what="3 spans")
    got = {w.span.span_id: w.span for w in sink.spans()}
    c = got["0000000000000003"]
    assert c.parent_id == "0000000000000001" and c.attributes[MARK_REPAIR] == "orphan"
    assert c.attributes[MARK_METHOD] == "rule" and c.attributes[MARK_ORIGINAL_PARENT] == "0000000000000002"
    assert r.service.metrics.value("repaired_traces_total", reason="orphan") == 1
    text = requests.get(r.url + "/metrics").text
    assert 'otel_tracegen_infill_repaired_traces_total{reason="orphan"} 1.0' in text
    assert 'otel_tracegen_infill_receiver_accepted_spans_total{receiver="otlp",transport="http"} 3.0' in text


def test_spans_of_one_trace_are_gathered_across_requests(sink, start):
    r = start(sink.port, buffer_wait_s=1.0)
    spans = trace_spans()
    for s in spans:  # one span per request, child first: no orphan once the trace is whole
        grpc_call(r.grpc.port, otlp_proto.dumps([s]))
    wait_for(lambda: len(sink.spans()) == 4, what="4 spans")
    assert not any(w.span.attributes.get(MARK_REPAIR) for w in sink.spans())
    assert len(sink.bodies) == 1  # released together


# --- pressure, outage, shutdown, crash ------------------------------------------------------------------------


def test_a_full_queue_pushes_back_with_retry_advice(start):
    dead = free_port()
    r = start(dead, queue_max_mib=0.0001)  # ~100 bytes
    body = otlp_proto.dumps(trace_spans())
    grpc_call(r.grpc.port, body)  # taken: the queue was empty
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(r.grpc.port, otlp_proto.dumps(trace_spans("cd" * 16)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(e.value.trailing_metadata())
    assert parse_retry_delay(trailers["google.rpc.retryinfo-bin"]) == 5.0
    resp = requests.post(r.url + "/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert r.service.metrics.value("refused_requests_total", reason="queue_full") == 2


def test_a_downstream_outage_delays_but_loses_nothing(start):
    port = free_port()
    r = start(port)
    for i in range(5):
        grpc_call(r.grpc.port, otlp_proto.dumps(trace_spans(f"{i + 1:032x}")))
    wait_for(lambda: r.service.metrics.value("export_retries_total") >= 2, what="retries against the dead endpoint")
    assert len(r.service.outbound) >= 1
    assert len(r.service.wal) == 5  # the log keeps every request until its traces are delivered
    sink = Sink(port)  # the downstream comes back on the same port
    try:
        wait_for(lambda: len(sink.spans()) == 20, timeout=30, what="all 20 spans after the outage")
        assert len({(w.span.trace_id, w.span.span_id) for w in sink.spans()}) == 20
        wait_for(lambda: len(r.service.wal) == 0, what="the log to be acknowledged after delivery")
    finally:
        sink.stop()


def test_concurrent_requests_share_an_fsync(tmp_path):
    from otel_tracegen.infill.queue import DiskQueue
    from otel_tracegen.infill.service import GroupCommit

    q = DiskQueue(tmp_path / "log", name="log")
    calls = []
    original = q.append_many

    def counting(payloads):
        calls.append(len(payloads))
        time.sleep(0.05)  # a slow disk: requests pile up behind the first fsync
        return original(payloads)

    q.append_many = counting
    log = GroupCommit(q)
    seqs: list[int] = []
    threads = [threading.Thread(target=lambda i=i: seqs.append(log.append(b"r%d" % i))) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(12))  # every caller got its own record
    assert sum(calls) == 12 and len(calls) < 12  # in fewer writes than requests
    assert sorted(p for _, p in q.pending()) == sorted(b"r%d" % i for i in range(12))
    q.close()


def test_a_permanent_refusal_is_kept_as_a_dead_letter(sink, start, tmp_path):
    sink.replies.append(lambda ctx: ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "sink says no"))
    r = start(sink.port)
    grpc_call(r.grpc.port, otlp_proto.dumps(trace_spans()))
    wait_for(lambda: r.service.metrics.value("exporter_send_failed_spans_total") == 4, what="the refusal")
    dead = list((tmp_path / "queue" / "dead-letter").glob("*.binpb"))
    assert len(dead) == 1 and len(wire.decode(dead[0].read_bytes())) == 4
    assert "sink says no" in json.loads(dead[0].with_suffix(".json").read_text())["reason"]


def test_graceful_stop_releases_and_drains(sink, start):
    r = start(sink.port, buffer_wait_s=60)  # nothing is due before the stop
    grpc_call(r.grpc.port, otlp_proto.dumps(trace_spans()))
    assert not sink.bodies
    r.stop()
    assert len(sink.spans()) == 4


def test_nothing_acknowledged_is_lost_across_an_outage_and_kill_9(tmp_path):
    downstream, g, h = free_port(), free_port(), free_port()
    proc = serve(tmp_path, downstream, g, h)
    sent = set()
    try:
        for i in range(20):
            spans = trace_spans(f"{i + 1:032x}")
            grpc_call(g, otlp_proto.dumps(spans))  # acknowledged
            sent |= {(s.trace_id, s.span_id) for s in spans}
        time.sleep(0.5)  # some are repaired and queued, some still in the buffer or the log
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    status = serve_until(tmp_path, downstream, g, h, lambda sink: sent <= {(w.span.trace_id, w.span.span_id)
                         for w in sink.spans()}, "every acknowledged span after the restart")  # fmt: skip
    assert status == 0
    log = (tmp_path / "serve.log").read_text()
    assert "replayed" in log or "request(s) replayed" in log


# --- a real collector in front ----------------------------------------------------------------------------------


def test_rotel_in_front_of_the_receiver(sink, start, tmp_path):
    r = start(sink.port)
    with rotel_forwarding(tmp_path, r.grpc.port) as grpc_port:
        complete = trace_spans("11" * 16)
        broken = [s for s in trace_spans("22" * 16) if s.span_id != "0000000000000002"]
        exporter = GrpcExporter(resolve_grpc(f"127.0.0.1:{grpc_port}", True, env={}))
        assert exporter.export(otlp_proto.dumps(complete + broken), 7).failed_spans == 0
        exporter.shutdown()
        wait_for(lambda: len(sink.spans()) == 7, what="7 spans through rotel and the receiver")
    got = {(w.span.trace_id, w.span.span_id): w.span for w in sink.spans()}
    for s in complete:
        out = got[s.trace_id, s.span_id]
        assert (out.parent_id, out.service, out.name, out.start_ns, out.end_ns, out.attributes) == (
            s.parent_id, s.service, s.name, s.start_ns, s.end_ns, s.attributes)
        assert MARK_REPAIR not in out.attributes
    c = got["22" * 16, "0000000000000003"]
    assert c.parent_id == "0000000000000001" and c.attributes[MARK_REPAIR] == "orphan"


# --- configuration and the file command -------------------------------------------------------------------------


def test_yaml_config_and_flags(tmp_path):
    p = tmp_path / "infill.yaml"
    p.write_text("receiver:\n  grpc: 0.0.0.0:5317\nbuffer:\n  wait_s: 5\nexporter:\n  endpoint: jaeger:4317\n"
                 "  headers: {x-tenant: a}\n")
    c = InfillConfig.load(p)
    assert (c.receiver_grpc, c.buffer_wait_s, c.exporter_endpoint, c.exporter_headers) == (
        "0.0.0.0:5317", 5, "jaeger:4317", {"x-tenant": "a"})
    p.write_text("buffer:\n  wait: 5\n")
    with pytest.raises(UserError, match=r"unknown setting buffer.wait \(known: wait_s"):
        InfillConfig.load(p)
    from otel_tracegen.cli import _build_parser
    from otel_tracegen.infill.command import config_from_args

    p.write_text("buffer:\n  wait_s: 5\n")
    args = _build_parser().parse_args(["infill", "serve", "--config", str(p), "--buffer-wait-s", "7",
                                       "--receiver-http", "none", "--exporter-header", "a=b"])  # fmt: skip
    c = config_from_args(args)
    assert (c.buffer_wait_s, c.receiver_http, c.exporter_headers) == (7.0, None, {"a": "b"})


def test_infill_file_repairs_offline(tmp_path):
    spans = [s for s in trace_spans() if s.span_id != "0000000000000002"]
    src = tmp_path / "in.otlp.json"
    src.write_text(otlp_json.dumps(spans))
    out = tmp_path / "out.otlp.json"
    rc, stdout, err = run("infill", "file", str(src), "--out", str(out), "--no-model")
    assert rc == 0, err
    assert "1 trace(s) repaired (orphan: 1; methods rule: 1)" in stdout
    got = {s.span_id: s for s in otlp_json.loads(out.read_text())}
    assert got["0000000000000003"].parent_id == "0000000000000001"
    assert got["0000000000000004"] == replace(spans[2])


def test_tls_on_both_receivers(sink, tmp_path, pki):
    config = InfillConfig(repair_no_model=True, queue_directory=str(tmp_path / "queue"), buffer_wait_s=0.1,
                          exporter_endpoint=f"127.0.0.1:{sink.port}", exporter_insecure=True)  # fmt: skip
    service = InfillService(config, TraceRepairer(None, None))
    cert, key = pki["server.pem"], pki["server.key"]
    g = GrpcReceiver(service, "localhost:0", max_message_bytes=1 << 20,
                     tls=(Path(cert).read_bytes(), Path(key).read_bytes()))  # fmt: skip
    h = HttpReceiver(service, "127.0.0.1:0", max_message_bytes=1 << 20, tls=(cert, key))
    service.start()
    g.start()
    h.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(pki["ca.pem"]).read_bytes())
        with grpc.secure_channel(f"localhost:{g.port}", creds) as ch:
            ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)(
                otlp_proto.dumps(trace_spans()), timeout=10)
        resp = requests.post(f"https://127.0.0.1:{h.port}/v1/traces", data=otlp_proto.dumps(trace_spans("cd" * 16)),
                             headers={"Content-Type": "application/x-protobuf"}, verify=pki["ca.pem"])  # fmt: skip
        assert resp.status_code == 200
        with pytest.raises(requests.exceptions.SSLError):  # plaintext clients cannot talk to it unknowingly
            requests.post(f"https://127.0.0.1:{h.port}/v1/traces", data=b"", verify=True)
        wait_for(lambda: len(sink.spans()) == 8, what="8 spans over TLS")
    finally:
        g.stop(0)
        h.stop()
        service.stop()


def test_the_model_repairs_inside_the_running_receiver(sink, tmp_path, corpus):
    pytest.importorskip("torch")
    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.infill.filler import ModelFiller
    from otel_tracegen.infill.repair import MARK_SYNTHETIC
    from otel_tracegen.lm.model import load_model

    _, splits = load_corpus(corpus)
    trace = next(t for t in splits["train"] if len(t) >= 10)
    lost = next(s for s in trace.spans if s.parent_id is not None and trace.children(s))
    spans = [s for s in trace.spans if s.span_id != lost.span_id]
    config = InfillConfig(queue_directory=str(tmp_path / "queue"), buffer_wait_s=0.1,
                          exporter_endpoint=f"127.0.0.1:{sink.port}", exporter_insecure=True)  # fmt: skip
    repairer = TraceRepairer(ModelFiller(load_model(Path(__file__).resolve().parents[1] / "model", "cpu")), None,
                             config.repair_settings())  # fmt: skip
    service = InfillService(config, repairer)
    h = HttpReceiver(service, "127.0.0.1:0", max_message_bytes=1 << 24)
    service.start()
    h.start()
    try:
        resp = requests.post(f"http://127.0.0.1:{h.port}/v1/traces", data=otlp_proto.dumps(spans),
                             headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
        assert resp.status_code == 200
        wait_for(lambda: len(sink.spans()) == len(trace), what="the trace with its lost span written back")
    finally:
        h.stop()
        service.stop()
    made = [w.span for w in sink.spans() if w.span.attributes.get(MARK_SYNTHETIC)]
    assert len(made) == 1 and (made[0].service, made[0].name) == (lost.service, lost.name)
    assert made[0].parent_id == lost.parent_id and made[0].resource.attributes[MARK_SYNTHETIC] is True
    assert service.metrics.value("repairs_total", method="model") >= 1


def test_concatenated_gzip_members_are_all_read(sink, start):
    r = start(sink.port)
    a, b = otlp_proto.dumps(trace_spans("11" * 16)), otlp_proto.dumps(trace_spans("22" * 16))
    resp = requests.post(r.url + "/v1/traces", data=gzip.compress(a) + gzip.compress(b),
                         headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})  # fmt: skip
    assert resp.status_code == 200
    wait_for(lambda: len(sink.spans()) == 8, what="the spans of both gzip members")


def test_a_log_that_cannot_write_asks_senders_to_retry(sink, start):
    r = start(sink.port)

    def broken(payload):
        raise OSError(28, "No space left on device")

    r.service._log.append = broken
    body = otlp_proto.dumps(trace_spans())
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(r.grpc.port, body)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "No space left" in e.value.details()
    resp = requests.post(r.url + "/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"


def test_a_trace_whose_repair_fails_is_forwarded_unrepaired_and_others_are_not_held_back(sink, start):
    r = start(sink.port)
    real = r.service.repairer.repair

    def flaky(traces):
        if any(w.span.trace_id == "11" * 16 for spans, _ in traces for w in spans):
            raise RuntimeError("a bug in repair")
        return real(traces)

    r.service.repairer.repair = flaky
    broken = [s for s in trace_spans("11" * 16) if s.span_id != "0000000000000002"]
    grpc_call(r.grpc.port, otlp_proto.dumps(broken + trace_spans("22" * 16)))
    wait_for(lambda: len(sink.spans()) == 7, what="both traces")
    assert r.service.metrics.value("repair_failures_total") == 1
    wait_for(lambda: len(r.service.wal) == 0, what="the log to be acknowledged")


# --- live localization from what the receiver forwarded ----------------------------------------------------------


def test_get_localize_ranks_the_traces_the_receiver_forwarded(sink, start):
    from .test_localize import T0, chains

    r = start(sink.port, localize_keep_s=3600, token="s3cret")
    normal = chains(40, 1, start_ns=T0)
    incident = chains(30, 2, slow={"b-db": 8}, start_ns=T0 + 3600 * 10**9)
    auth = {"Authorization": "Bearer s3cret"}
    for t in normal + incident:  # one request per trace, over OTLP/HTTP
        resp = requests.post(f"{r.url}/v1/traces", data=otlp_proto.dumps(list(t)),
                             headers={"Content-Type": "application/x-protobuf", **auth}, timeout=10)  # fmt: skip
        assert resp.status_code == 200
    wait_for(lambda: len(r.service.recent) == 70, what="70 traces held for /localize")
    # replayed data: the window ends at the newest trace held, not at the wall clock
    resp = requests.get(f"{r.url}/localize?end=latest&window=10m&baseline=2h&top=2", headers=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["window_traces"] == 30 and answer["baseline_traces"] == 40
    assert [s["service"] for s in answer["suspects"]][0] == "svc-b" and len(answer["suspects"]) == 2
    assert answer["suspects"][0]["evidence"][0]["operation"] == "SELECT items"
    assert requests.get(f"{r.url}/localize?end=latest", timeout=10).status_code == 401  # no token
    bad = requests.get(f"{r.url}/localize?window=soon", headers=auth, timeout=10)
    assert bad.status_code == 400 and "window: not a duration: 'soon'" in bad.json()["error"]
    empty = requests.get(f"{r.url}/localize?window=2m", headers=auth, timeout=10)  # now: nothing that recent
    assert empty.status_code == 400 and "no held trace starts in the window" in empty.json()["error"]


def test_get_localize_is_off_unless_asked_for(sink, start):
    r = start(sink.port)
    resp = requests.get(f"{r.url}/localize", timeout=10)
    assert resp.status_code == 404 and "--localize-keep-s" in resp.text
