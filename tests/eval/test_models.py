"""The report's models (`eval.models`): llmrec's user towers."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from eval.baselines import ALS
from eval.models import llmrec_model


def test_llmrec_cf_tower_scores_every_song_through_its_embedding():
    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((30, 12)) < 0.4).astype(np.float32))
    train[:, 11] = 0  # item 11 is cold
    train.eliminate_zeros()
    vectors = rng.normal(size=(12, 5))
    vectors[11] = vectors[0]  # a cold song with the same embedding as a warm one
    als = ALS(factors=4, iterations=5, random_state=0).fit(train)
    model = llmrec_model(vectors, "cf", als, alpha=1.0).fit(train)
    # Warm songs are scored through the mapped embedding too, not through their ALS factors.
    np.testing.assert_allclose(model.item_factors, model.regressor.predict(vectors))
    scores = model.score(np.arange(30), train)
    np.testing.assert_allclose(scores[:, 11], scores[:, 0], rtol=1e-5)
    with pytest.raises(ValueError, match="user_tower"):
        llmrec_model(vectors, "users", als, alpha=1.0)
