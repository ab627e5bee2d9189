"""Every recipe in the repo parses and validates; bad keys fail before any work, naming the key."""

from pathlib import Path

import pytest

from train.config_io import ConfigError
from train.recipe import Recipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))
SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"


def test_repo_has_the_named_recipes():
    assert {"quickstart.yaml", "smoke.yaml"} <= {p.name for p in RECIPES}
    assert any("gpu" in p.as_posix() for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.stages, path
    assert len({s.name for s in recipe.stages}) == len(recipe.stages)
    # the header shows the exact command that runs it (torchtune style)
    assert "./launch.sh run" in path.read_text().splitlines()[0] + path.read_text().splitlines()[1]


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def _rejected(tmp_path, stages: str, message: str) -> None:
    """BASE with `stages` appended fails to load, with `message` (a regex) naming the key."""
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, BASE + stages))


BASE = """
output_dir: /tmp/x
data: {eval: a.jsonl, train: b.jsonl}
stages:
  - {name: dense, kind: eval}
  - name: recover
    kind: recover
    train: {max_steps: 10}
"""


def test_unknown_key_is_named_with_suggestion(tmp_path):
    p = _write(tmp_path, BASE.replace("max_steps: 10", "max_stepz: 10"))
    with pytest.raises(ConfigError, match=r"unknown key 'stages\[\d+\]\.train\.max_stepz'.*max_steps"):
        load_recipe(p)


def test_mistyped_value_is_named(tmp_path):
    p = _write(tmp_path, BASE.replace("max_steps: 10", "max_steps: ten"))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.train\.max_steps: expected an integer"):
        load_recipe(p)


def test_bool_is_not_coerced_from_string(tmp_path):
    p = _write(tmp_path, BASE.replace("{name: dense, kind: eval}", "{name: dense, kind: eval, evaluate: 'no'}"))
    with pytest.raises(ConfigError, match="evaluate: expected true/false"):
        load_recipe(p)
    with pytest.raises(ConfigError, match=r"stages\[\d+\]\.export_uint8_weights: expected true/false"):
        load_recipe(SMOKE, ["stages.export.export_uint8_weights=maybe"])
    r = load_recipe(SMOKE, ["stages.export.export_uint8_weights=true"])
    assert [s.export_uint8_weights for s in r.stages if s.kind == "export"] == [True]
    with pytest.raises(ConfigError, match="export_uint8_weights needs int8 weights"):
        load_recipe(SMOKE, ["stages.export.export_uint8_weights=true", "stages.export.export_mode=float"])


def test_overrides_address_stages_by_name(tmp_path):
    p = _write(tmp_path, BASE)
    r = load_recipe(p, ["stages.recover.train.max_steps=7", "eval.threads=1"])
    assert r.stages[1].train.max_steps == 7 and r.eval.threads == 1
    with pytest.raises(ConfigError, match="no list item named 'nope'"):
        load_recipe(p, ["stages.nope.train.max_steps=7"])
    with pytest.raises(ConfigError, match="unknown key 'eval.thread'"):
        load_recipe(p, ["eval.thread=1"])


def test_stage_order_is_checked(tmp_path):
    p = _write(tmp_path, BASE + "  - {name: c, kind: convert}\n")
    with pytest.raises(ConfigError, match="convert needs a qat or ptq stage before it"):
        load_recipe(p)


def test_stage_input_must_name_an_earlier_stage_and_chains_are_checked(tmp_path):
    p = _write(tmp_path, BASE + "  - {name: q, kind: ptq, input: later}\n  - {name: later, kind: eval}\n")
    with pytest.raises(ConfigError, match=r"stages.q.input: 'later' is not an earlier stage"):
        load_recipe(p)
    # convert reads `dense` (no qat/ptq on that branch), although a ptq stage comes earlier in the list
    p = _write(tmp_path, BASE + "  - {name: q, kind: ptq}\n  - {name: c, kind: convert, input: dense}\n")
    with pytest.raises(ConfigError, match="convert needs a qat or ptq stage before it"):
        load_recipe(p)
    p = _write(tmp_path, BASE + "  - {name: q, kind: ptq, input: dense}\n  - {name: q2, kind: qat, input: recover}\n"
                                "  - {name: c, kind: convert, input: q}\n")
    r = load_recipe(p)
    assert [s.input for s in r.stages] == [None, None, "dense", "recover", "q"]
    # what each stage reads, back to the base model: convert <- q <- dense; q2 <- recover <- dense
    assert [r.lineage(i) for i in range(5)] == [[], [0], [0], [1, 0], [2, 0]]


