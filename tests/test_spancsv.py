"""Span CSV (Nezha layout) reader: service names from pod names, grouping across files, bad rows, full data."""

import gzip
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_tracegen.formats import read_traces, spancsv
from otel_tracegen.formats.spancsv import HEADER_LINE, service_from_pod
from otel_tracegen.report import ReadReport
from otel_tracegen.trace import SpanKind

FIXTURE = Path(__file__).parent / "testdata" / "spancsv"
# The TrainTicket excerpt doubles as the README demo data, so it lives in examples/.
TT_FILES = sorted((Path(__file__).resolve().parents[1] / "examples" / "trainticket").glob("*.csv.gz"))
OB_FILE = FIXTURE / "onlineboutique" / "faultfree_2022-08-23_17_00_trace.csv"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

STRADDLING = "1d198dbf6c5c17d447368b7f062ec90e"  # 15 spans, every row written into both minute files


@pytest.mark.parametrize(
    "pod, service",
    [
        ("ts-gateway-service-6f6cfc45b-h5m2n", "ts-gateway-service"),  # Deployment: rs hash + pod suffix
        ("frontend-579b9bff58-t2dbm", "frontend"),
        ("ts-verification-code-service-7b6dc75c45-2z9p2", "ts-verification-code-service"),
        ("nginx-deployment-2035384211-7ci7o", "nginx-deployment"),  # k8s < 1.8: numeric hash, any suffix
        ("my-database-users", "my-database-users"),  # hash part with vowels: a word
        ("redis-cart-0", "redis-cart"),  # StatefulSet ordinal
        ("kafka-12", "kafka"),
        ("fluentd-x7k2p", "fluentd"),  # DaemonSet: 5-char suffix only
        ("frontend", "frontend"),  # no k8s suffix: unchanged
        ("ts-ui-dashboard", "ts-ui-dashboard"),  # 'dashboard' is not a k8s suffix (vowels)
        ("user-stats", "user-stats"),  # 5 chars, but with a vowel: a word, not a suffix
        ("my-service-v2", "my-service-v2"),
    ],
)
def test_service_from_pod(pod, service):
    assert service_from_pod(pod) == service


K8S = "bcdfghjklmnpqrstvwxz2456789"
WORD = st.from_regex(r"[a-z]{0,6}[aeiou][a-z0-9]{0,6}", fullmatch=True)  # a vowel: never a k8s suffix
SERVICE = st.lists(WORD, min_size=1, max_size=4).map("-".join)


@given(SERVICE, st.text(K8S, min_size=6, max_size=10), st.text(K8S, min_size=5, max_size=5), st.integers(0, 99))
def test_service_from_pod_property(service, rs_hash, suffix, ordinal):
    assert service_from_pod(f"{service}-{rs_hash}-{suffix}") == service  # Deployment
    assert service_from_pod(f"{service}-{ordinal}") == service  # StatefulSet
    assert service_from_pod(f"{service}-{suffix}") == service  # DaemonSet
    assert service_from_pod(service) == service  # no suffix: unchanged


def test_fixture_trainticket_traces_group_across_files():
    report = ReadReport()
    traces = spancsv.read(TT_FILES, report)
    assert len(traces) == 40
    assert sum(len(t) for t in traces) == 1488 == report.counts["spans read"] == report.counts["rows read"]
    assert report.counts["files read"] == 2 and not report.problems and not report.dropped
    assert len({s.service for t in traces for s in t}) == 26
    assert max(t.depth for t in traces) == 16
    # The straddling trace is ONE trace holding the rows of both files, duplicates kept (faithful).
    (t,) = [t for t in traces if t.trace_id == STRADDLING]
    assert len(t) == 30 and len(t.by_id) == 15 and len(t.roots) == 2
    assert t.depth == 7 and not t.orphans()
    complete = [t for t in traces if t.trace_id != STRADDLING and len(t) != 38]
    assert all(len(t.roots) == 1 and not t.orphans() for t in complete)


