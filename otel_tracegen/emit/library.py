"""A replay library: traces read once from files (a library ``generate --out`` wrote, or captured traces in any
format ``otel-tracegen formats`` lists), checked, filtered, weighted and put in the form they are replayed in.

Captured traces stay as they were captured: orphans, several roots, loose nesting and clock skew included. The
validator's verdict is counted (``flagged``) and ``only_valid`` keeps the rest. A record that cannot be read is a
problem in the :class:`~otel_tracegen.report.ReadReport` (file and line) and is skipped; a trace that cannot be
sent (a span without a start time, an id OTLP cannot carry) is a problem naming the trace and is skipped too.

The library's name on the wire is its content hash: the SHA-256 of the files' own hashes, sorted, so that the
same files replay under the same name wherever they lie.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..report import ReadReport, UserError
from ..trace import Resource, Scope, Span, Trace
from ..validate import validate
from .attributes import LIBRARY_ATTRIBUTE, SYNTHETIC_ATTRIBUTE, ExtraAttributes
from .summary import top_counts

NO_ENTRY = "(no root)"
NO_SERVICE = "(no service)"


@dataclass
class Library:
    """The traces to replay (in replay form), what they are, and how often each is drawn."""

    traces: list[Trace]
    digest: str  # "sha256:" + 16 hex digits of the content hash
    files: list[Path]
    report: ReadReport
    read: int  # traces read, before filters
    flagged: int  # of those kept, how many the validator flags
    valid: np.ndarray  # per trace: the validator found nothing
    entries: list[str]  # per trace: the entry service (the earliest root's)
    weights: np.ndarray | None = None  # per trace: probability of each draw; None: the library's own mix
    span_counts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.traces)

    @property
    def mean_spans(self) -> float:
        """Spans per drawn trace, on average (under the weights)."""
        if self.weights is None:
            return float(self.span_counts.mean())
        return float(self.span_counts @ self.weights)

    def entry_mix(self) -> dict[str, float]:
        """Share of drawn traces entered at each service."""
        w = self.weights if self.weights is not None else np.full(len(self), 1 / len(self))
        mix: dict[str, float] = {}
        for entry, p in zip(self.entries, w):
            mix[entry] = mix.get(entry, 0.0) + float(p)
        return mix


def content_digest(files: Sequence[Path]) -> str:
    per_file = sorted(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files)
    return "sha256:" + hashlib.sha256("".join(per_file).encode()).hexdigest()[:16]


def entry_of(trace: Trace) -> tuple[str, str]:
    """(service, operation) where ``trace`` was entered: its earliest root's."""
    roots = trace.roots
    return (roots[0].service or NO_SERVICE, roots[0].name) if roots else (NO_ENTRY, "")


def parse_weights(text: Sequence[str]) -> dict[str, float]:
    """``entry=W,...`` (one or several flags) -> {entry service: weight}."""
    out: dict[str, float] = {}
    for part in (p.strip() for chunk in text for p in chunk.split(",")):
        if not part:
            continue
        name, eq, value = part.rpartition("=")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not eq or not name.strip() or not (w >= 0 and w != float("inf")):
            raise UserError(f"--weights wants ENTRY=W with W a finite number >= 0, got {part!r}")
        out[name.strip()] = w
    return out


YEAR_NS = 365 * 24 * 3600 * 10**9


def _unsendable(trace: Trace) -> str | None:
    """Why a trace cannot be re-anchored in time, or None. Its times move with its arrival, so they must lie near
    each other: within a year of the trace's first start. A time of 0 (a Zipkin span without a timestamp) means
    "not recorded" and stays so."""
    starts = [s.start_ns for s in trace.spans if s.start_ns > 0]
    if not starts:
        return "no span has a start time"
    origin = min(starts)
    for s in trace.spans:
        times = [t for t in (s.start_ns, s.end_ns, *(e.time_ns for e in s.events)) if t]
        if any(abs(t - origin) > YEAR_NS for t in times):
            return f"span {s.span_id} has a time more than a year away from the trace's start"
    return None


