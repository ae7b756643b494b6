"""Generation: recursive, grammar-constrained decoding of traces from a trace language model.

- :mod:`.catalog` — what the model has seen (services, operations, edges, entries), for masks and errors;
- :mod:`.grammar` — the token-level grammar of one step, as masks;
- :mod:`.engine` — batched recursive layer generation on the runtime's KV cache.
"""

from .catalog import CATALOG_FILE, Catalog
from .engine import TraceRequest, TraceSampler
from .grammar import IntSet, StepLimits

__all__ = ["CATALOG_FILE", "Catalog", "IntSet", "StepLimits", "TraceRequest", "TraceSampler"]
