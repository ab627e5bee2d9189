"""slim.synth: espeak-ng + flite voices -> 16 kHz manifests with disjoint sentences and held-out voices."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

from slim import synth  # noqa: E402
from slim.data import load_examples  # noqa: E402
from slim.synth import Voice, build_synthetic, read_sentences, split_sentences, SynthSettings  # noqa: E402

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")),
                                reason="needs espeak-ng and flite (apt-get install espeak-ng flite)")

SENTENCES = ["HE STARTED AS HE STOOD ASIDE FROM THE DOOR",
             "AND YOU HEARD NOTHING IN THE NIGHT",
             "BUT HER VOICE WAS LOW AND CLEAR TO THE END"]
TWO_VOICES = ["espeak-ng:en-us", "flite:slt"]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three sentences, two voices, flite:slt held out: 2 train sentences x 1 voice, 1 eval sentence x 2."""
    d = tmp_path_factory.mktemp("synth")
    text = d / "three.txt"
    text.write_text("\n".join(SENTENCES) + "\n\n")
    paths = build_synthetic(text, d / "out", voices=TWO_VOICES, holdout_voices=["flite:slt"], eval_fraction=1 / 3,
                            eval_per_sentence=2, seed=0, progress=False)
    return text, d / "out", paths


def test_builder_files_manifests_and_audio(built):
    _, out, paths = built
    assert paths == {"train": out / "train" / "manifest.jsonl", "eval": out / "eval" / "manifest.jsonl",
                     "meta": out / "synth.json"}
    train, evals = rows(paths["train"]), rows(paths["eval"])
    assert len(train) == 2 and len(evals) == 2
    assert {r["voice"] for r in train} == {"espeak-ng:en-us"}  # the held-out voice never trains
    assert [r["voice"] for r in evals] == ["espeak-ng:en-us", "flite:slt"]
    assert len({r["text"] for r in evals}) == 1  # one sentence, both voices
    lowered = {s.lower() for s in SENTENCES}
    assert {r["text"] for r in train + evals} == lowered  # transcripts: the lines lowercased, all used
    assert not {r["text"] for r in train} & {r["text"] for r in evals}  # sentences disjoint
    for split, rs in (("train", train), ("eval", evals)):
        assert sorted(p.name for p in (out / split / "wav").iterdir()) == sorted(f"{r['id']}.wav" for r in rs)
        for r in rs:
            assert r["audio"] == f"wav/{r['id']}.wav" and r["id"].startswith(f"{split}-")
            info = sf.info(str(out / split / r["audio"]))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.duration == pytest.approx(r["seconds"], abs=1e-3)
            assert 1.0 < info.duration < 6.0  # 7-10 words of speech
            assert 0.9 <= r["speed"] <= 1.1
            assert r["pitch"] == 0 if r["voice"].startswith("flite") else -12 <= r["pitch"] <= 12
    meta = json.loads(paths["meta"].read_text())
    assert meta["settings"]["train_voices"] == ["espeak-ng:en-us"]
    assert meta["settings"]["eval_voices"] == TWO_VOICES
    assert meta["stats"]["eval"]["voices"] == {"espeak-ng:en-us": 1, "flite:slt": 1}
    assert meta["stats"]["train"]["utterances"] == 2 and meta["stats"]["train"]["dropped_over_30s"] == 0
    # the manifests load through slim.data with nothing skipped
    examples, stats = load_examples(paths["eval"])
    assert stats.total == 0 and [e["text"] for e in examples] == [evals[0]["text"]] * 2
    assert abs(len(examples[1]["audio"]) - evals[1]["seconds"] * 16000) <= 1


