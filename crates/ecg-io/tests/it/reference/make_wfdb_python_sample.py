"""Expected values for crates/ecg-io/tests/it/wfdb_corpus.rs, derived once with
wfdb-python 4.3.1 (`pip install wfdb==4.3.1`) from ../shared/data/wfdb_python_sample.

Run from the repository root:
    python3 crates/ecg-io/tests/it/reference/make_wfdb_python_sample.py > crates/ecg-io/tests/it/reference/wfdb_python_sample.json

For every header (top level and multi-segment folders; segment headers of a multi-segment
record are read through their master header and also on their own) it stores what
`wfdb.rdrecord(path)` returns (physical values, frames averaged: `smooth_frames=True`, the
default) and, with `smooth_frames=False`, every channel expanded to its own rate. Per
channel: length, NaN count, sum and sum of squares of the finite values, first and last
values (null where NaN). A record wfdb-python cannot read is stored with its error. For
every annotation file next to a record (`rdann`): count, the sample indices and symbols
(all of them up to 2,000, else the first and last 1,000), subtypes, channels, nums and
aux notes the same way. For every EDF file (`*.edf`, which wfdb-python's rdrecord does not
read): the values MNE-Python reads (see `edf`).
"""
import glob
import json
import math
import os
import sys

import numpy as np
import wfdb

ROOT = "../shared/data/wfdb_python_sample"
ANN_EXT = ["atr", "qrs", "ecg", "wabp", "wqrs", "gqrsh", "gqrsl", "sqrs", "anI"]


def stats(x):
    x = np.asarray(x, dtype=np.float64)
    fin = x[np.isfinite(x)]
    val = lambda v: None if not np.isfinite(v) else float(v)
    return {
        "len": int(x.size),
        "nan": int(x.size - fin.size),
        "sum": float(fin.sum()),
        "sumsq": float((fin * fin).sum()),
        "first": val(x[0]) if x.size else None,
        "last": val(x[-1]) if x.size else None,
    }


def cut(v):
    v = list(v)
    if len(v) <= 2000:
        return {"all": v}
    return {"head": v[:1000], "tail": v[-1000:]}


def record(path):
    out = {}
    try:
        r = wfdb.rdrecord(path)
    except Exception as e:  # noqa: BLE001 - the error is the expected value
        return {"error": f"{type(e).__name__}: {e}".replace(os.path.abspath(ROOT) + "/", "")}
    out["fs"] = float(r.fs)
    out["sig_len"] = int(r.sig_len)
    out["sig_name"] = list(r.sig_name or [])
    out["units"] = list(r.units or [])
    sig = r.p_signal
    out["channels"] = [stats(sig[:, j]) for j in range(sig.shape[1])] if sig is not None else []
    try:
        e = wfdb.rdrecord(path, smooth_frames=False)
        out["expanded"] = [stats(c) for c in e.e_p_signal]
        out["samps_per_frame"] = [int(s) for s in e.samps_per_frame]
    except Exception as ex:  # noqa: BLE001
        out["expanded_error"] = f"{type(ex).__name__}: {ex}"
    return out


def annotation(path, ext):
    a = wfdb.rdann(path, ext)
    return {
        "count": int(len(a.sample)),
        "sample": cut(int(s) for s in a.sample),
        "symbol": cut(a.symbol),
        "subtype": cut(int(s) for s in a.subtype),
        "chan": cut(int(s) for s in a.chan),
        "num": cut(int(s) for s in a.num),
        "aux_note": cut(a.aux_note),
    }


def edf(path):
    """An EDF/EDF+ file as MNE-Python reads it (pyedflib for the annotations where it opens the
    file: it refuses test_generator_2.edf's Latin-1 unit): per signal the physical values in
    the file's own units (MNE's SI values divided by 1e-6 for uV, 1e-3 for mV), and the
    EDF+ annotations (onset s, duration s, text)."""
    import mne

    out = {}
    r = mne.io.read_raw_edf(path, preload=True, verbose="error")
    units = getattr(r, "_orig_units", {})
    data = r.get_data() if len(r.ch_names) else np.zeros((0, 0))
    chans = []
    for j, name in enumerate(r.ch_names):
        u = units.get(name, "")
        scale = {"µV": 1e-6, "uV": 1e-6, "mV": 1e-3}.get(u, 1.0)
        chans.append(dict(stats(data[j] / scale), name=name))
    out["sfreq"] = float(r.info["sfreq"])
    out["channels"] = chans
    try:
        import pyedflib

        f = pyedflib.EdfReader(path)
        on, du, tx = f.readAnnotations()
        f.close()
        out["annotations"] = [[float(a), float(b), str(c)] for a, b, c in zip(on, du, tx)]
        out["annotations_from"] = "pyedflib " + pyedflib.__version__
    except OSError:
        a = r.annotations
        out["annotations"] = [
            [float(x), float(y), str(z)] for x, y, z in zip(a.onset, a.duration, a.description)
        ]
        out["annotations_from"] = "mne " + mne.__version__
    return out


def clean(v):
    """NaN and infinities (a header's sampling frequency can be missing) as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v


def main():
    heads = sorted(glob.glob(f"{ROOT}/*.hea") + glob.glob(f"{ROOT}/multi-segment/*/*.hea"))
    recs = {}
    for h in heads:
        rel = os.path.relpath(h, ROOT)[:-4]
        recs[rel] = record(h[:-4])
    anns = {}
    for h in heads:
        base = h[:-4]
        for ext in ANN_EXT:
            if os.path.exists(f"{base}.{ext}"):
                rel = os.path.relpath(base, ROOT)
                try:
                    anns[f"{rel}.{ext}"] = annotation(base, ext)
                except Exception as e:  # noqa: BLE001
                    anns[f"{rel}.{ext}"] = {"error": f"{type(e).__name__}: {e}"}
    edfs = {}
    for f in sorted(glob.glob(f"{ROOT}/*.edf")):
        edfs[os.path.relpath(f, ROOT)] = edf(f)
    json.dump(
        clean({"wfdb_python": wfdb.__version__, "records": recs, "annotations": anns, "edf": edfs}),
        sys.stdout,
        indent=None,
        separators=(",", ":"),
        allow_nan=False,
    )


if __name__ == "__main__":
    main()
