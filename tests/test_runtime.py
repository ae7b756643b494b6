"""The torch-only inference runtime computes what transformers' LlamaForCausalLM (+ peft LoRA) computes."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from otel_tracegen.lm.runtime import KVCache, TraceLMRuntime

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from otel_tracegen.encoding import trace_to_text
    from otel_tracegen.formats import spancsv
    from otel_tracegen.lm.tokenizer import TraceTokenizer
    from otel_tracegen.report import ReadReport

    traces = spancsv.read(sorted((ROOT / "examples" / "trainticket").glob("*.csv.gz"))[:1], ReadReport())
    return TraceTokenizer.build(trace_to_text(t) for t in itertools.islice(traces, 5))


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """(directory, base LlamaForCausalLM, PeftModel with adapter 'x'), the model random but decisive: its weights
    are scaled up so that greedy decoding has clear winners (no float-rounding ties between implementations)."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from otel_tracegen.lm.model import build_model, preset, save_model

    torch.manual_seed(0)
    base = build_model(preset("tiny"), tokenizer).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.ndim == 2:
                p.normal_(std=0.15)
            else:
                p.uniform_(0.5, 1.5)  # RMSNorm weights
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(base, tokenizer, out, {})
    lora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # peft starts B at 0, which would make the adapter a no-op
    lora.save_pretrained(out / "adapters" / "x")
    return out, base, lora.eval()


def batch(vocab: int, pads=(0, 3, 7), width: int = 12, seed: int = 1):
    """Random ids with left padding: row i starts with pads[i] padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(pads), width), generator=g)
    mask = torch.ones(len(pads), width, dtype=torch.long)
    for i, n in enumerate(pads):
        ids[i, :n], mask[i, :n] = 0, 0
    return ids, mask


def hf_logits(model, ids, mask):
    """transformers' logits with the positions ``generate`` would use for left padding."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def assert_close_where(a, b, mask, atol=1e-5):
    m = mask.bool()
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[m], b[m], atol=atol, rtol=1e-5)


# --- logits ----------------------------------------------------------------------------------------------------


def test_logits_equal_transformers_with_left_padding(tiny, tokenizer):
    path, base, _ = tiny
    rt = TraceLMRuntime.from_pretrained(path, adapters=[])
    assert rt.adapters == [] and rt.active_adapter is None
    ids, mask = batch(tokenizer.vocab_size)
    logits, cache = rt(ids, mask)
    assert cache is None and logits.shape == (3, 12, tokenizer.vocab_size) and logits.dtype == torch.float32
    assert_close_where(logits, hf_logits(base, ids, mask), mask)
    # Without a mask: no padding, positions 0..T-1.
    full, _ = rt(ids)
    assert_close_where(full, hf_logits(base, ids, torch.ones_like(mask)), torch.ones_like(mask))


def test_lora_adapter_equals_peft_and_none_is_the_base_model(tiny, tokenizer):
    path, base, lora = tiny
    rt = TraceLMRuntime.from_pretrained(path)  # every adapter found: just "x", made active
    assert rt.adapters == ["x"] and rt.active_adapter == "x"
    ids, mask = batch(tokenizer.vocab_size, pads=(2, 0, 5, 9), seed=2)
    with_x, _ = rt(ids, mask)
    assert_close_where(with_x, hf_logits(lora, ids, mask), mask)
    rt.set_adapter(None)
    plain, _ = rt(ids, mask)
    assert_close_where(plain, hf_logits(base, ids, mask), mask)
    assert (with_x - plain)[mask.bool()].abs().max() > 1e-2  # the adapter does something
    rt.set_adapter("x")
    assert rt.active_adapter == "x"
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        rt.set_adapter("nope")


def test_incremental_decoding_with_the_cache_equals_one_full_forward(tiny, tokenizer):
    path, _, _ = tiny
    rt = TraceLMRuntime.from_pretrained(path)
    ids, mask = batch(tokenizer.vocab_size, pads=(0, 4, 6), width=16, seed=3)
    full, _ = rt(ids, mask)
    cache = KVCache()
    parts = [rt(ids[:, :7], mask[:, :7], cache)[0]]
    parts.append(rt(ids[:, 7:9], mask[:, :9], cache)[0])  # a mask as transformers passes it: past + new
    for t in range(9, 16):
        parts.append(rt(ids[:, t : t + 1], None, cache)[0])
    assert cache.length == 16 and cache.seen.tolist() == [16, 12, 10]
    assert_close_where(torch.cat(parts, dim=1), full, mask, atol=1e-4)


