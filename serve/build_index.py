"""`llmrec serve --build-index`: the whole catalogue embedded with the serving engine (in process, or on Ray
actors with `features.engine: ray`) into runs/<name>/index/."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
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
    engine = engine or (load_engine(bdir, cfg.serve, embed_only=True) if cfg.features.engine != "ray" else None)
    inputs = song_inputs(cfg, run, bdir)
    ids = sorted(inputs.songs)
    batch = cfg.serve.embed_batch
    # Prompts are built chunk by chunk inside the progress bar: fitting a prompt to its budget tokenises it several
    # times, which at 100k songs is minutes of work that would otherwise run before any bar appears.
    chunks = ([inputs.catalog_embed_input(s, s) for s in ids[i : i + batch]] for i in range(0, len(ids), batch))
    bar = tqdm(total=len(ids), desc="embedding the catalogue", unit="song", disable=not progress)
    if cfg.features.engine == "ray":
        rows = embed_on_ray(chunks, bdir, cfg, bar)
    else:
        rows = [engine.embed(chunk) for chunk in _counted(chunks, bar)]
    s = cfg.serve
    index = SongIndex.build(np.concatenate(rows), ids, read_bundle_meta(bdir)["content_hash"], s.index,
                            nlist=s.ivf_nlist, nprobe=s.ivf_nprobe, hnsw_m=s.hnsw_m)
    index.save(run.index)
    return index


def _counted(chunks: Iterable, bar) -> Iterator:
    """`chunks` (lists of inputs or arrays of rows), advancing `bar` by each one's length as it is consumed; the bar
    is closed when they run out."""
    for chunk in chunks:
        yield chunk
        bar.update(len(chunk))
    bar.close()


def embed_on_ray(chunks: Iterable[list], bdir: Path, cfg: Config, bar) -> list[np.ndarray]:
    """Bulk embedding with `features.engine: ray` (as feature extraction scales out): one engine per Ray actor
    (`features.workers` of them, one CPU each, or the cluster named by RAY_ADDRESS), chunks in order; `bar`
    (a tqdm) advances by each chunk's rows as its result comes back."""
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
        # Each actor's engine is embed-only: its KV cache is the pooling engine's small fixed size
        # (serve.engines.vllm.pooling_kv_cache_bytes), not a share of the host's RAM, so actors need no split of it.
        pool = ActorPool([embedder.remote(str(bdir), cfg.serve) for _ in range(workers)])
        return list(_counted(_ordered_map(pool, chunks, in_flight=2 * workers), bar))
    finally:
        if started:
            ray.shutdown()


def _ordered_map(pool, chunks: Iterable[list], in_flight: int) -> Iterator[np.ndarray]:
    """Each chunk's embeddings, in order, with at most `in_flight` chunks submitted and not yet returned.

    `ActorPool.map` submits every value before it yields the first result: the driver built and held all 100k
    prompts (token ids and media rows) at once. Here the next chunk is built only as a result comes back, and
    `in_flight` = 2 per actor keeps one queued behind each running chunk so no actor waits on the driver."""
    submitted = 0
    for chunk in chunks:
        if submitted >= in_flight:
            yield pool.get_next()
            submitted -= 1
        pool.submit(lambda actor, c: actor.embed.remote(c), chunk)
        submitted += 1
    while pool.has_next():
        yield pool.get_next()


class RayEmbedder:
    """One engine in a Ray actor process."""

    def __init__(self, bdir: str, serve_cfg):
        import torch

        from serve.engines import load_engine

        torch.set_num_threads(1)  # Ray gives each actor one CPU: parallelism comes from the actors
        self.engine = load_engine(bdir, serve_cfg, embed_only=True)

    def embed(self, items):
        return self.engine.embed(items)
