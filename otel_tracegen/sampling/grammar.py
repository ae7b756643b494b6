"""The token-level grammar of one step's completion, as a coroutine the sampler drives token by token.

A step's completion (see ``docs/encoding.md``) is::

    <call> i svc=S op=O kind=K start=N dur=N status=T ...   <book> generated=k left=C-k=L child_depth=D-1=E
    <sub> i calls=N depth=N [<high_latency>] [<include> ...] ...   <end>

:func:`step_program` yields, before every token, the tuple of token ids allowed there (one id: fixed text,
forced rather than sampled) and receives the token that was drawn. The masks make every completion a valid
step whose subtree can still be completed exactly:

- services are known (the callees the parent was seen calling, else any known service; entry services for the
  root), operations are ones that service has, kinds ones seen for that operation;
- a child starts no earlier than its previous sibling and inside its parent's window, and ends inside it too;
- the layer has between 1 and ``calls - (depth - 1)`` children (room is left for the deepest path), and the
  ``<sub>`` counts add up to ``left`` with the deepest child at exactly ``child_depth``, digit by digit;
- an "include call A -> B" is met in the layer when the parent is A, else handed to a child that can still reach
  an A within its depth (along edges seen in the data), which gets the depth and calls that path needs; under a
  shape, along operations: met where the parent's operation was seen making the call, else handed down.

When the model's own choices keep every option open, the masks change nothing; they narrow only as the room
runs out, so the model decides everything it can.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ..encoding import Book, Call, Conditions, Include, Step, Sub
from ..trace import SpanKind, StatusCode
from .catalog import Catalog

Spec = tuple[int, ...]
"""Token ids allowed at the next position; exactly one means it is forced."""


# --- integers, digit by digit -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntSet:
    """A set of non-negative integers as sorted, disjoint, inclusive intervals."""

    intervals: tuple[tuple[int, int], ...]

    @classmethod
    def range(cls, lo: int, hi: int) -> IntSet:
        return cls(((lo, hi),) if 0 <= lo <= hi else ())

    @classmethod
    def of(cls, values: Sequence[int]) -> IntSet:
        """From increasing values."""
        out: list[list[int]] = []
        for v in values:
            if out and v == out[-1][1] + 1:
                out[-1][1] = v
            else:
                out.append([v, v])
        return cls(tuple((a, b) for a, b in out))

    def __bool__(self) -> bool:
        return bool(self.intervals)

    def __contains__(self, v: int) -> bool:
        return any(a <= v <= b for a, b in self.intervals)

    @property
    def min(self) -> int:
        return self.intervals[0][0]

    def allows_prefix(self, digits: str) -> bool:
        """Whether some member is written starting with ``digits`` (canonical decimal: no leading zeros)."""
        if not self.intervals:
            return False
        if digits == "0":
            return 0 in self
        if digits.startswith("0"):
            return False
        p, longest = int(digits), len(str(self.intervals[-1][1]))
        for extra in range(0, longest - len(digits) + 1):
            lo, hi = p * 10**extra, (p + 1) * 10**extra - 1
            if any(a <= hi and lo <= b for a, b in self.intervals):
                return True
        return False


# --- the vocabulary the grammar writes ----------------------------------------------------------------------


class GrammarVocab:
    """Token ids of a ``TraceTokenizer`` for the grammar, and the catalog restricted to names it can write."""

    def __init__(self, tokenizer, catalog: Catalog) -> None:
        self.tokenizer = tokenizer
        self.digit = [tokenizer.token_to_id[str(d)] for d in range(10)]
        self.digit_value = {t: d for d, t in enumerate(self.digit)}
        known = {v for v in (tokenizer.string_value(i) for i in range(tokenizer.vocab_size)) if v is not None}
        self.catalog = catalog.restricted_to(known)
        self.mark = {m: tokenizer.mark_id(m) for m in ("call", "book", "sub", "end", "high_latency", "include")}
        self.key = {k: tokenizer.key_id(k) for k in ("svc", "op", "kind", "start", "dur", "status", "generated",
                                                    "left", "child_depth", "calls", "depth")}  # fmt: skip
        self.minus, self.equals = tokenizer.token_to_id["-"], tokenizer.token_to_id["="]
        self.kind_id = {k.name: tokenizer.str_id(k.name) for k in SpanKind}
        self.status_id = {s.name: tokenizer.str_id(s.name) for s in StatusCode}
        self.str_id = tokenizer.str_id
        self.string_value = tokenizer.string_value
        self.all_services = tuple(sorted(self.str_id(s) for s in self.catalog.services))
        self.entry_services = tuple(sorted(self.str_id(s) for s in self.catalog.entries))
        self._ops = {s: tuple(sorted(self.str_id(o) for o in ops)) for s, ops in self.catalog.operations.items()}
        self._callees = {s: tuple(sorted(self.str_id(c) for c in cs)) for s, cs in self.catalog.edges.items()}
        self._hops: dict[str, dict[str, int]] = {}
        self._include_hops: dict[Include, dict[tuple[str, str], int]] = {}
        self._include_caps: dict[tuple, int] = {}
        self._shapes: dict[tuple[str | None, str | None], tuple | None] = {}
        self._below_caps: dict[tuple[tuple[str, str], int], int] = {}
        self._shape_levels: dict[tuple[tuple[str | None, str | None], int], Shape | None] = {}
        # Catalogs written before subtree sizes were recorded have no shapes: their steps are left unshaped.
        self.sized = any(st.max_calls for ops in self.catalog.operations.values() for st in ops.values())
        self.shapes_let_go = 0  # step programs (redraws included) whose include the shape could not place
        self.encode = lru_cache(maxsize=4096)(lambda text: tuple(tokenizer.encode(text).ids))

    def ops(self, service: str, entry: bool = False) -> Spec:
        if entry:
            return tuple(sorted(self.str_id(o) for o in self.catalog.entries.get(service, {}))) or self._ops[service]
        return self._ops.get(service, ())

    def callees(self, service: str | None) -> Spec:
        """Services ``service`` was seen calling; every known service when it was seen calling none."""
        return self._callees.get(service or "", ()) or self.all_services

    def hops_to(self, service: str) -> dict[str, int]:
        if service not in self._hops:
            self._hops[service] = self.catalog.hops_to(service)
        return self._hops[service]

    def include_hops(self, inc: Include) -> dict[tuple[str, str], int]:
        """For every (service, operation) that leads to the call ``inc`` asks for along operations seen calling each
        other, the fewest calls down to an operation seen making it (0: this one was)."""
        if inc not in self._include_hops:
            cat = self.catalog
            makers = [(inc.src, o) for o, callees in cat.op_edges.get(inc.src, {}).items()
                      if inc.src_op in (None, o)
                      and any(inc.dst_op in (None, co) and (inc.kind is None or inc.kind.name in cat.kinds(inc.dst, co))
                              for co in callees.get(inc.dst, {}))]  # fmt: skip
            hops = dict.fromkeys(makers, 0)
            queue = deque(makers)
            while queue:
                pair = queue.popleft()
                for caller in cat.op_callers(*pair):
                    if caller not in hops:
                        hops[caller] = hops[pair] + 1
                        queue.append(caller)
            self._include_hops[inc] = hops
        return self._include_hops[inc]

    def shape(self, cond: Conditions) -> Shape | None:
        """The :class:`Shape` of the step prompted with ``cond``, if the data can shape it: a known parent operation
        seen with children, and a size it was seen holding that its children could hold within the widest layer
        seen. Else None: the step is only held to the request. A step that carries an include is shaped too; its
        grammar lets the shape go (:func:`step_program`) where the include could not be placed within it."""
        if not self.sized or cond.client or cond.calls is None or cond.depth is None:
            return None
        key = (cond.service, cond.operation)
        if key not in self._shapes:
            parent = self.catalog.operations.get(cond.service or "", {}).get(cond.operation or "")
            seen = self.catalog.op_edges.get(cond.service or "", {}).get(cond.operation or "", {})
            children = {cs: tuple(sorted(cos)) for cs, cos in sorted(seen.items())}
            stats = {(cs, co): self.catalog.operations[cs][co] for cs, cos in children.items() for co in cos}
            self._shapes[key] = (children, stats, parent) if parent and children and parent.max_fanout else None
        if self._shapes[key] is None:
            return None
        children, stats, parent = self._shapes[key]
        C, below = cond.calls, cond.depth - 1
        if C > parent.max_calls or cond.depth > parent.max_below:
            return None
        if (key, below) not in self._shape_levels:  # what depends on the levels only, once per parent and depth
            limits = {pair: (self.below_cap(pair, min(below, st.max_below)), st.max_below) for pair, st in stats.items()}
            deep = [lim[0] for lim in limits.values() if min(lim) >= below]
            widest = max((lim[0] for lim in limits.values()), default=0) if below else 0
            self._shape_levels[key, below] = Shape(children, limits, parent.max_fanout, 0, below, widest,
                                                   max(deep) if below else 0) if deep else None  # fmt: skip
        levels = self._shape_levels[key, below]
        if levels is None:
            return None
        shape = replace(levels, calls=C)
        return shape if shape.fits(0, 0, False, shape.most_children) else None

    def below_cap(self, pair: tuple[str, str], levels: int) -> int:
        """The most calls a span of ``pair`` (service, operation) can have below it within ``levels`` levels, by the
        data: no more than the largest subtree seen under it, nor than its widest layer times what each child it
        was seen calling can hold one level down."""
        if levels <= 0:
            return 0
        key = (pair, levels)
        if key not in self._below_caps:
            st = self.catalog.operations.get(pair[0], {}).get(pair[1])
            kids = [(cs, co) for cs, cos in self.catalog.op_edges.get(pair[0], {}).get(pair[1], {}).items() for co in cos]
            if st is None or not kids or not st.max_fanout:
                self._below_caps[key] = 0
            else:
                each = max(1 + self.below_cap(q, levels - 1) for q in kids)
                self._below_caps[key] = min(st.max_calls, st.max_fanout * each)
        return self._below_caps[key]

    def include_cap(self, inc: Include, pair: tuple[str, str], levels: int) -> int:
        """The most calls a span of ``pair`` can have below it within ``levels`` levels while its subtree makes the
        call ``inc`` asks for along operations seen (:meth:`include_hops`), by the data as in :meth:`below_cap`:
        one child on the way there (a B child where ``pair`` makes the call itself), the rest anything. -1 if the
        call cannot be reached within ``levels``."""
        h = self.include_hops(inc).get(pair)
        if h is None or h + 1 > levels:
            return -1
        key = (inc, pair, levels)
        if key not in self._include_caps:
            cat = self.catalog
            st = cat.operations.get(pair[0], {}).get(pair[1])
            kids = [(cs, co) for cs, cos in cat.op_edges.get(pair[0], {}).get(pair[1], {}).items() for co in cos]
            if h == 0:  # this operation makes the call: the path child is a B
                path = [1 + self.below_cap(q, levels - 1) for q in kids
                        if q[0] == inc.dst and inc.dst_op in (None, q[1]) and (inc.kind is None or inc.kind.name in cat.kinds(*q))]
            else:
                path = [1 + c for q in kids if (c := self.include_cap(inc, q, levels - 1)) >= 0]
            each = max((1 + self.below_cap(q, levels - 1) for q in kids), default=0)
            fanout = max(st.max_fanout, 1) if st is not None else 1
            best = max(path, default=-1)
            self._include_caps[key] = -1 if best < 0 else min(st.max_calls if st is not None and st.max_calls else best,
                                                              best + (fanout - 1) * each)  # fmt: skip
        return self._include_caps[key]

    def number(self, n: int) -> Spec:
        return tuple(self.digit[int(c)] for c in str(n))


def _forced(ids: Sequence[int]) -> Generator[Spec, int, None]:
    for t in ids:
        yield (t,)


class IntSpec(tuple):
    """The spec of a number's first digit: the digit ids allowed there (a plain tuple to a token-by-token sampler),
    and what the whole number may be, ``allowed``, with the fixed ``terminator`` token written after it. A sampler
    that picks whole numbers at once (``bpe.py``, for BPE tokenizers) reads these."""

    def __new__(cls, ids, allowed: IntSet, terminator: int) -> IntSpec:  # noqa: PYI034 - a tuple with two attributes
        self = super().__new__(cls, ids)
        self.allowed, self.terminator = allowed, terminator
        return self


def _read_int(v: GrammarVocab, allowed: IntSet, terminator: int) -> Generator[Spec, int, int]:
    """Digits of a member of ``allowed``, ended by ``terminator`` (consumed: it is the next fixed token). The first
    digit's spec is an :class:`IntSpec`."""
    assert allowed, "the grammar asked for a number from an empty set"
    digits = ""
    while True:
        spec = [v.digit[d] for d in range(10) if allowed.allows_prefix(digits + str(d))]
        if digits and int(digits) in allowed:
            spec.append(terminator)
        token = yield (tuple(spec) if digits else IntSpec(spec, allowed, terminator))
        if token == terminator:
            return int(digits)
        digits += str(v.digit_value[token])


