"""How far a few input channels of each Linear stand out: the peak |x| per input channel over the first
utterances of a set (teacher-forced on their transcripts), printed per Linear as the largest peak, the
(k+1)-th largest (the range a per-tensor grid covers once the k largest channels skip it:
`quant.outlier_channels`), their ratio, and the uint8 grid step each range gives.

    .venv/bin/python benchmarks/channel_peaks.py MODEL --data SET [--limit 16] [--k 16,32]
        [--pattern "model.encoder.layers.*.fc2"] [--out R.json]

MODEL: a float model directory this project wrote (`00-base/model` of a run, `./launch.sh import`); SET: a
JSONL manifest or audio folder (training audio: these are the activations calibration sees).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def channel_peaks(model_dir: str, data: str, patterns: list[str], limit: int) -> dict[str, list[float]]:
    """Linear name -> peak |input| per input channel, over the first `limit` good utterances of `data`."""
    import torch

    from slim.data import iter_examples
    from slim.model import load_model, load_processor

    model = load_model(model_dir).eval()
    processor = load_processor(model_dir)
    peaks: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, args):
            x = args[0].detach().abs().flatten(0, -2).amax(0).float()
            peaks[name] = x if name not in peaks else torch.maximum(peaks[name], x)
        return record

    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not linears:
        raise SystemExit(f"--pattern {patterns}: no Linear of {model_dir} matches")
    for n, m in linears:
        m.register_forward_pre_hook(hook(n))
    n_seen = 0
    with torch.no_grad():
        for ex in iter_examples(data, tokenizer=processor.tokenizer, limit=limit):
            feats = processor(ex["audio"], sampling_rate=16000, return_tensors="pt").input_features
            ids = torch.tensor([processor.tokenizer(ex["text"]).input_ids[:-1]])  # teacher forcing, no EOS
            model(input_features=feats, decoder_input_ids=ids)
            n_seen += 1
    if not n_seen:
        raise SystemExit(f"{data}: no utterance to run")
    return {n: peaks[n].tolist() for n, _ in linears if n in peaks}


def summary(peaks: dict[str, list[float]], ks: list[int]) -> list[dict]:
    """Per Linear: the largest peak, the (k+1)-th for each k, the ratio, and the uint8 step of each range."""
    rows = []
    for name, p in peaks.items():
        s = sorted(p, reverse=True)
        row = {"linear": name, "max": s[0], "step": s[0] / 255}
        for k in ks:
            row[f"k{k}"] = s[min(k, len(s) - 1)]
            row[f"ratio_k{k}"] = s[0] / max(row[f"k{k}"], 1e-12)
            row[f"step_k{k}"] = row[f"k{k}"] / 255
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--k", default="16,32", help="comma-separated channel counts kept float")
    p.add_argument("--pattern", action="append", default=None,
                   help="fnmatch pattern of Linear names (repeatable; default: every Linear of the layers)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the per-channel peaks and the summary as JSON here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    peaks = channel_peaks(args.model, args.data, args.pattern or ["model.*.layers.*"], args.limit)
    rows = summary(peaks, ks)
    head = f"{'linear':45s} {'max':>8s} {'step':>7s}" + "".join(f" {'k' + str(k):>7s} {'x':>5s} {'step':>7s}" for k in ks)
    print(head)
    for r in rows:
        print(f"{r['linear']:45s} {r['max']:8.2f} {r['step']:7.4f}" + "".join(
            f" {r[f'k{k}']:7.2f} {r[f'ratio_k{k}']:5.1f} {r[f'step_k{k}']:7.4f}" for k in ks))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": rows, "peaks": peaks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
