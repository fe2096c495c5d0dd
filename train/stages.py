"""`llmrec train`: stage 0 (tiny preset: backbone pretraining on catalog text), stage 1 (projector alignment on
captions, LLM frozen), stage 2 (LoRA + projectors + heads: reasons + contrastive song<->CF and song<->co-listened),
stage 2b (the heads alone, refitted on every training song's cached backbone state: train/head_refit.py), then
export of the song embeddings and the serving bundle.

Each stage is a short recipe over `train.loop.fit`; each writes its own directory under `runs/<name>/model/` and is
skipped when that directory is complete, so a re-run resumes at the first unfinished stage.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from datasets import load_from_disk
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

from llmrec.config import Config
from llmrec.features import load_media_features, load_text_features
from llmrec.io import RunDir, atomic_dir, atomic_path, atomic_write_json
from llmrec.model.backbone import build_tiny_llama, load_backbone, resolve_dtype, train_bpe_tokenizer
from llmrec.model.collate import MultimodalCollator, drop_modalities, embedding_rows
from llmrec.model.losses import catalog_info_nce, info_nce
from llmrec.model.mm_lm import MMConfig, MultimodalLM, item_prompt
from llmrec.perception import PerceptionHeads, fit_perception, pooled_features
from llmrec.schema import load_catalog
from llmrec.text import build_embed_prompt
from train.distributed import backbone_hidden_size, build_accelerator, enable_gradient_checkpointing
from train.export import export_bundle
from train.head_refit import NO_LM, HeadInputs, head_inputs, refit_heads, without_lm_state
from train.loop import StepSampler, fit

EMBEDDINGS = "embeddings.safetensors"


def _accelerator(cfg: Config) -> Accelerator:
    # one process, DDP or DeepSpeed ZeRO: the launcher + train.deepspeed decide
    return build_accelerator(cfg.train, hidden_size=backbone_hidden_size(cfg.model))


def item_prompts(songs, tokenizer, mm_cfg: MMConfig, max_length: int, budget: int) -> dict[str, str]:
    """The embedding prompt of every song (`llmrec.model.mm_lm.item_prompt`; pass `cfg.prompt.song_budget`, as
    training does, so served embeddings match)."""
    return {row["song_id"]: item_prompt(row, tokenizer, mm_cfg, max_length, budget)
            for row in songs.to_dict("records")}


def _rows_that_fit(rows: list[dict], collate: MultimodalCollator, name: str) -> list[dict]:
    """Drop (and count) examples whose prompt is longer than train.max_length with the real tokenizer; the example
    builder budgets with an approximate token count, so a few can overshoot on a small vocabulary."""
    kept = []
    for row in rows:
        try:
            collate.encode(row["prompt"], None)
            kept.append(row)
        except ValueError:
            pass
    if len(kept) < len(rows):
        print(f"{name}: skipped {len(rows) - len(kept)} of {len(rows)} examples whose prompt exceeds "
              f"train.max_length={collate.max_length}")
    if not kept:
        raise ValueError(f"{name}: every prompt exceeds train.max_length={collate.max_length}; raise it")
    return kept


# -------------------------------------------------------------------------------------------------- stage 0

def _corpus(catalog, examples_dir: Path) -> list[str]:
    """Text the tiny backbone learns the language from: song blocks plus the training captions and reasons."""
    # Song blocks as the item prompts show them (both placeholders), sized by the approximate counter: the tokenizer
    # this text trains does not exist yet.
    both = lambda song: (True, True)  # noqa: E731
    texts = [build_embed_prompt(row, media=both).text for row in catalog.songs.to_dict("records")]
    for split in ("stage1", "stage2"):
        ds = load_from_disk(str(examples_dir / split))
        texts += [f"{p} {a}" for p, a in zip(ds["prompt"], ds["answer"])]
    return texts


def stage0(cfg: Config, run: RunDir, catalog, accelerator, progress: bool):
    out = run.model / "stage0"
    if (out / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    if cfg.model.backbone != "tiny":
        if cfg.model.load_in_4bit:  # QLoRA: 4-bit backbone, LoRA on top (train/qlora.py)
            from train.qlora import load_backbone_4bit

            return load_backbone_4bit(cfg.model.backbone)
        return load_backbone(cfg.model.backbone, resolve_dtype(cfg.model.dtype))
    texts = _corpus(catalog, run.examples)
    tokenizer = train_bpe_tokenizer(texts, cfg.model.tokenizer_vocab)
    lm = build_tiny_llama(cfg.model, tokenizer, seed=cfg.seed)
    sampler = StepSampler(len(texts), cfg.train.batch_size, cfg.seed)

    def loss_fn(step: int) -> torch.Tensor:
        batch = [tokenizer.bos_token + texts[i] + tokenizer.eos_token for i in sampler.indices(step)]
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=cfg.train.max_length,
                        add_special_tokens=False)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        return lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss

    losses = fit(lm, lm.parameters(), loss_fn, steps=cfg.train.stage0_steps, lr=cfg.train.lr_stage0,
                 warmup_ratio=cfg.train.warmup_ratio, ckpt_dir=run.model / "ckpt-stage0",
                 save_every=cfg.train.save_every, accelerator=accelerator, desc="stage 0 (backbone)", progress=progress,
                 max_grad_norm=cfg.train.max_grad_norm)
    if accelerator.is_main_process:  # every rank holds the same trained weights after fit; one writes them
        with atomic_dir(out) as tmp:
            lm.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "losses.json").write_text(json.dumps(losses))
    accelerator.wait_for_everyone()
    return lm, tokenizer


# -------------------------------------------------------------------------------------------------- stages 1-2

def _mm_config(cfg: Config, features, cf_dim: int, text_features=None) -> MMConfig:
    return MMConfig(projector=cfg.model.projector, audio_layers=features.audio.shape[1],
                    audio_tokens=features.audio.shape[2], audio_dim=features.audio.shape[3],
                    cover_layers=features.cover.shape[1], cover_tokens=features.cover.shape[2],
                    cover_dim=features.cover.shape[3], embedding_dim=cfg.model.embedding_dim, cf_dim=cf_dim,
                    text_dim=0 if text_features is None else int(text_features.text.shape[1]),
                    text_encoder="" if text_features is None else text_features.encoder)


def fused_text_features(cfg: Config, run: RunDir):
    """The sentence-encoder features to fuse into the embedding head, or None (`model.text_fusion` off, or the
    TF-IDF fallback, which cannot encode a new song when serving)."""
    if not cfg.model.text_fusion:
        return None
    text = load_text_features(run.require(run.features, "features"))
    return text if text.encoder == "minilm" else None


def _lm_loss_fn(model: MultimodalLM, rows, collate: MultimodalCollator, sampler: StepSampler):
    def loss_fn(step: int) -> torch.Tensor:
        batch = collate([rows[i] for i in sampler.indices(step)])
        return model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"]).loss
    return loss_fn


def stage1(cfg: Config, run: RunDir, model: MultimodalLM, collate, accelerator, progress: bool) -> list[float]:
    out = run.model / "stage1"
    if (out / "multimodal.safetensors").is_file():
        model.load_multimodal(out)
        return json.loads((out / "losses.json").read_text())
    model.requires_grad_(False)
    model.audio_proj.requires_grad_(True)
    model.cover_proj.requires_grad_(True)
    rows = _rows_that_fit(load_from_disk(str(run.examples / "stage1")).to_list(), collate, "stage 1")
    loss_fn = _lm_loss_fn(model, rows, collate, StepSampler(len(rows), cfg.train.batch_size, cfg.seed + 1))
    losses = fit(model, model.parameters(), loss_fn, steps=cfg.train.stage1_steps, lr=cfg.train.lr_stage1,
                 warmup_ratio=cfg.train.warmup_ratio, ckpt_dir=run.model / "ckpt-stage1",
                 save_every=cfg.train.save_every, accelerator=accelerator, desc="stage 1 (projectors)",
                 progress=progress, max_grad_norm=cfg.train.max_grad_norm)
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            model.save_multimodal(tmp)
            (tmp / "losses.json").write_text(json.dumps(losses))
    accelerator.wait_for_everyone()
    return losses


def add_lora(model: MultimodalLM, cfg: Config) -> None:
    """Wrap the backbone with LoRA; a target that does not exist is reported with the names that do."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.lm.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in cfg.model.lora_targets if t not in names]
    if unknown:
        raise ValueError(f"LoRA target(s) {unknown} do not exist in the backbone; its Linear modules are "
                         f"{sorted(names)}")
    lora = LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                      target_modules=cfg.model.lora_targets, task_type="CAUSAL_LM")
    model.lm = get_peft_model(model.lm, lora)


