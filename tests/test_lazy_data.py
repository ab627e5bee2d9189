"""Training data read lazily (slim.data.open_train_source) through the training loop: DataLoader workers,
shards per process, skipped items counted, exact resume after kill -9, streamed `datasets` sources.

The runs use the tiny random Whisper with the real tiny.en tokenizer on short tones written to disk, one of
them a corrupt file, so every item is decoded and featurized in a DataLoader worker as in a real run.
Under __main__ this file is the worker the kill and two-process tests start in subprocesses.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from slim.audio import SAMPLING_RATE  # noqa: E402
from slim.data import (DeviceFeatures, LazySpeechDataset, StreamingSpeechDataset, make_collator,  # noqa: E402
                       open_train_source)
from train.loop import KILL_ENV, EpochSampler, TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def tone(i: int, seconds: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    return (0.3 * np.sin(2 * np.pi * (200 + 37 * i) * t)).astype(np.float32)


def write_manifest(folder: Path, n: int, corrupt: tuple[int, ...] = ()) -> Path:
    """n utterances `u00`..., a tone each; the ones in `corrupt` are files soundfile cannot read."""
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / "wav" / f"u{i:02d}.wav"
        if i in corrupt:
            path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
        else:
            sf.write(str(path), tone(i), SAMPLING_RATE)
        rows.append({"id": f"u{i:02d}", "audio": f"wav/{path.name}", "text": " ".join(WORDS[: 1 + i % 6])})
    m = folder / "manifest.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m


def write_parquet(folder: Path, files: int, rows: int, corrupt: tuple[int, ...] = ()) -> dict:
    """A local stand-in for a hub dataset: `files` parquet files (the stream's shards) of `rows` rows each,
    audio stored as encoded bytes; row numbers in `corrupt` (counted over all files) hold garbage bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        audio, ids, text = [], [], []
        for r in range(rows):
            k = f * rows + r
            b = io.BytesIO()
            sf.write(b, tone(k), SAMPLING_RATE, format="WAV")
            audio.append({"bytes": b"garbage" if k in corrupt else b.getvalue(), "path": f"s{k:02d}.wav"})
            ids.append(f"s{k:02d}")
            text.append(" ".join(WORDS[: 1 + k % 6]))
        paths.append(str(folder / f"part-{f}.parquet"))
        pq.write_table(pa.table({"audio": audio, "text": text, "id": ids}), paths[-1])
    return {"path": "parquet", "data_files": paths, "split": "train", "streaming": True,
            "cache_dir": str(folder / "cache")}


@pytest.fixture(scope="module")
def processor():
    from slim.sources import tiny_random_processor

    return tiny_random_processor()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit use one thread (and the machine has 2 cores)
    yield
    torch.set_num_threads(n)


def run_lazy(data, out, steps, save_every=2, num_workers=2, batch_size=2, resume=False, on_batch=None,
             augment=False):
    """The run the tests compare: tiny random Whisper, lazy data through DataLoader workers (`augment`: every
    transform of slim.augment on every clip)."""
    from slim.augment import AugmentConfig
    from slim.sources import tiny_random_processor, tiny_random_whisper

    proc = tiny_random_processor()
    aug = AugmentConfig(enabled=True, speed_p=1.0, reverb_p=1.0, lowpass_p=1.0, noise_p=1.0) if augment else None
    ds, _ = open_train_source(data, proc, augment=aug, seed=0)
    model = tiny_random_whisper(seed=0)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-3, warmup_steps=1, save_every=save_every,
                      keep_last=2, log_every=1, num_workers=num_workers)
    r = train(model, cfg, ds, make_collator(proc), out, resume=resume, on_batch=on_batch)
    return model, r


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    e.pop("WANDB_MODE", None)
    return e


