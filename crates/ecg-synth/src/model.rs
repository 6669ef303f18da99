//! The cardiac-dipole beat model. The heart's electrical activity is a time-varying dipole
//! (the vectorcardiogram, VCG) written as a sum of Gaussian waves in three dimensions, one
//! set per wave (P, Q, R, S, ST, T), the multichannel extension of McSharry et al. (2003) by
//! Sameni et al. (2007). The 12 leads are the VCG projected by the inverse Dower transform,
//! so Einthoven's and Goldberger's relations hold exactly.
//!
//! Axes (Dower/Frank): x to the patient's left, y to the feet, z to the back. Diagnostic
//! morphologies are edits of the beat: extra or removed waves and rotated vectors.

/// One Gaussian wave of the dipole: centre (s, relative to QRS onset), width (s) and vector
/// (mV in x, y, z).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wave {
    /// Centre time relative to QRS onset, seconds.
    pub t: f64,
    /// Standard deviation, seconds.
    pub sigma: f64,
    /// Dipole vector, mV.
    pub v: [f64; 3],
}

/// Inverse Dower transform (Edenbrandt & Pahlm 1988): rows I, II, V1..V6; columns x, y, z.
pub const DOWER: [[f64; 3]; 8] = [
    [0.632, -0.235, 0.059],
    [0.235, 1.066, -0.132],
    [-0.515, 0.157, -0.917],
    [0.044, 0.164, -1.387],
    [0.882, 0.098, -1.277],
    [1.213, 0.127, -0.601],
    [1.125, 0.127, -0.086],
    [0.831, 0.076, 0.230],
];

/// Project a VCG sample onto the 12 standard leads (order I, II, III, aVR, aVL, aVF, V1-V6).
#[inline]
pub fn project(v: [f64; 3]) -> [f64; 12] {
    let row = |r: usize| DOWER[r][0] * v[0] + DOWER[r][1] * v[1] + DOWER[r][2] * v[2];
    let (i, ii) = (row(0), row(1));
    [
        i,
        ii,
        ii - i,
        -(i + ii) / 2.0,
        i - ii / 2.0,
        ii - i / 2.0,
        row(2),
        row(3),
        row(4),
        row(5),
        row(6),
        row(7),
    ]
}

/// Per-beat timing and shape: what the classes edit.
#[derive(Debug, Clone, PartialEq)]
pub struct BeatShape {
    /// P onset to QRS onset, s (None: no P wave, as in AF or a PVC).
    pub pr: Option<f64>,
    /// QRS duration, s.
    pub qrs: f64,
    /// Rate-corrected QT (Bazett), s.
    pub qtc: f64,
    /// Waves of depolarisation (QRS) relative to QRS onset.
    pub qrs_waves: Vec<Wave>,
    /// P wave vector.
    pub p: [f64; 3],
    /// T wave vector (peak amplitude).
    pub t: [f64; 3],
    /// ST-segment shift vector.
    pub st: [f64; 3],
}

pub(crate) fn add(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

pub(crate) fn scale(a: [f64; 3], s: f64) -> [f64; 3] {
    [a[0] * s, a[1] * s, a[2] * s]
}

pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub(crate) fn unit(a: [f64; 3]) -> [f64; 3] {
    let n = dot(a, a).sqrt().max(1e-12);
    scale(a, 1.0 / n)
}

impl BeatShape {
    /// The waves of one beat with RR interval `rr` (s): P, QRS, ST and an asymmetric T whose
    /// timing follows Bazett (QT = QTc * sqrt(RR)).
    pub fn waves(&self, rr: f64) -> Vec<Wave> {
        let mut w = Vec::with_capacity(self.qrs_waves.len() + 5);
        if let Some(pr) = self.pr {
            w.push(Wave {
                t: -pr + 0.05,
                sigma: 0.022,
                v: self.p,
            });
        }
        w.extend(self.qrs_waves.iter().copied());
        let qt = self.qt(rr);
        // ST segment: a broad plateau from the J point towards the T wave.
        let j = self.qrs;
        w.push(Wave {
            t: j + 0.35 * (qt - j),
            sigma: 0.22 * (qt - j),
            v: self.st,
        });
        // T wave: slow upstroke, faster downstroke; ends near QT.
        let t_peak = qt - 0.085;
        w.push(Wave {
            t: t_peak - 0.02,
            sigma: 0.045,
            v: scale(self.t, 0.7),
        });
        w.push(Wave {
            t: t_peak + 0.012,
            sigma: 0.03,
            v: scale(self.t, 0.5),
        });
        w
    }

    /// QT at RR `rr` (Bazett), s.
    pub fn qt(&self, rr: f64) -> f64 {
        self.qtc * rr.clamp(0.3, 2.0).sqrt()
    }
}
