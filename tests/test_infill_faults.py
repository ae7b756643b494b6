"""The infill receiver under deliberate faults, over real sockets: malformed spans inside good batches (both
transports, both encodings), fuzzed bodies, a silent TLS client, unauthenticated floods, a downstream with a small
message limit, overload against a memory bound, and ``kill -9`` during an outage and during delivery.

Each test asserts what a user relies on: every good span of a mixed batch arrives, every acknowledged span
arrives (a kill included), forwarding goes on past an oversized span, no client stalls another, memory stays
within its bound. The longer runs of the same faults are ``benchmarks/soak.py``.
"""

from __future__ import annotations

import dataclasses
import gzip
import random
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import requests

from otel_tracegen.formats import otlp_json, otlp_proto
from otel_tracegen.infill import wire
from otel_tracegen.infill.receiver import GrpcReceiver, HttpReceiver, _authorized
from otel_tracegen.infill.repair import TraceRepairer
from otel_tracegen.infill.service import InfillConfig, InfillService
from otel_tracegen.emit.wire import parse_partial_success
from otel_tracegen.trace import Resource, Span, SpanKind, Status

from .cli_helpers import free_port
from .infill_helpers import (MS, Running, Sink, grpc_call, peak_rss_while, rss_of, serve, serve_until, start_receiver,
                             trace_spans, wait_for)

PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
def running(tmp_path):
    """``running(sink_port, **settings)``: a receiver in this process (rules only); its service and ports."""
    started: list[Running] = []

    def start(sink_port: int, **kwargs):
        started.append(start_receiver(tmp_path, sink_port, **kwargs))
        r = started[-1]
        return r.service, r.grpc.port, r.http.port

    yield start
    for r in started:
        r.stop(drain=False)


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


def ids(spans) -> set[tuple[str, str]]:
    return {(s.trace_id, s.span_id) for s in spans}


def arrived(sink: Sink) -> set[tuple[str, str]]:
    return {(w.span.trace_id, w.span.span_id) for w in sink.spans()}


# --- malformed spans inside good batches --------------------------------------------------------------------------


def nested(depth: int, kind: str):
    value = "leaf"
    for _ in range(depth):
        value = {"k": value} if kind == "kvlist" else [value]
    return value


def span(trace: str, i: int, name: str = "op", attributes: dict | None = None) -> Span:
    return Span(trace, f"{i:016x}", None if i % 4 == 1 else f"{i - 1:016x}", "svc", name, i * MS, (i + 100) * MS,
                SpanKind.SERVER, Status(), attributes or {"k": "v"}, Resource({"service.name": "svc"}))  # fmt: skip


def bad_wire_span(kind: str, trace: str, i: int) -> wire.WireSpan:
    """A span whose bytes break protobuf in one of the ways found under fault injection."""
    if kind == "utf8-name":
        w = wire.from_spans([span(trace, i, name="NAMEXX")])[0]
        w.raw = w.raw.replace(b"NAMEXX", b"NAM\xff\xfeX")
    elif kind == "utf8-key":
        w = wire.from_spans([span(trace, i, attributes={"KEYXX": "v"})])[0]
        w.raw = w.raw.replace(b"KEYXX", b"KE\xc3(X")
    elif kind == "utf8-value":
        w = wire.from_spans([span(trace, i, attributes={"k": "VALXX"})])[0]
        w.raw = w.raw.replace(b"VALXX", b"\xe2\x28\xa1XX")
    elif kind == "past-end":  # a name field that claims 127 bytes inside a span that holds 2 more
        w = wire.from_spans([span(trace, i)])[0]
        w.raw = w.raw + b"\x2a\x7fab"
    elif kind == "kvlist-33":
        w = wire.from_spans([span(trace, i, attributes={"deep": nested(33, "kvlist")})])[0]
    elif kind == "array-50":
        w = wire.from_spans([span(trace, i, attributes={"deep": nested(50, "array")})])[0]
    else:
        raise ValueError(kind)
    return w


BAD_KINDS = ["utf8-name", "utf8-key", "utf8-value", "past-end", "kvlist-33", "array-50"]


