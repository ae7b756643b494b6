"""Fidelity evaluation: the paper's metrics, baselines side by side, a report with figures.

- :mod:`.metrics` — every metric, defined in its docstring as in the report;
- :mod:`.generators` — the one interface the harness generates through, and the trace model behind it;
- :mod:`.baselines` — replay and the Alibaba-style probabilistic generator; :mod:`.flat` — the GReaT-style
  flat-table model;
- :mod:`.utility` — classifiers trained on real and on synthetic traces, tested on real ones;
- :mod:`.harness` — the request sets and the scoring; :mod:`.report` — HTML and Markdown with figures;
- :mod:`.command` — ``otel-tracegen eval``.

Nothing heavy is imported here: ``lm/train.py`` imports :mod:`.flat` for ``--stage flat``.
"""
