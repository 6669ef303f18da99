"""Reference values for the ecg-io reader tests, computed with wfdb-python (pip install wfdb).

For every WFDB/CinC record under ../shared/data: what `wfdb.rdrecord` reports (fs, samples,
lead names, units) plus, per lead, the sum of the physical signal, its sum of squares and the
first and last physical sample. Run from the repository root:

    python3 crates/ecg-io/tests/it/reference/make_wfdb_reference.py > crates/ecg-io/tests/it/reference/wfdb_reference.json
"""
import glob
import json
import os

import numpy as np
import wfdb

root = os.path.join("..", "shared", "data")
out = {"wfdb_version": wfdb.__version__, "records": {}}
for hea in sorted(glob.glob(os.path.join(root, "**", "*.hea"), recursive=True)):
    rel = os.path.relpath(hea, root)[:-4]
    try:
        r = wfdb.rdrecord(hea[:-4])
    except Exception as e:  # noqa: BLE001 - record what wfdb-python says
        out["records"][rel] = {"error": f"{type(e).__name__}: {e}"}
        continue
    p = r.p_signal
    out["records"][rel] = {
        "fs": float(r.fs),
        "n_samples": int(r.sig_len),
        "sig_name": list(r.sig_name),
        "units": list(r.units),
        "sum": [float(np.nansum(p[:, j])) for j in range(p.shape[1])],
        "sumsq": [float(np.nansum(p[:, j] ** 2)) for j in range(p.shape[1])],
        "first": [float(p[0, j]) for j in range(p.shape[1])],
        "last": [float(p[-1, j]) for j in range(p.shape[1])],
    }
print(json.dumps(out, indent=0))
