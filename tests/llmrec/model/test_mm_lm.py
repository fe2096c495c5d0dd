"""The multimodal LM: projector builder, placeholder splice (positions and counts), embeddings, save/load."""
from __future__ import annotations

import pytest
import torch

from llmrec.config import ModelConfig
from llmrec.model.backbone import build_tiny_llama, train_bpe_tokenizer
from llmrec.model.mm_lm import MediaBatch, MMConfig, MultimodalLM, expand_placeholders
from llmrec.model.projector import build_projector
from llmrec.text import AUDIO_TOKEN, COVER_TOKEN, EMBED_TOKEN

TEXTS = ["a slow piano song with a calm cover", "recommended because you like fast synth rock"] * 20
KA, KC, DA, DC, LA = 3, 2, 12, 10, 4


@pytest.fixture(scope="module")
def model():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    lm = build_tiny_llama(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    cfg = MMConfig(projector="mlp2x_gelu", audio_layers=LA, audio_tokens=KA, audio_dim=DA, cover_layers=1,
                   cover_tokens=KC, cover_dim=DC, embedding_dim=16, cf_dim=8)
    torch.manual_seed(0)
    return MultimodalLM(lm, tok, cfg).eval()


def media(n_audio, n_cover, audio_present=None, cover_present=None):
    g = torch.Generator().manual_seed(1)
    return MediaBatch(
        audio=torch.randn(n_audio, LA, KA, DA, generator=g),
        audio_present=torch.ones(n_audio) if audio_present is None else torch.tensor(audio_present, dtype=torch.float),
        cover=torch.randn(n_cover, 1, KC, DC, generator=g),
        cover_present=torch.ones(n_cover) if cover_present is None else torch.tensor(cover_present, dtype=torch.float),
    )


def encode(model, texts):
    texts = [expand_placeholders(t, KA, KC) for t in texts]
    enc = model.tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_projector_builder():
    assert build_projector("linear", 4, 8)(torch.zeros(2, 4)).shape == (2, 8)
    assert build_projector("mlp2x_gelu", 4, 8)(torch.zeros(2, 4)).shape == (2, 8)
    with pytest.raises(ValueError, match=r"unknown projector type 'mlp3'; choose one of \['linear', 'mlp2x_gelu'\]"):
        build_projector("mlp3", 4, 8)


def test_placeholders_are_single_tokens(model):
    ids = model.tokenizer(f"x {AUDIO_TOKEN}{COVER_TOKEN}{EMBED_TOKEN}").input_ids
    assert ids[-3:] == [model.audio_id, model.cover_id, model.embed_id]


def test_splice_fills_each_group_in_order_and_leaves_text_alone(model):
    ids, mask = encode(model, [f"two songs {AUDIO_TOKEN} and {AUDIO_TOKEN}{COVER_TOKEN}", f"one {AUDIO_TOKEN} x"])
    m = media(3, 1)
    with torch.no_grad():
        out = model.splice(ids, m)
        plain = model.lm.get_input_embeddings()(ids)
        audio_vecs = model.audio_proj(m.audio, m.audio_present)
        cover_vecs = model.cover_proj(m.cover, m.cover_present)
    a_pos = (ids == model.audio_id).nonzero().tolist()
    assert len(a_pos) == 3 * KA
    # group g (row-major over the batch) holds audio row g, token j of the group holds vector j
    for n, (b, t) in enumerate(a_pos):
        torch.testing.assert_close(out[b, t], audio_vecs[n // KA, n % KA])
    c_pos = (ids == model.cover_id).nonzero().tolist()
    assert [b for b, _ in c_pos] == [0] * KC
    for n, (b, t) in enumerate(c_pos):
        torch.testing.assert_close(out[b, t], cover_vecs[0, n])
    text = (ids != model.audio_id) & (ids != model.cover_id)
    torch.testing.assert_close(out[text], plain[text])


def test_count_mismatch_is_a_clear_error(model):
    ids, _ = encode(model, [f"{AUDIO_TOKEN}{AUDIO_TOKEN}"])
    with pytest.raises(ValueError, match=r"6 audio placeholder tokens but 3 projected audio vectors"):
        model.splice(ids, media(1, 0))
    with pytest.raises(ValueError, match="no media features were given"):
        model.splice(ids, None)


def test_missing_modality_uses_the_learned_missing_embedding(model):
    ids, _ = encode(model, [f"{AUDIO_TOKEN}{COVER_TOKEN}"])
    with torch.no_grad():
        out = model.splice(ids, media(1, 1, audio_present=[0.0], cover_present=[1.0]))
    torch.testing.assert_close(out[ids == model.audio_id], model.audio_proj.missing.detach())


def test_embeddings_are_unit_norm_and_see_the_audio(model):
    ids, mask = encode(model, [f"song {AUDIO_TOKEN}{COVER_TOKEN}{EMBED_TOKEN}"] * 2)
    m = media(2, 2)
    with torch.no_grad():
        emb = model.embed(ids, mask, m)
        assert emb.shape == (2, 16)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
        assert not torch.allclose(emb[0], emb[1])  # same text, different audio/cover -> different embedding
    ids2, mask2 = encode(model, ["no embedding token here"])
    with pytest.raises(ValueError, match="must contain the <emb> token"):
        model.embed(ids2, mask2)


def test_multimodal_weights_round_trip(model, tmp_path):
    model.save_multimodal(tmp_path)
    other = MultimodalLM(model.lm, model.tokenizer, model.cfg)
    other.load_multimodal(tmp_path)
    ids, mask = encode(model, [f"song {AUDIO_TOKEN}{COVER_TOKEN}{EMBED_TOKEN}"])
    with torch.no_grad():
        torch.testing.assert_close(other.eval().embed(ids, mask, media(1, 1)), model.embed(ids, mask, media(1, 1)))
    assert all(not k.startswith("lm.") for k in model.multimodal_state_dict())


def _greedy_by_hand(model, text, m, steps):
    """Reference: repeated full forward passes on the spliced prompt, argmax each step (no KV cache)."""
    ids, mask = encode(model, [text])
    embeds = model.splice(ids, m)
    out = []
    for _ in range(steps):
        logits = model.lm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == model.tokenizer.eos_token_id:
            break
        embeds = torch.cat([embeds, model.lm.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
    return out


def test_generate_left_padded_batch_matches_greedy_by_hand(model):
    texts = [f"a slow piano song {AUDIO_TOKEN}",
             f"you like fast synth rock with a calm cover {AUDIO_TOKEN}{COVER_TOKEN}"]
    model.tokenizer.padding_side = "left"
    try:
        ids, mask = encode(model, texts)
    finally:
        model.tokenizer.padding_side = "right"
    assert (mask[:, 0] == 0).any()  # the batch really is padded
    m = media(2, 1)
    with torch.no_grad():
        new = model.generate(ids, mask, m, max_new_tokens=6)
        rows = [MediaBatch(m.audio[:1], m.audio_present[:1], m.cover[:0], m.cover_present[:0]),
                MediaBatch(m.audio[1:], m.audio_present[1:], m.cover, m.cover_present)]
        for i, text in enumerate(texts):
            ref = _greedy_by_hand(model, text, rows[i], 6)
            assert new[i].tolist()[: len(ref)] == ref


def test_generate_refuses_right_padding(model):
    ids, mask = encode(model, ["a slow piano song", "recommended because you like fast synth rock"])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, mask, None, max_new_tokens=2)


def test_text_fusing_model_needs_and_uses_the_sentence_rows(model):
    from dataclasses import replace

    fused = MultimodalLM(model.lm, model.tokenizer, replace(model.cfg, text_dim=6, text_encoder="minilm")).eval()
    ids, mask = encode(model, [f"song {AUDIO_TOKEN}{COVER_TOKEN}{EMBED_TOKEN}"] * 2)
    with torch.no_grad(), pytest.raises(ValueError, match="fuses minilm-encoder features"):
        fused.embed(ids, mask, media(2, 2))  # no MediaBatch.text: refused, never silently dropped
    m = media(2, 2)
    m.text = torch.eye(6)[:2]
    same = replace(m, text=torch.eye(6)[[0, 0]])
    with torch.no_grad():
        a, b = fused.embed(ids, mask, m), fused.embed(ids, mask, same)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])  # only the row whose text features changed moves


def right_padded(model, texts, answer_from=None):
    """input_ids, attention_mask, labels (-100 before token `answer_from` and on pads), right-padded."""
    rows = [model.tokenizer(expand_placeholders(t, KA, KC)).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), model.tokenizer.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        if answer_from is not None:
            labels[i, answer_from:len(r)] = torch.tensor(r[answer_from:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_one_pass_loss_and_embeddings_equal_the_separate_calls(model):
    """Training's single backbone pass (reasons + songs stacked, so ZeRO-3 frees each layer after its backward)
    gives the same loss, embeddings and gradients as the LM forward and `embed` run apart."""
    lm = right_padded(model, [f"{AUDIO_TOKEN} a slow piano song, recommended because you like calm",
                              f"{COVER_TOKEN}{AUDIO_TOKEN} fast synth rock with a long tail of extra words here"], 3)
    lm["media"] = media(2, 1)
    songs = right_padded(model, [f"{AUDIO_TOKEN}{COVER_TOKEN} piano {EMBED_TOKEN}",
                                 f"{AUDIO_TOKEN}{COVER_TOKEN} rock {EMBED_TOKEN}",
                                 f"{AUDIO_TOKEN}{COVER_TOKEN} {EMBED_TOKEN}"])
    songs["media"] = media(3, 3, audio_present=[1, 0, 1])
    assert songs["input_ids"].shape[1] != lm["input_ids"].shape[1]  # the stacking pads one of them

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.audio_proj.parameters()]

    ref_loss = model(lm["input_ids"], lm["attention_mask"], lm["labels"], lm["media"]).loss
    ref_emb = model.embed(songs["input_ids"], songs["attention_mask"], songs["media"])
    ref_grads = grads(ref_loss + ref_emb[:, 0].sum())
    loss, emb = model.loss_and_embed(lm, songs)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(emb, ref_emb)
    for got, want in zip(grads(loss + emb[:, 0].sum()), ref_grads):
        torch.testing.assert_close(got, want)
    assert any(g.abs().sum() > 0 for g in ref_grads)
    model.zero_grad()
