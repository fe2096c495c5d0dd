"""Song vectors (`eval.vectors`): text features when the features stage did not run."""
from __future__ import annotations

import copy

import numpy as np

from eval.vectors import text_item_vectors
from llmrec.io import open_run_dir


def test_text_features_are_computed_when_the_features_stage_did_not_run(tmp_path, synthetic_catalog, eval_cfg):
    run = open_run_dir(tmp_path / "run")
    run.catalog.symlink_to(synthetic_catalog.root, target_is_directory=True)
    cfg = copy.deepcopy(eval_cfg)
    cfg.features.text_encoder = "tfidf"  # the features stage's cheap encoder: no model load in a unit test
    ids, vecs, source = text_item_vectors(cfg, run, synthetic_catalog)
    assert len(ids) == len(synthetic_catalog.songs) and vecs.shape[0] == len(ids)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert (run.eval / "text.safetensors").is_file() and "computed by eval" in source
