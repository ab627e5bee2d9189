"""QAT inside the trainer: observers freeze from step N also across a resume; `teacher: input` is the float
model the stage started from, not its fake-quant copy."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_loop import _one_thread, assert_same_weights, collate, weights  # noqa: E402,F401

from qat.prepare import (QuantConfig, calibrate, maybe_freeze_observers, prepare_qat,  # noqa: E402
                         quantizers)
from slim.model import install_explicit_attention  # noqa: E402
from slim.sources import tiny_random_whisper  # noqa: E402
from train.loop import TrainConfig, train  # noqa: E402

FRAMES = 300
REAL_TRAIN = train  # the tests below patch train.loop.train with wrappers around this one


class Speech(torch.utils.data.Dataset):
    def __init__(self, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 80, FRAMES, generator=g)
        self.y = [torch.cat([torch.randint(3, 100, (4,), generator=g), torch.tensor([2])]) for _ in range(n)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_features": self.x[i], "labels": self.y[i]}


def _qat_model(cfg):
    m = tiny_random_whisper(seed=0, max_source_positions=FRAMES // 2)
    m = prepare_qat(install_explicit_attention(m), cfg)
    calibrate(m, [collate([Speech()[i] for i in range(2)])])
    return m


class Stop(Exception):
    pass


def _fit(monkeypatch, tmp_path, out, cfg, qcfg, resume=False, stop_at=None):
    """The qat stage's training (train.context.fit) on random speech; `stop_at`: abort right after that
    step's checkpoint, what a kill -9 there leaves behind."""
    import slim.data
    import train.context as context
    import train.loop as loop
    from train.recipe import StageConfig

    model = _qat_model(qcfg)

    def stopping_train(*args, **kw):
        def on_step(step, record):
            if step == stop_at:
                raise Stop
        return REAL_TRAIN(*args, on_step=on_step, **kw)

    monkeypatch.setattr(loop, "train", stopping_train)
    monkeypatch.setattr(context, "train_dataset", lambda ctx, **kw: (Speech(), None))
    monkeypatch.setattr(context, "eval_fn", lambda ctx: None)
    monkeypatch.setattr(slim.data, "make_collator", lambda processor: collate)
    stage = StageConfig(name="qat", kind="qat", teacher="none", quant=qcfg, train=cfg)
    ctx = _ctx(tmp_path, stage, resume)
    try:
        context.fit(ctx, stage, model, out, quant=qcfg)
    except Stop:
        pass
    return model


def test_observers_frozen_at_step_n_survive_a_resume_from_checkpoint_n(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    qcfg = QuantConfig(observer="moving_average", freeze_observers_after=2)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, log_every=1, schedule="constant")
    whole = _fit(monkeypatch, tmp_path, tmp_path / "whole", cfg, qcfg)
    _fit(monkeypatch, tmp_path, tmp_path / "cut", cfg, qcfg, stop_at=2)
    # the checkpoint of step 2 already holds frozen activation observers
    saved = load_file(tmp_path / "cut" / "checkpoints" / "step-00000002" / "model.safetensors")
    acts = [k for k in saved if k.endswith("observing") and "input_quant" in k]
    assert acts and all(not bool(saved[k]) for k in acts), acts[:3]
    resumed = _fit(monkeypatch, tmp_path, tmp_path / "cut", cfg, qcfg, resume=True)
    assert all(not q.is_observing for _, q in quantizers(resumed) if q.observer != "current")
    assert_same_weights(weights(whole), weights(resumed))


def _ctx(tmp_path, stage, resume=False):
    import train.loop as loop
    import train.stages as stages
    from slim.sources import tiny_random_processor
    from train.recipe import DataConfig, Recipe

    recipe = Recipe(output_dir=str(tmp_path / "run"), data=DataConfig(eval="e.jsonl", train="t.jsonl"), stages=[stage])
    return stages.RunContext(recipe=recipe, out=tmp_path / "run", resume=resume, state=loop.distributed_state(),
                             train_data="unused", eval_sets={}, base_dir=tmp_path / "in",
                             processor=tiny_random_processor())


def test_qat_stage_teacher_input_is_the_float_model(tmp_path, monkeypatch):
    """The qat stage with `teacher: input` hands the trainer a teacher without fake quantizers, equal to the
    stage's input model."""
    import train.context as context
    import train.loop as loop
    import train.quant_stage as quant_stage
    import train.stages as stages
    from slim.model import save_model
    from slim.sources import tiny_random_processor
    from train.recipe import StageConfig

    src = install_explicit_attention(tiny_random_whisper(seed=0, max_source_positions=FRAMES // 2))
    proc = tiny_random_processor()
    save_model(src, tmp_path / "in", processor=proc)
    g = torch.Generator().manual_seed(0)
    batch = {"input_features": torch.randn(2, 80, FRAMES, generator=g), "labels": torch.randint(3, 100, (2, 5), generator=g)}
    seen = {}

    def fake_train(model, cfg, ds, collate_fn, out_dir, teacher=None, **kw):
        seen["teacher"], seen["student"] = teacher, model

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(quant_stage, "calibration_batches", lambda ctx, n, batch_size=4: [batch] * n)
    monkeypatch.setattr(context, "train_dataset", lambda ctx, **kw: (None, None))
    stage = StageConfig(name="q", kind="qat", teacher="input", quant=QuantConfig(calibration_batches=1),
                        train=TrainConfig(max_steps=1))
    ctx = _ctx(tmp_path, stage)
    stages._run_stage(ctx, stage, tmp_path / "in", tmp_path / "run" / "01-q")
    teacher, student = seen["teacher"], seen["student"]
    assert not list(quantizers(teacher)) and list(quantizers(student))
    assert teacher is not student
    ref = {k: v for k, v in src.state_dict().items()}
    assert_same_weights(ref, weights(teacher))
    with torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, src.eval()(**batch).logits, rtol=0, atol=0)