class _ReplayForm:
    """Spans as they are replayed: resources with the marks and the user's attributes (one object per distinct
    resource, so that requests group by it), the synthetic mark and ``--telemetry-attributes`` on every span."""

    def __init__(self, extra: ExtraAttributes) -> None:
        self.extra = extra
        self.resources: dict[tuple, Resource] = {}  # by content: one object per distinct resource
        self.made: dict[tuple[int, str], Resource] = {}  # by (the read resource, service): made once
        self.scopes: dict[tuple, Scope] = {}

    def _resource(self, s: Span, service: str) -> Resource:
        made = self.made.get((id(s.resource), service))  # the read resources live as long as the library is read
        if made is None:
            own = s.resource.attributes if s.resource is not None else {}
            res = Resource(self.extra.resource_attributes(own, service), 0,
                           s.resource.schema_url if s.resource is not None else "")  # fmt: skip
            made = self.made[(id(s.resource), service)] = self.resources.setdefault(res.key(), res)
        return made

    def span(self, s: Span) -> Span:
        service = self.extra.service_for(s.service)
        res = self._resource(s, service)
        scope = s.scope
        if scope is not None:
            scope = self.scopes.setdefault(scope.key(), scope)
        return Span(trace_id=s.trace_id, span_id=s.span_id, parent_id=s.parent_id, service=service, name=s.name,
                    start_ns=s.start_ns, end_ns=s.end_ns, kind=s.kind, status=s.status,
                    attributes=self.extra.span_attributes(s.attributes, mark=True), resource=res, scope=scope,
                    events=s.events, links=s.links, trace_state=s.trace_state, flags=s.flags)  # fmt: skip


def load_library(paths: Sequence[str | Path], *, fmt: str | None = None, extra: ExtraAttributes | None = None,
                 service: str | None = None, operation: str | None = None, only_valid: bool = False,
                 weights: Mapping[str, float] | None = None, report: ReadReport | None = None) -> Library:  # fmt: skip
    """Read, check, filter and weigh a library (see the module's text). UserError when nothing is left to replay,
    naming the entries that exist."""
    from ..formats import FORMATS, expand_paths, read_any

    report = report if report is not None else ReadReport()
    files = expand_paths(paths, FORMATS[fmt].suffixes if fmt is not None else None)  # walked once: read and hashed
    traces = read_any(files, report, fmt)
    read = len(traces)
    if not traces:
        raise UserError(f"the library holds no traces that could be read: {', '.join(map(str, paths))}"
                        + (f" ({len(report.problems)} problems, the first: {report.problems[0]})"
                           if report.problems else ""))  # fmt: skip
    entries = [entry_of(t) for t in traces]
    if service is not None or operation is not None:
        kept = [i for i, (svc, op) in enumerate(entries)
                if (service is None or svc == service) and (operation is None or op == operation)]  # fmt: skip
        if not kept:
            known = Counter(svc for svc, _ in entries) if operation is None or service is None else Counter(
                op for svc, op in entries if svc == service)
            what = (f"entered at {service!r}" if operation is None else
                    f"entered at operation {operation!r}" + (f" of {service!r}" if service else ""))
            raise UserError(f"no trace of the library is {what}; it has {top_counts(known, share=False)}")
        traces, entries = [traces[i] for i in kept], [entries[i] for i in kept]
    digest = content_digest(files)
    extra = extra if extra is not None else ExtraAttributes()
    extra.marks = {SYNTHETIC_ATTRIBUTE: True, LIBRARY_ATTRIBUTE: digest}
    form = _ReplayForm(extra)
    out, out_entries, valid = [], [], []
    for trace, (svc, _) in zip(traces, entries):
        why = _unsendable(trace)
        if why is not None:
            report.problem(f"trace {trace.trace_id}", "cannot be replayed", why, dropped=len(trace))
            continue
        ok = not validate(trace)
        if only_valid and not ok:
            continue
        out.append(Trace([form.span(s) for s in trace.spans], trace.trace_id))
        out_entries.append(extra.service_for(svc) if svc not in (NO_ENTRY, NO_SERVICE) else svc)
        valid.append(ok)
    if not out:
        raise UserError("no trace of the library is left to replay"
                        + (" (--only-valid: the validator flags every one)" if only_valid else ""))
    valid_arr = np.array(valid, dtype=bool)
    lib = Library(traces=out, digest=digest, files=files, report=report, read=read,
                  flagged=int((~valid_arr).sum()), valid=valid_arr, entries=out_entries,
                  span_counts=np.array([len(t) for t in out], dtype=np.int64))  # fmt: skip
    if weights:
        lib.weights = _weigh(out_entries, weights)
    return lib


def _weigh(entries: list[str], weights: Mapping[str, float]) -> np.ndarray:
    """Per-trace draw probabilities: each trace's weight is its entry's (1 when not named), so an entry's share
    of the traffic is its share of the library times its weight, renormalized."""
    known = Counter(entries)
    unknown = [name for name in weights if name not in known]
    if unknown:
        raise UserError(f"--weights names entries the library does not have: {', '.join(unknown)}; it has "
                        f"{top_counts(known, share=False)}")
    w = np.array([weights.get(e, 1.0) for e in entries], dtype=np.float64)
    if not w.sum() > 0:
        raise UserError("--weights leaves every trace at weight 0: nothing to replay")
    return w / w.sum()
