"""The runtimes people deploy Whisper with, behind the `eval.engines.Engine` interface, on our exports.

    engine           runs                                              on an export of layout
    sherpa-onnx      sherpa-onnx's OfflineRecognizer.from_whisper      sherpa-onnx (`qat.export_sherpa`)
                     (its own features, greedy search, tokens.txt)
    transformers.js  transformers.js's automatic-speech-recognition    hf (`qat.export_hf`)
                     pipeline, in Node (eval/js; its own features,
                     generate() and tokenizer)
    onnx-asr         onnx-asr's Whisper model (its own features and    hf, multilingual models only: its
                     greedy loop)                                      prompt always has a language token

Each is the registry package as users install it; nothing here reimplements them. sherpa-onnx pads a clip
with `tail_paddings` feature frames (its default: 1000, at most to 30 s); we pass 3000, the full window
our engines and the training see, unless told otherwise, and leads each clip with half a hop of silence
(`GRID_LEAD`), which puts its frames on Whisper's grid. None of them has a per-call token budget
(`slim.decoding.token_budget`): each decodes to eot or to the decoder's last position.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from eval.engines import Engine
from slim.audio import SAMPLING_RATE
from slim.window import MEL_FRAMES_PER_SECOND

FULL_WINDOW = 3000
GRID_LEAD = SAMPLING_RATE // MEL_FRAMES_PER_SECOND // 2
"""Zero samples put before each clip for sherpa-onnx: kaldi-native-fbank's Whisper frames start half a hop
(80 samples, 5 ms) after Whisper's own, so with this lead they fall on Whisper's grid (docs/runtimes.md
measures what it changes)."""


def _describe(engine: Engine, d: Path, config: dict, name: str) -> None:
    """What every runtime engine reports of its export: name, shipped files, their bytes, the structure."""
    engine.name = f"{name}-{config['mode']}"
    engine.files = [str(d / n) for n in config["files"]]
    engine.model_bytes = sum(f["bytes"] for f in config["files"].values())
    engine.info = {"structure": config.get("structure")}


def _checked_language(config: dict, language: str | None) -> str | None:
    """`language` checked against the export's languages: a multilingual model's code (default en), None for an
    English-only model (whose prompt has no language token)."""
    from slim.export_format import DecodeConfig

    DecodeConfig(**config["decode"]).with_language(language)  # raises, naming the code, if the model lacks it
    return (language or "en") if config["decode"].get("languages") else None


class SherpaOnnxEngine(Engine):
    """sherpa-onnx's Whisper recognizer on a `--format sherpa-onnx` export."""

    def __init__(self, export_dir: str | Path, threads: int = 2, tail_paddings: int = FULL_WINDOW,
                 language: str | None = None, lead_samples: int = GRID_LEAD):
        try:
            import sherpa_onnx
        except ImportError as e:
            raise RuntimeError("the sherpa-onnx engine needs the sherpa-onnx package (the bench extra)") from e
        from qat.export_sherpa import TOKENS, check_dir

        d = Path(export_dir)
        config = check_dir(d)
        info = config["sherpa-onnx"]
        language = _checked_language(config, language)
        self.recognizer = sherpa_onnx.OfflineRecognizer.from_whisper(
            encoder=str(d / info["encoder"]), decoder=str(d / info["decoder"]), tokens=str(d / TOKENS),
            num_threads=threads, tail_paddings=tail_paddings, language=language or "")
        _describe(self, d, config, "sherpa-onnx")
        self.lead = np.zeros(lead_samples, np.float32)
        self.last_tokens: list[list[str]] = []  # the token strings of the last call (sherpa reports no ids)

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        streams = []
        for a in audios:
            s = self.recognizer.create_stream()
            s.accept_waveform(SAMPLING_RATE, np.concatenate([self.lead, np.asarray(a, np.float32)]))
            streams.append(s)
        self.recognizer.decode_streams(streams)
        self.last_tokens = [list(s.result.tokens) for s in streams]
        return [s.result.text.strip() for s in streams]


JS_DIR = Path(__file__).resolve().parent / "js"


def _hf_export(export_dir: str | Path) -> tuple[Path, dict]:
    from qat.export_hf import check_dir

    d = Path(export_dir).resolve()  # absolute: transformers.js runs in eval/js, where a relative path means another
    return d, check_dir(d)


class TransformersJsEngine(Engine):
    """transformers.js (npm, eval/js) on a `--format hf` export, in one Node process kept for the engine's life."""

    def __init__(self, export_dir: str | Path, threads: int = 2, language: str | None = None):
        d, config = _hf_export(export_dir)
        language = _checked_language(config, language)
        node = shutil.which("node")
        if node is None or not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
            raise RuntimeError("the transformers.js engine needs Node.js and eval/js/node_modules "
                               "(./launch.sh test installs it; or: cd eval/js && npm ci --ignore-scripts)")
        dtype = "fp32" if config["mode"] == "float" else "q8"
        cmd = [node, str(JS_DIR / "transcribe.mjs"), str(d), dtype, str(threads)]
        if language:
            cmd.append(f"--language={language}")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=JS_DIR)
        first = self.proc.stdout.readline()
        if not first.strip() or not json.loads(first).get("ready"):
            self.close()
            raise RuntimeError(f"transformers.js could not load {d} (its error is above)")
        self.tmp = tempfile.TemporaryDirectory(prefix="slim-js-")
        _describe(self, d, config, "transformers.js")
        self.last_seconds: list[float] = []  # each clip's pipeline call as Node timed it

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        texts, self.last_seconds = [], []
        for i, a in enumerate(audios):
            clip = Path(self.tmp.name) / f"{i}.f32"
            np.asarray(a, "<f4").tofile(clip)
            self.proc.stdin.write(f"{clip}\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"transformers.js exited (code {self.proc.poll()}) on clip {i}")
            r = json.loads(line)
            texts.append(r["text"].strip())
            self.last_seconds.append(r["seconds"])
        return texts

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class OnnxAsrEngine(Engine):
    """onnx-asr (PyPI) on a `--format hf` export of a multilingual model, transcribing `language`."""

    def __init__(self, export_dir: str | Path, threads: int = 2, language: str | None = None):
        try:
            import onnx_asr
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("the onnx-asr engine needs the onnx-asr package (the bench extra)") from e
        d, config = _hf_export(export_dir)
        if not config["decode"].get("languages"):
            raise ValueError(f"{d}: an English-only model; onnx-asr always prompts with a language token, "
                             "which such a model lacks (run it with --engine transformers.js)")
        language = _checked_language(config, language)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.model = onnx_asr.load_model("whisper", str(d), quantization=None if config["mode"] == "float"
                                         else "quantized", sess_options=so)
        self.language = language
        _describe(self, d, config, "onnx-asr")

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        out = []
        for i in range(0, len(audios), batch_size):
            chunk = [np.asarray(a, np.float32) for a in audios[i:i + batch_size]]
            out += [t.strip() for t in self.model.recognize(chunk, language=self.language)]
        return out
