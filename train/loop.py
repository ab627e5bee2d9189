"""The training loop that prune-recovery and QAT both run in, on Accelerate.

`train()` reads top to bottom: setup (accelerator, LoRA, optimizer, schedule, data) → resume → steps
(forward, distillation loss, backward under `accelerator.accumulate`, clip, step) with logging, evaluation
and checkpoints → merge LoRA, save the last model → return a TrainResult.

Exactness is a feature here: the data order is a function of (seed, epoch) only (a stream's: its stored
order) and the position in it is part of the checkpointed train state (a stream's: every DataLoader
worker's position, from torchdata's StatefulDataLoader), every RNG is restored, and the DataLoader never
draws from the global RNG; so a run killed at any step and resumed ends with weights bit-identical to an uninterrupted
run on CPU, and N processes with batch B equal one process with batch B and gradient accumulation N.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from slim.augment import AugmentConfig
from slim.data import REASONS, frame_weights
from slim.model import model_inputs
from train.checkpoint import (CheckpointError, TrainState, clean_temp, list_checkpoints, load_latest,
                              save_checkpoint, save_model_atomic)
from train.losses import IGNORE_INDEX, distill_loss, hidden_l2
from train.tracking import MetricsLog, TrackingConfig, init_trackers, wandb_available, wandb_mode

log = logging.getLogger("whisper_slim")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; nothing of that step was applied or saved."""

    def __init__(self, step: int, what: str, value: float, checkpoint: Path | None):
        self.step, self.what, self.value, self.checkpoint = step, what, value, checkpoint
        last = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"training diverged at step {step}: {what} is {value}; stopped before applying it, "
                         f"{last}. Lower the learning rate or use fp32/bf16.")


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class DistillConfig:
    ce_weight: float = 1.0
    """Weight of cross-entropy on the labels."""
    kl_weight: float = 1.0
    """Weight of KL(teacher || student) on the logits (ignored when the stage has no teacher)."""
    temperature: float = 2.0
    """Softmax temperature T of the distillation term (the term is scaled by T²)."""
    hidden_weight: float = 0.0
    """Weight of the L2 distance to the teacher's hidden states (every encoder and decoder layer, each
    relative to the teacher's energy: `train.losses.hidden_l2`). Ignored when the stage has no teacher."""
    pad_weight: float = 1.0
    """In the hidden-state term, the weight of an encoder frame past the clip's audio relative to one inside
    it (`slim.data.frame_weights`; 1: every frame alike). The quickstart's training clips fill 27% of the 30 s
    window on average and dense tiny.en puts 56-79% of its encoder layers' energy past the audio, so at 1 most
    of the encoder's term is about copying the teacher on padding."""

    def __post_init__(self):
        if not 0 <= self.pad_weight <= 1:
            raise ValueError(f"distill.pad_weight must be in [0, 1], got {self.pad_weight}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.ce_weight < 0 or self.kl_weight < 0 or self.hidden_weight < 0:
            raise ValueError(f"distill.ce_weight/kl_weight/hidden_weight must be >= 0, got "
                             f"{self.ce_weight}/{self.kl_weight}/{self.hidden_weight}")
        if self.ce_weight == 0 and self.kl_weight == 0 and self.hidden_weight == 0:
            raise ValueError("distill.ce_weight, kl_weight and hidden_weight are all 0: nothing to train on")


@dataclass
class LoraSettings:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of all weights; merged into the weights at the end."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "fc1"])
    """Names of the Linear modules that get adapters (matched on the last name component)."""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise ValueError("lora.target_modules is empty")


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to run (a step = grad_accum micro-batches on every process)."""
    batch_size: int = 8
    """Micro-batch size per process. Global batch = batch_size * grad_accum * processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices and embeddings only (not biases or LayerNorm)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up (cosine and linear reach 0 at max_steps)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: bf16 on a CUDA GPU that supports it, else fp32 ('no')."""
    eval_every: int = 0
    """Evaluate every N steps (0: only after the last step). Needs an eval_fn or eval dataset."""
    save_every: int = 50
    """Write a checkpoint every N steps (0: only after the last step; the last step always saves)."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    best_metric: str = "wer"
    """Evaluation metric whose lowest value and step the run reports (TrainResult.best_metric / best_step;
    falls back to eval_loss when absent)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Loss weights and temperature (CE on labels + KL to the teacher)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Waveform augmentation of the training audio (slim.augment: speed, reverberation, band limit, noise;
    a teacher sees the same augmented audio)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Optional LoRA adapters instead of full fine-tuning."""
    trainable: list[str] = field(default_factory=list)
    """fnmatch patterns of the parameter names that train (e.g. `model.encoder.*`); every other parameter
    stays frozen. Empty: every parameter trains. Each pattern must match at least one parameter."""
    seed: int = 0
    """Seeds the data order, dropout and LoRA initialisation."""
    num_workers: int = 0
    """DataLoader worker processes per training process: they decode and featurize the audio (0: the
    training process does it between steps). Each holds a copy of the data index, not the audio."""
    length_buckets: int = 0
    """Length bucketing: each window of this many batches of the shuffled order is sorted by transcript
    length and cut into batches, whose order is then shuffled, so a batch pads its labels less (0: off).
    Map-style data only (manifests, audio folders, non-streaming `datasets`)."""
    features: Literal["workers", "device"] = "workers"
    """Where the log-mel features are computed: in the DataLoader workers, or on the training device from
    the raw audio the workers decode (the feature extractor's torch path; worth it on GPUs)."""
    log_every: int = 10
    """Write metrics.jsonl (and wandb) every N steps; the first and last steps are always logged."""

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers", "length_buckets"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is larger than max_steps ({self.max_steps})")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.trainable and self.lora.enabled:
            raise ValueError("trainable and lora.enabled are both set: LoRA already chooses what trains "
                             "(lora.target_modules); use one of them")
        if any(not isinstance(p, str) or not p for p in self.trainable):
            raise ValueError(f"trainable must be a list of non-empty name patterns, got {self.trainable!r}")
        cpus = os.cpu_count() or 1
        if self.num_workers > 4 * cpus:
            raise ValueError(f"num_workers ({self.num_workers}) is more than 4 per CPU core ({cpus} here): each "
                             "worker is a process with its own copy of the data index; use at most the cores")


