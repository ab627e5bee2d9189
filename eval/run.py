"""One evaluation run: a model (any engine) on a data set -> WER, CER, size, latency, failures, hypotheses.

    ./launch.sh eval MODEL --data DATA --out REPORT.json [--engine ...] [--batch-size N] [--limit N] [--threads N]
    ./launch.sh transcribe MODEL AUDIO... [--engine torch|onnx|...]

Latency is wall clock around `engine.transcribe` only (feature extraction + greedy decoding; audio
decoding and resampling are not timed), after `warmup` untimed transcriptions of the first utterance
(the first call pays for allocator growth, lazy kernels and ORT's graph setup). Bad items (missing,
unreadable, over 30 s, empty transcript, ...) are skipped by `slim.data` and counted, never fatal;
with `limit`, reading stops at the LIMIT-th usable item, so only the bad items before it are counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from eval.engines import ENGINES, Engine, TorchEngine, load_engine
from slim.audio import MAX_SECONDS, SAMPLING_RATE
from slim.io import atomic_write_json


def write_json(path: str | Path, obj) -> Path:
    """An eval report as JSON (non-ASCII text kept as is), written atomically."""
    return atomic_write_json(path, obj, ensure_ascii=False)


def _failure(hyp: str, ref: str) -> str | None:
    """The failure mode of one hypothesis (empty, repetition, overlong, short), or None."""
    from eval.metrics import failure_counts

    c = failure_counts([hyp], [ref])
    return next((k for k in ("empty", "repetition", "overlong", "short") if c[k]), None)


def evaluate_engine(engine: Engine, data, batch_size: int = 1, limit: int | None = None, warmup: int = 1,
                    time_it: bool = True, progress: bool = True) -> dict:
    """Transcribe every usable item of DATA with ENGINE and score it (see the module docstring)."""
    return evaluate_engines([engine], data, batch_size, limit, warmup, time_it, progress)[0]


def evaluate_engines(engines: list[Engine], data, batch_size: int = 1, limit: int | None = None, warmup: int = 1,
                     time_it: bool = True, progress: bool = True) -> list[dict]:
    """One report per engine, all on the same utterances, in one pass over DATA.

    With several engines every batch runs through each of them in turn (the order rotating from batch
    to batch), so a change in machine load during the run falls on all engines alike instead of on
    whichever happened to run last; each engine's time is still its own calls only.
    """
    from tqdm.auto import tqdm

    from eval.metrics import char_error_rate, failure_counts, word_error_rate
    from slim.data import open_eval_source

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not engines:
        raise ValueError("no engine to evaluate")
    # with the model's tokenizer, transcripts over the decoder's 448 tokens are skipped as in training
    items, stats, total = open_eval_source(data, limit=limit, tokenizer=engines[0].tokenizer)
    E = len(engines)
    rows: list[list[dict]] = [[] for _ in range(E)]
    seconds = [0.0] * E
    audio_seconds = 0.0
    warmed = not (time_it and warmup > 0)
    t_wall = time.perf_counter()
    desc = f"eval {engines[0].name}" if E == 1 else f"eval {E} engines"
    bar = tqdm(total=total, desc=desc, unit="utt", disable=not progress, file=sys.stderr)

    def flush(batch: list[dict], j: int) -> None:
        for e in (list(range(j % E, E)) + list(range(j % E))):
            t = time.perf_counter()
            texts = engines[e].transcribe([b["audio"] for b in batch], batch_size=len(batch))
            dt = time.perf_counter() - t
            seconds[e] += dt
            for b, hyp in zip(batch, texts):
                row = {"id": b["id"], "ref": b["text"], "hyp": hyp, "failure": _failure(hyp, b["text"])}
                if len(batch) == 1:
                    row["seconds"] = round(dt, 4)
                rows[e].append(row)
        bar.update(len(batch))

    batch: list[dict] = []
    n_batches = 0
    for item in items:
        if not warmed:
            for engine in engines:
                for _ in range(warmup):
                    engine.transcribe([item["audio"]])
            warmed = True
        audio_seconds += len(item["audio"]) / SAMPLING_RATE
        batch.append(item)
        if len(batch) == batch_size:
            flush(batch, n_batches)
            batch, n_batches = [], n_batches + 1
    if batch:
        flush(batch, n_batches)
    bar.close()
    wall = time.perf_counter() - t_wall
    skipped, by_reason = stats.total, stats.as_dict()
    if not rows[0]:
        raise ValueError(f"{data}: no utterance left to evaluate ({skipped} skipped: {by_reason or 'none'})")
    reports = []
    for engine, erows, secs in zip(engines, rows, seconds):
        refs, hyps = [r["ref"] for r in erows], [r["hyp"] for r in erows]
        n = len(erows)
        reports.append({
            "wer": float(word_error_rate(refs, hyps)),
            "cer": float(char_error_rate(refs, hyps)),
            "utterances": n,
            "skipped": skipped,
            "skipped_by_reason": by_reason,
            "model_bytes": int(engine.model_bytes),
            "seconds_per_utterance": secs / n if time_it else None,
            "seconds_total": round(secs, 3),
            "audio_seconds": round(audio_seconds, 3),
            "real_time_factor": secs / audio_seconds if time_it and audio_seconds else None,
            "wall_seconds": round(wall, 3),
            "batch_size": batch_size,
            "warmup": warmup if time_it else 0,
            "engine": engine.name,
            "failures": {k: int(v) for k, v in failure_counts(hyps, refs).items()},
            "data": str(data),
            "limit": limit,
            **engine.info,
            "hypotheses": erows,
        })
    return reports


def evaluate_model(model_dir, data, engine: str = "auto", batch_size: int = 1, out=None, limit: int | None = None,
                   threads: int | None = None, warmup: int = 1, max_new_tokens: int | None = None,
                   cache_dir=None, progress: bool = True, language: str | None = None,
                   max_repeats: int | None = None) -> dict:
    """Evaluate MODEL_DIR on DATA (a JSONL manifest, an audio folder or a `datasets` spec); write OUT if given.
    `language`: a multilingual model's language code (None: its default, English). `max_repeats`: the
    repetition guard (slim.decoding; None: the model's setting, 0: off).

    Returns the report dict: wer, cer, utterances, skipped (+ skipped_by_reason), model_bytes,
    seconds_per_utterance, engine, failures (empty / repetition / overlong / runaway / short counts), hypotheses
    ({id, ref, hyp, failure, seconds}), data, model,
    threads, and for models with a config.json the structure and parameter count.
    """
    if not (isinstance(data, dict) or str(data).startswith("hf:") or Path(data).expanduser().exists()):
        # fail before loading (or exporting) a model for nothing
        raise FileNotFoundError(f"{data}: no such manifest or audio folder (DATA is a JSONL manifest, an audio "
                                "folder, or a datasets spec such as hf:librispeech_asr/clean/validation)")
    eng = load_engine(model_dir, engine, threads=threads, max_new_tokens=max_new_tokens, cache_dir=cache_dir,
                      language=language, max_repeats=max_repeats)
    import torch

    report = evaluate_engine(eng, data, batch_size=batch_size, limit=limit, warmup=warmup, progress=progress)
    report = {"model": str(model_dir), "threads": threads or torch.get_num_threads(),
              "model_files": eng.files, "max_repeats": eng.max_repeats, **report}
    if out is not None:
        write_json(out, report)
    return report


def evaluate_loaded(model, processor, data, limit: int | None = None, batch_size: int = 1, time_it: bool = True,
                    max_new_tokens: int | None = None, progress: bool = False) -> dict:
    """Evaluate an in-memory torch model (e.g. during training); model_bytes is 0 (nothing on disk)."""
    model = getattr(model, "module", model)  # a DDP-wrapped model generates through its module
    eng = TorchEngine(model, processor, name="torch", max_new_tokens=max_new_tokens)
    return evaluate_engine(eng, data, batch_size=batch_size, limit=limit, time_it=time_it, progress=progress)


def summary(r: dict) -> str:
    fails = ", ".join(f"{k} {v}" for k, v in r["failures"].items() if v) or "none"
    spu = r["seconds_per_utterance"]
    return (f"{r['engine']}: WER {r['wer']:.4f}  CER {r['cer']:.4f}  {r['utterances']} utt "
            f"({r['skipped']} skipped)  {r['model_bytes'] / 1e6:.1f} MB  "
            f"{'-' if spu is None else f'{spu:.3f}'} s/utt  failures: {fails}")


# ---------------------------------------------------------------------------------------------
# command line


def quiet_transformers() -> None:
    """HF's generate warns on every call about settings Whisper's own generate makes; keep the CLI readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="auto: onnx for an export dir, else torch (fake-quant / INT8 loaders picked from "
                        "slim_structure.json); torch-dynamic-int8 / onnx-dynamic-int8: post-training baselines")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens (default: 448)")
    p.add_argument("--language", default=None,
                   help="a multilingual model's language code, e.g. de (default: en; English-only models take en only)")
    p.add_argument("--max-repeats", type=int, default=None, metavar="N",
                   help="repetition guard: back-to-back copies of an n-gram a transcript may hold (default: the "
                        "model's, 2; 0: off); the torch and slim ONNX engines")
    p.add_argument("--cache-dir", default=None, help="where onnx-dynamic-int8 writes its export "
                                                     "(default: <MODEL>.onnx-dynamic-int8 beside the model)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./launch.sh eval", description="WER, CER, size and latency of a model.")
    p.add_argument("model", help="a model directory this project wrote, an HF Whisper dir, or an ONNX export dir")
    p.add_argument("--data", required=True, help="JSONL manifest | audio folder | datasets spec")
    p.add_argument("--out", default=None, help="REPORT.json to write (atomically)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per call (latency is defined at 1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N usable utterances")
    p.add_argument("--warmup", type=int, default=1, help="untimed transcriptions of the first utterance")
    p.add_argument("--no-progress", action="store_true")
    _add_engine_args(p)
    a = p.parse_args(argv)
    quiet_transformers()
    r = evaluate_model(a.model, a.data, engine=a.engine, batch_size=a.batch_size, out=a.out, limit=a.limit,
                       threads=a.threads, warmup=a.warmup, max_new_tokens=a.max_new_tokens,
                       cache_dir=a.cache_dir, progress=not a.no_progress, language=a.language,
                       max_repeats=a.max_repeats)
    print(summary(r) + (f"  -> {a.out}" if a.out else ""))
    return 0


