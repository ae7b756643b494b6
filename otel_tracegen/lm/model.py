"""The trace language model: a small Llama-style causal transformer, built from scratch with ``transformers``.

``TraceLMConfig`` holds the few numbers that define the architecture; ``PRESETS`` names them:

- ``tiny``: ~100k parameters, trains on a laptop CPU in seconds (tests, documentation examples);
- ``mini``: ~2.5M parameters (~10 MB), the lower point of the size trade-off in the model card;
- ``small``: ~6.4M parameters, ~26 MB of fp32 safetensors (the shipped default; ≤ 50 MB);
- ``medium``: ~12.7M parameters (~51 MB fp32), the upper point of the trade-off.

A model directory is the Hugging Face ``save_pretrained`` layout plus our own files::

    model/
      config.json  generation_config.json  model.safetensors    # LlamaForCausalLM, safetensors only
      tokenizer files                                              # TraceTokenizer.save_pretrained
      training.json                                                # stages, losses, data, hardware, time
      adapters/instruct/adapter_model.safetensors  adapter_config.json   # LoRA (peft), one folder per stage
      adapters/infill/...

``load_model()`` never runs pickle or remote code: ``use_safetensors=True`` and ``trust_remote_code=False``. By
default it runs our own models on :class:`~otel_tracegen.lm.runtime.TraceLMRuntime` (torch and safetensors only:
importing transformers and peft alone takes longer than the 3 s a load may take on a CPU); ``backend="transformers"``
gives the ``LlamaForCausalLM`` / ``PeftModel`` that training uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..report import UserError

# The shipped model lives in the repository's top-level model/ and is mapped into the package as
# otel_tracegen/default_model (pyproject.toml: [tool.setuptools] package-dir), so that a wheel carries it.
SHIPPED_MODEL_PACKAGE_DIR = "default_model"


def find_shipped_model_dir() -> Path:
    """Where the shipped default model is: inside the installed package (a wheel or a plain ``pip install .``),
    else the checkout's ``model/`` (a source checkout, or an editable install, which maps packages to the source
    tree). The first of the two that holds a model wins; the package's place is returned when neither does, so
    that the error names where an installed model was expected."""
    from importlib.resources import files

    packaged = files("otel_tracegen") / SHIPPED_MODEL_PACKAGE_DIR
    packaged_dir = Path(str(packaged))  # a real directory for any file-system install (not a zip import)
    if (packaged_dir / "config.json").is_file():
        return packaged_dir
    checkout = Path(__file__).resolve().parents[2]
    # Only a source checkout: an installed package's parents[2] is site-packages, whose "model" is not ours.
    if (checkout / "pyproject.toml").is_file() and (checkout / "model" / "config.json").is_file():
        return checkout / "model"
    return packaged_dir


DEFAULT_MODEL_DIR = find_shipped_model_dir()
TRAINING_JSON = "training.json"
ADAPTERS_DIR = "adapters"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class TraceLMConfig:
    """Architecture of the trace language model.

    Args:
        vocab_size: tokens in the vocabulary; 0 means "take it from the tokenizer" (filled in by ``llama_config``).
        hidden_size: width of the residual stream.
        n_layers: transformer blocks.
        n_heads: attention (query) heads; must divide ``hidden_size``.
        n_kv_heads: key/value heads (grouped-query attention); must divide ``n_heads``.
        intermediate_size: width of the SwiGLU MLP.
        max_position_embeddings: context length in tokens; training blocks are this long.
        rope_theta: base of the rotary position embedding.
        dropout: attention dropout (0 for pre-training on plenty of data).
    """

    vocab_size: int = field(default=0, metadata={"help": "vocabulary size; 0 = from the tokenizer"})
    hidden_size: int = field(default=256, metadata={"help": "width of the residual stream"})
    n_layers: int = field(default=8, metadata={"help": "number of transformer blocks"})
    n_heads: int = field(default=8, metadata={"help": "attention heads; must divide hidden_size"})
    n_kv_heads: int = field(default=4, metadata={"help": "key/value heads (GQA); must divide n_heads"})
    intermediate_size: int = field(default=768, metadata={"help": "width of the SwiGLU MLP"})
    max_position_embeddings: int = field(default=1024, metadata={"help": "context length in tokens"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base"})
    dropout: float = field(default=0.0, metadata={"help": "attention dropout probability"})

    def __post_init__(self) -> None:
        for name in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TraceLMConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            raise ValueError(f"TraceLMConfig.vocab_size must be an integer >= 0, got {self.vocab_size!r}")
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"TraceLMConfig.n_heads={self.n_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"TraceLMConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if not (self.rope_theta > 0):
            raise ValueError(f"TraceLMConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"TraceLMConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceLMConfig:
        """Build from a dict; keys from a newer version are ignored (they cannot change our architecture)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def llama_config(self, tokenizer=None):
        """The ``transformers.LlamaConfig`` for this architecture, special token ids from ``tokenizer``."""
        from transformers import LlamaConfig

        vocab = self.vocab_size or (tokenizer.vocab_size if tokenizer is not None else 0)
        if vocab < 1:
            raise ValueError("TraceLMConfig.vocab_size is 0 and no tokenizer was given to take it from")
        special = {}
        if tokenizer is not None:
            special = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            attention_dropout=self.dropout,
            tie_word_embeddings=True,  # halves the embedding cost; matters for a small model with a small vocab
            **special,
        )


