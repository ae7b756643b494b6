"""Fidelity metrics on small cases worked out by hand (the numbers in the comments), plus properties."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_tracegen.evaluate import metrics as m
from otel_tracegen.trace import Span, SpanKind, Trace


def tree(spec, trace_id="t1", start=0, dur=1000, kind=SpanKind.SERVER):
    """A trace from a nested spec: ``("svc", "op", [children...])``; children split the parent's window."""
    spans = []
    counter = [0]

    def add(node, parent, s, e):
        svc, op, kids = node
        counter[0] += 1
        sid = f"{counter[0]:016x}"
        spans.append(Span(trace_id, sid, parent, svc, op, s, e, kind))
        if kids:
            step = (e - s) // len(kids)
            for i, k in enumerate(kids):
                add(k, sid, s + i * step, s + (i + 1) * step)

    add(spec, None, start, start + dur)
    return Trace(spans, trace_id)


A = ("a", "get", [("b", "x", []), ("c", "y", [("d", "z", [])])])
A_SWAPPED = ("a", "get", [("c", "y", [("d", "z", [])]), ("b", "x", [])])
B = ("a", "get", [("b", "x", [])])
C = ("a", "post", [])


# --- popular calls and KL --------------------------------------------------------------------------------------


def test_popular_calls_count_parent_child_service_and_kind():
    calls = m.popular_calls([tree(A), tree(B, "t2")])
    assert calls == Counter({("a", "b", "SERVER"): 2, ("a", "c", "SERVER"): 1, ("c", "d", "SERVER"): 1})


def test_kl_identical_is_zero_and_hand_values():
    p = Counter({"x": 3, "y": 1})
    assert m.kl_divergence(p, Counter(p)) == 0.0
    # Same proportions, different sizes: 0 unsmoothed; smoothing pulls the small sample toward uniform a little.
    assert m.kl_divergence(p, Counter({"x": 30, "y": 10}), smoothing=0) == pytest.approx(0.0, abs=1e-12)
    assert 0 < m.kl_divergence(p, Counter({"x": 30, "y": 10})) < 0.01
    q = Counter({"x": 1, "y": 3})
    # Unsmoothed: 3/4 ln 3 + 1/4 ln(1/3) = 1/2 ln 3.
    assert m.kl_divergence(p, q, smoothing=0) == pytest.approx(0.5 * math.log(3))
    # Smoothed by 0.5 each: P = (0.7, 0.3), Q = (0.3, 0.7): 0.7 ln(7/3) + 0.3 ln(3/7) = 0.4 ln(7/3).
    assert m.kl_divergence(p, q) == pytest.approx(0.4 * math.log(7 / 3))


def test_kl_missing_call_is_infinite_unsmoothed_and_finite_smoothed():
    p, q = Counter({"x": 1, "y": 1}), Counter({"x": 2})
    assert m.kl_divergence(p, q, smoothing=0) == math.inf
    # Smoothed: P = (1.5/3, 1.5/3), Q = (2.5/3, 0.5/3): 0.5 ln(1.5/2.5) + 0.5 ln(1.5/0.5).
    assert m.kl_divergence(p, q) == pytest.approx(0.5 * math.log(0.6) + 0.5 * math.log(3))
    assert math.isnan(m.kl_divergence(Counter(), Counter()))
    # A generator that makes no call at all is not "close": nothing is compared.
    assert math.isnan(m.kl_divergence(Counter({"x": 100}), Counter()))


# --- heavy hitters ---------------------------------------------------------------------------------------------


def test_top_k_overlap_by_hand():
    real = Counter({"a": 10, "b": 8, "c": 5, "d": 1})
    syn = Counter({"a": 4, "d": 3, "c": 2, "b": 1})
    assert m.top_k(real, 2) == ["a", "b"]
    assert m.top_k_overlap(real, syn, 1) == 1.0
    assert m.top_k_overlap(real, syn, 2) == 0.5  # {a, b} vs {a, d}
    assert m.top_k_overlap(real, syn, 3) == pytest.approx(2 / 3)  # {a, b, c} vs {a, d, c}
    assert m.top_k_overlap(real, syn, 4) == 1.0
    assert m.top_k_overlap(real, Counter({"a": 1}), 4) == 0.25  # fewer present than K: still divided by K


