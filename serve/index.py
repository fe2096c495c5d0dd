"""The ANN index over song embeddings (faiss), stored with the bundle hash it was built from.

`runs/<name>/index/` holds `songs.faiss` (the faiss index), `embeddings.npy` (the same vectors, row i = song i: user
vectors are built from them, whatever the index type), and `index.json` (song ids, bundle content hash, index type,
dimension, songs added after the build) and `center.npy` (the catalogue's mean embedding at build time).

The faiss index holds the embeddings with that mean removed and re-normalised, and queries are treated the same way,
so a search ranks by cosine in the centred space. Learned embedding spaces are anisotropic — every song shares one
large direction, all raw cosines sit near 1 and a user's top songs scored 0.98 alike — and removing the mean is the
standard fix (Mu & Viswanath 2018, "All-but-the-Top"); offline it raised cold-start recall@20 of history pooling
from 0.54 to 0.60-0.64 (`eval/baselines.py`, ContentKNN(center=True)). The mean is frozen at build time, so songs added
later are centred with the same vector and scores stay comparable.

An index built from another bundle would answer with vectors from a different space, silently: `load_index` refuses
it unless its bundle hash matches the serving bundle's.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import faiss
import numpy as np

from llmrec.io import MissingArtefactError, atomic_dir
from llmrec.ranking import catalogue_center, centred_unit

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, EMB_FILE, META_FILE, CENTER_FILE = "songs.faiss", "embeddings.npy", "index.json", "center.npy"


class StaleIndexError(ValueError):
    """The index was built from another bundle; it must be rebuilt (a ValueError: the CLI prints it as an error
    message, not a traceback)."""


def build_faiss(emb: np.ndarray, kind: str = "flat", *, nlist: int = 0, nprobe: int = 8,
                hnsw_m: int = 32) -> faiss.Index:
    """`flat`: exact inner product (small catalogues); `ivf`: inverted lists over k-means cells (trained on the
    catalogue); `hnsw`: a graph index (no training, fast adds)."""
    dim = emb.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * math.sqrt(len(emb))))
        if len(emb) < nlist:
            raise ValueError(f"an IVF index with {nlist} cells needs at least {nlist} songs to train, got "
                             f"{len(emb)}; use serve.index=flat or lower serve.ivf_nlist")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"serve.index={kind!r} is unknown; choose one of {list(INDEX_KINDS)}")
    index.add(emb)
    return index


@dataclass
class SongIndex:
    index: faiss.Index
    song_ids: list[str]
    embeddings: np.ndarray  # [N, d] float32, unit-norm, as the model wrote them (not centred)
    bundle_hash: str
    kind: str = "flat"
    added: dict[str, dict] = field(default_factory=dict)  # song id -> metadata of songs added after the build
    center: np.ndarray | None = None  # [d] mean removed before indexing and searching (None = zeros)

    def __post_init__(self):
        self.position = {s: i for i, s in enumerate(self.song_ids)}
        if self.center is None:
            self.center = np.zeros(self.embeddings.shape[1], np.float32)

    def centred(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors with the build-time catalogue mean removed, unit norm (what the faiss index holds)."""
        return centred_unit(vectors, self.center)

    def __len__(self) -> int:
        return len(self.song_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @classmethod
    def build(cls, embeddings: np.ndarray, song_ids: Sequence[str], bundle_hash: str, kind: str = "flat",
              **params) -> "SongIndex":
        emb = _check(embeddings, song_ids)
        if len(set(song_ids)) != len(song_ids):
            raise ValueError("song ids are not unique")
        center = catalogue_center(emb)
        return cls(build_faiss(centred_unit(emb, center), kind, **params), list(song_ids), emb, bundle_hash, kind,
                   center=center)

    def add(self, embeddings: np.ndarray, song_ids: Sequence[str], metadata: Sequence[dict] | None = None) -> None:
        """Add new songs without a rebuild (an IVF index keeps its cells; rebuild after large additions)."""
        emb = _check(embeddings, song_ids, self.dim)
        seen = set(self.position)
        for sid in song_ids:
            if sid in seen:
                raise ValueError(f"song id {sid!r} is already in the index")
            seen.add(sid)
        self.index.add(self.centred(emb))
        for i, sid in enumerate(song_ids):
            self.position[sid] = len(self.song_ids)
            self.song_ids.append(sid)
            self.added[sid] = dict(metadata[i]) if metadata else {}
        self.embeddings = np.concatenate([self.embeddings, emb])

    def vectors(self, song_ids: Iterable[str]) -> np.ndarray:
        """Stored embeddings of known songs; an unknown id raises KeyError naming it."""
        rows = []
        for s in song_ids:
            if s not in self.position:
                raise KeyError(s)
            rows.append(self.position[s])
        return self.embeddings[rows]

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[str]] | None = None
               ) -> list[list[tuple[str, float]]]:
        """Top-k (song id, score) per query row, best first, skipping each row's `exclude` ids. Queries are
        embeddings (or means of embeddings) as the model writes them; scores are cosines in the centred space."""
        queries = self.centred(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        excl = [set(e) for e in exclude] if exclude is not None else [set()] * len(queries)
        want = min(len(self), k + max((len(e) for e in excl), default=0))
        scores, idx = self.index.search(queries, want) if want else (np.zeros((len(queries), 0)),) * 2
        out = []
        for row_s, row_i, skip in zip(scores, idx, excl):
            hits = [(self.song_ids[i], float(s)) for s, i in zip(row_s, row_i) if i >= 0]
            out.append([h for h in hits if h[0] not in skip][:k])
        return out

    def save(self, directory: str | os.PathLike, extra: Callable[[Path], None] | None = None) -> Path:
        """Write the index directory atomically (a crash leaves the previous index whole). `extra(tmp)` writes
        files that must change together with the index (the added songs' media rows) into the same swap."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            if extra is not None:
                extra(tmp)
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            np.save(tmp / EMB_FILE, self.embeddings)
            np.save(tmp / CENTER_FILE, self.center)
            meta = {"bundle_hash": self.bundle_hash, "kind": self.kind, "dim": self.dim, "count": len(self),
                    "song_ids": self.song_ids, "added": self.added}
            (tmp / META_FILE).write_text(json.dumps(meta))
        return directory


def read_index_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise MissingArtefactError(f"{path} is missing; build the index with `llmrec serve --build-index "
                                   f"--run-dir {Path(directory).parent}`")
    return json.loads(path.read_text())


def load_index(directory: str | os.PathLike, bundle_hash: str) -> SongIndex:
    """The saved index, refused (StaleIndexError) when it was built from a different bundle."""
    directory = Path(directory)
    meta = read_index_meta(directory)
    if meta.get("bundle_hash") != bundle_hash:
        raise StaleIndexError(
            f"stale index: {directory} was built from bundle {str(meta.get('bundle_hash'))[:12]}, but the serving "
            f"bundle is {bundle_hash[:12]}; rebuild with `llmrec serve --build-index --run-dir {directory.parent}`")
    emb = np.load(directory / EMB_FILE)
    center = np.load(directory / CENTER_FILE) if (directory / CENTER_FILE).is_file() else None  # older indexes
    index = faiss.read_index(str(directory / INDEX_FILE))
    if index.ntotal != len(meta["song_ids"]) or len(emb) != len(meta["song_ids"]):
        raise ValueError(f"{directory} is inconsistent ({index.ntotal} vectors, {len(emb)} embeddings, "
                         f"{len(meta['song_ids'])} ids); rebuild with `llmrec serve --build-index`")
    return SongIndex(index, list(meta["song_ids"]), emb, meta["bundle_hash"], meta.get("kind", "flat"),
                     dict(meta.get("added", {})), center)


def _check(embeddings: np.ndarray, song_ids: Sequence[str], dim: int | None = None) -> np.ndarray:
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or len(emb) != len(song_ids):
        raise ValueError(f"expected [{len(song_ids)}, d] embeddings for {len(song_ids)} songs, got {emb.shape}")
    if dim is not None and emb.shape[1] != dim:
        raise ValueError(f"embeddings of dimension {emb.shape[1]} do not fit an index of dimension {dim}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf")
    return emb
