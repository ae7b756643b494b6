"""Failure localization: the ranking and its evidence on traces with a known cause, synthetic incidents, and the
``localize`` command end to end. The real labelled faults are measured by ``benchmarks/localize.py``; one of them
is checked here when ``../shared`` is present."""

from __future__ import annotations

import json
import re
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_tracegen.formats import spancsv, write_traces
from otel_tracegen.incident import DELAY_ATTRIBUTE, LatencyIncident, delayed_spans
from otel_tracegen.localize import Profile, localize, parse_time, parse_window, self_time_ns
from otel_tracegen.localize.ranking import rank_by_call_frequency, rank_by_median_self_time
from otel_tracegen.report import UserError
from otel_tracegen.trace import Resource, Span, SpanKind, Trace
from otel_tracegen.validate import validate

from .cli_helpers import one_thread, run  # noqa: F401  (one_thread: torch on one thread in this module)
from .strategies import traces as trace_strategy

MS = 1_000_000
T0 = 1_700_000_000 * 10**9

# gateway -> A -> B, each hop a client span in the caller and a server span in the callee; B also reads a DB.
#   name: (service, operation, kind, parent)
CHAIN = {
    "root": ("gateway", "GET /", SpanKind.SERVER, None),
    "gw-client": ("gateway", "HTTP POST", SpanKind.CLIENT, "root"),
    "a-server": ("svc-a", "POST /a", SpanKind.SERVER, "gw-client"),
    "a-client": ("svc-a", "HTTP GET", SpanKind.CLIENT, "a-server"),
    "b-server": ("svc-b", "GET /b", SpanKind.SERVER, "a-client"),
    "b-db": ("svc-b", "SELECT items", SpanKind.CLIENT, "b-server"),
    "c-side": ("svc-c", "audit", SpanKind.INTERNAL, "a-server"),
}


def chain_trace(i: int, rng: random.Random, *, slow: dict[str, float] | None = None, start_ns: int = T0) -> Trace:
    """One request through CHAIN. Every span does ~1-2 ms of its own work (jittered); ``slow`` adds ms of own work
    to the named spans (a client span's own time is its network gap)."""
    slow = slow or {}
    own = {k: int((1 + rng.random()) * MS + slow.get(k, 0) * MS) for k in CHAIN}
    kids = {k: [c for c, v in CHAIN.items() if v[3] == k] for k in CHAIN}
    spans = []

    def place(name: str, at: int) -> int:
        """Lay ``name`` out from ``at``: half its own work, then its children one after another, then the rest."""
        t = at + own[name] // 2
        for c in kids[name]:
            t = place(c, t)
        end = t + own[name] - own[name] // 2
        svc, op, kind, parent = CHAIN[name]
        spans.append(Span(f"{i:032x}", f"{i:08x}{list(CHAIN).index(name):08x}",
                          None if parent is None else f"{i:08x}{list(CHAIN).index(parent):08x}", svc, op, at, end,
                          kind=kind, resource=Resource({"service.name": svc})))  # fmt: skip
        return end

    place("root", start_ns)
    return Trace(spans)


def chains(n: int, seed: int, **kw) -> list[Trace]:
    rng = random.Random(seed)
    start = kw.pop("start_ns", T0)
    return [chain_trace(i + seed * 10_000, rng, start_ns=start + i * 100 * MS, **kw) for i in range(n)]


# --- the ranking ----------------------------------------------------------------------------------------------


def test_slow_own_work_is_charged_to_its_service_not_to_the_callers_that_wait_for_it():
    base = chains(40, 1)
    window = chains(30, 2, slow={"b-db": 8})
    loc = localize(window, base)
    assert loc.ranking[0] == "svc-b"
    top = loc.suspects[0].evidence[0]
    assert (top.kind, top.operation, top.caller) == ("self-time", "SELECT items", "svc-b GET /b")
    assert top.window_median_us > 8_000 > 3 * top.baseline_median_us
    assert top.traces_affected == 30 and len(top.examples) == 3
    assert top.route == ["gateway GET /", "gateway HTTP POST", "svc-a POST /a", "svc-a HTTP GET", "svc-b GET /b",
                         "svc-b SELECT items"]  # fmt: skip
    # the callers are slower end to end, but their own time is not: they rank below
    assert loc.rank_of("gateway") > 1 and loc.rank_of("svc-a") > 1


