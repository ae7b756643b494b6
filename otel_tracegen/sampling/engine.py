"""Recursive layer generation with grammar-constrained decoding.

A trace is generated one step at a time, as the model was trained: the client's step writes the root span and
its subtree's size, each span with a subtree then gets a step of its own, prompted only with its conditions
(:func:`encoding.next_conditions`). Pending steps of many traces are decoded together in one batch on the
runtime's KV cache, level by level (so each trace's steps stay in encoding order), and every token is drawn
under the mask of :mod:`.grammar`, so that every trace is valid and has exactly the calls and depth asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..encoding import Conditions, Include, Step, next_conditions
from ..report import UserError
from ..trace import SpanKind
from .catalog import Catalog, MixEntry, nearest
from .grammar import GrammarVocab, StepLimits, step_program

DEFAULT_ATTEMPTS = 2
"""Draws per step at most (``TraceSampler.generate``): measured in docs/generation.md "Trees the data could hold,
steps the model would write" and the model card."""


@dataclass(frozen=True)
class TraceRequest:
    """What one generated trace must be. ``None``: the model decides.

    ``service``/``operation``: the entry (root) span. ``calls``: spans in the trace; ``depth``: span levels;
    ``latency_ms``: the root span's duration. ``high_latency`` and ``includes`` are the instructions (the
    instruct adapter was tuned on them).
    """

    service: str | None = None
    operation: str | None = None
    calls: int | None = None
    depth: int | None = None
    latency_ms: float | None = None
    high_latency: bool = False
    includes: tuple[Include, ...] = ()

    def conditions(self) -> Conditions:
        budget = None if self.latency_ms is None else max(0, round(self.latency_ms * 1000))
        return Conditions(client=True, calls=self.calls, depth=self.depth, budget=budget,
                          start=0 if budget is not None else None, high_latency=self.high_latency,
                          includes=self.includes)  # fmt: skip

    def check(self, catalog: Catalog, limits: StepLimits) -> None:
        """Raise ``UserError`` for what the model cannot meet, naming the nearest known values."""
        if self.operation is not None and self.service is None:
            raise UserError("--operation needs --service (the entry service it belongs to)")
        if self.service is not None:
            catalog.check_service(self.service, "entry service")
            if self.operation is not None:
                catalog.check_operation(self.service, self.operation)
        if self.calls is not None and self.calls < 1:
            raise UserError(f"--calls must be >= 1 (the root span counts), got {self.calls}")
        if self.depth is not None:
            if self.depth < 1:
                raise UserError(f"--depth must be >= 1, got {self.depth}")
            if self.depth > limits.max_depth:
                raise UserError(f"--depth {self.depth} is above anything the model has seen (deepest trace: "
                                f"{limits.max_depth} levels)")
            if self.calls is not None and self.depth > self.calls:
                raise UserError(f"--depth {self.depth} needs at least as many calls, got --calls {self.calls}")
            if self.depth == 1 and self.calls is not None and self.calls > 1:
                raise UserError(f"--depth 1 is the root span alone, so --calls must be 1, got --calls {self.calls} "
                                "(depth counts span levels: a root and its callees are --depth 2)")
        if self.latency_ms is not None and not (self.latency_ms >= 0 and math.isfinite(self.latency_ms)):
            raise UserError(f"--latency-ms must be a finite number >= 0, got {self.latency_ms}")
        if self.includes and self.calls is not None and self.calls < 2:
            raise UserError("--include-call needs --calls >= 2 (a root and its callee)")
        if len(self.includes) > 1:
            # The instruct adapter was tuned on one include per trace, and the grammar does not keep room for
            # several carried down one path (it could run out of calls for them).
            raise UserError(f"one --include-call per trace, got {len(self.includes)}: "
                            + ", ".join(f"{i.src} -> {i.dst}" for i in self.includes))
        for inc in self.includes:
            for name in (inc.src, inc.dst):
                catalog.check_service(name)
            if not catalog.calls(inc.src, inc.dst):
                callees = list(catalog.edges.get(inc.src, {}))
                raise UserError(f"{inc.src} was never seen calling {inc.dst}; "
                                + (nearest(inc.dst, callees) if callees else f"{inc.src} calls nothing"))
            hops = catalog.hops_to(inc.src)
            entries = [self.service] if self.service else list(catalog.entries)
            reach = [hops[e] for e in entries if e in hops]
            if not reach:
                raise UserError(f"no call path from {' or '.join(entries[:5])} reaches {inc.src}; entry services "
                                f"that reach it: {', '.join(e for e in catalog.entries if e in hops) or 'none'}")
            if self.depth is not None and min(reach) + 2 > self.depth:
                raise UserError(f"{inc.src} -> {inc.dst} needs --depth >= {min(reach) + 2} from "
                                f"{self.service or 'any entry service'}, got {self.depth}")
            if self.calls is not None and min(reach) + 2 > self.calls:
                raise UserError(f"{inc.src} -> {inc.dst} needs --calls >= {min(reach) + 2}, got {self.calls}")


