"""Full-catalogue ranking metrics for offline evaluation.

Conventions used throughout (each function's docstring repeats what matters to it):

* ``scores`` is a dense ``(n_users, n_items)`` array, higher is better. Row ``i`` of ``scores``
  corresponds to row ``i`` of ``test`` and ``exclude``: slice all three the same way when
  evaluating a subset of users.
* Relevance is binary: every stored non-zero of ``test`` is a relevant item (play counts are
  ignored on purpose -- we measure retrieval of held-out items, not how much they were played).
* Items are ranked over the *whole* catalogue (or over ``candidates`` when given); seen items are
  removed by ``exclude`` rather than by sampling negatives, because sampled metrics are known to
  disagree with full rankings (Krichene & Rendle, 2020).
* A "top-k" array has shape ``(n_users, k)`` of item indices, best first, padded with ``-1`` when
  fewer than ``k`` items are recommendable (masked / non-candidate slots are never recommended).

Definitions (per user ``u`` with relevant set ``R_u`` and top-k list ``L_u``):

* ``recall@k    = |L_u ∩ R_u| / |R_u|``  (standard definition; *not* divided by ``min(|R_u|, k)``,
  so a user with more than k relevant items cannot reach 1.0).
* ``precision@k = |L_u ∩ R_u| / k``.
* ``ndcg@k``: binary gains, discount ``1/log2(rank + 1)`` with 1-based rank; ideal DCG places
  ``min(|R_u|, k)`` relevant items at the top.
* ``hr@k``: 1 if any relevant item is in the top k.
* ``mrr``: reciprocal 1-based rank of the first relevant item, searched within the top
  ``mrr_k`` positions (default ``max(ks)``); 0 if none is found there. Cutting at ``mrr_k`` keeps
  the cost at a top-k selection instead of a full sort of the catalogue.

Aggregate (catalogue-level) metrics are computed over the evaluated users' lists:

* ``coverage@k``: distinct recommended items / number of candidate items.
* ``gini@k``: Gini coefficient of recommendation counts over all candidate items (items never
  recommended count as 0). 0 = perfectly even exposure, ``1 - 1/n`` = everything on one item.
* ``tail_share@k``: fraction of filled recommendation slots whose item is a tail item
  (``is_tail`` boolean array, e.g. items outside the top 20% by training plays).
* ``new_share@k``: fraction of filled slots whose item is new (``is_new``, e.g. items without training
  plays): in a whole-catalogue ranking, how far new items surface next to known ones.
* ``recall@k_pop{b}``: micro-averaged recall of relevant (user, item) pairs whose item falls into
  popularity bucket ``b`` (0 = least popular); see :func:`popularity_buckets`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "topk_from_scores",
    "hits_matrix",
    "recall_at_k",
    "precision_at_k",
    "ndcg_at_k",
    "hit_rate_at_k",
    "reciprocal_rank",
    "coverage",
    "gini",
    "exposure_counts",
    "tail_share",
    "popularity_buckets",
    "popularity_bucket_recall",
    "per_user_metrics",
    "evaluate_topk",
    "evaluate_ranking",
    "bootstrap_ci",
]

# Upper bound on the number of score cells processed at once in topk_from_scores. The tie-breaking
# step allocates a few arrays of this size, so chunking rows keeps peak memory flat
# (~4M cells ~ a few tens of MB) however many users are scored in one call.
_CHUNK_CELLS = 1 << 22


# --------------------------------------------------------------------------------------------
# Top-k selection
# --------------------------------------------------------------------------------------------


def _check_rows(name: str, m: sp.spmatrix | None, shape: tuple[int, int]) -> sp.csr_matrix | None:
    if m is None:
        return None
    m = sp.csr_matrix(m)
    if m.shape != shape:
        raise ValueError(f"{name} has shape {m.shape}, expected {shape} (same rows/cols as scores)")
    return m


def _check_mask(name: str, mask: np.ndarray | None, n_items: int) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n_items,):
        raise ValueError(f"{name} must be a boolean array of shape ({n_items},), got {mask.shape}")
    return mask


def topk_from_scores(
    scores: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """Return the indices of the ``k`` highest-scoring items per row, best first.

    Parameters
    ----------
    scores: ``(n_users, n_items)`` float array, higher is better. Not modified. NaN counts as -inf.
    k: list length. May exceed ``n_items``; the result is then padded.
    exclude: optional ``(n_users, n_items)`` sparse matrix; its stored non-zeros (typically the
        user's training items) are set to -inf before ranking.
    candidates: optional boolean ``(n_items,)``; items outside it are set to -inf (cold-start
        protocol: rank only among the cold items).

    Returns
    -------
    ``(n_users, k)`` int64 array. Ties are broken by lower item index so results are
    deterministic. Slots that could only be filled by -inf (masked) items are ``-1``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_users, n_items), got shape {scores.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n_users, n_items = scores.shape
    exclude = _check_rows("exclude", exclude, scores.shape)
    candidates = _check_mask("candidates", candidates, n_items)

    out = np.full((n_users, k), -1, dtype=np.int64)
    # Rank only the candidate columns: masking the others to -inf instead costs a full-width pass, and a row that
    # is 90% -inf ties is quickselect's worst case (the cold slice ran 6x slower than the whole catalogue).
    # Candidate columns ascend, so "lower index first" among ties is unchanged.
    cols = None if candidates is None else np.flatnonzero(candidates)
    n_cols = n_items if cols is None else cols.size
    kk = min(k, n_cols)
    if kk == 0 or n_users == 0:
        return out
    if cols is not None and exclude is not None:
        position = np.full(n_items, -1, dtype=np.int64)
        position[cols] = np.arange(n_cols)

    dtype = np.result_type(scores.dtype, np.float32)
    chunk = max(1, _CHUNK_CELLS // n_cols)
    for start in range(0, n_users, chunk):
        stop = min(start + chunk, n_users)
        # Copy (the column selection copies already): masking must not leak into the caller's array.
        s = np.array(scores[start:stop] if cols is None else scores[start:stop][:, cols], dtype=dtype, copy=True)
        s[np.isnan(s)] = -np.inf
        if exclude is not None:
            r, c = exclude[start:stop].nonzero()
            if cols is not None:
                c = position[c]
                r, c = r[c >= 0], c[c >= 0]
            s[r, c] = -np.inf
        top = _topk_block(s, kk)
        out[start:stop, :kk] = top if cols is None else np.where(top >= 0, cols[np.maximum(top, 0)], -1)
    return out


def _topk_block(s: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k with lower-index tie-breaking for one block of rows (``s`` already masked)."""
    m, n = s.shape
    # k-th largest value per row: everything strictly above it is in; among values equal to it we
    # take the lowest indices. argpartition alone would pick tied items arbitrarily, which makes
    # metrics depend on numpy internals when scores are coarse (MostPop, sparse ItemKNN, masks).
    # torch.topk finds the threshold ~3x faster than np.partition (and np.partition degrades on rows of many equal
    # values); only the threshold comes from it, the tie rule below stays ours.
    thr = torch.topk(torch.from_numpy(s), k, dim=1, sorted=False).values.amin(dim=1).numpy()
    gt = s > thr[:, None]
    need = k - gt.sum(axis=1)
    er, ec = np.nonzero(s == thr[:, None])  # row-major, so columns ascend within a row
    row_start = np.searchsorted(er, np.arange(m))
    rank_in_row = np.arange(er.size) - row_start[er]
    keep = rank_in_row < need[er]
    sel = gt
    sel[er[keep], ec[keep]] = True
    cols = np.nonzero(sel)[1].reshape(m, k)  # ascending item index within each row
    vals = np.take_along_axis(s, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable => ties keep lower index first
    top = np.take_along_axis(cols, order, axis=1)
    top[np.take_along_axis(vals, order, axis=1) == -np.inf] = -1
    return top


# --------------------------------------------------------------------------------------------
# Per-user metrics from a hits matrix
# --------------------------------------------------------------------------------------------


def _relevance(test: sp.spmatrix, candidates: np.ndarray | None) -> sp.csr_matrix:
    """Binary relevance matrix; relevant items outside ``candidates`` are dropped.

    Dropping them is deliberate: when the ranking is restricted to candidates, a relevant
    non-candidate could never be retrieved and would only cap recall below 1.
    """
    rel = sp.csr_matrix(test, dtype=np.float64, copy=True)
    rel.eliminate_zeros()
    rel.data[:] = 1.0
    if candidates is not None:
        rel.data[~candidates[rel.indices]] = 0.0
        rel.eliminate_zeros()
    rel.sort_indices()
    return rel


def hits_matrix(topk: np.ndarray, test: sp.spmatrix) -> np.ndarray:
    """Boolean ``(n_users, k)``: whether ``topk[u, j]`` is a relevant (stored non-zero) item of ``test[u]``.

    Padding slots (``-1``) are never hits.
    """
    topk = np.asarray(topk)
    test = sp.csr_matrix(test)
    n_users, n_items = test.shape
    if topk.shape[0] != n_users:
        raise ValueError(f"topk has {topk.shape[0]} rows but test has {n_users}")
    r, c = test.nonzero()
    # Encode (user, item) pairs as one int64 so membership is a single sorted search.
    keys = np.sort(r.astype(np.int64) * n_items + c)
    valid = topk >= 0
    q = np.arange(n_users, dtype=np.int64)[:, None] * n_items + np.where(valid, topk, 0)
    if keys.size == 0:
        return np.zeros(topk.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
    return valid & (keys[pos] == q)


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-user ``hits in top k / |relevant|`` (users with 0 relevant must be removed beforehand)."""
    return hits[:, :k].sum(axis=1) / np.asarray(n_relevant, dtype=np.float64)


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user ``hits in top k / k``."""
    return hits[:, :k].sum(axis=1) / float(k)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))  # rank 1 -> 1/log2(2), rank 2 -> 1/log2(3), ...


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-user binary NDCG@k; ideal DCG uses ``min(|relevant|, k)`` items at the top."""
    disc = _discounts(k)
    kk = min(k, hits.shape[1])
    dcg = (hits[:, :kk] * disc[:kk]).sum(axis=1)
    ideal_cum = np.concatenate([[0.0], np.cumsum(disc)])
    idcg = ideal_cum[np.minimum(np.asarray(n_relevant), k)]
    return dcg / idcg


def hit_rate_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user 1.0 if any relevant item is in the top k, else 0.0."""
    return hits[:, :k].any(axis=1).astype(np.float64)


def reciprocal_rank(hits: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-user ``1 / (1-based rank of first relevant)`` within the first ``k`` slots (all if None); 0 if none."""
    h = hits if k is None else hits[:, :k]
    found = h.any(axis=1)
    first = np.argmax(h, axis=1)
    return np.where(found, 1.0 / (first + 1.0), 0.0)


# --------------------------------------------------------------------------------------------
# Catalogue-level metrics
# --------------------------------------------------------------------------------------------


def exposure_counts(topk: np.ndarray, n_items: int, k: int | None = None) -> np.ndarray:
    """How many times each item appears in the (first ``k`` columns of the) top-k lists."""
    t = topk if k is None else topk[:, :k]
    t = t[t >= 0]
    return np.bincount(t, minlength=n_items)


def coverage(topk: np.ndarray, n_candidates: int, k: int | None = None) -> float:
    """Distinct recommended items / ``n_candidates``."""
    t = topk if k is None else topk[:, :k]
    if n_candidates <= 0:
        return float("nan")
    return float(np.unique(t[t >= 0]).size / n_candidates)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = equal; ``1 - 1/n`` = all mass on one of n).

    ``G = sum_i (2i - n - 1) x_(i) / (n * sum x)`` with ``x`` sorted ascending, ``i`` 1-based.
    NaN when the counts are empty or sum to zero.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = x.size
    total = x.sum()
    if n == 0 or total <= 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def tail_share(topk: np.ndarray, is_tail: np.ndarray, k: int | None = None) -> float:
    """Fraction of filled slots (``!= -1``) in the top-k lists that hold tail items (any item mask works: the
    evaluation also uses it for ``new_share@k``, the slots that hold new items)."""
    t = topk if k is None else topk[:, :k]
    t = t[t >= 0]
    if t.size == 0:
        return float("nan")
    return float(np.asarray(is_tail, dtype=bool)[t].mean())


def popularity_buckets(
    item_pop: np.ndarray, n_buckets: int = 5, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Assign each (candidate) item a popularity bucket ``0..n_buckets-1`` (0 = least popular).

    Buckets hold (nearly) equal numbers of candidate items: items are sorted by ``item_pop``
    ascending, ties by index, and split into ``n_buckets`` contiguous groups. Equal-count buckets
    by rank (rather than by value quantiles) always yield ``n_buckets`` non-empty groups even when
    many items share a popularity (e.g. many zeros). Non-candidates get ``-1``.
    """
    item_pop = np.asarray(item_pop)
    n_items = item_pop.size
    cand = np.ones(n_items, dtype=bool) if candidates is None else np.asarray(candidates, bool)
    idx = np.flatnonzero(cand)
    order = idx[np.argsort(item_pop[idx], kind="stable")]
    bucket = np.full(n_items, -1, dtype=np.int64)
    for b, group in enumerate(np.array_split(order, n_buckets)):
        bucket[group] = b
    return bucket


def popularity_bucket_recall(
    topk: np.ndarray, hits: np.ndarray, rel: sp.csr_matrix, bucket: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Micro recall per popularity bucket.

    For bucket ``b``: (relevant (user, item) pairs with item in ``b`` that appear in the user's
    top k) / (all relevant pairs with item in ``b``). Pooled over users because most users have no
    relevant item in most buckets, which makes a per-user average ill-defined.

    Returns ``(recall[n_buckets], n_relevant[n_buckets])``; recall is NaN for empty buckets.
    """
    n_buckets = int(bucket.max()) + 1 if bucket.size else 0
    hit_items = topk[:, :k][hits[:, :k]]
    hb = bucket[hit_items]
    n_hit = np.bincount(hb[hb >= 0], minlength=n_buckets)
    rb = bucket[rel.indices]
    n_rel = np.bincount(rb[rb >= 0], minlength=n_buckets)
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = np.where(n_rel > 0, n_hit / np.maximum(n_rel, 1), np.nan)
    return rec, n_rel


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _normalise_ks(ks: Iterable[int] | int) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return tuple(sorted(set(ks)))


def per_user_metrics(
    topk: np.ndarray,
    test: sp.spmatrix,
    ks: Iterable[int] | int = (10, 20, 50),
    candidates: np.ndarray | None = None,
    mrr_k: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-user metric arrays for users with at least one relevant (candidate) item.

    Returns a dict with ``"users"`` (row indices into ``test`` that were evaluated, so two models
    evaluated on the same ``test`` are aligned for paired bootstrap), and one float array per
    metric: ``recall@k``, ``precision@k``, ``ndcg@k``, ``hr@k`` for each k, and ``mrr``.
    ``topk`` must have at least ``max(max(ks), mrr_k)`` columns.
    """
    ks = _normalise_ks(ks)
    mrr_k = max(ks) if mrr_k is None else int(mrr_k)
    topk = np.asarray(topk)
    need = max(max(ks), mrr_k)
    if topk.ndim != 2 or topk.shape[1] < need:
        raise ValueError(f"topk must be 2-D with >= {need} columns, got shape {topk.shape}")
    test = sp.csr_matrix(test)
    candidates = _check_mask("candidates", candidates, test.shape[1])
    rel = _relevance(test, candidates)
    n_rel = np.diff(rel.indptr)
    users = np.flatnonzero(n_rel > 0)
    hits = hits_matrix(topk[users], rel[users])
    return _per_user_from_hits(hits, n_rel[users], users, ks, mrr_k)


def _per_user_from_hits(hits, n_rel, users, ks, mrr_k) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"users": users}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(hits, n_rel, k)
        out[f"precision@{k}"] = precision_at_k(hits, k)
        out[f"ndcg@{k}"] = ndcg_at_k(hits, n_rel, k)
        out[f"hr@{k}"] = hit_rate_at_k(hits, k)
    out["mrr"] = reciprocal_rank(hits, mrr_k)
    return out


def evaluate_topk(
    topk: np.ndarray,
    test: sp.spmatrix,
    ks: Iterable[int] | int = (10, 20, 50),
    candidates: np.ndarray | None = None,
    is_tail: np.ndarray | None = None,
    item_pop: np.ndarray | None = None,
    n_pop_buckets: int = 5,
    mrr_k: int | None = None,
    return_per_user: bool = False,
    is_new: np.ndarray | None = None,
):
    """Summarise precomputed top-k lists (see :func:`evaluate_ranking` for the keys).

    Useful when lists come from somewhere other than a dense score matrix (e.g. generated by the
    LLM, or computed batch-wise with :func:`topk_from_scores` and stacked).
    """
    ks = _normalise_ks(ks)
    mrr_k = max(ks) if mrr_k is None else int(mrr_k)
    topk = np.asarray(topk)
    test = sp.csr_matrix(test)
    n_users, n_items = test.shape
    candidates = _check_mask("candidates", candidates, n_items)
    is_tail = _check_mask("is_tail", is_tail, n_items)
    is_new = _check_mask("is_new", is_new, n_items)
    need = max(max(ks), mrr_k)
    if topk.ndim != 2 or topk.shape[0] != n_users or topk.shape[1] < need:
        raise ValueError(f"topk must have shape ({n_users}, >= {need}), got {topk.shape}")

    rel = _relevance(test, candidates)
    n_rel_all = np.diff(rel.indptr)
    users = np.flatnonzero(n_rel_all > 0)
    n_skipped = int(n_users - users.size)
    if users.size == 0:
        # An empty slice must not look like a model scoring 0: report it as empty.
        res = {"n_users": 0, "n_users_skipped": n_skipped, "empty": True}
        return (res, {"users": users}) if return_per_user else res

    topk_u, rel_u, n_rel = topk[users], rel[users], n_rel_all[users]
    hits = hits_matrix(topk_u, rel_u)
    per_user = _per_user_from_hits(hits, n_rel, users, ks, mrr_k)

    res: dict[str, float | int | bool] = {}
    for name, arr in per_user.items():
        if name != "users":
            res[name] = float(arr.mean())
    res["mrr_cutoff"] = mrr_k
    n_cand = int(n_items if candidates is None else candidates.sum())
    bucket = (
        popularity_buckets(item_pop, n_pop_buckets, candidates) if item_pop is not None else None
    )
    for k in ks:
        res[f"coverage@{k}"] = coverage(topk_u, n_cand, k)
        counts = exposure_counts(topk_u, n_items, k)
        res[f"gini@{k}"] = gini(counts if candidates is None else counts[candidates])
        if is_tail is not None:
            res[f"tail_share@{k}"] = tail_share(topk_u, is_tail, k)
        if is_new is not None:
            res[f"new_share@{k}"] = tail_share(topk_u, is_new, k)
        if bucket is not None:
            rec, n_in = popularity_bucket_recall(topk_u, hits, rel_u, bucket, k)
            for b, v in enumerate(rec):
                res[f"recall@{k}_pop{b}"] = float(v)
            # Bucket sizes do not depend on k; report them so tiny buckets can be discounted.
            for b, v in enumerate(n_in):
                res[f"n_relevant_pop{b}"] = int(v)
    res["n_users"] = int(users.size)
    res["n_users_skipped"] = n_skipped
    res["n_candidates"] = n_cand
    return (res, per_user) if return_per_user else res


def evaluate_ranking(
    scores: np.ndarray,
    test: sp.spmatrix,
    exclude: sp.csr_matrix | None = None,
    ks: Iterable[int] | int = (10, 20, 50),
    mrr_k: int | None = None,
    **options,
):
    """Rank the full catalogue (or ``candidates``) from ``scores`` and summarise.

    Parameters
    ----------
    scores: ``(n_users, n_items)``; row i is scored for ``test[i]``.
    test: ``(n_users, n_items)`` sparse; stored non-zeros are relevant. Relevant items outside
        ``candidates`` are ignored. Users with no relevant item are skipped and counted in
        ``"n_users_skipped"``. Relevant items that are also in ``exclude`` can never be hit:
        keep the two disjoint when splitting.
    exclude: sparse mask of items not to recommend (training items), or None.
    ks: cut-offs.
    mrr_k: MRR cut-off, default ``max(ks)``.
    options (keyword-only, passed on to :func:`evaluate_topk` as they are):
    candidates: boolean ``(n_items,)`` restricting the ranking (cold-start protocol); coverage and
        Gini are then computed over candidates only.
    is_tail: boolean ``(n_items,)``; adds ``tail_share@k``.
    is_new: boolean ``(n_items,)``; adds ``new_share@k``.
    item_pop: training popularity per item; adds ``recall@k_pop{b}`` and ``n_relevant_pop{b}``.
    n_pop_buckets: how many popularity buckets (default 5).
    return_per_user: also return the per-user arrays (for :func:`bootstrap_ci`).

    Returns
    -------
    dict with ``recall@k``, ``precision@k``, ``ndcg@k``, ``hr@k``, ``coverage@k``, ``gini@k``
    (+ optional ``tail_share@k``, ``new_share@k``, bucket recalls), ``mrr``, ``mrr_cutoff``, ``n_users``,
    ``n_users_skipped``, ``n_candidates``. If no user has a relevant item:
    ``{"n_users": 0, "n_users_skipped": n, "empty": True}``.
    """
    ks_n = _normalise_ks(ks)
    width = max(max(ks_n), max(ks_n) if mrr_k is None else int(mrr_k))
    topk = topk_from_scores(scores, width, exclude=exclude, candidates=options.get("candidates"))
    return evaluate_topk(topk, test, ks=ks_n, mrr_k=mrr_k, **options)


# --------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------


def bootstrap_ci(
    per_user_a: np.ndarray,
    per_user_b: np.ndarray | None = None,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | None]:
    """Percentile bootstrap over users.

    * One array: CI of the mean of ``per_user_a``.
    * Two arrays (paired, same users in the same order, e.g. ``per_user["users"]`` equal): CI of
      the mean difference ``a - b``, plus ``p_boot``: twice the fraction of bootstrap replicates
      whose mean difference falls on the other side of 0 from the observed one (capped at 1).
      ``p_boot`` is a heuristic "how often would resampling users flip the sign" score, not an
      exact test; with ``n`` replicates it cannot go below ``~2/n``.

    Returns ``{"mean", "lo", "hi", "p_boot" (None if unpaired), "n_users", "n_boot", "level"}``.
    """
    a = np.asarray(per_user_a, dtype=np.float64).ravel()
    if per_user_b is not None:
        b = np.asarray(per_user_b, dtype=np.float64).ravel()
        if b.shape != a.shape:
            raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
        x = a - b
    else:
        x = a
    m = x.size
    if m == 0:
        raise ValueError("bootstrap_ci needs at least one user")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = np.empty(n, dtype=np.float64)
    # Resample in chunks so that (replicates x users) index arrays stay ~ 4M entries.
    step = max(1, _CHUNK_CELLS // m)
    for s in range(0, n, step):
        e = min(s + step, n)
        idx = rng.integers(0, m, size=(e - s, m))
        means[s:e] = x[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    obs = float(x.mean())
    p = None
    if per_user_b is not None:
        other_side = (means <= 0).mean() if obs > 0 else (means >= 0).mean()
        p = float(min(1.0, 2.0 * other_side))
    return {
        "mean": obs,
        "lo": float(lo),
        "hi": float(hi),
        "p_boot": p,
        "n_users": int(m),
        "n_boot": int(n),
        "level": float(level),
    }
