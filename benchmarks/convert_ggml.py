"""Convert a Hugging Face Whisper model directory into the single-file ggml model whisper.cpp loads.

    .venv/bin/python benchmarks/convert_ggml.py MODEL_DIR OUT.bin [--ftype f16|f32]

MODEL_DIR holds config.json, model.safetensors and the tokenizer (tokenizer.json or vocab.json), e.g. what
`./launch.sh import tiny.en DIR` writes. OUT.bin is the legacy "ggml" file (magic 0x67676d6c) that
whisper.cpp's `whisper_model_load` reads:

    int32 magic, then 11 int32 hparams: n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer,
          n_text_ctx, n_text_state, n_text_head, n_text_layer, n_mels, ftype (0 = f32, 1 = f16)
    int32 n_mel, int32 n_fft, then n_mel * n_fft float32: the mel filter bank (Slaney, 0-8 kHz)
    int32 n_tokens, then per token: int32 byte length + the token's raw bytes (the byte-level BPE vocabulary;
          whisper.cpp names the special and timestamp tokens above it itself)
    tensors until end of file: int32 n_dims, int32 name length, int32 type (0 = f32, 1 = f16),
          n_dims int32 sizes innermost first (numpy shape reversed), the name (OpenAI's naming), the data

Why: whisper.cpp can run the encoder on a shortened context (`audio_ctx` < 1500 frames) for short clips,
with weights never trained for it. That untrained truncation is the contrast our benchmarks draw with our
models trained for a shorter audio window, on the same tiny.en weights (benchmarks/whisper_cpp.py runs it).

--ftype f32 writes what whisper.cpp's loader asks for an all-f32 model (conv kernels included), but the
whisper.cpp that pywhispercpp 1.5.1 bundles (1.8.5) then aborts at the first encode: ggml_conv_1d always
makes an f16 im2col, which asserts on an f32 kernel. Benchmark with f16.

Only dense, unquantized models convert: whisper.cpp builds every layer with the same head count and a 4x
FFN, so a pruned or quantization-aware directory (one with slim_structure.json) is refused. Weights are
read with safetensors only; the output is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from slim.mel import LogMel  # noqa: E402

GGML_MAGIC = 0x67676D6C  # "ggml"
FTYPES = {"f32": 0, "f16": 1}  # the header's ftype and each tensor's type use these ids
HPARAM_FIELDS = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
                 "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype")
STRUCTURE_FILE = "slim_structure.json"
WEIGHTS_FILE = "model.safetensors"

# HF module names -> OpenAI's, inside a layer (encoder.blocks.N.* / decoder.blocks.N.*) and at the top level
LAYER_NAMES = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
TOP_NAMES = {
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "encoder.layer_norm.weight": "encoder.ln_post.weight", "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "decoder.layer_norm.weight": "decoder.ln.weight", "decoder.layer_norm.bias": "decoder.ln.bias",
}
# whisper.cpp keeps these in f32 whatever the ftype (besides every 1-D tensor)
F32_ALWAYS = {"encoder.positional_embedding", "decoder.positional_embedding", "encoder.conv1.bias",
              "encoder.conv2.bias"}


class ConversionError(ValueError):
    pass


def openai_name(hf: str) -> str | None:
    """OpenAI's name of an HF state-dict key, None for the output projection (tied to the token embedding)."""
    name = hf.removeprefix("model.")
    if name == "proj_out.weight":
        return None
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        side, i, module, kind = m.groups()
        if module not in LAYER_NAMES:
            raise ConversionError(f"{hf}: no whisper.cpp tensor for this parameter")
        return f"{side}.blocks.{i}.{LAYER_NAMES[module]}.{kind}"
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if re.fullmatch(r"encoder\.conv[12]\.(weight|bias)", name):
        return name
    raise ConversionError(f"{hf}: no whisper.cpp tensor for this parameter")


