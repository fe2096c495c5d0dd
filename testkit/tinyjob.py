"""A stage-2-shaped training job on a tiny random multimodal LM, for the multi-process tests and bench/train.py.

Same pieces as `train.stages.stage2` (LoRA on the backbone + projectors + heads; answer-only LM loss + InfoNCE
song<->CF + InfoNCE song<->co-listened) on seeded random media features, so that a whole DDP / ZeRO-2 / ZeRO-3
run takes seconds on CPU:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m testkit.tinyjob --strategy zero3 --out /tmp/job

Writes to --out: adapter/ (PEFT), multimodal.safetensors (rank 0), outputs_rank{r}.safetensors (logits and song
embeddings of every rank on a fixed batch after training), stats_rank{r}.json (losses, step times, tokens, RSS).
`build` rebuilds the untrained model bit for bit, so a parent process can reload the saved weights and compare.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

STRATEGIES = {"single": None, "ddp": None, "zero2": "zero2.json", "zero3": "zero3.json",
              "zero3_offload": "zero3_offload.json"}
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"  # the DeepSpeed configs train ships
GENRES = ["lo-fi", "jazz", "metal", "folk", "techno", "ambient", "soul", "punk"]


@dataclass
class Features:
    """The `llmrec.features` shape (index, audio [N,L,K,D], presence, cover) with seeded random values."""

    index: dict
    audio: torch.Tensor
    audio_present: torch.Tensor
    cover: torch.Tensor
    cover_present: torch.Tensor


def local_param_mb(model: torch.nn.Module) -> float:
    """Parameter storage this process holds: a ZeRO-3 partition (`ds_tensor`, plus the full tensor of parameters
    below the persistence threshold) or the whole tensor."""
    total = 0
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        if part is None:
            total += p.numel() * p.element_size()
        else:
            total += part.numel() * part.element_size() + (p.data.numel() * p.element_size() if p.ds_persist else 0)
    return total / 2**20


def gathered_frozen_mb(model: torch.nn.Module) -> float:
    """Frozen ZeRO-3 parameters held whole right now (gathered, not persistent by size). When the autograd pass
    ends this should be 0 with no live-parameter cache: each layer is freed after its own backward. Layers still
    gathered then were all resident at once at the end of the backward, which defeats the partitioning (see
    `MultimodalLM.loss_and_embed`)."""
    return sum(p.ds_numel * p.element_size() for p in model.parameters()
               if getattr(p, "ds_status", None) is not None and p.ds_status.name == "AVAILABLE"
               and not p.requires_grad and not p.ds_persist) / 2**20


def _rss_mb() -> float:
    """Peak resident set size so far (a high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    """Resident set size now (Linux /proc; 0 elsewhere), to tell a transient peak from memory that is still held."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def build(hidden: int = 32, layers: int = 1, songs: int = 32, seed: int = 0, lora_r: int = 4, lora: bool = True,
          zero_init: bool = False):
    """(model, collator, reason rows, song ids, cf factors) — deterministic for the arguments; `lora=False` gives
    the bare model a saved adapter is loaded into. `zero_init` (under ZeRO-3 only): build the backbone through
    transformers' `_from_config`, which partitions each layer as it is created (zero.Init), as from_pretrained does
    for a real checkpoint — no rank ever holds the whole backbone (other initial values than `zero_init=False`)."""
    from transformers import LlamaForCausalLM

    from llmrec.config import load_config
    from llmrec.model.backbone import build_tiny_llama, train_bpe_tokenizer
    from llmrec.model.collate import MultimodalCollator
    from llmrec.model.mm_lm import MMConfig, MultimodalLM
    from llmrec.text import AUDIO_TOKEN, COVER_TOKEN
    from train.stages import add_lora, train_stage2_parameters

    ids = [f"s{i}" for i in range(songs)]
    reasons = [{"prompt": f"{AUDIO_TOKEN}{COVER_TOKEN} song {i} by artist {i % 5}. why?",
                "answer": f"because you like {GENRES[i % len(GENRES)]} with a {GENRES[(i * 3) % 8]} mood",
                "audio_song_ids": [s], "cover_song_ids": [s]} for i, s in enumerate(ids)]
    tok = train_bpe_tokenizer([r["prompt"] + " " + r["answer"] for r in reasons] * 4, vocab_size=400)
    cfg = load_config(overrides=[f"model.hidden_size={hidden}", f"model.num_layers={layers}",
                                 f"model.num_heads={max(1, hidden // 16)}", f"model.intermediate_size={hidden * 2}",
                                 f"model.lora_r={lora_r}", "model.lora_dropout=0.1"])
    g = torch.Generator().manual_seed(seed)
    feats = Features({s: i for i, s in enumerate(ids)}, torch.randn(songs, 2, 2, 16, generator=g),
                     (torch.arange(songs) % 5 != 0).long(), torch.randn(songs, 1, 2, 16, generator=g),
                     torch.ones(songs, dtype=torch.long))
    cf = torch.randn(songs, 8, generator=g)
    if not zero_init:
        lm = build_tiny_llama(cfg.model, tok, seed=seed)
    else:  # from_config honours ZeRO-3's zero.Init, including transformers' init of partitioned weights
        with torch.device("meta"):
            config = build_tiny_llama(cfg.model, tok, seed=seed).config
        torch.manual_seed(seed)
        lm = LlamaForCausalLM._from_config(config)
    model = MultimodalLM(lm, tok, MMConfig("mlp2x_gelu", 2, 2, 16, 1, 2, 16, embedding_dim=16, cf_dim=8))
    if not lora:
        return model, MultimodalCollator(tok, feats, 2, 2, max_length=96), reasons, ids, cf
    add_lora(model, cfg)
    train_stage2_parameters(model)
    return model, MultimodalCollator(tok, feats, 2, 2, max_length=96), reasons, ids, cf


def embed_rows(ids: list[str]) -> list[dict]:
    from llmrec.text import AUDIO_TOKEN, COVER_TOKEN, EMBED_TOKEN

    return [{"prompt": f"{AUDIO_TOKEN}{COVER_TOKEN} song {s[1:]} {EMBED_TOKEN}", "audio_song_ids": [s],
             "cover_song_ids": [s]} for s in ids]


@torch.no_grad()
def outputs(model, collate, reasons, ids) -> dict[str, torch.Tensor]:
    """Logits and song embeddings on a fixed batch (eval mode: no dropout)."""
    model.eval()
    batch = collate(reasons[:4])
    logits = model(batch["input_ids"], batch["attention_mask"], None, batch["media"]).logits
    emb_batch = collate(embed_rows(ids[:6]))
    emb = model.embed(emb_batch["input_ids"], emb_batch["attention_mask"], emb_batch["media"])
    return {"logits": logits.float().contiguous(), "embeddings": emb.float().contiguous()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", choices=sorted(STRATEGIES), default="ddp")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (kill tests)")
    ap.add_argument("--precision", default="no", choices=["no", "bf16"], help="train.mixed_precision")
    ap.add_argument("--no-zero-init", action="store_true", help="ZeRO-3: build the backbone whole, then partition")
    ap.add_argument("--ds-set", action="append", default=[], metavar="KEY=JSON",
                    help="DeepSpeed config override, e.g. zero_optimization.stage3_max_live_parameters=1000000")
    args = ap.parse_args(argv)

    from llmrec.config import TrainConfig
    from llmrec.model.losses import info_nce
    from train.distributed import build_accelerator
    from train.loop import StepSampler, fit

    ds = STRATEGIES[args.strategy]
    tcfg = TrainConfig(batch_size=args.batch_size, mixed_precision=args.precision,
                       deepspeed=str(CONFIGS / ds) if ds else None)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.ds_set)}
    accelerator = build_accelerator(tcfg, hidden_size=args.hidden, ds_overrides=overrides)
    rank = accelerator.process_index
    import train.stages  # noqa: F401 - the libraries `build` imports, so that they do not count as model memory
    if ds and "zero3" in ds:
        import deepspeed.runtime.zero.stage3  # noqa: F401
    rss_before_model = _rss_mb()
    zero_init = args.strategy.startswith("zero3") and not args.no_zero_init
    model, collate, reasons, ids, cf = build(args.hidden, args.layers, zero_init=zero_init)
    rss_after_build = _rss_mb()
    lm_sampler = StepSampler(len(reasons), args.batch_size, seed=1)
    pair_sampler = StepSampler(len(ids), args.batch_size, seed=2)
    clock: list[float] = []
    tokens = [0]
    first_step_rss, param_mb = [0.0], [0.0]
    train_peak = [0.0]  # peak RSS up to the last step, before `fit` gathers the full weights back (ZeRO-3)
    step_rss: list[tuple[float, float]] = []  # (current, peak) RSS as each step starts
    gathered: list[float] = []  # gathered_frozen_mb when each step's autograd pass ends

    def count_gathered_when_backward_ends(grad: torch.Tensor) -> torch.Tensor:
        # The loss's gradient hook runs first in the backward; the callback it queues runs when the autograd pass
        # ends, before DeepSpeed's own post-backward work (which re-partitions whatever is still gathered).
        torch.autograd.Variable._execution_engine.queue_callback(lambda: gathered.append(gathered_frozen_mb(model)))
        return grad

    def loss_fn(step: int) -> torch.Tensor:
        if not clock:
            first_step_rss[0] = _rss_mb()  # after accelerator.prepare (DDP buckets / ZeRO partitions and buffers)
            param_mb[0] = local_param_mb(model)
        clock.append(time.perf_counter())
        step_rss.append((round(_current_rss_mb(), 1), round(_rss_mb(), 1)))
        if args.step_sleep:
            time.sleep(args.step_sleep)
        batch = collate([reasons[i] for i in lm_sampler.indices(step)])
        idx = pair_sampler.indices(step)
        # the songs, then a fixed "co-listened" neighbour of each, embedded in the reasons' backbone pass
        eb = collate(embed_rows([ids[i] for i in idx] + [ids[(i + 1) % len(ids)] for i in idx]))
        lm_loss, emb_all = model.loss_and_embed(batch, eb)
        emb, pos = emb_all[:len(idx)], emb_all[len(idx):]
        tokens[0] += sum(int(b["attention_mask"].sum()) for b in (batch, eb))
        train_peak[0] = _rss_mb()
        loss = lm_loss + info_nce(model.id_head(emb), cf[idx], 0.1) + 0.5 * info_nce(emb, pos, 0.1)
        loss.register_hook(count_gathered_when_backward_ends)
        return loss

    t0 = time.perf_counter()
    losses = fit(model, model.parameters(), loss_fn, steps=args.steps, lr=args.lr, warmup_ratio=0.0,
                 ckpt_dir=args.out / "ckpt", save_every=args.save_every, accelerator=accelerator,
                 desc=f"tinyjob {args.strategy}", progress=False, max_grad_norm=1.0)
    wall = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        model.lm.save_pretrained(args.out / "adapter")
        model.save_multimodal(args.out)
    save_file(outputs(model, collate, reasons, ids), str(args.out / f"outputs_rank{rank}.safetensors"))
    step_times = [b - a for a, b in zip(clock, clock[1:])]
    stats = {"strategy": args.strategy, "rank": rank, "world": accelerator.num_processes, "losses": losses,
             "step_times": step_times, "tokens": tokens[0], "wall_s": wall, "peak_rss_mb": _rss_mb(),
             "train_peak_rss_mb": train_peak[0],
             "rss_before_model_mb": rss_before_model, "rss_after_build_mb": rss_after_build,
             "rss_after_prepare_mb": first_step_rss[0], "local_param_mb": param_mb[0],
             "rss_at_step_start_mb": step_rss, "rss_end_mb": _current_rss_mb(), "gathered_frozen_mb": gathered,
             "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "total": sum(p.numel() for p in model.parameters())}
    (args.out / f"stats_rank{rank}.json").write_text(json.dumps(stats))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