# --- sampling --------------------------------------------------------------------------------------------------


def cut_at_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def test_greedy_sampling_equals_transformers_generate(tiny, tokenizer):
    path, base, _ = tiny
    rt = TraceLMRuntime.from_pretrained(path, adapters=[])
    bos, pad = tokenizer.bos_id, tokenizer.pad_id
    prompts = [[bos, 40, 41, 42, 43, 44, 45], [bos, 50], [bos, 60, 61, 62]]
    n = 16
    free = rt.sample(prompts, max_new_tokens=n, eos_id=None, pad_id=pad, temperature=0)
    assert [len(r) for r in free] == [n] * 3
    # Make "eos" a token that some row first produces as late as possible, so that this row stops mid-way.
    k, r = max((i, r) for r, row in enumerate(free) for i, t in enumerate(row[: n - 1]) if t not in row[:i])
    eos = free[r][k]
    got = rt.sample(prompts, max_new_tokens=n, eos_id=eos, pad_id=pad, temperature=0)
    assert got[r] == free[r][: k + 1] and k > 0
    assert any(len(row) == n and eos not in row for row in got)  # and another one runs to the end

    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                            eos_token_id=eos, pad_token_id=pad)
    assert got == [cut_at_eos(r, eos) for r in ref[:, width:].tolist()]


def test_seeded_sampling_is_reproducible_and_stays_in_the_vocabulary(tiny, tokenizer):
    path, _, _ = tiny
    rt = TraceLMRuntime.from_pretrained(path)
    prompts = [[tokenizer.bos_id, 7 + i] for i in range(5)]
    eos, vocab = tokenizer.eos_id, tokenizer.vocab_size

    def draw(seed, temperature=1.0):
        g = torch.Generator().manual_seed(seed)
        return rt.sample(prompts, max_new_tokens=20, eos_id=eos, pad_id=0, temperature=temperature, generator=g)

    a = draw(5)
    assert a == draw(5)
    for row in a + draw(6, temperature=2.0):
        assert 1 <= len(row) <= 20 and all(0 <= t < vocab for t in row)
        assert eos not in row[:-1]
    assert rt.sample([], max_new_tokens=5, eos_id=eos, pad_id=0) == []
    assert rt.sample(prompts[:1], max_new_tokens=0, eos_id=eos, pad_id=0) == [[]]
    with pytest.raises(ValueError, match="at least one token"):
        rt.sample([[]], max_new_tokens=1, eos_id=eos, pad_id=0)


def test_logits_hook_is_obeyed_and_sees_the_running_rows(tiny, tokenizer):
    path, _, _ = tiny
    rt = TraceLMRuntime.from_pretrained(path)
    prompts = [[tokenizer.bos_id, 9], [tokenizer.bos_id, 10, 11], [tokenizer.bos_id]]
    eos = tokenizer.eos_id
    greedy = rt.sample(prompts, max_new_tokens=8, eos_id=eos, pad_id=0, temperature=0)
    banned = sorted({t for row in greedy for t in row} - {eos})
    calls = []

    def hook(rows, generated, logits):
        calls.append((list(rows), [list(g) for g in generated]))
        assert logits.shape == (len(rows), tokenizer.vocab_size) and logits.dtype == torch.float32
        logits[:, banned] = float("-inf")
        if 1 in rows and not generated[rows.index(1)]:
            logits[rows.index(1)] = float("-inf")  # row 1 must end at once
            logits[rows.index(1), eos] = 0.0
        return logits

    for temperature in (0, 1.0):
        calls.clear()
        out = rt.sample(prompts, max_new_tokens=8, eos_id=eos, pad_id=0, temperature=temperature,
                        generator=torch.Generator().manual_seed(0), logits_hook=hook)
        assert out[1] == [eos]
        assert not {t for row in out for t in row} & set(banned)
        assert calls[0] == ([0, 1, 2], [[], [], []])
        assert all(1 not in rows for rows, _ in calls[1:])  # a finished row leaves the batch
        assert calls[1][1] == [out[0][:1], out[2][:1]]


