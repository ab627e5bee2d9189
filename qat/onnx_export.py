"""Export a (pruned, quantization-aware) Whisper to ONNX Runtime: one encoder graph, one decoder graph.

    encoder.onnx   input_features (B, n_mels, M), M even, at most 3000 (30 s; fewer for a model trained on
                   audio windows, `slim.window`), F = M / 2 frames
                   -> encoder_hidden_states (B, F, d_model),
                      cross_key_{i} (B, H_i, head_dim, F), cross_value_{i} (B, H_i, F, head_dim)
    decoder.onnx   input_ids (B, T), offset (1,) int64, past_key_{i} (B, H_i, head_dim, P),
                   past_value_{i} (B, H_i, P, head_dim), cross_key_{i}, cross_value_{i}
                   -> logits (B, vocab) of the last position, present_key_{i}, present_value_{i}
    export_config.json   decoding rules (prompt, eos, suppress tokens, max length), structure, I/O names,
                   and every shipped file with its size and sha256.

Why this shape:
* The cross-attention K/V depend only on the audio, so the encoder graph computes them once; the
  decoder step never touches the cross-attention k/v weights (they live in the encoder graph only).
* One decoder graph serves the first step (P = 0: empty past tensors) and every later step, so each
  decoder weight is stored once. Keys are cached transposed (head_dim before time), so the new step's
  keys are concatenated on the last axis and `Q·Kᵀ` reads the cache without a per-step transpose.
* Layers keep their own head counts (a layer with 0 heads has no cache tensors and its attention is
  just the out-projection bias); `offset` gives the position of the first new token, so nothing
  depends on which layers still have a cache.

Modes:
* `float`: fp32, traced with the TorchScript exporter (torch 2.13's default dynamo exporter needs
  `onnxscript`, which this project does not ship; the TorchScript graph is clean and ORT fuses it).
* `dynamic-int8`: ONNX Runtime's `quantize_dynamic` on the float export, the post-training baseline.
* `qdq`: static INT8 carrying the QAT scales. Rather than exporting the fake-quant modules and
  rewriting the graph afterwards, the export wrapper emits the Q/DQ nodes itself (autograd Functions
  with an ONNX `symbolic`): QuantizeLinear/DequantizeLinear with the observer's scale and zero point
  at every quantized Linear input and at both inputs of the attention matmuls, int8 weights stored as
  int8 initializers (per output channel) behind DequantizeLinear. ORT fuses these into
  MatMulIntegerToFloat / QLinearMatMul (checked by `int8_kernel_counts`). Keys/values are
  put on their int8 grid where they are made, so the cached ones (decoder self-attention, the
  encoder's cross K/V) are quantized once, not at every step; the encoder hands the cross K/V to the
  decoder as uint8 tensors (its outputs are uint8 when the cross-attention matmuls are quantized). The
  tied token embedding / output projection is int8 weight-only, stored once (transposed, per-token
  scales): a Gather + dequant for the embedding, a MatMulInteger with an input quantized per row at
  each step for the logits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qat.quantizers import ROW_EPS, ActQuant, QuantPlan, WeightQuant, row_fake_quant, row_qparams
from slim.attention import SlimAttention
from slim.export_format import (CONFIG_FILE, DECODER_FILE, ENCODER_FILE, EXPORT_FORMAT, LAYOUTS, TOKENIZER_FILE,
                                DecodeConfig, file_digest, has_processor, session_options)
from slim.io import atomic_dir
from slim.model import install_explicit_attention, structure_of

MODES = ("float", "dynamic-int8", "qdq")
OPSET = 17
_NEG = torch.finfo(torch.float32).min
PER_ROW = ("per-row", 0)  # `_Tables.linears` value of a Linear whose input is quantized per row at run time


def quantize_weight_per_row(w: torch.Tensor, bits: int = 8) -> WeightQuant:
    """Symmetric per-row int8 (range ±127): the weight-only quantization of the tied embedding."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return WeightQuant(q, scale)


def quant_plan(model: nn.Module) -> QuantPlan:
    """The QAT scales of a fake-quant model prepared by `qat.prepare` (empty for a float model)."""
    from qat.prepare import export_quant_plan

    return export_quant_plan(model)


# ---------------------------------------------------------------------------------------------
# Q/DQ as traceable functions: eager forward = the fake-quant arithmetic, export = the ONNX node


def _grid(x, scale, zero_point):
    """round(x / scale) + zero_point on the zero point's integer grid (uint8, or int8: the same grid shifted by
    128), as float: QuantizeLinear's arithmetic (round half to even, then saturate)."""
    lo, hi = (-128, 127) if zero_point.dtype == torch.int8 else (0, 255)
    return torch.clamp(torch.round(x / scale) + zero_point.float(), lo, hi)


