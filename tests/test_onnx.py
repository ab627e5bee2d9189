"""ONNX export + ONNX Runtime engine against the torch model, on the tiny random Whisper (and tiny.en, marked real)."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from eval.onnx_engine import next_token_agreement, parity, token_agreement, torch_greedy_tokens
from qat.onnx_export import export_model, int8_kernel_counts, optimized_graph
from slim.export_format import (DecodeConfig, ExportDirError, cpu_has_vnni, file_digest, int8_kernels_exact,
                                 session_options)
from slim.runtime import OnnxEngine
from slim.model import Structure, build_model, install_explicit_attention
from slim.sources import tiny_random_processor, tiny_random_whisper
from uneven import assert_stored_as_uint8

REAL_SPEECH = Path(__file__).resolve().parents[1] / "data" / "real-speech"
NEW = 19  # generated tokens compared per utterance (random weights rarely stop early)

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def dense():
    return install_explicit_attention(tiny_random_whisper(seed=0)).eval()


@pytest.fixture(scope="module")
def uneven(dense):
    s = Structure.dense(dense.config)
    s.encoder_heads, s.decoder_heads, s.cross_heads = [3, 1], [2, 0], [1, 3]
    s.encoder_ffn, s.decoder_ffn = [64, 0], [7, 128]
    torch.manual_seed(3)
    model = build_model(dense.config, s).eval()
    model.generation_config = dense.generation_config
    return model


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(80, 3000, generator=g).numpy() for _ in range(2)]


@pytest.fixture(scope="module")
def dense_tokens(dense, feats):
    """The torch reference's greedy tokens of the dense model (computed once: the torch encoder is the slow part)."""
    return torch_greedy_tokens(dense, np.stack(feats), DecodeConfig.from_model(dense), max_new_tokens=NEW)


def _ptq(model, feats, ids, **settings):
    """qat.prepare's post-training quantization (min-max observers, int8 embedding too) of a copy of `model`."""
    import copy

    from qat.prepare import QuantConfig, ptq

    cfg = QuantConfig(embeddings=True, **settings)
    fq = ptq(copy.deepcopy(model), cfg, [{"input_features": torch.tensor(np.stack(feats)), "labels": ids}])
    return fq, cfg


@pytest.fixture(scope="module")
def fake_quant(dense, feats):
    return _ptq(dense, feats, torch.tensor([[50257, 50362] + list(range(400, 420))] * len(feats)))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dense, uneven, fake_quant):
    from slim.model import save_model

    d = tmp_path_factory.mktemp("exports")
    processor = tiny_random_processor()
    fq, cfg = fake_quant
    fq_dir = save_model(fq, d / "ptq", processor=processor, quant=cfg.to_dict())  # exported as the stage does
    return {
        "float": export_model(dense, d / "float", mode="float", processor=processor),
        "uneven": export_model(uneven, d / "uneven", mode="float"),
        "dynamic": export_model(dense, d / "dynamic", mode="dynamic-int8"),
        "qdq": export_model(fq_dir, d / "qdq", mode="qdq"),
    }


# ---------------------------------------------------------------------------------------------


def test_float_export_greedy_tokens_equal_torch(exports, dense_tokens, feats):
    e = OnnxEngine(exports["float"], threads=1)
    assert [e.generate_tokens(f[None], NEW)[0] for f in feats] == dense_tokens
    assert all(len(t) == NEW for t in dense_tokens)  # random weights never stop: every step compared


def test_teacher_forced_picks_follow_the_forced_tokens(exports, dense, dense_tokens, feats):
    """Fed its own greedy tokens, each loop picks them again (and one more position); the float export fed a
    foreign prefix picks exactly what torch picks on it, and a shorter forced list ends its item early."""
    decode = DecodeConfig.from_model(dense)
    e = OnnxEngine(exports["float"], threads=1)
    batch = np.stack(feats)
    for picks in (torch_greedy_tokens(dense, batch, decode, forced=dense_tokens), e.generate_tokens(batch, forced=dense_tokens)):
        assert [p[:-1] for p in picks] == dense_tokens
    foreign = [[400 + i for i in range(7)], [500 + i for i in range(3)]]
    picks = e.generate_tokens(batch, forced=foreign)
    assert [len(p) for p in picks] == [8, 4]
    assert picks == torch_greedy_tokens(dense, batch, decode, forced=foreign)
    assert picks[0][1:] != dense_tokens[0][1:8]  # a different prefix: different picks (the check can fail)
    with pytest.raises(ValueError, match="batch of 2"):
        e.generate_tokens(batch, forced=foreign[:1])


def test_next_token_agreement_counts_positions():
    eos = 9
    assert next_token_agreement([[1, 2, 3]], [[1, 2, 3, eos]], eos) == 1.0
    assert next_token_agreement([[1, 2, 3], []], [[1, 7, 3, 4], [eos]], eos) == 0.6  # eos due at the end
    # a reference that filled its token budget was cut: no eos was due, its last position is not compared
    assert next_token_agreement([[1, 2, 3], []], [[1, 7, 3, 4], [eos]], eos, budgets=[3, 5]) == 0.75
    with pytest.raises(ValueError, match="teacher-forced positions"):
        next_token_agreement([[1, 2]], [[1, 2]], eos)


def test_uneven_float_export_parity(exports, uneven, feats):
    r = parity(uneven, exports["uneven"], feats, threads=1, max_new_tokens=NEW)
    assert r["tokens_torch"] > 0
    assert r["torch_tokens"] == r["onnx_tokens"]
    assert r["token_agreement"] == 1.0 and r["exact_match"] == 1.0


