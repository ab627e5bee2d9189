"""Audio decoding: any file soundfile reads (wav, flac, ogg, mp3) -> float32 mono at 16 kHz.

The one decoding path of the project. `datasets` 5.x decodes audio only through torchcodec (an FFmpeg
binding we do not ship), so hub corpora are read with `Audio(decode=False)` and their bytes come here too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLING_RATE = 16000
"""Whisper's input rate."""
MAX_SECONDS = 30.0
"""Whisper's window: longer audio would be cut silently, so data loading skips it."""


class AudioError(Exception):
    """A file (or byte string) that cannot be decoded; `path` names it, `reason` says why."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def to_mono_16k(audio: np.ndarray, rate: int, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Average the channels of a (frames,) or (frames, channels) array and resample it (soxr, high quality)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    if rate != sampling_rate and len(audio):
        audio = soxr.resample(audio, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio(path: str | Path, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode PATH to float32 mono at SAMPLING_RATE; raises AudioError (never soundfile's) when it can't."""
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "no such file")
    if not path.is_file():
        raise AudioError(path, "not a file")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.SoundFileError, RuntimeError, ValueError) as e:
        raise AudioError(path, f"not readable as audio ({e})") from e
    return to_mono_16k(audio, rate, sampling_rate)


def decode_audio(data: bytes, name: str = "<bytes>", sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Like `load_audio` for an encoded file held in memory (a `datasets` row's audio bytes)."""
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (sf.SoundFileError, RuntimeError, ValueError) as e:
        raise AudioError(name, f"not readable as audio ({e})") from e
    return to_mono_16k(audio, rate, sampling_rate)