class _Quant(torch.autograd.Function):
    """float -> int8/uint8 per tensor (the tensor a graph hands on quantized). Exported as QuantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        return _grid(x, scale, zero_point).to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("QuantizeLinear", x, scale, zero_point)


class _FakeQuant(torch.autograd.Function):
    """Quantize to the zero point's grid and back, per tensor. Exported as QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        return (_grid(x, scale, zero_point) - zero_point.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class _Dequant(torch.autograd.Function):
    """int -> float, per tensor or per channel along `axis`. Exported as DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):
        shape = [1] * q.dim()
        if scale.dim() == 1:
            shape[axis] = -1
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


class _DynamicQuantMatMul(torch.autograd.Function):
    """x (float, (..., K)) @ int8 weight (K, N) with per-column scales, x quantized per row at each call.

    Each row gets its own uint8 grid (DynamicQuantizeLinear's arithmetic, but per row): ORT's own
    DynamicQuantizeLinear takes one range over the whole tensor, which would make a clip's logits depend
    on what else is in the batch. Exported with standard ops: ReduceMin/ReduceMax -> scale, zero point ->
    Round/Clip -> uint8 -> MatMulInteger, minus zero point x column sums of the weight (integers below
    2^24, so exact in float32), times the scales. The eager forward is the same arithmetic.
    """

    @staticmethod
    def forward(ctx, x, wq, wscale, wcolsum):
        scale, zp = row_qparams(x)
        q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
        acc = torch.matmul(q.double(), wq.double()).float()  # exact integer sums
        return ((acc - zp * wcolsum) * (scale * wscale)).to(x.dtype)

    @staticmethod
    def symbolic(g, x, wq, wscale, wcolsum):
        from torch.onnx import TensorProtoDataType as TP

        q, scale, zp = _row_grid_ops(g, x)
        acc = g.op("Cast", g.op("MatMulInteger", g.op("Cast", q, to_i=TP.UINT8), wq), to_i=TP.FLOAT)
        return g.op("Mul", g.op("Sub", acc, g.op("Mul", zp, wcolsum)), g.op("Mul", scale, wscale))


def _row_grid_ops(g, x):
    """`row_qparams` and the codes of x on them, as ONNX ops: (codes as float, scale, zero point), each row's
    own uint8 grid from its range widened to include 0."""
    zero = g.op("Constant", value_t=torch.tensor(0.0))
    lo = g.op("Min", g.op("ReduceMin", x, axes_i=[-1], keepdims_i=1), zero)  # opset 17: axes attribute
    hi = g.op("Max", g.op("ReduceMax", x, axes_i=[-1], keepdims_i=1), zero)
    scale = g.op("Max", g.op("Div", g.op("Sub", hi, lo), g.op("Constant", value_t=torch.tensor(255.0))),
                 g.op("Constant", value_t=torch.tensor(ROW_EPS)))
    top = g.op("Constant", value_t=torch.tensor(255.0))
    zp = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), scale)), zero, top)
    q = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", x, scale)), zp), zero, top)
    return q, scale, zp


def _nonneg_row_scale_ops(g, x):
    """`row_qparams`' scale of x >= 0, as ONNX ops: max(row max / 255, eps) (the row's zero point is 0)."""
    hi = g.op("ReduceMax", x, axes_i=[-1], keepdims_i=1)
    return g.op("Max", g.op("Div", hi, g.op("Constant", value_t=torch.tensor(255.0))),
                g.op("Constant", value_t=torch.tensor(ROW_EPS)))


class _RowFakeQuant(torch.autograd.Function):
    """x on each row's own uint8 grid and back (`row_qparams`): the per-row first input of an attention
    matmul (`QuantConfig.row_matmuls`). Exported as the row-grid ops, then (codes - zero point) x scale.

    `nonneg`: x is known to be >= 0 (attention probabilities). Then every row's range starts at 0, so its zero
    point is 0 and its scale max(row max / 255, eps): the same grid from half the passes over x (no row
    minimum, no zero point to add and take away; no clip, as x / scale <= 255 already). Those passes over the
    encoder's 1500 x 1500 probabilities per head are what the per-row grid costs at run time.
    """

    @staticmethod
    def forward(ctx, x, nonneg: bool = False):
        return row_fake_quant(x)

    @staticmethod
    def symbolic(g, x, nonneg: bool = False):
        if not nonneg:
            q, scale, zp = _row_grid_ops(g, x)
            return g.op("Mul", g.op("Sub", q, zp), scale)
        scale = _nonneg_row_scale_ops(g, x)
        return g.op("Mul", g.op("Round", g.op("Div", x, scale)), scale)


class _RowProbsMatMul(torch.autograd.Function):
    """P @ V with P (attention probabilities, >= 0) on each row's own uint8 grid (`_RowFakeQuant`, zero point 0)
    and V given as its uint8 codes on its calibrated grid: one integer matmul, then each row's scale times V's.

    Exported as ReduceMax -> scale -> QuantizeLinear of the rows (uint8, zero point 0) -> MatMulInteger(codes,
    V codes, 0, V's zero point) -> Cast -> Mul. Both operands uint8, so ORT runs u8 x u8 kernels, exact on every CPU (u8 x s8 ones
    can saturate without VNNI). A float MatMul of the fake-quantized P (what a per-row grid exported as before)
    made the encoder's attention about 1.6x slower than the calibrated grid's int8 kernel
    (`benchmarks/bench_onnx_graphs.py --only attention_chain`). The eager forward is the same integer sums
    (in float64, exact) times the same scales; the fake-quant model multiplies the dequantized values instead,
    which differs by float rounding only.
    """

    @staticmethod
    def forward(ctx, p, v, v_scale, v_zero_point):
        scale = torch.clamp(p.amax(-1, keepdim=True) / 255, min=ROW_EPS)
        acc = torch.matmul(torch.round(p / scale).double(), v.double() - v_zero_point.double()).float()
        return acc * (scale * v_scale)

    @staticmethod
    def symbolic(g, p, v, v_scale, v_zero_point):
        from torch.onnx import TensorProtoDataType as TP

        scale = _nonneg_row_scale_ops(g, p)
        # the codes from one QuantizeLinear per row (rows flattened, one scale each along axis 0; its zero point
        # omitted: 0, uint8), which ORT vectorizes, instead of Div, Round and Cast passes over P
        rows = g.op("Flatten", p, axis_i=-1)
        codes = g.op("QuantizeLinear", rows, g.op("Reshape", scale, g.op("Constant", value_t=torch.tensor(
            [-1], dtype=torch.int64))), axis_i=0)
        codes = g.op("Reshape", codes, g.op("Shape", p))
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
        acc = g.op("MatMulInteger", codes, v, zero, v_zero_point)
        return g.op("Mul", g.op("Cast", acc, to_i=TP.FLOAT), g.op("Mul", scale, v_scale))


class _Reshape(torch.autograd.Function):
    """`x.reshape(shape)` with ONNX's 0 = "keep this dim" and one -1, exported as one Reshape of a constant.

    Tracing `x.reshape(B, T, H, D)` exports a Shape/Gather/Unsqueeze/Concat chain per reshape, which the
    per-token decoder graph pays for at every step.
    """

    @staticmethod
    def forward(ctx, x, shape):
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


# ---------------------------------------------------------------------------------------------
# the export wrappers


class _Tables(nn.Module):
    """The QAT tensors as buffers (so they export as named initializers), looked up by module."""

    def __init__(self, model: nn.Module, plan: QuantPlan | None):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        # quantized Linear (or conv) -> its input (scale, zero point), or PER_ROW
        self.linears: dict[str, tuple[float, int] | tuple[str, int]] = {}
        self.matmuls: set[str] = set()
        self.row_a: set[str] = set()  # quantized matmuls whose first input is on a grid per row
        self.groups: dict[tuple[str, ...], list[int]] = {}  # fused projections -> output widths
        self.float_in: set[str] = set()  # quantized Linears with input channels in float (`WeightQuant.float_channels`)
        if plan is None:
            return
        for name, (act, w) in plan.linears.items():
            if w.float_channels is not None:
                self._buf(name, "fc", w.float_channels)
                self._buf(name, "fw", w.float_weight.t().contiguous())  # (k, out)
                self.float_in.add(name)
            self._buf(name, "wq", w.q.t().contiguous())  # (in, out): MatMul's B layout, axis 1 = channel
            self._buf(name, "ws", w.scale.float())
            self._buf(name, "wz", torch.zeros_like(w.scale, dtype=torch.int8))
            if act.per_row:
                self._buf(name, "wsum", w.q.float().sum(1))  # per output column, for the zero points
                self.linears[name] = PER_ROW
            else:
                self._act(name, "in", act)
                self.linears[name] = (float(act.scale), int(act.zero_point))
        for name, (a, b) in plan.matmuls.items():
            # b (keys, values) on the int8 grid: with a uint8 `a`, ORT runs u8 x s8 kernels (AVX-512 VNNI,
            # faster than u8 x u8 on the encoder's attention, see `session_options`); same values, see
            # ActQuant. "bu", the same quantizer on the uint8 grid, for the cross K/V the encoder hands
            # over: a graph input has no Q/DQ pair for ORT to rewrite, and int8 activations x uint8 would
            # run on VPMADDUBSW (16-bit sums that can saturate) on CPUs without VNNI
            if a.per_row:
                self.row_a.add(name)
            else:
                self._act(name, "a", a)
            self._act(name, "b", b, signed=True)
            self._act(name, "bu", b)
            self.matmuls.add(name)

    def fuse(self, mods: list[nn.Linear]) -> None:
        """One concatenated projection for Linears that read the same tensor the same way.

        The decoder's q/k/v become one MatMul when all are float or all share one input quantizer (min-max
        observers on the same tensor agree exactly): at one token per step, fewer kernels are what counts.
        The encoder keeps its projections apart: with 1500 frames the fused output is a large float
        tensor that a bias Add and a Split each copy once more before quantizing; separate MatMuls (k_proj
        has no bias, so no Add) skip those copies and make the encoder faster, with the same outputs up to
        rare one-step roundings of the shipped K/V (docs/results.md: `bench_onnx_graphs.py --against`).
        """
        names = tuple(self.name(m) for m in mods)
        acts = {self.linears.get(n) for n in names}
        if len(mods) < 2 or len(acts) != 1 or self.float_in.intersection(names):
            return
        key = "+".join(names)
        bias = torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features) for m in mods])
        self._buf(key, "b", bias)
        if None in acts:
            self._buf(key, "w", torch.cat([m.weight.detach() for m in mods]).t().contiguous())
        else:
            act = acts.pop()
            if act == PER_ROW:
                self._buf(key, "wsum", torch.cat([self.get(n, "wsum") for n in names]))
            else:
                self._act(key, "in", ActQuant(*act))
            self._buf(key, "wq", torch.cat([self.get(n, "wq") for n in names], dim=1))
            self._buf(key, "ws", torch.cat([self.get(n, "ws") for n in names]))
            self._buf(key, "wz", torch.cat([self.get(n, "wz") for n in names]))
        self.groups[names] = [m.out_features for m in mods]

    @staticmethod
    def _key(name: str, what: str) -> str:
        return f"{name.replace('.', '_')}__{what}"

    def _buf(self, name: str, what: str, t: torch.Tensor) -> None:
        self.register_buffer(self._key(name, what), t.detach().clone())

    def _act(self, name: str, what: str, a: ActQuant, signed: bool = False) -> None:
        self._buf(name, f"{what}_scale", torch.tensor(float(a.scale), dtype=torch.float32))
        if signed:
            self._buf(name, f"{what}_zp", torch.tensor(int(a.zero_point) - 128, dtype=torch.int8))
        else:
            self._buf(name, f"{what}_zp", torch.tensor(int(a.zero_point), dtype=torch.uint8))

    def get(self, name: str, what: str) -> torch.Tensor:
        return getattr(self, self._key(name, what))

    def name(self, mod: nn.Module) -> str:
        return self.names[id(mod)]


class _Graph(nn.Module):
    """Linear layers and attention matmuls, float or Q/DQ; shared by the encoder and decoder wrappers."""

    def __init__(self, model: nn.Module, plan: QuantPlan | None):
        super().__init__()
        self.t = _Tables(model, plan)

    def fq(self, x, name: str, what: str):
        return _FakeQuant.apply(x, self.t.get(name, f"{what}_scale"), self.t.get(name, f"{what}_zp"))

    def q(self, x, name: str, what: str):
        return _Quant.apply(x, self.t.get(name, f"{what}_scale"), self.t.get(name, f"{what}_zp"))

    def dq(self, q, name: str, what: str):
        return _Dequant.apply(q, self.t.get(name, f"{what}_scale"), self.t.get(name, f"{what}_zp"), 0)

    def weight(self, name: str):
        return _Dequant.apply(self.t.get(name, "wq"), self.t.get(name, "ws"), self.t.get(name, "wz"), 1)

    def int8_matmul(self, x, key: str, per_row: bool):
        """x @ the int8 weight of `key` (a Linear, or a fused group): input per tensor on its calibrated grid
        (Q/DQ, which ORT fuses into MatMulIntegerToFloat), or per row at run time (`_DynamicQuantMatMul`)."""
        if per_row:
            return _DynamicQuantMatMul.apply(x, self.t.get(key, "wq"), self.t.get(key, "ws"), self.t.get(key, "wsum"))
        return torch.matmul(self.fq(x, key, "in"), self.weight(key))

    def linear(self, x, mod: nn.Linear):
        name = self.t.name(mod)
        if name not in self.t.linears:
            return F.linear(x, mod.weight, mod.bias)
        y = self.int8_matmul(x, name, self.t.linears[name] == PER_ROW)
        if name in self.t.float_in:  # + the float channels (a Gather and a small MatMul); their int8 columns are 0
            y = y + torch.matmul(torch.index_select(x, -1, self.t.get(name, "fc")), self.t.get(name, "fw"))
        return y if mod.bias is None else y + mod.bias

    def conv(self, x, mod: nn.Conv1d, channels_first: bool):
        """A conv of the encoder's front end; x (B, C, T) if channels_first else (B, T, C); out (B, T', C').

        Quantized: the uint8 codes are windowed (`qat.prepare.conv_windows`, padding with the zero point,
        i.e. 0.0) and multiplied by the window weight matrix, which ORT runs as one int8 GEMM
        (MatMulIntegerToFloat), a few times faster than two float Conv nodes on tiny.en's front end
        (docs/results.md; `benchmarks/bench_onnx_graphs.py` measures it).
        """
        from qat.prepare import conv_windows

        name = self.t.name(mod)
        if name not in self.t.linears:  # the module's own weights: a QATConv1d's forward would trace its fake quant
            y = F.conv1d(x if channels_first else x.transpose(1, 2), mod.weight, mod.bias, mod.stride, mod.padding)
            return y.transpose(1, 2)
        q = self.q(x, name, "in")
        if channels_first:
            q = q.transpose(1, 2)
        windows = conv_windows(q, mod.kernel_size[0], mod.stride[0], mod.padding[0], fill=self.t.linears[name][1])
        y = torch.matmul(self.dq(windows, name, "in"), self.weight(name))
        return y if mod.bias is None else y + mod.bias

    def linears(self, x, mods: list[nn.Linear]) -> list[torch.Tensor]:
        """`[linear(x, m) for m in mods]`, as one MatMul + Split when `_Tables.fuse` registered the group."""
        names = tuple(self.t.name(m) for m in mods)
        widths = self.t.groups.get(names)
        if widths is None:  # equal input quantizers of unfused projections: ORT merges their QuantizeLinear nodes
            return [self.linear(x, m) for m in mods]
        key = "+".join(names)
        if names[0] in self.t.linears:
            y = self.int8_matmul(x, key, self.t.linears[names[0]] == PER_ROW)
        else:
            y = torch.matmul(x, self.t.get(key, "w"))
        return list(torch.split(y + self.t.get(key, "b"), widths, dim=-1))

    def quantized(self, mm: nn.Module) -> bool:
        return self.t.name(mm) in self.t.matmuls

    def attend(self, attn, q, k_t, v, mask=None):
        """softmax(q·kᵀ + mask)·v. q (B,H,T,D) scaled; k_t (B,H,D,S), v (B,H,S,D) from `split_kv`.
        Lists of one-head slices (`per_head`): one chain per head, concatenated over heads."""
        if isinstance(q, list):
            return torch.cat([self.attend(attn, *x, mask) for x in zip(q, k_t, v)], dim=1)
        qk, pv = self.t.name(attn.qk), self.t.name(attn.pv)
        if k_t.dtype == torch.uint8:  # shipped quantized by the encoder graph (`split_kv(ship=True)`)
            k_t = self.dq(k_t, qk, "bu")
        if qk in self.t.matmuls:
            q = self.fq_a(q, qk)
        scores = torch.matmul(q, k_t)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1)
        if v.dtype == torch.uint8 and pv in self.t.row_a:  # V's codes (`kv_grid`): one integer matmul
            return _RowProbsMatMul.apply(probs, v, self.t.get(pv, "bu_scale"), self.t.get(pv, "bu_zp"))
        if v.dtype == torch.uint8:
            v = self.dq(v, pv, "bu")
        if pv in self.t.matmuls:
            probs = self.fq_a(probs, pv, nonneg=True)
        return torch.matmul(probs, v)

    def fq_a(self, x, name: str, nonneg: bool = False):
        """The first input of quantized matmul `name` on its grid: calibrated, or each row's own (`nonneg`:
        x >= 0, see `_RowFakeQuant`)."""
        return _RowFakeQuant.apply(x, nonneg) if name in self.t.row_a else self.fq(x, name, "a")

    def self_attention(self, attn, h, past=None, mask=None, per_head: bool = False, context=None):
        """Self-attention of h (B,T,C); `past` = cached (k_t, v) to extend. Returns (output, (k_t, v)).
        `context`: (k_t, v) read after the frames' own (an audio window's silent rest, `slim.window`), as
        `context_codes` makes them; the frames' own then go to `self.own`.

        per_head (the encoder's 1500 x 1500 attention): one QK -> softmax -> quantize -> PV chain per
        head. All heads' float scores at once (6 x 1500 x 1500 x 4 bytes = 54 MB for tiny.en) overflow
        the L3 cache, so each of those four passes goes to memory; one head's 9 MB stays in cache from
        one op to the next, which makes the layer's attention faster (docs/results.md;
        `benchmarks/bench_onnx_graphs.py` measures it). The same tokens on tiny.en's real clips; outputs differ from the
        all-heads graph only where ORT fused PV with the next quantize into QLinearMatMul, whose
        requantization rounds differently from float-then-QuantizeLinear (the fake-quant model's order).
        Decoder steps (T = 1) gain nothing from it.
        """
        if per_head and past is not None:
            raise ValueError("per_head attention has no cache")
        q, k, v = self.linears(h, [attn.q_proj, attn.k_proj, attn.v_proj])
        k_t, v = self.split_kv(attn, k, v, per_head=per_head, context=context)
        if past is not None:
            k_t, v = torch.cat([past[0], k_t], dim=3), torch.cat([past[1], v], dim=2)
        m = mask(k_t.shape[3]) if mask is not None else None
        return self.merge(attn, self.attend(attn, self.split_q(attn, q, per_head), k_t, v, m)), (k_t, v)

    def split_kv(self, attn, k, v, ship: bool = False, per_head: bool = False, context=None):
        """k, v (B,S,H*D) as (B,H,D,S) and (B,H,S,D), already on the matmul inputs' int8 grid.

        Quantizing here, where the keys/values are made, means a cached tensor is quantized once. In the
        encoder the Q/DQ pairs meet at the matmul and ORT fuses them into int8 kernels. `ship`: hand
        the quantized uint8 tensors themselves over (the encoder's cross K/V): the decoder step reads a
        quarter of the bytes (1500 frames x d_model x 2 per layer, at every step) and dequantizes them
        at its matmuls. The decoder's own small self-attention cache stays fake-quantized float.
        """
        shape = (0, -1, attn.num_heads, attn.head_dim)
        k_t = _Reshape.apply(k, shape).permute(0, 2, 3, 1)
        v = _Reshape.apply(v, shape).transpose(1, 2)
        if context is not None:
            return self.join_context(attn, k_t, v, context, per_head)
        if per_head:  # sliced before quantizing: ORT fuses a Q/DQ pair into an int8 matmul only where it feeds one
            pairs = [self.kv_grid(attn, a, b, ship, v_codes=True) for a, b in zip(torch.split(k_t, 1, 1),
                                                                                 torch.split(v, 1, 1))]
            return [a for a, _ in pairs], [b for _, b in pairs]
        return self.kv_grid(attn, k_t, v, ship)

    def kv_grid(self, attn, k_t, v, ship: bool = False, v_codes: bool = False):
        """k_t, v on their grids, fake-quantized; `ship`: both as uint8 codes, handed to the decoder graph.
        `v_codes`: v as uint8 codes where its P.V takes the probabilities per row (`_RowProbsMatMul`), for a v
        that is used right away (not one that joins a float cache or a graph output)."""
        if self.quantized(attn.qk):
            k_t = self.q(k_t, self.t.name(attn.qk), "bu") if ship else self.fq(k_t, self.t.name(attn.qk), "b")
        if self.quantized(attn.pv):
            pv = self.t.name(attn.pv)
            v = self.q(v, pv, "bu") if ship or (v_codes and pv in self.t.row_a) else self.fq(v, pv, "b")
        return k_t, v

    def join_context(self, attn, k_t, v, context, per_head: bool):
        """The window's k_t, v followed by `context` (the silent rest; batch 1, broadcast, or the batch's own),
        as `split_kv` returns them.
        Both are joined as the matmuls' int8 codes (float where a matmul is float), so the rest is
        quantized once, when the runtime makes it, and a DequantizeLinear still feeds each matmul for ORT
        to fuse; the window's own codes go to `self.own` (the graph's `self_*` outputs)."""
        own = self.context_codes(attn, k_t, v)
        self.own.extend(own)
        k_t, v = (torch.cat([a, c.expand(a.shape[0], -1, -1, -1)], dim=d) for a, c, d in zip(own, context, (3, 2)))
        if not per_head:
            return self.from_codes(attn, k_t, v)
        pairs = [self.from_codes(attn, a, b) for a, b in zip(torch.split(k_t, 1, 1), torch.split(v, 1, 1))]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def context_codes(self, attn, k_t, v) -> tuple:
        """k_t, v as what a context holds: int8 codes on the matmul's grid (uint8 for a P.V that takes its
        probabilities per row, which reads the codes themselves), float where the matmul is float."""
        qk, pv = self.t.name(attn.qk), self.t.name(attn.pv)
        if qk in self.t.matmuls:
            k_t = self.q(k_t, qk, "b")
        if pv in self.t.matmuls:
            v = self.q(v, pv, "bu" if pv in self.t.row_a else "b")
        return k_t, v

    def from_codes(self, attn, k_t, v) -> tuple:
        """`context_codes`' tensors as `attend` reads them."""
        qk, pv = self.t.name(attn.qk), self.t.name(attn.pv)
        if qk in self.t.matmuls:
            k_t = self.dq(k_t, qk, "b")
        if pv in self.t.matmuls and pv not in self.t.row_a:
            v = self.dq(v, pv, "b")
        return k_t, v

    def shipped_dtypes(self, attn) -> tuple:
        """dtypes of the (k_t, v) that `split_kv(ship=True)` hands from the encoder graph to the decoder graph."""
        return tuple(torch.uint8 if self.quantized(mm) else torch.float32 for mm in (attn.qk, attn.pv))

    def split_q(self, attn, q, per_head: bool = False):
        q = _Reshape.apply(q * attn.scaling, (0, -1, attn.num_heads, attn.head_dim)).transpose(1, 2)
        return list(torch.split(q, 1, 1)) if per_head else q

    def merge(self, attn, out):
        return self.linear(_Reshape.apply(out.transpose(1, 2), (0, 0, -1)), attn.out_proj)

    def mlp(self, layer, x):
        if layer.fc1.out_features == 0:  # every neuron pruned: only fc2's bias is left
            return torch.zeros_like(x) + layer.fc2.bias
        return self.linear(layer.activation_fn(self.linear(x, layer.fc1)), layer.fc2)


