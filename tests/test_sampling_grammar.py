"""The constrained sampler's grammar without a model: every completion it allows is a valid step, and the
steps of a trace add up to exactly the calls and depth asked for.

The grammar is driven by stand-in "models" that pick among the allowed tokens uniformly at random, always the
first (fewest children, smallest numbers) or always the last (most children, largest numbers): if any path
through the masks led to an invalid trace, one of them would find it. No torch needed.
"""

from __future__ import annotations

import copy
import itertools
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_tracegen.encoding import Include, decode_trace, next_conditions, parse_step
from otel_tracegen.formats import read_traces
from otel_tracegen.report import ReadReport, UserError
from otel_tracegen.sampling import Catalog, IntSet, StepLimits, TraceRequest
from otel_tracegen.sampling.grammar import GrammarVocab, step_program, subtrees_fit
from otel_tracegen.trace import SpanKind
from otel_tracegen.validate import validate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trainticket"


# --- integers -----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=0, max_size=8), st.integers(0, 40000))
def test_intset_prefixes_match_brute_force(values, n):
    s = IntSet.of(sorted(set(values)))
    members = sorted(set(values))
    assert (n in s) == (n in members)
    for prefix in {str(n)[:k] for k in range(1, len(str(n)) + 1)} | {"0", "00", "01"}:
        want = any(str(m).startswith(prefix) for m in members)
        assert s.allows_prefix(prefix) == want, (members, prefix)


def _fits_by_enumeration(remaining, lower, depth, reached, upper=None, levels=None) -> bool:
    """``subtrees_fit`` by trying every (calls, depth) per child: calls up to ``remaining`` (and ``upper``), depth up
    to ``depth`` (and ``levels``)."""
    upper = upper if upper is not None else [remaining] * len(lower)
    levels = levels if levels is not None else [depth] * len(lower)
    options = []
    for lb, ub, lv in zip(lower, upper, levels):
        opts = [(c, d) for c in range(min(remaining, ub) + 1) for d in range(min(depth, lv) + 1)
                if (c == 0) == (d == 0) and d <= c and c >= lb and d >= lb]  # fmt: skip
        options.append(opts)
    for combo in itertools.product(*options):
        if sum(c for c, _ in combo) == remaining and (reached or any(d == depth for _, d in combo)):
            return True
    return not lower and remaining == 0 and reached


def test_subtrees_fit_matches_enumeration():
    for remaining, depth, reached in itertools.product(range(7), range(4), (False, True)):
        for lower in itertools.chain.from_iterable(itertools.product(range(3), repeat=k) for k in range(4)):
            assert subtrees_fit(remaining, list(lower), depth, reached) == _fits_by_enumeration(
                remaining, list(lower), depth, reached), (remaining, lower, depth, reached)


def test_subtrees_fit_with_per_child_limits_matches_enumeration():
    rng = random.Random(0)
    for remaining, depth, reached in itertools.product(range(8), range(4), (False, True)):
        for k in range(4):
            for _ in range(12):
                lower = [rng.randrange(3) for _ in range(k)]
                upper = [rng.randrange(6) for _ in range(k)]
                levels = [rng.randrange(4) for _ in range(k)]
                got = subtrees_fit(remaining, lower, depth, reached, upper, levels)
                assert got == _fits_by_enumeration(remaining, lower, depth, reached, upper, levels), (
                    remaining, lower, depth, reached, upper, levels)


# --- steps and traces ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab():
    from otel_tracegen.lm.tokenizer import TraceTokenizer

    traces = read_traces("spancsv", [EXAMPLES], ReadReport())
    from otel_tracegen.encoding import trace_to_text

    texts = []
    for t in traces:
        try:
            texts.append(trace_to_text(t))
        except Exception:  # noqa: BLE001 - traces the encoder refuses (orphans) are not training text either
            continue
    return GrammarVocab(TraceTokenizer.build(texts), Catalog.from_traces(traces))


