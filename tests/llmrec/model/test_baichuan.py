"""Baichuan2 -> Llama conversion is checked against an independent forward pass written from the Baichuan2-7B
architecture (fused W_pack attention, RoPE, RMSNorm, SwiGLU, NormHead), not against the converter's own output."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from llmrec.model.baichuan import (
    convert_baichuan_checkpoint,
    convert_baichuan_state_dict,
    is_baichuan_config,
    llama_config_from_baichuan,
    load_baichuan_as_llama,
    uses_norm_head,
)

HIDDEN, LAYERS, HEADS, INTER, VOCAB = 64, 2, 4, 128, 100

# Shaped like Baichuan2-7B-Chat's config.json, scaled down.
TINY_CFG = {
    "architectures": ["BaichuanForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    },
    "model_type": "baichuan",
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "rms_norm_eps": 1e-6,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "model_max_length": 64,
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
}

# Baichuan2-13B-Chat's config.json (abridged): ALiBi, so it must be refused.
BAICHUAN2_13B_CFG = {
    "architectures": ["BaichuanForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    },
    "model_type": "baichuan",
    "hidden_act": "silu",
    "hidden_size": 5120,
    "intermediate_size": 13696,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "model_max_length": 4096,
    "rms_norm_eps": 1e-6,
    "vocab_size": 125696,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def make_baichuan_state_dict(seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "model.embed_tokens.weight": rnd(vocab, HIDDEN, scale=1.0),
        "model.norm.weight": 1.0 + rnd(HIDDEN),
        # Rows with very different norms, so that forgetting the NormHead normalisation changes the logits.
        "lm_head.weight": rnd(vocab, HIDDEN, scale=1.0) * torch.rand(vocab, 1, generator=g).mul(5).add(0.1),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "self_attn.W_pack.weight"] = rnd(3 * HIDDEN, HIDDEN, scale=0.3)
        sd[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HIDDEN)
        sd[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN)
        sd[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN)
        sd[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER)
        sd[p + "input_layernorm.weight"] = 1.0 + rnd(HIDDEN)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + rnd(HIDDEN)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Baichuan2-7B's forward pass in plain torch (after modeling_baichuan.py), no padding, no cache."""
    hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    head_dim = hidden // heads
    batch, seq = input_ids.shape

    def rms_norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(seq).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # (seq, head_dim), broadcast over batch and heads
    causal = torch.full((seq, seq), float("-inf")).triu(1)

    x = sd["model.embed_tokens.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"])
        # Baichuan: proj.unflatten(-1, (3, hidden_size)) -> q, k, v = proj[..., 0, :], proj[..., 1, :], proj[..., 2, :]
        proj = (h @ sd[p + "self_attn.W_pack.weight"].T).unflatten(-1, (3, hidden))
        q, k, v = (proj[..., j, :].view(batch, seq, heads, head_dim).transpose(1, 2) for j in range(3))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, seq, hidden)
        x = x + out @ sd[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, sd["model.norm.weight"])
    return x @ F.normalize(sd["lm_head.weight"]).T  # NormHead


@pytest.fixture(scope="module")
def baichuan_sd() -> dict[str, torch.Tensor]:
    return make_baichuan_state_dict()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference_logits(baichuan_sd, input_ids) -> torch.Tensor:
    return reference_forward(baichuan_sd, TINY_CFG, input_ids)


