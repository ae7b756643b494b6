"""A logistic-regression head: standardized features, L2, class-balanced loss, fitted with L-BFGS.

Balanced, because both tasks are rare by construction (high latency is the top 10 % of an entry; uncommon calls are
in a minority of traces): an unweighted fit learns to say "no", which scores the majority class's accuracy and
finds nothing. The decision threshold stays 0.5 on the balanced scale; ``benchmarks/predict.py`` reports accuracy,
balanced accuracy and F1 so the trade is visible.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LogisticHead:
    weight: list[float]
    bias: float
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, x, y, *, l2: float = 1e-2, steps: int = 200) -> LogisticHead:
        """``x``: (n, d) float tensor; ``y``: (n,) 0/1 tensor."""
        import torch

        x, y = x.double(), y.double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        pos = y.mean().clamp(1e-6, 1 - 1e-6)
        weights = torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos))
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            logits = z @ w + b
            value = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weights).mean()
            value = value + l2 * (w * w).sum()
            value.backward()
            return value

        opt.step(loss)
        return cls(w.detach().tolist(), float(b.detach()), mean.tolist(), std.tolist())

    def probability(self, x):
        """P(positive) on the balanced scale, per row of ``x``."""
        import torch

        w = torch.tensor(self.weight, dtype=torch.float64)
        z = (x.double() - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std, dtype=torch.float64)
        return torch.sigmoid(z @ w + self.bias)

    def to_dict(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict) -> LogisticHead:
        return cls(d["weight"], d["bias"], d["mean"], d["std"])
