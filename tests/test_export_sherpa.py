"""The sherpa-onnx layout on a tiny random Whisper with uneven heads: names, shapes and metadata as sherpa-onnx
reads them, the padded graphs equal to the slim graphs step by step, sherpa-onnx's own recognizer giving the
slim engine's transcripts, and the errors for a wrong format or a partial folder."""

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from slim.audio import load_audio
from slim.export_format import ExportDirError, session_options
from slim.runtime import OnnxEngine

from uneven import (CROSS_HEADS, HEAD_DIM, REAL_SPEECH, ROOT, SELF_HEADS, export_all, real_clips as _clips,
                    save_uneven, slim_prompt_logits, assert_stored_as_uint8)

NEW = 10
PLAIN = 0  # the slim engine's repetition guard off: sherpa-onnx runs its own greedy loop


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model directories as the pipeline writes them: the uneven float model and its PTQ (fake-quant) copy."""
    return save_uneven(tmp_path_factory.mktemp("sherpa"))


@pytest.fixture(scope="module")
def exports(models):
    """Each model exported by the CLI in both layouts (the mode follows the model: qdq for fake quant)."""
    return export_all(models, ("float", "qdq"), ("slim", "sherpa-onnx"))


def test_sherpa_layout_has_the_names_shapes_and_metadata_sherpa_reads(exports):
    d = exports["qdq", "sherpa-onnx"]
    assert sorted(p.name for p in d.iterdir()) == ["decoder.int8.onnx", "encoder.int8.onnx", "export_config.json",
                                                  "tokens.txt"]
    assert sorted(p.name for p in exports["float", "sherpa-onnx"].iterdir())[:2] == ["decoder.onnx", "encoder.onnx"]
    enc, dec = onnx.load(str(d / "encoder.int8.onnx")), onnx.load(str(d / "decoder.int8.onnx"))
    dims = lambda v: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]
    assert [(i.name, dims(i)) for i in enc.graph.input] == [("mel", ["n_audio", 80, "T"])]
    W_self, W_cross = max(SELF_HEADS) * HEAD_DIM, max(CROSS_HEADS) * HEAD_DIM
    assert [o.name for o in enc.graph.output] == ["n_layer_cross_k", "n_layer_cross_v"]
    assert [dims(o)[0] for o in enc.graph.output] == [2, 2] and [dims(o)[3] for o in enc.graph.output] == [W_cross] * 2
    assert [i.name for i in dec.graph.input] == ["tokens", "in_n_layer_self_k_cache", "in_n_layer_self_v_cache",
                                                "n_layer_cross_k", "n_layer_cross_v", "offset"]
    assert dims(dec.graph.input[1]) == [2, "n_audio", 448, W_self]
    assert [o.name for o in dec.graph.output] == ["logits", "out_n_layer_self_k_cache", "out_n_layer_self_v_cache"]
    assert dims(dec.graph.output[0]) == ["n_audio", "n_tokens", 51864]
    meta = {p.key: p.value for p in enc.metadata_props}
    assert {k: meta[k] for k in ("n_mels", "n_text_layer", "n_text_ctx", "n_text_state", "n_vocab", "sot", "eot",
                                 "blank_id", "translate", "transcribe", "is_multilingual", "no_timestamps",
                                 "no_speech", "sot_sequence")} == {
        "n_mels": "80", "n_text_layer": "2", "n_text_ctx": "448", "n_text_state": str(W_self), "n_vocab": "51864",
        "sot": "50257", "eot": "50256", "blank_id": "220", "translate": "50357", "transcribe": "50358",
        "is_multilingual": "0", "no_timestamps": "50362", "no_speech": "50361", "sot_sequence": "50257"}
    lines = (d / "tokens.txt").read_text().splitlines()
    assert len(lines) == 50256 and lines[0] == "IQ== 0" and lines[220] == f"{base64.b64encode(b' ').decode()} 220"
    config = json.loads((d / "export_config.json").read_text())["sherpa-onnx"]
    # 2 layers x 2 heads of self K/V where the model has 2 + 1; cross 2 x 3 where it has 1 + 3
    assert config["padding"]["self"]["padding_share"] == pytest.approx(1 - 3 / 4)
    assert config["padding"]["cross"]["padding_share"] == pytest.approx(1 - 4 / 6)


def _sherpa_greedy(d: Path, feats: np.ndarray, prompt: list[int], eos: int, steps: int, default_kernels=False):
    """sherpa-onnx's greedy loop (prompt at offset 0, then one token per call) on the graphs, in Python; in the
    slim engine's sessions (so the graphs are compared, not two kernel choices), or with `default_kernels` in
    ORT's default ones, as sherpa-onnx runs them."""
    import onnxruntime as ort

    cfg = json.loads((d / "export_config.json").read_text())["sherpa-onnx"]
    so = ort.SessionOptions() if default_kernels else session_options(1)
    enc = ort.InferenceSession(str(d / cfg["encoder"]), so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(d / cfg["decoder"]), so, providers=["CPUExecutionProvider"])
    ck, cv = enc.run(None, {"mel": feats})
    k = np.zeros((2, 1, 448, cfg["self_width"]), np.float32)
    v = np.zeros_like(k)
    ids, offset, out, logits_seen = np.array([prompt], np.int64), 0, [], []
    for _ in range(steps):
        logits, k, v = dec.run(None, {"tokens": ids, "in_n_layer_self_k_cache": k, "in_n_layer_self_v_cache": v,
                                      "n_layer_cross_k": ck, "n_layer_cross_v": cv,
                                      "offset": np.array([offset], np.int64)})
        offset += ids.shape[1]
        logits_seen.append(logits[0, -1])
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids = np.array([[nxt]], np.int64)
    return out, logits_seen