PRESETS: dict[str, TraceLMConfig] = {
    # tiny: seconds on a CPU; for tests and the README's first run.
    "tiny": TraceLMConfig(
        hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_position_embeddings=128
    ),
    # mini: 6 x (192 wide, 6 heads, GQA 3), SwiGLU 512: ~2.4M, ~10 MB fp32 (the size trade-off's lower point).
    "mini": TraceLMConfig(
        hidden_size=192, n_layers=6, n_heads=6, n_kv_heads=3, intermediate_size=512, max_position_embeddings=1024
    ),
    # small: the shipped default. 8 x (256 wide, 8 heads, GQA 4), SwiGLU 768: ~6.3M + embeddings, ~30 MB fp32.
    "small": TraceLMConfig(
        hidden_size=256, n_layers=8, n_heads=8, n_kv_heads=4, intermediate_size=768, max_position_embeddings=1024
    ),
    # medium: 8 x (384 wide, 6 heads, GQA 2), SwiGLU 1024: ~12.7M, ~51 MB fp32 (the size trade-off's upper point).
    "medium": TraceLMConfig(
        hidden_size=384, n_layers=8, n_heads=6, n_kv_heads=2, intermediate_size=1024, max_position_embeddings=1024
    ),
}


def preset(name: str) -> TraceLMConfig:
    if name not in PRESETS:
        raise ValueError(f"config must be one of {sorted(PRESETS)}, got {name!r}")
    return TraceLMConfig.from_dict(PRESETS[name].to_dict())  # a copy


