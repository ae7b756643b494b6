"""The `otel-tracegen` command as a user runs it: exit codes, one-line errors, real files end to end."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from otel_tracegen.cli import Environment, ExitStatus, main

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "datasets"
TESTDATA = HERE / "testdata"


def run(*argv):
    env = Environment(io.StringIO(), io.StringIO())
    code = main(list(map(str, argv)), env)
    return code, env.stdout.getvalue(), env.stderr.getvalue()


def test_missing_file_is_one_line_not_a_traceback(tmp_path):
    code, out, err = run("validate", tmp_path / "nope.json")
    assert code == ExitStatus.ERROR
    assert err.strip() == f"otel-tracegen: error: no such file or directory: {tmp_path / 'nope.json'}"


def test_wrong_format_is_a_usage_error_from_the_installed_command(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "otel_tracegen", "convert", "--from", "pdf", "--to", "zipkin", "x", "--out", "y"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == ExitStatus.USAGE
    assert "invalid choice: 'pdf'" in p.stderr and "Traceback" not in p.stderr


def test_unreadable_corpus_dir_is_a_clear_error(tmp_path):
    code, _, err = run("data", "stats", tmp_path)
    assert code == ExitStatus.ERROR and "is not a corpus directory" in err


def test_validate_finds_the_orphans_in_zipkin_messaging2():
    path = TESTDATA / "zipkin" / "messaging2.json"
    if not path.exists():
        path = SHARED / "zipkin-lens-testdata" / "messaging2.json"
    if not path.exists():
        pytest.skip("messaging2.json not available")
    code, out, _ = run("validate", path)
    assert code == ExitStatus.INVALID
    assert out.count("orphan: parent") == 6
    assert "1 traces, 1 invalid" in out


def test_validate_passes_a_valid_file_and_guesses_its_format(tmp_path):
    from otel_tracegen.formats import otlp_json
    from otel_tracegen.trace import Span, Trace

    t = Trace([Span("ab" * 16, "01" * 8, None, "svc", "GET /", 0, 100), Span("ab" * 16, "02" * 8, "01" * 8, "db", "q", 10, 20)])
    f = tmp_path / "ok.json"
    otlp_json.write([t], f)
    code, out, _ = run("validate", f, "--expect-calls", 2, "--expect-depth", 2)
    assert code == ExitStatus.SUCCESS and "1 traces, 0 invalid, 1 valid" in out
    code, out, _ = run("validate", f, "--expect-depth", 3)
    assert code == ExitStatus.INVALID and "depth_mismatch" in out


def _sdk_request_bytes():
    """Spans recorded by the real OpenTelemetry SDK, encoded as the OTLP exporter encodes them."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout", "k8s.pod.name": "checkout-1"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("shop.instrumentation", "1.2.3", attributes={"lib.flag": True})
    with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER, attributes={"http.status_code": 500}) as root:
        root.add_event("cart loaded", {"items": 3, "ids": [1, 2, 3]})
        with tracer.start_as_current_span(
            "charge", kind=SpanKind.CLIENT, links=[Link(root.get_span_context(), {"why": "retry"})]
        ) as child:
            child.set_attribute("amount", 12.5)
            child.set_attribute("tags", ["a", "b"])
            child.set_status(Status(StatusCode.ERROR, "card declined"))
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans()).SerializeToString()


def test_sdk_spans_survive_convert_to_otlp_json_and_back(tmp_path):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    src = tmp_path / "sdk.pb"
    src.write_bytes(_sdk_request_bytes())
    assert run("convert", "--from", "otlp-proto", "--to", "otlp-json", src, "--out", tmp_path / "a.json")[0] == 0
    assert run("convert", "--from", "otlp-json", "--to", "otlp-proto", tmp_path / "a.json", "--out", tmp_path / "b.pb")[0] == 0
    before, after = ExportTraceServiceRequest(), ExportTraceServiceRequest()
    before.ParseFromString(src.read_bytes())
    after.ParseFromString((tmp_path / "b.pb").read_bytes())
    assert after == before  # protobuf equality: every field, in order


