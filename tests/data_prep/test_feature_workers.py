"""Feature workers on Ray: text features give the in-process encoder's vectors, in input order."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.feature_workers import encode_texts_on_ray
from llmrec.text_features import encode_texts

TEXTS = ["upbeat dance pop with synths", "slow sad piano ballad", "Title: Night Drive\nArtist: Neon",
         "energetic pop dance track", "quiet acoustic folk", "heavy guitar riffs and drums", "lo-fi beats to study"]


@pytest.mark.slow
def test_text_features_on_ray_equal_the_in_process_ones_in_order():
    ray = pytest.importorskip("ray")
    # chunks of 2 over 2 workers: chunks finish out of order, rows must not
    on_ray = encode_texts_on_ray(TEXTS, "minilm", workers=2, chunk_size=2, progress=False)
    assert not ray.is_initialized()  # the session it started is shut down
    local = encode_texts(TEXTS, "minilm")
    assert on_ray.shape == (len(TEXTS), 384) and on_ray.dtype == np.float32
    np.testing.assert_allclose(on_ray, local, atol=1e-5)


def test_tfidf_text_features_are_refused_on_ray_with_the_reason():
    with pytest.raises(ValueError, match="TF-IDF is fitted on the whole corpus"):
        encode_texts_on_ray(TEXTS, "tfidf", workers=2)
