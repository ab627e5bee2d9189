"""The stage runner: a recipe's stages in order, each reading the previous stage's model directory.

Layout of OUTPUT_DIR:
    recipe.yaml              the resolved recipe (what actually ran)
    00-base/model/           the imported base model (the dense teacher)
    NN-<stage>/model/        the stage's output model (eval stages have none)
    NN-<stage>/checkpoints/  trainer checkpoints (recover / qat)
    NN-<stage>/stage.json    the stage's report entry; written last, it marks the stage finished
    report.json, report.md, report.png

A finished stage is never redone: `--resume` skips every stage with a `stage.json` and continues the
first unfinished one (trainer stages from their last complete checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from train.recipe import DataConfig, Recipe, StageConfig, recipe_to_yaml

log = logging.getLogger("whisper_slim")
ROOT = Path(__file__).resolve().parent.parent
STAGE_FILE = "stage.json"


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
    _teacher: object = None

    def teacher(self):
        if self._teacher is None:
            self._teacher = _load_float(self.base_dir, self.recipe).eval()
            for p in self._teacher.parameters():
                p.requires_grad_(False)
        return self._teacher


def _resolve(path: str | None) -> str | None:
    """Recipe paths are relative to the repository root (hf: specs pass through)."""
    if path is None or path.startswith("hf:") or Path(path).is_absolute():
        return path
    return str((ROOT / path).resolve())


def _load_float(path: Path, recipe: Recipe):
    from slim.model import load_model

    model = load_model(path)
    if recipe.model.max_new_tokens is not None:
        model.generation_config.max_new_tokens = recipe.model.max_new_tokens
    return model


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# setup


def _extra_eval_sets(data: DataConfig) -> dict[str, str]:
    """The recipe's extra eval sets, resolved: every `extra_eval` entry, and the `optional_eval` entries
    whose path exists here (a missing one is skipped with a warning, and the report has no column for it)."""
    sets = {k: _resolve(v) for k, v in data.extra_eval.items()}
    for name, path in data.optional_eval.items():
        local = _resolve(path)
        if Path(local).exists():
            sets[name] = local
        else:
            log.warning("data.optional_eval.%s: %s is not present; not evaluated", name, local)
    return sets


def _prepare_data(recipe: Recipe, state: PartialState) -> tuple[str | None, dict[str, str]]:
    data = recipe.data
    train, main_eval = _resolve(data.train), _resolve(data.eval)
    if data.synth is not None:
        from slim.synth import build_synthetic

        s = data.synth
        with state.main_process_first():  # one process voices the audio; the others reuse it
            paths = build_synthetic(
                train_text=[_resolve(t) for t in s.train_text], eval_text=[_resolve(t) for t in s.eval_text],
                out_dir=_resolve(s.out), train_voices=s.train_voices, eval_voices=s.eval_voices,
                train_limit=s.train_limit, eval_limit=s.eval_limit, seed=s.seed,
            )
        train = train or str(paths["train"])
        main_eval = main_eval or str(paths["eval"])
    return train, {"eval": main_eval, **_extra_eval_sets(data)}


def _import_base(recipe: Recipe, out: Path, state: PartialState) -> Path:
    base = out / "00-base" / "model"
    if (base / "config.json").exists():
        return base
    with state.main_process_first():
        if state.is_main_process and not (base / "config.json").exists():
            src = recipe.model.source
            if src == "random-tiny":
                from slim.model import install_explicit_attention, save_model
                from slim.sources import tiny_random_processor, tiny_random_whisper

                torch.manual_seed(recipe.seed)
                model = install_explicit_attention(tiny_random_whisper(seed=recipe.seed))
                save_model(model, base, processor=tiny_random_processor())
            else:
                from slim.sources import import_model

                local = _resolve(src)
                import_model(local if local and Path(local).exists() else src, base)
    return base


# ---------------------------------------------------------------------------------------------
# stages


def _train_dataset(ctx: RunContext, limit: int | None = None):
    from slim.data import SpeechDataset, load_examples

    if ctx.train_data is None:
        raise RunError("this stage trains but the recipe has no training data (data.train or data.synth)")
    examples, skipped = load_examples(ctx.train_data, tokenizer=ctx.processor.tokenizer,
                                      limit=limit or ctx.recipe.data.max_train)
    if skipped.total:
        log.warning("training data: skipped %d bad items (%s)", skipped.total, skipped.as_dict())
    return SpeechDataset(examples, ctx.processor), skipped


def _calibration_batches(ctx: RunContext, n_batches: int, batch_size: int = 4):
    from slim.data import make_collator

    ds, _ = _train_dataset(ctx, limit=n_batches * batch_size)
    collate = make_collator(ctx.processor)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    return [b for _, b in zip(range(n_batches), loader)]


def _eval_fn(ctx: RunContext):
    """WER on (a slice of) the main eval set during training, on the main process."""
    from eval.run import evaluate_loaded

    limit = min(ctx.recipe.data.max_eval or 64, 64)

    def fn(model):
        r = evaluate_loaded(model, ctx.processor, ctx.eval_sets["eval"], limit=limit, time_it=False,
                            max_new_tokens=ctx.recipe.model.max_new_tokens)
        return {"wer": r["wer"]}

    return fn


def _input_teacher(stage: StageConfig, model):
    """A frozen copy of the stage's input model when the stage distils from it (`teacher: input`); taken
    before the stage changes the model (QAT's fake quant), so the teacher is the float input itself."""
    if stage.teacher != "input":
        return None
    import copy

    t = copy.deepcopy(model).eval()
    t.requires_grad_(False)
    return t


def _fit(ctx: RunContext, stage: StageConfig, model, sdir: Path, quant=None, input_teacher=None):
    from slim.data import make_collator
    from slim.model import save_model
    from train.loop import train

    ds, _ = _train_dataset(ctx)
    if stage.teacher == "input":
        teacher_model = input_teacher if input_teacher is not None else _input_teacher(stage, model)
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
                   teacher=teacher_model, eval_fn=_eval_fn(ctx), resume=ctx.resume, stage_name=stage.name,
                   tracker_config=ctx.recipe.tracking, save_fn=save_fn, on_step_state=on_step_state)
    return result