def fixed_text(fixed: list[list[list[int]]], eos: int):
    """A ``forced`` callback: after row r's k-th drawn token comes ``fixed[r][k]``, and after the last, eos."""
    drawn = [0] * len(fixed)

    def forced(rows, tokens):
        out = []
        for r in rows:
            k = drawn[r]
            drawn[r] += 1
            out.append(list(fixed[r][k]) + ([eos] if k + 1 == len(fixed[r]) else []))
        return out

    return forced


@pytest.mark.parametrize("max_chunk", [1, 2, 4])
def test_forced_tokens_fed_in_chunks_give_what_forcing_them_one_by_one_gives(tiny, tokenizer, max_chunk):
    """``forced`` (fixed text appended after a drawn token and packed into the same forward passes as the other
    rows' tokens) must decode exactly as forcing the same tokens through the logits hook, one pass per token."""
    path, _, _ = tiny
    rt = TraceLMRuntime.from_pretrained(path)
    eos = tokenizer.eos_id
    prompts = [[tokenizer.bos_id, 9], [tokenizer.bos_id, 10, 11, 12, 13], [tokenizer.bos_id]]
    # Row r: after each drawn token, the fixed text fixed[r][k] (k = drawn tokens so far) follows; then eos.
    fixed = [[[20, 21, 22], [], [23, 24, 25, 26, 27]], [[30], [31, 32]], [[], [40, 41, 42, 43, 44, 45], [46]]]

    def plan(r: int, out: list[int]) -> int | None:
        """The token the plan forces next for row r after ``out`` (None: a drawn position)."""
        pos, k = 0, 0
        while True:
            if pos == len(out):
                return None if k < len(fixed[r]) else eos
            pos += 1  # the drawn token
            for t in fixed[r][k]:
                if pos == len(out):
                    return t
                pos += 1
            k += 1

    def force_by_hook(rows, generated, logits):
        for j, (r, out) in enumerate(zip(rows, generated)):
            t = plan(r, out)
            if t is not None:
                logits[j] = float("-inf")
                logits[j, t] = 0.0
            else:
                logits[j, eos] = float("-inf")
        return logits

    one_by_one = rt.sample(prompts, max_new_tokens=40, eos_id=eos, pad_id=0, temperature=0, logits_hook=force_by_hook)
    def no_eos(rows, generated, logits):
        logits[:, eos] = float("-inf")
        return logits

    chunked = rt.sample(prompts, max_new_tokens=40, eos_id=eos, pad_id=0, temperature=0, logits_hook=no_eos,
                        forced=fixed_text(fixed, eos), max_chunk=max_chunk)
    assert chunked == one_by_one
    assert [len(row) for row in chunked] == [1 + 3 + 1 + 1 + 5 + 1, 1 + 1 + 1 + 2 + 1, 1 + 1 + 6 + 1 + 1 + 1]


