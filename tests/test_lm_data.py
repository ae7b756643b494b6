"""Training examples for pretrain, instruct and infill, and their tensors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_tracegen import encoding as enc
from otel_tracegen.formats import spancsv
from otel_tracegen.lm import data as D
from otel_tracegen.lm.tokenizer import TraceTokenizer
from otel_tracegen.trace import Span, SpanKind, Trace
from tests.strategies import traces

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trainticket"
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MS = 1_000_000


@pytest.fixture(scope="module")
def real() -> list[Trace]:
    ok, bad = D.encodable(spancsv.read(sorted(EXAMPLES.glob("*.csv.gz"))))
    assert len(ok) == 38 and bad == 2
    return ok


@pytest.fixture(scope="module")
def tok(real) -> TraceTokenizer:
    return TraceTokenizer.build(D.step_texts(real))


def synthetic(n: int = 20) -> list[Trace]:
    """``n`` traces of fe GET / -> cart (SERVER); trace i lasts (i+1) ms; only trace 0 also calls fe -> pay (CLIENT)."""
    out = []
    for i in range(n):
        tid = f"{i + 1:032x}"
        spans = [
            Span(tid, "a" * 16, None, "fe", "GET /", 0, (i + 1) * MS),
            Span(
                tid,
                "b" * 16,
                "a" * 16,
                "cart",
                "GetCart",
                10_000,
                20_000,
                SpanKind.SERVER,
            ),
            Span(
                tid,
                "d" * 16,
                "b" * 16,
                "redis",
                "HGET",
                12_000,
                15_000,
                SpanKind.CLIENT,
            ),
        ]
        if i == 0:
            spans.append(
                Span(
                    tid,
                    "c" * 16,
                    "a" * 16,
                    "pay",
                    "Charge",
                    30_000,
                    40_000,
                    SpanKind.CLIENT,
                )
            )
        out.append(Trace(spans, tid))
    return out


# --- pretrain -------------------------------------------------------------------------------------------------


def test_pretrain_text_per_step_with_entry_service_kept(real):
    n_steps = sum(len(enc.encode_trace(t)) for t in real)
    texts = list(D.pretrain_texts(real, random.Random(0)))
    assert len(texts) == n_steps
    assert texts == list(D.pretrain_texts(real, random.Random(0)))  # reproducible
    for text in texts:
        step = enc.parse_step(text, check=False)
        c = step.conditions
        assert c.client or c.service is not None  # <client> or svc= always kept
    full = [s.text() for t in real for s in enc.encode_trace(t)]
    # with p = 0.9 most condition fields are gone, so the texts are shorter than the full ones
    assert sum(map(len, texts)) < sum(map(len, full))
    # no dropping, only shuffling: the same steps, fields in other orders
    kept = list(D.pretrain_texts(real, random.Random(1), drop_prob=0.0))
    assert [enc.parse_step(t) for t in kept] == [enc.parse_step(t) for t in full]


# --- instruct -------------------------------------------------------------------------------------------------


def test_instruction_stats_p90_and_uncommon_calls():
    stats = D.corpus_stats_for_instructions(synthetic())
    entry = ("fe", "GET /")
    assert stats.traces == {entry: 20}
    assert stats.p90_us[entry] == pytest.approx(18_100)  # latencies 1000..20000 µs
    assert stats.uncommon[entry] == {("fe", "pay", SpanKind.CLIENT)}  # 1 of 20 traces, under 10 %
    ins = [stats.instructions(t) for t in synthetic()]
    assert [i.high_latency for i in ins] == [False] * 18 + [True] * 2
    assert [bool(i.includes) for i in ins] == [True] + [False] * 19


def test_instruct_examples_alone_and_combined():
    ts = synthetic()
    ts[0] = Trace(
        [
            Span(
                s.trace_id,
                s.span_id,
                s.parent_id,
                s.service,
                s.name,
                s.start_ns,
                s.end_ns if s.parent_id else 50 * MS,
                s.kind,
            )
            for s in ts[0].spans
        ],
        ts[0].trace_id,
    )
    pairs = list(D.instruct_examples(ts, random.Random(0)))
    prompts = [p for p, _ in pairs]
    assert any("<high_latency>" in p and "<include>" not in p for p in prompts)
    assert any("<include>" in p and "<high_latency>" not in p for p in prompts)
    assert any("<include>" in p and "<high_latency>" in p for p in prompts)
    for prompt, answer in pairs:
        assert prompt.startswith("<cond>") and prompt.endswith("<layer>")
        assert answer.endswith("<end>") and "<book>" in answer
        step = enc.parse_step(prompt + " " + answer)
        assert step.conditions.high_latency or step.conditions.includes
    plain = list(D.instruct_examples(ts, random.Random(0), plain_prob=1.0))
    assert len(plain) > len(pairs)


def test_instruct_examples_on_real_traces(real, tok):
    pairs = list(D.instruct_examples(real, random.Random(0)))
    assert pairs
    for prompt, answer in pairs:
        enc.parse_step(prompt + " " + answer)
        assert tok.decode(*tok.encode(answer)) == answer


# --- infill ---------------------------------------------------------------------------------------------------


def _unmask(prompt: str, answer: str) -> str:
    body = prompt.removesuffix(" <infill>")
    return body.replace("<mask>", answer.removesuffix(" <end>"), 1) + " <end>"


def test_field_infill_answers_are_the_masked_value(real, tok):
    for t in real[:10]:
        for step in enc.encode_trace(t):
            for call in step.calls:
                for key in D.INFILL_FIELDS:
                    prompt, answer = D.field_infill_example(step, call.index, key)
                    assert prompt.count("<mask>") == 1 and prompt.endswith("<infill>")
                    assert _unmask(prompt, answer) == step.text()
                    xs = enc.lex(tok.decode(*tok.encode(answer)))
                    assert xs[0] == enc.Lexeme("key", key) and xs[-1] == enc.Lexeme("mark", "end")
                    want = {"svc": call.service, "op": call.operation, "kind": call.kind.name,
                            "dur": call.duration, "status": call.status.name}[key]  # fmt: skip
                    assert xs[1].value == want
    with pytest.raises(ValueError, match="cannot mask"):
        D.field_infill_example(step, 0, "budget")


def test_infill_examples_mix_fields_and_connecting_spans(real, tok):
    pairs = list(D.infill_examples(real, random.Random(0)))
    assert len(pairs) == 2 * len(real)
    fields, spans = pairs[0::2], pairs[1::2]
    for prompt, answer in fields:
        assert "<mask>" in prompt and enc.lex(answer)[0].kind == "key"
    for prompt, answer in spans:
        assert "<call>" in prompt and "<mask>" in prompt and "<kids>" in prompt and prompt.endswith("<infill>")
        call = enc.decode_call(tok.decode(*tok.encode(answer)))
        assert call.index is None
        kids = prompt.split("<kids>")[1]
        assert "<call>" in kids  # connecting spans have orphaned children in the prompt
    for prompt, answer in pairs:
        assert tok.decode(*tok.encode(prompt)) == prompt


def test_shuffled_services_keep_the_trace_and_move_only_names(real):
    t = max(real, key=lambda t: len({s.service for s in t.spans}))
    moved = D.shuffle_services(t, random.Random(4))
    to = {a.service: b.service for a, b in zip(t.spans, moved.spans)}
    assert sorted(to) == sorted(to.values()) and to != {k: k for k in to}  # a permutation, here not the identity
    for a, b in zip(t.spans, moved.spans):
        assert b.resource.attributes["service.name"] == b.service == to[a.service]
        assert (b.span_id, b.parent_id, b.name, b.start_ns, b.end_ns) == (a.span_id, a.parent_id, a.name, a.start_ns,
                                                                           a.end_ns)  # fmt: skip


def test_relabelled_lost_span_examples_take_the_service_from_the_shuffled_trace(real):
    # one trace at a time with the same seed: the lost span is drawn before the relabelling
    plain = [ex for i, t in enumerate(real) for ex in D.infill_examples([t], random.Random(i), field_per_trace=0)]
    mixed = [ex for i, t in enumerate(real)
             for ex in D.infill_examples([t], random.Random(i), field_per_trace=0, relabel_prob=1.0)]  # fmt: skip
    assert len(plain) == len(mixed) == len(real)
    differ = 0
    for (p0, a0), (p1, a1) in zip(plain, mixed):
        c0, c1 = enc.decode_call(a0), enc.decode_call(a1)
        # the same lost span: only the services' names may differ, and the answer names one of the prompt's
        assert (c0.operation, c0.start, c0.duration) == (c1.operation, c1.start, c1.duration)
        assert f"svc={enc.render_str(c1.service)}" in p1
        differ += p0 != p1
    assert differ > len(real) // 2


@FAST
@given(traces(min_spans=2, max_spans=7, rich=False), st.integers(0, 2**32))
def test_infill_on_generated_traces(trace, seed):
    pairs = list(D.infill_examples([trace], random.Random(seed), field_per_trace=2))
    assert len(pairs) == 3
    for prompt, answer in pairs:
        tok = TraceTokenizer.build([])
        assert tok.decode(*tok.encode(prompt)) == prompt and tok.decode(*tok.encode(answer)) == answer
    enc.decode_call(pairs[2][1])


# --- tensors --------------------------------------------------------------------------------------------------


def test_pack_pretrain_shapes(real, tok):
    texts = list(D.pretrain_texts(real, random.Random(0)))
    blocks = D.pack_pretrain(tok, texts, 64)
    total = sum(len(tok.encode(t).ids) + 2 for t in texts)
    assert blocks.dtype == torch.long and blocks.shape == (total // 64, 64)
    assert blocks[0, 0].item() == tok.bos_id
    flat = blocks.flatten().tolist()
    assert flat.count(tok.bos_id) >= len(texts) - 1 - (total % 64)  # one <bos> per text
    first = flat[1 : flat.index(tok.eos_id)]
    assert tok.decode(first) == texts[0]
    with pytest.raises(ValueError, match="fewer than one block"):
        D.pack_pretrain(tok, texts[:1], 100_000)


def test_pad_supervised_masks_prompt_and_padding(real, tok):
    pairs = list(D.instruct_examples(real, random.Random(0)))[:8] + list(D.infill_examples(real[:4], random.Random(0)))
    stats: dict = {}
    ids, labels, mask = D.pad_supervised(tok, pairs, 4096, stats=stats)
    assert stats == {"examples": len(pairs), "truncated": 0, "dropped": 0}
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == len(pairs)
    for r, (prompt, answer) in enumerate(pairs):
        n = int(mask[r].sum())
        p = tok.encode(prompt).ids
        assert ids[r, 0].item() == tok.bos_id and tok.decode(ids[r, :n].tolist()) == prompt + " " + answer
        assert (labels[r, : 1 + len(p)] == -100).all() and (labels[r, n:] == -100).all()
        assert (ids[r, n:] == tok.pad_id).all()
        target = labels[r][labels[r] != -100].tolist()
        assert target[-1] == tok.eos_id and tok.decode(target) == answer


def test_pad_supervised_truncates_prompt_from_the_left(real, tok):
    prompt, answer = next(D.instruct_examples(real, random.Random(0)))
    a = tok.encode(answer).ids
    max_len = len(a) + 1 + 10
    stats: dict = {}
    ids, labels, _mask = D.pad_supervised(
        tok,
        [(prompt, answer), (prompt, answer + " <end>" * max_len)],
        max_len,
        stats=stats,
    )
    assert stats == {"examples": 1, "truncated": 1, "dropped": 1}
    assert ids.shape == (1, max_len)
    row = ids[0].tolist()
    assert row[0] == tok.bos_id and row[1:10] == tok.encode(prompt).ids[-9:]
    assert tok.decode(labels[0][labels[0] != -100].tolist()) == answer


# --- rendering a split in parallel ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["pretrain", "instruct", "infill"])
def test_render_is_the_same_for_any_number_of_workers(real, stage):
    job = D.StageRender(stage, seed=7, passes=2 if stage == "pretrain" else 1,
                        stats=D.corpus_stats_for_instructions(real), plain_prob=0.5)
    one = D.render(job, real, workers=1)
    forked = D.render(job, real, workers=3)
    assert one == forked and len(one) > len(real)
    # A different seed draws other shuffles and drops (pre-training) or other masks (infill).
    if stage != "instruct":
        assert D.render(D.StageRender(stage, seed=8), real, workers=1) != D.render(D.StageRender(stage, seed=7), real, workers=1)


def test_render_passes_give_new_shuffles_of_the_same_steps(real):
    once = D.render(D.StageRender("pretrain", seed=1), real, workers=1)
    twice = D.render(D.StageRender("pretrain", seed=1, passes=2), real, workers=1)
    assert len(twice) == 2 * len(once) and twice[: len(once)] == once and twice[len(once) :] != once


def test_instruct_plain_prob_adds_uninstructed_steps_with_full_conditions(real):
    stats = D.corpus_stats_for_instructions(real)
    only = D.render(D.StageRender("instruct", stats=stats), real, workers=1)
    mixed = D.render(D.StageRender("instruct", stats=stats, plain_prob=1.0), real, workers=1)
    plain = [p for p, _ in mixed if "<high_latency>" not in p and "<include>" not in p]
    assert len(mixed) > len(only) and plain
    assert all(" calls=" in p and " depth=" in p for p in plain)  # nothing dropped: the adapter learns to copy them


def test_tokenized_render_matches_tokenizing_afterwards(real, tok):
    job = D.StageRender("infill", seed=3)
    pairs = D.render(job, real, workers=1)
    ids = D.render(job, real, finish=D.TokenizePair(tok), workers=2)
    assert [(list(p), list(a)) for p, a in ids] == [
        ([tok.bos_id, *tok.encode(p).ids], [*tok.encode(a).ids, tok.eos_id]) for p, a in pairs
    ]


def test_tokenizer_from_counts_equals_building_from_texts(real):
    texts = list(D.step_texts(real))
    halves = TraceTokenizer.count_strings(texts[::2]) + TraceTokenizer.count_strings(texts[1::2])
    assert TraceTokenizer.from_string_counts(halves).token_to_id == TraceTokenizer.build(texts).token_to_id


def test_supervised_split_pads_per_batch_and_trains_on_answers_only(real, tok):
    pairs = D.render(D.StageRender("infill", seed=0), real, finish=D.TokenizePair(tok), workers=1)
    split = D.Split.supervised(pairs, 4096, tok.pad_id)
    assert len(split) == len(pairs) and split.stats == {"examples": len(pairs), "truncated": 0, "dropped": 0}
    x, y, m = split.rows([0, 3])
    assert x.shape[1] == max(len(split.sequences[0]), len(split.sequences[3]))
    for r, i in enumerate([0, 3]):
        p, a = pairs[i]
        assert y[r][y[r] != D.IGNORE_INDEX].tolist() == list(a)  # the answer and <eos>, nothing else
        assert int(m[r].sum()) == len(p) + len(a)
    # Sharding keeps every world-th row from the rank.
    assert len(split.shard(1, 2)) == len(pairs) // 2


def test_length_grouped_batches_pad_less_and_still_draw_every_row():
    import torch

    from otel_tracegen.lm.data import LengthGroupedBatches

    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 500, (2000,), generator=g)]
    grouped = LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(1))
    seen, padded_grouped, padded_random = set(), 0, 0
    for _ in range(400):
        batch = grouped.next()
        assert len(batch) == 16
        seen.update(batch)
        padded_grouped += 16 * max(lengths[i] for i in batch)
        rand = torch.randint(len(lengths), (16,), generator=g).tolist()
        padded_random += 16 * max(lengths[i] for i in rand)
    assert len(seen) > 0.9 * len(lengths)  # 6,400 uniform draws reach almost every row
    assert padded_grouped < 0.6 * padded_random