def _run_stage(ctx: RunContext, stage: StageConfig, prev: Path, sdir: Path) -> Path:
    """Run one stage; returns the directory holding the stage's output model."""
    model_out = sdir / "model"
    kind = stage.kind
    if kind == "eval":
        return prev
    if kind == "prune":
        from prune.apply import prune_model
        from prune.importance import compute_scores
        from slim.model import save_model

        p = stage.prune
        main = ctx.state.is_main_process
        if p.schedule == "gradual":  # its recovery rounds train on every process: all prune the same model
            model = _load_float(prev, ctx.recipe)
            batches = _calibration_batches(ctx, p.calibration_batches) if main and p.criterion == "taylor" else None
            _gradual_prune(ctx, stage, model, batches, sdir)
            _save_final(ctx, model, model_out)
            return model_out
        if main:
            model = _load_float(prev, ctx.recipe)
            batches = _calibration_batches(ctx, p.calibration_batches) if p.criterion == "taylor" else None
            reference = _repair_reference(stage, model)
            prune_model(model, compute_scores(model, p.criterion, batches=batches, seed=p.seed), p.selection)
            _repair(ctx, stage, model, reference, sdir)
            save_model(model, model_out, processor=ctx.processor)
        ctx.state.wait_for_everyone()
        return model_out
    if kind == "recover":
        model = _load_float(prev, ctx.recipe)
        _fit(ctx, stage, model, sdir)
        _save_final(ctx, model, model_out)
        return model_out
    if kind in ("qat", "ptq"):
        from qat.prepare import calibrate, freeze_observers, prepare_qat, round_float_weights_fp16

        model = _load_float(prev, ctx.recipe)
        quant, n = stage.quant, stage.quant.calibration_batches
        # keep_float: the scan measures on as many batches again, read in the same pass
        loaded = _calibration_batches(ctx, 2 * n if quant.keep_float else n)
        batches = loaded[:n]
        if quant.keep_float:
            quant = _keep_sensitive_float(ctx, quant, model, batches, loaded[n:], sdir)
        teacher = _input_teacher(stage, model) if kind == "qat" else None  # the float input, before fake quant
        prepare_qat(model, quant)
        calibrate(model, batches)
        if kind == "ptq":
            freeze_observers(model)
        else:
            _fit(ctx, stage, model, sdir, quant=quant, input_teacher=teacher)
            freeze_observers(model)
        round_float_weights_fp16(model)  # what the export ships: evaluate exactly that
        _save_final(ctx, model, model_out, quant=quant.to_dict())
        return model_out
    if kind == "convert":
        from qat.convert import convert_to_int8, save_int8_model
        from qat.prepare import load_quantized_model

        if ctx.state.is_main_process:
            qmodel = load_quantized_model(prev)
            save_int8_model(convert_to_int8(qmodel), model_out, processor=ctx.processor)
        ctx.state.wait_for_everyone()
        return model_out
    if kind == "export":
        from qat.onnx_export import export_model

        if ctx.state.is_main_process:
            export_model(_qat_source(ctx, stage, prev), model_out, mode=stage.export_mode)
        ctx.state.wait_for_everyone()
        return model_out
    raise RunError(f"unknown stage kind {kind}")


