"""Build, clean, dedupe, split and describe trace corpora.

``build_corpus`` turns captured traces in any readable format into the corpus the model trains on:

1. read every input file into canonical traces (a trace may span several files);
2. clean each trace, repairing what real captures routinely carry and dropping only what cannot be repaired,
   both counted by reason:
   - exact duplicate spans (a trace straddling two minute-files is written to both) are merged;
   - clock skew is adjusted as Jaeger's ``clockskew`` adjuster does, and each shifted span records the shift in
     the ``otel_tracegen.clock_skew_adjustment_ns`` attribute;
   - children that still end after their parent (async work) are kept and counted: that is real structure;
   - traces with no root, several roots, orphans, cycles, conflicting duplicate ids or spans ending before they
     start are dropped (the infill receiver repairs such traces; a corpus must not teach them);
3. remove traces identical in every field the model sees (the layered encoding's text), never by shape alone;
4. split by time: traces starting in the last ``validation_fraction`` of the time range are validation;
5. write the corpus (see ``docs/corpus.md``): ``train.otlp.jsonl.gz``, ``validation.otlp.jsonl.gz`` (OTLP JSON,
   one trace per line, as the Collector's file exporter writes) and ``manifest.json``.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import __version__
from .formats import FORMATS, expand_paths, get_format
from .report import ReadReport, UserError
from .trace import Span, Trace
from .validate import ViolationKind, time_window_violations, validate

CORPUS_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
SKEW_ATTRIBUTE = "otel_tracegen.clock_skew_adjustment_ns"
HOST_KEYS = ("k8s.pod.name", "host.name", "host.id", "host.ip", "net.host.ip")

# Violations after which a trace cannot join the corpus, with the reason reported for the drop.
_UNREPAIRABLE = {
    ViolationKind.NO_ROOT: "no root span",
    ViolationKind.MULTIPLE_ROOTS: "several root spans",
    ViolationKind.ORPHAN: "orphan spans (parent missing)",
    ViolationKind.CYCLE: "parent links form a cycle",
    ViolationKind.DUPLICATE_SPAN_ID: "conflicting duplicate span ids",
    ViolationKind.END_BEFORE_START: "span ends before it starts",
}


@dataclass
class BuildConfig:
    """Options of ``data build``.

    Args:
        validation_fraction: share of the time range, at its end, whose traces form the validation split.
        adjust_clock_skew: shift children into their parent's window as Jaeger's adjuster does.
        tolerance_ns: how far a child may overrun its parent before it counts as "outside" in the report.
        dedupe: remove traces identical in every field the model sees.
    """

    validation_fraction: float = field(default=0.1, metadata={"help": "last share of the time range kept for validation"})
    adjust_clock_skew: bool = field(default=True, metadata={"help": "apply Jaeger's clock-skew adjustment"})
    tolerance_ns: int = field(default=0, metadata={"help": "overrun still counted as inside the parent"})
    dedupe: bool = field(default=True, metadata={"help": "drop traces identical in every modeled field"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.tolerance_ns < 0:
            raise ValueError(f"tolerance_ns must be >= 0, got {self.tolerance_ns!r}")


@dataclass
class BuildResult:
    splits: dict[str, list[Trace]]
    report: ReadReport
    manifest: dict


# --- cleaning ---------------------------------------------------------------------------------------------


def merge_duplicate_spans(trace: Trace, report: ReadReport) -> bool:
    """Merge spans that repeat exactly; False when an id repeats with different content (unrepairable)."""
    seen: dict[str, Span] = {}
    kept: list[Span] = []
    merged = 0
    for s in trace.spans:
        prev = seen.get(s.span_id)
        if prev is None:
            seen[s.span_id] = s
            kept.append(s)
        elif prev == s:
            merged += 1
        else:
            return False
    if merged:
        trace.spans = kept
        trace.invalidate()
        report.repair("duplicate span merged (trace written to several files)", merged)
    return True


def host_key(span: Span) -> str:
    res = span.resource
    if res is not None:
        for key in HOST_KEYS:
            v = res.attributes.get(key)
            if v:
                return str(v)
    return span.service


def clock_skew_delta(child: Span, parent: Span) -> int:
    """Jaeger's ``calculateSkew``: how far to shift ``child`` so it sits inside ``parent``."""
    if child.duration_ns > parent.duration_ns:
        # Not a proper parent-child pair in time (async work): only fix a start before the parent's.
        return parent.start_ns - child.start_ns if child.start_ns < parent.start_ns else 0
    if child.start_ns >= parent.start_ns and child.end_ns <= parent.end_ns:
        return 0
    latency = (parent.duration_ns - child.duration_ns) // 2
    return parent.start_ns + latency - child.start_ns