def hparams(config: dict, ftype: str) -> dict:
    """whisper.cpp's hparams from an HF WhisperConfig dict, after checking it has the shape whisper.cpp builds."""
    missing = [k for k in ("d_model", "vocab_size", "max_source_positions", "max_target_positions",
                           "encoder_layers", "decoder_layers", "encoder_attention_heads",
                           "decoder_attention_heads", "num_mel_bins") if k not in config]
    if missing:
        raise ConversionError(f"config.json: missing {', '.join(missing)} (not a Whisper config?)")
    c = config
    d = c["d_model"]
    # whisper.cpp's graph: one width for encoder and decoder, FFN = 4 * d_model, every layer alike
    for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        if c.get(key, 4 * d) != 4 * d:
            raise ConversionError(f"config.json: {key}={c[key]}, whisper.cpp supports only 4 * d_model ({4 * d})")
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        if d % c[key]:
            raise ConversionError(f"config.json: d_model {d} is not a multiple of {key}={c[key]}")
    if c.get("activation_function", "gelu") != "gelu" or c.get("scale_embedding", False):
        raise ConversionError("config.json: whisper.cpp supports only GELU and unscaled embeddings")
    return {
        "n_vocab": c["vocab_size"], "n_audio_ctx": c["max_source_positions"], "n_audio_state": d,
        "n_audio_head": c["encoder_attention_heads"], "n_audio_layer": c["encoder_layers"],
        # the decoder's positional table length (OpenAI's n_text_ctx; the HF field whisper.cpp's own script
        # reads, max_length, is the generation limit, equal to it in OpenAI's checkpoints)
        "n_text_ctx": c["max_target_positions"], "n_text_state": d,
        "n_text_head": c["decoder_attention_heads"], "n_text_layer": c["decoder_layers"],
        "n_mels": c["num_mel_bins"], "ftype": FTYPES[ftype],
    }


