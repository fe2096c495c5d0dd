"""Modality ablation probes: a probe finds an attribute exactly where the vectors encode it, and only there."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eval.ablation import attribute_probes, majority_share, modality_ablation, probe_accuracy
from llmrec.io import open_run_dir


def _songs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    attrs = pd.DataFrame({"song_id": [f"s{i}" for i in range(n)],
                          "genre": rng.choice(["rock", "jazz", "folk", "pop"], n),
                          "mood": rng.choice(["calm", "dark", "happy"], n)})
    return attrs, rng


def test_majority_share_is_the_most_frequent_class_share():
    assert majority_share(np.array(["a", "a", "b", "c"])) == 0.5


def test_probe_reads_an_encoded_attribute_and_not_noise():
    attrs, rng = _songs()
    onehot = pd.get_dummies(attrs["mood"]).to_numpy(float)
    x = np.hstack([onehot * 3, rng.normal(size=(len(attrs), 5))])
    assert probe_accuracy(x, attrs["mood"].to_numpy()) > 0.95
    assert probe_accuracy(rng.normal(size=(len(attrs), 8)), attrs["mood"].to_numpy()) < 0.5  # chance ~ 1/3


def test_attribute_probes_separate_channels_and_skip_zero_rows():
    attrs, rng = _songs()
    ids = attrs["song_id"].to_numpy()
    mood = pd.get_dummies(attrs["mood"]).to_numpy(float) * 3 + rng.normal(scale=0.1, size=(len(ids), 3))
    genre = pd.get_dummies(attrs["genre"]).to_numpy(float) * 3 + rng.normal(scale=0.1, size=(len(ids), 4))
    with_gaps = genre.copy()
    with_gaps[:100] = 0  # songs this model has no vector for are left out, not scored as wrong
    out = attribute_probes({"mood-only": mood, "genre-only": genre, "gaps": with_gaps}, ids, attrs)
    acc = out["accuracy"]
    assert acc["mood-only"]["mood"] > 0.95 and acc["mood-only"]["genre"] < 0.45
    assert acc["genre-only"]["genre"] > 0.95 and acc["genre-only"]["mood"] < 0.5
    assert acc["gaps"]["genre"] > 0.95
    assert out["channel"] == {"genre": "text", "mood": "cover"} and out["n_songs"] == len(ids)
    assert out["chance"]["mood"] == pytest.approx(attrs["mood"].value_counts(normalize=True).max(), abs=1e-4)


def test_modality_ablation_says_why_it_skips(tmp_path):
    run = open_run_dir(tmp_path / "run")
    ids = np.array(["s0", "s1"])
    assert "ground-truth" in modality_ablation(run, ids, np.zeros((2, 3)), {})["skipped"]
    run.catalog.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"song_id": ids, "genre": ["a", "b"]}).to_parquet(run.catalog / "song_attributes.parquet")
    assert "not trained" in modality_ablation(run, ids, np.zeros((2, 3)), {})["skipped"]


def test_an_embedding_without_vectors_is_named_not_probed():
    # A catalog prepared without media: the audio and cover encoders' rows are all zero. The probe crashed
    # (KFold on 0 samples) after 48 minutes of a 100k-song eval and the report was lost.
    from eval.ablation import ablation_markdown

    attrs, rng = _songs()
    ids = attrs["song_id"].to_numpy()
    out = attribute_probes({"text": rng.normal(size=(len(ids), 4)), "audio encoder": np.zeros((len(ids), 6))},
                           ids, attrs)
    assert list(out["accuracy"]) == ["text"] and "0 of the probed songs" in out["skipped"]["audio encoder"]
    assert any("Not probed: audio encoder" in line for line in ablation_markdown(out))


def test_a_large_catalog_is_probed_on_a_seeded_sample():
    attrs, rng = _songs(n=400)
    ids = attrs["song_id"].to_numpy()
    x = pd.get_dummies(attrs["genre"]).to_numpy(float)
    one, two = (attribute_probes({"genre": x}, ids, attrs, max_songs=150) for _ in range(2))
    assert one["n_songs"] == 150 and one["n_sampled_from"] == 400 and one == two
