"""Shard planning: equal contiguous shards in id order, and each rank's slice."""
from __future__ import annotations

import pytest

from data_prep.shards import plan_shards, select_shards


def test_shard_plan_and_rank_selection(synthetic_catalog, tmp_path):
    ids = sorted(synthetic_catalog.songs.song_id)
    assert len(ids) == 144
    plan = plan_shards(synthetic_catalog, 50, tmp_path)
    assert [len(t.songs) for t in plan] == [48, 48, 48]  # ceil(144 / 50) = 3 equal shards, no short last one
    assert plan[1].song_ids == ids[48:96]
    assert [len(t.songs) for t in plan_shards(synthetic_catalog, 64, tmp_path)] == [48, 48, 48]
    uneven = plan_shards(synthetic_catalog, 10, tmp_path)  # 15 shards of 9 or 10 songs, in id order
    assert len(uneven) == 15 and {len(t.songs) for t in uneven} == {9, 10}
    assert [s for t in uneven for s in t.song_ids] == ids
    assert [t.index for t in select_shards(plan, 1, 2)] == [1]
    assert [t.index for t in select_shards(plan, 0, 2)] == [0, 2]
    with pytest.raises(ValueError, match="shard_index"):
        select_shards(plan, 2, 2)