def test_span_fields_and_shared_resources():
    traces = spancsv.read([OB_FILE])
    assert len(traces) == 3 and sum(len(t) for t in traces) == 118
    spans = [s for t in traces for s in t]
    root = next(s for s in spans if s.parent_id is None and s.trace_id == "01a83fa4cede57b170f2917aa8736820")
    assert root.span_id == "78955e901fdff9d2" and root.name == "hipstershop.Frontend/Recv."
    assert root.service == "frontend" and root.kind is SpanKind.UNSPECIFIED
    assert (root.start_ns, root.end_ns) == (1661274003418466240, 1661274003473375921)
    assert root.attributes == {} and root.events == [] and root.links == []
    assert root.resource.attributes == {"service.name": "frontend", "k8s.pod.name": "frontend-579b9bff58-t2dbm"}
    # one Resource object per pod, shared by all its spans
    by_pod = {}
    for s in spans:
        by_pod.setdefault(s.resource.attributes["k8s.pod.name"], set()).add(id(s.resource))
    assert all(len(ids) == 1 for ids in by_pod.values())
    assert len({s.service for s in spans}) == 10
    # every trace shares one trace-id string among its spans
    assert all(len({id(s.trace_id) for s in t}) == 1 for t in traces)


def test_read_traces_through_the_registry_with_a_directory():
    traces = read_traces("spancsv", [FIXTURE / "onlineboutique"])
    assert len(traces) == 3


def _write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


GOOD = "t1,a,root,frontend-579b9bff58-t2dbm,GET /,1000000,3000000,2000\n"


@pytest.mark.parametrize("gz", [False, True])
def test_bad_rows_are_reported_with_file_and_line_and_the_rest_kept(tmp_path, gz):
    text = (
        HEADER_LINE
        + "\n"
        + GOOD  # line 2
        + "t1,b,a,cart-579f59597d-wc2lz,GetCart,1500000,2500000,1000\n"  # 3
        + "t1,c,a,cart-579f59597d-wc2lz,GetCart,1500000\n"  # 4: too few columns
        + "t1,d,a,cart-579f59597d-wc2lz,GetCart,soon,2500000,1000\n"  # 5: non-numeric time
        + ",e,a,cart-579f59597d-wc2lz,GetCart,1500000,2500000,1000\n"  # 6: empty TraceID
        + "t1,,a,cart-579f59597d-wc2lz,GetCart,1500000,2500000,1000\n"  # 7: empty SpanID
        + "\n"  # 8: blank, ignored
        + "t1,f,a,cart-579f59597d-wc2lz,GetCart,1500000,2500000,7\n"  # 9: Duration disagrees: kept, counted
        + "t1,g,a,cart-579f59597d-wc2lz,GetCart,1500000,2500000,n/a\n"  # 10: Duration not a number: kept
        + "t1,h,,cart-579f59597d-wc2lz,GetCart,1500000,2500000,1000\n"  # 11: empty ParentID: a root, counted
        + "t2,x,root,cart-579f59597d-wc2lz,GetCart,1500000,2500999,1000"  # 12: last line without newline
    )
    path = _write(tmp_path / ("bad.csv.gz" if gz else "bad.csv"), text, gz)
    report = ReadReport()
    traces = spancsv.read([path], report)
    assert [(t.trace_id, [s.span_id for s in t]) for t in traces] == [("t1", ["a", "b", "f", "g", "h"]), ("t2", ["x"])]
    assert [(p.where, p.reason) for p in report.problems] == [
        (f"{path}:4", spancsv.BAD_COLUMNS),
        (f"{path}:5", spancsv.BAD_TIME),
        (f"{path}:6", spancsv.BAD_IDS),
        (f"{path}:7", spancsv.BAD_IDS),
    ]
    assert report.dropped == {spancsv.BAD_COLUMNS: 1, spancsv.BAD_TIME: 1, spancsv.BAD_IDS: 2}
    assert report.counts[spancsv.COUNT_ROWS] == 10 and report.counts[spancsv.COUNT_SPANS] == 6
    assert report.counts[spancsv.COUNT_DURATION_MISMATCH] == 1
    assert report.counts[spancsv.COUNT_DURATION_NAN] == 1
    assert report.counts[spancsv.COUNT_EMPTY_PARENT] == 1
    h = traces[0].by_id["h"]
    assert h.parent_id is None and traces[0].by_id["b"].parent_id == "a"
    assert traces[1].spans[0].end_ns == 2500999  # ns columns trusted over Duration


