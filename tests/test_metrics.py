"""eval.metrics and the local `evaluate` module against hand-computed error rates."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from eval.metrics import (METRIC_DIR, char_error_rate, error_counts, failure_counts, longest_repeat,  # noqa: E402
                          normalize, word_error_rate)

ROOT = Path(__file__).resolve().parents[1]


def test_wer_hand_computed():
    # "the cat sat on the mat" -> "the cat sit on mat": 1 substitution (sat/sit) + 1 deletion (the) of 6 words
    assert word_error_rate(["the cat sat on the mat"], ["the cat sit on mat"]) == pytest.approx(2 / 6)
    # 2 insertions of 2 words
    assert word_error_rate(["hello world"], ["hello big bad world"]) == pytest.approx(1.0)
    assert word_error_rate(["hello world"], [""]) == 1.0
    assert error_counts(["the cat sat on the mat"], ["the cat sit on mat"]) == {
        "hits": 4, "substitutions": 1, "deletions": 1, "insertions": 0, "reference_words": 6}


def test_error_split_counts_what_wer_counts_empty_references_included():
    """A reference that normalizes to nothing adds its hypothesis' words as insertions, in the WER, in
    `error_counts` and in benchmarks/error_split.py's split (which once dropped such utterances)."""
    from benchmarks.error_split import split

    refs, hyps = ["the cat sat", "uh", "on the mat"], ["the cat sit", "oh no", "on mat"]
    assert normalize("uh") == ""
    c = error_counts(refs, hyps)
    assert (c["substitutions"], c["deletions"], c["insertions"], c["reference_words"]) == (1, 1, 2, 6)
    assert word_error_rate(refs, hyps) == pytest.approx(4 / 6)
    s = split({"hypotheses": [{"ref": r, "hyp": h} for r, h in zip(refs, hyps)]}, vocabulary={"the", "cat"})
    assert (s["substitutions"], s["deletions"], s["insertions"], s["reference_words"]) == (1, 1, 2, 6)
    # missed: "sat" (unseen) and "the" of "on the mat" (seen); seen words the, cat, the; unseen sat, on, mat
    assert (s["seen_words"], s["missed_seen"], s["missed_unseen"]) == (3, pytest.approx(1 / 3), pytest.approx(1 / 3))


def test_error_split_by_voice_groups_each_utterance_by_its_id():
    from benchmarks.error_split import by_voice

    report = {"hypotheses": [{"id": "a", "ref": "the cat sat", "hyp": "the cat sat"},
                             {"id": "b", "ref": "on the mat", "hyp": "on a mat"},
                             {"id": "c", "ref": "a dog", "hyp": "the dog barked"}]}
    got = by_voice(report, {"a": "flite:slt", "b": "espeak-ng:en-us", "c": "flite:slt"})
    assert got == {"espeak-ng:en-us": (1, pytest.approx(1 / 3)), "flite:slt": (2, pytest.approx(2 / 5))}


def test_loop_cut_ends_a_transcript_where_its_loop_starts():
    from benchmarks.loop_cut import loop_cut, loop_start

    speech = ("one day the old fisherman walked down to the harbour and counted every boat that had come back "
              "safely from the storm before night fell")
    assert len(speech.split()) == 25 and loop_start(speech) is None  # plain speech is not cut
    assert loop_start("the the, " * 9) is None  # 18 words: too few to tell
    for loop in (" the the," * 30, " I, you, I, I, you," * 12):
        start = loop_start(speech + loop)
        # the span that first compresses like a loop may begin a few words before it, never after its start
        assert 20 <= start <= 25, start
        assert loop_cut(speech + loop) == " ".join(speech.split()[:start])


def test_wer_is_corpus_level_not_mean_of_utterances():
    # utterance 1: 0 errors / 4 words; utterance 2: 2 substitutions + 1 insertion / 2 words (rate 1.5).
    # corpus: 3 / 6 = 0.5 (the mean of rates would be 0.75)
    refs, hyps = ["a b c d", "e f"], ["a b c d", "x y z"]
    assert word_error_rate(refs, hyps) == pytest.approx(0.5)


