"""Feature prediction from partial traces: heads fitted on the train split, saved beside the model.

``Predictor.fit`` labels the training traces (``partial.labels``), builds the features each method needs and fits
one :class:`~.head.LogisticHead` per task. Methods:

- ``hand``: counts of what the partial trace holds (``HandFeatures``) — the logistic-regression baseline;
- ``model``: the trace model's hidden states (``ModelFeatures``);
- ``model+hand``: both.

``fit(select=...)`` keeps, per task, the method with the best balanced accuracy on a held-out slice of the
training split (never on the data it is scored on), then refits it on the whole split. Ties go to the trace model
(``model`` first, then ``model+hand``, then ``hand``). ``save_pretrained(dir)``
writes ``dir/predict.json``; ``from_pretrained`` reads it back and loads the model only if a kept head needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..report import UserError
from ..trace import Trace
from .features import HandFeatures, ModelFeatures
from .head import LogisticHead
from .partial import TASKS, PartialTrace, labels

METHODS = ("model", "model+hand", "hand")  # in order of preference on a tie
FILE = "predict.json"


def balanced_accuracy(pred: Sequence[bool], truth: Sequence[bool]) -> float:
    pos = [p for p, t in zip(pred, truth) if t]
    neg = [p for p, t in zip(pred, truth) if not t]
    tpr = sum(pos) / len(pos) if pos else 0.0
    tnr = sum(1 for p in neg if not p) / len(neg) if neg else 0.0
    return (tpr + tnr) / 2 if pos and neg else (tpr or tnr)


@dataclass
class Predictor:
    hand: HandFeatures
    heads: dict[str, tuple[str, LogisticHead]]  # task -> (method, head)
    lm: object = None
    info: dict = field(default_factory=dict)
    _model_features: ModelFeatures | None = None

    # --- features -------------------------------------------------------------------------------------------
    def features(self, method: str, partials: Sequence[PartialTrace]):
        import torch

        if method == "hand":
            return self.hand(partials)
        if self.lm is None:
            raise UserError(f"the {method!r} head needs the trace model; load it with from_pretrained(lm=...)")
        if self._model_features is None:
            self._model_features = ModelFeatures(self.lm)
        m = self._model_features(partials)
        return m if method == "model" else torch.cat([m, self.hand(partials)], dim=1)

    # --- training -------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, train: Sequence[Trace], lm=None, *, methods: Sequence[str] = METHODS, select: float = 0.2,
            stats=None) -> Predictor:  # fmt: skip
        """Fit on ``train`` (full traces, time-ordered: the last ``select`` share picks the method per task)."""
        import torch

        from ..lm.data import corpus_stats_for_instructions

        stats = stats or corpus_stats_for_instructions(train)
        rows = [(p, y) for t in train if (p := PartialTrace.of(t)) is not None and (y := labels(t, stats)) is not None]
        if not rows:
            raise UserError("no trace to learn from: none has a single root and a known entry")
        if lm is None:
            methods = [m for m in methods if m == "hand"]
        partials = [p for p, _ in rows]
        pred = cls(HandFeatures.fit(partials), {}, lm)
        feats = {m: pred.features(m, partials) for m in methods}
        cut = int(len(rows) * (1 - select))
        scores: dict[str, dict[str, float]] = {}
        for task in TASKS:
            y = torch.tensor([float(r[1][task]) for r in rows])
            best = None
            for m in methods:
                if select > 0 and 0 < y[:cut].sum() < cut and 0 < y[cut:].sum() < len(y) - cut:
                    head = LogisticHead.fit(feats[m][:cut], y[:cut])
                    guess = (head.probability(feats[m][cut:]) > 0.5).tolist()
                    score = balanced_accuracy(guess, [bool(v) for v in y[cut:].tolist()])
                else:
                    score = 0.0
                scores.setdefault(task, {})[m] = score
                if best is None or score > best[1]:
                    best = (m, score)
            pred.heads[task] = (best[0], LogisticHead.fit(feats[best[0]], y))
        pred.info = {"train_traces": len(rows), "selection_share": select, "selection_balanced_accuracy": scores,
                     "positive_share": {t: sum(r[1][t] for r in rows) / len(rows) for t in TASKS}}  # fmt: skip
        return pred

    # --- use --------------------------------------------------------------------------------------------------
    def predict(self, traces: Sequence[Trace], tasks: Sequence[str] = TASKS) -> list[dict]:
        """Per trace: its id, entry, and per task the probability (balanced scale) and the yes/no answer. Traces
        without a single root get ``error`` instead."""
        partials = [PartialTrace.of(t) for t in traces]
        ok = [i for i, p in enumerate(partials) if p is not None]
        out: list[dict] = [{"trace_id": t.trace_id} for t in traces]
        for i, p in enumerate(partials):
            if p is None:
                out[i]["error"] = "no single root span: a partial trace needs its root and first layer"
            else:
                out[i]["entry"] = f"{p.service} {p.operation}"
                out[i]["first_layer"] = len(p.layer)
                if not self.hand.knows(p):  # the labels are relative to the entry's own history: there is none
                    out[i]["warning"] = "entry not seen in training: the answers have nothing to go on"
        for task in tasks:
            method, head = self.heads[task]
            if not ok:
                break
            probs = head.probability(self.features(method, [partials[i] for i in ok])).tolist()
            for i, prob in zip(ok, probs):
                out[i][task] = {"probability": round(prob, 4), "prediction": prob > 0.5, "method": method}
        return out

    # --- files ------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        path.write_text(json.dumps({"version": 1, "hand": self.hand.to_dict(), "info": self.info,
                                    "tasks": {t: {"method": m, "head": h.to_dict()} for t, (m, h) in self.heads.items()}},
                                   indent=None) + "\n")  # fmt: skip
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path, lm=None) -> Predictor:
        path = Path(directory) / FILE
        if not path.is_file():
            raise UserError(f"no prediction heads at {path}; fit them with `otel-tracegen predict --fit CORPUS`")
        d = json.loads(path.read_text())
        heads = {t: (v["method"], LogisticHead.from_dict(v["head"])) for t, v in d["tasks"].items()}
        return cls(HandFeatures.from_dict(d["hand"]), heads, lm, d.get("info", {}))

    @property
    def needs_model(self) -> bool:
        return any(m != "hand" for m, _ in self.heads.values())
