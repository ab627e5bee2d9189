"""Experiment tracking: a local `metrics.jsonl` always, wandb through Accelerate's trackers when enabled.

The JSONL is the record the project itself reads (tests, reports); wandb is for people. wandb runs offline
by itself when this machine has no login, so a recipe with wandb enabled never blocks on a login prompt
or fails for want of network.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from slim.io import atomic_write_text

log = logging.getLogger("whisper_slim")


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (through `accelerate`'s tracker) as well as metrics.jsonl."""
    project: str = "whisper-slim"
    """wandb project name."""
    entity: str | None = None
    """wandb entity (user or team); None: the login's default."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when logged in (WANDB_API_KEY or a netrc entry), else offline. The WANDB_MODE
    environment variable, when set, wins over this (CI sets WANDB_MODE=offline)."""


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings. A local metrics.jsonl is always written."""


def has_wandb_login() -> bool:
    """True when wandb would find credentials: WANDB_API_KEY, or a netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str = "auto") -> str:
    """The mode wandb will run in: WANDB_MODE if set, else the recipe's, with `auto` resolved by login."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    return "online" if has_wandb_login() else "offline"


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def init_trackers(accelerator, cfg: TrackingConfig | None, run_config: dict, out_dir: Path,
                  run_name: str) -> str | None:
    """Start the Accelerate trackers (wandb) for this run; returns the wandb mode used, or None."""
    if cfg is None or not cfg.wandb.enabled or not accelerator.log_with:
        return None
    w = cfg.wandb
    mode = wandb_mode(w.mode)
    init = {"mode": mode, "dir": str(out_dir), "name": run_name}
    if w.entity:
        init["entity"] = w.entity
    if accelerator.is_main_process:
        log.info("wandb: project %s, mode %s, dir %s", w.project, mode, out_dir)
    accelerator.init_trackers(w.project, config=run_config, init_kwargs={"wandb": init})
    return mode


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact as text
    return v


class MetricsLog:
    """Appends one JSON object per log call to `path` (main process only) and forwards to the trackers."""

    def __init__(self, path: Path, stage: str, accelerator=None):
        self.path, self.stage, self.accelerator = Path(path), stage, accelerator
        self.main = accelerator is None or accelerator.is_main_process
        self.t0 = time.time()

    def log(self, step: int, values: dict[str, Any]) -> dict:
        record = {"step": step, "stage": self.stage, **{k: _jsonable(v) for k, v in values.items()},
                  "time": round(time.time() - self.t0, 3)}
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.log_with:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=step)
        return record

    def rewind(self, step: int) -> int:
        """Drop this stage's records after `step` (written by a run that was killed after its last
        checkpoint, and about to be redone by the resumed run). Returns how many were dropped."""
        if not self.main or not self.path.exists():
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line torn by kill -9
                dropped += 1
                continue
            if r.get("stage") == self.stage and r.get("step", 0) > step:
                dropped += 1
            else:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        return dropped


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
