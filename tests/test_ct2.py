"""The CTranslate2 reader against model.bin files written here from a tiny random HF Whisper.

The writer below follows the documented format and CTranslate2's Whisper naming independently of
`slim.ct2`, so a round trip checks both the parser and the variable mapping.
"""

import json
import re
import shutil
import struct

import pytest
import torch

from slim.ct2 import dequantize, load_ct2, model_files, read_model_bin
from slim.sources import import_model, shortcut_files, tiny_random_whisper

CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def write_model_bin(path, variables, aliases=(), spec="WhisperSpec", version=6, revision=3):
    out = [struct.pack("<I", version), _string(spec), struct.pack("<II", revision, len(variables))]
    for name, t in sorted(variables.items()):
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [_string(name), struct.pack("<B", t.dim()), struct.pack(f"<{t.dim()}I", *t.shape),
                struct.pack("<BI", CT2_DTYPE_IDS[t.dtype], len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    out += [_string(a) + _string(b) for a, b in aliases]
    path.write_bytes(b"".join(out))
    return path


def ct2_variables(model, dtype=torch.float32):
    """HF Whisper -> CT2 WhisperSpec variables (fused Q/K/V, zero K bias), laid out as CT2's converter does."""
    sd, c, v = model.state_dict(), model.config, {}

    def lin(ct2, hf):
        v[f"{ct2}/weight"], v[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def norm(ct2, hf):
        v[f"{ct2}/gamma"], v[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2, hf, names):
        v[f"{ct2}/weight"] = torch.cat([sd[f"{hf}.{n}.weight"] for n in names])
        v[f"{ct2}/bias"] = torch.cat([sd.get(f"{hf}.{n}.bias", torch.zeros(c.d_model)) for n in names])

    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    for i in range(c.encoder_layers):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ["q_proj", "k_proj", "v_proj"])
        lin(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        lin(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        lin(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(c.decoder_layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ["q_proj", "k_proj", "v_proj"])
        lin(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        lin(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ["k_proj", "v_proj"])
        lin(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        lin(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        lin(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    v = {k: t.to(dtype) for k, t in v.items()}
    i8, i16 = (lambda x: torch.tensor(x, dtype=torch.int8)), (lambda x: torch.tensor(x, dtype=torch.int16))
    v.update({"encoder/num_heads": i16(c.encoder_attention_heads), "decoder/num_heads": i16(c.decoder_attention_heads),
              "decoder/activation": i8(3), "decoder/pre_norm": i8(1), "decoder/scale_embeddings": i8(0),
              "decoder/alibi": i8(0), "decoder/start_from_zero_embedding": i8(0),
              "decoder/alignment_layer": i16(-1), "decoder/alignment_heads": i16(1)})
    return v


ALIASES = [("decoder/projection/weight", "decoder/embeddings/weight")]


def write_ct2_dir(d, model, dtype=torch.float32, tokenizer="tiny.en", ct2_config=None, variables=None):
    d.mkdir(parents=True, exist_ok=True)
    write_model_bin(d / "model.bin", variables or ct2_variables(model, dtype), ALIASES)
    src, _ = shortcut_files(tokenizer)
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    cfg = ct2_config or {"alignment_heads": [[1, 0], [1, 3]], "lang_ids": [], "suppress_ids": [1, 2, 50361],
                         "suppress_ids_begin": [220, 50256]}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_whisper(seed=3)


@pytest.fixture(scope="module")
def ct2_dir(tiny, tmp_path_factory):
    return write_ct2_dir(tmp_path_factory.mktemp("ct2") / "tiny", tiny)


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if name in p.name]


def test_reader_returns_exact_tensors(tiny, ct2_dir):
    raw = read_model_bin(ct2_dir / "model.bin")
    want = ct2_variables(tiny)
    assert (raw.spec, raw.revision, raw.version) == ("WhisperSpec", 3, 6)
    assert set(raw.variables) == set(want) | {"decoder/projection/weight"}
    for name, t in want.items():
        assert raw.variables[name].dtype == t.dtype and torch.equal(raw.variables[name], t), name
    assert raw.variables["decoder/projection/weight"] is raw.variables["decoder/embeddings/weight"]


def test_load_ct2_round_trips_model_exactly(tiny, ct2_dir):
    model, processor = load_ct2(ct2_dir)
    assert model.dtype == torch.float32
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    ref = tiny.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.decoder_attention_heads,
            c.encoder_ffn_dim, c.decoder_ffn_dim, c.vocab_size, c.num_mel_bins, c.max_source_positions,
            c.max_target_positions) == (64, 2, 2, 4, 4, 128, 128, 51864, 80, 1500, 448)
    assert (c.decoder_start_token_id, c.eos_token_id, c.pad_token_id) == (50257, 50256, 50256)
    g = model.generation_config
    assert g.is_multilingual is False and not hasattr(g, "lang_to_id")
    assert (g.no_timestamps_token_id, g.max_length, g.suppress_tokens, g.begin_suppress_tokens,
            g.alignment_heads) == (50362, 448, [1, 2, 50361], [220, 50256], [[1, 0], [1, 3]])
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    dec = torch.tensor([[50257, 50362, 400, 500]])
    with torch.no_grad():
        assert torch.equal(model(input_features=feats, decoder_input_ids=dec).logits,
                           tiny(input_features=feats, decoder_input_ids=dec).logits)
        out = model.generate(feats, max_new_tokens=3, return_dict_in_generate=True).sequences
    assert out[0, :2].tolist() == [50257, 50362]  # English-only prompt, no timestamps
    assert processor.feature_extractor.feature_size == 80
    assert processor.tokenizer.decode([50257, 50362, 18435, 995, 50256], skip_special_tokens=True) == " Hello world"


def test_float16_and_int8_weights(tiny, tmp_path):
    write_ct2_dir(tmp_path / "f16", tiny, dtype=torch.float16)
    model, _ = load_ct2(tmp_path / "f16")
    w = tiny.model.encoder.layers[1].fc1.weight
    assert torch.equal(model.model.encoder.layers[1].fc1.weight, w.half().float())

    # CTranslate2 int8: per-row scale = 127 / max|w|, q = round(w * scale); the reader divides back. The
    # output projection is aliased to the embedding before quantization, so only the embedding has a scale.
    v = ct2_variables(tiny)
    for name in ("decoder/layer_1/ffn/linear_0/weight", "decoder/embeddings/weight", "encoder/conv2/weight"):
        scale = 127.0 / v[name].abs().reshape(len(v[name]), -1).amax(dim=1)
        v[name] = torch.round(v[name] * scale.reshape(-1, *[1] * (v[name].dim() - 1))).to(torch.int8)
        v[name + "_scale"] = scale
    write_ct2_dir(tmp_path / "i8", tiny, variables=v)
    model, _ = load_ct2(tmp_path / "i8")
    got = model.model.decoder.layers[1].fc1.weight
    scale = v["decoder/layer_1/ffn/linear_0/weight_scale"]
    assert torch.equal(got, v["decoder/layer_1/ffn/linear_0/weight"].float() / scale[:, None])
    assert (got - tiny.model.decoder.layers[1].fc1.weight).abs().max() <= 0.5 / scale.min()
    emb = v["decoder/embeddings/weight"].float() / v["decoder/embeddings/weight_scale"][:, None]
    assert torch.equal(model.model.decoder.embed_tokens.weight, emb)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    conv = v["encoder/conv2/weight"].float() / v["encoder/conv2/weight_scale"][:, None, None]
    assert torch.equal(model.model.encoder.conv2.weight, conv)
    int16 = {"w": torch.tensor([[2, -4]], dtype=torch.int16), "w_scale": torch.tensor(2.0)}  # one scalar scale
    out = dequantize(int16)
    assert list(out) == ["w"] and out["w"].tolist() == [[1.0, -2.0]]


def test_split_parts_read_as_one_stream(tiny, ct2_dir, tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(ct2_dir / f, d / f)
    data = (ct2_dir / "model.bin").read_bytes()
    cut = len(data) // 3 + 7  # in the middle of some variable's data
    (d / "model.bin.part1").write_bytes(data[:cut])
    (d / "model.bin.part2").write_bytes(data[cut:2 * cut])
    (d / "model.bin.part10").write_bytes(b"")  # numeric, not lexical, order
    (d / "model.bin.part3").write_bytes(data[2 * cut:])
    assert [p.name for p in model_files(d)] == ["model.bin.part1", "model.bin.part2", "model.bin.part3",
                                                  "model.bin.part10"]
    model, _ = load_ct2(d)
    assert torch.equal(model.model.decoder.layers[1].fc2.weight, tiny.model.decoder.layers[1].fc2.weight)
    assert not (d / "model.bin").exists()  # the parts are never joined on disk
    with pytest.raises(ValueError, match=r"part1\+.*part2: truncated"):
        read_model_bin([d / "model.bin.part1", d / "model.bin.part2"])


@pytest.mark.parametrize("keep", [3, 9, 40, 0.5, -3])
def test_truncated_model_bin_is_a_clear_error_and_leaves_nothing(ct2_dir, tmp_path, keep):
    d = tmp_path / "broken"
    shutil.copytree(ct2_dir, d)
    data = (d / "model.bin").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    (d / "model.bin").write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"model\.bin: truncated: .* needs \d+ bytes at byte \d+, but the file ends"):
        load_ct2(d)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="truncated"):
        import_model(d, out)
    assert not out.exists() and _no_leftovers(tmp_path, "out") == []


def test_foreign_files_are_clear_errors(ct2_dir, tmp_path, tiny):
    d = tmp_path / "foreign"
    shutil.copytree(ct2_dir, d)
    (d / "model.bin").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(ValueError, match=r"model\.bin: not a CTranslate2 model\.bin this reader knows"):
        load_ct2(d)
    write_model_bin(d / "model.bin", {"x": torch.zeros(2)}, spec="TransformerSpec")
    with pytest.raises(ValueError, match=r"holds a CTranslate2 'TransformerSpec', not a Whisper model"):
        load_ct2(d)
    (d / "model.bin").write_bytes(struct.pack("<I", 6) + struct.pack("<H", 5) + b"\xff\xfe\xfd\xfc\x00" + b"\0" * 8)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_ct2(d)
    huge = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, 1) + _string("w") + \
        struct.pack("<BIBI", 1, 1 << 29, 0, 1 << 31)  # 2 GiB declared, 40 bytes present: refused before allocating
    (d / "model.bin").write_bytes(huge)
    with pytest.raises(ValueError, match="truncated: the data of w needs 2147483648 bytes at byte 40"):
        load_ct2(d)
    v = ct2_variables(tiny)
    v["decoder/layer_0/extra/weight"] = torch.zeros(3)
    write_model_bin(d / "model.bin", v, ALIASES)
    with pytest.raises(ValueError, match=r"unexpected variables \['decoder/layer_0/extra/weight'\]"):
        load_ct2(d)
    v = ct2_variables(tiny)
    v["decoder/activation"] = torch.tensor(0, dtype=torch.int8)  # ReLU: a plain Transformer, not Whisper
    write_model_bin(d / "model.bin", v, ALIASES)
    with pytest.raises(ValueError, match="decoder/activation = 0, a Whisper model has 3"):
        load_ct2(d)
    write_model_bin(d / "model.bin", ct2_variables(tiny), ALIASES)
    shutil.copy(shortcut_files("base")[0] / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(ValueError, match=r"tokenizer\.json implies a vocabulary of 51865, but .*model\.bin has 51864"):
        load_ct2(d)
    shutil.copy(ct2_dir / "tokenizer.json", d / "tokenizer.json")
    with open(d / "model.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="unexpected bytes after the last alias"):
        load_ct2(d)


def test_missing_files_name_the_file(ct2_dir, tmp_path):
    for missing in ("tokenizer.json", "config.json", "model.bin"):
        d = tmp_path / missing
        shutil.copytree(ct2_dir, d)
        (d / missing).unlink()
        with pytest.raises(FileNotFoundError, match=re.escape(f"{d / missing}: missing") + "|"
                           + re.escape(f"{d}: no model.bin")):
            load_ct2(d)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_ct2(tmp_path / "nope")


def test_multilingual_ct2_gets_english_transcribe_prompt(tmp_path):
    model = tiny_random_whisper(seed=1, vocab_size=51865)
    cfg = {"alignment_heads": [[1, 2]], "lang_ids": list(range(50259, 50358)), "suppress_ids": [1],
           "suppress_ids_begin": [220, 50257]}
    d = write_ct2_dir(tmp_path / "ml", model, tokenizer="base", ct2_config=cfg)
    got, processor = load_ct2(d)
    g = got.generation_config
    assert g.is_multilingual is True and (g.language, g.task) == ("en", "transcribe")
    assert g.lang_to_id["<|en|>"] == 50259 and g.lang_to_id["<|de|>"] == 50261 and len(g.lang_to_id) == 99
    assert g.task_to_id == {"translate": 50358, "transcribe": 50359} and g.no_timestamps_token_id == 50363
    assert got.config.decoder_start_token_id == 50258 and got.config.eos_token_id == 50257
    feats = torch.zeros(1, 80, 3000)
    with torch.no_grad():
        out = got.generate(feats, max_new_tokens=2, return_dict_in_generate=True).sequences
    assert out[0, :4].tolist() == [50258, 50259, 50359, 50363]
    # training labels carry the same prompt as generation
    assert processor.tokenizer(" hi").input_ids[:4] == [50258, 50259, 50359, 50363]


@pytest.mark.parametrize("quantization", ["float16", "int8"])
def test_reads_what_ctranslate2_itself_writes(tiny, tmp_path, quantization):
    """The real converter (the `bench` extra) as the writer: exact for float16, within int8 rounding for int8."""
    converters = pytest.importorskip("ctranslate2.converters", reason="ctranslate2 is in the `bench` extra")
    from slim.sources import tiny_random_processor

    tiny.save_pretrained(tmp_path / "hf")
    tiny_random_processor().save_pretrained(tmp_path / "hf")
    converters.TransformersConverter(str(tmp_path / "hf"), copy_files=["tokenizer.json"]).convert(
        str(tmp_path / "ct2"), quantization=quantization)
    model, _ = load_ct2(tmp_path / "ct2")
    ref, got = tiny.state_dict(), model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        if quantization == "float16":
            assert torch.equal(got[k], ref[k].half().float()), k
        else:  # int8 matrices: at most half a quantization step off; vectors (norms, biases) stay float32
            tol = ref[k].abs().max() / 127 / 2 + 1e-6 if ref[k].dim() > 1 else 0
            assert (got[k] - ref[k]).abs().max() <= tol, k
