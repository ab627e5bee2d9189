"""Write long-window eval sets to disk: consecutive clips joined into windows of up to N seconds, the windows
`bench_engines.py --concat N` times, as wav files and a JSONL manifest that `./launch.sh eval` and recipes'
`data.extra_eval` read.

    .venv/bin/python benchmarks/concat_windows.py SOURCE... --seconds 28 --out DIR [--spread-repeats]

SOURCE: audio folders and/or JSONL manifests, in order (clips over 30 s are left out, as the bench does).
--spread-repeats orders the clips so that no two in a row say the same sentence: the synthetic eval set voices
each sentence three times back to back, which long-form speech never does, and a window holding one sentence
three times over is where a decoder that loops on a whole sentence goes unpunished or a repetition guard bites.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import concat_clips, load_clips  # noqa: E402


def spread_repeats(clips: list[dict]) -> list[dict]:
    """The clips reordered: every sentence's first reading in order, then every second reading, and so on, so
    that a sentence read several times in a row is not (stable: a set without repeats keeps its order)."""
    seen: dict[str, int] = {}
    rank = []
    for i, c in enumerate(clips):
        seen[c["text"]] = seen.get(c["text"], -1) + 1
        rank.append((seen[c["text"]], i))
    return [clips[i] for _, i in sorted(rank)]


def write_windows(sources: list[str], seconds: float, out: Path, spread: bool = False) -> list[dict]:
    """Join the clips of `sources` (reordered by `spread_repeats` if `spread`) into windows of up to `seconds`
    and write them under `out`."""
    import soundfile as sf

    from slim.audio import SAMPLING_RATE
    from slim.io import atomic_write_text

    clips = load_clips(sources)
    if any(c["text"] is None for c in clips):
        raise SystemExit(f"{sources}: every clip needs its transcript (a manifest) to make an eval set")
    windows = concat_clips(spread_repeats(clips) if spread else clips, seconds)
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
    p.add_argument("--spread-repeats", action="store_true",
                   help="no two clips in a row with the same transcript (see the module docstring)")
    args = p.parse_args(argv)
    rows = write_windows(args.sources, args.seconds, args.out, spread=args.spread_repeats)
    mean = sum(r["seconds"] for r in rows) / len(rows)
    print(f"{len(rows)} windows, {mean:.1f} s on average -> {args.out / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