def test_builder_reuses_matching_output_and_is_deterministic(built, tmp_path, monkeypatch):
    text, out, paths = built
    before = {p: p.stat().st_mtime_ns for p in (out / "train" / "wav").iterdir()}
    calls = []
    monkeypatch.setattr(synth, "synthesize", lambda *a, **k: calls.append(a))
    again = build_synthetic(text, out, voices=TWO_VOICES, holdout_voices=["flite:slt"], eval_fraction=1 / 3,
                            eval_per_sentence=2, seed=0, progress=False)
    assert again == paths and calls == []  # reused: nothing voiced
    assert {p: p.stat().st_mtime_ns for p in (out / "train" / "wav").iterdir()} == before
    monkeypatch.undo()
    # the same settings elsewhere give byte-identical audio and manifests
    other = build_synthetic(text, tmp_path / "b", voices=TWO_VOICES, holdout_voices=["flite:slt"],
                            eval_fraction=1 / 3, eval_per_sentence=2, seed=0, progress=False)
    for split in ("train", "eval"):
        assert other[split].read_text() == paths[split].read_text()
        for r in rows(paths[split]):
            assert (other[split].parent / r["audio"]).read_bytes() == (paths[split].parent / r["audio"]).read_bytes()


def test_changed_settings_rebuild(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SENTENCES))
    kw = dict(voices=["espeak-ng:en-us"], eval_fraction=1 / 3, progress=False)
    a = rows(build_synthetic(text, tmp_path / "o", seed=0, **kw)["train"])
    b = rows(build_synthetic(text, tmp_path / "o", seed=1, **kw)["train"])
    assert json.loads((tmp_path / "o" / "synth.json").read_text())["settings"]["seed"] == 1
    assert [r["speed"] for r in a] != [r["speed"] for r in b]
    assert len(list((tmp_path / "o" / "train" / "wav").iterdir())) == len(b)  # no stale files


def test_over_30_s_sentences_are_dropped(tmp_path):
    text = tmp_path / "t.txt"
    long_line = " ".join(["ANOTHER LONG SENTENCE THAT GOES ON AND ON"] * 15)  # 120 words: ~40 s
    text.write_text(f"{SENTENCES[0]}\n{long_line}\n")
    ev = tmp_path / "e.txt"
    ev.write_text(SENTENCES[1])
    paths = build_synthetic(train_text=[text], eval_text=[ev], out_dir=tmp_path / "o",
                            train_voices=["espeak-ng:en-us"], eval_voices=["espeak-ng:en-us"], progress=False)
    assert [r["text"] for r in rows(paths["train"])] == [SENTENCES[0].lower()]
    assert json.loads(paths["meta"].read_text())["stats"]["train"]["dropped_over_30s"] == 1
    assert len(list((tmp_path / "o" / "train" / "wav").iterdir())) == 1


def test_sentence_split_rules(tmp_path):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("a  b\nC D\nA B\n\nE F\n")
    test.write_text("c d\nG H\n")
    assert read_sentences([train]) == ["A B", "C D", "E F"]  # whitespace collapsed, upper case, deduplicated
    assert read_sentences([train], limit=2) == ["A B", "C D"]
    s = SynthSettings(train_text=[str(train)], eval_text=[str(test)], train_voices=["espeak-ng:en-us"],
                      eval_voices=["espeak-ng:en-us"])
    assert split_sentences(s) == (["A B", "E F"], ["C D", "G H"])  # eval lines leave the training set
    s = SynthSettings(train_text=[str(train)], eval_fraction=0.34, train_voices=["espeak-ng:en-us"],
                      eval_voices=["espeak-ng:en-us"])
    tr, ev = split_sentences(s)
    assert len(ev) == 1 and sorted(tr + ev) == ["A B", "C D", "E F"]


