"""Alibaba call-graph rows (v2021 / v2022): schema detection, view merging, unknowns, holes, bad rows.

The synthetic rows below are written by hand (no Alibaba rows are copied into the repository: the data has
no license); the real samples in shared/datasets are used when present.
"""

import gzip
from pathlib import Path

import pytest

from otel_tracegen.formats import alibaba, read_traces
from otel_tracegen.report import ReadReport
from otel_tracegen.trace import SpanKind

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alibaba-raw-samples"

# v2021 with the leading unnamed index column of one public sample. Trace T1:
#   0        USER-facing entry (http) A -> B, client view only
#   0.1      B -> C rpc: client view (dm (?), rt 9) + server view (dm C, rt -7): one span, dm from the server
#   0.1.1    C -> D rpc: client names dm D1, server names D2 (as the real data does): merged, dm D2
#   0.1.2    C -> mc (memcached) twice with the same rpc_id: two distinct calls -> 0.1.2 and 0.1.2#2
#   0.1.3    C -> E rpc 0 / 0: both views rounded to 0 ms, merged
#   0.1.4    C -> F server view only (rt -3): kept, duration 3 ms
#   0.2.1    hole: 0.2 missing, 0 present -> orphan with parent 0.2
#   0.1.5    C -> (?) mq: unknown dm -> service UNKNOWN
V2021 = """\
,traceid,timestamp,rpcid,um,rpctype,dm,interface,rt
0,T1,1000,0,A,http,B,/buy,50
1,T1,1002,0.1,B,rpc,(?),pay,9
2,T1,1003,0.1,B,rpc,C,pay,-7
3,T1,1004,0.1.1,C,rpc,D1,x1,4
4,T1,1004,0.1.1,C,rpc,D2,x2,-3
5,T1,1005,0.1.2,C,mc,M,,1
6,T1,1006,0.1.2,C,mc,M,,0
7,T1,1007,0.1.3,C,rpc,E,get,0
8,T1,1007,0.1.3,C,rpc,E,get,0
9,T1,1008,0.1.4,C,rpc,F,put,-3
10,T1,1009,0.2.1,B,db,DB,,2
11,T1,1010,0.1.5,C,mq,(?),topic,5
12,T1,1011,,C,rpc,G,lost,1
13,T1,oops,0.1.6,C,rpc,G,late,1
14,T1,1012,0.1.7,C,rpc
15,,1013,0.1.8,C,rpc,G,anon,1
16,T2,2000,0.1,(?),http,H,/home,3
17,T2,2001,0.1.1,H,userDefined,H,inner,1
"""

# v2022: trace S1 starts below 0 (the 0 call is not recorded), S2 has an entry call by USER.
V2022 = """\
timestamp,traceid,service,rpc_id,rpctype,um,uminstanceid,interface,dm,dminstanceid,rt
100,S1,SVC_1,0.1,http,UNKNOWN,UNAVAILABLE,home,MS_1,MS_1_POD_1,8.0
100,S1,SVC_1,0.1,http,UNKNOWN,UNAVAILABLE,home,MS_1,MS_1_POD_1,8.0
101,S1,SVC_1,0.1.1,rpc,MS_1,MS_1_POD_1,get,UNKNOWN,UNKNOWN,3.0
101,S1,SVC_1,0.1.1,rpc,MS_1,MS_1_POD_1,get,MS_2,MS_2_POD_7,2.0
102,S1,SVC_1,0.1.2,rpc,MS_1,MS_1_POD_1,a,MS_3,MS_3_POD_1,1.0
102,S1,SVC_1,0.1.2,rpc,MS_1,MS_1_POD_1,b,MS_4,MS_4_POD_1,1.0
103,S1,SVC_1,0.1.3,UNKNOWN,MS_1,MS_1_POD_1,q,MS_5,MS_5_POD_1,1.0
104,S1,SVC_1,0.1.4,mc,MS_1,MS_1_POD_1,,MC_1,UNKNOWN,0.0
105,S1,SVC_1,0.1.5,rpc,MS_1,MS_1_POD_1,neg,MS_6,MS_6_POD_1,-2.0
200,S2,SVC_2,0,http,USER,USER,start,MS_9,MS_9_POD_3,12.0
201,S2,SVC_2,0.1,db,MS_9,MS_9_POD_3,,DB_1,UNKNOWN,nan
"""


