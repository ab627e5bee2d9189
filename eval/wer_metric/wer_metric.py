"""WER and CER after Whisper's English normalizer, as an `evaluate` module that loads offline.

    import evaluate
    metric = evaluate.load("path/to/eval/wer_metric")
    metric.compute(predictions=["the cat sat"], references=["The cat sat."])  # {"wer": 0.0, "cer": 0.0}

The arithmetic lives in `eval.metrics` (jiwer underneath), so this module and the plain functions
can never disagree. `normalize=False` scores the raw strings.
"""

import datasets
import evaluate

from eval.metrics import char_error_rate, error_counts, word_error_rate

_DESCRIPTION = "Corpus-level word and character error rate after Whisper's EnglishTextNormalizer (jiwer)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of hypothesis transcripts.
    references: list of reference transcripts.
    normalize: apply Whisper's English normalizer to both sides first (default True).
Returns:
    wer, cer (floats), and the word-level counts: hits, substitutions, deletions, insertions,
    reference_words.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WerMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/jitsi/jiwer", "https://github.com/openai/whisper"],
        )

    def _compute(self, predictions, references, normalize=True):
        return {"wer": word_error_rate(references, predictions, normalize=normalize),
                "cer": char_error_rate(references, predictions, normalize=normalize),
                **error_counts(references, predictions, normalize=normalize)}
