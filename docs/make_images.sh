#!/usr/bin/env bash
# Regenerates the images in docs/images from ../shared/data and the synthetic generator.
# Real PTB-XL records (CC BY 4.0, Wagner et al. 2020) rendered by evl-ecg; synthetic records
# of the same class (seed 2026, obvious findings) beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
B="cargo run --release -q -p evl-ecg --"
P=../shared/data/ptbxl_subset/records500
$B data synth --n 400 --seed 2026 --difficulty obvious --out target/docs-synth >/dev/null 2>&1
for pair in NORM:00000/00001_hr MI:01000/01025_hr STTC:01000/01030_hr CD:00000/00049_hr HYP:00000/00030_hr; do
  cls=${pair%%:*}; rec=${pair#*:}
  $B render "$P/$rec" --dpi 80 --out "docs/images/ptbxl_${cls}_$(basename "$rec").png"
  # first synthetic record whose only superclass is $cls
  syn=$(awk -F, -v c="$cls" 'NR>1 && $3==c {print $1; exit}' target/docs-synth/labels.csv)
  $B render "target/docs-synth/$syn" --dpi 80 --out "docs/images/synthetic_${cls}.png"
  grep "^$syn," target/docs-synth/labels.csv > "docs/images/synthetic_${cls}.txt"
done
$B render "$P/00000/00001_hr" --dpi 80 --rotate 3 --noise 6 --color-jitter 0.08 --creases 2 --blur 1 --seed 4 --out docs/images/ptbxl_NORM_00001_hr_distorted.png