def test_sdk_spans_survive_a_jaeger_round_trip_for_what_jaeger_carries(tmp_path):
    from otel_tracegen.formats import otlp_proto
    from otel_tracegen.report import ReadReport

    src = tmp_path / "sdk.pb"
    src.write_bytes(_sdk_request_bytes())
    assert run("convert", "--from", "otlp-proto", "--to", "jaeger", src, "--out", tmp_path / "j.json")[0] == 0
    assert run("convert", "--from", "jaeger", "--to", "otlp-proto", tmp_path / "j.json", "--out", tmp_path / "c.pb")[0] == 0
    (orig,) = otlp_proto.read([src], ReadReport())
    (back,) = otlp_proto.read([tmp_path / "c.pb"], ReadReport())
    a = {s.span_id: s for s in orig}
    b = {s.span_id: s for s in back}
    assert a.keys() == b.keys()
    for sid, s in a.items():
        t = b[sid]
        assert (t.trace_id, t.parent_id, t.service, t.name, t.kind, t.status) == (
            s.trace_id, s.parent_id, s.service, s.name, s.kind, s.status)
        assert t.start_ns == s.start_ns // 1000 * 1000 and t.end_ns // 1000 == s.end_ns // 1000
        scalar = {k: v for k, v in s.attributes.items() if not isinstance(v, (list, dict))}
        assert {k: t.attributes[k] for k in scalar} == scalar
        assert [(e.name, e.time_ns // 1000) for e in t.events] == [(e.name, e.time_ns // 1000) for e in s.events]
        assert [(link.trace_id, link.span_id) for link in t.links] == [(link.trace_id, link.span_id) for link in s.links]
        assert (t.scope.name, t.scope.version) == (s.scope.name, s.scope.version)
        assert t.resource.attributes["k8s.pod.name"] == s.resource.attributes["k8s.pod.name"]


def test_convert_zipkin_to_otlp_json_keeps_every_span(tmp_path):
    path = TESTDATA / "zipkin" / "yelp.json"
    if not path.exists():
        pytest.skip("zipkin fixture not available")
    code, out, _ = run("convert", "--from", "zipkin", "--to", "otlp-json", path, "--out", tmp_path / "y.jsonl")
    assert code == 0 and "wrote 1 traces, 16 spans" in out


def test_data_build_and_stats_on_the_shipped_sample(tmp_path):
    sample = HERE.parent / "examples" / "trainticket"
    code, out, err = run("data", "build", "--format", "spancsv", sample, "--out", tmp_path / "c")
    assert code == 0, err
    code, out, err = run("data", "stats", tmp_path / "c", "--plot", tmp_path / "c" / "stats.png")
    assert code == 0, err
    assert "services" in out and (tmp_path / "c" / "stats.png").stat().st_size > 10_000


def test_trainticket_stats_report_28_services_and_depth_16(trainticket_corpus):
    corpus_dir, _ = trainticket_corpus
    code, out, _ = run("data", "stats", corpus_dir, "--json")
    import json

    summary = json.loads(out)
    assert summary["services"] == 28 and summary["depth"]["max"] == 16


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sample = HERE.parent / "examples" / "trainticket"
    code, _, err = run("convert", "--from", "spancsv", "--to", "zipkin", sample, "--out", blocker / "x.json")
    assert code == ExitStatus.ERROR
    assert err.startswith("otel-tracegen: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_build_from_the_wrong_format_is_an_error_not_an_empty_corpus(tmp_path):
    wrong = TESTDATA / "zipkin" / "yelp.json"
    code, _, err = run("data", "build", "--format", "spancsv", wrong, "--out", tmp_path / "c")
    assert code == ExitStatus.ERROR and "no traces could be read as spancsv" in err
    assert not (tmp_path / "c").exists()


def test_empty_file_is_named_and_validate_of_nothing_fails(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, _, err = run("validate", empty)
    assert code == ExitStatus.ERROR and "empty file" in err
    (tmp_path / "empty.json").write_text("[]")
    code, _, err = run("validate", "--format", "zipkin", tmp_path / "empty.json")
    assert code == ExitStatus.INVALID and "no traces found" in err


@pytest.mark.parametrize("value", ["inf", "-1", "nan", "abc"])
def test_tolerance_must_be_finite_and_non_negative(value):
    code, _, _ = run("validate", "--tolerance-us", value, TESTDATA / "zipkin" / "yelp.json")
    assert code == ExitStatus.USAGE


def test_damaged_corpus_is_named(tmp_path):
    sample = HERE.parent / "examples" / "trainticket"
    corpus = tmp_path / "c"
    assert run("data", "build", "--format", "spancsv", sample, "--out", corpus)[0] == 0
    (corpus / "validation.otlp.jsonl.gz").unlink()
    code, _, err = run("data", "stats", corpus)
    assert code == ExitStatus.ERROR and "validation.otlp.jsonl.gz: missing" in err
    for garbage in ("garbage", "[]"):
        (corpus / "manifest.json").write_text(garbage)
        code, _, err = run("data", "stats", corpus)
        assert code == ExitStatus.ERROR and "not a valid manifest" in err


def test_a_single_trace_goes_to_train(tmp_path):
    code, out, _ = run("data", "build", "--format", "zipkin", TESTDATA / "zipkin" / "yelp.json", "--out", tmp_path / "c")
    assert code == 0 and "train 1 traces" in out


def test_a_trace_split_across_formats_is_one_trace(tmp_path):
    from otel_tracegen.formats import otlp_json, otlp_proto
    from otel_tracegen.trace import Span, Trace

    tid = "ab" * 16
    root = Span(tid, "01" * 8, None, "front", "GET /", 0, 100)
    child = Span(tid, "02" * 8, "01" * 8, "db", "query", 10, 20)
    otlp_proto.write([Trace([root])], tmp_path / "part.pb")
    otlp_json.write([Trace([child])], tmp_path / "part.jsonl")
    code, out, _ = run("validate", tmp_path / "part.pb", tmp_path / "part.jsonl")
    assert code == 0 and "1 traces, 0 invalid" in out


def test_broken_pipe_is_quiet():
    """`otel-tracegen ... | head`: the reader is gone before we write; no traceback, no error line."""
    p = subprocess.Popen(
        [sys.executable, "-m", "otel_tracegen", "formats"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    p.stdout.close()  # closed before the interpreter has even started: every write hits EPIPE
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert "Traceback" not in err and "error" not in err
    assert p.returncode == 0
