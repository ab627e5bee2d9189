"""The repetition guard (slim.decoding.repeat_bans): its rule on token lists, and the same rule in the torch-free
ONNX runtime, the torch reference loop and the transformers engine, on a tiny random Whisper that loops."""

import numpy as np
import pytest
import torch

from slim.decoding import MAX_NGRAM, MAX_REPEATS, repeat_ban_index, repeat_bans


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def copies_at_end(tokens: list[int], n: int) -> int:
    """How many back-to-back copies of its last n-gram `tokens` ends in (independent of repeat_bans)."""
    if len(tokens) < n:
        return 0
    gram, k = tokens[len(tokens) - n:], 1
    while len(tokens) >= (k + 1) * n and tokens[len(tokens) - (k + 1) * n:len(tokens) - k * n] == gram:
        k += 1
    return k


def max_run(tokens: list[int]) -> int:
    """The most back-to-back copies of any n-gram (n <= MAX_NGRAM) anywhere in `tokens`."""
    return max((copies_at_end(tokens[:end], n) for end in range(1, len(tokens) + 1) for n in range(1, MAX_NGRAM + 1)),
               default=0)


def test_repeat_bans_rules_out_the_next_copy_only():
    a, b, c = 11, 12, 13
    assert repeat_bans([a, a]) == [a]  # a third "a" is ruled out
    assert repeat_bans([a]) == []
    assert repeat_bans([a, b, a, b, a]) == [b]  # "a b" twice, then "a": the third copy's "b" is due
    assert repeat_bans([a, b, a, b]) == []  # a third copy could still start: nothing is due yet
    assert repeat_bans([c, a, b, a, b, a]) == [b]
    assert repeat_bans([a, a, b, a, a]) == [a]  # a third "a"; "a a b" twice would take a sixth token
    assert repeat_bans([a, a, b, a, a, b, a, a]) == [a, b]  # "a" (n=1), and "a a b" twice then "a a" (n=3)
    assert repeat_bans([a, a], max_repeats=0) == []  # 0: the guard is off
    assert repeat_bans([a, a], max_repeats=2) == [a] and repeat_bans([a, a], max_repeats=3) == []
    assert repeat_bans([a, a, a], max_repeats=3) == [a]
    long = list(range(100, 100 + MAX_NGRAM))
    assert repeat_bans(long + long + long[:-1]) == [long[-1]]
    longer = list(range(100, 101 + MAX_NGRAM))  # one token past the longest n-gram watched
    assert repeat_bans(longer + longer + longer[:-1]) == []