def test_a_slow_network_into_a_service_is_charged_to_that_service():
    loc = localize(chains(30, 2, slow={"a-client": 8}), chains(40, 1))
    assert "svc-b" in loc.ranking[:2]
    gap = next(e for e in loc.suspects[loc.rank_of("svc-b") - 1].evidence if e.kind == "call-gap")
    assert (gap.operation, gap.caller) == ("GET /b", "svc-a HTTP GET")
    assert gap.route[-1] == "svc-b GET /b"


def test_nothing_changed_means_no_strong_suspect():
    loc = localize(chains(30, 3), chains(40, 1))
    assert all(s.score < 0.5 for s in loc.suspects)  # jitter only: medians move by a fraction of themselves


def test_one_slow_trace_is_weak_evidence():
    from otel_tracegen.localize import ranking

    base = chains(40, 1)
    window = chains(30, 2)
    # svc-c's audit runs in every baseline trace but in only one window trace, 50 ms slow there
    window = [Trace([s for s in t if s.service != "svc-c"]) for t in window[1:]] + [
        chain_trace(99, random.Random(0), slow={"c-side": 50})]
    loc = localize(window, base)
    audit = loc.suspects[loc.rank_of("svc-c") - 1].evidence[0]
    assert audit.window_spans == 1 and audit.window_median_us > 50_000
    w, b = Profile.of(window), Profile.of(base)
    ctx = ("svc-a", "POST /a", "svc-c", "audit")
    full = ranking._shift(w.self_times[ctx], b.self_times[ctx], support=1)  # as if one trace were enough
    assert audit.shift == pytest.approx(full / 25)  # one trace of the five asked for: (1/5)^2
    # a modest slowdown in every trace outranks a large one in a single trace
    rest = [Trace([s for s in t if s.service != "svc-c"]) for t in chains(29, 3, slow={"b-db": 3})]
    assert localize(rest + window[-1:], base).ranking[0] == "svc-b"


def test_only_services_of_the_window_are_ranked_and_a_context_without_baseline_does_not_score():
    base = [t for t in chains(40, 1)]
    window = chains(20, 2, slow={"b-db": 5})
    extra = chain_trace(7, random.Random(1))
    for s in extra:
        s.service = "svc-new" if s.service == "svc-c" else s.service
    loc = localize(window + [extra], base)
    assert set(loc.ranking) == {"gateway", "svc-a", "svc-b", "svc-c", "svc-new"}
    assert loc.suspects[loc.rank_of("svc-new") - 1].evidence == []


def test_baselines_rank_what_they_measure():
    base, window = Profile.of(chains(40, 1)), Profile.of(chains(30, 2, slow={"b-db": 8}))
    assert rank_by_median_self_time(window, base)[0] == "svc-b"
    no_db = [Trace([s for s in t if s.name != "SELECT items"]) for t in chains(30, 2)]  # svc-b makes half its spans
    assert rank_by_call_frequency(Profile.of(no_db), base)[0] == "svc-b"
    assert rank_by_call_frequency(Profile.of(chains(30, 2)), base) == sorted(["gateway", "svc-a", "svc-b", "svc-c"])


def test_self_time_is_the_part_no_child_covers():
    parent = Span("t", "p", None, "s", "op", 0, 100)
    kids = [Span("t", "a", "p", "s", "x", 10, 40), Span("t", "b", "p", "s", "y", 30, 60), Span("t", "c", "p", "s", "z", 90, 130)]
    assert self_time_ns(parent, kids) == 100 - 50 - 10  # [10,60) merged, [90,100) clipped
    assert self_time_ns(parent, []) == 100


# --- windows ----------------------------------------------------------------------------------------------------


