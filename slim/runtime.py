"""The slim runtime: greedy transcription with an export's encoder/decoder graphs on ONNX Runtime, numpy
and `tokenizers` alone (no torch, no transformers), installed by `pip install whisper-slim` without extras.

The encoder graph runs once per batch and hands the cross-attention keys/values over as ORT values;
each decoder step binds the previous step's `present_*` outputs as its `past_*` inputs (IO binding), so
the growing cache never round-trips through numpy. Only the last position's logits come back to
Python, where the suppress masks and the argmax are applied. An export with a "silence" window
(`slim.window`) encodes only a clip's window and joins the rest from a silent input's states, computed at
load. Features are `slim.mel.LogMel` (transformers' WhisperFeatureExtractor in numpy), text is the export's
`tokenizer.json` decoded by `tokenizers`.

    python -m slim.runtime EXPORT_DIR AUDIO... [--threads N]     # prints "<audio>\t<text>" per file
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slim.decoding import repeat_ban_index, token_budget
from slim.export_format import (CONFIG_FILE, DECODER_FILE, ENCODER_FILE, PROCESSOR_FILES, TOKENIZER_FILE,
                                DecodeConfig, ExportDirError, has_processor, load_export_config, session_options)
from slim.mel import LogMel
from slim.window import (FROM_MODEL, SILENCE_LEVELS, batch_levels, clip_frames, engine_window, silence_context,
                          window_frames)


@dataclass
class Timings:
    """Wall-clock totals since the last `reset()`; the benchmark reads them per utterance."""

    features_s: float = 0.0
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    decoder_steps: int = 0
    tokens: int = 0
    utterances: int = 0

    def reset(self) -> None:
        self.__init__()


class OnnxEngine:
    """Greedy transcription with the encoder/decoder graphs of an export directory.

    audio_window: "model" (the window the export's model was trained for, `slim.window`; 30 s if none),
    None (always 30 s), or a window dict forced on the model (untrained truncation, for comparison)."""

    name = "onnx"
    clock = staticmethod(time.perf_counter)
    """What `timings` are measured with; a benchmark on a shared machine may set `time.process_time`."""

    def __init__(self, export_dir: str | Path, threads: int = 2, providers: list | None = None,
                 verify: str = "sha256", language: str | None = None, audio_window=FROM_MODEL,
                 max_repeats: int | None = None):
        self.dir = Path(export_dir)
        self.config = load_export_config(self.dir, verify=verify)
        self.audio_window = engine_window(self.config.get("structure", {}).get("audio_window"), audio_window)
        self.decode = DecodeConfig(**self.config["decode"]).with_language(language)
        if max_repeats is not None:  # the repetition guard (slim.decoding); None: the export's setting
            self.decode = dataclasses.replace(self.decode, max_repeats=max_repeats)
        self.mode = self.config.get("mode")
        so = session_options(threads)
        self.threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = self._session(ENCODER_FILE, so, providers)
        self.decoder = self._session(DECODER_FILE, so, providers)
        names = self.config["io"]["names"]
        self.cross_names, self.past_names, self.present_names = names["cross"], names["past"], names["present"]
        # a "silence" window's encoder (`slim.window`): each layer's context K/V in, its own K/V out
        self.context_names, self.self_names = names.get("context", []), names.get("self", [])
        if silence_context(self.audio_window) and not self.context_names:
            raise ExportDirError(f"{self.dir / ENCODER_FILE}: the audio window {self.audio_window} reads a silent "
                                 "input's states, and this encoder takes none: export the model with that window")
        self._silence, self._cross_buffers = None, {}
        for sess, file, want in ((self.encoder, ENCODER_FILE, ["input_features"] + self.cross_names
                                  + self.context_names + self.self_names),
                                 (self.decoder, DECODER_FILE, ["input_ids", "offset", "logits"] + self.past_names
                                  + self.cross_names + self.present_names)):
            have = {i.name for i in sess.get_inputs()} | {o.name for o in sess.get_outputs()}
            if set(want) - have:
                raise ExportDirError(f"{self.dir / file}: lacks {sorted(set(want) - have)} that {CONFIG_FILE} "
                                     "lists (graph and config come from different exports)")
        dtypes = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
        self._context_shapes = {i.name: ([1] + [0 if isinstance(d, str) or d is None else d for d in i.shape[1:]],
                                         dtypes[i.type]) for i in self.encoder.get_inputs() if i.name in self.context_names}
        self._past_shapes = {}
        for i in self.decoder.get_inputs():
            if i.name in self.past_names:
                # (batch, heads, head_dim, 0) for keys, (batch, heads, 0, head_dim) for values
                shape = [0 if isinstance(s, str) or s is None else s for s in i.shape]
                self._past_shapes[i.name] = shape
        vocab = self.config["model"]["vocab_size"]
        self._suppress = np.zeros(vocab, np.float32)
        self._suppress[self.decode.suppress_tokens] = -np.inf
        self._begin = self._suppress.copy()
        self._begin[self.decode.begin_suppress_tokens] = -np.inf
        self.log_mel = LogMel.from_dir(self.dir) if has_processor(self.dir) else None
        self.tokenizer = None
        if (self.dir / TOKENIZER_FILE).exists():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.dir / TOKENIZER_FILE))
        self.timings = Timings()
        if silence_context(self.audio_window):
            self.silence()  # at load, so no transcription's timings carry it

    def _session(self, name: str, so, providers):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.dir / name), so, providers=providers)
        except Exception as e:  # ORT's parse errors do not say which file
            raise ExportDirError(f"{self.dir / name}: ONNX Runtime cannot load it ({e})") from e

    @property
    def model_bytes(self) -> int:
        """Size on disk of everything a deployment ships: graphs, config, tokenizer, feature extractor."""
        return sum(f["bytes"] for f in self.config["files"].values()) + (self.dir / CONFIG_FILE).stat().st_size

    @property
    def graph_bytes(self) -> int:
        """Size of the ONNX graphs alone (what compares with a model.safetensors)."""
        return sum(f["bytes"] for n, f in self.config["files"].items() if n.endswith((".onnx", ".onnx.data")))

    # -----------------------------------------------------------------------------------------

    def window(self, audios: list[np.ndarray]) -> int:
        """Mel frames this engine encodes for a batch: its longest clip's window, or 30 s (`slim.window`)."""
        return window_frames(self.audio_window, max(map(clip_frames, audios)), self.config["model"]["n_frames"])

    def features(self, audios: list[np.ndarray], frames: int | None = None) -> np.ndarray:
        """Log-mel features (B, n_mels, 3000) of 16 kHz mono float audio, padded/cut to 30 s; with `frames`,
        only the first `frames` of them (`slim.mel.LogMel`)."""
        if self.log_mel is None:
            raise ExportDirError(f"{self.dir / PROCESSOR_FILES[0]}: missing, the export has no feature "
                                 "extractor (export with a processor to transcribe audio)")
        t = self.clock()
        feats = self.log_mel(list(audios), frames)
        self.timings.features_s += self.clock() - t
        return feats

    def encode(self, features: np.ndarray) -> list:
        """Cross-attention keys/values (ORT values, in `cross_names` order) for a batch of features. On a
        silence window (`slim.window`) they are the window's followed by the silent input's, in buffers the
        engine keeps per batch size: the next `encode` of a batch of that size overwrites them."""
        feats = np.ascontiguousarray(features, dtype=np.float32)
        mels, frames = self.config["model"]["num_mel_bins"], self.config["model"]["n_frames"]
        if feats.ndim != 3 or feats.shape[1] != mels or not (0 < feats.shape[2] <= frames and feats.shape[2] % 2 == 0):
            raise ValueError(f"features must have shape (batch, {mels}, an even number of frames up to {frames}), "
                             f"got {feats.shape}")
        t = self.clock()
        if silence_context(self.audio_window) and feats.shape[2] < frames:
            cross = self._encode_window(feats)
        else:
            cross = self._run_encoder(feats, [], self.cross_names)
        self.timings.encoder_s += self.clock() - t
        return cross

    def _encode_window(self, feats: np.ndarray) -> list:
        """`encode` on a silence window: the graph encodes the window's frames, reading each layer's silent
        rest as its context, and the cross K/V go on with the silent input's from the window's end."""
        import onnxruntime as ort

        m, B = feats.shape[2] // 2, feats.shape[0]
        rest = [self.silence()[v] for v in batch_levels(feats.min(axis=(1, 2)))]  # (cross K/V, layers' K/V)
        contexts = [np.concatenate([_frames(n, layers[i], m) for _, layers in rest])  # contiguous copies
                    for i, n in enumerate(self.context_names)]
        joined = []
        for i, (n, own) in enumerate(zip(self.cross_names, self._run_encoder(feats, contexts, self.cross_names))):
            # into a buffer kept per name and batch size, as ORT reuses its output memory: a fresh array each
            # call made the decoder steps that read it 20-70% slower
            full = rest[0][0][i]
            buf = self._cross_buffers.get((n, B))
            if buf is None:
                buf = self._cross_buffers[(n, B)] = np.empty((B,) + full.shape[1:], full.dtype)
            tails = [_frames(n, cross[i], m) for cross, _ in rest]
            _frames(n, buf, 0, m)[...] = own.numpy()
            _frames(n, buf, m)[...] = tails[0] if len(tails) == 1 else np.concatenate(tails)
            joined.append(ort.OrtValue.ortvalue_from_numpy(buf))
        return joined

    def _run_encoder(self, feats: np.ndarray, contexts: list[np.ndarray], outputs: list[str]) -> list:
        """The encoder graph's `outputs` (ORT values) for `feats`; `contexts` for its context inputs (empty:
        none read, or a graph without them)."""
        io = self.encoder.io_binding()
        io.bind_cpu_input("input_features", feats)
        for i, n in enumerate(self.context_names):
            shape, dtype = self._context_shapes[n]
            # none read: no frames beyond the window's, (1, heads, head_dim, 0) keys, (1, heads, 0, head_dim) values
            io.bind_cpu_input(n, np.ascontiguousarray(contexts[i]) if contexts else np.zeros(shape, dtype))
        for n in outputs:
            io.bind_output(n, "cpu")
        self.encoder.run_with_iobinding(io)
        return io.get_outputs()

    def silence(self) -> dict[float, tuple[list[np.ndarray], list[np.ndarray]]]:
        """Per `slim.window.SILENCE_LEVELS` value: the cross-attention K/V and each encoder layer's own K/V of
        a silent 30 s input at that level, which a "silence" window reads beyond its frames; computed once."""
        if self._silence is None:
            mels, frames = self.config["model"]["num_mel_bins"], self.config["model"]["n_frames"]
            self._silence = {}
            for level in SILENCE_LEVELS:
                feats = np.full((1, mels, frames), level, np.float32)
                outs = [o.numpy() for o in self._run_encoder(feats, [], self.cross_names + self.self_names)]
                self._silence[level] = (outs[:len(self.cross_names)], outs[len(self.cross_names):])
        return self._silence

    def generate_tokens(self, features: np.ndarray | None, max_new_tokens: int | None = None,
                        forced: list[list[int]] | None = None, cross: list | None = None) -> list[list[int]]:
        """Greedy tokens after the prompt (eos excluded) for each item of a feature batch, under the
        repetition guard (`ban_repeats`).

        forced: teacher forcing (see `forced_schedule`): each item's tokens are fed instead of the engine's
        own picks, and each item's list holds the engine's pick at every position of its forced tokens
        and one more (where eos is due).
        cross: `encode(features)` already run (then features is not read): decoding the same audio again,
        free running and teacher forced, encodes it once. On a silence window, valid until the next `encode`
        of a batch of the same size (its buffers, see `encode`).
        """
        import onnxruntime as ort

        cross = self.encode(features) if cross is None else cross
        B = cross[0].shape()[0] if cross else len(features)
        d = self.decode
        steps = forced_schedule(d, max_new_tokens, forced, B)
        io = self.decoder.io_binding()
        for n, v in zip(self.cross_names, cross):
            io.bind_ortvalue_input(n, v)
        past = []
        for n in self.past_names:
            past.append(ort.OrtValue.ortvalue_from_numpy(np.zeros([B] + self._past_shapes[n][1:], np.float32)))
        ids = np.tile(np.asarray(d.prompt, np.int64), (B, 1))
        offset = np.zeros(1, np.int64)
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        t = self.clock()
        for step in range(steps):
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("offset", offset)
            for n, v in zip(self.past_names, past):
                io.bind_ortvalue_input(n, v)
            io.bind_output("logits", "cpu")
            for n in self.present_names:
                io.bind_output(n, "cpu")
            self.decoder.run_with_iobinding(io)
            outs = io.get_outputs()
            logits, past = outs[0].numpy(), outs[1:]
            logits += self._begin if step == 0 else self._suppress
            ban_repeats(logits, step, out, done, forced, d.max_repeats)
            nxt = logits.argmax(-1)
            self.timings.decoder_steps += 1
            offset = offset + ids.shape[1]
            nxt = greedy_step(nxt.tolist(), step, out, done, d.eos_token_id, forced)
            if done.all():
                break
            ids = np.asarray(nxt, np.int64)[:, None]
        self.timings.decoder_s += self.clock() - t
        self.timings.tokens += sum(len(o) for o in out)
        self.timings.utterances += B
        return out

    def decode_text(self, tokens: list[list[int]]) -> list[str]:
        if self.tokenizer is None:
            raise ExportDirError(f"{self.dir / TOKENIZER_FILE}: missing, the export has no tokenizer")
        return [s.strip() for s in self.tokenizer.decode_batch(tokens, skip_special_tokens=True)]

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1, max_new_tokens: int | None = None) -> list[str]:
        """Text for each 16 kHz mono clip (at most 30 s), greedy, `batch_size` clips per run, at most
        `slim.decoding.token_budget` tokens per run (so a broken model cannot loop to 448 positions)."""
        texts: list[str] = []
        for i in range(0, len(audios), batch_size):
            chunk = [np.asarray(a, np.float32) for a in audios[i:i + batch_size]]
            feats = self.features(chunk, self.window(chunk))
            tokens = self.generate_tokens(feats, token_budget(chunk, max_new_tokens))
            texts += self.decode_text(tokens)
        return texts


