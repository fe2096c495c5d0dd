"""Ranking (`eval.scoring`): seen songs masked, ties broken in a fixed random order."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from eval.data import tie_order
from eval.scoring import rank_users


def test_ties_are_broken_in_a_fixed_random_order_not_by_catalogue_index(fixed_model):
    n = 50
    train = sp.csr_matrix(([1.0], ([1], [3])), shape=(2, n), dtype=np.float32)  # user 1 has seen song 3
    order = tie_order(n, seed=0)
    flat = rank_users(fixed_model(np.zeros((2, n))), train, np.array([0, 1]), 5, [None], order)[0]
    assert list(flat[0]) == list(order[:5]) != list(range(5))  # all tied: the shuffled order decides
    assert 3 not in flat[1]  # a seen song is never recommended, whatever the order
    graded = rank_users(fixed_model(-np.arange(n)[None, :]), train, np.array([0]), 5, [None], order)[0]
    assert list(graded[0]) == [0, 1, 2, 3, 4]  # real score differences are untouched
