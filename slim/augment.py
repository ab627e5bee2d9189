"""Waveform augmentation of training audio: speed, room reverberation, band limiting and additive noise.

Synthetic training speech is clean, dry, full-band and recorded at one level; real speech is none of
those. When a stage distils from a teacher, the teacher sees the same augmented audio, so augmentation
widens the inputs on which the student learns to copy the teacher without needing any labels for them.

Each clip's augmentation is a function of (seed, epoch, item index) only (`augment_audio`), so a resumed run
draws exactly what the uninterrupted one drew, whichever DataLoader worker decodes the item.

Written with numpy (and the audio loader's resampler for the speed change) rather than with
audiomentations: that library pulls librosa, numba and scipy into every training install, JIT-compiles in
each DataLoader worker, and its reverberation needs impulse-response files we do not have. The four
transforms here are a few lines each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slim.audio import MAX_SECONDS, SAMPLING_RATE, to_mono_16k

MAX_SAMPLES = int(MAX_SECONDS * SAMPLING_RATE)


def _check_range(name: str, lo_hi, lo_bound: float, hi_bound: float) -> None:
    if len(lo_hi) != 2 or not lo_bound <= lo_hi[0] <= lo_hi[1] <= hi_bound:
        raise ValueError(f"augment.{name} must be [low, high] with {lo_bound} <= low <= high <= {hi_bound}, "
                         f"got {list(lo_hi)}")


@dataclass
class AugmentConfig:
    enabled: bool = False
    """Augment the training audio of this stage (calibration, evaluation and the dense eval are never
    augmented)."""
    speed_p: float = 0.3
    """Probability of a speed change (tempo and pitch together, Kaldi-style speed perturbation)."""
    speed: tuple[float, float] = (0.9, 1.1)
    """Range of the speed factor (>1 is faster); a factor that would take a clip over 30 s is raised to fit."""
    reverb_p: float = 0.3
    """Probability of room reverberation: convolution with an exponentially decaying noise impulse response."""
    rt60_s: tuple[float, float] = (0.15, 0.6)
    """Range of the reverberation time (seconds for a 60 dB decay)."""
    lowpass_p: float = 0.2
    """Probability of band limiting (telephone and cheap microphones): everything above the cutoff removed."""
    lowpass_hz: tuple[float, float] = (3400.0, 7000.0)
    """Range of the low-pass cutoff in Hz (8000 is Nyquist at 16 kHz)."""
    noise_p: float = 0.5
    """Probability of additive noise: white, pink or brown, one drawn per clip."""
    snr_db: tuple[float, float] = (10.0, 35.0)
    """Range of the signal-to-noise ratio in dB."""

    def __post_init__(self):
        for name in ("speed_p", "reverb_p", "lowpass_p", "noise_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {p}")
        _check_range("speed", self.speed, 0.5, 2.0)
        _check_range("rt60_s", self.rt60_s, 0.01, 3.0)
        _check_range("lowpass_hz", self.lowpass_hz, 100.0, SAMPLING_RATE / 2)
        _check_range("snr_db", self.snr_db, -20.0, 100.0)


def item_rng(seed: int, epoch: int, index: int, part: int = 0) -> np.random.Generator:
    """The generator of one item's augmentation in one epoch (`part`: a process's part of a streamed set)."""
    return np.random.default_rng([seed, epoch, index, part, 0xA6])


@dataclass
class Augmentation:
    """A training set's augmentation and the seed and epoch its draws depend on (the datasets of slim.data
    hold one; their `set_epoch`, which the DataLoader calls each epoch, sets `epoch`)."""

    config: AugmentConfig
    seed: int
    epoch: int = 0
    part: int = 0
    """Which process's part of a streamed set (its rows are numbered from 0 in every part)."""

    def __call__(self, audio: np.ndarray, index: int) -> np.ndarray:
        return augment_audio(audio, self.config, item_rng(self.seed, self.epoch, index, self.part))


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """AUDIO played `factor` times faster (shorter and higher for factor > 1): read as if recorded at
    factor x 16 kHz and resampled to 16 kHz."""
    return to_mono_16k(audio, SAMPLING_RATE * factor)


