"""PyTorch port of musicnn's MagnaTagATune tagger (``MTT_musicnn``, Pons & Serra 2019).

The weights ship inside the PyPI wheel ``musicnn`` 0.1.0 as a TF1 checkpoint; we
read it with ``tf_checkpoint`` (no TensorFlow) and never import ``musicnn``
itself (it imports TensorFlow and librosa at module level).

Mirrors ``musicnn/models.py::build_musicnn`` and ``musicnn/extractor.py``:

- log-mel: 16 kHz, STFT n_fft 512 / hop 256 / periodic Hann / center=True,
  power 2, 96 Slaney mel bands (librosa defaults), then musicnn's
  ``x.astype(float16); log10(10000 * x + 1)`` which NumPy evaluates in float16
  — we reproduce that rounding, because the model was trained on it.
- non-overlapping 3 s patches (187 frames); the remainder frames are dropped.
- front-end (timbral 7x38 / 7x67 and temporal 128/64/32 convs, max over
  frequency) -> dense-connected 1-D mid-end -> max+mean temporal pooling ->
  dense 200 ("penultimate", after its batch norm) -> 50 tag logits.
  Batch norms use the checkpoint's moving statistics (inference mode).

Deliberate deviations from the original extractor (each documented where done):
every patch gets its own features (musicnn 0.1.0 repeats the first patch's
intermediate features for later patches); a bin whose ``10000 * x`` overflows
float16 is computed in float32 instead of becoming ``inf``; the STFT pads by
reflection as librosa < 0.10 did when the model was trained and released
(librosa >= 0.10 pads with zeros; only the first and last frame differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.model.tf_checkpoint import CheckpointError, read_checkpoint
from llmrec.model.wheels import package_dir

SAMPLE_RATE = 16000
PATCH_SECONDS = 3.0
N_FFT = 512
HOP_LENGTH = 256
N_MELS = 96
# librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1, as musicnn computes it.
PATCH_FRAMES = 187
_BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization default
_FLOAT16_MAX = 65504.0
_BN_NAMES = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))

# musicnn/configuration.py MTT_LABELS (copied so the config exists without the wheel).
MTT_LABELS = [
    'guitar', 'classical', 'slow', 'techno', 'strings', 'drums', 'electronic', 'rock', 'fast', 'piano',
    'ambient', 'beat', 'violin', 'vocal', 'synth', 'female', 'indian', 'opera', 'male', 'singing',
    'vocals', 'no vocals', 'harpsichord', 'loud', 'quiet', 'flute', 'woman', 'male vocal', 'no vocal', 'pop',
    'soft', 'sitar', 'solo', 'man', 'classic', 'choir', 'voice', 'new age', 'dance', 'male voice',
    'female vocal', 'beats', 'harp', 'cello', 'no voice', 'weird', 'country', 'metal', 'female voice', 'choral',
]  # fmt: skip


@dataclass
class MusicnnConfig:
    hidden_size: int = 200  # the penultimate embedding
    num_hidden_layers: int = 0
    sampling_rate: int = SAMPLE_RATE
    tag_names: list[str] = field(default_factory=lambda: list(MTT_LABELS))
    num_filters_midend: int = 64
    frontend_filters: float = 1.6  # timbral filters int(1.6*128)=204, temporal int(1.6*32)=51
    # librosa < 0.10 (what musicnn was trained and released with) pads the STFT by reflection;
    # librosa >= 0.10 pads with zeros ("constant"). Only the first and last frame differ.
    stft_pad_mode: str = "reflect"


# ---------------------------------------------------------------- log-mel ---


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """librosa.hz_to_mel(htk=False): the Slaney scale (linear below 1 kHz, log above)."""
    hz = np.atleast_1d(np.asarray(hz, dtype=np.float64))
    f_sp = 200.0 / 3
    mels = hz / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    log_t = hz >= min_log_hz
    mels[log_t] = min_log_mel + np.log(hz[log_t] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.atleast_1d(np.asarray(mels, dtype=np.float64))
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels) (Slaney scale and norm), [n_mels, 1 + n_fft//2]."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0)[0], _hz_to_mel(sr / 2.0)[0], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, len(fftfreqs)), dtype=np.float64)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def musicnn_log_mel(power_mel: torch.Tensor) -> torch.Tensor:
    """musicnn's ``x.astype(float16); np.log10(10000 * x + 1)``, float16 rounding included.

    NumPy keeps every step in float16 (a Python scalar does not promote a float16
    array), and the model was trained on those rounded values, so we round the
    same way: each float16 op is an exact float32 op rounded to float16.
    Where ``10000 * x`` overflows float16 NumPy yields ``inf`` (and the network
    NaN); there we use the float32 value instead.
    """
    x16 = power_mel.float().clamp(max=_FLOAT16_MAX).half().float()
    scaled32 = 10000.0 * x16
    scaled16 = scaled32.half().float()
    shifted = (scaled16 + 1.0).half().float()
    log16 = torch.log10(shifted).half().float()
    log32 = torch.log10(scaled32 + 1.0)
    return torch.where(torch.isfinite(scaled16), log16, log32)


# ---------------------------------------------------------------- network ---


def _tf_same_pad_time(x: torch.Tensor, kernel: int) -> torch.Tensor:
    # TF 'same': total kernel-1, the smaller half before (63/64 for kernel 128).
    total = kernel - 1
    return F.pad(x, (0, 0, total // 2, total - total // 2))


class _ConvBlock(nn.Module):
    """conv -> ReLU -> batch norm -> max over frequency (musicnn's timbral_block / tempo_block)."""

    def __init__(self, filters: int, kernel: tuple[int, int], same_time_pad: bool):
        super().__init__()
        self.conv = nn.Conv2d(1, filters, kernel)
        self.bn = nn.BatchNorm2d(filters, eps=_BN_EPS)
        self.same_time_pad = same_time_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 1, T, F] -> [B, filters, T]
        if self.same_time_pad:
            x = _tf_same_pad_time(x, self.conv.kernel_size[0])
        else:
            x = F.pad(x, (0, 0, 3, 3))
        return self.bn(F.relu(self.conv(x))).amax(dim=3)


