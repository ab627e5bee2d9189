"""Engines: one small interface over every way this project runs a model, and `load_engine` to pick one.

    engine               what runs                                         model_bytes counts
    torch                the float model (explicit attention), or the      the directory's shipped files:
                         fake-quant / true-INT8 model when                 *.safetensors, configs, tokenizer,
                         slim_structure.json has quant settings            feature extractor
    torch-dynamic-int8   PyTorch `quantize_dynamic` on every nn.Linear     a safetensors serialization of the
                         of the float model (post-training baseline)       quantized state (see below) + configs
    onnx                 ONNX Runtime on an export dir (`qat.onnx_export`)  the files export_config.json lists
    onnx-dynamic-int8    ORT dynamic INT8 of the float export, exported     the same, of the cached export
                         once into a cache dir beside the model

Every engine decodes greedily with the model's generation config (English, no timestamps) and
transcribes `batch_size` clips per call (1 by default, as latency is reported).

Each call generates at most `slim.decoding.token_budget(clips)` tokens (see there).

Why model_bytes of torch-dynamic-int8 is computed rather than read off a file: PyTorch has no
deployment format for dynamically quantized modules except pickle, which this project never writes.
So we count what a safetensors file holding the same state would take, built and measured in memory:
each quantized Linear as its int8 weight + fp32 scale(s) + int32 zero point(s) + fp32 bias, every other
tensor (embeddings, LayerNorms, convs, the positional table) as stored, tied tensors once. Note that
`quantize_dynamic` also turns the tied output projection into an int8 copy while the token embedding
stays fp32, so this baseline ships the vocabulary matrix twice (once int8, once fp32).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slim.decoding import token_budget
from slim.audio import SAMPLING_RATE
from slim.export_format import CONFIG_FILE as EXPORT_CONFIG
from slim.export_format import DecodeConfig, export_layout
from slim.io import atomic_write_json

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "torch-dynamic-int8", "onnx", "onnx-dynamic-int8", "sherpa-onnx", "transformers.js",
           "onnx-asr")
# the engines that run each export layout; `auto` picks the first
LAYOUT_ENGINES = {"slim": ("onnx",), "sherpa-onnx": ("sherpa-onnx",), "hf": ("transformers.js", "onnx-asr")}
# What a deployment of a model directory ships besides *.safetensors (training leftovers such as the
# resolved recipe, logs or checkpoints do not count).
SHIPPED_FILES = {
    "config.json", "generation_config.json", "slim_structure.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "normalizer.json", "processor_config.json", "preprocessor_config.json",
}
CACHE_SOURCE_FILE = "eval_source.json"


class _BudgetOverridesMaxLength(logging.Filter):
    """transformers warns on every generate call that a per-call max_new_tokens (our token budget)
    overrides the checkpoint's max_length (448); that is the intent, so that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_new_tokens` will take precedence" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_BudgetOverridesMaxLength())


class RepeatGuard:
    """The repetition guard (`slim.decoding.repeat_bans`) as a transformers logits processor, so generate
    decodes under the same rule as the ONNX runtime. One per generate call: the first call's length is the
    prompt's, and only the tokens after it count."""

    def __init__(self, max_repeats: int):
        self.max_repeats, self.prompt_len = max_repeats, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from slim.runtime import ban_repeats

        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        scores = scores.clone()  # generate's processors return new scores, never edit theirs in place
        ban_repeats(scores, 0, input_ids[:, self.prompt_len:].tolist(), np.zeros(len(scores), bool), None,
                    self.max_repeats)
        return scores


class Engine:
    """Transcribes 16 kHz mono float32 clips (at most 30 s each) greedily.

    name: the resolved engine ("torch", "torch-fake-quant", "torch-int8", "torch-dynamic-int8",
    "onnx-<export mode>"); model_bytes: bytes a deployment ships; files: what model_bytes counts;
    info: structure (heads / FFN per layer) and parameter count where known.
    """

    name: str = "engine"
    model_bytes: int = 0
    files: list[str] = []
    info: dict = {}
    max_repeats: int | None = None  # the repetition guard it decodes under; None: a runtime with its own loop
    tokenizer = None  # the model's tokenizer when known (the data loader skips transcripts over 448 tokens)

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        raise NotImplementedError

    def set_max_repeats(self, n: int) -> None:
        """Decode under the repetition guard with `n` copies allowed (0: off); see slim.decoding."""
        if self.max_repeats is None:
            raise ValueError(f"{self.name} decodes with its own loop: max_repeats applies to the torch and "
                             "slim ONNX engines only")
        self.max_repeats = n


