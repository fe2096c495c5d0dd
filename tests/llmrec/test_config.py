from __future__ import annotations

import pytest

from llmrec.config import Config, ConfigError, load_config, parse_override


def test_defaults_are_the_tiny_preset():
    cfg = load_config()
    assert cfg.preset == "tiny" and cfg.model.backbone == "tiny" and cfg.model.audio.name == "tiny-hubert"


def test_base_preset_names_the_production_models():
    cfg = load_config(preset="base")
    assert cfg.model.backbone == "baichuan-inc/Baichuan2-7B-Chat"
    assert cfg.model.audio.name == "m-a-p/MERT-v1-95M" and cfg.model.audio.sample_rate == 24000
    assert cfg.model.cover.name == "google/vit-base-patch16-224-in21k" and cfg.model.cover.image_size == 224
    assert cfg.train.deepspeed == "train/configs/zero3.json"


def test_overrides_are_typed_and_nested():
    cfg = load_config(extra_presets=["quick"], overrides=["synthetic.n_songs=50", "model.audio.tokens=8",
                                                          "model.lora_targets=[q_proj, v_proj]", "serve.api_key=null"])
    assert cfg.synthetic.n_songs == 50 and cfg.model.audio.tokens == 8
    assert cfg.model.lora_targets == ["q_proj", "v_proj"] and cfg.serve.api_key is None
    assert cfg.synthetic.n_users == 80  # from the quick preset
    assert parse_override("a.b=1.5") == {"a": {"b": 1.5}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("synthetic.n_song=5", r"synthetic: unknown key\(s\) \['n_song'\]; valid keys are"),
        ("synthetic.n_songs=many", r"synthetic.n_songs: expected an integer, got 'many'"),
        ("train.gradient_checkpointing=maybe", r"expected true/false"),
        ("model.lora_targets=q_proj", r"model.lora_targets: expected a list"),
        ("novalue", r"expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; choose one of \['base', 'quick', 'small', 'tiny'\]"):
        load_config(preset="huge")
    with pytest.raises(ConfigError, match=r"unknown preset 'small\+quick'"):  # an add-on, not a preset of its own
        load_config(preset="small+quick")


def test_quick_on_small_takes_quick_catalogue_and_small_model_steps():
    cfg = load_config(preset="small", extra_presets=["quick"])
    assert cfg.model.backbone == "smollm2" and cfg.synthetic.n_songs == 120  # quick's catalogue
    assert cfg.train.stage2_steps == 6 and not cfg.train.ablations  # steps sized for the 135M LM
    assert load_config(extra_presets=["quick"]).train.stage2_steps == 60  # tiny's quick is unchanged


def test_yaml_round_trip(tmp_path):
    cfg = load_config(preset="base", overrides=["seed=3"])
    cfg.save(tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg and isinstance(back, Config)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_floats_without_a_dot_are_numbers():
    # YAML 1.1 (PyYAML) reads `1e-3` as a string; `--set train.lr=1e-3` is what people type.
    from llmrec.config import ConfigError, load_config

    assert load_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3
    import pytest

    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config(overrides=["train.lr=fast"])
