"""The ranking `/v1/recommendations` serves, as a `Recommender` for the report (`llmrec` with
`eval.user_tower: history`): the same functions (`llmrec.ranking`) on the same inputs — each user's most recent
distinct training plays, the catalogue mean removed — so the report's number is the served list's number."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from eval.baselines import Recommender
from llmrec.ranking import HISTORY_FOR_QUERY, catalogue_center, centred_unit, history_query, recent_histories


def history_indices(train_df: pd.DataFrame, user_ids: np.ndarray, song_ids: np.ndarray) -> list[np.ndarray]:
    """Per catalogue user (rows of the eval matrices): column indices of their most recent distinct plays in
    `train_df`, most recent first, at most HISTORY_FOR_QUERY (what the server averages)."""
    histories = recent_histories(train_df)
    col = pd.Index(song_ids.astype(str))
    out = []
    for user in user_ids.astype(str):
        idx = col.get_indexer(histories.get(user, [])[:HISTORY_FOR_QUERY])
        out.append(idx[idx >= 0])
    return out


class ServedRanking(Recommender):
    """Cosine between the history query (`llmrec.ranking.history_query`) and every song, both centred on the
    catalogue's mean embedding as the index does (`serve/index.py` builds its centre from the same vectors). Users
    without a history score 0."""

    def __init__(self, item_vectors: np.ndarray, histories: list[np.ndarray]):
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.center = catalogue_center(self.item_vectors)
        self._items = centred_unit(self.item_vectors, self.center)
        self.histories = histories

    def fit(self, train: sp.csr_matrix, **side) -> "ServedRanking":
        if train.shape[0] != len(self.histories) or train.shape[1] != len(self.item_vectors):
            raise ValueError(f"train is {train.shape}, histories/items are {len(self.histories)}/"
                             f"{len(self.item_vectors)}")
        self.n_items = train.shape[1]
        return self

    def score(self, user_idx: np.ndarray, train: sp.csr_matrix) -> np.ndarray:
        self._check_fitted()
        users = np.asarray(user_idx, dtype=np.int64).reshape(-1)
        queries = np.zeros((len(users), self.item_vectors.shape[1]), np.float32)
        has = np.zeros(len(users), bool)
        for row, u in enumerate(users):
            hist = self.histories[u]
            if hist.size:
                queries[row], has[row] = history_query(self.item_vectors[hist])[0], True
        scores = centred_unit(queries, self.center) @ self._items.T
        scores[~has] = 0.0
        return scores.astype(np.float32)