# ---------------------------------------------------------------------------------------------
# torch


class TorchEngine(Engine):
    """A `WhisperForConditionalGeneration` (float, fake-quant, INT8 or dynamically quantized) + processor."""

    def __init__(self, model, processor, name: str = "torch", model_bytes: int = 0, files: list[str] | None = None,
                 info: dict | None = None, max_new_tokens: int | None = None, language: str | None = None):
        self.model, self.processor, self.name = model, processor, name
        self.model_bytes, self.files, self.info = model_bytes, files or [], info or {}
        self.max_new_tokens = max_new_tokens
        self.tokenizer = processor.tokenizer
        # checked against the model's languages here, not at the first generate call; HF's generate takes
        # the code for a multilingual model (and none for an English-only one)
        decode = DecodeConfig.from_model(model).with_language(language)
        self.generate_kw = {"language": language} if language and decode.languages else {}
        self.max_repeats = decode.max_repeats

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        from transformers import LogitsProcessorList
        from transformers.modeling_outputs import BaseModelOutput

        from slim.model import audio_window_of
        from slim.window import clip_frames, window_frames

        model = self.model
        window = audio_window_of(model)
        was_training = model.training
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        texts: list[str] = []
        try:
            for i in range(0, len(audios), batch_size):
                chunk = [np.asarray(a, np.float32) for a in audios[i:i + batch_size]]
                fe = self.processor.feature_extractor
                # a model trained on audio windows encodes this chunk's (its longest clip's); others 30 s
                frames = window_frames(window, max(clip_frames(a, fe.hop_length) for a in chunk), fe.nb_max_frames)
                feats = fe(chunk, sampling_rate=SAMPLING_RATE, return_tensors="pt",
                           max_length=frames * fe.hop_length).input_features
                if param is not None and param.is_floating_point():
                    feats = feats.to(device, param.dtype)
                kw = dict(self.generate_kw, max_new_tokens=token_budget(chunk, self.max_new_tokens))
                if self.max_repeats:
                    kw["logits_processor"] = LogitsProcessorList([RepeatGuard(self.max_repeats)])
                with torch.inference_mode():
                    if frames != fe.nb_max_frames:  # HF's generate would pad the window to 30 s with zeros
                        kw["encoder_outputs"] = BaseModelOutput(last_hidden_state=model.model.encoder(feats)
                                                                .last_hidden_state)
                    ids = model.generate(input_features=feats, **kw)
                texts += [t.strip() for t in self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        finally:
            model.train(was_training)
        return texts


def shipped_files(model_dir: str | Path) -> list[Path]:
    """The files of a model directory a deployment ships: weights, configs, tokenizer, feature extractor."""
    d = Path(model_dir)
    return sorted(p for p in d.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in SHIPPED_FILES))


def dir_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def structure_info(model_dir: str | Path) -> dict:
    """Heads and FFN width per layer (from slim_structure.json, else dense) and the parameter count.

    The count is that of the float model of this structure (tied embedding once), built on the meta
    device, so it is the same for the float, fake-quant and INT8 variants of one structure.
    """
    from transformers import WhisperConfig

    from slim.model import Structure, build_model, count_parameters, read_structure

    config = WhisperConfig.from_pretrained(model_dir)
    s = read_structure(model_dir) or Structure.dense(config)
    with torch.device("meta"):
        n = count_parameters(build_model(config, dataclasses.replace(s, quant=None)))
    d = s.to_dict()
    d.pop("format", None)
    return {"structure": d, "parameters": n}


def _processor(model_dir: Path):
    from slim.model import load_processor

    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{model_dir / 'tokenizer.json'}: missing; the model directory has no tokenizer "
                                "(save it with a processor: slim.model.save_model(..., processor=...))")
    return load_processor(model_dir)


