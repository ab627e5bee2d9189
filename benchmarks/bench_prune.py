"""Dense vs pruned Whisper: encoder latency, per-token decoder latency, parameters, size (and WER).

    .venv/bin/python benchmarks/bench_prune.py                        # tiny.en, l1, 30% heads + 25% FFN
    .venv/bin/python benchmarks/bench_prune.py --wer data/real-speech/manifest.jsonl \\
        --calibration data/synth/train/manifest.jsonl                 # + WER before recovery per criterion

Latency is measured the way a device runs the model: batch 1, a 30 s input (Whisper always pads to
30 s), `torch.set_num_threads(--threads)`, warm-up runs first, median of `--repeats`. The decoder figure
is one greedy step with the KV cache (self- and cross-attention cached) including the vocabulary
projection, after a 2-token prompt; the median over `--tokens` steps x `--repeats`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prune.importance import compute_scores
from prune.report import pruning_report
from prune.select import PruneSelection, prune_model
from slim.model import count_parameters, install_explicit_attention, save_model, structure_of


def _features(model) -> torch.Tensor:
    """A (1, 80, 3000) input: Whisper always pads to 30 s, so content does not change the cost."""
    return torch.randn(1, model.config.num_mel_bins, 2 * model.config.max_source_positions,
                       generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def encoder_seconds(model, feats: torch.Tensor) -> float:
    """Wall seconds of one encoder forward."""
    t = time.perf_counter()
    model.model.encoder(feats)
    return time.perf_counter() - t


@torch.inference_mode()
def decoder_step_seconds(model, enc: torch.Tensor, prompt: list[int], tokens: int) -> list[float]:
    """Wall seconds of each of `tokens` cached greedy steps (decoder + vocabulary projection) after `prompt`."""
    out = model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([prompt]), use_cache=True)
    times = []
    for _ in range(tokens):
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        out = model(encoder_outputs=(enc,), decoder_input_ids=nxt, past_key_values=out.past_key_values,
                    use_cache=True)
        times.append(time.perf_counter() - t)
    return times


def latencies(models: dict, prompt: list[int], repeats: int, tokens: int, warmup: int = 2) -> dict:
    """Median (and min) encoder and per-token decoder latency per model, in ms.

    The models take turns within every repeat, so a burst of load from another process on a shared
    machine hits them alike instead of skewing one of them.
    """
    feats = _features(next(iter(models.values())))
    with torch.inference_mode():
        enc = {name: m.model.encoder(feats).last_hidden_state for name, m in models.items()}
    raw = {name: {"enc": [], "dec": []} for name in models}
    for r in range(warmup + repeats):
        for name, m in models.items():
            e = encoder_seconds(m, feats)
            d = decoder_step_seconds(m, enc[name], prompt, tokens)
            if r >= warmup:
                raw[name]["enc"].append(e)
                raw[name]["dec"].extend(d)
    return {name: {"encoder ms": 1e3 * statistics.median(v["enc"]), "encoder ms (min)": 1e3 * min(v["enc"]),
                   "decoder ms/token": 1e3 * statistics.median(v["dec"]),
                   "decoder ms/token (min)": 1e3 * min(v["dec"])} for name, v in raw.items()}


def safetensors_bytes(model, tmp: Path, name: str) -> int:
    out = save_model(model, tmp / name)
    return (out / "model.safetensors").stat().st_size


def calibration_batches(manifest: str, processor, n_batches: int, batch_size: int = 4):
    """The first `n_batches` batches of a training manifest, collated as the trainer does."""
    from slim.data import SpeechDataset, load_examples, make_collator

    examples, skipped = load_examples(manifest, tokenizer=processor.tokenizer, limit=n_batches * batch_size)
    loader = torch.utils.data.DataLoader(SpeechDataset(examples, processor), batch_size=batch_size,
                                         shuffle=False, collate_fn=make_collator(processor))
    return [b for _, b in zip(range(n_batches), loader)]


def wer_row(name: str, model, processor, manifests: list[str], args, score_s: float | None) -> str:
    """One markdown row: the project's evaluation harness (greedy, batch --wer-batch) on each manifest."""
    from eval.run import evaluate_loaded

    s = structure_of(model)
    cells = [name, str(s.num_heads()), str(sum(s.encoder_ffn + s.decoder_ffn)), f"{count_parameters(model):,}"]
    for manifest in manifests:
        r = evaluate_loaded(model, processor, manifest, limit=args.wer_limit, max_new_tokens=args.max_new_tokens,
                            batch_size=args.wer_batch)
        fails = ", ".join(f"{k} {v}" for k, v in r["failures"].items() if v) or "-"
        cells += [f"{r['wer']:.2%}", fails, f"{r['seconds_per_utterance']:.2f}"]
    cells.append("-" if score_s is None else f"{score_s:.1f}")
    return "| " + " | ".join(cells) + " |"


