"""Explicit attention and the model format, against stock HF Whisper on a tiny random model."""

import copy
import json

import pytest
import torch
from transformers import GenerationConfig, WhisperForConditionalGeneration

from slim.attention import MatMul, SlimAttention
from slim.model import (STRUCTURE_FILE, Structure, build_model, install_explicit_attention, load_model,
                        save_model, structure_of)
from slim.sources import tiny_random_whisper


def _gen_config(model):
    return GenerationConfig(decoder_start_token_id=model.config.decoder_start_token_id,
                            eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
                            max_length=24, do_sample=False)


@pytest.fixture(scope="module")
def stock():
    return tiny_random_whisper(seed=0).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 80, 3000, generator=g)
    dec = torch.randint(0, 50000, (2, 12), generator=g)
    return feats, dec


def test_explicit_attention_matches_stock_sdpa(stock, inputs):
    feats, dec = inputs
    assert stock.config._attn_implementation == "sdpa"
    ours = install_explicit_attention(copy.deepcopy(stock)).eval()
    assert all(isinstance(m, SlimAttention) for m in [ours.model.encoder.layers[0].self_attn,
                                                        ours.model.decoder.layers[1].encoder_attn])
    assert sum(isinstance(m, MatMul) for m in ours.modules()) == 2 * 3 * 2  # 2 per attention, 6 attentions
    with torch.no_grad():
        a = stock(input_features=feats, decoder_input_ids=dec).logits
        b = ours(input_features=feats, decoder_input_ids=dec).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_explicit_attention_gradients_match_stock(stock, inputs):
    feats, dec = inputs
    ref = copy.deepcopy(stock).train()
    ours = install_explicit_attention(copy.deepcopy(stock)).train()
    labels = dec.clone()
    ref(input_features=feats, labels=labels).loss.backward()
    ours(input_features=feats, labels=labels).loss.backward()
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_generate_identical_to_stock_with_and_without_cache(stock, inputs):
    feats, _ = inputs
    ours = install_explicit_attention(copy.deepcopy(stock)).eval()
    gc = _gen_config(stock)
    with torch.no_grad():
        ref = stock.generate(feats, generation_config=gc)
        cached = ours.generate(feats, generation_config=gc)
        gc.use_cache = False
        uncached = ours.generate(feats, generation_config=gc)
    assert ref.shape[1] == gc.max_length  # random weights run to max_length: every step compared
    assert torch.equal(ref, cached)
    assert torch.equal(cached, uncached)


def _uneven(config) -> Structure:
    s = Structure.dense(config)
    s.encoder_heads, s.decoder_heads, s.cross_heads = [3, 1], [2, 4], [1, 0]
    s.encoder_ffn, s.decoder_ffn = [64, 100], [7, 128]
    return s


def test_uneven_structure_saves_and_loads_bit_exactly(stock, inputs, tmp_path):
    feats, dec = inputs
    torch.manual_seed(3)
    model = build_model(stock.config, _uneven(stock.config)).eval()
    model.generation_config = _gen_config(stock)
    assert structure_of(model) == _uneven(stock.config)
    out = save_model(model, tmp_path / "pruned")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", STRUCTURE_FILE])
    assert json.loads((out / STRUCTURE_FILE).read_text())["encoder_heads"] == [3, 1]
    loaded = load_model(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_features=feats, decoder_input_ids=dec).logits,
                           loaded(input_features=feats, decoder_input_ids=dec).logits)
        gc = _gen_config(stock)
        cached = loaded.generate(feats, generation_config=gc)
        gc.use_cache = False
        assert torch.equal(cached, loaded.generate(feats, generation_config=gc))


def test_dense_model_saves_as_stock_hf_directory(stock, inputs, tmp_path):
    feats, dec = inputs
    ours = install_explicit_attention(copy.deepcopy(stock)).eval()
    out = save_model(ours, tmp_path / "dense")
    assert not (out / STRUCTURE_FILE).exists()
    reloaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        a = stock(input_features=feats, decoder_input_ids=dec).logits
        b = reloaded(input_features=feats, decoder_input_ids=dec).logits
    assert torch.equal(a, b)


def test_save_is_atomic_and_replaces_previous(stock, tmp_path, monkeypatch):
    model = build_model(stock.config, _uneven(stock.config))
    out = save_model(model, tmp_path / "m")
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("slim.model.st_save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_bad_structure_is_rejected(stock, tmp_path):
    s = Structure.dense(stock.config)
    s.encoder_heads = [4]
    with pytest.raises(ValueError, match="encoder_heads has 1 entries"):
        build_model(stock.config, s)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_encoder_positions_stay_a_fixed_table(stock, tmp_path):
    """The sinusoidal encoder table is not trained, whichever way the model came in (built, loaded)."""
    built = build_model(stock.config, Structure(head_dim=16, encoder_heads=[3, 2], decoder_heads=[4, 4],
                                                cross_heads=[4, 1], encoder_ffn=[96, 64], decoder_ffn=[128, 32]))
    save_model(install_explicit_attention(copy.deepcopy(stock)), tmp_path / "dense")
    for m in (built, install_explicit_attention(copy.deepcopy(stock)), load_model(tmp_path / "dense")):
        assert not m.model.encoder.embed_positions.weight.requires_grad
        assert m.model.decoder.embed_positions.weight.requires_grad  # the decoder's are learned
