#!/usr/bin/env bash
# Train the shipped teacher from nothing and measure it as its model card reports
# (zoo/README.md). Hours on 2 CPU cores. Run from the repository root; the first argument is
# a work directory (default zoo-run/). After an interruption, run the script again: it
# resumes the training from its last checkpoint (every 100 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${EVL_ECG:-target/release/evl-ecg}
W=${1:-zoo-run}
[ -x "$BIN" ] || cargo build --release -p evl-ecg
[ -d "$W/data" ] || "$BIN" data synth --n 3000 --seed 7 --difficulty mixed --out "$W/data"
[ -d "$W/test" ] || "$BIN" data synth --n 1000 --seed 8 --difficulty mixed --out "$W/test"
if [ -d "$W/teacher/model" ]; then
  echo "$W/teacher/model exists: training done"
elif [ -d "$W/teacher/pretrain" ] || [ -d "$W/teacher/checkpoint" ]; then
  "$BIN" train teacher --preset zoo --data "$W/data" --out "$W/teacher" --resume
else
  "$BIN" train teacher --preset zoo --data "$W/data" --out "$W/teacher"
fi
# The SFT'd student (minutes), on the same records.
if [ -d "$W/student/model" ]; then
  echo "$W/student/model exists: training done"
elif [ -d "$W/student/pretrain" ] || [ -d "$W/student/checkpoint" ]; then
  "$BIN" train student --preset zoo --data "$W/data" --out "$W/student" --resume
else
  "$BIN" train student --preset zoo --data "$W/data" --out "$W/student"
fi
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
