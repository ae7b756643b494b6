"""Train the trace language model: pre-train from scratch, then tune LoRA adapters for instructions and infill.

Commands (a corpus comes from ``otel-tracegen data build``)::

    # seconds on a CPU: the tiny config
    otel-tracegen data build --format spancsv examples/trainticket --out /tmp/corpus
    otel-tracegen train --stage pretrain --corpus /tmp/corpus --out /tmp/tracelm --config tiny --max-steps 200
    otel-tracegen train --stage instruct --corpus /tmp/corpus --out /tmp/tracelm --max-steps 100
    otel-tracegen train --stage infill   --corpus /tmp/corpus --out /tmp/tracelm --max-steps 100
    otel-tracegen model info /tmp/tracelm

    # the paper's GReaT baseline: whole traces as flat tables, same model code and budget, its own directory
    otel-tracegen train --stage flat --corpus /tmp/corpus --out /tmp/flat --config tiny --max-steps 200

    # one GPU (bf16 autocast), the shipped default size
    otel-tracegen train --stage pretrain --corpus corpus/ --out model/ --config small --max-steps 5000

    # DDP on the GPUs of one node (only rank 0 logs and saves)
    torchrun --standalone --nproc_per_node=4 -m otel_tracegen train --stage pretrain --corpus corpus/ --out model/

    # continue an interrupted run from <out>/checkpoint/<stage>/ (pass the same --max-steps or a larger one)
    otel-tracegen train --stage pretrain --corpus corpus/ --out model/ --config small --max-steps 5000 --resume

    # LoRA-tune any local Hugging Face causal LM with its own tokenizer (nothing is downloaded)
    otel-tracegen train --stage instruct --corpus corpus/ --out runs/smol --base-model /models/SmolLM2-135M

Output: pretrain (and flat) writes ``<out>/`` in the ``save_pretrained`` layout (safetensors) with the tokenizer; instruct and
infill write ``<out>/adapters/<stage>/adapter_model.safetensors``. Every stage records its steps, tokens, tokens/s,
losses, wall time and hardware in ``<out>/training.json``. Resumable checkpoints live in ``<out>/checkpoint/<stage>/``:
the trainable weights as safetensors, the optimizer and RNG state as a tensors-only ``torch.save`` (read back
with ``weights_only=True``, so no pickle code runs).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..report import UserError
from . import model as lm

STAGES = ("pretrain", "instruct", "infill", "flat")
SCRATCH_STAGES = ("pretrain", "flat")
"""Stages that train every weight of a new model (the others tune LoRA adapters on a pre-trained one). ``flat`` is
the paper's GReaT baseline: whole traces as flat tables (``otel_tracegen.evaluate.flat``), trained exactly as
``pretrain`` (packed shuffled blocks, same presets and loop) into a directory of its own."""


# --- config -----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """One training run. Every field is also a ``otel-tracegen train`` option (``--max-steps`` for ``max_steps``)."""

    stage: str = field(default="pretrain", metadata={
        "help": "pretrain | instruct | infill | flat (the GReaT baseline: whole traces as flat tables, trained from "
                "scratch as pretrain, into its own --out)"})
    corpus: list[str] = field(default_factory=list,
                              metadata={"help": "corpus directories (otel-tracegen data build); several are joined"})
    out: str = field(default="", metadata={"help": "model directory to write"})
    config: str = field(default="tiny", metadata={"help": "architecture preset for pretrain and flat: tiny | mini | small | medium"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps in total (a resumed run counts on)"})
    batch_size: int = field(default=32, metadata={"help": "sequences per step and per process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * this"})
    warmup_steps: int = field(default=-1, metadata={"help": "linear warm-up steps; -1 = 5 % of max_steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (2-D weights only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this; 0 = off"})
    eval_every: int = field(default=100, metadata={"help": "validation loss and checkpoint every N steps"})
    eval_batches: int = field(default=8, metadata={"help": "batches per loss estimate"})
    block_size: int = field(default=0, metadata={"help": "tokens per sequence; 0 = the model's context"})
    drop_prob: float = field(default=0.9, metadata={"help": "pretrain: probability of dropping each condition"})
    text_passes: int = field(default=1, metadata={"help": "pretrain, flat: re-render the corpus this often (new shuffles)"})
    flat_drop_prob: float = field(default=0.25, metadata={
        "help": "flat: probability of dropping each header condition (entry service, operation, calls, depth)"})
    instruct_plain_prob: float = field(default=0.5, metadata={
        "help": "instruct: share of traces without an instruction whose plain steps (full conditions, bookkeeping) "
                "are trained on too, so the adapter also follows calls/depth"})
    infill_relabel_prob: float = field(default=0.0, metadata={
        "help": "infill: share of lost-span examples whose services are shuffled among the trace's own, so the "
                "adapter must read a lost span's service from its place (siblings, parent) instead of recalling who "
                "was seen calling its children (measured at mini size: no gain over the seed's noise; docs/infill.md)"})
    pack_order: str = field(default="shuffled", metadata={
        "help": "pretrain, flat: pack examples in random order (shuffled) or in corpus order (corpus: how the shipped model "
                "of 2026-11-23 was trained; its blocks leak neighbouring steps into each step's context)"})
    workers: int = field(default=0, metadata={"help": "processes rendering and tokenizing examples; 0 = one per CPU"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    seed: int = field(default=1337, metadata={"help": "seeds data rendering, initialisation and batches"})
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint/<stage>/"})
    init: str = field(default="", metadata={
        "help": "instruct/infill: pre-trained model dir (default: --out, else model/); pretrain: continue training "
                "this model's weights (its architecture and tokenizer) instead of starting from scratch"})
    base_model: str = field(default="", metadata={"help": "a local HF causal LM to LoRA-tune instead of ours"})
    device: str = field(default="", metadata={"help": "cpu | cuda | cuda:N; default: cuda if available"})

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"TrainConfig.stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.config not in lm.PRESETS:
            raise ValueError(f"TrainConfig.config must be one of {', '.join(lm.PRESETS)}, got {self.config!r}")
        for name in ("max_steps", "batch_size", "eval_every", "eval_batches", "text_passes", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not (self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not (0.0 <= self.instruct_plain_prob <= 1.0):
            raise ValueError(f"TrainConfig.instruct_plain_prob must be in [0, 1], got {self.instruct_plain_prob!r}")
        if not (0.0 <= self.infill_relabel_prob <= 1.0):
            raise ValueError(f"TrainConfig.infill_relabel_prob must be in [0, 1], got {self.infill_relabel_prob!r}")
        if not (0.0 <= self.drop_prob <= 1.0):
            raise ValueError(f"TrainConfig.drop_prob must be in [0, 1], got {self.drop_prob!r}")
        if not (0.0 <= self.flat_drop_prob <= 1.0):
            raise ValueError(f"TrainConfig.flat_drop_prob must be in [0, 1], got {self.flat_drop_prob!r}")
        if self.stage == "flat" and (self.base_model or self.init):
            raise ValueError("--stage flat trains our own model from scratch (the GReaT baseline); "
                             "--base-model and --init do not apply")
        if self.block_size < 0:
            raise ValueError(f"TrainConfig.block_size must be >= 0, got {self.block_size!r}")
        if isinstance(self.corpus, (str, Path)):  # one directory, as the API and older records give it
            self.corpus = [str(self.corpus)]
        self.corpus = [str(c) for c in self.corpus]
        if self.pack_order not in ("shuffled", "corpus"):
            raise ValueError(f"TrainConfig.pack_order must be shuffled or corpus, got {self.pack_order!r}")
        if self.workers < 0:
            raise ValueError(f"TrainConfig.workers must be >= 0, got {self.workers!r}")
        if not self.corpus or not self.out:
            raise ValueError("TrainConfig.corpus and TrainConfig.out are required")


# --- helpers ----------------------------------------------------------------------------------------------


def get_lr(step: int, cfg: TrainConfig) -> float:
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, cfg.max_steps // 20)
    min_lr = cfg.lr * cfg.min_lr_ratio
    # 1) linear warm-up
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    # 2) past the end, hold the minimum (a resumed run with a larger --max-steps restarts the schedule's tail)
    if step >= cfg.max_steps:
        return min_lr
    # 3) in between, cosine from lr down to min_lr
    ratio = (step - warmup) / max(1, cfg.max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


def _packed_split(streams, block: int):
    """Pre-training rows: the token streams packed into blocks; no rows when they do not fill one block (an empty
    validation split: its loss is then reported as n/a; an empty train split is refused by ``train``)."""
    from . import data

    try:
        return data.Split(blocks=data.pack_blocks(streams, block))
    except ValueError:
        import torch

        return data.Split(blocks=torch.zeros((0, block), dtype=torch.long))


def _hf_split(tok, stage: str, items: list, block: int):
    """A Hugging Face tokenizer's rows: packed EOS-separated texts (pretrain), or ``bos? prompt`` / ``answer eos``
    pairs with the loss on the answer only."""
    from . import data

    eos, bos = tok.eos_token_id, tok.bos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if stage == "pretrain":
        ids = tok(items, add_special_tokens=False)["input_ids"] if items else []
        return _packed_split((x + [eos] for x in ids), block)
    if not items:
        return data.Split(pad_id=pad)
    prompts = tok([p for p, _ in items], add_special_tokens=False)["input_ids"]
    answers = tok([a for _, a in items], add_special_tokens=False)["input_ids"]
    head = [bos] if bos is not None and getattr(tok, "add_bos_token", False) else []  # as the tokenizer itself would
    return data.Split.supervised(((head + p, a + [eos]) for p, a in zip(prompts, answers)), block, pad)


def make_split(stage: str, traces, tokenizer, block: int, cfg: TrainConfig, seed: int, hf: bool, stats=None):
    """Render a split's traces as the stage's examples, in ``cfg.workers`` processes, and tokenize them."""
    from . import data

    if stage == "flat":  # whole traces as flat tables; the module lives with the evaluation it serves
        from ..evaluate.flat import FlatRender

        job = FlatRender(seed=seed, drop_prob=cfg.flat_drop_prob, passes=cfg.text_passes)
    else:
        job = data.StageRender(stage, seed=seed, drop_prob=cfg.drop_prob,
                               passes=cfg.text_passes if stage == "pretrain" else 1, stats=stats,
                               plain_prob=cfg.instruct_plain_prob, relabel_prob=cfg.infill_relabel_prob)
    if hf:  # render in the workers, tokenize here in one batched call of the (Rust) tokenizer
        items = data.render(job, traces, workers=cfg.workers)
        if stage == "pretrain" and cfg.pack_order == "shuffled":
            random.Random(seed).shuffle(items)  # as below
        return _hf_split(tokenizer, stage, items, block)
    if stage in SCRATCH_STAGES:
        streams = data.render(job, traces, finish=data.TokenizeText(tokenizer), workers=cfg.workers)
        # Steps are packed in random order. In corpus order a step's block also holds its parent's step and the
        # traces before it, and the model learns to read those instead of its own prompt: it then copies counts
        # from the wrong place and picks the entry service from the neighbours, while a generated step has
        # nothing but its own prompt before it.
        if cfg.pack_order == "shuffled":
            random.Random(seed).shuffle(streams)
        return _packed_split(streams, block)
    pairs = data.render(job, traces, finish=data.TokenizePair(tokenizer), workers=cfg.workers)
    return data.Split.supervised(pairs, block, tokenizer.pad_id)


def build_tokenizer(traces, workers: int = 0):
    """The domain tokenizer of a corpus: every string value of its plain steps (which hold every service,
    operation, kind and status that the instruct and infill texts can name), counted in parallel."""
    from collections import Counter

    from . import data
    from .tokenizer import TraceTokenizer

    counts: Counter[str] = Counter()
    for part in data.render_chunks(data.StageRender("steps"), traces, TraceTokenizer.count_strings, workers=workers):
        counts.update(part)
    return TraceTokenizer.from_string_counts(counts)



def _check_out_dir(cfg: TrainConfig, out: Path) -> None:
    """The flat baseline and the recursive model never share a directory: their weights and tokenizer would
    overwrite each other while ``training.json`` kept both records."""
    existing = set(lm.read_training_json(out).get("stages", {}))
    if cfg.stage == "flat" and existing - {"flat"}:
        raise UserError(f"{out}: holds a recursive model (stages {', '.join(sorted(existing))}); train the flat "
                        "baseline into a directory of its own")
    if cfg.stage != "flat" and "flat" in existing:
        raise UserError(f"{out}: holds the flat baseline (--stage flat); train the recursive model into another "
                        "directory")


def hardware(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def lora_targets(model) -> list[str] | str:
    """Attention and MLP projections of a Llama-style model; any other architecture: every linear layer."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    found = [n for n in llama if n in names]
    return found if {"q_proj", "v_proj"} <= set(found) else "all-linear"


