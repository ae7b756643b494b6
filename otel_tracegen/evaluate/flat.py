"""The paper's GReaT baseline: a whole trace as ONE flat table of text, generated in one pass, no recursion.

Why it exists
-------------
The paper ("Large Language Models as Realistic Microservice Trace Generators") compares its recursive,
layer-by-layer generation against GReaT (Borisov et al., 2023): a language model fine-tuned on call graphs written
as tables of text, one row per call, the whole graph in one sequence, prompted with the number of edges and the
depth. The paper reports that this flat encoding loses the structure as graphs grow (below 25 % accuracy past 15
edges, near 0 past depth 4) and memorises more of its training data. This module is that baseline for our
fidelity harness: the same tokenizer class, the same model code, presets, block size, batch size, optimizer and
checkpoint layout as ``--stage pretrain``; only the encoding differs. Sampling is free (no grammar mask), so the
harness shows what a flat encoding gets on its own.

The encoding
------------
A header with the conditions, then one row per span in pre-order (depth first as :meth:`Trace.walk` visits,
siblings in encoded start order: µs start, end, service, operation, kind, status), then ``<end>``. It is written
with the recursive encoding's lexicon (markers, ``key=value`` fields, bare or JSON-quoted strings, integers; see
:func:`otel_tracegen.encoding.lex`), so :class:`~otel_tracegen.lm.tokenizer.TraceTokenizer` reads it and no token
was added. A trace of four spans::

    <cond> svc=ts-ui-dashboard op="GET /api/v1/travel" calls=4 depth=3 <layer>
    <call> 0 src=-1 svc=ts-ui-dashboard op="GET /api/v1/travel" kind=SERVER start=0 dur=5210 status=UNSET
    <call> 1 src=0 svc=ts-travel-service op=queryInfo kind=SERVER start=402 dur=4107 status=UNSET
    <call> 2 src=1 svc=ts-route-service op=getRoute kind=CLIENT start=437 dur=1204 status=UNSET
    <call> 3 src=0 svc=ts-price-service op=getPrice kind=SERVER start=4620 dur=530 status=ERROR
    <end>

- Header (``<cond> ... <layer>``): ``svc=`` and ``op=`` of the entry (root) span, ``calls=`` the number of spans
  (the root is the client's call, as everywhere in this project), ``depth=`` the span levels on the longest
  root-to-leaf path (what :func:`otel_tracegen.validate.validate` checks with ``expect_calls``/``expect_depth``).
  Each is optional: training drops each one independently (``--flat-drop-prob``, default 0.25, as the paper's
  GReaT baseline was prompted with num_edges and depth), and a request that leaves a field ``None`` leaves it out,
  so the model decides it (it writes the entry as row 0, the size as the rows it writes).
- Row (``<call> i src=p ...``), the GReaT columns in a fixed order: ``i`` its own row index (0, 1, 2, ... in
  order), ``src=`` its parent's row index (``-1`` for row 0, the root; any earlier row for the others),
  ``svc=`` service, ``op=`` operation (span name), ``kind=`` span kind, ``start=`` start in µs after the root's
  start (row 0: 0), ``dur=`` duration in µs, ``status=`` status code. Times are floored to the µs relative to the
  root's start, as in the recursive encoding, so a child inside its parent stays inside.

GReaT writes each row as "column is value" sentences and permutes the columns; here the columns are the lexicon's
keys in a fixed order (the parent column must be readable before a row's own fields mean anything), which keeps
the rows short enough for the same context.

:func:`trace_to_table` writes a trace, :func:`table_to_trace` reads one back (fresh hex ids from ``id_seed``, the
root at ``start_ns``), raising :class:`FlatParseError` naming the row and the problem. Header conditions the
rows do not meet are not parse errors: whether a trace honours its request is the harness's question.

Training and running
--------------------
::

    otel-tracegen data build --format spancsv examples/trainticket --out /tmp/corpus
    otel-tracegen train --stage flat --corpus /tmp/corpus --out /tmp/flat --config tiny --max-steps 200
    # the budget of the shipped recursive model: --config small --max-steps 5000 (same --batch-size, block size)

A flat model directory is a pretrain-layout directory (safetensors, tokenizer, catalog, ``training.json``) whose
``training.json`` records ``"encoding": "flat"`` and the stage ``flat``; the trainer refuses to mix it with the
recursive stages in one directory. In Python::

    from otel_tracegen.evaluate.flat import FlatTableGenerator
    from otel_tracegen.sampling import TraceRequest

    gen = FlatTableGenerator.from_pretrained("/tmp/flat")
    out = gen.generate([TraceRequest(service="ts-ui-dashboard", calls=5, depth=3)], seed=0)
    out[0].trace or out[0].problem      # a Trace (ids from the seed, root at t=0), or "unparseable: ..."

Generation is batched on the runtime's ``sample()`` with a seeded ``torch.Generator`` (same requests and seed,
same traces), stops at ``<end>``, and is bounded by the request (rows for ``calls`` plus slack), a global cap and
the model's context: a table longer than the context cannot be written, which is part of what this baseline shows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..encoding import NS_PER_US, Call, EncodingError, Lexeme, lex, render_str, single_root
from ..report import UserError
from ..trace import Span, SpanKind, Status, StatusCode, Trace
from .generators import Generated, Progress

FLAT_STAGE = "flat"
"""The training stage (``otel-tracegen train --stage flat``) and the ``encoding`` a flat model's card records."""
HEADER_KEYS: tuple[str, ...] = ("svc", "op", "calls", "depth")
ROW_KEYS: tuple[str, ...] = ("svc", "op", "kind", "start", "dur", "status")
DEFAULT_DROP_PROB = 0.25
ROW_TOKENS = 40
"""Tokens one row may take (``<call>``, two indices, six fields with 10-digit times): the per-row budget."""