@dataclass
class TrainResult:
    start_step: int
    """The step the run started from (0, or the resumed checkpoint's step)."""
    final_step: int
    steps_run: int
    """Optimizer steps run by this call (final_step - start_step)."""
    losses: list[float]
    """Total loss of each step run by this call (mean over micro-batches and processes)."""
    resumed_from: Path | None
    best_metric: float | None
    best_step: int | None
    last_dir: Path | None
    """The final model (LoRA merged), saved with save_fn."""
    evals: list[dict] = field(default_factory=list)
    """Evaluation results of this call, each with its step."""
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    """Training items the data loader dropped (by slim.data reason), summed over workers and processes,
    counted from the start of the stage (a resumed run includes the killed run's counts)."""


# ---------------------------------------------------------------------------------------------
# pieces on tensors and data


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch. The order depends on (seed, epoch) only, not on any global RNG,
    so every process draws the same order (Accelerate then deals its batches out, batch i to process
    i % N: each example is seen once per epoch across processes) and a resumed run, told the epoch and
    the batches already seen, continues with exactly the batches that come next.

    With `lengths` and `buckets`, each window of `buckets` batches is sorted by length, cut into batches
    of `batch_size` and the batches reordered by the same generator; a short last batch stays last."""

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 buckets: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.batch_size, self.buckets = lengths, batch_size, buckets

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        if not self.buckets or self.lengths is None:
            return iter(order)
        B, w = self.batch_size, self.buckets * self.batch_size
        out: list[int] = []
        for start in range(0, self.n, w):
            window = sorted(order[start:start + w], key=self.lengths.__getitem__)
            batches = [window[i:i + B] for i in range(0, len(window), B)]
            tail = batches.pop() if len(batches[-1]) < B else []
            for j in torch.randperm(len(batches), generator=g).tolist():
                out += batches[j]
            out += tail
        return iter(out)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed for (seed, epoch), so that (0, 1) and (1, 0) give unrelated orders."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def decoder_inputs(batch: dict, config) -> torch.Tensor:
    """The decoder input ids: the batch's own, or the labels shifted right behind the start token (what
    WhisperForConditionalGeneration does with `labels=`, done here so that student and teacher see the
    same inputs and no loss is computed twice)."""
    if batch.get("decoder_input_ids") is not None:
        return batch["decoder_input_ids"]
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    return shift_tokens_right(batch["labels"], config.pad_token_id, config.decoder_start_token_id)


def forward_logits(model, batch: dict, dec: torch.Tensor) -> torch.Tensor:
    return forward(model, batch, dec).logits


def forward(model, batch: dict, dec: torch.Tensor, hidden: bool = False):
    """The teacher-forced forward, on the audio window `model` encodes; `hidden=True` also returns every
    layer's hidden states."""
    return model(**model_inputs(batch, dec, model=model), use_cache=False, output_hidden_states=hidden)


