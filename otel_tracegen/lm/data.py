"""Training examples for the three stages, as text, and their token tensors.

- **pretrain** (:func:`pretrain_texts`): one text per step, the paper's p(c^{k+1}, t^k | c^k); condition items
  shuffled and each dropped with ``drop_prob``, except the parent's service (``svc=``; the root step's
  ``<client>`` is never dropped).
- **instruct** (:func:`instruct_examples`): (prompt, answer) per step that carries an instruction, plus, with
  ``plain_prob``, the plain steps of some traces that carry none. The prompt is
  the full conditions through ``<layer>``; the answer is everything after it (calls, ``<book>`` bookkeeping,
  ``<sub>`` conditions, ``<end>``), and only the answer is trained on. Instructions come from
  :func:`~otel_tracegen.encoding.derive_instructions` with thresholds from :func:`corpus_stats_for_instructions`.
- **infill** (:func:`infill_examples`):

  * a masked field of one call: the step's text (conditions, layer, bookkeeping, subs; no ``<end>``) with the
    call's ``key=value`` item for ``svc``, ``op``, ``kind``, ``dur`` or ``status`` replaced by ``<mask>``, then
    ``<infill>``; the answer is that item and ``<end>``::

        ... <layer> <call> 0 svc=a <mask> kind=SERVER start=3 dur=40 status=UNSET ... <infill>   ->   op=GetCart <end>

  * a missing connecting span: :func:`~otel_tracegen.encoding.encode_span_infill` (the parent's layer with the
    span masked, its orphaned children after ``<kids>``; the answer is its fields and ``<end>``).

A whole split is rendered by :func:`render` (one :class:`StageRender` job, chunks of traces in forked worker
processes, each chunk with its own seeded rng, so the result never depends on the number of workers) and tokenized
in the workers (:class:`TokenizeText`, :class:`TokenizePair`). :class:`Split` holds the rows: packed blocks for
pre-training, ragged (prompt, answer) rows padded per batch for instruct and infill.

Everything above the torch section is pure Python. Traces the encoding cannot represent (several roots,
duplicate ids) are skipped; :func:`encodable` says how many.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .. import encoding as enc
from ..trace import SpanKind, Trace

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .tokenizer import TraceTokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
HIGH_LATENCY_QUANTILE = 0.9
UNCOMMON_FRACTION = 0.1
INFILL_FIELDS: tuple[str, ...] = ("svc", "op", "kind", "dur", "status")

Entry = tuple[str, str]
"""A trace's entry: the root span's (service, operation)."""
Edge = tuple[str, str, SpanKind]
"""A call: (parent service, child service, child kind)."""


def _steps(trace: Trace, **kw) -> list[enc.Step] | None:
    try:
        return enc.encode_trace(trace, **kw)
    except enc.EncodingError:
        return None


def encodable(traces: Iterable[Trace]) -> tuple[list[Trace], int]:
    """The traces the encoding can represent, and how many others were left out."""
    ok, bad = [], 0
    for t in traces:
        if _steps(t) is None:
            bad += 1
        else:
            ok.append(t)
    return ok, bad


def step_texts(traces: Iterable[Trace]) -> Iterator[str]:
    """Every step of every encodable trace, default options (what to build a tokenizer from)."""
    for t in traces:
        for s in _steps(t) or ():
            yield s.text()


# --- pretrain -------------------------------------------------------------------------------------------------


def pretrain_texts(traces: Iterable[Trace], rng: random.Random, drop_prob: float = 0.9) -> Iterator[str]:
    """One text per step of each trace, condition items shuffled and dropped with ``drop_prob`` (``svc`` kept)."""
    options = enc.ConditionOptions(shuffle=True, drop_prob=drop_prob, keep=frozenset({"svc"}))
    for t in traces:
        for s in _steps(t, options=options, rng=rng) or ():
            yield s.text()


# --- instruct -------------------------------------------------------------------------------------------------


def interpolated_quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def trace_edges(trace: Trace) -> set[Edge]:
    """The (parent service, child service, child kind) calls of a trace."""
    by_id = trace.by_id
    return {(by_id[s.parent_id].service, s.service, s.kind) for s in trace.spans if s.parent_id in by_id}


@dataclass
class InstructionStats:
    """Per entry (root service, operation): the latency p90 in µs, the uncommon calls, the trace count."""

    p90_us: dict[Entry, float] = field(default_factory=dict)
    uncommon: dict[Entry, frozenset[Edge]] = field(default_factory=dict)
    traces: dict[Entry, int] = field(default_factory=dict)

    def instructions(self, trace: Trace, rng: random.Random | None = None) -> enc.Instructions:
        """What ``trace`` satisfies: high latency above its entry's p90, an include for one uncommon call."""
        root = trace.root
        if root is None:
            return enc.Instructions()
        entry = (root.service, root.name)
        return enc.derive_instructions(
            trace,
            self.p90_us.get(entry),
            self.uncommon.get(entry, frozenset()),
            rng=rng,
        )


