"""What ending a looping transcript would buy, simulated on transcripts already written: per report its WER,
its runaway transcripts (`eval.metrics.failure_counts`), its WER and the base's on the utterances where it does
not run away, and its WER with every transcript cut where a loop starts (`loop_start`).

    .venv/bin/python benchmarks/loop_cut.py BASE REPORT [REPORT ...]

Reports are named as `./launch.sh compare` names them (an `eval` REPORT.json, RUN/report.json:STAGE[:SET] or
BENCH.json:ENGINE); the base is cut too, and all must cover the same utterances.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RATIO = 2.4
"""Whisper's compression-ratio threshold (a transcript whose text zlib shrinks more than this is a loop)."""
SPAN = 20
"""Words a span must hold for the test: shorter ones compress too little to tell."""


def loop_start(text: str, ratio: float = RATIO, span: int = SPAN) -> int | None:
    """Index of the first word from which the next `span` words compress by more than `ratio` (Whisper's test on a
    sliding span of words instead of the whole text, so the cut falls where the loop starts); None if none does."""
    words = text.split()
    for i in range(len(words) - span + 1):
        chunk = " ".join(words[i:i + span]).encode()
        if len(chunk) / len(zlib.compress(chunk)) > ratio:
            return i
    return None


def loop_cut(text: str, ratio: float = RATIO, span: int = SPAN) -> str:
    """The transcript up to `loop_start` (all of it when no loop starts)."""
    i = loop_start(text, ratio, span)
    return text if i is None else " ".join(text.split()[:i])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base")
    p.add_argument("reports", nargs="+")
    a = p.parse_args(argv)
    from eval.metrics import failure_counts, word_error_rate
    from eval.run import compare_reports, load_report

    def wer(refs, hyps, keep):
        return 100 * word_error_rate([refs[i] for i in keep], [hyps[i] for i in keep])

    base = load_report(a.base)
    refs = [h["ref"] for h in base["hypotheses"]]
    base_hyps = [h["hyp"] for h in base["hypotheses"]]
    every = range(len(refs))
    for spec in [a.base, *a.reports]:
        r = load_report(spec)
        compare_reports(base, r, samples=1)  # the same utterances and references, or a clear error
        hyps = [h["hyp"] for h in r["hypotheses"]]
        keep = [i for i in every if not failure_counts([hyps[i]], [refs[i]])["runaway"]]
        cut = [loop_cut(h) for h in hyps]
        print(f"{spec}: WER {wer(refs, hyps, every):.2f}; runaway {len(refs) - len(keep)}, without them "
              f"{wer(refs, hyps, keep):.2f} (base {wer(refs, base_hyps, keep):.2f}); cut at loops "
              f"{wer(refs, cut, every):.2f}, {sum(c != h for c, h in zip(cut, hyps))} transcripts cut")
    return 0


if __name__ == "__main__":
    sys.exit(main())
