"""Fake quantization on tensors, the quantizer module that carries observer state and scales, and the
plain records of those scales that convert and export read (`ActQuant`, `WeightQuant`, `QuantPlan`).

The grids (one convention for fake quant, the PyTorch INT8 kernels and the ONNX QDQ export):

* weights: int8 symmetric, one scale per output channel, zero point 0, range [-127, 127]
  (-128 is left out so the grid is symmetric: w ≈ q * scale[:, None]);
* activations (Linear inputs, both inputs of the attention matmuls): **uint8 affine per tensor**,
  q = clamp(round(x / scale) + zero_point, 0, 255), x ≈ (q - zero_point) * scale. uint8 is what
  PyTorch's fbgemm/x86 quantized Linear takes (quint8) and what ONNX Runtime's fast U8S8
  MatMulInteger/QLinearMatMul path on x86 wants, so the exporter and `qat.convert` read the
  scale/zero point as they are. (A symmetric int8 activation is the same grid shifted by 128.)

Rounding is `torch.round` (half to even) of `x / scale`, as ONNX `QuantizeLinear` does.

`FakeQuantizer` states, all of them buffers (so `state_dict`, safetensors and `accelerator.save_state`
carry them and a resume restores them bit-exactly):

    enabled    False: identity, the input tensor is returned untouched (bit-exact float)
    observing  True: statistics are updated and the scale recomputed; False: scale frozen
    min_val / max_val / num_batches   the observer statistics
    scale / zero_point                what fake quant, convert and export use

Observers (activations update only while the quantizer is in training mode, so evaluation and
`generate` during training never move them; `calibrate` switches the quantizers alone to training):

    minmax          running min / max over everything seen
    moving_average  min/max of each batch, averaged with `momentum` (first batch taken as is)
    percentile      the (100-p)th / p-th percentile of each batch, averaged over batches
    current         the range of the latest tensor only: the weight quantizers' observer, so the
                    weight scale follows the weight while it trains (and convert sees the same)
    dynamic         no statistics: every row (last axis) of every tensor gets its own uint8 grid from
                    its own range at each call (`row_qparams`), as the INT8 engines compute it at run
                    time; nothing to calibrate, and a long window or a loud clip keeps its resolution

Learned scales (LSQ, Esser et al. 2020): the scale is an `nn.Parameter` initialised from the observer;
its gradient comes from autograd through `fake_quant` (which gives exactly LSQ's step-size gradient)
multiplied by g = 1 / sqrt(n * qmax), n = elements per scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

Observer = Literal["minmax", "moving_average", "percentile", "current", "dynamic"]
OBSERVERS = ("minmax", "moving_average", "percentile", "current", "dynamic")
EPS = 1e-8  # smallest scale: an all-zero channel quantizes to 0 instead of dividing by zero
ROW_EPS = 1e-30  # smallest per-row scale of a dynamic grid (an all-zero row: codes = zero point, value 0)
PERCENTILE_SAMPLES = 1 << 22  # elements per batch a percentile is taken over (see _percentiles)


# ---------------------------------------------------------------------------------------------
# functions on tensors


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _shape(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Broadcast a per-channel vector `t` along `axis` of `x` (a scalar stays a scalar)."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize and dequantize `x` in float: (clamp(round(x / s) + z, qmin, qmax) - z) * s.

    Gradients: straight through the rounding for `x` (zero where the value was clipped), and LSQ's
    step-size gradient for `scale` when it requires grad (-x/s + round(x/s) inside the range,
    qmin - z or qmax - z outside). `zero_point` gets none (it is an integer).
    """
    s = _shape(scale, x, axis)
    z = _shape(zero_point, x, axis).to(x.dtype)
    if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
        # inference: the same operations in place on one buffer (attention probabilities are tens of
        # millions of values per layer; five temporaries would cost more than the matmul they feed)
        return (x / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    q = torch.clamp(_RoundSTE.apply(x / s) + z, qmin, qmax)
    return (q - z) * s


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Integer codes of `x` (int8 if qmin < 0 else uint8 unless `dtype` says otherwise)."""
    dtype = dtype or (torch.int8 if qmin < 0 else torch.uint8)
    s, z = _shape(scale, x, axis), _shape(zero_point, x, axis)
    return torch.clamp(torch.round(x.detach().float() / s) + z, qmin, qmax).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """(q - zero_point) * scale in float32."""
    s, z = _shape(scale, q, axis), _shape(zero_point, q, axis)
    return (q.float() - z.float()) * s


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of an asymmetric grid covering [lo, hi] (widened to include 0, so that
    zero padding and ReLU-like zeros are exact)."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale.float(), zero_point


def symmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (zero point 0) of a symmetric grid covering [-max|x|, max|x|]."""
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = torch.clamp(amax / qmax, min=EPS)
    return scale.float(), torch.zeros_like(scale, dtype=torch.int32)


def row_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 affine grid of each row (last axis) of `x`, from that row's own range widened to include 0:
    scale (..., 1) and zero point (..., 1), both float. DynamicQuantizeLinear's arithmetic, but per row
    (ONNX Runtime's op takes one range over the whole tensor, which would make a clip's output depend on the
    rest of its batch); the fake quant, the PyTorch INT8 model and the ONNX graphs all compute it so."""
    lo = torch.clamp(x.amin(-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(-1, keepdim=True), min=0)
    scale = torch.clamp((hi - lo) / 255, min=ROW_EPS)
    return scale, torch.clamp(torch.round(-lo / scale), 0, 255)


def row_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x on each row's own uint8 grid (`row_qparams`) and back, in float32: a per-row quantized input, as every
    engine computes it."""
    x = x.float()
    scale, zero_point = row_qparams(x.detach())
    return fake_quant(x, scale, zero_point, 0, 255)


def _percentiles(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(100-p)th and p-th percentiles of `x`.

    An exact quantile over a batch of attention probabilities (tens of millions of values) costs
    more than the forward pass, so at most PERCENTILE_SAMPLES evenly strided values are used
    (deterministic, so a resumed calibration repeats exactly).
    """
    flat = x.reshape(-1).float()
    if flat.numel() > PERCENTILE_SAMPLES:
        flat = flat[:: math.ceil(flat.numel() / PERCENTILE_SAMPLES)]
    n = flat.numel()
    k_hi = min(n, max(1, math.ceil(n * p / 100.0)))
    k_lo = max(1, n + 1 - k_hi)
    return flat.kthvalue(k_lo).values, flat.kthvalue(k_hi).values


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """`t` in the forward pass, gradient multiplied by `g` in the backward pass (LSQ)."""
    return (t - t * g).detach() + t * g


# ---------------------------------------------------------------------------------------------
# the module


class FakeQuantizer(nn.Module):
    """Observer + fake quant of one tensor (per tensor, or per channel along `axis`).

    `symmetric=True, bits=8`: the int8 weight grid [-127, 127]; `symmetric=False, bits=8`: the uint8
    activation grid [0, 255]. `channels` is the size of `axis` (per-channel) or None (per tensor).
    """

    def __init__(self, *, bits: int = 8, symmetric: bool = False, channels: int | None = None, axis: int = 0,
                 observer: Observer = "minmax", momentum: float = 0.1, percentile: float = 99.99,
                 lsq: bool = False):
        super().__init__()
        if observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {bits}")
        self.bits, self.symmetric, self.observer = bits, symmetric, observer
        self.momentum, self.percentile, self.lsq = momentum, percentile, lsq
        self.axis = axis if channels is not None else None
        if symmetric:
            self.qmin, self.qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
        shape = (channels,) if channels is not None else ()
        self.register_buffer("enabled", torch.tensor(True))
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("min_val", torch.full(shape, math.inf))
        self.register_buffer("max_val", torch.full(shape, -math.inf))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))
        scale = torch.ones(shape)
        if lsq:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        # Python mirrors of the two flags, so the forward pass never reads a (GPU) tensor to branch;
        # the buffers stay the saved truth and a state-dict load re-syncs the mirrors.
        self._enabled, self._observing = True, True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._enabled, self._observing = bool(self.enabled), bool(self.observing)

    # -- state ------------------------------------------------------------------------------

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_observing(self) -> bool:
        return self._observing

    def enable(self, on: bool = True) -> "FakeQuantizer":
        self.enabled.fill_(on)
        self._enabled = bool(on)
        return self

    def observe_(self, on: bool = True) -> "FakeQuantizer":
        """Start (True) or stop (False, = freeze the scale) observing."""
        self.observing.fill_(on)
        self._observing = bool(on)
        return self

    def freeze(self) -> "FakeQuantizer":
        return self.observe_(False)

    @property
    def calibrated(self) -> bool:
        return self.dynamic or int(self.num_batches) > 0

    @property
    def dynamic(self) -> bool:
        """Per-row grids computed at each call (observer "dynamic"): no stored scale."""
        return self.observer == "dynamic"

    # -- observing --------------------------------------------------------------------------

    @torch.no_grad()
    def update_stats(self, x: torch.Tensor) -> None:
        """Fold one tensor into min_val/max_val and recompute scale/zero_point."""
        if x.numel() == 0:
            return
        x_id, x_version = x.data_ptr(), x._version
        if self.observer == "current":  # the same weight again: nothing to update
            seen = (x_id, x_version, self.min_val._version)
            if self.__dict__.get("_seen") == seen:
                return
        x = x.detach().float()
        if self.axis is None:
            if self.observer == "percentile":
                lo, hi = _percentiles(x, self.percentile)
            else:
                lo, hi = x.min(), x.max()
        else:
            flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
            if self.observer == "percentile":
                pairs = [_percentiles(row, self.percentile) for row in flat]
                lo, hi = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
            else:
                lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        n = self.num_batches  # a tensor: no host sync on an accelerator
        if self.observer == "current":
            new_lo, new_hi = lo, hi
        elif self.observer == "minmax":
            new_lo, new_hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        elif self.observer == "moving_average":
            m = self.momentum
            new_lo, new_hi = self.min_val + m * (lo - self.min_val), self.max_val + m * (hi - self.max_val)
        else:  # percentile: running mean of the per-batch percentiles
            new_lo = self.min_val + (lo - self.min_val) / (n + 1)
            new_hi = self.max_val + (hi - self.max_val) / (n + 1)
        first = n == 0  # the first batch is taken as is (the running values start at ±inf)
        self.min_val.copy_(torch.where(first, lo, new_lo))
        self.max_val.copy_(torch.where(first, hi, new_hi))
        # "current" only remembers the latest tensor: count 1, so a state never depends on how often
        # the same weight was looked at (evaluation, a reload) and resumes compare bit-exactly
        self.num_batches.fill_(1) if self.observer == "current" else self.num_batches.add_(1)
        self.compute_qparams_()
        if self.observer == "current":
            self.__dict__["_seen"] = (x_id, x_version, self.min_val._version)

    @torch.no_grad()
    def compute_qparams_(self) -> None:
        """scale/zero_point from min_val/max_val (also re-initialises a learned LSQ scale)."""
        if self.symmetric:
            scale, zp = symmetric_qparams(self.min_val, self.max_val, self.qmax)
        else:
            scale, zp = affine_qparams(self.min_val, self.max_val, self.qmin, self.qmax)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zp)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as used in the forward pass (detached float32 / int32)."""
        return self.scale.detach().float().clamp(min=EPS), self.zero_point.detach()

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            if not self.is_enabled:
                return x
            return row_fake_quant(x).to(x.dtype)
        if self.is_observing and (self.training or self.observer == "current"):
            self.update_stats(x)
        if not self.is_enabled:
            return x
        scale = self.scale
        if self.lsq:
            scale = scale.clamp(min=EPS)
            if scale.requires_grad:
                per_scale = x.numel() // max(scale.numel(), 1)
                scale = _grad_scale(scale, 1.0 / math.sqrt(max(per_scale, 1) * self.qmax))
        y = fake_quant(x.float(), scale, self.zero_point, self.qmin, self.qmax, self.axis)
        return y.to(x.dtype)

    def cached(self, w: torch.Tensor) -> torch.Tensor:
        """`self(w)` for a weight, reused while neither the weight nor this quantizer's state changed.

        Without it every decoding step would re-quantize every weight (and the 51,864-row embedding);
        with autograd on (training) nothing is cached.
        """
        if torch.is_grad_enabled() and w.requires_grad:
            return self(w)
        key = self._key(w)
        cache = self.__dict__.get("_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        y = self(w)
        self.__dict__["_cache"] = (self._key(w), y)
        return y

    def _key(self, w: torch.Tensor) -> tuple:
        return (w.data_ptr(), w._version, self.scale.data_ptr(), self.scale._version, self.zero_point._version,
                self.enabled._version, self.observing._version)

    def extra_repr(self) -> str:
        grid = "int8 symmetric" if self.symmetric else f"uint{self.bits} affine"
        where = (f"per channel (axis {self.axis})" if self.axis is not None else
                 "per row, at each call" if self.dynamic else "per tensor")
        state = "disabled" if not self.is_enabled else ("observing" if self.is_observing else "frozen")
        return f"{grid}, {where}, observer={self.observer}, {state}" + (", lsq" if self.lsq else "")


def weight_quantizer(channels: int, bits: int = 8, lsq: bool = False) -> FakeQuantizer:
    """int8 symmetric per output channel, following the current weight (see module docstring)."""
    return FakeQuantizer(bits=bits, symmetric=True, channels=channels, axis=0, observer="current", lsq=lsq)


def activation_quantizer(bits: int = 8, observer: Observer = "minmax", momentum: float = 0.1,
                         percentile: float = 99.99, lsq: bool = False) -> FakeQuantizer:
    """uint8 affine per tensor (observer "dynamic": per row, computed at each call; no scale to learn)."""
    return FakeQuantizer(bits=bits, symmetric=False, observer=observer, momentum=momentum,
                         percentile=percentile, lsq=lsq and observer != "dynamic")


# ---------------------------------------------------------------------------------------------
# what a QDQ graph carries


@dataclass
class ActQuant:
    """Per-tensor affine activation quantizer on the uint8 grid: q = clamp(round(x / scale) + zero_point, 0, 255).

    A signed int8 quantizer with zero point z is the same grid shifted by 128 (zero_point = z + 128).
    `per_row`: each row gets its own grid at run time (`row_qparams`); scale and zero point are then unused.
    """

    scale: float
    zero_point: int
    per_row: bool = False

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"activation scale must be positive, got {self.scale}")
        if not 0 <= self.zero_point <= 255:
            raise ValueError(f"activation zero_point must be in [0, 255] (uint8 grid), got {self.zero_point}")


@dataclass
class WeightQuant:
    """Symmetric int8 weight, one scale per output channel: w ≈ q * scale[:, None].

    `float_channels` (int64 (k,)) and `float_weight` (float32 (out, k)): input channels that bypass the grids
    (`qat.prepare.QuantConfig.outlier_channels`); q is zero in their columns, and the layer adds
    x[..., float_channels] @ float_weight.T to the int8 product.
    """

    q: torch.Tensor  # int8 (out, in)
    scale: torch.Tensor  # float32 (out,)
    float_channels: torch.Tensor | None = None
    float_weight: torch.Tensor | None = None

    def __post_init__(self):
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {self.q.dtype} {tuple(self.q.shape)}")
        if self.scale.shape != (self.q.shape[0],):
            raise ValueError(f"weight scale must have shape ({self.q.shape[0]},), got {tuple(self.scale.shape)}")
        if (self.float_channels is None) != (self.float_weight is None):
            raise ValueError("float_channels and float_weight go together")
        if self.float_channels is not None:
            k = self.float_channels.numel()
            if self.float_weight.shape != (self.q.shape[0], k) or bool(self.q[:, self.float_channels].any()):
                raise ValueError(f"float_weight must have shape ({self.q.shape[0]}, {k}) and q zero columns at "
                                 f"float_channels, got {tuple(self.float_weight.shape)}")


@dataclass
class QuantPlan:
    """The QAT state the QDQ graph carries, keyed by `model.named_modules()` names.

    `linears[name]` = (input quantizer, weight) of a quantized nn.Linear, or of a quantized conv of the
    front end as the Linear over its kernel windows (`qat.prepare.conv_windows`, weight (out, kernel * in));
    a module absent here stays float. `matmuls[name]` = (quantizer of input a, quantizer of input b) of an attention `qk`/`pv`.
    `embedding` is the tied token embedding / output projection (int8 per token row), and
    `logits_act` an optional static quantizer for the output projection's input (dynamic if None).
    """

    linears: dict[str, tuple[ActQuant, WeightQuant]] = field(default_factory=dict)
    matmuls: dict[str, tuple[ActQuant, ActQuant]] = field(default_factory=dict)
    embedding: WeightQuant | None = None
    logits_act: ActQuant | None = None
