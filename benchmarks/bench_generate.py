"""Generation speed: the decoding engine against transformers ``generate()``, and OTLP emission against the OTel
Python SDK's own path. Every figure is a ratio against a baseline measured in the same run.

=================  ==========================================================================================
engine             ``TraceSampler`` on our runtime (``otel_tracegen.lm.runtime``): batched recursive layers,
                   ragged KV cache, grammar masks from a logits hook, fixed text packed into the passes that
                   draw the neighbouring rows' tokens; headline figure at ``--dtype`` (auto: bf16 where the
                   hardware multiplies bf16 natively) with generate's redraws (``--attempts``), and with first
                   draws only; ratio against the baseline in float32 on both sides, first draws (the baseline
                   cannot weigh steps)
baseline           the same sampler, same model, same grammar (as a ``LogitsProcessor``), same batches, through
                   ``LlamaForCausalLM.generate()`` + peft (``load_model(backend="transformers")``)
emission           ``OtlpSender`` with the native sender (the default): request bytes written directly
                   (``otel_tracegen.emit.wire``), sent over grpcio, from ``--workers`` threads, into a real collector (rotel)
                   that discards them (blackhole exporter)
baseline           what an instrumented app does: ``tracer.start_span``/``end`` for every span (the same ids and
                   times) through ``BatchSpanProcessor`` + the SDK's OTLP gRPC exporter into the same collector
2nd reference      ``OtlpSender`` with the SDK sender: canonical spans -> ``ReadableSpan`` -> the SDK's exporter
                   (``--otlp-sender sdk``; the same bytes on the wire as the native sender)
=================  ==========================================================================================

Spans/s counts valid spans only (every trace is checked with the validator; all are valid by construction).

Usage::

    python3 benchmarks/bench_generate.py [MODEL_DIR] [--traces 64] [--calls 30] [--depth 4] [--threads 2]
        [--batch 256] [--device cpu] [--dtype auto] [--free] [--attempts N] [--skip-baseline]
        [--emission-traces 2000] [--emission-only] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from otel_tracegen.loopback import start_rotel  # noqa: E402 - after the path
from otel_tracegen.sampling.engine import DEFAULT_ATTEMPTS  # noqa: E402 - after the path; imports no torch


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def engine_spans_per_s(lm, requests, batch: int, seed: int, attempts: int | None = None) -> tuple[float, int, int, float]:
    """(valid spans/s, spans, valid traces, seconds) of one generation run (``attempts``: draws per step at most,
    None: generate's default)."""
    from otel_tracegen.encoding import decode_trace
    from otel_tracegen.sampling import TraceSampler
    from otel_tracegen.validate import validate

    sampler = TraceSampler(lm, batch_size=batch, **({} if attempts is None else {"attempts": attempts}))
    t = time.perf_counter()
    out = sampler.generate(requests, seed=seed)
    dt = time.perf_counter() - t
    spans = valid = 0
    for req, steps in zip(requests, out):
        trace = decode_trace(steps)
        if not validate(trace, expect_calls=req.calls, expect_depth=req.depth):
            valid += 1
            spans += len(trace)
    return spans / dt, spans, valid, dt


def pool_spans_per_s(args, request, workers: int) -> tuple[float, int, int, float]:
    """(valid spans/s, spans, valid traces, seconds) of ``args.traces`` traces decoded in rounds of ``args.batch``
    by ``workers`` processes of one torch thread (``--decode-workers``; worker start-up included)."""
    from otel_tracegen.encoding import decode_trace
    from otel_tracegen.emit.generate import round_sizes
    from otel_tracegen.sampling.pool import DecodePool, SamplerSpec
    from otel_tracegen.validate import validate

    spec = SamplerSpec(model=args.model, device=args.device, dtype=args.dtype, adapter="instruct",
                       batch_size=args.batch, entries="data", attempts=args.attempts)  # fmt: skip
    t = time.perf_counter()
    with DecodePool(spec, workers) as pool:
        futures = [pool.submit([request] * n, temperature=1.0, top_p=1.0, seed=args.seed + r)
                   for r, n in enumerate(round_sizes(args.traces, args.batch, None))]  # fmt: skip
        rounds = [f.result() for f in futures]
    dt = time.perf_counter() - t
    spans = valid = 0
    for steps in (s for rnd in rounds for s in rnd):
        trace = decode_trace(steps)
        if not validate(trace, expect_calls=request.calls, expect_depth=request.depth):
            valid += 1
            spans += len(trace)
    return spans / dt, spans, valid, dt


# --- emission ---------------------------------------------------------------------------------------------------


def emission_ours(traces, port: int, workers: int, sender: str = "native") -> float:
    """Spans/s of ``OtlpSender`` (``sender``: native or sdk) from ``workers`` threads, all delivered."""
    from otel_tracegen.emit.sender import OtlpSettings, make_sender

    out = make_sender(OtlpSettings(endpoint=f"127.0.0.1:{port}", insecure=True), sender=sender, workers=workers)
    assert out.kind == sender, out.note
    t = time.perf_counter()
    out.send(traces)
    counts = out.close()
    dt = time.perf_counter() - t
    assert counts.failed_spans == 0, counts
    return counts.sent_spans / dt


def emission_sdk(traces, port: int) -> float:
    """Each span through the SDK's tracer as an app would record it, with our ids and timestamps."""
    from opentelemetry import trace as api
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import IdGenerator

    class Replay(IdGenerator):  # hand the tracer the ids the generated spans have
        def __init__(self):
            self.span_ids, self.trace_ids = [], []

        def generate_span_id(self):
            return self.span_ids.pop()

        def generate_trace_id(self):
            return self.trace_ids.pop()

    ids = Replay()
    providers = {}
    n = 0
    t = time.perf_counter()
    for trace in traces:
        for span in trace.walk():
            s = span[0]
            prov = providers.get(s.service)
            if prov is None:
                prov = providers[s.service] = TracerProvider(resource=Resource({"service.name": s.service}),
                                                             id_generator=ids)
                prov.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}",
                                                                            insecure=True)))
            ids.span_ids.append(int(s.span_id, 16))
            if s.parent_id is None:
                ids.trace_ids.append(int(s.trace_id, 16))
                ctx = None
            else:
                parent = api.SpanContext(int(s.trace_id, 16), int(s.parent_id, 16), is_remote=False,
                                         trace_flags=api.TraceFlags(1))
                ctx = api.set_span_in_context(api.NonRecordingSpan(parent))
            sp = prov.get_tracer("bench").start_span(s.name, context=ctx, kind=api.SpanKind.SERVER,
                                                     start_time=s.start_ns)
            sp.end(end_time=s.end_ns)
            n += 1
    for prov in providers.values():
        prov.shutdown()  # flushes the batch processors: every span has been exported when this returns
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(REPO_ROOT / "model"))
    ap.add_argument("--traces", type=int, default=64)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="the engine's dtype for the headline figure (auto: bf16 where the hardware has it); the "
                         "engine-vs-generate ratio is always measured in float32 on both sides")
    ap.add_argument("--decode-workers", type=int, default=0, help="also time decoding in rounds of --batch by this "
                    "many single-thread processes (what `generate` does on a CPU; 0: skip)")
    ap.add_argument("--free", action="store_true", help="requests without --calls/--depth (the model decides, "
                    "entries drawn from the training mix): what `otel-tracegen generate` does by default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS,
                    help=f"draws per step at most (default {DEFAULT_ATTEMPTS}, generate's); above 1 the engine is also "
                         "timed with first draws only, in the same run")
    ap.add_argument("--skip-baseline", action="store_true", help="engine only (the baseline is slow)")
    ap.add_argument("--emission-traces", type=int, default=2000, help="0 skips the emission benchmark")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--emission-only", action="store_true", help="skip the engine figures (the model still "
                    "generates the traces to send)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from otel_tracegen.lm.model import load_model
    from otel_tracegen.sampling import TraceRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    request = TraceRequest() if args.free else TraceRequest(calls=args.calls, depth=args.depth)
    requests = [request] * args.traces
    where = machine(args.device)
    result: dict = {"machine": where, "device": args.device, "traces": args.traces, "batch": args.batch,
                    "request": "free" if args.free else {"calls": args.calls, "depth": args.depth}}  # fmt: skip
    lm = load_model(args.model, device=args.device, backend="runtime", dtype=args.dtype)
    dtype = str(lm.model.dtype).removeprefix("torch.")
    if args.emission_only:
        return finish(args, emission(args, lm, result))
    engine_spans_per_s(lm, requests[: min(8, len(requests))], args.batch, args.seed)  # warm-up
    rate, spans, valid, dt = engine_spans_per_s(lm, requests, args.batch, args.seed, args.attempts)
    result["engine"] = {"dtype": dtype, "attempts": args.attempts, "spans_per_s": round(rate, 1), "spans": spans,
                        "valid_traces": valid, "seconds": round(dt, 2)}  # fmt: skip
    print(f"engine    {rate:10,.0f} valid spans/s  {dtype}  ({valid}/{len(requests)} traces valid, {spans} spans in "
          f"{dt:.1f} s, up to {args.attempts} draws per step)  on {where}")
    if args.attempts > 1:
        r1, spans1, valid1, dt1 = engine_spans_per_s(lm, requests, args.batch, args.seed, 1)
        result["engine_first_draws"] = {"spans_per_s": round(r1, 1), "spans": spans1, "valid_traces": valid1,
                                        "seconds": round(dt1, 2), "ratio": round(rate / r1, 2)}  # fmt: skip
        print(f"engine    {r1:10,.0f} valid spans/s  {dtype}  first draws only (--attempts 1): redraws cost "
              f"{r1 / rate:.2f}x")
    if args.decode_workers:
        prate, pspans, pvalid, pdt = pool_spans_per_s(args, request, args.decode_workers)
        result["decode_workers"] = {"workers": args.decode_workers, "dtype": dtype, "spans_per_s": round(prate, 1),
                                    "spans": pspans, "valid_traces": pvalid, "seconds": round(pdt, 2)}  # fmt: skip
        print(f"workers   {prate:10,.0f} valid spans/s  {dtype}  {args.decode_workers} processes x 1 thread, rounds of "
              f"{args.batch} ({pvalid}/{len(requests)} traces valid, {pspans} spans in {pdt:.1f} s, start-up included)")
    if not args.skip_baseline:
        # The baseline runs in float32 (transformers' default here); so does the engine it is compared with.
        lm32 = lm if dtype == "float32" else load_model(args.model, device=args.device, backend="runtime")
        # Compared on first draws: transformers' generate() path keeps every first draw (no weights there).
        r32, spans32, valid32, dt32 = engine_spans_per_s(lm32, requests, args.batch, args.seed, 1)
        hf = load_model(args.model, device=args.device, backend="transformers")
        base, bspans, bvalid, bdt = engine_spans_per_s(hf, requests, args.batch, args.seed)
        result["engine_float32"] = {"spans_per_s": round(r32, 1), "spans": spans32, "valid_traces": valid32,
                                    "seconds": round(dt32, 2)}  # fmt: skip
        result["transformers_generate"] = {"spans_per_s": round(base, 1), "spans": bspans, "valid_traces": bvalid,
                                           "seconds": round(bdt, 2)}
        result["engine_vs_generate"] = round(r32 / base, 2)
        print(f"engine    {r32:10,.0f} valid spans/s  float32  first draws ({valid32}/{len(requests)} traces valid)")
        print(f"generate  {base:10,.0f} valid spans/s  float32  ({bvalid}/{len(requests)} traces valid)   engine "
              f"ratio {r32 / base:.2f}x (both float32)")

    finish(args, emission(args, lm, result))


def emission(args, lm, result: dict) -> dict:
    """The emission figures into ``result``: the native sender, the SDK tracer path, the SDK-exporter sender."""
    if not args.emission_traces:
        return result
    import tempfile

    from otel_tracegen.emit.generate import Assembler
    from otel_tracegen.sampling import TraceRequest, TraceSampler

    # Traces to send: generated once, repeated with fresh ids (emission does not depend on content).
    sampler = TraceSampler(lm, batch_size=args.batch)
    steps = sampler.generate([TraceRequest(calls=20, depth=4)] * 32, seed=args.seed)
    assemble = Assembler(anchor_ns=time.time_ns(), seed=args.seed)
    traces = [t for _ in range(max(1, args.emission_traces // 32)) for t in assemble(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_rotel(Path(tmp))  # otel_tracegen.loopback
        try:
            emission_ours(traces[:64], port, args.workers)  # warm-up: connect, fill the encoder's caches
            native = emission_ours(traces, port, args.workers, "native")
            sdk = emission_sdk(traces, port)
            sdk_sender = emission_ours(traces, port, args.workers, "sdk")
        finally:
            proc.terminate()
            proc.wait(10)
    result["emission"] = {"native_spans_per_s": round(native, 1), "sdk_tracer_spans_per_s": round(sdk, 1),
                          "sdk_exporter_sender_spans_per_s": round(sdk_sender, 1), "ratio": round(native / sdk, 2),
                          "sdk_exporter_sender_ratio": round(sdk_sender / sdk, 2), "spans": sum(map(len, traces)),
                          "workers": args.workers}  # fmt: skip
    print(f"emission  {native:10,.0f} spans/s into rotel, native sender ({args.workers} workers)  vs SDK tracer path "
          f"{sdk:,.0f} spans/s   ratio {native / sdk:.2f}x")
    print(f"          {sdk_sender:10,.0f} spans/s with the SDK exporter as sender (--otlp-sender sdk)   ratio "
          f"{sdk_sender / sdk:.2f}x")
    return result


def finish(args, result: dict) -> None:
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
