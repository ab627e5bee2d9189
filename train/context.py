"""What every stage kind works with: the run's context, its training and calibration data, and the
trainer call that fine-tunes a model in place (recover, qat, gradual pruning's recovery rounds).

The stage kinds themselves live in `train/stages.py` (the table and the distributed rules),
`train/prune_stage.py` and `train/quant_stage.py`.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from train.recipe import Recipe, StageConfig

log = logging.getLogger("whisper_slim")
ROOT = Path(__file__).resolve().parent.parent


class RunError(RuntimeError):
    """A run cannot proceed (e.g. output dir already used without --resume)."""


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    resume: bool
    state: PartialState
    train_data: str | None
    eval_sets: dict[str, str]
    base_dir: Path
    processor: object = None
    outputs: dict[str, Path] = field(default_factory=dict)
    """Stage name -> its output model directory, for the stages finished so far (`input:`, `interpolate.base`)."""
    _teacher: object = None

    def teacher(self):
        if self._teacher is None:
            self._teacher = load_float(self.base_dir, self.recipe).eval()
            for p in self._teacher.parameters():
                p.requires_grad_(False)
        return self._teacher


def resolve(path: str | None) -> str | None:
    """Recipe paths are relative to the repository root (hf: specs pass through)."""
    if path is None or path.startswith("hf:") or Path(path).is_absolute():
        return path
    return str((ROOT / path).resolve())


def load_float(path: Path, recipe: Recipe):
    from slim.model import load_model

    model = load_model(path)
    if recipe.model.max_new_tokens is not None:
        model.generation_config.max_new_tokens = recipe.model.max_new_tokens
    return model


def stage_dir(ctx: RunContext, stage: StageConfig) -> Path:
    i = ctx.recipe.stages.index(stage) + 1
    return ctx.out / f"{i:02d}-{stage.name}"


def say(state: PartialState, msg: str) -> None:
    if state.is_main_process:
        print(msg, flush=True)


def from_main(state: PartialState, fn):
    """fn() computed on the main process, its result sent to every process."""
    from accelerate.utils import broadcast_object_list

    box = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


def save_final(ctx: RunContext, model, model_out: Path, quant=None) -> None:
    """Called by every process: the main one writes the stage's model, the others wait for it."""
    from slim.model import save_model

    if ctx.state.is_main_process:
        save_model(model, model_out, processor=ctx.processor, quant=quant)
    ctx.state.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# data and training


def train_dataset(ctx: RunContext, limit: int | None = None, features: bool = True, augment=None, seed: int = 0):
    """The recipe's training data, read lazily (slim.data.open_train_source): decoded and featurized in the
    DataLoader workers as batches are drawn; `features=False` leaves the features to the training device.
    `augment` (a stage's `train.augment`, drawn from `seed`) transforms the waveforms; calibration passes
    none and reads the audio as it is."""
    from slim.data import open_train_source

    if ctx.train_data is None:
        raise RunError("this stage trains but the recipe has no training data (data.train or data.synth)")
    ds, skipped = open_train_source(ctx.train_data, ctx.processor, limit=limit or ctx.recipe.data.max_train,
                                    features=features, augment=augment, seed=seed)
    if skipped.total:
        log.warning("training data: skipped %d bad entries while indexing (%s)", skipped.total, skipped.as_dict())
    return ds, skipped


def calibration_batches(ctx: RunContext, n_batches: int, batch_size: int = 4):
    """The first n_batches x batch_size good training examples, collated (bad items are skipped and
    counted, as in training)."""
    from slim.data import make_collator

    collate = make_collator(ctx.processor)
    ds, _ = train_dataset(ctx)
    items = iter(ds) if isinstance(ds, torch.utils.data.IterableDataset) else (ds[i] for i in range(len(ds)))
    good = (x for x in items if "skip" not in x)
    batches = []
    for _ in range(n_batches):
        chunk = list(itertools.islice(good, batch_size))
        if not chunk:
            break
        batches.append({k: v for k, v in collate(chunk).items() if k in ("input_features", "labels", "audio_frames")})
    return batches


def eval_fn(ctx: RunContext):
    """WER on (a slice of) the main eval set during training, on the main process."""
    from eval.run import evaluate_loaded

    limit = min(ctx.recipe.data.max_eval or 64, 64)

    def fn(model):
        r = evaluate_loaded(model, ctx.processor, ctx.eval_sets["eval"], limit=limit, time_it=False,
                            max_new_tokens=ctx.recipe.model.max_new_tokens)
        return {"wer": r["wer"]}

    return fn


def input_teacher(stage: StageConfig, model):
    """A frozen copy of the stage's input model when the stage distils from it (`teacher: input`); taken
    before the stage changes the model (QAT's fake quant), so the teacher is the float input itself."""
    if stage.teacher != "input":
        return None
    import copy

    t = copy.deepcopy(model).eval()
    t.requires_grad_(False)
    return t


def fit(ctx: RunContext, stage: StageConfig, model, sdir: Path, quant=None, teacher=None):
    """Train `model` in place with `stage.train`; called by every process (the training is collective).
    `teacher`: the `teacher: input` copy when the caller took it before changing the model."""
    from slim.data import DeviceFeatures, make_collator
    from slim.model import save_model
    from train.loop import train

    on_device = stage.train.features == "device"
    ds, _ = train_dataset(ctx, features=not on_device, augment=stage.train.augment, seed=stage.train.seed)
    if stage.teacher == "input":
        teacher_model = teacher if teacher is not None else input_teacher(stage, model)
    else:
        teacher_model = ctx.teacher() if stage.teacher == "dense" else None
    quant_dict = quant.to_dict() if quant is not None else None
    on_step_state = None
    if quant is not None and quant.freeze_observers_after is not None:
        from qat.prepare import maybe_freeze_observers

        def on_step_state(step):  # before the step's checkpoint, so a resumed run restores frozen observers
            maybe_freeze_observers(model, quant, step)

    def save_fn(m, d):
        save_model(m, d, processor=ctx.processor, quant=quant_dict)

    result = train(model, stage.train, ds, make_collator(ctx.processor), out_dir=sdir,
                   teacher=teacher_model, eval_fn=eval_fn(ctx), resume=ctx.resume, stage_name=stage.name,
                   tracker_config=ctx.recipe.tracking, save_fn=save_fn, on_step_state=on_step_state,
                   device_features=DeviceFeatures(ctx.processor) if on_device else None)
    return result
