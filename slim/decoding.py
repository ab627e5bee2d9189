"""The token budget every engine decodes under.

Each call may generate at most `token_budget(clips)` tokens, TOKENS_PER_SECOND per second of its
longest clip plus TOKEN_SLACK (and never more than `max_new_tokens` when that is set). Speech tops out
near 6 tokens/s (the densest transcript in our synthetic and real sets: 5.7 tokens/s), so a correct
transcript is never cut; what the budget stops is a broken model (a freshly pruned one, say) looping
until the decoder's 448 positions, which makes evaluating it several times slower than evaluating the
dense model (docs/results.md) while adding nothing to its WER but more insertions.
"""

from __future__ import annotations

import numpy as np

from slim.audio import SAMPLING_RATE

TOKENS_PER_SECOND = 8
TOKEN_SLACK = 16


def token_budget(audios: list[np.ndarray], max_new_tokens: int | None = None) -> int:
    """Most tokens to generate for these clips (see the module docstring)."""
    longest = max((len(a) for a in audios), default=0) / SAMPLING_RATE
    budget = int(np.ceil(longest * TOKENS_PER_SECOND)) + TOKEN_SLACK
    return min(budget, max_new_tokens) if max_new_tokens else budget
