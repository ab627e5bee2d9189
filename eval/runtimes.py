"""The runtimes people deploy Whisper with, behind the `eval.engines.Engine` interface, on our exports.

    engine        runs                                              on an export of layout
    sherpa-onnx   sherpa-onnx's OfflineRecognizer.from_whisper      sherpa-onnx (`qat.export_sherpa`)
                  (its own features, greedy search, tokens.txt)

Each is the registry package as users install it; nothing here reimplements them. sherpa-onnx pads a clip
with `tail_paddings` feature frames (its default: 1000, at most to 30 s); we pass 3000, the full window
our engines and the training see, unless told otherwise. sherpa-onnx has no per-call token budget
(`slim.decoding.token_budget`): it decodes to eot or to n_text_ctx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.engines import Engine
from slim.audio import SAMPLING_RATE

FULL_WINDOW = 3000


class SherpaOnnxEngine(Engine):
    """sherpa-onnx's Whisper recognizer on a `--format sherpa-onnx` export."""

    def __init__(self, export_dir: str | Path, threads: int = 2, tail_paddings: int = FULL_WINDOW):
        try:
            import sherpa_onnx
        except ImportError as e:
            raise RuntimeError("the sherpa-onnx engine needs the sherpa-onnx package (the bench extra)") from e
        from qat.export_sherpa import TOKENS, check_dir

        d = Path(export_dir)
        config = check_dir(d)
        info = config["sherpa-onnx"]
        self.recognizer = sherpa_onnx.OfflineRecognizer.from_whisper(
            encoder=str(d / info["encoder"]), decoder=str(d / info["decoder"]), tokens=str(d / TOKENS),
            num_threads=threads, tail_paddings=tail_paddings)
        self.name = f"sherpa-onnx-{config['mode']}"
        self.files = [str(d / n) for n in config["files"]]
        self.model_bytes = sum(f["bytes"] for f in config["files"].values())
        self.info = {"structure": config.get("structure")}
        self.last_tokens: list[list[str]] = []  # the token strings of the last call (sherpa reports no ids)

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        streams = []
        for a in audios:
            s = self.recognizer.create_stream()
            s.accept_waveform(SAMPLING_RATE, np.asarray(a, np.float32))
            streams.append(s)
        self.recognizer.decode_streams(streams)
        self.last_tokens = [list(s.result.tokens) for s in streams]
        return [s.result.text.strip() for s in streams]

