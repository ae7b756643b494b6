"""Utility: can synthetic traces stand in for real ones as training data?

The same classifier is trained twice, once on real training traces and once on synthetic traces (as many of
each), and both are tested on the same real held-out traces; the report gives both scores and their gap. Two
tasks, as in the paper:

- **High latency.** Is a trace's latency (its root span's duration) above the p90 of its entry (root service and
  operation)? The p90s are the harness's (from the training traces). The classifier never sees a duration: its
  features are the entry (one-hot), log(1 + spans), depth, log(1 + spans) of each service and the error spans.
  Logistic regression with balanced class weights. Scored by balanced accuracy (the mean of the true-positive
  and true-negative rates: always answering "not high" scores 0.5, not 0.9) and plain accuracy.
- **Critical service** (FIRM-style). The critical service of a trace is the backend service (any but the entry
  service) with the most exclusive time (its spans' durations minus the time covered by their children): the
  bottleneck behind the entry. (The entry itself would be a trivial answer: on TrainTicket + Online Boutique it
  holds the most exclusive time in 98 % of traces, while the backend bottleneck varies over 20+ services.) One
  sample per (trace, backend service): the service (one-hot), log(1 + its spans), log(1 + the calls it makes), its shallowest level over the trace's depth, its
  longest span over the root's duration and log(1 + its total span time in µs). A linear SVM (squared hinge,
  balanced class weights) scores each service; the prediction is the trace's top-scoring service. Scored by the
  fraction of test traces whose critical service is predicted.

Both classifiers are fitted here with numpy (full-batch Adam on a convex loss from a zero start): no extra
package, and the same results on the same machine (BLAS summation order may differ between machines).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..trace import StatusCode, Trace, self_time_ns


# --- a linear classifier ---------------------------------------------------------------------------------------


@dataclass
class LinearClassifier:
    """``sign(x @ w + b)`` on standardized features. ``loss``: ``logistic`` or ``squared_hinge`` (the SVM)."""

    loss: str = "logistic"
    l2: float = 1e-3
    steps: int = 400
    lr: float = 0.05
    w: np.ndarray | None = None
    b: float = 0.0
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearClassifier:
        """``y`` in {0, 1}. Classes are weighted to count equally; one class alone gives a constant answer."""
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        self.mean = x.mean(axis=0)
        self.scale = x.std(axis=0)
        self.scale[self.scale == 0] = 1.0
        z = (x - self.mean) / self.scale
        n, d = z.shape
        pos = y.sum()
        if pos == 0 or pos == n:
            self.w, self.b = np.zeros(d), (1.0 if pos == n else -1.0)
            return self
        weight = np.where(y == 1, n / (2 * pos), n / (2 * (n - pos)))
        sign = 2 * y - 1
        params = np.zeros(d + 1)
        m = np.zeros(d + 1)
        v = np.zeros(d + 1)
        for t in range(1, self.steps + 1):
            margin = sign * (z @ params[:d] + params[d])
            if self.loss == "logistic":
                g_margin = -1.0 / (1.0 + np.exp(np.clip(margin, -50, 50)))
            elif self.loss == "squared_hinge":
                g_margin = -2.0 * np.maximum(0.0, 1.0 - margin)
            else:
                raise ValueError(f"loss must be logistic or squared_hinge, got {self.loss!r}")
            coef = weight * g_margin * sign / n
            grad = np.concatenate([z.T @ coef + self.l2 * params[:d], [coef.sum()]])
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            params -= self.lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        self.w, self.b = params[:d], float(params[d])
        return self

    def decision(self, x: np.ndarray) -> np.ndarray:
        if self.w is None:
            raise ValueError("fit the classifier first")
        return ((np.asarray(x, dtype=float) - self.mean) / self.scale) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.decision(x) > 0).astype(int)


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean of the recall of each class present in ``y_true``."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    recalls = [float((p[t == c] == c).mean()) for c in (0, 1) if (t == c).any()]
    return float(np.mean(recalls)) if recalls else math.nan


# --- task 1: high latency --------------------------------------------------------------------------------------


class HighLatencyTask:
    """Features and labels of the high-latency task over a fixed feature space (entries, services)."""

    def __init__(self, p90_us: dict[tuple[str, str], float], services: Sequence[str]) -> None:
        self.p90_us = p90_us
        self.entries = sorted(p90_us)
        self._entry = {e: i for i, e in enumerate(self.entries)}
        self.services = sorted(services)
        self._service = {s: i for i, s in enumerate(self.services)}

    def rows(self, traces: Sequence[Trace]) -> tuple[np.ndarray, np.ndarray]:
        """Traces whose entry has a p90 (others are skipped): features and labels."""
        feats, labels = [], []
        width = len(self.entries) + 3 + len(self.services)
        for t in traces:
            root = t.root
            if root is None or (root.service, root.name) not in self._entry:
                continue
            f = np.zeros(width)
            f[self._entry[(root.service, root.name)]] = 1.0
            k = len(self.entries)
            f[k] = math.log1p(len(t))
            f[k + 1] = t.depth
            f[k + 2] = sum(s.status.code == StatusCode.ERROR for s in t.spans)
            for svc, n in Counter(s.service for s in t.spans).items():
                j = self._service.get(svc)
                if j is not None:
                    f[k + 3 + j] = math.log1p(n)
            feats.append(f)
            labels.append(int(root.duration_ns / 1000 > self.p90_us[(root.service, root.name)]))
        return np.array(feats).reshape(-1, width), np.array(labels, dtype=int)


# --- task 2: critical service (FIRM-style) ---------------------------------------------------------------------


def exclusive_time_ns(trace: Trace) -> Counter[str]:
    """Per service, the time its spans spend outside their children (each span's duration minus the union of
    its children's intervals clipped to the span)."""
    out: Counter[str] = Counter()
    for s in trace.spans:
        out[s.service] += self_time_ns(s, trace.children(s))
    return out


def critical_service(trace: Trace) -> str | None:
    """The backend service (not the root's) with the most exclusive time (ties: the first by name); None when
    the trace has no backend service or no single root."""
    root = trace.root
    if root is None:
        return None
    ex = exclusive_time_ns(trace)
    ex.pop(root.service, None)
    return min(ex, key=lambda s: (-ex[s], s)) if ex else None


class CriticalServiceTask:
    """One row per (trace, service) over a fixed service vocabulary; ``groups`` says which trace a row is from."""

    def __init__(self, services: Sequence[str]) -> None:
        self.services = sorted(services)
        self._service = {s: i for i, s in enumerate(self.services)}

    def rows(self, traces: Sequence[Trace]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats, labels, groups = [], [], []
        width = len(self.services) + 5
        k = len(self.services)
        for g, t in enumerate(traces):
            root = t.root
            crit = critical_service(t) if root is not None else None
            if crit is None:
                continue
            depth = max(t.depth, 1)
            root_ns = max(root.duration_ns, 1)
            per: dict[str, list] = {}
            for s, d in t.walk():
                p = per.setdefault(s.service, [0, 0, d, 0, 0])
                p[0] += 1
                p[1] += len(t.children(s))
                p[2] = min(p[2], d)
                p[3] = max(p[3], s.duration_ns)
                p[4] += s.duration_ns
            for svc, (n, calls, level, longest, total) in per.items():
                if svc == root.service:
                    continue  # the entry is never the answer
                f = np.zeros(width)
                j = self._service.get(svc)
                if j is not None:
                    f[j] = 1.0
                f[k:] = (math.log1p(n), math.log1p(calls), level / depth, min(longest / root_ns, 1.0),
                         math.log1p(total / 1000))  # fmt: skip
                feats.append(f)
                labels.append(int(svc == crit))
                groups.append(g)
        return np.array(feats).reshape(-1, width), np.array(labels, dtype=int), np.array(groups, dtype=int)


def top1_accuracy(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Fraction of groups (traces) whose highest-scoring row is a positive one."""
    hits = total = 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        total += 1
        hits += int(labels[idx[np.argmax(scores[idx])]] == 1)
    return hits / total if total else math.nan


# --- both tasks, real against synthetic -------------------------------------------------------------------------


@dataclass
class UtilityResult:
    high_latency_balanced: dict[str, float]  # "real" / "synthetic" -> balanced accuracy on real test traces
    high_latency_accuracy: dict[str, float]
    critical_service: dict[str, float]  # "real" / "synthetic" -> top-1 accuracy on real test traces
    train_sizes: dict[str, int]
    test_size: int  # real test traces given (traces whose entry has no p90 give no high-latency row)

    def gaps(self) -> dict[str, float]:
        """Real minus synthetic, per score (positive: synthetic training data does worse)."""
        return {
            "high_latency_balanced": self.high_latency_balanced["real"] - self.high_latency_balanced["synthetic"],
            "high_latency_accuracy": self.high_latency_accuracy["real"] - self.high_latency_accuracy["synthetic"],
            "critical_service": self.critical_service["real"] - self.critical_service["synthetic"],
        }


def utility(real_train: Sequence[Trace], synthetic: Sequence[Trace], real_test: Sequence[Trace],
            p90_us: dict[tuple[str, str], float]) -> UtilityResult:
    """Train on ``real_train`` and on ``synthetic`` (the larger cut to the smaller's size, keeping order), test
    both on ``real_test``."""
    n = min(len(real_train), len(synthetic))
    sets = {"real": list(real_train[:n]), "synthetic": list(synthetic[:n])}
    services = sorted({s.service for t in real_train for s in t.spans})
    hl = HighLatencyTask(p90_us, services)
    x_test, y_test = hl.rows(real_test)
    bal, acc = {}, {}
    for name, traces in sets.items():
        x, y = hl.rows(traces)
        if len(y) == 0 or len(y_test) == 0:
            bal[name] = acc[name] = math.nan
            continue
        pred = LinearClassifier("logistic").fit(x, y).predict(x_test)
        bal[name] = balanced_accuracy(y_test, pred)
        acc[name] = float((pred == y_test).mean())
    cs = CriticalServiceTask(services)
    cx_test, cy_test, cg_test = cs.rows(real_test)
    crit = {}
    for name, traces in sets.items():
        x, y, _ = cs.rows(traces)
        if len(y) == 0 or len(cy_test) == 0:
            crit[name] = math.nan
            continue
        clf = LinearClassifier("squared_hinge").fit(x, y)
        crit[name] = top1_accuracy(clf.decision(cx_test), cy_test, cg_test)
    return UtilityResult(bal, acc, crit, {k: len(v) for k, v in sets.items()}, len(real_test))
