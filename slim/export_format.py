"""The slim export format: file names, the decoding rules shipped with the graphs, and the check of an
export directory. Shared by the exporter (`qat.onnx_export`, torch) and the runtime (`slim.runtime`, no
torch), so it imports only the standard library here (onnxruntime inside `session_options`).

An export directory holds `encoder.onnx`, `decoder.onnx`, the tokenizer (`tokenizer.json`, which the
runtime reads with the `tokenizers` library), the feature extractor's settings (`processor_config.json`
or `preprocessor_config.json`) and `export_config.json`, which lists every other file with its size and
sha256 (`load_export_config` checks them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from slim.decoding import MAX_REPEATS

CONFIG_FILE = "export_config.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FORMAT = 1
# A saved WhisperProcessor (transformers 5 writes processor_config.json, older ones preprocessor_config.json);
# the runtime reads the feature extractor's settings from it, and it counts in the deployment size.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def has_processor(d: Path) -> bool:
    return any((Path(d) / f).exists() for f in PROCESSOR_FILES)


@dataclass
class DecodeConfig:
    """What greedy decoding needs besides the graphs; the torch reference and the ONNX engine share it."""

    prompt: list[int]
    eos_token_id: int
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    max_length: int = 448
    """Prompt plus generated tokens, at most the decoder's `max_target_positions`."""
    languages: dict[str, int] = field(default_factory=dict)
    """A multilingual model's language tokens by code ("en": 50259, ...); empty for an English-only model."""
    max_repeats: int = MAX_REPEATS
    """Back-to-back copies of an n-gram a greedy transcript may hold (`slim.decoding.repeat_bans`; 0: no guard)."""

    def with_language(self, language: str | None) -> "DecodeConfig":
        """This config transcribing `language` (its token second in the prompt); None keeps the prompt."""
        if language is None:
            return self
        if not self.languages:
            if language == "en":
                return self
            raise ValueError(f"language {language!r}: this is an English-only model (it has no language tokens)")
        if language not in self.languages:
            raise ValueError(f"language {language!r} is not one of the model's {len(self.languages)} languages "
                             f"({', '.join(sorted(self.languages)[:8])}, ...)")
        ids = set(self.languages.values())
        at = [i for i, t in enumerate(self.prompt) if t in ids]
        if not at:
            raise ValueError(f"the prompt {self.prompt} has no language token to replace")
        prompt = list(self.prompt)
        prompt[at[0]] = self.languages[language]
        return dataclasses.replace(self, prompt=prompt)

    @classmethod
    def from_model(cls, model, prompt: list[int] | None = None, language: str = "en",
                   max_length: int | None = None) -> "DecodeConfig":
        """Whisper's English transcription prompt without timestamps, from the generation config."""
        cfg, gc = model.config, getattr(model, "generation_config", None)
        get = lambda k, default=None: getattr(gc, k, None) if gc is not None and getattr(gc, k, None) is not None \
            else getattr(cfg, k, default)
        multilingual = bool(get("is_multilingual") and get("lang_to_id"))
        languages = {k.strip("<|>"): int(v) for k, v in gc.lang_to_id.items()} if multilingual else {}
        if prompt is None:
            prompt = [get("decoder_start_token_id")]
            if multilingual:
                lang = f"<|{language}|>"
                if lang not in gc.lang_to_id:
                    raise ValueError(f"language {language!r} is not in the model's lang_to_id")
                prompt += [gc.lang_to_id[lang], gc.task_to_id["transcribe"]]
            if get("no_timestamps_token_id") is not None:
                prompt.append(get("no_timestamps_token_id"))
        eos = get("eos_token_id")
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        limit = cfg.max_target_positions
        max_length = min(max_length or limit, limit)
        if len(prompt) >= max_length:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under max_length={max_length}")
        return cls(prompt=[int(t) for t in prompt], eos_token_id=int(eos),
                   suppress_tokens=[int(t) for t in (get("suppress_tokens") or [])],
                   begin_suppress_tokens=[int(t) for t in (get("begin_suppress_tokens") or [])],
                   max_length=int(max_length), languages=languages)




def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}




