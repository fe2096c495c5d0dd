"""Train/valid/test splits of the interaction log, shared by data_prep (training examples) and eval (metrics), so
that both see exactly the same boundary and no test-period interaction reaches training.

Three kinds:

- `temporal_split` (the default): one global split time. Train = interactions before it (minus the validation
  window), test = at/after it. Cold songs are songs whose first play is at/after the split time (no train plays);
  warm songs are songs with train plays. Test users' earlier plays are in train — that is the point of a temporal
  split (the model knows each user's past, never their future).
- `leave_last_out`: each user's last interaction is the test item, the one before it the validation item; the rest
  is train. There is no global time boundary, so no cold songs either; as in the temporal split, test users'
  earlier plays are in train (standard for this protocol).
- `item_holdout_split`: for logs without a usable time axis (catalog meta `time_axis: false`, e.g. lastfm-2k): a
  random share of songs is held out entirely (cold), plus a per-user share of the remaining pairs (warm test).

Rows keep every column of the input log (play, like, skip, ...); which events count as positives is the
consumer's choice (`positive_plays` is the rule data_prep and eval share).

`tuning_split` carves the hold-out that every tuned knob is chosen on out of the training part. data_prep builds the
llmrec training examples from its `train` part only, so the model never sees the plays its hyperparameters, blend
and cold offset are tuned on -- the same rule the test part follows, one level down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SPLIT_KINDS = ("temporal", "leave_last_out", "item_holdout")


@dataclass
class Split:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    split_time: pd.Timestamp | None  # temporal only: test = timestamp >= split_time
    cold_songs: frozenset[str]  # first play at/after the split time: no train plays (empty for leave_last_out)
    warm_songs: frozenset[str]  # songs with at least one train interaction
    kind: str

    def summary(self) -> dict[str, Any]:
        """Figures for reports and meta files (`eval/report.json` "split", `examples/meta.json`)."""
        return {
            "kind": self.kind,
            "split_time": str(self.split_time) if self.split_time is not None else None,
            "train": len(self.train),
            "valid": len(self.valid),
            "test": len(self.test),
            "train_users": int(self.train["user_id"].nunique()),
            "test_users": int(self.test["user_id"].nunique()),
            "warm_songs": len(self.warm_songs),
            "cold_songs": len(self.cold_songs),
        }


def _utc(ts: Any) -> pd.Timestamp:
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _check(interactions: pd.DataFrame) -> None:
    missing = [c for c in ("user_id", "song_id", "timestamp") if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions: missing column(s) {missing} needed to split; "
                         f"found {list(interactions.columns)}")


def temporal_split(interactions: pd.DataFrame, split_time: pd.Timestamp | str | None = None, valid_days: float = 0,
                   test_fraction: float = 0.15) -> Split:
    """Global temporal split at `split_time` (the catalog's recorded one, `llmrec.schema.split_time(catalog)`), or,
    when None, at the (1 - test_fraction) quantile of the timestamps. `valid_days` > 0 takes the last `valid_days`
    before the split as validation (out of train). Songs first played inside the validation window are neither
    warm nor cold."""
    _check(interactions)
    ts = pd.to_datetime(interactions["timestamp"], utc=True)
    if split_time is None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if len(ts) == 0:
            raise ValueError("cannot choose a split time for an empty interaction log")
        ordered = ts.sort_values(ignore_index=True)
        split_time = ordered.iloc[min(len(ordered) - 1, int(len(ordered) * (1 - test_fraction)))]
    split_time = _utc(split_time)
    valid_start = split_time - pd.Timedelta(days=valid_days)
    is_test = (ts >= split_time).to_numpy()
    is_valid = ((ts >= valid_start) & ~is_test).to_numpy()
    is_train = ~is_test & ~is_valid
    train, valid, test = (interactions[m].reset_index(drop=True) for m in (is_train, is_valid, is_test))
    first_play = ts.groupby(interactions["song_id"].to_numpy()).min()
    cold = frozenset(first_play.index[(first_play >= split_time).to_numpy()])
    return Split(train, valid, test, split_time, cold, frozenset(train["song_id"]), "temporal")


def leave_last_out(interactions: pd.DataFrame, valid: bool = True) -> Split:
    """Each user's last interaction (by time; ties by log order) -> test, the one before -> valid (if `valid`),
    the rest -> train. A user with one interaction keeps it in train; with two, one goes to test and one to
    train."""
    _check(interactions)
    order = pd.DataFrame({"user_id": interactions["user_id"].to_numpy(),
                          "ts": pd.to_datetime(interactions["timestamp"], utc=True).to_numpy(),
                          "pos": np.arange(len(interactions))})
    order = order.sort_values(["user_id", "ts", "pos"], kind="stable")
    rank_from_end = order.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()
    n_user = order.groupby("user_id", sort=False)["pos"].transform("size").to_numpy()
    role = np.zeros(len(order), dtype=np.int8)  # 0 train, 1 valid, 2 test
    role[(rank_from_end == 0) & (n_user >= 2)] = 2
    if valid:
        role[(rank_from_end == 1) & (n_user >= 3)] = 1
    by_row = np.empty(len(order), dtype=np.int8)
    by_row[order["pos"].to_numpy()] = role
    train, valid_df, test = (interactions[by_row == r].reset_index(drop=True) for r in (0, 1, 2))
    return Split(train, valid_df, test, None, frozenset(), frozenset(train["song_id"]), "leave_last_out")


def split_catalog(catalog, kind: str = "temporal", valid_days: float = 0, test_fraction: float = 0.15) -> Split:
    """The split every stage uses for a catalog: temporal at the catalog's recorded split time (synthetic catalogs
    record one), else at the time quantile; or leave-last-out; or item hold-out. `kind` and `valid_days` come from
    `cfg.eval`."""
    from llmrec.schema import split_time

    if kind == "temporal" and catalog.meta.get("time_axis") is False:
        # The catalog says its timestamps are placeholders (lastfm-2k): a temporal split would put most of the log
        # into test by accident. Decided here, not in eval, so that training examples and eval share the split.
        kind = "item_holdout"
    if kind == "item_holdout":
        return item_holdout_split(catalog.interactions)
    if kind == "temporal":
        return temporal_split(catalog.interactions, split_time(catalog), valid_days, test_fraction)
    if kind == "leave_last_out":
        return leave_last_out(catalog.interactions, valid=valid_days > 0)
    raise ValueError(f"eval.split {kind!r} is not supported; choose one of {list(SPLIT_KINDS)}")


def item_holdout_split(interactions: pd.DataFrame, cold_fraction: float = 0.1, test_fraction: float = 0.2,
                       seed: int = 0, min_item_users: int = 2) -> Split:
    """A split for logs without a usable time axis (lastfm-2k: play counts carry no timestamps).

    1. Cold items: a random `cold_fraction` of the songs with at least `min_item_users` distinct listeners is held
       out entirely — all their interactions go to test, none to train, like songs released after a split time.
       (Songs with a single listener are never held out: their cold-slice entry would be one pair, mostly noise.)
    2. Warm test: of every user's remaining interactions, a random `test_fraction` (rounded, and at most all but
       one, so every user keeps a training profile) goes to test; the rest is train. Where that draw would take
       every play of a song that is not held out (typically a one-listener song), one of them goes back to train:
       otherwise the long tail would leak into the cold set by accident.

    `valid` is empty (eval tunes on an inner split of train); `split_time` is None. `cold_songs` are exactly the
    held-out songs, `warm_songs` every other song in the log (each has train interactions). Deterministic for a
    seed.
    """
    _check(interactions)
    if not 0 <= cold_fraction < 1 or not 0 <= test_fraction < 1:
        raise ValueError(f"cold_fraction and test_fraction must be in [0, 1), got {cold_fraction}, {test_fraction}")
    rng = np.random.default_rng(seed)
    listeners = interactions.groupby("song_id")["user_id"].nunique()
    eligible = np.sort(listeners.index[listeners >= min_item_users].to_numpy().astype(str))
    cold = frozenset(rng.choice(eligible, size=int(round(cold_fraction * len(eligible))), replace=False).tolist())
    is_cold = interactions["song_id"].isin(cold).to_numpy()
    is_test = is_cold.copy()
    rest = np.flatnonzero(~is_cold)
    drawn = _per_user_draw(interactions["user_id"].to_numpy()[rest], test_fraction, rng)
    drawn = _keep_one_train_play(interactions["song_id"].to_numpy()[rest], drawn, rng)
    is_test[rest[drawn]] = True
    train, test = interactions[~is_test].reset_index(drop=True), interactions[is_test].reset_index(drop=True)
    return Split(train, interactions.iloc[:0].copy(), test, None, cold, frozenset(train["song_id"]), "item_holdout")


def _keep_one_train_play(songs: np.ndarray, drawn: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Un-draw one random row of every song whose rows were all drawn for test."""
    rows = pd.DataFrame({"song": songs, "drawn": drawn, "key": rng.random(len(songs)), "pos": np.arange(len(songs))})
    all_drawn = rows.groupby("song")["drawn"].transform("all").to_numpy()
    first = rows[all_drawn].sort_values(["song", "key"], kind="stable").drop_duplicates("song")["pos"].to_numpy()
    out = drawn.copy()
    out[first] = False
    return out


