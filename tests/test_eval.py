"""The evaluation harness: engines, the runner (skips, report keys, sizes), reports and the transcribe CLI.

Runs on the tiny random Whisper (2+2 layers, d_model 64) with the real tiny.en tokenizer; its
transcripts are noise, so decoding is capped at a few tokens and WERs are checked against the metric
module on the hypotheses, or exactly through a scripted engine.
"""

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval.engines import Engine, dynamic_int8_bytes, load_engine, shipped_files  # noqa: E402
from eval.metrics import char_error_rate, word_error_rate  # noqa: E402
from eval.report import comparison_table, measure_baselines, wer_axis_top, write_comparison  # noqa: E402
from eval.run import evaluate_engine, evaluate_engines, evaluate_model, transcribe_main  # noqa: E402
from slim.model import count_parameters, save_model  # noqa: E402
from slim.sources import tiny_random_processor, tiny_random_whisper  # noqa: E402

SR = 16000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS = 4  # random weights never emit end-of-text: cap decoding


def _tone(seconds: float, freq: float = 220.0, sr: int = SR, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny"
    return save_model(tiny_random_whisper(seed=0), d, processor=tiny_random_processor())


@pytest.fixture(scope="module")
def ort_cache(tmp_path_factory):
    """One ORT dynamic-INT8 export of `model_dir`, shared by the tests (the export takes seconds)."""
    return tmp_path_factory.mktemp("ort") / "tiny.onnx-dynamic-int8"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Three good clips (one 44.1 kHz stereo flac) and four bad ones: missing, corrupt, empty text, 40 s."""
    d = tmp_path_factory.mktemp("data")
    sf.write(d / "a.wav", _tone(1.0, 220), SR)
    sf.write(d / "b.flac", _tone(1.5, 330, sr=44100, channels=2), 44100)
    sf.write(d / "c.wav", _tone(0.8, 440), SR)
    sf.write(d / "empty_text.wav", _tone(1.0), SR)
    sf.write(d / "long.wav", _tone(40.0), SR)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio")
    lines = [
        {"audio": "a.wav", "text": "the child almost hurt the small dog"},
        {"audio": "missing.wav", "text": "never there"},
        {"audio": "b.flac", "text": "drop the two when you add the figures"},
        {"audio": "corrupt.wav", "text": "broken file"},
        {"audio": "empty_text.wav", "text": ""},
        {"audio": "long.wav", "text": "far too long for one window"},
        {"audio": "c.wav", "text": "mend the coat before you go out"},
    ]
    (d / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d / "manifest.jsonl"


def test_report_keys_types_and_skips(model_dir, manifest, tmp_path):
    out = tmp_path / "r" / "report.json"
    r = evaluate_model(model_dir, manifest, out=out, max_new_tokens=TOKENS, threads=1, progress=False)
    assert json.loads(out.read_text()) == r
    assert not [p for p in out.parent.iterdir() if p.name != "report.json"]  # no temp file left
    # the four bad items are skipped with their reasons, the three good ones evaluated
    assert r["utterances"] == 3
    assert r["skipped"] == 4
    assert r["skipped_by_reason"] == {"missing": 1, "unreadable": 1, "too_long": 1, "empty_text": 1}
    assert [h["ref"] for h in r["hypotheses"]] == ["the child almost hurt the small dog",
                                                   "drop the two when you add the figures",
                                                   "mend the coat before you go out"]
    for h in r["hypotheses"]:
        assert set(h) == {"id", "ref", "hyp", "failure", "seconds"} and isinstance(h["hyp"], str) and h["seconds"] > 0
    refs, hyps = [h["ref"] for h in r["hypotheses"]], [h["hyp"] for h in r["hypotheses"]]
    assert r["wer"] == pytest.approx(word_error_rate(refs, hyps))
    assert r["cer"] == pytest.approx(char_error_rate(refs, hyps))
    assert r["wer"] > 0.5  # random weights do not transcribe
    assert r["engine"] == "torch" and r["model"] == str(model_dir) and r["data"] == str(manifest)
    assert isinstance(r["seconds_per_utterance"], float) and r["seconds_per_utterance"] > 0
    assert r["seconds_per_utterance"] == pytest.approx(sum(h["seconds"] for h in r["hypotheses"]) / 3, rel=1e-2)
    assert r["audio_seconds"] == pytest.approx(1.0 + 1.5 + 0.8, abs=1e-3)
    assert isinstance(r["failures"], dict) and all(isinstance(v, int) for v in r["failures"].values())
    assert r["structure"]["encoder_heads"] == [4, 4] and r["structure"]["decoder_ffn"] == [128, 128]
    assert r["parameters"] == count_parameters(tiny_random_whisper(seed=0))
    # model_bytes: every file save_model wrote, and nothing else
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    assert shipped_files(model_dir) == files
    assert r["model_bytes"] == sum(p.stat().st_size for p in files)
    assert r["threads"] == 1 and r["batch_size"] == 1


class Scripted(Engine):
    """Answers by clip length: an exact hand-checkable engine for the runner's scoring and failure flags."""

    name, model_bytes, files, info = "scripted", 123, [], {}
    answers = {SR: "the child almost hurt the small dog",  # a.wav: exact
               int(1.5 * SR): "",  # b.flac: empty output
               int(0.8 * SR): "mend mend mend mend mend mend mend mend mend mend mend mend"}  # runaway repetition

    def transcribe(self, audios, batch_size=1):
        return [self.answers[len(a)] for a in audios]


def test_runner_scores_exactly_and_counts_failures(manifest):
    r = evaluate_engine(Scripted(), manifest, progress=False, warmup=0)
    # refs of 7 + 8 + 7 words; errors: exact 0, empty output 8 deletions, and
    # "mend the coat before you go out" vs 12 x "mend": 1 hit, 6 substitutions, 5 insertions = 11
    assert r["wer"] == pytest.approx((0 + 8 + 11) / 22)
    assert r["failures"] == {"empty": 1, "repetition": 1, "overlong": 0, "runaway": 1, "short": 0}
    assert [h["failure"] for h in r["hypotheses"]] == [None, "empty", "repetition"]
    # the per-hypothesis tag names a short transcript too (3 of 7 words), and nothing for one word missing
    from eval.run import _failure
    assert _failure("the child almost", "the child almost hurt the small dog") == "short"
    assert _failure("the child almost hurt the small", "the child almost hurt the small dog") is None
    assert r["model_bytes"] == 123 and r["engine"] == "scripted" and r["utterances"] == 3
    assert r["warmup"] == 0


def test_engines_run_interleaved_on_the_same_utterances(manifest):
    calls = []

    class Logged(Scripted):
        def __init__(self, name):
            self.name = name

        def transcribe(self, audios, batch_size=1):
            calls.append(self.name)
            return super().transcribe(audios, batch_size)

    a, b = evaluate_engines([Logged("a"), Logged("b")], manifest, progress=False, warmup=1)
    # warm-up of each, then the order rotates from utterance to utterance
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert a["engine"] == "a" and b["engine"] == "b"
    assert a["hypotheses"] == [dict(h, seconds=a["hypotheses"][i]["seconds"]) for i, h in enumerate(b["hypotheses"])]
    assert a["wer"] == b["wer"] and a["skipped"] == b["skipped"] == 4


def test_batch_size_and_limit(model_dir, manifest):
    r = evaluate_model(model_dir, manifest, batch_size=2, limit=2, max_new_tokens=TOKENS, progress=False)
    assert r["utterances"] == 2 and r["batch_size"] == 2
    assert all("seconds" not in h for h in r["hypotheses"])  # a batch has no per-utterance time


def test_dynamic_int8_engine_is_smaller_and_counted_honestly(tmp_path):
    # wide FFNs: with d_model 64 the vocabulary dominates, and quantize_dynamic adds an int8 copy of the
    # tied output projection while the embedding stays fp32 (see eval.engines)
    model = tiny_random_whisper(seed=1, encoder_ffn_dim=4096, decoder_ffn_dim=4096)
    d = save_model(model, tmp_path / "wide", processor=tiny_random_processor())
    f = load_engine(d, "torch")
    q = load_engine(d, "torch-dynamic-int8", max_new_tokens=TOKENS)
    assert q.name == "torch-dynamic-int8"
    assert q.model_bytes < f.model_bytes
    # the int8 state: 1 byte per Linear weight + its fp32 bias, 4 per other tensor; header < 64 KiB
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    int8 = sum(m.weight.numel() + 4 * (m.bias.numel() if m.bias is not None else 0) + 8 for m in lin)
    rest = 4 * (count_parameters(model) - sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                                              for m in lin if m is not model.proj_out))
    weights = dynamic_int8_bytes(q.model)
    assert int8 + rest <= weights <= int8 + rest + 65536
    others = sum(p.stat().st_size for p in shipped_files(d) if p.suffix != ".safetensors")
    assert q.model_bytes == weights + others
    texts = q.transcribe([_tone(1.0), _tone(0.5)])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_onnx_dynamic_int8_engine_exports_once(model_dir, ort_cache):
    cache = ort_cache
    e = load_engine(model_dir, "onnx-dynamic-int8", cache_dir=cache, max_new_tokens=TOKENS, threads=1)
    assert e.name == "onnx-dynamic-int8"
    listed = json.loads((cache / "export_config.json").read_text())["files"]
    assert e.model_bytes == sum(v["bytes"] for v in listed.values()) + (cache / "export_config.json").stat().st_size
    mtime = (cache / "decoder.onnx").stat().st_mtime_ns
    again = load_engine(model_dir, "onnx-dynamic-int8", cache_dir=cache, max_new_tokens=TOKENS, threads=1)
    assert (cache / "decoder.onnx").stat().st_mtime_ns == mtime  # reused, not re-exported
    assert load_engine(cache, max_new_tokens=TOKENS, threads=1).name == "onnx-dynamic-int8"  # auto: export dir
    texts = again.transcribe([_tone(1.0)])
    assert len(texts) == 1 and isinstance(texts[0], str)
    with pytest.raises(ValueError, match="export_config.json"):
        load_engine(model_dir, "onnx")


