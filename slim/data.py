"""Speech data behind one interface: JSONL manifests, audio folders and `datasets` specs -> examples.

DATA is one of
- a JSONL manifest: one `{"audio": path relative to the manifest, "text": transcript}` per line
  (an optional "id"; other keys are ignored);
- an audio folder: `manifest.jsonl` inside it, or the `datasets` audiofolder layout (`metadata.jsonl` or
  `metadata.csv` with `file_name` and a transcript column: transcription, text, sentence or transcript);
- a `datasets` spec: `hf:PATH?split=S&name=N&streaming=1&text_column=T&data_files=F&...`, the shorthand
  `hf:PATH/NAME/SPLIT` (`hf:librispeech_asr/clean/validation`, `hf:ORG/REPO/NAME/SPLIT`) or
  `hf:PATH/SPLIT`, or a dict of `HFSpec` fields.

Every source yields examples `{"id", "audio": float32 mono 16 kHz, "text"}`. Bad items (missing or
unreadable audio, empty, silent, over 30 s, empty transcript, transcript over the decoder's 448 tokens)
are skipped with one warning line each and counted in a `SkipStats`, which callers put into reports:
a bad file never stops a run.

Training reads DATA lazily (`open_train_source`): only the index (ids, transcripts, paths or row numbers)
is held; an item is decoded and featurized in the DataLoader worker that draws it, and a bad one travels
to the training process as a count in its batch (`SpeechCollator`), so nothing holds a corpus in memory.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl

import numpy as np
import torch

from slim.augment import AugmentConfig, Augmentation
from slim.audio import MAX_SECONDS, SAMPLING_RATE, AudioError, decode_audio, load_audio
from slim.window import clip_frames

log = logging.getLogger(__name__)

MAX_LABEL_LENGTH = 448
IGNORE_INDEX = -100
"""Label padding: the positions the losses (and the repair's decoder rows) skip."""
"""Whisper's decoder positions (`max_target_positions`): a longer label sequence cannot be trained on."""
SILENCE_PEAK = 1e-4
"""Peak amplitude (-80 dBFS, about 3 LSB of 16-bit PCM) below which a clip counts as silent."""
TEXT_COLUMNS = ("text", "transcription", "sentence", "transcript", "normalized_text")
"""Transcript columns looked for, in this order, in audio folders and `datasets` rows."""
REASONS = ("bad_entry", "missing", "unreadable", "empty_audio", "silent", "too_long", "empty_text", "text_too_long")
"""Why an item is skipped. bad_entry: a manifest line that is not JSON or has no "audio"."""


@dataclass
class SkipStats:
    """Counts of skipped items by reason; `total` goes into every report as `skipped`."""

    by_reason: Counter = field(default_factory=Counter)

    def skip(self, reason: str, item_id: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.by_reason[reason] += 1
        log.warning("skipped %s: %s%s", item_id, reason, f" ({detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def as_dict(self) -> dict[str, int]:
        return {r: self.by_reason[r] for r in REASONS if self.by_reason[r]}

    def __str__(self) -> str:
        return f"{self.total} skipped" + (f" {self.as_dict()}" if self.total else "")


@dataclass
class Item:
    """One raw entry of a source, before its audio is decoded: a file on disk or encoded bytes."""

    id: str
    text: str | None
    path: Path | None = None
    data: bytes | None = None


@dataclass
class HFSpec:
    """A `datasets.load_dataset` call. Audio is read with `Audio(decode=False)` and decoded by soundfile."""

    path: str
    """Hub id (`openslr/librispeech_asr`) or builder (`parquet`, `audiofolder`) or local directory."""
    name: str | None = None
    """Config name (`clean`, `en`)."""
    split: str = "test"
    streaming: bool = False
    """Stream instead of downloading the whole split first."""
    text_column: str | None = None
    """Transcript column (None: the first of TEXT_COLUMNS present)."""
    audio_column: str = "audio"
    data_files: str | list[str] | None = None
    data_dir: str | None = None
    revision: str | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.streaming, str):
            self.streaming = self.streaming.lower() in ("1", "true", "yes")

    @classmethod
    def parse(cls, spec: str | dict) -> HFSpec:
        """`hf:PATH?key=value&...`, `hf:PATH/NAME/SPLIT`, `hf:PATH/SPLIT`, or a dict of fields."""
        if isinstance(spec, dict):
            known = {f.name for f in fields(cls)}
            bad = sorted(set(spec) - known)
            if bad:
                raise ValueError(f"datasets spec {spec}: unknown key(s) {bad}; known: {sorted(known)}")
            return cls(**spec)
        body = spec[3:] if spec.startswith("hf:") else spec
        body, _, query = body.partition("?")
        kw: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=False))
        if query:
            kw["path"] = body
        else:  # shorthand: the last segment is the split, the one before it the config when there are 3 or 4
            parts = body.split("/")
            if len(parts) < 2 or not all(parts):
                raise ValueError(f"datasets spec {spec!r}: write hf:PATH/SPLIT, hf:PATH/NAME/SPLIT, or "
                                 "hf:PATH?split=S&name=N (e.g. hf:librispeech_asr/clean/validation)")
            if len(parts) == 2:
                kw.update(path=parts[0], split=parts[1])
            else:
                kw.update(path="/".join(parts[:-2]), name=parts[-2], split=parts[-1])
        return cls.parse(kw)


