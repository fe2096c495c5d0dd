"""Tuning (`eval.tuning`): which knobs are searched, and the paired NDCG change behind hybrid-tail's budget."""
from __future__ import annotations

import numpy as np
import pytest

from eval import tuning
from llmrec.split import split_catalog, tuning_split


def test_paired_relative_change_against_hand_computed_values():
    # reference mean 0.5; per-user differences / 0.5 = [0.2, -0.2, 0.6] -> mean 0.2, sd 0.4, se 0.4 / sqrt(3)
    change, se = tuning.paired_relative_change([0.6, 0.2, 1.0], [0.5, 0.3, 0.7])
    assert change == pytest.approx(0.2) and se == pytest.approx(0.4 / np.sqrt(3))
    assert all(np.isnan(tuning.paired_relative_change([0.1], [0.2])))  # one user: no standard error
    assert all(np.isnan(tuning.paired_relative_change([0.1, 0.2], [0.0, 0.0])))
    with pytest.raises(ValueError):
        tuning.paired_relative_change([0.1, 0.2], [0.1])


def test_mm2cf_ridge_strength_is_searched_under_either_tower(synthetic_catalog, eval_cfg):
    # under the history tower it is `mm2cf-cf`'s (the bar of `llmrec-cf`); under the CF tower mm2cf's own
    split = split_catalog(synthetic_catalog, eval_cfg.eval.split, eval_cfg.eval.valid_days)
    inner = tuning_split(split, eval_cfg.seed)
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(len(synthetic_catalog.songs), 8)).astype(np.float32)
    for tower in ("history", "cf"):
        tuned = tuning.tune(synthetic_catalog, inner, raw, None, 0, False, user_tower=tower, raw=raw)
        assert [r["alpha"] for r in tuned.log["mm2cf"]] == list(tuning.RIDGE_ALPHAS)
        assert tuned.params["mm2cf"]["alpha"] in tuning.RIDGE_ALPHAS