def adjust_clock_skew(trace: Trace) -> int:
    """Jaeger's clock-skew adjuster: returns how many spans were shifted.

    Skew is only searched for where a child runs on another host than its parent (one host has one clock);
    a host's shift carries to the spans below it on that host. Events shift with their span.
    """
    adjusted = 0
    root = trace.root
    if root is None:
        return 0
    stack: list[tuple[Span, Span | None, str, int]] = [(root, None, host_key(root), 0)]
    while stack:
        span, parent, parent_host, delta = stack.pop()
        host = host_key(span)
        if parent is not None and host != parent_host:
            delta = clock_skew_delta(span, parent)
        if delta:
            span.start_ns += delta
            span.end_ns += delta
            for ev in span.events:
                ev.time_ns += delta
            span.attributes[SKEW_ATTRIBUTE] = span.attributes.get(SKEW_ATTRIBUTE, 0) + delta
            adjusted += 1
        for child in trace.children(span):
            stack.append((child, span, host, delta))
    if adjusted:
        trace.invalidate()  # start order of siblings may have changed
    return adjusted


def _drop_trace(report: ReadReport, label: str, reason: str, detail: str = "") -> bool:
    """Name the dropped trace in the problems and count it (a trace, not spans) under its reason; False."""
    report.problem(label, reason, detail, dropped=0)
    report.dropped["traces: " + reason] += 1
    return False


def clean_trace(trace: Trace, config: BuildConfig, report: ReadReport, where: str = "") -> bool:
    """Repair ``trace`` in place; False (with the reason counted) when it cannot join the corpus."""
    label = where or f"trace {trace.trace_id}"
    if not merge_duplicate_spans(trace, report):
        return _drop_trace(report, label, _UNREPAIRABLE[ViolationKind.DUPLICATE_SPAN_ID])
    fatal = [v for v in validate(trace, check_time_window=False) if v.kind in _UNREPAIRABLE]
    if fatal:
        return _drop_trace(report, label, _UNREPAIRABLE[fatal[0].kind], str(fatal[0]))
    if config.adjust_clock_skew:
        n = adjust_clock_skew(trace)
        if n:
            report.repair("span shifted by clock-skew adjustment", n)
            report.counts["traces with clock-skew adjustment"] += 1
    outside = time_window_violations(trace, config.tolerance_ns)
    if outside:
        report.counts["traces kept with a child outside its parent (async)"] += 1
        report.counts["edges with a child outside its parent (kept)"] += len(outside)
    return True


# --- dedupe and split -------------------------------------------------------------------------------------


def model_view(trace: Trace) -> tuple:
    """Everything the model sees of a (cleaned, single-root) trace, as a hashable value.

    Two traces have equal views exactly when their layered encodings (``encoding.trace_to_text``) are equal:
    the same tree of (service, operation, kind, status code) with the same times floored to µs from the root's
    start, siblings in canonical order. Computed directly because encoding whole corpora to text only to compare
    them is ~10x slower.
    """
    root = trace.root
    if root is None:
        raise ValueError(f"trace {trace.trace_id}: model_view needs a single root; clean the trace first")
    t0 = root.start_ns
    order = [s for s, _ in trace.walk()]
    keys: dict[int, tuple] = {}
    for s in reversed(order):  # children before parents
        kids = tuple(sorted(keys[id(c)] for c in trace.children(s)))
        keys[id(s)] = (
            s.service,
            s.name,
            int(s.kind),
            int(s.status.code),
            (s.start_ns - t0) // 1000,
            (s.end_ns - t0) // 1000,
            kids,
        )
    return keys[id(root)]


