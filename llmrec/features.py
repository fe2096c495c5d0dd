"""Readers for `llmrec features` output: media feature shards and text features (written by data_prep/features.py).

Training, serving and evaluation read features only through these functions, so the shard format can change in
one place. The manifest is the source of truth: only the shards it lists, in index order, are read, and each
shard's song ids are checked against it.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from llmrec.io import MissingArtefactError, file_sha256


def read_shard_metadata(path: Path) -> dict | None:
    """The safetensors header metadata (no tensor data is read), or None for an unreadable file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - a broken or foreign file is simply not a finished shard
        return None



class ShardedRows:
    """One feature tensor (`audio` or `cover`) of every song, spread over the manifest's shards and read on demand.

    Media features are the big artefact (MERT: 13 layers x K tokens x 768 floats per song, ~300 KB; a million songs
    is ~300 GB), so nothing loads them whole: indexing reads just the asked-for rows through safetensors' memory-map
    (`safe_open(...).get_slice`), and training, serving and evaluation only ever ask for the rows of one batch.
    Indexing behaves like a tensor's for what the stages use: an int gives one row, a slice, a list/array/tensor of
    ints or a boolean mask gives stacked rows in that order; `chunks()` walks the shards one at a time.
    """

    def __init__(self, paths: Sequence[Path], key: str, counts: Sequence[int], row_shape: tuple[int, ...],
                 dtype: torch.dtype):
        self.paths, self.key, self.counts = [Path(p) for p in paths], key, list(counts)
        self.starts = [0]
        for n in self.counts:
            self.starts.append(self.starts[-1] + n)
        self.shape = torch.Size((self.starts[-1], *row_shape))
        self.dtype = dtype
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()  # the server reads rows from several request threads

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedRows({self.key}, shape={tuple(self.shape)}, shards={len(self.paths)})"

    def __getstate__(self) -> dict:  # open handles (memory maps) do not pickle; reopen in the other process
        return {**self.__dict__, "_handles": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _slice(self, shard: int):
        with self._lock:
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(self.paths[shard]), framework="pt")
            return self._handles[shard].get_slice(self.key)

    def _rows(self, idx: Sequence[int]) -> torch.Tensor:
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        n = self.shape[0]
        slices: dict[int, Any] = {}  # one slice object per shard touched by this call
        for j, i in enumerate(idx):
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"row {i} is out of range for {n} songs")
            i %= n
            shard = bisect.bisect_right(self.starts, i) - 1
            if shard not in slices:
                slices[shard] = self._slice(shard)
            local = i - self.starts[shard]
            out[j] = slices[shard][local:local + 1][0]
        return out

    def __getitem__(self, item) -> torch.Tensor:
        if isinstance(item, (int, np.integer)) or (torch.is_tensor(item) and item.ndim == 0
                                                   and item.dtype != torch.bool):
            return self._rows([int(item)])[0]
        if isinstance(item, slice):
            return self._rows(range(*item.indices(self.shape[0])))
        idx = item.numpy() if torch.is_tensor(item) else np.asarray(item)
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"a boolean mask must have {self.shape[0]} entries, got shape {idx.shape}")
            idx = np.flatnonzero(idx)
        return self._rows(idx.reshape(-1).tolist())

    def new_zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype)

    def chunks(self) -> Iterator[torch.Tensor]:
        """Each shard's rows in order, one shard in memory at a time."""
        for shard in range(len(self.paths)):
            yield self._slice(shard)[:]

    def materialize(self) -> torch.Tensor:
        """All rows in one tensor; only for catalogues that fit in memory (tests, small ablations)."""
        return torch.cat(list(self.chunks())) if self.paths else torch.zeros(tuple(self.shape), dtype=self.dtype)


def pooled_rows(rows: "torch.Tensor | ShardedRows") -> torch.Tensor:
    """Mean over each song's layers and tokens ([N, L, K, D] -> [N, D]), shard by shard for sharded rows."""
    chunks = rows.chunks() if isinstance(rows, ShardedRows) else [rows]
    return torch.cat([c.float().mean(dim=(1, 2)) for c in chunks])


@dataclass
class MediaFeatures:
    """Frozen encoder features of every song, rows in `song_ids` order (sorted ids). `audio`/`cover` are
    `ShardedRows` when read from disk (rows read on demand) or plain tensors when built in memory."""

    song_ids: list[str]
    index: dict[str, int]
    audio: "torch.Tensor | ShardedRows"  # [N, L, K, D] float32, zeros where the song has no usable audio
    audio_present: torch.Tensor  # [N] bool
    cover: "torch.Tensor | ShardedRows"  # [N, 1, K, D] float32
    cover_present: torch.Tensor  # [N] bool
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.song_ids)

    def rows(self, song_ids: list[str]) -> torch.Tensor:
        """Row indices of `song_ids`; an unknown id raises KeyError naming it."""
        try:
            return torch.tensor([self.index[s] for s in song_ids], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"song {e.args[0]!r} has no features; re-run `llmrec features`") from None


@dataclass
class TextFeatures:
    song_ids: list[str]
    index: dict[str, int]
    text: torch.Tensor  # [N, d] float32, rows L2-normalised
    encoder: str


