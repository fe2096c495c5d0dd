"""Catalog adapters: the generic table loader (column map, encodings, errors) and the lastfm-2k loader."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from data_prep.adapters import SOURCES, load_source
from data_prep.adapters.lastfm import default_dir
from data_prep.prepare import build_catalog
from llmrec.config import load_config
from llmrec.io import open_run_dir
from llmrec.schema import SchemaError, load_catalog

LASTFM = default_dir()


def write_table_dir(d: Path) -> Path:
    """A tiny catalog with source-specific column names and a Latin-1 songs file."""
    d.mkdir(parents=True, exist_ok=True)
    songs = "track,name,band,style\nt1,Café del Mar,Énergie,chillout|ambient\nt2,Plain,Band B,rock\n"
    (d / "songs.csv").write_bytes(songs.encode("latin-1"))
    (d / "users.jsonl").write_text(json.dumps({"uid": "x"}) + "\n" + json.dumps({"uid": "y"}) + "\n")
    pd.DataFrame({"uid": ["x", "x", "y"], "track": ["t1", "t2", "t2"],
                  "played_at": ["2024-01-01T10:00:00Z", "2024-01-02T10:00:00Z", "2024-01-03T10:00:00Z"],
                  "plays": [3, 1, 2]}).to_parquet(d / "interactions.parquet")
    return d


COLUMN_MAP = {"song_id": "track", "title": "name", "artist": "band", "genres": "style", "user_id": "uid",
              "interactions.timestamp": "played_at", "interactions.play_count": "plays"}


def table_config(path: Path, column_map=COLUMN_MAP):
    cfg = load_config(overrides=["catalog.source=table"])
    cfg.catalog.path = str(path)
    cfg.catalog.column_map = dict(column_map)
    return cfg


def test_table_adapter_maps_columns_and_decodes_latin1(tmp_path):
    cat = load_source(table_config(write_table_dir(tmp_path / "src")))
    songs = cat.songs.set_index("song_id")
    assert songs.loc["t1", "title"] == "Café del Mar" and songs.loc["t1", "artist"] == "Énergie"
    assert list(songs.loc["t1", "genres"]) == ["chillout", "ambient"]  # "a|b" becomes a list
    assert sorted(cat.users.user_id) == ["x", "y"]
    assert list(cat.interactions.play_count) == [3, 1, 2]
    assert cat.interactions.timestamp.iloc[0] == pd.Timestamp("2024-01-01T10:00:00Z")
    # The one line with Latin-1 bytes is counted, not dropped.
    assert cat.report.counts["songs.decoded_as_latin1"] == 1


def test_table_adapter_expands_env_vars_and_derives_users(tmp_path, monkeypatch):
    src = write_table_dir(tmp_path / "src")
    (src / "users.jsonl").unlink()
    monkeypatch.setenv("MY_CATALOG_DIR", str(tmp_path))
    cat = load_source(table_config("$MY_CATALOG_DIR/src"))
    assert sorted(cat.users.user_id) == ["x", "y"]
    assert cat.report.counts["users.derived_from_interactions"] == 2


def test_mapped_column_missing_from_file_is_named(tmp_path):
    src = write_table_dir(tmp_path / "src")
    with pytest.raises(SchemaError, match=r"'song_title'.*not in the file"):
        load_source(table_config(src, {**COLUMN_MAP, "title": "song_title"}))


def test_required_column_missing_is_named(tmp_path):
    src = write_table_dir(tmp_path / "src")
    no_artist = {k: v for k, v in COLUMN_MAP.items() if k != "artist"}
    with pytest.raises(SchemaError, match=r"songs: missing required column\(s\) \['artist'\]"):
        load_source(table_config(src, no_artist))


def test_missing_table_file_is_named(tmp_path):
    src = write_table_dir(tmp_path / "src")
    (src / "interactions.parquet").unlink()
    with pytest.raises(SchemaError, match="no interactions file"):
        load_source(table_config(src))


def test_prepare_saves_a_table_catalog_into_the_run_dir(tmp_path, capsys):
    cfg = table_config(write_table_dir(tmp_path / "src"))
    run = open_run_dir(tmp_path / "run")
    out = build_catalog(cfg, run, progress=False)
    assert out["songs"] == 2 and out["interactions"] == 3
    assert "songs.decoded_as_latin1: 1" in capsys.readouterr().out
    assert len(load_catalog(run.catalog).songs) == 2


def test_sources_are_all_dispatched():
    assert set(SOURCES) == {"synthetic", "table", "lastfm", "nowplaying"}
    cfg = load_config(overrides=["catalog.source=nope"])
    with pytest.raises(ValueError, match="catalog.source 'nope' is not supported"):
        load_source(cfg)


@pytest.fixture(scope="module")
def lastfm_catalog():
    if not (LASTFM / "user_artists.dat").is_file():
        pytest.skip(f"lastfm-2k not found at {LASTFM}")
    return load_source(load_config(overrides=["catalog.source=lastfm"]))


def test_lastfm_counts_and_mapping(lastfm_catalog):
    cat = lastfm_catalog
    assert (len(cat.users), len(cat.songs), len(cat.interactions)) == (1892, 17632, 92834)
    assert cat.meta["item_kind"] == "artist" and cat.meta["time_axis"] is False
    first = cat.songs.set_index("song_id").loc["a1"]
    assert first["title"] == first["artist"] == "MALICE MIZER"
    assert first["audio_path"] is None and first["cover_path"] is None
    assert list(first["tags"][:2]) == ["j-rock", "visual kei"]  # the most-assigned tags come first
    # tags.dat is Latin-1: those lines are counted, and decoded as text rather than dropped.
    assert cat.report.counts["tags.dat.decoded_as_latin1"] > 0
    # play_count is user_artists' weight; user 2 played artist 51 13883 times.
    row = cat.interactions[(cat.interactions.user_id == "u2") & (cat.interactions.song_id == "a51")]
    assert int(row.play_count.iloc[0]) == 13883


def test_lastfm_timestamps_from_first_tag_else_last_date(lastfm_catalog):
    inter = lastfm_catalog.interactions
    # user 2 tagged artist 52 on 1 April 2009 (user_taggedartists.dat); 51 was never tagged by them.
    tagged = inter[(inter.user_id == "u2") & (inter.song_id == "a52")].timestamp.iloc[0]
    assert tagged == pd.Timestamp("2009-04-01", tz="UTC")
    untagged = inter[(inter.user_id == "u2") & (inter.song_id == "a51")].timestamp.iloc[0]
    assert untagged == inter.timestamp.max()
    assert inter.timestamp.min().year >= 2002  # the corrupt 1956 rows are ignored


def test_lastfm_missing_dir_is_a_clear_error(tmp_path):
    cfg = load_config(overrides=["catalog.source=lastfm", f"catalog.path={tmp_path}"])
    with pytest.raises(SchemaError, match="lacks .*artists.dat"):
        load_source(cfg)


# ------------------------------------------------------------------------------------------------ nowplaying-rs2020


def write_nowplaying(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "track_ids.csv").write_text(
        'track_id,track_artist,artist,track\n'
        '0,DNA.;Kendrick Lamar,Kendrick Lamar,DNA.\n'
        '1,"Love, Again;Ax",Ax,"Love, Again"\n'
        '2,봄날;BTS,BTS,봄날\n', encoding="utf-8")
    (root / "inter.csv").write_text("user_id,track_id\n7,0\n7,0\n7,1\n8,2\n8,0\n", encoding="utf-8")
    return root


def test_nowplaying_maps_songs_and_sums_repeated_events(tmp_path):
    root = write_nowplaying(tmp_path / "np")
    cat = load_source(load_config(overrides=["catalog.source=nowplaying", f"catalog.path={root}"]))
    songs = cat.songs.set_index("song_id")
    assert songs.loc["t1", "title"] == "Love, Again" and songs.loc["t2", "title"] == "봄날"
    assert songs.loc["t2", "artist"] == "BTS" and list(songs.loc["t0", "genres"]) == []
    inter = cat.interactions.set_index(["user_id", "song_id"])
    assert inter.loc[("u7", "t0"), "play_count"] == 2 and len(cat.interactions) == 4
    assert cat.meta["time_axis"] is False and cat.meta["item_kind"] == "song"
    from llmrec.split import split_catalog

    assert split_catalog(cat).kind == "item_holdout"  # no time axis: songs and plays are held out at random


def test_max_songs_keeps_the_most_listened_songs_their_plays_and_listeners(tmp_path):
    root = write_nowplaying(tmp_path / "np")
    with (root / "inter.csv").open("a") as f:
        f.write("9,2\n")  # t2 now has two listeners (u8, u9), t1 one (u7)
    cfg = load_config(overrides=["catalog.source=nowplaying", f"catalog.path={root}", "catalog.max_songs=2"])
    run = open_run_dir(tmp_path / "run")
    build_catalog(cfg, run, progress=False)
    cat = load_catalog(run.catalog)
    assert sorted(cat.songs["song_id"]) == ["t0", "t2"]
    assert set(cat.interactions["song_id"]) == {"t0", "t2"} and len(cat.interactions) == 4  # u7-t0, u8-t0/t2, u9-t2
    assert sorted(cat.users["user_id"]) == ["u7", "u8", "u9"]  # u7 keeps t0; nobody is left without plays
    subset = json.loads((run.catalog / "meta.json").read_text())["subset"]
    assert subset["songs"] == [3, 2] and subset["interactions"] == [5, 4]


def test_max_songs_drops_a_listener_left_without_plays_and_breaks_ties_by_id(tmp_path):
    root = write_nowplaying(tmp_path / "np")  # t0: u7, u8; t1: u7; t2: u8
    with (root / "inter.csv").open("a") as f:
        f.write("9,1\n")  # u9 plays t1 only
    one = load_source(load_config(overrides=["catalog.source=nowplaying", f"catalog.path={root}",
                                             "catalog.max_songs=1"]))
    assert list(one.songs["song_id"]) == ["t0"] and "u9" not in set(one.users["user_id"])
    root2 = write_nowplaying(tmp_path / "np2")
    tie = load_source(load_config(overrides=["catalog.source=nowplaying", f"catalog.path={root2}",
                                             "catalog.max_songs=2"]))
    assert sorted(tie.songs["song_id"]) == ["t0", "t1"]  # t1 and t2 have one listener each: the smaller id stays


def test_nowplaying_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SchemaError, match="LLMREC_NOWPLAYING_DIR"):
        load_source(load_config(overrides=["catalog.source=nowplaying", f"catalog.path={tmp_path}"]))


@pytest.mark.skipif(not (Path(__file__).resolve().parents[3] / "shared" / "datasets" / "nowplaying-rs2020").is_dir(),
                    reason="../shared/datasets/nowplaying-rs2020 is not beside the repository")
def test_nowplaying_real_counts_match_its_provenance():
    cat = load_source(load_config(overrides=["catalog.source=nowplaying"]))
    assert (len(cat.songs), len(cat.users), len(cat.interactions)) == (15753, 18310, 333550)
    assert int(cat.interactions["play_count"].sum()) == 395056


def test_missing_media_file_is_a_counted_skip_not_a_crash(tmp_path):
    """Defect (pandas >= 3): a songs table whose audio_path names a missing file crashed `absolutise_media` with a
    TypeError, because the validator's None became NaN in a string column."""
    d = write_table_dir(tmp_path / "src")
    (d / "cover.png").write_bytes(b"\x89PNG stand-in")
    songs = pd.DataFrame({"track": ["t1", "t2"], "name": ["A", "B"], "band": ["X", "Y"], "style": ["rock", "pop"],
                          "audio_path": ["missing.wav", None], "cover_path": [None, "cover.png"]})
    (d / "songs.csv").unlink()
    songs.to_csv(d / "songs.csv", index=False)
    cat = load_source(table_config(d))
    rows = cat.songs.set_index("song_id")
    assert rows.loc["t1", "audio_path"] is None or pd.isna(rows.loc["t1", "audio_path"])
    assert str(rows.loc["t2", "cover_path"]).endswith("cover.png") and Path(rows.loc["t2", "cover_path"]).is_absolute()


