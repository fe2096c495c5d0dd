"""Readers for `llmrec features` output: media feature shards and text features (see data_prep/extract.py).

Training, serving and evaluation read features only through these functions, so the shard format can change in
one place. The manifest is the source of truth: only the shards it lists, in index order, are read, and each
shard's song ids are checked against it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from llmrec.io import MissingArtefactError, file_sha256


@dataclass
class MediaFeatures:
    """Frozen encoder features of every song, rows in `song_ids` order (sorted ids)."""

    song_ids: list[str]
    index: dict[str, int]
    audio: torch.Tensor  # [N, L, K, D] float32, zeros where the song has no usable audio
    audio_present: torch.Tensor  # [N] bool
    cover: torch.Tensor  # [N, 1, K, D] float32
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
    parts: dict[str, list[torch.Tensor]] = {"audio": [], "audio_present": [], "cover": [], "cover_present": []}
    song_ids: list[str] = []
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
            for key in parts:
                parts[key].append(f.get_tensor(key))
        song_ids.extend(ids)
    return MediaFeatures(
        song_ids=song_ids,
        index={s: i for i, s in enumerate(song_ids)},
        audio=torch.cat(parts["audio"]),
        audio_present=torch.cat(parts["audio_present"]).bool(),
        cover=torch.cat(parts["cover"]),
        cover_present=torch.cat(parts["cover_present"]).bool(),
        manifest=manifest,
    )


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