def _frames(name: str, a: np.ndarray, start: int, stop: int | None = None) -> np.ndarray:
    """A view of K/V tensor `name`'s frames start:stop: keys are (B, heads, head_dim, frames), values
    (B, heads, frames, head_dim)."""
    index = [slice(None)] * a.ndim
    index[3 if "key" in name else 2] = slice(start, stop)
    return a[tuple(index)]


def forced_schedule(decode: DecodeConfig, max_new_tokens: int | None, forced: list[list[int]] | None,
                    batch: int) -> int:
    """Decoder steps a greedy loop runs: the token budget, or under teacher forcing (`forced`: the tokens
    to feed, one list per batch item) the longest forced list plus the step where eos is due."""
    steps = decode.max_length - len(decode.prompt)
    if forced is None:
        return steps if max_new_tokens is None else min(steps, max_new_tokens)
    if len(forced) != batch:
        raise ValueError(f"forced has {len(forced)} token lists for a batch of {batch}")
    if max(map(len, forced), default=0) >= steps:
        raise ValueError(f"a forced token list is longer than the decoder allows ({steps - 1} tokens)")
    return max(map(len, forced), default=0) + 1


def ban_repeats(logits, step: int, out: list[list[int]], done, forced: list[list[int]] | None,
                max_repeats: int) -> None:
    """Set to -inf, in place, the logits of each live item's tokens the repetition guard rules out
    (`slim.decoding.repeat_bans`) after the tokens fed so far: its own picks when free running, its forced
    tokens when teacher forced (so fed its own greedy tokens, a loop picks them again). A numpy array or a
    torch tensor of shape (batch, vocab); the ONNX and torch loops share it."""
    fed = out if forced is None else [f[:step] for f in forced]
    rows, cols = repeat_ban_index(fed, ~done, max_repeats)
    if rows:
        logits[rows, cols] = float("-inf")


