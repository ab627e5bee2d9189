"""Read a CTranslate2 (faster-whisper) Whisper directory into a stock Hugging Face Whisper, in fp32.

Why by hand: the `ctranslate2` package can write this format but not read it back into PyTorch, and
the offline weights this project runs on (DESIGN.md "Model sources") exist only as CT2 directories.

`model.bin` layout (little-endian; strings are a uint16 byte count, then UTF-8 bytes ending in NUL):

    uint32 binary version, string spec name ("WhisperSpec"), uint32 spec revision, uint32 count,
    count x [string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte count, bytes],
    uint32 alias count, alias count x [string alias, string target]

The file may be split in parts (`model.bin.part1`, `.part2`, ...); they are read as one stream.
Variable names follow CT2's Whisper spec: self-attention Q/K/V fused in `linear_0`, cross-attention Q
in `linear_0` and K/V fused in `linear_1`; int8/int16 weights come with a `<name>_scale` variable.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

# DataType enum of CTranslate2 (include/ctranslate2/types.h)
DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
# 4 introduced the dtype byte and byte count this reader relies on; 6 is what CTranslate2 4.x writes.
BINARY_VERSIONS = (4, 5, 6)
SPEC_NAME = "WhisperSpec"
GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
MAX_LENGTH = 448  # Whisper's decoder context: generation never goes beyond it


@dataclass
class CT2Model:
    """The raw content of a `model.bin`: tensors as stored (aliases resolved) and the spec they follow."""

    spec: str
    revision: int
    version: int
    variables: dict[str, torch.Tensor]


class _Stream:
    """Successive files read as one byte stream, with errors that say which file and what was being read."""

    def __init__(self, files: list[Path]):
        self.files, self.i, self.pos = files, 0, 0
        self.name = "+".join(str(f) for f in files)
        self.total = sum(f.stat().st_size for f in files)
        self.f = open(files[0], "rb")

    def read(self, n: int, what: str) -> bytearray:
        # checked before allocating, so a corrupted size cannot ask for gigabytes
        if self.pos + n > self.total:
            raise ValueError(f"{self.name}: truncated: {what} needs {n} bytes at byte {self.pos}, but the file ends "
                             f"at byte {self.total}; re-download the model (or join all its parts)")
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            k = self.f.readinto(view[got:])
            if k:
                got += k
            elif self.i + 1 < len(self.files):
                self.f.close()
                self.i += 1
                self.f = open(self.files[self.i], "rb")
            else:
                raise ValueError(f"{self.name}: changed while being read")
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", what)
        raw = self.read(n, what)
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{self.name}: bad string for {what} at byte {self.pos - n} (not NUL-terminated); "
                             "not a CTranslate2 model.bin or a corrupted one")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.name}: {what} at byte {self.pos - n} is not UTF-8; not a CTranslate2 "
                             "model.bin or a corrupted one") from None

    def at_end(self) -> bool:
        return self.pos == self.total

    def close(self):
        self.f.close()


def model_files(path: str | Path) -> list[Path]:
    """`model.bin`, or its parts `model.bin.part1..N` in numeric order, in the CT2 directory `path`."""
    path = Path(path)
    if (path / "model.bin").is_file():
        return [path / "model.bin"]
    parts = sorted(path.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0))
    if parts:
        return parts
    raise FileNotFoundError(f"{path}: no model.bin (nor model.bin.part1, .part2, ...); not a CTranslate2 model "
                            "directory")


def read_model_bin(files: str | Path | list[Path]) -> CT2Model:
    """Parse `model.bin` (or its parts, concatenated as a stream) without writing the joined file."""
    files = [Path(f) for f in (files if isinstance(files, (list, tuple)) else [files])]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing CTranslate2 model file")
    s = _Stream(files)
    try:
        (version,) = s.unpack("I", "the binary version")
        if version not in BINARY_VERSIONS:
            raise ValueError(f"{s.name}: not a CTranslate2 model.bin this reader knows (binary version {version}, "
                             f"expected one of {BINARY_VERSIONS})")
        spec = s.string("the spec name")
        if spec != SPEC_NAME:
            raise ValueError(f"{s.name}: holds a CTranslate2 {spec!r}, not a Whisper model ({SPEC_NAME!r})")
        (revision,) = s.unpack("I", "the spec revision")
        (count,) = s.unpack("I", "the variable count")
        variables: dict[str, torch.Tensor] = {}
        for _ in range(count):
            name = s.string("a variable name")
            (rank,) = s.unpack("B", f"the rank of {name}")
            shape = s.unpack(f"{rank}I", f"the shape of {name}") if rank else ()
            dtype_id, nbytes = s.unpack("BI", f"the dtype of {name}")
            if dtype_id not in DTYPES:
                raise ValueError(f"{s.name}: variable {name} has unknown dtype id {dtype_id}")
            dtype = DTYPES[dtype_id]
            numel = 1
            for d in shape:
                numel *= d
            if nbytes != numel * dtype.itemsize:
                raise ValueError(f"{s.name}: variable {name} of shape {list(shape)} and {dtype} declares {nbytes} "
                                 f"bytes, expected {numel * dtype.itemsize}; corrupted model.bin")
            data = s.read(nbytes, f"the data of {name}")
            t = torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
            variables[name] = t.reshape(shape)
        (n_alias,) = s.unpack("I", "the alias count")
        for _ in range(n_alias):
            alias, target = s.string("an alias name"), s.string("an alias target")
            if target not in variables:
                raise ValueError(f"{s.name}: alias {alias} points to unknown variable {target}")
            variables[alias] = variables[target]
            if target + "_scale" in variables:  # aliases are made before quantization: share the scale too
                variables[alias + "_scale"] = variables[target + "_scale"]
        if not s.at_end():
            raise ValueError(f"{s.name}: unexpected bytes after the last alias (byte {s.pos}); wrong file or "
                             "parts joined in the wrong order")
    finally:
        s.close()
    return CT2Model(spec=spec, revision=revision, version=version, variables=variables)


def dequantize(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 copies of every tensor; int8/int16 weights are divided by their `<name>_scale` (CT2: q = w * scale)."""
    out = {}
    for name, t in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if scale is not None:
            scale = scale.float()
            t = t.float() / (scale.reshape(-1, *[1] * (t.dim() - 1)) if scale.dim() else scale)
        elif not t.is_floating_point() and t.dim() > 0:
            raise ValueError(f"variable {name} is stored as {t.dtype} without a {name}_scale; cannot dequantize")
        out[name] = t.float() if t.dim() > 0 else t
    return out