def test_cli_takes_options_before_or_after_overrides(tmp_path, capsys):
    """`run RECIPE --resume key=value` parses (argparse alone refuses overrides after an option); a bad
    key still fails before any work, naming it."""
    from train.cli import _run

    p = _write(tmp_path, BASE)
    assert _run([str(p), "--resume", "eval.thread=1"]) == 2
    assert "unknown key 'eval.thread'" in capsys.readouterr().err
    assert _run([str(p), "eval.thread=1", "--resume"]) == 2


@pytest.mark.parametrize("quant, message", [
    ("{keep_float: -1}", r"keep_float must be an integer >= 0"),
    ("{keep_float: 1, sensitivity_by: model}", r"stages\[2\]\.quant\.sensitivity_by: 'model' is not one of"),
    ("{keep_float: 1, keep_float_max_mb: -2}", r"keep_float_max_mb must be a number of MB >= 0 or null, got -2"),
    ("{keep_float_max_mb: 2}", r"keep_float_max_mb is a budget for quant.keep_float, which is 0"),
    ("{outlier_channels: 8}", r"outlier_channels and quant.outlier_linears go together"),
    ("{outlier_channels: -1, outlier_linears: ['*.fc2']}", r"outlier_channels must be an integer >= 0"),
    ("{outlier_channels: 8, outlier_linears: '*.fc2'}", r"stages\[2\]\.quant\.outlier_linears: expected a list, got '\*.fc2'"),
])
def test_bad_quant_setting_is_named(tmp_path, quant, message):
    _rejected(tmp_path, f"  - name: q\n    kind: ptq\n    quant: {quant}\n", message)



@pytest.mark.parametrize("prune, message", [
    ("{criterion: taylor, ablation_batches: 2}", r"ablation_batches is for criterion ablation \(criterion is 'taylor'\)"),
    ("{criterion: ablation, calibration_batches: 4, ablation_batches: 5}",
     r"ablation_batches must be between 1 and calibration_batches \(4\), got 5"),
    ("{criterion: ablation, ablation_batches: 0}", r"ablation_batches must be between 1 and calibration_batches"),
    ("{criterion: ablations}", r"criterion"),
    ("{criterion: taylor_repair}", r"criterion taylor_repair scores what the repair cannot restore: set repair"),
    ("{criterion: taylor_repair, repair: {enabled: false}}", r"criterion taylor_repair .* set repair"),
    ("{repair: {pad_weight: -0.5}}", r"stages\[\d+\]\.prune\.repair.*pad_weight must be in \[0, 1\]"),
])
def test_bad_prune_setting_is_named(tmp_path, prune, message):
    _rejected(tmp_path, f"  - name: p\n    kind: prune\n    prune: {prune}\n", message)
    ok = _write(tmp_path, BASE + "  - name: p\n    kind: prune\n    prune: {criterion: ablation, ablation_batches: 2}\n")
    assert load_recipe(ok).stages[-1].prune.ablation_batches == 2


def test_bad_distill_pad_weight_is_named(tmp_path):
    stage = "  - name: r\n    kind: recover\n    train: {max_steps: 2, distill: {hidden_weight: 1, pad_weight: %s}}\n"
    _rejected(tmp_path, stage % "-0.1", r"stages\[\d+\]\.train\.distill.*pad_weight must be in \[0, 1\]")
    assert load_recipe(_write(tmp_path, BASE + stage % "0.1")).stages[-1].train.distill.pad_weight == 0.1


