"""Turning requests into engine rows: catalog song ids, new songs (metadata + uploads) and histories -> EngineInput.

Prompts are built exactly as training built them (`llmrec.model.mm_lm.item_prompt` for song embeddings, the stage-2
prompt for reasons) and every text field passes through `llmrec.text`'s sanitiser on the way (the builders call
`sanitize_song`). Media rows for catalog songs come from the run's feature shards; an uploaded or referenced file
is decoded with `llmrec.media.audio` / `llmrec.media.image` and encoded with the run's frozen encoders, exactly as
`data_prep.features` does for the catalogue. A bundle that fuses sentence-encoder features into its embedding head
(`MMConfig.text_dim`) gets catalog songs' rows from `features/text.safetensors` and a new song's from the same
encoder run on its (sanitised) text by `llmrec.text_features.song_text`, as `llmrec features` built them.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmrec.config import Config
from llmrec.features import media_rows, text_rows
from llmrec.media.audio import MediaError, load_audio
from llmrec.media.image import load_image
from llmrec.model.mm_lm import MediaBatch, MMConfig, item_prompt
from llmrec.text import Prompt, sanitize_text
from serve.engines.base import EngineInput

SONG_TEXT_FIELDS = ("title", "artist", "album", "language", "release_date", "lyrics")
SONG_LIST_FIELDS = ("genres", "tags", "comments")


class RequestError(ValueError):
    """A client error: `field` names the offending part of the request, `status` is the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422):
        self.field, self.status = field, status
        super().__init__(f"{field}: {message}")


# ------------------------------------------------------------------------------------------------ media

def resolve_media_path(path: str, roots: Sequence[str], field: str) -> Path:
    """A client-named file, allowed only inside one of `serve.media_roots` (after resolving `..` and symlinks)."""
    if not roots:
        raise RequestError(field, "file paths are not accepted by this server (serve.media_roots is empty); "
                                  "upload the file instead", 403)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise RequestError(field, "expected a file path")
    for root in roots:
        base = Path(root).resolve()
        candidate = (base / path).resolve()  # an absolute `path` replaces `base` and is checked the same way
        if candidate.is_relative_to(base):
            if not candidate.is_file():
                raise RequestError(field, f"file {path!r} not found under the media roots", 404)
            return candidate
    raise RequestError(field, f"path {path!r} is outside the allowed media roots", 403)


class MediaCodec:
    """Uploads/paths -> feature rows [L, K, D] with the run's frozen encoders (loaded on first use)."""

    def __init__(self, cfg: Config, encoders_dir: str | os.PathLike | None):
        self.cfg, self.encoders_dir = cfg, encoders_dir
        self._encoder = None
        self._lock = threading.Lock()  # the encoders are shared by request threads

    @property
    def encoder(self):
        with self._lock:
            if self._encoder is None:
                from llmrec.model.encoders import MediaEncoder

                self._encoder = MediaEncoder.load(self.cfg.model, self.encoders_dir, seed=self.cfg.seed)
            return self._encoder

    @staticmethod
    @contextmanager
    def _media_file(data: bytes | None, path: Path | None, suffix: str, field: str, what: str):
        """The upload as a file (a temporary one for bytes, removed afterwards) for the data_prep decoders; a file
        they cannot use becomes a 4xx naming the field."""
        tmp_name = None
        if path is None:
            with tempfile.NamedTemporaryFile(prefix="llmrec-upload-", suffix=suffix, delete=False) as tmp:
                tmp.write(data)
            path = tmp_name = Path(tmp.name)
        try:
            yield path
        except MediaError as e:
            raise RequestError(field, f"not {what} ({e.reason})") from None
        finally:
            if tmp_name is not None:
                os.unlink(tmp_name)

    def audio(self, data: bytes | None = None, path: Path | None = None, field: str = "audio") -> torch.Tensor:
        enc = self.encoder
        with self._media_file(data, path, ".audio", field, "usable audio") as file:
            wave = load_audio(file, enc.audio_cfg.sample_rate, windows=enc.audio_cfg.windows,
                              window_seconds=enc.audio_cfg.window_seconds,
                              max_seconds=self.cfg.features.max_audio_seconds,
                              min_seconds=self.cfg.features.min_audio_seconds)
            with self._lock:
                return enc.encode_audio(wave)

    def cover(self, data: bytes | None = None, path: Path | None = None, field: str = "cover") -> torch.Tensor:
        enc = self.encoder
        with self._media_file(data, path, ".image", field, "a usable image") as file:
            img = load_image(file, max_pixels=self.cfg.features.max_image_pixels)
            with self._lock:
                return enc.encode_image(img)


# ------------------------------------------------------------------------------------------------ songs

ADDED_MEDIA_FILE = "added_media.safetensors"  # in the index directory, beside the added songs' embeddings


@dataclass
class SongMedia:
    """One song's feature rows (or zeros + absent)."""

    audio: torch.Tensor  # [L, K, D]
    audio_present: bool
    cover: torch.Tensor  # [1, K, D]
    cover_present: bool
    text: torch.Tensor | None = None  # [Dt] sentence-encoder features (bundles with MMConfig.text_dim > 0)


