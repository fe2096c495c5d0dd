"""Stage 2b: the embedding heads refitted on cached backbone states (train/head_refit.py)."""
from types import SimpleNamespace

import torch

from llmrec.model.heads import EmbeddingHead, IDMappingHead
from train.head_refit import HeadInputs, refit_heads, without_lm_state

HIDDEN, DIM, CF, AUDIO = 16, 8, 4, 6


def _heads(seed: int = 0) -> SimpleNamespace:
    torch.manual_seed(seed)
    return SimpleNamespace(embed_head=EmbeddingHead(HIDDEN, DIM, audio_dim=AUDIO), id_head=IDMappingHead(DIM, CF))


def _catalogue(n: int, seed: int = 1) -> tuple[HeadInputs, list[dict]]:
    """Songs whose CF factor is a fixed linear function of their backbone state, and whose co-listened partner is
    the song with the nearest factor: what the heads can learn from the states."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, HIDDEN, generator=gen)
    factors = hidden @ torch.randn(HIDDEN, CF, generator=gen)
    ids = [f"s{i}" for i in range(n)]
    sims = torch.nn.functional.normalize(factors, dim=1) @ torch.nn.functional.normalize(factors, dim=1).T
    sims.fill_diagonal_(-2)
    partner = sims.argmax(1)
    pairs = [{"song_id": ids[i], "cf_factor": factors[i].tolist(), "pos_song_id": ids[int(partner[i])]}
             for i in range(n)]
    inputs = HeadInputs(ids, hidden, torch.randn(n, AUDIO, generator=gen), None, None)
    return inputs, pairs


def _refit(model, inputs, pairs, **kw):
    args = dict(epochs=40, lr=1e-2, batch_size=64, colisten_weight=0.5, temperature=0.1, seed=0)
    return refit_heads(model, inputs, pairs, **(args | kw))


def test_refit_lowers_the_held_out_loss_and_keeps_unit_embeddings():
    model, (inputs, pairs) = _heads(), _catalogue(300)
    report = _refit(model, inputs, pairs)
    assert report["songs"] == 300 and report["held_out_songs"] == 30 and report["co_listen_pairs"] > 0
    before, after = report["held_out_loss"]
    assert after < 0.8 * before, report
    assert report["best_epoch"] >= 1
    emb = inputs.embeddings(model)
    assert emb.shape == (300, DIM)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(300))


def test_the_stage2_heads_are_kept_when_no_epoch_beats_them():
    """lr = 0: no epoch improves the held-out loss, so the heads stay exactly as stage 2 left them, and the refit
    stops after its patience instead of running every epoch."""
    model, (inputs, pairs) = _heads(), _catalogue(120)
    before = {k: v.clone() for k, v in model.embed_head.state_dict().items()}
    report = _refit(model, inputs, pairs, lr=0.0)
    assert report["best_epoch"] == 0 and report["epochs_run"] < 40
    for k, v in model.embed_head.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert all(p.requires_grad for p in model.embed_head.parameters())  # trainability restored as it was


def test_songs_without_a_cf_factor_are_embedded_but_not_fitted():
    """Only songs with a CF factor (training plays) are fitted; pair rows naming songs outside the inputs are
    ignored, and new songs still get embeddings from the refitted heads."""
    model, (inputs, pairs) = _heads(), _catalogue(100)
    kept = pairs[:60] + [{"song_id": "not-in-catalogue", "cf_factor": [0.0] * CF, "pos_song_id": "s1"}]
    report = _refit(model, inputs, kept, epochs=3)
    assert report["songs"] == 60
    assert torch.isfinite(inputs.embeddings(model)[60:]).all()


def test_too_few_songs_are_reported_not_fitted():
    model, (inputs, pairs) = _heads(), _catalogue(10)
    assert "nothing to refit" in _refit(model, inputs, pairs[:1])["skipped"]


def test_sampled_negatives_cover_the_whole_table_when_given_every_row():
    """The sampled-softmax path with every table row as a candidate is the whole-table loss (rows reordered)."""
    from train.head_refit import _loss, _refit_data

    model, (inputs, pairs) = _heads(), _catalogue(50)
    data = _refit_data(inputs, pairs)
    songs = torch.tensor([3, 7, 11, 20])
    full = _loss(model, inputs, data, songs, 0.5, 0.1)
    sampled = _loss(model, inputs, data, songs, 0.5, 0.1, negatives=torch.arange(50))
    torch.testing.assert_close(sampled, full)


def test_a_big_catalogue_trains_on_sampled_negatives(monkeypatch):
    import train.head_refit as head_refit

    monkeypatch.setattr(head_refit, "MAX_TABLE_NEGATIVES", 40)  # 300 songs: every step samples 40 of them
    model, (inputs, pairs) = _heads(), _catalogue(300)
    before, after = _refit(model, inputs, pairs)["held_out_loss"]
    assert after < 0.8 * before


def test_the_no_lm_heads_never_read_the_lm_state():
    """`without_lm_state`: refitted like the real heads, the copy's embeddings do not change when the LM states do
    (the branch stays zero), and the model's own heads are untouched by it."""
    model, (inputs, pairs) = _heads(), _catalogue(120)
    own = {k: v.clone() for k, v in model.embed_head.state_dict().items()}
    no_lm = without_lm_state(model)
    _refit(model=no_lm, inputs=inputs, pairs=pairs, epochs=5)
    assert no_lm.embed_head.text.weight.abs().sum() == 0 and no_lm.embed_head.text.bias.abs().sum() == 0
    other = HeadInputs(inputs.song_ids, torch.randn_like(inputs.hidden), inputs.audio, None, None)
    torch.testing.assert_close(other.embeddings(no_lm), inputs.embeddings(no_lm))
    for k, v in model.embed_head.state_dict().items():
        torch.testing.assert_close(v, own[k])
