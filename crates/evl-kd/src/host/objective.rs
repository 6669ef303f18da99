//! The fused objective's alignment terms (method.md 2; [`crate::objective`] gives the
//! function): `L_mhca` and `L_rel` on one cross-attention pass ([`fused_terms`]), the
//! relation kernel fed each item's `Hhat_t`, then a single backward pass through the
//! cross-attention for both terms.

use crate::host::mhca::{fused_terms, loss_item};
use crate::host::relation::{RelationItem, RelationWant};
use crate::host::simd;
use crate::mhca::MhcaWeights;
use crate::objective::EvlWeights;
use crate::relation::RelationConfig;
use burn::tensor::{Bool, Tensor};
use evl_models::device::{precision_of, to_vec_bool};

/// `L_mhca` and `L_rel` (values, `0` for a switched-off term) and the differentiable
/// `lm L_mhca + lr L_rel`, which carries both terms' exact gradients.
pub(crate) fn align_terms_fused(
    (hs, ht): (&Tensor<3>, &Tensor<3>),
    (student_mask, teacher_mask): (Option<&Tensor<2, Bool>>, Option<&Tensor<2, Bool>>),
    mhca: &MhcaWeights,
    n_heads: usize,
    weights: &EvlWeights,
    rel_cfg: &RelationConfig,
) -> ([f64; 2], Tensor<1>) {
    let [b, l, d] = hs.dims();
    let sm = student_mask.map(|m| to_vec_bool(m.clone()));
    let valid_row = |bi: usize| sm.as_deref().map(|m| &m[bi * l..(bi + 1) * l]);
    let n_valid = |bi: usize| valid_row(bi).map_or(l, |v| v.iter().filter(|&&x| x).count());
    let n_tokens: usize = (0..b).map(n_valid).sum();
    let n_pairs = (0..b)
        .map(|bi| (n_valid(bi) as f64).powi(2))
        .sum::<f64>()
        .max(1.0);
    let cfg = RelationConfig {
        term_gradients: false,
        ..*rel_cfg
    };
    let prec = precision_of(hs);
    // Per item, on its Hhat_t and H_s rows: L_mhca's share, then L_rel's (its gradients
    // scattered from the valid rows), each gradient weighted by its lambda.
    let terms =
        |bi: usize, (hs_r, hhat_r): (&[f64], &[f64]), (gh, gs): (&mut [f64], &mut [f64])| {
            let mut values = [0.0; 2];
            if weights.use_mhca {
                values[0] = loss_item(
                    (hs_r, hhat_r),
                    d,
                    valid_row(bi),
                    n_tokens,
                    weights.lambda_mhca,
                    (&mut *gh, &mut *gs),
                );
            }
            if weights.use_rel {
                let idx: Vec<usize> = (0..l)
                    .filter(|&i| valid_row(bi).is_none_or(|v| v[i]))
                    .collect();
                let r = simd(RelationItem {
                    x: hhat_r,
                    y: hs_r,
                    idx,
                    d,
                    n_pairs,
                    cfg: &cfg,
                    prec,
                    want: RelationWant {
                        grad_x: !cfg.detach_teacher,
                        grad_y: true,
                        psi: false,
                    },
                });
                values[1] = 0.5 * (r.sums.0 + r.sums.1) / n_pairs;
                for (out, g) in [(&mut *gh, &r.grads[0][0]), (&mut *gs, &r.grads[1][0])] {
                    if g.is_empty() {
                        continue;
                    }
                    for (a, &i) in r.idx.iter().enumerate() {
                        let (o, src) = (&mut out[i * d..(i + 1) * d], &g[a * d..(a + 1) * d]);
                        o.iter_mut()
                            .zip(src)
                            .for_each(|(o, &x)| *o += weights.lambda_rel * x);
                    }
                }
            }
            values
        };
    let lambdas = [
        if weights.use_mhca {
            weights.lambda_mhca
        } else {
            0.0
        },
        if weights.use_rel {
            weights.lambda_rel
        } else {
            0.0
        },
    ];
    fused_terms((hs, ht), mhca, n_heads, teacher_mask, lambdas, &terms)
}