def _hypotheses(report: dict) -> list[dict]:
    """A report's per-utterance {"id", "ref", "hyp"} entries; an error names what is missing."""
    if not report.get("hypotheses"):
        raise ValueError("a report without per-utterance hypotheses (written by `./launch.sh eval --out`?)")
    return report["hypotheses"]


def compare_reports(base: dict, other: dict, samples: int = 2000) -> dict:
    """WER difference other - base of two `eval` reports over the same utterances, with its 95% paired
    bootstrap interval (`eval.metrics.paired_wer_difference`)."""
    from eval.metrics import paired_wer_difference

    a, b = _hypotheses(base), _hypotheses(other)
    ids_a, ids_b = [h["id"] for h in a], [h["id"] for h in b]
    if ids_a != ids_b:
        common = len(set(ids_a) & set(ids_b))
        raise ValueError(f"the reports cover different utterances ({len(ids_a)} and {len(ids_b)}, {common} in "
                         "common): evaluate both on the same data and limit")
    if [h["ref"] for h in a] != [h["ref"] for h in b]:
        raise ValueError("the reports have different reference transcripts for the same utterance ids")
    return paired_wer_difference([h["ref"] for h in a], [h["hyp"] for h in a], [h["hyp"] for h in b], samples)


def load_report(spec: str) -> dict:
    """An eval report by SPEC: `REPORT.json` of `./launch.sh eval`, `RUN/report.json:STAGE[:SET]`, one stage's
    evaluation in a recipe run's report (SET: `eval`, the default, or a name of `data.extra_eval` /
    `data.optional_eval`), or `BENCH.json:ENGINE`, one engine's transcripts in a `benchmarks/bench_engines.py
    --out` report (utterances named by their position among the clips with text)."""
    path, _, sel = spec.partition(".json:")
    path = path + ".json" if sel else spec
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such report")
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "engines" in data and "references" in data:
        if sel not in data["engines"]:
            raise ValueError(f"{spec}: an engine benchmark's report needs :ENGINE, one of {sorted(data['engines'])}")
        hyps = data["engines"][sel]["hypotheses"]
        return {"wer": data["engines"][sel]["wer"],
                "hypotheses": [{"id": str(i), "ref": r, "hyp": h} for i, (r, h) in enumerate(zip(data["references"], hyps))]}
    if not isinstance(data, list):
        if sel:
            raise ValueError(f"{spec}: {path} is an eval report, not a run's report.json; name it without :STAGE")
        return data
    stages = {e["stage"]: e for e in data if "wer" in e}
    stage, _, name = sel.partition(":")
    if stage not in stages:
        raise ValueError(f"{spec}: a run's report needs :STAGE, one of {sorted(stages)}")
    entry = stages[stage]
    if name in ("", "eval"):
        return entry
    extra = entry.get("extra", {})
    if name not in extra:
        raise ValueError(f"{spec}: stage {stage} has no eval set {name!r} (it has eval, {', '.join(sorted(extra))})")
    return extra[name]


