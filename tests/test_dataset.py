"""Corpus building: repairs counted, unrepairable traces dropped by reason, dedupe by modeled fields, time split."""

import json
from pathlib import Path

import pytest

from otel_tracegen.dataset import (
    SKEW_ATTRIBUTE,
    BuildConfig,
    adjust_clock_skew,
    build_corpus,
    clean_trace,
    dedupe,
    describe,
    load_corpus,
    merge_duplicate_spans,
    plot_stats,
    split_by_time,
)
from otel_tracegen.report import ReadReport
from otel_tracegen.trace import Resource, Span, Trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pod(name):
    return Resource({"service.name": name.rsplit("-", 2)[0], "k8s.pod.name": name})


A, B = pod("front-abc12-xxxxx"), pod("back-def34-yyyyy")


def sp(sid, parent, start, end, res=A, trace="t1", name=None):
    return Span(trace, sid, parent, res.attributes["service.name"], name or f"op-{sid}", start, end, resource=res)


def test_clock_skew_centres_child_from_another_host_and_carries_to_its_subtree():
    t = Trace([sp("p", None, 1000, 2000), sp("c", "p", 900, 1400, B), sp("g", "c", 950, 1000, B)])
    assert adjust_clock_skew(t) == 2
    c, g = t.by_id["c"], t.by_id["g"]
    assert (c.start_ns, c.end_ns) == (1250, 1750)  # Jaeger: parent start + (1000 - 500) / 2
    assert (g.start_ns, g.end_ns) == (1300, 1350)  # same host as c: same shift
    assert c.attributes[SKEW_ATTRIBUTE] == 350 and g.attributes[SKEW_ATTRIBUTE] == 350
    assert SKEW_ATTRIBUTE not in t.by_id["p"].attributes


def test_clock_skew_leaves_same_host_overrun_and_only_fixes_start_of_longer_child():
    same = Trace([sp("p", None, 1000, 2000), sp("c", "p", 1500, 2300)])
    assert adjust_clock_skew(same) == 0 and same.by_id["c"].end_ns == 2300
    longer = Trace([sp("p", None, 1000, 2000), sp("c", "p", 900, 2200, B)])
    assert adjust_clock_skew(longer) == 1
    c = longer.by_id["c"]
    assert (c.start_ns, c.end_ns) == (1000, 2300)


def test_merge_exact_duplicates_but_refuse_conflicting_ones():
    r = ReadReport()
    t = Trace([sp("p", None, 0, 10), sp("c", "p", 1, 5), sp("c", "p", 1, 5)])
    assert merge_duplicate_spans(t, r) and len(t) == 2 and sum(r.repaired.values()) == 1
    t2 = Trace([sp("p", None, 0, 10), sp("c", "p", 1, 5), sp("c", "p", 1, 6)])
    assert not merge_duplicate_spans(t2, ReadReport())


@pytest.mark.parametrize(
    "spans, reason",
    [
        ([sp("a", None, 0, 9), sp("b", None, 0, 9)], "several root spans"),
        ([sp("a", None, 0, 9), sp("b", "zz", 0, 9)], "orphan spans (parent missing)"),
        ([sp("a", None, 0, 9), sp("b", "a", 5, 2)], "span ends before it starts"),
        ([sp("a", "b", 0, 9), sp("b", "a", 0, 9)], "no root span"),
    ],
)
def test_unrepairable_traces_are_dropped_with_their_reason(spans, reason):
    r = ReadReport()
    assert not clean_trace(Trace(spans), BuildConfig(), r)
    assert r.dropped == {"traces: " + reason: 1}
    assert r.problems and r.problems[0].where == "trace t1"


def test_dedupe_keeps_traces_that_differ_only_in_a_value():
    def tr(tid, dur):
        return Trace([sp("a", None, 0, 10_000, trace=tid), sp("b", "a", 1000, 1000 + dur, B, trace=tid)])

    r = ReadReport()
    # t2 repeats t1 with other ids and an other absolute time: a duplicate; t3 differs in one duration.
    t2 = tr("t2", 5000)
    for s in t2.spans:
        s.start_ns += 7_000_000
        s.end_ns += 7_000_000
    kept = dedupe([tr("t1", 5000), t2, tr("t3", 6000)], r)
    assert [t.trace_id for t in kept] == ["t1", "t3"]
    assert sum(r.dropped.values()) == 1


def test_split_by_time_puts_the_last_tenth_in_validation():
    traces = [Trace([sp("a", None, i * 1000, i * 1000 + 10, trace=f"t{i}")]) for i in range(101)]
    splits, cut = split_by_time(traces, 0.1)
    assert cut == 90_000
    assert len(splits["validation"]) == 11 and min(t.start_ns for t in splits["validation"]) == 90_000
    assert max(t.start_ns for t in splits["train"]) < cut