def build_converted(sd: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(llama_config_from_baichuan(TINY_CFG))
    model.load_state_dict(convert_baichuan_state_dict(sd, TINY_CFG), strict=True)
    return model.eval()


def test_config_mapping():
    cfg = llama_config_from_baichuan(TINY_CFG)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (HIDDEN, INTER, LAYERS)
    assert cfg.num_attention_heads == cfg.num_key_value_heads == HEADS
    assert cfg.vocab_size == VOCAB and cfg.max_position_embeddings == 64 and cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings is False
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert is_baichuan_config(TINY_CFG) and not is_baichuan_config({"model_type": "llama"})


def test_real_baichuan2_7b_config_is_accepted():
    # Baichuan2-7B-Chat's shape: RoPE, so it must not trip the 13B/ALiBi detection.
    real = {**BAICHUAN2_13B_CFG, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_hidden_layers": 32, "max_position_embeddings": 4096}
    cfg = llama_config_from_baichuan(real)
    assert cfg.head_dim == 128 and cfg.max_position_embeddings == 4096 and uses_norm_head(real)


def test_converted_logits_match_reference(baichuan_sd, input_ids, reference_logits):
    model = build_converted(baichuan_sd)
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-5)
    # The head really was normalised (the test weights are built so that this matters).
    assert torch.allclose(model.lm_head.weight.norm(dim=-1), torch.ones(VOCAB), atol=1e-6)
    assert not torch.allclose(baichuan_sd["lm_head.weight"].norm(dim=-1), torch.ones(VOCAB), atol=1e-2)


def test_baichuan1_head_is_not_normalised(baichuan_sd):
    v1 = {**TINY_CFG, "architectures": ["BaiChuanForCausalLM"]}
    assert not uses_norm_head(v1) and uses_norm_head(TINY_CFG)
    converted = convert_baichuan_state_dict(baichuan_sd, v1)
    assert torch.equal(converted["lm_head.weight"], baichuan_sd["lm_head.weight"])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_checkpoint_round_trip(tmp_path, baichuan_sd, input_ids, reference_logits, fmt):
    src, dst = tmp_path / "baichuan", tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(TINY_CFG))
    if fmt == "safetensors":
        save_file(baichuan_sd, str(src / "model.safetensors"))
    else:
        # Old .bin checkpoints also carry the rotary inv_freq buffer, which must be dropped.
        torch.save({**baichuan_sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)},
                   src / "pytorch_model.bin")

    assert convert_baichuan_checkpoint(src, dst) == dst
    assert not (tmp_path / "llama.tmp").exists()
    assert (dst / "model.safetensors").is_file()
    record = json.loads((dst / "conversion.json").read_text())
    assert record["source"] == str(src.resolve()) and record["source_model_type"] == "baichuan"
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llama"

    model = LlamaForCausalLM.from_pretrained(dst).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference_logits, atol=1e-5, rtol=1e-5)

    # The in-memory loader gives the same model without writing anything.
    in_memory = load_baichuan_as_llama(src)
    with torch.no_grad():
        torch.testing.assert_close(in_memory(input_ids).logits, reference_logits, atol=1e-5, rtol=1e-5)

    with pytest.raises(FileExistsError):
        convert_baichuan_checkpoint(src, dst)
    convert_baichuan_checkpoint(src, dst, overwrite=True)
    assert (dst / "conversion.json").is_file()


@pytest.mark.parametrize(
    "cfg",
    [BAICHUAN2_13B_CFG, {**TINY_CFG, "position_embedding_type": "alibi"}],
    ids=["baichuan2-13b", "explicit-alibi"],
)
def test_alibi_models_are_refused(tmp_path, cfg):
    with pytest.raises(ValueError, match="ALiBi") as excinfo:
        llama_config_from_baichuan(cfg)
    assert "Baichuan2-7B" in str(excinfo.value)
    # The checkpoint converter refuses from config.json alone, before looking for (13B-sized) weights.
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="ALiBi"):
        convert_baichuan_checkpoint(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_w_pack_is_named(baichuan_sd):
    key = "model.layers.1.self_attn.W_pack.weight"
    broken = {k: v for k, v in baichuan_sd.items() if k != key}
    with pytest.raises(KeyError, match=re.escape(key)):
        convert_baichuan_state_dict(broken, TINY_CFG)


def test_lora_targets_llama_projections(baichuan_sd, input_ids):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        build_converted(baichuan_sd), LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total
    wrapped = {name.rsplit(".", 2)[-2] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert wrapped == set(targets)
    # LoRA B starts at zero, so the adapted model still computes the base model's logits.
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids).logits, reference_forward(baichuan_sd, TINY_CFG, input_ids), atol=1e-5, rtol=1e-5
        )


def test_tokenizer_fallback_without_sentencepiece(tmp_path, baichuan_sd, monkeypatch):
    """Without sentencepiece the converter still ships tokenizer.model plus a LlamaTokenizer config."""
    import llmrec.model.baichuan as baichuan

    def no_sentencepiece(src_dir):
        raise ImportError("loading Baichuan's tokenizer.model needs the 'sentencepiece' package")

    monkeypatch.setattr(baichuan, "load_baichuan_tokenizer", no_sentencepiece)
    src = tmp_path / "baichuan"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(TINY_CFG))
    save_file(baichuan_sd, str(src / "model.safetensors"))
    (src / "tokenizer.model").write_bytes(b"stand-in for a sentencepiece model")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "tokenizer_class": "BaichuanTokenizer", "eos_token": {"content": "</s>"}}
    ))
    dst = convert_baichuan_checkpoint(src, tmp_path / "llama")
    assert (dst / "tokenizer.model").read_bytes() == b"stand-in for a sentencepiece model"
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer" and tok_cfg["add_prefix_space"] is False
    assert tok_cfg["add_bos_token"] is False and tok_cfg["eos_token"] == "</s>" and tok_cfg["pad_token"] == "<unk>"
    assert "sentencepiece" in json.loads((dst / "conversion.json").read_text())["tokenizer"]


