"""Light imports: the adapters need no torch, and the training side needs no OpenTelemetry packages.

The GPU machines have torch but no OpenTelemetry packages; users converting files should not need torch.
Each check runs in a fresh interpreter in which the named packages cannot be imported at all.
"""

import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or name.startswith("google.protobuf"):
                raise ImportError(f"{{name}} is blocked for this test")
    sys.meta_path.insert(0, Block())
    """
)


def _import_with_blocked(modules, blocked):
    code = BLOCKER.format(blocked=set(blocked)) + "".join(f"import {m}\n" for m in modules)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize(
    "module",
    [
        "otel_tracegen.trace",
        "otel_tracegen.validate",
        "otel_tracegen.encoding",
        "otel_tracegen.dataset",
        "otel_tracegen.cli",
        "otel_tracegen.formats.otlp_json",
        "otel_tracegen.formats.jaeger",
        "otel_tracegen.formats.zipkin",
        "otel_tracegen.formats.spancsv",
        "otel_tracegen.formats.alibaba",
        "otel_tracegen.evaluate.metrics",
        "otel_tracegen.evaluate.harness",
        "otel_tracegen.evaluate.baselines",
        "otel_tracegen.evaluate.utility",
        "otel_tracegen.evaluate.report",
        "otel_tracegen.evaluate.command",
        "otel_tracegen.evaluate.flat",
        "otel_tracegen.emit.replay",
        "otel_tracegen.emit.library",
        "otel_tracegen.emit.template",
        "otel_tracegen.emit.pacing",
        "otel_tracegen.emit.command",
        "otel_tracegen.emit.generate",
    ],
)
def test_imports_without_torch_or_opentelemetry(module):
    p = _import_with_blocked([module], {"torch", "transformers", "peft", "opentelemetry"})
    assert p.returncode == 0, p.stderr


def test_no_protobuf_is_needed_for_json_formats_end_to_end(tmp_path):
    code = BLOCKER.format(blocked={"torch", "opentelemetry"}) + textwrap.dedent(
        f"""
        from pathlib import Path
        from otel_tracegen.dataset import build_corpus, load_corpus
        sample = Path({str(tmp_path)!r})
        res = build_corpus("spancsv", [Path("examples/trainticket")], sample / "c")
        _, splits = load_corpus(sample / "c")
        assert len(splits["train"]) + len(splits["validation"]) == 40
        """
    )
    from pathlib import Path

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("module", ["otel_tracegen.infill.wire", "otel_tracegen.infill.detect",
                                    "otel_tracegen.infill.repair", "otel_tracegen.infill.filler",
                                    "otel_tracegen.infill.service", "otel_tracegen.infill.receiver",
                                    "otel_tracegen.infill.command"])  # fmt: skip
def test_infill_imports_without_torch_or_grpc(module):
    # The receiver loads torch only for the model, and grpcio only when it serves gRPC or forwards over it
    # (protobuf, through opentelemetry-proto, is a dependency of the package).
    code = BLOCKER.replace(' or name.startswith("google.protobuf")', "").format(
        blocked={"torch", "transformers", "peft", "grpc"}) + f"import {module}\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("module", ["otel_tracegen.localize", "otel_tracegen.localize.command",
                                    "otel_tracegen.localize.model_baseline", "otel_tracegen.incident"])  # fmt: skip
def test_localize_imports_without_torch(module):
    # Ranking a window is pure Python; only --model-baseline loads the model (and torch) when it generates.
    code = BLOCKER.format(blocked={"torch", "transformers", "peft", "grpc"}) + f"import {module}\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_predict_partial_traces_import_without_torch():
    code = BLOCKER.format(blocked={"torch", "transformers", "peft", "grpc"}) + "import otel_tracegen.predict\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
