"""What a user installs: the sdist and the wheel carry the default model where the code looks for it, only as
safetensors and JSON, and the installed package finds it with no checkout around. Also: nothing in otel_tracegen/
lets a model directory run its own Python (trust_remote_code=False on every Hugging Face from_pretrained).

The sdist and the wheel are built here with setuptools' PEP 517 hooks, from a copy of the source tree and with no
network (the wheel from the unpacked sdist, as pip builds it from PyPI). Installing the wheel into a fresh virtual
environment with its inference extra, and running generate, model info and infill file from a directory outside
the checkout, takes minutes and a torch download: .ci/run does that.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from otel_tracegen.lm.model import SHIPPED_MODEL_PACKAGE_DIR

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
PACKAGE = ROOT / "otel_tracegen"
PICKLE_LIKE = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # formats that run code when loaded
SIZE_LIMIT = 50 * 1024 * 1024
BUILD_IGNORED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                       ".hypothesis", "*.pyc", "out", "corpus", ".venv")


def _source_tree_copy(dest: Path) -> Path:
    """The files a build reads, copied: tracked and untracked-but-not-ignored files (as a fresh clone with local
    changes would have them), so that nothing stale (build/, egg-info, local corpora) reaches the build."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy, leaving build products out
        shutil.copytree(ROOT, dest, ignore=BUILD_IGNORED)
        return dest
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _build(hook: str, source: Path, out: Path) -> Path:
    """Run a setuptools PEP 517 hook (build_sdist, build_wheel) in a fresh interpreter in ``source``."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    p = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return out / p.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel): the sdist from a copy of the source tree, the wheel from the unpacked sdist."""
    pytest.importorskip("setuptools", minversion="77")  # the build-system requirement of pyproject.toml
    work = tmp_path_factory.mktemp("dists")
    source = _source_tree_copy(work / "source")
    sdist = _build("build_sdist", source, work / "out")
    with tarfile.open(sdist) as tar:
        # The "data" filter (no absolute paths, links out, devices) where this Python has it.
        tar.extractall(work / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (work / "unpacked").iterdir()
    wheel = _build("build_wheel", unpacked, work / "out")
    return sdist, wheel


def _wheel_files(wheel: Path) -> dict[str, int]:
    with zipfile.ZipFile(wheel) as z:
        return {i.filename: i.file_size for i in z.infolist() if not i.is_dir()}


def _shipped_model_prefix() -> str:
    return f"otel_tracegen/{SHIPPED_MODEL_PACKAGE_DIR}/"


def test_the_wheel_carries_every_model_file_where_the_code_looks(dists):
    _, wheel = dists
    files = _wheel_files(wheel)
    prefix = _shipped_model_prefix()
    shipped = {name[len(prefix):] for name in files if name.startswith(prefix)}
    in_checkout = {p.relative_to(MODEL).as_posix() for p in MODEL.rglob("*") if p.is_file()}
    assert shipped == in_checkout  # all of model/, nothing else
    must = {"model.safetensors", "config.json", "catalog.json", "vocab.json", "tokenizer_config.json",
            "training.json", "adapters/infill/adapter_model.safetensors", "adapters/infill/adapter_config.json",
            "adapters/instruct/adapter_model.safetensors", "adapters/instruct/adapter_config.json"}
    assert must <= shipped, sorted(must - shipped)


def test_what_ships_is_safetensors_and_json_only_and_under_50_mb(dists):
    sdist, wheel = dists
    files = _wheel_files(wheel)
    with tarfile.open(sdist) as tar:
        sdist_names = tar.getnames()
    for name in [*files, *sdist_names]:
        assert not name.lower().endswith(PICKLE_LIKE), name
    prefix = _shipped_model_prefix()
    model_files = {n: size for n, size in files.items() if n.startswith(prefix)}
    assert {PurePosixPath(n).suffix for n in model_files} <= {".safetensors", ".json", ".md"}
    assert sum(model_files.values()) < SIZE_LIMIT
    assert wheel.stat().st_size < SIZE_LIMIT and sdist.stat().st_size < SIZE_LIMIT


def test_the_sdist_carries_the_model_at_the_repository_layout(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {PurePosixPath(n).relative_to(PurePosixPath(n).parts[0]).as_posix() for n in tar.getnames()
                 if len(PurePosixPath(n).parts) > 1}
    for required in ("pyproject.toml", "MANIFEST.in", "README.md", "model/model.safetensors", "model/catalog.json",
                     "model/vocab.json", "model/config.json", "model/adapters/infill/adapter_model.safetensors"):
        assert required in names, required


def test_every_module_of_the_package_is_in_the_wheel(dists):
    # pyproject.toml lists the packages (a mapped one cannot be found): a new subpackage must be added there.
    _, wheel = dists
    files = _wheel_files(wheel)
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert modules and modules <= set(files), sorted(modules - set(files))


def _resolve_in(site: Path, cwd: Path) -> list[str]:
    """Where a fresh interpreter, importing otel_tracegen from ``site`` (an unpacked wheel), finds the package
    and its default model; run from ``cwd`` so that no checkout is on sys.path."""
    code = ("import otel_tracegen, otel_tracegen.lm.model as m; "
            "print(otel_tracegen.__file__); print(m.DEFAULT_MODEL_DIR)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_the_installed_package_finds_its_model_without_a_checkout(dists, tmp_path):
    _, wheel = dists
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    package_file, model_dir = _resolve_in(site, tmp_path)
    assert Path(package_file).parent == site / "otel_tracegen"  # the unpacked wheel, not the checkout
    assert Path(model_dir) == site / "otel_tracegen" / SHIPPED_MODEL_PACKAGE_DIR
    assert (Path(model_dir) / "model.safetensors").is_file() and (Path(model_dir) / "config.json").is_file()


def test_an_installed_package_without_its_model_does_not_take_a_stray_model_dir(dists, tmp_path):
    # site-packages/model belongs to nobody we know: only a source checkout (pyproject.toml beside it) counts.
    _, wheel = dists
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site, [n for n in z.namelist() if not n.startswith(_shipped_model_prefix())])
    (site / "model").mkdir()
    (site / "model" / "config.json").write_text("{}")
    _, model_dir = _resolve_in(site, tmp_path)
    assert Path(model_dir) != site / "model"
    assert Path(model_dir).parent == site / "otel_tracegen"  # named in the error: where the model should be


def test_the_checkout_resolves_the_default_model():
    from otel_tracegen.lm.model import DEFAULT_MODEL_DIR

    assert DEFAULT_MODEL_DIR.is_dir() and (DEFAULT_MODEL_DIR / "model.safetensors").is_file()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_declared_in_pyproject():
    """Each module otel_tracegen imports (at the top or inside a function) comes from a distribution that the
    base dependencies or an extra declare; a new import needs its extra."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    declared = {_canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}
    imported: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "otel_tracegen":
                    imported.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    assert {"torch", "safetensors", "yaml", "requests", "grpc"} <= set(imported)  # the scan sees lazy imports
    provided_by = packages_distributions()
    for module, where in sorted(imported.items()):
        distributions = {_canonical(d) for d in provided_by.get(module, [])}
        assert distributions & declared, f"{where} imports {module} ({sorted(distributions)}): declare it"


# --- no remote code -------------------------------------------------------------------------------------------


def _own_from_pretrained_classes(trees: dict[Path, ast.Module]) -> set[str]:
    """Our classes that define ``from_pretrained`` (the runtime, the tokenizer, ...): they never run model code."""
    return {node.name for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(isinstance(f, ast.FunctionDef) and f.name == "from_pretrained" for f in node.body)}


def _callee_name(call: ast.Call) -> str:
    owner = call.func.value  # type: ignore[attr-defined]
    if isinstance(owner, ast.Name):
        return owner.id
    if isinstance(owner, ast.Attribute):
        return owner.attr
    return ast.unparse(owner)


def test_every_hugging_face_from_pretrained_refuses_remote_code():
    """transformers runs Python shipped in a model directory when trust_remote_code is true, and asks on a
    terminal when it is left unset; peft accepts the flag and passes it on. Every such call says False."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}
    own = _own_from_pretrained_classes(trees)
    checked: dict[str, list[str]] = {}
    for path, tree in trees.items():
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "from_pretrained"):
                continue
            callee = _callee_name(call)
            if callee in own or callee == "cls":
                continue
            where = f"{path.relative_to(ROOT)}:{call.lineno} {callee}.from_pretrained"
            flag = next((k.value for k in call.keywords if k.arg == "trust_remote_code"), None)
            assert isinstance(flag, ast.Constant) and flag.value is False, f"{where}: needs trust_remote_code=False"
            checked.setdefault(callee, []).append(where)
    # The scan sees the calls it must see (a scan that finds nothing would pass vacuously).
    assert {"AutoModelForCausalLM", "AutoTokenizer", "PeftModel"} <= set(checked), checked
