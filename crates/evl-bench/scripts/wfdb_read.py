"""Reference for `evl-ecg bench io`: wfdb-python's rdrecord over the same records, or with
`--edf` MNE-Python's read_raw_edf (physical values loaded) over EDF files.

Reads a JSON list of record paths (without extension; EDF: the .edf paths) on stdin. One
untimed pass finds the records the reference can read; then `reps` timed passes over those,
single-threaded. Prints JSON: {"ok": [...], "failed": {path: error}, "best_s": seconds of the
fastest pass, "wfdb_version": ..., "version": the reference's version}.
"""
import json
import sys
import time

import wfdb


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    paths = json.load(sys.stdin)
    read, version = wfdb.rdrecord, wfdb.__version__
    if "--edf" in sys.argv:
        import mne

        def read(p):
            r = mne.io.read_raw_edf(p, preload=True, verbose="error")
            # An annotation-only file has no signal to return.
            return r.get_data() if r.ch_names else None

        version = mne.__version__
    ok, failed = [], {}
    for p in paths:
        try:
            read(p)
            ok.append(p)
        except Exception as e:  # noqa: BLE001 - report, do not time
            failed[p] = f"{type(e).__name__}: {e}"
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for p in ok:
            read(p)
        best = min(best, time.perf_counter() - t)
    print(
        json.dumps(
            {"ok": ok, "failed": failed, "best_s": best, "wfdb_version": wfdb.__version__, "version": version}
        )
    )


if __name__ == "__main__":
    main()