class FlatEncodeError(ValueError):
    """A trace the flat table cannot represent (not exactly one root, orphans, duplicate span ids)."""


class FlatParseError(ValueError):
    """Text that is not a flat table. ``row`` is the 0-based row the problem is in, when there is one."""

    def __init__(self, problem: str, row: int | None = None):
        self.problem = problem
        self.row = row
        super().__init__(problem if row is None else f"row {row}: {problem}")


@dataclass(frozen=True)
class TableHeader:
    """The conditions of a table; ``None``: left out (dropped in training, or left to the model)."""

    service: str | None = None
    operation: str | None = None
    calls: int | None = None
    depth: int | None = None

    def text(self) -> str:
        parts = ["<cond>"]
        if self.service is not None:
            parts.append(f"svc={render_str(self.service)}")
        if self.operation is not None:
            parts.append(f"op={render_str(self.operation)}")
        if self.calls is not None:
            parts.append(f"calls={int(self.calls)}")
        if self.depth is not None:
            parts.append(f"depth={int(self.depth)}")
        parts.append("<layer>")
        return " ".join(parts)


@dataclass(frozen=True)
class TableRow:
    """One span. ``parent`` is the parent's row index (-1 for the root); times in µs after the root's start."""

    index: int
    parent: int
    service: str
    operation: str
    kind: SpanKind
    start: int
    duration: int
    status: StatusCode

    def text(self) -> str:
        fields = Call(self.index, self.service, self.operation, self.kind, self.start, self.duration, self.status)
        return f"<call> {self.index} src={self.parent} {fields.fields_text()}"  # the recursive encoding's fields


# --- trace -> table ---------------------------------------------------------------------------------------------


