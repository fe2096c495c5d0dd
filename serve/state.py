"""What the server serves from a run directory: the engine (behind the batcher), the song index, the catalogue as
the engines see it (with the users' histories), the reason writer and the settings (`ServerState`, `load_state`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llmrec.config import Config
from llmrec.io import RunDir
from llmrec.ranking import recent_histories
from llmrec.split import positive_plays
from serve.batching import BatchedEngine
from serve.engines.base import Engine
from serve.index import SongIndex, load_index
from serve.inputs import MediaCodec, SongInputs
from serve.metrics import Metrics
from serve.reasons import ReasonWriter

API_KEY_ENV = "LLMREC_API_KEY"


@dataclass
class ServerState:
    cfg: Config
    run: RunDir
    engine: Engine
    batched: BatchedEngine
    inputs: SongInputs
    index: SongIndex
    codec: MediaCodec
    reasons: ReasonWriter
    model_name: str
    metrics: Metrics = field(default_factory=Metrics)
    api_key: str | None = None


def bundle_dir(run: RunDir) -> Path:
    return run.require(run.model / "bundle", "train")


def user_histories(catalog) -> dict[str, list[str]]:
    """user id -> distinct song ids, most recent first (every user of the log is known)."""
    return recent_histories(catalog.interactions, catalog.users["user_id"])


def song_inputs(cfg: Config, run: RunDir, bdir: Path, with_histories: bool = False, catalog=None) -> SongInputs:
    """The catalogue as the engines see it: songs, media feature rows, text feature rows where the bundle fuses
    them, and (for the server) the users' listening histories."""
    from transformers import AutoTokenizer

    from llmrec.features import load_media_features, load_text_features
    from llmrec.model.bundle import read_bundle_meta
    from llmrec.model.mm_lm import read_mm_config
    from llmrec.schema import load_catalog

    mm = read_mm_config(bdir)
    catalog = catalog if catalog is not None else load_catalog(run.require(run.catalog, "prepare"))
    features = load_media_features(run.require(run.features, "features"))
    text = load_text_features(run.features) if mm.text_dim else None
    tokenizer = AutoTokenizer.from_pretrained(bdir / read_bundle_meta(bdir)["lm"])
    return SongInputs(cfg, tokenizer, mm, catalog.songs.to_dict("records"), features,
                      user_histories(catalog) if with_histories else None, text)


def load_state(cfg: Config, run: RunDir, engine: Engine | None = None, index: SongIndex | None = None
               ) -> ServerState:
    """Everything the app serves from a run directory. A stale index is refused here, before binding a port."""
    from llmrec.perception import load_perceived
    from llmrec.schema import load_catalog
    from serve.engines import load_engine

    bdir = bundle_dir(run)
    engine = engine or load_engine(bdir, cfg.serve)
    index = index or load_index(run.index, engine.bundle_hash)
    catalog = load_catalog(run.require(run.catalog, "prepare"))
    inputs = song_inputs(cfg, run, bdir, with_histories=True, catalog=catalog)
    # Co-listening evidence counts every positive play the server knows (the histories it serves come from the
    # same log); the eval counts training plays only.
    perceived, labels = load_perceived(run, inputs.features)
    reasons = ReasonWriter(cfg, inputs.songs, positive_plays(catalog.interactions), perceived,
                           {"perceived": labels} if labels else None)
    added_media = inputs.load_added_media(run.index) if index.added else {}
    for sid, row in index.added.items():  # songs added after the build, with the media rows they were added with
        inputs.add_song(sid, row, added_media.get(sid) or inputs.empty_media())
    s = cfg.serve
    batched = BatchedEngine(engine, max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue,
                            timeout_s=s.request_timeout_s, embed_burst=s.embed_burst,
                            max_queue_wait_s={"embed": s.max_embed_queue_wait_s,
                                              "generate": s.max_generate_queue_wait_s})
    return ServerState(cfg, run, engine, batched, inputs, index, MediaCodec(cfg, run.features / "encoders"), reasons,
                       model_name=f"llmrec-{cfg.name}-{engine.bundle_hash[:12]}",
                       api_key=s.api_key or os.environ.get(API_KEY_ENV) or None)
