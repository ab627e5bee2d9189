"""Which layers suffer from quantization: PTQ one unit at a time, loss (and WER) change per unit.

One calibration pass observes every quantizer at once on float activations (post-training practice:
fake quant off while observing), so each quantizer sees exactly what it would see if its unit were
the only one quantized. Then for each unit only its quantizers are switched on and the teacher-forced
cross-entropy is measured; the baseline (everything off) is the float model exactly.

    table = sensitivity_scan(model, QuantConfig(), calib_batches, by="group")
    print(to_markdown(table))
    cfg = QuantConfig(exclude=most_sensitive(table, k=2))   # keep the two worst units in float
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from typing import Callable, Iterable, Literal

import torch
from torch import nn

from qat.prepare import QuantConfig, _batch_kwargs, calibrate, freeze_observers, prepare_qat, quantizers, set_fake_quant

log = logging.getLogger(__name__)

# Kinds of quantized module, as fnmatch patterns on module names (usable as QuantConfig.exclude).
GROUPS: dict[str, list[str]] = {
    "encoder attention projections": ["model.encoder.layers.*.self_attn.*_proj"],
    "decoder self-attention projections": ["model.decoder.layers.*.self_attn.*_proj"],
    "cross-attention projections": ["model.decoder.layers.*.encoder_attn.*_proj"],
    "encoder FFN": ["model.encoder.layers.*.fc1", "model.encoder.layers.*.fc2"],
    "decoder FFN": ["model.decoder.layers.*.fc1", "model.decoder.layers.*.fc2"],
    # The attention matmuls by place: in the ONNX engine only the encoder's run as int8 kernels (the decoder
    # step reads fake-quantized caches in float), so keeping the decoder's in float costs no speed there.
    "encoder attention matmuls": ["model.encoder.layers.*.self_attn.qk", "model.encoder.layers.*.self_attn.pv"],
    "decoder self-attention matmuls": ["model.decoder.layers.*.self_attn.qk", "model.decoder.layers.*.self_attn.pv"],
    "cross-attention matmuls": ["model.decoder.layers.*.encoder_attn.qk", "model.decoder.layers.*.encoder_attn.pv"],
    "conv front end": ["model.encoder.conv1", "model.encoder.conv2"],  # scanned when quant.conv is on
}


@torch.no_grad()
def teacher_forced_loss(model: nn.Module, batches: Iterable[dict]) -> float:
    """Mean cross-entropy of the labels over `batches` (token-weighted, -100 ignored)."""
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        kw = {k: v.to(device) for k, v in _batch_kwargs(batch, model).items()}
        out = model(**kw)
        n = int((kw["labels"] != -100).sum())
        total += float(out.loss) * n
        tokens += n
    if tokens == 0:
        raise ValueError("teacher_forced_loss: no label tokens in the batches")
    return total / tokens


def _units(model: nn.Module, by: str) -> list[tuple[str, list[str]]]:
    owners = sorted({name.rpartition(".")[0] for name, _ in quantizers(model)})
    if by == "layer":
        return [(o, [o]) for o in owners]
    units = []
    for unit, pats in GROUPS.items():
        if any(fnmatch.fnmatchcase(o, p) for o in owners for p in pats):
            units.append((unit, pats))
    return units


def sensitivity_scan(model: nn.Module, cfg: QuantConfig, calib_batches: list[dict], *,
                     eval_batches: list[dict] | None = None, by: Literal["group", "layer"] = "group",
                     wer_fn: Callable[[nn.Module], float] | None = None) -> list[dict]:
    """PTQ each unit alone; rows sorted by loss increase (most sensitive first).

    `model` is a float model (left untouched: the scan works on a copy). `by="group"` scans the kinds
    in GROUPS, `by="layer"` every quantized module (Linear or matmul) alone. `wer_fn(model) -> WER`
    adds a WER column (and costs a decoding pass per unit). The first row is "all" (full PTQ).
    Each row: unit, patterns, loss, delta_loss (vs float), weights (how many int8 weights the unit holds,
    what keeping it float would add to the export in fp16 bytes), and wer / delta_wer with `wer_fn`.
    """
    if by not in ("group", "layer"):
        raise ValueError(f"by must be 'group' or 'layer', got {by!r}")
    eval_batches = eval_batches if eval_batches is not None else calib_batches
    m = prepare_qat(copy.deepcopy(model).eval(), cfg)
    calibrate(m, calib_batches)
    freeze_observers(m)

    def measure(unit: str, patterns: list[str]) -> dict:
        row = {"unit": unit, "patterns": patterns, "loss": teacher_forced_loss(m, eval_batches),
               "weights": quantized_weights(m, patterns)}
        if wer_fn is not None:
            row["wer"] = float(wer_fn(m))
        log.info("sensitivity %s: loss %.4f%s", unit, row["loss"], f", WER {row['wer']:.4f}" if "wer" in row else "")
        return row

    set_fake_quant(m, False)
    base = measure("float", [])
    rows = []
    for unit, patterns in [("all", ["*"])] + _units(m, by):
        set_fake_quant(m, False)
        for p in patterns:
            set_fake_quant(m, True, p)
        rows.append(measure(unit, patterns))
    for r in rows:
        r["delta_loss"] = r["loss"] - base["loss"]
        if wer_fn is not None:
            r["delta_wer"] = r["wer"] - base["wer"]
    head, rest = rows[0], sorted(rows[1:], key=lambda r: r["delta_loss"], reverse=True)
    base["delta_loss"] = 0.0
    if wer_fn is not None:
        base["delta_wer"] = 0.0
    return [base, head] + rest


def ranked_units(table: list[dict]) -> list[dict]:
    """The scanned units' rows (not "float"/"all"), largest loss increase first."""
    return sorted((r for r in table if r["unit"] not in ("float", "all")), key=lambda r: r["delta_loss"], reverse=True)


