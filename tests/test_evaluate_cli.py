"""``otel-tracegen eval`` end to end: real corpora and files in several formats, the model and every baseline."""

from __future__ import annotations

import json
import pytest

from otel_tracegen.cli import ExitStatus
from otel_tracegen.dataset import load_corpus
from otel_tracegen.formats import write_traces

from .cli_helpers import FAST, one_thread, run  # noqa: F401  (one_thread: a fixture)


def test_eval_files_against_a_corpus_in_other_formats(corpus, tmp_path):
    """Synthetic traces as Jaeger JSON against the corpus: the real validation split is the reference, the
    corpus's train split is training (memorization), the report names both."""
    _, splits = load_corpus(corpus)
    write_traces("jaeger", splits["train"][:40], tmp_path / "syn.json")
    rc, out, err = run("eval", "--real", str(corpus), "--synthetic", str(tmp_path / "syn.json"), "--synthetic-name",
                       "copies", "--report", str(tmp_path / "r.html"), "--json", str(tmp_path / "m.json"))
    assert rc == ExitStatus.SUCCESS, err
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["memorization"]["copies"] == 1.0  # they are training traces
    assert metrics["exact_copies"]["copies"] == 1.0  # Jaeger keeps every modelled field (µs times)
    assert (tmp_path / "r.html").is_file() and (tmp_path / "r.md").is_file()
    assert "validation split" in (tmp_path / "r.md").read_text() and "kl_popular_calls" in out


def test_eval_model_and_every_baseline(corpus, pretrained, tmp_path):
    flat = tmp_path / "flat"
    rc, _, err = run("train", "--stage", "flat", "--corpus", str(corpus), "--out", str(flat), "--config", "tiny",
                     "--max-steps", "4", "--eval-every", "4", *FAST)
    assert rc == ExitStatus.SUCCESS, err
    rc, out, err = run("eval", "--real", str(corpus), "--model", str(pretrained), "--baseline", "replay",
                       "--baseline", "probabilistic", "--baseline", "flat", "--flat-model", str(flat), "--n", "6",
                       "--n-instructions", "2", "--dtype", "float32", "--report", str(tmp_path / "r.md"),
                       "--json", str(tmp_path / "m.json"))
    assert rc == ExitStatus.SUCCESS, err
    data = json.loads((tmp_path / "m.json").read_text())
    validity = data["metrics"]["validity"]
    assert set(validity) == {"model", "replay", "probabilistic", "flat"}
    assert validity["model"] == 1.0  # grammar-constrained: valid by construction, even a 20-step model
    assert data["metrics"]["conditioned_accuracy"]["model"] == 1.0
    assert data["metrics"]["memorization"]["replay"] == 1.0
    md = (tmp_path / "r.md").read_text()
    assert "| flat |" in md and "Against the paper" in md
    assert len(list((tmp_path / "r_figures").glob("*.png"))) >= 4
    # The two kinds of model are not interchangeable.
    rc, _, err = run("eval", "--real", str(corpus), "--model", str(flat), "--report", str(tmp_path / "x.md"))
    assert rc == ExitStatus.ERROR and "pass it as --flat-model" in err
    rc, _, err = run("eval", "--real", str(corpus), "--baseline", "flat", "--flat-model", str(pretrained),
                     "--report", str(tmp_path / "x.md"))
    assert rc == ExitStatus.ERROR and "not a flat baseline model" in err


@pytest.mark.parametrize("argv, message", [
    (["--report", "r.html"], "nothing to score"),
    (["--baseline", "flat", "--report", "r.html"], "--flat-model"),
    (["--model", "--report", "r.pdf"], "must end in .html or .md"),
])
def test_eval_user_errors_name_the_problem(corpus, tmp_path, argv, message):
    argv = [a if a not in ("r.html", "r.pdf") else str(tmp_path / a) for a in argv]
    rc, _, err = run("eval", "--real", str(corpus), *argv)
    assert rc == ExitStatus.ERROR and message in err


def test_eval_baseline_without_training_traces_is_refused(corpus, tmp_path):
    _, splits = load_corpus(corpus)
    write_traces("otlp-json", splits["validation"], tmp_path / "real.otlp.jsonl")
    rc, _, err = run("eval", "--real", str(tmp_path / "real.otlp.jsonl"), "--baseline", "replay", "--report",
                     str(tmp_path / "r.html"))
    assert rc == ExitStatus.ERROR and "needs training traces" in err


def test_eval_refuses_a_missing_real_path(tmp_path):
    rc, _, err = run("eval", "--real", str(tmp_path / "nope"), "--synthetic", str(tmp_path / "x.json"),
                     "--report", str(tmp_path / "r.html"))
    assert rc == ExitStatus.ERROR and "nope" in err
