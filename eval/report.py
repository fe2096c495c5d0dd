"""`llmrec eval`: every model, one split, three slices, one report (`runs/<name>/eval/`).

Protocol (DESIGN.md, "Evaluation"):

* The split is `llmrec.split.split_catalog` — the same one the training examples use, so no test interaction
  reaches any model. Interactions are binarised: relevance is "played in the test part", not how often.
* Test pairs that are also train pairs (a user replaying a song they already played) are dropped and counted: seen
  songs are masked from every ranking, so such pairs could never be hit.
* Full-catalogue ranking, no sampled negatives, on three slices:
  `warm` — test plays of songs with train plays, ranked among the whole catalogue;
  `cold` — test plays of songs without train plays, ranked among those cold songs only;
  `all`  — every test play, ranked among the whole catalogue.
  Users without a test play in a slice are skipped and counted; a slice with no test plays at all is reported as
  `{"empty": true}` for every model, never as zeros.
* Models: random, mostpop, itemknn, als, bpr (CF; hyperparameters tuned on a validation split carved out of the
  training part), text (ContentKNN on sentence embeddings of the song text), text2cf (ridge map from text to ALS
  factors for cold songs) and, once `llmrec train` has written `model/embeddings.safetensors`, llmrec (the LLM's
  song embeddings scored with the user tower named by `eval.user_tower`; the other tower is reported as
  `llmrec-<tower>`), hybrid (the best-validating CF model blended with llmrec on warm songs, llmrec alone on
  cold songs, tuned for recall) and hybrid-tail (the same blend with a popularity penalty, tuned for long-tail
  exposure within an NDCG budget of ALS's, `eval.tail_ndcg_budget`).
* Content models that pool history vectors (text, llmrec-history) remove the catalogue's mean vector first
  (ContentKNN(center=True)): the same treatment for every content model, so no baseline is weakened.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from eval.ablation import ablation_markdown, modality_ablation, plot_ablation, run_encoder_vectors
from eval.baselines import ALS, BPR, ContentKNN, ItemKNN, MostPop, RandomRec, Recommender, RidgeContentToCF
from eval.rawfeatures import raw_feature_vectors
from eval.served import ServedRanking, history_indices
from eval.metrics import bootstrap_ci, evaluate_topk, topk_from_scores
from eval.reasons import evaluate_reasons
from llmrec.config import Config
from llmrec.io import MissingArtefactError, RunDir, atomic_path, atomic_write_json, atomic_write_text
from llmrec.schema import Catalog, load_catalog
from llmrec.split import Split, positive_plays as positives, split_catalog, tuning_split

SLICES = ("all", "warm", "warm-known", "cold")
CF_MODELS = ("mostpop", "itemknn", "als", "bpr")  # "best CF" in the headline is the best of these per slice
HEADLINE = "recall@20"
TAIL_SHARE = 0.8  # tail = known songs (training plays) outside the top 20% of them by training plays
N_POP_BUCKETS = 5
SCORE_BATCH_CELLS = 1 << 24  # users scored at once x catalogue size: bounds the dense score block (~64 MB)
LLMREC_NOT_TRAINED = "llmrec: not trained yet (run `llmrec train`)"

# Validation grids: small on purpose (seconds on the synthetic catalog, a few minutes on lastfm-2k), but wide
# enough that the CF baselines are not strawmen. ALS and BPR are searched in two stages: their optimiser knobs at
# 64 factors first, then the number of factors at the best knobs.
ITEMKNN_GRID = [{"k": k, "shrink": s} for k in (20, 50, 100, 200, 500) for s in (0.0, 10.0)]
ALS_GRID_1 = [{"factors": 64, "regularization": r, "alpha": a} for r in (0.01, 0.1, 1.0, 10.0, 50.0)
              for a in (1.0, 5.0, 10.0, 40.0)]
ALS_FACTORS = (16, 32, 64, 128)
BPR_GRID_1 = [{"factors": 64, "learning_rate": lr, "regularization": r, "iterations": 300}
              for lr in (0.005, 0.01, 0.05) for r in (0.001, 0.01, 0.05)]
BPR_FACTORS = (32, 64, 128)
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
BLEND_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
# The hybrid's offset for new songs, in units of a per-user score standard deviation (`Hybrid`).
COLD_OFFSETS = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
# hybrid-tail's popularity penalty on known songs, in per-user score std units per catalogue std of log plays.
POP_PENALTIES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
DEFAULTS = {"itemknn": {"k": 100, "shrink": 10.0}, "als": {"factors": 64, "regularization": 0.1, "alpha": 10.0},
            "bpr": {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 300},
            "text2cf": {"alpha": 10.0}, "llmrec": {"alpha": 10.0},
            "hybrid": {"weight": 0.5, "cold_offset": 0.0, "cf": "als"}}
USER_TOWERS = ("cf", "history")
# content model -> the hybrid that blends it with CF (both tuned and built the same way: `tune`, `build_models`)
HYBRID_OF = {"llmrec": "hybrid", "mm2cf": "mm2cf-hybrid"}


# ------------------------------------------------------------------------------------------------ data


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


# ------------------------------------------------------------------------------------------------ vectors


def align_vectors(song_ids: np.ndarray, ids: list[str] | np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of `vectors` in catalogue order; songs without a vector get zeros (they score 0). Returns the
    matrix and how many catalogue songs had no vector."""
    pos = pd.Index([str(i) for i in ids]).get_indexer(song_ids)
    out = np.zeros((len(song_ids), vectors.shape[1]), dtype=np.float32)
    out[pos >= 0] = np.asarray(vectors, dtype=np.float32)[pos[pos >= 0]]
    return out, int((pos < 0).sum())