# --- how many calls a set of subtrees can take ----------------------------------------------------------------


def subtrees_fit(remaining: int, lower: Sequence[int], depth: int, reached: bool,
                 upper: Sequence[int] | None = None, levels: Sequence[int] | None = None) -> bool:
    """Whether ``remaining`` calls can be split over children with subtree-depth lower bounds ``lower`` (each
    needs at least that many calls and levels) so that none is deeper than ``depth`` and, unless ``reached``
    already, one is exactly ``depth`` deep. ``upper``/``levels`` (optional, per child): the most calls and
    levels each child's subtree may have."""
    if depth == 0:  # leaves only; a leaf is exactly 0 deep
        return remaining == 0 and not any(lower) and (reached or bool(lower))
    if not lower:
        return remaining == 0 and reached
    if max(lower) > depth:
        return False
    if upper is None or levels is None:
        return remaining >= sum(lower) + (0 if reached else min(depth - lb for lb in lower))
    upper = [ub if lv > 0 else 0 for ub, lv in zip(upper, levels)]  # a child that may not go deeper is a leaf
    if any(lb > min(ub, lv) for lb, ub, lv in zip(lower, upper, levels)) or remaining > sum(upper):
        return False
    if reached:
        return remaining >= sum(lower)
    deepest = [depth - lb for lb, ub, lv in zip(lower, upper, levels) if min(ub, lv) >= depth]
    return bool(deepest) and remaining >= sum(lower) + min(deepest)


