"""A new song from a request: its uploads (base64 in JSON, a path under `serve.media_roots`, or a multipart file
part), encoded with the run's frozen encoders, and added to the live index when asked (`add_to_index`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Request
from pydantic import BaseModel
from pydantic_core import from_json

from serve.inputs import RequestError, SongMedia, resolve_media_path
from serve.state import ServerState


@dataclass
class NewSong:
    row: dict
    audio: bytes | Path | None = None
    cover: bytes | Path | None = None


def parse_new_song(state: ServerState, body: BaseModel, field: str, files: dict | None = None) -> NewSong:
    """`body`: a validated new song (`RequestModels.new_song`); `files`: its multipart uploads."""
    media: dict[str, bytes | Path | None] = {}
    for kind in ("audio", "cover"):
        raw, path, upload = getattr(body, kind), getattr(body, f"{kind}_path"), (files or {}).get(kind)
        if sum(x is not None for x in (raw, path, upload)) > 1:
            raise RequestError(f"{field}.{kind}", f"give {kind} once: base64, a {kind}_path or a file part")
        if path is not None:
            media[kind] = resolve_media_path(path, state.cfg.serve.media_roots, f"{field}.{kind}_path")
        else:
            media[kind] = raw if raw is not None else upload
        if media[kind] == b"":
            raise RequestError(f"{field}.{kind}", "empty upload")
    return NewSong(state.inputs.new_song(body.model_extra, field), media["audio"], media["cover"])


def encode_new_song(state: ServerState, song: NewSong, field: str) -> SongMedia:
    """Decode + encode the uploads with the run's frozen encoders (runs in a worker thread)."""
    media = state.inputs.empty_media()
    if song.audio is not None:
        kw = {"path": song.audio} if isinstance(song.audio, Path) else {"data": song.audio}
        media.audio, media.audio_present = state.codec.audio(field=f"{field}.audio", **kw), True
    if song.cover is not None:
        kw = {"path": song.cover} if isinstance(song.cover, Path) else {"data": song.cover}
        media.cover, media.cover_present = state.codec.cover(field=f"{field}.cover", **kw), True
    if state.inputs.text_codec is not None:
        media.text = state.inputs.text_codec.encode(song.row)
    return media


UPLOAD_TYPES = {"audio": ("audio/",), "cover": ("image/",)}


async def read_multipart(state: ServerState, request: Request) -> tuple[dict, dict]:
    limit = state.cfg.serve.max_upload_bytes
    try:
        form = await request.form(max_files=2, max_fields=8, max_part_size=limit + 1)
    except Exception as e:  # noqa: BLE001 - python-multipart/starlette raise several types for broken bodies
        raise RequestError("body", f"malformed multipart body ({e})", 400) from None
    unknown = sorted(set(form.keys()) - {"input", "audio", "cover", "neighbours", "add_to_index"})
    if unknown:
        raise RequestError(unknown[0], "unknown form field; use input (JSON), audio, cover, neighbours")
    try:
        data = from_json(form.get("input") or "")  # Pydantic's parser: deep nesting is an error, not a recursion
    except (ValueError, TypeError):
        raise RequestError("input", "form field `input` must be a JSON object with the song's metadata") from None
    files = {}
    for kind in ("audio", "cover"):
        part = form.get(kind)
        if part is None:
            continue
        if isinstance(part, str):
            raise RequestError(kind, "expected a file part")
        ctype = (part.content_type or "application/octet-stream").lower()
        if not ctype.startswith(UPLOAD_TYPES[kind]) and ctype != "application/octet-stream":
            raise RequestError(kind, f"content type {ctype!r} is not accepted for {kind} "
                                     f"(expected {UPLOAD_TYPES[kind][0]}*)", 415)
        blob = await part.read(limit + 1)
        if len(blob) > limit:
            raise RequestError(kind, f"upload over {limit} bytes (serve.max_upload_bytes)", 413)
        files[kind] = blob
    body = {"input": data}
    if "neighbours" in form:
        try:
            body["neighbours"] = int(form["neighbours"])
        except ValueError:
            raise RequestError("neighbours", "expected an integer") from None
    if "add_to_index" in form:
        body["add_to_index"] = str(form["add_to_index"]).lower() in ("1", "true", "yes")
    return body, files


def add_songs(state: ServerState, rows: list[tuple[tuple[dict, SongMedia], np.ndarray]]) -> None:
    """Add new songs to the live index and persist it (atomic directory swap); no rebuild."""
    ids = [row["song_id"] for (row, _), _ in rows]
    meta = [{k: v for k, v in row.items() if k not in ("audio_path", "cover_path")} for (row, _), _ in rows]
    state.index.add(np.stack([e for _, e in rows]), ids, meta)
    for ((row, media), _), sid in zip(rows, ids):
        state.inputs.add_song(sid, row, media)
    state.index.save(state.run.index, extra=state.inputs.save_added_media)
