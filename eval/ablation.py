"""Modality ablation: which ground-truth song attributes can be read off each set of song embeddings.

Recall tells whether a model recommends well; it does not tell *why*. On the synthetic catalog every attribute is
known and each one is observable through one channel only (text: genre, artist, language; audio only: instrument,
tempo class, mode; cover only: mood — see data_prep/synthetic.py), so a linear probe per attribute shows what each
modality contributes: `llmrec-text` (audio and cover shown as missing) should know genre but not mood, the full
`llmrec` should know both. The raw encoder features are probed too, as the ceiling of what the frozen encoders
expose. Catalogs without `catalog/song_attributes.parquet` (real data) skip this section.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# attribute -> the only channel that carries it in the synthetic catalog
ATTRIBUTE_CHANNEL = {"genre": "text", "language": "text", "mood": "cover", "instrument": "audio",
                     "tempo_class": "audio", "mode": "audio"}


def probe_accuracy(x: np.ndarray, labels: np.ndarray, folds: int = 3, seed: int = 0) -> float:
    """Mean k-fold accuracy of a standardised logistic regression predicting `labels` from rows of `x`."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0))
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, x, labels, cv=cv).mean())


def majority_share(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class: the chance line of a probe."""
    return float(pd.Series(labels).value_counts(normalize=True).iloc[0])


# Songs probed at most: a probe's accuracy is settled long before that, and at 100k songs x 6 attributes x 3 folds
# per embedding the probes alone would take longer than the rest of the report.
PROBE_MAX_SONGS = 5000


def attribute_probes(vectors: dict[str, np.ndarray], song_ids: np.ndarray, attributes: pd.DataFrame,
                     folds: int = 3, seed: int = 0, max_songs: int = PROBE_MAX_SONGS) -> dict:
    """{"accuracy": {model: {attribute: acc}}, "chance": {attribute: acc}, "channel": ..., "n_songs": n,
    "skipped": {model: why}}.

    `vectors[name]` is aligned with `song_ids`; rows of all zeros (songs a model has no vector for) are left out
    of that model's probe, and a model with too few such songs for `folds`-fold CV (audio and cover encoders on a
    catalog without media) is named under "skipped". Above `max_songs` songs with known attributes, a seeded
    sample of them is probed ("n_sampled_from" says of how many)."""
    attrs = attributes.set_index("song_id").reindex(song_ids)
    present = [a for a in ATTRIBUTE_CHANNEL if a in attrs.columns]
    out: dict = {"accuracy": {}, "channel": {a: ATTRIBUTE_CHANNEL[a] for a in present}, "folds": folds,
                 "skipped": {}}
    known = attrs[present].notna().all(axis=1).to_numpy()
    if known.sum() > max_songs:
        out["n_sampled_from"] = int(known.sum())
        keep = np.random.default_rng(seed).choice(np.flatnonzero(known), size=max_songs, replace=False)
        known = np.zeros_like(known)
        known[keep] = True
    out["chance"] = {a: round(majority_share(attrs.loc[known, a].to_numpy()), 4) for a in present}
    out["n_songs"] = int(known.sum())
    for name, x in vectors.items():
        rows = known & (np.abs(x).sum(1) > 0)
        if rows.sum() < 2 * folds:
            out["skipped"][name] = f"{int(rows.sum())} of the probed songs have a {name} vector"
            continue
        out["accuracy"][name] = {a: round(probe_accuracy(x[rows], attrs.loc[rows, a].astype(str).to_numpy(),
                                                         folds, seed), 4) for a in present}
    return out


def ablation_markdown(probes: dict) -> list[str]:
    attrs = list(probes["chance"])
    lines = ["## Modality ablation: attributes readable from each embedding",
             "", "Linear-probe accuracy (logistic regression, "
             f"{probes['folds']}-fold CV over {probes['n_songs']} songs). The channel row says where the synthetic "
             "catalog exposes each attribute; `llmrec-text` is the trained model with audio and cover shown as "
             "missing.", "",
             "| model | " + " | ".join(attrs) + " |", "|---|" + "---:|" * len(attrs),
             "| *channel* | " + " | ".join(probes["channel"][a] for a in attrs) + " |",
             "| *chance* | " + " | ".join(f"{probes['chance'][a]:.3f}" for a in attrs) + " |"]
    for name, acc in probes["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[a]:.3f}" for a in attrs) + " |")
    if probes.get("n_sampled_from"):
        lines += ["", f"The {probes['n_songs']} songs are a seeded sample of the {probes['n_sampled_from']} with "
                      "known attributes."]
    for name, why in probes.get("skipped", {}).items():
        lines += ["", f"Not probed: {name} ({why})."]
    return lines + [""]


def plot_ablation(probes: dict, path, savefig) -> None:
    """Grouped bars: probe accuracy per attribute for each embedding, with the chance level marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs, models = list(probes["chance"]), list(probes["accuracy"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(attrs)), 3.6))
    width = 0.8 / max(1, len(models))
    for i, name in enumerate(models):
        xs = np.arange(len(attrs)) + (i - (len(models) - 1) / 2) * width
        ax.bar(xs, [probes["accuracy"][name][a] for a in attrs], width, label=name)
    for j, a in enumerate(attrs):
        ax.hlines(probes["chance"][a], j - 0.4, j + 0.4, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(attrs)), [f"{a}\n({probes['channel'][a]})" for a in attrs])
    ax.set_ylabel("probe accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Modality ablation (dashed: chance)")
    ax.legend(fontsize=7, ncol=2)
    savefig(fig, path)


def encoder_feature_vectors(features_dir, song_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The frozen encoders' own features, mean-pooled over layers and tokens, aligned with `song_ids` (zero rows
    where a song has no such feature): the ceiling of what the audio/cover channels can tell the model."""
    from llmrec.features import load_media_features, pooled_rows

    feats = load_media_features(features_dir)
    out = {}
    for modality in ("audio", "cover"):
        pooled = pooled_rows(getattr(feats, modality)).numpy()
        present = getattr(feats, f"{modality}_present")
        rows = np.zeros((len(song_ids), pooled.shape[1]), dtype=np.float32)
        for i, sid in enumerate(song_ids):
            j = feats.index.get(sid, -1)
            if j >= 0 and bool(present[j]):
                rows[i] = pooled[j]
        out[f"{modality} encoder"] = rows
    return out


def run_encoder_vectors(run, song_ids: np.ndarray) -> dict[str, np.ndarray]:
    """`encoder_feature_vectors` of the run's features stage, or {} when it has not run."""
    return encoder_feature_vectors(run.features, song_ids) if (run.features / "manifest.json").is_file() else {}


def modality_ablation(run, song_ids: np.ndarray, text: np.ndarray, llm: dict[str, np.ndarray],
                      media: dict[str, np.ndarray] | None = None) -> dict:
    """Probe every embedding set of a run against its ground-truth attributes, or say why it was skipped. `media`:
    the run's `run_encoder_vectors`, when the caller already has them (read from the run otherwise)."""
    path = run.catalog / "song_attributes.parquet"
    if not path.is_file():
        return {"skipped": "no ground-truth song attributes (only the synthetic catalog has them)"}
    if "llmrec" not in llm:
        return {"skipped": "llmrec is not trained in this run"}
    vectors = {"text": text, **llm, **(run_encoder_vectors(run, song_ids) if media is None else media)}
    return attribute_probes(vectors, song_ids, pd.read_parquet(path))
