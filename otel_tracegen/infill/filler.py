"""The model's side of repair: write a lost span, or a missing service or operation name, with the infill adapter.

The infill adapter was tuned on two forms (``lm/data.py``): a masked field of one call in its step (``svc=`` or
``op=`` written ``<mask>``), and a lost connecting span (its parent's layer with the span written ``<mask>``, its
orphaned children after ``<kids>``), each answered after ``<infill>``. Here the answers are decoded greedily under
a grammar, as generation is (``sampling/grammar.py``): a known service that the parent was seen calling and that
was seen calling every orphan, an operation that service has, a kind and status seen for it, and a start and
duration inside the windows the caller gives (the orphans' window, the grandparent's). So the answer always
parses and names things that exist.

Each answer carries a **confidence**: the probability of the service it chose times that of the operation (see
:meth:`ModelFiller.fill_spans` for which probabilities). Repair falls back to a plain rule below a threshold.
All queries of a batch decode together in one packed pass per drawn token on the runtime's KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

from ..encoding import Call
from ..report import UserError
from ..sampling.catalog import Catalog
from ..sampling.engine import _Row as _StepRow
from ..sampling.grammar import GrammarVocab, IntSet, Spec, _read_int
from ..trace import SpanKind, StatusCode

ADAPTER = "infill"


class Choice(tuple):
    """A spec whose pick is scored into the answer's confidence (the service, the operation)."""


@dataclass(frozen=True)
class SpanQuery:
    """A lost span to write. ``prompt``: :func:`~otel_tracegen.encoding.span_infill_prompt`'s text. ``services``:
    the services it may have (empty: any known one). ``start``/``end``: inclusive µs ranges, offsets in the
    prompt's frame (a lost root starts at or before its earliest child, so its start is <= 0)."""

    prompt: str
    services: tuple[str, ...]
    start: tuple[int, int]
    end: tuple[int, int]
    root: bool = False
    pairs: tuple[tuple[str, str], ...] = ()  # (service, operation) it may be, when known by operation; else any op
    analogy: bool = False  # ``pairs`` are analogues (RepairSettings.analogy), not what the data saw on this path


@dataclass(frozen=True)
class FieldQuery:
    """A missing service (``key`` ``svc``) or operation (``op``) of one call: the masked-field prompt, and what
    the grammar allows: ``services`` for ``svc``, the operations of ``service`` for ``op``."""

    prompt: str
    key: str
    services: tuple[str, ...] = ()
    service: str | None = None
    values: tuple[str, ...] = ()  # what the data has seen in this place (by operation); empty when unseen


@dataclass
class Answer:
    """What the model wrote: a call (span queries) or a value (field queries), and its confidence."""

    call: Call | None = None
    value: str | None = None
    confidence: float = 0.0
    probabilities: list[float] = field(default_factory=list)


class _Row(_StepRow):
    """The generation engine's row (a grammar coroutine fed token by token), with the probabilities of the scored
    picks; the answer is ``step`` when the program ends."""

    __slots__ = ("probs", "masked")

    def __init__(self, program: Generator[Spec, int, object]) -> None:
        super().__init__(program)
        self.probs: list[float] = []  # per Choice: the model's probability of its pick before the mask
        self.masked: list[float] = []  # ... and among what the grammar allowed

    def forced(self) -> list[int]:
        """Fixed text that comes next; a Choice of one is still the model's (its probability is scored)."""
        run = []
        while self.step is None and len(self.spec) == 1 and not isinstance(self.spec, Choice):
            run.append(self.spec[0])
            self.feed(self.spec[0])
        return run


def _read_signed(v: GrammarVocab, lo: int, hi: int, terminator: int) -> Generator[Spec, int, int]:
    """An integer in [lo, hi] (lo may be negative), written with a leading ``-`` when negative."""
    spec: list[int] = []
    if hi >= 0:
        spec += [t for d, t in enumerate(v.digit) if IntSet.range(max(lo, 0), hi).allows_prefix(str(d))]
    if lo < 0:
        spec.append(v.minus)
    token = yield tuple(spec)
    if token == v.minus:
        return -(yield from _read_int(v, IntSet.range(max(1, -hi), -lo), terminator))
    digits = str(v.digit_value[token])
    allowed = IntSet.range(max(lo, 0), hi)
    while True:
        nxt = [v.digit[d] for d in range(10) if allowed.allows_prefix(digits + str(d))]
        if int(digits) in allowed:
            nxt.append(terminator)
        token = yield tuple(nxt)
        if token == terminator:
            return int(digits)
        digits += str(v.digit_value[token])


def span_program(v: GrammarVocab, q: SpanQuery) -> Generator[Spec, int, Call]:
    """The grammar of a lost span's answer: ``svc=S op=O kind=K start=N dur=N status=T <end>``."""
    yield (v.key["svc"],)
    pairs = [(s, o) for s, o in q.pairs if o in v.catalog.operations.get(s, {})]
    names = sorted({s for s, _ in pairs}) or [s for s in q.services if s in v.catalog.operations]
    service = v.string_value((yield Choice(sorted(v.str_id(s) for s in names or v.catalog.services))))
    yield (v.key["op"],)
    ops = tuple(sorted(v.str_id(o) for s, o in pairs if s == service))
    operation = v.string_value((yield Choice(ops or v.ops(service, entry=q.root) or v.ops(service))))
    yield (v.key["kind"],)
    kinds = v.catalog.kinds(service, operation) or [k.name for k in SpanKind]
    kind = SpanKind[v.string_value((yield tuple(sorted(v.kind_id[k] for k in kinds))))]
    yield (v.key["start"],)
    start = yield from _read_signed(v, q.start[0], q.start[1], v.key["dur"])
    lo, hi = q.end
    lo, hi = max(0, lo - start), max(0, lo - start, hi - start)
    # Any duration up to the bound may be written, then it is raised to cover the children: masking digits at
    # the lower bound would turn a model that means "just past its last child" (402,923 under a bound of 404,177)
    # into one ten times too long (4,029,238).
    duration = max(lo, (yield from _read_int(v, IntSet.range(0, hi), v.key["status"])))
    st = v.catalog.operations.get(service, {}).get(operation)
    statuses = sorted(st.statuses) if st and st.statuses else [s.name for s in StatusCode]
    status = StatusCode[v.string_value((yield tuple(sorted(v.status_id[s] for s in statuses))))]
    yield (v.mark["end"],)
    return Call(None, service, operation, kind, start, duration, status)


