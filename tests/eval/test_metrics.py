"""Ranking metrics checked against hand-computed values on a tiny example."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from eval import metrics as M

log2 = math.log2

# 4 users x 6 items.
#   u0: descending scores, item 0 seen (excluded), relevant {1, 3} -> ranking 1,2,3,4,5
#   u1: ascending scores, relevant {0}                             -> ranking 5,4,3,2,1,0
#   u2: no relevant items                                          -> skipped
#   u3: all-tied scores, relevant {2}                              -> ranking 0,1,2,... (index order)
SCORES = np.array(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        [0.3, 0.1, 0.2, 0.6, 0.5, 0.4],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)
TEST = sp.csr_matrix(
    np.array(
        [
            [0, 1, 0, 1, 0, 0],
            [1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
        ],
        dtype=np.float32,
    )
)
EXCLUDE = sp.csr_matrix(
    np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
)
IS_TAIL = np.array([False, False, False, True, True, True])
ITEM_POP = np.array([50, 40, 30, 20, 10, 0])


def _evaluate(**kw):
    return M.evaluate_ranking(SCORES, TEST, exclude=EXCLUDE, ks=(1, 3), **kw)


# ---------------------------------------------------------------------------- top-k selection


def test_topk_masks_seen_items_and_breaks_ties_by_index():
    top = M.topk_from_scores(SCORES, 3, exclude=EXCLUDE)
    np.testing.assert_array_equal(top, [[1, 2, 3], [5, 4, 3], [3, 4, 5], [0, 1, 2]])


def test_topk_does_not_modify_input_and_handles_nan():
    s = SCORES.copy()
    s[1, 5] = np.nan
    before = s.copy()
    top = M.topk_from_scores(s, 2, exclude=EXCLUDE)
    np.testing.assert_array_equal(s, before)  # NaN compares unequal, so compare via testing
    np.testing.assert_array_equal(top[1], [4, 3])  # NaN ranks as -inf


def test_topk_pads_with_minus_one_when_too_few_items():
    cand = np.array([False, False, True, True, True, False])
    top = M.topk_from_scores(SCORES, 5, exclude=EXCLUDE, candidates=cand)
    np.testing.assert_array_equal(top[0], [2, 3, 4, -1, -1])
    np.testing.assert_array_equal(top[1], [4, 3, 2, -1, -1])
    # k larger than the catalogue
    top = M.topk_from_scores(SCORES[:1], 8)
    np.testing.assert_array_equal(top[0], [0, 1, 2, 3, 4, 5, -1, -1])


@pytest.mark.parametrize("with_candidates", [False, True])
def test_topk_matches_lexsort_reference_across_chunks(monkeypatch, with_candidates):
    # Coarse integer scores give many ties; a tiny chunk size forces the multi-chunk path. Candidates are ranked
    # as their own columns (not masked in place), which must not change which tied item comes first.
    monkeypatch.setattr(M, "_CHUNK_CELLS", 64)
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(37, 25)).astype(np.float32)
    excl = sp.csr_matrix(rng.random((37, 25)) < 0.2)
    cand = rng.random(25) < 0.4 if with_candidates else None
    top = M.topk_from_scores(s, 7, exclude=excl, candidates=cand)
    masked = np.where(excl.toarray() | (False if cand is None else ~cand), -np.inf, s)
    for u in range(s.shape[0]):
        ref = np.lexsort((np.arange(25), -masked[u]))[:7]
        ref = np.where(masked[u, ref] == -np.inf, -1, ref)  # masked slots are never recommended
        np.testing.assert_array_equal(top[u], ref)


# ---------------------------------------------------------------------------- accuracy metrics


def test_accuracy_metrics_match_hand_computed_values():
    r = _evaluate()
    assert r["n_users"] == 3
    assert r["n_users_skipped"] == 1  # u2 has no relevant items

    # per user (u0, u1, u3)
    recall1 = [1 / 2, 0, 0]
    recall3 = [2 / 2, 0, 1 / 1]
    prec3 = [2 / 3, 0, 1 / 3]
    ndcg1 = [1.0, 0, 0]
    ndcg3 = [
        (1 / log2(2) + 1 / log2(4)) / (1 / log2(2) + 1 / log2(3)),  # hits at ranks 1 and 3, |R|=2
        0.0,
        (1 / log2(4)) / (1 / log2(2)),  # hit at rank 3, |R|=1
    ]
    hr1 = [1, 0, 0]
    hr3 = [1, 0, 1]
    mrr = [1 / 1, 0, 1 / 3]  # u1's relevant item is at rank 6, beyond the default cut-off 3

    assert r["recall@1"] == pytest.approx(np.mean(recall1))
    assert r["recall@3"] == pytest.approx(np.mean(recall3))
    assert r["precision@3"] == pytest.approx(np.mean(prec3))
    assert r["ndcg@1"] == pytest.approx(np.mean(ndcg1))
    assert r["ndcg@3"] == pytest.approx(np.mean(ndcg3))
    assert r["hr@1"] == pytest.approx(np.mean(hr1))
    assert r["hr@3"] == pytest.approx(np.mean(hr3))
    assert r["mrr"] == pytest.approx(np.mean(mrr))
    assert r["mrr_cutoff"] == 3


def test_recall_uses_full_relevant_set_not_min_with_k():
    # u0 has 2 relevant items; at k=1 the best possible recall is 1/2, not 1.
    r = M.per_user_metrics(M.topk_from_scores(SCORES, 3, EXCLUDE), TEST, ks=(1, 3))
    assert r["recall@1"][0] == pytest.approx(1 / 2)
    assert r["ndcg@1"][0] == pytest.approx(1.0)  # ideal DCG is over min(|R|, k) = 1 item


def test_mrr_cutoff_is_configurable():
    r = _evaluate(mrr_k=6)
    assert r["mrr"] == pytest.approx(np.mean([1 / 1, 1 / 6, 1 / 3]))


def test_per_user_arrays_align_with_summary():
    summary, per_user = _evaluate(return_per_user=True)
    np.testing.assert_array_equal(per_user["users"], [0, 1, 3])
    for key in ("recall@3", "ndcg@3", "hr@1", "mrr"):
        assert per_user[key].shape == (3,)
        assert per_user[key].mean() == pytest.approx(summary[key])


# ---------------------------------------------------------------------------- catalogue metrics


def test_coverage_gini_tail_share():
    r = _evaluate(is_tail=IS_TAIL)
    # top-3 lists: u0 [1,2,3], u1 [5,4,3], u3 [0,1,2]; top-1: 1, 5, 0
    assert r["coverage@3"] == pytest.approx(6 / 6)
    assert r["coverage@1"] == pytest.approx(3 / 6)
    # top-1 exposure counts [1,1,0,0,0,1] -> sorted [0,0,0,1,1,1], n=6, total=3:
    # sum (2i - n - 1) x_(i) = (2*4-7) + (2*5-7) + (2*6-7) = 1 + 3 + 5
    assert r["gini@1"] == pytest.approx((1 + 3 + 5) / (6 * 3))
    # tail items {3,4,5}: u0 has 1, u1 has 3, u3 has 0 of 9 slots
    assert r["tail_share@3"] == pytest.approx((1 + 3 + 0) / 9)
    assert r["tail_share@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert "new_share@3" not in r  # only with an is_new mask


def test_new_share_counts_slots_holding_new_items():
    # new items {4, 5}; top-3 lists u0 [1,2,3], u1 [5,4,3], u3 [0,1,2]: 0 + 2 + 0 of 9 slots; top-1: 0 + 1 + 0 of 3
    r = _evaluate(is_new=np.array([False, False, False, False, True, True]))
    assert r["new_share@3"] == pytest.approx(2 / 9)
    assert r["new_share@1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        _evaluate(is_new=np.array([True, False]))


def test_gini_extremes():
    assert M.gini(np.full(8, 5)) == pytest.approx(0.0)
    n = 10
    assert M.gini(np.r_[np.zeros(n - 1), 7.0]) == pytest.approx(1 - 1 / n)
    assert np.isnan(M.gini(np.zeros(4)))


def test_popularity_bucket_recall():
    r = _evaluate(item_pop=ITEM_POP, n_pop_buckets=3)
    # ascending popularity: items 5,4 -> bucket 0; 3,2 -> bucket 1; 1,0 -> bucket 2
    np.testing.assert_array_equal(M.popularity_buckets(ITEM_POP, 3), [2, 2, 1, 1, 0, 0])
    # relevant pairs: (u0,1) b2 hit, (u0,3) b1 hit, (u1,0) b2 miss, (u3,2) b1 hit (all at k=3)
    assert np.isnan(r["recall@3_pop0"])
    assert r["recall@3_pop1"] == pytest.approx(2 / 2)
    assert r["recall@3_pop2"] == pytest.approx(1 / 2)
    # at k=1 only (u0,1) is a hit
    assert r["recall@1_pop1"] == pytest.approx(0 / 2)
    assert r["recall@1_pop2"] == pytest.approx(1 / 2)
    assert (r["n_relevant_pop0"], r["n_relevant_pop1"], r["n_relevant_pop2"]) == (0, 2, 2)


# ---------------------------------------------------------------------------- protocol edge cases


def test_candidates_restrict_ranking_and_relevance():
    cand = np.array([False, False, True, True, True, False])
    r = _evaluate(candidates=cand)
    # u0: ranking 2,3,4; relevant restricted to {3} -> rank 2
    # u1: relevant {0} is not a candidate -> skipped; u2 skipped; u3: ties -> 2,3,4, relevant {2} rank 1
    assert r["n_users"] == 2
    assert r["n_users_skipped"] == 2
    assert r["n_candidates"] == 3
    assert r["recall@1"] == pytest.approx(np.mean([0, 1]))
    assert r["recall@3"] == pytest.approx(np.mean([1, 1]))
    assert r["ndcg@3"] == pytest.approx(np.mean([(1 / log2(3)) / 1, 1.0]))
    assert r["mrr"] == pytest.approx(np.mean([1 / 2, 1 / 1]))
    # coverage and gini are over candidates only; never a non-candidate
    assert r["coverage@3"] == pytest.approx(3 / 3)
    assert r["gini@3"] == pytest.approx(0.0)  # each candidate recommended twice


def test_empty_slice_is_reported_as_empty():
    empty = sp.csr_matrix(SCORES.shape, dtype=np.float32)
    r = M.evaluate_ranking(SCORES, empty, ks=(1, 3))
    assert r["empty"] is True
    assert r["n_users"] == 0
    assert r["n_users_skipped"] == 4
    assert "recall@3" not in r


def test_explicit_zeros_in_test_are_not_relevant():
    # Same as TEST plus an explicitly stored zero for the otherwise empty user u2.
    coo = TEST.tocoo()
    t = sp.csr_matrix(
        (np.r_[coo.data, 0.0], (np.r_[coo.row, 2], np.r_[coo.col, 3])), shape=TEST.shape
    )
    assert t.nnz == TEST.nnz + 1
    r = M.evaluate_ranking(SCORES, t, EXCLUDE, ks=(1, 3))
    assert r["n_users"] == 3 and r["n_users_skipped"] == 1


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="exclude"):
        M.topk_from_scores(SCORES, 2, exclude=EXCLUDE[:2])
    with pytest.raises(ValueError, match="candidates"):
        M.topk_from_scores(SCORES, 2, candidates=np.ones(5, bool))


# ---------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_is_ordered():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    ci = M.bootstrap_ci(a, n=500, seed=0)
    assert ci["lo"] < ci["mean"] < ci["hi"]
    assert ci["mean"] == pytest.approx(a.mean())
    assert ci["p_boot"] is None
    assert M.bootstrap_ci(a, n=500, seed=0) == ci  # deterministic for a seed


def test_bootstrap_paired_difference():
    rng = np.random.default_rng(2)
    b = rng.random(300)
    a = b + 0.1 + 0.05 * rng.standard_normal(300)  # a clearly better than b
    ci = M.bootstrap_ci(a, b, n=500, seed=0)
    assert ci["lo"] < ci["mean"] < ci["hi"]
    assert ci["lo"] > 0
    assert ci["p_boot"] < 0.01
    same = M.bootstrap_ci(b, b, n=200, seed=0)
    assert same["mean"] == 0 and same["p_boot"] == 1.0
    with pytest.raises(ValueError):
        M.bootstrap_ci(a, b[:-1])
