//! Wave boundaries of clean beats (synthetic records, median beats): QRS onset and offset
//! from the spatial velocity (sum over leads of |dx/dt|), T-wave end from the spatial
//! deviation from the isoelectric level. Not meant for raw noisy recordings.

/// Boundaries of one beat, in samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// QRS onset.
    pub qrs_on: usize,
    /// QRS offset (J point).
    pub qrs_off: usize,
    /// End of the T wave.
    pub t_end: usize,
}

impl Beat {
    /// QRS duration in seconds.
    pub fn qrs_s(&self, fs: f64) -> f64 {
        (self.qrs_off - self.qrs_on) as f64 / fs
    }

    /// QT interval in seconds.
    pub fn qt_s(&self, fs: f64) -> f64 {
        (self.t_end - self.qrs_on) as f64 / fs
    }
}

/// Delineate the beats around the QRS locations `r` (from [`crate::detect_qrs`]). Beats too
/// close to the record edges are skipped.
pub fn delineate(leads: &[&[f32]], fs: f64, r: &[usize]) -> Vec<Beat> {
    let n = leads.first().map_or(0, |l| l.len());
    let mut sv = vec![0.0f64; n];
    for l in leads {
        for k in 1..n.saturating_sub(1) {
            sv[k] += ((l[k + 1] - l[k - 1]) as f64).abs() * fs / 2.0;
        }
    }
    let ms = |x: f64| (x * fs / 1000.0).round() as usize;
    let quiet = ms(16.0).max(2);
    // Isoelectric level per lead: the median sample (clean records are isoelectric most of
    // the time; a level taken just before the QRS would catch the P wave or the Q wave).
    let iso: Vec<f64> = leads
        .iter()
        .map(|l| {
            let mut v: Vec<f32> = l.to_vec();
            v.sort_by(f32::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0) as f64
        })
        .collect();
    let mut out = Vec::new();
    for (i, &rk) in r.iter().enumerate() {
        let next = r.get(i + 1).copied().unwrap_or(n);
        if rk < ms(250.0) || rk + ms(450.0) >= n.min(next + ms(100.0)) {
            continue;
        }
        let peak = sv[rk - ms(100.0)..rk + ms(100.0)]
            .iter()
            .cloned()
            .fold(0.0, f64::max);
        let thr = 0.06 * peak;
        let below = |a: usize, b: usize| sv[a..b].iter().all(|&v| v < thr);
        // Onset: walking back from the R peak, the first sample followed (backwards) by a
        // quiet stretch.
        let mut on = rk;
        while on > quiet && on + ms(160.0) > rk && !below(on - quiet, on) {
            on -= 1;
        }
        let mut off = rk;
        while off + quiet < n && off < rk + ms(200.0) && !below(off, off + quiet) {
            off += 1;
        }
        let dev = |k: usize| -> f64 {
            leads
                .iter()
                .zip(&iso)
                .map(|(l, b)| (l[k] as f64 - b).abs())
                .sum()
        };
        let search_end = (rk + ms(600.0)).min(next.saturating_sub(ms(60.0))).min(n);
        let start = off + ms(60.0);
        if start >= search_end {
            continue;
        }
        let (tp, tv) = (start..search_end)
            .map(|k| (k, dev(k)))
            .fold((start, 0.0), |a, b| if b.1 > a.1 { b } else { a });
        let mut te = tp;
        // End: deviation down to 15% of the T peak, or a trough below 30% after which it
        // rises again (the next P wave).
        while te + quiet < search_end
            && dev(te) > 0.15 * tv
            && !(dev(te) < 0.3 * tv && dev(te + quiet) > dev(te))
        {
            te += 1;
        }
        out.push(Beat {
            qrs_on: on,
            qrs_off: off,
            t_end: te,
        });
    }
    out
}
