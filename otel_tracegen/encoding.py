"""The paper's recursive layer encoding: a trace as a sequence of self-contained steps of text.

A step reads the conditions of one subtree, writes the layer under its parent (the parent's children in start
order), spells out its bookkeeping and ends with the conditions of each child's subtree. One step, written on
one line (wrapped here), for a span of ``ts-travel-service`` with three children::

    <cond> <path> ts-gateway-service "/*" svc=ts-travel-service op=/api/v1/travel calls=7 depth=2
      budget=5210 start=402 <layer>
    <call> 0 svc=ts-route-service op=/api/v1/routes kind=SERVER start=35 dur=1204 status=UNSET
    <call> 1 svc=ts-price-service op="GET /price" kind=SERVER start=1260 dur=830 status=UNSET
    <call> 2 svc=ts-seat-service op=/api/v1/seats kind=CLIENT start=2110 dur=2903 status=ERROR
    <book> generated=3 left=7-3=4 child_depth=2-1=1
    <sub> 0 calls=1 depth=1 <sub> 1 calls=0 depth=0 <sub> 2 calls=3 depth=1 <end>

Text is whitespace-separated items (see :func:`lex`): markers ``<name>``, ``key=value`` fields, bare or
JSON-quoted strings, and integers; so a tokenizer can give each service, operation, kind and status one token,
write numbers as digits and markers as special tokens, and a grammar-constrained sampler can force every fixed
item and mask only the values. ``docs/encoding.md`` has the grammar, a whole example and the infill forms.

Times are integer microseconds. Every span time is first floored to the microsecond relative to the root's
start; offsets and durations are differences of those floored times, so they compose exactly and keep every
``<=`` between times (floor is monotone): a child inside its parent stays inside after encoding.

Everything here is pure and deterministic (randomness only through a ``random.Random`` the caller passes).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache

from .trace import Span, SpanKind, Status, StatusCode, Trace

AttrScalar = str | bool | int | float
"""Attribute values the encoding can write (attribute infill); arrays, maps, bytes and empty values cannot."""

NS_PER_US = 1000


class EncodingError(ValueError):
    """Text or a trace the encoding cannot represent. ``step`` is the 0-based step index when one is known."""

    def __init__(self, problem: str, step: int | None = None):
        self.problem = problem
        self.step = step
        super().__init__(problem if step is None else f"step {step}: {problem}")

    def at_step(self, step: int) -> EncodingError:
        return self if self.step is not None else EncodingError(self.problem, step)


# --- lexical layer --------------------------------------------------------------------------------------------
# Markers the grammar uses; a tokenizer makes each one a special token.
MARKERS: tuple[str, ...] = (
    "cond", "client", "path", "high_latency", "include", "layer", "call", "attr", "book", "sub", "end",
    "mask", "kids", "infill",
)  # fmt: skip
KEYS: tuple[str, ...] = (
    "svc", "op", "calls", "depth", "budget", "start",  # conditions
    "src", "src_op", "dst", "dst_op", "kind",  # include instruction
    "dur", "status",  # call
    "generated", "left", "child_depth",  # bookkeeping
)  # fmt: skip

# A string is written bare when it matches this and cannot be read as anything else; otherwise JSON-quoted
# (ASCII only, so the text is 7-bit clean). Bare strings never start with a digit or '-', so numbers, the
# bookkeeping arithmetic and strings are told apart by their first character.
_BARE = re.compile(r"[A-Za-z_./:][A-Za-z0-9_.:/-]*\Z")
_RESERVED = frozenset({"true", "false", "null", "inf", "nan"})
_INT = re.compile(r"-?[0-9]+\Z")
_EXPR = re.compile(r"([0-9]+)-([0-9]+)=(-?[0-9]+)\Z")
_FLOAT = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?\Z|-?inf\Z|nan\Z")


@dataclass(frozen=True)
class Lexeme:
    """One lexical item. ``kind``: mark, key, str, int, float, bool, op (the ``-`` and ``=`` of bookkeeping).

    ``glued`` is True when no whitespace precedes it in canonical text (a key's value, the pieces of an
    arithmetic expression), so :func:`unlex` can write text back from lexemes.
    """

    kind: str
    value: object
    glued: bool = False


@lru_cache(maxsize=1 << 16)  # services and operations repeat in every step
def render_str(s: str) -> str:
    """A string as the encoding writes it: bare if that is unambiguous, else JSON-quoted ASCII."""
    if _BARE.match(s) and s not in _RESERVED:
        return s
    return json.dumps(s, ensure_ascii=True)


def render_float(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def render_value(v: AttrScalar) -> str:
    """An attribute value: ``true``/``false``, a decimal integer, a float (always with ``.`` or exponent), a string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(int(v))  # int(): an IntEnum value is written as its number
    if isinstance(v, float):
        return render_float(v)
    if isinstance(v, str):
        return render_str(v)
    raise EncodingError(f"cannot encode attribute value of type {type(v).__name__}")


@lru_cache(maxsize=1 << 16)
def _classify(word: str, glued: bool) -> tuple[Lexeme, ...]:
    if _INT.match(word):
        return (Lexeme("int", int(word), glued),)
    if m := _EXPR.match(word):
        a, b, c = m.groups()
        return (Lexeme("int", int(a), glued), Lexeme("op", "-", True), Lexeme("int", int(b), True),
                Lexeme("op", "=", True), Lexeme("int", int(c), True))  # fmt: skip
    if word in ("true", "false"):
        return (Lexeme("bool", word == "true", glued),)
    if _FLOAT.match(word):
        return (Lexeme("float", float(word), glued),)
    if _BARE.match(word) and word not in _RESERVED:
        return (Lexeme("str", word, glued),)
    raise EncodingError(f"cannot read {word!r} (quote strings with other characters)")


@lru_cache(maxsize=1 << 16)
def _unquote(quoted: str) -> str:
    return json.loads(quoted)


@lru_cache(maxsize=1 << 16)
def _quoted(quoted: str, glued: bool) -> Lexeme:
    return Lexeme("str", _unquote(quoted), glued)


@cache
def _mark(name: str) -> Lexeme:
    return Lexeme("mark", name)


@cache
def _key(name: str) -> Lexeme:
    return Lexeme("key", name)


# One item per match: whitespace, a JSON string, a marker, a key (its value follows with no space), or a word.
_ITEM = re.compile(
    r'(?P<ws>[ \t\r\n]+)|(?P<q>"(?:[^"\\\x00-\x1f]|\\.)*")|(?P<mark><[a-z_]+>)|(?P<key>[a-z_]+=)|(?P<word>[^ \t\r\n"]+)'
)


class _Malformed(Exception):
    pass