def compare_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./launch.sh compare",
                                description="WER differences of eval reports against a base report, paired "
                                            "bootstrap 95% intervals (same utterances).")
    p.add_argument("base", help="REPORT.json of `./launch.sh eval` (e.g. the float model), or a run's "
                                "RUN/report.json:STAGE[:SET] (SET: eval, the default, or an extra eval set's name), or an "
                                "engine benchmark's BENCH.json:ENGINE (benchmarks/bench_engines.py --out)")
    p.add_argument("others", nargs="+", help="reports to compare with it, named the same ways (e.g. PTQ, QAT)")
    p.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--worst", type=int, default=0, metavar="N",
                   help="also list the N utterances where each report gains the most word errors over the base")
    p.add_argument("--agreement", action="store_true",
                   help="also print each report's word disagreement with the base's own transcripts (its WER "
                        "with the base's hypotheses as references): how closely a compressed model follows the "
                        "model it came from, which moves far less from run to run than WER against the references")
    a = p.parse_args(argv)
    from eval.metrics import word_error_rate

    reports = {spec: load_report(spec) for spec in [a.base, *a.others]}
    base = reports[a.base]
    # every WER shown is rescored from the hypotheses (this checkout's metric, not the figure a report stored);
    # each other report's is the base's plus the exact difference the bootstrap computes on the same utterances
    h = _hypotheses(base)
    base_wer = word_error_rate([x["ref"] for x in h], [x["hyp"] for x in h])
    print(f"{'report':50s} {'WER %':>7s} {'Δ vs base':>10s} {'95% interval':>18s}"
          + (f" {'≠ base %':>9s}" if a.agreement else ""))
    print(f"{a.base:50s} {100 * base_wer:7.2f}")
    for path in a.others:
        d = compare_reports(base, reports[path], a.samples)  # checks that both hold the same utterances
        agreement = ""
        if a.agreement:
            agreement = f" {100 * word_error_rate([x['hyp'] for x in h], [x['hyp'] for x in _hypotheses(reports[path])]):9.2f}"
        print(f"{path:50s} {100 * (base_wer + d['delta']):7.2f} {100 * d['delta']:+10.2f} "
              f"[{100 * d['low']:+6.2f}, {100 * d['high']:+6.2f}]" + agreement)
        if a.worst > 0:
            _print_worst(base, reports[path], a.worst)
    return 0


