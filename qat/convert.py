"""Fold the QAT scales into real INT8 PyTorch modules, and save/load them through the model format.

Kernel choice: `torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32` with the x86
(fbgemm + oneDNN) or fbgemm engine. It takes the float input with *our* static input scale/zero point
(uint8), the int8 per-channel weight prepacked once, and returns fp32 — exactly the fake-quant graph
(input Q/DQ, weight Q/DQ, float output; no output requantization that QAT never trained for) — and it
is faster than fp32 `F.linear` at encoder sizes. The alternatives: `nnq.Linear` / `quantized::linear`
must requantize the output to uint8 (needs an output scale and loses accuracy) and is no faster;
`torch.ops.onednn.qlinear_pointwise` with fp32 output and `torch._int_mm` are slower than fp32 in eager
mode (docs/results.md, "Measurements behind choices in the code"). The qnnpack engine (ARM) has no
fp32-output kernel for these packed weights in torch 2.13 (`apply_with_input_q_dq_qweight_dq_output_fp32
is not implemented`), so `convert_to_int8` accepts engine "x86" or "fbgemm" and says so for qnnpack.
The kernel's u8 x s8 products are exact only with VNNI (32-bit sums): on x86 CPUs without it fbgemm sums
pairs of products in 16 bits (VPMADDUBSW), which full-range weights can saturate, so there `Int8Linear`
runs the same integer codes as a float matmul instead (`slim.export_format.int8_kernels_exact`).

What stays float: LayerNorm, softmax, GELU, the conv front end unless QAT quantized it (`Int8Conv1d`:
the same kernel over the conv's windows); the attention matmuls run their
inputs through the frozen uint8 Q/DQ (PyTorch has no CPU int8 batched matmul with a float output),
which gives the same values an int8 matmul would, but costs more than the matmul (`matmuls="float"`
drops it, for speed); the tied embedding / output projection, when `embeddings` was on, is stored
int8 per row and dequantized once into a runtime cache. On this CPU the eager INT8 model is about as
fast as fp32 end to end (the decoder's per-token work is tiny matrices and the fp32 vocabulary
projection); the fast deployment path is the ONNX Runtime export (`qat.onnx_export`).

Saved state (plain tensors, safetensors; the packed weights are rebuilt on first use):
`<linear>.weight_int8` int8 (out, in), `.weight_scale` float32 (out,), `.bias` float32,
`.input_scale` float32 (), `.input_zero_point` int32 () on the uint8 grid (unused where the input is
quantized per row, `QuantConfig.dynamic`, which the saved settings rebuild); `<matmul>.a_scale`,
`.a_zero_point` (unused where `a` is quantized per row, `QuantConfig.row_matmuls`), `.b_scale`,
`.b_zero_point`; `model.decoder.embed_tokens.weight_int8` / `.weight_scale`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qat.prepare import (QATConv1d, QATEmbedding, QATLinear, QuantConfig, QuantMatMul, conv_windows,
                         int8_linear_weight, int8_weight, prepare_qat)
from qat.quantizers import fake_quant, row_fake_quant, row_qparams
from slim.attention import MatMul
from slim.export_format import int8_kernels_exact

ENGINES = ("x86", "fbgemm")


def _check_engine(engine: str) -> str:
    if engine not in ENGINES:
        hint = (" (qnnpack has no fp32-output static Linear kernel in this torch)" if engine == "qnnpack" else "")
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}{hint}")
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantized engine {engine!r} is not available in this torch build "
                           f"(available: {torch.backends.quantized.supported_engines})")
    return engine


class Int8Linear(nn.Module):
    """W8A8 Linear: uint8 static input quantization, int8 per-channel weight, int32 accumulate, fp32 out."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, engine: str = "x86",
                 exact: bool = True, float_channels: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.engine = in_features, out_features, _check_engine(engine)
        self.exact = exact
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        self.per_row = False  # the input's grid per row, at each call (`QuantConfig.dynamic`): set by _load_qat
        # input channels that bypass the grids (`QuantConfig.outlier_channels`): weight_int8 is zero there
        self.register_buffer("float_channels", torch.zeros(float_channels, dtype=torch.long) if float_channels else None)
        self.register_buffer("float_weight", torch.zeros(out_features, float_channels) if float_channels else None)
        self._packed = None
        self._w_float = None  # the dequantized weight of the float paths, built on first use

    @classmethod
    def from_qat(cls, m: QATLinear, engine: str = "x86", exact: bool = True) -> "Int8Linear":
        k = 0 if m.float_channels is None else m.float_channels.numel()
        return cls(m.in_features, m.out_features, m.bias is not None, engine, exact, k)._load_qat(m)

    @torch.no_grad()
    def _load_qat(self, m: QATLinear | QATConv1d) -> "Int8Linear":
        """Fill from a fake-quant module: its int8 weight (a conv's as the window matrix) and scales."""
        q = m.weight_quant
        if q.bits != 8 or m.input_quant.bits != 8:
            raise ValueError(f"convert needs 8-bit quantizers, got weight {q.bits} / input {m.input_quant.bits} bits")
        self.per_row = m.input_quant.dynamic
        if self.float_channels is not None and not m.channels_chosen:
            return self  # a converted model's shapes, before its saved tensors are loaded into them
        w = int8_linear_weight(m)
        if w.float_channels is not None:
            self.float_channels.copy_(w.float_channels)
            self.float_weight.copy_(w.float_weight)
        self.weight_int8.copy_(w.q)
        self.weight_scale.copy_(w.scale)
        if m.bias is not None:
            self.bias.copy_(m.bias.detach())
        if not self.per_row:
            s, z = m.input_quant.qparams()
            self.input_scale.copy_(s)
            self.input_zero_point.copy_(z)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = self._w_float = None  # new int8 weights: repack / dequantize on next use
        return super()._load_from_state_dict(*args, **kwargs)

    def _pack(self):
        prev = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's quantized-tensor deprecation notice
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.weight_scale.double(), torch.zeros(self.out_features, dtype=torch.int64), 0)
                packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        finally:
            torch.backends.quantized.engine = prev
        self._packed = (packed, float(self.input_scale), int(self.input_zero_point))
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward_int8(x)
        if self.float_channels is None:
            return y
        # the float channels' codes saturate the grid; their int8 weight columns are zero, so the int8
        # product leaves them out and this adds them
        return y + F.linear(x.index_select(-1, self.float_channels), self.float_weight.to(x.dtype))

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_row:
            return self._forward_per_row(x)
        if not int8_kernels_exact():
            # fbgemm's u8 x s8 kernels (both x86 engines) sum pairs of products in 16 bits (VPMADDUBSW) on
            # x86 CPUs without VNNI: a uint8 input times a full-range int8 weight can saturate there and move
            # outputs by whole units, so the same integer product runs as a float matmul of the codes' values
            return self._forward_codes(x, self.input_scale, self.input_zero_point.float())
        packed, scale, zp = self._packed or self._pack()
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        if self.exact:
            # The kernel rounds x * (1/scale), fake quant (and ONNX) round x / scale: they disagree on a few
            # values per million that sit on a rounding boundary. Putting x on the grid first makes the
            # kernel's integer codes exactly fake quant's (the kernel adds the zero point and clamps).
            x = (x / scale).round_().mul_(scale)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x.contiguous(), scale, zp, packed)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _forward_per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each input row on its own uint8 grid, times the int8 weight: fake quant's arithmetic, in float.
        PyTorch's quantized Linear kernels take one input scale per call (its dynamic one, one range over
        the whole input), so the exact per-row product runs as a float matmul of the integer codes' values
        (the ONNX export runs it as MatMulInteger)."""
        return self._forward_codes(x, *row_qparams(x.float()))

    def _forward_codes(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """x on the uint8 grid (scale, zero_point), times the dequantized int8 weight, in float."""
        if self._w_float is None:
            self._w_float = self.weight_int8.float() * self.weight_scale[:, None]
        return F.linear(fake_quant(x.float(), scale, zero_point, 0, 255), self._w_float, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, engine={self.engine}, "
                f"exact={self.exact}" + (", input per row" if self.per_row else ""))


class Int8Conv1d(Int8Linear):
    """A conv of the front end in W8A8: `Int8Linear`'s kernel over the input's kernel windows
    (`qat.prepare.conv_windows`; zero padding is 0 on the input grid). (B, C, T) in, (B, C', T') out, like
    nn.Conv1d; saved as the Linear over the windows (weight_int8 (out, kernel * in))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 bias: bool = True, engine: str = "x86", exact: bool = True):
        super().__init__(kernel_size * in_channels, out_channels, bias, engine, exact)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kernel_size,), (stride,), (padding,)  # as nn.Conv1d has them

    @classmethod
    def from_qat(cls, m: QATConv1d, engine: str = "x86", exact: bool = True) -> "Int8Conv1d":
        return cls(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.bias is not None,
                   engine, exact)._load_qat(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = conv_windows(x.transpose(1, 2), self.kernel_size[0], self.stride[0], self.padding[0], fill=0.0)
        return super().forward(windows).transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, engine={self.engine}, exact={self.exact}")


class QDQMatMul(MatMul):
    """`a @ b` on inputs put on their frozen uint8 grids (float matmul of exactly the int8 values' products)."""

    def __init__(self):
        super().__init__()
        for k in ("a", "b"):
            self.register_buffer(f"{k}_scale", torch.tensor(1.0))
            self.register_buffer(f"{k}_zero_point", torch.tensor(0, dtype=torch.int32))
        self.a_per_row = False  # `a` on each row's own grid at each call (`QuantConfig.row_matmuls`)

    @classmethod
    def from_qat(cls, m: QuantMatMul) -> "QDQMatMul":
        new = cls()
        new.a_per_row = m.a_quant.dynamic
        for k, q in (("a", m.a_quant), ("b", m.b_quant)):
            if q.bits != 8:
                raise ValueError(f"convert needs 8-bit matmul quantizers, got {q.bits} bits")
            s, z = q.qparams()
            getattr(new, f"{k}_scale").copy_(s)
            getattr(new, f"{k}_zero_point").copy_(z)
        return new

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.a_per_row:
            a = row_fake_quant(a).to(a.dtype)
        else:
            a = fake_quant(a.float(), self.a_scale, self.a_zero_point, 0, 255).to(a.dtype)
        b = fake_quant(b.float(), self.b_scale, self.b_zero_point, 0, 255).to(b.dtype)
        return torch.matmul(a, b)


class Int8Embedding(nn.Module):
    """Token embedding stored int8 per row (symmetric), dequantized into a runtime cache on first use."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))
        self._weight = None

    @classmethod
    def from_qat(cls, m: QATEmbedding) -> "Int8Embedding":
        new = cls(m.num_embeddings, m.embedding_dim, m.padding_idx)
        qw, scale = int8_weight(m.weight_quant, m.weight)
        new.weight_int8.copy_(qw)
        new.weight_scale.copy_(scale)
        return new

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight (a runtime cache; not saved)."""
        if self._weight is None:
            self._weight = self.weight_int8.float() * self.weight_scale[:, None]
        return self._weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)


