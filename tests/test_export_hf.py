"""The Hugging Face onnx/ layout on tiny random Whispers with uneven heads (English-only and multilingual): the
names and per-layer shapes the runtimes read, the merged decoder's weights stored once, its two branches
decoding like the slim graphs, and the real runtimes (onnx-asr from PyPI, transformers.js from npm) giving the
slim engine's transcripts."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from slim.audio import load_audio
from slim.export_format import ExportDirError, int8_kernels_exact
from slim.runtime import OnnxEngine

from uneven import (CROSS_HEADS, HEAD_DIM, ROOT, SELF_HEADS, export_all, real_clips as _clips, save_uneven,
                    slim_prompt_logits, uneven_model, assert_stored_as_uint8)

NEW = 10
PLAIN = 0  # the slim engine's repetition guard off: onnx-asr and transformers.js run their own greedy loops
# The slim engine's sessions ask ONNX Runtime for exact int8 sums on x86 without VNNI (session.x64quantprecision);
# in the merged decoder's If branches that option miscomputes (ONNX Runtime 1.31), so the hf graphs run as
# transformers.js and onnx-asr run them, with the default kernels, which can saturate there (docs/runtimes.md)
exact_int8 = pytest.mark.skipif(not int8_kernels_exact(), reason="x86 without VNNI: the hf graphs' u8 x s8 kernels "
                                "sum pairs of products in 16 bits and can saturate (docs/runtimes.md)")

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model directories as the pipeline writes them: English-only float and PTQ, multilingual float."""
    from slim.ct2 import load_tokenizer, processor_for
    from slim.model import save_model
    from slim.sources import shortcut_files, tiny_random_whisper

    out = save_uneven(tmp_path_factory.mktemp("hf"))
    base_dir, _ = shortcut_files("base")
    multi = processor_for(load_tokenizer(base_dir / "tokenizer.json", multilingual=True), 80)
    out["multi"] = save_model(uneven_model(tiny_random_whisper(seed=0, vocab_size=51865)), out["root"] / "multi",
                              processor=multi)
    return out


@pytest.fixture(scope="module")
def exports(models):
    """Each model exported by the CLI in the slim and hf layouts (the mode follows the model)."""
    return export_all(models, ("float", "qdq", "multi"), ("slim", "hf"))


def _dims(v):
    return [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]


def test_hf_layout_has_the_files_names_and_per_layer_shapes(exports):
    d = exports["qdq", "hf"]
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) == [
        "added_tokens.json", "config.json", "export_config.json", "generation_config.json",
        "onnx/decoder_model_merged_quantized.onnx", "onnx/encoder_model_quantized.onnx", "preprocessor_config.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in (exports["float", "hf"] / "onnx").iterdir()) == [
        "decoder_model_merged.onnx", "encoder_model.onnx"]
    enc = onnx.load(str(d / "onnx/encoder_model_quantized.onnx"))
    assert [(i.name, _dims(i)) for i in enc.graph.input] == [("input_features", ["batch_size", 80, "feature_sequence_length"])]
    assert [(o.name, _dims(o)) for o in enc.graph.output] == [("last_hidden_state", ["batch_size", "encoder_sequence_length", 64])]
    dec = onnx.load(str(d / "onnx/decoder_model_merged_quantized.onnx"))
    names = [f"{i}.{part}.{kv}" for i in range(2) for part in ("decoder", "encoder") for kv in ("key", "value")]
    assert [i.name for i in dec.graph.input] == ["input_ids", "encoder_hidden_states"] + \
        [f"past_key_values.{n}" for n in names] + ["use_cache_branch"]
    ins = {i.name: _dims(i) for i in dec.graph.input}
    assert ins["input_ids"] == ["batch_size", "decoder_sequence_length"]
    assert ins["use_cache_branch"] == [1]
    assert dec.graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    for i in range(2):  # each layer's own head count, as a number
        assert ins[f"past_key_values.{i}.decoder.key"] == ["batch_size", SELF_HEADS[i], "past_decoder_sequence_length",
                                                           HEAD_DIM]
        assert ins[f"past_key_values.{i}.encoder.value"] == ["batch_size", CROSS_HEADS[i],
                                                             "encoder_sequence_length_out", HEAD_DIM]
    assert [o.name for o in dec.graph.output] == ["logits"] + [f"present.{n}" for n in names]
    # one If over the two branches, after the Casts that widen the fp16-stored weights
    assert dec.graph.node[-1].op_type == "If" and {n.op_type for n in dec.graph.node[:-1]} <= {"Cast"}
    assert {a.name for a in dec.graph.node[-1].attribute} == {"then_branch", "else_branch"}
    assert json.loads((d / "config.json").read_text())["model_type"] == "whisper"
    assert json.loads((d / "preprocessor_config.json").read_text())["feature_size"] == 80
    added = json.loads((d / "added_tokens.json").read_text())
    assert added["<|startoftranscript|>"] == 50257 and len(json.loads((d / "vocab.json").read_text())) == 50257


