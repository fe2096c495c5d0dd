"""Ranking and scoring: every user's top-k lists (seen songs masked, ties broken in a fixed random order) and
their metrics, on validation (tuning) and on the test slices (the report)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from eval.baselines import Recommender
from eval.data import SLICES, EvalData, slice_test
from eval.metrics import evaluate_topk, topk_from_scores

HEADLINE = "recall@20"
N_POP_BUCKETS = 5
SCORE_BATCH_CELLS = 1 << 24  # users scored at once x catalogue size: bounds the dense score block (~64 MB)


def rank_users(model: Recommender, train: sp.csr_matrix, users: np.ndarray, width: int,
               candidates: list[np.ndarray | None], order: np.ndarray) -> list[np.ndarray]:
    """Top-`width` lists (rows = all users; -1 rows for users not in `users`) for each candidate mask, scoring
    each batch of users once. Seen (train) songs are masked; ties are broken in `order` (see
    `eval.data.tie_order`)."""
    n_users, n_items = train.shape
    out = [np.full((n_users, width), -1, dtype=np.int64) for _ in candidates]
    batch = max(1, SCORE_BATCH_CELLS // max(n_items, 1))
    for start in range(0, len(users), batch):
        u = users[start:start + batch]
        # Rank in permuted column space, then map the indices back.
        scores, seen = model.score(u, train)[:, order], train[u][:, order]
        for topk, cand in zip(out, candidates):
            if cand is None or cand.any():
                top = topk_from_scores(scores, width, exclude=seen, candidates=None if cand is None else cand[order])
                topk[u] = np.where(top >= 0, order[np.maximum(top, 0)], -1)
    return out


def validation_metrics(model: Recommender, d: EvalData, valid: sp.csr_matrix, k: int = 20,
                       candidates: np.ndarray | None = None) -> dict[str, Any]:
    """recall@k, ndcg@k and tail_share@k of `model` (fitted on `d.train`) on the relevance matrix `valid`, and
    under "per_user_ndcg" the per-user NDCG@k (users with a validation play, in row order); NaN and an empty array
    when `valid` is empty."""
    users = np.flatnonzero(np.diff(valid.indptr))
    names = (f"recall@{k}", f"ndcg@{k}", f"tail_share@{k}")
    if users.size == 0:
        return {**dict.fromkeys(names, float("nan")), "per_user_ndcg": np.zeros(0)}
    topk = rank_users(model, d.train, users, k, [candidates], d.order)[0]
    res, per_user = evaluate_topk(topk, valid, ks=[k], candidates=candidates, is_tail=d.is_tail,
                                  return_per_user=True)
    if res.get("empty"):
        return {**dict.fromkeys(names, float("nan")), "per_user_ndcg": np.zeros(0)}
    return {**{n: float(res[n]) for n in names}, "per_user_ndcg": np.asarray(per_user[f"ndcg@{k}"], float)}


def validation_recall(model: Recommender, d: EvalData, valid: sp.csr_matrix, k: int = 20,
                      candidates: np.ndarray | None = None) -> float:
    """recall@k of `model` (fitted on `d.train`) on the relevance matrix `valid`."""
    return validation_metrics(model, d, valid, k, candidates)[f"recall@{k}"]



def evaluate_models(models: dict[str, Recommender], data: EvalData, ks: list[int], progress: bool
                    ) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, np.ndarray]]]:
    """results[slice][model] = metrics; per_user[slice][model] = per-user recall@20 (for the bootstrap)."""
    users = np.flatnonzero(np.diff(data.test.indptr))
    slices = {name: slice_test(data, name) for name in SLICES}
    results: dict[str, dict[str, dict]] = {name: {} for name in SLICES}
    per_user: dict[str, dict[str, np.ndarray]] = {name: {} for name in SLICES}
    bar = tqdm(models.items(), desc="evaluating on test", unit="model", disable=not progress, leave=False)
    for model_name, model in bar:
        bar.set_postfix_str(model_name)
        t0 = time.perf_counter()
        # one top-k per distinct candidate set (`all` and `warm` both rank the whole catalogue)
        whole, known, cold = rank_users(model, data.train, users, max(ks), [None, data.warm, data.cold], data.order)
        lists = {"all": whole, "warm": whole, "warm-known": known, "cold": cold}
        for slice_name, (test, cand) in slices.items():
            if test.nnz == 0:
                results[slice_name][model_name] = {"empty": True, "n_users": 0, "n_users_skipped": test.shape[0]}
                continue
            whole_catalogue = cand is None
            res, pu = evaluate_topk(lists[slice_name], test, ks=ks, candidates=cand,
                                    is_tail=data.is_tail if slice_name != "cold" else None,
                                    item_pop=data.item_pop if slice_name != "cold" else None,
                                    n_pop_buckets=N_POP_BUCKETS, return_per_user=True,
                                    is_new=data.cold if whole_catalogue and data.cold.any() else None)
            results[slice_name][model_name] = res
            per_user[slice_name][model_name] = pu[HEADLINE]
        if progress:
            tqdm.write(f"  eval {model_name}: {time.perf_counter() - t0:.1f}s")
    return results, per_user