def _no_heads(attn, x):
    """An attention with every head pruned contributes its out-projection bias only."""
    return torch.zeros_like(x) + attn.out_proj.bias if attn.out_proj.bias is not None else torch.zeros_like(x)


class _EncoderGraph(_Graph):
    """input_features -> encoder_hidden_states and the cross-attention K/V for the decoder graph. With
    `context` (a "silence" audio window, `slim.window`): also each encoder layer's (k_t, v) to read after
    the frames' own as inputs (`context_*`, `context_codes`), and the frames' own as outputs (`self_*`), from
    which the runtime makes that context (the same graph run once on a silent 30 s input)."""

    def __init__(self, model, plan, context: bool = False):
        super().__init__(model, plan)
        self.encoder = model.model.encoder
        self.cross = nn.ModuleList([l.encoder_attn for l in model.model.decoder.layers if l.encoder_attn.num_heads])
        self.context = context
        self.own: list = []

    def hidden(self, input_features, contexts=None):
        """The encoder's output (B, frames / 2, d_model); the positions follow the frames given. `contexts`:
        (k_t, v) per encoder layer with heads, read after the frames' own."""
        e = self.encoder
        x = F.gelu(self.conv(F.gelu(self.conv(input_features, e.conv1, True)), e.conv2, False))
        x = x + e.embed_positions.weight[: x.shape[1]]
        contexts = iter(contexts or ())
        for layer in e.layers:
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            if attn.num_heads:
                x = x + self.self_attention(attn, h, per_head=True, context=next(contexts, None))[0]
            else:
                x = x + _no_heads(attn, h)
            x = x + self.mlp(layer, layer.final_layer_norm(x))
        return e.layer_norm(x)

    def forward(self, input_features, *contexts):
        self.own = []
        pairs = list(zip(contexts[::2], contexts[1::2])) if self.context else None
        x = self.hidden(input_features, pairs)
        outs = [x]
        kv = self.linears(x, [p for a in self.cross for p in (a.k_proj, a.v_proj)])
        for i, attn in enumerate(self.cross):
            outs.extend(self.split_kv(attn, kv[2 * i], kv[2 * i + 1], ship=True))
        return tuple(outs + self.own)


