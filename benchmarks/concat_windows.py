"""Write long-window eval sets to disk: consecutive clips joined into windows of up to N seconds, the windows
`bench_engines.py --concat N` times, as wav files and a JSONL manifest that `./launch.sh eval` and recipes'
`data.extra_eval` read.

    .venv/bin/python benchmarks/concat_windows.py SOURCE... --seconds 28 --out DIR

SOURCE: audio folders and/or JSONL manifests, in order (clips over 30 s are left out, as the bench does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import concat_clips, load_clips  # noqa: E402


def write_windows(sources: list[str], seconds: float, out: Path) -> list[dict]:
    """Join the clips of `sources` into windows of up to `seconds` and write them under `out`."""
    import soundfile as sf

    from slim.audio import SAMPLING_RATE
    from slim.io import atomic_write_text

    windows = concat_clips(load_clips(sources), seconds)
    if any(w["text"] is None for w in windows):
        raise SystemExit(f"{sources}: every clip needs its transcript (a manifest) to make an eval set")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, w in enumerate(windows):
        name = f"window{i:03d}.wav"
        sf.write(out / name, w["audio"], SAMPLING_RATE)
        rows.append({"audio": name, "text": w["text"], "seconds": round(len(w["audio"]) / SAMPLING_RATE, 2)})
    # the manifest last, in one atomic write: a folder without it is not an eval set yet
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", nargs="+")
    p.add_argument("--seconds", type=float, default=28.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = write_windows(args.sources, args.seconds, args.out)
    mean = sum(r["seconds"] for r in rows) / len(rows)
    print(f"{len(rows)} windows, {mean:.1f} s on average -> {args.out / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