def test_max_text_chars_cuts_and_counts_huge_fields(tmp_path):
    """Defect: `catalog.max_text_chars` was read nowhere, so a 1.2 MB lyrics field reached songs.parquet verbatim."""
    d = write_table_dir(tmp_path / "src")
    songs = pd.DataFrame({"track": ["t1", "t2"], "name": ["A", "B"], "band": ["X", "Y"], "style": ["rock", "pop"],
                          "lyrics": ["la " * 400_000, "short"], "comments": ["ok|" + "spam" * 10_000, "fine"]})
    (d / "songs.csv").unlink()
    songs.to_csv(d / "songs.csv", index=False)
    cfg = table_config(d)
    cfg.catalog.max_text_chars = 5000
    cat = load_source(cfg)
    rows = cat.songs.set_index("song_id")
    assert len(rows.loc["t1", "lyrics"]) == 5000 and rows.loc["t2", "lyrics"] == "short"
    assert [len(c) for c in rows.loc["t1", "comments"]] == [2, 5000]
    assert cat.report.counts["songs.lyrics.truncated"] == 1 and cat.report.counts["songs.comments.truncated"] == 1


def test_one_invalid_utf8_line_leaves_every_other_line_utf8(tmp_path):
    """Defect: one Latin-1 line made the whole songs.csv decode as Latin-1, garbling CJK and emoji titles."""
    d = write_table_dir(tmp_path / "src")
    text = ("track,name,band,style\n".encode() + "t1,봄날,BTS,k-pop\n".encode("utf-8")
            + "t2,Café,Énergie,chillout\n".encode("latin-1") + "t3,夜に駆ける 🌙,YOASOBI,j-pop\n".encode("utf-8"))
    (d / "songs.csv").write_bytes(text)
    pd.DataFrame({"uid": ["x"], "track": ["t1"], "played_at": ["2024-01-01T10:00:00Z"],
                  "plays": [1]}).to_parquet(d / "interactions.parquet")
    cat = load_source(table_config(d))
    titles = cat.songs.set_index("song_id")["title"]
    assert titles["t1"] == "봄날" and titles["t3"] == "夜に駆ける 🌙" and titles["t2"] == "Café"
    assert cat.report.counts["songs.decoded_as_latin1"] == 1