def _repair_reference(stage: StageConfig, model):
    """The unpruned input model the repair fits to (a copy), or None when the stage does not repair."""
    r = stage.prune.repair
    if r is None or not r.enabled:
        return None
    import copy

    return copy.deepcopy(model).eval()


def _repair(ctx: RunContext, stage: StageConfig, model, reference, sdir: Path, every_process: bool = False) -> None:
    """Refit the pruned model's consumers to `reference` on calibration data; the per-layer errors go to
    repair.json in the stage folder. `every_process`: called by all processes (gradual pruning), the main
    one refits and the others receive its weights; otherwise called on the main process alone."""
    if reference is None:
        return
    from prune.repair import consumers, repair_model

    def fit():
        r = stage.prune.repair
        report = repair_model(model, reference, _calibration_batches(ctx, r.calibration_batches), ridge=r.ridge,
                              target=r.target)
        _atomic_json(sdir / "repair.json", report)
        worst = max(report, key=lambda x: x["rel_err_before"])
        _say(ctx.state, f"[repair] {len(report)} layers refit; worst {worst['layer']}: relative error "
                        f"{worst['rel_err_before']:.4f} -> {worst['rel_err_after']:.4f}")
        return {f"{n}.{k}": v.detach().cpu() for n, lin in consumers(model) for k, v in lin.state_dict().items()}

    if not every_process:
        fit()
        return
    refit = _from_main(ctx.state, fit)
    if not ctx.state.is_main_process:
        with torch.no_grad():
            for n, lin in consumers(model):
                for k, v in lin.state_dict().items():
                    v.copy_(refit[f"{n}.{k}"])


def _keep_sensitive_float(ctx: RunContext, quant, model, batches: list[dict], held_out: list[dict], sdir: Path):
    """The stage's QuantConfig with the `keep_float` most sensitive units added to `exclude`.

    The scan calibrates on the stage's calibration batches and measures the teacher-forced loss on
    `held_out` (the batches that follow them in the training set; the calibration ones if the set is too
    small). Its table is written to the stage folder (sensitivity.md for people, sensitivity.json to reuse
    on --resume: the scan is deterministic but not free)."""
    import dataclasses

    from qat.sensitivity import most_sensitive, ranked_units, sensitivity_scan, to_markdown

    saved = sdir / "sensitivity.json"
    # One process scans and writes; every process then reads the written table, so all quantize the same
    # units (a scan per process could rank near-ties differently) and no process reads a table half-made.
    if ctx.state.is_main_process and not saved.exists():
        table = sensitivity_scan(model, quant, batches, eval_batches=held_out or batches, by=quant.sensitivity_by)
        (sdir / "sensitivity.md").write_text(to_markdown(table))
        _atomic_json(saved, table)
    ctx.state.wait_for_everyone()
    table = json.loads(saved.read_text())
    _say(ctx.state, f"[sensitivity] kept in float: {', '.join(r['unit'] for r in ranked_units(table)[:quant.keep_float])}")
    new = [p for p in most_sensitive(table, quant.keep_float) if p not in quant.exclude]
    return dataclasses.replace(quant, exclude=list(quant.exclude) + new)


