#!/usr/bin/env bash
# Checks the web page of `evl-ecg serve` in headless Chromium and writes a screenshot:
# starts the server with the shipped teacher on a free loopback port, opens `/?demo&seed=3`
# (the page fetches a SYNTHETIC example record from the server and uploads it like a user's
# file), then checks in the page's DOM that the answer, the five label probabilities and the
# rendered ECG are shown, and that the page loaded nothing from another host.
#
# Usage: crates/evl-serve/scripts/page_check.sh [OUT.png]   (default docs/serve_page.png)
# Needs: chromium (Debian: apt-get install chromium) and a release build of evl-ecg.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${1:-docs/serve_page.png}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$browser" ]]; then
  echo "page_check: no chromium found (apt-get install chromium)" >&2
  exit 2
fi
cargo build --release -q -p evl-ecg
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
./target/release/evl-ecg serve --model zoo/teacher/model --addr "127.0.0.1:$port" 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
url="http://127.0.0.1:$port/?demo&seed=3"
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900
       --virtual-time-budget=20000 --disable-background-networking --no-first-run)
dom=$("$browser" "${flags[@]}" --dump-dom "$url" 2>/dev/null)
"$browser" "${flags[@]}" --screenshot="$out" "$url" >/dev/null 2>&1
fail=0
grep -q 'id="answer"' <<<"$dom" || { echo "page_check: no answer shown" >&2; fail=1; }
rows=$(grep -Eo '<tr><td>[^"<]*</td><td>[0-9.]+</td>' <<<"$dom" | wc -l)
[[ "$rows" -eq 5 ]] || { echo "page_check: $rows label rows, expected 5" >&2; fail=1; }
grep -q 'src="data:image/png;base64,' <<<"$dom" || { echo "page_check: no rendered ECG" >&2; fail=1; }
grep -q 'SYNTHETIC' <<<"$dom" || { echo "page_check: the example is not labelled synthetic" >&2; fail=1; }
if grep -Eo '(src|href)="(https?:)?//[^"]*' <<<"$dom" | grep -v "127.0.0.1:$port" >&2; then
  echo "page_check: the page refers to another host" >&2; fail=1
fi
[[ -s "$out" ]] || { echo "page_check: no screenshot written" >&2; fail=1; }
answer=$(grep -o '<div class="answer" id="answer">[^<]*' <<<"$dom" | sed 's/.*>//')
if [[ $fail -eq 0 ]]; then
  echo "page_check: ok (answer \"$answer\", $rows labels, screenshot $out)"
fi
exit $fail