def test_media_paths_outside_the_catalog_directory_are_dropped_and_counted(tmp_path):
    """Defect: `../../../../etc/passwd` as audio_path was accepted and opened by the feature worker."""
    d = write_table_dir(tmp_path / "src")
    (d / "ok.wav").write_bytes(b"RIFF stand-in")
    elsewhere = tmp_path / "shared-media"
    elsewhere.mkdir()
    (elsewhere / "c.png").write_bytes(b"\x89PNG stand-in")
    (d / "link.wav").symlink_to("/etc/hostname")  # a symlink out of the catalog counts as outside
    songs = pd.DataFrame({"track": ["t1", "t2", "t3", "t4"], "name": list("ABCD"), "band": list("WXYZ"),
                          "style": ["rock"] * 4,
                          "audio_path": ["../../../../etc/passwd", "ok.wav", "link.wav", "/etc/passwd"],
                          "cover_path": [None, None, str(elsewhere / "c.png"), None]})
    (d / "songs.csv").unlink()
    songs.to_csv(d / "songs.csv", index=False)
    cat = load_source(table_config(d))
    rows = cat.songs.set_index("song_id")
    assert rows["audio_path"].isna().tolist() == [True, False, True, True]
    assert rows["cover_path"].isna().all()  # not under a configured root
    assert cat.report.counts["songs.audio_path.outside_media_roots"] == 3
    cfg = table_config(d)
    cfg.catalog.media_roots = [str(elsewhere)]
    assert str(load_source(cfg).songs.set_index("song_id").loc["t3", "cover_path"]).endswith("c.png")
    # prepared into a run directory, the catalog reloads with the media it was confined to (not dropped again)
    run = open_run_dir(tmp_path / "run")
    build_catalog(cfg, run, progress=False)
    reloaded = load_catalog(run.catalog).songs.set_index("song_id")
    assert str(reloaded.loc["t2", "audio_path"]).endswith("ok.wav")
    assert str(reloaded.loc["t3", "cover_path"]).endswith("c.png")


