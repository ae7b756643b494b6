"""The harness, the replay and probabilistic baselines, utility and the report, on small hand-built traces."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from otel_tracegen.encoding import Include
from otel_tracegen.evaluate import harness as h
from otel_tracegen.evaluate import metrics as m
from otel_tracegen.evaluate.baselines import ProbabilisticGenerator, ReplayGenerator, copy_with_fresh_ids
from otel_tracegen.evaluate.generators import Generated, Generator
from otel_tracegen.evaluate.utility import (
    LinearClassifier,
    balanced_accuracy,
    critical_service,
    exclusive_time_ns,
    top1_accuracy,
    utility,
)
from otel_tracegen.sampling import TraceRequest
from otel_tracegen.trace import Span, SpanKind, StatusCode, Status, Trace
from otel_tracegen.validate import validate

from .test_evaluate_metrics import A, B, C, tree


def app(n: int, seed: int = 0) -> list[Trace]:
    """A small app: three call-tree shapes under two entries, durations varying per trace."""
    rng = random.Random(seed)
    specs = [A, B, ("x", "run", [("y", "q", []), ("y", "q", []), ("z", "w", [])])]
    return [tree(specs[rng.randrange(3)], f"{seed}-{i}", dur=rng.randint(400, 4000)) for i in range(n)]


# --- baselines -------------------------------------------------------------------------------------------------


def test_replay_copies_training_traces_with_fresh_ids_and_meets_requests():
    train = app(30)
    gen = ReplayGenerator(train)
    assert isinstance(gen, Generator)
    out = gen.generate([TraceRequest(service="x", calls=4, depth=2), TraceRequest(service="a", calls=2)], seed=1)
    t0, t1 = out[0].trace, out[1].trace
    assert [s.service for s, _ in t0.walk()][0] == "x" and len(t0) == 4 and t0.depth == 2
    assert m.shape(t1) == m.shape(tree(B))
    train_ids = {s.span_id for t in train for s in t}
    assert not ({s.span_id for s in t0} & train_ids) and t0.start_ns == 0
    assert m.memorization(train, [t0, t1]).exact_copies == 1.0
    # A request nothing meets falls back to the entry's traces instead of failing.
    assert gen.generate([TraceRequest(service="a", calls=50)])[0].trace.root.service == "a"
    # Same seed, same traces.
    again = gen.generate([TraceRequest(service="x", calls=4, depth=2), TraceRequest(service="a", calls=2)], seed=1)
    assert [m.shape(g.trace) for g in again] == [m.shape(t0), m.shape(t1)]
    assert [s.span_id for s in again[0].trace] == [s.span_id for s in t0]


def test_replay_follows_instructions_when_training_has_such_traces():
    train = app(40)
    p90 = {("a", "get"): 2.0}  # µs (the app's traces last 0.4 to 4 µs)
    gen = ReplayGenerator(train, p90)
    for g in gen.generate([TraceRequest(service="a", operation="get", high_latency=True)] * 5, seed=2):
        assert g.trace.root.duration_ns / 1000 > 2.0
    inc = (Include("c", "d", SpanKind.SERVER),)
    for g in gen.generate([TraceRequest(service="a", includes=inc)] * 5, seed=3):
        assert m.shape(g.trace) == m.shape(tree(A))


def test_copy_with_fresh_ids_keeps_parent_links():
    t = tree(A, start=5_000)
    c = copy_with_fresh_ids(t, random.Random(0))
    assert validate(c) == [] and m.shape(c) == m.shape(t) and c.start_ns == 0 and c.trace_id != t.trace_id


def test_probabilistic_draws_children_independently():
    # Two shapes under one entry: a -> (b) and a -> (c, c). Per-depth statistics mix them: trees like a -> (b, c)
    # or a -> (c) appear, which no real trace has, while every call (edge) is one training made.
    train = [tree(("a", "get", [("b", "x", [])]), f"p{i}") for i in range(20)]
    train += [tree(("a", "get", [("c", "y", []), ("c", "y", [])]), f"q{i}") for i in range(20)]
    gen = ProbabilisticGenerator(train)
    out = [g.trace for g in gen.generate([TraceRequest()] * 200, seed=5)]
    assert all(validate(t) == [] for t in out)
    assert set(m.popular_calls(out)) <= set(m.popular_calls(train))
    shapes = m.shape_metrics(m.shape_counts(train), m.shape_counts(out))
    assert 0.3 < shapes.precision < 0.8  # about half: fan-out 1 or 2, each child b or c with odds 1:2
    again = [g.trace for g in gen.generate([TraceRequest()] * 200, seed=5)]
    assert [m.shape(t) for t in again] == [m.shape(t) for t in out]


def test_probabilistic_honours_the_entry_and_training_limits():
    train = app(60)
    gen = ProbabilisticGenerator(train)
    out = gen.generate([TraceRequest(service="x")] * 30 + [TraceRequest(service="a", operation="get")] * 30, seed=0)
    assert {g.trace.root.service for g in out[:30]} == {"x"}
    assert {(g.trace.root.service, g.trace.root.name) for g in out[30:]} == {("a", "get")}
    assert max(g.trace.depth for g in out) <= 3 and max(len(g.trace) for g in out) <= 4
    assert gen.honours == frozenset({"entry"})


# --- harness scoring -------------------------------------------------------------------------------------------


def test_score_conditioned_bins_and_rates():
    reqs = [TraceRequest(service="a", calls=4, depth=3), TraceRequest(service="a", calls=2, depth=2),
            TraceRequest(service="a", calls=2, depth=2)]
    answers = [Generated(tree(A)), Generated(tree(A, "t2")), Generated(None, "refused: no")]
    rates, cells = h.score_conditioned(reqs, answers, 0)
    assert rates == {"conditioned_valid": 2 / 3, "calls_exact": 1 / 3, "depth_exact": 1 / 3, "size_exact": 1 / 3,
                     "conditioned_accuracy": 1 / 3}
    c4, d3 = h.bin_of(4, h.CALL_BINS), h.bin_of(3, h.DEPTH_BINS)
    assert (cells[(c4, d3)].requests, cells[(c4, d3)].valid, cells[(c4, d3)].accurate) == (1, 1, 1)
    small = cells[(h.bin_of(2, h.CALL_BINS), 1)]
    assert (small.requests, small.valid, small.accurate) == (2, 1, 0)
    assert small.violations == {"calls_mismatch": 1, "depth_mismatch": 1, "no trace": 1}
    assert [h.bin_label(b) for b in h.CALL_BINS[:3]] == ["1", "2-3", "4-7"] and h.bin_label(h.CALL_BINS[-1]) == "128+"


def test_score_instructions():
    high = tree(B, dur=5000)  # ns
    low = tree(B, "t2", dur=500)
    p90 = {("a", "get"): 1.0}  # µs
    reqs = [TraceRequest(service="a", operation="get", high_latency=True)] * 2
    assert h.score_instructions(reqs, [Generated(high), Generated(low)], "high_latency", p90) == (2, 1)
    inc = (Include("c", "d", SpanKind.SERVER),)
    reqs = [TraceRequest(service="a", operation="get", includes=inc, high_latency=True)] * 3
    answers = [Generated(tree(A, dur=5000)), Generated(tree(A, "t3", dur=100)), Generated(high)]
    assert h.score_instructions(reqs, answers, "include", p90) == (3, 2)
    assert h.score_instructions(reqs, answers, "both", p90) == (3, 1)
    # Entered elsewhere: not what was asked, however slow.
    elsewhere = tree(("x", "run", [("c", "y", [("d", "z", [])])]), dur=9000)
    assert h.score_instructions(reqs[:1], [Generated(elsewhere)], "include", p90) == (1, 0)


def test_validity_counts_unanswered_requests_as_invalid():
    bad = tree(B)
    bad.spans[1].end_ns += 10_000  # the child now ends after its parent
    score = h.GeneratorScore("g", frozenset(), "generator")
    h.score_validity(score, [Generated(tree(A)), Generated(bad), Generated(None, "unparseable: row 2")], 0)
    assert score.values["validity"] == pytest.approx(1 / 3)
    assert score.violations == {"child_outside_parent": 1} and score.problems == {"unparseable": 1}
    score2 = h.GeneratorScore("g", frozenset(), "generator")
    h.score_validity(score2, [Generated(bad)], 20_000)  # within a 20 µs tolerance
    assert score2.values["validity"] == 1.0


def test_replay_of_the_real_set_scores_like_the_real_set():
    train = app(80, seed=1)
    real = app(80, seed=2)
    ev = h.evaluate(real, generators=[ReplayGenerator(train), ProbabilisticGenerator(train)], train=train,
                    settings=h.Settings(n=60, n_instructions=10, seed=3))
    replay, prob = ev.scores
    assert replay.values["memorization"] == 1.0 and replay.values["exact_copies"] == 1.0
    assert replay.values["shape_precision"] == 1.0 and replay.values["validity"] == 1.0
    assert replay.values["conditioned_accuracy"] == 1.0  # every requested size exists in training
    assert replay.values["kl_popular_calls"] < 0.05 and replay.values["heavy_hitters_service_all"] == 1.0
    assert prob.values["shape_precision"] < replay.values["shape_precision"]
    # Every request set was asked of both, the same requests.
    assert len(replay.traces) == len(prob.traces) == 60
    assert set(ev.table()) >= set(h.METRICS) - {"include_following", "both_following"}


def test_a_failing_generator_is_reported_and_the_others_still_scored():
    class Broken:
        name, honours = "broken", frozenset()

        def generate(self, requests, *, seed=0, progress=None):
            raise RuntimeError("out of memory")

    train = app(40, seed=1)
    ev = h.evaluate(app(40, seed=2), generators=[Broken(), ReplayGenerator(train)], train=train,
                    settings=h.Settings(n=10, n_instructions=0, utility=False))
    assert ev.scores[0].error == "RuntimeError: out of memory" and ev.scores[1].values["validity"] == 1.0


def test_files_are_scored_as_a_free_set():
    real = app(40, seed=1)
    ev = h.evaluate(real, synthetic={"mine": app(40, seed=4)}, settings=h.Settings(n=10, n_instructions=0,
                                                                                   utility=False))
    (s,) = ev.scores
    assert s.source == "files" and not s.heatmap and s.values["validity"] == 1.0
    assert "memorization" not in s.values  # no training traces given


# --- utility ---------------------------------------------------------------------------------------------------


def test_linear_classifiers_learn_a_separable_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] - 2 * x[:, 2] > 0.3).astype(int)
    for loss in ("logistic", "squared_hinge"):
        clf = LinearClassifier(loss).fit(x, y)
        assert (clf.predict(x) == y).mean() > 0.95
    const = LinearClassifier().fit(x, np.ones(200, dtype=int))
    assert set(const.predict(x)) == {1}
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 0.5
    assert top1_accuracy(np.array([0.1, 0.9, 0.5, 0.2]), np.array([0, 1, 1, 0]), np.array([0, 0, 1, 1])) == 1.0


def test_exclusive_time_and_critical_service_by_hand():
    tid = "t"
    spans = [Span(tid, "1", None, "a", "r", 0, 100), Span(tid, "2", "1", "b", "x", 10, 40),
             Span(tid, "3", "1", "c", "y", 30, 90), Span(tid, "4", "3", "d", "z", 40, 50)]
    ex = exclusive_time_ns(Trace(spans, tid))
    # a: 100 - union[10, 90] = 20; b: 30; c: 60 - 10 = 50; d: 10.
    assert ex == {"a": 20, "b": 30, "c": 50, "d": 10}
    assert critical_service(Trace(spans, tid)) == "c"
    # The entry is never the answer, even when it holds the most exclusive time.
    slow_gateway = [Span(tid, "1", None, "gw", "r", 0, 1000), Span(tid, "2", "1", "b", "x", 10, 40)]
    assert exclusive_time_ns(Trace(slow_gateway, tid)) == {"gw": 970, "b": 30}
    assert critical_service(Trace(slow_gateway, tid)) == "b"
    assert critical_service(Trace(slow_gateway[:1], tid)) is None


def test_utility_gap_is_zero_when_synthetic_is_the_real_training_set():
    train, test = app(120, seed=5), app(60, seed=6)
    p90 = {e: float(np.quantile([t.root.duration_ns / 1000 for t in train if m.entry_of(t) == e], 0.9))
           for e in {m.entry_of(t) for t in train}}
    u = utility(train, list(train), test, p90)
    assert u.gaps() == {"high_latency_balanced": 0.0, "high_latency_accuracy": 0.0, "critical_service": 0.0}
    assert u.train_sizes == {"real": 120, "synthetic": 120} and u.test_size == 60
    assert all(0 <= v <= 1 for v in u.critical_service.values())


# --- report ----------------------------------------------------------------------------------------------------


def test_report_writes_html_with_embedded_figures_and_markdown_with_files(tmp_path):
    from otel_tracegen.evaluate.report import metrics_json, write_report

    train = app(60, seed=1)
    ev = h.evaluate(app(60, seed=2), generators=[ReplayGenerator(train), ProbabilisticGenerator(train)], train=train,
                    settings=h.Settings(n=30, n_instructions=5))
    html_path, md_path = write_report(ev, tmp_path / "r.md")
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") >= 4 and "Against the paper" in page and "0.16" in page
    md = md_path.read_text()
    figures = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(figures) >= 4 and all((tmp_path / f).is_file() for f in figures)
    assert (tmp_path / figures[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("kl_popular_calls", "shape_precision", "memorization", "emd_response_time"):
        assert key in md and key in page
    import json

    data = json.loads(metrics_json(ev))
    assert data["metrics"]["memorization"]["replay"] == 1.0
    assert math.isclose(data["paper_comparison"]["replay"]["memorization"], 1.0)
