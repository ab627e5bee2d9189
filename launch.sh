#!/usr/bin/env bash
# whisper-slim entry point. Creates .venv and installs the project on first use, then dispatches:
#   ./launch.sh run RECIPE [key=value ...] [--num-processes N] [--resume]
#   ./launch.sh import SRC OUT
#   ./launch.sh transcribe MODEL AUDIO... [--engine torch|onnx]
#   ./launch.sh eval MODEL --data DATA --out REPORT.json [--engine ...]
#   ./launch.sh export MODEL OUT [--format slim|sherpa-onnx|hf] [--mode qdq|float|dynamic-int8]
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
        echo "[launch] installing the Debian packages espeak-ng and flite (apt-get, for the synthetic speech builder)" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng flite >/dev/null) \
            || echo "[launch] warning: could not install espeak-ng/flite; synthetic speech will be unavailable" >&2
    else
        echo "[launch] warning: espeak-ng/flite missing; install them (apt-get install espeak-ng flite)" >&2
    fi
}

ensure_js() {
    # transformers.js (npm, pinned by eval/js/package-lock.json) for the engine that runs hf-layout exports.
    # --ignore-scripts: onnxruntime-node's install script only fetches GPU libraries (from nuget.org); its
    # CPU binaries ship in the npm package itself.
    local js="$ROOT/eval/js" want
    if ! command -v npm >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "[launch] installing the Debian packages nodejs and npm (apt-get, for transformers.js)" >&2
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null) \
                || { echo "[launch] warning: could not install nodejs/npm; the transformers.js engine is unavailable" >&2; return; }
        else
            echo "[launch] warning: node/npm missing; the transformers.js engine is unavailable" >&2
            return
        fi
    fi
    want="$(sha256sum < "$js/package-lock.json" | cut -d' ' -f1)"
    [ -f "$js/node_modules/.installed" ] && [ "$(cat "$js/node_modules/.installed")" = "$want" ] && return
    echo "[launch] installing transformers.js into eval/js/node_modules (npm ci)" >&2
    (cd "$js" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2) \
        && echo "$want" > "$js/node_modules/.installed" \
        || echo "[launch] warning: npm ci failed; the transformers.js engine is unavailable" >&2
}

extras_for() {
    # What each command needs on top of the core (the torch-free runtime): torch for import, transcribe, eval,
    # export, compare, synth.
    case "$1" in
        test) echo "torch,train,weights,voices,bench,dev" ;;
        run) echo "torch,train,weights,voices" ;;
        synth) echo "torch,voices" ;;
        *) echo "torch,weights" ;;
    esac
}

ensure_venv() {
    # .venv/.installed holds the pyproject hash and the extras installed for it; a command whose extras are
    # already there installs nothing, one that needs more adds them (never removes any).
    local stamp="$VENV/.installed" want have="" need extras
    want="$(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    need="$(extras_for "$1")"
    if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = "$want" ]; then
        have="$(cut -s -d' ' -f2 "$stamp")"
        local missing=""
        for e in ${need//,/ }; do
            case ",$have," in *",$e,"*) ;; *) missing=1 ;; esac
        done
        [ -z "$missing" ] && return
    fi
    extras="$(echo "${have:+$have,}$need" | tr ',' '\n' | sort -u | paste -sd, -)"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[launch] creating $VENV" >&2
        "$PY" -m venv "$VENV"
    fi
    echo "[launch] installing whisper-slim[$extras] and its dependencies (pinned by constraints.txt)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    # torch first and alone, pinned: the CPU wheel; letting a resolver pick it can pull a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
    "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[$extras]" >&2
    echo "$want $extras" > "$stamp"
}

cmd="${1:-}"
if [ -z "$cmd" ] || [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
shift
ensure_venv "$cmd"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
case "$cmd" in
    test)
        ensure_voices
        ensure_js
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
