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


def test_validation_users_are_sampled_only_above_the_cell_budget(synthetic_catalog, eval_cfg):
    split = split_catalog(synthetic_catalog, eval_cfg.eval.split, eval_cfg.eval.valid_days)
    inner = tuning_split(split, eval_cfg.seed)
    n_songs, users = len(synthetic_catalog.songs), inner.test["user_id"].unique()
    whole, note = tuning.sample_validation_users(inner, n_songs, n_songs * len(users), seed=0)
    assert whole is inner and note == ""
    assert tuning.sample_validation_users(inner, n_songs, 0, seed=0)[0] is inner  # 0 = never sample
    cut, note = tuning.sample_validation_users(inner, n_songs, n_songs * 7, seed=0)
    assert cut.test["user_id"].nunique() == 7 and f"7 of {len(users):,}" in note
    assert set(cut.test["user_id"]) <= set(users)
    # every sampled user keeps all of their validation plays; the training part is untouched
    kept = inner.test[inner.test["user_id"].isin(cut.test["user_id"])]
    assert len(cut.test) == len(kept) and cut.train is inner.train and cut.cold_songs == inner.cold_songs
    again, _ = tuning.sample_validation_users(inner, n_songs, n_songs * 7, seed=0)
    assert set(again.test["user_id"]) == set(cut.test["user_id"])  # seeded: the same users every run
    tuned = tuning.tune(synthetic_catalog, inner, np.ones((n_songs, 4), np.float32), None, 0, False,
                        max_cells=n_songs * 7)
    assert "validation users sampled: 7 of" in tuned.how
