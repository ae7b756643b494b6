"""The decoding engine and ``otel-tracegen generate`` with a tiny model trained here on the CPU: every trace
valid at temperature 1, requests met exactly, the same seed giving the same bytes, files that read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from otel_tracegen.cli import ExitStatus
from otel_tracegen.encoding import decode_trace
from otel_tracegen.formats import read_traces
from otel_tracegen.emit.attributes import SYNTHETIC_ATTRIBUTE
from otel_tracegen.lm.model import load_model
from otel_tracegen.report import ReadReport, UserError
from otel_tracegen.sampling import CATALOG_FILE, Catalog, TraceRequest, TraceSampler
from otel_tracegen.validate import validate

from .cli_helpers import FAST, one_thread, run  # noqa: F401 - one_thread: autouse fixture
from .sampling_helpers import assert_include_call_is_generated


@pytest.fixture(scope="module")
def model_dir(pretrained, corpus, tmp_path_factory) -> Path:
    """The session's tiny pre-trained model with an instruct adapter (the sampler's default adapter)."""
    out = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(pretrained, out)
    rc, _, err = run("train", "--stage", "instruct", "--corpus", str(corpus), "--out", str(out), "--max-steps", "4",
                     "--eval-every", "2", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    return out


@pytest.fixture(scope="module")
def sampler(model_dir) -> TraceSampler:
    return TraceSampler(load_model(model_dir, device="cpu"), batch_size=64)


def test_pretraining_writes_the_catalog(model_dir):
    cat = json.loads((model_dir / CATALOG_FILE).read_text())
    assert cat["entries"] and cat["operations"] and cat["edges"] and cat["max_depth"] >= 2


def test_requests_without_a_size_take_the_entry_operation_and_size_of_a_training_trace(sampler):
    cat = sampler.catalog
    assert Catalog.from_dict(cat.to_dict()).sizes == cat.sizes and cat.sizes
    old = cat.to_dict()
    del old["sizes"]  # a catalog written before sizes were recorded: sizes are the model's to choose
    assert Catalog.from_dict(old).size_mix(next(iter(cat.entries))) == []
    seen = {(svc, op, n, d) for svc in cat.sizes for op, n, d, _ in cat.size_mix(svc)}
    entry = next(iter(cat.entries))
    requests = [TraceRequest()] * 12 + [TraceRequest(service=entry)] * 4
    for steps in sampler.generate(requests, seed=3):
        trace = decode_trace(steps)
        assert validate(trace) == []
        assert (trace.root.service, trace.root.name, len(trace), trace.depth) in seen


def test_every_trace_is_valid_at_temperature_one_and_requests_are_met(sampler):
    cat = sampler.catalog
    entry = next(iter(cat.entries))
    requests = ([TraceRequest()] * 10
                + [TraceRequest(service=entry, calls=c, depth=d) for c, d in ((1, 1), (2, 2), (9, 3), (30, 7))] * 3
                + [TraceRequest(calls=12, depth=4, latency_ms=40.0, high_latency=True)] * 3)  # fmt: skip
    out = sampler.generate(requests, temperature=1.0, seed=1)
    assert sampler.adapter == "instruct"
    for req, steps in zip(requests, out):
        trace = decode_trace(steps)
        assert validate(trace, expect_calls=req.calls, expect_depth=req.depth) == []
        if req.service:
            assert trace.root.service == req.service
        if req.latency_ms is not None:
            assert trace.root.duration_ns == 40_000_000


def test_high_latency_holds_the_root_above_its_entrys_p90(sampler, corpus):
    from otel_tracegen.dataset import load_corpus
    from otel_tracegen.lm.data import corpus_stats_for_instructions

    cat = sampler.catalog
    _, splits = load_corpus(corpus, ("train",))
    p90 = corpus_stats_for_instructions(splits["train"]).p90_us  # the instruct adapter's definition
    assert {(s, o): p for s, ops in cat.high_latency_us.items() for o, p in ops.items()} == pytest.approx(p90)
    assert Catalog.from_dict(cat.to_dict()).high_latency_us == cat.high_latency_us
    entry = max(cat.entries, key=lambda s: sum(cat.entries[s].values()))
    requests = [TraceRequest(service=entry, high_latency=True)] * 8 + [TraceRequest(high_latency=True, calls=6, depth=3)] * 4
    for steps in sampler.generate(requests, seed=5):
        trace = decode_trace(steps)
        assert validate(trace) == []
        assert trace.root.duration_ns / 1000 > p90[(trace.root.service, trace.root.name)]
    old = cat.to_dict()
    del old["high_latency_us"]  # a catalog from before the p90s: the model alone decides
    assert Catalog.from_dict(old).high_latency_floor_us(entry, next(iter(cat.entries[entry]))) is None


def test_include_call_is_generated(sampler):
    assert_include_call_is_generated(sampler, calls=25, traces=4)


def test_same_seed_same_steps_and_other_seeds_differ(sampler):
    reqs = [TraceRequest(calls=8, depth=3)] * 6
    a = sampler.generate(reqs, seed=5)
    assert sampler.generate(reqs, seed=5) == a
    assert sampler.generate(reqs, seed=6) != a


def test_greedy_and_top_p_decoding_stay_valid(sampler):
    reqs = [TraceRequest(calls=10, depth=3)] * 3
    for kw in ({"temperature": 0.0}, {"top_p": 0.5}, {"temperature": 1.7, "top_p": 0.9}):
        for steps in sampler.generate(reqs, seed=2, **kw):
            assert validate(decode_trace(steps), expect_calls=10, expect_depth=3) == []
    greedy = sampler.generate(reqs, temperature=0.0, seed=1)
    assert greedy == sampler.generate(reqs, temperature=0.0, seed=99)  # nothing random left
    with pytest.raises(UserError, match="top_p"):
        sampler.generate(reqs, top_p=0.0)


def test_step_weights_are_the_models_odds_of_writing_the_step_unmasked(model_dir):
    """The weight a redraw decides on is, per step, the sum over its completion of log p(token) at positions the
    grammar fixed and log(mass the mask kept) where a token was drawn: replayed here with one full forward per
    step and the grammar's own masks."""
    from otel_tracegen.sampling.grammar import step_program

    s = TraceSampler(load_model(model_dir, device="cpu", dtype="float32"), batch_size=64)
    rt, tok = s.lm.model, s.lm.tokenizer
    seen = []
    real_sample = rt.sample

    def recording(prompts, **kw):
        out = real_sample(prompts, **kw)
        seen.append(([list(p) for p in prompts], out, list(kw["score_from"])))
        return out

    rt.sample = recording
    try:
        chunk = [(i, r.conditions()) for i, r in enumerate([TraceRequest(calls=9, depth=3)] * 3)]
        steps, weights = s._decode(chunk, [TraceRequest(calls=9, depth=3)] * 3, 1.0, 1.0,
                                   torch.Generator().manual_seed(4), weigh=True)
        # ... and the steps below the root: ordinary (non-client) layers
        inner = [(0, c) for st in steps for c in _children(st)][:4]
        weights += s._decode(inner, [TraceRequest()], 1.0, 1.0, torch.Generator().manual_seed(5), weigh=True)[1]
    finally:
        rt.sample = real_sample
    conds = [c for _, c in chunk] + [c for _, c in inner]
    replay = [w for p, o, f in seen for w in zip(p, o, f)]
    assert len(replay) == len(conds) == len(weights) and min(weights) < -0.1  # the masks did cost something
    for cond, (prompt, out, start), w in zip(conds, replay, weights):
        seq = prompt + out
        with torch.no_grad():
            logp = torch.log_softmax(rt(torch.tensor([seq]))[0][0].float(), -1)
        program = step_program(s.vocab, cond, s.limits, **({"entry_service": None} if cond.client else {}))
        spec, want = next(program), 0.0
        for i in range(start, len(seq)):
            if len(spec) == 1:
                want += logp[i - 1, seq[i]].item()
            else:
                want += torch.logsumexp(logp[i - 1, list(spec)], -1).item()
            try:
                spec = program.send(seq[i])
            except StopIteration:
                assert i == len(seq) - 1
        assert w == pytest.approx(want, abs=1e-3)
        assert w <= 1e-6


