"""The prune stage: score, select and remove heads/FFN neurons (prune/), refit the consumers (repair),
and for `schedule: gradual` reach the target in rounds with recovery training between them.

`run` is called by every process when the schedule is gradual (its recovery rounds train collectively)
and by the main process alone otherwise; `train/stages.py` decides which.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from prune.repair import RepairConfig
from slim.io import atomic_write_json
from train.context import (RunContext, calibration_batches, fit, from_main, load_float, save_final,
                           say)
from train.recipe import StageConfig

log = logging.getLogger("whisper_slim")


def on_every_process(stage: StageConfig) -> bool:
    return stage.prune.schedule == "gradual"


def run(ctx: RunContext, stage: StageConfig, prev: Path, model_out: Path) -> None:
    from prune.importance import compute_scores
    from prune.select import prune_model
    from slim.model import save_model

    p = stage.prune
    sdir = model_out.parent
    model = load_float(prev, ctx.recipe)
    if on_every_process(stage):
        batches, repair_batches = stage_batches(ctx, stage) if ctx.state.is_main_process else (None, None)
        gradual_prune(ctx, stage, model, batches, sdir, repair_batches)
        save_final(ctx, model, model_out)
        return
    batches, repair_batches = stage_batches(ctx, stage)
    reference = repair_reference(stage, model)
    prune_model(model, compute_scores(model, p.criterion, batches=batches, seed=p.seed,
                                       ablation_batches=p.ablation_batches, ridge=_ridge(p)), p.selection)
    repair(ctx, stage, model, reference, repair_batches, sdir)
    save_model(model, model_out, processor=ctx.processor)


def stage_batches(ctx: RunContext, stage: StageConfig) -> tuple[list | None, list | None]:
    """(score batches, repair batches), None where the stage needs none: one read of the training set for
    both, since each is the first N calibration batches (`calibration_batches` is a prefix of its longer self)."""
    from prune.importance import DATA_CRITERIA

    p, r = stage.prune, stage.prune.repair
    n_scores = p.calibration_batches if p.criterion in DATA_CRITERIA else 0
    n_repair = r.calibration_batches if r is not None and r.enabled else 0
    pool = calibration_batches(ctx, max(n_scores, n_repair)) if n_scores or n_repair else []
    return (pool[:n_scores] if n_scores else None), (pool[:n_repair] if n_repair else None)


def _ridge(p) -> float:
    """The ridge criterion taylor_repair scores with: the repair's own (its default without one)."""
    return (p.repair or RepairConfig()).ridge


def repair_reference(stage: StageConfig, model):
    """The unpruned input model the repair fits to (a copy), or None when the stage does not repair."""
    r = stage.prune.repair
    if r is None or not r.enabled:
        return None
    return copy.deepcopy(model).eval()


def repair(ctx: RunContext, stage: StageConfig, model, reference, batches, sdir: Path,
           every_process: bool = False) -> None:
    """Refit the pruned model's consumers to `reference` on `batches` (needed on the main process only);
    the per-layer errors go to repair.json in the stage folder. `every_process`: called by all processes
    (gradual pruning), the main one refits and the others receive its weights; otherwise called on the main
    process alone."""
    if reference is None:
        return
    from prune.repair import consumers, repair_model

    def refit_on_main():
        r = stage.prune.repair
        report = repair_model(model, reference, batches, ridge=r.ridge, target=r.target, pad_weight=r.pad_weight)
        atomic_write_json(sdir / "repair.json", report)
        worst = max(report, key=lambda x: x["rel_err_before"])
        say(ctx.state, f"[repair] {len(report)} layers refit; worst {worst['layer']}: relative error "
                       f"{worst['rel_err_before']:.4f} -> {worst['rel_err_after']:.4f}")
        return {f"{n}.{k}": v.detach().cpu() for n, lin in consumers(model) for k, v in lin.state_dict().items()}

    if not every_process:
        refit_on_main()
        return
    refit = from_main(ctx.state, refit_on_main)
    if not ctx.state.is_main_process:
        with torch.no_grad():
            for n, lin in consumers(model):
                for k, v in lin.state_dict().items():
                    v.copy_(refit[f"{n}.{k}"])


def gradual_prune(ctx: RunContext, stage: StageConfig, model, batches, sdir: Path, repair_batches=None) -> None:
    """Reach the target in `iterations` equal steps, recovering `recover_steps` after each but the last.

    Runs on every process (the rounds' training is collective): the main process scores, every process
    applies the same selection to its copy of the same model. `batches` (scores) and `repair_batches` are
    needed on the main process only.
    """
    from prune.importance import compute_scores
    from prune.select import prune_model
    from train.loop import TrainConfig

    p = stage.prune
    # every round repairs towards the stage's input model, so the rounds' refits do not drift from it
    reference = repair_reference(stage, model)
    for it in range(1, p.iterations + 1):
        frac = it / p.iterations
        sel = p.selection.scaled(frac)
        scores = from_main(ctx.state, lambda: compute_scores(model, p.criterion, batches=batches, seed=p.seed + it,
                                                                  ablation_batches=p.ablation_batches,
                                                                  ridge=_ridge(p)))
        prune_model(model, scores, sel)
        repair(ctx, stage, model, reference, repair_batches, sdir, every_process=True)
        log.info("gradual prune %d/%d: %s", it, p.iterations, sel)
        if it < p.iterations and p.recover_steps > 0:
            cfg = dataclasses.replace(stage.train or TrainConfig(), max_steps=p.recover_steps)
            sub = dataclasses.replace(stage, train=cfg, name=f"{stage.name}-round{it}")
            fit(ctx, sub, model, sdir / f"round{it}")