# ---------------------------------------------------------------------------------------------
# sources: each yields Items and knows its length when that is cheap


def _manifest_items(manifest: Path, stats: SkipStats) -> tuple[Iterator[Item], int]:
    lines = [(i, line) for i, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]

    def gen() -> Iterator[Item]:
        for lineno, line in lines:
            where = f"{manifest}:{lineno}"
            try:
                entry = json.loads(line)
                audio = entry["audio"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                stats.skip("bad_entry", where, f"not a JSON object with an 'audio' key: {e}")
                continue
            yield Item(id=str(entry.get("id", audio)), text=entry.get("text"), path=manifest.parent / audio)

    return gen(), len(lines)


def _metadata_rows(folder: Path) -> list[dict]:
    if (folder / "metadata.jsonl").is_file():
        text = (folder / "metadata.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _folder_items(folder: Path, stats: SkipStats) -> tuple[Iterator[Item], int]:
    """An audio folder, read by hand rather than by `load_dataset("audiofolder")`: that one fails on a
    metadata row whose file is missing and copies the folder into its cache; we want skips, no copy."""
    if (folder / "manifest.jsonl").is_file():
        return _manifest_items(folder / "manifest.jsonl", stats)
    if not ((folder / "metadata.jsonl").is_file() or (folder / "metadata.csv").is_file()):
        raise FileNotFoundError(f"{folder}: an audio folder needs manifest.jsonl, metadata.jsonl or metadata.csv")
    rows = _metadata_rows(folder)
    column = next((c for c in TEXT_COLUMNS if rows and c in rows[0]), None)
    if rows and ("file_name" not in rows[0] or column is None):
        raise ValueError(f"{folder}: metadata needs a file_name column and one of {list(TEXT_COLUMNS)}; "
                         f"it has {list(rows[0])}")

    def gen() -> Iterator[Item]:
        for row in rows:
            yield Item(id=str(row["file_name"]), text=row.get(column), path=folder / row["file_name"])

    return gen(), len(rows)


def _load_hf(spec: HFSpec):
    """(the `load_dataset` result with `Audio(decode=False)`, its transcript column). datasets 5.x decodes
    (and, for folder and webdataset builders, even encodes) audio only through torchcodec, which we do not
    ship. Parquet datasets (most audio sets on the hub, LibriSpeech included) never touch it; the first row
    is read here so that a dataset that needs it fails now, with a clear message, not mid-run."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=spec.streaming,
                                   data_files=spec.data_files, data_dir=spec.data_dir, revision=spec.revision,
                                   cache_dir=spec.cache_dir)
        columns = list(ds.column_names or ds.features or [])
        if spec.audio_column not in columns:
            raise ValueError(f"{spec.path}: no audio column {spec.audio_column!r} (columns: {columns}); "
                             "set audio_column")
        text_column = spec.text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column not in columns:
            raise ValueError(f"{spec.path}: no transcript column {spec.text_column or list(TEXT_COLUMNS)} "
                             f"(columns: {columns}); set text_column")
        ds = ds.cast_column(spec.audio_column, datasets.Audio(decode=False))
        next(iter(ds), None)
    except (ImportError, datasets.exceptions.DatasetGenerationError) as e:
        if "torchcodec" not in repr(e) + repr(e.__cause__):
            raise
        raise RuntimeError(f"{spec.path}: this datasets builder needs torchcodec to read audio; use a parquet "
                           "dataset, a JSONL manifest or an audio folder path (read without datasets)") from e
    return ds, text_column


def _hf_item(row: dict, i: int, spec: HFSpec, text_column: str) -> Item:
    """Row `i` of a `datasets` split (audio not decoded) as an Item."""
    audio = row[spec.audio_column] or {}
    name = audio.get("path") or f"{spec.path}/{spec.split}/{i}"
    path = Path(audio["path"]) if audio.get("path") and not audio.get("bytes") else None
    return Item(id=str(row.get("id", name)), text=row[text_column], path=path, data=audio.get("bytes"))


def _hf_items(spec: HFSpec) -> tuple[Iterator[Item], int | None]:
    ds, text_column = _load_hf(spec)
    items = (_hf_item(row, i, spec, text_column) for i, row in enumerate(ds))
    return items, None if spec.streaming else len(ds)


def open_items(data: str | Path | dict, stats: SkipStats) -> tuple[Iterator[Item], int | None]:
    """The raw items of DATA (see the module docstring) and their number when known."""
    if isinstance(data, dict) or (isinstance(data, str) and data.startswith("hf:")):
        spec = HFSpec.parse(data)
        if spec.path == "audiofolder" and spec.data_dir:  # datasets' own would need torchcodec (above)
            return _folder_items(Path(spec.data_dir).expanduser(), stats)
        return _hf_items(spec)
    path = Path(data).expanduser()
    if path.is_dir():
        return _folder_items(path, stats)
    if path.is_file():
        return _manifest_items(path, stats)
    raise FileNotFoundError(f"{data}: no such manifest or audio folder (DATA is a JSONL manifest, an audio "
                            "folder, or a datasets spec such as hf:librispeech_asr/clean/validation)")


# ---------------------------------------------------------------------------------------------
# validation: Item -> example or a counted skip


def check_item(item: Item, stats: SkipStats, tokenizer=None, max_seconds: float = MAX_SECONDS,
               max_label_length: int = MAX_LABEL_LENGTH) -> dict | None:
    """Decode and validate one item: the example, or None after `stats.skip` (transcript checks first:
    they are cheap and spare decoding a clip that would be dropped anyway)."""
    text = str(item.text).strip() if item.text is not None else ""
    if not text:
        stats.skip("empty_text", item.id)
        return None
    if tokenizer is not None:
        n = len(tokenizer(text).input_ids)
        if n > max_label_length:
            stats.skip("text_too_long", item.id, f"{n} tokens > {max_label_length}")
            return None
    if item.data is None and (item.path is None or not item.path.exists()):
        stats.skip("missing", item.id, f"{item.path}: no such file")
        return None
    try:
        audio = decode_audio(item.data, item.id) if item.data is not None else load_audio(item.path)
    except AudioError as e:
        stats.skip("unreadable", item.id, e.reason)
        return None
    seconds = len(audio) / SAMPLING_RATE
    if len(audio) == 0:
        stats.skip("empty_audio", item.id)
    elif seconds > max_seconds:
        stats.skip("too_long", item.id, f"{seconds:.1f} s > {max_seconds:g} s")
    elif float(np.abs(audio).max()) < SILENCE_PEAK:
        stats.skip("silent", item.id, f"peak {float(np.abs(audio).max()):.1e}")
    else:
        return {"id": item.id, "audio": audio, "text": text}
    return None


def _examples(items: Iterator[Item], name, stats: SkipStats, tokenizer, limit, max_seconds, max_label_length
              ) -> Iterator[dict]:
    n = 0
    for item in items:
        if limit is not None and n >= limit:
            break
        example = check_item(item, stats, tokenizer, max_seconds, max_label_length)
        if example is not None:
            n += 1
            yield example
    log.info("%s: %d examples, %s", name, n, stats)


def iter_examples(data: str | Path | dict, stats: SkipStats | None = None, tokenizer=None, limit: int | None = None,
                  max_seconds: float = MAX_SECONDS, max_label_length: int = MAX_LABEL_LENGTH) -> Iterator[dict]:
    """Yield up to LIMIT good examples of DATA, counting the bad ones in STATS (pass one to read it after)."""
    stats = stats if stats is not None else SkipStats()
    items, _ = open_items(data, stats)
    yield from _examples(items, data, stats, tokenizer, limit, max_seconds, max_label_length)


def open_eval_source(data: str | Path | dict, limit: int | None = None, tokenizer=None,
                     max_seconds: float = MAX_SECONDS) -> tuple[Iterator[dict], SkipStats, int | None]:
    """(lazy examples, their SkipStats, the item count for a progress bar or None): stats fill as it runs."""
    stats = SkipStats()
    items, total = open_items(data, stats)
    if total is not None and limit is not None:
        total = min(total, limit)
    return _examples(items, data, stats, tokenizer, limit, max_seconds, MAX_LABEL_LENGTH), stats, total


def load_examples(data: str | Path | dict, tokenizer=None, limit: int | None = None, **kw
                  ) -> tuple[list[dict], SkipStats]:
    """All good examples of DATA in memory (for training) and the SkipStats."""
    stats = SkipStats()
    return list(iter_examples(data, stats, tokenizer=tokenizer, limit=limit, **kw)), stats


# ---------------------------------------------------------------------------------------------
# training: features, labels, collation


def features_and_labels(audio: np.ndarray, text: str, processor, features: bool = True) -> dict[str, torch.Tensor]:
    """One training example: `input_features` (n_mels, 3000) log-mel (or, with `features=False`, the raw
    `audio`, for `DeviceFeatures` to featurize on the training device) and `labels`, the tokenizer's ids."""
    out = {"labels": torch.tensor(processor.tokenizer(text).input_ids, dtype=torch.long),
           # mel frames the audio spans (the rest is padding): what a model with an audio window encodes
           "audio_frames": torch.tensor(clip_frames(audio, processor.feature_extractor.hop_length))}
    if features:
        feats = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="np").input_features[0]
        out["input_features"] = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    else:
        out["audio"] = torch.from_numpy(audio)
    return out


class SpeechDataset(torch.utils.data.Dataset):
    """Examples held in memory -> `{"input_features": (n_mels, 3000) float, "labels": LongTensor}`
    (calibration batches and benchmarks; training reads `LazySpeechDataset` / `StreamingSpeechDataset`).

    Labels are `tokenizer(text).input_ids`, as in HF's Whisper fine-tuning: the tokenizer's prefix
    (`<|startoftranscript|>` [+ `<|en|><|transcribe|>`] + `<|notimestamps|>`), the text, `<|endoftext|>`.
    With `cache=True` each example's features are computed once and kept (about 1 MB each at 80 mels).
    """

    def __init__(self, examples: list[dict], processor, cache: bool = True):
        self.examples, self.processor, self.cache = examples, processor, cache
        self._cached: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._cached:
            return self._cached[i]
        ex = self.examples[i]
        out = features_and_labels(ex["audio"], ex["text"], self.processor)
        if self.cache:
            self._cached[i] = out
        return out


def _train_example(item: Item, processor, features: bool, max_seconds: float, index: int,
                   augmentation: Augmentation | None = None) -> dict:
    """Decode, check, augment and featurize one item in a DataLoader worker: the example, or `{"skip": reason}`
    (logged there; `SpeechCollator` drops it and counts it in the batch, so the count reaches the
    training process whichever worker saw the item)."""
    stats = SkipStats()
    ex = check_item(item, stats, processor.tokenizer, max_seconds)
    if ex is None:
        return {"skip": next(iter(stats.by_reason))}
    audio = ex["audio"] if augmentation is None else augmentation(ex["audio"], index)
    return {"id": ex["id"], **features_and_labels(audio, ex["text"], processor, features)}


class LazySpeechDataset(torch.utils.data.Dataset):
    """A map-style training set that holds only its items (ids, transcripts, paths or row numbers); each
    `__getitem__` decodes and featurizes in the DataLoader worker that asks for it. The sampler shards it
    across processes (`train.loop`). `lengths()` (transcript characters) feeds the length bucketing."""

    def __init__(self, items, processor, features: bool = True, max_seconds: float = MAX_SECONDS,
                 texts: list[str | None] | None = None, augmentation: Augmentation | None = None):
        self.items, self.processor, self.features, self.max_seconds = items, processor, features, max_seconds
        self._texts, self.augmentation = texts, augmentation

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the augmentation draws for (workers copy the dataset when an epoch's iterator starts)."""
        if self.augmentation is not None:
            self.augmentation.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        return _train_example(self.items[i], self.processor, self.features, self.max_seconds, i, self.augmentation)

    def lengths(self) -> list[int]:
        texts = self._texts if self._texts is not None else [it.text for it in self.items]
        return [len(str(t or "")) for t in texts]


class _HFRows:
    """Rows of a (memory-mapped) `datasets.Dataset` as Items, read only when asked for."""

    def __init__(self, ds, spec: HFSpec, text_column: str):
        self.ds, self.spec, self.text_column = ds, spec, text_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Item:
        return _hf_item(self.ds[int(i)], int(i), self.spec, self.text_column)


class StreamingSpeechDataset(torch.utils.data.IterableDataset):
    """A streamed `datasets` split, decoded and featurized row by row in the DataLoader workers.

    `for_process(rank, world)` keeps this process's part (`datasets.distributed.split_dataset_by_node`:
    whole shards when their number divides by the world size, else every world-th row); `datasets` then
    splits the shards among the DataLoader workers. `state_dict()` is the stream's own position, which
    torchdata's StatefulDataLoader collects from each worker, so a resumed run continues at the next row.
    The stream is read in its stored order: a `datasets` shuffle buffer is not part of that state (it is
    refilled on resume), so shuffling would make resumed runs differ; shuffle the corpus when writing it.
    Every row yields one output (a bad one `{"skip": reason}`), so the position counts rows, good or bad.
    """

    def __init__(self, ds, spec: HFSpec, text_column: str, processor, features: bool = True,
                 max_seconds: float = MAX_SECONDS, augmentation: Augmentation | None = None):
        self.ds, self.spec, self.text_column = ds, spec, text_column
        self.processor, self.features, self.max_seconds = processor, features, max_seconds
        self.augmentation = augmentation

    def for_process(self, rank: int, world: int) -> StreamingSpeechDataset:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.ds, rank=rank, world_size=world) if world > 1 else self.ds
        aug = None if self.augmentation is None else Augmentation(self.augmentation.config,
                                                                  self.augmentation.seed, part=rank)
        return StreamingSpeechDataset(ds, self.spec, self.text_column, self.processor, self.features,
                                      self.max_seconds, aug)

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)
        if self.augmentation is not None:
            self.augmentation.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        for i, row in enumerate(self.ds):
            yield _train_example(_hf_item(row, i, self.spec, self.text_column), self.processor, self.features,
                                 self.max_seconds, i, self.augmentation)

    def state_dict(self) -> dict:
        return self.ds.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ds.load_state_dict(state)