def test_merged_decoder_stores_each_weight_once(exports):
    """The two branches share one copy of every weight: no two initializers are equal, and the merged file
    is the slim decoder plus the cross-attention K/V projections (which the slim layout runs in the encoder)."""
    from onnx import numpy_helper

    for kind, name in (("float", "decoder_model_merged.onnx"), ("qdq", "decoder_model_merged_quantized.onnx")):
        m = onnx.load(str(exports[kind, "hf"] / "onnx" / name))
        # each int8 weight has its own (all-zero) zero point: qat.onnx_export._unshare_zero_points
        big = [a for a in map(numpy_helper.to_array, m.graph.initializer)
               if a.size >= 64 and not (a.dtype == np.int8 and not a.any())]
        seen = {(a.dtype.str, a.shape, a.tobytes()) for a in big}
        assert len(seen) == len(big)
        slim = (exports[kind, "slim"] / "decoder.onnx").stat().st_size
        cross_kv = sum(2 * 64 * h * HEAD_DIM for h in CROSS_HEADS) * (1 if kind == "qdq" else 4)
        assert (exports[kind, "hf"] / "onnx" / name).stat().st_size < slim + 2 * cross_kv + 200_000


def _hf_greedy(d: Path, feats: np.ndarray, prompt: list[int], eos: int, steps: int, quantized: bool):
    """The runtimes' loop on the hf graphs, in Python: the prompt with empty pasts and use_cache_branch false,
    then one token per call with the presents as pasts (the encoder's kept from the first call)."""
    import onnxruntime as ort

    q = "_quantized" if quantized else ""
    enc = ort.InferenceSession(str(d / f"onnx/encoder_model{q}.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(d / f"onnx/decoder_model_merged{q}.onnx"), providers=["CPUExecutionProvider"])
    feed = {"encoder_hidden_states": enc.run(None, {"input_features": feats})[0]}
    for i in dec.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    names = [o.name for o in dec.get_outputs()]
    ids, out, logits_seen = np.array([prompt], np.int64), [], []
    for step in range(steps):
        feed["input_ids"], feed["use_cache_branch"] = ids, np.array([step > 0])
        r = dict(zip(names, dec.run(None, feed)))
        for n, v in r.items():
            if n.startswith("present.") and (step == 0 or ".decoder." in n):
                feed[n.replace("present.", "past_key_values.")] = v
        logits_seen.append(r["logits"][0, -1])
        nxt = int(r["logits"][0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids = np.array([[nxt]], np.int64)
    return out, logits_seen


@pytest.mark.parametrize("kind", ["float", pytest.param("qdq", marks=exact_int8)])
def test_hf_graphs_decode_like_the_slim_graphs(exports, kind):
    """On the same features the merged decoder's greedy tokens are the slim engine's (both branches run), the
    suppress masks are in its logits, and in float its first logits equal the slim decoder's to rounding."""
    slim = OnnxEngine(exports[kind, "slim"], threads=1, max_repeats=PLAIN)
    d = slim.decode
    for clip in _clips(3):
        f = slim.features([load_audio(clip)])
        want = slim.generate_tokens(f, NEW)[0]
        got, logits = _hf_greedy(exports[kind, "hf"], f, d.prompt, d.eos_token_id, NEW, quantized=kind == "qdq")
        assert got == want
        assert np.isneginf(logits[0][d.begin_suppress_tokens]).all() and np.isneginf(logits[1][d.suppress_tokens]).all()
        assert np.isfinite(logits[1][d.begin_suppress_tokens[0]])  # begin suppression is for the first step only
    if kind == "float":
        ref = slim_prompt_logits(slim, f)
        finite = np.isfinite(ref)
        assert (np.isfinite(logits[0]) == finite).all()
        assert np.abs(logits[0][finite] - ref[finite]).max() < 1e-4


def test_uint8_weights_decode_like_the_slim_engine_with_default_kernels(models, exports):
    """`--uint8-weights`: no int8 weight matrix left, and the hf graphs in ORT's default sessions (what
    transformers.js and onnx-asr run), and transformers.js itself, give the slim engine's tokens and text on every
    CPU: u8 x u8 sums are exact without VNNI too (docs/runtimes.md)."""
    from eval.engines import load_engine
    from train.cli import main

    d = models["root"] / "qdq-hf-u8"
    assert main(["export", str(models["qdq"]), str(d), "--format", "hf", "--uint8-weights"]) == 0
    assert json.loads((d / "export_config.json").read_text())["uint8_weights"] is True
    for f in ("encoder_model_quantized.onnx", "decoder_model_merged_quantized.onnx"):
        assert_stored_as_uint8(exports["qdq", "hf"] / "onnx" / f, d / "onnx" / f)
    slim = OnnxEngine(exports["qdq", "slim"], threads=1, max_repeats=PLAIN)
    dec = slim.decode
    audios = [load_audio(c) for c in _clips(2)]
    for a in audios:
        f = slim.features([a])
        got, _ = _hf_greedy(d, f, dec.prompt, dec.eos_token_id, NEW, quantized=True)
        assert got == slim.generate_tokens(f, NEW)[0]
    if shutil.which("node") is not None:
        js = load_engine(d, threads=1)
        try:
            assert js.transcribe(audios) == _full_length(slim, audios)
        finally:
            js.close()


def _full_length(engine: OnnxEngine, audios):
    """The slim engine decoding to eos or the decoder's last position, as the other runtimes do."""
    steps = engine.decode.max_length - len(engine.decode.prompt)
    return [engine.decode_text([engine.generate_tokens(engine.features([a]), steps)[0]])[0] for a in audios]


def test_onnx_asr_transcribes_a_multilingual_export_like_the_slim_engine(exports):
    """onnx-asr (PyPI) on the multilingual float export: the slim engine's text, with the English prompt."""
    from eval.engines import load_engine

    slim = OnnxEngine(exports["multi", "slim"], threads=1, max_repeats=PLAIN)
    assert slim.decode.prompt == [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
    asr = load_engine(exports["multi", "hf"], engine="onnx-asr", threads=1)
    audios = [load_audio(c) for c in _clips(2)]
    assert asr.transcribe(audios) == _full_length(slim, audios)
    with pytest.raises(ValueError, match="English-only model; onnx-asr always prompts with a language token"):
        load_engine(exports["float", "hf"], engine="onnx-asr", threads=1)


JS = ROOT / "eval" / "js" / "node_modules" / "@huggingface" / "transformers"


@pytest.mark.skipif(shutil.which("node") is None, reason="no Node.js on this machine (./launch.sh test installs it)")
@pytest.mark.parametrize("kind", ["float", pytest.param("qdq", marks=exact_int8)])
def test_transformers_js_transcribes_like_the_slim_engine(exports, kind, monkeypatch):
    """transformers.js (npm, in Node; auto for an hf export) on the English-only exports: the slim engine's text.
    With Node present a missing transformers.js is a failure, not a skip: ./launch.sh test installs it."""
    from eval.engines import load_engine

    assert JS.is_dir(), f"{JS}: missing (cd eval/js && npm ci --ignore-scripts)"

    slim = OnnxEngine(exports[kind, "slim"], threads=1, max_repeats=PLAIN)
    js = load_engine(exports[kind, "hf"], threads=1)
    assert js.name == f"transformers.js-{kind}"
    audios = [load_audio(c) for c in _clips(2)]
    try:
        assert js.transcribe(audios) == _full_length(slim, audios)
        assert len(js.last_seconds) == 2 and all(s > 0 for s in js.last_seconds)
    finally:
        js.close()
    if kind == "float":  # a path relative to the caller's directory (Node runs in eval/js)
        d = exports[kind, "hf"]
        monkeypatch.chdir(d.parent)
        js = load_engine(Path(d.name), threads=1)
        try:
            assert js.transcribe(audios[:1]) == _full_length(slim, audios[:1])
        finally:
            js.close()
    if kind == "float":  # a multilingual model in German: transformers.js puts the language token in its prompt
        slim = OnnxEngine(exports["multi", "slim"], threads=1, language="de", max_repeats=PLAIN)
        js = load_engine(exports["multi", "hf"], threads=1, language="de")
        try:
            assert js.transcribe(audios) == _full_length(slim, audios)
        finally:
            js.close()


def test_wrong_engine_and_partial_hf_folders_fail_naming_the_file(exports, tmp_path, capsys):
    from eval.engines import load_engine
    from train.cli import main

    with pytest.raises(ValueError, match=r"is a hf export .* only --engine transformers.js / onnx-asr"):
        load_engine(exports["float", "hf"], engine="onnx")
    with pytest.raises(ExportDirError, match=r"export_config.json: is a 'hf' export, not 'slim'"):
        OnnxEngine(exports["float", "hf"])
    partial = tmp_path / "partial"
    shutil.copytree(exports["float", "hf"], partial)
    (partial / "onnx" / "decoder_model_merged.onnx").unlink()
    with pytest.raises(ExportDirError, match=r"partial/onnx/decoder_model_merged.onnx: missing file listed"):
        load_engine(partial, engine="onnx-asr", threads=1)
    assert main(["transcribe", str(partial), str(_clips(1)[0])]) == 1
    assert f"{partial / 'onnx' / 'decoder_model_merged.onnx'}: missing" in capsys.readouterr().err


def test_the_language_setting_reaches_every_engine_of_a_multilingual_model(models, exports, tmp_path):
    """`language` puts its token second in the prompt, in the torch engine, the slim runtime, sherpa-onnx,
    onnx-asr (and transformers.js below); an English-only model takes only en, an unknown code is refused."""
    from eval.engines import load_engine
    from qat.onnx_export import load_source_model
    from slim.export_format import DecodeConfig
    from train.cli import main

    model, _ = load_source_model(models["multi"])
    d = DecodeConfig.from_model(model)
    de = d.languages["de"]
    assert d.prompt == [50258, 50259, 50359, 50363] and de == 50261
    assert d.with_language("de").prompt == [50258, de, 50359, 50363] and d.with_language(None) == d
    with pytest.raises(ValueError, match="language 'xx' is not one of the model's 99 languages"):
        d.with_language("xx")
    english = DecodeConfig.from_model(load_source_model(models["float"])[0])
    assert english.with_language("en") == english
    with pytest.raises(ValueError, match="language 'de': this is an English-only model"):
        english.with_language("de")

    audios = [load_audio(c) for c in _clips(2)]
    slim = OnnxEngine(exports["multi", "slim"], threads=1, language="de", max_repeats=PLAIN)
    assert slim.decode.prompt == [50258, de, 50359, 50363]
    want = slim.transcribe(audios)
    assert want != OnnxEngine(exports["multi", "slim"], threads=1, max_repeats=PLAIN).transcribe(audios)  # the token matters
    assert load_engine(models["multi"], threads=1, language="de", max_repeats=PLAIN).transcribe(audios) == want  # torch
    full = _full_length(slim, audios)
    assert load_engine(exports["multi", "hf"], engine="onnx-asr", threads=1, language="de").transcribe(audios) == full
    sherpa_dir = tmp_path / "multi-sherpa"
    assert main(["export", str(models["multi"]), str(sherpa_dir), "--format", "sherpa-onnx"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(sherpa_dir / "encoder.onnx")).metadata_props}
    assert meta["is_multilingual"] == "1" and meta["all_language_codes"].split(",")[:3] == ["en", "zh", "de"]
    assert meta["all_language_tokens"].split(",")[:3] == ["50259", "50260", "50261"]
    sherpa = load_engine(sherpa_dir, threads=1, language="de")
    # led by 80 zero samples: sherpa-onnx's frames start half a hop after Whisper's (docs/runtimes.md)
    sherpa.transcribe([np.concatenate([np.zeros(80, np.float32), a]) for a in audios])
    for a, strings in zip(audios, sherpa.last_tokens):
        # its features end differently (it pads after the clip with 0.0, Whisper's own padding is (max - 4) / 4),
        # which this random model follows after a few tokens: the prompt shows in the first ones
        pieces = [slim.tokenizer.decode([t]) for t in slim.generate_tokens(slim.features([a]), 4)[0]]
        assert strings[:4] == pieces
    with pytest.raises(ValueError, match="language 'de': this is an English-only model"):
        load_engine(exports["float", "slim"], threads=1, language="de")
