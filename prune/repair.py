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

import torch
from torch import nn

from prune.apply import attention_modules, ffn_layers

IGNORE_INDEX = -100


@dataclass
class RepairConfig:
    enabled: bool = True
    """Refit out_proj / fc2 of every layer (and their bias) after removal."""
    calibration_batches: int = 8
    """Batches of training data (batch 4) whose activations the refit uses; labels are not used, only the
    decoder's input tokens."""
    ridge: float = 1e-2
    """Pull towards the kept weights, relative to the mean diagonal of X^T X (0: plain least squares)."""

    def __post_init__(self):
        if self.calibration_batches < 1:
            raise ValueError(f"repair.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.ridge < 0:
            raise ValueError(f"repair.ridge must be >= 0, got {self.ridge}")


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
    """A teacher-forced forward (labels only make the decoder inputs; no loss is used)."""
    kw = {"labels": batch["labels"]}
    if encoder_out is not None:
        kw["encoder_outputs"] = (encoder_out,)
    else:
        kw["input_features"] = batch["input_features"]
    return model(**kw, use_cache=False)


def _capture(model, module: nn.Module, batch: dict, what: str, encoder_out=None, stop: bool = True):
    """The input (`what="in"`) or output (`"out"`) of `module` in a forward of `model` on `batch`."""
    box = []

    def hook(mod, args, output):
        box.append((args[0] if what == "in" else output).detach())
        if stop:
            raise _Stop

    h = module.register_forward_hook(hook)
    try:
        _run(model, batch, encoder_out)
    except _Stop:
        pass
    finally:
        h.remove()
    return box[0]


def _rows(t: torch.Tensor, encoder_side: bool, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (N, C) float64, decoder rows restricted to the label positions."""
    if not encoder_side:
        t = t[mask]
    return t.reshape(-1, t.shape[-1]).double()


@torch.no_grad()
def refit_linear(linear: nn.Linear, xtx: torch.Tensor, xty: torch.Tensor, yty: torch.Tensor,
                 ridge: float) -> tuple[float, float]:
    """Solve the ridge problem from accumulated Gram matrices of [X, 1] and set weight and bias in place.

    xtx: (k+1, k+1) = [X,1]^T [X,1]; xty: (k+1, d) = [X,1]^T Y; yty: scalar sum of Y^2.
    Returns the relative squared error ||[X,1]W - Y||^2 / ||Y||^2 before and after."""
    w0 = torch.cat([linear.weight.detach().double().T, linear.bias.detach().double()[None]]
                   if linear.bias is not None else [linear.weight.detach().double().T], 0)
    if linear.bias is None:  # no bias column to fit: drop the ones column's row/column
        xtx, xty = xtx[:-1, :-1], xty[:-1]

    def err(w):
        return float((torch.einsum("ij,ik,kj->", w, xtx, w) - 2 * (w * xty).sum() + yty) / yty.clamp_min(1e-30))

    lam = ridge * float(xtx.diagonal()[: linear.in_features].mean())
    a = xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype)
    w = torch.linalg.solve(a, xty + lam * w0)
    before, after = err(w0), err(w)
    if after < before:  # the solve can only lose to W0 through round-off; never make a layer worse
        dtype = linear.weight.dtype
        linear.weight.copy_(w[: linear.in_features].T.to(dtype))
        if linear.bias is not None:
            linear.bias.copy_(w[-1].to(dtype))
    return before, max(min(after, before), 0.0)


@torch.no_grad()
def repair_model(model, dense, batches: list[dict], ridge: float = 1e-2, progress: bool = True) -> list[dict]:
    """Refit every consumer of `model` (pruned) to the outputs of the same layer of `dense`, in place.

    `batches`: collated training batches (`input_features`, `labels`). Both models run in eval mode.
    Returns one record per consumer: name, kept inputs, relative error before and after."""
    from tqdm.auto import tqdm

    was = model.training, dense.training
    model.eval(), dense.eval()
    ours, theirs = consumers(model), dict(consumers(dense))
    masks = [_decoder_mask(b) for b in batches]
    dense_enc = [dense.model.encoder(b["input_features"]).last_hidden_state for b in batches]
    enc_out = None  # the pruned encoder's output, fixed once every encoder consumer is refit
    report = []
    for name, lin in tqdm(ours, desc="repair", disable=not progress):
        encoder_side = name.startswith("encoder")
        if not encoder_side and enc_out is None:
            enc_out = [model.model.encoder(b["input_features"]).last_hidden_state for b in batches]
        k = lin.in_features + 1
        xtx = torch.zeros(k, k, dtype=torch.float64)
        xty = torch.zeros(k, lin.out_features, dtype=torch.float64)
        yty = torch.zeros((), dtype=torch.float64)
        for j, b in enumerate(batches):
            y = _capture(dense, theirs[name], b, "out", None if encoder_side else dense_enc[j])
            x = _capture(model, lin, b, "in", None if encoder_side else enc_out[j])
            x, y = _rows(x, encoder_side, masks[j]), _rows(y, encoder_side, masks[j])
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            xtx += x.T @ x
            xty += x.T @ y
            yty += (y * y).sum()
        before, after = refit_linear(lin, xtx, xty, yty, ridge)
        report.append({"layer": name, "inputs": lin.in_features, "rel_err_before": before, "rel_err_after": after})
    model.train(was[0]), dense.train(was[1])
    return report