def media_batch(rows: Sequence[SongMedia], audio_of: Sequence[int], cover_of: Sequence[int], mm: MMConfig,
                text_of: Sequence[int] = ()) -> MediaBatch:
    """A MediaBatch whose audio rows are rows[i] for i in audio_of, cover rows rows[j] for j in cover_of, and (for
    an embedding prompt of a text-fusing bundle) text rows rows[t] for t in text_of."""
    def stack(idx, name, shape):
        return torch.stack([getattr(rows[i], name) for i in idx]).float() if idx else torch.zeros((0, *shape))
    text = None
    if mm.text_dim and text_of:
        text = torch.stack([rows[i].text if rows[i].text is not None else torch.zeros(mm.text_dim)
                            for i in text_of]).float()
    return MediaBatch(
        stack(audio_of, "audio", (mm.audio_layers, mm.audio_tokens, mm.audio_dim)),
        torch.tensor([float(rows[i].audio_present) for i in audio_of]),
        stack(cover_of, "cover", (mm.cover_layers, mm.cover_tokens, mm.cover_dim)),
        torch.tensor([float(rows[i].cover_present) for i in cover_of]),
        text,
    )


class TextCodec:
    """A new song's text -> the sentence-encoder row the bundle was trained with (`MMConfig.text_encoder`)."""

    def __init__(self, encoder: str):
        if encoder != "minilm":
            raise ValueError(f"the bundle fuses {encoder!r} text features, which cannot encode a new song; "
                             f"retrain with features.text_encoder=minilm or model.text_fusion=false")
        self.encoder = encoder
        self._lock = threading.Lock()  # one encoder shared by request threads

    def encode(self, row: Mapping[str, Any]) -> torch.Tensor:
        from llmrec.text_features import encode_texts, song_text

        with self._lock:
            return torch.from_numpy(encode_texts([song_text(dict(row))], self.encoder)[0])


