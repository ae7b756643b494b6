"""``otel-tracegen predict``: will these partial traces be high latency, will they hold an uncommon call?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..report import ReadReport, UserError
from .partial import TASKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="FILES|DIR",
                   help="partial traces (root and first layer; anything below and every time is ignored), any format")
    p.add_argument("--task", action="append", choices=TASKS, help="what to predict (repeatable; default both)")
    p.add_argument("--format", default=None, help="input format (default: detected per file)")
    p.add_argument("--model", type=Path, help="model directory with predict.json (default: the shipped model/)")
    p.add_argument("--json", action="store_true", help="one JSON object per trace")
    p.add_argument("--fit", type=Path, metavar="CORPUS",
                   help="instead: fit the heads on a corpus's train split and write MODEL/predict.json")


def run(args, env, read) -> int:
    from ..lm.model import DEFAULT_MODEL_DIR

    model_dir = args.model or DEFAULT_MODEL_DIR
    if args.fit is not None:
        return _fit(args.fit, model_dir, env)
    if not args.inputs:
        raise UserError("give partial trace files to predict on (or --fit CORPUS to train the heads)")
    from .predictor import Predictor

    pred = Predictor.from_pretrained(model_dir)
    if pred.needs_model:
        from ..lm.model import load_model

        pred.lm = load_model(model_dir, dtype="auto")
    report = ReadReport()
    traces = [t for t in read(args.format, args.inputs, report) if len(t)]
    for problem in report.problems[:20]:
        print(f"warning: {problem}", file=env.stderr)
    if not traces:
        raise UserError(f"no traces in {' '.join(args.inputs)}")
    tasks = args.task or list(TASKS)
    results = pred.predict(traces, tasks)
    if args.json:
        for r in results:
            env.stdout.write(json.dumps(r) + "\n")
    else:
        for r in results:
            if "error" in r:
                env.stdout.write(f"{r['trace_id']}  error: {r['error']}\n")
                continue
            answers = "  ".join(f"{t}: {'yes' if r[t]['prediction'] else 'no'} ({r[t]['probability']:.2f})" for t in tasks)
            note = "  (entry not seen in training)" if "warning" in r else ""
            env.stdout.write(f"{r['trace_id']}  {r['entry']}  {answers}{note}\n")
    unknown = sum(1 for r in results if "warning" in r)
    if unknown:
        print(f"warning: {unknown} traces enter at an entry the heads never saw in training (their answers say so)",
              file=env.stderr)  # fmt: skip
    yes = {t: sum(1 for r in results if r.get(t, {}).get("prediction")) for t in tasks}
    print(f"{len(results)} traces: " + ", ".join(f"{t} {n}" for t, n in yes.items()), file=env.stderr)
    return 0


def _fit(corpus: Path, model_dir: Path, env) -> int:
    from ..dataset import load_corpus
    from ..lm.model import load_model
    from .predictor import Predictor

    _, splits = load_corpus(corpus, splits=("train",))
    train = sorted(splits["train"], key=lambda t: t.start_ns)
    lm = load_model(model_dir, dtype="auto")
    pred = Predictor.fit(train, lm)
    path = pred.save_pretrained(model_dir)
    chosen = ", ".join(f"{t}: {m}" for t, (m, _) in pred.heads.items())
    print(f"wrote {path} ({pred.info['train_traces']} training traces; {chosen})", file=env.stderr)
    return 0
