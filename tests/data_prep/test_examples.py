"""Training examples (data_prep.examples): leakage-free, grounded, saved and reloadable."""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from data_prep.examples import build_examples, load_examples, make_examples, save_examples
from data_prep.synthetic import HOSTILE_COMMENTS, INSTRUMENTS, MOODS
from llmrec.claims import ClaimChecker, verified
from llmrec.evidence import Evidence, EvidenceBuilder
from llmrec.io import RunDir
from llmrec.schema import Catalog, load_song_attributes
from llmrec.split import split_catalog, tuning_split
from llmrec.text import AUDIO_TOKEN, COVER_TOKEN, sanitize_song

TEMPO = {"slow": "slow", "medium": "mid-tempo", "fast": "fast"}
INSTRUMENT = {"piano": "piano", "guitar": "guitar", "synth": "synth", "strings": "string"}


@pytest.fixture(scope="module")
def truth(synthetic_catalog):
    return load_song_attributes(synthetic_catalog.root).set_index("song_id")


@pytest.fixture(scope="module")
def split(synthetic_catalog, quick_config):
    return split_catalog(synthetic_catalog, quick_config.eval.split, quick_config.eval.valid_days)


@pytest.fixture(scope="module")
def inner(split, quick_config):
    """The validation hold-out eval tunes on (and the examples leave out)."""
    return tuning_split(split, quick_config.seed)


def rows(df: pd.DataFrame) -> set:
    return set(zip(df.user_id, df.song_id, pd.to_datetime(df.timestamp, utc=True)))


@pytest.fixture(scope="module")
def built(synthetic_catalog, quick_config, tmp_path_factory):
    """Examples built the way `llmrec prepare` builds them (run dir in, datasets out), then reloaded from disk."""
    run = RunDir(tmp_path_factory.mktemp("run"))
    run.catalog.symlink_to(synthetic_catalog.root, target_is_directory=True)
    result = build_examples(quick_config, run, progress=False)
    return result, run, load_examples(run.examples)


@pytest.fixture(scope="module")
def stage2(built):
    return built[2]["stage2"].to_list()


def words(text: str) -> set[str]:
    return set(re.findall(r"[\w-]+", text.lower()))


def test_counts_and_meta(built, split, inner, synthetic_catalog, quick_config):
    result, run, ex = built
    meta = ex["meta"]
    n_users = synthetic_catalog.interactions.user_id.nunique()
    songs = synthetic_catalog.songs
    released_late = pd.to_datetime(songs.release_date).dt.date >= split.split_time.date()
    captioned = set(songs.song_id[~released_late]) - split.cold_songs  # cold-start songs stay unseen
    assert meta["counts"]["stage1"] == len(ex["stage1"]) == len(captioned) > 0
    assert set(ex["stage1"]["song_id"]) == captioned
    assert 0 < len(ex["stage2"]) <= n_users * quick_config.examples.stage2_per_user
    assert meta["counts"]["stage2"] == len(ex["stage2"]) and meta["counts"]["stage2_users"] == n_users
    # one pair per song played in the training plays: the train part minus the tuning hold-out
    assert meta["counts"]["pairs"] == len(ex["pairs"]) == len(inner.warm_songs) < len(split.warm_songs)
    assert meta["tuning_holdout"] == {"held_out": True, "seed": quick_config.seed, "plays": len(inner.test),
                                      "songs": len(inner.cold_songs)}
    assert meta["split"]["kind"] == "temporal" and meta["split"]["cold_songs"] == len(split.cold_songs)
    assert f"stage2 {len(ex['stage2'])}" in result["examples"] and str(run.examples) in result["examples"]
    # the hostile comments of the synthetic catalog were met and counted
    comments = [c for cs in synthetic_catalog.songs.comments for c in cs]
    assert any("previous instructions" in c for c in comments) and any("<" in c for c in comments)
    for kind in ("injection_like", "special_tokens"):
        assert meta["sanitizer"].get(kind, 0) > 0, kind
    if any("\x00" in c for c in comments):
        assert meta["sanitizer"]["control_chars"] > 0


