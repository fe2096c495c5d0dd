"""QLoRA (`model.load_in_4bit: true`): the backbone loaded as bitsandbytes NF4 4-bit weights, LoRA trained on top.

Works on GPUs and, with bitsandbytes >= 0.45, on CPU (tested on a tiny Llama). Use it with one process, DDP or
ZeRO-2; ZeRO-3 would try to partition the packed 4-bit weights, which needs a matching `bnb_4bit_quant_storage`
and is not set up here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from llmrec.model.backbone import add_media_tokens


def quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's recipe: NF4 storage, double quantisation of the scales, matmuls in `compute_dtype`."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _local_dir(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        from llmrec.model.baichuan import is_baichuan_config

        if is_baichuan_config(path):
            raise ValueError(f"model.load_in_4bit: {path} is a Baichuan checkpoint; 4-bit loading needs the Llama "
                             f"layout on disk. Convert it once with `python -m llmrec.model.baichuan {path} DST` "
                             f"and set model.backbone=DST")
        return path
    from huggingface_hub import snapshot_download

    try:
        local_only = os.environ.get("LLMREC_ALLOW_DOWNLOAD") != "1"
        return Path(snapshot_download(str(name_or_path), local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - any hub/cache failure means the same thing to the user
        raise FileNotFoundError(f"backbone {str(name_or_path)!r} is neither a local directory nor in the Hugging "
                                f"Face cache ({type(e).__name__}); set LLMREC_ALLOW_DOWNLOAD=1 to download it"
                                ) from None


def load_backbone_4bit(name_or_path: str | os.PathLike, compute_dtype: torch.dtype | None = None):
    """(4-bit causal LM, tokenizer with the placeholder tokens) from a Llama-layout checkpoint."""
    path = _local_dir(name_or_path)
    on_gpu = torch.cuda.is_available()
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config(compute_dtype),
                                                 device_map={"": device}, dtype=compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if add_media_tokens(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # embeddings are never quantised
    if not on_gpu:
        disable_avx512bf16(model)
    return model, tokenizer


def disable_avx512bf16(model: torch.nn.Module) -> int:
    """bitsandbytes' CPU 4-bit kernel for AVX512-BF16 machines can leave gradients zero after an eval-mode forward
    (DESIGN, training facts); its portable path does not. Returns how many layers were switched."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def prepare_for_qlora(lm: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """peft's k-bit preparation: freeze the 4-bit weights, keep norms/head in fp32, make inputs require grad so LoRA
    gets gradients through checkpointed blocks; non-reentrant checkpointing (see train.distributed)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(lm, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