def _read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    from safetensors.numpy import load_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    key = "embeddings" if "embeddings" in tensors else next(iter(tensors))
    if "song_ids" not in meta:
        raise ValueError(f"{path}: metadata has no 'song_ids' (a JSON list naming each row of '{key}')")
    return json.loads(meta["song_ids"]), tensors[key]


def llmrec_item_vectors(run: RunDir, variant: str | None = None) -> tuple[list[str], np.ndarray] | None:
    """The trained model's song embeddings, or None when `llmrec train` has not written them yet.

    Extension point for the training stage. Format of `runs/<name>/model/embeddings.safetensors`: one float tensor
    `embeddings` [n_songs, dim] and the safetensors metadata entry `song_ids`, a JSON list naming each row (the
    song ids of the catalog). Ablations write `embeddings-<variant>.safetensors` in the same format; they are
    evaluated as models `llmrec-<variant>` (e.g. `llmrec-text`, `llmrec-audio`).
    """
    name = "embeddings.safetensors" if variant is None else f"embeddings-{variant}.safetensors"
    path = run.model / name
    return _read_embeddings(path) if path.is_file() else None


def llmrec_variants(run: RunDir) -> list[str]:
    return sorted(p.name[len("embeddings-"):-len(".safetensors")] for p in run.model.glob("embeddings-*.safetensors"))


def text_item_vectors(cfg: Config, run: RunDir, catalog: Catalog, progress: bool = False
                      ) -> tuple[list[str], np.ndarray, str]:
    """Text features of every song: `features/text.safetensors` when `llmrec features` wrote it; otherwise the
    features stage's own function computes them (same text, same encoder: `features.text_encoder`) into
    `eval/text.safetensors`, where later evals reuse them while the catalog text is unchanged."""
    from llmrec.features import load_text_features

    if (run.features / "text.safetensors").is_file():
        where, source = run.features, "from `llmrec features`"
    else:
        from llmrec.text_features import build_text_features

        if progress:
            print(f"  text features: {run.features / 'text.safetensors'} not found; {cfg.features.text_encoder} "
                  f"features of {len(catalog.songs)} songs go to {run.eval} (computed once, then reused)")
        status = build_text_features(catalog, cfg, run.eval, progress=progress)["status"]
        where, source = run.eval, f"features/text.safetensors not found: computed by eval ({status})"
    feats = load_text_features(where)
    return feats.song_ids, feats.text.numpy(), f"{feats.encoder}, {where / 'text.safetensors'} ({source})"


# ------------------------------------------------------------------------------------------------ models


class Hybrid(Recommender):
    """CF for warm songs, content (llmrec) for cold ones, on a common scale.

    Both score rows are z-normalised per user (over the whole catalogue); warm songs get
    `weight * z(cf) + (1 - weight) * z(content)`, cold songs `z(content) + cold_offset` — CF scores of songs without
    plays are meaningless (ALS leaves their factors at zero, BPR at their random initialisation).

    The two knobs answer two questions and are tuned apart (`tune`): `weight` how to rank known songs against each
    other, `cold_offset` how far new songs are let into the one ranking. A z-score of the blend and a z-score of
    content alone are not on one scale (a blend of two partly independent z-scores has a smaller spread), so
    without the offset the interleaving of new and known songs is an accident of that spread.

    An optional third knob, `pop_penalty`, subtracts `pop_penalty * z(log(1 + plays))` (z over the known songs)
    from known songs' scores: the standard popularity compensation, for the operating point `hybrid-tail` (see
    `tune`), which trades some accuracy for exposure of the long tail.
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


# ------------------------------------------------------------------------------------------------ scoring


def tie_order(n_items: int, seed: int) -> np.ndarray:
    """A fixed random order of the catalogue used to break score ties.

    `topk_from_scores` breaks ties by lower index. Catalogue order is not random (lastfm-2k's artist ids follow
    the crawl, so low ids are popular artists), and models that score many songs alike — MostPop, and every CF
    model on songs without plays — would inherit that order's popularity as if it were skill."""
    return np.random.default_rng([seed, 7]).permutation(n_items)


def rank_users(model: Recommender, train: sp.csr_matrix, users: np.ndarray, width: int,
               candidates: list[np.ndarray | None], order: np.ndarray) -> list[np.ndarray]:
    """Top-`width` lists (rows = all users; -1 rows for users not in `users`) for each candidate mask, scoring
    each batch of users once. Seen (train) songs are masked; ties are broken in `order` (see `tie_order`)."""
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


