"""Perception heads: audio and cover attributes predicted from the frozen encoders' features, with calibrated
confidences. They are the `perceived` evidence a reason may state about a candidate ("it sounds fast", "its cover
looks calm"), so a reason never takes an attribute from the catalog's ground truth at serving time.

One head per attribute the catalog has labels for (`ATTRIBUTES`: tempo and instrument from the audio features, mood
from the cover features): a multinomial logistic regression (scikit-learn; the regularisation chosen by
cross-validated log-loss) on the encoder features mean-pooled over layers and tokens (`llmrec.features.pooled_rows`),
standardised. It is fitted on 80% of the labelled TRAINING songs (cold songs are never labels) and calibrated by
temperature scaling (Guo et al., 2017; here the temperature that minimises the Brier score) on the other 20%, where
its accuracy, expected calibration error and accuracy above the evidence threshold are measured and saved with it.

Saved as `perception.safetensors` (standardisation, weights, biases) + `perception.json` (classes, temperature,
measurements) under `runs/<name>/model/perception/`: a few numbers, read without scikit-learn or pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

# attribute -> (modality whose features it is read from, column of the labels table)
ATTRIBUTES = {"tempo": ("audio", "tempo_class"), "instrument": ("audio", "instrument"), "mood": ("cover", "mood")}
WEIGHTS, META = "perception.safetensors", "perception.json"
MIN_PER_CLASS = 3  # labelled songs per class before a head is fitted
ECE_BINS = 10


@dataclass
class Head:
    attribute: str
    modality: str
    classes: list[str]
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    coef: np.ndarray  # [C, D]
    intercept: np.ndarray  # [C]
    temperature: float = 1.0
    report: dict[str, Any] = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(x) / self.temperature)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Confidence-binned |accuracy - confidence|, weighted by the share of predictions in each bin."""
    conf, right = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the Brier score on held-out logits. Brier rather than the usual negative
    log-likelihood: on a few dozen songs, one confidently wrong song has an unbounded log-loss and drives the
    temperature to its bound (every prediction near uniform; measured: ECE 0.03 -> 0.66 on the demo's instrument
    head), while its Brier loss is at most 2."""
    from scipy.optimize import minimize_scalar

    onehot = np.eye(logits.shape[1])[labels]

    def brier(t: float) -> float:
        return float(((_softmax(logits / t) - onehot) ** 2).sum(1).mean())

    return float(minimize_scalar(brier, bounds=(0.05, 20.0), method="bounded").x)


def fit_head(attribute: str, modality: str, x: np.ndarray, labels: Iterable[str], seed: int,
             threshold: float) -> Head | None:
    """A calibrated head for one attribute (see the module docstring), or None with too few labels."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import train_test_split

    y_text = np.asarray(list(labels), dtype=object)
    classes, counts = np.unique(y_text, return_counts=True)
    if len(classes) < 2 or counts.min() < MIN_PER_CLASS:
        return None
    y = np.searchsorted(classes, y_text)
    fit_i, cal_i = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    mean, scale = x[fit_i].mean(0), x[fit_i].std(0) + 1e-6
    # The regularisation is chosen by log-loss (3-fold): an unregularised fit on a few hundred songs is confidently
    # wrong on the few it misses, which no single temperature can repair.
    model = LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=3, scoring="neg_log_loss", max_iter=2000,
                                 l1_ratios=(0.0,), use_legacy_attributes=False, random_state=seed)
    model.fit((x[fit_i] - mean) / scale, y[fit_i])
    head = Head(attribute, modality, [str(c) for c in classes], mean.astype(np.float32), scale.astype(np.float32),
                model.coef_.astype(np.float32), model.intercept_.astype(np.float32))
    logits = head.logits(x[cal_i])
    raw = _softmax(logits)
    head.temperature = fit_temperature(logits, y[cal_i])
    probs = head.probabilities(x[cal_i])
    sure = probs.max(1) >= threshold
    head.report = {
        "fitted_on": len(fit_i), "calibrated_on": len(cal_i), "classes": head.classes,
        "accuracy": float((probs.argmax(1) == y[cal_i]).mean()),
        "ece_before": expected_calibration_error(raw, y[cal_i]), "ece": expected_calibration_error(probs, y[cal_i]),
        "temperature": round(head.temperature, 4), "threshold": threshold,
        "coverage_at_threshold": float(sure.mean()),
        "accuracy_at_threshold": float((probs.argmax(1) == y[cal_i])[sure].mean()) if sure.any() else None,
    }
    return head


