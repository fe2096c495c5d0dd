"""hetrec2011-lastfm-2k (Last.fm, HetRec 2011): 1,892 users, 17,632 artists, 92,834 user-artist play counts.

Mapping onto the catalog schema — read this before comparing numbers with the synthetic catalog:

* Items are ARTISTS, not songs: `song_id = "a<artistID>"`, `title = artist = name`. There is no audio, cover art
  or lyrics (media paths are null), so every content model sees text only: the name and the tags users assigned.
* `tags` = the artist's most-assigned tag names (most users first, up to `MAX_TAGS`), `genres` = the top
  `MAX_GENRES` of them. `tags.dat` is Latin-1; it goes through the same UTF-8-else-Latin-1 reader as the generic
  adapter, so the lines that needed Latin-1 are counted in the validation report.
* Interactions are `user_artists.dat`; `play_count` = its `weight` (total plays of that artist by that user).
* Timestamps: play counts carry none. An interaction gets the date of the user's earliest tag assignment of that
  artist (day/month/year) where one exists (about a fifth of the pairs); every other pair gets the dataset's last
  tag date. Dates before 2002 (Last.fm did not exist; a few rows say 1956) are ignored as corrupt. Because most
  timestamps are the same placeholder, a temporal split of this dataset is meaningless: `meta["time_axis"]` is
  False and the evaluation uses `item_holdout_split` for it (see llmrec/split.py).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pandas as pd

from data_prep.adapters.table import decode_text, expand_path, merge_reports
from llmrec.config import CatalogConfig
from llmrec.schema import Catalog, SchemaError, ValidationReport, validate_catalog

ENV_VAR = "LLMREC_LASTFM_DIR"
FILES = ("artists.dat", "tags.dat", "user_artists.dat", "user_taggedartists.dat")
MAX_TAGS = 10
MAX_GENRES = 3
FIRST_VALID_YEAR = 2002  # Last.fm's launch; earlier tag dates are data errors


def default_dir() -> Path:
    """`$LLMREC_LASTFM_DIR`, else `../shared/datasets/lastfm-2k` next to the repository root."""
    if os.environ.get(ENV_VAR):
        return expand_path(os.environ[ENV_VAR])
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "datasets" / "lastfm-2k"


def resolve_dir(cfg: CatalogConfig) -> Path:
    root = expand_path(cfg.path) if cfg.path else default_dir()
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        raise SchemaError(
            f"lastfm-2k directory {root} lacks {missing}; set catalog.path or ${ENV_VAR} to the unpacked "
            "hetrec2011-lastfm-2k folder"
        )
    return root


def read_dat(path: Path, report: ValidationReport) -> pd.DataFrame:
    """A tab-separated .dat file; QUOTE_NONE because artist names contain stray double quotes."""
    text = decode_text(path.read_bytes(), path.name, report)
    return pd.read_csv(io.StringIO(text), sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)


def tag_dates(tagged: pd.DataFrame) -> pd.Series:
    """Date of each tag assignment (UTC midnight); NaT for impossible or pre-Last.fm dates."""
    parts = tagged[["year", "month", "day"]].apply(pd.to_numeric, errors="coerce")
    dates = pd.to_datetime(parts, errors="coerce", utc=True)
    return dates.where(parts["year"] >= FIRST_VALID_YEAR)


def artist_tags(tagged: pd.DataFrame, tags: pd.DataFrame) -> dict[str, list[str]]:
    """artistID -> tag names, most users first (ties: lower tagID first, for determinism)."""
    names = dict(zip(tags["tagID"], tags["tagValue"].str.strip()))
    counts = tagged.groupby(["artistID", "tagID"]).size().rename("n").reset_index()
    counts["tag_num"] = pd.to_numeric(counts["tagID"], errors="coerce")
    counts = counts.sort_values(["artistID", "n", "tag_num"], ascending=[True, False, True], kind="stable")
    out: dict[str, list[str]] = {}
    for artist, group in counts.groupby("artistID", sort=False):
        picked = [names[t] for t in group["tagID"] if names.get(t)]
        out[artist] = list(dict.fromkeys(picked))[:MAX_TAGS]  # de-duplicate names that differ only by tagID
    return out


def build_songs(artists: pd.DataFrame, tags_by_artist: dict[str, list[str]]) -> pd.DataFrame:
    names = [n.strip() or f"artist {i}" for i, n in zip(artists["id"], artists["name"])]
    tag_lists = [tags_by_artist.get(i, []) for i in artists["id"]]
    return pd.DataFrame({
        "song_id": "a" + artists["id"],
        "title": names,
        "artist": names,
        "genres": [t[:MAX_GENRES] for t in tag_lists],
        "tags": tag_lists,
        "comments": [[] for _ in names],
        "audio_path": None,  # text-only dataset: no media of any kind
        "cover_path": None,
    })


def build_interactions(plays: pd.DataFrame, tagged: pd.DataFrame) -> tuple[pd.DataFrame, pd.Timestamp, int]:
    """user_artists rows with a timestamp each (see the module docstring); also the fallback date and how many
    rows got a real date."""
    tagged = tagged.assign(date=tag_dates(tagged)).dropna(subset=["date"])
    last_date = tagged["date"].max()
    first = tagged.groupby(["userID", "artistID"])["date"].min().rename("first_tag").reset_index()
    rows = plays.merge(first, on=["userID", "artistID"], how="left")
    dated = int(rows["first_tag"].notna().sum())
    inter = pd.DataFrame({
        "user_id": "u" + rows["userID"],
        "song_id": "a" + rows["artistID"],
        "timestamp": rows["first_tag"].fillna(last_date),
        "play_count": pd.to_numeric(rows["weight"], errors="coerce"),
        "event": "play",
    })
    return inter, last_date, dated


def load_lastfm_catalog(cfg: CatalogConfig) -> Catalog:
    root = resolve_dir(cfg)
    report = ValidationReport()
    artists, tags, plays, tagged = (read_dat(root / name, report) for name in FILES)
    songs = build_songs(artists, artist_tags(tagged, tags))
    inter, last_date, dated = build_interactions(plays, tagged)
    users = pd.DataFrame({"user_id": "u" + pd.Series(pd.unique(plays["userID"]))})
    songs, users, inter, vreport = validate_catalog(songs, users, inter, media_root=None,
                                                 max_text_chars=cfg.max_text_chars, strict=cfg.strict)
    merge_reports(report, vreport)
    meta = {
        "source": "lastfm",
        "dataset": "hetrec2011-lastfm-2k",
        "path": str(root),
        "item_kind": "artist",
        "modalities": ["text"],
        "split_time": None,  # no temporal split: see time_axis
        "time_axis": False,
        "timestamps": (f"{dated} of {len(inter)} interactions dated by the user's first tag of the artist; "
                       f"the rest set to the last tag date {last_date.date()}"),
    }
    return Catalog(songs, users, inter, meta=meta, root=root, report=report)