def run_killed(data, out: Path, steps: int, kill_at: int, augment: bool = False) -> None:
    """This file's worker in a subprocess, SIGKILLed by the loop's test hook right after step `kill_at`."""
    arg = json.dumps(data) if isinstance(data, dict) else str(data)
    proc = subprocess.run([sys.executable, __file__, arg, str(out), "--steps", str(steps)]
                          + (["--augment"] if augment else []),
                          env=dict(env(), **{KILL_ENV: f"train:{kill_at}"}), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# pieces


def test_open_train_source_decodes_nothing_and_the_collator_counts_what_workers_skip(tmp_path, processor):
    m = write_manifest(tmp_path, 4, corrupt=(1,))
    (tmp_path / "wav" / "u02.wav").unlink()  # missing: noticed only when the item is drawn
    with open(m, "a") as f:
        f.write("{not json\n")
    ds, stats = open_train_source(m, processor)
    assert isinstance(ds, LazySpeechDataset) and len(ds) == 4
    assert stats.as_dict() == {"bad_entry": 1}  # the one thing indexing can tell
    assert ds.lengths() == [3, 7, 13, 18]  # transcript characters, from the index
    items = [ds[i] for i in range(4)]
    assert [x.get("skip") for x in items] == [None, "unreadable", "missing", None]
    batch = make_collator(processor)(items)
    assert batch["ids"] == ["u00", "u03"] and batch["input_features"].shape == (2, 80, 3000)
    assert batch["skipped"].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]  # slim.data.REASONS: missing, unreadable
    assert batch["labels"].tolist()[0][:2] == [50362, 505]  # notimestamps, "one"
    empty = make_collator(processor)([items[1]])
    assert empty["labels"].shape[0] == 0 and empty["ids"] == [] and int(empty["skipped"].sum()) == 1
    ds, _ = open_train_source(m, processor, limit=2)
    assert len(ds) == 2


def test_device_features_match_the_workers_features(tmp_path, processor):
    m = write_manifest(tmp_path, 2)
    on_workers, _ = open_train_source(m, processor)
    raw, _ = open_train_source(m, processor, features=False)
    collate = make_collator(processor)
    want = collate([on_workers[0], on_workers[1]])["input_features"]
    batch = collate([raw[0], raw[1]])
    assert "input_features" not in batch and batch["audio"].shape == (2, len(tone(0)))
    got = DeviceFeatures(processor)(batch["audio"], torch.device("cpu"))
    assert got.shape == want.shape == (2, 80, 3000)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # the extractor's torch path vs its numpy one


def test_length_buckets_sort_each_window_and_keep_the_epoch_a_permutation():
    lengths = [(7 * i) % 23 for i in range(22)]
    s = EpochSampler(22, seed=3, lengths=lengths, batch_size=4, buckets=2)
    order = list(s)
    assert sorted(order) == list(range(22)) and order == list(s)  # a permutation, the same every time
    plain = list(EpochSampler(22, seed=3))
    for start in range(0, 22, 8):  # each window holds the same items as the plain order's window, sorted
        window, batches = plain[start:start + 8], order[start:start + 8]
        assert sorted(window) == sorted(batches)
        by_len = sorted(window, key=lengths.__getitem__)
        full = [by_len[i:i + 4] for i in range(0, len(by_len), 4) if len(by_len[i:i + 4]) == 4]
        got = [batches[i:i + 4] for i in range(0, len(batches), 4) if len(batches[i:i + 4]) == 4]
        assert sorted(map(tuple, got)) == sorted(map(tuple, full))
    assert order[-2:] == sorted(plain[16:], key=lengths.__getitem__)[-2:]  # the short last batch stays last
    s.set_epoch(1)
    assert list(s) != order


def test_recipe_refuses_length_buckets_on_a_stream_and_too_many_workers():
    from train.config_io import ConfigError
    from train.recipe import DataConfig, Recipe, StageConfig

    stage = StageConfig(name="recover", kind="recover", train=TrainConfig(length_buckets=4))
    with pytest.raises(ConfigError, match="stages.recover.train.length_buckets"):
        Recipe(output_dir="x", data=DataConfig(train="hf:corpus?split=train&streaming=1", eval="e.jsonl"),
               stages=[stage])
    Recipe(output_dir="x", data=DataConfig(train="hf:corpus/train", eval="e.jsonl"), stages=[stage])
    with pytest.raises(ValueError, match="num_workers"):
        TrainConfig(num_workers=4 * (os.cpu_count() or 1) + 1)


# ---------------------------------------------------------------------------------------------
# training: skips, exact resume with workers, streaming