@pytest.mark.parametrize("augment,message", [
    ("{noise_p: 1.5}", r"stages\[\d+\]\.train\.augment: augment\.noise_p must be in \[0, 1\], got 1.5"),
    ("{snr_db: [30, 10]}", r"augment.snr_db must be \[low, high\]"),
    ("{speed: [0.9]}", r"augment.speed must be \[low, high\]"),
    ("{lowpass_hz: [3000, 9000]}", r"augment.lowpass_hz must be .* <= 8000"),
    ("{noise: 0.5}", r"unknown key 'stages\[\d+\]\.train\.augment\.noise'; did you mean .*noise_p"),
])
def test_bad_augment_setting_is_named(tmp_path, augment, message):
    stage = "  - name: r\n    kind: recover\n    train: {max_steps: 2, augment: %s}\n"
    _rejected(tmp_path, stage % augment, message)
    ok = load_recipe(_write(tmp_path, BASE + stage % "{enabled: true, rt60_s: [0.2, 0.3]}"))
    assert ok.stages[-1].train.augment.enabled and ok.stages[-1].train.augment.rt60_s == (0.2, 0.3)


def test_optional_eval_names_and_paths_are_checked(tmp_path):
    ok = BASE.replace("data: {eval: a.jsonl, train: b.jsonl}",
                      "data: {eval: a.jsonl, train: b.jsonl, extra_eval: {real: r.jsonl},\n"
                      "       optional_eval: {real_prompts: ../elsewhere/p.jsonl}}")
    r = load_recipe(_write(tmp_path, ok))
    assert r.data.extra_eval == {"real": "r.jsonl"}
    assert r.data.optional_eval == {"real_prompts": "../elsewhere/p.jsonl"}
    with pytest.raises(ConfigError, match=r"data.optional_eval.real: the name is already used by data.extra_eval"):
        load_recipe(_write(tmp_path, ok.replace("real_prompts:", "real:")))
    with pytest.raises(ConfigError, match=r"data.optional_eval.eval: the name is already used by data.eval"):
        load_recipe(_write(tmp_path, ok.replace("real_prompts:", "eval:")))
    with pytest.raises(ConfigError, match=r"data.extra_eval.eval: `eval` names the main eval set"):
        load_recipe(_write(tmp_path, ok.replace("{real: r.jsonl}", "{eval: r.jsonl}")))
    with pytest.raises(ConfigError, match=r"data.optional_eval.real_prompts: 'hf:x/y' is a datasets spec"):
        load_recipe(_write(tmp_path, ok.replace("../elsewhere/p.jsonl", "hf:x/y")))


def test_optional_eval_set_is_evaluated_when_present_and_skipped_with_a_warning_when_not(tmp_path, caplog):
    from train.recipe import DataConfig
    from train.stages import _extra_eval_sets

    there = tmp_path / "there.jsonl"
    there.write_text("")
    data = DataConfig(eval="a.jsonl", extra_eval={"real": str(tmp_path / "r.jsonl")},
                      optional_eval={"here": str(there), "gone": str(tmp_path / "gone.jsonl")})
    with caplog.at_level("WARNING", logger="whisper_slim"):
        sets = _extra_eval_sets(data)
    # extra_eval entries are kept whether or not they exist (a missing one fails where it is evaluated)
    assert sets == {"real": str(tmp_path / "r.jsonl"), "here": str(there)}
    assert [r.getMessage() for r in caplog.records] == [
        f"data.optional_eval.gone: {tmp_path / 'gone.jsonl'} is not present; not evaluated"]


