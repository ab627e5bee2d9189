"""How far apart two model directories' weights are: the largest absolute difference over every floating tensor
of model.safetensors, and how many of those tensors differ at all.

    .venv/bin/python benchmarks/weight_diff.py MODEL_A MODEL_B

Both must hold the same tensors (names and shapes), e.g. two runs of one stage with the same settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def weight_diff(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if {k: v.shape for k, v in ta.items()} != {k: v.shape for k, v in tb.items()}:
        raise SystemExit(f"{a} and {b} hold different tensors (names or shapes)")
    diffs = {k: (ta[k].float() - tb[k].float()).abs().max().item() for k in ta if ta[k].is_floating_point()}
    worst = max(diffs, key=diffs.get)
    return {"tensors": len(diffs), "differing": sum(d > 0 for d in diffs.values()), "max_abs": diffs[worst],
            "worst": worst}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    a = p.parse_args(argv)
    r = weight_diff(a.a, a.b)
    print(f"{r['differing']} of {r['tensors']} floating tensors differ; largest difference {r['max_abs']:.3g} "
          f"({r['worst']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
