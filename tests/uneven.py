"""What the export-layout tests share: the real clips, and a tiny random Whisper with uneven heads per layer
(encoder 3+1, decoder self 2+1 and cross 1+3, one decoder FFN cut to 7), float and as its PTQ copy."""

import copy
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REAL_SPEECH = ROOT / "data" / "real-speech"
SELF_HEADS, CROSS_HEADS = [2, 1], [1, 3]
HEAD_DIM = 16  # d_model 64 / 4 heads


def real_clips(n=None) -> list[Path]:
    items = [json.loads(l) for l in (REAL_SPEECH / "manifest.jsonl").read_text().splitlines() if l.strip()]
    return [REAL_SPEECH / it["audio"] for it in items][:n]


def uneven_model(dense):
    """`dense`'s config rebuilt with the uneven structure (seeded weights), its generation config kept."""
    from slim.model import Structure, build_model

    s = Structure.dense(dense.config)
    s.encoder_heads, s.decoder_heads, s.cross_heads = [3, 1], SELF_HEADS, CROSS_HEADS
    s.decoder_ffn = [7, 128]
    torch.manual_seed(3)
    model = build_model(dense.config, s).eval()
    model.generation_config = dense.generation_config
    return model


def ptq_copy(model):
    """(fake-quant copy calibrated on two random feature batches, its QuantConfig)."""
    from qat.prepare import QuantConfig, ptq

    g = torch.Generator().manual_seed(1)
    batch = {"input_features": torch.randn(2, 80, 3000, generator=g),
             "labels": torch.tensor([[50257, 50362] + list(range(400, 410))] * 2)}
    cfg = QuantConfig(embeddings=True)
    return ptq(copy.deepcopy(model), cfg, [batch]), cfg


def export_all(models: dict, kinds, layouts) -> dict:
    """Each model directory exported by the CLI in each layout (the mode follows the model)."""
    from train.cli import main

    out = {}
    for kind in kinds:
        for layout in layouts:
            d = models["root"] / f"{kind}-{layout}"
            assert main(["export", str(models[kind]), str(d), "--format", layout]) == 0
            out[kind, layout] = d
    return out


def slim_prompt_logits(slim, features):
    """The slim decoder graph's logits after the prompt (begin suppression added, as the engine adds it)."""
    import numpy as np
    import onnxruntime as ort

    d = slim.decode
    sess = ort.InferenceSession(str(slim.dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    cross = [x.numpy() for x in slim.encode(features)]
    feed = {"input_ids": np.array([d.prompt], np.int64), "offset": np.zeros(1, np.int64),
            **{n: np.zeros([1] + [s if isinstance(s, int) else 0 for s in i.shape[1:]], np.float32)
               for i in sess.get_inputs() for n in [i.name] if n.startswith("past_")},
            **dict(zip(slim.cross_names, cross))}
    return sess.run(["logits"], feed)[0][0] + slim._begin


def save_uneven(d: Path) -> dict:
    """The uneven model and its PTQ copy saved under `d` as the pipeline writes them: {"float", "qdq", "root"}."""
    from slim.model import save_model
    from slim.sources import tiny_random_processor, tiny_random_whisper

    model = uneven_model(tiny_random_whisper(seed=0))
    processor = tiny_random_processor()
    fq, cfg = ptq_copy(model)
    return {"float": save_model(model, d / "float", processor=processor),
            "qdq": save_model(fq, d / "ptq", processor=processor, quant=cfg.to_dict()), "root": d}


def weight_matrices(path: Path) -> dict:
    """An ONNX file's initializers of two or more dimensions (the weight matrices), by name."""
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if len(i.dims) >= 2}


def assert_stored_as_uint8(plain: Path, u8: Path) -> None:
    """`u8` (a `--uint8-weights` export of the model `plain` was exported from) holds no int8 weight matrix, and
    each of `plain`'s is there as the same codes + 128 in uint8."""
    import numpy as np

    w8 = {n: w for n, w in weight_matrices(plain).items() if w.dtype == np.int8}
    got = weight_matrices(u8)  # each file read once
    assert w8 and not [n for n, w in got.items() if w.dtype == np.int8]
    assert w8.keys() <= got.keys()
    assert all(got[n].dtype == np.uint8 and np.array_equal(got[n].astype(np.int16) - 128, w) for n, w in w8.items())
