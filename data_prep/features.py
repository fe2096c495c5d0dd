"""`llmrec features`: frozen audio/cover features in parallel sharded workers, plus text features.

Layout written under `runs/<name>/features/`:

    encoders/{audio,image}/      the tiny encoders' weights (seeded + pretrained), reused by train and serve
    shard-00000.safetensors      audio [n, L, K, D] f32, audio_present [n] u8, cover [n, 1, K, D] f32,
    shard-00001.safetensors ...  cover_present [n] u8; metadata: song_ids (JSON list), per-song status, hash
    manifest.json                per song {audio, audio_reason, cover, cover_reason, shard}, per shard sha256,
                                 the encoder config and the hash every shard was computed with
    text.safetensors             text [N, d] f32 (all-MiniLM-L6-v2 or TF-IDF + SVD); metadata song_ids

Shards and manifest: `data_prep/shards.py`; worker processes (pool or Ray): `data_prep/feature_workers.py`; text
features: `llmrec/text_features.py`; readers: `llmrec/features.py`.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data_prep.feature_workers import (
    WorkerSpec,
    encode_texts_on_ray,
    quiet_hf_progress,
    ray_session,
    run_in_process,
    run_pool,
    run_ray,
    start_fork_server,
)
from data_prep.shards import FORMAT_VERSION, Manifest, ShardTask, file_lock, plan_shards, read_json, select_shards
from llmrec.config import Config
from llmrec.io import RunDir, atomic_dir, atomic_write_json, dir_sha256
from llmrec.media import load_audio, load_image
from llmrec.model.encoders import is_tiny, spec_hash, weights_id
from llmrec.parallel import resolve_workers
from llmrec.schema import Catalog, load_catalog
from llmrec.text_features import build_text_features

ENGINES = ("pool", "ray")


# ------------------------------------------------------------------------------------------------ encoders


def weights_spec(cfg: Config) -> dict:
    """What decides the tiny encoders' weights: architecture, seed and the pretraining schedule."""
    m, f = cfg.model, cfg.features
    return {"audio": [m.audio.name, m.audio.sample_rate], "cover": [m.cover.name, m.cover.image_size],
            "seed": cfg.seed, "pretrain": [f.encoder_pretrain_steps, f.encoder_pretrain_batch,
                                           f.encoder_pretrain_songs]}


def prepare_encoders(cfg: Config, catalog: Catalog, enc_dir: Path, progress: bool = True) -> dict:
    """Make sure the run's tiny encoders exist in `enc_dir` (seeded + contrastive pretraining, done once, under a
    lock so parallel ranks build them once) and return their description and weight hashes."""
    info: dict = {"dir": str(enc_dir), "audio": asdict(cfg.model.audio), "cover": asdict(cfg.model.cover)}
    if is_tiny(cfg.model.audio.name) or is_tiny(cfg.model.cover.name):
        with file_lock(enc_dir.parent / ".encoders.lock"):
            spec = weights_spec(cfg)
            if read_json(enc_dir / "spec.json") != spec:
                _pretrain_into(cfg, catalog, enc_dir, spec, progress)
        info["pretrain"] = read_json(enc_dir / "pretrain.json")
    for kind, sub, enc in (("audio", "audio", cfg.model.audio), ("cover", "image", cfg.model.cover)):
        info[f"{kind}_weights"] = dir_sha256(enc_dir / sub) if is_tiny(enc.name) else weights_id(enc.name)
    return info


def _pretrain_into(cfg: Config, catalog: Catalog, enc_dir: Path, spec: dict, progress: bool) -> None:
    from llmrec.model.encoder_pretrain import pretrain_tiny_encoders

    audio_loader = partial(_load_audio_for_pretrain, sample_rate=cfg.model.audio.sample_rate,
                           max_seconds=cfg.features.max_audio_seconds)
    image_loader = partial(load_image, max_pixels=cfg.features.max_image_pixels)
    with atomic_dir(enc_dir) as tmp:
        report = pretrain_tiny_encoders(catalog, cfg, tmp, load_audio=audio_loader, load_image=image_loader,
                                        progress=progress)
        atomic_write_json(tmp / "spec.json", spec)
    for kind in ("audio", "image"):
        if kind in report and "loss_before" in report[kind]:
            r = report[kind]
            print(f"encoder pretraining ({kind}): InfoNCE {r['loss_before']:.3f} -> {r['loss_after']:.3f} "
                  f"in {r['steps']} steps ({r['seconds']:.1f}s)")


