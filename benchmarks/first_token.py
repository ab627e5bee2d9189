"""How sure a float model is of the first word of a clip: the top first-token log-probabilities after the
model's decoder prompt (its tokenizer's prefix).

    .venv/bin/python benchmarks/first_token.py MODEL AUDIO [--top 5]

MODEL: a float model directory this project wrote (`slim.model.load_model`: `00-base/model` of a run, a pruned
stage's model, `./launch.sh import`); AUDIO: a wav/flac file. Features are transformers' (30 s window). A small
gap between the first two entries means a small change to the model (quantization, a retrain) can flip the word.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def first_token_logprobs(model_dir: str, audio: str, top: int) -> list[tuple[str, float]]:
    import torch

    from slim.audio import load_audio
    from slim.model import load_model, load_processor

    model = load_model(model_dir)  # dense, pruned or windowed float directories alike
    processor = load_processor(model_dir)
    features = processor(load_audio(audio), sampling_rate=16000, return_tensors="pt").input_features
    prompt = processor.tokenizer.prefix_tokens  # the decoder prompt the model's training labels start with
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=torch.tensor([prompt])).logits[0, -1]
    best = logits.log_softmax(-1).topk(top)
    return [(processor.tokenizer.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("audio")
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args()
    for token, logprob in first_token_logprobs(args.model, args.audio, args.top):
        print(f"{token!r:>16} {logprob:8.3f}")


if __name__ == "__main__":
    main()