@pytest.mark.parametrize("kind", ["float", "qdq"])
def test_padded_sherpa_graphs_decode_like_the_slim_graphs(exports, kind):
    """The zero heads add nothing: on the same features, the sherpa graphs' greedy tokens are the slim
    engine's, and in float their logits (suppress masks included) agree to float rounding."""
    slim = OnnxEngine(exports[kind, "slim"], threads=1, max_repeats=PLAIN)
    d = slim.decode
    for clip in _clips(3):
        f = slim.features([load_audio(clip)])
        want = slim.generate_tokens(f, NEW)[0]
        got, logits = _sherpa_greedy(exports[kind, "sherpa-onnx"], f, d.prompt, d.eos_token_id, NEW)
        assert got == want
        assert np.isneginf(logits[0][d.begin_suppress_tokens]).all() and np.isneginf(logits[1][d.suppress_tokens]).all()
        assert np.isfinite(logits[1][d.begin_suppress_tokens[0]])  # begin suppression is for the first step only
    if kind == "float":  # the slim decoder's last-position logits, from its own graph
        ref = slim_prompt_logits(slim, f)
        finite = np.isfinite(ref)
        assert (np.isfinite(logits[0]) == finite).all()
        assert np.abs(logits[0][finite] - ref[finite]).max() < 1e-4


def test_uint8_weights_decode_like_the_slim_engine_with_default_kernels(models, exports):
    """`--uint8-weights`: in ORT's default sessions (what sherpa-onnx runs) the sherpa graphs give the slim
    engine's tokens on every CPU, x86 without VNNI included (u8 x u8 sums are exact there)."""
    from train.cli import main

    d = models["root"] / "qdq-sherpa-u8"
    assert main(["export", str(models["qdq"]), str(d), "--format", "sherpa-onnx", "--uint8-weights"]) == 0
    cfg = json.loads((d / "export_config.json").read_text())["sherpa-onnx"]
    for f in (cfg["encoder"], cfg["decoder"]):  # converted, so the check below cannot pass on exact kernels alone
        assert_stored_as_uint8(exports["qdq", "sherpa-onnx"] / f, d / f)
    slim = OnnxEngine(exports["qdq", "slim"], threads=1, max_repeats=PLAIN)
    for clip in _clips(3):
        f = slim.features([load_audio(clip)])
        got, _ = _sherpa_greedy(d, f, slim.decode.prompt, slim.decode.eos_token_id, NEW, default_kernels=True)
        assert got == slim.generate_tokens(f, NEW)[0]


def test_sherpa_onnx_recognizer_transcribes_like_the_slim_engine(exports):
    """sherpa-onnx itself (the PyPI package) on the float export: the slim engine's text on every clip."""
    from eval.engines import load_engine

    slim = OnnxEngine(exports["float", "slim"], threads=1, max_repeats=PLAIN)
    sherpa = load_engine(exports["float", "sherpa-onnx"], threads=1)  # auto: the layout's runtime
    assert sherpa.name == "sherpa-onnx-float"
    clips = _clips()
    audios = [load_audio(c) for c in clips]
    texts = sherpa.transcribe(audios, batch_size=len(audios))
    compared = 0
    for a, text, strings in zip(audios, texts, sherpa.last_tokens):
        tokens = slim.generate_tokens(slim.features([a]))[0]  # to eos or the decoder's end, as sherpa decodes
        pieces = [slim.tokenizer.decode([t]) for t in tokens]
        # sherpa stops one position before n_text_ctx, and neither may reach eos: the shorter is a prefix
        n = min(len(strings), len(pieces))
        assert n > 0 and strings[:n] == pieces[:n]
        if len(strings) == len(pieces):
            assert text == slim.decode_text([tokens])[0]
        compared += n
    assert compared > 2 * len(clips)


class _RecordingRecognizer:
    """sherpa-onnx's recognizer with every waveform its streams accept recorded."""

    def __init__(self, real):
        self.real, self.waveforms = real, []

    def create_stream(self):
        stream, outer = self.real.create_stream(), self

        class Stream:
            result = property(lambda _: stream.result)

            def accept_waveform(self, rate, samples):
                outer.waveforms.append(np.array(samples, copy=True))
                stream.accept_waveform(rate, samples)

            real = stream
        return Stream()

    def decode_streams(self, streams):
        self.real.decode_streams([s.real for s in streams])


