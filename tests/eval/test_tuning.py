"""Tuning (`eval.tuning`): which knobs are searched, and the paired NDCG change behind hybrid-tail's budget."""
from __future__ import annotations

import numpy as np
import pytest

from eval import tuning
from eval.models import DEFAULTS
from llmrec.split import split_catalog, tuning_split


def test_paired_relative_change_against_hand_computed_values():
    # reference mean 0.5; per-user differences / 0.5 = [0.2, -0.2, 0.6] -> mean 0.2, sd 0.4, se 0.4 / sqrt(3)
    change, se = tuning.paired_relative_change([0.6, 0.2, 1.0], [0.5, 0.3, 0.7])
    assert change == pytest.approx(0.2) and se == pytest.approx(0.4 / np.sqrt(3))
    assert all(np.isnan(tuning.paired_relative_change([0.1], [0.2])))  # one user: no standard error
    assert all(np.isnan(tuning.paired_relative_change([0.1, 0.2], [0.0, 0.0])))
    with pytest.raises(ValueError):
        tuning.paired_relative_change([0.1, 0.2], [0.1])


def test_mm2cf_ridge_strength_is_searched_only_when_its_tower_uses_it(synthetic_catalog, eval_cfg):
    split = split_catalog(synthetic_catalog, eval_cfg.eval.split, eval_cfg.eval.valid_days)
    inner = tuning_split(split, eval_cfg.seed)
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(len(synthetic_catalog.songs), 8)).astype(np.float32)
    history = tuning.tune(synthetic_catalog, inner, raw, None, 0, True, user_tower="history", raw=raw)
    assert "mm2cf" not in history.log and history.params["mm2cf"] == DEFAULTS["llmrec"]
    cf = tuning.tune(synthetic_catalog, inner, raw, None, 0, False, user_tower="cf", raw=raw)
    assert len(cf.log["mm2cf"]) == len(tuning.RIDGE_ALPHAS)
