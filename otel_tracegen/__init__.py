"""otel-tracegen: learn how a microservice system calls itself, and generate, repair and explain traces.

``otel_tracegen.load_model()`` loads the shipped trace model (``load_model(PATH)`` another model directory), on the
GPU if there is one, else the CPU. ``otel_tracegen.replay(library, rate=...)`` replays a library of traces at line
rate and returns the run's summary (``docs/replay.md``). Both are looked up lazily, so importing the package (the
format adapters, the corpus tools) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "replay"]

if TYPE_CHECKING:  # pragma: no cover
    from .emit.replay import replay
    from .lm.model import load_model


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from .lm.model import load_model

        return load_model
    if name == "replay":
        from .emit.replay import replay

        return replay
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