def dedupe(traces: Iterable[Trace], report: ReadReport) -> list[Trace]:
    seen: set[tuple] = set()
    out = []
    for t in traces:
        key = model_view(t)
        if key in seen:
            report.dropped["traces: identical to an earlier trace in every modeled field"] += 1
            continue
        seen.add(key)
        out.append(t)
    return out


def split_by_time(traces: Sequence[Trace], validation_fraction: float) -> tuple[dict[str, list[Trace]], int]:
    """Traces starting in the last ``validation_fraction`` of the time range are validation; returns the cut (ns)."""
    if not traces:
        return {"train": [], "validation": []}, 0
    ordered = sorted(traces, key=lambda t: (t.start_ns, t.trace_id))
    lo, hi = ordered[0].start_ns, ordered[-1].start_ns
    # An empty time range (one trace, or all starting together) has no "last 10 %": everything trains.
    cut = hi - int((hi - lo) * validation_fraction) if validation_fraction > 0 and hi > lo else hi + 1
    train = [t for t in ordered if t.start_ns < cut]
    validation = [t for t in ordered if t.start_ns >= cut]
    return {"train": train, "validation": validation}, cut


# --- build ------------------------------------------------------------------------------------------------


def split_path(corpus_dir: Path, split: str) -> Path:
    return Path(corpus_dir) / f"{split}.otlp.jsonl.gz"


def split_counts(splits: dict[str, list[Trace]]) -> dict[str, dict]:
    """What a manifest records of each split: its file name, traces and spans."""
    return {name: {"file": split_path(Path("."), name).name, "traces": len(ts), "spans": sum(len(t) for t in ts)}
            for name, ts in splits.items()}