def test_a_micro_batch_of_only_bad_items_is_a_zero_loss_step(tmp_path):
    """Batch 1 over 3 items, the middle one corrupt: that step trains on nothing (loss exactly 0, counted),
    the others on their item; the run neither crashes nor leaves the step out."""
    m = write_manifest(tmp_path / "d", 3, corrupt=(1,))
    seen: list[list[str]] = []
    _, r = run_lazy(m, tmp_path / "run", steps=3, save_every=0, num_workers=0, batch_size=1,
                    on_batch=lambda b: seen.append(b["ids"]))
    bad = [i for i, ids in enumerate(seen) if not ids]
    assert len(bad) == 1 and sorted(sum(seen, [])) == ["u00", "u02"]
    assert r.losses[bad[0]] == 0.0 and all(x > 0 for i, x in enumerate(r.losses) if i != bad[0])
    assert r.skipped == {"unreadable": 1}


N_MAP = 10  # 9 good tones and one corrupt file; batch 2: 5 batches an epoch, 10 steps = 2 epochs


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), N_MAP, corrupt=(4,))


def test_kill_9_mid_epoch_then_resume_with_2_workers_is_bit_identical(manifest, tmp_path):
    """The corrupt file is decoded in a worker, skipped and counted once per epoch, never a crash; killed
    at step 3 (checkpoint 2, the middle of epoch 0) and resumed, the run ends bit-identical to an
    uninterrupted one, with the same count."""
    ref_model, ref = run_lazy(manifest, tmp_path / "whole", steps=10)
    assert ref.skipped == {"unreadable": 2}
    from train.tracking import read_metrics

    recs = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert recs[-1]["skipped"] == 2 and recs[0].get("skipped", 0) <= 1

    out = tmp_path / "cut"
    run_killed(manifest, out, steps=10, kill_at=3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    model, r = run_lazy(manifest, out, steps=10, resume=True)
    assert (r.start_step, r.steps_run) == (2, 8)
    assert r.losses == ref.losses[2:]
    assert r.skipped == {"unreadable": 2}
    assert_same_weights(weights(model), weights(ref_model))


def test_augmented_run_killed_and_resumed_is_bit_identical(manifest, tmp_path):
    """Augmentation draws from (seed, epoch, item) in whichever worker decodes the item: 10 steps (two
    epochs) killed at step 5 and resumed from step 4 (checkpoint 4, then the start of epoch 1) end bit-identical to the uninterrupted
    augmented run, which trains on other inputs than the plain run (other losses from the first step)."""
    def recorder(seen):  # every item's features, one entry per epoch it was drawn in
        def on_batch(b):
            for i, x in zip(b["ids"], b["input_features"]):
                seen.setdefault(i, []).append(x.clone())
        return on_batch

    plain_seen, aug_seen = {}, {}
    plain_model, plain = run_lazy(manifest, tmp_path / "plain", steps=10, save_every=0, on_batch=recorder(plain_seen))
    ref_model, ref = run_lazy(manifest, tmp_path / "whole", steps=10, augment=True, on_batch=recorder(aug_seen))
    assert all(a != b for a, b in zip(ref.losses, plain.losses))
    # the loop tells the dataset the epoch: each clip is drawn anew in epoch 1, a plain clip is the same
    assert sorted(aug_seen) == sorted(plain_seen) and all(len(v) == 2 for v in aug_seen.values())
    assert all(torch.equal(*plain_seen[i]) for i in plain_seen)
    assert not any(torch.equal(*aug_seen[i]) for i in aug_seen)
    out = tmp_path / "cut"
    run_killed(manifest, out, steps=10, kill_at=5, augment=True)
    model, r = run_lazy(manifest, out, steps=10, resume=True, augment=True)
    assert (r.start_step, r.losses) == (4, ref.losses[4:])
    assert_same_weights(weights(model), weights(ref_model))


def test_streamed_parquet_trains_skips_and_resumes_bit_identical(tmp_path):
    """A streamed `datasets` source (two local parquet shards of 5 rows, one row garbage) with 2 workers:
    each worker reads one shard, 2 batches of 2 each (the fifth row is dropped with the partial batch),
    so 4 batches an epoch; 6 steps cross into epoch 1. Killed at step 3 and resumed from step 2, the
    StatefulDataLoader puts every worker back at its row: bit-identical, same skip count."""
    spec = write_parquet(tmp_path / "pq", files=2, rows=5, corrupt=(1,))
    seen: list[list[str]] = []
    ref_model, ref = run_lazy(spec, tmp_path / "whole", steps=6, on_batch=lambda b: seen.append(b["ids"]))
    # worker 0 reads part-0 (rows s00-s04), worker 1 part-1 (s05-s09); batches alternate between them
    assert seen[:4] == [["s00"], ["s05", "s06"], ["s02", "s03"], ["s07", "s08"]]
    assert seen[4:] == seen[:2]  # epoch 1 starts again at the top of each shard
    assert ref.skipped == {"unreadable": 2}
    out = tmp_path / "cut"
    run_killed(spec, out, steps=6, kill_at=3)
    again: list[list[str]] = []
    model, r = run_lazy(spec, out, steps=6, resume=True, on_batch=lambda b: again.append(b["ids"]))
    assert again == seen[2:]
    assert (r.start_step, r.losses) == (2, ref.losses[2:])
    assert r.skipped == {"unreadable": 2}
    assert_same_weights(weights(model), weights(ref_model))


def test_streaming_dataset_is_split_between_processes(tmp_path, processor):
    spec = write_parquet(tmp_path / "pq", files=3, rows=2)
    ds, _ = open_train_source(spec, processor)
    assert isinstance(ds, StreamingSpeechDataset)
    parts = [[x["id"] for x in ds.for_process(rank, 2)] for rank in range(2)]
    assert not set(parts[0]) & set(parts[1])  # 3 shards for 2 processes: every other row each
    assert sorted(parts[0] + parts[1]) == [f"s{k:02d}" for k in range(6)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_see_disjoint_shards_whose_union_is_the_epoch(tmp_path):
    """`accelerate launch` with 2 CPU processes: one epoch of a 16-item manifest (batch 2: 4 steps) and
    of a streamed 2-shard parquet (12 rows: 3 steps), every item id each process trained on recorded."""
    m = write_manifest(tmp_path / "m", 16)
    spec = write_parquet(tmp_path / "pq", files=2, rows=6)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           __file__, str(m), str(tmp_path / "map"), "--steps", "4", "--record-ids", "--then", json.dumps(spec),
           str(tmp_path / "stream"), "3"]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for run, n, prefix in (("map", 16, "u"), ("stream", 12, "s")):
        ids = [json.loads((tmp_path / run / f"ids-{rank}.json").read_text()) for rank in range(2)]
        assert all(len(x) == n // 2 for x in ids), ids
        assert not set(ids[0]) & set(ids[1])
        assert sorted(ids[0] + ids[1]) == [f"{prefix}{k:02d}" for k in range(n)]
    # the streamed shards are whole files per process (2 files, 2 processes), read in order
    assert json.loads((tmp_path / "stream" / "ids-0.json").read_text()) == [f"s{k:02d}" for k in range(6)]


# ---------------------------------------------------------------------------------------------
# the worker


def _worker(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", help="a manifest path or a JSON datasets spec")
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--record-ids", action="store_true", help="write the ids each process trained on")
    p.add_argument("--augment", action="store_true", help="augment the training audio (run_lazy)")
    p.add_argument("--then", nargs=3, metavar=("DATA", "OUT", "STEPS"), help="a second run in the same processes")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from train.loop import distributed_state

    state = distributed_state()
    runs = [(a.data, a.out, a.steps)] + ([(a.then[0], a.then[1], int(a.then[2]))] if a.then else [])
    for data, out, steps in runs:
        data = json.loads(data) if data.startswith("{") else data
        ids: list[str] = []
        run_lazy(data, out, steps=steps, save_every=0 if a.record_ids else 2, on_batch=lambda b: ids.extend(b["ids"]),
                 augment=a.augment)
        if a.record_ids:
            Path(out, f"ids-{state.process_index}.json").write_text(json.dumps(ids))
    state.destroy_process_group()


if __name__ == "__main__":
    _worker()
