"""One readable training loop shared by every stage: accelerate, cosine schedule, checkpoints, exact resume.

Batches are a pure function of (seed, step, rank) — `StepSampler` — so resuming at step s replays exactly the data
the killed run would have seen, with no sampler state to save. Optimizer, scheduler and RNG state go through
`accelerator.save_state`; a checkpoint directory is written under a temporary name and renamed when complete.

Distributed (DDP, DeepSpeed ZeRO-2/3; see train/distributed.py): the whole step loss runs inside the forward of the
prepared module (`_StepLoss`), so DDP's gradient all-reduce and ZeRO-3's parameter gathering see every parameter
the loss touches — including methods other than `forward` such as `MultimodalLM.embed` and the heads, which a
wrapped model's `forward` alone would not reach. Stage code therefore writes its loss against the plain module.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from train.distributed import release


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class StepSampler:
    """Row indices for step s: epoch-wise permutations of range(n) seeded by (seed, epoch).

    `batch_size` is per process: with W processes, step s covers the next W*batch_size rows of the permutation
    stream and process r takes the r-th slice (rank/world default to the torch.distributed group, else 0/1)."""

    n: int
    batch_size: int
    seed: int = 0
    rank: int | None = None
    world: int | None = None

    def indices(self, step: int) -> list[int]:
        if self.n == 0:
            raise ValueError("no training examples: run `llmrec prepare` (examples) first")
        rank, world = _world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world is None else self.world
        out, pos = [], (step * world + rank) * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out.extend(perm[offset : offset + take].tolist())
            pos += take
        return out


class _StepLoss(torch.nn.Module):
    """`forward(step)` = the stage's loss for that step, so that the whole computation runs inside the prepared
    (DDP / DeepSpeed) module; `model` is registered as a submodule so its parameters are the ones prepared."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, step: int) -> torch.Tensor:
        return self.loss_fn(step)


def _save(accelerator: Accelerator, ckpt_dir: Path, step: int, losses: list[float]) -> None:
    """Every rank writes its part (DeepSpeed shards, per-rank RNG state) into last.tmp; rank 0 then marks it complete
    (progress.json, written last) and swaps it in. A kill at any point leaves one complete checkpoint (`_latest`)."""
    final, tmp, old = ckpt_dir / "last", ckpt_dir / "last.tmp", ckpt_dir / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # each rank's own loss history (ranks see different data); progress.json carries rank 0's
    (tmp / f"losses_rank{accelerator.process_index}.json").write_text(json.dumps(losses))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: `last`, or — after a kill between the two renames of `_save` — the complete
    `last.tmp` (newer) or `last.old`."""
    for name in ("last", "last.tmp", "last.old"):
        if (ckpt_dir / name / "progress.json").is_file():
            return ckpt_dir / name
    return None


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Every rank agrees: one rank stopping alone would leave the others waiting in the gradient all-reduce."""
    bad = torch.tensor([0.0 if math.isfinite(loss.item()) else 1.0], device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0 if accelerator.num_processes > 1 else bad.item() == 0


def fit(
    model: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup_ratio: float,
    ckpt_dir: Path,
    save_every: int,
    accelerator: Accelerator,
    desc: str,
    progress: bool = True,
    max_grad_norm: float | None = None,
) -> list[float]:
    """Run `steps` optimisation steps of `loss_fn(step)`; resume from the last complete checkpoint in `ckpt_dir`.

    `loss_fn` computes the step's loss with `model` (the plain module; see the module docstring for why that is
    right under DDP/ZeRO). On return `model` is a plain module holding the trained weights on every rank, also
    under ZeRO-3, so callers save and export it without gathering anything."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(warmup_ratio * steps)), max(1, steps))
    # `steps` counts our own steps (StepSampler shards each step's batch over ranks): the schedule advances once per
    # step. accelerate's default would advance it num_processes times, as if a dataloader had been split.
    accelerator.step_scheduler_with_optimizer = False
    step_loss, optimizer, scheduler = accelerator.prepare(_StepLoss(model, loss_fn), optimizer, scheduler)
    start, losses = 0, []
    resume = _latest(ckpt_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "progress.json").read_text())
        start, losses = state["step"], state["losses"]
        own = resume / f"losses_rank{accelerator.process_index}.json"
        if own.is_file():
            losses = json.loads(own.read_text())
        accelerator.print(f"{desc}: resumed from {resume} at step {start}")
    step_loss.train()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress or not accelerator.is_main_process,
               initial=start, total=steps)
    for step in bar:
        with accelerator.accumulate(step_loss):
            loss = step_loss(step)
            if not _all_finite(accelerator, loss):
                raise TrainingDiverged(f"{desc}: loss is {loss.item()} at step {step}; the last good checkpoint "
                                       f"is kept in {ckpt_dir / 'last'} (lower the learning rate?)")
            accelerator.backward(loss)
            if max_grad_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, max_grad_norm)  # a no-op under DeepSpeed: its config clips
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save(accelerator, ckpt_dir, step + 1, losses)
    release(accelerator, step_loss, model)
    return losses
