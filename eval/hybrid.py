"""The hybrid: CF for known songs, content for new ones, on one scale; and cached score rows for tuning it."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from eval.baselines import Recommender


class Hybrid(Recommender):
    """CF for warm songs, content (llmrec) for cold ones, on a common scale.

    Both score rows are z-normalised per user (over the whole catalogue); warm songs get
    `weight * z(cf) + (1 - weight) * z(content)`, cold songs `z(content) + cold_offset` — CF scores of songs without
    plays are meaningless (ALS leaves their factors at zero, BPR at their random initialisation).

    The two knobs answer two questions and are tuned apart (`eval.tuning.tune`): `weight` how to rank known songs
    against each other, `cold_offset` how far new songs are let into the one ranking. A z-score of the blend and a
    z-score of content alone are not on one scale (a blend of two partly independent z-scores has a smaller
    spread), so without the offset the interleaving of new and known songs is an accident of that spread.

    An optional third knob, `pop_penalty`, subtracts `pop_penalty * z(log(1 + plays))` (z over the known songs)
    from known songs' scores: the standard popularity compensation, for the operating point `hybrid-tail` (see
    `eval.tuning.tune`), which trades some accuracy for exposure of the long tail.
    """

    def __init__(self, cf: Recommender, content: Recommender, warm: np.ndarray, weight: float = 0.5,
                 cold_offset: float = 0.0, pop_penalty: float = 0.0, item_pop: np.ndarray | None = None):
        self.cf, self.content, self.warm = cf, content, np.asarray(warm, bool)
        self.weight, self.cold_offset, self.pop_penalty = float(weight), float(cold_offset), float(pop_penalty)
        if self.pop_penalty and item_pop is None:
            raise ValueError("Hybrid: pop_penalty needs item_pop (training plays per song)")
        self._pop_z = np.zeros(len(self.warm), dtype=np.float32)
        if item_pop is not None and self.warm.any():
            log_pop = np.log1p(np.asarray(item_pop, dtype=np.float64))
            std = log_pop[self.warm].std()
            self._pop_z[self.warm] = (log_pop[self.warm] - log_pop[self.warm].mean()) / (std if std > 0 else 1.0)

    def fit(self, train, **side):
        self.n_items = train.shape[1]  # parts are fitted by the caller and shared with their own entries
        return self

    def score(self, user_idx, train):
        cf, content = _znorm(self.cf.score(user_idx, train)), _znorm(self.content.score(user_idx, train))
        warm_score = self.weight * cf + (1 - self.weight) * content - self.pop_penalty * self._pop_z[None, :]
        return np.where(self.warm[None, :], warm_score, content + self.cold_offset)


class CachedScores(Recommender):
    """A fitted model's score rows for a fixed user set, computed once: tuning a blend re-scores the same users
    for every grid point, and the parts do not change between them."""

    def __init__(self, model: Recommender, users: np.ndarray, train: sp.csr_matrix):
        self.n_items = train.shape[1]
        self._row = np.full(train.shape[0], -1, dtype=np.int64)
        self._row[users] = np.arange(len(users))
        self._scores = np.asarray(model.score(users, train), dtype=np.float32)

    def fit(self, train, **side):
        return self

    def score(self, user_idx, train):
        rows = self._row[np.asarray(user_idx, dtype=np.int64)]
        if (rows < 0).any():
            raise KeyError("CachedScores asked for a user it was not built for")
        return self._scores[rows]


def _znorm(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float32)
    std = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
