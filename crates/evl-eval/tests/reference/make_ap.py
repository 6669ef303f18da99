"""Reference average precision values: scikit-learn's average_precision_score on seeded random
cases with ties (run from the repository root; writes ap_reference.json beside this file)."""
import json
import os

import numpy as np
import sklearn
from sklearn.metrics import average_precision_score

rng = np.random.default_rng(2026)
cases = []
for n in [5, 17, 60, 200]:
    for tie_levels in [None, 4]:
        y = rng.random(n) < 0.3
        y[0] = True
        s = rng.random(n)
        if tie_levels:
            s = np.round(s * tie_levels) / tie_levels
        cases.append({"y": y.astype(int).tolist(), "score": s.tolist(), "ap": float(average_precision_score(y, s))})
out = {"sklearn": sklearn.__version__, "cases": cases}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ap_reference.json"), "w") as f:
    json.dump(out, f)