def trace_rows(trace: Trace) -> list[TableRow]:
    """The rows of a trace in pre-order, siblings in encoded start order. Raises :class:`FlatEncodeError`."""
    top = single_root(trace, FlatEncodeError, "a table needs")
    base = top.start_ns

    def q(t: int) -> int:  # floor to µs after the root's start (// floors negatives too: monotone)
        return (t - base) // NS_PER_US

    def key(s: Span) -> tuple:
        return (q(s.start_ns), q(s.end_ns), s.service, s.name, int(s.kind), int(s.status.code))

    rows: list[TableRow] = []
    stack: list[tuple[Span, int]] = [(top, -1)]
    while stack:
        span, parent = stack.pop()
        i = len(rows)
        qs = q(span.start_ns)
        rows.append(TableRow(i, parent, span.service, span.name, span.kind, qs, q(span.end_ns) - qs, span.status.code))
        kids = sorted(trace.children(span), key=key)  # stable: equal keys keep start order
        stack.extend((k, i) for k in reversed(kids))
    if len(rows) != len(trace.spans):
        raise FlatEncodeError(f"{len(trace.spans) - len(rows)} spans are not reachable from the root (orphans)")
    return rows


def table_depth(rows: Sequence[TableRow]) -> int:
    """Span levels on the longest root-to-leaf path of rows whose parents come before them."""
    level: list[int] = []
    for r in rows:
        level.append(1 if r.parent < 0 else level[r.parent] + 1)
    return max(level, default=0)


def trace_to_table(trace: Trace, *, drop_prob: float = 0.0, rng: random.Random | None = None) -> str:
    """The table of ``trace``: the full header, or with ``drop_prob`` each header field dropped independently
    (drawing from ``rng``, required then). Raises :class:`FlatEncodeError` for what a table cannot hold."""
    rows = trace_rows(trace)
    values = [rows[0].service, rows[0].operation, len(rows), table_depth(rows)]
    if drop_prob > 0:
        if rng is None:
            raise ValueError("drop_prob needs an rng (random.Random) so the result is reproducible")
        values = [None if rng.random() < drop_prob else v for v in values]
    header = TableHeader(*values)  # type: ignore[arg-type]
    return "\n".join([header.text(), *(r.text() for r in rows), "<end>"])


# --- table -> trace ---------------------------------------------------------------------------------------------


def _show(x: Lexeme | None) -> str:
    if x is None:
        return "the end of the text"
    if x.kind == "mark":
        return f"<{x.value}>"
    if x.kind == "key":
        return f"{x.value}="
    return repr(x.value)


class _Reader:
    def __init__(self, xs: list[Lexeme]):
        self.xs, self.i = xs, 0

    def peek(self) -> Lexeme | None:
        return self.xs[self.i] if self.i < len(self.xs) else None

    def take(self) -> Lexeme | None:
        x = self.peek()
        self.i += x is not None
        return x

    def at(self, mark: str) -> bool:
        x = self.peek()
        return x is not None and x.kind == "mark" and x.value == mark

    def value(self, kind: str, what: str, row: int | None):
        x = self.take()
        if x is None or x.kind != kind:
            raise FlatParseError(f"{what} needs {'a string' if kind == 'str' else 'an integer'}, found {_show(x)}", row)
        return x.value

    def field(self, key: str, kind: str, row: int):
        x = self.take()
        if x is None or x.kind != "key" or x.value != key:
            raise FlatParseError(f"missing {key}= (found {_show(x)})", row)
        return self.value(kind, f"{key}=", row)


def _enum(cls, name: str, what: str, row: int):
    try:
        return cls[name]
    except KeyError:
        raise FlatParseError(f"unknown {what} {name!r}", row) from None