@pytest.mark.parametrize(("max_chunk", "temperature"), [(1, 1.0), (3, 1.0), (8, 0.7)])
def test_scores_are_the_log_weight_of_the_masks_against_free_sampling(tiny, tokenizer, max_chunk, temperature):
    """``scores``: every forced token adds its log-probability (as one full forward over the finished sequence
    gives it), every drawn token the log of the probability mass the hook left; prompt tokens before
    ``score_from`` count for nothing."""
    path, _, _ = tiny
    rt = TraceLMRuntime.from_pretrained(path)
    eos, vocab = tokenizer.eos_id, tokenizer.vocab_size
    prompts = [[tokenizer.bos_id, 9, 30, 31], [tokenizer.bos_id, 10, 11, 12, 13], [tokenizer.bos_id, 40]]
    score_from = [2, 5, 1]  # row 1 scores none of its prompt, row 2 all of it but bos
    fixed = [[[20, 21, 22], [], [23, 24, 25, 26, 27]], [[30], [31, 32]], [[], [40, 41, 42, 43, 44, 45], [46]]]

    def banned(n_generated: int) -> list[int]:
        return [eos] + list(range(3 + n_generated % 5, vocab, 2))  # a different mask at each position

    def hook(rows, generated, logits):
        for j, out in enumerate(generated):
            logits[j, banned(len(out))] = float("-inf")
        return logits

    scores = [0.0, 0.0, 0.0]
    outs = rt.sample(prompts, max_new_tokens=40, eos_id=eos, pad_id=0, temperature=temperature, logits_hook=hook,
                     forced=fixed_text(fixed, eos), max_chunk=max_chunk, generator=torch.Generator().manual_seed(3), scores=scores,
                     score_from=score_from)
    for r, (prompt, out) in enumerate(zip(prompts, outs)):
        seq = prompt + out
        with torch.no_grad():
            logits = rt(torch.tensor([seq]))[0][0].float() / temperature
        logp = torch.log_softmax(logits, -1)
        expected, k, pos = sum(logp[i - 1, seq[i]].item() for i in range(score_from[r], len(prompt))), 0, 0
        while pos < len(out):  # drawn token, then its fixed text
            at = len(prompt) + pos
            masked = logits[at - 1].clone()
            masked[banned(pos)] = float("-inf")
            expected += (torch.logsumexp(masked, -1) - torch.logsumexp(logits[at - 1], -1)).item()
            for i in range(at + 1, at + 1 + len(fixed[r][k]) + (k + 1 == len(fixed[r]))):
                expected += logp[i - 1, seq[i]].item()
            pos += 1 + len(fixed[r][k]) + (k + 1 == len(fixed[r]))
            k += 1
        assert k == len(fixed[r])
        assert scores[r] == pytest.approx(expected, abs=1e-3)
        assert scores[r] < 0


# --- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='linear'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tiny, tmp_path, change, message):
    path, _, _ = tiny
    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match="does not support this model config") as e:
        TraceLMRuntime.from_pretrained(tmp_path / "m")
    assert message in str(e.value)


@pytest.mark.parametrize("key", ["use_dora", "use_rslora"])
def test_unsupported_adapters_are_refused_by_name(tiny, tmp_path, key):
    path, _, _ = tiny
    shutil.copytree(path, tmp_path / "m")
    cpath = tmp_path / "m" / "adapters" / "x" / "adapter_config.json"
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), key: True}))
    with pytest.raises(ValueError, match=f"adapter 'x': {key}=true"):
        TraceLMRuntime.from_pretrained(tmp_path / "m")
    assert TraceLMRuntime.from_pretrained(tmp_path / "m", adapters=[]).adapters == []


shipped = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="no shipped model in model/")


@shipped
def test_shipped_model_loads_with_both_adapters_and_matches_load_model(tokenizer):
    pytest.importorskip("peft")
    from otel_tracegen.lm.model import load_model

    rt = TraceLMRuntime.from_pretrained(MODEL)
    assert rt.adapters == ["infill", "instruct"] and rt.active_adapter == "infill"
    ref = load_model(MODEL, device="cpu", backend="transformers").model
    ids, mask = batch(rt.config.vocab_size, pads=(0, 5), width=24, seed=4)
    for name in ("instruct", None):
        rt.set_adapter(name)
        if name is None:
            with ref.disable_adapter():
                expected = hf_logits(ref, ids, mask)
        else:
            ref.set_adapter(name)
            expected = hf_logits(ref, ids, mask)
        # The runtime merges the adapter into the weights (W + sBA); peft adds s*B(Ax): float32 rounding differs.
        assert_close_where(rt(ids, mask)[0], expected, mask, atol=1e-4)


@shipped
def test_loading_the_shipped_model_imports_neither_transformers_nor_peft():
    code = textwrap.dedent(
        """
        import sys
        from otel_tracegen.lm.runtime import TraceLMRuntime
        m = TraceLMRuntime.from_pretrained("model")
        out = m.sample([[1, 5], [1]], max_new_tokens=3, eos_id=2, pad_id=0, temperature=0)
        assert all(1 <= len(r) <= 3 for r in out), out
        print(sorted(k for k in ("transformers", "peft") if k in sys.modules))
        """
    )
    p = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