def field_program(v: GrammarVocab, q: FieldQuery) -> Generator[Spec, int, str]:
    """The grammar of a masked field's answer: ``svc=S <end>`` or ``op=O <end>``."""
    yield (v.key[q.key],)
    if q.key == "svc":
        names = [s for s in q.values if s in v.catalog.operations]
        names = names or [s for s in q.services if s in v.catalog.operations] or sorted(v.catalog.services)
        value = v.string_value((yield Choice(sorted(v.str_id(s) for s in names))))
    else:
        ops = tuple(sorted(v.str_id(o) for o in q.values if o in v.catalog.operations.get(q.service or "", {})))
        value = v.string_value((yield Choice(ops or v.ops(q.service or "") or tuple(sorted(
            {v.str_id(o) for ops in v.catalog.operations.values() for o in ops})))))
    yield (v.mark["end"],)
    return value


class ModelFiller:
    """Answers span and field queries with a loaded trace model (``otel_tracegen.load_model()``) and its
    catalog, through the ``infill`` adapter."""

    def __init__(self, lm, catalog: Catalog | None = None, *, batch_size: int = 64) -> None:
        if getattr(lm, "backend", None) != "runtime" or not hasattr(lm.tokenizer, "key_id"):
            raise UserError(f"{lm.path}: repair needs a trace model of our own (with its trace tokenizer); "
                            "a --base-model run cannot infill")
        if ADAPTER not in lm.adapters:
            raise UserError(f"{lm.path} has no {ADAPTER!r} adapter (it has: {', '.join(lm.adapters) or 'none'}); "
                            "train one with `otel-tracegen train --stage infill`")
        self.lm = lm
        self.vocab = GrammarVocab(lm.tokenizer, catalog if catalog is not None else Catalog.load(lm.path))
        self.batch_size = batch_size

    @property
    def catalog(self) -> Catalog:
        return self.vocab.catalog

    def fill_spans(self, queries: Sequence[SpanQuery]) -> list[Answer]:
        rows = self._run([q.prompt for q in queries], [span_program(self.vocab, q) for q in queries])
        # Where the data has seen this path (``pairs``), the lost span is one of the pairs it saw and the model
        # only chooses among them: its confidence is renormalized over them (one pair: certain). On an unseen
        # path the model is on its own: its confidence is what it gave its picks before the grammar stepped in,
        # low when the grammar had to overrule it.
        return [Answer(call=row.step, confidence=math.prod(row.masked if q.pairs else row.probs),  # type: ignore[arg-type]
                       probabilities=row.probs) for q, row in zip(queries, rows)]

    def fill_fields(self, queries: Sequence[FieldQuery]) -> list[Answer]:
        rows = self._run([q.prompt for q in queries], [field_program(self.vocab, q) for q in queries])
        return [Answer(value=row.step, confidence=math.prod(row.masked if q.values else row.probs),  # type: ignore[arg-type]
                       probabilities=row.probs) for q, row in zip(queries, rows)]

    def _run(self, prompts: Sequence[str], programs: list) -> list[_Row]:
        import torch

        rows = [_Row(p) for p in programs]
        model, tok = self.lm.model, self.lm.tokenizer
        model.set_adapter(ADAPTER)
        for b in range(0, len(rows), self.batch_size):
            chunk = rows[b : b + self.batch_size]
            ids = [[tok.bos_id, *self.vocab.encode(p)] + row.forced()
                   for p, row in zip(prompts[b : b + self.batch_size], chunk)]  # fmt: skip
            live = [j for j, row in enumerate(chunk) if row.step is None]
            if not live:
                continue

            def hook(running: list[int], generated: list[list[int]], logits, live=live, chunk=chunk):
                allowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                for j, r in enumerate(running):
                    allowed[j, list(chunk[live[r]].spec)] = True
                masked = logits.masked_fill(~allowed, float("-inf"))
                pick = masked.argmax(dim=-1, keepdim=True)
                raw = torch.softmax(logits.float(), dim=-1).gather(1, pick).squeeze(1).tolist()
                within = torch.softmax(masked.float(), dim=-1).gather(1, pick).squeeze(1).tolist()
                for j, r in enumerate(running):
                    if isinstance(chunk[live[r]].spec, Choice):
                        chunk[live[r]].probs.append(raw[j])
                        chunk[live[r]].masked.append(within[j])
                return masked

            def forced(running: list[int], drawn: list[int], live=live, chunk=chunk) -> list[list[int]]:
                out = []
                for r, token in zip(running, drawn):
                    row = chunk[live[r]]
                    row.feed(token)
                    out.append(row.forced())
                return out

            with torch.no_grad():
                model.sample([ids[j] for j in live], max_new_tokens=96, eos_id=self.vocab.mark["end"],
                             pad_id=tok.pad_id, temperature=0.0, logits_hook=hook, forced=forced)  # fmt: skip
            for row in chunk:
                if row.step is None:
                    raise RuntimeError("an infill answer did not end within 96 tokens")
        return rows