def _load_audio_for_pretrain(path, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Encoder pretraining takes random 1 s crops: of a long file, 4 x 5 s spread over it are plenty (and cheap to
    hold)."""
    return load_audio(path, sample_rate, windows=4, window_seconds=5.0, max_seconds=min(max_seconds, 60.0))


def features_hash(cfg: Config, encoders: dict) -> str:
    """Changes whenever the features' values could: encoder configs, weights, seed, decode limits, format."""
    return spec_hash({
        "format": FORMAT_VERSION, "audio": asdict(cfg.model.audio), "cover": asdict(cfg.model.cover),
        "audio_weights": encoders["audio_weights"], "cover_weights": encoders["cover_weights"], "seed": cfg.seed,
        "max_audio_seconds": cfg.features.max_audio_seconds, "max_image_pixels": cfg.features.max_image_pixels,
        "min_audio_seconds": cfg.features.min_audio_seconds,
    })


# ------------------------------------------------------------------------------------------------ the stage


def _clean_stale_temp_files(tasks: list[ShardTask]) -> None:
    """Remove half-written temporaries of this rank's shards left by a killed run (other ranks' are theirs)."""
    for task in tasks:
        path = Path(task.path)
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _text_encoder(cfg: Config, progress: bool):
    """Ray workers for the sentence encoder under `features.engine=ray` (MiniLM only: TF-IDF is fitted on the whole
    corpus in one process); None = in this process (`llmrec.text_features.encode_texts`)."""
    f = cfg.features
    if f.engine != "ray" or f.text_encoder != "minilm":
        return None
    # One progress bar: build_text_features' own, over the whole catalogue (its parts are Ray jobs of their own).
    return partial(encode_texts_on_ray, encoder=f.text_encoder, workers=resolve_workers(f.workers), progress=False)


def extract_features(cfg: Config, catalog: Catalog, out_dir: Path, progress: bool = True) -> dict:
    """Extract this rank's media shards (skipping finished ones) and, on rank 0, the text features."""
    f = cfg.features
    if f.engine not in ENGINES:
        raise ValueError(f"features.engine {f.engine!r}: choose one of {list(ENGINES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if f.engine == "pool" and resolve_workers(f.workers) > 1:
        start_fork_server(f.start_method)  # its imports overlap the encoders and the text features below
    encoders = prepare_encoders(cfg, catalog, out_dir / "encoders", progress)
    fhash = features_hash(cfg, encoders)
    plan = plan_shards(catalog, f.shard_size, out_dir)
    mine = select_shards(plan, f.shard_index, f.num_shards)
    header = {"format_version": FORMAT_VERSION, "features_hash": fhash, "encoders": encoders,
              "shard_size": f.shard_size, "num_songs": len(catalog.songs)}
    manifest = Manifest.open(out_dir / "manifest.json", header)
    todo = [t for t in mine if not manifest.is_done(t)]
    # Rank 0 writes the text features for the whole catalogue; before the media, while the fork server imports.
    text = None
    if f.shard_index == 0:
        encode = _text_encoder(cfg, progress)
        # One Ray instance for every part of the text features (ray_session is re-entrant): its workers keep
        # MiniLM loaded from one part to the next.
        with ray_session(resolve_workers(f.workers)) if encode is not None else nullcontext():
            text = build_text_features(catalog, cfg, out_dir, progress, encode=encode)
    _clean_stale_temp_files(todo)
    spec = WorkerSpec(cfg.model, str(out_dir / "encoders"), cfg.seed, fhash, f.max_audio_seconds,
                      f.min_audio_seconds, f.max_image_pixels)
    workers = min(resolve_workers(f.workers), max(1, len(todo)))
    stats = {"songs": 0, "rss": {}}
    bar = tqdm(total=sum(len(t.songs) for t in todo), unit="song", desc="features", disable=not progress)

    def on_done(record: dict) -> None:
        manifest.add(record)
        manifest.save(plan)
        stats["songs"] += len(record["song_ids"])
        stats["rss"][record["pid"]] = max(stats["rss"].get(record["pid"], 0.0), record["peak_rss_mb"])
        bar.update(len(record["song_ids"]))

    t0 = time.perf_counter()
    try:
        if todo and f.engine == "ray":
            run_ray(todo, spec, workers, on_done)
        elif todo and workers == 1:
            run_in_process(todo, spec, on_done)
        elif todo:
            run_pool(todo, spec, workers, on_done, f.start_method)
    finally:
        bar.close()
        manifest.save(plan, force=True)  # whatever finished is recorded, even when a shard failed
    media_seconds = time.perf_counter() - t0
    if text:
        manifest.extra["text"] = text
    manifest.save(plan, force=True)
    return {
        "plan": plan, "mine": mine, "computed": len(todo), "songs_computed": stats["songs"],
        "media_seconds": media_seconds, "songs_per_s": stats["songs"] / media_seconds if stats["songs"] else 0.0,
        "workers": workers, "peak_rss_mb": stats["rss"], "manifest": read_json(out_dir / "manifest.json"),
        "encoders": encoders, "text": text, "seconds": time.perf_counter() - t_start,
    }


def _modality_summary(manifest: dict, kind: str, examples: int = 3) -> str:
    """'142 ok, 2 missing (e.g. s00003: empty file, ...)': missing media are counted and named, never dropped."""
    counts = manifest.get("counts", {})
    text = f"{counts.get(f'{kind}_ok', 0)} ok, {counts.get(f'{kind}_missing', 0)} missing"
    if counts.get(f"{kind}_padded"):
        text += f", {counts[f'{kind}_padded']} shorter than one encoder patch (zero-padded to one)"
    missing = [f"{sid}: {rec[f'{kind}_reason']}" for sid, rec in manifest.get("songs", {}).items()
               if rec[kind] == "missing"][:examples]
    return text + (f" (e.g. {'; '.join(missing)}; reasons per song in manifest.json)" if missing else "")


def _speed(result: dict, engine: str) -> str:
    if not result["songs_computed"]:
        return "nothing to compute: every shard was up to date"
    rss = ", ".join(f"{v:.0f}" for v in result["peak_rss_mb"].values())
    return (f"{result['songs_per_s']:.1f} songs/s with {result['workers']} {engine} worker(s), "
            f"peak RSS {rss} MB")


def run_features(cfg: Config, run: RunDir, args: argparse.Namespace | None = None) -> dict:
    """`llmrec features`: returns what it wrote, for the CLI to print."""
    progress = not getattr(args, "no_progress", False)
    if not progress:
        quiet_hf_progress()
    catalog = load_catalog(run.require(run.catalog, "prepare"))
    result = extract_features(cfg, catalog, run.features, progress)
    m = result["manifest"]
    out = {
        "features": str(run.features),
        "shards": f"{m.get('num_shards_done', 0)}/{len(result['plan'])} done "
                  f"({result['computed']} computed now, {len(result['mine']) - result['computed']} reused)",
        "audio": _modality_summary(m, "audio"),
        "cover": _modality_summary(m, "cover"),
        "speed": _speed(result, cfg.features.engine),
        "encoders": result["encoders"]["dir"],
        "manifest": str(run.features / "manifest.json"),
    }
    if result["text"]:
        out["text"] = f"{run.features / 'text.safetensors'} ({result['text']['encoder']}, {result['text']['status']})"
    if not m.get("complete"):
        out["note"] = (f"features are incomplete: this rank ran shard slice {cfg.features.shard_index}/"
                       f"{cfg.features.num_shards}; run the other slices too")
    return out
