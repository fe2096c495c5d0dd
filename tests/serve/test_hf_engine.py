"""The transformers engine: batches give the one-by-one outputs, embeddings are the model's own, factory choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrec.config import ServeConfig
from llmrec.text import answer_text
from serve.engines import load_engine, resolve_engine_name
from serve.engines.base import EngineInput, concat_media
from serve.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return HFEngine(tiny_bundle)


def test_embeddings_are_unit_norm_and_equal_the_models_own(engine, embed_inputs):
    emb = engine.embed(embed_inputs)
    assert emb.shape == (len(embed_inputs), engine.embedding_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    model = engine.model
    for item, row in zip(embed_inputs, emb):
        ids = torch.tensor([model.prompt_token_ids(item.prompt)])
        with torch.no_grad():
            ref = model.embed(ids, torch.ones_like(ids), item.media)[0].numpy()
        np.testing.assert_allclose(row, ref, atol=1e-5)
    # different songs (and a song without audio) get different embeddings
    assert np.abs(emb[0] - emb[1]).max() > 1e-3 and np.abs(emb[2] - emb[3]).max() > 1e-3


def test_batched_embeddings_and_reasons_equal_one_by_one(engine, embed_inputs, reason_inputs):
    batched = engine.embed(embed_inputs)
    single = np.concatenate([engine.embed([it]) for it in embed_inputs])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    texts = engine.generate(reason_inputs, max_new_tokens=12)
    assert texts == [engine.generate([it], max_new_tokens=12)[0] for it in reason_inputs]
    assert all(isinstance(t, str) and t == t.strip() for t in texts)
    assert any(texts)  # an untrained model still writes something (random tokens)


def test_generate_is_greedy_from_the_spliced_prompt(engine, reason_inputs):
    item = reason_inputs[2]
    model = engine.model
    ids = torch.tensor([model.prompt_token_ids(item.prompt)])
    out = model.generate(ids, torch.ones_like(ids), item.media, max_new_tokens=8)
    assert engine.generate([item], 8) == [answer_text(model.tokenizer.decode(out[0], skip_special_tokens=True))]
    # the media rows matter: other audio/cover features change the spliced embeddings
    other = EngineInput(item.prompt, concat_media([item, item]))
    with pytest.raises(ValueError, match="placeholder tokens"):
        engine.generate([other], 8)


def test_a_reason_ends_at_the_first_newline(engine):
    tok = engine.model.tokenizer
    ids = tok("Like the rock song you played.\nQuestion: Why would", add_special_tokens=False).input_ids
    assert engine.decode([ids, ids[:3]]) == ["Like the rock song you played.",
                                            tok.decode(ids[:3], skip_special_tokens=True).strip()]


def test_errors_name_the_problem(engine, embed_inputs, media_factory):
    with pytest.raises(ValueError, match="must end with <emb>"):
        engine.embed([EngineInput("no embedding token here", media_factory(0, 0))])
    long = EngineInput("word " * 3000 + "<emb>", media_factory(0, 0))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.embed([long])
    assert engine.embed([]).shape == (0, engine.embedding_dim) and engine.generate([], 4) == []


def test_factory_picks_and_rejects_engines(tiny_bundle, monkeypatch):
    assert isinstance(load_engine(tiny_bundle, ServeConfig(engine="hf")), HFEngine)
    with pytest.raises(ValueError, match=r"serve.engine='tgi' is unknown; choose one of \['auto', 'vllm', 'hf'\]"):
        load_engine(tiny_bundle, ServeConfig(engine="tgi"))
    monkeypatch.setattr("serve.engines.vllm_available", lambda: False)
    assert resolve_engine_name("auto") == "hf"
    monkeypatch.setattr("serve.engines.vllm_available", lambda: True)
    assert resolve_engine_name("auto") == "vllm"
