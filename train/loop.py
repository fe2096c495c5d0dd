"""One readable training loop shared by every stage: accelerate, cosine schedule, checkpoints, exact resume.

Batches are a pure function of (seed, step) — `StepSampler` — so resuming at step s replays exactly the data the
killed run would have seen, with no sampler state to save. Optimizer, scheduler and RNG state go through
`accelerator.save_state`; a checkpoint directory is written under a temporary name and renamed when complete.
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class StepSampler:
    """Row indices for step s: epoch-wise permutations of range(n) seeded by (seed, epoch)."""

    n: int
    batch_size: int
    seed: int = 0

    def indices(self, step: int) -> list[int]:
        if self.n == 0:
            raise ValueError("no training examples: run `llmrec prepare` (examples) first")
        out, pos = [], step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out.extend(perm[offset : offset + take].tolist())
            pos += take
        return out


def _save(accelerator: Accelerator, ckpt_dir: Path, step: int, losses: list[float]) -> None:
    final, tmp = ckpt_dir / "last", ckpt_dir / "last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))
    old = ckpt_dir / "last.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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
) -> list[float]:
    """Run `steps` optimisation steps of `loss_fn(step)`; resume from `ckpt_dir/last` when present."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(warmup_ratio * steps)), max(1, steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start, losses = 0, []
    last = ckpt_dir / "last"
    if (last / "progress.json").is_file():
        accelerator.load_state(str(last))
        state = json.loads((last / "progress.json").read_text())
        start, losses = state["step"], state["losses"]
        accelerator.print(f"{desc}: resumed from {last} at step {start}")
    model.train()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, initial=start, total=steps)
    for step in bar:
        with accelerator.accumulate(model):
            loss = loss_fn(step)
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"{desc}: loss is {loss.item()} at step {step}; the last good checkpoint "
                                       f"is kept in {last} (lower the learning rate?)")
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save(accelerator, ckpt_dir, step + 1, losses)
    return losses
