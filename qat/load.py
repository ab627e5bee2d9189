"""Which loader fits a model directory the project wrote: its `slim_structure.json` says whether the
model is float (`slim.model.load_model`, also any plain HF directory), fake-quant
(`qat.prepare.load_quantized_model`) or converted true INT8 (`qat.convert.load_int8_model`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qat.convert import load_int8_model
from qat.prepare import load_quantized_model
from slim.model import load_model, read_structure

FLOAT, FAKE_QUANT, INT8 = "float", "fake-quant", "int8"


def load_model_dir(model_dir: str | Path) -> tuple[nn.Module, str]:
    """(model, kind) of a model directory; kind is FLOAT, FAKE_QUANT or INT8."""
    s = read_structure(model_dir)
    if s is None or s.quant is None:
        return load_model(model_dir), FLOAT
    if s.quant.get("converted"):
        return load_int8_model(model_dir), INT8
    return load_quantized_model(model_dir), FAKE_QUANT
