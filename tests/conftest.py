from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def trainticket_corpus(tmp_path_factory):
    """The whole nezha-trainticket set built into a corpus once per session: (directory, BuildResult)."""
    src = SHARED / "nezha-trainticket" / "traces"
    if not src.is_dir():
        pytest.skip("../shared/datasets/nezha-trainticket not present")
    from otel_tracegen.dataset import build_corpus

    out = tmp_path_factory.mktemp("trainticket") / "corpus"
    return out, build_corpus("spancsv", [src], out)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The shipped TrainTicket excerpt (examples/trainticket) built into a corpus once per session."""
    from otel_tracegen.dataset import build_corpus

    from .cli_helpers import EXAMPLES

    out = tmp_path_factory.mktemp("examples") / "corpus"
    build_corpus("spancsv", [EXAMPLES], out)
    return out


@pytest.fixture(scope="session")
def pretrained(corpus, tmp_path_factory) -> Path:
    """A tiny model pre-trained on ``corpus`` (20 steps, one thread), once per session. Read it, or copy it first."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from otel_tracegen.cli import ExitStatus

    from .cli_helpers import FAST, run

    out = tmp_path_factory.mktemp("tiny") / "model"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, _, err = run("train", "--stage", "pretrain", "--corpus", str(corpus), "--out", str(out), "--config",
                         "tiny", "--max-steps", "20", "--eval-every", "10", "--lr", "3e-3", *FAST)
    finally:
        torch.set_num_threads(before)
    assert rc == ExitStatus.SUCCESS, err
    return out
