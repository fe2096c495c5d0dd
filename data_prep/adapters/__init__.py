"""Catalog adapters: every source becomes the same validated `Catalog` (llmrec/schema.py).

`load_source(cfg)` picks the adapter named by `cfg.catalog.source`:

* `synthetic` — the embedded generated catalog (data_prep/synthetic.py), generated into a temporary directory;
* `table` — CSV/TSV/Parquet/JSONL files in `catalog.path` with an optional `catalog.column_map` (table.py);
* `lastfm` — hetrec2011-lastfm-2k, items are artists (lastfm.py);
* `nowplaying` — nowplaying-rs2020, songs with titles and artists only, no timestamps (nowplaying.py).

A real source may be cut to its `catalog.max_songs` most-listened songs (subset.py).
"""
from __future__ import annotations

import tempfile

from llmrec.config import Config
from llmrec.schema import Catalog

SOURCES = ("synthetic", "table", "lastfm", "nowplaying")


def load_source(cfg: Config) -> Catalog:
    catalog = _load_whole_source(cfg)
    if cfg.catalog.source == "synthetic":
        return catalog  # the generator has its own size settings (synthetic.n_songs)
    from data_prep.adapters.subset import most_listened

    return most_listened(catalog, cfg.catalog.max_songs)  # the whole catalogue unless catalog.max_songs > 0


def _load_whole_source(cfg: Config) -> Catalog:
    source = cfg.catalog.source
    if source == "table":
        from data_prep.adapters.table import load_table_catalog

        return load_table_catalog(cfg.catalog)
    if source == "lastfm":
        from data_prep.adapters.lastfm import load_lastfm_catalog

        return load_lastfm_catalog(cfg.catalog)
    if source == "nowplaying":
        from data_prep.adapters.nowplaying import load_nowplaying_catalog

        return load_nowplaying_catalog(cfg.catalog)
    if source == "synthetic":
        from data_prep.synthetic import generate_catalog

        # The catalog keeps relative media paths, so it must live somewhere that outlives this call; `llmrec
        # prepare` generates straight into the run directory instead (data_prep/prepare.py).
        out = tempfile.mkdtemp(prefix="llmrec-synthetic-")
        return generate_catalog(cfg.synthetic, out, seed=cfg.seed, progress=False)
    raise ValueError(f"catalog.source {source!r} is not supported; choose one of {list(SOURCES)}")
