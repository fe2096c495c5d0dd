"""The served ranking, defined once: `/v1/recommendations` (serve/app.py) and the report's `llmrec` with
`eval.user_tower: history` (eval/served.py `ServedRanking`) both call these functions, so the number the report
prints is the number of the list the endpoint returns.

A listener is the mean of the unit embeddings of their most recent distinct plays (at most `HISTORY_FOR_QUERY`,
unweighted by play count: one obsessively replayed track does not define the profile); songs are scored by cosine
after removing the catalogue's mean embedding from both sides. Learned embedding spaces are anisotropic (raw cosines
of a user's top songs all sat at 0.98), and removing the mean is the standard fix (Mu & Viswanath 2018,
"All-but-the-Top").
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

HISTORY_FOR_QUERY = 50  # most recent distinct plays averaged into a listener's query vector


def recent_histories(interactions: pd.DataFrame, users: Iterable[str] = ()) -> dict[str, list[str]]:
    """user id -> distinct song ids, most recent first (in row order where there is no timestamp column). Skips
    are not taste; `users` with no play get []."""
    inter = interactions
    if "event" in inter.columns:
        inter = inter[inter["event"].fillna("play") != "skip"]
    if "timestamp" in inter.columns:
        inter = inter.sort_values("timestamp", ascending=False, kind="stable")
    out: dict[str, list[str]] = {str(u): [] for u in users}
    for user, group in inter.groupby("user_id", sort=False):
        out[str(user)] = list(dict.fromkeys(group["song_id"].astype(str)))
    return out


def catalogue_center(vectors: np.ndarray) -> np.ndarray:
    """The catalogue's mean embedding over the songs that have one (all-zero rows are songs without), zeros for
    fewer than two: what the index removes before indexing and searching."""
    vectors = np.asarray(vectors, dtype=np.float32)
    present = np.abs(vectors).sum(1) > 0
    return vectors[present].mean(0) if present.sum() > 1 else np.zeros(vectors.shape[1], np.float32)


def centred_unit(vectors: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Rows with the catalogue mean removed, unit norm (what the faiss index holds and queries)."""
    v = np.asarray(vectors, dtype=np.float32) - center
    return np.ascontiguousarray(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))


def history_query(history_vectors: np.ndarray) -> np.ndarray:
    """[1, d] query of a listener from the embeddings of their history, most recent first: the unit mean of the
    first `HISTORY_FOR_QUERY` rows (before centring; `centred_unit` follows in the index)."""
    rows = np.asarray(history_vectors, dtype=np.float32)[:HISTORY_FOR_QUERY]
    if rows.size == 0:
        raise ValueError("an empty history has no query")
    query = rows.mean(0, keepdims=True)
    return query / max(float(np.linalg.norm(query)), 1e-12)
