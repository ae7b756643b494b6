"""Feature prediction from partial traces: what is read, the labels, the heads, and ``otel-tracegen predict``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from otel_tracegen.formats import write_traces
from otel_tracegen.lm.data import corpus_stats_for_instructions
from otel_tracegen.predict import PartialTrace, labels
from otel_tracegen.predict.predictor import Predictor, balanced_accuracy
from otel_tracegen.trace import Resource, Span, SpanKind, Trace

from .cli_helpers import EXAMPLES, one_thread, run  # noqa: F401  (one_thread: torch on one thread in this module)

MS = 1_000_000


def request(i: int, rng: random.Random, *, slow_path: bool, extra_call: bool = False) -> Trace:
    """frontend -> (cart | checkout) -> db. The checkout path is slow; ``extra_call`` adds a rare audit call deep
    down (not in the first layer)."""
    tid = f"{i:032x}"
    kid = "checkout" if slow_path else "cart"
    dur = int((40 if slow_path else 5) * MS * (1 + 0.2 * rng.random()))
    spans = [Span(tid, f"{i:08x}00000001", None, "frontend", "GET /", 0, dur, kind=SpanKind.SERVER),
             Span(tid, f"{i:08x}00000002", f"{i:08x}00000001", kid, f"{kid}.Get", MS, dur - MS, kind=SpanKind.SERVER),
             Span(tid, f"{i:08x}00000003", f"{i:08x}00000002", "db", "SELECT", 2 * MS, 3 * MS, kind=SpanKind.CLIENT)]
    if extra_call:
        spans.append(Span(tid, f"{i:08x}00000004", f"{i:08x}00000003", "audit", "log", 2 * MS, 2 * MS + 10,
                          kind=SpanKind.INTERNAL))  # fmt: skip
    for s in spans:
        s.resource = Resource({"service.name": s.service})
    return Trace(spans)


def corpus(n: int, seed: int) -> list[Trace]:
    rng = random.Random(seed)
    return [request(i + seed * 10_000, rng, slow_path=rng.random() < 0.15, extra_call=rng.random() < 0.05)
            for i in range(n)]  # fmt: skip


def test_a_partial_trace_is_the_root_and_first_layer_without_times():
    rng = random.Random(0)
    a, b = request(1, rng, slow_path=True), request(2, rng, slow_path=True, extra_call=True)
    for s in b:
        s.start_ns += 7 * MS
        s.end_ns += 9 * MS
    assert PartialTrace.of(a) == PartialTrace.of(b) == PartialTrace(
        "frontend", "GET /", "SERVER", (("checkout", "checkout.Get", "SERVER"),))
    assert PartialTrace.of(Trace([s for s in a if s.parent_id])) is None  # no root: nothing to predict from


def test_labels_follow_the_train_split_statistics():
    train = corpus(400, 1)
    stats = corpus_stats_for_instructions(train)
    slow = request(9, random.Random(1), slow_path=True)
    fast = request(8, random.Random(1), slow_path=False, extra_call=True)
    assert labels(slow, stats) == {"high-latency": True, "uncommon-call": False}
    assert labels(fast, stats) == {"high-latency": False, "uncommon-call": True}  # audit is in under 10 %
    stranger = request(7, random.Random(1), slow_path=False)
    stranger.spans[0].name = "POST /other"
    stranger.invalidate()
    assert labels(stranger, stats) is None  # an entry the train split never saw


def test_the_count_head_learns_what_the_first_layer_says():
    train, test = corpus(600, 1), corpus(300, 2)
    pred = Predictor.fit(train)  # no model: the counts head only
    assert {m for m, _ in pred.heads.values()} == {"hand"}
    stats = corpus_stats_for_instructions(train)
    out = pred.predict(test)
    truth = [labels(t, stats)["high-latency"] for t in test]
    guess = [r["high-latency"]["prediction"] for r in out]
    assert balanced_accuracy(guess, truth) > 0.95  # the checkout path is the slow one
    rare = [labels(t, stats)["uncommon-call"] for t in test]
    assert balanced_accuracy([r["uncommon-call"]["prediction"] for r in out], rare) < 0.7  # invisible from layer 1


def test_heads_round_trip_through_predict_json(tmp_path):
    pred = Predictor.fit(corpus(300, 1))
    pred.save_pretrained(tmp_path)
    back = Predictor.from_pretrained(tmp_path)
    test = corpus(50, 3)
    assert back.predict(test) == pred.predict(test)
    with pytest.raises(Exception, match="no prediction heads"):
        Predictor.from_pretrained(tmp_path / "nowhere")


def test_model_features_are_the_same_for_the_same_partial_trace():
    from otel_tracegen.lm.model import load_model
    from otel_tracegen.predict.features import ModelFeatures

    lm = load_model(dtype="float32", device="cpu")
    before = lm.model.active_adapter
    feats = ModelFeatures(lm)
    def gateway(callee: str, op: str) -> PartialTrace:
        return PartialTrace("ts-gateway-service", "/*", "UNSPECIFIED", ((callee, op, "UNSPECIFIED"),))

    travel = gateway("ts-travel-service", "/api/v1/travelservice/trips/left")
    order = gateway("ts-order-service", "/api/v1/orderservice/order/refresh")
    ps = [travel, order, travel, gateway("no-such-service", "nothing")]
    x = feats(ps)
    assert x.shape == (4, 3 * lm.model.config.hidden_size)
    assert bool((x[0] == x[2]).all()) and not bool((x[0] == x[1]).all()) and not bool((x[0] == x[3]).all())
    assert lm.model.active_adapter == before  # read with the base weights, then left as it was


def test_predict_command_fits_heads_and_answers(tmp_path):
    from otel_tracegen.dataset import build_corpus

    model = tmp_path / "model"
    model.mkdir()
    shipped = Path(__file__).resolve().parents[1] / "model"
    for f in shipped.iterdir():  # the shipped model, without its heads
        if f.name != "predict.json":
            (model / f.name).symlink_to(f)
    build_corpus("spancsv", [EXAMPLES], tmp_path / "corpus")
    rc, _, err = run("predict", "--fit", str(tmp_path / "corpus"), "--model", str(model))
    assert rc == 0, err
    assert (model / "predict.json").is_file() and "wrote" in err
    write_traces("otlp-json", corpus(5, 4), tmp_path / "partial.jsonl")
    rc, out, err = run("predict", "--model", str(model), "--json", str(tmp_path / "partial.jsonl"))
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 5 and all(set(r) >= {"trace_id", "entry", "high-latency", "uncommon-call"} for r in rows)
    rc, out, err = run("predict", "--model", str(model), "--task", "high-latency", str(tmp_path / "partial.jsonl"))
    assert rc == 0 and "high-latency: " in out and "uncommon-call" not in out and "5 traces:" in err
    assert "(entry not seen in training)" in out and "5 traces enter at an entry the heads never saw" in err
    rc, _, err = run("predict", "--model", str(model))
    assert rc != 0 and "give partial trace files" in err
