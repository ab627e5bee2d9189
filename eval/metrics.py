"""WER and CER after Whisper's English normalizer (jiwer underneath), and counts of ASR failure modes.

Both sides go through `whisper_normalizer.english.EnglishTextNormalizer` (OpenAI's normalizer from the
Whisper paper: lower case, no punctuation, "mr." -> "mister", spelled numbers -> digits, British ->
American spelling from its 1,739-word map, fillers like "uh"/"hmm" dropped), so a model is not charged
for "Mr." vs "mister" or "colour" vs "color"; the symbols it leaves at a transcript's end ("regard..." ->
"regard .") are dropped too (`normalize`). Rates are corpus-level: total edits / total reference
words (characters), not a mean of per-utterance rates.

The same numbers through `evaluate` (`evaluate.load("wer")` needs the hub, this does not):

    metric = load_metric()      # evaluate.load("<repo>/eval/wer_metric")
    metric.compute(predictions=hyps, references=refs)  # {"wer": ..., "cer": ...}
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jiwer

METRIC_DIR = Path(__file__).parent / "wer_metric"
REPEAT_RUN = 4
"""An n-gram said this many times in a row is a decoding loop (unless the reference does it too)."""
MAX_NGRAM = 8
"""Longest n-gram checked for loops."""
OVERLONG = 2.0
"""A hypothesis with more than this many times the reference's words has run away."""
SHORT = 0.7
"""A hypothesis with under this share of the reference's words stopped early (or skipped speech)."""


@functools.lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalization of one transcript, without tokens that hold no letter or digit.

    The normalizer drops `. $ ¢ € £` when a non-digit follows them and `%` after a non-digit, but its rules
    need a neighbouring character, so symbols at a transcript's end (or a `%` at its start) survive: "In this
    regard..." -> "in this regard ." and "Hello…" -> "hello ..". Those would be scored as words (a hypothesis
    ending in an ellipsis gains an insertion, and a reference ending in one charges every hypothesis that does
    not a deletion). Elsewhere only a doubled symbol leaves one ("x %% y" -> "x % y"), so dropping such tokens
    applies its rules at the ends and to doubled symbols too."""
    return " ".join(w for w in _normalizer()(text or "").split() if any(c.isalnum() for c in w))


def _pairs(refs: Sequence[str], hyps: Sequence[str], do_normalize: bool) -> tuple[list[str], list[str]]:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no references to score")
    f = normalize if do_normalize else (lambda s: s or "")
    return [f(r) for r in refs], [f(h) for h in hyps]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str], normalize: bool = True) -> float:
    """Corpus WER: (substitutions + deletions + insertions) / reference words, after normalization.

    A reference that normalizes to nothing adds no words; words hypothesized for it count as insertions."""
    r, h = _pairs(refs, hyps, normalize)
    if not any(s.split() for s in r):
        raise ValueError("every reference is empty after normalization; WER is undefined")
    return float(jiwer.wer(r, h))


def char_error_rate(refs: Sequence[str], hyps: Sequence[str], normalize: bool = True) -> float:
    """Corpus CER over the normalized strings (spaces count as characters, as in jiwer)."""
    r, h = _pairs(refs, hyps, normalize)
    if not any(r):
        raise ValueError("every reference is empty after normalization; CER is undefined")
    return float(jiwer.cer(r, h))


def word_alignment(refs: Sequence[str], hyps: Sequence[str], normalize: bool = True):
    """The normalized references and jiwer's word alignment of the normalized pairs (the counts and the
    per-utterance chunks that WER is computed from; empty references included, as in `word_error_rate`)."""
    r, h = _pairs(refs, hyps, normalize)
    return r, jiwer.process_words(r, h)


def error_counts(refs: Sequence[str], hyps: Sequence[str], normalize: bool = True) -> dict[str, int]:
    """Word-level hits, substitutions, deletions, insertions and reference words (for reports)."""
    _, o = word_alignment(refs, hyps, normalize)
    return {"hits": o.hits, "substitutions": o.substitutions, "deletions": o.deletions,
            "insertions": o.insertions, "reference_words": o.hits + o.substitutions + o.deletions}


def longest_repeat(words: Sequence[str], max_n: int = MAX_NGRAM) -> int:
    """How many times in a row the most repeated n-gram (n <= max_n) occurs: "a b a b a b c" -> 3."""
    best = 1 if words else 0
    for n in range(1, max_n + 1):
        for i in range(len(words) - 2 * n + 1):
            reps, j = 1, i
            while words[j + n:j + 2 * n] == words[i:i + n]:
                reps, j = reps + 1, j + n
            best = max(best, reps)
    return best


def failure_counts(hyps: Sequence[str], refs: Sequence[str] | None = None) -> dict[str, int]:
    """Count the failure modes of compressed ASR models (each hypothesis at most once per key):

    - empty: no word with a letter or digit left after normalization ("", "...", "uh");
    - repetition: an n-gram repeated REPEAT_RUN+ times in a row (and not so in the reference, if given);
    - overlong: more than OVERLONG x the reference's words (needs REFS);
    - runaway: repetition or overlong;
    - short: not empty, and under SHORT x the reference's words (needs REFS): the decoder ended the
      transcript early or skipped a stretch of speech (a pruned model's failure on long windows; a
      transcript that runs out in dots, which the normalizer drops, counts here too).
    """
    if refs is not None and len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    counts = {"empty": 0, "repetition": 0, "overlong": 0, "runaway": 0, "short": 0}
    for i, hyp in enumerate(hyps):
        words = normalize(hyp).split()
        ref = normalize(refs[i]).split() if refs is not None else None
        if not words:
            counts["empty"] += 1
            continue
        loop = longest_repeat(words) >= REPEAT_RUN and (ref is None or longest_repeat(ref) < REPEAT_RUN)
        long = ref is not None and len(words) > OVERLONG * max(len(ref), 1)
        counts["repetition"] += loop
        counts["overlong"] += long
        counts["runaway"] += loop or long
        counts["short"] += ref is not None and len(words) < SHORT * len(ref)
    return counts


def load_metric(**kwargs):
    """The `evaluate` module in eval/wer_metric: works offline (HF_HUB_OFFLINE=1)."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), **kwargs)


