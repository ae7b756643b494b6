"""Training stages on the CPU with the tiny config: pretrain, resume, instruct and infill LoRA, --base-model,
saving as safetensors, loading back, and ``model info``. The whole file runs in well under a minute."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("otel_tracegen.lm.tokenizer")
pytest.importorskip("otel_tracegen.lm.data")

from otel_tracegen.cli import ExitStatus
from otel_tracegen.lm import model as lm
from otel_tracegen.lm.train import TrainConfig, get_lr

from .cli_helpers import EXAMPLES, FAST, one_thread, run  # noqa: F401 - one_thread: autouse fixture


def stage(out: Path, name: str) -> dict:
    return json.loads((out / lm.TRAINING_JSON).read_text())["stages"][name]




@pytest.fixture(scope="module")
def tuned(corpus, pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "tuned"
    shutil.copytree(pretrained, out)
    for name in ("instruct", "infill"):
        rc, _, err = run("train", "--stage", name, "--corpus", str(corpus), "--out", str(out), "--max-steps", "4",
                         "--eval-every", "2", *FAST)
        assert rc == ExitStatus.SUCCESS, err
    return out


# --- pretrain -----------------------------------------------------------------------------------------------


def test_pretrain_loss_decreases_and_validation_is_recorded(pretrained):
    s = stage(pretrained, "pretrain")
    assert s["steps"] == 20 and s["device"] == "cpu" and s["tokens_seen"] > 0 and s["tokens_per_s"] > 0
    assert [h["step"] for h in s["history"]] == [0, 10, 20]
    first, last = s["history"][0], s["history"][-1]
    assert last["train"] < first["train"] - 0.5, s["history"]
    assert last["val"] is not None and last["val"] < first["val"], s["history"]
    assert s["val_loss"] == last["val"] and s["best_val_loss"] <= s["val_loss"]
    card = json.loads((pretrained / lm.TRAINING_JSON).read_text())
    assert card["config"]["hidden_size"] == lm.PRESETS["tiny"].hidden_size
    assert card["data"]["splits"]["train"]["traces"] > 0 and card["tokenizer"] == "trace"


def test_pretrain_saves_safetensors_and_loads_the_same_logits(pretrained):
    from safetensors.torch import load_model as load_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    assert (pretrained / "model.safetensors").is_file()
    assert not list(pretrained.glob("*.bin")) and not list(pretrained.glob("*.pt"))
    loaded = lm.load_model(pretrained, device="cpu", backend="transformers")
    runtime = lm.load_model(pretrained, device="cpu")
    assert loaded.adapters == runtime.adapters == [] and loaded.device == "cpu" and runtime.backend == "runtime"
    # The same weights by another road: the final checkpoint, read into a fresh model.
    fresh = LlamaForCausalLM(LlamaConfig.from_pretrained(pretrained)).eval()
    load_weights(fresh, str(pretrained / "checkpoint" / "pretrain" / "model.safetensors"))
    ids = torch.tensor([loaded.tokenizer.encode("<layer>").ids * 3 + [loaded.tokenizer.eos_id]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, fresh(ids).logits, atol=1e-5)
        assert torch.allclose(runtime.model(ids)[0], fresh(ids).logits, atol=1e-5)
    assert 50_000 < lm.count_parameters(loaded.model) < 200_000  # "tiny" means ~100k


def test_resume_continues_from_the_checkpoint_step(corpus, pretrained, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(pretrained, out)
    rc, _, err = run("train", "--stage", "pretrain", "--corpus", str(corpus), "--out", str(out), "--config", "tiny",
                     "--max-steps", "25", "--eval-every", "10", "--lr", "3e-3", "--resume", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    assert "resumed pretrain from step 20" in err
    s = stage(out, "pretrain")
    assert s["resumed_from"] == 20 and s["steps"] == 25
    assert [h["step"] for h in s["history"]] == [0, 10, 20, 25]


def test_continued_pretraining_starts_from_the_given_model(corpus, pretrained, tmp_path):
    """--init on pretrain: the same architecture and tokenizer, its weights as the starting point."""
    out = tmp_path / "continued"
    rc, _, err = run("train", "--stage", "pretrain", "--init", str(pretrained), "--corpus", str(corpus), "--out",
                     str(out), "--max-steps", "4", "--eval-every", "2", "--lr", "1e-4", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    assert f"continuing {pretrained}" in err
    before, after = stage(pretrained, "pretrain"), stage(out, "pretrain")
    # Step 0 of the continued run evaluates the given weights: far below a fresh model's loss.
    assert after["history"][0]["val"] < before["history"][0]["val"] - 0.5
    assert after["continued_from"]["model"] == str(pretrained)
    assert after["continued_from"]["pretrain"]["steps"] == before["steps"]
    assert (out / "vocab.json").read_text() == (pretrained / "vocab.json").read_text()
    assert json.loads((out / "catalog.json").read_text())["entries"]
    rc, _, err = run("train", "--stage", "pretrain", "--init", str(tmp_path / "nothing"), "--corpus", str(corpus),
                     "--out", str(tmp_path / "x"), "--max-steps", "1", *FAST)
    assert rc == ExitStatus.ERROR and "not a pre-trained otel-tracegen model" in err


def test_resume_without_a_checkpoint_is_a_one_line_error(corpus, tmp_path):
    rc, _, err = run("train", "--stage", "pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "m"),
                     "--max-steps", "2", "--resume", *FAST)
    assert rc == ExitStatus.ERROR and "no checkpoint" in err and "Traceback" not in err


# --- LoRA stages --------------------------------------------------------------------------------------------


def test_instruct_and_infill_write_adapters_that_load_back(tuned):
    for name in ("instruct", "infill"):
        d = tuned / lm.ADAPTERS_DIR / name
        assert (d / lm.ADAPTER_WEIGHTS).is_file() and (d / lm.ADAPTER_CONFIG).is_file()
        # The base is the model directory itself, named relatively so a copied model/ stays self-contained.
        assert json.loads((d / lm.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "."
        s = stage(tuned, name)
        assert s["steps"] == 4 and s["val_loss"] is not None and s["tokens_seen"] > 0
    loaded = lm.load_model(tuned, device="cpu", backend="transformers")
    runtime = lm.load_model(tuned, device="cpu")
    assert loaded.adapters == runtime.adapters == ["infill", "instruct"]
    ids = torch.tensor([[loaded.tokenizer.bos_id] + loaded.tokenizer.encode("<layer>").ids])
    with torch.no_grad():
        loaded.model.set_adapter("instruct")
        a = loaded.model(ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(ids).logits
    assert a.shape == base.shape == (1, ids.shape[1], loaded.tokenizer.vocab_size)
    # Both backends compute the same thing, with and without the adapter.
    runtime.model.set_adapter("instruct")
    assert torch.allclose(runtime.model(ids)[0], a, atol=1e-5)
    runtime.model.set_adapter(None)
    assert torch.allclose(runtime.model(ids)[0], base, atol=1e-5)
    assert stage(tuned, "pretrain")["steps"] == 20  # the earlier stage's record is kept


def test_model_info_prints_parameters_adapters_and_data(tuned):
    rc, out, err = run("model", "info", str(tuned))
    assert rc == ExitStatus.SUCCESS, err
    assert "parameters" in out and "infill, instruct" in out and "trainticket" in out and "vocabulary" in out
    rc, out, _ = run("model", "info", str(tuned), "--json")
    info = json.loads(out)
    assert info["parameters"] > 0 and info["adapter_parameters"] > 0 and info["size_bytes"] > 0


def test_model_info_without_a_model_is_a_one_line_error(tmp_path):
    rc, _, err = run("model", "info", str(tmp_path / "nothing"))
    assert rc == ExitStatus.ERROR and "no model directory" in err


def test_lora_stage_resumes_from_its_checkpoint(corpus, tuned, tmp_path):
    out = tmp_path / "tuned"
    shutil.copytree(tuned, out)
    rc, _, err = run("train", "--stage", "instruct", "--corpus", str(corpus), "--out", str(out), "--max-steps", "6",
                     "--eval-every", "2", "--resume", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    assert "resumed instruct from step 4" in err
    s = stage(out, "instruct")
    assert s["resumed_from"] == 4 and s["steps"] == 6 and [h["step"] for h in s["history"]] == [0, 2, 4, 6]


# --- --base-model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_hf_model(tmp_path_factory, corpus) -> Path:
    """A tiny Llama with its own byte-level BPE tokenizer, saved locally: stands in for SmolLM2."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("lm") / "hf-base"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["<layer> svc= op= kind= dur= <end> 0123456789"] * 4, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(d)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def test_base_model_is_lora_tuned_with_its_own_tokenizer(corpus, local_hf_model, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run("train", "--stage", "infill", "--corpus", str(corpus), "--out", str(out),
                     "--base-model", str(local_hf_model), "--max-steps", "2", "--block-size", "128", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    assert (out / lm.ADAPTERS_DIR / "infill" / lm.ADAPTER_WEIGHTS).is_file()
    assert not (out / "model.safetensors").exists()  # the base is named, not copied
    card = json.loads((out / lm.TRAINING_JSON).read_text())
    assert card["tokenizer"] == "auto" and Path(card["base_model"]) == local_hf_model.resolve()
    loaded = lm.load_model(out, device="cpu")
    assert loaded.adapters == ["infill"] and loaded.tokenizer.eos_token == "<|endoftext|>"