def test_wrong_header_skips_the_file_with_one_problem(tmp_path):
    bad = _write(tmp_path / "other.csv", "trace,span,parent\nt1,a,root\n")
    empty = _write(tmp_path / "empty.csv", "")
    good = _write(tmp_path / "good.csv", HEADER_LINE + "\n" + GOOD)
    report = ReadReport()
    traces = spancsv.read([bad, empty, good], report)
    assert [len(t) for t in traces] == [1]
    assert [(p.where, p.reason) for p in report.problems] == [
        (str(bad), spancsv.BAD_HEADER),
        (str(empty), spancsv.BAD_HEADER),
    ]
    assert HEADER_LINE in report.problems[0].detail
    assert report.counts[spancsv.COUNT_SKIPPED_FILES] == 2 and report.counts[spancsv.COUNT_FILES] == 1


def test_quoted_fields_and_crlf_fall_back_to_csv_parsing(tmp_path):
    text = (
        HEADER_LINE
        + "\r\n"
        + GOOD.replace("\n", "\r\n")
        + 't1,b,a,cart-579f59597d-wc2lz,"SELECT a, b FROM t",1500000,2500000,1000\r\n'  # line 3
        + "t1,c,a,cart-579f59597d-wc2lz,too,few\r\n"  # line 4
        + 't1,d,a,cart-579f59597d-wc2lz,"multi\nline",1500000,2500000,1000\r\n'  # lines 5-6
        + "t1,e,a,cart-579f59597d-wc2lz,x,1,2\r\n"  # line 7
    )
    path = _write(tmp_path / "quoted.csv", text)
    report = ReadReport()
    (t,) = spancsv.read([path], report)
    assert [s.name for s in t] == ["GET /", "SELECT a, b FROM t", "multi\nline"]
    assert [p.where for p in report.problems] == [f"{path}:4", f"{path}:7"]


def test_quote_only_in_a_last_line_without_newline(tmp_path):
    path = _write(tmp_path / "q.csv", HEADER_LINE + "\n" + GOOD + 't1,b,a,cart-1,"x, y",1,2,0')
    (t,) = spancsv.read([path])
    assert [s.name for s in t] == ["GET /", "x, y"]


def test_crlf_without_quotes(tmp_path):
    path = _write(tmp_path / "crlf.csv", (HEADER_LINE + "\n" + GOOD * 3).replace("\n", "\r\n"))
    report = ReadReport()
    (t,) = spancsv.read([path], report)
    assert len(t) == 3 and t.spans[0].name == "GET /" and not report.problems
    assert not report.counts[spancsv.COUNT_DURATION_MISMATCH]


def test_rows_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(spancsv, "CHUNK_CHARS", 37)  # far shorter than a row: every row straddles chunks
    rows = [f"t{i % 3},s{i},root,frontend-579b9bff58-t2dbm,op{i % 5},{i}000,{i}500,0\n" for i in range(50)]
    path = _write(tmp_path / "chunks.csv.gz", HEADER_LINE + "\n" + "".join(rows) + "t0,bad,root\n", gz=True)
    report = ReadReport()
    traces = spancsv.read([path], report)
    assert [len(t) for t in traces] == [17, 17, 16]
    assert [s.span_id for s in traces[1]] == [f"s{i}" for i in range(1, 50, 3)]
    assert [p.where for p in report.problems] == [f"{path}:52"]


def test_corrupt_gzip_is_one_problem_and_keeps_what_was_read(tmp_path):
    data = gzip.compress((HEADER_LINE + "\n" + GOOD * 2000).encode())
    path = tmp_path / "trunc.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    report = ReadReport()
    traces = spancsv.read([path], report)
    assert [p.reason for p in report.problems] == [spancsv.UNREADABLE]
    assert len(traces) <= 1


@pytest.mark.skipif(not (SHARED / "nezha-trainticket" / "traces").is_dir(), reason="shared/datasets absent")
def test_full_trainticket_set():
    report = ReadReport()
    traces = spancsv.read(sorted((SHARED / "nezha-trainticket" / "traces").glob("*.csv.gz")), report)
    assert sum(len(t) for t in traces) == 517_503
    assert len(traces) == 7_088
    assert len({s.service for t in traces for s in t}) == 28
    assert max(t.depth for t in traces) == 16
    assert report.counts["files read"] == 137 and not report.problems
    assert not report.counts[spancsv.COUNT_DURATION_MISMATCH]
    # 119 traces straddle two minute files, written in full into both
    assert sum(1 for t in traces if len(t.by_id) < len(t)) == 119
    assert len({id(s.resource) for t in traces for s in t}) == 56  # one Resource per pod
