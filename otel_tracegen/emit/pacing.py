"""When traces start: a traffic shape (traces/s over time) and arrivals drawn from it.

A shape is a rate r(t) in traces/s, t in seconds since the run's anchor, given by its cumulative count
Λ(t) = ∫₀ᵗ r. Arrivals are Λ⁻¹ of a sequence: of 0.5, 1.5, 2.5, … for evenly spaced arrivals, or of the running
sums of unit exponentials for Poisson arrivals (the time-rescaling theorem: a Poisson process of any rate function). One
inverse serves every shape and both kinds. It is taken numerically on a 1 ms grid, where Λ is exact at every
grid point; within a millisecond the rate barely moves.

Shapes: constant, ramp (linear, then held), sine (a mean rate swinging by an amplitude over a period: diurnal
traffic), bursts (a rate for ``on`` seconds, another for ``off`` seconds, repeated) and a schedule of
``(time, rate)`` points joined linearly. A schedule that ends at rate 0 ends the traffic there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..report import UserError

GRID_S = 1e-3  # Λ is tabulated at this step and interpolated between
CHUNK_S = 1.0  # arrivals are drawn a second of schedule at a time


class Shape:
    """A rate over time. Subclasses give :meth:`cumulative` (vectorized) and say where traffic ends, if it does."""

    mean_rate: float  # traces/s over a long run (what --span-rate converts with)
    end_s: float = math.inf  # no arrivals after this

    def cumulative(self, t: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Piecewise(Shape):
    """A rate through ``(time s, rate)`` points, linear between them and held after the last (repeated every
    ``period`` seconds when given, from the first point). Steps are two points at one time."""

    points: list[tuple[float, float]]
    period: float | None = None
    label: str = "schedule"

    def __post_init__(self) -> None:
        pts = sorted(self.points, key=lambda p: p[0])
        if not pts:
            raise UserError("a rate schedule needs at least one (time, rate) point")
        if pts[0][0] > 0:
            pts.insert(0, (0.0, pts[0][1]))
        for t, r in pts:
            if not (math.isfinite(t) and t >= 0 and math.isfinite(r) and r >= 0):
                raise UserError(f"rate schedule point ({t}, {r}): times and rates must be finite and >= 0")
        self.t = np.array([p[0] for p in pts], dtype=np.float64)
        self.r = np.array([p[1] for p in pts], dtype=np.float64)
        dt = np.diff(self.t)
        self.c = np.concatenate([[0.0], np.cumsum(dt * (self.r[:-1] + self.r[1:]) / 2)])  # Λ at each point
        if self.period is not None:
            self.per_period = float(self._within(np.array([self.period]))[0])
            self.mean_rate = self.per_period / self.period
        else:
            self.mean_rate = float(self.r[-1]) if self.r[-1] > 0 else float(self.c[-1] / max(self.t[-1], 1e-9))
            if self.r[-1] == 0:
                self.end_s = float(self.t[-1])
        if not np.any(self.r > 0):
            raise UserError(f"the {self.label} never sends: every rate is 0")

    def _within(self, t: np.ndarray) -> np.ndarray:
        i = np.clip(np.searchsorted(self.t, t, side="right") - 1, 0, len(self.t) - 1)
        dt = t - self.t[i]
        nxt = np.minimum(i + 1, len(self.t) - 1)
        span = self.t[nxt] - self.t[i]
        slope = np.where(span > 0, (self.r[nxt] - self.r[i]) / np.where(span > 0, span, 1.0), 0.0)
        slope = np.where(nxt == i, 0.0, slope)
        return self.c[i] + self.r[i] * dt + 0.5 * slope * dt * dt

    def cumulative(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if self.period is None:
            return self._within(t)
        whole = np.floor(t / self.period)
        return whole * self.per_period + self._within(t - whole * self.period)

    def describe(self) -> str:
        if self.label != "schedule":
            return self.label
        return f"schedule of {len(self.t)} points, {self.r.min():g} to {self.r.max():g} traces/s"


@dataclass
class Sine(Shape):
    """``mean · (1 + amplitude · sin(2πt / period))``: diurnal traffic, starting at the mean and rising."""

    mean: float
    amplitude: float
    period: float

    def __post_init__(self) -> None:
        if not 0 <= self.amplitude <= 1:
            raise UserError(f"--amplitude must be between 0 and 1 (a share of --rate), got {self.amplitude}")
        if not self.period > 0:
            raise UserError(f"--period must be > 0 s, got {self.period}")
        self.mean_rate = self.mean

    def cumulative(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        w = 2 * math.pi / self.period
        return self.mean * (t + self.amplitude / w * (1 - np.cos(w * t)))

    def describe(self) -> str:
        return (f"sine around {self.mean:g} traces/s, ±{100 * self.amplitude:g} %, period {self.period:g} s")


def constant(rate: float) -> Shape:
    return Piecewise([(0.0, rate)], label=f"constant {rate:g} traces/s")


def ramp(start: float, end: float, over_s: float) -> Shape:
    if not over_s > 0:
        raise UserError(f"a ramp needs a duration > 0 s (--ramp-duration or --duration), got {over_s}")
    return Piecewise([(0.0, start), (over_s, end)], label=f"ramp {start:g} -> {end:g} traces/s over {over_s:g} s")


def bursts(rate: float, on_s: float, off_s: float, off_rate: float = 0.0) -> Shape:
    if not (on_s > 0 and off_s > 0):
        raise UserError(f"bursts need --burst-on and --burst-off > 0 s, got {on_s} and {off_s}")
    points = [(0.0, rate), (on_s, rate), (on_s, off_rate), (on_s + off_s, off_rate)]
    return Piecewise(points, period=on_s + off_s,
                     label=f"bursts of {rate:g} traces/s for {on_s:g} s, {off_rate:g} for {off_s:g} s")


def read_schedule(path: Path) -> Shape:
    """A schedule file: one ``time rate`` point per line (comma or blanks between; time in seconds or with an
    s/m/h suffix; rate in traces/s); ``#`` comments and a header line are skipped."""
    from ..localize.window import parse_duration_s

    points = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the schedule {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].replace(",", " ").split()
        if not text:
            continue
        try:
            if len(text) != 2:
                raise ValueError("expected two values: time and rate")
            at = float(text[0]) if text[0].replace(".", "", 1).isdigit() else parse_duration_s(text[0])
            points.append((at, float(text[1])))
        except ValueError as e:
            if not points and n == 1:  # a header such as "time,rate"
                continue
            raise UserError(f"{path}:{n}: {e} (got {line.strip()!r})") from None
    if not points:
        raise UserError(f"{path}: no (time, rate) points")
    return Piecewise(points, label="schedule")


