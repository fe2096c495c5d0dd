"""The feature workers: decode a shard's media, encode it with the frozen encoders, write the shard atomically.

Engines: `pool` (concurrent.futures process pool, forkserver/spawn, one torch thread per worker, model loaded once
per worker, decoding of the next song overlapped with encoding of the current one; the fork server is started
first, so that its imports overlap the encoders and the text features in the main process) or `ray` (the same
shard function as Ray tasks, for clusters). Each shard is written to a temporary name and moved into place whole,
so a run killed with kill -9 loses at most the shards that were in flight.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import resource
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from data_prep.shards import FORMAT_VERSION, ShardTask, SongMedia, shard_name, shard_record
from llmrec.config import ModelConfig
from llmrec.io import atomic_path
from llmrec.media import MediaError, load_audio, prepare_image
from llmrec.model.encoders import MediaEncoder
from llmrec.text_features import encode_texts

# ------------------------------------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to load the encoders once (picklable for spawn/forkserver/Ray)."""

    model: ModelConfig
    encoders_dir: str
    seed: int
    features_hash: str
    max_audio_seconds: float
    min_audio_seconds: float
    max_image_pixels: int


def song_status(audio: str, audio_reason: str | None, cover: str, cover_reason: str | None) -> dict:
    return {"audio": audio, "audio_reason": audio_reason, "cover": cover, "cover_reason": cover_reason}


