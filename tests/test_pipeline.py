"""The smoke recipe end to end, killed with SIGKILL in the recover and in the QAT stage and resumed.

One run, three processes: (1) killed once recover has written its first checkpoint, (2) `--resume`,
killed once qat has written its first checkpoint, (3) `--resume` to the end. Asserts that finished
stages were not redone, that the trainer stages ran each step, and the files and numbers of the report.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["dense", "prune", "recover", "qat", "convert", "export", "ptq"]


def _cmd(out: Path, synth: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "train.cli", "run", str(ROOT / "recipes" / "smoke.yaml"),
           f"output_dir={out}", f"data.synth.out={synth}"]
    return cmd + (["--resume"] if resume else [])


def _run_until(cmd: list[str], marker: Path, log: Path, timeout: float = 600) -> None:
    """Start `cmd`, SIGKILL it as soon as `marker` exists (the stage's first complete checkpoint)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc={proc.returncode}) before {marker} appeared:\n{log.read_text()[-3000:]}")
            if time.time() - t0 > timeout:
                proc.kill()
                pytest.fail(f"timed out waiting for {marker}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    out, synth = tmp / "run", tmp / "synth"
    _run_until(_cmd(out, synth, False), out / "03-recover" / "checkpoints" / "step-00000002" / "COMPLETE",
               tmp / "log1.txt")
    prune_done = (out / "02-prune" / "stage.json").stat().st_mtime_ns
    assert not (out / "03-recover" / "stage.json").exists()
    _run_until(_cmd(out, synth, True), out / "04-qat" / "checkpoints" / "step-00000002" / "COMPLETE",
               tmp / "log2.txt")
    recover_done = (out / "03-recover" / "stage.json").stat().st_mtime_ns
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    r = subprocess.run(_cmd(out, synth, True), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout, prune_done, recover_done


def test_finished_stages_are_not_redone(smoke_run):
    out, stdout, prune_done, recover_done = smoke_run
    assert (out / "02-prune" / "stage.json").stat().st_mtime_ns == prune_done
    assert (out / "03-recover" / "stage.json").stat().st_mtime_ns == recover_done
    for name in ("dense", "prune", "recover"):
        assert f"[{name}] already finished" in stdout


def test_trainer_stages_resumed_and_ran_every_step(smoke_run):
    out = smoke_run[0]
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
    out = smoke_run[0]
    report = json.loads((out / "report.json").read_text())
    assert [e["stage"] for e in report] == STAGES
    for e in report:
        for key in ("wer", "cer", "utterances", "skipped", "model_bytes", "seconds_per_utterance", "engine",
                    "hypotheses"):
            assert key in e, (e["stage"], key)
        assert e["utterances"] == 3 and e["skipped"] == 0
        assert e["model_bytes"] > 0
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
    # keep_float: 1 -> the sensitivity table is in the stage folder and its worst unit was kept in float
    table = json.loads((out / "07-ptq" / "sensitivity.json").read_text())
    assert [r["unit"] for r in table[:2]] == ["float", "all"] and len(table) > 3
    worst = max(table[2:], key=lambda r: r["delta_loss"])
    assert ptq["quant"]["exclude"] == worst["patterns"] and ptq["quant"]["keep_float"] == 1
    assert "| unit | loss | Δ loss |" in (out / "07-ptq" / "sensitivity.md").read_text()
    from safetensors import safe_open
    import fnmatch

    with safe_open(str(out / "07-ptq" / "model" / "model.safetensors"), "pt") as f:
        qnames = {k.rpartition("_quant.")[0].rpartition(".")[0] for k in f.keys() if "_quant." in k}
    assert qnames and not any(fnmatch.fnmatchcase(n, p) for n in qnames for p in worst["patterns"])
