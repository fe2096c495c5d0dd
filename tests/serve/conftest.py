"""Serving fixtures: a tiny *untrained* bundle built in seconds (no training), and request rows for it.

The bundle has the exact layout `train/export.py` writes (merged LM dir + tokenizer, multimodal weights, bundle.json
with a content hash), and its media shapes match the run's tiny encoders (`tiny-hubert`: 5 hidden-state layers x
4 tokens x 128, `tiny-vit`: 1 x 4 x 128), so features computed by `MediaEncoder` from an upload fit it. Every
engine test (HF and vLLM) runs against this bundle: random weights are fine for "same output from both engines".
"""
from __future__ import annotations

import pytest

from llmrec.text import build_embed_prompt, build_stage2_prompt
from serve.engines.base import EngineInput
from testkit.tiny_bundle import TINY_MM, build_tiny_bundle, make_serve_run, random_media, tiny_songs

__all__ = ["TINY_MM"]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Path of an untrained serving bundle (bundle.json, lm/, multimodal.safetensors): built once per session."""
    out = tmp_path_factory.mktemp("serve") / "bundle"
    build_tiny_bundle(out)
    return out


@pytest.fixture(scope="session")
def media_factory():
    """`media_factory(n_audio, n_cover, seed=0, missing_every=0) -> MediaBatch` for the tiny bundle's shapes."""
    return random_media


@pytest.fixture(scope="session")
def embed_inputs():
    """Embedding requests of varied prompt lengths: one audio + one cover row each (the 3rd song has no audio)."""
    songs = tiny_songs(6, seed=1)
    return [EngineInput(build_embed_prompt(s).text, random_media(1, 1, seed=10 + i, missing_every=1 if i == 2 else 0))
            for i, s in enumerate(songs)]


@pytest.fixture(scope="session")
def reason_inputs():
    """Stage-2 reason requests: 0..4 history songs + a candidate, media rows in placeholder order."""
    songs = tiny_songs(12, seed=2)
    items = []
    for i, n_hist in enumerate([0, 1, 3, 4]):
        prompt = build_stage2_prompt(songs[i + 1 : i + 1 + n_hist], songs[i])
        items.append(EngineInput(prompt.text, random_media(len(prompt.audio_song_ids), len(prompt.cover_song_ids),
                                                           seed=100 + i)))
    return items


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, synthetic_catalog, tiny_bundle, quick_config):
    """A run directory the server can serve: the quick synthetic catalog (linked), random features for every song,
    the tiny bundle (linked) as model/bundle, and the resolved config. No index yet (tests build it)."""
    import copy

    cfg = copy.deepcopy(quick_config)
    cfg.name = "serve-test"
    cfg.serve.engine = "hf"
    run = make_serve_run(tmp_path_factory.mktemp("runs") / "serve-test", synthetic_catalog.root, tiny_bundle, cfg)
    return cfg, run