# ------------------------------------------------------------------------------------------------ tuning


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


def tune(catalog: Catalog, inner: Split, text: np.ndarray, llm: np.ndarray | None, seed: int,
         progress: bool, user_tower: str = "history", tail_ndcg_budget: float = 0.05, raw: np.ndarray | None = None
         ) -> Tuned:
    """Grid-search on `inner` (`llmrec.split.tuning_split`: an item hold-out of the training part, which llmrec's
    training examples leave out too) the CF hyperparameters on warm validation recall@20, then the ridge strengths
    of text2cf and llmrec's CF tower on cold validation songs, the hybrid's blend weight (warm validation) and
    cold offset (all validation), and hybrid-tail's popularity penalty and cold offset (`_tune_tail`). The test
    part is never touched. Without llmrec embeddings there is no hybrid to tune, and no hybrid-tail. `raw` (the
    no-LLM bar, `eval.rawfeatures`) is tuned exactly as llmrec is: its ridge strength, then `mm2cf-hybrid`'s blend
    weight and cold offset."""
    d = build_data(catalog, inner.train, inner.test, seed, inner.cold_songs)
    tuned = Tuned(how=f"grid search on an item hold-out of the training part ({len(inner.train)} fit / "
                      f"{len(inner.test)} validation interactions), validation recall@20", progress=progress)
    warm_valid, _ = slice_test(d, "warm")
    cold_valid, cold_cand = slice_test(d, "cold")

    def warm_score(model: Recommender) -> float:
        return validation_recall(model.fit(d.train), d, warm_valid)

    _search("itemknn", ITEMKNN_GRID, lambda p: ItemKNN(**p), warm_score, tuned)
    for name, grid, factors, make in (("als", ALS_GRID_1, ALS_FACTORS, _als), ("bpr", BPR_GRID_1, BPR_FACTORS, _bpr)):
        best = _search(name, grid, lambda p: make(p, seed), warm_score, tuned)
        more = [{**best[0], "factors": f} for f in factors if f != best[0]["factors"]]
        _search(name, more, lambda p: make(p, seed), warm_score, tuned, incumbent=best)

    als = _als(tuned.params["als"], seed).fit(d.train)
    def cold_score(model: Recommender) -> float:
        return validation_recall(model.fit(d.train), d, cold_valid, candidates=cold_cand)

    _search("text2cf", [{"alpha": a} for a in RIDGE_ALPHAS], lambda p: RidgeContentToCF(text, als, fit_cf=False, **p),
            cold_score, tuned)
    if llm is not None or raw is not None:
        # The hybrid blends content with the CF model that validates best on warm songs (not always ALS: ItemKNN
        # wins on the synthetic catalog), so that it is compared with the strongest CF partner available.
        cf_name = max(("itemknn", "als", "bpr"), key=lambda m: max(r["valid_recall@20"] for r in tuned.log[m]))
        cf = {"itemknn": lambda: ItemKNN(**tuned.params["itemknn"]), "als": lambda: als,
              "bpr": lambda: _bpr(tuned.params["bpr"], seed)}[cf_name]().fit(d.train)
        users = np.flatnonzero(np.diff(d.test.indptr))
        cf = CachedScores(cf, users, d.train)
    for name, vectors, tower in (("llmrec", llm, user_tower), ("mm2cf", raw, user_tower)):
        if vectors is None:
            continue
        # The ridge strength of the CF tower: llmrec's is used by `llmrec-cf` whatever the tower; mm2cf's only
        # when mm2cf itself is scored with the CF tower (the history tower has no knob).
        if name == "llmrec" or tower == "cf":
            _search(name, [{"alpha": a} for a in RIDGE_ALPHAS],
                    lambda p: llmrec_model(vectors, "cf", als, p["alpha"]), cold_score, tuned)
        else:
            tuned.params[name] = dict(DEFAULTS["llmrec"])
        content = CachedScores(llmrec_model(vectors, tower, als, tuned.params[name]["alpha"], d.histories
                                            ).fit(d.train), users, d.train)
        hybrid = HYBRID_OF[name]
        # Two knobs, two questions: the blend weight by how well known songs are ranked among known songs (warm
        # validation plays, warm candidates), then the cold offset by the one ranking of everything (all
        # validation plays, whole catalogue).
        weight, _ = _search(hybrid, [{"weight": w, "cold_offset": 0.0, "cf": cf_name} for w in BLEND_WEIGHTS],
                            lambda p: Hybrid(cf, content, d.warm, p["weight"]),
                            lambda m: validation_recall(m.fit(d.train), d, warm_valid, candidates=d.warm), tuned,
                            log_name=f"{hybrid}-weight")
        _search(hybrid, [{**weight, "cold_offset": b} for b in COLD_OFFSETS],
                lambda p: Hybrid(cf, content, d.warm, p["weight"], p["cold_offset"]),
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


def _als(params: dict, seed: int) -> ALS:
    return ALS(**params, iterations=15, random_state=seed)


def _bpr(params: dict, seed: int) -> BPR:
    return BPR(**params, random_state=seed)


def default_params(llm: bool, raw: bool = False) -> Tuned:
    params = {k: dict(v) for k, v in DEFAULTS.items() if llm or k not in ("hybrid", "llmrec")}
    if raw:
        params["mm2cf"], params["mm2cf-hybrid"] = dict(DEFAULTS["llmrec"]), dict(DEFAULTS["hybrid"])
    return Tuned(params=params)


# ------------------------------------------------------------------------------------------------ evaluation


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
    given, without the LLM: `eval.rawfeatures`) becomes `mm2cf`, scored exactly like `llmrec`, and
    `mm2cf-hybrid`, blended exactly like `hybrid`."""
    x = data.train
    models: dict[str, Recommender] = {
        "random": RandomRec(seed=seed).fit(x),
        "mostpop": MostPop().fit(x),
        "itemknn": ItemKNN(**params["itemknn"]).fit(x),
        "als": _als(params["als"], seed).fit(x),
        "bpr": _bpr(params["bpr"], seed).fit(x),
        "text": ContentKNN(text, center=True).fit(x),
    }
    models["text2cf"] = RidgeContentToCF(text, models["als"], fit_cf=False, **params["text2cf"]).fit(x)
    alpha = params.get("llmrec", DEFAULTS["llmrec"])["alpha"]
    hist = data.histories
    for name, vectors in llm.items():
        models[name] = llmrec_model(vectors, user_tower, models["als"], alpha, hist).fit(x)
    if "llmrec" in llm:
        for other in USER_TOWERS:
            if other != user_tower:
                models[f"llmrec-{other}"] = llmrec_model(llm["llmrec"], other, models["als"], alpha, hist).fit(x)
    if raw is not None:
        models["mm2cf"] = llmrec_model(raw, user_tower, models["als"],
                                       params.get("mm2cf", DEFAULTS["llmrec"])["alpha"], hist).fit(x)
    for name, content in (("hybrid", "llmrec"), ("hybrid-tail", "llmrec"), ("mm2cf-hybrid", "mm2cf")):
        if content in models and name in params:
            blend = params[name]
            models[name] = Hybrid(models[blend.get("cf", "als")], models[content], data.warm, blend["weight"],
                                  blend.get("cold_offset", 0.0), blend.get("pop_penalty", 0.0),
                                  data.item_pop).fit(x)
    return models


def evaluate_models(models: dict[str, Recommender], data: EvalData, ks: list[int], progress: bool
                    ) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, np.ndarray]]]:
    """results[slice][model] = metrics; per_user[slice][model] = per-user recall@20 (for the bootstrap)."""
    users = np.flatnonzero(np.diff(data.test.indptr))
    slices = {name: slice_test(data, name) for name in SLICES}
    results: dict[str, dict[str, dict]] = {name: {} for name in SLICES}
    per_user: dict[str, dict[str, np.ndarray]] = {name: {} for name in SLICES}
    for model_name, model in models.items():
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
            print(f"  eval {model_name}: {time.perf_counter() - t0:.1f}s")
    return results, per_user


def best_cf(slice_results: dict[str, dict]) -> str | None:
    scored = [(r[HEADLINE], m) for m, r in slice_results.items() if m in CF_MODELS and not r.get("empty")]
    return max(scored)[1] if scored else None


def headline(results: dict, per_user: dict, n_boot: int, seed: int) -> dict[str, Any]:
    """Per slice: recall@20 with a 95% bootstrap CI (users resampled) for the best CF model, text and llmrec, and
    paired CIs of their differences."""
    out: dict[str, Any] = {}
    for slice_name in SLICES:
        cf = best_cf(results[slice_name])
        if cf is None:
            out[slice_name] = {"empty": True}
            continue
        pu = per_user[slice_name]
        entry: dict[str, Any] = {"metric": HEADLINE, "best_cf": cf, "models": {}, "differences": {}}
        for m in (cf, "text", "mm2cf", "llmrec", "mm2cf-hybrid", "hybrid"):
            if m in pu:
                entry["models"][m] = bootstrap_ci(pu[m], n=n_boot, seed=seed)
        # llmrec - mm2cf and hybrid - mm2cf-hybrid are what the LLM adds over the same features without it.
        for a, b in (("text", cf), ("llmrec", cf), ("hybrid", cf), ("llmrec", "text"), ("llmrec", "mm2cf"),
                     ("hybrid", "mm2cf-hybrid")):
            if a in pu and b in pu:
                entry["differences"][f"{a} - {b}"] = bootstrap_ci(pu[a], pu[b], n=n_boot, seed=seed)
        out[slice_name] = entry
    return out


# ------------------------------------------------------------------------------------------------ run


def load_eval_catalog(run: RunDir) -> Catalog:
    if not (run.catalog / "interactions.parquet").is_file():
        raise MissingArtefactError(f"{run.catalog} has no catalog; run `llmrec prepare --run-dir {run.root}` first")
    return load_catalog(run.catalog)


def load_llm_vectors(run: RunDir, song_ids: np.ndarray, notes: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for variant in [None, *llmrec_variants(run)]:
        found = llmrec_item_vectors(run, variant)
        if found is None:
            continue
        name = "llmrec" if variant is None else f"llmrec-{variant}"
        out[name], missing = align_vectors(song_ids, *found)
        if missing:
            notes.append(f"{name}: {missing} catalogue songs have no embedding (they score 0)")
    if "llmrec" not in out:
        notes.append(LLMREC_NOT_TRAINED)
    return out


def run_eval(cfg: Config, run: RunDir, args: argparse.Namespace | None = None) -> dict[str, Any]:
    progress = not getattr(args, "no_progress", False)
    t_start = time.perf_counter()
    catalog = load_eval_catalog(run)
    split = split_catalog(catalog, cfg.eval.split, cfg.eval.valid_days)
    # The validation window (if any) is training data for the final models; tuning carves its own hold-out.
    train_df = positives(pd.concat([split.train, split.valid], ignore_index=True))
    data = build_data(catalog, train_df, positives(split.test), cfg.seed, split.cold_songs)
    ks = sorted(set(cfg.eval.ks) | {20})
    notes = dataset_notes(catalog, cfg, split)
    text_ids, text_vecs, text_source = text_item_vectors(cfg, run, catalog, progress)
    text, missing_text = align_vectors(data.song_ids, text_ids, text_vecs)
    if missing_text:
        notes.append(f"text: {missing_text} catalogue songs have no text features (they score 0)")
    llm = load_llm_vectors(run, data.song_ids, notes)
    media = run_encoder_vectors(run, data.song_ids)  # pooled once: for mm2cf and the ablation probes
    raw, raw_source = raw_feature_vectors(text, media)
    notes.append(f"mm2cf (the no-LLM bar): {raw_source}")
    notes.append(served_note(cfg.eval.user_tower))
    t_tune = time.perf_counter()
    check_user_tower(cfg.eval.user_tower)  # before minutes of tuning
    if cfg.eval.tune and "llmrec" in llm:
        notes.extend(tuning_holdout_notes(run, cfg))
    tuned = (tune(catalog, tuning_split(split, cfg.seed), text, llm.get("llmrec"), cfg.seed, progress,
                  cfg.eval.user_tower, cfg.eval.tail_ndcg_budget, raw)
             if cfg.eval.tune else default_params("llmrec" in llm, raw is not None))
    t_fit = time.perf_counter()
    models = build_models(data, tuned.params, text, llm, cfg.seed, cfg.eval.user_tower, raw)
    results, per_user = evaluate_models(models, data, ks, progress)
    t_reasons = time.perf_counter()
    reasons = evaluate_reasons(cfg, run, catalog, train_df, positives(split.test), progress)
    t_reasons = time.perf_counter() - t_reasons
    if reasons.get("skipped"):
        notes.append(f"reasons: {reasons['skipped']}")
    ablation = modality_ablation(run, data.song_ids, text, llm, media)
    report = {
        "dataset": catalog.meta.get("dataset") or catalog.meta.get("source") or "unknown",
        "item_kind": catalog.meta.get("item_kind", "song"),
        "split": split_summary(split, data, cfg),
        "ks": ks,
        "models": list(models),
        "results": results,
        "headline": headline(results, per_user, cfg.eval.bootstrap, cfg.seed),
        "hyperparameters": tuned.params,
        "tuning": {"how": tuned.how, "grid": tuned.log},
        "text_features": text_source,
        "notes": notes,
        "reasons": reasons,
        "ablation": ablation,
        "seconds": {"tune": round(t_fit - t_tune, 1), "reasons": round(t_reasons, 1),
                    "fit_and_eval": round(time.perf_counter() - t_fit - t_reasons, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    paths = write_report(run.eval, report)
    summary = {s: {m: round(r[HEADLINE], 4) for m, r in results[s].items() if not r.get("empty")} for s in SLICES}
    return {"report": str(paths[0]), "markdown": str(paths[1]), "plots": ", ".join(p.name for p in paths[2:]),
            **{f"{HEADLINE} ({s})": summary[s] or "empty slice" for s in SLICES}}


def served_note(user_tower: str) -> str:
    """Which row of the report is the list `/v1/recommendations` returns."""
    if user_tower == "history":
        return ("served ranking: `llmrec` is the list /v1/recommendations returns (llmrec.ranking: the user's recent "
                "plays' mean embedding, catalogue mean removed); `llmrec-cf`, `hybrid` and `hybrid-tail` need ALS "
                "user factors and are not served")
    return ("served ranking: `llmrec-history` is the list /v1/recommendations returns; the headline `llmrec` "
            "(eval.user_tower=cf) needs ALS user factors and is not served")


def tuning_holdout_notes(run: RunDir, cfg: Config) -> list[str]:
    """A note when llmrec's training examples may include the validation plays its knobs are tuned on (examples
    built with `examples.hold_out_tuning_plays: false`, with another seed, or by a version that did not record
    it): llmrec's validation figures, and so the knobs of llmrec, hybrid and hybrid-tail, are then optimistic."""
    meta_path = run.examples / "meta.json"
    held = json.loads(meta_path.read_text()).get("tuning_holdout", {}) if meta_path.is_file() else {}
    if held.get("held_out") and held.get("seed") == cfg.seed:
        return []
    why = ("its examples were built with examples.hold_out_tuning_plays=false" if held.get("held_out") is False
           else f"its examples were built with seed {held['seed']}, not {cfg.seed}" if "seed" in held
           else f"{meta_path} does not record that the validation plays were held out (rerun `llmrec prepare`)")
    return [f"tuning: llmrec may have been trained on the validation plays its knobs are tuned on ({why}); the "
            "tuned settings of llmrec, hybrid and hybrid-tail may be optimistic"]