def dynamic_int8_bytes(qmodel: nn.Module) -> int:
    """Bytes of a safetensors file holding `qmodel` after `quantize_dynamic` (see the module docstring)."""
    from safetensors.torch import save as st_save
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    tensors: dict[str, torch.Tensor] = {}
    quantized = []
    for name, mod in qmodel.named_modules():
        if isinstance(mod, DynLinear):
            quantized.append(name + ".")
            w, b = mod._packed_params._weight_bias()
            tensors[f"{name}.weight"] = w.int_repr().contiguous()
            if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                tensors[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
                tensors[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int32)
            else:
                tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().float().contiguous()
                tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().int().contiguous()
            if b is not None:
                tensors[f"{name}.bias"] = b.detach().contiguous()
    seen = set()
    for name, t in qmodel.state_dict().items():
        # a dynamic Linear's own scale/zero_point entries are unused output settings; its packed params are above
        if not isinstance(t, torch.Tensor) or any(name.startswith(q) for q in quantized):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:  # tied tensors are stored once
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous()
    return len(st_save(tensors))


def _torch_dynamic_int8(model_dir: Path, max_new_tokens, language: str | None = None):
    from slim.model import load_model, read_structure

    s = read_structure(model_dir)
    if s is not None and s.quant is not None:
        raise ValueError(f"{model_dir}: is a quantized model (slim_structure.json has quant settings); "
                         "torch-dynamic-int8 is a post-training baseline of a float model")
    float_model = load_model(model_dir)
    with warnings.catch_warnings():  # torch.ao's deprecation notice (the API still runs in torch 2.13)
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)
    others = [p for p in shipped_files(model_dir) if p.suffix != ".safetensors"]
    weights = dynamic_int8_bytes(qmodel)
    return TorchEngine(qmodel, _processor(model_dir), name="torch-dynamic-int8",
                       model_bytes=weights + dir_bytes(others),
                       files=[str(p) for p in others] + [f"<model.safetensors of the int8 state: {weights} bytes>"],
                       info=structure_info(model_dir), max_new_tokens=max_new_tokens, language=language)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


class OnnxRuntimeEngine(Engine):
    """`slim.runtime.OnnxEngine` behind the `Engine` interface."""

    def __init__(self, export_dir: str | Path, threads: int, max_new_tokens: int | None = None,
                 language: str | None = None):
        from slim.runtime import OnnxEngine

        self.ort = OnnxEngine(export_dir, threads=threads, language=language)
        self.name = f"onnx-{self.ort.mode or 'float'}"
        self.model_bytes = self.ort.model_bytes
        d = Path(export_dir)
        self.files = [str(d / n) for n in self.ort.config["files"]] + [str(d / EXPORT_CONFIG)]
        self.info = {"structure": self.ort.config.get("structure")}
        self.max_new_tokens = max_new_tokens
        self.max_repeats = self.ort.decode.max_repeats
        # transformers' tokenizer (the data loader counts transcript tokens with it); the engine decodes with its own
        self.tokenizer = _processor(d).tokenizer if self.ort.tokenizer is not None else None

    def set_max_repeats(self, n: int) -> None:
        self.ort.decode = dataclasses.replace(self.ort.decode, max_repeats=n)
        self.max_repeats = n

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str]:
        return self.ort.transcribe(audios, batch_size=batch_size, max_new_tokens=self.max_new_tokens)


