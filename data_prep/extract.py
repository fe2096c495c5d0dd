"""`llmrec features`: frozen audio/cover features in parallel sharded workers, plus text features.

Layout written under `runs/<name>/features/`:

    encoders/{audio,image}/      the tiny encoders' weights (seeded + stage-0 pretrained), reused by train and serve
    shard-00000.safetensors      audio [n, L, K, D] f32, audio_present [n] u8, cover [n, 1, K, D] f32,
    shard-00001.safetensors ...  cover_present [n] u8; metadata: song_ids (JSON list), per-song status, hash
    manifest.json                per song {audio, audio_reason, cover, cover_reason, shard}, per shard sha256,
                                 the encoder config and the hash every shard was computed with
    text.safetensors             text [N, d] f32 (all-MiniLM-L6-v2 or TF-IDF + SVD); metadata song_ids

Sharding: song ids are sorted and cut into ceil(N / shard_size) contiguous shards of equal size (+-1 song), so shard
i always holds the same songs for a given catalog and no short last shard leaves workers idle at the end.
`features.shard_index`/`features.num_shards` pick every num_shards-th shard, so torchrun ranks or a Slurm array can
split the work over nodes onto a shared file system.

Resumability: each shard is written to a temporary name and moved into place whole, and a shard on disk is only
ever skipped, never rewritten, when its metadata says it holds these songs computed with this encoder hash. A run
killed with kill -9 therefore loses at most the shards that were in flight; the manifest is rebuilt from the shards'
own metadata where it lags behind.

Engines: `pool` (concurrent.futures process pool, forkserver/spawn, one torch thread per worker, model loaded once
per worker, decoding of the next song overlapped with encoding of the current one; the fork server is started
first, so that its imports overlap the encoders and the text features in the main process) or `ray` (the same
shard function as Ray tasks, for clusters).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import resource
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from llmrec.media.audio import MediaError, load_audio
from llmrec.media.image import load_image, prepare_image
from llmrec.config import Config, ModelConfig
from llmrec.features import read_shard_metadata
from llmrec.io import RunDir, atomic_dir, atomic_path, atomic_write_json, dir_sha256, file_sha256
from llmrec.model.encoders import MediaEncoder, is_tiny, spec_hash, weights_id
from llmrec.parallel import resolve_workers
from llmrec.schema import Catalog, load_catalog
from llmrec.text_features import build_text_features

FORMAT_VERSION = 1
MANIFEST_EVERY_S = 5.0  # the manifest is rewritten at most this often while shards finish (and at the end)
ENGINES = ("pool", "ray")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class SongMedia:
    """One song as a worker sees it: absolute media paths, None where the catalog has no file."""

    song_id: str
    audio: str | None
    cover: str | None


@dataclass(frozen=True)
class ShardTask:
    index: int
    path: str
    songs: tuple[SongMedia, ...]

    @property
    def song_ids(self) -> list[str]:
        return [s.song_id for s in self.songs]


def plan_shards(catalog: Catalog, shard_size: int, out_dir: Path) -> list[ShardTask]:
    """Sorted song ids cut into ceil(N / shard_size) contiguous shards whose sizes differ by at most one song.

    Not fixed `shard_size` chunks: those leave a short last shard (460 songs in chunks of 64: seven of 64 and one
    of 12), and with few shards per worker the pool then waits on one worker at the end (2 workers: 256 vs 204
    songs, at best 0.90 of a balanced split). Even shards of 57-58 songs split evenly over 2 workers."""
    if shard_size < 1:
        raise ValueError(f"features.shard_size must be >= 1, got {shard_size}")
    songs = catalog.songs.set_index("song_id")
    ids = sorted(songs.index)

    def media(rel) -> str | None:
        path = catalog.media_path(rel)
        return None if path is None else str(path.resolve())

    n_shards = -(-len(ids) // shard_size)
    bounds = np.linspace(0, len(ids), n_shards + 1).round().astype(int)
    tasks = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        items = tuple(SongMedia(sid, media(songs.at[sid, "audio_path"]), media(songs.at[sid, "cover_path"]))
                      for sid in ids[start:stop])
        tasks.append(ShardTask(i, str(out_dir / shard_name(i)), items))
    return tasks


def select_shards(tasks: list[ShardTask], shard_index: int, num_shards: int) -> list[ShardTask]:
    """This rank's slice: shards i with i % num_shards == shard_index."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"features.shard_index={shard_index} must lie in [0, features.num_shards={num_shards})")
    return [t for t in tasks if t.index % num_shards == shard_index]


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