def mixed_batches(n: int, seed: int) -> list[tuple[bytes, set, int]]:
    """``n`` protobuf requests mixing good spans with bad ones: ``(body, good span ids, bad count)``."""
    rng = random.Random(seed)
    out = []
    for b in range(n):
        trace = f"{seed:08x}{b:024x}"
        good = [span(trace, i) for i in range(1, rng.randint(2, 8))]
        bad = [bad_wire_span(rng.choice(BAD_KINDS), trace, 100 + k) for k in range(rng.randint(1, 3))]
        spans = wire.from_spans(good) + bad
        rng.shuffle(spans)
        out.append((wire.encode(spans), ids(good), len(bad)))
    return out


def test_every_good_span_of_a_mixed_batch_arrives_over_both_transports(sink, running):
    _, grpc_port, http_port = running(sink.port)
    expected = set()
    for k, (body, good, bad) in enumerate(mixed_batches(24, seed=7)):
        assert otlp_proto._parses(body) is not None  # upb alone would refuse the whole request
        if k % 2:
            response, _ = grpc_call(grpc_port, body)
        else:
            r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=body, headers=PROTOBUF, timeout=10)
            assert r.status_code == 200, r.content
            response = r.content
        rejected, message = parse_partial_success(response)
        assert rejected == bad, message
        assert "malformed span" in message
        expected |= good
    wait_for(lambda: expected <= arrived(sink), what="every good span of the mixed batches")


def test_each_fault_is_named_in_the_partial_success(sink, running):
    _, grpc_port, _ = running(sink.port)
    trace = "cd" * 16
    for kind, words in [("utf8-name", "not a valid protobuf"), ("past-end", "not a valid protobuf"),
                        ("kvlist-33", "nested deeper"), ("array-50", "nested deeper")]:  # fmt: skip
        body = wire.encode(wire.from_spans([span(trace, 1)]) + [bad_wire_span(kind, trace, 2)])
        rejected, message = parse_partial_success(grpc_call(grpc_port, body)[0])
        assert rejected == 1 and words in message and "spans[1]" in message, (kind, message)


def test_json_with_bad_utf8_and_deep_nesting_keeps_the_good_spans(sink, running):
    _, _, http_port = running(sink.port)
    trace = "ef" * 16
    good = [span(trace, i) for i in (1, 2, 3, 4)]
    bad = [span(trace, 5, name="BADNAME"), span(trace, 6, attributes={"deep": nested(40, "kvlist")})]
    body = otlp_json.dumps(good + bad).encode().replace(b"BADNAME", b"BAD\xffNAME")
    r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=body,
                      headers={"Content-Type": "application/json"}, timeout=10)  # fmt: skip
    assert r.status_code == 200
    partial = r.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "2" and "not valid UTF-8" in partial["errorMessage"]
    assert "nested deeper" in partial["errorMessage"]
    wait_for(lambda: ids(good) <= arrived(sink), what="the 4 good JSON spans")
    assert not {(trace, f"{i:016x}") for i in (5, 6)} & arrived(sink)


def test_fuzzed_bodies_get_an_answer_and_what_was_taken_arrives(sink, running):
    """Random bit flips, cuts and splices of valid bodies, over both transports: every request gets an OTLP
    answer (never a hang or a dropped connection), and every span the receiver acknowledged arrives."""
    service, grpc_port, http_port = running(sink.port)
    rng = random.Random(11)
    valid = [wire.encode(wire.from_spans(trace_spans(f"{b + 1:032x}", f"{b:014x}"))) for b in range(40)]
    expected = set()
    session = requests.Session()
    for k in range(120):
        body = bytearray(rng.choice(valid))
        how = rng.choice(["flip", "cut", "splice", "garbage"])
        if how == "flip":
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        elif how == "cut":
            body = body[: rng.randrange(1, len(body))]
        elif how == "splice":
            other = rng.choice(valid)
            body = body[: rng.randrange(len(body))] + other[rng.randrange(len(other)) :]
        else:
            body = bytearray(rng.randbytes(rng.randint(1, 300)))
        body = bytes(body)
        taken = wire.decode(body) if otlp_proto._parses(body) is None else None
        if k % 2:
            try:
                grpc_call(grpc_port, body)
                ok = True
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                ok = False
        else:
            r = session.post(f"http://127.0.0.1:{http_port}/v1/traces", data=body, headers=PROTOBUF, timeout=10)
            assert r.status_code in (200, 400), r.status_code
            ok = r.status_code == 200
        if ok:
            from otel_tracegen.report import ReadReport

            expected |= {(w.span.trace_id, w.span.span_id) for w in (taken or wire.decode(body, report=ReadReport()))}
    assert service.metrics.value("receiver_accepted_spans_total") >= len(expected)
    wait_for(lambda: expected <= arrived(sink), what="every acknowledged span of the fuzzed bodies")
    good = wire.encode(wire.from_spans(trace_spans("99" * 16)))
    assert session.post(f"http://127.0.0.1:{http_port}/v1/traces", data=good, headers=PROTOBUF).status_code == 200


