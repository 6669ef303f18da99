//! Data behind the report's method figures: the Sinkhorn transport plan between a teacher's
//! (projected) and a student's visual tokens for one example (the paper's Figure 2), and the
//! singular-value spectra of teacher and student visual features (Figure 3).

use burn::module::Module;
use burn::tensor::Device;
use evl_kd::ot::ot_loss;
use evl_models::vlm::EcgVlm;

use evl_infer::input::{Sample, pixels};
use evl_train::train::DistillModel;

pub use evl_run::{Analysis, PlanFigure, Spectrum};

/// The plan between `teacher`'s visual tokens (through the head's trained projector) and the
/// distilled student's, for `sample`, with the head's OT settings.
pub fn transport_plan(
    teacher: &EcgVlm,
    distilled: &DistillModel,
    ot: &evl_kd::ot::OtLossConfig,
    sample: &Sample,
    device: &Device,
) -> PlanFigure {
    let t_vis = teacher.encode(pixels(&[sample], &teacher.input(), device));
    let student = distilled.student.valid();
    let s_vis = student.encode(pixels(&[sample], &student.input(), device));
    let proj = distilled.head.ot.proj.valid().forward(t_vis);
    let out = ot_loss(proj, s_vis, None, None, ot);
    let [_, rows, cols] = out.dims;
    PlanFigure {
        example: sample.id.clone(),
        rows,
        cols,
        cost: out.plan.iter().zip(&out.cost).map(|(p, c)| p * c).sum(),
        plan: out.plan,
        eps: ot.eps,
        n_iter: out.n_iter.first().copied().unwrap_or(0),
    }
}

/// The spectrum of `model`'s visual tokens over `samples`.
pub fn spectrum(name: &str, model: &EcgVlm, samples: &[Sample], device: &Device) -> Spectrum {
    let mut rows: Vec<f32> = Vec::new();
    let mut width = 0;
    for chunk in samples.chunks(16) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let v = model.encode(pixels(&refs, &model.input(), device));
        let [b, n, d] = v.dims();
        width = d;
        rows.extend(v.reshape([b * n, d]).into_data().iter::<f32>());
    }
    let n = rows.len() / width.max(1);
    singular_spectrum(name, &rows, n, width)
}

/// Singular values of the column-centred `[n, d]` matrix from the eigenvalues of its `d x d`
/// Gram matrix (nalgebra's symmetric eigensolver).
pub fn singular_spectrum(name: &str, x: &[f32], n: usize, d: usize) -> Spectrum {
    let mut m = nalgebra::DMatrix::<f64>::from_fn(n, d, |i, j| x[i * d + j] as f64);
    for j in 0..d {
        let mean = m.column(j).mean();
        m.column_mut(j).add_scalar_mut(-mean);
    }
    let gram = m.transpose() * &m;
    let mut s: Vec<f64> = gram
        .symmetric_eigenvalues()
        .iter()
        .map(|&e| e.max(0.0).sqrt())
        .collect();
    s.sort_by(|a, b| b.total_cmp(a));
    let top = s.first().copied().filter(|&v| v > 0.0).unwrap_or(1.0);
    let total: f64 = s.iter().sum();
    let entropy: f64 = s
        .iter()
        .filter(|&&v| v > 0.0)
        .map(|&v| {
            let p = v / total;
            -p * p.ln()
        })
        .sum();
    Spectrum {
        model: name.to_string(),
        width: d,
        rows: n,
        singular_values: s.iter().map(|v| v / top).collect(),
        effective_rank: entropy.exp(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectrum_of_a_known_matrix() {
        // Columns: a centred +-3 pattern, a centred +-1 pattern orthogonal to it, a constant.
        let x: Vec<f32> = [
            [3.0, 1.0, 5.0],
            [-3.0, 1.0, 5.0],
            [3.0, -1.0, 5.0],
            [-3.0, -1.0, 5.0],
        ]
        .concat();
        let s = singular_spectrum("m", &x, 4, 3);
        // Singular values 6 and 2 (sqrt(4 * 9), sqrt(4 * 1)); the constant column centres to 0.
        assert!((s.singular_values[0] - 1.0).abs() < 1e-12);
        assert!((s.singular_values[1] - 1.0 / 3.0).abs() < 1e-12);
        assert!(s.singular_values[2].abs() < 1e-7);
        let (p, q) = (0.75f64, 0.25f64);
        assert!((s.effective_rank - (-(p * p.ln() + q * q.ln())).exp()).abs() < 1e-9);
    }
}
