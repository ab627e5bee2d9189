"""Fake quantization, observers, prepare/calibrate/freeze, state round trips, sensitivity, and the
seed problem (eager static quantization cannot reach SDPA's matmuls; ours quantizes them)."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qat.prepare import (QATEmbedding, QATLinear, QuantConfig, QuantMatMul, calibrate, export_quant_plan,
                         freeze_observers, load_quantized_model, maybe_freeze_observers, prepare_qat, ptq,
                         quant_state_summary, quantizers, round_float_weights_fp16, set_fake_quant)
from qat.quantizers import (FakeQuantizer, activation_quantizer, dequantize, fake_quant, quantize,
                            weight_quantizer)
from qat.sensitivity import GROUPS, most_sensitive, sensitivity_scan, to_markdown
from slim.attention import MatMul, SlimAttention
from slim.model import Structure, build_model, install_explicit_attention, save_model
from slim.sources import tiny_random_whisper

# 150 encoder positions (300 frames) instead of 1500: the same code paths, 10x less attention work
FRAMES = 300


def _tiny(seed=0):
    return tiny_random_whisper(seed=seed, max_source_positions=FRAMES // 2).eval()


def _batches(n=2, B=2, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_features": torch.randn(B, 80, FRAMES, generator=g),
             "labels": torch.randint(0, 50000, (B, T), generator=g)} for _ in range(n)]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_features=batch["input_features"], labels=batch["labels"]).logits


@pytest.fixture(scope="module")
def float_model():
    return install_explicit_attention(_tiny())


@pytest.fixture(scope="module")
def ptq_model(float_model):
    return ptq(copy.deepcopy(float_model), QuantConfig(embeddings=True), _batches())


# ---------------------------------------------------------------------------------------------
# tensors


def test_quantize_dequantize_error_within_half_a_step_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g) * torch.logspace(-3, 1, 16)[:, None]  # very different channel ranges
    q = weight_quantizer(16)
    q(w)
    scale, zp = q.qparams()
    assert torch.equal(zp, torch.zeros(16, dtype=torch.int32))
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127, rtol=0, atol=0)
    codes = quantize(w, scale, zp, -127, 127, axis=0)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    err = (dequantize(codes, scale, zp, axis=0) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert torch.equal(fake_quant(w, scale, zp, -127, 127, axis=0), dequantize(codes, scale, zp, axis=0))

    x = torch.randn(1000, generator=g) * 3 + 1
    a = activation_quantizer().train()
    a(x)
    s, z = a.qparams()
    assert 0 <= int(z) <= 255 and abs(float(s) - float(x.max() - torch.clamp(x.min(), max=0)) / 255) < 1e-7
    codes = quantize(x, s, z, 0, 255)
    assert codes.dtype == torch.uint8
    assert float((dequantize(codes, s, z) - x).abs().max()) <= float(s) / 2 * (1 + 1e-6)
    # exactly representable: zero (padding, post-ReLU zeros)
    assert float(fake_quant(torch.zeros(1), s, z, 0, 255)) == 0.0


def test_ste_gradient_and_lsq_scale_gradient():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 0.5, 2.0, 9.0], requires_grad=True)
    scale, zp = torch.tensor(0.1, requires_grad=True), torch.tensor(0, dtype=torch.int32)
    y = fake_quant(x, scale, zp, -20, 20)
    y.sum().backward()
    # straight through inside [-2.0, 2.0], zero where clipped
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ step-size gradient: round(x/s) - x/s inside, qmin/qmax outside
    xs = x.detach() / 0.1
    inside = (xs >= -20) & (xs <= 20)
    expected = torch.where(inside, torch.round(xs) - xs, torch.clamp(xs, -20, 20)).sum()
    assert abs(float(scale.grad) - float(expected)) < 1e-4

    q = FakeQuantizer(lsq=True).train()
    assert isinstance(q.scale, nn.Parameter)
    q(torch.randn(64) * 2)  # observing: initialises the scale
    q.freeze()
    s0 = q.scale.detach().clone()
    inp = torch.randn(64, requires_grad=True)
    q(inp).pow(2).sum().backward()
    assert q.scale.grad is not None and float(q.scale.grad.abs()) > 0
    assert inp.grad is not None and float(inp.grad.abs().sum()) > 0
    assert torch.equal(q.scale.detach(), s0)  # frozen: the optimizer, not the observer, moves it now


def test_observers_exact_values():
    b1, b2 = torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([-3.0, 0.0, 1.0])
    got = {}
    for kind in ("minmax", "moving_average", "percentile"):
        q = FakeQuantizer(observer=kind, momentum=0.5, percentile=100.0).train()
        q(b1), q(b2)
        got[kind] = (float(q.min_val), float(q.max_val), int(q.num_batches))
    assert got == {"minmax": (-3.0, 2.0, 2), "moving_average": (-2.0, 1.5, 2), "percentile": (-2.0, 1.5, 2)}

    q = FakeQuantizer(observer="percentile", percentile=99.0).train()
    q(torch.arange(1000, dtype=torch.float32))  # 1% of 1000 values cut: 10 on each side
    assert (float(q.min_val), float(q.max_val)) == (10.0, 989.0)

    # observe only in training mode and while observing
    q = FakeQuantizer().train()
    q(b1)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()(b2 * 10)
    q.train().freeze()(b2 * 10)
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items() if k != "observing")
    # disabled: the input tensor itself comes back
    q.enable(False)
    assert q(b2) is b2


def test_dynamic_quantizer_puts_each_row_on_its_own_grid():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 48, generator=g) * torch.logspace(-3, 2, 5)[None, :, None] + 0.5  # rows 1e5 apart
    q = activation_quantizer(observer="dynamic", lsq=True).train()  # no scale to learn: lsq is dropped
    y = q(x)
    assert q.calibrated and q.dynamic and not q.lsq and not isinstance(q.scale, nn.Parameter)
    assert int(q.num_batches) == 0  # nothing observed or stored
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    step = (hi - lo) / 255
    err = (y - x).abs().amax(-1)
    assert bool((err <= step / 2 * (1 + 1e-5)).all())  # every row at its own resolution
    codes = y / step[..., None]  # (q - zero point): whole steps from 0, at most 255 of them across a row
    assert float((codes - codes.round()).abs().max()) < 1e-3
    assert int((codes.round().amax(-1) - codes.round().amin(-1)).max()) <= 255
    # a row's grid depends on that row alone: the same row in another batch gets the same values
    assert torch.equal(q(x[:1, 2:3]), y[:1, 2:3])
    # straight-through gradient, and off means off
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    assert q.enable(False)(x) is x
    cfg = QuantConfig(dynamic=["*.fc1", "*.q_proj"])
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="quant.dynamic"):
        QuantConfig(dynamic="*.fc1")


def test_quant_config_validation_names_the_field():
    with pytest.raises(ValueError, match="quant.observer"):
        QuantConfig(observer="histogramm")
    with pytest.raises(ValueError, match="quant.weight_bits"):
        QuantConfig(weight_bits=16)
    with pytest.raises(ValueError, match="quant.include"):
        QuantConfig(include="*.fc1")
    with pytest.raises(ValueError, match="quant.momentum"):
        QuantConfig(momentum=0.0)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['lsq_lr'\]"):
        QuantConfig.from_dict({"lsq_lr": 1.0})
    cfg = QuantConfig(exclude=["*.fc2"], lsq=True)
    assert QuantConfig.from_dict({**cfg.to_dict(), "converted": True, "engine": "x86"}) == cfg


# ---------------------------------------------------------------------------------------------
# prepare


def test_prepare_swaps_layers_keeping_parameters(float_model):
    m = copy.deepcopy(float_model)
    params = {n: p for n, p in m.named_parameters()}
    prepare_qat(m, QuantConfig(embeddings=True))
    assert {n: p for n, p in m.named_parameters() if "quant" not in n} == params  # same objects
    assert m.proj_out.weight is m.model.decoder.embed_tokens.weight  # still tied
    linears = [n for n, x in m.named_modules() if isinstance(x, QATLinear) and x.input_quant is not None]
    assert len(linears) == 2 * 6 + 2 * 10  # q,k,v,out,fc1,fc2 per encoder layer; + cross q,k,v,out per decoder layer
    assert sum(isinstance(x, QuantMatMul) for x in m.modules()) == 12
    assert isinstance(m.model.decoder.embed_tokens, QATEmbedding) and m.proj_out.input_quant is None
    # LayerNorm and the conv front end stay float
    assert type(m.model.encoder.conv1) is nn.Conv1d and type(m.model.encoder.layer_norm) is nn.LayerNorm
    lin = m.model.encoder.layers[0].fc1.to_linear()
    assert type(lin) is nn.Linear and lin.weight is params["model.encoder.layers.0.fc1.weight"]
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(m, QuantConfig())


def test_dynamic_patterns_choose_which_linear_inputs_get_per_row_grids(float_model):
    m = prepare_qat(copy.deepcopy(float_model), QuantConfig(dynamic=["*.fc1", "*.encoder_attn.q_proj"], conv=True))
    dynamic = {n.rpartition(".")[0] for n, q in quantizers(m) if q.dynamic}
    assert dynamic == ({f"model.{s}.layers.{i}.fc1" for s in ("encoder", "decoder") for i in range(2)}
                       | {f"model.decoder.layers.{i}.encoder_attn.q_proj" for i in range(2)})
    calibrate(m, _batches(1))
    plan = export_quant_plan(m)
    assert plan.linears["model.encoder.layers.0.fc1"][0].per_row
    assert not plan.linears["model.encoder.layers.0.fc2"][0].per_row
    assert plan.linears["model.encoder.layers.0.fc2"][0].scale != 1.0  # calibrated
    # the conv front end's windows keep their calibrated per-tensor grid under "*"
    m = prepare_qat(copy.deepcopy(float_model), QuantConfig(dynamic=["*"], conv=True))
    assert not m.model.encoder.conv1.input_quant.dynamic and m.model.encoder.layers[0].fc2.input_quant.dynamic


def test_row_matmuls_put_the_first_input_of_matching_attention_matmuls_on_a_grid_per_row(float_model):
    m = prepare_qat(copy.deepcopy(float_model), QuantConfig(row_matmuls=["model.encoder.layers.*.pv"]))
    dynamic = {n for n, q in quantizers(m) if q.dynamic}
    assert dynamic == {f"model.encoder.layers.{i}.self_attn.pv.a_quant" for i in range(2)}
    calibrate(m, _batches(1))
    plan = export_quant_plan(m)
    a, b = plan.matmuls["model.encoder.layers.0.self_attn.pv"]
    assert a.per_row and not b.per_row and b.scale != 1.0  # the values keep their calibrated grid
    assert not plan.matmuls["model.encoder.layers.0.self_attn.qk"][0].per_row
    assert not plan.matmuls["model.decoder.layers.0.self_attn.pv"][0].per_row
    # why: attention spread over 1500 frames is 1/1500 per frame, under half a step of the [0, 1] grid a
    # softmax calibrates to, so the calibrated grid zeroes the whole row; the row's own grid keeps it
    probs = torch.full((1, 1500), 1 / 1500)
    calibrated = activation_quantizer().train()
    calibrated(torch.tensor([[0.0, 1.0]]))
    calibrated.freeze()
    assert float(calibrated.eval()(probs).sum()) == 0.0
    assert torch.allclose(activation_quantizer(observer="dynamic")(probs), probs)
    with pytest.raises(ValueError, match="quant.row_matmuls"):
        QuantConfig(row_matmuls="*.pv")
    with pytest.raises(ValueError, match=r"quant.row_matmuls: '\*.fc1' matches no quantized attention matmul"):
        prepare_qat(copy.deepcopy(float_model), QuantConfig(row_matmuls=["*.fc1"]))


def test_outlier_channels_bypass_both_grids(float_model):
    cfg = QuantConfig(outlier_channels=3, outlier_linears=["model.encoder.layers.*.fc2"])
    m = prepare_qat(copy.deepcopy(float_model), cfg)
    fc2 = m.model.encoder.layers[1].fc2
    assert fc2.float_channels.tolist() == [-1] * 3 and m.model.decoder.layers[0].fc2.float_channels is None
    with pytest.raises(RuntimeError, match="not chosen yet"):
        _logits(m, _batches(1)[0])
    # calibration picks the 3 channels of largest magnitude on its batches (as the float model sees them)
    seen = []
    h = float_model.model.encoder.layers[1].fc2.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    batches = _batches(2)
    for b in batches:
        _logits(float_model, b)
    h.remove()
    peak = torch.stack([x.abs().flatten(0, 1).amax(0) for x in seen]).amax(0)
    calibrate(m, batches)
    assert fc2.float_channels.tolist() == sorted(peak.topk(3).indices.tolist())
    # the input grid is fitted without them: its range is that of the other channels
    c = fc2.float_channels
    rest = torch.cat([x.index_fill(-1, c, 0.0).flatten() for x in seen])
    assert float(fc2.input_quant.max_val) == pytest.approx(float(rest.max()))
    assert float(fc2.input_quant.max_val) < float(peak.max())
    # y = q(x') q(W') + x_c W_c + b, where x' and W' are x and W with channels c zeroed
    x = seen[0]
    with torch.no_grad():
        w0 = fc2.weight.index_fill(1, c, 0.0)
        s, z = fc2.input_quant.qparams()
        want = F.linear(fake_quant(x.index_fill(-1, c, 0.0), s, z, 0, 255), fc2.weight_quant(w0), fc2.bias) + \
            F.linear(x[..., c], fc2.weight[:, c])
        assert torch.equal(fc2(x), want)
    with torch.inference_mode():  # as eval runs it; the zeroed weight is reused across both modes
        assert torch.equal(fc2(x), want)
    with torch.no_grad():
        assert torch.equal(fc2(x), want)
    # the export plan carries them; the int8 weight is zero in their columns
    act, w = export_quant_plan(m).linears["model.encoder.layers.1.fc2"]
    assert torch.equal(w.float_channels, c) and torch.equal(w.float_weight, fc2.weight[:, c].detach())
    assert not w.q[:, c].any() and w.q.any()
    assert "model.decoder.layers.0.fc2" in export_quant_plan(m).linears
    # with the quantizers off the layer is the float Linear exactly
    set_fake_quant(m, False)
    b = _batches(1, seed=5)[0]
    assert torch.equal(_logits(m, b), _logits(float_model, b))
    # settings that cannot work are named
    with pytest.raises(ValueError, match="go together"):
        QuantConfig(outlier_channels=4)
    with pytest.raises(ValueError, match="calibration_batches"):
        QuantConfig(outlier_channels=4, outlier_linears=["*.fc2"], calibration_batches=0)
    with pytest.raises(ValueError, match=r"outlier_linears: '\*.qk' matches no quantized Linear"):
        prepare_qat(copy.deepcopy(float_model), QuantConfig(outlier_channels=2, outlier_linears=["*.qk"]))
    with pytest.raises(ValueError, match=r"model.encoder.layers.0.fc2: quant.outlier_channels 128 leaves none"):
        prepare_qat(copy.deepcopy(float_model), QuantConfig(outlier_channels=128, outlier_linears=["*.fc2"]))
    with pytest.raises(ValueError, match="both match it"):
        prepare_qat(copy.deepcopy(float_model), QuantConfig(outlier_channels=2, outlier_linears=["*.fc2"],
                                                             dynamic=["*"]))


def test_include_exclude_patterns(float_model):
    cfg = QuantConfig(include=["model.decoder.*"], exclude=["*.encoder_attn.*", "*.pv"])
    m = prepare_qat(copy.deepcopy(float_model), cfg)
    owners = {n.rpartition(".")[0] for n, _ in quantizers(m)}
    assert owners == {f"model.decoder.layers.{i}.{x}" for i in range(2)
                      for x in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                "self_attn.qk", "fc1", "fc2")}
    assert type(m.proj_out) is nn.Linear  # not by default
    m = prepare_qat(copy.deepcopy(float_model), QuantConfig(quantize_matmuls=False))
    assert not any(isinstance(x, QuantMatMul) for x in m.modules())


def test_disabled_fake_quant_equals_float_exactly(float_model):
    m = prepare_qat(copy.deepcopy(float_model), QuantConfig(embeddings=True))
    calibrate(m, _batches(1))
    assert set_fake_quant(m, False) > 0
    ref, b = copy.deepcopy(float_model).train(), _batches(1, seed=5)[0]
    m.train()
    out_ref = ref(input_features=b["input_features"], labels=b["labels"])
    out = m(input_features=b["input_features"], labels=b["labels"])
    assert torch.equal(out.logits, out_ref.logits)  # atol=0
    out.loss.backward()
    out_ref.loss.backward()
    grads = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n].grad), n


def test_calibrate_freeze_and_summary(float_model):
    m = prepare_qat(copy.deepcopy(float_model), QuantConfig(observer="moving_average"))
    m.train()
    assert calibrate(m, _batches(2)) == 2
    assert m.training and all(q.training for _, q in quantizers(m))  # modes restored
    rows = quant_state_summary(m)
    acts = [r for r in rows if r["observer"] == "moving_average"]
    assert len(acts) == 32 + 2 * 12 and all(r["batches"] == 2 and r["max"] > r["min"] for r in acts)
    assert all(r["state"] == "observing" for r in rows)
    assert freeze_observers(m) == len(acts)
    rows = quant_state_summary(m)
    assert {r["state"] for r in rows if r["observer"] != "current"} == {"frozen"}
    assert {r["state"] for r in rows if r["observer"] == "current"} == {"observing"}  # weights follow weights
    cfg = QuantConfig(freeze_observers_after=3)
    m2 = prepare_qat(copy.deepcopy(float_model), cfg)
    assert [maybe_freeze_observers(m2, cfg, s) for s in range(5)] == [False, False, False, True, False]
    assert all(not q.is_observing for _, q in quantizers(m2) if q.observer != "current")


def test_fake_quant_model_close_to_float_and_plan(float_model, ptq_model):
    b = _batches(1, seed=7)[0]
    ref, out = _logits(float_model, b), _logits(ptq_model, b)
    assert 0 < float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
    plan = export_quant_plan(ptq_model)
    assert len(plan.linears) == 32 and len(plan.matmuls) == 12 and plan.embedding.q.dtype == torch.int8
    act, w = plan.linears["model.encoder.layers.0.fc1"]
    q = ptq_model.model.encoder.layers[0].fc1
    assert act.scale == float(q.input_quant.scale) and act.zero_point == int(q.input_quant.zero_point)
    assert torch.equal(w.scale, q.weight_quant.scale) and w.q.shape == q.weight.shape
    a, bq = plan.matmuls["model.decoder.layers.1.encoder_attn.pv"]
    assert a.zero_point == 0  # attention probabilities are >= 0: the uint8 grid starts at 0
    with pytest.raises(ValueError, match="never calibrated"):
        export_quant_plan(prepare_qat(copy.deepcopy(float_model), QuantConfig()))
    # 4-bit weights train but do not export: the Linear (or the embedding) is named
    four = ptq(copy.deepcopy(float_model), QuantConfig(weight_bits=4), _batches(1))
    with pytest.raises(ValueError, match=r"^model\.encoder\.layers\.0\.self_attn\.k_proj: only 8-bit weights export, got 4"):
        export_quant_plan(four)
    four = ptq(copy.deepcopy(float_model), QuantConfig(weight_bits=4, embeddings=True, include=["*.embed_tokens"]),
               _batches(1))
    with pytest.raises(ValueError, match=r"^model\.decoder\.embed_tokens: only 8-bit weights export, got 4"):
        export_quant_plan(four)


def test_float_weights_rounded_to_fp16_only_where_the_engine_keeps_float(float_model):
    m = ptq(copy.deepcopy(float_model), QuantConfig(embeddings=True, exclude=["*.encoder.layers.0.fc1"]), _batches(1))
    before = {k: v.clone() for k, v in m.named_parameters()}
    done = round_float_weights_fp16(m)
    assert {"model.encoder.conv1.weight", "model.encoder.conv2.weight", "model.encoder.embed_positions.weight",
            "model.encoder.layers.0.fc1.weight"} <= set(done)  # fc1 of layer 0 is kept float (excluded)
    assert not any(k.endswith(("_proj.weight", "fc2.weight", "embed_tokens.weight")) for k in done)
    for k, v in m.named_parameters():
        if k in done:
            assert torch.equal(v, v.half().float()) and (v - before[k]).abs().max() <= before[k].abs().max() / 1024
        else:
            assert torch.equal(v, before[k])  # int8 on export (or small): untouched
    once = {k: v.clone() for k, v in m.named_parameters()}
    assert round_float_weights_fp16(m) == done  # idempotent
    assert all(torch.equal(v, once[k]) for k, v in m.named_parameters())


# ---------------------------------------------------------------------------------------------
# state: state_dict, safetensors through the model format, resume


@pytest.mark.parametrize("cfg", [QuantConfig(embeddings=True), QuantConfig(observer="percentile", lsq=True),
                                 QuantConfig(dynamic=["*"], lsq=True, embeddings=True),
                                 QuantConfig(outlier_channels=5, outlier_linears=["*.fc2", "*.out_proj"])],
                         ids=["minmax-embeddings", "percentile-lsq", "dynamic-lsq", "outlier-channels"])
def test_quant_state_roundtrips_bit_exactly(float_model, tmp_path, cfg):
    m = prepare_qat(copy.deepcopy(float_model), cfg)
    calibrate(m, _batches(1))
    # a fresh prepared model takes the state dict bit-exactly
    fresh = prepare_qat(copy.deepcopy(float_model), cfg)
    fresh.load_state_dict(m.state_dict())
    sd, sd2 = m.state_dict(), fresh.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # safetensors through the model format
    save_model(m, tmp_path / "qat", quant=cfg.to_dict())
    assert sorted(p.name for p in (tmp_path / "qat").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "slim_structure.json"]
    loaded = load_quantized_model(tmp_path / "qat")
    assert loaded.slim_quant_config == cfg
    sd2 = loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    # resume: observing on after the reload gives the state of an uninterrupted run
    nxt = _batches(1, seed=9)
    calibrate(m, nxt)
    calibrate(loaded, nxt)
    sd, sd2 = m.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    b = _batches(1, seed=3)[0]
    assert torch.equal(_logits(m.eval(), b), _logits(loaded, b))


# ---------------------------------------------------------------------------------------------
# pruned models, sensitivity


def test_pruned_uneven_heads(tmp_path):
    config = _tiny().config
    s = Structure(head_dim=16, encoder_heads=[4, 1], decoder_heads=[0, 3], cross_heads=[2, 0],
                  encoder_ffn=[128, 40], decoder_ffn=[0, 96])
    torch.manual_seed(0)
    model = build_model(config, s).eval()
    m = ptq(copy.deepcopy(model), QuantConfig(), _batches(1))
    owners = {n.rpartition(".")[0] for n, _ in quantizers(m)}
    # nothing to quantize where every head / neuron is gone
    assert "model.decoder.layers.0.self_attn.qk" not in owners and "model.decoder.layers.0.fc1" not in owners
    assert "model.decoder.layers.1.encoder_attn.pv" not in owners
    assert "model.encoder.layers.1.self_attn.qk" in owners
    assert all(q.calibrated for _, q in quantizers(m))
    save_model(m, tmp_path / "p", quant=QuantConfig().to_dict())
    loaded = load_quantized_model(tmp_path / "p")
    assert loaded.model.decoder.layers[1].self_attn.num_heads == 3
    b = _batches(1, seed=4)[0]
    assert torch.equal(_logits(m, b), _logits(loaded, b))


def test_sensitivity_scan(float_model):
    batches = _batches(1)
    table = sensitivity_scan(float_model, QuantConfig(conv=True), batches)
    assert [r["unit"] for r in table[:2]] == ["float", "all"]
    assert {r["unit"] for r in table[2:]} == set(GROUPS)  # the conv front end's unit too, with quant.conv
    m = copy.deepcopy(float_model)
    from qat.sensitivity import teacher_forced_loss
    assert table[0]["loss"] == teacher_forced_loss(m, batches) and table[0]["delta_loss"] == 0.0
    deltas = [r["delta_loss"] for r in table[2:]]
    assert deltas == sorted(deltas, reverse=True) and any(d != 0 for d in deltas)
    top = most_sensitive(table, 1)
    assert top == table[2]["patterns"]
    # each unit's int8 weights: the FFN's fc1 + fc2, none for the activation-only matmuls
    by_unit = {r["unit"]: r for r in table}
    fc = [m for n, m in float_model.named_modules() if n.startswith("model.decoder.layers.") and n[-4:] in (".fc1", ".fc2")]
    assert by_unit["decoder FFN"]["weights"] == sum(m.weight.numel() for m in fc) > 0
    assert by_unit["encoder attention matmuls"]["weights"] == 0
    assert by_unit["all"]["weights"] == sum(r["weights"] for r in table[2:])
    # a size budget passes over the units that do not fit and keeps the next most sensitive ones that do
    from qat.sensitivity import units_to_keep_float
    ranked = table[2:]
    budget = min(r["weights"] for r in ranked if r["weights"]) - 1   # only the weightless units fit
    kept, passed = units_to_keep_float(table, 2, max_weights=budget)
    assert [r["unit"] for r in kept] == [r["unit"] for r in ranked if r["weights"] == 0][:2]
    assert passed == [r for r in ranked[:ranked.index(kept[-1])] if r["weights"]] and passed
    assert units_to_keep_float(table, 2, max_weights=by_unit["all"]["weights"]) == (ranked[:2], [])  # all fit
    assert units_to_keep_float(table, 3) == (ranked[:3], [])
    assert by_unit["float"]["weights"] == 0
    assert prepare_qat(copy.deepcopy(float_model), QuantConfig(exclude=top))  # usable as exclude patterns
    md = to_markdown(table)
    assert md.count("\n") == len(table) + 2 and md.startswith("| unit | loss |")

    cfg = QuantConfig(include=["model.decoder.layers.1.fc*", "model.decoder.layers.1.encoder_attn.qk"])
    layers = sensitivity_scan(float_model, cfg, batches, by="layer", wer_fn=lambda model: 0.5)
    assert [r["unit"] for r in layers[:2]] == ["float", "all"]
    assert {r["unit"] for r in layers[2:]} == {"model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2",
                                               "model.decoder.layers.1.encoder_attn.qk"}
    assert all(r["delta_wer"] == 0.0 for r in layers) and "| WER |" in to_markdown(layers)


def test_quantized_weights_count_a_tied_weight_once(float_model):
    """The decoder's embedding and output projection share one int8 table: a size budget counts it once."""
    from qat.sensitivity import quantized_weights

    m = prepare_qat(copy.deepcopy(float_model), QuantConfig(embeddings=True))
    table = m.model.decoder.embed_tokens.weight
    assert m.proj_out.weight is table and hasattr(m.proj_out, "weight_quant")
    assert quantized_weights(m, ["model.decoder.embed_tokens", "proj_out"]) == table.numel()


