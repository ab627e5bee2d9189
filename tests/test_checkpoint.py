"""Checkpoints: atomic writes, keep-last, manifest, corrupt-latest fallback, write errors, and the acceptance
test: kill -9 mid-run, resume, bit-identical final weights."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# _one_thread: the autouse fixture (one intra-op thread) applies here too
from test_train_loop import (FakeSpeech, _one_thread, assert_same_weights, collate, run_env,  # noqa: E402,F401
                             run_tiny, tiny_whisper, weights)

from train.checkpoint import (MANIFEST, CheckpointError, TrainState, clean_temp, list_checkpoints,  # noqa: E402
                              load_latest, read_manifest, save_checkpoint)
from train.loop import TrainConfig, train  # noqa: E402
from train.tracking import read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
NAMES = ["train_state", "scheduler"]


class Observers:
    """Stands in for QAT observer state registered as extra state."""

    def __init__(self):
        self.scale = torch.ones(3)

    def state_dict(self):
        return {"scale": self.scale.clone()}

    def load_state_dict(self, d):
        self.scale = d["scale"].clone()


def tracked(extra=None):
    """An Accelerator tracking a small Linear, AdamW, a scheduler and a TrainState (+ extra objects)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # these tests are about the checkpoint files, on the CPU; on a GPU machine an earlier test may have made
    # a CUDA Accelerate state in this process, which Accelerate refuses to switch: start from a clean one
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt = acc.prepare(model, opt)
    state = TrainState(stage="t")
    acc.register_for_checkpointing(state, sched, *(extra or []))
    return acc, model, opt, sched, state


def step(model, opt, sched, state):
    model(torch.randn(2, 4)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    state.step += 1
    state.batches_seen += 1


def dirs(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir())


# ---------------------------------------------------------------------------------------------
# unit level: a Linear layer, no training loop


def test_save_is_atomic_with_manifest_and_keeps_last(tmp_path):
    acc, model, opt, sched, state = tracked()
    for _ in range(4):
        step(model, opt, sched, state)
        save_checkpoint(acc, tmp_path, state, NAMES, keep_last=2)
    assert dirs(tmp_path) == ["step-00000003", "step-00000004"]  # keep_last 2, no temp folders left
    ck = tmp_path / "step-00000004"
    m = json.loads((ck / MANIFEST).read_text())
    assert (m["step"], m["stage"], m["num_processes"], m["objects"]) == (4, "t", 1, NAMES)
    files = {p.name: p.stat().st_size for p in ck.iterdir() if p.name != MANIFEST}
    assert m["files"] == files
    assert set(files) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                          "custom_checkpoint_1.pkl"}
    saved = torch.load(ck / "custom_checkpoint_0.pkl", weights_only=True)  # plain data, no pickled objects
    assert (saved["step"], saved["batches_seen"]) == (4, 4) and "rng" not in saved  # Accelerate keeps the RNG


def test_resume_restores_weights_optimizer_scheduler_rng_and_reads_step_from_state(tmp_path):
    acc, model, opt, sched, state = tracked()
    step(model, opt, sched, state)
    save_checkpoint(acc, tmp_path, state, NAMES, keep_last=2)
    w, o_state, lr = weights(model), copy.deepcopy(opt.state_dict()), sched.get_last_lr()
    draws = (torch.rand(4), random.random(), np.random.rand())
    os.rename(tmp_path / "step-00000001", tmp_path / "a-human-name")  # the name is never parsed

    step(model, opt, sched, state)
    step(model, opt, sched, state)
    assert load_latest(acc, tmp_path, state, NAMES) == tmp_path / "a-human-name"
    assert (state.step, state.batches_seen) == (1, 1)
    assert_same_weights(weights(model), w)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], o_state["state"][0]["exp_avg"])
    assert sched.get_last_lr() == lr
    again = (torch.rand(4), random.random(), np.random.rand())  # every generator is back where it was
    assert torch.equal(again[0], draws[0]) and again[1:] == draws[1:]