def test_build_writes_a_corpus_that_loads_back(tmp_path):
    from otel_tracegen.formats import otlp_json

    traces = []
    for i in range(20):
        tid = f"{i + 1:032x}"
        base = i * 1_000_000_000
        traces.append(
            Trace(
                [
                    sp(f"{1:016x}", None, base, base + 10_000, trace=tid),
                    sp(f"{2:016x}", f"{1:016x}", base + 100, base + 5_000 + 1000 * i, B, trace=tid),
                ]
            )
        )
    src = tmp_path / "in.jsonl"
    otlp_json.write(traces, src)
    out = tmp_path / "corpus"
    res = build_corpus("otlp-json", [src], out)
    manifest, splits = load_corpus(out)
    assert manifest["splits"]["train"]["traces"] + manifest["splits"]["validation"]["traces"] == 20
    assert len(splits["validation"]) == 2  # traces at 18 s and 19 s of a 0-19 s range
    assert json.loads((out / "manifest.json").read_text())["input_format"] == "otlp-json"
    st = describe(splits["train"] + splits["validation"])
    assert st.traces == 20 and st.spans == 40 and len(st.services) == 2 and max(st.depth) == 2
    plot_stats(st, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert res.report.counts["traces read"] == 20


def test_trainticket_corpus_keeps_straddling_and_skewed_traces(trainticket_corpus):
    _, res = trainticket_corpus
    r = res.report
    assert r.counts["traces read"] == 7088
    assert r.repaired["duplicate span merged (trace written to several files)"] > 0
    assert r.repaired["span shifted by clock-skew adjustment"] > 0
    assert r.dropped == {"traces: several root spans": 1} or set(r.dropped) <= {
        "traces: several root spans",
        "traces: identical to an earlier trace in every modeled field",
    }
    st = describe(res.splits["train"] + res.splits["validation"])
    assert len(st.services) == 28 and max(st.depth) == 16


def test_model_view_agrees_with_the_encoding_text():
    """Dedupe's fast key must split traces exactly as the layered encoding's text does."""
    from otel_tracegen.encoding import trace_to_text
    from otel_tracegen.formats import spancsv

    traces = spancsv.read(sorted((Path(__file__).resolve().parents[1] / "examples" / "trainticket").glob("*.gz")), ReadReport())
    cleaned = [t for t in traces if clean_trace(t, BuildConfig(), ReadReport())]
    # Copies shifted by whole and by sub-µs amounts: the first are duplicates in both views, the second may not be.
    import copy

    variants = []
    for i, t in enumerate(cleaned):
        for shift in (1_000_000, 1_000_000 + 500 * (i % 3)):
            c = copy.deepcopy(t)
            for s in c.spans:
                s.start_ns += shift
                s.end_ns += shift
            c.invalidate()
            variants.append(c)
    everything = cleaned + variants
    from otel_tracegen.dataset import model_view

    by_view: dict = {}
    by_text: dict = {}
    for i, t in enumerate(everything):
        by_view.setdefault(model_view(t), []).append(i)
        by_text.setdefault(trace_to_text(t), []).append(i)
    assert sorted(by_view.values()) == sorted(by_text.values())
    assert len(by_view) < len(everything)  # the whole-µs copies did collapse


def test_join_concatenates_corpora_and_the_model_view_encodes_the_same(tmp_path):
    """`data join` two corpora into one (each keeps its own split); --model-view keeps only what the model reads,
    renumbers span ids, and every trace still encodes to exactly the same text."""
    from otel_tracegen.cli import main
    from otel_tracegen.encoding import trace_to_text
    from otel_tracegen.formats import otlp_json

    examples = Path(__file__).resolve().parents[1] / "examples" / "trainticket"
    src, other = tmp_path / "tt", tmp_path / "other"
    build_corpus("spancsv", [examples], src)
    small = [Trace([sp(f"{1:016x}", None, i * 10**9, i * 10**9 + 5_000, trace=f"{i + 1:032x}")]) for i in range(10)]
    otlp_json.write(small, tmp_path / "small.jsonl")
    build_corpus("otlp-json", [tmp_path / "small.jsonl"], other)
    assert main(["data", "join", str(src), str(other), "--out", str(tmp_path / "both")]) == 0
    assert main(["data", "join", str(src), "--out", str(tmp_path / "view"), "--model-view"]) == 0
    m_src, s_src = load_corpus(src)
    m_other, _ = load_corpus(other)
    m_both, s_both = load_corpus(tmp_path / "both")
    m_view, s_view = load_corpus(tmp_path / "view")
    for name in ("train", "validation"):
        want = m_src["splits"][name]["traces"] + m_other["splits"][name]["traces"]
        assert m_both["splits"][name]["traces"] == want == len(s_both[name])
        assert [trace_to_text(t) for t in s_view[name]] == [trace_to_text(t) for t in s_src[name]]
    assert m_both["inputs"] == m_src["inputs"] + m_other["inputs"] and len(m_both["joined"]) == 2
    assert m_view["model_view_only"]
    first = s_view["train"][0]
    assert first.spans[0].span_id == f"{1:016x}" and not first.spans[0].attributes
    assert (tmp_path / "view" / "train.otlp.jsonl.gz").stat().st_size < 0.6 * (src / "train.otlp.jsonl.gz").stat().st_size


def test_join_refuses_what_it_cannot_join_and_says_why(tmp_path, capsys):
    from otel_tracegen.cli import main

    assert main(["data", "join", str(tmp_path), "--out", str(tmp_path / "o")]) != 0
    assert "not a corpus directory" in capsys.readouterr().err
    examples = Path(__file__).resolve().parents[1] / "examples" / "trainticket"
    build_corpus("spancsv", [examples], tmp_path / "tt")
    assert main(["data", "join", str(tmp_path / "tt"), str(tmp_path / "tt"), "--out", str(tmp_path / "o")]) != 0
    assert "must not share trace ids" in capsys.readouterr().err
