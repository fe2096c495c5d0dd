"""Request rows are built as training built them: the server's song prompt is train.stages.item_prompts'."""
from __future__ import annotations

import pandas as pd
from transformers import AutoTokenizer

from llmrec.model.mm_lm import item_prompt, read_mm_config
from serve.inputs import RequestError, resolve_media_path
from train.stages import item_prompts


def test_server_song_prompt_equals_training_item_prompt(tiny_bundle, synthetic_catalog):
    tok = AutoTokenizer.from_pretrained(tiny_bundle / "lm")
    mm = read_mm_config(tiny_bundle)
    songs = synthetic_catalog.songs.head(12)
    want = item_prompts(songs, tok, mm, 256, 96)
    for row in songs.to_dict("records"):
        assert item_prompt(row, tok, mm, 256, 96) == want[row["song_id"]]
    assert item_prompts(pd.DataFrame([{"song_id": "x", "title": "T", "artist": "A"}]), tok, mm, 60, 500)["x"] == \
        item_prompt({"song_id": "x", "title": "T", "artist": "A"}, tok, mm, 60, 500)


def test_media_paths_resolve_inside_roots_only(tmp_path):
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "x.wav").write_bytes(b"x")
    assert resolve_media_path("a/x.wav", [str(tmp_path / "root")], "f") == (tmp_path / "root" / "a" / "x.wav").resolve()
    for bad, status in (("../root2/x", 403), ("/etc/passwd", 403), ("a/missing.wav", 404), ("", 422)):
        try:
            resolve_media_path(bad, [str(tmp_path / "root")], "f")
        except RequestError as e:
            assert e.status == status and e.field == "f", (bad, e)
        else:
            raise AssertionError(f"{bad!r} was accepted")
