"""QLoRA on CPU: a tiny Llama checkpoint loads as bitsandbytes NF4 4-bit layers, and LoRA on top of it trains
(non-zero gradients, also after an eval-mode forward — the AVX512-BF16 trap in DESIGN's training facts)."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model

from llmrec.config import ModelConfig
from llmrec.model.backbone import build_tiny_llama, train_bpe_tokenizer
from train.qlora import load_backbone_4bit, prepare_for_qlora


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    tok = train_bpe_tokenizer(["a slow piano song", "fast loud drums tonight"] * 20, vocab_size=300)
    lm = build_tiny_llama(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128), tok)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out, lm


def test_tiny_llama_loads_in_4bit_and_lora_gets_gradients(checkpoint):
    path, full = checkpoint
    lm, tok = load_backbone_4bit(path)
    linears = [m for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q k v o gate up down in each of the 2 layers; lm_head stays full precision
    assert linears[0].weight.dtype == torch.uint8  # packed NF4 storage
    assert all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in linears)

    x = torch.tensor([tok("a slow piano song tonight").input_ids])
    with torch.no_grad():
        ref = full(input_ids=x).logits
        q = lm(input_ids=x).logits
    assert (q - ref).abs().max() < 0.25 * ref.abs().max()  # quantised, yet the same function

    lm = prepare_for_qlora(lm, gradient_checkpointing=True)
    lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       task_type="CAUSAL_LM"))
    trainable = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lm.eval()
    with torch.no_grad():
        lm(input_ids=x)
    lm.train()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):  # step 1: only lora_B gets gradient (B starts at zero); after it, lora_A does too
        opt.zero_grad()
        lm(input_ids=x, labels=x).loss.backward()
        opt.step()
    zero = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not zero, zero
