"""What each speed choice of the INT8 export and its ONNX Runtime sessions is worth, measured one by one.

    .venv/bin/python benchmarks/bench_onnx_graphs.py EXPORT [--clips MANIFEST] [--threads 2] [--repeats 5]

EXPORT is a QDQ export (`qat.onnx_export.export_model(..., mode="qdq")`) with quantized attention matmuls.
Three measurements, each against the setting it replaced (min over repeats; run it alone on the machine):
  1. signed keys/values: the encoder's attention kernels (ORT profiler) with the sessions of
     `slim.export_format.session_options`, and with ORT's default int8 -> uint8 rewrite
     (`session.qdqisint8allowed` = 0), which turns u8 x s8 into u8 x u8;
  2. one attention chain per head: one encoder layer's QK -> softmax -> quantize -> PV on the export's
     shapes (heads, head_dim, 1500 frames), all heads in one chain vs one chain per head (the
     `qat.onnx_export` Q/DQ functions, random inputs), and per head with the probabilities on per-row grids
     (runs interleaved; median and min of --repeats);
  3. workers that stop spinning after a run: the engine on the clips with `session.force_spinning_stop`
     on (as shipped) and off: encoder seconds, and the decoder's first four steps and later steps.
  5. exact int8 sums (`session.x64quantprecision`, as shipped on x86 without VNNI) against ORT's u8 x s8 kernels
     (as shipped elsewhere), the same way as 3; on x86 without VNNI the first runs the int8 weights as uint8.
  4. the conv front end (quant.conv): conv1 -> GELU -> conv2 -> GELU on the export's shapes (random
     weights), as float Conv nodes vs as int8 GEMMs over the windows of the uint8 codes
     (`qat.prepare.conv_windows` on the time-major codes, as exported) and over windows cut from the
     channels-first codes (strided slices along each channel's row).
  --only NAME [...]: run only these measurements (signed_kv, attention_chain, spinning, conv_front_end,
     exact_sums).
  --against OTHER_EXPORT [...]: also the whole encoder of EXPORT and of each OTHER (e.g. the same model
     exported by another version of `qat.onnx_export`), runs interleaved on the same input, median and
     min of --repeats x 6.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CLIPS = ROOT / "data" / "real-speech" / "manifest.jsonl"


def _options(threads: int, **entries: str):
    from slim.export_format import session_options

    so = session_options(threads)
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    return so


def attention_kernels(encoder: Path, threads: int, repeats: int, **entries: str) -> dict:
    """Per encoder attention kernel (an int8 matmul whose inputs are 4-D activations): its B operand's type
    and the mean over kernels of its best time; and the best whole encoder run. ORT's profiler."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = _options(threads, **entries)
        so.enable_profiling, so.profile_file_prefix = True, str(Path(d) / "p")
        s = ort.InferenceSession(str(encoder), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
        for _ in range(repeats + 1):  # the first run warms up; minima below
            s.run(None, {"input_features": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    per_node, b_types = collections.defaultdict(list), set()
    for e in events:
        a = e.get("args", {})
        if e.get("cat") != "Node" or a.get("op_name") not in ("MatMulIntegerToFloat", "QLinearMatMul"):
            continue
        inputs = [next(iter(v.items())) for v in a.get("input_type_shape", [])]  # (type, shape) per input
        if len(inputs[0][1]) == 4:
            per_node[e["name"]].append(e["dur"])
            b_types.add(inputs[1 if a["op_name"] == "MatMulIntegerToFloat" else 3][0])
    return {"attention_kernels": len(per_node), "attention_b_types": sorted(b_types),
            "attention_ms_per_kernel": 1e-3 * float(np.mean([min(v) for v in per_node.values()])),
            "encoder_ms": 1e-3 * min(e["dur"] for e in events if e.get("name") == "model_run")}


def attention_chain(heads: int, head_dim: int, frames: int, threads: int, repeats: int) -> dict:
    """ms of one layer's quantized attention: all heads in one chain vs one chain per head (probabilities on a
    calibrated grid), and per head with the probabilities on a grid per row (`quant.row_matmuls`): as exported
    (`_RowProbsMatMul`, one integer matmul), and as a float P.V of the fake-quantized probabilities, on their
    grid from the row maximum (probabilities are >= 0) or on the general per-row grid (row minimum too)."""
    import onnxruntime as ort

    from qat.onnx_export import _FakeQuant, _Quant, _RowFakeQuant, _RowProbsMatMul

    fq = _FakeQuant.apply
    a = (torch.tensor(0.05), torch.tensor(128, dtype=torch.uint8))
    b = (torch.tensor(0.05), torch.tensor(3, dtype=torch.int8))
    bu = (torch.tensor(0.05), torch.tensor(131, dtype=torch.uint8))  # the same grid, uint8
    p = (torch.tensor(1 / 255), torch.tensor(0, dtype=torch.uint8))
    pv = {"calibrated": lambda probs, v: torch.matmul(fq(probs, *p), fq(v, *b)),
          "row": lambda probs, v: _RowProbsMatMul.apply(probs, _Quant.apply(v, *bu), *bu),
          "row_float": lambda probs, v: torch.matmul(_RowFakeQuant.apply(probs, True), fq(v, *b)),
          "row_general": lambda probs, v: torch.matmul(_RowFakeQuant.apply(probs, False), fq(v, *b))}

    def chain(q, k_t, v, grid):
        return pv[grid](torch.softmax(torch.matmul(fq(q, *a), fq(k_t, *b)), -1), v)

    class AllHeads(torch.nn.Module):
        def forward(self, q, k_t, v):
            return chain(q, k_t, v, "calibrated")

    class PerHead(torch.nn.Module):
        def __init__(self, grid):
            super().__init__()
            self.grid = grid

        def forward(self, q, k_t, v):
            return torch.cat([chain(*x, self.grid) for x in zip(*(torch.split(t, 1, 1) for t in (q, k_t, v)))], dim=1)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, heads, frames, head_dim, generator=g), torch.randn(1, heads, head_dim, frames, generator=g),
            torch.randn(1, heads, frames, head_dim, generator=g))
    feeds = {n: t.numpy() for n, t in zip("qkv", args)}
    sessions = {}
    with tempfile.TemporaryDirectory() as d:
        for name, module in (("all_heads", AllHeads()), ("per_head", PerHead("calibrated")),
                             ("per_head_row_probs", PerHead("row")),
                             ("per_head_row_probs_float_pv", PerHead("row_float")),
                             ("per_head_row_probs_general_grid_float_pv", PerHead("row_general"))):
            path = Path(d) / f"{name}.onnx"
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=list("qkv"),
                              output_names=["o"])
            sessions[name] = ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])
    # interleaved, so a slow spell of the machine falls on every variant alike; median and best
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {f"{k}_ms": {"median": 1e3 * float(np.median(v)), "min": 1e3 * min(v)} for k, v in times.items()}


