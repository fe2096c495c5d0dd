"""The catalog schema (songs, users, interactions), its Parquet storage and validation.

Validation policy (the same for every adapter):
- structural problems that make the table unusable — a missing column, a value of the wrong type, a duplicate or
  empty id — raise `SchemaError` naming the table, row and field;
- problems confined to one row are repaired or skipped and *counted* in a `ValidationReport`, with the first rows
  named: interactions that name unknown songs/users or have a bad play count are skipped; invalid UTF-8 is replaced;
  a media file that does not exist marks that song's modality as missing (path set to null) — never a silent drop.
"""
from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec.io import MissingArtefactError, atomic_path, atomic_write_json
from llmrec.text import repair_utf8


class SchemaError(ValueError):
    """A catalog table that cannot be used as is; the message names the table, row and field."""


SONGS_SCHEMA = pa.schema(
    [
        pa.field("song_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("artist", pa.string(), nullable=False),
        pa.field("album", pa.string()),
        pa.field("genres", pa.list_(pa.string())),
        pa.field("tags", pa.list_(pa.string())),  # instruments, moods, free tags, where the source has them
        pa.field("language", pa.string()),
        pa.field("release_date", pa.date32()),
        pa.field("lyrics", pa.string()),
        pa.field("comments", pa.list_(pa.string())),
        pa.field("audio_path", pa.string()),  # relative to the catalog directory, or absolute; null = no audio
        pa.field("cover_path", pa.string()),  # likewise; null = no cover
    ]
)
USERS_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False), pa.field("country", pa.string())])
INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("song_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field("play_count", pa.int32(), nullable=False),
        pa.field("duration_s", pa.float32()),  # seconds listened, where known
        pa.field("event", pa.string()),  # play | like | skip | playlist_add
    ]
)
SCHEMAS = {"songs": SONGS_SCHEMA, "users": USERS_SCHEMA, "interactions": INTERACTIONS_SCHEMA}
REQUIRED = {
    "songs": ["song_id", "title", "artist"],
    "users": ["user_id"],
    "interactions": ["user_id", "song_id", "timestamp"],
}
TEXT_FIELDS = {"songs": ["title", "artist", "album", "language", "lyrics"], "users": ["country"], "interactions": []}
LIST_FIELDS = {"songs": ["genres", "tags", "comments"], "users": [], "interactions": []}
EVENTS = {"play", "like", "skip", "playlist_add"}


@dataclass
class ValidationReport:
    """Counted repairs and skips, with the first few offending rows named per kind."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    # every row left out of the catalog: {"table", "row", "field", "value", "reason"} (not only the first few)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    def reject(self, table: str, row: int, name: str, value: Any, reason: str) -> None:
        """Leave row `row` of `table` out of the catalog, counted and listed with its field, value and reason."""
        text = value if isinstance(value, str) or value is None else repr(value)
        self.add(f"{table}.rejected.{name}", f"row {row}")
        self.rejected.append({"table": table, "row": int(row), "field": name,
                              "value": text if text is None else text[:200], "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": self.examples, "rejected_rows": self.rejected}

    def summary(self) -> str:
        if not self.counts:
            return "catalog validation: no problems found"
        lines = ["catalog validation: repaired or skipped rows (first rows named):"]
        for kind, n in sorted(self.counts.items()):
            lines.append(f"  {kind}: {n}  e.g. {', '.join(self.examples.get(kind, []))}")
        return "\n".join(lines)


@dataclass
class Catalog:
    songs: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # directory that relative media paths resolve against
    report: ValidationReport = field(default_factory=ValidationReport)

    def media_path(self, rel: str | None) -> Path | None:
        if rel is None or (isinstance(rel, float) and np.isnan(rel)):
            return None
        p = Path(rel)
        return p if p.is_absolute() or self.root is None else self.root / p


def _clean_text(value: Any, table: str, row: int, name: str, report: ValidationReport) -> str | None:
    """Return valid UTF-8 text; bytes and lone surrogates are decoded/replaced and counted."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if not isinstance(value, (str, bytes)):
        raise SchemaError(f"{table} row {row}: field {name!r} = {value!r} is not text")
    text, repaired = repair_utf8(value)
    if repaired:
        report.add(f"{table}.{name}.invalid_utf8", f"row {row}")
    return text


