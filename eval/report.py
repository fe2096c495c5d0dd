"""`llmrec eval`: every model, one split, three slices, one report (`runs/<name>/eval/`).

Protocol:

* The split is `llmrec.split.split_catalog` — the same one the training examples use, so no test interaction
  reaches any model. Interactions are binarised: relevance is "played in the test part", not how often.
* Test pairs that are also train pairs (a user replaying a song they already played) are dropped and counted: seen
  songs are masked from every ranking, so such pairs could never be hit.
* Full-catalogue ranking, no sampled negatives, on three slices:
  `warm` — test plays of songs with train plays, ranked among the whole catalogue;
  `cold` — test plays of songs without train plays, ranked among those cold songs only;
  `all`  — every test play, ranked among the whole catalogue.
  Users without a test play in a slice are skipped and counted; a slice with no test plays at all is reported as
  `{"empty": true}` for every model, never as zeros.
* Models: random, mostpop, itemknn, als, bpr (CF; hyperparameters tuned on a validation split carved out of the
  training part), text (ContentKNN on sentence embeddings of the song text), text2cf (ridge map from text to ALS
  factors for cold songs) and, once `llmrec train` has written `model/embeddings.safetensors`, llmrec (the LLM's
  song embeddings scored with the user tower named by `eval.user_tower`; the other tower is reported as
  `llmrec-<tower>`), hybrid (the best-validating CF model blended with llmrec on warm songs, llmrec alone on
  cold songs, tuned for recall) and hybrid-tail (the same blend with a popularity penalty, tuned for long-tail
  exposure within an NDCG budget of ALS's, `eval.tail_ndcg_budget`).
* Content models that pool history vectors (text, llmrec-history) remove the catalogue's mean vector first
  (ContentKNN(center=True)): the same treatment for every content model, so no baseline is weakened.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.ablation import modality_ablation, run_encoder_vectors
from eval.data import SLICES, EvalData, build_data, slice_test
from eval.metrics import bootstrap_ci
from eval.models import build_models, check_user_tower
from eval.plots import write_plots
from eval.rawfeatures import raw_feature_vectors
from eval.reasons import evaluate_reasons
from eval.render import render_markdown
from eval.scoring import HEADLINE, evaluate_models
from eval.tuning import default_params, tune
from eval.vectors import align_vectors, load_llm_vectors, text_item_vectors
from llmrec.config import Config
from llmrec.io import MissingArtefactError, RunDir, atomic_write_json, atomic_write_text
from llmrec.schema import Catalog, load_catalog
from llmrec.split import Split, split_catalog, tuning_split
from llmrec.split import positive_plays as positives

CF_MODELS = ("mostpop", "itemknn", "als", "bpr")  # "best CF" in the headline is the best of these per slice


def load_eval_catalog(run: RunDir) -> Catalog:
    if not (run.catalog / "interactions.parquet").is_file():
        raise MissingArtefactError(f"{run.catalog} has no catalog; run `llmrec prepare --run-dir {run.root}` first")
    return load_catalog(run.catalog)


def run_eval(cfg: Config, run: RunDir, args: argparse.Namespace | None = None) -> dict[str, Any]:
    progress = not getattr(args, "no_progress", False)
    t_start = time.perf_counter()
    catalog = load_eval_catalog(run)
    split = split_catalog(catalog, cfg.eval.split, cfg.eval.valid_days)
    # The validation window (if any) is training data for the final models; tuning carves its own hold-out.
    train_df = positives(pd.concat([split.train, split.valid], ignore_index=True))
    data = build_data(catalog, train_df, positives(split.test), cfg.seed, split.cold_songs)
    ks = sorted(set(cfg.eval.ks) | {20})
    notes = dataset_notes(catalog, cfg, split)
    text_ids, text_vecs, text_source = text_item_vectors(cfg, run, catalog, progress)
    text, missing_text = align_vectors(data.song_ids, text_ids, text_vecs)
    if missing_text:
        notes.append(f"text: {missing_text} catalogue songs have no text features (they score 0)")
    llm = load_llm_vectors(run, data.song_ids, notes)
    media = run_encoder_vectors(run, data.song_ids)  # pooled once: for mm2cf and the ablation probes
    raw, raw_source = raw_feature_vectors(text, media)
    notes.append(f"mm2cf (the no-LLM bar): {raw_source}")
    notes.append(served_note(cfg.eval.user_tower))
    t_tune = time.perf_counter()
    check_user_tower(cfg.eval.user_tower)  # before minutes of tuning
    if cfg.eval.tune and "llmrec" in llm:
        notes.extend(tuning_holdout_notes(run, cfg))
    tuned = (tune(catalog, tuning_split(split, cfg.seed), text, llm.get("llmrec"), cfg.seed, progress,
                  cfg.eval.user_tower, cfg.eval.tail_ndcg_budget, raw, cfg.eval.tune_max_cells)
             if cfg.eval.tune else default_params("llmrec" in llm, raw is not None))
    t_fit = time.perf_counter()
    models = build_models(data, tuned.params, text, llm, cfg.seed, cfg.eval.user_tower, raw)
    results, per_user = evaluate_models(models, data, ks, progress)
    t_reasons = time.perf_counter()
    reasons = evaluate_reasons(cfg, run, catalog, train_df, positives(split.test), progress)
    t_reasons = time.perf_counter() - t_reasons
    if reasons.get("skipped"):
        notes.append(f"reasons: {reasons['skipped']}")
    ablation = modality_ablation(run, data.song_ids, text, llm, media)
    report = {
        "dataset": catalog.meta.get("dataset") or catalog.meta.get("source") or "unknown",
        "item_kind": catalog.meta.get("item_kind", "song"),
        "subset": catalog.meta.get("subset"),  # catalog.max_songs: the real catalogue was cut (data_prep/adapters)
        "split": split_summary(split, data, cfg),
        "ks": ks,
        "models": list(models),
        "results": results,
        "headline": headline(results, per_user, cfg.eval.bootstrap, cfg.seed),
        "hyperparameters": tuned.params,
        "tuning": {"how": tuned.how, "grid": tuned.log},
        "text_features": text_source,
        "notes": notes,
        "reasons": reasons,
        "ablation": ablation,
        "seconds": {"tune": round(t_fit - t_tune, 1), "reasons": round(t_reasons, 1),
                    "fit_and_eval": round(time.perf_counter() - t_fit - t_reasons, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    paths = write_report(run.eval, report)
    summary = {s: {m: round(r[HEADLINE], 4) for m, r in results[s].items() if not r.get("empty")} for s in SLICES}
    return {"report": str(paths[0]), "markdown": str(paths[1]), "plots": ", ".join(p.name for p in paths[2:]),
            **{f"{HEADLINE} ({s})": summary[s] or "empty slice" for s in SLICES}}


def served_note(user_tower: str) -> str:
    """Which row of the report is the list `/v1/recommendations` returns."""
    if user_tower == "history":
        return ("served ranking: `llmrec` is the list /v1/recommendations returns (llmrec.ranking: the user's recent "
                "plays' mean embedding, catalogue mean removed); `llmrec-cf`, `hybrid` and `hybrid-tail` need ALS "
                "user factors and are not served")
    return ("served ranking: `llmrec-history` is the list /v1/recommendations returns; the headline `llmrec` "
            "(eval.user_tower=cf) needs ALS user factors and is not served")


def tuning_holdout_notes(run: RunDir, cfg: Config) -> list[str]:
    """A note when llmrec's training examples may include the validation plays its knobs are tuned on (examples
    built with `examples.hold_out_tuning_plays: false`, with another seed, or by a version that did not record
    it): llmrec's validation figures, and so the knobs of llmrec, hybrid and hybrid-tail, are then optimistic."""
    meta_path = run.examples / "meta.json"
    held = json.loads(meta_path.read_text()).get("tuning_holdout", {}) if meta_path.is_file() else {}
    if held.get("held_out") and held.get("seed") == cfg.seed:
        return []
    why = ("its examples were built with examples.hold_out_tuning_plays=false" if held.get("held_out") is False
           else f"its examples were built with seed {held['seed']}, not {cfg.seed}" if "seed" in held
           else f"{meta_path} does not record that the validation plays were held out (rerun `llmrec prepare`)")
    return [f"tuning: llmrec may have been trained on the validation plays its knobs are tuned on ({why}); the "
            "tuned settings of llmrec, hybrid and hybrid-tail may be optimistic"]