def front_end(n_mels: int, d_model: int, frames: int, threads: int, repeats: int) -> dict:
    """ms of Whisper's conv front end: float convs, int8 GEMMs over windows of the time-major codes (as
    exported), and over windows cut from the channels-first codes (then transposed)."""
    import onnxruntime as ort

    from qat.onnx_export import _Dequant, _Quant
    from qat.prepare import conv_windows, window_weight

    g = torch.Generator().manual_seed(0)
    convs = [torch.nn.Conv1d(n_mels, d_model, 3, padding=1), torch.nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)]
    act = (torch.tensor(0.02), torch.tensor(100, dtype=torch.uint8))

    def channels_first(q, kernel, stride, padding, fill):  # the same windows, cut from (B, C, T) codes
        q = torch.nn.functional.pad(q.transpose(1, 2), (padding, padding), value=fill)
        n = (q.shape[2] - kernel) // stride + 1
        return torch.cat([q[:, :, j: j + stride * (n - 1) + 1: stride] for j in range(kernel)], dim=1).transpose(1, 2)

    class FrontEnd(torch.nn.Module):
        def __init__(self, windows):
            super().__init__()
            self.windows, self.convs = windows, torch.nn.ModuleList(convs)
            for i, c in enumerate(convs):
                w = window_weight(c.weight.detach())
                scale = w.abs().amax(1) / 127
                self.register_buffer(f"w{i}", torch.round(w / scale[:, None]).to(torch.int8).t().contiguous())
                self.register_buffer(f"s{i}", scale)
                self.register_buffer(f"b{i}", c.bias.detach())
            self.register_buffer("z", torch.zeros(d_model, dtype=torch.int8))

        def forward(self, x):
            if self.windows is None:
                return torch.nn.functional.gelu(self.convs[1](torch.nn.functional.gelu(self.convs[0](x)))).transpose(1, 2)
            x = x.transpose(1, 2)
            for i, c in enumerate(self.convs):
                win = self.windows(_Quant.apply(x, *act), 3, c.stride[0], 1, int(act[1]))
                w = _Dequant.apply(getattr(self, f"w{i}"), getattr(self, f"s{i}"), self.z, 1)
                x = torch.nn.functional.gelu(torch.matmul(_Dequant.apply(win, *act, 0), w) + getattr(self, f"b{i}"))
            return x

    x = torch.randn(1, n_mels, frames, generator=g)
    out = {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for name, windows in (("float_conv", None), ("int8_windows", conv_windows),
                              ("int8_channels_first_windows", channels_first)):
            path = Path(d) / f"{name}.onnx"
            torch.onnx.export(FrontEnd(windows), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})  # a dynamic batch, as exported: ORT keeps MatMul
            s = ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])
            out[f"{name}_ms"] = 1e3 * _best(lambda: s.run(None, {"x": x.numpy()}), repeats)
    return out


