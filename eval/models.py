"""The models the report scores, built from their hyperparameters and fitted on the training part: the CF and
content baselines, llmrec under either user tower, and the hybrids."""
from __future__ import annotations

import numpy as np

from eval.baselines import ALS, BPR, ContentKNN, ItemKNN, MostPop, RandomRec, Recommender, RidgeContentToCF
from eval.data import EvalData
from eval.hybrid import Hybrid
from eval.served import ServedRanking

DEFAULTS = {"itemknn": {"k": 100, "shrink": 10.0}, "als": {"factors": 64, "regularization": 0.1, "alpha": 10.0},
            "bpr": {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 300},
            "text2cf": {"alpha": 10.0}, "llmrec": {"alpha": 10.0},
            "hybrid": {"weight": 0.5, "cold_offset": 0.0, "cf": "als"}}
USER_TOWERS = ("cf", "history")


def als_model(params: dict, seed: int) -> ALS:
    return ALS(**params, iterations=15, random_state=seed)


def bpr_model(params: dict, seed: int) -> BPR:
    return BPR(**params, random_state=seed)


def llmrec_model(vectors: np.ndarray, user_tower: str, als: Recommender, alpha: float,
                 histories: list[np.ndarray] | None = None) -> Recommender:
    """Song embeddings scored against a user by one of USER_TOWERS (see `EvalConfig.user_tower`).

    `cf`: ALS user factors (fitted on train, shared with the `als` entry) against every song's embedding mapped
    into ALS item space — warm songs too (`replace_warm`), so the ranking depends on the embeddings alone and the
    CF/content blend stays the hybrid's job. The map is the same ridge regression as text2cf, so llmrec vs text2cf
    compares the two song representations under one user tower. `history`: the ranking `/v1/recommendations`
    serves (`eval.served.ServedRanking` over `histories`, the users' most recent distinct training plays)."""
    check_user_tower(user_tower)
    if user_tower == "cf":
        return RidgeContentToCF(vectors, als, fit_cf=False, alpha=alpha, replace_warm=True)
    if histories is None:
        raise ValueError("the history tower needs each user's recent plays (EvalData.histories)")
    return ServedRanking(vectors, histories)


def check_user_tower(user_tower: str) -> None:
    if user_tower not in USER_TOWERS:
        raise ValueError(f"eval.user_tower {user_tower!r} is not supported; choose one of {list(USER_TOWERS)}")


def build_models(data: EvalData, params: dict[str, dict], text: np.ndarray, llm: dict[str, np.ndarray],
                 seed: int, user_tower: str = "history", raw: np.ndarray | None = None) -> dict[str, Recommender]:
    """Every model, fitted on the training part. `llm` maps a model name (`llmrec`, `llmrec-<variant>`) to its
    aligned song vectors; empty before training. `llmrec` and its modality variants use `user_tower`; the full
    embeddings are also scored with the other tower, as `llmrec-<other tower>`. `raw` (the features llmrec is
    given, without the LLM: `eval.rawfeatures`) becomes `mm2cf`, scored exactly like `llmrec` (and `mm2cf-<other
    tower>` like `llmrec-<other tower>`), and `mm2cf-hybrid`, blended exactly like `hybrid`."""
    x = data.train
    models: dict[str, Recommender] = {
        "random": RandomRec(seed=seed).fit(x),
        "mostpop": MostPop().fit(x),
        "itemknn": ItemKNN(**params["itemknn"]).fit(x),
        "als": als_model(params["als"], seed).fit(x),
        "bpr": bpr_model(params["bpr"], seed).fit(x),
        "text": ContentKNN(text, center=True).fit(x),
    }
    models["text2cf"] = RidgeContentToCF(text, models["als"], fit_cf=False, **params["text2cf"]).fit(x)
    alpha = params.get("llmrec", DEFAULTS["llmrec"])["alpha"]
    hist = data.histories
    for name, vectors in llm.items():
        models[name] = llmrec_model(vectors, user_tower, models["als"], alpha, hist).fit(x)
    def other_towers(name: str, vectors: np.ndarray, ridge_alpha: float) -> dict[str, Recommender]:
        return {f"{name}-{other}": llmrec_model(vectors, other, models["als"], ridge_alpha, hist).fit(x)
                for other in USER_TOWERS if other != user_tower}

    if "llmrec" in llm:
        models.update(other_towers("llmrec", llm["llmrec"], alpha))
    if raw is not None:
        raw_alpha = params.get("mm2cf", DEFAULTS["llmrec"])["alpha"]
        models["mm2cf"] = llmrec_model(raw, user_tower, models["als"], raw_alpha, hist).fit(x)
        # the no-LLM bar under the other tower too, so that `llmrec-cf` has its own bar (`mm2cf-cf`)
        models.update(other_towers("mm2cf", raw, raw_alpha))
    for name, content in (("hybrid", "llmrec"), ("hybrid-tail", "llmrec"), ("mm2cf-hybrid", "mm2cf")):
        if content in models and name in params:
            blend = params[name]
            models[name] = Hybrid(models[blend.get("cf", "als")], models[content], data.warm, blend["weight"],
                                  blend.get("cold_offset", 0.0), blend.get("pop_penalty", 0.0),
                                  data.item_pop).fit(x)
    return models