def corpus_stats_for_instructions(
    traces: Iterable[Trace],
    *,
    quantile: float = HIGH_LATENCY_QUANTILE,
    uncommon_fraction: float = UNCOMMON_FRACTION,
) -> InstructionStats:
    """Latency p90s and uncommon calls (seen in under ``uncommon_fraction`` of the entry's traces), computed
    once over ``traces`` (encodable ones only)."""
    latencies: dict[Entry, list[int]] = defaultdict(list)
    edge_counts: dict[Entry, Counter[Edge]] = defaultdict(Counter)
    for t in traces:
        root = t.root
        if root is None:
            continue
        try:
            lat = enc.trace_latency_us(t)
        except enc.EncodingError:
            continue
        entry = (root.service, root.name)
        latencies[entry].append(lat)
        edge_counts[entry].update(trace_edges(t))
    stats = InstructionStats()
    for entry, lats in latencies.items():
        n = len(lats)
        stats.traces[entry] = n
        stats.p90_us[entry] = interpolated_quantile(sorted(lats), quantile)
        stats.uncommon[entry] = frozenset(e for e, c in edge_counts[entry].items() if c / n < uncommon_fraction)
    return stats


def _variants(ins: enc.Instructions) -> list[enc.Instructions]:
    """Each instruction alone, and combined when there are both."""
    out = []
    if ins.high_latency:
        out.append(enc.Instructions(high_latency=True))
    if ins.includes:
        out.append(enc.Instructions(includes=ins.includes))
    if ins.high_latency and ins.includes:
        out.append(ins)
    return out


def _instructed(c: enc.Conditions) -> bool:
    return c.high_latency or bool(c.includes)


def instruct_examples(
    traces: Iterable[Trace],
    rng: random.Random,
    *,
    stats: InstructionStats | None = None,
    plain_prob: float = 0.0,
) -> Iterator[tuple[str, str]]:
    """(prompt, answer) for each step carrying an instruction, for every instruction variant a trace satisfies
    (high latency alone, include alone, both). ``stats`` defaults to :func:`corpus_stats_for_instructions` over
    ``traces``. With ``plain_prob``, a trace satisfying no instruction gives its plain steps with that
    probability (to keep unconditioned generation in the mix)."""
    traces = list(traces)
    if stats is None:
        stats = corpus_stats_for_instructions(traces)
    for t in traces:
        try:
            ins = stats.instructions(t, rng)
        except enc.EncodingError:
            continue
        variants = _variants(ins)
        if not variants:
            if plain_prob > 0 and rng.random() < plain_prob:
                for s in _steps(t) or ():
                    yield s.prompt_text(), s.completion_text()
            continue
        for v in variants:
            for s in _steps(t, instructions=v) or ():
                if _instructed(s.conditions):
                    yield s.prompt_text(), s.completion_text()


# --- infill ---------------------------------------------------------------------------------------------------


def call_field_items(call: enc.Call) -> list[tuple[str, str]]:
    """A call's (key, ``key=value``) items in the order the encoding writes them."""
    return [
        ("svc", f"svc={enc.render_str(call.service)}"),
        ("op", f"op={enc.render_str(call.operation)}"),
        ("kind", f"kind={call.kind.name}"),
        ("start", f"start={call.start}"),
        ("dur", f"dur={call.duration}"),
        ("status", f"status={call.status.name}"),
    ]


def field_infill_example(step: enc.Step, index: int, key: str) -> tuple[str, str]:
    """Call ``index`` of ``step`` with its ``key`` item written ``<mask>``: (prompt, ``key=value <end>``)."""
    if key not in dict(call_field_items(step.calls[0])):
        raise ValueError(f"cannot mask {key!r}; choose from svc, op, kind, start, dur, status")
    parts = [step.prompt_text()]
    answer = ""
    for c in step.calls:
        if c.index == index:
            items = []
            for k, item in call_field_items(c):
                if k == key:
                    items.append("<mask>")
                    answer = item
                else:
                    items.append(item)
            parts.append(f"<call> {c.index} " + " ".join(items))
        else:
            parts.append(c.text())
    parts += [step.book.text()] + [s.text() for s in step.subs] + ["<infill>"]
    return " ".join(parts), answer + " <end>"


