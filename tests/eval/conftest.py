"""Fixtures of the eval tests."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from eval.baselines import Recommender


class FixedScores(Recommender):
    """A model with fixed score rows (one per user)."""

    def __init__(self, s):
        self.s, self.n_items = np.asarray(s, np.float32), len(s[0])

    def fit(self, train, **side):
        return self

    def score(self, user_idx, train):
        return self.s[np.asarray(user_idx)]


@pytest.fixture
def fixed_model() -> type[FixedScores]:
    """The class of models with fixed score rows: `fixed_model([[...], ...])`."""
    return FixedScores


@pytest.fixture(scope="module")
def eval_cfg(quick_config):
    """The quick config with a short bootstrap."""
    cfg = copy.deepcopy(quick_config)
    cfg.eval.bootstrap = 50
    return cfg
