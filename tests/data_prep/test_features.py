"""Feature extraction: shard format, manifest, bad media, resumption after kill -9, the Ray engine, text features.

One extraction over a copy of the synthetic catalog with some media broken on purpose feeds most tests; the
resume and Ray tests reuse its encoder weights, so every run here has the same features hash and the features of
intact songs must come out bit-identical whatever the engine, shard size or process layout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_prep.features import extract_features, run_features
from llmrec.features import load_media_features, load_text_features
from llmrec.io import MissingArtefactError, RunDir, file_sha256
from llmrec.media.audio import load_audio
from llmrec.model.encoders import MediaEncoder
from llmrec.schema import load_catalog

N_SONGS = 144
BROKEN = {  # song -> (modality, how it is broken, expected reason prefix)
    "s00003": ("audio", "garbage", "unreadable audio"),
    "s00040": ("audio", "empty", "empty file"),
    "s00005": ("cover", "truncated", "truncated image"),
    "s00070": ("cover", "deleted", "no cover file"),
}


def features_config(quick_config, **features):
    """Quick config made cheaper for tests: no stage 0 (seeded weights; stage 0 is tested with the encoders), one
    1 s audio window per song, TF-IDF text (no model load)."""
    base = dict(shard_size=32, workers=2, encoder_pretrain_steps=0, text_encoder="tfidf")
    model = replace(quick_config.model, audio=replace(quick_config.model.audio, windows=1, window_seconds=1.0))
    return replace(quick_config, model=model, features=replace(quick_config.features, **{**base, **features}))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tests share 2 cores with other processes: multi-threaded tiny GEMMs then spin-wait and run 10-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def new_run(root: Path, catalog_dir: Path, encoders_from: Path | None = None) -> RunDir:
    run = RunDir(root)
    root.mkdir(parents=True)
    (root / "catalog").symlink_to(catalog_dir, target_is_directory=True)
    if encoders_from is not None:  # same weights spec -> reused as is, no stage 0
        shutil.copytree(encoders_from, run.features / "encoders")
    return run


def break_media(catalog_dir: Path) -> None:
    for song, (kind, how, _) in BROKEN.items():
        folder, ext = ("audio", "wav") if kind == "audio" else ("covers", "png")
        path = catalog_dir / "media" / folder / f"{song}.{ext}"
        if how == "garbage":
            path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 50)
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "truncated":
            path.write_bytes(path.read_bytes()[:-200])
        elif how == "deleted":
            path.unlink()


def shard_state(features_dir: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, file_sha256(p)) for p in sorted(features_dir.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory, synthetic_catalog, quick_config):
    root = tmp_path_factory.mktemp("extract")
    catalog_dir = root / "catalog-copy"
    shutil.copytree(synthetic_catalog.root, catalog_dir)
    break_media(catalog_dir)
    run = new_run(root / "run", catalog_dir)
    cfg = features_config(quick_config)
    printed = run_features(cfg, run, argparse.Namespace(no_progress=True))
    return run, cfg, printed


# ------------------------------------------------------------------------------------------------ format


def test_shards_hold_sorted_songs_with_the_documented_tensors(broken_run):
    run, cfg, _ = broken_run
    shards = sorted(run.features.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.safetensors" for i in range(5)]  # 144 / 32
    all_ids = []
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads(f.metadata()["song_ids"])
            n = len(ids)
            assert f.get_tensor("audio").shape == (n, 5, 4, 128) and f.get_tensor("audio").dtype == torch.float32
            assert f.get_tensor("cover").shape == (n, 1, 4, 128) and f.get_tensor("cover").dtype == torch.float32
            assert f.get_tensor("audio_present").dtype == torch.uint8 and f.get_tensor("cover_present").shape == (n,)
        all_ids += ids
    assert all_ids == sorted(all_ids) and len(all_ids) == N_SONGS


def test_reader_concatenates_shards_and_zeroes_missing_media(broken_run):
    run, _, _ = broken_run
    feats = load_media_features(run.features, verify=True)
    assert len(feats) == N_SONGS and feats.song_ids == sorted(feats.song_ids)
    assert feats.audio.shape == (N_SONGS, 5, 4, 128) and feats.cover.shape == (N_SONGS, 1, 4, 128)
    for song, (kind, _, _) in BROKEN.items():
        row = feats.index[song]
        present, values = (feats.audio_present, feats.audio) if kind == "audio" else (feats.cover_present, feats.cover)
        assert not present[row] and torch.count_nonzero(values[row]) == 0
    assert int(feats.audio_present.sum()) == N_SONGS - 2 and int(feats.cover_present.sum()) == N_SONGS - 2
    assert torch.count_nonzero(feats.audio[feats.index["s00000"]]) > 0
    assert feats.rows(["s00002", "s00001"]).tolist() == [2, 1]


def test_manifest_records_every_song_with_reasons_and_shard_hashes(broken_run):
    run, cfg, printed = broken_run
    m = json.loads((run.features / "manifest.json").read_text())
    assert m["complete"] and m["num_shards_done"] == m["num_shards_planned"] == 5
    assert len(m["songs"]) == N_SONGS
    for song, (kind, _, reason) in BROKEN.items():
        entry = m["songs"][song]
        assert entry[kind] == "missing" and entry[f"{kind}_reason"].startswith(reason), entry
        other = "cover" if kind == "audio" else "audio"
        assert entry[other] == "ok" and entry[f"{other}_reason"] is None
    assert m["songs"]["s00040"]["shard"] == 1  # ids 32..63
    assert m["counts"] == {"audio_ok": 142, "audio_missing": 2, "cover_ok": 142, "cover_missing": 2, "audio_padded": 0}
    for name, rec in m["shards"].items():
        assert rec["sha256"] == file_sha256(run.features / name)
    assert m["encoders"]["audio"]["name"] == "tiny-hubert" and m["encoders"]["cover"]["tokens"] == 4
    assert m["encoders"]["audio"]["windows"] == 1 and "skipped" in m["encoders"]["pretrain"]["audio"]
    assert len(m["features_hash"]) == 64
    assert printed["audio"].startswith("142 ok, 2 missing (e.g. s00003: unreadable audio")
    assert "s00070: no cover file" in printed["cover"] and printed["features"] == str(run.features)


def test_rerun_rewrites_nothing_even_without_the_manifest(broken_run):
    """Finished shards are skipped; with manifest.json gone (killed before it was written) they are adopted from
    their own metadata instead of being recomputed."""
    run, cfg, _ = broken_run
    before = shard_state(run.features)
    assert run_features(cfg, run, argparse.Namespace(no_progress=True))["shards"].startswith("5/5 done (0 computed")
    (run.features / "manifest.json").unlink()
    printed = run_features(cfg, run, argparse.Namespace(no_progress=True))
    assert printed["shards"] == "5/5 done (0 computed now, 5 reused)"
    assert shard_state(run.features) == before
    assert json.loads((run.features / "manifest.json").read_text())["songs"]["s00003"]["audio"] == "missing"


def test_features_match_a_direct_encoding(broken_run):
    run, cfg, _ = broken_run
    feats = load_media_features(run.features)
    catalog = load_catalog(run.catalog)
    enc = MediaEncoder.load(cfg.model, run.features / "encoders")
    path = catalog.media_path(catalog.songs.set_index("song_id").at["s00010", "audio_path"])
    direct = enc.encode_audio(load_audio(path, cfg.model.audio.sample_rate))
    torch.testing.assert_close(feats.audio[feats.index["s00010"]], direct)


def test_text_features(broken_run):
    run, _, _ = broken_run
    text = load_text_features(run.features)
    assert text.encoder == "tfidf" and text.song_ids == sorted(text.song_ids) and len(text.song_ids) == N_SONGS
    assert text.text.dtype == torch.float32 and text.text.shape[0] == N_SONGS
    assert torch.allclose(text.text.norm(dim=1), torch.ones(N_SONGS), atol=1e-4)


def test_fork_server_starts_first_so_its_imports_overlap_the_stage(tmp_path, synthetic_catalog, quick_config,
                                                                   monkeypatch):
    """The fork server imports torch for seconds on one core: it must be started before the encoders and the text
    features, not when the pool is created after them (bench/features.py measures the gain)."""
    from data_prep import features as extract

    calls = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(extract, "start_fork_server", spy("fork server", extract.start_fork_server))
    monkeypatch.setattr(extract, "prepare_encoders", spy("encoders", extract.prepare_encoders))
    monkeypatch.setattr(extract, "build_text_features", spy("text", extract.build_text_features))
    monkeypatch.setattr(extract, "run_pool", spy("pool", lambda *args, **kwargs: None))
    run = new_run(tmp_path / "run", synthetic_catalog.root)
    extract_features(features_config(quick_config), load_catalog(run.catalog), run.features, progress=False)
    assert calls == ["fork server", "encoders", "text", "pool"]

    calls.clear()  # one worker: no pool, so no fork server to start
    run = new_run(tmp_path / "run1", synthetic_catalog.root)
    extract_features(features_config(quick_config, workers=1), load_catalog(run.catalog), run.features, progress=False)
    assert calls == ["encoders", "text"]


def test_missing_features_name_the_command(tmp_path):
    with pytest.raises(MissingArtefactError, match="llmrec features"):
        load_media_features(tmp_path / "features")
    with pytest.raises(MissingArtefactError, match="llmrec features"):
        load_text_features(tmp_path / "features")


def test_missing_catalog_names_prepare(tmp_path, quick_config):
    with pytest.raises(MissingArtefactError, match="llmrec prepare"):
        run_features(quick_config, RunDir(tmp_path), argparse.Namespace(no_progress=True))


def test_partial_slices_are_reported_incomplete_then_completed(broken_run, synthetic_catalog, tmp_path):
    """Two 'ranks' (features.shard_index 0 and 1 of 2) share one features directory."""
    run0, cfg, _ = broken_run
    run = new_run(tmp_path / "run", synthetic_catalog.root, encoders_from=run0.features / "encoders")
    cfg = replace(cfg, features=replace(cfg.features, shard_size=48, workers=1, num_shards=2, shard_index=1))
    printed = run_features(cfg, run, argparse.Namespace(no_progress=True))
    assert "incomplete" in printed["note"] and printed["shards"].startswith("1/3")
    with pytest.raises(MissingArtefactError, match="incomplete"):
        load_media_features(run.features)
    cfg = replace(cfg, features=replace(cfg.features, shard_index=0))
    printed = run_features(cfg, run, argparse.Namespace(no_progress=True))
    assert printed["shards"].startswith("3/3") and "note" not in printed
    assert len(load_media_features(run.features)) == N_SONGS


# ------------------------------------------------------------------------------------------------ kill -9 and Ray

EXTRACT_SCRIPT = """
import json, sys
from pathlib import Path
from data_prep.features import extract_features
from llmrec.config import config_from_dict
from llmrec.schema import load_catalog
cfg = config_from_dict(json.loads(sys.argv[1]))
extract_features(cfg, load_catalog(sys.argv[2]), Path(sys.argv[3]), progress=False)
"""


def live_processes_in_session(sid: int) -> list[int]:
    """Pids of non-zombie processes in session `sid` (orphans reparented to a non-reaping init stay zombies)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture(scope="module")