def _as_list(value: Any, table: str, row: int, name: str, report: ValidationReport) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):  # CSV sources: "rock|indie"
        items = [v.strip() for v in value.split("|")] if value.strip() else []
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    else:
        raise SchemaError(f"{table} row {row}: field {name!r} = {value!r} is not a list of strings")
    out = []
    for item in items:
        text = _clean_text(item, table, row, name, report)
        if text:
            out.append(text)
    return out


def _check_columns(df: pd.DataFrame, table: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED[table] if c not in df.columns]
    if missing:
        raise SchemaError(
            f"{table}: missing required column(s) {missing}; found {list(df.columns)}. "
            f"Map source columns with catalog.column_map (e.g. --set catalog.column_map.{missing[0]}=<source column>)"
        )
    df = df.copy()
    for f in SCHEMAS[table]:
        if f.name not in df.columns:
            df[f.name] = None
    return df[[f.name for f in SCHEMAS[table]]].reset_index(drop=True)


def _bad_ids(df: pd.DataFrame, table: str, col: str, report: ValidationReport) -> np.ndarray:
    """Bool per row: an empty/non-string id, or a repeat of an id an earlier row has (the first one is kept)."""
    bad = np.zeros(len(df), dtype=bool)
    for row, v in enumerate(df[col]):
        if not isinstance(v, str) or not v.strip():
            report.reject(table, row, col, v, "not a non-empty string id")
            bad[row] = True
    dup = df[col].duplicated(keep="first").to_numpy() & ~bad
    if dup.any():  # each id's first row, found once (not one catalogue scan per duplicate)
        first_row = pd.Series(np.arange(len(df))).groupby(df[col].to_numpy(), dropna=False).transform("min")
        for row in np.flatnonzero(dup):
            report.reject(table, row, col, df[col].iloc[row], f"duplicate id (first at row {first_row[row]}, kept)")
    return bad | dup