class _DecoderGraph(_Graph):
    def __init__(self, model, plan: QuantPlan | None):
        super().__init__(model, plan)
        self.decoder = model.model.decoder
        self.self_heads = [l.self_attn.num_heads for l in self.decoder.layers]
        self.cross_heads = [l.encoder_attn.num_heads for l in self.decoder.layers]
        emb = model.model.decoder.embed_tokens.weight.detach()
        self.emb_quant = plan is not None and plan.embedding is not None
        if self.emb_quant:
            # stored once, transposed (d_model, vocab): MatMulInteger's B as is, and a Gather on axis 1
            self.register_buffer("embed_q_t", plan.embedding.q.t().contiguous())
            self.register_buffer("embed_scale", plan.embedding.scale.float().clone())
            self.register_buffer("embed_zero", torch.zeros_like(plan.embedding.scale, dtype=torch.int8))
            self.register_buffer("embed_colsum", plan.embedding.q.float().sum(1))  # per vocabulary column
            self.logits_act = plan.logits_act
            if plan.logits_act is not None:
                self.t._act("proj_out", "in", plan.logits_act)
        else:
            self.register_buffer("embed_t", emb.t().contiguous())  # stored once: MatMul B and Gather axis 1
        for layer in self.decoder.layers:
            a = layer.self_attn
            if a.num_heads:
                self.t.fuse([a.q_proj, a.k_proj, a.v_proj])

    def embed(self, input_ids):
        B, T = input_ids.shape[0], input_ids.shape[1]
        flat = input_ids.reshape(-1)
        if self.emb_quant:
            rows = torch.index_select(self.embed_q_t, 1, flat)  # (C, B*T) int8
            x = rows.t().float() * torch.index_select(self.embed_scale, 0, flat)[:, None]
        else:
            x = torch.index_select(self.embed_t, 1, flat).t()
        return x.reshape(B, T, -1)

    def logits(self, h):
        if not self.emb_quant:
            return torch.matmul(h, self.embed_t)
        if self.logits_act is None:
            return _DynamicQuantMatMul.apply(h, self.embed_q_t, self.embed_scale, self.embed_colsum)
        h = self.fq(h, "proj_out", "in")
        return torch.matmul(h, _Dequant.apply(self.embed_q_t, self.embed_scale, self.embed_zero, 1))

    def forward(self, input_ids, offset, *caches):
        """caches: per layer with self heads (past_key, past_value), then per layer with cross heads (key, value)."""
        d = self.decoder
        T = input_ids.shape[1]
        pos = offset + torch.arange(T, dtype=torch.int64)
        x = self.embed(input_ids) + F.embedding(pos, d.embed_positions.weight)
        caches = list(caches)
        n_self = 2 * sum(1 for h in self.self_heads if h)
        past, cross = caches[:n_self], caches[n_self:]
        presents = []

        masks = []

        def causal(S):  # over [past, new]: new token i (position S-T+i) sees keys 0 .. S-T+i; built once
            if not masks:
                q_pos = torch.arange(T, dtype=torch.int64)[:, None] + (S - T)
                masks.append(torch.where(torch.arange(S, dtype=torch.int64)[None, :] > q_pos, _NEG, 0.0))
            return masks[0]

        for layer in d.layers:
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            if attn.num_heads == 0:
                x = x + _no_heads(attn, h)
            else:
                out, kv = self.self_attention(attn, h, past=(past.pop(0), past.pop(0)), mask=causal)
                x = x + out
                presents += kv
            attn = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            if attn.num_heads == 0:
                x = x + _no_heads(attn, h)
            else:
                q = self.split_q(attn, self.linear(h, attn.q_proj))
                x = x + self.merge(attn, self.attend(attn, q, cross.pop(0), cross.pop(0)))
            x = x + self.mlp(layer, layer.final_layer_norm(x))
        h = d.layer_norm(x[:, -1])
        return (self.logits(h), *presents)


