"""Robust audio decoding for feature extraction: soundfile decode, mono, resample to the encoder's rate.

Every problem a user's file can have (missing, empty, corrupt, not audio, no frames, NaNs) raises `MediaError` with
a short reason; the extractor records that reason in the manifest and carries on with the rest of the catalog.
Long files are never decoded whole: past `max_seconds` only the encoder's windows are read (soundfile seeks), so
an hour-long upload costs a few seconds of audio in memory, not 600 MB.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf


class MediaError(ValueError):
    """A media file that cannot be used; `reason` is short and goes into the features manifest."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{reason}: {path}" if path is not None else reason)


def _info(path: Path):
    if not path.is_file():
        raise MediaError("file not found", path)
    if path.stat().st_size == 0:
        raise MediaError("empty file", path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise MediaError(f"unreadable audio ({_short(e)})", path) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError("no audio frames", path)
    return info


def _short(err: Exception) -> str:
    """libsndfile's own reason ("Format not recognised") without the path, which the manifest already names."""
    text = getattr(err, "error_string", None) or str(err).strip() or type(err).__name__
    return text.splitlines()[0][:120]


def resample(wave: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling by the reduced ratio (16 kHz -> 24 kHz is up 3, down 2)."""
    if src_rate == dst_rate:
        return wave
    from scipy.signal import resample_poly  # imported on first use: scipy.signal alone takes ~2 s to import

    ratio = Fraction(dst_rate, src_rate).limit_denominator(1000)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32, copy=False)


def _to_mono(block: np.ndarray) -> np.ndarray:
    return block.mean(axis=1) if block.ndim == 2 else block


def _read(f: sf.SoundFile, start: int, frames: int, path: Path) -> np.ndarray:
    try:
        f.seek(start)
        block = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise MediaError(f"corrupt audio data ({_short(e)})", path) from None
    return _to_mono(block)


def read_segments(path: Path, info, windows: int, window_seconds: float) -> list[np.ndarray]:
    """`windows` evenly spaced segments of `window_seconds`, each read with a seek: the rest is never decoded."""
    frames = min(info.frames, max(1, int(round(window_seconds * info.samplerate))))
    last = info.frames - frames
    starts = [int(round(s)) for s in np.linspace(0, last, max(1, windows))] if windows > 1 else [last // 2]
    with sf.SoundFile(str(path)) as f:
        return [_read(f, s, frames, path) for s in starts]


def load_audio(path: str | os.PathLike, sample_rate: int, *, windows: int = 1, window_seconds: float = 10.0,
               max_seconds: float = 600.0, min_seconds: float = 0.0) -> np.ndarray:
    """Decode `path` to mono float32 at `sample_rate`; fewer decoded samples than `min_seconds` is a MediaError
    (`features.min_audio_seconds`: a 10 ms clip, or a WAV truncated to a few samples, is not a song).

    Files up to `max_seconds` are decoded whole. Longer ones are read as `windows` evenly spaced segments of
    `window_seconds` concatenated: the encoder's even windowing then splits that back into exactly those segments,
    so the features equal those of a full decode up to resampling at the seams.
    """
    path = Path(path)
    info = _info(path)
    if info.frames > max_seconds * info.samplerate:
        segments = read_segments(path, info, windows, window_seconds)
    else:
        with sf.SoundFile(str(path)) as f:
            segments = [_read(f, 0, info.frames, path)]
    wave = np.concatenate([resample(s, info.samplerate, sample_rate) for s in segments])
    if wave.size == 0:
        raise MediaError("no audio frames", path)
    if wave.size < min_seconds * sample_rate:
        raise MediaError(f"audio too short ({wave.size / sample_rate:.3f} s decoded; features.min_audio_seconds="
                         f"{min_seconds:g})", path)
    if not np.isfinite(wave).all():
        raise MediaError("corrupt audio data (NaN or infinite samples)", path)
    return wave.astype(np.float32, copy=False)
