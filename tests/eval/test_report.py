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

from eval import report as rep
from eval import tuning
from eval.models import DEFAULTS
from eval.vectors import LLMREC_NOT_TRAINED, llmrec_item_vectors
from llmrec import cli
from llmrec.io import MissingArtefactError, RunDir, open_run_dir
from llmrec.schema import Catalog, load_song_attributes, save_catalog
from llmrec.split import split_catalog, tuning_split

QUIET = argparse.Namespace(no_progress=True)
CF_AND_CONTENT = ["random", "mostpop", "itemknn", "als", "bpr", "text", "text2cf", "mm2cf", "mm2cf-cf",
                  "mm2cf-hybrid"]


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
    assert hp["als"]["factors"] in tuning.ALS_FACTORS and "k" in hp["itemknn"]
    assert len(report["tuning"]["grid"]["als"]) == len(tuning.ALS_GRID_1) + len(tuning.ALS_FACTORS) - 1
    assert LLMREC_NOT_TRAINED in report["notes"]
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
    assert llmrec_item_vectors(run)[1].shape == vecs.shape
    report = json.loads(open(rep.run_eval(eval_cfg, run, QUIET)["report"]).read())
    for rows in report["results"].values():
        assert {"llmrec", "hybrid"} <= set(rows)
    hybrid = report["hyperparameters"]["hybrid"]
    assert hybrid["weight"] in tuning.BLEND_WEIGHTS and hybrid["cold_offset"] in tuning.COLD_OFFSETS
    grid = report["tuning"]["grid"]
    # the weight is chosen first (its grid at offset 0), then the offset at that weight
    assert [r["weight"] for r in grid["hybrid-weight"]] == list(tuning.BLEND_WEIGHTS)
    assert {r["weight"] for r in grid["hybrid"]} == {hybrid["weight"]}
    # the hybrid's CF partner is the CF model with the best validation recall
    best_valid = {m: max(r["valid_recall@20"] for r in grid[m]) for m in ("itemknn", "als", "bpr")}
    assert report["hyperparameters"]["hybrid"]["cf"] == max(best_valid, key=best_valid.get)
    assert LLMREC_NOT_TRAINED not in report["notes"]
    cold = report["results"]["cold"]
    assert cold["llmrec"]["recall@20"] > cold["random"]["recall@20"]
    assert "llmrec - text" in report["headline"]["cold"]["differences"]
    assert "llmrec" in report["hyperparameters"]  # the CF tower's ridge strength is tuned like text2cf's
    assert cold["llmrec-cf"]["recall@20"] > cold["random"]["recall@20"]  # the other user tower, reported
    # ... with its own no-LLM bar, whose ridge strength is searched on the same grid as llmrec's
    assert cold["mm2cf-cf"]["recall@20"] > cold["random"]["recall@20"]
    assert [r["alpha"] for r in grid["mm2cf"]] == [r["alpha"] for r in grid["llmrec"]]
    assert any(n.startswith("served ranking: `llmrec` is the list") for n in report["notes"])
    # the no-LLM bar is tuned exactly like llmrec and its hybrid, and the headline says what the LLM adds over it
    mm = report["hyperparameters"]["mm2cf-hybrid"]
    assert mm["weight"] in tuning.BLEND_WEIGHTS and mm["cold_offset"] in tuning.COLD_OFFSETS
    assert mm["cf"] == hybrid["cf"]
    assert [r["weight"] for r in grid["mm2cf-hybrid-weight"]] == list(tuning.BLEND_WEIGHTS)
    assert {"llmrec - mm2cf", "hybrid - mm2cf-hybrid"} <= set(report["headline"]["cold"]["differences"])


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
    expected = {k: v for k, v in DEFAULTS.items() if k not in ("hybrid", "llmrec")}
    expected.update({"mm2cf": DEFAULTS["llmrec"], "mm2cf-hybrid": DEFAULTS["hybrid"]})
    assert report["hyperparameters"] == expected


def test_missing_catalog_names_the_prepare_stage(tmp_path, eval_cfg, capsys):
    with pytest.raises(MissingArtefactError, match="llmrec prepare"):
        rep.run_eval(eval_cfg, open_run_dir(tmp_path / "empty"), None)
    assert cli.main(["eval", "--run-dir", str(tmp_path / "empty2")]) == 2
    assert "run `llmrec prepare" in capsys.readouterr().err


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
    assert len(log) == len(tuning.POP_PENALTIES) * len(tuning.COLD_OFFSETS)
    within = [r for r in log if r["within_ndcg_budget"]]
    assert within, "no setting kept within the NDCG budget on this fixture"
    # within = the paired NDCG change vs ALS stays within the budget one standard error on the safe side
    budget = eval_cfg.eval.tail_ndcg_budget
    for r in log:
        assert bool(r["within_ndcg_budget"]) == (r["valid_ndcg@20_change"] - r["valid_ndcg@20_change_se"] >= -budget)
    best = max(within, key=lambda r: r["valid_tail_share@20"])
    assert (chosen["pop_penalty"], chosen["cold_offset"]) == (best["pop_penalty"], best["cold_offset"])
    assert {"hybrid", "hybrid-tail"} <= set(report["results"]["all"])


# ------------------------------------------------------------------------------------------------ item hold-out
