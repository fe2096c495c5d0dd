"""Encoder pretraining for the tiny media encoders (not "stage 0", which is the tiny backbone's text pretraining in
`llmrec train`): a short SimCLR-style contrastive pretraining on the catalog's own media.

Real MERT/ViT weights cannot be downloaded here, and a randomly initialised encoder gives features that stage 1/2
projectors can barely use. So each tiny encoder learns, for a few dozen steps, to map two augmented views of the
same clip / cover close together and views of different songs apart (symmetric InfoNCE). The augmentations keep
what the catalog encodes on purpose — tempo, instrument and mode in audio (random crops, gain, light noise), mood
palette and shape in covers (crops, flips, a *small* colour jitter, so that palette stays informative).

Only the backbones are kept (`save_pretrained` into `out_dir/audio`, `out_dir/image`); the projection heads are
discarded, as in SimCLR. The InfoNCE loss on fixed held-out views is reported before and after.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from llmrec.config import Config
from llmrec.io import atomic_write_json
from llmrec.model.encoders import (
    build_audio_encoder,
    build_image_encoder,
    image_normalisation,
    image_to_pixels,
    is_tiny,
    normalise_waves,
    save_encoder,
)
from llmrec.model.losses import info_nce

TEMPERATURE = 0.1
LR = 1e-3
AUDIO_CROP_SECONDS = 1.0
EVAL_SONGS = 32


# ------------------------------------------------------------------------------------------------ pieces


class ContrastiveHead(torch.nn.Module):
    """SimCLR's projection MLP: the loss acts on its output, the backbone's features stay more general."""

    def __init__(self, dim: int, out: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def audio_view(wave: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop with random gain and light white noise (10-30 dB SNR)."""
    if wave.size < crop:
        wave = np.pad(wave, (0, crop - wave.size))
    start = int(rng.integers(0, wave.size - crop + 1))
    x = wave[start : start + crop] * rng.uniform(0.5, 1.5)
    snr_db = rng.uniform(10, 30)
    noise = rng.standard_normal(crop) * (np.std(x) + 1e-6) / (10 ** (snr_db / 20))
    return (x + noise).astype(np.float32)