class _Row:
    """One step being decoded: its grammar coroutine and the spec for the next token."""

    __slots__ = ("program", "spec", "fed", "step")

    def __init__(self, program) -> None:
        self.program = program
        self.spec = next(program)
        self.fed = 0
        self.step: Step | None = None

    def feed(self, token: int) -> None:
        if self.step is not None:
            raise RuntimeError("a token after the step's <end>")
        if token not in self.spec:
            raise RuntimeError(f"token {token} is outside the grammar's mask {self.spec[:10]}")
        self.fed += 1
        try:
            self.spec = self.program.send(token)
        except StopIteration as done:
            self.step = done.value

    def forced(self) -> list[int]:
        """Feed the fixed text that comes next (positions where the grammar allows one token); return it."""
        run = []
        while self.step is None and len(self.spec) == 1:
            run.append(self.spec[0])
            self.feed(self.spec[0])
        return run


class TraceSampler:
    """Generates steps of traces from a loaded model (``otel_tracegen.load_model()``) and its catalog.

    ``adapter``: ``"auto"`` takes ``instruct`` when the model has it (tuned on full conditions and the
    instructions), else the pre-trained weights; ``None`` forces the pre-trained weights.
    ``entries``: for requests that name no entry service, ``"data"`` draws one from the training mix of entry
    services (the catalog's counts), and for requests that give no size, the entry operation, calls, depth,
    latency and instructions of a training trace entered there (see :meth:`_with_entries`); ``"model"`` lets the
    model choose the entry and size (its own mix may differ from the data's; the model card measures by how much).
    ``attempts``: how many times a step may be drawn (see :meth:`generate`); 1 keeps the first draw.
    """

    def __init__(self, lm, catalog: Catalog | None = None, *, adapter: str | None = "auto", batch_size: int = 256,
                 limits: StepLimits | None = None, entries: str = "data", attempts: int = DEFAULT_ATTEMPTS) -> None:
        if entries not in ("data", "model"):
            raise ValueError(f"entries must be 'data' or 'model', got {entries!r}")
        if attempts < 1:
            raise UserError(f"need at least 1 attempt per step, got {attempts}")
        self.entries = entries
        self.attempts = attempts
        self.draws = 0  # steps decoded, redraws included
        self.lm = lm
        self.bpe = None
        if not hasattr(lm.tokenizer, "key_id"):  # a --base-model model with its own BPE tokenizer: see bpe.py
            from .bpe import BpeStepDecoder

            self.bpe = BpeStepDecoder(lm, catalog if catalog is not None else Catalog.load(lm.path))
            self.vocab = self.bpe.vocab
        else:
            self.vocab = GrammarVocab(lm.tokenizer, catalog if catalog is not None else Catalog.load(lm.path))
        cat = self.vocab.catalog
        if not cat.entries:
            raise UserError(f"{lm.path}: the catalog has no entry service the tokenizer can write")
        self.limits = limits or StepLimits(max_calls=max(cat.max_spans, 1), max_depth=max(cat.max_depth, 1),
                                           max_duration_us=max(cat.max_root_duration_us, 1))
        if adapter == "auto":
            adapter = "instruct" if "instruct" in lm.adapters else None
            if adapter is None and self.bpe is not None and "pretrain" in lm.adapters:  # --base-model pretrain LoRA
                adapter = "pretrain"
        elif adapter is not None and adapter not in lm.adapters:
            raise UserError(f"{lm.path} has no adapter {adapter!r} (it has: {', '.join(lm.adapters) or 'none'})")
        self.adapter = adapter
        self.batch_size = batch_size

    @property
    def catalog(self) -> Catalog:
        return self.vocab.catalog

    def generate(self, requests: Sequence[TraceRequest], *, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, on_step: Callable[[int, Step], None] | None = None) -> list[list[Step]]:
        """The steps of one trace per request, in encoding order (ready for ``encoding.decode_trace``).

        Reproducible: the same requests, seed and batch size give the same steps. ``on_step(trace_index,
        step)`` is called as each step is done (progress).

        Why steps are redrawn: the grammar's masks keep every step valid, but masking token by token is not
        sampling from the model given validity. A layer whose earlier numbers leave the last child a remainder
        the model finds absurd (a 150-call error handler, 150 leaves of 0 µs) is written anyway. Each step's
        importance weight (how likely the model was to write it unmasked, ``TraceLMRuntime.sample(scores=)``)
        decides: the step is kept with that probability, else drawn again, up to ``attempts`` draws, then the
        most likely draw is kept. That is rejection sampling from the model conditioned on the grammar, cut off.
        """
        import torch

        if not (temperature >= 0) or not (0 < top_p <= 1):
            raise UserError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        for r in set(requests):
            r.check(self.catalog, self.limits)
        if self.entries == "data":
            requests = self._with_entries(requests, seed)
        model = self.lm.model
        runtime = self.lm.backend == "runtime"
        if runtime or self.adapter is not None:
            model.set_adapter(self.adapter)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        if not runtime:
            torch.manual_seed(seed)  # transformers' generate() draws from the global generator
        steps: list[list[Step]] = [[] for _ in requests]
        level: list[tuple[int, Conditions]] = [(i, r.conditions()) for i, r in enumerate(requests)]
        attempts = self.attempts if temperature > 0 and runtime and self.bpe is None else 1
        while level:
            done: list[Step | None] = [None] * len(level)
            best = [float("-inf")] * len(level)
            todo = list(range(len(level)))
            for attempt in range(attempts):
                # Steps of similar size decode together (a batch runs as long as its longest row); each trace's
                # steps are still appended in encoding order below.
                order = sorted(todo, key=lambda j: -(level[j][1].calls or 0))
                redo = []
                for b in range(0, len(order), self.batch_size):
                    chunk = order[b : b + self.batch_size]
                    drawn, weights = self._decode([level[j] for j in chunk], requests, temperature, top_p, generator,
                                                  weigh=attempts > 1)
                    self.draws += len(chunk)
                    if attempts == 1:
                        for j, step in zip(chunk, drawn):
                            done[j] = step
                        continue
                    log_u = torch.rand(len(chunk), generator=generator, device=model.device).log().tolist()
                    for j, step, w, u in zip(chunk, drawn, weights, log_u):
                        if u < w:
                            done[j] = step  # accepted
                        else:
                            if w > best[j]:
                                done[j], best[j] = step, w  # kept if no draw is accepted
                            redo.append(j)
                todo = redo
                if not todo:
                    break
            nxt: list[tuple[int, Conditions]] = []
            for (i, _), step in zip(level, done):
                steps[i].append(step)
                if on_step is not None:
                    on_step(i, step)
                nxt.extend((i, next_conditions(step, k)) for k, s in enumerate(step.subs) if s.calls > 0)
            level = nxt
        return steps

    def _with_entries(self, requests: Sequence[TraceRequest], seed: int) -> list[TraceRequest]:
        """Requests without an entry service get one drawn from the training mix, and requests without a size
        (no calls, depth or include) get the entry operation, calls and depth of a training trace entered there
        (the catalog's joint mix), reproducibly from ``seed``. The model then writes the trace under conditions
        it was tuned on; left to choose the size itself, the shipped model's sizes are flatter than the data's
        (TrainTicket: median 44 spans against 76).

        A request without a latency also takes the drawn trace's latency (the root's duration; the model writes
        every span under it) and its instructions: "high latency" when it was above its entry's p90, else an
        include for one of the uncommon calls it made. The instruct adapter was tuned on steps without
        instructions only from traces that satisfy none, so untagged it writes that subset: no uncommon call
        (half of TrainTicket's traces make one) and no latency above the p90. And left to itself it writes root
        durations wider spread than the data's (docs/generation.md, "What a plain request is conditioned on").
        A request for high latency draws among the traces above the p90.
        """
        import random

        names = sorted(self.catalog.entries)
        weights = [sum(self.catalog.entries[n].values()) for n in names]
        rng = random.Random(f"entries:{seed}")
        out, eligible, mixes = [], {}, {}
        for r in requests:
            if r.service is None:
                # An include needs an entry that reaches its caller within the requested depth (found once per
                # distinct request: a run repeats one request many times).
                if r not in eligible:
                    eligible[r] = [(n, w) for n, w in zip(names, weights) if _entry_can_serve(self.catalog, r, n)]
                ok = eligible[r]
                if ok:
                    r = replace(r, service=rng.choices([n for n, _ in ok], [w for _, w in ok])[0])
            if r.service is not None and r.calls is None and r.depth is None and not r.includes:
                key = (r.service, r.operation, r.high_latency)
                if key not in mixes:  # once per distinct request, as for entries above
                    mix = [m for m in self.catalog.trace_mix(r.service, r.operation)
                           if m.calls <= self.limits.max_calls and m.depth <= self.limits.max_depth]  # fmt: skip
                    if r.high_latency:
                        mix = [m for m in mix if m.high_latency] or mix
                    mixes[key] = (mix, [m.traces for m in mix])
                mix, counts = mixes[key]
                if mix:
                    m = rng.choices(mix, counts)[0]
                    r = replace(r, operation=m.operation, calls=m.calls, depth=m.depth)
                    if r.latency_ms is None and (m.high_latency or not r.high_latency):
                        # The latency and instructions of one of those traces (older catalogs have neither): the
                        # model writes the spans under them.
                        latency = rng.choice(m.latencies_us) / 1000 if m.latencies_us else None
                        r = replace(r, latency_ms=latency, **_tags_of(r, m, rng, self.catalog, self.limits))
            out.append(r)
        return out

    def _decode(self, chunk: list[tuple[int, Conditions]], requests, temperature: float, top_p: float,
                generator, weigh: bool = False) -> tuple[list[Step], list[float]]:
        """One batch of pending steps, decoded together under the grammar, and with ``weigh`` each one's log
        importance weight (else 0; the runtime backend alone measures them)."""
        if self.bpe is not None:
            steps = self.bpe.decode(chunk, requests, self.limits, self.adapter, temperature, top_p, generator)
            return steps, [0.0] * len(steps)
        weights = [0.0] * len(chunk)
        tok, model, end_id = self.lm.tokenizer, self.lm.model, self.vocab.mark["end"]
        rows = [_Row(step_program(self.vocab, cond, self.limits, entry_service=requests[i].service,
                                  entry_operation=requests[i].operation) if cond.client
                     else step_program(self.vocab, cond, self.limits)) for i, cond in chunk]  # fmt: skip
        prompts = [[tok.bos_id, *self.vocab.encode(cond.text() + " <layer>")] for _, cond in chunk]
        completion_from = [len(p) for p in prompts]
        room = max(_token_bound(c, self.limits) for _, c in chunk)
        if self.lm.backend == "runtime":
            # Fixed text is fed with the prompt and after each drawn token (never drawn itself): the runtime
            # packs it into the same forward pass, so a step costs one pass per drawn token, not per token.
            for prompt, row in zip(prompts, rows):
                prompt.extend(row.forced())
            live = [j for j, row in enumerate(rows) if row.step is None]  # a fully fixed step needs no model

            def forced(running: list[int], drawn: list[int]) -> list[list[int]]:
                out = []
                for r, token in zip(running, drawn):
                    rows[live[r]].feed(token)
                    out.append(rows[live[r]].forced())
                return out

            hook = self._hook([rows[j] for j in live], temperature, top_p, catch_up=False)
            scores = [0.0] * len(live) if weigh else None
            model.sample([prompts[j] for j in live], max_new_tokens=room, eos_id=end_id, pad_id=tok.pad_id,
                         temperature=temperature, generator=generator, logits_hook=hook, forced=forced,
                         scores=scores, score_from=[completion_from[j] for j in live])  # fmt: skip
            for j, w in zip(live, scores or ()):
                weights[j] = w
        else:
            hook = self._hook(rows, temperature, top_p, catch_up=True)
            outs = _generate_transformers(model, prompts, rows, hook, room, end_id, tok.pad_id, temperature)
            for row, out in zip(rows, outs):
                for token in out[row.fed :]:
                    row.feed(token)
        out_steps = []
        for (_, cond), row in zip(chunk, rows):
            if row.step is None:
                raise RuntimeError(f"step under {cond.text()!r} did not end within {room} tokens")
            out_steps.append(row.step)
        return out_steps, weights

    def _hook(self, rows: list[_Row], temperature: float, top_p: float, catch_up: bool):
        """Masks logits to each row's grammar. ``catch_up``: feed the row the token drawn last (transformers'
        ``generate()`` path; on the runtime, ``forced`` feeds every token as it is drawn)."""
        import torch

        def hook(running: list[int], generated: list[list[int]], logits):
            r_idx, t_idx = [], []
            for j, (r, out) in enumerate(zip(running, generated)):
                row = rows[r]
                if catch_up and len(out) > row.fed:
                    row.feed(out[-1])
                r_idx.extend([j] * len(row.spec))
                t_idx.extend(row.spec)
            allowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            allowed[torch.tensor(r_idx, device=logits.device), torch.tensor(t_idx, device=logits.device)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
            if top_p < 1 and temperature > 0:
                logits = keep_top_p(logits / temperature, top_p) * temperature
            return logits

        return hook


def _generate_transformers(model, prompts, rows, hook, room: int, end_id: int, pad_id: int, temperature: float):
    """The same grammar through transformers' ``generate()`` (a logits processor): the reference the runtime is
    benchmarked against, and the path for models the runtime cannot run. The hook applies top-p itself."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1

    finished: set[int] = set()

    class Grammar(LogitsProcessor):
        def __call__(self, input_ids, scores):
            new = input_ids[:, width:].tolist()
            finished.update(r for r in range(len(rows)) if new[r] and new[r][-1] == end_id)  # padded from now on
            running = [r for r in range(len(rows)) if r not in finished]
            if running:
                idx = torch.tensor(running, device=scores.device)
                scores = scores.clone()
                scores[idx] = hook(running, [new[r] for r in running], scores[idx].float()).to(scores.dtype)
            return scores

    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=sample,
                             temperature=temperature if sample else None, top_k=0 if sample else None,
                             top_p=1.0 if sample else None, max_new_tokens=room, eos_token_id=end_id,
                             pad_token_id=pad_id, logits_processor=LogitsProcessorList([Grammar()]))  # fmt: skip
    outs = []
    for row in out[:, width:].tolist():
        outs.append(row[: row.index(end_id) + 1] if end_id in row else row)
    return outs


def _tags_of(r: TraceRequest, m: MixEntry, rng, catalog: Catalog, limits: StepLimits) -> dict:
    """The instructions request ``r`` takes from the training trace ``m`` it drew its size from. "High latency"
    alone for a trace above the p90, whatever calls it made: the adapter's "high latency" examples came from
    every such trace, so that tag already carries their uncommon calls. Else one uncommon call, drawn as the
    instruct stage drew it (dropped if this catalog cannot place it, e.g. one cut to a tokenizer's names)."""
    if m.high_latency:
        return {"high_latency": True}
    if m.uncommon:
        src, dst, kind = rng.choice(m.uncommon)
        inc = Include(src, dst, SpanKind[kind])
        try:
            replace(r, includes=(inc,)).check(catalog, limits)
        except UserError:
            return {}
        return {"includes": (inc,)}
    return {}


def _entry_can_serve(catalog: Catalog, request: TraceRequest, entry: str) -> bool:
    for inc in request.includes:
        h = catalog.hops_to(inc.src).get(entry)
        if h is None or (request.depth is not None and h + 2 > request.depth) or (
                request.calls is not None and h + 2 > request.calls):
            return False
    return True


def keep_top_p(scaled, top_p: float):
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (always the most likely one)."""
    import torch

    probs = torch.softmax(scaled, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def _token_bound(cond: Conditions, limits: StepLimits) -> int:
    """Tokens a step's completion can take at most: per call ~40 (+ instructions), per sub ~12 + includes."""
    calls = 1 if cond.client else (cond.calls or limits.max_calls)
    per_inc = 12 * len(cond.includes)
    return 64 + calls * (60 + per_inc) + per_inc
