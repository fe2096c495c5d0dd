"""`llmrec prepare`: load or generate the catalog into `runs/<name>/catalog/`, then build the training examples
into `runs/<name>/examples/` (data_prep.examples)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from data_prep.adapters import SOURCES, load_source
from llmrec.config import Config
from llmrec.io import RunDir, atomic_dir
from llmrec.schema import load_catalog, save_catalog


def _synthetic_is_current(cfg: Config, run: RunDir) -> bool:
    meta = run.catalog / "meta.json"
    if not meta.is_file():
        return False
    old = json.loads(meta.read_text())
    return (old.get("source") == "synthetic" and old.get("seed") == cfg.seed
            and old.get("config") == asdict(cfg.synthetic))


def build_catalog(cfg: Config, run: RunDir, progress: bool = True) -> dict:
    source = cfg.catalog.source
    if source not in SOURCES:
        raise ValueError(f"catalog.source {source!r} is not supported; choose one of {list(SOURCES)}")
    if source != "synthetic":
        # External sources are re-read every time: they are cheap to load and may have changed on disk.
        catalog = load_source(cfg)
        with atomic_dir(run.catalog) as tmp:
            save_catalog(catalog, tmp)
        status = f"loaded from {source} ({catalog.meta.get('path', cfg.catalog.path)})"
    elif _synthetic_is_current(cfg, run):
        catalog = load_catalog(run.catalog)
        status = "up to date (same seed and synthetic config), reused"
    else:
        from data_prep.synthetic import generate_catalog

        # Generated into a temporary directory and swapped in whole: a killed run never leaves half a catalog.
        with atomic_dir(run.catalog) as tmp:
            generate_catalog(cfg.synthetic, tmp, seed=cfg.seed, progress=progress)
        catalog = load_catalog(run.catalog)
        status = "generated"
    print(catalog.report.summary())
    return {
        "catalog": f"{run.catalog} ({status})",
        "songs": len(catalog.songs),
        "users": len(catalog.users),
        "interactions": len(catalog.interactions),
    }


def run_prepare(cfg: Config, run: RunDir, args: argparse.Namespace | None = None) -> dict:
    from data_prep.examples import build_examples

    progress = not getattr(args, "no_progress", False)
    result = build_catalog(cfg, run, progress=progress)
    result.update(build_examples(cfg, run, progress=progress))
    return result