def image_view(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random resized crop (60-100 % of the area), horizontal flip, +-10 % brightness and saturation."""
    _, h, w = img.shape
    scale = np.sqrt(rng.uniform(0.6, 1.0))
    ch, cw = max(2, int(h * scale)), max(2, int(w * scale))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    x = F.interpolate(img[None, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear",
                      align_corners=False)[0]
    if rng.random() < 0.5:
        x = x.flip(-1)
    grey = x.mean(0, keepdim=True)
    x = grey + (x - grey) * rng.uniform(0.9, 1.1)  # saturation
    return (x * rng.uniform(0.9, 1.1)).clamp(0, 1)  # brightness


# ------------------------------------------------------------------------------------------------ media


def _simple_audio_loader(path: Path, sample_rate: int) -> np.ndarray:
    """Fallback decoder (the extractor passes data_prep's robust one): whole file, mono, polyphase resampling."""
    import soundfile as sf
    from scipy.signal import resample_poly

    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = wave.mean(1)
    return wave if sr == sample_rate else resample_poly(wave, sample_rate, sr).astype(np.float32)


def _simple_image_loader(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@dataclass
class PretrainMedia:
    waves: list[np.ndarray]
    images: torch.Tensor  # [N, 3, S, S] in [0, 1]
    skipped: dict[str, int]


def collect_media(catalog, cfg: Config, load_audio: Callable | None, load_image: Callable | None,
                  max_songs: int) -> PretrainMedia:
    """Decode the media of the first `max_songs` songs (sorted ids); unreadable files are skipped and counted."""
    load_audio = load_audio or (lambda p: _simple_audio_loader(p, cfg.model.audio.sample_rate))
    load_image = load_image or _simple_image_loader
    songs = catalog.songs.sort_values("song_id").head(max_songs)
    waves, images, skipped = [], [], {"audio": 0, "cover": 0}
    size = cfg.model.cover.image_size
    for audio_rel, cover_rel in zip(songs.audio_path, songs.cover_path):
        for kind, rel in (("audio", audio_rel), ("cover", cover_rel)):
            path = catalog.media_path(rel)
            try:
                if path is None:
                    raise FileNotFoundError(kind)
                if kind == "audio":
                    waves.append(load_audio(path))
                else:  # kept in [0, 1]: augmentation comes first, normalisation last
                    images.append(image_to_pixels(load_image(path), size, (0, 0, 0), (1, 1, 1)))
            except Exception:  # noqa: BLE001 - a bad file costs one training example, counted below
                skipped[kind] += 1
    stacked = torch.stack(images) if images else torch.zeros(0, 3, size, size)
    return PretrainMedia(waves, stacked, skipped)


# ------------------------------------------------------------------------------------------------ the loop


def _audio_batch(waves, idx, crop, rng) -> torch.Tensor:
    return normalise_waves(torch.from_numpy(np.stack([audio_view(waves[i], crop, rng) for i in idx])))


def _image_batch(images, idx, rng, mean, std) -> torch.Tensor:
    x = torch.stack([image_view(images[i], rng) for i in idx])
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train_contrastive(embed: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, dim: int, n: int,
                      make_batch: Callable[[np.ndarray, np.random.Generator], torch.Tensor], steps: int,
                      batch_size: int, seed: int, desc: str, progress: bool) -> dict:
    """Generic SimCLR loop: two views per item, InfoNCE through a projection head, loss on fixed eval views."""
    torch.manual_seed(seed)
    head = ContrastiveHead(dim)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

    eval_rng = np.random.default_rng([seed, 1])
    eval_idx = np.arange(min(n, EVAL_SONGS))
    eval_views = (make_batch(eval_idx, eval_rng), make_batch(eval_idx, eval_rng))

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(info_nce(head(embed(eval_views[0])), head(embed(eval_views[1])), TEMPERATURE))

    before = eval_loss()
    rng = np.random.default_rng([seed, 2])
    t0 = time.perf_counter()
    model.train()
    bs = min(batch_size, n)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, unit="step"):
        idx = rng.choice(n, size=bs, replace=False)
        loss = info_nce(head(embed(make_batch(idx, rng))), head(embed(make_batch(idx, rng))), TEMPERATURE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    after = eval_loss()
    model.eval()
    return {"loss_before": before, "loss_after": after, "steps": steps, "batch_size": bs, "items": n,
            "eval_items": len(eval_idx), "seconds": round(seconds, 2)}


def pretrain_audio(model, media: PretrainMedia, cfg: Config, progress: bool = True) -> dict:
    sr = cfg.model.audio.sample_rate
    crop = int(min(AUDIO_CROP_SECONDS, cfg.model.audio.window_seconds) * sr)
    make = lambda idx, rng: _audio_batch(media.waves, idx, crop, rng)  # noqa: E731
    embed = lambda x: model(x).last_hidden_state.mean(1)  # noqa: E731
    return train_contrastive(embed, model, model.config.hidden_size, len(media.waves), make,
                             cfg.features.encoder_pretrain_steps, cfg.features.encoder_pretrain_batch,
                             cfg.seed, "encoder pretraining: audio", progress)


def pretrain_image(model, media: PretrainMedia, cfg: Config, progress: bool = True) -> dict:
    _, mean, std = image_normalisation(cfg.model.cover)
    make = lambda idx, rng: _image_batch(media.images, idx, rng, mean, std)  # noqa: E731
    embed = lambda x: model(pixel_values=x).last_hidden_state[:, 1:].mean(1)  # noqa: E731
    return train_contrastive(embed, model, model.config.hidden_size, len(media.images), make,
                             cfg.features.encoder_pretrain_steps, cfg.features.encoder_pretrain_batch,
                             cfg.seed + 1, "encoder pretraining: image", progress)


def pretrain_tiny_encoders(catalog, cfg: Config, out_dir: str | Path, *, load_audio: Callable | None = None,
                           load_image: Callable | None = None, progress: bool = True) -> dict:
    """Build the tiny encoders from `cfg.seed`, pretrain them contrastively on `catalog`'s media and save them as
    `out_dir/audio` and `out_dir/image`; returns (and writes to `out_dir/pretrain.json`) the losses before/after.

    Real encoders (hub names) are left alone: they are pretrained already. `load_audio(path) -> wave` at the
    encoder's rate and `load_image(path) -> RGB PIL image` let the caller supply robust decoders.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_audio, tiny_image = is_tiny(cfg.model.audio.name), is_tiny(cfg.model.cover.name)
    report: dict = {"steps": cfg.features.encoder_pretrain_steps, "seed": cfg.seed}
    if not (tiny_audio or tiny_image):
        return report
    media = collect_media(catalog, cfg, load_audio, load_image, cfg.features.encoder_pretrain_songs)
    report["skipped_media"] = media.skipped
    with torch.random.fork_rng(devices=[]), _torch_threads(cfg.features.encoder_pretrain_threads):
        if tiny_audio:
            model = build_audio_encoder(cfg.model.audio, seed=cfg.seed)
            report["audio"] = _maybe_train(pretrain_audio, model, media, len(media.waves), cfg, progress)
            save_encoder(model, out_dir / "audio")
        if tiny_image:
            model = build_image_encoder(cfg.model.cover, seed=cfg.seed + 1)
            report["image"] = _maybe_train(pretrain_image, model, media, len(media.images), cfg, progress)
            save_encoder(model, out_dir / "image")
    atomic_write_json(out_dir / "pretrain.json", report)
    return report


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with `n` torch threads (0 = leave torch's setting), restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _maybe_train(fn, model, media, n_items: int, cfg: Config, progress: bool) -> dict:
    """InfoNCE needs at least two items (one positive, one negative); with fewer, keep the seeded weights."""
    if n_items < 2 or cfg.features.encoder_pretrain_steps <= 0:
        return {"skipped": f"{n_items} usable item(s), {cfg.features.encoder_pretrain_steps} step(s)"}
    return fn(model, media, cfg, progress)
