"""Serving fixtures: a tiny *untrained* bundle built in seconds (no training), and request rows for it.

The bundle has the exact layout `train/export.py` writes (merged LM dir + tokenizer, multimodal weights, bundle.json
with a content hash), and its media shapes match the run's tiny encoders (`tiny-hubert`: 5 hidden-state layers x
4 tokens x 128, `tiny-vit`: 1 x 4 x 128), so features computed by `MediaEncoder` from an upload fit it. Every
engine test (HF and vLLM) runs against this bundle: random weights are fine for "same output from both engines".
"""
from __future__ import annotations

import random

import pytest
import torch

from llmrec.config import ModelConfig
from llmrec.model.backbone import build_tiny_llama, train_bpe_tokenizer
from llmrec.model.mm_lm import MediaBatch, MMConfig, MultimodalLM
from llmrec.text import build_embed_prompt, build_stage2_prompt
from serve.engines.base import EngineInput
from train.export import export_bundle

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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Path of an untrained serving bundle (bundle.json, lm/, multimodal.safetensors): built once per session."""
    songs = tiny_songs(120)
    tokenizer = train_bpe_tokenizer(_corpus(songs), vocab_size=600)
    lm = build_tiny_llama(TINY_LM, tokenizer, seed=0)
    torch.manual_seed(0)
    model = MultimodalLM(lm, tokenizer, TINY_MM).eval()
    out = tmp_path_factory.mktemp("serve") / "bundle"
    export_bundle(model, out, {"preset": "test-tiny", "backbone": "tiny"})
    return out


@pytest.fixture(scope="session")
def media_factory():
    """`media_factory(n_audio, n_cover, seed=0, missing_every=0) -> MediaBatch` for the tiny bundle's shapes."""
    return random_media


@pytest.fixture(scope="session")
def embed_inputs():
    """Embedding requests of varied prompt lengths: one audio + one cover row each (the 3rd song has no audio)."""
    songs = tiny_songs(6, seed=1)
    return [EngineInput(build_embed_prompt(s).text, random_media(1, 1, seed=10 + i, missing_every=1 if i == 2 else 0))
            for i, s in enumerate(songs)]


@pytest.fixture(scope="session")
def reason_inputs():
    """Stage-2 reason requests: 0..4 history songs + a candidate, media rows in placeholder order."""
    songs = tiny_songs(12, seed=2)
    items = []
    for i, n_hist in enumerate([0, 1, 3, 4]):
        prompt = build_stage2_prompt(songs[i + 1 : i + 1 + n_hist], songs[i])
        items.append(EngineInput(prompt.text, random_media(len(prompt.audio_song_ids), len(prompt.cover_song_ids),
                                                           seed=100 + i)))
    return items


def write_random_features(features_dir, song_ids: list[str], cfg: MMConfig = TINY_MM, shard_size: int = 64,
                          seed: int = 0) -> None:
    """Feature shards + manifest in the format `llmrec.features.load_media_features` reads (every 7th song without
    audio, every 11th without a cover), without running the encoders."""
    import hashlib
    import json

    from safetensors.torch import save_file

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


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, synthetic_catalog, tiny_bundle, quick_config):
    """A run directory the server can serve: the quick synthetic catalog (linked), random features for every song,
    the tiny bundle (linked) as model/bundle, and the resolved config. No index yet (tests build it)."""
    import copy

    from llmrec.io import open_run_dir

    run = open_run_dir(tmp_path_factory.mktemp("runs") / "serve-test")
    run.catalog.symlink_to(synthetic_catalog.root.resolve(), target_is_directory=True)
    run.model.mkdir()
    (run.model / "bundle").symlink_to(tiny_bundle.resolve(), target_is_directory=True)
    write_random_features(run.features, list(synthetic_catalog.songs["song_id"]))
    cfg = copy.deepcopy(quick_config)
    cfg.name = "serve-test"
    cfg.serve.engine = "hf"
    cfg.save(run.config)
    return cfg, run
