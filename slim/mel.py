"""Whisper's log-mel features in numpy: what transformers' `WhisperFeatureExtractor` computes, without torch.

    audio (16 kHz mono float) -> zero-padded / cut to `n_samples` (30 s) -> STFT (periodic Hann window of
    `n_fft`, hop `hop_length`, reflect-padded by n_fft/2 at both ends, last frame dropped) -> power ->
    Slaney mel filter bank (`feature_size` bands, 0-8 kHz, Slaney area normalization) -> log10 (floor 1e-10)
    -> clamped to the clip's maximum minus 8 -> (x + 4) / 4

The settings come from the export's saved feature extractor (`processor_config.json`, or the older
`preprocessor_config.json`), so an export made from a processor with other settings is featurized the way
it was trained. Computed in float64 and returned as float32: within 1e-4 of the torch path that
transformers takes when torch is installed, and of its numpy path (tests/test_runtime.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def hertz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    f = np.asarray(f, np.float64)
    logstep = 27.0 / np.log(6.4)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * logstep)


def mel_to_hertz(m):
    m = np.asarray(m, np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(logstep * (m - 15.0)))


def mel_filter_bank(n_freqs: int, n_mels: int, sampling_rate: int, f_min: float = 0.0,
                    f_max: float = 8000.0) -> np.ndarray:
    """(n_freqs, n_mels) triangular filters, evenly spaced on the Slaney mel scale, each scaled to unit area."""
    edges = mel_to_hertz(np.linspace(hertz_to_mel(f_min), hertz_to_mel(f_max), n_mels + 2))
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)
    width = np.diff(edges)
    dist = edges[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


@dataclass(frozen=True)
class LogMel:
    """The feature extractor's settings (WhisperFeatureExtractor's names) and the features they give."""

    feature_size: int = 80
    n_fft: int = 400
    hop_length: int = 160
    n_samples: int = 480000
    sampling_rate: int = 16000

    @classmethod
    def from_dir(cls, d: str | Path) -> "LogMel":
        """The settings saved in an export or model directory; FileNotFoundError names the file looked for."""
        from slim.export_format import PROCESSOR_FILES

        for name in PROCESSOR_FILES:
            f = Path(d) / name
            if f.exists():
                cfg = json.loads(f.read_text())
                cfg = cfg.get("feature_extractor", cfg)  # processor_config.json nests it
                if cfg.get("dither", 0.0):
                    raise ValueError(f"{f}: dither={cfg['dither']} (random noise per call) is not supported")
                return cls(**{k: int(cfg[k]) for k in cls.__dataclass_fields__ if k in cfg})
        raise FileNotFoundError(f"{Path(d) / PROCESSOR_FILES[0]}: missing (nor {PROCESSOR_FILES[1]}): "
                                "the directory has no feature extractor settings")

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length

    def filters(self) -> np.ndarray:
        return _filters(self.n_fft // 2 + 1, self.feature_size, self.sampling_rate)

    def __call__(self, audios: list[np.ndarray], frames: int | None = None) -> np.ndarray:
        """(B, feature_size, n_frames) float32 features of 16 kHz mono float clips, or only their first
        `frames` (an audio window, `slim.window`), computed from the audio and one FFT window of the padding
        after them: what the full features hold there, without transforming 30 s of silence. (The
        normalization's maximum is the same: padding is the quietest possible frame.)"""
        keep = self.n_frames if frames is None else min(int(frames), self.n_frames)
        length = min(self.n_samples, keep * self.hop_length + self.n_fft)
        x = np.zeros((len(audios), length), np.float64)
        for i, a in enumerate(audios):
            a = np.asarray(a, np.float64).reshape(-1)[:length]
            x[i, :len(a)] = a
        pad = self.n_fft // 2
        x = np.pad(x, ((0, 0), (pad, pad)), mode="reflect")
        n = 1 + (x.shape[1] - self.n_fft) // self.hop_length
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft, axis=1)[:, ::self.hop_length][:, :min(n - 1, keep)]
        window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.n_fft) / self.n_fft)  # periodic Hann
        power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (B, frames, n_freqs)
        log = np.log10(np.maximum(power @ self.filters(), 1e-10))
        log = np.maximum(log, log.max(axis=(1, 2), keepdims=True) - 8.0)
        return np.ascontiguousarray(((log + 4.0) / 4.0).transpose(0, 2, 1), dtype=np.float32)


_cache: dict = {}


def _filters(n_freqs: int, n_mels: int, sampling_rate: int) -> np.ndarray:
    key = (n_freqs, n_mels, sampling_rate)
    if key not in _cache:
        _cache[key] = mel_filter_bank(n_freqs, n_mels, sampling_rate)
    return _cache[key]
