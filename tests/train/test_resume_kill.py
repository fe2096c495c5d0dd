"""kill -9 in the middle of training, re-run, and the run resumes from its last checkpoint (not step 0) and ends
with exactly the losses, weights and outputs of a run that was never interrupted (step, optimizer, scheduler, RNG
for LoRA dropout, and data position all restored)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.loop import _latest

ROOT = Path(__file__).resolve().parents[2]
JOB = ["--strategy", "single", "--steps", "10", "--save-every", "2"]


def _job(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "testkit.tinyjob", *JOB, "--out", str(out), *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_exactly(tmp_path):
    killed = _job(tmp_path / "killed", "--step-sleep", "0.4")  # slow steps: the kill lands mid-run
    straight_job = _job(tmp_path / "straight")  # the uninterrupted reference, same process setup (threads)
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        ckpt = _latest(tmp_path / "killed" / "ckpt")
        if ckpt is not None and json.loads((ckpt / "progress.json").read_text())["step"] >= 4:
            break
        time.sleep(0.1)
    assert killed.poll() is None, "the job finished before it could be killed:\n" + killed.stdout.read()[-2000:]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "stats_rank0.json").exists()
    step = json.loads((_latest(tmp_path / "killed" / "ckpt") / "progress.json").read_text())["step"]
    assert 4 <= step < 10

    rerun = _job(tmp_path / "killed")
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log[-3000:]
    assert straight_job.wait(timeout=300) == 0, straight_job.stdout.read()[-3000:]
    assert f"at step {step}" in log  # resumed, not restarted

    straight = json.loads((tmp_path / "straight" / "stats_rank0.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "stats_rank0.json").read_text())
    assert len(resumed["losses"]) == 10
    assert resumed["losses"] == straight["losses"]  # bit-exact: same data, dropout masks and optimizer state
    for name in ("multimodal.safetensors", "adapter/adapter_model.safetensors", "outputs_rank0.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _complete(path: Path, step: int) -> None:
    path.mkdir(parents=True)
    (path / "progress.json").write_text(json.dumps({"step": step, "losses": [0.0] * step}))


def test_a_kill_between_the_checkpoint_renames_loses_nothing(tmp_path):
    """`_save` renames last -> last.old, then last.tmp -> last; a kill in between must still resume."""
    _complete(tmp_path / "last.old", 2)
    _complete(tmp_path / "last.tmp", 4)
    assert _latest(tmp_path) == tmp_path / "last.tmp"
    (tmp_path / "last.tmp" / "progress.json").unlink()  # killed while last.tmp was being written
    assert _latest(tmp_path) == tmp_path / "last.old"
    _complete(tmp_path / "last", 6)
    assert _latest(tmp_path) == tmp_path / "last"
    assert _latest(tmp_path / "nothing") is None