def _fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]


def room_impulse_response(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """A direct path followed by Gaussian noise decaying by 60 dB in `rt60` seconds (the diffuse tail of a
    room), with the first 5 ms after the direct sound left empty, as before a first reflection."""
    n = max(2, int(rt60 * SAMPLING_RATE))
    t = np.arange(n) / SAMPLING_RATE
    h = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # ln(1000) = 6.9078: 60 dB in amplitude
    h[: int(0.005 * SAMPLING_RATE)] = 0.0
    h *= 0.5 / max(np.sqrt(np.sum(h ** 2)), 1e-12)  # direct-to-reverberant energy ratio of 6 dB
    h[0] = 1.0
    return h


def reverberate(audio: np.ndarray, rng: np.random.Generator, rt60: float) -> np.ndarray:
    """AUDIO in a room of reverberation time `rt60`, cut to its length and kept at its energy."""
    wet = _fft_convolve(audio.astype(np.float64), room_impulse_response(rng, rt60))
    return (wet * _rms(audio) / max(_rms(wet), 1e-12)).astype(np.float32)


def lowpass(audio: np.ndarray, cutoff_hz: float) -> np.ndarray:
    """AUDIO with everything above `cutoff_hz` removed (a brick-wall filter in the frequency domain)."""
    spec = np.fft.rfft(audio.astype(np.float64))
    freqs = np.fft.rfftfreq(len(audio), 1.0 / SAMPLING_RATE)
    spec[freqs > cutoff_hz] = 0.0
    return np.fft.irfft(spec, len(audio)).astype(np.float32)


def coloured_noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    """Unit-RMS noise with a power spectrum flat (white), falling 3 dB (pink) or 6 dB (brown) per octave."""
    white = rng.standard_normal(n)
    if colour != "white":
        spec = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, 1.0 / SAMPLING_RATE)
        f[0] = f[1] if n > 1 else 1.0
        spec /= np.sqrt(f) if colour == "pink" else f
        white = np.fft.irfft(spec, n)
    return white / max(_rms(white), 1e-12)


def add_noise(audio: np.ndarray, rng: np.random.Generator, snr_db: float, colour: str) -> np.ndarray:
    """AUDIO plus noise `snr_db` below its RMS level."""
    noise = coloured_noise(rng, len(audio), colour) * _rms(audio) * 10.0 ** (-snr_db / 20.0)
    return (audio + noise).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def augment_audio(audio: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One draw of CFG's transforms on a 16 kHz clip, in the order a recording chain applies them: the
    talker's speed, the room, the microphone's band, the noise. Every random number is drawn whether or not
    its transform fires, so one setting's probability does not change the others' draws."""
    u = rng.random(4)
    speed = rng.uniform(*cfg.speed)
    rt60 = rng.uniform(*cfg.rt60_s)
    cutoff = rng.uniform(*cfg.lowpass_hz)
    snr = rng.uniform(*cfg.snr_db)
    colour = ("white", "pink", "brown")[int(rng.integers(3))]
    room_rng, noise_rng = rng.spawn(2)
    out = np.asarray(audio, dtype=np.float32)
    if u[0] < cfg.speed_p and len(out):
        speed = max(speed, len(out) / MAX_SAMPLES)  # never over 30 s
        if speed != 1.0:
            out = change_speed(out, speed)
    if u[1] < cfg.reverb_p and len(out):
        out = reverberate(out, room_rng, rt60)
    if u[2] < cfg.lowpass_p and len(out):
        out = lowpass(out, cutoff)
    if u[3] < cfg.noise_p and len(out):
        out = add_noise(out, noise_rng, snr, colour)
    return out
