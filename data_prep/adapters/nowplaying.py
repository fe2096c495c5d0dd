"""nowplaying-rs2020 (#nowplaying tweets, RecSys 2020 release): 18,310 users, 15,753 songs, 395,056 listening events.

Mapping onto the catalog schema (see ../shared/datasets/nowplaying-rs2020/PROVENANCE.md for the data itself):

* Items are SONGS: `song_id = "t<track_id>"`, `title = track`, `artist = artist` from `track_ids.csv`. There are no
  genres, tags, lyrics, audio or covers: every content model sees the title and the artist only.
* Interactions are `inter.csv` (`user_id,track_id`, one row per event): repeated pairs are summed into
  `play_count`.
* No timestamps, and rows are not in time order: `meta["time_axis"]` is False, every interaction carries one
  placeholder date, and the evaluation uses `item_holdout_split` (random songs held out entirely, plus a random
  share of each user's other plays), as for lastfm-2k.

Both files are decoded as UTF-8 line by line through the generic adapter's reader (curly apostrophes, Korean and
Japanese titles); a line that is not UTF-8 is counted in the validation report.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from data_prep.adapters.table import decode_text, expand_path, merge_reports
from llmrec.config import CatalogConfig
from llmrec.schema import Catalog, SchemaError, ValidationReport, validate_catalog

ENV_VAR = "LLMREC_NOWPLAYING_DIR"
FILES = ("inter.csv", "track_ids.csv")
PLACEHOLDER_DATE = pd.Timestamp("2019-01-01", tz="UTC")  # the dataset's tweets span 2018-2019; no per-event time


def default_dir() -> Path:
    """`$LLMREC_NOWPLAYING_DIR`, else `../shared/datasets/nowplaying-rs2020` next to the repository root."""
    if os.environ.get(ENV_VAR):
        return expand_path(os.environ[ENV_VAR])
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "nowplaying-rs2020"


def resolve_dir(cfg: CatalogConfig) -> Path:
    root = expand_path(cfg.path) if cfg.path else default_dir()
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        raise SchemaError(f"nowplaying-rs2020 directory {root} lacks {missing}; set catalog.path or ${ENV_VAR} to "
                          "the folder holding inter.csv and track_ids.csv")
    return root


def read_csv(path: Path, report: ValidationReport) -> pd.DataFrame:
    text = decode_text(path.read_bytes(), path.name, report)
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


def build_songs(tracks: pd.DataFrame) -> pd.DataFrame:
    tracks = tracks.drop_duplicates("track_id")
    return pd.DataFrame({
        "song_id": "t" + tracks["track_id"].str.strip(),
        "title": tracks["track"].str.strip(),
        "artist": tracks["artist"].str.strip(),
        "genres": [[] for _ in range(len(tracks))],
        "tags": [[] for _ in range(len(tracks))],
        "comments": [[] for _ in range(len(tracks))],
        "audio_path": None,  # title/artist-only dataset: no media of any kind
        "cover_path": None,
    })


def build_interactions(events: pd.DataFrame) -> pd.DataFrame:
    counts = events.groupby(["user_id", "track_id"], sort=False).size().rename("play_count").reset_index()
    return pd.DataFrame({
        "user_id": "u" + counts["user_id"].str.strip(),
        "song_id": "t" + counts["track_id"].str.strip(),
        "timestamp": PLACEHOLDER_DATE,
        "play_count": counts["play_count"].astype(float),
        "event": "play",
    })


def load_nowplaying_catalog(cfg: CatalogConfig) -> Catalog:
    root = resolve_dir(cfg)
    report = ValidationReport()
    events, tracks = (read_csv(root / name, report) for name in FILES)
    for name, frame, cols in (("inter.csv", events, {"user_id", "track_id"}),
                              ("track_ids.csv", tracks, {"track_id", "artist", "track"})):
        if not cols <= set(frame.columns):
            raise SchemaError(f"{root / name}: expected columns {sorted(cols)}, found {list(frame.columns)}")
    songs = build_songs(tracks)
    inter = build_interactions(events)
    users = pd.DataFrame({"user_id": pd.unique(inter["user_id"])})
    songs, users, inter, vreport = validate_catalog(songs, users, inter, media_root=None,
                                                 max_text_chars=cfg.max_text_chars, strict=cfg.strict)
    merge_reports(report, vreport)
    meta = {
        "source": "nowplaying",
        "dataset": "nowplaying-rs2020",
        "path": str(root),
        "item_kind": "song",
        "modalities": ["text"],
        "split_time": None,
        "time_axis": False,
        "timestamps": f"none in the source: every interaction carries the placeholder {PLACEHOLDER_DATE.date()}",
    }
    return Catalog(songs, users, inter, meta=meta, root=root, report=report)
