"""Convert to real INT8 PyTorch modules: matches fake quant, saves/loads through the model format."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qat.convert import (Int8Conv1d, Int8Embedding, Int8Linear, QDQMatMul, TiedInt8Logits, convert_to_int8,
                         load_int8_model, save_int8_model)
from qat.prepare import (QATConv1d, QATLinear, QuantConfig, calibrate, conv_windows, freeze_observers, prepare_qat,
                         ptq, set_fake_quant, window_weight)
from qat.quantizers import activation_quantizer, weight_quantizer
from slim.model import Structure, build_model, install_explicit_attention, save_model
from slim.sources import tiny_random_whisper

FRAMES = 300  # 150 encoder positions: same code paths as 1500, 10x less work


def _batches(n=1, B=2, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_features": torch.randn(B, 80, FRAMES, generator=g),
             "labels": torch.randint(0, 50000, (B, T), generator=g)} for _ in range(n)]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_features=batch["input_features"], labels=batch["labels"]).logits


def _greedy(model, feats, n=12):
    with torch.no_grad():
        return model.generate(feats, max_new_tokens=n, do_sample=False, num_beams=1)


@pytest.fixture(scope="module")
def fq():
    float_model = install_explicit_attention(tiny_random_whisper(seed=0, max_source_positions=FRAMES // 2).eval())
    return ptq(float_model, QuantConfig(embeddings=True), _batches(2))


@pytest.fixture(scope="module")
def int8(fq):
    return convert_to_int8(fq)


def test_int8_linear_matches_fake_quant_linear():
    torch.manual_seed(0)
    lin = nn.Linear(96, 200)
    q = QATLinear.from_linear(lin, weight_quantizer(200), activation_quantizer())
    x = torch.randn(3, 50, 96) * 2
    q.train()(x)
    q.eval().input_quant.freeze()
    with torch.no_grad():
        ref = q(x)
        exact = Int8Linear.from_qat(q)(x)
        loose = Int8Linear.from_qat(q, exact=False)(x)
    assert exact.shape == ref.shape == (3, 50, 200)
    # same integer codes; only fp32 vs int32 accumulation and the order of the scale products differ
    assert float((exact - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # the kernel's own input rounding (x * 1/scale) moves a few codes by one step: still close, not exact
    assert float((loose - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    m = Int8Linear.from_qat(q)
    assert m.weight_int8.dtype == torch.int8 and int(m.weight_int8.abs().max()) == 127
    assert torch.equal(m.weight_scale, q.weight_quant.scale) and m.input_zero_point.dtype == torch.int32


def test_int8_linear_without_vnni_runs_the_codes_in_float_and_matches_fake_quant(monkeypatch):
    """Without VNNI fbgemm's u8 x s8 kernel sums pairs of products in 16 bits and can saturate; the module then
    multiplies the same integer codes in float, so it keeps fake quant's numbers on any x86 CPU."""
    import qat.convert

    monkeypatch.setattr(qat.convert, "int8_kernels_exact", lambda: False)
    torch.manual_seed(0)
    q = QATLinear.from_linear(nn.Linear(96, 200), weight_quantizer(200), activation_quantizer())
    x = torch.randn(3, 50, 96) * 2
    q.train()(x)
    q.eval().input_quant.freeze()
    with torch.no_grad():
        ref = q(x)
        m = Int8Linear.from_qat(q)
        y = m(x)
    assert m._packed is None  # the fbgemm kernel was not used
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_convert_matches_fake_quant(fq, int8):
    """Tolerance: the int8 kernels see exactly fake quant's integer codes (inputs are put on the grid first),
    so logits differ only by fp32-vs-int32 accumulation order, ~1e-6 relative per layer; 1e-3 absolute
    on logits of magnitude ~1 leaves room for that to compound over 4 layers, and greedy tokens must agree."""
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 32
    assert sum(isinstance(m, QDQMatMul) for m in int8.modules()) == 12
    assert isinstance(int8.model.decoder.embed_tokens, Int8Embedding) and isinstance(int8.proj_out, TiedInt8Logits)
    assert not any(isinstance(m, QATLinear) for m in int8.modules())
    assert any(isinstance(m, QATLinear) for m in fq.modules())  # convert copies unless inplace=True
    b = _batches(1, seed=5)[0]
    a, c = _logits(fq, b), _logits(int8, b)
    assert float((a - c).abs().max()) < 1e-3, float((a - c).abs().max())
    assert torch.equal(_greedy(fq, b["input_features"]), _greedy(int8, b["input_features"]))
    # the fbgemm engine runs the same kernel family: same numbers
    fb = convert_to_int8(fq, engine="fbgemm")
    assert float((_logits(fb, b) - c).abs().max()) < 1e-5


