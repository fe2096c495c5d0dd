"""The evaluation's data: one split's binarised user x song matrices, its slices and the tie-breaking order.

Interactions are binarised: relevance is "played in the test part", not how often. Test pairs that are also train
pairs (a user replaying a song they already played) are dropped and counted: seen songs are masked from every
ranking, so such pairs could never be hit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from eval.served import history_indices
from llmrec.schema import Catalog

SLICES = ("all", "warm", "warm-known", "cold")
TAIL_SHARE = 0.8  # tail = known songs (training plays) outside the top 20% of them by training plays


@dataclass
class EvalData:
    """Index maps and binarised matrices for one split; rows = catalogue users, columns = catalogue songs."""

    song_ids: np.ndarray
    user_ids: np.ndarray
    train: sp.csr_matrix
    test: sp.csr_matrix  # train pairs removed
    warm: np.ndarray  # bool per song: has train plays
    item_pop: np.ndarray  # train listeners per song
    is_tail: np.ndarray
    order: np.ndarray  # tie-breaking order of the songs (tie_order)
    repeats_dropped: int = 0
    # bool per song: the split's new songs (`Split.cold_songs`); None = every song without train plays
    new: np.ndarray | None = None
    # per user: column indices of the most recent distinct train plays, as the server reads them (eval/served.py)
    histories: list[np.ndarray] = field(default_factory=list)

    @property
    def cold(self) -> np.ndarray:
        """The cold slice's songs: exactly the split's new songs where the split names them. A back-catalogue song
        nobody played is not a new song, and counting it as a cold candidate (66 instead of the demo's 60 new
        songs) made the cold slice a different task from the one the README describes."""
        return ~self.warm if self.new is None else self.new & ~self.warm


def _csr(df: pd.DataFrame, users: pd.Index, songs: pd.Index) -> sp.csr_matrix:
    rows, cols = users.get_indexer(df["user_id"]), songs.get_indexer(df["song_id"])
    keep = (rows >= 0) & (cols >= 0)
    m = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (rows[keep], cols[keep])),
                      shape=(len(users), len(songs)))
    m.data[:] = 1.0  # duplicates were summed: binarise
    return m


def build_data(catalog: Catalog, train_df: pd.DataFrame, test_df: pd.DataFrame, seed: int = 0,
               new_songs: frozenset[str] | None = None) -> EvalData:
    """Matrices of one split; `new_songs` (the split's cold songs) fixes the cold slice's candidates."""
    songs = pd.Index(catalog.songs["song_id"].astype(str))
    users = pd.Index(pd.unique(pd.concat([catalog.users["user_id"], catalog.interactions["user_id"]]).astype(str)))
    train, test = _csr(train_df, users, songs), _csr(test_df, users, songs)
    overlap = test.multiply(train)
    test = (test - overlap).tocsr()
    test.eliminate_zeros()
    item_pop = np.bincount(train.indices, minlength=len(songs)).astype(np.float64)
    new = None if new_songs is None else songs.isin(list(new_songs))
    return EvalData(songs.to_numpy(), users.to_numpy(), train, test, item_pop > 0, item_pop,
                    tail_mask(item_pop), tie_order(len(songs), seed), int(overlap.nnz), new,
                    history_indices(train_df, users.to_numpy(), songs.to_numpy()))


def tail_mask(item_pop: np.ndarray, head_share: float = 1 - TAIL_SHARE) -> np.ndarray:
    """True for known songs (with training plays) outside the top `head_share` of them by training plays (ties
    broken by index, like the rankers). Songs without plays are never tail: new songs reaching a list are counted
    by `new_share@k`, and counting them as tail let a model that promotes new songs claim a long-tail gain it
    does not have on known songs."""
    known = np.flatnonzero(item_pop > 0)
    n_head = int(np.ceil(head_share * known.size))
    order = known[np.argsort(-item_pop[known], kind="stable")]
    tail = np.zeros(item_pop.size, dtype=bool)
    tail[order[n_head:]] = True
    return tail


def slice_test(data: EvalData, name: str) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """(relevance matrix, candidate mask or None = whole catalogue) of one slice.

    `warm` ranks known songs' test plays among the whole catalogue (new songs take slots and miss); `warm-known`
    ranks the same plays among known songs only, which answers "does it rank known songs better" apart from
    "do new songs take slots"."""
    if name == "all":
        return data.test, None
    keep = data.cold if name == "cold" else data.warm
    test = (data.test @ sp.diags(keep.astype(np.float32))).tocsr()
    test.eliminate_zeros()
    return test, {"cold": data.cold, "warm-known": data.warm}.get(name)



def tie_order(n_items: int, seed: int) -> np.ndarray:
    """A fixed random order of the catalogue used to break score ties.

    `topk_from_scores` breaks ties by lower index. Catalogue order is not random (lastfm-2k's artist ids follow
    the crawl, so low ids are popular artists), and models that score many songs alike — MostPop, and every CF
    model on songs without plays — would inherit that order's popularity as if it were skill."""
    return np.random.default_rng([seed, 7]).permutation(n_items)
