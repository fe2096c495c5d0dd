"""Stages 0-2 end to end on a very small synthetic run: what trains, what is saved, and that it reloads equal."""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace

import pytest
import torch
from datasets import Dataset, load_from_disk
from safetensors import safe_open

from data_prep.features import run_features
from data_prep.prepare import run_prepare
from llmrec.config import load_config
from llmrec.evidence import Evidence
from llmrec.features import load_media_features
from llmrec.io import open_run_dir
from llmrec.model.bundle import load_bundle
from llmrec.model.collate import MultimodalCollator
from llmrec.model.mm_lm import MultimodalLM
from llmrec.schema import load_catalog
from train.stages import (
    _mm_config,
    add_lora,
    cf_alignment_loss,
    item_prompts,
    run_train,
    stage2_reasons,
    train_stage2_parameters,
)

pytestmark = pytest.mark.slow

TINY = ["synthetic.n_songs=40", "synthetic.n_new_songs=8", "synthetic.n_users=30", "synthetic.n_artists=8",
        "synthetic.events_per_user=20", "synthetic.audio_seconds=1.5",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.tokenizer_vocab=600", "model.embedding_dim=16", "model.lora_r=4",
        "features.workers=1", "features.encoder_pretrain_steps=2", "features.encoder_pretrain_batch=4",
        "features.text_encoder=tfidf",
        "train.stage0_steps=6", "train.stage1_steps=3", "train.stage2_steps=3", "train.batch_size=4",
        "train.save_every=2", "train.max_length=384"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = open_run_dir(tmp_path_factory.mktemp("run"))
    cfg = load_config(extra_presets=["quick"], overrides=TINY)
    args = argparse.Namespace(no_progress=True)
    run_prepare(cfg, run, args)
    run_features(cfg, run, args)
    result = run_train(cfg, run, args)
    return cfg, run, result


def test_every_stage_writes_its_artefacts(trained):
    cfg, run, result = trained
    for path in ("stage0/config.json", "stage1/multimodal.safetensors", "stage2/adapter/adapter_config.json",
                 "bundle/bundle.json", "bundle/lm/model.safetensors", "bundle/multimodal.safetensors",
                 "embeddings.safetensors"):
        assert (run.model / path).is_file(), path
    with safe_open(str(run.model / "embeddings.safetensors"), "pt") as f:
        emb = f.get_tensor("embeddings")
    assert emb.shape == (48, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(48))


def test_bundle_reloads_with_identical_embeddings(trained):
    cfg, run, _ = trained
    model, meta = load_bundle(run.model / "bundle")
    assert len(meta["content_hash"]) == 64
    features = load_media_features(run.features)
    collate = MultimodalCollator(model.tokenizer, features, model.cfg.audio_tokens, model.cfg.cover_tokens,
                                 cfg.train.max_length)
    from llmrec.schema import load_catalog
    from train.stages import song_embeddings

    prompts = item_prompts(load_catalog(run.catalog).songs, model.tokenizer, model.cfg, cfg.train.max_length,
                           cfg.prompt.song_budget)
    ids, emb = song_embeddings(model, collate, prompts)
    with safe_open(str(run.model / "embeddings.safetensors"), "pt") as f:
        saved = f.get_tensor("embeddings")
    torch.testing.assert_close(emb, saved, atol=1e-5, rtol=1e-4)


def test_modality_ablation_embeddings_differ_from_the_full_model(trained):
    _, run, _ = trained
    from train.stages import ABLATIONS

    with safe_open(str(run.model / "embeddings.safetensors"), "pt") as f:
        full = f.get_tensor("embeddings")
    for variant in ABLATIONS:
        with safe_open(str(run.model / f"embeddings-{variant}.safetensors"), "pt") as f:
            ablated = f.get_tensor("embeddings")
        assert ablated.shape == full.shape
        torch.testing.assert_close(ablated.norm(dim=-1), torch.ones(len(full)))
        assert (ablated - full).abs().max() > 1e-3, variant  # hiding a modality changes the embedding


def test_the_exported_heads_are_refitted_on_every_training_song(trained):
    """Stage 2b ran on every song with a CF factor (32 training songs here: too few to hold a tenth out, so all
    its epochs ran), and the bundle serves those heads: `test_bundle_reloads_with_identical_embeddings` re-embeds the
    catalogue from the bundle and gets the saved embeddings."""
    cfg, run, result = trained
    refit = json.loads((run.model / "train_summary.json").read_text())["head_refit"]
    assert refit == result["heads refit (stage 2b)"]
    songs_with_factor = {r["song_id"] for r in load_from_disk(str(run.examples / "pairs"))}
    assert refit["songs"] == len(songs_with_factor) > 8
    assert refit["held_out_songs"] == 0 and refit["epochs_run"] == refit["best_epoch"] == cfg.train.head_refit_epochs
    assert refit["without the LM state"]["songs"] == refit["songs"]
    with safe_open(str(run.model / "embeddings.safetensors"), "pt") as f:
        full = f.get_tensor("embeddings")
    with safe_open(str(run.model / "embeddings-no-lm.safetensors"), "pt") as f:
        no_lm = f.get_tensor("embeddings")
    assert no_lm.shape == full.shape and (no_lm - full).abs().max() > 1e-3


def test_rerun_skips_finished_stages(trained):
    cfg, run, _ = trained
    stamp = (run.model / "stage0" / "model.safetensors").stat().st_mtime_ns
    run_train(cfg, run, argparse.Namespace(no_progress=True))
    assert (run.model / "stage0" / "model.safetensors").stat().st_mtime_ns == stamp


def test_stage2_trains_when_some_songs_have_no_co_listened_partner(trained, tmp_path):
    """A song whose listeners played nothing else (pos_song_id None, counted by `llmrec prepare`) keeps its CF
    alignment row; stage 2 leaves it out of the co-listen loss instead of failing on it."""
    cfg, run, _ = trained
    other = open_run_dir(tmp_path / "run")
    for name in ("catalog", "features"):
        (other.root / name).symlink_to(getattr(run, name), target_is_directory=True)
    shutil.copytree(run.examples, other.examples)
    pairs = load_from_disk(str(run.examples / "pairs")).to_list()
    for k, row in enumerate(pairs):
        if k % 2:
            row["pos_song_id"] = None
    shutil.rmtree(other.examples / "pairs")
    Dataset.from_list(pairs, features=load_from_disk(str(run.examples / "pairs")).features).save_to_disk(
        str(other.examples / "pairs"))
    for stage in ("stage0", "stage1"):
        shutil.copytree(run.model / stage, other.model / stage)
    run_train(cfg, other, argparse.Namespace(no_progress=True))
    losses = json.loads((other.model / "stage2" / "losses.json").read_text())
    assert len(losses) == cfg.train.stage2_steps and all(torch.isfinite(torch.tensor(losses)))


def test_stage2_trains_only_lora_projectors_and_heads(trained):
    cfg, run, _ = trained
    from transformers import AutoTokenizer, LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(run.model / "stage0")
    tok = AutoTokenizer.from_pretrained(run.model / "stage0")
    features = load_media_features(run.features)
    model = MultimodalLM(lm, tok, _mm_config(cfg, features, 32))
    add_lora(model, cfg)
    train_stage2_parameters(model)
    collate = MultimodalCollator(tok, features, model.cfg.audio_tokens, model.cfg.cover_tokens, 384)
    from datasets import load_from_disk

    batch = collate(load_from_disk(str(run.examples / "stage2")).to_list()[:2])
    model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "nothing received a gradient"
    assert all("lora_" in n or not n.startswith("lm.") for n in with_grad), sorted(with_grad)[:5]
    assert any("lora_" in n for n in with_grad) and any(n.startswith("audio_proj.") for n in with_grad)


def test_unknown_lora_target_lists_the_real_names(trained):
    cfg, run, _ = trained
    from transformers import AutoTokenizer, LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(run.model / "stage0")
    model = MultimodalLM(lm, AutoTokenizer.from_pretrained(run.model / "stage0"),
                         _mm_config(cfg, load_media_features(run.features), 32))
    bad = load_config(overrides=["model.lora_targets=[W_pack]"])
    with pytest.raises(ValueError, match=r"LoRA target\(s\) \['W_pack'\] do not exist.*'q_proj'"):
        add_lora(model, bad)


def test_cf_alignment_loss_takes_negatives_from_the_batch_or_the_whole_table():
    pairs = [{"song_id": "a", "cf_factor": [1.0, 0.0]}, {"song_id": "a", "cf_factor": [1.0, 0.0]},
             {"song_id": "b", "cf_factor": [0.0, 1.0]}, {"song_id": "c", "cf_factor": [1.0, 0.0]}]
    batch = [pairs[0], pairs[2]]  # songs a and b; c (a's CF direction) is outside the batch
    mapped = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    in_batch = cf_alignment_loss(pairs, "batch", 0.1)(mapped, batch)
    catalog = cf_alignment_loss(pairs, "catalog", 0.1)(mapped, batch)
    assert catalog > in_batch  # song c competes with song a only when the table is the catalogue
    with pytest.raises(ValueError, match="cf_negatives 'queue'.*'batch', 'catalog'"):
        cf_alignment_loss(pairs, "queue", 0.1)


def test_stage2_trains_with_catalog_negatives(trained, tmp_path):
    cfg, run, _ = trained
    other = open_run_dir(tmp_path / "run")
    for name in ("catalog", "features", "examples"):
        (other.root / name).symlink_to(getattr(run, name), target_is_directory=True)
    for stage in ("stage0", "stage1"):
        shutil.copytree(run.model / stage, other.model / stage)
    run_train(replace(cfg, train=replace(cfg.train, cf_negatives="catalog")), other,
              argparse.Namespace(no_progress=True))
    losses = json.loads((other.model / "stage2" / "losses.json").read_text())
    assert len(losses) == cfg.train.stage2_steps and all(torch.isfinite(torch.tensor(losses)))
    reference = json.loads((run.model / "stage2" / "losses.json").read_text())
    assert losses[0] != pytest.approx(reference[0])  # the loss really changed: same first batch, more negatives


def _evidence(row: dict) -> list[Evidence]:
    return [Evidence(**json.loads(e)) for e in row["evidence"]]


def test_stage2_reasons_list_what_the_perception_heads_perceive(trained):
    """Prepare writes the reasons before the perception heads exist; train rebuilds the ones whose candidate is
    perceived with confidence, from the same plays and catalog text, so the perceived attribute is evidence (and
    answers learn to state it) exactly as the server's prompts will list it."""
    cfg, run, _ = trained
    catalog = load_catalog(run.catalog)
    prepared = load_from_disk(str(run.examples / "stage2")).to_list()
    unsure = {r["song_id"]: [("mood", "glassy", 0.5)] for r in prepared}  # below min_perceived_confidence (0.8)
    assert stage2_reasons(cfg, run, catalog, unsure) == prepared
    sure = {r["song_id"]: [("mood", "glassy", 0.97)] for r in prepared}
    rebuilt = stage2_reasons(cfg, run, catalog, sure)
    assert len(rebuilt) == len(prepared)
    perceived = Evidence("perceived", "glassy", confidence=0.97, attribute="mood")
    with_it = 0
    for old, new in zip(prepared, rebuilt):
        assert (new["user_id"], new["song_id"], new["timestamp"]) == (old["user_id"], old["song_id"], old["timestamp"])
        items = _evidence(new)
        # Same plays, same catalog text: every other item is prepare's, in prepare's order, up to the item cap.
        assert [e for e in items if e.kind != "perceived"] == _evidence(old)[:len(items) - (perceived in items)]
        assert perceived in items or len(items) == cfg.prompt.evidence_items
        if perceived in items:
            with_it += 1
            assert 'mood (perceived, 97%): "glassy"' in new["prompt"]
        assert len(new["history_timestamps"]) == len(new["history_song_ids"]) > 0
    assert with_it > len(rebuilt) // 2
    assert any("glassy" in r["answer"] for r in rebuilt) and not any("glassy" in r["answer"] for r in prepared)