# ---------------------------------------------------------------------------------------------
# the seed problem


def test_eager_static_quantization_cannot_reach_sdpa_matmuls_but_ours_does():
    """PyTorch's eager static flow observes module outputs; HF Whisper's attention is one fused
    `scaled_dot_product_attention` call, so Q·Kᵀ, softmax and P·V have no module and no observer."""
    import torch.ao.quantization as tq

    stock = _tiny()
    assert stock.config._attn_implementation == "sdpa"
    b = _batches(1, B=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        p = copy.deepcopy(stock)
        for mod in p.modules():
            if isinstance(mod, nn.Linear):
                mod.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(p, inplace=True)
        observers = {n.rpartition(".")[0]: o for n, o in p.named_modules() if isinstance(o, tq.ObserverBase)}
        seen, sdpa = [], []
        for name, o in observers.items():
            o.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, inp[0].dim())))

        class RecordSDPA(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.nn.functional.scaled_dot_product_attention:
                    sdpa.append(tuple(args[0].shape))
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), RecordSDPA():
            p(input_features=b["input_features"], decoder_input_ids=b["labels"])
        assert len(sdpa) == 6 and all(len(s) == 4 for s in sdpa)  # every attention is one fused call
        # the observers sit on Linear outputs only: none sees the (B, H, T, D) matmul inputs or the probabilities
        assert all(isinstance(p.get_submodule(n), nn.Linear) for n in observers)
        assert len(seen) == len(observers) and {d for _, d in seen} == {3}
        # and converting leaves Linears that a float input cannot even run through
        c = tq.convert(p)
        with pytest.raises((RuntimeError, NotImplementedError)):
            with torch.no_grad():
                c(input_features=b["input_features"], decoder_input_ids=b["labels"])

    # ours: static W8A8 including both inputs of every attention matmul
    ours = prepare_qat(copy.deepcopy(stock), QuantConfig())
    calibrate(ours, _batches(1, B=1))
    freeze_observers(ours)
    mm = {n: x for n, x in ours.named_modules() if isinstance(x, QuantMatMul)}
    assert len(mm) == 12 and all(isinstance(a, SlimAttention) for a in ours.modules() if "attn" in type(a).__name__.lower())
    for name, x in mm.items():
        for q in (x.a_quant, x.b_quant):
            assert q.calibrated and float(q.max_val) > float(q.min_val), name
            assert not q.is_observing and q.is_enabled
    probs = [x.a_quant for n, x in mm.items() if n.endswith(".pv")]
    assert all(float(q.min_val) >= 0.0 and 0.0 < float(q.max_val) <= 1.0 for q in probs)
    ref, out = _logits(install_explicit_attention(copy.deepcopy(stock)), b), _logits(ours, b)
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
    from qat.convert import Int8Linear, QDQMatMul, convert_to_int8

    int8 = convert_to_int8(ours)
    assert sum(isinstance(x, QDQMatMul) for x in int8.modules()) == 12
    assert sum(isinstance(x, Int8Linear) for x in int8.modules()) == 32
    assert float((_logits(int8, b) - out).abs().max()) < 1e-3