@pytest.mark.parametrize("ref, hyp", [
    ("Mr. Smith paid twenty-one dollars.", "mister smith paid $21"),   # abbreviation, numbers, currency
    ("Hello, World!", "hello world"),                                  # punctuation and case
    ("The colour of the theatre", "the color of the theater"),         # British -> American spelling
    ("I have twenty one apples", "i have 21 apples"),                  # spelled numbers -> digits
    ("it's nine o'clock", "It is nine o'clock."),                      # contractions
    ("well uh I think so", "well i think so"),                         # fillers dropped
])
def test_normalization_makes_equivalent_forms_equal(ref, hyp):
    assert word_error_rate([ref], [hyp]) == 0.0
    assert char_error_rate([ref], [hyp]) == 0.0


def test_normalize_false_scores_raw_strings():
    assert word_error_rate(["Hello, World!"], ["hello world"], normalize=False) == 1.0
    assert normalize("Mr. Jones, the COLOUR!") == "mister jones the color"


def test_a_trailing_ellipsis_is_not_a_word():
    """Whisper's normalizer drops "." before a non-digit but keeps a transcript's last dots as a token; those
    are not words on either side (mid-sentence ellipses were never tokens, a decimal point stays)."""
    assert normalize("In this regard...") == normalize("In this regard,") == "in this regard"
    assert normalize("Hello…") == "hello" and normalize("Wait... what?") == "wait what"
    assert normalize("It costs $3.50...") == "it costs $3.50"
    assert word_error_rate(["At the sound of the tone, the time will be exactly..."],
                           ["At the sound of the tone the time will be exactly."]) == 0.0
    assert word_error_rate(["the time is"], ["The time is..."]) == 0.0
    assert char_error_rate(["the time is"], ["The time is..."]) == 0.0
    assert normalize("x %% y") == "x y"
    assert normalize("...") == "" and failure_counts(["..."]) == {"empty": 1, "repetition": 0, "overlong": 0,
                                                                   "runaway": 0, "short": 0}


def test_cer_hand_computed():
    assert char_error_rate(["abcd"], ["abed"]) == pytest.approx(1 / 4)
    # "the cat" (7 chars incl. space) -> "the bat": 1 substitution
    assert char_error_rate(["the cat", "dog"], ["the bat", "dog"]) == pytest.approx(1 / 10)


def test_errors_on_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no references"):
        word_error_rate([], [])
    with pytest.raises(ValueError, match="every reference is empty"):
        word_error_rate(["uh", "hmm"], ["a", "b"])


def test_number_words_become_digits():
    # the normalizer joins spelled numbers: "one two three" is the single word "123"
    assert normalize("one two three") == "123"
    assert word_error_rate(["one two three"], ["one three"]) == 1.0


def test_longest_repeat():
    assert longest_repeat([]) == 0
    assert longest_repeat("a b c".split()) == 1
    assert longest_repeat("a b a b a b c".split()) == 3
    assert longest_repeat("x the the the the the y".split()) == 5


def test_failure_counts():
    ten = "the quick brown fox jumps over the lazy old dog"
    refs = ["the cat sat", "go to bed", "ha ha ha ha", "a b", "go home now", ten, ten]
    # the last two: 7 of 10 words is not short (under 70% is), 6 of 10 is, with a run of dots the normalizer drops
    hyps = ["", "go to go to go to go to", "ha ha ha ha", "a b c d e", "...", "the quick brown fox jumps over the",
            "the quick brown fox jumps over ... ... ......"]
    assert failure_counts(hyps, refs) == {"empty": 2, "repetition": 1, "overlong": 2, "runaway": 2, "short": 1}
    # without references: loops only (the laughing reference no longer excuses it), nothing is short
    assert failure_counts(hyps) == {"empty": 2, "repetition": 2, "overlong": 0, "runaway": 2, "short": 0}
    assert failure_counts(["fine text"], ["fine text"]) == {"empty": 0, "repetition": 0, "overlong": 0, "runaway": 0,
                                                            "short": 0}


