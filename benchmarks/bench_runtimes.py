"""The same exported model in each runtime, on the same clips: seconds per utterance, WER, token agreement.

    .venv/bin/python benchmarks/bench_runtimes.py MODEL [MODEL ...] [--data MANIFEST ...] [--threads 2]
        [--work DIR] [--out report.json] [--runtimes ROW,ROW]
    .venv/bin/python benchmarks/bench_runtimes.py MODEL --out report.json --table   # its markdown table

MODEL: a fake-quant (QAT/PTQ) or float model directory; each is exported once into --work in every layout
(`./launch.sh export --format ...`, mode qdq for a fake-quant model, float otherwise) and run by:
  slim-hf-features   our engine (`slim.runtime.OnnxEngine`) fed transformers' WhisperFeatureExtractor and
                     decoded by transformers' tokenizer: the reference every other row is compared with
  slim-hf-nudged-1e-6  the reference on features times (1 + 1e-6): the model's own noise floor (what any
                     arithmetic that is not bit-identical to the reference can be expected to reach)
  slim-runtime       the same engine as shipped, torch-free (numpy log-mel, `tokenizers`)
  sherpa-onnx        sherpa-onnx's OfflineRecognizer.from_whisper (its own features and greedy search,
                     tail_paddings=3000: the 30 s window the other rows see) on the sherpa-onnx layout, each
                     clip as it is
  sherpa-onnx-lead-5ms  the same, each clip led by 80 zero samples, as our sherpa-onnx engine does
                     (`eval.runtimes.GRID_LEAD`): kaldi-native-fbank's Whisper frames start half a hop (5 ms)
                     after Whisper's own, and with this lead they fall on Whisper's grid
  transformers.js    transformers.js's automatic-speech-recognition pipeline in Node (`eval/js`) on the hf
                     layout (its own features, generate() and tokenizer)
  onnx-asr           onnx-asr's Whisper model on the hf layout (multilingual models only: its prompt always
                     holds a language token)
Greedy, batch 1. s/utt is wall clock around each call (features included), after one warm-up call; the
runtimes take turns clip by clip. WER after Whisper's English normalizer; token agreement with the
reference: 1 - token edit distance / longer length, and the share of utterances with identical tokens
(sherpa-onnx reports token strings, mapped back to ids through tokens.txt). transformers.js and onnx-asr
report text only: their rows give the share of identical texts and no token agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = [ROOT / "data" / "real-speech" / "manifest.jsonl"]


def label(model: Path) -> str:
    """A model directory's name (a stage's `NN-<stage>/model` by its stage folder)."""
    return model.parent.name if model.name == "model" else model.name


def exports_of(model: Path, work: Path) -> dict[str, Path]:
    from qat.onnx_export import export_model
    from slim.export_format import CONFIG_FILE, LAYOUTS
    from slim.model import read_structure

    made = {layout: sorted(work.glob(f"{label(model)}-{layout}-*")) for layout in LAYOUTS}
    if not (model / "config.json").exists() and all(made.values()):  # exported before, the model since removed
        return {layout: dirs[0] for layout, dirs in made.items()}
    s = read_structure(model)
    mode = "qdq" if s is not None and s.quant is not None else "float"
    out = {}
    for layout in LAYOUTS:
        d = work / f"{label(model)}-{layout}-{mode}"
        if not (d / CONFIG_FILE).exists():
            export_model(model, d, mode=mode, layout=layout)
        out[layout] = d
    return out


class HfFeatures:
    """The slim engine with transformers' feature extractor and tokenizer (the engine as it ran before)."""

    name = "slim-hf-features"
    layout = "slim"
    scale = np.float32(1.0)

    def __init__(self, d: Path, threads: int):
        from slim.model import load_processor
        from slim.runtime import OnnxEngine

        self.engine, self.processor = OnnxEngine(d, threads=threads), load_processor(d)

    def run(self, audio):
        from slim.decoding import token_budget

        f = self.processor.feature_extractor([audio], sampling_rate=16000, return_tensors="np").input_features
        ids = self.engine.generate_tokens(f * self.scale, token_budget([audio]))[0]
        return ids, self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


class Nudged(HfFeatures):
    """The reference on its features times (1 + 1e-6): how far a quantized model's greedy tokens move under
    any change of arithmetic this small (its noise floor, as `eval.onnx_engine.parity_report` measures it)."""

    name = "slim-hf-nudged-1e-6"
    scale = np.float32(1 + 1e-6)


class Runtime:
    name = "slim-runtime"
    layout = "slim"

    def __init__(self, d: Path, threads: int):
        from slim.runtime import OnnxEngine

        self.engine = OnnxEngine(d, threads=threads)

    def run(self, audio):
        from slim.decoding import token_budget

        ids = self.engine.generate_tokens(self.engine.features([audio]), token_budget([audio]))[0]
        return ids, self.engine.decode_text([ids])[0]


class Sherpa:
    name = "sherpa-onnx"
    layout = "sherpa-onnx"
    lead = False  # the clip as it is, not led onto Whisper's frame grid

    def __init__(self, d: Path, threads: int):
        from eval.runtimes import GRID_LEAD, SherpaOnnxEngine
        from qat.export_sherpa import tokens_of

        self.engine = SherpaOnnxEngine(d, threads=threads, lead_samples=GRID_LEAD if self.lead else 0)
        self.ids = {b.decode("utf-8", errors="replace"): i for i, b in sorted(tokens_of(d).items(), reverse=True)}

    def run(self, audio):
        text = self.engine.transcribe([audio])[0]
        return [self.ids.get(t, -1) for t in self.engine.last_tokens[0]], text


