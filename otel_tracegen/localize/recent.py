"""The traces a live pipeline released lately, kept so that an incident can be localized while it happens.

The infill receiver adds every trace it forwards (repaired) when ``localize.keep_s`` > 0, and its HTTP port answers
``GET /localize?window=2m&baseline=10m`` from here: the traces that started in the last two minutes against the
ten before them (see ``docs/localize.md``). Bounded by age and by spans; the oldest go first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Iterable, Sequence

from ..trace import Trace
from .window import TimeWindow


class RecentTraces:
    def __init__(self, keep_s: float, max_spans: int) -> None:
        self.keep_ns = int(keep_s * 1e9)
        self.max_spans = max_spans
        self._traces: deque[tuple[int, Trace]] = deque()  # (when added, wall ns), oldest first
        self._spans = 0
        self._lock = threading.Lock()

    def add(self, traces: Iterable[Trace], now_ns: int | None = None) -> None:
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            for t in traces:
                if len(t):
                    self._traces.append((now, t))
                    self._spans += len(t)
            self._evict(now)

    def _evict(self, now: int) -> None:
        q = self._traces
        while q and (self._spans > self.max_spans or q[0][0] < now - self.keep_ns):
            _, t = q.popleft()
            self._spans -= len(t)

    def select(self, window: TimeWindow, now_ns: int | None = None) -> list[Trace]:
        """Held traces that start in ``window`` (those older than ``keep_s`` are let go first)."""
        with self._lock:
            self._evict(time.time_ns() if now_ns is None else now_ns)
            return [t for _, t in self._traces if t.start_ns in window]

    @property
    def spans(self) -> int:
        return self._spans

    def __len__(self) -> int:
        return len(self._traces)

    def newest_start_ns(self) -> int | None:
        with self._lock:
            return max((t.start_ns for _, t in self._traces), default=None)


def windows_before(end_ns: int, window_s: float, baseline_s: float) -> tuple[TimeWindow, TimeWindow]:
    """The last ``window_s`` before ``end_ns``, and the ``baseline_s`` before that."""
    w = TimeWindow(end_ns - int(window_s * 1e9), end_ns)
    return w, TimeWindow(w.start_ns - int(baseline_s * 1e9), w.start_ns)


def parse_seconds(text: str, what: str) -> float:
    """``120``, ``90s``, ``2m``, ``1h`` as seconds (finite: a window reaches back a definite time)."""
    from ..report import UserError
    from .window import parse_duration_s

    try:
        value = parse_duration_s(text)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    if value == float("inf"):
        raise UserError(f"{what}: must be finite, got {text!r}")
    return value


def localize_recent(recent: RecentTraces, params: dict[str, Sequence[str]], support: int = 5) -> dict:
    """The ``/localize`` answer for query ``params``: ``window`` (a duration, default 2m, or START..END),
    ``baseline`` (a duration before the window, default 10m, or START..END), ``end`` (the window's end: ``now``,
    the default, or ``latest`` for the newest held trace's start, for replayed data), ``top`` (default 5)."""
    from ..report import UserError
    from .profile import Profile
    from .ranking import localize
    from .window import parse_window

    def one(name: str, default: str) -> str:
        return (params.get(name) or [default])[-1]

    end_text = one("end", "now")
    if end_text == "now":
        end = time.time_ns()
    elif end_text == "latest":
        newest = recent.newest_start_ns()
        if newest is None:
            raise UserError("no traces held yet")
        end = newest + 1
    else:
        from .window import parse_time

        end = parse_time(end_text)
    w_text, b_text = one("window", "2m"), one("baseline", "10m")
    if ".." in w_text:
        window = parse_window(w_text)
    else:
        window = windows_before(end, parse_seconds(w_text, "window"), 1.0)[0]
    if ".." in b_text:
        baseline = parse_window(b_text)
    else:
        baseline = TimeWindow(window.start_ns - int(parse_seconds(b_text, "baseline") * 1e9), window.start_ns)
    try:
        top = int(one("top", "5"))
    except ValueError:
        raise UserError(f"top: not a number: {one('top', '5')!r}") from None
    w_traces, b_traces = recent.select(window), recent.select(baseline)
    if not w_traces:
        raise UserError(f"no held trace starts in the window {window.text()} ({len(recent)} traces held)")
    if not b_traces:
        raise UserError(f"no held trace starts in the baseline {baseline.text()} ({len(recent)} traces held)")
    result = localize(Profile.of(w_traces), Profile.of(b_traces), top=top, support=support)
    return {"window": window.text(), "baseline": baseline.text(), "window_traces": result.window_traces,
            "baseline_traces": result.baseline_traces, "services": result.services,
            "suspects": [s.as_dict() for s in result.suspects]}  # fmt: skip