def train_stage2_parameters(model: MultimodalLM) -> None:
    """Stage 2's trainable set: the LoRA weights and everything outside the backbone (projectors, heads); the
    backbone's own weights stay frozen. One definition for training, the distributed test job and the tests."""
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name or not name.startswith("lm."):
            p.requires_grad_(True)


CF_NEGATIVES = ("batch", "catalog")


def cf_alignment_loss(pairs: list[dict], negatives: str, temperature: float):
    """Stage 2's song -> CF factor loss, `loss(mapped embeddings [B, cf_dim], pair rows)`, with the negatives named
    by `train.cf_negatives` (see `llmrec.model.losses`)."""
    if negatives not in CF_NEGATIVES:
        raise ValueError(f"train.cf_negatives {negatives!r} is not supported; choose one of {list(CF_NEGATIVES)}")
    if negatives == "batch":
        return lambda mapped, rows: info_nce(
            mapped, torch.tensor([r["cf_factor"] for r in rows], dtype=mapped.dtype, device=mapped.device), temperature)
    factors = {r["song_id"]: r["cf_factor"] for r in pairs}  # one row per song; pairs repeat a song per positive
    row_of = {sid: k for k, sid in enumerate(factors)}
    table = torch.tensor(list(factors.values()), dtype=torch.float32)
    return lambda mapped, rows: catalog_info_nce(
        mapped, table.to(mapped.device, mapped.dtype),
        torch.tensor([row_of[r["song_id"]] for r in rows], device=mapped.device), temperature)


