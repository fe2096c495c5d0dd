"""The faiss song index: exact/IVF/HNSW search, exclusion, adds without rebuild, atomic save, stale refusal."""
from __future__ import annotations

import numpy as np
import pytest

from serve.index import SongIndex, StaleIndexError, load_index


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue():
    rng = np.random.default_rng(0)
    return unit(rng.normal(size=(300, 16))), [f"s{i:04d}" for i in range(300)]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_finds_the_true_nearest_songs(catalogue, kind):
    emb, ids = catalogue
    index = SongIndex.build(emb, ids, "h" * 64, kind, nlist=8, nprobe=8)
    queries = emb[[3, 50, 299]]
    exact = np.argsort(-queries @ emb.T, axis=1)[:, :5]
    hits = index.search(queries, 5)
    for row, want in zip(hits, exact):
        assert [s for s, _ in row][0] == ids[want[0]]  # each song is its own nearest neighbour
        assert len({s for s, _ in row} & {ids[i] for i in want}) >= 4
        assert all(a[1] >= b[1] for a, b in zip(row, row[1:]))
    # excluded ids never come back, and k results are still returned
    skip = {ids[i] for i in exact[0][:3]}
    row = index.search(queries[:1], 5, [skip])[0]
    assert len(row) == 5 and not skip & {s for s, _ in row}


def test_add_without_rebuild_save_load_and_stale_refusal(catalogue, tmp_path):
    emb, ids = catalogue
    index = SongIndex.build(emb[:200], ids[:200], "a" * 64)
    index.add(emb[200:202], ids[200:202], [{"title": "new one"}, {"title": "new two"}])
    assert index.search(emb[201:202], 1)[0][0][0] == ids[201]
    np.testing.assert_array_equal(index.vectors([ids[200]]), emb[200:201])
    with pytest.raises(ValueError, match="'s0001' is already in the index"):
        index.add(emb[:1], [ids[1]])
    with pytest.raises(ValueError, match="dimension 8 do not fit an index of dimension 16"):
        index.add(np.ones((1, 8), np.float32), ["x"])
    index.save(tmp_path / "index")
    loaded = load_index(tmp_path / "index", "a" * 64)
    assert loaded.song_ids == ids[:202] and loaded.added[ids[200]] == {"title": "new one"}
    assert loaded.search(emb[5:6], 3) == index.search(emb[5:6], 3)
    with pytest.raises(StaleIndexError, match=r"stale index: .* built from bundle aaaaaaaaaaaa, but the serving "
                                              r"bundle is bbbbbbbbbbbb; rebuild with `llmrec serve --build-index"):
        load_index(tmp_path / "index", "b" * 64)
    assert not list(tmp_path.glob(".index.*"))  # no temporary directory left behind


def test_bad_builds_are_refused(catalogue, tmp_path):
    emb, ids = catalogue
    with pytest.raises(ValueError, match="serve.index='annoy' is unknown"):
        SongIndex.build(emb, ids, "h", "annoy")
    with pytest.raises(ValueError, match="needs at least 64 songs"):
        SongIndex.build(emb[:10], ids[:10], "h", "ivf", nlist=64)
    with pytest.raises(ValueError, match="not unique"):
        SongIndex.build(emb[:2], ["x", "x"], "h")
    bad = emb[:2].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SongIndex.build(bad, ids[:2], "h")
    with pytest.raises(FileNotFoundError, match="llmrec serve --build-index"):
        load_index(tmp_path / "nothing", "h")


def test_search_ranks_in_the_centred_space(tmp_path):
    # An anisotropic catalogue: two groups that differ by a small residual on a large shared direction. Raw
    # cosines between the groups are ~0.995; with the catalogue mean (10, .5, .5) removed they are -1 (by hand).
    raw = unit(np.array([[10.0, 1.0, 0.0], [10.0, 1.0, 0.0], [10.0, 0.0, 1.0], [10.0, 0.0, 1.0]]))
    ids = ["a1", "a2", "b1", "b2"]
    index = SongIndex.build(raw, ids, "c" * 64)
    hits = dict(index.search(raw[:1], 4)[0])
    assert hits["a2"] == pytest.approx(1.0, abs=1e-5) and hits["b1"] == pytest.approx(-1.0, abs=1e-5)
    np.testing.assert_array_equal(index.vectors(["b2"]), raw[3:4])  # stored vectors stay as the model wrote them
    # A song added later is centred with the build-time mean, and the mean survives save/load.
    index.add(raw[2:3], ["b3"])
    index.save(tmp_path / "index")
    loaded = load_index(tmp_path / "index", "c" * 64)
    np.testing.assert_allclose(loaded.center, index.center)
    assert dict(loaded.search(raw[2:3], 5)[0])["b3"] == pytest.approx(1.0, abs=1e-5)