def _write(path: Path, text: str) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _spans(trace):
    return {s.span_id: s for s in trace}


def test_v2021_rows_become_spans_with_views_merged(tmp_path):
    path = _write(tmp_path / "calls.csv", V2021)
    report = ReadReport()
    traces = alibaba.read([path], report)
    assert [t.trace_id for t in traces] == ["T1", "T2"]
    t1 = _spans(traces[0])
    assert sorted(t1) == ["0", "0.1", "0.1.1", "0.1.2", "0.1.2#2", "0.1.3", "0.1.4", "0.1.5", "0.2.1"]

    entry = t1["0"]
    assert entry.parent_id is None and entry.service == "B" and entry.name == "/buy"
    assert entry.kind is SpanKind.SERVER and (entry.start_ns, entry.end_ns) == (1000 * 10**6, 1050 * 10**6)
    assert entry.attributes == {
        "alibaba.rpc_id": "0", "alibaba.rpctype": "http", "alibaba.um": "A", "alibaba.dm": "B", "alibaba.rt": 50.0,
    }
    assert entry.resource.attributes == {"service.name": "B"}

    pay = t1["0.1"]  # client (dm unknown, rt 9) + server (dm C, rt -7)
    assert pay.parent_id == "0" and pay.service == "C" and pay.name == "pay"
    assert (pay.start_ns, pay.end_ns) == (1002 * 10**6, 1011 * 10**6)  # covers both views
    assert pay.attributes["alibaba.um"] == "B" and pay.attributes["alibaba.other_view.dm"] == "(?)"
    assert pay.attributes["alibaba.other_view.rt"] == 9.0 and pay.attributes["alibaba.rt"] == -7.0

    call = t1["0.1.1"]  # the two views name different dms: the server view's wins, the other is kept
    assert call.service == "D2" and call.name == "x2" and call.parent_id == "0.1"
    assert call.attributes["alibaba.other_view.dm"] == "D1" and call.attributes["alibaba.other_view.interface"] == "x1"

    assert t1["0.1.2"].kind is SpanKind.CLIENT and t1["0.1.2"].name == "mc"  # empty interface -> rpctype
    assert t1["0.1.2#2"].attributes["alibaba.rpc_id"] == "0.1.2" and t1["0.1.2#2"].parent_id == "0.1"
    assert t1["0.1.2"].start_ns < t1["0.1.2#2"].start_ns
    assert "alibaba.other_view.rt" in t1["0.1.3"].attributes  # 0 / 0 merged
    lone = t1["0.1.4"]
    assert lone.duration_ns == 3 * 10**6 and lone.service == "F"
    assert t1["0.2.1"].parent_id == "0.2" and t1["0.2.1"].kind is SpanKind.CLIENT
    assert [s.span_id for s in traces[0].orphans()] == ["0.2.1"]
    mq = t1["0.1.5"]
    assert mq.service == alibaba.UNKNOWN_SERVICE and mq.kind is SpanKind.CONSUMER and mq.attributes["alibaba.dm"] == "(?)"

    t2 = _spans(traces[1])
    assert t2["0.1"].parent_id is None and traces[1].root is t2["0.1"]  # top level below 0
    assert t2["0.1.1"].kind is SpanKind.INTERNAL and t2["0.1.1"].parent_id == "0.1"

    assert [(p.where, p.reason) for p in report.problems] == [
        (f"{path}:14", alibaba.EMPTY_RPC_ID),
        (f"{path}:15", alibaba.BAD_NUMBER),
        (f"{path}:16", alibaba.BAD_COLUMNS),
        (f"{path}:17", alibaba.EMPTY_TRACE_ID),
    ]
    assert sum(report.dropped.values()) == 4
    assert report.repaired == {alibaba.MERGED: 3, alibaba.UNKNOWN_FROM_OTHER_VIEW: 1}
    c = report.counts
    assert c["rows read"] == 18 and c["spans read"] == 11 == 18 - 4 - 3
    assert c[alibaba.COUNT_V2021_FILES] == 1
    assert c[alibaba.COUNT_NEGATIVE_RT] == 3 and c[alibaba.COUNT_LONE_SERVER_VIEW] == 1
    assert c[alibaba.COUNT_REUSED_RPC_ID] == 1 and c[alibaba.COUNT_HOLES] == 1
    assert c[alibaba.COUNT_TOP_BELOW_ZERO] == 1 and c[alibaba.COUNT_UNKNOWN_DM] == 1
    assert c[alibaba.COUNT_UNKNOWN_UM] == 1 and c[alibaba.COUNT_EMPTY_INTERFACE] == 3


