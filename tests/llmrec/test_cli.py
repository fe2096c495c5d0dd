from __future__ import annotations

import pytest

from llmrec import cli
from llmrec.config import load_config


@pytest.mark.slow
def test_demo_quick_runs_the_small_preset_end_to_end_and_reports_where(tmp_path, capsys):
    """The default demo's preset (`small`: SmolLM2-135M + musicnn + EfficientNet-Lite0 from the PyPI wheels) trains,
    evaluates beside the no-LLM bar and serves, on the quick catalogue."""
    import json

    run_dir = tmp_path / "demo"
    assert cli.main(["demo", "--run-dir", str(run_dir), "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (run_dir / "catalog" / "songs.parquet").is_file()
    assert f"Everything it produced is under {run_dir.resolve()}" in out
    saved = load_config(run_dir / "config.yaml")
    assert saved.synthetic.n_songs == 120 and saved.name == "demo" and saved.preset == "small"
    manifest = json.loads((run_dir / "features" / "manifest.json").read_text())
    assert manifest["counts"]["audio_ok"] > 100 and manifest["counts"]["cover_ok"] > 100  # real encoders ran
    bundle = json.loads((run_dir / "model" / "bundle" / "bundle.json").read_text())
    assert bundle["backbone"] == "smollm2"
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    for model in ("llmrec", "mm2cf", "hybrid", "mm2cf-hybrid"):
        assert 0.0 <= report["results"]["cold"][model]["recall@20"] <= 1.0, model
    assert "/v1/recommendations for" in out and out.count("reason: ") >= 1
    # A second run reuses the identical catalog instead of regenerating it.
    assert cli.main(["prepare", "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_every_stage_resolves_to_its_entry_point():
    for name in cli.STAGES:
        assert callable(cli.resolve_stage(name)), name


def test_a_missing_optional_package_names_it_and_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli.STAGES, "train", ("tests_fake_pkg_xyz.stage", "run"))
    assert cli.main(["train", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs the Python package 'tests_fake_pkg_xyz'" in err and 'pip install -e ".[cpu]"' in err


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["prepare", "--run-dir", str(tmp_path), "--set", "synthetic.n_songs=abc"]) == 2
    assert "synthetic.n_songs: expected an integer" in capsys.readouterr().err


def test_unsupported_source_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["prepare", "--run-dir", str(tmp_path), "--set", "catalog.source=spotify"]) == 2
    assert "catalog.source 'spotify' is not supported" in capsys.readouterr().err