def parse_table(text: str) -> tuple[TableHeader, list[TableRow]]:
    """The header and rows of a table. Raises :class:`FlatParseError` naming the row and what is wrong: a missing
    or misplaced field, a row numbered out of order, an unknown parent, no ``<end>``, text after it."""
    try:
        cur = _Reader(lex(text))
    except EncodingError as e:
        m = re.match(r"at character (\d+): ", str(e))
        rows = text[: int(m[1])].count("<call>") if m else 0  # the row the unreadable item is in, if any
        raise FlatParseError(f"cannot read the text ({e})", rows - 1 if rows else None) from None
    x = cur.take()
    if x is None or x.kind != "mark" or x.value != "cond":
        raise FlatParseError(f"a table starts with its header <cond>, found {_show(x)}")
    head: dict[str, object] = {}
    while not cur.at("layer"):
        x = cur.take()
        if x is None:
            raise FlatParseError("the header never ends (no <layer>)")
        if x.kind != "key" or x.value not in HEADER_KEYS:
            raise FlatParseError(f"unexpected {_show(x)} in the header (it holds svc=, op=, calls=, depth=)")
        if x.value in head:
            raise FlatParseError(f"the header has {x.value}= twice")
        head[x.value] = cur.value("str" if x.value in ("svc", "op") else "int", f"header {x.value}=", None)  # type: ignore[index]
    cur.take()  # <layer>
    header = TableHeader(head.get("svc"), head.get("op"), head.get("calls"), head.get("depth"))  # type: ignore[arg-type]
    rows: list[TableRow] = []
    while cur.at("call"):
        cur.take()
        n = len(rows)
        index = cur.value("int", "<call> (the row index)", n)
        if index != n:
            raise FlatParseError(f"is numbered {index}; rows are numbered 0, 1, 2, ... in order", n)
        parent = cur.field("src", "int", n)
        if n == 0 and parent != -1:
            raise FlatParseError(f"row 0 is the root: its parent must be src=-1, found src={parent}", n)
        if n > 0 and parent == -1:
            raise FlatParseError("has parent src=-1 but only row 0 is the root", n)
        if n > 0 and not 0 <= parent < n:
            raise FlatParseError(f"has unknown parent {parent} (a parent is an earlier row, 0..{n - 1})", n)
        service = cur.field("svc", "str", n)
        operation = cur.field("op", "str", n)
        kind = _enum(SpanKind, cur.field("kind", "str", n), "span kind", n)
        start = cur.field("start", "int", n)
        duration = cur.field("dur", "int", n)
        status = _enum(StatusCode, cur.field("status", "str", n), "status", n)
        if n == 0 and start != 0:
            raise FlatParseError(f"the root starts at start={start}; starts count from the root's, so it is 0", n)
        rows.append(TableRow(n, parent, service, operation, kind, start, duration, status))
    x = cur.take()
    if x is None or x.kind != "mark" or x.value != "end":
        if not rows:
            raise FlatParseError(f"the table has no rows (found {_show(x)} after <layer>)")
        if x is None:
            raise FlatParseError(f"the table has no <end> (cut off after {len(rows)} rows?)")
        raise FlatParseError(f"expected the next row's <call> or <end> after row {len(rows) - 1}, found {_show(x)}")
    if not rows:
        raise FlatParseError("the table has no rows")
    if cur.peek() is not None:
        raise FlatParseError(f"text continues after <end>: {_show(cur.peek())}")
    return header, rows


def _span_ids(rng: random.Random, n: int) -> list[str]:
    ids: set[str] = set()
    while len(ids) < n:
        v = rng.getrandbits(64)
        if v:
            ids.add(f"{v:016x}")
    # Ascending in row order, so Trace.children breaks equal (start, end) ties in row order.
    return sorted(ids)


def rows_to_trace(rows: Sequence[TableRow], *, trace_id: str | None = None, id_seed: int = 0,
                  start_ns: int = 0) -> Trace:
    """Spans from parsed rows: fresh lower-case hex ids from ``random.Random(id_seed)`` (the trace id too, unless
    given), the root starting at ``start_ns``."""
    rng = random.Random(id_seed)
    if trace_id is None:
        trace_id = f"{rng.getrandbits(128) or 1:032x}"
    ids = _span_ids(rng, len(rows))
    spans = []
    for r, sid in zip(rows, ids):
        t0 = start_ns + r.start * NS_PER_US
        spans.append(Span(trace_id, sid, ids[r.parent] if r.parent >= 0 else None, r.service, r.operation, t0,
                          t0 + r.duration * NS_PER_US, r.kind, Status(r.status)))  # fmt: skip
    return Trace(spans, trace_id)