def test_sherpa_engine_leads_each_clip_onto_whispers_frame_grid(exports):
    """The engine hands sherpa-onnx each clip behind GRID_LEAD zero samples (half of Whisper's hop), and
    `lead_samples=0` hands it the clip as it is."""
    from eval.runtimes import GRID_LEAD, SherpaOnnxEngine

    assert GRID_LEAD == 80  # 5 ms at 16 kHz
    d = exports["qdq", "sherpa-onnx"]
    audios = [load_audio(c) for c in _clips()[:3]]
    for lead in (GRID_LEAD, 0):
        engine = SherpaOnnxEngine(d, threads=1, lead_samples=lead)
        engine.recognizer = rec = _RecordingRecognizer(engine.recognizer)
        texts = engine.transcribe(audios)
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts) and len(engine.last_tokens) == 3
        assert len(rec.waveforms) == len(audios)  # one stream per clip, each recorded
        for got, a in zip(rec.waveforms, audios):
            assert len(got) == len(a) + lead
            assert not got[:lead].any() and np.array_equal(got[lead:], np.asarray(a, np.float32))


def test_eval_runs_a_sherpa_export_in_sherpa_onnx(exports):
    from eval.run import evaluate_model

    d = exports["qdq", "sherpa-onnx"]
    r = evaluate_model(d, REAL_SPEECH / "manifest.jsonl", limit=2, threads=1, progress=False)
    assert r["engine"] == "sherpa-onnx-qdq" and r["utterances"] == 2
    assert r["model_bytes"] == sum(p.stat().st_size for p in d.iterdir() if p.name != "export_config.json")


def test_wrong_format_and_partial_folders_fail_naming_the_file(models, exports, tmp_path, capsys):
    from eval.engines import load_engine
    from train.cli import main
    from train.recipe import ConfigError, load_recipe

    with pytest.raises(SystemExit):
        main(["export", str(models["float"]), str(tmp_path / "x"), "--format", "onnx-asr"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match=r"export_format: 'bogus' is not one of \['slim', 'sherpa-onnx', 'hf'\]"):
        load_recipe(ROOT / "recipes" / "smoke.yaml", ["stages.export.export_format=bogus"])
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 1
    assert f"{tmp_path / 'nothing' / 'config.json'}: missing" in capsys.readouterr().err

    partial = tmp_path / "partial"
    shutil.copytree(exports["qdq", "sherpa-onnx"], partial)
    (partial / "tokens.txt").unlink()
    with pytest.raises(ExportDirError, match=r"partial/tokens.txt: missing file listed in export_config.json"):
        load_engine(partial, threads=1)
    wav = str(_clips(1)[0])
    assert main(["transcribe", str(partial), wav]) == 1
    assert f"{partial / 'tokens.txt'}: missing" in capsys.readouterr().err
    (partial / "tokens.txt").write_text("")  # present, but not the file the export wrote
    assert main(["transcribe", str(partial), wav]) == 1
    assert f"{partial / 'tokens.txt'}: has 0 bytes" in capsys.readouterr().err
    with pytest.raises(ExportDirError, match=r"export_config.json: is a 'sherpa-onnx' export, not 'slim'"):
        OnnxEngine(exports["qdq", "sherpa-onnx"])
    with pytest.raises(ValueError, match=r"is a sherpa-onnx export .* only --engine sherpa-onnx"):
        load_engine(exports["qdq", "sherpa-onnx"], engine="onnx")


def test_sherpa_encoder_turns_its_zero_padding_into_whispers(exports):
    """sherpa-onnx pads a clip's normalized log-mel with frames of 0.0; the encoder graph gives those frames
    the value Whisper's own padding (silence) has, the clip's max - 2, so both paddings encode alike."""
    import onnxruntime as ort

    slim = OnnxEngine(exports["float", "slim"], threads=1, max_repeats=PLAIN)
    whisper = slim.features([load_audio(_clips(1)[0])])  # (1, 80, 3000), the clip then Whisper's padding
    n = int(np.argmax((whisper[0] == whisper[0].max() - 2).all(axis=0)))  # the first padded frame
    assert 0 < n < 3000 and np.allclose(whisper[0, :, n:], whisper.max() - 2)
    sherpa = whisper.copy()
    sherpa[:, :, n:] = 0.0
    enc = ort.InferenceSession(str(exports["float", "sherpa-onnx"] / "encoder.onnx"), providers=["CPUExecutionProvider"])
    k_whisper, v_whisper = enc.run(None, {"mel": whisper})
    k_sherpa, v_sherpa = enc.run(None, {"mel": sherpa})
    assert np.array_equal(k_whisper, k_sherpa) and np.array_equal(v_whisper, v_sherpa)
