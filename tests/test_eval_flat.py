"""The GReaT-style flat baseline (``otel_tracegen.evaluate.flat``): the table encoding and its round trip, named
parse errors, ``train --stage flat`` through the CLI (tiny config, a few steps) and the :class:`FlatTableGenerator`
on the trained model and on a scripted runtime (for the paths a barely trained model never takes)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from otel_tracegen.encoding import NS_PER_US
from otel_tracegen.evaluate.flat import (
    ROW_TOKENS,
    FlatEncodeError,
    FlatParseError,
    FlatTableGenerator,
    TableHeader,
    parse_table,
    table_to_trace,
    trace_rows,
    trace_to_table,
)
from otel_tracegen.evaluate.generators import Generated, Generator
from otel_tracegen.lm.tokenizer import TraceTokenizer
from otel_tracegen.report import UserError
from otel_tracegen.sampling import TraceRequest
from otel_tracegen.trace import Span, SpanKind, Status, StatusCode, Trace
from otel_tracegen.validate import validate

from .strategies import exact_spans, traces

T0 = 1_700_000_000_000_000_000


def span(sid: str, parent: str | None, service: str, name: str, start_us: int, end_us: int,
         kind: SpanKind = SpanKind.SERVER, code: StatusCode = StatusCode.UNSET) -> Span:
    return Span("t1", sid, parent, service, name, T0 + start_us * NS_PER_US + 17, T0 + end_us * NS_PER_US + 17,
                kind, Status(code))  # fmt: skip


def small_trace() -> Trace:
    """root(frontend) -> [cart -> [redis], checkout (error)]; given out of order."""
    return Trace([
        span("d", "b", "redis", "HGET", 30, 40, SpanKind.CLIENT),
        span("c", "a", "checkout", "PlaceOrder", 200, 900, code=StatusCode.ERROR),
        span("a", None, "frontend", "GET /cart", 0, 1000),
        span("b", "a", "cart", "oteldemo.CartService/GetCart", 10, 150),
    ])  # fmt: skip


def tree(trace: Trace) -> tuple:
    """Everything the table models, independent of row order and ids: each span's service, name, kind, status code
    and µs times floored from the root's start, with its children as a sorted multiset."""
    root = trace.root
    assert root is not None

    def node(s: Span) -> tuple:
        q = lambda t: (t - root.start_ns) // NS_PER_US
        kids = tuple(sorted(node(k) for k in trace.children(s)))
        return (s.service, s.name, int(s.kind), int(s.status.code), q(s.start_ns), q(s.end_ns), kids)

    return node(root)


# --- the encoding ---------------------------------------------------------------------------------------------


def test_table_has_a_header_and_one_row_per_span_in_pre_order():
    t = small_trace()
    text = trace_to_table(t)
    lines = text.split("\n")
    assert lines[0] == '<cond> svc=frontend op="GET /cart" calls=4 depth=3 <layer>'
    assert lines[1] == '<call> 0 src=-1 svc=frontend op="GET /cart" kind=SERVER start=0 dur=1000 status=UNSET'
    assert lines[2] == "<call> 1 src=0 svc=cart op=oteldemo.CartService/GetCart kind=SERVER start=10 dur=140 status=UNSET"
    assert lines[3] == "<call> 2 src=1 svc=redis op=HGET kind=CLIENT start=30 dur=10 status=UNSET"
    assert lines[4] == "<call> 3 src=0 svc=checkout op=PlaceOrder kind=SERVER start=200 dur=700 status=ERROR"
    assert lines[5:] == ["<end>"]
    # Pre-order as Trace.walk visits it.
    assert [(s.service, s.name) for s, _ in t.walk()] == [(r.service, r.operation) for r in trace_rows(t)]


