"""The smoke recipe end to end, killed with SIGKILL in the recover and in the QAT stage and resumed, in one
process and in two (CPU gloo under `accelerate launch`).

One run, three invocations: (1) killed right after recover's step-2 checkpoint, (2) `--resume`, killed
right after qat's step-2 checkpoint, (3) `--resume` to the end. The loop's test hook (SLIM_TEST_KILL_AT)
delivers the kills at those exact points; with two processes the first kills process 1 and the second
the launcher, whose workers must die with it. Both process counts must give the same files, step counts
and report. Two processes must also end bit-identical to an uninterrupted two-process run, refuse a
resume with one process, and run a gradual prune (its recovery rounds train on both processes).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_loop import assert_same_weights, run_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"
STAGES = ["dense", "prune", "recover", "qat", "convert", "export", "ptq"]
KILLS = {1: ("recover:2", "qat:2"), 2: ("recover:2:1", "qat:2:launcher")}  # SLIM_TEST_KILL_AT per invocation


def _cmd(out: Path, synth: Path, resume: bool = False, processes: int = 1, overrides: tuple = ()) -> list[str]:
    cmd = [sys.executable, "-m", "train.cli", "run", str(SMOKE), f"output_dir={out}", f"data.synth.out={synth}",
           *overrides]
    return cmd + (["--num-processes", str(processes)] if processes > 1 else []) + (["--resume"] if resume else [])


def _run(cmd: list[str], log: Path, kill_at: str | None = None, timeout: float = 900) -> int:
    env = dict(run_env(), WANDB_MODE="offline")
    if kill_at:
        env["SLIM_TEST_KILL_AT"] = kill_at
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return rc


def _survivors(out: Path) -> list[int]:
    """Processes still working on run folder `out` (it is on their command line)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"output_dir={out}".encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            pass
    return pids


def _run_killed(cmd: list[str], out: Path, kill_at: str, log: Path) -> None:
    """Run `cmd` with the kill hook set; it must end by that kill, leaving no process behind."""
    rc = _run(cmd, log, kill_at)
    if kill_at.count(":") == 2 and not kill_at.endswith("launcher"):
        assert rc == 1, log.read_text()[-3000:]  # a worker died: the launcher stops the others and fails
    else:
        assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    t0 = time.time()
    while _survivors(out) and time.time() - t0 < 30:
        time.sleep(0.2)
    assert not _survivors(out), "workers outlived the launcher"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "smoke"  # voiced by the first run, reused by the others


def _smoke_run(tmp: Path, synth: Path, processes: int) -> dict:
    out = tmp / "run"
    first, second = KILLS[processes]
    _run_killed(_cmd(out, synth, processes=processes), out, first, tmp / "log1.txt")
    prune_done = (out / "02-prune" / "stage.json").stat().st_mtime_ns
    assert not (out / "03-recover" / "stage.json").exists()
    refused = None
    if processes > 1:  # the data position is per process: another count must be refused, changing nothing
        rc = _run(_cmd(out, synth, resume=True), tmp / "log-1proc.txt")
        refused = (rc, (tmp / "log-1proc.txt").read_text())
    _run_killed(_cmd(out, synth, resume=True, processes=processes), out, second, tmp / "log2.txt")
    recover_done = (out / "03-recover" / "stage.json").stat().st_mtime_ns
    rc = _run(_cmd(out, synth, resume=True, processes=processes), tmp / "log3.txt")
    assert rc == 0, (tmp / "log3.txt").read_text()[-3000:]
    return {"out": out, "stdout": (tmp / "log3.txt").read_text(), "prune_done": prune_done,
            "recover_done": recover_done, "refused": refused}


@pytest.fixture(scope="module")
def smoke_1(tmp_path_factory, synth):
    return _smoke_run(tmp_path_factory.mktemp("smoke1"), synth, 1)


@pytest.fixture(scope="module")
def smoke_2(tmp_path_factory, synth):
    return _smoke_run(tmp_path_factory.mktemp("smoke2"), synth, 2)


@pytest.fixture(params=[1, 2], ids=["1proc", "2proc"])
def smoke_run(request):
    return request.getfixturevalue(f"smoke_{request.param}")


def _stages_override(stages: list[dict]) -> str:
    """A `stages=` override replacing the recipe's stage list (flow YAML on one line; not JSON, whose 1e-05
    YAML reads as a string)."""
    return "stages=" + yaml.safe_dump(stages, default_flow_style=True, width=float("inf")).strip()