def test_tokenizer_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="converting tokenizer.model needs the sentencepiece package")
    pytest.importorskip("google.protobuf", reason="converting tokenizer.model needs the protobuf package")
    import io

    from transformers import AutoTokenizer

    from llmrec.model.baichuan import load_baichuan_tokenizer

    corpus = ["the quick brown fox jumps over the lazy dog 12345", "jazz and rock playlists for 2024",
              "周杰伦 的 歌 很 好听", "hello   world  with   spaces"] * 20
    buf = io.BytesIO()
    # Trained like Baichuan2's tokenizer: BPE, byte fallback, split digits, no dummy prefix, no normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<reserved_106>", "<reserved_107>"], minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    src = tmp_path / "baichuan"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": True}
    (src / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": {**added, "content": "<s>"}, "eos_token": {**added, "content": "</s>"},
        "pad_token": {**added, "content": "<unk>"}, "unk_token": {**added, "content": "<unk>"},
        "model_max_length": 64, "tokenizer_class": "BaichuanTokenizer",
    }))

    tokenizer = load_baichuan_tokenizer(src)
    texts = ["the quick fox 987", " leading space", "周杰伦 很 好听 🎵", "hello   world",
             "<reserved_106>hi<reserved_107>"]
    for text in texts:
        assert tokenizer.encode(text) == sp.encode(text), text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<unk>")

    # Through the checkpoint converter, the tokenizer reloads with plain AutoTokenizer.
    (src / "config.json").write_text(json.dumps(TINY_CFG))
    save_file(make_baichuan_state_dict(), str(src / "model.safetensors"))
    dst = convert_baichuan_checkpoint(src, tmp_path / "llama")
    reloaded = AutoTokenizer.from_pretrained(dst)
    for text in texts:
        assert reloaded.encode(text) == sp.encode(text), text


def write_baichuan2_dir(src, texts: list[str], vocab: int = 600) -> None:
    """A tiny checkpoint in Baichuan2's on-disk format: config.json (BaichuanForCausalLM, remote-code auto_map),
    W_pack safetensors and a sentencepiece tokenizer.model trained like Baichuan2's, on `texts`."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab, byte_fallback=True,
        split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    src.mkdir(parents=True)
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    n_vocab = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    (src / "config.json").write_text(json.dumps({**TINY_CFG, "vocab_size": n_vocab, "max_position_embeddings": 512,
                                                  "model_max_length": 512}))
    save_file(make_baichuan_state_dict(0, n_vocab), str(src / "model.safetensors"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "tokenizer_class": "BaichuanTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}))


@pytest.mark.slow
def test_base_path_end_to_end_from_a_baichuan2_directory(tmp_path, synthetic_catalog):
    """The `base` preset's backbone path on a tiny Baichuan2-format directory: loaded (converted to the Llama
    layout in memory), trained through stages 1-2 with LoRA, exported, and served one recommendation request."""
    import argparse
    import copy

    from fastapi.testclient import TestClient

    from data_prep.features import run_features
    from data_prep.prepare import run_prepare
    from llmrec.config import load_config
    from llmrec.io import open_run_dir
    from serve.app import create_app
    from serve.build_index import build_index
    from serve.engines.hf import HFEngine
    from serve.state import load_state
    from train.stages import run_train

    pytest.importorskip("sentencepiece")
    texts = [f"{r.title} by {r.artist}. {' '.join(r.genres)} {str(r.lyrics)[:200]}" for r in
             synthetic_catalog.songs.itertuples()] * 3
    src = tmp_path / "baichuan2-tiny"
    write_baichuan2_dir(src, texts)
    run = open_run_dir(tmp_path / "run")
    cfg = load_config(extra_presets=["quick"], overrides=[
        f"model.backbone={src}", "synthetic.n_songs=40", "synthetic.n_new_songs=8", "synthetic.n_users=30",
        "synthetic.n_artists=8", "synthetic.events_per_user=20", "synthetic.audio_seconds=1.5",
        "model.embedding_dim=16", "model.lora_r=4", "features.workers=1", "features.encoder_pretrain_steps=2",
        "features.encoder_pretrain_batch=4", "features.text_encoder=tfidf", "train.stage1_steps=2",
        "train.stage2_steps=2", "train.batch_size=2", "train.max_length=384", "train.ablations=false"])
    args = argparse.Namespace(no_progress=True)
    run_prepare(cfg, run, args)
    run_features(cfg, run, args)
    run_train(cfg, run, args)
    bundle = json.loads((run.model / "bundle" / "bundle.json").read_text())
    assert bundle["backbone"] == str(src)
    lm_cfg = json.loads((run.model / "bundle" / "lm" / "config.json").read_text())
    assert lm_cfg["model_type"] == "llama" and lm_cfg["num_hidden_layers"] == LAYERS  # converted, LoRA merged

    engine = HFEngine(run.model / "bundle")
    serve_cfg = copy.deepcopy(cfg)
    build_index(serve_cfg, run, engine, progress=False)
    state = load_state(serve_cfg, run, engine=engine)
    user = next(u for u, h in state.inputs.histories.items() if h)
    with TestClient(create_app(state)) as client:
        r = client.post("/v1/recommendations", json={"user_id": user, "k": 3, "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    items = r.json()["data"]
    assert len(items) == 3 and all(isinstance(it["reason"], str) for it in items)
