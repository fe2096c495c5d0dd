"""The synthetic catalog's promises, measured on its output."""
from __future__ import annotations

import colorsys
import hashlib

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from data_prep.synthetic import GENRE_WORDS, INSTRUMENTS, MOODS, generate_catalog
from llmrec.schema import load_catalog, load_song_attributes


def gini(x: np.ndarray) -> float:
    x = np.sort(np.asarray(x, dtype=float))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def estimate_tempo(wave: np.ndarray, sr: int) -> float:
    """Tempo from the onset envelope's autocorrelation (hop 10 ms), searched over 60-180 bpm."""
    hop = sr // 100
    frames = wave[: len(wave) // hop * hop].reshape(-1, hop)
    energy = np.log(1e-6 + (frames**2).mean(1))
    onset = np.maximum(0, np.diff(energy))
    onset -= onset.mean()
    acf = np.correlate(onset, onset, mode="full")[len(onset) - 1 :]
    lags = np.arange(len(acf))
    valid = (lags >= 100 * 60 / 180) & (lags <= 100 * 60 / 60)
    best = lags[valid][np.argmax(acf[valid])]
    # refine with a parabola through the peak
    a, b, c = acf[best - 1], acf[best], acf[best + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
    return 60.0 * 100 / (best + shift)


def spectral_features(wave: np.ndarray, sr: int) -> np.ndarray:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / sr)
    centroid = (spec * freqs).sum() / spec.sum()
    hop = sr // 100
    env = np.sqrt((wave[: len(wave) // hop * hop].reshape(-1, hop) ** 2).mean(1))
    return np.array([np.log(centroid), env.std() / (env.mean() + 1e-9), (env < 0.05 * env.max()).mean()])


@pytest.fixture(scope="module")
def truth(synthetic_catalog):
    return load_song_attributes(synthetic_catalog.root).set_index("song_id")


def test_deterministic_for_a_seed(tmp_path, quick_config):
    cfg = quick_config.synthetic
    small = type(cfg)(**{**cfg.__dict__, "n_songs": 12, "n_new_songs": 3, "n_users": 10})
    a = generate_catalog(small, tmp_path / "a", seed=7, progress=False)
    b = generate_catalog(small, tmp_path / "b", seed=7, progress=False)
    c = generate_catalog(small, tmp_path / "c", seed=8, progress=False)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.songs, b.songs)
    for rel in a.songs.audio_path.tolist() + a.songs.cover_path.tolist():
        assert hashlib.sha256((tmp_path / "a" / rel).read_bytes()).digest() == \
               hashlib.sha256((tmp_path / "b" / rel).read_bytes()).digest()
    assert not a.interactions.equals(c.interactions)


def test_media_off_writes_no_files_and_the_same_play_log(tmp_path, quick_config):
    cfg = quick_config.synthetic
    small = type(cfg)(**{**cfg.__dict__, "n_songs": 12, "n_new_songs": 3, "n_users": 10})
    with_media = generate_catalog(small, tmp_path / "a", seed=7, progress=False)
    text_only = generate_catalog(type(cfg)(**{**small.__dict__, "media": False}), tmp_path / "b", seed=7,
                                 progress=False)
    assert not (tmp_path / "b" / "media").exists()
    loaded = load_catalog(tmp_path / "b")
    assert loaded.songs.audio_path.isna().all() and loaded.songs.cover_path.isna().all()
    assert dict(loaded.report.counts) == {}  # no media is not a defect
    # the play log comes from the catalogue's own stream: only the songs' text differs
    pd.testing.assert_frame_equal(with_media.interactions, text_only.interactions)


def test_catalog_round_trips_and_validates_clean(synthetic_catalog):
    loaded = load_catalog(synthetic_catalog.root)
    assert len(loaded.songs) == 144 and len(loaded.users) == 80
    assert dict(loaded.report.counts) == {}
    assert loaded.interactions.timestamp.is_monotonic_increasing
    assert set(loaded.interactions.song_id) <= set(loaded.songs.song_id)


def test_popularity_is_skewed(synthetic_catalog):
    plays = synthetic_catalog.interactions.song_id.value_counts()
    plays = plays.reindex(synthetic_catalog.songs.song_id, fill_value=0).to_numpy()
    assert gini(plays) > 0.5, gini(plays)
    top = np.sort(plays)[::-1]
    assert top[: len(top) // 5].sum() > 0.5 * top.sum()  # the top 20% of songs take most plays


def test_cold_start_songs_have_no_plays_before_split(synthetic_catalog, truth):
    split = pd.Timestamp(synthetic_catalog.meta["split_time"])
    new = set(truth.index[truth.is_new])
    assert len(new) == 24
    inter = synthetic_catalog.interactions
    assert not inter[inter.timestamp < split].song_id.isin(new).any()
    played_after = set(inter[inter.timestamp >= split].song_id) & new
    assert len(played_after) >= 0.8 * len(new)  # the cold slice is not empty
    release = synthetic_catalog.songs.set_index("song_id").release_date
    assert all(pd.Timestamp(release[s], tz="UTC") >= split.normalize() for s in new)


def test_tempo_is_recoverable_from_the_audio(synthetic_catalog, truth):
    errors = []
    for row in synthetic_catalog.songs.itertuples():
        wave, sr = sf.read(synthetic_catalog.root / row.audio_path)
        errors.append(abs(estimate_tempo(wave, sr) - truth.tempo_bpm[row.song_id]) / truth.tempo_bpm[row.song_id])
    errors = np.array(errors)
    assert (errors < 0.05).mean() > 0.9, np.quantile(errors, [0.5, 0.9])


def _nearest_centroid_accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-centroid accuracy on standardised features."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    correct = 0
    for i in range(len(x)):
        mask = np.arange(len(x)) != i
        cents = {c: x[mask & (labels == c)].mean(0) for c in np.unique(labels)}
        correct += min(cents, key=lambda c: np.linalg.norm(x[i] - cents[c])) == labels[i]
    return correct / len(x)


def test_instrument_is_recoverable_from_the_audio(synthetic_catalog, truth):
    feats = np.stack([spectral_features(*sf.read(synthetic_catalog.root / p))
                      for p in synthetic_catalog.songs.audio_path])
    labels = truth.instrument[synthetic_catalog.songs.song_id].to_numpy()
    acc = _nearest_centroid_accuracy(feats, labels)
    assert acc > 2.0 / len(INSTRUMENTS), acc  # well above chance (0.25) from three crude spectral statistics


def test_cover_colour_follows_mood(synthetic_catalog, truth):
    feats = []
    for p in synthetic_catalog.songs.cover_path:
        rgb = np.asarray(Image.open(synthetic_catalog.root / p).convert("RGB"), dtype=float).reshape(-1, 3) / 255
        h, s, v = colorsys.rgb_to_hsv(*rgb.mean(0))
        feats.append([np.cos(2 * np.pi * h) * s, np.sin(2 * np.pi * h) * s, s, v])
    labels = truth.mood[synthetic_catalog.songs.song_id].to_numpy()
    assert _nearest_centroid_accuracy(np.array(feats), labels) > 0.9


def test_text_never_mentions_audio_or_cover_attributes(synthetic_catalog):
    words = set(MOODS) | set(INSTRUMENTS) | {"slow", "fast", "tempo", "bpm", "major", "minor"}
    for row in synthetic_catalog.songs.itertuples():
        lyrics = row.lyrics if isinstance(row.lyrics, str) else ""
        text = " ".join([row.title, row.album, lyrics, *row.comments, *row.tags, *row.genres]).lower()
        tokens = set(text.replace(",", " ").replace(".", " ").replace("!", " ").split())
        assert not tokens & words, (row.song_id, tokens & words)
    assert all(not set(GENRE_WORDS[g]) & words for g in GENRE_WORDS)