@functools.cache
def cpu_has_vnni() -> bool:
    """x86 with AVX-512 VNNI or AVX-VNNI (Linux's /proc/cpuinfo flags; False where it cannot tell)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


@functools.cache
def int8_kernels_exact() -> bool:
    """Whether this CPU's u8 x s8 int8 kernels (ONNX Runtime's, PyTorch's fbgemm) sum exactly: everywhere but
    on x86 without VNNI, where they sum pairs of products in 16 bits (VPMADDUBSW), which a uint8 activation
    times a full-range int8 weight can saturate (docs/runtimes.md measures what it costs)."""
    return platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686") or cpu_has_vnni()


def session_options(threads: int = 2):
    """ORT session options for an export's graphs: all graph optimizations, `threads` intra-op threads.

    On x86 ORT rewrites int8 Q/DQ activations to uint8 by default ("session.qdqisint8allowed" = 0): there
    u8 x s8 runs on AVX2's VPMADDUBSW, whose 16-bit sums can saturate when both sides are activations.
    With VNNI (VPDPBUSD, 32-bit sums) u8 x s8 is exact and faster than the u8 x u8 it would become
    (docs/results.md), so on such CPUs the signed keys/values stay signed. Elsewhere ORT's default stands (ARM
    already allows int8).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # an engine holds two sessions, each with its own pool; a pool's workers spin-wait for a while after
    # its run, and on a small machine the spinning workers take a core from the other session's run
    # (slowing the decoder's first steps and the next encoder run: docs/results.md,
    # benchmarks/bench_onnx_graphs.py). Stop spinning when a run ends.
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if cpu_has_vnni():
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    if not int8_kernels_exact():
        # x86 without VNNI: exact sums (u8 x u8 kernels on weights stored as uint8 + 128) instead of the u8 x s8
        # ones that can saturate. Only there: with VNNI the u8 x s8 sums are exact already, and the option
        # moves ORT off its fastest int8 kernels (docs/runtimes.md).
        so.add_session_config_entry("session.x64quantprecision", "1")
    return so


class ExportDirError(ValueError):
    """A missing, incomplete or corrupt export directory; the message names the file."""


LAYOUTS = ("slim", "sherpa-onnx", "hf")
"""Export layouts (`./launch.sh export --format`): the slim runtime's, sherpa-onnx's and the Hugging Face
onnx/ layout (transformers.js, onnx-asr)."""


def export_layout(model_dir: str | Path) -> str | None:
    """The layout of an export directory (None when it is not one)."""
    f = Path(model_dir) / CONFIG_FILE
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text()).get("layout", "slim")
    except ValueError:
        return "slim"  # load_export_config reports the corrupt file


def required_files(config: dict, layout: str) -> list[str]:
    """The files an export of `layout` cannot run without (besides export_config.json)."""
    if layout == "slim":
        return [ENCODER_FILE, DECODER_FILE]
    return list(config[layout]["required"])


def load_export_config(export_dir: str | Path, verify: str = "sha256", layout: str = "slim") -> dict:
    """Read `export_config.json` and check every file it lists: present, right size, right sha256.

    verify: "sha256" (default), "size" (cheaper: existence and sizes only). layout: the layout the caller
    runs; an export of another layout is an error that names it.
    """
    d = Path(export_dir)
    if not d.is_dir():
        raise ExportDirError(f"{d}: export directory does not exist")
    f = d / CONFIG_FILE
    if not f.exists():
        raise ExportDirError(f"{f}: missing (not an export directory; make one with ./launch.sh export MODEL OUT)")
    try:
        config = json.loads(f.read_text())
        files = config["files"]
        have = config.get("layout", "slim")
        if have == layout == "slim":
            DecodeConfig(**config["decode"])
        need = required_files(config, layout) if have == layout else []
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportDirError(f"{f}: corrupt export config ({type(e).__name__}: {e})") from None
    if have != layout:
        raise ExportDirError(f"{f}: is a {have!r} export, not {layout!r} (export with --format {layout})")
    for name in need:
        if name not in files:
            raise ExportDirError(f"{f}: does not list {name}")
    for name, want in files.items():
        p = d / name
        if not p.exists():
            raise ExportDirError(f"{p}: missing file listed in {CONFIG_FILE}")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise ExportDirError(f"{p}: has {size} bytes, {CONFIG_FILE} says {want['bytes']} (truncated or replaced)")
        if verify == "sha256" and file_digest(p)["sha256"] != want["sha256"]:
            raise ExportDirError(f"{p}: sha256 does not match {CONFIG_FILE} (corrupt or replaced)")
    return config
