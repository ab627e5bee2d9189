"""kind=interpolate (WiSE-FT): every alpha's weights are the exact blend of the two models, each is
evaluated on the `select_on` set, and the lowest WER (ties: the larger alpha) becomes the stage's model."""

import json

import pytest
import torch
from accelerate import PartialState

from slim.model import load_model, save_model
from slim.sources import tiny_random_processor, tiny_random_whisper
from train import stages
from train.config_io import ConfigError, from_dict
from train.context import RunContext, RunError
from train.recipe import Recipe, load_recipe

RECIPE = """
output_dir: /tmp/x
data: {eval: a.jsonl, train: b.jsonl, extra_eval: {dev: d.jsonl}}
stages:
  - {name: dense, kind: eval}
  - name: recover
    kind: recover
    train: {max_steps: 10}
  - name: wise
    kind: interpolate
    interpolate: {base: dense, alphas: [0.0, 0.5, 1.0], select_on: dev}
"""


def _recipe(tmp_path, text=RECIPE):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return load_recipe(p)


def test_interpolate_settings_are_checked(tmp_path):
    r = _recipe(tmp_path)
    assert r.stages[2].interpolate.alphas == [0.0, 0.5, 1.0] and r.stages[2].interpolate.select_on == "dev"
    with pytest.raises(ConfigError, match=r"stages.wise.interpolate.base: 'later' is not an earlier stage"):
        _recipe(tmp_path, RECIPE.replace("base: dense", "base: later"))
    with pytest.raises(ConfigError, match=r"stages.wise.interpolate.select_on: 'real' is not an eval set "
                                          r"\(sets: \['dev', 'eval'\]\)"):
        _recipe(tmp_path, RECIPE.replace("select_on: dev", "select_on: real"))
    with pytest.raises(ConfigError, match=r"interpolate: alphas must be a non-empty list of numbers in \[0, 1\]"):
        _recipe(tmp_path, RECIPE.replace("[0.0, 0.5, 1.0]", "[0.5, 1.5]"))
    with pytest.raises(ConfigError, match=r"kind interpolate needs interpolate: \{base: STAGE\}"):
        _recipe(tmp_path, RECIPE.replace("    interpolate: {base: dense, alphas: [0.0, 0.5, 1.0], select_on: dev}\n",
                                         ""))


def test_interpolate_blends_evaluates_each_alpha_and_keeps_the_best(tmp_path, monkeypatch):
    processor = tiny_random_processor()
    a, b = tiny_random_whisper(seed=0), tiny_random_whisper(seed=1)
    save_model(a, tmp_path / "a", processor=processor)
    save_model(b, tmp_path / "b", processor=processor)
    probe = "model.decoder.layers.0.fc1.weight"
    wa, wb = a.state_dict()[probe], b.state_dict()[probe]
    seen = []

    def fake_eval(model_dir, data, **kw):  # WER by how far the blend is from alpha 0.5; 0.5 and 1.0 tie
        w = load_model(model_dir).state_dict()[probe]
        alpha = ((w - wa).norm() / (wb - wa).norm()).item()
        seen.append((round(alpha, 4), data))
        return {"wer": 0.2 if alpha > 0.25 else 0.4}

    monkeypatch.setattr("eval.run.evaluate_model", fake_eval)
    recipe = from_dict(Recipe, {"output_dir": str(tmp_path / "run"), "data": {"eval": "e.jsonl", "train": "t.jsonl",
                                                                               "extra_eval": {"dev": "d.jsonl"}},
                                "stages": [{"name": "p", "kind": "eval"},
                                           {"name": "w", "kind": "interpolate",
                                            "interpolate": {"base": "p", "alphas": [1.0, 0.0, 0.5], "select_on": "dev"}}]})
    ctx = RunContext(recipe=recipe, out=tmp_path / "run", resume=False, state=PartialState(), train_data=None,
                     eval_sets={"eval": "e.jsonl", "dev": "d.jsonl"}, base_dir=tmp_path / "a", processor=processor,
                     outputs={"p": tmp_path / "a"})
    out = tmp_path / "run" / "02-w" / "model"
    out.parent.mkdir(parents=True)
    stages._interpolate(ctx, recipe.stages[1], tmp_path / "b", out)
    assert seen == [(0.0, "d.jsonl"), (0.5, "d.jsonl"), (1.0, "d.jsonl")]  # every alpha, on the dev set
    report = json.loads((out.parent / "interpolate.json").read_text())
    assert report == {"select_on": "dev", "base": "p", "alpha": 1.0,
                      "tried": [{"alpha": 0.0, "wer": 0.4}, {"alpha": 0.5, "wer": 0.2}, {"alpha": 1.0, "wer": 0.2}]}
    got = load_model(out).state_dict()
    for k, v in b.state_dict().items():  # the tie went to alpha 1: the input model, exactly
        assert torch.equal(got[k], v), k
    assert not (out.parent / "candidates").exists()

    # a base of other shapes is refused, naming the setting
    small = tiny_random_whisper(seed=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    save_model(small, tmp_path / "small", processor=processor)
    ctx.outputs["p"] = tmp_path / "small"
    with pytest.raises(RunError, match=r"stages.w.interpolate.base: p's model has other shapes than the input"):
        stages._interpolate(ctx, recipe.stages[1], tmp_path / "b", out)