def test_stage_report_keeps_every_eval_sets_failures_and_hypotheses(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from train.recipe import StageConfig
    from train.stages import _evaluate

    def fake_eval(model_dir, data, **kw):  # each set its own counts, so a mix-up shows
        n = len(data)
        return {"wer": n / 100, "cer": 0.0, "utterances": n, "skipped": 1, "skipped_by_reason": {"too long": 1},
                "failures": {"empty": 0, "short": n}, "seconds_per_utterance": 0.5, "engine": "torch",
                "hypotheses": [{"ref": "a", "hyp": data}]}

    monkeypatch.setattr("eval.run.evaluate_model", fake_eval)
    recipe = load_recipe(SMOKE)
    ctx = SimpleNamespace(recipe=recipe, eval_sets={"eval": "e.jsonl", "real": "real.jsonl"})
    entry = _evaluate(ctx, StageConfig(name="dense", kind="eval"), tmp_path)
    assert entry["wer"] == 0.07 and entry["failures"] == {"empty": 0, "short": 7}
    assert entry["extra"] == {"real": {"wer": 0.1, "cer": 0.0, "utterances": 10, "skipped": 1,
                                       "skipped_by_reason": {"too long": 1}, "failures": {"empty": 0, "short": 10},
                                       "seconds_per_utterance": 0.5, "hypotheses": [{"ref": "a", "hyp": "real.jsonl"}]}}


# What a fresh clone holds: the packages, the recipes and the data they read (no ../shared next to it).
CLONE_PARTS = ("train", "slim", "prune", "qat", "eval", "recipes", "data")
LOCAL_RECIPES = ("recipes/quickstart.yaml", "recipes/smoke.yaml", "recipes/experiments/tiny_en_prune_qat.yaml")
RESOLVE_PATHS = r"""
import json, sys
from train import context, stages
from train.recipe import load_recipe

out = {"root": str(context.ROOT)}
for path in sys.argv[1:]:
    r = load_recipe(path)
    s = r.data.synth
    out[path] = {"text": [context.resolve(t) for t in s.train_text + s.eval_text],
                 "synth_out": context.resolve(s.out), "eval_sets": stages._extra_eval_sets(r.data)}
print(json.dumps(out))
"""


def test_offline_recipes_find_their_data_in_a_clone_without_shared(tmp_path):
    """The quickstart, smoke and experiment recipes read only files inside the repository, resolved by the
    stage runner from a copy of it with nothing beside it."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    src = Path(__file__).resolve().parent.parent
    repo = tmp_path / "clone"
    for part in CLONE_PARTS:
        shutil.copytree(src / part, repo / part, ignore=shutil.ignore_patterns("__pycache__", "synth*"))
    assert not (tmp_path / "shared").exists()
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", RESOLVE_PATHS, *LOCAL_RECIPES], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["root"] == str(repo)

    text = repo / "data" / "text"
    real = repo / "data" / "real-speech" / "manifest.jsonl"
    for path in LOCAL_RECIPES:
        r = got[path]
        assert r["text"] == [str(text / "librispeech-train.txt"), str(text / "librispeech-test.txt")]
        assert all(Path(t).is_file() and Path(t).stat().st_size > 25_000 for t in r["text"])
        assert Path(r["synth_out"]).parent == repo / "data"
        assert r["eval_sets"] == ({} if path.endswith("smoke.yaml") else {"real": str(real)})
    clips = [json.loads(line)["audio"] for line in real.read_text().splitlines() if line.strip()]
    assert len(clips) == 11 and all((real.parent / c).is_file() for c in clips)
    # the quickstart reads nothing outside the repository, not even optionally (a dev set is an override)
    quick = load_recipe(src / "recipes" / "quickstart.yaml")
    assert quick.data.optional_eval == {} and "../" not in (src / "recipes" / "quickstart.yaml").read_text()
    assert "data.optional_eval" not in proc.stderr
    extra = load_recipe(src / "recipes" / "quickstart.yaml", ["data.extra_eval.real_prompts=p.jsonl"])
    assert extra.data.extra_eval == {"real": "data/real-speech/manifest.jsonl", "real_prompts": "p.jsonl"}


@pytest.mark.parametrize("fails", [False, True], ids=["finishes", "fails"])
def test_cli_run_makes_one_process_group_and_destroys_it_once(tmp_path, monkeypatch, fails):
    """The run's stages share the group the CLI made; it is destroyed at exit, also when a stage fails."""
    import train.loop
    import train.stages
    from train.cli import _run

    calls = []

    class State:
        def destroy_process_group(self):
            calls.append("destroy")

    made = State()
    monkeypatch.setattr(train.loop, "distributed_state", lambda: calls.append("create") or made)

    def run_recipe(recipe, state=None, **kwargs):
        calls.append(("run", state is made))
        if fails:
            raise RuntimeError("a stage failed")
        return []

    monkeypatch.setattr(train.stages, "run_recipe", run_recipe)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if fails:
        with pytest.raises(RuntimeError, match="a stage failed"):
            _run([str(_write(tmp_path, BASE))])
    else:
        assert _run([str(_write(tmp_path, BASE))]) == 0
    assert calls == ["create", ("run", True), "destroy"]


def test_base_recipe_ships_a_dense_and_a_pruned_int8_export_of_base():
    """recipes/base.yaml: real base, QAT distilled from itself -> QDQ INT8 export, and a pruned branch from
    dense (repair, then QAT distilled from it, export), evaluated on the real prompts when ../shared has them."""
    from train.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "base.yaml")
    assert r.model.source == "base"
    stages = {s.name: s for s in r.stages}
    assert list(stages) == ["dense", "qat", "export", "prune", "qat-pruned", "export-pruned"]
    assert stages["qat"].teacher == "input" and stages["qat"].quant.keep_float == 0  # the size bound: all int8
    assert stages["qat"].quant.conv and stages["qat-pruned"].quant.conv
    assert stages["qat"].quant.exclude == ["model.encoder.layers.*.self_attn.qk", "model.encoder.layers.*.self_attn.pv"]
    # the encoder FFN's outlier GELU channels skip the fc2 input grid in both branches (docs/base.md)
    for name in ("qat", "qat-pruned"):
        assert stages[name].quant.outlier_channels == 32
        assert stages[name].quant.outlier_linears == ["model.encoder.layers.*.fc2"]
    assert stages["prune"].input == "dense" and stages["prune"].prune.repair is not None
    # the branch holds real speech only with scores and repair on 32 batches (docs/base.md)
    assert stages["prune"].prune.calibration_batches == stages["prune"].prune.repair.calibration_batches == 32
    assert stages["qat-pruned"].teacher == "input"  # distilled from the repaired model, no recovery
    assert stages["export"].export_mode == stages["export-pruned"].export_mode == "qdq"
    assert r.data.optional_eval == {"real_prompts": "../shared/data/real-prompts/manifest.jsonl"}


