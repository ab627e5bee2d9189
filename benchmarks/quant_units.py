"""Which kind of quantizer costs a fake-quant model its WER on a set: the model evaluated (torch, fake quant) with
one kind of quantizer on and every other off (`--only`), or with every kind on but one.

    .venv/bin/python benchmarks/quant_units.py QAT_MODEL --data SET [--weights DENSE_MODEL] [--only]
        [--groups "encoder FFN,cross-attention matmuls"] [--kind "encoder P.V=model.encoder.*.pv"]
        [--row-matmuls "*.pv"] [--out R.json]

`--weights`: another model's weights in the fake-quant model, its quantizer state kept (a QAT model's calibrated
grids on dense weights: quantization without the training). The kinds are `qat.sensitivity.GROUPS`; kinds the
model does not quantize are left out; `--kind NAME=PATTERN[,PATTERN]` adds one (fnmatch on module names).
`--row-matmuls`: the first input of the matching attention matmuls on a grid per row (`quant.row_matmuls`)
instead of the model's calibrated one. Where `qat.sensitivity` ranks the kinds by the teacher-forced loss on
training batches, this measures what they cost where the model decodes, e.g. on 28 s windows
(docs/results.md, "Long windows").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def evaluate_units(model_dir: str, data: str, only: bool, groups: list[str] | None = None,
                   weights: str | None = None, batch_size: int = 8, kinds: dict[str, list[str]] | None = None,
                   row_matmuls: list[str] | None = None) -> dict[str, float]:
    """WER by configuration: 'all' and 'none' (not with `only`), then 'only KIND' or 'all but KIND'."""
    import fnmatch

    from eval.engines import _processor
    from eval.run import evaluate_loaded
    from qat.prepare import QuantMatMul, load_quantized_model, set_fake_quant
    from qat.quantizers import activation_quantizer
    from qat.sensitivity import GROUPS

    known = {**GROUPS, **(kinds or {})}
    unknown = sorted(set(groups or []) - set(known))
    if unknown:
        raise SystemExit(f"--groups: unknown kind(s) {unknown}; known: {sorted(known)}")
    model = load_quantized_model(model_dir)
    if weights:
        from safetensors.torch import load_file

        unexpected = model.load_state_dict(load_file(str(Path(weights) / "model.safetensors")), strict=False)[1]
        if unexpected:
            raise SystemExit(f"--weights {weights}: tensors the model does not have: {unexpected[:5]}")
    for name, m in model.named_modules():
        if isinstance(m, QuantMatMul) and any(fnmatch.fnmatchcase(name, p) for p in row_matmuls or []):
            m.a_quant = activation_quantizer(m.a_quant.bits, "dynamic")
    processor = _processor(Path(model_dir))
    out: dict[str, float] = {}

    def run(label: str) -> None:
        out[label] = evaluate_loaded(model, processor, data, batch_size=batch_size)["wer"]
        print(f"{label:50s} {100 * out[label]:6.2f}", flush=True)

    if not only:
        set_fake_quant(model, True)
        run("all")
        set_fake_quant(model, False)
        run("none")
    for kind in groups or list(known):
        set_fake_quant(model, not only)
        if sum(set_fake_quant(model, only, p) for p in known[kind]) == 0:
            continue  # the model does not quantize this kind
        run(f"only {kind}" if only else f"all but {kind}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a fake-quant model directory (a qat/ptq stage's model)")
    p.add_argument("--data", required=True, help="eval set: JSONL manifest or audio folder")
    p.add_argument("--weights", help="load this model directory's weights into the fake-quant model")
    p.add_argument("--only", action="store_true", help="one kind on at a time (default: one kind off at a time)")
    p.add_argument("--groups", help="comma-separated kinds of qat.sensitivity.GROUPS (default: all)")
    p.add_argument("--kind", action="append", default=[], metavar="NAME=PATTERN[,PATTERN]",
                   help="another kind of quantizer, by module-name patterns (repeatable)")
    p.add_argument("--row-matmuls", help="comma-separated patterns of attention matmuls whose first input gets a "
                                         "grid per row")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the WERs as JSON here")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    kinds = {}
    for k in a.kind:
        name, sep, pats = k.partition("=")
        if not sep or not name or not pats:
            raise SystemExit(f"--kind {k!r}: expected NAME=PATTERN[,PATTERN]")
        kinds[name] = pats.split(",")
    res = evaluate_units(a.model, a.data, a.only, a.groups.split(",") if a.groups else None, a.weights,
                         a.batch_size, kinds, a.row_matmuls.split(",") if a.row_matmuls else None)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
