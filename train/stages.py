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

Each stage kind is a function in `STAGE_KINDS` (the prune stage in `train/prune_stage.py`, the
quantization stages in `train/quant_stage.py`); `_on_every_process` is the one place that says which
kinds run on every process and which on the main process alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState

from slim.io import atomic_write_json
from train import prune_stage, quant_stage
from train.context import RunContext, RunError, fit, load_float, resolve, save_final, say, stage_dir
from train.recipe import DataConfig, Recipe, StageConfig, recipe_to_yaml

log = logging.getLogger("whisper_slim")
STAGE_FILE = "stage.json"


# ---------------------------------------------------------------------------------------------
# setup


def _extra_eval_sets(data: DataConfig) -> dict[str, str]:
    """The recipe's extra eval sets, resolved: every `extra_eval` entry, and the `optional_eval` entries
    whose path exists here (a missing one is skipped with a warning, and the report has no column for it)."""
    sets = {k: resolve(v) for k, v in data.extra_eval.items()}
    for name, path in data.optional_eval.items():
        local = resolve(path)
        if Path(local).exists():
            sets[name] = local
        else:
            log.warning("data.optional_eval.%s: %s is not present; not evaluated", name, local)
    return sets


def _prepare_data(recipe: Recipe, state: PartialState) -> tuple[str | None, dict[str, str]]:
    data = recipe.data
    train, main_eval = resolve(data.train), resolve(data.eval)
    if data.synth is not None:
        from slim.synth import build_synthetic

        s = data.synth
        with state.main_process_first():  # one process voices the audio; the others reuse it
            paths = build_synthetic(
                train_text=[resolve(t) for t in s.train_text], eval_text=[resolve(t) for t in s.eval_text],
                out_dir=resolve(s.out), train_voices=s.train_voices, eval_voices=s.eval_voices,
                train_limit=s.train_limit, eval_limit=s.eval_limit, seed=s.seed,
                short_fraction=s.short_fraction, long_fraction=s.long_fraction,
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

                local = resolve(src)
                import_model(local if local and Path(local).exists() else src, base)
    return base


# ---------------------------------------------------------------------------------------------
# stages


def _recover(ctx: RunContext, stage: StageConfig, prev: Path, model_out: Path) -> None:
    model = load_float(prev, ctx.recipe)
    fit(ctx, stage, model, model_out.parent)
    save_final(ctx, model, model_out)


def _audio_context(ctx: RunContext, stage: StageConfig, prev: Path, model_out: Path) -> None:
    """Fine-tune the input to encode windows sized to the audio (`slim.model.window_frames`), distilled from
    a model on the full 30 s window: the input itself (`teacher: input`, the usual choice: the stage
    should change how the model encodes, not what it says) or the dense base."""
    from slim.model import audio_window_of, set_audio_window
    from train.context import input_teacher

    model = load_float(prev, ctx.recipe)
    if audio_window_of(model) is not None:
        raise RunError(f"stages.{stage.name}: its input already encodes audio windows; one audio-context stage "
                       "per lineage")
    teacher = input_teacher(stage, model)  # before the window is set: the teacher sees 30 s
    set_audio_window(model, stage.audio_window.as_dict())
    fit(ctx, stage, model, model_out.parent, teacher=teacher)
    save_final(ctx, model, model_out)


def _interpolate(ctx: RunContext, stage: StageConfig, prev: Path, model_out: Path) -> None:
    """WiSE-FT (Wortsman et al. 2022): the weights (1 - alpha) * base + alpha * input for each alpha, each
    evaluated on the `select_on` set; the lowest WER is the stage's model (ties go to the larger alpha, the
    trained end). Every candidate's WER goes to interpolate.json."""
    from eval.run import evaluate_model
    from slim.model import save_model

    cfg = stage.interpolate
    name = cfg.select_on if cfg.select_on in ctx.eval_sets else "eval"
    if name != cfg.select_on:
        log.warning("stages.%s.interpolate.select_on: %s is not present here; selecting on eval", stage.name,
                    cfg.select_on)
    trained, base = load_float(prev, ctx.recipe), load_float(ctx.outputs[cfg.base], ctx.recipe)
    # copies: loading each blend into `trained` writes through its own state_dict's tensors
    theta0, theta1 = base.state_dict(), {k: v.detach().clone() for k, v in trained.state_dict().items()}
    if {k: v.shape for k, v in theta0.items()} != {k: v.shape for k, v in theta1.items()}:
        raise RunError(f"stages.{stage.name}.interpolate.base: {cfg.base}'s model has other shapes than the input "
                       "(interpolate between models of one structure, e.g. a pruned model and its recovery)")
    tried, best = [], None
    sdir = model_out.parent
    for alpha in sorted(cfg.alphas):
        trained.load_state_dict({k: torch.lerp(theta0[k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point()
                                 else v for k, v in theta1.items()})
        cand = sdir / "candidates" / f"alpha-{alpha:g}"
        save_model(trained, cand, processor=ctx.processor)
        r = evaluate_model(cand, ctx.eval_sets[name], limit=ctx.recipe.data.max_eval, threads=ctx.recipe.eval.threads,
                           batch_size=ctx.recipe.eval.batch_size, max_new_tokens=ctx.recipe.model.max_new_tokens)
        tried.append({"alpha": alpha, "wer": r["wer"]})
        say(ctx.state, f"[{stage.name}] alpha {alpha:g}: {name} WER {r['wer']:.4f}")
        if best is None or r["wer"] <= best[1]:
            best = (cand, r["wer"], alpha)
    atomic_write_json(sdir / "interpolate.json", {"select_on": name, "base": cfg.base, "tried": tried,
                                                  "alpha": best[2]})
    if model_out.exists():
        shutil.rmtree(model_out)
    best[0].rename(model_out)
    shutil.rmtree(sdir / "candidates")


STAGE_KINDS: dict[str, Callable[[RunContext, StageConfig, Path, Path], None] | None] = {
    "eval": None,  # evaluates its input model and writes none
    "prune": prune_stage.run,
    "recover": _recover,
    "audio-context": _audio_context,
    "interpolate": _interpolate,
    "qat": quant_stage.run_qat,
    "ptq": quant_stage.run_qat,
    "convert": quant_stage.run_convert,
    "export": quant_stage.run_export,
}
"""Stage kind -> `run(ctx, stage, prev, model_out)`, which writes the stage's model to `model_out` (inside
the stage folder) from the model directory `prev`."""


def _on_every_process(stage: StageConfig) -> bool:
    """The distributed rule of every kind. Stages that train (recover, qat, gradual pruning's recovery
    rounds, audio-context) run on every process, each on its shard of the data, and ptq goes the same way as qat; they
    write their model from the main process (`save_final`). The others (one-shot prune, convert, export)
    run on the main process alone while the rest wait."""
    if stage.kind == "prune":
        return prune_stage.on_every_process(stage)
    return stage.kind in ("recover", "audio-context", "qat", "ptq")


def _run_stage(ctx: RunContext, stage: StageConfig, prev: Path, sdir: Path) -> Path:
    """Run one stage; returns the directory holding the stage's output model."""
    if stage.kind not in STAGE_KINDS:
        raise RunError(f"unknown stage kind {stage.kind}")
    run = STAGE_KINDS[stage.kind]
    if run is None:
        return prev
    model_out = sdir / "model"
    if _on_every_process(stage):
        run(ctx, stage, prev, model_out)
    else:
        if ctx.state.is_main_process:
            run(ctx, stage, prev, model_out)
        ctx.state.wait_for_everyone()
    return model_out


# what a run's report keeps of each extra eval set: the hypotheses so that `./launch.sh compare
# report.json:STAGE:SET` can pair any two stages, the failure counts so that report.md shows them per set
_EXTRA_KEYS = ("wer", "cer", "utterances", "skipped", "skipped_by_reason", "failures", "seconds_per_utterance",
               "hypotheses")


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
                entry.setdefault("extra", {})[name] = {k: r[k] for k in _EXTRA_KEYS}
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
    out = Path(resolve(recipe.output_dir))
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
    outputs = ctx.outputs  # stage name -> its output model, for `input:`
    for stage in recipe.stages:
        if stage.input is not None:
            prev = outputs[stage.input]
        sdir = stage_dir(ctx, stage)
        done = sdir / STAGE_FILE
        if done.exists():
            entry = json.loads(done.read_text())
            entries.append(entry)
            prev = outputs[stage.name] = Path(entry["model_dir"])
            say(state, f"[{stage.name}] already finished: WER {entry.get('wer', float('nan')):.4f} (skipped)")
            continue
        sdir.mkdir(parents=True, exist_ok=True)
        ts = time.time()
        say(state, f"[{stage.name}] {stage.kind} ...")
        model_dir = _run_stage(ctx, stage, prev, sdir)
        if state.is_main_process:
            entry = _evaluate(ctx, stage, model_dir) if stage.evaluate else \
                {"stage": stage.name, "kind": stage.kind, "model_dir": str(model_dir)}
            entry["stage_seconds"] = round(time.time() - ts, 1)
            atomic_write_json(done, entry)
            entries.append(entry)
            _write_reports(out, entries)
            say(state, _summary(entry))
        state.wait_for_everyone()
        if not state.is_main_process:
            entries.append(json.loads(done.read_text()))
        prev = outputs[stage.name] = model_dir
    say(state, f"done in {time.time() - t0:.0f} s: {out / 'report.md'}")
    return entries


def _summary(e: dict) -> str:
    if "wer" not in e:
        return f"[{e['stage']}] done in {e['stage_seconds']} s"
    extra = "".join(f", {k} WER {v['wer']:.4f}" for k, v in e.get("extra", {}).items())
    return (f"[{e['stage']}] WER {e['wer']:.4f}{extra}, {e['model_bytes'] / 1e6:.1f} MB, "
            f"{e['seconds_per_utterance']:.3f} s/utt, {e.get('skipped', 0)} skipped, {e['stage_seconds']} s")


def _write_reports(out: Path, entries: list[dict]) -> None:
    from eval.report import write_comparison

    atomic_write_json(out / "report.json", entries)
    rows = [dict(e, variant=e["stage"]) for e in entries if "wer" in e]
    if rows:
        write_comparison(rows, out, title=f"whisper-slim run: {out.name}")
