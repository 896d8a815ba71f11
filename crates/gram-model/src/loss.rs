//! The losses: GRAM's stage-2 loss (label-smoothed cross-entropy over the two label logits,
//! METHOD.md: exactly -log sigmoid(z) + (eps/2) z with z = l_correct - l_other), and the
//! Bradley-Terry loss of a scalar reward head.

use burn::prelude::*;

/// Stage-2 loss, mean over the batch.
///
/// Computed as `softplus(-z) + (eps/2) z`, which is `-log sigmoid(z) + (eps/2) z` without
/// overflow for large |z| in f32.
///
/// # Shapes
/// - `label_logits`: `[batch, 2]` (l_A, l_B); `target_is_b`: `[batch]` (0 for A, 1 for B)
/// - output: `[1]`
pub fn gram_loss(label_logits: Tensor<2>, target_is_b: Tensor<1, Int>, eps: f64) -> Tensor<1> {
    let z = label_margin(label_logits, target_is_b);
    gram_loss_of_margin(z, eps).mean()
}

/// The margin l_correct - l_other per row.
///
/// # Shapes
/// `[batch, 2]`, `[batch]` -> `[batch]`
pub fn label_margin(label_logits: Tensor<2>, target_is_b: Tensor<1, Int>) -> Tensor<1> {
    let [b, _] = label_logits.dims();
    let la = label_logits.clone().slice([0..b, 0..1]).reshape([b]);
    let lb = label_logits.slice([0..b, 1..2]).reshape([b]);
    let diff = la - lb; // l_A - l_B
    // sign = +1 when the target is A, -1 when B
    let sign = target_is_b.float().mul_scalar(-2.0).add_scalar(1.0);
    diff * sign
}

/// Per-row stage-2 loss of a margin: `-log sigmoid(z) + (eps/2) z`.
pub fn gram_loss_of_margin<const D: usize>(z: Tensor<D>, eps: f64) -> Tensor<D> {
    neg_log_sigmoid(z.clone()) + z.mul_scalar(eps / 2.0)
}

/// `-log sigmoid(z) = max(-z, 0) + log1p(exp(-|z|))`, accurate to f32 rounding everywhere:
/// `exp` only sees values <= 0 (no overflow), `log1p` keeps tiny losses at large z, and both
/// pieces are selected (not `abs`/`relu`), so the gradient at z = 0 is the true -1/2 and no
/// unselected branch can feed an inf into the backward pass.
pub fn neg_log_sigmoid<const D: usize>(z: Tensor<D>) -> Tensor<D> {
    let negative = z.clone().lower_elem(0.0);
    let minus_abs = z.clone().neg().mask_where(negative.clone(), z.clone());
    let relu_neg = z.zeros_like().mask_where(negative, z.neg());
    minus_abs.exp().log1p() + relu_neg
}

/// Bradley-Terry loss of a scalar reward head, mean over the batch: -log sigmoid(r_c - r_r).
///
/// # Shapes
/// `r_chosen`, `r_rejected`: `[batch]` -> `[1]`
pub fn bt_loss(r_chosen: Tensor<1>, r_rejected: Tensor<1>) -> Tensor<1> {
    neg_log_sigmoid(r_chosen - r_rejected).mean()
}

/// The minimiser of the stage-2 loss in the margin: z* = log((2 - eps) / eps).
pub fn optimal_margin(eps: f64) -> f64 {
    ((2.0 - eps) / eps).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(z: f64, eps: f64) -> f64 {
        // -log sigmoid(z) in f64, stably
        let nls = if z >= 0.0 {
            (-z).exp().ln_1p()
        } else {
            -z + z.exp().ln_1p()
        };
        nls + eps / 2.0 * z
    }

    fn values(t: Tensor<1>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap_or_default()
    }

    #[test]
    fn stage2_loss_is_regularised_bradley_terry() {
        let device = Device::flex();
        let zs: Vec<f32> = (0..=400).map(|i| -20.0 + 0.1 * i as f32).collect();
        for eps in [0.0, 0.05, 0.1] {
            // Through the real entry point: logits (l_A, l_B), half the rows labelled B.
            let n = zs.len();
            let mut logits = Vec::with_capacity(2 * n);
            let mut target = Vec::with_capacity(n);
            for (i, &z) in zs.iter().enumerate() {
                if i % 2 == 0 {
                    logits.extend([z + 0.25, 0.25]);
                    target.push(0i64);
                } else {
                    logits.extend([-1.0, z - 1.0]);
                    target.push(1i64);
                }
            }
            let l = Tensor::<2>::from_data(TensorData::new(logits, [n, 2]), &device);
            let t = Tensor::<1, Int>::from_data(TensorData::new(target, [n]), &device);
            let per_row = gram_loss_of_margin(label_margin(l, t), eps);
            for (k, got) in values(per_row).into_iter().enumerate() {
                let want = reference(f64::from(zs[k]), eps);
                let rel = (f64::from(got) - want).abs() / want.abs().max(1e-30);
                assert!(got.is_finite(), "z={} eps={eps}: not finite", zs[k]);
                assert!(
                    rel <= 1e-5,
                    "z={} eps={eps}: {got} vs {want} (rel {rel:e})",
                    zs[k]
                );
            }
        }
    }

    #[test]
    fn stage2_loss_gradient_matches_finite_difference() {
        let device = Device::flex().autodiff();
        for eps in [0.0, 0.1] {
            for z0 in [-20.0f32, -3.0, -0.5, 0.0, 0.7, 2.94, 20.0] {
                let z =
                    Tensor::<1>::from_data(TensorData::new(vec![z0], [1]), &device).require_grad();
                let loss = gram_loss_of_margin(z.clone(), eps).sum();
                let grads = loss.backward();
                let g = z.grad(&grads).map(values).unwrap_or_default()[0];
                let h = 1e-3;
                let fd = (reference(f64::from(z0) + h, eps) - reference(f64::from(z0) - h, eps))
                    / (2.0 * h);
                assert!(
                    (f64::from(g) - fd).abs() < 1e-4,
                    "z={z0} eps={eps}: grad {g} vs fd {fd}"
                );
            }
        }
        // The minimiser sits where the gradient vanishes: z* = log((2 - eps)/eps).
        let zs = optimal_margin(0.1);
        assert!((zs - 2.944).abs() < 1e-3);
        let fd = (reference(zs + 1e-4, 0.1) - reference(zs - 1e-4, 0.1)) / 2e-4;
        assert!(fd.abs() < 1e-6);
    }

    #[test]
    fn bt_loss_prefers_the_chosen() {
        let device = Device::flex();
        let c = Tensor::<1>::from_data(TensorData::new(vec![2.0f32, 0.0], [2]), &device);
        let r = Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 0.0], [2]), &device);
        let got = bt_loss(c, r).into_scalar::<f32>();
        let want = ((reference(2.0, 0.0) + reference(0.0, 0.0)) / 2.0) as f32;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