def _fingerprint(model_dir: Path) -> dict:
    """Names, sizes and mtimes of the shipped files: an export made from other weights is not reused."""
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in shipped_files(model_dir)}
    return {"model_dir": str(model_dir.resolve()),
            "digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}


def dynamic_int8_export(model_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """ORT dynamic-INT8 export of a model directory, made once into `cache_dir` (default: a sibling
    `<model_dir>.onnx-dynamic-int8`) and reused while the model's files are unchanged."""
    from qat.onnx_export import export_model

    model_dir = Path(model_dir)
    out = Path(cache_dir) if cache_dir else model_dir.parent / f"{model_dir.name}.onnx-dynamic-int8"
    want = _fingerprint(model_dir)
    src = out / CACHE_SOURCE_FILE
    if (out / EXPORT_CONFIG).exists() and src.exists():
        try:
            same = json.loads(src.read_text()) == want
        except json.JSONDecodeError:
            same = False
        if same and json.loads((out / EXPORT_CONFIG).read_text()).get("mode") == "dynamic-int8":
            return out
    log.info("exporting %s to ONNX (dynamic-int8) in %s", model_dir, out)
    export_model(model_dir, out, mode="dynamic-int8")
    atomic_write_json(src, want)
    return out


# ---------------------------------------------------------------------------------------------


def resolve_engine(model_dir: str | Path, engine: str = "auto") -> str:
    """`auto` -> the runtime of an export dir's layout (export_config.json: `onnx` for slim, `sherpa-onnx`,
    `transformers.js` for hf), else `torch`; others checked and kept."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    layout = export_layout(model_dir)
    is_export = layout is not None
    if is_export and layout not in LAYOUT_ENGINES:
        raise ValueError(f"{Path(model_dir) / EXPORT_CONFIG}: a {layout!r} export, which no engine here runs "
                         "(load it in its own runtime)")
    if engine == "auto":
        return LAYOUT_ENGINES[layout][0] if is_export else "torch"
    if is_export and engine not in LAYOUT_ENGINES[layout]:
        raise ValueError(f"{model_dir}: is a {layout} export ({EXPORT_CONFIG}); only --engine "
                         f"{' / '.join(LAYOUT_ENGINES[layout])} (or auto) runs it")
    for fmt, engines in LAYOUT_ENGINES.items():
        if engine in engines and fmt != "slim" and not is_export:
            raise ValueError(f"{model_dir}: has no {EXPORT_CONFIG}; export it with ./launch.sh export MODEL OUT "
                             f"--format {fmt}")
    if engine == "onnx" and not is_export:
        raise ValueError(f"{model_dir}: has no {EXPORT_CONFIG}, so it is not an ONNX export; export it with "
                         "qat.onnx_export.export_model, or use --engine onnx-dynamic-int8 / torch")
    return engine


def load_engine(model_dir: str | Path, engine: str = "auto", threads: int | None = None,
                max_new_tokens: int | None = None, cache_dir: str | Path | None = None,
                language: str | None = None, max_repeats: int | None = None) -> Engine:
    """An engine for MODEL_DIR (see the module docstring). `threads` sets torch's intra-op threads
    (process-wide) and ORT's; None keeps torch's current setting for both, so the two compare fairly.
    `cache_dir`: where onnx-dynamic-int8 puts its export (default: beside the model). `language`: a
    multilingual model's language code (None: the model's default, English); every engine takes it.
    `max_repeats`: the repetition guard's setting (slim.decoding; None: the model's, 0: off)."""
    engine = _load_engine(Path(model_dir), engine, threads, max_new_tokens, cache_dir, language)
    if max_repeats is not None:
        engine.set_max_repeats(max_repeats)
    return engine


def _load_engine(model_dir: Path, engine: str, threads: int | None, max_new_tokens: int | None,
                 cache_dir: str | Path | None, language: str | None) -> Engine:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    engine = resolve_engine(model_dir, engine)
    if threads:
        torch.set_num_threads(threads)
    threads = threads or torch.get_num_threads()
    if engine == "onnx":
        return OnnxRuntimeEngine(model_dir, threads, max_new_tokens, language)
    if engine in ("sherpa-onnx", "transformers.js", "onnx-asr"):
        from eval import runtimes

        cls = {"sherpa-onnx": runtimes.SherpaOnnxEngine, "transformers.js": runtimes.TransformersJsEngine,
               "onnx-asr": runtimes.OnnxAsrEngine}[engine]
        return cls(model_dir, threads, language=language)
    if engine == "onnx-dynamic-int8":
        e = OnnxRuntimeEngine(dynamic_int8_export(model_dir, cache_dir), threads, max_new_tokens, language)
        e.info = structure_info(model_dir)
        return e
    if engine == "torch-dynamic-int8":
        return _torch_dynamic_int8(model_dir, max_new_tokens, language)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json, no {EXPORT_CONFIG})")
    from qat.load import FLOAT, load_model_dir

    model, kind = load_model_dir(model_dir)
    name = "torch" if kind == FLOAT else f"torch-{kind}"
    files = shipped_files(model_dir)
    return TorchEngine(model.eval(), _processor(model_dir), name=name, model_bytes=dir_bytes(files),
                       files=[str(p) for p in files], info=structure_info(model_dir), max_new_tokens=max_new_tokens,
                       language=language)