def test_repeat_bans_agrees_with_counting_copies():
    """On random token lists over a 3-token vocabulary (plenty of repeats): a token is banned exactly when
    appending it makes some n-gram end in three back-to-back copies."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(0, 3, int(rng.integers(0, 14))).tolist()
        want = sorted({t for t in range(3) if any(copies_at_end(tokens + [t], n) >= 3 for n in range(1, MAX_NGRAM + 1))})
        assert sorted(set(repeat_bans(tokens))) == want


def test_repeat_ban_index_skips_finished_items():
    rows, cols = repeat_ban_index([[5, 5], [6, 6], [7]], [True, False, True])
    assert (rows, cols) == ([0], [5])
    logits = np.zeros((3, 10), np.float32)
    logits[rows, cols] = -np.inf
    assert np.isinf(logits).sum() == 1 and np.isinf(logits[0, 5])


# ---------------------------------------------------------------------------------------------
# the guard in every engine, on a random model whose greedy decoder loops


NEW = 24


@pytest.fixture(scope="module")
def looping(tmp_path_factory):
    """A tiny random Whisper, a clip and its greedy tokens without the guard, which hold a loop."""
    import dataclasses

    from eval.onnx_engine import torch_greedy_tokens
    from qat.onnx_export import export_model
    from slim.export_format import DecodeConfig
    from slim.model import install_explicit_attention
    from slim.sources import tiny_random_processor, tiny_random_whisper

    model = install_explicit_attention(tiny_random_whisper(seed=0)).eval()
    processor = tiny_random_processor()
    clip = np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1
    feats = processor.feature_extractor([clip], sampling_rate=16000, return_tensors="np").input_features
    free = DecodeConfig.from_model(model)
    plain = torch_greedy_tokens(model, feats, dataclasses.replace(free, max_repeats=0), max_new_tokens=NEW)[0]
    export = export_model(model, tmp_path_factory.mktemp("loop") / "float", mode="float", processor=processor)
    return model, processor, clip, feats, plain, export


def test_the_random_model_loops_without_the_guard(looping):
    plain = looping[4]
    assert max_run(plain) >= 3  # what the guard is for: otherwise the tests below could not fail


def test_every_engine_decodes_under_the_same_guard(looping):
    from eval.engines import TorchEngine
    from eval.onnx_engine import torch_greedy_tokens
    from slim.export_format import DecodeConfig
    from slim.runtime import OnnxEngine

    model, processor, clip, feats, plain, export = looping
    decode = DecodeConfig.from_model(model)
    assert decode.max_repeats == MAX_REPEATS == 2
    guarded = torch_greedy_tokens(model, feats, decode, max_new_tokens=NEW)[0]
    assert max_run(guarded) <= 2 and guarded != plain
    onnx = OnnxEngine(export, threads=1)
    assert onnx.decode.max_repeats == MAX_REPEATS  # written into export_config.json and read back
    assert onnx.generate_tokens(feats, NEW)[0] == guarded
    engine = TorchEngine(model, processor, max_new_tokens=NEW)
    assert engine.transcribe([clip]) == [processor.tokenizer.decode(guarded, skip_special_tokens=True).strip()]
    # teacher forced, the guard follows the fed tokens: fed its own guarded tokens, each loop picks them again,
    # and fed the unguarded loop, it rules out the copies that loop goes on to pick
    for picks in (onnx.generate_tokens(feats, forced=[guarded])[0],
                  torch_greedy_tokens(model, feats, decode, forced=[guarded])[0]):
        assert picks[:-1] == guarded
    picks = onnx.generate_tokens(feats, forced=[plain])[0]
    assert picks == torch_greedy_tokens(model, feats, decode, forced=[plain])[0]
    assert picks[:-1] != plain


def test_max_repeats_zero_turns_the_guard_off(looping):
    import json

    from slim.export_format import CONFIG_FILE
    from slim.runtime import OnnxEngine

    model, processor, clip, feats, plain, export = looping
    cfg = json.loads((export / CONFIG_FILE).read_text())
    cfg["decode"]["max_repeats"] = 0
    (export / CONFIG_FILE).write_text(json.dumps(cfg))
    try:
        assert OnnxEngine(export, threads=1).generate_tokens(feats, NEW)[0] == plain
        del cfg["decode"]["max_repeats"]  # an export written before the guard: the default applies
        (export / CONFIG_FILE).write_text(json.dumps(cfg))
        assert max_run(OnnxEngine(export, threads=1).generate_tokens(feats, NEW)[0]) <= 2
    finally:
        cfg["decode"]["max_repeats"] = 2
        (export / CONFIG_FILE).write_text(json.dumps(cfg))


def test_load_engine_sets_the_guard(looping):
    """`./launch.sh eval --max-repeats N` sets the guard of the engine it loads; a runtime with its own
    decoding loop refuses it rather than ignoring it."""
    from eval.engines import Engine, load_engine

    model, processor, clip, feats, plain, export = looping
    e = load_engine(export, threads=1, max_repeats=0)
    assert e.max_repeats == 0 and e.ort.generate_tokens(feats, NEW)[0] == plain
    assert load_engine(export, threads=1).max_repeats == 2
    with pytest.raises(ValueError, match="its own loop"):
        Engine().set_max_repeats(0)


def test_eval_reports_the_guard_it_ran_under(looping, tmp_path):
    import json

    import soundfile as sf

    from eval.run import main

    model, processor, clip, feats, plain, export = looping
    sf.write(tmp_path / "a.wav", clip, 16000)
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "text": "one two"}\n')
    for n, tokens in ((0, plain), (None, None)):
        out = tmp_path / f"r{n}.json"
        args = [str(export), "--data", str(tmp_path / "m.jsonl"), "--out", str(out), "--threads", "1",
                "--max-new-tokens", str(NEW), "--no-progress"] + ([] if n is None else ["--max-repeats", str(n)])
        assert main(args) == 0
        r = json.loads(out.read_text())
        assert r["max_repeats"] == (2 if n is None else n)
        if tokens is not None:
            assert r["hypotheses"][0]["hyp"] == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
