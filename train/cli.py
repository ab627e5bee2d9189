"""The `./launch.sh` command line: run, import, transcribe, eval, export, compare, synth.

Each subcommand parses its own arguments and hands over to the module that owns the work; this file only
dispatches (and relaunches `run --num-processes N` under `accelerate launch`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_PID_ENV = "SLIM_LAUNCHER_PID"  # set by _relaunch for its workers: the process they must not outlive
USAGE = """usage: ./launch.sh COMMAND ...
  run RECIPE [key=value ...] [--num-processes N] [--resume] [--accelerate-config FILE]
  import SRC OUT                      SRC: hub id | HF dir | CT2 dir | tiny.en | base
  transcribe MODEL AUDIO... [--engine torch|onnx|...]
  eval MODEL --data DATA --out REPORT.json [--engine ...] [--batch-size N] [--limit N]
  export MODEL OUT [--format slim|sherpa-onnx|hf] [--mode qdq|float|dynamic-int8]
  compare BASE.json OTHER.json...     WER differences of eval reports, paired bootstrap 95% intervals
  synth --text FILE --out DIR [--voices ...] [--limit N]
  test [pytest args]"""


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="./launch.sh run", description="Run a recipe's stages in order.")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stages.recover.train.max_steps=50")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: finished stages are kept, the running one resumes "
                        "from its last checkpoint")
    p.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) through accelerate launch")
    p.add_argument("--accelerate-config", default=None,
                   help="an Accelerate config file (see accelerate_configs/); default: DDP on the GPUs "
                        "present, gloo on CPU")
    args = p.parse_intermixed_args(argv)  # options may come before or after the overrides

    from train.recipe import ConfigError, load_recipe

    try:  # validate before launching anything: a bad recipe fails before any work, naming the key
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(args)

    from train.loop import distributed_state
    from train.stages import run_recipe

    if "LOCAL_RANK" in os.environ:
        _die_with_launcher()
    state = distributed_state()  # one process group for every stage of the run
    try:
        run_recipe(recipe, recipe_path=args.recipe, overrides=args.overrides, resume=args.resume, state=state)
    finally:
        state.destroy_process_group()  # once, at exit, also when a stage failed
    return 0


def _die_with_launcher() -> None:
    """Have the kernel SIGKILL this process when the `accelerate launch` that started it dies.

    A launcher killed with SIGKILL cannot stop its workers; left running, they would go on writing the run
    folder while a `--resume` of it starts. Linux only (prctl); elsewhere a no-op.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    launcher = int(os.environ.get(LAUNCHER_PID_ENV) or os.getppid())
    if getattr(libc, "prctl", None) is None or libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != launcher:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


def _relaunch(args) -> NoReturn:
    """Become `accelerate launch` running this command in N processes (does not return)."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes)]
    if args.accelerate_config:
        cmd += ["--config_file", args.accelerate_config]
    else:
        # one machine: a free port, since other runs on it may hold Accelerate's default 29500
        cmd += ["--multi_gpu"] if torch.cuda.is_available() else [
            "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")]
        cmd += ["--main_process_port", "0"]
    cmd += ["-m", "train.cli", "run", args.recipe, *args.overrides]
    if args.resume:
        cmd.append("--resume")
    print("[launch] " + " ".join(cmd), file=sys.stderr, flush=True)
    # exec, not a child: this process becomes the launcher, so a signal sent to `./launch.sh run` reaches
    # the process whose workers die with it (see _die_with_launcher)
    sys.stdout.flush()
    os.execve(sys.executable, cmd, dict(os.environ, **{LAUNCHER_PID_ENV: str(os.getpid())}))  # exec keeps the pid


def _import(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="./launch.sh import", description="Import a Whisper model as an HF directory.")
    p.add_argument("src", help="hub id (openai/whisper-base) | HF dir | CTranslate2 dir | tiny.en | base")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from slim.sources import import_model

    out = import_model(args.src, args.out, overwrite=args.overwrite)
    print(out)
    return 0


def _export(argv: list[str]) -> int:
    from slim.export_format import LAYOUTS

    p = argparse.ArgumentParser(prog="./launch.sh export",
                                description="Export a float or fake-quant (QAT/PTQ) model directory to ONNX.")
    p.add_argument("model", help="a model directory this project wrote (dense, pruned, QAT/PTQ) or an HF Whisper dir")
    p.add_argument("out", help="output directory (replaced atomically)")
    p.add_argument("--format", default="slim", choices=LAYOUTS,
                   help="slim: our runtime (slim.runtime, no torch); sherpa-onnx: its Whisper layout; hf: the Hugging Face onnx/ layout (transformers.js, onnx-asr)")
    p.add_argument("--mode", default=None, choices=("qdq", "float", "dynamic-int8"),
                   help="default: qdq for a fake-quant model (its QAT scales), float otherwise")
    p.add_argument("--uint8-weights", action="store_true",
                   help="store the int8 weights as uint8 + 128 (the same values): exact in runtimes that keep ONNX "
                        "Runtime's default kernels (sherpa-onnx, transformers.js) on x86 CPUs without VNNI; "
                        "u8 x u8 kernels, slower where VNNI runs u8 x s8 (docs/runtimes.md)")
    p.add_argument("--silence-window", action="store_true",
                   help="record a silence window (slim.window.SILENCE_WINDOW): the slim runtime encodes only "
                        "ceil(duration) + 0.5 s of a clip up to 9 s, and reads a silent input's states beyond it")
    args = p.parse_args(argv)
    from qat.onnx_export import export_model
    from slim.model import read_structure
    from slim.window import SILENCE_WINDOW

    if not (Path(args.model) / "config.json").exists():
        raise FileNotFoundError(f"{Path(args.model) / 'config.json'}: missing (MODEL must be a model directory)")
    mode = args.mode
    if mode is None:
        s = read_structure(args.model)
        mode = "qdq" if s is not None and s.quant is not None else "float"
    print(export_model(args.model, args.out, mode=mode, layout=args.format, uint8_weights=args.uint8_weights,
                       audio_window=dict(SILENCE_WINDOW) if args.silence_window else None))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("SLIM_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            return _run(rest)
        if cmd == "import":
            return _import(rest)
        if cmd == "transcribe":
            from eval.run import transcribe_main

            return transcribe_main(rest)
        if cmd == "eval":
            from eval.run import main as eval_main

            return eval_main(rest)
        if cmd == "export":
            return _export(rest)
        if cmd == "compare":
            from eval.run import compare_main

            return compare_main(rest)
        if cmd == "synth":
            from slim.synth import main as synth_main

            return synth_main(rest)
    except (ValueError, OSError, RuntimeError) as e:
        # expected user-facing failures: one clear line, no traceback (SLIM_DEBUG=1 shows it)
        if os.environ.get("SLIM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"unknown command '{cmd}'\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