def _qat_source(ctx: RunContext, stage: StageConfig, prev: Path) -> Path:
    """Export reads the fake-quant (or float) model: skip back over a convert stage's INT8 output, along
    this stage's input chain (so a branch exports its own QAT/PTQ model)."""
    from slim.model import read_structure

    s = read_structure(prev)
    if s is None or s.quant is None or not s.quant.get("converted"):
        return prev
    stages = ctx.recipe.stages
    for i in ctx.recipe.lineage(stages.index(stage)):
        d = _stage_dir(ctx, stages[i]) / "model"
        rs = read_structure(d) if d.exists() else None
        if rs is not None and rs.quant is not None and not rs.quant.get("converted"):
            return d
    raise RunError(f"stages.{stage.name}: found no fake-quant model before the convert stage to export")


def _save_final(ctx: RunContext, model, model_out: Path, quant=None) -> None:
    from slim.model import save_model

    if ctx.state.is_main_process:
        save_model(model, model_out, processor=ctx.processor, quant=quant)
    ctx.state.wait_for_everyone()


def _gradual_prune(ctx: RunContext, stage: StageConfig, model, batches, sdir: Path) -> None:
    """Reach the target in `iterations` equal steps, recovering `recover_steps` after each but the last.

    Runs on every process (the rounds' training is collective): the main process scores, every process
    applies the same selection to its copy of the same model. `batches` are needed on the main process only.
    """
    import dataclasses

    from prune.apply import prune_model
    from prune.importance import compute_scores
    from train.loop import TrainConfig

    p = stage.prune
    for it in range(1, p.iterations + 1):
        frac = it / p.iterations
        sel = p.selection.scaled(frac)
        scores = _from_main(ctx.state, lambda: compute_scores(model, p.criterion, batches=batches, seed=p.seed + it))
        reference = _repair_reference(stage, model)
        prune_model(model, scores, sel)
        _repair(ctx, stage, model, reference, sdir, every_process=True)
        log.info("gradual prune %d/%d: %s", it, p.iterations, sel)
        if it < p.iterations and p.recover_steps > 0:
            cfg = dataclasses.replace(stage.train or TrainConfig(), max_steps=p.recover_steps)
            sub = dataclasses.replace(stage, train=cfg, name=f"{stage.name}-round{it}")
            _fit(ctx, sub, model, sdir / f"round{it}")


def _from_main(state: PartialState, fn):
    """fn() computed on the main process, its result sent to every process."""
    from accelerate.utils import broadcast_object_list

    box = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


def _stage_dir(ctx: RunContext, stage: StageConfig) -> Path:
    i = ctx.recipe.stages.index(stage) + 1
    return ctx.out / f"{i:02d}-{stage.name}"


def _evaluate(ctx: RunContext, stage: StageConfig, model_dir: Path) -> dict:
    from eval.run import evaluate_model

    entry = {"stage": stage.name, "kind": stage.kind, "model_dir": str(model_dir)}
    # The engines set torch's threads process-wide; the next stage trains with the process's own count
    # again, so a stage computes the same bits whether or not this process evaluated before it (a resumed
    # run skips the finished stages' evaluations).
    threads = torch.get_num_threads()
    try:
        for name, data in ctx.eval_sets.items():
            r = evaluate_model(model_dir, data, engine=stage.engine, limit=ctx.recipe.data.max_eval,
                               threads=ctx.recipe.eval.threads, batch_size=ctx.recipe.eval.batch_size,
                               max_new_tokens=ctx.recipe.model.max_new_tokens)
            if name == "eval":
                entry.update(r)
            else:
                entry.setdefault("extra", {})[name] = {k: r[k] for k in ("wer", "cer", "utterances", "skipped",
                                                                         "seconds_per_utterance")}
    finally:
        torch.set_num_threads(threads)
    return entry


