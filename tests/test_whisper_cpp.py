"""benchmarks/convert_ggml.py and benchmarks/whisper_cpp.py on a tiny random Whisper.

The ggml file is read back here by a reader written from whisper.cpp's `whisper_model_load` (independently
of the converter's own `read_header`), then loaded and run by whisper.cpp itself (pywhispercpp, in the
`bench` extra).
"""

import struct
import sys

import numpy as np
import pytest

# no importorskip: pywhispercpp is in the `bench` extra, which `./launch.sh test` installs; missing, this fails
import pywhispercpp  # noqa: E402,F401

from uneven import ROOT, uneven_model  # noqa: E402

sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks.convert_ggml import ConversionError, convert, main  # noqa: E402
from benchmarks.whisper_cpp import WhisperCppEngine, window_audio_ctx  # noqa: E402
from slim.mel import LogMel  # noqa: E402
from slim.model import save_model  # noqa: E402
from slim.sources import tiny_random_processor, tiny_random_whisper  # noqa: E402

# whisper.cpp builds FFN = 4 * d_model, so the random model's FFN is widened from its 128 default
SHAPE = dict(encoder_ffn_dim=256, decoder_ffn_dim=256)


def read_ggml(path):
    """(hparams in file order, mel filters, tokens, {name: (type id, array)}); asserts the file is consumed."""
    data = open(path, "rb").read()
    pos = 0

    def ints(n):
        nonlocal pos
        out = struct.unpack_from(f"<{n}i", data, pos)
        pos += 4 * n
        return out

    header = ints(12)
    n_mel, n_fft = ints(2)
    filters = np.frombuffer(data, "<f4", n_mel * n_fft, pos).reshape(n_mel, n_fft)
    pos += 4 * n_mel * n_fft
    tokens = []
    for _ in range(ints(1)[0]):
        (n,) = ints(1)
        tokens.append(data[pos:pos + n])
        pos += n
    tensors = {}
    while pos < len(data):
        n_dims, name_len, ttype = ints(3)
        ne = ints(n_dims)
        name = data[pos:pos + name_len].decode()
        pos += name_len
        dtype = {0: "<f4", 1: "<f2"}[ttype]
        count = int(np.prod(ne))
        tensors[name] = (ttype, np.frombuffer(data, dtype, count, pos).reshape(ne[::-1]))
        pos += count * np.dtype(dtype).itemsize
    assert pos == len(data)
    return header, filters, tokens, tensors


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ggml")
    model = tiny_random_whisper(seed=0, **SHAPE)
    return save_model(model, d / "hf", processor=tiny_random_processor()), model


@pytest.mark.parametrize("ftype", ["f16", "f32"])
def test_layout(model_dir, tmp_path, ftype):
    d, model = model_dir
    out = convert(d, tmp_path / "model.bin", ftype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # no temp file left behind
    header, filters, tokens, tensors = read_ggml(out)
    c = model.config
    assert header == (0x67676D6C, c.vocab_size, c.max_source_positions, c.d_model, c.encoder_attention_heads,
                      c.encoder_layers, c.max_target_positions, c.d_model, c.decoder_attention_heads,
                      c.decoder_layers, c.num_mel_bins, {"f32": 0, "f16": 1}[ftype])
    np.testing.assert_allclose(filters, LogMel().filters().T, rtol=1e-6)
    # the byte-level BPE vocabulary as raw bytes, without the added special tokens
    assert len(tokens) == 50257 and tokens[220] == b" " and tokens[50256] == b"<|endoftext|>"
    assert tokens[1169] == b"the"

    # every tensor whisper.cpp creates (7 + 4 top-level, 15 per encoder layer, 24 per decoder layer), no more
    assert len(tensors) == 7 + 4 + 15 * c.encoder_layers + 24 * c.decoder_layers
    sd = model.state_dict()
    pairs = {"encoder.conv1.weight": "model.encoder.conv1.weight",
             "encoder.conv2.bias": "model.encoder.conv2.bias",
             "encoder.positional_embedding": "model.encoder.embed_positions.weight",
             "encoder.blocks.1.attn.key.weight": "model.encoder.layers.1.self_attn.k_proj.weight",
             "decoder.blocks.0.cross_attn.value.bias": "model.decoder.layers.0.encoder_attn.v_proj.bias",
             "decoder.blocks.1.mlp.2.weight": "model.decoder.layers.1.fc2.weight",
             "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
             "decoder.ln.weight": "model.decoder.layer_norm.weight"}
    for name, hf in pairs.items():
        ttype, x = tensors[name]
        ref = sd[hf].numpy()
        if name.endswith("conv2.bias"):
            ref = ref.reshape(-1, 1)
        f16 = ftype == "f16" and ref.ndim >= 2 and "positional" not in name and "bias" not in name
        assert ttype == int(f16), name
        np.testing.assert_array_equal(x, ref.astype(np.float16 if f16 else np.float32), err_msg=name)


def test_whisper_cpp_runs(model_dir, tmp_path):
    d, _ = model_dir
    out = convert(d, tmp_path / "model.bin")
    clip = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1  # 1 s
    full = WhisperCppEngine(out, threads=1)
    assert full.name == "whisper.cpp" and full.model_bytes == out.stat().st_size and full.n_audio_ctx == 1500
    short = WhisperCppEngine(out, threads=1, audio_ctx_for=window_audio_ctx(1.0))
    for engine, ctx in ((full, 1500), (short, 100)):  # ceil(1 s) + 1 s = 2 s = 100 encoder frames
        texts = engine.transcribe([clip])
        assert len(texts) == 1 and isinstance(texts[0], str)
        assert engine.last_audio_ctx == [ctx]
    assert WhisperCppEngine(out, threads=1, audio_ctx=300).name == "whisper.cpp-ctx300"
    with pytest.raises(ValueError, match="audio_ctx 1501"):
        WhisperCppEngine(out, threads=1, audio_ctx=1501)
    # an all-f32 file loads, but whisper.cpp would abort the process at the first encode: refused up front
    with pytest.raises(ValueError, match="all-f32"):
        WhisperCppEngine(convert(d, tmp_path / "f32.bin", "f32"), threads=1)


def test_refuses_pruned_and_broken(tmp_path, capsys):
    pruned = save_model(uneven_model(tiny_random_whisper(seed=0)), tmp_path / "pruned")
    with pytest.raises(ConversionError, match="pruned or quantization-aware.*uniform layers"):
        convert(pruned, tmp_path / "p.bin")
    assert main([str(pruned), str(tmp_path / "p.bin")]) == 1
    assert "uniform layers" in capsys.readouterr().err
    assert not (tmp_path / "p.bin").exists()

    # a dense model whose FFN is not 4 * d_model: whisper.cpp cannot build it either
    narrow = save_model(tiny_random_whisper(seed=0), tmp_path / "narrow", processor=tiny_random_processor())
    with pytest.raises(ConversionError, match="encoder_ffn_dim=128"):
        convert(narrow, tmp_path / "n.bin")
    with pytest.raises(ConversionError, match="model.safetensors: missing"):
        (narrow / "model.safetensors").unlink()
        convert(narrow, tmp_path / "n.bin")

    (tmp_path / "junk.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="could not load"):
        WhisperCppEngine(tmp_path / "junk.bin")