def _policy(name: str, rng: random.Random):
    return {"uniform": rng.choice, "first": lambda spec: spec[0], "last": lambda spec: spec[-1]}[name]


def drive(vocab, cond, choose, limits, **kw):
    """Run one step's grammar with ``choose`` picking tokens; return the step and its completion tokens."""
    program = step_program(vocab, cond, limits, **kw)
    spec, tokens = next(program), []
    while True:
        assert spec, "the grammar allowed nothing"
        token = choose(spec)
        tokens.append(token)
        try:
            spec = program.send(token)
        except StopIteration as done:
            return done.value, tokens


def generate(vocab, request: TraceRequest, choose, limits):
    steps, queue = [], [request.conditions()]
    while queue:
        cond = queue.pop(0)
        kw = {"entry_service": request.service, "entry_operation": request.operation} if cond.client else {}
        step, tokens = drive(vocab, cond, choose, limits, **kw)
        # What the masks let through is text the parser reads back as the same step, except that a duration
        # written past the parent's window is clipped to it.
        written = parse_step(cond.text() + " <layer> " + vocab.tokenizer.decode(tokens))
        assert written.book == step.book and written.subs == step.subs
        for w, c in zip(written.calls, step.calls, strict=True):
            assert replace(w, duration=c.duration) == c and c.duration <= w.duration
            if cond.budget is not None and not cond.client:
                assert c.duration == min(w.duration, cond.budget - c.start)
        steps.append(step)
        queue.extend(next_conditions(step, i) for i, s in enumerate(step.subs) if s.calls > 0)
    return decode_trace(steps)


LIMITS = StepLimits(max_calls=60, max_depth=16, max_duration_us=10_000_000)


@pytest.mark.parametrize("policy", ["uniform", "first", "last"])
def test_every_calls_depth_request_is_met_exactly(vocab, policy):
    rng = random.Random(3)
    choose = _policy(policy, rng)
    grid = [(c, d) for c in (1, 2, 3, 5, 17, 40, 100) for d in (1, 2, 3, 8, 16) if d <= c and (d > 1 or c == 1)]
    for entry in vocab.catalog.entries:
        for calls, depth in grid:
            trace = generate(vocab, TraceRequest(service=entry, calls=calls, depth=depth), choose, LIMITS)
            assert validate(trace, expect_calls=calls, expect_depth=depth) == []
            assert trace.root.service == entry


@pytest.mark.parametrize("policy", ["uniform", "first", "last"])
def test_open_requests_are_valid_and_stay_within_the_limits(vocab, policy):
    choose = _policy(policy, random.Random(5))
    for _ in range(30):
        trace = generate(vocab, TraceRequest(), choose, LIMITS)
        assert validate(trace) == []
        assert len(trace) <= LIMITS.max_calls and trace.depth <= LIMITS.max_depth
        assert trace.root.service in vocab.catalog.entries


def test_latency_is_the_root_duration_and_children_stay_inside(vocab):
    choose = _policy("uniform", random.Random(11))
    for ms in (0.0, 0.5, 12.0, 250.0):
        trace = generate(vocab, TraceRequest(calls=12, depth=3, latency_ms=ms), choose, LIMITS)
        assert trace.root.duration_ns == round(ms * 1000) * 1000
        assert validate(trace, expect_calls=12, expect_depth=3) == []  # strict nesting: no tolerance


def test_services_operations_and_kinds_come_from_the_catalog(vocab):
    cat = vocab.catalog
    choose = _policy("uniform", random.Random(2))
    for _ in range(20):
        trace = generate(vocab, TraceRequest(calls=15, depth=4), choose, LIMITS)
        for span in trace:
            assert span.name in cat.operations[span.service]
            assert span.kind.name in cat.kinds(span.service, span.name)
            parent = trace.by_id.get(span.parent_id) if span.parent_id else None
            if parent is not None and cat.edges.get(parent.service):
                assert cat.calls(parent.service, span.service)