class SherpaLead(Sherpa):
    name = "sherpa-onnx-lead-5ms"
    lead = True


class TextOnly:
    """A runtime that reports text (ids None): transformers.js and onnx-asr."""

    layout = "hf"

    def __init__(self, d: Path, threads: int):
        from eval.engines import load_engine

        self.engine = load_engine(d, engine=self.name, threads=threads)

    def run(self, audio):
        return None, self.engine.transcribe([audio])[0]


class TransformersJs(TextOnly):
    name = "transformers.js"


class OnnxAsr(TextOnly):
    name = "onnx-asr"


def load_set(manifest: Path) -> list[dict]:
    """The usable clips of a manifest, as `./launch.sh eval` reads them (bad audio skipped: `slim.data`)."""
    from slim.data import iter_examples

    return [{"audio": ex["audio"], "text": ex["text"]} for ex in iter_examples(str(manifest))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--data", nargs="+", default=[str(d) for d in DEFAULT_DATA])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtimes", default=None,
                   help="comma-separated subset of the rows (default: all); the first row, the reference, always runs")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-runtimes"))
    p.add_argument("--out")
    p.add_argument("--table", action="store_true", help="print the markdown table of the report at --out and stop")
    args = p.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    from tqdm.auto import tqdm

    from eval.metrics import word_error_rate
    from eval.onnx_engine import agreement

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = {str(m): load_set(Path(m)) for m in args.data}
    report = {"machine": {"cpu": _cpu(), "threads": args.threads, "python": platform.python_version()},
              "command": " ".join(["benchmarks/bench_runtimes.py"] + (argv or sys.argv[1:])), "results": [],
              "references": {name: [c["text"] for c in clips] for name, clips in sets.items()}}
    for model in map(Path, args.models):
        ex = exports_of(model, work)
        kinds = [HfFeatures, Nudged, Runtime, Sherpa, SherpaLead, TransformersJs]
        from slim.export_format import load_export_config

        if load_export_config(ex["slim"], verify="size")["decode"].get("languages"):  # onnx-asr needs a language token
            kinds.append(OnnxAsr)
        else:
            print(f"{label(model)}: English-only, so no onnx-asr row (its prompt always holds a language token)")
        if args.runtimes:  # the first row, the reference, always runs
            keep = set(args.runtimes.split(","))
            kinds = kinds[:1] + [k for k in kinds[1:] if k.name in keep]
        runtimes = [k(ex[k.layout], args.threads) for k in kinds]
        for name, clips in sets.items():
            for r in runtimes:
                r.run(clips[0]["audio"])  # warm-up
            out = {r.name: {"ids": [], "texts": [], "seconds": 0.0} for r in runtimes}
            for i, c in enumerate(tqdm(clips, desc=f"{label(model)}/{Path(name).parent.name}", unit="utt")):
                for r in runtimes[i % len(runtimes):] + runtimes[:i % len(runtimes)]:
                    t = time.perf_counter()
                    ids, text = r.run(c["audio"])
                    out[r.name]["seconds"] += time.perf_counter() - t
                    out[r.name]["ids"].append(ids)
                    out[r.name]["texts"].append(text)
            refs = report["references"][name]
            ref_ids, ref_texts = out[runtimes[0].name]["ids"], out[runtimes[0].name]["texts"]
            for r in runtimes:
                o = out[r.name]
                if o["ids"][0] is None:
                    a = {"token_agreement": None,
                         "exact_match": float(np.mean([x == y for x, y in zip(ref_texts, o["texts"])]))}
                else:
                    a = agreement(ref_ids, o["ids"])
                row = {"model": str(model), "export": str(ex[r.layout]),
                       "data": name, "runtime": r.name, "utterances": len(clips),
                       "seconds_per_utterance": o["seconds"] / len(clips),
                       "wer": word_error_rate(refs, o["texts"]), **a,
                       "texts": o["texts"]}  # in the order of report["references"][data]: it can be rescored
                report["results"].append(row)
                tokens = "—" if row["token_agreement"] is None else f"{row['token_agreement']:.4f}"
                print(f"{label(model):>12} {Path(name).parent.name:>13} {r.name:>20}  {row['seconds_per_utterance']:.3f} s/utt  "
                      f"WER {100 * row['wer']:.2f}%  tokens {tokens}  exact {row['exact_match']:.3f}", flush=True)
            if args.out:  # after every set: a long run that is stopped keeps what it measured
                from slim.io import atomic_write_json

                atomic_write_json(args.out, report)
    return 0


def markdown(report: dict) -> str:
    """The results as a markdown table (one row per model, data set and runtime)."""
    lines = ["| model | data | runtime | utts | s/utt | WER % | token agreement | identical utts |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {label(Path(r['model']))} | {Path(r['data']).parent.name} | {r['runtime']} | {r['utterances']} | "
                     f"{r['seconds_per_utterance']:.3f} | {100 * r['wer']:.2f} | "
                     f"{'—' if r['token_agreement'] is None else format(r['token_agreement'], '.4f')} | "
                     f"{100 * r['exact_match']:.1f}% |")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