def stage2(cfg: Config, run: RunDir, model: MultimodalLM, collate, prompts: dict[str, str], accelerator,
           progress: bool, reasons: Callable[[], list[dict]]) -> list[float]:
    """`reasons`: the stage-2 reason examples (`stage2_reasons`), only built when this stage still has to run."""
    done = run.model / "stage2"
    if (done / "adapter").is_dir():
        model.lm = PeftModel.from_pretrained(model.lm, done / "adapter")
        model.load_multimodal(done)
        return json.loads((done / "losses.json").read_text())
    add_lora(model, cfg)
    train_stage2_parameters(model)
    reasons = _rows_that_fit(reasons(), collate, "stage 2")
    pairs = load_from_disk(str(run.examples / "pairs")).to_list()
    lm_sampler = StepSampler(len(reasons), cfg.train.batch_size, cfg.seed + 2)
    pair_sampler = StepSampler(len(pairs), cfg.train.batch_size, cfg.seed + 3)
    t = cfg.train
    cf_loss = cf_alignment_loss(pairs, t.cf_negatives, t.temperature)

    def loss_fn(step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)  # a pure function of step: exact resume
        batch = collate([reasons[i] for i in lm_sampler.indices(step)])
        batch["media"] = drop_modalities(batch["media"], t.modality_dropout, gen)
        rows = [pairs[i] for i in pair_sampler.indices(step)]
        # A song nobody else's listener played (pos_song_id None) still has its CF factor, but no co-listen pair.
        with_pos = [k for k, r in enumerate(rows) if r["pos_song_id"] is not None] if t.colisten_weight else []
        songs = [r["song_id"] for r in rows] + [rows[k]["pos_song_id"] for k in with_pos]
        song_batch = collate(embedding_rows(prompts, songs))
        song_batch["media"] = drop_modalities(song_batch["media"], t.modality_dropout, gen)
        # One backbone pass for the reasons and the songs (MultimodalLM.loss_and_embed says why it matters).
        lm_loss, emb = model.loss_and_embed(batch, song_batch)
        emb, pos = emb[:len(rows)], emb[len(rows):]
        loss = t.lm_weight * lm_loss + t.cf_weight * cf_loss(model.id_head(emb), rows)
        if len(with_pos) >= 2:  # InfoNCE needs another pair in the batch as a negative
            loss = loss + t.colisten_weight * info_nce(emb[with_pos], pos, t.temperature)
        return loss

    return fit(model, model.parameters(), loss_fn, steps=t.stage2_steps, lr=t.lr, warmup_ratio=t.warmup_ratio,
               ckpt_dir=run.model / "ckpt-stage2", save_every=t.save_every, accelerator=accelerator,
               desc="stage 2 (LoRA + heads)", progress=progress, max_grad_norm=t.max_grad_norm)


# -------------------------------------------------------------------------------------------------- export

# Modality ablations exported next to the full embeddings (evaluated as `llmrec-<variant>`): the same trained model
# with the named modalities shown as missing, i.e. what each modality adds to the embedding.
ABLATIONS = {"text": ("audio", "cover"), "text+audio": ("cover",), "text+cover": ("audio",)}