@pytest.mark.parametrize("policy", ["uniform", "first", "last"])
def test_sizes_seen_in_the_data_give_subtrees_the_data_could_hold(vocab, policy):
    """A request the data has seen (the sizes requests without --calls/--depth draw) is shaped at every step:
    each span's children are operations its operation was seen calling, no span has more children, and no subtree
    is larger or deeper, than any seen under its operation. Without shapes, a layer that closed early handed its last child the remainder
    (a 150-call error handler with 150 leaves)."""
    cat = vocab.catalog
    assert vocab.sized
    choose = _policy(policy, random.Random(6))
    sizes = [m for s in cat.entries for m in [(s, *x) for x in cat.size_mix(s)]]
    for service, op, calls, depth, _ in random.Random(1).sample(sizes, min(len(sizes), 25)):
        trace = generate(vocab, TraceRequest(service=service, operation=op, calls=calls, depth=depth), choose, LIMITS)
        assert validate(trace, expect_calls=calls, expect_depth=depth) == []
        below: dict[str, tuple[int, int]] = {}
        for span, _ in reversed(list(trace.walk())):
            kids = trace.children(span)
            below[span.span_id] = (sum(1 + below[c.span_id][0] for c in kids),
                                   1 + max((below[c.span_id][1] for c in kids), default=-1))
            st = cat.operations[span.service][span.name]
            assert below[span.span_id][0] <= st.max_calls and below[span.span_id][1] <= st.max_below, span.name
            assert len(kids) <= st.max_fanout, span.name
            for c in kids:
                assert (c.service, c.name) in cat.op_callees(span.service, span.name)


def _outside_the_data(cat, trace) -> int:
    """Spans with more children than any span of their operation had, or a child operation it was never seen
    calling."""
    out = 0
    for span in trace:
        kids = trace.children(span)
        st = cat.operations[span.service][span.name]
        out += len(kids) > st.max_fanout or any((c.service, c.name) not in cat.op_callees(span.service, span.name) for c in kids)
    return out


@pytest.mark.parametrize("policy", ["uniform", "first", "last"])
def test_includes_drawn_from_the_data_are_placed_along_operations_seen(vocab, policy):
    """The sizes and uncommon calls of the training traces (what requests without a size or instructions draw) give
    valid traces with the call asked for, and the steps that carry it are shaped too: the include goes to a child
    operation that leads to one seen making the call. Measured on these traces, the share of spans outside the
    data's operations and fan-outs (uniform / first / last): 0.2 / 0.0 / 0.8 %; with the include's steps left
    unshaped, 23.2 / 10.5 / 10.3 %."""
    cat = vocab.catalog
    choose = _policy(policy, random.Random(5))
    asked = [(s, m, e) for s in cat.entries for m in cat.trace_mix(s) for e in m.uncommon]
    assert len(asked) > 20
    spans = outside = 0
    for service, m, (a, b, kind) in asked:
        inc = Include(a, b, SpanKind[kind])
        req = TraceRequest(service=service, operation=m.operation, calls=m.calls, depth=m.depth, includes=(inc,))
        trace = generate(vocab, req, choose, LIMITS)
        assert validate(trace, expect_calls=m.calls, expect_depth=m.depth) == []
        assert (a, b, SpanKind[kind]) in _edge_pairs(trace), (a, b, kind, m)
        spans += len(trace)
        outside += _outside_the_data(cat, trace)
    assert outside / spans < 0.02, (outside, spans)


