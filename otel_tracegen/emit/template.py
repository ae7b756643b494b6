"""The library encoded to OTLP once; per emission only ids and times are written into the bytes.

At 100,000 spans/s Python has about 10 µs per span, far less than encoding a span takes. But in an
``ExportTraceServiceRequest`` the fields that change from one replay of a trace to the next are fixed-width:
``trace_id`` (16 bytes), ``span_id`` and ``parent_span_id`` (8), the span's and its events' times (fixed64), a
link's ids. So each library trace is encoded once (by :class:`~.wire.SdkWireEncoder`, the SDK exporter's exact
bytes) with placeholders there, and where each placeholder lies is recorded. A batch is then the traces'
encoded spans joined under their resources and scopes, and three vectorized writes (numpy) of fresh ids and
times: a few Python steps per trace and per (resource, scope) part of it, none per span.

Ids. Every 8-byte id of a trace (its spans' ids, the parents they name, its own spans named by links) is a
*slot*: spans that share an id share a slot, and a parent the trace does not hold (an orphan's) gets a slot of
its own, so captured traces keep their shape. A slot's id is ``mix(key + n)`` for the n-th slot of the run,
where ``mix`` is a bijection of 64-bit integers (SplitMix64's finalizer): ids look random, are reproducible from
the seed, and are unique across the run by construction. Trace ids likewise (the low 64 bits a bijection of the
trace's number). Processes of one run take disjoint ranges of numbers.

Times. A trace's times are offsets from its earliest start, added to its arrival. ``jitter`` passes them through
a random increasing piecewise-linear map (8 pieces, slopes within ``[1/(1+F), 1+F]``): durations and gaps vary
by up to the factor, and since the map keeps order, every child stays where it was relative to its parent
(inside it, or as loose as captured).

:meth:`Templates.materialize` builds the same traces as canonical objects (for files and the SDK exporter);
``tests/test_replay.py`` checks that their SDK-path encoding equals the batch bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..formats._otlp_common import read_varint, varint
from ..trace import Event, Link, Span, Trace
from .wire import SdkWireEncoder

TRACE_ID, SPAN_ID, TIME = 0, 1, 2  # what a patch writes: the trace id, a slot's id, a time
_PLACEHOLDER_TRACE = "0" * 31 + "1"
_PLACEHOLDER_SPAN = "0" * 15 + "1"
WARP_PIECES = 8
_U64 = np.uint64
_AR8 = np.arange(8)
_AR16 = np.arange(16)


@dataclass
class TraceTemplate:
    """One library trace, encoded: parts by (resource, scope) in first-seen order, each with its patch table
    ``(offset in the part, what, slot or time index)``; the trace's times relative to its start, in the order
    span start, span end, its events' times; which slot each span's id and parent take."""

    parts: list[tuple[int, int, bytes, np.ndarray]]
    slots: int
    rel_times: np.ndarray  # int64 ns
    span_slots: np.ndarray  # per span
    parent_slots: np.ndarray  # per span, -1 for none
    time_index: list[tuple[int, int, list[int]]]  # per span: start, end, events' indices into rel_times (-1: a time
    # of 0, "not recorded", which stays 0)
    link_slots: list[list[int]]  # per span, per link: its slot, -1 when the link names another trace
    spans: int
    duration: int


class IdStream:
    """Unique, random-looking, reproducible ids: ``mix(key + n)`` for successive n (see the module's text)."""

    def __init__(self, seed: int, process: int = 0) -> None:
        rng = np.random.default_rng([seed & (2**63 - 1), 0x5EED])
        self.span_key, self.trace_key, self.high_key = (int(x) for x in rng.integers(0, 2**63, 3))
        self.next_slot = self.next_trace = process << 56  # 2**56 ids per process before ranges could meet

    @staticmethod
    def mix(x: np.ndarray) -> np.ndarray:
        x = x.astype(_U64, copy=True)
        x ^= x >> _U64(30)
        x *= _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
        return x

    def slots(self, n: int) -> np.ndarray:
        """``n`` fresh span ids (uint64, never 0)."""
        start = self.next_slot
        self.next_slot += n
        with np.errstate(over="ignore"):
            ids = self.mix(np.arange(start, start + n, dtype=_U64) + _U64(self.span_key))
        ids[ids == 0] = 1  # one value in 2**64 maps to 0, which OTLP reserves for "no id"
        return ids

    def traces(self, n: int) -> np.ndarray:
        """``n`` fresh trace ids as an (n, 16) uint8 array, big-endian (the low half unique)."""
        start = self.next_trace
        self.next_trace += n
        counter = np.arange(start, start + n, dtype=_U64)
        with np.errstate(over="ignore"):
            low = self.mix(counter + _U64(self.trace_key))
            high = self.mix(counter + _U64(self.high_key))
        return np.concatenate([_be_bytes(high), _be_bytes(low)], axis=1)


def _be_bytes(ids: np.ndarray) -> np.ndarray:
    return ids.astype(">u8").view(np.uint8).reshape(-1, 8)


def _hex(row: np.ndarray) -> str:
    return row.tobytes().hex()


def _locate(body: bytes, base: int) -> list[tuple[int, int, int]]:
    """``(offset, what, ordinal)`` of the patchable fields of a Span message body, ``base`` added to offsets.
    ``what``: ``TRACE_ID``, ``SPAN_ID`` with ordinal 0 (span id), 1 (parent) or 2 + k (link k's span id; its
    trace id is ``TRACE_ID`` with ordinal 1 + k), ``TIME`` with ordinal 0 (start), 1 (end) or 2 + k (event k)."""
    out = []
    pos, events, links = 0, 0, 0
    while pos < len(body):
        tag, p = read_varint(body, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            n, p = read_varint(body, p)
            if number == 1:
                out.append((base + p, TRACE_ID, 0))
            elif number in (2, 4):
                out.append((base + p, SPAN_ID, 0 if number == 2 else 1))
            elif number in (11, 13):
                inner, end = p, p + n
                while inner < end:
                    itag, q = read_varint(body, inner)
                    if itag & 7 == 2:
                        m, q = read_varint(body, q)
                        if number == 13 and itag >> 3 in (1, 2):
                            out.append((base + q, TRACE_ID if itag >> 3 == 1 else SPAN_ID, 1 + links if itag >> 3 == 1
                                        else 2 + links))  # fmt: skip
                        inner = q + m
                    elif itag & 7 == 1:
                        if number == 11 and itag >> 3 == 1:
                            out.append((base + q, TIME, 2 + events))
                        inner = q + 8
                    elif itag & 7 == 5:
                        inner = q + 4
                    else:
                        _, inner = read_varint(body, q)
                events += number == 11
                links += number == 13
            pos = p + n
        elif wire == 1:
            if number in (7, 8):
                out.append((base + p, TIME, number - 7))
            pos = p + 8
        elif wire == 5:
            pos = p + 4
        else:
            _, pos = read_varint(body, p)
    return out


class Templates:
    """Every library trace encoded once, and the batches and traces made from them."""

    def __init__(self, traces: Sequence[Trace]) -> None:
        self.encoder = SdkWireEncoder()
        self.resources: list[tuple[bytes, bytes]] = []  # rid -> (ResourceSpans.resource field, schema_url field)
        self.scopes: list[tuple[bytes, bytes]] = []  # sid -> (ScopeSpans.scope field, schema_url field)
        self._rids: dict = {}
        self._sids: dict = {}
        self.traces: list[Trace] = list(traces)
        self.templates = [self._encode(t) for t in self.traces]

    def _group(self, span: Span) -> tuple[int, int]:
        rkey, rfield, rschema = self.encoder._resource(span)
        rid = self._rids.get(rkey)
        if rid is None:
            rid = self._rids[rkey] = len(self.resources)
            self.resources.append((rfield, rschema))
        skey, sfield, sschema = self.encoder._scope(span.scope)
        sid = self._sids.get(skey)
        if sid is None:
            sid = self._sids[skey] = len(self.scopes)
            self.scopes.append((sfield, sschema))
        return rid, sid

    def _encode(self, trace: Trace) -> TraceTemplate:
        slot_of: dict[str, int] = {}
        for s in trace.spans:
            slot_of.setdefault(s.span_id, len(slot_of))
        origin = min(s.start_ns for s in trace.spans if s.start_ns > 0)  # a time of 0 is "not recorded": kept so
        rel: list[int] = []
        span_slots, parent_slots, time_index, link_slots = [], [], [], []
        tid = bytes.fromhex(_PLACEHOLDER_TRACE)
        parts: dict[tuple[int, int], list] = {}  # (rid, sid) -> [span fields, patches, bytes so far]
        for s in trace.spans:
            parent = slot_of.setdefault(s.parent_id, len(slot_of)) if s.parent_id else -1
            own_links = [slot_of.setdefault(ln.span_id, len(slot_of)) if ln.trace_id == trace.trace_id else -1
                         for ln in s.links]  # fmt: skip
            times = []
            for t in (s.start_ns, s.end_ns):
                times.append(len(rel) if t else -1)
                if t:
                    rel.append(t - origin)
            event_times = []
            for e in s.events:
                if e.time_ns:
                    event_times.append(len(rel))
                    rel.append(e.time_ns - origin)
                else:
                    event_times.append(-1)
            placeholder = Span(_PLACEHOLDER_TRACE, _PLACEHOLDER_SPAN, _PLACEHOLDER_SPAN if s.parent_id else None,
                               s.service, s.name, 1 if s.start_ns else 0, 1 if s.end_ns else 0, s.kind, s.status,
                               s.attributes, s.resource, s.scope,
                               [Event(1 if e.time_ns else 0, e.name, e.attributes) for e in s.events],
                               [Link(_PLACEHOLDER_TRACE if own >= 0 else ln.trace_id,
                                     _PLACEHOLDER_SPAN if own >= 0 else ln.span_id, attributes=ln.attributes)
                                for ln, own in zip(s.links, own_links)])  # fmt: skip
            body = self.encoder._span(placeholder, tid)
            head = b"\x12" + varint(len(body))
            part = parts.setdefault(self._group(s), [[], [], 0])
            blobs, marks, base = part[0], part[1], part[2] + len(head)
            blobs.append(head + body)
            part[2] = base + len(body)
            for offset, what, ordinal in _locate(body, base):
                if what == TRACE_ID:
                    if ordinal == 0 or own_links[ordinal - 1] >= 0:
                        marks.append((offset, TRACE_ID, 0))
                elif what == SPAN_ID:
                    slot = (slot_of[s.span_id] if ordinal == 0 else parent if ordinal == 1
                            else own_links[ordinal - 2])  # fmt: skip
                    if slot >= 0:
                        marks.append((offset, SPAN_ID, slot))
                else:
                    marks.append((offset, TIME, times[ordinal] if ordinal < 2 else event_times[ordinal - 2]))
            span_slots.append(slot_of[s.span_id])
            parent_slots.append(parent)
            time_index.append((times[0], times[1], event_times))
            link_slots.append(own_links)
        out_parts = [(rid, sid, b"".join(blobs), np.array(marks, dtype=np.int64).reshape(-1, 3))
                     for (rid, sid), (blobs, marks, _) in parts.items()]  # fmt: skip
        rel_arr = np.array(rel, dtype=np.int64)
        return TraceTemplate(parts=out_parts, slots=len(slot_of), rel_times=rel_arr,
                             span_slots=np.array(span_slots, dtype=np.int64),
                             parent_slots=np.array(parent_slots, dtype=np.int64), time_index=time_index,
                             link_slots=link_slots, spans=len(trace), duration=int(max(rel_arr.max(initial=0), 0)))  # fmt: skip

    # --- per emission ----------------------------------------------------------------------------------------

    def times(self, picks: Sequence[int], arrivals: np.ndarray, jitter: float, rng: np.random.Generator | None
              ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Absolute times (int64 ns) of the picked traces' rel_times, concatenated, and where each trace's begin."""
        rels = [self.templates[i].rel_times for i in picks]
        sizes = np.fromiter((r.size for r in rels), dtype=np.int64, count=len(rels))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(rels) else np.empty(0, dtype=np.int64)
        rel = np.concatenate(rels) if rels else np.empty(0, dtype=np.int64)
        owner = np.repeat(np.arange(len(rels)), sizes)
        if jitter > 0 and rel.size:
            durations = np.array([self.templates[i].duration for i in picks], dtype=np.float64)
            rel = warp(rel, owner, durations, jitter, rng)
        return rel + arrivals[owner], starts

    def batch(self, picks: Sequence[int], arrivals: np.ndarray, ids: IdStream, *, jitter: float = 0.0,
              rng: np.random.Generator | None = None) -> bytes:  # fmt: skip
        """One ``ExportTraceServiceRequest`` holding the picked traces, the k-th arriving at ``arrivals[k]`` (ns),
        with fresh ids: what :class:`~.wire.SdkWireEncoder` would write for :meth:`materialize`'s traces."""
        templates = self.templates
        slot_base = np.zeros(len(picks), dtype=np.int64)
        groups: dict[int, dict[int, list]] = {}
        n_slots = 0
        for k, i in enumerate(picks):
            t = templates[i]
            slot_base[k] = n_slots
            n_slots += t.slots
            for rid, sid, blob, table in t.parts:
                by_scope = groups.get(rid)
                if by_scope is None:
                    by_scope = groups[rid] = {}
                members = by_scope.get(sid)
                if members is None:
                    by_scope[sid] = [(blob, table, k)]
                else:
                    members.append((blob, table, k))
        pieces: list[bytes] = []
        tables, positions, owners = [], [], []
        pos = 0
        for rid, by_scope in groups.items():
            rfield, rschema = self.resources[rid]
            scope_lengths = []
            for sid, members in by_scope.items():
                sfield, sschema = self.scopes[sid]
                scope_lengths.append(len(sfield) + sum(len(m[0]) for m in members) + len(sschema))
            rs_len = len(rfield) + len(rschema) + sum(1 + len(varint(n)) + n for n in scope_lengths)
            head = b"\x0a" + varint(rs_len) + rfield
            pieces.append(head)
            pos += len(head)
            for (sid, members), ss_len in zip(by_scope.items(), scope_lengths):
                sfield, sschema = self.scopes[sid]
                head = b"\x12" + varint(ss_len) + sfield
                pieces.append(head)
                pos += len(head)
                for blob, table, k in members:
                    pieces.append(blob)
                    tables.append(table)
                    positions.append(pos)
                    owners.append(k)
                    pos += len(blob)
                pieces.append(sschema)
                pos += len(sschema)
            pieces.append(rschema)
            pos += len(rschema)
        buf = bytearray(b"".join(pieces))
        if not tables:
            return bytes(buf)
        view = np.frombuffer(buf, dtype=np.uint8)
        sizes = np.fromiter((len(t) for t in tables), dtype=np.int64, count=len(tables))
        patch = np.concatenate(tables)
        offset = patch[:, 0] + np.repeat(np.array(positions, dtype=np.int64), sizes)
        owner = np.repeat(np.array(owners, dtype=np.int64), sizes)
        what, value = patch[:, 1], patch[:, 2]
        at = what == TRACE_ID
        view[offset[at, None] + _AR16] = ids.traces(len(picks))[owner[at]]
        at = what == SPAN_ID
        view[offset[at, None] + _AR8] = _be_bytes(ids.slots(n_slots))[value[at] + slot_base[owner[at]]]
        at = what == TIME
        times, starts = self.times(picks, arrivals, jitter, rng)
        stamps = times[value[at] + starts[owner[at]]].astype("<u8").view(np.uint8).reshape(-1, 8)
        view[offset[at, None] + _AR8] = stamps
        return bytes(buf)

    def materialize(self, picks: Sequence[int], arrivals: np.ndarray, ids: IdStream, *, jitter: float = 0.0,
                    rng: np.random.Generator | None = None) -> list[Trace]:  # fmt: skip
        """The traces :meth:`batch` would send for the same arguments (and the same state of ``ids`` and
        ``rng``), as canonical objects: for files and the SDK's exporter."""
        trace_ids = ids.traces(len(picks))
        n_slots = sum(self.templates[i].slots for i in picks)
        slot_ids = [f"{x:016x}" for x in ids.slots(n_slots).tolist()]
        times, starts = self.times(picks, arrivals, jitter, rng)
        times = times.tolist()
        out, base = [], 0
        for k, i in enumerate(picks):
            t, trace = self.templates[i], self.traces[i]
            tid, t0 = _hex(trace_ids[k]), int(starts[k])
            spans = []
            for s, slot, parent, (ts, te, evs), links in zip(trace.spans, t.span_slots.tolist(),
                                                             t.parent_slots.tolist(), t.time_index, t.link_slots):
                spans.append(Span(
                    tid, slot_ids[base + slot], slot_ids[base + parent] if parent >= 0 else None, s.service, s.name,
                    times[t0 + ts] if ts >= 0 else 0, times[t0 + te] if te >= 0 else 0, s.kind, s.status,
                    s.attributes, s.resource, s.scope,
                    [Event(times[t0 + ev] if ev >= 0 else 0, e.name, e.attributes) for e, ev in zip(s.events, evs)],
                    [Link(tid, slot_ids[base + own], attributes=ln.attributes) if own >= 0 else ln
                     for ln, own in zip(s.links, links)],
                    s.trace_state, s.flags))  # fmt: skip
            out.append(Trace(spans, tid))
            base += t.slots
        return out


def warp(rel: np.ndarray, owner: np.ndarray, durations: np.ndarray, jitter: float,
         rng: np.random.Generator | None) -> np.ndarray:  # fmt: skip
    """``rel`` (int64 ns offsets; ``owner[j]`` the trace of ``rel[j]``) through each trace's random increasing
    piecewise-linear map of ``[0, duration]`` (slopes within ``[1/(1+jitter), 1+jitter]``); outside that range
    offsets move with the range's end."""
    rng = rng if rng is not None else np.random.default_rng()
    k = WARP_PIECES
    limit = np.log1p(jitter)
    slopes = np.exp(rng.uniform(-limit, limit, size=(durations.size, k)))
    piece = durations[:, None] / k
    cum = np.concatenate([np.zeros((durations.size, 1)), np.cumsum(slopes * piece, axis=1)], axis=1)
    d = durations[owner]
    x = rel.astype(np.float64)
    inside = np.clip(x, 0.0, d)
    u = np.divide(inside, d, out=np.zeros_like(inside), where=d > 0) * k
    seg = np.minimum(u.astype(np.int64), k - 1)
    mapped = cum[owner, seg] + slopes[owner, seg] * (u - seg) * piece[owner, 0]
    mapped = np.where(d > 0, mapped, inside)
    return np.rint(mapped + (x - inside)).astype(np.int64)
