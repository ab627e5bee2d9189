"""The Accelerate training loop on a tiny random Whisper: losses, distillation, LoRA, eval/best, NaN stop,
wandb offline.

This file also holds the tiny model/data helpers shared by test_checkpoint.py and test_multiprocess.py,
and (under __main__) the worker those tests start in subprocesses, alone or under `accelerate launch`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from train.losses import ce_loss, distill_kl, distill_loss, hidden_l2  # noqa: E402
from train.loop import (DistillConfig, LoraSettings, TrainConfig, TrainingDiverged, decoder_inputs,  # noqa: E402
                        train)
from train.tracking import TrackingConfig, WandbConfig, has_wandb_login, read_metrics, wandb_mode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# shared helpers


def tiny_whisper(seed: int = 0):
    """2+2 layers, d_model 64, 4 heads, vocab 100, no dropout (so runs are comparable across layouts)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=1,
                        pad_token_id=0, eos_token_id=2, bos_token_id=1, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0)
    return WhisperForConditionalGeneration(cfg)


class FakeSpeech(torch.utils.data.Dataset):
    """Random log-mel features (80 x 3000: Whisper's encoder needs the full 30 s window) and 3-8 random
    label tokens ending in eos; what slim.data's dataset yields."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 80, 3000, generator=g)
        self.y = []
        for _ in range(n):
            k = int(torch.randint(2, 8, (1,), generator=g))
            self.y.append(torch.cat([torch.randint(3, 100, (k,), generator=g), torch.tensor([2])]))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_features": self.x[i], "labels": self.y[i]}


def collate(items):
    """Stack features, pad labels with -100 (what slim.data's collator does)."""
    T = max(len(it["labels"]) for it in items)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for i, it in enumerate(items):
        labels[i, : len(it["labels"])] = it["labels"]
    return {"input_features": torch.stack([it["input_features"] for it in items]), "labels": labels}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # cpu: also on a GPU machine


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads per process are up to
    20x slower than one, and runs that are compared bit for bit must use the same thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def run_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("WANDB_MODE", None)
    return env


# ---------------------------------------------------------------------------------------------
# losses on hand-built tensors


def test_ce_loss_known_value_and_ignore_index():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = math.log(3.0)  # p(1) = 3/6 = 0.5 at position 0
    labels = torch.tensor([[1, 2, -100]])
    # position 0: -log(0.5); position 1: uniform over 4 -> -log(0.25); position 2 ignored
    assert ce_loss(logits, labels).item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)
    assert ce_loss(logits, torch.full((1, 3), -100)).item() == 0.0  # no tokens: 0, not NaN


def test_distill_kl_zero_for_equal_logits_and_known_value():
    s = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert distill_kl(s, s.clone(), mask, temperature=2.0).item() == 0.0

    # two classes; teacher p = (0.5, 0.5), student q = (0.8, 0.2) at T = 1: KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    t = torch.zeros(1, 1, 2)
    st = torch.log(torch.tensor([[[0.8, 0.2]]]))
    want = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    one = torch.ones(1, 1, dtype=torch.bool)
    assert distill_kl(st, t, one, 1.0).item() == pytest.approx(want, abs=1e-6)
    # at T = 2 the logits are halved and the result scaled by 4
    q2 = torch.softmax(st / 2, -1)[0, 0]
    want2 = 4 * (0.5 * math.log(0.5 / q2[0].item()) + 0.5 * math.log(0.5 / q2[1].item()))
    assert distill_kl(st, t, one, 2.0).item() == pytest.approx(want2, abs=1e-6)
    # masked tokens do not count: a second, very different token with mask 0 changes nothing
    st2 = torch.cat([st, torch.tensor([[[10.0, -10.0]]])], 1)
    t2 = torch.cat([t, torch.tensor([[[-10.0, 10.0]]])], 1)
    assert distill_kl(st2, t2, torch.tensor([[True, False]]), 1.0).item() == pytest.approx(want, abs=1e-6)