# ---------------------------------------------------------------------------------------------
# mapping CT2 Whisper variables to a Hugging Face WhisperForConditionalGeneration


def _count_layers(v: dict, stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_0/weight" in v:
        n += 1
    return n


def _scalar(v: dict, name: str, default=None):
    return v[name].item() if name in v else default


def whisper_config(v: dict[str, torch.Tensor], tokenizer: WhisperTokenizer, ct2_config: dict,
                   where: str = "model.bin") -> WhisperConfig:
    """The HF config of the model stored in `v` (shapes read off the tensors, token ids off the tokenizer)."""
    for name in ("encoder/conv1/weight", "decoder/embeddings/weight", "encoder/position_encodings/encodings",
                 "decoder/position_encodings/encodings"):
        if name not in v:
            raise ValueError(f"{where}: missing variable {name}; not a CTranslate2 Whisper model")
    checks = {"decoder/activation": GELU, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
    for name, want in checks.items():
        got = _scalar(v, name, want)
        if got != want:
            raise ValueError(f"{where}: {name} = {got}, a Whisper model has {want}")
    d_model, n_mels, _ = v["encoder/conv1/weight"].shape
    vocab_size = v["decoder/embeddings/weight"].shape[0]
    ids = special_token_ids(tokenizer)
    enc_layers, dec_layers = _count_layers(v, "encoder"), _count_layers(v, "decoder")
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        # head_dim is 64 in every Whisper; older specs may not store num_heads
        encoder_attention_heads=_scalar(v, "encoder/num_heads", d_model // 64),
        decoder_attention_heads=_scalar(v, "decoder/num_heads", d_model // 64),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0] if enc_layers else 4 * d_model,
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0] if dec_layers else 4 * d_model,
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )


class _Take:
    """Pops variables by name, so that anything left over (a foreign spec) is reported, not ignored."""

    def __init__(self, v: dict, where: str):
        self.v, self.where = dict(v), where

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.v:
            raise ValueError(f"{self.where}: missing variable {name}; not a CTranslate2 Whisper model "
                             "or an unsupported spec revision")
        return self.v.pop(name)

    def leftover(self) -> list[str]:
        return sorted(k for k, t in self.v.items() if t.dim() > 0)


def _linear(sd: dict, hf: str, take: _Take, ct2: str):
    sd[f"{hf}.weight"], sd[f"{hf}.bias"] = take(f"{ct2}/weight"), take(f"{ct2}/bias")


def _norm(sd: dict, hf: str, take: _Take, ct2: str):
    sd[f"{hf}.weight"], sd[f"{hf}.bias"] = take(f"{ct2}/gamma"), take(f"{ct2}/beta")


def _attention(sd: dict, hf: str, take: _Take, ct2: str, cross: bool):
    """Split CT2's fused projections. The K bias CT2 stores is zeros (HF k_proj has none), and a bias on K
    adds the same q·b to every score of a query, which softmax cancels: dropping it is exact."""
    w0, b0 = take(f"{ct2}/linear_0/weight"), take(f"{ct2}/linear_0/bias")
    if cross:
        (wk, wv), (_, bv) = take(f"{ct2}/linear_1/weight").chunk(2), take(f"{ct2}/linear_1/bias").chunk(2)
        wq, bq, out = w0, b0, "linear_2"
    else:
        (wq, wk, wv), (bq, _, bv) = w0.chunk(3), b0.chunk(3)
        out = "linear_1"
    sd[f"{hf}.q_proj.weight"], sd[f"{hf}.q_proj.bias"] = wq, bq
    sd[f"{hf}.k_proj.weight"] = wk
    sd[f"{hf}.v_proj.weight"], sd[f"{hf}.v_proj.bias"] = wv, bv
    _linear(sd, f"{hf}.out_proj", take, f"{ct2}/{out}")


def whisper_state_dict(v: dict[str, torch.Tensor], config: WhisperConfig, where: str = "model.bin") -> dict:
    """HF `WhisperForConditionalGeneration` state dict (fp32) from dequantized CT2 variables."""
    take, sd = _Take(v, where), {}
    for i in range(2):
        _linear(sd, f"model.encoder.conv{i + 1}", take, f"encoder/conv{i + 1}")
    sd["model.encoder.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    for i in range(config.encoder_layers):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        _norm(sd, f"{hf}.self_attn_layer_norm", take, f"{ct2}/self_attention/layer_norm")
        _attention(sd, f"{hf}.self_attn", take, f"{ct2}/self_attention", cross=False)
        _norm(sd, f"{hf}.final_layer_norm", take, f"{ct2}/ffn/layer_norm")
        _linear(sd, f"{hf}.fc1", take, f"{ct2}/ffn/linear_0")
        _linear(sd, f"{hf}.fc2", take, f"{ct2}/ffn/linear_1")
    _norm(sd, "model.encoder.layer_norm", take, "encoder/layer_norm")

    sd["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    for i in range(config.decoder_layers):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        _norm(sd, f"{hf}.self_attn_layer_norm", take, f"{ct2}/self_attention/layer_norm")
        _attention(sd, f"{hf}.self_attn", take, f"{ct2}/self_attention", cross=False)
        _norm(sd, f"{hf}.encoder_attn_layer_norm", take, f"{ct2}/attention/layer_norm")
        _attention(sd, f"{hf}.encoder_attn", take, f"{ct2}/attention", cross=True)
        _norm(sd, f"{hf}.final_layer_norm", take, f"{ct2}/ffn/layer_norm")
        _linear(sd, f"{hf}.fc1", take, f"{ct2}/ffn/linear_0")
        _linear(sd, f"{hf}.fc2", take, f"{ct2}/ffn/linear_1")
    _norm(sd, "model.decoder.layer_norm", take, "decoder/layer_norm")

    # Whisper ties the output projection to the token embedding; CT2 stores it as an alias (or a copy).
    proj = take("decoder/projection/weight")
    if not torch.equal(proj, sd["model.decoder.embed_tokens.weight"]):
        raise ValueError(f"{where}: decoder/projection/weight differs from the token embedding; Whisper ties them")
    if take.leftover():
        raise ValueError(f"{where}: unexpected variables {take.leftover()[:5]}; not a Whisper spec this reader knows")
    return sd


# ---------------------------------------------------------------------------------------------
# tokenizer, processor, generation config

SPECIAL = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>",
           "<|notimestamps|>")


def special_token_ids(tokenizer: WhisperTokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id and t != "<|endoftext|>"]
    if missing:
        raise ValueError(f"tokenizer has no {missing}; not a Whisper tokenizer")
    return ids


def load_tokenizer(tokenizer_json: str | Path, multilingual: bool) -> WhisperTokenizer:
    """A `WhisperTokenizer` from a `tokenizer.json` (what CT2 directories ship instead of HF's vocab files).

    The special tokens are registered as extra special tokens, as in OpenAI's HF checkpoints, so that
    `decode(skip_special_tokens=True)` and timestamp handling see them. Multilingual tokenizers get the
    English transcription prefix so that training labels match the generation prompt.
    """
    path = Path(tokenizer_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing tokenizer file")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        special = [t["content"] for t in spec["added_tokens"] if t.get("special")]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
    prefix = {"language": "en", "task": "transcribe"} if multilingual else {}
    tok = WhisperTokenizer(tokenizer_file=str(path), extra_special_tokens=special, pad_token="<|endoftext|>",
                           model_max_length=MAX_LENGTH, predict_timestamps=False, **prefix)
    special_token_ids(tok)
    return tok


def generation_config(config: WhisperConfig, ids: dict[str, int], alignment_heads=None,
                      lang_to_id: dict[str, int] | None = None) -> GenerationConfig:
    """A generation config with which stock `generate(input_features)` transcribes English, no timestamps.

    `ids` maps the `SPECIAL` tokens to their ids. English-only models (vocab 51864) get
    `<|startoftranscript|><|notimestamps|>` and no language table (with `lang_to_id` present, HF would
    run language detection). Multilingual ones get the table (default: OpenAI's language order after
    `<|startoftranscript|>`) and `language="en"`, `task="transcribe"`, which HF turns into
    `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`.
    """
    multilingual = config.vocab_size >= 51865
    kw = {}
    if multilingual:
        if not lang_to_id:
            sot = ids["<|startoftranscript|>"]
            codes = list(LANGUAGES)[: ids["<|translate|>"] - sot - 1]
            lang_to_id = {f"<|{code}|>": sot + 1 + i for i, code in enumerate(codes)}
        kw = {
            "lang_to_id": dict(lang_to_id),
            "task_to_id": {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
            "language": "en",
            "task": "transcribe",
        }
    if alignment_heads is None:  # the upper half of the decoder, as CTranslate2 and HF default to
        alignment_heads = [[layer, h] for layer in range(config.decoder_layers // 2, config.decoder_layers)
                           for h in range(config.decoder_attention_heads)]
    return GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=config.bos_token_id,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_length=min(MAX_LENGTH, config.max_target_positions),
        do_sample=False,
        num_beams=1,
        is_multilingual=multilingual,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
        alignment_heads=[list(map(int, h)) for h in alignment_heads],
        **kw,
    )


def processor_for(tokenizer: WhisperTokenizer, num_mel_bins: int = 80) -> WhisperProcessor:
    """Tokenizer + log-mel front end (80 bins; 128 for large-v3, read off the first conv)."""
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# the whole directory


def load_ct2(path: str | Path, files: list[Path] | None = None
             ) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Model (fp32, generation config set) and processor from a CT2 Whisper directory.

    `files` overrides the `model.bin` location (e.g. parts shipped in different packages);
    `config.json` and `tokenizer.json` are always read from `path`.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such CTranslate2 model directory")
    files = files or model_files(path)
    where = "+".join(str(f) for f in files)
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing; a CTranslate2 Whisper directory has model.bin, "
                                    "config.json and tokenizer.json")
    try:
        ct2_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(ct2_config, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object")

    raw = read_model_bin(files)
    v = dequantize(raw.variables)
    if "decoder/embeddings/weight" not in v:
        raise ValueError(f"{where}: missing variable decoder/embeddings/weight; not a CTranslate2 Whisper model")
    vocab_size = v["decoder/embeddings/weight"].shape[0]
    tokenizer = load_tokenizer(path / "tokenizer.json", multilingual=vocab_size >= 51865)
    # Whisper's vocabulary ends with <|notimestamps|> and 1501 timestamps <|0.00|>..<|30.00|>
    expected = special_token_ids(tokenizer)["<|notimestamps|>"] + 1502
    if expected != vocab_size:
        raise ValueError(f"{path / 'tokenizer.json'} implies a vocabulary of {expected}, but {where} has {vocab_size} "
                         "embeddings; tokenizer and model do not belong together")
    config = whisper_config(v, tokenizer, ct2_config, where)
    sd = whisper_state_dict(v, config, where)

    # Built on the meta device: random init of weights we are about to replace is wasted time.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict({**sd, "proj_out.weight": sd["model.decoder.embed_tokens.weight"]}, strict=True, assign=True)
    model.tie_weights()
    lang_ids = ct2_config.get("lang_ids") or []
    model.generation_config = generation_config(config, special_token_ids(tokenizer), ct2_config.get("alignment_heads"),
                                                {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids} or None)
    return model.eval(), processor_for(tokenizer, config.num_mel_bins)
