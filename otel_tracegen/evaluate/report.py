"""The fidelity report: one HTML file with its figures embedded, and one Markdown file with its figures beside it.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice, so the
two files always say the same thing. Figures are drawn with matplotlib (Agg, no screen needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .harness import CALL_BINS, DEPTH_BINS, INSTRUCTIONS, METRICS, Evaluation, bin_label
from .metrics import KL_SMOOTHING

PAPER_FIGURES = (
    ("Popular calls: KL(real || synthetic)", "0.16 (GReaT 0.11, probabilistic 3.84)", "kl_popular_calls"),
    ("Heavy hitters (services), K <= 50: lowest top-K overlap", "> 90 %", "heavy_hitters_min_k50"),
    ("Heavy hitters ((service, operation) pairs) at K = 500, or all present when fewer",
     "65 % (probabilistic 23 %)", "heavy_hitters_k500"),
    ("Memorization: trees found in training", "3-5 % (flat baseline 16-24 %)", "memorization"),
    ("Infill of a missing call", "66-70 %", None),
)
NOT_RATES = ("kl_", "emd_", "shape_jsd")  # printed as numbers; every other metric is a rate, printed in %


@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | figure
    text: str = ""
    rows: list | None = None  # table: first row is the header
    figure: bytes = b""  # PNG
    name: str = ""  # figure file name


def fmt_value(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if pct:
        return f"{100 * v:.1f} %"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def is_rate(metric: str) -> bool:
    return not metric.startswith(NOT_RATES)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# --- figures ---------------------------------------------------------------------------------------------------


def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


SHORT_VIOLATION = {"child_outside_parent": "window", "calls_mismatch": "calls", "depth_mismatch": "depth",
                   "multiple_roots": "roots", "no_root": "no root", "orphan": "orphan", "cycle": "cycle",
                   "duplicate_span_id": "dup id", "end_before_start": "end<start", "hierarchical_id": "rpc id",
                   "no trace": "no trace"}  # fmt: skip


def fig_heatmaps(ev: Evaluation) -> bytes | None:
    """Per generator: validity % (top row, with the most frequent violation of each cell) and conditioned
    accuracy % (bottom row) by requested calls x depth."""
    import matplotlib.pyplot as plt
    import numpy as np

    scores = [s for s in ev.scores if s.heatmap]
    if not scores:
        return None
    fig, axes = plt.subplots(2, len(scores), figsize=(4.4 * len(scores), 7.4), squeeze=False)
    for col, s in enumerate(scores):
        for row, (what, count) in enumerate((("validity", lambda c: c.valid), ("accuracy", lambda c: c.accurate))):
            ax = axes[row][col]
            grid = np.full((len(DEPTH_BINS), len(CALL_BINS)), np.nan)
            for (cb, db), cell in s.heatmap.items():
                grid[db, cb] = 100 * count(cell) / cell.requests
            im = ax.imshow(grid, origin="lower", cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
            for (cb, db), cell in s.heatmap.items():
                label = f"{100 * count(cell) / cell.requests:.0f}\nn={cell.requests}"
                if row == 0 and cell.violations:
                    top = cell.violations.most_common(1)[0][0]
                    label += f"\n{SHORT_VIOLATION.get(top, top)}"
                ax.text(cb, db, label, ha="center", va="center", fontsize=5.5)
            ax.set_xticks(range(len(CALL_BINS)), [bin_label(b) for b in CALL_BINS], rotation=45, fontsize=7)
            ax.set_yticks(range(len(DEPTH_BINS)), [bin_label(b) for b in DEPTH_BINS], fontsize=7)
            ax.set_xlabel("requested calls (spans)")
            ax.set_ylabel("requested depth")
            ax.set_title(f"{s.name}: {what} %", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    return _png(fig)


def _ecdf(ax, values, label, color, log: bool = False) -> None:
    import numpy as np

    v = np.sort(np.asarray(values, dtype=float))
    if v.size == 0:
        return
    if log:
        v = np.maximum(v, 1e-3)
    ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label, color=color, lw=1.2)


def fig_cdfs(ev: Evaluation) -> bytes:
    import matplotlib.pyplot as plt

    from . import metrics as m

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    sets = [("real", ev.real, "black")] + [(s.name, s.traces, c) for s, c in zip(ev.scores, _colors(len(ev.scores)))]
    for name, traces, color in sets:
        ins, outs = m.node_degrees(traces)
        rts = m.response_times(traces)
        _ecdf(axes[0][0], [v for vs in rts.values() for v in vs], name, color, log=True)
        _ecdf(axes[0][1], [len(t) for t in traces], name, color, log=True)
        _ecdf(axes[1][0], [v for vs in ins.values() for v in vs], name, color)
        _ecdf(axes[1][1], [v for vs in outs.values() for v in vs], name, color)
    for ax, title, log in ((axes[0][0], "span duration (µs)", True), (axes[0][1], "spans per trace", True),
                           (axes[1][0], "in-degree of a (trace, service) node", False),
                           (axes[1][1], "out-degree of a (trace, service) node", False)):  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("CDF")
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_heavy_hitters(ev: Evaluation) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for s, color in zip(ev.scores, _colors(len(ev.scores))):
        for ax, by in zip(axes, ("service", "operation")):
            curve = s.heavy.get(by, {})
            if curve:
                ks = sorted(curve)
                ax.plot(ks, [100 * curve[k] for k in ks], label=s.name, color=color, lw=1.3)
    for ax, by in zip(axes, ("services", "(service, operation) pairs")):
        ax.set_title(f"heavy hitters: top-K overlap of {by}", fontsize=9)
        ax.set_xlabel("K")
        ax.set_ylabel("overlap %")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _bars(ax, metrics: list[str], ev: Evaluation, title: str, scale: float = 1.0) -> None:
    import numpy as np

    width = 0.8 / max(len(ev.scores), 1)
    x = np.arange(len(metrics))
    for i, (s, color) in enumerate(zip(ev.scores, _colors(len(ev.scores)))):
        vals = [scale * s.values.get(k, math.nan) for k in metrics]
        ax.bar(x + i * width - 0.4 + width / 2, [0 if math.isnan(v) else v for v in vals], width, label=s.name,
               color=color)  # fmt: skip
    ax.set_xticks(x, [k.replace("_", " ") for k in metrics], rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def fig_metric_bars(ev: Evaluation) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _bars(axes[0], ["validity", "conditioned_accuracy", "shape_precision", "shape_coverage", "memorization",
                    "exact_copies"], ev, "rates (%, higher is better except memorization)", 100)  # fmt: skip
    _bars(axes[1], ["emd_in_degree", "emd_out_degree", "emd_response_time", "emd_log_response_time",
                    "emd_in_degree_per_service", "emd_out_degree_per_service", "emd_log_response_time_per_service"], ev,
          "normalized EMD (lower is better)")  # fmt: skip
    _bars(axes[2], ["kl_popular_calls", "shape_jsd"], ev, "divergences (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_instructions_and_utility(ev: Evaluation) -> bytes | None:
    import matplotlib.pyplot as plt

    have_ins = any(s.instructions for s in ev.scores)
    have_util = any(s.utility is not None for s in ev.scores)
    if not (have_ins or have_util):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    if have_ins:
        _bars(axes[0], [f"{k}_following" for k in INSTRUCTIONS], ev, "instruction following (%)", 100)
        axes[0].legend(fontsize=7)
    if have_util:
        import numpy as np

        labels, real, syn = [], [], []
        for s in ev.scores:
            u = s.utility
            if u is None:
                continue
            for task, d in (("high latency (bal. acc.)", u.high_latency_balanced), ("critical service", u.critical_service)):
                labels.append(f"{s.name}\n{task}")
                real.append(100 * d["real"])
                syn.append(100 * d["synthetic"])
        x = np.arange(len(labels))
        axes[1].bar(x - 0.2, real, 0.4, label="trained on real", color="0.35")
        axes[1].bar(x + 0.2, syn, 0.4, label="trained on synthetic", color="tab:orange")
        axes[1].set_xticks(x, labels, fontsize=6)
        axes[1].set_title("utility: tested on real held-out traces (%)", fontsize=9)
        axes[1].legend(fontsize=7)
        axes[1].grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# --- blocks ----------------------------------------------------------------------------------------------------


def paper_values(ev: Evaluation, score) -> dict[str, float]:
    """The figures the paper reports, computed the same way for one generator."""
    out = {"kl_popular_calls": score.values.get("kl_popular_calls", math.nan),
           "memorization": score.values.get("memorization", math.nan)}  # fmt: skip
    curve = score.heavy.get("service", {})
    low = [v for k, v in curve.items() if k <= 50]
    out["heavy_hitters_min_k50"] = min(low) if low else math.nan
    ops = score.heavy.get("operation", {})
    out["heavy_hitters_k500"] = ops[min(500, max(ops))] if ops else math.nan
    return out


def build_blocks(ev: Evaluation) -> list[Block]:
    s = ev.settings
    names = [x.name for x in ev.scores]
    b: list[Block] = [Block("h1", "otel-tracegen fidelity report")]
    b.append(Block("p", f"Real traces: {ev.real_traces} ({ev.real_label}). Training traces: "
                        f"{ev.train_traces or 'none given'}{f' ({ev.train_label})' if ev.train_label else ''}. "
                        f"Requests per generator: {s.n} free, {s.conditioned} conditioned, "
                        f"{s.n_instructions} per instruction; seed {s.seed}; validity tolerance {s.tolerance_us:g} µs; "
                        f"KL smoothing {s.smoothing:g} pseudo-counts per call."))  # fmt: skip
    rows = [["generator", "source", "honours", "free traces", "unanswered", "seconds"]]
    for x in ev.scores:
        unanswered = ", ".join(f"{k}: {n}" for k, n in x.problems.items()) or "0"
        if x.error:
            unanswered = f"FAILED, not scored: {x.error}"
        rows.append([x.name, x.source, ", ".join(sorted(x.honours)) or "-", str(len(x.traces)), unanswered,
                     f"{x.seconds:.1f}"])  # fmt: skip
    b.append(Block("table", rows=rows))
    b.append(Block("p", "A generator is asked every request; fields it does not honour it ignores, so its "
                        "conditioned and instruction scores show what it meets by chance."))  # fmt: skip

    b.append(Block("h2", "Against the paper"))
    rows = [["metric", "paper (recursive + instruction, Alibaba)"] + names]
    paper = [paper_values(ev, x) for x in ev.scores]
    for label, published, key in PAPER_FIGURES:
        if key is None:
            rows.append([label, published] + ["not measured here (the infill evaluation)"] * len(names))
            continue
        pct = key != "kl_popular_calls"
        rows.append([label, published] + [fmt_value(p.get(key), pct) for p in paper])
    b.append(Block("table", rows=rows))
    b.append(Block("p", "The paper's figures are on Alibaba's production traces; benchmark apps repeat themselves "
                        "(TrainTicket has 88 call-tree shapes in 7,088 traces), so a realistic generator there has "
                        "high shape precision AND high memorization, and replay is the ceiling of realism."))  # fmt: skip

    b.append(Block("h2", "Metrics"))
    table = ev.table()
    rows = [["metric", "definition"] + names]
    for key, row in table.items():
        if all(isinstance(v, float) and math.isnan(v) for v in row.values()):
            continue
        rows.append([key, METRICS.get(key, _extra_definition(key))]
                    + [fmt_value(row[n], is_rate(key)) for n in names])  # fmt: skip
    b.append(Block("table", rows=rows))
    b.append(Block("p", DEFINITIONS))

    b.append(Block("h2", "Validity and conditioned accuracy"))
    rows = [["generator", "free traces' violations (traces with each)"]]
    for x in ev.scores:
        rows.append([x.name, ", ".join(f"{k}: {n}" for k, n in x.violations.most_common()) or "none"])
    b.append(Block("table", rows=rows))
    real_bad = _real_validity(ev)
    b.append(Block("p", f"For scale: {real_bad}"))
    fig = fig_heatmaps(ev)
    if fig:
        b.append(Block("figure", "By requested calls x depth: validity (top, with each cell's most frequent violation) "
                                 "and conditioned accuracy (bottom: valid, and calls and depth exact).", figure=fig,
                       name="validity_heatmap.png"))  # fmt: skip

    b.append(Block("h2", "Distributions"))
    b.append(Block("figure", "CDFs, real against each generator.", figure=fig_cdfs(ev), name="cdfs.png"))
    b.append(Block("figure", "Heavy hitters: top-K overlap for K from 5 to the number present in the real set.",
                   figure=fig_heavy_hitters(ev), name="heavy_hitters.png"))  # fmt: skip
    b.append(Block("figure", "Metrics per generator.", figure=fig_metric_bars(ev), name="metrics.png"))
    worst = _worst_services(ev)
    if worst:
        b.append(Block("p", "Services with the largest per-service EMD (response time), per generator:"))
        b.append(Block("table", rows=worst))

    fig = fig_instructions_and_utility(ev)
    if fig:
        b.append(Block("h2", "Instruction following and utility"))
        rows = [["generator"] + [f"{k} (met / asked)" for k in INSTRUCTIONS]]
        for x in ev.scores:
            rows.append([x.name] + [f"{x.instructions[k][1]} / {x.instructions[k][0]}" if k in x.instructions else "n/a"
                                    for k in INSTRUCTIONS])  # fmt: skip
        b.append(Block("table", rows=rows))
        rows = [["generator", "task", "trained on real", "trained on synthetic", "gap (real - synthetic)"]]
        for x in ev.scores:
            u = x.utility
            if u is None:
                continue
            gaps = u.gaps()
            for task, d, g in (("high latency, balanced accuracy", u.high_latency_balanced, "high_latency_balanced"),
                               ("high latency, accuracy", u.high_latency_accuracy, "high_latency_accuracy"),
                               ("critical service, top-1", u.critical_service, "critical_service")):  # fmt: skip
                rows.append([x.name, task, fmt_value(d["real"], True), fmt_value(d["synthetic"], True), fmt_value(gaps[g], True)])
        if len(rows) > 1:
            b.append(Block("table", rows=rows))
            b.append(Block("p", UTILITY_TEXT))
        b.append(Block("figure", "Instruction following, and utility of synthetic training data.", figure=fig,
                       name="instructions_utility.png"))  # fmt: skip
    return b


DEFINITIONS = (
    f"Popular calls: a call is a parent -> child span edge counted as (parent service, child service, child kind); "
    f"KL(real || synthetic) in nats over the union of calls, both smoothed with {KL_SMOOTHING:g} pseudo-counts per "
    "call; a side with no calls gives n/a. Heavy hitters: calls per service (its spans) or per (service, "
    "operation); |TopK(synthetic) ∩ TopK(real)| / K, ties broken by name. Branching: each (trace, service) is a "
    "node; in-degree = its spans, out-degree = their children (every parent -> child span edge counts, "
    "same-service ones too). Response time: span durations in µs, and log10(1 + µs). EMD: the 1-D Wasserstein "
    "distance divided by the real sample's range (max - min; 1 when 0), so a copy of the real sample shifted by d "
    "scores d / range and values far outside the real range score above 1. Per service: services with at least 5 "
    "real values; a service absent from the synthetic set scores 1; averaged with weights = real sample counts. "
    "Shape: the (service, operation) call tree with children order-free (a trace with several tops, roots or "
    "orphans, is the set of their trees); precision = synthetic traces whose shape is in the real set, coverage = "
    "real traces whose shape was generated, JSD base 2. Memorization = synthetic traces whose shape is a training "
    "trace's; exact copies = equal in every modelled field (tree, kinds, statuses, µs times). Requests copy the "
    "entry, spans and depth of real traces with one root and every span below it. Instructions count only traces "
    "entered where asked; high latency compares whole µs with the p90 of the training traces' latencies (whole "
    "µs, over the traces the encoding can write)."
)
UTILITY_TEXT = (
    "Utility: the same classifier is trained on real training traces and on as many synthetic traces, and both "
    "are tested on the real traces. High latency: root duration above the entry's p90, predicted without any "
    "duration (entry, size, depth, services, errors; logistic regression). Critical service (FIRM-style): the "
    "backend service (any but the entry) with the most exclusive time, ranked by a linear SVM over per-service "
    "features; top-1 accuracy."
)


def _extra_definition(key: str) -> str:
    if key.startswith("utility_gap_"):
        return f"utility: score trained on real minus score trained on synthetic ({key[12:].replace('_', ' ')})"
    return ""


def _real_validity(ev: Evaluation) -> str:
    from ..validate import validate

    tol = int(ev.settings.tolerance_us * 1000)
    bad = sum(1 for t in ev.real if validate(t, tolerance_ns=tol))
    n = len(ev.real)
    return (f"{bad} of {n} real traces ({100 * bad / n:.1f} %) break a rule at this tolerance "
            "(captured data nests loosely: children end after their parent, mostly by under 1 ms).")  # fmt: skip


def _worst_services(ev: Evaluation, n: int = 5) -> list[list[str]]:
    rows = [["generator", "services (EMD)"]]
    for x in ev.scores:
        d = x.emd_services.get("response_time", {})
        if d:
            top = sorted(d.items(), key=lambda kv: -kv[1])[:n]
            rows.append([x.name, ", ".join(f"{k} ({v:.3f})" for k, v in top)])
    return rows if len(rows) > 1 else []


# --- rendering -------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], figures_dir: Path, rel: str) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}\n")
        elif b.kind == "h2":
            out.append(f"## {b.text}\n")
        elif b.kind == "p":
            out.append(b.text + "\n")
        elif b.kind == "table":
            head, *body = b.rows
            out.append("| " + " | ".join(map(_md_cell, head)) + " |")
            out.append("|" + "---|" * len(head))
            out.extend("| " + " | ".join(map(_md_cell, r)) + " |" for r in body)
            out.append("")
        elif b.kind == "figure":
            figures_dir.mkdir(parents=True, exist_ok=True)
            (figures_dir / b.name).write_bytes(b.figure)
            out.append(f"![{b.text}]({rel}/{b.name})\n\n*{b.text}*\n")
    return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;"
       "font-size:13px}")  # fmt: skip


def render_html(blocks: list[Block]) -> str:
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>otel-tracegen fidelity report</title>",
           f"<style>{CSS}</style></head><body>"]  # fmt: skip
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "table":
            head, *body = b.rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
            out.append("</table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.figure).decode()
            out.append(f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(b.text)}</figcaption></figure>")  # fmt: skip
    out.append("</body></html>")
    return "\n".join(out)


def write_report(ev: Evaluation, path: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.html`` (figures embedded) and ``<stem>.md`` (figures in ``<stem>_figures/``) beside
    ``path`` (which ends in .html or .md); returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    path = Path(path)
    if path.suffix not in (".html", ".md"):
        raise ValueError(f"{path}: the report must end in .html or .md")
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(ev)
    html_path, md_path = path.with_suffix(".html"), path.with_suffix(".md")
    fig_dir = path.parent / f"{path.stem}_figures"
    html_path.write_text(render_html(blocks), encoding="utf-8")
    md_path.write_text(render_markdown(blocks, fig_dir, fig_dir.name), encoding="utf-8")
    return html_path, md_path


def metrics_json(ev: Evaluation) -> str:
    """Everything the report shows, as JSON: the metric table, the paper comparison, and per generator the top-K
    curves, per-service EMDs, heatmap cells, violations, unanswered requests, instructions and utility scores
    (nan as null, infinities as "inf" / "-inf")."""

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v

    table = {k: {n: clean(v) for n, v in row.items()} for k, row in ev.table().items()}
    paper = {x.name: {k: clean(v) for k, v in paper_values(ev, x).items()} for x in ev.scores}
    details = {}
    for x in ev.scores:
        u = x.utility
        details[x.name] = {
            "source": x.source, "honours": sorted(x.honours), "error": x.error or None,
            "free_traces": len(x.traces), "unanswered": dict(x.problems), "violations": dict(x.violations),
            "heavy_hitters": {by: {str(k): v for k, v in c.items()} for by, c in x.heavy.items()},
            "emd_per_service": {q: {svc: clean(v) for svc, v in d.items()} for q, d in x.emd_services.items()},
            "heatmap": [{"calls": bin_label(CALL_BINS[cb]), "depth": bin_label(DEPTH_BINS[db]),
                         "requests": c.requests, "valid": c.valid, "accurate": c.accurate,
                         "violations": dict(c.violations)} for (cb, db), c in sorted(x.heatmap.items())],
            "instructions": {k: {"asked": n, "met": met} for k, (n, met) in x.instructions.items()},
            "utility": None if u is None else {
                "high_latency_balanced_accuracy": {k: clean(v) for k, v in u.high_latency_balanced.items()},
                "high_latency_accuracy": {k: clean(v) for k, v in u.high_latency_accuracy.items()},
                "critical_service_top1": {k: clean(v) for k, v in u.critical_service.items()},
                "train_traces": u.train_sizes, "test_traces": u.test_size},
        }  # fmt: skip
    s = ev.settings
    return json.dumps({"metrics": table, "paper_comparison": paper, "generators": details,
                       "real_traces": ev.real_traces, "train_traces": ev.train_traces,
                       "settings": {"n": s.n, "n_conditioned": s.conditioned, "n_instructions": s.n_instructions,
                                    "seed": s.seed, "tolerance_us": s.tolerance_us, "kl_smoothing": s.smoothing,
                                    "min_service_samples": s.min_service_samples}}, indent=1)  # fmt: skip