def test_distill_loss_weights_and_parts():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    total, parts = distill_loss(s, t, labels, ce_weight=0.3, kl_weight=0.7, temperature=2.0)
    ce, kl = ce_loss(s, labels), distill_kl(s, t, labels != -100, 2.0)
    assert parts["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert parts["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert total.item() == pytest.approx(0.3 * ce.item() + 0.7 * kl.item(), abs=1e-6)
    only_ce, p = distill_loss(s, None, labels, 0.3, 0.7, 2.0)
    assert only_ce.item() == pytest.approx(ce.item(), abs=1e-6) and set(p) == {"ce"}


def test_hidden_l2_known_value_masks_and_zero_for_equal_states():
    t = [torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])]  # energies 25+1 and 4
    s = [torch.tensor([[[3.0, 3.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 0.0]]])]  # errors 1+0 and 4
    assert hidden_l2(t, [x.clone() for x in t], [None, None]).item() == 0.0
    assert hidden_l2(s, t, [None, None]).item() == pytest.approx((1 / 26 + 4 / 4) / 2, abs=1e-7)
    # a masked position counts neither in the error nor in the energy
    assert hidden_l2(s, t, [torch.tensor([[True, False]]), None]).item() == pytest.approx((1 / 25 + 1) / 2, abs=1e-7)
    with pytest.raises(ValueError, match="pair up"):
        hidden_l2(s, t[:1], [None])


def test_hidden_states_loss_weighs_encoder_frames_past_the_audio_by_pad_weight():
    from types import SimpleNamespace

    from train.loop import hidden_states_loss

    def out(enc, dec):  # the embeddings' states come first and are not compared
        return SimpleNamespace(encoder_hidden_states=[None, enc], decoder_hidden_states=[None, dec])

    teacher_enc = torch.ones(1, 4, 2)  # 4 encoder frames of energy 2; the clip's audio spans the first 2
    student_enc = teacher_enc.clone()
    student_enc[0, 0] = 0.0  # error 2 inside the audio
    student_enc[0, 3] = 3.0  # error 8 past it
    dec = torch.ones(1, 3, 2)
    labels = torch.tensor([[5, 6, -100]])
    s, t = out(student_enc, dec), out(teacher_enc, dec.clone())
    frames = torch.tensor([4])  # mel frames: two encoder frames
    # every frame alike: (2 + 8) / (4 * 2), the decoder term 0, averaged over the two layers
    assert hidden_states_loss(s, t, labels, frames).item() == pytest.approx(10 / 8 / 2)
    # padding at a quarter: (2 + 8 / 4) / (2 * 2 + 2 * 2 / 4)
    assert hidden_states_loss(s, t, labels, frames, 0.25).item() == pytest.approx(4 / 5 / 2)
    # no lengths known: every frame alike whatever the weight
    assert hidden_states_loss(s, t, labels, None, 0.25).item() == pytest.approx(10 / 8 / 2)
    with pytest.raises(ValueError, match="pad_weight"):
        DistillConfig(pad_weight=1.5)


def test_hidden_state_distillation_is_zero_for_an_identical_teacher_and_logged(tmp_path):
    model, teacher = tiny_whisper(0), tiny_whisper(0)
    cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-3, save_every=0, log_every=1,
                      distill=DistillConfig(ce_weight=0.5, kl_weight=1.0, hidden_weight=2.0))
    r = train(model, cfg, FakeSpeech(8), collate, tmp_path, teacher=teacher)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "hidden" in x]
    assert [x["step"] for x in steps] == [1, 2]
    assert steps[0]["hidden"] == 0.0 and steps[0]["kl"] == 0.0
    assert r.losses[0] == pytest.approx(0.5 * steps[0]["ce"], rel=1e-6)  # CE only: the other terms are 0
    assert steps[1]["hidden"] > 0  # the CE step moved the student away from the teacher
    with pytest.raises(ValueError, match="all 0"):
        DistillConfig(ce_weight=0.0, kl_weight=0.0, hidden_weight=0.0)


def test_ce_matches_hf_whisper_loss():
    model = tiny_whisper().eval()
    batch = collate([FakeSpeech(2)[i] for i in range(2)])
    with torch.no_grad():
        hf = model(input_features=batch["input_features"], labels=batch["labels"])
        ours = ce_loss(model(input_features=batch["input_features"],
                             decoder_input_ids=decoder_inputs(batch, model.config)).logits, batch["labels"])
    assert ours.item() == pytest.approx(hf.loss.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("kwargs,field", [
    ({"max_steps": 0}, "max_steps"), ({"lr": 0.0}, "lr"), ({"grad_accum": 0}, "grad_accum"),
    ({"warmup_steps": 20, "max_steps": 10}, "warmup_steps"), ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"keep_last": 0}, "keep_last"), ({"save_every": -1}, "save_every"),
])
def test_train_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_nested_config_validation():
    with pytest.raises(ValueError, match="distill.temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="lora.r"):
        LoraSettings(r=0)


def test_recipe_style_parsing_of_train_config():
    from train.config_io import ConfigError, from_dict

    cfg = from_dict(TrainConfig, {"max_steps": 5, "distill": {"kl_weight": 0.5}, "lora": {"enabled": True}})
    assert (cfg.max_steps, cfg.distill.kl_weight, cfg.lora.enabled) == (5, 0.5, True)
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "fc1"]
    with pytest.raises(ConfigError, match="distill.temprature"):
        from_dict(TrainConfig, {"distill": {"temprature": 1.0}})