def hidden_states_loss(student_out, teacher_out, labels: torch.Tensor, audio_frames=None,
                       pad_weight: float = 1.0) -> torch.Tensor:
    """`hidden_l2` over every encoder layer (the student's frames, those past the audio weighted `pad_weight`)
    and every decoder layer (label positions). A student that encodes a shorter audio window than its teacher
    is compared on its frames, which are the teacher's first ones."""
    frames = student_out.encoder_hidden_states[-1].shape[1]
    s = list(student_out.encoder_hidden_states[1:]) + list(student_out.decoder_hidden_states[1:])
    t = [h[:, :frames] for h in teacher_out.encoder_hidden_states[1:]] + list(teacher_out.decoder_hidden_states[1:])
    n_enc = len(student_out.encoder_hidden_states) - 1
    w = frame_weights(audio_frames, frames, pad_weight)
    if w is not None:
        w = w.to(s[0].device)
    mask = labels != IGNORE_INDEX
    return hidden_l2(s, t, [w] * n_enc + [mask] * (len(s) - n_enc))


def resolve_mixed_precision(mp: str) -> str:
    if mp != "auto":
        return mp
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _gpu_present() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def distributed_state():
    """The Accelerate PartialState for this process, CPU-aware.

    Without a GPU, processes started by `accelerate launch` (torchrun) must ask for the CPU explicitly to
    become one gloo group; a bare `PartialState()` there silently makes N independent single-process runs.
    Create the state through this (before anything else touches Accelerate) in multi-process entry points.
    The process group it forms lives until the entry point calls `state.destroy_process_group()` at exit:
    `train()` never tears it down, so one group serves every stage of a run.
    """
    from accelerate import PartialState

    return PartialState(cpu=not _gpu_present())


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    return groups


def _freeze_except(model: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter whose name matches none of `patterns` (fnmatch); a pattern that matches no
    parameter is an error, so a misspelt name cannot silently freeze the whole model."""
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"trainable: {pat!r} matches no parameter of the model (names look like "
                             f"{names[0]!r})")
    for n, p in model.named_parameters():
        if not any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
            p.requires_grad_(False)


def _make_accelerator(cfg: TrainConfig, tracking: TrackingConfig | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mp = resolve_mixed_precision(cfg.mixed_precision)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mp):
        # Accelerate keeps one process-wide state and refuses to change its precision; stages of one run
        # may differ (fp32 recover, then QAT), so drop that state and keep the process group.
        AcceleratorState._reset_state(reset_partial_state=False)
    log_with = None
    if tracking is not None and tracking.wandb.enabled:
        if not wandb_available():
            log.warning("tracking.wandb.enabled but wandb is not installed; logging to metrics.jsonl only")
        elif wandb_mode(tracking.wandb.mode) != "disabled":
            log_with = "wandb"
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp, log_with=log_with,
                      cpu=not _gpu_present())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes != world:
        raise RuntimeError(f"{world} processes were launched but Accelerate sees {acc.num_processes}: an "
                           "Accelerate state was created before train() without cpu=True on a machine "
                           "without GPU. Create it with train.loop.distributed_state().")
    return acc


KILL_ENV = "SLIM_TEST_KILL_AT"


def _test_kill_hook() -> Callable[[str, int, int], None] | None:
    """For the kill -9 / resume tests: SLIM_TEST_KILL_AT=STAGE:STEP[:WHO] SIGKILLs, once step STEP of
    stage STAGE and its checkpoint are done, process WHO (a process index, default 0), or with WHO =
    `launcher` the `accelerate launch` that started the processes (process 0 kills it, then waits for its
    own end: the kernel kills every worker of a dead launcher, see train.cli). Unset: None, no cost."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    stage, step, who = (spec.split(":") + ["0"])[:3]
    if not step.isdigit() or not (who.isdigit() or who == "launcher"):
        raise ValueError(f"{KILL_ENV}={spec!r}: expected STAGE:STEP[:PROCESS_INDEX|launcher]")

    def kill(stage_name: str, at: int, process_index: int) -> None:
        if stage_name != stage or at != int(step) or process_index != (0 if who == "launcher" else int(who)):
            return
        import signal

        if who == "launcher":
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # the kernel's SIGKILL (parent death) ends this process first
        os.kill(os.getpid(), signal.SIGKILL)

    return kill


def _apply_lora(model, lc: LoraSettings):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=list(lc.target_modules)))


