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
