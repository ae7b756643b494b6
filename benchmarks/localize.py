"""Failure localization on the labelled Nezha faults: Recall@1/3/5 and MRR, overall and per fault type, against
baselines measured in the same run; and the time to localize one window.

    python3 benchmarks/localize.py [--data ../shared/datasets] [--apps trainticket onlineboutique]
        [--window-s 120] [--baseline quiet|faultfree] [--json OUT.json] [--markdown OUT.md]

**Data.** ``nezha-trainticket`` (45 faults in ``labels/*fault_list.json``) and ``nezha-onlineboutique`` (24 listed;
those whose minutes were captured are evaluable). The label names a pod; its service is the pod name without the
Kubernetes suffixes (``spancsv.service_from_pod``). Label times are wall-clock times of the same clock as the span
timestamps (checked: every evaluable window holds traces).

**Window**: traces that start in ``[inject_time, inject_time + window_s)``. **Baseline** (``--baseline``):
``quiet`` (default) is every trace that starts outside ``[inject - 60 s, inject + window_s + 60 s]`` of every
fault, in the fault files and the fault-free files alike; ``faultfree`` is the fault-free capture files only.
A fault whose window holds no trace is not evaluable and is listed as such.

**Rows**: ``origin`` (``otel_tracegen.localize.localize``: per service, the sum of its two largest
per-context shifts of self-time or call gap; ``docs/localize.md`` gives the formula), ``median self-time`` (per-service median self-time change, the issue's baseline), ``call frequency``
(per-service change of spans per trace), and ``random`` (expected values: R@k = k/n, MRR = H(n)/n for n services in
the window). A service absent from the window's traces counts as not found (rank infinity).

**No leakage.** None of these methods is trained: each window is compared with its baseline only, and the
baseline never holds a fault window's traces (``quiet``) or holds fault-free captures only (``faultfree``).

**The model as the baseline** (``--model-traces N``, default 120; 0 skips): on the faults the shipped model never
saw (those at or after its corpus's time cut: the last 10 % of each dataset's time range, as ``data build`` split
it), the window is ranked against four baselines: the quiet traces, the fault-free capture files only, N traces
the model generates for the window's entry points (``otel-tracegen localize --model-baseline``; cached), and the
fault-free captures plus those. Online Boutique has no such fault: its fault day lies wholly in the model's
training split, so it is not measured.

**Synthetic incidents** (``--synthetic N``, default 240; 0 skips): the shipped model generates N normal traces per
entry service (``ts-gateway-service`` for TrainTicket, ``frontend`` for Online Boutique) on this machine, seeded. The
first half is the baseline, the second half the window. For every service that occurs in at least 10 % of the
window's traces, and each delay in ``--delays-ms`` (default 5 and 20 ms), ``LatencyIncident(service, delay)`` (what
``otel-tracegen generate --inject-latency SERVICE=MS`` applies) delays that service in the window, and the same
methods rank it. One incident per (service, delay). The generated traffic is cached (see ``generate_normal``):
sampling in bfloat16 differs with the thread count, so a fresh draw moves these figures by a few points.

**Speed**: seconds to profile and rank one window (reading files excluded; that is the adapters' cost) on this
machine, median over the evaluable windows, plus one large window: the first ``--large`` real traces of the app
(by start time) ranked against the baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import math
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otel_tracegen.formats import spancsv  # noqa: E402
from otel_tracegen.localize import Profile, localize  # noqa: E402
from otel_tracegen.localize.ranking import rank_by_call_frequency, rank_by_median_self_time  # noqa: E402

APPS = {"trainticket": "nezha-trainticket", "onlineboutique": "nezha-onlineboutique"}
METHODS = ("origin", "median self-time", "call frequency", "random")


def read_faults(label_dir: Path) -> list[dict]:
    """Every injection of the fault lists, in time order."""
    out = []
    for f in sorted(label_dir.glob("*fault_list.json")):
        for group in json.loads(f.read_text()).values():
            for x in group:
                t = dt.datetime.strptime(x["inject_time"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
                out.append({"time": x["inject_time"], "ns": int(t.timestamp()) * 10**9, "pod": x["inject_pod"],
                            "service": spancsv.service_from_pod(x["inject_pod"]), "type": x["inject_type"]})  # fmt: skip
    return sorted(out, key=lambda f: f["ns"])


def quiet_traces(traces: list, faults: list[dict], w_ns: int) -> list:
    """The ``quiet`` baseline: every trace that starts outside ``[inject - 60 s, inject + window + 60 s]`` of every
    fault."""
    return [t for t in traces
            if len(t) and not any(f["ns"] - 60e9 <= t.start_ns <= f["ns"] + w_ns + 60e9 for f in faults)]  # fmt: skip


def recall_table(ranks: list[int | None], n_services: list[int] | None = None) -> dict:
    """R@1/3/5 and MRR from ranks (None: not found); with ``n_services``, the random ranking's expected values."""
    n = len(ranks)
    if not n:
        return {"n": 0}
    if n_services is not None:
        return {"n": n, **{f"R@{k}": sum(min(1.0, k / m) for m in n_services) / n for k in (1, 3, 5)},
                "MRR": sum(sum(1 / r for r in range(1, m + 1)) / m for m in n_services) / n}  # fmt: skip
    return {"n": n, **{f"R@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in (1, 3, 5)},
            "MRR": sum(1 / r for r in ranks if r is not None) / n}  # fmt: skip


def rank_in(ranking: list[str], service: str) -> int | None:
    return ranking.index(service) + 1 if service in ranking else None


def evaluate_model_baseline(app: str, traces: list, files: list[str], faults: list[dict], w_ns: int, quiet: Profile,
                            n: int) -> dict:  # fmt: skip
    """The trace model as the baseline, on the faults whose windows the shipped model never saw.

    The shipped model's corpus split each dataset by time: traces starting in the last 10 % of its time range were
    validation (model/README.md). ``dataset.split_by_time`` gives the same cut here; a fault is clean when its
    injection is at or after it."""
    from otel_tracegen.dataset import split_by_time
    from otel_tracegen.localize.model_baseline import model_baseline

    _, cut = split_by_time([t for t in traces if len(t)], 0.1)
    clean = [f for f in faults if f["ns"] >= cut]
    ff_traces = spancsv.read([f for f in files if Path(f).name.startswith("faultfree_")])
    faultfree = Profile.of(ff_traces)
    rows = []
    t0 = time.perf_counter()
    for f in clean:
        window = [t for t in traces if len(t) and f["ns"] <= t.start_ns < f["ns"] + w_ns]
        if not window:
            continue
        generated = model_baseline(window, n)
        wp = Profile.of(window)
        rows.append({"time": f["time"], "service": f["service"], "type": f["type"], "ranks": {
            "quiet baseline": localize(wp, quiet).rank_of(f["service"]),
            "fault-free captures": localize(wp, faultfree).rank_of(f["service"]),
            "model only": localize(wp, Profile.of(generated)).rank_of(f["service"]),
            "fault-free + model": localize(wp, Profile.of(ff_traces + generated)).rank_of(f["service"])}})  # fmt: skip
    names = ["quiet baseline", "fault-free captures", "model only", "fault-free + model"]
    return {"cut_unix_nano": cut, "clean_faults": len(clean), "model_traces": n, "seconds": time.perf_counter() - t0,
            "table": {m: recall_table([r["ranks"][m] for r in rows]) for m in names}, "rows": rows}  # fmt: skip


def evaluate_app(data: Path, app: str, window_s: float, baseline_kind: str, large: int, model_traces: int = 0) -> dict:
    root = data / APPS[app]
    files = sorted(glob.glob(str(root / "traces" / "*.csv*")))
    t0 = time.perf_counter()
    traces = spancsv.read(files)
    read_s = time.perf_counter() - t0
    faults = read_faults(root / "labels")
    w_ns = int(window_s * 1e9)
    if baseline_kind == "faultfree":
        base = spancsv.read([f for f in files if Path(f).name.startswith("faultfree_")])
    else:
        base = quiet_traces(traces, faults, w_ns)
    base_profile = Profile.of(base)
    rows, seconds = [], []
    for f in faults:
        window = [t for t in traces if len(t) and f["ns"] <= t.start_ns < f["ns"] + w_ns]
        row = {k: f[k] for k in ("time", "service", "type")} | {"window_traces": len(window)}
        if not window:
            row["evaluable"] = False
            rows.append(row)
            continue
        t0 = time.perf_counter()
        wp = Profile.of(window)
        loc = localize(wp, base_profile)
        seconds.append(time.perf_counter() - t0)
        row |= {"evaluable": True, "services": loc.services, "ranks": {
            "origin": loc.rank_of(f["service"]),
            "median self-time": rank_in(rank_by_median_self_time(wp, base_profile), f["service"]),
            "call frequency": rank_in(rank_by_call_frequency(wp, base_profile), f["service"]),
        }, "top3": loc.ranking[:3], "evidence": [e.line() for e in loc.suspects[0].evidence[:1]] if loc.suspects else []}
        rows.append(row)
    ok = [r for r in rows if r["evaluable"]]
    table = {}
    for m in METHODS:
        table[m] = {"all": recall_table([r["ranks"].get(m) for r in ok], [r["services"] for r in ok] if m == "random" else None)}
        by_type = defaultdict(list)
        for r in ok:
            by_type[r["type"]].append(r)
        for ty, rs in sorted(by_type.items()):
            table[m][ty] = recall_table([r["ranks"].get(m) for r in rs], [r["services"] for r in rs] if m == "random" else None)
    # One large window: the first `large` traces by start, against the same baseline.
    ordered = sorted((t for t in traces if len(t)), key=lambda t: t.start_ns)[:large]
    t0 = time.perf_counter()
    localize(Profile.of(ordered), base_profile)
    large_s = time.perf_counter() - t0
    quiet = base_profile if baseline_kind == "quiet" else Profile.of(
        quiet_traces(traces, faults, w_ns))
    model = evaluate_model_baseline(app, traces, files, faults, w_ns, quiet, model_traces) if model_traces else None
    return {"app": app, "traces": len(traces), "read_s": read_s, "baseline_traces": len(base), "faults": len(faults),
            "model_baseline": model,
            "evaluable": len(ok), "table": table, "rows": rows,
            "window_seconds_median": statistics.median(seconds) if seconds else None,
            "window_traces_median": statistics.median(r["window_traces"] for r in ok) if ok else None,
            "large_window": {"traces": len(ordered), "spans": sum(len(t) for t in ordered), "seconds": large_s}}  # fmt: skip


ENTRY = {"trainticket": "ts-gateway-service", "onlineboutique": "frontend"}


def generate_normal(app: str, n: int, seed: int = 0) -> list:
    """``n`` traces from the shipped model, entered at the app's entry service (CPU unless a GPU is here).

    Cached beside the model-baseline traces (``$XDG_CACHE_HOME/otel-tracegen/baselines``): sampling in bfloat16
    is not bit-reproducible across thread counts, so a rerun reads the same traffic instead of drawing anew."""
    from otel_tracegen.formats import read_traces, write_traces
    from otel_tracegen.lm.model import DEFAULT_MODEL_DIR
    from otel_tracegen.localize.model_baseline import model_key, cache_dir, generate_for_entries

    path = cache_dir() / f"synthetic-{app}-{n}-{seed}-{model_key(DEFAULT_MODEL_DIR)}.otlp.jsonl"
    if path.is_file():
        return read_traces("otlp-json", [path])
    traces = generate_for_entries([((ENTRY[app], None), n)], DEFAULT_MODEL_DIR, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_traces("otlp-json", traces, path)
    return traces


def evaluate_synthetic(app: str, n: int, delays_ms: list[float]) -> dict:
    from otel_tracegen.incident import LatencyIncident

    t0 = time.perf_counter()
    traces = generate_normal(app, n)
    gen_s = time.perf_counter() - t0
    base, window = traces[: n // 2], traces[n // 2 :]
    base_profile = Profile.of(base)
    present = defaultdict(int)
    for t in window:
        for svc in {s.service for s in t}:
            present[svc] += 1
    targets = sorted(svc for svc, k in present.items() if k >= 0.1 * len(window))
    rows = []
    for delay in delays_ms:
        for svc in targets:
            incident = LatencyIncident(svc, delay)
            wp = Profile.of([incident.apply(t) for t in window])
            loc = localize(wp, base_profile)
            rows.append({"service": svc, "delay_ms": delay, "services": loc.services, "ranks": {
                "origin": loc.rank_of(svc),
                "median self-time": rank_in(rank_by_median_self_time(wp, base_profile), svc),
                "call frequency": rank_in(rank_by_call_frequency(wp, base_profile), svc)}})  # fmt: skip
    table = {}
    for m in METHODS:
        table[m] = {}
        for delay in delays_ms:
            rs = [r for r in rows if r["delay_ms"] == delay]
            table[m][f"{delay:g} ms"] = recall_table([r["ranks"].get(m) for r in rs], [r["services"] for r in rs] if m == "random" else None)
    return {"app": app, "generated": len(traces), "spans": sum(len(t) for t in traces), "generate_s": gen_s,
            "targets": targets, "table": table, "rows": rows}


def markdown_synthetic(results: list[dict]) -> str:
    lines = []
    for res in results:
        lines += [f"### synthetic incidents, {res['app']}: {len(res['targets'])} services x delays; "
                  f"{res['generated']} generated traces ({res['spans']:,} spans, {res['generate_s']:.0f} s)", "",
                  "| method | delay | R@1 | R@3 | R@5 | MRR |", "|---|---|---|---|---|---|"]  # fmt: skip
        for m, by_delay in res["table"].items():
            for d, a in by_delay.items():
                lines.append(f"| {m} | {d} | {a['R@1']:.2f} | {a['R@3']:.2f} | {a['R@5']:.2f} | {a['MRR']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['app']}: {res['evaluable']} evaluable faults of {res['faults']}, baseline {res['baseline_traces']} traces", "",
                  "| method | R@1 | R@3 | R@5 | MRR |", "|---|---|---|---|---|"]  # fmt: skip
        for m, t in res["table"].items():
            a = t["all"]
            lines.append(f"| {m} | {a['R@1']:.2f} | {a['R@3']:.2f} | {a['R@5']:.2f} | {a['MRR']:.2f} |")
        types = [k for k in res["table"]["origin"] if k != "all"]
        lines += ["", "| fault type (n) | " + " | ".join(f"{m} MRR" for m in METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
        for ty in types:
            n = res["table"]["origin"][ty]["n"]
            lines.append(f"| {ty} ({n}) | " + " | ".join(f"{res['table'][m][ty]['MRR']:.2f}" for m in METHODS) + " |")
        mb = res.get("model_baseline")
        if mb:
            lines += ["", f"The trace model as the baseline, on the {mb['clean_faults']} faults after the shipped model's "
                          f"training cut ({mb['model_traces']} generated traces per entry mix):", "",
                      "| origin with baseline | n | R@1 | R@3 | R@5 | MRR |", "|---|---|---|---|---|---|"]  # fmt: skip
            for m, a in mb["table"].items():
                if a["n"]:
                    lines.append(f"| {m} | {a['n']} | {a['R@1']:.2f} | {a['R@3']:.2f} | {a['R@5']:.2f} | {a['MRR']:.2f} |")
        lw = res["large_window"]
        lines += ["", f"Time to rank one window: median {res['window_seconds_median']:.3f} s for a median "
                      f"{res['window_traces_median']:.0f} traces; {lw['seconds']:.2f} s for {lw['traces']:,} traces "
                      f"({lw['spans']:,} spans). Reading all {res['traces']:,} traces took {res['read_s']:.1f} s.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    ap.add_argument("--apps", nargs="+", choices=list(APPS), default=list(APPS))
    ap.add_argument("--window-s", type=float, default=120.0)
    ap.add_argument("--baseline", choices=("quiet", "faultfree"), default="quiet")
    ap.add_argument("--large", type=int, default=8000, help="traces in the synthetic large window timed")
    ap.add_argument("--model-traces", type=int, default=120,
                    help="traces the model generates as a baseline for the faults it never saw (0: skip)")
    ap.add_argument("--synthetic", type=int, default=240, help="generated traces per app for synthetic incidents (0: skip)")
    ap.add_argument("--delays-ms", type=float, nargs="+", default=[5.0, 20.0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    if not all((args.data / APPS[a]).is_dir() for a in args.apps):
        print(f"no Nezha data under {args.data}; nothing to measure", file=sys.stderr)
        return 2
    results = [evaluate_app(args.data, app, args.window_s, args.baseline, args.large, args.model_traces)
               for app in args.apps]  # fmt: skip
    synthetic = [evaluate_synthetic(app, args.synthetic, args.delays_ms) for app in args.apps] if args.synthetic else []
    text = markdown(results) + "\n" + markdown_synthetic(synthetic)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "window_s": args.window_s,
                                         "baseline": args.baseline, "results": results,
                                         "synthetic": synthetic}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
