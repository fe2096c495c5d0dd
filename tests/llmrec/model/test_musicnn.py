"""The PyTorch musicnn port against numbers from the original TensorFlow musicnn.

How the reference numbers were made (once, in a throwaway venv, 2026-12):
    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu librosa numpy tf-keras   # TF 2.21.0, tf_keras 2.21.0,
    /tmp/tfenv/bin/pip install --no-deps musicnn                       # librosa 0.11.0, numpy 2.4.6
    TF_USE_LEGACY_KERAS=1 /tmp/tfenv/bin/python ref.py
where ref.py builds ``reference_wave()`` below, writes it as a float32 WAV (soundfile,
subtype FLOAT, so librosa.load reads it back exactly) and calls the unmodified
``musicnn.extractor.extractor(path, model="MTT_musicnn", extract_features=True)``, with
one change: ``librosa.feature.melspectrogram`` is wrapped to pass ``pad_mode="reflect"``,
the default of the librosa musicnn was trained and released with (librosa >= 0.10 pads
with zeros; that moves these tag probabilities by up to 6e-3).
Recorded: the 50 tag probabilities of patches 0 and 1 (rounded to 6 decimals), the first
8 values of patch 0's penultimate embedding (later patches are not usable: musicnn 0.1.0
repeats the first patch's features), and the first log-mel values of patch 0.
At recording time the port differed from TF by at most 3.4e-6 (tags) and 2.5e-5 (embedding).

The wave is deliberately quiet: musicnn computes log10(10000 * x + 1) in float16, which
overflows to inf once a mel bin's power exceeds 6.55 (e.g. these sines at amplitudes
0.3 / 0.2); the original then outputs the same degenerate tags for every patch. The
port uses float32 for those bins instead (tested below).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmrec.model import musicnn
from llmrec.model.musicnn import MusicnnConfig, MusicnnEncoder
from llmrec.model.tf_checkpoint import CheckpointError, read_checkpoint

requires_wheel = pytest.mark.skipif(
    importlib.util.find_spec("musicnn") is None, reason="musicnn wheel not installed (pip install --no-deps musicnn)"
)

TF_TAGS_PATCH0 = [
    0.007260, 0.027116, 0.040388, 0.229200, 0.005233, 0.011650, 0.108420, 0.029045, 0.191265, 0.037840,
    0.019528, 0.010707, 0.000108, 0.000944, 0.061458, 0.000757, 0.000392, 0.000038, 0.000743, 0.000465,
    0.001196, 0.065756, 0.065796, 0.111945, 0.017741, 0.000050, 0.000271, 0.000807, 0.047925, 0.000847,
    0.012230, 0.000319, 0.010567, 0.000199, 0.003291, 0.000074, 0.000812, 0.002963, 0.015328, 0.000560,
    0.000580, 0.003526, 0.001374, 0.000031, 0.023199, 0.021337, 0.000004, 0.005206, 0.000433, 0.000075,
]  # fmt: skip
TF_TAGS_PATCH1 = [
    0.010162, 0.036224, 0.033021, 0.217855, 0.007675, 0.017585, 0.097768, 0.037227, 0.220662, 0.045332,
    0.016050, 0.012880, 0.000212, 0.001206, 0.056388, 0.000991, 0.000510, 0.000051, 0.000884, 0.000631,
    0.001448, 0.065439, 0.082603, 0.108424, 0.015679, 0.000057, 0.000392, 0.000940, 0.047300, 0.001086,
    0.010792, 0.000409, 0.010689, 0.000245, 0.004509, 0.000099, 0.000968, 0.002802, 0.016059, 0.000652,
    0.000773, 0.004646, 0.001931, 0.000052, 0.023238, 0.019785, 0.000007, 0.007655, 0.000568, 0.000109,
]  # fmt: skip
TF_PENULTIMATE_PATCH0_FIRST8 = [-0.079952, 0.485181, -0.092263, 0.756042, -0.078703, -0.170036, 0.501096, 0.275750]
# musicnn's log-mel of patch 0, frame 0, bands 0..5 (float16 values).
TF_LOGMEL_PATCH0_FRAME0 = [3.298828, 3.125, 2.882812, 2.890625, 3.466797, 3.886719]


def reference_wave(amplitudes: tuple[float, float] = (0.06, 0.04)) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(6.5 * 16000)) / 16000
    wave = (
        amplitudes[0] * np.sin(2 * np.pi * 220 * t)
        + amplitudes[1] * np.sin(2 * np.pi * 440 * t)
        + 0.05 * rng.standard_normal(len(t))
    )
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> MusicnnEncoder:
    return MusicnnEncoder.from_package()


@requires_wheel
def test_matches_tensorflow_musicnn(encoder):
    wave = torch.from_numpy(reference_wave())[None]
    with torch.no_grad():
        mel, _ = encoder.patches(wave)
        out = encoder(wave)
    # float32 rounding differences flip a handful of float16 roundings: one ulp (2e-3) at most.
    np.testing.assert_allclose(mel[0, 0, 0, :6].numpy(), TF_LOGMEL_PATCH0_FRAME0, atol=2e-3)
    probs = torch.sigmoid(out.tag_logits[0]).numpy()
    assert probs.shape == (2, 50)  # 6.5 s -> 407 frames -> 2 patches of 187, 33 frames dropped
    np.testing.assert_allclose(probs[0], TF_TAGS_PATCH0, atol=1e-4)
    np.testing.assert_allclose(probs[1], TF_TAGS_PATCH1, atol=1e-4)
    np.testing.assert_allclose(out.hidden_states[0][0, 0, :8].numpy(), TF_PENULTIMATE_PATCH0_FIRST8, atol=1e-4)
    assert not out.padded.any()


@requires_wheel
def test_short_wave_is_padded_to_one_patch(encoder):
    wave = torch.from_numpy(reference_wave()[:8000])[None]  # 0.5 s
    with torch.no_grad():
        out = encoder(wave)
    assert out.padded.tolist() == [True]
    assert out.hidden_states[0].shape == (1, 1, 200)
    assert out.tag_logits.shape == (1, 1, 50)
    assert torch.isfinite(out.tag_logits).all()


@requires_wheel
def test_output_shapes_and_patches_are_independent(encoder):
    wave = torch.from_numpy(reference_wave())
    waves = torch.stack([wave, wave.flip(0)])
    with torch.no_grad():
        out = encoder(waves)
        single = encoder(waves[1:])
    assert encoder.config.hidden_size == 200 and encoder.config.num_hidden_layers == 0
    assert len(encoder.config.tag_names) == 50 and encoder.config.tag_names[0] == "guitar"
    assert encoder.expects_raw_waveform and not encoder.training
    assert len(out.hidden_states) == 1
    assert out.hidden_states[0].shape == (2, 2, 200)
    assert out.tag_logits.shape == (2, 2, 50)
    assert out.padded.dtype == torch.bool and out.padded.tolist() == [False, False]
    # batching does not mix waves, and every patch gets its own embedding
    torch.testing.assert_close(out.tag_logits[1], single.tag_logits[0], atol=1e-4, rtol=0)
    assert not torch.allclose(out.hidden_states[0][0, 0], out.hidden_states[0][0, 1])


@requires_wheel
def test_loud_wave_stays_finite(encoder):
    # musicnn's float16 log overflows here (inf log-mel); the port must not.
    wave = torch.from_numpy(reference_wave((0.3, 0.2)))[None]
    with torch.no_grad():
        mel, _ = encoder.patches(wave)
        out = encoder(wave)
    assert mel.max() > np.log10(65504.0)  # the bins that overflow in float16
    assert torch.isfinite(out.tag_logits).all()


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps musicnn"):
        MusicnnEncoder.from_package()


@requires_wheel
def test_truncated_checkpoint_names_the_file(tmp_path, monkeypatch):
    package = Path(importlib.util.find_spec("musicnn").submodule_search_locations[0])
    fake = tmp_path / "musicnn"
    (fake / "MTT_musicnn").mkdir(parents=True)
    for name in (".index", ".data-00000-of-00001"):
        shutil.copy(package / "MTT_musicnn" / name, fake / "MTT_musicnn" / name)
    data = fake / "MTT_musicnn" / ".data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    fake_spec = SimpleNamespace(submodule_search_locations=[str(fake)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake_spec)
    with pytest.raises(CheckpointError, match=r"\.data-00000-of-00001 is truncated"):
        MusicnnEncoder.from_package()

    index = fake / "MTT_musicnn" / ".index"
    raw = bytearray(index.read_bytes())
    raw[100] ^= 0xFF  # flip a byte inside a data block: its checksum no longer matches
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"MTT_musicnn/\.index"):
        read_checkpoint(str(fake / "MTT_musicnn") + "/")


def test_mel_filterbank_is_slaney_normalised():
    fb = musicnn.mel_filterbank()
    assert fb.shape == (96, 257) and fb.dtype == np.float32
    # Slaney norm: each triangle's area is 2 / bandwidth-ish -> all rows non-empty and peaks shrink upward
    assert (fb.max(axis=1) > 0).all()
    assert fb[:, 0].sum() == 0.0  # the DC bin is the lower edge of the first triangle
    assert fb.max(axis=1)[-1] < fb.max(axis=1)[10]
    assert MusicnnConfig().stft_pad_mode == "reflect"
