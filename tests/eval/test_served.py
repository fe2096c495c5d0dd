"""The report's `llmrec` (history tower) is the list `/v1/recommendations` serves: same functions, same inputs."""
import numpy as np
import pandas as pd
import scipy.sparse as sp

from eval.served import ServedRanking, history_indices
from llmrec.ranking import HISTORY_FOR_QUERY, history_query
from serve.index import SongIndex


def test_served_ranking_scores_equal_the_index_search_of_the_history_query():
    rng = np.random.default_rng(0)
    n_songs, dim = 40, 8
    emb = rng.normal(size=(n_songs, dim)).astype(np.float32) + 2.0  # anisotropic: a shared offset
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    song_ids = np.array([f"s{i:03d}" for i in range(n_songs)])
    user_ids = np.array(["u0", "u1"])
    plays = pd.DataFrame({"user_id": ["u0"] * 60 + ["u1", "u1"],
                          "song_id": [f"s{i % 35:03d}" for i in range(60)] + ["s001", "s002"],
                          "timestamp": pd.date_range("2026-01-01", periods=62, freq="h", tz="UTC")})
    hist = history_indices(plays, user_ids, song_ids)
    assert len(hist[0]) == min(35, HISTORY_FOR_QUERY) and list(song_ids[hist[1]]) == ["s002", "s001"]  # recent first
    train = sp.csr_matrix(np.zeros((2, n_songs), np.float32))
    scores = ServedRanking(emb, hist).fit(train).score(np.array([0, 1]), train)

    index = SongIndex.build(emb, list(song_ids), "hash")
    for u in (0, 1):
        served = index.search(history_query(index.vectors(song_ids[hist[u]])), n_songs)[0]
        by_id = dict(served)
        np.testing.assert_allclose([by_id[s] for s in song_ids], scores[u], atol=1e-5)
