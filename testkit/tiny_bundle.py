"""A tiny *untrained* serving bundle and run directory, built in seconds without training: for the serving tests
(tests/serve/conftest.py) and the serving benchmark (bench/serve.py), where only shapes and speed matter.

The bundle has the exact layout `train/export.py` writes, and its media shapes match the run's tiny encoders
(`tiny-hubert`: 5 hidden-state layers x 4 tokens x 128, `tiny-vit`: 1 x 4 x 128), so features computed by
`MediaEncoder` from an upload fit it.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from llmrec.config import ModelConfig
from llmrec.model.mm_lm import MediaBatch, MMConfig
from llmrec.text import build_embed_prompt

# head_dim 64 (128 / 2): a head size every vLLM attention backend supports.
TINY_LM = ModelConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, max_positions=1024)
TINY_MM = MMConfig(projector="mlp2x_gelu", audio_layers=5, audio_tokens=4, audio_dim=128, cover_layers=1,
                   cover_tokens=4, cover_dim=128, embedding_dim=32, cf_dim=8)

GENRES = ["lo-fi", "rock", "jazz", "synth-pop", "folk", "hip-hop", "ambient", "metal"]
MOODS = ["mellow", "energetic", "dark", "dreamy", "uplifting", "melancholic"]
INSTRUMENTS = ["piano", "guitar", "Rhodes", "synth", "strings", "drums", "saxophone"]
WORDS = ["night", "rain", "city", "river", "summer", "neon", "window", "light", "road", "heart", "echo", "storm"]


def tiny_songs(n: int, seed: int = 0) -> list[dict]:
    """Catalog-like song rows (the fields `llmrec.text` builders read), deterministic for a seed."""
    rng = random.Random(seed)
    songs = []
    for i in range(n):
        title = " ".join(rng.sample(WORDS, rng.randint(1, 3))).title()
        songs.append({
            "song_id": f"s{i:05d}", "title": title, "artist": f"The {rng.choice(WORDS).title()}s",
            "album": rng.choice(WORDS).title(), "genres": rng.sample(GENRES, rng.randint(1, 2)),
            "tags": [rng.choice(MOODS), rng.choice(INSTRUMENTS)], "language": "en",
            "release_date": f"20{rng.randint(10, 25)}-01-01",
            "lyrics": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))),
            "comments": [f"{rng.choice(MOODS)} {rng.choice(INSTRUMENTS)} on a {rng.choice(WORDS)}"] * rng.randint(0, 3),
            "audio_path": "a.wav", "cover_path": "c.png",
        })
    return songs


def _corpus(songs: list[dict], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [build_embed_prompt(s).text for s in songs]
    texts += [f"Recommended because you replay {rng.choice(MOODS)} {rng.choice(GENRES)} {rng.choice(INSTRUMENTS)}, "
              f"and this track's {rng.choice(MOODS)} {rng.choice(INSTRUMENTS)} matches that {rng.choice(WORDS)}."
              for _ in range(300)]
    return texts


def build_tiny_bundle(out: str | Path, lm_cfg: ModelConfig = TINY_LM, mm_cfg: MMConfig = TINY_MM,
                      vocab: int = 600, seed: int = 0) -> str:
    """Export an untrained bundle (random Llama + projectors + heads) to `out`; returns its content hash."""
    from llmrec.model.backbone import build_tiny_llama, train_bpe_tokenizer
    from llmrec.model.mm_lm import MultimodalLM
    from train.export import export_bundle

    tokenizer = train_bpe_tokenizer(_corpus(tiny_songs(120, seed), seed), vocab_size=vocab)
    lm = build_tiny_llama(lm_cfg, tokenizer, seed=seed)
    torch.manual_seed(seed)
    model = MultimodalLM(lm, tokenizer, mm_cfg).eval()
    return export_bundle(model, Path(out), {"preset": "untrained-tiny", "backbone": "tiny"})


def wide_lm(hidden: int, layers: int) -> ModelConfig:
    """A wider untrained backbone for speed comparisons (head_dim 64)."""
    return replace(TINY_LM, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                   intermediate_size=int(hidden * 8 / 3) // 64 * 64)


def random_media(n_audio: int, n_cover: int, seed: int = 0, cfg: MMConfig = TINY_MM,
                 missing_every: int = 0) -> MediaBatch:
    """Random feature rows for `cfg` (every `missing_every`-th row marked absent when > 0)."""
    g = torch.Generator().manual_seed(seed)

    def present(n: int) -> torch.Tensor:
        p = torch.ones(n)
        if missing_every:
            p[::missing_every] = 0.0
        return p

    return MediaBatch(
        audio=torch.randn(n_audio, cfg.audio_layers, cfg.audio_tokens, cfg.audio_dim, generator=g),
        audio_present=present(n_audio),
        cover=torch.randn(n_cover, cfg.cover_layers, cfg.cover_tokens, cfg.cover_dim, generator=g),
        cover_present=present(n_cover),
    )


def write_random_features(features_dir: str | Path, song_ids: list[str], cfg: MMConfig = TINY_MM,
                          shard_size: int = 64, seed: int = 0) -> None:
    """Feature shards + manifest in the format `llmrec.features.load_media_features` reads (every 7th song without
    audio, every 11th without a cover), without running the encoders."""
    from safetensors.torch import save_file

    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ids = sorted(song_ids)
    shards = {}
    for n, start in enumerate(range(0, len(ids), shard_size)):
        chunk = ids[start : start + shard_size]
        idx = torch.arange(start, start + len(chunk))
        tensors = {
            "audio": torch.randn(len(chunk), cfg.audio_layers, cfg.audio_tokens, cfg.audio_dim, generator=g),
            "audio_present": (idx % 7 != 0).to(torch.uint8),
            "cover": torch.randn(len(chunk), cfg.cover_layers, cfg.cover_tokens, cfg.cover_dim, generator=g),
            "cover_present": (idx % 11 != 0).to(torch.uint8),
        }
        name = f"shard-{n:05d}.safetensors"
        save_file(tensors, str(features_dir / name), metadata={"song_ids": json.dumps(chunk)})
        shards[name] = {"index": n, "song_ids_sha": hashlib.sha256(json.dumps(chunk).encode()).hexdigest()}
    (features_dir / "manifest.json").write_text(json.dumps({"complete": True, "shards": shards}))


def make_serve_run(root: str | Path, catalog_dir: str | Path, bundle_dir: str | Path, cfg) -> "object":
    """A run directory the server can serve: `catalog_dir` and `bundle_dir` linked in, random features for every
    song, `cfg` saved as its config. No index yet."""
    from llmrec.io import open_run_dir
    from llmrec.schema import load_catalog

    run = open_run_dir(root)
    run.catalog.symlink_to(Path(catalog_dir).resolve(), target_is_directory=True)
    run.model.mkdir(exist_ok=True)
    (run.model / "bundle").symlink_to(Path(bundle_dir).resolve(), target_is_directory=True)
    write_random_features(run.features, list(load_catalog(run.catalog).songs["song_id"]))
    cfg.save(run.config)
    return run
