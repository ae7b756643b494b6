"""The infill receiver: repair incomplete traces inside an OTLP pipeline, losing nothing.

    apps -> Collector (load-balancing by trace id) -> infill replicas -> Jaeger / Tempo

- :mod:`.wire`: OTLP requests with each span's bytes kept, so untouched spans pass through byte for byte;
- :mod:`.receiver`: OTLP gRPC and HTTP receivers (partial success, errors and back-pressure as the spec asks);
- :mod:`.buffer`: spans grouped by trace for a wait window, bounded (like ``groupbytrace``);
- :mod:`.detect`: orphans, missing roots, clock skew, missing attributes, each a named reason;
- :mod:`.repair` and :mod:`.filler`: the model's infill adapter writes lost spans and names; rules fall back;
- :mod:`.queue`: the crash-safe on-disk queue (write-ahead log and outbound queue);
- :mod:`.forward`: downstream OTLP export with retries;
- :mod:`.service`: the pipeline and its settings; :mod:`.metrics`: Prometheus self-metrics;
- :mod:`.command`: ``otel-tracegen infill serve`` and ``otel-tracegen infill file``.

``docs/infill.md`` is the user's guide. Importing this package needs neither torch nor grpcio.
"""