# --- configs ------------------------------------------------------------------------------------------------


def test_config_errors_name_the_field_and_value():
    with pytest.raises(ValueError, match=r"n_heads=3 must divide hidden_size=64"):
        lm.TraceLMConfig(hidden_size=64, n_heads=3, n_kv_heads=1)
    with pytest.raises(ValueError, match=r"dropout .* got 1.5"):
        lm.TraceLMConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"stage .* got 'finetune'"):
        TrainConfig(stage="finetune", corpus="c", out="o")
    assert lm.TraceLMConfig.from_dict({**lm.PRESETS["small"].to_dict(), "from_the_future": 1}) == lm.PRESETS["small"]


def test_small_preset_fits_the_size_budget():
    from transformers import LlamaForCausalLM

    cfg = lm.preset("small")
    cfg.vocab_size = 4000  # generous for a trace vocabulary
    with torch.device("meta"):
        n = lm.count_parameters(LlamaForCausalLM(cfg.llama_config()))
    assert 5e6 < n and n * 4 < 50e6, n  # fp32 safetensors under 50 MB


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(corpus="c", out="o", max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [get_lr(s, cfg) for s in range(101)]
    assert lrs[0] < lrs[9] <= 1e-3 and max(lrs) <= 1e-3
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[100] == pytest.approx(1e-4)


def test_load_model_without_the_default_directory_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(lm, "DEFAULT_MODEL_DIR", tmp_path / "model")
    with pytest.raises(Exception, match="no model directory"):
        lm.load_model()


def test_free_running_samples_are_all_accounted_for(tuned):
    """Plain sampling of whole traces: every sample is either valid or counted under a named failure."""
    from otel_tracegen.lm.sample import free_run

    r = free_run(lm.load_model(tuned, device="cpu"), 3, seed=1, max_new_tokens=48, batch_size=3)
    assert r.traces == 3 and r.structural + sum(r.failures.values()) - (r.structural - r.valid) == 3
    assert r.valid <= r.structural == len(r.samples)
    assert [sum(col) for col in zip(*r.by_entry.values())] == [3, r.structural, r.valid]
    assert all(isinstance(reason, str) and reason for reason in r.failures)
    r = free_run(lm.load_model(tuned, device="cpu"), 2, seed=1, max_new_tokens=8, batch_size=2, adapter="instruct")
    assert r.traces == 2
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        free_run(lm.load_model(tuned, device="cpu"), 1, adapter="nope")


def test_sample_comparison_summarises_services_depth_fanout_and_durations(corpus):
    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.lm.sample import compare, validator_pass_rate

    _, splits = load_corpus(corpus)
    c = compare(splits["train"][:5], splits["validation"])
    assert c["sampled"]["traces"] == 5 and c["real"]["traces"] == len(splits["validation"])
    assert 0.0 <= c["service_mix_tv_distance"] <= 1.0 and compare([], splits["validation"])["service_mix_tv_distance"] is None
    assert c["real"]["depth"]["max"] >= c["real"]["depth"]["median"] >= 1
    every = compare(splits["train"], splits["train"], min_traces=1)  # a set against itself: no distance anywhere
    assert every["service_mix_tv_distance"] == every["per_entry_service_mix_tv_distance"] == 0.0
    assert every["by_entry"] and sum(every["entry_share"]["sampled"].values()) == pytest.approx(1.0)
    assert c["real"]["duration_us"]["p50"] <= c["real"]["duration_us"]["p99"]
    assert 0.0 <= validator_pass_rate(splits["train"]) <= validator_pass_rate(splits["train"], tolerance_ns=10**9) <= 1.0


def test_pretrain_reads_several_corpora_and_records_each(corpus, tmp_path):
    """`--corpus A B` trains on both (joined split by split); training.json names each and sums the splits."""
    out = tmp_path / "m"
    rc, _, err = run("train", "--stage", "pretrain", "--corpus", str(corpus), str(corpus), "--out", str(out),
                     "--config", "tiny", "--max-steps", "2", "--eval-every", "2", "--workers", "2", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    card = json.loads((out / lm.TRAINING_JSON).read_text())
    assert card["data"]["corpus"] == [str(corpus)] * 2 and len(card["data"]["corpora"]) == 2
    one = json.loads((corpus / "manifest.json").read_text())["splits"]["train"]["traces"]
    assert card["data"]["splits"]["train"]["traces"] == 2 * one
    assert card["stages"]["pretrain"]["data_prep_s"] >= 0 and card["stages"]["pretrain"]["corpus"] == [str(corpus)] * 2


def test_pretrain_without_a_validation_split_trains_and_says_so(tmp_path):
    from otel_tracegen.dataset import BuildConfig, build_corpus

    corpus = tmp_path / "c"
    build_corpus("spancsv", [EXAMPLES], corpus, BuildConfig(validation_fraction=0.0))
    rc, _, err = run("train", "--stage", "pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "m"),
                     "--config", "tiny", "--max-steps", "2", "--eval-every", "2", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    assert "n/a (empty validation split)" in err and stage(tmp_path / "m", "pretrain")["val_loss"] is None


def test_pretrain_packs_steps_in_random_order_unless_told_otherwise(corpus):
    """Shuffled packing keeps a trace's steps (and the traces before it) out of each step's context, as at
    generation time; `--pack-order corpus` reproduces the shipped model's packing."""
    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.lm.train import make_split

    _, splits = load_corpus(corpus)
    from otel_tracegen.lm.train import build_tokenizer

    tok = build_tokenizer(splits["train"], workers=1)
    blocks = {}
    for order in ("shuffled", "corpus"):
        cfg = TrainConfig(corpus=str(corpus), out="o", pack_order=order, workers=1)
        blocks[order] = make_split("pretrain", splits["train"], tok, 128, cfg, 0, False).blocks
    assert blocks["shuffled"].shape == blocks["corpus"].shape  # the same steps (the same number of blocks)...
    assert not torch.equal(blocks["shuffled"], blocks["corpus"])  # ...in another order
    # In corpus order the first block starts with the first trace's client step; shuffled, usually not.
    client = tok.mark_id("client")
    assert blocks["corpus"][0, 2].item() == client
    with pytest.raises(ValueError, match="pack_order"):
        TrainConfig(corpus="c", out="o", pack_order="sorted")