def open_train_source(data: str | Path | dict, processor, limit: int | None = None, features: bool = True,
                      max_seconds: float = MAX_SECONDS, augment: AugmentConfig | None = None, seed: int = 0
                      ) -> tuple[LazySpeechDataset | StreamingSpeechDataset, SkipStats]:
    """DATA as a lazy training set, and the SkipStats of what was dropped while indexing it (manifest lines
    that are not entries). Nothing is decoded here; `limit` keeps the first LIMIT items (good or bad).
    `augment` (when enabled) transforms each clip's waveform as it is decoded, drawn from (seed, epoch, item)."""
    stats = SkipStats()
    aug = Augmentation(augment, seed) if augment is not None and augment.enabled else None
    if isinstance(data, dict) or (isinstance(data, str) and data.startswith("hf:")):
        spec = HFSpec.parse(data)
        if not (spec.path == "audiofolder" and spec.data_dir):
            ds, text_column = _load_hf(spec)
            if spec.streaming:
                ds = ds.take(limit) if limit is not None else ds
                return StreamingSpeechDataset(ds, spec, text_column, processor, features, max_seconds, aug), stats
            if limit is not None:
                ds = ds.select(range(min(limit, len(ds))))
            return LazySpeechDataset(_HFRows(ds, spec, text_column), processor, features, max_seconds,
                                     texts=ds[text_column], augmentation=aug), stats
    items, _ = open_items(data, stats)
    items = list(itertools.islice(items, limit))
    return LazySpeechDataset(items, processor, features, max_seconds, augmentation=aug), stats


