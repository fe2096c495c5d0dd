"""`llmrec eval` end to end on the quick synthetic catalog, plus the item hold-out split it uses for lastfm."""
from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from llmrec.schema import load_song_attributes
from eval import report as rep
from llmrec import cli
from llmrec.io import MissingArtefactError, RunDir, open_run_dir
from llmrec.schema import Catalog, save_catalog
from llmrec.split import item_holdout_split, split_catalog, tuning_split

QUIET = argparse.Namespace(no_progress=True)
CF_AND_CONTENT = ["random", "mostpop", "itemknn", "als", "bpr", "text", "text2cf", "mm2cf", "mm2cf-hybrid"]


def one_hot_vectors(songs: pd.DataFrame, attrs: pd.DataFrame, columns: list[str], noise: float, seed: int
                    ) -> np.ndarray:
    """Song vectors from latent attributes (one-hot per column) plus noise: a stand-in for learned features."""
    a = attrs.set_index("song_id").loc[songs.song_id]
    parts = [pd.get_dummies(a[c].astype(str)).to_numpy(np.float32) for c in columns]
    x = np.concatenate(parts, axis=1)
    return x + noise * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)


def write_vectors(path, key: str, song_ids: list[str], vectors: np.ndarray, encoder: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))}, str(path),
              metadata={"song_ids": json.dumps(list(song_ids)), "encoder": encoder})


def make_run(root, catalog_dir, text: bool = True) -> RunDir:
    """A run directory whose catalog is the shared synthetic one (symlinked: it is read-only here) and, like after
    `llmrec features`, text features (genre/language one-hots standing in for sentence embeddings: fast)."""
    run = open_run_dir(root)
    run.catalog.symlink_to(catalog_dir, target_is_directory=True)
    if text:
        from llmrec.schema import load_catalog

        songs = load_catalog(run.catalog).songs
        vecs = one_hot_vectors(songs, load_song_attributes(run.catalog), ["genre", "language"], 0.3, 0)
        write_vectors(run.features / "text.safetensors", "text", list(songs.song_id), vecs, "test-onehot")
    return run


@pytest.fixture(scope="module")
def eval_cfg(quick_config):
    cfg = copy.deepcopy(quick_config)
    cfg.eval.bootstrap = 50
    return cfg


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, synthetic_catalog, eval_cfg):
    run = make_run(tmp_path_factory.mktemp("eval") / "run", synthetic_catalog.root)
    out = rep.run_eval(eval_cfg, run, QUIET)
    return run, out, json.loads((run.eval / "report.json").read_text())


def test_report_json_follows_the_contract(evaluated):
    run, out, report = evaluated
    assert {"dataset", "split", "results", "hyperparameters", "notes"} <= set(report)
    assert report["dataset"] == "synthetic" and out["report"] == str(run.eval / "report.json")
    assert set(report["results"]) == {"all", "warm", "warm-known", "cold"}
    assert report["models"] == CF_AND_CONTENT
    for slice_name, rows in report["results"].items():
        assert set(rows) == set(CF_AND_CONTENT), slice_name
        for model, metrics in rows.items():
            for key in ("recall@10", "recall@20", "recall@50", "ndcg@20", "hr@20", "mrr", "coverage@20", "gini@20"):
                assert 0.0 <= metrics[key] <= 1.0, (slice_name, model, key)
    assert "tail_share@20" in report["results"]["all"]["als"]
    # new songs in the top 20 of the whole-catalogue rankings; the cold slice ranks new songs only
    assert 0.0 <= report["results"]["all"]["text"]["new_share@20"] <= 1.0
    assert "new_share@20" not in report["results"]["cold"]["als"]
    assert "recall@20_pop0" in report["results"]["warm"]["itemknn"]
    # The cold slice ranks among cold songs only: its candidate count is the number of cold songs.
    assert report["split"]["slices"]["cold"]["candidates"] == report["results"]["cold"]["als"]["n_candidates"] < 144
    assert report["split"]["kind"] == "temporal" and report["split"]["cold_songs"] > 0
    # cold candidates are exactly the split's new songs, not every song without training plays
    assert report["split"]["slices"]["cold"]["candidates"] == report["split"]["cold_songs"]
    # warm-known: the warm test plays, ranked among known songs only (no new song can take a slot)
    assert report["split"]["slices"]["warm-known"]["test_pairs"] == report["split"]["slices"]["warm"]["test_pairs"]
    assert report["split"]["slices"]["warm-known"]["candidates"] == report["split"]["warm_songs"]
    assert "new_share@20" not in report["results"]["warm-known"]["als"]
    for model in CF_AND_CONTENT:
        assert (report["results"]["warm-known"][model]["recall@20"]
                >= report["results"]["warm"][model]["recall@20"] - 1e-9), model