def shard_record(task: ShardTask, path: Path, statuses: list[dict]) -> dict:
    st = path.stat()
    return {
        "index": task.index,
        "file": path.name,
        "song_ids": task.song_ids,
        "statuses": statuses,
        "sha256": file_sha256(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


# Per-process state: the pool initializer (or the first Ray task in a worker) loads the encoders once.
_WORKER: dict[str, ShardExtractor] = {}


def init_worker(spec: WorkerSpec, main_pid: int, threads: int = 1) -> None:
    """Pool initializer: one torch thread per process (the pool provides the parallelism), encoders loaded once."""
    torch.set_num_threads(threads)
    _quiet_hf_progress()
    _exit_with_parent(main_pid)
    _WORKER["extractor"] = ShardExtractor(spec)


def run_shard(task: ShardTask) -> dict:
    return _WORKER["extractor"].write_shard(task)


def ray_run_shard(spec: WorkerSpec, task: ShardTask) -> dict:
    """Ray task body: Ray reuses worker processes, so the encoders load once per process, keyed by hash."""
    key = f"ray:{spec.features_hash}"
    if key not in _WORKER:
        torch.set_num_threads(1)
        _quiet_hf_progress()
        _WORKER[key] = ShardExtractor(spec)
    return _WORKER[key].write_shard(task)


def _quiet_hf_progress() -> None:
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


# ------------------------------------------------------------------------------------------------ manifest


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: ranks of one job sharing the features directory take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Manifest:
    """`features/manifest.json`, kept in memory and merged into the file on disk under a lock."""

    path: Path
    header: dict
    shards: dict[str, dict] = field(default_factory=dict)  # file name -> record without per-song lists
    songs: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. "text": the text features' entry
    _last_write: float = 0.0

    @classmethod
    def open(cls, path: Path, header: dict) -> "Manifest":
        """Load entries computed with the same features hash; anything else is stale and ignored."""
        m = cls(path, header)
        m._merge_from_disk()
        return m

    def _merge_from_disk(self) -> None:
        if not self.path.is_file():
            return
        try:
            old = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if old.get("features_hash") != self.header["features_hash"]:
            return
        for name, rec in old.get("shards", {}).items():
            self.shards.setdefault(name, rec)
        for sid, rec in old.get("songs", {}).items():
            self.songs.setdefault(sid, rec)
        if old.get("text") is not None:
            self.extra.setdefault("text", old["text"])

    def is_done(self, task: ShardTask) -> bool:
        """A shard is done if its file exists and matches the manifest (size+mtime, else its sha256), or, when the
        manifest lags (killed between shard and manifest write), if its own metadata says so. Then it is adopted."""
        path = Path(task.path)
        if not path.is_file():
            return False
        rec = self.shards.get(path.name)
        if rec is not None and rec.get("song_ids_sha") == _ids_sha(task.song_ids):
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) == (rec.get("size"), rec.get("mtime_ns")):
                return True  # unchanged since it was hashed: skip re-reading a possibly large file
            if file_sha256(path) == rec.get("sha256"):
                return True
        meta = read_shard_metadata(path)
        if not meta or meta.get("features_hash") != self.header["features_hash"]:
            return False
        if json.loads(meta.get("song_ids", "null")) != task.song_ids:
            return False
        self.add(shard_record(task, path, json.loads(meta["status"])))
        return True

    def add(self, record: dict) -> None:
        name = record["file"]
        self.shards[name] = {
            "index": record["index"], "sha256": record["sha256"], "size": record["size"],
            "mtime_ns": record["mtime_ns"], "songs": len(record["song_ids"]),
            "song_ids_sha": _ids_sha(record["song_ids"]),
            "audio_ok": sum(s["audio"] == "ok" for s in record["statuses"]),
            "cover_ok": sum(s["cover"] == "ok" for s in record["statuses"]),
        }
        for sid, status in zip(record["song_ids"], record["statuses"]):
            self.songs[sid] = {**status, "shard": record["index"]}

    def save(self, plan: list[ShardTask], force: bool = False) -> None:
        """Merge with what other ranks wrote and replace the file atomically (throttled unless `force`)."""
        if not force and time.monotonic() - self._last_write < MANIFEST_EVERY_S:
            return
        with file_lock(self.path.with_name(".manifest.lock")):
            self._merge_from_disk()
            planned = {Path(t.path).name for t in plan}
            shards = {k: v for k, v in self.shards.items() if k in planned}
            songs = {sid: rec for sid, rec in self.songs.items() if shard_name(rec["shard"]) in shards}
            atomic_write_json(self.path, {
                **self.header,
                "num_shards_planned": len(plan),
                "num_shards_done": len(shards),
                "complete": len(shards) == len(plan),
                "shards": dict(sorted(shards.items())),
                "songs": dict(sorted(songs.items())),
                "counts": _counts(songs.values()),
                **self.extra,
            })
        self._last_write = time.monotonic()


def _ids_sha(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _counts(songs: Iterable[dict]) -> dict:
    counts = {"audio_ok": 0, "audio_missing": 0, "cover_ok": 0, "cover_missing": 0, "audio_padded": 0}
    for s in songs:
        counts[f"audio_{s['audio']}"] += 1
        counts[f"cover_{s['cover']}"] += 1
        counts["audio_padded"] += bool(s.get("audio_padded"))
    return counts


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------------------ encoders


def weights_spec(cfg: Config) -> dict:
    """What decides the tiny encoders' weights: architecture, seed and the stage-0 schedule."""
    m, f = cfg.model, cfg.features
    return {"audio": [m.audio.name, m.audio.sample_rate], "cover": [m.cover.name, m.cover.image_size],
            "seed": cfg.seed, "pretrain": [f.encoder_pretrain_steps, f.encoder_pretrain_batch,
                                           f.encoder_pretrain_songs]}


def prepare_encoders(cfg: Config, catalog: Catalog, enc_dir: Path, progress: bool = True) -> dict:
    """Make sure the run's tiny encoders exist in `enc_dir` (seeded + contrastive stage 0, done once, under a
    lock so parallel ranks build them once) and return their description and weight hashes."""
    info: dict = {"dir": str(enc_dir), "audio": asdict(cfg.model.audio), "cover": asdict(cfg.model.cover)}
    if is_tiny(cfg.model.audio.name) or is_tiny(cfg.model.cover.name):
        with file_lock(enc_dir.parent / ".encoders.lock"):
            spec = weights_spec(cfg)
            if _read_json(enc_dir / "spec.json") != spec:
                _pretrain_into(cfg, catalog, enc_dir, spec, progress)
        info["pretrain"] = _read_json(enc_dir / "pretrain.json")
    for kind, sub, enc in (("audio", "audio", cfg.model.audio), ("cover", "image", cfg.model.cover)):
        info[f"{kind}_weights"] = dir_sha256(enc_dir / sub) if is_tiny(enc.name) else weights_id(enc.name)
    return info


def _pretrain_into(cfg: Config, catalog: Catalog, enc_dir: Path, spec: dict, progress: bool) -> None:
    from llmrec.model.encoder_pretrain import pretrain_tiny_encoders

    audio_loader = partial(_load_audio_for_pretrain, sample_rate=cfg.model.audio.sample_rate,
                           max_seconds=cfg.features.max_audio_seconds)
    image_loader = partial(load_image, max_pixels=cfg.features.max_image_pixels)
    with atomic_dir(enc_dir) as tmp:
        report = pretrain_tiny_encoders(catalog, cfg, tmp, load_audio=audio_loader, load_image=image_loader,
                                        progress=progress)
        atomic_write_json(tmp / "spec.json", spec)
    for kind in ("audio", "image"):
        if kind in report and "loss_before" in report[kind]:
            r = report[kind]
            print(f"stage 0 ({kind} encoder): InfoNCE {r['loss_before']:.3f} -> {r['loss_after']:.3f} "
                  f"in {r['steps']} steps ({r['seconds']:.1f}s)")


def _load_audio_for_pretrain(path, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Stage 0 takes random 1 s crops: of a long file, 4 x 5 s spread over it are plenty (and cheap to hold)."""
    return load_audio(path, sample_rate, windows=4, window_seconds=5.0, max_seconds=min(max_seconds, 60.0))


def features_hash(cfg: Config, encoders: dict) -> str:
    """Changes whenever the features' values could: encoder configs, weights, seed, decode limits, format."""
    return spec_hash({
        "format": FORMAT_VERSION, "audio": asdict(cfg.model.audio), "cover": asdict(cfg.model.cover),
        "audio_weights": encoders["audio_weights"], "cover_weights": encoders["cover_weights"], "seed": cfg.seed,
        "max_audio_seconds": cfg.features.max_audio_seconds, "max_image_pixels": cfg.features.max_image_pixels,
        "min_audio_seconds": cfg.features.min_audio_seconds,
    })


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
        ctx.set_forkserver_preload(["data_prep.extract", "transformers.models.hubert.modeling_hubert",
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


def run_ray(tasks: list[ShardTask], spec: WorkerSpec, workers: int, on_done: Callable[[dict], None]) -> None:
    """The same shard function as Ray tasks: a local Ray instance with `workers` CPUs, or the cluster named by
    RAY_ADDRESS. Each task takes one CPU; Ray retries a shard whose worker died."""
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
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ the stage


def _clean_stale_temp_files(tasks: list[ShardTask]) -> None:
    """Remove half-written temporaries of this rank's shards left by a killed run (other ranks' are theirs)."""
    for task in tasks:
        path = Path(task.path)
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def extract_features(cfg: Config, catalog: Catalog, out_dir: Path, progress: bool = True) -> dict:
    """Extract this rank's media shards (skipping finished ones) and, on rank 0, the text features."""
    f = cfg.features
    if f.engine not in ENGINES:
        raise ValueError(f"features.engine {f.engine!r}: choose one of {list(ENGINES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if f.engine == "pool" and resolve_workers(f.workers) > 1:
        start_fork_server(f.start_method)  # its imports overlap the encoders and the text features below
    encoders = prepare_encoders(cfg, catalog, out_dir / "encoders", progress)
    fhash = features_hash(cfg, encoders)
    plan = plan_shards(catalog, f.shard_size, out_dir)
    mine = select_shards(plan, f.shard_index, f.num_shards)
    header = {"format_version": FORMAT_VERSION, "features_hash": fhash, "encoders": encoders,
              "shard_size": f.shard_size, "num_songs": len(catalog.songs)}
    manifest = Manifest.open(out_dir / "manifest.json", header)
    todo = [t for t in mine if not manifest.is_done(t)]
    # Rank 0 writes the text features for the whole catalogue; before the media, while the fork server imports.
    text = build_text_features(catalog, cfg, out_dir, progress) if f.shard_index == 0 else None
    _clean_stale_temp_files(todo)
    spec = WorkerSpec(cfg.model, str(out_dir / "encoders"), cfg.seed, fhash, f.max_audio_seconds,
                      f.min_audio_seconds, f.max_image_pixels)
    workers = min(resolve_workers(f.workers), max(1, len(todo)))
    stats = {"songs": 0, "rss": {}}
    bar = tqdm(total=sum(len(t.songs) for t in todo), unit="song", desc="features", disable=not progress)

    def on_done(record: dict) -> None:
        manifest.add(record)
        manifest.save(plan)
        stats["songs"] += len(record["song_ids"])
        stats["rss"][record["pid"]] = max(stats["rss"].get(record["pid"], 0.0), record["peak_rss_mb"])
        bar.update(len(record["song_ids"]))

    t0 = time.perf_counter()
    try:
        if todo and f.engine == "ray":
            run_ray(todo, spec, workers, on_done)
        elif todo and workers == 1:
            run_in_process(todo, spec, on_done)
        elif todo:
            run_pool(todo, spec, workers, on_done, f.start_method)
    finally:
        bar.close()
        manifest.save(plan, force=True)  # whatever finished is recorded, even when a shard failed
    media_seconds = time.perf_counter() - t0
    if text:
        manifest.extra["text"] = text
    manifest.save(plan, force=True)
    return {
        "plan": plan, "mine": mine, "computed": len(todo), "songs_computed": stats["songs"],
        "media_seconds": media_seconds, "songs_per_s": stats["songs"] / media_seconds if stats["songs"] else 0.0,
        "workers": workers, "peak_rss_mb": stats["rss"], "manifest": _read_json(out_dir / "manifest.json"),
        "encoders": encoders, "text": text, "seconds": time.perf_counter() - t_start,
    }


def _modality_summary(manifest: dict, kind: str, examples: int = 3) -> str:
    """'142 ok, 2 missing (e.g. s00003: empty file, ...)': missing media are counted and named, never dropped."""
    counts = manifest.get("counts", {})
    text = f"{counts.get(f'{kind}_ok', 0)} ok, {counts.get(f'{kind}_missing', 0)} missing"
    if counts.get(f"{kind}_padded"):
        text += f", {counts[f'{kind}_padded']} shorter than one encoder patch (zero-padded to one)"
    missing = [f"{sid}: {rec[f'{kind}_reason']}" for sid, rec in manifest.get("songs", {}).items()
               if rec[kind] == "missing"][:examples]
    return text + (f" (e.g. {'; '.join(missing)}; reasons per song in manifest.json)" if missing else "")


def _speed(result: dict, engine: str) -> str:
    if not result["songs_computed"]:
        return "nothing to compute: every shard was up to date"
    rss = ", ".join(f"{v:.0f}" for v in result["peak_rss_mb"].values())
    return (f"{result['songs_per_s']:.1f} songs/s with {result['workers']} {engine} worker(s), "
            f"peak RSS {rss} MB")


def run_features(cfg: Config, run: RunDir, args: argparse.Namespace | None = None) -> dict:
    """`llmrec features`: returns what it wrote, for the CLI to print."""
    progress = not getattr(args, "no_progress", False)
    if not progress:
        _quiet_hf_progress()
    catalog = load_catalog(run.require(run.catalog, "prepare"))
    result = extract_features(cfg, catalog, run.features, progress)
    m = result["manifest"]
    out = {
        "features": str(run.features),
        "shards": f"{m.get('num_shards_done', 0)}/{len(result['plan'])} done "
                  f"({result['computed']} computed now, {len(result['mine']) - result['computed']} reused)",
        "audio": _modality_summary(m, "audio"),
        "cover": _modality_summary(m, "cover"),
        "speed": _speed(result, cfg.features.engine),
        "encoders": result["encoders"]["dir"],
        "manifest": str(run.features / "manifest.json"),
    }
    if result["text"]:
        out["text"] = f"{run.features / 'text.safetensors'} ({result['text']['encoder']}, {result['text']['status']})"
    if not m.get("complete"):
        out["note"] = (f"features are incomplete: this rank ran shard slice {cfg.features.shard_index}/"
                       f"{cfg.features.num_shards}; run the other slices too")
    return out
