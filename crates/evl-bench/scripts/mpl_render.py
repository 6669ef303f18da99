"""Reference for `evl-ecg bench render`: a matplotlib ECG-paper renderer in the style of
ECG-Image-Kit (which draws with matplotlib): 3x4 leads + lead II strip, 25 mm/s, 10 mm/mV,
1 mm minor / 5 mm major red grid, lead labels, saved as PNG at the given dpi.

Usage: mpl_render.py DIR DPI N. DIR holds format-16 12-lead records written by
`evl-ecg data synth` (read here with numpy, not timed). Prints JSON {"best_s_per_image", "n"}.
"""
import json
import os
import sys
import time
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LAYOUT = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]]
NAMES = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def load(path, n_leads=12):
    x = np.fromfile(path, dtype="<i2").reshape(-1, n_leads).T / 1000.0
    return x


def render(sig, fs, dpi):
    w_mm, h_mm = 279.4, 215.9
    fig = plt.figure(figsize=(w_mm / 25.4, h_mm / 25.4), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, w_mm)
    ax.set_ylim(h_mm, 0)
    ax.axis("off")
    for x in np.arange(0, w_mm, 1.0):
        ax.axvline(x, color=(0.97, 0.77, 0.77), lw=0.3 if x % 5 else 0.7)
    for y in np.arange(0, h_mm, 1.0):
        ax.axhline(y, color=(0.97, 0.77, 0.77), lw=0.3 if y % 5 else 0.7)
    x0, top = 20.0, 22.0
    row_h = (h_mm - top - 8.0) / 4.0
    seg = int(2.5 * fs)
    for r, row in enumerate(LAYOUT):
        base = top + row_h * (r + 0.5)
        for c, lead in enumerate(row):
            s = sig[NAMES.index(lead), c * seg:(c + 1) * seg]
            t = x0 + c * 62.5 + np.arange(len(s)) / fs * 25.0
            ax.plot(t, base - s * 10.0, color="k", lw=0.8)
            ax.text(x0 + c * 62.5 + 1, base - 0.45 * row_h + 3, lead, fontsize=8)
    base = top + row_h * 3.5
    s = sig[1, : 4 * seg]
    ax.plot(x0 + np.arange(len(s)) / fs * 25.0, base - s * 10.0, color="k", lw=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def main():
    d, dpi, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    recs = sorted(f[:-4] for f in os.listdir(d) if f.endswith(".dat"))[:n]
    sigs = [load(os.path.join(d, r + ".dat")) for r in recs]
    render(sigs[0], 500, dpi)  # warm-up
    t = time.perf_counter()
    for s in sigs:
        render(s, 500, dpi)
    el = time.perf_counter() - t
    print(json.dumps({"best_s_per_image": el / len(sigs), "n": len(sigs), "matplotlib": matplotlib.__version__}))


if __name__ == "__main__":
    main()