@dataclass(frozen=True)
class Shape:
    """What the data allows under one parent operation, for one step: the (service, operation) pairs it was seen
    calling, the most calls and levels ever seen below each, and the most children it was seen having. A step under
    a shape keeps its layer and every child within them, so a subtree is never handed more than its operation was
    ever seen holding (a 150-call error handler whose 150 leaves all get 0 µs), nor a layer wider than any seen.
    Built by :meth:`GrammarVocab.shape`; steps outside the data have none."""

    children: dict[str, tuple[str, ...]]  # child service -> its operations seen under the parent
    limits: dict[tuple[str, str], tuple[int, int]]  # (service, operation) -> (calls, levels) below it, at most
    fanout: int  # children of one parent span, at most
    calls: int  # the step's calls (under the parent)
    below: int  # levels under the deepest child: the step's depth - 1
    widest: int  # the most calls a child may hold below it, over all pairs (0 when children must be leaves)
    widest_deep: int  # the same over the pairs that can be ``below`` deep

    @property
    def most_children(self) -> int:
        """The widest the layer may be: room left for the deepest path, and no wider than any layer seen."""
        return min(self.calls if self.below == 0 else self.calls - self.below, self.fanout)

    def upper(self, call: Call) -> int:
        return self.limits.get((call.service, call.operation), (0, 0))[0]

    def levels(self, call: Call) -> int:
        return self.limits.get((call.service, call.operation), (0, 0))[1]

    def fits(self, k: int, held: int, deep: bool, slots: int, carrier: int | None = None) -> bool:
        """Whether ``k`` children that may hold ``held`` calls below them (one ``deep`` enough, or not yet) can
        still take the step's calls with at most ``slots`` more children. ``carrier``: one of those must carry an
        include, and may hold at most that many calls below it."""
        need = self.calls - k - held
        deep = deep or self.below == 0
        if deep and carrier is None:
            return need <= slots * (1 + self.widest)
        if slots < 1:
            return False
        if not deep and carrier is not None and slots == 1:  # one child to reach the depth and carry the include
            return need <= 1 + min(self.widest_deep, carrier)
        short = max(0 if deep else self.widest - self.widest_deep, 0 if carrier is None else self.widest - carrier)
        return need <= slots * (1 + self.widest) - short

    def choices(self, calls: Sequence[Call], slots_after: int, held: Sequence[int],
                carrying: Callable[[str, str], int | None] | None = None) -> dict[str, tuple[str, ...]]:
        """The pairs the next child may be, by service: those after which the layer can still be completed.
        ``held``: what each child so far may hold below it (the data's most, less for a carrier). ``carrying(service,
        operation)``: with an include still to hand down, what that child could hold below it if it carried the
        include, None if it cannot carry it (then a later child must)."""
        k, total = len(calls) + 1, sum(held)
        deep = any(min(h, self.levels(c)) >= self.below for h, c in zip(held, calls))
        later = None
        if carrying is not None:  # the most a later carrier could hold
            later = max((u for s, ops in self.children.items() for o in ops if (u := carrying(s, o)) is not None), default=-1)
        out = {}
        for s, ops in self.children.items():
            fit = []
            for o in ops:
                u, lv = self.limits[s, o]
                mine = carrying(s, o) if carrying is not None else None
                if mine is not None:
                    u = min(u, mine)
                need_later = later if carrying is not None and mine is None else None
                if need_later is not None and need_later < 0:
                    continue
                if self.fits(k, total + u, deep or min(u, lv) >= self.below, slots_after, need_later):
                    fit.append(o)
            if fit:
                out[s] = tuple(fit)
        return out