class Arrivals:
    """Start offsets (ns after the anchor) of successive traces under ``shape``: Poisson (``poisson``) or evenly
    spaced, seeded. ``take(n)`` returns the next ``n`` (fewer, possibly none, where the shape's traffic ends)."""

    def __init__(self, shape: Shape, *, poisson: bool = True, seed: int = 0, phase: float = 0.0) -> None:
        self.shape, self.poisson = shape, poisson
        self.rng = np.random.default_rng(seed & (2**63 - 1))
        self.level = phase  # Λ of the last arrival handed out (poisson) or the next count (even); the phase sets
        # apart the evenly spaced arrivals of processes that share a rate
        self.first = True
        self.t0 = 0.0  # the tabulated window starts here
        self._grid_t = np.empty(0)
        self._grid_c = np.empty(0)

    def _targets(self, n: int) -> np.ndarray:
        if self.poisson:
            out = self.level + np.cumsum(self.rng.standard_exponential(n))
            self.level = float(out[-1])
            return out
        out = self.level + 0.5 + np.arange(n, dtype=np.float64)  # midpoints: an initial pause is waited out
        self.level += n
        return out

    def _extend(self) -> bool:
        """Tabulate Λ over the next chunk; False once the traffic has ended."""
        if self.t0 >= self.shape.end_s:
            return False
        t1 = min(self.t0 + CHUNK_S, self.shape.end_s)
        t = np.linspace(self.t0, t1, max(2, round((t1 - self.t0) / GRID_S) + 1))
        c = self.shape.cumulative(t)
        if self._grid_t.size:
            t, c = np.concatenate([self._grid_t[-1:], t[1:]]), np.concatenate([self._grid_c[-1:], c[1:]])
        self._grid_t, self._grid_c, self.t0 = t, c, t1
        return True

    def take(self, n: int, until_ns: int | None = None) -> np.ndarray:
        """The next ``n`` arrival offsets, int64 ns, ascending; fewer where the traffic ends or ``until_ns`` comes
        (the arrivals after it are dropped, never drawn again)."""
        targets = self._targets(n)
        out = np.empty(0, dtype=np.float64)
        until_s = math.inf if until_ns is None else until_ns / 1e9
        while targets.size:
            if not self._grid_t.size or targets[0] > self._grid_c[-1]:
                if self.t0 >= until_s or not self._extend():
                    break
                if targets[0] > self._grid_c[-1]:
                    self._grid_t, self._grid_c = self._grid_t[-1:], self._grid_c[-1:]  # nothing here: move on
                    continue
            inside = targets <= self._grid_c[-1]
            k = int(np.count_nonzero(inside))
            out = np.concatenate([out, np.interp(targets[:k], self._grid_c, self._grid_t)])
            targets = targets[k:]
        out_ns = np.round(out * 1e9).astype(np.int64)
        return out_ns if until_ns is None else out_ns[out_ns < until_ns]


def shape_from_options(rate: float, *, shape: str = "constant", ramp_to: float | None = None,
                       ramp_s: float | None = None, period_s: float = 60.0, amplitude: float = 0.5,
                       burst_on_s: float = 1.0, burst_off_s: float = 4.0, off_rate: float = 0.0,
                       schedule: Path | None = None) -> Shape:  # fmt: skip
    """The shape the CLI options describe (``rate`` in traces/s, > 0)."""
    if schedule is not None:
        return read_schedule(schedule)
    if not (rate > 0 and math.isfinite(rate)):
        raise UserError(f"--rate must be a finite number > 0 (traces/s), got {rate}")
    if shape == "constant":
        return constant(rate)
    if shape == "ramp":
        if ramp_to is None or ramp_to < 0:
            raise UserError("--shape ramp needs --ramp-to R (traces/s at the end of the ramp, >= 0)")
        return ramp(rate, ramp_to, ramp_s if ramp_s is not None else math.nan)
    if shape == "sine":
        return Sine(rate, amplitude, period_s)
    if shape == "bursts":
        return bursts(rate, burst_on_s, burst_off_s, off_rate)
    raise UserError(f"unknown traffic shape {shape!r}; use constant, ramp, sine or bursts (or --schedule FILE)")


def expected_count(shape: Shape, start_s: float, end_s: float) -> float:
    """Traces the shape asks for between two times (what a sink should count there)."""
    a, b = shape.cumulative(np.array([start_s, min(end_s, shape.end_s)]))
    return float(b - a)


__all__ = ["Arrivals", "Piecewise", "Shape", "Sine", "bursts", "constant", "expected_count", "ramp",
           "read_schedule", "shape_from_options"]  # fmt: skip
