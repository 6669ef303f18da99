"""Reference for `evl-ecg bench io`: wfdb-python's rdrecord over the same records.

Reads a JSON list of record paths (without extension) on stdin. One untimed pass finds the
records wfdb-python can read; then `reps` timed passes over those, single-threaded. Prints
JSON: {"ok": [...], "failed": {path: error}, "best_s": seconds of the fastest pass,
"wfdb_version": ...}.
"""
import json
import sys
import time

import wfdb


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    paths = json.load(sys.stdin)
    ok, failed = [], {}
    for p in paths:
        try:
            wfdb.rdrecord(p)
            ok.append(p)
        except Exception as e:  # noqa: BLE001 - report, do not time
            failed[p] = f"{type(e).__name__}: {e}"
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for p in ok:
            wfdb.rdrecord(p)
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"ok": ok, "failed": failed, "best_s": best, "wfdb_version": wfdb.__version__}))


if __name__ == "__main__":
    main()
