"""Hyperparameter tuning on a validation split carved out of the training part (`llmrec.split.tuning_split`):
the CF baselines' grids, the ridge strengths of the content-to-CF maps, the hybrids' blend weight and cold offset,
and hybrid-tail's popularity penalty. The test part is never touched."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from eval.baselines import ItemKNN, Recommender, RidgeContentToCF
from eval.data import EvalData, build_data, slice_test
from eval.hybrid import CachedScores, Hybrid
from eval.models import DEFAULTS, als_model, bpr_model, llmrec_model
from eval.scoring import validation_metrics, validation_recall
from llmrec.schema import Catalog
from llmrec.split import Split

# Validation grids: small on purpose (seconds on the synthetic catalog, a few minutes on lastfm-2k), but wide
# enough that the CF baselines are not strawmen. ALS and BPR are searched in two stages: their optimiser knobs at
# 64 factors first, then the number of factors at the best knobs.
ITEMKNN_GRID = [{"k": k, "shrink": s} for s in (0.0, 10.0) for k in (20, 50, 100, 200, 500)]
ALS_GRID_1 = [{"factors": 64, "regularization": r, "alpha": a} for r in (0.01, 0.1, 1.0, 10.0, 50.0)
              for a in (1.0, 5.0, 10.0, 40.0)]
ALS_FACTORS = (16, 32, 64, 128)
BPR_GRID_1 = [{"factors": 64, "learning_rate": lr, "regularization": r, "iterations": 300}
              for lr in (0.005, 0.01, 0.05) for r in (0.001, 0.01, 0.05)]
BPR_FACTORS = (32, 64, 128)
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
BLEND_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
# The hybrid's offset for new songs, in units of a per-user score standard deviation (`eval.hybrid.Hybrid`).
COLD_OFFSETS = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
# hybrid-tail's popularity penalty on known songs, in per-user score std units per catalogue std of log plays.
POP_PENALTIES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
# content model -> the hybrid that blends it with CF (both tuned and built the same way: `tune`,
# `eval.models.build_models`)
HYBRID_OF = {"llmrec": "hybrid", "mm2cf": "mm2cf-hybrid"}


@dataclass
class Tuned:
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    how: str = "defaults (eval.tune=false)"
    progress: bool = False  # a tqdm bar per searched model


def _search(name: str, grid: list[dict], make: Callable[[dict], Recommender],
            score: Callable[[Recommender], float | dict], tuned: Tuned, incumbent: tuple[dict, float] | None = None,
            log_name: str | None = None) -> tuple[dict, float]:
    """Try every setting in `grid` (and keep `incumbent` unless beaten); record all in `tuned.log[log_name or
    name]`. `score` returns validation recall@20, or a dict with the value to maximise under "objective" and the
    figures to log beside it."""
    best, best_score = incumbent if incumbent is not None else (grid[0], -np.inf)
    for params in tqdm(grid, desc=f"tune {name}", disable=not tuned.progress, leave=False):
        figures = score(make(params))
        if not isinstance(figures, dict):
            figures = {"objective": figures, "valid_recall@20": figures}
        value = figures["objective"]
        tuned.log.setdefault(log_name or name, []).append(
            {**params, **{k: round(v, 6) for k, v in figures.items() if k != "objective"}})
        if np.isfinite(value) and value > best_score:
            best, best_score = params, value
    tuned.params[name] = dict(best)
    return tuned.params[name], best_score


def sample_validation_users(inner: Split, n_songs: int, max_cells: int, seed: int) -> tuple[Split, str]:
    """`inner` with its validation plays cut to a seeded sample of users when scoring every validation user
    against every song would exceed `max_cells` (0: never), and a phrase saying so for the report ("" if uncut).

    Each of the ~170 tuned settings scores every validation user against the whole catalogue: at 100k songs and
    20k users one ItemKNN setting alone ran for over 5 minutes on 2 cores. The training plays are untouched, and
    every model is tuned on the same users."""
    users = pd.unique(inner.test["user_id"])
    keep = max(1, max_cells // max(n_songs, 1)) if max_cells > 0 else len(users)
    if len(users) <= keep:
        return inner, ""
    chosen = np.random.default_rng(seed).choice(users, size=keep, replace=False)
    test = inner.test[inner.test["user_id"].isin(chosen)]
    return dataclasses.replace(inner, test=test), (f"; validation users sampled: {keep:,} of {len(users):,} "
                                                   f"(eval.tune_max_cells={max_cells:,} user x song cells)")


def tune(catalog: Catalog, inner: Split, text: np.ndarray, llm: np.ndarray | None, seed: int,
         progress: bool, user_tower: str = "history", tail_ndcg_budget: float = 0.05, raw: np.ndarray | None = None,
         max_cells: int = 0) -> Tuned:
    """Grid-search on `inner` (`llmrec.split.tuning_split`: an item hold-out of the training part, which llmrec's
    training examples leave out too) the CF hyperparameters on warm validation recall@20, then the ridge strengths
    of text2cf and llmrec's CF tower on cold validation songs, the hybrid's blend weight (warm validation) and
    cold offset (all validation), and hybrid-tail's popularity penalty and cold offset (`_tune_tail`). The test
    part is never touched. Without llmrec embeddings there is no hybrid to tune, and no hybrid-tail. `raw` (the
    no-LLM bar, `eval.rawfeatures`) is tuned exactly as llmrec is: its ridge strength, then `mm2cf-hybrid`'s blend
    weight and cold offset. Above `max_cells` user x song cells the validation users are sampled
    (`sample_validation_users`)."""
    inner, sampled = sample_validation_users(inner, len(catalog.songs), max_cells, seed)
    d = build_data(catalog, inner.train, inner.test, seed, inner.cold_songs)
    tuned = Tuned(how=f"grid search on an item hold-out of the training part ({len(inner.train)} fit / "
                      f"{len(inner.test)} validation interactions{sampled}), validation recall@20", progress=progress)
    warm_valid, _ = slice_test(d, "warm")
    cold_valid, cold_cand = slice_test(d, "cold")

    def warm_score(model: Recommender) -> float:
        return validation_recall(model.fit(d.train), d, warm_valid)

    _search("itemknn", ITEMKNN_GRID, lambda p: ItemKNN(**p), _itemknn_score(d, warm_valid), tuned)
    for name, grid, factors, make in (("als", ALS_GRID_1, ALS_FACTORS, als_model),
                                      ("bpr", BPR_GRID_1, BPR_FACTORS, bpr_model)):
        best = _search(name, grid, partial(make, seed=seed), warm_score, tuned)
        more = [{**best[0], "factors": f} for f in factors if f != best[0]["factors"]]
        _search(name, more, partial(make, seed=seed), warm_score, tuned, incumbent=best)

    als = als_model(tuned.params["als"], seed).fit(d.train)
    def cold_score(model: Recommender) -> float:
        return validation_recall(model.fit(d.train), d, cold_valid, candidates=cold_cand)

    _search("text2cf", [{"alpha": a} for a in RIDGE_ALPHAS], lambda p: RidgeContentToCF(text, als, fit_cf=False, **p),
            cold_score, tuned)
    if llm is not None or raw is not None:
        # The hybrid blends content with the CF model that validates best on warm songs (not always ALS: ItemKNN
        # wins on the synthetic catalog), so that it is compared with the strongest CF partner available.
        cf_name = max(("itemknn", "als", "bpr"), key=lambda m: max(r["valid_recall@20"] for r in tuned.log[m]))
        cf = {"itemknn": lambda: ItemKNN(**tuned.params["itemknn"]), "als": lambda: als,
              "bpr": lambda: bpr_model(tuned.params["bpr"], seed)}[cf_name]().fit(d.train)
        users = np.flatnonzero(np.diff(d.test.indptr))
        cf = CachedScores(cf, users, d.train)
    for name, vectors, tower in (("llmrec", llm, user_tower), ("mm2cf", raw, user_tower)):
        if vectors is None:
            continue
        # The ridge strength of the CF tower, whatever the tower: `llmrec-cf` and `mm2cf-cf` use it when the
        # history tower is the headline (which has no knob of its own).
        _search(name, [{"alpha": a} for a in RIDGE_ALPHAS],
                lambda p, vectors=vectors: llmrec_model(vectors, "cf", als, p["alpha"]), cold_score, tuned)
        content = CachedScores(llmrec_model(vectors, tower, als, tuned.params[name]["alpha"], d.histories
                                            ).fit(d.train), users, d.train)
        hybrid = HYBRID_OF[name]
        # Two knobs, two questions: the blend weight by how well known songs are ranked among known songs (warm
        # validation plays, warm candidates), then the cold offset by the one ranking of everything (all
        # validation plays, whole catalogue).
        weight, _ = _search(hybrid, [{"weight": w, "cold_offset": 0.0, "cf": cf_name} for w in BLEND_WEIGHTS],
                            lambda p, content=content: Hybrid(cf, content, d.warm, p["weight"]),
                            lambda m: validation_recall(m.fit(d.train), d, warm_valid, candidates=d.warm), tuned,
                            log_name=f"{hybrid}-weight")
        _search(hybrid, [{**weight, "cold_offset": b} for b in COLD_OFFSETS],
                lambda p, content=content: Hybrid(cf, content, d.warm, p["weight"], p["cold_offset"]),
                lambda m: validation_recall(m.fit(d.train), d, d.test), tuned)
        if name == "llmrec":
            _tune_tail(tuned, d, als, cf, content, tail_ndcg_budget)
    if progress:
        for name, params in tuned.params.items():
            log = tuned.log.get(name, [])  # empty for a knob that was not searched (mm2cf's alpha, history tower)
            chosen = next((r for r in log if all(r.get(k, v) == v for k, v in params.items())), {})
            figures = ", ".join(f"{k[6:]} {v:.4f}" for k, v in chosen.items() if k.startswith("valid_"))
            print(f"  tuned {name} ({len(log)} settings): {params}, validation {figures}")
    return tuned


def _itemknn_score(d: EvalData, valid) -> Callable[[ItemKNN], float]:
    """Validation recall of an ItemKNN setting, its neighbour lists cut from those of the grid's largest k at the
    same shrink: one similarity pass per shrink instead of one per setting (the pass is the whole cost of a fit).
    Exactly the model `ItemKNN(**setting).fit(d.train)` would build."""
    largest = max(p["k"] for p in ITEMKNN_GRID)
    lists: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def score(model: ItemKNN) -> float:
        if model.shrink not in lists:
            lists.clear()  # one shrink's lists at a time: 100k songs x 500 neighbours is 400 MB
            lists[model.shrink] = ItemKNN(largest, model.shrink, model.binary).neighbour_lists(d.train)
        return validation_recall(model.fit(d.train, neighbours=lists[model.shrink]), d, valid)
    return score


def _tune_tail(tuned: Tuned, d: EvalData, als: Recommender, cf: Recommender, content: Recommender,
               ndcg_budget: float) -> None:
    """`hybrid-tail`: the hybrid's blend weight, with the popularity penalty and the cold offset that put the most
    long-tail songs into the top 20 of all validation plays while NDCG@20 stays within `ndcg_budget` (a fraction)
    of ALS's: the operating point of the Matthew-effect comparison (tail share vs ALS's at a bounded accuracy
    loss), tuned on validation like every other knob. When no setting keeps within the budget, the one with the
    best NDCG is kept.

    "Within the budget" is judged one standard error on the safe side (the one-standard-error rule of model
    selection, Breiman et al. 1984): the NDCG change vs ALS, paired per validation user, minus its standard error
    must stay above -budget. The setting with the most tail share sits at the edge of the budget by construction,
    and a point estimate at the edge slips over it out of sample about half the time (on the synthetic catalog it
    landed at -8.8% on test with a 5% budget)."""
    als_ndcg = validation_metrics(als, d, d.test)["per_user_ndcg"]
    hybrid = tuned.params["hybrid"]

    def objective(model: Recommender) -> dict:
        m = validation_metrics(model.fit(d.train), d, d.test)
        change, se = paired_relative_change(m["per_user_ndcg"], als_ndcg)
        ok = change - se >= -ndcg_budget
        # Settings over the budget rank after every one within it, by NDCG (the least bad wins if none is within).
        return {"objective": m["tail_share@20"] + 1.0 if ok else m["ndcg@20"] - 1.0,
                "valid_recall@20": m["recall@20"], "valid_ndcg@20": m["ndcg@20"],
                "valid_ndcg@20_change": change, "valid_ndcg@20_change_se": se,
                "valid_tail_share@20": m["tail_share@20"], "within_ndcg_budget": float(ok)}

    grid = [{**hybrid, "cold_offset": b, "pop_penalty": p} for p in POP_PENALTIES for b in COLD_OFFSETS]
    _search("hybrid-tail", grid, lambda p: Hybrid(cf, content, d.warm, p["weight"], p["cold_offset"],
                                                  p["pop_penalty"], d.item_pop), objective, tuned)
    tuned.params["hybrid-tail"]["ndcg_budget"] = ndcg_budget


def paired_relative_change(model: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean per-user change of `model` vs `reference` (same users, same order) relative to the reference's mean,
    and its standard error; (nan, nan) without users or with a zero reference."""
    model, reference = np.asarray(model, float), np.asarray(reference, float)
    if model.shape != reference.shape:
        raise ValueError(f"paired_relative_change: {model.shape} vs {reference.shape} users")
    base = reference.mean() if reference.size else 0.0
    if reference.size < 2 or base <= 0:
        return float("nan"), float("nan")
    diff = (model - reference) / base
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


def default_params(llm: bool, raw: bool = False) -> Tuned:
    params = {k: dict(v) for k, v in DEFAULTS.items() if llm or k not in ("hybrid", "llmrec")}
    if raw:
        params["mm2cf"], params["mm2cf-hybrid"] = dict(DEFAULTS["llmrec"]), dict(DEFAULTS["hybrid"])
    return Tuned(params=params)

