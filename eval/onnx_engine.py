"""The torch reference of the slim runtime (`slim.runtime.OnnxEngine`) and their parity.

`torch_greedy_tokens` decodes a torch model (float, fake-quant or pruned) under the export's decoding rules;
`parity` and `parity_report` compare its greedy tokens with the engine's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slim.decoding import token_budget
from slim.export_format import DecodeConfig
from slim.runtime import OnnxEngine, ban_repeats, forced_schedule, greedy_step


# ---------------------------------------------------------------------------------------------
# the torch reference and parity


def torch_greedy_tokens(model, features, decode: DecodeConfig, max_new_tokens: int | None = None,
                        forced: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy tokens of a torch Whisper (float, fake-quant, pruned) under the export's decoding rules;
    `forced` as in `OnnxEngine.generate_tokens`."""
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model = model.eval()
    feats = torch.as_tensor(np.asarray(features, np.float32))
    B = feats.shape[0]
    vocab = model.config.vocab_size
    suppress = torch.zeros(vocab)
    suppress[decode.suppress_tokens] = float("-inf")
    begin = suppress.clone()
    begin[decode.begin_suppress_tokens] = float("-inf")
    steps = forced_schedule(decode, max_new_tokens, forced, B)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        ids = torch.tensor([decode.prompt] * B, dtype=torch.long)
        for step in range(steps):
            h = model.model.decoder(input_ids=ids, encoder_hidden_states=enc, past_key_values=cache,
                                    use_cache=True).last_hidden_state[:, -1]
            logits = model.proj_out(h).float() + (begin if step == 0 else suppress)
            ban_repeats(logits, step, out, done, forced, decode.max_repeats)
            nxt = greedy_step(logits.argmax(-1).tolist(), step, out, done, decode.eos_token_id, forced)
            if done.all():
                break
            ids = torch.tensor(nxt, dtype=torch.long)[:, None]
    return out


def token_agreement(refs: list[list[int]], hyps: list[list[int]]) -> float:
    """1 - (token edit distance) / (longer length), pooled over utterances: 1.0 means identical."""
    import jiwer

    total = sum(max(len(r), len(h)) for r, h in zip(refs, hyps))
    if total == 0:
        return 1.0
    errors = 0
    for r, h in zip(refs, hyps):
        if r == h:
            continue
        if not r or not h:
            errors += max(len(r), len(h))
            continue
        o = jiwer.process_words(" ".join(map(str, r)), " ".join(map(str, h)))
        errors += o.substitutions + o.deletions + o.insertions
    return 1.0 - errors / total


def next_token_agreement(refs: list[list[int]], picks: list[list[int]], eos: int,
                         budgets: list[int] | None = None) -> float:
    """Share of decoding positions where an engine fed `refs` (teacher forcing) picks the same next token:
    picks[b] are its picks at the len(refs[b]) + 1 positions of refs[b] followed by eos. budgets[b]: the
    token budget refs[b] was decoded with; a reference that filled it was cut, not ended by eos, so its
    last position is not compared.

    Unlike `token_agreement` of two free-running decodes, one differing pick costs one position, not
    the rest of the utterance (after it the two decodes continue from different prefixes)."""
    total = same = 0
    for b, (r, p) in enumerate(zip(refs, picks, strict=True)):
        want = list(r) + [eos]
        if len(p) != len(want):
            raise ValueError(f"{len(p)} picks for {len(want)} teacher-forced positions")
        if budgets is not None and len(r) >= budgets[b]:
            want, p = want[:-1], p[:-1]
        total += len(want)
        same += sum(a == b for a, b in zip(want, p))
    return same / total if total else 1.0


def agreement(refs: list[list[int]], hyps: list[list[int]]) -> dict:
    """`token_agreement` and the share of utterances whose tokens are identical."""
    exact = sum(r == h for r, h in zip(refs, hyps))
    return {"token_agreement": token_agreement(refs, hyps), "exact_match": exact / max(len(refs), 1)}


def parity(torch_model, onnx_dir: str | Path, features_list, threads: int = 2,
           max_new_tokens: int | None = None, engine: OnnxEngine | None = None) -> dict:
    """Token agreement between `torch_model`'s greedy tokens and the ONNX engine's, item by item.

    features_list: arrays of shape (n_mels, frames) or (1, n_mels, frames).
    """
    engine = engine or OnnxEngine(onnx_dir, threads=threads)
    refs, hyps = [], []
    for f in features_list:
        f = np.asarray(f, np.float32)
        f = f[None] if f.ndim == 2 else f
        refs += torch_greedy_tokens(torch_model, f, engine.decode, max_new_tokens)
        hyps += engine.generate_tokens(f, max_new_tokens)
    return {**agreement(refs, hyps), "utterances": len(refs), "tokens_torch": sum(map(len, refs)), "tokens_onnx": sum(map(len, hyps)),
            "mode": engine.mode, "torch_tokens": refs, "onnx_tokens": hyps}


