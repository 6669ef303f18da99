"""Reference values for the SPH reader test, computed with h5py (pip install h5py numpy).
Per file: shape, per-lead float64 sum and first/last value of the float16 `ecg` dataset.
Run from the repository root:
    python3 crates/ecg-io/tests/it/reference/make_sph_reference.py > crates/ecg-io/tests/it/reference/sph_reference.json
"""
import glob
import json
import os

import h5py
import numpy as np

out = {}
for p in sorted(glob.glob(os.path.join("..", "shared", "data", "sph_subset", "*.h5"))):
    x = np.asarray(h5py.File(p, "r")["ecg"][()], dtype=np.float64)
    out[os.path.basename(p)] = {"shape": list(x.shape), "sum": x.sum(axis=1).tolist(),
                                "first": x[:, 0].tolist(), "last": x[:, -1].tolist()}
print(json.dumps(out))