def _children(step):
    from otel_tracegen.encoding import next_conditions

    return [next_conditions(step, k) for k, sub in enumerate(step.subs) if sub.calls > 0]


def test_a_step_is_kept_with_its_weights_probability_else_the_likeliest_of_its_draws(model_dir, monkeypatch):
    """Redraw mechanics, with stand-in draws: weight 0 (log) is always kept, -inf never; after ``attempts`` draws
    the likeliest is kept; one attempt keeps the first draw and draws no acceptance numbers."""
    from otel_tracegen.encoding import Step

    s = TraceSampler(load_model(model_dir, device="cpu"), batch_size=64, attempts=3)
    real = TraceSampler._decode
    script: dict[int, list[float]] = {0: [float("-inf"), 0.0], 1: [-50.0, -3.0, -9.0]}
    drawn: dict[int, list[Step]] = {0: [], 1: []}

    def fake(self, chunk, requests, temperature, top_p, generator, weigh=False):
        steps, _ = real(self, chunk, requests, temperature, top_p, generator, weigh)
        weights = []
        for (i, cond), step in zip(chunk, steps):
            if cond.client:
                drawn[i].append(step)
                weights.append(script[i][len(drawn[i]) - 1])
            else:
                weights.append(0.0)
        return steps, weights

    monkeypatch.setattr(TraceSampler, "_decode", fake)
    out = s.generate([TraceRequest(calls=6, depth=2)] * 2, seed=1)
    assert len(drawn[0]) == 2 and out[0][0] == drawn[0][1]  # -inf redrawn, 0 kept at once
    assert len(drawn[1]) == 3 and out[1][0] == drawn[1][1]  # none kept: the likeliest (-3) of three
    one = TraceSampler(load_model(model_dir, device="cpu"), batch_size=64, attempts=1)
    drawn = {0: [], 1: []}
    script = {0: [float("-inf")], 1: [float("-inf")]}
    out = one.generate([TraceRequest(calls=6, depth=2)] * 2, seed=1)
    assert [len(d) for d in drawn.values()] == [1, 1] and out[0][0] == drawn[0][0]
    with pytest.raises(UserError, match="at least 1 attempt"):
        TraceSampler(load_model(model_dir, device="cpu"), attempts=0)


