"""Default threads against the best explicit ones, on an idle machine and beside one busy process.

    python3 benchmarks/bench_threads.py [--count 20] [--seed 1] [--repeats 2] [--json benchmarks/results/threads.json]

Issue 25: torch starts one OpenMP thread per core, and its threads spin against a neighbour. The goal: with one
busy process beside it, the default ``otel-tracegen generate`` is within 1.2x of the best explicit ``--threads`` /
``--decode-workers`` setting, and on an idle machine within 1.1x of it.

Each run is the README's command, ``otel-tracegen generate --count 20 --out FILE --seed 1`` (the shipped model, on
the CPU), timed from start to exit (model loading included), as its own process:

- **one round**: the default ``--batch-size`` (256) puts the 20 traces in one round, decoded in-process: the default
  against ``--threads 1`` and ``--threads 2``;
- **many rounds**: ``--batch-size 10`` (2 rounds): the default against ``--decode-workers 1 --threads 1``,
  ``--decode-workers 1 --threads 2`` and ``--decode-workers 2`` (one thread each).

Idle, then beside a busy process (``python3 -c "while True: pass"``, one core). Prints each time and the ratio of
the default to the best explicit setting, with what the default chose (its summary line), and writes them and the
machine to ``--json``. Run nothing else meanwhile: the idle rows must be idle. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from otel_tracegen.machine import describe, recorded_settings  # noqa: E402 - after the path

LAYOUTS = {
    "one round": {"default": [], "--threads 1": ["--threads", "1"], "--threads 2": ["--threads", "2"]},
    "many rounds": {"default": ["--batch-size", "10"],
                    "--decode-workers 1 --threads 1": ["--batch-size", "10", "--decode-workers", "1", "--threads", "1"],
                    "--decode-workers 1 --threads 2": ["--batch-size", "10", "--decode-workers", "1", "--threads", "2"],
                    "--decode-workers 2": ["--batch-size", "10", "--decode-workers", "2"]},
}  # fmt: skip


def run(flags: list[str], count: int, seed: int, out: Path) -> tuple[float, str]:
    """One generate run: (seconds, its summary line)."""
    cmd = [sys.executable, "-m", "otel_tracegen", "generate", "--count", str(count), "--out", str(out), "--seed",
           str(seed), *flags]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = next((ln for ln in proc.stderr.splitlines() if " traces, " in ln and "valid" in ln), "")
    return took, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, in turn (medians reported)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "threads.json")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: the idle rows will not be idle", file=sys.stderr)
    out = Path(tempfile.mkdtemp(prefix="bench-threads-")) / "traces.otlp.jsonl"
    results: dict = {}
    for condition in ("idle", "beside one busy process"):
        busy = None
        if condition != "idle":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        try:
            for layout, settings in LAYOUTS.items():
                for r in range(args.repeats):  # in turn, the order reversed every other time
                    for name in list(settings) if r % 2 == 0 else list(settings)[::-1]:
                        took, summary = run(settings[name], args.count, args.seed, out)
                        entry = results.setdefault(condition, {}).setdefault(layout, {}).setdefault(
                            name, {"runs": [], "summary": summary})
                        entry["runs"].append(took)
                        entry["seconds"] = statistics.median(entry["runs"])
                        chose = re.sub(r".*decoded on ", "", summary)
                        print(f"  {condition:24s} {layout:11s} {name:31s} {took:6.1f} s   ({chose})", flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    table = []
    for condition, layouts in results.items():
        for layout, runs in layouts.items():
            best_name = min((n for n in runs if n != "default"), key=lambda n: runs[n]["seconds"])
            ratio = runs["default"]["seconds"] / runs[best_name]["seconds"]
            goal = 1.1 if condition == "idle" else 1.2
            table.append({"condition": condition, "layout": layout, "default_s": runs["default"]["seconds"],
                          "best": best_name, "best_s": runs[best_name]["seconds"], "ratio": ratio, "goal": goal,
                          "met": ratio <= goal})  # fmt: skip
    print()
    print(f"{'condition':24s} {'layout':11s} {'default':>8s} {'best explicit':>31s} {'':>8s} {'ratio':>6s} goal")
    for t in table:
        print(f"{t['condition']:24s} {t['layout']:11s} {t['default_s']:7.1f}s {t['best']:>31s} {t['best_s']:7.1f}s "
              f"{t['ratio']:6.2f} {'<=' if t['met'] else '>'} {t['goal']}")
    result = {"command": "python3 benchmarks/bench_threads.py " + " ".join(sys.argv[1:]),
              "machine": describe(("torch",)), "load_before": load, "load_after": os.getloadavg()[0],
              "settings": recorded_settings(vars(args), ROOT), "table": table, "runs": results}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