def dataset_notes(catalog: Catalog, cfg: Config, split: Split) -> list[str]:
    notes = []
    if catalog.meta.get("item_kind") == "artist":
        notes.append("Items are ARTISTS, not songs (lastfm-2k): 'songs' in this report are artists, and every "
                     "content model sees text only (artist name + user tags; no audio, cover or lyrics).")
    notes.append("Cold slice: CF models know nothing about songs without plays (MostPop, ItemKNN, ALS and BPR "
                 "give them all the same score: implicit leaves their factors at zero), and ties are broken in a "
                 "fixed random order, so their cold numbers are chance level; compare the content models (text, "
                 "text2cf, llmrec) there.")
    if split.kind != cfg.eval.split:
        notes.append(f"eval.split={cfg.eval.split!r} was requested; the catalog has no usable time axis, so the "
                     f"{split.kind!r} split was used (llmrec.split.split_catalog)")
    return notes


def split_summary(split: Split, data: EvalData, cfg: Config) -> dict[str, Any]:
    out = split.summary()
    out["requested"] = cfg.eval.split
    out["repeat_test_pairs_dropped"] = data.repeats_dropped  # test pairs already in train: masked, unreachable
    out["slices"] = {}
    for name in SLICES:
        test, cand = slice_test(data, name)
        out["slices"][name] = {
            "test_pairs": int(test.nnz),
            "test_users": int((np.diff(test.indptr) > 0).sum()),
            "users_skipped": int((np.diff(test.indptr) == 0).sum()),  # no test play in this slice
            "candidates": int(len(data.song_ids) if cand is None else cand.sum()),
            "empty": bool(test.nnz == 0),
        }
    return out


