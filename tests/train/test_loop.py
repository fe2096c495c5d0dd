"""Training loop: deterministic step batches, resume after a kill, a clear stop on a NaN loss."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from train.loop import StepSampler, TrainingDiverged, fit


def test_step_sampler_is_a_pure_function_of_step():
    s = StepSampler(n=10, batch_size=4, seed=3)
    first_epoch = s.indices(0) + s.indices(1) + s.indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))  # every row once per epoch
    assert s.indices(7) == StepSampler(10, 4, 3).indices(7)


def _toy_fit(tmp_path: Path, steps: int, fail_at: int | None = None, save_every: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    sampler = StepSampler(16, 4, 0)

    def loss_fn(step):
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt  # stands in for a kill between checkpoints
        idx = sampler.indices(step)
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx])

    losses = fit(model, model.parameters(), loss_fn, steps=steps, lr=0.05, warmup_ratio=0.0, ckpt_dir=tmp_path,
                 save_every=save_every, accelerator=Accelerator(cpu=True), desc="toy", progress=False)
    return model, losses


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    straight, losses = _toy_fit(tmp_path / "a", steps=8)
    with pytest.raises(KeyboardInterrupt):
        _toy_fit(tmp_path / "b", steps=8, fail_at=5)
    assert (tmp_path / "b" / "last" / "progress.json").is_file()
    resumed, resumed_losses = _toy_fit(tmp_path / "b", steps=8)
    torch.testing.assert_close(resumed.weight, straight.weight)
    assert resumed_losses == pytest.approx(losses)


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    model = torch.nn.Linear(1, 1)

    def loss_fn(step):
        return model(torch.ones(1, 1)).sum() * (float("nan") if step == 3 else 1.0)

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3; the last good checkpoint"):
        fit(model, model.parameters(), loss_fn, steps=6, lr=0.01, warmup_ratio=0.0, ckpt_dir=tmp_path,
            save_every=2, accelerator=Accelerator(cpu=True), desc="nan", progress=False)
    assert (tmp_path / "last" / "progress.json").is_file()