def test_windows_read_iso_epoch_and_relative_ends():
    assert parse_time("2023-01-29T08:43:04Z") == parse_time("2023-01-29 08:43:04") == 1674981784 * 10**9
    assert parse_time("1674981784") == parse_time("1674981784000") == parse_time("1674981784000000000")
    w = parse_window("2023-01-29T08:43:04Z..+2m")
    assert w.end_ns - w.start_ns == 120 * 10**9
    assert parse_window("1674981784..1674981904") == w
    for bad, why in (("2023-01-29", "not a window"), ("08:43..", "not a window"), ("x..y", "not a time: 'x'"),
                     ("1674981904..1674981784", "ends before it starts"), ("1674981904..+0s", "is empty"),
                     ("1674981904..+2 m", "not a relative end: '+2 m'"), ("1674981904..-2m", "not a relative end")):
        with pytest.raises(UserError, match=re.escape(why)):
            parse_window(bad)


# --- synthetic incidents ----------------------------------------------------------------------------------------


def test_an_injected_delay_moves_the_trace_as_a_synchronous_call_graph_would():
    t = chain_trace(1, random.Random(0))
    before = {s.span_id: s for s in t}
    hit = LatencyIncident("svc-b", 10).apply(t)
    after = {s.span_id: s for s in hit}
    delay = 10 * MS
    for name, (svc, _, _, _) in CHAIN.items():
        sid = f"{1:08x}{list(CHAIN).index(name):08x}"
        d_before, d_after = before[sid].duration_ns, after[sid].duration_ns
        if name in ("root", "gw-client", "a-server", "a-client", "b-server"):
            assert d_after == d_before + delay, name  # b-server itself and everything waiting on it
        elif name == "c-side":  # runs after the slow call: moved, not stretched
            assert (after[sid].start_ns - before[sid].start_ns, d_after) == (delay, d_before)
        else:  # b-db ran before b-server's extra work
            assert after[sid] == before[sid]
    assert [s.service for s in delayed_spans(hit)] == ["svc-b"]
    assert validate(t) == [] and validate(hit) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace_strategy(min_spans=1, max_spans=8, rich=False), st.floats(0.001, 50), st.data())
def test_injection_keeps_every_child_inside_a_parent_it_was_inside(trace, delay_ms, data):
    service = data.draw(st.sampled_from(sorted({s.service for s in trace})))
    hit = LatencyIncident(service, delay_ms).apply(trace)
    old, new = trace.by_id, hit.by_id
    assert len(hit) == len(trace)
    for s in trace:
        p = old.get(s.parent_id) if s.parent_id else None
        assert new[s.span_id].duration_ns >= s.duration_ns  # nothing shrinks
        if p is not None and p.start_ns <= s.start_ns and s.end_ns <= p.end_ns:
            q, c = new[p.span_id], new[s.span_id]
            assert q.start_ns <= c.start_ns and c.end_ns <= q.end_ns
    marked = delayed_spans(hit)
    assert marked and all(s.service == service for s in marked)
    assert all(s.parent_id not in hit.by_id or hit.by_id[s.parent_id].service != service for s in marked)
    assert sum(s.attributes[DELAY_ATTRIBUTE] for s in marked) == pytest.approx(delay_ms * len(marked))


def test_a_share_of_traces_is_hit_the_same_way_every_run():
    ts = chains(200, 5)
    inc = LatencyIncident("svc-b", 5, share=0.25, seed=3)
    hit = [t.trace_id for t in ts if inc.hits(t)]
    assert 25 <= len(hit) <= 75
    assert hit == [t.trace_id for t in ts if LatencyIncident("svc-b", 5, share=0.25, seed=3).hits(t)]
    assert not LatencyIncident("svc-zzz", 5).hits(ts[0])


@pytest.mark.parametrize("text", ["svc-b", "svc-b=", "=5", "svc-b=fast", "svc-b=0", "svc-b=-3"])
def test_a_bad_incident_is_refused_with_what_was_wrong(text):
    with pytest.raises(UserError):
        LatencyIncident.parse(text)


def test_an_injected_incident_is_found_by_localize():
    base, window = chains(40, 1), chains(30, 2)
    for target in ("svc-a", "svc-b", "svc-c"):
        inc = LatencyIncident(target, 5)
        assert localize([inc.apply(t) for t in window], base).ranking[0] == target


# --- the command --------------------------------------------------------------------------------------------------


