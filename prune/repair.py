"""Repair after removal: refit the layers that consume removed units to the dense model's outputs.

Removing heads (neurons) deletes input columns of `out_proj` (`fc2`); what is left was trained to work
beside the removed units, not without them. Each consumer is refit by ridge least squares, with no labels:

    min_W  ||[X, 1] W - Y||^2 + lam ||W - W0||^2

where X is the consumer's input in the pruned model (its kept columns), Y the dense consumer's output on the
same example, W0 the kept weights and bias (the prior; with nothing removed, X W0 = Y exactly and W0 is the
minimiser, so an unpruned model comes back unchanged) and lam = `ridge` times the mean diagonal of X^T X.
The bias column absorbs the mean contribution of the removed units (FLAP's bias compensation). Consumers
are refit in forward order, each on activations of the model repaired so far, so later layers also correct
the error that reaches them from earlier ones (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers": layer-wise reconstruction after head/neuron removal, no retraining).

Not a library call: peers (Torch-Pruning, NNI, ModelOpt) prune without this refit, and the solve is a few
lines of `torch.linalg.solve` on accumulated Gram matrices (never the activations themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prune.apply import attention_modules, ffn_layers
from slim.data import IGNORE_INDEX, frame_weights
from slim.model import model_inputs

TARGETS = ("layer", "stream")


@dataclass
class RepairConfig:
    enabled: bool = True
    """Refit out_proj / fc2 of every layer (and their bias) after removal."""
    calibration_batches: int = 32
    """Batches of training data (batch 4) whose activations the refit uses; labels are not used, only the
    decoder's input tokens. 32 (128 clips): on 8 the refit of tiny.en's quickstart cut made twice the errors on
    real speech, and base's lighter cut lost real speech (docs/real-speech.md, docs/base.md); more than 32
    from 200 clips gained nothing."""
    ridge: float = 1e-2
    """Pull towards the kept weights, relative to the mean diagonal of X^T X (0: plain least squares)."""
    target: Literal["layer", "stream"] = "layer"
    """layer: match each dense consumer's output; stream: in the encoder, match the dense residual stream
    after the consumer (also correcting the drift from the layers before)."""
    pad_weight: float = 1.0
    """Weight of an encoder frame past the clip's audio in the least squares, relative to one inside it
    (`slim.data.frame_weights`; 1: every frame alike). The quickstart's training clips fill 27% of the 30 s
    window on average, so at 1 the encoder's fits are mostly about the padding."""

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"repair.target must be one of {TARGETS}, got {self.target!r}")
        if self.calibration_batches < 1:
            raise ValueError(f"repair.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.ridge < 0:
            raise ValueError(f"repair.ridge must be >= 0, got {self.ridge}")
        if not 0 <= self.pad_weight <= 1:
            raise ValueError(f"repair.pad_weight must be in [0, 1], got {self.pad_weight}")


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is not run."""


def consumers(model) -> list[tuple[str, nn.Linear]]:
    """(name, Linear) of every layer that consumes prunable units, in forward order."""
    attn, ffn = attention_modules(model), ffn_layers(model)
    out = []
    for i in range(len(ffn["encoder"])):
        out += [(f"encoder.{i}.self_attn.out_proj", attn["encoder"][i].out_proj),
                (f"encoder.{i}.fc2", ffn["encoder"][i].fc2)]
    for i in range(len(ffn["decoder"])):
        out += [(f"decoder.{i}.self_attn.out_proj", attn["decoder"][i].out_proj),
                (f"decoder.{i}.encoder_attn.out_proj", attn["cross"][i].out_proj),
                (f"decoder.{i}.fc2", ffn["decoder"][i].fc2)]
    return out


def _decoder_mask(batch: dict) -> torch.Tensor:
    return batch["labels"] != IGNORE_INDEX


def _run(model, batch: dict, encoder_out: torch.Tensor | None = None):
    """A teacher-forced forward (labels only make the decoder inputs; no loss is used), on the audio window
    `model` encodes."""
    kw = {"labels": batch["labels"]}
    if encoder_out is not None:
        kw["encoder_outputs"] = (encoder_out,)
    else:
        kw["input_features"] = model_inputs(batch, model=model)["input_features"]
    return model(**kw, use_cache=False)


def _tap(run, taps: dict[nn.Module, str], stop: nn.Module | None = None) -> tuple[dict, object]:
    """Run `run()`, recording the input ("in") or output ("out") of each module in `taps`. With `stop`, the
    run is cut short once that module's tap has fired. Returns (module -> tensor, what `run` returned, or
    None when stopped)."""
    box, handles = {}, []

    def hook_for(module, what):
        def hook(mod, args, output):
            box[module] = (args[0] if what == "in" else output).detach()
            if module is stop:
                raise _Stop
        return hook

    for module, what in taps.items():
        handles.append(module.register_forward_hook(hook_for(module, what)))
    try:
        out = run()
    except _Stop:
        out = None
    finally:
        for h in handles:
            h.remove()
    return box, out


def _capture(module: nn.Module, run, what: str):
    """The input (`what="in"`) or output (`"out"`) of `module` during `run()`; the rest of `run` is cut short
    once the hook has fired."""
    return _tap(run, {module: what}, stop=module)[0][module]


def _encoder_input(model, features: torch.Tensor) -> torch.Tensor:
    """What the first encoder layer reads: conv front end + positions (not pruned, so dense and pruned agree)."""
    enc = model.model.encoder
    box = []

    def hook(mod, args):
        box.append(args[0].detach())
        raise _Stop

    h = enc.layers[0].register_forward_pre_hook(hook)
    try:
        enc(features)
    except _Stop:
        pass
    finally:
        h.remove()
    return box[0]


@torch.no_grad()
def refit_linear(linear: nn.Linear, xtx: torch.Tensor, xty: torch.Tensor, yty: torch.Tensor,
                 ridge: float) -> tuple[float, float]:
    """Solve the ridge problem from accumulated Gram matrices of [X, 1] and set weight and bias in place.

    xtx: (k+1, k+1) = [X,1]^T [X,1]; xty: (k+1, d) = [X,1]^T Y; yty: scalar sum of Y^2.
    Returns the relative squared error ||[X,1]W - Y||^2 / ||Y||^2 before and after."""
    w0 = linear.weight.detach().double().T
    if linear.bias is not None:
        w0 = torch.cat([w0, linear.bias.detach().double()[None]], 0)
    else:  # no bias to fit: drop the ones column's row and column
        xtx, xty = xtx[:-1, :-1], xty[:-1]

    def err(w):
        return float((torch.einsum("ij,ik,kj->", w, xtx, w) - 2 * (w * xty).sum() + yty) / yty.clamp_min(1e-30))

    lam = ridge * float(xtx.diagonal()[: linear.in_features].mean())
    a = xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype)
    w = torch.linalg.solve(a, xty + lam * w0)
    before, after = err(w0), err(w)
    # Keep W0 unless the fit is better by more than round-off (the float32 Gram products leave ~1e-7 of
    # relative error where W0 is already exact): never make a layer worse, leave an unpruned model as it is.
    if before - after > 1e-6:
        dtype = linear.weight.dtype
        linear.weight.copy_(w[: linear.in_features].T.to(dtype))
        if linear.bias is not None:
            linear.bias.copy_(w[-1].to(dtype))
    return before, (max(after, 0.0) if before - after > 1e-6 else before)


class Gram:
    """[X, 1]^T [X, 1], [X, 1]^T Y and sum Y^2, accumulated in float64 batch by batch (d = 0: X's alone)."""

    def __init__(self, k: int, d: int = 0):
        self.xtx = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        self.xty = torch.zeros(k + 1, d, dtype=torch.float64)
        self.yty = torch.zeros((), dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None, w: torch.Tensor | None = None) -> None:
        """One batch of rows; `w` (one weight per row, or None: all 1) weighs each row's squared error."""
        # one batch's products in float32 (a 6000 x 1153 Gram matrix costs a few times more in float64 on a
        # CPU), summed over batches in float64
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1).float()
        y = None if y is None else y.float()
        if w is not None:  # weighted rows: scale each by sqrt(w)
            r = w.float().sqrt().reshape(-1, 1)
            x, y = x * r, (None if y is None else y * r)
        self.xtx += (x.T @ x).double()
        if y is not None:
            self.xty += (x.T @ y).double()
            self.yty += (y.double() * y.double()).sum()