def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's reversible mapping):
    printable Latin-1 bytes stand for themselves, the other 68 bytes take the code points from 256 up in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {chr(b): b for b in kept}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def vocabulary(model_dir: Path) -> list[bytes]:
    """The BPE vocabulary's tokens as raw bytes, in id order (the added special tokens excluded)."""
    if (model_dir / "tokenizer.json").exists():
        tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        if tok.get("model", {}).get("type") != "BPE":
            raise ConversionError(f"{model_dir / 'tokenizer.json'}: not a BPE tokenizer")
        vocab = tok["model"]["vocab"]
    elif (model_dir / "vocab.json").exists():
        vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    else:
        raise ConversionError(f"{model_dir}: no tokenizer.json or vocab.json")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ConversionError(f"{model_dir}: token ids are not contiguous from 0")
    table = byte_decoder()
    # a token outside the byte alphabet (a special token such as <|endoftext|> is inside it) is kept as UTF-8
    return [bytes(table[ch] for ch in t) if all(ch in table for ch in t) else t.encode("utf-8")
            for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def mel_filters(model_dir: Path, n_mels: int) -> np.ndarray:
    """(n_mels, 201) float32 filter bank, from the saved feature extractor settings or Whisper's defaults."""
    try:
        mel = LogMel.from_dir(model_dir)
    except FileNotFoundError:
        mel = LogMel(feature_size=n_mels)
    # whisper.cpp's front end is fixed at these; only the filter bank comes from the file
    if (mel.feature_size, mel.n_fft, mel.hop_length, mel.sampling_rate) != (n_mels, 400, 160, 16000):
        raise ConversionError(f"{model_dir}: feature extractor {mel} is not whisper.cpp's "
                              f"({n_mels} mels, n_fft 400, hop 160, 16 kHz)")
    return np.ascontiguousarray(mel.filters().T, dtype=np.float32)


def tensors(model_dir: Path, ftype: str):
    """(OpenAI name, array as stored, type id) for every tensor whisper.cpp loads."""
    from safetensors import safe_open

    with safe_open(str(model_dir / WEIGHTS_FILE), framework="np") as f:
        keys = list(f.keys())
        embed = next((k for k in keys if k.endswith("decoder.embed_tokens.weight")), None)
        for key in keys:
            name = openai_name(key)
            x = f.get_tensor(key)
            if name is None:
                # whisper.cpp computes logits with the token embedding; an untied projection cannot be kept
                if embed is None or not np.array_equal(x, f.get_tensor(embed)):
                    raise ConversionError(f"{key}: differs from the token embedding; whisper.cpp ties them")
                continue
            if name.endswith(("conv1.bias", "conv2.bias")):
                x = x.reshape(-1, 1)  # whisper.cpp holds conv biases as (1, n_state) tensors
            f16 = ftype == "f16" and x.ndim >= 2 and name not in F32_ALWAYS
            yield name, np.ascontiguousarray(x, np.float16 if f16 else np.float32), FTYPES["f16" if f16 else "f32"]


def convert(model_dir: str | Path, out: str | Path, ftype: str = "f16") -> Path:
    """Write `model_dir` as a whisper.cpp ggml file at `out` (atomically) and return its path."""
    model_dir, out = Path(model_dir), Path(out)
    if ftype not in FTYPES:
        raise ConversionError(f"ftype {ftype!r}: expected one of {sorted(FTYPES)}")
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a directory")
    if (model_dir / STRUCTURE_FILE).exists():
        raise ConversionError(
            f"{model_dir / STRUCTURE_FILE}: a pruned or quantization-aware model cannot be converted; whisper.cpp "
            "needs uniform layers (the same heads in every layer, FFN = 4 * d_model) and float weights. "
            "Convert the dense float model it came from.")
    for name in ("config.json", WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise ConversionError(f"{model_dir / name}: missing")
    config = json.loads((model_dir / "config.json").read_text())
    hp = hparams(config, ftype)
    tokens = vocabulary(model_dir)
    if len(tokens) > hp["n_vocab"]:
        raise ConversionError(f"{model_dir}: {len(tokens)} tokens > vocab_size {hp['n_vocab']}")
    filters = mel_filters(model_dir, hp["n_mels"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"  # slim.io's temp naming, renamed into place
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<i", GGML_MAGIC))
            f.write(struct.pack(f"<{len(HPARAM_FIELDS)}i", *(hp[k] for k in HPARAM_FIELDS)))
            f.write(struct.pack("<ii", *filters.shape))
            f.write(filters.astype("<f4").tobytes())
            f.write(struct.pack("<i", len(tokens)))
            for t in tokens:
                f.write(struct.pack("<i", len(t)) + t)
            for name, x, type_id in tensors(model_dir, ftype):
                raw = name.encode()
                f.write(struct.pack("<iii", x.ndim, len(raw), type_id))
                f.write(struct.pack(f"<{x.ndim}i", *reversed(x.shape)))
                f.write(raw)
                f.write(x.astype(x.dtype.newbyteorder("<")).tobytes())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_header(path: str | Path) -> dict:
    """The magic and hparams of a ggml file (for checks)."""
    with open(path, "rb") as f:
        magic, *values = struct.unpack(f"<{1 + len(HPARAM_FIELDS)}i", f.read(4 * (1 + len(HPARAM_FIELDS))))
    return {"magic": magic, **dict(zip(HPARAM_FIELDS, values))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="Hugging Face Whisper directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("out", help="the ggml .bin file to write")
    p.add_argument("--ftype", choices=sorted(FTYPES), default="f16",
                   help="f16 (whisper.cpp's usual): matrices and convs in f16, the rest f32; f32: all f32 "
                        "(loads, but whisper.cpp 1.8.x aborts in the encoder's conv on it)")
    a = p.parse_args(argv)
    try:
        out = convert(a.model_dir, a.out, a.ftype)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB ({a.ftype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