def lex(text: str) -> list[Lexeme]:
    """Split encoded text into lexemes. Raises :class:`EncodingError` naming the character position."""
    # Fast path: findall runs in C and every lexeme comes from a cache. Anything odd is re-lexed by
    # _lex_slowly, which walks item by item to name the position of the problem.
    items = _ITEM.findall(text)
    if sum(map(len, map("".join, items))) != len(text):
        return _lex_slowly(text)
    out: list[Lexeme] = []
    sep = True  # whitespace (or the start) precedes the next item
    key = False  # a key waits for its value
    try:
        for ws, q, mark, k, word in items:
            if ws:
                if key:
                    raise _Malformed
                sep = True
                continue
            if not (sep or key):
                raise _Malformed
            if word:
                out += _classify(word, key)
            elif q:
                out.append(_quoted(q, key))
            elif key:
                raise _Malformed
            elif mark:
                out.append(_mark(mark[1:-1]))
            else:
                out.append(_key(k[:-1]))
                key = True
                continue
            key = sep = False
        if key:
            raise _Malformed
    except (_Malformed, ValueError):  # EncodingError is a ValueError
        return _lex_slowly(text)
    return out


def _lex_slowly(text: str) -> list[Lexeme]:
    out: list[Lexeme] = []
    i = 0
    sep = True
    key: str | None = None
    for m in _ITEM.finditer(text):
        if m.start() != i:  # finditer skipped something no item matches
            break
        kind = m.lastgroup
        i = m.end()
        if kind == "ws":
            if key is not None:
                raise EncodingError(f"at character {m.start()}: {key}= has no value")
            sep = True
            continue
        if not sep and key is None:
            raise EncodingError(f"at character {m.start()}: expected whitespace between items")
        glued = key is not None
        if kind == "word":
            try:
                out += _classify(m.group(), glued)
            except EncodingError as e:
                raise EncodingError(f"at character {m.start()}: {e}") from None
        elif kind == "q":
            try:
                out.append(_quoted(m.group(), glued))
            except ValueError as e:
                raise EncodingError(f"at character {m.start()}: bad quoted string ({e})") from None
        elif glued:
            raise EncodingError(f"at character {m.start()}: {key}= has no value")
        elif kind == "mark":
            out.append(_mark(m.group()[1:-1]))
        else:
            key = m.group()[:-1]
            out.append(_key(key))
            continue
        key, sep = None, False
    if i < len(text):
        what = "bad quoted string" if text[i] == '"' else "cannot read this"
        raise EncodingError(f"at character {i}: {what}")
    if key is not None:
        raise EncodingError(f"at character {i}: {key}= has no value")
    return out


def _render_lexeme(x: Lexeme) -> str:
    if x.kind == "mark":
        return f"<{x.value}>"
    if x.kind == "key":
        return f"{x.value}="
    if x.kind == "str":
        return render_str(x.value)  # type: ignore[arg-type]
    if x.kind in ("int", "float", "bool"):
        return render_value(x.value)  # type: ignore[arg-type]
    return str(x.value)


def unlex(lexemes: Iterable[Lexeme]) -> str:
    """Canonical text from lexemes: one space between items, none before a glued lexeme, a newline before
    each step's ``<cond>`` but the first (so a whole trace's text comes back as :func:`trace_to_text` wrote it)."""
    parts: list[str] = []
    for x in lexemes:
        if parts and not x.glued:
            parts.append("\n" if x.kind == "mark" and x.value == "cond" else " ")
        parts.append(_render_lexeme(x))
    return "".join(parts)


# --- the model of a step --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Include:
    """Instruction: an edge parent ``src`` (``src_op``) -> child ``dst`` (``dst_op``) of span kind ``kind``
    (the child's kind) must occur in this subtree. ``None`` parts match anything."""

    src: str
    dst: str
    kind: SpanKind | None = None
    src_op: str | None = None
    dst_op: str | None = None

    def matches(self, parent_service: str, parent_operation: str, child: Call) -> bool:
        return (
            self.src == parent_service
            and self.dst == child.service
            and (self.src_op is None or self.src_op == parent_operation)
            and (self.dst_op is None or self.dst_op == child.operation)
            and (self.kind is None or self.kind == child.kind)
        )

    def text(self) -> str:
        parts = ["<include>", f"src={render_str(self.src)}"]
        if self.src_op is not None:
            parts.append(f"src_op={render_str(self.src_op)}")
        parts.append(f"dst={render_str(self.dst)}")
        if self.dst_op is not None:
            parts.append(f"dst_op={render_str(self.dst_op)}")
        if self.kind is not None:
            parts.append(f"kind={self.kind.name}")
        return " ".join(parts)


@dataclass(frozen=True)
class Instructions:
    """User instructions for a whole trace (the paper's instruction tuning)."""

    high_latency: bool = False
    includes: tuple[Include, ...] = ()


# Condition fields pre-training may drop; `<client>` and instructions are never dropped (an instruction that
# vanished would silently stop constraining the subtree, and the root step must stay recognisable).
DROPPABLE: tuple[str, ...] = ("path", "svc", "op", "calls", "depth", "budget", "start")
_COND_ORDER: tuple[str, ...] = ("client",) + DROPPABLE + ("high_latency",)


@dataclass(frozen=True)
class Conditions:
    """What a step is conditioned on. ``None`` means absent (dropped, or unknown to the prompter).

    - ``client``: this is the first step; the parent is the virtual client that calls the root span.
    - ``path``: (service, operation) of the parent's ancestors, root first, the parent itself excluded;
      ``()`` when the parent is the root. Possibly capped to the nearest ancestors (``max_path``).
    - ``service``/``operation``: the parent span (absent for the client).
    - ``calls``: spans under the parent (its descendants); a whole trace of N spans has ``calls=N``.
    - ``depth``: span levels under the parent (the parent's subtree depth minus 1; the trace depth for the
      client).
    - ``budget``: the parent's duration in µs; ``start``: the parent's start in µs after the root's start.
    - ``order``: the item order of the text (shuffled pre-training); not part of equality.
    """

    client: bool = False
    path: tuple[tuple[str, str], ...] | None = None
    service: str | None = None
    operation: str | None = None
    calls: int | None = None
    depth: int | None = None
    budget: int | None = None
    start: int | None = None
    high_latency: bool = False
    includes: tuple[Include, ...] = ()
    order: tuple[str, ...] | None = field(default=None, compare=False)

    def _present(self) -> list[str]:
        values = (self.client or None, self.path, self.service, self.operation, self.calls, self.depth,
                  self.budget, self.start, self.high_latency or None)  # fmt: skip
        names = [n for n, v in zip(_COND_ORDER, values) if v is not None]
        return names + ["include"] * len(self.includes)

    def _item(self, name: str) -> str | None:
        if name == "client":
            return "<client>" if self.client else None
        if name == "high_latency":
            return "<high_latency>" if self.high_latency else None
        if name == "path":
            if self.path is None:
                return None
            return " ".join(["<path>"] + [f"{render_str(s)} {render_str(o)}" for s, o in self.path])
        value = {"svc": self.service, "op": self.operation, "calls": self.calls, "depth": self.depth,
                 "budget": self.budget, "start": self.start}[name]  # fmt: skip
        if value is None:
            return None
        return f"{name}={render_str(value) if isinstance(value, str) else value}"

    def text(self) -> str:
        names = self._present()
        if self.order is not None:
            if sorted(self.order) != sorted(names):
                raise EncodingError(f"conditions order {list(self.order)} does not list the present items {names}")
            names = list(self.order)
        incs = iter(self.includes)
        items = [next(incs).text() if n == "include" else self._item(n) for n in names]
        return " ".join(["<cond>"] + items)  # type: ignore[list-item]


