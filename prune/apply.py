"""Physical removal of heads and FFN neurons: the surgery half of score -> select -> apply.

Heads are contiguous blocks of `head_dim` rows in `q_proj`/`k_proj`/`v_proj` and the matching columns of
`out_proj`; an FFN neuron is one row of `fc1` and one column of `fc2`. Slicing both sides removes the
weights themselves (smaller matmuls, smaller files), unlike masking, which only zeroes them; the
model-format code reads the new sizes off the modules (`slim.model.structure_of`), so a pruned model
saves, loads and generates (the KV cache takes its shapes from `k_proj`/`v_proj`) with nothing patched
by hand. `mask_model` is the reference the tests compare the surgery against.

Slicing swaps in new, smaller Parameters: an optimizer built before pruning must be rebuilt after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slim.attention import SlimAttention

HEAD_KINDS = ("encoder", "decoder", "cross")
FFN_KINDS = ("encoder", "decoder")


# ---------------------------------------------------------------------------------------------
# where the prunable modules live


def attention_modules(model) -> dict[str, list[nn.Module]]:
    """Attentions per kind, in layer order: encoder self, decoder self (causal), decoder cross."""
    enc, dec = model.model.encoder.layers, model.model.decoder.layers
    return {"encoder": [l.self_attn for l in enc], "decoder": [l.self_attn for l in dec],
            "cross": [l.encoder_attn for l in dec]}


def ffn_layers(model) -> dict[str, list[nn.Module]]:
    """Encoder and decoder layers (each has `fc1`, `fc2`), in layer order."""
    return {"encoder": list(model.model.encoder.layers), "decoder": list(model.model.decoder.layers)}


def _require_slim(model) -> None:
    for kind, mods in attention_modules(model).items():
        for i, attn in enumerate(mods):
            if not isinstance(attn, SlimAttention):
                raise TypeError(f"{kind} attention of layer {i} is {type(attn).__name__}, not SlimAttention: "
                                "call slim.model.install_explicit_attention(model) (or load with "
                                "slim.model.load_model) before pruning")


def _index(idx: Sequence[int] | torch.Tensor, size: int, what: str) -> torch.Tensor:
    """Validate a keep-list: unique, sorted, inside [0, size)."""
    t = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long).flatten()
    if t.numel() and (t.min() < 0 or t.max() >= size):
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {t.tolist()}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"{what}: indices must be sorted and unique, got {t.tolist()}")
    return t


def head_rows(keep_heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the kept heads' blocks in a projection of width heads*head_dim."""
    return (keep_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# ---------------------------------------------------------------------------------------------
# surgery on single modules


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def slice_linear_out(linear: nn.Linear, idx) -> nn.Linear:
    """Keep output features `idx` (rows of the weight, entries of the bias), in place."""
    t = _index(idx, linear.out_features, "slice_linear_out").to(linear.weight.device)
    linear.weight = _param(linear.weight[t], linear.weight)
    if linear.bias is not None:
        linear.bias = _param(linear.bias[t], linear.bias)
    linear.out_features = t.numel()
    return linear


def slice_linear_in(linear: nn.Linear, idx) -> nn.Linear:
    """Keep input features `idx` (columns of the weight; the bias is untouched), in place."""
    t = _index(idx, linear.in_features, "slice_linear_in").to(linear.weight.device)
    linear.weight = _param(linear.weight[:, t], linear.weight)
    linear.in_features = t.numel()
    return linear


def prune_heads(attn: SlimAttention, keep_heads) -> SlimAttention:
    """Keep heads `keep_heads` (sorted indices): Q/K/V rows and out-proj columns, `num_heads` updated."""
    if not isinstance(attn, SlimAttention):
        raise TypeError(f"prune_heads needs a SlimAttention, got {type(attn).__name__}")
    keep = _index(keep_heads, attn.num_heads, "prune_heads")
    rows = head_rows(keep, attn.head_dim)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        slice_linear_out(proj, rows)
    slice_linear_in(attn.out_proj, rows)
    attn.num_heads = keep.numel()
    return attn


def prune_ffn(layer: nn.Module, keep_neurons) -> nn.Module:
    """Keep FFN neurons `keep_neurons` (sorted indices) of an encoder/decoder layer: fc1 rows, fc2 columns."""
    keep = _index(keep_neurons, layer.fc1.out_features, "prune_ffn")
    slice_linear_out(layer.fc1, keep)
    slice_linear_in(layer.fc2, keep)
    return layer


# ---------------------------------------------------------------------------------------------
# whole models


def _check_keep(model, keep) -> None:
    attn, ffn = attention_modules(model), ffn_layers(model)
    for kind in HEAD_KINDS:
        if len(keep.heads[kind]) != len(attn[kind]):
            raise ValueError(f"keep.heads[{kind!r}] has {len(keep.heads[kind])} layers, the model {len(attn[kind])}")
    for kind in FFN_KINDS:
        if len(keep.ffn[kind]) != len(ffn[kind]):
            raise ValueError(f"keep.ffn[{kind!r}] has {len(keep.ffn[kind])} layers, the model {len(ffn[kind])}")


def apply_keep(model, keep):
    """Physically remove every head and neuron not listed in `keep` (a `prune.select.Keep`), in place."""
    _require_slim(model)
    _check_keep(model, keep)
    for kind, mods in attention_modules(model).items():
        for i, attn in enumerate(mods):
            if len(keep.heads[kind][i]) != attn.num_heads:
                prune_heads(attn, keep.heads[kind][i])
    for kind, layers in ffn_layers(model).items():
        for i, layer in enumerate(layers):
            if len(keep.ffn[kind][i]) != layer.fc1.out_features:
                prune_ffn(layer, keep.ffn[kind][i])
    return model


@torch.no_grad()
def mask_model(model, keep):
    """Zero the contributions of the heads/neurons not in `keep`, without removing them (in place).

    Zeroing a head's out-proj columns (a neuron's fc2 column) removes exactly what slicing removes, so
    `apply_keep(copy, keep)` must equal `mask_model(copy, keep)`: the reference the tests check against.
    """
    _check_keep(model, keep)
    for kind, mods in attention_modules(model).items():
        for i, attn in enumerate(mods):
            drop = torch.ones(attn.num_heads, dtype=torch.bool)
            drop[_index(keep.heads[kind][i], attn.num_heads, "mask_model")] = False
            cols = head_rows(drop.nonzero().flatten(), attn.head_dim)
            attn.out_proj.weight[:, cols.to(attn.out_proj.weight.device)] = 0
    for kind, layers in ffn_layers(model).items():
        for i, layer in enumerate(layers):
            drop = torch.ones(layer.fc1.out_features, dtype=torch.bool)
            drop[_index(keep.ffn[kind][i], layer.fc1.out_features, "mask_model")] = False
            layer.fc2.weight[:, drop.to(layer.fc2.weight.device)] = 0
    return model