def test_torch_greedy_follows_hf_generate(dense_tokens, feats):
    """The decoding rules shipped in export_config.json (prompt, suppress tokens) are HF generate's, the
    repetition guard that of the logits processor the torch engine hands generate."""
    from transformers import LogitsProcessorList

    from eval.engines import RepeatGuard

    stock = tiny_random_whisper(seed=0)  # stock SDPA attention, HF's own generate loop
    decode = DecodeConfig.from_model(stock, max_length=NEW + 2)
    assert decode.prompt == [50257, 50362] and decode.eos_token_id == 50256
    with torch.no_grad():
        out = stock.generate(torch.tensor(np.stack(feats)), max_new_tokens=NEW,
                             logits_processor=LogitsProcessorList([RepeatGuard(decode.max_repeats)]))
    eos = decode.eos_token_id
    hf = [row.tolist() for row in out]  # transformers 5 returns the generated tokens only
    hf = [row[:row.index(eos)] if eos in row else row for row in hf]
    assert dense_tokens == hf


@pytest.mark.parametrize("which", ["float", "uneven"])
def test_encoder_and_decoder_outputs_match_torch(which, exports, dense, uneven, feats):
    import onnxruntime as ort

    model = dense if which == "float" else uneven
    d = exports[which]
    cfg = json.loads((d / "export_config.json").read_text())
    names = cfg["io"]["names"]
    x = torch.tensor(np.stack(feats[:2]))
    ids = torch.tensor([[50257, 50362, 400, 500, 600]] * 2)
    with torch.no_grad():
        hidden = model.model.encoder(x).last_hidden_state
        ref = model(input_features=x, decoder_input_ids=ids).logits
    enc = ort.InferenceSession(str(d / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(d / "decoder.onnx"), providers=["CPUExecutionProvider"])
    outs = enc.run(None, {"input_features": x.numpy()})
    assert np.abs(outs[0] - hidden.numpy()).max() <= 1e-4
    cross = dict(zip(names["cross"], outs[1:]))
    past = {i.name: np.zeros([2] + [0 if isinstance(s, str) else s for s in i.shape[1:]], np.float32)
            for i in dec.get_inputs() if i.name.startswith("past_")}
    # first step: the 2-token prompt with an empty past; then one token at a time
    steps = [(0, 2), (2, 3), (3, 4), (4, 5)]
    for start, end in steps:
        o = dec.run(None, {"input_ids": ids[:, start:end].numpy(), "offset": np.array([start]), **past, **cross})
        assert np.abs(o[0] - ref[:, end - 1].numpy()).max() <= 1e-4
        past = dict(zip(names["past"], o[1:]))
        assert all(v.shape[3 if "key" in k else 2] == end for k, v in past.items())
    if which == "uneven":  # a layer with 0 self-attention heads has no cache tensors
        assert names["past"] == ["past_key_0", "past_value_0"]
        assert [i.shape[1] for i in dec.get_inputs() if i.name.startswith("cross_key")] == [1, 3]


def test_batched_decoding_equals_one_by_one(exports, feats, dense_tokens):
    e = OnnxEngine(exports["float"], threads=1)
    assert e.generate_tokens(np.stack(feats), NEW) == dense_tokens


def test_int8_batched_decoding_equals_one_by_one(exports, feats):
    """The logits' input is quantized per row: a clip's tokens do not depend on the rest of its batch."""
    e = OnnxEngine(exports["qdq"], threads=1)
    one_by_one = [t for f in feats for t in e.generate_tokens(f[None], NEW)]
    assert e.generate_tokens(np.stack(feats), NEW) == one_by_one


def test_per_row_dynamic_logits_match_their_onnx_graph(exports):
    """The eager forward of the logits' dynamic quantization is the exported graph's arithmetic."""
    import onnxruntime as ort

    from qat.onnx_export import _DynamicQuantMatMul

    g = torch.Generator().manual_seed(5)
    wq = torch.randint(-127, 128, (64, 300), generator=g, dtype=torch.int8)
    ws, colsum = torch.rand(300, generator=g) / 100, wq.float().sum(0)
    x = torch.randn(3, 2, 64, generator=g) * torch.tensor([1.0, 30.0, 0.01])[:, None, None]

    class M(torch.nn.Module):
        def forward(self, x):
            return _DynamicQuantMatMul.apply(x, wq, ws, colsum)

    path = exports["qdq"].parent / "dyn.onnx"
    torch.onnx.export(M(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    got = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    want = M()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # per row: scaling one row leaves the others exactly as they were
    x2 = x.clone()
    x2[0, 0] *= 100
    assert torch.equal(M()(x2)[1:], M()(x)[1:]) and torch.equal(M()(x2)[0, 1], M()(x)[0, 1])


def test_row_grid_of_probabilities_is_the_fake_quant_bit_for_bit(exports):
    """The export's per-row grid for x >= 0 (row maximum only) gives row_fake_quant's values exactly."""
    import onnxruntime as ort

    from qat.onnx_export import _RowFakeQuant
    from qat.quantizers import row_fake_quant

    g = torch.Generator().manual_seed(3)
    x = torch.softmax(torch.randn(2, 3, 40, 50, generator=g) * torch.tensor([0.1, 3.0, 30.0])[:, None, None], -1)
    x[0, 0, 0] = 0.0  # an all-zero row: scale eps, codes 0

    class M(torch.nn.Module):
        def forward(self, x):
            return _RowFakeQuant.apply(x, True)

    path = exports["qdq"].parent / "rowp.onnx"
    torch.onnx.export(M(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    got = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    assert np.array_equal(got, row_fake_quant(x).numpy()) and np.array_equal(got, M()(x).numpy())
    # each row's error is within half of its own step (row max / 255), however small that max is
    step = x.numpy().max(-1, keepdims=True) / 255
    assert (np.abs(got - x.numpy()) <= step / 2 * (1 + 1e-5) + 1e-30).all()


def test_per_row_probabilities_times_value_codes_is_one_integer_matmul(exports):
    """`_RowProbsMatMul` in ORT: the eager forward's integer sums and scales, and the fake-quant arithmetic
    (row_fake_quant(P) @ dequantized V) up to float rounding; a batch item's rows do not move another's."""
    import onnxruntime as ort

    from qat.onnx_export import _RowProbsMatMul
    from qat.quantizers import row_fake_quant

    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(2, 1, 30, 40, generator=g) * torch.tensor([0.1, 20.0])[:, None, None, None], -1)
    v_scale, v_zp = torch.tensor(0.03), torch.tensor(131, dtype=torch.uint8)
    v = torch.randint(0, 256, (2, 1, 40, 8), generator=g, dtype=torch.uint8)

    class M(torch.nn.Module):
        def forward(self, p, v):
            return _RowProbsMatMul.apply(p, v, v_scale, v_zp)

    path = exports["qdq"].parent / "rowpv.onnx"
    torch.onnx.export(M(), (p, v), str(path), dynamo=False, opset_version=17, input_names=["p", "v"],
                      output_names=["y"], dynamic_axes={"p": {0: "b", 2: "t"}, "v": {0: "b"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMulInteger", "QuantizeLinear"} <= ops and "MatMul" not in ops
    s = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    got = s.run(None, {"p": p.numpy(), "v": v.numpy()})[0]
    eager = M()(p, v).numpy()
    fake = torch.matmul(row_fake_quant(p), (v.float() - 131) * 0.03).numpy()
    np.testing.assert_allclose(got, eager, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, fake, rtol=1e-5, atol=1e-6)
    p2 = p.clone()
    p2[1] = p2[1] ** 3  # another batch item changes; the first one's rows keep their grids
    assert np.array_equal(s.run(None, {"p": p2.numpy(), "v": v.numpy()})[0][0], got[0])


def test_uint8_weights_keep_the_dynamic_int8_export_s_tokens(dense, exports, feats, tmp_path):
    """`uint8_weights` on ORT's dynamic INT8 (its MatMulIntegers carry their own int8 B zero points): no int8
    weight matrix left, the same greedy tokens."""
    d = export_model(dense, tmp_path / "dyn-u8", mode="dynamic-int8", uint8_weights=True)
    for f in ("encoder.onnx", "decoder.onnx"):
        assert_stored_as_uint8(exports["dynamic"] / f, d / f)
    x = np.stack(feats)
    want = OnnxEngine(exports["dynamic"], threads=1).generate_tokens(x, NEW)
    assert OnnxEngine(d, threads=1).generate_tokens(x, NEW) == want


def test_export_config_lists_files_and_decoding_rules(exports):
    d = exports["float"]
    cfg = json.loads((d / "export_config.json").read_text())
    assert cfg["mode"] == "float" and cfg["opset"] >= 17
    assert cfg["decode"]["prompt"] == [50257, 50362]
    assert cfg["decode"]["begin_suppress_tokens"] == [220, 50256]
    assert cfg["decode"]["max_length"] == 448
    assert cfg["structure"]["decoder_heads"] == [4, 4]
    assert {"encoder.onnx", "decoder.onnx", "tokenizer.json", "processor_config.json"} <= set(cfg["files"])
    assert sorted(cfg["files"]) == sorted(p.name for p in d.iterdir() if p.name != "export_config.json")
    e = OnnxEngine(d, threads=1)
    assert e.model_bytes == sum(p.stat().st_size for p in d.iterdir())
    assert e.graph_bytes == (d / "encoder.onnx").stat().st_size + (d / "decoder.onnx").stat().st_size


def test_transcribe_decodes_text_with_the_shipped_tokenizer(exports):
    e = OnnxEngine(exports["float"], threads=1)
    g = np.random.default_rng(0)
    audios = [g.standard_normal(16000).astype(np.float32) * 0.1, g.standard_normal(8000).astype(np.float32) * 0.1]
    feats = e.features(audios)
    assert feats.shape == (2, 80, 3000)
    texts = e.transcribe(audios, batch_size=2, max_new_tokens=NEW)
    tokens = e.generate_tokens(feats, NEW)
    hf = tiny_random_processor().tokenizer
    assert texts == [t.strip() for t in hf.batch_decode(tokens, skip_special_tokens=True)]
    assert all(isinstance(t, str) and t for t in texts)
    assert e.timings.utterances == 4 and e.timings.decoder_steps > 0


def test_dynamic_int8_export_runs_with_int8_kernels(exports, dense_tokens, feats):
    counts = int8_kernel_counts(exports["dynamic"] / "decoder.onnx")
    assert counts.get("DynamicQuantizeMatMul", 0) + counts.get("MatMulInteger", 0) >= 8
    e = OnnxEngine(exports["dynamic"], threads=1)
    assert e.graph_bytes < 0.5 * OnnxEngine(exports["float"], threads=1).graph_bytes
    tokens = e.generate_tokens(np.stack(feats), NEW)
    assert all(len(t) == NEW for t in tokens)
    assert token_agreement(dense_tokens, tokens) > 0.5


def test_qdq_export_uses_int8_kernels_and_stores_weights_once(exports):
    d = exports["qdq"]
    enc, dec = int8_kernel_counts(d / "encoder.onnx"), int8_kernel_counts(d / "decoder.onnx")
    # encoder: 2 layers x (q, k, v, out, fc1, fc2, and qk, pv for each of 4 heads: one attention chain per
    # head) + the cross k and v of both decoder layers, all int8 kernels
    assert enc.get("MatMulIntegerToFloat", 0) + enc.get("QLinearMatMul", 0) == 2 * (6 + 2 * 4) + 2 * 2
    assert enc.get("MatMul", 0) == 0
    # decoder: qkv (one fused projection: q/k/v share one min-max input quantizer), out, cross q, cross out, fc1, fc2, cross qk and pv (reading the encoder's uint8 K/V) per
    # layer int8, the logits one MatMulInteger (input quantized per row); the self-attention matmuls read
    # the step's small fake-quantized float cache (2 per layer)
    assert dec.get("MatMulIntegerToFloat", 0) + dec.get("QLinearMatMul", 0) == 2 * 8
    assert dec.get("MatMulInteger", 0) == 1
    assert dec.get("MatMul", 0) == 2 * 2
    e = OnnxEngine(d, threads=1)
    assert {o.type for o in e.encoder.get_outputs() if o.name in e.cross_names} == {"tensor(uint8)"}
    inits = [i for f in ("encoder.onnx", "decoder.onnx") for i in onnx.load(str(d / f)).graph.initializer]
    vocab_tables = [i for i in inits if 51864 in i.dims]
    assert [(i.data_type, list(i.dims)) for i in vocab_tables if len(i.dims) == 2] == [(onnx.TensorProto.INT8, [64, 51864])]
    big_float = [i.name for i in inits if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                 and np.prod(i.dims) >= 64 * 64 and "positions" not in i.name]
    assert big_float == []
    # the 27% target is for tiny.en (test below); this d_model-64 model keeps a relatively bigger share of
    # float tensors (conv, positional tables: random, so not stored as fp16)
    ratio = OnnxEngine(d, threads=1).graph_bytes / OnnxEngine(exports["float"], threads=1).graph_bytes
    assert ratio < 0.31


def test_signed_grid_is_the_unsigned_grid_shifted_by_128():
    """Keys/values export as int8 with zero point z - 128: the same values as the observer's uint8 grid."""
    from qat.onnx_export import _FakeQuant, _Quant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) * 3
    for z in (0, 3, 128, 200, 255):
        scale = torch.tensor(0.0123)
        u, s = torch.tensor(z, dtype=torch.uint8), torch.tensor(z - 128, dtype=torch.int8)
        assert torch.equal(_FakeQuant.apply(x, scale, u), _FakeQuant.apply(x, scale, s))
        qu, qs = _Quant.apply(x, scale, u), _Quant.apply(x, scale, s)
        assert qu.dtype == torch.uint8 and qs.dtype == torch.int8
        assert torch.equal(qu.int() - 128, qs.int())
        assert qs.min() == -128 and qs.max() == 127  # both ends saturate, as on the uint8 grid


def test_export_puts_keys_values_on_the_shifted_grid(exports, fake_quant):
    """Encoder self-attention keys/values are quantized with the observers' (scale, zero point - 128) in
    int8; the cross K/V the encoder hands over with the observers' own uint8 (scale, zero point)."""
    from onnx import numpy_helper

    from qat.onnx_export import quant_plan

    plan = quant_plan(fake_quant[0])
    g = onnx.load(str(exports["qdq"] / "encoder.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    inits.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    inits.update({n.output[0]: inits[n.input[0]] for n in g.node if n.op_type == "Identity"})  # the exporter's dedup
    quant = {n.output[0]: (float(inits[n.input[1]]), inits[n.input[2]]) for n in g.node if n.op_type == "QuantizeLinear"}
    for i in range(2):  # cross_key_i / cross_value_i: the decoder layer's qk / pv quantizer, uint8
        for out, mm in ((f"cross_key_{i}", "qk"), (f"cross_value_{i}", "pv")):
            scale, zp = quant[out]
            b = plan.matmuls[f"model.decoder.layers.{i}.encoder_attn.{mm}"][1]
            assert zp.dtype == np.uint8 and (scale, int(zp)) == (np.float32(b.scale), b.zero_point)
    signed = sorted((scale, int(zp) + 128) for scale, zp in quant.values() if zp.dtype == np.int8)
    want = sorted((float(np.float32(b.scale)), b.zero_point) for name, (_, b) in plan.matmuls.items()
                  if name.startswith("model.encoder."))
    assert len(want) == 2 * 2 and signed == sorted(want * 4)  # qk, pv of 2 layers, once per head (4 heads)


def test_session_options_stop_spinning_and_keep_int8_on_vnni(exports):
    so = session_options(3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    if cpu_has_vnni():  # signed int8 kept
        assert so.get_session_config_entry("session.qdqisint8allowed") == "1"
    else:  # ORT's default stands
        with pytest.raises(Exception, match="does not have configuration"):
            so.get_session_config_entry("session.qdqisint8allowed")
    if int8_kernels_exact():  # ORT's own int8 kernels, the fastest, already exact
        with pytest.raises(Exception, match="does not have configuration"):
            so.get_session_config_entry("session.x64quantprecision")
    else:  # x86 without VNNI: exact int8 sums
        assert so.get_session_config_entry("session.x64quantprecision") == "1"
    e = OnnxEngine(exports["qdq"], threads=3)  # both of the engine's sessions are built from it
    for sess in (e.encoder, e.decoder):
        assert sess.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
        assert sess.get_session_options().intra_op_num_threads == 3


@pytest.mark.parametrize("vnni, exact, signed, exact_sums", [
    (True, True, True, False),    # x86 with VNNI: signed int8 kept, ORT's fastest kernels (already exact)
    (False, False, False, True),  # x86 without VNNI: ORT's int8 -> uint8 rewrite kept, exact sums asked for
    (False, True, False, False),  # ARM: both of ORT's defaults
])
def test_session_options_on_each_kind_of_cpu(monkeypatch, vnni, exact, signed, exact_sums):
    import slim.export_format as ef

    monkeypatch.setattr(ef, "cpu_has_vnni", lambda: vnni)
    monkeypatch.setattr(ef, "int8_kernels_exact", lambda: exact)
    so = ef.session_options(2)
    for key, want in (("session.qdqisint8allowed", signed), ("session.x64quantprecision", exact_sums)):
        if want:
            assert so.get_session_config_entry(key) == "1"
        else:
            with pytest.raises(Exception, match="does not have configuration"):
                so.get_session_config_entry(key)


def test_each_int8_weight_has_its_own_zero_point(exports):
    """ORT's exact-sum rewrite for x86 without VNNI (session.x64quantprecision) fails to load a graph where two
    int8 weights share a zero-point initializer, which the TorchScript exporter makes of equal constants."""
    from qat.onnx_export import _WEIGHT_ZERO_POINT

    for f in ("encoder.onnx", "decoder.onnx"):
        g = onnx.load(str(exports["qdq"] / f)).graph
        inits = {i.name: i for i in g.initializer}
        source = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}
        zero_points = []
        for n in g.node:
            if n.op_type in _WEIGHT_ZERO_POINT:
                w, z = _WEIGHT_ZERO_POINT[n.op_type]
                if source.get(n.input[w], n.input[w]) in inits and z < len(n.input):
                    zero_points.append(source.get(n.input[z], n.input[z]))
        int8 = [z for z in zero_points if inits[z].data_type == onnx.TensorProto.INT8]
        assert len(int8) >= 2 * 6 and len(set(int8)) == len(int8)


def _attention_b_zero_points(onnx_path) -> list[int]:
    """dtypes of the B zero points of the int8 attention kernels ORT runs (B computed at run time)."""
    g = optimized_graph(onnx_path).graph
    inits = {i.name: i for i in g.initializer}
    b = {"MatMulIntegerToFloat": 1, "QLinearMatMul": 3}  # input index of B; its zero point is input 5 in both
    return [inits[n.input[5]].data_type for n in g.node if n.op_type in b and n.input[b[n.op_type]] not in inits]


@pytest.mark.skipif(not cpu_has_vnni(), reason="ORT keeps int8 activations signed only with VNNI")
def test_encoder_attention_runs_u8_by_s8_kernels_on_vnni(exports):
    """Every encoder attention kernel multiplies uint8 queries/probabilities by int8 keys/values (VPDPBUSD),
    not u8 x u8 (ORT's rewrite without the session option): its B zero point is int8."""
    assert _attention_b_zero_points(exports["qdq"] / "encoder.onnx") == [onnx.TensorProto.INT8] * (2 * 2 * 4)


def test_decoder_reads_the_cross_keys_values_as_uint8(exports):
    """The cross K/V cross graphs as uint8: as a graph input they have no Q/DQ pair ORT could rewrite, and
    uint8 x int8 would run on VPMADDUBSW (16-bit sums that can saturate) on x86 CPUs without VNNI."""
    assert _attention_b_zero_points(exports["qdq"] / "decoder.onnx") == [onnx.TensorProto.UINT8] * (2 * 2)


def test_qdq_export_agrees_with_the_fake_quant_model(exports, fake_quant, feats):
    r = parity(fake_quant[0], exports["qdq"], feats, threads=1, max_new_tokens=NEW)
    assert r["tokens_torch"] == len(feats) * NEW
    assert r["token_agreement"] >= 0.99


def test_per_row_linear_inputs_export_as_integer_matmuls_that_agree_with_fake_quant(dense, feats, tmp_path):
    from slim.model import save_model

    ids = torch.tensor([[50257, 50362] + list(range(400, 420))] * len(feats))
    fq, cfg = _ptq(dense, feats, ids, dynamic=["*"])
    out = export_model(save_model(fq, tmp_path / "ptq", processor=tiny_random_processor(), quant=cfg.to_dict()),
                       tmp_path / "qdq", mode="qdq")
    enc, dec = int8_kernel_counts(out / "encoder.onnx"), int8_kernel_counts(out / "decoder.onnx")
    # every Linear one MatMulInteger on its input's per-row codes: encoder q, k, v, out, fc1, fc2 of 2 layers
    # and the cross k, v of 2 decoder layers; decoder qkv (fused), out, cross q, cross out, fc1, fc2 of 2
    # layers and the logits. The attention matmuls keep their calibrated grids (int8 kernels, no float MatMul
    # but the decoder's 2 per layer over its small float cache).
    assert enc.get("MatMulInteger", 0) == 2 * 6 + 2 * 2 and enc.get("MatMul", 0) == 0
    assert dec.get("MatMulInteger", 0) == 2 * 6 + 1 and dec.get("MatMul", 0) == 2 * 2
    assert enc.get("MatMulIntegerToFloat", 0) + enc.get("QLinearMatMul", 0) == 2 * 2 * 4
    r = parity(fq, out, feats, threads=1, max_new_tokens=NEW)
    assert r["tokens_torch"] == len(feats) * NEW and r["token_agreement"] >= 0.99


def test_outlier_channels_export_as_a_gather_and_a_float_matmul_that_agree_with_fake_quant(dense, exports, feats,
                                                                                           tmp_path):
    from slim.model import save_model

    ids = torch.tensor([[50257, 50362] + list(range(400, 420))] * len(feats))
    fq, cfg = _ptq(dense, feats, ids, outlier_channels=4, outlier_linears=["model.encoder.layers.*.fc2"])
    out = export_model(save_model(fq, tmp_path / "ptq", processor=tiny_random_processor(), quant=cfg.to_dict()),
                       tmp_path / "qdq", mode="qdq")
    graph = onnx.load(str(out / "encoder.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    for layer in range(2):
        chosen = fq.model.encoder.layers[layer].fc2.float_channels
        idx = onnx.numpy_helper.to_array(inits[f"t.model_encoder_layers_{layer}_fc2__fc"])
        assert idx.tolist() == chosen.tolist()
    # each fc2 still one int8 kernel (the int8 columns of the float channels are zero), plus a float MatMul
    # over the Gather of its 4 channels; the decoder is untouched
    enc, base = int8_kernel_counts(out / "encoder.onnx"), int8_kernel_counts(exports["qdq"] / "encoder.onnx")
    assert enc.get("MatMulIntegerToFloat", 0) == base.get("MatMulIntegerToFloat", 0)
    assert enc.get("MatMul", 0) == base.get("MatMul", 0) + 2 and enc.get("Gather", 0) == base.get("Gather", 0) + 2
    assert int8_kernel_counts(out / "decoder.onnx") == int8_kernel_counts(exports["qdq"] / "decoder.onnx")
    r = parity(fq, out, feats, threads=1, max_new_tokens=NEW)
    assert r["tokens_torch"] == len(feats) * NEW and r["token_agreement"] >= 0.99


def test_per_row_attention_probabilities_export_and_agree_with_fake_quant(dense, feats, tmp_path):
    import onnx

    from slim.model import save_model

    ids = torch.tensor([[50257, 50362] + list(range(400, 420))] * len(feats))
    fq, cfg = _ptq(dense, feats, ids, row_matmuls=["*.pv"])
    out = export_model(save_model(fq, tmp_path / "ptq", processor=tiny_random_processor(), quant=cfg.to_dict()),
                       tmp_path / "qdq", mode="qdq")
    for graph in ("encoder.onnx", "decoder.onnx"):
        m = onnx.load(str(out / graph)).graph
        names = {i.name for i in m.initializer}
        # the probabilities have no calibrated grid in the graph; the values keep theirs
        assert not any(n.endswith("pv__a_scale") for n in names)
        assert any(n.endswith("pv__bu_scale") for n in names)  # as uint8 codes: the integer P.V
        # their grids start at 0 (probabilities are >= 0): one row maximum per attention chain, no row minimum
        # (the decoder's one ReduceMin and one more ReduceMax: the logits' input, on a signed grid per row)
        ops = [n.op_type for n in m.node]
        chains = 2 * 4 if graph == "encoder.onnx" else 2 * 2
        assert (ops.count("ReduceMin"), ops.count("ReduceMax")) == ((0, chains) if graph == "encoder.onnx" else
                                                                    (1, chains + 1))
        # P.V is an integer matmul where V is on its grid as codes: the encoder's heads, the decoder's cross
        # attention (the shipped uint8 K/V); the decoder's self-attention reads its float cache
        assert ops.count("MatMulInteger") == (chains if graph == "encoder.onnx" else 2 + 1)  # + the logits
    r = parity(fq, out, feats, threads=1, max_new_tokens=NEW)
    assert r["tokens_torch"] == len(feats) * NEW and r["token_agreement"] >= 0.99


@pytest.mark.parametrize("float_convs", [[], ["model.encoder.conv1"], ["model.encoder.conv2"]])
def test_qdq_export_runs_the_quantized_conv_front_end_as_int8_gemms(float_convs, dense, feats, tmp_path):
    """quant.conv: no float Conv left in the encoder ORT runs (two more int8 GEMMs, over the windows of the
    uint8 codes; one with either conv excluded); the encoder output and the greedy tokens follow the fake-quant
    model. A float export of the same model is the float model: no fake quant traced into it."""
    import onnxruntime as ort

    from slim.model import save_model

    ids = torch.tensor([[50257, 50362] + list(range(400, 420))] * len(feats))
    fq, cfg = _ptq(dense, feats, ids, conv=True, exclude=float_convs)
    d = export_model(save_model(fq, tmp_path / "fq", quant=cfg.to_dict()), tmp_path / "qdq", mode="qdq")
    enc = int8_kernel_counts(d / "encoder.onnx")
    assert enc.get("Conv", 0) == len(float_convs)
    assert enc.get("MatMulIntegerToFloat", 0) + enc.get("QLinearMatMul", 0) == \
        2 * (6 + 2 * 4) + 2 * 2 + 2 - len(float_convs)
    x = np.stack(feats)

    def encoder(path):
        return ort.InferenceSession(str(path / "encoder.onnx"), session_options(1),
                                    providers=["CPUExecutionProvider"]).run(None, {"input_features": x})[0]

    with torch.no_grad():
        hidden = fq.model.encoder(torch.tensor(x)).last_hidden_state.numpy()
        float_hidden = dense.model.encoder(torch.tensor(x)).last_hidden_state.numpy()
    assert np.abs(encoder(d) - hidden).max() <= 1e-3 * np.abs(hidden).max()
    assert parity(fq, d, feats, threads=1, max_new_tokens=NEW)["token_agreement"] >= 0.99
    if not float_convs:
        assert np.abs(encoder(export_model(fq, tmp_path / "float", mode="float")) - float_hidden).max() <= 1e-4


def test_parity_command_reports_agreement_wer_and_the_noise_floor(exports, tmp_path, capsys, monkeypatch):
    import soundfile as sf

    from eval.onnx_engine import main as parity_main

    g = np.random.default_rng(0)
    for name in ("a", "b"):
        sf.write(tmp_path / f"{name}.wav", (0.1 * g.standard_normal(16000)).astype(np.float32), 16000)
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "text": "one two"}\n{"audio": "b.wav", "text": "three"}\n')
    fq_dir = exports["qdq"].parent / "ptq"  # the fake-quant model the qdq export was made from
    assert parity_main([str(exports["qdq"]), "--data", str(tmp_path / "m.jsonl"), "--torch", str(fq_dir),
                        "--threads", "1", "--out", str(tmp_path / "p.json")]) == 0
    r = json.loads((tmp_path / "p.json").read_text())
    assert json.loads(capsys.readouterr().out) == r
    assert r["utterances"] == 2 and r["mode"] == "qdq"
    # the same figures, recomputed here from the engine: plain and nudged tokens within the token budget
    from slim.decoding import token_budget
    from eval.metrics import word_error_rate
    from eval.onnx_engine import NUDGE, agreement

    e = OnnxEngine(exports["qdq"], threads=1)
    clips = [sf.read(tmp_path / f"{name}.wav", dtype="float32")[0] for name in ("a", "b")]
    feats = [e.features([c]) for c in clips]
    plain = [t for f, c in zip(feats, clips) for t in e.generate_tokens(f, token_budget([c]))]
    nudged = [t for f, c in zip(feats, clips) for t in e.generate_tokens(f * np.float32(1 + NUDGE), token_budget([c]))]
    floor = agreement(plain, nudged)
    assert r["onnx"]["token_agreement_with_itself_nudged"] == floor["token_agreement"]
    assert r["onnx"]["exact_match_nudged"] == floor["exact_match"]
    assert r["onnx"]["wer"] == word_error_rate(["one two", "three"], e.decode_text(plain))
    assert r["onnx"]["wer_nudged"] == word_error_rate(["one two", "three"], e.decode_text(nudged))
    eos = e.decode.eos_token_id
    picks = [t for f, p in zip(feats, plain) for t in e.generate_tokens(f * np.float32(1 + NUDGE), forced=[p])]
    budgets = [token_budget([c]) for c in clips]
    assert r["onnx"]["next_token_agreement_with_itself_nudged"] == next_token_agreement(plain, picks, eos, budgets)
    fq = r[str(fq_dir)]
    assert set(fq) == {"wer", "token_agreement_with_onnx", "exact_match", "next_token_agreement_with_onnx"}
    assert fq["token_agreement_with_onnx"] >= 0.9 and fq["next_token_agreement_with_onnx"] >= 0.9
    # and recomputed from the fake-quant model as the command loads it
    from qat.onnx_export import load_source_model

    model = load_source_model(fq_dir)[0]
    tokens = [t for f, n in zip(feats, budgets) for t in torch_greedy_tokens(model, f, e.decode, n)]
    picks = [t for f, ref in zip(feats, tokens) for t in e.generate_tokens(f, forced=[ref])]
    assert fq["next_token_agreement_with_onnx"] == next_token_agreement(tokens, picks, eos, budgets)
    assert fq["token_agreement_with_onnx"] == agreement(tokens, plain)["token_agreement"]
    assert fq["wer"] == word_error_rate(["one two", "three"], e.decode_text(tokens))
    # --torch-floor: also the fake-quant model against itself on the nudged input, the rest unchanged. This
    # random model's tokens hardly depend on its input, so the torch decoder's inputs are recorded as well
    import eval.onnx_engine

    seen = []

    def recording(model, features, *args, **kwargs):
        seen.append((np.asarray(features).copy(), kwargs.get("forced")))
        return torch_greedy_tokens(model, features, *args, **kwargs)

    monkeypatch.setattr(eval.onnx_engine, "torch_greedy_tokens", recording)
    assert parity_main([str(exports["qdq"]), "--data", str(tmp_path / "m.jsonl"), "--torch", str(fq_dir),
                        "--threads", "1", "--torch-floor", "--out", str(tmp_path / "p2.json")]) == 0
    fq2 = json.loads((tmp_path / "p2.json").read_text())[str(fq_dir)]
    assert {k: fq2[k] for k in fq} == fq
    nudged_feats = [f * np.float32(1 + NUDGE) for f in feats]
    # every clip's own tokens; then per clip free running and teacher forced (its own tokens) on the nudged input
    assert len(seen) == 3 * len(feats)
    for (a, forced), f in zip(seen, feats):
        assert np.array_equal(a, f) and forced is None
    for k, (f, g, ref) in enumerate(zip(feats, nudged_feats, tokens)):
        (b, fb), (c, fc) = seen[len(feats) + 2 * k: len(feats) + 2 * k + 2]
        assert np.array_equal(b, g) and not np.array_equal(b, f) and fb is None
        assert np.array_equal(c, g) and fc == [ref]
    own = [t for f, n in zip(nudged_feats, budgets) for t in torch_greedy_tokens(model, f, e.decode, n)]
    assert fq2["token_agreement_with_itself_nudged"] == agreement(tokens, own)["token_agreement"]
    assert fq2["exact_match_nudged"] == agreement(tokens, own)["exact_match"]
    picks = [t for f, ref in zip(nudged_feats, tokens) for t in torch_greedy_tokens(model, f, e.decode, forced=[ref])]
    assert fq2["next_token_agreement_with_itself_nudged"] == next_token_agreement(tokens, picks, eos, budgets)


def test_qdq_needs_quantizer_state(dense, tmp_path):
    with pytest.raises(ValueError, match="no quantizers"):
        export_model(dense, tmp_path / "x", mode="qdq")
    with pytest.raises(ValueError, match="mode must be one of"):
        export_model(dense, tmp_path / "x", mode="int4")
    assert not (tmp_path / "x").exists()


def test_token_agreement_counts_edits():
    assert token_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert token_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75
    assert token_agreement([[1, 2, 3, 4], []], [[1, 2, 3], []]) == 0.75


def test_broken_export_dir_errors_name_the_file(exports, tmp_path):
    src = exports["float"]

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    with pytest.raises(ExportDirError, match="does not exist"):
        OnnxEngine(tmp_path / "nowhere")
    d = fresh("no_config")
    (d / "export_config.json").unlink()
    with pytest.raises(ExportDirError, match=r"export_config.json: missing"):
        OnnxEngine(d)
    d = fresh("bad_config")
    (d / "export_config.json").write_text("{not json")
    with pytest.raises(ExportDirError, match=r"export_config.json: corrupt"):
        OnnxEngine(d)
    d = fresh("missing")
    (d / "decoder.onnx").unlink()
    with pytest.raises(ExportDirError, match=r"decoder.onnx: missing"):
        OnnxEngine(d)
    d = fresh("truncated")
    data = (d / "encoder.onnx").read_bytes()
    (d / "encoder.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportDirError, match=r"encoder.onnx: has \d+ bytes"):
        OnnxEngine(d)
    d = fresh("flipped")
    data = bytearray((d / "tokenizer.json").read_bytes())
    data[100] ^= 0xFF
    (d / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ExportDirError, match=r"tokenizer.json: sha256 does not match"):
        OnnxEngine(d)
    # a graph ORT cannot parse, with a config that vouches for it: ORT's error, re-raised with the file name
    d = fresh("unparsable")
    (d / "decoder.onnx").write_bytes(b"\x08\x07garbage" * 10)
    cfg = json.loads((d / "export_config.json").read_text())
    cfg["files"]["decoder.onnx"] = file_digest(d / "decoder.onnx")
    (d / "export_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportDirError, match=r"decoder.onnx: ONNX Runtime cannot load it"):
        OnnxEngine(d)
    # a valid graph from another export (other layers' caches) with a config that vouches for it
    d = fresh("mismatched")
    shutil.copy(exports["uneven"] / "decoder.onnx", d / "decoder.onnx")
    cfg = json.loads((d / "export_config.json").read_text())
    cfg["files"]["decoder.onnx"] = file_digest(d / "decoder.onnx")
    (d / "export_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportDirError, match=r"decoder.onnx: lacks \['past_key_1'"):
        OnnxEngine(d)


# ---------------------------------------------------------------------------------------------


@pytest.mark.real
def test_tiny_en_exports_transcribe_real_speech(tmp_path):
    import soundfile as sf
    import soxr

    from eval.metrics import word_error_rate
    from slim.model import load_model
    from slim.sources import import_model

    src = import_model("tiny.en", tmp_path / "tiny.en")
    model = load_model(src)
    items = [json.loads(line) for line in (REAL_SPEECH / "manifest.jsonl").read_text().splitlines()]
    audios = []
    for it in items:
        a, sr = sf.read(REAL_SPEECH / it["audio"], dtype="float32")
        audios.append(a if sr == 16000 else soxr.resample(a, sr, 16000))
    fl = OnnxEngine(export_model(src, tmp_path / "float", mode="float"), threads=2)
    feats = fl.features(audios)
    assert parity(model, None, list(feats[:3]), engine=fl)["exact_match"] == 1.0

    from slim.model import load_processor

    processor = load_processor(src)
    tok = processor.tokenizer
    ids = [tok(items[i]["text"]).input_ids for i in range(2)]
    ids = torch.tensor([t + [50256] * (max(map(len, ids)) - len(t)) for t in ids])
    fq, _ = _ptq(model, list(feats[:2]), ids)
    q = OnnxEngine(export_model(fq, tmp_path / "qdq", mode="qdq", processor=processor), threads=2)
    safetensors = (src / "model.safetensors").stat().st_size
    assert q.graph_bytes <= 0.27 * safetensors
    refs = [it["text"] for it in items]
    wer_float = word_error_rate(refs, fl.transcribe(audios))
    wer_qdq = word_error_rate(refs, q.transcribe(audios))
    assert wer_float <= 0.06
    assert wer_qdq <= wer_float + 0.03


def test_transcribe_stops_at_the_token_budget(exports):
    """Without max_new_tokens, decoding still stops at slim.decoding.token_budget (random weights never
    emit end-of-text, so they would otherwise run to the decoder's 448 positions)."""
    from slim.decoding import token_budget

    e = OnnxEngine(exports["float"], threads=1)
    seen = []
    generate = e.generate_tokens
    e.generate_tokens = lambda f, n=None: seen.append(n) or generate(f, n)
    clip = np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.1
    e.transcribe([clip])
    assert seen == [token_budget([clip])] and seen[0] < 448
    assert e.timings.tokens <= seen[0]