def subset_note(subset: dict) -> str:
    """What `catalog.max_songs` kept of the real catalogue (its record in catalog/meta.json)."""
    return (f"Catalogue cut to its {subset['songs'][1]:,} most-listened of {subset['songs'][0]:,} items "
            f"(`catalog.max_songs`): {subset['users'][1]:,} of {subset['users'][0]:,} users, "
            f"{subset['interactions'][1]:,} of {subset['interactions'][0]:,} user-item pairs.")


def dataset_notes(catalog: Catalog, cfg: Config, split: Split) -> list[str]:
    notes = []
    if catalog.meta.get("subset"):
        notes.append(subset_note(catalog.meta["subset"]))
    if catalog.meta.get("item_kind") == "artist":
        notes.append("Items are ARTISTS, not songs (lastfm-2k): 'songs' in this report are artists, and every "
                     "content model sees text only (artist name + user tags; no audio, cover or lyrics).")
    notes.append("Cold slice: CF models know nothing about songs without plays (MostPop, ItemKNN, ALS and BPR "
                 "give them all the same score: implicit leaves their factors at zero), and ties are broken in a "
                 "fixed random order, so their cold numbers are chance level; compare the content models (text, "
                 "text2cf, llmrec) there.")
    if split.kind != cfg.eval.split:
        notes.append(f"eval.split={cfg.eval.split!r} was requested; the catalog has no usable time axis, so the "
                     f"{split.kind!r} split was used (llmrec.split.split_catalog)")
    return notes