# ------------------------------------------------------------------------------------------------ writing

LOWER_IS_BETTER = ("gini@",)
BEYOND_ACCURACY = ("coverage@", "gini@", "tail_share@")
NO_BEST = ("new_share@",)  # how many new songs a ranking shows is a trade-off (see the warm slice), not a score


def table_columns(ks: list[int], slice_name: str) -> list[str]:
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["hr@20", "mrr", "coverage@20", "gini@20"]
    if slice_name == "cold":
        return cols
    return cols + ["tail_share@20"] + (["new_share@20"] if slice_name in ("all", "warm") else [])


def _best_per_column(rows: dict[str, dict], cols: list[str]) -> dict[str, float]:
    best = {}
    for c in cols:
        if c.startswith(NO_BEST):
            continue
        # Random trivially "wins" coverage/gini/tail share; bold the best real model there.
        vals = [r[c] for m, r in rows.items() if c in r and np.isfinite(r[c])
                and not (m == "random" and c.startswith(BEYOND_ACCURACY))]
        if vals:
            best[c] = min(vals) if c.startswith(LOWER_IS_BETTER) else max(vals)
    return best


def markdown_table(rows: dict[str, dict], cols: list[str]) -> list[str]:
    best = _best_per_column(rows, cols)
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for model, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            text = "–" if v is None or not np.isfinite(v) else f"{v:.4f}"
            cells.append(f"**{text}**" if v is not None and c in best and v == best[c] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _ci(c: dict) -> str:
    return f"{c['mean']:.4f} [{c['lo']:.4f}, {c['hi']:.4f}]"


def render_markdown(report: dict, plots: list[Path]) -> str:
    sp_ = report["split"]
    out = [f"# Offline evaluation: {report['dataset']}", ""]
    out += [f"- {n}" for n in report["notes"]]
    out += ["", f"Split: `{sp_['kind']}` (split time {sp_['split_time']}); train {sp_['train']} / valid "
                f"{sp_['valid']} / test {sp_['test']} interactions; {sp_['warm_songs']} warm and {sp_['cold_songs']} "
                f"cold {report['item_kind']}s; {sp_['repeat_test_pairs_dropped']} test pairs already in train dropped.",
            "Full-catalogue ranking, seen items masked; `warm-known` ranks the warm test plays among known songs "
            "only, and the cold slice ranks among the split's new items only. "
            f"Text features: {report['text_features']}.", ""]
    for name in SLICES:
        info = sp_["slices"][name]
        out.append(f"## {name} — {info['test_users']} users, {info['test_pairs']} test pairs, "
                   f"{info['candidates']} candidates ({info['users_skipped']} users without a test play skipped)")
        out.append("")
        if info["empty"]:
            out += ["Empty slice: no test plays here, so no model is scored (not a zero).", ""]
            continue
        out += markdown_table(report["results"][name], table_columns(report["ks"], name)) + [""]
    out += ["Bold: best per column (lowest for gini; random is left out of coverage/gini/tail share). "
            "tail_share@20: share of the top-20 slots holding known songs outside the top 20% of known songs by "
            "training plays (new songs are never tail; they are counted by new_share@20). "
            "new_share@20: share holding new songs (no training plays), not bolded: on `warm` every such slot is "
            "one a known song could have hit, on `all` it is what lets new songs be found.", ""]
    tail = report["hyperparameters"].get("hybrid-tail")
    if tail:
        out += [f"`hybrid` is tuned for recall on validation. `hybrid-tail` is the same blend tuned for long-tail "
                f"exposure: the most tail songs in the validation top 20 while NDCG@20 stays within "
                f"{tail['ndcg_budget']:.0%} of ALS's (popularity penalty {tail['pop_penalty']}, cold offset "
                f"{tail['cold_offset']}). Within the budget means one standard error on the safe side (the paired NDCG "
                "change vs ALS over validation users, minus its standard error, stays above the budget); the test "
                "figures above say whether it held out of sample.", ""]
    out += ["## Headline: recall@20 with 95% bootstrap CIs (users resampled)", ""]
    for name, h in report["headline"].items():
        if h.get("empty"):
            out.append(f"- {name}: empty slice")
            continue
        models = ", ".join(f"{m} {_ci(c)}" for m, c in h["models"].items())
        diffs = ", ".join(f"{d} {_ci(c)}" for d, c in h["differences"].items())
        out.append(f"- {name}: best CF = {h['best_cf']}; {models}" + (f"; differences: {diffs}" if diffs else ""))
    out += reasons_markdown(report.get("reasons") or {})
    if report.get("ablation", {}).get("accuracy"):
        out += [""] + ablation_markdown(report["ablation"])
    out += ["", "## Hyperparameters", "", f"Chosen by {report['tuning']['how']}:", ""]
    out += [f"- {m}: {json.dumps(p)}" for m, p in report["hyperparameters"].items()]
    out += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


REASON_COLUMNS = ("faithfulness", "hallucination_rate", "claims_per_reason", "no_claim_share", "titles_from_history",
                  "unique_share", "distinct_2", "mean_words", "degenerate_share")
N_MD_SAMPLES = 5


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def reasons_markdown(r: dict) -> list[str]:
    """The reason-quality section: the reasons the endpoint returns, the model's greedy answers before the claim
    check, the plain evidence sentences, by kind of claim, and a few samples."""
    out = ["", "## Reasons", ""]
    if r.get("skipped"):
        out.append(f"Not generated: {r['skipped']}.")
    rows = [(f"llmrec as served ({r['n']} held-out plays)", r)] if r.get("n") else []
    if (r.get("model_greedy") or {}).get("n"):
        rows.append(("model's greedy answer, before the check", r["model_greedy"]))
    if (r.get("evidence_sentence") or {}).get("n"):
        rows.append(("plain evidence sentence (the fallback)", r["evidence_sentence"]))
    if rows:
        out += ["", "| reasons | " + " | ".join(REASON_COLUMNS) + " |", "|---" * (len(REASON_COLUMNS) + 1) + "|"]
        out += [f"| {name} | " + " | ".join(_num(m.get(c)) for c in REASON_COLUMNS) + " |" for name, m in rows]
        out += ["", f"Claims (co-listening percentages, artists, albums, genres, tags, keywords, perceived attributes, "
                    f"quoted titles) checked against {r.get('ground_truth', 'the catalog')}; faithfulness = true "
                    f"claims / claims, hallucination rate = reasons with a false claim / reasons, no_claim_share = "
                    f"reasons with nothing checkable beyond a history title."]
    if r.get("sources"):
        src = r["sources"]
        out.append(f"Served: {_num(r.get('verified_share'))} verified; from the model {_num(src.get('model'))}, "
                   f"the evidence sentence {_num(src.get('evidence'))}, generic {_num(src.get('generic'))} "
                   f"({r.get('samples_per_reason')} answers checked per reason).")
    perceived = r.get("perceived") or {}
    if perceived.get("n"):
        out.append(f"Perceived attributes listed as evidence (perception heads on the encoder features, calibrated "
                   f"confidence >= threshold): {perceived['n']}, true {_num(perceived['accuracy'])} ("
                   + ", ".join(f"{a} {_num(v)}" for a, v in perceived["by_attribute"].items()) + ").")
    dep = r.get("prompt_dependence") or {}
    if dep.get("prompt_gain") is not None:
        out += ["", f"Does the model read its prompt? Answer loss of the evidence sentences after their own prompt "
                    f"{dep['answer_loss']:.3f}, after another play's prompt {dep['answer_loss_other_prompt']:.3f} "
                    f"(gain {dep['prompt_gain']:.3f}; near 0 = the prompt is ignored)."]
    if r.get("by_kind"):
        greedy = (r.get("model_greedy") or {}).get("by_kind", {})
        out += ["", "By kind of claim:", "", "| claim | n served | faithfulness served | n greedy | faithfulness "
                "greedy |", "|---|---:|---:|---:|---:|"]
        for kind in sorted(set(r["by_kind"]) | set(greedy)):
            m, g = r["by_kind"].get(kind, {}), greedy.get(kind, {})
            out.append(f"| {kind} | {m.get('n', 0)} | {_num(m.get('faithfulness'))} | {g.get('n', 0)} | "
                       f"{_num(g.get('faithfulness'))} |")
    if r.get("n"):
        out.append(f"Generation: {_num(r.get('latency_ms_per_reason'))} ms per returned reason (batches of "
                   f"{r.get('batch_size')}, max {r.get('max_new_tokens')} new tokens).")
        out += ["", "Samples (✓ true claim, ✗ false claim):", ""]
        for s in r.get("samples", [])[:N_MD_SAMPLES]:
            claims = ", ".join(f"{'✓' if c['true'] else '✗'} {c['kind']}={c['value']}" for c in s["claims"]) or "none"
            text = " ".join(s["reason"].split()).replace("|", "/")  # one line, no table breaks
            out.append(f"- {s['user']} → {s['song']} ({s.get('reason_source')}): “{text}” — claims: {claims}")
    return out


def _savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_recall_curves(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SLICES), figsize=(5 * len(SLICES), 4), squeeze=False)
    for ax, name in zip(axes[0], SLICES):
        ax.set_title(f"{name} slice")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        rows = report["results"][name]
        if report["split"]["slices"][name]["empty"]:
            ax.text(0.5, 0.5, "empty slice", ha="center", va="center", transform=ax.transAxes)
            continue
        for model, r in rows.items():
            ax.plot(report["ks"], [r[f"recall@{k}"] for k in report["ks"]], marker="o", label=model)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['dataset']}: recall@K", y=1.03)  # above the per-slice titles
    path = _savefig(fig, path)
    plt.close(fig)
    return path


