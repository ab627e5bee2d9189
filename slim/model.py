"""The one owner of "a Whisper whose layers may differ": structure, build, save, load.

A whisper-slim model directory is a Hugging Face Whisper directory plus, when the model is not the
dense original, `slim_structure.json`:

    {"format": 1, "head_dim": 64,
     "encoder_heads": [6, 3, 1, 6], "decoder_heads": [...], "cross_heads": [...],
     "encoder_ffn": [1536, ...], "decoder_ffn": [...],
     "quant": null | {...settings owned by qat/...},
     "audio_window": null | {"margin_s": 1.0, "frame_multiple": 16}}

`audio_window` says the model encodes windows sized to the audio (`window_frames`) instead of Whisper's
fixed 30 s: trained to (no `context`), or an unchanged model that reads a silent input's states beyond
the window (`"context": "silence"`, `slim.window`); a model without it is always given the full window.

`config.json` keeps the base model's shape (layers, d_model, vocab); the structure says what each layer
kept. Weights are always `model.safetensors`; nothing is pickled. A dense, unquantized model is
written as a plain HF directory (no structure file) that stock `transformers` loads.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperEncoder
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, capture_outputs

from slim.attention import SlimAttention
from slim.window import batch_levels, check_audio_window, silence_context, window_frames
from slim.io import atomic_dir

STRUCTURE_FILE = "slim_structure.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class Structure:
    """Heads kept per layer for each attention kind, FFN width per layer, and quantization settings."""

    head_dim: int
    encoder_heads: list[int]
    decoder_heads: list[int]
    cross_heads: list[int]
    encoder_ffn: list[int]
    decoder_ffn: list[int]
    quant: dict | None = field(default=None)
    audio_window: dict | None = field(default=None)

    @classmethod
    def dense(cls, config: WhisperConfig) -> "Structure":
        return cls(
            head_dim=config.d_model // config.encoder_attention_heads,
            encoder_heads=[config.encoder_attention_heads] * config.encoder_layers,
            decoder_heads=[config.decoder_attention_heads] * config.decoder_layers,
            cross_heads=[config.decoder_attention_heads] * config.decoder_layers,
            encoder_ffn=[config.encoder_ffn_dim] * config.encoder_layers,
            decoder_ffn=[config.decoder_ffn_dim] * config.decoder_layers,
        )

    def validate(self, config: WhisperConfig) -> "Structure":
        n_enc, n_dec = config.encoder_layers, config.decoder_layers
        for name, n in [("encoder_heads", n_enc), ("encoder_ffn", n_enc), ("decoder_heads", n_dec),
                        ("cross_heads", n_dec), ("decoder_ffn", n_dec)]:
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"structure.{name} has {len(values)} entries, the model has {n} layers")
            if any((not isinstance(v, int)) or v < 0 for v in values):
                raise ValueError(f"structure.{name} must hold non-negative integers, got {values}")
        if self.head_dim * config.encoder_attention_heads != config.d_model:
            raise ValueError(f"structure.head_dim={self.head_dim} does not match d_model={config.d_model}")
        if self.audio_window is not None:
            check_audio_window(self.audio_window, "structure.audio_window")
        return self

    def is_dense(self, config: WhisperConfig) -> bool:
        return self.quant is None and self.audio_window is None and self == Structure.dense(config)

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Structure":
        d = dict(d)
        version = d.pop("format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{STRUCTURE_FILE}: format {version} is not supported (expected {FORMAT_VERSION})")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{STRUCTURE_FILE}: {e}") from None

    def num_heads(self) -> int:
        return sum(self.encoder_heads) + sum(self.decoder_heads) + sum(self.cross_heads)


# ---------------------------------------------------------------------------------------------
# audio windows: encoding only the frames a clip needs


def audio_window_of(model: nn.Module) -> dict | None:
    """The window setting of the Whisper inside `model` (also through DDP / peft wrappers), or None."""
    for m in model.modules():
        if isinstance(m, WhisperEncoder):
            return getattr(m, "audio_window", None)
    return None


def set_audio_window(model: WhisperForConditionalGeneration, window: dict | None) -> None:
    model.model.encoder.audio_window = None if window is None else dict(check_audio_window(window))


def trim_features(model: nn.Module, features: torch.Tensor, audio_frames) -> torch.Tensor:
    """`features` (B, n_mels, 3000) cut to the window `model` encodes for this batch (its longest clip,
    `audio_frames` per clip); unchanged for a model without a window or when the lengths are unknown."""
    window = audio_window_of(model)
    if window is None or audio_frames is None:
        return features
    n = int(torch.as_tensor(audio_frames).max()) if len(audio_frames) else features.shape[-1]
    return features[..., :window_frames(window, n, features.shape[-1])]


class SlimEncoder(WhisperEncoder):
    """Whisper's encoder on any even number of frames up to 30 s (HF's insists on exactly 3000): the
    positional table is sliced to the frames present. With 3000 frames it runs HF's computation exactly.

    With a "silence" window (`slim.window`) and fewer frames, each layer's self-attention also reads the
    keys/values this encoder computes at the later positions of a silent 30 s input, and the output goes
    on with that input's states, so the decoder cross-attends over 1500 frames as usual while the layers
    ran only on the window's frames."""

    audio_window: dict | None = None

    @property
    def full_frames(self) -> int:
        return self.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]

    def _embed(self, input_features):
        x = nn.functional.gelu(self.conv1(input_features))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        return x + self.embed_positions.weight[: x.shape[1]]

    def _attentions(self) -> list[SlimAttention]:
        attns = [layer.self_attn for layer in self.layers]
        if not all(isinstance(a, SlimAttention) for a in attns):
            raise TypeError("a silence window needs explicit attention (slim.model.install_explicit_attention)")
        return attns

    def silence_states(self, level: float, dtype: torch.dtype, device) -> tuple[list[tuple], torch.Tensor]:
        """Per layer, the self-attention (k, v) of a silent 30 s input (every mel frame `level`), and the last
        layer's output before the final norm; computed once per level and kept until a weight or buffer
        changes in place (training, loading), is replaced, or the dtype/device changes. Writes through `.data`
        bump no version: call `forget_silence` after them."""
        state = [(id(t), t.data_ptr(), -1 if t.is_inference() else t._version)
                 for t in (*self.parameters(), *self.buffers())]
        key = (dtype, device, torch.is_inference_mode_enabled(), state)
        cached = self.__dict__.get("_silence")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_silence"] = (key, {})
        if level in cached[1]:
            return cached[1][level]
        attns = self._attentions()
        feats = torch.full((1, self.config.num_mel_bins, self.full_frames), level, dtype=dtype, device=device)
        try:
            for a in attns:
                a.keep_kv = True
            with torch.no_grad():
                x = self._embed(feats)
                for layer in self.layers:
                    # .forward, not the module call: no output-recording hook sees this run, so a caller's
                    # output_hidden_states holds the clip's states only
                    x = layer.forward(x, None)
            kv = [a.kept_kv for a in attns]
        finally:
            for a in attns:
                a.keep_kv, a.kept_kv = False, None
        cached[1][level] = (kv, x)
        return kv, x

    def forget_silence(self) -> None:
        """Drop the silent input's states; the next silence window computes them again."""
        self.__dict__.pop("_silence", None)

    def silent_rest(self, input_features: torch.Tensor, frames: int) -> tuple[list[tuple], torch.Tensor]:
        """What a "silence" window reads from encoder frame `frames` on, for each item of a batch: per layer
        (k, v), and the output before the final norm, of the silent input at the level nearest the item's
        own padding (`slim.window.batch_levels`: batch 1 when every item reads the same)."""
        states = [self.silence_states(v, input_features.dtype, input_features.device)
                  for v in batch_levels(input_features.detach().amin(dim=(1, 2)))]
        kv = [tuple(torch.cat([kvs[i][j] for kvs, _ in states])[:, :, frames:] for j in (0, 1))
              for i in range(len(self.layers))]
        return kv, torch.cat([out for _, out in states])[:, frames:]

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_features, attention_mask=None, **kwargs) -> BaseModelOutput:
        n = input_features.shape[-1]
        stride = self.conv1.stride[0] * self.conv2.stride[0]
        if n > self.full_frames or n % stride:
            raise ValueError(f"the encoder takes an even number of mel frames up to {self.full_frames}, got {n}")
        x = self._embed(input_features)
        x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        if not (silence_context(self.audio_window) and n < self.full_frames):
            for layer in self.layers:
                if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                    continue
                x = layer(x, None, **kwargs)
            return BaseModelOutput(last_hidden_state=self.layer_norm(x))
        kv, rest = self.silent_rest(input_features, x.shape[1])
        attns = self._attentions()
        try:
            for a, context in zip(attns, kv):
                a.context = context
            for layer in self.layers:
                x = layer(x, None, **kwargs)
        finally:
            for a in attns:
                a.context = None
        x = torch.cat([x, rest.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return BaseModelOutput(last_hidden_state=self.layer_norm(x))


# ---------------------------------------------------------------------------------------------
# building


def _attentions(model: WhisperForConditionalGeneration):
    """(kind, layer index, parent layer, attribute name) for every attention in the model."""
    for i, layer in enumerate(model.model.encoder.layers):
        yield "encoder", i, layer, "self_attn"
    for i, layer in enumerate(model.model.decoder.layers):
        yield "decoder", i, layer, "self_attn"
        yield "cross", i, layer, "encoder_attn"


def install_explicit_attention(model: WhisperForConditionalGeneration) -> WhisperForConditionalGeneration:
    """Replace every HF `WhisperAttention` by `SlimAttention`, in place, keeping the same Parameters."""
    for _, _, layer, name in _attentions(model):
        attn = getattr(layer, name)
        if isinstance(attn, WhisperAttention):
            setattr(layer, name, SlimAttention.from_whisper(attn))
    # Our attention needs materialised masks: with "sdpa" HF may pass no causal mask at all and rely on
    # SDPA's is_causal flag, which an explicit matmul cannot see.
    model.set_attn_implementation("eager")
    encoder = model.model.encoder
    if type(encoder) is WhisperEncoder:  # same parameters and buffers; only forward differs
        encoder.__class__ = SlimEncoder
        # transformers registers which layers' outputs a class records (output_hidden_states) under the
        # class's name when a model is constructed; a swapped class must be registered by hand
        _CAN_RECORD_REGISTRY[encoder] = SlimEncoder._can_record_outputs
    # Whisper's encoder positions are a fixed sinusoidal table (a buffer in OpenAI's code; HF freezes it in
    # __init__, but a loaded model can hand it back trainable): keep it out of training, so it stays the
    # exact table (which the ONNX export then stores losslessly as fp16).
    model.model.encoder.embed_positions.requires_grad_(False)
    return model


def apply_structure(model: WhisperForConditionalGeneration, structure: Structure) -> WhisperForConditionalGeneration:
    """Resize every attention and FFN to `structure` (fresh weights where the size changes)."""
    cfg = model.config
    structure.validate(cfg)
    heads = {"encoder": structure.encoder_heads, "decoder": structure.decoder_heads, "cross": structure.cross_heads}
    for kind, i, layer, name in _attentions(model):
        attn = getattr(layer, name)
        h = heads[kind][i]
        if not isinstance(attn, SlimAttention) or attn.num_heads != h or attn.head_dim != structure.head_dim:
            new = SlimAttention(
                cfg.d_model, h, structure.head_dim, is_decoder=kind != "encoder", is_causal=kind == "decoder",
                layer_idx=i if kind != "encoder" else None, dropout=cfg.attention_dropout,
            )
            setattr(layer, name, new.to(attn.q_proj.weight.dtype))
    for layers, widths in ((model.model.encoder.layers, structure.encoder_ffn),
                           (model.model.decoder.layers, structure.decoder_ffn)):
        for layer, w in zip(layers, widths):
            if layer.fc1.out_features != w:
                dtype = layer.fc1.weight.dtype
                layer.fc1 = nn.Linear(cfg.d_model, w).to(dtype)
                layer.fc2 = nn.Linear(w, cfg.d_model).to(dtype)
    install_explicit_attention(model)
    set_audio_window(model, structure.audio_window)
    return model


def build_model(config: WhisperConfig, structure: Structure | None = None) -> WhisperForConditionalGeneration:
    """A randomly initialised model of `config`'s base shape cut to `structure` (dense if None)."""
    model = WhisperForConditionalGeneration(copy.deepcopy(config))  # the model owns (and edits) its config
    return apply_structure(model, structure or Structure.dense(config))


def structure_of(model: WhisperForConditionalGeneration, quant: dict | None = None) -> Structure:
    """Read the structure off the modules (the modules are the truth; the JSON is derived)."""
    heads: dict[str, list[int]] = {"encoder": [], "decoder": [], "cross": []}
    head_dim = None
    for kind, _, layer, name in _attentions(model):
        attn = getattr(layer, name)
        heads[kind].append(attn.num_heads)
        head_dim = attn.head_dim
    return Structure(
        head_dim=head_dim,
        encoder_heads=heads["encoder"], decoder_heads=heads["decoder"], cross_heads=heads["cross"],
        encoder_ffn=[l.fc1.out_features for l in model.model.encoder.layers],
        decoder_ffn=[l.fc1.out_features for l in model.model.decoder.layers],
        quant=quant, audio_window=audio_window_of(model),
    )


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied embedding / output projection counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---------------------------------------------------------------------------------------------
# calling


MODEL_INPUTS = ("input_features", "labels", "decoder_input_ids", "decoder_attention_mask", "attention_mask")
"""The batch entries that WhisperForConditionalGeneration's forward takes."""


def model_inputs(batch: dict, decoder_input_ids: torch.Tensor | None = None, model: nn.Module | None = None) -> dict:
    """The keyword arguments of a teacher-forced forward on `batch`: its MODEL_INPUTS entries that are not
    None. Given `decoder_input_ids`, those replace the batch's and `labels` is left out, so the model
    computes no loss (a caller that computes its own loss need not pay for it). Given `model`, the features
    are cut to the window it encodes (`trim_features`, from the batch's `audio_frames`)."""
    kw = {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
    if decoder_input_ids is not None:
        kw.pop("labels", None)
        kw["decoder_input_ids"] = decoder_input_ids
    if model is not None and "input_features" in kw:
        kw["input_features"] = trim_features(model, kw["input_features"], batch.get("audio_frames"))
    return kw


# ---------------------------------------------------------------------------------------------
# saving and loading


def save_model(model: WhisperForConditionalGeneration, out: str | Path, processor=None,
               quant: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` (+ processor, generation config) to `out` atomically.

    Dense and unquantized: a plain HF directory. Otherwise: `config.json` of the base shape,
    `slim_structure.json`, and `model.safetensors` holding every parameter and buffer (quantizer
    state included), which only `load_model` (or `qat`) can rebuild.
    `extra_files` maps file names to text written alongside (e.g. the resolved recipe).
    """
    out = Path(out)
    structure = structure_of(model, quant)
    with atomic_dir(out) as tmp:
        if structure.is_dense(model.config):
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            # safetensors' save_model drops the tied proj_out alias instead of refusing shared storage.
            st_save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / STRUCTURE_FILE).write_text(json.dumps(structure.to_dict(), indent=2) + "\n")
        if processor is not None:
            processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def read_structure(path: str | Path) -> Structure | None:
    f = Path(path) / STRUCTURE_FILE
    if not f.exists():
        return None
    try:
        return Structure.from_dict(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `model.safetensors` from `path` into `model` strictly (every tensor, exact shapes)."""
    f = Path(path) / WEIGHTS_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing weights file")
    missing, unexpected = st_load_model(model, str(f), strict=False)
    # the tied output projection is stored once, under the embedding's name
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise ValueError(f"{f}: weights do not match the structure (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> WhisperForConditionalGeneration:
    """Load any float model directory this project wrote (or a stock HF Whisper dir), with explicit attention.

    A quantization-aware or INT8 directory holds quantizer state that the core cannot rebuild; load those
    with `qat` (or let `eval.engines` pick the loader).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    structure = read_structure(path)
    if structure is None:
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
        return install_explicit_attention(model).eval()
    if structure.quant is not None:
        raise ValueError(f"{path} is a quantized model ({STRUCTURE_FILE} has quant settings); load it with "
                         "qat.load.load_model_dir or eval.engines.load_engine")
    config = WhisperConfig.from_pretrained(path)
    model = build_model(config, structure)
    load_weights(model, path)
    if (path / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(dtype).eval()


def load_processor(path: str | Path):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(path)