def test_evaluate_loads_the_module_offline_and_matches_the_functions(tmp_path):
    """evaluate.load(<dir>) in a fresh process with HF_HUB_OFFLINE=1 and an empty HF cache: nothing is
    fetched, and it returns what the plain functions do. (One process: `import evaluate` alone takes
    seconds, it imports transformers.pipelines.)"""
    refs = ["Mr. Smith went to Washington.", "the colour is red", "red green blue"]
    hyps = ["mister smith went to washington", "the color was red", "red blue"]
    code = ("import evaluate, json, sys; m = evaluate.load(sys.argv[1]); "
            "print(json.dumps(m.compute(predictions=json.loads(sys.argv[2]), references=json.loads(sys.argv[3]))))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, str(METRIC_DIR), json.dumps(hyps), json.dumps(refs)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # 1 substitution (is/was) + 1 deletion (green) of 12 words
    assert out["wer"] == pytest.approx(2 / 12) == pytest.approx(word_error_rate(refs, hyps))
    assert out["cer"] == pytest.approx(char_error_rate(refs, hyps))
    assert (out["substitutions"], out["deletions"], out["insertions"], out["reference_words"]) == (1, 1, 0, 12)


def test_compare_lists_the_utterances_that_carry_the_difference(tmp_path, capsys):
    from eval.metrics import utterance_errors
    from eval.run import compare_main

    refs = ["the cat sat", "a dog", "", "red green blue black"]
    base = ["the cat sat", "a dog", "", "red green blue black"]
    other = ["the cat", "a dog dog dog", "no way", "red green blue black"]
    assert utterance_errors(refs, other) == [1, 2, 2, 0]
    assert sum(utterance_errors(refs, other)) == round(word_error_rate(refs, other) * 9)
    for name, hyps in (("a", base), ("b", other)):
        rep = {"wer": word_error_rate(refs, hyps),
               "hypotheses": [{"id": f"u{i}", "ref": r, "hyp": h} for i, (r, h) in enumerate(zip(refs, hyps))]}
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    assert compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--worst", "2", "--samples", "20"]) == 0
    out = capsys.readouterr().out
    assert "word errors +5 in all; the 2 largest gains:" in out
    # the WER shown is rescored from the hypotheses, not read from the report's stored figure
    assert f"{100 * word_error_rate(refs, other):7.2f}" in out and f"{100 * word_error_rate(refs, base):7.2f}" in out
    for name in ("a", "b"):
        stale = json.loads((tmp_path / f"{name}.json").read_text()) | {"wer": 0.5}
        (tmp_path / f"{name}.json").write_text(json.dumps(stale))
    assert compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--samples", "20"]) == 0
    rescored = capsys.readouterr().out
    assert " 50.00" not in rescored and "   0.00\n" in rescored
    assert f"{100 * word_error_rate(refs, other):7.2f}" in rescored
    (tmp_path / "c.json").write_text(json.dumps({"wer": 0.1}))
    with pytest.raises(ValueError, match="without per-utterance hypotheses"):
        compare_main([str(tmp_path / "c.json"), str(tmp_path / "b.json")])
    assert "+2  u1: 'a dog dog dog'" in out and "+2  u2: 'no way'" in out and "u0" not in out
    # --agreement: the WER of b's transcripts with a's as the references (a wrote the references here)
    swapped = ["the cat sit", "a dog", "", "red green blue black"]
    for name, hyps in (("a", swapped), ("b", other)):
        rep = {"hypotheses": [{"id": f"u{i}", "ref": r, "hyp": h} for i, (r, h) in enumerate(zip(refs, hyps))]}
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    assert compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--agreement", "--samples", "20"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert word_error_rate(swapped, other) == 5 / 9  # "sit" deleted, 2 + 2 words inserted
    assert line.endswith(f"{100 * 5 / 9:9.2f}") and "≠ base" not in line


def test_paired_wer_difference_is_exact_and_its_interval_brackets_it():
    from eval.metrics import paired_wer_difference

    refs = ["a b c d", "e f g h", "i j k l", "m n o p"] * 5
    base = list(refs)
    other = ["a b c x", "e f g h", "i j k l", "m n o p"] * 5  # one error in every 16 words
    d = paired_wer_difference(refs, base, other, samples=500, seed=1)
    assert d["delta"] == 1 / 16 and d["utterances"] == 20
    assert d["low"] <= d["delta"] <= d["high"] and d["low"] > 0  # b is worse on every draw
    same = paired_wer_difference(refs, base, base, samples=50)
    assert same == {"delta": 0.0, "low": 0.0, "high": 0.0, "utterances": 20, "samples": 50}
    assert paired_wer_difference(refs, base, other, samples=500, seed=1) == d  # seeded: reproducible
    with pytest.raises(ValueError, match="references but"):
        paired_wer_difference(refs, base[:3], other)


def test_compare_command_checks_the_utterances_match(tmp_path, capsys):
    from eval.run import compare_main, compare_reports

    def report(name, hyps, ids=None):
        ids = ids or [f"u{i}" for i in range(len(hyps))]
        r = {"wer": 0.0, "hypotheses": [{"id": i, "ref": "red green blue gold", "hyp": h} for i, h in zip(ids, hyps)]}
        (tmp_path / name).write_text(json.dumps(r))
        return r

    a = report("a.json", ["red green blue gold"] * 4)
    b = report("b.json", ["red green blue"] + ["red green blue gold"] * 3)
    assert compare_reports(a, b, samples=100)["delta"] == 1 / 16
    assert compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--samples", "100"]) == 0
    assert "+6.25" in capsys.readouterr().out
    c = report("c.json", ["red green blue gold"] * 4, ids=["u0", "u1", "u2", "x"])
    with pytest.raises(ValueError, match="different utterances"):
        compare_reports(a, c)
    with pytest.raises(ValueError, match="per-utterance hypotheses"):
        compare_reports(a, {"wer": 0.1})


def test_compare_reads_a_stage_and_eval_set_of_a_run_report(tmp_path, capsys):
    from eval.run import compare_main, load_report

    def hyps(words):
        return [{"id": f"u{i}", "ref": "red green blue gold", "hyp": w} for i, w in enumerate(words)]

    full, cut = ["red green blue gold"] * 4, ["red green blue"] + ["red green blue gold"] * 3
    run = [{"stage": "dense", "wer": 0.0, "hypotheses": hyps(full), "extra": {"real": {"wer": 0.0, "hypotheses": hyps(full)}}},
           {"stage": "convert", "kind": "convert"},  # not evaluated
           {"stage": "qat", "wer": 0.0, "hypotheses": hyps(full), "extra": {"real": {"wer": 1 / 16, "hypotheses": hyps(cut)}}}]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(run))
    assert load_report(f"{path}:qat:real")["wer"] == 1 / 16
    assert load_report(f"{path}:dense") is not None and load_report(f"{path}:dense:eval")["wer"] == 0.0
    assert compare_main([f"{path}:dense:real", f"{path}:qat:real", f"{path}:qat", "--samples", "100"]) == 0
    out = capsys.readouterr().out
    assert "+6.25" in out and "+0.00" in out
    with pytest.raises(ValueError, match=r"needs :STAGE, one of \['dense', 'qat'\]"):
        load_report(str(path))
    with pytest.raises(ValueError, match="has no eval set 'prompts' \\(it has eval, real\\)"):
        load_report(f"{path}:qat:prompts")
    with pytest.raises(FileNotFoundError, match="no such report"):
        load_report(str(tmp_path / "missing.json"))