# --- answers to broken HTTP ---------------------------------------------------------------------------------------


def raw_http(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in b"".join(chunks):
                    break
        except socket.timeout:
            pass
        return b"".join(chunks)


def test_broken_requests_get_a_clear_answer(sink, running):
    _, _, http_port = running(sink.port, receiver_read_timeout_s=1.0)
    answer = raw_http(http_port, b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                                 b"Content-Length: abc\r\n\r\n")  # fmt: skip
    assert answer.split(b" ")[1] == b"400" and b"Content-Length" in answer, answer[:80]
    started = time.monotonic()
    answer = raw_http(http_port, b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                                 b"Content-Length: 100\r\n\r\nonly-some")  # fmt: skip
    assert answer.split(b" ")[1] == b"408" and time.monotonic() - started < 5, answer[:80]
    r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=b'{"resourceSpans": "x"}',
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "resourceSpans is a JSON str" in r.json()["message"]
    r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=b"\x0a\x05abc",
                      headers={**PROTOBUF, "Content-Encoding": "br"})  # fmt: skip
    assert r.status_code == 400


def test_chunked_bodies_are_taken(sink, running):
    _, _, http_port = running(sink.port)
    body = otlp_proto.dumps(trace_spans("ab" * 16))
    r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=iter([body[:10], body[10:]]), headers=PROTOBUF)
    assert r.status_code == 200
    wait_for(lambda: len(sink.spans()) == 4, what="the chunked request's spans")


# --- no client stalls another -------------------------------------------------------------------------------------


def test_a_silent_tls_client_stalls_no_one(sink, running, pki):
    _, _, http_port = running(sink.port, tls=(pki["server.pem"], pki["server.key"]))
    silent = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(3)]  # connect, say nothing
    try:
        started = time.monotonic()
        for k in range(3):
            r = requests.post(f"https://127.0.0.1:{http_port}/v1/traces",
                              data=otlp_proto.dumps(trace_spans(f"{k + 7:032x}")), headers=PROTOBUF,
                              verify=pki["ca.pem"], timeout=5)  # fmt: skip
            assert r.status_code == 200
        assert time.monotonic() - started < 5
    finally:
        for s in silent:
            s.close()
    wait_for(lambda: len(sink.spans()) == 12, what="the TLS clients' spans")


