"""The features directory's shards and manifest: which songs each shard holds, which shards are done.

Sharding: song ids are sorted and cut into ceil(N / shard_size) contiguous shards of equal size (+-1 song), so shard
i always holds the same songs for a given catalog and no short last shard leaves workers idle at the end.
`features.shard_index`/`features.num_shards` pick every num_shards-th shard, so torchrun ranks or a Slurm array can
split the work over nodes onto a shared file system.

Resumability: a shard on disk is only ever skipped, never rewritten, when its metadata says it holds these songs
computed with this encoder hash; the manifest is rebuilt from the shards' own metadata where it lags behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llmrec.features import read_shard_metadata
from llmrec.io import atomic_write_json, file_sha256
from llmrec.schema import Catalog

FORMAT_VERSION = 1
MANIFEST_EVERY_S = 5.0  # the manifest is rewritten at most this often while shards finish (and at the end)


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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
