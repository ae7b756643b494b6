"""Span CSV (the Nezha layout): one span per row, read-only.

Header, exactly::

    TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,EndTimeUnixNano,Duration

- ``ParentID`` is ``root`` for a root span (an empty ParentID is read as a root too, and counted).
- ``PodName`` is a Kubernetes pod. The service is the pod name without its controller suffixes
  (:func:`service_from_pod`); the pod name itself is kept as the resource attribute ``k8s.pod.name``.
  Every span of one pod shares ONE :class:`~otel_tracegen.trace.Resource` object (memory: the
  Online Boutique set has 875k spans from 11 pods).
- ``StartTimeUnixNano``/``EndTimeUnixNano`` are trusted. ``Duration`` is microseconds and redundant; rows
  where it disagrees with ``end - start`` by a microsecond or more are kept and counted.
- The CSV carries no span kind, status or attributes: kind is ``UNSPECIFIED``, the rest stay at defaults.

A trace may straddle files (Nezha writes one file per minute): :func:`read` groups spans by TraceID across
every file it is given. Duplicate span rows (the same span written into two minute files) are kept as they
are: converting stays faithful, and the corpus builder merges and counts them.

Bad rows (wrong column count, empty TraceID/SpanID, non-numeric times) become a
:class:`~otel_tracegen.report.Problem` at ``file:line`` and are dropped; the rest of the file is kept. A file
whose header is not the layout above is skipped with one problem naming the expected header.

Speed matters (the corpus is ~1.4M spans): the reader splits lines with ``str.split`` where a chunk holds no
quote character (csv quoting cannot occur there) and falls back to :mod:`csv` for the rest of a file that
does; it caches pod -> (service, Resource) and operation names, builds :class:`Span` positionally, and pauses
the cyclic garbage collector while reading (see :func:`._io.paused_gc`).
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from pathlib import Path
from typing import Any, Iterable

from ..report import ReadReport
from ._io import COUNT_FILES, UNREADABLE, open_text, paused_gc
from ..trace import SERVICE_NAME, STATUS_UNSET, Resource, Span, SpanKind, Trace

HEADER: tuple[str, ...] = (
    "TraceID",
    "SpanID",
    "ParentID",
    "PodName",
    "OperationName",
    "StartTimeUnixNano",
    "EndTimeUnixNano",
    "Duration",
)
HEADER_LINE = ",".join(HEADER)
N_COLUMNS = len(HEADER)

ROOT_PARENT = "root"  # the ParentID Nezha writes for a root span
POD_ATTRIBUTE = "k8s.pod.name"  # OpenTelemetry semantic convention for the pod name

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_CHARS = 1 << 22  # text read per step: large enough to amortise the loop, small enough to stream big files

# Problem reasons (also the keys of report.dropped).
BAD_HEADER = "not a span CSV header"
BAD_COLUMNS = "wrong column count"
BAD_IDS = "empty TraceID or SpanID"
BAD_TIME = "non-numeric start/end time"

# report.counts keys.
COUNT_ROWS = "rows read"
COUNT_SPANS = "spans read"
COUNT_SKIPPED_FILES = "files skipped (not span CSV)"
COUNT_DURATION_MISMATCH = "span CSV: Duration disagrees with end-start"
COUNT_DURATION_NAN = "span CSV: Duration not a number"
COUNT_EMPTY_PARENT = "span CSV: empty ParentID read as root"
COUNT_END_BEFORE_START = "span CSV: end before start"

# Kubernetes generates pod-name suffixes from this alphabet (no vowels, no 0/1/3, so no words can form:
# k8s.io/apimachinery/pkg/util/rand). Releases before 1.8 used plain decimal pod-template-hashes and any
# [a-z0-9] in the 5-character pod suffix (e.g. nginx-deployment-2035384211-7ci7o), so the Deployment rule
# accepts those; it stays specific because the hash may hold no vowel. A lone suffix must be vowel-free, so
# a trailing word ("user-stats") is never taken for one.
_K8S_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_POD_SUFFIX_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Deployment: <name>-<pod-template-hash>-<5 random>, e.g. ts-gateway-service-6f6cfc45b-h5m2n
    ("deployment", re.compile(rf"^(.+)-[0-9{_K8S_CHARS}]{{6,10}}-[0-9a-z]{{5}}$")),
    # StatefulSet: <name>-<ordinal>, e.g. redis-0
    ("statefulset", re.compile(r"^(.+)-\d+$")),
    # DaemonSet, bare ReplicaSet or Job: <name>-<5 random>, e.g. fluentd-x7k2p
    ("daemonset", re.compile(rf"^(.+)-[{_K8S_CHARS}]{{5}}$")),
)


def service_from_pod(pod: str) -> str:
    """The workload (service) name of a Kubernetes pod name; names without a k8s suffix come back unchanged.

    >>> service_from_pod("ts-gateway-service-6f6cfc45b-h5m2n"), service_from_pod("frontend-579b9bff58-t2dbm")
    ('ts-gateway-service', 'frontend')
    >>> service_from_pod("redis-cart-0"), service_from_pod("fluentd-x7k2p"), service_from_pod("frontend")
    ('redis-cart', 'fluentd', 'frontend')
    """
    for _, pattern in _POD_SUFFIX_RULES:
        m = pattern.match(pod)
        if m:
            return m.group(1)
    return pod


class _Reader:
    """State shared across the files of one :func:`read`: the trace groups and the per-pod/name caches."""

    __slots__ = ("groups", "names", "pods", "report")

    def __init__(self, report: ReadReport):
        self.report = report
        self.groups: dict[str, list[Span]] = {}
        self.pods: dict[str, tuple[str, Resource]] = {}
        self.names: dict[str, str] = {}

    def pod(self, pod: str) -> tuple[str, Resource]:
        service = service_from_pod(pod)
        entry = self.pods[pod] = (service, Resource({SERVICE_NAME: service, POD_ATTRIBUTE: pod}))
        return entry

    # --- one file -------------------------------------------------------------------------------------------
    def read_file(self, path: Path) -> None:
        report = self.report
        try:
            with open_text(path) as fh:
                header = fh.readline()
                if header.lstrip("\ufeff").strip() != HEADER_LINE:
                    got = header.strip()[:200] or "an empty file"
                    detail = f"expected header {HEADER_LINE!r}, got {got!r}"
                    report.problem(str(path), BAD_HEADER, detail, dropped=0)
                    report.counts[COUNT_SKIPPED_FILES] += 1
                    return
                report.counts[COUNT_FILES] += 1
                self._read_body(path, fh)
        except (OSError, EOFError, UnicodeError) as exc:  # corrupt or truncated gzip, unreadable file
            report.problem(str(path), UNREADABLE, f"{type(exc).__name__}: {exc}", dropped=0)

    def _read_body(self, path: Path, fh: io.TextIOBase) -> None:
        """Feed the rows after the header to :meth:`_rows`, line-split where that is exactly what csv would do."""
        name = str(path)
        carry = ""
        line_no = 2  # the header was line 1
        while True:
            chunk = fh.read(CHUNK_CHARS)
            at_end = not chunk
            chunk = carry + chunk
            if not chunk:
                return
            if '"' in chunk:
                # Quoting (possibly a field with a comma or a newline) from here on: let csv parse the rest of the
                # file. Complete the current partial line first so csv sees whole lines.
                rest = chunk + fh.readline()
                reader = csv.reader(itertools.chain(io.StringIO(rest, newline=""), fh))
                self._rows(name, line_no, reader, reader)
                return
            if "\r" in chunk:
                chunk = chunk.replace("\r\n", "\n")
            lines = chunk.split("\n")
            carry = "" if at_end else lines.pop()  # a partial last line, completed by the next chunk
            self._rows(name, line_no, [line.split(",") for line in lines])
            if at_end:
                return
            line_no += len(lines)

    def _rows(self, name: str, first_line: int, rows: Iterable[list[str]], reader: Any = None) -> None:
        """Turn rows into spans. ``reader``: the csv reader producing ``rows``, for its line numbers."""
        report = self.report
        groups = self.groups
        pods = self.pods
        names = self.names
        make_pod = self.pod
        unspecified = SpanKind.UNSPECIFIED
        unset = STATUS_UNSET
        root = ROOT_PARENT
        n_rows = n_spans = mismatched = nan_durations = empty_parents = backwards = 0
        line_no = first_line - 1

        def where(line: int) -> str:  # the csv reader knows physical lines (quoted newlines); splitting counts them
            return f"{name}:{first_line - 1 + reader.line_num if reader is not None else line}"

        for row in rows:
            line_no += 1
            try:
                trace_id, span_id, parent_id, pod, op, start, end, duration = row
            except ValueError:
                if row == [] or row == [""]:  # blank line (csv gives [], split gives [''])
                    continue
                n_rows += 1
                report.problem(where(line_no), BAD_COLUMNS, f"{len(row)} columns, expected {N_COLUMNS}")
                continue
            n_rows += 1
            try:
                start = int(start)
                end = int(end)
            except ValueError:
                report.problem(where(line_no), BAD_TIME, f"start {start!r}, end {end!r}")
                continue
            if not trace_id or not span_id:
                report.problem(where(line_no), BAD_IDS, f"TraceID {trace_id!r}, SpanID {span_id!r}")
                continue
            # Duration is redundant (µs); any rounding of (end - start) / 1000 agrees within 1000 ns.
            try:
                diff = end - start - int(duration) * 1000
                if diff >= 1000 or diff <= -1000:
                    mismatched += 1
            except ValueError:
                nan_durations += 1
            if end < start:
                backwards += 1
            if parent_id == root:
                parent_id = None
            elif not parent_id:
                parent_id = None
                empty_parents += 1
            entry = pods.get(pod)
            if entry is None:
                entry = make_pod(pod)
            cached = names.get(op)
            if cached is None:
                names[op] = op
            else:
                op = cached
            spans = groups.get(trace_id)
            if spans is None:
                spans = groups[trace_id] = []
            else:
                trace_id = spans[0].trace_id  # share one id string per trace instead of one per row
            # Positional: the dataclass __init__ is ~30% cheaper this way than with keywords.
            spans.append(Span(trace_id, span_id, parent_id, entry[0], op, start, end, unspecified, unset, {}, entry[1]))
            n_spans += 1
        counts = report.counts
        counts[COUNT_ROWS] += n_rows
        counts[COUNT_SPANS] += n_spans
        if mismatched:
            counts[COUNT_DURATION_MISMATCH] += mismatched
        if nan_durations:
            counts[COUNT_DURATION_NAN] += nan_durations
        if empty_parents:
            counts[COUNT_EMPTY_PARENT] += empty_parents
        if backwards:
            counts[COUNT_END_BEFORE_START] += backwards


def read(paths: Iterable[str | Path], report: ReadReport | None = None) -> list[Trace]:
    """Read span CSV files (plain or gzip) into traces, grouped by TraceID across all files.

    Traces come in first-seen order, spans in file order. Bad rows and files go to ``report``.
    """
    reader = _Reader(report if report is not None else ReadReport())
    with paused_gc():
        for path in paths:
            reader.read_file(Path(path))
        return [Trace(spans, trace_id) for trace_id, spans in reader.groups.items()]
