"""Comparison reports: a markdown table and a plot of WER against size and against latency.

    python -m eval.report baselines MODEL --data DATA --out DIR [--limit N] [--threads N]

measures the post-training bars QAT has to beat, in one process: the fp32 model (torch), PyTorch
dynamic INT8 (`quantize_dynamic` on Linear) and ONNX Runtime dynamic INT8 of the float export, and
writes DIR/report.json, DIR/report.md and DIR/report.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from slim.io import atomic_write_text

PLOT_FILE = "report.png"


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _failures(r: dict) -> str:
    """The main set's failure counts, then each extra set's that has any ("short 1; real_prompts: overlong 2")."""
    def counts(f):
        return ", ".join(f"{k} {v}" for k, v in (f or {}).items() if v)

    parts = [counts(r.get("failures"))] + [f"{n}: {c}" for n, e in (r.get("extra") or {}).items()
                                           if (c := counts(e.get("failures")))]
    return "; ".join(p for p in parts if p) or "0"


def eval_sets(rows: list[dict]) -> list[str]:
    """Names of the extra eval sets that rows carry (`extra`: {name: report}), in first-seen order."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r.get("extra") or {}))
    return list(names)


def _wer(r: dict, name: str | None):
    if name is None:
        return r["wer"]
    e = (r.get("extra") or {}).get(name)
    return None if e is None else e["wer"]


