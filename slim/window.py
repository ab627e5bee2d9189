"""Audio windows: a model that encodes only the frames a clip needs (instead of Whisper's fixed 30 s) says so
in its structure (`audio_window`), and every engine asks `window_frames` how many mel frames to feed it.
Plain Python, so the torch-free runtime shares the one rule with training and the torch engines.

Two kinds of window (`context`):
- trained (no `context`): the model was fine-tuned to encode the window alone (`kind: audio-context`);
- "silence": an unchanged model encodes the window's frames, and wherever it would have read the rest of
  the 30 s input (the encoder's self-attention, the decoder's cross-attention) it reads the states the
  same model computes for a silent 30 s input instead, computed once per model (`SILENCE_LEVELS`). No
  training; engines that cannot do this (sherpa-onnx, transformers.js) run such a model on 30 s.
"""

from __future__ import annotations

import math

MEL_FRAMES_PER_SECOND = 100  # the feature extractor's hop: 160 samples at 16 kHz
WINDOW_KEYS = {"margin_s": (int, float), "frame_multiple": int}
OPTIONAL_KEYS = ["context", "max_s"]
CONTEXTS = ("silence",)
SILENCE_LEVELS = (-1.0, -0.75, -0.5)
"""Log-mel values of the silent inputs whose states a "silence" window reads (every frame the one value):
each clip reads the one nearest its own padding's value, the floor the feature extractor gives padding,
(max - 4) / 4 for a clip whose log10 power peaks at max; real clips' floors lie between -1.05 and -0.5."""


SILENCE_WINDOW = {"margin_s": 0.5, "frame_multiple": 16, "context": "silence", "max_s": 10.0}
"""The measured "silence" window (docs/short-clips.md): ceil(duration) + 0.5 s, and the full 30 s for clips
whose window would pass 10 s (the silent rest stands in less well for the padding after long speech: without
the cap, +1.01 WER against the 30 s model on the synthetic eval set and +1.28 on 28 s windows; with it, -0.18
and -0.12)."""


def silence_level(floor: float) -> float:
    """The `SILENCE_LEVELS` value nearest a clip's padding floor (its features' minimum)."""
    return min(SILENCE_LEVELS, key=lambda v: abs(v - floor))


def batch_levels(floors) -> list[float]:
    """The silent input each clip of a batch reads (`silence_level` of each floor); a single one when they
    all read the same, which the engines then broadcast over the batch."""
    levels = [silence_level(float(f)) for f in floors]
    return levels[:1] if len(set(levels)) == 1 else levels


def check_audio_window(window: dict, where: str = "audio_window") -> dict:
    """`window` checked: {"margin_s": seconds of padding kept after the audio's last whole second,
    "frame_multiple": encoder frames the window is rounded up to, and optionally "context": "silence"
    (see the module docstring) and "max_s": a window longer than this many seconds is the full 30 s}; a bad
    one fails naming the key."""
    if not isinstance(window, dict):
        raise ValueError(f"{where} must be a mapping with {sorted(WINDOW_KEYS)}, got {window!r}")
    unknown = set(window) - set(WINDOW_KEYS) - set(OPTIONAL_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(WINDOW_KEYS) + OPTIONAL_KEYS})")
    if window.get("context") is not None and window["context"] not in CONTEXTS:
        raise ValueError(f"{where}.context must be one of {list(CONTEXTS)} or absent, got {window['context']!r}")
    top = window.get("max_s")
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, float)) or top <= 0):
        raise ValueError(f"{where}.max_s must be a number of seconds > 0 or absent, got {top!r}")
    for key, kind in WINDOW_KEYS.items():
        v = window.get(key)
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ValueError(f"{where}.{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if window["margin_s"] < 0:
        raise ValueError(f"{where}.margin_s must be >= 0, got {window['margin_s']}")
    if window["frame_multiple"] < 1:
        raise ValueError(f"{where}.frame_multiple must be >= 1, got {window['frame_multiple']}")
    return window


def window_frames(window: dict | None, audio_frames: int, max_frames: int) -> int:
    """Mel frames to encode for a clip (or batch) whose longest audio spans `audio_frames` mel frames:
    ceil(duration) + margin seconds, rounded up so the encoder gets a multiple of `frame_multiple` frames
    (two mel frames each), at most `max_frames` (30 s). Without a window: always `max_frames`."""
    if window is None:
        return max_frames
    seconds = math.ceil(audio_frames / MEL_FRAMES_PER_SECOND) + window["margin_s"]
    encoder_frames = math.ceil(seconds * MEL_FRAMES_PER_SECOND / 2)
    m = int(window["frame_multiple"])
    frames = min(max_frames, 2 * m * math.ceil(encoder_frames / m))
    if window.get("max_s") is not None and frames > window["max_s"] * MEL_FRAMES_PER_SECOND:
        return max_frames
    return frames


FROM_MODEL = "model"


def engine_window(model_window: dict | None, override) -> dict | None:
    """The window an engine uses: the model's own (`override` "model"), none (None: always 30 s), or
    `override` itself, a window forced on a model that was not trained for it (untrained truncation, the
    contrast benchmarks measure)."""
    if override == FROM_MODEL:
        return model_window
    return None if override is None else check_audio_window(override, "audio_window")


def silence_context(window: dict | None) -> bool:
    """Whether `window` reads a silent input's states beyond its frames (the module docstring)."""
    return window is not None and window.get("context") == "silence"


def clip_frames(audio, hop_length: int = 160) -> int:
    """Mel frames a clip of samples spans (the feature extractor's frame count before padding)."""
    return -(-len(audio) // hop_length)
