"""Splits of the interaction log (llmrec.split), shared by data_prep and eval."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from llmrec.schema import load_song_attributes, split_time
from llmrec.split import Split, item_holdout_split, leave_last_out, split_catalog, temporal_split, tuning_split


def log(rows):
    return pd.DataFrame(rows, columns=["user_id", "song_id", "timestamp"]).assign(
        timestamp=lambda d: pd.to_datetime(d.timestamp, utc=True), play_count=1, event="play")


@pytest.fixture
def small_log():
    return log([
        ("u1", "a", "2026-01-01"), ("u1", "b", "2026-01-05"), ("u1", "c", "2026-01-09"), ("u1", "d", "2026-01-12"),
        ("u2", "a", "2026-01-02"), ("u2", "d", "2026-01-11"), ("u2", "b", "2026-01-10"),
        ("u3", "e", "2026-01-03"),
    ])


def keys(df):
    return sorted(zip(df.user_id, df.song_id, df.timestamp))


def test_temporal_split_at_a_given_time(small_log):
    sp = temporal_split(small_log, pd.Timestamp("2026-01-09", tz="UTC"))
    assert isinstance(sp, Split) and sp.kind == "temporal"
    assert (sp.train.timestamp < sp.split_time).all() and (sp.test.timestamp >= sp.split_time).all()
    assert keys(pd.concat([sp.train, sp.valid, sp.test])) == keys(small_log)  # a partition: nothing lost or doubled
    assert sp.valid.empty
    assert sp.cold_songs == {"c", "d"}  # first played at/after the split
    assert sp.warm_songs == {"a", "b", "e"}
    assert not sp.cold_songs & sp.warm_songs
    assert keys(sp.test) == keys(small_log[small_log.timestamp >= "2026-01-09"])
    # test users' earlier plays are in train
    assert {"u1", "u2"} <= set(sp.train.user_id) and {"u1", "u2"} <= set(sp.test.user_id)


def test_temporal_split_validation_window(small_log):
    sp = temporal_split(small_log, "2026-01-10", valid_days=2)  # naive time: taken as UTC
    assert sp.split_time == pd.Timestamp("2026-01-10", tz="UTC")
    assert keys(sp.valid) == [("u1", "c", pd.Timestamp("2026-01-09", tz="UTC"))]
    assert (sp.train.timestamp < pd.Timestamp("2026-01-08", tz="UTC")).all()
    assert "c" not in sp.warm_songs and "c" not in sp.cold_songs  # first played in the validation window
    assert sp.cold_songs == {"d"}
    assert sp.summary()["valid"] == 1 and sp.summary()["split_time"] == "2026-01-10 00:00:00+00:00"


def test_temporal_split_quantile_when_no_time_is_recorded():
    times = pd.date_range("2026-01-01", periods=100, freq="h", tz="UTC")
    df = log([(f"u{i % 7}", f"s{i % 13}", t) for i, t in enumerate(times)])
    sp = temporal_split(df, None, test_fraction=0.2)
    assert len(sp.test) == 20 and sp.split_time == times[80]
    with pytest.raises(ValueError, match="test_fraction"):
        temporal_split(df, None, test_fraction=1.5)


def test_leave_last_out(small_log):
    sp = leave_last_out(small_log)
    assert sp.kind == "leave_last_out" and sp.split_time is None and sp.cold_songs == frozenset()
    assert keys(sp.test) == [("u1", "d", pd.Timestamp("2026-01-12", tz="UTC")),
                             ("u2", "d", pd.Timestamp("2026-01-11", tz="UTC"))]  # by time, not log order
    assert keys(sp.valid) == [("u1", "c", pd.Timestamp("2026-01-09", tz="UTC")),
                              ("u2", "b", pd.Timestamp("2026-01-10", tz="UTC"))]
    assert set(sp.train.user_id) == {"u1", "u2", "u3"}  # a one-play user stays in train
    assert keys(pd.concat([sp.train, sp.valid, sp.test])) == keys(small_log)
    for user, g in pd.concat([sp.train, sp.valid]).groupby("user_id"):
        last = sp.test[sp.test.user_id == user]
        assert last.empty or (g.timestamp <= last.timestamp.iloc[0]).all()
    assert sp.warm_songs == set(sp.train.song_id)
    no_valid = leave_last_out(small_log, valid=False)
    assert no_valid.valid.empty and len(no_valid.train) == len(small_log) - 2


def test_split_catalog_uses_the_recorded_split_time(synthetic_catalog):
    sp = split_catalog(synthetic_catalog)
    assert sp.split_time == split_time(synthetic_catalog)
    truth = load_song_attributes(synthetic_catalog.root)
    new = set(truth.song_id[truth.is_new])
    played_new = new & set(synthetic_catalog.interactions.song_id)
    assert played_new and played_new <= sp.cold_songs  # new releases are the cold-start slice
    assert not sp.warm_songs & new
    assert 0.05 < len(sp.test) / len(synthetic_catalog.interactions) < 0.4
    assert split_catalog(synthetic_catalog, "leave_last_out").kind == "leave_last_out"


def test_errors_name_the_problem(small_log, synthetic_catalog):
    with pytest.raises(ValueError, match="missing column"):
        temporal_split(small_log.drop(columns=["timestamp"]), "2026-01-09")
    with pytest.raises(ValueError, match="not supported"):
        split_catalog(synthetic_catalog, "random")


def test_tuning_split_holds_out_songs_and_plays_of_the_training_part_only():
    """The validation data eval tunes on (and data_prep leaves out of the examples): an item hold-out of train +
    valid, positives only, never a test play; the same for the same seed."""
    times = pd.date_range("2026-01-01", periods=400, freq="h", tz="UTC")
    df = log([(f"u{i % 11}", f"s{(i * 7) % 29}", t) for i, t in enumerate(times)])
    df.loc[df.index % 10 == 3, "event"] = "skip"
    sp = temporal_split(df, times[300], valid_days=1)
    inner = tuning_split(sp, seed=0)
    plays = pd.concat([sp.train, sp.valid])
    plays = plays[plays.event != "skip"]
    assert keys(pd.concat([inner.train, inner.test])) == keys(plays)  # train + valid plays, split in two
    assert not set(keys(inner.test)) & set(keys(sp.test)) and (inner.test.event != "skip").all()
    assert len(inner.cold_songs) == round(0.1 * plays.groupby("song_id").user_id.nunique().ge(2).sum())
    assert not inner.cold_songs & set(inner.train.song_id)
    again = tuning_split(sp, seed=0)
    assert keys(again.test) == keys(inner.test) and again.cold_songs == inner.cold_songs
    assert tuning_split(sp, seed=1).cold_songs != inner.cold_songs


def toy_log(n_users=50, n_songs=40, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = {(f"u{u}", f"s{s}") for u in range(n_users) for s in rng.choice(n_songs, size=8, replace=False)}
    users, songs = zip(*sorted(rows))
    return pd.DataFrame({"user_id": users, "song_id": songs, "timestamp": pd.Timestamp("2011-01-01", tz="UTC")})


def test_item_holdout_holds_items_out_entirely_and_keeps_user_profiles():
    log = toy_log()
    s = item_holdout_split(log, cold_fraction=0.25, test_fraction=0.2, seed=3)
    assert s.kind == "item_holdout" and s.split_time is None and len(s.valid) == 0
    assert len(s.train) + len(s.test) == len(log)
    assert not set(s.train.song_id) & s.cold_songs  # cold songs have no train plays at all
    assert (s.test.song_id.isin(s.cold_songs)).sum() == log.song_id.isin(s.cold_songs).sum()
    assert len(s.cold_songs) == round(0.25 * log.song_id.nunique())
    # Every other song keeps at least one train play, so the cold set is exactly the held-out songs.
    assert s.warm_songs == set(log.song_id) - s.cold_songs
    warm_test = s.test[~s.test.song_id.isin(s.cold_songs)]
    assert 0.1 < len(warm_test) / (len(warm_test) + len(s.train)) < 0.3
    pairs = set(zip(s.train.user_id, s.train.song_id))
    assert not pairs & set(zip(s.test.user_id, s.test.song_id))
    # Deterministic for a seed, different for another.
    again = item_holdout_split(log, cold_fraction=0.25, test_fraction=0.2, seed=3)
    assert again.cold_songs == s.cold_songs and again.test.equals(s.test)
    assert item_holdout_split(log, cold_fraction=0.25, seed=4).cold_songs != s.cold_songs


def test_item_holdout_never_holds_out_single_listener_songs_or_empties_a_user():
    log = pd.concat([toy_log(), pd.DataFrame({"user_id": ["u0", "lonely"], "song_id": ["rare", "s1"],
                                              "timestamp": pd.Timestamp("2011-01-01", tz="UTC")})])
    s = item_holdout_split(log, cold_fraction=0.5, test_fraction=0.5, seed=0)
    assert "rare" not in s.cold_songs
    # "lonely" has one interaction: at most all but one goes to test, so it stays in train unless its song is cold.
    if "s1" not in s.cold_songs:
        assert "lonely" in set(s.train.user_id)


def test_split_catalog_uses_item_holdout_for_catalogs_without_a_time_axis(synthetic_catalog):
    cat = copy.copy(synthetic_catalog)
    cat.meta = {**synthetic_catalog.meta, "time_axis": False, "split_time": None}
    assert split_catalog(cat, "temporal").kind == "item_holdout"
    assert split_catalog(synthetic_catalog, "item_holdout").kind == "item_holdout"
    with pytest.raises(ValueError, match="item_holdout"):
        split_catalog(synthetic_catalog, "nope")
