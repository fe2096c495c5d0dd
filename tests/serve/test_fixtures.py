"""The serving fixtures themselves: the tiny bundle loads as exported and the request rows fit it."""
from __future__ import annotations

import json

import torch

from llmrec.model.bundle import load_bundle
from llmrec.model.mm_lm import expand_placeholders
from serve.engines.base import check_embed_prompt


def test_tiny_bundle_loads_and_request_rows_fit_it(tiny_bundle, embed_inputs, reason_inputs):
    model, meta = load_bundle(tiny_bundle)
    assert meta["content_hash"] == json.loads((tiny_bundle / "bundle.json").read_text())["content_hash"]
    assert len(meta["content_hash"]) == 64
    for item in embed_inputs:
        ids = model.prompt_token_ids(item.prompt)
        check_embed_prompt(model, ids)
        assert ids.count(model.audio_id) == model.cfg.audio_tokens * item.media.audio.shape[0] == model.cfg.audio_tokens
        assert len(ids) <= model.lm.config.max_position_embeddings
    for item in reason_inputs:
        ids = torch.tensor([model.prompt_token_ids(item.prompt)])
        assert int((ids == model.cover_id).sum()) == model.cfg.cover_tokens * item.media.cover.shape[0]
        assert model.splice(ids, item.media).shape == (1, ids.shape[1], model.lm.config.hidden_size)
    assert "<audio>" in expand_placeholders(reason_inputs[-1].prompt, 1, 1)