# ---------------------------------------------------------------------------------------------
# the loop


def test_distillation_from_identical_teacher_eval_best_and_metrics(tmp_path):
    """Teacher = a copy of the student: KL is exactly 0 at step 1. eval every step: best_metric/best_step
    follow the lowest WER and only last/ is written; metrics.jsonl has every step."""
    model, teacher = tiny_whisper(0), tiny_whisper(0)
    wers = iter([0.5, 0.3, 0.4])
    snapshots = {}

    def on_step(step, record):
        snapshots[step] = {k: v for k, v in weights(model).items()}

    cfg = TrainConfig(max_steps=3, batch_size=1, lr=1e-3, eval_every=1, save_every=0, log_every=1,
                      distill=DistillConfig(ce_weight=1.0, kl_weight=1.0, temperature=2.0))
    saved = []

    def save_fn(m, d):
        saved.append(Path(d).name)
        m.save_pretrained(d)

    r = train(model, cfg, FakeSpeech(8), collate, tmp_path, teacher=teacher, eval_fn=lambda m: {"wer": next(wers)},
              eval_dataset=FakeSpeech(3, seed=1), on_step=on_step, save_fn=save_fn)
    assert (r.start_step, r.final_step, r.steps_run, len(r.losses)) == (0, 3, 3, 3)
    assert (r.best_metric, r.best_step) == (0.3, 2)
    assert [e["step"] for e in r.evals] == [1, 2, 3] and all(e["eval_loss"] > 0 for e in r.evals)
    assert len(saved) == 1 and saved[0].startswith(".tmp-last")  # atomic: temp dir, then rename
    assert not (tmp_path / "best").exists()
    last = load_file(tmp_path / "last" / "model.safetensors")
    assert all(torch.equal(last[k], snapshots[3][k]) for k in last)

    recs = read_metrics(tmp_path / "metrics.jsonl")
    train_recs = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train_recs] == [1, 2, 3]
    assert train_recs[0]["kl"] == 0.0 and train_recs[0]["loss"] == pytest.approx(train_recs[0]["ce"], abs=0)
    assert train_recs[1]["kl"] > 0  # the student has moved away from the teacher
    assert [x["eval/wer"] for x in recs if "eval/wer" in x] == [0.5, 0.3, 0.4]
    assert [x["loss"] for x in train_recs] == pytest.approx(r.losses, abs=1e-6)
    assert train_recs[0]["lr"] == 1e-3  # no warm-up: step 1 runs at the peak lr, cosine after
    assert train_recs[2]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3)), rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]