def test_tuned_hyperparameters_and_headline_are_recorded(evaluated, synthetic_catalog, eval_cfg):
    _, _, report = evaluated
    # tuned on the hold-out that data_prep leaves out of llmrec's training examples (llmrec.split.tuning_split)
    inner = tuning_split(split_catalog(synthetic_catalog, eval_cfg.eval.split, eval_cfg.eval.valid_days),
                         eval_cfg.seed)
    assert f"({len(inner.train)} fit / {len(inner.test)} validation interactions)" in report["tuning"]["how"]
    hp = report["hyperparameters"]
    assert set(hp) >= {"itemknn", "als", "bpr", "text2cf"}
    assert hp["als"]["factors"] in rep.ALS_FACTORS and "k" in hp["itemknn"]
    assert len(report["tuning"]["grid"]["als"]) == len(rep.ALS_GRID_1) + len(rep.ALS_FACTORS) - 1
    assert rep.LLMREC_NOT_TRAINED in report["notes"]
    head = report["headline"]["warm"]
    assert head["best_cf"] in rep.CF_MODELS
    ci = head["models"]["text"]
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert f"text - {head['best_cf']}" in head["differences"]


def test_markdown_and_plots_are_written(evaluated):
    run, _, _ = evaluated
    md = (run.eval / "report.md").read_text()
    for slice_name in ("all", "warm", "warm-known", "cold"):
        assert f"## {slice_name} —" in md
    assert "| itemknn |" in md and "**" in md  # best per column in bold
    assert "new_share@20 |" in md and "new_share@20: share holding new songs" in md
    for name in ("recall_at_k.png", "recall_by_popularity.png", "cold_start.png"):
        data = (run.eval / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_trained_embeddings_add_llmrec_and_hybrid(tmp_path, synthetic_catalog, eval_cfg):
    run = make_run(tmp_path / "run", synthetic_catalog.root)
    songs = synthetic_catalog.songs
    attrs = load_song_attributes(synthetic_catalog.root)
    # "Embeddings" that know every latent taste attribute: a model that should win the cold slice.
    columns = ["genre", "mood", "instrument", "tempo_class"]
    columns = [c for c in columns if c in attrs.columns]
    vecs = one_hot_vectors(songs, attrs, columns, 0.05, 1)
    write_vectors(run.model / "embeddings.safetensors", "embeddings", list(songs.song_id), vecs, "test")
    assert rep.llmrec_item_vectors(run)[1].shape == vecs.shape
    report = json.loads(open(rep.run_eval(eval_cfg, run, QUIET)["report"]).read())
    for rows in report["results"].values():
        assert {"llmrec", "hybrid"} <= set(rows)
    hybrid = report["hyperparameters"]["hybrid"]
    assert hybrid["weight"] in rep.BLEND_WEIGHTS and hybrid["cold_offset"] in rep.COLD_OFFSETS
    grid = report["tuning"]["grid"]
    # the weight is chosen first (its grid at offset 0), then the offset at that weight
    assert [r["weight"] for r in grid["hybrid-weight"]] == list(rep.BLEND_WEIGHTS)
    assert {r["weight"] for r in grid["hybrid"]} == {hybrid["weight"]}
    # the hybrid's CF partner is the CF model with the best validation recall
    best_valid = {m: max(r["valid_recall@20"] for r in grid[m]) for m in ("itemknn", "als", "bpr")}
    assert report["hyperparameters"]["hybrid"]["cf"] == max(best_valid, key=best_valid.get)
    assert rep.LLMREC_NOT_TRAINED not in report["notes"]
    cold = report["results"]["cold"]
    assert cold["llmrec"]["recall@20"] > cold["random"]["recall@20"]
    assert "llmrec - text" in report["headline"]["cold"]["differences"]
    assert "llmrec" in report["hyperparameters"]  # the CF tower's ridge strength is tuned like text2cf's
    assert cold["llmrec-cf"]["recall@20"] > cold["random"]["recall@20"]  # the other user tower, reported
    assert any(n.startswith("served ranking: `llmrec` is the list") for n in report["notes"])
    # the no-LLM bar is tuned exactly like llmrec and its hybrid, and the headline says what the LLM adds over it
    mm = report["hyperparameters"]["mm2cf-hybrid"]
    assert mm["weight"] in rep.BLEND_WEIGHTS and mm["cold_offset"] in rep.COLD_OFFSETS and mm["cf"] == hybrid["cf"]
    assert [r["weight"] for r in grid["mm2cf-hybrid-weight"]] == list(rep.BLEND_WEIGHTS)
    assert {"llmrec - mm2cf", "hybrid - mm2cf-hybrid"} <= set(report["headline"]["cold"]["differences"])


def test_tail_counts_known_songs_outside_the_head_only():
    # 10 songs: 2 never played (new), 8 known; the head is the top 20% of the known songs (2 of 8)
    plays = np.array([0, 50, 40, 0, 30, 20, 10, 5, 3, 1], dtype=float)
    tail = rep.tail_mask(plays)
    assert not tail[0] and not tail[3]  # new songs are never tail
    assert not tail[1] and not tail[2]  # the head
    assert tail[[4, 5, 6, 7, 8, 9]].all()


def test_raw_feature_blocks_are_standardised_to_equal_variance():
    from eval.rawfeatures import concat_blocks

    rng = np.random.default_rng(0)
    text = rng.normal(size=(50, 4)) * 100.0
    cover = rng.normal(size=(50, 16)) * 0.01
    cover[:10] = 0.0  # ten songs without a cover
    x = concat_blocks({"text": text, "cover": cover})
    assert x.shape == (50, 20)
    np.testing.assert_allclose((x[:, :4] ** 2).sum(1).mean(), 1.0, rtol=1e-5)
    np.testing.assert_allclose((x[10:, 4:] ** 2).sum(1).mean(), 1.0, rtol=1e-5)
    assert not x[:10, 4:].any()  # a missing block stays zero


def test_a_note_says_when_llmrec_may_have_seen_the_validation_plays(tmp_path, eval_cfg):
    run = open_run_dir(tmp_path / "run")
    assert "rerun `llmrec prepare`" in rep.tuning_holdout_notes(run, eval_cfg)[0]  # no examples/meta.json
    run.examples.mkdir()
    cases = [({"held_out": True, "seed": eval_cfg.seed, "plays": 10, "songs": 2}, None),
             ({"held_out": False}, "hold_out_tuning_plays=false"),
             ({"held_out": True, "seed": eval_cfg.seed + 1}, f"seed {eval_cfg.seed + 1}, not {eval_cfg.seed}"),
             ({}, "does not record")]
    for held, expected in cases:
        (run.examples / "meta.json").write_text(json.dumps({"tuning_holdout": held} if held else {}))
        notes = rep.tuning_holdout_notes(run, eval_cfg)
        if expected is None:
            assert notes == []
        else:
            assert len(notes) == 1 and expected in notes[0] and "optimistic" in notes[0]


def test_llmrec_cf_tower_scores_every_song_through_its_embedding():
    import scipy.sparse as sp
    from eval.baselines import ALS

    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((30, 12)) < 0.4).astype(np.float32))
    train[:, 11] = 0  # item 11 is cold
    train.eliminate_zeros()
    vectors = rng.normal(size=(12, 5))
    vectors[11] = vectors[0]  # a cold song with the same embedding as a warm one
    als = ALS(factors=4, iterations=5, random_state=0).fit(train)
    model = rep.llmrec_model(vectors, "cf", als, alpha=1.0).fit(train)
    # Warm songs are scored through the mapped embedding too, not through their ALS factors.
    np.testing.assert_allclose(model.item_factors, model.regressor.predict(vectors))
    scores = model.score(np.arange(30), train)
    np.testing.assert_allclose(scores[:, 11], scores[:, 0], rtol=1e-5)
    with pytest.raises(ValueError, match="user_tower"):
        rep.llmrec_model(vectors, "users", als, alpha=1.0)