class SongInputs:
    """The catalogue as the server sees it: song rows, media feature rows, listening histories, added songs."""

    def __init__(self, cfg: Config, tokenizer, mm_cfg: MMConfig, songs: Sequence[Mapping[str, Any]], features,
                 histories: Mapping[str, list[str]] | None = None, text_features=None):
        self.cfg, self.tokenizer, self.mm = cfg, tokenizer, mm_cfg
        self.songs: dict[str, dict] = {str(s["song_id"]): dict(s) for s in songs}
        self.features = features
        if mm_cfg.text_dim and text_features is None:
            raise ValueError("the bundle fuses text features: pass the run's features/text.safetensors")
        self.text_features = text_features if mm_cfg.text_dim else None
        self.text_codec = TextCodec(mm_cfg.text_encoder) if mm_cfg.text_dim else None
        self.histories = dict(histories or {})  # user id -> song ids, most recent first (distinct)
        self.added_media: dict[str, SongMedia] = {}
        self._prompts: dict[str, str] = {}  # song id -> embedding prompt (catalog songs)
        self.stats: Counter = Counter()  # sanitiser repairs over all requests (exported by /metrics)

    # ------------------------------------------------------------------ lookups
    def song(self, song_id: Any, field: str) -> dict:
        if not isinstance(song_id, str) or song_id not in self.songs:
            raise RequestError(field, f"unknown song id {song_id!r}", 404)
        return self.songs[song_id]

    def history(self, user_id: Any, field: str = "user_id") -> list[str]:
        if not isinstance(user_id, str) or user_id not in self.histories:
            raise RequestError(field, f"unknown user id {user_id!r}", 404)
        return self.histories[user_id]

    def media(self, song_id: str) -> SongMedia:
        if song_id in self.added_media:
            return self.added_media[song_id]
        a, ap = media_rows(self.features, [song_id], "audio")
        c, cp = media_rows(self.features, [song_id], "cover")
        text = text_rows(self.text_features, [song_id])[0] if self.text_features is not None else None
        return SongMedia(a[0], bool(ap[0]), c[0], bool(cp[0]), text)

    # ------------------------------------------------------------------ engine rows
    def embed_input(self, song: Mapping[str, Any], media: SongMedia) -> EngineInput:
        prompt = item_prompt(song, self.tokenizer, self.mm, self.cfg.train.max_length,
                              self.cfg.prompt.song_budget)
        return EngineInput(prompt, media_batch([media], [0], [0], self.mm, [0]))

    def catalog_embed_input(self, song_id: str, field: str) -> EngineInput:
        # A catalog song's prompt never changes: build it once (fitting it to the budget tokenises it many times).
        song = self.song(song_id, field)
        if song_id not in self._prompts:
            self._prompts[song_id] = item_prompt(song, self.tokenizer, self.mm, self.cfg.train.max_length,
                                                  self.cfg.prompt.song_budget)
        return EngineInput(self._prompts[song_id], media_batch([self.media(song_id)], [0], [0], self.mm, [0]))

    def reason_input(self, prompt: Prompt, sample_seed: int | None = None) -> EngineInput:
        """A stage-2 prompt (`llmrec.evidence.reason_prompt`, as `data_prep.examples` builds it) with its media rows
        in placeholder order; `sample_seed` as in `EngineInput`."""
        ids = list(dict.fromkeys(prompt.audio_song_ids + prompt.cover_song_ids))
        rows = [self.media(s) for s in ids]
        pos = {s: i for i, s in enumerate(ids)}
        return EngineInput(prompt.text, media_batch(rows, [pos[s] for s in prompt.audio_song_ids],
                                                    [pos[s] for s in prompt.cover_song_ids], self.mm), sample_seed)

    # ------------------------------------------------------------------ new songs
    def new_song(self, data: Mapping[str, Any], field: str) -> dict:
        """A catalog-shaped row from a request's metadata: unknown fields refused, every text sanitised and capped
        at serve.max_text_chars (the prompt builders cap each field further)."""
        if not isinstance(data, Mapping):
            raise RequestError(field, "expected an object with song metadata (title, artist, lyrics, ...)")
        allowed = {"song_id", *SONG_TEXT_FIELDS, *SONG_LIST_FIELDS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise RequestError(f"{field}.{unknown[0]}", f"unknown field; allowed: {sorted(allowed)}")
        limit = self.cfg.serve.max_text_chars
        row: dict[str, Any] = {}
        for key in SONG_TEXT_FIELDS + ("song_id",):
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise RequestError(f"{field}.{key}", "expected a string")
            if len(value) > limit:
                raise RequestError(f"{field}.{key}", f"{len(value)} characters; at most {limit} are allowed "
                                                     f"(serve.max_text_chars)")
            row[key] = sanitize_text(value, limit, self.stats)
        for key in SONG_LIST_FIELDS:
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RequestError(f"{field}.{key}", "expected a list of strings")
            if len(value) > 64 or sum(len(v) for v in value) > limit:
                raise RequestError(f"{field}.{key}", f"too long: at most 64 entries and {limit} characters in all")
            row[key] = [sanitize_text(v, limit, self.stats) for v in value]
        if not row.get("title"):
            raise RequestError(f"{field}.title", "a new song needs a title")
        row.setdefault("artist", "")
        # The prompt marks both placeholders; the absent modality gets the learned "missing" embedding.
        row["audio_path"] = row["cover_path"] = "upload"
        return row

    def add_song(self, song_id: str, row: dict, media: SongMedia) -> None:
        """Make an added song usable as a recommendation candidate (prompt + media for its reason)."""
        self.songs[song_id] = {**row, "song_id": song_id}
        if self.text_codec is not None and media.text is None:  # e.g. reloaded from the index after a restart
            media.text = self.text_codec.encode(row)
        self.added_media[song_id] = media

    def save_added_media(self, directory: Path) -> None:
        """The media rows of songs added over the API, as `directory/ADDED_MEDIA_FILE` (written inside the index's
        atomic save, so the index and these rows never disagree after a crash). Their text rows are not stored:
        they are recomputed from the song row by the same encoder on load."""
        ids = sorted(self.added_media)
        if not ids:
            return
        rows = [self.added_media[s] for s in ids]
        save_file({"audio": torch.stack([m.audio.float() for m in rows]).contiguous(),
                   "audio_present": torch.tensor([m.audio_present for m in rows], dtype=torch.uint8),
                   "cover": torch.stack([m.cover.float() for m in rows]).contiguous(),
                   "cover_present": torch.tensor([m.cover_present for m in rows], dtype=torch.uint8)},
                  str(Path(directory) / ADDED_MEDIA_FILE), metadata={"song_ids": json.dumps(ids)})

    def load_added_media(self, directory: Path) -> dict[str, SongMedia]:
        """What `save_added_media` wrote (empty for an index without added songs, or one saved before their media
        were kept). Rows whose shape does not fit this bundle are refused: they came from other encoders."""
        path = Path(directory) / ADDED_MEDIA_FILE
        if not path.is_file():
            return {}
        mm = self.mm
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads(f.metadata()["song_ids"])
            t = {k: f.get_tensor(k) for k in ("audio", "audio_present", "cover", "cover_present")}
        want = {"audio": (mm.audio_layers, mm.audio_tokens, mm.audio_dim),
                "cover": (mm.cover_layers, mm.cover_tokens, mm.cover_dim)}
        for key, shape in want.items():
            if tuple(t[key].shape) != (len(ids), *shape):
                raise ValueError(f"{path}: {key} rows are {tuple(t[key].shape[1:])}, the bundle expects {shape}; "
                                 f"the added songs were embedded by another model: delete {path} and add them again")
        return {sid: SongMedia(t["audio"][i], bool(t["audio_present"][i]), t["cover"][i], bool(t["cover_present"][i]))
                for i, sid in enumerate(ids)}

    def empty_media(self) -> SongMedia:
        mm = self.mm
        return SongMedia(torch.zeros(mm.audio_layers, mm.audio_tokens, mm.audio_dim), False,
                         torch.zeros(mm.cover_layers, mm.cover_tokens, mm.cover_dim), False)
