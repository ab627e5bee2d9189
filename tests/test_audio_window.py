"""Audio windows: the encoder on fewer than 3000 frames, the window rule, the engines that pick the window per
batch, every ONNX layout on a short window, and the audio-context stage killed and resumed bit for bit,
then QAT and the export on the same windows."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipeline import SMOKE, _run, _run_killed, _stages_override  # noqa: E402
from test_train_loop import assert_same_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WINDOW = {"margin_s": 1.0, "frame_multiple": 16}


def _model(window=None):
    from slim.model import install_explicit_attention, set_audio_window
    from slim.sources import tiny_random_whisper

    m = install_explicit_attention(tiny_random_whisper(seed=0)).eval()
    set_audio_window(m, window)
    return m


def _features(frames=3000, batch=1, seed=0):
    return torch.randn(batch, 80, frames, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the rule and the model


@pytest.mark.parametrize("audio_frames, want", [
    (1, 2 * 112),       # 1 s + 1 s margin = 100 encoder frames -> 112 (a multiple of 16)
    (230, 2 * 208),     # 2.3 s -> ceil 3 s + 1 s = 200 -> 208
    (300, 2 * 208),     # exactly 3 s stays 3 s
    (2850, 3000),       # 28.5 s -> 30 s: the full window
    (3000, 3000),
])
def test_window_rule(audio_frames, want):
    from slim.window import window_frames

    assert window_frames(WINDOW, audio_frames, 3000) == want
    assert window_frames(None, audio_frames, 3000) == 3000


def test_window_rule_goes_to_30_s_past_max_s():
    from slim.window import SILENCE_WINDOW, window_frames

    capped = {**WINDOW, "max_s": 10}
    assert window_frames(capped, 800, 3000) == 2 * 464  # 8 s + 1 s = 450 frames -> 464: under 10 s
    assert window_frames(capped, 950, 3000) == 3000  # 10 s + 1 s: past 10 s, the full window
    assert window_frames(SILENCE_WINDOW, 850, 3000) == 2 * 480  # 9 s + 0.5 s = 475 -> 480
    assert window_frames(SILENCE_WINDOW, 950, 3000) == 3000


@pytest.mark.parametrize("window, key", [({"margin_s": -1, "frame_multiple": 16}, "margin_s"),
                                         ({"margin_s": 1, "frame_multiple": 0}, "frame_multiple"),
                                         ({"margin_s": 1, "frame_multiple": 1.5}, "frame_multiple"),
                                         ({"margin_s": 1, "frame_multiple": 16, "pad": 2}, "pad"),
                                         ({"margin_s": 1, "frame_multiple": 16, "context": "noise"}, "context"),
                                         ({"margin_s": 1, "frame_multiple": 16, "max_s": 0}, "max_s")])
def test_bad_window_is_named(window, key):
    from slim.window import check_audio_window

    with pytest.raises(ValueError, match=key):
        check_audio_window(window)


def test_window_features_are_the_first_frames_of_the_30_s_features():
    from slim.mel import LogMel
    from slim.sources import tiny_random_processor

    clip = np.random.RandomState(0).randn(int(16000 * 2.5)).astype(np.float32) * 0.1
    full = LogMel()([clip])
    assert np.array_equal(LogMel()([clip], 416), full[..., :416])  # numpy: bit for bit
    fe = tiny_random_processor().feature_extractor  # transformers, with max_length the window
    hf = fe([clip], sampling_rate=16000, return_tensors="np").input_features
    short = fe([clip], sampling_rate=16000, return_tensors="np", max_length=416 * 160).input_features
    np.testing.assert_allclose(short, hf[..., :416], atol=1e-6)


def test_full_window_is_hf_encoder_exactly_and_a_short_one_encodes_only_its_frames():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    m = _model()
    x = _features()
    with torch.no_grad():
        ours = m.model.encoder(x).last_hidden_state
        hf = WhisperEncoder.forward(m.model.encoder, x).last_hidden_state
        short = m.model.encoder(x[..., :416]).last_hidden_state
    assert torch.equal(ours, hf)  # same computation, bit for bit
    assert short.shape == (1, 208, 64)
    with pytest.raises(ValueError, match="even number of mel frames up to 3000"):
        m.model.encoder(x[..., :415])


def test_window_round_trips_through_save_load_and_structure(tmp_path):
    from slim.model import audio_window_of, load_model, read_structure, save_model

    save_model(_model(), tmp_path / "plain")
    assert read_structure(tmp_path / "plain") is None  # a dense model without a window stays a plain HF dir
    save_model(_model(WINDOW), tmp_path / "win")
    assert read_structure(tmp_path / "win").audio_window == WINDOW
    assert audio_window_of(load_model(tmp_path / "win")) == WINDOW
    assert audio_window_of(copy.deepcopy(load_model(tmp_path / "win"))) == WINDOW


def test_training_inputs_trim_the_student_and_compare_it_on_the_teachers_first_frames():
    from slim.model import model_inputs
    from train.loop import forward, hidden_states_loss

    student, teacher = _model(WINDOW), _model()
    batch = {"input_features": _features(batch=2), "labels": torch.tensor([[50362, 400, 50256]] * 2),
             "audio_frames": torch.tensor([120, 230])}
    assert model_inputs(batch, model=student)["input_features"].shape == (2, 80, 416)  # the longest clip's
    assert model_inputs(batch, model=teacher)["input_features"].shape == (2, 80, 3000)
    dec = torch.tensor([[50257, 50362, 400]] * 2)
    with torch.no_grad():
        s, t = forward(student, batch, dec, hidden=True), forward(teacher, batch, dec, hidden=True)
    assert s.encoder_hidden_states[-1].shape[1] == 208 and t.encoder_hidden_states[-1].shape[1] == 1500
    assert torch.isfinite(hidden_states_loss(s, t, batch["labels"]))
    # a student on the full window against itself: zero
    with torch.no_grad():
        t2 = forward(copy.deepcopy(teacher), batch, dec, hidden=True)
    assert float(hidden_states_loss(t2, t, batch["labels"])) == 0.0


def test_qat_calibrates_on_the_window_and_the_int8_model_runs_it():
    from qat.convert import convert_to_int8
    from qat.prepare import QuantConfig, ptq

    m = _model(WINDOW)
    shapes = _Shapes(m.model.encoder)
    batch = {"input_features": _features(batch=2), "labels": torch.tensor([[50362, 400, 50256]] * 2),
             "audio_frames": torch.tensor([120, 230])}
    fq = ptq(m, QuantConfig(embeddings=True), [batch])
    assert shapes.seen == [416]  # the observers saw the window's frames, not 30 s of padding
    int8 = convert_to_int8(fq)
    x = _features()[..., :416]
    with torch.no_grad():
        a, b = fq.model.encoder(x).last_hidden_state, int8.model.encoder(x).last_hidden_state
    assert a.shape == b.shape == (1, 208, 64)
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


# ---------------------------------------------------------------------------------------------
# engines and exports


class _Shapes:
    """Records the frame count of every encoder call."""

    def __init__(self, module):
        self.seen = []
        module.register_forward_pre_hook(lambda mod, args, kw: self.seen.append(
            (args[0] if args else kw["input_features"]).shape[-1]), with_kwargs=True)


def test_torch_engine_encodes_each_batchs_window():
    from eval.engines import TorchEngine
    from slim.sources import tiny_random_processor

    clips = [np.zeros(16000 * 2, np.float32), np.zeros(int(16000 * 4.5), np.float32), np.zeros(16000, np.float32)]
    for window, want in ((None, [3000, 3000]), (WINDOW, [2 * 304, 2 * 112])):  # 5 s + 1 s = 300 -> 304
        m = _model(window)
        shapes = _Shapes(m.model.encoder)
        TorchEngine(m, tiny_random_processor(), max_new_tokens=2).transcribe(clips, batch_size=2)
        assert shapes.seen == want


def test_torch_engine_on_a_window_decodes_what_the_window_encodes():
    from eval.engines import TorchEngine
    from eval.onnx_engine import torch_greedy_tokens
    from slim.export_format import DecodeConfig
    from slim.sources import tiny_random_processor

    m, processor = _model(WINDOW), tiny_random_processor()
    clip = np.random.RandomState(0).randn(int(16000 * 2.5)).astype(np.float32) * 0.1
    engine = TorchEngine(m, processor, max_new_tokens=6)
    feats = processor.feature_extractor([clip], sampling_rate=16000, return_tensors="np").input_features[..., :416]
    want = torch_greedy_tokens(m, feats, DecodeConfig.from_model(m), 6)
    assert engine.transcribe([clip]) == [processor.tokenizer.decode(want[0], skip_special_tokens=True).strip()]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from qat.onnx_export import export_model
    from slim.model import save_model
    from slim.sources import tiny_random_processor

    root = tmp_path_factory.mktemp("window-exports")
    model = _model(WINDOW)
    save_model(model, root / "model", processor=tiny_random_processor())
    out = {"model": model}
    for layout in ("slim", "hf", "sherpa-onnx"):
        out[layout] = export_model(root / "model", root / layout, mode="float", layout=layout)
    return out


def test_every_layout_takes_a_short_window(exports):
    import onnxruntime as ort

    x = _features()[..., :416].numpy()
    with torch.no_grad():
        want = exports["model"].model.encoder(torch.from_numpy(x)).last_hidden_state.numpy()
    sess = ort.InferenceSession(str(exports["slim"] / "encoder.onnx"))
    slim = sess.run(None, {"input_features": x})
    assert slim[0].shape == (1, 208, 64)
    for o, meta in zip(slim[1:], sess.get_outputs()[1:]):  # keys (B, H, D, F), values (B, H, F, D)
        assert o.shape[3 if "key" in meta.name else 2] == 208, meta.name
    np.testing.assert_allclose(slim[0], want, atol=1e-4)
    hf = ort.InferenceSession(str(exports["hf"] / "onnx" / "encoder_model.onnx")).run(None, {"input_features": x})
    np.testing.assert_allclose(hf[0], want, atol=1e-4)
    k, v = ort.InferenceSession(str(exports["sherpa-onnx"] / "encoder.onnx")).run(None, {"mel": x})
    assert k.shape[2] == v.shape[2] == 208  # (layers, batch, frames, width)
    config = json.loads((exports["slim"] / "export_config.json").read_text())
    assert config["structure"]["audio_window"] == WINDOW


def test_slim_runtime_uses_the_exports_window_and_matches_torch(exports):
    from eval.onnx_engine import torch_greedy_tokens
    from slim.runtime import OnnxEngine

    engine = OnnxEngine(exports["slim"])
    assert engine.audio_window == WINDOW
    assert OnnxEngine(exports["slim"], audio_window=None).audio_window is None
    seen = []
    encode = engine.encode
    engine.encode = lambda f: (seen.append(f.shape[-1]), encode(f))[1]
    clip = np.random.RandomState(0).randn(int(16000 * 2.5)).astype(np.float32) * 0.1
    engine.transcribe([clip], max_new_tokens=6)
    assert seen == [2 * 208]
    feats = engine.features([clip])[..., :416]
    assert engine.generate_tokens(feats, 6) == torch_greedy_tokens(exports["model"], feats, engine.decode, 6)


# ---------------------------------------------------------------------------------------------
# silence windows: an unchanged model reads a silent input's states beyond its window

SILENCE = {"margin_s": 0.5, "frame_multiple": 16, "context": "silence"}


def _clip_features(level: float, batch: int = 1, speech: int = 300, seed: int = 0) -> torch.Tensor:
    """Features of a clip: `speech` frames above the floor, then its padding at `level` (the floor)."""
    x = torch.full((batch, 80, 3000), level)
    g = torch.Generator().manual_seed(seed)
    x[..., :speech] = level + 0.5 + torch.rand(batch, 80, speech, generator=g)
    return x


class _LayerFrames:
    """The frame count every encoder layer runs on."""

    def __init__(self, encoder):
        self.seen = []
        for layer in encoder.layers:
            layer.register_forward_pre_hook(lambda mod, args: self.seen.append(args[0].shape[1]))


def test_silence_window_runs_the_layers_on_its_frames_and_reads_the_silent_rest():
    from slim.window import silence_level

    m, plain = _model(SILENCE), _model()
    enc = m.model.encoder
    x = _clip_features(-0.5)
    with torch.no_grad():
        kv, rest = enc.silence_states(-0.5, torch.float32, torch.device("cpu"))  # made before counting
        frames = _LayerFrames(enc)
        short = enc(x[..., :416]).last_hidden_state
        full = enc(x).last_hidden_state
        want = plain.model.encoder(x).last_hidden_state
    assert frames.seen == [208] * 2 + [1500] * 2  # the window's frames, then a 30 s input the usual way
    assert short.shape == (1, 1500, 64)
    assert torch.equal(short[:, 208:], enc.layer_norm(rest[:, 208:]))  # from the window on: the silent input's
    assert torch.equal(full, want)  # 30 s of features: the plain computation, bit for bit
    # the window's own frames see the silent rest where the 30 s encoder sees this clip's padding: close
    assert float((short[:, :208] - want[:, :208]).abs().max()) < 0.05 * float(want.abs().max())
    assert [silence_level(v) for v in (-1.2, -0.8, -0.6, -0.2)] == [-1.0, -0.75, -0.5, -0.5]


def test_silence_window_reads_each_clips_own_level_in_a_batch():
    m = _model(SILENCE)
    x = torch.cat([_clip_features(-1.0, seed=1), _clip_features(-0.5, seed=2)])[..., :416]
    with torch.no_grad():
        both = m.model.encoder(x).last_hidden_state
        one = [m.model.encoder(x[i:i + 1]).last_hidden_state for i in range(2)]
        _, rest = m.model.encoder.silence_states(-1.0, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(both, torch.cat(one), atol=1e-5, rtol=1e-5)
    assert torch.equal(both[0, 208:], m.model.encoder.layer_norm(rest[0, 208:]))


def test_silence_window_survives_ptq_and_int8_conversion():
    from qat.convert import convert_to_int8
    from qat.prepare import QuantConfig, ptq

    m = _model(SILENCE)
    batch = {"input_features": _clip_features(-0.5, batch=2), "labels": torch.tensor([[50362, 400, 50256]] * 2)}
    fq = ptq(m, QuantConfig(embeddings=True, row_matmuls=["*.pv"]), [batch])
    int8 = convert_to_int8(fq)
    x = _clip_features(-0.5)[..., :416]
    with torch.no_grad():
        a, b = fq.model.encoder(x).last_hidden_state, int8.model.encoder(x).last_hidden_state
    assert a.shape == b.shape == (1, 1500, 64)
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


@pytest.fixture(scope="module")
def silence_exports(tmp_path_factory):
    from qat.onnx_export import export_model
    from qat.prepare import QuantConfig, ptq
    from slim.model import audio_window_of, save_model
    from slim.sources import tiny_random_processor

    root = tmp_path_factory.mktemp("silence-exports")
    model = _model()
    save_model(model, root / "model", processor=tiny_random_processor())
    batch = {"input_features": _clip_features(-0.5, batch=2), "labels": torch.tensor([[50362, 400, 50256]] * 2)}
    fq = ptq(_model(), QuantConfig(embeddings=True, row_matmuls=["*.pv"]), [batch])
    out = {"model": _model(SILENCE), "fq": fq, "root": root}
    for name, src, mode in (("float", root / "model", "float"), ("qdq", fq, "qdq")):
        out[name] = export_model(src, root / name, mode=mode, audio_window=SILENCE)
        out[f"{name}-30s"] = export_model(src, root / f"{name}-30s", mode=mode)
    assert audio_window_of(fq) is None  # the caller's model is left as it was
    return out


@pytest.mark.parametrize("mode", ["float", "qdq"])
def test_silence_export_on_30_s_is_the_plain_export(silence_exports, mode):
    import onnxruntime as ort

    from slim.export_format import cpu_has_vnni, session_options
    from slim.runtime import OnnxEngine

    engine = OnnxEngine(silence_exports[mode])
    assert engine.audio_window == SILENCE
    types = {i.name: i.type for i in engine.encoder.get_inputs()}
    want = {"float": "tensor(float)", "qdq": "tensor(int8)"}[mode]
    assert [types[n] for n in engine.context_names if "key" in n] == [want] * 2  # keys on the int8 grid
    x = _clip_features(-0.5).numpy()
    # the engine's session options on both sides: without VNNI they pick exact int8 kernels, ORT's default does not
    plain = ort.InferenceSession(str(silence_exports[f"{mode}-30s"] / "encoder.onnx"), session_options(),
                                 providers=["CPUExecutionProvider"]).run(None, {"input_features": x})
    ours = [o.numpy() for o in engine._run_encoder(x, [], ["encoder_hidden_states"] + engine.cross_names)]
    # with VNNI both graphs give the same bits; without it the exact u8 x u8 kernels still round a few sums
    # differently in the two graphs (up to 1.2e-4 seen; with ORT's default kernels, which can saturate, 0.05)
    atol = 0.0 if mode == "float" or cpu_has_vnni() else 1e-3
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_slim_runtime_on_a_silence_window_matches_torch(silence_exports):
    from eval.onnx_engine import torch_greedy_tokens
    from slim.runtime import OnnxEngine
    from slim.window import silence_level

    engine = OnnxEngine(silence_exports["float"])
    seen = []
    run = engine._run_encoder
    engine._run_encoder = lambda f, c, o: (seen.append(f.shape[-1]), run(f, c, o))[1]
    loud = np.random.RandomState(0).randn(int(16000 * 2.5)).astype(np.float32) * 0.5
    quiet = np.random.RandomState(1).randn(int(16000 * 1.5)).astype(np.float32) * 0.005
    engine.transcribe([loud, quiet], batch_size=2, max_new_tokens=6)
    assert seen == [2 * 176]  # ceil(2.5 s) + 0.5 s = 175 encoder frames -> 176 (the silent inputs ran at load)
    feats = engine.features([loud, quiet], 2 * 176)
    assert len({silence_level(float(f.min())) for f in feats}) == 2  # two clips that read two silent inputs
    cross = [c.numpy() for c in engine.encode(feats)]
    model = silence_exports["model"]
    with torch.no_grad():
        h = model.model.encoder(torch.from_numpy(feats)).last_hidden_state
    layer = model.model.decoder.layers[0].encoder_attn
    np.testing.assert_allclose(cross[0], layer.k_proj(h).detach().reshape(2, 1500, layer.num_heads, -1)
                               .permute(0, 2, 3, 1).numpy(), atol=1e-4)
    assert engine.generate_tokens(feats, 6) == torch_greedy_tokens(model, feats, engine.decode, 6)


def test_slim_runtime_on_a_silence_window_matches_torch_with_a_zero_head_layer(tmp_path):
    """A pruned model whose second encoder layer has no heads left decodes a two-level batch on the window as
    its torch model does."""
    from eval.onnx_engine import torch_greedy_tokens
    from qat.onnx_export import export_model
    from slim.model import Structure, build_model, install_explicit_attention, set_audio_window
    from slim.runtime import OnnxEngine

    config = _model().config
    s = Structure.dense(config)
    s.encoder_heads = [3, 0]
    torch.manual_seed(3)
    model = install_explicit_attention(build_model(config, s)).eval()
    engine = OnnxEngine(export_model(model, tmp_path / "pruned", mode="float", audio_window=SILENCE))
    set_audio_window(model, SILENCE)
    feats = torch.cat([_clip_features(-1.0, seed=1), _clip_features(-0.5, seed=2)])[..., :352].numpy()
    assert engine.generate_tokens(feats, 6) == torch_greedy_tokens(model, feats, engine.decode, 6)


def test_slim_runtime_on_a_silence_window_matches_torch_int8(tmp_path):
    """The QDQ export (context as int8 codes) encodes a two-level batch on the window as its fake-quant model
    does, within the int8 grids."""
    from qat.onnx_export import export_model
    from qat.prepare import QuantConfig, ptq
    from slim.model import set_audio_window
    from slim.runtime import OnnxEngine

    batch = {"input_features": _clip_features(-0.5, batch=2), "labels": torch.tensor([[50362, 400, 50256]] * 2)}
    model = ptq(_model(), QuantConfig(embeddings=True, row_matmuls=["*.pv"]), [batch])
    engine = OnnxEngine(export_model(model, tmp_path / "qdq", mode="qdq", audio_window=SILENCE))
    set_audio_window(model, SILENCE)
    feats = torch.cat([_clip_features(-1.0, seed=1), _clip_features(-0.5, seed=2)])[..., :352].numpy()
    calls = []
    run = engine._run_encoder
    engine._run_encoder = lambda f, c, o: (calls.append(c), run(f, c, o))[1]
    engine.encode(feats)
    assert [a.dtype for a in calls[0]] == [np.int8, np.uint8] * 2  # keys int8, per-row P.V's values uint8
    ours = run(feats, calls[0], ["encoder_hidden_states"])[0].numpy()
    with torch.no_grad():
        want = model.model.encoder(torch.from_numpy(feats)).last_hidden_state[:, :176].numpy()
    assert ours.shape == want.shape == (2, 176, 64)
    assert float(np.abs(ours - want).max()) < 0.01 * float(np.abs(want).max())


def test_silence_window_hidden_states_do_not_depend_on_the_cache():
    m = _model(SILENCE)
    x = _clip_features(-0.5)[..., :416]
    with torch.no_grad():
        cold = m.model.encoder(x, output_hidden_states=True).hidden_states
        warm = m.model.encoder(x, output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in cold] == [h.shape[1] for h in warm]
    assert cold[0].shape[1] == 208  # the clip's window, not the silent input's 1500 frames
    assert all(torch.equal(a, b) for a, b in zip(cold, warm))
    m.model.encoder.forget_silence()
    assert "_silence" not in m.model.encoder.__dict__


def test_export_sets_only_a_silence_window(silence_exports, tmp_path):
    from qat.onnx_export import export_model
    from slim.window import SILENCE_WINDOW
    from train.cli import _export

    assert _export([str(silence_exports["root"] / "model"), str(tmp_path / "cli"), "--silence-window"]) == 0
    config = json.loads((tmp_path / "cli" / "export_config.json").read_text())
    assert config["structure"]["audio_window"] == SILENCE_WINDOW
    assert config["io"]["names"]["context"] == ["context_key_0", "context_value_0", "context_key_1", "context_value_1"]

    with pytest.raises(ValueError, match="context 'silence'"):
        export_model(silence_exports["fq"], tmp_path / "x", mode="qdq", audio_window=WINDOW)
    with pytest.raises(ValueError, match="already has one"):
        export_model(_model(WINDOW), tmp_path / "y", mode="float", audio_window=SILENCE)


# ---------------------------------------------------------------------------------------------
# the stage: killed and resumed bit for bit, then QAT and the export on the same windows


def _window_stages() -> list[dict]:
    return [
        {"name": "audio-context", "kind": "audio-context", "teacher": "input", "evaluate": False,
         "audio_window": WINDOW,
         "train": {"max_steps": 4, "batch_size": 2, "lr": 1.0e-4, "save_every": 2, "keep_last": 2, "log_every": 1,
                   "distill": {"ce_weight": 0.0, "kl_weight": 1.0, "hidden_weight": 1.0}}},
        {"name": "qat", "kind": "qat", "teacher": "input", "evaluate": False,
         "quant": {"observer": "moving_average", "calibration_batches": 2, "freeze_observers_after": 1},
         "train": {"max_steps": 2, "batch_size": 2, "lr": 1.0e-5, "save_every": 2, "log_every": 1}},
        {"name": "export", "kind": "export", "export_mode": "qdq", "evaluate": False},
    ]


def _cmd(out: Path, synth: Path, resume=False) -> list[str]:
    return [sys.executable, "-m", "train.cli", "run", str(SMOKE), f"output_dir={out}", f"data.synth.out={synth}",
            _stages_override(_window_stages())] + (["--resume"] if resume else [])


def test_audio_context_stage_resumes_bit_exactly_and_qat_and_export_keep_the_window(tmp_path_factory):
    from safetensors.torch import load_file

    from slim.model import read_structure

    synth = tmp_path_factory.mktemp("synth-window") / "smoke"
    ref, out = tmp_path_factory.mktemp("window-ref") / "run", tmp_path_factory.mktemp("window-killed") / "run"
    assert _run(_cmd(ref, synth), ref.parent / "log.txt") == 0, (ref.parent / "log.txt").read_text()[-3000:]
    _run_killed(_cmd(out, synth), out, "audio-context:2", out.parent / "log1.txt")
    assert _run(_cmd(out, synth, resume=True), out.parent / "log2.txt") == 0, (out.parent / "log2.txt").read_text()[-3000:]

    steps = [json.loads(l)["step"] for l in (out / "01-audio-context" / "metrics.jsonl").read_text().splitlines()
             if l.strip() and "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4]  # 1-2 before the kill, 3-4 after the resume, none twice
    for stage in ("01-audio-context", "02-qat"):
        a = load_file(ref / stage / "model" / "model.safetensors")
        b = load_file(out / stage / "model" / "model.safetensors")
        assert_same_weights(a, b)
    assert read_structure(out / "01-audio-context" / "model").audio_window == WINDOW
    assert read_structure(out / "02-qat" / "model").audio_window == WINDOW
    config = json.loads((out / "03-export" / "model" / "export_config.json").read_text())
    assert config["structure"]["audio_window"] == WINDOW
    # the stage trained on short windows: its hidden-state loss is not the zero of an unchanged model
    first = json.loads((out / "01-audio-context" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["hidden"] > 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["audio_window"] == {**WINDOW, "context": None, "max_s": None}