def utterance_errors(refs: Sequence[str], hyps: Sequence[str], normalize: bool = True) -> list[int]:
    """Word errors (substitutions + deletions + insertions) per utterance; they sum to the corpus WER's
    numerator. An empty reference counts every hypothesized word as an insertion (jiwer refuses it)."""
    r, h = _pairs(refs, hyps, normalize)
    out = []
    for ref, hyp in zip(r, h):
        if not ref.split():
            out.append(len(hyp.split()))
            continue
        o = jiwer.process_words(ref, hyp)
        out.append(o.substitutions + o.deletions + o.insertions)
    return out


def paired_wer_difference(refs: Sequence[str], hyps_a: Sequence[str], hyps_b: Sequence[str],
                          samples: int = 2000, seed: int = 0, normalize: bool = True) -> dict[str, float]:
    """WER(b) - WER(a) on the same utterances, with a 95% paired-bootstrap interval.

    Utterances are resampled with replacement `samples` times (the same draw for both systems), and the
    corpus WER difference is recomputed on each draw: is b really worse than a, or is the gap within what
    another draw of eval sentences would move? (Koehn 2004's paired bootstrap, for WER.)
    """
    import numpy as np

    r, ha = _pairs(refs, hyps_a, normalize)
    _, hb = _pairs(refs, hyps_b, normalize)
    words = np.array([len(s.split()) for s in r], dtype=np.float64)
    if words.sum() == 0:
        raise ValueError("every reference is empty after normalization; WER is undefined")

    diff = (np.array(utterance_errors(r, hb, normalize=False), dtype=np.float64)
            - np.array(utterance_errors(r, ha, normalize=False), dtype=np.float64))
    idx = np.random.default_rng(seed).integers(0, len(r), size=(samples, len(r)))
    boot = diff[idx].sum(1) / np.maximum(words[idx].sum(1), 1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"delta": float(diff.sum() / words.sum()), "low": float(low), "high": float(high),
            "utterances": len(r), "samples": samples}