def _ids_to_str(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Integer ids (common in CSV sources) become strings; anything else is left for _bad_ids to reject."""
    for col in cols:
        df[col] = [str(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v for v in df[col]]
    return df


def _cut(text: str | None, limit: int | None, where: str, report: ValidationReport, kind: str) -> str | None:
    """`text` cut to `limit` characters (counted in the report under `kind`); None/unlimited pass through."""
    if text is None or not limit or len(text) <= limit:
        return text
    report.add(kind, where)
    return text[:limit]


def _inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def validate_songs(songs: pd.DataFrame, report: ValidationReport, media_root: Path | None = None,
                   max_text_chars: int | None = None, media_roots: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Validated songs; text fields (and each list item) longer than `max_text_chars` are cut and counted
    (`catalog.max_text_chars`: a 1.2 MB lyrics field must not reach songs.parquet, prompts or the text encoder).

    Media paths must resolve (symlinks followed) inside `media_root` (the catalog directory) or one of
    `media_roots` (`catalog.media_roots`); any other path, `../../etc/passwd` included, is dropped and counted,
    so no later stage opens it."""
    df = _ids_to_str(_check_columns(songs, "songs"), ["song_id"])
    bad = _bad_ids(df, "songs", "song_id", report)
    for name in TEXT_FIELDS["songs"]:
        df[name] = [_cut(_clean_text(v, "songs", i, name, report), max_text_chars, f"row {i}", report,
                         f"songs.{name}.truncated") for i, v in enumerate(df[name])]
    for name in ("title", "artist"):
        for i, v in enumerate(df[name]):
            if (v is None or not v.strip()) and not bad[i]:
                report.reject("songs", i, name, v, "empty")
                bad[i] = True
    for name in LIST_FIELDS["songs"]:
        df[name] = [[_cut(t, max_text_chars, f"row {i}", report, f"songs.{name}.truncated")
                     for t in _as_list(v, "songs", i, name, report)] for i, v in enumerate(df[name])]
    dates = []
    for i, v in enumerate(df["release_date"]):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NaT:
            dates.append(None)
            continue
        try:
            dates.append(pd.Timestamp(v).date())
        except (ValueError, TypeError):
            dates.append(None)
            if not bad[i]:
                report.reject("songs", i, "release_date", v, "not a date")
                bad[i] = True
    df["release_date"] = dates
    roots = [Path(r).resolve() for r in ([media_root] if media_root is not None else []) + list(media_roots)]
    for name in ("audio_path", "cover_path"):
        paths = []
        for i, v in enumerate(df[name]):
            v = _clean_text(v, "songs", i, name, report)
            if v and media_root is not None:
                p = Path(v) if Path(v).is_absolute() else media_root / v
                if not _inside(p, roots):
                    report.add(f"songs.{name}.outside_media_roots", f"song {df.song_id[i]} ({v})")
                    v = None
                elif not p.is_file():
                    report.add(f"songs.{name}.missing_file", f"song {df.song_id[i]} ({v})")
                    v = None
            paths.append(v or None)
        df[name] = paths
    return df[~bad].reset_index(drop=True)


def validate_users(users: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    df = _ids_to_str(_check_columns(users, "users"), ["user_id"])
    bad = _bad_ids(df, "users", "user_id", report)
    df["country"] = [_clean_text(v, "users", i, "country", report) for i, v in enumerate(df["country"])]
    return df[~bad].reset_index(drop=True)


EPOCH_MS_FROM = 1e11  # a Unix time above this is in milliseconds (1e11 s is the year 5138)


def _parse_timestamps(values: pd.Series) -> pd.Series:
    """Datetimes, ISO strings, or Unix epoch numbers — seconds, or milliseconds above `EPOCH_MS_FROM` — whether
    stored as numbers or as digit strings (CSV logs read as text: "1704103200"); unparseable -> NaT."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True)
    numeric = pd.to_numeric(values, errors="coerce")
    is_num = numeric.notna()
    out = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")  # sub-second values fit; floored later
    if is_num.any():
        seconds = numeric[is_num].astype("float64")
        seconds = seconds.where(seconds.abs() < EPOCH_MS_FROM, seconds / 1000.0)
        out[is_num] = pd.to_datetime(seconds, unit="s", utc=True)
    rest = ~is_num & values.notna()
    if rest.any():
        out[rest] = pd.to_datetime(values[rest].astype(str), utc=True, errors="coerce", format="mixed")
    return out


def validate_interactions(
    inter: pd.DataFrame, song_ids: set[str], user_ids: set[str], report: ValidationReport
) -> pd.DataFrame:
    df = _ids_to_str(_check_columns(inter, "interactions"), ["user_id", "song_id"])
    ts = _parse_timestamps(df["timestamp"])
    keep = ts.notna().to_numpy().copy()
    for i in np.flatnonzero(~keep):
        report.reject("interactions", i, "timestamp", df["timestamp"][i],
                      "not a timestamp (ISO 8601 or Unix epoch; a log without time: catalog.time_axis=false)")
    df["timestamp"] = ts.dt.floor("s")
    pc = pd.to_numeric(df["play_count"].fillna(1), errors="coerce")
    for i in np.flatnonzero((pc.isna() | (pc < 1)).to_numpy()):
        report.add("interactions.bad_play_count", f"row {i} ({df['play_count'][i]!r})")
        keep[i] = False
    df["play_count"] = pc.fillna(1).clip(lower=1).astype("int64")
    known_song = df["song_id"].isin(song_ids).to_numpy()
    known_user = df["user_id"].isin(user_ids).to_numpy()
    for i in np.flatnonzero(~known_song):
        report.add("interactions.unknown_song", f"row {i} (song_id {df['song_id'][i]!r})")
    for i in np.flatnonzero(~known_user):
        report.add("interactions.unknown_user", f"row {i} (user_id {df['user_id'][i]!r})")
    keep &= known_song & known_user
    df["duration_s"] = pd.to_numeric(df["duration_s"], errors="coerce")
    df["event"] = [v if isinstance(v, str) and v in EVENTS else "play" for v in df["event"]]
    return df[keep].sort_values(["timestamp", "user_id", "song_id"], kind="stable").reset_index(drop=True)


def validate_catalog(
    songs: pd.DataFrame, users: pd.DataFrame, interactions: pd.DataFrame, media_root: Path | None = None,
    max_text_chars: int | None = None, media_roots: Sequence[str | Path] = (), strict: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, ValidationReport]:
    """Validated tables and the report. A bad row (empty or duplicate id, empty title or artist, a date or
    timestamp that does not parse) is left out and listed in `report.rejected`; with `strict` (`catalog.strict`)
    any such row rejects the whole catalog, and the error gives their number and names the first 20."""
    report = ValidationReport()
    songs = validate_songs(songs, report, media_root, max_text_chars, media_roots)
    users = validate_users(users, report)
    interactions = validate_interactions(interactions, set(songs.song_id), set(users.user_id), report)
    if strict and report.rejected:
        shown = "; ".join(f"{r['table']} row {r['row']} {r['field']}={r['value']!r}: {r['reason']}"
                          for r in report.rejected[:20])
        more = f" (and {len(report.rejected) - 20} more)" if len(report.rejected) > 20 else ""
        raise SchemaError(f"catalog.strict: {len(report.rejected)} bad row(s): {shown}{more}")
    return songs, users, interactions, report


def _to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df[[f.name for f in schema]], schema=schema, preserve_index=False)


def save_catalog(catalog: Catalog, directory: str | Path) -> Path:
    """Write songs/users/interactions Parquet + meta.json + validation.json atomically into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, df in (("songs", catalog.songs), ("users", catalog.users), ("interactions", catalog.interactions)):
        with atomic_path(directory / f"{name}.parquet") as tmp:
            pq.write_table(_to_table(df, SCHEMAS[name]), tmp)
    atomic_write_json(directory / "validation.json", catalog.report.to_dict())
    atomic_write_json(directory / "meta.json", catalog.meta)
    return directory


def load_catalog(directory: str | Path, validate: bool = True) -> Catalog:
    directory = Path(directory)
    tables = {}
    for name in ("songs", "users", "interactions"):
        path = directory / f"{name}.parquet"
        if not path.is_file():
            raise MissingArtefactError(f"{path} is missing; run `llmrec prepare --run-dir {directory.parent}` first")
        tables[name] = pq.read_table(path).to_pandas()
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if validate:
        # The media roots the catalog was confined to when it was prepared (its source directory, for a table
        # catalog whose media stay there), besides the catalog's own directory.
        songs, users, inter, report = validate_catalog(tables["songs"], tables["users"], tables["interactions"],
                                                       directory, media_roots=meta.get("media_roots", ()))
    else:
        songs, users, inter, report = tables["songs"], tables["users"], tables["interactions"], ValidationReport()
    return Catalog(songs, users, inter, meta=meta, root=directory, report=report)


def split_time(catalog: Catalog) -> pd.Timestamp | None:
    """The temporal split time recorded by the catalog's source, if any (synthetic catalogs record one)."""
    value = catalog.meta.get("split_time")
    return pd.Timestamp(value) if value else None


def to_date(value: str | dt.date) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(value)


SONG_ATTRIBUTES_FILE = "song_attributes.parquet"


def load_song_attributes(catalog_dir: str | Path) -> pd.DataFrame | None:
    """The synthetic catalog's ground truth per song (`SONG_ATTRIBUTES_FILE`: genre, instrument, tempo_class, mood,
    mode, ...); None for real catalogs, which have no latent attributes."""
    path = Path(catalog_dir) / SONG_ATTRIBUTES_FILE
    return pd.read_parquet(path) if path.is_file() else None
