"""One adapter module per trace format, all reading into and writing from :mod:`otel_tracegen.trace`.

Every module exposes the same small interface:

- ``read(paths, report=None) -> list[Trace]``: all spans of all files, grouped by trace id (a trace may span
  several files). Bad records go to the :class:`~otel_tracegen.report.ReadReport`; good ones are kept.
- ``write(traces, path) -> None`` for writable formats.

Modules are imported lazily, so ``import otel_tracegen.formats`` stays cheap and needs no optional package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..report import ReadReport, UserError
from ..trace import Trace


@dataclass(frozen=True)
class FormatInfo:
    name: str
    module: str
    writable: bool
    description: str
    suffixes: tuple[str, ...]  # files of this format found inside a directory argument (a .gz of each too)


FORMATS: dict[str, FormatInfo] = {
    f.name: f
    for f in (
        FormatInfo("otlp-json", "otlp_json", True, "OTLP JSON: OTLP/HTTP JSON bodies or the Collector file exporter's lines", (".json", ".jsonl", ".ndjson")),
        FormatInfo("otlp-proto", "otlp_proto", True, "OTLP protobuf ExportTraceServiceRequest (length-delimited for several)", (".pb", ".bin", ".proto", ".protobuf", ".otlp")),
        FormatInfo("jaeger", "jaeger", True, "Jaeger query API JSON (/api/traces), as the Jaeger UI opens from a file", (".json",)),
        FormatInfo("zipkin", "zipkin", True, "Zipkin v2 JSON span list", (".json",)),
        FormatInfo("spancsv", "spancsv", False, "span CSV: TraceID,SpanID,ParentID,PodName,OperationName,Start/EndTimeUnixNano,Duration", (".csv",)),
        FormatInfo("alibaba", "alibaba", False, "Alibaba cluster-trace v2021 MSCallGraph or v2022 CallGraph CSV", (".csv",)),
    )
}


def get_format(name: str):
    """The adapter module for ``name``; a :class:`UserError` listing the choices if there is none."""
    info = FORMATS.get(name)
    if info is None:
        raise UserError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}")
    return importlib.import_module(f"{__name__}.{info.module}")


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return any(name.endswith(s) for s in suffixes)


def all_suffixes() -> tuple[str, ...]:
    return tuple(sorted({s for f in FORMATS.values() for s in f.suffixes}))


def expand_paths(paths: Iterable[str | Path], suffixes: Iterable[str] | None = None) -> list[Path]:
    """Files named directly, plus the files under named directories (sorted, hidden ones skipped).

    Inside directories only names ending in one of ``suffixes`` (optionally ``.gz``) count, so a data folder's
    README or SOURCE.md is not read as data; default: every format's suffixes.
    """
    suffixes = tuple(suffixes) if suffixes is not None else all_suffixes()
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and not f.name.startswith(".") and _has_suffix(f, suffixes)
                )
            )
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"no such file or directory: {p}")
    if not out:
        raise UserError("no input files found in: " + ", ".join(map(str, paths)))
    return out


def read_traces(fmt: str, paths: Sequence[str | Path], report: ReadReport | None = None) -> list[Trace]:
    module = get_format(fmt)
    return module.read(expand_paths(paths, FORMATS[fmt].suffixes), report if report is not None else ReadReport())


def read_any(paths: Sequence[str | Path], report: ReadReport, fmt: str | None = None) -> list[Trace]:
    """Traces from files of ``fmt``, or of whatever format each file is (guessed per file when ``fmt`` is None;
    spans of one trace spread over files of several formats are joined by trace id)."""
    if fmt is not None:
        return read_traces(fmt, paths, report)
    files = expand_paths(paths)
    by_format: dict[str, list[Path]] = {}
    for f in files:
        by_format.setdefault(detect_format(f), []).append(f)
    if len(by_format) == 1:
        [(name, fs)] = by_format.items()
        return get_format(name).read(fs, report)
    from ..trace import group_traces, iter_spans

    spans = [s for name, fs in by_format.items() for s in iter_spans(get_format(name).read(fs, report))]
    return group_traces(spans)


def write_traces(fmt: str, traces: Sequence[Trace], path: str | Path) -> None:
    if fmt in FORMATS and not FORMATS[fmt].writable:
        raise UserError(f"format {fmt!r} can be read but not written; writable: {', '.join(writable_formats())}")
    get_format(fmt).write(list(traces), Path(path))


def writable_formats() -> list[str]:
    return [n for n, f in FORMATS.items() if f.writable]


def detect_format(path: str | Path) -> str:
    """Guess a file's format from its name and first bytes; a :class:`UserError` when it cannot tell."""
    from ._io import open_text

    p = Path(path)
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".pb", ".proto", ".protobuf", ".bin")):
        return "otlp-proto"
    try:
        with open_text(p) as fh:
            head = fh.read(4096)
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror or e}") from None
    stripped = head.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise UserError(f"{p}: empty file")
    if name.endswith(".csv") or (stripped and stripped[0] not in "[{"):
        first = stripped.splitlines()[0].lower() if stripped else ""
        if "traceid" in first and "spanid" in first:
            return "spancsv"
        if "rpcid" in first or "rpc_id" in first:
            return "alibaba"
        if "\x00" in head:
            return "otlp-proto"
        raise UserError(f"{p}: cannot tell the format from its header; pass --format")
    otlp_keys = ('"resourceSpans"', '"resource_spans"', '"scopeSpans"', '"instrumentationLibrarySpans"', '"batches"')
    if any(k in head for k in otlp_keys):  # Tempo's {"batches": ...} and bare ResourceSpans lines are OTLP too
        return "otlp-json"
    if stripped.startswith("{") and ('"data"' in head or '"spans"' in head or '"processes"' in head):
        return "jaeger"
    if stripped.startswith("["):
        probe = stripped[1:].lstrip()
        if probe.startswith("{") and ('"spans"' in head[:2000] and '"traceID"' in head):
            return "jaeger"
        return "zipkin"
    raise UserError(f"{p}: cannot tell the format from its content; pass --format")