def _per_user_draw(users: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask: a random round(fraction * n) of each user's n rows (at most n - 1)."""
    order = pd.DataFrame({"user": users, "key": rng.random(len(users)), "pos": np.arange(len(users))})
    order = order.sort_values(["user", "key"], kind="stable")
    rank = order.groupby("user", sort=False).cumcount().to_numpy()
    n = order.groupby("user", sort=False)["pos"].transform("size").to_numpy()
    take = np.minimum(np.round(fraction * n), n - 1)
    mask = np.zeros(len(users), dtype=bool)
    mask[order["pos"].to_numpy()[rank < take]] = True
    return mask


def positive_plays(interactions: pd.DataFrame) -> pd.DataFrame:
    """Rows that count as plays: every row but `skip` events (log order kept)."""
    if "event" not in interactions.columns:
        return interactions
    return interactions[interactions["event"].fillna("play") != "skip"]


def tuning_split(split: Split, seed: int) -> Split:
    """The validation data of a split: an item hold-out of its training part (train + valid, positives only).

    10% of the songs are held out entirely (so the cold-start knobs can be tuned), plus 20% of each user's other
    plays. `eval.tuning.tune` chooses every hyperparameter on it, then the final models are fitted on the whole
    training part. `data_prep.examples` builds llmrec's training examples from its `train` part (unless
    `examples.hold_out_tuning_plays` is false), so llmrec, like the CF models being tuned, has not seen the
    validation plays. Deterministic for (split, seed): data_prep and eval get the same hold-out from the config's
    seed.
    """
    fit = positive_plays(pd.concat([split.train, split.valid], ignore_index=True))
    return item_holdout_split(fit, cold_fraction=0.1, test_fraction=0.2, seed=seed + 1)


def example_plays(split: Split, hold_out_tuning_plays: bool, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The plays llmrec's training examples are built from -- `data_prep` at prepare time, and `train` when it
    rebuilds stage-2 reasons with perceived evidence -- and what was held out of them for tuning (`tuning_holdout`
    in the examples' meta.json, which eval checks). Skips are still in; `positive_plays` drops them."""
    if not hold_out_tuning_plays:
        return split.train, {"held_out": False}
    inner = tuning_split(split, seed)
    return inner.train, {"held_out": True, "seed": seed, "plays": len(inner.test), "songs": len(inner.cold_songs)}