class _MidendLayer(nn.Module):
    def __init__(self, in_channels: int, filters: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, filters, 7, padding=3)
        self.bn = nn.BatchNorm1d(filters, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


@dataclass
class MusicnnOutput:
    hidden_states: tuple[torch.Tensor, ...]  # ([B, P, 200],): the penultimate embedding per patch
    tag_logits: torch.Tensor  # [B, P, 50]; sigmoid gives musicnn's tag probabilities
    padded: torch.Tensor  # [B] bool: the wave was shorter than one patch and zero-padded


class MusicnnEncoder(nn.Module):
    """musicnn MTT tagger: raw 16 kHz waves -> per-3 s-patch 200-d embeddings and 50 tag logits."""

    # The log-mel is computed inside from the raw wave: do not normalise the wave first.
    expects_raw_waveform = True

    def __init__(self, config: MusicnnConfig | None = None):
        super().__init__()
        self.config = config or MusicnnConfig()
        timbral = int(self.config.frontend_filters * 128)
        temporal = int(self.config.frontend_filters * 32)
        mid = self.config.num_filters_midend
        n_classes = len(self.config.tag_names)
        self.input_bn = nn.BatchNorm2d(1, eps=_BN_EPS)
        self.timbral = nn.ModuleList(
            [_ConvBlock(timbral, (7, int(0.4 * N_MELS)), False), _ConvBlock(timbral, (7, int(0.7 * N_MELS)), False)]
        )
        self.temporal = nn.ModuleList([_ConvBlock(temporal, (k, 1), True) for k in (128, 64, 32)])
        frontend_channels = 2 * timbral + 3 * temporal
        self.midend = nn.ModuleList(
            [_MidendLayer(frontend_channels, mid), _MidendLayer(mid, mid), _MidendLayer(mid, mid)]
        )
        pooled = 2 * (frontend_channels + 3 * mid)
        self.pool_bn = nn.BatchNorm1d(pooled, eps=_BN_EPS)
        self.dense = nn.Linear(pooled, self.config.hidden_size)
        self.dense_bn = nn.BatchNorm1d(self.config.hidden_size, eps=_BN_EPS)
        self.classifier = nn.Linear(self.config.hidden_size, n_classes)
        self.register_buffer("mel_basis", torch.from_numpy(mel_filterbank()), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)

    # -------------------------------------------------------------- loading

    @classmethod
    def from_package(cls, model: str = "MTT_musicnn") -> "MusicnnEncoder":
        """Load the weights shipped in the ``musicnn`` wheel; returns the encoder in eval mode."""
        if model != "MTT_musicnn":
            raise ValueError(f"only 'MTT_musicnn' is ported, got {model!r}")
        checkpoint_dir = package_dir("musicnn", "musicnn", "the musicnn weights") / model
        weights = read_checkpoint(str(checkpoint_dir) + "/")
        encoder = cls()
        encoder.load_tf_weights(weights, source=checkpoint_dir)
        return encoder.eval()

    def load_tf_weights(self, weights: dict[str, np.ndarray], source: object = "checkpoint") -> None:
        """Copy musicnn's TF variables (tf.layers auto-names, in graph-construction order) into this module."""
        conv2d = [block.conv for block in (*self.timbral, *self.temporal)]
        conv1d = [layer.conv for layer in self.midend]
        bns = [self.input_bn, *(b.bn for b in (*self.timbral, *self.temporal)),
               *(layer.bn for layer in self.midend), self.pool_bn, self.dense_bn]  # fmt: skip
        state: dict[str, torch.Tensor] = {}
        names = {id(m): n for n, m in self.named_modules()}

        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in weights:
                raise CheckpointError(f"{source}: variable {name!r} missing from the checkpoint")
            array = weights[name]
            if tuple(array.shape) != shape:
                raise CheckpointError(f"{source}: variable {name!r} has shape {array.shape}, expected {shape}")
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

        def suffix(i: int) -> str:
            return "" if i == 0 else f"_{i}"

        for i, conv in enumerate(conv2d + conv1d):
            out_c, in_c, *kernel_size = conv.weight.shape
            name = f"conv2d{suffix(i)}/kernel"
            if len(kernel_size) == 1:  # mid-end: TF conv2d over a [T, C, 1] map == conv1d over C channels
                kernel = get(name, (kernel_size[0], in_c, 1, out_c))[:, :, 0, :].permute(2, 1, 0)
            else:  # TF HWIO -> torch OIHW
                kernel = get(name, (*kernel_size, in_c, out_c)).permute(3, 2, 0, 1)
            state[f"{names[id(conv)]}.weight"] = kernel.contiguous()
            state[f"{names[id(conv)]}.bias"] = get(f"conv2d{suffix(i)}/bias", (out_c,))
        for i, bn in enumerate(bns):
            n, p = bn.num_features, names[id(bn)]
            for tf_name, torch_name in _BN_NAMES:
                state[f"{p}.{torch_name}"] = get(f"batch_normalization{suffix(i)}/{tf_name}", (n,))
        for i, dense in enumerate((self.dense, self.classifier)):
            out_f, in_f = dense.weight.shape
            state[f"{names[id(dense)]}.weight"] = get(f"dense{suffix(i)}/kernel", (in_f, out_f)).T.contiguous()
            state[f"{names[id(dense)]}.bias"] = get(f"dense{suffix(i)}/bias", (out_f,))
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(f"{source}: weights do not fit (missing {missing}, unexpected {unexpected})")

    # -------------------------------------------------------------- forward

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> musicnn's log-mel [B, frames, 96] (frames = 1 + samples // 256)."""
        spec = torch.stft(
            waves.float(), N_FFT, HOP_LENGTH, window=self.window, center=True,
            pad_mode=self.config.stft_pad_mode, return_complex=True,
        )  # fmt: skip
        power = spec.real.square() + spec.imag.square()  # [B, 257, frames]
        mel = torch.matmul(self.mel_basis, power)  # [B, 96, frames]
        return musicnn_log_mel(mel).transpose(1, 2)

    def patches(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, samples] -> (log-mel patches [B, P, 187, 96], padded [B])."""
        if waves.dim() != 2:
            raise ValueError(f"expected waves [batch, samples], got shape {tuple(waves.shape)}")
        min_samples = int(PATCH_SECONDS * SAMPLE_RATE)  # 48000 samples -> 188 frames >= one patch
        short = waves.shape[1] < (PATCH_FRAMES - 1) * HOP_LENGTH
        if short:
            waves = F.pad(waves, (0, min_samples - waves.shape[1]))
        mel = self.log_mel(waves)
        n_patches = mel.shape[1] // PATCH_FRAMES  # non-overlapping; remainder frames dropped as musicnn does
        mel = mel[:, : n_patches * PATCH_FRAMES].reshape(mel.shape[0], n_patches, PATCH_FRAMES, N_MELS)
        padded = torch.full((waves.shape[0],), short, dtype=torch.bool, device=waves.device)
        return mel, padded

    def forward_patches(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel patches [N, T, 96] -> (penultimate [N, 200], logits [N, 50])."""
        x = self.input_bn(mel.unsqueeze(1))  # [N, 1, T, F]
        frontend = torch.cat([block(x) for block in (*self.timbral, *self.temporal)], dim=1)  # [N, 561, T]
        c1 = self.midend[0](frontend)
        c2 = self.midend[1](c1) + c1
        c3 = self.midend[2](c2) + c2
        features = torch.cat([frontend, c1, c2, c3], dim=1)  # [N, 753, T]
        # TF concatenates [max, mean] on a trailing axis and flattens: channel-major interleave.
        pooled = torch.stack([features.amax(dim=2), features.mean(dim=2)], dim=2).flatten(1)
        penultimate = self.dense_bn(F.relu(self.dense(self.pool_bn(pooled))))
        return penultimate, self.classifier(penultimate)

    def forward(self, waves: torch.Tensor, **_: object) -> MusicnnOutput:
        # **_: HF-style keywords (output_hidden_states=True) that MediaEncoder passes every audio model
        mel, padded = self.patches(waves)
        b, p = mel.shape[:2]
        penultimate, logits = self.forward_patches(mel.flatten(0, 1))
        return MusicnnOutput(
            hidden_states=(penultimate.view(b, p, -1),), tag_logits=logits.view(b, p, -1), padded=padded
        )


__all__ = [
    "MTT_LABELS", "PATCH_FRAMES", "PATCH_SECONDS", "SAMPLE_RATE", "MusicnnConfig", "MusicnnEncoder",
    "MusicnnOutput", "mel_filterbank", "musicnn_log_mel",
]  # fmt: skip