def test_lora_trains_adapters_then_merges_into_the_model(tmp_path):
    model = tiny_whisper(0)
    before = weights(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=2, batch_size=1, lr=1e-2, save_every=0, mixed_precision="no",
                      lora=LoraSettings(enabled=True, r=4, alpha=8, target_modules=["q_proj", "fc1"]))
    r = train(model, cfg, FakeSpeech(4), collate, tmp_path)
    assert r.steps_run == 2
    after = weights(model)
    assert after.keys() == before.keys()  # merged and unloaded: no lora_A/lora_B left, same names
    assert all(type(m).__name__ != "Linear" or type(m) is torch.nn.Linear for m in model.modules())
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("q_proj.weight", "fc1.weight")) for k in changed)
    assert any("encoder" in k for k in changed) and any("decoder" in k for k in changed)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # peft froze them; restored
    saved = load_file(tmp_path / "last" / "model.safetensors")
    assert not any("lora" in k for k in saved)
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_trainable_patterns_train_only_the_matching_parameters(tmp_path):
    model = tiny_whisper(0)
    before = weights(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=2, batch_size=1, lr=1e-2, save_every=0, mixed_precision="no",
                      trainable=["model.encoder.layers.1.*", "*.encoder.layer_norm.weight"])
    assert train(model, cfg, FakeSpeech(4), collate, tmp_path).steps_run == 2
    after = weights(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    matching = {k for k in after if k.startswith("model.encoder.layers.1.") or k == "model.encoder.layer_norm.weight"}
    assert changed == matching  # every matching tensor moved, nothing else did
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # unfrozen again after training
    saved = load_file(tmp_path / "last" / "model.safetensors")
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_trainable_pattern_that_matches_nothing_fails_before_a_step(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=1, save_every=0, mixed_precision="no",
                      trainable=["model.encoder.*", "model.encodr.*"])
    with pytest.raises(ValueError, match=r"trainable: 'model.encodr.\*' matches no parameter"):
        train(tiny_whisper(0), cfg, FakeSpeech(4), collate, tmp_path)
    assert not (tmp_path / "last").exists()
    with pytest.raises(ValueError, match="trainable and lora.enabled"):
        TrainConfig(trainable=["model.encoder.*"], lora=LoraSettings(enabled=True))


def test_nan_loss_stops_with_training_diverged_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_whisper(0)

    def poison(step, record):
        if step == 2:  # after step 2 (and its checkpoint) the weights go bad: step 3's loss is NaN
            with torch.no_grad():
                model.model.decoder.layer_norm.weight.fill_(float("nan"))

    cfg = TrainConfig(max_steps=5, batch_size=1, lr=1e-3, save_every=2, keep_last=3, log_every=1)
    with pytest.raises(TrainingDiverged, match="diverged at step 3") as info:
        train(model, cfg, FakeSpeech(8), collate, tmp_path, on_step=poison)
    assert info.value.step == 3 and info.value.checkpoint.name == "step-00000002"
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    saved = load_file(ckpts / "step-00000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert [x["step"] for x in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "last").exists()


def test_wandb_offline_run_holds_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = tiny_whisper(0)
    cfg = TrainConfig(max_steps=2, batch_size=1, lr=3e-4, log_every=1, save_every=0)
    tracking = TrackingConfig(wandb=WandbConfig(enabled=True, project="whisper-slim-test"))
    r = train(model, cfg, FakeSpeech(4), collate, tmp_path, stage_name="recover", tracker_config=tracking)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    (log_file,) = glob.glob(runs[0] + "/run-*.wandb")
    raw = Path(log_file).read_bytes()
    # The .wandb file is a log of protobuf records; values are JSON text after their key (field 16).
    assert _wandb_values(raw, b"lr", config=True) == ["0.0003"]
    assert _wandb_values(raw, b"max_steps", config=True) == ["2"]
    assert _wandb_values(raw, b"stage", config=True) == ['"recover"']
    logged = [float(v) for v in dict.fromkeys(_wandb_values(raw, b"loss"))]  # history, then summary repeats
    assert logged == pytest.approx(r.losses, abs=1e-6)
    assert [x["loss"] for x in read_metrics(tmp_path / "metrics.jsonl")] == pytest.approx(r.losses, abs=1e-6)


def _wandb_values(raw: bytes, key: bytes, config: bool = False) -> list[str]:
    """JSON text of every item named `key` in a .wandb file (a log of protobuf records). An item is its
    key (config items: field 1, tag 0x0a; history/summary items: field 2, tag 0x12; length-prefixed), then
    value_json (field 16: tag 0x82 0x01, one length byte for short values)."""
    tag = b"\x0a" if config else b"\x12"
    out = []
    for m in re.finditer(re.escape(tag + bytes([len(key)]) + key) + rb"\x82\x01", raw):
        n = raw[m.end()]
        out.append(raw[m.end() + 1: m.end() + 1 + n].decode())
    return out


def test_wandb_mode_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_wandb_login() and wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert has_wandb_login() and wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("online") == "offline"  # the environment wins (CI sets it)


# ---------------------------------------------------------------------------------------------
# the worker that test_checkpoint.py and test_multiprocess.py start in subprocesses


def run_tiny(out, steps=12, batch_size=1, grad_accum=1, save_every=4, keep_last=2, n=16, resume=False,
             on_step=None):
    """The run the resume and multi-process tests compare: tiny student, tiny teacher, warm-up + cosine."""
    model = tiny_whisper(0)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, warmup_steps=2,
                      save_every=save_every, keep_last=keep_last, log_every=1)
    with one_thread():
        r = train(model, cfg, FakeSpeech(n), collate, out, teacher=tiny_whisper(1), resume=resume, on_step=on_step)
    return model, r


def _worker(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--kill-at", type=int, default=None, help="SIGKILL this process after this step")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)

    def on_step(step, record):
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    _, r = run_tiny(a.out, a.steps, a.batch_size, a.grad_accum, a.save_every, a.keep_last, a.n, a.resume, on_step)
    from accelerate import PartialState

    if PartialState().is_main_process:
        (Path(a.out) / "result.json").write_text(json.dumps(
            {"losses": r.losses, "start_step": r.start_step, "steps_run": r.steps_run,
             "num_processes": PartialState().num_processes}))


if __name__ == "__main__":
    _worker()