# ---------------------------------------------------------------------------------------------
# the run


def run_recipe(recipe: Recipe, recipe_path: str | None = None, overrides=None, resume: bool = False,
               state: PartialState | None = None) -> list[dict]:
    """Run the recipe's stages in order on every process of `state` (default: distributed_state()); the
    process group stays up across stages and is the caller's to destroy."""
    from train.loop import distributed_state

    state = state or distributed_state()  # CPU-aware: N processes without a GPU form one gloo group
    out = Path(_resolve(recipe.output_dir))
    finished = sorted(out.glob(f"*/{STAGE_FILE}")) if out.exists() else []
    if finished and not resume:
        raise RunError(f"{out} already holds a run ({len(finished)} finished stages); pass --resume to "
                       "continue it, or set output_dir to a new folder")
    torch.manual_seed(recipe.seed)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(
            f"# resolved from {recipe_path} {' '.join(overrides or [])}\n" + recipe_to_yaml(recipe))
    state.wait_for_everyone()

    t0 = time.time()
    train_data, eval_sets = _prepare_data(recipe, state)
    base = _import_base(recipe, out, state)
    from slim.model import load_processor

    ctx = RunContext(recipe=recipe, out=out, resume=resume, state=state, train_data=train_data,
                     eval_sets=eval_sets, base_dir=base, processor=load_processor(base))

    entries: list[dict] = []
    prev = base
    outputs: dict[str, Path] = {}  # stage name -> its output model, for `input:`
    for stage in recipe.stages:
        if stage.input is not None:
            prev = outputs[stage.input]
        sdir = _stage_dir(ctx, stage)
        done = sdir / STAGE_FILE
        if done.exists():
            entry = json.loads(done.read_text())
            entries.append(entry)
            prev = outputs[stage.name] = Path(entry["model_dir"])
            _say(state, f"[{stage.name}] already finished: WER {entry.get('wer', float('nan')):.4f} (skipped)")
            continue
        sdir.mkdir(parents=True, exist_ok=True)
        ts = time.time()
        _say(state, f"[{stage.name}] {stage.kind} ...")
        model_dir = _run_stage(ctx, stage, prev, sdir)
        if state.is_main_process:
            entry = _evaluate(ctx, stage, model_dir) if stage.evaluate else \
                {"stage": stage.name, "kind": stage.kind, "model_dir": str(model_dir)}
            entry["stage_seconds"] = round(time.time() - ts, 1)
            _atomic_json(done, entry)
            entries.append(entry)
            _write_reports(out, entries)
            _say(state, _summary(entry))
        state.wait_for_everyone()
        if not state.is_main_process:
            entries.append(json.loads(done.read_text()))
        prev = outputs[stage.name] = model_dir
    _say(state, f"done in {time.time() - t0:.0f} s: {out / 'report.md'}")
    return entries


def _summary(e: dict) -> str:
    if "wer" not in e:
        return f"[{e['stage']}] done in {e['stage_seconds']} s"
    extra = "".join(f", {k} WER {v['wer']:.4f}" for k, v in e.get("extra", {}).items())
    return (f"[{e['stage']}] WER {e['wer']:.4f}{extra}, {e['model_bytes'] / 1e6:.1f} MB, "
            f"{e['seconds_per_utterance']:.3f} s/utt, {e.get('skipped', 0)} skipped, {e['stage_seconds']} s")


def _say(state: PartialState, msg: str) -> None:
    if state.is_main_process:
        print(msg, flush=True)


def _write_reports(out: Path, entries: list[dict]) -> None:
    from eval.report import write_comparison

    _atomic_json(out / "report.json", entries)
    rows = [dict(e, variant=e["stage"]) for e in entries if "wer" in e]
    if rows:
        write_comparison(rows, out, title=f"whisper-slim run: {out.name}")