# ---------------------------------------------------------------------------------------------
# decoding rules shipped with the graphs


# ---------------------------------------------------------------------------------------------
# exporting


def _names(self_heads: list[int], cross_heads: list[int], encoder_heads: list[int] | None = None) -> dict[str, list[str]]:
    """Graph input/output names. `encoder_heads` (a "silence" window): the encoder's context inputs
    (`context_*`) and its layers' own K/V outputs (`self_*`)."""
    past = [f"past_{kv}_{i}" for i, h in enumerate(self_heads) if h for kv in ("key", "value")]
    names = {
        "cross": [f"cross_{kv}_{i}" for i, h in enumerate(cross_heads) if h for kv in ("key", "value")],
        "past": past,
        "present": [n.replace("past_", "present_") for n in past],
    }
    if encoder_heads is not None:
        names["context"] = [f"context_{kv}_{i}" for i, h in enumerate(encoder_heads) if h for kv in ("key", "value")]
        names["self"] = [n.replace("context_", "self_") for n in names["context"]]
    return names


def _export_graphs(model, plan: QuantPlan | None, tmp: Path, opset: int) -> dict:
    from slim.model import audio_window_of
    from slim.window import silence_context

    context = silence_context(audio_window_of(model))
    enc, dec = _EncoderGraph(model, plan, context).eval(), _DecoderGraph(model, plan).eval()
    encoder_heads = [l.self_attn.num_heads for l in model.model.encoder.layers]
    names = _names(dec.self_heads, dec.cross_heads, encoder_heads if context else None)
    cfg = model.config
    feats = torch.zeros(1, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    frames = cfg.max_source_positions
    # example cross K/V for tracing the decoder: only their shapes and dtypes matter (no second encoder pass)
    cross = []
    for layer in model.model.decoder.layers:
        a = layer.encoder_attn
        if a.num_heads:
            kt, vt = dec.shipped_dtypes(a)
            cross += [torch.zeros(1, a.num_heads, a.head_dim, frames, dtype=kt),
                      torch.zeros(1, a.num_heads, frames, a.head_dim, dtype=vt)]
    enc_names = ["encoder_hidden_states"] + names["cross"] + names.get("self", [])
    batch = {0: "batch"}
    # the frame count is dynamic: a model with an audio window is fed only the frames it needs
    axes = {"input_features": {0: "batch", 2: "mel_frames"}, "encoder_hidden_states": {0: "batch", 1: "frames"}}
    for n in names["cross"] + names.get("self", []):
        axes[n] = {0: "batch", (3 if "key" in n else 2): "frames"}
    contexts = []
    if context:
        for layer in model.model.encoder.layers:
            a, S = layer.self_attn, 3  # traced with a few frames; the axis is dynamic
            if a.num_heads:  # examples in the inputs' dtypes: what `context_codes` makes
                contexts += enc.context_codes(a, torch.zeros(1, a.num_heads, a.head_dim, S),
                                              torch.zeros(1, a.num_heads, S, a.head_dim))
        for n in names["context"]:  # batch 1 (one level for the batch, broadcast) or the batch's own
            axes[n] = {0: "context_batch", (3 if "key" in n else 2): "context"}
    _onnx_export(enc, (feats, *contexts), tmp / ENCODER_FILE, ["input_features"] + names.get("context", []),
                 enc_names, axes, opset)

    # trace the decoder with a non-empty past, so every cache shape is a traced (dynamic) shape
    P, T = 3, 2
    past = []
    for layer in model.model.decoder.layers:
        H, D = layer.self_attn.num_heads, layer.self_attn.head_dim
        if H:
            past += [torch.zeros(1, H, D, P), torch.zeros(1, H, P, D)]
    ids = torch.full((1, T), int(cfg.decoder_start_token_id), dtype=torch.int64)
    offset = torch.tensor([P], dtype=torch.int64)
    args = (ids, offset, *past, *cross)
    in_names = ["input_ids", "offset"] + names["past"] + names["cross"]
    out_names = ["logits"] + names["present"]
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "logits": batch}
    for n in names["cross"]:
        axes[n] = {0: "batch", (3 if "key" in n else 2): "frames"}
    for n in names["past"]:
        axes[n] = {0: "batch", (3 if "key" in n else 2): "past"}
    for n in names["present"]:
        axes[n] = {0: "batch", (3 if "key" in n else 2): "total"}
    _onnx_export(dec, args, tmp / DECODER_FILE, in_names, out_names, axes, opset)
    return {"names": names}


