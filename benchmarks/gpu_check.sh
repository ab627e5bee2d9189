#!/usr/bin/env bash
# The CUDA checks CI cannot run (it has no GPU): run on a machine with one NVIDIA GPU, from the repo root,
# with a Python that has a CUDA torch and this project's dependencies.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. the smoke recipe end to end with mixed precision bf16 and fp16 (recover and QAT train on the GPU),
#    reading the smoke synthetic set from data/synth-smoke (build it first with ./launch.sh run
#    recipes/smoke.yaml on any machine; espeak-ng/flite are not needed here);
# 2. the trainer, checkpoint and QAT test files on the GPU;
# 3. the train-step benchmark (tiny.en shapes, random weights, batch 8) under bf16 autocast.
# Prints a PASS/FAIL line per check and exits non-zero when any failed.
set -uo pipefail
OUT=${1:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
fails=0
check() {  # check NAME CMD...: run, log to OUT/NAME.log, print PASS/FAIL with the time taken
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then echo "PASS $name ($((SECONDS - t0)) s)"
  else echo "FAIL $name ($((SECONDS - t0)) s): see $OUT/$name.log"; tail -n 25 "$OUT/$name.log"; fails=$((fails + 1)); fi
}

$PY - <<'EOF'
import torch, transformers, accelerate
print(f"torch {torch.__version__} transformers {transformers.__version__} accelerate {accelerate.__version__}")
print(f"cuda {torch.cuda.is_available()}: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}, "
      f"bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
EOF

SMOKE_DATA=(data.synth=null data.train=data/synth-smoke/train/manifest.jsonl data.eval=data/synth-smoke/eval/manifest.jsonl)
for mp in bf16 fp16; do
  rm -rf "$OUT/smoke-$mp"
  check "smoke-$mp" $PY -m train.cli run recipes/smoke.yaml "output_dir=$OUT/smoke-$mp" "${SMOKE_DATA[@]}" \
    "stages.recover.train.mixed_precision=$mp" "stages.qat.train.mixed_precision=$mp"
  [ -f "$OUT/smoke-$mp/report.md" ] && cat "$OUT/smoke-$mp/report.md" | head -n 20
  grep -h '"loss"' "$OUT/smoke-$mp"/0[23]-*/metrics.jsonl 2>/dev/null | head -n 8
done

check tests-gpu $PY -m pytest -q -p no:cacheprovider tests/test_train_loop.py tests/test_checkpoint.py tests/test_qat.py

# tiny.en's shapes with random weights: step time does not depend on the weights' values
$PY - "$OUT/tiny-en-shape" <<'EOF'
import sys
from transformers import WhisperConfig, WhisperForConditionalGeneration
cfg = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
                    encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                    decoder_ffn_dim=1536, max_source_positions=1500, max_target_positions=448,
                    decoder_start_token_id=50257, pad_token_id=50256, bos_token_id=50257, eos_token_id=50256)
WhisperForConditionalGeneration(cfg).save_pretrained(sys.argv[1])
EOF
check bench-train-step $PY benchmarks/bench_train_step.py "$OUT/tiny-en-shape" --batch-size 8 --steps 12 --json "$OUT/bench_train_step.json"
cat "$OUT/bench-train-step.log" | tail -n 6

echo "$fails check(s) failed"
exit $((fails > 0))