def infill_examples(
    traces: Iterable[Trace],
    rng: random.Random,
    *,
    fields: Sequence[str] = INFILL_FIELDS,
    field_per_trace: int = 1,
    span_per_trace: int = 1,
    relabel_prob: float = 0.0,
) -> Iterator[tuple[str, str]]:
    """Per encodable trace: ``field_per_trace`` masked-field examples (a random step, call and field) and
    ``span_per_trace`` missing-span examples (a random span, preferring connecting ones: a parent and children).

    ``relabel_prob``: the share of missing-span examples drawn from the trace with its services shuffled among
    themselves (:func:`shuffle_services`). There the lost span's service can only be read from where it sits
    (its siblings', its parent's, its children's), not recalled from the names around it. A lookup-like
    adapter recalls "who was seen calling this child"; for a call no training trace made, that is another
    service, while the span's place says whose it is."""
    for t in traces:
        steps = _steps(t)
        if steps is None:
            continue
        for _ in range(field_per_trace):
            step = rng.choice(steps)
            call = rng.choice(step.calls)
            yield field_infill_example(step, call.index, rng.choice(list(fields)))  # type: ignore[arg-type]
        if span_per_trace:
            connecting = [s for s in t.spans if s.parent_id is not None and t.children(s)]
            pool = connecting or [s for s in t.spans if s.parent_id is not None] or list(t.spans)
            for _ in range(span_per_trace):
                lost = rng.choice(pool)
                if relabel_prob and rng.random() < relabel_prob:
                    ex = enc.encode_span_infill(shuffle_services(t, rng), lost.span_id)
                else:
                    ex = enc.encode_span_infill(t, lost)
                yield ex.prompt, ex.target


def shuffle_services(trace: Trace, rng: random.Random) -> Trace:
    """``trace`` with its services permuted among themselves (each span's ``service.name`` too): the same
    shape, timing and operations, the services' names no longer telling which they are."""
    names = sorted({s.service for s in trace.spans})
    moved = names[:]
    rng.shuffle(moved)
    to = dict(zip(names, moved))
    return Trace([replace(s, service=to[s.service], resource=replace(
        s.resource, attributes={**s.resource.attributes, "service.name": to[s.service]})) for s in trace.spans])


# --- a split's examples, rendered in parallel -------------------------------------------------------------------

RENDER_CHUNK = 64
"""Traces per rendering task. Each chunk draws from its own rng seeded by (seed, pass, chunk), so what is rendered
never depends on how many processes render it."""


@dataclass(frozen=True)
class StageRender:
    """What one stage makes of a split: the texts (pretrain) or (prompt, answer) pairs (instruct, infill).

    ``passes`` renders the split that many times (pre-training: new shuffles and drops each time). ``stats`` are
    the instruct thresholds; pass the train split's to both splits so validation asks the same questions.
    """

    stage: str
    seed: int = 0
    drop_prob: float = 0.9
    passes: int = 1
    stats: InstructionStats | None = None
    plain_prob: float = 0.0  # instruct: share of uninstructed traces whose plain steps join the mix
    relabel_prob: float = 0.0  # infill: share of lost-span examples with the services shuffled (infill_examples)

    def examples(self, traces: Sequence[Trace], rng: random.Random) -> Iterator[Any]:
        if self.stage == "pretrain":
            return pretrain_texts(traces, rng, drop_prob=self.drop_prob)
        if self.stage == "instruct":
            return instruct_examples(traces, rng, stats=self.stats or InstructionStats(), plain_prob=self.plain_prob)
        if self.stage == "infill":
            return infill_examples(traces, rng, relabel_prob=self.relabel_prob)
        if self.stage == "steps":  # the plain steps, for building a vocabulary
            return step_texts(traces)
        raise ValueError(f"unknown stage {self.stage!r}; expected pretrain, instruct, infill or steps")


# The job of the forked workers: set before the pool starts, inherited by fork (so the traces are never pickled).
_JOB: tuple[StageRender, Sequence[Trace], Callable[[Any], Any] | None] | None = None


def _render_chunk(task: tuple[int, int]) -> Any:
    job, traces, finish_chunk = _JOB  # type: ignore[misc]
    pass_, start = task
    rng = random.Random(f"{job.seed}:{pass_}:{start}")
    out = list(job.examples(traces[start : start + RENDER_CHUNK], rng))
    return finish_chunk(out) if finish_chunk else out


