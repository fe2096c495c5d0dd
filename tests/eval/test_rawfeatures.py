"""The no-LLM bar's features (`eval.rawfeatures`)."""
from __future__ import annotations

import numpy as np

from eval.rawfeatures import concat_blocks


def test_raw_feature_blocks_are_standardised_to_equal_variance():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(50, 4)) * 100.0
    cover = rng.normal(size=(50, 16)) * 0.01
    cover[:10] = 0.0  # ten songs without a cover
    x = concat_blocks({"text": text, "cover": cover})
    assert x.shape == (50, 20)
    np.testing.assert_allclose((x[:, :4] ** 2).sum(1).mean(), 1.0, rtol=1e-5)
    np.testing.assert_allclose((x[10:, 4:] ** 2).sum(1).mean(), 1.0, rtol=1e-5)
    assert not x[:10, 4:].any()  # a missing block stays zero