def test_localize_command_ranks_and_explains(tmp_path):
    write_traces("otlp-json", chains(40, 1), tmp_path / "base.jsonl")
    write_traces("otlp-json", chains(30, 2, slow={"b-db": 8}), tmp_path / "incident.jsonl")
    rc, out, err = run("localize", "--traces", str(tmp_path / "incident.jsonl"), "--baseline", str(tmp_path / "base.jsonl"),
                       "--top", "2")  # fmt: skip
    assert rc == 0, err
    assert out.splitlines()[2].startswith("1. svc-b ")
    assert "self-time of 'SELECT items': median" in out and "route: gateway GET / -> " in out and "2. " in out
    rc, out, err = run("localize", "--traces", str(tmp_path / "incident.jsonl"), "--baseline", str(tmp_path / "base.jsonl"),
                       "--json")  # fmt: skip
    d = json.loads(out)
    assert d["suspects"][0]["service"] == "svc-b" and d["window_traces"] == 30 and d["baseline_traces"] == 40
    assert d["suspects"][0]["evidence"][0]["examples"][0]["trace_id"]


def test_localize_command_takes_a_window_of_one_capture_and_the_minutes_before_it(tmp_path):
    normal = chains(40, 1, start_ns=T0)
    incident = chains(30, 2, slow={"b-db": 8}, start_ns=T0 + 3600 * 10**9)
    write_traces("otlp-json", normal + incident, tmp_path / "day.jsonl")
    rc, out, err = run("localize", "--traces", str(tmp_path / "day.jsonl"), "--window", f"{(T0 // 10**9) + 3600}..+10m")
    assert rc == 0, err
    assert "30 traces" in out.splitlines()[0] and "40 traces from the traces before the window" in out.splitlines()[0]
    assert out.splitlines()[2].startswith("1. svc-b ")
    rc, out, err = run("localize", "--traces", str(tmp_path / "day.jsonl"), "--window", f"{T0 // 10**9 + 3600}..+10m",
                       "--baseline-window", f"{T0 // 10**9}..+10m")  # fmt: skip
    assert rc == 0 and out.splitlines()[2].startswith("1. svc-b ")


@pytest.mark.parametrize("argv, message", [
    (["--window", "2030-01-01T00:00:00Z..+2m"], "no trace starts in the window 2030-01-01T00:00:00.000Z"),
    ([], "without --window every trace is examined"),
    (["--window", "1700000000..+1s"], "no baseline traces in the traces before the window"),
])  # fmt: skip
def test_localize_command_says_what_is_missing(tmp_path, argv, message):
    write_traces("otlp-json", chains(5, 1), tmp_path / "t.jsonl")
    rc, out, err = run("localize", "--traces", str(tmp_path / "t.jsonl"), *argv)
    assert rc != 0 and message in err, err


def test_localize_command_refuses_a_bad_window(tmp_path, capsys):
    write_traces("otlp-json", chains(5, 1), tmp_path / "t.jsonl")
    rc, _, _ = run("localize", "--traces", str(tmp_path / "t.jsonl"), "--window", "yesterday")
    assert rc == 2 and "argument --window: not a window: 'yesterday'" in capsys.readouterr().err


# --- a real labelled fault (skipped without ../shared) ------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "nezha-trainticket"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets/nezha-trainticket is not on this machine")
def test_a_real_network_delay_fault_is_ranked_first_from_its_capture_files():
    traces = SHARED / "traces"
    files = sorted(traces.glob("fault_2023-01-30_11_*.csv.gz")) + [traces / "faultfree_2023-01-30_11_39_trace.csv.gz"]
    rc, out, err = run("localize", "--traces", *map(str, files), "--window", "2023-01-30 11:51:46..+2m", "--top", "3")
    assert rc == 0, err
    label = json.loads((SHARED / "labels" / "2023-01-30-fault_list.json").read_text())["11"][0]
    assert label["inject_type"] == "network_delay"
    assert out.splitlines()[2].startswith(f"1. {spancsv.service_from_pod(label['inject_pod'])} ")
    assert "latency of calls into" in out


# --- the trace model as the baseline --------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trainticket"


