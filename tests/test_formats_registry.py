"""Format registry: guessing a file's format, picking data files out of directories."""

from pathlib import Path

import pytest

from otel_tracegen.formats import FORMATS, detect_format, expand_paths, writable_formats
from otel_tracegen.report import UserError

REALWORLD = Path(__file__).parent / "testdata" / "realworld"
SAMPLES = sorted(
    p for p in REALWORLD.glob("*/*") if p.name != "SOURCE.md" and not p.name.endswith(".protobuf-text")
)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_files_are_recognised_as_their_format(path):
    assert detect_format(path) == path.parent.name


def test_bom_and_csv_headers_are_recognised(tmp_path):
    (tmp_path / "a.json").write_text('\ufeff{"resourceSpans": []}')
    (tmp_path / "b.csv").write_text("TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,EndTimeUnixNano,Duration\n")
    (tmp_path / "c.csv").write_text("traceid,timestamp,rpcid,um,rpctype,dm,interface,rt\n")
    (tmp_path / "d.txt").write_text("hello world\n")
    assert [detect_format(tmp_path / n) for n in ("a.json", "b.csv", "c.csv")] == ["otlp-json", "spancsv", "alibaba"]
    with pytest.raises(UserError, match="pass --format"):
        detect_format(tmp_path / "d.txt")


def test_directories_yield_only_files_of_the_format(tmp_path):
    for name in ("a.json", "b.json.gz", "SOURCE.md", ".hidden.json", "c.csv"):
        (tmp_path / name).write_text("x")
    got = [p.name for p in expand_paths([tmp_path], FORMATS["zipkin"].suffixes)]
    assert got == ["a.json", "b.json.gz"]
    with pytest.raises(UserError, match="no input files"):
        expand_paths([tmp_path], (".pb",))


def test_only_the_documented_formats_are_writable():
    assert writable_formats() == ["otlp-json", "otlp-proto", "jaeger", "zipkin"]