def test_auto_engine_follows_the_quant_settings(tmp_path):
    """A fake-quant dir loads through qat.prepare, a converted one through qat.convert (auto-detected)."""
    from qat.convert import convert_to_int8, save_int8_model
    from qat.prepare import QuantConfig, ptq

    g = torch.Generator().manual_seed(0)
    batches = [{"input_features": torch.randn(2, 80, 3000, generator=g),
                "labels": torch.randint(0, 50000, (2, 6), generator=g)}]
    cfg = QuantConfig(embeddings=True)
    fq = ptq(tiny_random_whisper(seed=0), cfg, batches)
    proc = tiny_random_processor()
    fq_dir = save_model(fq, tmp_path / "fq", processor=proc, quant=cfg.to_dict())
    int8_dir = save_int8_model(convert_to_int8(fq), tmp_path / "int8", processor=proc)
    f, q = load_engine(fq_dir, max_new_tokens=TOKENS), load_engine(int8_dir, max_new_tokens=TOKENS)
    assert (f.name, q.name) == ("torch-fake-quant", "torch-int8")
    for e, d in ((f, fq_dir), (q, int8_dir)):
        assert e.model_bytes == sum(p.stat().st_size for p in d.iterdir() if p.is_file())
        assert e.info["parameters"] == count_parameters(tiny_random_whisper(seed=0))
        assert len(e.transcribe([_tone(1.0)])) == 1
    assert q.model_bytes < f.model_bytes
    with pytest.raises(ValueError, match="post-training baseline of a float model"):
        load_engine(fq_dir, "torch-dynamic-int8")