def latency_table(dense, processor, selection: PruneSelection, batches, args) -> None:
    """Prune a copy of DENSE with --criterion; print parameters, size and latency side by side."""
    t = time.perf_counter()
    scores = compute_scores(dense, args.criterion, batches=batches, seed=0)
    score_s = time.perf_counter() - t
    pruned, _ = prune_model(copy.deepcopy(dense), scores, selection)
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    models = {"dense": dense, "pruned": pruned}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            rows[name] = {"parameters": count_parameters(model),
                          "safetensors MB": safetensors_bytes(model, Path(tmp), name) / 1e6}
    for name, lat in latencies(models, prompt, args.repeats, args.tokens).items():
        rows[name].update(lat)
    s_dense, s_pruned = structure_of(dense), structure_of(pruned)
    print(f"# {args.source}: {args.criterion} scores ({score_s:.1f} s), {selection}")
    print(f"# heads {s_dense.num_heads()} -> {s_pruned.num_heads()}; encoder FFN {s_pruned.encoder_ffn}, "
          f"decoder FFN {s_pruned.decoder_ffn}; torch {torch.__version__}, {args.threads} threads")
    print("| | dense | pruned | pruned / dense |\n|---|---:|---:|---:|")
    for key in rows["dense"]:
        d, p = rows["dense"][key], rows["pruned"][key]
        print(f"| {key} | {d:,.2f} | {p:,.2f} | {p / d:.1%} |" if isinstance(d, float) else
              f"| {key} | {d:,} | {p:,} | {p / d:.1%} |", flush=True)
    if args.report:
        pruning_report(s_dense, s_pruned, args.report,
                       metrics={k: (rows["dense"][k], rows["pruned"][k]) for k in rows["dense"]})
        print(f"# report written to {args.report}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="tiny.en", help="base model (anything slim.sources.load_source takes)")
    ap.add_argument("--criterion", default="l1", choices=["l1", "l1_out", "random", "taylor"])
    ap.add_argument("--head-ratio", type=float, default=0.3)
    ap.add_argument("--ffn-ratio", type=float, default=0.25)
    ap.add_argument("--scope", default="global", choices=["global", "per_layer"])
    ap.add_argument("--ffn-multiple", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=20, help="decoder steps timed per repeat")
    ap.add_argument("--report", default=None, help="write the pruning report (PNG + markdown) here")
    ap.add_argument("--wer", default=None, help="JSONL manifest(s), comma-separated: also measure WER before "
                    "recovery per criterion")
    ap.add_argument("--wer-limit", type=int, default=None, help="at most this many utterances per --wer set")
    ap.add_argument("--skip-latency", action="store_true", help="only the --wer table")
    ap.add_argument("--criteria", default="l1,taylor,random", help="criteria for --wer")
    ap.add_argument("--wer-batch", type=int, default=1, help="batch size for --wer (s/utt is then throughput)")
    ap.add_argument("--no-dense-wer", action="store_true", help="--wer: skip the dense row (measured elsewhere)")
    ap.add_argument("--calibration", default=None, help="JSONL manifest of training audio for taylor")
    ap.add_argument("--calibration-batches", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="cap for --wer (pruned models may loop)")
    args = ap.parse_args(argv)

    from slim.sources import load_source

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, processor = load_source(args.source)
    dense = install_explicit_attention(dense).float().eval()
    selection = PruneSelection(head_ratio=args.head_ratio, ffn_ratio=args.ffn_ratio, scope=args.scope,
                               ffn_multiple=args.ffn_multiple)
    batches = None
    if args.calibration:
        batches = calibration_batches(args.calibration, processor, args.calibration_batches)

    if not args.skip_latency:
        latency_table(dense, processor, selection, batches, args)
    if args.wer:
        from eval.run import quiet_transformers

        quiet_transformers()
        manifests = args.wer.split(",")
        print(f"\n# WER before recovery (greedy, batch {args.wer_batch}, max {args.max_new_tokens} new tokens, "
              f"at most {args.wer_limit} utterances per set): {', '.join(manifests)}")
        print("| model | heads | FFN neurons | parameters | " +
              " | ".join(f"WER {i} | failures {i} | s/utt {i}" for i in range(1, len(manifests) + 1)) +
              " | scoring s |\n|---|---:|---:|---:|" + "---:|---|---:|" * len(manifests) + "---:|")
        if not args.no_dense_wer:
            print(wer_row("dense", dense, processor, manifests, args, None), flush=True)
        for crit in args.criteria.split(","):
            t = time.perf_counter()
            sc = compute_scores(dense, crit, batches=batches, seed=0)
            score_s = time.perf_counter() - t
            m, _ = prune_model(copy.deepcopy(dense), sc, selection)
            print(wer_row(crit, m, processor, manifests, args, score_s), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