def build_model(config: TraceLMConfig, tokenizer):
    """A freshly initialised ``LlamaForCausalLM`` (nothing downloaded)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config.llama_config(tokenizer))


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# --- save / load ------------------------------------------------------------------------------------------


def read_training_json(path: str | Path) -> dict:
    p = Path(path) / TRAINING_JSON
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def write_training_json(out_dir: str | Path, card: dict) -> None:
    """Merge ``card`` into ``training.json``: top-level keys replace, ``stages`` merge stage by stage."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = read_training_json(out)
    stages = {**data.get("stages", {}), **card.get("stages", {})}
    data.update(card)
    data["stages"] = stages
    data["otel_tracegen_version"] = __version__
    data["updated_unix"] = int(time.time())
    (out / TRAINING_JSON).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_model(model, tokenizer, out_dir: str | Path, card: dict) -> Path:
    """Write the model (safetensors ``save_pretrained``), its tokenizer and ``training.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_training_json(out, card)
    return out


@dataclass
class LoadedModel:
    """What ``load_model`` returns.

    ``backend == "runtime"``: ``model`` is a :class:`~otel_tracegen.lm.runtime.TraceLMRuntime` (``forward`` returns
    ``(logits, cache)``, ``sample`` generates, ``set_adapter(name | None)`` switches adapters; none is active at
    first). ``backend == "transformers"``: a ``LlamaForCausalLM``, or a ``PeftModel`` when adapters were found (the
    first one active; ``with model.disable_adapter():`` runs the plain pre-trained model).
    """

    model: Any
    tokenizer: Any
    path: Path
    device: str
    adapters: list[str]
    training: dict
    backend: str = "transformers"

    def __iter__(self):  # model, tokenizer = load_model(...)
        return iter((self.model, self.tokenizer))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def find_adapters(path: str | Path) -> list[str]:
    """Stage names with a LoRA adapter under ``path/adapters/<stage>/``."""
    root = Path(path) / ADAPTERS_DIR
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file())


def load_tokenizer(path: str | Path, training: dict | None = None):
    """Our ``TraceTokenizer`` for trace models; the base model's own ``AutoTokenizer`` for ``--base-model`` runs."""
    training = training if training is not None else read_training_json(path)
    if training.get("tokenizer") == "auto":
        from .base_model import load_base_tokenizer, resolve_base_model

        return load_base_tokenizer(resolve_base_model(str(path)))
    from .tokenizer import TraceTokenizer

    return TraceTokenizer.from_pretrained(path)