def test_save_and_load_int8_model(fq, int8, tmp_path):
    out = save_int8_model(int8, tmp_path / "int8")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "slim_structure.json"]
    quant = json.loads((out / "slim_structure.json").read_text())["quant"]
    assert quant["converted"] is True and quant["embeddings"] is True
    assert (quant["engine"], quant["exact"], quant["matmuls"]) == ("x86", True, "qdq")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.encoder.layers.0.fc1.weight_int8").dtype == torch.int8
        assert f.get_tensor("model.encoder.layers.0.fc1.input_zero_point").dtype == torch.int32
        assert f.get_tensor("model.decoder.embed_tokens.weight_int8").shape == (51864, 64)
    assert not any(k.startswith("proj_out") for k in keys)  # the int8 table is stored once
    assert not any(k.endswith(".weight") and "layers" in k and ("proj" in k or "fc" in k) for k in keys)
    # int8 weights + int8 embedding: well under a third of the fake-quant (fp32) file
    save_model(fq, tmp_path / "fq", quant=fq.slim_quant_config.to_dict())
    assert (out / "model.safetensors").stat().st_size < 0.34 * (tmp_path / "fq" / "model.safetensors").stat().st_size

    loaded = load_int8_model(out)
    b = _batches(1, seed=6)[0]
    assert torch.equal(_logits(loaded, b), _logits(int8, b))
    sd, sd2 = int8.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(ValueError, match="not a converted INT8 model"):
        load_int8_model(tmp_path / "fq")