def build_corpus(
    fmt: str,
    inputs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    config: BuildConfig | None = None,
    report: ReadReport | None = None,
) -> BuildResult:
    """Read, clean, dedupe, split and (when ``out_dir`` is given) write a corpus. See the module docstring."""
    config = config or BuildConfig()
    report = report if report is not None else ReadReport()
    files = expand_paths(inputs, FORMATS[fmt].suffixes if fmt in FORMATS else None)
    t0 = time.perf_counter()
    traces = get_format(fmt).read(files, report)
    if not traces:
        why = f": {report.problems[0]}" if report.problems else ""
        raise UserError(f"no traces could be read as {fmt} from {', '.join(map(str, inputs))}{why}")
    report.counts["traces read"] = len(traces)
    report.counts["spans read"] = sum(len(t) for t in traces)

    clean = [t for t in traces if clean_trace(t, config, report)]
    if config.dedupe:
        clean = dedupe(clean, report)
    splits, cut = split_by_time(clean, config.validation_fraction)

    manifest = {
        "corpus_format_version": CORPUS_FORMAT_VERSION,
        "otel_tracegen_version": __version__,
        "created_unix": int(time.time()),
        "input_format": fmt,
        "inputs": [str(p) for p in inputs],
        "files_read": len(files),
        "config": asdict(config),
        "validation_cut_unix_nano": cut,
        "splits": split_counts(splits),
        "report": {
            "counts": dict(report.counts),
            "dropped": dict(report.dropped),
            "repaired": dict(report.repaired),
            "problems": [str(p) for p in report.problems[:100]],
            "problems_total": len(report.problems),
        },
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    if out_dir is not None:
        write_corpus(Path(out_dir), splits, manifest)
    return BuildResult(splits, report, manifest)


def write_corpus(out_dir: Path, splits: dict[str, list[Trace]], manifest: dict) -> None:
    from .formats import otlp_json

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, traces in splits.items():
        otlp_json.write(traces, split_path(out_dir, name))
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _renumbered(trace: Trace) -> Trace:
    """The same trace with span ids 1, 2, 3, ... in span order: random 64-bit ids are most of a model-view corpus's
    compressed size, and the model never reads them."""
    new_id = {s.span_id: f"{i:016x}" for i, s in enumerate(trace.spans, 1)}
    spans = []
    for s in trace.spans:
        s = copy.copy(s)
        s.span_id, s.parent_id = new_id[s.span_id], new_id.get(s.parent_id) if s.parent_id else None
        spans.append(s)
    return Trace(spans, trace.trace_id)


def corpus_record(corpus_dir: str | Path, manifest: dict) -> dict:
    """What a joined corpus or a trained model records of one corpus it was made from."""
    return {"corpus": str(corpus_dir), "inputs": manifest.get("inputs"), "splits": manifest.get("splits"),
            "validation_cut_unix_nano": manifest.get("validation_cut_unix_nano")}


def _inputs(records: Sequence[dict]) -> list[str]:
    """The raw inputs behind corpus records (the corpus directory where a manifest names none)."""
    return [i for r in records for i in (r["inputs"] or [r["corpus"]])]


def load_corpora(corpus_dirs: Sequence[str | Path]) -> tuple[dict, dict[str, list[Trace]]]:
    """The traces of several corpora joined split by split, and a record of what was read: each corpus
    (:func:`corpus_record`), all their inputs and the summed split counts."""
    splits: dict[str, list[Trace]] = {}
    records = []
    for d in corpus_dirs:
        manifest, parts = load_corpus(d)
        for name, traces in parts.items():
            splits.setdefault(name, []).extend(traces)
        records.append(corpus_record(d, manifest))
    totals: dict[str, dict[str, int]] = {}
    for r in records:
        for name, counts in (r["splits"] or {}).items():
            for key, n in counts.items():
                if isinstance(n, int):
                    totals.setdefault(name, {}).setdefault(key, 0)
                    totals[name][key] += n
    info = {"corpus": [r["corpus"] for r in records], "inputs": _inputs(records), "splits": totals,
            "corpora": records}
    return info, splits


def join_corpora(
    corpus_dirs: Sequence[str | Path], out_dir: str | Path, *, model_view_only: bool = False
) -> dict:
    """Concatenate corpora split by split (each keeps its own time split) into ``out_dir``; returns the manifest.

    ``model_view_only`` keeps only what the trace model reads (:func:`otel_tracegen.encoding.quantize`: ids,
    structure, service, operation, kind, status code, µs times): several times smaller, for carrying a corpus to a
    training machine. Attribute infill cannot be trained from such a corpus (it has no attributes).
    """
    from .encoding import EncodingError, quantize

    if not corpus_dirs:
        raise UserError("give at least one corpus directory to join")
    joined: dict[str, list[Trace]] = {name: [] for name in SPLITS}
    parts = []
    seen: dict[str, str] = {}  # trace id -> the corpus it came from
    for d in corpus_dirs:
        manifest, splits = load_corpus(d)
        for name, traces in splits.items():
            for t in traces:
                if t.trace_id in seen:  # one file would merge the two traces' spans into one trace
                    raise UserError(f"trace {t.trace_id} is in both {seen[t.trace_id]} and {d}; "
                                    "joined corpora must not share trace ids")
                seen[t.trace_id] = str(d)
            if model_view_only:
                kept = []
                for t in traces:
                    try:
                        kept.append(_renumbered(quantize(t)))
                    except EncodingError:  # not encodable: the model never trains on it either
                        continue
                traces = kept
            joined[name].extend(traces)
        parts.append({**corpus_record(d, manifest), "input_format": manifest.get("input_format"),
                      "report": manifest.get("report")})
    manifest = {
        "corpus_format_version": CORPUS_FORMAT_VERSION,
        "otel_tracegen_version": __version__,
        "created_unix": int(time.time()),
        "input_format": "corpora",
        "inputs": _inputs(parts),
        "joined": parts,
        "model_view_only": model_view_only,
        "validation_cut_unix_nano": None,  # each part keeps its own; see "joined"
        "splits": split_counts(joined),
    }
    write_corpus(Path(out_dir), joined, manifest)
    return manifest


def load_corpus(corpus_dir: str | Path, splits: Sequence[str] = SPLITS) -> tuple[dict, dict[str, list[Trace]]]:
    """The manifest and the traces of each requested split."""
    from .formats import otlp_json

    d = Path(corpus_dir)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{d} is not a corpus directory (no {MANIFEST}); build one with `otel-tracegen data build`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: not a valid manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath}: not a valid manifest (expected a JSON object)")
    version = manifest.get("corpus_format_version")
    if version != CORPUS_FORMAT_VERSION:
        raise UserError(f"{mpath}: corpus format version {version!r}, this otel-tracegen reads {CORPUS_FORMAT_VERSION}")
    report = ReadReport()
    out = {}
    for name in splits:
        p = split_path(d, name)
        expected = manifest.get("splits", {}).get(name, {}).get("traces")
        if not p.is_file():
            if expected:
                raise UserError(f"{p}: missing, but the manifest lists {expected} traces in the {name} split")
            out[name] = []
            continue
        out[name] = otlp_json.read([p], report)
        if expected is not None and len(out[name]) != expected:
            raise UserError(f"{p}: {len(out[name])} traces, but the manifest lists {expected}")
    if report.problems:
        raise UserError(f"{d}: corpus files are damaged: {report.problems[0]}")
    return manifest, out


