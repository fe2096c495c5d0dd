"""Catalog validation: each kind of bad row -> its error or a counted, named skip."""
from __future__ import annotations

import pandas as pd
import pytest

from llmrec.schema import Catalog, SchemaError, load_catalog, save_catalog, validate_catalog


def good_tables():
    songs = pd.DataFrame(
        {
            "song_id": ["a", "b", "c"],
            "title": ["A", "B", "C"],
            "artist": ["X", "Y", "X"],
            "genres": [["rock"], "pop|indie", None],
            "lyrics": ["la la", None, "ok"],
            "comments": [["nice"], [], None],
            "release_date": ["2020-01-02", None, "2021-05-06"],
        }
    )
    users = pd.DataFrame({"user_id": ["u1", "u2"]})
    inter = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1"],
            "song_id": ["a", "b", "c"],
            "timestamp": ["2026-01-02T10:00:00Z", "2026-01-01T09:00:00Z", 1767225600],
            "play_count": [1, 3, 2],
        }
    )
    return songs, users, inter


def test_good_tables_validate_and_normalise():
    songs, users, inter, report = validate_catalog(*good_tables())
    assert not report.counts
    assert songs.genres.tolist() == [["rock"], ["pop", "indie"], []]
    assert songs.comments.tolist() == [["nice"], [], []]
    assert inter.timestamp.is_monotonic_increasing and str(inter.timestamp.dt.tz) == "UTC"
    assert list(inter.columns) == ["user_id", "song_id", "timestamp", "play_count", "duration_s", "event"]
    assert set(inter.event) == {"play"}


def test_missing_column_names_the_column_and_how_to_map_it():
    songs, users, inter = good_tables()
    with pytest.raises(SchemaError, match=r"songs: missing required column\(s\) \['artist'\].*column_map"):
        validate_catalog(songs.drop(columns=["artist"]), users, inter)


def test_wrong_type_names_row_and_field():
    songs, users, inter = good_tables()
    songs["title"] = songs["title"].astype(object)
    songs.loc[1, "title"] = 42
    with pytest.raises(SchemaError, match=r"songs row 1: field 'title' = 42 is not text"):
        validate_catalog(songs, users, inter)


def bad_row_tables():
    """One of each bad row: a bad date, a duplicate id, a whitespace-only title, an empty user id, a bad timestamp."""
    songs, users, inter = good_tables()
    songs = pd.concat([songs, pd.DataFrame({"song_id": ["d", "a", "e"], "title": ["D", "A again", "  "],
                                            "artist": ["X", "X", "Y"], "release_date": ["31/31/2024", None, None]})],
                      ignore_index=True)
    users = pd.DataFrame({"user_id": ["u1", "u2", " "]})
    inter = inter.astype({"timestamp": object})
    inter.loc[2, "timestamp"] = "yesterday"
    return songs, users, inter


def test_bad_rows_are_left_out_counted_and_every_one_listed():
    """#21: one bad row no longer rejects the whole catalog; each is a counted skip, listed with its field, value
    and reason."""
    songs, users, inter = bad_row_tables()
    s, u, i, report = validate_catalog(songs, users, inter)
    assert list(s.song_id) == ["a", "b", "c"] and list(u.user_id) == ["u1", "u2"] and len(i) == 2
    rows = {(r["table"], r["row"], r["field"]): r for r in report.rejected}
    assert set(rows) == {("songs", 3, "release_date"), ("songs", 4, "song_id"), ("songs", 5, "title"),
                         ("users", 2, "user_id"), ("interactions", 2, "timestamp")}
    assert rows[("songs", 3, "release_date")]["value"] == "31/31/2024"
    assert "duplicate id (first at row 0, kept)" in rows[("songs", 4, "song_id")]["reason"]
    assert "catalog.time_axis=false" in rows[("interactions", 2, "timestamp")]["reason"]
    assert report.counts["songs.rejected.title"] == 1 and report.to_dict()["rejected_rows"] == report.rejected


def test_strict_rejects_the_catalog_and_lists_every_bad_row():
    songs, users, inter = bad_row_tables()
    with pytest.raises(SchemaError, match=r"catalog.strict: 5 bad row\(s\)") as e:
        validate_catalog(songs, users, inter, strict=True)
    for part in ("songs row 3 release_date='31/31/2024'", "songs row 4 song_id='a'", "songs row 5 title=",
                 "users row 2 user_id=' '", "interactions row 2 timestamp='yesterday'"):
        assert part in str(e.value), part


def test_unknown_ids_and_bad_counts_are_skipped_counted_and_named():
    songs, users, inter = good_tables()
    inter = pd.concat([inter, pd.DataFrame({"user_id": ["u1", "ghost", "u2"], "song_id": ["zzz", "a", "a"],
                                            "timestamp": ["2026-01-03"] * 3, "play_count": [1, 1, 0]})],
                      ignore_index=True)
    _, _, out, report = validate_catalog(songs, users, inter)
    assert len(out) == 3
    assert report.counts["interactions.unknown_song"] == 1
    assert report.counts["interactions.unknown_user"] == 1
    assert report.counts["interactions.bad_play_count"] == 1
    assert report.examples["interactions.unknown_song"] == ["row 3 (song_id 'zzz')"]
    assert "unknown_user: 1" in report.summary()


def test_invalid_utf8_is_replaced_and_counted():
    songs, users, inter = good_tables()
    songs["lyrics"] = songs["lyrics"].astype(object)
    songs.at[0, "lyrics"] = b"caf\xe9 \xff"
    songs.at[1, "comments"] = ["ok", "bad \udcff surrogate"]
    out, _, _, report = validate_catalog(songs, users, inter)
    assert out.lyrics[0] == "caf\ufffd \ufffd"
    assert out.comments[1] == ["ok", "bad \ufffd surrogate"]  # the same replacement character as for bytes
    assert report.counts["songs.lyrics.invalid_utf8"] == 1
    assert report.counts["songs.comments.invalid_utf8"] == 1
    out.comments[1][1].encode("utf-8")  # valid UTF-8 now


def test_missing_media_marks_the_modality_missing(tmp_path):
    songs, users, inter = good_tables()
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    songs["audio_path"] = ["a.wav", "missing.wav", None]
    out, _, _, report = validate_catalog(songs, users, inter, media_root=tmp_path)
    assert out.audio_path[0] == "a.wav" and pd.isna(out.audio_path[1])
    assert report.counts["songs.audio_path.missing_file"] == 1
    assert report.examples["songs.audio_path.missing_file"] == ["song b (missing.wav)"]


def test_save_and_load_round_trip(tmp_path):
    songs, users, inter, report = validate_catalog(*good_tables())
    save_catalog(Catalog(songs, users, inter, meta={"source": "test"}, report=report), tmp_path)
    back = load_catalog(tmp_path)
    assert back.meta == {"source": "test"}
    assert back.songs.song_id.tolist() == ["a", "b", "c"]
    assert back.songs.genres.tolist() == [["rock"], ["pop", "indie"], []]
    assert back.interactions.timestamp.tolist() == inter.timestamp.tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_load_missing_catalog_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="llmrec prepare"):
        load_catalog(tmp_path / "catalog")
