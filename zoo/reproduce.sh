#!/usr/bin/env bash
# Train the shipped teacher and student from nothing and measure them as their model cards
# report (zoo/README.md). Hours on 2 CPU cores. Run from the repository root; the first
# argument is a work directory (default zoo-run/). After an interruption, run the script
# again: it resumes the training from its last checkpoint (every 100 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${EVL_ECG:-target/release/evl-ecg}
W=${1:-zoo-run}
[ -x "$BIN" ] || cargo build --release -p evl-ecg
[ -d "$W/data" ] || "$BIN" data synth --n 3000 --seed 7 --difficulty mixed --out "$W/data"
[ -d "$W/data8k" ] || "$BIN" data synth --n 8000 --seed 7 --difficulty mixed --out "$W/data8k"
[ -d "$W/data16k" ] || "$BIN" data synth --n 16000 --seed 7 --difficulty mixed --out "$W/data16k"
[ -d "$W/data32k" ] || "$BIN" data synth --n 32000 --seed 7 --difficulty mixed --out "$W/data32k"
[ -d "$W/test" ] || "$BIN" data synth --n 1000 --seed 8 --difficulty mixed --out "$W/test"
# Run one stage into $1 (the rest are train's arguments) unless it is done; resume a stage
# that was interrupted. DATA (default $W/data) is the training data.
stage() {
  local out=$1; shift
  local data=${DATA:-$W/data}
  if [ -d "$out/model" ]; then
    echo "$out/model exists: stage done"
  elif [ -d "$out/pretrain" ] || [ -d "$out/checkpoint" ]; then
    "$BIN" train "$@" --data "$data" --out "$out" --resume
  else
    "$BIN" train "$@" --data "$data" --out "$out"
  fi
}
# The teacher's six stages (zoo/README.md): v0, more SFT on the frozen encoder, the whole
# model fine-tuned at a low rate, then more pre-training and SFT on 8,000, 16,000 and 32,000
# records.
stage "$W/teacher-v0" teacher --preset zoo
stage "$W/teacher-sft2" teacher --preset zoo --init "$W/teacher-v0/model" --steps 1500 --batch-size 64
stage "$W/teacher-v1" teacher --preset zoo --init "$W/teacher-sft2/model" --steps 500 --batch-size 32 \
  --lr 3e-4 --set teacher.optim.freeze_vision=false --set teacher.optim.warmup=50
DATA=$W/data8k stage "$W/teacher-v2" teacher --preset zoo --init "$W/teacher-v1/model" \
  --pretrain-steps 600 --steps 1000 --batch-size 64
DATA=$W/data16k stage "$W/teacher-v3" teacher --preset zoo --init "$W/teacher-v2/model" \
  --pretrain-steps 600 --steps 1000 --batch-size 64
DATA=$W/data32k stage "$W/teacher" teacher --preset zoo --init "$W/teacher-v3/model" \
  --pretrain-steps 600 --steps 1500 --batch-size 64
# The SFT'd student (minutes), on the same records.
stage "$W/student" student --preset zoo
for d in "synthetic $W/test" "ptbxl ../shared/data/ptbxl_subset/records500" "cinc ../shared/data/cinc2021_subset"; do
  set -- $d
  "$BIN" eval --model "$W/student/model" --data "$2" --split all --out "$W/student-eval-$1"
done
( cd "$W/student/model" && sha256sum config.json input.json labels.json model.safetensors tokenizer.json )
# Synthetic test set (1,000 records of another seed), real PTB-XL and CinC records.
"$BIN" eval --model "$W/teacher/model" --data "$W/test" --split all --out "$W/eval-synthetic"
"$BIN" eval --model "$W/teacher/model" --data ../shared/data/ptbxl_subset/records500 --split all --out "$W/eval-ptbxl"
"$BIN" eval --model "$W/teacher/model" --data ../shared/data/cinc2021_subset --split all --out "$W/eval-cinc"
( cd "$W/teacher/model" && sha256sum config.json input.json labels.json model.safetensors tokenizer.json )
