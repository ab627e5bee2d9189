"""How hard `train.augment`'s transforms are: a model's WER on clean clips and on each transform at its harshest.

    .venv/bin/python benchmarks/bench_augment.py MODEL [--data MANIFEST] [--threads 2] [--out results.json]

Each row applies one transform of slim.augment to every clip at the end of its range (speed 0.9 and 1.1, a
0.6 s room, a 3.4 kHz low-pass, white/pink/brown noise at 10 dB SNR), the last row all four as
`augment_audio` draws them with every probability at 1. Clip i draws from `numpy.random.default_rng(i)`.
Greedy decoding, the model's default engine (`./launch.sh eval`'s), WER after Whisper's English normalizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def transforms():
    from slim.augment import AugmentConfig, add_noise, augment_audio, change_speed, lowpass, reverberate

    every = AugmentConfig(enabled=True, speed_p=1.0, reverb_p=1.0, lowpass_p=1.0, noise_p=1.0)
    rows = {"clean": lambda a, r: a,
            "speed 0.9": lambda a, r: change_speed(a, 0.9),
            "speed 1.1": lambda a, r: change_speed(a, 1.1),
            "room, RT60 0.6 s": lambda a, r: reverberate(a, r, 0.6),
            "low-pass 3.4 kHz": lambda a, r: lowpass(a, 3400.0)}
    for colour in ("white", "pink", "brown"):
        rows[f"{colour} noise, 10 dB SNR"] = lambda a, r, c=colour: add_noise(a, r, 10.0, c)
    rows["all four, default ranges"] = lambda a, r: augment_audio(a, every, r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--data", default=str(ROOT / "data" / "real-speech" / "manifest.jsonl"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args(argv)
    from eval.engines import load_engine
    from eval.metrics import word_error_rate
    from slim.data import iter_examples

    clips = list(iter_examples(a.data))
    refs = [c["text"] for c in clips]
    engine = load_engine(a.model, threads=a.threads)
    results = {}
    for name, fn in transforms().items():
        hyps = engine.transcribe([fn(c["audio"], np.random.default_rng(i)) for i, c in enumerate(clips)])
        results[name] = word_error_rate(refs, hyps)
        print(f"{name:28s} WER {100 * results[name]:6.2f}%", flush=True)
    if a.out:
        from slim.io import atomic_write_json

        atomic_write_json(a.out, {"model": a.model, "data": a.data, "threads": a.threads, "wer": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