def _best(run, repeats: int) -> float:
    """Best seconds of `run()` over `repeats` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def encoders(exports: list[Path], threads: int, repeats: int, gap: float = 0.1) -> dict:
    """Median and min ms of whole encoder runs of each export, interleaved (one input, `gap` s idle before each)."""
    import onnxruntime as ort

    sessions = {str(e): ort.InferenceSession(str(e / "encoder.onnx"), _options(threads),
                                             providers=["CPUExecutionProvider"]) for e in exports}
    x = {"input_features": np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32) * 0.5}
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, x)
    for _ in range(6 * repeats):
        for k, s in sessions.items():
            time.sleep(gap)
            t = time.perf_counter()
            s.run(None, x)
            times[k].append(time.perf_counter() - t)
    return {k: {"median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * min(v)} for k, v in times.items()}


def engine_settings(export: Path, clips: list[np.ndarray], threads: int, repeats: int,
                    variants: dict[str, dict[str, str]]) -> dict:
    """The engine on the clips with each variant's session entries on top of `session_options`: median encoder
    seconds, decoder ms for the first four steps and for later ones, and seconds per clip end to end."""
    import onnxruntime as ort

    from slim.runtime import OnnxEngine

    engine = OnnxEngine(export, threads=threads, verify="size")
    feats = [engine.features([c]) for c in clips]
    steps: list[float] = []
    run = None

    def timed(io):
        t = time.perf_counter()
        run(io)
        steps.append(time.perf_counter() - t)

    out = {}
    for name, entries in variants.items():
        so = _options(threads, **entries)
        engine.encoder, engine.decoder = (ort.InferenceSession(str(export / f), so, providers=["CPUExecutionProvider"])
                                          for f in ("encoder.onnx", "decoder.onnx"))
        run = engine.decoder.run_with_iobinding
        engine.decoder.run_with_iobinding = timed
        enc, first, later, total = [], [], [], []
        for _ in range(repeats):
            for f in feats:
                steps.clear()
                engine.timings.reset()
                t = time.perf_counter()
                engine.generate_tokens(f)
                total.append(time.perf_counter() - t)
                enc.append(engine.timings.encoder_s)
                first += steps[:4]
                later += steps[4:]
        out[name] = {"encoder_s": float(np.median(enc)), "first_4_steps_ms": 1e3 * float(np.median(first)),
                     "later_steps_ms": 1e3 * float(np.median(later)) if later else None,
                     "s_per_clip": float(np.median(total))}
    return out


MEASUREMENTS = ("signed_kv", "attention_chain", "spinning", "conv_front_end", "exact_sums")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export", help="QDQ export directory")
    p.add_argument("--clips", default=str(DEFAULT_CLIPS), help="JSONL manifest of clips for measurements 3 and 5")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--against", nargs="+", default=[], metavar="OTHER_EXPORT",
                   help="also time the whole encoder of these exports against EXPORT's")
    p.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="run only these measurements")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the overridden session entries would each log a warning
    from slim.export_format import load_export_config
    from slim.audio import load_audio

    export = Path(args.export)
    config = load_export_config(export, verify="size")
    s = config["structure"]
    heads = max(s["encoder_heads"])
    manifest = Path(args.clips)
    clips = [load_audio(manifest.parent / json.loads(line)["audio"]) for line in manifest.read_text().splitlines()
             if line.strip()]
    runs = {
        "signed_kv": lambda: {
            "signed_kv": attention_kernels(export / "encoder.onnx", args.threads, args.repeats),
            "uint8_kv_ort_default": attention_kernels(export / "encoder.onnx", args.threads, args.repeats,
                                                      **{"session.qdqisint8allowed": "0"})},
        "attention_chain": lambda: {"attention_chain": attention_chain(
            heads, s["head_dim"], config["model"]["n_frames"] // 2, args.threads, args.repeats)},
        "spinning": lambda: {"spinning": engine_settings(export, clips, args.threads, args.repeats, {
            "stop_spinning": {"session.force_spinning_stop": "1"},
            "ort_default": {"session.force_spinning_stop": "0"}})},
        "conv_front_end": lambda: {"conv_front_end": front_end(
            config["model"]["num_mel_bins"], config["model"]["d_model"], config["model"]["n_frames"], args.threads,
            args.repeats)},
        "exact_sums": lambda: {"exact_sums": engine_settings(export, clips, args.threads, args.repeats, {
            "exact": {"session.x64quantprecision": "1"}, "u8s8_kernels": {"session.x64quantprecision": "0"}})},
    }
    r = {}
    for name in args.only or MEASUREMENTS:
        r.update(runs[name]())
    if args.against:
        r["encoders"] = encoders([export] + [Path(a) for a in args.against], args.threads, args.repeats)
    print(json.dumps(r, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
