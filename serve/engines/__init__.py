"""Engine factory: vLLM where it imports (config `serve.engine: auto`), else transformers; overridable."""
from __future__ import annotations

import importlib.util
import os

from serve.engines.base import Engine, EngineInput

ENGINES = ("auto", "vllm", "hf")


def vllm_available() -> bool:
    """True when `import vllm` works (find_spec alone is not enough: a broken companion package such as a CUDA
    torchvision makes the import itself fail; README, "vLLM on CPU/GPU")."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "use the transformers engine"
        return False
    return True


def resolve_engine_name(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"serve.engine={name!r} is unknown; choose one of {list(ENGINES)}")
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    return name


def load_engine(bundle_dir: str | os.PathLike, serve_cfg, embed_only: bool = False) -> Engine:
    """The engine named by `serve_cfg.engine` on the bundle in `bundle_dir`. `embed_only`: the caller only embeds
    (`serve --build-index`), so vLLM builds no generating engine beside the pooling one (transformers serves both
    from one model and ignores it)."""
    name = resolve_engine_name(serve_cfg.engine)
    if name == "vllm":
        from serve.engines.vllm import VLLMEngine  # lazy: importing vllm is slow and optional

        return VLLMEngine(bundle_dir, serve_cfg, embed_only=embed_only)
    from serve.engines.hf import HFEngine

    return HFEngine(bundle_dir, serve_cfg)


__all__ = ["ENGINES", "Engine", "EngineInput", "load_engine", "resolve_engine_name", "vllm_available"]