def test_model_baseline_generates_for_the_window_entries_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = ["localize", "--traces", str(EXAMPLES), "--model-baseline", "--model-traces", "3", "--top", "2"]
    rc, out, err = run(*argv)
    assert rc == 0, err
    first = out.splitlines()[0]
    assert "40 traces" in first and "baseline: 3 traces from the trace model (generated for the window's entry points)" in first
    assert out.splitlines()[2].startswith("1. ")
    cached = list((tmp_path / "cache" / "otel-tracegen" / "baselines").glob("*.otlp.jsonl"))
    assert len(cached) == 1
    from otel_tracegen.formats import read_traces

    assert {t.root.service for t in read_traces("otlp-json", cached)} == {"ts-gateway-service"}  # the window's entry
    rc2, out2, _ = run(*argv)
    assert rc2 == 0 and out2 == out  # the cached traces: the same ranking, without generating again


def test_model_baseline_names_entries_the_model_does_not_know(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_traces("otlp-json", chains(5, 1), tmp_path / "t.jsonl")
    rc, _, err = run("localize", "--traces", str(tmp_path / "t.jsonl"), "--model-baseline", "--model-traces", "2")
    assert rc != 0 and "knows none of the window's entry points (gateway GET /)" in err, err
    assert "skipping entry gateway GET /: unknown" in err


def test_generate_injects_a_labelled_incident(tmp_path):
    out, label = tmp_path / "chaos.jsonl", tmp_path / "label.json"
    rc, _, err = run("generate", "--count", "4", "--service", "ts-gateway-service", "--seed", "3", "--batch-size", "4",
                     "--inject-latency", "ts-gateway-service=25", "--incident-label", str(label), "--out", str(out))  # fmt: skip
    assert rc == 0, err
    assert "incident: 25 ms injected at ts-gateway-service in 4 of 4 traces" in err
    truth = json.loads(label.read_text())
    assert truth | {"start": 0, "end": 0} == {"incident": "latency", "service": "ts-gateway-service", "delay_ms": 25.0,
                                              "share": 1.0, "traces_hit": 4, "traces": 4, "start": 0, "end": 0}  # fmt: skip
    from otel_tracegen.formats import read_traces

    traces = read_traces("otlp-json", [out])
    assert all(len(delayed_spans(t)) >= 1 and t.root.attributes.get(DELAY_ATTRIBUTE) == 25.0 for t in traces)
    assert truth["start"] == min(t.start_ns for t in traces) and truth["end"] == max(t.end_ns for t in traces)


@pytest.mark.parametrize("argv, message", [
    (["--inject-latency", "ts-gateway-service"], "not an incident: 'ts-gateway-service'"),
    (["--inject-share", "0.5"], "--inject-share and --incident-label go with --inject-latency"),
    (["--inject-latency", "ts-basic-servce=5"], "unknown service for --inject-latency 'ts-basic-servce'"),
    (["--inject-latency", "ts-basic-service=5", "--inject-share", "1.5"], "share of traces hit must be in (0, 1]"),
])  # fmt: skip
def test_generate_refuses_a_bad_incident(tmp_path, argv, message):
    rc, _, err = run("generate", "--count", "1", "--out", str(tmp_path / "x.jsonl"), *argv)
    assert rc != 0 and message in err, err


def test_recent_traces_are_bounded_by_age_and_spans():
    from otel_tracegen.localize.recent import RecentTraces
    from otel_tracegen.localize.window import TimeWindow

    ts = chains(10, 1)  # 7 spans each
    recent = RecentTraces(keep_s=60, max_spans=50)
    recent.add(ts[:5], now_ns=0)
    recent.add(ts[5:], now_ns=10**9)
    assert len(recent) == 7 and recent.spans == 49  # 70 spans held at most 50: the three oldest went
    assert [t.trace_id for t in recent.select(TimeWindow(0, 2**63 - 1), now_ns=10**9)] == [t.trace_id for t in ts[3:]]
    recent.add([], now_ns=61 * 10**9)  # a minute later the first batch's survivors are too old
    assert len(recent) == 5


def test_the_incident_is_never_its_own_baseline(tmp_path):
    write_traces("otlp-json", chains(40, 1) + chains(30, 2, slow={"b-db": 8}), tmp_path / "all.jsonl")
    write_traces("otlp-json", chains(30, 2, slow={"b-db": 8}), tmp_path / "incident.jsonl")
    rc, out, err = run("localize", "--traces", str(tmp_path / "incident.jsonl"), "--baseline", str(tmp_path / "all.jsonl"))
    assert rc == 0 and "30 baseline traces are also in the window; they are left out" in err
    assert "baseline: 40 traces" in out.splitlines()[0] and out.splitlines()[2].startswith("1. svc-b ")
    rc, _, err = run("localize", "--traces", str(tmp_path / "all.jsonl"), "--window", f"{T0 // 10**9}..+10m",
                     "--baseline-window", f"{T0 // 10**9 + 60}..+1h")  # fmt: skip
    assert rc != 0 and "overlaps the window" in err


def test_json_has_no_infinities_and_scoreless_services_say_so(tmp_path):
    base = chains(40, 1)
    window = chains(20, 2)
    for s in window[0]:
        if s.service == "svc-c":
            s.service = "svc-new"  # nothing to compare it with
    write_traces("otlp-json", base, tmp_path / "b.jsonl")
    write_traces("otlp-json", window, tmp_path / "w.jsonl")
    rc, out, err = run("localize", "--traces", str(tmp_path / "w.jsonl"), "--baseline", str(tmp_path / "b.jsonl"), "--json")
    assert rc == 0, err
    d = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    new = next(s for s in d["suspects"] if s["service"] == "svc-new")
    assert new["score"] is None and new["rank"] == d["services"]
    rc, out, _ = run("localize", "--traces", str(tmp_path / "w.jsonl"), "--baseline", str(tmp_path / "b.jsonl"), "--top", "9")
    assert "svc-new  (score no baseline;" in out


def test_injection_spares_an_async_parent_moves_events_and_keeps_duplicates():
    from otel_tracegen.trace import Event

    tid = "ab" * 16
    producer = Span(tid, "01", None, "web", "publish", 0, 1 * MS, kind=SpanKind.PRODUCER)
    consumer = Span(tid, "02", "01", "worker", "consume", 5 * MS, 9 * MS, kind=SpanKind.CONSUMER,
                    events=[Event(8 * MS, "done")])  # fmt: skip
    after = Span(tid, "03", "02", "worker", "ack", 7 * MS, 8 * MS, events=[Event(7 * MS + 5, "acked")])
    hit = LatencyIncident("worker", 20).apply(Trace([producer, consumer, after, replace_span(after)]))
    got = {}
    for s in hit:
        got.setdefault(s.span_id, []).append(s)
    assert (got["01"][0].start_ns, got["01"][0].end_ns) == (0, 1 * MS)  # the producer had ended: it did not wait
    assert got["02"][0].end_ns == 29 * MS and got["02"][0].events[0].time_ns == 8 * MS  # before the delay: stays
    assert len(got["03"]) == 2 and all((s.start_ns, s.end_ns) == (7 * MS, 8 * MS) for s in got["03"])  # inside
    tail = LatencyIncident("web", 20).apply(Trace([producer, consumer, after]))
    moved = {s.span_id: s for s in tail}
    assert moved["02"].start_ns == 25 * MS and moved["03"].events[0].time_ns == 7 * MS + 5 + 20 * MS


def replace_span(s: Span) -> Span:
    from dataclasses import replace

    return replace(s, attributes=dict(s.attributes))


@pytest.mark.parametrize("text", ["svc=inf", "svc=nan"])
def test_a_delay_must_be_finite(text):
    with pytest.raises(UserError):
        LatencyIncident.parse(text)


def test_structure_probe_charges_missing_calls_within_an_api():
    """``scripts/localize_structure_probe.py`` (the probe behind docs/localize.md's structure table): a service
    that stops making a call ranks first, and a trace's API is its root operation and first other service."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "localize_structure_probe.py"
    spec = importlib.util.spec_from_file_location("localize_structure_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    baseline = chains(40, 1)
    assert probe.api_of(baseline[0]) == ("GET /", "svc-a", "POST /a")
    window = [Trace([s for s in t if s.name != "SELECT items"]) for t in chains(20, 2)]  # svc-b throws before its DB
    assert probe.rank_by_structure(window, probe.by_api(baseline))[0] == "svc-b"
    same = probe.rank_by_structure(chains(20, 3), probe.by_api(baseline))
    assert sorted(same) == ["gateway", "svc-a", "svc-b", "svc-c"]  # nothing changed: all tie at 0, by name
    assert same == sorted(same)