def test_the_catalog_mix_holds_each_training_traces_size_and_instructions(vocab):
    """``Catalog.mix`` records, per training trace, its size and the instructions the instruct stage derived from
    it (latency above the entry's p90; the uncommon calls it makes, one of which became its include)."""
    from collections import Counter

    from otel_tracegen.encoding import calls_among, derive_instructions, trace_latency_us
    from otel_tracegen.lm.data import corpus_stats_for_instructions

    traces = read_traces("spancsv", [EXAMPLES], ReadReport())
    cat = Catalog.from_traces(traces)
    stats = corpus_stats_for_instructions(traces)
    want, latencies, rng = Counter(), {}, random.Random(0)
    for t in traces:
        if t.root is None:  # the catalog counts single-rooted traces only
            continue
        entry = (t.root.service, t.root.name)
        try:
            made = calls_among(t, stats.uncommon[entry])
            derived = derive_instructions(t, stats.p90_us[entry], stats.uncommon[entry], rng=rng)
        except Exception:  # noqa: BLE001 - traces the encoding refuses were not instruct examples either
            continue
        assert derived.high_latency == (trace_latency_us(t) > stats.p90_us[entry])
        assert [(i.src, i.dst, i.kind) for i in derived.includes] in ([], *([e] for e in made))
        key = (entry[0], entry[1], len(t), t.depth, derived.high_latency, tuple(sorted((a, b, k.name) for a, b, k in made)))
        want[key] += 1
        latencies.setdefault(key, []).append(trace_latency_us(t))
    got = Counter({(s, m.operation, m.calls, m.depth, m.high_latency, m.uncommon): m.traces
                   for s in cat.entries for m in cat.trace_mix(s)})
    assert got == want and any(k[4] for k in got) and any(k[5] for k in got)
    assert {(s, m.operation, m.calls, m.depth, m.high_latency, m.uncommon): list(m.latencies_us)
            for s in cat.entries for m in cat.trace_mix(s)} == {k: sorted(v) for k, v in latencies.items()}
    assert Catalog.from_dict(cat.to_dict()).trace_mix(next(iter(cat.entries))) == cat.trace_mix(next(iter(cat.entries)))
    old = cat.to_dict()
    del old["mix"]  # a catalog written before the mix was recorded: its sizes, untagged
    entry = next(iter(cat.entries))
    assert {(m.operation, m.calls, m.depth, m.traces) for m in Catalog.from_dict(old).trace_mix(entry)} == set(cat.size_mix(entry))
    assert not any(m.high_latency or m.uncommon or m.latencies_us for m in Catalog.from_dict(old).trace_mix(entry))
    bad = copy.deepcopy(cat.to_dict())
    next(r for rows in bad["mix"][entry].values() for r in rows if r[3])[3][0][2] = "SIDEWAYS"
    with pytest.raises(UserError, match="catalog: malformed"):
        Catalog.from_dict(bad)
    # A catalog cut to a tokenizer's names keeps each trace's size, but not calls to services it cannot write.
    gone = next(b for m in cat.trace_mix(entry) for _, b, _ in m.uncommon if b != entry)
    cut = cat.restricted_to(set(cat.services) - {gone} | {o for ops in cat.operations.values() for o in ops})
    assert sum(m.traces for m in cut.trace_mix(entry)) == sum(m.traces for m in cat.trace_mix(entry))
    assert not any(gone in (a, b) for m in cut.trace_mix(entry) for a, b, _ in m.uncommon)


def test_a_size_beyond_the_data_is_met_without_shapes(vocab):
    """The data's limits never refuse a request: a step asked for more than its operation was seen holding is
    left to the request alone."""
    entry = next(iter(vocab.catalog.entries))
    calls = max(st.max_calls for st in vocab.catalog.operations[entry].values()) + 30
    trace = generate(vocab, TraceRequest(service=entry, calls=calls, depth=5), _policy("first", random.Random(0)), LIMITS)
    assert validate(trace, expect_calls=calls, expect_depth=5) == []


def _edge_pairs(trace):
    by = trace.by_id
    return {(by[s.parent_id].service, s.service, s.kind) for s in trace if s.parent_id}