@dataclass
class PerceptionHeads:
    heads: dict[str, Head]

    def predict(self, pooled: Mapping[str, tuple[list[str], np.ndarray]]) -> dict[str, list[tuple[str, str, float]]]:
        """song id -> [(attribute, label, calibrated probability)] of the top label per head, for the songs that
        have the head's modality; `pooled`: modality -> (song ids, [N, D] pooled features)."""
        out: dict[str, list[tuple[str, str, float]]] = {}
        for head in self.heads.values():
            if head.modality not in pooled:
                continue
            ids, x = pooled[head.modality]
            if not len(ids):
                continue
            probs = head.probabilities(x)
            for sid, row in zip(ids, probs):
                k = int(row.argmax())
                out.setdefault(sid, []).append((head.attribute, head.classes[k], float(row[k])))
        return out

    def labels(self) -> list[str]:
        """Every label any head can say (the claim checker's perceived vocabulary)."""
        return sorted({c for h in self.heads.values() for c in h.classes})

    def report(self) -> dict[str, Any]:
        return {a: h.report for a, h in self.heads.items()}

    def save(self, directory: str | Path) -> None:
        from safetensors.numpy import save_file

        from llmrec.io import atomic_dir, atomic_write_json

        with atomic_dir(Path(directory)) as tmp:
            arrays = {f"{a}.{k}": getattr(h, k) for a, h in self.heads.items()
                      for k in ("mean", "scale", "coef", "intercept")}
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / WEIGHTS))
            atomic_write_json(tmp / META, {a: {"modality": h.modality, "classes": h.classes,
                                               "temperature": h.temperature, "report": h.report}
                                           for a, h in self.heads.items()})

    @classmethod
    def load(cls, directory: str | Path) -> "PerceptionHeads":
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        arrays = load_file(str(directory / WEIGHTS))
        return cls({a: Head(a, m["modality"], m["classes"], *(arrays[f"{a}.{k}"] for k in
                                                               ("mean", "scale", "coef", "intercept")),
                            temperature=float(m["temperature"]), report=m.get("report", {}))
                    for a, m in meta.items()})


def pooled_features(features, song_ids: Iterable[str] | None = None) -> dict[str, tuple[list[str], np.ndarray]]:
    """modality -> (ids of the songs that have it, [N, D] features mean-pooled over layers and tokens)."""
    from llmrec.features import pooled_rows

    wanted = None if song_ids is None else set(song_ids)
    out = {}
    for modality in ("audio", "cover"):
        present = getattr(features, f"{modality}_present").numpy().astype(bool)
        keep = [i for i, sid in enumerate(features.song_ids) if present[i] and (wanted is None or sid in wanted)]
        pooled = pooled_rows(getattr(features, modality)).numpy()
        out[modality] = ([features.song_ids[i] for i in keep], pooled[keep].astype(np.float32))
    return out


def fit_perception(features, labels: pd.DataFrame, train_song_ids: Iterable[str], seed: int,
                   threshold: float) -> PerceptionHeads | None:
    """Heads for every attribute of `ATTRIBUTES` that `labels` (song_id + attribute columns) has, fitted on the
    `train_song_ids` that have both a label and the modality; None when no head could be fitted."""
    pooled = pooled_features(features, train_song_ids)
    by_song = labels.assign(song_id=labels["song_id"].astype(str)).set_index("song_id")
    heads = {}
    for attribute, (modality, column) in ATTRIBUTES.items():
        if column not in by_song.columns:
            continue
        ids, x = pooled[modality]
        rows = [i for i, sid in enumerate(ids) if sid in by_song.index and not pd.isna(by_song.at[sid, column])]
        if not rows:
            continue
        head = fit_head(attribute, modality, x[rows], (str(by_song.at[ids[i], column]) for i in rows), seed,
                        threshold)
        if head is not None:
            heads[attribute] = head
    return PerceptionHeads(heads) if heads else None


def load_perceived(run, features=None) -> tuple[dict[str, list[tuple[str, str, float]]], list[str]]:
    """The run's perceived attributes for every song with features, and the heads' label vocabulary; ({}, []) when
    the run has no perception heads (a catalog without labels, or trained before they existed)."""
    directory = run.model / "perception"
    if not (directory / META).is_file():
        return {}, []
    from llmrec.features import load_media_features

    heads = PerceptionHeads.load(directory)
    features = features if features is not None else load_media_features(run.features)
    return heads.predict(pooled_features(features)), heads.labels()
