"""Shared fixtures: one small synthetic catalog generated once per test session."""
from __future__ import annotations

import pytest

from data_prep.synthetic import generate_catalog
from llmrec.config import load_config


@pytest.fixture(scope="session")
def quick_config():
    return load_config(extra_presets=["quick"], overrides=["synthetic.audio_seconds=3.0"])


@pytest.fixture(scope="session")
def synthetic_catalog(tmp_path_factory, quick_config):
    """The quick synthetic catalog (144 songs, 80 users), written to disk once and shared read-only."""
    out = tmp_path_factory.mktemp("catalog")
    return generate_catalog(quick_config.synthetic, out, seed=0, progress=False)
