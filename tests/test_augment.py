"""Waveform augmentation (slim.augment): each transform does what it says, measured on signals whose answer
is known, and a training set's draws depend on (seed, epoch, item) only."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from slim.augment import (MAX_SAMPLES, SAMPLING_RATE, AugmentConfig, add_noise, augment_audio, change_speed,
                          coloured_noise, item_rng, lowpass, reverberate, room_impulse_response)


def sine(freq: float, seconds: float = 1.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1.0 / SAMPLING_RATE)[np.argmax(spec)])


def power(x) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def test_add_noise_sets_the_signal_to_noise_ratio():
    x = sine(440.0)
    for colour in ("white", "pink", "brown"):
        for snr in (0.0, 10.0, 30.0):
            noisy = add_noise(x, np.random.default_rng(1), snr, colour)
            assert 10 * np.log10(power(x) / power(noisy - x)) == pytest.approx(snr, abs=1e-3)


def test_noise_colours_fall_3_and_6_db_per_octave():
    def band_power(n, lo, hi):
        spec = np.abs(np.fft.rfft(n)) ** 2
        f = np.fft.rfftfreq(len(n), 1.0 / SAMPLING_RATE)
        return spec[(f >= lo) & (f < hi)].mean()

    for colour, slope in (("white", 0.0), ("pink", -3.01), ("brown", -6.02)):
        n = coloured_noise(np.random.default_rng(0), 20 * SAMPLING_RATE, colour)
        assert power(n) == pytest.approx(1.0)
        db = 10 * np.log10(band_power(n, 2000, 2200) / band_power(n, 1000, 1100))  # one octave up
        assert db == pytest.approx(slope, abs=0.5)


def test_lowpass_removes_what_is_above_the_cutoff_and_keeps_what_is_below():
    low, high = sine(500.0), sine(5000.0)
    out = lowpass(low + high, 3400.0)
    np.testing.assert_allclose(out, low, atol=1e-4)


def test_change_speed_scales_duration_and_frequency():
    x = sine(400.0, seconds=2.0)
    for factor in (0.9, 1.1):
        y = change_speed(x, factor)
        assert len(y) == pytest.approx(len(x) / factor, abs=2)
        assert peak_hz(y) == pytest.approx(400.0 * factor, abs=1.0)


def test_room_impulse_response_decays_60_db_in_rt60_and_reverb_keeps_length_and_level():
    rt60 = 0.4
    h = room_impulse_response(np.random.default_rng(0), rt60)
    assert len(h) == int(rt60 * SAMPLING_RATE) and h[0] == 1.0
    assert np.all(h[1:int(0.005 * SAMPLING_RATE)] == 0.0)  # the gap before the tail
    tail = h[int(0.005 * SAMPLING_RATE):]
    first, last = tail[:800], tail[-800:]  # 50 ms windows, 0.345 s apart
    decay_db = 10 * np.log10(power(first) / power(last))
    assert decay_db == pytest.approx(60 * (len(tail) - 800) / (rt60 * SAMPLING_RATE), abs=4.0)
    x = sine(300.0)
    y = reverberate(x, np.random.default_rng(0), rt60)
    assert len(y) == len(x) and power(y) == pytest.approx(power(x), rel=1e-4)
    assert not np.allclose(y, x, atol=1e-3)


def test_augment_is_the_identity_at_zero_probability_and_never_goes_over_30_s():
    x = sine(300.0, seconds=3.0)
    off = AugmentConfig(enabled=True, speed_p=0.0, reverb_p=0.0, lowpass_p=0.0, noise_p=0.0)
    assert np.array_equal(augment_audio(x, off, item_rng(0, 0, 0)), x)
    slow = AugmentConfig(enabled=True, speed_p=1.0, speed=(0.5, 0.5), reverb_p=0.0, lowpass_p=0.0, noise_p=0.0)
    assert len(augment_audio(x, slow, item_rng(0, 0, 0))) == pytest.approx(2 * len(x), abs=2)
    long = sine(300.0, seconds=29.0)
    assert len(augment_audio(long, slow, item_rng(0, 0, 0))) <= MAX_SAMPLES


def test_draws_depend_on_seed_epoch_and_item_only():
    x = sine(300.0)
    cfg = AugmentConfig(enabled=True, speed_p=1.0, reverb_p=1.0, lowpass_p=1.0, noise_p=1.0)
    a = augment_audio(x, cfg, item_rng(3, 1, 7))
    assert np.array_equal(a, augment_audio(x, cfg, item_rng(3, 1, 7)))
    for other in (item_rng(4, 1, 7), item_rng(3, 2, 7), item_rng(3, 1, 8), item_rng(3, 1, 7, part=1)):
        b = augment_audio(x, cfg, other)
        assert len(a) != len(b) or not np.allclose(a, b)


def test_a_lazy_training_set_augments_per_epoch_and_its_worker_copies_agree(tmp_path):
    """What a DataLoader worker gets is a pickled copy of the dataset: it draws exactly what the original
    draws, an epoch's draws are not the next epoch's, and calibration (no augmentation) reads the clip."""
    import json

    import soundfile as sf

    from slim.data import open_train_source
    from slim.sources import tiny_random_processor

    sf.write(str(tmp_path / "a.wav"), sine(300.0), SAMPLING_RATE)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "one two"}) + "\n")
    proc = tiny_random_processor()
    cfg = AugmentConfig(enabled=True, speed_p=0.0, reverb_p=1.0, lowpass_p=1.0, noise_p=1.0)
    ds, _ = open_train_source(tmp_path / "m.jsonl", proc, augment=cfg, seed=5)
    plain, _ = open_train_source(tmp_path / "m.jsonl", proc)
    e0 = ds[0]["input_features"]
    assert not np.allclose(e0, plain[0]["input_features"])
    assert np.array_equal(pickle.loads(pickle.dumps(ds))[0]["input_features"], e0)
    ds.set_epoch(1)
    e1 = ds[0]["input_features"]
    assert not np.allclose(e0, e1)
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy[0]["input_features"], e1)
    ds.set_epoch(0)
    assert np.array_equal(ds[0]["input_features"], e0)
    disabled, _ = open_train_source(tmp_path / "m.jsonl", proc, augment=AugmentConfig(enabled=False))
    assert np.array_equal(disabled[0]["input_features"], plain[0]["input_features"])
