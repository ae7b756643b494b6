"""The domain tokenizer: vocabulary, exact round trips, unknown names, save/load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_tracegen import encoding as enc
from otel_tracegen.formats import spancsv
from otel_tracegen.lm.tokenizer import (
    BASE_TOKENS,
    ENUM_STRINGS,
    KEY_TOKENS,
    MARKER_TOKENS,
    Encoded,
    TraceTokenizer,
)
from otel_tracegen.trace import SpanKind, StatusCode
from tests.strategies import traces

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trainticket"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def example_texts() -> list[str]:
    out = []
    for t in spancsv.read(sorted(EXAMPLES.glob("*.csv.gz"))):
        try:
            out += [s.text() for s in enc.encode_trace(t)]
        except enc.EncodingError:
            pass  # two example traces have duplicate span ids
    assert len(out) > 500
    return out


@pytest.fixture(scope="module")
def tok(example_texts) -> TraceTokenizer:
    return TraceTokenizer.build(example_texts)


def test_vocabulary_holds_every_marker_key_and_number_piece(tok):
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id] == [0, 1, 2, 3]
    assert tok.id_to_token[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert set(MARKER_TOKENS) == {f"<{m}>" for m in enc.MARKERS} and set(MARKER_TOKENS) <= set(tok.token_to_id)
    assert {
        "<cond>",
        "<layer>",
        "<call>",
        "<book>",
        "<sub>",
        "<end>",
        "<client>",
        "<mask>",
        "<infill>",
    } <= set(MARKER_TOKENS)
    assert set(KEY_TOKENS) == {f"{k}=" for k in enc.KEYS} and set(KEY_TOKENS) <= set(tok.token_to_id)
    for t in list("0123456789") + [
        "-",
        "=",
        ".",
        "e",
        "+",
        "inf",
        "nan",
        "true",
        "false",
    ]:
        assert t in tok.token_to_id
    for name in [k.name for k in SpanKind] + [s.name for s in StatusCode]:
        assert tok.str_id(name) != tok.unk_id
    assert tok.vocab_size == len(tok.id_to_token) == len(tok.token_to_id)
    assert tok.vocab_size > len(BASE_TOKENS) + len(ENUM_STRINGS)  # the corpus' services and operations


def test_one_token_per_service_and_operation(tok):
    text = '<cond> <path> svc=ts-gateway-service op="HTTP GET" calls=12 <layer>'
    assert tok.tokenize(text) == [
        "<cond>", "<path>", "svc=", '"ts-gateway-service"', "op=", '"HTTP GET"', "calls=", "1", "2", "<layer>",
    ]  # fmt: skip


def test_real_steps_round_trip_without_unknowns(tok, example_texts):
    for text in example_texts:
        e = tok.encode(text)
        assert isinstance(e, Encoded) and e.unknown == []
        assert tok.decode(*e) == text
    whole = "\n".join(example_texts[:30])  # several steps: newlines before <cond> come back
    assert tok.decode(*tok.encode(whole)) == whole


def test_unknown_names_are_kept_outside_and_restored(example_texts):
    small = TraceTokenizer.build(example_texts[:1])
    text = '<cond> svc=brand-new-service op="POST /never seen" <layer> <call> 0 svc=ts-gateway-service op=x kind=SERVER start=0 dur=5 status=OK <book> generated=1 left=3-1=2 child_depth=1-1=0 <sub> 0 calls=0 depth=0 <end>'
    ids, unknown = small.encode(text)
    assert unknown == ["brand-new-service", "POST /never seen", "x"]
    assert ids.count(small.unk_id) == 3
    assert small.decode(ids, unknown) == text
    # an <unk> with nothing to fill it is written as <unk>, never dropped silently
    assert small.decode(ids[:4], []).startswith("<cond> svc=<unk>")


def test_min_count_turns_rare_strings_into_unknowns(example_texts):
    full = TraceTokenizer.build(example_texts)
    pruned = TraceTokenizer.build(example_texts, min_count=5)
    assert pruned.vocab_size < full.vocab_size
    for text in example_texts[:50]:
        assert pruned.decode(*pruned.encode(text)) == text
    with pytest.raises(ValueError):
        TraceTokenizer.build([], min_count=0)


def test_decode_skips_bos_eos_pad(tok, example_texts):
    ids = tok.encode(example_texts[0]).ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == example_texts[0]
    assert tok.decode([tok.bos_id, tok.mark_id("end")], skip_special_tokens=False) == "<bos> <end>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_numbers_signs_floats_and_arithmetic(tok):
    for text in [
        "<book> generated=3 left=2-3=-1 child_depth=0-1=-1",
        "<call> 0 svc=a op=b kind=CLIENT start=-12 dur=-3 status=ERROR",
        '<cond> svc="two  spaces \\" quote" op="x y z" <layer> <call> 0 svc="\\u00e9t\\u00e9" op=" " kind=SERVER',
        "<attr> x 1.5e-05 <attr> y -0.0 <attr> z inf <attr> w -inf <attr> v nan <attr> u 1e+16 <attr> t true <attr> s false <attr> r -7",
    ]:
        assert tok.decode(*tok.encode(text)) == text
    assert tok.tokenize("left=12-3=9") == ["left=", "1", "2", "-", "3", "=", "9"]


def test_text_the_encoding_cannot_hold_is_rejected(tok):
    with pytest.raises(enc.EncodingError, match="not a marker"):
        tok.encode("<cond> <nonsense>")
    with pytest.raises(enc.EncodingError, match="not a key"):
        tok.encode("<cond> foo=1")
    with pytest.raises(enc.EncodingError, match="two numbers"):
        tok.encode("<call> 1 2")
    with pytest.raises(enc.EncodingError, match="two numbers"):
        tok.encode("<cond> start=5 7")
    with pytest.raises(enc.EncodingError, match="character"):
        tok.encode('<cond> svc="unterminated')
    with pytest.raises(enc.EncodingError):
        tok.encode("<cond>svc=a")


def test_ids_for_kind(tok):
    digits = tok.ids_for_kind("digit")
    assert [tok.id_to_token[i] for i in digits] == list("0123456789")
    strs = set(tok.ids_for_kind("str"))
    assert tok.unk_id not in strs and tok.str_id("ts-gateway-service") in strs
    assert {tok.id_to_token[i] for i in tok.ids_for_kind("span_kind")} == {f'"{k.name}"' for k in SpanKind}
    assert {tok.id_to_token[i] for i in tok.ids_for_kind("status")} == {f'"{s.name}"' for s in StatusCode}
    assert set(tok.ids_for_kind("op")) == {tok.token_to_id["-"], tok.token_to_id["="]}
    assert len(tok.ids_for_kind("mark")) == len(enc.MARKERS) and len(tok.ids_for_kind("key")) == len(enc.KEYS)
    with pytest.raises(ValueError, match="unknown kind"):
        tok.ids_for_kind("nope")


def test_save_and_load_in_hugging_face_layout(tok, example_texts, tmp_path):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TraceTokenizer"
    assert config["otel_tracegen_tokenizer_version"] == 1
    assert (config["pad_token"], config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<pad>", "<bos>", "<eos>", "<unk>",
    )  # fmt: skip
    raw = (tmp_path / "vocab.json").read_text()
    vocab = json.loads(raw)
    assert list(vocab) == sorted(vocab) and raw == json.dumps(vocab, indent=2, sort_keys=True) + "\n"
    loaded = TraceTokenizer.from_pretrained(tmp_path)
    assert loaded.id_to_token == tok.id_to_token and loaded.vocab_size == tok.vocab_size
    for text in example_texts[:20]:
        assert loaded.encode(text) == tok.encode(text)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("vocab.json", None, "vocab.json: missing"),
        ("tokenizer_config.json", "{not json", "tokenizer_config.json: not valid JSON"),
        (
            "tokenizer_config.json",
            {"tokenizer_class": "GPT2Tokenizer"},
            "tokenizer_class",
        ),
        (
            "tokenizer_config.json",
            {"otel_tracegen_tokenizer_version": 99},
            "otel_tracegen_tokenizer_version",
        ),
        ("tokenizer_config.json", {"unk_token": "[UNK]"}, "unk_token"),
        ("vocab.json", {"drop": "<call>"}, "vocab.json: .*lacks base tokens"),
        ("vocab.json", {"set": ("<call>", 100000)}, "vocab.json: ids must be"),
        ("vocab.json", {"set": ("svc=", "7")}, "vocab.json: the id of"),
        ("vocab.json", {"swap": ("<pad>", "<eos>")}, "vocab.json: special token"),
        (
            "vocab.json",
            {"rename": ('"ts-gateway-service"', "bare")},
            "vocab.json: token 'bare'",
        ),
    ],
)
def test_broken_files_are_named(tok, tmp_path, file, edit, message):
    tok.save_pretrained(tmp_path)
    p = tmp_path / file
    if edit is None:
        p.unlink()
    elif isinstance(edit, str):
        p.write_text(edit)
    else:
        data = json.loads(p.read_text())
        if "drop" in edit:
            gone = data.pop(edit["drop"])
            data = {t: (i - 1 if i > gone else i) for t, i in data.items()}
        elif "set" in edit:
            data[edit["set"][0]] = edit["set"][1]
        elif "swap" in edit:
            a, b = edit["swap"]
            data[a], data[b] = data[b], data[a]
        elif "rename" in edit:
            a, b = edit["rename"]
            data[b] = data.pop(a)
        else:
            data.update(edit)
        if file == "vocab.json" and "drop" in edit:
            cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
            cfg["vocab_size"] -= 1
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
        p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        TraceTokenizer.from_pretrained(tmp_path)


def test_tokenizer_module_does_not_import_torch():
    code = "import sys, otel_tracegen.lm, otel_tracegen.lm.tokenizer, otel_tracegen.lm.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- properties on generated traces ---------------------------------------------------------------------------


@FAST
@given(traces(max_spans=8, rich=False), st.integers(0, 2**32))
def test_round_trip_on_generated_traces(trace, seed):
    import random

    text = enc.trace_to_text(trace)
    own = TraceTokenizer.build([text])
    ids, unknown = own.encode(text)
    assert unknown == [] and own.decode(ids, unknown) == text
    # a tokenizer that has seen none of its names: every name becomes <unk> and still comes back
    blank = TraceTokenizer.build([])
    ids, unknown = blank.encode(text)
    assert ids.count(blank.unk_id) == len(unknown)
    assert blank.decode(ids, unknown) == text
    # shuffled, dropped conditions (pre-training text) too
    shuffled = enc.trace_to_text(
        trace,
        options=enc.ConditionOptions(shuffle=True, drop_prob=0.5),
        rng=random.Random(seed),
    )
    assert own.decode(*own.encode(shuffled)) == shuffled


@FAST
@given(
    traces(max_spans=4, rich=False),
    st.text(max_size=8),
    st.one_of(
        st.text(max_size=12),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
    ),
)
def test_round_trip_of_attribute_infill_with_any_scalar(trace, key, value):
    span = trace.spans[-1]
    span.attributes[key] = value
    ex = enc.encode_attribute_infill(trace, span, key, list(span.attributes))
    tok = TraceTokenizer.build([ex.prompt])
    for text in (ex.prompt, ex.target):
        assert tok.decode(*tok.encode(text)) == text
    got = enc.decode_attribute_value(tok.decode(*tok.encode(ex.target)))
    assert type(got) is type(value) and (got == value or math.isnan(got) and math.isnan(value))
