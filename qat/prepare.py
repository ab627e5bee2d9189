"""Prepare a Whisper for quantization-aware training: a layer swap that keeps the same Parameters.

    prepare_qat(model, cfg)   every matched nn.Linear -> QATLinear (same weight/bias Parameters,
                              + `input_quant` uint8 per tensor, or per row with `dynamic`,
                              `weight_quant` int8 per channel);
                              with `conv`, the encoder's conv front end -> QATConv1d (the same two
                              quantizers: a Linear over its kernel windows);
                              every matched attention MatMul (`qk`, `pv`) -> QuantMatMul
                              (+ `a_quant`, `b_quant`, both uint8 per tensor);
                              optionally the tied embedding / output projection, int8 weight-only;
                              with `outlier_channels`, the matched Linears keep k input channels float.
    calibrate(model, batches) teacher-forced forward passes with the observers on (first picking the
                              float input channels, where there are any to pick)
    freeze_observers(model)   fixed scales from now on
    ptq(model, cfg, batches)  prepare + calibrate + freeze: the post-training baseline

LayerNorm, softmax and GELU stay float, and the conv front end unless `conv` is on. The quantizer state lives in buffers under
the module names, e.g. `model.encoder.layers.0.fc1.input_quant.scale` (uint8 grid: scale float32 (),
zero_point int32 () in [0, 255]), `...fc1.weight_quant.scale` (float32 (out,), zero point 0), and
`model.decoder.layers.1.encoder_attn.qk.a_quant.scale`; `save_model(model, out, quant=cfg.to_dict())`
writes them all and `load_quantized_model` rebuilds the same modules and loads them strictly.
`export_quant_plan` hands the same numbers to the ONNX exporter.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from qat.quantizers import (ActQuant, FakeQuantizer, QuantPlan, WeightQuant, activation_quantizer, quantize,
                            weight_quantizer)
from slim.attention import MatMul, SlimAttention
from slim.model import model_inputs

LAYER_PREFIXES = ("model.encoder.layers.", "model.decoder.layers.")
CONV_FRONT_END = ("model.encoder.conv1", "model.encoder.conv2")
# keys of the saved quant dict that describe a converted model rather than the QAT settings
CONVERT_KEYS = ("converted", "engine", "exact", "matmuls")


@dataclass
class QuantConfig:
    """What `prepare_qat` quantizes and how. Saved as the `quant` entry of slim_structure.json."""

    weight_bits: int = 8
    """Bits of the symmetric per-output-channel weight grid (8 for convert/export; fewer only for fake quant)."""
    activation_bits: int = 8
    """Bits of the affine per-tensor activation grid (uint8 when 8; 8 for convert/export)."""
    observer: Literal["minmax", "moving_average", "percentile"] = "minmax"
    """Activation observer: running min/max, moving-average min/max, or per-batch percentiles averaged."""
    momentum: float = 0.1
    """Weight of each new batch in the moving average (observer=moving_average)."""
    percentile: float = 99.99
    """Upper percentile kept (the lower one is 100 - percentile) for observer=percentile."""
    include: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns on module names (e.g. `model.encoder.layers.*.fc1`); a module is quantized if it
    matches one of these and none of `exclude`. Applies to Linear layers, the `qk`/`pv` matmuls and, with
    `conv`, `model.encoder.conv1` / `conv2`."""
    exclude: list[str] = field(default_factory=list)
    """fnmatch patterns of modules kept in float (e.g. from `qat.sensitivity.most_sensitive`)."""
    dynamic: list[str] = field(default_factory=list)
    """fnmatch patterns of quantized Linears whose input gets a uint8 grid per row (per token / frame) computed
    at each call from that row's own range, as CTranslate2 and the output projection do, instead of one
    calibrated per-tensor scale: no calibration, and a long window or a loud clip keeps its resolution
    (docs/results.md measures what it holds on real speech and what it costs). ["*"]: every Linear."""
    quantize_matmuls: bool = True
    """Quantize both inputs of the attention matmuls Q·Kᵀ (`qk`) and P·V (`pv`)."""
    row_matmuls: list[str] = field(default_factory=list)
    """fnmatch patterns of quantized attention matmuls whose first input (the attention probabilities of a
    `pv`, the queries of a `qk`) gets a uint8 grid per row, computed at each call from that row's own range,
    instead of one calibrated scale; the second input (keys, values: cached) keeps its calibrated grid. On
    one calibrated grid [0, 1] in steps of 1/255 a probability under half a step is zero, so attention spread
    thinly over many frames vanishes; a row's own grid keeps it. On tiny.en this is what costs a QAT model its
    accuracy on 28 s windows (docs/results.md). The ONNX export runs such a `pv` as one integer matmul of the
    probabilities' and the values' uint8 codes (`qat.onnx_export._RowProbsMatMul`)."""
    embeddings: bool = False
    """Int8 weight-only (per token row) for the decoder's tied embed_tokens / proj_out."""
    conv: bool = False
    """Quantize the encoder's conv front end (conv1, conv2; `include`/`exclude` apply) like Linear layers
    over their kernel windows: uint8 input per tensor, int8 weight per output channel. The INT8 engines
    then run each conv as one int8 GEMM over the windows (`conv_windows`) instead of a float conv."""
    outlier_channels: int = 0
    """Input channels of each Linear matched by `outlier_linears` that skip the input grid: the k channels with
    the largest magnitude on the calibration batches (chosen once, by `calibrate`) are multiplied by their
    weight columns in float, and the uint8 grid and the int8 weight cover the other channels only
    (LLM.int8()'s mixed-precision decomposition, Dettmers et al. 2022, with the channels fixed). A few GELU
    channels of Whisper base's late encoder FFN reach 10-30x the rest, and one per-tensor grid sized for them
    is as coarse as 0.8 per step (docs/base.md). Costs k float weight columns per Linear."""
    outlier_linears: list[str] = field(default_factory=list)
    """fnmatch patterns of the quantized Linears that keep `outlier_channels` input channels float."""
    freeze_observers_after: int | None = None
    """Trainer step after which activation observers are frozen (None: observe throughout QAT)."""
    lsq: bool = False
    """Learn the scales (LSQ) as Parameters, initialised by calibration; freeze right after calibrating."""
    calibration_batches: int = 8
    """Batches of training data for the calibration pass before QAT / for PTQ."""
    keep_float: int = 0
    """Keep the k units most sensitive to quantization in float: a qat/ptq stage first runs
    `qat.sensitivity.sensitivity_scan` (PTQ one unit at a time), writes the table to its folder and adds
    the k worst units' patterns to `exclude`, which is what is saved. 0: no scan."""
    keep_float_max_mb: float | None = None
    """Size budget of `keep_float`: the units kept float may add at most this many MB (10^6 bytes) to the
    export, one byte per weight (fp16 against int8). Walking down the ranking, a unit that does not fit is
    passed over for the next one, so the budget keeps the most sensitive units that fit (activation-only
    units, such as the attention matmuls, cost nothing). None: no budget."""
    sensitivity_by: Literal["group", "layer"] = "group"
    """Units of the scan for keep_float: kinds of layer (`qat.sensitivity.GROUPS`) or single modules."""

    def __post_init__(self):
        for name in ("weight_bits", "activation_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8:
                raise ValueError(f"quant.{name} must be an integer in [2, 8], got {v!r}")
        if self.observer not in ("minmax", "moving_average", "percentile"):
            raise ValueError(f"quant.observer must be minmax, moving_average or percentile, got {self.observer!r}")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"quant.momentum must be in (0, 1], got {self.momentum!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"quant.percentile must be in (50, 100], got {self.percentile!r}")
        for name in ("include", "exclude", "dynamic", "row_matmuls", "outlier_linears"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(p, str) for p in v):
                raise ValueError(f"quant.{name} must be a list of fnmatch patterns, got {v!r}")
            setattr(self, name, list(v))
        if not isinstance(self.outlier_channels, int) or isinstance(self.outlier_channels, bool) \
                or self.outlier_channels < 0:
            raise ValueError(f"quant.outlier_channels must be an integer >= 0, got {self.outlier_channels!r}")
        if bool(self.outlier_channels) != bool(self.outlier_linears):
            raise ValueError("quant.outlier_channels and quant.outlier_linears go together (a number of channels "
                             f"and the Linears that keep them float), got {self.outlier_channels!r} and "
                             f"{self.outlier_linears!r}")
        if self.outlier_channels and self.calibration_batches < 1:
            raise ValueError("quant.outlier_channels needs quant.calibration_batches >= 1 (calibration picks them)")
        if self.freeze_observers_after is not None and (not isinstance(self.freeze_observers_after, int)
                                                        or self.freeze_observers_after < 0):
            raise ValueError(f"quant.freeze_observers_after must be a step >= 0 or null, got {self.freeze_observers_after!r}")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 0:
            raise ValueError(f"quant.calibration_batches must be an integer >= 0, got {self.calibration_batches!r}")
        if not isinstance(self.keep_float, int) or isinstance(self.keep_float, bool) or self.keep_float < 0:
            raise ValueError(f"quant.keep_float must be an integer >= 0, got {self.keep_float!r}")
        for name in ("quantize_matmuls", "embeddings", "conv", "lsq"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quant.{name} must be true or false, got {getattr(self, name)!r}")
        if self.keep_float_max_mb is not None:
            if isinstance(self.keep_float_max_mb, bool) or not isinstance(self.keep_float_max_mb, (int, float)) \
                    or self.keep_float_max_mb < 0:
                raise ValueError(f"quant.keep_float_max_mb must be a number of MB >= 0 or null, got {self.keep_float_max_mb!r}")
            if not self.keep_float:
                raise ValueError("quant.keep_float_max_mb is a budget for quant.keep_float, which is 0")
        if self.sensitivity_by not in ("group", "layer"):
            raise ValueError(f"quant.sensitivity_by must be 'group' or 'layer', got {self.sensitivity_by!r}")
        if self.keep_float and self.calibration_batches < 1:
            raise ValueError("quant.keep_float needs quant.calibration_batches >= 1 (the scan calibrates)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = {k: v for k, v in d.items() if k not in CONVERT_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"quant: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and \
            not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


# ---------------------------------------------------------------------------------------------
# the swapped-in modules


class QATLinear(nn.Linear):
    """nn.Linear with fake-quantized input (uint8 per tensor, or per row: `QuantConfig.dynamic`) and weight (int8
    per output channel).

    Built by `from_linear`, which reuses the Linear's Parameters (optimizer state and tying survive);
    `to_linear` gives the plain Linear back. `input_quant=None` is weight-only (the output projection).
    With both quantizers disabled the forward is exactly `nn.Linear`'s.

    `outliers` > 0 (`QuantConfig.outlier_channels`): the buffer `float_channels` holds that many input channels
    (-1 until `calibrate` picks them), which bypass both grids: y = q(x') · q(W') + x[..., c] · W[:, c] + b,
    where x' and W' are x and W with channels c zeroed.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_quant: FakeQuantizer, input_quant: FakeQuantizer | None,
                    outliers: int = 0) -> "QATLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_quant, new.input_quant = weight_quant, input_quant
        if outliers:
            if input_quant is None or input_quant.dynamic:
                raise ValueError("quant.outlier_linears and quant.dynamic both match it (a grid per row is fitted "
                                 "at run time, over every channel), or it has no input grid")
            if not 0 < outliers < linear.in_features:
                raise ValueError(f"quant.outlier_channels {outliers} leaves none of its {linear.in_features} input "
                                 "channels on the grid (a pruned layer?): lower it or narrow outlier_linears")
            new.register_buffer("float_channels", torch.full((outliers,), -1, dtype=torch.long,
                                                             device=linear.weight.device))
        else:
            new.float_channels = None
        return new.train(linear.training)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin.train(self.training)

    @property
    def channels_chosen(self) -> bool:
        return self.float_channels is not None and bool((self.float_channels >= 0).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_channels is None:
            if self.input_quant is not None:
                x = self.input_quant(x)
            return F.linear(x, self.weight_quant.cached(self.weight), self.bias)
        quantized = self.input_quant.is_enabled or self.weight_quant.is_enabled
        if not self.channels_chosen:
            if quantized or self.input_quant.is_observing and self.training:
                raise RuntimeError("the float input channels are not chosen yet: run qat.prepare.calibrate first")
            return F.linear(x, self.weight, self.bias)
        c = self.float_channels
        xq = self.input_quant(x.index_fill(-1, c, 0.0))  # the grid (and its observer) without channels c
        if not quantized:
            return F.linear(x, self.weight, self.bias)
        return F.linear(xq, self.weight_quant.cached(self._grid_weight()), self.bias) + \
            F.linear(x.index_select(-1, c), self.weight.index_select(1, c))

    def _grid_weight(self) -> torch.Tensor:
        """The weight with the float channels' columns zeroed; one tensor reused while neither changes (so
        the weight quantizer's cache holds), a fresh one under autograd."""
        w, c = self.weight, self.float_channels
        if torch.is_grad_enabled() and w.requires_grad:
            return w.index_fill(1, c, 0.0)
        key = (w.data_ptr(), w._version, c.data_ptr(), c._version)
        hit = self.__dict__.get("_grid_w")
        if hit is None or hit[0] != key:
            with torch.inference_mode(False):  # a normal tensor even under inference mode: it is reused after
                hit = (key, w.detach().index_fill(1, c, 0.0))
            self.__dict__["_grid_w"] = hit
        return hit[1]


class QATConv1d(nn.Conv1d):
    """nn.Conv1d with fake-quantized input (uint8 per tensor) and weight (int8 per output channel).

    The same Parameters as the conv it replaces (`from_conv`; `to_conv` gives a plain one back). Zero
    padding pads the quantized input with 0, a point of every affine grid, so the conv is exactly a
    Linear over `conv_windows` of the input with `window_weight` of the weight: what the INT8 engines run.
    """

    _ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode", "output_padding", "transposed", "_reversed_padding_repeated_twice")

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, weight_quant: FakeQuantizer, input_quant: FakeQuantizer) -> "QATConv1d":
        if conv.groups != 1 or conv.dilation != (1,) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv quantization supports plain zero-padded convolutions (as Whisper's), got {conv}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k in cls._ATTRS:
            setattr(new, k, getattr(conv, k))
        new.weight, new.bias = conv.weight, conv.bias
        new.weight_quant, new.input_quant = weight_quant, input_quant
        return new.train(conv.training)

    def to_conv(self) -> nn.Conv1d:
        conv = nn.Conv1d.__new__(nn.Conv1d)
        nn.Module.__init__(conv)
        for k in self._ATTRS:
            setattr(conv, k, getattr(self, k))
        conv.weight, conv.bias = self.weight, self.bias
        return conv.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant.cached(self.weight), self.bias)


def window_weight(w: torch.Tensor) -> torch.Tensor:
    """A Conv1d weight (out, in, kernel) as the (out, kernel * in) matrix that multiplies `conv_windows`."""
    return w.permute(0, 2, 1).reshape(w.shape[0], -1)


def conv_windows(x: torch.Tensor, kernel: int, stride: int, padding: int, fill) -> torch.Tensor:
    """The kernel windows of a time-major sequence x (B, T, C): (B, T_out, kernel * C), window i holding
    frames i*stride - padding + j (j < kernel, frame by frame) with `fill` outside x.

    Time-major, each window offset is a slice of whole frames (rows of C contiguous values, every
    `stride`-th one), which ONNX Runtime copies at memory speed. Works on any dtype: the INT8 graphs
    window the uint8 codes, `fill` = the zero point.
    """
    n = (x.shape[1] + 2 * padding - kernel) // stride + 1
    x = F.pad(x, (0, 0, padding, padding), value=fill)
    return torch.cat([x[:, j: j + stride * (n - 1) + 1: stride] for j in range(kernel)], dim=2)


class QATEmbedding(nn.Embedding):
    """nn.Embedding with an int8 weight-only fake quant per token row (same Parameter)."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, weight_quant: FakeQuantizer) -> "QATEmbedding":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse"):
            setattr(new, k, getattr(emb, k))
        new.weight = emb.weight
        new.weight_quant = weight_quant
        return new.train(emb.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_quant.cached(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class QuantMatMul(MatMul):
    """`a @ b` with both inputs fake-quantized (uint8 per tensor): the attention Q·Kᵀ or P·V."""

    def __init__(self, a_quant: FakeQuantizer, b_quant: FakeQuantizer):
        super().__init__()
        self.a_quant, self.b_quant = a_quant, b_quant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.a_quant(a), self.b_quant(b))


# ---------------------------------------------------------------------------------------------
# prepare


def quantizable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear inside the encoder/decoder layers and every attention MatMul that
    has something to quantize (layers with all heads or all FFN neurons pruned are skipped)."""
    empty_mm: set[int] = set()
    for m in model.modules():
        if isinstance(m, SlimAttention) and m.num_heads == 0:
            empty_mm.update((id(m.qk), id(m.pv)))
    out = []
    for name, m in model.named_modules():
        if not name.startswith(LAYER_PREFIXES):
            continue
        if isinstance(m, nn.Linear) and m.in_features > 0 and m.out_features > 0:
            out.append((name, m))
        elif isinstance(m, MatMul) and id(m) not in empty_mm:
            out.append((name, m))
    return out


def prepare_qat(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Swap in fake-quant modules (in place; the same Parameters). Returns `model`.

    A stock HF Whisper first gets the explicit attention (`slim.model.install_explicit_attention`).
    Quantizers start enabled and observing; call `calibrate` (then `freeze_observers` for PTQ).
    """
    from slim.model import install_explicit_attention

    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    if any(isinstance(m, FakeQuantizer) for m in model.modules()):
        raise ValueError("model is already prepared for QAT (it holds FakeQuantizer modules)")
    install_explicit_attention(model)

    def act(name: str | None = None):
        dynamic = name is not None and any(fnmatch.fnmatchcase(name, p) for p in cfg.dynamic)
        return activation_quantizer(cfg.activation_bits, "dynamic" if dynamic else cfg.observer, cfg.momentum,
                                    cfg.percentile, cfg.lsq)

    for name, m in quantizable_modules(model):
        if not cfg.selects(name):
            continue
        if isinstance(m, nn.Linear):
            wq = weight_quantizer(m.out_features, cfg.weight_bits, cfg.lsq)
            outliers = cfg.outlier_channels if any(fnmatch.fnmatchcase(name, p) for p in cfg.outlier_linears) else 0
            model.set_submodule(name, _named(name, QATLinear.from_linear, m, wq, act(name), outliers))
        elif cfg.quantize_matmuls:
            per_row = any(fnmatch.fnmatchcase(name, p) for p in cfg.row_matmuls)
            a = activation_quantizer(cfg.activation_bits, "dynamic") if per_row else act()
            model.set_submodule(name, QuantMatMul(a, act()).train(m.training))
    for p in cfg.row_matmuls:
        if not any(fnmatch.fnmatchcase(n, p) for n, m in model.named_modules() if isinstance(m, QuantMatMul)):
            raise ValueError(f"quant.row_matmuls: {p!r} matches no quantized attention matmul (their names end in "
                             "'.qk' and '.pv', e.g. 'model.encoder.layers.*.self_attn.pv')")
    for p in cfg.outlier_linears:
        if not any(fnmatch.fnmatchcase(n, p) for n, m in model.named_modules()
                   if isinstance(m, QATLinear) and m.float_channels is not None):
            raise ValueError(f"quant.outlier_linears: {p!r} matches no quantized Linear (e.g. "
                             "'model.encoder.layers.*.fc2')")
    if cfg.conv:
        for name in CONV_FRONT_END:
            if cfg.selects(name):
                m = model.get_submodule(name)
                wq = weight_quantizer(m.out_channels, cfg.weight_bits, cfg.lsq)
                model.set_submodule(name, QATConv1d.from_conv(m, wq, act()))
    if cfg.embeddings:
        emb = model.model.decoder.embed_tokens
        model.model.decoder.embed_tokens = QATEmbedding.from_embedding(
            emb, weight_quantizer(emb.num_embeddings, cfg.weight_bits, cfg.lsq))
        # proj_out is tied to embed_tokens: the same Parameter, its own (identical) quantizer state
        model.proj_out = QATLinear.from_linear(
            model.proj_out, weight_quantizer(model.proj_out.out_features, cfg.weight_bits, cfg.lsq), None)
    model.slim_quant_config = cfg
    return model


def _named(name: str, make, *args):
    """make(*args), with a ValueError's message prefixed by the module name it concerns."""
    try:
        return make(*args)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def quantizers(model: nn.Module, pattern: str | None = None) -> Iterable[tuple[str, FakeQuantizer]]:
    """(name, quantizer) of every FakeQuantizer, optionally only those whose *owner* module matches `pattern`."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            owner = name.rpartition(".")[0]
            if pattern is None or fnmatch.fnmatchcase(owner, pattern):
                yield name, m


def _batch_kwargs(batch: dict, model: nn.Module) -> dict:
    kw = model_inputs(batch, model=model)
    if "input_features" not in kw:
        raise ValueError(f"a calibration batch needs 'input_features', got keys {sorted(batch)}")
    if "labels" not in kw and "decoder_input_ids" not in kw:
        raise ValueError(f"a calibration batch needs 'labels' or 'decoder_input_ids', got keys {sorted(batch)}")
    return kw


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[dict], *, fake_quant: bool = False) -> int:
    """Teacher-forced forward passes over `batches` ({"input_features", "labels"} dicts) with every
    observing quantizer updating its statistics. Returns the number of batches seen.

    The model runs in eval mode (no dropout); only the quantizers are switched to training mode,
    which is what lets them observe. With `fake_quant=False` (post-training practice) the observers
    see float activations: quantization is switched off during the pass and restored after.
    """
    qs = [q for _, q in quantizers(model)]
    if not qs:
        raise ValueError("model has no quantizers: call prepare_qat first")
    batches = list(batches)
    choose_float_channels(model, batches)
    was_training = model.training
    enabled = [q.is_enabled for q in qs]
    model.eval()
    for q in qs:
        q.train()
        if not fake_quant:
            q.enable(False)
    try:
        n = _forward_passes(model, batches)
    finally:
        for q, e in zip(qs, enabled):
            q.enable(e)
        model.train(was_training)
    return n


def _forward_passes(model: nn.Module, batches: Iterable[dict]) -> int:
    """One teacher-forced forward pass per batch, on the model's device. Returns how many ran."""
    device = next(model.parameters()).device
    n = 0
    for batch in batches:
        model(**{k: v.to(device) for k, v in _batch_kwargs(batch, model).items()})
        n += 1
    return n


@torch.no_grad()
def choose_float_channels(model: nn.Module, batches: list[dict]) -> int:
    """Fill every unchosen `QATLinear.float_channels` with the input channels of largest magnitude over
    float forward passes of `batches` (`QuantConfig.outlier_channels`). Returns how many Linears it filled.

    Every process of a multi-GPU run calibrates on the same first training batches, so all pick the same
    channels (and DDP broadcasts the main process's buffers, these among them, before each training step);
    once picked they are saved and restored with the model and never picked again."""
    todo = [m for m in model.modules() if isinstance(m, QATLinear) and m.float_channels is not None
            and not m.channels_chosen]
    if not todo:
        return 0
    peak: dict[int, torch.Tensor] = {}

    def hook(m, args):
        x = args[0].detach().abs().flatten(0, -2).amax(0).float()
        peak[id(m)] = x if id(m) not in peak else torch.maximum(peak[id(m)], x)

    qs = [q for _, q in quantizers(model)]
    state = [(q.is_enabled, q.is_observing) for q in qs]
    was_training = model.training
    handles = [m.register_forward_pre_hook(hook) for m in todo]
    try:
        model.eval()
        for q in qs:
            q.enable(False).observe_(False)
        _forward_passes(model, batches)
    finally:
        for h in handles:
            h.remove()
        for q, (on, observing) in zip(qs, state):
            q.enable(on).observe_(observing)
        model.train(was_training)
    if not peak:
        raise ValueError("choose_float_channels: no calibration batches")
    for m in todo:
        chosen = peak[id(m)].topk(m.float_channels.numel()).indices.sort().values
        m.float_channels.copy_(chosen)
    return len(todo)


def freeze_observers(model: nn.Module, weights: bool = False) -> int:
    """Stop the activation observers (scales fixed from now on). Returns how many were frozen.

    Weight quantizers keep following their weights (`observer="current"`: the scale is the weight's
    own per-channel range, which is what convert computes too) unless `weights=True`, or the
    scales are learned (LSQ), where freezing the observer hands the scale to the optimizer.
    """
    n = 0
    for _, q in quantizers(model):
        if _freezes(q, weights):
            q.freeze()
            n += 1
    return n


def _freezes(q: FakeQuantizer, weights: bool = False) -> bool:
    return q.observer != "current" or weights or q.lsq


def maybe_freeze_observers(model: nn.Module, cfg: QuantConfig, step: int) -> bool:
    """For the trainer: from step `cfg.freeze_observers_after` on, the observers are frozen. True when this
    call froze them (the first step at or past N whose observers were still observing), so a run resumed
    from any checkpoint ends up frozen from the same step as an uninterrupted one."""
    if cfg.freeze_observers_after is None or step < cfg.freeze_observers_after:
        return False
    if not any(q.is_observing for _, q in quantizers(model) if _freezes(q)):
        return False
    freeze_observers(model)
    return True


def set_fake_quant(model: nn.Module, enabled: bool, pattern: str | None = None) -> int:
    """Switch fake quant on/off for all quantizers (or those of modules matching `pattern`)."""
    n = 0
    for _, q in quantizers(model, pattern):
        q.enable(enabled)
        n += 1
    return n


def quant_state_summary(model: nn.Module) -> list[dict]:
    """One row per quantizer: name, grid, state, observer, batches seen, range and scale span."""
    rows = []
    for name, q in quantizers(model):
        scale, zp = q.qparams()
        rows.append({
            "name": name,
            "grid": "int8 symmetric per channel" if q.symmetric else f"uint{q.bits} per tensor",
            "state": "disabled" if not q.is_enabled else ("observing" if q.is_observing else "frozen"),
            "observer": q.observer,
            "lsq": q.lsq,
            "batches": int(q.num_batches),
            "min": float(q.min_val.min()) if q.min_val.numel() else None,
            "max": float(q.max_val.max()) if q.max_val.numel() else None,
            "scale_min": float(scale.min()) if scale.numel() else None,
            "scale_max": float(scale.max()) if scale.numel() else None,
            "zero_point": int(zp) if zp.dim() == 0 else None,
        })
    return rows


FP16_MIN_ELEMENTS = 4096
"""Float tensors at least this large are stored as fp16 when fp16-exact (`qat.onnx_export`); the QAT/PTQ
stages make them so (`round_float_weights_fp16`). Smaller ones (biases, norms) stay fp32: they cost little."""


@torch.no_grad()
def round_float_weights_fp16(model: nn.Module, min_elements: int = FP16_MIN_ELEMENTS) -> list[str]:
    """Round, in place, every large parameter that the INT8 engines keep in float (the conv front end
    unless quantized, the positional tables, Linears kept float) to a value float16 holds exactly. Returns their names.

    The ONNX export stores fp16-exact tensors as fp16 (lossless, `qat.onnx_export`); rounding the
    fake-quant model itself when a QAT/PTQ stage saves it keeps the model that is evaluated and the
    one that ships the same numbers, at half the bytes for those tensors (Whisper itself ships fp16).
    Weights with an enabled weight quantizer are int8 on export and left alone.
    """
    quantized = {id(m.weight) for m in model.modules()
                 if isinstance(getattr(m, "weight_quant", None), FakeQuantizer) and m.weight_quant.is_enabled}
    done = []
    for name, p in model.named_parameters():
        if p.dtype != torch.float32 or p.numel() < min_elements or id(p) in quantized:
            continue
        p.copy_(p.to(torch.float16).to(torch.float32))
        done.append(name)
    return done


def ptq(model: nn.Module, cfg: QuantConfig, batches: Iterable[dict]) -> nn.Module:
    """Post-training static quantization with the same quantizers: prepare, calibrate, freeze."""
    prepare_qat(model, cfg)
    if calibrate(model, batches) == 0:
        raise ValueError("ptq: no calibration batches")
    freeze_observers(model)
    return model


# ---------------------------------------------------------------------------------------------
# loading, and the state the exporters read


def load_quantized_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a fake-quant model written by `save_model(model, out, quant=cfg.to_dict())`:
    the float structure, `prepare_qat` with the saved settings, then every tensor loaded strictly."""
    from transformers import GenerationConfig, WhisperConfig

    from slim.model import STRUCTURE_FILE, build_model, load_weights, read_structure

    path = Path(path)
    s = read_structure(path)
    if s is None or s.quant is None:
        raise ValueError(f"{path / STRUCTURE_FILE}: no quant settings; not a quantization-aware model "
                         "(load it with slim.model.load_model)")
    if s.quant.get("converted"):
        raise ValueError(f"{path}: a converted INT8 model; load it with qat.convert.load_int8_model")
    cfg = QuantConfig.from_dict(s.quant)
    model = build_model(WhisperConfig.from_pretrained(path), dataclasses.replace(s, quant=None))
    prepare_qat(model, cfg)
    load_weights(model, path)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(dtype).eval()


def export_quant_plan(model: nn.Module):
    """The QAT state as `qat.quantizers.QuantPlan`: per quantized Linear (input ActQuant on the uint8
    grid, int8 per-channel weight; a quantized conv as the Linear over its windows, `window_weight`), per
    quantized matmul (ActQuant of a, ActQuant of b), and the int8 embedding when `embeddings` was on. Disabled quantizers are left out (those modules stay float);
    an enabled activation quantizer that never saw data is an error."""
    def act(name: str, q: FakeQuantizer) -> ActQuant:
        if q.dynamic:
            if q.bits != 8:
                raise ValueError(f"{name}: only 8-bit activations export, got {q.bits} bits")
            return ActQuant(1.0, 0, per_row=True)
        if not q.calibrated and q.is_observing:
            raise ValueError(f"{name}: activation quantizer was never calibrated (run qat.prepare.calibrate)")
        if q.bits != 8 or q.symmetric:
            raise ValueError(f"{name}: only 8-bit affine activations export, got {q.bits} bits")
        scale, zp = q.qparams()
        return ActQuant(float(scale), int(zp))

    plan = QuantPlan()
    for name, m in model.named_modules():
        if isinstance(m, (QATLinear, QATConv1d)) and m.input_quant is not None:
            if m.input_quant.is_enabled and m.weight_quant.is_enabled:
                plan.linears[name] = (act(name + ".input_quant", m.input_quant), _named(name, int8_linear_weight, m))
            elif m.input_quant.is_enabled != m.weight_quant.is_enabled:
                raise ValueError(f"{name}: input and weight quantizers must be both on or both off to export")
        elif isinstance(m, QuantMatMul):
            if m.a_quant.is_enabled and m.b_quant.is_enabled:
                plan.matmuls[name] = (act(name + ".a_quant", m.a_quant), act(name + ".b_quant", m.b_quant))
            elif m.a_quant.is_enabled != m.b_quant.is_enabled:
                raise ValueError(f"{name}: both matmul input quantizers must be on or off to export")
        elif isinstance(m, QATEmbedding) and m.weight_quant.is_enabled:
            plan.embedding = WeightQuant(*_named(name, int8_weight, m.weight_quant, m.weight))
    return plan


@torch.no_grad()
def int8_linear_weight(m: "QATLinear | QATConv1d") -> WeightQuant:
    """The weight a quantized Linear (or conv, as its window matrix) ships: int8 per output channel, and with
    float input channels (`QuantConfig.outlier_channels`) their columns zero in it and kept float beside it."""
    c = getattr(m, "float_channels", None)
    if c is None:
        return WeightQuant(*int8_weight(m.weight_quant, m.weight))
    if not m.channels_chosen:
        raise ValueError("float input channels never chosen (run qat.prepare.calibrate)")
    q, scale = int8_weight(m.weight_quant, m._grid_weight())
    return WeightQuant(q, scale, c.detach().clone(), m.weight.detach().index_select(1, c).float())


@torch.no_grad()
def int8_weight(q: FakeQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-channel scale) as fake quant uses them now; a conv's weight as its 2-D window
    matrix (`window_weight`): what the INT8 engines multiply by."""
    if q.bits != 8:
        raise ValueError(f"only 8-bit weights export, got {q.bits} bits")
    scale, zp = weight_qparams(q, w)
    qw = quantize(w, scale, zp, q.qmin, q.qmax, axis=0)
    return (window_weight(qw) if qw.dim() == 3 else qw), scale


@torch.no_grad()
def weight_qparams(q: FakeQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero_point) the fake-quant forward would use for weight `w` now: recomputed from
    `w` while the quantizer follows its weight, the stored (frozen / learned) ones otherwise."""
    if q.is_observing and q.observer == "current":
        q.update_stats(w)
    return q.qparams()
