"""Training from a corpus read lazily: peak memory against corpus size, and speed against in-memory data.

    python benchmarks/bench_lazy_data.py --model MODEL_DIR --wavs WAV_DIR [--steps 50] [--batch-size 8]
        [--small 1000] [--large 20000] [--num-workers 2] [--threads 2] [--out results.json]

Two manifests are written (into a temp dir): `--small` and `--large` utterances, each line an absolute path to
one of WAV_DIR's files under a new id (the files are reused, so the corpus costs no disk; every line is read
and decoded as a separate utterance). Each run is a fresh process through `train.loop.train` (CE only, no
teacher: the data path is what is measured), and three runs are compared:

- `lazy-small`, `lazy-large`: `slim.data.open_train_source` with `--num-workers` DataLoader workers, the path
  recipes train on; the peak RSS of the whole process tree (trainer + workers, sampled every 0.1 s) must not
  grow much with the corpus;
- `cached-small`: every example decoded into memory first (`load_examples`) and features cached per example
  (`SpeechDataset`), with no workers: the in-memory path the lazy one replaces.

Steps/s is timed from the end of step 1 to the end of the last step (allocator warm-up and, for the cached
path, the decoding of the whole set up front are left out: `setup_s` reports them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_manifest(wavs: list[Path], n: int, path: Path) -> Path:
    """n lines cycling over `wavs` by absolute path, each under its own id; transcripts from the files'
    own manifest when WAV_DIR's parent has one (the synthetic builder's layout), else a fixed sentence."""
    texts = {}
    src = wavs[0].parent.parent / "manifest.jsonl"
    if src.is_file():
        for line in src.read_text().splitlines():
            e = json.loads(line)
            texts[Path(e["audio"]).name] = e["text"]
    with open(path, "w") as f:
        for k in range(n):
            w = wavs[k % len(wavs)]
            f.write(json.dumps({"id": f"utt-{k:06d}", "audio": str(w.resolve()),
                                "text": texts.get(w.name, "the quick brown fox jumps over the lazy dog")}) + "\n")
    return path


def _run(mode: str, manifest: str, model_dir: str, steps: int, batch_size: int, num_workers: int,
         threads: int, out: str) -> None:
    """One measured run, in this (fresh) process; writes its timings to OUT/timing.json."""
    import torch

    from slim.data import SpeechDataset, load_examples, make_collator, open_train_source
    from slim.model import load_model, load_processor
    from train.loop import TrainConfig, train

    torch.set_num_threads(threads)
    t0 = time.time()
    processor = load_processor(model_dir)
    model = load_model(model_dir)
    if mode == "cached":
        examples, _ = load_examples(manifest, tokenizer=processor.tokenizer)
        ds, workers = SpeechDataset(examples, processor), 0
    else:
        ds, _ = open_train_source(manifest, processor)
        workers = num_workers
    ends: list[float] = []
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-5, save_every=0, log_every=10,
                      num_workers=workers, mixed_precision="no")
    setup = time.time() - t0
    r = train(model, cfg, ds, make_collator(processor), Path(out) / "run", on_step=lambda s, rec: ends.append(time.time()))
    Path(out, "timing.json").write_text(json.dumps({
        "setup_s": round(setup, 1), "items": len(ds), "num_workers": workers,
        "steps_per_s": round((len(ends) - 1) / (ends[-1] - ends[0]), 4), "steps": r.steps_run,
        "skipped": r.skipped}))


def measure(mode: str, manifest: Path, args) -> dict:
    """Run `mode` in a child process; the peak of the summed RSS of it and its children (the workers)."""
    import psutil

    out = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    cmd = [sys.executable, __file__, "--_run", "cached" if mode.startswith("cached") else "lazy",
           "--_manifest", str(manifest), "--model", args.model, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--threads",
           str(args.threads), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env)
    peak, done = [0, 0], threading.Event()  # the tree's summed RSS, the trainer's own

    def sample():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                own = p.memory_info().rss
                peak[0] = max(peak[0], own + sum(c.memory_info().rss for c in p.children(recursive=True)))
                peak[1] = max(peak[1], own)
            except psutil.Error:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    done.set()
    t.join()
    if rc != 0:
        raise SystemExit(f"{mode} failed with exit code {rc}")
    timing = json.loads((out / "timing.json").read_text())
    return {"mode": mode, "peak_rss_mb": round(peak[0] / 2**20, 1), "trainer_peak_rss_mb": round(peak[1] / 2**20, 1),
            **timing}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (e.g. an import of tiny.en)")
    p.add_argument("--wavs", help="a folder of wav files the manifests point at")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--_run", help=argparse.SUPPRESS)
    p.add_argument("--_manifest", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._run:
        return _run(args._run, args._manifest, args.model, args.steps, args.batch_size, args.num_workers,
                    args.threads, args.out)
    if not args.wavs:
        p.error("--wavs is required")
    wavs = sorted(Path(args.wavs).glob("*.wav"))
    if not wavs:
        raise SystemExit(f"{args.wavs}: no .wav files")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lazy-data-"))
    small = write_manifest(wavs, args.small, tmp / "small.jsonl")
    large = write_manifest(wavs, args.large, tmp / "large.jsonl")
    # the two runs whose speed is compared go one after the other (on a shared machine the load drifts)
    rows = [measure("lazy-small", small, args), measure("cached-small", small, args),
            measure("lazy-large", large, args)]
    by = {r["mode"]: r for r in rows}
    summary = {
        "rss_growth_large_vs_small": round(by["lazy-large"]["peak_rss_mb"] / by["lazy-small"]["peak_rss_mb"] - 1, 4),
        "lazy_vs_cached_steps_per_s": round(by["lazy-small"]["steps_per_s"] / by["cached-small"]["steps_per_s"], 4),
    }
    print(f"{'run':<14}{'items':>8}{'workers':>9}{'peak RSS MB':>13}{'trainer MB':>12}{'steps/s':>10}{'setup s':>9}")
    for r in rows:
        print(f"{r['mode']:<14}{r['items']:>8}{r['num_workers']:>9}{r['peak_rss_mb']:>13}"
              f"{r['trainer_peak_rss_mb']:>12}{r['steps_per_s']:>10}{r['setup_s']:>9}")
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": rows, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