# ---------------------------------------------------------------------------------------------
# the parity command


NUDGE = 1e-6  # relative change of the input features for the noise-floor measurement


def parity_report(torch_models: dict, export_dir: str | Path, data, limit: int | None = None,
                  threads: int = 2, torch_floor: bool = False) -> dict:
    """Token agreement with the ONNX engine and WER, side by side, for torch models on an eval set.

    torch_models: {name: model} (float, fake-quant, PyTorch INT8...); data: anything `slim.data` opens.
    Also reports the engine's agreement with itself on inputs nudged by NUDGE (its noise floor), and with
    `torch_floor` each torch model's agreement with itself nudged (two more torch decodes per utterance).
    """
    from eval.metrics import word_error_rate
    from slim.data import iter_examples

    engine = OnnxEngine(export_dir, threads=threads)
    examples = list(iter_examples(data, limit=limit))
    if not examples:
        raise ValueError(f"{data}: no usable examples")
    refs = [ex["text"] for ex in examples]
    eos = engine.decode.eos_token_id
    onnx_tokens, nudged, nudged_picks, feats = [], [], [], []
    budgets = [token_budget([ex["audio"]]) for ex in examples]  # as the engines decode: no runaway loops
    for ex, n in zip(examples, budgets):
        f = engine.features([ex["audio"]])
        feats.append(f)
        onnx_tokens += engine.generate_tokens(f, n)
        cross = engine.encode(f * np.float32(1 + NUDGE))
        nudged += engine.generate_tokens(None, n, cross=cross)
        nudged_picks += engine.generate_tokens(None, forced=onnx_tokens[-1:], cross=cross)
    # The noise floor: a quantized model's rounding decisions flip under any change of arithmetic, and the
    # flips compound through the layers. The engine against itself on inputs nudged by one part in a
    # million is what any implementation that is not bit-identical to it (fake quant included) can reach.
    floor = agreement(onnx_tokens, nudged)
    report = {"export": str(export_dir), "mode": engine.mode, "utterances": len(examples),
              "onnx": {"wer": word_error_rate(refs, engine.decode_text(onnx_tokens)),
                       "wer_nudged": word_error_rate(refs, engine.decode_text(nudged)),
                       "token_agreement_with_itself_nudged": floor["token_agreement"],
                       "exact_match_nudged": floor["exact_match"],
                       "next_token_agreement_with_itself_nudged": next_token_agreement(
                           onnx_tokens, nudged_picks, eos, budgets)}}
    for name, model in torch_models.items():
        tokens, picks = [], []
        for f, n in zip(feats, budgets):
            tokens += torch_greedy_tokens(model, f, engine.decode, n)
            picks += engine.generate_tokens(f, forced=tokens[-1:])  # the engine on the torch model's prefixes
        a = agreement(tokens, onnx_tokens)
        report[name] = {"wer": word_error_rate(refs, engine.decode_text(tokens)),
                        "token_agreement_with_onnx": a["token_agreement"], "exact_match": a["exact_match"],
                        "next_token_agreement_with_onnx": next_token_agreement(tokens, picks, eos, budgets)}
        if torch_floor:  # the torch model against itself on the nudged input: free running, and fed its own tokens
            nudged_tokens, nudged_picks = [], []
            for f, n, own in zip(feats, budgets, tokens):
                g = f * np.float32(1 + NUDGE)
                nudged_tokens += torch_greedy_tokens(model, g, engine.decode, n)
                nudged_picks += torch_greedy_tokens(model, g, engine.decode, forced=[own])
            b = agreement(tokens, nudged_tokens)
            report[name].update({"token_agreement_with_itself_nudged": b["token_agreement"],
                                 "exact_match_nudged": b["exact_match"],
                                 "next_token_agreement_with_itself_nudged": next_token_agreement(
                                     tokens, nudged_picks, eos, budgets)})
    return report


def main(argv: list[str] | None = None) -> int:
    """python -m eval.onnx_engine EXPORT_DIR --data DATA --torch MODEL_DIR [MODEL_DIR ...] [--limit N]"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m eval.onnx_engine",
                                description="Parity of torch models (float / fake-quant / INT8) with an ONNX export.")
    p.add_argument("export_dir")
    p.add_argument("--data", required=True, help="JSONL manifest, audio folder or datasets spec")
    p.add_argument("--torch", nargs="+", required=True, help="model directories to compare with the export")
    p.add_argument("--limit", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-floor", action="store_true",
                   help="also each torch model against itself on the nudged input (its own noise floor)")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    from qat.onnx_export import load_source_model

    models = {str(d): load_source_model(d)[0] for d in args.torch}
    report = parity_report(models, args.export_dir, args.data, limit=args.limit, threads=args.threads,
                           torch_floor=args.torch_floor)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
