from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmrec.model.losses import catalog_info_nce, info_nce


def test_info_nce_prefers_matching_pairs():
    x = torch.eye(4)
    assert info_nce(x, x) < info_nce(x, x.roll(1, dims=0))
    with pytest.raises(ValueError, match="paired rows"):
        info_nce(x, x[:3])


def test_catalog_info_nce_is_cross_entropy_over_the_whole_table():
    torch.manual_seed(0)
    table, query = torch.randn(7, 5), torch.randn(3, 5)
    rows = torch.tensor([4, 0, 6])
    logits = F.normalize(query, dim=-1) @ F.normalize(table, dim=-1).T / 0.1
    torch.testing.assert_close(catalog_info_nce(query, table, rows, 0.1), F.cross_entropy(logits, rows))
    assert catalog_info_nce(table[rows], table, rows) < catalog_info_nce(table[rows], table, rows.roll(1))
    with pytest.raises(ValueError, match="one table row per query"):
        catalog_info_nce(query, table, rows[:2])


def test_catalog_negatives_see_songs_outside_the_batch():
    """A query that matches its own song as well as a song outside the batch is a perfect match for in-batch
    negatives but not for the whole table: that song is a negative only there."""
    table = torch.eye(4)
    table[3] = table[0]  # song 3 (never in the batch) has song 0's CF factor
    query, rows = table[:2].clone(), torch.tensor([0, 1])
    assert catalog_info_nce(query, table, rows) > info_nce(query, table[rows]) + 0.1
    # with the batch's own rows as the whole table, the two losses are the same (one direction)
    torch.testing.assert_close(catalog_info_nce(query, table[:2], rows), info_nce(query, table[:2], symmetric=False))