def _default_save(model, out: Path) -> None:
    model.save_pretrained(out)


@torch.no_grad()
def _eval_loss(accelerator, model, loader, config) -> float:
    """Mean token CE over the eval set, sharded across processes; gather_for_metrics drops the samples
    Accelerate duplicates to even out the last batch."""
    sums = []
    for batch in loader:
        logits = forward_logits(model, batch, decoder_inputs(batch, config)).float()
        labels = batch["labels"]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                               reduction="none").sum(1)
        n = (labels != IGNORE_INDEX).sum(1).to(ce.dtype)
        sums.append(accelerator.gather_for_metrics(torch.stack([ce, n], 1)))
    total = torch.cat(sums).sum(0)
    return (total[0] / total[1].clamp_min(1)).item()


# ---------------------------------------------------------------------------------------------
# the loop


def train(model: torch.nn.Module, cfg: TrainConfig, train_dataset: Dataset, collate_fn: Callable,
          out_dir: str | Path, teacher: torch.nn.Module | None = None,
          eval_fn: Callable[[torch.nn.Module], dict] | None = None, resume: bool = False,
          stage_name: str = "train", tracker_config: TrackingConfig | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          on_step_state: Callable[[int], None] | None = None,
          save_fn: Callable[[torch.nn.Module, Path], None] | None = None,
          eval_dataset: Dataset | None = None, extra_state: dict[str, Any] | None = None,
          metrics_path: str | Path | None = None,
          device_features: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
          on_batch: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune `model` in place for cfg.max_steps optimizer steps; see the module docstring.

    model: a WhisperForConditionalGeneration (or any module taking input_features/decoder_input_ids and
        returning .logits). Trained in place; with LoRA the adapters are merged into it at the end.
    train_dataset / collate_fn: items collated into {"input_features": (B, 80, 3000), "labels": (B, T)}
        with -100 on label padding (optionally "skipped": counts per slim.data REASONS of the items the
        collator dropped, and "ids"). A map-style dataset is shuffled per epoch and its batches dealt out
        to the processes (EpochSampler); an IterableDataset with `for_process(rank, world)` (slim.data's
        StreamingSpeechDataset) is read in stream order, each process its own part, through torchdata's
        StatefulDataLoader, whose state (every worker's position) goes into the checkpoint.
    out_dir: gets checkpoints/, metrics.jsonl, last/ (the final model, written with save_fn), wandb/.
    teacher: a frozen model for distillation (cfg.distill), run under no_grad in eval mode.
    eval_fn: eval_fn(model) -> {"wer": ...}, called on the main process every cfg.eval_every steps and at
        the end; its result is shared with all processes. eval_dataset adds `eval_loss` (all processes).
    resume: continue from the newest complete checkpoint in out_dir/checkpoints (falls back to older ones
        when the newest is corrupt). Without resume, existing checkpoints are an error.
    on_step: on_step(step, record) on every process after each step (and after its checkpoint).
    on_step_state: on_step_state(step) on every process after each step, before its checkpoint: a change to
        the model's state made here (e.g. freezing QAT observers) is what that checkpoint holds.
    save_fn: save_fn(model, dir) for the final model (default: model.save_pretrained(dir)).
    extra_state: objects with state_dict()/load_state_dict() saved in every checkpoint (e.g. QAT observers).
    metrics_path: the JSONL log (default out_dir/metrics.jsonl); stages may share one file, since every
        record names its stage.
    device_features: device_features(audio, device) -> input_features, for batches that carry raw "audio"
        (TrainConfig.features = "device"; slim.data.DeviceFeatures).
    on_batch: on_batch(batch) on every process with each micro-batch it trains on (tests check shards).
    """
    t_start = time.time()
    out_dir = Path(out_dir)
    save_fn = save_fn or _default_save
    from accelerate.utils import broadcast_object_list, gather_object, send_to_device, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # --- setup
    accelerator = _make_accelerator(cfg, tracker_config)
    main = accelerator.is_main_process
    ckpt_root = out_dir / "checkpoints"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_temp(ckpt_root)
    accelerator.wait_for_everyone()
    if not resume and list_checkpoints(ckpt_root)[0]:
        raise CheckpointError(f"{ckpt_root} already holds checkpoints; pass resume=True (--resume) to continue "
                              "that run, or use a new output folder")
    streaming = isinstance(train_dataset, IterableDataset)
    if streaming and cfg.length_buckets:
        raise ValueError("length_buckets: a streamed dataset has no lengths up front; set it to 0")
    if not streaming and len(train_dataset) // (cfg.batch_size * accelerator.num_processes) < 1:
        raise ValueError(f"train_dataset has {len(train_dataset)} items, fewer than one batch of "
                         f"batch_size {cfg.batch_size} x {accelerator.num_processes} processes")
    set_seed(cfg.seed)
    config = model.config
    lora = cfg.lora.enabled
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    if cfg.trainable:
        _freeze_except(model, cfg.trainable)
    net = _apply_lora(model, cfg.lora) if lora else model
    net.train()
    optimizer = torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr)
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    # Not passed to prepare(): Accelerate would step it once per process per step. Stepped by hand on
    # each real optimizer step and checkpointed as a registered object instead.
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    # generator=: without it every new iterator draws its worker base seed from the global torch RNG,
    # which would shift dropout after a resume (the resumed run creates its iterator at another point).
    # It is reseeded per epoch, so workers are seeded the same whether the epoch was resumed or not.
    data_rng = torch.Generator()
    if streaming:
        # Not through prepare(): Accelerate would read one stream on the main process and dispatch it, or
        # give every process the whole stream; each process reads its own part instead (for_process), and
        # the StatefulDataLoader's state is per process (TrainState.processes).
        from torchdata.stateful_dataloader import StatefulDataLoader

        shard = train_dataset.for_process(accelerator.process_index, accelerator.num_processes)
        loader = StatefulDataLoader(shard, batch_size=cfg.batch_size, collate_fn=collate_fn,
                                    num_workers=cfg.num_workers, drop_last=True, generator=data_rng)
        net, optimizer = accelerator.prepare(net, optimizer)
    else:
        # A plain DataLoader, not a StatefulDataLoader: the order is a function of (seed, epoch), so the
        # position is one number (TrainState.batches_seen) and Accelerate's skip_first_batches resumes by
        # skipping sampler indices, loading nothing. (Accelerate's own stateful-loader checkpointing writes
        # one dl_state_dict file name from every process, which per-process stream states would overwrite;
        # hence TrainState.processes for the streamed case.)
        if cfg.length_buckets and not hasattr(train_dataset, "lengths"):
            raise ValueError("length_buckets: the training dataset has no lengths() (slim.data's lazy datasets do)")
        lengths = train_dataset.lengths() if cfg.length_buckets else None
        sampler = EpochSampler(len(train_dataset), cfg.seed, lengths, cfg.batch_size, cfg.length_buckets)
        loader = DataLoader(train_dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_fn,
                            num_workers=cfg.num_workers, drop_last=True, generator=data_rng)
        net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_dataset, batch_size=cfg.batch_size, shuffle=False,
                                                     collate_fn=collate_fn, num_workers=cfg.num_workers,
                                                     generator=torch.Generator().manual_seed(cfg.seed)))
    if teacher is not None:
        teacher.to(accelerator.device).eval()
        teacher.requires_grad_(False)

    state = TrainState(stage=stage_name)
    objects = {"train_state": state, "scheduler": scheduler,
               **{f"extra.{k}": v for k, v in sorted((extra_state or {}).items())}}
    accelerator.register_for_checkpointing(*objects.values())
    names = list(objects)
    metrics = MetricsLog(Path(metrics_path or out_dir / "metrics.jsonl"), stage_name, accelerator)
    run_config = {"stage": stage_name, "num_processes": accelerator.num_processes, **asdict(cfg)}
    init_trackers(accelerator, tracker_config, run_config, out_dir, stage_name)

    # this process's skipped items by reason (slim.data REASONS, as the collator counts them)
    skipped = torch.zeros(len(REASONS), dtype=torch.long)
    resumed_from = load_latest(accelerator, ckpt_root, state, names) if resume else None
    if resumed_from is not None and state.processes is not None:
        mine = state.processes[accelerator.process_index]
        state.epoch, state.batches_seen = mine["epoch"], mine["batches_seen"]
        skipped = torch.tensor(mine["skipped"], dtype=torch.long)
        if streaming and mine["loader"] is not None:
            loader.load_state_dict(mine["loader"])
    if resumed_from is not None:
        dropped = metrics.rewind(state.step)
        if main:
            log.info("resumed %s from %s (step %d, epoch %d, batch %d); dropped %d later log records",
                     stage_name, resumed_from, state.step, state.epoch, state.batches_seen, dropped)
    start_step = state.step
    last_ckpt = resumed_from

    def gather_positions() -> None:
        """Every process's data position into the main process's TrainState (a collective)."""
        mine = {"epoch": state.epoch, "batches_seen": state.batches_seen, "skipped": skipped.tolist(),
                "loader": loader.state_dict() if streaming else None}
        state.processes = gather_object([mine])

    def skipped_total() -> torch.Tensor:
        return accelerator.reduce(skipped.to(accelerator.device), reduction="sum").cpu()

    def evaluate() -> dict:
        net.eval()
        out: dict[str, float] = {}
        if eval_loader is not None:
            with accelerator.autocast():
                out["eval_loss"] = _eval_loss(accelerator, net, eval_loader, config)
        if eval_fn is not None:
            box = [None]
            if main:
                m = accelerator.unwrap_model(net)
                box = [dict(eval_fn(m.get_base_model() if lora else m))]
            if accelerator.num_processes > 1:
                broadcast_object_list(box)
            out.update(box[0])
        net.train()
        return out

    # --- train
    kill_at = _test_kill_hook()
    losses: list[float] = []
    evals: list[dict] = []
    window: list[torch.Tensor] = []
    part_sum = torch.zeros(4, device=accelerator.device)  # total, ce, kl, hidden over this step's micro-batches
    d = cfg.distill
    want_hidden = teacher is not None and d.hidden_weight > 0
    n_micro = 0
    grad_norm = None
    t_log = time.time()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=stage_name, disable=not main, dynamic_ncols=True)
    try:
        while state.step < cfg.max_steps:
            # Accelerate's set_epoch reaches the sampler and the dataset (its augmentation draws per epoch)
            (shard if streaming else loader).set_epoch(state.epoch)
            data_rng.manual_seed(epoch_seed(cfg.seed, state.epoch))
            if streaming:  # a resumed loader continues from its loaded state by itself
                batches = loader
            else:
                batches = accelerator.skip_first_batches(loader, state.batches_seen) if state.batches_seen else loader
            n_epoch_batches = 0
            for batch in batches:
                n_epoch_batches += 1
                if streaming:
                    batch = send_to_device(batch, accelerator.device)
                if "skipped" in batch:
                    skipped += batch.pop("skipped").cpu()
                if "audio" in batch:
                    batch["input_features"] = device_features(batch.pop("audio"), accelerator.device)
                if on_batch is not None:
                    on_batch(batch)
                with accelerator.accumulate(net):
                    if batch["labels"].shape[0] == 0:
                        # every item of this micro-batch was bad: a zero loss over every weight keeps this
                        # process's backward (and DDP's gradient all-reduce) in step with the others
                        loss = sum(p.sum() for p in net.parameters() if p.requires_grad) * 0.0
                        parts = {"ce": loss.detach()}
                    else:
                        dec = decoder_inputs(batch, config)
                        out = forward(net, batch, dec, hidden=want_hidden)
                        t_out = None
                        if teacher is not None:  # no_grad, not inference_mode: the KL term keeps these for backward
                            with torch.no_grad(), accelerator.autocast():
                                t_out = forward(teacher, batch, dec, hidden=want_hidden)
                        loss, parts = distill_loss(out.logits, None if t_out is None else t_out.logits,
                                                   batch["labels"], d.ce_weight, d.kl_weight, d.temperature)
                        if want_hidden:
                            h = hidden_states_loss(out, t_out, batch["labels"], batch.get("audio_frames"),
                                                   d.pad_weight)
                            loss = loss + d.hidden_weight * h
                            parts["hidden"] = h.detach()
                    accelerator.backward(loss)
                    zero = torch.zeros((), device=part_sum.device)
                    part_sum += torch.stack([loss.detach().float(), parts["ce"].float(),
                                             parts.get("kl", zero).to(part_sum).float(),
                                             parts.get("hidden", zero).to(part_sum).float()])
                    n_micro += 1
                    if accelerator.sync_gradients:
                        step_parts = accelerator.reduce(part_sum / n_micro, reduction="mean")
                        if not torch.isfinite(step_parts).all():
                            raise TrainingDiverged(state.step + 1, "the loss", step_parts[0].item(), last_ckpt)
                        if cfg.max_grad_norm is not None:
                            grad_norm = accelerator.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
                            if (grad_norm is not None and accelerator.mixed_precision != "fp16"  # DeepSpeed: None
                                    and not torch.isfinite(torch.as_tensor(grad_norm))):
                                raise TrainingDiverged(state.step + 1, "the gradient norm", float(grad_norm),
                                                       last_ckpt)
                    optimizer.step()  # Accelerate's optimizer only steps (and zeroes) on sync steps
                    optimizer.zero_grad(set_to_none=True)
                state.batches_seen += 1
                if not accelerator.sync_gradients:
                    continue

                # --- one optimizer step done
                lr = scheduler.get_last_lr()[0]
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped it
                    scheduler.step()
                state.step += 1
                part_sum.zero_()
                n_micro = 0
                losses.append(step_parts[0].item())
                window.append(step_parts.cpu())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
                record: dict[str, Any] = {}
                last = state.step >= cfg.max_steps
                if state.step % cfg.log_every == 0 or state.step == start_step + 1 or last:
                    w = torch.stack(window).mean(0)
                    record = {"loss": w[0].item(), "ce": w[1].item(), "lr": lr, "epoch": state.epoch,
                              "sec_per_step": (time.time() - t_log) / len(window)}
                    if teacher is not None:
                        record["kl"] = w[2].item()
                    if want_hidden:
                        record["hidden"] = w[3].item()
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    n_skipped = int(skipped_total().sum())
                    if n_skipped:
                        record["skipped"] = n_skipped
                    metrics.log(state.step, record)
                    window, t_log = [], time.time()
                if (eval_fn is not None or eval_loader is not None) and (
                        last or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                    result = evaluate()
                    evals.append({"step": state.step, **result})
                    metrics.log(state.step, {f"eval/{k}": v for k, v in result.items()})
                    key = cfg.best_metric if cfg.best_metric in result else "eval_loss"
                    value = result.get(key)
                    if value is not None and (state.best_metric is None or value < state.best_metric):
                        state.best_metric, state.best_step = float(value), state.step
                    record.update({f"eval/{k}": v for k, v in result.items()})
                if on_step_state is not None:
                    on_step_state(state.step)
                if last or (cfg.save_every and state.step % cfg.save_every == 0):
                    gather_positions()
                    last_ckpt = save_checkpoint(accelerator, ckpt_root, state, names, cfg.keep_last)
                if on_step is not None:
                    on_step(state.step, record)
                if kill_at is not None:
                    kill_at(stage_name, state.step, accelerator.process_index)
                if last:
                    break
            else:
                if n_epoch_batches == 0 and not state.batches_seen:
                    raise ValueError(f"the training data gave no batch of {cfg.batch_size} in epoch {state.epoch}"
                                     f" on process {accelerator.process_index}")
                state.epoch += 1
                state.batches_seen = 0

        # --- save
        final = accelerator.unwrap_model(net, keep_fp32_wrapper=False)
        if lora:
            final = final.merge_and_unload()  # replaces the adapted Linears inside `model` itself
        if lora or cfg.trainable:
            for n, p in model.named_parameters():
                p.requires_grad_(trainable.get(n, True))
        if main:
            save_model_atomic(save_fn, final, out_dir / "last")
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        # Not accelerator.end_training(): it also destroys the process group, which the run's later stages
        # (and their collectives) still need; the group belongs to the caller (see distributed_state()).
        for tracker in accelerator.trackers:
            tracker.finish()
    total = skipped_total()
    if main and total.sum():
        log.warning("%s: the data loader skipped %d bad training items (%s)", stage_name, int(total.sum()),
                    {r: int(n) for r, n in zip(REASONS, total.tolist()) if n})
    accelerator.free_memory()
    return TrainResult(start_step=start_step, final_step=state.step, steps_run=state.step - start_step,
                       losses=losses, resumed_from=resumed_from, best_metric=state.best_metric,
                       best_step=state.best_step, last_dir=out_dir / "last", evals=evals,
                       seconds=round(time.time() - t_start, 3),
                       skipped={r: int(n) for r, n in zip(REASONS, total.tolist()) if n})
