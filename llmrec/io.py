"""Run directories, atomic writes and manifests.

Every artefact is written to a temporary name in the same directory and moved into place with `os.replace`, so a
process killed mid-write leaves either the old file or the new one, never a truncated one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


class MissingArtefactError(FileNotFoundError):
    """A stage's input is missing; the message names the stage that produces it."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it into place, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; artefacts get the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_sha256(path: str | os.PathLike) -> str:
    """A content hash of every file under `path` (relative names + bytes), stable across machines."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class RunDir:
    """The layout of `runs/<name>/` shared by every stage: each stage reads only its predecessors' directories
    (README, "Pipeline")."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def examples(self) -> Path:
        return self.root / "examples"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def require(self, path: Path, stage: str) -> Path:
        """Return `path` or raise a message naming the command that produces it."""
        if not path.exists():
            raise MissingArtefactError(
                f"{path} is missing; run `llmrec {stage} --run-dir {self.root}` first"
            )
        return path


def open_run_dir(path: str | os.PathLike) -> RunDir:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    return RunDir(root)