def _onnx_export(module, args, path: Path, inputs, outputs, axes, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)


def _compact_float_initializers(path: Path, min_elements: int | None = None) -> list[str]:
    """Store large fp32 initializers as fp16 + Cast where fp16 holds them exactly (lossless).

    A model imported from a float16 CTranslate2 directory keeps fp16-exact values in every tensor it was
    not fine-tuned on (at least the encoder's fixed positional table); ORT folds the Cast at load, so
    the arithmetic is unchanged and only the file shrinks.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from qat.prepare import FP16_MIN_ELEMENTS

    min_elements = FP16_MIN_ELEMENTS if min_elements is None else min_elements
    model = onnx.load(str(path))
    graph, done = model.graph, []
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            continue
        a = numpy_helper.to_array(init)
        h = a.astype(np.float16)
        if not np.array_equal(h.astype(np.float32), a):
            continue
        name = init.name
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(h, name + "_fp16"))
        graph.node.insert(0, onnx.helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                                   name=f"cast_{name}"))
        done.append(name)
    if done:
        onnx.save(model, str(path))
    return done


# (weight input, its zero point input) of the ops that multiply an int8 weight (ONNX and ONNX Runtime contrib)
_WEIGHT_ZERO_POINT = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3), "QLinearMatMul": (3, 5),
                      "DynamicQuantizeMatMul": (1, 4), "MatMulIntegerToFloat": (1, 5)}


class _GraphIndex:
    """An ONNX model's initializers and every node with the graph that holds it (If branches included: the
    merged decoder's read the outer initializers), and `resolve`, which follows the TorchScript exporter's
    Identity copies back to the initializer they read. What the int8 weight passes below share."""

    def __init__(self, model):
        import onnx

        self.inits = {i.name: i for i in model.graph.initializer}
        self.nodes: list[tuple] = []  # (graph, node)

        def visit(g):
            for node in g.node:
                self.nodes.append((g, node))
                for a in node.attribute:
                    for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        visit(sub)

        visit(model.graph)
        self.source = {n.output[0]: n.input[0] for _, n in self.nodes if n.op_type == "Identity"}

    def resolve(self, name: str) -> str:
        while name in self.source:
            name = self.source[name]
        return name


def _unshare_zero_points(path: Path) -> int:
    """Give every int8 weight its own zero-point initializer; returns the copies made.

    The TorchScript exporter stores equal constants once (and reads them through Identity nodes), so one
    all-zero zero-point tensor serves every weight with the same channel count. ONNX Runtime's
    `session.x64quantprecision` (which `slim.export_format.session_options` sets on x86 without VNNI, where it
    turns int8 weights into uint8 + 128, so the int8 kernels cannot saturate) rewrites each weight's zero point in
    place and fails to load a graph where two weights share one ("Attempt to replace the existing tensor").
    Zero points are a byte per output channel; the weights themselves stay shared.
    """
    import onnx

    model = onnx.load(str(path))
    ix = _GraphIndex(model)
    taken, copies = set(), []
    for _, node in ix.nodes:
        w, z = _WEIGHT_ZERO_POINT.get(node.op_type, (None, None))
        if w is None or z >= len(node.input) or ix.resolve(node.input[w]) not in ix.inits:
            continue
        zp = ix.resolve(node.input[z])
        if zp not in ix.inits or ix.inits[zp].data_type != onnx.TensorProto.INT8:
            continue
        if zp in taken:
            t = onnx.TensorProto()
            t.CopyFrom(ix.inits[zp])
            t.name = f"{zp}__{len(copies)}"
            copies.append(t)
            zp = t.name
        taken.add(zp)
        node.input[z] = zp
    if copies:
        model.graph.initializer.extend(copies)
        onnx.save(model, str(path))
    return len(copies)


def _weights_as_uint8(path: Path) -> int:
    """Store every int8 weight as uint8 + 128 with zero point 128 (the same values); returns how many.

    For runtimes that keep ONNX Runtime's default kernels (sherpa-onnx, transformers.js): on x86 CPUs without
    VNNI their u8 x s8 products sum in saturating 16-bit pairs, while u8 x u8 sums are exact (docs/runtimes.md).
    A weight is converted where every reader is a DequantizeLinear (its zero point becomes uint8 + 128), a
    MatMulInteger's B (its zero point, or 0, plus 128, as uint8) or a Gather (the tied embedding's rows, followed by the
    -128 that gives back the int8 codes the graph goes on with); a weight read any other way stays int8.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    ix = _GraphIndex(model)
    inits, resolve = ix.inits, ix.resolve
    readers: dict[str, list] = {}  # int8 weight -> [(graph, node, input index)]

    for g, node in ix.nodes:
        if node.op_type == "Identity":
            continue
        for i, name in enumerate(node.input):
            w = resolve(name)
            if w in inits and inits[w].data_type == onnx.TensorProto.INT8 and len(inits[w].dims) >= 2:
                readers.setdefault(w, []).append((g, node, i))
    with_zero_point = ("DequantizeLinear", "MatMulInteger")
    ok = {(op, _WEIGHT_ZERO_POINT[op][0]) for op in with_zero_point} | {("Gather", 0)}
    done = 0
    for w, uses in readers.items():
        if any((n.op_type, i) not in ok for _, n, i in uses):
            continue
        codes = numpy_helper.to_array(inits[w]).astype(np.int16) + 128
        inits[w].CopyFrom(numpy_helper.from_array(codes.astype(np.uint8), w))
        for k, (g, node, i) in enumerate(uses):
            if node.op_type in with_zero_point:  # its zero point + 128, as uint8
                z = _WEIGHT_ZERO_POINT[node.op_type][1]
                if len(node.input) > z and node.input[z]:
                    zp = numpy_helper.to_array(inits[resolve(node.input[z])]).astype(np.int16) + 128
                else:  # absent: 0, shaped like a DequantizeLinear's scale (MatMulInteger's: per tensor)
                    shape = inits[resolve(node.input[1])].dims if node.op_type == "DequantizeLinear" else ()
                    zp = np.full(tuple(shape), 128, np.int16)
                new = numpy_helper.from_array(zp.astype(np.uint8), f"{w}__u8zp{k}")
                node.input.extend([""] * (z - len(node.input)))
                del node.input[z:]
                node.input.append(new.name)
            else:  # Gather: uint8 rows -> the int8 codes the graph read before
                out = node.output[0]
                node.output[0] = f"{out}__u8"
                at = list(g.node).index(node) + 1
                tail = [helper.make_node("Cast", [f"{out}__u8"], [f"{out}__i32"], to=onnx.TensorProto.INT32),
                        helper.make_node("Sub", [f"{out}__i32", f"{w}__128"], [f"{out}__s"]),
                        helper.make_node("Cast", [f"{out}__s"], [out], to=onnx.TensorProto.INT8)]
                for j, t in enumerate(tail):
                    g.node.insert(at + j, t)
                new = numpy_helper.from_array(np.array(128, np.int32), f"{w}__128")
            if new.name not in inits:
                graph.initializer.append(new)
                inits[new.name] = new
        done += 1
    if done:
        aliases = {n for n in ix.source if resolve(n) in readers}
        for vi in list(graph.value_info):  # types recorded for the converted tensors' Identity copies
            if vi.name in aliases:
                graph.value_info.remove(vi)
        onnx.save(model, str(path))
    return done