def write_log(d: Path, played_at: list | None) -> None:
    cols = {"uid": ["x", "x", "y"], "track": ["t1", "t2", "t2"], "plays": [1, 1, 1]}
    if played_at is not None:
        cols["played_at"] = played_at
    (d / "interactions.parquet").unlink()
    pd.DataFrame(cols).to_csv(d / "interactions.csv", index=False)


def test_epoch_seconds_and_milliseconds_are_timestamps(tmp_path):
    """Defect: integer/epoch timestamps read from a CSV were refused ("'0' is not a timestamp")."""
    d = write_table_dir(tmp_path / "src")
    write_log(d, [0, 1704103200, 1704103200500])
    ts = load_source(table_config(d)).interactions.sort_values("timestamp")["timestamp"].tolist()
    assert ts == [pd.Timestamp(0, unit="s", tz="UTC"), pd.Timestamp("2024-01-01T10:00:00Z"),
                  pd.Timestamp("2024-01-01T10:00:00Z")]  # the milliseconds floored to the second


def test_a_log_without_time_axis_gets_the_item_holdout_split(tmp_path):
    from llmrec.split import split_catalog

    d = write_table_dir(tmp_path / "src")
    write_log(d, None)
    cfg = table_config(d, {k: v for k, v in COLUMN_MAP.items() if k != "interactions.timestamp"})
    with pytest.raises(SchemaError, match="catalog.time_axis=false"):
        load_source(cfg)
    cfg.catalog.time_axis = False
    cat = load_source(cfg)
    assert cat.meta["time_axis"] is False and cat.interactions["timestamp"].nunique() == 1
    assert split_catalog(cat).kind == "item_holdout"