def test_v2022_rows_merge_on_agreeing_or_unknown_endpoints(tmp_path):
    path = _write(tmp_path / "cg.csv.gz", V2022)
    report = ReadReport()
    s1, s2 = alibaba.read([path], report)
    t = _spans(s1)
    assert sorted(t) == ["0.1", "0.1.1", "0.1.2", "0.1.2#2", "0.1.3", "0.1.4", "0.1.5"]
    home = t["0.1"]  # identical rows: one call; top-level although 0 is absent
    assert home.parent_id is None and s1.root is home and home.service == "MS_1"
    assert home.attributes["alibaba.service"] == "SVC_1" and home.attributes["alibaba.um"] == "UNKNOWN"
    get = t["0.1.1"]  # dm UNKNOWN in one view, MS_2 in the other
    assert get.service == "MS_2" and get.attributes["alibaba.dminstanceid"] == "MS_2_POD_7"
    assert get.attributes["alibaba.uminstanceid"] == "MS_1_POD_1" and get.duration_ns == 3 * 10**6
    assert {t["0.1.2"].service, t["0.1.2#2"].service} == {"MS_3", "MS_4"}  # both dms known and different
    assert t["0.1.3"].kind is SpanKind.UNSPECIFIED
    assert t["0.1.4"].kind is SpanKind.CLIENT and t["0.1.4"].name == "mc"
    assert t["0.1.5"].duration_ns == 2 * 10**6
    assert [s.span_id for s in s2] == ["0"] and s2.spans[0].attributes["alibaba.um"] == "USER"
    assert [(p.where, p.reason) for p in report.problems] == [(f"{path}:12", alibaba.BAD_NUMBER)]
    assert report.repaired == {alibaba.MERGED: 2, alibaba.UNKNOWN_FROM_OTHER_VIEW: 1}
    c = report.counts
    assert c[alibaba.COUNT_V2022_FILES] == 1 and c[alibaba.COUNT_UNKNOWN_RPCTYPE] == 1
    assert c[alibaba.COUNT_REUSED_RPC_ID] == 1 and c[alibaba.COUNT_TOP_BELOW_ZERO] == 1
    assert c[alibaba.COUNT_NEGATIVE_RT] == 1 and c[alibaba.COUNT_LONE_SERVER_VIEW] == 0  # no sign semantics in v2022


def test_trace_spread_over_files_and_schemas_detected_per_file(tmp_path):
    # Same trace in two v2021 files (one without the index column), the server view in the second file.
    a = _write(tmp_path / "a.csv", "traceid,timestamp,rpcid,um,rpctype,dm,interface,rt\nT,1,0,U,rpc,D,i,5\n")
    b = _write(tmp_path / "b.csv", "rt,rpcid,traceid,timestamp,um,rpctype,dm,interface\n-4,0,T,2,U,rpc,D,i\n")
    report = ReadReport()
    (t,) = alibaba.read([a, b], report)
    assert len(t) == 1 and report.repaired[alibaba.MERGED] == 1 and report.counts["files read"] == 2