# --- one step -----------------------------------------------------------------------------------------------


@dataclass
class StepLimits:
    """Bounds for values the conditions leave open (the client step of an unconstrained request)."""

    max_calls: int = 200
    max_depth: int = 16
    max_duration_us: int = 60_000_000


@dataclass
class _Needs:
    """Includes this layer must meet itself (the parent is A) or hand to a child that can reach an A."""

    meet: list[Include] = field(default_factory=list)
    hand: list[Include] = field(default_factory=list)


def step_program(v: GrammarVocab, cond: Conditions, limits: StepLimits | None = None, *,
                 entry_service: str | None = None, entry_operation: str | None = None
                 ) -> Generator[Spec, int, Step]:
    """The grammar of the completion of the step prompted with ``cond`` (see the module docstring).

    ``entry_service``/``entry_operation`` pin the root span (client step only). Returns the parsed ``Step``.
    """
    limits = limits or StepLimits()
    client = cond.client
    C, D = cond.calls, cond.depth
    # Levels below each child: known from the conditions, else the most the calls (or the limits) allow.
    if D is not None:
        depth_cap = D - 1
    else:
        depth_cap = min(C - 1, limits.max_depth - 1) if C is not None else limits.max_depth - 1
    if client:
        kmax = 1
    elif D == 1:
        kmax = C
    else:
        kmax = C - (D - 1)  # type: ignore[operator]
    shape = v.shape(cond)
    needs = _Needs()
    if shape is not None and cond.includes:
        # Under a shape an include is placed along operations seen calling each other: met in this layer when this
        # operation was seen making the A -> B call, else handed to a child operation that leads to one within
        # the levels and calls the data allows it. Else the step is left to the request's rules.
        for inc in cond.includes:
            if v.include_hops(inc).get((cond.service, cond.operation)) == 0:
                needs.meet.append(inc)
            elif any(_op_carrier_lb(v, inc, pair, depth_cap, shape) is not None for pair in shape.limits):
                needs.hand.append(inc)
            else:
                shape, needs = None, _Needs()
                v.shapes_let_go += 1
                break
    if shape is None:
        for inc in cond.includes:
            meets = not client and cond.service == inc.src and inc.src_op in (None, cond.operation)
            (needs.meet if meets else needs.hand).append(inc)
    else:
        kmax, loose_kmax = shape.most_children, kmax
    hops = {inc: v.hops_to(inc.src) for inc in needs.hand}

    def carrier_lb(inc: Include, service: str, operation: str | None, depth_left: int) -> int | None:
        """The calls and levels a child (service, operation) needs below it to carry ``inc`` down; None if it
        cannot. Under a shape along operations, else along services (``operation`` may then be None). The shape may
        be let go during the step; the include keeps the place it gave it (met here or handed down)."""
        if shape is None:
            return _carrier_lb(hops, inc, service, depth_left)
        return _op_carrier_lb(v, inc, (service, operation), depth_left, shape)

    def settles(service: str, operation: str) -> bool:
        """Whether a child (service, operation) meets an open include or can carry one."""
        return (any(i.dst == service and i.dst_op in (None, operation)
                    and (i.kind is None or i.kind.name in v.catalog.kinds(service, operation)) for i in open_meet)
                or any(carrier_lb(i, service, operation, depth_cap) is not None for i in open_hand))  # fmt: skip

    def subtree_limits(calls: Sequence[Call], depth_left: int) -> tuple[list[int], list[int]] | tuple[None, None]:
        """What each child's subtree may hold (calls, levels) under the shape: the data's most, and for a child
        that carries an include, the most it could hold on the way to the call."""
        if shape is None:
            return None, None
        ups, lvs = [shape.upper(c) for c in calls], [shape.levels(c) for c in calls]
        for inc, i in _carriers(calls, needs, carrier_lb, depth_left).items():
            ups[i] = min(ups[i], v.include_cap(inc, (calls[i].service, calls[i].operation), min(depth_left, lvs[i])))
        return ups, lvs

    def carrying(service: str, operation: str) -> int | None:
        """What a child (service, operation) could hold below it while carrying the open includes it can carry;
        None if it can carry none."""
        lv = shape.limits[service, operation][1]
        caps = [v.include_cap(inc, (service, operation), min(depth_cap, lv)) for inc in open_hand
                if carrier_lb(inc, service, operation, depth_cap) is not None]
        return min(caps) if caps else None

    def open_includes() -> tuple[list[Include], list[Include], bool]:
        meet = [i for i in needs.meet if not any(i.matches(cond.service, cond.operation, c) for c in calls)]
        hand = [i for i in needs.hand if not any(carrier_lb(i, c.service, c.operation, depth_cap) is not None for c in calls)]
        close = (bool(calls) and not meet and not hand
                 and _layer_fits(cond, calls, _lower_bounds(calls, needs, carrier_lb, depth_cap), *subtree_limits(calls, depth_cap)))
        return meet, hand, close

    calls: list[Call] = []
    prev_start = 0
    while True:
        k = len(calls)
        open_meet, open_hand, can_close = open_includes()
        if shape is not None and cond.includes and k >= kmax and not can_close:
            # The shape's widest layer is full and an include is still unplaced (or its carrier cannot hold the
            # path): go on under the request's rules alone, which every layer written so far also obeys.
            shape, kmax = None, loose_kmax
            v.shapes_let_go += 1
            open_meet, open_hand, can_close = open_includes()
        spec = ([v.mark["call"]] if k < kmax else []) + ([v.mark["book"]] if can_close else [])
        assert spec, f"no way to go on after {k} calls under {cond.text()}"
        if (yield tuple(spec)) == v.mark["book"]:
            break
        # -- one call: <call> k svc= ... (the <call> mark was just drawn)
        yield from _forced(v.number(k) + (v.key["svc"],))
        slots_after = kmax - (k + 1)
        forced = len(open_meet) + len(open_hand) > slots_after  # no room left to put an include off
        pairs = None
        if shape is not None:
            # Pairs the parent operation was seen calling, after which the layer can still hold the step's calls
            # (and, with no room left to put an include off, that place it).
            held, _ = subtree_limits(calls, depth_cap)
            pairs = shape.choices(calls, slots_after, held, carrying if open_hand else None)
            if forced:
                pairs = {s: ops for s, ops in ((s, tuple(o for o in ops if settles(s, o))) for s, ops in pairs.items()) if ops}
            if not pairs and cond.includes:
                shape, kmax = None, loose_kmax
                v.shapes_let_go += 1
                open_meet, open_hand, _ = open_includes()
                slots_after = kmax - (k + 1)
                forced = len(open_meet) + len(open_hand) > slots_after
                pairs = None
        if client:
            services = (v.str_id(entry_service),) if entry_service else v.entry_services
        elif pairs is not None:
            services = tuple(sorted(v.str_id(s) for s in pairs))
        else:
            services = v.callees(cond.service)
        if forced and pairs is None:
            # This call must meet an include or be able to carry one down.
            wanted = {v.str_id(i.dst) for i in open_meet}
            for inc in open_hand:
                wanted |= {v.str_id(s) for s in v.catalog.services if carrier_lb(inc, s, None, depth_cap) is not None}
            if not (client and entry_service):  # a pinned entry was checked against the includes up front
                services = tuple(sorted(wanted & set(services) or wanted))
        svc_id = yield services
        service = v.string_value(svc_id)
        meet_now: Include | None = None
        if open_meet and forced:
            meet_now = next((i for i in open_meet if i.dst == service), None)
        yield (v.key["op"],)
        if client and entry_operation:
            ops = (v.str_id(entry_operation),)
        else:
            ops = v.ops(service, entry=client) if pairs is None else tuple(sorted(v.str_id(o) for o in pairs[service]))
            if meet_now is not None and meet_now.dst_op is not None:
                ops = (v.str_id(meet_now.dst_op),)
        op_id = yield ops
        operation = v.string_value(op_id)
        yield (v.key["kind"],)
        kinds = v.catalog.kinds(service, operation) or [k.name for k in SpanKind]
        if meet_now is not None and meet_now.kind is not None:
            kinds = [meet_now.kind.name]
        kind = SpanKind[v.string_value((yield tuple(sorted(v.kind_id[k] for k in kinds))))]
        # -- times: inside the parent's window, siblings in start order
        yield (v.key["start"],)
        budget = cond.budget
        if client:
            start = yield from _read_int(v, IntSet.range(0, 0), v.key["dur"])
            if budget is not None:
                dur_set = IntSet.range(budget, budget)
            else:
                # "High latency" is a root above its entry's p90 (the catalog's, from the training data): the
                # instruction is held like calls and depth are, and the model still writes the duration.
                floor = v.catalog.high_latency_floor_us(service, operation) if cond.high_latency else None
                lo = floor if floor is not None else 0
                dur_set = IntSet.range(lo, max(lo, limits.max_duration_us))
        else:
            hi = budget if budget is not None else prev_start + limits.max_duration_us
            start = yield from _read_int(v, IntSet.range(min(prev_start, hi), hi), v.key["dur"])
            dur_set = IntSet.range(0, (budget - start) if budget is not None else limits.max_duration_us)
        room = dur_set.intervals[-1][1]
        if not client and budget is not None:
            # Masking digits at the exact bound would turn a child that overruns its parent a little (as real
            # children often do: 65-79 % of real traces have one) into one ten times too short: 1050 under a
            # bound of 1000 can only be written as 105. So one more digit may be written, and the duration is
            # then clipped to the window: 1050 becomes 1000, the magnitude the model meant.
            dur_set = IntSet.range(0, 10 * room + 9)
        duration = min(room, (yield from _read_int(v, dur_set, v.key["status"])))
        st = v.catalog.operations.get(service, {}).get(operation)
        statuses = sorted(st.statuses) if st and st.statuses else [s.name for s in StatusCode]
        status = StatusCode[v.string_value((yield tuple(sorted(v.status_id[s] for s in statuses))))]
        calls.append(Call(k, service, operation, kind, start, duration, status))
        prev_start = start

    # -- <book> generated=k left=C-k=L child_depth=D-1=E
    k = len(calls)
    lower = _lower_bounds(calls, needs, carrier_lb, depth_cap)
    yield from _forced((v.key["generated"],) + v.number(k) + (v.key["left"],))
    if C is None:
        lo = k + max(sum(lower.values()), 0 if D is None else D - 1)
        C = yield from _read_int(v, IntSet.range(lo, lo if D == 1 else max(lo, limits.max_calls)), v.minus)
    else:
        yield from _forced(v.number(C) + (v.minus,))
    yield from _forced(v.number(k) + (v.equals,) + v.number(C - k) + (v.key["child_depth"],))
    if D is None:
        if C == k:
            allowed = IntSet.range(1, 1)
        else:
            lo = max(2, 1 + max(lower.values(), default=0))
            allowed = IntSet.range(lo, max(lo, min(C - k + 1, limits.max_depth)))
        D = yield from _read_int(v, allowed, v.minus)
    else:
        yield from _forced(v.number(D) + (v.minus,))
    yield from _forced(v.number(1) + (v.equals,) + v.number(D - 1) + (v.mark["sub"],))

    # -- <sub> i calls=N depth=N [<high_latency>] [<include> ...]
    depth_below = D - 1
    lower = _lower_bounds(calls, needs, carrier_lb, depth_below)
    lbs = [lower.get(i, 0) for i in range(k)]
    carried = _carriers(calls, needs, carrier_lb, depth_below)
    # What each child's subtree may hold: the data's most under a shape, else anything.
    ups, lvs = subtree_limits(calls, depth_below)
    if shape is None:
        ups, lvs = [C] * k, [depth_below] * k
    remaining, reached = C - k, False
    subs: list[Sub] = []
    for i in range(k):
        yield from _forced(v.number(i) + (v.key["calls"],))
        rest = lbs[i + 1 :]
        rest_up, rest_lv = (ups[i + 1 :], lvs[i + 1 :]) if shape is not None else (None, None)
        can_reach = min(ups[i], lvs[i]) >= depth_below
        ok = [c for c in range(lbs[i], min(remaining, ups[i]) + 1)
              if (c > 0 or lbs[i] == 0) and (c <= 0 or depth_below >= 1)
              and subtrees_fit(remaining - c, rest, depth_below, reached or (can_reach and min(c, depth_below) == depth_below),
                               rest_up, rest_lv)]  # fmt: skip
        n = yield from _read_int(v, IntSet.of(ok), v.key["depth"])
        d_lo, d_hi = max(lbs[i], 1 if n > 0 else 0), min(n, depth_below, lvs[i])
        if shape is not None and n > 0:  # as many levels as it takes to hold n calls
            pair = (calls[i].service, calls[i].operation)
            carries = next((inc for inc, j in carried.items() if j == i), None)
            cap = (lambda d: v.below_cap(pair, d)) if carries is None else (lambda d: v.include_cap(carries, pair, d))
            d_lo = max(d_lo, next((d for d in range(1, d_hi + 1) if cap(d) >= n), d_hi))
        if not reached and not subtrees_fit(remaining - n, rest, depth_below, False, rest_up, rest_lv):
            d_lo = depth_below  # the others cannot reach the promised depth: this child must
        incs = tuple(inc for inc in cond.includes if carried.get(inc) == i) if n > 0 else ()
        high = cond.high_latency and n > 0
        tail = (("<high_latency>",) if high else ()) + tuple(inc.text() for inc in incs)
        after = v.encode(" ".join(tail)) if tail else ()
        nxt = (v.mark["sub"],) if i < k - 1 else (v.mark["end"],)
        d = yield from _read_int(v, IntSet.range(d_lo, d_hi), (after or nxt)[0])
        yield from _forced(after[1:] + (nxt if after else ()))
        subs.append(Sub(i, n, d, high, incs))
        remaining -= n
        reached = reached or d == depth_below
    return Step(cond, tuple(calls), Book(k, C, D), tuple(subs))


