"""What a benchmark ran on: the CPU, the cores this process may use, and the versions that matter.

A figure without its machine cannot be compared, so the benchmarks under ``benchmarks/`` record this beside their
results, with their settings. Only the standard library and ``lscpu`` (when present) are read; nothing here fails.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), else what ``platform`` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    return model or platform.processor() or platform.machine()


def describe(packages: tuple[str, ...] = ()) -> dict:
    """The machine and the versions of ``packages`` (None where one is not installed), as a JSON-ready dict."""
    versions = {}
    for dist in packages:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    from .cpu import cpu_budget

    budget = cpu_budget()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": budget.cpus, "limited_by": budget.source,
            "kernel": platform.release(), "python": platform.python_version(), **versions}


def recorded_path(path: str | Path, root: Path) -> str:
    """``path`` as a result file records it: relative to the checkout ``root`` when inside it, as ``../...`` when
    beside it (``../shared``), else as it is (a scratch directory such as ``/tmp``)."""
    resolved, root = Path(path).resolve(), root.resolve()
    if resolved.is_relative_to(root):
        return str(resolved.relative_to(root))
    if resolved.is_relative_to(root.parent):
        return str(Path("..") / resolved.relative_to(root.parent))
    return str(path)


def recorded_settings(settings: dict, root: Path) -> dict:
    """A benchmark's settings as recorded beside its machine: paths by :func:`recorded_path` (a result file must not
    name the machine's directories), other values as they are."""
    return {key: recorded_path(value, root) if isinstance(value, Path) else value for key, value in settings.items()}