@torch.no_grad()
def repair_model(model, dense, batches: list[dict], ridge: float = 1e-2, target: str = "layer",
                 pad_weight: float = 1.0, progress: bool = True) -> list[dict]:
    """Refit every consumer of `model` (pruned) to the outputs of the same layer of `dense`, in place.

    `batches`: collated training batches (`input_features`, `labels`). Both models run in eval mode.
    The encoder is walked layer by layer on cached residual streams (one layer's forward per refit, not the
    whole model's; the dense layer once for both of its consumers); the decoder, whose sequences are short,
    reruns on the cached encoder outputs (the dense one once for every consumer's target).
    `target`: "layer" fits each consumer to the dense consumer's output; "stream" (encoder only) fits it to
    the dense residual stream after the consumer minus the pruned stream before it, so each layer also
    absorbs the drift that reaches it from the layers before. `pad_weight`: the weight of an encoder row past
    its clip's audio (`slim.data.frame_weights`).
    Returns one record per consumer: name, kept inputs, relative error before and after."""
    from tqdm.auto import tqdm

    if target not in TARGETS:
        raise ValueError(f"repair target {target!r} is not one of {TARGETS}")
    was = model.training, dense.training
    model.eval(), dense.eval()
    ours, theirs = consumers(model), dict(consumers(dense))
    bar = tqdm(total=len(ours), desc="repair", disable=not progress)
    report = []

    def refit(name, lin, pairs):
        g = Gram(lin.in_features, lin.out_features)
        for x, y, w in pairs:
            g.add(x, y, w)
        before, after = refit_linear(lin, g.xtx, g.xty, g.yty, ridge)
        report.append({"layer": name, "inputs": lin.in_features, "rel_err_before": before, "rel_err_after": after})
        bar.update(1)

    def rows(t):
        return t.reshape(-1, t.shape[-1])

    # encoder: the pruned stream h and the dense stream hd, one layer at a time
    h = [_encoder_input(model, b["input_features"]) for b in batches]
    hd = [_encoder_input(dense, b["input_features"]) for b in batches]
    # one weight per encoder row, as `rows` lays them out (None: every row alike)
    weights = [w if w is None else w.reshape(-1)
               for w in (frame_weights(b.get("audio_frames"), x.shape[1], pad_weight) for b, x in zip(batches, h))]
    enc, denc = model.model.encoder, dense.model.encoder
    for i, (layer, dlayer) in enumerate(zip(enc.layers, denc.layers)):
        attn, ffn, mid = (layer.get_submodule(p) for p in ("self_attn.out_proj", "fc2", "final_layer_norm"))
        dattn, dffn, dmid = (dlayer.get_submodule(p) for p in ("self_attn.out_proj", "fc2", "final_layer_norm"))
        # The dense layer runs once per batch for both of its consumers' outputs and its own output (the next
        # dense stream); with target "stream" also the stream between its two blocks (final_layer_norm's input).
        dense_taps, hd_next = [], []
        for xd in hd:
            taps, out = _tap(lambda: dlayer(xd, None), {dattn: "out", dffn: "out"} | (
                {dmid: "in"} if target == "stream" else {}))
            dense_taps.append(taps)
            hd_next.append(out)

        def attn_pairs():
            for x, xd, w, t in zip(h, hd, weights, dense_taps):
                y = t[dattn] + (xd - x) if target == "stream" else t[dattn]  # stream: what upstream lost too
                yield rows(_capture(attn, lambda: layer(x, None), "in")), rows(y), w

        refit(f"encoder.{i}.self_attn.out_proj", attn, attn_pairs())

        def ffn_pairs():  # on the pruned stream after the refit attention block
            for x, w, t in zip(h, weights, dense_taps):
                p = _tap(lambda: layer(x, None), {ffn: "in", mid: "in"}, stop=ffn)[0]
                y = t[dffn] + (t[dmid] - p[mid]) if target == "stream" else t[dffn]
                yield rows(p[ffn]), rows(y), w

        refit(f"encoder.{i}.fc2", ffn, ffn_pairs())
        h = [layer(x, None) for x in h]
        hd = hd_next
        del dense_taps
    enc_out = [enc.layer_norm(x) for x in h]
    dense_enc = [denc.layer_norm(x) for x in hd]
    del h, hd

    # decoder: teacher-forced on the label tokens, rows at the label positions only; the dense decoder runs
    # once per batch for every consumer's target (a few tokens each), the pruned one up to each consumer
    masks = [_decoder_mask(b) for b in batches]
    decoder = ours[len(report):]
    targets = []
    for b, ed, m in zip(batches, dense_enc, masks):
        taps = _tap(lambda: _run(dense, b, ed), {theirs[name]: "out" for name, _ in decoder})[0]
        targets.append({name: rows(taps[theirs[name]][m]) for name, _ in decoder})
    del dense_enc
    for name, lin in decoder:

        def pairs():
            for b, e, m, y in zip(batches, enc_out, masks, targets):
                yield rows(_capture(lin, lambda: _run(model, b, e), "in")[m]), y[name], None

        refit(name, lin, pairs())
    bar.close()
    model.train(was[0]), dense.train(was[1])
    return report