def test_per_row_inputs_convert_to_the_fake_quant_arithmetic_and_round_trip(tmp_path):
    float_model = install_explicit_attention(tiny_random_whisper(seed=0, max_source_positions=FRAMES // 2).eval())
    fq = ptq(float_model, QuantConfig(embeddings=True, dynamic=["model.encoder.*", "*.fc2"]), _batches(1))
    int8 = convert_to_int8(fq)
    enc_fc1, dec_fc1 = int8.model.encoder.layers[0].fc1, int8.model.decoder.layers[0].fc1
    assert isinstance(enc_fc1, Int8Linear) and enc_fc1.per_row and not dec_fc1.per_row
    assert int8.model.decoder.layers[1].fc2.per_row
    b = _batches(1, seed=5)[0]
    # per-row layers compute exactly what fake quant does (same codes, same float products); the static
    # ones go through the int8 kernel (accumulation order only)
    assert float((_logits(fq, b) - _logits(int8, b)).abs().max()) < 1e-3
    x = torch.randn(2, 7, enc_fc1.in_features) * 3
    with torch.no_grad():
        assert torch.equal(enc_fc1(x), fq.model.encoder.layers[0].fc1(x))
    loaded = load_int8_model(save_int8_model(int8, tmp_path / "int8"))
    assert loaded.model.encoder.layers[0].fc1.per_row and not loaded.model.decoder.layers[0].fc1.per_row
    assert torch.equal(_logits(loaded, b), _logits(int8, b))


def test_outlier_channels_convert_to_the_fake_quant_arithmetic_and_round_trip(tmp_path):
    float_model = install_explicit_attention(tiny_random_whisper(seed=0, max_source_positions=FRAMES // 2).eval())
    cfg = QuantConfig(embeddings=True, outlier_channels=4, outlier_linears=["model.encoder.layers.*.fc2"])
    fq = ptq(float_model, cfg, _batches(1))
    int8 = convert_to_int8(fq)
    fc2, qfc2 = int8.model.encoder.layers[0].fc2, fq.model.encoder.layers[0].fc2
    assert isinstance(fc2, Int8Linear) and torch.equal(fc2.float_channels, qfc2.float_channels)
    assert not fc2.weight_int8[:, fc2.float_channels].any()
    assert int8.model.decoder.layers[0].fc2.float_channels is None
    # the layer: the int8 kernel over the other channels plus the float ones, as fake quant computes it
    x = torch.randn(2, 7, fc2.in_features)
    x[..., qfc2.float_channels] *= 40  # outliers far off the grid: they must not leak into the int8 product
    with torch.no_grad():
        assert torch.allclose(fc2(x), qfc2(x), atol=1e-4)
    b = _batches(1, seed=5)[0]
    assert float((_logits(fq, b) - _logits(int8, b)).abs().max()) < 1e-3
    loaded = load_int8_model(save_int8_model(int8, tmp_path / "int8"))
    assert torch.equal(loaded.model.encoder.layers[0].fc2.float_channels, fc2.float_channels)
    assert torch.equal(_logits(loaded, b), _logits(int8, b))


def test_per_row_attention_probabilities_convert_exactly_and_round_trip(tmp_path):
    float_model = install_explicit_attention(tiny_random_whisper(seed=0, max_source_positions=FRAMES // 2).eval())
    fq = ptq(float_model, QuantConfig(embeddings=True, row_matmuls=["*.pv"]), _batches(2))
    int8 = convert_to_int8(fq)
    pv, qk = int8.model.encoder.layers[0].self_attn.pv, int8.model.encoder.layers[0].self_attn.qk
    assert isinstance(pv, QDQMatMul) and pv.a_per_row and not qk.a_per_row
    a, v = torch.softmax(torch.randn(2, 4, 9, 9) * 3, -1), torch.randn(2, 4, 9, 16)
    with torch.no_grad():
        assert torch.equal(pv(a, v), fq.model.encoder.layers[0].self_attn.pv(a, v))
    b = _batches(1, seed=5)[0]
    assert float((_logits(fq, b) - _logits(int8, b)).abs().max()) < 1e-3
    loaded = load_int8_model(save_int8_model(int8, tmp_path / "int8"))
    assert loaded.model.encoder.layers[0].self_attn.pv.a_per_row
    assert torch.equal(_logits(loaded, b), _logits(int8, b))


def test_float_embeddings_stay_tied_and_speed_options(tmp_path):
    m = install_explicit_attention(tiny_random_whisper(seed=1, max_source_positions=FRAMES // 2).eval())
    fq = ptq(m, QuantConfig(exclude=["*.fc2"]), _batches(1))
    int8 = convert_to_int8(fq, exact=False, matmuls="float")
    assert not any(isinstance(x, QDQMatMul) for x in int8.modules())
    assert all(not x.exact for x in int8.modules() if isinstance(x, Int8Linear))
    assert type(int8.model.encoder.layers[0].fc2) is nn.Linear  # excluded: float, same Parameters as before
    assert int8.proj_out.weight is int8.model.decoder.embed_tokens.weight
    loaded = load_int8_model(save_int8_model(int8, tmp_path / "i8"))
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight
    assert not any(isinstance(x, QDQMatMul) for x in loaded.modules())
    assert all(not x.exact for x in loaded.modules() if isinstance(x, Int8Linear))
    b = _batches(1, seed=2)[0]
    assert torch.equal(_logits(loaded, b), _logits(int8, b))
    # without the matmul Q/DQ the INT8 model is no longer fake quant's twin, but still near it
    diff = float((_logits(fq, b) - _logits(int8, b)).abs().max())
    assert 1e-4 < diff < 0.1 * float(_logits(fq, b).abs().max())


def test_pruned_uneven_heads_convert(tmp_path):
    config = tiny_random_whisper(max_source_positions=FRAMES // 2).config
    s = Structure(head_dim=16, encoder_heads=[3, 0], decoder_heads=[1, 4], cross_heads=[0, 2],
                  encoder_ffn=[64, 128], decoder_ffn=[32, 0])
    torch.manual_seed(0)
    fq = ptq(build_model(config, s).eval(), QuantConfig(), _batches(1))
    int8 = convert_to_int8(fq)
    b = _batches(1, seed=8)[0]
    assert float((_logits(fq, b) - _logits(int8, b)).abs().max()) < 1e-3
    loaded = load_int8_model(save_int8_model(int8, tmp_path / "p"))
    assert loaded.model.encoder.layers[1].self_attn.num_heads == 0
    assert torch.equal(_logits(loaded, b), _logits(int8, b))


def test_convert_errors(fq):
    with pytest.raises(ValueError, match="qnnpack has no fp32-output"):
        convert_to_int8(fq, engine="qnnpack")
    float_model = install_explicit_attention(tiny_random_whisper(max_source_positions=FRAMES // 2).eval())
    with pytest.raises(ValueError, match="not prepared"):
        convert_to_int8(float_model)
    fresh = prepare_qat(copy.deepcopy(float_model), QuantConfig())
    with pytest.raises(ValueError, match="never calibrated"):
        convert_to_int8(fresh)
    calibrate(fresh, _batches(1))
    fresh.model.encoder.layers[0].fc1.weight_quant.enable(False)
    with pytest.raises(ValueError, match="model.encoder.layers.0.fc1: input and weight quantizers"):
        convert_to_int8(fresh)


@pytest.mark.parametrize("channels,kernel,stride,padding,frames",
                         [(80, 3, 1, 1, 50), (16, 3, 2, 1, 50), (16, 3, 2, 1, 51), (8, 5, 3, 2, 40), (8, 1, 1, 0, 9)])
def test_conv_windows_times_window_weight_is_conv1d(channels, kernel, stride, padding, frames):
    """Whisper's two convs (kernel 3, stride 1 and 2) and other shapes: the window matrix product is the conv."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, channels, frames, generator=g), torch.randn(6, channels, kernel, generator=g)
    ref = torch.nn.functional.conv1d(x, w, None, stride, padding)
    got = conv_windows(x.transpose(1, 2), kernel, stride, padding, 0.0) @ window_weight(w).t()
    assert got.shape == ref.transpose(1, 2).shape
    assert torch.allclose(got, ref.transpose(1, 2), atol=1e-5)
    # on uint8 codes with the zero point as the fill: the windows of the codes are the codes of the windows
    q = torch.randint(0, 256, (2, frames, channels), generator=g, dtype=torch.uint8)
    windows = conv_windows(q, kernel, stride, padding, 7)
    assert windows.dtype == torch.uint8
    assert torch.equal(windows.float() - 7, conv_windows(q.float() - 7, kernel, stride, padding, 0.0))


def test_conv_front_end_quantizes_converts_and_round_trips(tmp_path):
    """quant.conv: both convs fake-quantized on the same Parameters (bit-exact float with quantizers off),
    converted to `Int8Conv1d` (the Linear kernel over the windows) that matches fake quant, saved and reloaded."""
    float_model = install_explicit_attention(tiny_random_whisper(seed=0, max_source_positions=FRAMES // 2).eval())
    fq = copy.deepcopy(float_model)
    weight = fq.model.encoder.conv2.weight
    prepare_qat(fq, QuantConfig(conv=True, embeddings=True))
    enc = fq.model.encoder
    assert isinstance(enc.conv1, QATConv1d) and isinstance(enc.conv2, QATConv1d)
    assert enc.conv2.weight is weight  # the same Parameter: optimizer state and checkpoints carry over
    x = torch.randn(2, enc.conv2.in_channels, FRAMES)
    set_fake_quant(fq, False)
    with torch.no_grad():
        assert torch.equal(enc.conv2(x), float_model.model.encoder.conv2(x))
    set_fake_quant(fq, True)
    calibrate(fq, _batches(2))
    freeze_observers(fq)
    int8 = convert_to_int8(fq)
    c1, c2 = int8.model.encoder.conv1, int8.model.encoder.conv2
    assert isinstance(c1, Int8Conv1d) and isinstance(c2, Int8Conv1d) and c2.stride == (2,)
    assert c1.weight_int8.shape == (enc.conv1.out_channels, 3 * 80) and c1.weight_int8.dtype == torch.int8
    with torch.no_grad():
        ref, got = enc.conv2(x), c2(x)
    assert got.shape == ref.shape == (2, enc.conv2.out_channels, FRAMES // 2)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    b = _batches(1, seed=5)[0]
    assert float((_logits(fq, b) - _logits(int8, b)).abs().max()) < 1e-3
    assert torch.equal(_greedy(fq, b["input_features"]), _greedy(int8, b["input_features"]))
    loaded = load_int8_model(save_int8_model(int8, tmp_path / "int8"))
    assert isinstance(loaded.model.encoder.conv2, Int8Conv1d)
    assert torch.equal(_logits(loaded, b), _logits(int8, b))
    # include/exclude apply to the convs as to any module; without quant.conv they stay plain convs
    part = prepare_qat(copy.deepcopy(float_model), QuantConfig(conv=True, exclude=["model.encoder.conv1"]))
    assert type(part.model.encoder.conv1) is nn.Conv1d and isinstance(part.model.encoder.conv2, QATConv1d)
    assert type(prepare_qat(copy.deepcopy(float_model), QuantConfig()).model.encoder.conv1) is nn.Conv1d
    with pytest.raises(ValueError, match="quant.conv must be true or false"):
        QuantConfig(conv="yes")
