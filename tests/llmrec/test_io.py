from __future__ import annotations

import json

import pytest

from llmrec.io import atomic_dir, atomic_write_json, atomic_write_text, dir_sha256, open_run_dir


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        from llmrec.io import atomic_path

        with atomic_path(target) as tmp:
            tmp.write_text("{partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("two")
            raise RuntimeError("killed")
    assert (target / "f").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_dir_hash_changes_with_content(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "1")
    h1 = dir_sha256(tmp_path)
    atomic_write_text(tmp_path / "a.txt", "2")
    assert dir_sha256(tmp_path) != h1


def test_run_dir_require_names_the_stage(tmp_path):
    run = open_run_dir(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match=r"run `llmrec features --run-dir"):
        run.require(run.features, "features")


def test_atomic_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.txt").stat().st_mode & 0o777 == 0o644
