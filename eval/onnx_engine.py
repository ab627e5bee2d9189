"""ONNX Runtime engine for an export of `qat.onnx_export`: greedy decoding with the KV cache.

The encoder graph runs once per batch and hands the cross-attention keys/values over as ORT values;
each decoder step binds the previous step's `present_*` outputs as its `past_*` inputs (IO binding), so
the growing cache never round-trips through numpy. Only the last position's logits come back to
Python, where the suppress masks and the argmax are applied.

`parity` compares the engine's greedy tokens with a torch model's (float, fake-quant or pruned) under
the same decoding rules (`torch_greedy_tokens`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qat.onnx_export import (CONFIG_FILE, DECODER_FILE, ENCODER_FILE, DecodeConfig, file_digest, has_processor,
                             session_options)
from eval.decoding import token_budget
from slim.audio import SAMPLING_RATE


class ExportDirError(ValueError):
    """A missing, incomplete or corrupt export directory; the message names the file."""


def load_export_config(export_dir: str | Path, verify: str = "sha256") -> dict:
    """Read `export_config.json` and check every file it lists: present, right size, right sha256.

    verify: "sha256" (default), "size" (cheaper: existence and sizes only).
    """
    d = Path(export_dir)
    if not d.is_dir():
        raise ExportDirError(f"{d}: export directory does not exist")
    f = d / CONFIG_FILE
    if not f.exists():
        raise ExportDirError(f"{f}: missing (not an ONNX export directory; export with qat.onnx_export.export_model)")
    try:
        config = json.loads(f.read_text())
        files, decode = config["files"], config["decode"]
        DecodeConfig(**decode)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportDirError(f"{f}: corrupt export config ({type(e).__name__}: {e})") from None
    for name in (ENCODER_FILE, DECODER_FILE):
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
    """Greedy transcription with the encoder/decoder graphs of an export directory."""

    name = "onnx"
    clock = staticmethod(time.perf_counter)
    """What `timings` are measured with; a benchmark on a shared machine may set `time.process_time`."""

    def __init__(self, export_dir: str | Path, threads: int = 2, providers: list | None = None,
                 verify: str = "sha256"):
        self.dir = Path(export_dir)
        self.config = load_export_config(self.dir, verify=verify)
        self.decode = DecodeConfig(**self.config["decode"])
        self.mode = self.config.get("mode")
        so = session_options(threads)
        self.threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = self._session(ENCODER_FILE, so, providers)
        self.decoder = self._session(DECODER_FILE, so, providers)
        names = self.config["io"]["names"]
        self.cross_names, self.past_names, self.present_names = names["cross"], names["past"], names["present"]
        for sess, file, want in ((self.encoder, ENCODER_FILE, ["input_features"] + self.cross_names),
                                 (self.decoder, DECODER_FILE, ["input_ids", "offset", "logits"] + self.past_names
                                  + self.cross_names + self.present_names)):
            have = {i.name for i in sess.get_inputs()} | {o.name for o in sess.get_outputs()}
            if set(want) - have:
                raise ExportDirError(f"{self.dir / file}: lacks {sorted(set(want) - have)} that {CONFIG_FILE} "
                                     "lists (graph and config come from different exports)")
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
        self.processor = None
        if has_processor(self.dir):
            from transformers import WhisperProcessor

            self.processor = WhisperProcessor.from_pretrained(self.dir)
        self.timings = Timings()

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

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        """Log-mel features (B, n_mels, 3000) of 16 kHz mono float audio, padded/cut to 30 s."""
        if self.processor is None:
            raise ExportDirError(f"{self.dir / 'processor_config.json'}: missing, the export has no feature "
                                 "extractor (export with a processor to transcribe audio)")
        t = self.clock()
        feats = self.processor.feature_extractor(list(audios), sampling_rate=SAMPLING_RATE,
                                                 return_tensors="np").input_features
        self.timings.features_s += self.clock() - t
        return feats.astype(np.float32, copy=False)

    def encode(self, features: np.ndarray) -> list:
        """Cross-attention keys/values (ORT values, in `cross_names` order) for a batch of features."""
        feats = np.ascontiguousarray(features, dtype=np.float32)
        want = (self.config["model"]["num_mel_bins"], self.config["model"]["n_frames"])
        if feats.ndim != 3 or feats.shape[1:] != want:
            raise ValueError(f"features must have shape (batch, {want[0]}, {want[1]}), got {feats.shape}")
        io = self.encoder.io_binding()
        io.bind_cpu_input("input_features", feats)
        for n in self.cross_names:
            io.bind_output(n, "cpu")
        t = self.clock()
        self.encoder.run_with_iobinding(io)
        self.timings.encoder_s += self.clock() - t
        return io.get_outputs()

    def generate_tokens(self, features: np.ndarray | None, max_new_tokens: int | None = None,
                        forced: list[list[int]] | None = None, cross: list | None = None) -> list[list[int]]:
        """Greedy tokens after the prompt (eos excluded) for each item of a feature batch.

        forced: teacher forcing (see `forced_schedule`): each item's tokens are fed instead of the engine's
        own picks, and each item's list holds the engine's pick at every position of its forced tokens
        and one more (where eos is due).
        cross: `encode(features)` already run (then features is not read): decoding the same audio again,
        free running and teacher forced, encodes it once.
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
        if self.processor is None:
            raise ExportDirError(f"{self.dir / 'tokenizer.json'}: missing, the export has no tokenizer")
        return [s.strip() for s in self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def transcribe(self, audios: list[np.ndarray], batch_size: int = 1, max_new_tokens: int | None = None) -> list[str]:
        """Text for each 16 kHz mono clip (at most 30 s), greedy, `batch_size` clips per run, at most
        `eval.decoding.token_budget` tokens per run (so a broken model cannot loop to 448 positions)."""
        texts: list[str] = []
        for i in range(0, len(audios), batch_size):
            chunk = [np.asarray(a, np.float32) for a in audios[i:i + batch_size]]
            tokens = self.generate_tokens(self.features(chunk), token_budget(chunk, max_new_tokens))
            texts += self.decode_text(tokens)
        return texts


# ---------------------------------------------------------------------------------------------
# the torch reference and parity


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


def torch_greedy_tokens(model, features, decode: DecodeConfig, max_new_tokens: int | None = None,
                        forced: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy tokens of a torch Whisper (float, fake-quant, pruned) under the export's decoding rules;
    `forced` as in `OnnxEngine.generate_tokens`."""
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model = model.eval()
    feats = torch.as_tensor(np.asarray(features, np.float32))
    B = feats.shape[0]
    vocab = model.config.vocab_size
    suppress = torch.zeros(vocab)
    suppress[decode.suppress_tokens] = float("-inf")
    begin = suppress.clone()
    begin[decode.begin_suppress_tokens] = float("-inf")
    steps = forced_schedule(decode, max_new_tokens, forced, B)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        ids = torch.tensor([decode.prompt] * B, dtype=torch.long)
        for step in range(steps):
            h = model.model.decoder(input_ids=ids, encoder_hidden_states=enc, past_key_values=cache,
                                    use_cache=True).last_hidden_state[:, -1]
            logits = model.proj_out(h).float() + (begin if step == 0 else suppress)
            nxt = greedy_step(logits.argmax(-1).tolist(), step, out, done, decode.eos_token_id, forced)
            if done.all():
                break
            ids = torch.tensor(nxt, dtype=torch.long)[:, None]
    return out


def token_agreement(refs: list[list[int]], hyps: list[list[int]]) -> float:
    """1 - (token edit distance) / (longer length), pooled over utterances: 1.0 means identical."""
    import jiwer

    total = sum(max(len(r), len(h)) for r, h in zip(refs, hyps))
    if total == 0:
        return 1.0
    errors = 0
    for r, h in zip(refs, hyps):
        if r == h:
            continue
        if not r or not h:
            errors += max(len(r), len(h))
            continue
        o = jiwer.process_words(" ".join(map(str, r)), " ".join(map(str, h)))
        errors += o.substitutions + o.deletions + o.insertions
    return 1.0 - errors / total


def next_token_agreement(refs: list[list[int]], picks: list[list[int]], eos: int,
                         budgets: list[int] | None = None) -> float:
    """Share of decoding positions where an engine fed `refs` (teacher forcing) picks the same next token:
    picks[b] are its picks at the len(refs[b]) + 1 positions of refs[b] followed by eos. budgets[b]: the
    token budget refs[b] was decoded with; a reference that filled it was cut, not ended by eos, so its
    last position is not compared.

    Unlike `token_agreement` of two free-running decodes, one differing pick costs one position, not
    the rest of the utterance (after it the two decodes continue from different prefixes)."""
    total = same = 0
    for b, (r, p) in enumerate(zip(refs, picks, strict=True)):
        want = list(r) + [eos]
        if len(p) != len(want):
            raise ValueError(f"{len(p)} picks for {len(want)} teacher-forced positions")
        if budgets is not None and len(r) >= budgets[b]:
            want, p = want[:-1], p[:-1]
        total += len(want)
        same += sum(a == b for a, b in zip(want, p))
    return same / total if total else 1.0


def agreement(refs: list[list[int]], hyps: list[list[int]]) -> dict:
    """`token_agreement` and the share of utterances whose tokens are identical."""
    exact = sum(r == h for r, h in zip(refs, hyps))
    return {"token_agreement": token_agreement(refs, hyps), "exact_match": exact / max(len(refs), 1)}


def parity(torch_model, onnx_dir: str | Path, features_list, threads: int = 2,
           max_new_tokens: int | None = None, engine: OnnxEngine | None = None) -> dict:
    """Token agreement between `torch_model`'s greedy tokens and the ONNX engine's, item by item.

    features_list: arrays of shape (n_mels, frames) or (1, n_mels, frames).
    """
    engine = engine or OnnxEngine(onnx_dir, threads=threads)
    refs, hyps = [], []
    for f in features_list:
        f = np.asarray(f, np.float32)
        f = f[None] if f.ndim == 2 else f
        refs += torch_greedy_tokens(torch_model, f, engine.decode, max_new_tokens)
        hyps += engine.generate_tokens(f, max_new_tokens)
    return {**agreement(refs, hyps), "utterances": len(refs), "tokens_torch": sum(map(len, refs)), "tokens_onnx": sum(map(len, hyps)),
            "mode": engine.mode, "torch_tokens": refs, "onnx_tokens": hyps}


# ---------------------------------------------------------------------------------------------
# the parity command


NUDGE = 1e-6  # relative change of the input features for the noise-floor measurement


def parity_report(torch_models: dict, export_dir: str | Path, data, limit: int | None = None,
                  threads: int = 2, torch_floor: bool = False) -> dict:
    """Token agreement with the ONNX engine and WER, side by side, for torch models on an eval set.

    torch_models: {name: model} (float, fake-quant, PyTorch INT8...); data: anything `slim.data` opens.
    Also reports the engine's agreement with itself on inputs nudged by NUDGE (its noise floor), and with
    `torch_floor` each torch model's agreement with itself nudged (two more torch decodes per utterance).
    """
    from eval.metrics import word_error_rate
    from slim.data import iter_examples

    engine = OnnxEngine(export_dir, threads=threads)
    examples = list(iter_examples(data, limit=limit))
    if not examples:
        raise ValueError(f"{data}: no usable examples")
    refs = [ex["text"] for ex in examples]
    eos = engine.decode.eos_token_id
    onnx_tokens, nudged, nudged_picks, feats = [], [], [], []
    budgets = [token_budget([ex["audio"]]) for ex in examples]  # as the engines decode: no runaway loops
    for ex, n in zip(examples, budgets):
        f = engine.features([ex["audio"]])
        feats.append(f)
        onnx_tokens += engine.generate_tokens(f, n)
        cross = engine.encode(f * np.float32(1 + NUDGE))
        nudged += engine.generate_tokens(None, n, cross=cross)
        nudged_picks += engine.generate_tokens(None, forced=onnx_tokens[-1:], cross=cross)
    # The noise floor: a quantized model's rounding decisions flip under any change of arithmetic, and the
    # flips compound through the layers. The engine against itself on inputs nudged by one part in a
    # million is what any implementation that is not bit-identical to it (fake quant included) can reach.
    floor = agreement(onnx_tokens, nudged)
    report = {"export": str(export_dir), "mode": engine.mode, "utterances": len(examples),
              "onnx": {"wer": word_error_rate(refs, engine.decode_text(onnx_tokens)),
                       "wer_nudged": word_error_rate(refs, engine.decode_text(nudged)),
                       "token_agreement_with_itself_nudged": floor["token_agreement"],
                       "exact_match_nudged": floor["exact_match"],
                       "next_token_agreement_with_itself_nudged": next_token_agreement(
                           onnx_tokens, nudged_picks, eos, budgets)}}
    for name, model in torch_models.items():
        tokens, picks = [], []
        for f, n in zip(feats, budgets):
            tokens += torch_greedy_tokens(model, f, engine.decode, n)
            picks += engine.generate_tokens(f, forced=tokens[-1:])  # the engine on the torch model's prefixes
        a = agreement(tokens, onnx_tokens)
        report[name] = {"wer": word_error_rate(refs, engine.decode_text(tokens)),
                        "token_agreement_with_onnx": a["token_agreement"], "exact_match": a["exact_match"],
                        "next_token_agreement_with_onnx": next_token_agreement(tokens, picks, eos, budgets)}
        if torch_floor:  # the torch model against itself on the nudged input: free running, and fed its own tokens
            nudged_tokens, nudged_picks = [], []
            for f, n, own in zip(feats, budgets, tokens):
                g = f * np.float32(1 + NUDGE)
                nudged_tokens += torch_greedy_tokens(model, g, engine.decode, n)
                nudged_picks += torch_greedy_tokens(model, g, engine.decode, forced=[own])
            b = agreement(tokens, nudged_tokens)
            report[name].update({"token_agreement_with_itself_nudged": b["token_agreement"],
                                 "exact_match_nudged": b["exact_match"],
                                 "next_token_agreement_with_itself_nudged": next_token_agreement(
                                     tokens, nudged_picks, eos, budgets)})
    return report


def main(argv: list[str] | None = None) -> int:
    """python -m eval.onnx_engine EXPORT_DIR --data DATA --torch MODEL_DIR [MODEL_DIR ...] [--limit N]"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m eval.onnx_engine",
                                description="Parity of torch models (float / fake-quant / INT8) with an ONNX export.")
    p.add_argument("export_dir")
    p.add_argument("--data", required=True, help="JSONL manifest, audio folder or datasets spec")
    p.add_argument("--torch", nargs="+", required=True, help="model directories to compare with the export")
    p.add_argument("--limit", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-floor", action="store_true",
                   help="also each torch model against itself on the nudged input (its own noise floor)")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    from qat.onnx_export import load_source_model

    models = {str(d): load_source_model(d)[0] for d in args.torch}
    report = parity_report(models, args.export_dir, args.data, limit=args.limit, threads=args.threads,
                           torch_floor=args.torch_floor)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
