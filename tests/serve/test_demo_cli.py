"""`llmrec serve --build-index` through the CLI, and the demo's serve step against a real uvicorn on loopback."""
from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest

from llmrec.cli import main
from serve.cli import run_serve, serve_engine_name
from serve.index import load_index


def test_cli_build_index_writes_a_fresh_index(serve_run, tiny_bundle, capsys):
    cfg, run = serve_run
    assert main(["serve", "--run-dir", str(run.root), "--build-index", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[serve] done" in out and str(run.index) in out
    from llmrec.model.bundle import read_bundle_meta

    index = load_index(run.index, read_bundle_meta(tiny_bundle)["content_hash"])
    assert sorted(index.song_ids) == sorted(cfg_song_ids(run))  # rebuilt from the catalogue
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)


def cfg_song_ids(run):
    from llmrec.schema import load_catalog

    return list(load_catalog(run.catalog).songs["song_id"])


def test_demo_serves_every_endpoint_on_loopback_and_stops(serve_run, capsys):
    cfg, run = serve_run
    cfg = copy.deepcopy(cfg)
    cfg.serve.engine = "auto"
    assert serve_engine_name(cfg, demo=True) == "hf" and serve_engine_name(cfg, demo=False) == "auto"
    cfg.serve.max_new_tokens = 8
    result = run_serve(cfg, run, argparse.Namespace(demo=True, no_progress=True))
    out = capsys.readouterr().out
    assert "/v1/recommendations for" in out and out.count("reason: ") == 5
    assert "cold start: new song" in out and "/v1/explanations:" in out
    assert result["server"].startswith("http://127.0.0.1:") and result["server"].endswith("stopped")
    assert result["requests served"] >= 5  # health, embeddings x2, recommendations, explanations
    assert len(result["cold start neighbours"].split(", ")) == 5


@pytest.mark.slow
def test_build_index_on_ray_equals_the_local_build(serve_run, tmp_path):
    from serve.build_index import build_index
    from serve.engines.hf import HFEngine

    cfg, run = serve_run
    local = build_index(copy.deepcopy(cfg), run, HFEngine(run.model / "bundle"), progress=False)
    ray_cfg = copy.deepcopy(cfg)
    ray_cfg.features.engine, ray_cfg.features.workers, ray_cfg.serve.embed_batch = "ray", 2, 40
    remote = build_index(ray_cfg, run, progress=False)
    assert remote.song_ids == local.song_ids and remote.bundle_hash == local.bundle_hash
    np.testing.assert_allclose(remote.embeddings, local.embeddings, atol=1e-5)
