"""The token budget and the repetition guard every engine decodes under.

Each call may generate at most `token_budget(clips)` tokens, TOKENS_PER_SECOND per second of its
longest clip plus TOKEN_SLACK (and never more than `max_new_tokens` when that is set). Speech tops out
near 6 tokens/s (the densest transcript in our synthetic and real sets: 5.7 tokens/s), so a correct
transcript is never cut; what the budget stops is a broken model (a freshly pruned one, say) looping
until the decoder's 448 positions, which makes evaluating it several times slower than evaluating the
dense model (docs/results.md) while adding nothing to its WER but more insertions.

The repetition guard (`repeat_bans`) rules out, at each greedy step, a token that would make the output
end in more than `max_repeats` back-to-back copies of one n-gram (n up to MAX_NGRAM tokens). A compressed
model's greedy decoder sometimes locks into a loop ("two- two- two- ..."); ruling the next copy out makes
it take its next-best token, which usually carries on with the speech. Whisper's own decoding meets the
same failure after the fact (a compression-ratio check, then decoding again at a higher temperature); the
guard is deterministic, costs no second decode, and is the same rule in the torch-free runtime, the torch
reference loop and the transformers engine (a logits processor), which is why it is ours and not
transformers' `NoRepeatNGramLogitsProcessor` (that one bans any n-gram seen anywhere before, which real
transcripts repeat all the time). No transcript of our training, synthetic, real-clip or real-prompt
sets holds three back-to-back copies of any n-gram, so the default of two never alters a correct one of
those; speech that does repeat a phrase three times over would lose the third copy's last token.
"""

from __future__ import annotations

import numpy as np

from slim.audio import SAMPLING_RATE

TOKENS_PER_SECOND = 8
TOKEN_SLACK = 16
MAX_REPEATS = 2
"""Default of `DecodeConfig.max_repeats`: back-to-back copies of an n-gram a transcript may hold."""
MAX_NGRAM = 16


def token_budget(audios: list[np.ndarray], max_new_tokens: int | None = None) -> int:
    """Most tokens to generate for these clips (see the module docstring)."""
    longest = max((len(a) for a in audios), default=0) / SAMPLING_RATE
    budget = int(np.ceil(longest * TOKENS_PER_SECOND)) + TOKEN_SLACK
    return min(budget, max_new_tokens) if max_new_tokens else budget


def repeat_bans(tokens: list[int], max_repeats: int = MAX_REPEATS, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Tokens that, appended to `tokens`, would end them in max_repeats + 1 back-to-back copies of an
    n-gram (n <= max_ngram); max_repeats 0 turns the guard off. See the module docstring."""
    if max_repeats <= 0:
        return []
    bans, end = [], len(tokens)
    for n in range(1, max_ngram + 1):
        span = (max_repeats + 1) * n - 1  # the copies so far and all but the last token of the next one
        if span > end:
            break
        tail = tokens[end - span:]
        if tail[:-n] == tail[n:]:  # the tail repeats with period n, so the next copy's last token is due
            bans.append(tokens[end - n])
    return bans


def repeat_ban_index(outs: list[list[int]], live, max_repeats: int = MAX_REPEATS) -> tuple[list[int], list[int]]:
    """(rows, tokens) to mask in a (batch, vocab) logits array: `repeat_bans` of each live item's output."""
    rows: list[int] = []
    cols: list[int] = []
    for b, out in enumerate(outs):
        if live[b]:
            bans = repeat_bans(out, max_repeats)
            rows += [b] * len(bans)
            cols += bans
    return rows, cols