@dataclass(frozen=True)
class Call:
    """One child in a layer. Times in µs: ``start`` relative to the parent's start, ``duration`` >= 0 normally.

    ``index`` is the position in the layer (``None`` in an infill target, which has none). ``attributes``
    appear only in attribute infill.
    """

    index: int | None
    service: str
    operation: str
    kind: SpanKind
    start: int
    duration: int
    status: StatusCode
    attributes: tuple[tuple[str, AttrScalar], ...] = ()

    def fields_text(self) -> str:
        s = (
            f"svc={render_str(self.service)} op={render_str(self.operation)} kind={self.kind.name} "
            f"start={self.start} dur={self.duration} status={self.status.name}"
        )
        for k, v in self.attributes:
            s += f" <attr> {render_str(k)} {render_value(v)}"
        return s

    def text(self) -> str:
        return f"<call> {self.index} {self.fields_text()}"


CallRecord = Call
"""What :func:`decode_call` returns (the same record as a layer's call)."""


@dataclass(frozen=True)
class Book:
    """The paper's intermediate instructions: ``generated`` calls in this layer out of ``calls`` in the
    subtree, at ``depth`` levels. ``left`` and ``child_depth`` are derived and written as arithmetic."""

    generated: int
    calls: int
    depth: int

    @property
    def left(self) -> int:
        return self.calls - self.generated

    @property
    def child_depth(self) -> int:
        return self.depth - 1

    def text(self) -> str:
        g, c, d = self.generated, self.calls, self.depth
        return f"<book> generated={g} left={c}-{g}={self.left} child_depth={d}-1={self.child_depth}"


@dataclass(frozen=True)
class Sub:
    """Conditions for the subtree of child ``index``: its descendants and levels below it, plus the
    instructions that travel into that subtree. A child with ``calls=0`` has no step of its own."""

    index: int
    calls: int
    depth: int
    high_latency: bool = False
    includes: tuple[Include, ...] = ()

    def text(self) -> str:
        parts = [f"<sub> {self.index} calls={self.calls} depth={self.depth}"]
        if self.high_latency:
            parts.append("<high_latency>")
        parts += [i.text() for i in self.includes]
        return " ".join(parts)


@dataclass(frozen=True)
class Step:
    """One step: conditions, the layer's calls, bookkeeping, one sub-condition per call. ``text()`` is one line."""

    conditions: Conditions
    calls: tuple[Call, ...]
    book: Book
    subs: tuple[Sub, ...]

    def prompt_text(self) -> str:
        """The conditions, up to and including ``<layer>``: the prompt the model continues."""
        return self.conditions.text() + " <layer>"

    def completion_text(self) -> str:
        """What the model writes: the layer, the bookkeeping and the sub-conditions, through ``<end>``."""
        parts = [c.text() for c in self.calls] + [self.book.text()] + [s.text() for s in self.subs] + ["<end>"]
        return " ".join(parts)

    def text(self) -> str:
        return self.prompt_text() + " " + self.completion_text()