def test_wrong_header_is_one_problem(tmp_path):
    bad = _write(tmp_path / "bad.csv", "a,b,c\n1,2,3\n")
    report = ReadReport()
    assert alibaba.read([bad], report) == []
    (p,) = report.problems
    assert p.where == str(bad) and p.reason == alibaba.BAD_HEADER and "traceid,timestamp,rpcid" in p.detail
    assert report.counts[alibaba.COUNT_SKIPPED_FILES] == 1


def test_registry_reads_alibaba(tmp_path):
    _write(tmp_path / "calls.csv", V2021)
    assert len(read_traces("alibaba", [tmp_path])) == 2


# --- the real samples --------------------------------------------------------------------------------------

SAMPLE_FILES = {  # file: (rows, traces) per shared/datasets/alibaba-raw-samples/SOURCE.md
    "sjlgaga_v2021_MSCallGraph_sample.csv": (999, 21),
    "casper_2021-shuffled-sample-traces-small.csv.gz": (967, 17),
    "casper_2022-shuffled-sample-traces-small.csv.gz": (1000, 196),
}


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared/datasets/alibaba-raw-samples absent")
@pytest.mark.parametrize("name", sorted(SAMPLE_FILES))
def test_real_samples(name):
    rows, n_traces = SAMPLE_FILES[name]
    report = ReadReport()
    traces = alibaba.read([SAMPLES / name], report)
    assert len(traces) == n_traces
    assert not report.problems and not report.dropped
    c = report.counts
    assert c["rows read"] == rows
    merged = report.repaired[alibaba.MERGED]
    assert merged > 90  # about one row in ten is the second view of a call
    assert c["spans read"] == sum(len(t) for t in traces) == rows - merged
    v2021 = "2021" in name
    assert (c[alibaba.COUNT_NEGATIVE_RT] > 0) == v2021  # only v2021 writes server views with rt < 0
    assert c[alibaba.COUNT_UNKNOWN_DM] > 0 and c[alibaba.COUNT_HOLES] > 0 and c[alibaba.COUNT_REUSED_RPC_ID] > 0
    for t in traces:
        assert len(t.by_id) == len(t)  # span ids unique (reused rpc_ids suffixed)
        ids = {s.attributes[alibaba.RPC_ID_ATTRIBUTE] for s in t}
        for s in t:
            rpc_id = s.attributes[alibaba.RPC_ID_ATTRIBUTE]
            assert s.span_id.split("#")[0] == rpc_id
            if s.parent_id is None:  # top level: no ancestor recorded
                assert not any(rpc_id.startswith(i + ".") for i in ids)
            else:
                assert s.parent_id == rpc_id.rsplit(".", 1)[0]
        assert t.roots  # every trace has a top-level call
    # orphans are exactly the holes
    assert sum(len(t.orphans()) for t in traces) == c[alibaba.COUNT_HOLES]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared/datasets/alibaba-raw-samples absent")
def test_all_samples_together():
    report = ReadReport()
    traces = alibaba.read(sorted(SAMPLES.glob("*.csv*")), report)
    # the two v2021 samples share no trace id with each other
    assert len(traces) == 21 + 17 + 196
    assert report.counts[alibaba.COUNT_V2021_FILES] == 2 and report.counts[alibaba.COUNT_V2022_FILES] == 1


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/datasets/alibaba-raw-samples not present")
def test_alibaba_corpus_reads_back_with_every_span(tmp_path):
    """Alibaba ids (rpc_id "0", "0.1.3") become valid OTLP ids, so the corpus loads back whole."""
    from otel_tracegen.dataset import build_corpus, load_corpus

    res = build_corpus("alibaba", [SAMPLES], tmp_path / "c")
    _, splits = load_corpus(tmp_path / "c")
    written = sum(len(t) for ts in res.splits.values() for t in ts)
    assert written > 0 and sum(len(t) for ts in splits.values() for t in ts) == written