def quantized_weights(model: nn.Module, patterns: list[str]) -> int:
    """Elements of the weights with a weight quantizer whose owner module matches one of `patterns`: what
    a unit keeps in int8 (an activation-only unit, such as the attention matmuls, holds none). A weight
    shared by two modules (the decoder's tied embedding and output projection) counts once."""
    weights = {id(module.weight): module.weight.numel() for name, module in model.named_modules()
               if isinstance(getattr(module, "weight_quant", None), nn.Module)
               and any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    return sum(weights.values())


def units_to_keep_float(table: list[dict], k: int, max_weights: int | None = None) -> tuple[list[dict], list[dict]]:
    """(kept, passed over): the rows of the k most sensitive units, walking down the ranking. With
    `max_weights`, a unit whose weights would take the units kept so far past it is passed over for the next
    one, so an activation-only unit (no weights) always fits."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    kept, passed, spent = [], [], 0
    for r in ranked_units(table):
        if len(kept) == k:
            break
        if max_weights is not None and spent + r["weights"] > max_weights:
            passed.append(r)
            continue
        kept.append(r)
        spent += r["weights"]
    return kept, passed


def most_sensitive(table: list[dict], k: int) -> list[str]:
    """Exclude patterns (for QuantConfig.exclude) of the k units with the largest loss increase."""
    return [p for r in units_to_keep_float(table, k)[0] for p in r["patterns"]]


def to_markdown(table: list[dict]) -> str:
    """The scan as a markdown table."""
    wer = any("wer" in r for r in table)
    head = "| unit | loss | Δ loss | int8 weights |" + (" WER | Δ WER |" if wer else "")
    sep = "|---|---:|---:|---:|" + ("---:|---:|" if wer else "")
    lines = [head, sep]
    for r in table:
        line = f"| {r['unit']} | {r['loss']:.4f} | {r['delta_loss']:+.4f} | {r['weights']:,} |"
        if wer:
            line += f" {100 * r['wer']:.2f}% | {100 * r['delta_wer']:+.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"
