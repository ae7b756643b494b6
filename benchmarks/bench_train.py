"""Pre-training throughput of the default config on the real corpus, against the same model on random tokens.

=====================  ======================================================================================
real corpus            the training loop's own step (``lm.train``): rows drawn from the packed pretrain split,
                       moved to the device, forward with labels under bf16 autocast (fp32 on CPU), backward,
                       grad clipping, AdamW step, and the per-step ``loss.item()`` the loop logs
ceiling                forward + backward + the same optimizer step of the same model on random token ids
                       already on the device, with no host synchronisation: what the hardware allows
=====================  ======================================================================================

Prints tokens/s of both and their ratio (goal: >= 60 % on an H100). Each is measured after ``--warmup`` steps, over
``--steps`` steps, ending with a device synchronisation.

Usage::

    python3 benchmarks/bench_train.py --corpus CORPUS_DIR [--config small] [--batch-size 16] [--steps 100]

``CORPUS_DIR`` comes from ``otel-tracegen data build``.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, type=Path)
    p.add_argument("--config", default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-traces", type=int, default=3000, help="train traces rendered (enough for the blocks used)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    import torch

    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.lm import data
    from otel_tracegen.lm import model as lm
    from otel_tracegen.lm.tokenizer import TraceTokenizer

    device = args.device or lm.default_device()
    on_cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    torch.manual_seed(0)

    _, splits = load_corpus(args.corpus, ("train",))
    traces = splits["train"][: args.max_traces]
    texts = list(data.pretrain_texts(traces, random.Random(0)))
    tokenizer = TraceTokenizer.build(data.step_texts(traces))
    config = lm.preset(args.config)
    block = config.max_position_embeddings
    packed = data.pack_pretrain(tokenizer, texts, block)
    split = data.Split(blocks=packed)
    tokens_per_step = args.batch_size * block

    def fresh_model():
        model = lm.build_model(config, tokenizer).to(device)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_cuda)
        return model, opt

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    def timed(step_fn) -> float:
        for _ in range(args.warmup):
            step_fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        sync()
        return args.steps * tokens_per_step / (time.perf_counter() - t0)

    # -- the training loop's step on the real corpus ----------------------------------------------------------
    model, opt = fresh_model()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)

    def real_step():
        idx = torch.randint(len(split), (args.batch_size,), generator=gen)
        x, y, m = split.rows(idx)
        with autocast:
            loss = model(input_ids=x.to(device), attention_mask=m.to(device), labels=y.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the loop logs every step's loss

    real = timed(real_step)
    del model, opt

    # -- ceiling: same model, random ids already on the device, no host sync ---------------------------------
    model, opt = fresh_model()
    ids = torch.randint(tokenizer.vocab_size, (args.batch_size, block), device=device)

    def ceiling_step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ceiling = timed(ceiling_step)

    gpu = torch.cuda.get_device_name(0) if on_cuda else "none"
    print(f"machine: {platform.processor() or platform.machine()}, GPU {gpu}, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"model: {args.config} ({lm.count_parameters(model):,} parameters), batch {args.batch_size} x {block} tokens, "
          f"{len(split)} real blocks, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"real corpus (training loop step): {real:,.0f} tokens/s")
    print(f"ceiling (random tokens, fwd+bwd+step): {ceiling:,.0f} tokens/s")
    print(f"ratio: {real / ceiling:.2f} (goal >= 0.60 on an H100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
