"""Time windows: ``START..END`` on the command line, and the traces that start inside one.

A trace belongs to a window by its start (its earliest span), as an SRE reads a Jaeger search: "the traces that
began in these two minutes". Times are absolute (ISO 8601 or Unix epoch) so that a window means the same thing
whatever files it is applied to.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..report import UserError
from ..trace import Trace

_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)$")
_UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}


@dataclass(frozen=True)
class TimeWindow:
    """``[start_ns, end_ns)`` in Unix nanoseconds."""

    start_ns: int
    end_ns: int

    def __contains__(self, t_ns: int) -> bool:
        return self.start_ns <= t_ns < self.end_ns

    def select(self, traces: Iterable[Trace]) -> list[Trace]:
        """The traces that start inside the window."""
        return [t for t in traces if len(t) and t.start_ns in self]

    def text(self) -> str:
        return f"{format_time(self.start_ns)}..{format_time(self.end_ns)}"

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def format_time(t_ns: int) -> str:
    """ISO 8601 in UTC, to the millisecond."""
    t = _dt.datetime.fromtimestamp(t_ns / 1e9, tz=_dt.timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> int:
    """An instant as Unix nanoseconds: ISO 8601 (``2023-01-29T08:43:04Z``; no zone means UTC) or an epoch number,
    whose unit is read from its size (seconds, milliseconds, microseconds or nanoseconds)."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        value = float(s)
        digits = len(s.split(".")[0])
        scale = 1e9 if digits <= 11 else 1e6 if digits <= 14 else 1e3 if digits <= 17 else 1.0
        return int(round(value * scale)) if "." in s or scale != 1.0 else int(s)
    try:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"not a time: {text!r} (give ISO 8601 such as 2023-01-29T08:43:04Z, or Unix epoch seconds)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1_000


def parse_window(text: str) -> TimeWindow:
    """``START..END``; END may be relative to START (``+2m``, ``+90s``, ``+500ms``)."""
    start_text, sep, end_text = text.partition("..")
    if not sep or not start_text.strip() or not end_text.strip():
        raise UserError(f"not a window: {text!r} (expected START..END, e.g. 2023-01-29T08:43:04Z..+2m)")
    start = parse_time(start_text)
    m = _RELATIVE.match(end_text.strip())
    if not m and end_text.strip().startswith(("+", "-")):
        raise UserError(f"not a relative end: {end_text.strip()!r} (expected +N with a unit: ns, us, ms, s, m or h, "
                        f"e.g. +2m)")  # fmt: skip
    end = start + int(float(m.group(1)) * _UNIT_NS[m.group(2)]) if m else parse_time(end_text)
    if end == start:
        raise UserError(f"window {text!r} is empty")
    if end < start:
        raise UserError(f"window {text!r} ends before it starts")
    return TimeWindow(start, end)


def parse_duration_s(text: str) -> float:
    """Seconds from ``120``, ``90s``, ``5m``, ``1h`` or ``inf``; ValueError (naming the text) otherwise or when not > 0."""
    t = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 30, 30s, 5m, 1h)") from None
    if not value > 0:
        raise ValueError(f"must be > 0, got {text!r}")
    return value


def outside(traces: Sequence[Trace], windows: Sequence[TimeWindow]) -> list[Trace]:
    """The traces that start in none of ``windows`` (the default baseline: everything else in the input)."""
    return [t for t in traces if len(t) and not any(t.start_ns in w for w in windows)]