def song_embeddings(model: MultimodalLM, collate, prompts: dict[str, str], batch_size: int = 32,
                    drop: tuple[str, ...] = (), progress: bool = False):
    """(song ids, unit embeddings) of every song in `prompts`; modalities named in `drop` are shown as missing."""
    inputs = head_inputs(model, collate, prompts, batch_size, drop, progress)
    with torch.no_grad():
        return inputs.song_ids, inputs.embeddings(model)


def save_embeddings(path: Path, song_ids: list[str], emb: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"embeddings": emb.float().contiguous()}, str(tmp), metadata={"song_ids": json.dumps(song_ids)})


def _refit_heads_and_save(cfg: Config, run: RunDir, model: MultimodalLM, inputs: HeadInputs, pairs: list[dict],
                          progress: bool) -> dict:
    """Stage 2b on `model`'s heads, and the same refit on a copy without the LM-state branch (its embeddings are
    saved as the `no-lm` variant, evaluated as `llmrec-no-lm`: what the LLM adds under the same head and training).
    Writes the embeddings; returns the refit summaries."""
    t = cfg.train
    refit: dict = {"skipped": "train.head_refit_epochs is 0"}
    if t.head_refit_epochs:
        args = (inputs, pairs, t.head_refit_epochs, t.head_refit_lr, t.head_refit_batch_size, t.colisten_weight,
                t.temperature, cfg.seed)
        no_lm = without_lm_state(model)  # from stage 2's heads, as the real refit starts
        refit = refit_heads(model, *args, progress=progress)
        refit["without the LM state"] = refit_heads(no_lm, *args)
        with torch.no_grad():
            save_embeddings(run.model / f"embeddings-{NO_LM}.safetensors", inputs.song_ids, inputs.embeddings(no_lm))
    with torch.no_grad():
        save_embeddings(run.model / EMBEDDINGS, inputs.song_ids, inputs.embeddings(model))
    return refit


def save_stage2(run: RunDir, model: MultimodalLM, losses: list[float]) -> Path:
    """Adapter-only checkpoint: the PEFT adapter + multimodal weights + tokenizer (small, for further tuning)."""
    out = run.model / "stage2"
    with atomic_dir(out) as tmp:
        assert isinstance(model.lm, PeftModel)
        model.lm.save_pretrained(tmp / "adapter")
        model.tokenizer.save_pretrained(tmp / "adapter")
        model.save_multimodal(tmp)
        (tmp / "losses.json").write_text(json.dumps(losses))
    return out


def stage2_reasons(cfg: Config, run: RunDir, catalog, perceived: dict[str, list[tuple[str, str, float]]]
                   ) -> list[dict]:
    """Prepare's stage-2 reason examples, with every example whose candidate has a perceived attribute at or above
    `prompt.min_perceived_confidence` rebuilt by the same code (`llmrec.evidence.reason_example`) from the same
    training plays, now with that attribute listed as evidence: prepare runs before the perception heads exist, but
    the server's prompts list what they perceive, so the model must learn to state it (and only it). The rest are
    kept as prepare wrote them."""
    from llmrec.evidence import EvidenceBuilder, reason_example
    from llmrec.split import example_plays, positive_plays, split_catalog

    rows = load_from_disk(str(run.examples / "stage2")).to_list()
    threshold = cfg.prompt.min_perceived_confidence
    sure = {sid for sid, items in perceived.items() if any(p >= threshold for _, _, p in items)}
    todo = [r for r in rows if r["song_id"] in sure]
    if todo:
        split = split_catalog(catalog, cfg.eval.split, cfg.eval.valid_days)
        plays, _ = example_plays(split, cfg.examples.hold_out_tuning_plays, cfg.seed)
        builder = EvidenceBuilder({s["song_id"]: s for s in catalog.songs.to_dict("records")},
                                  positive_plays(plays), perceived, cfg.prompt)
        rng = np.random.default_rng([cfg.seed, 5])
        for row in tqdm(todo, desc="stage-2 reasons with perceived evidence", disable=len(todo) < 1000):
            when = dict(zip(row["history_song_ids"], row["history_timestamps"]))
            row.update(reason_example(builder, row["history_song_ids"], row["song_id"], row["user_id"], rng))
            row["history_timestamps"] = [when[h] for h in row["history_song_ids"]]
    if todo:
        print(f"stage 2: {len(todo)} of {len(rows)} reason examples rebuilt with perceived evidence")
    return rows