def test_round_trip_ids_and_times_anchored_at_zero():
    t = small_trace()
    back = table_to_trace(trace_to_table(t), id_seed=5)
    assert tree(back) == tree(t)
    assert back.root.start_ns == 0 and back.root.end_ns == 1000 * NS_PER_US
    assert len(back.trace_id) == 32 and all(len(s.span_id) == 16 for s in back.spans)
    assert int(back.trace_id, 16) > 0 and all(int(s.span_id, 16) > 0 for s in back.spans)  # hex
    assert exact_spans(table_to_trace(trace_to_table(t), id_seed=5).spans) == exact_spans(back.spans)
    assert table_to_trace(trace_to_table(t), id_seed=6).trace_id != back.trace_id
    assert validate(back, expect_calls=4, expect_depth=3) == []
    assert table_to_trace(trace_to_table(t), trace_id="ab" * 16, start_ns=T0).root.start_ns == T0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(max_spans=8, rich=False))
def test_round_trip_preserves_the_modelled_fields(t):
    text = trace_to_table(t)
    header, _ = parse_table(text)
    # The header states what validate() checks a request by.
    assert header == TableHeader(t.root.service, t.root.name, len(t), t.depth)
    back = table_to_trace(text, id_seed=1)
    assert tree(back) == tree(t)
    assert validate(back, expect_calls=header.calls, expect_depth=header.depth) == []
    assert trace_to_table(back) == text  # a function of the modelled fields only
    # The existing lexicon carries it: the tokenizer class reads and writes it back with no new token.
    tok = TraceTokenizer.build([text])
    assert tree(table_to_trace(tok.decode(tok.encode(text).ids))) == tree(t)