def test_voice_names_and_errors(tmp_path, monkeypatch):
    assert Voice.parse("slt") == Voice("flite", "slt")
    assert Voice.parse("en-gb-x-rp+m3") == Voice("espeak-ng", "en-gb-x-rp+m3")
    assert Voice.parse("espeak:en-us").spec == "espeak-ng:en-us"
    with pytest.raises(ValueError, match="write espeak-ng:NAME"):
        Voice.parse("festival:kal")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SENTENCES))
    with pytest.raises(ValueError, match=r"voice flite:nobody: flite has \["):
        build_synthetic(text, tmp_path / "o", voices=["flite:nobody"], progress=False)
    with pytest.raises(ValueError, match="voice espeak-ng:xx-nobody: espeak-ng says"):
        build_synthetic(text, tmp_path / "o", voices=["espeak-ng:xx-nobody"], progress=False)
    with pytest.raises(ValueError, match=r"held-out voices \['flite:slt'\] are also training voices"):
        build_synthetic(text, tmp_path / "o", train_voices=["flite:slt"], holdout_voices=["flite:slt"],
                        progress=False)
    monkeypatch.setattr(synth.shutil, "which", lambda tool: None if tool == "flite" else "/usr/bin/" + tool)
    with pytest.raises(RuntimeError, match="flite not found on PATH.*apt-get install flite"):
        build_synthetic(text, tmp_path / "o", voices=["flite:slt"], progress=False)
    assert not (tmp_path / "o" / "synth.json").exists()


def test_default_design_and_cli(tmp_path, capsys):
    """The defaults name 5 training voices and 7 eval voices (2 held out); the CLI on a tiny slice of them."""
    s = SynthSettings(train_text=list(synth.DEFAULT_TRAIN_TEXT))
    assert len(s.train_voices) == 5 and len(s.eval_voices) == 7
    assert set(s.eval_voices) - set(s.train_voices) == set(synth.DEFAULT_HOLDOUT_VOICES)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SENTENCES))
    ev = tmp_path / "e.txt"
    ev.write_text("THE END\n")
    rc = synth.main(["--text", str(text), "--eval-text", str(ev), "--out", str(tmp_path / "o"),
                     "--voices", "espeak-ng:en-us,flite:slt", "--holdout-voices", "flite:slt", "--train-limit", "2"])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train: 2 utterances, 2 sentences, 1 voices")
    assert out[1].startswith("eval: 2 utterances, 1 sentences, 2 voices")


