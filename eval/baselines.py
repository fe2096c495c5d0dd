"""Collaborative-filtering and content baselines behind one small interface.

Every model follows :class:`Recommender`:

* ``fit(train, **side)`` with ``train`` a ``(n_users, n_items)`` CSR matrix of interactions
  (play counts or 1s), returns ``self``;
* ``score(user_idx, train)`` returns dense full-catalogue scores ``(len(user_idx), n_items)``,
  higher is better. ``train`` supplies the users' histories to history-based models (ItemKNN,
  ContentKNN); factor models use the user factors learned in ``fit`` and ignore it.
  Seen items are *not* masked here -- :func:`eval.metrics.topk_from_scores` does that.

Hyperparameters are constructor arguments with defaults, so grid search is just
``factory(name, **params).fit(train)``. Models built on ``implicit`` default to ``num_threads=1``:
the evaluation machines are small, and BPR's Hogwild SGD is only reproducible single-threaded.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "Recommender",
    "RandomRec",
    "MostPop",
    "ItemKNN",
    "ALS",
    "BPR",
    "ContentKNN",
    "RidgeContentToCF",
    "factory",
    "FACTORY_NAMES",
]


def _as_csr(train: sp.spmatrix) -> sp.csr_matrix:
    if not sp.issparse(train):
        raise TypeError(f"train must be a scipy sparse matrix, got {type(train).__name__}")
    # Always copy: models binarise / reweight in place and must never touch the caller's matrix.
    m = sp.csr_matrix(train, dtype=np.float32, copy=True)
    m.eliminate_zeros()
    m.sort_indices()
    return m


def _user_idx(user_idx) -> np.ndarray:
    return np.asarray(user_idx, dtype=np.int64).ravel()


def _l2_normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # Zero vectors stay zero (score 0) instead of becoming NaN.
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


class Recommender(abc.ABC):
    """Common interface; see module docstring."""

    n_items: int | None = None

    @abc.abstractmethod
    def fit(self, train: sp.csr_matrix, **side: Any) -> "Recommender":
        """Learn from a ``(n_users, n_items)`` interaction matrix; return ``self``."""

    @abc.abstractmethod
    def score(self, user_idx: np.ndarray, train: sp.csr_matrix) -> np.ndarray:
        """Dense ``(len(user_idx), n_items)`` scores, higher is better."""

    def _check_fitted(self) -> None:
        if self.n_items is None:
            raise RuntimeError(f"{type(self).__name__} must be fit() before score()")

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_") and np.isscalar(v)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


# --------------------------------------------------------------------------------------------
# Non-personalised
# --------------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser: a cheap, well-mixed hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


class RandomRec(Recommender):
    """Uniform random scores.

    Scores are a hash of ``(seed, user, item)`` rather than draws from a stateful RNG, so a user's
    scores do not depend on which batch they were scored in or how often ``score`` was called.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def fit(self, train, **side):
        self.n_items = _as_csr(train).shape[1]
        return self

    def score(self, user_idx, train):
        self._check_fitted()
        u = _user_idx(user_idx).astype(np.uint64)
        items = np.arange(self.n_items, dtype=np.uint64)
        hu = _splitmix64(_splitmix64(np.uint64(self.seed) ^ _GOLDEN) ^ u)
        h = _splitmix64(hu[:, None] ^ (items[None, :] * _M1))
        return (h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


class MostPop(Recommender):
    """Training popularity; ``by="users"`` counts listeners, ``by="plays"`` sums play counts."""

    def __init__(self, by: str = "users"):
        if by not in ("users", "plays"):
            raise ValueError(f"by must be 'users' or 'plays', got {by!r}")
        self.by = by

    def fit(self, train, **side):
        x = _as_csr(train)
        self.n_items = x.shape[1]
        if self.by == "users":
            self.popularity = np.bincount(x.indices, minlength=self.n_items).astype(np.float32)
        else:
            self.popularity = np.asarray(x.sum(axis=0), dtype=np.float32).ravel()
        return self

    def score(self, user_idx, train):
        self._check_fitted()
        u = _user_idx(user_idx)
        return np.broadcast_to(self.popularity, (u.size, self.n_items)).copy()


# --------------------------------------------------------------------------------------------
# Item-based neighbourhood
# --------------------------------------------------------------------------------------------


class ItemKNN(Recommender):
    """Item-based k-NN with (shrunk) cosine similarity.

    ``sim(i, j) = <x_i, x_j> / (||x_i|| ||x_j|| + shrink)`` over item columns; each item keeps its
    ``k`` most similar *other* items. ``score(u, j) = sum_i x_ui * sim(j, i)`` over ``j``'s
    neighbours ``i``, i.e. the classic "neighbourhood of the target item" formulation.

    Implemented with scipy rather than ``implicit.nearest_neighbours.CosineRecommender`` because
    implicit has no shrinkage term (and shrinkage must act *before* neighbour pruning to demote
    low-support pairs), and its ``recommend()`` returns top-N lists rather than full scores.
    With ``shrink=0`` the similarity matches implicit's (minus its self-similarity); the tests
    check that.
    """

    def __init__(self, k: int = 100, shrink: float = 0.0, binary: bool = True):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {shrink}")
        self.k = int(k)
        self.shrink = float(shrink)
        self.binary = bool(binary)

    def _prep(self, x: sp.csr_matrix) -> sp.csr_matrix:
        x = _as_csr(x)
        if self.binary:
            x.data[:] = 1.0
        return x

    def neighbour_lists(self, train) -> tuple[np.ndarray, np.ndarray]:
        """Each item's ``k`` most similar other items, best first (ties: lower item index first), and their
        similarities, as ``(n_items, k)`` arrays; slots without a positive similarity hold -1 and 0.

        One pass over the item x item co-occurrences, which is what fitting costs. A list for a larger ``k`` starts
        with the list for any smaller one, so a grid over ``k`` pays for one pass per ``shrink``:
        ``fit(train, neighbours=...)`` takes the lists of a larger ``k`` and cuts them."""
        x = self._prep(train)
        n_items = x.shape[1]
        xt = x.T.tocsr()  # items x users
        norms = np.sqrt(np.asarray(xt.multiply(xt).sum(axis=1), dtype=np.float64).ravel())
        k = min(self.k, max(n_items - 1, 0))
        nb = np.full((n_items, k), -1, dtype=np.int32)
        nv = np.zeros((n_items, k), dtype=np.float32)
        # Blocks of item rows keep the co-occurrence block bounded for large catalogues. The similarity is worked
        # on sparse (only co-occurring pairs can have one), so a block costs its non-zeros, not n_items cells.
        block = max(1, (1 << 22) // max(n_items, 1))
        for start in range(0, n_items, block):
            co = (xt[start:start + block] @ x).tocoo()
            row, col = co.row.astype(np.int64), co.col.astype(np.int64)
            sim = co.data.astype(np.float64) / (norms[start + row] * norms[col] + self.shrink)
            keep = (col != start + row) & (sim > 0)  # no self-neighbours; zero similarity carries no signal
            row, col, sim = row[keep], col[keep], sim[keep]
            order = np.lexsort((col, -sim, row))  # by item, best first, ties: lower neighbour index first
            row, col, sim = row[order], col[order], sim[order]
            rank = np.arange(row.size) - np.searchsorted(row, row)  # position in the item's list
            top = rank < k
            nb[start + row[top], rank[top]] = col[top]
            nv[start + row[top], rank[top]] = sim[top]
        return nb, nv

    def fit(self, train, neighbours: tuple[np.ndarray, np.ndarray] | None = None, **side):
        """`neighbours`: `neighbour_lists` of an ItemKNN with the same shrink and a k at least this one's, computed
        on this `train` (tuning's grid over k reuses one similarity pass); computed here when omitted."""
        nb, nv = neighbours if neighbours is not None else self.neighbour_lists(train)
        n_items = train.shape[1]  # the width only: no binarised copy of the plays
        k = min(self.k, max(n_items - 1, 0))
        if nb.shape[0] != n_items or nb.shape[1] < k:
            raise ValueError(f"ItemKNN(k={self.k}).fit: neighbour lists of shape {nb.shape} do not cover "
                             f"{n_items} items x {k} neighbours")
        nb, nv = nb[:, :k], nv[:, :k]
        keep = nb >= 0
        rows = np.broadcast_to(np.arange(n_items)[:, None], nb.shape)
        self.n_items = n_items
        # similarity[j, i] = sim of target item j to its neighbour i.
        self.similarity = sp.csr_matrix((nv[keep], (rows[keep], nb[keep])), shape=(n_items, n_items))
        self._sim_t = self.similarity.T.tocsr()
        return self

    def score(self, user_idx, train):
        self._check_fitted()
        hist = self._prep(train)[_user_idx(user_idx)]
        return np.asarray((hist @ self._sim_t).toarray(), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Matrix factorisation via implicit (CPU)
# --------------------------------------------------------------------------------------------


def _blas_single_thread():
    """implicit's CPU solvers run their own threads; a multi-threaded BLAS underneath them
    oversubscribes the cores (implicit warns about it). Limit BLAS only while fitting."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, "blas")


class _ImplicitFactorModel(Recommender):
    """A matrix-factorisation model that ``implicit`` fits: this class holds the arguments the two models share,
    builds the implicit estimator from them (single-threaded BLAS, no progress bar) and scores with its factors.
    A subclass names the estimator (``_estimator``), the constructor arguments of its own (``_own_params``,
    attributes of the same name) and may transform the matrix first (``_prepare``)."""

    _model: Any = None
    _own_params: tuple[str, ...] = ()

    def __init__(self, factors: int, regularization: float, iterations: int, random_state: int,
                 num_threads: int):
        self.factors = int(factors)
        self.regularization = float(regularization)
        self.iterations = int(iterations)
        self.random_state = random_state
        self.num_threads = int(num_threads)

    @staticmethod
    @abc.abstractmethod
    def _estimator() -> type:
        """The implicit class (imported lazily: implicit is only needed once a factor model is fitted)."""

    def _prepare(self, x: sp.csr_matrix) -> sp.csr_matrix:
        return x

    def fit(self, train, **side):
        estimator = self._estimator()
        x = self._prepare(_as_csr(train))
        names = ("factors", "regularization", "iterations", "random_state", "num_threads", *self._own_params)
        with _blas_single_thread():
            self._model = estimator(**{name: getattr(self, name) for name in names})
            self._model.fit(x, show_progress=False)
        self.n_items = x.shape[1]
        return self

    @property
    def user_factors(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._model.user_factors)

    @property
    def item_factors(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._model.item_factors)

    def score(self, user_idx, train):
        # train is unused: user factors come from fit(); users must be rows of the fitted matrix.
        u = _user_idx(user_idx)
        return np.asarray(self.user_factors[u] @ self.item_factors.T, dtype=np.float32)


class ALS(_ImplicitFactorModel):
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008) via ``implicit.cpu.als``.

    ``weighting="none"``: confidence = ``alpha * value`` (implicit 0.7 semantics: C_ui = alpha*r_ui
    for observed pairs, 1 for unobserved). ``weighting="bm25"``: values are BM25-weighted per item
    first (``bm25_K1``, ``bm25_B``), which damps heavy listeners and popular tracks; ``alpha`` still
    scales the result.
    """

    _own_params = ("alpha",)

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        iterations: int = 15,
        alpha: float = 10.0,
        weighting: str = "none",
        bm25_K1: float = 100.0,
        bm25_B: float = 0.8,
        random_state: int = 0,
        num_threads: int = 1,
    ):
        if weighting not in ("none", "bm25"):
            raise ValueError(f"weighting must be 'none' or 'bm25', got {weighting!r}")
        super().__init__(factors, regularization, iterations, random_state, num_threads)
        self.alpha = float(alpha)
        self.weighting = weighting
        self.bm25_K1 = float(bm25_K1)
        self.bm25_B = float(bm25_B)

    @staticmethod
    def _estimator() -> type:
        from implicit.cpu.als import AlternatingLeastSquares

        return AlternatingLeastSquares

    def _prepare(self, x: sp.csr_matrix) -> sp.csr_matrix:
        if self.weighting == "bm25":
            from implicit.nearest_neighbours import bm25_weight

            # bm25_weight weights the *rows* as documents: pass items x users, as implicit's docs do.
            x = bm25_weight(x.T, K1=self.bm25_K1, B=self.bm25_B).T.tocsr().astype(np.float32)
        return x


class BPR(_ImplicitFactorModel):
    """Bayesian Personalised Ranking via ``implicit.cpu.bpr``.

    Only which items were played matters (positives), not counts. implicit appends a bias column,
    so ``item_factors`` has ``factors + 1`` columns and ``user_factors``' last column is 1.
    Reproducible only with ``num_threads=1`` (multi-threaded SGD is Hogwild).
    """

    _own_params = ("learning_rate", "verify_negative_samples")

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.05,
        regularization: float = 0.01,
        iterations: int = 100,
        random_state: int = 0,
        num_threads: int = 1,
        verify_negative_samples: bool = True,
    ):
        super().__init__(factors, regularization, iterations, random_state, num_threads)
        self.learning_rate = float(learning_rate)
        self.verify_negative_samples = bool(verify_negative_samples)

    @staticmethod
    def _estimator() -> type:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking


# --------------------------------------------------------------------------------------------
# Content-based (work for items with no plays)
# --------------------------------------------------------------------------------------------


def _content_vectors(item_vectors: np.ndarray) -> np.ndarray:
    """Item content vectors as a float64 ``(n_items, dim)`` matrix."""
    v = np.asarray(item_vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"item_vectors must be 2-D (n_items, dim), got shape {v.shape}")
    return v


def _check_items(x: sp.csr_matrix, vectors: np.ndarray) -> None:
    """The interaction matrix's items are the rows of the content vectors."""
    if x.shape[1] != vectors.shape[0]:
        raise ValueError(f"train has {x.shape[1]} items but item_vectors has {vectors.shape[0]} rows")


class ContentKNN(Recommender):
    """Cosine between a user profile and item content vectors.

    Profile = mean of the L2-normalised vectors of the user's training items (unweighted by play
    count, so one obsessively replayed track does not define the profile). Items without plays
    score normally, which is the point: the text-only content baseline feeds sentence embeddings
    here. Users with no history, and all-zero item vectors, score 0.

    ``center=True`` subtracts the catalogue's mean vector first. Learned embedding spaces are
    anisotropic (every vector shares a large common direction, so all cosines sit near 1 and the
    ranking is decided by a small residual); removing the mean is the standard fix (Mu & Viswanath
    2018, "All-but-the-Top"; Su et al. 2021, BERT-whitening). All-zero rows (items without a
    vector) stay zero.
    """

    def __init__(self, item_vectors: np.ndarray, center: bool = False):
        v = _content_vectors(item_vectors)
        self.item_vectors = v
        if center:
            present = np.abs(v).sum(axis=1) > 0
            if present.any():
                v = np.where(present[:, None], v - v[present].mean(axis=0), 0.0)
        self.center = bool(center)
        self._unit = _l2_normalise_rows(v)

    def fit(self, train, **side):
        x = _as_csr(train)
        _check_items(x, self._unit)
        self.n_items = x.shape[1]
        return self

    def score(self, user_idx, train):
        self._check_fitted()
        hist = _as_csr(train)[_user_idx(user_idx)]
        hist.data[:] = 1.0
        counts = np.asarray(hist.sum(axis=1), dtype=np.float64)
        profile = np.asarray(hist @ self._unit) / np.maximum(counts, 1.0)
        # Normalising the profile turns the dot product into a cosine.
        return np.asarray(_l2_normalise_rows(profile) @ self._unit.T, dtype=np.float32)


class RidgeContentToCF(Recommender):
    """Map content vectors to CF item factors with ridge regression (cold-start bridge).

    Fits ``cf_model`` (anything exposing ``user_factors``/``item_factors``, e.g. :class:`ALS`)
    on ``train`` unless ``fit_cf=False`` (already fitted), then fits ``sklearn.linear_model.Ridge``
    on warm items (``>= min_plays`` listeners) from ``item_vectors`` to their factors. Cold items
    get predicted factors; warm items keep their learned ones unless ``replace_warm``.
    ``score = user_factors[u] @ item_factors.T``.
    """

    def __init__(
        self,
        item_vectors: np.ndarray,
        cf_model: Recommender | None = None,
        alpha: float = 1.0,
        min_plays: int = 1,
        fit_cf: bool = True,
        replace_warm: bool = False,
    ):
        v = _content_vectors(item_vectors)
        self.item_vectors = v
        self.cf_model = ALS() if cf_model is None else cf_model
        self.alpha = float(alpha)
        self.min_plays = int(min_plays)
        self.fit_cf = bool(fit_cf)
        self.replace_warm = bool(replace_warm)

    def fit(self, train, **side):
        from sklearn.linear_model import Ridge

        x = _as_csr(train)
        _check_items(x, self.item_vectors)
        if self.fit_cf:
            self.cf_model.fit(x)
        factors = np.asarray(self.cf_model.item_factors, dtype=np.float64)
        self.warm = np.bincount(x.indices, minlength=x.shape[1]) >= self.min_plays
        if self.warm.sum() < 2:
            raise ValueError("RidgeContentToCF needs at least 2 warm items to fit the mapping")
        self.regressor = Ridge(alpha=self.alpha).fit(self.item_vectors[self.warm], factors[self.warm])
        target = np.ones_like(self.warm) if self.replace_warm else ~self.warm
        mapped = factors.copy()
        if target.any():
            mapped[target] = self.regressor.predict(self.item_vectors[target])
        self._item_factors = mapped
        self.n_items = x.shape[1]
        return self

    @property
    def item_factors(self) -> np.ndarray:
        self._check_fitted()
        return self._item_factors

    @property
    def user_factors(self) -> np.ndarray:
        return np.asarray(self.cf_model.user_factors)

    def score(self, user_idx, train):
        self._check_fitted()
        u = _user_idx(user_idx)
        return np.asarray(self.user_factors[u] @ self._item_factors.T, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Recommender]] = {
    "random": RandomRec,
    "mostpop": MostPop,
    "itemknn": ItemKNN,
    "als": ALS,
    "bpr": BPR,
}
FACTORY_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def factory(name: str, **kw: Any) -> Recommender:
    """Build a CF baseline by name (case-insensitive) with constructor kwargs.

    Content models (:class:`ContentKNN`, :class:`RidgeContentToCF`) need item vectors and are
    constructed directly.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown recommender {name!r}; valid names: {', '.join(FACTORY_NAMES)}")
    return _REGISTRY[key](**kw)
