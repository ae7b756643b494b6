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
    base = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
    assert count_parameters(base) >= training["parameters"]  # LoRA layers add to the base count
    assert set(lm.adapters) == {"instruct", "infill"}

    traces = spancsv.read(sorted((MODEL.parent / "examples" / "trainticket").glob("*.gz")), ReadReport())
    step = next(t for t in traces if len(t.roots) == 1 and len(t) < 40)
    text = trace_to_text(step).splitlines()[1]
    enc = lm.tokenizer.encode(text)
    assert lm.tokenizer.decode(enc.ids, enc.unknown) == text
    ids = torch.tensor([[lm.tokenizer.bos_id, *enc.ids]])
    with torch.no_grad(), lm.model.disable_adapter():
        out = lm.model(input_ids=ids, labels=ids)
    # A trained model predicts a real TrainTicket step far better than chance (ln 344 ≈ 5.8 nats per token).
    assert torch.isfinite(out.loss) and out.loss.item() < 2.0
