#!/usr/bin/env bash
# Screenshot of a report page in headless Chromium (Debian package `chromium`), as a person
# would look at it. Usage: docs/make_report_screenshot.sh quickstart-out/report/index.html docs/report.png
set -euo pipefail
page=$(realpath "${1:-quickstart-out/report/index.html}")
out=${2:-docs/report.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1200,5200 \
  --screenshot="$out" "file://$page" 2>/dev/null
echo "wrote $out"
