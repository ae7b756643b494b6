"""The default model in model/ loads offline on the CPU, within the size budget, and reads our encoding."""

import json
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[1] / "model"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="no shipped model in model/")


def test_shipped_model_is_small_and_safetensors_only():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 50 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


def test_shipped_model_loads_on_cpu_and_scores_a_real_step():
    import torch

    from otel_tracegen.encoding import trace_to_text
    from otel_tracegen.formats import spancsv
    from otel_tracegen.lm.model import count_parameters, load_model
    from otel_tracegen.report import ReadReport

    lm = load_model(device="cpu")
    training = json.loads((MODEL / "training.json").read_text())
    assert lm.backend == "runtime" and set(lm.adapters) == {"instruct", "infill"}
    assert count_parameters(lm.model) >= training["parameters"]  # LoRA weights add to the base count

    traces = spancsv.read(sorted((MODEL.parent / "examples" / "trainticket").glob("*.gz")), ReadReport())
    step = next(t for t in traces if len(t.roots) == 1 and len(t) < 40)
    text = trace_to_text(step).splitlines()[1]
    enc = lm.tokenizer.encode(text)
    assert lm.tokenizer.decode(enc.ids, enc.unknown) == text
    ids = torch.tensor([[lm.tokenizer.bos_id, *enc.ids]])
    lm.model.set_adapter(None)
    logits, _ = lm.model(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    # A trained model predicts a real TrainTicket step far better than chance (ln 344 ≈ 5.8 nats per token).
    assert torch.isfinite(loss) and loss.item() < 2.0


def test_loading_the_shipped_model_imports_neither_transformers_nor_peft():
    """Why `load_model()` fits its 3 s budget on a CPU: importing transformers and peft alone takes longer.
    (The time itself is measured by benchmarks/bench_load.py, not asserted here.)"""
    import os
    import subprocess
    import sys

    code = ("import sys, otel_tracegen; assert 'torch' not in sys.modules; lm = otel_tracegen.load_model(device='cpu'); "
            "print(lm.backend, sorted(k for k in ('transformers', 'peft', 'scipy') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=MODEL.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split(maxsplit=1) == ["runtime", "[]\n"]