def plot_popularity_recall(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = report["results"]["all"]
    fig, ax = plt.subplots(figsize=(8, 4))
    models = [m for m, r in rows.items() if not r.get("empty")]
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        vals = [rows[model].get(f"recall@20_pop{b}", np.nan) for b in range(N_POP_BUCKETS)]
        ax.bar(np.arange(N_POP_BUCKETS) + i * width, np.nan_to_num(vals), width, label=model)
    ax.set_xticks(np.arange(N_POP_BUCKETS) + 0.4 - width / 2)
    ax.set_xticklabels([f"bucket {b}" + (" (least)" if b == 0 else " (most)" if b == N_POP_BUCKETS - 1 else "")
                        for b in range(N_POP_BUCKETS)])
    ax.set_ylabel("recall@20 (micro)")
    ax.set_title("recall@20 by training popularity of the relevant item (all slice)")
    ax.legend(fontsize=7, ncol=2)
    path = _savefig(fig, path)
    plt.close(fig)
    return path


def plot_cold_start(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if report["split"]["slices"]["cold"]["empty"]:
        ax.text(0.5, 0.5, "cold slice empty: no test plays of cold items", ha="center", va="center",
                transform=ax.transAxes)
    else:
        rows = report["results"]["cold"]
        ax.bar(list(rows), [r["recall@20"] for r in rows.values()], color="tab:blue", label="recall@20")
        ax.bar(list(rows), [r["ndcg@20"] for r in rows.values()], color="tab:orange", width=0.4, label="ndcg@20")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    ax.set_title("cold-start: ranking among cold items only")
    path = _savefig(fig, path)
    plt.close(fig)
    return path


def write_report(directory: Path, report: dict) -> list[Path]:
    """report.json, report.md and the PNG plots, each written atomically. Returns [json, md, *pngs]."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    directory.mkdir(parents=True, exist_ok=True)
    plots = [plot_recall_curves(report, directory / "recall_at_k.png"),
             plot_popularity_recall(report, directory / "recall_by_popularity.png"),
             plot_cold_start(report, directory / "cold_start.png")]
    if report.get("ablation", {}).get("accuracy"):
        plot_ablation(report["ablation"], directory / "ablation.png", _savefig)
        plots.append(directory / "ablation.png")
    atomic_write_json(directory / "report.json", _jsonable(report))
    atomic_write_text(directory / "report.md", render_markdown(report, plots))
    return [directory / "report.json", directory / "report.md", *plots]


def _jsonable(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