def train_perception(cfg: Config, run: RunDir, catalog, features, save: bool = True) -> PerceptionHeads | None:
    """Fit and save the perception heads (`llmrec.perception`) on the training songs' attribute labels, where the
    catalog has labels (the synthetic one); None without labels. Only the frozen encoders' features go in, so they
    are fitted before stage 1, and stage 2's reasons can state what they perceive."""
    from llmrec.schema import load_song_attributes
    from llmrec.split import split_catalog

    labels = load_song_attributes(run.catalog)
    if labels is None:
        return None
    split = split_catalog(catalog, cfg.eval.split, cfg.eval.valid_days)
    train_ids = set(catalog.songs["song_id"].astype(str)) - set(split.cold_songs)
    heads = fit_perception(features, labels, train_ids, cfg.seed, cfg.prompt.min_perceived_confidence)
    if heads is not None and save:
        heads.save(run.model / "perception")
    return heads


def run_train(cfg: Config, run: RunDir, args: argparse.Namespace | None = None) -> dict:
    progress = not getattr(args, "no_progress", False)
    torch.manual_seed(cfg.seed)
    catalog = load_catalog(run.require(run.catalog, "prepare"))
    run.require(run.examples / "stage2", "prepare")
    features = load_media_features(run.require(run.features, "features"))
    pairs = load_from_disk(str(run.examples / "pairs"))
    accelerator = _accelerator(cfg)
    lm, tokenizer = stage0(cfg, run, catalog, accelerator, progress)
    if cfg.model.load_in_4bit and cfg.model.backbone != "tiny":
        from train.qlora import prepare_for_qlora

        lm = prepare_for_qlora(lm, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    text_features = fused_text_features(cfg, run)
    model = MultimodalLM(lm, tokenizer, _mm_config(cfg, features, len(pairs[0]["cf_factor"]), text_features))
    collate = MultimodalCollator(tokenizer, features, model.cfg.audio_tokens, model.cfg.cover_tokens,
                                 cfg.train.max_length, text_features)
    prompts = item_prompts(catalog.songs, tokenizer, model.cfg, cfg.train.max_length, cfg.prompt.song_budget)
    # Every rank fits the same heads (seeded) for its stage-2 examples; rank 0 alone saves them.
    heads = train_perception(cfg, run, catalog, features, save=accelerator.is_main_process)
    perceived = heads.predict(pooled_features(features)) if heads is not None else {}
    s1 = stage1(cfg, run, model, collate, accelerator, progress)
    s2 = stage2(cfg, run, model, collate, prompts, accelerator, progress,
                lambda: stage2_reasons(cfg, run, catalog, perceived))
    if not accelerator.is_main_process:  # multi-process run: rank 0 alone saves, embeds and exports
        return {"rank": accelerator.process_index, "stage2 loss last": s2[-1]}
    out = run.model / "stage2" if (run.model / "stage2" / "adapter").is_dir() else save_stage2(run, model, s2)
    inputs = head_inputs(model, collate, prompts, progress=progress)
    refit = _refit_heads_and_save(cfg, run, model, inputs, pairs.to_list(), progress)
    # Ablations only mean something when the catalog has media (lastfm-2k has none: each variant would be a
    # copy of the full embedding, and on its 17.6k artists each pass costs minutes).
    has_media = bool(features.audio_present.any()) or bool(features.cover_present.any())
    for variant, drop in ABLATIONS.items() if has_media and cfg.train.ablations else ():
        save_embeddings(run.model / f"embeddings-{variant}.safetensors",
                        *song_embeddings(model, collate, prompts, drop=drop, progress=progress))
    bundle_hash = export_bundle(model, run.model / "bundle", {"preset": cfg.preset, "backbone": cfg.model.backbone})
    perception = heads.report() if heads is not None else {}
    summary = {"stage1_loss": [round(float(np.mean(s1[:5])), 3), round(float(np.mean(s1[-5:])), 3)],
               "stage2_loss": [round(float(np.mean(s2[:5])), 3), round(float(np.mean(s2[-5:])), 3)],
               "head_refit": refit}
    if perception:
        summary["perception"] = perception
    atomic_write_json(run.model / "train_summary.json", summary)
    return {"model": str(out), "bundle": f"{run.model / 'bundle'} (hash {bundle_hash[:12]})",
            "perception": ", ".join(f"{a} {r['accuracy']:.2f}" for a, r in perception.items()) or "no labels",
            "embeddings": str(run.model / EMBEDDINGS),
            "stage1 loss first->last": summary["stage1_loss"], "stage2 loss first->last": summary["stage2_loss"],
            "heads refit (stage 2b)": refit}