@pytest.mark.parametrize("policy", ["uniform", "first", "last"])
def test_include_call_is_always_in_the_trace(vocab, policy):
    cat = vocab.catalog
    choose = _policy(policy, random.Random(8))
    entry = next(iter(cat.entries))
    hops = {src: cat.hops_to(src) for src in cat.edges}
    # Deep edges (far from the entry) are the hard ones: the path there must be kept open.
    edges = sorted(((a, b) for a, bs in cat.edges.items() for b in bs if entry in hops[a]), key=lambda e: -hops[e[0]][entry])
    assert edges
    for a, b in edges[:6]:
        need = hops[a][entry] + 2
        for calls, depth in ((need, need), (need + 10, need + 1), (40, 16)):
            if depth < need or depth > calls:
                continue
            kind = SpanKind[cat.kinds(b, next(iter(cat.operations[b])))[0]]
            inc = Include(a, b, kind)
            req = TraceRequest(service=entry, calls=calls, depth=depth, includes=(inc,))
            req.check(cat, LIMITS)
            trace = generate(vocab, req, choose, LIMITS)
            assert validate(trace, expect_calls=calls, expect_depth=depth) == []
            assert (a, b, kind) in _edge_pairs(trace), (a, b, calls, depth)


def test_high_latency_travels_to_every_subtree(vocab):
    choose = _policy("uniform", random.Random(4))
    req = TraceRequest(calls=20, depth=4, high_latency=True)
    steps, queue = [], [req.conditions()]
    while queue:
        cond = queue.pop(0)
        step, _ = drive(vocab, cond, choose, LIMITS)
        assert cond.high_latency
        steps.append(step)
        queue.extend(next_conditions(step, i) for i, s in enumerate(step.subs) if s.calls > 0)
    assert validate(decode_trace(steps), expect_calls=20, expect_depth=4) == []


def test_requests_the_model_cannot_meet_name_the_nearest_values(vocab):
    cat, limits = vocab.catalog, LIMITS
    entry = next(iter(cat.entries))
    with pytest.raises(UserError, match="nearest known"):
        TraceRequest(service=entry[:-1] + "x").check(cat, limits)
    with pytest.raises(UserError, match="above anything"):
        TraceRequest(depth=17).check(cat, limits)
    with pytest.raises(UserError, match="at least as many calls"):
        TraceRequest(calls=3, depth=4).check(cat, limits)
    a, b = next((a, b) for a in cat.services for b in cat.services if not cat.calls(a, b))
    with pytest.raises(UserError, match=f"{a} was never seen calling {b}"):
        TraceRequest(includes=(Include(a, b),)).check(cat, limits)
    two = tuple(Include(a, b) for a in cat.edges for b in cat.edges[a])[:2]
    with pytest.raises(UserError, match="one --include-call per trace, got 2"):
        TraceRequest(includes=two).check(cat, limits)
    with pytest.raises(UserError, match="needs --depth"):
        a = next(a for a in cat.edges if a != entry and a in cat.hops_to(a) and entry in cat.hops_to(a))
        TraceRequest(service=entry, depth=2, calls=10, includes=(Include(a, next(iter(cat.edges[a]))),)).check(cat, limits)


def test_catalog_round_trips_and_keeps_only_writable_names(vocab, tmp_path):
    cat = vocab.catalog
    (tmp_path / "config.json").write_text("{}")
    cat.save(tmp_path)
    again = Catalog.load(tmp_path)
    assert again.to_dict() == cat.to_dict()
    some = next(iter(cat.operations))
    assert some not in cat.restricted_to(set(cat.services) - {some}).operations
    with pytest.raises(UserError, match="no catalog.json"):
        Catalog.load(tmp_path / "nowhere")