def default_workers() -> int:
    """Processes for rendering: the CPUs this process may use, at most 32."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(32, n))


def render_chunks(
    job: StageRender,
    traces: Sequence[Trace],
    finish_chunk: Callable[[list], Any] | None = None,
    *,
    workers: int = 0,
) -> list:
    """The examples ``job`` makes of ``traces``, one list per chunk of :data:`RENDER_CHUNK` traces in a fixed
    order, each passed through ``finish_chunk`` in the worker that rendered it (tokenizing or counting there keeps
    the parent free and the results small). ``workers`` > 1 forks that many processes (Linux; elsewhere, and for
    a single chunk, it renders in this process). The result is the same for any number of workers."""
    global _JOB
    tasks = [(p, s) for p in range(job.passes) for s in range(0, len(traces), RENDER_CHUNK)]
    workers = workers or default_workers()
    _JOB = (job, traces, finish_chunk)
    try:
        if workers > 1 and len(tasks) > 1 and sys.platform == "linux":
            import multiprocessing as mp

            with mp.get_context("fork").Pool(min(workers, len(tasks))) as pool:
                return pool.map(_render_chunk, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
        return [_render_chunk(t) for t in tasks]
    finally:
        _JOB = None


def render(job: StageRender, traces: Sequence[Trace], *, finish: Callable[[Any], Any] | None = None,
           workers: int = 0) -> list:
    """Every example ``job`` makes of ``traces``, in a fixed order, each passed through ``finish`` in the worker
    (see :func:`render_chunks`)."""
    chunks = render_chunks(job, traces, (lambda xs: [finish(x) for x in xs]) if finish else None, workers=workers)
    return [x for chunk in chunks for x in chunk]


def _id_array(ids: list[int]) -> array:
    return array("i", ids)  # 4 bytes a token: pickles compactly out of the workers and views as a tensor

class TokenizeText:
    """``finish`` for :func:`render`: a pre-training text as ``<bos> ids <eos>`` (a compact array)."""

    def __init__(self, tokenizer: TraceTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> array:
        t = self.tokenizer
        return _id_array([t.bos_id, *t.encode(text).ids, t.eos_id])


class TokenizePair:
    """``finish`` for :func:`render`: a (prompt, answer) pair as (``<bos> prompt`` ids, ``answer <eos>`` ids)."""

    def __init__(self, tokenizer: TraceTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, pair: tuple[str, str]) -> tuple[array, array]:
        t = self.tokenizer
        return _id_array([t.bos_id, *t.encode(pair[0]).ids]), _id_array([*t.encode(pair[1]).ids, t.eos_id])


# --- tensors (torch imported lazily) --------------------------------------------------------------------------


def pack_blocks(streams: Iterable[Sequence[int]], block_size: int) -> torch.Tensor:
    """Token streams (each ``<bos> ... <eos>``) concatenated and cut into ``[n_blocks, block_size]`` (a
    LongTensor); the last partial block is dropped. Raises ValueError when there is not one whole block."""
    import torch

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    flat = array("i")
    for ids in streams:
        flat.extend(ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids))
    n = len(flat) // block_size
    if n == 0:
        raise ValueError(f"the texts hold {len(flat)} tokens, fewer than one block of {block_size}")
    return torch.frombuffer(flat, dtype=torch.int32)[: n * block_size].long().view(n, block_size)


def pack_pretrain(tokenizer: TraceTokenizer, texts: Iterable[str], block_size: int) -> torch.Tensor:
    """``<bos> text <eos>`` for each text, concatenated and cut into ``[n_blocks, block_size]`` (a LongTensor);
    the last partial block is dropped. Raises ValueError when there is not one whole block."""
    return pack_blocks(map(TokenizeText(tokenizer), texts), block_size)


@dataclass
class Split:
    """The training rows of one split.

    Pre-training: ``blocks``, equal rows of packed steps, loss on every token. Instruct and infill: ragged
    ``sequences`` (``<bos> prompt answer <eos>``) and each one's prompt length; a batch is right-padded to its
    longest row and the loss is taken on the answers only. ``stats``: examples kept, truncated, dropped.
    """

    blocks: torch.Tensor | None = None
    sequences: list[Sequence[int]] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    pad_id: int = 0
    stats: dict = field(default_factory=dict)

    @classmethod
    def supervised(cls, pairs: Iterable[tuple[Sequence[int], Sequence[int]]], max_len: int, pad_id: int) -> Split:
        """Rows from (``<bos> prompt``, ``answer <eos>``) id pairs. A row longer than ``max_len`` loses the left of
        its prompt after ``<bos>`` (the answer is kept whole); one whose answer alone does not fit is left out."""
        seqs, plens = [], []
        truncated = dropped = 0
        for p, a in pairs:
            room = max_len - len(a) - 1  # the prompt keeps its <bos>
            if room < 0:
                dropped += 1
                continue
            if len(p) - 1 > room:
                p = p[:1] + p[len(p) - room :] if room else p[:1]
                truncated += 1
            seq = array("i", p)
            seq.extend(a if isinstance(a, array) and a.typecode == "i" else array("i", a))
            seqs.append(seq)
            plens.append(len(p))
        if truncated or dropped:
            log.info("supervised rows: %d examples truncated, %d dropped (max_len %d)", truncated, dropped, max_len)
        return cls(sequences=seqs, prompt_lens=plens, pad_id=pad_id,
                   stats={"examples": len(seqs), "truncated": truncated, "dropped": dropped})

    def __len__(self) -> int:
        return int(self.blocks.shape[0]) if self.blocks is not None else len(self.sequences)

    def shard(self, rank: int, world: int) -> Split:
        """Every ``world``-th row from ``rank`` (as DistributedSampler)."""
        if self.blocks is not None:
            return Split(blocks=self.blocks[rank::world], stats=self.stats)
        return Split(sequences=self.sequences[rank::world], prompt_lens=self.prompt_lens[rank::world],
                     pad_id=self.pad_id, stats=self.stats)

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, labels, attention_mask) of rows ``idx`` (a LongTensor or a list of ints)."""
        import torch

        if self.blocks is not None:
            x = self.blocks[idx]
            return x, x.clone(), torch.ones_like(x)
        picked = [int(i) for i in idx]
        width = max((len(self.sequences[i]) for i in picked), default=1)
        x = torch.full((len(picked), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(picked), width), IGNORE_INDEX, dtype=torch.long)
        m = torch.zeros((len(picked), width), dtype=torch.long)
        for r, i in enumerate(picked):
            seq, plen = self.sequences[i], self.prompt_lens[i]
            row = torch.tensor(seq, dtype=torch.long)
            x[r, : len(seq)] = row
            y[r, plen : len(seq)] = row[plen:]
            m[r, : len(seq)] = 1
        return x, y, m


