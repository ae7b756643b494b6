"""Failure localization: rank the services of a time window by where latency was lost, against a baseline period.

``localize(window_traces, baseline_traces)`` returns a :class:`Localization` (ranked :class:`Suspect` services, each
with :class:`Evidence`); ``otel-tracegen localize`` is the command. Pure Python: no torch, no model load.
"""

from .profile import Profile, self_time_ns
from .ranking import CallChange, Evidence, Localization, Suspect, localize
from .window import TimeWindow, parse_time, parse_window

__all__ = ["CallChange", "Evidence", "Localization", "Profile", "Suspect", "TimeWindow", "localize", "parse_time",
           "parse_window", "self_time_ns"]
