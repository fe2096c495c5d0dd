"""Answer-only labels, media rows in placeholder order, modality dropout."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from llmrec.model.backbone import train_bpe_tokenizer
from llmrec.model.collate import IGNORE, MultimodalCollator
from llmrec.text import AUDIO_TOKEN, COVER_TOKEN


@dataclass
class FakeFeatures:
    index: dict
    audio: torch.Tensor
    audio_present: torch.Tensor
    cover: torch.Tensor
    cover_present: torch.Tensor


@pytest.fixture(scope="module")
def collate():
    tok = train_bpe_tokenizer(["describe this song please", "a slow piano song"] * 10, vocab_size=200)
    feats = FakeFeatures({"s1": 0, "s2": 1}, torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 3).clone(),
                         torch.tensor([1, 0]), torch.zeros(2, 1, 2, 3), torch.tensor([1, 1]))
    return MultimodalCollator(tok, feats, audio_tokens=2, cover_tokens=2, max_length=64)


def test_labels_cover_the_answer_only(collate):
    tok = collate.tokenizer
    batch = collate([{"prompt": f"{AUDIO_TOKEN} describe", "answer": "a slow piano song", "audio_song_ids": ["s1"]},
                     {"prompt": "describe this song please", "answer": "piano"}])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    # the answer is tokenised as it follows the prompt in running text: after a space
    answer = tok(" a slow piano song", add_special_tokens=False).input_ids + [tok.eos_token_id]
    row0 = labels[0][labels[0] != IGNORE].tolist()
    assert row0 == answer
    n_prompt = 1 + len(tok(f"{AUDIO_TOKEN * 2} describe", add_special_tokens=False).input_ids)
    assert (labels[0, :n_prompt] == IGNORE).all() and labels[0, n_prompt] == answer[0]
    assert (labels[mask == 0] == IGNORE).all()  # padding never counts
    assert (ids[0] == tok.convert_tokens_to_ids(AUDIO_TOKEN)).sum() == 2  # expanded to K tokens


def test_media_rows_follow_placeholder_order_and_unknown_songs_are_missing(collate):
    batch = collate([{"prompt": f"{AUDIO_TOKEN}{AUDIO_TOKEN}", "audio_song_ids": ["s2", "s1"]},
                     {"prompt": f"{AUDIO_TOKEN}{COVER_TOKEN}", "audio_song_ids": ["nope"], "cover_song_ids": ["s1"]}])
    media = batch["media"]
    assert media.audio[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert media.audio_present.tolist() == [0.0, 1.0, 0.0]  # s2 has no audio; "nope" has no features at all
    assert media.cover.shape == (1, 1, 2, 3) and media.cover_present.tolist() == [1.0]


def test_text_rows_come_with_embedding_rows_only(collate):
    from dataclasses import replace

    from llmrec.features import TextFeatures

    text = TextFeatures(["s1", "s2"], {"s1": 0, "s2": 1}, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "minilm")
    fused = replace(collate, text_features=text)
    rows = [{"prompt": "describe", "text_song_id": "s2"}, {"prompt": "describe", "text_song_id": "nope"}]
    media = fused(rows)["media"]
    torch.testing.assert_close(media.text, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))  # unknown song: a zero row
    assert fused([{"prompt": "describe", "answer": "piano"}])["media"].text is None  # reason rows carry none
    assert collate([{"prompt": "describe", "text_song_id": "s1"}])["media"].text is None  # model without fusion


def test_overlong_prompt_is_a_clear_error(collate):
    with pytest.raises(ValueError, match="exceeds train.max_length=64"):
        collate([{"prompt": "describe " * 200}])


def test_modality_dropout_marks_rows_missing_reproducibly():
    from llmrec.model.collate import drop_modalities
    from llmrec.model.mm_lm import MediaBatch

    media = MediaBatch(torch.randn(400, 1, 2, 3), torch.ones(400), torch.randn(400, 1, 2, 3), torch.ones(400))
    assert drop_modalities(media, 0.0, torch.Generator().manual_seed(0)) is media
    a = drop_modalities(media, 0.25, torch.Generator().manual_seed(7))
    b = drop_modalities(media, 0.25, torch.Generator().manual_seed(7))
    assert torch.equal(a.audio_present, b.audio_present) and torch.equal(a.cover_present, b.cover_present)
    assert 0.15 < 1 - a.audio_present.mean().item() < 0.35 and 0.15 < 1 - a.cover_present.mean().item() < 0.35
    assert not torch.equal(a.audio_present, a.cover_present)  # modalities drop independently
    assert a.audio is media.audio  # features untouched; only presence changes
    assert drop_modalities(media, 1.0, torch.Generator()).audio_present.sum() == 0
    missing = MediaBatch(media.audio, torch.zeros(400), media.cover, torch.zeros(400))
    assert drop_modalities(missing, 0.5, torch.Generator()).audio_present.sum() == 0  # missing stays missing
