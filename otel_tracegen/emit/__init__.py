"""Emission: traces on their way out, from the model (``generate``) or from a library (``replay``), to OTLP or files.

Following a trace to the wire, module by module:

- where it comes from: :mod:`.generate` (the model's steps made spans) or :mod:`.library` (a library read once,
  checked, filtered, weighted) and :mod:`.template` (the library encoded once; per batch only ids and times);
- when it goes: :mod:`.pacing` (traffic shapes, Poisson or even arrivals), :mod:`.replay` (the replay loop);
- what it carries besides: :mod:`.attributes` (the synthetic marks, the user's and the environment's attributes);
- how it is written and sent: :mod:`.wire` (the SDK exporter's exact request bytes), :mod:`.sender` (batches from
  worker threads; the native or the SDK exporter), :mod:`.transport` (grpcio and ``requests`` under the SDK's rules);
- what the commands are: :mod:`.options` (shared flags), :mod:`.command` (``generate``, ``replay``),
  :mod:`.summary` (what a run says about itself).

Nothing heavy is imported here: torch, grpcio and the OpenTelemetry SDK load when a command needs them.
"""