def test_empty_cold_slice_is_reported_as_empty_not_zero(tmp_path, synthetic_catalog, eval_cfg):
    cat = synthetic_catalog
    split = split_catalog(cat)
    # No test plays of cold songs: drop every interaction of a song first played after the split time.
    inter = cat.interactions[~cat.interactions.song_id.isin(split.cold_songs)]
    catalog_dir = save_catalog(Catalog(cat.songs, cat.users, inter, meta=cat.meta), tmp_path / "catalog")
    run = open_run_dir(tmp_path / "run")
    run.catalog.symlink_to(catalog_dir, target_is_directory=True)
    write_vectors(run.features / "text.safetensors", "text", list(cat.songs.song_id),
                  np.eye(len(cat.songs), 16, dtype=np.float32), "test")
    cfg = copy.deepcopy(eval_cfg)
    cfg.eval.tune = False
    out = rep.run_eval(cfg, run, QUIET)
    report = json.loads((run.eval / "report.json").read_text())
    assert report["split"]["slices"]["cold"]["empty"] is True
    for model, metrics in report["results"]["cold"].items():
        assert metrics["empty"] is True and "recall@20" not in metrics, model
    assert report["headline"]["cold"] == {"empty": True}
    assert out["recall@20 (cold)"] == "empty slice"
    assert "Empty slice" in (run.eval / "report.md").read_text()
    expected = {k: v for k, v in rep.DEFAULTS.items() if k not in ("hybrid", "llmrec")}
    expected.update({"mm2cf": rep.DEFAULTS["llmrec"], "mm2cf-hybrid": rep.DEFAULTS["hybrid"]})
    assert report["hyperparameters"] == expected


