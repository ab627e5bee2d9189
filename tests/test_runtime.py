"""The slim runtime without torch: numpy log-mel against transformers' feature extractor, the dependency list,
and transcription in a process where torch, transformers and onnx cannot be imported, token for token the same
as the engine fed transformers' features and decoded by transformers' tokenizer."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
REAL_SPEECH = ROOT / "data" / "real-speech"
BLOCKED = ("torch", "transformers", "onnx")
RUNTIME_MODULES = {"slim", "slim.runtime", "slim.export_format", "slim.mel", "slim.decoding", "slim.audio",
                   "slim.window"}
NEW = 12

BLOCK = r"""
import json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Block:
    # first on the meta path: importing a blocked package fails as it does where it is not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Block)
from slim.audio import load_audio
from slim.runtime import OnnxEngine, main

engine = OnnxEngine(sys.argv[2], threads=1)
clips = json.loads(sys.argv[3])
audios = [load_audio(c) for c in clips]
tokens = [engine.generate_tokens(engine.features([a]), int(sys.argv[4]))[0] for a in audios]
texts = engine.decode_text(tokens)
code = main([sys.argv[2], clips[0], "--threads", "1", "--max-new-tokens", sys.argv[4]])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED | {"slim", "qat", "eval", "prune", "train"})
print(json.dumps({"tokens": tokens, "texts": texts, "code": code, "loaded": loaded}))
"""


def _clips() -> list[Path]:
    items = [json.loads(l) for l in (REAL_SPEECH / "manifest.jsonl").read_text().splitlines() if l.strip()]
    return [REAL_SPEECH / it["audio"] for it in items]


@pytest.mark.parametrize("settings", [{}, {"feature_size": 128}])
def test_log_mel_matches_whisper_feature_extractor(settings):
    from transformers import WhisperFeatureExtractor

    from slim.mel import LogMel

    fe = WhisperFeatureExtractor(**settings)
    mel = LogMel(**settings)
    assert np.abs(mel.filters() - fe.mel_filters).max() < 1e-7
    g = np.random.default_rng(0)
    audios = [g.standard_normal(n).astype(np.float32) * s for n, s in
              ((800, 0.1), (16000 * 7 + 13, 0.3), (480000, 0.05), (500000, 0.2))]  # the last is cut to 30 s
    ref = fe(audios, sampling_rate=16000, return_tensors="np").input_features
    got = mel(audios)
    assert got.shape == ref.shape == (4, settings.get("feature_size", 80), 3000) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4
    one = mel(audios[1:2])  # each clip is clamped to its own maximum, as transformers does per batch item
    assert np.abs(one[0] - got[1]).max() == 0.0


def test_log_mel_reads_the_saved_settings(tmp_path):
    from slim.mel import LogMel
    from slim.sources import tiny_random_processor

    tiny_random_processor().save_pretrained(tmp_path)
    assert LogMel.from_dir(tmp_path) == LogMel()
    with pytest.raises(FileNotFoundError, match=r"empty/processor_config.json: missing"):
        LogMel.from_dir(tmp_path / "empty")


def test_the_core_dependencies_are_the_runtime_without_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: req.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
    core = {name(r) for r in meta["dependencies"]}
    assert core == {"onnxruntime", "numpy", "tokenizers", "soundfile", "soxr"}
    assert {"torch", "transformers", "onnx"} <= {name(r) for r in meta["optional-dependencies"]["torch"]}
    assert meta["scripts"]["whisper-slim-transcribe"] == "slim.runtime:main"


@pytest.fixture(scope="module")
def uneven_export(tmp_path_factory):
    """A static-INT8 (QDQ) export of a tiny random Whisper with different head counts per layer."""
    from qat.onnx_export import export_model
    from qat.prepare import QuantConfig, ptq
    from slim.model import Structure, build_model
    from slim.sources import tiny_random_processor, tiny_random_whisper

    dense = tiny_random_whisper(seed=0)
    s = Structure.dense(dense.config)
    s.encoder_heads, s.decoder_heads, s.cross_heads = [3, 1], [2, 1], [1, 3]
    torch.manual_seed(3)
    model = build_model(dense.config, s).eval()
    model.generation_config = dense.generation_config
    g = torch.Generator().manual_seed(1)
    batch = {"input_features": torch.randn(2, 80, 3000, generator=g),
             "labels": torch.tensor([[50257, 50362] + list(range(400, 410))] * 2)}
    fq = ptq(model, QuantConfig(embeddings=True), [batch])
    return export_model(fq, tmp_path_factory.mktemp("runtime") / "qdq", mode="qdq", processor=tiny_random_processor())


def test_runtime_transcribes_without_torch_with_the_tokens_of_transformers_features(uneven_export):
    from slim.audio import load_audio
    from slim.model import load_processor
    from slim.runtime import OnnxEngine

    clips = _clips()
    assert len(clips) == 11
    # the engine with transformers' feature extractor and tokenizer, as it ran before the runtime had its own
    processor = load_processor(uneven_export)
    engine = OnnxEngine(uneven_export, threads=1)
    want_tokens, want_texts = [], []
    for c in clips:
        f = processor.feature_extractor([load_audio(c)], sampling_rate=16000, return_tensors="np").input_features
        want_tokens += engine.generate_tokens(f, NEW)
    want_texts = [t.strip() for t in processor.tokenizer.batch_decode(want_tokens, skip_special_tokens=True)]
    assert sum(map(len, want_tokens)) > 2 * len(clips)  # the comparison covers many decoding steps

    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", BLOCK, json.dumps(BLOCKED), str(uneven_export),
                           json.dumps([str(c) for c in clips]), str(NEW)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] == want_tokens
    assert out["texts"] == want_texts
    assert out["code"] == 0
    assert proc.stdout.splitlines()[0] == f"{clips[0]}\t{want_texts[0]}"
    assert set(out["loaded"]) <= RUNTIME_MODULES, out["loaded"]  # no torch, transformers, onnx, qat, eval


def test_runtime_names_the_missing_file(uneven_export, tmp_path):
    import shutil

    from slim.export_format import ExportDirError
    from slim.runtime import OnnxEngine, main

    d = tmp_path / "partial"
    shutil.copytree(uneven_export, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ExportDirError, match=r"partial/tokenizer.json: missing file listed in export_config.json"):
        OnnxEngine(d)
    assert main([str(d), str(_clips()[0])]) == 1