def test_a_model_without_a_catalog_says_how_to_build_one(model_dir, corpus, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / CATALOG_FILE).unlink()
    with pytest.raises(UserError, match="otel-tracegen model catalog"):
        TraceSampler(load_model(bare, device="cpu"))
    rc, out, err = run("model", "catalog", str(bare), "--corpus", str(corpus))
    assert rc == ExitStatus.SUCCESS, err
    assert "entry services" in out
    assert json.loads((bare / CATALOG_FILE).read_text()) == json.loads((model_dir / CATALOG_FILE).read_text())


# --- the command --------------------------------------------------------------------------------------------


def test_generate_command_writes_valid_reproducible_files(model_dir, tmp_path):
    args = ["generate", "--model", str(model_dir), "--count", "5", "--calls", "6", "--depth", "3", "--seed", "4",
            "--start-time", "2026-01-02T03:04:05Z", "--rate", "10"]
    for fmt in ("otlp-json", "jaeger"):
        files = [tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"]
        for f in files:
            rc, _, err = run(*args, "--format", fmt, "--out", str(f))
            assert rc == ExitStatus.SUCCESS, err
            assert "5/5 valid" in err
        assert files[0].read_bytes() == files[1].read_bytes()
        traces = read_traces(fmt, [files[0]], ReadReport())
        assert len(traces) == 5
        for t in traces:
            assert validate(t, expect_calls=6, expect_depth=3) == []
            assert t.start_ns >= 1767323045 * 10**9  # anchored at --start-time
        if fmt == "otlp-json":
            span = next(iter(traces[0]))
            assert span.resource.attributes["service.name"] == span.service
            assert span.resource.attributes[SYNTHETIC_ATTRIBUTE] is True
    starts = sorted(t.start_ns for t in traces)
    assert len(set(starts)) == 5  # Poisson arrivals, not all at the anchor


def test_decode_workers_give_the_same_bytes_as_in_process_decoding(model_dir, tmp_path):
    """Rounds decoded in two spawned worker processes (what a CPU run of several rounds does by default) give
    the file one process writes: a round's traces depend on its index, not on who decoded it."""
    args = ["generate", "--model", str(model_dir), "--count", "7", "--batch-size", "3", "--calls", "5", "--seed", "2",
            "--start-time", "2026-01-02T03:04:05Z", "--dtype", "float32", "--threads", "1"]
    files = {n: tmp_path / f"w{n}.json" for n in (1, 2)}
    for n, f in files.items():
        rc, _, err = run(*args, "--decode-workers", str(n), "--out", str(f))
        assert rc == ExitStatus.SUCCESS, err
        assert "7/7 valid" in err
    assert files[1].read_bytes() == files[2].read_bytes()
    assert len(read_traces("otlp-json", [files[2]], ReadReport())) == 7


def test_decode_workers_run_the_dtype_the_parent_chose(model_dir, tmp_path, monkeypatch):
    """``--dtype auto``: the workers decode in the dtype this process resolved (``DecodePool`` resolves it before
    spawning them), not in one they would resolve themselves. Here this process remembers bfloat16, while the cache
    file the workers could read says float32."""
    from otel_tracegen.lm import cpu_dtype

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "otel-tracegen" / "cpu-dtype.json"
    cache.parent.mkdir(parents=True)
    fields = dict(fp32_ms=1.0, bf16_ms=2.0, cpu="?", torch=torch.__version__, measured_at="t")
    cache.write_text(json.dumps({cpu_dtype._machine_key(): {"bfloat16": False, **fields}}))
    monkeypatch.setattr(cpu_dtype, "_CHOICE", cpu_dtype.CpuDtypeChoice(bfloat16=True, **fields))
    monkeypatch.setattr(cpu_dtype, "_cpuinfo", lambda: ("Test CPU", frozenset({"avx512_bf16"})))
    args = ["generate", "--model", str(model_dir), "--count", "7", "--batch-size", "3", "--calls", "5", "--seed", "4",
            "--start-time", "2026-01-02T03:04:05Z", "--threads", "1"]
    files = {}
    for name, extra in {"auto, 2 workers": ["--dtype", "auto", "--decode-workers", "2"],
                        "bf16, 1 process": ["--dtype", "bfloat16", "--decode-workers", "1"],
                        "fp32, 1 process": ["--dtype", "float32", "--decode-workers", "1"]}.items():
        files[name] = tmp_path / f"{name}.json"
        rc, _, err = run(*args, *extra, "--out", str(files[name]))
        assert rc == ExitStatus.SUCCESS, err
        said = {"auto, 2 workers": "bfloat16 by 2 workers of 1 torch thread(s)",
                "bf16, 1 process": "bfloat16 with 1 torch thread(s) as asked\n",
                "fp32, 1 process": "float32 with 1 torch thread(s) as asked\n"}[name]
        assert f"decoded on cpu in {said}" in err, err  # the summary says what ran
    assert files["auto, 2 workers"].read_bytes() == files["bf16, 1 process"].read_bytes()
    # The pool hands its workers the resolved name. (The files above may not show it on every CPU: this tiny
    # model's bf16 and float32 runs differed in one field of 419 here.)
    from otel_tracegen.sampling.pool import DecodePool, SamplerSpec

    spec = SamplerSpec(model=str(model_dir), device="cpu", dtype="auto", adapter=None, batch_size=4, entries="data",
                       attempts=1)  # fmt: skip
    with DecodePool(spec, 1) as pool:  # workers start on the first round: none is submitted
        assert pool.spec.dtype == "bfloat16" and pool.spec.model == str(model_dir)
    monkeypatch.setattr(cpu_dtype, "_CHOICE", cpu_dtype.CpuDtypeChoice(bfloat16=False, **fields))
    with DecodePool(spec, 1) as pool:
        assert pool.spec.dtype == "float32"


def test_generate_command_errors_name_what_is_wrong(model_dir, tmp_path, capsys):
    out = str(tmp_path / "x.json")
    rc, _, err = run("generate", "--model", str(model_dir), "--service", "ts-gateway-servic", "--out", out)
    assert rc == ExitStatus.ERROR and "nearest known: ts-gateway-service" in err
    rc, _, err = run("generate", "--model", str(model_dir), "--depth", "40", "--out", out)
    assert rc == ExitStatus.ERROR and "above anything" in err
    rc, _, err = run("generate", "--model", str(model_dir), "--calls", "7", "--depth", "1", "--out", out)
    assert rc == ExitStatus.ERROR and "--depth 1 is the root span alone" in err
    rc, _, err = run("generate", "--model", str(model_dir), "--include-call", "x => y", "--out", out)
    assert rc == ExitStatus.USAGE and "A -> B" in capsys.readouterr().err  # argparse writes usage errors itself
    rc, _, err = run("generate", "--model", str(model_dir))
    assert rc == ExitStatus.ERROR and "--out" in err
    assert not Path(out).exists()


def test_the_same_grammar_runs_through_transformers_generate(model_dir):
    """The benchmark's baseline: transformers' generate() with the grammar as a logits processor."""
    hf = TraceSampler(load_model(model_dir, device="cpu", backend="transformers"), batch_size=8)
    reqs = [TraceRequest(calls=9, depth=3)] * 3 + [TraceRequest()] * 2
    for kw in ({}, {"temperature": 0.0}, {"top_p": 0.8}):
        for req, steps in zip(reqs, hf.generate(reqs, seed=1, **kw)):
            assert validate(decode_trace(steps), expect_calls=req.calls, expect_depth=req.depth) == []
