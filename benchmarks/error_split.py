"""Where a model's word errors are: substitutions, deletions and insertions, and the share of reference words
it misses among those its training transcripts hold and those they do not.

    .venv/bin/python benchmarks/error_split.py REPORT [REPORT ...] --train MANIFEST [--voices EVAL_MANIFEST]

REPORT: what `./launch.sh compare` reads (an `eval` REPORT.json, or RUN/report.json:STAGE[:SET]); MANIFEST:
the training set's JSONL manifest (its `text` fields); EVAL_MANIFEST: the evaluated set's manifest, whose `voice`
per utterance `id` splits each report's WER by voice (a synthetic set's). Words are compared after Whisper's English normalizer;
a reference word counts as missed when the alignment substitutes or deletes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def split(report: dict, vocabulary: set[str]) -> dict:
    from eval.metrics import word_alignment

    refs, out = word_alignment([h["ref"] for h in report["hypotheses"]], [h["hyp"] for h in report["hypotheses"]])
    words, missed = Counter(), Counter()
    for ref, chunks in zip(refs, out.alignments):
        ref_words = ref.split()
        for w in ref_words:
            words[w in vocabulary] += 1
        for c in chunks:
            if c.type in ("substitute", "delete"):
                for w in ref_words[c.ref_start_idx:c.ref_end_idx]:
                    missed[w in vocabulary] += 1
    return {"substitutions": out.substitutions, "deletions": out.deletions, "insertions": out.insertions,
            "reference_words": sum(words.values()), "seen_words": words[True],
            "missed_seen": missed[True] / max(words[True], 1), "missed_unseen": missed[False] / max(words[False], 1)}


def by_voice(report: dict, voices: dict[str, str]) -> dict[str, tuple[int, float]]:
    """{voice: (utterances, WER)} of a report, each utterance's voice looked up by its id."""
    from eval.metrics import word_error_rate

    groups: dict[str, list[dict]] = {}
    for h in report["hypotheses"]:
        groups.setdefault(voices[h["id"]], []).append(h)
    return {v: (len(hs), word_error_rate([h["ref"] for h in hs], [h["hyp"] for h in hs]))
            for v, hs in sorted(groups.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+")
    p.add_argument("--train", required=True, help="the training manifest (JSONL with `text`)")
    p.add_argument("--voices", help="the evaluated set's manifest (JSONL with `id` and `voice`): WER per voice")
    a = p.parse_args(argv)
    from eval.metrics import normalize
    from eval.run import load_report

    lines = Path(a.train).read_text().splitlines()
    vocabulary = {w for line in lines if line.strip() for w in normalize(json.loads(line)["text"]).split()}
    voices = {}
    if a.voices:
        voices = {e["id"]: e["voice"] for e in map(json.loads, Path(a.voices).read_text().splitlines()) if e}
    for spec in a.reports:
        s = split(load_report(spec), vocabulary)
        print(f"{spec}: S {s['substitutions']} D {s['deletions']} I {s['insertions']}; {s['seen_words']} of "
              f"{s['reference_words']} reference words in the training text; missed: "
              f"{100 * s['missed_seen']:.2f}% of those, {100 * s['missed_unseen']:.2f}% of the others")
        if voices:
            print("  " + ", ".join(f"{v} {100 * w:.1f} ({n})" for v, (n, w) in by_voice(load_report(spec), voices).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
