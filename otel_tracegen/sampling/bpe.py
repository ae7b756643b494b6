"""Grammar-constrained generation for ``--base-model`` runs: a Hugging Face causal LM with its own BPE tokenizer.

The grammar (:func:`.grammar.step_program`) speaks in the ids of our trace tokenizer: one id per marker, key,
digit and name. Here it runs over a *symbolic* vocabulary built from the catalog (a ``TraceTokenizer`` whose
strings are the catalog's services and operations), and each symbol is written as the text the encoding gives it.
The base model reads and writes that text in its own tokens, as it was trained (``lm/train.py``: the prompt
``<cond> ... <layer>`` and the answer tokenized separately, the answer trained on, no chat template):

- **fixed text** (markers, keys, indices, bookkeeping, a value the grammar leaves no choice for) is forced: its
  tokens are fed to the model, never sampled;
- **values** are sampled from the model and validated: a name (service, operation, kind, status, or ``<call>``
  against ``<book>``) must be one the grammar allows there, token by token along a trie of the allowed names'
  tokenizations; a number must be written canonically and lie in the grammar's set (``IntSet.allows_prefix``,
  digit by digit). A sample that leaves the allowed set is rejected as soon as it does and the value is sampled
  again from its start (**validate and resample**), up to ``tries`` times (once at temperature 0, where a
  resample would repeat itself); then the value is sampled under the mask of what is allowed (the fallback,
  which always succeeds). Accepted free samples are draws from the model's own distribution given that the
  value is valid. :class:`ValueStats` counts what happened per kind of value.

Pending steps of many traces decode together: one forward pass per round feeds every row what it has to feed
(left-padded; its fixed text and its last drawn token), on one KV cache. A rejected sample is rolled back by
masking its cache positions; finished rows leave the batch and the cache is compacted when masked positions pile
up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..encoding import KEYS, Conditions, Step, render_str
from ..report import UserError
from .catalog import Catalog
from .engine import keep_top_p
from .grammar import GrammarVocab, IntSpec, StepLimits, step_program

DEFAULT_TRIES = 3
"""Free samples a value gets before it is sampled under the mask (1 at temperature 0)."""
CACHE_BUDGET_BYTES = 2 << 30
"""KV cache a batch may plan for (rows x ``PLANNED_TOKENS``); larger batches are split."""
PLANNED_TOKENS = 2048


@dataclass
class ValueStats:
    """What became of the values sampled, per kind (``service``, ``operation``, ``kind``, ``status``, ``layer``
    (``<call>`` or ``<book>``), and the numbers by key: ``start``, ``dur``, ``calls``, ``depth``, ``left``,
    ``child_depth``).

    ``first_try``: the model's first sample was valid. ``resampled``: valid after one or more rejected samples.
    ``constrained``: every free sample was rejected, so the value was sampled under the mask (the fallback).
    ``rejected``: samples rejected. Values the grammar leaves no choice for are fixed text, not counted.
    """

    first_try: Counter = field(default_factory=Counter)
    resampled: Counter = field(default_factory=Counter)
    constrained: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)

    @property
    def values(self) -> int:
        return sum(self.first_try.values()) + sum(self.resampled.values()) + sum(self.constrained.values())

    def line(self) -> str:
        n = self.values
        if not n:
            return "no values sampled"

        def pct(c: Counter) -> str:
            return f"{sum(c.values())} ({100 * sum(c.values()) / n:.1f} %)"

        return (f"{n} values: {pct(self.first_try)} valid at the first sample, {pct(self.resampled)} after "
                f"resampling, {pct(self.constrained)} sampled under the mask; {sum(self.rejected.values())} "
                "samples rejected")


# --- the base model's tokens ---------------------------------------------------------------------------------


class _Trie:
    __slots__ = ("kids", "value")

    def __init__(self) -> None:
        self.kids: dict[int, _Trie] = {}
        self.value: int | None = None  # the symbol whose text ends here


class BpeVocab:
    """The base model's tokenizer as the decoder needs it: cached encoding, each token's text, the tokens that
    are digits, tries of allowed names."""

    def __init__(self, tokenizer) -> None:
        import torch

        self.tok = tokenizer
        self.size = len(tokenizer)
        # A token's text as it reads after other text (a SentencePiece "▁" becomes a space).
        anchor = list(tokenizer.encode("a", add_special_tokens=False))[-1:]
        head = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        texts = tokenizer.batch_decode([anchor + [i] for i in range(self.size)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)  # fmt: skip
        self.text = [t.removeprefix(head) for t in texts]
        self.digits: dict[str, list[tuple[int, str]]] = {}  # first digit -> (token, its digits)
        for i, t in enumerate(self.text):
            if t and t.isascii() and t.isdigit():
                self.digits.setdefault(t[0], []).append((i, t))
        self._starts: dict[str, Any] = {}
        self._torch = torch
        self._enc: dict[str, tuple[int, ...]] = {}
        self._tries: dict[tuple, _Trie] = {}

    def encode(self, text: str) -> tuple[int, ...]:
        got = self._enc.get(text)
        if got is None:
            if len(self._enc) > 1 << 16:
                self._enc.clear()
            got = self._enc[text] = tuple(self.tok.encode(text, add_special_tokens=False))
        return got

    def writes(self, text: str) -> bool:
        """Whether ``text`` survives encoding and decoding (a tokenizer without byte fallback may lose it)."""
        ids = self.encode(text)
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False) == text

    def starting_with(self, char: str, width: int, device):
        """A bool mask over ``width`` logits: the tokens whose text starts with ``char``."""
        key = (char, width, str(device))
        m = self._starts.get(key)
        if m is None:
            torch = self._torch
            m = torch.zeros(width, dtype=torch.bool)
            ids = [i for i, t in enumerate(self.text) if t[:1] == char]
            if ids:
                m[torch.tensor(ids)] = True
            m = self._starts[key] = m.to(device)
        return m

    def trie(self, prefix: str, options: tuple[tuple[int, str], ...]) -> _Trie:
        """The tokens of ``prefix + text`` for each (symbol, text) option, as a trie."""
        key = (prefix, options)
        root = self._tries.get(key)
        if root is None:
            if len(self._tries) > 1 << 14:
                self._tries.clear()
            root = _Trie()
            for sym, text in options:
                node = root
                for t in self.encode(prefix + text):
                    node = node.kids.setdefault(t, _Trie())
                node.value = sym
            self._tries[key] = root
        return root


# --- the symbols' text ---------------------------------------------------------------------------------------


class _SymbolText:
    """How the encoding writes a symbol of the grammar after the previous one (as ``TraceTokenizer.decode``):
    numbers glued to their key and to each other, a name glued to its key, everything else after a space."""

    def __init__(self, vocab: GrammarVocab) -> None:
        tok = vocab.tokenizer
        self.tok = tok
        self.keys = {tok.key_id(k): k for k in KEYS}
        self.numeric = frozenset(tok.token_to_id[c] for c in "0123456789-=")
        self._cache: dict[tuple[int | None, int], str] = {}

    def piece(self, prev: int | None, sym: int) -> str:
        got = self._cache.get((prev, sym))
        if got is None:
            value = self.tok.string_value(sym)
            text = render_str(value) if value is not None else self.tok.id_to_token[sym]
            if sym in self.numeric:
                glued = prev in self.keys or prev in self.numeric
            else:
                glued = value is not None and prev in self.keys
            got = self._cache[(prev, sym)] = text if glued or prev is None else " " + text
        return got


def symbolic_vocab(catalog: Catalog, writes=lambda text: True) -> GrammarVocab:
    """The grammar's vocabulary for a catalog: a ``TraceTokenizer`` holding its services and operations (those
    ``writes`` accepts in their written form), the catalog restricted to them."""
    from ..lm.tokenizer import TraceTokenizer

    names: Counter[str] = Counter()
    for service, ops in catalog.operations.items():
        names[service] += 1
        names.update(list(ops))
    names = Counter({n: c for n, c in names.items() if writes(render_str(n))})
    return GrammarVocab(TraceTokenizer.from_string_counts(names), catalog)


# --- one step being decoded ------------------------------------------------------------------------------------


class _Value:
    """A value being sampled: a name (along a trie of its options' tokens) or a number (digit by digit)."""

    __slots__ = (
        "digits",
        "end_ok",
        "kind",
        "logits0",
        "mode",
        "node",
        "phys0",
        "pos0",
        "spec",
        "start",
        "term_char",
        "trie",
        "tries",
    )

    def __init__(self, kind: str) -> None:
        self.kind, self.tries, self.mode = kind, 0, "free"
        self.trie: _Trie | None = None
        self.node: _Trie | None = None
        self.start: _Trie | None = None  # the trie node of the first sample (what is before it is fixed text)
        self.spec: IntSpec | None = None
        self.digits = ""
        self.term_char = " "  # the first character of the text after the value
        self.phys0: int | None = None  # cache position, logical position and logits of the first sample
        self.pos0 = 0
        self.logits0 = None
        self.end_ok = False  # whether the value may end here


class _Row:
    """One pending step: its grammar coroutine, the text not yet fed, and the value being sampled."""

    def __init__(self, dec: BpeStepDecoder, program, prompt: list[int], joined: bool) -> None:
        self.dec = dec
        self.program = program
        self.spec = next(program)
        self.prev: int | None = None  # the symbol sent last
        self.lead = " " if joined else ""  # before the completion's first symbol
        self.pending = ""  # fixed text not fed yet
        self.append: list[int] = list(prompt)  # tokens to feed at the next forward pass
        self.pos = 0  # tokens fed (the next token's position)
        self.logits = None  # the next-token logits after what was fed
        self.slot = 0  # the row's index in the batch
        self.value: _Value | None = None
        self.step: Step | None = None

    # -- the grammar

    def _piece(self, sym: int) -> str:
        if self.prev is None:
            return self.lead + self.dec.text.piece(None, sym)
        return self.dec.text.piece(self.prev, sym)

    def _send(self, sym: int, text: bool = True) -> None:
        if text:
            self.pending += self._piece(sym)
        self.prev = sym
        try:
            self.spec = self.program.send(sym)
        except StopIteration as done:
            self.step = done.value

    def _flush(self) -> None:
        if self.pending:
            self.append.extend(self.dec.bpe.encode(self.pending))
            self.pending = ""

    def _commit_number(self, n: int, fed: str, terminator: int) -> None:
        """Send ``n`` and its terminator to the grammar; ``fed``: its leading digits already fed to the model."""
        text = str(n)
        for c in text:
            self._send(self.dec.vocab.digit[int(c)], text=False)
        self.pending += text[len(fed) :]
        self._send(terminator)

    def advance(self) -> None:
        """Feed fixed text until a value needs the model's next-token distribution (or the step ends)."""
        dec = self.dec
        while self.step is None:
            v = self.value
            if v is None:
                spec = self.spec
                if isinstance(spec, IntSpec):
                    allowed = spec.allowed
                    if allowed.intervals[0][0] == allowed.intervals[-1][1]:  # one value: fixed text
                        self._commit_number(allowed.min, "", spec.terminator)
                        continue
                    self._flush()
                    v = self.value = _Value(dec.text.keys.get(self.prev, "number"))
                    v.spec = spec
                    v.term_char = dec.text.piece(dec.vocab.digit[0], spec.terminator)[:1]
                elif len(spec) == 1:
                    self._send(spec[0])
                    continue
                else:
                    v = self.value = _Value(self._name_kind())
                    v.trie = v.node = dec.bpe.trie(self.pending, tuple((s, self._piece(s)) for s in spec))
                    self.pending = ""
                    node = v.node
                    while node.value is None and len(node.kids) == 1:  # tokens all options share: fixed text
                        ((t, node),) = node.kids.items()
                        self.append.append(t)
                    v.node = node
            if self._settle(v):
                continue
            return

    def _settle(self, v: _Value) -> bool:
        """Take the tokens a name's remaining options share; end the value if nothing can follow. True when the
        value ended (and was sent to the grammar)."""
        if v.trie is not None:
            node = v.node
            if v.phys0 is not None:  # past the first sample: a unique continuation is fixed text too
                while node.value is None and len(node.kids) == 1:
                    ((t, node),) = node.kids.items()
                    self.append.append(t)
                v.node = node
            if node.value is not None and not node.kids:
                self._done(v)
                self._send(node.value, text=False)
                return True
            v.end_ok = node.value is not None
            return False
        allowed, d = v.spec.allowed, v.digits
        v.end_ok = bool(d) and int(d) in allowed
        if v.end_ok and not any(allowed.allows_prefix(d + c) for c in "0123456789"):
            self._done(v)
            self._commit_number(int(d), d, v.spec.terminator)
            return True
        return False

    def _name_kind(self) -> str:
        key = self.dec.text.keys.get(self.prev)
        return {"svc": "service", "op": "operation"}.get(key, key) if key else "layer"

    def _done(self, v: _Value) -> None:
        st = self.dec.stats
        (st.first_try if v.tries == 0 else st.resampled if v.mode == "free" else st.constrained)[v.kind] += 1
        self.value = None

    # -- the model's choice

    def begin(self, phys: int) -> None:
        """Before the first sample of a value: remember where it starts, to roll back to."""
        v = self.value
        if v.phys0 is None:
            v.phys0, v.pos0, v.logits0, v.start = phys, self.pos, self.logits, v.node

    def allowed_mask(self, width: int, device):
        """For a value sampled under the mask: the tokens that keep it valid (bool over the logits)."""
        torch = self.dec.torch
        v, bpe = self.value, self.dec.bpe
        if v.trie is not None:
            ids = list(v.node.kids)
        else:
            d, allowed = v.digits, v.spec.allowed
            ids = [i for c, group in bpe.digits.items() if allowed.allows_prefix(d + c)
                   for i, t in group if allowed.allows_prefix(d + t)]  # fmt: skip
        m = torch.zeros(width, dtype=torch.bool, device=device)
        if ids:
            m[torch.tensor(ids, device=device)] = True
        if v.end_ok:
            m |= bpe.starting_with(v.term_char, width, device)
        return m

    def receive(self, token: int) -> None:
        """The token drawn for the value: take it, end the value with it, or reject the sample."""
        v, bpe = self.value, self.dec.bpe
        text = bpe.text[token] if token < bpe.size else ""
        if v.trie is not None:
            kid = v.node.kids.get(token)
            if kid is not None:
                self.append.append(token)
                v.node = kid
            elif v.end_ok and text[:1] == v.term_char:  # the name ends: the token is the next item's, dropped
                self._done(v)
                self._send(v.node.value, text=False)
            else:
                self._reject()
            return
        allowed = v.spec.allowed
        if text.isascii() and text.isdigit():
            if allowed.allows_prefix(v.digits + text):
                self.append.append(token)
                v.digits += text
            else:
                self._reject()
            return
        lead = len(text) - len(text.lstrip("0123456789"))
        digits, rest = v.digits + text[:lead], text[lead:]
        if rest[:1] == v.term_char and digits and allowed.allows_prefix(digits) and int(digits) in allowed:
            fed = v.digits  # the token is dropped; its digits are written with the fixed text after them
            self._done(v)
            self._commit_number(int(digits), fed, v.spec.terminator)
        else:
            self._reject()

    def _reject(self) -> None:
        """Roll the value back to its first sample; after ``tries`` rejections (one when greedy) it is sampled
        under the mask."""
        v, dec = self.value, self.dec
        dec.stats.rejected[v.kind] += 1
        v.tries += 1
        if v.mode == "free" and (v.tries >= dec.tries or dec.greedy):
            v.mode = "constrained"
        dec.batch.roll_back(self.slot, v.phys0)
        self.append = []
        self.pos, self.logits = v.pos0, v.logits0
        v.node, v.digits = v.start, ""
        v.end_ok = v.node.value is not None if v.trie is not None else False


# --- the decoder ------------------------------------------------------------------------------------------------


class BpeStepDecoder:
    """Decodes pending steps with a ``--base-model`` model (``lm.backend == "transformers"``, its own tokenizer).

    ``stats`` accumulates :class:`ValueStats` over every call; ``tries``: free samples per value before the
    fallback; ``max_rows``: rows per batch (default: what a KV cache of ``CACHE_BUDGET_BYTES`` holds at
    ``PLANNED_TOKENS`` tokens a row).
    """

    def __init__(self, lm, catalog: Catalog, *, tries: int = DEFAULT_TRIES, max_rows: int | None = None) -> None:
        import torch

        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        self.torch = torch
        self.lm = lm
        self.bpe = BpeVocab(lm.tokenizer)
        if not all(self.bpe.digits.get(str(d)) for d in range(10)):
            raise UserError(f"{lm.path}: the tokenizer of this base model has no token for some digit")
        self.vocab = symbolic_vocab(catalog, self.bpe.writes)
        self.text = _SymbolText(self.vocab)
        self.tries = tries
        self.stats = ValueStats()
        self.max_rows = max_rows or max(1, CACHE_BUDGET_BYTES // max(1, _cache_bytes_per_token(lm.model)
                                                                       * PLANNED_TOKENS))
        self.greedy = False
        self.batch: _Batch | None = None
        tok = lm.tokenizer
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
        self.eos = tok.eos_token_id

    def prompt(self, cond: Conditions, joined: bool) -> list[int]:
        """The prompt as training tokenized it: instruct (``<bos>`` if the tokenizer adds one, then the prompt;
        the answer tokenized on its own), or pre-training on whole steps (after the ``<eos>`` of the step before;
        the answer continues the same text after a space)."""
        text = cond.text() + " <layer>"
        if joined:
            return ([self.eos] if self.eos is not None else []) + list(self.bpe.encode(text))
        return self.bos + list(self.bpe.encode(text))

    def decode(self, chunk: Sequence[tuple[int, Conditions]], requests, limits: StepLimits, adapter: str | None,
               temperature: float, top_p: float, generator) -> list[Step]:
        """The steps of ``chunk`` ((trace index, conditions) pairs), decoded under the grammar."""
        out: list[Step] = []
        model = self.lm.model
        quiet = model.disable_adapter() if adapter is None and hasattr(model, "disable_adapter") else nullcontext()
        with self.torch.inference_mode(), quiet:
            for b in range(0, len(chunk), self.max_rows):
                out += self._decode(chunk[b : b + self.max_rows], requests, limits, adapter, temperature, top_p,
                                    generator)
        return out

    def _decode(self, chunk, requests, limits, adapter, temperature, top_p, generator) -> list[Step]:
        joined = adapter == "pretrain"  # a pretrain-stage LoRA learnt whole steps, not prompt and answer apart
        self.greedy = temperature == 0
        rows = []
        for i, cond in chunk:
            program = (step_program(self.vocab, cond, limits, entry_service=requests[i].service,
                                    entry_operation=requests[i].operation) if cond.client
                       else step_program(self.vocab, cond, limits))  # fmt: skip
            rows.append(_Row(self, program, self.prompt(cond, joined), joined))
        batch = self.batch = _Batch(self.lm.model, len(rows))
        current = rows
        try:
            while True:
                for row in current:
                    row.advance()
                if any(row.step is not None for row in current):
                    keep = [j for j, row in enumerate(current) if row.step is None]
                    if not keep:
                        break
                    batch.keep(keep)
                    current = [current[j] for j in keep]
                for j, row in enumerate(current):
                    row.slot = j
                if any(row.append for row in current):
                    batch.forward(current)
                for row in current:
                    row.begin(batch.length)
                for row, t in zip(current, self._sample(current, temperature, top_p, generator)):
                    row.receive(t)
        finally:
            self.batch = None
        return [row.step for row in rows]

    def _sample(self, rows: list[_Row], temperature: float, top_p: float, generator) -> list[int]:
        torch = self.torch
        logits = torch.stack([r.logits for r in rows])
        width, device = logits.shape[-1], logits.device
        masked = [j for j, r in enumerate(rows) if r.value.mode != "free"]
        if masked:
            allowed = torch.ones_like(logits, dtype=torch.bool)
            for j in masked:
                allowed[j] = rows[j].allowed_mask(width, device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        if temperature == 0:
            return logits.argmax(-1).tolist()
        scaled = logits / temperature
        if top_p < 1:
            scaled = keep_top_p(scaled, top_p)
        probs = torch.softmax(scaled, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()


def _cache_bytes_per_token(model) -> int:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    except (AttributeError, TypeError, ValueError):
        return 1 << 16
    size = next(iter(model.parameters())).element_size()
    return 2 * layers * heads * head_dim * size


# --- the batch on one KV cache ---------------------------------------------------------------------------------


def _growing_layer_class():
    """A ``DynamicLayer`` that appends into a buffer grown by doubling, instead of concatenating (which copies the
    whole cache at every forward pass); None where transformers has no cache layers (before 4.56)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return None

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._k = self._v = None
                self._n = 0
            n, add = self._n, key_states.shape[-2]
            if self._k is None or n + add > self._k.shape[-2] or self._k.shape[0] != key_states.shape[0]:
                cap = max(64, 2 * (n + add))
                k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                if n:
                    k[..., :n, :], v[..., :n, :] = self._k[..., :n, :], self._v[..., :n, :]
                self._k, self._v = k, v
            self._k[..., n : n + add, :] = key_states
            self._v[..., n : n + add, :] = value_states
            self._n = n + add
            self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]
            return self.keys, self.values

        def replace(self, keys, values) -> None:
            self._k, self._v, self._n = keys.contiguous(), values.contiguous(), keys.shape[-2]
            self.keys, self.values = self._k, self._v

        def batch_select_indices(self, indices) -> None:
            if self.get_seq_length() > 0:
                self.replace(self.keys[indices, ...], self.values[indices, ...])

    return GrowingLayer


_GROWING = _growing_layer_class()


class _Batch:
    """Rows decoding together on one KV cache. ``mask[b, p]``: whether cache position ``p`` of row ``b`` holds one
    of its tokens (left padding, padding between rows' uneven feeds, and rolled-back samples do not); ``ids[b, p]``:
    the token there."""

    def __init__(self, model, n: int) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.device = next(iter(model.parameters())).device
        self.mask = torch.zeros((n, 0), dtype=torch.bool, device=self.device)
        self.ids = torch.zeros((n, 0), dtype=torch.long)
        self.cache = self._new_cache()
        self.pad = 0

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # pragma: no cover - older transformers
            return DynamicCache()
        layers = getattr(cache, "layers", None)
        if _GROWING is not None and layers is not None:
            from transformers.cache_utils import DynamicLayer

            if layers and all(type(x) is DynamicLayer for x in layers):
                cache.layers = [_GROWING() for _ in layers]
            elif not layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
                cache.layer_class_to_replicate = _GROWING
        return cache

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def forward(self, rows: list[_Row]) -> None:
        """Feed every row its ``append`` (left-padded to the longest) and set its ``logits`` where it fed any."""
        torch = self.torch
        width = max(len(r.append) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        new = torch.zeros((len(rows), width), dtype=torch.bool)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        fed = []
        for j, r in enumerate(rows):
            n = len(r.append)
            pos[j] = r.pos
            if n:
                ids[j, width - n :] = torch.tensor(r.append)
                new[j, width - n :] = True
                pos[j, width - n :] = torch.arange(r.pos, r.pos + n)
                r.pos += n
                r.append = []
                fed.append(j)
        self.mask = torch.cat([self.mask, new.to(self.device)], dim=1)
        self.ids = torch.cat([self.ids, ids], dim=1)
        kw = {"input_ids": ids.to(self.device), "attention_mask": self.mask, "position_ids": pos.to(self.device),
              "past_key_values": self.cache, "use_cache": True}
        try:
            out = self.model(**kw, logits_to_keep=1)
        except TypeError:  # pragma: no cover - a model without logits_to_keep
            out = self.model(**kw)
        logits = out.logits[:, -1, :].float()
        for j in fed:
            rows[j].logits = logits[j]
        self._maybe_compact(rows)

    def roll_back(self, slot: int, phys: int) -> None:
        """Forget what the row at ``slot`` fed from cache position ``phys`` on."""
        self.mask[slot, phys:] = False

    def keep(self, js: list[int]) -> None:
        """Keep only the rows at batch positions ``js``."""
        idx = self.torch.tensor(js, device=self.device)
        self.mask, self.ids = self.mask[idx], self.ids[idx.cpu()]
        if self.cache.get_seq_length() > 0:
            self.cache.batch_select_indices(idx)

    def _maybe_compact(self, rows: list[_Row]) -> None:
        """Drop the masked cache positions when they are more than a third of the cache."""
        torch = self.torch
        n = self.mask.sum(dim=1)
        longest = int(n.max())
        length = self.length
        layers = getattr(self.cache, "layers", None)
        if layers is None or length <= 64 or length * 2 <= longest * 3:
            return
        order = torch.argsort(self.mask.to(torch.int8), dim=1, stable=True)[:, length - longest :]
        for layer in layers:
            if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
                continue
            b, h, _, d = layer.keys.shape
            g = order[:, None, :, None].expand(b, h, longest, d)
            keys, values = layer.keys.gather(2, g), layer.values.gather(2, g)
            if hasattr(layer, "replace"):
                layer.replace(keys, values)
            else:
                layer.keys, layer.values = keys, values
        for j, r in enumerate(rows):  # positions of values being sampled move with their tokens
            v = r.value
            if v is not None and v.phys0 is not None:
                before = int(self.mask[j, : v.phys0].sum())
                v.phys0 = (longest - int(n[j])) + before
        self.mask, self.ids = self.mask.gather(1, order), self.ids.gather(1, order.cpu())
