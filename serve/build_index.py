"""`llmrec serve --build-index`: the whole catalogue embedded with the serving engine (in process, or on Ray
actors with `features.engine: ray`) into runs/<name>/index/."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmrec.config import Config
from llmrec.io import RunDir
from serve.engines.base import Engine
from serve.index import SongIndex
from serve.state import bundle_dir, song_inputs


def build_index(cfg: Config, run: RunDir, engine: Engine | None = None, progress: bool = True) -> SongIndex:
    """Embed the whole catalogue in batches with the serving engine and write runs/<name>/index/ atomically."""
    from tqdm import tqdm

    from llmrec.model.bundle import read_bundle_meta
    from serve.engines import load_engine

    bdir = bundle_dir(run)
    engine = engine or (load_engine(bdir, cfg.serve) if cfg.features.engine != "ray" else None)
    inputs = song_inputs(cfg, run, bdir)
    ids = sorted(inputs.songs)
    chunks = [[inputs.catalog_embed_input(s, s) for s in ids[i : i + cfg.serve.embed_batch]]
              for i in range(0, len(ids), cfg.serve.embed_batch)]
    if cfg.features.engine == "ray":
        rows = embed_on_ray(chunks, bdir, cfg)
    else:
        rows = [engine.embed(c) for c in tqdm(chunks, desc="embedding the catalogue", disable=not progress)]
    s = cfg.serve
    index = SongIndex.build(np.concatenate(rows), ids, read_bundle_meta(bdir)["content_hash"], s.index,
                            nlist=s.ivf_nlist, nprobe=s.ivf_nprobe, hnsw_m=s.hnsw_m)
    index.save(run.index)
    return index


def embed_on_ray(chunks: list[list], bdir: Path, cfg: Config) -> list[np.ndarray]:
    """Bulk embedding with `features.engine: ray` (as feature extraction scales out): one engine per Ray actor
    (`features.workers` of them, one CPU each, or the cluster named by RAY_ADDRESS), chunks in order."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise RuntimeError('features.engine=ray needs Ray: pip install "llmrec[ray]"') from None
    from llmrec.parallel import resolve_workers

    workers = resolve_workers(cfg.features.workers)
    started = not ray.is_initialized()
    if started:
        kw = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers, "include_dashboard": False}
        ray.init(log_to_driver=False, **kw)
    try:
        embedder = ray.remote(num_cpus=1)(RayEmbedder)
        pool = ActorPool([embedder.remote(str(bdir), cfg.serve) for _ in range(workers)])
        return list(pool.map(lambda actor, chunk: actor.embed.remote(chunk), chunks))
    finally:
        if started:
            ray.shutdown()


class RayEmbedder:
    """One engine in a Ray actor process."""

    def __init__(self, bdir: str, serve_cfg):
        import torch

        from serve.engines import load_engine

        torch.set_num_threads(1)  # Ray gives each actor one CPU: parallelism comes from the actors
        self.engine = load_engine(bdir, serve_cfg)

    def embed(self, items):
        return self.engine.embed(items)