# --- checkpoints ------------------------------------------------------------------------------------------


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoint" / cfg.stage


def save_checkpoint(cfg, raw_model, optimizer, state: dict, gen, lora: bool) -> None:
    import torch
    from safetensors.torch import save_file, save_model

    d = checkpoint_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    if lora:
        from peft import get_peft_model_state_dict

        save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(raw_model).items()},
                  str(d / "model.safetensors"))
    else:
        save_model(raw_model, str(d / "model.safetensors"))  # handles the tied embedding
    rng = {"torch": torch.get_rng_state(), "batches": gen.get_state()}
    torch.save({**state, "optimizer": optimizer.state_dict(), "rng": rng, "train_config": asdict(cfg)},
               d / "state.pt")


def load_checkpoint(cfg, raw_model, lora: bool) -> dict:
    import torch
    from safetensors.torch import load_file, load_model

    d = checkpoint_dir(cfg)
    if not (d / "state.pt").is_file():
        raise UserError(f"--resume: no checkpoint in {d}")
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(raw_model, load_file(str(d / "model.safetensors")))
    else:
        load_model(raw_model, str(d / "model.safetensors"))
    return torch.load(d / "state.pt", map_location="cpu", weights_only=True)


# --- the run ----------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Run one stage; returns the stage's record as written to ``training.json``."""
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    # -- processes and device ---------------------------------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ddp = world > 1
    device = cfg.device or lm.default_device()
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    master = rank == 0
    if device == "cpu":  # threads that fit the CPUs this process may use (shared among the ranks of a CPU run)
        from ..cpu import configure_torch, cpu_budget

        choice = configure_torch(max(1, cpu_budget().cpus // world) if ddp else None)
        if master:
            log(f"training on the CPU with {choice.describe()}")
    torch.manual_seed(cfg.seed + rank)
    on_cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()  # bf16 on GPU, fp32 on CPU
    lora = cfg.stage not in SCRATCH_STAGES or bool(cfg.base_model)
    hf = bool(cfg.base_model)
    out = Path(cfg.out)
    _check_out_dir(cfg, out)

    # -- data ---------------------------------------------------------------------------------------------------
    from ..dataset import load_corpora

    data_info, splits = load_corpora(cfg.corpus)
    if not splits.get("train"):
        raise UserError(f"{', '.join(cfg.corpus)}: the train split is empty")
    # Millions of span objects that live to the end: keep the cyclic GC from scanning them again and again while
    # the examples are rendered (it more than doubles rendering time otherwise).
    gc.collect()
    gc.freeze()

    # -- model and tokenizer ------------------------------------------------------------------------------------
    model_config, continued_from = None, None
    if hf:
        from .base_model import load_base_model, load_base_tokenizer, resolve_base_model

        base_source = resolve_base_model(cfg.base_model)  # a model directory, a .gguf file, or a package with one
        tokenizer = load_base_tokenizer(base_source)
        model = load_base_model(base_source, device)
        block = cfg.block_size or min(1024, int(getattr(model.config, "max_position_embeddings", 1024)))
    elif cfg.stage in SCRATCH_STAGES:
        from .tokenizer import TraceTokenizer

        if cfg.init:
            # Continued pre-training: the weights, architecture and vocabulary of an existing model; names of the
            # new corpus that its tokenizer lacks are read as <unk>, as at inference.
            init_training = lm.read_training_json(cfg.init)
            if not (Path(cfg.init) / "config.json").is_file() or not init_training.get("config"):
                raise UserError(f"--init {cfg.init}: not a pre-trained otel-tracegen model directory")
            continued_from = {"model": str(cfg.init), "pretrain": init_training.get("stages", {}).get("pretrain")}
        if cfg.resume:
            if not (checkpoint_dir(cfg) / "state.pt").is_file():
                raise UserError(f"--resume: no checkpoint in {checkpoint_dir(cfg)}")
            tokenizer = TraceTokenizer.from_pretrained(checkpoint_dir(cfg))
            state = torch.load(checkpoint_dir(cfg) / "state.pt", map_location="cpu", weights_only=True)
            model_config = lm.TraceLMConfig.from_dict(state["model_config"])
        elif cfg.init:
            tokenizer = lm.load_tokenizer(cfg.init, init_training)
            model_config = lm.TraceLMConfig.from_dict(init_training["config"])
        else:
            tokenizer = build_tokenizer(splits["train"], cfg.workers)
            model_config = lm.preset(cfg.config)
            model_config.vocab_size = tokenizer.vocab_size
        if cfg.init and not cfg.resume:  # a resumed run takes its weights from the checkpoint below
            model = lm.load_base(cfg.init, device)
        else:
            model = lm.build_model(model_config, tokenizer).to(device)
        block = cfg.block_size or model_config.max_position_embeddings
    else:
        init = Path(cfg.init) if cfg.init else (out if (out / "config.json").is_file() else lm.DEFAULT_MODEL_DIR)
        if not (init / "config.json").is_file():
            raise UserError(f"{init}: no pre-trained model to tune (run --stage pretrain first, or pass --init DIR)")
        # The plain pre-trained weights: a previous stage's adapter is not stacked under this one.
        training = lm.read_training_json(init)
        if "flat" in training.get("stages", {}):
            raise UserError(f"{init}: is the flat baseline (--stage flat); {cfg.stage} tunes a recursive model")
        model, tokenizer = lm.load_base(init, device), lm.load_tokenizer(init, training)
        model_config = lm.TraceLMConfig.from_dict(training["config"]) if training.get("config") else None
        block = cfg.block_size or int(model.config.max_position_embeddings)
        if master and not (out / "config.json").is_file():  # make <out> a whole model: base weights beside adapters
            lm.save_model(model, tokenizer, out, dict(training))
            from ..sampling.catalog import CATALOG_FILE

            if (init / CATALOG_FILE).is_file():
                shutil.copyfile(init / CATALOG_FILE, out / CATALOG_FILE)

    if lora:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, target_modules=lora_targets(model))
        model = get_peft_model(model, peft_config)
    model.train()

    stats = None
    if cfg.stage == "instruct":  # thresholds from the train split, asked of both splits
        from .data import corpus_stats_for_instructions

        stats = corpus_stats_for_instructions(splits["train"])
    t_data = time.perf_counter()
    train_split = make_split(cfg.stage, splits["train"], tokenizer, block, cfg, cfg.seed, hf, stats).shard(rank, world)
    val_split = make_split(cfg.stage, splits.get("validation", []), tokenizer, block, cfg, cfg.seed + 1, hf, stats)
    data_seconds = time.perf_counter() - t_data
    if len(train_split) == 0:
        raise UserError(f"{cfg.corpus}: no {cfg.stage} training examples of {block} tokens could be made")

    # -- optimizer: decay 2-D weights only, as nanoGPT ------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=on_cuda)
    gen = torch.Generator().manual_seed(cfg.seed + rank)

    step, best_val, history, tokens_seen, train_seconds, resumed_from = 0, float("inf"), [], 0, 0.0, None
    if cfg.resume:
        ckpt = load_checkpoint(cfg, model, lora)
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        gen.set_state(ckpt["rng"]["batches"])
        step, best_val, history = int(ckpt["step"]), float(ckpt["best_val_loss"]), list(ckpt.get("history", []))
        tokens_seen, train_seconds, resumed_from = int(ckpt["tokens_seen"]), float(ckpt["train_seconds"]), step
        if master:
            log(f"resumed {cfg.stage} from step {step} (best val loss {best_val:.4f})")
    raw_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[int(device.split(":")[1])] if on_cuda else None)

    def forward_loss(x, y, m):
        with autocast:
            return model(input_ids=x.to(device), attention_mask=m.to(device), labels=y.to(device)).loss

    @torch.no_grad()
    def estimate_loss() -> dict:
        """Mean loss over the first eval_batches of each split (fixed rows, so estimates are comparable)."""
        model.eval()
        outl = {}
        for name, split in (("train", train_split), ("val", val_split)):
            losses = []
            for i in range(cfg.eval_batches):
                if i * cfg.batch_size >= len(split):
                    break
                idx = torch.arange(i * cfg.batch_size, min(len(split), (i + 1) * cfg.batch_size))
                losses.append(forward_loss(*split.rows(idx)).item())
            outl[name] = sum(losses) / len(losses) if losses else None
        model.train()
        return outl

    def checkpoint_state() -> dict:
        return {"step": step, "best_val_loss": best_val, "history": history, "tokens_seen": tokens_seen,
                "train_seconds": train_seconds, "model_config": model_config.to_dict() if model_config else {}}

    if master and cfg.stage in SCRATCH_STAGES and not hf:
        checkpoint_dir(cfg).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(checkpoint_dir(cfg))
        what = f"continuing {cfg.init}" if continued_from else cfg.config
        log(f"{cfg.stage} {what}: {lm.count_parameters(raw_model):,} parameters, vocab {tokenizer.vocab_size}, "
            f"{len(train_split)} train / {len(val_split)} val blocks of {block} tokens, device {device}")
    elif master:
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        log(f"{cfg.stage}: LoRA r={cfg.lora_r}, {trainable:,} trainable parameters, "
            f"{len(train_split)} train / {len(val_split)} val examples, device {device}")

    # -- the loop -------------------------------------------------------------------------------------------------
    recent: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, desc=cfg.stage, unit="step")
    grouped = None
    if train_split.blocks is None:  # ragged supervised rows: batch similar lengths together (less padding)
        from .data import LengthGroupedBatches

        grouped = LengthGroupedBatches([len(q) for q in train_split.sequences], cfg.batch_size, gen)
    while True:
        if (step % cfg.eval_every == 0 and step != resumed_from) or step >= cfg.max_steps:
            losses = estimate_loss()
            history.append({"step": step, **losses})
            if losses["val"] is not None and losses["val"] < best_val:
                best_val = losses["val"]
            if master:
                with tqdm.external_write_mode():  # the line goes where log sends it, the bar redraws below
                    log(f"step {step}: train loss {losses['train']:.4f}, val loss "
                        + (f"{losses['val']:.4f}" if losses["val"] is not None else "n/a (empty validation split)"))
                train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint(cfg, raw_model, optimizer, checkpoint_state(), gen, lora)
        if step >= cfg.max_steps:
            break
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if grouped is not None:
            idx = grouped.next()
        else:
            idx = torch.randint(len(train_split), (min(cfg.batch_size, len(train_split)),), generator=gen)
        x, y, m = train_split.rows(idx)
        loss = forward_loss(x, y, m)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(m.sum()) * world
        recent = (recent + [loss.item()])[-20:]
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{recent[-1]:.4f}", lr=f"{lr:.2e}")
    bar.close()
    train_seconds += time.perf_counter() - t0

    # -- save (rank 0 only) -------------------------------------------------------------------------------------
    final = history[-1]
    record = {
        "steps": step,
        "resumed_from": resumed_from,
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
        "train_loss": final["train"],
        "train_loss_recent": sum(recent) / len(recent) if recent else None,
        "val_loss": final["val"],
        "best_val_loss": best_val if best_val < float("inf") else None,
        "history": history,
        "wall_s": round(train_seconds, 3),
        "device": device,
        "world_size": world,
        "hardware": hardware(device),
        "examples": {"train": len(train_split) * world, "validation": len(val_split)},
        "example_stats": {"train": train_split.stats, "validation": val_split.stats},
        "block_size": block,
        "corpus": list(cfg.corpus),
        "data_prep_s": round(data_seconds, 3),
        "args": asdict(cfg),
    }
    if continued_from is not None:
        record["continued_from"] = continued_from
    if master:
        card = {"stages": {cfg.stage: record}}
        if hf:
            card.update(base_model=base_source.record, tokenizer="auto", data=data_info)
            from ..sampling.catalog import Catalog

            out.mkdir(parents=True, exist_ok=True)
            Catalog.from_traces(splits["train"]).save(out)  # what the constrained sampler may write
        if cfg.stage in SCRATCH_STAGES and not hf:
            card.update(config=model_config.to_dict(), parameters=lm.count_parameters(raw_model), tokenizer="trace",
                        data=data_info, base_model=None)
            if cfg.stage == "flat":
                card["encoding"] = "flat"  # the GReaT baseline: what a harness checks before sampling it
            lm.save_model(raw_model, tokenizer, out, card)
            from ..sampling.catalog import Catalog

            Catalog.from_traces(splits["train"]).save(out)  # what the constrained sampler may write
        else:
            adapter_dir = out / lm.ADAPTERS_DIR / cfg.stage
            if not hf:
                # The base is the model directory itself: "." keeps the adapter valid wherever the directory is
                # copied, where the absolute training path would name a machine that no longer exists.
                for peft_cfg in raw_model.peft_config.values():
                    peft_cfg.base_model_name_or_path = "."
            raw_model.save_pretrained(str(adapter_dir), safe_serialization=True)
            (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's boilerplate; the model card is ours
            lm.write_training_json(out, card)
        log(f"{cfg.stage}: {step} steps, {tokens_seen:,} tokens, {record['tokens_per_s']} tokens/s, train loss "
            f"{record['train_loss']:.4f}, val loss {record['val_loss']}, {record['wall_s']} s on {device}; "
            f"saved to {out}")
    if ddp:
        dist.destroy_process_group()
    return record


def config_from_args(args) -> TrainConfig:
    """The argparse namespace of ``otel-tracegen train`` as a ``TrainConfig``."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k in names and v is not None})


def add_arguments(p) -> None:
    """``otel-tracegen train`` options, one per ``TrainConfig`` field, help from the field's metadata."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "").replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=None, help=help_)
        elif f.name == "stage":
            p.add_argument(flag, required=True, choices=STAGES, help=help_)
        elif f.name == "corpus":
            p.add_argument(flag, required=True, nargs="+", metavar="DIR", help=help_)
        elif f.name == "out":
            p.add_argument(flag, required=True, help=help_)
        elif f.name == "config":
            p.add_argument(flag, choices=sorted(lm.PRESETS), default=None, help=help_ + f" (default {f.default})")
        elif f.name == "pack_order":
            p.add_argument(flag, choices=("shuffled", "corpus"), default=None, help=help_ + f" (default {f.default})")
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            p.add_argument(flag, type=kind, default=None, help=f"{help_} (default {f.default!r})")
