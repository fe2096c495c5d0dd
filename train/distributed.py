"""The training strategy from config: one process, DDP, or DeepSpeed ZeRO-2/3 (optionally offloaded) via accelerate.

The launcher decides the world (`torchrun`, `deepspeed`, `accelerate launch`, or plain `python` for one process);
`train.deepspeed` (a JSON path, or null for DDP) decides how parameters, gradients and optimizer state are split.
Everything here runs unchanged on CPU (gloo; `DS_ACCELERATOR=cpu` for DeepSpeed) and on GPUs (nccl).

ZeRO-3 partitions every parameter in place (`p.data` becomes an empty placeholder), so weights read after training
are empty unless gathered (peft #453/#2500, LlamaFactory #852). `release` therefore gathers the full parameters on
every rank and hands back a plain module when `fit` ends: saving, embedding and export code need no ZeRO awareness.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

# Keys the JSON configs leave as "auto" and where their value comes from (TrainConfig / the accelerator).
# (train_batch_size is left out of the configs: DeepSpeed derives it from these and the world size.)
AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16.enabled")


def mixed_precision(setting: str) -> str:
    """`auto` -> `bf16` on GPUs that support it, else `no` (CPU bf16 autocast is slower than fp32 on most CPUs)."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting not in ("no", "bf16", "fp16"):
        raise ValueError(f"train.mixed_precision: {setting!r} is not one of auto, no, bf16, fp16")
    return setting


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def _autos(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if d == "auto" else []


def load_ds_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        shipped = sorted(x.name for x in (Path(__file__).parent / "configs").glob("*.json"))
        raise FileNotFoundError(f"train.deepspeed: {p} does not exist (shipped configs in train/configs/: {shipped})")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"train.deepspeed: {p} is not valid JSON: {e}") from None
    if not isinstance(cfg.get("zero_optimization", {}).get("stage", 0), int):
        raise ValueError(f"train.deepspeed: {p}: zero_optimization.stage must be an integer")
    return cfg


# ZeRO buffer sizes that scale with the model, filled like transformers/accelerate do from the hidden size h. Fixed
# sizes tuned for 7B (tens of MB per bucket) would dwarf a small model's savings from partitioning.
HIDDEN_KEYS = {"zero_optimization.reduce_bucket_size": lambda h: h * h,
               "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
               "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h}


def resolve_ds_config(cfg: dict, *, micro_batch: int, grad_accum: int, max_grad_norm: float, precision: str,
                      hidden_size: int | None = None) -> dict:
    """Fill the "auto" values the way accelerate/HF do, so the same JSON also feeds plain `deepspeed.initialize`.
    Without `hidden_size`, hidden-size-based "auto" keys fall back to DeepSpeed's defaults (they are dropped).
    Any other "auto" left over is an error naming the key (DeepSpeed would fail later with a vaguer message)."""
    out = copy.deepcopy(cfg)
    for key, size in HIDDEN_KEYS.items():
        if _get(out, key) == "auto":
            if hidden_size:
                _set(out, key, size(hidden_size))
            else:
                *parents, last = key.split(".")
                del _get(out, ".".join(parents))[last]
    values = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": max_grad_norm,
              "bf16.enabled": precision == "bf16"}
    for key in AUTO_KEYS:
        if _get(out, key) == "auto":
            _set(out, key, values[key])
    if _get(out, "fp16.enabled") == "auto":
        _set(out, "fp16.enabled", precision == "fp16")
    left = _autos(out)
    if left:
        raise ValueError(f"DeepSpeed config: cannot fill 'auto' for {left}; give integer values")
    return out


