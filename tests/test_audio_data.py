"""slim.audio and slim.data: decoding, the three source kinds, skip counting, features and collation."""

import json
import logging
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from slim.audio import MAX_SECONDS, SAMPLING_RATE, AudioError, decode_audio, load_audio  # noqa: E402
from slim.data import (HFSpec, SkipStats, SpeechDataset, iter_examples, load_examples, make_collator,  # noqa: E402
                       open_eval_source)


def tone(seconds: float, rate: int = SAMPLING_RATE, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path, audio, rate=SAMPLING_RATE, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, **kw)
    return path


def write_manifest(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# audio


def test_load_audio_resamples_22k_stereo_to_16k_mono(tmp_path):
    left, right = tone(1.0, 22050, amp=0.6), tone(1.0, 22050, amp=0.2)
    path = write(tmp_path / "s.wav", np.stack([left, right], axis=1), 22050, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == SAMPLING_RATE  # 1 s
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * SAMPLING_RATE / len(audio) == pytest.approx(440, abs=1)
    # channels averaged: amplitude (0.6 + 0.2) / 2, away from the resampler's edge transients
    assert np.abs(audio[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_load_audio_reads_flac_and_ogg(tmp_path, fmt):
    path = write(tmp_path / f"a.{fmt}", tone(0.5, 16000), 16000)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and abs(len(audio) - 8000) <= 1 and np.abs(audio).max() > 0.4


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: no such file"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError, match="bad.wav: not readable as audio") as e:
        load_audio(bad)
    assert e.value.path == str(bad)
    with pytest.raises(AudioError, match="row-3: not readable"):
        decode_audio(b"not audio", "row-3")


# ---------------------------------------------------------------------------------------------
# sources


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    write(tmp_path / "audio" / "a.wav", tone(1.0))
    write(tmp_path / "data" / "wav" / "b.wav", tone(2.0, 8000), 8000)
    m = write_manifest(tmp_path / "data" / "m.jsonl", [
        {"audio": "wav/b.wav", "text": "  second clip "},
        {"audio": "../audio/a.wav", "text": "FIRST", "id": "utt-a", "speaker": 3},
    ])
    examples, stats = load_examples(m)
    assert stats.total == 0
    assert [(e["id"], e["text"], len(e["audio"])) for e in examples] == [
        ("wav/b.wav", "second clip", 32000), ("utt-a", "FIRST", 16000)]


def test_manifest_skips_are_counted_not_fatal(tmp_path, caplog):
    """The acceptance case: a missing file, a corrupt wav, an empty transcript and a 40 s file."""
    write(tmp_path / "good.wav", tone(1.0))
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    write(tmp_path / "empty_text.wav", tone(1.0))
    write(tmp_path / "long.wav", tone(40.0))
    m = write_manifest(tmp_path / "manifest.jsonl", [
        {"audio": "good.wav", "text": "fine"},
        {"audio": "missing.wav", "text": "gone"},
        {"audio": "corrupt.wav", "text": "broken"},
        {"audio": "empty_text.wav", "text": "   "},
        {"audio": "long.wav", "text": "too long"},
    ])
    with caplog.at_level(logging.WARNING, logger="slim.data"):
        examples, stats = load_examples(m)
    assert [e["id"] for e in examples] == ["good.wav"]
    assert stats.total == 4
    assert stats.as_dict() == {"missing": 1, "unreadable": 1, "too_long": 1, "empty_text": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert any("long.wav: too_long (40.0 s > 30 s)" in w for w in warnings)
    # the lazy eval view counts the same, and knows the item count up front
    items, stats2, total = open_eval_source(m)
    assert total == 5 and stats2.total == 0
    assert len(list(items)) == 1 and stats2.as_dict() == stats.as_dict()


def test_silent_empty_and_token_limits(tmp_path):
    write(tmp_path / "silent.wav", np.zeros(16000, np.float32))
    write(tmp_path / "empty.wav", np.zeros(0, np.float32))
    write(tmp_path / "ok.wav", tone(1.0))
    (tmp_path / "junk.txt").write_text("{not json\n")
    m = write_manifest(tmp_path / "m.jsonl", [
        {"audio": "silent.wav", "text": "shh"},
        {"audio": "empty.wav", "text": "nothing"},
        {"audio": "ok.wav", "text": "one two three four five six"},  # 6 "tokens" > 5
        {"audio": "ok.wav", "text": "one two"},
        {"text": "no audio key"},
    ])
    whitespace_tokenizer = lambda text: SimpleNamespace(input_ids=text.split())  # noqa: E731
    examples, stats = load_examples(m, tokenizer=whitespace_tokenizer, max_label_length=5)
    assert [e["text"] for e in examples] == ["one two"]
    assert stats.as_dict() == {"bad_entry": 1, "empty_audio": 1, "silent": 1, "text_too_long": 1}
    assert str(stats) == "4 skipped {'bad_entry': 1, 'empty_audio': 1, 'silent': 1, 'text_too_long': 1}"


def test_limit_counts_good_examples(tmp_path):
    write(tmp_path / "a.wav", tone(0.5))
    rows = [{"audio": "missing.wav", "text": "x"}]
    rows += [{"audio": "a.wav", "text": f"t{i}", "id": str(i)} for i in range(5)]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    stats = SkipStats()
    assert [e["id"] for e in iter_examples(m, stats, limit=2)] == ["0", "1"]
    assert stats.total == 1
    _, _, total = open_eval_source(m, limit=3)
    assert total == 3


@pytest.mark.parametrize("meta", ["csv", "jsonl"])
def test_audio_folder_layout(tmp_path, meta):
    write(tmp_path / "clips" / "a.wav", tone(1.0))
    write(tmp_path / "clips" / "b.flac", tone(0.5, 22050), 22050)
    if meta == "csv":
        (tmp_path / "metadata.csv").write_text(
            "file_name,transcription\nclips/a.wav,alpha\nclips/b.flac,\"beta, gamma\"\n")
    else:
        write_manifest(tmp_path / "metadata.jsonl", [{"file_name": "clips/a.wav", "text": "alpha"},
                                                     {"file_name": "clips/b.flac", "text": "beta, gamma"}])
    examples, stats = load_examples(tmp_path)
    assert [(e["id"], e["text"], len(e["audio"])) for e in examples] == [
        ("clips/a.wav", "alpha", 16000), ("clips/b.flac", "beta, gamma", 8000)]
    # the same folder named through a datasets spec goes through the same reader
    assert len(load_examples(f"hf:audiofolder?data_dir={tmp_path}&split=train")[0]) == 2


def test_folder_without_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl, metadata.jsonl or metadata.csv"):
        load_examples(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl: no such manifest or audio folder"):
        load_examples(tmp_path / "nowhere.jsonl")


def test_hf_spec_parsing():
    s = HFSpec.parse("hf:librispeech_asr/clean/validation")
    assert (s.path, s.name, s.split, s.streaming) == ("librispeech_asr", "clean", "validation", False)
    s = HFSpec.parse("hf:openslr/librispeech_asr/clean/test")
    assert (s.path, s.name, s.split) == ("openslr/librispeech_asr", "clean", "test")
    s = HFSpec.parse("hf:mozilla/cv?name=en&split=test&streaming=1&text_column=sentence")
    assert (s.path, s.name, s.split, s.streaming, s.text_column) == ("mozilla/cv", "en", "test", True, "sentence")
    s = HFSpec.parse({"path": "parquet", "data_files": "x.parquet", "split": "train"})
    assert (s.path, s.data_files, s.split) == ("parquet", "x.parquet", "train")
    with pytest.raises(ValueError, match="unknown key"):
        HFSpec.parse({"path": "x", "splt": "train"})
    with pytest.raises(ValueError, match="hf:PATH/SPLIT"):
        HFSpec.parse("hf:justaname")


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_spec_through_load_dataset(tmp_path, streaming):
    """A local parquet file (audio stored as bytes, as hub datasets are) through the real load_dataset path."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def wav_bytes(audio, rate):
        b = io.BytesIO()
        sf.write(b, audio, rate, format="WAV")
        return b.getvalue()

    table = pa.table({
        "audio": [{"bytes": wav_bytes(tone(1.0, 8000), 8000), "path": "x0.wav"},
                  {"bytes": wav_bytes(tone(2.0, 48000), 48000), "path": "x1.wav"},
                  {"bytes": b"garbage", "path": "x2.wav"}],
        "sentence": ["first", "second", "third"],
        "id": ["u0", "u1", "u2"],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    spec = {"path": "parquet", "data_files": str(tmp_path / "d.parquet"), "split": "train",
            "streaming": streaming, "cache_dir": str(tmp_path / "cache")}
    items, stats, total = open_eval_source(spec)
    examples = list(items)
    assert total == (None if streaming else 3)
    assert [(e["id"], e["text"], len(e["audio"])) for e in examples] == [
        ("u0", "first", 16000), ("u1", "second", 32000)]
    assert stats.as_dict() == {"unreadable": 1}


# ---------------------------------------------------------------------------------------------
# training features and collation


@pytest.fixture(scope="module")
def processor():
    from slim.sources import tiny_random_processor

    return tiny_random_processor()


def test_dataset_features_labels_and_cache(processor):
    examples = [{"id": "a", "audio": tone(1.0), "text": "hello world"},
                {"id": "b", "audio": tone(3.0, freq=220), "text": "a longer sentence here"}]
    ds = SpeechDataset(examples, processor)
    item = ds[0]
    assert item["input_features"].shape == (80, 3000) and item["input_features"].dtype == torch.float32
    assert item["labels"].tolist() == [50257, 50362, 31373, 995, 50256]  # sot, notimestamps, hello, world, eot
    assert ds[0] is item  # computed once
    assert SpeechDataset(examples, processor, cache=False)[0] is not SpeechDataset(examples, processor, cache=False)[0]


def test_collator_pads_with_minus_100_and_drops_decoder_start(processor):
    collate = make_collator(processor)
    f = torch.zeros(80, 3000)
    batch = collate([{"input_features": f, "labels": torch.tensor([50257, 50362, 7, 8, 50256])},
                     {"input_features": f + 1, "labels": torch.tensor([50257, 50362, 9, 50256])}])
    assert batch["input_features"].shape == (2, 80, 3000)
    assert batch["input_features"][1].eq(1).all()
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [[50362, 7, 8, 50256], [50362, 9, 50256, -100]]
    # not every row starts with the decoder start token: nothing is dropped
    batch = collate([{"input_features": f, "labels": torch.tensor([50257, 5])},
                     {"input_features": f, "labels": torch.tensor([6])}])
    assert batch["labels"].tolist() == [[50257, 5], [6, -100]]
