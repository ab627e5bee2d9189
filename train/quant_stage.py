"""The quantization stages: qat (fake quant + training), ptq (fake quant, calibration only), convert
(true INT8 torch) and export (ONNX), each from the previous stage's model directory.

qat and ptq are called by every process (qat trains collectively, and ptq runs the same function);
convert and export by the main process alone. `train/stages.py` decides which.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from slim.io import atomic_write_json
from train.context import (RunContext, RunError, calibration_batches, fit, input_teacher, load_float,
                           save_final, say, stage_dir)
from train.recipe import StageConfig


def run_qat(ctx: RunContext, stage: StageConfig, prev: Path, model_out: Path) -> None:
    """Fake-quantize the input, calibrate the observers; for `qat` then train with the quantizers in the
    loop. The float weights are rounded to fp16 last, as the export ships them, so the stage's
    evaluation measures exactly what is exported."""
    from qat.prepare import calibrate, freeze_observers, prepare_qat, round_float_weights_fp16

    model = load_float(prev, ctx.recipe)
    quant, n = stage.quant, stage.quant.calibration_batches
    # keep_float: the scan measures on as many batches again, read in the same pass
    loaded = calibration_batches(ctx, 2 * n if quant.keep_float else n)
    batches = loaded[:n]
    if quant.keep_float:
        quant = keep_sensitive_float(ctx, quant, model, batches, loaded[n:], model_out.parent)
    teacher = input_teacher(stage, model) if stage.kind == "qat" else None  # the float input, before fake quant
    prepare_qat(model, quant)
    calibrate(model, batches)
    if stage.kind == "qat":
        fit(ctx, stage, model, model_out.parent, quant=quant, teacher=teacher)
    freeze_observers(model)
    round_float_weights_fp16(model)
    save_final(ctx, model, model_out, quant=quant.to_dict())


def keep_sensitive_float(ctx: RunContext, quant, model, batches: list[dict], held_out: list[dict], sdir: Path):
    """The stage's QuantConfig with the `keep_float` most sensitive units added to `exclude`.

    The scan calibrates on the stage's calibration batches and measures the teacher-forced loss on
    `held_out` (the batches that follow them in the training set; the calibration ones if the set is too
    small). Its table is written to the stage folder (sensitivity.md for people, sensitivity.json to reuse
    on --resume: the scan is deterministic but not free)."""
    from qat.sensitivity import sensitivity_scan, to_markdown, units_to_keep_float

    saved = sdir / "sensitivity.json"
    # One process scans and writes; every process then reads the written table, so all quantize the same
    # units (a scan per process could rank near-ties differently) and no process reads a table half-made.
    # A table without the units' weight counts predates them and is scanned again.
    table = None
    if ctx.state.is_main_process:
        table = json.loads(saved.read_text()) if saved.exists() else None
        if table is None or any("weights" not in r for r in table):
            table = sensitivity_scan(model, quant, batches, eval_batches=held_out or batches, by=quant.sensitivity_by)
            (sdir / "sensitivity.md").write_text(to_markdown(table))
            atomic_write_json(saved, table)
    ctx.state.wait_for_everyone()
    table = table or json.loads(saved.read_text())
    budget = None if quant.keep_float_max_mb is None else int(quant.keep_float_max_mb * 1e6)
    kept, passed = units_to_keep_float(table, quant.keep_float, budget)
    say(ctx.state, f"[sensitivity] kept in float: {', '.join(r['unit'] for r in kept) or 'nothing'}"
                   f" (+{sum(r['weights'] for r in kept) / 1e6:.2f} MB)"
                   + (f"; over the {quant.keep_float_max_mb} MB budget: {', '.join(r['unit'] for r in passed)}"
                      if passed else ""))
    new = [p for r in kept for p in r["patterns"] if p not in quant.exclude]
    return dataclasses.replace(quant, exclude=list(quant.exclude) + new)


def run_convert(ctx: RunContext, stage: StageConfig, prev: Path, model_out: Path) -> None:
    from qat.convert import convert_to_int8, save_int8_model
    from qat.prepare import load_quantized_model

    save_int8_model(convert_to_int8(load_quantized_model(prev)), model_out, processor=ctx.processor)


def run_export(ctx: RunContext, stage: StageConfig, prev: Path, model_out: Path) -> None:
    from qat.onnx_export import export_model

    window = stage.audio_window.as_dict() if stage.audio_window is not None else None
    export_model(export_source(ctx, stage, prev), model_out, mode=stage.export_mode, layout=stage.export_format,
                 uint8_weights=stage.export_uint8_weights, audio_window=window)


def export_source(ctx: RunContext, stage: StageConfig, prev: Path) -> Path:
    """Export reads the fake-quant (or float) model: skip back over a convert stage's INT8 output, along
    this stage's input chain (so a branch exports its own QAT/PTQ model)."""
    from slim.model import read_structure

    s = read_structure(prev)
    if s is None or s.quant is None or not s.quant.get("converted"):
        return prev
    stages = ctx.recipe.stages
    for i in ctx.recipe.lineage(stages.index(stage)):
        d = stage_dir(ctx, stages[i]) / "model"
        rs = read_structure(d) if d.exists() else None
        if rs is not None and rs.quant is not None and not rs.quant.get("converted"):
            return d
    raise RunError(f"stages.{stage.name}: found no fake-quant model before the convert stage to export")