def test_a_slow_body_stalls_no_one(sink, running):
    _, _, http_port = running(sink.port)
    slow = socket.create_connection(("127.0.0.1", http_port))
    slow.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                 b"Content-Length: 1000000\r\n\r\n" + b"\x0a" * 10)  # fmt: skip
    try:
        r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=otlp_proto.dumps(trace_spans()),
                          headers=PROTOBUF, timeout=5)  # fmt: skip
        assert r.status_code == 200
    finally:
        slow.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_unauthenticated_floods_are_refused_before_their_bodies_are_read(tmp_path):
    downstream, g, h = free_port(), free_port(), free_port()
    proc = serve(tmp_path, downstream, g, h, "--receiver-bearer-token", "s3cret")
    try:
        before = rss_of(proc.pid)
        big = b"\x0a" * (60 << 20)
        answers = []

        def post():
            try:
                r = requests.post(f"http://127.0.0.1:{h}/v1/traces", data=big, headers=PROTOBUF, timeout=30)
                answers.append(r.status_code)
            except requests.exceptions.ConnectionError:
                answers.append("closed")  # the receiver answered 401 and closed before the body was all sent

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        peak = peak_rss_while(proc.pid, threads)
        with pytest.raises(grpc.RpcError) as e:
            grpc_call(g, b"\x0a" * (8 << 20))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        peak = max(peak, rss_of(proc.pid))
        assert all(a in (401, "closed") for a in answers), answers
        assert peak - before < 40 << 20, f"RSS grew by {(peak - before) >> 20} MiB"
        log = (tmp_path / "serve.log").read_text()
        assert "token crosses the network in plain text" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_metrics_need_the_token_and_the_scheme_is_case_insensitive(sink, running):
    _, grpc_port, http_port = running(sink.port, token="t0k")
    url = f"http://127.0.0.1:{http_port}"
    assert requests.get(url + "/metrics").status_code == 401
    assert requests.get(url + "/metrics", headers={"Authorization": "bearer t0k"}).status_code == 200
    assert requests.get(url + "/healthz").status_code == 200  # health stays open for orchestrators
    body = otlp_proto.dumps(trace_spans())
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert requests.post(url + "/v1/traces", data=body, headers={**PROTOBUF, "Authorization": f"{scheme} t0k"}
                             ).status_code == 200  # fmt: skip
    assert requests.post(url + "/v1/traces", data=body, headers={**PROTOBUF, "Authorization": "Basic t0k"}
                         ).status_code == 401  # fmt: skip
    grpc_call(grpc_port, body, metadata=(("authorization", "bearer t0k"),))
    assert not _authorized("t0k", "Bearer t0kX") and not _authorized("t0k", None)


def test_metrics_public_and_collector_names(sink, running):
    service, grpc_port, http_port = running(sink.port, token="t0k", metrics_public=True)
    grpc_call(grpc_port, otlp_proto.dumps(trace_spans()), metadata=(("authorization", "Bearer t0k"),))
    wait_for(lambda: len(sink.spans()) == 4, what="the spans")
    text = requests.get(f"http://127.0.0.1:{http_port}/metrics").text
    assert 'otel_tracegen_infill_receiver_accepted_spans_total{receiver="otlp",transport="grpc"} 4.0' in text
    wait_for(lambda: 'otel_tracegen_infill_exporter_sent_spans_total{exporter="otlp"} 4.0' in requests.get(
        f"http://127.0.0.1:{http_port}/metrics").text, what="the exporter's count")
    for name in ("exporter_queue_size", "exporter_queue_capacity", "process_memory_rss_bytes",
                 "exporter_send_failed_spans_total", "receiver_refused_spans_total"):  # fmt: skip
        assert f"otel_tracegen_infill_{name}" in text


# --- the downstream: size limits and dead letters -------------------------------------------------------------


def big_trace(trace: str, n: int, value_bytes: int) -> list[Span]:
    root = span(trace, 1)
    return [root] + [span(trace, i, attributes={"blob": "x" * value_bytes}) for i in range(2, n + 2)]


def test_forwarding_goes_on_past_an_oversized_span(running, tmp_path):
    small = Sink(max_message_bytes=1 << 20)  # a downstream with a 1 MiB limit
    try:
        service, grpc_port, _ = running(small.port)
        oversized = big_trace("0f" * 16, 1, 2 << 20)  # a root and one 2 MiB span
        grpc_call(grpc_port, otlp_proto.dumps(oversized))
        several = [s for k in range(6) for s in big_trace(f"{k + 1:032x}", 1, 400_000)]  # 6 traces of ~400 KB
        grpc_call(grpc_port, otlp_proto.dumps(several))
        later = [s for k in range(50) for s in trace_spans(f"{k + 100:032x}")]
        for k in range(0, len(later), 20):
            grpc_call(grpc_port, otlp_proto.dumps(later[k : k + 20]))
        want = ids(later) | ids(several) | {(oversized[0].trace_id, oversized[0].span_id)}
        wait_for(lambda: want <= arrived(small), timeout=30, what="everything but the one oversized span")
        assert (oversized[1].trace_id, oversized[1].span_id) not in arrived(small)
        wait_for(lambda: service.metrics.value("exporter_send_failed_spans_total") == 1, what="the dead letter")
        assert service.metrics.value("export_splits_total") >= 2
        letters = list((tmp_path / "queue" / "dead-letter").glob("*.json"))
        assert len(letters) == 1 and "too large" in letters[0].read_text()
    finally:
        small.stop()