def _print_worst(base: dict, other: dict, n: int) -> None:
    """The n utterances with the largest gain in word errors of `other` over `base` (same utterances, as
    `compare_reports` has checked), with the total gain they carry."""
    from eval.metrics import utterance_errors

    refs = [h["ref"] for h in base["hypotheses"]]
    ea = utterance_errors(refs, [h["hyp"] for h in base["hypotheses"]])
    eb = utterance_errors(refs, [h["hyp"] for h in other["hypotheses"]])
    rows = sorted(zip((b - x for x, b in zip(ea, eb)), range(len(refs))), key=lambda t: -t[0])[:n]
    print(f"  word errors {sum(eb) - sum(ea):+d} in all; the {len(rows)} largest gains:")
    for gain, i in rows:
        print(f"  {gain:+4d}  {base['hypotheses'][i]['id']}: {other['hypotheses'][i]['hyp'][:100]!r}")


def transcribe_main(argv: list[str] | None = None) -> int:
    """Print `<audio>\\t<text>` per file; an unreadable file gets a line on stderr and exit code 1."""
    p = argparse.ArgumentParser(prog="./launch.sh transcribe", description="Transcribe audio files (greedy).")
    p.add_argument("model", help="a model directory or an ONNX export dir")
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ...; any rate, mono or stereo)")
    _add_engine_args(p)
    a = p.parse_args(argv)
    quiet_transformers()
    from slim.audio import load_audio

    engine = load_engine(a.model, a.engine, threads=a.threads, max_new_tokens=a.max_new_tokens,
                         cache_dir=a.cache_dir, language=a.language, max_repeats=a.max_repeats)
    failed = 0
    for path in a.audio:
        try:
            audio = load_audio(path, sampling_rate=SAMPLING_RATE)
        except Exception as e:  # any unreadable file: report it, go on with the others
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"  # AudioError already names the file
            print(f"error: {msg}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if len(audio) > MAX_SECONDS * SAMPLING_RATE:
            print(f"warning: {path}: {len(audio) / SAMPLING_RATE:.1f} s is longer than {MAX_SECONDS:.0f} s; "
                  "only the first 30 s are transcribed", file=sys.stderr, flush=True)
        text = engine.transcribe([np.asarray(audio, np.float32)])[0]
        print(f"{path}\t{text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
