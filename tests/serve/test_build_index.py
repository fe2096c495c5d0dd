"""`serve.build_index`: the progress bar covers prompt building, and Ray embedders share the node's vLLM memory."""
from __future__ import annotations

import copy

from llmrec.config import ServeConfig
from serve.build_index import actor_serve_config, build_index


def test_local_actors_split_the_vllm_memory_fraction():
    # Two actors each reserving the whole fraction overcommitted a 23.5 GB node at 100k songs (Ray OOM-killed one).
    cfg = ServeConfig(vllm_memory_fraction=0.2)
    assert actor_serve_config(cfg, 2).vllm_memory_fraction == 0.1
    assert actor_serve_config(cfg, 1) is cfg
    assert cfg.vllm_memory_fraction == 0.2  # the caller's config is left alone


def test_an_explicit_kv_cache_size_is_kept_for_every_actor():
    cfg = ServeConfig(vllm_memory_fraction=0.2, vllm_kv_cache_gib=1.5)
    assert actor_serve_config(cfg, 4) is cfg


def test_the_progress_bar_counts_every_song_embedded(serve_run, capsys):
    # Building the prompts is part of the bar (at 100k songs it was 10 silent minutes before any bar appeared).
    from serve.engines.hf import HFEngine

    cfg, run = serve_run
    index = build_index(copy.deepcopy(cfg), run, HFEngine(run.model / "bundle"), progress=True)
    err = capsys.readouterr().err
    n = len(index)
    assert "embedding the catalogue" in err and f"{n}/{n}" in err