class ShardExtractor:
    """Decodes and encodes the songs of a shard and writes it atomically. One per worker process."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.encoder = MediaEncoder.load(spec.model, spec.encoders_dir, seed=spec.seed)
        # One decode thread: soundfile, scipy and Pillow release the GIL, so decoding song i+1 overlaps with
        # encoding song i even with a single torch thread.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def decode(self, song: SongMedia) -> tuple[np.ndarray | MediaError, torch.Tensor | MediaError]:
        enc, spec = self.encoder, self.spec
        return (
            _try(lambda: load_audio(song.audio, enc.audio_cfg.sample_rate, windows=enc.audio_cfg.windows,
                                    window_seconds=enc.audio_cfg.window_seconds,
                                    max_seconds=spec.max_audio_seconds, min_seconds=spec.min_audio_seconds),
                 song.audio, "no audio file"),
            _try(lambda: prepare_image(song.cover, enc.image_size, enc.image_mean, enc.image_std,
                                       max_pixels=spec.max_image_pixels), song.cover, "no cover file"),
        )

    def _decoded(self, songs: tuple[SongMedia, ...]) -> Iterator[tuple]:
        """Yield decoded media in order while the next song is already being decoded in the background."""
        pending = self._decoder.submit(self.decode, songs[0]) if songs else None
        for i in range(len(songs)):
            result = pending.result()
            if i + 1 < len(songs):
                pending = self._decoder.submit(self.decode, songs[i + 1])
            yield result

    def encode_shard(self, task: ShardTask) -> tuple[dict[str, torch.Tensor], list[dict]]:
        n = len(task.songs)
        audio = torch.zeros((n, *self.encoder.audio_shape), dtype=torch.float32)
        cover = torch.zeros((n, *self.encoder.cover_shape), dtype=torch.float32)
        audio_present = torch.zeros(n, dtype=torch.uint8)
        cover_present = torch.zeros(n, dtype=torch.uint8)
        statuses = []
        for i, (wave, pixels) in enumerate(self._decoded(task.songs)):
            self.encoder.last_audio_padded = False
            a_reason = _encode_into(audio, audio_present, i, wave, self.encoder.encode_audio)
            c_reason = _encode_into(cover, cover_present, i, pixels, self.encoder.encode_image)
            status = song_status("missing" if a_reason else "ok", a_reason, "missing" if c_reason else "ok", c_reason)
            if not a_reason and self.encoder.last_audio_padded:
                status["audio_padded"] = True  # shorter than one encoder patch: zero-padded to one, and counted
            statuses.append(status)
        tensors = {"audio": audio, "audio_present": audio_present, "cover": cover, "cover_present": cover_present}
        return tensors, statuses

    def write_shard(self, task: ShardTask) -> dict:
        t0 = time.perf_counter()
        tensors, statuses = self.encode_shard(task)
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "shard": str(task.index),
            "song_ids": json.dumps(task.song_ids),
            "status": json.dumps(statuses),
            "features_hash": self.spec.features_hash,
        }
        with atomic_path(task.path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            _fsync(tmp)
        return {**shard_record(task, Path(task.path), statuses), "seconds": time.perf_counter() - t0,
                "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}


def _try(fn: Callable, path: str | None, absent: str):
    if path is None:
        return MediaError(absent)
    try:
        return fn()
    except MediaError as e:
        return e


def _encode_into(out: torch.Tensor, present: torch.Tensor, i: int, media, encode: Callable) -> str | None:
    """Encode one decoded item into row i; return the reason it is missing (None when it is present)."""
    if isinstance(media, MediaError):
        return media.reason
    try:
        out[i] = encode(media)
    except Exception as e:  # noqa: BLE001 - one song's failure must not kill the shard
        return f"encoder error ({type(e).__name__}: {str(e)[:100]})"
    present[i] = 1
    return None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# Per-process state: the pool initializer (or the first Ray task in a worker) loads the encoders once.
_WORKER: dict[str, ShardExtractor] = {}


def init_worker(spec: WorkerSpec, main_pid: int, threads: int = 1) -> None:
    """Pool initializer: one torch thread per process (the pool provides the parallelism), encoders loaded once."""
    torch.set_num_threads(threads)
    quiet_hf_progress()
    _exit_with_parent(main_pid)
    _WORKER["extractor"] = ShardExtractor(spec)


def run_shard(task: ShardTask) -> dict:
    return _WORKER["extractor"].write_shard(task)


def ray_run_shard(spec: WorkerSpec, task: ShardTask) -> dict:
    """Ray task body: Ray reuses worker processes, so the encoders load once per process, keyed by hash."""
    key = f"ray:{spec.features_hash}"
    if key not in _WORKER:
        torch.set_num_threads(1)
        quiet_hf_progress()
        _WORKER[key] = ShardExtractor(spec)
    return _WORKER[key].write_shard(task)


def quiet_hf_progress() -> None:
    """Workers load weights once each; transformers' per-load progress bars would only interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _exit_with_parent(main_pid: int) -> None:
    """Leave when the main process is gone. Nothing else tells a pool worker that its parent was killed with
    SIGKILL, and watching the direct parent is not enough: under forkserver the parent is the fork server, which
    itself stays alive as long as workers hold its liveness pipe. Without this, orphans would finish their
    queued shards behind a re-run's back and then wait forever."""

    def watch() -> None:
        while _process_alive(main_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="main-process-watchdog", daemon=True).start()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped process is a zombie: gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------------------------------------ engines