def build_accelerator(train_cfg, hidden_size: int | None = None, ds_overrides: dict | None = None) -> Accelerator:
    """An Accelerator for `train_cfg` (llmrec.config.TrainConfig) in whatever world the launcher started;
    `hidden_size` (the backbone's) sizes ZeRO's buckets; `ds_overrides` are merged into the DeepSpeed config."""
    on_gpu = torch.cuda.is_available()
    precision = mixed_precision(train_cfg.mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / deepspeed / accelerate launch set it
    # gloo is the CPU collective backend; accelerate would otherwise pick one the CPU build lacks (ccl/nccl). With a
    # single un-launched process there is no group to create, unless DeepSpeed (which always wants one) is on.
    handlers: list = [] if on_gpu or not (launched or train_cfg.deepspeed) else [InitProcessGroupKwargs(backend="gloo")]
    # Stage code may leave a trainable parameter unused in a step (e.g. a modality's `missing` embedding when every
    # song in the batch has that modality): DDP must then not wait for its gradient.
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    kw: dict[str, Any] = {"gradient_accumulation_steps": train_cfg.grad_accum, "mixed_precision": precision,
                          "kwargs_handlers": handlers}
    if train_cfg.deepspeed:
        from accelerate import DeepSpeedPlugin
        ds = resolve_ds_config(load_ds_config(train_cfg.deepspeed), micro_batch=train_cfg.batch_size,
                               grad_accum=train_cfg.grad_accum, max_grad_norm=train_cfg.max_grad_norm,
                               precision=precision, hidden_size=hidden_size)
        if precision == "bf16" and _get(ds, "bf16.enabled") is True and "torch_autocast" not in ds:
            # DeepSpeed's bf16 mode casts every parameter to bf16, but media features arrive in fp32 and the
            # projectors' LayerNorm refuses mixed dtypes. DeepSpeed's torch autocast keeps fp32 master parameters
            # and runs matmuls in bf16 (checked on CPU with ZeRO-2/3), like accelerate's own bf16 without DeepSpeed.
            ds["bf16"]["enabled"] = False
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
            kw["mixed_precision"] = "no"  # DeepSpeed does the autocasting
        for key, value in (ds_overrides or {}).items():
            _set(ds, key, value)
        # ZeRO-3: transformers' from_pretrained/from_config then build each layer already partitioned (zero.Init),
        # so no rank ever holds a whole 7B backbone; models built before this point are partitioned at prepare.
        stage3 = ds.get("zero_optimization", {}).get("stage") == 3
        kw["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=stage3)
        if not on_gpu:
            _skip_deepspeed_shm_op()
    elif not on_gpu:
        kw["cpu"] = True
    return Accelerator(**kw)


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~4 min on 2 cores, once per machine) that
    only `inference_all_reduce` uses; training collectives go through torch.distributed (gloo). Returning None is
    DeepSpeed's own path for platforms without the op. LLMREC_DS_SHM=1 keeps it."""
    if os.environ.get("LLMREC_DS_SHM") != "1":
        import importlib

        # importlib, not `import deepspeed.comm.torch as m`: that name resolves to the `torch` package that
        # deepspeed.comm re-exports, not to DeepSpeed's torch backend module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def backbone_hidden_size(model_cfg) -> int | None:
    """The backbone's hidden size before it is loaded: the tiny preset's, or a local checkpoint's config.json."""
    if model_cfg.backbone == "tiny":
        return model_cfg.hidden_size
    config = Path(model_cfg.backbone) / "config.json"
    try:
        return int(json.loads(config.read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # hub name or odd config: DeepSpeed's default bucket sizes


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def _plain_parameters(module: torch.nn.Module, full: dict[int, torch.Tensor]) -> None:
    """Swap every (ZeRO-3 partitioned) parameter for a plain one holding its gathered value; tied parameters stay
    tied because replacements are keyed by the original parameter's identity."""
    new: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = torch.nn.Parameter(full[id(p)], requires_grad=p.requires_grad)
            sub._parameters[name] = new[id(p)]


def release(accelerator: Accelerator, wrapped: torch.nn.Module, module: torch.nn.Module) -> None:
    """End of `fit`: leave `module` a plain nn.Module with its trained weights on every rank and drop the engine.

    DeepSpeed: the engine's gradient hooks (ZeRO-1/2/3) and parameter-fetch hooks (ZeRO-3) are removed, so a later
    stage can prepare the same module again; under ZeRO-3 the full parameters are gathered first
    (GatheredParameters, all ranks) and swapped in, so `state_dict()`/`save_pretrained` see real tensors.
    """
    if accelerator.state.deepspeed_plugin is not None:
        if zero_stage(accelerator) == 3:
            import deepspeed

            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                full = {id(p): p.data.detach().clone() for p in params}
            wrapped.destroy()
            _plain_parameters(module, full)
        else:
            wrapped.destroy()
    accelerator.free_memory()


def enable_gradient_checkpointing(lm: torch.nn.Module) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing gives gradients to LoRA weights even though
    the (frozen) backbone inputs do not require grad; the reentrant variant would silently give none."""
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(lm, "config", None) is not None:
        lm.config.use_cache = False