def _smoke_stages(*names: str) -> list[dict]:
    by = {s["name"]: s for s in yaml.safe_load(SMOKE.read_text())["stages"]}
    return [dict(by[n]) for n in names]


def test_finished_stages_are_not_redone(smoke_run):
    out = smoke_run["out"]
    assert (out / "02-prune" / "stage.json").stat().st_mtime_ns == smoke_run["prune_done"]
    assert (out / "03-recover" / "stage.json").stat().st_mtime_ns == smoke_run["recover_done"]
    for name in ("dense", "prune", "recover"):
        assert f"[{name}] already finished" in smoke_run["stdout"]


def test_trainer_stages_resumed_and_ran_every_step(smoke_run):
    out = smoke_run["out"]
    for stage in ("03-recover", "04-qat"):
        steps = [json.loads(l)["step"] for l in (out / stage / "metrics.jsonl").read_text().splitlines()
                 if l.strip() and "loss" in json.loads(l)]
        assert set(steps) == {1, 2, 3, 4}, (stage, steps)
        assert steps[-1] == 4
        # the kill came right after step 2's checkpoint: steps 1-2 ran once, before the kill
        assert steps.count(1) == 1 and steps.count(2) == 1, (stage, steps)
        ckpts = sorted(p.name for p in (out / stage / "checkpoints").iterdir())
        assert ckpts == ["step-00000002", "step-00000004"]
        assert not list((out / stage / "checkpoints").glob(".tmp-*"))


def test_report_has_every_stage_with_eval_keys(smoke_run):
    out = smoke_run["out"]
    report = json.loads((out / "report.json").read_text())
    assert [e["stage"] for e in report] == STAGES
    for e in report:
        for key in ("wer", "cer", "utterances", "skipped", "model_bytes", "seconds_per_utterance", "engine",
                    "hypotheses"):
            assert key in e, (e["stage"], key)
        assert e["utterances"] == 3 and e["skipped"] == 0
        assert e["model_bytes"] > 0
    # each stage's WER is the corpus WER of its own hypotheses, and report.md prints that number in its row
    from eval.metrics import word_error_rate

    md_rows = {line.split(" | ")[0].lstrip("| "): line for line in (out / "report.md").read_text().splitlines()
               if line.startswith("| ")}
    for e in report:
        hyps = e["hypotheses"]
        assert len(hyps) == 3
        assert e["wer"] == word_error_rate([h["ref"] for h in hyps], [h["hyp"] for h in hyps])
        assert f" | {e['wer'] * 100:.2f} | " in md_rows[e["stage"]], (e["stage"], md_rows[e["stage"]])
    by = {e["stage"]: e for e in report}
    assert by["qat"]["engine"] == "torch-fake-quant"
    assert by["convert"]["engine"] == "torch-int8"
    assert by["export"]["engine"] == "onnx-qdq"
    # pruning removed parameters; INT8 shrank the bytes a deployment ships
    assert by["prune"]["parameters"] < by["dense"]["parameters"]
    assert by["export"]["model_bytes"] < 0.5 * by["recover"]["model_bytes"]
    assert (out / "report.md").read_text().count("| ") > 6
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    structure = json.loads((out / "02-prune" / "model" / "slim_structure.json").read_text())
    assert sum(structure["encoder_heads"]) < 8
    # the ptq branch read `recover` (input: recover), not the export before it in the list
    assert by["ptq"]["engine"] == "torch-fake-quant" and by["ptq"]["parameters"] == by["recover"]["parameters"]
    ptq = json.loads((out / "07-ptq" / "model" / "slim_structure.json").read_text())
    assert ptq["encoder_heads"] == structure["encoder_heads"] and ptq["quant"]["observer"] == "minmax"
    # keep_float: 1 within 0 MB -> the sensitivity table is in the stage folder and its worst unit without
    # weights was kept in float
    table = json.loads((out / "07-ptq" / "sensitivity.json").read_text())
    assert [r["unit"] for r in table[:2]] == ["float", "all"] and len(table) > 3
    worst = max((r for r in table[2:] if r["weights"] == 0), key=lambda r: r["delta_loss"])
    assert max(table[2:], key=lambda r: r["delta_loss"])["weights"] > 0  # the budget passed over the worst unit
    assert ptq["quant"]["exclude"] == worst["patterns"] and ptq["quant"]["keep_float"] == 1
    assert "| unit | loss | Δ loss |" in (out / "07-ptq" / "sensitivity.md").read_text()
    from safetensors import safe_open
    import fnmatch

    with safe_open(str(out / "07-ptq" / "model" / "model.safetensors"), "pt") as f:
        qnames = {k.rpartition("_quant.")[0].rpartition(".")[0] for k in f.keys() if "_quant." in k}
    assert qnames and not any(fnmatch.fnmatchcase(n, p) for n in qnames for p in worst["patterns"])


