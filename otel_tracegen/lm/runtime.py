"""A small inference runtime for our trace language model that needs only ``torch`` and ``safetensors``.

Why: ``from transformers import LlamaForCausalLM`` alone costs ~2.6 s on a CPU (it pulls in torch._dynamo,
torch.distributed.tensor, scipy, sympy), on top of ~1 s for torch, and loading must stay within 3 s. The model
is a plain Llama, so a few dozen lines of PyTorch compute the same logits as transformers 5.x
``LlamaForCausalLM`` (and peft LoRA) for our configs. Anything this file does not implement (other model
types, RoPE scaling, biases, DoRA, ...) is refused with a ``ValueError`` naming it, so callers fall back to
:func:`otel_tracegen.lm.model.load_model`.

It reads the same directory ``save_model`` writes::

    model/config.json  model/model.safetensors                 # LlamaForCausalLM.save_pretrained
    model/adapters/<name>/adapter_config.json  adapter_model.safetensors   # peft LoRA, one per stage

Inference only: no dropout, no gradients, no training. Safetensors only: nothing is unpickled.

    >>> lm = TraceLMRuntime.from_pretrained("model")            # doctest: +SKIP
    >>> lm.set_adapter("instruct")                               # doctest: +SKIP
    >>> lm.sample([[1, 5, 9]], max_new_tokens=50, eos_id=2, pad_id=0, temperature=0)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_DIR = "adapters"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


LogitsHook = Callable[[list[int], list[list[int]], torch.Tensor], torch.Tensor]
ForcedTokens = Callable[[list[int], list[int]], list[list[int]]]


# --- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeConfig:
    """The numbers of a Hugging Face Llama ``config.json`` that this runtime uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, d: dict) -> RuntimeConfig:
        """Read a ``LlamaConfig`` dict (transformers 4.x or 5.x spelling); ``ValueError`` names what is unsupported.

        Defaults are those of ``transformers.LlamaConfig`` for the keys ``save_pretrained`` may leave out.
        """
        unsupported = []
        if d.get("model_type") != "llama":
            unsupported.append(f"model_type={d.get('model_type')!r} (only 'llama')")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            unsupported.append(f"hidden_act={d.get('hidden_act')!r} (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                unsupported.append(f"{key}=true")
        if d.get("quantization_config"):
            unsupported.append("quantization_config")
        # transformers 5 writes rope_parameters={"rope_type", "rope_theta"}; 4.x wrote rope_theta + rope_scaling.
        rope = d.get("rope_parameters") or {}
        for where, spec in (("rope_parameters", rope), ("rope_scaling", d.get("rope_scaling") or {})):
            rope_type = spec.get("rope_type", spec.get("type", "default"))
            if rope_type != "default":
                unsupported.append(f"{where}.rope_type={rope_type!r} (only 'default')")
            if spec.get("partial_rotary_factor", 1.0) != 1.0:
                unsupported.append(f"{where}.partial_rotary_factor={spec['partial_rotary_factor']!r}")
        if unsupported:
            raise ValueError("TraceLMRuntime does not support this model config: " + "; ".join(unsupported))

        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if not isinstance(d.get(k), int)]
        if missing:
            raise ValueError(f"model config lacks integer {', '.join(missing)}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"num_key_value_heads={kv_heads} must divide num_attention_heads={heads}")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )


# --- KV cache ------------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, so that each decoding step only computes its new token.

    ``keys[i]`` / ``values[i]``: layer ``i``'s buffers, (batch, kv_heads, room, head_dim), RoPE already applied;
    the first ``length`` positions are used. The room doubles when full, so appending a token does not copy the
    whole cache each step (``torch.cat`` did, and that was most of the decoding time); ``capacity`` sets the
    initial room when the final length is known.
    ``mask``: (batch, length) bool, which cached positions are real tokens (False: left padding).
    ``seen``: (batch,) long, real tokens per row so far, i.e. the position of the row's next token.
    """

    capacity: int = 0
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    mask: torch.Tensor | None = None
    seen: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Cached positions (padding included)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values of ``layer`` (called before ``mask`` grows); return all of them."""
        start, end = self.length, self.length + k.shape[2]
        if layer == len(self.keys):
            room = max(self.capacity, end)
            self.keys.append(k.new_empty(*k.shape[:2], room, k.shape[3]))
            self.values.append(v.new_empty(*v.shape[:2], room, v.shape[3]))
        elif end > self.keys[layer].shape[2]:
            room = max(end, 2 * self.keys[layer].shape[2])
            for bufs in (self.keys, self.values):
                old = bufs[layer]
                bufs[layer] = old.new_empty(*old.shape[:2], room, old.shape[3])
                bufs[layer][:, :, :start] = old[:, :, :start]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (a long tensor), e.g. drop the rows that have finished sampling."""
        # Only the used positions are copied (the room beyond them may be several times larger); the buffers
        # grow again by doubling when needed.
        n = self.length
        self.keys = [k[:, :, :n].index_select(0, rows) for k in self.keys]
        self.values = [v[:, :, :n].index_select(0, rows) for v in self.values]
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, rows)


@dataclass
class RaggedKVCache:
    """Keys and values of rows that grow by different numbers of tokens per call (no padding stored).

    Row ``b``'s tokens sit at positions ``0 .. lens[b] - 1`` of ``keys[i][b]`` (layer ``i``: (batch, kv_heads,
    room, head_dim), RoPE applied). Used by :meth:`TraceLMRuntime.sample`, where a row may append one sampled
    token and the forced tokens after it in the same call while its neighbours append one.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lens: torch.Tensor  # (batch,) long

    @classmethod
    def empty(cls, cfg: RuntimeConfig, batch: int, room: int, dtype: torch.dtype, device) -> RaggedKVCache:
        # Zeros, not empty: a padded query may look at unwritten positions, and garbage there could be NaN.
        shape = (batch, cfg.num_key_value_heads, room, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
                   torch.zeros(batch, dtype=torch.long, device=device))  # fmt: skip

    def reserve(self, length: int) -> None:
        """Room for ``length`` positions per row (doubling, so appends stay amortized O(1))."""
        room = self.keys[0].shape[2]
        if length <= room:
            return
        room = max(length, 2 * room)
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                new = old.new_zeros(*old.shape[:2], room, old.shape[3])
                new[:, :, : old.shape[2]] = old
                bufs[i] = new

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (the used positions only)."""
        n = int(self.lens.max()) if len(self.lens) else 0
        self.keys = [k[:, :, :n].index_select(0, rows) for k in self.keys]
        self.values = [v[:, :, :n].index_select(0, rows) for v in self.values]
        self.lens = self.lens.index_select(0, rows)


@dataclass
class Packed:
    """Where the ``N`` tokens of one ragged call go: row ``row[n]``, position ``pos[n]`` in that row, slot
    ``slot[n]`` of the (batch x width) query grid attention pads them into; ``last[b]``: row ``b``'s last token."""

    row: torch.Tensor
    pos: torch.Tensor
    slot: torch.Tensor
    last: torch.Tensor
    width: int
    query_pos: torch.Tensor  # (batch, width): position of each query slot (padding slots: past the row's end)
    length: int  # positions attention reads (max over rows after this call)
    mask: torch.Tensor  # (batch, 1, width, length): causal, per row; built once for all layers

    @classmethod
    def of(cls, chunks: Sequence[int], lens: torch.Tensor) -> Packed:
        """For ``chunks[b]`` new tokens (>= 0) per row after ``lens[b]`` cached ones."""
        dev = lens.device
        counts = torch.tensor(chunks, dtype=torch.long, device=dev)
        width = max(max(chunks), 1)
        row = torch.repeat_interleave(torch.arange(len(chunks), device=dev), counts)
        offset = torch.arange(len(row), device=dev) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        pos = lens[row] + offset
        query_pos = lens[:, None] + torch.arange(width, device=dev)[None, :]
        length = int((lens + counts).max())
        mask = (torch.arange(length, device=dev)[None, None, :] <= query_pos[:, :, None])[:, None]
        return cls(row=row, pos=pos, slot=row * width + offset, last=counts.cumsum(0) - 1, width=width,
                   query_pos=query_pos, length=length, mask=mask)  # fmt: skip


