"""The `./launch.sh` command line: run, import, transcribe, eval, compare, synth.

Each subcommand parses its own arguments and hands over to the module that owns the work; this file only
dispatches (and relaunches `run --num-processes N` under `accelerate launch`).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USAGE = """usage: ./launch.sh COMMAND ...
  run RECIPE [key=value ...] [--num-processes N] [--resume] [--accelerate-config FILE]
  import SRC OUT                      SRC: hub id | HF dir | CT2 dir | tiny.en | base
  transcribe MODEL AUDIO... [--engine torch|onnx|...]
  eval MODEL --data DATA --out REPORT.json [--engine ...] [--batch-size N] [--limit N]
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

    from train.stages import run_recipe

    run_recipe(recipe, recipe_path=args.recipe, overrides=args.overrides, resume=args.resume)
    return 0


def _relaunch(args) -> int:
    """Re-run this command under `accelerate launch` with N processes."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes)]
    if args.accelerate_config:
        cmd += ["--config_file", args.accelerate_config]
    elif torch.cuda.is_available():
        cmd += ["--multi_gpu"]
    else:
        cmd += ["--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")]
    cmd += ["-m", "train.cli", "run", args.recipe, *args.overrides]
    if args.resume:
        cmd.append("--resume")
    print("[launch] " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


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
