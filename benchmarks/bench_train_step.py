"""Seconds per training step and peak memory of the trainer, with and without the distillation teacher.

    python benchmarks/bench_train_step.py [MODEL_DIR] [--batch-size 8] [--steps 6] [--threads N]

MODEL_DIR is any model directory the project wrote or an HF Whisper directory; default: the real tiny.en,
imported once into runs/bench/tiny.en with slim.sources.import_model. The data is random (log-mel
features of the full 30 s window and `--label-tokens` label tokens per utterance): step time does not
depend on what the audio says.

Each configuration runs in its own fresh process through `train.loop.train` (Accelerate, AdamW, clipping,
the loss, logging: everything a real step does), so peak RSS is that configuration's own. The first step
(allocator warm-up) and the last (it also writes the final checkpoint) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ensure_model(path: str | None) -> Path:
    if path:
        return Path(path)
    out = ROOT / "runs" / "bench" / "tiny.en"
    if not (out / "config.json").exists():
        from slim.sources import import_model

        import_model("tiny.en", out, overwrite=True)
    return out


def _measure(model_dir: Path, teacher: bool, batch_size: int, steps: int, label_tokens: int,
             threads: int | None) -> dict:
    import torch

    from slim.model import load_model
    from train.loop import TrainConfig, train

    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_dir)
    cfg_m = model.config
    V, n_mels = cfg_m.vocab_size, cfg_m.num_mel_bins

    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return batch_size * (steps + 1)

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_features": torch.randn(n_mels, 3000, generator=g),
                    "labels": torch.randint(0, min(V, 50000), (label_tokens,), generator=g)}

    def collate(items):
        return {"input_features": torch.stack([it["input_features"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items])}

    stamps: list[tuple[float, float]] = []  # (wall, CPU time of this process) after each step

    def on_step(step, rec):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: time the step's kernels, not their launch
        stamps.append((time.perf_counter(), time.process_time()))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-5, save_every=0, log_every=steps)
    with tempfile.TemporaryDirectory() as tmp:
        train(model, cfg, Random(), collate, tmp, teacher=load_model(model_dir) if teacher else None,
              on_step=on_step,
              save_fn=lambda m, d: Path(d).mkdir())
    per_step = [b[0] - a[0] for a, b in zip(stamps[:-2], stamps[1:-1])]  # steps 2 .. steps-1
    cpu = [b[1] - a[1] for a, b in zip(stamps[:-2], stamps[1:-1])]
    out = {"teacher": teacher, "batch_size": batch_size, "timed_steps": len(per_step),
           "sec_per_step": statistics.median(per_step), "sec_per_step_all": [round(s, 3) for s in per_step],
           # CPU seconds (all threads) per step: what the step costs when the machine is shared
           "cpu_sec_per_step": statistics.median(cpu),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
           "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model directory (default: real tiny.en)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="steps per configuration (first and last not timed)")
    p.add_argument("--label-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_one", choices=["teacher", "none"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 3:
        p.error("--steps must be >= 3 (the first and the last step are not timed)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if a._one:  # child: one configuration, result as JSON on the last line
        r = _measure(Path(a.model), a._one == "teacher", a.batch_size, a.steps, a.label_tokens, a.threads)
        print(json.dumps(r))
        return 0

    model_dir = _ensure_model(a.model)
    results = []
    for mode in ("none", "teacher"):
        cmd = [sys.executable, __file__, str(model_dir), "--_one", mode, "--batch-size", str(a.batch_size),
               "--steps", str(a.steps), "--label-tokens", str(a.label_tokens)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"model {model_dir} ({results[0]['params_m']:.1f} M params), batch {a.batch_size}, "
          f"{a.label_tokens} label tokens, device {results[0]['device']}, {results[0]['threads']} threads")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall time suffers on a shared machine)")
    print(f"{'teacher':<8} {'s/step':>8} {'CPU s/step':>11} {'peak RSS MiB':>13}"
          + (f" {'CUDA peak MiB':>14}" if "cuda_peak_mib" in results[0] else ""))
    for r in results:
        line = (f"{'yes' if r['teacher'] else 'no':<8} {r['sec_per_step']:>8.2f} {r['cpu_sec_per_step']:>11.2f} "
                f"{r['peak_rss_mib']:>13.0f}")
        if "cuda_peak_mib" in r:
            line += f" {r['cuda_peak_mib']:>14.0f}"
        print(line + f"   (median of {r['timed_steps']}: {r['sec_per_step_all']})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
