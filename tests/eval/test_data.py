"""The evaluation's matrices (`eval.data`): binarised, repeat pairs dropped, the long tail."""
from __future__ import annotations

import numpy as np
import pandas as pd

from eval.data import build_data, tail_mask


def test_tail_counts_known_songs_outside_the_head_only():
    # 10 songs: 2 never played (new), 8 known; the head is the top 20% of the known songs (2 of 8)
    plays = np.array([0, 50, 40, 0, 30, 20, 10, 5, 3, 1], dtype=float)
    tail = tail_mask(plays)
    assert not tail[0] and not tail[3]  # new songs are never tail
    assert not tail[1] and not tail[2]  # the head
    assert tail[[4, 5, 6, 7, 8, 9]].all()


def test_build_data_binarises_and_drops_repeat_pairs(synthetic_catalog):
    train = pd.DataFrame({"user_id": ["u00000", "u00000", "u00001"], "song_id": ["s00000", "s00000", "s00001"]})
    test = pd.DataFrame({"user_id": ["u00000", "u00000"], "song_id": ["s00000", "s00002"]})
    d = build_data(synthetic_catalog, train, test)
    assert d.train.nnz == 2 and d.train.data.max() == 1.0
    assert d.test.nnz == 1 and d.repeats_dropped == 1  # (u0, s0) was already played in train
    # two known songs: the head is ceil(0.2 * 2) = 1 of them, the other is tail; songs without plays never are
    assert d.warm.sum() == 2 and d.is_tail.sum() == 1 and not d.is_tail[~d.warm].any()