def resumed_run(broken_run, synthetic_catalog, tmp_path_factory):
    """Extraction (2 pool workers, 18 shards) killed with SIGKILL after its first shard, then run again."""
    run0, cfg0, _ = broken_run
    run = new_run(tmp_path_factory.mktemp("resume") / "run", synthetic_catalog.root, run0.features / "encoders")
    cfg = replace(cfg0, features=replace(cfg0.features, shard_size=8, workers=2))
    proc = subprocess.Popen([sys.executable, "-c", EXTRACT_SCRIPT, json.dumps(cfg.to_dict()),
                             str(run.catalog), str(run.features)], start_new_session=True)
    try:
        assert wait_for(lambda: any(run.features.glob("shard-*.safetensors")) or proc.poll() is not None, 180)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must notice and stop by themselves
        proc.wait()
        workers_gone = wait_for(lambda: not live_processes_in_session(proc.pid), 20, 0.1)
    finally:
        for pid in live_processes_in_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    finished = shard_state(run.features)
    leftovers = sorted(p.name for p in run.features.glob(".shard-*.tmp"))
    result = extract_features(cfg, load_catalog(run.catalog), run.features, progress=False)
    return {"run": run, "cfg": cfg, "finished": finished, "workers_gone": workers_gone, "leftovers": leftovers,
            "result": result, "killed_rc": proc.returncode}