def set_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace an ONNX file's metadata (key/value strings, what runtimes read the model's settings from)."""
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.save(m, str(path))


def _quantize_dynamic(path: Path, per_channel: bool = False) -> None:
    """ORT's post-training dynamic INT8 (int8 weights, activations quantized per call), in place;
    `per_channel`: one weight scale per output channel instead of one per tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".float.onnx")
    os.replace(path, tmp)
    # Conv stays float: ORT's CPU ConvInteger has no int8-weight kernel.
    quantize_dynamic(str(tmp), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                     per_channel=per_channel)
    tmp.unlink()


def load_source_model(src):
    """(model, processor or None): a model object as is; a directory through the loader its structure
    file asks for (`qat.load.load_model_dir`)."""
    if isinstance(src, nn.Module):
        return src, None
    from qat.load import load_model_dir
    from slim.model import load_processor

    model, _ = load_model_dir(src)
    return model, load_processor(src) if has_processor(src) else None


def export_model(src, out: str | Path, mode: str = "qdq", *, processor=None, plan: QuantPlan | None = None,
                 prompt: list[int] | None = None, language: str = "en", max_length: int | None = None,
                 opset: int = OPSET, layout: str = "slim", per_channel: bool = False,
                 uint8_weights: bool = False, audio_window: dict | None = None) -> Path:
    """Export `src` (a model or a model directory) to `out` in `layout` (`slim.export_format.LAYOUTS`):
    "slim" for `slim.runtime.OnnxEngine`, "sherpa-onnx" for sherpa-onnx's recognizer (`qat.export_sherpa`),
    "hf" for transformers.js and onnx-asr (`qat.export_hf`).

    mode: "float" (fp32), "dynamic-int8" (ORT quantize_dynamic of the float export) or "qdq" (static INT8
    with the QAT scales of a fake-quant model, or of `plan` when given). `per_channel`: dynamic-int8 with
    per-channel weight scales (ORT's default is per tensor). `uint8_weights`: the int8 weights stored as
    uint8 + 128 (`_weights_as_uint8`), for runtimes that keep ONNX Runtime's default kernels on x86 CPUs without
    VNNI; the slim runtime needs no such export. `audio_window`: a "silence" window (`slim.window`) recorded
    with the export: the slim layout's encoder then takes context inputs and the runtime encodes only the
    frames a clip needs; the other layouts' runtimes run it on 30 s. Writes atomically.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if uint8_weights and mode == "float":
        raise ValueError("uint8_weights re-stores int8 weights: it needs mode qdq or dynamic-int8, not float")
    if layout not in LAYOUTS:
        raise ValueError(f"format must be one of {LAYOUTS}, got {layout!r}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    if not isinstance(src, nn.Module):
        from slim.model import read_structure

        s = read_structure(src) if (Path(src) / "config.json").exists() else None
        if s is not None and (s.quant or {}).get("converted"):
            raise ValueError(f"{src}: is a converted INT8 model; export reads the fake-quant (QAT/PTQ) model it "
                             "was converted from")
    model, src_processor = load_source_model(src)
    processor = processor or src_processor
    if audio_window is not None:
        from slim.model import audio_window_of, set_audio_window
        from slim.window import check_audio_window, silence_context

        if not silence_context(check_audio_window(audio_window)):
            raise ValueError("audio_window: an export sets only a window with context 'silence' (no training); "
                             "a trained window comes from an audio-context stage")
        if audio_window_of(model) is not None:
            raise ValueError(f"audio_window: the model already has one ({audio_window_of(model)})")
        model = copy.deepcopy(model) if model is src else model
        set_audio_window(model, audio_window)
    if not all(isinstance(l.self_attn, SlimAttention) for l in model.model.encoder.layers):
        model = install_explicit_attention(copy.deepcopy(model))  # a stock HF model: leave the caller's alone
    model = model.eval()
    if mode == "qdq":
        plan = plan or quant_plan(model)
        if not plan.linears and not plan.matmuls:
            raise ValueError("mode='qdq' needs QAT scales, and this model has no quantizers: prepare it with "
                             "qat.prepare (prepare_qat + calibrate, or ptq), or export mode 'float' / 'dynamic-int8'")
        if plan.embedding is None:
            plan = dataclasses.replace(plan, embedding=quantize_weight_per_row(model.model.decoder.embed_tokens.weight))
    else:
        plan = None
    decode = DecodeConfig.from_model(model, prompt=prompt, language=language, max_length=max_length)

    if layout != "slim" and processor is None:
        raise ValueError(f"{src if not isinstance(src, nn.Module) else 'the model'}: has no tokenizer "
                         f"(tokenizer.json), which the {layout} layout ships; pass a processor")

    out = Path(out)
    with atomic_dir(out) as tmp:
        extra = {}
        if layout == "slim":
            extra["io"] = _export_graphs(model, plan, tmp, opset)
            graphs = [ENCODER_FILE, DECODER_FILE]
            if processor is not None:
                processor.save_pretrained(tmp)
        elif layout == "hf":
            from qat import export_hf

            info = export_hf.export_graphs(model, plan, decode, processor, tmp, opset, mode, per_channel)
            graphs = [info["encoder"], info["decoder"]]
            extra[layout] = info
        else:
            from qat import export_sherpa

            with tempfile.TemporaryDirectory() as t:
                processor.save_pretrained(t)
                info = export_sherpa.export_graphs(model, plan, decode, Path(t) / TOKENIZER_FILE, tmp, opset, mode)
            graphs = [info["encoder"], info["decoder"]]
            extra[layout] = {**info, "required": graphs + [export_sherpa.TOKENS]}
        compacted = []
        for f in graphs:
            if f not in extra.get(layout, {}).get("quantized", []):
                if mode == "dynamic-int8":
                    _quantize_dynamic(tmp / f, per_channel)
                elif mode == "qdq":
                    compacted += _compact_float_initializers(tmp / f)
            if mode != "float":
                _unshare_zero_points(tmp / f)
                if uint8_weights:
                    _weights_as_uint8(tmp / f)
        for f, meta in extra.get(layout, {}).get("metadata", {}).items():  # last: the rewrites above keep none
            set_metadata(tmp / f, meta)
        structure = structure_of(model)
        cfg = model.config
        files = {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        config = {
            "format": EXPORT_FORMAT,
            "layout": layout,
            "mode": mode,
            "opset": opset,
            "decode": dataclasses.asdict(decode),
            "model": {"d_model": cfg.d_model, "vocab_size": cfg.vocab_size, "num_mel_bins": cfg.num_mel_bins,
                      "n_frames": 2 * cfg.max_source_positions, "head_dim": structure.head_dim},
            "structure": {k: v for k, v in structure.to_dict().items() if k != "quant"},
            **extra,
            "fp16_stored": compacted,
            "uint8_weights": uint8_weights,
            "files": files,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def optimized_graph(onnx_path: str | Path, threads: int = 1):
    """The graph ORT actually runs (`session_options`: all optimizations, QDQ fused into int8 kernels)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = session_options(threads)
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def int8_kernel_counts(onnx_path: str | Path, threads: int = 1) -> dict[str, int]:
    """Op types of `optimized_graph`, to check that QDQ became int8 kernels."""
    counts: dict[str, int] = {}
    for node in optimized_graph(onnx_path, threads).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