class LengthGroupedBatches:
    """Random batches of similar-length rows (as transformers' ``group_by_length``), for ragged supervised rows.

    Each pool draws ``batch_size * pools`` rows uniformly (with replacement, as the plain sampler does), sorts them
    by length, cuts them into batches and hands those out in random order. Every row is as likely as before, but
    a batch is padded to its own longest row instead of the longest of a random mix: on the instruct data, whose
    answers range from a few tokens to hundreds, this cut the padded tokens per step several-fold.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator, pools: int = 32) -> None:
        self.lengths, self.batch_size, self.gen, self.pools = lengths, batch_size, generator, pools
        self._queue: list[list[int]] = []

    def next(self) -> list[int]:
        import torch

        if not self._queue:
            n = len(self.lengths)
            drawn = torch.randint(n, (min(self.batch_size, n) * self.pools,), generator=self.gen).tolist()
            drawn.sort(key=lambda i: self.lengths[i])
            batches = [drawn[b : b + self.batch_size] for b in range(0, len(drawn), self.batch_size)]
            order = torch.randperm(len(batches), generator=self.gen).tolist()
            self._queue = [batches[i] for i in order]
        return self._queue.pop()


def pad_supervised(
    tokenizer: TraceTokenizer,
    pairs: Iterable[tuple[str, str]],
    max_len: int,
    *,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``<bos> prompt answer <eos>``, right-padded to the longest (at most ``max_len``).

    Returns (input_ids, labels, attention_mask); labels are -100 on ``<bos>``, the prompt and the padding. An
    example longer than ``max_len`` loses the left of its prompt (the answer is kept whole); one whose answer
    alone does not fit is left out. ``stats``, when given, receives ``examples``, ``truncated`` and ``dropped``.
    """
    split = Split.supervised(map(TokenizePair(tokenizer), pairs), max_len, tokenizer.pad_id)
    if stats is not None:
        stats.update(split.stats)
    if not len(split):
        import torch

        empty = torch.zeros((0, 0), dtype=torch.long)
        return empty, empty.clone(), empty.clone()
    return split.rows(list(range(len(split))))
