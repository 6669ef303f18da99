#!/usr/bin/env bash
# Fuzz every target at once for T seconds (default 420), each with its share of the cores
# (libFuzzer's -fork), with per-input limits: 10 s (a hang), 2 GiB RSS and 2 GiB per
# allocation (unbounded allocation). Then minimise each grown corpus (-merge) into
# $OUT/merged/<target>/. Logs, crash artifacts and a summary (total executions per target,
# crashes) go to $OUT.
#
# Usage: fuzz/run_all.sh               (builds with `cargo +nightly fuzz build -O` first)
#        BIN=dir fuzz/run_all.sh       (use already built target binaries in dir)
# Shares: SHARES="image:7 request:2 ..." (default sized for 16 cores).
set -u
cd "$(dirname "$0")"
T=${T:-420}
OUT=${OUT:-$(pwd)/out}
mkdir -p "$OUT"
if [[ -z "${BIN:-}" ]]; then
  cargo +nightly fuzz build -O || exit 1
  BIN=target/x86_64-unknown-linux-gnu/release
fi
SHARES=${SHARES:-"image:7 request:2 csv:2 wfdb_record:1 cinc_mat:1 edf:1 wfdb_header:1 annotations:1"}
work=$(mktemp -d)
: > "$OUT/rc.txt"
for s in $SHARES; do
  t=${s%%:*}; w=${s##*:}
  mkdir -p "$work/$t" "$OUT/artifacts/$t"
  cp corpus/"$t"/* "$work/$t"/
  ( "$BIN/$t" "$work/$t" -fork="$w" -max_total_time="$T" -rss_limit_mb=2048 \
      -malloc_limit_mb=2048 -timeout=10 -artifact_prefix="$OUT/artifacts/$t/" \
      > "$OUT/$t.log" 2>&1; echo "$t exit $?" >> "$OUT/rc.txt" ) &
done
wait
for s in $SHARES; do
  t=${s%%:*}
  mkdir -p "$OUT/merged/$t"
  "$BIN/$t" -merge=1 "$OUT/merged/$t" "$work/$t" > "$OUT/$t.merge.log" 2>&1 &
done
wait
{
  echo "target executions crashes"
  for s in $SHARES; do
    t=${s%%:*}
    execs=$(grep -Eo '^#[0-9]+' "$OUT/$t.log" | tail -1 | tr -d '#')
    crashes=$(find "$OUT/artifacts/$t" -type f | wc -l)
    echo "$t ${execs:-0} $crashes"
  done
} | tee "$OUT/summary.txt"
cat "$OUT/rc.txt"
rm -rf "$work"
