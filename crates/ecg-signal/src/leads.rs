//! Lead selection and reordering, per-lead standardisation, crop/pad.

use ecg_io::{Lead, Record};

/// The signal of each requested lead in mV (f32), in the requested order, with a mask saying
/// which were present; absent leads are zeros (never silently dropped: the mask says so).
pub fn select_leads(record: &Record, leads: &[Lead]) -> (Vec<Vec<f32>>, Vec<bool>) {
    let all = record.to_mv_f32();
    let mut out = Vec::with_capacity(leads.len());
    let mut present = Vec::with_capacity(leads.len());
    for l in leads {
        match record.channel_index(l) {
            Some(i) => {
                out.push(all[i].clone());
                present.push(true);
            }
            None => {
                out.push(vec![0.0; record.n_samples]);
                present.push(false);
            }
        }
    }
    (out, present)
}

/// Zero mean, unit variance per lead; NaN samples are replaced by 0 after scaling. A flat
/// lead (sd below `1e-6` mV) is only centred.
pub fn standardize(x: &mut [f32]) {
    let valid: Vec<f64> = x
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| v as f64)
        .collect();
    if valid.is_empty() {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mean = valid.iter().sum::<f64>() / valid.len() as f64;
    let var = valid.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / valid.len() as f64;
    let sd = var.sqrt();
    let scale = if sd > 1e-6 { 1.0 / sd } else { 1.0 };
    for v in x.iter_mut() {
        *v = if v.is_finite() {
            ((*v as f64 - mean) * scale) as f32
        } else {
            0.0
        };
    }
}

/// Crop (centred) or zero-pad (at the end) to exactly `len` samples.
pub fn crop_or_pad(x: &[f32], len: usize) -> Vec<f32> {
    if x.len() >= len {
        let start = (x.len() - len) / 2;
        x[start..start + len].to_vec()
    } else {
        let mut v = x.to_vec();
        v.resize(len, 0.0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardize_and_crop() {
        let mut x = vec![1.0f32, 3.0, f32::NAN, 5.0];
        standardize(&mut x);
        assert!((x[0] + 1.2247449).abs() < 1e-5 && x[2] == 0.0);
        assert_eq!(crop_or_pad(&[1.0, 2.0, 3.0, 4.0], 2), vec![2.0, 3.0]);
        assert_eq!(crop_or_pad(&[1.0], 3), vec![1.0, 0.0, 0.0]);
    }
}