class TiedInt8Logits(nn.Module):
    """The output projection tied to an `Int8Embedding`: logits = x @ dequant(W)ᵀ. Holds no state of
    its own (the embedding is referenced, not registered), so the int8 table is stored once."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: no second copy in the state dict
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding.weight)


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def convert_to_int8(model: nn.Module, engine: str = "x86", inplace: bool = False, exact: bool = True,
                    matmuls: Literal["qdq", "float"] = "qdq", _check: bool = True) -> nn.Module:
    """The INT8 model of a fake-quant model (prepared, calibrated; usually frozen).

    Every QATLinear with both quantizers on becomes `Int8Linear`; with both off, a plain nn.Linear
    (same Parameters); a QATConv1d likewise `Int8Conv1d` or a plain nn.Conv1d; every QuantMatMul with both on becomes `QDQMatMul`, with both off a plain
    MatMul; a quantized embedding becomes `Int8Embedding` + `TiedInt8Logits`. Scales are the ones the
    fake-quant forward uses now (activation scales as frozen, weight scales of the current weights).

    Speed options (both default to matching fake quant as closely as possible): `exact=False` skips
    putting Linear inputs on the grid before the kernel (see `Int8Linear.forward`; a few codes per
    million move by one step); `matmuls="float"` leaves the attention matmul inputs unquantized, which
    drops the Q/DQ passes over the attention probabilities that cost more than the matmul itself (with
    both options tiny.en's INT8 encoder is faster than fp32, with the defaults slower: docs/results.md).
    """
    _check_engine(engine)
    if matmuls not in ("qdq", "float"):
        raise ValueError(f"matmuls must be 'qdq' or 'float', got {matmuls!r}")
    cfg = getattr(model, "slim_quant_config", None)
    if cfg is None:
        raise ValueError("model was not prepared with qat.prepare.prepare_qat (no slim_quant_config)")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, (QATLinear, QATConv1d)) and m.input_quant is not None:
            conv = isinstance(m, QATConv1d)
            on = (m.input_quant.is_enabled, m.weight_quant.is_enabled)
            if on == (True, True):
                if _check and not m.input_quant.calibrated:
                    raise ValueError(f"{name}: input quantizer was never calibrated (run qat.prepare.calibrate)")
                model.set_submodule(name, (Int8Conv1d if conv else Int8Linear).from_qat(m, engine, exact))
            elif on == (False, False):
                model.set_submodule(name, m.to_conv() if conv else m.to_linear())
            else:
                raise ValueError(f"{name}: input and weight quantizers must be both on or both off to convert")
        elif isinstance(m, QuantMatMul):
            on = (m.a_quant.is_enabled, m.b_quant.is_enabled)
            if on == (True, True) and matmuls == "qdq":
                if _check and not (m.a_quant.calibrated and m.b_quant.calibrated):
                    raise ValueError(f"{name}: matmul quantizers were never calibrated (run qat.prepare.calibrate)")
                model.set_submodule(name, QDQMatMul.from_qat(m))
            elif on == (False, False) or matmuls == "float":
                model.set_submodule(name, MatMul())
            else:
                raise ValueError(f"{name}: both matmul input quantizers must be on or off to convert")
    emb = model.model.decoder.embed_tokens
    if isinstance(emb, QATEmbedding):
        if emb.weight_quant.is_enabled:
            int8 = Int8Embedding.from_qat(emb)
            model.model.decoder.embed_tokens = int8
            model.proj_out = TiedInt8Logits(int8)
        else:
            plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, _weight=emb.weight)
            model.model.decoder.embed_tokens = plain
            model.proj_out = model.proj_out.to_linear()
            model.proj_out.weight = plain.weight
    model.slim_quant_config = cfg
    model.slim_int8 = {"engine": engine, "exact": exact, "matmuls": matmuls}
    return model


def int8_quant_dict(model: nn.Module) -> dict:
    """The `quant` entry of slim_structure.json for a converted model."""
    return {**model.slim_quant_config.to_dict(), "converted": True, **model.slim_int8}


def save_int8_model(model: nn.Module, out: str | Path, processor=None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a converted model through the model format (int8 tensors + scales in model.safetensors)."""
    from slim.model import save_model

    if getattr(model, "slim_int8", None) is None:
        raise ValueError("not a converted model: call convert_to_int8 first")
    return save_model(model, out, processor=processor, quant=int8_quant_dict(model), extra_files=extra_files)


def load_int8_model(path: str | Path) -> nn.Module:
    """Rebuild a converted model: float structure -> prepare_qat -> convert (shapes only) -> strict load."""
    from safetensors.torch import load_model as st_load_model
    from transformers import GenerationConfig, WhisperConfig

    from slim.model import STRUCTURE_FILE, WEIGHTS_FILE, build_model, read_structure

    path = Path(path)
    s = read_structure(path)
    if s is None or s.quant is None or not s.quant.get("converted"):
        raise ValueError(f"{path / STRUCTURE_FILE}: not a converted INT8 model (quant.converted is not set)")
    f = path / WEIGHTS_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing weights file")
    cfg = QuantConfig.from_dict(s.quant)
    model = build_model(WhisperConfig.from_pretrained(path), dataclasses.replace(s, quant=None))
    prepare_qat(model, cfg)
    model = convert_to_int8(model, engine=s.quant.get("engine", "x86"), exact=s.quant.get("exact", True),
                            matmuls=s.quant.get("matmuls", "qdq"), inplace=True, _check=False)
    missing, unexpected = st_load_model(model, str(f), strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # the tied float projection is stored once
    if missing or unexpected:
        raise ValueError(f"{f}: weights do not match the structure (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if isinstance(model.proj_out, nn.Linear):
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
