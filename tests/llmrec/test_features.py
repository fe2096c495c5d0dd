"""llmrec.features: media features are read row by row from the shards, never concatenated whole."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmrec.features import ShardedRows, load_media_features, media_rows, pooled_rows
from testkit.tiny_bundle import write_random_features

IDS = [f"s{i:05d}" for i in range(23)]


def _reference(features_dir):
    """Every shard's tensors concatenated the obvious way, to compare the on-demand reader with."""
    manifest = json.loads((features_dir / "manifest.json").read_text())
    parts = {"audio": [], "cover": []}
    for name, _ in sorted(manifest["shards"].items(), key=lambda kv: kv[1]["index"]):
        with safe_open(str(features_dir / name), framework="pt") as f:
            for key in parts:
                parts[key].append(f.get_tensor(key))
    return {k: torch.cat(v) for k, v in parts.items()}


@pytest.fixture()
def features_dir(tmp_path):
    write_random_features(tmp_path / "features", IDS, shard_size=5)  # 5 shards, the last one short
    return tmp_path / "features"


def test_rows_are_read_on_demand_and_equal_the_concatenated_shards(features_dir):
    feats = load_media_features(features_dir)
    ref = _reference(features_dir)
    assert isinstance(feats.audio, ShardedRows) and len(feats.audio.paths) == 5
    assert feats.audio.shape == ref["audio"].shape and feats.cover.shape == ref["cover"].shape
    for i in (0, 4, 5, 22, -1):  # shard edges, the last row, a negative index
        assert torch.equal(feats.audio[i], ref["audio"][i])
    picks = [22, 0, 9, 9, 13]  # out of order, repeated, across shards
    assert torch.equal(feats.cover[picks], ref["cover"][picks])
    assert torch.equal(feats.audio[torch.tensor(picks)], ref["audio"][picks])
    mask = feats.audio_present
    assert torch.equal(feats.audio[mask], ref["audio"][mask])
    assert torch.equal(feats.audio[3:11:2], ref["audio"][3:11:2])
    assert torch.equal(feats.audio.materialize(), ref["audio"])
    assert torch.allclose(pooled_rows(feats.cover), ref["cover"].mean(dim=(1, 2)))


def test_out_of_range_rows_and_bad_masks_raise(features_dir):
    feats = load_media_features(features_dir)
    with pytest.raises(IndexError, match="out of range"):
        feats.audio[23]
    with pytest.raises(IndexError, match="23 entries"):
        feats.audio[torch.ones(4, dtype=torch.bool)]


def test_collate_rows_from_sharded_features_match_in_memory_ones(features_dir):
    feats = load_media_features(features_dir)
    ref = _reference(features_dir)
    wanted = ["s00021", "unknown-song", "s00002"]
    rows, present = media_rows(feats, wanted, "audio")
    assert torch.equal(rows[0], ref["audio"][21]) and torch.equal(rows[2], ref["audio"][2])
    assert not rows[1].any() and present.tolist() == [0.0, 0.0, 1.0]  # s00021: every 7th song has no audio
    empty, none = media_rows(feats, [], "cover")
    assert empty.shape == (0, *ref["cover"].shape[1:]) and none.numel() == 0


def test_sharded_rows_pickle_without_their_open_files(features_dir):
    """Ray actors and spawned workers receive features by pickle; memory-mapped handles are reopened there."""
    feats = load_media_features(features_dir)
    before = feats.audio[7]  # opens a shard
    clone = pickle.loads(pickle.dumps(feats.audio))
    assert torch.equal(clone[7], before)


def test_shards_from_different_encoders_are_refused(features_dir):
    manifest = json.loads((features_dir / "manifest.json").read_text())
    name = next(n for n, r in manifest["shards"].items() if r["index"] == 2)
    with safe_open(str(features_dir / name), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["audio"] = tensors["audio"][:, :, :, :8].contiguous()  # another feature width
    save_file(tensors, str(features_dir / name), metadata=meta)
    with pytest.raises(ValueError, match="different encoders"):
        load_media_features(features_dir)