def test_dead_letters_are_bounded_oldest_first(sink, running, tmp_path):
    sink.replies.extend([lambda ctx: ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")] * 30)
    service, grpc_port, _ = running(sink.port, queue_dead_letter_max_requests=5)
    for k in range(30):
        grpc_call(grpc_port, otlp_proto.dumps(trace_spans(f"{k + 1:032x}")))
    wait_for(lambda: service.metrics.value("exporter_send_failed_spans_total") == 120, what="120 refused spans")
    written = service.metrics.value("dead_letter_requests_total")  # traces released together share a request
    assert written > 5
    letters = sorted((tmp_path / "queue" / "dead-letter").glob("*.binpb"))
    assert len(letters) == 5 and len(list((tmp_path / "queue" / "dead-letter").iterdir())) == 10
    assert service.metrics.value("dead_letter_evicted_total") == written - 5
    newest = {w.span.trace_id for p in letters for w in wire.decode(p.read_bytes())}
    assert f"{30:032x}" in newest and f"{1:032x}" not in newest


# --- memory: the bound holds under overload --------------------------------------------------------------------


def overload(proc, clients: int, seconds: float, send) -> tuple[int, dict]:
    """``clients`` threads calling ``send(client, k, session)`` (the answer's code) for ``seconds`` against the
    receiver process ``proc``: its RSS growth over idle at the peak, and the answers counted by code."""
    time.sleep(0.5)
    idle = rss_of(proc.pid)
    answers: dict = {}
    stop = time.monotonic() + seconds

    def client(c: int):
        session = requests.Session()
        k = 0
        while time.monotonic() < stop:
            code = send(c, k, session)
            answers[code] = answers.get(code, 0) + 1
            k += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    peak = peak_rss_while(proc.pid, threads)
    print(f"RSS idle {idle >> 20} MiB, peak {peak >> 20} MiB, answers {answers}")
    return peak - idle, answers


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_overload_pushes_back_and_memory_stays_within_the_bound(tmp_path):
    """Spans held for a minute while four clients send as fast as they can to a receiver whose downstream is down:
    its RSS must stay within the buffer's bound (plus 20 %) over what it used idle, whatever it takes (early
    release to repair, pushback with retry advice)."""
    downstream, g, h = free_port(), free_port(), free_port()
    bound_mib = 48
    proc = serve(tmp_path, downstream, g, h, "--buffer-wait-s", "60", "--buffer-max-mib", str(bound_mib))

    def send(c: int, k: int, session) -> int:
        spans = [s for t in range(40) for s in trace_spans(f"{c + 1:08x}{k:016x}{t:08x}")]
        r = session.post(f"http://127.0.0.1:{h}/v1/traces", data=otlp_proto.dumps(spans), headers=PROTOBUF,
                         timeout=30)  # fmt: skip
        if r.status_code == 503:
            assert r.headers.get("Retry-After")
        return r.status_code

    try:
        grown, answers = overload(proc, 4, 12, send)
        assert answers.get(200, 0) > 0 and set(answers) <= {200, 503}, answers
        assert grown <= 1.2 * (bound_mib << 20), f"RSS grew by {grown >> 20} MiB over a {bound_mib} MiB bound"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_overload_with_megabyte_spans_stays_within_the_bound(tmp_path):
    """Requests of one 2 MiB span each, from two gRPC and two HTTP clients as fast as they are answered, into a
    16 MiB buffer in front of a downstream that takes at most 1 MiB: every copy of a large request on its way
    (read, decoded, logged, repaired, encoded, split, sent) counts against the bound. Before, RSS grew by 36 MiB."""
    sink = Sink(max_message_bytes=1 << 20)
    g, h = free_port(), free_port()
    bound_mib = 16
    proc = serve(tmp_path, sink.port, g, h, "--buffer-max-mib", str(bound_mib))

    def send(c: int, k: int, session) -> int | str:
        spans = trace_spans(f"{c + 1:08x}{k:024x}")
        spans[1] = dataclasses.replace(spans[1], attributes={"blob": "x" * (2 << 20)})
        body = otlp_proto.dumps(spans)
        if c % 2:
            return session.post(f"http://127.0.0.1:{h}/v1/traces", data=body, headers=PROTOBUF, timeout=30).status_code
        try:
            grpc_call(g, body)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    try:
        grown, answers = overload(proc, 4, 10, send)
        assert answers.get("OK", 0) > 0 and answers.get(200, 0) > 0, answers
        assert set(answers) <= {"OK", "RESOURCE_EXHAUSTED", 200, 503}, answers
        assert grown <= 1.2 * (bound_mib << 20), f"RSS grew by {grown >> 20} MiB over a {bound_mib} MiB bound"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        sink.stop()


def test_a_request_the_buffer_could_never_hold_is_refused_unread(sink, running):
    """With a 2 MiB buffer a request of 0.5 MiB, with its copies on the way in, could never fit: both transports
    refuse it for good (no retry advice) instead of reading it, and a small request still goes through."""
    service, g, h = running(sink.port, buffer_max_mib=2)
    assert service.largest_request < 400_000
    spans = trace_spans("ab" * 16)
    spans[1] = dataclasses.replace(spans[1], attributes={"blob": "x" * 500_000})
    body = otlp_proto.dumps(spans)
    r = requests.post(f"http://127.0.0.1:{h}/v1/traces", data=body, headers=PROTOBUF, timeout=10)
    assert r.status_code == 413 and "Retry-After" not in r.headers
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(g, body)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not dict(e.value.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")
    small = trace_spans("cd" * 16)
    grpc_call(g, otlp_proto.dumps(small))
    wait_for(lambda: ids(small) <= arrived(sink), what="the small request downstream")


class StalledRepairer(TraceRepairer):
    """Rules-only repair that waits until ``go`` is set: repair slower than ingest, on demand."""

    def __init__(self) -> None:
        super().__init__(None, None)
        self.go = threading.Event()

    def repair(self, traces):
        self.go.wait(60)
        return super().repair(traces)


def test_a_full_buffer_pushes_back_with_retry_advice_and_loses_nothing(sink, tmp_path):
    config = InfillConfig(repair_no_model=True, queue_directory=str(tmp_path / "queue"), buffer_wait_s=0.05,
                          buffer_max_mib=2, exporter_endpoint=f"127.0.0.1:{sink.port}", exporter_insecure=True,
                          exporter_retry_initial_s=0.05, drain_s=10)  # fmt: skip
    repairer = StalledRepairer()
    service = InfillService(config, repairer)
    g = GrpcReceiver(service, "127.0.0.1:0", max_message_bytes=1 << 20)
    h = HttpReceiver(service, "127.0.0.1:0", max_message_bytes=1 << 20)
    service.start()
    g.start()
    h.start()
    try:
        accepted, refused_http, refused_grpc = set(), 0, 0
        for k in range(400):
            if refused_http >= 3 and refused_grpc >= 3:  # each refusal first waits a moment for room
                break
            spans = [s for t in range(5) for s in trace_spans(f"{k + 1:024x}{t:08x}")]
            body = otlp_proto.dumps(spans)
            if k % 2:
                r = requests.post(f"http://127.0.0.1:{h.port}/v1/traces", data=body, headers=PROTOBUF)
                if r.status_code == 503:
                    assert int(r.headers["Retry-After"]) >= 1 and b"buffer.max_mib" in r.content
                    refused_http += 1
                    continue
                assert r.status_code == 200
            else:
                try:
                    grpc_call(g.port, body)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert dict(e.trailing_metadata()).get("google.rpc.retryinfo-bin")
                    refused_grpc += 1
                    continue
            accepted |= ids(spans)
        assert refused_http and refused_grpc, (refused_http, refused_grpc)
        assert service.buffer.bytes <= service.buffer.max_bytes
        repairer.go.set()
        wait_for(lambda: accepted <= arrived(sink), timeout=60,
                 what=lambda: f"every accepted span once repair resumes ({len(accepted - arrived(sink))} of {len(accepted)} missing; {service.metrics.render()})")
    finally:
        repairer.go.set()
        g.stop(0)
        h.stop()
        service.stop(drain=False)


# --- kill -9 ----------------------------------------------------------------------------------------------------


def test_json_acknowledged_before_kill_9_arrives_after_restart(tmp_path):
    """The case that lost 6 of 6 spans: a JSON request with one span nested 40 levels deep, acknowledged during an
    outage, then kill -9. Now the deep span is refused by name and the five others come back from the log."""
    downstream, g, h = free_port(), free_port(), free_port()
    proc = serve(tmp_path, downstream, g, h)
    trace = "5a" * 16
    good = [span(trace, i) for i in range(1, 6)]
    deep = span(trace, 6, attributes={"deep": nested(40, "kvlist")})
    try:
        r = requests.post(f"http://127.0.0.1:{h}/v1/traces", data=otlp_json.dumps(good + [deep]).encode(),
                          headers={"Content-Type": "application/json"}, timeout=10)  # fmt: skip
        assert r.status_code == 200 and r.json()["partialSuccess"]["rejectedSpans"] == "1"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    serve_until(tmp_path, downstream, g, h, lambda sink: ids(good) <= arrived(sink), "the 5 acknowledged JSON spans")
    assert "does not parse" not in (tmp_path / "serve.log").read_text()


def test_kill_9_during_delivery_loses_nothing_acknowledged(tmp_path):
    downstream, g, h = free_port(), free_port(), free_port()
    sink = Sink(downstream)
    slow = sink._export

    def export(request, context):  # a slow downstream, so that the kill lands mid-delivery
        time.sleep(0.02)
        return slow(request, context)

    sink._export = export
    proc = serve(tmp_path, downstream, g, h)
    sent = set()
    try:
        for k in range(60):
            spans = trace_spans(f"{k + 1:032x}")
            grpc_call(g, otlp_proto.dumps(spans))
            sent |= ids(spans)
        wait_for(lambda: len(sink.bodies) >= 3, what="delivery to start")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        serve_until(tmp_path, downstream, g, h, lambda s: sent <= arrived(s), "every acknowledged span after the "
                    "restart", timeout=60, sink=sink)  # fmt: skip
    finally:
        sink.stop()


def test_the_shipped_yaml_cannot_start_open_to_the_network(tmp_path, monkeypatch):
    """collector-config/infill.yaml binds beyond loopback, so it must require a token (from the environment)."""
    root = Path(__file__).resolve().parents[1]
    from otel_tracegen.report import UserError

    monkeypatch.delenv("OTEL_TRACEGEN_INFILL_TOKEN", raising=False)
    text = (root / "collector-config" / "infill.yaml").read_text()
    config_path = tmp_path / "infill.yaml"
    config_path.write_text(text)
    listens_wide = "0.0.0.0" in text
    if listens_wide:
        with pytest.raises(UserError, match="OTEL_TRACEGEN_INFILL_TOKEN"):
            InfillConfig.load(config_path)
        monkeypatch.setenv("OTEL_TRACEGEN_INFILL_TOKEN", "abc")
        assert InfillConfig.load(config_path).receiver_bearer_token == "abc"
    else:
        assert "127.0.0.1" in text


def test_env_references_in_yaml(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    monkeypatch.setenv("INFILL_PORT", "4999")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    p.write_text("receiver:\n  grpc: 127.0.0.1:${env:INFILL_PORT}\nbuffer:\n  wait_s: ${env:NOT_SET_ANYWHERE:-3}\n"
                 "exporter:\n  headers: {x-literal: '$${env:KEEP}'}\n")
    c = InfillConfig.load(p)
    assert (c.receiver_grpc, c.buffer_wait_s, c.exporter_headers) == ("127.0.0.1:4999", 3, {"x-literal": "${env:KEEP}"})
    p.write_text("receiver:\n  bearer_token: ${env:NOT_SET_ANYWHERE}\n")
    from otel_tracegen.report import UserError

    with pytest.raises(UserError, match="NOT_SET_ANYWHERE, which is not set"):
        InfillConfig.load(p)


def test_gzip_bombs_are_refused_within_the_limit(sink, running):
    _, _, http_port = running(sink.port, receiver_max_message_mib=1)
    bomb = gzip.compress(b"\x00" * (64 << 20))
    r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=bomb,
                      headers={**PROTOBUF, "Content-Encoding": "gzip"})  # fmt: skip
    assert r.status_code == 413


def test_deep_json_is_not_read_past_python_limits(sink, running):
    _, _, http_port = running(sink.port)
    body = b'{"resourceSpans": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = requests.post(f"http://127.0.0.1:{http_port}/v1/traces", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