# --- layers --------------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """One low-rank adapter of one linear layer: ``delta(x) = ((x A^T) B^T) * scale``, as peft computes it."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=False)  # (r, in)
        self.B = nn.Parameter(B, requires_grad=False)  # (out, r)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale


class Linear(nn.Module):
    """A bias-free linear layer with any number of LoRA adapters, of which at most one (``active``) is applied.

    The active adapter is merged into ``effective`` (``W + scale * B A``) when it is chosen, so that decoding
    pays for one matrix product per layer, not three (unmerged LoRA was 15 % of CPU decoding time).
    """

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.lora = nn.ModuleDict()
        self.active: str | None = None
        self.register_buffer("effective", None, persistent=False)

    def merge(self) -> torch.Tensor:
        """Recompute and return ``effective`` for the current weights and ``active`` adapter."""
        w = self.weight.detach()  # a plain tensor sharing the weight's storage (a Parameter would re-register)
        lora = self.lora[self.active] if self.active is not None and self.active in self.lora else None
        if lora is not None:
            delta = (lora.B.float() @ lora.A.float()) * lora.scale  # in float32: bf16 would round the sum twice
            w = (w.float() + delta).to(w.dtype)
        self.effective = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective if self.effective is not None else self.merge())


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 like transformers' ``LlamaRMSNorm``."""

    def __init__(self, dim: int, eps: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (batch, 1, T, head_dim) for ``positions`` (batch, T); float32 math as in transformers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: RuntimeConfig, layer: int, **kw) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = (
            layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, **kw)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, **kw)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, **kw)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, **kw)
        self.register_buffer("qkv", None, persistent=False)

    def fuse(self) -> None:
        """One (q|k|v) matrix from the merged projections: one larger product runs faster than three small ones."""
        self.qkv = torch.cat([self.q_proj.merge(), self.k_proj.merge(), self.v_proj.merge()])
        self.o_proj.merge()

    def forward(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv is None:
            self.fuse()
        q, k, v = F.linear(x, self.qkv).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                               self.n_kv * self.head_dim], dim=-1)  # fmt: skip
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o_proj(self._attend(q, k, v, mask).reshape(B, T, self.n_heads * self.head_dim))

    def forward_packed(self, x, cos, sin, packed: Packed, cache: RaggedKVCache) -> torch.Tensor:
        """``x``: (N, hidden), the new tokens of every row back to back (see :class:`Packed`)."""
        N = x.shape[0]
        q, k, v = F.linear(x, self.qkv).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                               self.n_kv * self.head_dim], dim=-1)  # fmt: skip
        q = q.view(N, self.n_heads, self.head_dim)
        k = k.view(N, self.n_kv, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        keys[packed.row, :, packed.pos] = k
        values[packed.row, :, packed.pos] = v.view(N, self.n_kv, self.head_dim)
        B, W = packed.query_pos.shape
        grid = q.new_zeros(B * W, self.n_heads, self.head_dim)
        grid[packed.slot] = q
        grid = grid.view(B, W, self.n_heads, self.head_dim).transpose(1, 2)  # (B, heads, W, head_dim)
        L = packed.length
        y = self._attend(grid, keys[:, :, :L], values[:, :, :L], packed.mask)  # (B, W, heads, head_dim)
        y = y.reshape(B * W, self.n_heads * self.head_dim)[packed.slot]
        return self.o_proj(y)

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v, grouped-query, returned as (B, T, heads, head_dim).

        Written out rather than ``F.scaled_dot_product_attention``: decoding asks for one query against a long
        cache, a shape where the CPU kernels are 2.5x (float32) to 8x (bfloat16) slower than two batched
        matrix products (measured, 1 thread: B=100, cache 500: 6.4 vs 6.1 ms fp32, 27 vs 3.5 ms bf16). Each
        key/value head serves ``rep`` query heads (transformers' ``repeat_kv`` order) without being copied.
        """
        B, H, T, D = q.shape
        rep = H // self.n_kv
        q = q.reshape(B, self.n_kv, rep * T, D)  # head h = j * rep + r uses key/value head j
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * D**-0.5  # (B, kv, rep*T, L)
        scores = scores.view(B, self.n_kv, rep, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, self.n_kv, rep * T, -1)
        y = torch.matmul(probs, v).view(B, H, T, D)
        return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: RuntimeConfig, **kw) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.register_buffer("gate_up", None, persistent=False)

    def fuse(self) -> None:
        """One (gate|up) matrix from the merged projections (see ``Attention.fuse``)."""
        self.gate_up = torch.cat([self.gate_proj.merge(), self.up_proj.merge()])
        self.down_proj.merge()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            self.fuse()
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: RuntimeConfig, layer: int, **kw) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, layer, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)

    def forward(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_packed(self, x, cos, sin, packed: Packed, cache: RaggedKVCache) -> torch.Tensor:
        x = x + self.self_attn.forward_packed(self.input_layernorm(x), cos, sin, packed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Decoder(nn.Module):
    """The ``model.`` part of ``LlamaForCausalLM``; module names match its state dict."""

    def __init__(self, cfg: RuntimeConfig, **kw) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(Block(cfg, i, **kw) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)


# --- the model -----------------------------------------------------------------------------------------------


def _adapter_dirs(path: Path) -> list[str]:
    root = path / ADAPTERS_DIR
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file())


def _lora_scale(name: str, cfg: dict) -> float:
    """alpha / r from a peft ``adapter_config.json``; ``ValueError`` for the LoRA variants not implemented here."""
    unsupported = []
    if cfg.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type={cfg.get('peft_type')!r}")
    for key in ("use_rslora", "use_dora", "use_qalora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(key):
            unsupported.append(f"{key}=true")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "trainable_token_indices",
                "alora_invocation_tokens", "target_parameters"):
        if cfg.get(key):
            unsupported.append(f"{key}={cfg[key]!r}")
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not set(targets) <= set(LORA_TARGETS):
        unsupported.append(f"target_modules={sorted(set(targets) - set(LORA_TARGETS))} (only {list(LORA_TARGETS)})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        unsupported.append(f"r={r!r}, lora_alpha={alpha!r}")
    if unsupported:
        raise ValueError(f"TraceLMRuntime does not support adapter {name!r}: " + "; ".join(unsupported))
    return alpha / r


class _ForcedScorer:
    """Adds to a sample's ``scores`` what the masks cost: the log-probability of each forced token and the log of
    the probability mass left at each drawn one (see :meth:`TraceLMRuntime.sample`). The vocabulary is computed
    only where a scored token is predicted (not over the prompts)."""

    def __init__(self, n: int, score_from: Sequence[int] | None, temperature: float, lm_head: nn.Module, dev) -> None:
        self.score_from = torch.tensor(list(score_from) if score_from is not None else [2**62] * n, device=dev)
        self.t = temperature if temperature > 0 else 1.0
        self.lm_head = lm_head
        self.total = torch.zeros(n, device=dev)
        self.prev: torch.Tensor | None = None  # (n, vocab): log-probs for a row's next token, when it is forced
        self.drawn_next = torch.zeros(n, dtype=torch.bool, device=dev)  # its next fed token was drawn (counted)
        self.dev = dev

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lm_head(hidden).float() / self.t, dim=-1)

    def fed(self, rows: list[int], take: list[int], pending: list[bool], ids: torch.Tensor, packed: Packed,
            hidden: torch.Tensor, first: bool) -> None:
        """Score the tokens just fed (``hidden``: the final hidden state at each); ``pending``: whether a row has
        fixed text still queued (its next token is scored with this call's last position)."""
        rows_t = torch.tensor(rows, device=self.dev)
        offset = packed.slot - packed.row * packed.width
        owner = rows_t[packed.row]
        if first:
            counted = offset >= torch.clamp(self.score_from[owner], min=1)  # the first token has nothing before it
        else:
            counted = ~((offset == 0) & self.drawn_next[owner])
        inner = torch.nonzero(counted & (offset > 0)).squeeze(1)  # predicted by the position before, in this call
        if len(inner):
            lp = self._log_probs(hidden[inner - 1]).gather(1, ids[inner, None]).squeeze(1)
            self.total.index_add_(0, owner[inner], lp)
        outer = torch.nonzero(counted & (offset == 0)).squeeze(1)  # by the last position of the call before
        if len(outer) and self.prev is not None:
            self.total.index_add_(0, owner[outer], self.prev[owner[outer], ids[outer]])
        fed = torch.tensor([i for i, n in enumerate(take) if n > 0], device=self.dev, dtype=torch.long)
        self.drawn_next[rows_t[fed]] = False
        keep = [i for i, (n, p) in enumerate(zip(take, pending)) if n > 0 and p]
        if keep:
            lp = self._log_probs(hidden[packed.last[keep]])
            if self.prev is None:
                self.prev = torch.zeros(len(self.total), lp.shape[-1], device=self.dev)
            self.prev[rows_t[keep]] = lp

    def drawn(self, drawing: list[int], raw: torch.Tensor, masked: torch.Tensor) -> None:
        left = torch.logsumexp(masked / self.t, -1) - torch.logsumexp(raw / self.t, -1)
        at = torch.tensor(drawing, device=self.dev)
        self.total.index_add_(0, at, left)
        self.drawn_next[at] = True

    def add_to(self, scores: list[float]) -> None:
        for i, v in enumerate(self.total.tolist()):
            scores[i] += v


class TraceLMRuntime(nn.Module):
    """Inference-only Llama (+ LoRA adapters) that computes what transformers' ``LlamaForCausalLM`` does.

    Build it with :meth:`from_pretrained`. ``forward`` returns ``(logits, cache)``; :meth:`sample` generates.
    """

    def __init__(self, config: RuntimeConfig, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.model = Decoder(config, **kw)
        if config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)  # a placeholder; shares the embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, **kw)
        self._adapters: list[str] = []
        self._active: str | None = None
        self.eval()

    # --- loading ---

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        adapters: Sequence[str] | None = None) -> TraceLMRuntime:
        """Load ``path/config.json`` + ``path/model.safetensors`` and the LoRA adapters under ``path/adapters/``.

        ``adapters``: names to load; ``None`` = every one found. The first one loaded (in sorted order when found
        automatically) is active, as with ``load_model``; ``set_adapter(None)`` runs the plain pre-trained model.
        Raises ``ValueError`` for an architecture or adapter this runtime does not implement.
        """
        p = Path(path)
        try:
            hf = json.loads((p / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p / CONFIG_FILE}: cannot read the model config ({e})") from None
        config = RuntimeConfig.from_hf(hf)
        model = cls(config, device=device, dtype=dtype)
        weights = load_file(str(p / WEIGHTS_FILE), device=str(device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if config.tie_word_embeddings and "lm_head.weight" in missing:
            missing.remove("lm_head.weight")
        missing = [k for k in missing if ".lora." not in k]
        if missing or unexpected:
            raise ValueError(f"{p / WEIGHTS_FILE}: weights do not fit the config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        names = _adapter_dirs(p) if adapters is None else list(adapters)
        for name in names:
            model.load_adapter(p / ADAPTERS_DIR / name, name)
        model.set_adapter(names[0] if names else None)
        return model

    def load_adapter(self, directory: str | Path, name: str) -> None:
        """Add the peft LoRA adapter saved in ``directory`` under ``name`` (not made active)."""
        d = Path(directory)
        if not name or "." in name or name in self._adapters:
            raise ValueError(f"adapter name {name!r} is empty, holds a '.', or is already loaded")
        try:
            cfg = json.loads((d / ADAPTER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{d / ADAPTER_CONFIG}: cannot read the adapter config ({e})") from None
        scale = _lora_scale(name, cfg)
        ref = self.model.embed_tokens.weight
        tensors = load_file(str(d / ADAPTER_WEIGHTS), device=str(ref.device))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            module, dot, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if not dot or part not in ("A.weight", "B.weight"):
                raise ValueError(f"{d / ADAPTER_WEIGHTS}: unsupported adapter tensor {key!r}")
            pairs.setdefault(module, {})[part[0]] = t.to(ref.dtype)
        layers = []
        for module, ab in pairs.items():
            try:
                linear = self.get_submodule(module)
            except AttributeError:
                linear = None
            if not isinstance(linear, Linear) or module.rpartition(".")[2] not in LORA_TARGETS or set(ab) != {"A", "B"}:
                raise ValueError(f"{d / ADAPTER_WEIGHTS}: no LoRA A/B pair for a projection at {module!r}")
            A, B = ab["A"], ab["B"]
            out_f, in_f = linear.weight.shape
            if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
                raise ValueError(f"{d / ADAPTER_WEIGHTS}: LoRA shapes {tuple(A.shape)}, {tuple(B.shape)} do not fit "
                                 f"{module} ({out_f}x{in_f})")
            layers.append((linear, LoRA(A, B, scale)))
        for linear, lora in layers:  # only once everything checked out
            linear.lora[name] = lora
            linear.active = self._active
        self._adapters.append(name)

    # --- adapters ---

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return list(self._adapters)

    @property
    def active_adapter(self) -> str | None:
        """The adapter applied by ``forward``, or None for the plain pre-trained weights."""
        return self._active

    def set_adapter(self, name: str | None) -> None:
        """Apply adapter ``name`` from now on (None: none, the pre-trained model)."""
        if name is not None and name not in self._adapters:
            raise ValueError(f"no adapter {name!r}; loaded: {self._adapters}")
        self._active = name
        for m in self.modules():
            if isinstance(m, Linear):
                m.active = name
        self.refresh_weights()

    def refresh_weights(self) -> None:
        """Rebuild the merged and fused matrices forward uses from the weights and the active adapter (done by
        ``set_adapter``; call it after changing weights in place, e.g. ``load_state_dict``)."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.fuse()
            elif isinstance(m, Linear) and m is not self.lm_head:
                m.merge()
        self.lm_head.merge()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # --- forward ---

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, *, hidden: bool = False) -> tuple[torch.Tensor, KVCache | None]:
        """Logits (batch, T, vocab) for ``input_ids`` (batch, T), and ``cache`` extended by these tokens.

        ``attention_mask``: 1 for tokens, 0 for (left) padding; either for the T new tokens or, as transformers
        takes it, for the cached tokens followed by the new ones (only its last T columns are read). A row's
        positions count its real tokens only (cumsum(mask) - 1, at least 0), as ``generate`` does for left padding.
        Pass ``cache=KVCache()`` on the first call to get one back; ``None`` keeps nothing. ``hidden``: the final
        (normed) hidden states (batch, T, hidden) instead of logits, for heads on the model's representation.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        new = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask[:, -T:].bool()
        past = cache.length if cache is not None else 0
        seen = cache.seen if cache is not None and cache.seen is not None else torch.zeros(B, dtype=torch.long, device=dev)
        positions = (seen[:, None] + new.long().cumsum(-1) - 1).clamp(min=0)
        keys_ok = new if past == 0 else torch.cat([cache.mask, new], dim=1)  # (B, past + T)

        # Query t (absolute index past + t) sees real keys at indices <= past + t, and always itself, so that a
        # padding query never has an empty row (whose NaNs would reach real tokens through the next layer's values).
        q_idx = torch.arange(past, past + T, device=dev)[:, None]
        k_idx = torch.arange(past + T, device=dev)[None, :]
        mask = ((k_idx <= q_idx) & keys_ok[:, None, :]) | (k_idx == q_idx)
        mask = mask[:, None]  # (B, 1, T, past + T): the same for every head

        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache)
        x = self.model.norm(x)
        out = x if hidden else self.lm_head(x)
        if cache is not None:
            cache.mask, cache.seen = keys_ok, seen + new.long().sum(-1)
        return out, cache

    # --- sampling ---

    def _forward_packed(self, ids: torch.Tensor, packed: Packed, cache: RaggedKVCache,
                        hidden: bool = False) -> torch.Tensor:
        """Logits (batch, vocab) at each row's last new token, or with ``hidden`` the final hidden states (N,
        hidden) at every new token; ``ids`` (N,) are the new tokens, back to back."""
        cache.reserve(packed.length)
        cos, sin = rope_cos_sin(packed.pos, self.config.head_dim, self.config.rope_theta, self.dtype)
        x = self.model.embed_tokens(ids)
        for block in self.model.layers:
            x = block.forward_packed(x, cos, sin, packed, cache)
        cache.lens = packed.query_pos[:, 0] + torch.bincount(packed.row, minlength=len(cache.lens))
        if hidden:
            return self.model.norm(x)
        return self.lm_head(self.model.norm(x[packed.last]))  # the vocabulary only where a token is drawn

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None, pad_id: int,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               logits_hook: LogitsHook | None = None, forced: ForcedTokens | None = None,
               max_chunk: int = 8, scores: list[float] | None = None,
               score_from: Sequence[int] | None = None) -> list[list[int]]:
        """Continue each prompt by ancestral sampling (full softmax of logits / temperature; 0 = greedy).

        A row stops after ``eos_id`` (which its completion includes) or after ``max_new_tokens``; finished rows
        leave the batch, and sampling stops when none is left. ``logits_hook(rows, generated, logits) -> logits``
        is called before tokens are drawn: ``rows`` are the indices into ``prompts`` of the rows drawing now,
        ``generated`` their tokens so far (same order) and ``logits`` a float32 (len(rows), vocab) tensor; return
        it changed, e.g. -inf for banned tokens. ``forced(rows, drawn) -> tokens`` (optional) gives, per row, the
        tokens that must follow the one just drawn (a grammar's fixed text): they are appended without sampling
        and fed to the model up to ``max_chunk`` per call, in the same call as their neighbours' single tokens
        (rows are packed without padding, see :class:`Packed`), so fixed text costs no extra decoding steps.
        ``pad_id`` is unused (nothing is padded), kept for callers of the left-padded form.
        ``generator`` must live on the model's device. Returns the new tokens of each prompt.

        ``scores`` (one float per prompt, added to): the log of how likely the model, sampling freely at this
        temperature, was to write what the hook and ``forced`` made it write. Each drawn token adds the log of
        the probability mass the hook left (1 when it masked nothing), each forced token its log-probability;
        prompt tokens from ``score_from[b]`` on count as forced (the fixed text a completion starts with). This
        is the importance weight of masked sampling against the model conditioned on the constraints: accepting
        a completion with probability ``exp(score)`` samples that conditional exactly (a rejection sampler).
        """
        if max_new_tokens < 0 or not (temperature >= 0):
            raise ValueError(f"need max_new_tokens >= 0 and temperature >= 0, got {max_new_tokens}, {temperature}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. bos)")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        out: list[list[int]] = [[] for _ in prompts]
        if not prompts or max_new_tokens == 0:
            return out
        dev = self.device
        rows = list(range(len(prompts)))  # the prompts still running, in cache order
        queue: list[list[int]] = [list(p) for p in prompts]  # tokens each row has yet to feed to the model
        # Room grows by doubling: max_new_tokens is a bound, often far above what rows use.
        cache = RaggedKVCache.empty(self.config, len(prompts), max(map(len, prompts)) + min(max_new_tokens, 64),
                                    self.dtype, dev)  # fmt: skip
        finished: set[int] = set()
        first = True
        scorer = _ForcedScorer(len(prompts), score_from, temperature, self.lm_head, dev) if scores is not None else None
        while rows:
            # Feed: whole prompts on the first call, then up to max_chunk queued tokens per row.
            take = [len(q) if first else min(len(q), max_chunk) for q in (queue[r] for r in rows)]
            ids = [t for r, n in zip(rows, take) for t in queue[r][:n]]
            for r, n in zip(rows, take):
                del queue[r][:n]
            packed = Packed.of(take, cache.lens)
            ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
            if scorer is None:
                logits = self._forward_packed(ids_t, packed, cache)
            else:
                hidden = self._forward_packed(ids_t, packed, cache, hidden=True)
                scorer.fed(rows, take, [bool(queue[r]) for r in rows], ids_t, packed, hidden, first)
                logits = self.lm_head(hidden[packed.last])
            first = False
            # Draw for the rows whose queue is empty; the others still have fixed text to feed.
            draw = [i for i, r in enumerate(rows) if not queue[r] and r not in finished]
            if draw:
                drawing = [rows[i] for i in draw]
                last = logits[torch.tensor(draw, device=dev)].float()
                raw = last.clone() if scorer is not None else last  # a hook may mask in place
                if logits_hook is not None:
                    last = logits_hook(drawing, [out[r] for r in drawing], last)
                if scorer is not None:
                    scorer.drawn(drawing, raw, last)
                if temperature == 0:
                    nxt = last.argmax(-1)
                else:
                    nxt = torch.multinomial(torch.softmax(last / temperature, dim=-1), 1, generator=generator).squeeze(1)
                drawn = nxt.tolist()
                extra = forced(drawing, drawn) if forced is not None else [[] for _ in drawn]
                for r, token, more in zip(drawing, drawn, extra):
                    new = [token, *more]
                    if eos_id is not None and eos_id in new:
                        new = new[: new.index(eos_id) + 1]
                    new = new[: max_new_tokens - len(out[r])]
                    out[r].extend(new)
                    if out[r][-1] == eos_id or len(out[r]) >= max_new_tokens:
                        finished.add(r)  # nothing after the end needs the model...
                        if scorer is not None and len(new) > 1:
                            queue[r] = new  # ...but the fixed text before it is still scored
                    else:
                        queue[r] = new
            # Finished rows stay (feeding nothing) until they are an eighth of the batch: each drop copies the cache.
            gone = sum(r in finished and not queue[r] for r in rows)
            if gone and gone * 8 >= len(rows):
                keep = [i for i, r in enumerate(rows) if r not in finished or queue[r]]
                cache.select(torch.tensor(keep, device=dev, dtype=torch.long))
                rows = [rows[i] for i in keep]
        if scorer is not None:
            scorer.add_to(scores)
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}/"
                f"{c.num_key_value_heads}, vocab={c.vocab_size}, adapters={self._adapters}, active={self._active!r}")


__all__ = ["KVCache", "RuntimeConfig", "TraceLMRuntime"]