def split_summary(split: Split, data: EvalData, cfg: Config) -> dict[str, Any]:
    out = split.summary()
    out["requested"] = cfg.eval.split
    out["repeat_test_pairs_dropped"] = data.repeats_dropped  # test pairs already in train: masked, unreachable
    out["slices"] = {}
    for name in SLICES:
        test, cand = slice_test(data, name)
        out["slices"][name] = {
            "test_pairs": int(test.nnz),
            "test_users": int((np.diff(test.indptr) > 0).sum()),
            "users_skipped": int((np.diff(test.indptr) == 0).sum()),  # no test play in this slice
            "candidates": int(len(data.song_ids) if cand is None else cand.sum()),
            "empty": bool(test.nnz == 0),
        }
    return out


def best_cf(slice_results: dict[str, dict]) -> str | None:
    scored = [(r[HEADLINE], m) for m, r in slice_results.items() if m in CF_MODELS and not r.get("empty")]
    return max(scored)[1] if scored else None


def headline(results: dict, per_user: dict, n_boot: int, seed: int) -> dict[str, Any]:
    """Per slice: recall@20 with a 95% bootstrap CI (users resampled) for the best CF model, text and llmrec, and
    paired CIs of their differences."""
    out: dict[str, Any] = {}
    for slice_name in SLICES:
        cf = best_cf(results[slice_name])
        if cf is None:
            out[slice_name] = {"empty": True}
            continue
        pu = per_user[slice_name]
        entry: dict[str, Any] = {"metric": HEADLINE, "best_cf": cf, "models": {}, "differences": {}}
        for m in (cf, "text", "mm2cf", "llmrec", "llmrec-no-lm", "mm2cf-hybrid", "hybrid"):
            if m in pu:
                entry["models"][m] = bootstrap_ci(pu[m], n=n_boot, seed=seed)
        # llmrec - mm2cf and hybrid - mm2cf-hybrid are what the LLM adds over the same features without it.
        # llmrec - llmrec-no-lm: the same heads refitted without the LM state (train/head_refit.py).
        for a, b in (("text", cf), ("llmrec", cf), ("hybrid", cf), ("llmrec", "text"), ("llmrec", "mm2cf"),
                     ("hybrid", "mm2cf-hybrid"), ("llmrec", "llmrec-no-lm")):
            if a in pu and b in pu:
                entry["differences"][f"{a} - {b}"] = bootstrap_ci(pu[a], pu[b], n=n_boot, seed=seed)
        out[slice_name] = entry
    return out


def write_report(directory: Path, report: dict) -> list[Path]:
    """report.json, report.md and the PNG plots, each written atomically. Returns [json, md, *pngs]."""
    directory.mkdir(parents=True, exist_ok=True)
    plots = write_plots(directory, report)
    atomic_write_json(directory / "report.json", _jsonable(report))
    atomic_write_text(directory / "report.md", render_markdown(report, plots))
    return [directory / "report.json", directory / "report.md", *plots]


def _jsonable(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
