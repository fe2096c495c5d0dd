"""The hybrid (`eval.hybrid`): z-scored blend on known songs, content alone plus an offset on new ones."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from eval.hybrid import CachedScores, Hybrid, _znorm


def test_hybrid_blends_warm_songs_and_uses_content_alone_for_cold(fixed_model):
    cf, content = fixed_model([[3.0, 1.0, 0.0, 0.0]]), fixed_model([[0.0, 1.0, 2.0, 5.0]])
    warm = np.array([True, True, False, False])
    z = _znorm(content.s)
    assert np.allclose(Hybrid(cf, content, warm, 0.0).score([0], None), z)
    full_cf = Hybrid(cf, content, warm, 1.0).score([0], None)
    assert np.allclose(full_cf[0, :2], _znorm(cf.s)[0, :2]) and np.allclose(full_cf[0, 2:], z[0, 2:])


def test_hybrid_cold_offset_moves_only_cold_songs_and_cached_scores_match_the_model(fixed_model):
    cf = fixed_model([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    content = fixed_model([[0.0, 1.0, 2.0, 5.0], [1.0, 0.0, 4.0, 2.0]])
    warm = np.array([True, True, False, False])
    base = Hybrid(cf, content, warm, 0.6).score([0, 1], None)
    moved = Hybrid(cf, content, warm, 0.6, cold_offset=-1.5).score([0, 1], None)
    assert np.allclose(moved[:, :2], base[:, :2]) and np.allclose(moved[:, 2:], base[:, 2:] - 1.5)
    train = sp.csr_matrix((3, 4), dtype=np.float32)
    cached = CachedScores(content, np.array([1, 0]), train)
    assert np.allclose(cached.score([0, 1], train), content.s) and np.allclose(cached.score([1], train), content.s[1:])
    with pytest.raises(KeyError, match="not built for"):
        cached.score([2], train)


def test_hybrid_popularity_penalty_lowers_popular_known_songs_only(fixed_model):
    cf = fixed_model([[3.0, 1.0, 2.0, 0.0, 0.0]])
    content = fixed_model([[0.0, 1.0, 2.0, 4.0, 5.0]])
    warm = np.array([True, True, True, False, False])
    pop = np.array([99.0, 9.0, 0.0, 0.0, 0.0])  # song 2 is warm by the mask here; its log(1+plays) is 0
    base = Hybrid(cf, content, warm, 0.5, item_pop=pop).score([0], None)
    penalised = Hybrid(cf, content, warm, 0.5, pop_penalty=0.5, item_pop=pop).score([0], None)
    log_pop = np.log1p(pop[:3])
    expected_z = (log_pop - log_pop.mean()) / log_pop.std()  # z over the known songs only
    assert np.allclose(penalised[0, :3], base[0, :3] - 0.5 * expected_z, atol=1e-6)
    assert np.allclose(penalised[0, 3:], base[0, 3:])  # new songs: content + offset, untouched
    assert penalised[0, 0] < base[0, 0] and penalised[0, 2] > base[0, 2]
    with pytest.raises(ValueError, match="item_pop"):
        Hybrid(cf, content, warm, 0.5, pop_penalty=0.5)