def test_top_k_ties_break_by_name():
    assert m.top_k(Counter({"b": 2, "a": 2, "c": 3}), 2) == ["c", "a"]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefghij"), st.integers(1, 5)),
       st.dictionaries(st.sampled_from("abcdefghijkl"), st.integers(1, 5)))
def test_heavy_hitter_curve_equals_the_overlap_at_each_k(real, syn):
    real, syn = Counter(real), Counter(syn)
    ks = range(1, 13)
    assert m.heavy_hitter_curve(real, syn, ks) == {k: m.top_k_overlap(real, syn, k) for k in ks}


def test_heavy_hitter_curve_runs_from_five_to_the_number_present():
    real = Counter({f"s{i}": 10 - i for i in range(8)})
    curve = m.heavy_hitter_curve(real, Counter(real))
    assert sorted(curve) == [5, 6, 7, 8] and set(curve.values()) == {1.0}
    assert sorted(m.heavy_hitter_curve(Counter({"a": 1, "b": 1}), Counter())) == [2]


def test_call_counts_by_service_and_operation():
    traces = [tree(A), tree(B, "t2")]
    assert m.call_counts(traces) == Counter({"a": 2, "b": 2, "c": 1, "d": 1})
    assert m.call_counts(traces, "operation")[("a", "get")] == 2
    with pytest.raises(ValueError):
        m.call_counts(traces, "kind")


# --- EMD -------------------------------------------------------------------------------------------------------


def test_emd_identical_is_zero_and_shift_is_the_shift():
    a = list(range(100))
    assert m.wasserstein_1d(a, a) == 0.0
    assert m.normalized_emd(a, list(reversed(a))) == 0.0
    shifted = [x + 10 for x in a]
    assert m.wasserstein_1d(a, shifted) == pytest.approx(10.0)
    # Normalized by the real sample's range: 0 .. 99.
    assert m.normalized_emd(a, shifted) == pytest.approx(10 / 99)
    assert m.normalized_emd([5, 5], [5]) == 0.0
    assert m.normalized_emd([0], [3]) == 3.0  # a real range of 0 counts as 1: the distance itself


def test_emd_outliers_make_it_worse_not_better():
    real = list(range(101))
    worse = [x + 30 for x in real]
    assert m.normalized_emd(real, worse) == pytest.approx(30 / 100)
    assert m.normalized_emd(real, worse + [10_000_000]) > m.normalized_emd(real, worse)
    # log10(1 + µs): 9 and 99 µs are one decade apart.
    assert m.log_us([9, 99]) == pytest.approx([1.0, 2.0])


def test_wasserstein_by_hand_unequal_sizes():
    # CDFs of {0, 2} and {1}: |F-G| = 1/2 on [0,1), 1/2 on [1,2): area 1.
    assert m.wasserstein_1d([0, 2], [1]) == pytest.approx(1.0)
    # {0, 0, 3} vs {1}: 2/3 on [0,1), 1/3 on [1,3): 2/3 + 2/3.
    assert m.wasserstein_1d([0, 0, 3], [1]) == pytest.approx(4 / 3)


def test_wasserstein_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(4)
    for _ in range(20):
        a = [rng.expovariate(1) for _ in range(rng.randint(1, 50))]
        b = [rng.gauss(1, 2) for _ in range(rng.randint(1, 50))]
        assert m.wasserstein_1d(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-9, abs=1e-12)


