"""``--dtype auto`` on a CPU: bfloat16 only where it measured clearly faster than float32, measured once per machine
and remembered, so that the same seed keeps giving the same bytes."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from otel_tracegen.lm import cpu_dtype  # noqa: E402
from otel_tracegen.lm.cpu_dtype import MARGIN, CpuDtypeChoice  # noqa: E402
from otel_tracegen.lm.model import resolve_dtype  # noqa: E402


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache directory, no answer remembered in this process, and a CPU that has bf16 instructions."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_dtype, "_CHOICE", None)
    monkeypatch.setattr(cpu_dtype, "_cpuinfo", lambda: ("Test CPU 9000", frozenset({"avx512f", "avx512_bf16"})))
    return tmp_path / "otel-tracegen" / "cpu-dtype.json"


def timed(monkeypatch, fp32_s: float, bf16_s: float) -> list:
    """Stand-in timings for both dtypes; returns the list of dtypes timed, in order."""
    calls = []

    def fake(dtype, rounds=3, reps=10):
        calls.append(dtype)
        return fp32_s if dtype == torch.float32 else bf16_s

    monkeypatch.setattr(cpu_dtype, "time_decode_products", fake)
    return calls


@pytest.mark.parametrize("bf16_s, expect", [(0.5e-3, True), (0.9e-3, False), (1.5e-3, False),
                                            (MARGIN * 1e-3 * 1.001, False), (MARGIN * 1e-3 * 0.999, True)])
def test_bfloat16_only_where_clearly_faster(fresh, monkeypatch, bf16_s, expect):
    timed(monkeypatch, 1e-3, bf16_s)
    assert cpu_dtype.cpu_prefers_bf16() is expect
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if expect else torch.float32)
    assert resolve_dtype("float32", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_the_first_measurement_is_remembered_and_reused(fresh, monkeypatch):
    calls = timed(monkeypatch, 1e-3, 0.4e-3)
    assert cpu_dtype.cpu_prefers_bf16() is True
    assert calls, "nothing was measured"
    saved = json.loads(fresh.read_text())
    (key, entry), = saved.items()
    assert key.startswith("Test CPU 9000 | flags ") and f"torch {torch.__version__}" in key
    assert entry["bfloat16"] is True and entry["fp32_ms"] == 1.0 and entry["bf16_ms"] == 0.4
    # A new process (nothing in memory) whose timings would now say float32 keeps the remembered answer.
    monkeypatch.setattr(cpu_dtype, "_CHOICE", None)
    calls = timed(monkeypatch, 1e-3, 2e-3)
    assert cpu_dtype.cpu_prefers_bf16() is True and calls == []
    # Another machine (other flags) measures for itself, and both answers stay in the file.
    monkeypatch.setattr(cpu_dtype, "_CHOICE", None)
    monkeypatch.setattr(cpu_dtype, "_cpuinfo", lambda: ("Test CPU 9000", frozenset({"amx_bf16"})))
    assert cpu_dtype.cpu_prefers_bf16() is False and calls
    assert sorted(e["bfloat16"] for e in json.loads(fresh.read_text()).values()) == [False, True]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"bfloat16": true}}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(fresh, monkeypatch, content):
    fresh.parent.mkdir(parents=True)
    fresh.write_text(content.replace("KEY", cpu_dtype._machine_key()))
    calls = timed(monkeypatch, 1e-3, 2e-3)
    assert cpu_dtype.cpu_prefers_bf16() is False and calls
    assert [e["bfloat16"] for e in json.loads(fresh.read_text()).values()] == [False]


def test_no_bf16_instructions_means_float32_and_nothing_timed(fresh, monkeypatch):
    monkeypatch.setattr(cpu_dtype, "_cpuinfo", lambda: ("Old CPU", frozenset({"avx2", "fma"})))
    calls = timed(monkeypatch, 1e-3, 1e-6)
    assert cpu_dtype.cpu_dtype_choice() is None and resolve_dtype("auto", "cpu") == torch.float32
    assert calls == [] and not fresh.exists()


def test_an_unwritable_cache_still_answers(fresh, monkeypatch):
    fresh.parent.parent.mkdir(parents=True, exist_ok=True)
    fresh.parent.write_text("a file where the directory should be")
    timed(monkeypatch, 1e-3, 0.5e-3)
    assert cpu_dtype.cpu_prefers_bf16() is True


def test_the_real_measurement_runs_here(monkeypatch, tmp_path):
    """No stand-ins: both dtypes are timed on this machine's products, quickly."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    choice = cpu_dtype.measure()
    assert choice.fp32_ms > 0 and choice.bf16_ms > 0
    assert choice.bfloat16 == (choice.bf16_ms < MARGIN * choice.fp32_ms)
    assert choice.fp32_ms < 200, f"one round of the decode products took {choice.fp32_ms} ms in float32"


def test_choice_round_trips_through_the_cache_format():
    c = CpuDtypeChoice(bfloat16=False, fp32_ms=1.25, bf16_ms=2.5, cpu="x", torch="2", measured_at="t")
    assert CpuDtypeChoice(**json.loads(json.dumps(c.__dict__))) == c