def test_channel_peaks_measures_each_input_channel_of_the_matching_linears(tmp_path):
    """benchmarks/channel_peaks.py: the peak |x| per input channel, as a forward hook on the float model sees it."""
    import sys
    from pathlib import Path

    from slim.sources import tiny_random_processor, tiny_random_whisper

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))  # benchmarks/ is not an installed package
    from benchmarks.channel_peaks import channel_peaks, summary

    model = tiny_random_whisper(seed=0)  # 30 s windows, as the processor's features
    d = save_model(model, tmp_path / "m", processor=tiny_random_processor())
    manifest = tmp_path / "two.jsonl"
    lines = (root / "data" / "real-speech" / "manifest.jsonl").read_text().splitlines()[:2]
    manifest.write_text("".join(l.replace('"audio": "', f'"audio": "{root}/data/real-speech/') + "\n" for l in lines))
    peaks = channel_peaks(str(d), str(manifest), ["model.encoder.layers.*.fc2"], limit=2)
    assert sorted(peaks) == ["model.encoder.layers.0.fc2", "model.encoder.layers.1.fc2"]
    assert all(len(p) == model.config.encoder_ffn_dim and min(p) >= 0 and max(p) > 0 for p in peaks.values())
    row = summary({"x": [1.0, 8.0, 2.0, 4.0]}, [1, 2])[0]
    assert (row["max"], row["k1"], row["k2"], row["ratio_k1"], row["step_k2"]) == (8.0, 4.0, 2.0, 2.0, 2.0 / 255)
