"""What a generate or replay run says about itself: a closing summary and, on long runs, a periodic line.

Both stay one readable line with hundreds of entry services (a model of Alibaba traces has 100): the top few
entries with their shares, and how many more there are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .sender import SendCounts

TOP_ENTRIES = 5


def top_counts(counts: Mapping[str, int | float], shown: int = TOP_ENTRIES, *, share: bool = True) -> str:
    """``a 62 %, b 30 % and 14 more`` (``share``) or ``a 120, b 40 and 14 more``."""
    total = sum(counts.values()) or 1
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    top = ", ".join(f"{name} {100 * n / total:.1f} %" if share else f"{name} {n:,}" for name, n in items[:shown])
    rest = len(items) - shown
    return top + (f" and {rest} more" if rest > 0 else "")


@dataclass
class ReplaySummary:
    """One replay run, as :func:`otel_tracegen.replay` returns it and the CLI prints it."""

    traces: int = 0  # handed to the output (OTLP sender or file)
    spans: int = 0
    seconds: float = 0.0  # from the first arrival to the last batch handed over
    requested_traces_per_s: float = 0.0  # the shape's mean over the run (0: as fast as possible)
    requested_spans_per_s: float = 0.0
    lag_s: float = 0.0  # how far behind schedule the last batch went out
    max_lag_s: float = 0.0
    flagged: int = 0  # replayed traces the validator flags (captured as they were)
    by_entry: Counter = field(default_factory=Counter)
    sent: SendCounts | None = None  # None: no OTLP output
    library: str = ""  # the library's content hash
    library_traces: int = 0
    library_flagged: int = 0
    processes: int = 1
    shape: str = ""
    note: str | None = None  # why the native sender was not used, when it was asked for
    seed: int | None = None  # what --seed repeats this run's ids and draws

    @property
    def traces_per_s(self) -> float:
        return self.traces / self.seconds if self.seconds > 0 else 0.0

    @property
    def spans_per_s(self) -> float:
        return self.spans / self.seconds if self.seconds > 0 else 0.0

    @property
    def delivered(self) -> bool:
        """Every span handed to OTLP arrived (True without OTLP output)."""
        return self.sent is None or (self.sent.failed_spans == 0 and self.sent.sent_spans == self.spans)

    def merge(self, other: ReplaySummary) -> None:
        """Add another process's part of the same run."""
        self.traces += other.traces
        self.spans += other.spans
        self.seconds = max(self.seconds, other.seconds)
        self.lag_s = max(self.lag_s, other.lag_s)
        self.max_lag_s = max(self.max_lag_s, other.max_lag_s)
        self.flagged += other.flagged
        self.by_entry.update(other.by_entry)
        if other.sent is not None:
            if self.sent is None:
                self.sent = SendCounts()
            self.sent.sent_spans += other.sent.sent_spans
            self.sent.failed_spans += other.sent.failed_spans
            self.sent.failed_batches += other.sent.failed_batches
            self.sent.first_error = self.sent.first_error or other.sent.first_error

    def rate_text(self) -> str:
        got = f"{self.traces_per_s:,.0f} traces/s, {self.spans_per_s:,.0f} spans/s"
        if not self.requested_traces_per_s:
            return got + " (as fast as possible)"
        ratio = self.traces_per_s / self.requested_traces_per_s
        return (f"{got} (asked {self.requested_traces_per_s:,.0f} traces/s, {self.requested_spans_per_s:,.0f} "
                f"spans/s: {100 * ratio:.1f} %)")

    def line(self) -> str:
        return (f"replayed {self.traces:,} traces, {self.spans:,} spans in {self.seconds:.1f} s: {self.rate_text()}; "
                f"lag {1e3 * self.lag_s:,.0f} ms at the end, {1e3 * self.max_lag_s:,.0f} ms at most"
                + (f"; {self.processes} processes" if self.processes > 1 else ""))

    def lines(self) -> list[str]:
        out = [self.line()]
        out.append(f"entries: {top_counts(self.by_entry)}; seed {self.seed} (--seed {self.seed} repeats the ids and "
                   "draws)")
        out.append(f"library {self.library}: {self.library_traces:,} traces, {self.library_flagged:,} flagged by the "
                   f"validator (replayed as captured; --only-valid leaves them out); {self.flagged:,} of the replayed "
                   f"traces are such")
        if self.sent is not None:
            s = self.sent
            out.append(f"OTLP: {s.sent_spans:,} spans delivered, {s.failed_spans:,} failed"
                       + (f" in {s.failed_batches} batches" if s.failed_batches else "")
                       + (f" ({s.first_error})" if s.first_error else ""))  # fmt: skip
        return out

    def progress_line(self) -> str:
        """The periodic line of a long run."""
        sent = "" if self.sent is None else f", {self.sent.sent_spans:,} delivered, {self.sent.failed_spans:,} failed"
        return (f"replay: {self.seconds:,.0f} s: {self.traces:,} traces, {self.spans:,} spans{sent}; "
                f"{self.rate_text()}; lag {1e3 * self.lag_s:,.0f} ms"
                + (f" (send error: {self.sent.first_error})" if self.sent is not None and self.sent.first_error
                   else ""))  # fmt: skip

    def as_dict(self) -> dict:
        return {"traces": self.traces, "spans": self.spans, "seconds": round(self.seconds, 3),
                "traces_per_s": self.traces_per_s, "spans_per_s": self.spans_per_s,
                "requested_traces_per_s": self.requested_traces_per_s,
                "requested_spans_per_s": self.requested_spans_per_s, "lag_s": self.lag_s, "max_lag_s": self.max_lag_s,
                "flagged": self.flagged, "by_entry": dict(self.by_entry), "library": self.library,
                "library_traces": self.library_traces, "library_flagged": self.library_flagged,
                "processes": self.processes, "shape": self.shape, "seed": self.seed,
                "sent_spans": None if self.sent is None else self.sent.sent_spans,
                "failed_spans": None if self.sent is None else self.sent.failed_spans,
                "first_error": None if self.sent is None else self.sent.first_error}  # fmt: skip
