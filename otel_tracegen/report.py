"""What reading and cleaning found: problems (with where and why), drops and repairs counted by reason.

Adapters never raise on one bad record: they add a :class:`Problem` naming the file, line or trace and the
reason, count what was dropped, and keep everything else. Missing files and unknown formats are user mistakes
and raise :class:`UserError`, which the CLI prints as one line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class UserError(Exception):
    """A mistake the user can fix (missing file, unknown format, bad option): printed without a traceback."""


@dataclass(frozen=True)
class Problem:
    """One malformed record. ``where`` is ``file``, ``file:line`` or ``file: trace <id>``."""

    where: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class ReadReport:
    """Accumulates problems and counters across every file of one read (or build)."""

    problems: list[Problem] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> spans or rows dropped; "traces: …" reasons count traces
    repaired: Counter = field(default_factory=Counter)  # reason -> records repaired and kept
    counts: Counter = field(default_factory=Counter)  # anything else worth reporting (rows read, files read)
    max_problems: int = 1000  # keep memory bounded on very dirty input; counters stay exact

    def problem(self, where: str, reason: str, detail: str = "", *, dropped: int = 1) -> None:
        """Record a malformed record that was dropped (``dropped`` spans/rows, by ``reason``)."""
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(where, reason, detail))
        if dropped:
            self.dropped[reason] += dropped

    def repair(self, reason: str, n: int = 1) -> None:
        self.repaired[reason] += n

    def merge(self, other: "ReadReport") -> None:
        self.problems.extend(other.problems[: max(0, self.max_problems - len(self.problems))])
        self.dropped.update(other.dropped)
        self.repaired.update(other.repaired)
        self.counts.update(other.counts)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def problem_lines(self, shown: int = 20) -> list[str]:
        """The first ``shown`` problems as ``problem: WHERE: WHY`` lines, and how many more there are."""
        lines = [f"problem: {p}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"… and {len(self.problems) - shown} more problems")
        return lines

    def summary_lines(self) -> list[str]:
        lines = []
        for title, counter in (("dropped", self.dropped), ("repaired", self.repaired)):
            for reason, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"{title}: {reason}: {n}")
        return lines
