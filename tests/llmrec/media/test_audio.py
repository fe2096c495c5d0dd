"""Audio decoding: every bad input becomes a MediaError with a reason; long files are read by windows only."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from llmrec.media.audio import MediaError, load_audio, resample


def write_wav(path, wave, sr, subtype="PCM_16"):
    sf.write(str(path), wave, sr, subtype=subtype, format="WAV")
    return path


def test_decodes_mono_and_resamples_to_encoder_rate(tmp_path):
    t = np.arange(16000) / 16000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1) * 0.5
    path = write_wav(tmp_path / "a.wav", stereo, 16000)
    wave = load_audio(path, 24000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == 24000  # 1 s at 24 kHz
    # Still a 440 Hz tone after resampling (peak of the spectrum).
    freq = np.fft.rfftfreq(len(wave), 1 / 24000)[np.argmax(np.abs(np.fft.rfft(wave)))]
    assert abs(freq - 440) < 2


def test_resample_ratio_is_reduced():
    assert len(resample(np.zeros(44100, np.float32), 44100, 24000)) == 24000


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 7), "unreadable audio"),
        (lambda p: write_wav(p, np.zeros(0, np.int16), 16000), "no audio frames"),
        (lambda p: Image.new("RGB", (8, 8)).save(p, format="PNG"), "unreadable audio"),  # a PNG passed as audio
    ],
    ids=["empty", "corrupt-bytes", "zero-length-wav", "png-as-audio"],
)
def test_bad_audio_raises_media_error_with_reason(tmp_path, make, reason):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(MediaError) as err:
        load_audio(path, 24000)
    assert err.value.reason.startswith(reason)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match="file not found"):
        load_audio(tmp_path / "nope.wav", 24000)


def test_nan_samples_are_refused(tmp_path):
    wave = np.zeros(1000, np.float32)
    wave[10] = np.nan
    path = write_wav(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(MediaError, match="NaN"):
        load_audio(path, 16000)


def test_hour_long_file_reads_only_the_windows(tmp_path):
    """A 3600 s file (8 kHz int16, 57.6 MB) is never decoded whole: only `windows` x `window_seconds` are read."""
    path = tmp_path / "hour.wav"
    sr, block = 8000, np.zeros(8000 * 60, np.int16)
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=1, subtype="PCM_16", format="WAV") as f:
        for minute in range(60):
            block[:] = minute  # a different level per minute, to check where the windows were read from
            f.write(block)
    tracemalloc.start()
    try:
        wave = load_audio(path, 24000, windows=3, window_seconds=2.0, max_seconds=600)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(wave) == 3 * 2 * 24000
    assert peak < 8 * 1024 * 1024  # a full float32 decode would take 460 MB
    # Windows evenly spaced over the whole hour: the first minute, the middle, the last minute.
    levels = [np.median(wave[i * 48000:(i + 1) * 48000]) * 32768 for i in range(3)]
    assert levels == pytest.approx([0, 29, 59], abs=1.01)


def test_short_file_is_decoded_whole(tmp_path):
    path = write_wav(tmp_path / "s.wav", np.full(24000 * 3, 0.1, np.float32), 24000)
    assert len(load_audio(path, 24000, windows=2, window_seconds=1.0, max_seconds=600)) == 24000 * 3


def test_a_10ms_clip_and_a_truncated_wav_are_refused_as_too_short(tmp_path):
    """Defect: a WAV truncated to 28 samples and a 10 ms WAV passed as audio (in `features` and in uploads)."""
    t = np.arange(16000) / 16000
    tiny = write_wav(tmp_path / "10ms.wav", 0.3 * np.sin(2 * np.pi * 440 * t[:160]), 16000)
    full = write_wav(tmp_path / "full.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(full.read_bytes()[:44 + 56])  # the header claims 1 s; 28 16-bit samples are there
    for path in (tiny, truncated):
        with pytest.raises(MediaError, match=r"audio too short .*features.min_audio_seconds=0.25"):
            load_audio(path, 16000, min_seconds=0.25)
    assert len(load_audio(full, 16000, min_seconds=0.25)) == 16000
    assert len(load_audio(tiny, 16000)) == 160  # no minimum asked: decoded as is
