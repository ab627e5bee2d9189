"""Two CPU processes under `accelerate launch` (gloo) equal one process with gradient accumulation 2.

The global batch is formed the same way in both layouts: the seeded sampler gives every process the same
order, Accelerate deals whole batches round-robin (process 0 gets batches 0, 2, 4..., process 1 gets
1, 3, 5...), and one process with grad_accum 2 takes batches 0 and 1 as the two micro-batches of its first
step. DDP averages the two gradients; accumulation divides each micro-batch loss by 2 and sums them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _one_thread: the autouse fixture (one intra-op thread) applies here too
from test_train_loop import _one_thread, run_env, run_tiny  # noqa: E402,F401

from train.checkpoint import MANIFEST  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5


def free_port() -> int:
    with socket.socket() as s:  # other runs on this machine may hold accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_process_with_grad_accum_2(tmp_path):
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "test_train_loop.py"), str(out2), "--steps", str(STEPS), "--batch-size", "1",
           "--grad-accum", "1", "--save-every", str(STEPS)]
    proc = subprocess.Popen(cmd, env=run_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # the single-process reference runs meanwhile (the machine has 2 cores; each run uses 1 thread each)
    _, one = run_tiny(tmp_path / "one", steps=STEPS, batch_size=1, grad_accum=2, save_every=STEPS)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]

    two = json.loads((out2 / "result.json").read_text())
    assert two["num_processes"] == 2 and two["steps_run"] == STEPS
    assert len(one.losses) == STEPS
    diffs = [abs(a - b) for a, b in zip(one.losses, two["losses"])]
    assert max(diffs) < 1e-5, (one.losses, two["losses"])
    assert len(set(one.losses)) == STEPS  # the loss moves: a real trajectory, not one repeated number

    # the checkpoint knows it was written by 2 processes and holds both processes' RNG (Accelerate's files)
    ck = out2 / "checkpoints" / f"step-{STEPS:08d}"
    m = json.loads((ck / MANIFEST).read_text())
    assert m["num_processes"] == 2 and {"random_states_0.pkl", "random_states_1.pkl"} <= set(m["files"])
    state = torch.load(ck / "custom_checkpoint_0.pkl", weights_only=True)
    assert state["step"] == STEPS
    # each process drew STEPS batches of its shard: together 2 * STEPS, as many as the single process
    assert state["batches_seen"] == STEPS
    one_state = torch.load(tmp_path / "one" / "checkpoints" / f"step-{STEPS:08d}" / "custom_checkpoint_0.pkl",
                           weights_only=True)
    assert one_state["batches_seen"] == 2 * STEPS
