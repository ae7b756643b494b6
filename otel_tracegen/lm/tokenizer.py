"""A domain tokenizer over the encoding's lexemes (:func:`otel_tracegen.encoding.lex`).

Tokens, in id order:

- special: ``<pad>`` ``<bos>`` ``<eos>`` ``<unk>`` (ids 0-3);
- every marker of the encoding (``<cond>``, ``<layer>``, ``<call>``, ... from :data:`encoding.MARKERS`);
- every key (``svc=``, ``op=``, ... from :data:`encoding.KEYS`);
- number pieces: digits ``0``-``9``, ``-`` (a sign, and the ``-`` of bookkeeping arithmetic), ``=`` (the
  arithmetic's ``=``), ``.``, ``e``, ``+``, ``inf``, ``nan``; numbers are written character by character;
- ``true`` ``false``;
- one token per string value: every span kind and status name, then every string (service, operation,
  attribute key or value) seen at least ``min_count`` times in the texts given to :meth:`TraceTokenizer.build`,
  most frequent first. In ``vocab.json`` a string value's token is its JSON-quoted form (``"\\"ts-route-service\\""``),
  so it can never collide with a marker, key or number piece.

A string the vocabulary lacks becomes ``<unk>``; its value goes to :attr:`Encoded.unknown`, outside the model,
and :meth:`TraceTokenizer.decode` puts it back, so ``decode(*encode(text)) == text`` for canonical text.

Pure Python, no torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from .. import encoding as enc
from ..trace import SpanKind, StatusCode

TOKENIZER_VERSION = 1
TOKENIZER_CLASS = "TraceTokenizer"
CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.json"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
MARKER_TOKENS: tuple[str, ...] = tuple(f"<{m}>" for m in enc.MARKERS)
KEY_TOKENS: tuple[str, ...] = tuple(f"{k}=" for k in enc.KEYS)
DIGITS: tuple[str, ...] = tuple("0123456789")
NUMBER_TOKENS: tuple[str, ...] = DIGITS + ("-", "=", ".", "e", "+", "inf", "nan")
BOOL_TOKENS: tuple[str, ...] = ("true", "false")
ENUM_STRINGS: tuple[str, ...] = tuple(k.name for k in SpanKind) + tuple(s.name for s in StatusCode)
BASE_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + MARKER_TOKENS + KEY_TOKENS + NUMBER_TOKENS + BOOL_TOKENS

assert len(set(BASE_TOKENS)) == len(BASE_TOKENS), "token names collide"
assert not set(SPECIAL_TOKENS) & set(MARKER_TOKENS), "a special token is also an encoding marker"

# Float text (repr, 'inf', 'nan') split into number tokens.
_FLOAT_PIECES = re.compile(r"inf|nan|[0-9.e+\-]")
# Canonical text splits into whitespace-separated chunks (a quoted string may hold spaces); each chunk lexes on
# its own exactly as inside the whole text, so chunk -> ids can be cached.
_CHUNKS = re.compile(r'([ \t\r\n]+)|((?:[^ \t\r\n"]|"(?:[^"\\\x00-\x1f]|\\.)*")+)')
_CHUNK = re.compile(r'(?:[^ \t\r\n"]|"(?:[^"\\\x00-\x1f]|\\.)*")+')
_KEY_INT = re.compile(r"([a-z_]+)=(-?[0-9]+)")
_CACHE_LIMIT = 1 << 18  # chunks (~300 bytes each)


def _split(text: str, known: dict | frozenset = frozenset()) -> list[str]:
    """Whitespace-delimited chunks of ``text`` (a quoted string may hold spaces; empty chunks may appear), each of
    which lexes on its own as inside the whole text. ``known`` chunks are trusted without a check. Raises
    EncodingError (naming the position) for text that does not lex."""
    if "\t" not in text and "\r" not in text:
        pieces = text.replace("\n", " ").split(" ")
        if '"' not in text:
            return pieces
        out: list[str] = []
        i, n = 0, len(pieces)
        while i < n:
            p = pieces[i]
            i += 1
            if '"' in p and p not in known and not _CHUNK.fullmatch(p):
                while i < n and not _CHUNK.fullmatch(p):  # a quoted string with spaces: join its pieces
                    p += " " + pieces[i]
                    i += 1
                if not _CHUNK.fullmatch(p):
                    break
            out.append(p)
        else:
            return out
    items = _CHUNKS.findall(text)
    if sum(len(a) + len(b) for a, b in items) != len(text):
        enc.lex(text)  # names the position of the problem
        raise enc.EncodingError("cannot read this text")  # pragma: no cover
    return [b for _, b in items]


def _str_token(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)


class Encoded(NamedTuple):
    """Token ids, and the values of unknown strings (one per ``<unk>`` in ``ids``, in order)."""

    ids: list[int]
    unknown: list[str]


class TraceTokenizer:
    """Tokenizer for encoded trace text. Build one with :meth:`build` or load one with :meth:`from_pretrained`."""

    def __init__(self, vocab: Sequence[str], *, min_count: int = 1):
        """``vocab``: token strings in id order; the base tokens must all be there, the specials at ids 0-3."""
        self.id_to_token: list[str] = list(vocab)
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.id_to_token)}
        self.min_count = min_count
        if len(self.token_to_id) != len(self.id_to_token):
            dup = [t for t, n in Counter(self.id_to_token).items() if n > 1]
            raise ValueError(f"duplicate tokens in the vocabulary: {dup[:5]}")
        for i, t in enumerate(SPECIAL_TOKENS):
            if self.token_to_id.get(t) != i:
                raise ValueError(f"special token {t} must have id {i}, found {self.token_to_id.get(t)}")
        missing = [t for t in BASE_TOKENS if t not in self.token_to_id]
        if missing:
            raise ValueError(f"the vocabulary lacks base tokens {missing[:8]}")
        base = set(BASE_TOKENS)
        self._str_id: dict[str, int] = {}
        for i, t in enumerate(self.id_to_token):
            if t in base:
                continue
            if not t.startswith('"'):
                raise ValueError(f"token {t!r} (id {i}) is neither a base token nor a JSON-quoted string value")
            try:
                value = json.loads(t)
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, str) or _str_token(value) != t:
                raise ValueError(f"token {t!r} (id {i}) is not a canonical JSON string")
            self._str_id[value] = i
        missing_enums = [s for s in ENUM_STRINGS if s not in self._str_id]
        if missing_enums:
            raise ValueError(f"the vocabulary lacks span kind / status names {missing_enums}")
        self._str_of: dict[int, str] = {i: s for s, i in self._str_id.items()}
        self._mark_id = {m: self.token_to_id[f"<{m}>"] for m in enc.MARKERS}
        self._key_id = {k: self.token_to_id[f"{k}="] for k in enc.KEYS}
        self._num_id = {t: self.token_to_id[t] for t in NUMBER_TOKENS}
        self._true, self._false = self.token_to_id["true"], self.token_to_id["false"]
        self._numeric_ids = frozenset(self._num_id.values())
        self._glue_after = frozenset(self._key_id.values())
        self._chunk_cache: dict[str, tuple[tuple[int, ...], int, tuple[str, ...]]] = {}

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, texts: Iterable[str], *, min_count: int = 1) -> TraceTokenizer:
        """A tokenizer whose string values are those seen ``min_count`` times or more in ``texts``."""
        return cls.from_string_counts(cls.count_strings(texts), min_count=min_count)

    @staticmethod
    def count_strings(texts: Iterable[str]) -> Counter[str]:
        """How often each string value (service, operation, ...) occurs in ``texts``. Counts of parts of a corpus
        add up (``Counter.update``), so they can be taken in parallel and merged for :meth:`from_string_counts`."""
        chunks: Counter[str] = Counter()
        for text in texts:
            chunks.update(_split(text))
        counts: Counter[str] = Counter()
        for chunk, n in chunks.items():
            if chunk and not _KEY_INT.fullmatch(chunk):
                for x in enc.lex(chunk):
                    if x.kind == "str":
                        counts[x.value] += n  # type: ignore[index]
        return counts

    @classmethod
    def from_string_counts(cls, counts: Counter[str], *, min_count: int = 1) -> TraceTokenizer:
        """A tokenizer for the string values counted ``min_count`` times or more (most frequent first)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        enums = set(ENUM_STRINGS)
        strings = sorted(
            (s for s, n in counts.items() if n >= min_count and s not in enums),
            key=lambda s: (-counts[s], s),
        )
        vocab = list(BASE_TOKENS) + [_str_token(s) for s in ENUM_STRINGS] + [_str_token(s) for s in strings]
        return cls(vocab, min_count=min_count)

    # --- ids ----------------------------------------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def mark_id(self, name: str) -> int:
        """The id of marker ``<name>`` (``name`` without brackets)."""
        return self._mark_id[name]

    def key_id(self, name: str) -> int:
        """The id of key ``name=`` (``name`` without ``=``)."""
        return self._key_id[name]

    def str_id(self, value: str) -> int:
        """The id of a string value, ``unk_id`` if the vocabulary lacks it."""
        return self._str_id.get(value, self.unk_id)

    def string_value(self, token_id: int) -> str | None:
        """The string value of a string-value token, None for any other id."""
        return self._str_of.get(token_id)

    def ids_for_kind(self, kind: str) -> list[int]:
        """Ids a constrained sampler allows for one kind of item, sorted.

        ``special``, ``mark``, ``key``, ``str`` (every string value, ``<unk>`` excluded), ``span_kind``,
        ``status``, ``digit``, ``int`` (digits and ``-``), ``float`` (digits, ``-``, ``.``, ``e``, ``+``,
        ``inf``, ``nan``), ``op`` (``-`` and ``=``), ``bool``.
        """
        t = self.token_to_id
        if kind == "special":
            out = [t[x] for x in SPECIAL_TOKENS]
        elif kind == "mark":
            out = list(self._mark_id.values())
        elif kind == "key":
            out = list(self._key_id.values())
        elif kind == "str":
            out = list(self._str_id.values())
        elif kind == "span_kind":
            out = [self._str_id[k.name] for k in SpanKind]
        elif kind == "status":
            out = [self._str_id[s.name] for s in StatusCode]
        elif kind == "digit":
            out = [t[d] for d in DIGITS]
        elif kind == "int":
            out = [t[d] for d in DIGITS] + [t["-"]]
        elif kind == "float":
            out = [t[x] for x in NUMBER_TOKENS if x != "="]
        elif kind == "op":
            out = [t["-"], t["="]]
        elif kind == "bool":
            out = [self._true, self._false]
        else:
            raise ValueError(
                f"unknown kind {kind!r}; choose from special, mark, key, str, span_kind, status, digit, int, float, op, bool"
            )
        return sorted(out)

    # --- encoding -----------------------------------------------------------------------------------------------

    def _lexeme_ids(self, x: enc.Lexeme, ids: list[int], unknown: list[str]) -> None:
        k = x.kind
        if k == "str":
            i = self._str_id.get(x.value)  # type: ignore[arg-type]
            if i is None:
                ids.append(self.unk_id)
                unknown.append(x.value)  # type: ignore[arg-type]
            else:
                ids.append(i)
        elif k == "int":
            ids += [self._num_id[c] for c in str(x.value)]
        elif k == "float":
            ids += [self._num_id[c] for c in _FLOAT_PIECES.findall(enc.render_float(x.value))]  # type: ignore[arg-type]
        elif k == "op":
            ids.append(self._num_id[x.value])  # type: ignore[index]
        elif k == "bool":
            ids.append(self._true if x.value else self._false)
        elif k == "mark":
            i = self._mark_id.get(x.value)  # type: ignore[arg-type]
            if i is None:
                raise enc.EncodingError(f"<{x.value}> is not a marker of the encoding")
            ids.append(i)
        elif k == "key":
            i = self._key_id.get(x.value)  # type: ignore[arg-type]
            if i is None:
                raise enc.EncodingError(f"{x.value}= is not a key of the encoding")
            ids.append(i)
        else:  # pragma: no cover - lex makes no other kinds
            raise enc.EncodingError(f"cannot tokenize a {k} lexeme")

    def _chunk(self, chunk: str) -> tuple[tuple[int, ...], int, tuple[str, ...]]:
        """(ids, flags, unknown values) of one whitespace-delimited chunk; flags: 1 starts with a number, 2 ends
        with one, 4 holds unknown strings. Raises EncodingError for a chunk that does not lex."""
        if m := _KEY_INT.fullmatch(chunk):  # most chunks: key=integer, cheap without lex
            key = self._key_id.get(m[1])
            if key is not None:
                num = self._num_id
                return (key, *[num[c] for c in m[2]]), 2, ()
        ids: list[int] = []
        unknown: list[str] = []
        xs = enc.lex(chunk)
        prev_num = False
        for x in xs:
            num = x.kind in ("int", "float")
            if num and prev_num and not x.glued:
                raise enc.EncodingError("two numbers in a row cannot be told apart in tokens")
            prev_num = num
            self._lexeme_ids(x, ids, unknown)
        flags = (1 if xs and xs[0].kind in ("int", "float") else 0) | (2 if prev_num else 0) | (4 if unknown else 0)
        return tuple(ids), flags, tuple(unknown)

    def encode(self, text: str) -> Encoded:
        """Token ids of encoded text (no ``<bos>``/``<eos>``), and the values of strings the vocabulary lacks.

        Raises :class:`~otel_tracegen.encoding.EncodingError` (a ValueError) for text that does not lex, or holds
        a marker or key the encoding does not have.
        """
        cache = self._chunk_cache
        chunks = _split(text, cache)
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        get = cache.get
        ids: list[int] = []
        unknown: list[str] = []
        prev_num = 0
        try:
            for chunk in chunks:
                got = get(chunk)
                if got is None:
                    if not chunk:
                        continue
                    got = cache[chunk] = self._chunk(chunk)
                ids += got[0]
                f = got[1]
                if f:
                    if f & 1 and prev_num:
                        raise enc.EncodingError("two numbers in a row cannot be told apart in tokens")
                    if f & 4:
                        unknown += got[2]
                    prev_num = f & 2
                else:
                    prev_num = 0
        except enc.EncodingError:
            enc.lex(text)  # a lexing problem: raise it with its position in the whole text
            raise
        return Encoded(ids, unknown)

    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` (for inspection)."""
        return [self.id_to_token[i] for i in self.encode(text).ids]

    # --- decoding -----------------------------------------------------------------------------------------------

    def decode(
        self,
        ids: Iterable[int],
        unknown: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> str:
        """Canonical text from token ids, each ``<unk>`` replaced by the next value of ``unknown``.

        ``<pad>``, ``<bos>`` and ``<eos>`` are skipped (written when ``skip_special_tokens`` is False). An
        ``<unk>`` with no value left is written ``<unk>``. Number pieces are written together, so malformed
        numbers from a free-running model come out as text the encoding's parser will reject.
        """
        parts: list[str] = []
        unk = iter(unknown)
        prev: int | None = None  # previous written id
        n = len(self.id_to_token)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (size {n})")
            if i < 3 and skip_special_tokens:
                continue
            if i in self._numeric_ids:
                piece = self.id_to_token[i]
                glued = prev is not None and (prev in self._glue_after or prev in self._numeric_ids)
            elif i == self.unk_id:
                v = next(unk, None)
                piece = UNK if v is None else enc.render_str(v)
                glued = prev is not None and prev in self._glue_after
            elif i in self._str_of:
                piece = enc.render_str(self._str_of[i])
                glued = prev is not None and prev in self._glue_after
            else:
                piece = self.id_to_token[i]
                glued = prev is not None and prev in self._glue_after and i in (self._true, self._false)
            if parts and not glued:
                parts.append("\n" if i == self._mark_id["cond"] else " ")
            parts.append(piece)
            prev = i
        return "".join(parts)

    # --- persistence --------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer_config.json`` and ``vocab.json`` (token -> id) into ``directory`` (created)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": TOKENIZER_CLASS,
            "otel_tracegen_tokenizer_version": TOKENIZER_VERSION,
            "pad_token": PAD,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "model_max_length": None,
            "min_count": self.min_count,
            "vocab_size": self.vocab_size,
        }
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (d / VOCAB_FILE).write_text(json.dumps(self.token_to_id, indent=2, sort_keys=True, ensure_ascii=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TraceTokenizer:
        """Load what :meth:`save_pretrained` wrote. Raises ValueError naming the file and field when broken."""
        d = Path(directory)

        def read(name: str) -> object:
            p = d / name
            if not p.is_file():
                raise ValueError(f"{p}: missing (not a TraceTokenizer directory?)")
            try:
                return json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None

        config = read(CONFIG_FILE)
        cpath = d / CONFIG_FILE
        if not isinstance(config, dict):
            raise ValueError(f"{cpath}: expected a JSON object")  # noqa: TRY004 - a broken file is a ValueError
        if config.get("tokenizer_class") != TOKENIZER_CLASS:
            raise ValueError(
                f"{cpath}: tokenizer_class is {config.get('tokenizer_class')!r}, expected {TOKENIZER_CLASS!r}"
            )
        version = config.get("otel_tracegen_tokenizer_version")
        if version != TOKENIZER_VERSION:
            raise ValueError(
                f"{cpath}: otel_tracegen_tokenizer_version is {version!r}, this code reads {TOKENIZER_VERSION}"
            )
        for field, want in (
            ("pad_token", PAD),
            ("bos_token", BOS),
            ("eos_token", EOS),
            ("unk_token", UNK),
        ):
            if config.get(field) != want:
                raise ValueError(f"{cpath}: {field} is {config.get(field)!r}, expected {want!r}")
        min_count = config.get("min_count", 1)
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise ValueError(f"{cpath}: min_count must be an integer >= 1, got {min_count!r}")

        vocab = read(VOCAB_FILE)
        vpath = d / VOCAB_FILE
        if not isinstance(vocab, dict):
            raise ValueError(f"{vpath}: expected a JSON object mapping token -> id")  # noqa: TRY004 - a broken file is a ValueError
        for t, i in vocab.items():
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"{vpath}: the id of {t!r} is {i!r}, not an integer")  # noqa: TRY004 - a broken file is a ValueError
        by_id = sorted(vocab.items(), key=lambda ti: ti[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError(f"{vpath}: ids must be 0..{len(by_id) - 1}, each once")
        if "vocab_size" in config and config["vocab_size"] != len(by_id):
            raise ValueError(
                f"{cpath}: vocab_size is {config['vocab_size']!r} but {vpath.name} holds {len(by_id)} tokens"
            )
        try:
            return cls([t for t, _ in by_id], min_count=min_count)
        except ValueError as e:
            raise ValueError(f"{vpath}: {e}") from None

    def __repr__(self) -> str:
        return f"TraceTokenizer(vocab_size={self.vocab_size}, strings={len(self._str_id)})"