samples = st.lists(st.integers(-1000, 1000), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(samples, samples, st.integers(-500, 500))
def test_emd_properties(a, b, c):
    d = m.wasserstein_1d(a, b)
    assert d >= 0 and d == pytest.approx(m.wasserstein_1d(b, a))
    assert m.wasserstein_1d(a, [x + c for x in a]) == pytest.approx(abs(c))
    assert m.normalized_emd(a, b) >= 0 and m.normalized_emd(a, a) == 0


def test_emd_by_service_counts_missing_services_as_one():
    real = {"a": [1, 2, 3], "b": [10, 10], "rare": [1]}
    res = m.emd_by_service(real, {"a": [1, 2, 3]}, min_samples=2)
    assert res.services == {"a": 0.0, "b": 1.0}  # "rare" has fewer than 2 real values
    assert res.per_service == pytest.approx((3 * 0.0 + 2 * 1.0) / 5)


def test_node_degrees_and_response_times():
    t = tree(("a", "get", [("b", "x", []), ("b", "y", [("c", "z", [])])]), dur=900)
    ins, outs = m.node_degrees([t])
    assert ins == {"a": [1], "b": [2], "c": [1]}
    assert outs == {"a": [2], "b": [1], "c": [0]}
    rts = m.response_times([t])
    assert rts["a"] == [0.9] and sorted(rts["b"]) == [0.45, 0.45]


# --- shapes and memorization -----------------------------------------------------------------------------------


def test_shape_ignores_child_order_and_times():
    assert m.shape(tree(A)) == m.shape(tree(A_SWAPPED, dur=5000))
    assert m.shape(tree(A)) != m.shape(tree(B))
    assert m.shape(tree(A)) == ("a", "get", (("b", "x", ()), ("c", "y", (("d", "z", ()),))))


def test_shape_precision_coverage_jsd_by_hand():
    real = m.shape_counts([tree(A), tree(A_SWAPPED, "t2"), tree(B, "t3")])  # A: 2, B: 1
    syn = m.shape_counts([tree(A, "s1"), tree(C, "s2")])  # A: 1, C: 1
    r = m.shape_metrics(real, syn)
    assert r.precision == 0.5 and r.coverage == pytest.approx(2 / 3)
    # P = (A 2/3, B 1/3, C 0), Q = (A 1/2, B 0, C 1/2); M = (7/12, 1/6, 1/4).
    p, q, mm = [2 / 3, 1 / 3, 0], [1 / 2, 0, 1 / 2], [7 / 12, 1 / 6, 1 / 4]
    jsd = sum(0.5 * x * math.log2(x / y) for x, y in zip(p, mm) if x) + sum(
        0.5 * x * math.log2(x / y) for x, y in zip(q, mm) if x)
    assert r.jsd == pytest.approx(jsd)
    assert m.shape_metrics(real, Counter(real)).jsd == 0.0
    assert m.shape_metrics(real, m.shape_counts([tree(C)])).jsd == 1.0


def test_orphans_start_subtrees_of_their_own():
    t = tree(A)
    d = next(s for s in t.spans if s.service == "d")
    c = next(s for s in t.spans if s.service == "c")
    broken = Trace([s for s in t.spans if s is not c], "t1")  # d's parent is gone: d is an orphan
    assert m.shape(broken) == ("", "", tuple(sorted([("a", "get", (("b", "x", ()),)), ("d", "z", ())])))
    orphans_only = Trace([d], "t1")
    assert m.shape(orphans_only) == ("d", "z", ())
    other = Trace([Span("t9", "9", "gone", "e", "q", 0, 1)], "t9")
    assert m.shape(orphans_only) != m.shape(other)  # two rootless traces do not match unless their trees do


def test_memorization_survives_broken_traces():
    t = tree(B)
    dup = Trace(t.spans + [t.spans[1]], "t1")  # a duplicated span id
    r = m.memorization([dup, tree(B)], [dup, tree(B, "s")])
    assert r.exact_copies == pytest.approx(0.5)  # the broken trace has no modelled view: it copies nothing
    assert r.shape == 1.0


def test_memorization_shape_and_exact_copies():
    train = [tree(A), tree(B, "t2", dur=2000)]
    syn = [tree(A, "s1"), tree(A_SWAPPED, "s2"), tree(B, "s3", dur=3000), tree(C, "s4")]
    r = m.memorization(train, syn)
    assert r.shape == pytest.approx(3 / 4)  # A, A swapped (order-free) and B match shapes; C doesn't
    assert r.exact_copies == pytest.approx(1 / 4)  # only s1 is A in every field (times differ in the others)
    assert m.memorization(m.TrainingIndex.of(train), syn) == r
