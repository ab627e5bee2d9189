"""Inference needs only the core dependencies: transcribe and eval, with the torch and the ONNX engine, run in
a process where the training packages (the `train` extra: accelerate, datasets, evaluate, wandb, peft,
matplotlib) cannot be found, as in an install without that extra."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINING_ONLY = ("accelerate", "datasets", "evaluate", "wandb", "peft", "matplotlib")

HIDE = r"""
import importlib.machinery, json, sys
HIDDEN = set(json.loads(sys.argv[1]))

class Hide(importlib.machinery.PathFinder):
    # what the default path finder finds, except the hidden packages: importlib.util.find_spec says None
    # for them, as it does when they are not installed (transformers then skips its optional integrations)
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from train.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[2])]
loaded = sorted({m.split(".")[0] for m in sys.modules} & HIDDEN)
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_transcribe_and_eval_run_without_the_training_packages(tmp_path):
    from qat.onnx_export import export_model
    from slim.model import save_model
    from slim.sources import tiny_random_processor, tiny_random_whisper

    model = save_model(tiny_random_whisper(seed=0), tmp_path / "tiny", processor=tiny_random_processor())
    onnx = export_model(model, tmp_path / "tiny-onnx", mode="float")
    clips = ROOT / "data" / "real-speech"
    wav = next(p for p in sorted(clips.iterdir()) if p.suffix == ".wav")
    runs = [["transcribe", str(model), str(wav), "--max-new-tokens", "4", "--threads", "1"],
            ["transcribe", str(onnx), str(wav), "--max-new-tokens", "4", "--threads", "1"],
            ["eval", str(onnx), "--data", str(clips / "manifest.jsonl"), "--out", str(tmp_path / "r.json"),
             "--limit", "2", "--max-new-tokens", "4", "--threads", "1", "--no-progress"]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", HIDE, json.dumps(TRAINING_ONLY), json.dumps(runs)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"codes": [0, 0, 0], "loaded": []}
    lines = [l for l in proc.stdout.splitlines() if l.startswith(str(wav))]
    assert len(lines) == 2  # "<audio>\t<text>" from each engine
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["utterances"] == 2 and report["engine"].startswith("onnx")
