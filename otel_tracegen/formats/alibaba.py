"""Alibaba cluster-trace-microservices call-graph rows (v2021 MSCallGraph, v2022 CallGraph), read-only.

Schemas, detected from each file's header (column order free; a leading unnamed pandas index column is skipped):

- v2021 ``traceid,timestamp,rpcid,um,rpctype,dm,interface,rt``
- v2022 ``timestamp,traceid,service,rpc_id,rpctype,um,uminstanceid,interface,dm,dminstanceid,rt``

Each row is one call from an upstream microservice (``um``) to a downstream one (``dm``), identified inside its
trace by a hierarchical ``rpc_id`` (``0.1.3``: the third call made by the DM of call ``0.1``). One canonical span
per call:

========== ===================================================================================================
span_id    the rpc_id (``rpc_id#2``, ``#3``... for further distinct calls that reuse an rpc_id, see below)
parent_id  the rpc_id without its last component; ``None`` (a root) when no ancestor of the rpc_id occurs in
           the trace: rpc_id ``0``, and the common case of a trace whose recorded calls start below ``0``
           (103 of the 196 v2022 sample traces start at ``0.1`` or ``0.1.1``). An ancestor present but the
           parent itself missing is a *hole*: the span keeps the parent id and is an orphan (the validator
           reports it, infill repairs it)
service    ``dm``; unknown markers (``(?)``, ``UNKNOWN``, ``UNAVAILABLE``, empty) become ``UNKNOWN``
name       ``interface``; ``rpctype`` when empty (the README: only remote invocation and HTTP carry one)
kind       from ``rpctype`` (:data:`KIND_BY_RPCTYPE`)
start_ns   ``timestamp`` (ms) * 1e6 -- milliseconds since the start of the trace window, *not* Unix time
end_ns     start + ``|rt|`` ms (rt is the response time in ms)
attributes ``alibaba.<column>`` for rpc_id, rpctype, um, dm, rt and (v2022) service, uminstanceid, dminstanceid,
           raw values (``(?)`` stays ``(?)``); on a merged span they come from the view that supplied ``dm``,
           with ``um`` and unknown instance ids filled from the other view
========== ===================================================================================================

Client and server views. The dataset README says a remote invocation (rpc, http) is recorded twice with the
same rpc_id, by the UM (rt > 0: UM's response time) and by the DM (rt < 0: minus the DM's response time).
Such a pair is merged into one span (``report.repair(MERGED)``):

- v2021 (signed rt): a row with rt > 0 pairs with the nearest-in-time row with rt < 0 of the same rpctype;
  rt 0 is either view (0 ms rounds to ``0`` and ``-0`` alike), so leftover zeros pair with leftovers or each
  other. The endpoints are not compared: in the samples the two views of one call often name different dm
  hashes (75e5 -> 0917 in the client row, 75e5 -> 84f9 in the server row), and the server row's dm is the
  one the call's children name as their um (30 of 32 such pairs), so the merged span takes ``dm`` and
  ``interface`` from the server view and ``um`` from the client view.
- v2022 (rt always >= 0, so no side can be told from the sign): two rows of the same remote rpctype pair when
  their um and dm agree or one of them is unknown (one view of a call often has ``dm=UNKNOWN`` or
  ``um=UNKNOWN``); the known values win. 98 of 149 duplicate pairs in the sample are identical rows.

The merged span covers both views (earliest start to latest end); the other view's rt, and its dm/interface
where they differ, stay as ``alibaba.other_view.*`` attributes. Everything else sharing an rpc_id is a
*distinct* call: the maintainers explain that asynchronous threads that do not forward the trace context
reuse an rpc_id (alibaba/clusterdata#124), memcached calls above all. Those are kept as separate spans; the
first (remote calls first, then by time) keeps the plain rpc_id as span id -- children name it as parent --
and the others get ``#2``, ``#3``... so span ids stay unique; ``alibaba.rpc_id`` always holds the original.

Rows that cannot be placed (wrong column count, empty traceid or rpc_id, non-numeric timestamp or rt) are
dropped with a :class:`~otel_tracegen.report.Problem` at ``file:line``. Unknown endpoints, negative rt,
top-level calls below ``0`` and holes are kept and counted in ``report.counts``.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ._io import COUNT_FILES, UNREADABLE, open_text
from ..report import ReadReport
from ..trace import SERVICE_NAME, AttrValue, Resource, Span, SpanKind, Trace

V2021 = "v2021"
V2022 = "v2022"
SCHEMAS: dict[str, tuple[str, ...]] = {
    V2021: ("traceid", "timestamp", "rpcid", "um", "rpctype", "dm", "interface", "rt"),
    V2022: ("timestamp", "traceid", "service", "rpc_id", "rpctype", "um", "uminstanceid", "interface", "dm",
            "dminstanceid", "rt"),
}
INDEX_COLUMNS = frozenset({"", "unnamed: 0", "index"})  # a leading pandas index column (one sample has it)

ATTR_PREFIX = "alibaba."
RPC_ID_ATTRIBUTE = "alibaba.rpc_id"  # the validator checks hierarchical-id consistency on this key
OTHER_VIEW_PREFIX = "alibaba.other_view."

UNKNOWN_SERVICE = "UNKNOWN"  # one token for every unknown-endpoint marker, v2022's own spelling
UNKNOWN_MARKERS = frozenset({"", "(?)", "UNKNOWN", "UNAVAILABLE", "unknown", "?"})

# rpctype -> span kind. The span stands for the call as seen from its DM (service = dm):
# - rpc, http: remote invocations the DM serves -> SERVER;
# - mq: the README's MQ rt runs "from DM fetching the message to finishing it" -> CONSUMER;
# - db, mc: inter-process calls into a stateful store that records nothing itself (stateful services are not
#   in the traced clusters), so the row is the caller's view of a backend call, as OpenTelemetry models
#   database and cache calls -> CLIENT;
# - userDefined: in-process instrumentation (um == dm in the samples) -> INTERNAL.
# Anything else (v2022 writes UNKNOWN) -> UNSPECIFIED.
KIND_BY_RPCTYPE: dict[str, SpanKind] = {
    "rpc": SpanKind.SERVER,
    "http": SpanKind.SERVER,
    "mq": SpanKind.CONSUMER,
    "db": SpanKind.CLIENT,
    "mc": SpanKind.CLIENT,
    "userdefined": SpanKind.INTERNAL,
}
REMOTE_RPCTYPES = frozenset({"rpc", "http"})  # recorded twice, by UM and DM (README)

NS_PER_MS = 1_000_000

# Problem reasons (keys of report.dropped).
BAD_HEADER = "not an Alibaba call-graph header"
BAD_COLUMNS = "wrong column count"
EMPTY_TRACE_ID = "empty traceid"
EMPTY_RPC_ID = "missing rpc_id"
BAD_NUMBER = "non-numeric timestamp or rt"

# report.repaired keys.
MERGED = "merged client/server duplicate rows"
UNKNOWN_FROM_OTHER_VIEW = "unknown dm in one view taken from the other"

# report.counts keys.
COUNT_ROWS = "rows read"
COUNT_SPANS = "spans read"
COUNT_SKIPPED_FILES = "files skipped (not Alibaba call graph)"
COUNT_V2021_FILES = "alibaba: v2021 files"
COUNT_V2022_FILES = "alibaba: v2022 files"
COUNT_UNKNOWN_DM = "alibaba: unknown dm (service UNKNOWN)"
COUNT_UNKNOWN_UM = "alibaba: unknown um"
COUNT_NEGATIVE_RT = "alibaba: negative rt rows (server view, duration |rt|)"
COUNT_LONE_SERVER_VIEW = "alibaba: server view without client row"
COUNT_REUSED_RPC_ID = "alibaba: rpc_id reused by a distinct call (span id suffixed #n)"
COUNT_TOP_BELOW_ZERO = "alibaba: top-level call below rpc_id 0 (no recorded ancestor)"
COUNT_HOLES = "alibaba: parent rpc_id missing (hole), kept as orphan"
COUNT_EMPTY_INTERFACE = "alibaba: empty interface (name = rpctype)"
COUNT_UNKNOWN_RPCTYPE = "alibaba: rpctype without a kind (UNSPECIFIED)"


@dataclass(slots=True)
class _Row:
    """One validated row. ``order`` is its global read position (tie-breaker, first-seen order)."""

    order: int
    trace_id: str
    rpc_id: str
    ts_ms: float
    rt_ms: float
    rpctype: str
    um: str
    dm: str
    interface: str
    service: str | None  # v2022 only
    um_instance: str | None
    dm_instance: str | None
    signed: bool  # v2021: the sign of rt tells the view


def _known(value: str | None) -> bool:
    return value is not None and value not in UNKNOWN_MARKERS


def _detect(header: list[str]) -> tuple[str, dict[str, int]] | None:
    """(schema, column name -> index) for a header row, or None."""
    cols = [c.strip().lstrip("\ufeff").lower() for c in header]
    offset = 1 if len(cols) > 1 and cols[0] in INDEX_COLUMNS else 0
    names = cols[offset:]
    for schema, expected in SCHEMAS.items():
        if sorted(names) == sorted(expected):
            return schema, {name: offset + i for i, name in enumerate(names)}
    return None


class _Reader:
    """Validated rows of every file of one :func:`read`, grouped by trace id across files."""

    def __init__(self, report: ReadReport):
        self.report = report
        self.rows: dict[str, list[_Row]] = {}  # trace id -> rows, first-seen order
        self.order = 0

    def read_file(self, path: Path) -> None:
        report = self.report
        try:
            with open_text(path) as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                detected = _detect(header) if header else None
                if detected is None:
                    expected = " or ".join(repr(",".join(c)) for c in SCHEMAS.values())
                    got = ",".join(header)[:200] if header else "an empty file"
                    report.problem(str(path), BAD_HEADER, f"expected {expected}, got {got!r}", dropped=0)
                    report.counts[COUNT_SKIPPED_FILES] += 1
                    return
                schema, idx = detected
                report.counts[COUNT_FILES] += 1
                report.counts[COUNT_V2021_FILES if schema == V2021 else COUNT_V2022_FILES] += 1
                self._read_rows(str(path), reader, schema, idx)
        except (OSError, EOFError, UnicodeError, csv.Error) as exc:
            report.problem(str(path), UNREADABLE, f"{type(exc).__name__}: {exc}", dropped=0)

    def _read_rows(self, name: str, reader: Any, schema: str, idx: dict[str, int]) -> None:
        report = self.report
        v2022 = schema == V2022
        i_trace, i_ts, i_rt = idx["traceid"], idx["timestamp"], idx["rt"]
        i_rpc = idx["rpc_id" if v2022 else "rpcid"]
        i_um, i_dm, i_type, i_if = idx["um"], idx["dm"], idx["rpctype"], idx["interface"]
        i_service, i_umi, i_dmi = (idx["service"], idx["uminstanceid"], idx["dminstanceid"]) if v2022 else (0, 0, 0)
        width = max(idx.values()) + 1
        n_rows = 0
        for row in reader:
            if not row:
                continue
            n_rows += 1
            where = f"{name}:{reader.line_num}"
            if len(row) != width:
                report.problem(where, BAD_COLUMNS, f"{len(row)} columns, expected {width}")
                continue
            trace_id, rpc_id = row[i_trace].strip(), row[i_rpc].strip()
            if not trace_id:
                report.problem(where, EMPTY_TRACE_ID)
                continue
            if not rpc_id:
                report.problem(where, EMPTY_RPC_ID, f"traceid {trace_id}")
                continue
            try:
                ts, rt = float(row[i_ts]), float(row[i_rt])
            except ValueError:
                ts = rt = math.nan
            if not (math.isfinite(ts) and math.isfinite(rt)):
                report.problem(where, BAD_NUMBER, f"timestamp {row[i_ts]!r}, rt {row[i_rt]!r}")
                continue
            self.order += 1
            parsed = _Row(
                self.order, trace_id, rpc_id, ts, rt, row[i_type], row[i_um], row[i_dm], row[i_if],
                row[i_service] if v2022 else None, row[i_umi] if v2022 else None, row[i_dmi] if v2022 else None,
                not v2022,
            )
            bucket = self.rows.get(trace_id)
            if bucket is None:
                self.rows[trace_id] = [parsed]
            else:
                bucket.append(parsed)
        report.counts[COUNT_ROWS] += n_rows


# --- client/server pairing --------------------------------------------------------------------------------


def _nearest(row: _Row, candidates: list[_Row]) -> _Row | None:
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (abs(c.ts_ms - row.ts_ms), c.order))
    candidates.remove(best)
    return best


def _pair_signed(rows: list[_Row]) -> list[tuple[_Row, ...]]:
    """v2021: pair rt > 0 (client) with rt < 0 (server) rows of one rpctype; rt == 0 may be either."""
    clients = [r for r in rows if r.rt_ms > 0]
    servers = [r for r in rows if r.rt_ms < 0]
    zeros = [r for r in rows if r.rt_ms == 0]
    calls: list[tuple[_Row, ...]] = []
    for c in clients:  # rows are in time order
        s = _nearest(c, servers) or _nearest(c, zeros)
        calls.append((c, s) if s else (c,))
    for s in servers:
        z = _nearest(s, zeros)
        calls.append((z, s) if z else (s,))
    while zeros:
        z = zeros.pop(0)
        other = _nearest(z, zeros)
        calls.append((z, other) if other else (z,))
    return calls


def _compatible(a: _Row, b: _Row) -> bool:
    return all(x == y or not _known(x) or not _known(y) for x, y in ((a.um, b.um), (a.dm, b.dm)))


def _pair_unsigned(rows: list[_Row]) -> list[tuple[_Row, ...]]:
    """v2022: pair rows (in time order) whose um and dm agree or are unknown on one side."""
    calls: list[tuple[_Row, ...]] = []
    left = list(rows)
    while left:
        a = left.pop(0)
        b = next((r for r in left if _compatible(a, r)), None)
        if b is None:
            calls.append((a,))
        else:
            left.remove(b)
            calls.append((a, b))
    return calls


def _calls(rows: list[_Row]) -> list[tuple[_Row, ...]]:
    """The calls behind the rows of one (trace, rpc_id): merged view pairs and single rows, remote first."""
    rows = sorted(rows, key=lambda r: (r.ts_ms, r.order))
    remote: dict[tuple[str, bool], list[_Row]] = defaultdict(list)
    singles: list[tuple[_Row, ...]] = []
    for r in rows:
        if r.rpctype.lower() in REMOTE_RPCTYPES:
            remote[(r.rpctype, r.signed)].append(r)
        else:
            singles.append((r,))
    calls: list[tuple[_Row, ...]] = []
    for (_, signed), group in remote.items():
        calls.extend(_pair_signed(group) if signed else _pair_unsigned(group))
    calls.sort(key=lambda call: (min(r.ts_ms for r in call), min(r.order for r in call)))
    return calls + singles  # remote calls first: the plain rpc_id goes to the call children hang under


# --- spans ------------------------------------------------------------------------------------------------


class _SpanBuilder:
    """Spans from grouped rows; one shared Resource per service."""

    def __init__(self, report: ReadReport):
        self.report = report
        self.resources: dict[str, Resource] = {}

    def resource(self, service: str) -> Resource:
        res = self.resources.get(service)
        if res is None:
            res = self.resources[service] = Resource({SERVICE_NAME: service})
        return res

    def span(self, call: tuple[_Row, ...], span_id: str, parent_id: str | None) -> Span:
        report = self.report
        counts = report.counts
        other: _Row | None = None
        if len(call) == 1:
            primary = call[0]
            um = primary.um
        else:
            report.repair(MERGED)
            a, b = call
            if a.signed:
                # client view: the larger rt (positive, or 0 against a negative); on a tie the earlier row
                client, server = (a, b) if (-a.rt_ms, a.order) < (-b.rt_ms, b.order) else (b, a)
                # dm and interface from the server view: its dm is what the call's children name as their um
                primary, other = (server, client) if _known(server.dm) else (client, server)
                um = client.um if _known(client.um) else server.um  # the client view records its own name
            else:
                primary, other = (a, b) if _known(a.dm) or not _known(b.dm) else (b, a)
                um = primary.um if _known(primary.um) else other.um
            if _known(primary.dm) and not _known(other.dm):
                report.repair(UNKNOWN_FROM_OTHER_VIEW)
        dm = primary.dm

        service = dm if _known(dm) else UNKNOWN_SERVICE
        if service == UNKNOWN_SERVICE:
            counts[COUNT_UNKNOWN_DM] += 1
        if not _known(um):
            counts[COUNT_UNKNOWN_UM] += 1
        interface = primary.interface or (other.interface if other is not None else "")
        rpctype = primary.rpctype
        if not interface:
            counts[COUNT_EMPTY_INTERFACE] += 1
        kind = KIND_BY_RPCTYPE.get(rpctype.lower())
        if kind is None:
            kind = SpanKind.UNSPECIFIED
            counts[COUNT_UNKNOWN_RPCTYPE] += 1

        start_ms = min(r.ts_ms for r in call)
        end_ms = max(r.ts_ms + abs(r.rt_ms) for r in call)
        attrs: dict[str, AttrValue] = {
            RPC_ID_ATTRIBUTE: primary.rpc_id,
            ATTR_PREFIX + "rpctype": rpctype,
            ATTR_PREFIX + "um": um,
            ATTR_PREFIX + "dm": dm,
            ATTR_PREFIX + "rt": primary.rt_ms,
        }
        if primary.service is not None:  # v2022
            attrs[ATTR_PREFIX + "service"] = primary.service
            umi = primary.um_instance
            dmi = primary.dm_instance
            if other is not None:
                umi = umi if _known(umi) else other.um_instance
                dmi = dmi if _known(dmi) else other.dm_instance
            attrs[ATTR_PREFIX + "uminstanceid"] = umi
            attrs[ATTR_PREFIX + "dminstanceid"] = dmi
        if other is not None:
            attrs[OTHER_VIEW_PREFIX + "rt"] = other.rt_ms
            if other.dm != dm:
                attrs[OTHER_VIEW_PREFIX + "dm"] = other.dm
            if other.interface != interface:
                attrs[OTHER_VIEW_PREFIX + "interface"] = other.interface
            if other.service is not None and other.service != primary.service:
                attrs[OTHER_VIEW_PREFIX + "service"] = other.service
        return Span(
            primary.trace_id,
            span_id,
            parent_id,
            service,
            interface or rpctype,
            round(start_ms * NS_PER_MS),
            round(end_ms * NS_PER_MS),
            kind,
            attributes=attrs,
            resource=self.resource(service),
        )

    def trace(self, trace_id: str, rows: list[_Row]) -> Trace:
        counts = self.report.counts
        counts[COUNT_NEGATIVE_RT] += sum(1 for r in rows if r.rt_ms < 0)
        by_rpc: dict[str, list[_Row]] = {}
        for r in rows:
            by_rpc.setdefault(r.rpc_id, []).append(r)
        ids = set(by_rpc)
        spans: list[tuple[int, Span]] = []
        for rpc_id, group in by_rpc.items():
            parent_id = _parent(rpc_id, ids)
            for k, call in enumerate(_calls(group), start=1):
                if parent_id is None and rpc_id != "0":
                    counts[COUNT_TOP_BELOW_ZERO] += 1
                elif parent_id is not None and parent_id not in ids:
                    counts[COUNT_HOLES] += 1
                if k > 1:
                    counts[COUNT_REUSED_RPC_ID] += 1
                if len(call) == 1 and call[0].signed and call[0].rt_ms < 0:
                    counts[COUNT_LONE_SERVER_VIEW] += 1
                span_id = rpc_id if k == 1 else f"{rpc_id}#{k}"
                spans.append((min(r.order for r in call), self.span(call, span_id, parent_id)))
        spans.sort(key=lambda item: item[0])  # first-seen row order
        counts[COUNT_SPANS] += len(spans)
        return Trace([s for _, s in spans], trace_id)


def _parent(rpc_id: str, ids: set[str]) -> str | None:
    """The parent rpc_id, or None for a top-level call (no ancestor of ``rpc_id`` among ``ids``)."""
    head, dot, _ = rpc_id.rpartition(".")
    if not dot:
        return None  # "0": the entry call
    ancestor = head
    while ancestor:
        if ancestor in ids:
            return head  # which may itself be missing: a hole, and this span an orphan
        ancestor = ancestor.rpartition(".")[0]
    return None


def read(paths: Iterable[str | Path], report: ReadReport | None = None) -> list[Trace]:
    """Read Alibaba call-graph CSV files (plain or gzip, either schema) into traces, grouped across files."""
    report = report if report is not None else ReadReport()
    reader = _Reader(report)
    for path in paths:
        reader.read_file(Path(path))
    builder = _SpanBuilder(report)
    return [builder.trace(trace_id, rows) for trace_id, rows in reader.rows.items()]