def table_to_trace(text: str, *, trace_id: str | None = None, id_seed: int = 0, start_ns: int = 0) -> Trace:
    """The trace a table describes (see :func:`rows_to_trace` for ids and times). Raises :class:`FlatParseError`."""
    return rows_to_trace(parse_table(text)[1], trace_id=trace_id, id_seed=id_seed, start_ns=start_ns)


# --- training examples -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatRender:
    """The ``flat`` stage's job for :func:`otel_tracegen.lm.data.render`: one table per trace, header fields
    dropped with ``drop_prob``; traces a table cannot hold are skipped. ``passes``: new drops each time."""

    seed: int = 0
    drop_prob: float = DEFAULT_DROP_PROB
    passes: int = 1
    stage: str = FLAT_STAGE

    def examples(self, traces: Sequence[Trace], rng: random.Random) -> Iterator[str]:
        for t in traces:
            try:
                yield trace_to_table(t, drop_prob=self.drop_prob, rng=rng)
            except FlatEncodeError:
                continue


# --- the generator -----------------------------------------------------------------------------------------------


def is_flat_model(training: dict) -> bool:
    """Whether a model's ``training.json`` is the flat baseline's."""
    return training.get("encoding") == FLAT_STAGE or FLAT_STAGE in (training.get("stages") or {})


def check_flat_model(path: str | Path, training: dict) -> None:
    """Raise :class:`UserError` unless ``training`` (a model's ``training.json``) is the flat baseline's."""
    if not is_flat_model(training):
        stages = ", ".join(sorted(training.get("stages") or {})) or "none recorded"
        raise UserError(f"{path}: not a flat baseline model (training.json stages: {stages}); train one with "
                        f"`otel-tracegen train --stage flat --corpus DIR --out DIR`")