def frame_weights(audio_frames, encoder_frames: int, pad_weight: float):
    """(B, encoder_frames) weights of a batch's encoder frames: 1 where the clip's audio is, `pad_weight` on
    the frames past its end (each encoder frame is two mel frames). A 5 s clip in Whisper's 30 s window is
    250 frames of speech and 1,250 of padding: a sum over all frames is mostly about the padding, which
    `pad_weight` < 1 turns down. None when every frame weighs 1 or the lengths are unknown."""
    if pad_weight == 1.0 or audio_frames is None:
        return None
    frames = torch.as_tensor(audio_frames)
    speech = -(-frames.reshape(-1, 1) // 2)  # encoder frames holding audio, per clip
    inside = torch.arange(encoder_frames, device=frames.device).reshape(1, -1) < speech  # on the batch's device
    return torch.where(inside, 1.0, float(pad_weight))


@dataclass
class SpeechCollator:
    """Stack features (or raw audio, zero-padded to the longest: see `DeviceFeatures`); pad labels with -100
    (ignored by the loss); stack each item's `audio_frames`; drop a leading decoder-start token, which the model prepends itself when it
    shifts labels right (HF's DataCollatorSpeechSeq2SeqWithPadding). Items a lazy dataset could not use
    (`{"skip": reason}`) are left out and counted in `skipped`, one entry per REASONS; `ids` names the rest."""

    decoder_start_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        skipped = torch.zeros(len(REASONS), dtype=torch.long)
        for b in batch:
            if "skip" in b:
                skipped[REASONS.index(b["skip"])] += 1
        batch = [b for b in batch if "skip" not in b]
        labels = torch.nn.utils.rnn.pad_sequence([b["labels"] for b in batch], batch_first=True,
                                             padding_value=IGNORE_INDEX) if batch else \
            torch.zeros(0, 0, dtype=torch.long)
        if labels.shape[1] and bool((labels[:, 0] == self.decoder_start_token_id).all()):
            labels = labels[:, 1:]
        out = {"labels": labels}
        if batch and "audio" in batch[0]:
            out["audio"] = torch.nn.utils.rnn.pad_sequence([b["audio"] for b in batch], batch_first=True)
        else:
            out["input_features"] = torch.stack([b["input_features"] for b in batch]) if batch else \
                torch.zeros(0, 0, 0)
        if batch and "audio_frames" in batch[0]:
            out["audio_frames"] = torch.stack([b["audio_frames"] for b in batch])
        if batch and "id" in batch[0] or skipped.any():  # a lazy dataset's batch
            out["ids"] = [b["id"] for b in batch]
            out["skipped"] = skipped
        return out


class DeviceFeatures:
    """Log-mel features of a batch of raw audio on the training device, through the feature extractor's
    torch path (`device=`): for GPU training, where the workers then only decode. The extractor pads every
    clip with zeros to 30 s itself, so the collator's padding to the longest clip changes nothing."""

    def __init__(self, processor):
        self.fe = processor.feature_extractor

    def __call__(self, audio: torch.Tensor, device) -> torch.Tensor:
        clips = list(audio.float().cpu().numpy())
        if not clips:
            return torch.zeros(0, self.fe.feature_size, self.fe.nb_max_frames, device=device)
        feats = self.fe(clips, sampling_rate=SAMPLING_RATE, return_tensors="pt", device=str(device)).input_features
        return feats.to(device)


def make_collator(processor, decoder_start_token_id: int | None = None) -> Callable[[list[dict]], dict]:
    """The collator for PROCESSOR's model; decoder start defaults to `<|startoftranscript|>`."""
    if decoder_start_token_id is None:
        decoder_start_token_id = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    return SpeechCollator(int(decoder_start_token_id))

