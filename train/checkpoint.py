"""Trainer checkpoints: one place for resumable state, written atomically, validated on resume.

A checkpoint is what `accelerator.save_state` writes (model weights as safetensors, optimizer, gradient
scaler, per-process RNG, and every object registered with `register_for_checkpointing`: the `TrainState`
below, the LR scheduler, and any extra state such as QAT observers), plus a `COMPLETE` manifest written
last (file list with sizes, the step, the registered objects). It is written into
`checkpoints/.tmp-<uuid>` and renamed to `checkpoints/step-00000050` only when whole, so a crash or
`kill -9` leaves either the old set of checkpoints or the new one, never half of one. The folder name is
for humans: the step always comes from the train state (via the manifest), never from the name.

Model weights are safetensors. Accelerate writes the optimizer, RNG and registered objects' states with
torch.save; they are plain dicts of tensors and numbers (the optimizer and RNG files are read back with
`weights_only=True`, the registered objects by Accelerate without it). No module is ever pickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slim.io import atomic_dir, replace_dir

log = logging.getLogger("whisper_slim")

MANIFEST = "COMPLETE"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable checkpoint could be loaded."""


# ---------------------------------------------------------------------------------------------
# the train state


@dataclass
class TrainState:
    """Everything about the run's position that is not in the model, optimizer or scheduler."""

    stage: str = "train"
    """The stage this state belongs to (a checkpoint from another stage is refused)."""
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Passes over the training data started."""
    batches_seen: int = 0
    """Batches this process has drawn from its shard of the data in the current epoch."""
    best_metric: float | None = None
    """Lowest evaluation metric seen so far (see TrainConfig.best_metric)."""
    best_step: int | None = None
    """The step at which best_metric was measured."""
    processes: list[dict] | None = None
    """Per process (by index), what differs between processes: its epoch and batches drawn (a streamed
    shard's length is its own), its count of skipped items, and its streaming loader's state (torchdata
    `StatefulDataLoader.state_dict()`, which holds each worker's position in the stream). Gathered onto
    the main process before each checkpoint, since only the main process writes this object."""

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "epoch": self.epoch, "batches_seen": self.batches_seen,
                "best_metric": self.best_metric, "best_step": self.best_step, "processes": self.processes}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d["stage"] != self.stage:
            raise CheckpointError(f"checkpoint belongs to stage '{d['stage']}', not '{self.stage}'")
        self.step, self.epoch, self.batches_seen = int(d["step"]), int(d["epoch"]), int(d["batches_seen"])
        self.best_metric, self.best_step = d["best_metric"], d["best_step"]
        self.processes = d.get("processes")


# ---------------------------------------------------------------------------------------------
# reading checkpoints


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint `path`, after checking every listed file is there with its size.

    Raises CheckpointError saying what is wrong (missing marker, bad JSON, missing or truncated file).
    """
    marker = Path(path) / MANIFEST
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} marker (incomplete checkpoint)")
    try:
        m = json.loads(marker.read_text())
        files, step = m["files"], int(m["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} manifest ({e.__class__.__name__}: {e})") from None
    for name, size in files.items():
        f = Path(path) / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: file {name} has {f.stat().st_size} bytes, the manifest says {size}")
    m["step"] = step
    return m


def list_checkpoints(root: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """(valid, bad): valid checkpoints as (path, manifest) sorted by step, oldest first; bad ones with the
    reason. Temporary `.tmp-*` folders are ignored."""
    valid, bad = [], []
    if not Path(root).is_dir():
        return valid, bad
    for p in sorted(Path(root).iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            valid.append((p, read_manifest(p)))
        except CheckpointError as e:
            bad.append((p, str(e)))
    valid.sort(key=lambda pm: pm[1]["step"])
    return valid, bad


# ---------------------------------------------------------------------------------------------
# writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_ok(accelerator, err: BaseException | None) -> str | None:
    """Share a per-process error across processes: the first error message, or None when all succeeded."""
    msg = None if err is None else f"process {accelerator.process_index}: {err.__class__.__name__}: {err}"
    if accelerator.num_processes == 1:
        return msg
    from accelerate.utils import gather_object

    msgs = [m for m in gather_object([msg]) if m is not None]
    return msgs[0] if msgs else None


def save_checkpoint(accelerator, root: Path, state: TrainState, object_names: list[str], keep_last: int) -> Path:
    """Write a checkpoint of everything `accelerator` tracks at `state.step`; all processes call this.

    On any error (disk full, permission denied, ...) the temporary folder is removed, the existing
    checkpoints are left as they were, and CheckpointError is raised on every process.
    """
    root = Path(root)
    final = root / checkpoint_name(state.step)
    from accelerate.utils import broadcast_object_list

    name = [f".tmp-{uuid.uuid4().hex[:12]}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    tmp = root / name[0]

    err: BaseException | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as e:  # noqa: BLE001 (reported below, on every process)
        err = e
    failure = _all_ok(accelerator, err)

    if failure is None and accelerator.is_main_process:
        try:
            files = {}
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    _fsync(f)
                    files[str(f.relative_to(tmp))] = f.stat().st_size
            manifest = {"format": FORMAT, "step": state.step, "stage": state.stage, "epoch": state.epoch,
                        "num_processes": accelerator.num_processes, "objects": object_names,
                        "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
            with open(tmp / MANIFEST, "w") as f:  # written last: its presence means "complete"
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            replace_dir(tmp, final)  # over a stale or corrupt folder of the same step, if any
            _fsync(root)
        except Exception as e:  # noqa: BLE001
            err = e
    if accelerator.num_processes > 1:
        box = [None if err is None else f"{err.__class__.__name__}: {err}"]
        broadcast_object_list(box)  # the main process's verdict on the finishing steps
        failure = failure or box[0]
    elif failure is None and err is not None:
        failure = f"{err.__class__.__name__}: {err}"

    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise CheckpointError(f"could not write the checkpoint of step {state.step} to {final}: {failure}. "
                              "The previous checkpoints are untouched.")
    if accelerator.is_main_process:
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`; returns what was deleted.
    Bad (incomplete/corrupt) folders are left for inspection; resume skips them."""
    valid, _ = list_checkpoints(root)
    gone = [p for p, _ in valid[:-keep_last]] if keep_last > 0 else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def clean_temp(root: Path) -> None:
    """Remove `.tmp-*`/`.old-*` folders left by a process killed while writing."""
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# resuming


def load_latest(accelerator, root: Path, state: TrainState, object_names: list[str]) -> Path | None:
    """Load the newest complete and loadable checkpoint under `root` into everything `accelerator` tracks.

    A corrupt newest checkpoint (missing marker, bad manifest, missing/truncated file, or a load error) is
    reported with a warning and the one before it is tried. Returns the checkpoint used, or None when
    there is none (temporary folders of a write cut short do not count). Raises CheckpointError when
    checkpoints exist but none can be loaded, or when they were written by a run with a different setup
    (process count, registered objects).
    """
    from accelerate.utils import broadcast_object_list

    box = [list_checkpoints(root)]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)  # every process takes the main process's view of the folder
    valid, bad = box[0]
    if accelerator.is_main_process:
        for p, why in bad:
            log.warning("skipping checkpoint %s: %s", p, why)
    tried_one = False
    for path, m in reversed(valid):
        if m.get("num_processes", 1) != accelerator.num_processes:
            raise CheckpointError(f"{path} was written by {m['num_processes']} processes; resume with the same "
                                  f"number (now {accelerator.num_processes}): the data position is per process")
        if m.get("objects") != object_names:
            raise CheckpointError(f"{path} holds state for {m.get('objects')}, this run registers {object_names} "
                                  "(LoRA, QAT or extra state differ from the run that wrote it)")
        err: BaseException | None = None
        try:
            tried_one = True
            accelerator.load_state(str(path))
            if state.step != m["step"]:
                raise CheckpointError(f"train state says step {state.step}, the manifest says {m['step']}")
        except Exception as e:  # noqa: BLE001
            err = e
        failure = _all_ok(accelerator, err)
        if failure is None:
            return path
        if accelerator.is_main_process:
            log.warning("checkpoint %s could not be loaded (%s); trying the previous one", path, failure)
    if tried_one or bad:
        raise CheckpointError(f"resume asked for, but no checkpoint under {root} could be loaded (see the warnings "
                              "above); stopping rather than silently starting over. Move the folder away to start "
                              "afresh.")
    return None


def save_model_atomic(save_fn: Callable[[Any, Path], None], model, out: Path) -> Path:
    """save_fn(model, tmp) then rename to `out` (replacing an older one): readers never see half a model."""
    with atomic_dir(out, create=False) as tmp:
        save_fn(model, tmp)
    return Path(out)