@dataclass(frozen=True)
class ConditionOptions:
    """How conditions are written.

    Args:
        max_path: keep only the nearest ``max_path`` ancestors in ``<path>`` (0: no path; None: all).
        shuffle: shuffle the condition items (pre-training, against spurious position associations).
        drop_prob: drop each field in :data:`DROPPABLE` independently with this probability.
        keep: fields never dropped.
    """

    max_path: int | None = None
    shuffle: bool = False
    drop_prob: float = 0.0
    keep: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_path is not None and self.max_path < 0:
            raise ValueError(f"max_path must be >= 0 or None, got {self.max_path}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        unknown = set(self.keep) - set(DROPPABLE)
        if unknown:
            raise ValueError(f"keep has unknown fields {sorted(unknown)}; choose from {DROPPABLE}")

    @property
    def random(self) -> bool:
        return self.shuffle or self.drop_prob > 0


@dataclass(frozen=True)
class InfillExample:
    """An infill prompt and its target. ``origin_ns`` is the absolute time the prompt's offsets count from."""

    prompt: str
    target: str
    origin_ns: int = 0


# --- parsing --------------------------------------------------------------------------------------------------


class _Cursor:
    def __init__(self, lexemes: list[Lexeme]):
        self.xs = lexemes
        self.i = 0

    def peek(self) -> Lexeme | None:
        return self.xs[self.i] if self.i < len(self.xs) else None

    def at_mark(self, *names: str) -> bool:
        x = self.peek()
        return x is not None and x.kind == "mark" and x.value in names

    def next(self, what: str) -> Lexeme:
        try:
            x = self.xs[self.i]
        except IndexError:
            raise EncodingError(f"text ends where {what} was expected") from None
        self.i += 1
        return x

    def mark(self, name: str) -> None:
        x = self.next(f"<{name}>")
        if x.kind != "mark" or x.value != name:
            raise EncodingError(f"expected <{name}>, found {_render_lexeme(x)!r}")

    def value(self, kind: str, what: str):
        x = self.next(what)
        if x.kind != kind:
            raise EncodingError(f"{what}: expected a {kind}, found {_render_lexeme(x)!r}")
        return x.value

    def field(self, key: str, kind: str):
        x = self.next(f"{key}=")
        if x.kind != "key" or x.value != key:
            raise EncodingError(f"expected {key}=, found {_render_lexeme(x)!r}")
        return self.value(kind, f"{key}=")

    def op(self, sym: str, what: str) -> None:
        x = self.next(what)
        if x.kind != "op" or x.value != sym:
            raise EncodingError(f"{what}: expected {sym!r}, found {_render_lexeme(x)!r}")


def _enum(cls, name: str, what: str):
    try:
        return cls[name]
    except KeyError:
        raise EncodingError(f"{what}: unknown {cls.__name__} {name!r}") from None


_INCLUDE_KEYS = ("src", "src_op", "dst", "dst_op", "kind")


def _parse_include(cur: _Cursor) -> Include:
    got: dict[str, object] = {}
    while (x := cur.peek()) is not None and x.kind == "key" and x.value in _INCLUDE_KEYS:
        cur.i += 1
        if x.value in got:
            raise EncodingError(f"<include> has {x.value}= twice")
        v = cur.value("str", f"<include> {x.value}=")
        got[x.value] = _enum(SpanKind, v, "<include> kind=") if x.value == "kind" else v  # type: ignore[arg-type]
    if "src" not in got or "dst" not in got:
        raise EncodingError("<include> needs src= and dst=")
    return Include(**got)  # type: ignore[arg-type]


def _parse_conditions(cur: _Cursor) -> Conditions:
    cur.mark("cond")
    vals: dict[str, object] = {}
    order: list[str] = []
    includes: list[Include] = []
    while not cur.at_mark("layer"):
        x = cur.next("<layer>")
        if x.kind == "mark" and x.value == "include":
            includes.append(_parse_include(cur))
            order.append("include")
            continue
        if x.kind == "mark" and x.value in ("client", "high_latency", "path") or x.kind == "key" and x.value in DROPPABLE:
            name = str(x.value)
        else:
            raise EncodingError(f"unexpected {_render_lexeme(x)!r} in conditions")
        if name in vals:
            raise EncodingError(f"conditions have {name} twice")
        order.append(name)
        if name in ("client", "high_latency"):
            vals[name] = True
        elif name == "path":
            hops = []
            xs, i, n = cur.xs, cur.i, len(cur.xs)
            while i < n and xs[i].kind == "str":
                if i + 1 >= n or xs[i + 1].kind != "str":
                    cur.i = i + 1
                    cur.value("str", "<path> operation")  # raises, naming what came instead
                hops.append((xs[i].value, xs[i + 1].value))
                i += 2
            cur.i = i
            vals[name] = tuple(hops)
        elif name in ("svc", "op"):
            vals[name] = cur.value("str", f"{name}=")
        else:
            vals[name] = cur.value("int", f"{name}=")
    cur.mark("layer")
    canonical = [n for n in _COND_ORDER if n in vals] + ["include"] * len(includes)
    return Conditions(
        client=bool(vals.get("client", False)),
        path=vals.get("path"),  # type: ignore[arg-type]
        service=vals.get("svc"),  # type: ignore[arg-type]
        operation=vals.get("op"),  # type: ignore[arg-type]
        calls=vals.get("calls"),  # type: ignore[arg-type]
        depth=vals.get("depth"),  # type: ignore[arg-type]
        budget=vals.get("budget"),  # type: ignore[arg-type]
        start=vals.get("start"),  # type: ignore[arg-type]
        high_latency=bool(vals.get("high_latency", False)),
        includes=tuple(includes),
        order=None if order == canonical else tuple(order),
    )


def _parse_value(cur: _Cursor, what: str) -> AttrScalar:
    x = cur.next(what)
    if x.kind not in ("str", "int", "float", "bool"):
        raise EncodingError(f"{what}: expected a value, found {_render_lexeme(x)!r}")
    return x.value  # type: ignore[return-value]


def _parse_call_fields(cur: _Cursor, index: int | None) -> Call:
    svc = cur.field("svc", "str")
    op = cur.field("op", "str")
    kind = _enum(SpanKind, cur.field("kind", "str"), "kind=")
    start = cur.field("start", "int")
    dur = cur.field("dur", "int")
    status = _enum(StatusCode, cur.field("status", "str"), "status=")
    attrs = []
    while cur.at_mark("attr"):
        cur.i += 1
        key = cur.value("str", "<attr> key")
        attrs.append((key, _parse_value(cur, f"<attr> {key}")))
    return Call(index, svc, op, kind, start, dur, status, tuple(attrs))


def _parse_book(cur: _Cursor) -> Book:
    cur.mark("book")
    generated = cur.field("generated", "int")
    calls = cur.field("left", "int")
    cur.op("-", "left=")
    g2 = cur.value("int", "left=")
    cur.op("=", "left=")
    left = cur.value("int", "left=")
    depth = cur.field("child_depth", "int")
    cur.op("-", "child_depth=")
    one = cur.value("int", "child_depth=")
    cur.op("=", "child_depth=")
    child_depth = cur.value("int", "child_depth=")
    if g2 != generated:
        raise EncodingError(f"<book> left={calls}-{g2}=... subtracts {g2}, not generated={generated}")
    if left != calls - generated:
        raise EncodingError(f"<book> left={calls}-{generated}={left} is wrong ({calls - generated})")
    if one != 1 or child_depth != depth - 1:
        raise EncodingError(f"<book> child_depth={depth}-{one}={child_depth} is wrong ({depth}-1={depth - 1})")
    return Book(generated, calls, depth)


def _parse_sub(cur: _Cursor) -> Sub:
    cur.mark("sub")
    index = cur.value("int", "<sub> index")
    calls = cur.field("calls", "int")
    depth = cur.field("depth", "int")
    high = False
    if cur.at_mark("high_latency"):
        cur.i += 1
        high = True
    includes = []
    while cur.at_mark("include"):
        cur.i += 1
        includes.append(_parse_include(cur))
    return Sub(index, calls, depth, high, tuple(includes))


def _parse_step(cur: _Cursor) -> Step:
    conds = _parse_conditions(cur)
    calls = []
    while cur.at_mark("call"):
        cur.i += 1
        calls.append(_parse_call_fields(cur, cur.value("int", "<call> index")))
    book = _parse_book(cur)
    subs = []
    while cur.at_mark("sub"):
        subs.append(_parse_sub(cur))
    cur.mark("end")
    return Step(conds, tuple(calls), book, tuple(subs))


def parse_step(text: str, *, check: bool = True) -> Step:
    """One step from its text. With ``check``, also its internal consistency (:func:`check_step`)."""
    cur = _Cursor(lex(text))
    step = _parse_step(cur)
    if cur.peek() is not None:
        raise EncodingError(f"text continues after <end>: {_render_lexeme(cur.peek())!r}")  # type: ignore[arg-type]
    if check:
        check_step(step)
    return step


def parse_steps(text: str, *, check: bool = True) -> list[Step]:
    """Every step of a text (steps end with ``<end>``; newlines between them are just whitespace)."""
    cur = _Cursor(lex(text))
    steps = []
    while cur.peek() is not None:
        try:
            step = _parse_step(cur)
            if check:
                check_step(step)
        except EncodingError as e:
            raise e.at_step(len(steps)) from None
        steps.append(step)
    return steps


def check_step(step: Step) -> None:
    """Raise :class:`EncodingError` unless the step agrees with itself: indices, counts, bookkeeping, the
    sub-conditions' totals, and that every instruction is met in this layer or handed to a subtree."""
    c, b, m = step.conditions, step.book, len(step.calls)
    if m == 0:
        raise EncodingError("a step needs at least one call")
    for want, call in enumerate(step.calls):
        if call.index != want:
            raise EncodingError(f"call {want} is numbered {call.index}")
    if b.generated != m:
        raise EncodingError(f"<book> generated={b.generated} but the layer has {m} calls")
    if c.calls is not None and c.calls != b.calls:
        raise EncodingError(f"<book> counts from {b.calls} calls but the conditions say calls={c.calls}")
    if c.depth is not None and c.depth != b.depth:
        raise EncodingError(f"<book> counts from depth {b.depth} but the conditions say depth={c.depth}")
    if b.left < 0:
        raise EncodingError(f"the layer has {m} calls but only calls={b.calls} were left")
    if b.depth < 1:
        raise EncodingError(f"a layer at depth={b.depth} (no levels left)")
    if c.client:
        if c.path is not None or c.service is not None or c.operation is not None:
            raise EncodingError("the client step has no path, svc or op")
        if m != 1:
            raise EncodingError(f"the client calls exactly one root span, not {m}")
    if len(step.subs) != m:
        raise EncodingError(f"{len(step.subs)} <sub> for {m} calls")
    for want, s in enumerate(step.subs):
        if s.index != want:
            raise EncodingError(f"<sub> {want} is numbered {s.index}")
        if s.calls < 0 or s.depth < 0 or (s.calls == 0) != (s.depth == 0) or s.depth > s.calls:
            raise EncodingError(f"<sub> {want}: calls={s.calls} depth={s.depth} is impossible")
        if s.calls == 0 and (s.high_latency or s.includes):
            raise EncodingError(f"<sub> {want} has no subtree but carries instructions")
        if s.calls and s.high_latency != c.high_latency:
            raise EncodingError(f"<sub> {want}: <high_latency> must follow the conditions ({c.high_latency})")
        for inc in s.includes:
            if inc not in c.includes:
                raise EncodingError(f"<sub> {want} carries an include the conditions do not have")
    if sum(s.calls for s in step.subs) != b.left:
        raise EncodingError(f"<sub> calls sum to {sum(s.calls for s in step.subs)}, not left={b.left}")
    if max(s.depth for s in step.subs) != b.child_depth:
        raise EncodingError(f"deepest <sub> has depth={max(s.depth for s in step.subs)}, not {b.child_depth}")
    for inc in c.includes:
        if any(inc in s.includes for s in step.subs):
            continue
        if not c.client and (c.service is None or c.operation is None):
            continue  # the parent's identity was dropped: whether the layer meets it cannot be told
        if c.client or not any(inc.matches(c.service, c.operation, call) for call in step.calls):  # type: ignore[arg-type]
            raise EncodingError(f"include {inc.src} -> {inc.dst} is neither in this layer nor handed down")


# --- trace -> ordered tree ------------------------------------------------------------------------------------


class _Node:
    __slots__ = ("depth", "kids", "level", "parent", "qe", "qs", "rank", "size", "span")

    def __init__(self, span: Span, base_ns: int, parent: _Node | None, level: int):
        self.span = span
        # floor((t - base) / 1000): Python's // floors negatives too, so rounding is monotone everywhere
        self.qs = (span.start_ns - base_ns) // NS_PER_US
        self.qe = (span.end_ns - base_ns) // NS_PER_US
        self.parent = parent
        self.kids: list[_Node] = []
        self.size = 1
        self.depth = 1
        self.rank = 0
        self.level = level

    def key(self) -> tuple:
        s = self.span
        return (self.qs, self.qe, s.service, s.name, int(s.kind), int(s.status.code))


def single_root(trace: Trace, error: type[Exception] = EncodingError, needs: str = "the encoding needs") -> Span:
    """The root of a trace an encoding can write: spans present, ids distinct, exactly one root; else ``error``."""
    if not trace.spans:
        raise error("the trace has no spans")
    if len(trace.by_id) != len(trace.spans):
        raise error(f"the trace has {len(trace.spans) - len(trace.by_id)} duplicate span ids")
    roots = trace.roots
    if len(roots) != 1:
        raise error(f"the trace has {len(roots)} roots; {needs} exactly one")
    return roots[0]


def _build_tree(trace: Trace) -> _Node:
    """The trace as a tree in encoding order; raises EncodingError for what the encoding cannot represent."""
    top = single_root(trace)
    base = top.start_ns
    root = _Node(top, base, None, 0)
    nodes, stack = [root], [root]
    while stack:
        node = stack.pop()
        for child in trace.children(node.span):
            kid = _Node(child, base, node, node.level + 1)
            node.kids.append(kid)
            nodes.append(kid)
            stack.append(kid)
    if len(nodes) != len(trace.spans):
        raise EncodingError(f"{len(trace.spans) - len(nodes)} spans are not reachable from the root (orphans)")
    # Order siblings by their encoded fields (µs start, end, service, name, kind, status), and break the
    # remaining ties by the whole subtree, so the text depends only on what the model sees (nanoseconds and
    # ids never reorder a layer). Subtrees are compared through per-level ranks: flat tuples, no recursion.
    by_level: dict[int, list[_Node]] = {}
    for node in nodes:
        by_level.setdefault(node.level, []).append(node)
    for level in sorted(by_level, reverse=True):
        keyed = []
        for node in by_level[level]:
            node.kids.sort(key=lambda k: k.rank)
            node.size = 1 + sum(k.size for k in node.kids)
            node.depth = 1 + max((k.depth for k in node.kids), default=0)
            keyed.append((node.key() + tuple(k.rank for k in node.kids), node))
        keyed.sort(key=lambda kn: kn[0])
        rank, prev = -1, None
        for k, node in keyed:
            if k != prev:
                rank, prev = rank + 1, k
            node.rank = rank
    return root


def _bfs(root: _Node) -> list[_Node]:
    out, i = [root], 0
    while i < len(out):
        out.extend(out[i].kids)
        i += 1
    return out


def quantize(trace: Trace) -> Trace:
    """What the encoding keeps of a trace: ids, structure, service, name, kind, status code, and times
    floored to the microsecond relative to the root's start (absolute again, anchored at the root's start).
    Everything else takes its default. Spans come in encoding order."""
    root = _build_tree(trace)
    base = root.span.start_ns
    spans = []
    for n in _bfs(root):
        s = n.span
        spans.append(Span(s.trace_id, s.span_id, s.parent_id, s.service, s.name,
                          base + n.qs * NS_PER_US, base + n.qe * NS_PER_US, s.kind, Status(s.status.code)))  # fmt: skip
    return Trace(spans, trace.trace_id)


def encoding_order(trace: Trace) -> list[Span]:
    """The spans in the order the encoding writes them: the root, then each step's layer in step order
    (breadth-first, siblings in encoded start order). Position i here is position i of a decoded trace."""
    return [n.span for n in _bfs(_build_tree(trace))]


def step_positions(trace: Trace) -> dict[str, tuple[int, int]]:
    """Where each span is written in :func:`encode_trace`'s steps: span id -> (step index, call index). The root
    is call 0 of the client's step 0; every other span is a call of its parent's step."""
    root = _build_tree(trace)
    out = {root.span.span_id: (0, 0)}
    k = 1
    for node in _bfs(root):
        if node.kids:
            for i, kid in enumerate(node.kids):
                out[kid.span.span_id] = (k, i)
            k += 1
    return out


def trace_latency_us(trace: Trace) -> int:
    """The latency the encoding states for a trace (the client step's budget): the root's duration in µs."""
    root = _build_tree(trace)
    return root.qe - root.qs


# --- encoding -------------------------------------------------------------------------------------------------


def _call(node: _Node, index: int, parent_qs: int) -> Call:
    s = node.span
    return Call(index, s.service, s.name, s.kind, node.qs - parent_qs, node.qe - node.qs, s.status.code)


def _apply_options(c: Conditions, options: ConditionOptions, rng: random.Random | None) -> Conditions:
    if options.max_path is not None and c.path is not None:
        c = replace(c, path=c.path[len(c.path) - options.max_path :] if options.max_path else None)
    if options.drop_prob > 0:
        assert rng is not None
        drop = {}
        for name in DROPPABLE:
            if name not in options.keep and rng.random() < options.drop_prob:
                drop[{"svc": "service", "op": "operation"}.get(name, name)] = None
        c = replace(c, **drop)
    if options.shuffle:
        assert rng is not None
        names = c._present()
        rng.shuffle(names)
        c = replace(c, order=tuple(names))
    return c


def encode_trace(
    trace: Trace,
    *,
    instructions: Instructions | None = None,
    options: ConditionOptions | None = None,
    rng: random.Random | None = None,
) -> list[Step]:
    """A trace as steps: first the virtual client's step (its layer is the root span), then one step per span
    with children, breadth-first with siblings in encoded start order.

    ``instructions`` travel down: ``high_latency`` to every subtree (a property of the whole trace), an
    include to the first child (in layer order) whose subtree holds a matching edge, until the layer that
    holds it. ``options`` shuffle and drop condition fields, drawing from ``rng`` (required then).
    Raises :class:`EncodingError` for a trace without exactly one root, with orphans or duplicate ids, or an
    include edge the trace does not have.
    """
    options = options or ConditionOptions()
    if options.random and rng is None:
        raise ValueError("shuffle or drop_prob needs an rng (random.Random) so the result is reproducible")
    instructions = instructions or Instructions()
    root = _build_tree(trace)

    # For each include, the nodes whose subtree holds a matching edge (the edge's parent at or below them).
    holders: list[set[int]] = []
    for inc in instructions.includes:
        held: set[int] = set()
        for node in reversed(_bfs(root)):  # children before parents
            s = node.span
            if any(id(k) in held for k in node.kids) or any(inc.matches(s.service, s.name, _call(k, 0, 0)) for k in node.kids):
                held.add(id(node))
        holders.append(held)

    def subs_for(parent: _Node | None, kids: list[_Node], high: bool, incs: tuple[Include, ...]) -> list[Sub]:
        given: list[list[Include]] = [[] for _ in kids]
        for inc in incs:
            if parent is not None and any(inc.matches(parent.span.service, parent.span.name, _call(k, 0, 0)) for k in kids):
                continue  # met in this layer
            held = holders[instructions.includes.index(inc)]
            carrier = next((i for i, k in enumerate(kids) if id(k) in held), None)
            if carrier is None:
                raise EncodingError(f"include {inc.src} -> {inc.dst} ({inc.kind}) does not occur in the trace")
            given[carrier].append(inc)
        return [Sub(i, k.size - 1, k.depth - 1, high and k.size > 1, tuple(given[i])) for i, k in enumerate(kids)]

    high, incs = instructions.high_latency, tuple(instructions.includes)
    client = Conditions(client=True, calls=root.size, depth=root.depth, budget=root.qe - root.qs, start=0,
                        high_latency=high, includes=incs)  # fmt: skip
    steps = [
        Step(
            _apply_options(client, options, rng),
            (_call(root, 0, root.qs),),
            Book(1, root.size, root.depth),
            tuple(subs_for(None, [root], high, incs)),
        )
    ]
    # (node, path of its ancestors, its sub-conditions)
    queue: deque[tuple[_Node, tuple[tuple[str, str], ...], Sub]] = deque([(root, (), steps[0].subs[0])])
    while queue:
        node, path, sub = queue.popleft()
        if not node.kids:
            continue
        s = node.span
        conds = Conditions(path=path, service=s.service, operation=s.name, calls=node.size - 1,
                           depth=node.depth - 1, budget=node.qe - node.qs, start=node.qs,
                           high_latency=sub.high_latency, includes=sub.includes)  # fmt: skip
        subs = subs_for(node, node.kids, sub.high_latency, sub.includes)
        calls = tuple(_call(k, i, node.qs) for i, k in enumerate(node.kids))
        steps.append(Step(_apply_options(conds, options, rng), calls, Book(len(calls), node.size - 1, node.depth - 1), tuple(subs)))
        kid_path = path + ((s.service, s.name),)
        queue.extend((k, kid_path, subs[i]) for i, k in enumerate(node.kids))
    return steps


def trace_to_text(
    trace: Trace,
    *,
    instructions: Instructions | None = None,
    options: ConditionOptions | None = None,
    rng: random.Random | None = None,
) -> str:
    """The encoded trace, one step per line. With default options it is a function of the modeled fields
    only, so equal texts mean traces identical in everything the model sees."""
    return "\n".join(s.text() for s in encode_trace(trace, instructions=instructions, options=options, rng=rng))


def next_conditions(step: Step, index: int) -> Conditions:
    """The full conditions of the step of child ``index`` of ``step``, as far as ``step`` states them
    (what the sampler prompts with after generating a layer). Fields ``step`` lacks stay ``None``."""
    c, call, sub = step.conditions, step.calls[index], step.subs[index]
    if sub.calls == 0:
        raise EncodingError(f"child {index} has calls=0 and so no step")
    if c.client:
        path: tuple[tuple[str, str], ...] | None = ()
        start: int | None = call.start
    else:
        path = None if c.path is None or c.service is None or c.operation is None else c.path + ((c.service, c.operation),)
        start = None if c.start is None else c.start + call.start
    return Conditions(path=path, service=call.service, operation=call.operation, calls=sub.calls, depth=sub.depth,
                      budget=call.duration, start=start, high_latency=sub.high_latency, includes=sub.includes)  # fmt: skip


def derive_instructions(
    trace: Trace,
    high_latency_threshold_us: float | None = None,
    uncommon_edges: Iterable[tuple[str, str, SpanKind | str]] | None = None,
    *,
    rng: random.Random | None = None,
) -> Instructions:
    """Instructions a real trace satisfies, for instruction tuning.

    ``high_latency`` when :func:`trace_latency_us` exceeds the threshold (the caller's corpus p90). An include
    for one edge (parent service, child service, child kind) of the trace found in ``uncommon_edges``: the
    first in encoding order, or a random one of them when ``rng`` is given.
    """
    root = _build_tree(trace)
    high = high_latency_threshold_us is not None and (root.qe - root.qs) > high_latency_threshold_us
    found = _calls_among(root, uncommon_edges) if uncommon_edges is not None else []
    includes: tuple[Include, ...] = ()
    if found:
        a, b, k = rng.choice(found) if rng is not None else found[0]
        includes = (Include(a, b, k),)
    return Instructions(high, includes)


def calls_among(trace: Trace, edges: Iterable[tuple[str, str, SpanKind | str]]) -> list[tuple[str, str, SpanKind]]:
    """The (parent service, child service, child kind) calls of ``trace`` that are in ``edges``, each once, in
    encoding order: the candidates :func:`derive_instructions` picks an include from."""
    return _calls_among(_build_tree(trace), edges)


def _calls_among(root: _Node, edges: Iterable[tuple[str, str, SpanKind | str]]) -> list[tuple[str, str, SpanKind]]:
    wanted = {(a, b, k if isinstance(k, SpanKind) else _enum(SpanKind, k, "uncommon_edges")) for a, b, k in edges}
    found: list[tuple[str, str, SpanKind]] = []
    for node in _bfs(root):
        for k in node.kids:
            e = (node.span.service, k.span.service, k.span.kind)
            if e in wanted and e not in found:
                found.append(e)
    return found


# --- decoding -------------------------------------------------------------------------------------------------


def _as_steps(steps_or_text: str | Sequence[Step] | Sequence[str]) -> list[Step]:
    if isinstance(steps_or_text, str):
        return parse_steps(steps_or_text)
    out = []
    for k, s in enumerate(steps_or_text):
        try:
            out.append(parse_step(s) if isinstance(s, str) else s)
        except EncodingError as e:
            raise e.at_step(k) from None
    return out


def _expect(c: Conditions, want: Conditions) -> None:
    """Fields present in ``c`` must equal ``want`` (full); instructions are never dropped, so they must match."""
    if c.client:
        raise EncodingError("<client> on a step that is not the first")
    for name, got, exp in (
        ("svc", c.service, want.service), ("op", c.operation, want.operation), ("calls", c.calls, want.calls),
        ("depth", c.depth, want.depth), ("budget", c.budget, want.budget), ("start", c.start, want.start),
    ):  # fmt: skip
        if got is not None and got != exp:
            raise EncodingError(f"conditions say {name}={got!r} but the parent step gives {exp!r}")
    if c.path is not None:
        full = want.path or ()
        if len(c.path) > len(full) or (c.path != full[len(full) - len(c.path) :]) or (not c.path and full):
            raise EncodingError(f"<path> does not end the ancestors {full}")
    if c.high_latency != want.high_latency or c.includes != want.includes:
        raise EncodingError("instructions differ from the parent step's <sub>")


def _new_ids(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        v = rng.getrandbits(64)
        h = f"{v:016x}"
        if v and h not in taken:
            taken.add(h)
            ids.append(h)
    # Sorted, so Trace.children breaks equal (start, end) ties in layer order.
    return sorted(ids)


def decode_trace(
    steps_or_text: str | Sequence[Step] | Sequence[str],
    *,
    trace_id: str | None = None,
    start_ns: int = 0,
    id_seed: int = 0,
) -> Trace:
    """Rebuild a canonical trace from steps (or their text), validating as it goes.

    Steps must come in encoding order (the client step, then breadth-first over spans with ``calls>0``). Each
    step must agree with itself (:func:`check_step`) and with the ``<sub>`` and call its parent step wrote for
    it; condition fields that were dropped are not checked. The root starts at ``start_ns`` (plus its offset);
    every other span at its parent's start + offset µs. Ids are fresh lower-case hex from
    ``random.Random(id_seed)``; a layer's ids ascend in layer order. Raises :class:`EncodingError` naming the
    step.
    """
    steps = _as_steps(steps_or_text)
    if not steps:
        raise EncodingError("no steps")
    rng = random.Random(id_seed)
    taken: set[str] = set()
    if trace_id is None:
        trace_id = f"{rng.getrandbits(128) or 1:032x}"
    spans: list[Span] = []

    def emit(parent_id: str | None, parent_us: int, step: Step) -> list[tuple[str, int]]:
        ids = _new_ids(rng, len(step.calls), taken)
        out = []
        for sid, call in zip(ids, step.calls):
            us = parent_us + call.start
            spans.append(Span(trace_id, sid, parent_id, call.service, call.operation, start_ns + us * NS_PER_US,
                              start_ns + (us + call.duration) * NS_PER_US, call.kind, Status(call.status),
                              dict(call.attributes)))  # fmt: skip
            out.append((sid, us))
        return out

    first = steps[0]
    if not first.conditions.client:
        raise EncodingError("the first step must be the client's (<client> in its conditions)", 0)
    try:
        want = Conditions(client=True, calls=first.book.calls, depth=first.book.depth,
                          budget=first.calls[0].duration, start=0)  # fmt: skip
        for name in ("budget", "start"):
            got = getattr(first.conditions, name)
            if got is not None and got != getattr(want, name):
                raise EncodingError(f"conditions say {name}={got} but the root call gives {getattr(want, name)}")
        check_step(first)
    except EncodingError as e:
        raise e.at_step(0) from None
    # Pending child steps: (expected conditions, the child's span id, its start in µs after the trace start)
    pending: deque[tuple[Conditions, str, int]] = deque()

    def enqueue(step: Step, placed: list[tuple[str, int]]) -> None:
        for i, (sid, us) in enumerate(placed):
            if step.subs[i].calls:
                pending.append((next_conditions(step, i), sid, us))

    root_placed = emit(None, 0, first)
    enqueue(first, root_placed)
    for k, step in enumerate(steps[1:], start=1):
        if not pending:
            raise EncodingError(f"extra step: every promised subtree already has its step ({len(steps)} given)", k)
        want, parent_id, parent_us = pending.popleft()
        try:
            _expect(step.conditions, want)
            if step.book.calls != want.calls or step.book.depth != want.depth:
                raise EncodingError(
                    f"<book> counts calls={step.book.calls} depth={step.book.depth} but the parent's <sub> "
                    f"promised calls={want.calls} depth={want.depth}"
                )
        except EncodingError as e:
            raise e.at_step(k) from None
        # The full path for this step's children: keep our own record, the text's may be capped or dropped.
        full = replace(step, conditions=replace(want, order=None))
        placed = emit(parent_id, parent_us, step)
        enqueue(full, placed)
    if pending:
        want = pending[0][0]
        raise EncodingError(
            f"{len(pending)} promised subtrees have no step (next: {want.service} {want.operation} calls={want.calls})",
            len(steps),
        )
    return Trace(spans, trace_id)


# --- infill ---------------------------------------------------------------------------------------------------


def _quantizer(anchor_ns: int):
    return lambda t: (t - anchor_ns) // NS_PER_US


def _rel_call(s: Span, origin_ns: int, anchor_ns: int, index: int | None) -> Call:
    """A span's call with times floored to µs from ``anchor_ns`` and counted from ``origin_ns`` (the same
    arithmetic as the trace encoding when the anchor is the root's start)."""
    q = _quantizer(anchor_ns)
    return Call(index, s.service, s.name, s.kind, q(s.start_ns) - q(origin_ns), q(s.end_ns) - q(s.start_ns), s.status.code)


def _layer_order(spans: Sequence[Span], anchor_ns: int) -> list[Span]:
    # Encoded start order; stable, so spans tied in every encoded field keep the caller's order.
    q = _quantizer(anchor_ns)
    return sorted(spans, key=lambda s: (q(s.start_ns), q(s.end_ns), s.service, s.name, int(s.kind), int(s.status.code)))


def _infill_conditions(parent: Span | None, ancestors: Sequence[Span], anchor_ns: int, max_path: int | None) -> Conditions:
    if parent is None:
        return Conditions(client=True)
    q = _quantizer(anchor_ns)
    c = Conditions(path=tuple((a.service, a.name) for a in ancestors), service=parent.service,
                   operation=parent.name, budget=q(parent.end_ns) - q(parent.start_ns))  # fmt: skip
    return _apply_options(c, ConditionOptions(max_path=max_path), None)


def span_infill_prompt(
    parent: Span | None,
    siblings: Sequence[Span],
    index: int,
    kids: Sequence[Span],
    *,
    ancestors: Sequence[Span] = (),
    anchor_ns: int | None = None,
    max_path: int | None = None,
) -> InfillExample:
    """The prompt for writing a missing span (``target`` is empty): its parent's step with the missing call
    at ``index`` as ``<call> index <mask>``, then ``<kids>`` and the missing span's known children.

    ``parent`` None means the missing span is the root (its parent is the virtual client). Offsets count from
    the parent's start, or for a missing root from its earliest child's start (``origin_ns`` of the result),
    so the children's offsets bound the missing span's window in the same frame as the layer. Times are
    floored to µs from ``anchor_ns`` (default: the origin; the trace encoding uses the root's start).
    Conditions carry the parent's path, service, operation and budget only: a partial trace's counts are
    not known.
    """
    if parent is not None:
        origin = parent.start_ns
    else:
        origin = min((k.start_ns for k in kids), default=0)
    anchor = origin if anchor_ns is None else anchor_ns
    sibs = _layer_order(siblings, anchor)
    if not 0 <= index <= len(sibs):
        raise EncodingError(f"mask index {index} outside a layer of {len(sibs) + 1}")
    parts = [_infill_conditions(parent, ancestors, anchor, max_path).text(), "<layer>"]
    for i in range(len(sibs) + 1):
        if i == index:
            parts.append(f"<call> {i} <mask>")
        else:
            parts.append(_rel_call(sibs[i - (i > index)], origin, anchor, i).text())
    parts.append("<kids>")
    parts += [_rel_call(k, origin, anchor, i).text() for i, k in enumerate(_layer_order(kids, anchor))]
    parts.append("<infill>")
    return InfillExample(" ".join(parts), "", origin)


def _locate(trace: Trace, span: Span | str) -> tuple[_Node, _Node]:
    root = _build_tree(trace)
    sid = span if isinstance(span, str) else span.span_id
    for n in _bfs(root):
        if n.span.span_id == sid:
            return root, n
    raise EncodingError(f"span {sid} is not in the trace")


def _ancestors(node: _Node) -> list[Span]:
    out = []
    p = node.parent
    while p is not None:
        out.append(p.span)
        p = p.parent
    return out[::-1]


def encode_span_infill(trace: Trace, span: Span | str, *, max_path: int | None = None) -> InfillExample:
    """A span-infill training example: :func:`span_infill_prompt` for ``span`` masked in its parent's layer,
    and the target ``svc=... op=... kind=... start=... dur=... status=... <end>``.

    For a span with a parent, times are anchored at the root's start, so the prompt's layer is the encoded
    step's layer (same numbers, same order) with one call masked. For the root, at the earliest child.
    """
    root, node = _locate(trace, span)
    parent = node.parent
    if parent is None:
        kids = [k.span for k in node.kids]
        ex = span_infill_prompt(None, [], 0, kids, max_path=max_path)
        anchor = ex.origin_ns
    else:
        index = parent.kids.index(node)
        siblings = [k.span for k in parent.kids if k is not node]
        anchor = root.span.start_ns
        ex = span_infill_prompt(parent.span, siblings, index, [k.span for k in node.kids],
                                ancestors=_ancestors(parent), anchor_ns=anchor, max_path=max_path)  # fmt: skip
    return replace(ex, target=_rel_call(node.span, ex.origin_ns, anchor, None).fields_text() + " <end>")


def attribute_infill_prompt(
    span: Span,
    key: str,
    attribute_keys: Sequence[str],
    *,
    parent: Span | None = None,
    ancestors: Sequence[Span] = (),
    index: int = 0,
    anchor_ns: int | None = None,
    max_path: int | None = None,
) -> InfillExample:
    """The prompt for a missing attribute value (``target`` is empty): the parent's conditions, then the
    span's call line with its attributes among ``attribute_keys`` (in that order; ``key`` appended if not
    there) and ``key``'s value written ``<mask>``. Offsets count from the parent's start (the span's own for
    a root), floored to µs from ``anchor_ns`` (default: that origin). Attributes whose values are not
    scalars are left out."""
    origin = parent.start_ns if parent is not None else span.start_ns
    anchor = origin if anchor_ns is None else anchor_ns
    keys = list(dict.fromkeys(attribute_keys))
    if key not in keys:
        keys.append(key)
    call = _rel_call(span, origin, anchor, index)
    parts = [_infill_conditions(parent, ancestors, anchor, max_path).text(), "<layer>", call.text()]
    for k in keys:
        if k == key:
            parts.append(f"<attr> {render_str(k)} <mask>")
        elif k in span.attributes and isinstance(span.attributes[k], (str, bool, int, float)):
            parts.append(f"<attr> {render_str(k)} {render_value(span.attributes[k])}")  # type: ignore[arg-type]
    parts.append("<infill>")
    return InfillExample(" ".join(parts), "", origin)


def encode_attribute_infill(
    trace: Trace, span: Span | str, key: str, attribute_keys: Sequence[str], *, max_path: int | None = None
) -> InfillExample:
    """An attribute-infill training example: :func:`attribute_infill_prompt` (anchored at the root's start,
    the call numbered by its place in the encoded layer) and the target ``<value> <end>``."""
    root, node = _locate(trace, span)
    s = node.span
    if key not in s.attributes:
        raise EncodingError(f"span {s.span_id} has no attribute {key!r}")
    value = s.attributes[key]
    if not isinstance(value, (str, bool, int, float)):
        raise EncodingError(f"attribute {key!r} is a {type(value).__name__}; only scalars can be infilled")
    parent = node.parent
    ex = attribute_infill_prompt(
        s, key, attribute_keys, parent=parent.span if parent else None,
        ancestors=_ancestors(parent) if parent else (), index=parent.kids.index(node) if parent else 0,
        anchor_ns=root.span.start_ns, max_path=max_path,
    )  # fmt: skip
    return replace(ex, target=render_value(value) + " <end>")


def _strip_end(xs: list[Lexeme]) -> list[Lexeme]:
    if xs and xs[-1].kind == "mark" and xs[-1].value == "end":
        return xs[:-1]
    return xs


def decode_call(text: str) -> Call:
    """A call from ``[<call> i] svc=... op=... kind=... start=... dur=... status=... [<attr> k v]... [<end>]``
    (a span-infill target, or a layer's call line). ``index`` is None when the text has none."""
    cur = _Cursor(_strip_end(lex(text)))
    index = None
    if cur.at_mark("call"):
        cur.i += 1
        index = cur.value("int", "<call> index")
    call = _parse_call_fields(cur, index)
    if cur.peek() is not None:
        raise EncodingError(f"text continues after the call: {_render_lexeme(cur.peek())!r}")  # type: ignore[arg-type]
    return call


def decode_attribute_value(text: str) -> AttrScalar:
    """The typed value of an attribute-infill target (``"GET"`` -> str, ``200`` -> int, ``0.5`` -> float,
    ``true`` -> bool), with or without a trailing ``<end>``."""
    xs = _strip_end(lex(text))
    if len(xs) != 1:
        raise EncodingError(f"expected one value, found {len(xs)} items")
    return _parse_value(_Cursor(xs), "attribute value")