def test_compare_reads_an_engine_of_an_engine_benchmark_report(tmp_path, capsys):
    """`BENCH.json:ENGINE`: one engine's transcripts of a `bench_engines.py --out` report, paired by clip with
    another engine of the same report or of another run on the same clips."""
    from eval.run import compare_main, load_report

    refs = ["red green blue gold", "cat dog fish bird"]
    bench = {"references": refs, "clips": 2,
             "engines": {"fp32": {"wer": 0.0, "hypotheses": list(refs)},
                         "int8": {"wer": 0.125, "hypotheses": ["red green blue", "cat dog fish bird"]}}}
    path = tmp_path / "win.json"
    path.write_text(json.dumps(bench))
    got = load_report(f"{path}:int8")
    assert got["hypotheses"] == [{"id": "0", "ref": refs[0], "hyp": "red green blue"},
                                 {"id": "1", "ref": refs[1], "hyp": refs[1]}]
    assert compare_main([f"{path}:fp32", f"{path}:int8", "--agreement", "--samples", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].split()[1:3] == ["12.50", "+12.50"] and out[-1].split()[-1] == "12.50"
    with pytest.raises(ValueError, match=r"needs :ENGINE, one of \['fp32', 'int8'\]"):
        load_report(str(path))
    with pytest.raises(ValueError, match=r"needs :ENGINE"):
        load_report(f"{path}:ct2")


def test_concat_windows_writes_the_benchs_long_windows_as_an_eval_set(tmp_path):
    """benchmarks/concat_windows.py: the windows `bench_engines.py --concat` times, on disk and readable by eval."""
    import numpy as np

    from benchmarks.bench_engines import concat_clips, load_clips
    from benchmarks.concat_windows import write_windows
    from slim.audio import load_audio
    from slim.data import load_examples

    manifest = Path(__file__).resolve().parents[1] / "data" / "real-speech" / "manifest.jsonl"
    rows = write_windows([str(manifest)], 12.0, tmp_path / "w")
    want = concat_clips(load_clips([str(manifest)]), 12.0)
    assert 1 < len(rows) == len(want) < 11  # 11 clips of 1-8 s: joined, but not all into one
    for row, w in zip(rows, want):
        assert row["text"] == w["text"] and row["seconds"] <= 12.0 + 0.3  # the last clip's gap included
        np.testing.assert_allclose(load_audio(tmp_path / "w" / row["audio"]), w["audio"], atol=1 / 32768)
    examples, stats = load_examples(tmp_path / "w" / "manifest.jsonl")
    texts = [ex["text"] for ex in examples]
    assert texts == [w["text"] for w in want] and stats.total == 0  # none skipped (none over 30 s)
    assert " ".join(texts).split() == " ".join(json.loads(l)["text"] for l in manifest.read_text().splitlines()).split()


def test_spread_repeats_parts_a_sentence_read_several_times_in_a_row():
    """concat_windows.py --spread-repeats: each sentence's first reading, then its second, ...; order kept."""
    from benchmarks.concat_windows import spread_repeats

    clips = [{"id": str(i), "text": t} for i, t in enumerate("a a a b b b c".split())]
    got = spread_repeats(clips)
    assert [c["id"] for c in got] == ["0", "3", "6", "1", "4", "2", "5"]
    assert all(x["text"] != y["text"] for x, y in zip(got, got[1:]))
    distinct = [{"id": str(i), "text": t} for i, t in enumerate("a b c".split())]
    assert spread_repeats(distinct) == distinct


def test_bench_cache_is_made_again_from_another_model(tmp_path):
    """bench_engines.py reuses a conversion in --work only when it was made from the same model and settings."""
    from benchmarks.bench_engines import _record, cached, made, record_source

    d, f = tmp_path / "onnx-int8", tmp_path / "ggml-model-f16.bin"
    d.mkdir()
    f.write_bytes(b"x")
    a, b = {"model": "/m/a", "mode": "qdq"}, {"model": "/m/b", "mode": "qdq"}
    assert not cached(d, a, reexport=False) and not cached(f, a, reexport=False)  # no record: made again
    record_source(d, a)
    record_source(f, a)
    assert cached(d, a, reexport=False) and cached(f, a, reexport=False)
    assert not cached(d, b, reexport=False) and not cached(f, {**a, "mode": "float"}, reexport=False)
    assert not cached(d, a, reexport=True)
    assert not cached(tmp_path / "absent", a, reexport=False)
    _record(d).write_text("{not json")  # a torn record: made again, not a crash
    assert not cached(d, a, reexport=False)
    calls = []
    for src in (a, a, b):  # made, reused, made again from another model
        assert made(d, src, False, lambda: calls.append(1)) == d
    assert len(calls) == 2 and cached(d, b, reexport=False)
