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


def test_text_fusing_bundle_gets_catalog_and_new_song_text_rows(tiny_bundle, synthetic_catalog):
    from dataclasses import replace

    import numpy as np
    import pytest
    import torch

    from llmrec.config import load_config
    from llmrec.features import TextFeatures
    from llmrec.text_features import encode_texts, song_text
    from serve.engines.base import concat_media
    from serve.inputs import SongInputs

    tok = AutoTokenizer.from_pretrained(tiny_bundle / "lm")
    mm = replace(read_mm_config(tiny_bundle), text_dim=384, text_encoder="minilm")
    songs = synthetic_catalog.songs.head(3).to_dict("records")
    ids = [s["song_id"] for s in songs]
    stored = TextFeatures(ids, {s: i for i, s in enumerate(ids)}, torch.eye(3, 384), "minilm")
    empty = type("NoMedia", (), {"index": {}, "audio": torch.zeros(1, mm.audio_layers, mm.audio_tokens, mm.audio_dim),
                                 "audio_present": torch.zeros(1), "cover": torch.zeros(1, 1, mm.cover_tokens,
                                                                                         mm.cover_dim),
                                 "cover_present": torch.zeros(1)})()
    cfg = load_config(extra_presets=["quick"])
    with pytest.raises(ValueError, match="fuses text features"):
        SongInputs(cfg, tok, mm, songs, empty)
    inputs = SongInputs(cfg, tok, mm, songs, empty, text_features=stored)
    items = [inputs.catalog_embed_input(ids[1], "input"), inputs.catalog_embed_input(ids[2], "input")]
    torch.testing.assert_close(concat_media(items).text, torch.eye(3, 384)[1:])  # the stored rows, in order
    # A new song: the same sentence encoder on the same text `llmrec features` would have built for it.
    row = inputs.new_song({"title": "Night Rain", "artist": "The Echoes", "lyrics": "rain on the window"}, "input")
    want = encode_texts([song_text(row)], "minilm")[0]
    np.testing.assert_allclose(inputs.text_codec.encode(row).numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="features.text_encoder=minilm"):
        SongInputs(cfg, tok, replace(mm, text_encoder="tfidf"), songs, empty, text_features=stored)
