"""Helpers shared by the adapters: transparent gzip, and pausing the cyclic GC during bulk work."""

from __future__ import annotations

import gc
import gzip
import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from ..report import ReadReport

BAD_JSON = "invalid JSON"
UNREADABLE = "unreadable file"  # problem reason: missing permissions, corrupt gzip
COUNT_FILES = "files read"  # report.counts key
NOT_JSON = object()  # load_json's answer for text that is not JSON (None is valid JSON)


def open_text(path: Path) -> IO[str]:
    """Open for reading as UTF-8 text, gunzipping ``*.gz`` (or any file starting with the gzip magic)."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def open_write_text(path: Path) -> IO[str]:
    """Open for writing as UTF-8 text, gzipping when the name ends in ``.gz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "wb", compresslevel=6), encoding="utf-8", newline="")
    return open(path, "w", encoding="utf-8", newline="")


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6)
    path.write_bytes(data)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while bulk-decoding or -encoding.

    Reading 500k spans allocates millions of dicts, lists and dataclasses, none in reference cycles; with the
    collector on, its repeated generation-2 scans of the growing heap take about a third of the read time.
    Reference counting still frees everything; the collector is switched back on (if it was on) at the end,
    also on error.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_json(text: str, source: str, report: ReadReport) -> Any:
    """Parse a whole JSON document, skipping a byte order mark (Windows tools write one).

    Invalid JSON becomes one problem naming the file, line and column, and the answer is :data:`NOT_JSON`.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        report.problem(source, BAD_JSON, f"line {exc.lineno} column {exc.colno}: {exc.msg}", dropped=0)
    except (ValueError, RecursionError) as exc:
        report.problem(source, BAD_JSON, f"{type(exc).__name__}: {exc}", dropped=0)
    return NOT_JSON


def read_text_files(paths: Iterable[str | Path], report: ReadReport) -> Iterator[tuple[str, str]]:
    """``(source, text)`` of each readable file; an unreadable one is one problem, and reading goes on."""
    for path in paths:
        try:
            with open_text(Path(path)) as fh:
                text = fh.read()
        except (OSError, EOFError) as exc:
            report.problem(str(path), UNREADABLE, f"{type(exc).__name__}: {exc}", dropped=0)
            continue
        report.counts[COUNT_FILES] += 1
        yield str(path), text