def test_length_mix_spans_and_joins_sentences_once():
    sents = [" ".join(f"W{i}X{j}" for j in range(8)) for i in range(200)]  # 200 sentences of 8 distinct words
    import random

    out = synth.mix_lengths(sents, random.Random(0), short_fraction=0.3, long_fraction=0.2, long_words=(20, 30))
    lengths = [len(t.split()) for t in out]
    short, long_ = [n for n in lengths if n <= 4], [n for n in lengths if n > 8]
    assert short and long_ and all(1 <= n <= 4 for n in short) and all(20 <= n <= 32 for n in long_)
    assert 0.2 < len(short) / len(out) < 0.4 and 0.1 < len(long_) / len(out) < 0.3
    words = [w for t in out for w in t.split()]
    assert len(words) == len(set(words))  # no sentence used twice
    for t in out:  # a span is contiguous words of one sentence; a join is whole consecutive sentences
        ws = t.split()
        if len(ws) <= 4:
            i = ws[0].split("X")[0]
            assert " ".join(ws) in sents[int(i[1:])]
        elif len(ws) > 8:
            assert len(ws) % 8 == 0 and t == " ".join(sents[int(ws[0].split("X")[0][1:]):][:len(ws) // 8])
    assert synth.mix_lengths(sents, random.Random(0), 0.0, 0.0) == sents
    with pytest.raises(ValueError, match=r"short_fraction \+ long_fraction must be at most 1"):
        SynthSettings(train_text=list(synth.DEFAULT_TRAIN_TEXT), short_fraction=0.6, long_fraction=0.6)


def test_length_mix_changes_training_only_and_old_builds_stay_reusable(tmp_path, monkeypatch):
    text, ev = tmp_path / "t.txt", tmp_path / "e.txt"
    text.write_text("\n".join(SENTENCES))
    ev.write_text("THE END OF IT ALL\n")
    kw = dict(train_text=[text], eval_text=[ev], train_voices=["espeak-ng:en-us"], eval_voices=["espeak-ng:en-us"],
              progress=False)
    plain = build_synthetic(out_dir=tmp_path / "a", **kw)
    mixed = build_synthetic(out_dir=tmp_path / "b", short_fraction=1.0, **kw)
    assert all(1 <= len(r["text"].split()) <= 4 for r in rows(mixed["train"]))
    assert [r["seconds"] < 2.0 for r in rows(mixed["train"])] == [True] * 3
    assert mixed["eval"].read_text() == plain["eval"].read_text()  # the eval split is never cut
    # a synth.json written before the length settings existed is reused as is
    meta = json.loads(plain["meta"].read_text())
    for key in ("short_fraction", "long_fraction"):
        del meta["settings"][key]
    plain["meta"].write_text(json.dumps(meta))
    monkeypatch.setattr(synth, "synthesize", lambda *a, **k: pytest.fail("rebuilt an equivalent old build"))
    build_synthetic(out_dir=tmp_path / "a", **kw)


def test_piper_voice(tmp_path):
    """Piper's packaged neural voice voices text at 16 kHz; unknown voices name what exists."""
    # no importorskip: the voices extra is a test dependency (launch.sh test installs it), so a missing
    # package fails here instead of hiding a broken voice
    v = Voice.parse("piper:en_US-joe-medium")
    assert v == Voice("piper", "en_US-joe-medium")
    text = "to hear the next message press six, to repeat this message press five"
    seconds = synth.synthesize(v, text, tmp_path / "p.wav", speed=1.25)
    info = sf.info(str(tmp_path / "p.wav"))
    assert (info.samplerate, info.subtype) == (16000, "PCM_16") and 1.0 < seconds == pytest.approx(info.duration)
    # speed 0.8 stretches phonemes by 1.56 (Piper draws phoneme widths at random: a margin for that)
    assert synth.synthesize(v, text, tmp_path / "q.wav", speed=0.8) > seconds * 1.25
    with pytest.raises(ValueError, match=r"voice piper:nobody: not a packaged Piper voice \(\['en_US-joe-medium'\]\)"):
        synth.check_voices([Voice.parse("piper:nobody")])


def test_kokoro_voice(tmp_path):
    """Kokoro's neural voices voice text at 16 kHz, the same audio every time; speed slows it; names are checked."""
    v = Voice.parse("kokoro:bf_emma")
    assert v == Voice("kokoro", "bf_emma")
    synth.check_voices([v])  # the package and the model files; the sessions are the builder threads' own
    assert getattr(synth._kokoro_local, "kokoro", None) is None
    text = "to hear the next message press six, to repeat this message press five"
    seconds = synth.synthesize(v, text, tmp_path / "k.wav")
    info = sf.info(str(tmp_path / "k.wav"))
    assert (info.samplerate, info.subtype) == (16000, "PCM_16") and 2.0 < seconds == pytest.approx(info.duration)
    assert synth.synthesize(v, text, tmp_path / "k2.wav") == seconds
    assert (tmp_path / "k.wav").read_bytes() == (tmp_path / "k2.wav").read_bytes()
    assert synth.synthesize(v, text, tmp_path / "slow.wav", speed=0.8) > seconds * 1.15
    with pytest.raises(ValueError, match=r"voice 'kokoro:bf_nobody': Kokoro's English voices are af_alloy, "):
        Voice.parse("kokoro:bf_nobody")


def test_kokoro_model_that_fails_its_checksum_is_not_kept(tmp_path, monkeypatch):
    """The model joined from its PyPI parts is checked before it is named as complete."""
    monkeypatch.setattr(synth, "KOKORO_MODEL_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="has sha256 6e742170"):
        synth.kokoro_assets(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_length_mix_puts_whole_sentences_first():
    """Calibration reads the first training items: they are whole sentences, the spans and joins follow."""
    sents = [" ".join(f"W{i}X{j}" for j in range(8)) for i in range(100)]
    plan = synth.plan_split("train", sents, [Voice("espeak-ng", "en-us")], 1, 0, 30, short_fraction=0.3,
                            long_fraction=0.2)
    is_whole = [u.text.upper() in sents for u in plan]
    assert len(plan) == 30 and 0 < is_whole.count(False) < 30
    assert is_whole == sorted(is_whole, reverse=True)
