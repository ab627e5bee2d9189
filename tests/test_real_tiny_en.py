"""Explicit attention on real tiny.en: same logits and the same greedy transcripts as stock HF (SDPA)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from slim.audio import load_audio
from slim.model import install_explicit_attention
from slim.sources import load_source

REAL = Path(__file__).resolve().parents[1] / "data" / "real-speech"
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real():
    stock, processor = load_source("tiny.en")
    rows = [json.loads(l) for l in (REAL / "manifest.jsonl").read_text().splitlines() if l.strip()]
    audio = [load_audio(REAL / r["audio"]) for r in rows]
    feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    return stock.eval(), processor, feats


def test_teacher_forced_logits_match_stock(real):
    stock, processor, feats = real
    ours = install_explicit_attention(copy.deepcopy(stock)).eval()
    dec = processor.tokenizer(["the child almost hurt the small dog"] * 3, return_tensors="pt").input_ids
    with torch.no_grad():
        a = stock(input_features=feats[:3], decoder_input_ids=dec).logits
        b = ours(input_features=feats[:3], decoder_input_ids=dec).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_greedy_transcripts_identical_on_all_real_clips(real):
    stock, processor, feats = real
    assert feats.shape[0] == 11
    ours = install_explicit_attention(copy.deepcopy(stock)).eval()
    with torch.no_grad():
        ref = stock.generate(feats)
        cached = ours.generate(feats)
        uncached = ours.generate(feats, use_cache=False)
    assert torch.equal(ref, cached)
    assert torch.equal(cached, uncached)
    texts = processor.batch_decode(cached, skip_special_tokens=True)
    assert texts[0].strip().lower().startswith("the child almost hurt the small dog")


def test_silence_window_transcribes_the_real_clips_as_30_s(real):
    """An unchanged tiny.en on silence windows (ceil(duration) + 0.5 s, the rest read from a silent input)
    writes the 30 s model's transcript of every real clip, its layers running on under a fifth of the frames."""
    from eval.engines import TorchEngine
    from slim.model import set_audio_window
    from slim.window import SILENCE_LEVELS, SILENCE_WINDOW

    stock, processor, _ = real
    ours = install_explicit_attention(copy.deepcopy(stock)).eval()
    rows = [json.loads(l) for l in (REAL / "manifest.jsonl").read_text().splitlines() if l.strip()]
    audio = [load_audio(REAL / r["audio"]) for r in rows]
    full = TorchEngine(ours, processor).transcribe(audio)
    set_audio_window(ours, SILENCE_WINDOW)
    with torch.inference_mode():  # the silent inputs first (as the engine runs: in inference mode)
        for level in SILENCE_LEVELS:
            ours.model.encoder.silence_states(level, torch.float32, torch.device("cpu"))
    frames = []
    ours.model.encoder.layers[0].register_forward_pre_hook(lambda mod, args: frames.append(args[0].shape[1]))
    assert TorchEngine(ours, processor).transcribe(audio) == full
    assert len(frames) == len(audio) and max(frames) <= 480  # the clips' windows (1.8-7.7 s), one call each
    assert sum(frames) < len(audio) * 1500 / 5
