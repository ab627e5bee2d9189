"""How much of Whisper's 30 s window a set's clips fill, and how much of a model's encoder energy (the sum of
squared hidden states, layer by layer) lies on the frames past each clip's audio: what `pad_weight` of the
repair and of the hidden-state distillation turns down (docs/real-speech.md, "Speech frames against padding").

    .venv/bin/python benchmarks/padding_energy.py MODEL DATA [--energy-limit 16]

DATA: a manifest, audio folder or `hf:` spec (`slim.data.iter_examples`). The window fill is over every clip,
the energy over the first `--energy-limit` (one encoder forward each).
"""

from __future__ import annotations

import argparse

import torch

from slim.audio import MAX_SECONDS, SAMPLING_RATE
from slim.data import features_and_labels, frame_weights, iter_examples
from slim.model import load_model, load_processor


def padding_energy(model_dir: str, data: str, energy_limit: int = 16) -> dict:
    model, processor = load_model(model_dir).eval(), load_processor(model_dir)
    enc = model.model.encoder
    frames = enc.config.max_source_positions
    seconds, speech, past = [], None, None
    for i, ex in enumerate(iter_examples(data)):
        audio = ex["audio"]
        seconds.append(len(audio) / SAMPLING_RATE)
        if i >= energy_limit:
            continue
        f = features_and_labels(audio, ex["text"], processor)
        with torch.no_grad():
            states = enc(f["input_features"][None], output_hidden_states=True).hidden_states[1:]
        inside = frame_weights(f["audio_frames"][None], frames, 0.0)[0].bool()
        e = [h[0].pow(2).sum(-1) for h in states]
        speech = [a + float(x[inside].sum()) for a, x in zip(speech or [0.0] * len(e), e)]
        past = [a + float(x[~inside].sum()) for a, x in zip(past or [0.0] * len(e), e)]
    return {"clips": len(seconds), "mean_seconds": sum(seconds) / len(seconds),
            "window_fill": sum(min(s, MAX_SECONDS) / MAX_SECONDS for s in seconds) / len(seconds),
            "energy_clips": min(energy_limit, len(seconds)),
            "energy_past_audio": [p / (s + p) for s, p in zip(speech or [], past or [])]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--energy-limit", type=int, default=16)
    a = ap.parse_args(argv)
    r = padding_energy(a.model, a.data, a.energy_limit)
    print(f"{r['clips']} clips, {r['mean_seconds']:.2f} s on average, {100 * r['window_fill']:.1f}% of the 30 s window")
    print(f"encoder energy past the audio (first {r['energy_clips']} clips), layer by layer: "
          + " ".join(f"{100 * x:.1f}%" for x in r["energy_past_audio"]))


if __name__ == "__main__":
    main()