def test_entries_are_drawn_from_the_training_mix_when_none_is_asked_for():
    from types import SimpleNamespace

    from otel_tracegen.sampling import TraceSampler
    from otel_tracegen.sampling.catalog import OperationStats

    ops = {s: {"op": OperationStats(1, {"SERVER": 1}, {"UNSET": 1})} for s in ("a", "b", "c", "d")}
    cat = Catalog(ops, {"a": {"c": 1}, "b": {"d": 1}, "c": {"d": 1}}, {"a": {"op": 300}, "b": {"op": 100}}, 400, 3, 5, 10)
    me = SimpleNamespace(catalog=cat)
    got = TraceSampler._with_entries(me, [TraceRequest()] * 4000, seed=1)
    share = sum(r.service == "a" for r in got) / len(got)
    assert 0.72 < share < 0.78  # 300 : 100 in the data
    assert [r.service for r in TraceSampler._with_entries(me, [TraceRequest()] * 50, seed=1)] == [
        r.service for r in TraceSampler._with_entries(me, [TraceRequest()] * 50, seed=1)]  # reproducible
    # A named entry is kept; an include only some entries reach narrows the draw to them.
    assert {r.service for r in TraceSampler._with_entries(me, [TraceRequest(service="b")] * 20, seed=2)} == {"b"}
    inc = TraceRequest(includes=(Include("c", "d"),), depth=3)
    assert {r.service for r in TraceSampler._with_entries(me, [inc] * 50, seed=3)} == {"a"}


def test_requests_without_a_size_or_instructions_take_those_of_a_training_trace():
    """The instruct adapter learned untagged steps only from traces that satisfy no instruction, so a plain request
    takes the latency and the instructions of the training trace it draws its size from: high latency alone when
    that trace was above its p90, else an include for one of its uncommon calls. Requests that give a size, a
    latency or an instruction keep what they asked for."""
    from types import SimpleNamespace

    from otel_tracegen.sampling import TraceSampler
    from otel_tracegen.sampling.catalog import OperationStats

    ops = {s: {"op": OperationStats(1, {"SERVER": 1}, {"UNSET": 1})} for s in ("a", "c", "d")}
    mix = {"a": {"op": [[3, 2, 0, [], 500, [1000] * 250 + [2000] * 250], [5, 3, 1, [["a", "c", "SERVER"]], 100, [9000] * 100],
                        [4, 3, 0, [["a", "c", "SERVER"], ["c", "d", "CLIENT"]], 400, [3000] * 400]]}}
    cat = Catalog(ops, {"a": {"c": 1}, "c": {"d": 1}}, {"a": {"op": 1000}}, 1000, 3, 5, 10, mix=mix)
    me = SimpleNamespace(catalog=cat, limits=StepLimits(max_calls=60, max_depth=16))
    got = TraceSampler._with_entries(me, [TraceRequest()] * 6000, seed=1)
    share = lambda pred: sum(map(pred, got)) / len(got)  # noqa: E731
    assert 0.47 < share(lambda r: not r.high_latency and not r.includes) < 0.53
    assert 0.08 < share(lambda r: r.high_latency) < 0.12 and not any(r.high_latency and r.includes for r in got)
    assert all((r.calls, r.depth, r.latency_ms) == (5, 3, 9.0) for r in got if r.high_latency)
    plain = [r.latency_ms for r in got if not r.high_latency and not r.includes]
    assert set(plain) == {1.0, 2.0} and 0.45 < plain.count(1.0) / len(plain) < 0.55  # the latency of one of its traces
    includes = [r.includes[0] for r in got if r.includes]
    assert {(i.src, i.dst, i.kind) for i in includes} == {("a", "c", SpanKind.SERVER), ("c", "d", SpanKind.CLIENT)}
    assert 0.45 < sum(i.dst == "d" for i in includes) / len(includes) < 0.55  # one of the trace's calls, evenly
    assert all((r.calls, r.depth, r.latency_ms) == (4, 3, 3.0) for r in got if r.includes)
    # What a request asks for is kept: a size (no tags drawn), a latency, high latency (a size among slow traces).
    assert TraceSampler._with_entries(me, [TraceRequest(calls=3, depth=2)], seed=1)[0] == TraceRequest(service="a", calls=3, depth=2)
    timed = TraceSampler._with_entries(me, [TraceRequest(latency_ms=5)] * 200, seed=2)
    assert {r.latency_ms for r in timed} == {5} and not any(r.high_latency or r.includes for r in timed)
    slow = TraceSampler._with_entries(me, [TraceRequest(high_latency=True)] * 200, seed=3)
    assert all((r.calls, r.depth, r.latency_ms, r.includes) == (5, 3, 9.0, ()) for r in slow)