def _carrier_lb(hops: dict, inc: Include, service: str, depth_left: int) -> int | None:
    """Calls and levels a child of ``service`` needs to carry ``inc`` down to an A -> B edge, None if it cannot
    within ``depth_left`` levels (``hops``: per include, each service's fewest edges to A)."""
    h = hops[inc].get(service)
    return None if h is None or h + 1 > depth_left else h + 1


def _op_carrier_lb(v: GrammarVocab, inc: Include, pair: tuple[str, str], depth_left: int, shape: Shape) -> int | None:
    """Calls and levels a child ``pair`` needs to carry ``inc`` down to an operation seen making the call, None if
    it cannot within ``depth_left`` levels or within what ``shape`` lets its subtree hold."""
    h = v.include_hops(inc).get(pair)
    if h is None or h + 1 > depth_left or h + 1 > min(shape.limits.get(pair, (0, 0))):
        return None
    if v.include_cap(inc, pair, min(depth_left, shape.limits[pair][1])) < h + 1:
        return None
    return h + 1


CarrierBound = Callable[[Include, str, "str | None", int], "int | None"]
"""(include, child service, child operation, levels left) -> the calls and levels that child needs below it to
carry the include down, or None if it cannot."""


def _carriers(calls: Sequence[Call], needs: _Needs, carrier_lb: CarrierBound, depth_left: int) -> dict[Include, int]:
    """For each include handed down, the child that carries it: the first that can (as the encoder does)."""
    out = {}
    for inc in needs.hand:
        for c in calls:
            if carrier_lb(inc, c.service, c.operation, depth_left) is not None:
                out[inc] = c.index
                break
    return out


def _lower_bounds(calls: Sequence[Call], needs: _Needs, carrier_lb: CarrierBound, depth_left: int) -> dict[int, int]:
    """Child index -> the calls and levels its subtree needs for the includes it carries."""
    lower: dict[int, int] = {}
    for inc, i in _carriers(calls, needs, carrier_lb, depth_left).items():
        c = calls[i]
        lower[i] = max(lower.get(i, 0), carrier_lb(inc, c.service, c.operation, depth_left))
    return lower


def _layer_fits(cond: Conditions, calls: Sequence[Call], lower: dict[int, int], upper: Sequence[int] | None = None,
                levels: Sequence[int] | None = None) -> bool:
    """Whether the layer ``calls`` can be closed now: its subtrees can take the calls and depth left, each at least
    ``lower`` (by child index) and within ``upper`` calls and ``levels`` levels, if given."""
    if cond.client:
        return len(calls) == 1
    C, D, k = cond.calls, cond.depth, len(calls)
    if k > C or (D == 1 and k != C):
        return False
    return subtrees_fit(C - k, [lower.get(i, 0) for i in range(k)], D - 1, False, upper, levels)