def test_saved_datasets_reload_with_their_columns(built):
    ex = built[2]
    assert ex["stage1"].column_names == ["song_id", "prompt", "answer", "audio_song_ids", "cover_song_ids"]
    assert {"user_id", "song_id", "history_song_ids", "prompt", "answer", "evidence", "audio_song_ids",
            "cover_song_ids"} <= set(ex["stage2"].column_names)
    assert ex["pairs"].column_names == ["song_id", "cf_factor", "pos_song_id"]
    row = ex["pairs"][0]
    assert len(row["cf_factor"]) == 32 and all(isinstance(v, float) for v in row["cf_factor"])
    assert np.isfinite(np.array(ex["pairs"]["cf_factor"])).all()


def test_save_is_atomic_and_replaces(built, tmp_path, synthetic_catalog, quick_config):
    ex = built[2]
    small = make_examples(Catalog(synthetic_catalog.songs, synthetic_catalog.users,
                                  synthetic_catalog.interactions.iloc[:400], synthetic_catalog.meta,
                                  synthetic_catalog.root), quick_config)
    out = tmp_path / "examples"
    save_examples(small, out)
    (out / "stale.txt").write_text("x")
    save_examples(small, out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["examples"]  # no temporary directory left behind
    again = load_examples(out)
    assert again["stage2"].to_list() == [{k: r[k] for k in ex["stage2"].column_names} for r in small.stage2]


def test_no_test_period_or_validation_play_reaches_training(stage2, built, split, inner):
    """Stage-2 rows, their histories and the CF pairs come from the train part minus the validation plays eval
    tunes on: no test play, no validation play, and nothing about the songs held out for cold-start tuning."""
    fit, valid = rows(inner.train), rows(inner.test)
    assert fit and valid and not fit & valid and fit | valid == rows(split.train)
    for r in stage2:
        t = pd.Timestamp(r["timestamp"])
        assert (r["user_id"], r["song_id"], t) in fit
        assert t < split.split_time
        assert r["song_id"] not in inner.cold_songs
        for sid, ht in zip(r["history_song_ids"], r["history_timestamps"], strict=True):
            ht = pd.Timestamp(ht)
            assert (r["user_id"], sid, ht) in fit and ht < t  # history strictly before the candidate play
        assert r["song_id"] not in r["history_song_ids"]
        assert len(set(r["history_song_ids"])) == len(r["history_song_ids"])
    pairs = built[2]["pairs"]
    assert set(pairs["song_id"]) == inner.warm_songs and not set(pairs["song_id"]) & split.cold_songs
    assert not set(pairs["song_id"]) & inner.cold_songs
    assert not {r["song_id"] for r in built[2]["stage1"]} & split.cold_songs
    played = inner.train.groupby("user_id").song_id.agg(set)
    for sid, pos in zip(pairs["song_id"], pairs["pos_song_id"]):
        assert pos is None or any(sid in s and pos in s for s in played), (sid, pos)  # co-listened in fit plays


def test_keeping_the_validation_plays_trains_on_the_whole_train_part(synthetic_catalog, quick_config, split):
    cfg = dataclasses.replace(quick_config,
                              examples=dataclasses.replace(quick_config.examples, hold_out_tuning_plays=False))
    ex = make_examples(synthetic_catalog, cfg, load_song_attributes(synthetic_catalog.root))
    assert ex.meta["tuning_holdout"] == {"held_out": False}
    assert {r["song_id"] for r in ex.pairs} == split.warm_songs
    assert {(r["user_id"], r["song_id"], pd.Timestamp(r["timestamp"])) for r in ex.stage2} <= rows(split.train)


def test_examples_do_not_change_when_the_test_period_changes(synthetic_catalog, quick_config, stage2, built, split):
    inter = synthetic_catalog.interactions.copy()
    test = (inter.timestamp >= split.split_time).to_numpy()
    rng = np.random.default_rng(7)
    inter.loc[test, "user_id"] = rng.permutation(inter.loc[test, "user_id"].to_numpy())
    inter.loc[test, "play_count"] = 50
    altered = make_examples(dataclasses.replace(synthetic_catalog, interactions=inter), quick_config,
                            load_song_attributes(synthetic_catalog.root))
    assert altered.stage2 == stage2
    assert altered.pairs == built[2]["pairs"].to_list()
    assert [r["song_id"] for r in altered.stage1] == built[2]["stage1"]["song_id"]


def test_stage2_answers_state_only_their_evidence_and_the_evidence_is_true(stage2, synthetic_catalog):
    songs = synthetic_catalog.songs.set_index("song_id")
    checker = ClaimChecker([sanitize_song(r) for r in synthetic_catalog.songs.to_dict("records")])
    kinds = Counter()
    for r in stage2:
        evidence = [Evidence(**json.loads(e)) for e in r["evidence"]]
        titles = [songs.title[h] for h in r["history_song_ids"]]
        claims = checker.check(r["answer"], evidence, titles, songs.title[r["song_id"]])
        assert verified(claims), (r["answer"], claims)
        assert {c.value for c in claims if c.kind == "history_title"} <= set(titles)
        cand = songs.loc[r["song_id"]]
        for e in evidence:
            kinds[e.kind] += 1
            linked = songs.loc[e.history_song_id] if e.linked else None
            assert e.history_song_id is None or e.history_song_id in r["history_song_ids"]
            if e.kind == "artist":
                assert cand.artist == e.value and (linked is None or linked.artist == e.value)
            if e.kind == "genre":
                assert e.value in cand.genres and (linked is None or e.value in linked.genres)
            if e.kind == "co_listen":
                assert e.listeners >= 2 and e.linked
    assert kinds["co_listen"] and kinds["artist"] and kinds["genre"] and kinds["keyword"]
    assert len({r["answer"] for r in stage2}) > 0.8 * len(stage2)  # phrased in varied words, not one sentence


def test_co_listening_never_counts_the_listener_explained(synthetic_catalog, quick_config):
    """Two songs only one user played together: no co-listening evidence for that user's own pair."""
    songs = {s["song_id"]: sanitize_song(s) for s in synthetic_catalog.songs.head(4).to_dict("records")}
    a, b, c, d = list(songs)
    plays = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u4"], "song_id": [a, b, a, b, a, b, c]})
    builder = EvidenceBuilder(songs, plays, prompt_config=quick_config.prompt)
    assert [e.listeners for e in builder.build([a], b, user="u1") if e.kind == "co_listen"] == [2]
    assert [e.value for e in builder.build([a], b, user="u1") if e.kind == "co_listen"] == ["100"]
    assert not [e for e in builder.build([a], b, user=None) if e.kind == "co_listen" and e.listeners != 3]
    assert not [e for e in builder.build([a], c, user="u4") if e.kind == "co_listen"]


def test_answers_make_no_false_claims(stage2, built, truth):
    """Any mood/instrument/tempo word in an answer is the candidate's (stage 2) or the song's (stage 1) truth."""
    def check(answer, sid):
        w = words(answer)
        a = truth.loc[sid]
        assert not (set(MOODS) - {a.mood}) & w, answer
        assert not ({INSTRUMENT[i] for i in INSTRUMENTS} - {INSTRUMENT[a.instrument]}) & w, answer
        assert not (set(TEMPO.values()) - {TEMPO[a.tempo_class]}) & w, answer

    for r in stage2:
        check(r["answer"], r["song_id"])
    for r in built[2]["stage1"]:
        check(r["answer"], r["song_id"])
        a = truth.loc[r["song_id"]]
        assert {a.mood, INSTRUMENT[a.instrument], TEMPO[a.tempo_class], a["mode"]} <= words(r["answer"])
    assert len({r["answer"] for r in stage2}) > len(stage2) // 2  # varied, not one template


def test_every_answer_is_one_line(stage2, built):
    # Generated text is cut at its first newline (llmrec.text.answer_text); no trained answer may contain one.
    answers = [r["answer"] for r in stage2] + list(built[2]["stage1"]["answer"])
    assert answers and all("\n" not in a and a == a.strip() for a in answers)


def test_placeholders_match_their_song_ids(stage2, built):
    for r in stage2:
        assert r["prompt"].count(AUDIO_TOKEN) == len(r["audio_song_ids"])
        assert r["prompt"].count(COVER_TOKEN) == len(r["cover_song_ids"])
        assert r["audio_song_ids"] == r["history_song_ids"] + [r["song_id"]]  # every synthetic song has audio
        assert 1 <= len(r["history_song_ids"]) <= 5
    for r in built[2]["stage1"]:
        assert r["audio_song_ids"] == [r["song_id"]] == r["cover_song_ids"]
        assert r["prompt"].count(AUDIO_TOKEN) == 1 and r["prompt"].count(COVER_TOKEN) == 1


def check_hostile_text_is_quoted_data(prompts: list[str]) -> int:
    n = 0
    for p in prompts:
        for marker in ("<s>", "</s>", "[INST]", "<<SYS>>", "<|im_start|>", "\x00", "\u202e", "\x1b", "\ufeff"):
            assert marker not in p
        assert p.count(AUDIO_TOKEN) <= 6 and "spam " * 100 not in p
        for line in p.splitlines():
            if re.search(r"previous instructions|you are now|system:|reveal your prompt|training data", line, re.I):
                assert re.fullmatch(r'(- |Lyrics \(quoted, untrusted\): )"""[^"]*"""', line), line
                n += 1
    return n


def test_hostile_comments_stay_quoted_data(built):
    check_hostile_text_is_quoted_data(list(built[2]["stage1"]["prompt"]) + list(built[2]["stage2"]["prompt"]))


def test_real_catalog_with_hostile_comments(synthetic_catalog, quick_config):
    """A catalog without ground truth (answers from genres and artist) whose every song carries hostile comments."""
    inter = synthetic_catalog.interactions
    songs = synthetic_catalog.songs.copy()
    k = len(HOSTILE_COMMENTS)
    songs["comments"] = [[HOSTILE_COMMENTS[i % k], HOSTILE_COMMENTS[(i + 1) % k]] for i in range(len(songs))]
    small = dataclasses.replace(synthetic_catalog, songs=songs, meta={**synthetic_catalog.meta, "source": "table"},
                                interactions=inter[inter.user_id.isin(sorted(set(inter.user_id))[:15])])
    # Budgets roomy enough that comments (ranked after metadata and lyrics) reach the prompts at all.
    roomy = dataclasses.replace(quick_config, prompt=dataclasses.replace(quick_config.prompt, song_budget=160,
                                                                         stage2_budget=192))
    ex = make_examples(small, roomy, truth=None)
    assert ex.meta["answers_from"]["stage1"] == "genres and artist" and ex.stage2
    for kind in ("injection_like", "special_tokens", "control_chars", "truncated"):
        assert ex.meta["sanitizer"][kind] >= len(songs) // k, kind
    assert check_hostile_text_is_quoted_data([r["prompt"] for r in ex.stage1 + ex.stage2]) > 10
    for r in ex.stage2:
        assert {json.loads(e)["kind"] for e in r["evidence"]} <= {"co_listen", "genre", "tag", "artist", "album",
                                                                  "keyword"}
        assert not (set(MOODS) | {"piano", "guitar", "synth", "slow", "fast"}) & words(r["answer"])
    for r in ex.stage1:
        assert not (set(MOODS) | {"piano", "guitar", "synth", "slow", "fast", "minor", "major"}) & words(r["answer"])


def test_catalog_without_a_time_axis(synthetic_catalog, quick_config):
    """lastfm-style logs (one placeholder timestamp, meta time_axis false): item hold-out split, history in log
    order, and still no held-out interaction in any example."""
    inter = synthetic_catalog.interactions
    inter = inter[inter.user_id.isin(sorted(set(inter.user_id))[:20])].assign(
        timestamp=pd.Timestamp("2011-01-01", tz="UTC"))
    cat = dataclasses.replace(synthetic_catalog, interactions=inter,
                              meta={**synthetic_catalog.meta, "time_axis": False, "split_time": None})
    ex = make_examples(cat, quick_config, load_song_attributes(synthetic_catalog.root))
    sp = split_catalog(cat, quick_config.eval.split)
    fit = tuning_split(sp, quick_config.seed).train  # the train part minus the validation plays
    assert ex.meta["split"]["kind"] == "item_holdout" and ex.stage2
    train_pairs = set(zip(fit.user_id, fit.song_id))
    for r in ex.stage2:
        assert (r["user_id"], r["song_id"]) in train_pairs
        assert all((r["user_id"], h) in train_pairs for h in r["history_song_ids"])
        assert r["song_id"] not in r["history_song_ids"]
    assert not {r["song_id"] for r in ex.stage1} & sp.cold_songs
    assert {r["song_id"] for r in ex.pairs} == set(fit.song_id) < sp.warm_songs
