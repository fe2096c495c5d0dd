"""Perception heads (llmrec.perception): fitted and calibrated on labelled features, saved without pickle, and the
evidence they feed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec.evidence import EvidenceBuilder
from llmrec.features import MediaFeatures
from llmrec.perception import PerceptionHeads, fit_head, fit_perception, fit_temperature, pooled_features

CLASSES = ["calm", "dark", "happy"]


def separable(n: int, d: int = 6, noise: float = 0.6, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (len(CLASSES), d))
    y = rng.integers(0, len(CLASSES), n)
    return (centres[y] + rng.normal(0, noise, (n, d))).astype(np.float32), [CLASSES[k] for k in y]


def test_a_head_learns_and_is_calibrated_on_held_out_songs():
    x, labels = separable(300)
    head = fit_head("mood", "cover", x, labels, seed=0, threshold=0.8)
    r = head.report
    assert head.classes == CLASSES and r["fitted_on"] == 240 and r["calibrated_on"] == 60
    assert r["accuracy"] >= 0.9 and r["ece"] <= 0.1
    assert r["accuracy_at_threshold"] >= r["accuracy"] - 0.02 and 0 < r["coverage_at_threshold"] <= 1
    p = head.probabilities(x[:5])
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    assert fit_head("mood", "cover", x[:4], labels[:4], seed=0, threshold=0.8) is None  # too few per class


def test_temperature_is_not_blown_up_by_two_confident_misses():
    """46 songs right with a margin of 10, two wrong with a margin of 40 (what the demo's instrument head did): the
    log-loss temperature flattens every prediction (6.4 here, the 20 bound on the demo) to excuse two songs; the
    Brier temperature keeps the 46 right ones confident."""
    logits = np.zeros((48, 2))
    logits[:, 0] = 10.0
    logits[46:] = [40.0, 0.0]
    labels = np.zeros(48, dtype=int)
    labels[46:] = 1
    t = fit_temperature(logits, labels)
    assert 0.05 < t < 1.5
    assert (np.exp(10 / t) / (1 + np.exp(10 / t))) > 0.99


def test_heads_save_and_load_to_the_same_predictions(tmp_path):
    ids = [f"s{i:03d}" for i in range(120)]
    x, labels = separable(120, d=4)
    feats = MediaFeatures(ids, {s: i for i, s in enumerate(ids)}, torch.zeros(120, 1, 1, 4),
                          torch.zeros(120, dtype=torch.bool), torch.from_numpy(x).reshape(120, 1, 1, 4),
                          torch.ones(120, dtype=torch.bool))
    table = pd.DataFrame({"song_id": ids, "mood": labels, "tempo_class": "fast"})  # one tempo class: no head
    heads = fit_perception(feats, table, ids[:100], seed=0, threshold=0.8)
    assert set(heads.heads) == {"mood"}  # no audio present, and tempo has a single class
    heads.save(tmp_path / "perception")
    again = PerceptionHeads.load(tmp_path / "perception")
    pooled = pooled_features(feats)
    assert again.predict(pooled) == heads.predict(pooled) and again.labels() == CLASSES
    held_out = [sid for sid in ids[100:]]
    predicted = heads.predict(pooled)
    right = [predicted[s][0][1] == labels[ids.index(s)] for s in held_out]
    assert np.mean(right) >= 0.85 and all(0 < p <= 1 for s in held_out for _, _, p in predicted[s])


def test_only_confident_perceptions_become_evidence():
    songs = {"a": {"song_id": "a", "title": "A", "artist": "X"}, "b": {"song_id": "b", "title": "B", "artist": "Y"}}
    perceived = {"b": [("mood", "calm", 0.95), ("tempo", "fast", 0.55)]}
    items = EvidenceBuilder(songs, None, perceived).build(["a"], "b")
    assert [(e.kind, e.attribute, e.value, e.confidence) for e in items if e.kind == "perceived"] == [
        ("perceived", "mood", "calm", 0.95)]
    assert "mood (perceived, 95%): \"calm\"" in [e.line() for e in items]
    assert pytest.approx(0.95) == next(e.confidence for e in items if e.kind == "perceived")