# ---------------------------------------------------------------------------------------------
# two processes only


def test_two_processes_report_the_fields_of_one_process(smoke_1, smoke_2):
    one, two = (json.loads((r["out"] / "report.json").read_text()) for r in (smoke_1, smoke_2))
    assert [e["stage"] for e in two] == [e["stage"] for e in one] == STAGES
    for a, b in zip(one, two):
        assert sorted(b) == sorted(a), b["stage"]
        assert sorted(b["structure"]) == sorted(a["structure"]), b["stage"]
    for stage in ("03-recover", "04-qat"):
        m = json.loads((smoke_2["out"] / stage / "checkpoints" / "step-00000004" / "COMPLETE").read_text())
        assert m["num_processes"] == 2 and {"random_states_0.pkl", "random_states_1.pkl"} <= set(m["files"])


def test_resume_with_another_process_count_is_refused(smoke_2):
    rc, log = smoke_2["refused"]
    assert rc == 1
    assert "was written by 2 processes; resume with the same number (now 1)" in log, log[-3000:]


@pytest.fixture(scope="module")
def uninterrupted_2(tmp_path_factory, synth):
    """The trainer stages of the smoke recipe (and the prune they start from) in one uninterrupted
    two-process run; evaluations off, since they do not change the weights compared."""
    tmp = tmp_path_factory.mktemp("uninterrupted2")
    stages = [dict(s, evaluate=False) for s in _smoke_stages("prune", "recover", "qat")]
    rc = _run(_cmd(tmp / "run", synth, processes=2, overrides=(_stages_override(stages),)), tmp / "log.txt")
    assert rc == 0, (tmp / "log.txt").read_text()[-3000:]
    return tmp / "run"


def test_two_processes_killed_and_resumed_equal_an_uninterrupted_run(smoke_2, uninterrupted_2):
    from safetensors.torch import load_file

    for resumed, ref in (("03-recover", "02-recover"), ("04-qat", "03-qat")):
        a = load_file(smoke_2["out"] / resumed / "model" / "model.safetensors")
        b = load_file(uninterrupted_2 / ref / "model" / "model.safetensors")
        assert_same_weights(a, b)
        assert any("_quant." in k for k in a) == (resumed == "04-qat")  # the QAT model's observers compared too


def test_gradual_prune_trains_its_rounds_on_two_processes(tmp_path, synth, smoke_2):
    (prune,) = _smoke_stages("prune")
    prune["prune"] = dict(prune["prune"], schedule="gradual", iterations=2, recover_steps=2)
    prune["train"] = {"batch_size": 2, "lr": 1.0e-4, "save_every": 2, "log_every": 1}
    out = tmp_path / "run"
    rc = _run(_cmd(out, synth, processes=2, overrides=(_stages_override([dict(prune, evaluate=False)]),)),
              tmp_path / "log.txt")
    assert rc == 0, (tmp_path / "log.txt").read_text()[-3000:]
    sdir = out / "01-prune"
    # round 1 trained 2 steps on both processes; the last round is not followed by recovery
    steps = [r["step"] for r in map(json.loads, (sdir / "round1" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2]
    m = json.loads((sdir / "round1" / "checkpoints" / "step-00000002" / "COMPLETE").read_text())
    assert (m["step"], m["stage"], m["num_processes"]) == (2, "prune-round1", 2)
    assert not (sdir / "round2").exists()
    # the rounds reach the one-shot target: as many heads and neurons of each kind as the one-shot prune
    gradual = json.loads((sdir / "model" / "slim_structure.json").read_text())
    oneshot = json.loads((smoke_2["out"] / "02-prune" / "model" / "slim_structure.json").read_text())
    for key in ("encoder_heads", "decoder_heads", "cross_heads", "encoder_ffn", "decoder_ffn"):
        assert sum(gradual[key]) == sum(oneshot[key]), key
    assert sum(gradual["encoder_heads"]) < 8
    assert json.loads((sdir / "stage.json").read_text())["kind"] == "prune"