def test_missing_catalog_names_the_prepare_stage(tmp_path, eval_cfg, capsys):
    with pytest.raises(MissingArtefactError, match="llmrec prepare"):
        rep.run_eval(eval_cfg, open_run_dir(tmp_path / "empty"), None)
    assert cli.main(["eval", "--run-dir", str(tmp_path / "empty2")]) == 2
    assert "run `llmrec prepare" in capsys.readouterr().err


def test_text_features_are_computed_when_the_features_stage_did_not_run(tmp_path, synthetic_catalog, eval_cfg):
    run = make_run(tmp_path / "run", synthetic_catalog.root, text=False)
    cfg = copy.deepcopy(eval_cfg)
    cfg.features.text_encoder = "tfidf"  # the features stage's cheap encoder: no model load in a unit test
    ids, vecs, source = rep.text_item_vectors(cfg, run, synthetic_catalog)
    assert len(ids) == len(synthetic_catalog.songs) and vecs.shape[0] == len(ids)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert (run.eval / "text.safetensors").is_file() and "computed by eval" in source


def test_build_data_binarises_and_drops_repeat_pairs(synthetic_catalog):
    train = pd.DataFrame({"user_id": ["u00000", "u00000", "u00001"], "song_id": ["s00000", "s00000", "s00001"]})
    test = pd.DataFrame({"user_id": ["u00000", "u00000"], "song_id": ["s00000", "s00002"]})
    d = rep.build_data(synthetic_catalog, train, test)
    assert d.train.nnz == 2 and d.train.data.max() == 1.0
    assert d.test.nnz == 1 and d.repeats_dropped == 1  # (u0, s0) was already played in train
    # two known songs: the head is ceil(0.2 * 2) = 1 of them, the other is tail; songs without plays never are
    assert d.warm.sum() == 2 and d.is_tail.sum() == 1 and not d.is_tail[~d.warm].any()


