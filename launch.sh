#!/usr/bin/env bash
# whisper-slim entry point. Creates .venv and installs the project on first use, then dispatches:
#   ./launch.sh run RECIPE [key=value ...] [--num-processes N] [--resume]
#   ./launch.sh import SRC OUT
#   ./launch.sh transcribe MODEL AUDIO... [--engine torch|onnx]
#   ./launch.sh eval MODEL --data DATA --out REPORT.json [--engine ...]
#   ./launch.sh compare BASE.json OTHER.json ...
#   ./launch.sh synth --text FILE --out DIR [--voices ...] [--limit N]
#   ./launch.sh test [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

ensure_voices() {
    # The synthetic speech builder needs Debian's espeak-ng and flite.
    if command -v espeak-ng >/dev/null && command -v flite >/dev/null; then return; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[launch] installing espeak-ng and flite" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng flite >/dev/null) \
            || echo "[launch] warning: could not install espeak-ng/flite; synthetic speech will be unavailable" >&2
    else
        echo "[launch] warning: espeak-ng/flite missing; install them (apt-get install espeak-ng flite)" >&2
    fi
}

ensure_venv() {
    local stamp="$VENV/.installed"
    local want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[launch] creating $VENV" >&2
        "$PY" -m venv "$VENV"
    fi
    echo "[launch] installing whisper-slim and its dependencies (first use only)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    # torch first and alone, pinned: the CPU wheel; letting a resolver pick it can pull a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[weights,bench,dev]" >&2
    echo "$want" > "$stamp"
}

cmd="${1:-}"
if [ -z "$cmd" ] || [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
shift
ensure_venv
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
case "$cmd" in
    test)
        ensure_voices
        cd "$ROOT"
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    run|synth)
        ensure_voices
        exec "$VENV/bin/python" -m train.cli "$cmd" "$@"
        ;;
    *)
        exec "$VENV/bin/python" -m train.cli "$cmd" "$@"
        ;;
esac
