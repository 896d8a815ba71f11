//! Rotary position embeddings as HF transformers computes them: inverse frequencies (default,
//! linear, or LLaMA 3 band scaling) and cos/sin tables from per-token position ids, so that
//! left-padded rows rotate by the count of real tokens.

use burn::prelude::*;
use gram_core::RopeScaling;

/// Inverse frequencies `1 / theta^(2i/d)` for `i < d/2`, scaled as configured; computed in f32
/// as transformers does.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / f64::from(low_freq_factor);
            let high_wavelen = old / f64::from(high_freq_factor);
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let w = f64::from(wavelen);
                    let scaled = if w > low_wavelen { f / factor } else { f };
                    let smooth = ((old as f32) / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let medium = w >= high_wavelen && w <= low_wavelen;
                    if medium { smoothed } else { scaled }
                })
                .collect()
        }
    }
}

/// Position ids of a left-padded batch: `cumsum(mask) - 1`, clamped at 0.
///
/// # Shapes
/// - `mask`: `[batch, seq]` (1 real, 0 padding)
/// - output: `[batch, seq]`
pub fn position_ids(mask: Tensor<2, Int>) -> Tensor<2, Int> {
    mask.cumsum(1).sub_scalar(1).clamp_min(0)
}

/// cos and sin tables for the given positions.
///
/// # Shapes
/// - `positions`: `[batch, seq]`
/// - output: two `[batch, 1, seq, head_dim]` tensors (broadcast over heads)
pub fn cos_sin(positions: Tensor<2, Int>, inv_freq: &Tensor<1>) -> (Tensor<4>, Tensor<4>) {
    let [b, t] = positions.dims();
    let [half] = inv_freq.dims();
    let pos = positions.float().reshape([b, t, 1]);
    let freqs = pos.mul(inv_freq.clone().reshape([1, 1, half]));
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([b, 1, t, 2 * half]);
    (emb.clone().cos(), emb.sin())
}

/// Applies the rotation: `x * cos + rotate_half(x) * sin`.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch, 1, seq, head_dim]`
pub fn apply(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let base = inv_freq(16, 500000.0, &RopeScaling::Default);
        let s = inv_freq(
            16,
            500000.0,
            &RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        );
        assert_eq!(s[0], base[0], "highest frequency untouched");
        assert!(
            (s[7] - base[7] / 8.0).abs() < 1e-12,
            "lowest frequency divided by the factor"
        );
        // With a short original context every band is in the smoothed middle: between the two.
        let m = inv_freq(
            16,
            500000.0,
            &RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16,
            },
        );
        assert!(
            m[0] < base[0] && m[0] > base[0] / 8.0,
            "{} vs {}",
            m[0],
            base[0]
        );
    }
}