def load_base(path: str | Path, device: str | None = None, dtype=None):
    """A local Hugging Face causal LM, from safetensors only, never downloaded. ``path`` may also name a GGUF
    model: a ``.gguf`` file, a directory holding one, or a package shipping one (see ``base_model``)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        from .base_model import load_base_model, resolve_base_model

        return load_base_model(resolve_base_model(path), device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), use_safetensors=True, local_files_only=True, trust_remote_code=False, dtype=dtype
        )
    except OSError as e:
        raise UserError(f"{p}: cannot load the model from safetensors ({e})") from None
    return model.to(device or default_device())


BACKENDS = ("auto", "runtime", "transformers")
DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: str | None, device: str):
    """A torch dtype for ``dtype`` (``None``: float32; ``"auto"``: bfloat16 on a GPU, or on a CPU where it measured
    clearly faster than float32 (:mod:`.cpu_dtype`: measured once per machine and remembered), else float32)."""
    import torch

    if dtype is None or dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        from .cpu_dtype import cpu_prefers_bf16

        return torch.bfloat16 if device == "cpu" and cpu_prefers_bf16() else torch.float32
    raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def resolve_dtype_name(dtype: str | None, device: str) -> str:
    """What ``dtype`` resolves to on ``device``, by name ("float32" or "bfloat16"): what to hand a process that must
    run the same arithmetic (``"auto"`` is measured on a CPU, and could resolve otherwise there)."""
    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def load_model(path: str | Path | None = None, device: str | None = None, *, backend: str = "auto",
               dtype: str | None = None) -> LoadedModel:
    """Load a model directory (default: the shipped ``model/``) with its tokenizer and any LoRA adapters.

    Runs on ``device``, else the GPU if there is one, else the CPU. Safetensors only; no remote code.
    ``backend``: ``"runtime"`` (our torch-only implementation, for our own trace models), ``"transformers"``
    (``LlamaForCausalLM`` + peft), or ``"auto"``: the runtime where it applies, else transformers (``--base-model``
    runs, architectures the runtime does not implement).
    ``dtype``: ``None``/``"float32"`` (exact), ``"bfloat16"``, or ``"auto"`` (bfloat16 on a GPU, or on a CPU where it
    measured clearly faster than float32; sampling then differs from float32 in rounding only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    p = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not p.is_dir():
        hint = (" (the shipped default model is missing: reinstall otel-tracegen from a wheel or an sdist, which "
                "carry it, or see `otel-tracegen train`)") if path is None else ""
        raise UserError(f"no model directory at {p}{hint}")
    training = read_training_json(p)
    device = device or default_device()
    if device == "cpu":  # in a command: threads that fit the CPUs it may use, unless it chose already
        from ..cpu import configure_for_command

        configure_for_command()
    torch_dtype = resolve_dtype(dtype, device)
    ours = (p / "config.json").is_file() and training.get("tokenizer") != "auto"
    if backend != "transformers" and ours:
        from .runtime import TraceLMRuntime

        try:
            model = TraceLMRuntime.from_pretrained(p, device=device, dtype=torch_dtype)
        except ValueError as e:
            if backend == "runtime":
                raise UserError(f"{p}: the runtime cannot run this model ({e})") from None
        else:
            model.set_adapter(None)  # the plain pre-trained model until a task picks its adapter
            return LoadedModel(model=model, tokenizer=load_tokenizer(p, training), path=p, device=device,
                               adapters=model.adapters, training=training, backend="runtime")
    elif backend == "runtime":
        raise UserError(f"{p}: the runtime runs only our own trace models, not a --base-model run")
    # A --base-model run stores only adapters and names the base it was tuned from: a model directory, a GGUF
    # file, or a package shipping one.
    if (p / "config.json").is_file():
        base = str(p)
    elif training.get("base_model"):
        base = str(training["base_model"])
    else:
        raise UserError(f"{p}: not a model directory (no config.json, and training.json names no base model)")
    model = load_base(base, device, None if dtype is None else torch_dtype)
    tokenizer = load_tokenizer(base if training.get("tokenizer") == "auto" else p, training)
    adapters = find_adapters(p)
    if adapters:
        from peft import PeftModel

        root = p / ADAPTERS_DIR
        # peft reads adapter configs as JSON and runs no model code; the flag is passed for the rule that every
        # from_pretrained says it (tests/test_install.py), and peft ignores it.
        model = PeftModel.from_pretrained(model, str(root / adapters[0]), adapter_name=adapters[0],
                                          trust_remote_code=False)
        for name in adapters[1:]:
            model.load_adapter(str(root / name), adapter_name=name)
        model = model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=p, device=device, adapters=adapters, training=training,
                       backend="transformers")


def describe_model(path: str | Path | None = None) -> dict:
    """The facts ``otel-tracegen model info`` prints, without moving anything to a GPU."""
    loaded = load_model(path, device="cpu")
    p = loaded.path
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and "checkpoint" not in f.relative_to(p).parts)
    seen: set[int] = set()
    base = adapter = 0
    for name, param in loaded.model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if "lora_" in name or ".lora." in name:  # peft's names, the runtime's
            adapter += param.numel()
        else:
            base += param.numel()
    tok = loaded.tokenizer
    catalog = None
    if (p / "catalog.json").is_file():
        from ..sampling.catalog import Catalog

        cat = Catalog.load(p)
        catalog = {"services": len(cat.operations), "operations": sum(map(len, cat.operations.values())),
                   "entry_services": sorted(cat.entries), "max_depth": cat.max_depth, "traces": cat.traces}
    return {
        "path": str(p),
        "catalog": catalog,
        "parameters": base,
        "adapter_parameters": adapter,
        "size_bytes": size,
        "vocab_size": len(tok),
        "adapters": loaded.adapters,
        "base_model": loaded.training.get("base_model"),
        "data": loaded.training.get("data", {}),
        "stages": {
            name: {k: s.get(k) for k in ("steps", "val_loss", "train_loss", "wall_s", "device")}
            for name, s in loaded.training.get("stages", {}).items()
        },
    }
