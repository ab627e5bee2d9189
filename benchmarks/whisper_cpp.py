"""whisper.cpp (through pywhispercpp's bindings) as a benchmark engine, with an optional truncated encoder context.

    from benchmarks.whisper_cpp import WhisperCppEngine, window_audio_ctx
    full = WhisperCppEngine("tiny.en.bin")                                  # 1500 encoder frames (30 s)
    short = WhisperCppEngine("tiny.en.bin", audio_ctx_for=window_audio_ctx(1.0))  # ceil(duration) + 1 s

The ggml file comes from benchmarks/convert_ggml.py. whisper.cpp's `audio_ctx` runs the encoder on the first
`audio_ctx` frames only (50 per second of audio; the mel window is twice that, the positional table is cut
to it) with weights trained on 1500: that untrained truncation is what our trained audio windows are
compared with. `audio_ctx_for(audio) -> int` picks it per clip (`window_audio_ctx` is our models' rule).

Decoding matches our other engines: greedy at temperature 0 with no temperature fallback, English, no
timestamps, one segment per clip, no text carried between clips, OpenAI's non-speech tokens suppressed (the
checkpoints' `suppress_tokens`), blank and end of text suppressed at the start, at most
`slim.decoding.token_budget` tokens. whisper.cpp's no-speech gate (drop a segment whose no-speech
probability > no_speech_thold and average log-probability < logprob_thold) is off, as it is in our engines.

Threads: ggml's worker threads spin at each barrier, so `threads` above the cores that are actually free
costs far more than it gains (on 2 cores shared with a training job, threads=2 ran ~10x slower than 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from eval.engines import Engine
from slim.audio import SAMPLING_RATE
from slim.decoding import token_budget

FULL_CTX = 1500  # 30 s
LOG_WARN = 3  # ggml_log_level: 2 info, 3 warning, 4 error


def window_audio_ctx(margin_s: float = 1.0, frame_multiple: int = 1) -> Callable[[np.ndarray], int]:
    """audio -> encoder frames of our models' window rule (`slim.window.window_frames`: ceil(duration) +
    margin_s seconds, rounded up to `frame_multiple` encoder frames, at most 30 s)."""
    from slim.window import check_audio_window, clip_frames, window_frames

    window = check_audio_window({"margin_s": margin_s, "frame_multiple": frame_multiple})

    def audio_ctx_for(audio: np.ndarray) -> int:
        return window_frames(window, clip_frames(audio), 2 * FULL_CTX) // 2  # mel frames -> encoder frames

    audio_ctx_for.__name__ = f"ceil+{margin_s:g}s"
    return audio_ctx_for


def _label(f) -> str:
    name = getattr(f, "__name__", "")
    return name if name.isprintable() and name and not name.startswith("<") else "per-clip"


class WhisperCppEngine(Engine):
    """Transcribes 16 kHz mono float32 clips (at most 30 s each) with whisper.cpp, one clip per call.

    ggml_path: a whisper.cpp ggml model; threads: whisper.cpp's n_threads; audio_ctx: encoder frames
    (0 = the model's full context); audio_ctx_for: a per-clip choice of audio_ctx instead; overrides:
    whisper_full_params fields set over ours (e.g. {"temperature_inc": 0.2, "greedy": {"best_of": 5},
    "no_speech_thold": 0.6}: whisper.cpp's own defaults, with its temperature fallback and no-speech gate).
    """

    def __init__(self, ggml_path: str | Path, threads: int = 2, audio_ctx: int = 0,
                 audio_ctx_for: Callable[[np.ndarray], int] | None = None, name: str | None = None,
                 overrides: dict | None = None):
        import _pywhispercpp as pw

        path = Path(ggml_path)
        if not path.is_file():  # pywhispercpp would take a missing path for a model name to download
            raise FileNotFoundError(f"{path}: no such ggml model file")
        self._pw, self._free = pw, pw.whisper_free  # _free is kept for __del__ at interpreter exit
        # whisper.cpp's log is its only report of a failed load (the binding returns a context object
        # either way), so it is collected while loading; the load's info lines are dropped with it.
        log: list[tuple[int, str]] = []
        pw.whisper_log_set(lambda level, text: log.append((level, text)))
        try:
            self._ctx = pw.whisper_init_from_file_with_params(str(path), pw.whisper_context_default_params())
        finally:
            pw.whisper_log_set(None)  # whisper.cpp's default logger (stderr) again
        if any("failed to load model" in text for _, text in log):
            self._ctx = None
            errors = "".join(text for level, text in log if level >= LOG_WARN)
            raise ValueError(f"{path}: whisper.cpp could not load it:\n{errors.strip()}")
        if pw.whisper_model_ftype(self._ctx) == 0:
            # ggml_conv_1d always builds an f16 im2col, which asserts on an f32 kernel: whisper.cpp aborts the
            # whole process at the first encode (whisper.cpp 1.8.x), so refuse the file here
            self.close()
            raise ValueError(f"{path}: an all-f32 ggml model, which this whisper.cpp aborts on; convert with "
                             "--ftype f16")
        self.n_audio_ctx = pw.whisper_n_audio_ctx(self._ctx)
        if not 0 <= audio_ctx <= self.n_audio_ctx:
            raise ValueError(f"audio_ctx {audio_ctx}: expected 0 (full) to {self.n_audio_ctx}")
        self.audio_ctx, self.audio_ctx_for, self.threads = audio_ctx, audio_ctx_for, threads

        p = pw.whisper_full_default_params(pw.whisper_sampling_strategy.WHISPER_SAMPLING_GREEDY)
        settings = dict(
            n_threads=threads, language="en", detect_language=False, translate=False,
            no_context=True, no_timestamps=True, single_segment=True,
            print_progress=False, print_realtime=False, print_timestamps=False, print_special=False,
            temperature=0.0, temperature_inc=0.0,  # no fallback to sampling at higher temperatures
            greedy={"best_of": 1},  # best_of only counts when sampling; 1 decoder is allocated, not 5
            suppress_blank=True, suppress_nst=True,
            no_speech_thold=1.0,  # a probability is never above 1: the no-speech gate is off
        )
        for key, value in {**settings, **(overrides or {})}.items():
            if not hasattr(p, key) or key in ("audio_ctx", "max_tokens"):  # those two are set per clip
                raise ValueError(f"{key}: not a whisper_full_params field this engine lets you set")
            setattr(p, key, value)
        self._params = p

        self.name = name or ("whisper.cpp" if audio_ctx_for is None and not audio_ctx else
                             f"whisper.cpp-ctx{audio_ctx}" if audio_ctx_for is None else
                             f"whisper.cpp-ctx-{_label(audio_ctx_for)}")
        self.model_bytes = path.stat().st_size
        self.files = [str(path)]
        self.info = {"threads": threads, "audio_ctx": audio_ctx if audio_ctx_for is None else "per clip",
                     "n_audio_ctx": self.n_audio_ctx, "ftype": pw.whisper_model_ftype(self._ctx),
                     **({"overrides": dict(overrides)} if overrides else {})}
        self.tokenizer = None
        self.last_audio_ctx: list[int] = []  # the audio_ctx each clip of the last call ran with

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        """One whisper_full call per clip (whisper.cpp decodes one clip at a time; batch_size is accepted
        for the Engine interface and ignored)."""
        pw, p = self._pw, self._params
        texts, self.last_audio_ctx = [], []
        for audio in audios:
            audio = np.ascontiguousarray(np.asarray(audio, np.float32).reshape(-1)[:30 * SAMPLING_RATE])
            ctx = self.audio_ctx if self.audio_ctx_for is None else int(self.audio_ctx_for(audio))
            if not 0 <= ctx <= self.n_audio_ctx:
                raise ValueError(f"audio_ctx {ctx} for a {len(audio) / SAMPLING_RATE:.2f} s clip: expected 0 to "
                                 f"{self.n_audio_ctx}")
            p.audio_ctx = ctx
            # the one segment ends once token index max_tokens is sampled: budget - 1 gives `budget` tokens
            p.max_tokens = max(1, token_budget([audio]) - 1)
            rc = pw.whisper_full(self._ctx, p, audio, audio.size)
            if rc != 0:
                raise RuntimeError(f"whisper_full failed with code {rc} (audio_ctx {ctx})")
            n = pw.whisper_full_n_segments(self._ctx)
            segments = [pw.whisper_full_get_segment_text(self._ctx, i).decode("utf-8", errors="replace")
                        for i in range(n)]
            texts.append(" ".join(s.strip() for s in segments).strip())
            self.last_audio_ctx.append(ctx or self.n_audio_ctx)
        return texts

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self._free(self._ctx)
            self._ctx = None

    def __del__(self):
        self.close()
