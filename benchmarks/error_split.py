"""Where a model's word errors are: substitutions, deletions and insertions, and the share of reference words
it misses among those its training transcripts hold and those they do not.

    .venv/bin/python benchmarks/error_split.py REPORT [REPORT ...] --train MANIFEST

REPORT: what `./launch.sh compare` reads (an `eval` REPORT.json, or RUN/report.json:STAGE[:SET]); MANIFEST:
the training set's JSONL manifest (its `text` fields). Words are compared after Whisper's English normalizer;
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+")
    p.add_argument("--train", required=True, help="the training manifest (JSONL with `text`)")
    a = p.parse_args(argv)
    from eval.metrics import normalize
    from eval.run import load_report

    lines = Path(a.train).read_text().splitlines()
    vocabulary = {w for line in lines if line.strip() for w in normalize(json.loads(line)["text"]).split()}
    for spec in a.reports:
        s = split(load_report(spec), vocabulary)
        print(f"{spec}: S {s['substitutions']} D {s['deletions']} I {s['insertions']}; {s['seen_words']} of "
              f"{s['reference_words']} reference words in the training text; missed: "
              f"{100 * s['missed_seen']:.2f}% of those, {100 * s['missed_unseen']:.2f}% of the others")
    return 0


if __name__ == "__main__":
    sys.exit(main())