@pytest.mark.slow
def test_resume_after_kill_keeps_finished_shards(resumed_run):
    r = resumed_run
    run, finished = r["run"], r["finished"]
    assert r["killed_rc"] == -signal.SIGKILL
    assert r["workers_gone"], "pool workers outlived their killed parent"
    assert 1 <= len(finished) < 18, f"kill landed after {len(finished)} of 18 shards: nothing left to resume"
    assert r["result"]["computed"] == 18 - len(finished)
    after = shard_state(run.features)
    assert len(after) == 18
    assert {name: after[name] for name in finished} == finished  # same mtime, same bytes: never rewritten
    assert not list(run.features.glob(".shard-*.tmp"))  # half-written temporaries of the killed run are gone
    assert json.loads((run.features / "manifest.json").read_text())["complete"]


@pytest.mark.slow
def test_resumed_features_equal_the_uninterrupted_ones(resumed_run, broken_run):
    """Other shard size, other process layout, a kill in between: intact songs get bit-identical features."""
    a = load_media_features(broken_run[0].features)
    b = load_media_features(resumed_run["run"].features, verify=True)
    assert a.song_ids == b.song_ids
    intact = torch.tensor([s not in BROKEN for s in a.song_ids])
    assert torch.equal(a.audio[intact], b.audio[intact]) and torch.equal(a.cover[intact], b.cover[intact])
    assert bool(b.audio_present.all()) and bool(b.cover_present.all())


@pytest.mark.slow
def test_ray_engine_writes_the_same_shards(resumed_run, tmp_path):
    pytest.importorskip("ray", reason='Ray is an extra: pip install "llmrec[ray]"')
    ref = resumed_run["run"]
    run = new_run(tmp_path / "run", ref.catalog.resolve(), ref.features / "encoders")
    cfg = resumed_run["cfg"]
    cfg = replace(cfg, features=replace(cfg.features, engine="ray", workers=2, shard_size=48))
    printed = run_features(cfg, run, argparse.Namespace(no_progress=True))
    assert printed["shards"] == "3/3 done (3 computed now, 0 reused)" and "2 ray worker" in printed["speed"]
    a, b = load_media_features(ref.features), load_media_features(run.features, verify=True)
    assert a.song_ids == b.song_ids
    assert torch.equal(a.audio.materialize(), b.audio.materialize())
    assert torch.equal(a.cover.materialize(), b.cover.materialize())
    m = json.loads((run.features / "manifest.json").read_text())
    assert m["features_hash"] == json.loads((ref.features / "manifest.json").read_text())["features_hash"]