def test_quickstart_recipe_cuts_what_its_readme_row_says_and_floats_the_fc2_outliers():
    """recipes/quickstart.yaml: 30% of the heads of every attention kind and a quarter of the FFN neurons (half
    the decoder's, none of the encoder's: both stacks are 1,536 wide), repaired; QAT distilled from the recovered
    model with the 16 largest input channels of every fc2 in float (docs/real-speech.md)."""
    from train.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
    stages = {s.name: s for s in r.stages}
    assert list(stages) == ["dense", "prune", "recover", "qat", "convert", "export"]
    sel = stages["prune"].prune.selection
    assert sel.head_ratio == 0.3 and sel.ffn_ratio == {"encoder": 0.0, "decoder": 0.5}
    assert stages["prune"].prune.repair is not None
    assert stages["qat"].teacher == "input"
    assert stages["qat"].quant.outlier_channels == 16
    assert stages["qat"].quant.outlier_linears == ["model.encoder.layers.*.fc2", "model.decoder.layers.*.fc2"]
    assert stages["export"].export_mode == "qdq"


@pytest.mark.parametrize("stage, message", [
    ("{name: a, kind: audio-context, audio_window: {context: silence}}", r"context: silence needs no training"),
    ("{name: e, kind: export, export_mode: float, audio_window: {margin_s: 1.0}}", r"sets only a window with context"),
    ("{name: q, kind: ptq, audio_window: {context: silence}}", r"kind ptq takes none"),
    ("{name: e, kind: export, export_mode: float, audio_window: {context: noise}}", r"context: 'noise' is not one of"),
])
def test_bad_audio_window_is_named(tmp_path, stage, message):
    _rejected(tmp_path, f"  - {stage}\n", message)
    ok = load_recipe(_write(tmp_path, BASE + "  - {name: e, kind: export, export_mode: float, "
                                             "audio_window: {context: silence, margin_s: 0.5}}\n"))
    assert ok.stages[-1].audio_window.as_dict() == {"margin_s": 0.5, "frame_multiple": 16, "context": "silence"}