def _corrupt(ck: Path, how: str) -> None:
    if how == "truncated":
        f = ck / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "missing-file":
        (ck / "optimizer.bin").unlink()
    elif how == "no-marker":
        (ck / MANIFEST).unlink()
    elif how == "bad-manifest":
        (ck / MANIFEST).write_text("{not json")
    elif how == "unloadable":  # same size, so only loading can tell
        f = ck / "model.safetensors"
        f.write_bytes(b"\xff" * f.stat().st_size)


@pytest.mark.parametrize("how", ["truncated", "missing-file", "no-marker", "bad-manifest", "unloadable"])
def test_corrupt_latest_checkpoint_falls_back_to_previous_with_warning(tmp_path, caplog, how):
    acc, model, opt, sched, state = tracked()
    step(model, opt, sched, state)
    save_checkpoint(acc, tmp_path, state, NAMES, keep_last=3)
    w1 = weights(model)
    step(model, opt, sched, state)
    save_checkpoint(acc, tmp_path, state, NAMES, keep_last=3)
    _corrupt(tmp_path / "step-00000002", how)
    step(model, opt, sched, state)

    with caplog.at_level(logging.WARNING, logger="whisper_slim"):
        used = load_latest(acc, tmp_path, state, NAMES)
    assert used == tmp_path / "step-00000001" and state.step == 1
    assert_same_weights(weights(model), w1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "step-00000002" in warned[0]


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    acc, model, opt, sched, state = tracked()
    step(model, opt, sched, state)
    save_checkpoint(acc, tmp_path, state, NAMES, keep_last=3)
    _corrupt(tmp_path / "step-00000001", "unloadable")
    with pytest.raises(CheckpointError, match="no checkpoint .* could be loaded"):
        load_latest(acc, tmp_path, state, NAMES)
    assert load_latest(acc, tmp_path / "nothing-here", state, NAMES) is None


@pytest.mark.parametrize("failure", ["disk-full", "rename-denied"])
def test_write_error_removes_temp_keeps_previous_and_raises(tmp_path, monkeypatch, failure):
    acc, model, opt, sched, state = tracked()
    step(model, opt, sched, state)
    save_checkpoint(acc, tmp_path, state, NAMES, keep_last=2)
    before = read_manifest(tmp_path / "step-00000001")
    w1 = weights(model)
    step(model, opt, sched, state)
    if failure == "disk-full":  # fails halfway: the model and optimizer files are already in the temp dir
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr("accelerate.accelerator.save_custom_state", full)
        match = "No space left on device"
    else:
        real = os.replace

        def denied(src, dst):
            if Path(dst).name == "step-00000002":
                raise PermissionError(errno.EACCES, "Permission denied", str(dst))
            return real(src, dst)
        monkeypatch.setattr(os, "replace", denied)
        match = "Permission denied"
    with pytest.raises(CheckpointError, match=f"step 2 .*{match}"):
        save_checkpoint(acc, tmp_path, state, NAMES, keep_last=2)
    monkeypatch.undo()
    assert dirs(tmp_path) == ["step-00000001"]  # no temp folder, previous one untouched
    assert read_manifest(tmp_path / "step-00000001") == before
    step(model, opt, sched, state)
    assert load_latest(acc, tmp_path, state, NAMES) == tmp_path / "step-00000001"
    assert_same_weights(weights(model), w1)


def test_temp_folder_of_an_interrupted_write_is_ignored_then_cleaned(tmp_path):
    acc, model, opt, sched, state = tracked()
    step(model, opt, sched, state)
    save_checkpoint(acc, tmp_path, state, NAMES, keep_last=2)
    half = tmp_path / ".tmp-0123456789ab"  # what kill -9 during save_state leaves: files, no marker
    shutil.copytree(tmp_path / "step-00000001", half)
    (half / MANIFEST).unlink()
    valid, bad = list_checkpoints(tmp_path)
    assert [p.name for p, _ in valid] == ["step-00000001"] and bad == []
    clean_temp(tmp_path)
    assert dirs(tmp_path) == ["step-00000001"]


def test_extra_state_round_trip_and_mismatch_refused(tmp_path):
    obs = Observers()
    acc, model, opt, sched, state = tracked(extra=[obs])
    names = NAMES + ["extra.observers"]
    obs.scale = torch.tensor([0.5, 0.25, 2.0])
    save_checkpoint(acc, tmp_path, state, names, keep_last=2)
    obs.scale = torch.zeros(3)
    load_latest(acc, tmp_path, state, names)
    assert torch.equal(obs.scale, torch.tensor([0.5, 0.25, 2.0]))
    with pytest.raises(CheckpointError, match="this run registers"):
        load_latest(acc, tmp_path, state, NAMES)


def test_train_refuses_existing_checkpoints_without_resume(tmp_path):
    ck = tmp_path / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    (ck / MANIFEST).write_text(json.dumps({"step": 1, "files": {}}))
    with pytest.raises(CheckpointError, match="resume=True"):
        train(tiny_whisper(), TrainConfig(max_steps=1, batch_size=1), FakeSpeech(2), collate, tmp_path)


# ---------------------------------------------------------------------------------------------
# acceptance: kill -9 and resume on the tiny Whisper
#
# 8 utterances, batch 1: step 4 is in the middle of epoch 0 (the resumed run then crosses into epoch 1 at
# step 8), step 8 is exactly the end of epoch 0 (resuming there starts epoch 1 from its first batch).

N = 8


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    model, r = run_tiny(out, steps=12, save_every=4, keep_last=2, n=N)
    assert dirs(out / "checkpoints") == ["step-00000008", "step-00000012"]
    return out, weights(model), r


def test_kill_9_at_step_7_then_resume_is_bit_identical(uninterrupted, tmp_path):
    ref_out, ref_w, ref = uninterrupted
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(HERE / "test_train_loop.py"), str(out), "--steps", "12",
                           "--save-every", "4", "--keep-last", "2", "--kill-at", "7", "--n", str(N)],
                          env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert dirs(out / "checkpoints") == ["step-00000004"]  # step 8 was never reached
    killed = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in killed] == list(range(1, 8))
    assert [x["loss"] for x in killed] == ref.losses[:7]  # same trajectory until the kill

    model, r = run_tiny(out, steps=12, save_every=4, keep_last=2, n=N, resume=True)
    assert (r.start_step, r.steps_run, r.final_step) == (4, 8, 12)  # exactly the remaining steps ran
    assert r.resumed_from == out / "checkpoints" / "step-00000004"
    assert r.losses == ref.losses[4:]
    assert_same_weights(weights(model), ref_w)
    assert dirs(out / "checkpoints") == ["step-00000008", "step-00000012"]
    positions = [torch.load(out / "checkpoints" / d / "custom_checkpoint_0.pkl", weights_only=True)
                 for d in ("step-00000008", "step-00000012")]
    assert [(s["step"], s["epoch"], s["batches_seen"]) for s in positions] == [(8, 0, 8), (12, 1, 4)]
    # the records of steps 5-7 from the killed run were dropped: every step appears once
    assert [x["step"] for x in read_metrics(out / "metrics.jsonl")] == list(range(1, 13))


def test_resume_with_corrupt_latest_uses_previous_and_still_matches(uninterrupted, tmp_path, caplog):
    ref_out, ref_w, ref = uninterrupted
    shutil.copytree(ref_out / "checkpoints", tmp_path / "checkpoints")
    _corrupt(tmp_path / "checkpoints" / "step-00000012", "truncated")
    with caplog.at_level(logging.WARNING, logger="whisper_slim"):
        model, r = run_tiny(tmp_path, steps=12, save_every=4, keep_last=2, n=N, resume=True)
    assert any("step-00000012" in m and "bytes, the manifest says" in m for m in caplog.messages)
    assert (r.start_step, r.steps_run) == (8, 4)
    assert r.losses == ref.losses[8:]
    assert_same_weights(weights(model), ref_w)
    assert dirs(tmp_path / "checkpoints") == ["step-00000008", "step-00000012"]  # the corrupt one was replaced
    read_manifest(tmp_path / "checkpoints" / "step-00000012")