def media_rows(features, song_ids: Sequence[str], modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature rows [N, L, K, D] and presence [N] for `song_ids`; songs without features count as missing.
    `features.audio`/`.cover` may be on-demand `ShardedRows`: the known rows are read in one indexing call."""
    feats, present = getattr(features, modality), getattr(features, f"{modality}_present")
    idx = [features.index.get(s, -1) for s in song_ids]
    known = [j for j, i in enumerate(idx) if i >= 0]
    rows = torch.zeros((len(idx), *feats.shape[1:]), dtype=torch.float32)
    if known:
        rows[known] = feats[[idx[j] for j in known]].float()
    pres = torch.tensor([float(present[i]) if i >= 0 else 0.0 for i in idx])
    return rows, pres


def text_rows(text_features, song_ids: Sequence[str]) -> torch.Tensor:
    """Sentence-encoder rows [N, d] for `song_ids` (`llmrec.features.TextFeatures`); zeros for a song without."""
    zero = text_features.text.new_zeros(text_features.text.shape[1])
    return torch.stack([text_features.text[text_features.index[s]] if s in text_features.index else zero
                        for s in song_ids]).float()


def _missing(features_dir: Path, what: str) -> MissingArtefactError:
    return MissingArtefactError(
        f"{what} is missing; run `llmrec features --run-dir {features_dir.parent}` first"
    )


def read_manifest(features_dir: str | os.PathLike) -> dict:
    features_dir = Path(features_dir)
    path = features_dir / "manifest.json"
    if not path.is_file():
        raise _missing(features_dir, str(path))
    return json.loads(path.read_text())


def load_media_features(features_dir: str | os.PathLike, *, verify: bool = False) -> MediaFeatures:
    """Concatenate the manifest's shards. Raises MissingArtefactError (naming `llmrec features`) when the
    directory, the manifest or a shard is missing, or the extraction has not finished every shard.
    `verify=True` also checks each shard's sha256 against the manifest."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    if not manifest.get("complete"):
        raise MissingArtefactError(
            f"features in {features_dir} are incomplete ({manifest.get('num_shards_done', 0)} of "
            f"{manifest.get('num_shards_planned', '?')} shards); run `llmrec features --run-dir "
            f"{features_dir.parent}` (every shard slice) to finish them"
        )
    present: dict[str, list[torch.Tensor]] = {"audio_present": [], "cover_present": []}
    paths, counts, shapes, song_ids = [], [], {}, []
    for name, rec in sorted(manifest["shards"].items(), key=lambda kv: kv[1]["index"]):
        path = features_dir / name
        if not path.is_file():
            raise _missing(features_dir, f"feature shard {path}")
        if verify and file_sha256(path) != rec["sha256"]:
            raise ValueError(f"{path} does not match its sha256 in the manifest; delete it and re-run "
                             f"`llmrec features --run-dir {features_dir.parent}`")
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads(f.metadata()["song_ids"])
            if hashlib.sha256(json.dumps(ids).encode()).hexdigest() != rec.get("song_ids_sha"):
                raise ValueError(f"{path} holds other songs than the manifest says; re-run `llmrec features "
                                 f"--run-dir {features_dir.parent}`")
            for key in present:  # [n] flags: small, kept in memory
                present[key].append(f.get_tensor(key))
            for key in ("audio", "cover"):
                sl = f.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape[0] != len(ids):
                    raise ValueError(f"{path}: {key} has {shape[0]} rows for {len(ids)} songs; re-run "
                                     f"`llmrec features --run-dir {features_dir.parent}`")
                if shapes.setdefault(key, (shape[1:], dtype)) != (shape[1:], dtype):
                    raise ValueError(f"{path}: {key} rows are {shape[1:]} {dtype}, other shards have "
                                     f"{shapes[key][0]} {shapes[key][1]}; the shards come from different "
                                     f"encoders: delete {features_dir} and re-run `llmrec features`")
        paths.append(path)
        counts.append(len(ids))
        song_ids.extend(ids)
    if not paths:
        raise _missing(features_dir, f"feature shards listed in {features_dir / 'manifest.json'}")

    def rows(key: str) -> ShardedRows:
        shape, dtype = shapes[key]
        return ShardedRows(paths, key, counts, shape, _TORCH_DTYPES[dtype])

    return MediaFeatures(
        song_ids=song_ids,
        index={s: i for i, s in enumerate(song_ids)},
        audio=rows("audio"),
        audio_present=torch.cat(present["audio_present"]).bool(),
        cover=rows("cover"),
        cover_present=torch.cat(present["cover_present"]).bool(),
        manifest=manifest,
    )


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_text_features(features_dir: str | os.PathLike) -> TextFeatures:
    features_dir = Path(features_dir)
    path = features_dir / "text.safetensors"
    if not path.is_file():
        raise _missing(features_dir, f"text features {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        text = f.get_tensor("text")
    ids = json.loads(meta["song_ids"])
    return TextFeatures(ids, {s: i for i, s in enumerate(ids)}, text, meta.get("encoder", "?"))