def test_comparison_report_and_baselines(model_dir, manifest, ort_cache, tmp_path):
    rows = measure_baselines(model_dir, manifest, tmp_path / "rep", limit=2, threads=1, progress=False,
                             max_new_tokens=TOKENS, cache_dir=ort_cache)
    assert [r["variant"] for r in rows] == ["fp32", "PyTorch dynamic INT8", "ORT dynamic INT8"]
    assert [r["engine"] for r in rows] == ["torch", "torch-dynamic-int8", "onnx-dynamic-int8"]
    assert all(r["utterances"] == 2 for r in rows)
    assert [r["hypotheses"][1]["ref"] for r in rows] == ["drop the two when you add the figures"] * 3
    assert len({r["skipped"] for r in rows}) == 1  # the same items, skipped the same way
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == [r["variant"] for r in rows]
    md = (tmp_path / "rep" / "report.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per variant
    assert table[1].startswith("| fp32 | torch | ") and " 1.00x |" in table[1]
    assert (tmp_path / "rep" / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert "![WER against size and latency](report.png)" in md


def test_comparison_table_values(tmp_path):
    rows = [{"variant": "fp32", "engine": "torch", "wer": 0.05, "cer": 0.02, "model_bytes": 151_000_000,
             "seconds_per_utterance": 0.5, "utterances": 10, "skipped": 1, "failures": {"empty": 0}},
            {"variant": "int8", "engine": "onnx-qdq", "wer": 0.0625, "cer": 0.03, "model_bytes": 40_000_000,
             "seconds_per_utterance": 0.25, "utterances": 10, "skipped": 1, "failures": {"empty": 2, "repetition": 1}}]
    lines = comparison_table(rows).splitlines()
    assert lines[2] == "| fp32 | torch | 5.00 | 2.00 | 151.0 | 0.500 | 1.00x | 10 | 1 | 0 |"
    assert lines[3] == "| int8 | onnx-qdq | 6.25 | 3.00 | 40.0 | 0.250 | 2.00x | 10 | 1 | empty 2, repetition 1 |"
    md = write_comparison(rows, tmp_path, title="t", notes=["command: `x`"])
    assert md.read_text().startswith("# t\n\n- command: `x`\n")
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC
    # extra eval sets get their own WER column, beside the main set's; a row without the set shows "-"
    rows[0]["extra"] = {"real": {"wer": 0.1, "cer": 0.05}, "prompts": {"wer": 0.2, "cer": 0.1}}
    rows[1]["extra"] = {"real": {"wer": 0.125, "cer": 0.06}}
    lines = comparison_table(rows).splitlines()
    assert lines[0].startswith("| variant | engine | WER % | real WER % | prompts WER % | CER % |")
    assert lines[2] == "| fp32 | torch | 5.00 | 10.00 | 20.00 | 2.00 | 151.0 | 0.500 | 1.00x | 10 | 1 | 0 |"
    assert lines[3].startswith("| int8 | onnx-qdq | 6.25 | 12.50 | - | 3.00 |")
    # the failures column names each extra set's counts after the main set's; sets without any are left out
    rows[0]["extra"]["prompts"]["failures"] = {"empty": 0, "short": 3}
    rows[1]["extra"]["real"]["failures"] = {"overlong": 1, "runaway": 1}
    lines = comparison_table(rows).splitlines()
    assert lines[2].endswith("| 10 | 1 | prompts: short 3 |")
    assert lines[3].endswith("| 10 | 1 | empty 2, repetition 1; real: overlong 1, runaway 1 |")
    write_comparison(rows, tmp_path, title="t")
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_wer_axis_clips_only_outliers():
    assert wer_axis_top([5.0, 6.0, 7.0]) == pytest.approx(1.15 * 7.0)
    assert wer_axis_top([5.0, 6.0, 7.0, 79.0]) == pytest.approx(1.15 * 7.0)  # a broken stage does not set the scale
    assert wer_axis_top([]) == 1.0


def test_transcribe_cli(model_dir, manifest, tmp_path, capsys):
    d = manifest.parent
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav at all")
    rc = transcribe_main([str(model_dir), str(d / "a.wav"), str(bad), str(d / "b.flac"),
                          "--max-new-tokens", str(TOKENS), "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.splitlines()
    assert [l.split("\t")[0] for l in lines] == [str(d / "a.wav"), str(d / "b.flac")]
    assert all(len(l.split("\t")) == 2 for l in lines)
    assert f"error: {bad}:" in err
    assert transcribe_main([str(model_dir), str(d / "c.wav"), "--max-new-tokens", "2"]) == 0


@pytest.mark.real
def test_real_tiny_en_engines(tmp_path):
    """tiny.en on two real clips: fp32 and PyTorch dynamic INT8 transcribe them well; INT8 is smaller."""
    from slim.sources import import_model

    d = import_model("tiny.en", tmp_path / "tiny.en")
    data = os.path.join(os.path.dirname(__file__), "..", "data", "real-speech", "manifest.jsonl")
    f = evaluate_model(d, data, limit=2, progress=False, warmup=0, threads=1)
    q = evaluate_model(d, data, engine="torch-dynamic-int8", limit=2, progress=False, warmup=0, threads=1)
    assert f["wer"] <= 0.1 and q["wer"] <= 0.15
    assert f["parameters"] == 37_760_256
    assert 0.75 < q["model_bytes"] / f["model_bytes"] < 0.85  # the fp32 embedding stays: only ~19% smaller


def test_token_budget_follows_the_longest_clip_and_the_cap(model_dir):
    from slim.decoding import TOKEN_SLACK, TOKENS_PER_SECOND, token_budget

    one, three = np.zeros(SR, np.float32), np.zeros(3 * SR + 1, np.float32)
    assert token_budget([one]) == TOKENS_PER_SECOND + TOKEN_SLACK
    assert token_budget([one, three]) == 3 * TOKENS_PER_SECOND + 1 + TOKEN_SLACK  # ceil(3.0000625 s * 8) = 25
    assert token_budget([three], max_new_tokens=5) == 5

    # random weights never emit end-of-text: without the budget they would run to 448 positions
    eng = load_engine(model_dir, "torch", threads=1)
    seen = []
    generate = eng.model.generate

    def spy(**kw):
        ids = generate(**kw)
        seen.append((kw["max_new_tokens"], ids.shape[1]))
        return ids

    eng.model.generate = spy
    eng.transcribe([_tone(0.5), _tone(1.0)], batch_size=2)
    budget = int(np.ceil(1.0 * TOKENS_PER_SECOND)) + TOKEN_SLACK
    assert seen[0][0] == budget
    assert seen[0][1] <= budget + 4  # prompt tokens + the budget, never the decoder's 448
