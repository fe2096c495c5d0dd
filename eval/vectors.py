"""Song vectors the content models score with, in catalogue order: the song text's features and the trained
model's embeddings (`model/embeddings*.safetensors`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.config import Config
from llmrec.io import RunDir
from llmrec.schema import Catalog

LLMREC_NOT_TRAINED = "llmrec: not trained yet (run `llmrec train`)"


def align_vectors(song_ids: np.ndarray, ids: list[str] | np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of `vectors` in catalogue order; songs without a vector get zeros (they score 0). Returns the
    matrix and how many catalogue songs had no vector."""
    pos = pd.Index([str(i) for i in ids]).get_indexer(song_ids)
    out = np.zeros((len(song_ids), vectors.shape[1]), dtype=np.float32)
    out[pos >= 0] = np.asarray(vectors, dtype=np.float32)[pos[pos >= 0]]
    return out, int((pos < 0).sum())


def _read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

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
