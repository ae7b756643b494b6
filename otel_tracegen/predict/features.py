"""Feature vectors of partial traces: counts of what is there (``HandFeatures``), and the trace model's hidden states
(``ModelFeatures``).

The model reads a partial trace as the two beginnings of the layer encoding it was pre-trained on
(``docs/encoding.md``), with every number left out:

1. the virtual client's step up to the root's duration: ``<cond> <client> <layer> <call> 0 svc=S op=O kind=K
   start=0 dur=``. The hidden state at ``dur=`` is where the model is about to write the trace's latency;
2. the root's own step with its children but no times: ``<cond> <path> svc=S op=O <layer> <call> 0 svc=A op=B
   kind=K <call> 1 ...``. Its mean and last hidden states summarize the first layer in context.

Pre-training dropped condition fields at random, so prompts without ``calls=``/``budget=`` are ones it has read.
Texts repeat a lot (benchmark apps have few distinct first layers), so each distinct text runs once.
"""

from __future__ import annotations

from typing import Sequence

from ..encoding import render_str
from .partial import PartialTrace


class HandFeatures:
    """One-hot entry (service, operation), counts of each (service, operation, kind) in the first layer, and
    the layer's size: the same partial information the model reads, as a logistic regression would take it."""

    def __init__(self, entries: Sequence[str], items: Sequence[str]):
        self.entries = list(entries)
        self.items = list(items)
        self._e = {e: i for i, e in enumerate(self.entries)}
        self._i = {e: i for i, e in enumerate(self.items)}

    @staticmethod
    def _entry(p: PartialTrace) -> str:
        return f"{p.service}|{p.operation}"  # not the kind: OTLP roots say SERVER where span tables say nothing

    def knows(self, p: PartialTrace) -> bool:
        """Whether the entry of ``p`` was seen in training."""
        return self._entry(p) in self._e

    @classmethod
    def fit(cls, partials: Sequence[PartialTrace]) -> HandFeatures:
        entries = sorted({cls._entry(p) for p in partials})
        items = sorted({"|".join(c) for p in partials for c in p.layer})
        return cls(entries, items)

    @property
    def size(self) -> int:
        return len(self.entries) + len(self.items) + 1

    def __call__(self, partials: Sequence[PartialTrace]):
        import torch

        x = torch.zeros(len(partials), self.size)
        ne = len(self.entries)
        for r, p in enumerate(partials):
            e = self._e.get(self._entry(p))
            if e is not None:
                x[r, e] = 1.0
            for c in p.layer:
                i = self._i.get("|".join(c))
                if i is not None:
                    x[r, ne + i] += 1.0
            x[r, -1] = len(p.layer)
        return x

    def to_dict(self) -> dict:
        return {"entries": self.entries, "items": self.items}

    @classmethod
    def from_dict(cls, d: dict) -> HandFeatures:
        return cls(d["entries"], d["items"])


def client_prefix(p: PartialTrace) -> str:
    return f"<cond> <client> <layer> <call> 0 svc={render_str(p.service)} op={render_str(p.operation)} kind={p.kind} start=0"


def layer_text(p: PartialTrace) -> str:
    calls = " ".join(f"<call> {i} svc={render_str(s)} op={render_str(o)} kind={k}" for i, (s, o, k) in enumerate(p.layer))
    return f"<cond> <path> svc={render_str(p.service)} op={render_str(p.operation)} <layer> {calls}".rstrip()


class ModelFeatures:
    """3 x hidden features from the trace model (base weights, no adapter): the state at the client's ``dur=``, and
    the mean and last states of the root's layer."""

    def __init__(self, lm, batch_size: int = 64):
        self.lm = lm
        self.batch_size = batch_size
        self._cache: dict[tuple[int, ...], tuple] = {}

    @property
    def size(self) -> int:
        return 3 * self.lm.model.config.hidden_size

    def _encode(self, text: str, tail: Sequence[int] = ()) -> tuple[int, ...]:
        tok = self.lm.tokenizer
        return (tok.bos_id, *tok.encode(text).ids, *tail)

    def _states(self, seqs: list[tuple[int, ...]]):
        """(last, mean) hidden state per sequence, each distinct sequence run once."""
        import torch

        todo = [s for s in dict.fromkeys(seqs) if s not in self._cache]
        model = self.lm.model
        before = model.active_adapter
        model.set_adapter(None)
        try:
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i : i + self.batch_size]
                n = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), n), self.lm.tokenizer.pad_id, dtype=torch.long)
                mask = torch.zeros(len(chunk), n, dtype=torch.long)
                for r, s in enumerate(chunk):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                with torch.inference_mode():
                    h, _ = model(ids.to(model.device), mask.to(model.device), hidden=True)
                h = h.float().cpu()
                for r, s in enumerate(chunk):
                    k = len(s)
                    self._cache[s] = (h[r, k - 1].clone(), h[r, 1:k].mean(0).clone())
        finally:
            model.set_adapter(before)
        return [self._cache[s] for s in seqs]

    def __call__(self, partials: Sequence[PartialTrace]):
        import torch

        dur = self.lm.tokenizer.key_id("dur")
        client = self._states([self._encode(client_prefix(p), (dur,)) for p in partials])
        layer = self._states([self._encode(layer_text(p)) for p in partials])
        return torch.stack([torch.cat([c[0], l[1], l[0]]) for c, l in zip(client, layer)]) if partials else \
            torch.zeros(0, self.size)  # fmt: skip