def test_header_fields_are_dropped_with_the_rng():
    t = small_trace()
    assert trace_to_table(t, drop_prob=1.0, rng=random.Random(0)).split("\n")[0] == "<cond> <layer>"
    heads = {trace_to_table(t, drop_prob=0.5, rng=random.Random(s)).split("\n")[0] for s in range(40)}
    assert len(heads) > 4 and '<cond> svc=frontend op="GET /cart" calls=4 depth=3 <layer>' in heads
    a = [trace_to_table(t, drop_prob=0.5, rng=random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(ValueError, match="rng"):
        trace_to_table(t, drop_prob=0.5)


def test_traces_a_table_cannot_hold_are_refused_by_name():
    two_roots = Trace([span("a", None, "x", "op", 0, 10), span("b", None, "y", "op", 0, 10)])
    with pytest.raises(FlatEncodeError, match="2 roots"):
        trace_to_table(two_roots)
    orphan = Trace([span("a", None, "x", "op", 0, 10), span("b", "zz", "y", "op", 0, 10)])
    with pytest.raises(FlatEncodeError, match="not reachable"):
        trace_to_table(orphan)


GOOD = trace_to_table(small_trace())
ROWS = GOOD.split("\n")


def edit(line: int, old: str, new: str) -> str:
    rows = list(ROWS)
    assert old in rows[line]
    rows[line] = rows[line].replace(old, new, 1)
    return "\n".join(rows)


@pytest.mark.parametrize(("text", "row", "message"), [
    ("\n".join(ROWS[:-1]), None, "the table has no <end> (cut off after 4 rows?)"),
    ("\n".join(ROWS[:3]), None, "no <end>"),
    (edit(2, "<call> 1", "<call> 2"), 1, "row 1: is numbered 2"),
    (edit(3, "src=1", "src=7"), 2, "row 2: has unknown parent 7 (a parent is an earlier row, 0..1)"),
    (edit(3, "src=1", "src=2"), 2, "row 2: has unknown parent 2"),
    (edit(1, "src=-1", "src=0"), 0, "row 0 is the root: its parent must be src=-1"),
    (edit(4, "src=0", "src=-1"), 3, "row 3: has parent src=-1 but only row 0 is the root"),
    (edit(2, " op=oteldemo.CartService/GetCart", ""), 1, "row 1: missing op= (found kind=)"),
    (edit(2, "src=0 ", ""), 1, "row 1: missing src= (found svc=)"),
    (edit(3, "kind=CLIENT", "kind=SIDEWAYS"), 2, "row 2: unknown span kind 'SIDEWAYS'"),
    (edit(4, "status=ERROR", "status=BROKEN"), 3, "row 3: unknown status 'BROKEN'"),
    (edit(3, "dur=10", "dur=redis"), 2, "row 2: dur= needs an integer, found 'redis'"),
    (edit(2, "svc=cart", "svc=cart <eos>"), 1, "row 1: missing op= (found <eos>)"),
    (edit(2, "svc=cart", "svc=7"), 1, "row 1: svc= needs a string, found 7"),
    (edit(1, "start=0", "start=5"), 0, "the root starts at start=5"),
    (edit(0, "calls=4", "dur=4"), None, "unexpected dur= in the header"),
    (edit(0, "depth=3", "calls=3"), None, "the header has calls= twice"),
    ("<cond> calls=1 <layer> <end>", None, "the table has no rows"),
    ("<cond> calls=1 <layer>", None, "the table has no rows"),
    ("<call> 0 src=-1", None, "a table starts with its header <cond>, found <call>"),
    ("<cond> svc=a", None, "the header never ends (no <layer>)"),
    (GOOD + " <call> 4", None, "text continues after <end>: <call>"),
    (edit(4, "<call> 3", "<book> 3"), None, "expected the next row's <call> or <end> after row 2, found <book>"),
    (edit(3, "svc=redis", 'svc="redis'), 2, "row 2: cannot read the text (at character"),
    (edit(0, "svc=frontend", "svc=front+end"), None, "cannot read the text (at character 11: cannot read 'front+end'"),
])  # fmt: skip
def test_malformed_tables_name_the_problem(text, row, message):
    with pytest.raises(FlatParseError) as e:
        table_to_trace(text)
    assert message in str(e.value)
    assert e.value.row == row


# --- training through the CLI -----------------------------------------------------------------------------------

pytest.importorskip("torch")
pytest.importorskip("transformers")

from otel_tracegen.cli import ExitStatus
from otel_tracegen.lm import model as lm

from .cli_helpers import FAST, one_thread, run  # noqa: F401 - one_thread: autouse fixture


@pytest.fixture(scope="module")
def flat_model(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flat") / "model"
    rc, _, err = run("train", "--stage", "flat", "--corpus", str(corpus), "--out", str(out), "--config", "tiny",
                     "--max-steps", "24", "--eval-every", "12", "--lr", "3e-3", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    assert "flat tiny:" in err
    return out


def test_flat_stage_trains_like_pretrain_and_records_the_baseline(flat_model):
    card = json.loads((flat_model / lm.TRAINING_JSON).read_text())
    assert card["encoding"] == "flat" and set(card["stages"]) == {"flat"}
    s = card["stages"]["flat"]
    assert s["steps"] == 24 and [h["step"] for h in s["history"]] == [0, 12, 24]
    assert s["history"][-1]["train"] < s["history"][0]["train"] - 0.5, s["history"]
    # The same budget as pretrain: the preset's architecture, its context as the block, the batch size.
    assert card["config"]["hidden_size"] == lm.PRESETS["tiny"].hidden_size
    assert s["block_size"] == lm.PRESETS["tiny"].max_position_embeddings
    assert s["args"]["batch_size"] == 8 and s["args"]["flat_drop_prob"] == 0.25
    assert (flat_model / "model.safetensors").is_file() and (flat_model / "catalog.json").is_file()
    assert (flat_model / "checkpoint" / "flat" / "state.pt").is_file()
    loaded = lm.load_model(flat_model, device="cpu", backend="runtime")
    assert loaded.backend == "runtime" and loaded.adapters == []


def test_flat_stage_trains_on_tables(corpus, flat_model):
    from otel_tracegen.dataset import load_corpora
    from otel_tracegen.lm.train import TrainConfig, make_split

    _, splits = load_corpora([str(corpus)])
    tok = TraceTokenizer.from_pretrained(flat_model)
    cfg = TrainConfig(stage="flat", corpus=[str(corpus)], out="unused", workers=1)
    split = make_split("flat", splits["train"][:4], tok, 64, cfg, 0, False)
    text = " ".join(tok.decode(row.tolist()) for row in split.blocks)
    assert "src=" in text and "<call>" in text and "<book>" not in text and "<sub>" not in text
    assert len(split.blocks) > 10


def test_flat_and_recursive_models_never_share_a_directory(corpus, flat_model, tmp_path):
    rc, _, err = run("train", "--stage", "instruct", "--corpus", str(corpus), "--out", str(flat_model),
                     "--max-steps", "1", *FAST)
    assert rc == ExitStatus.ERROR and "holds the flat baseline" in err
    recursive = tmp_path / "recursive"
    recursive.mkdir()
    (recursive / lm.TRAINING_JSON).write_text(json.dumps({"stages": {"pretrain": {}}}))
    rc, _, err = run("train", "--stage", "flat", "--corpus", str(corpus), "--out", str(recursive), "--max-steps", "1")
    assert rc == ExitStatus.ERROR and "holds a recursive model (stages pretrain)" in err
    rc, _, err = run("train", "--stage", "flat", "--corpus", str(corpus), "--out", str(tmp_path / "x"),
                     "--init", str(flat_model))
    assert rc == ExitStatus.ERROR and "--init do not apply" in err
    with pytest.raises(UserError, match="no model directory"):
        FlatTableGenerator.from_pretrained(tmp_path / "missing")
    with pytest.raises(UserError, match="not a flat baseline model .*stages: pretrain"):
        FlatTableGenerator.from_pretrained(recursive)
    loaded = lm.load_model(flat_model, device="cpu", backend="runtime")
    loaded.training = {"stages": {"pretrain": {}}}
    with pytest.raises(UserError, match="not a flat baseline model"):
        FlatTableGenerator(loaded)


def test_generator_on_the_trained_model(flat_model, corpus):
    gen = FlatTableGenerator.from_pretrained(flat_model, device="cpu")
    assert isinstance(gen, Generator) and gen.name == "flat" and gen.honours == {"entry", "calls", "depth"}
    tok = gen.tokenizer
    service = next(s for s in ("ts-gateway-service", "ts-ui-dashboard") if tok.str_id(s) != tok.unk_id)
    requests = [TraceRequest(service=service, calls=2, depth=2), TraceRequest(), TraceRequest(calls=1, depth=1),
                TraceRequest(service="no-such-service"), TraceRequest(service=service, operation="/*")]
    seen: list[int] = []
    a = gen.generate(requests, seed=3, progress=seen.append)
    b = gen.generate(requests, seed=3)
    assert len(a) == len(requests) and all(isinstance(g, Generated) for g in a) and sum(seen) == len(requests)

    def view(gs):
        return [(g.problem, None if g.trace is None else exact_spans(g.trace.spans)) for g in gs]

    assert view(a) == view(b)
    assert a[3].trace is None and "'no-such-service' is not in the model's vocabulary" in a[3].problem
    for g in a:  # a 24-step tiny model: traces or named problems, never an exception
        assert (g.trace is not None and g.problem == "") or (g.trace is None and g.problem)
        if g.trace is not None:
            assert g.trace.root.start_ns == 0


# --- the generator on a scripted runtime -----------------------------------------------------------------------


class ScriptedRuntime:
    """Stands in for ``TraceLMRuntime.sample``: each row's completion is one of ``outputs``, picked with the
    generator (so the seed matters); records what it was asked."""

    def __init__(self, outputs: list[list[int]], context: int = 4096):
        import torch

        self.outputs = outputs
        self.config = type("Config", (), {"max_position_embeddings": context})()
        self.device = torch.device("cpu")
        self.calls: list[dict] = []
        self.adapter = "unset"

    def set_adapter(self, name):
        self.adapter = name

    def sample(self, prompts, *, max_new_tokens, eos_id, pad_id, temperature, generator):
        import torch

        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "eos_id": eos_id,
                           "temperature": temperature})
        picks = torch.randint(len(self.outputs), (len(prompts),), generator=generator).tolist()
        return [list(self.outputs[k]) for k in picks]


def scripted(outputs: list, **kw) -> tuple[FlatTableGenerator, ScriptedRuntime, TraceTokenizer]:
    """A generator on a runtime that writes ``outputs`` (texts, or token ids for what text cannot say)."""
    tok = TraceTokenizer.build([GOOD])
    runtime = ScriptedRuntime([tok.encode(t).ids if isinstance(t, str) else t for t in outputs])
    loaded = lm.LoadedModel(model=runtime, tokenizer=tok, path=Path("scripted"), device="cpu", adapters=[],
                            training={"encoding": "flat", "stages": {"flat": {}}}, backend="runtime")
    return FlatTableGenerator(loaded, **kw), runtime, tok


BODY = GOOD.split("<layer>", 1)[1]  # what the model writes after the prompt: rows and <end>
OTHER = BODY.replace("dur=700", "dur=650")


def test_requests_put_their_conditions_in_the_header():
    gen, runtime, tok = scripted([BODY], temperature=0.7)
    reqs = [TraceRequest(service="frontend", operation="GET /cart", calls=5, depth=3), TraceRequest(),
            TraceRequest(calls=4, high_latency=True)]
    out = gen.generate(reqs, seed=0)
    prompts = [tok.decode(p) for p in runtime.calls[0]["prompts"]]
    assert prompts == ['<cond> svc=frontend op="GET /cart" calls=5 depth=3 <layer>', "<cond> <layer>",
                       "<cond> calls=4 <layer>"]
    assert all(p[0] == tok.bos_id for p in runtime.calls[0]["prompts"])
    assert runtime.calls[0]["eos_id"] == tok.mark_id("end") and runtime.calls[0]["temperature"] == 0.7
    assert runtime.adapter is None
    # Free sampling parsed: the scripted table, with the request's calls/depth checked by the validator.
    assert all(g.trace is not None and g.problem == "" for g in out)
    assert tree(out[0].trace) == tree(small_trace())
    assert validate(out[0].trace, expect_calls=4, expect_depth=3) == []
    assert [v.kind.value for v in validate(out[0].trace, expect_calls=5, expect_depth=3)] != []
    # The budget follows the request: rows for calls=5 and slack, bounded by the global cap.
    assert gen.token_bound(reqs[0], 10) == ROW_TOKENS * (5 + 1 + 2) + 1
    assert gen.token_bound(reqs[1], 10) == 4096 - 10
    assert runtime.calls[0]["max_new_tokens"] == 4096 - len(runtime.calls[0]["prompts"][1])


def test_same_seed_same_traces_fresh_ids_root_at_zero():
    gen, runtime, _ = scripted([BODY, OTHER], batch_size=3)
    reqs = [TraceRequest(calls=4, depth=3) for _ in range(7)]

    def view(gs):
        return [(g.problem, exact_spans(g.trace.spans)) for g in gs]

    a, b = gen.generate(reqs, seed=11), gen.generate(reqs, seed=11)
    assert view(a) == view(b) and len(runtime.calls) == 6  # three batches per run
    c = gen.generate(reqs, seed=12)
    assert {g.trace.trace_id for g in a}.isdisjoint(g.trace.trace_id for g in c)
    assert len({g.trace.trace_id for g in a}) == 7  # fresh ids per request
    place_order = {next(s.end_ns - s.start_ns for s in g.trace.spans if s.name == "PlaceOrder") for g in a}
    assert place_order == {700_000, 650_000}  # both scripted tables were drawn, by the seeded generator
    assert all(g.trace.root.start_ns == 0 and g.trace.root.parent_id is None for g in a)


def test_unparseable_output_is_a_problem_not_an_exception():
    bad_parent = BODY.replace("<call> 2 src=1", "<call> 2 src=9")
    cut = BODY.replace("<end>", "")
    tok = TraceTokenizer.build([GOOD])
    head, tail = BODY.split("svc=redis")
    stray = tok.encode(head + "svc=redis").ids + [tok.eos_id] + tok.encode(tail).ids  # text cannot hold <eos>
    gen, runtime, tok = scripted([bad_parent])
    (g,) = gen.generate([TraceRequest(calls=4)], seed=0)
    assert g.trace is None and g.problem == "unparseable: row 2: has unknown parent 9 (a parent is an earlier row, 0..1)"
    gen, _, _ = scripted([cut])
    (g,) = gen.generate([TraceRequest(calls=4)], seed=0)
    assert g.trace is None and g.problem == f"unparseable: no <end> within {ROW_TOKENS * 7 + 1} new tokens"
    gen, _, _ = scripted([cut])
    gen.context = 60  # the context, not the request, bounds this one
    (g,) = gen.generate([TraceRequest()], seed=0)
    assert g.trace is None and "no <end> within 57 new tokens (what the model's context of 60 leaves" in g.problem
    gen, _, _ = scripted([stray])
    (g,) = gen.generate([TraceRequest()], seed=0)
    assert g.trace is None and g.problem.startswith("unparseable: row 2:") and "<eos>" in g.problem
    gen, runtime, _ = scripted([BODY])
    out = gen.generate([TraceRequest(service="unheard-of"), TraceRequest(), TraceRequest(operation="nope")], seed=0)
    assert [g.trace is None for g in out] == [True, False, True]
    assert out[0].problem == "entry service 'unheard-of' is not in the model's vocabulary"
    assert out[2].problem == "entry operation 'nope' is not in the model's vocabulary"
    assert len(runtime.calls[0]["prompts"]) == 1  # the unknown entries never reached the model


def test_generator_refuses_a_model_not_on_the_runtime():
    tok = TraceTokenizer.build([GOOD])
    loaded = lm.LoadedModel(model=None, tokenizer=tok, path=Path("x"), device="cpu", adapters=[],
                            training={"stages": {"flat": {}}}, backend="transformers")
    with pytest.raises(ValueError, match="backend='runtime'"):
        FlatTableGenerator(loaded)


def test_copied_flat_model_still_loads(flat_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(flat_model, copy)
    gen = FlatTableGenerator.from_pretrained(copy, device="cpu", temperature=0.0)
    assert gen.temperature == 0.0 and gen.context == lm.PRESETS["tiny"].max_position_embeddings


def test_flat_vs_recursive_script_trains_both_at_one_budget_and_scores_them(corpus, tmp_path):
    """``scripts/flat_vs_recursive.sh`` end to end with a tiny budget: both models trained with the same preset,
    steps, batch and block, then one report with the model and the flat baseline side by side."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "flat_vs_recursive.sh"
    out = tmp_path / "fvr"
    env = {**os.environ, "N": "3", "N_INSTRUCTIONS": "1"}
    run = subprocess.run(["bash", str(script), str(corpus), str(out), "tiny", "3", "4"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    args = {}
    for name, stage in (("rec", "pretrain"), ("flat", "flat")):
        training = json.loads((out / name / "training.json").read_text())
        a = training["stages"][stage]["args"]
        args[name] = {k: a[k] for k in ("config", "max_steps", "batch_size", "block_size", "text_passes", "seed")}
    assert args["rec"] == args["flat"] == {"config": "tiny", "max_steps": 3, "batch_size": 4, "block_size": 0,
                                           "text_passes": 3, "seed": 0}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["generators"]) == {"model", "flat", "replay", "probabilistic"}
    assert metrics["settings"]["n"] == 3
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    free = json.loads((out / "free_running.json").read_text())
    assert free["n"] == 3 and free["adapter"] is None and "comparison" in free  # grammar-free samples, scored
