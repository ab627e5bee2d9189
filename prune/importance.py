"""Importance scores for every attention head (per kind, per layer) and every FFN neuron (per layer).

Three criteria, all returning the same `Scores`, so selection does not care which one ran:

* `l1_scores`: the classic weight-magnitude criterion. A head's score is the L1 norm of its Q, K and V
  rows (optionally plus its out-proj columns); a neuron's is the L1 norm of its fc1 row plus its fc2
  column. Biases are left out: they are not part of the head's (neuron's) weight matrix block.
* `taylor_scores`: data-driven. Put a gate g (= 1) on every head's output and every FFN neuron's
  activation; |g * dL/dg| at g = 1 is the first-order estimate of how much the loss changes when the
  head is removed (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; Molchanov et al.
  2017/2019 for neurons). Accumulated as the sum over calibration examples of each example's |dL/dg|
  (Michel's expectation over examples), or optionally per batch.
* `ablation_scores`: measured, not estimated. Each head is removed alone and the KL divergence from the
  model's own next-token distribution to the one without it is summed over the calibration tokens (what the
  removal costs, in the quantity distillation later restores, on one scale across layers). FFN neurons are
  too many to remove one at a time: they get the Taylor scores.
* `unrepaired_shares` (criterion `taylor_repair`: Taylor scores times these shares): the share of each
  unit's contribution to its consumer's output (`out_proj` for a head, `fc2` for a neuron) that the
  least-squares repair (`prune.repair`) could not restore from the other units of its layer, were it removed
  alone. A head whose output the others can rebuild costs little once the repair has run, however large its
  Taylor score.
* `random_scores`: the control that shows a criterion beats chance.

Higher score = more important = kept first. Scores are computed on whatever the model currently has
(a pruned layer gets a shorter vector; a layer with no heads an empty one).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from prune.apply import FFN_KINDS, HEAD_KINDS, attention_modules, ffn_layers
from slim.model import SlimEncoder, model_inputs

NORMALIZATIONS = ("none", "layer_l2")


@dataclass
class Scores:
    """Per-layer 1-D score tensors: `heads[kind][layer]` (kind: encoder/decoder/cross, one entry per
    head) and `ffn[kind][layer]` (kind: encoder/decoder, one entry per neuron)."""

    heads: dict[str, list[torch.Tensor]]
    ffn: dict[str, list[torch.Tensor]]
    criterion: str = ""
    normalization: str = field(default="none")

    def __post_init__(self):
        if set(self.heads) != set(HEAD_KINDS):
            raise ValueError(f"Scores.heads must have keys {HEAD_KINDS}, got {sorted(self.heads)}")
        if set(self.ffn) != set(FFN_KINDS):
            raise ValueError(f"Scores.ffn must have keys {FFN_KINDS}, got {sorted(self.ffn)}")

    def normalized(self, mode: str = "layer_l2") -> "Scores":
        """A copy with each layer's vector divided by its L2 norm (per kind, heads and neurons alike).

        Michel et al. normalize each layer's head importances by their L2 norm before ranking them
        globally, so that a layer whose scores are small in scale is not emptied wholesale. That also
        hides real differences between layers: on tiny.en raw Taylor scores ranked better (see
        `PruneSelection.normalize`). Only a global ranking is affected; a per-layer one is unchanged by
        a per-layer positive scale. `mode="none"` returns an unchanged copy.
        """
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization {mode!r} is not one of {NORMALIZATIONS}")
        if mode == "none":
            return copy.deepcopy(self)

        def norm(t: torch.Tensor) -> torch.Tensor:
            n = t.norm()
            return t / n if n > 0 else t.clone()

        return Scores(heads={k: [norm(t) for t in v] for k, v in self.heads.items()},
                      ffn={k: [norm(t) for t in v] for k, v in self.ffn.items()},
                      criterion=self.criterion, normalization=mode)

    def sizes(self) -> dict[str, list[int]]:
        """Heads (neurons) per layer that these scores cover, keyed `encoder`..., `encoder_ffn`...."""
        out = {k: [t.numel() for t in v] for k, v in self.heads.items()}
        out.update({f"{k}_ffn": [t.numel() for t in v] for k, v in self.ffn.items()})
        return out


# ---------------------------------------------------------------------------------------------
# l1


def _head_l1(w: torch.Tensor, heads: int, head_dim: int, rows: bool) -> torch.Tensor:
    """L1 per head of a (heads*head_dim, d) weight (rows=True) or a (d, heads*head_dim) one (columns)."""
    w = w.detach().float().abs()
    if not rows:
        w = w.t()
    return w.reshape(heads, head_dim * w.shape[1]).sum(dim=1)


@torch.no_grad()
def l1_scores(model, include_out_proj: bool = False) -> Scores:
    """‖W_q,h‖₁ + ‖W_k,h‖₁ + ‖W_v,h‖₁ (+ ‖W_out[:, h]‖₁) per head; ‖fc1[j, :]‖₁ + ‖fc2[:, j]‖₁ per neuron."""
    heads = {}
    for kind, mods in attention_modules(model).items():
        heads[kind] = []
        for a in mods:
            H, D = a.num_heads, a.head_dim
            s = sum(_head_l1(p.weight, H, D, rows=True) for p in (a.q_proj, a.k_proj, a.v_proj))
            if include_out_proj:
                s = s + _head_l1(a.out_proj.weight, H, D, rows=False)
            heads[kind].append(s)
    ffn = {kind: [l.fc1.weight.detach().float().abs().sum(1) + l.fc2.weight.detach().float().abs().sum(0)
                  for l in layers] for kind, layers in ffn_layers(model).items()}
    return Scores(heads=heads, ffn=ffn, criterion="l1_out" if include_out_proj else "l1")


# ---------------------------------------------------------------------------------------------
# taylor


def _default_loss(model, batch: dict) -> torch.Tensor:
    return model(**model_inputs(batch, model=model)).loss


def _split(batch: dict) -> list[dict]:
    """A collated batch as single-example batches (tensors sliced on their first axis)."""
    n = batch["input_features"].shape[0]
    return [{k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
             for k, v in batch.items()} for i in range(n)]


@contextlib.contextmanager
def _gated(model, attn: dict, layers: dict, gates: dict):
    """Within: each head's slice of `out_proj`'s input and each neuron's `fc2` input is scaled by
    `gates[("heads"|"ffn", kind, layer)]` (forward pre-hooks) and the model is in eval mode (no dropout noise in
    the scores). Afterwards the hooks are gone and the model is back in the mode it was in."""

    def head_hook(gate, head_dim):
        def hook(module, args):  # out_proj's input is the heads' outputs side by side, head_dim each
            x = args[0]
            return (x * gate.to(x.dtype).repeat_interleave(head_dim),) + tuple(args[1:])

        return hook

    def ffn_hook(gate):
        def hook(module, args):
            return (args[0] * gate.to(args[0].dtype),) + tuple(args[1:])

        return hook

    handles = []
    for (what, kind, i), g in gates.items():
        if what == "heads":
            a = attn[kind][i]
            handles.append(a.out_proj.register_forward_pre_hook(head_hook(g, a.head_dim)))
        else:
            handles.append(layers[kind][i].fc2.register_forward_pre_hook(ffn_hook(g)))
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _calibration(batches: Iterable[dict], max_batches: int | None, device, who: str):
    """The batches (at most `max_batches`) moved to `device`; an error naming `who` when there are none."""
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        n += 1
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if n == 0:
        raise ValueError(f"{who}: no calibration batches (batches was empty or max_batches=0)")


def taylor_scores(model, batches: Iterable[dict], loss_fn: Callable | None = None,
                  max_batches: int | None = None, per_example: bool = True) -> Scores:
    """Sum of |g · ∂L/∂g| at g = 1 for a gate on every head and FFN neuron, over calibration data.

    `batches` yields dicts with at least `input_features` and `labels` (as the training collator makes);
    `loss_fn(model, batch) -> scalar` defaults to the model's own cross-entropy (`model(**batch).loss`).
    `per_example=True` takes the absolute value per example (each batch is run one example at a time,
    the same compute): gradients of different examples often have opposite signs and cancel inside a
    batch mean. Measured on tiny.en (30% of heads, one shot, 16 synthetic calibration clips), per-example
    scores left a teacher-forced loss of 0.67-1.08 against 1.95-5.44 for per-batch ones (dense: 0.17).
    `per_example=False` takes |·| of each batch's mean-loss gradient.

    The gates are forward pre-hooks on `out_proj` (scaling each head's slice of its input) and on `fc2`
    (scaling each neuron); they are removed afterwards. Gradients are taken with `torch.autograd.grad`
    with respect to the gates only, so the parameters' `.grad` are left exactly as they were; the model
    runs in eval mode (no dropout noise in the scores) and is put back in the mode it was in.
    """
    loss_fn = loss_fn or _default_loss
    device = next(model.parameters()).device
    attn, layers = attention_modules(model), ffn_layers(model)
    gates = {("heads", k, i): torch.ones(a.num_heads, device=device, requires_grad=True)
             for k, mods in attn.items() for i, a in enumerate(mods)}
    gates.update({("ffn", k, i): torch.ones(l.fc1.out_features, device=device, requires_grad=True)
                  for k, ls in layers.items() for i, l in enumerate(ls)})
    totals = {key: torch.zeros(g.numel()) for key, g in gates.items()}

    keys, params = list(gates), list(gates.values())
    with _gated(model, attn, layers, gates), torch.enable_grad():
        for batch in _calibration(batches, max_batches, device, "taylor_scores"):
            for part in (_split(batch) if per_example else [batch]):
                grads = torch.autograd.grad(loss_fn(model, part), params, allow_unused=True)
                for key, g, gr in zip(keys, params, grads):
                    if gr is not None:
                        totals[key] += (g.detach() * gr).abs().float().cpu()
    heads = {k: [totals[("heads", k, i)] for i in range(len(attn[k]))] for k in HEAD_KINDS}
    ffn = {k: [totals[("ffn", k, i)] for i in range(len(layers[k]))] for k in FFN_KINDS}
    return Scores(heads=heads, ffn=ffn, criterion="taylor")


# ---------------------------------------------------------------------------------------------
# ablation


def _kl_sum(ref_logp: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> float:
    """sum over the masked tokens of KL(ref || softmax(logits))."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1)[mask].sum())


@contextlib.contextmanager
def _layer_inputs(layers):
    """Within: {layer index: the hidden states that layer was last called on}."""
    seen: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
               for i, layer in enumerate(layers)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _encoder_from(encoder, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The encoder's output, computed from `x`, the input of `layer` (as `SlimEncoder.forward` runs it)."""
    for lay in encoder.layers[layer:]:
        x = lay(x, None)
    return encoder.layer_norm(x)


@torch.no_grad()
def ablation_scores(model, batches: Iterable[dict], max_batches: int | None = None,
                    ffn: dict[str, list[torch.Tensor]] | None = None, progress: bool = True) -> Scores:
    """Each head's score: sum over the calibration tokens of KL(model || model without that head alone),
    teacher-forced on the labels (positions labelled -100 left out).

    Taylor's first-order estimate ranks heads by the label loss's slope at the full model; this measures the
    removal itself against the model's own outputs, so the labels' domain (synthetic voices) does not steer
    it and scores of different layers are in the same unit (nats). One forward per head and batch: the
    decoder's self- and cross-attention heads reuse the batch's encoder output, an encoder head's removal reruns
    the encoder from its layer on. `ffn`: the FFN neurons'
    scores to return beside them (`taylor_scores(...).ffn`; zeros when None). The model runs in eval mode
    and is put back in the mode it was in; its weights are untouched (the removal is a gate of 0 on the
    head's slice of `out_proj`'s input).
    """
    device = next(model.parameters()).device
    attn, layers = attention_modules(model), ffn_layers(model)
    encoder = model.model.encoder
    if not isinstance(encoder, SlimEncoder):
        raise TypeError("ablation_scores needs the explicit-attention model (slim.model.install_explicit_attention)")
    gates = {("heads", k, i): torch.ones(a.num_heads, device=device)
             for k, mods in attn.items() for i, a in enumerate(mods)}
    totals = {key: torch.zeros(g.numel()) for key, g in gates.items()}
    from tqdm.auto import tqdm

    n = len(batches) if hasattr(batches, "__len__") else None
    n = min(n, max_batches) if n is not None and max_batches is not None else n
    bar = tqdm(total=None if n is None else n * sum(g.numel() for g in gates.values()), desc="ablation",
               unit="head", disable=not progress)
    with _gated(model, attn, layers, gates), bar:
        for batch in _calibration(batches, max_batches, device, "ablation_scores"):
            kw = model_inputs(batch, model=model)
            mask = kw["labels"] != -100
            with _layer_inputs(encoder.layers) as layer_in:
                ref = model(**kw)
            ref_logp = torch.log_softmax(ref.logits.float(), dim=-1)
            dec_kw = {k: v for k, v in kw.items() if k != "input_features"}

            def removed(kind: str, layer: int):
                # an encoder head's removal changes its layer and those after it: rerun only those
                enc = (_encoder_from(encoder, layer, layer_in[layer]) if kind == "encoder"
                       else ref.encoder_last_hidden_state)
                return model(**dec_kw, encoder_outputs=(enc,))

            for key, g in gates.items():
                for h in range(g.numel()):
                    g[h] = 0.0
                    out = removed(key[1], key[2])
                    g[h] = 1.0
                    totals[key][h] += _kl_sum(ref_logp, out.logits, mask)
                    bar.update()
    heads = {k: [totals[("heads", k, i)] for i in range(len(attn[k]))] for k in HEAD_KINDS}
    if ffn is None:
        ffn = {k: [torch.zeros(l.fc1.out_features) for l in ls] for k, ls in layers.items()}
    return Scores(heads=heads, ffn=ffn, criterion="ablation")


# ---------------------------------------------------------------------------------------------
# what the repair cannot restore


def _consumer_inputs(model):
    """(kind, layer, consumer Linear, units, unit width) of every head (`out_proj`) and FFN neuron (`fc2`) group."""
    for kind, mods in attention_modules(model).items():
        for i, a in enumerate(mods):
            yield "heads", kind, i, a.out_proj, a.num_heads, a.head_dim
    for kind, ls in ffn_layers(model).items():
        for i, l in enumerate(ls):
            yield "ffn", kind, i, l.fc2, l.fc1.out_features, 1


@torch.no_grad()
def unrepaired_shares(model, batches: Iterable[dict], max_batches: int | None = None,
                      ridge: float = 1e-2) -> Scores:
    """Per head and neuron: the share of its contribution to its consumer's output that a ridge refit of the
    consumer on the layer's other units (and its bias) leaves unrestored, were it removed alone; in [0, 1].

    With x the consumer's input on the calibration data (teacher-forced decoder positions with a label,
    every encoder frame), C its covariance plus `ridge` times the mean diagonal of E[x x^T] (the repair's
    regularizer), P = C^-1 and S a unit's columns, the part of x_S the others cannot predict has covariance
    (P_SS)^-1 (the Schur complement). The unit's contribution W_S x_S then leaves
    tr(W_S (P_SS)^-1 W_S^T) of its tr(W_S E[x_S x_S^T] W_S^T) unrestored. One forward per batch; the
    model's weights and mode are left as they were.

    Not a library call: the pruning libraries score units without regard to a refit afterwards.
    """
    from prune.repair import Gram

    device = next(model.parameters()).device
    units = list(_consumer_inputs(model))
    grams = {(u[0], u[1], u[2]): Gram(u[3].in_features) for u in units}
    mask: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(mod, args):
            x = args[0].detach()
            x = x[mask["decoder"]] if key[1] in ("decoder", "cross") else x.reshape(-1, x.shape[-1])
            grams[key].add(x.cpu())
        return fn

    handles = [u[3].register_forward_pre_hook(hook((u[0], u[1], u[2]))) for u in units]
    was = model.training
    model.eval()
    try:
        for batch in _calibration(batches, max_batches, device, "unrepaired_shares"):
            kw = model_inputs(batch, model=model)
            mask["decoder"] = kw["labels"] != -100
            model(**kw, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was)

    out = {"heads": {k: [None] * len(v) for k, v in attention_modules(model).items()},
           "ffn": {k: [None] * len(v) for k, v in ffn_layers(model).items()}}
    for group, kind, i, lin, n_units, width in units:
        g = grams[(group, kind, i)]
        k = lin.in_features
        n = g.xtx[k, k].clamp_min(1.0)
        second = g.xtx[:k, :k] / n
        mean = g.xtx[:k, k] / n
        cov = second - torch.outer(mean, mean)
        lam = ridge * float(second.diagonal().mean())
        prec = torch.linalg.inv(cov + lam * torch.eye(k, dtype=cov.dtype))
        w = lin.weight.detach().double().cpu()
        # per unit: its columns' block of the precision, inverted (width 1: a neuron, 1 / P_jj)
        blocks = torch.stack([prec[u * width:(u + 1) * width, u * width:(u + 1) * width] for u in range(n_units)])
        moments = torch.stack([second[u * width:(u + 1) * width, u * width:(u + 1) * width] for u in range(n_units)])
        ws = w.reshape(w.shape[0], n_units, width).transpose(0, 1)          # (units, out, width)
        lost = torch.einsum("uoi,uij,uoj->u", ws, torch.linalg.inv(blocks), ws)
        energy = torch.einsum("uoi,uij,uoj->u", ws, moments, ws)
        shares = torch.where(energy > 0, lost / energy.clamp_min(1e-30), torch.zeros_like(lost))
        out[group][kind][i] = shares.clamp(0.0, 1.0).float()
    return Scores(heads=out["heads"], ffn=out["ffn"], criterion="unrepaired_share")


# ---------------------------------------------------------------------------------------------
# random and dispatch


def random_scores(model, seed: int = 0) -> Scores:
    """Uniform random scores from a seeded generator: the chance baseline."""
    g = torch.Generator().manual_seed(seed)
    heads = {k: [torch.rand(a.num_heads, generator=g) for a in mods] for k, mods in attention_modules(model).items()}
    ffn = {k: [torch.rand(l.fc1.out_features, generator=g) for l in ls] for k, ls in ffn_layers(model).items()}
    return Scores(heads=heads, ffn=ffn, criterion="random")


CRITERIA = ("l1", "l1_out", "taylor", "taylor_repair", "ablation", "random")
DATA_CRITERIA = ("taylor", "taylor_repair", "ablation")
"""The criteria that need calibration batches."""


def compute_scores(model, criterion: str, batches: Iterable[dict] | None = None, seed: int = 0,
                   loss_fn: Callable | None = None, max_batches: int | None = None,
                   per_example: bool = True, ablation_batches: int | None = None, ridge: float = 1e-2) -> Scores:
    """Scores by name: `l1`, `l1_out` (l1 with out-proj columns), `taylor`, `taylor_repair` and `ablation`
    (need `batches`; `taylor_repair`: Taylor times `unrepaired_shares` at `ridge`; ablation's FFN neurons get
    Taylor scores; `ablation_batches`: the first that many of them remove the heads, all of them score the
    neurons), `random`."""
    if criterion == "l1":
        return l1_scores(model)
    if criterion == "l1_out":
        return l1_scores(model, include_out_proj=True)
    if criterion == "random":
        return random_scores(model, seed)
    if criterion in DATA_CRITERIA:
        if batches is None:
            raise ValueError(f"criterion {criterion!r} needs calibration batches ({{'input_features', 'labels'}} dicts)")
        batches = list(batches)  # iterated twice by ablation
        taylor = taylor_scores(model, batches, loss_fn=loss_fn, max_batches=max_batches, per_example=per_example)
        if criterion == "taylor":
            return taylor
        if criterion == "taylor_repair":
            share = unrepaired_shares(model, batches, max_batches=max_batches, ridge=ridge)
            return Scores(heads={k: [t * s for t, s in zip(v, share.heads[k])] for k, v in taylor.heads.items()},
                          ffn={k: [t * s for t, s in zip(v, share.ffn[k])] for k, v in taylor.ffn.items()},
                          criterion="taylor_repair")
        n = min(x for x in (max_batches, ablation_batches, len(batches)) if x is not None)
        return ablation_scores(model, batches[:n], ffn=taylor.ffn)
    raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {CRITERIA}")