def comparison_table(rows: list[dict]) -> str:
    """Markdown table; speed-up is the first row's s/utt over each row's (>1: faster than the first). Extra
    eval sets (a run's `data.extra_eval`) get a WER column each, beside the main set's."""
    base = rows[0].get("seconds_per_utterance")
    extra = eval_sets(rows)
    head = "| variant | engine | WER % | " + "".join(f"{n} WER % | " for n in extra)
    lines = [head + "CER % | size MB | s/utt | speed-up | utterances | skipped | failures |",
             "|---|---|---:|" + "---:|" * len(extra) + "---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spu = r.get("seconds_per_utterance")
        speedup = base / spu if base and spu else None
        name = str(r.get("variant") or r.get("engine")).replace("|", "/")
        cells = [name, r.get("engine", "-"), f"{r['wer'] * 100:.2f}",
                 *[_fmt(None if _wer(r, n) is None else _wer(r, n) * 100, ".2f") for n in extra],
                 f"{r['cer'] * 100:.2f}", f"{r['model_bytes'] / 1e6:.1f}", _fmt(spu, ".3f"),
                 _fmt(speedup, ".2f") + ("x" if speedup else ""),
                 str(r.get("utterances", "-")), str(r.get("skipped", 0)), _failures(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wer_axis_top(values: list[float], factor: float = 3.0) -> float:
    """Top of the WER axis: every value fits, unless one is over `factor` times the median; then the axis
    stops above the others and the outliers are drawn at the top with their value written out, so one
    broken stage does not squeeze the rest into a line."""
    v = sorted(values)
    if not v:
        return 1.0
    med = v[len(v) // 2]
    inliers = [x for x in v if x <= factor * max(med, 1e-9)]
    return 1.15 * max(inliers) if inliers else 1.15 * v[-1]


def plot_comparison(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels, WER vs size (MB) and WER vs latency (s/utt): one marker series per eval set, points
    numbered by row (the legend under the plot names them), outliers clipped to the top (`wer_axis_top`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [None, *eval_sets(rows)]
    markers = "osD^vP*X"
    batches = sorted({int(r.get("batch_size") or 1) for r in rows})
    lat = ("latency, batch 1 (s / utterance)" if batches == [1] else
           f"s / utterance at batch {'/'.join(map(str, batches))} (throughput, not latency)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    panels = [("model_bytes", 1e-6, "size on disk (MB)"), ("seconds_per_utterance", 1.0, lat)]
    values = [100 * w for r in rows for n in sets if (w := _wer(r, n)) is not None]
    top = wer_axis_top(values)
    for ax, (key, scale, label) in zip(axes, panels):
        for si, name in enumerate(sets):
            pts = [(i, r[key] * scale, 100 * _wer(r, name)) for i, r in enumerate(rows, 1)
                   if r.get(key) is not None and _wer(r, name) is not None]
            if not pts:
                continue
            ax.scatter([x for _, x, _ in pts], [min(y, top * 0.97) for _, _, y in pts], s=34,
                       marker=markers[si % len(markers)], label="main eval set" if name is None else name)
            for i, x, y in pts:
                text = f"{i}" if y <= top else f"{i}: {y:.0f}%"
                ax.annotate(text, (x, min(y, top * 0.97)), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("WER (%)")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15)
        ax.set_xlim(left=0)  # sizes and latencies compare as ratios: keep the origin
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower right", ncol=len(labels))  # below the panels: no point hidden
    names = "   ".join(f"{i} {r.get('variant') or r.get('engine')}" for i, r in enumerate(rows, 1))
    fig.text(0.01, 0.01, names, fontsize=8, wrap=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(rows: list[dict], out_dir: str | Path, title: str, notes: list[str] | None = None) -> Path:
    """Write OUT_DIR/report.md (table + plot) and OUT_DIR/report.png; returns the markdown path.

    rows: eval reports (see `eval.run.evaluate_model`) with a `variant` label; the first is the baseline
    of the speed-up column. `notes`: lines printed under the title (command, data, wall time).
    """
    if not rows:
        raise ValueError("write_comparison needs at least one row")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(rows, out / PLOT_FILE, title)
    data = sorted({str(r.get("data")) for r in rows if r.get("data")})
    md = [f"# {title}", ""]
    md += [f"- {n}" for n in notes or []]
    if data:
        md.append(f"- data: {', '.join(data)}")
    batches = sorted({int(r.get("batch_size") or 1) for r in rows})
    per = ("batch 1, wall clock after a warm-up (latency)" if batches == [1] else
           f"batch {'/'.join(map(str, batches))}, wall clock per utterance after a warm-up (throughput, not "
           "latency, where the batch is over 1)")
    md.append("- WER/CER after Whisper's English normalizer (tokens without a letter or digit dropped); size = bytes "
              "a deployment ships (MB = 10^6 bytes); "
              f"s/utt = greedy decoding, {per}; speed-up relative to the first row.")
    md += ["", comparison_table(rows), "", f"![WER against size and latency]({PLOT_FILE})", ""]
    return atomic_write_text(out / "report.md", "\n".join(md))


# ---------------------------------------------------------------------------------------------
# the post-training baselines

BASELINES = [("fp32", "torch"), ("PyTorch dynamic INT8", "torch-dynamic-int8"),
             ("ORT dynamic INT8", "onnx-dynamic-int8")]


def measure_baselines(model_dir, data, out_dir, limit: int | None = None, threads: int | None = None,
                      batch_size: int = 1, cache_dir=None, command: str | None = None, progress: bool = True,
                      max_new_tokens: int | None = None) -> list[dict]:
    """fp32, PyTorch dynamic INT8 and ORT dynamic INT8 of MODEL_DIR on DATA in one process.

    Every engine is built first (the ONNX export included, not timed), then the three run interleaved
    on the same utterances (`eval.run.evaluate_engines`), so load changes on a shared machine fall on
    all of them alike.
    """
    from eval.engines import load_engine
    from eval.run import evaluate_engines, summary, write_json

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    engines = []
    for variant, name in BASELINES:
        t = time.perf_counter()
        engines.append((variant, load_engine(model_dir, name, threads=threads, cache_dir=cache_dir,
                                                max_new_tokens=max_new_tokens)))
        print(f"[baselines] {variant}: ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    import torch

    reports = evaluate_engines([e for _, e in engines], data, batch_size=batch_size, limit=limit, progress=progress)
    rows = []
    for (variant, eng), r in zip(engines, reports):
        rows.append({"variant": variant, "model": str(model_dir), "threads": torch.get_num_threads(),
                     "model_files": eng.files, **r})
        print(f"[baselines] {variant}: {summary(r)}", file=sys.stderr)
    wall = time.perf_counter() - t0
    out = Path(out_dir)
    notes = [f"model: {model_dir}", f"threads: {torch.get_num_threads()}, batch size {batch_size}"
             + (f", first {limit} usable utterances" if limit else ""),
             f"wall time of the whole run (loading, export, 3 interleaved evaluations): {wall:.0f} s",
             f"machine: {os.cpu_count()} CPUs, 1-minute load average {load0:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end (other work on the machine slows every engine)"]
    if command:
        notes.insert(0, f"command: `{command}`")
    write_json(out / "report.json", {"command": command, "wall_seconds": round(wall, 1), "rows": rows})
    write_comparison(rows, out, title="Post-training baselines", notes=notes)
    return rows


def baseline_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.report baselines",
                                description="fp32 vs PyTorch dynamic INT8 vs ORT dynamic INT8, in one run.")
    p.add_argument("model", help="a float model directory (HF or whisper-slim)")
    p.add_argument("--data", required=True, help="JSONL manifest | audio folder | datasets spec")
    p.add_argument("--out", required=True, help="directory for report.json, report.md, report.png")
    p.add_argument("--limit", type=int, default=None, help="the first N usable utterances, for every engine")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="where the ORT dynamic-INT8 export goes")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens (default: 448)")
    p.add_argument("--no-progress", action="store_true")
    if argv is None:
        argv = sys.argv[2:] if sys.argv[1:2] == ["baselines"] else sys.argv[1:]
    a = p.parse_args(argv)
    from eval.run import quiet_transformers

    quiet_transformers()
    command = "python -m eval.report baselines " + " ".join(shlex.quote(x) for x in argv)
    measure_baselines(a.model, a.data, a.out, limit=a.limit, threads=a.threads, batch_size=a.batch_size,
                      cache_dir=a.cache_dir, command=command, progress=not a.no_progress,
                      max_new_tokens=a.max_new_tokens)
    print(Path(a.out) / "report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "baselines":
        print("usage: python -m eval.report baselines MODEL --data DATA --out DIR [--limit N] [--threads N]",
              file=sys.stderr)
        return 2
    return baseline_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