class FlatTableGenerator:
    """Whole traces as flat tables from a model trained with ``--stage flat``: free sampling, one pass per trace.

    ``temperature``: of the softmax (0 = greedy). ``batch_size``: tables sampled together. ``max_new_tokens``:
    the global cap on a table's tokens; each request's bound is also ``ROW_TOKENS`` per requested row plus slack
    (when ``calls`` is given) and the room the model's context leaves after the prompt.
    """

    name = "flat"
    honours = frozenset({"entry", "calls", "depth"})

    def __init__(self, loaded, *, temperature: float = 1.0, batch_size: int = 64, max_new_tokens: int = 4096):
        if getattr(loaded, "backend", None) != "runtime":
            raise ValueError("FlatTableGenerator samples on the runtime: load the model with backend='runtime'")
        check_flat_model(loaded.path, loaded.training)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.temperature, self.batch_size, self.max_new_tokens = temperature, batch_size, max_new_tokens
        self.context = int(getattr(self.model.config, "max_position_embeddings", 1024))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | None = None, dtype: str | None = None,
                        **kw) -> FlatTableGenerator:
        """Load a flat model directory (refused by name when it is not one) on the runtime."""
        from ..lm.model import load_model, read_training_json

        if not Path(path).is_dir():
            raise UserError(f"no model directory at {path}")
        check_flat_model(path, read_training_json(path))  # before loading the weights
        return cls(load_model(path, device, backend="runtime", dtype=dtype), **kw)

    @staticmethod
    def header(request) -> TableHeader:
        """The prompt's conditions for a request: the fields it gives, none of the others."""
        return TableHeader(request.service, request.operation, request.calls, request.depth)

    def prompt_text(self, request) -> str:
        return self.header(request).text()

    def token_bound(self, request, prompt_len: int) -> int:
        """New tokens a request's table may take: the global cap, the context's room, and for ``calls`` rows,
        ``ROW_TOKENS`` for each plus a quarter more rows and two (a table that overshoots still comes back)."""
        bound = min(self.max_new_tokens, self.context - prompt_len)
        if request.calls is not None:
            bound = min(bound, ROW_TOKENS * (request.calls + request.calls // 4 + 2) + 1)
        return bound

    def _unknown(self, request) -> str | None:
        tok = self.tokenizer
        for what, value in (("service", request.service), ("operation", request.operation)):
            if value is not None and tok.str_id(value) == tok.unk_id:
                return f"entry {what} {value!r} is not in the model's vocabulary"
        return None

    def generate(self, requests: Sequence, *, seed: int = 0, progress: Progress | None = None) -> list[Generated]:
        """One :class:`Generated` per request, in order: the parsed table, or ``None`` and why (an entry the
        model never saw, ``unparseable: ...``). Same requests and seed, same output."""
        import torch

        tok, model = self.tokenizer, self.model
        if hasattr(model, "set_adapter"):
            model.set_adapter(None)
        end_id = tok.mark_id("end")
        out: list[Generated | None] = [None] * len(requests)
        todo: list[tuple[int, list[int], int, bool]] = []  # (request, prompt ids, token bound, bound by the context)
        prompts: dict[int, str] = {}
        for i, r in enumerate(requests):
            if problem := self._unknown(r):
                out[i] = Generated(None, problem)
                continue
            try:
                prompts[i] = self.prompt_text(r)
                ids = [tok.bos_id, *tok.encode(prompts[i]).ids]
                bound = self.token_bound(r, len(ids))
            except (ValueError, TypeError) as e:  # a request no header can state (never raised: reported)
                out[i] = Generated(None, f"cannot prompt for this request: {e}")
                continue
            if bound <= 0:
                out[i] = Generated(None, f"the prompt ({len(ids)} tokens) fills the model's context ({self.context})")
                continue
            todo.append((i, ids, bound, bound == self.context - len(ids)))
        done = len(requests) - len(todo)
        if progress is not None and done:
            progress(done)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        for b in range(0, len(todo), self.batch_size):
            batch = todo[b : b + self.batch_size]
            rows = model.sample([ids for _, ids, _, _ in batch], max_new_tokens=max(n for _, _, n, _ in batch),
                                eos_id=end_id, pad_id=tok.pad_id, temperature=self.temperature,
                                generator=generator)  # fmt: skip
            for (i, _, bound, by_context), row in zip(batch, rows):
                out[i] = self._parse(prompts[i], list(row)[:bound], bound, by_context, seed * 1_000_003 + i)
            if progress is not None:
                progress(len(batch))
        return out  # type: ignore[return-value]

    def _parse(self, prompt: str, row: list[int], bound: int, by_context: bool, id_seed: int) -> Generated:
        """The header of the prompt and the rows the model wrote, as a trace or a problem."""
        tok = self.tokenizer
        end_id = tok.mark_id("end")
        if end_id not in row:
            where = f" (what the model's context of {self.context} leaves after the prompt)" if by_context else ""
            return Generated(None, f"unparseable: no <end> within {bound} new tokens{where}")
        # Specials are written out (a stray <eos> is the model's mistake, not something to skip silently).
        text = prompt + " " + tok.decode(row[: row.index(end_id) + 1], skip_special_tokens=False)
        try:
            return Generated(table_to_trace(text, id_seed=id_seed))
        except FlatParseError as e:
            return Generated(None, f"unparseable: {e}")


__all__ = [
    "FLAT_STAGE",
    "FlatEncodeError",
    "FlatParseError",
    "FlatRender",
    "FlatTableGenerator",
    "TableHeader",
    "TableRow",
    "check_flat_model",
    "is_flat_model",
    "parse_table",
    "rows_to_trace",
    "table_to_trace",
    "trace_to_table",
]