def run_in_process(tasks: list[ShardTask], spec: WorkerSpec, on_done: Callable[[dict], None],
                   threads: int = 1) -> None:
    """workers=1: no pool to start; torch's thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        extractor = ShardExtractor(spec)
        for task in tasks:
            on_done(extractor.write_shard(task))
    finally:
        torch.set_num_threads(before)


def start_fork_server(start_method: str) -> mp.context.BaseContext:
    """The multiprocessing context for the pool; under forkserver, also start the fork server now, in the
    background. It imports torch and transformers once (~4.5 s of one core here) and every worker then forks from
    it in milliseconds. Called at the start of the stage, so that the import overlaps the stage's own work in this
    process (encoder loading or pretraining, text features) instead of delaying the first shard. Idempotent."""
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["data_prep.feature_workers", "transformers.models.hubert.modeling_hubert",
                                    "transformers.models.vit.modeling_vit"])
        from multiprocessing import forkserver

        forkserver.ensure_running()  # spawns the server and returns; it does not wait for the imports
    return ctx


def run_pool(tasks: list[ShardTask], spec: WorkerSpec, workers: int, on_done: Callable[[dict], None],
             start_method: str = "forkserver") -> None:
    """A process pool with the encoders loaded once per worker in its initializer."""
    ctx = start_fork_server(start_method)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                             initargs=(spec, os.getpid())) as pool:
        futures = {pool.submit(run_shard, t): t for t in tasks}
        try:
            for fut in as_completed(futures):
                try:
                    on_done(fut.result())
                except Exception as e:
                    raise RuntimeError(f"feature extraction failed on shard {futures[fut].index} "
                                       f"({shard_name(futures[fut].index)}): {e}") from e
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


@contextlib.contextmanager
def ray_session(workers: int) -> Iterator[Any]:
    """The `ray` module, initialised for the duration: a local Ray instance with `workers` CPUs, or the cluster named
    by RAY_ADDRESS; left as it was found when Ray was already initialised by the caller."""
    try:
        import ray
    except ImportError:
        raise RuntimeError('features.engine=ray needs Ray: pip install "llmrec[ray]"') from None
    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_ray(tasks: list[ShardTask], spec: WorkerSpec, workers: int, on_done: Callable[[dict], None]) -> None:
    """The same shard function as Ray tasks (`ray_session`). Each task takes one CPU; Ray retries a shard whose
    worker died."""
    with ray_session(workers) as ray:
        remote = ray.remote(num_cpus=1, max_retries=2)(ray_run_shard)
        spec_ref = ray.put(spec)
        pending = {remote.remote(spec_ref, t): t for t in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            try:
                on_done(ray.get(done[0]))
            except Exception as e:
                raise RuntimeError(f"feature extraction failed on shard {task.index}: {e}") from e


def encode_text_chunk(texts: list[str], encoder: str) -> np.ndarray:
    """Ray task body: one torch thread per task (Ray runs one task per CPU); the sentence encoder is loaded once
    per worker process (`llmrec.text_features.minilm` is cached) and reused by every later chunk."""
    torch.set_num_threads(1)
    quiet_hf_progress()
    return encode_texts(texts, encoder)


def encode_texts_on_ray(texts: list[str], encoder: str, workers: int, chunk_size: int | None = None,
                        progress: bool = True) -> np.ndarray:
    """`encode_texts` over Ray tasks of `chunk_size` texts, rows in input order, with a progress bar (and ETA)
    per finished chunk. By default chunks are at most 1024 texts and at least 8 per worker, so that a small
    catalogue still spreads over every worker. Only for `minilm`: TF-IDF fits one vocabulary over the whole
    corpus, so it stays in one process.

    Chunks are cut from the texts sorted longest first and submitted in that order. The sentence encoder pads a
    batch to its longest text and sorts by length within one call, which a single process gets over the whole
    corpus; sorted chunks give each Ray task the same short-padding batches, and longest-first submission leaves
    the shortest chunks for the end, so the workers finish close together."""
    if encoder != "minilm":
        raise ValueError(f"text features on Ray need features.text_encoder=minilm, not {encoder!r} (TF-IDF is fitted "
                         "on the whole corpus at once)")
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    size = chunk_size or max(1, min(1024, -(-len(texts) // (8 * workers))))
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # stable: equal lengths keep input order
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    out: list[np.ndarray | None] = [None] * len(chunks)
    with ray_session(workers) as ray, tqdm(total=len(texts), unit="text", desc="text features (ray)",
                                           disable=not progress) as bar:
        remote = ray.remote(num_cpus=1, max_retries=2)(encode_text_chunk)
        pending = {remote.remote([texts[i] for i in chunk], encoder): k for k, chunk in enumerate(chunks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done[0])
            out[k] = ray.get(done[0])
            bar.update(len(chunks[k]))
    vecs = np.empty((len(texts), out[0].shape[1]), dtype=np.float32)
    vecs[order] = np.concatenate(out)  # back to input order
    return vecs
