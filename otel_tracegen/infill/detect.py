"""What is wrong with a trace the receiver has gathered: each finding a named reason and the spans it concerns.

Reasons (the values of ``otel_tracegen.repair`` on what the receiver changes):

- ``orphan``: spans whose parent id is not in the trace (nor among the trace's spans released earlier). Orphans
  that point at the same missing id form one finding: one lost span had them all as children.
- ``missing_root``: no span of the trace is a root. The lost root is the missing parent of the earliest orphans
  (Jaeger's ``<root span not yet received>``); other orphan groups stay ``orphan`` findings.
- ``clock_skew``: a child outside its parent's window by more than the tolerance, where the two come from
  different hosts, as Jaeger's adjuster requires (spans of one host share a clock), and only where Jaeger's adjuster
  would shift the child.
  Real captures overrun a little all the time (65 % of TrainTicket traces have a child ending after its parent,
  mostly by under 1 ms), so the default tolerance leaves those alone (see ``docs/infill.md``).
- ``missing_attribute``: a span whose service is unknown (``unknown_service...`` or empty ``service.name``), whose
  name is empty, or which lacks a protocol attribute that every span of its (service, operation) carried in the
  training data (the catalog's learned attributes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum

from ..dataset import clock_skew_delta, host_key
from ..trace import Span

ORPHAN = "orphan"
MISSING_ROOT = "missing_root"
CLOCK_SKEW = "clock_skew"
MISSING_ATTRIBUTE = "missing_attribute"
REASONS = (ORPHAN, MISSING_ROOT, CLOCK_SKEW, MISSING_ATTRIBUTE)

SERVICE = "service.name"
OPERATION = "name"


class Field(str, Enum):
    """What a ``missing_attribute`` finding is about: the span's service, its name, or a protocol attribute."""

    SERVICE = "service.name"
    OPERATION = "span.name"
    ATTRIBUTE = "attribute"


@dataclass(frozen=True)
class Finding:
    """One problem. ``spans``: the span ids concerned (the orphans of one missing parent, the skewed child, the
    span lacking an attribute). ``missing_parent``: the lost span's id (orphan, missing root). ``field`` and
    ``key``: what a missing-attribute finding lacks."""

    reason: str
    spans: tuple[str, ...]
    detail: str
    missing_parent: str | None = None
    field: Field | None = None
    key: str | None = None


@dataclass
class DetectSettings:
    """``skew_tolerance_ns``: how far a child may start before or end after its parent before it counts as
    skewed. ``attributes``: look for missing attributes at all."""

    skew_tolerance_ns: int = 1_000_000
    attributes: bool = True
    placeholder_services: tuple[str, ...] = ("", "unknown_service", "unknown")


def is_placeholder_service(service: str | None, settings: DetectSettings) -> bool:
    s = (service or "").strip()
    return s in settings.placeholder_services or s.startswith("unknown_service:")


@dataclass
class TraceFindings:
    """The findings of one trace, by reason."""

    findings: list[Finding] = field(default_factory=list)

    def of(self, reason: str) -> list[Finding]:
        return [f for f in self.findings if f.reason == reason]

    def __bool__(self) -> bool:
        return bool(self.findings)


def detect(
    spans: Sequence[Span],
    *,
    catalog=None,
    settings: DetectSettings | None = None,
    released: Collection[str] = (),
    released_root: bool = False,
) -> TraceFindings:
    """Findings for the spans of one trace. ``released``: ids of this trace's spans already sent on (a late span's
    parent may be among them); ``released_root``: whether one of those was a root. ``catalog``: what the model
    knows (protocol attributes by operation); without one, protocol attributes are not checked."""
    settings = settings or DetectSettings()
    out = TraceFindings()
    by_id = {s.span_id: s for s in spans}
    groups: dict[str, list[Span]] = defaultdict(list)
    skewed: list[Finding] = []
    has_root = released_root
    tol = settings.skew_tolerance_ns
    for s in spans:  # one pass: the parent decides both orphans and skew
        pid = s.parent_id
        if pid is None:
            has_root = True
            continue
        p = by_id.get(pid)
        if p is None:
            if pid not in released:
                groups[pid].append(s)
            continue
        # cheap tests first: most children sit inside their parent, and spans of one resource share a host
        if (p.start_ns <= s.start_ns and s.end_ns <= p.end_ns) or p.resource is s.resource:
            continue
        if host_key(p) == host_key(s):
            continue
        early, late = p.start_ns - s.start_ns, s.end_ns - p.end_ns
        # Jaeger's rule decides what is skew (a child longer than its parent that starts inside it is an
        # asynchronous call, which no shift can fit); the tolerance keeps the everyday sub-millisecond overruns.
        if clock_skew_delta(s, p) and (early > tol or late > tol):
            what = f"starts {early / 1e6:.3f} ms before" if early > tol else f"ends {late / 1e6:.3f} ms after"
            skewed.append(Finding(CLOCK_SKEW, (s.span_id,), f"span {s.span_id} ({s.service}) {what} its parent "
                                  f"{p.span_id} ({p.service}), on another process"))
    root_group = None
    if groups and not has_root:
        # The lost root is the parent of the outermost orphans: the earliest start, then the longest.
        root_group = min(groups, key=lambda pid: min((s.start_ns, -s.duration_ns, s.span_id) for s in groups[pid]))
    for pid, orphans in groups.items():
        ids = tuple(s.span_id for s in orphans)
        if pid == root_group:
            out.findings.append(Finding(MISSING_ROOT, ids, f"no root span; {len(ids)} span(s) name {pid} as "
                                        "parent, which is not in the trace", missing_parent=pid))
        else:
            out.findings.append(Finding(ORPHAN, ids, f"parent span {pid} is not in the trace ({len(ids)} span(s) "
                                        "name it)", missing_parent=pid))
    out.findings.extend(skewed)
    if not settings.attributes:
        return out
    # Names repeat within a trace: decide each once, and walk the spans only when one is missing.
    bad_services = {x for x in {s.service for s in spans} if is_placeholder_service(x, settings)}
    bad_names = any(not n or n.isspace() for n in {s.name for s in spans})
    learned = catalog is not None and catalog.has_learned_attributes
    if bad_services or bad_names or learned:
        for s in spans:
            if s.service in bad_services:
                out.findings.append(Finding(MISSING_ATTRIBUTE, (s.span_id,), f"span {s.span_id} has no service "
                                            f"name ({s.service!r})", field=Field.SERVICE, key=SERVICE))
            if not s.name or s.name.isspace():
                out.findings.append(Finding(MISSING_ATTRIBUTE, (s.span_id,), f"span {s.span_id} has an empty name",
                                            field=Field.OPERATION, key=OPERATION))
            if learned:
                st = catalog.operations.get(s.service, {}).get(s.name)
                for key in sorted(st.attributes) if st is not None else ():
                    if key not in s.attributes:
                        out.findings.append(Finding(MISSING_ATTRIBUTE, (s.span_id,), f"span {s.span_id} "
                                                    f"({s.service} {s.name}) lacks {key}", field=Field.ATTRIBUTE,
                                                    key=key))
    return out