def greedy_step(picks: list[int], step: int, out: list[list[int]], done, eos: int,
                forced: list[list[int]] | None) -> list[int]:
    """One step of the greedy loops (ONNX and torch share it): record each live item's pick in `out`,
    mark finished items in `done` (a bool array), return the tokens to feed next.

    Free running, an item ends at its eos pick (not recorded) and is fed its picks. Teacher forced,
    every pick is recorded, eos included, the item is fed its forced tokens and ends after the position
    where eos is due, so `out[b]` has len(forced[b]) + 1 picks.
    """
    feed = []
    for b, pick in enumerate(picks):
        if done[b]:
            feed.append(eos)
        elif forced is None:
            done[b] = pick == eos
            if not done[b]:
                out[b].append(pick)
            feed.append(eos if done[b] else pick)
        else:
            out[b].append(pick)
            done[b] = step >= len(forced[b])
            feed.append(eos if done[b] else forced[b][step])
    return feed


def main(argv: list[str] | None = None) -> int:
    """python -m slim.runtime EXPORT_DIR AUDIO... [--threads N] [--language CODE]: "<audio>\t<text>" per file."""
    import argparse
    import sys

    from slim.audio import AudioError, load_audio

    p = argparse.ArgumentParser(prog="python -m slim.runtime",
                                description="Transcribe audio files with a slim export (no torch needed).")
    p.add_argument("export_dir")
    p.add_argument("audio", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--language", default=None, help="a multilingual model's language code (default: the export's, en)")
    args = p.parse_args(argv)
    try:
        engine = OnnxEngine(args.export_dir, threads=args.threads, language=args.language)
        for path in args.audio:
            text = engine.transcribe([load_audio(path)], max_new_tokens=args.max_new_tokens)[0]
            print(f"{path}\t{text}", flush=True)
    except (ExportDirError, AudioError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