class Fixed(rep.Recommender):
    """A model with fixed score rows (one per user)."""

    def __init__(self, s):
        self.s, self.n_items = np.asarray(s, np.float32), len(s[0])

    def fit(self, train, **side):
        return self

    def score(self, user_idx, train):
        return self.s[np.asarray(user_idx)]


def test_hybrid_blends_warm_songs_and_uses_content_alone_for_cold():
    cf, content = Fixed([[3.0, 1.0, 0.0, 0.0]]), Fixed([[0.0, 1.0, 2.0, 5.0]])
    warm = np.array([True, True, False, False])
    z = rep._znorm(content.s)
    assert np.allclose(rep.Hybrid(cf, content, warm, 0.0).score([0], None), z)
    full_cf = rep.Hybrid(cf, content, warm, 1.0).score([0], None)
    assert np.allclose(full_cf[0, :2], rep._znorm(cf.s)[0, :2]) and np.allclose(full_cf[0, 2:], z[0, 2:])


def test_hybrid_cold_offset_moves_only_cold_songs_and_cached_scores_match_the_model():
    import scipy.sparse as sp

    cf = Fixed([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    content = Fixed([[0.0, 1.0, 2.0, 5.0], [1.0, 0.0, 4.0, 2.0]])
    warm = np.array([True, True, False, False])
    base = rep.Hybrid(cf, content, warm, 0.6).score([0, 1], None)
    moved = rep.Hybrid(cf, content, warm, 0.6, cold_offset=-1.5).score([0, 1], None)
    assert np.allclose(moved[:, :2], base[:, :2]) and np.allclose(moved[:, 2:], base[:, 2:] - 1.5)
    train = sp.csr_matrix((3, 4), dtype=np.float32)
    cached = rep.CachedScores(content, np.array([1, 0]), train)
    assert np.allclose(cached.score([0, 1], train), content.s) and np.allclose(cached.score([1], train), content.s[1:])
    with pytest.raises(KeyError, match="not built for"):
        cached.score([2], train)


def test_hybrid_popularity_penalty_lowers_popular_known_songs_only():
    cf = Fixed([[3.0, 1.0, 2.0, 0.0, 0.0]])
    content = Fixed([[0.0, 1.0, 2.0, 4.0, 5.0]])
    warm = np.array([True, True, True, False, False])
    pop = np.array([99.0, 9.0, 0.0, 0.0, 0.0])  # song 2 is warm by the mask here; its log(1+plays) is 0
    base = rep.Hybrid(cf, content, warm, 0.5, item_pop=pop).score([0], None)
    penalised = rep.Hybrid(cf, content, warm, 0.5, pop_penalty=0.5, item_pop=pop).score([0], None)
    log_pop = np.log1p(pop[:3])
    expected_z = (log_pop - log_pop.mean()) / log_pop.std()  # z over the known songs only
    assert np.allclose(penalised[0, :3], base[0, :3] - 0.5 * expected_z, atol=1e-6)
    assert np.allclose(penalised[0, 3:], base[0, 3:])  # new songs: content + offset, untouched
    assert penalised[0, 0] < base[0, 0] and penalised[0, 2] > base[0, 2]
    with pytest.raises(ValueError, match="item_pop"):
        rep.Hybrid(cf, content, warm, 0.5, pop_penalty=0.5)


def test_hybrid_tail_takes_the_most_tail_within_the_ndcg_budget(tmp_path, synthetic_catalog, eval_cfg):
    """On validation (the tuning log), the chosen setting keeps NDCG@20 within the budget of ALS's and has the
    largest tail share among the settings that do; on test it is reported beside the hybrid."""
    run = make_run(tmp_path / "run", synthetic_catalog.root)
    songs, attrs = synthetic_catalog.songs, load_song_attributes(synthetic_catalog.root)
    vecs = one_hot_vectors(songs, attrs, ["genre", "mood"], 0.3, 2)
    write_vectors(run.model / "embeddings.safetensors", "embeddings", list(songs.song_id), vecs, "test")
    report = json.loads(open(rep.run_eval(eval_cfg, run, QUIET)["report"]).read())
    chosen = report["hyperparameters"]["hybrid-tail"]
    assert chosen["ndcg_budget"] == eval_cfg.eval.tail_ndcg_budget
    assert chosen["weight"] == report["hyperparameters"]["hybrid"]["weight"]
    log = report["tuning"]["grid"]["hybrid-tail"]
    assert len(log) == len(rep.POP_PENALTIES) * len(rep.COLD_OFFSETS)
    within = [r for r in log if r["within_ndcg_budget"]]
    assert within, "no setting kept within the NDCG budget on this fixture"
    # within = the paired NDCG change vs ALS stays within the budget one standard error on the safe side
    budget = eval_cfg.eval.tail_ndcg_budget
    for r in log:
        assert bool(r["within_ndcg_budget"]) == (r["valid_ndcg@20_change"] - r["valid_ndcg@20_change_se"] >= -budget)
    best = max(within, key=lambda r: r["valid_tail_share@20"])
    assert (chosen["pop_penalty"], chosen["cold_offset"]) == (best["pop_penalty"], best["cold_offset"])
    assert {"hybrid", "hybrid-tail"} <= set(report["results"]["all"])


def test_paired_relative_change_against_hand_computed_values():
    # reference mean 0.5; per-user differences / 0.5 = [0.2, -0.2, 0.6] -> mean 0.2, sd 0.4, se 0.4 / sqrt(3)
    change, se = rep.paired_relative_change([0.6, 0.2, 1.0], [0.5, 0.3, 0.7])
    assert change == pytest.approx(0.2) and se == pytest.approx(0.4 / np.sqrt(3))
    assert all(np.isnan(rep.paired_relative_change([0.1], [0.2])))  # one user: no standard error
    assert all(np.isnan(rep.paired_relative_change([0.1, 0.2], [0.0, 0.0])))
    with pytest.raises(ValueError):
        rep.paired_relative_change([0.1, 0.2], [0.1])


def test_ties_are_broken_in_a_fixed_random_order_not_by_catalogue_index():
    import scipy.sparse as sp

    n = 50
    train = sp.csr_matrix(([1.0], ([1], [3])), shape=(2, n), dtype=np.float32)  # user 1 has seen song 3
    order = rep.tie_order(n, seed=0)
    flat = rep.rank_users(Fixed(np.zeros((2, n))), train, np.array([0, 1]), 5, [None], order)[0]
    assert list(flat[0]) == list(order[:5]) != list(range(5))  # all tied: the shuffled order decides
    assert 3 not in flat[1]  # a seen song is never recommended, whatever the order
    graded = rep.rank_users(Fixed(-np.arange(n)[None, :]), train, np.array([0]), 5, [None], order)[0]
    assert list(graded[0]) == [0, 1, 2, 3, 4]  # real score differences are untouched


# ------------------------------------------------------------------------------------------------ item hold-out


def toy_log(n_users=50, n_songs=40, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = {(f"u{u}", f"s{s}") for u in range(n_users) for s in rng.choice(n_songs, size=8, replace=False)}
    users, songs = zip(*sorted(rows))
    return pd.DataFrame({"user_id": users, "song_id": songs, "timestamp": pd.Timestamp("2011-01-01", tz="UTC")})


def test_item_holdout_holds_items_out_entirely_and_keeps_user_profiles():
    log = toy_log()
    s = item_holdout_split(log, cold_fraction=0.25, test_fraction=0.2, seed=3)
    assert s.kind == "item_holdout" and s.split_time is None and len(s.valid) == 0
    assert len(s.train) + len(s.test) == len(log)
    assert not set(s.train.song_id) & s.cold_songs  # cold songs have no train plays at all
    assert (s.test.song_id.isin(s.cold_songs)).sum() == log.song_id.isin(s.cold_songs).sum()
    assert len(s.cold_songs) == round(0.25 * log.song_id.nunique())
    # Every other song keeps at least one train play, so the cold set is exactly the held-out songs.
    assert s.warm_songs == set(log.song_id) - s.cold_songs
    warm_test = s.test[~s.test.song_id.isin(s.cold_songs)]
    assert 0.1 < len(warm_test) / (len(warm_test) + len(s.train)) < 0.3
    pairs = set(zip(s.train.user_id, s.train.song_id))
    assert not pairs & set(zip(s.test.user_id, s.test.song_id))
    # Deterministic for a seed, different for another.
    again = item_holdout_split(log, cold_fraction=0.25, test_fraction=0.2, seed=3)
    assert again.cold_songs == s.cold_songs and again.test.equals(s.test)
    assert item_holdout_split(log, cold_fraction=0.25, seed=4).cold_songs != s.cold_songs


def test_item_holdout_never_holds_out_single_listener_songs_or_empties_a_user():
    log = pd.concat([toy_log(), pd.DataFrame({"user_id": ["u0", "lonely"], "song_id": ["rare", "s1"],
                                              "timestamp": pd.Timestamp("2011-01-01", tz="UTC")})])
    s = item_holdout_split(log, cold_fraction=0.5, test_fraction=0.5, seed=0)
    assert "rare" not in s.cold_songs
    # "lonely" has one interaction: at most all but one goes to test, so it stays in train unless its song is cold.
    if "s1" not in s.cold_songs:
        assert "lonely" in set(s.train.user_id)


def test_split_catalog_uses_item_holdout_for_catalogs_without_a_time_axis(synthetic_catalog):
    cat = copy.copy(synthetic_catalog)
    cat.meta = {**synthetic_catalog.meta, "time_axis": False, "split_time": None}
    assert split_catalog(cat, "temporal").kind == "item_holdout"
    assert split_catalog(synthetic_catalog, "item_holdout").kind == "item_holdout"
    with pytest.raises(ValueError, match="item_holdout"):
        split_catalog(synthetic_catalog, "nope")


def test_mm2cf_ridge_strength_is_searched_only_when_its_tower_uses_it(synthetic_catalog, eval_cfg):
    split = split_catalog(synthetic_catalog, eval_cfg.eval.split, eval_cfg.eval.valid_days)
    inner = tuning_split(split, eval_cfg.seed)
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(len(synthetic_catalog.songs), 8)).astype(np.float32)
    history = rep.tune(synthetic_catalog, inner, raw, None, 0, True, user_tower="history", raw=raw)
    assert "mm2cf" not in history.log and history.params["mm2cf"] == rep.DEFAULTS["llmrec"]
    cf = rep.tune(synthetic_catalog, inner, raw, None, 0, False, user_tower="cf", raw=raw)
    assert len(cf.log["mm2cf"]) == len(rep.RIDGE_ALPHAS)
