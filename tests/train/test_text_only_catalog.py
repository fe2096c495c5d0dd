"""A real catalog without audio or covers (like lastfm-2k) goes through features, training and export: every
placeholder gets the learned "missing" embedding, and the embeddings still come out for every song."""
from __future__ import annotations

import argparse

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from data_prep.features import run_features
from data_prep.prepare import run_prepare
from llmrec.config import load_config
from llmrec.features import load_media_features
from llmrec.io import open_run_dir
from train.stages import run_train

pytestmark = pytest.mark.slow

SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
         "model.tokenizer_vocab=600", "model.embedding_dim=16", "model.lora_r=4", "features.workers=1",
         "features.encoder_pretrain_steps=2", "features.encoder_pretrain_batch=4", "features.text_encoder=tfidf",
         "train.stage0_steps=4", "train.stage1_steps=2", "train.stage2_steps=3", "train.batch_size=4",
         "train.save_every=0"]


def test_catalog_without_media_trains_and_embeds_every_song(tmp_path, synthetic_catalog):
    source = tmp_path / "table"
    source.mkdir()
    songs = synthetic_catalog.songs.copy()
    songs["audio_path"] = None
    songs["cover_path"] = None
    songs.to_parquet(source / "songs.parquet")
    synthetic_catalog.users.to_parquet(source / "users.parquet")
    inter = synthetic_catalog.interactions
    inter[inter.user_id.isin(sorted(set(inter.user_id))[:40])].to_parquet(source / "interactions.parquet")

    run = open_run_dir(tmp_path / "run")
    cfg = load_config(extra_presets=["quick"], overrides=SMALL + ["catalog.source=table",
                                                                   f"catalog.path={source}"])
    args = argparse.Namespace(no_progress=True)
    run_prepare(cfg, run, args)
    run_features(cfg, run, args)
    feats = load_media_features(run.features)
    assert not feats.audio_present.any() and not feats.cover_present.any()
    run_train(cfg, run, args)

    with safe_open(str(run.model / "embeddings.safetensors"), "pt") as f:
        emb = f.get_tensor("embeddings")
        ids = __import__("json").loads(f.metadata()["song_ids"])
    assert sorted(ids) == sorted(songs.song_id) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(ids)))
    assert pd.Series(emb.numpy().round(4).tolist()).map(tuple).nunique() == len(ids)  # text still separates songs
    # no modality ablations without any media; the no-LM heads (train/head_refit.py) are there
    assert [p.name for p in run.model.glob("embeddings-*.safetensors")] == ["embeddings-no-lm.safetensors"]