# --- describe ---------------------------------------------------------------------------------------------


def _percentiles(values: list[float], ps: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    out = {"min": v[0], "mean": statistics.fmean(v), "max": v[-1]}
    for p in ps:
        out[f"p{int(p * 100)}"] = v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]
    return out


@dataclass
class CorpusStats:
    traces: int
    spans: int
    services: Counter  # service -> spans
    operations: Counter  # (service, operation) -> spans
    depth: list[int]
    calls: list[int]
    trace_latency_us: list[float]
    span_duration_us: list[float]

    def summary(self) -> dict:
        return {
            "traces": self.traces,
            "spans": self.spans,
            "services": len(self.services),
            "operations": len(self.operations),
            "depth": _percentiles(self.depth),
            "calls_per_trace": _percentiles(self.calls),
            "trace_latency_us": _percentiles(self.trace_latency_us),
            "span_duration_us": _percentiles(self.span_duration_us),
        }


def describe(traces: Iterable[Trace]) -> CorpusStats:
    services: Counter = Counter()
    operations: Counter = Counter()
    depth, calls, lat, dur = [], [], [], []
    n_traces = n_spans = 0
    for t in traces:
        n_traces += 1
        n_spans += len(t)
        depth.append(t.depth)
        calls.append(len(t))
        root = t.root
        lat.append(((root.end_ns - root.start_ns) if root else (t.end_ns - t.start_ns)) / 1000)
        for s in t.spans:
            services[s.service] += 1
            operations[(s.service, s.name)] += 1
            dur.append((s.end_ns - s.start_ns) / 1000)
    return CorpusStats(n_traces, n_spans, services, operations, depth, calls, lat, dur)


def plot_stats(stats: CorpusStats, path: str | Path, title: str = "") -> None:
    """Histograms of calls, depth, latencies and the busiest services, as one PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (a_calls, a_depth, a_lat), (a_dur, a_svc, a_ops) = axes

    a_calls.hist(stats.calls, bins=min(60, max(5, len(set(stats.calls)))), color="#4C72B0")
    a_calls.set(title="calls (spans) per trace", xlabel="calls", ylabel="traces")
    if stats.depth:
        bins = np.arange(min(stats.depth), max(stats.depth) + 2) - 0.5
        a_depth.hist(stats.depth, bins=bins, color="#55A868")
    a_depth.set(title="depth (spans on longest path)", xlabel="depth", ylabel="traces")
    for ax, values, name in ((a_lat, stats.trace_latency_us, "trace latency"), (a_dur, stats.span_duration_us, "span duration")):
        pos = [v for v in values if v > 0]
        if pos:
            ax.hist(pos, bins=np.logspace(np.log10(min(pos)), np.log10(max(pos)) + 1e-9, 60), color="#C44E52")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: no overlap
        ax.set(title=f"{name} (µs, log scale)", xlabel="µs", ylabel="count")
    for ax, counter, name in ((a_svc, stats.services, "services"), (a_ops, stats.operations, "operations")):
        top = counter.most_common(15)[::-1]
        labels = [k if isinstance(k, str) else f"{k[0]}: {k[1]}" for k, _ in top]
        labels = [lab if len(lab) <= 40 else lab[:37] + "…" for lab in labels]
        ax.barh(range(len(top)), [n for _, n in top], color="#8172B2")
        ax.set_yticks(range(len(top)), labels, fontsize=7)
        ax.set(title=f"top {len(top)} {name} by spans (of {len(counter)})", xlabel="spans")
    fig.suptitle(title or f"{stats.traces} traces, {stats.spans} spans, {len(stats.services)} services")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
