"""Do the labelled faults change the call structure of the traces? A probe for the faults the latency ranking
misses (TrainTicket's exception and wrong-return faults), kept as a script because its answer is a negative one.

Workload mix changes structure more than most faults do: the load generator calls a different mix of APIs every
minute. So the probe compares like with like. A trace's **API** is its root operation plus the first span of
another service below it (TrainTicket: ``ts-gateway-service /*`` -> ``ts-preserve-service
/api/v1/preserveservice/preserve``; Online Boutique: the frontend's root operation). For every API seen at least
5 times in the baseline, and every (service, operation), it compares the mean spans per trace in the window with the
baseline's: ``z = (window mean - baseline mean) / sqrt((baseline variance + 0.05) / window traces)`` (0.05 keeps an
operation that never varied from giving an infinite z). A service scores the sum of its two largest ``|z|``; the
services are ranked by that. Missing calls (a service that throws before calling on), extra calls (retries, error
handlers such as ``BasicErrorController.error``) and changed paths all show as such shifts.

    python3 scripts/localize_structure_probe.py [--data ../shared/datasets] [--apps trainticket onlineboutique]

Same windows, baseline and metrics as ``benchmarks/localize.py`` (its ``quiet`` baseline).
"""

from __future__ import annotations

import argparse
import glob
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from localize import APPS, quiet_traces, rank_in, read_faults, recall_table  # noqa: E402

from otel_tracegen.formats import spancsv  # noqa: E402
from otel_tracegen.trace import Trace  # noqa: E402

MIN_BASELINE = 5
SMOOTH = 0.05


def api_of(trace: Trace) -> tuple[str, ...]:
    """The root's operation and the first span of another service below it (first children, in time order)."""
    root = trace.root or min(trace, key=lambda s: s.start_ns)
    node = root
    while True:
        if node.service != root.service:
            return (root.name, node.service, node.name)
        kids = sorted(trace.children(node), key=lambda s: s.start_ns)
        if not kids:
            return (root.name,)
        node = kids[0]


def by_api(traces) -> dict[tuple, list[Counter]]:
    out: dict[tuple, list[Counter]] = defaultdict(list)
    for t in traces:
        out[api_of(t)].append(Counter((s.service, s.name) for s in t))
    return out


def rank_by_structure(window, baseline: dict[tuple, list[Counter]]) -> list[str]:
    shifts: dict[str, list[float]] = defaultdict(list)
    for api, wins in by_api(window).items():
        base = baseline.get(api)
        if not base or len(base) < MIN_BASELINE:
            continue
        for key in set().union(*wins, *base):
            b = [c[key] for c in base]
            w = [c[key] for c in wins]
            z = (statistics.mean(w) - statistics.mean(b)) / math.sqrt((statistics.pvariance(b) + SMOOTH) / len(w))
            shifts[key[0]].append(abs(z))
    services = {s.service for t in window for s in t}
    score = {svc: sum(sorted(shifts.get(svc, []), reverse=True)[:2]) for svc in services}
    return sorted(services, key=lambda s: (-score[s], s))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS))
    ap.add_argument("--window-s", type=float, default=120.0)
    args = ap.parse_args()
    w_ns = int(args.window_s * 1e9)
    for app in args.apps:
        root = args.data / APPS[app]
        files = sorted(glob.glob(str(root / "traces" / "*.csv*")))
        if not files:
            print(f"{app}: no traces under {root}", file=sys.stderr)
            return 1
        traces = [t for t in spancsv.read(files) if len(t)]
        faults = read_faults(root / "labels")
        quiet = quiet_traces(traces, faults, w_ns)
        baseline = by_api(quiet)
        ranks, sizes = defaultdict(list), defaultdict(list)
        for f in faults:
            window = [t for t in traces if f["ns"] <= t.start_ns < f["ns"] + w_ns]
            if not window:
                continue
            ranking = rank_by_structure(window, baseline)
            for key in (f["type"], "all"):
                ranks[key].append(rank_in(ranking, f["service"]))
                sizes[key].append(len(ranking))
        print(f"### {app}: calls per trace by API, {len(quiet)} baseline traces\n")
        print("| faults (n) | R@1 | R@3 | R@5 | MRR | random MRR |\n|---|---|---|---|---|---|")
        for key in sorted(ranks, key=lambda k: (k == "all", k)):
            t, r = recall_table(ranks[key]), recall_table(ranks[key], sizes[key])
            print(f"| {key} ({t['n']}) | {t['R@1']:.2f} | {t['R@3']:.2f} | {t['R@5']:.2f} | {t['MRR']:.2f} | "
                  f"{r['MRR']:.2f} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
